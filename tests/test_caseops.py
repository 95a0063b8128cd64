"""CaseOps (FRONTIER.md section 1): the transform and its inverse (data/caseops.py), the byte
sidecar of data/prepare.py --caseops against the record's rules and its invariant, the CaseOps
tokenizer, and evaluation counting bytes from the sidecar."""
import json
import math
import os
import random
import unicodedata

import numpy as np
import pytest
import torch

from data import caseops, prepare
from data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError
from model.bpb import SidecarBytes, build_byte_luts, describe_byte_source, validation_byte_source
from model.data import DistributedTokenLoader, load_validation_bytes, load_validation_tokens, open_sentencepiece, read_shard, shard_paths
from model.evaluate import evaluate_contiguous, evaluate_sliding, evaluate_ttt

CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

# -- the transform ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),  # FRONTIER.md's examples
    ("McDonald's iPhone A I", f"{TITLE}mc{CAPNEXT}donald's i{CAPNEXT}phone {TITLE}a {TITLE}i"),
    ("", ""),
    ("plain words, 42 digits", "plain words, 42 digits"),
    ("aBC", f"a{CAPNEXT}b{CAPNEXT}c"),  # mixed case that starts lowercase
    ("ABc", f"{TITLE}a{CAPNEXT}bc"),  # mixed case that starts uppercase (not ALLCAPS: c is lowercase)
    ("ÉCOLE École", f"É{ALLCAPS}cole École"),  # non-ASCII letters untouched; the ASCII run after É is its own word
    ("x1Y", f"x1{TITLE}y"),  # a digit ends an ASCII-letter run
    (f"a{TITLE}b{ESC}", f"a{ESC}{TITLE}b{ESC}{ESC}"),  # literal operators escaped
])
def test_encode_examples_and_exact_decode(text, expected):
    assert caseops.encode(text) == expected
    assert caseops.decode(expected) == text


ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3  # ASCII letters weigh most, runs form words
    + "0123456789 .,;:'\"!?-_()\n\t"
    + "éÉßñÑçøÅæœŒ"  # Latin beyond ASCII
    + "αβγΔΣωЖжЯяДд"  # Greek, Cyrillic
    + "中文字日本語한국어"  # CJK, Hangul
    + "عربيעבריתहिन्दी"  # right-to-left scripts, Devanagari (combining marks)
    + "😀🚀\U0001F9EA\u200b\u00a0\ufb01"  # outside the BMP, zero-width space, no-break space, a ligature
    + TITLE + ALLCAPS + CAPNEXT + ESC + "\ue000\ue005"  # the operators and their neighbours
)


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [""] + ["".join(rng.choices(ALPHABET, k=rng.randint(0, 60))) for _ in range(count)]


def test_round_trip_on_random_unicode():
    for text in random_texts(2000):
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text
        assert caseops.encode(caseops.decode(encoded)) == encoded  # decode is encode's inverse both ways
        assert not any("A" <= ch <= "Z" for ch in encoded)  # every capital went into an operator
        # byte weights: the sidecar's basis sums to the original's UTF-8 length
        assert int(caseops.byte_weights(encoded).sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text, position, marker", [
    (TITLE, 0, "TITLE"),  # nothing to act on
    (f"ab {TITLE} c", 3, "TITLE"),
    (f"{TITLE}A", 0, "TITLE"),  # capitals never follow a marker
    (f"x{ALLCAPS}1", 1, "ALLCAPS"),
    (f"ok{CAPNEXT}{CAPNEXT}a", 2, "CAPNEXT"),
    (f"abc{ESC}", 3, "ESC"),  # ESC at the end
    (f"{ESC}a", 0, "ESC"),  # ESC before a non-operator
    (f"{ESC}{ESC}{ESC}", 2, "ESC"),  # a literal ESC, then a dangling one
])
def test_misplaced_markers_raise_one_line_with_position(text, position, marker):
    with pytest.raises(CaseOpsError, match=rf"^malformed CaseOps text at position {position}: {marker} ") as err:
        caseops.decode(text)
    assert "\n" not in str(err.value)


def test_byte_weights_rules():
    # operators 0, an ESC'd literal operator 3 and its ESC 0, ASCII letters 1, others their UTF-8 length
    encoded = caseops.encode(f"Hé{TITLE}😀 A")
    assert encoded == f"{TITLE}hé{ESC}{TITLE}😀 {TITLE}a"
    assert caseops.byte_weights(encoded).tolist() == [0, 1, 2, 0, 3, 4, 1, 0, 1]


# -- the sidecar with the record's tokenizer ----------------------------------------------------------


@pytest.fixture(scope="module")
def record_sp():
    path = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tokenizers", CASEOPS_TOKENIZER))
    if not os.path.isfile(path):
        pytest.skip(f"the record's CaseOps tokenizer is not present at {path}")
    return open_sentencepiece(path)


