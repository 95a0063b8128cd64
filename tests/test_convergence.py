"""The whole stack on a tiny model: train.py's Trainer trains the same loss curve with the triton
and the reference backends, and the reference curve matches the one stored in tests/data.

What runs is the real thing at toy size: GPT (GQA, partial RoPE, XSA on the last block, VE on one
block, BigramHash, SmearGate, U-Net skip, soft-capped tied head), `Trainer.run()` from train.py on
model.training's state and training_step (gradient accumulation, grad-norm clipping, Muon + both AdamW groups from build_optimizers, the
step-counted warmdown, Muon's momentum warm-up, late QAT switching on part-way, Tight SWA averaged
into the final weights), on a fixed synthetic, learnable token stream written as a real shard.
fp32 on the CPU; on a machine without CUDA conftest sets TRITON_INTERPRET=1, so the triton backend
runs every kernel (attention, fake-quant, bigram, Newton-Schulz in Muon, soft-capped CE) in
Triton's interpreter, and Muon runs fp32 Newton-Schulz there (model.training.muon_compute_dtype:
the triton-vs-reference comparison below holds fp32 tolerances).

The curve: the train loss of every step (Trainer logs each one to metrics.jsonl at full float
precision), then the loss of the returned, SWA-averaged model on a fixed held-out batch.

Regenerate the stored curve after a change that is meant to move it (the file keeps one curve per
torch major.minor):

    UPDATE_LOSS_CURVE=1 python -m pytest -q tests/test_convergence.py -k stored
"""
import json
import os

import numpy as np
import pytest
import torch
import triton

import kernels
from kernels._launch import INTERPRET
from kernels.ops import newton_schulz
from model.config import Config
from model.runlog import RunLog
from tests.tolerances import assert_close
from model.data import DistributedTokenLoader, write_shard
from model.distributed import Dist
from model.training import build_training_state
from train import Trainer

CURVE_FILE = os.path.join(os.path.dirname(__file__), "data", "loss_curve_reference.json")
TORCH_VERSION = ".".join(torch.__version__.split("+")[0].split(".")[:2])

STEPS = 20
SEQ = 32
MICRO_SEQS = 1  # sequences per micro-batch
ACCUM = 2  # micro-batches per step: the accumulation path runs too
DATA_SEED = 0
NOISE = 0.1  # fraction of tokens replaced by a random one

# How close two runs of this curve must be. Training amplifies last-bit differences: Muon
# orthogonalises each update, which blows up tiny differences along small singular directions,
# and once QAT is on int6 rounding is discontinuous (a weight that differs in its last bit can land
# in the neighbouring bin, a jump of 1/31 of its row's absmax). Measured here (torch 2.13, triton
# 3.9, 2 CPU cores), as relative differences per step:
#   triton vs reference (the kernels sum in other orders: tiled attention with an online softmax,
#     tiled Newton-Schulz products, split CE reductions): 0, 1e-7, 2e-6 at steps 1-3, growing
#     roughly 1.5x per step to 1.8e-4 before QAT, 3.7e-4 during QAT;
#   the reference under ATEN_CPU_CAPABILITY=avx2 vs the stored AVX-512 run (another CPU): 0, 0,
#     2e-7 at steps 1-3, up to 1e-4 before QAT, 1.1e-3 at the first QAT step;
#   the reference with its initial fp32 weights perturbed by 1e-6 relative: up to 1.4e-3.
# So: the first EARLY_STEPS losses within the fp32 kernel tolerance, the later steps before QAT
# within 2e-3, the QAT steps and the SWA model's loss within 1e-2. Bugs tried locally, all caught:
# a gradient row dropped in the bigram backward kernel (3e-5 at step 2), the fake-quant skipped on
# the triton path (1.6e-2 at the first QAT step), grad clipping skipped in train.py (1.8e-3 at step 3,
# 4e-2 later), a sign flipped in the Newton-Schulz update kernel (fails in the first steps).
EARLY_STEPS = 3
QAT_FROM = 17  # index of the first QAT step (0-based), asserted from the Trainer's log below
CURVE_RTOL = 2e-3
QAT_RTOL = 1e-2
# The tiny model must learn: from ln(64) = 4.16 at init, the noisy successor rule allows about
# 0.1 * ln(64) + 0.33 ~ 0.75 nats; 20 steps of 64 tokens reach about 1.9 (mean of the last 5).
MIN_LOSS_DROP = 1.0


