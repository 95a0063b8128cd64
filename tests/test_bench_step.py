"""bench/step.py's arithmetic and code path on the CPU. Its timings mean nothing here and are
never asserted; the figures come from a GPU (python -m bench.step)."""
import os
import subprocess
import sys

import pytest
import torch

from bench import step as bench_step
from model.config import load_config
from model.gpt import GPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = bench_step.SMOKE_ARGS  # 2 layers (one encoder, one decoder with XSA and VE), T = 32


def one_call_timer(fn, repeats):
    return bench_step.wall_ms(fn, torch.device("cpu"))


def test_flops_per_token_matches_a_hand_count():
    cfg, _ = load_config(TINY, environ={})
    d, kv, hidden, L, V, T = 32, 16, 96, 2, 1024, 32  # kv = 1 KV head x head dim 16; hidden = 3d
    per_block = d * d + kv * d + kv * d + d * d + hidden * d + d * hidden  # q, k, v, out, fc, proj
    n = L * per_block + V * d + 8 * d + 8 * kv  # blocks, tied head, bigram proj 8->d, VE proj 8->kv
    assert bench_step.matrix_params(GPT(cfg)) == n
    assert bench_step.flops_per_token(cfg, n) == 6 * n + 6 * L * d * T


def test_spec_model_matrix_params():
    cfg, _ = load_config([], environ={})
    d, kv, hidden = 512, 256, 1536
    n = 11 * (2 * d * d + 2 * kv * d + 2 * hidden * d) + 1024 * d + 128 * d + 128 * kv
    assert bench_step.matrix_params(GPT(cfg)) == n == 26_574_848


def test_projection_arithmetic():
    assert bench_step.projected_eval_seconds(1e6) == pytest.approx(62_021_632 / 8e6)
    assert bench_step.projected_eval_seconds(2e5, tokens=1_000, gpus=2) == pytest.approx(1_000 / 4e5)


