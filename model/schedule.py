"""The schedules: the LR scale, Muon's momentum warm-up, the training fraction, the loop switch
and the stop.

SPEC.md "Training recipe": a constant LR, then a linear warmdown over the last WARMDOWN_ITERS
steps' worth of wall-clock time, reaching 0 at the cap. FRONTIER.md section 3 "Schedule" (on when
WARMDOWN_FRAC > 0): the training fraction frac = elapsed training ms / the budget, where the budget
is the cap less GPTQ_RESERVE_SECONDS (600 s - 0.5 s = 599,500 ms), or frac = step / ITERATIONS
without a cap; lr_scale = 1 while frac < 1 - WARMDOWN_FRAC, else max((1 - frac) / WARMDOWN_FRAC,
MIN_LR). The same fraction turns on the depth recurrence (ENABLE_LOOPING_AT); training stops after
the step where the elapsed time reaches the budget.
"""
from model.config import Config


def training_budget_ms(cfg: Config) -> float:
    """Milliseconds of training allowed: the wall-clock cap less the time reserved for GPTQ."""
    budget = 1000.0 * cfg.max_wallclock_seconds - 1000.0 * cfg.gptq_reserve_seconds
    if budget <= 0:
        raise ValueError(f"GPTQ_RESERVE_SECONDS={cfg.gptq_reserve_seconds} leaves no training time under "
                         f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds}; reserve less than the cap")
    return budget


def training_fraction(step: int, elapsed_ms: float, cfg: Config) -> float:
    """How far training is, read at the start of `step` after `elapsed_ms` of training: the share of
    the wall-clock budget spent, or of ITERATIONS done without a cap. May pass 1 at the last step."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / training_budget_ms(cfg)
    return step / cfg.iterations


def lr_scale(step: int, elapsed_ms: float, cfg: Config) -> float:
    """Multiplier on every base LR at `step` after `elapsed_ms` of training.

    With WARMDOWN_FRAC > 0, FRONTIER.md's fraction schedule (module docstring). Otherwise SPEC's:
    with a wall-clock cap the warmdown covers the last `warmdown_iters` steps' worth of time, the
    step time estimated online as elapsed/step, so the LR reaches 0 when the cap is hit whatever
    the machine's speed; without a cap it covers the last `warmdown_iters` of `iterations` steps.
    """
    if cfg.warmdown_frac > 0:
        frac = training_fraction(step, elapsed_ms, cfg)
        if frac < 1.0 - cfg.warmdown_frac:
            return 1.0
        return max((1.0 - frac) / cfg.warmdown_frac, cfg.min_lr)
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds > 0:
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = cfg.warmdown_iters * step_ms
        remaining_ms = max(cfg.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
        scale = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    else:
        warmdown_start = max(cfg.iterations - cfg.warmdown_iters, 0)
        scale = 1.0 if step < warmdown_start else max(cfg.iterations - step, 0) / cfg.warmdown_iters
    return max(scale, cfg.min_lr)


def muon_momentum(step: int, cfg: Config) -> float:
    """Linear warm-up of Muon's momentum from its start value to its final value."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def looping_on(was_on: bool, frac: float, cfg: Config) -> bool:
    """Whether the step starting at training fraction `frac` runs the depth recurrence: it turns on at
    the first step with frac >= ENABLE_LOOPING_AT and stays on (`was_on`: the previous step's answer)."""
    return cfg.num_loops > 0 and (was_on or frac >= cfg.enable_looping_at)


def time_is_up(elapsed_ms: float, cfg: Config) -> bool:
    """Stop after the step where the training time reaches the budget (the cap less GPTQ's reserve)."""
    return cfg.max_wallclock_seconds > 0 and elapsed_ms >= training_budget_ms(cfg)
