"""Fused relu^2 MLP (kernels/ops/relu2_mlp.py) against kernels.reference.relu2_mlp, at negative
slopes 0.0 (relu^2, SPEC), 0.5 (FRONTIER.md) and 0.1 (a slope whose multiply rounds).

On the CPU the Triton GEMM runs in the interpreter with fp32 operands and 32 x 16 x 16 tiles
(groups of 2 row tiles), so tokens in {1, 17, 130} and (d, F) in {(24, 40), (32, 96), (40, 72)}
are ragged in M, N and K; the forward and the gradients of x, w_up and w_down are compared with
autograd of the fp64 reference (fp32 tolerance of tests/tolerances.py). Outputs and the split-K
partials start as NaN (KERNELS_POISON). The activation phi and its derivative are checked bit for
bit against torch's autograd through an identity GEMM (fp32 and fp16 here, bf16 on a GPU: the
interpreter truncates bf16 casts). bf16 at the model shapes and Inductor need a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels._launch import autotune_pair, launch_directly
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


def with_slope(fn, negative_slope):
    return lambda x, w_up, w_down: fn(x, w_up, w_down, negative_slope)


def check_against_fp64_reference(x, w_up, w_down, dy, negative_slope=0.0):
    got = output_and_grads(with_slope(mlp.relu2_mlp, negative_slope), x, w_up, w_down, dy)
    exact = output_and_grads(with_slope(reference.relu2_mlp, negative_slope), x, w_up, w_down, dy, cast=torch.float64)
    for name, actual, want, like in zip(("y", "dx", "dw_up", "dw_down"), got, exact, (x, x, w_up, w_down)):
        assert actual.dtype == like.dtype and actual.shape == like.shape, name
        assert_close(actual, want.to(like.dtype), like.dtype)


def check_fp32_with_fair_bound_on_weight_grads(x, w_up, w_down, dy, negative_slope=0.0):
    """fp32 at sizes where a weight gradient sums hundreds of tokens: y and dx within the fp32
    tolerance of the fp64 reference; dw_up and dw_down within twice PyTorch's own fp32 error (the
    fair bound, tests/tolerances.py), which at 4,500 tokens is itself 12x the fixed fp32 tolerance."""
    kernel, ref = with_slope(mlp.relu2_mlp, negative_slope), with_slope(reference.relu2_mlp, negative_slope)
    got = output_and_grads(kernel, x, w_up, w_down, dy)
    exact = output_and_grads(ref, x, w_up, w_down, dy, cast=torch.float64)
    torch_fp32 = output_and_grads(ref, x, w_up, w_down, dy)
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


# leading dims of x, d, F, negative slope: every token count, a 3-D x, each (d, F), each slope on
# several of them; a sparse cover (the interpreter is slow)
CASES = [
    ((1,), 24, 40, 0.0),
    ((17,), 32, 96, 0.5),
    ((130,), 40, 72, 0.0),
    ((2, 9), 24, 40, 0.1),
    ((17,), 40, 72, 0.0),
    ((130,), 24, 40, 0.5),
    ((2, 9), 32, 96, 0.0),
    ((1,), 40, 72, 0.5),
    ((130,), 32, 96, 0.1),
]
SLOPES = (0.0, 0.5, 0.1)


@pytest.mark.parametrize("lead, d, hidden, negative_slope", CASES)
def test_forward_and_gradients_match_reference(lead, d, hidden, negative_slope):
    x, w_up, w_down, dy = make_inputs(lead, d, hidden, seed=d * hidden + lead[-1])
    check_against_fp64_reference(x, w_up, w_down, dy, negative_slope)


@pytest.mark.parametrize("negative_slope", SLOPES)
def test_relu_boundary_mixed_signs_and_exact_zeros(negative_slope):
    x, w_up, w_down, dy = make_inputs((130,), 40, 72, seed=5)
    x[::7] = 0.0  # whole rows of h exactly 0
    w_up[::5] = 0.0  # whole columns of h exactly 0
    h = x.double() @ w_up.double().T
    assert 0.3 < (h > 0).double().mean() < 0.6 and 0.3 < (h < 0).double().mean() < 0.6
    assert (h == 0).double().mean() > 0.2, "the test must put many h exactly on the relu's kink"
    check_against_fp64_reference(x, w_up, w_down, dy, negative_slope)


# The activation alone: phi = leaky_relu(h, slope)^2 and phi' = 2h (h > 0) or 2 slope^2 h, FRONTIER.md's
# "z^2 for z > 0 and 0.25 z^2 otherwise (phi' = 2z or 0.5z)" at slope 0.5.
@pytest.mark.parametrize("negative_slope", SLOPES)
def test_reference_phi_and_its_autograd_derivative(negative_slope):
    h = torch.linspace(-3, 3, 121, dtype=torch.float64).requires_grad_()  # 0.0 included
    phi = reference.leaky_relu2(h, negative_slope)
    phi.backward(torch.ones_like(phi))
    hd = h.detach()
    assert torch.equal(phi.detach(), torch.where(hd > 0, hd**2, (negative_slope * hd) ** 2))
    torch.testing.assert_close(h.grad, torch.where(hd > 0, 2 * hd, 2 * negative_slope**2 * hd), rtol=1e-15, atol=0)
    if negative_slope == 0.5:
        torch.testing.assert_close(phi.detach(), torch.where(hd > 0, hd**2, 0.25 * hd**2), rtol=0, atol=0)
        torch.testing.assert_close(h.grad, torch.where(hd > 0, 2 * hd, 0.5 * hd), rtol=0, atol=0)


def test_slope_zero_is_the_seed_relu2_bit_for_bit():
    # The seed's formula as it was before the slope existed; the reference at 0.0 (and by default)
    # must give its exact bits in bf16, forward and every gradient, edge values of torch.relu included.
    def seed_relu2_mlp(x, w_up, w_down):
        return F.linear(torch.relu(F.linear(x, w_up)).square(), w_down)

    x, w_up, w_down, dy = make_inputs((130,), 40, 72, dtype=torch.bfloat16, seed=21)
    x[::5] = 0.0
    seed = output_and_grads(seed_relu2_mlp, x, w_up, w_down, dy)
    with kernels.use_backend("reference"):  # what the model runs on a CPU
        for fn in (reference.relu2_mlp, with_slope(reference.relu2_mlp, 0.0), with_slope(kernels.relu2_mlp, 0)):
            for got, want in zip(output_and_grads(fn, x, w_up, w_down, dy), seed):
                assert_same_bits(got, want)
    h = torch.tensor([-float("inf"), -1.0, -0.0, 0.0, float("nan")])
    assert_same_bits(reference.leaky_relu2(h), torch.relu(h).square())


def assert_same_bits(actual, expected):
    """Equal bit for bit, the sign of zero included; NaN where expected has NaN (any payload)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN in different places"
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    a, e = actual.masked_fill(nan, 0).view(ints), expected.masked_fill(nan, 0).view(ints)
    differ = (a != e).nonzero()
    assert differ.numel() == 0, (
        f"{differ.shape[0]} elements differ, first at {differ[0].tolist()}: "
        f"{actual[tuple(differ[0])].item()!r} != {expected[tuple(differ[0])].item()!r}"
    )


