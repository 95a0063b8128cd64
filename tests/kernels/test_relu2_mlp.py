"""Fused relu^2 MLP (kernels/ops/relu2_mlp.py) against kernels.reference.relu2_mlp.

On the CPU the Triton GEMM runs in the interpreter with fp32 operands and 32 x 16 x 16 tiles
(groups of 2 row tiles), so tokens in {1, 17, 130} and (d, F) in {(24, 40), (32, 96), (40, 72)}
are ragged in M, N and K; the forward and the gradients of x, w_up and w_down are compared with
autograd of the fp64 reference (fp32 tolerance of tests/tolerances.py). Outputs and the split-K
partials start as NaN (KERNELS_POISON). bf16 at the model shape and Inductor need a GPU.
"""
import pytest
import torch

import kernels
from kernels import reference
from kernels._launch import autotune_pair
from kernels.ops import relu2_mlp as mlp
from tests.conftest import DEVICE
from tests.kernels.gpu_tiles import BYTES, CONFIG_TEST_DTYPE, assert_fits_sm90, is_power_of_two, pipelined_bytes
from tests.tolerances import assert_close, assert_within_pytorch_error


def make_inputs(lead, d, hidden, dtype=torch.float32, seed=0):
    """x [*lead, d], w_up [F, d], w_down [d, F] and an upstream gradient like x, scaled so that
    h = x @ w_up^T ~ N(0, 1): about half of h on each side of the relu."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    w_up = torch.randn(hidden, d, generator=gen, dtype=torch.float64) / d**0.5
    w_down = torch.randn(d, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    dy = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (x, w_up, w_down, dy)]


def output_and_grads(fn, x, w_up, w_down, dy, cast=None):
    """fn's output and the gradients of sum(y * dy) for x, w_up and w_down."""
    leaves = [(t.to(cast) if cast else t).detach().requires_grad_() for t in (x, w_up, w_down)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def check_against_fp64_reference(x, w_up, w_down, dy):
    got = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    for name, actual, want, like in zip(("y", "dx", "dw_up", "dw_down"), got, exact, (x, x, w_up, w_down)):
        assert actual.dtype == like.dtype and actual.shape == like.shape, name
        assert_close(actual, want.to(like.dtype), like.dtype)


def check_fp32_with_fair_bound_on_weight_grads(x, w_up, w_down, dy):
    """fp32 at sizes where a weight gradient sums hundreds of tokens: y and dx within the fp32
    tolerance of the fp64 reference; dw_up and dw_down within twice PyTorch's own fp32 error (the
    fair bound, tests/tolerances.py), which at 4,500 tokens is itself 12x the fixed fp32 tolerance."""
    got = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    torch_fp32 = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy)
    for name, actual, want, same_dtype in zip(("y", "dx", "dw_up", "dw_down"), got, exact, torch_fp32):
        assert actual.dtype == torch.float32 and torch.isfinite(actual).all(), name
        if name in ("y", "dx"):
            assert_close(actual, want.float(), torch.float32, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_within_pytorch_error(actual, want, same_dtype)


def test_outputs_are_poisoned_in_tests():
    # Every comparison below would catch an element (or a split-K partial) the kernel forgets to write.
    from kernels import _launch

    assert _launch.POISON


# leading dims of x, d, F: every token count, a 3-D x, each (d, F); a sparse cover (the interpreter is slow)
CASES = [
    ((1,), 24, 40),
    ((17,), 32, 96),
    ((130,), 40, 72),
    ((2, 9), 24, 40),
    ((17,), 40, 72),
    ((130,), 24, 40),
    ((2, 9), 32, 96),
]


@pytest.mark.parametrize("lead, d, hidden", CASES)
def test_forward_and_gradients_match_reference(lead, d, hidden):
    x, w_up, w_down, dy = make_inputs(lead, d, hidden, seed=d * hidden + lead[-1])
    check_against_fp64_reference(x, w_up, w_down, dy)


def test_relu_boundary_mixed_signs_and_exact_zeros():
    x, w_up, w_down, dy = make_inputs((130,), 40, 72, seed=5)
    x[::7] = 0.0  # whole rows of h exactly 0
    w_up[::5] = 0.0  # whole columns of h exactly 0
    h = x.double() @ w_up.double().T
    assert 0.3 < (h > 0).double().mean() < 0.6 and 0.3 < (h < 0).double().mean() < 0.6
    assert (h == 0).double().mean() > 0.2, "the test must put many h exactly on the relu's kink"
    check_against_fp64_reference(x, w_up, w_down, dy)


@pytest.mark.parametrize("split_k, tokens", [(1, 130), (3, 130), (16, 17)])
def test_split_k_partials_cover_every_token(monkeypatch, split_k, tokens):
    # 3 ragged K ranges of 48 + 48 + 34 tokens; 16 ranges of 16 over 17 tokens leaves 14 empty (they write zeros).
    monkeypatch.setattr(mlp, "SPLIT_K_OVERRIDE", split_k)
    x, w_up, w_down, dy = make_inputs((tokens,), 40, 72, seed=split_k)
    check_against_fp64_reference(x, w_up, w_down, dy)


def test_split_k_choice():
    # The model's dW_down [512, 1536] is 48 tiles of 128 x 128: 11 ranges fill 132 SMs in exactly 4 waves.
    device = torch.device("cpu")
    assert mlp._split_k(1536, 512, 48 * 2048, device) == 11
    assert mlp._split_k(4096, 4096, 48 * 2048, device) == 1  # a full wave of tiles already
    assert mlp._split_k(1536, 512, mlp.MIN_K_PER_SPLIT, device) == 1  # too few tokens to split


def test_gradients_are_bitwise_deterministic():
    x, w_up, w_down, dy = make_inputs((130,), 40, 72, seed=9)
    first = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    second = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_stride0_gradient_strided_weights_and_frozen_weights():
    # y.sum().backward() hands the op an expanded (stride-0) gradient; w_down is a transposed view.
    x, w_up, _, _ = make_inputs((2, 9), 24, 40, seed=3)
    w_down = torch.randn(40, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE).T / 40**0.5
    assert not w_down.is_contiguous()
    xk, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    mlp.relu2_mlp(xk, w_up, w_down).sum().backward()  # weights need no gradient here
    reference.relu2_mlp(xr, w_up.double(), w_down.double()).sum().backward()
    assert_close(xk.grad, xr.grad.float(), torch.float32)


def test_empty_batch():
    x, w_up, w_down, dy = make_inputs((0,), 24, 40)
    y, dx, dw_up, dw_down = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    assert y.shape == (0, 24) and dx.shape == (0, 24)
    assert (dw_up == 0).all() and (dw_down == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_casts_the_operands_like_f_linear(dtype):
    # Under autocast the reference's F.linear runs in the autocast dtype; so must the fused op, as
    # accurately (fair bound against fp64), with the gradients reaching the fp32 leaves in fp32.
    # In the interpreter bf16 widens the MMA operands (kernels/_numerics.py) and truncates casts,
    # which the bound still absorbs; fp16 rounds as torch does.
    x, w_up, w_down, dy = make_inputs((130,), 40, 72, seed=6)
    with torch.autocast(DEVICE, dtype=dtype):
        got = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
        torch_autocast = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1:])
    for actual, want, same_dtype in zip(got, exact, torch_autocast):
        assert_within_pytorch_error(actual, want, same_dtype)


