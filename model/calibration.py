"""GPTQ's calibration on the training clock (FRONTIER.md section 4, issue 16).

The Hessians come from training data, so reading it belongs inside the training budget: the run
rehearses the calibration before the clock starts (same batches' shapes, same model size, so the
same cost), reserves what it took (GPTQ_RESERVE_SECONDS is then a floor, not a guess), stops
training that much early, and calibrates on the batches that come next after the last step. The
record reserves 0.5 s for about 4.7 s of Hessians (its section 7 calls that a rule risk).

Each batch is one loader batch cut into rows of TRAIN_SEQ_LEN (98,304 tokens = the record's 48
rows of 2048), run causally across documents (no cu_seqlens) in eval mode with the loop on, as
the record's calibration forward runs.
"""
import dataclasses
import time

import torch

from model.config import Config
from model.export import gptq_names
from model.gptq import collect_hessians
from model.precision import autocast

# The reserve is this much more than the warm rehearsal: run-to-run noise of the same work (a busy
# page cache, the GPU's clocks), so that the calibration after the last step fits in it.
RESERVE_MARGIN = 1.1


def calibration_batches(loader, cfg: Config, device) -> list[torch.Tensor]:
    """GPTQ_CALIBRATION_BATCHES loader batches, each as token rows [*, TRAIN_SEQ_LEN]."""
    micro_tokens = cfg.train_batch_tokens // cfg.grad_accum_total
    batches = []
    for _ in range(cfg.gptq_calibration_batches):
        x, *_ = loader.next_batch(micro_tokens, cfg.train_seq_len, device)
        batches.append(x.reshape(-1, cfg.train_seq_len))
    return batches


def calibrate(model, loader, cfg: Config, device) -> tuple[dict[str, torch.Tensor], float]:
    """({weight name: H}, seconds, reading the batches included) for every matrix GPTQ quantises,
    from the loader's next batches, the model looped when the config loops (then put back)."""
    t0, looping = time.perf_counter(), model.looping
    model.looping = cfg.num_loops > 0
    try:
        names = gptq_names(model.state_dict(), fp32_names=model.control_tensor_names())
        with autocast(torch.device(device)):
            hessians, _ = collect_hessians(model, calibration_batches(loader, cfg, device), names)
    finally:
        model.looping = looping
    return hessians, time.perf_counter() - t0


def rehearse(model, loader, cfg: Config, device) -> float:
    """Seconds a calibration takes (reading the batches included) on a warm device, as after the
    last step: the first of two runs compiles and autotunes the kernels at the calibration's
    shapes (tens of seconds on a fresh process, which would come off training), the second is
    timed. The loader is put back where it was each time, so training sees the same data."""
    saved = loader.state_dict()
    seconds = None
    for _ in range(2):
        _, seconds = calibrate(model, loader, cfg, device)
        loader.load_state_dict(saved)
    return seconds


def with_measured_reserve(cfg: Config, rehearsal_seconds: float) -> Config:
    """cfg with GPTQ_RESERVE_SECONDS raised to RESERVE_MARGIN x the rehearsal (never lowered)."""
    reserve = max(cfg.gptq_reserve_seconds, RESERVE_MARGIN * rehearsal_seconds)
    return dataclasses.replace(cfg, gptq_reserve_seconds=round(reserve, 3))
