"""Fused XSA attention (kernels/ops/xsa_attention.py) against kernels.reference.xsa_attention.

On the CPU the Triton kernels run in the interpreter on fp32 inputs and are compared with the
fp64 reference cast down (fp32 tolerance of tests/tolerances.py), and on fp16 and bf16 inputs
under the fair bound (test_16bit_inputs); outputs and the backward's scratch buffers start as NaN
(KERNELS_POISON), so an element a kernel forgets shows up.
On a GPU the same tests run natively, plus bf16 at the training shape under the fair bound.
"""
import itertools

import pytest
import torch
import triton

import kernels
from kernels import reference
from kernels._launch import autotune_pair
from kernels.ops import xsa_attention as xa
from kernels.ops.xsa_attention import xsa_attention, xsa_attention_bwd_eager, xsa_attention_fwd_eager
from tests.conftest import HAS_GPU
from tests.kernels.gpu_tiles import BYTES, CONFIG_TEST_DTYPE, assert_fits_sm90, is_power_of_two, pipelined_bytes
from tests.tolerances import assert_close, assert_within_pytorch_error


def _inputs(B, T, H, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dy = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dy)]


def _reference_grads(q, k, v, dy, xsa, dtype=None):
    """Reference output and gradients, computed in `dtype` (default: the inputs' own)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = reference.xsa_attention(*leaves, xsa=xsa)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _kernel_grads(q, k, v, dy, xsa):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = xsa_attention(*leaves, xsa=xsa)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


# Every listed T (1, ragged 17, one tile 64, ragged multi-tile 130), both GQA layouts, B in {1, 2},
# XSA on and off, head dims 64 and smaller; a sparse cover, because the interpreter is slow.
CASES = [
    # B, T, H, Hkv, D, xsa
    (2, 1, 8, 4, 64, True),
    (1, 1, 4, 1, 16, False),
    (1, 17, 4, 1, 32, True),
    (2, 17, 8, 4, 64, False),
    (2, 64, 4, 1, 64, True),
    (1, 64, 8, 4, 16, False),
    (1, 130, 8, 4, 64, True),
    (2, 130, 4, 1, 32, False),
]


@pytest.mark.parametrize("B, T, H, Hkv, D, xsa", CASES)
def test_forward_and_gradients_match_reference(B, T, H, Hkv, D, xsa, device):
    q, k, v, dy = _inputs(B, T, H, Hkv, D, torch.float64, device)
    expected = _reference_grads(q, k, v, dy, xsa)
    got = _kernel_grads(*(t.float() for t in (q, k, v, dy)), xsa=xsa)
    for name, actual, exact in zip(("y", "dq", "dk", "dv"), got, expected):
        assert actual.dtype == torch.float32, name
        assert_close(actual, exact.float(), dtype=torch.float32, msg=lambda m, name=name: f"{name}: {m}")


# 16-bit inputs take the GPU's 16-bit path (16-bit operands into the MMA, probabilities cast down
# before P @ V, 16-bit outputs and gradients), held to the fair bound as on the GPU. The interpreter
# rounds fp16 as torch does; for bf16 it widens the MMA operands (kernels/_numerics.py) and
# truncates casts, which the bound still absorbs here.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xsa", [False, True])
def test_16bit_inputs(dtype, xsa, device):
    q, k, v, dy = _inputs(1, 130, 4, 2, 64, dtype, device, seed=10)
    exact = _reference_grads(q, k, v, dy, xsa, dtype=torch.float64)
    same_dtype = _reference_grads(q, k, v, dy, xsa)
    got = _kernel_grads(q, k, v, dy, xsa)
    for name, actual, ex, torch_16 in zip(("y", "dq", "dk", "dv"), got, exact, same_dtype):
        assert actual.dtype == dtype, name
        assert_within_pytorch_error(actual, ex, torch_16)


def test_saved_statistics_are_lse_and_projection_coefficient(device):
    q, k, v, _ = _inputs(2, 33, 4, 2, 32, torch.float32, device, seed=1)
    y, c, lse = torch.ops.golf.xsa_attention_fwd(q, k, v, True)
    y_ref, c_ref, lse_ref = xsa_attention_fwd_eager(q.double(), k.double(), v.double(), True)
    for actual, exact in ((y, y_ref), (c, c_ref), (lse, lse_ref)):
        assert_close(actual, exact.float(), dtype=torch.float32)
    _, c_plain, _ = torch.ops.golf.xsa_attention_fwd(q, k, v, False)
    assert torch.equal(c_plain, torch.zeros_like(c_plain))


@pytest.mark.parametrize("xsa", [False, True])
def test_eager_twin_backward_is_the_reference_gradient(xsa):
    """The backward's formulas (du, d v_hat, dv_self, delta), stated in torch ops, equal autograd
    of the reference in fp64: checks the derivation independently of any Triton code."""
    q, k, v, dy = _inputs(2, 11, 6, 2, 8, torch.float64, "cpu", seed=2)
    _, dq_ref, dk_ref, dv_ref = _reference_grads(q, k, v, dy, xsa)
    y, c, lse = xsa_attention_fwd_eager(q, k, v, xsa)
    for actual, exact in zip(xsa_attention_bwd_eager(dy, q, k, v, y, c, lse, xsa), (dq_ref, dk_ref, dv_ref)):
        assert_close(actual, exact)


def test_zero_value_vector_leaves_output_unprojected_and_gradients_finite(device):
    # F.normalize maps v = 0 to v_hat = 0: nothing to remove, and the gradient through the norm
    # floor must stay finite (d v_hat is 0 there, so dv_self is 0 rather than 0 / eps).
    q, k, v, dy = _inputs(1, 9, 4, 2, 16, torch.float64, device, seed=3)
    v[0, 4, 1] = 0.0
    v[0, 0, 0] = 0.0
    expected = _reference_grads(q, k, v, dy, True)
    got = _kernel_grads(*(t.float() for t in (q, k, v, dy)), xsa=True)
    for actual, exact in zip(got, expected):
        assert torch.isfinite(actual).all()
        assert_close(actual, exact.float(), dtype=torch.float32)


def test_strided_views_and_expanded_gradient(device):
    """q, k, v sliced out of one packed projection (row stride > H*D) are read by their strides,
    and the stride-0 gradient that out.sum().backward() hands back is handled."""
    B, T, H, Hkv, D = 2, 20, 4, 2, 16
    packed = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=torch.float64, device=device)
    q, k, v = packed.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    assert not q.is_contiguous()
    ones = torch.ones(B, T, H, D, dtype=torch.float64, device=device)
    expected = _reference_grads(q, k, v, ones, True)
    packed32 = packed.float().requires_grad_()
    q32, k32, v32 = (
        t.view(B, T, h, D) for t, h in zip(packed32.split([H * D, Hkv * D, Hkv * D], dim=-1), (H, Hkv, Hkv))
    )
    out = xsa_attention(q32, k32, v32, xsa=True)
    out.sum().backward()
    dq, dk, dv = packed32.grad.split([H * D, Hkv * D, Hkv * D], dim=-1)
    assert_close(out, expected[0].float(), dtype=torch.float32)
    for actual, exact in zip((dq, dk, dv), expected[1:]):
        assert_close(actual.reshape(exact.shape), exact.float(), dtype=torch.float32)


def test_backward_is_bitwise_deterministic(device):
    # No atomics anywhere: dK/dV programs own their rows and sum over the query heads themselves.
    q, k, v, dy = _inputs(1, 40, 8, 2, 16, torch.float32, device, seed=4)
    first = _kernel_grads(q, k, v, dy, xsa=True)
    second = _kernel_grads(q, k, v, dy, xsa=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_api_routes_triton_backend_here():
    with kernels.use_backend("triton"):
        assert kernels._impl("xsa_attention") is xsa_attention
    with kernels.use_backend("reference"):
        assert kernels._impl("xsa_attention") is reference.xsa_attention


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 4, 3, 16), (1, 4, 2, 16), (1, 4, 2, 16)), "3 query heads are not a multiple of 2 KV heads"),
        (((1, 4, 2, 24), (1, 4, 1, 24), (1, 4, 1, 24)), "head dim 24 is not supported"),
        (((1, 4, 2, 16), (1, 5, 1, 16), (1, 5, 1, 16)), "k and v must both be"),
        (((4, 2, 16), (4, 1, 16), (4, 1, 16)), "must be 4-D"),
    ],
)
def test_bad_shapes_raise_one_clear_error(shapes, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        xsa_attention(q, k, v, xsa=True)


def test_mixed_dtypes_raise_one_clear_error():
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16).double()
    with pytest.raises(TypeError, match="must share one dtype"):
        xsa_attention(q, k, v)


def test_opcheck(device):
    q, k, v, dy = _inputs(1, 19, 4, 2, 16, torch.float32, device, seed=6)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for xsa in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.library.opcheck(torch.ops.golf.xsa_attention_fwd, (*leaves, xsa), test_utils=checks)
        y, c, lse = torch.ops.golf.xsa_attention_fwd(q, k, v, xsa)
        torch.library.opcheck(torch.ops.golf.xsa_attention_bwd, (dy, q, k, v, y, c, lse, xsa), test_utils=checks)


def test_compiles_fullgraph_without_recompiling(device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if HAS_GPU else "eager")
    compiled = torch.compile(xsa_attention, fullgraph=True, backend=counter)
    q, k, v, dy = _inputs(1, 21, 4, 2, 16, torch.float32, device, seed=7)
    expected = _kernel_grads(q, k, v, dy, xsa=True)
    for _ in range(2):  # the second same-shape call must reuse the graph
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = compiled(*leaves, True)
        out.backward(dy)
        for actual, eager in zip([out.detach()] + [t.grad for t in leaves], expected):
            assert_close(actual, eager, dtype=torch.float32)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- the GPU's tile configs
# The interpreter runs one small config per kernel; a GPU autotunes over the lists below. Every
# config in them is checked against what the kernels assume of a config, and run here through the
# interpreter on a sequence ragged for its tiles, so the first GPU run is not the first run of a
# config. Each kernel walks its diagonal tile (`outer` rows) in steps of `inner` rows: inner must
# divide outer, or keys go unvisited or unmasked.
GPU_TILE_LISTS = {  # kernel: (its GPU tiles (BLOCK_M, BLOCK_N, warps, stages), outer block, inner block)
    "fwd": (xa.FWD_GPU_TILES, "BLOCK_M", "BLOCK_N"),
    "dkdv": (xa.DKDV_GPU_TILES, "BLOCK_N", "BLOCK_M"),
    "dq": (xa.DQ_GPU_TILES, "BLOCK_M", "BLOCK_N"),
}


def _tile_id(tile):
    m, n, warps, stages = tile
    return f"{m}x{n}w{warps}s{stages}"


def _shared_bytes(kernel, tile, head_dim, element_bytes):
    """Pipelined shared memory of one config (tests/kernels/gpu_tiles.py): what each kernel's key or
    query loop loads per step, and the tiles it loads once before it."""
    m, n, _warps, stages = tile
    if kernel == "fwd":  # loop: K, V [BLOCK_N, D]; once: Q [BLOCK_M, D]
        return pipelined_bytes(stages, [n * head_dim] * 2, [m * head_dim], element_bytes)
    if kernel == "dq":  # loop: K, V [BLOCK_N, D]; once: Q, dU [BLOCK_M, D]
        return pipelined_bytes(stages, [n * head_dim] * 2, [m * head_dim] * 2, element_bytes)
    # dkdv, loop: Q, dU [BLOCK_M, D] and fp32 lse, delta [BLOCK_M]; once: K, V [BLOCK_N, D]
    return pipelined_bytes(stages, [m * head_dim] * 2, [n * head_dim] * 2, element_bytes) + stages * 2 * m * 4


@pytest.mark.parametrize("kernel", sorted(GPU_TILE_LISTS))
def test_gpu_tile_configs_keep_the_kernels_rules(monkeypatch, kernel):
    tiles, outer, inner = GPU_TILE_LISTS[kernel]
    head_dim = max(xa.SUPPORTED_HEAD_DIMS)
    for tile in tiles:
        blocks = dict(zip(("BLOCK_M", "BLOCK_N"), tile[:2]))
        what = f"{kernel} config {_tile_id(tile)}"
        # tl.arange takes powers of two, tl.dot operands at least 16 rows
        assert all(is_power_of_two(b) and b >= 16 for b in blocks.values()), what
        assert blocks[outer] % blocks[inner] == 0, f"{what}: {inner} must divide {outer}"
        assert_fits_sm90(_shared_bytes(kernel, tile, head_dim, BYTES["bf16"]), f"{what}, bf16, D={head_dim}")
    # fp32 inputs (the GPU tests) take the list's last config (kernels._launch.autotune_pair)
    assert_fits_sm90(_shared_bytes(kernel, tiles[-1], head_dim, BYTES["fp32"]), f"{kernel} fixed config, fp32")
    # and the op's own pruning (xsa_attention._configs, which drops a config that breaks the rule) keeps every one
    monkeypatch.setattr(xa, "INTERPRET", False)
    kept = xa._configs(tiles, interpreter_config=None, outer=outer, inner=inner)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == list(tiles)


def _use_gpu_tiles(monkeypatch, kernel, tile):
    """Make the ops launch `kernel` with this one GPU config, whatever the dtype and sequence length."""
    m, n, warps, stages = tile
    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    jit, pair = {"fwd": (xa._xsa_fwd_kernel, "_FWD"), "dkdv": (xa._xsa_bwd_dkdv_kernel, "_DKDV"),
                 "dq": (xa._xsa_bwd_dq_kernel, "_DQ")}[kernel]  # fmt: skip
    monkeypatch.setattr(xa, pair, autotune_pair(jit, [config], xa._TUNE_KEY))
    monkeypatch.setattr(xa, "_PREPROCESS_BLOCK_T", xa.PREPROCESS_GPU_BLOCK_T)


# T = 150 is ragged for every block size (128, 64, 32, 16) and crosses at least two tiles of each.
GPU_TILE_SHAPE = dict(B=1, T=150, H=4, Hkv=2, D=64)


@pytest.mark.parametrize("tile", xa.FWD_GPU_TILES, ids=_tile_id)
def test_forward_with_each_gpu_config(monkeypatch, device, tile):
    _use_gpu_tiles(monkeypatch, "fwd", tile)
    q, k, v, _ = _inputs(*GPU_TILE_SHAPE.values(), torch.float64, device, seed=20)
    if CONFIG_TEST_DTYPE != torch.float32:  # natively on a GPU: tests/kernels/gpu_tiles.CONFIG_TEST_DTYPE
        low = [t.to(CONFIG_TEST_DTYPE) for t in (q, k, v)]
        y, _, _ = torch.ops.golf.xsa_attention_fwd(*low, True)
        assert_within_pytorch_error(y, reference.xsa_attention(q, k, v, True), reference.xsa_attention(*low, True))
        return
    got = torch.ops.golf.xsa_attention_fwd(q.float(), k.float(), v.float(), True)
    for name, actual, exact in zip(("y", "c", "lse"), got, xsa_attention_fwd_eager(q, k, v, True)):
        assert_close(actual, exact.float(), dtype=torch.float32, msg=lambda m, name=name: f"{name}: {m}")


# Each backward run takes one dK/dV and one dQ config; the shorter list repeats so both are covered.
assert len(xa.DQ_GPU_TILES) <= len(xa.DKDV_GPU_TILES), "pair the configs the other way round"
BACKWARD_TILE_PAIRS = list(zip(xa.DKDV_GPU_TILES, itertools.cycle(xa.DQ_GPU_TILES)))


@pytest.mark.parametrize("dkdv_tile, dq_tile", BACKWARD_TILE_PAIRS, ids=lambda t: _tile_id(t))
def test_backward_with_each_gpu_config(monkeypatch, device, dkdv_tile, dq_tile):
    _use_gpu_tiles(monkeypatch, "dkdv", dkdv_tile)
    _use_gpu_tiles(monkeypatch, "dq", dq_tile)
    q, k, v, dy = _inputs(*GPU_TILE_SHAPE.values(), torch.float64, device, seed=21)
    if CONFIG_TEST_DTYPE != torch.float32:  # natively on a GPU: tests/kernels/gpu_tiles.CONFIG_TEST_DTYPE
        low = [t.to(CONFIG_TEST_DTYPE) for t in (q, k, v, dy)]
        exact, same_dtype = _reference_grads(q, k, v, dy, True), _reference_grads(*low, True)
        for actual, ex, torch_low in zip(_kernel_grads(*low, True), exact, same_dtype):
            assert_within_pytorch_error(actual, ex, torch_low)
        return
    _, dq_ref, dk_ref, dv_ref = _reference_grads(q, k, v, dy, True)
    q32, k32, v32, dy32 = (t.float() for t in (q, k, v, dy))
    y, c, lse = xsa_attention_fwd_eager(q32, k32, v32, True)  # the forward's outputs, without its kernel
    got = torch.ops.golf.xsa_attention_bwd(dy32, q32, k32, v32, y, c, lse, True)
    for name, actual, exact in zip(("dq", "dk", "dv"), got, (dq_ref, dk_ref, dv_ref)):
        assert_close(actual, exact.float(), dtype=torch.float32, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("xsa", [False, True])
def test_bf16_training_shape_within_pytorch_error(xsa):
    B, T, H, Hkv, D = 2, 2048, 8, 4, 64
    q, k, v, dy = _inputs(B, T, H, Hkv, D, torch.bfloat16, "cuda", seed=8)
    exact = _reference_grads(q, k, v, dy, xsa, dtype=torch.float32)
    pytorch_bf16 = _reference_grads(q, k, v, dy, xsa)
    got = _kernel_grads(q, k, v, dy, xsa)
    for name, actual, ex, same_dtype in zip(("y", "dq", "dk", "dv"), got, exact, pytorch_bf16):
        assert actual.dtype == torch.bfloat16, name
        assert_within_pytorch_error(actual, ex, same_dtype)


@pytest.mark.gpu
def test_inductor_compile_bf16_matches_eager_kernel():
    torch._dynamo.reset()
    q, k, v, dy = _inputs(2, 300, 8, 4, 64, torch.bfloat16, "cuda", seed=9)
    eager = _kernel_grads(q, k, v, dy, xsa=True)
    compiled = torch.compile(xsa_attention, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves, True)
    out.backward(dy)
    for actual, expected in zip([out.detach()] + [t.grad for t in leaves], eager):
        # Same kernels, same configs once tuned: Inductor only changes what surrounds them.
        assert_close(actual, expected, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- segments and the output gate


def test_reference_segments_and_gate_against_loops():
    """The reference's document mask and gate, term by term: each query a softmax over the keys at or
    before it in its own segment, XSA, then times sigmoid(gate); zero-length trailing segments ignored."""
    g = torch.Generator().manual_seed(30)
    B, T, H, Hkv, D = 2, 7, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    gate = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 3, 4, 7, 9, 14, 14, 14], dtype=torch.int32)  # row 1 starts at 7
    got = reference.xsa_attention(q, k, v, True, cu_seqlens, gate)
    starts = [0, 3, 4, 7, 9]
    for b, t, h in itertools.product(range(B), range(T), range(H)):
        i = b * T + t
        first = max(s for s in starts if s <= i) - b * T
        kv = h // (H // Hkv)
        s = torch.stack([q[b, t, h] @ k[b, j, kv] / D**0.5 for j in range(first, t + 1)])
        y = (torch.softmax(s, 0)[:, None] * v[b, first : t + 1, kv]).sum(0)
        vhat = v[b, t, kv] / v[b, t, kv].norm()
        y = (y - (y @ vhat) * vhat) * torch.sigmoid(gate[b, t, h])
        torch.testing.assert_close(got[b, t, h], y)


def test_no_segments_is_one_segment_per_row():
    q, k, v, _ = _inputs(2, 9, 4, 2, 16, torch.float64, "cpu", seed=31)
    rows = torch.tensor([0, 9, 18] + [18] * 5, dtype=torch.int32)
    torch.testing.assert_close(reference.xsa_attention(q, k, v, True, rows), reference.xsa_attention(q, k, v, True))


@pytest.mark.parametrize(
    "cu_seqlens, match",
    [
        (torch.tensor([0, 5, 8], dtype=torch.int64), "1-D int32 tensor"),
        (torch.tensor([[0, 8]], dtype=torch.int32), "1-D int32 tensor"),
        (torch.tensor([1, 8], dtype=torch.int32), "must run from 0 to B\\*T = 8, got 1 .. 8"),
        (torch.tensor([0, 4, 7], dtype=torch.int32), "must run from 0 to B\\*T = 8, got 0 .. 7"),
    ],
)
@pytest.mark.parametrize("fn", [reference.xsa_attention, xsa_attention], ids=["reference", "triton"])
def test_bad_cu_seqlens_raise_one_clear_error(fn, cu_seqlens, match):
    q, k, v, _ = _inputs(2, 4, 2, 1, 16, torch.float32, "cpu", seed=32)
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, False, cu_seqlens)


def test_compiles_fullgraph_with_segments_and_gate_reference_backend():
    """The public op with cu_seqlens and gate traces as one graph (the CPU runs the reference backend;
    the Triton ops' own compile is a GPU test)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    q, k, v, dy = _inputs(1, 12, 4, 2, 16, torch.float32, "cpu", seed=33)
    gate = torch.randn(1, 12, 4)
    cu_seqlens = torch.tensor([0, 5, 12, 12], dtype=torch.int32)

    def attend(q, k, v, gate, cu_seqlens):
        return kernels.xsa_attention(q, k, v, xsa=True, cu_seqlens=cu_seqlens, gate=gate * 0.5)

    compiled = torch.compile(attend, fullgraph=True, backend=counter)
    with kernels.use_backend("reference"):
        expected = attend(q, k, v, gate, cu_seqlens)
        for _ in range(2):
            out = compiled(q, k, v, gate, cu_seqlens)
            torch.testing.assert_close(out, expected)
    assert counter.frame_count == 1
