"""The LR schedule (wall-clock and step warmdown), Muon momentum warm-up and Tight SWA."""
import dataclasses

import pytest
import torch

from model.config import Config
from model.schedule import lr_scale, muon_momentum, time_is_up
from model.swa import WeightAverage


def test_wallclock_warmdown_ends_at_the_cap():
    cfg = Config()  # 600 s cap, warmdown over the last 3000 steps' worth of time
    # At 100 ms/step the warmdown covers the last 300 s.
    assert lr_scale(1000, 100_000.0, cfg) == 1.0
    assert lr_scale(3000, 300_000.0, cfg) == pytest.approx(1.0)
    assert lr_scale(4500, 450_000.0, cfg) == pytest.approx(0.5)
    assert lr_scale(5900, 590_000.0, cfg) == pytest.approx(10 / 300)
    assert lr_scale(6000, 600_000.0, cfg) == 0.0
    # A slower machine (200 ms/step) starts its warmdown earlier in wall-clock terms.
    assert lr_scale(1500, 300_000.0, cfg) == pytest.approx(0.5)
    assert not time_is_up(599_999.0, cfg) and time_is_up(600_000.0, cfg)


def test_step_warmdown_without_cap():
    cfg = dataclasses.replace(Config(), max_wallclock_seconds=0, iterations=100, warmdown_iters=40)
    assert [lr_scale(s, 0.0, cfg) for s in (0, 59, 60, 80, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert not time_is_up(1e12, cfg)
    assert lr_scale(10, 0.0, dataclasses.replace(cfg, warmdown_iters=0)) == 1.0


def test_momentum_warmup():
    cfg = Config()
    assert muon_momentum(0, cfg) == pytest.approx(0.92)
    assert muon_momentum(750, cfg) == pytest.approx(0.955)
    assert muon_momentum(1500, cfg) == pytest.approx(0.99)
    assert muon_momentum(10_000, cfg) == pytest.approx(0.99)


def test_swa_is_the_mean_of_snapshots_in_each_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Embedding(5, 2).to(torch.bfloat16))
    swa = WeightAverage()
    assert not swa.apply(model)  # nothing collected: weights untouched
    snapshots = []
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p.float()))
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        swa.add(model)
    assert swa.apply(model) and swa.count == 3
    for name, value in model.state_dict().items():
        mean = sum(s[name].float() for s in snapshots) / 3
        assert value.dtype == snapshots[0][name].dtype
        torch.testing.assert_close(value, mean.to(value.dtype))
    restored = WeightAverage()
    restored.load_state_dict(swa.state_dict())
    assert restored.count == 3 and restored.sums.keys() == swa.sums.keys()
