"""data/prepare.py (text -> shards, tokenizer training) and data/download.py (checked, resumable
fetch of the published shards through huggingface_hub), without network: a fake hf_hub_download
serves files from memory and can fail transfers, lack files or be offline."""
import errno
import hashlib
import json
import os
import random

import numpy as np
import pytest

from data import download, prepare
from data.prepare import DataPrepError
from model.atomic import WriteFailed
from model.data import TOKENIZER_MANIFEST, check_tokenizer_matches, read_shard, write_shard

# -- shared fixtures --------------------------------------------------------------------------------

WORDS = [
    "the", "of", "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "was", "on", "be", "at",
    "model", "token", "shard", "golf", "parameter", "train", "value", "kernel", "bytes", "river", "stone",
    "window", "garden", "number", "history", "market", "energy", "village", "signal", "winter", "letter",
]


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of a few sentences of common words, with digits, of varied (small) length."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = rng.choices(WORDS, k=rng.randint(3, 15))
            if rng.random() < 0.3:
                words.append(str(rng.randint(0, 99999)))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 400-piece tokenizer trained on synthetic text with the sp1024 conventions."""
    path = str(tmp_path_factory.mktemp("tok") / "tiny.model")
    return prepare.train_tokenizer(synthetic_documents(300, seed=1), path, vocab_size=400)


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 20


# -- prepare: real data -------------------------------------------------------------------------------


def test_prepare_reproduces_official_val_sample(shared_data, tmp_path):
    jsonl = os.path.join(shared_data, "raw", "fineweb_val_sample_200docs.jsonl")
    tokenizer = os.path.join(shared_data, "tokenizers", "fineweb_1024_bpe.model")
    official = os.path.join(shared_data, "fineweb10B_sp1024_sample", "fineweb_val_000000.bin")
    if not all(os.path.isfile(p) for p in (jsonl, tokenizer, official)):
        pytest.skip("the raw val sample, tokenizer or sample val shard is missing from shared data")
    stats = prepare.prepare(prepare.read_documents(jsonl), str(tmp_path), tokenizer, val_docs=200, shard_tokens=100_000_000)
    assert stats["docs_val"] == 200 and stats["docs_train"] == 0 and stats["files_train"] == []
    assert stats["files_val"] == ["fineweb_val_000000.bin"]
    ours, theirs = read_shard(str(tmp_path / "fineweb_val_000000.bin")), read_shard(official)
    assert ours.size == theirs.size == stats["tokens_val"]
    np.testing.assert_array_equal(ours, theirs)  # token for token
    with open(tmp_path / "fineweb_val_000000.bin", "rb") as a, open(official, "rb") as b:
        assert a.read() == b.read()  # and byte for byte, header included


# -- prepare: synthetic documents -------------------------------------------------------------------


def expected_stream(sp, docs: list[str]) -> np.ndarray:
    return np.concatenate([np.array([sp.bos_id()] + sp.encode(d), dtype=np.uint16) for d in docs])


def split_tokens(folder, split: str) -> tuple[list[np.ndarray], list[str]]:
    names = sorted(n for n in os.listdir(folder) if n.startswith(f"fineweb_{split}_"))
    return [read_shard(os.path.join(folder, n)) for n in names], names


@pytest.mark.parametrize("val_docs, shard_tokens", [(7, 37), (0, 64), (1, 1000), (40, 101), (3, 1)])
def test_prepare_shards_bos_and_val_split(tiny_tokenizer, tmp_path, val_docs, shard_tokens):
    docs = synthetic_documents(40 if shard_tokens > 1 else 6, seed=2)
    docs[min(2, len(docs) - 1)] = ""  # an empty document still counts: BOS alone
    stats = prepare.prepare(docs, str(tmp_path), tiny_tokenizer, val_docs=val_docs, shard_tokens=shard_tokens)
    sp = prepare.load_tokenizer(tiny_tokenizer)
    val_count = min(val_docs, len(docs))
    for split, split_docs in (("val", docs[:val_count]), ("train", docs[val_count:])):
        shards, names = split_tokens(tmp_path, split)
        assert names == stats[f"files_{split}"] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(names))]
        assert stats[f"docs_{split}"] == len(split_docs)
        if not split_docs:
            assert shards == [] and stats[f"tokens_{split}"] == 0
            continue
        # every shard but the last holds exactly shard_tokens; the last one the rest
        assert all(s.size == shard_tokens for s in shards[:-1]) and 0 < shards[-1].size <= shard_tokens
        stream = np.concatenate(shards)
        np.testing.assert_array_equal(stream, expected_stream(sp, split_docs))
        assert stats[f"tokens_{split}"] == stream.size
        # one BOS per document, exactly at each document's start, never elsewhere (no EOS either)
        starts = np.cumsum([0] + [1 + len(sp.encode(d)) for d in split_docs[:-1]])
        np.testing.assert_array_equal(np.flatnonzero(stream == sp.bos_id()), starts)
        assert not np.any(stream == sp.eos_id())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "staging folder left behind"


def test_prepare_refuses_existing_shards_and_overwrite_removes_stale(tiny_tokenizer, tmp_path):
    docs = synthetic_documents(30, seed=3)
    first = prepare.prepare(docs, str(tmp_path), tiny_tokenizer, val_docs=5, shard_tokens=50)
    assert len(first["files_train"]) > 2
    with pytest.raises(DataPrepError, match="--overwrite") as err:
        prepare.prepare(docs, str(tmp_path), tiny_tokenizer, val_docs=5, shard_tokens=50)
    assert one_line(str(err.value))
    second = prepare.prepare(docs[:8], str(tmp_path), tiny_tokenizer, val_docs=5, shard_tokens=10**6, overwrite=True)
    assert sorted(n for n in os.listdir(tmp_path)) == sorted(second["files_val"] + second["files_train"] + [TOKENIZER_MANIFEST])


def test_prepare_failure_leaves_folder_untouched(tiny_tokenizer, tmp_path):
    def docs_then_error():
        yield from synthetic_documents(20, seed=4)
        raise DataPrepError("input.jsonl line 21: no \"text\" field; each line must be one object like {\"text\": \"...\"}")

    with pytest.raises(DataPrepError, match="line 21"):
        prepare.prepare(docs_then_error(), str(tmp_path), tiny_tokenizer, val_docs=2, shard_tokens=10)
    assert os.listdir(tmp_path) == []


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_prepare_writes_tokenizer_manifest(tiny_tokenizer, tmp_path):
    docs = synthetic_documents(30, seed=7)
    prepare.prepare(docs, str(tmp_path / "a"), tiny_tokenizer, val_docs=5, shard_tokens=100)
    manifest = json.loads((tmp_path / "a" / TOKENIZER_MANIFEST).read_text())
    with open(tiny_tokenizer, "rb") as f:
        assert manifest == {"tokenizer": "tiny.model", "sha256": hashlib.sha256(f.read()).hexdigest(), "vocab_size": 400}
    assert check_tokenizer_matches(str(tmp_path / "a"), tiny_tokenizer) == manifest
    # re-exported with another tokenizer (overwrite): the manifest follows, the old tokenizer is refused
    other = prepare.train_tokenizer(synthetic_documents(300, seed=8), str(tmp_path / "other.model"), vocab_size=350)
    prepare.prepare(docs, str(tmp_path / "a"), other, val_docs=5, shard_tokens=100, overwrite=True)
    assert check_tokenizer_matches(str(tmp_path / "a"), other)["vocab_size"] == 350
    with pytest.raises(ValueError, match=r"tiny\.model .* is not the one the shards .* \(other\.model, 350 pieces") as err:
        check_tokenizer_matches(str(tmp_path / "a"), tiny_tokenizer)
    assert one_line(str(err.value))


def test_prepare_write_failure_is_one_line_and_leaves_folder_untouched(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    docs = synthetic_documents(20, seed=9)
    out = tmp_path / "out"
    first = prepare.prepare(docs, str(out), tiny_tokenizer, val_docs=2, shard_tokens=50)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match=r"could not write .*fineweb_val_000000\.bin: No space left on device") as err:
        prepare.prepare(docs[:5], str(out), tiny_tokenizer, val_docs=2, shard_tokens=50, overwrite=True)
    assert one_line(str(err.value))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # no staging folder, old shards intact
    assert sorted(before) == sorted(first["files_val"] + first["files_train"] + [TOKENIZER_MANIFEST])

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(docs))
    code = prepare.main(["--input", str(txt), "--out", str(tmp_path / "cli"), "--tokenizer", tiny_tokenizer, "--val-docs", "2"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: could not write ") and "No space left on device" in err
    assert os.listdir(tmp_path / "cli") == []


# -- tokenizer training -----------------------------------------------------------------------------


def test_train_tokenizer_conventions_and_round_trip(tiny_tokenizer):
    sp = prepare.load_tokenizer(tiny_tokenizer)
    assert sp.vocab_size() == 400
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in (4, 5, 259)] == ["<0x00>", "<0x01>", "<0xFF>"]  # byte fallback
    assert os.path.isfile(os.path.splitext(tiny_tokenizer)[0] + ".vocab")
    text = "The river of 2024 stones, a garden: 31415 kernels!"
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # no dummy prefix: exact round trip of normalised text
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]  # digits split
    unseen = "snow ☃ and 雪"
    assert sp.decode(sp.encode(unseen)) == unseen  # unseen characters go through byte pieces
    assert any(4 <= i < 260 for i in sp.encode(unseen))


def test_train_tokenizer_512_from_200kb_and_too_small_corpus(tmp_path):
    docs = synthetic_documents(1500, seed=5)
    size = sum(len(d.encode()) for d in docs)
    assert 150_000 < size < 300_000
    model = prepare.train_tokenizer(docs, str(tmp_path / "t512.model"), 512)
    sp = prepare.load_tokenizer(model)
    assert sp.vocab_size() == 512
    doc = docs[-1]
    assert sp.decode(sp.encode(doc)) == doc
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # staging folder removed
    with pytest.raises(DataPrepError, match="too small") as err:
        prepare.train_tokenizer(["a tiny corpus"], str(tmp_path / "small.model"), 512)
    assert one_line(str(err.value)) and not os.path.exists(tmp_path / "small.model")
    with pytest.raises(DataPrepError, match="distinct characters") as err:
        prepare.train_tokenizer([d + " ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜ" for d in docs[:50]], str(tmp_path / "few.model"), 270)
    assert one_line(str(err.value))
    with pytest.raises(DataPrepError, match="no non-empty documents"):
        prepare.train_tokenizer(["", "  \n"], str(tmp_path / "empty.model"), 512)


# -- reading inputs and errors ----------------------------------------------------------------------


def test_read_documents_formats(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc line one\nline two\n\n\n  \nsecond doc\n\nthird\r\nwith crlf\n")
    assert list(prepare.read_documents(str(txt))) == ["first doc line one\nline two", "second doc", "third\nwith crlf"]
    assert list(prepare.read_documents(str(txt), one_doc_per_line=True)) == [
        "first doc line one", "line two", "second doc", "third", "with crlf"
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "a\n\nb", "id": 1}) + "\n\n" + json.dumps({"text": ""}) + "\n")
    assert list(prepare.read_documents(str(jsonl))) == ["a\n\nb", ""]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "ok"}\n{"body": "no text"}\n', 'line 2: no "text" field'),
        ('{"text": "ok"}\n{"text": "unterminated\n', "line 2: not valid JSON"),
        ('{"text": 42}\n', 'line 1: "text" is a int'),
        ('["text"]\n', 'line 1: no "text" field'),
    ],
)
def test_bad_jsonl_gives_one_clear_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataPrepError, match=match) as err:
        list(prepare.read_documents(str(path)))
    assert one_line(str(err.value)) and str(path) in str(err.value)


def test_bad_inputs_give_one_clear_line(tiny_tokenizer, tmp_path):
    with pytest.raises(DataPrepError, match="does not exist") as err:
        prepare.read_documents(str(tmp_path / "missing.jsonl"))
    assert one_line(str(err.value))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataPrepError, match="no documents") as err:
        prepare.prepare(prepare.read_documents(str(empty)), str(tmp_path / "out"), tiny_tokenizer, val_docs=1, shard_tokens=10)
    assert one_line(str(err.value))
    with pytest.raises(DataPrepError, match="tokenizer .* does not exist"):
        prepare.prepare(["doc"], str(tmp_path / "out"), str(tmp_path / "none.model"), val_docs=0, shard_tokens=10)
    not_a_model = tmp_path / "junk.model"
    not_a_model.write_bytes(b"junk")
    with pytest.raises(DataPrepError, match="not a SentencePiece model"):
        prepare.prepare(["doc"], str(tmp_path / "out"), str(not_a_model), val_docs=0, shard_tokens=10)
    with pytest.raises(DataPrepError, match="shard_tokens"):
        prepare.prepare(["doc"], str(tmp_path / "out"), tiny_tokenizer, val_docs=0, shard_tokens=0)
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataPrepError, match="line 1: not UTF-8"):
        list(prepare.read_documents(str(bad_utf8)))


def test_cli_end_to_end_and_error_exit(tmp_path, capsys):
    docs = synthetic_documents(400, seed=6)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    out, model = tmp_path / "shards", tmp_path / "tok" / "new.model"
    argv = ["--input", str(txt), "--out", str(out), "--tokenizer", str(model), "--val-docs", "50",
            "--shard-tokens", "5000", "--train-tokenizer", "--vocab-size", "330"]
    assert prepare.main(argv) == 0
    sp = prepare.load_tokenizer(str(model))
    assert sp.vocab_size() == 330
    val, _ = split_tokens(out, "val")
    train, _ = split_tokens(out, "train")
    np.testing.assert_array_equal(np.concatenate(val), expected_stream(sp, docs[:50]))
    np.testing.assert_array_equal(np.concatenate(train), expected_stream(sp, docs[50:]))
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "oops"}\n')
    assert prepare.main(["--input", str(bad), "--out", str(tmp_path / "o2"), "--tokenizer", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and 'no "text" field' in err


# -- download: a fake huggingface_hub client ---------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download over files {path in the repo: bytes}: writes
    the file to local_dir/<subfolder>/<filename> (as the library does) and returns that path.

    failures[path] = [exception, ...]: the next calls for that path raise these first, after
    leaving half the file in local_dir's partial-file place (as an interrupted transfer does).
    """

    def __init__(self, repo: str):
        self.repo, self.files, self.calls = repo, {}, []
        self.failures: dict[str, list] = {}

    def __call__(self, repo_id, filename, *, subfolder=None, repo_type=None, revision=None, local_dir=None, endpoint=None):
        from huggingface_hub import errors

        path = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append(dict(path=path, repo_id=repo_id, repo_type=repo_type, revision=revision, local_dir=local_dir))
        assert repo_type == "dataset" and local_dir is not None
        partial = os.path.join(local_dir, ".cache", path + ".incomplete")
        if self.failures.get(path):
            body = self.files.get(path, b"")
            os.makedirs(os.path.dirname(partial), exist_ok=True)
            with open(partial, "wb") as f:
                f.write(body[: len(body) // 2])
            raise self.failures[path].pop(0)
        if repo_id != self.repo:
            raise errors.RepositoryNotFoundError(f"404 {repo_id}", response=FakeResponse(404))
        if path not in self.files:
            raise errors.RemoteEntryNotFoundError(f"404 {path}", response=FakeResponse(404))
        target = os.path.join(local_dir, *path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(self.files[path])
        if os.path.exists(partial):
            os.remove(partial)
        return target

    def shard_calls(self) -> list[str]:
        return [c["path"] for c in self.calls if c["path"].endswith(".bin")]


class FakeResponse:
    def __init__(self, status_code: int):
        self.status_code, self.headers, self.url = status_code, {}, "https://huggingface.co/fake"
        self.request = None


def shard_bytes(tmp_path, tokens) -> bytes:
    path = tmp_path / "shard_src.bin"
    write_shard(str(path), tokens)
    return path.read_bytes()


REPO = "willdepueoai/parameter-golf"


@pytest.fixture
def hub(tmp_path, tiny_tokenizer):
    """A fake remote with the official layout: manifest, 1 val + 3 train shards, tokenizer files."""
    pytest.importorskip("huggingface_hub", reason="the download tests raise huggingface_hub's own errors (the test extra installs it)")
    hub = FakeHub(REPO)
    rng = np.random.default_rng(0)
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()
    for name, count in [("val_000000", 3001), ("train_000000", 5000), ("train_000001", 4999), ("train_000002", 17)]:
        hub.files[f"datasets/datasets/fineweb10B_sp1024/fineweb_{name}.bin"] = shard_bytes(tmp_path, rng.integers(0, 1024, count))
    with open(tiny_tokenizer, "rb") as f:
        hub.files["datasets/tokenizers/fineweb_1024_bpe.model"] = f.read()
    hub.files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"<pad>\t0\n"
    return hub


def fetch(hub, out, train_shards=2, **kwargs):
    return download.download_dataset(str(out), train_shards, hub_download=hub, log=lambda _: None, **kwargs)


def test_download_full_then_skip(hub, tmp_path):
    out = tmp_path / "data"
    results = fetch(hub, out, train_shards=2)
    expected = ["manifest.json", "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                "datasets/fineweb10B_sp1024/fineweb_train_000000.bin", "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    assert sorted(results) == sorted(str(out / p) for p in expected)
    assert set(results.values()) == {"downloaded"}
    for p in expected:
        assert (out / p).read_bytes() == hub.files[f"datasets/{p}"]
    assert {(c["repo_id"], c["revision"]) for c in hub.calls} == {(REPO, "main")}
    assert not (out / "datasets/fineweb10B_sp1024/fineweb_train_000002.bin").exists()  # only the first 2 train shards
    assert not (out / download.STAGING).exists()  # the staging folder goes once every file is in place
    # the trainer's default paths, relative to data/
    assert (out / "datasets" / "fineweb10B_sp1024").is_dir() and (out / "tokenizers" / "fineweb_1024_bpe.model").is_file()

    hub.calls.clear()
    again = fetch(hub, out, train_shards=2)
    assert set(again.values()) == {"skipped"} and hub.calls == []
    more = fetch(hub, out, train_shards=3)  # asking for more fetches only the new shard
    assert [k for k, v in more.items() if v != "skipped"] == [str(out / "datasets/fineweb10B_sp1024/fineweb_train_000002.bin")]


def test_download_interrupted_transfer_resumes_in_the_same_staging_folder(hub, tmp_path):
    """A dropped transfer is retried with the same local_dir, where the library's partial file
    lets it go on; after the retries run out the partial file stays for a later run."""
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    dest = tmp_path / "s.bin"
    hub.failures[remote] = [ConnectionResetError("reset by peer"), TimeoutError("read timed out")]
    logs = []
    assert download.fetch_file(REPO, remote, str(dest), retries=2, hub_download=hub, log=logs.append) == "downloaded"
    assert dest.read_bytes() == hub.files[remote]
    assert len(hub.calls) == 3 and len({c["local_dir"] for c in hub.calls}) == 1
    assert "trying again, from where it stopped" in logs[0]

    hub.failures[remote] = [ConnectionResetError("reset by peer")] * 2
    with pytest.raises(download.DownloadError, match=r"t\.bin: the transfer failed 2 times \(ConnectionResetError: reset by peer\); run the command again to resume") as err:
        download.fetch_file(REPO, remote, str(tmp_path / "t.bin"), retries=1, hub_download=hub, log=lambda _: None)
    assert one_line(str(err.value))
    partial = tmp_path / download.STAGING / ".cache" / (remote + ".incomplete")
    assert partial.exists()  # kept for the next run, which resumes it
    assert download.fetch_file(REPO, remote, str(tmp_path / "t.bin"), hub_download=hub, log=lambda _: None) == "downloaded"
    assert hub.calls[-1]["local_dir"] == str(tmp_path / download.STAGING)


def test_download_detects_corruption(hub, tmp_path):
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    good = hub.files[remote]
    hub.files[remote] = good[:-10]  # truncated upstream: the header's token count no longer matches
    dest = tmp_path / "c.bin"
    with pytest.raises(download.DownloadError, match="c.bin arrived corrupted") as err:
        download.fetch_file(REPO, remote, str(dest), hub_download=hub, log=lambda _: None)
    assert one_line(str(err.value))
    assert not dest.exists() and not list((tmp_path / download.STAGING).rglob("*.bin"))

    hub.files[remote] = good  # right size and header, wrong sha256
    with pytest.raises(download.DownloadError, match="sha256"):
        download.fetch_file(REPO, remote, str(dest), expected_sha256="0" * 64, hub_download=hub, log=lambda _: None)
    assert not dest.exists()
    assert download.fetch_file(REPO, remote, str(dest), expected_sha256=hashlib.sha256(good).hexdigest(), hub_download=hub, log=lambda _: None) == "downloaded"

    dest.write_bytes(good[:2000])  # an existing file that went bad on disk is fetched again
    logs = []
    assert download.fetch_file(REPO, remote, str(dest), hub_download=hub, log=logs.append) == "downloaded"
    assert dest.read_bytes() == good and "fails its check" in logs[0]

    junk_model = "datasets/tokenizers/fineweb_1024_bpe.model"
    hub.files[junk_model] = b"<html>not a model</html>"
    with pytest.raises(download.DownloadError, match="not a SentencePiece model"):
        download.fetch_file(REPO, junk_model, str(tmp_path / "m.model"), hub_download=hub, log=lambda _: None)


def test_download_writes_tokenizer_manifest_beside_the_shards(hub, tmp_path, tiny_tokenizer):
    out = tmp_path / "data"
    fetch(hub, out, train_shards=1)
    shards, tokenizer = out / "datasets" / "fineweb10B_sp1024", out / "tokenizers" / "fineweb_1024_bpe.model"
    manifest = check_tokenizer_matches(str(shards), str(tokenizer))
    assert manifest["tokenizer"] == "fineweb_1024_bpe.model" and manifest["vocab_size"] == 400
    assert manifest["sha256"] == hashlib.sha256(hub.files["datasets/tokenizers/fineweb_1024_bpe.model"]).hexdigest()
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    with pytest.raises(ValueError, match="is not the one the shards"):
        check_tokenizer_matches(str(shards), str(other))
    assert not [n for n in os.listdir(shards) if n.startswith(".")]  # no temp file left


def test_download_disk_full_is_one_line(hub, tmp_path):
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    hub.failures[remote] = [OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.incomplete"))]
    with pytest.raises(download.DownloadError, match=r"^could not write .*x\.incomplete: No space left on device; free disk space") as err:
        download.fetch_file(REPO, remote, str(tmp_path / "s.bin"), retries=3, hub_download=hub, log=lambda _: None)
    assert one_line(str(err.value))
    assert len(hub.shard_calls()) == 1  # not taken for a dropped connection and retried


def test_download_uses_manifest_sha256(hub, tmp_path):
    manifest = json.loads(hub.files["datasets/manifest.json"])
    manifest["files"] = {"datasets/fineweb10B_sp1024/fineweb_val_000000.bin": {"sha256": "f" * 64}}
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(download.DownloadError, match="fineweb_val_000000.bin arrived corrupted.*sha256"):
        fetch(hub, tmp_path / "data", train_shards=0)
    assert download.expected_sha256({"files": [{"path": "a.bin", "sha256": "ab"}]}, "a.bin") == "ab"
    assert download.expected_sha256({}, "a.bin") is None


def test_download_plan_errors(hub, tmp_path):
    with pytest.raises(download.DownloadError, match=r"--train-shards 4 is outside \[0, 3\]"):
        fetch(hub, tmp_path / "data", train_shards=4)
    with pytest.raises(download.DownloadError, match="no dataset 'fineweb10B_sp4096'.*fineweb10B_sp1024"):
        fetch(hub, tmp_path / "data", variant="sp4096")
    with pytest.raises(download.DownloadError, match=r"^datasets/nothing\.bin does not exist in willdepueoai/parameter-golf; check --remote-root"):
        download.fetch_file(REPO, "datasets/nothing.bin", str(tmp_path / "n.bin"), hub_download=hub, log=lambda _: None)


def test_download_variants(hub, tmp_path, monkeypatch):
    """--variant picks the repo, the dataset and the fallback tokenizer files; --repo and
    MATCHED_FINEWEB_REPO_ID override the repo."""
    assert download.VARIANTS["sp1024"] == ("willdepueoai/parameter-golf", "fineweb10B_sp1024",
                                           ("tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"))
    assert download.VARIANTS["sp8192"].repo == "kevclark/parameter-golf" and download.VARIANTS["sp8192"].dataset == "fineweb10B_sp8192"
    with pytest.raises(download.DownloadError, match=r"the dataset repo kevclark/parameter-golf does not exist .*check --repo or --variant"):
        fetch(hub, tmp_path / "a", variant="sp8192")
    hub.repo = "kevclark/parameter-golf"
    manifest = {"datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192", "stats": {"files_train": 1, "files_val": 1}}]}
    hub.files["datasets/manifest.json"] = json.dumps(manifest).encode()  # no tokenizers entry: the variant's file names
    hub.files["datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin"] = shard_bytes(tmp_path, [1, 2, 3])
    hub.files["datasets/tokenizers/fineweb_8192_bpe.model"] = hub.files["datasets/tokenizers/fineweb_1024_bpe.model"]
    hub.files["datasets/tokenizers/fineweb_8192_bpe.vocab"] = b"x"
    results = fetch(hub, tmp_path / "b", train_shards=0, variant="sp8192")
    assert str(tmp_path / "b" / "tokenizers" / "fineweb_8192_bpe.model") in results
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    with pytest.raises(download.DownloadError, match="someone/mirror does not exist"):
        fetch(hub, tmp_path / "c", train_shards=0, variant="sp8192")
    assert set(fetch(hub, tmp_path / "b", train_shards=0, variant="sp8192", repo="kevclark/parameter-golf").values()) == {"skipped"}


def test_download_with_docs_checks_their_sha256(hub, tmp_path):
    docs = b'{"text": "A document."}\n'
    hub.files["datasets/docs_selected.jsonl"] = docs
    hub.files["datasets/docs_selected.source_manifest.json"] = json.dumps({"docs_sha256": "0" * 64}).encode()
    with pytest.raises(download.DownloadError, match="docs_selected.jsonl arrived corrupted.*sha256"):
        fetch(hub, tmp_path / "data", train_shards=0, with_docs=True)
    hub.files["datasets/docs_selected.source_manifest.json"] = json.dumps({"docs_sha256": hashlib.sha256(docs).hexdigest()}).encode()
    (tmp_path / "data" / "docs_selected.source_manifest.json").unlink()
    fetch(hub, tmp_path / "data", train_shards=0, with_docs=True)
    assert (tmp_path / "data" / "docs_selected.jsonl").read_bytes() == docs


def test_download_without_network_one_clear_line(tmp_path, capsys):
    errors = pytest.importorskip("huggingface_hub.errors")

    def offline(repo_id, filename, **kwargs):  # what hf_hub_download raises on a machine without internet
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as cause:
            raise errors.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...") from cause

    code = download.main(["--out", str(tmp_path), "--train-shards", "1"], hub_download=offline)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err == "error: cannot reach huggingface.co: [Errno -2] Name or service not known; download on a machine with internet and copy data/ over\n"
    code = download.main(["--out", str(tmp_path), "--endpoint", "https://mirror.example:8080"], hub_download=offline)
    assert code == 1 and capsys.readouterr().err.startswith("error: cannot reach mirror.example:8080: ")


def test_download_without_huggingface_hub_one_clear_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an import of it now fails
    code = download.main(["--out", str(tmp_path), "--train-shards", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "huggingface_hub, which is not installed; pip install golf-triton[download]" in err