def test_record_tokenizer_layout(record_sp):
    sp = record_sp
    assert sp.vocab_size() == 8192
    assert [sp.id_to_piece(i) for i in range(4, 8)] == [TITLE, ALLCAPS, CAPNEXT, ESC]
    assert sp.id_to_piece(8) == "<0x00>" and sp.id_to_piece(263) == "<0xFF>"
    assert sp.piece_to_id("\ue000") == sp.unk_id()  # U+E000 is not in the vocabulary


def sidecar_of(sp, text: str) -> list[int]:
    tokens, sidecar = prepare.encode_document(sp, text, caseops_transform=True, with_bytes=True)
    assert tokens[0] == sp.bos_id() and len(tokens) == len(sidecar)
    return sidecar.tolist()


def test_frontier_sidecar_example(record_sp):
    ids, _, _ = prepare.piece_offsets(record_sp, caseops.encode("The NASA Launch"))
    assert [record_sp.id_to_piece(i) for i in ids] == [TITLE, "the", "▁", ALLCAPS, "nas", "a", "▁", TITLE, "la", "unch"]
    assert sidecar_of(record_sp, "The NASA Launch") == [0, 0, 3, 1, 0, 3, 1, 1, 0, 2, 4]  # BOS first; sum 15


@pytest.mark.parametrize("text, expected_sum", [
    ("abc\n", 3), ("\n\nTitle\n", 5),  # FRONTIER.md: leading and trailing whitespace the normaliser drops count nothing
    ("a  \t b", 6),  # inner whitespace counts in full, collapsed or not
    ("ﬁne\u3000Ｘ", 11),  # NFKC-mapped characters keep their original length (3 + 2 + 3 + 3)
])
def test_sidecar_whitespace_and_normaliser(record_sp, text, expected_sum):
    assert sum(sidecar_of(record_sp, text)) == expected_sum


def test_sidecar_escaped_operator_and_byte_fallback(record_sp):
    sp = record_sp
    text = f"x{TITLE}\U0001F9EA"  # a literal operator, then a character the vocabulary lacks
    ids, _, _ = prepare.piece_offsets(sp, caseops.encode(text))
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[:3] == ["x", ESC, TITLE]
    assert pieces[3:] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAA>"]  # byte fallback
    # the ESC 0, the literal operator 3; the byte piece whose surface holds the character gets its 4 bytes
    assert sidecar_of(sp, text) == [0, 1, 0, 3, 0, 0, 0, 4]


def test_piece_offsets_from_byte_spans():
    """Older sentencepiece releases report surfaces as UTF-8 byte spans (immutable_proto):
    they are turned into character spans."""

    class Piece:
        def __init__(self, id_, begin, end):
            self.id, self.begin, self.end = id_, begin, end

    class OldProcessor:
        def encode(self, text, out_type):
            if out_type == "offset_mapping":
                raise RuntimeError("unknown out_type")
            assert out_type == "immutable_proto"
            # "é😀b": é is 2 bytes, 😀 4 (byte fallback: the last byte piece holds it)
            return type("Proto", (), {"pieces": [Piece(10, 0, 2), Piece(11, 2, 2), Piece(12, 2, 6), Piece(13, 6, 7)]})

    ids, begins, ends = prepare.piece_offsets(OldProcessor(), "é😀b")
    assert ids == [10, 11, 12, 13] and begins.tolist() == [0, 1, 1, 2] and ends.tolist() == [1, 1, 2, 3]


