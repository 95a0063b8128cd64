"""model/prefetch.py: the read-ahead loader hands out the wrapped loader's batches in the same order,
resumes exactly from its state_dict, reads on its own thread, and takes any tuple. Then the shards
the loaders prepare ahead (model.data.ShardPreparer): both loaders equal a plain whole-shard read
across shard ends, the wrap-around and a resume; the next shard is ready before the stream reaches
it and never prepared on the batch path's thread; a bad shard is one line with the batch that needs
it; close() leaves no thread, file handle or memory map."""
import os
import re
import threading

import numpy as np
import pytest
import torch

from model.data import DistributedTokenLoader, read_shard, shard_paths, write_shard
from model.document_loader import BOS_ID, DocumentLoader, document_cu_seqlens
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


# -- shards prepared ahead (model.data.ShardPreparer): the batch path never reads a whole shard ------

WORLD, PER_RANK, SEQ = 2, 16, 8  # a step reads 2 x 16 tokens (+1): several steps per shard
SHARD_SIZES = (150, 0, 90, 130, 110)  # ragged, one empty; the stream wraps around in 40 steps


def document_shards(folder, bad: tuple[int, int] | None = None) -> str:
    """SHARD_SIZES shards of ids in [2, VOCAB) with a BOS every 9 tokens from position 4; `bad`
    (shard, position) puts the id VOCAB + 27 there."""
    rng = np.random.default_rng(3)
    for i, size in enumerate(SHARD_SIZES):
        tokens = rng.integers(2, VOCAB, size)
        tokens[4::9] = BOS_ID
        if bad is not None and bad[0] == i:
            tokens[bad[1]] = VOCAB + 27
        write_shard(os.path.join(folder, f"fineweb_train_{i:06d}.bin"), tokens)
    return str(folder)


def plain_token_batches(folder, calls: int) -> list[tuple]:
    """DistributedTokenLoader's batches for rank 1 by hand: consecutive spans of the shards read whole."""
    stream = np.concatenate([read_shard(p).astype(np.int64) for p in shard_paths(folder, "train")])
    out = []
    for call in range(calls):
        span = np.take(stream, np.arange(call * WORLD * PER_RANK, (call + 1) * WORLD * PER_RANK + 1), mode="wrap")
        local = torch.from_numpy(span[PER_RANK:2 * PER_RANK + 1])
        out.append((local[:-1].view(-1, SEQ), local[1:].view(-1, SEQ)))
    return out


def plain_document_batches(folder, calls: int) -> list[tuple]:
    """DocumentLoader's batches for rank 1 by hand: from each shard's first BOS, steps of WORLD spans
    while they fit, then the next shard (after the last, the first)."""
    shards, span, out, index, position = [read_shard(p).astype(np.int64) for p in shard_paths(folder, "train")], PER_RANK + 1, [], 0, None
    while len(out) < calls:
        tokens = shards[index]
        starts = np.flatnonzero(tokens == BOS_ID)
        position = int(starts[0]) if position is None and starts.size else position
        if position is None or position + WORLD * span > len(tokens):
            index, position = (index + 1) % len(shards), None
            continue
        local = torch.from_numpy(tokens[position + span:position + 2 * span])
        out.append((local[None, :-1], local[None, 1:], document_cu_seqlens(local[None, :-1], SEQ)))
        position += WORLD * span
    return out


LOADERS = {"tokens": (DistributedTokenLoader, plain_token_batches), "documents": (DocumentLoader, plain_document_batches)}


def preparer_of(loader):
    inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
    return inner.stream.shards if isinstance(inner, DistributedTokenLoader) else inner.shards


def record_threads(loader) -> list[str]:
    """The names of the threads the loader's shard preparation runs on, as it runs."""
    preparer, names = preparer_of(loader), []
    prepare = preparer.prepare

    def recorded(path):
        names.append(threading.current_thread().name)
        return prepare(path)

    preparer.prepare = recorded
    return names


@pytest.mark.parametrize("kind", LOADERS)
def test_read_ahead_equals_a_plain_read_across_shards_wrap_and_resume(tmp_path, kind):
    loader_class, plain = LOADERS[kind]
    folder, calls, resume_at = document_shards(tmp_path), 40, 17
    expected = plain(folder, calls)
    first = PrefetchLoader(loader_class(folder, 1, WORLD, vocab_size=VOCAB))
    threads = record_threads(first)
    got = [first.next_batch(PER_RANK, SEQ, "cpu") for _ in range(resume_at)]
    state = first.state_dict()
    first.close()
    resumed = PrefetchLoader(loader_class(folder, 1, WORLD, vocab_size=VOCAB))
    threads += record_threads(resumed)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(PER_RANK, SEQ, "cpu") for _ in range(calls - resume_at)]
    resumed.close()
    assert_same(got, expected)
    # every shard with tokens was prepared, again after the wrap and the resume, and never on the batch path
    assert len(threads) >= 6 and all(name.startswith("shard") for name in threads), threads