def activation_inputs(dtype, seed=0):
    """h [40, 48]: random values of both signs over many binades, the kink (+-0), the smallest
    normals and subnormals of dtype, and values whose square (or 2h) overflows."""
    gen = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    top = int(math.log2(info.max)) // 2 - 4  # random phi stays finite: |h| < 2^top * 16
    h = torch.randn(40, 48, generator=gen, dtype=torch.float64) * torch.exp2(torch.randint(-12, top, (40, 48), generator=gen))
    subnormal = info.smallest_normal * info.eps  # the smallest: 3x it is odd, so halving it rounds
    specials = [0.0, -0.0, info.tiny, -info.tiny, info.smallest_normal / 8, -info.smallest_normal / 8,
                3 * subnormal, -3 * subnormal, 1e-3, -1e-3, 1.5, -1.5, 3.0, -3.0]
    h[0, : len(specials)] = torch.tensor(specials, dtype=torch.float64)
    big = info.max**0.5  # phi overflows past it (h > 0; slope * h for h < 0)
    h[1, :8] = torch.tensor([big * 1.01, -big * 1.01, -big * 2.5, -big * 11, info.max / 2, -info.max / 2, info.max, -info.max])
    return h.to(dtype).to(DEVICE)


def identity(n, dtype):
    return torch.eye(n, dtype=dtype, device=DEVICE)


