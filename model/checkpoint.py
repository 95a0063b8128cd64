"""Training checkpoints that a crash cannot tear and that run no code when read: the payload is
written atomically (model/atomic.py), carries its own length and sha256, and is read back with
torch.load(weights_only=True), which builds tensors and plain values only; a reader refuses
anything else with one line.

Layout: MAGIC (8 bytes) | payload length (8 bytes, little endian) | sha256 (32 bytes) | payload,
the payload being torch.save of a dict of tensors and plain values (see `check_loadable`).
"""
import collections
import hashlib
import io
import os
import pickle
import struct

import torch

from model.atomic import atomic_open

MAGIC = b"GOLFCKPT"
HEADER = struct.Struct("<8sQ32s")

# What train.py's Trainer.state_dict() holds; pass as required_keys when resuming a run.
TRAINING_STATE_KEYS = ("config", "model", "optimizers", "loader", "swa", "qat", "ema", "looping", "step", "elapsed_ms", "rng")

# Values a weights-only load rebuilds (a subset of torch's allow-list, checked by the tests).
_LEAVES = (torch.Tensor, torch.nn.Parameter, int, float, bool, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)


def check_loadable(value, where: str = "state") -> None:
    """ValueError naming the first value torch.load(weights_only=True) would refuse, so a state
    that could not be resumed is caught when it is saved, not when the run is resumed."""
    kind = type(value)
    if kind in (dict, collections.OrderedDict):
        for key, item in value.items():
            check_loadable(key, f"a key of {where}")
            check_loadable(item, f"{where}[{key!r}]")
    elif kind in _CONTAINERS:
        for index, item in enumerate(value):
            check_loadable(item, f"{where}[{index}]")
    elif kind not in _LEAVES:
        raise ValueError(
            f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}, which a weights-only load refuses; "
            f"store it as tensors or plain values (str, int, float, bool, lists, dicts)"
        )


def save_checkpoint(state: dict, path: str) -> int:
    """Write `state` atomically; returns the file's size in bytes. Raises ValueError (check_loadable)
    for a state that load_checkpoint could not read, WriteFailed when the file cannot be written."""
    check_loadable(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    with atomic_open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()))
        f.write(payload)
    return HEADER.size + len(payload)


def _load_refusal(error: Exception) -> str:
    """The one informative line of torch's multi-paragraph weights-only error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "nsupported" in line), lines[0] if lines else type(error).__name__)
    return reason.removeprefix("WeightsUnpickler error: ")


def load_checkpoint(path: str, map_location="cpu", required_keys=()) -> dict:
    """Read a checkpoint written by save_checkpoint. One line for each way it can be wrong:
    FileNotFoundError when missing; ValueError when foreign, torn, holding anything but tensors
    and plain values (nothing in it runs), or lacking one of required_keys."""
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
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"checkpoint {path} was refused by a weights-only load, which builds tensors and plain values only "
            f"({_load_refusal(e)}); nothing in it ran; resume from a checkpoint.pt this trainer wrote"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of training state; pass a checkpoint.pt this trainer wrote")
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {', '.join(missing)} (it has {', '.join(map(str, state)) or 'nothing'}); "
            f"it was not written by this train.py: resume from a checkpoint.pt the current train.py wrote"
        )
    return state


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