def tiny_config(data_path: str) -> Config:
    return Config(
        data_path=data_path, compile=False, seed=1337,
        vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=8,  # head dim 16, GQA
        xsa_last_n=1, bigram_vocab_size=67, bigram_dim=16, ve_dim=16, ve_layers="1",
        iterations=STEPS, max_wallclock_seconds=0,  # step-counted warmdown: wall-clock time would make the curve nondeterministic
        train_seq_len=SEQ, train_batch_tokens=ACCUM * MICRO_SEQS * SEQ, grad_accum_total=ACCUM,
        warmup_steps=0,  # the warm-up only primes compiled graphs, then restores everything
        warmdown_iters=8,  # LR scale (20 - step) / 8 from 0-based step 12: 1, 7/8, ..., 1/8
        late_qat_threshold=0.5,  # QAT on for the last 3 steps (scale 3/8, 2/8, 1/8)
        swa_enabled=True, swa_threshold=0.7, swa_every=2,  # snapshots after steps 16, 18, 20
        muon_momentum_warmup_steps=10,
        train_log_every=1, val_loss_every=0,
    ).validate()


def learnable_tokens(count: int, vocab: int, seed: int = DATA_SEED) -> np.ndarray:
    """The next token is (5 * token + 3) mod vocab, except a fraction NOISE of random tokens."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(count, dtype=np.int64)
    tokens[0] = rng.integers(vocab)
    noise = rng.random(count) < NOISE
    random_tokens = rng.integers(vocab, size=count)
    for t in range(1, count):
        tokens[t] = random_tokens[t] if noise[t] else (5 * tokens[t - 1] + 3) % vocab
    return tokens


def write_data(folder: str, vocab: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A train shard with exactly the tokens the run reads, and a held-out batch from another seed."""
    os.makedirs(folder, exist_ok=True)
    write_shard(os.path.join(folder, "fineweb_train_000000.bin"), learnable_tokens(STEPS * ACCUM * MICRO_SEQS * SEQ + 1, vocab))
    held_out = torch.from_numpy(learnable_tokens(2 * SEQ + 1, vocab, seed=DATA_SEED + 1))
    return folder, held_out[:-1].view(2, SEQ), held_out[1:].view(2, SEQ)