def kernel_phi(h, negative_slope):
    """The GEMM's prologue alone: phi(h) @ I, whose fp32 sums have one nonzero term, so are exact."""
    out = torch.full_like(h, float("nan"))
    with launch_directly():
        mlp._gemm(h, identity(h.shape[1], h.dtype), out, relu2_a=True, negative_slope=negative_slope)
    return out


def kernel_dh(da, h, negative_slope):
    """The GEMM's epilogue alone: dh from da @ I (exact) and h."""
    out = torch.full_like(h, float("nan"))
    with launch_directly():
        mlp._gemm(da, identity(da.shape[1], da.dtype), out, epilogue_h=h, negative_slope=negative_slope)
    return out


# bf16 only natively: the interpreter truncates bf16 casts (kernels/_numerics.py), fp16 and fp32 it rounds.
PHI_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def test_leaky_rounding_is_left_out_only_where_exact():
    # The prologue skips rounding leaky(t) for these slopes; test_kernel_phi_... checks the bits at 0, 0.5 and 2^-20.
    assert not any(mlp._leaky_rounding_matters(s) for s in (0.0, 0.5, 0.25, 1.0, 2.0, -0.5, 2**-20))
    assert all(mlp._leaky_rounding_matters(s) for s in (0.1, 0.3, 0.75, -0.1, 1.5))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("dtype", PHI_DTYPES)
@pytest.mark.parametrize("negative_slope", SLOPES + (2**-20,))  # 2^-20: products in the subnormals
def test_kernel_phi_and_dphi_are_torch_autograd_bit_for_bit(dtype, negative_slope):
    # The rounding chain of FRONTIER.md (h in the dtype, leaky in the dtype, square in the dtype)
    # and autograd's backward of it, element by element, against torch itself in the same dtype.
    h = activation_inputs(dtype, seed=1)
    finite_phi = reference.leaky_relu2(h, negative_slope).isfinite().all(dim=1)
    rows = h[finite_phi]  # phi(h) @ I: an inf in phi would make NaNs of its row's zero products
    assert rows.shape[0] >= 39
    assert_same_bits(kernel_phi(rows, negative_slope), reference.leaky_relu2(rows, negative_slope))

    h = torch.cat([h, torch.tensor([[float("inf"), -float("inf"), float("nan")] + [1.0] * 45], dtype=dtype, device=DEVICE)])
    da = torch.randn(h.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype).to(DEVICE)
    # zero and negative gradients at h = +-0 (not da = -0.0: the identity GEMM's fp32 sum turns it into +0)
    da[0, :6] = torch.tensor([0.0, -1.0, 0.0, -1.0, 1.0, -3.0])
    leaf = h.clone().requires_grad_()
    reference.leaky_relu2(leaf, negative_slope).backward(da)
    assert_same_bits(kernel_dh(da, h, negative_slope), leaf.grad)