def test_public_api_uses_the_triton_kernel():
    assert kernels._TRITON.relu2_mlp is mlp.relu2_mlp
    with kernels.use_backend("triton"):
        assert kernels._impl("relu2_mlp") is mlp.relu2_mlp
    with kernels.use_backend("reference"):
        assert kernels._impl("relu2_mlp") is reference.relu2_mlp
    x, w_up, w_down, _ = make_inputs((2, 9), 24, 40, seed=2)
    expected = reference.relu2_mlp(x.double(), w_up.double(), w_down.double()).float()
    for backend in kernels.BACKENDS:
        with kernels.use_backend(backend):
            assert_close(kernels.relu2_mlp(x, w_up, w_down), expected, torch.float32)


def test_bad_inputs_raise_one_clear_error():
    x, w_up, w_down, _ = make_inputs((5,), 24, 40)
    with pytest.raises(ValueError, match="w_up must be \\[F, 24\\]"):
        mlp.relu2_mlp(x, w_up[:, :16], w_down)
    with pytest.raises(ValueError, match="w_down\\s+\\[24, F\\] = \\(24, 40\\)"):
        mlp.relu2_mlp(x, w_up, w_down[:, :32])
    with pytest.raises(ValueError, match="pass the weights as 2-D matrices"):
        mlp.relu2_mlp(x, w_up[None], w_down)
    with pytest.raises(ValueError, match="expected x \\[..., d\\]"):
        mlp.relu2_mlp(x[0, 0], w_up, w_down)
    with pytest.raises(TypeError, match="cast the weights to x's dtype first"):
        mlp.relu2_mlp(x, w_up.half(), w_down)
    with pytest.raises(TypeError, match="one dtype among fp32, bf16 and fp16"):
        mlp.relu2_mlp(x.double(), w_up.double(), w_down.double())


