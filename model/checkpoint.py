"""Training checkpoints that a crash cannot tear: the payload is written to a temp file, carries
its own length and sha256, and is renamed into place; a reader refuses anything else.

Layout: MAGIC (8 bytes) | payload length (8 bytes, little endian) | sha256 (32 bytes) | payload,
the payload being torch.save of a plain dict.
"""
import hashlib
import io
import os
import struct

import torch

MAGIC = b"GOLFCKPT"
HEADER = struct.Struct("<8sQ32s")


def save_checkpoint(state: dict, path: str) -> int:
    """Write `state` atomically; returns the file's size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()))
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return HEADER.size + len(payload)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by save_checkpoint; one clear error for a missing, foreign or torn file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass RESUME=<path to a checkpoint.pt of an earlier run>")
    with open(path, "rb") as f:
        header = f.read(HEADER.size)
        payload = f.read()
    if len(header) < HEADER.size or header[:8] != MAGIC:
        raise ValueError(f"{path} is not a training checkpoint of this trainer (bad header); pass a checkpoint.pt it wrote")
    _, length, digest = HEADER.unpack(header)
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"checkpoint {path} is torn or corrupt ({len(payload):,} of {length:,} payload bytes, checksum "
            f"{'ok' if hashlib.sha256(payload).digest() == digest else 'wrong'}); resume from an earlier checkpoint"
        )
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def rng_states() -> dict:
    """The generators' states, to store in a checkpoint."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(saved: dict) -> None:
    """Set the generators from rng_states() of an earlier run. The states go back to the CPU first:
    a checkpoint loaded with map_location=cuda brings them onto the GPU, and the setters take only
    CPU byte tensors."""
    torch.set_rng_state(saved["cpu"].cpu())
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in saved["cuda"]])