@pytest.mark.parametrize("split_k, tokens, negative_slope", [(1, 130, 0.0), (3, 130, 0.5), (16, 17, 0.1)])
def test_split_k_partials_cover_every_token(monkeypatch, split_k, tokens, negative_slope):
    # 3 ragged K ranges of 48 + 48 + 34 tokens; 16 ranges of 16 over 17 tokens leaves 14 empty (they write zeros).
    monkeypatch.setattr(mlp, "SPLIT_K_OVERRIDE", split_k)
    x, w_up, w_down, dy = make_inputs((tokens,), 40, 72, seed=split_k)
    check_against_fp64_reference(x, w_up, w_down, dy, negative_slope)


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
    for slope in (0.0, 0.5):
        expected = reference.relu2_mlp(x.double(), w_up.double(), w_down.double(), slope).float()
        for backend in kernels.BACKENDS:
            with kernels.use_backend(backend):
                assert_close(kernels.relu2_mlp(x, w_up, w_down, negative_slope=slope), expected, torch.float32)


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
    for slope in (torch.tensor(0.5), float("nan"), float("inf"), None, True):
        with pytest.raises(ValueError, match="negative_slope must be a finite Python float"):
            mlp.relu2_mlp(x, w_up, w_down, slope)


def test_opcheck():
    x, w_up, w_down, dy = make_inputs((17,), 24, 40, seed=7)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    leaves = [t.clone().requires_grad_() for t in (x, w_up, w_down)]
    torch.library.opcheck(mlp.relu2_mlp_fwd_op, (*leaves, 0.5), test_utils=checks)
    h = x @ w_up.T
    torch.library.opcheck(mlp.relu2_mlp_bwd_op, (dy, x, h, w_up, w_down, 0.5), test_utils=checks)


