"""Triton Newton-Schulz (kernels/ops/newton_schulz.py) against the eager reference.

On the CPU the kernels run in Triton's interpreter, mostly with fp32 operands; fp16 and bf16 run
there at small shapes (test_16bit_compute_dtypes), the bf16 comparisons at the model's shapes need
a GPU. Outputs and every intermediate
buffer start as NaN (KERNELS_POISON=1), so a tile the kernels forget to write fails the test.
"""
import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from kernels.ops import newton_schulz as ns
from tests.kernels.gpu_tiles import BYTES, assert_fits_sm90, is_power_of_two, pipelined_bytes
from tests.tolerances import TOLERANCES, assert_close, assert_within_pytorch_error

# "Polar Express" per-step coefficients (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932), as
# modded-nanogpt ships them. Any valid per-step list serves the test; test_polar_express_schedule_is_valid
# checks this one is (its composed polynomial maps [1e-3, 1] into a band around 1).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SCHEDULES = {"quintic": reference.QUINTIC_COEFFS, "polar_express": POLAR_EXPRESS}

# the model's Muon matrices (SPEC.md): q/out, k/v, MLP up, MLP down, bigram proj, VE proj
MODEL_SHAPES = [(11, 512, 512), (22, 256, 512), (11, 1536, 512), (11, 512, 1536), (1, 512, 128), (1, 256, 128)]


def well_conditioned(shape, seed: int, smax: float = 10.0) -> torch.Tensor:
    """U diag(s) V^T with s uniform in [1, smax]: after Frobenius normalisation every singular
    value is >= 1 / (smax sqrt(min(m, n))), so the iteration's band below applies."""
    *batch, m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    s = 1.0 + (smax - 1.0) * torch.rand(*batch, k, generator=g, dtype=torch.float64)
    return ((U * s[..., None, :]) @ V.mT).float()


def singular_value_band(coeffs, steps: int, smallest: float) -> tuple[float, float]:
    """Where the composed scalar polynomial sends singular values in [smallest, 1] (fp64, dense grid)."""
    s = np.linspace(smallest, 1.0, 200_001)
    for a, b, c in reference.per_step_coeffs(steps, coeffs):
        s = a * s + b * s**3 + c * s**5
    return float(s.min()), float(s.max())


def test_polar_express_schedule_is_valid():
    lo, hi = singular_value_band(POLAR_EXPRESS, 5, 1e-3)
    assert 0.8 < lo and hi < 1.2
    lo, hi = singular_value_band(reference.QUINTIC_COEFFS, 5, 0.01)
    assert 0.67 < lo < 0.69 and 1.12 < hi < 1.14  # the quintic's known 0.68..1.13 band


@pytest.mark.parametrize(
    "shape, schedule",
    [
        ((3, 24, 40), "quintic"),  # batch > 1, nothing a multiple of the 16-wide interpreter blocks
        ((1, 17, 33), "quintic"),  # batch 1, one row past a block
        ((2, 64, 16), "quintic"),  # tall: transposed in, transposed back out
        ((1, 1, 5), "quintic"),  # a single row
        ((3, 24, 40), "polar_express"),
        ((2, 64, 16), "polar_express"),
    ],
)
def test_matches_reference_fp32_and_lands_in_band(shape, schedule):
    coeffs = SCHEDULES[schedule]
    G = well_conditioned(shape, seed=sum(shape))
    out = ns.newton_schulz(G, 5, coeffs, compute_dtype=torch.float32)
    expected = reference.newton_schulz(G, 5, coeffs, compute_dtype=torch.float32)
    assert out.shape == G.shape and out.dtype == torch.float32
    # The plain fp32 tolerance, unscaled. Five steps amplify a rounding difference by at most
    # prod_k max_s |p_k'(s)| (p_k the step's scalar polynomial, about |a_k| near s = 0), which
    # would justify a larger atol, but the measured gap (<= 2e-6 at these shapes, both schedules,
    # vs 1e-5 + 1e-5 |x|) does not need it, so the test stays as strict as the table.
    assert_close(out, expected)
    smallest = 1.0 / (10.0 * min(shape[-2:]) ** 0.5)
    lo, hi = singular_value_band(coeffs, 5, smallest)
    s = torch.linalg.svdvals(out.double())
    assert s.min() >= lo - 1e-3 and s.max() <= hi + 1e-3, (s.min().item(), s.max().item(), lo, hi)


