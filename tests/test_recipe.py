"""SPEC.md "Training recipe", checked through the real code path, independently of the stored loss curve.

A tiny model (2 layers, dim 32, vocab 64, seq 16) on the reference kernels is trained by
train.py's own `Trainer(...).run()`, with two things swapped in: model.training's clock reads a
fake `time.perf_counter` that advances by exactly STEP_MS per optimizer step (a binary-exact
number, so the wall-clock arithmetic is exact), and train.py's `training_step` is wrapped to
record, around the real step, what the recipe says must hold:

- each optimizer's param groups as its `step()` sees them (lr, betas, weight decay, momentum),
  and Muon's momentum buffers before and after, to show the scheduled momentum is the one applied;
- the loss the step computed against the loss of copies of the model with plain and with int6
  fake-quantised linear weights (written here from SPEC, not taken from kernels/), on the same batches;
- the weights after the step, from which the SWA mean is rebuilt.

What each test expects is written from SPEC, not from model/schedule.py: no LR warm-up (SPEC's 20
compile steps, 2 here, are undone), a constant LR, then a linear warmdown that reaches 0 at the cap (or at
ITERATIONS without one) on every optimizer; Muon's momentum linear from 0.92 to 0.99; late QAT
below its threshold; the mean of the snapshots taken every SWA_EVERY steps below SWA_THRESHOLD
in the returned and exported weights; the stop at the cap, with training time excluding the
pauses for validation.

Bugs planted by hand while writing these tests, each caught: set_schedule skipping the AdamW
optimizers (both warmdown tests); the Muon momentum left constant, in train.py or in set_schedule
(the momentum test); SWA averaged but not applied, or a snapshot every step (both SWA tests); late
QAT logged but never switched on, or on from the start (the QAT test); the wall-clock stop removed,
or one step late, or validation counted as training time, or the step time estimated off by one
(the stop test); an LR warm-up added, or the compile warm-up not undone (the warm-up test); the
bigram projection given to AdamW, or AdamW's beta2 at 0.999 (the groups test); the step-counted
warmdown ignored (its test).

FRONTIER.md section 3's optimizer table is checked the same way on the tiny model: --preset
frontier's optimizer settings must arrive in the groups as the table's literals. And the warm-up
leaves no trace (FRONTIER.md section 3 "Warm-up", the record's momentum leak on more than one GPU):
on 1 rank and on 2 (gloo), warm-up then steps gives the bits of the same steps without a warm-up.
"""
import copy
import os
import re
import types

import pytest
import torch
import torch.distributed as dist

import kernels
import model.training
import train
from model import export
from model.config import Config, load_config
from model.distributed import Dist, leave_process_group
from model.muon import Muon
from model.runlog import RunLog
from model.schedule import lr_scale, muon_momentum
from model.training import build_training_state, training_step, warm_up
from tests.fakes import CountingBatches
from tests.multiprocess import run_ranks

# SPEC.md "Training recipe", as literals (Config's defaults must be these, and the tiny runs use them).
SPEC_MATRIX_LR, SPEC_EMBED_LR, SPEC_SCALAR_LR = 0.025, 0.035, 0.025
SPEC_WD, SPEC_BETAS, SPEC_EPS = 0.04, (0.9, 0.95), 1e-8
SPEC_MOMENTUM_START, SPEC_MOMENTUM = 0.92, 0.99
SPEC_NS_STEPS, SPEC_NS_COEFFS = 5, (3.4445, -4.7750, 2.0315)

# The wall-clock run: 125 ms per step (exact in binary) against a 2 s cap, so the cap is reached
# after exactly CAP_STEPS steps; the warmdown covers the last WARMDOWN steps' worth of time.
STEP_MS = 125.0
CAP_STEPS = 16
WARMDOWN = 8
MOMENTUM_WARMUP = 8
QAT_THRESHOLD = 0.3  # scale (16 - s) / 8 < 0.3 from 0-based step 14: QAT for the last 2 steps
SWA_THRESHOLD, SWA_EVERY = 0.7, 2  # snapshots after steps 12, 14, 16 (scales 0.625, 0.375, 0.125)
VAL_EVERY, VAL_SECONDS = 4, 100.0  # validation that takes 100 s of wall time, paused out of training time

