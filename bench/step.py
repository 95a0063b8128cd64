"""The whole training step on one GPU, reference vs triton kernels, and the evaluation throughput.

    python -m bench.step [--name value ...]      (any model/config.py setting, e.g. --num_layers 11)

One step = SPEC's 786,432 tokens as 8 micro-batches of 48 x 2048 (forward + backward under bf16
autocast through torch.compile(fullgraph=True), grad clip, Muon + both AdamW), on random tokens.

MFU: FLOPs per token = 6N + 6*L*d*T, N = matrix parameters including the tied head (every 2-D
weight of the blocks, the bigram and VE projections, and tok_emb as the head's matmul), L layers,
d model dim, T sequence length; MFU = that x tokens/s / 989 TFLOP/s (H100 SXM dense bf16 datasheet).
Step-time shares come from torch.profiler's CUDA kernel times, classified by kernel name.
Evaluation: sliding-window scoring and legal TTT, projected to the 62,021,632-token validation set
on 8 GPUs as tokens / (tokens per second per GPU x 8).
"""
import sys
import time

import torch

import kernels
from bench.common import header, median_ms, require_gpu, table
from model import evaluate
from model.config import Config, load_config
from model.gpt import GPT
from model.optim import build_optimizers, set_schedule

H100_BF16_PEAK_FLOPS = 989e12
VAL_TOKENS = 62_021_632
EVAL_GPUS = 8
# Kernel-name patterns (lower case) -> the part of the step they belong to; first match wins.
KERNEL_CLASSES = (
    ("attention", ("xsa", "flash", "attn", "sdpa", "fmha")),
    ("loss head", ("softcap", "cross_entropy", "nll", "log_softmax", "logsumexp")),
    ("optimizer", ("newton_schulz", "_ns_", "adam", "multi_tensor", "foreach", "muon")),
    ("matmul (projections, MLP)", ("gemm", "matmul", "mm_", "cutlass", "sm90_xmma", "nvjet")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for part, patterns in KERNEL_CLASSES:
        if any(p in low for p in patterns):
            return part
    return "other"


def matrix_params(model: GPT) -> int:
    """N of the MFU formula: every 2-D weight (tok_emb counted once, as the tied head)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and not name.endswith(("resid_mix", "skip_weights")) and name not in ("bigram.table", "ve.table"))


def flops_per_token(cfg: Config, n_matrix: int) -> int:
    return 6 * n_matrix + 6 * cfg.num_layers * cfg.model_dim * cfg.train_seq_len


def projected_eval_seconds(tokens_per_second_per_gpu: float, tokens: int = VAL_TOKENS, gpus: int = EVAL_GPUS) -> float:
    return tokens / (tokens_per_second_per_gpu * gpus)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def make_step(cfg: Config, device: torch.device):
    """A function running one full optimizer step on fixed random batches, and the model."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    forward = torch.compile(model, fullgraph=True) if cfg.compile else model
    optimizers = build_optimizers(model, cfg, torch.bfloat16 if device.type == "cuda" else torch.float32)
    micro = cfg.train_batch_tokens // cfg.grad_accum_total // cfg.train_seq_len
    batches = [torch.randint(0, cfg.vocab_size, (micro, cfg.train_seq_len + 1), device=device) for _ in range(cfg.grad_accum_total)]

    def step():
        for seq in batches:
            with autocast(device):
                loss = forward(seq[:, :-1], seq[:, 1:])
            (loss / len(batches)).backward()
        set_schedule(optimizers, 1.0, cfg.muon_momentum)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, model


def measure_training_step(cfg: Config, backend: str, device: torch.device, timer) -> dict:
    """ms/step, tokens/s, MFU and peak memory of one backend; `timer(fn)` returns median ms."""
    with kernels.use_backend(backend):
        torch._dynamo.reset()
        step, model = make_step(cfg, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timer(step)
    tokens_per_s = cfg.train_batch_tokens / (ms / 1e3)
    n_matrix = matrix_params(model)
    return {
        "backend": backend, "ms/step": ms, "tokens/s": tokens_per_s,
        "MFU %": 100 * flops_per_token(cfg, n_matrix) * tokens_per_s / H100_BF16_PEAK_FLOPS,
        "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "_step": step,
    }


def step_shares(step) -> list[dict]:
    """Share of CUDA kernel time per part of the step, over 2 profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if us:
            part = classify_kernel(event.key)
            totals[part] = totals.get(part, 0.0) + us
    grand = sum(totals.values()) or 1.0
    return [{"part": k, "share %": 100 * v / grand} for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]


def measure_eval(cfg: Config, device: torch.device, tokens: int, chunks: int) -> dict:
    """Sliding-window tokens/s and legal-TTT seconds per chunk on random tokens, projected."""
    model = GPT(cfg).to(device)
    luts = (torch.ones(cfg.vocab_size, dtype=torch.int16, device=device),
            torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device),
            torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device))
    val = torch.randint(0, cfg.vocab_size, (tokens + 1,), device=device)
    with autocast(device):
        t0 = time.perf_counter()
        evaluate.evaluate_sliding(model, val, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, luts)
        sliding_s = time.perf_counter() - t0
        ttt_tokens = torch.randint(0, cfg.vocab_size, (chunks * cfg.ttt_chunk_tokens + 1,), device=device)
        t0 = time.perf_counter()
        evaluate.evaluate_ttt(model, ttt_tokens, cfg, luts)
        ttt_chunk_s = (time.perf_counter() - t0) / chunks
    sliding_tps = tokens / sliding_s
    return {
        "sliding tokens/s/GPU": sliding_tps,
        "sliding, full val on 8 GPUs (s)": projected_eval_seconds(sliding_tps),
        "TTT s/chunk/GPU": ttt_chunk_s,
        "TTT, full val on 8 GPUs (s)": VAL_TOKENS / cfg.ttt_chunk_tokens * ttt_chunk_s / EVAL_GPUS,
    }


def main(argv: list[str]) -> None:
    require_gpu("bench.step")
    cfg, _ = load_config(argv)
    device = torch.device("cuda")
    print(header("Training step, one GPU"))
    print(f"FLOPs/token = 6N + 6*L*d*T; MFU against {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s "
          f"(H100 SXM bf16 dense{'' if 'H100' in torch.cuda.get_device_name() else '; this device is not an H100'})\n")
    timer = lambda fn: median_ms(fn, warmup=3, rep=10)  # noqa: E731 -- whole steps: a few are enough
    rows = [measure_training_step(cfg, backend, device, timer) for backend in ("reference", "triton")]
    rows[1]["speed-up"], rows[0]["speed-up"] = rows[0]["ms/step"] / rows[1]["ms/step"], 1.0
    print(table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]))
    for row in rows:
        with kernels.use_backend(row["backend"]):
            print(f"\nStep time by part ({row['backend']} backend; by CUDA kernel name)\n")
            print(table(step_shares(row["_step"])))
    print("\nEvaluation (random tokens; projection = 62,021,632 tokens / (tokens/s per GPU x 8))\n")
    print(table([measure_eval(cfg, device, tokens=cfg.eval_batch_seqs * cfg.eval_stride * 64, chunks=2)]))


if __name__ == "__main__":
    main(sys.argv[1:])
