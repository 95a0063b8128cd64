"""Byte counting from the real sp1024 tokenizer: hand-checked strings, the sample validation
documents against their text, and bits per byte."""
import json
import math
import os

import numpy as np
import pytest
import torch

from model.bpb import bits_per_byte, build_byte_luts, load_tokenizer, target_bytes
from model.data import read_shard

BOS = 1


@pytest.fixture
def tokenizer_path(shared_data):
    return os.path.join(shared_data, "tokenizers", "fineweb_1024_bpe.model")


@pytest.fixture
def sp(tokenizer_path):
    return load_tokenizer(tokenizer_path, 1024)


@pytest.fixture
def luts(sp):
    return build_byte_luts(sp, 1024, "cpu")


def counted_bytes(ids: list[int], luts) -> list[int]:
    """Bytes of each target of the sequence ids (targets are ids[1:])."""
    ids = torch.tensor(ids)
    return target_bytes(ids[:-1], ids[1:], luts).tolist()


def test_lut_categories(sp, luts):
    base_bytes, has_leading_space, is_boundary = luts
    assert base_bytes.dtype == torch.int16 and has_leading_space.dtype == is_boundary.dtype == torch.bool
    assert base_bytes.shape == has_leading_space.shape == is_boundary.shape == (1024,)
    for token_id in range(4):  # pad, BOS, EOS (control), unk
        assert is_boundary[token_id] and base_bytes[token_id] == 0 and not has_leading_space[token_id]
    byte_ids = [i for i in range(1024) if sp.is_byte(i)]
    assert byte_ids == list(range(4, 260))
    assert (base_bytes[4:260] == 1).all() and not has_leading_space[4:260].any() and not is_boundary[4:260].any()
    the = sp.piece_to_id("\u2581the")
    assert base_bytes[the] == 3 and has_leading_space[the]


def test_hand_checked_string(sp, luts):
    ids = sp.encode("hello world")
    assert [sp.id_to_piece(i) for i in ids] == ["he", "ll", "o", "\u2581wor", "ld"]
    assert counted_bytes([BOS] + ids, luts) == [2, 2, 1, 4, 2]


@pytest.mark.parametrize("text", [
    "the quick brown fox jumps over the lazy dog",
    "café 🎉 naïve Zürich — 東京",  # accented letters, emoji and CJK: byte fallback
    "In 2024, 1,234 of 56789 items cost $3.50 each.",  # digits are split one per token
    "x",
])
def test_counted_bytes_equal_utf8_length(sp, luts, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # the normaliser leaves these strings alone
    assert sum(counted_bytes([BOS] + ids, luts)) == len(text.encode("utf-8"))


def test_byte_fallback_is_exercised(sp):
    assert any(sp.is_byte(i) for i in sp.encode("café 🎉"))


def test_string_starting_with_a_space(sp, luts):
    # The tokenizer's normaliser drops leading whitespace: the text scored is what the ids decode to.
    ids = sp.encode(" hello world")
    assert sp.decode(ids) == "hello world"
    assert sum(counted_bytes([BOS] + ids, luts)) == len("hello world")
    # A "▁" piece right after BOS (a boundary) gets no space byte; after a normal piece it does.
    the, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("a")
    assert counted_bytes([BOS, the], luts) == [3]
    assert counted_bytes([BOS, a, the], luts) == [1, 4]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        load_tokenizer(str(tmp_path / "absent.model"), 1024)


def test_vocab_mismatch(tokenizer_path):
    with pytest.raises(ValueError, match=r"has 1024 pieces but VOCAB_SIZE=2048; "):
        load_tokenizer(tokenizer_path, 2048)


def test_sample_val_documents(shared_data, sp, luts):
    """Per document of the sample val shard: counted bytes == UTF-8 length of the text the ids
    decode to, for all 200; == the raw jsonl text for the first 10 (whose text the normaliser
    leaves unchanged in length; some later ones have collapsed whitespace)."""
    tokens = torch.from_numpy(read_shard(os.path.join(shared_data, "fineweb10B_sp1024_sample", "fineweb_val_000000.bin")).astype(np.int64))
    with open(os.path.join(shared_data, "raw", "fineweb_val_sample_200docs.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    starts = torch.nonzero(tokens == BOS).flatten().tolist() + [tokens.numel()]
    assert len(starts) - 1 == len(texts) == 200
    per_target = target_bytes(tokens[:-1], tokens[1:], luts)
    for doc in range(200):
        first, end = starts[doc], starts[doc + 1]  # targets of this document: tokens first+1 .. end-1
        counted = int(per_target[first:end - 1].sum())
        assert counted == len(sp.decode(tokens[first + 1:end].tolist()).encode("utf-8")), doc
        if doc < 10:
            assert counted == len(texts[doc].encode("utf-8")), doc


def test_bits_per_byte():
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert bits_per_byte(3.0, 2) == pytest.approx(3.0 / math.log(2) / 2)
    with pytest.raises(ValueError, match="0 bytes"):
        bits_per_byte(1.0, 0)


def test_target_bytes_synthetic_luts():
    base_bytes = torch.tensor([0, 2, 3, 1], dtype=torch.int16)
    has_leading_space = torch.tensor([False, True, False, True])
    is_boundary = torch.tensor([True, False, False, False])
    prev = torch.tensor([[0, 1, 2], [3, 0, 1]])
    target = torch.tensor([[1, 3, 1], [2, 3, 0]])
    got = target_bytes(prev, target, (base_bytes, has_leading_space, is_boundary))
    assert got.dtype == torch.int32
    assert got.tolist() == [[2, 2, 3], [3, 1, 0]]


def test_byte_source_sidecar_or_tables(tmp_path):
    """validation_byte_source: the tokenizer tables without sidecars, the sidecars (aligned with
    the tokens, scored by position) when the folder has them; describe_byte_source names each."""
    from model.bpb import SidecarBytes, describe_byte_source, scored_bytes, validation_byte_source
    from model.data import write_shard

    luts = (torch.tensor([0, 2, 3], dtype=torch.int16), torch.tensor([False, True, False]), torch.tensor([True, False, False]))
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), [1, 2, 1, 2, 2])
    assert validation_byte_source(str(tmp_path), 5, luts) is luts
    assert describe_byte_source(luts) == "tokenizer byte tables"
    write_shard(str(tmp_path / "fineweb_val_bytes_000000.bin"), [0, 7, 0, 4, 1])
    source = validation_byte_source(str(tmp_path), 4, luts)  # a cut stream: the first 4 tokens
    assert isinstance(source, SidecarBytes) and source.token_bytes.tolist() == [0, 7, 0, 4]
    assert describe_byte_source(source) == "sidecar fineweb_val_bytes_*.bin (11 bytes over 4 tokens)"
    inputs, targets = torch.tensor([[1, 2, 1]]), torch.tensor([[2, 1, 2]])
    positions = torch.tensor([[1, 2, 3]])  # the targets' places in the stream
    assert scored_bytes(source, inputs, targets, positions).tolist() == [[7, 0, 4]]
    assert scored_bytes(luts, inputs, targets, positions).tolist() == [[3, 3, 3]]  # by id: 3, 2 + a leading space, 3