@pytest.fixture(scope="module")
def sample_docs():
    path = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "raw", "fineweb_val_sample_200docs.jsonl"))
    if not os.path.isfile(path):
        pytest.skip(f"the sample documents are not present at {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def test_sidecar_sums_to_the_utf8_length_of_each_document(record_sp, sample_docs):
    """FRONTIER.md's invariant on the 200 sample documents: each document's sidecar sums to the
    UTF-8 length of its text less the leading and trailing whitespace the normaliser drops."""
    for i, text in enumerate(sample_docs):
        assert sum(sidecar_of(record_sp, text)) == len(text.strip().encode("utf-8")), f"document {i}"


# -- a CaseOps tokenizer trained here ----------------------------------------------------------------


def nmt_nfkc_like(text: str) -> str:
    """What SentencePiece's nmt_nfkc normaliser (with its default whitespace handling) leaves of a
    text: NFKC, every run of whitespace (newlines included) one space, none at the ends."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def small_caseops_tokenizer(tmp_path_factory, sample_docs):
    path = str(tmp_path_factory.mktemp("caseops_tok") / "caseops_512.model")
    return prepare.train_tokenizer(sample_docs[:100], path, vocab_size=512, caseops_transform=True)


def test_trained_caseops_tokenizer_settings_and_round_trip(small_caseops_tokenizer, sample_docs):
    sp = open_sentencepiece(small_caseops_tokenizer)
    assert sp.vocab_size() == 512
    assert [sp.id_to_piece(i) for i in range(8)] == ["<pad>", "<s>", "</s>", "<unk>", TITLE, ALLCAPS, CAPNEXT, ESC]
    assert sp.id_to_piece(8) == "<0x00>" and sp.id_to_piece(263) == "<0xFF>"
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # digits split
    assert sp.encode("a b", out_type=str)[0] == "a"  # no dummy prefix
    changed = 0
    for text in sample_docs:  # 100 seen in training, 100 not
        back = caseops.decode(sp.decode(sp.encode(caseops.encode(text))))
        # Lossless up to the normaliser: NFKC and whitespace runs -> one space, ends stripped.
        assert back == nmt_nfkc_like(text)
        changed += back != text
    assert changed > 0  # the sample has newlines: the comparison above is not vacuous


# -- prepare --caseops: shards, sidecars, the trainer's loader, evaluation ----------------------------


@pytest.fixture(scope="module")
def caseops_shards(tmp_path_factory, small_caseops_tokenizer, sample_docs):
    out = str(tmp_path_factory.mktemp("caseops_shards"))
    stats = prepare.prepare(sample_docs[:12], out, small_caseops_tokenizer, val_docs=8, shard_tokens=9000,
                            caseops_transform=True, workers=1)
    return out, stats, sample_docs[:12]


def test_prepare_caseops_shards_and_sidecars(caseops_shards, small_caseops_tokenizer):
    out, stats, docs = caseops_shards
    sp = open_sentencepiece(small_caseops_tokenizer)
    assert stats["docs_val"] == 8 and stats["docs_train"] == 4 and len(stats["files_val"]) >= 2
    assert stats["files_val_bytes"] == [name.replace("val_", "val_bytes_") for name in stats["files_val"]]
    val_paths = shard_paths(out, "val")  # the trainer's glob skips the sidecars
    assert [os.path.basename(p) for p in val_paths] == stats["files_val"]
    tokens = np.concatenate([read_shard(p, sp.vocab_size()) for p in val_paths])
    sidecar = np.concatenate([read_shard(os.path.join(out, n)) for n in stats["files_val_bytes"]])
    assert len(tokens) == len(sidecar) == stats["tokens_val"]
    expected = [prepare.encode_document(sp, text, True, True) for text in docs[:8]]
    assert np.array_equal(tokens, np.concatenate([t for t, _ in expected]))
    assert np.array_equal(sidecar, np.concatenate([b for _, b in expected]))
    # per document (split at BOS), the sidecar sums to the document's UTF-8 length less its stripped ends
    starts = np.flatnonzero(tokens == sp.bos_id()).tolist() + [len(tokens)]
    assert [int(sidecar[a:b].sum()) for a, b in zip(starts, starts[1:])] == [len(t.strip().encode("utf-8")) for t in docs[:8]]
    train = np.concatenate([read_shard(p) for p in shard_paths(out, "train")])
    assert np.array_equal(train, np.concatenate([prepare.encode_document(sp, t, True, False)[0] for t in docs[8:]]))
    inputs, targets = DistributedTokenLoader(out, vocab_size=sp.vocab_size()).next_batch(64, 32, "cpu")  # the trainer's loader
    assert inputs.flatten().tolist() == train[:64].tolist() and targets.flatten().tolist() == train[1:65].tolist()
    assert not [n for n in os.listdir(out) if "train_bytes" in n]  # sidecars only for validation


def test_prepare_caseops_worker_pool_gives_the_same_files(caseops_shards, small_caseops_tokenizer, tmp_path, monkeypatch):
    out, stats, docs = caseops_shards
    monkeypatch.setattr(prepare, "CHUNK_DOCS", 3)  # several chunks in flight, one straddling the val boundary
    logs = []
    again = prepare.prepare(docs, str(tmp_path), small_caseops_tokenizer, val_docs=8, shard_tokens=9000,
                            caseops_transform=True, workers=2, log=logs.append)
    assert again["files_val_bytes"] == stats["files_val_bytes"] and again["files_train"] == stats["files_train"]
    for name in stats["files_val"] + stats["files_val_bytes"] + stats["files_train"]:
        with open(os.path.join(out, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    assert logs and logs[-1].startswith("encoded 12 documents") and "documents/s" in logs[-1]


def test_prepare_overwrite_removes_stale_sidecars(small_caseops_tokenizer, sample_docs, tmp_path):
    """Re-exporting over CaseOps shards: no sidecar of the old export survives to be paired with
    the new shards (a plain export leaves none at all)."""
    out = str(tmp_path)
    first = prepare.prepare(sample_docs[:6], out, small_caseops_tokenizer, val_docs=6, shard_tokens=4000, caseops_transform=True)
    assert len(first["files_val_bytes"]) > 2
    second = prepare.prepare(sample_docs[:1], out, small_caseops_tokenizer, val_docs=1, shard_tokens=4000, caseops_transform=True,
                             overwrite=True)
    assert sorted(n for n in os.listdir(out) if "_bytes_" in n) == second["files_val_bytes"]
    num_tokens = second["tokens_val"]
    assert int(load_validation_bytes(out, num_tokens).sum()) == len(sample_docs[0].strip().encode("utf-8"))
    prepare.prepare(sample_docs[:1], out, small_caseops_tokenizer, val_docs=1, overwrite=True)
    assert load_validation_bytes(out, num_tokens) is None


def test_prepare_caseops_refuses_a_tokenizer_without_operators(tmp_path):
    from tests.test_data_tools import synthetic_documents

    plain = prepare.train_tokenizer(synthetic_documents(200), str(tmp_path / "plain.model"), vocab_size=400)
    with pytest.raises(prepare.DataPrepError, match=r"no piece for the CaseOps operator\(s\) U\+E001, U\+E002, U\+E003, U\+E004"):
        prepare.prepare(["Some Text"], str(tmp_path / "out"), plain, val_docs=1, caseops_transform=True)


def test_cli_caseops_with_tokenizer_training(tmp_path, sample_docs, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_docs[:40]))
    model, out = tmp_path / "tok.model", tmp_path / "out"
    code = prepare.main(["--caseops", "--train-tokenizer", "--vocab-size", "400", "--input", str(docs), "--out", str(out),
                         "--tokenizer", str(model), "--val-docs", "5", "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tokenizer: " in captured.out and "val byte sidecars: 1" in captured.out
    assert "encoded 40 documents" in captured.err
    assert open_sentencepiece(str(model)).piece_to_id(TITLE) == 4
    assert load_validation_bytes(str(out), 10) is not None


class UniformTrainableLM(torch.nn.Module):
    """Every target costs ln(vocab) nats whatever the weights; forward gives TTT something to train."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def token_losses(self, ids, targets):
        return torch.full(targets.shape, math.log(self.vocab), dtype=torch.float32) + 0 * self.weight

    def forward(self, ids, targets):
        return self.token_losses(ids, targets).mean()


def test_smoke_evaluation_counts_bytes_from_the_sidecar(caseops_shards, small_caseops_tokenizer):
    """Every evaluation path on CaseOps shards made here (contiguous, sliding, legal TTT): a model
    paying ln(V) per target scores log2(V) * targets / (the sidecar bytes of exactly the scored
    targets), not the tokenizer tables' count (which counts the lowercased, operator-laden text)."""
    from tests.test_evaluate import ttt_config

    out, stats, _ = caseops_shards
    sp = open_sentencepiece(small_caseops_tokenizer)
    seq_len = 64
    tokens = load_validation_tokens(out, seq_len, max_tokens=3000, vocab_size=sp.vocab_size())  # crosses a shard boundary
    assert tokens.numel() == 2945
    luts = build_byte_luts(sp, sp.vocab_size())
    source = validation_byte_source(out, tokens.numel(), luts)
    assert isinstance(source, SidecarBytes) and describe_byte_source(source).startswith("sidecar fineweb_val_bytes_*.bin")
    sidecar = np.concatenate([read_shard(os.path.join(out, n)) for n in stats["files_val_bytes"]])
    assert source.token_bytes.tolist() == sidecar[:tokens.numel()].tolist()
    expected = math.log2(sp.vocab_size()) * (tokens.numel() - 1) / int(sidecar[1:tokens.numel()].sum())
    model = UniformTrainableLM(sp.vocab_size())
    loss, bpb = evaluate_sliding(model, tokens, seq_len, 16, 8, source)
    assert loss == pytest.approx(math.log(sp.vocab_size()), rel=1e-6)
    assert bpb == pytest.approx(expected, rel=1e-6)
    _, lut_bpb = evaluate_sliding(model, tokens, seq_len, 16, 8, luts)
    assert lut_bpb != pytest.approx(bpb, rel=1e-3)  # the byte source matters
    assert evaluate_contiguous(model, tokens, seq_len, 4, source)[1] == pytest.approx(expected, rel=1e-6)
    cfg = ttt_config(eval_seq_len=seq_len, eval_stride=16, ttt_chunk_tokens=8 * seq_len, train_seq_len=seq_len, ttt_lr=0.1)
    assert evaluate_ttt(model, tokens, cfg, source)[1] == pytest.approx(expected, rel=1e-6)
