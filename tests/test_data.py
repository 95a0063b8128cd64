"""Shard discovery, the shared training stream (rank slices, wrap-around, resume) and the
validation tokens, on small synthetic shards; then a check on the real sample shards."""
import os

import numpy as np
import pytest
import torch

from model.data import (
    DistributedTokenLoader,
    TokenStream,
    load_validation_tokens,
    read_shard,
    shard_paths,
    write_shard,
)

SHARD_LENGTHS = (37, 0, 5, 61)  # ragged, one empty shard, one shorter than a batch


@pytest.fixture
def train_dir(tmp_path):
    """Four train shards (token values encode shard and position, so every token is traceable)
    plus two val shards; returns (folder, all train tokens in order)."""
    everything = []
    for index, length in enumerate(SHARD_LENGTHS):
        tokens = (1000 * (index + 1) + np.arange(length)).astype(np.int64)
        write_shard(str(tmp_path / f"fineweb_train_{index:06d}.bin"), tokens)
        everything.append(tokens)
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), np.arange(30))
    write_shard(str(tmp_path / "fineweb_val_000001.bin"), np.arange(30, 53))
    return str(tmp_path), np.concatenate(everything)


def cyclic(stream_tokens: np.ndarray, start: int, count: int) -> np.ndarray:
    return np.take(stream_tokens, np.arange(start, start + count), mode="wrap")


def test_shard_paths_sorted_and_split(train_dir):
    folder, _ = train_dir
    train = shard_paths(folder, "train")
    assert [os.path.basename(p) for p in train] == [f"fineweb_train_{i:06d}.bin" for i in range(4)]
    assert len(shard_paths(folder, "val")) == 2


def test_shard_paths_missing_names_the_pattern(tmp_path):
    with pytest.raises(ValueError, match=r"fineweb_train_\*\.bin.*data/download.py.*DATA_PATH"):
        shard_paths(str(tmp_path), "train")


def test_token_stream_reads_in_order_and_wraps(train_dir):
    folder, stream_tokens = train_dir
    stream = TokenStream(shard_paths(folder, "train"))
    position = 0
    for count in (10, 27, 1, 40, 0, 103, 250):  # crosses the empty shard and wraps (twice in the last read)
        assert (stream.read(count).astype(np.int64) == cyclic(stream_tokens, position, count)).all()
        position += count


def test_token_stream_peek_does_not_advance(train_dir):
    folder, stream_tokens = train_dir
    stream = TokenStream(shard_paths(folder, "train"))
    first = stream.read(38, advance=37)  # reads into the third shard (the second is empty), leaves that token
    second = stream.read(3)
    assert first[-1] == second[0] == stream_tokens[37]
    with pytest.raises(ValueError, match="advance"):
        stream.read(3, advance=4)


@pytest.mark.parametrize("world_size, batch_tokens, seq_len", [(1, 12, 4), (3, 8, 8), (2, 21, 7), (4, 1, 1)])
def test_ranks_take_disjoint_slices_of_one_span(train_dir, world_size, batch_tokens, seq_len):
    folder, stream_tokens = train_dir
    loaders = [DistributedTokenLoader(folder, rank, world_size) for rank in range(world_size)]
    span = world_size * batch_tokens
    for call in range(6):  # enough to wrap around the 103-token stream for most settings
        batches = [loader.next_batch(batch_tokens, seq_len, "cpu") for loader in loaders]
        expected = cyclic(stream_tokens, call * span, span + 1)
        for rank, (x, y) in enumerate(batches):
            assert x.dtype == y.dtype == torch.int64
            assert x.shape == y.shape == (batch_tokens // seq_len, seq_len)
            local = expected[rank * batch_tokens:(rank + 1) * batch_tokens + 1]
            assert (x.flatten().numpy() == local[:-1]).all()
            assert (y.flatten().numpy() == local[1:]).all()  # y is x shifted by one


def test_resume_gives_the_same_batches(train_dir):
    folder, _ = train_dir
    loader = DistributedTokenLoader(folder, rank=1, world_size=2)
    for _ in range(5):
        loader.next_batch(10, 5, "cpu")
    state = loader.state_dict()
    expected = [loader.next_batch(10, 5, "cpu") for _ in range(7)]

    resumed = DistributedTokenLoader(folder, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next_batch(10, 5, "cpu")
        assert torch.equal(rx, x) and torch.equal(ry, y)
    fresh = DistributedTokenLoader(folder, rank=1, world_size=2)
    assert not torch.equal(fresh.next_batch(10, 5, "cpu")[0], expected[0][0])  # resuming did something


def test_loader_bad_arguments(train_dir):
    folder, _ = train_dir
    with pytest.raises(ValueError, match="rank 2"):
        DistributedTokenLoader(folder, rank=2, world_size=2)
    loader = DistributedTokenLoader(folder)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        loader.next_batch(10, 4, "cpu")
    with pytest.raises(ValueError, match="same DATA_PATH"):
        loader.load_state_dict({"shard_index": 0, "position": 0, "num_shards": 3})
    with pytest.raises(ValueError, match="outside"):
        loader.load_state_dict({"shard_index": 0, "position": 38, "num_shards": 4})


def test_all_shards_empty_raises(tmp_path):
    write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="hold no tokens"):
        DistributedTokenLoader(str(tmp_path))


@pytest.mark.parametrize("seq_len, max_tokens, expected_length", [
    (4, 0, 53),  # 52 targets = 13 sequences of 4 (+1 input)
    (5, 0, 51),  # 53 tokens -> 52 targets -> 50 whole targets
    (7, 20, 15),  # cut to 21 tokens first -> 20 targets -> 14
    (52, 0, 53),
])
def test_validation_tokens_concatenated_and_truncated(train_dir, seq_len, max_tokens, expected_length):
    folder, _ = train_dir
    tokens = load_validation_tokens(folder, seq_len, max_tokens)
    assert tokens.dtype == torch.int64 and tokens.dim() == 1
    assert torch.equal(tokens, torch.arange(expected_length))


def test_validation_tokens_too_few(train_dir):
    folder, _ = train_dir
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_validation_tokens(folder, 53)
    with pytest.raises(ValueError, match="MAX_VAL_TOKENS=8"):
        load_validation_tokens(folder, 10, max_tokens=8)


def test_real_shards(shared_data):
    folder = os.path.join(shared_data, "fineweb10B_sp1024_sample")
    loader = DistributedTokenLoader(folder, rank=1, world_size=2)
    x, y = loader.next_batch(4096, 1024, "cpu")
    first_shard = read_shard(shard_paths(folder, "train")[0]).astype(np.int64)
    assert (x.flatten().numpy() == first_shard[4096:8192]).all()
    assert (y.flatten().numpy() == first_shard[4097:8193]).all()
    assert int(first_shard[0]) == 1  # documents start with BOS
    val = load_validation_tokens(folder, 1024)
    assert val.numel() == 628_456 // 1024 * 1024 + 1
    assert int(val.max()) < 1024


@pytest.mark.gpu
def test_cuda_batches_match_cpu(train_dir):
    folder, _ = train_dir
    cpu_loader, cuda_loader = DistributedTokenLoader(folder, 1, 2), DistributedTokenLoader(folder, 1, 2)
    for _ in range(4):
        x, y = cpu_loader.next_batch(12, 4, "cpu")
        cx, cy = cuda_loader.next_batch(12, 4, "cuda")  # pinned memory, non-blocking copy
        assert cx.is_cuda and cy.is_cuda
        assert torch.equal(cx.cpu(), x) and torch.equal(cy.cpu(), y)