# A 16-bit compute dtype takes the GPU's path (16-bit MMA operands, X and A stored in it), held to
# the fair bound as on the GPU. The interpreter rounds fp16 as torch does; for bf16 it widens the
# MMA operands (kernels/_numerics.py) and truncates casts, which the bound still absorbs here.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40, 72), (2, 72, 40)])
def test_16bit_compute_dtypes(dtype, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(16))
    exact = reference.newton_schulz(G.double(), 5, reference.QUINTIC_COEFFS, torch.float64)
    same_dtype = reference.newton_schulz(G, 5, reference.QUINTIC_COEFFS, dtype)
    out = ns.newton_schulz(G, 5, reference.QUINTIC_COEFFS, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_within_pytorch_error(out, exact, same_dtype)


def test_unstructured_input_and_leading_dims():
    # Gaussian input (not built from singular values), 2 leading dims, odd sizes
    G = torch.randn(2, 3, 9, 21, generator=torch.Generator().manual_seed(7))
    out = ns.newton_schulz(G, 3, reference.QUINTIC_COEFFS, compute_dtype=torch.float32)
    assert_close(out, reference.newton_schulz(G, 3, reference.QUINTIC_COEFFS, torch.float32))


def test_stack_equals_each_matrix_alone():
    # Muon splits stacks across ranks: a matrix's result must not depend on its neighbours
    G = torch.randn(3, 20, 36, generator=torch.Generator().manual_seed(8))
    stacked = ns.newton_schulz(G, 2, compute_dtype=torch.float32)
    for i in range(3):
        alone = ns.newton_schulz(G[i : i + 1], 2, compute_dtype=torch.float32)
        torch.testing.assert_close(stacked[i : i + 1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("sms", [1, 132])
def test_gpu_block_sizes_in_interpreter(monkeypatch, sms):
    # The GPU configuration (64- or 128-wide tiles, picked by occupancy, and the norm's 1024 x 8
    # chunks and 32 x 128 tiles) run through the interpreter at a shape ragged at those sizes:
    # sms=1 forces the 128 tiles, 132 the 64 ones; 130 x 200 is 4 norm chunks, the last ragged.
    monkeypatch.setattr(ns, "INTERPRET", False)
    monkeypatch.setattr(ns, "num_sms", lambda device: sms)
    monkeypatch.setattr(ns, "SUMSQ_BLOCK", ns.GPU_SUMSQ_BLOCKS[0])
    monkeypatch.setattr(ns, "SUMSQ_CHUNKS", ns.GPU_SUMSQ_BLOCKS[1])
    monkeypatch.setattr(ns, "NORMALISE_ROWS", ns.GPU_NORMALISE_TILE[0])
    monkeypatch.setattr(ns, "NORMALISE_COLS", ns.GPU_NORMALISE_TILE[1])
    G = torch.randn(1, 130, 200, generator=torch.Generator().manual_seed(9))
    out = ns.newton_schulz(G, 2, compute_dtype=torch.float32)
    assert_close(out, reference.newton_schulz(G, 2, reference.QUINTIC_COEFFS, torch.float32))


def test_gpu_configs_keep_the_kernels_rules(monkeypatch):
    monkeypatch.setattr(ns, "INTERPRET", False)
    cpu = torch.device("cpu")  # num_sms: the H100's 132
    # both occupancy branches of each: (batch, rows, cols) with few tiles, then with a wave of them
    grams = [ns._gram_config(batch, rows, cpu) for batch, rows in ((1, 256), (11, 1536))]
    updates = [ns._update_config(batch, 512, 1536, cpu) for batch in (1, 11)]
    assert [c["BLOCK"] for c in grams] == [64, 128] and [c["BLOCK_M"] for c in updates] == [64, 128]
    for dtype in ("bf16", "fp32"):  # fp32 compute runs the same configs (test_fp32_on_gpu_matches_reference)
        for c in grams:
            # one square BLOCK: a tile and its mirror are the same shape; the K loop buffers X's two row panels
            assert is_power_of_two(c["BLOCK"]) and is_power_of_two(c["BLOCK_K"]) and c["BLOCK_K"] >= 16, c
            shared = pipelined_bytes(c["num_stages"], [c["BLOCK"] * c["BLOCK_K"]] * 2, [], BYTES[dtype])
            assert_fits_sm90(shared, f"_sym_gram_kernel {c}, {dtype}")
        for c in updates:
            assert all(is_power_of_two(c[b]) and c[b] >= 16 for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c
            tiles = [c["BLOCK_M"] * c["BLOCK_K"], c["BLOCK_K"] * c["BLOCK_N"]]
            shared = pipelined_bytes(c["num_stages"], tiles, [], BYTES[dtype])
            assert_fits_sm90(shared, f"_ns_update_kernel {c}, {dtype}")
    assert all(is_power_of_two(b) for b in (*ns.GPU_SUMSQ_BLOCKS, *ns.GPU_NORMALISE_TILE))


def test_each_kernel_against_torch():
    g = torch.Generator().manual_seed(10)
    X = torch.randn(2, 37, 50, generator=g)
    A = ns.gram(X)
    assert_close(A, X @ X.mT, atol=TOLERANCES[torch.float32]["atol"] * 50)  # entries sum 50 products
    torch.testing.assert_close(A, A.mT, rtol=0, atol=0)  # mirrored tiles + symmetrised diagonal
    A = A / 50
    B = ns.gram_poly(A, -4.775, 2.0315)
    assert_close(B, -4.775 * A + 2.0315 * (A @ A))
    torch.testing.assert_close(B, B.mT, rtol=0, atol=0)
    Xn = X / X.norm(dim=(-2, -1), keepdim=True)
    assert_close(ns.ns_update(B, Xn, 3.4445), 3.4445 * Xn + B @ Xn)


def test_zero_steps_is_the_normalised_input():
    G = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(11))  # tall
    out = ns.newton_schulz(G, 0, compute_dtype=torch.float32)
    assert_close(out, G / G.norm(dim=(-2, -1), keepdim=True))


def test_public_api_routes_to_triton():
    assert kernels._TRITON.newton_schulz is ns.newton_schulz
    G = torch.randn(1, 18, 20, generator=torch.Generator().manual_seed(12))
    with kernels.use_backend("triton"):
        out = kernels.newton_schulz(G, 1, compute_dtype=torch.float32)
    assert_close(out, reference.newton_schulz(G, 1, reference.QUINTIC_COEFFS, torch.float32))


def test_opcheck():
    G = torch.randn(2, 5, 17, generator=torch.Generator().manual_seed(13))
    flat = [c for t in reference.per_step_coeffs(2, reference.QUINTIC_COEFFS) for c in t]
    torch.library.opcheck(
        ns.newton_schulz_op, (G, 2, flat, torch.float32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_compiles_without_graph_break():
    G = torch.randn(1, 16, 20, generator=torch.Generator().manual_seed(14))
    fn = torch.compile(lambda g: ns.newton_schulz(g, 1, compute_dtype=torch.float32), fullgraph=True, backend="eager")
    assert_close(fn(G), reference.newton_schulz(G, 1, reference.QUINTIC_COEFFS, torch.float32))


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        ns.newton_schulz(torch.randn(8))
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        ns.newton_schulz(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="compute_dtype torch.float64 is not supported"):
        ns.newton_schulz(torch.randn(4, 4), compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="one \\(a, b, c\\) triple or 5"):
        ns.newton_schulz(torch.randn(4, 4), 5, POLAR_EXPRESS[:4])


def test_no_gradient():
    G = torch.randn(1, 16, 16, requires_grad=True)
    out = ns.newton_schulz(G, 1, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="has no gradient"):
        out.sum().backward()


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_bf16_model_shapes_within_pytorch_error(shape):
    G = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(15))
    exact = reference.newton_schulz(G.double(), 5, reference.QUINTIC_COEFFS, torch.float64)
    torch_bf16 = reference.newton_schulz(G, 5, reference.QUINTIC_COEFFS, torch.bfloat16)
    out = ns.newton_schulz(G, 5, reference.QUINTIC_COEFFS, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_within_pytorch_error(out, exact, torch_bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(11, 512, 512), (11, 1536, 512), (3, 200, 300)])
def test_fp32_on_gpu_matches_reference(shape):
    # fp32 operands must run as true fp32 products (input_precision="ieee"), not tf32
    G = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(16))
    out = ns.newton_schulz(G, 5, POLAR_EXPRESS, torch.float32)
    exact = reference.newton_schulz(G.double(), 5, POLAR_EXPRESS, torch.float64)
    assert not torch.backends.cuda.matmul.allow_tf32  # the PyTorch side must be true fp32 too
    assert_within_pytorch_error(out, exact, reference.newton_schulz(G, 5, POLAR_EXPRESS, torch.float32))


@pytest.mark.gpu
def test_inductor_compiles_the_op():
    G = torch.randn(11, 512, 1536, device="cuda")
    fn = torch.compile(lambda g: ns.newton_schulz(g), fullgraph=True)
    assert_close(fn(G), ns.newton_schulz(G))