def train_curve(backend: str, folder: str) -> dict:
    """Train the tiny model with `backend`; {"losses": per-step train loss, "final_loss": held-out loss after SWA}."""
    data_path, x_held, y_held = write_data(os.path.join(folder, "data"), vocab=64)
    cfg = tiny_config(data_path)
    log = RunLog(os.path.join(folder, f"run_{backend}"), is_main=True)
    with kernels.use_backend(backend):
        state = build_training_state(cfg, Dist.single("cpu"), DistributedTokenLoader(cfg.data_path))
        model = Trainer(state, log, validate=None).run()
        assert state.swa.count == 3, f"expected 3 SWA snapshots, got {state.swa.count}"
        with torch.no_grad():
            final_loss = model(x_held, y_held).item()
    with open(log.path("metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"kind": "train"' in line]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), "Trainer did not log every step"
    with open(log.path("train.log")) as f:
        qat_lines = [line for line in f if "late QAT on" in line]
    assert len(qat_lines) == 1 and qat_lines[0].startswith(f"step:{QAT_FROM} "), f"late QAT should switch on at step {QAT_FROM}: {qat_lines}"
    return {"losses": [row["train_loss"] for row in rows], "final_loss": final_loss}


def curve_vector(curve: dict) -> torch.Tensor:
    return torch.tensor(curve["losses"] + [curve["final_loss"]], dtype=torch.float64)


def assert_curves_close(actual: dict, expected: dict) -> None:
    """The three tolerances above, step by step (the SWA model's loss counts as a QAT step)."""
    actual, expected = curve_vector(actual), curve_vector(expected)
    assert_close(actual[:EARLY_STEPS], expected[:EARLY_STEPS], dtype=torch.float32)
    torch.testing.assert_close(actual[:QAT_FROM], expected[:QAT_FROM], rtol=CURVE_RTOL, atol=0)
    torch.testing.assert_close(actual[QAT_FROM:], expected[QAT_FROM:], rtol=QAT_RTOL, atol=0)


@pytest.fixture(scope="module")
def interpreter_blocks():
    """Newton-Schulz tiles of 32 in the interpreter instead of its default 16 (a documented test
    knob): a quarter of the programs for the 32-wide matrices, and Muon's Newton-Schulz launches
    are most of this run's time. Its own tests cover multi-tile shapes at 16; here the 16-row and
    16-column matrices still exercise the masked ragged edges."""
    module = newton_schulz
    previous = module.INTERPRET_BLOCK
    module.INTERPRET_BLOCK = 32
    yield
    module.INTERPRET_BLOCK = previous


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory):
    return train_curve("reference", str(tmp_path_factory.mktemp("convergence")))


def test_tiny_model_learns(reference_curve):
    losses = reference_curve["losses"]
    assert all(np.isfinite(losses)), losses
    late = float(np.mean(losses[-5:]))  # one 64-token batch per step: single losses are noisy
    assert late < losses[0] - MIN_LOSS_DROP, f"loss went from {losses[0]:.3f} to {late:.3f} (mean of the last 5): {losses}"
    assert reference_curve["final_loss"] < losses[0] - MIN_LOSS_DROP, reference_curve


@pytest.mark.slow  # every kernel in Triton's interpreter: about 40 s on two cores
@pytest.mark.skipif(not INTERPRET, reason="without TRITON_INTERPRET=1 the triton backend on CPU tensors is the reference; "
                                          "test_triton_curve_on_gpu covers the GPU")
def test_triton_backend_trains_the_reference_curve(reference_curve, interpreter_blocks, tmp_path):
    assert_curves_close(train_curve("triton", str(tmp_path)), reference_curve)


def test_reference_curve_matches_the_stored_one(reference_curve):
    stored = {}
    if os.path.exists(CURVE_FILE):
        with open(CURVE_FILE) as f:
            stored = json.load(f)
    if os.environ.get("UPDATE_LOSS_CURVE") == "1":
        # triton and the CPU's vector ISA are recorded to explain a mismatch, not compared
        stored[TORCH_VERSION] = {"steps": STEPS, "triton": triton.__version__,
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), **reference_curve}
        with open(CURVE_FILE, "w") as f:
            json.dump(dict(sorted(stored.items())), f, indent=1)
            f.write("\n")
    if TORCH_VERSION not in stored:
        # Another torch may draw the init or round reductions differently: its curve is its own.
        pytest.skip(f"{CURVE_FILE} has curves for torch {', '.join(stored) or 'none'}, not {TORCH_VERSION}; "
                    f"add one with UPDATE_LOSS_CURVE=1 after checking the other tests pass")
    assert_curves_close(reference_curve, stored[TORCH_VERSION])


@pytest.mark.gpu
def test_triton_curve_on_gpu(tmp_path):
    """On CUDA the Trainer uses bf16 autocast and bf16 Newton-Schulz, so the two backends differ by
    bf16 rounding, not last bits: both must learn and stay within 0.05 nats of each other per step.
    UNMEASURED: the bound is a first guess, to be checked on a GPU."""
    curves = {}
    for backend in ("reference", "triton"):
        data_path, _, _ = write_data(str(tmp_path / "data"), vocab=64)
        cfg = tiny_config(data_path)
        log = RunLog(str(tmp_path / f"run_{backend}"), is_main=True)
        with kernels.use_backend(backend):
            state = build_training_state(cfg, Dist.single("cuda"), DistributedTokenLoader(cfg.data_path))
            Trainer(state, log, validate=None).run()
        with open(log.path("metrics.jsonl")) as f:
            curves[backend] = torch.tensor([json.loads(line)["train_loss"] for line in f if '"kind": "train"' in line])
    assert curves["reference"][-5:].mean() < curves["reference"][0] - MIN_LOSS_DROP, curves["reference"]
    torch.testing.assert_close(curves["triton"], curves["reference"], rtol=0, atol=0.05)