@pytest.mark.parametrize("negative_slope", [0.0, 0.5])
def test_compiles_fullgraph_without_recompiling(negative_slope):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts compiled frames, runs them eagerly (Inductor needs a GPU for triton ops)
    compiled = torch.compile(with_slope(mlp.relu2_mlp, negative_slope), fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second same-shape input must reuse the first graph
        x, w_up, w_down, dy = make_inputs((2, 9), 24, 40, seed=seed)
        got = output_and_grads(compiled, x, w_up, w_down, dy)
        exact = output_and_grads(with_slope(reference.relu2_mlp, negative_slope), x, w_up, w_down, dy, cast=torch.float64)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("negative_slope", SLOPES)
def test_eager_twins_match_reference_autograd(dtype, negative_slope):
    # The CPU path without the interpreter restates the kernels' formulas with torch ops: autograd of
    # the reference, to rounding in fp64 and bit for bit in bf16 (the same rounding chain).
    x, w_up, w_down, dy = make_inputs((17,), 24, 40, dtype=dtype, seed=11)
    y, h = mlp.relu2_mlp_fwd_eager(x, w_up, w_down, negative_slope)
    got = [y, *mlp.relu2_mlp_bwd_eager(dy, x, h, w_up, w_down, negative_slope)]
    for actual, want in zip(got, output_and_grads(with_slope(reference.relu2_mlp, negative_slope), x, w_up, w_down, dy)):
        if dtype == torch.float64:
            assert_close(actual, want, torch.float64)
        else:
            assert_same_bits(actual, want)


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
# tokens with BLOCK_K 64). The slope alternates between SPEC's 0.0 and FRONTIER.md's 0.5 over the
# list (it changes only pointwise code, not the tiling), so each slope meets both tile widths.
@pytest.mark.parametrize(
    "config, negative_slope", [(c, (0.0, 0.5)[i % 2]) for i, c in enumerate(GPU_CONFIGS)],
    ids=[f"{_config_id(c)}-slope{(0.0, 0.5)[i % 2]}" for i, c in enumerate(GPU_CONFIGS)],
)
def test_forward_and_gradients_with_each_gpu_config(monkeypatch, config, negative_slope):
    monkeypatch.setattr(mlp, "_GEMM", autotune_pair(mlp._relu2_gemm_kernel, [config], mlp._TUNE_KEY, fixed=config))
    monkeypatch.setattr(mlp, "SPLIT_K_OVERRIDE", 3)
    x, w_up, w_down, dy = make_inputs((600,), 40, 300, dtype=CONFIG_TEST_DTYPE, seed=17)
    if CONFIG_TEST_DTYPE == torch.float32:
        check_fp32_with_fair_bound_on_weight_grads(x, w_up, w_down, dy, negative_slope)
        return
    # natively on a GPU (tests/kernels/gpu_tiles.CONFIG_TEST_DTYPE): as test_bf16_model_shape_within_pytorch_error
    kernel, ref = with_slope(mlp.relu2_mlp, negative_slope), with_slope(reference.relu2_mlp, negative_slope)
    got = output_and_grads(kernel, x, w_up, w_down, dy)
    exact = output_and_grads(ref, x, w_up, w_down, dy, cast=torch.float64)
    same_dtype = output_and_grads(ref, x, w_up, w_down, dy)
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
@pytest.mark.parametrize(
    "tokens, hidden, negative_slope", [(48 * 2048, 1536, 0.0), (4099, 1536, 0.0), (48 * 2048, 2048, 0.5), (4099, 2048, 0.5)]
)
def test_bf16_model_shape_within_pytorch_error(tokens, hidden, negative_slope):
    # The seed's MLP (d 512, F 1536, relu^2) and the frontier's (F 2048, LeakyReLU(0.5)^2) on a full
    # micro-batch (split-K for dW_down) and on a ragged, autotuned slice; the error against fp64 is at
    # most ~2x PyTorch's own bf16 error.
    x, w_up, w_down, dy = make_inputs((tokens,), 512, hidden, dtype=torch.bfloat16, seed=13)
    kernel, ref = with_slope(mlp.relu2_mlp, negative_slope), with_slope(reference.relu2_mlp, negative_slope)
    got = output_and_grads(kernel, x, w_up, w_down, dy)
    exact = output_and_grads(ref, x, w_up, w_down, dy, cast=torch.float64)
    torch_bf16 = output_and_grads(ref, x, w_up, w_down, dy)
    for name, g, e, t in zip(("y", "dx", "dw_up", "dw_down"), got, exact, torch_bf16):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), name
        assert_within_pytorch_error(g, e, t, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden, negative_slope", [(1536, 0.0), (2048, 0.5)])
def test_bf16_gradients_are_bitwise_deterministic(hidden, negative_slope):
    x, w_up, w_down, dy = make_inputs((48 * 2048,), 512, hidden, dtype=torch.bfloat16, seed=15)
    first = output_and_grads(with_slope(mlp.relu2_mlp, negative_slope), x, w_up, w_down, dy)
    second = output_and_grads(with_slope(mlp.relu2_mlp, negative_slope), x, w_up, w_down, dy)
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


# --------------------------------------------------------------------------- the benchmark's slope


def test_bench_takes_the_configs_slope_or_its_own_flag():
    from bench import relu2_mlp as bench_mlp
    from bench.common import bench_config

    assert bench_mlp.split_slope_flag(["--smoke", "--negative-slope", "0.25", "--mlp_mult", "4"]) == (0.25, ["--smoke", "--mlp_mult", "4"])
    assert bench_mlp.split_slope_flag(["--preset", "frontier"]) == (None, ["--preset", "frontier"])
    with pytest.raises(SystemExit, match="--negative-slope takes a number"):
        bench_mlp.split_slope_flag(["--negative-slope"])
    # FRONTIER.md's MLP: 98,304 tokens per micro-batch, d 512, F 2048 (MLP_MULT 4), slope 0.5
    cfg, _ = bench_config("bench.relu2_mlp", ["--preset", "frontier"])
    assert bench_mlp.shape(cfg) == dict(N=98_304, D=512, HIDDEN=2048) and cfg.mlp_leaky_slope == 0.5
