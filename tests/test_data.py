"""Shard discovery, the shared training stream (rank slices, wrap-around, resume) and the
validation tokens, on small synthetic shards; the start-up checks (shard headers, token ids
against the vocabulary, the tokenizer the shards were made with); then the real sample shards."""
import errno
import json
import os
import threading

import numpy as np
import pytest
import torch

from model import data
from model.atomic import WriteFailed
from model.data import (
    TOKENIZER_MANIFEST,
    DistributedTokenLoader,
    ShardPreparer,
    TokenStream,
    check_tokenizer_matches,
    check_train_shards,
    load_validation_tokens,
    open_sentencepiece,
    read_shard,
    shard_paths,
    write_shard,
    write_tokenizer_manifest,
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


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 20


# -- byte sidecars (fineweb_val_bytes_*.bin, the CaseOps data) ----------------------------------------


def write_sidecars(folder: str, lengths=(30, 23)) -> np.ndarray:
    """Sidecars beside the train_dir fixture's two val shards: token i of the stream is worth i % 5 bytes."""
    counts = np.arange(sum(lengths)) % 5
    write_shard(os.path.join(folder, "fineweb_val_bytes_000000.bin"), counts[:lengths[0]])
    write_shard(os.path.join(folder, "fineweb_val_bytes_000001.bin"), counts[lengths[0]:])
    return counts


def test_sidecars_are_not_token_shards(train_dir):
    folder, _ = train_dir
    write_sidecars(folder)
    assert [os.path.basename(p) for p in shard_paths(folder, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert torch.equal(load_validation_tokens(folder, 4), torch.arange(53))
    assert data.sidecar_path("/d/fineweb_val_000001.bin") == "/d/fineweb_val_bytes_000001.bin"


@pytest.mark.parametrize("seq_len, max_tokens", [(4, 0), (7, 20), (5, 0)])
def test_validation_bytes_aligned_with_the_tokens(train_dir, seq_len, max_tokens):
    folder, _ = train_dir
    assert data.load_validation_bytes(folder, 53) is None  # no sidecar: the tokenizer tables count
    counts = write_sidecars(folder)
    tokens = load_validation_tokens(folder, seq_len, max_tokens)
    token_bytes = data.load_validation_bytes(folder, tokens.numel())
    assert token_bytes.dtype == torch.int32 and token_bytes.tolist() == counts[:tokens.numel()].tolist()


def test_validation_bytes_mismatch_is_one_line(train_dir):
    folder, _ = train_dir
    write_sidecars(folder, lengths=(30, 22))  # the second sidecar is one count short
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000001\.bin holds 22 byte counts but fineweb_val_000001\.bin holds 23 tokens") as err:
        data.load_validation_bytes(folder, 53)
    assert one_line(str(err.value))
    os.remove(os.path.join(folder, "fineweb_val_bytes_000001.bin"))  # one shard without its sidecar
    with pytest.raises(ValueError, match=r"fineweb_val_bytes_000001\.bin is missing while other validation shards") as err:
        data.load_validation_bytes(folder, 53)
    assert one_line(str(err.value))
    write_sidecars(folder)
    with pytest.raises(ValueError, match="54 tokens asked for"):
        data.load_validation_bytes(folder, 54)


# -- token ids against the vocabulary ---------------------------------------------------------------


def test_token_id_beyond_vocab_names_shard_and_position(train_dir):
    folder, stream_tokens = train_dir
    # Shard 0 holds 1000..1036: with 1030 ids, position 30 (id 1030) is the first one out of range.
    loader = DistributedTokenLoader(folder, vocab_size=1030)
    with pytest.raises(ValueError, match=r"fineweb_train_000000\.bin: token id 1030 at position 30 is not below VOCAB_SIZE=1030") as err:
        loader.next_batch(4, 4, "cpu")
    assert one_line(str(err.value))
    # Large enough: the same batches as without a check; no vocab_size: no check at all.
    for vocab_size in (4061, None):
        loader = DistributedTokenLoader(folder, vocab_size=vocab_size)
        x, _ = loader.next_batch(100, 4, "cpu")
        assert (x.flatten().numpy() == stream_tokens[:100]).all()


def test_token_id_beyond_vocab_in_a_later_shard(train_dir):
    folder, _ = train_dir
    loader = DistributedTokenLoader(folder, vocab_size=3005)  # shards 0 and 2 are fine; shard 3 (4000..) is not
    loader.next_batch(40, 4, "cpu")
    with pytest.raises(ValueError, match=r"fineweb_train_000003\.bin: token id 4000 at position 0 is not below VOCAB_SIZE=3005"):
        loader.next_batch(40, 4, "cpu")


def test_validation_ids_checked_against_vocab(train_dir):
    folder, _ = train_dir
    # val shard 0 holds 0..29, shard 1 holds 30..52: id 40 sits at position 10 of shard 1.
    with pytest.raises(ValueError, match=r"fineweb_val_000001\.bin: token id 40 at position 10 is not below VOCAB_SIZE=40") as err:
        load_validation_tokens(folder, 4, vocab_size=40)
    assert one_line(str(err.value))
    # every shard is checked, even past max_tokens (a bad id there means the wrong tokenizer all the same)
    with pytest.raises(ValueError, match="VOCAB_SIZE=40"):
        load_validation_tokens(folder, 4, max_tokens=8, vocab_size=40)
    assert torch.equal(load_validation_tokens(folder, 4, vocab_size=53), torch.arange(53))


# -- shard headers at start-up ----------------------------------------------------------------------


def test_check_train_shards_counts_tokens_without_reading_them(train_dir, monkeypatch):
    folder, stream_tokens = train_dir

    def no_reading(*args, **kwargs):
        raise AssertionError("check_train_shards read a shard's tokens")

    monkeypatch.setattr(data, "read_shard", no_reading)
    assert check_train_shards(folder) == len(stream_tokens) == 103
    DistributedTokenLoader(folder)  # the loader's start-up checks read headers only, too


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-4], r"header says 61 tokens but the file holds 59"),
    (lambda b: b[:100], r"100 bytes is shorter than the 1024-byte shard header"),
    (lambda b: b"\0" * 4 + b[4:], r"not a token shard \(magic 0"),
])
def test_damaged_train_shard_fails_at_start_up(train_dir, damage, message):
    folder, _ = train_dir
    path = os.path.join(folder, "fineweb_train_000003.bin")  # the last shard: the stream reaches it last
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(damage(good))
    with pytest.raises(ValueError, match=r"fineweb_train_000003\.bin: " + message) as err:
        check_train_shards(folder)
    assert one_line(str(err.value))
    with pytest.raises(ValueError, match=message):
        DistributedTokenLoader(folder)  # before the first batch, not when the stream gets there