@pytest.mark.parametrize("name, part", [
    ("_xsa_fwd_kernel", "attention"),
    ("_xsa_bwd_dkdv_kernel", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("triton_red_fused__softmax_masked_fill_3", "attention"),
    ("_softcap_ce_fwd_kernel", "loss head"),
    ("triton_red_fused__log_softmax_tanh_7", "loss head"),
    ("_sym_gram_kernel", "optimizer"),
    ("_ns_update_kernel", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul (projections, MLP)"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul (projections, MLP)"),
    ("triton_poi_fused_add_mul_rms_norm_0", "other"),
    ("_relu2_gemm_kernel", "MLP relu^2"),
    ("triton_poi_fused_pow_relu_5", "MLP relu^2"),
    ("triton_poi_fused_mul_pow_relu_threshold_backward_9", "MLP relu^2"),
])
def test_kernel_classifier(name, part):
    assert bench_step.classify_kernel(name) == part


def test_parse_args():
    cfg, steps, skip_eval, smoke = bench_step.parse_args(["--steps", "3", "--model_dim", "256", "--skip-eval"])
    assert (cfg.model_dim, steps, skip_eval, smoke) == (256, 3, True, False)
    cfg, steps, skip_eval, smoke = bench_step.parse_args([])
    assert (cfg.train_batch_tokens, cfg.grad_accum_total, steps, skip_eval, smoke) == (786_432, 8, 10, False, False)
    # --smoke: the tiny model, one timed step; settings after it still win.
    cfg, steps, _, smoke = bench_step.parse_args(["--smoke", "--model_dim", "64"])
    assert (cfg.num_layers, cfg.model_dim, cfg.train_seq_len, cfg.compile, steps, smoke) == (2, 64, 32, False, 1, True)
    with pytest.raises(ValueError, match="--steps"):
        bench_step.parse_args(["--steps", "zero"])


def test_training_step_code_path_on_cpu():
    cfg, _ = load_config(TINY, environ={})
    row = bench_step.measure_training_step(cfg, "reference", torch.device("cpu"), steps=1, timer=one_call_timer)
    assert row["backend"] == "reference" and row["micro-batches"] == "2 x 2 x 32"
    assert row["ms/step"] > 0 and row["tokens/s"] > 0 and row["MFU %"] > 0
    per_token = bench_step.flops_per_token(cfg, bench_step.matrix_params(GPT(cfg)))
    assert row["TFLOP/s"] * 1e12 == pytest.approx(per_token * row["tokens/s"])
    parts = {s["part"] for s in row["shares"]}
    assert "optimizer" in parts and parts <= {part for part, _ in bench_step.KERNEL_CLASSES} | {"other"}
    assert sum(s["share %"] for s in row["shares"]) == pytest.approx(100)


def test_eval_code_path_on_cpu():
    cfg, _ = load_config(TINY, environ={})
    result = bench_step.measure_eval(cfg, "reference", torch.device("cpu"), windows=4, timer=one_call_timer)
    assert set(result) == {"sliding tokens/s/GPU", "sliding: val set on 8 GPUs (s)", "TTT s/chunk/GPU", "TTT: val set on 8 GPUs (s)"}
    assert result["sliding: val set on 8 GPUs (s)"] == pytest.approx(62_021_632 / (8 * result["sliding tokens/s/GPU"]))


def test_sliding_throughput_counts_stride_targets_per_window():
    # 4 windows after the first, stride 8: 5 windows x 8 targets in the (fixed) 1 s each call takes.
    cfg, _ = load_config(TINY, environ={})
    one_second = lambda fn, repeats: (fn(), 1000.0)[1]  # noqa: E731
    result = bench_step.measure_eval(cfg, "reference", torch.device("cpu"), windows=4, timer=one_second)
    assert result["sliding tokens/s/GPU"] == pytest.approx(5 * 8)


def test_main_without_a_gpu_refuses_a_real_run_and_a_smoke_run_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a machine with a GPU"):
        bench_step.main([])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        bench_step.main(["--smoke"])


@pytest.mark.slow
def test_smoke_run_prints_every_table(capsys):
    """main() end to end at the tiny model, both backends (triton through the interpreter here), so a
    GPU visit is not spent on a Python error in the script's glue."""
    torch._dynamo.reset()
    bench_step.main(["--smoke"])
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    header = rows[0]
    steps = [r for r in rows if r[0] in ("reference", "triton")]
    assert [r[0] for r in steps] == ["reference", "triton"] and header[-1] == "speed-up", out
    for row in steps:  # peak memory is the GPU's alone: NaN on the CPU
        cells = dict(zip(header, row))
        assert all(v and v not in ("nan", "inf") for k, v in cells.items() if k != "peak GiB"), row
    assert out.count("Share of GPU kernel time") == 2
    evaluation = rows[-1]
    assert len(evaluation) == 4 and all(v not in ("", "nan", "inf") for v in evaluation), out


def test_help_prints_the_usage_and_every_setting(capsys):
    with pytest.raises(SystemExit) as done:
        bench_step.parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "python -m bench.step [--steps N]" in out and "--num_layers" in out


# ----------------------------------------------------------------------------- --distributed (torchrun)
def test_communication_time_counts_what_compute_does_not_overlap():
    # communication [8, 14) and [25, 30) (one nested inside), compute [0, 10) and [12, 20):
    # 11 us of communication, of which [8, 10) and [12, 14) overlap compute: 7 exposed
    intervals = [(0, 10, False), (8, 14, True), (12, 20, False), (25, 30, True), (27, 29, True)]
    assert bench_step.communication_time(intervals) == (11, 7)
    assert bench_step.communication_time([(0, 5, False)]) == (0, 0)
    assert bench_step.communication_time([(0, 5, True), (0, 5, False)]) == (5, 0)


@pytest.mark.parametrize("name, comm", [
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", True),
    ("ncclDevKernel_AllGather_RING_LL", True),
    ("gloo:all_reduce", True),
    ("c10d::allreduce_", True),
    ("_sym_gram_kernel", False),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", False),
])
def test_communication_kernels_by_name(name, comm):
    assert bench_step.is_communication(name) == comm


@pytest.mark.slow  # two torchrun ranks under gloo: about 30 s on two busy cores
def test_distributed_smoke_under_torchrun(tmp_path):
    """The --distributed glue end to end on 2 CPU ranks: the real step, loader and communication."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(KERNELS="reference", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "bench.step", "--distributed", "--smoke", "--steps", "2"],
                            cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2, result.stdout  # rank 0 alone prints: one header, one row
    cells = dict(zip(*rows))
    assert cells["GPUs"] == "2 CPU ranks" and cells["micro-batches per rank"] == "1 x 2 x 32"
    assert float(cells["ms/step"]) > 0 and float(cells["MFU %"]) > 0
    assert 0 <= float(cells["exposed comm ms/step"]) <= float(cells["comm ms/step"])
    sent = [float(mb) for mb in cells["MB sent/step (RS + AG + AR)"].split(" + ")]
    assert len(sent) == 3 and all(mb > 0 for mb in sent)
