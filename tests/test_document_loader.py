"""The frontier's loader (model/document_loader.py; FRONTIER.md section 3, "Loader" and "cu_seqlens"):
the boundaries on hand-made rows and against a token-by-token walk, then the loader on small shards
(spans per rank, the start at the first BOS, tail dropping, wrap-around, resume) and on the real sample."""
import os

import numpy as np
import pytest
import torch

from kernels.reference import check_cu_seqlens
from model.config import SHARED_SAMPLE
from model.data import read_shard, shard_paths, write_shard
from model.document_loader import BOS_ID, DocumentLoader, document_cu_seqlens

B = BOS_ID
SAMPLE = os.path.normpath(os.path.join(SHARED_SAMPLE, "fineweb10B_sp1024_sample"))


def offsets(x, seq_len, first_doc_offset=0):
    """The unpadded offsets (the padding is tested on its own)."""
    cu = document_cu_seqlens(np.asarray(x), seq_len, first_doc_offset).tolist()
    while len(cu) > 1 and cu[-1] == cu[-2]:
        cu.pop()
    return cu


def walked_offsets(x: np.ndarray, seq_len: int, first_doc_offset: int) -> list[int]:
    """The rule token by token: a segment starts at a row start, at a BOS, and every seq_len tokens
    of a document counted from its start (first_doc_offset tokens before x[0] for the first one)."""
    rows, row_len = x.shape
    flat, cuts, in_doc = x.reshape(-1), [], first_doc_offset
    for i, token in enumerate(flat):
        if token == B:
            in_doc = 0
        if i % row_len == 0 or in_doc % seq_len == 0:
            cuts.append(i)
        in_doc += 1
    return cuts + [flat.size]


# ----------------------------------------------------------------------------- cu_seqlens


def test_a_long_document_is_cut_every_seq_len_from_its_start():
    assert offsets([B] + [5] * 9, 4) == [0, 4, 8, 10]
    assert offsets([5, 5, B] + [5] * 9, 4) == [0, 2, 6, 10, 12]  # from the BOS at 2, not from the row start
    assert offsets([B, 5, B, 5, 5, 5, 5, 5], 4) == [0, 2, 6, 8]


def test_a_document_crossing_the_row_start_keeps_its_own_grid():
    # the first document began 3 tokens before x: its cuts fall at -3 + 4k, so at 1 (and 5 would be next)
    assert offsets([5, 5, 5, 5, 5, B, 5], 4, first_doc_offset=3) == [0, 1, 5, 7]
    assert offsets([5] * 10, 4, first_doc_offset=4) == [0, 4, 8, 10]  # exactly on the grid
    assert offsets([5] * 6, 4) == [0, 4, 6]  # offset 0: counted from the row start


def test_bos_at_position_zero_starts_a_document_whatever_the_offset():
    assert offsets([B, 5, 5, 5, 5, 5], 4, first_doc_offset=3) == [0, 4, 6]
    assert offsets([B], 4) == [0, 1]


def test_rows_of_a_batch_continue_one_another():
    # the document starting at 2 in row 0 runs on in row 1: its cuts (2, 5, 8) are counted from 2;
    # row 1's start (6) is a cut as well
    x = np.array([[5, 5, B, 5, 5, 5], [5, 5, 5, B, 5, 5]])
    assert offsets(x, 3) == [0, 2, 5, 6, 8, 9, 12]
    assert offsets(x, 3, first_doc_offset=2) == [0, 1, 2, 5, 6, 8, 9, 12]


def test_padding_to_a_multiple_of_64_entries_with_the_total():
    cu = document_cu_seqlens(np.array([B, 5, 5]), 4)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3] + [3] * 62
    exact = document_cu_seqlens(np.full(63 * 2, B), 4)  # 126 BOS + the end = 127 entries -> 128
    assert exact.numel() == 128 and exact[:126].tolist() == list(range(126)) and exact[126:].tolist() == [126, 126]
    full = document_cu_seqlens(np.full(63, B), 4)  # 63 + the end = 64: no padding
    assert full.tolist() == list(range(64))
    check_cu_seqlens(exact, 1, 126)  # what the attention accepts


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_token_by_token_walk(seed):
    rng = np.random.default_rng(seed)
    rows, row_len, seq_len = int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 9))
    x = np.where(rng.random((rows, row_len)) < 0.08, B, rng.integers(2, 50, (rows, row_len)))
    offset = 0 if x[0, 0] == B else int(rng.integers(0, 20))
    assert offsets(x, seq_len, offset) == walked_offsets(x, seq_len, offset), (x, seq_len, offset)


def test_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="must be a non-empty"):
        document_cu_seqlens(np.zeros((0,), dtype=np.int64), 4)
    with pytest.raises(ValueError, match="seq_len=0"):
        document_cu_seqlens(np.ones(3), 0)


# ----------------------------------------------------------------------------- the loader on small shards

SPAN_TOKENS = 8  # tokens per rank (row); a span is 9


def make_shards(folder, *shards) -> list[np.ndarray]:
    arrays = [np.asarray(s, dtype=np.int64) for s in shards]
    for i, tokens in enumerate(arrays):
        write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), tokens)
    return arrays


def numbered(length: int, first_bos: int, every: int = 7, start: int = 10) -> np.ndarray:
    """Distinct ids start, start+1, ... (so a span is recognised by its values) with a BOS at
    first_bos and every `every` tokens after it."""
    tokens = np.arange(start, start + length)
    tokens[first_bos::every] = B
    return tokens


