"""What a training run is made of: its state (model, optimizers, loader, weight average, step and
training time), the one optimizer step, the warm-up, and the clock. train.py tells the run's
story with these; bench/step.py times the same `training_step` on the same built state."""
import copy
import dataclasses
import time

import torch

from kernels._launch import INTERPRET
from model.checkpoint import restore_rng_states, rng_states
from model.config import Config
from model.distributed import Dist, synchronize
from model.ema import ExponentialMovingAverage
from model.gpt import GPT, CastedLinear
from model.grad_sync import COMM_DTYPES, GradientSync
from model.optim import build_optimizers, set_schedule
from model.precision import autocast
from model.schedule import muon_momentum
from model.shard_plan import ShardPlan
from model.swa import WeightAverage

# The profiler range around the optimizer phase of a step (bench/step.py attributes its kernels to it).
OPTIMIZER_RANGE = "training_step: optimizer"
# Per-group optimizer entries that the schedule rewrites every step: never a setting to keep.
SCHEDULED = ("lr", "momentum")


class ResumeRefused(ValueError):
    """A checkpoint that cannot continue this run; the message says why in one line."""


def muon_compute_dtype() -> torch.dtype:
    """SPEC's bf16 Newton-Schulz; fp32 where the kernels run in Triton's interpreter (the CPU tests),
    whose triton-vs-reference comparisons and stored loss curves hold fp32 tolerances."""
    return torch.float32 if INTERPRET else torch.bfloat16


class TrainingClock:
    """Milliseconds of training: it runs only between start() and pause(), so validation,
    checkpoints and logging do not count. pause() waits for the device first."""

    def __init__(self, device: torch.device, elapsed_ms: float = 0.0):
        self.device, self.banked_ms, self.started = device, elapsed_ms, None

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def pause(self) -> float:
        synchronize(self.device)
        self.banked_ms = self.elapsed_ms
        self.started = None
        return self.banked_ms

    @property
    def elapsed_ms(self) -> float:
        """Training time so far; while running, read without waiting for the device."""
        running = 0.0 if self.started is None else 1000.0 * (time.perf_counter() - self.started)
        return self.banked_ms + running