def test_opcheck():
    x, w_up, w_down, dy = make_inputs((17,), 24, 40, seed=7)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    torch.library.opcheck(mlp.relu2_mlp_fwd_op, (*leaves, 0.5), test_utils=checks)
    h = x @ w_up.T
    torch.library.opcheck(mlp.relu2_mlp_bwd_op, (dy, x, h, w_up, w_down, 0.5), test_utils=checks)


def test_compiles_fullgraph_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts compiled frames, runs them eagerly (Inductor needs a GPU for triton ops)
    compiled = torch.compile(mlp.relu2_mlp, fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second same-shape input must reuse the first graph
        x, w_up, w_down, dy = make_inputs((2, 9), 24, 40, seed=seed)
        got = output_and_grads(compiled, x, w_up, w_down, dy)
        exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
        for actual, want in zip(got, exact):
            assert_close(actual, want.float(), torch.float32)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_reference_backend_compiles_with_inductor():
    # What the model runs on a CPU: kernels.relu2_mlp on the reference backend, under Inductor.
    x, w_up, w_down, dy = make_inputs((2, 9), 24, 40, seed=8)
    with kernels.use_backend("reference"):
        got = output_and_grads(torch.compile(kernels.relu2_mlp, fullgraph=True), x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    for actual, want in zip(got, exact):
        assert_close(actual, want.float(), torch.float32)


def test_eager_twins_match_reference_autograd():
    # The CPU path without the interpreter restates the kernels' formulas with torch ops; in fp64
    # they must be autograd of the reference to rounding.
    x, w_up, w_down, dy = make_inputs((17,), 24, 40, dtype=torch.float64, seed=11)
    y, h = mlp.relu2_mlp_fwd_eager(x, w_up, w_down, 0.0)
    got = [y, *mlp.relu2_mlp_bwd_eager(dy, x, h, w_up, w_down, 0.0)]
    for actual, want in zip(got, output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy)):
        assert_close(actual, want, torch.float64)


# --------------------------------------------------------------------------- the GPU's tile configs
# The interpreter runs one 32 x 16 x 16 config; a GPU autotunes 16-bit GEMMs over GPU_GEMM_CONFIGS and
# runs fp32 (and small problems) on GPU_FIXED_CONFIG. Each of them is checked against what the GEMM
# assumes of a config and run here, forward and backward, through the interpreter.
GPU_CONFIGS = mlp.GPU_GEMM_CONFIGS + [mlp.GPU_FIXED_CONFIG]


def _config_id(config):
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}g{k['GROUP_M']}w{config.num_warps}s{config.num_stages}"