@pytest.mark.parametrize("kind", LOADERS)
def test_the_next_shard_is_prepared_before_the_stream_reaches_it(tmp_path, kind):
    loader = LOADERS[kind][0](document_shards(tmp_path), 0, WORLD, vocab_size=VOCAB)
    preparer, threads, reached = preparer_of(loader), record_threads(loader), []
    get = preparer.get

    def recorded_get(index):  # the batch path asks for a shard: was it ready, or does the batch wait?
        reached.append((index, preparer.ready(index)))
        return get(index)

    preparer.get = recorded_get
    for _ in range(40):
        loader.next_batch(PER_RANK, SEQ, "cpu")
        # The step the GPU runs: here as long as the background needs to ready the shard after the
        # one the stream stands in. A loader that only prepared a shard on reaching it never gets there.
        following = preparer.next_index(loader.state_dict()["shard_index"])
        preparing = preparer.started(following)
        assert preparing is not None, f"shard {following} was not being prepared while the stream was before it"
        preparing.result()
    firsts = [reached[i] for i in range(len(reached)) if i == 0 or reached[i][0] != reached[i - 1][0]]
    assert [index for index, _ in firsts][:6] == [0, 2, 3, 4, 0, 2]  # every shard with tokens, then the wrap
    assert firsts[0] == (0, False) and all(ready for _, ready in firsts[1:]), firsts  # only the very first batch waits
    assert threads and all(name.startswith("shard") for name in threads), threads  # never on the batch path's thread
    loader.close()


BATCHES_BEFORE_SHARD_3 = {"tokens": 7, "documents": 6}  # tokens: 7 spans of 32 (+1) end before token 240; documents: 4 in shard 0, 2 in shard 2


def truncate_shard_3(folder):
    path = os.path.join(folder, "fineweb_train_000003.bin")
    os.truncate(path, os.path.getsize(path) - 4)


@pytest.mark.parametrize("damage, message", [
    pytest.param("vocab", r".*fineweb_train_000003\.bin: token id 77 at position 5 is not below VOCAB_SIZE=50; ", id="vocab"),
    pytest.param("header", r".*fineweb_train_000003\.bin: header says 130 tokens but the file holds 128; ", id="header"),
])
@pytest.mark.parametrize("kind", LOADERS)
def test_a_bad_shard_is_one_line_with_the_batch_that_needs_it(tmp_path, kind, damage, message):
    loader_class, plain = LOADERS[kind]
    folder = document_shards(tmp_path, bad=(3, 5) if damage == "vocab" else None)
    before = BATCHES_BEFORE_SHARD_3[kind]
    expected, reference = plain(folder, before), loader_class(folder, 1, WORLD)
    loader = PrefetchLoader(loader_class(folder, 1, WORLD, vocab_size=VOCAB))
    if damage == "header":
        truncate_shard_3(folder)  # after the start-up checks: found when the shard is prepared
    with pytest.raises(ValueError) as plain_error:  # the line a plain whole-shard read gives
        read_shard(os.path.join(folder, "fineweb_train_000003.bin"), VOCAB)
    for _ in range(before):
        reference.next_batch(PER_RANK, SEQ, "cpu")
    # shard 3 is prepared (and fails) in the background while the stream is in shard 2; the batches before it still come
    assert_same([loader.next_batch(PER_RANK, SEQ, "cpu") for _ in range(before)], expected)
    assert loader.state_dict() == reference.state_dict()  # a checkpoint now, the failed read-ahead pending: no error yet
    with pytest.raises(ValueError) as err:
        loader.next_batch(PER_RANK, SEQ, "cpu")  # in this (the trainer's) thread
    assert str(err.value) == str(plain_error.value) and re.match(message, str(err.value)) and "\n" not in str(err.value)
    assert loader.state_dict() == reference.state_dict()  # the stream stays before the failed batch
    with pytest.raises(ValueError, match=message):
        loader.next_batch(PER_RANK, SEQ, "cpu")  # the same line again (the shard is read again), not a hang
    loader.close()
    reference.close()


def shard_handles(folder) -> list[str]:
    """The open file descriptors and memory maps of this process that point into folder."""
    folder = os.path.realpath(folder)
    fds = [os.path.realpath(os.path.join("/proc/self/fd", fd)) for fd in os.listdir("/proc/self/fd")]
    with open("/proc/self/maps") as f:
        maps = [line.split(maxsplit=5)[-1].strip() for line in f]
    return [p for p in fds + maps if p.startswith(folder)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to list file handles")
@pytest.mark.parametrize("kind", LOADERS)
def test_close_leaves_no_thread_or_file_handle(tmp_path, kind):
    folder = document_shards(tmp_path)
    threads_before = set(threading.enumerate())
    loader = PrefetchLoader(LOADERS[kind][0](folder, 1, WORLD, vocab_size=VOCAB))
    batches = [loader.next_batch(PER_RANK, SEQ, "cpu") for _ in range(8)]  # past the first shard
    assert shard_handles(folder)  # the shards are mapped while the loader runs
    loader.close()
    assert shard_handles(folder) == [], "a shard is still open or mapped after close()"
    assert set(threading.enumerate()) <= threads_before
    assert_same(batches, LOADERS[kind][1](folder, 8))  # the batches handed out are copies: still intact
