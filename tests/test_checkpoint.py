"""model/checkpoint.py: the whole training state train.py saves loads back under a weights-only
load; anything else (a pickle that would run code, a foreign payload, missing keys) is refused with
one line and runs nothing; a failed write leaves the old checkpoint and no temp file."""
import collections
import dataclasses
import errno
import hashlib
import io
import os
import pickle

import numpy as np
import pytest
import torch

import kernels
from model.atomic import WriteFailed
from model.checkpoint import (
    HEADER,
    MAGIC,
    TRAINING_STATE_KEYS,
    check_loadable,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from model.config import load_config
from model.data import DistributedTokenLoader, write_shard
from model.ema import ExponentialMovingAverage
from model.gpt import GPT
from model.optim import build_optimizers
from model.swa import WeightAverage

TINY = ["--preset", "smoke", "--model_dim", "64", "--num_heads", "4", "--num_kv_heads", "2", "--rope_dims", "8"]


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 20


def write_raw_checkpoint(path, payload: bytes) -> None:
    """A file with a valid header and sha256 around any payload: only the payload can be refused."""
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()))
        f.write(payload)


def training_state(tmp_path):
    """The dict train.py's Trainer.state_dict() returns, after one real step of a tiny model."""
    cfg, _ = load_config(TINY, environ={})
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizers = build_optimizers(model, cfg, torch.float32)  # Muon + AdamW groups, as train.py builds them
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    with kernels.use_backend("reference"):  # the state is what matters here, not the kernels (slow in the interpreter)
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
    swa = WeightAverage()
    swa.add(model)
    write_shard(str(tmp_path / "fineweb_train_000000.bin"), np.arange(100) % cfg.vocab_size)
    loader = DistributedTokenLoader(str(tmp_path), vocab_size=cfg.vocab_size)
    loader.next_batch(16, 8, "cpu")
    state = {
        "config": dataclasses.asdict(cfg),
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader.state_dict(),
        "swa": swa.state_dict(),
        "qat": False,
        "ema": ExponentialMovingAverage(model, 0.9965).state_dict(),  # the frontier's: it must load weights-only too
        "looping": True,
        "step": 1,
        "elapsed_ms": 12.5,
        "rng": rng_states(),
    }
    return state, model, optimizers, cfg


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def test_training_state_round_trips_under_weights_only(tmp_path):
    state, model, optimizers, cfg = training_state(tmp_path)
    assert set(state) == set(TRAINING_STATE_KEYS)
    assert all(opt_state["state"] for opt_state in state["optimizers"])  # momentum / Adam moments exist
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(state, path)
    loaded = load_checkpoint(path, required_keys=TRAINING_STATE_KEYS)
    assert_same(state, loaded)
    # and it goes back into fresh objects the way train.py resumes
    fresh = GPT(cfg)
    fresh.load_state_dict(loaded["model"])
    for opt, opt_state in zip(build_optimizers(fresh, cfg, torch.float32), loaded["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    restore_rng_states(loaded["rng"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "fineweb_train_000000.bin"]  # no temp file left


def test_every_value_check_loadable_accepts_loads_weights_only():
    value = {
        "tensor": torch.ones(2), "parameter": torch.nn.Parameter(torch.ones(2)), "int": 1, "float": 2.5, "bool": True,
        "str": "s", "bytes": b"b", "none": None, "dtype": torch.bfloat16, "device": torch.device("cpu"),
        "list": [1, (2, 3)], "size": torch.Size([2, 3]), "ordered": collections.OrderedDict(a=1), 7: "int key",
    }
    check_loadable(value)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    assert_same(value, torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))


@pytest.mark.parametrize("bad, where", [
    ({"swa": {"sums": {"w": np.ones(2)}}}, r"state\['swa'\]\['sums'\]\['w'\] is a numpy.ndarray"),
    ({"optimizers": [{"param_groups": [{"lr": np.float64(0.1)}]}]}, r"state\['optimizers'\]\[0\]\['param_groups'\]\[0\]\['lr'\] is a numpy.float64"),
    ({"config": {"layers": {1, 2}}}, r"state\['config'\]\['layers'\] is a builtins.set"),
    ({"loader": collections.defaultdict(int)}, r"state\['loader'\] is a collections.defaultdict"),
])
def test_save_refuses_a_state_resume_could_not_read(tmp_path, bad, where):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, str(path))
    with pytest.raises(ValueError, match=where + ".*weights-only load refuses") as err:
        save_checkpoint(bad, str(path))
    assert one_line(str(err.value))
    assert load_checkpoint(str(path)) == {"step": 1}  # the old checkpoint is untouched


class CreatesAFile:
    """Unpickling this object creates a folder: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("via", ["torch.save", "pickle"])
def test_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, via):
    marker = str(tmp_path / "created_by_the_checkpoint")
    payload_state = {"step": 1, "model": {}, "hook": CreatesAFile(marker)}
    if via == "torch.save":
        buffer = io.BytesIO()
        torch.save(payload_state, buffer)
        payload = buffer.getvalue()
    else:
        payload = pickle.dumps(payload_state, protocol=2)
    path = tmp_path / "checkpoint.pt"
    write_raw_checkpoint(path, payload)  # valid header and sha256
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint\.pt was refused by a weights-only load.*nothing in it ran") as err:
        load_checkpoint(str(path))
    assert one_line(str(err.value))
    assert not os.path.exists(marker)
    if via == "torch.save":
        assert "posix.mkdir" in str(err.value)  # names what it refused
        # The payload is live: a plain load would have created the marker.
        torch.load(io.BytesIO(payload), weights_only=False)
        assert os.path.isdir(marker)


def test_payload_not_a_dict_or_missing_keys(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds a list, not a dict") as err:
        load_checkpoint(path)
    assert one_line(str(err.value))
    save_checkpoint({"step": 3, "model": {}}, path)
    assert load_checkpoint(path)["step"] == 3  # no required keys: any dict
    with pytest.raises(ValueError, match=r"lacks config, optimizers, loader, swa, qat, ema, looping, elapsed_ms, rng \(it has step, model\)") as err:
        load_checkpoint(path, required_keys=TRAINING_STATE_KEYS)
    assert one_line(str(err.value))
    write_raw_checkpoint(path, b"\x80\x02garbage that is no pickle")
    with pytest.raises(ValueError, match="refused by a weights-only load") as err:
        load_checkpoint(path)
    assert one_line(str(err.value))


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 1, "w": torch.zeros(10)}, path)

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match=r"could not write .*checkpoint\.pt: No space left on device") as err:
        save_checkpoint({"step": 2, "w": torch.ones(10)}, path)
    assert one_line(str(err.value))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left
