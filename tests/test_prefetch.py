"""model/prefetch.py: the read-ahead loader hands out the wrapped loader's batches in the same order,
resumes exactly from its state_dict, reads on its own thread, and takes any tuple."""
import os
import threading

import numpy as np
import pytest
import torch

from model.data import DistributedTokenLoader, write_shard
from model.prefetch import PrefetchLoader

VOCAB = 50


def shards(folder) -> str:
    rng = np.random.default_rng(1)
    for i, size in enumerate((700, 300, 1100)):  # reads cross shard ends and wrap around
        write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), rng.integers(0, VOCAB, size))
    return str(folder)


SIZES = [(64, 16)] * 9 + [(32, 8)] * 4 + [(64, 16)] * 12  # a change of batch size in the middle


def batches(loader, sizes):
    return [loader.next_batch(tokens, seq_len, "cpu") for tokens, seq_len in sizes]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y


def test_same_tokens_in_the_same_order(tmp_path):
    data = shards(tmp_path)
    plain = DistributedTokenLoader(data, rank=1, world_size=2, vocab_size=VOCAB)
    ahead = PrefetchLoader(DistributedTokenLoader(data, rank=1, world_size=2, vocab_size=VOCAB))
    assert_same(batches(ahead, SIZES), batches(plain, SIZES))
    ahead.close()


def test_resume_from_its_state_is_exact(tmp_path):
    data = shards(tmp_path)
    plain = DistributedTokenLoader(data, vocab_size=VOCAB)
    ahead = PrefetchLoader(DistributedTokenLoader(data, vocab_size=VOCAB))
    batches(plain, SIZES[:11])
    batches(ahead, SIZES[:11])
    state = ahead.state_dict()
    assert state == plain.state_dict()  # the state before the next batch handed out, not the read-ahead's
    resumed = PrefetchLoader(DistributedTokenLoader(data, vocab_size=VOCAB))
    resumed.next_batch(64, 16, "cpu")  # a resumed loader may have read ahead already
    resumed.load_state_dict(state)
    rest = batches(plain, SIZES[11:])
    assert_same(batches(resumed, SIZES[11:]), rest)
    ahead.load_state_dict(state)  # and the same loader, back to where it was
    assert_same(batches(ahead, SIZES[11:]), rest)


class DocumentBatches:
    """A loader of (x, y, cu_seqlens, note): any tuple goes through, tensors or not."""

    def __init__(self):
        self.position, self.threads = 0, []

    def next_batch(self, tokens, seq_len, device):
        self.threads.append(threading.current_thread().name)
        g = torch.Generator().manual_seed(self.position)
        self.position += 1
        seq = torch.randint(0, VOCAB, (tokens + 1,), generator=g)
        cu_seqlens = torch.tensor([0, tokens // 3, tokens], dtype=torch.int32)
        return seq[:-1].to(device), seq[1:].to(device), cu_seqlens.to(device), f"batch {self.position - 1}"

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_any_tuple_and_reads_on_its_own_thread():
    plain, inner = DocumentBatches(), DocumentBatches()
    ahead = PrefetchLoader(inner)
    assert_same(batches(ahead, [(48, 16)] * 5), batches(plain, [(48, 16)] * 5))
    ahead.state_dict()  # waits for the read-ahead
    assert inner.position == 6  # one batch beyond those handed out
    assert all(name.startswith("prefetch") for name in inner.threads[1:])  # all but the first read were ahead
    ahead.close()
    assert inner.position == 5  # closing puts the unread batch back


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu_unchanged(tmp_path):
    data = shards(tmp_path)
    plain = DistributedTokenLoader(data, vocab_size=VOCAB)
    ahead = PrefetchLoader(DistributedTokenLoader(data, vocab_size=VOCAB))
    for _ in range(6):
        got, expected = ahead.next_batch(64, 16, "cuda"), plain.next_batch(64, 16, "cuda")
        assert all(g.is_cuda and torch.equal(g, e) for g, e in zip(got, expected))
    ahead.close()
