"""Token shards in the challenge's format: 256 little-endian int32 header words (magic, version,
token count, zeros), then the tokens as little-endian uint16; the training stream that ranks share,
and the validation tokens. Also the tokenizer manifest that data/prepare.py and data/download.py
leave beside the shards, so a run with another tokenizer stops at start-up."""
import concurrent.futures
import functools
import glob
import hashlib
import json
import os

import numpy as np
import torch

from model.atomic import atomic_open, atomic_write

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256
TOKENIZER_MANIFEST = "tokenizer.json"  # beside the shards: which tokenizer made them
BYTES_MARK = "_bytes_"  # fineweb_val_bytes_NNNNNN.bin: per-token byte sidecar of fineweb_val_NNNNNN.bin


def write_shard(path: str, tokens) -> None:
    """Write tokens (ints < 65536) as one shard, atomically (a temp file renamed into place)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] to fit a uint16 shard")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with atomic_open(path, "wb", fsync=False) as f:  # no fsync: a lost shard is re-exported, not a lost run
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def shard_token_count(path: str) -> int:
    """The token count of a shard from its header, checked against the file size; reads 1 KiB."""
    header_bytes = HEADER_WORDS * 4
    size = os.path.getsize(path)
    if size < header_bytes:
        raise ValueError(f"{path}: {size} bytes is shorter than the {header_bytes}-byte shard header; the file is truncated, re-download or re-export it")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(
            f"{path}: not a token shard (magic {header[0]}, version {header[1]}; expected {SHARD_MAGIC}, {SHARD_VERSION})"
        )
    count = int(header[2])
    if count < 0 or size != header_bytes + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens but the file holds {(size - header_bytes) / 2:g}; re-download or re-export it")
    return count


def check_vocab(tokens: np.ndarray, vocab_size: int | None, source: str) -> None:
    """ValueError naming the first id >= vocab_size: on the GPU such an id is an out-of-bounds
    embedding read (a device assert or silent garbage), not an error. One vectorised pass."""
    if vocab_size is None or not tokens.size:
        return
    if int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise ValueError(
            f"{source}: token id {int(tokens[position])} at position {position:,} is not below VOCAB_SIZE={vocab_size}; "
            f"the shards were made with a larger tokenizer: set VOCAB_SIZE and TOKENIZER_PATH to that one or re-export the shards"
        )


def read_shard(path: str, vocab_size: int | None = None) -> np.ndarray:
    """Tokens of one shard as uint16, after checking its header against its size and, when
    vocab_size is given, every id against it."""
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_WORDS * 4)
    check_vocab(tokens, vocab_size, path)
    return tokens


def open_shard(path: str, vocab_size: int | None = None) -> np.ndarray:
    """Tokens of one shard memory-mapped (uint16, read-only), after checking its header against its
    size and, when vocab_size is given, every id against it. One pass over the whole shard, which
    also pulls it into the page cache: a background thread's job (ShardPreparer), so the batches
    later sliced from it read memory, not disk."""
    count = shard_token_count(path)
    if count == 0:  # nothing to map (mmap refuses a length of 0)
        tokens = np.empty(0, dtype=np.uint16)
        tokens.flags.writeable = False
        return tokens
    tokens = np.asarray(np.memmap(path, dtype="<u2", mode="r", offset=HEADER_WORDS * 4, shape=(count,)))
    if vocab_size is None:
        tokens.max()  # no ids to check: the pass only reads every page in
    else:
        check_vocab(tokens, vocab_size, path)
    return tokens


class ShardPreparer:
    """Shards made ready one ahead of the stream, on a background thread.

    get(i) returns prepare(paths[i]) (open, check, index: whatever the loader needs of a whole
    shard) and queues the next shard that holds tokens (after the last, the first), so a stream
    that reaches it finds it ready and the batch path never does whole-shard work. An error from
    prepare (a bad header, an id beyond the vocabulary) is raised as it was raised, by the get()
    of that shard, in the caller's thread; a later get() of it prepares it again. The shard asked
    for before the current one stays held as well (memory-mapped: page cache, not a copy), so a
    loader put back across a shard end (PrefetchLoader's undo) does not prepare it again. One
    caller at a time; close() drops every shard and stops the thread, and a later get() starts again.
    """

    def __init__(self, paths: list[str], counts: list[int], prepare):
        self.paths, self.counts, self.prepare = list(paths), list(counts), prepare
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._shards: dict[int, concurrent.futures.Future] = {}
        self._current = self._previous = None  # the shard get() was last asked for, and the one before it

    def next_index(self, index: int) -> int:
        """The next shard after `index` that holds tokens, wrapping around (index itself if none)."""
        for step in range(1, len(self.paths) + 1):
            following = (index + step) % len(self.paths)
            if self.counts[following]:
                return following
        return index

    def prefetch(self, index: int) -> concurrent.futures.Future:
        """Start preparing shard `index` (unless it is held already) without waiting for it."""
        if index not in self._shards:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard")
            self._shards[index] = self._pool.submit(self.prepare, self.paths[index])
        return self._shards[index]

    def started(self, index: int) -> concurrent.futures.Future | None:
        """The preparation of shard `index` if it has been started (and not dropped), else None."""
        return self._shards.get(index)

    def ready(self, index: int) -> bool:
        """Whether shard `index` is held and its preparation over: a get() of it would not wait."""
        shard = self.started(index)
        return shard is not None and shard.done()

    def get(self, index: int):
        shard, following = self.prefetch(index), self.next_index(index)
        self.prefetch(following)
        if index != self._current:
            self._previous, self._current = self._current, index
        for other in [i for i in self._shards if i not in (self._previous, index, following)]:
            self._shards.pop(other).cancel()
        try:
            return shard.result()
        except BaseException:
            self._shards.pop(index, None)
            raise

    def close(self) -> None:
        shards, self._shards, self._current, self._previous = self._shards, {}, None, None
        for shard in shards.values():
            shard.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a preparation under way finishes; its shard is dropped with it
            self._pool = None


def shard_paths(data_path: str, split: str) -> list[str]:
    """Sorted paths of `data_path`/fineweb_{split}_*.bin (shard order is the token order); byte
    sidecars (fineweb_val_bytes_*.bin, which the pattern also matches) are not token shards."""
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    paths = sorted(p for p in glob.glob(pattern) if BYTES_MARK not in os.path.basename(p))
    if not paths:
        raise ValueError(
            f"no {split} shards match {pattern}; download them with data/download.py or set DATA_PATH to the folder that holds them"
        )
    return paths


def check_train_shards(data_path: str) -> int:
    """Every train shard's header against its size, without reading tokens (a truncated shard
    stops the run at start-up, not when the stream reaches it); returns the total token count."""
    paths = shard_paths(data_path, "train")
    total = sum(shard_token_count(p) for p in paths)
    if total == 0:
        raise ValueError(f"the {len(paths)} train shards starting with {paths[0]} hold no tokens; re-export them")
    return total


class TokenStream:
    """The tokens of `paths` one after the other, wrapping around to the first shard at the end.

    The state is (shard_index, position): the next token to read. Shards are memory-mapped and
    checked on a background thread (ShardPreparer), the next one as soon as the stream enters
    the current one, so a read that crosses a shard end only slices memory.
    """

    def __init__(self, paths: list[str], vocab_size: int | None = None):
        self.paths, self.vocab_size = list(paths), vocab_size
        if not self.paths:
            raise ValueError("TokenStream needs at least one shard path; pass shard_paths(data_path, 'train')")
        # Every header now (1 KiB each), so a broken shard fails at start-up; the ids of a shard are
        # checked against vocab_size when it is prepared.
        self.counts = [shard_token_count(p) for p in self.paths]
        if sum(self.counts) == 0:
            raise ValueError(f"the {len(self.paths)} shards starting with {self.paths[0]} hold no tokens; re-export them")
        self.shard_index, self.position = 0, 0
        self.shards = ShardPreparer(self.paths, self.counts, functools.partial(open_shard, vocab_size=vocab_size))

    def read(self, count: int, advance: int = None) -> np.ndarray:
        """The next `count` tokens (uint16 [count]); the stream then moves on by `advance` (default
        `count`, at most `count`), so a caller can peek at tokens it leaves for the next read."""
        advance = count if advance is None else advance
        if not 0 <= advance <= count:
            raise ValueError(f"TokenStream.read: advance={advance} must lie in [0, count={count}]")
        out = np.empty(count, dtype=np.uint16)
        shard, pos, filled = self.shard_index, self.position, 0
        state_after = (shard, pos) if advance == 0 else None
        while filled < count or state_after is None:
            take = min(count - filled, self.counts[shard] - pos)
            if take > 0:  # a shard the read only passes (empty, or ended where the last read stopped) is not opened
                out[filled:filled + take] = self.shards.get(shard)[pos:pos + take]
            if state_after is None and filled + take >= advance:
                state_after = (shard, pos + advance - filled)
            filled, pos = filled + take, pos + take
            if pos >= self.counts[shard] and filled < count:
                shard, pos = (shard + 1) % len(self.paths), 0
        self.shard_index, self.position = state_after
        return out

    def state_dict(self) -> dict:
        return {"shard_index": self.shard_index, "position": self.position, "num_shards": len(self.paths)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_shards", len(self.paths)) != len(self.paths):
            raise ValueError(
                f"loader state was saved over {state['num_shards']} shards but {len(self.paths)} are present; "
                f"resume with the same DATA_PATH contents"
            )
        index, position = int(state["shard_index"]), int(state["position"])
        if not 0 <= index < len(self.paths) or not 0 <= position <= self.counts[index]:
            raise ValueError(f"loader state (shard {index}, position {position}) lies outside the shards at {self.paths[0]}")
        self.shard_index, self.position = index, position

    def close(self) -> None:
        """Drop the shards held and stop the preparing thread (the stream stays usable)."""
        self.shards.close()


class DistributedTokenLoader:
    """Training batches from the train shards, the same global stream for every rank.

    Each call reads one contiguous span of world_size * batch_tokens_per_rank targets (+1 token
    for the first input) and rank r takes the r-th slice of it, so ranks never see the same
    tokens. The stream moves on by world_size * batch_tokens_per_rank: the last target of one
    call is the first input of the next, so every token is a target once per pass over the data.
    """

    def __init__(self, data_path: str, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedTokenLoader: rank {rank} must lie in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(shard_paths(data_path, "train"), vocab_size)

    def next_batch(self, batch_tokens_per_rank: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [batch_tokens_per_rank // seq_len, seq_len] each, on `device`."""
        if seq_len <= 0 or batch_tokens_per_rank <= 0 or batch_tokens_per_rank % seq_len:
            raise ValueError(
                f"next_batch: batch_tokens_per_rank={batch_tokens_per_rank} must be a positive multiple of seq_len={seq_len}"
            )
        span_targets = self.world_size * batch_tokens_per_rank
        span = self.stream.read(span_targets + 1, advance=span_targets)
        start = self.rank * batch_tokens_per_rank
        local = torch.from_numpy(span[start:start + batch_tokens_per_rank + 1].astype(np.int64))
        device = torch.device(device)
        if device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously with the previous step's kernels.
            local = local.pin_memory().to(device, non_blocking=True)
        else:
            local = local.to(device)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def close(self) -> None:
        self.stream.close()


