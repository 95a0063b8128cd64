"""The stop decision read one step late (model.distributed.AgreedLater and train.py's loop): the ranks
agree on a step's flags while the next step runs, and the wall-clock stop lands at most one step
after the step that reached the cap (exactly on it when the loop pauses there anyway). Two ranks
agreeing: tests/test_grad_sync.py (its ranks are spawned once for all its checks)."""
import torch

import kernels
import model.training
import train
from model.config import load_config
from model.distributed import AgreedLater, Dist
from model.runlog import RunLog
from model.training import build_training_state
from tests.fakes import CountingBatches

TINY = ["--preset", "smoke", "--num_layers", "2", "--model_dim", "32", "--num_heads", "2", "--num_kv_heads", "1",
        "--rope_dims", "8", "--xsa_last_n", "1", "--ve_layers", "1", "--bigram_vocab_size", "31", "--bigram_dim", "8",
        "--ve_dim", "8", "--vocab_size", "64", "--train_seq_len", "16", "--train_batch_tokens", "64",
        "--grad_accum_total", "2", "--warmup_steps", "0", "--late_qat_threshold", "0", "--swa_enabled", "0",
        "--val_loss_every", "0"]
STEP_S = 0.125  # exact in binary
CAP_STEPS = 13


def test_one_rank_returns_the_previous_posts_flags():
    agreement = AgreedLater("cpu")
    assert agreement.post(False, False) is None  # nothing posted before
    assert agreement.post(True, False) == (False, False)
    assert agreement.now() == (True, False)  # the pending one, read at once
    assert agreement.now() is None and agreement.post(False, True) is None


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def run_to_the_cap(tmp_path, monkeypatch, *settings) -> tuple[int, float, list[str]]:
    """Trainer.run() with steps of STEP_S on a fake clock against a cap of CAP_STEPS steps; returns
    the steps taken, the training time and the log lines."""
    cfg, _ = load_config([*TINY, "--iterations", "100", "--max_wallclock_seconds", str(CAP_STEPS * STEP_S), *settings],
                         environ={})
    fake = FakeTime()
    monkeypatch.setattr(model.training, "time", fake)

    def step(state, scale, momentum):
        fake.now += STEP_S
        return torch.zeros(())

    monkeypatch.setattr(train, "training_step", step)
    with kernels.use_backend("reference"):
        state = build_training_state(cfg, Dist.single(), CountingBatches(cfg.vocab_size))
        log = RunLog(str(tmp_path / "run"), is_main=True)
        train.Trainer(state, log, validate=lambda *args: None).run()
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    return state.step, state.clock.elapsed_ms, lines


def test_the_cap_stops_the_run_at_most_one_step_late(tmp_path, monkeypatch):
    steps, elapsed_ms, lines = run_to_the_cap(tmp_path, monkeypatch, "--train_log_every", "1000")
    cap_ms = CAP_STEPS * STEP_S * 1000
    assert steps == CAP_STEPS + 1 and cap_ms <= elapsed_ms <= cap_ms + STEP_S * 1000  # read one step later
    assert any(line.endswith(f"stopping at step {CAP_STEPS + 1}: the 2s wall-clock cap is reached") for line in lines)


def test_the_cap_is_exact_when_the_loop_pauses_at_it_anyway(tmp_path, monkeypatch):
    steps, elapsed_ms, _ = run_to_the_cap(tmp_path, monkeypatch, "--train_log_every", str(CAP_STEPS))
    assert steps == CAP_STEPS and elapsed_ms == CAP_STEPS * STEP_S * 1000