# The step-counted run (MAX_WALLCLOCK_SECONDS=0): 8 steps, warmdown over the last 4.
STEP_RUN_ITERATIONS, STEP_RUN_WARMDOWN = 8, 4

# Parameters of the tiny model by optimizer (SPEC: Muon for the block matrices and the bigram and VE
# projections; AdamW for the token, bigram and VE tables; AdamW for every scalar and control tensor).
BLOCK_MATRICES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight")
BLOCK_SCALARS = ("attn.q_gain", "attn_scale", "mlp_scale", "resid_mix")
EXPECTED_GROUPS = {
    "matrix": {f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_MATRICES} | {"bigram.proj.weight", "ve.proj.weight"},
    "embed": {"tok_emb.weight", "bigram.table", "ve.table"},
    "scalar": {f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_SCALARS}
              | {"bigram.scale", "smear.gate", "ve.scale", "ve.layer_scales", "skip_weights"},
}
EXPECTED_BASE_LR = {"matrix": SPEC_MATRIX_LR, "embed": SPEC_EMBED_LR, "scalar": SPEC_SCALAR_LR}


def tiny_config(**recipe) -> Config:
    """The tiny model with SPEC's optimizer settings (Config's defaults); `recipe` sets the schedule."""
    settings = dict(
        data_path="", compile=False, seed=1337,
        vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=8,
        xsa_last_n=1, bigram_vocab_size=31, bigram_dim=8, ve_dim=8, ve_layers="1",
        train_seq_len=16, train_batch_tokens=64, grad_accum_total=2, warmup_steps=2,
        train_log_every=1, val_loss_every=0, checkpoint_every=0,
    )
    return Config(**{**settings, **recipe}).validate()


class FakeTime:
    """model.training's `time`: perf_counter() reads `now` (seconds), which the test advances."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def int6_fake_quantised(w: torch.Tensor) -> torch.Tensor:
    """SPEC "Export": per-row symmetric int6, scale = row absmax / 31 in fp16 (floor 1/31), values in [-32, 31]."""
    scale = (w.float().abs().amax(dim=-1, keepdim=True) / 31).clamp_min(1 / 31).half().float()
    return (torch.round(w.float() / scale).clamp(-32, 31) * scale).to(w.dtype)


def clone_weights(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def group_kind(group: dict, names: dict) -> str:
    """Which of SPEC's three classes a param group holds ("mixed: ..." when it holds more than one)."""
    found = {names[id(p)] for p in group["params"]}
    kinds = [kind for kind, expected in EXPECTED_GROUPS.items() if found <= expected]
    return kinds[0] if len(kinds) == 1 else f"mixed: {sorted(found)}"


def mean_loss(net: torch.nn.Module, batches) -> float:
    """As training_step sums it: micro-batch losses added in order, divided by their number."""
    total = torch.zeros(())
    with torch.no_grad():
        for x, y in batches:
            total += net(x, y)
    return (total / len(batches)).item()


