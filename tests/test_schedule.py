"""The LR schedule (wall-clock and step warmdown), Muon momentum warm-up and Tight SWA; FRONTIER.md
section 3's fraction schedule (WARMDOWN_FRAC, MIN_LR, GPTQ_RESERVE_SECONDS), loop switch and stop."""
import dataclasses

import pytest
import torch

from model.config import Config, load_config
from model.schedule import looping_on, lr_scale, muon_momentum, time_is_up, training_fraction
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


# ----------------------------------------------------------------------------- FRONTIER.md section 3

FRONTIER_BUDGET_MS = 599_500.0  # 600 s less the 0.5 s GPTQ reserve


@pytest.fixture(scope="module")
def frontier() -> Config:
    return load_config(["--preset", "frontier"], environ={})[0]


def test_frontier_fraction_schedule_examples(frontier):
    def at(frac):
        return lr_scale(1234, frac * FRONTIER_BUDGET_MS, frontier)

    # FRONTIER.md's examples: 0.5 -> 0.588, 0.9 -> 0.118, 0.95 -> 0.10
    assert (round(at(0.5), 3), round(at(0.9), 3), at(0.95)) == (0.588, 0.118, pytest.approx(0.10))
    # constant below 1 - WARMDOWN_FRAC = 0.15, then linear from 1 ...
    assert at(0.0) == at(0.1499) == 1.0 and at(0.15) == pytest.approx(1.0)
    assert at(0.575) == pytest.approx(0.5)
    # ... down to the MIN_LR floor, reached at 0.915 and kept past the budget
    assert at(0.9149) > 0.1 + 1e-5 and at(0.915) == pytest.approx(0.1)
    assert at(0.99) == at(1.0) == at(1.2) == 0.1


def test_frontier_fraction_is_of_the_reduced_budget(frontier):
    assert training_fraction(7, FRONTIER_BUDGET_MS / 2, frontier) == 0.5
    assert not time_is_up(FRONTIER_BUDGET_MS - 1, frontier) and time_is_up(FRONTIER_BUDGET_MS, frontier)
    # SPEC's run: the budget is the whole cap, as before
    assert training_fraction(7, 300_000.0, Config()) == 0.5 and not time_is_up(599_999.0, Config())


def test_frontier_fraction_counts_steps_without_a_cap(frontier):
    cfg = dataclasses.replace(frontier, max_wallclock_seconds=0, iterations=1000)
    assert training_fraction(500, 1e12, cfg) == 0.5
    assert [round(lr_scale(s, 1e12, cfg), 3) for s in (100, 500, 900, 950)] == [1.0, 0.588, 0.118, 0.1]
    assert not time_is_up(1e12, cfg)


def test_a_reserve_that_leaves_no_time_is_refused():
    cfg = dataclasses.replace(Config(), max_wallclock_seconds=2.0, gptq_reserve_seconds=2.0)
    with pytest.raises(ValueError, match="GPTQ_RESERVE_SECONDS=2.0 leaves no training time"):
        time_is_up(0.0, cfg)


def test_loop_switch_turns_on_once_and_stays_on(frontier):
    on, history = False, []
    for frac in (0.0, 0.2, 0.3499, 0.35, 0.36, 0.9):
        on = looping_on(on, frac, frontier)
        history.append(on)
    assert history == [False, False, False, True, True, True]
    assert looping_on(True, 0.0, frontier)  # once on, a lower fraction (a resumed clock) does not turn it off
    assert not looping_on(False, 1.0, Config())  # SPEC: no recurrence at all


def test_frontier_momentum_warmup(frontier):
    assert [muon_momentum(s, frontier) for s in (0, 750, 1500, 5000)] == pytest.approx([0.92, 0.945, 0.97, 0.97])