def test_gpu_configs_keep_the_kernels_rules():
    for config in GPU_CONFIGS:
        k, what = config.kwargs, _config_id(config)
        # tl.arange takes powers of two, tl.dot operands at least 16 rows and columns
        assert all(is_power_of_two(k[b]) and k[b] >= 16 for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), what
        assert k["GROUP_M"] >= 1, what
        # the pipelined K loop buffers an A [BLOCK_M, BLOCK_K] and a B [BLOCK_K, BLOCK_N] tile per stage
        tiles = [k["BLOCK_M"] * k["BLOCK_K"], k["BLOCK_K"] * k["BLOCK_N"]]
        assert_fits_sm90(pipelined_bytes(config.num_stages, tiles, [], BYTES["bf16"]), f"{what}, bf16")
    fixed = mlp.GPU_FIXED_CONFIG.kwargs  # fp32 operands take the fixed config (kernels._launch.AutotunePair)
    tiles = [fixed["BLOCK_M"] * fixed["BLOCK_K"], fixed["BLOCK_K"] * fixed["BLOCK_N"]]
    assert_fits_sm90(pipelined_bytes(mlp.GPU_FIXED_CONFIG.num_stages, tiles, [], BYTES["fp32"]), "fixed config, fp32")


# 600 tokens, d 40, F 300: ragged in M, N and K for every config (K = d = 40 is under one BLOCK_K);
# dh's F = 300 crosses the 256-wide column tiles, 600 rows make 10 row tiles of 64 (two GROUP_M = 8
# groups, the second ragged) and 5 of 128; dW_down runs split-K 3 over ragged K ranges (256, 256, 88
# tokens with BLOCK_K 64).
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=_config_id)
def test_forward_and_gradients_with_each_gpu_config(monkeypatch, config):
    monkeypatch.setattr(mlp, "_GEMM", autotune_pair(mlp._relu2_gemm_kernel, [config], mlp._TUNE_KEY, fixed=config))
    monkeypatch.setattr(mlp, "SPLIT_K_OVERRIDE", 3)
    x, w_up, w_down, dy = make_inputs((600,), 40, 300, dtype=CONFIG_TEST_DTYPE, seed=17)
    if CONFIG_TEST_DTYPE == torch.float32:
        check_fp32_with_fair_bound_on_weight_grads(x, w_up, w_down, dy)
        return
    # natively on a GPU (tests/kernels/gpu_tiles.CONFIG_TEST_DTYPE): as test_bf16_model_shape_within_pytorch_error
    got = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    same_dtype = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy)
    for actual, want, torch_low in zip(got, exact, same_dtype):
        assert_within_pytorch_error(actual, want, torch_low, atol=1e-3)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_fp32_on_gpu_with_full_size_tiles():
    # The GPU's fixed fp32 config (IEEE products) on shapes ragged for it; 4500 tokens split dW_down in 2.
    assert mlp._split_k(600, 200, 4500, torch.device(DEVICE)) == 2
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's side of the fair bound must be true fp32 too
    x, w_up, w_down, dy = make_inputs((4500,), 200, 600, seed=12)
    check_fp32_with_fair_bound_on_weight_grads(x, w_up, w_down, dy)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [48 * 2048, 4099])
def test_bf16_model_shape_within_pytorch_error(tokens):
    # The model's MLP (d 512, F 1536) on a full micro-batch (split-K 11 for dW_down) and on a ragged,
    # autotuned slice; the error against fp64 is at most ~2x PyTorch's own bf16 error.
    x, w_up, w_down, dy = make_inputs((tokens,), 512, 1536, dtype=torch.bfloat16, seed=13)
    got = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    exact = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy, cast=torch.float64)
    torch_bf16 = output_and_grads(reference.relu2_mlp, x, w_up, w_down, dy)
    for name, g, e, t in zip(("y", "dx", "dw_up", "dw_down"), got, exact, torch_bf16):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), name
        assert_within_pytorch_error(g, e, t, atol=1e-3)


@pytest.mark.gpu
def test_bf16_gradients_are_bitwise_deterministic():
    x, w_up, w_down, dy = make_inputs((48 * 2048,), 512, 1536, dtype=torch.bfloat16, seed=15)
    first = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    second = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
def test_inductor_compile_under_autocast_matches_eager():
    x, w_up, w_down, dy = make_inputs((8, 1024), 512, 1536, dtype=torch.float32, seed=14)
    compiled = torch.compile(mlp.relu2_mlp, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = output_and_grads(compiled, x, w_up, w_down, dy)
        eager = output_and_grads(mlp.relu2_mlp, x, w_up, w_down, dy)
    for g, e in zip(got, eager):
        assert g.dtype == e.dtype
        assert_close(g.float(), e.float(), torch.bfloat16)
