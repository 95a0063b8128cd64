"""model/training.py: the state a checkpoint holds, resume keeping this run's optimizer settings,
the warm-up restoring through the same path, the clock, and the one training step."""
import copy
import dataclasses

import pytest
import torch

import kernels
import model.training
from model.config import load_config
from model.distributed import Dist
from model.training import ResumeRefused, TrainingClock, build_training_state, training_step, warm_up
from tests.fakes import CountingBatches

TINY = ["--preset", "smoke", "--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--num_kv_heads", "1",
        "--rope_dims", "8", "--xsa_last_n", "1", "--ve_layers", "1", "--bigram_vocab_size", "31", "--bigram_dim", "8",
        "--ve_dim", "8", "--vocab_size", "64", "--train_seq_len", "16", "--train_batch_tokens", "64",
        "--grad_accum_total", "2", "--warmup_steps", "2"]


@pytest.fixture(autouse=True)
def reference_kernels():
    """The loop's logic is under test here, not the kernels: the eager references are quicker on the CPU."""
    with kernels.use_backend("reference"):
        yield


def tiny_state(*extra):
    cfg, _ = load_config([*TINY, *extra], environ={})
    return build_training_state(cfg, Dist.single(), CountingBatches(cfg.vocab_size))


def test_warm_up_leaves_weights_optimizers_loader_and_qat_as_they_were():
    state = tiny_state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    warm_up(state)
    assert state.loader.position == 0 and state.step == 0 and not state.qat
    assert all(torch.equal(v, before[k]) for k, v in state.model.state_dict().items())
    assert all(not opt.state for opt in state.optimizers)


def test_state_round_trip_continues_bit_for_bit():
    a, b = tiny_state(), tiny_state()
    for _ in range(2):
        training_step(a, 1.0, 0.95)
    a.step = 2
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through a checkpoint file: nothing shared
    for state in (a, b):
        loss = training_step(state, 0.5, 0.97)
    assert torch.equal(training_step(a, 0.5, 0.97), training_step(b, 0.5, 0.97))
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert b.step == 2 and torch.isfinite(loss)


def test_resume_keeps_this_runs_learning_rates_weight_decays_and_betas():
    old = tiny_state("--matrix_lr", "0.01", "--adam_wd", "0.1", "--beta2", "0.9")
    training_step(old, 1.0, 0.95)
    new = tiny_state()
    kept = new.load_state_dict(old.state_dict())
    muon, embed, scalar = new.optimizers
    assert muon.param_groups[0]["base_lr"] == new.cfg.matrix_lr == 0.02
    assert embed.param_groups[0]["weight_decay"] == scalar.param_groups[0]["weight_decay"] == 0.04
    assert embed.param_groups[0]["betas"] == (0.9, 0.95)
    assert any("base_lr: 0.02 (the checkpoint had 0.01)" in line for line in kept), kept
    assert any("betas: (0.9, 0.95) (the checkpoint had (0.9, 0.9))" in line for line in kept), kept
    # ... while the optimizers' state (Adam moments, Muon momentum) comes from the checkpoint
    assert torch.equal(embed.state[embed.param_groups[0]["params"][0]]["exp_avg"],
                       old.optimizers[1].state[old.optimizers[1].param_groups[0]["params"][0]]["exp_avg"])


def test_resume_refuses_another_model_with_one_line():
    saved = tiny_state().state_dict()
    state = tiny_state("--logit_softcap", "20")
    with pytest.raises(ResumeRefused, match=r"LOGIT_SOFTCAP=30.0 vs 20.0") as err:
        state.load_state_dict(saved, "checkpoint x.pt")
    assert "\n" not in str(err.value)


def test_qat_is_the_models_own_switch():
    state = tiny_state()
    state.model.set_qat(True)
    assert state.qat and state.state_dict()["qat"] is True


def test_no_clipping_when_grad_clip_norm_is_zero(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    training_step(tiny_state("--grad_clip_norm", "0"), 1.0, 0.95)
    assert calls == []
    training_step(tiny_state(), 1.0, 0.95)
    assert len(calls) == 1


def test_the_clock_counts_only_between_start_and_pause(monkeypatch):
    now = [100.0]  # seconds on a fake perf_counter: the logic under test, not the machine's timing
    monkeypatch.setattr(model.training.time, "perf_counter", lambda: now[0])
    clock = TrainingClock(torch.device("cpu"), elapsed_ms=1000.0)
    assert clock.elapsed_ms == 1000.0
    clock.start()
    now[0] += 0.25
    assert clock.elapsed_ms == 1250.0  # read while running, without a pause
    assert clock.pause() == 1250.0
    now[0] += 5.0
    assert clock.elapsed_ms == 1250.0  # paused: validation and checkpoints do not count
    clock.start()
    now[0] += 0.5
    assert clock.elapsed_ms == 1750.0  # running again


def test_state_dict_holds_exactly_the_checkpoint_keys():
    from model.checkpoint import TRAINING_STATE_KEYS

    state = tiny_state()
    assert tuple(state.state_dict()) == TRAINING_STATE_KEYS
    assert state.state_dict()["config"] == dataclasses.asdict(state.cfg)