def instrumented_run(cfg: Config, folder: str, step_ms: float, validate_seconds: float = 0.0) -> dict:
    """Trainer(state, log, validate).run() on the tiny model with the fake clock; returns what it recorded."""
    fake = FakeTime()
    record = {"steps": [], "warmup_optimizer_steps": 0, "validations": []}
    current = {"step": None}  # the loop step being recorded (None during the warm-up)
    with pytest.MonkeyPatch.context() as mp, kernels.use_backend("reference"):
        mp.setattr(model.training, "time", fake)
        state = build_training_state(cfg, Dist.single(), CountingBatches(cfg.vocab_size))
        names = {id(p): n for n, p in state.model.named_parameters()}
        record["initial"] = clone_weights(state.model)

        def recording(opt):
            original = opt.step

            def step(*args, **kwargs):
                entry = current["step"]
                if entry is None:
                    record["warmup_optimizer_steps"] += 1
                    return original(*args, **kwargs)
                before = {}
                if isinstance(opt, Muon):  # the momentum buffer and gradient each parameter enters with
                    before = {p: (opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p]
                                  else torch.zeros_like(p), p.grad.clone()) for g in opt.param_groups for p in g["params"]}
                for g in opt.param_groups:
                    entry["groups"].append(dict(kind=group_kind(g, names), optimizer=type(opt).__name__, lr=g["lr"],
                                                weight_decay=g["weight_decay"], betas=g.get("betas"), momentum=g.get("momentum")))
                result = original(*args, **kwargs)
                for p, (buffer, grad) in before.items():
                    entry["muon_buffers"].append((buffer, grad, opt.state[p]["momentum_buffer"].clone()))
                return result

            mp.setattr(opt, "step", step)

        for opt in state.optimizers:
            recording(opt)
        real_training_step = train.training_step

        def training_step(state_, scale, momentum):
            entry = dict(index=len(record["steps"]), elapsed_ms=state_.clock.elapsed_ms, groups=[], muon_buffers=[],
                         qat_switch=state_.qat)
            if entry["index"] == 0:
                entry["weights_before"] = clone_weights(state_.model)
                entry["optimizer_state_empty"] = all(not opt.state for opt in state_.optimizers)
            # the batches this step will read, and the loss of plain and int6-quantised copies of the model on them
            position = state_.loader.state_dict()
            batches = [state_.loader.next_batch(cfg.train_batch_tokens // cfg.grad_accum_total, cfg.train_seq_len, "cpu")
                       for _ in range(state_.accum)]
            state_.loader.load_state_dict(position)
            plain = copy.deepcopy(state_.model)
            plain.set_qat(False)
            quantised = copy.deepcopy(plain)
            with torch.no_grad():
                for m in quantised.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.copy_(int6_fake_quantised(m.weight))
            entry["plain_loss"], entry["quantised_loss"] = mean_loss(plain, batches), mean_loss(quantised, batches)
            current["step"] = entry
            try:
                loss = real_training_step(state_, scale, momentum)
            finally:
                current["step"] = None
            entry["loss"] = loss.item()
            entry["weights_after"] = clone_weights(state_.model)
            record["steps"].append(entry)
            fake.now += step_ms / 1000.0
            return loss

        mp.setattr(train, "training_step", training_step)

        def validate(net, step, train_time_ms):
            record["validations"].append((step, train_time_ms))
            fake.now += validate_seconds

        log = RunLog(folder, is_main=True)
        returned = train.Trainer(state, log, validate if cfg.val_loss_every else None).run()
        assert len(record["steps"]) > 0, "Trainer.loop did not call train.training_step: the recording saw no step"
        record.update(state=state, model=returned, log=log, names=names, cfg=cfg,
                      final_elapsed_ms=state.clock.elapsed_ms, returned_weights=clone_weights(returned))
        with open(log.path("train.log")) as f:
            record["log_lines"] = f.read().splitlines()
    return record


def wallclock_scale(s: int) -> float:
    """SPEC: constant, then linear to 0 over the last WARMDOWN steps' worth of time before the cap."""
    return min(1.0, (CAP_STEPS - s) / WARMDOWN)


def step_count_scale(s: int) -> float:
    """Without a cap: constant, then linear to 0 at ITERATIONS over the last WARMDOWN steps."""
    return min(1.0, (STEP_RUN_ITERATIONS - s) / STEP_RUN_WARMDOWN)


def spec_momentum(s: int) -> float:
    frac = min(s / MOMENTUM_WARMUP, 1.0)
    return (1 - frac) * SPEC_MOMENTUM_START + frac * SPEC_MOMENTUM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matrices are tiny: on a shared, busy CPU, intra-op threads spin against other processes
    and a 32 x 32 Newton-Schulz takes 70 ms instead of 0.3 ms. One thread keeps the module to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wallclock_run(tmp_path_factory):
    cfg = tiny_config(iterations=CAP_STEPS + 8, max_wallclock_seconds=CAP_STEPS * STEP_MS / 1000.0,
                      warmdown_iters=WARMDOWN, muon_momentum_warmup_steps=MOMENTUM_WARMUP,
                      late_qat_threshold=QAT_THRESHOLD, swa_enabled=True, swa_threshold=SWA_THRESHOLD,
                      swa_every=SWA_EVERY, val_loss_every=VAL_EVERY)
    return instrumented_run(cfg, str(tmp_path_factory.mktemp("wallclock")), STEP_MS, validate_seconds=VAL_SECONDS)


@pytest.fixture(scope="module")
def step_count_run(tmp_path_factory):
    cfg = tiny_config(iterations=STEP_RUN_ITERATIONS, max_wallclock_seconds=0, warmdown_iters=STEP_RUN_WARMDOWN,
                      late_qat_threshold=0, swa_enabled=False)
    # 1000 s per step: far beyond any cap, which must not apply when MAX_WALLCLOCK_SECONDS=0
    return instrumented_run(cfg, str(tmp_path_factory.mktemp("steps")), 1_000_000.0)


# --------------------------------------------------------------------------- optimizer groups

def test_spec_recipe_numbers_are_the_config_defaults():
    cfg = Config()
    assert (cfg.matrix_lr, cfg.tied_embed_lr, cfg.scalar_lr) == (SPEC_MATRIX_LR, SPEC_EMBED_LR, SPEC_SCALAR_LR)
    assert (cfg.muon_wd, cfg.adam_wd, (cfg.beta1, cfg.beta2), cfg.adam_eps) == (SPEC_WD, SPEC_WD, SPEC_BETAS, SPEC_EPS)
    assert (cfg.muon_momentum_warmup_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps) == (0.92, 0.99, 1500)
    assert (cfg.warmup_steps, cfg.warmdown_iters, cfg.max_wallclock_seconds, cfg.grad_clip_norm) == (20, 3000, 600.0, 0.3)
    assert (cfg.swa_enabled, cfg.swa_threshold, cfg.swa_every, cfg.late_qat_threshold) == (True, 0.2, 50, 0.1)


def test_every_parameter_is_in_exactly_one_optimizer_group_with_spec_settings():
    with kernels.use_backend("reference"):
        state = build_training_state(tiny_config(), Dist.single(), CountingBatches(64))
    names = {id(p): n for n, p in state.model.named_parameters()}
    grouped = [names[id(p)] for opt in state.optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values()), "every parameter must be optimised exactly once"
    by_kind = {}
    for opt in state.optimizers:
        for g in opt.param_groups:
            by_kind.setdefault(group_kind(g, names), []).append((opt, g))
    assert set(by_kind) == set(EXPECTED_GROUPS)
    for kind, entries in by_kind.items():
        assert {names[id(p)] for _, g in entries for p in g["params"]} == EXPECTED_GROUPS[kind], kind
        for opt, g in entries:
            assert g["lr"] == g["base_lr"] == EXPECTED_BASE_LR[kind], kind
            assert g["weight_decay"] == SPEC_WD, kind
            if kind == "matrix":
                assert isinstance(opt, Muon)
                assert g["nesterov"] and g["backend_steps"] == SPEC_NS_STEPS and tuple(g["coeffs"]) == SPEC_NS_COEFFS
            else:
                assert type(opt) is torch.optim.AdamW, f"{kind}: {type(opt).__name__}"  # decoupled weight decay
                assert g["betas"] == SPEC_BETAS and g["eps"] == SPEC_EPS, kind


# FRONTIER.md section 3's optimizer table, as literals: (lr, weight decay) per group, AdamW's betas
# and eps, Muon's momentum warm-up and its five Polar-Express triples.
FRONTIER_GROUPS = {"matrix": (0.026, 0.095), "embed": (0.03, 0.085), "scalar": (0.02, 0.02)}
FRONTIER_BETAS, FRONTIER_EPS, FRONTIER_MOMENTUM = (0.9, 0.99), 1e-8, (0.92, 0.97, 1500)
FRONTIER_NS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
FRONTIER_TRAINING_FIELDS = ("matrix_lr", "tied_embed_lr", "scalar_lr", "muon_momentum", "muon_momentum_warmup_start",
                            "muon_momentum_warmup_steps", "muon_wd", "muon_row_normalize", "muon_polar_express",
                            "muon_backend_steps", "beta1", "beta2", "adam_eps", "adam_wd", "embed_wd", "grad_clip_norm")


def test_frontier_preset_reaches_the_optimizers():
    """--preset frontier's optimizer settings, on the tiny model, arrive in the groups as FRONTIER.md's table has them."""
    frontier, _ = load_config(["--preset", "frontier"], environ={})
    cfg = tiny_config(**{name: getattr(frontier, name) for name in FRONTIER_TRAINING_FIELDS})
    assert (cfg.muon_momentum_warmup_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps) == FRONTIER_MOMENTUM
    assert cfg.grad_clip_norm == 0.3
    with kernels.use_backend("reference"):
        state = build_training_state(cfg, Dist.single(), CountingBatches(64))
    names = {id(p): n for n, p in state.model.named_parameters()}
    seen = set()
    for opt in state.optimizers:
        for g in opt.param_groups:
            kind = group_kind(g, names)
            seen.add(kind)
            assert (g["base_lr"], g["weight_decay"]) == FRONTIER_GROUPS[kind], kind
            if kind == "matrix":
                assert g["nesterov"] and g["row_normalize"] and g["backend_steps"] == 5
                assert tuple(map(tuple, g["coeffs"])) == FRONTIER_NS_COEFFS
            else:
                assert (g["betas"], g["eps"]) == (FRONTIER_BETAS, FRONTIER_EPS), kind
    assert seen == set(FRONTIER_GROUPS)


def test_seed_muon_has_no_frontier_options_and_polar_express_needs_five_steps():
    state = build_training_state(tiny_config(), Dist.single(), CountingBatches(64))
    assert not state.optimizers[0].param_groups[0]["row_normalize"]
    with pytest.raises(ValueError, match="MUON_POLAR_EXPRESS=1 has 5 coefficient triples.*set MUON_BACKEND_STEPS=5"):
        build_training_state(tiny_config(muon_polar_express=True, muon_backend_steps=4), Dist.single(), CountingBatches(64))


# --------------------------------------------------------------------------- schedule on every optimizer

def assert_schedule(run: dict, scale_of_step) -> None:
    """Every param group of every optimizer, at every loop step, steps with base LR x the scale."""
    for entry in run["steps"]:
        s, expected = entry["index"], scale_of_step(entry["index"])
        assert sorted(g["kind"] for g in entry["groups"]) == ["embed", "matrix", "scalar"], (s, entry["groups"])
        for g in entry["groups"]:
            assert g["lr"] == pytest.approx(EXPECTED_BASE_LR[g["kind"]] * expected, rel=1e-12, abs=1e-15), (
                f"step {s}: the {g['kind']} group ({g['optimizer']}) stepped with lr {g['lr']}, expected "
                f"{EXPECTED_BASE_LR[g['kind']]} x {expected}")
            assert g["weight_decay"] == SPEC_WD, (s, g)  # decoupled decay: scheduled through the lr only
            if g["optimizer"] == "AdamW":
                assert g["betas"] == SPEC_BETAS, (s, g)


def test_no_lr_warmup_the_compile_warmup_is_undone(wallclock_run):
    run = wallclock_run
    cfg = run["cfg"]
    assert run["warmup_optimizer_steps"] == cfg.warmup_steps * 3  # the compile warm-up ran all three optimizers ...
    first = run["steps"][0]
    assert first["optimizer_state_empty"]  # ... and left no momentum or Adam moments behind,
    for name, value in run["initial"].items():  # nor any change to the weights,
        assert torch.equal(first["weights_before"][name], value), name
    assert not first["qat_switch"]  # nor QAT on;
    for g in first["groups"]:  # and the first real step runs at the full LR: no LR warm-up
        assert g["lr"] == EXPECTED_BASE_LR[g["kind"]], g


def test_wallclock_warmdown_on_every_optimizer(wallclock_run):
    assert len(wallclock_run["steps"]) == CAP_STEPS
    assert_schedule(wallclock_run, wallclock_scale)


def test_step_count_warmdown_on_every_optimizer_without_a_cap(step_count_run):
    run = step_count_run
    assert len(run["steps"]) == STEP_RUN_ITERATIONS  # ran to ITERATIONS although 8000 s of "time" went by
    assert_schedule(run, step_count_scale)
    assert not any("stopping at step" in line for line in run["log_lines"])
    assert lr_scale(STEP_RUN_ITERATIONS, run["final_elapsed_ms"], run["cfg"]) == 0.0


def test_frontier_fraction_schedule_and_reduced_budget_through_the_trainer(tmp_path):
    """FRONTIER.md "Schedule" through Trainer.run(): frac = elapsed / (cap - GPTQ reserve), here
    s x 125 ms / 1500 ms = s / 12; lr_scale 1 while frac < 1 - WARMDOWN_FRAC, then (1 - frac) /
    WARMDOWN_FRAC floored at MIN_LR; the stop after the step that reaches 1500 ms, not the 2 s cap."""
    warmdown_frac, min_lr = 0.5, 0.25
    cfg = tiny_config(iterations=40, max_wallclock_seconds=2.0, gptq_reserve_seconds=0.5, warmdown_frac=warmdown_frac,
                      min_lr=min_lr, late_qat_threshold=0, swa_enabled=False)
    run = instrumented_run(cfg, str(tmp_path), STEP_MS)
    assert len(run["steps"]) == 12 and run["final_elapsed_ms"] == 1500.0

    def frontier_scale(s: int) -> float:
        frac = s / 12
        return 1.0 if frac < 1 - warmdown_frac else max((1 - frac) / warmdown_frac, min_lr)

    assert [round(frontier_scale(s), 3) for s in range(6, 12)] == [1.0, 0.833, 0.667, 0.5, 0.333, 0.25]
    assert_schedule(run, frontier_scale)


# --------------------------------------------------------------------------- Muon momentum warm-up

def test_muon_momentum_warmup_is_applied_to_the_muon_group(wallclock_run):
    for entry in wallclock_run["steps"]:
        s, expected = entry["index"], spec_momentum(entry["index"])
        muon = [g for g in entry["groups"] if g["optimizer"] == "Muon"]
        assert muon and all(g["momentum"] == pytest.approx(expected, rel=1e-12) for g in muon), (s, muon, expected)
        # what the Muon step actually did with its buffers: b <- momentum * b + g
        assert entry["muon_buffers"]
        for buffer, grad, after in entry["muon_buffers"]:
            torch.testing.assert_close(after, buffer * expected + grad, rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"step {s}: momentum buffer not updated with momentum {expected}: {m}")


# --------------------------------------------------------------------------- late QAT

def test_late_qat_changes_the_training_forward_below_its_threshold(wallclock_run):
    steps = wallclock_run["steps"]
    qat_steps = [e["index"] for e in steps if wallclock_scale(e["index"]) < QAT_THRESHOLD]
    assert qat_steps == [14, 15]
    for entry in steps:
        s = entry["index"]
        quantised = s in qat_steps
        expected = entry["quantised_loss"] if quantised else entry["plain_loss"]
        other = entry["plain_loss"] if quantised else entry["quantised_loss"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-6, abs=0), (
            f"step {s}: the step's loss {entry['loss']} is not the {'int6-quantised' if quantised else 'plain'} "
            f"forward's {expected} (the other is {other})")
        if s >= 2:  # once the zero-initialised projections have moved, quantisation changes the loss visibly
            assert abs(entry["quantised_loss"] - entry["plain_loss"]) > 1e-5 * abs(entry["plain_loss"]), entry
    lines = [line for line in wallclock_run["log_lines"] if "late QAT on" in line]
    assert len(lines) == 1 and lines[0].startswith(f"step:{qat_steps[0]} "), lines
    assert not wallclock_run["model"].blocks[0].attn.c_q.qat  # the returned model is the plain function of its weights


# --------------------------------------------------------------------------- SWA

def swa_mean(run: dict) -> tuple[list[int], dict]:
    """The steps SPEC snapshots (every SWA_EVERY steps, where the step ran with scale < SWA_THRESHOLD) and their mean."""
    taken = [e["index"] + 1 for e in run["steps"]
             if (e["index"] + 1) % SWA_EVERY == 0 and wallclock_scale(e["index"]) < SWA_THRESHOLD]
    snapshots = [run["steps"][k - 1]["weights_after"] for k in taken]
    mean = {}
    for name, last in run["steps"][-1]["weights_after"].items():
        total = snapshots[0][name].float().clone()
        for snapshot in snapshots[1:]:
            total += snapshot[name].float()
        mean[name] = (total / len(snapshots)).to(last.dtype)
    return taken, mean


def test_swa_mean_is_the_returned_model(wallclock_run):
    taken, mean = swa_mean(wallclock_run)
    assert taken == [12, 14, 16]
    returned, last = wallclock_run["returned_weights"], wallclock_run["steps"][-1]["weights_after"]
    assert any(not torch.equal(mean[n], last[n]) for n in mean)  # the mean is not the last weights
    for name, expected in mean.items():
        torch.testing.assert_close(returned[name], expected, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: the returned weights are not the SWA mean of steps {taken}: {m}")
    assert any(f"swa: averaged {len(taken)} snapshots" in line for line in wallclock_run["log_lines"])


def test_swa_mean_is_what_the_artifact_holds(wallclock_run):
    run = wallclock_run
    net, cfg = run["model"], run["cfg"]
    state = types.SimpleNamespace(model=net, cfg=cfg, ctx=Dist.single())  # what SPEC's int6 export reads of the state
    path = train.export_artifact(state, run["log"])
    written = export.read_artifact(path)
    declared = dict(fp32_names=net.control_tensor_names(), int6_names=net.int6_matrix_names())
    _, mean = swa_mean(run)
    expected = export.artifact_from_bytes(export.artifact_to_bytes(mean, **declared, level=1)[0])
    of_last = export.artifact_from_bytes(export.artifact_to_bytes(run["steps"][-1]["weights_after"], **declared, level=1)[0])
    assert written.keys() == expected.keys()
    for name in expected:
        assert torch.equal(written[name], expected[name]), f"{name}: the artifact does not hold the SWA mean"
    assert any(not torch.equal(written[n], of_last[n]) for n in written)


# --------------------------------------------------------------------------- the wall-clock stop

def test_the_loop_stops_at_the_cap_with_the_warmdown_at_zero(wallclock_run):
    run, cfg = wallclock_run, wallclock_run["cfg"]
    assert run["state"].step == CAP_STEPS < cfg.iterations
    assert run["final_elapsed_ms"] == CAP_STEPS * STEP_MS == cfg.max_wallclock_seconds * 1000.0
    # validation took VAL_SECONDS of wall time each, and none of it counts as training time
    assert run["validations"] == [(k, k * STEP_MS) for k in range(VAL_EVERY, CAP_STEPS + 1, VAL_EVERY)]
    assert [e["elapsed_ms"] for e in run["steps"]] == [s * STEP_MS for s in range(CAP_STEPS)]
    # the warmdown's line reaches 0 exactly where the cap is: its last step ran at 1/WARMDOWN
    assert lr_scale(CAP_STEPS, run["final_elapsed_ms"], cfg) == 0.0
    assert [wallclock_scale(s) for s in range(CAP_STEPS - WARMDOWN, CAP_STEPS)] == [(CAP_STEPS - s) / WARMDOWN for s in range(CAP_STEPS - WARMDOWN, CAP_STEPS)]
    lines = run["log_lines"]
    stop = [i for i, line in enumerate(lines) if line.startswith("stopping at step")]
    assert len(stop) == 1 and lines[stop[0]] == f"stopping at step {CAP_STEPS}: the 2s wall-clock cap is reached", lines[-5:]
    last_step = [line for line in lines[:stop[0]] if line.startswith("step:") and "train_loss" in line][-1]
    assert re.match(rf"step:{CAP_STEPS}/{cfg.iterations} .*lr_scale:{1 / WARMDOWN:.3f} train_time:{CAP_STEPS * STEP_MS:.0f}ms",
                    last_step), last_step
    assert os.path.exists(run["log"].path("checkpoint.pt"))


# --------------------------------------------------------------------------- the warm-up leaves no trace

NO_TRACE_STEPS = 3


def steps_after(cfg: Config, ctx: Dist, warm: bool) -> dict:
    """NO_TRACE_STEPS training steps of a fresh state, with or without the compile warm-up first; the
    weights and every optimizer's state after them (Muon's momentum buffers, Adam's moments and steps)."""
    state = build_training_state(cfg, ctx, CountingBatches(cfg.vocab_size))
    if warm:
        warm_up(state)
    for s in range(NO_TRACE_STEPS):
        training_step(state, lr_scale(s, 0.0, cfg), muon_momentum(s, cfg))
    return {"model": clone_weights(state.model), "optimizers": copy.deepcopy([opt.state_dict()["state"] for opt in state.optimizers])}


def assert_same_bits(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs after the warm-up: it left a trace"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_bits(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_bits(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def no_trace_config() -> Config:
    # the frontier's Muon (momentum 0.92 -> 0.97, row normalisation, Polar-Express), with QAT flipping in the warm-up
    return tiny_config(warmup_steps=4, iterations=20, max_wallclock_seconds=0, muon_momentum=0.97,
                       muon_momentum_warmup_steps=4, muon_row_normalize=True, muon_polar_express=True)


@pytest.mark.parametrize("recipe, expected", [
    (dict(late_qat_threshold=0.15), [(False, False)] * 2 + [(True, False)] * 2),  # SPEC: QAT from half-way
    (dict(late_qat_threshold=0.0, num_loops=1, loop_start=0, loop_end=0),  # FRONTIER: 4 plain steps, 4 looped
     [(False, False)] * 4 + [(False, True)] * 4),
])
def test_the_warm_up_primes_each_graph(monkeypatch, recipe, expected):
    seen = []
    monkeypatch.setattr(model.training, "training_step",
                        lambda state, scale, momentum: seen.append((state.qat, state.model.looping)))
    with kernels.use_backend("reference"):
        state = build_training_state(tiny_config(warmup_steps=4, **recipe), Dist.single(), CountingBatches(64))
        warm_up(state)
    assert seen == expected and (state.qat, state.model.looping) == (False, False)  # and put back


def test_warm_up_leaves_no_trace_on_one_rank():
    cfg = no_trace_config()
    with kernels.use_backend("reference"):
        warmed, cold = (steps_after(cfg, Dist.single(), warm) for warm in (True, False))
    assert warmed["optimizers"][0], "Muon kept no momentum buffers: the comparison would be empty"
    assert_same_bits(warmed, cold)


def _no_trace_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = no_trace_config()
        ctx = Dist(rank, world, 0, torch.device("cpu"))
        with kernels.use_backend("reference"):
            result = {warm: steps_after(cfg, ctx, warm) for warm in (True, False)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_process_group()


@pytest.mark.slow  # two spawned processes importing torch and triton
def test_warm_up_leaves_no_trace_on_two_ranks(tmp_path):
    run_ranks(_no_trace_worker, 2, (2, str(tmp_path / "init"), str(tmp_path)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result[True]["optimizers"][0], f"rank {rank}: Muon kept no momentum buffers"
        assert_same_bits(result[True], result[False], f"rank {rank}")