@pytest.fixture
def shards(tmp_path):
    # shard 0: first BOS at 3, room for two calls of 2 x 9 tokens (36 of 41 after the BOS) and a 5-token tail;
    # shard 1: no BOS (skipped); shard 2: first BOS at 4, room for one call (18 of 20) and a tail of 2
    return tmp_path, make_shards(tmp_path, numbered(44, 3), np.arange(100, 160), numbered(24, 4, start=500))


def expected_spans(tokens: np.ndarray, start: int, world: int):
    return [tokens[start + r * 9:start + (r + 1) * 9] for r in range(world)]


def test_each_rank_takes_its_span_from_the_first_bos_then_drops_tails_and_wraps(shards):
    folder, (s0, _, s2) = shards
    loaders = [DocumentLoader(str(folder), rank, 2) for rank in range(2)]
    # call 0 and 1 from shard 0 (BOS at 3), call 2 from shard 2 (shard 1 has no BOS), call 3 wraps to shard 0
    for shard, start in [(s0, 3), (s0, 21), (s2, 4), (s0, 3)]:
        for rank, loader in enumerate(loaders):
            x, y, cu = loader.next_batch(SPAN_TOKENS, 4, "cpu")
            span = expected_spans(shard, start, 2)[rank]
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, SPAN_TOKENS)
            assert x[0].tolist() == span[:-1].tolist() and y[0].tolist() == span[1:].tolist(), (start, rank)
            # the boundaries of this rank's row, the fragment it starts inside cut from the row start (the record's rule)
            expected = walked_offsets(span[None, :-1], 4, 0)
            assert cu.tolist()[:len(expected)] == expected and set(cu.tolist()[len(expected):]) <= {SPAN_TOKENS}


def test_rows_split_the_span(shards):
    folder, (s0, _, _) = shards
    x, y, cu = DocumentLoader(str(folder), 1, 2, row_len=4).next_batch(SPAN_TOKENS, 3, "cpu")
    span = expected_spans(s0, 3, 2)[1]
    assert x.shape == (2, 4) and x.reshape(-1).tolist() == span[:-1].tolist() and y.reshape(-1).tolist() == span[1:].tolist()
    check_cu_seqlens(cu, 2, 4)
    assert 4 in cu.tolist()  # the second row's start is a cut
    with pytest.raises(ValueError, match="multiple of the row length 4"):
        DocumentLoader(str(folder), 0, 1, row_len=4).next_batch(6, 3, "cpu")


def test_resume_equals_uninterrupted(shards):
    folder, _ = shards
    straight = DocumentLoader(str(folder), 1, 2)
    first = [straight.next_batch(SPAN_TOKENS, 4, "cpu") for _ in range(6)]
    interrupted = DocumentLoader(str(folder), 1, 2)
    for _ in range(2):
        interrupted.next_batch(SPAN_TOKENS, 4, "cpu")
    state = interrupted.state_dict()
    resumed = DocumentLoader(str(folder), 1, 2)
    resumed.load_state_dict(state)
    for expected in first[2:]:  # across the shard switch and the wrap
        for a, b in zip(resumed.next_batch(SPAN_TOKENS, 4, "cpu"), expected):
            assert torch.equal(a, b)


def test_shards_that_cannot_supply_a_step_are_one_line(tmp_path):
    make_shards(tmp_path, numbered(20, 3), np.arange(100, 160))
    with pytest.raises(ValueError, match="no train shard .* holds 2 spans of 9 tokens after its first BOS"):
        DocumentLoader(str(tmp_path), 0, 2).next_batch(SPAN_TOKENS, 4, "cpu")
    loader = DocumentLoader(str(tmp_path), 0, 1)
    with pytest.raises(ValueError, match="saved over 3 shards but 2 are present"):
        loader.load_state_dict({"shard_index": 0, "position": 3, "num_shards": 3})
    with pytest.raises(ValueError, match="rank 2 must lie in"):
        DocumentLoader(str(tmp_path), 2, 2)


# ----------------------------------------------------------------------------- the real sample shards


@pytest.mark.skipif(not os.path.isdir(SAMPLE), reason=f"the sample shards are not at {SAMPLE}")
def test_real_shards_boundaries_and_the_switch_to_the_next_shard():
    seq_len, per_rank, world = 2048, 65_536, 2
    first, second = (read_shard(p) for p in shard_paths(SAMPLE, "train")[:2])
    loader = DocumentLoader(SAMPLE, 0, world, vocab_size=1024)
    calls = (len(first) - int(np.flatnonzero(first == B)[0])) // (world * (per_rank + 1))
    for call in range(calls + 1):
        x, y, cu = loader.next_batch(per_rank, seq_len, "cpu")
        check_cu_seqlens(cu, 1, per_rank)
        bounds = cu.tolist()
        assert len(bounds) % 64 == 0 and bounds == sorted(bounds)
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= seq_len  # no segment longer than seq_len
        assert set(np.flatnonzero(x[0].numpy() == B).tolist()) <= set(bounds)  # every BOS starts a segment
        assert torch.equal(x[0, 1:], y[0, :-1])
    # the last call no longer fits shard 0: it starts at shard 1's first BOS (8025 in the sample)
    start = int(np.flatnonzero(second == B)[0])
    assert x[0].tolist() == second[start:start + per_rank].tolist() and x[0, 0] == B
