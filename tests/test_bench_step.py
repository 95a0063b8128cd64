"""bench/step.py's arithmetic and code path on the CPU (timings there mean nothing and are not
asserted; the figures come from a GPU)."""
import time

import pytest
import torch

from bench import step as bench_step
from model.config import load_config
from model.gpt import GPT

TINY = ["--preset", "smoke", "--model_dim", "64", "--num_heads", "4", "--num_kv_heads", "2", "--rope_dims", "8",
        "--train_batch_tokens", "512", "--grad_accum_total", "2", "--eval_seq_len", "64", "--eval_stride", "16",
        "--eval_batch_seqs", "4", "--ttt_chunk_tokens", "128", "--train_seq_len", "64"]


def test_flops_per_token_by_hand():
    cfg, _ = load_config([], environ={})
    model = GPT(cfg)
    d, kv, hidden, L = 512, 256, 1536, 11
    per_block = d * d + 2 * kv * d + d * d + 2 * hidden * d
    n = L * per_block + 1024 * d + d * 128 + kv * 128  # blocks, tied head, bigram and VE projections
    assert bench_step.matrix_params(model) == n
    assert bench_step.flops_per_token(cfg, n) == 6 * n + 6 * 11 * 512 * 2048


def test_projection_and_classifier():
    assert bench_step.projected_eval_seconds(1e6) == pytest.approx(62_021_632 / 8e6)
    assert bench_step.classify_kernel("_xsa_fwd_kernel") == "attention"
    assert bench_step.classify_kernel("_softcap_ce_fwd_kernel") == "loss head"
    assert bench_step.classify_kernel("_newton_schulz_sym_kernel") == "optimizer"
    assert bench_step.classify_kernel("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul (projections, MLP)"
    assert bench_step.classify_kernel("triton_poi_fused_add_mul_0") == "other"


def test_code_path_runs_on_cpu():
    cfg, _ = load_config(TINY, environ={})
    device = torch.device("cpu")

    def timer(fn):
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    row = bench_step.measure_training_step(cfg, "reference", device, timer)
    assert {"backend", "ms/step", "tokens/s", "MFU %", "peak GiB"} <= row.keys() and row["ms/step"] > 0
    result = bench_step.measure_eval(cfg, device, tokens=256, chunks=2)
    assert all(v > 0 for v in result.values())
