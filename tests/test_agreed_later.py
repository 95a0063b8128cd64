"""The decisions agreed one step late (model.distributed.AgreedLater and train.py's loop): the ranks
agree on a step's flags while the next step runs, so train.py posts flags that look one step ahead
(the clock plus the mean step time). With a steady step time the wall-clock stop lands on the
first step that reaches the cap and the depth recurrence starts at the first step whose fraction
reaches ENABLE_LOOPING_AT, on the CPU (a step is done when it returns) and on an emulated GPU
(the host one step ahead of the device). Two ranks agreeing: tests/test_grad_sync.py (its ranks
are spawned once for all its checks)."""
import pytest
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
    assert agreement.lag == 0  # on the CPU a step is done when it returns
    assert agreement.post(lambda: (False, False)) is None  # nothing posted before
    assert agreement.post(lambda: (True, False)) == (False, False)
    # a pause drops the pending flags, agrees on its own at once and on those the next post returns
    assert agreement.now(lambda: (False, True), lambda: (True, True)) == (False, True)
    assert agreement.post(lambda: (False, False)) == (True, True)


def test_the_flags_are_read_after_the_wait_for_the_step_before(monkeypatch):
    events = []
    monkeypatch.setattr(AgreedLater, "_start", lambda self, flags: (torch.tensor(flags), lambda: events.append("wait")))
    agreement = AgreedLater("cpu")
    agreement.post(lambda: events.append("flags 0") or (0,))
    agreement.post(lambda: events.append("flags 1") or (1,))
    assert events == ["flags 0", "wait", "flags 1"]


class FakeDevice:
    """A fake clock and device queue: each queued step takes its seconds of device time. On the CPU
    a step runs when it is queued; on the emulated GPU it runs when the host waits for it (an
    agreement's event, or a synchronisation), so a clock read between waits lags the queue."""

    def __init__(self, gpu: bool):
        self.gpu, self.now, self.durations, self.done = gpu, 100.0, [], 0

    @property
    def queued(self) -> int:
        return len(self.durations)

    def perf_counter(self) -> float:
        return self.now

    def queue(self, seconds: float) -> None:
        self.durations.append(seconds)
        if not self.gpu:
            self.finish(self.queued)

    def finish(self, upto: int) -> None:
        while self.done < upto:
            self.now += self.durations[self.done]
            self.done += 1


def run_to_the_cap(tmp_path, monkeypatch, gpu: bool, *settings, looped_s: float = STEP_S) -> tuple[int, float, list[bool], list[str]]:
    """Trainer.run() on a fake clock and device, steps of STEP_S (looped ones: looped_s), against a
    cap of CAP_STEPS x STEP_S; returns the steps taken, the training time, whether each step ran
    looped, and the log."""
    cfg, _ = load_config([*TINY, "--iterations", "100", "--max_wallclock_seconds", str(CAP_STEPS * STEP_S),
                          "--num_loops", "1", "--loop_start", "0", "--loop_end", "0", "--enable_looping_at", "0.5",
                          *settings], environ={})
    device, looped = FakeDevice(gpu), []
    monkeypatch.setattr(model.training, "time", device)
    monkeypatch.setattr(model.training, "synchronize", lambda _: device.finish(device.queued))

    def step(state, scale, momentum):
        looped.append(state.model.looping)
        device.queue(looped_s if state.model.looping else STEP_S)
        return torch.zeros(())

    class EmulatedGpuAgreement(AgreedLater):
        def __init__(self, where):
            super().__init__(where)
            self.lag = 1  # the step just queued is still running when the flags are read

        def _start(self, flags):
            mark = device.queued  # the event recorded after the step just queued
            return torch.tensor([int(f) for f in flags], dtype=torch.int32), lambda: device.finish(mark)

    monkeypatch.setattr(train, "training_step", step)
    if gpu:
        monkeypatch.setattr(train, "AgreedLater", EmulatedGpuAgreement)
    with kernels.use_backend("reference"):
        state = build_training_state(cfg, Dist.single(), CountingBatches(cfg.vocab_size))
        log = RunLog(str(tmp_path / "run"), is_main=True)
        train.Trainer(state, log, validate=lambda *args: None).run()
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    return state.step, state.clock.elapsed_ms, looped, lines


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "emulated-gpu"])
@pytest.mark.parametrize("log_every", [1000, 6, CAP_STEPS], ids=["no-pause", "pause-before-the-switch", "pause-at-the-cap"])
def test_the_stop_and_the_loop_switch_land_on_their_steps(tmp_path, monkeypatch, gpu, log_every):
    """Step s starts at s x STEP_S: the recurrence is on from the first step whose fraction of the cap
    reaches 0.5 (step 7: 7/13), and the run stops after the first step ending at the cap (step 13).
    The loop pauses at steps 1-5 (they are always logged) and every log_every steps."""
    steps, elapsed_ms, looped, lines = run_to_the_cap(tmp_path, monkeypatch, gpu, "--train_log_every", str(log_every))
    assert steps == CAP_STEPS and elapsed_ms == CAP_STEPS * STEP_S * 1000
    assert looped == [False] * 7 + [True] * (CAP_STEPS - 7)
    assert any(line.endswith(f"stopping at step {CAP_STEPS}: the 2s wall-clock cap is reached") for line in lines)
    assert any(line.endswith("step:7 depth recurrence on: 3 block applications (training fraction >= ENABLE_LOOPING_AT=0.5)")
               for line in lines)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "emulated-gpu"])
def test_the_stop_lands_on_its_step_when_looped_steps_are_slower(tmp_path, monkeypatch, gpu):
    """As the frontier's (96.5 then 141 ms): looped steps take 1.5 x STEP_S, so the step time is
    estimated from the latest steps, not the run's mean. Steps 0-6 end at 7 x 0.125 = 0.875 s,
    looped steps 7-10 at 0.875 + 4 x 0.1875 = 1.625 s, the cap: the run stops after step 10."""
    steps, elapsed_ms, looped, _ = run_to_the_cap(tmp_path, monkeypatch, gpu, "--train_log_every", "1000",
                                                 looped_s=1.5 * STEP_S)
    assert steps == 11 and elapsed_ms == CAP_STEPS * STEP_S * 1000
    assert looped == [False] * 7 + [True] * 4