def test_check_train_shards_empty_or_missing(tmp_path):
    with pytest.raises(ValueError, match="fineweb_train_"):
        check_train_shards(str(tmp_path))
    write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="hold no tokens"):
        check_train_shards(str(tmp_path))


# -- shards prepared ahead on a thread (the loaders' ShardPreparer; with the loaders in test_prefetch.py) --


def wait_ready(preparer, index):
    for _ in range(5000):
        if preparer.ready(index):
            return
        threading.Event().wait(0.002)
    raise AssertionError(f"shard {index} was never prepared")


def test_shard_preparer_readies_the_next_shard_and_holds_the_previous():
    prepared = []

    def prepare(path):
        prepared.append((path, threading.current_thread().name))
        return path.upper()

    threads_before = set(threading.enumerate())
    preparer = ShardPreparer(list("abcde"), [5, 0, 5, 5, 5], prepare)  # shard 1 is empty: never prepared
    assert preparer.get(0) == "A" and preparer.next_index(0) == 2 and preparer.next_index(4) == 0
    wait_ready(preparer, 2)  # queued when shard 0 was asked for
    assert preparer.get(2) == "C" and preparer.ready(0)  # the shard before stays held (a put-back batch needs it)
    assert preparer.get(0) == "A" and preparer.get(2) == "C"
    wait_ready(preparer, 3)
    preparer.get(3)
    assert not preparer.ready(0)  # two shards back: dropped
    wait_ready(preparer, 4)
    preparer.get(4)
    wait_ready(preparer, 0)  # after the last shard, the first again
    assert [path for path, _ in prepared] == ["a", "c", "d", "e", "a"]
    assert all(name.startswith("shard") for _, name in prepared)
    preparer.close()
    assert not any(preparer.ready(i) for i in range(5)) and set(threading.enumerate()) <= threads_before
    assert preparer.get(3) == "D"  # usable after close: a fresh thread
    preparer.close()


def test_shard_preparer_raises_in_the_caller_and_prepares_again():
    attempts = []

    def prepare(path):
        attempts.append(path)
        if len(attempts) == 1:
            raise ValueError(f"{path}: broken")
        return path

    preparer = ShardPreparer(["x"], [3], prepare)
    with pytest.raises(ValueError, match="^x: broken$"):
        preparer.get(0)
    assert preparer.get(0) == "x" and attempts == ["x", "x"]  # a failure is not kept: the shard is read again
    preparer.close()


def test_open_shard_maps_the_tokens_read_shard_reads(train_dir):
    folder, _ = train_dir
    for path in shard_paths(folder, "train"):
        mapped = data.open_shard(path, vocab_size=5000)
        assert mapped.dtype == np.uint16 and not mapped.flags.writeable and (mapped == read_shard(path)).all()
    with pytest.raises(ValueError, match=r"fineweb_train_000003\.bin: token id 4000 at position 0 is not below VOCAB_SIZE=3005"):
        data.open_shard(os.path.join(folder, "fineweb_train_000003.bin"), vocab_size=3005)


