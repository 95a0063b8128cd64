"""GPTQ's calibration on the training clock (model/calibration.py): the rehearsal is timed warm and
leaves the loader where it was; the reserve is the margin times the rehearsal, never below the floor."""
import dataclasses

import pytest

from model import calibration
from model.config import Config


class CountingLoader:
    """A loader whose state is how many batches it has handed out."""

    def __init__(self):
        self.served = 0

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]


def test_the_rehearsal_times_the_second_of_two_calibrations_and_puts_the_loader_back(monkeypatch):
    loader, times = CountingLoader(), iter([30.0, 4.0])  # a cold first call (compiling, autotuning), then warm

    def calibrate(model, loader_, cfg, device):
        assert loader_.served == 0  # each calibration reads the batches training will read next
        loader_.served += cfg.gptq_calibration_batches
        return {}, next(times)

    monkeypatch.setattr(calibration, "calibrate", calibrate)
    cfg = Config(gptq_calibration_batches=3)
    assert calibration.rehearse(object(), loader, cfg, "cpu") == 4.0
    assert loader.served == 0 and next(times, None) is None


@pytest.mark.parametrize("floor, rehearsal, reserve", [(0.5, 4.0, 4.4), (10.0, 4.0, 10.0)])
def test_the_reserve_is_the_margin_times_the_rehearsal_never_below_the_setting(floor, rehearsal, reserve):
    cfg = dataclasses.replace(Config(), gptq_reserve_seconds=floor)
    assert calibration.with_measured_reserve(cfg, rehearsal).gptq_reserve_seconds == pytest.approx(reserve)
