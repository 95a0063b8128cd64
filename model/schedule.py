"""SPEC's schedules: the LR scale (constant, then a linear warmdown measured in wall-clock time
against the cap) and Muon's momentum warm-up."""
from model.config import Config


def lr_scale(step: int, elapsed_ms: float, cfg: Config) -> float:
    """Multiplier on every base LR at `step` after `elapsed_ms` of training.

    With a wall-clock cap the warmdown covers the last `warmdown_iters` steps' worth of time, the
    step time estimated online as elapsed/step, so the LR reaches 0 when the cap is hit whatever
    the machine's speed. Without a cap it covers the last `warmdown_iters` of `iterations` steps.
    """
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds > 0:
        step_ms = elapsed_ms / max(step, 1)
        warmdown_ms = cfg.warmdown_iters * step_ms
        remaining_ms = max(cfg.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    warmdown_start = max(cfg.iterations - cfg.warmdown_iters, 0)
    if step < warmdown_start:
        return 1.0
    return max(cfg.iterations - step, 0) / cfg.warmdown_iters


def muon_momentum(step: int, cfg: Config) -> float:
    """Linear warm-up of Muon's momentum from its start value to its final value."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def time_is_up(elapsed_ms: float, cfg: Config) -> bool:
    return cfg.max_wallclock_seconds > 0 and elapsed_ms >= cfg.max_wallclock_seconds * 1000.0