def test_write_shard_failure_leaves_the_old_shard(tmp_path, monkeypatch):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(str(path), np.arange(10))

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match=r"could not write .*fineweb_train_000000\.bin: No space left on device") as err:
        write_shard(str(path), np.arange(20))
    assert one_line(str(err.value))
    monkeypatch.undo()
    assert (read_shard(str(path)) == np.arange(10)).all()
    assert os.listdir(tmp_path) == ["fineweb_train_000000.bin"]  # no temp file left


# -- the tokenizer the shards were made with --------------------------------------------------------


def test_tokenizer_manifest_match_and_mismatch(tmp_path):
    tokenizer, other = tmp_path / "mine.model", tmp_path / "other.model"
    tokenizer.write_bytes(b"tokenizer one")
    other.write_bytes(b"tokenizer two")
    shards = tmp_path / "shards"
    shards.mkdir()
    assert check_tokenizer_matches(str(shards), str(other)) is None  # no manifest (older data): no check
    write_tokenizer_manifest(str(shards), str(tokenizer), 1024)
    manifest = json.loads((shards / TOKENIZER_MANIFEST).read_text())
    assert manifest["tokenizer"] == "mine.model" and manifest["vocab_size"] == 1024 and len(manifest["sha256"]) == 64
    assert check_tokenizer_matches(str(shards), str(tokenizer)) == manifest
    with pytest.raises(ValueError, match=r"tokenizer .*other\.model .* is not the one the shards in .* were made with \(mine\.model, 1024 pieces") as err:
        check_tokenizer_matches(str(shards), str(other))
    assert one_line(str(err.value)) and "TOKENIZER_PATH" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.model does not exist.*mine.model"):
        check_tokenizer_matches(str(shards), str(tmp_path / "missing.model"))
    (shards / TOKENIZER_MANIFEST).write_text('{"tokenizer": "mine.mo')  # torn or hand-edited
    with pytest.raises(ValueError, match="is not a tokenizer manifest") as err:
        check_tokenizer_matches(str(shards), str(tokenizer))
    assert one_line(str(err.value))
    assert sorted(os.listdir(shards)) == [TOKENIZER_MANIFEST]


def test_tokenizer_manifest_write_failure_leaves_nothing(tmp_path, monkeypatch):
    tokenizer = tmp_path / "t.model"
    tokenizer.write_bytes(b"x")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match=r"tokenizer\.json: No space left on device"):
        write_tokenizer_manifest(str(tmp_path), str(tokenizer), 2)
    assert os.listdir(tmp_path) == ["t.model"]


def test_open_sentencepiece_refuses_other_files(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"<html>not a model</html>")
    with pytest.raises(ValueError, match=r"junk\.model is not a SentencePiece model") as err:
        open_sentencepiece(str(junk))
    assert one_line(str(err.value))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_sentencepiece(str(tmp_path / "none.model"))


def test_real_shards(shared_data):
    folder = os.path.join(shared_data, "fineweb10B_sp1024_sample")
    loader = DistributedTokenLoader(folder, rank=1, world_size=2)
    x, y = loader.next_batch(4096, 1024, "cpu")
    first_shard = read_shard(shard_paths(folder, "train")[0]).astype(np.int64)
    assert (x.flatten().numpy() == first_shard[4096:8192]).all()
    assert (y.flatten().numpy() == first_shard[4097:8193]).all()
    assert int(first_shard[0]) == 1  # documents start with BOS
    val = load_validation_tokens(folder, 1024, vocab_size=1024)
    assert val.numel() == 628_456 // 1024 * 1024 + 1
    assert int(val.max()) < 1024
    assert check_train_shards(folder) == 7_303_509
    sp = open_sentencepiece(os.path.join(shared_data, "tokenizers", "fineweb_1024_bpe.model"))
    assert sp.vocab_size() == 1024
    loader = DistributedTokenLoader(folder, vocab_size=1024)
    loader.next_batch(4096, 1024, "cpu")
    with pytest.raises(ValueError, match=r"fineweb_val_000000\.bin: token id \d+ at position \d+ is not below VOCAB_SIZE=512"):
        load_validation_tokens(folder, 1024, vocab_size=512)  # the sp1024 shards under a 512-piece setting


@pytest.mark.gpu
def test_cuda_batches_match_cpu(train_dir):
    folder, _ = train_dir
    cpu_loader, cuda_loader = DistributedTokenLoader(folder, 1, 2), DistributedTokenLoader(folder, 1, 2)
    for _ in range(4):
        x, y = cpu_loader.next_batch(12, 4, "cpu")
        cx, cy = cuda_loader.next_batch(12, 4, "cuda")  # pinned memory, non-blocking copy
        assert cx.is_cuda and cy.is_cuda
        assert torch.equal(cx.cpu(), x) and torch.equal(cy.cpu(), y)
