"""Token shards in the challenge's format: 256 little-endian int32 header words (magic, version,
token count, zeros), then the tokens as little-endian uint16."""
import os

import numpy as np

SHARD_MAGIC, SHARD_VERSION, HEADER_WORDS = 20240520, 1, 256


def write_shard(path: str, tokens) -> None:
    """Write tokens (ints < 65536) as one shard, atomically (a temp file renamed into place)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65535] to fit a uint16 shard")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_shard(path: str) -> np.ndarray:
    """Tokens of one shard as uint16, after checking its header against its size."""
    header_bytes = HEADER_WORDS * 4
    size = os.path.getsize(path)
    if size < header_bytes:
        raise ValueError(f"{path}: {size} bytes is shorter than the {header_bytes}-byte shard header; the file is truncated")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(
            f"{path}: not a token shard (magic {header[0]}, version {header[1]}; expected {SHARD_MAGIC}, {SHARD_VERSION})"
        )
    count = int(header[2])
    if size != header_bytes + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens but the file holds {(size - header_bytes) / 2:g}; re-download or re-export it")
    return np.fromfile(path, dtype="<u2", count=count, offset=header_bytes)