@dataclasses.dataclass
class TrainingState:
    """Everything a step changes, and what a checkpoint holds: model (and its compiled forward),
    optimizers, loader, weight average, step count and training time; on several ranks the
    gradient averaging (model/grad_sync.py), None on one."""
    cfg: Config
    ctx: Dist
    model: GPT
    train_model: torch.nn.Module
    optimizers: list
    loader: object  # next_batch(tokens, seq_len, device), state_dict(), load_state_dict()
    swa: WeightAverage
    clock: TrainingClock
    step: int = 0
    grad_sync: GradientSync | None = None
    ema: ExponentialMovingAverage | None = None  # EMA_DECAY > 0: what is evaluated and exported

    @property
    def accum(self) -> int:
        return self.cfg.grad_accum_steps(self.ctx.world_size)

    @property
    def qat(self) -> bool:
        """The model's own switch (GPT.set_qat), read back rather than mirrored."""
        return any(m.qat for m in self.model.modules() if isinstance(m, CastedLinear))

    def state_dict(self) -> dict:
        """On several ranks a collective (Muon gathers its sharded momentum): every rank calls it."""
        return {
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "loader": self.loader.state_dict(),
            "swa": self.swa.state_dict(),
            "qat": self.qat,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "looping": self.model.looping,
            "step": self.step,
            "elapsed_ms": self.clock.elapsed_ms,
            "rng": rng_states(),
        }

    def check_resumable(self, state: dict, source: str = "checkpoint") -> None:
        """ResumeRefused, one line, unless `state` holds this model's function, weights (names and
        shapes) and optimizers: checked before the warm-up spends minutes compiling."""
        if not isinstance(state.get("config"), dict):
            raise ResumeRefused(f"{source} holds no config dict; resume from a checkpoint.pt this train.py wrote")
        different = self.cfg.model_differences(state["config"])
        if different:
            raise ResumeRefused(f"{source} was made with another model ({', '.join(different)}); "
                                f"resume with the settings it was trained with")
        mine, theirs = self.model.state_dict(), state["model"]
        if not isinstance(theirs, dict) or set(theirs) != set(mine) or any(
                not isinstance(theirs[k], torch.Tensor) or theirs[k].shape != v.shape for k, v in mine.items()):
            raise ResumeRefused(f"{source} holds other model weights than this model's (names or shapes differ); "
                                f"resume from a checkpoint.pt this train.py wrote for this model")
        optimizers = state["optimizers"]
        if not isinstance(optimizers, list) or [len(o.get("param_groups", ())) if isinstance(o, dict) else -1
                                                for o in optimizers] != [len(o.param_groups) for o in self.optimizers]:
            raise ResumeRefused(f"{source} holds other optimizers than this run's {len(self.optimizers)}; "
                                f"resume from a checkpoint.pt this train.py wrote")

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> list[str]:
        """Continue from `state` (check_resumable first). The optimizers keep this run's settings
        (learning rates, weight decays, betas, eps, Newton-Schulz dtype and steps) and take only
        their state. Returns the settings kept where the state differs."""
        self.check_resumable(state, source)
        self.model.load_state_dict(state["model"])
        kept = []
        for i, (opt, saved) in enumerate(zip(self.optimizers, state["optimizers"], strict=True)):
            kept += _load_optimizer_state(opt, saved, f"optimizer {i}")
        self.loader.load_state_dict(state["loader"])
        self.swa.load_state_dict(state["swa"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ResumeRefused(f"{source} holds no EMA of the weights, which EMA_DECAY={self.cfg.ema_decay} needs; "
                                    f"resume with the EMA_DECAY it was trained with")
            self.ema.load_state_dict(state["ema"])
        self.model.looping = bool(state["looping"])
        self.model.set_qat(state["qat"])
        self.step = state["step"]
        self.clock = TrainingClock(self.ctx.device, state["elapsed_ms"])
        restore_rng_states(state["rng"])
        return kept


def _load_optimizer_state(opt: torch.optim.Optimizer, saved: dict, label: str) -> list[str]:
    """opt.load_state_dict(saved) with opt's own group settings: only the per-parameter state
    (momentum buffers, Adam moments, step counts) comes from `saved`."""
    current = opt.state_dict()
    kept = [f"{label} {key}: {group[key]!r} (the checkpoint had {old[key]!r})"
            for group, old in zip(current["param_groups"], saved["param_groups"], strict=True)
            for key in group if key not in SCHEDULED + ("params",) and key in old and old[key] != group[key]]
    groups = [{**group, "params": old["params"]} for group, old in zip(current["param_groups"], saved["param_groups"])]
    opt.load_state_dict({"state": saved["state"], "param_groups": groups})
    return kept


def build_training_state(cfg: Config, ctx: Dist, loader, grad_comm_dtype: torch.dtype | None = None) -> TrainingState:
    """The model (seeded), its compiled forward, SPEC's three optimizers, and a fresh weight average
    and clock. On several ranks, no DDP: Muon's matrices are sharded over the ranks by a ShardPlan
    and a GradientSync averages the gradients in grad_comm_dtype (default GRAD_COMM: bf16, or fp32: exact)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(ctx.device)
    compiled = torch.compile(model, fullgraph=True) if cfg.compile else model
    optimizers = build_optimizers(model, cfg, muon_compute_dtype())
    grad_sync = None
    if ctx.enabled:
        muon = optimizers[0]
        plan = ShardPlan([group["params"] for group in muon.param_groups], ctx.world_size, ctx.rank)
        muon.shard(plan)
        small = [p for opt in optimizers[1:] for group in opt.param_groups for p in group["params"]]
        grad_sync = GradientSync(plan, small, grad_comm_dtype or COMM_DTYPES[cfg.grad_comm])
    ema = ExponentialMovingAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return TrainingState(cfg, ctx, model, compiled, optimizers, loader, WeightAverage(), TrainingClock(ctx.device),
                         grad_sync=grad_sync, ema=ema)


def training_step(state: TrainingState, lr_scale: float, momentum: float) -> torch.Tensor:
    """One optimizer step over the rank's micro-batches (gradients averaged over ranks as the last
    backward finishes them); returns the rank's mean loss as a device tensor (no host sync)."""
    cfg, ctx, accum, sync = state.cfg, state.ctx, state.accum, state.grad_sync
    micro_tokens = cfg.train_batch_tokens // cfg.grad_accum_total  # per rank per micro-batch
    total = torch.zeros((), device=ctx.device)
    for micro in range(accum):
        # (x, y), or (x, y, cu_seqlens) from the document loader (DOC_ISOLATED_ATTENTION)
        x, y, *segments = state.loader.next_batch(micro_tokens, cfg.train_seq_len, ctx.device)
        if sync is not None and micro == accum - 1:
            sync.arm()  # this backward's finished gradients go to the other ranks as they come
        with autocast(ctx.device):
            loss = state.train_model(x, y, *segments)
        (loss / accum).backward()
        total += loss.detach()
    with torch.profiler.record_function(OPTIMIZER_RANGE):
        set_schedule(state.optimizers, lr_scale, momentum)
        if sync is not None:
            sync.finish()
        # clips the rank-averaged gradient; the 1.0611 record clips each rank's own before averaging (one GPU: the same)
        if cfg.grad_clip_norm > 0:
            if sync is None:
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip_norm)
            else:
                sync.clip_grad_norm_(cfg.grad_clip_norm)
        for opt in state.optimizers:
            opt.step()
        for opt in state.optimizers:
            opt.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update()
    return total / accum


