"""The whole stack on a tiny model: triton and reference backends train the same curve, and the
reference curve matches the one stored in tests/data (a guard against silent regressions).

Real optimizers (Muon + both AdamW groups), the real schedule (warmdown, momentum warm-up, late
QAT switching on part-way, grad clipping), fp32 on the CPU: on a machine without CUDA the triton
backend runs every kernel in Triton's interpreter. Regenerate the stored curve, after a change
that is meant to move it, with UPDATE_LOSS_CURVE=1.
"""
import json
import os

import pytest
import torch

import kernels
from model.config import load_config
from model.gpt import GPT
from model.optim import build_optimizers, set_schedule
from model.schedule import lr_scale, muon_momentum

CURVE = os.path.join(os.path.dirname(__file__), "data", "loss_curve_reference.json")
STEPS, BATCH, SEQ = 10, 2, 24
TINY = ["--num_layers", "3", "--model_dim", "32", "--num_heads", "2", "--num_kv_heads", "1", "--rope_dims", "8",
        "--xsa_last_n", "1", "--ve_layers", "2", "--vocab_size", "64", "--bigram_vocab_size", "67", "--bigram_dim", "16",
        "--ve_dim", "16", "--iterations", str(STEPS), "--warmdown_iters", "5", "--max_wallclock_seconds", "0",
        "--late_qat_threshold", "0.5", "--muon_momentum_warmup_steps", "5",
        "--matrix_lr", "0.01", "--tied_embed_lr", "0.02", "--scalar_lr", "0.01", "--train_seq_len", str(SEQ),
        "--train_batch_tokens", str(BATCH * SEQ * 8)]


def learnable_batches(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences where the next token is (5 * token + 3) mod vocab, with 10% of tokens random."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        seq = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (BATCH,), generator=gen)
        for t in range(SEQ):
            seq[:, t + 1] = (5 * seq[:, t] + 3) % vocab
            noise = torch.rand(BATCH, generator=gen) < 0.1
            seq[noise, t + 1] = torch.randint(0, vocab, (int(noise.sum()),), generator=gen)
        batches.append((seq[:, :-1], seq[:, 1:]))
    return batches


def train_curve(backend: str) -> list[float]:
    cfg, _ = load_config(TINY, environ={})
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizers = build_optimizers(model, cfg, muon_compute_dtype=torch.float32)
    losses = []
    with kernels.use_backend(backend):
        for step, (x, y) in enumerate(learnable_batches(cfg.vocab_size)):
            scale = lr_scale(step, 0.0, cfg)
            model.set_qat(scale < cfg.late_qat_threshold)
            loss = model(x, y)
            loss.backward()
            set_schedule(optimizers, scale, muon_momentum(step, cfg))
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def reference_curve():
    return train_curve("reference")


def test_tiny_model_learns(reference_curve):
    assert reference_curve[-1] < reference_curve[0] - 0.5, reference_curve


@pytest.mark.slow  # every kernel in the interpreter: about a minute on two cores
def test_triton_backend_trains_the_reference_curve(reference_curve):
    # fp32 throughout; the kernels sum in other orders than the references, and the optimizer
    # steps amplify those last-bit differences a little (Newton-Schulz most): 1e-4 relative.
    torch.testing.assert_close(train_curve("triton"), reference_curve, rtol=1e-4, atol=0)


def test_reference_curve_matches_the_stored_one(reference_curve):
    version = ".".join(torch.__version__.split(".")[:2])
    if os.environ.get("UPDATE_LOSS_CURVE") == "1":
        with open(CURVE, "w") as f:
            json.dump({"torch": version, "losses": reference_curve}, f, indent=1)
    with open(CURVE) as f:
        stored = json.load(f)
    if stored["torch"] != version:
        pytest.skip(f"the stored curve was made with torch {stored['torch']}, this is {version}; regenerate it with UPDATE_LOSS_CURVE=1")
    torch.testing.assert_close(reference_curve, stored["losses"], rtol=1e-4, atol=0)