def load_validation_tokens(data_path: str, seq_len: int, max_tokens: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """All validation shards concatenated (int64 [n * seq_len + 1]): cut to max_tokens + 1 tokens
    when max_tokens > 0, then to a whole number of seq_len targets plus the first input. With
    vocab_size, every id of every shard is checked against it."""
    tokens = np.concatenate([read_shard(p, vocab_size) for p in shard_paths(data_path, "val")])
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    usable_targets = (len(tokens) - 1) // seq_len * seq_len if seq_len > 0 else 0
    if usable_targets <= 0:
        raise ValueError(
            f"the validation shards in {data_path} give {len(tokens)} tokens (MAX_VAL_TOKENS={max_tokens}), fewer than "
            f"seq_len + 1 = {seq_len + 1}; use a shorter sequence length or more validation tokens"
        )
    return torch.from_numpy(tokens[:usable_targets + 1].astype(np.int64))


def sidecar_path(shard_path: str) -> str:
    """The byte sidecar of a token shard: fineweb_val_000003.bin -> fineweb_val_bytes_000003.bin."""
    folder, name = os.path.split(shard_path)
    stem, _, index = name.rpartition("_")
    return os.path.join(folder, f"{stem}{BYTES_MARK}{index}")


def load_validation_bytes(data_path: str, num_tokens: int) -> torch.Tensor | None:
    """Per-token bytes from the validation shards' sidecars (fineweb_val_bytes_*.bin, FRONTIER.md
    section 1: the UTF-8 bytes of the original text each token covers, BOS 0), int32
    [num_tokens], aligned with load_validation_tokens(...) of the same folder (pass its numel()).
    None when the folder has no sidecar: bytes then come from the tokenizer's tables. One
    ValueError line when only some shards have one or a sidecar's length differs from its shard's."""
    shards = shard_paths(data_path, "val")
    sidecars = [sidecar_path(p) for p in shards]
    present = [os.path.isfile(p) for p in sidecars]
    if not any(present):
        return None
    if not all(present):
        missing = sidecars[present.index(False)]
        raise ValueError(
            f"{missing} is missing while other validation shards in {data_path} have byte sidecars; "
            "re-export the validation split with data/prepare.py --caseops (or remove every fineweb_val_bytes_*.bin)"
        )
    counts = []
    for shard, sidecar in zip(shards, sidecars):
        tokens, token_bytes = shard_token_count(shard), shard_token_count(sidecar)
        if tokens != token_bytes:
            raise ValueError(
                f"{sidecar} holds {token_bytes:,} byte counts but {os.path.basename(shard)} holds {tokens:,} tokens; "
                "the sidecar belongs to another export: re-export the validation split with data/prepare.py --caseops"
            )
        counts.append(tokens)
    if num_tokens > sum(counts):
        raise ValueError(f"load_validation_bytes: {num_tokens:,} tokens asked for but the validation shards in {data_path} hold {sum(counts):,}")
    out, filled = np.empty(num_tokens, dtype=np.int32), 0
    for sidecar, count in zip(sidecars, counts):
        if filled == num_tokens:
            break
        take = min(count, num_tokens - filled)
        out[filled:filled + take] = np.fromfile(sidecar, dtype="<u2", count=take, offset=HEADER_WORDS * 4)
        filled += take
    return torch.from_numpy(out)


# -- the tokenizer the shards were made with ---------------------------------------------------------


def open_sentencepiece(path: str):
    """A SentencePieceProcessor for path: FileNotFoundError when it is missing, one ValueError line
    when the file is not a SentencePiece model (sentencepiece raises a bare RuntimeError)."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {path} does not exist; pass the SentencePiece .model file the shards were made with")
    try:
        return spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"tokenizer {path} is not a SentencePiece model ({str(e).strip()}); pass a .model file") from None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_tokenizer_manifest(data_path: str, tokenizer_path: str, vocab_size: int | None) -> str:
    """data_path/tokenizer.json: the name, sha256 and piece count of the tokenizer that made the
    shards there (written by data/prepare.py and data/download.py); returns its path."""
    manifest = {"tokenizer": os.path.basename(tokenizer_path), "sha256": sha256_of(tokenizer_path), "vocab_size": vocab_size}
    path = os.path.join(data_path, TOKENIZER_MANIFEST)
    atomic_write(path, json.dumps(manifest, indent=1) + "\n")
    return path


def check_tokenizer_matches(data_path: str, tokenizer_path: str) -> dict | None:
    """One ValueError line when tokenizer_path is not the tokenizer the shards in data_path were
    made with (by sha256, per their tokenizer.json); returns the manifest, or None when the folder
    has none (older data: nothing to check)."""
    path = os.path.join(data_path, TOKENIZER_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        expected = manifest["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizer manifest ({type(e).__name__}: {e}); delete it or re-export the shards") from None
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"tokenizer {tokenizer_path} does not exist; set TOKENIZER_PATH to {manifest.get('tokenizer')}, "
            f"the tokenizer the shards in {data_path} were made with"
        )
    actual = sha256_of(tokenizer_path)
    if actual != expected:
        raise ValueError(
            f"tokenizer {tokenizer_path} (sha256 {actual[:12]}) is not the one the shards in {data_path} were made with "
            f"({manifest.get('tokenizer')}, {manifest.get('vocab_size')} pieces, sha256 {str(expected)[:12]}); "
            f"set TOKENIZER_PATH to that file or re-export the shards with this tokenizer"
        )
    return manifest