# cu_seqlens lengths the warm-up runs (the document loader pads to multiples of 64), as FRONTIER.md
# section 3 primes them: torch.compile specialises on the first length it meets and, meeting a
# second, recompiles with the length dynamic (automatic dynamic shapes), so after these no length
# compiles again inside the timed run (a 98,304-token row of FineWeb holds about 100 documents).
PRIMED_SEGMENT_COUNTS = (64, 128, 192, 256)


def warm_up(state: TrainingState) -> float:
    """Compile and prime every graph the run needs, then put the state back through
    load_state_dict, so the warm-up does not count (nor leaves a trace: weights, optimizer state,
    EMA, loader, loop flag). Returns the seconds it took.

    The graphs: the plain one first (the run starts with it), then from half-way the late-QAT one
    (SPEC), or with FRONTIER's recurrence WARMUP_STEPS plain steps and as many looped ones (one
    graph per value of `model.looping`), and with document isolation one forward and backward per
    cu_seqlens length in PRIMED_SEGMENT_COUNTS and loop state, so no recompilation falls inside
    the timed run."""
    cfg = state.cfg
    if cfg.warmup_steps <= 0:
        return 0.0
    saved = copy.deepcopy(state.state_dict())
    loops = cfg.num_loops > 0
    steps = 2 * cfg.warmup_steps if loops else cfg.warmup_steps  # FRONTIER: 20 unlooped, then 20 looped
    second_half = max(1, steps // 2)  # one step primes only the plain graph
    qat_from = second_half if cfg.late_qat_threshold > 0 else steps
    loop_from = cfg.warmup_steps if loops else steps
    t0 = time.perf_counter()
    for step in range(steps):
        state.model.set_qat(step >= qat_from)
        state.model.looping = step >= loop_from
        training_step(state, 1.0, muon_momentum(0, cfg))
    if cfg.doc_isolated_attention:
        _prime_segment_counts(state)
    synchronize(state.ctx.device)
    state.load_state_dict(saved, "the warm-up's snapshot")
    return time.perf_counter() - t0


def _prime_segment_counts(state: TrainingState) -> None:
    """Forward and backward on one real batch with cu_seqlens of every primed length (row starts,
    then the end repeated: empty segments), in each loop state; the gradients are dropped."""
    cfg, ctx = state.cfg, state.ctx
    x, y, *_ = state.loader.next_batch(cfg.train_batch_tokens // cfg.grad_accum_total, cfg.train_seq_len, ctx.device)
    B, T = x.shape
    for looping in (False, True) if cfg.num_loops > 0 else (False,):
        state.model.looping = looping
        for count in PRIMED_SEGMENT_COUNTS:
            if count < B + 1:
                continue  # the loader's offsets always hold every row start
            cu_seqlens = torch.full((count,), B * T, dtype=torch.int32, device=ctx.device)
            cu_seqlens[: B + 1] = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=ctx.device)
            with autocast(ctx.device):
                loss = state.train_model(x, y, cu_seqlens)
            loss.backward()
    for opt in state.optimizers:
        opt.zero_grad(set_to_none=True)
