"""int6 fake-quant kernels (kernels/ops/fakequant.py) against kernels.reference: bit-exact, not within a tolerance.

The kernel must give the exporter's own numbers, so every comparison is torch.equal. No tl.dot
here, so bf16 runs on the CPU too (the interpreter's own bf16 cast truncates; the kernel's
explicit round-to-nearest-even cast is what these tests pin down).
"""
import pytest
import torch

import kernels
from kernels import _launch, reference
from kernels.ops import fakequant
from tests.conftest import DEVICE
from tests.kernels.gpu_tiles import is_power_of_two

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape): ragged widths, one row, many rows, a width past MAX_BLOCK_N (two-pass loop), leading dims
SHAPES = [(1, 1), (1, 33), (7, 33), (130, 96), (300, 128), (3, 2100), (2, 3, 40), (50,)]


def make_weight(shape, dtype, seed):
    """Random rows (std 0.02, like the model's) plus the special rows the scale must get right."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    flat = w.view(-1, shape[-1])
    rows = flat.shape[0]
    if rows > 1:
        flat[1] = 0.0  # all zeros: scale = floor 1/31, q = 0
    if rows > 2:
        flat[2] *= 1e-3  # tiny row: hits the 1/31 floor
    if rows > 3:
        flat[3] *= 5e3  # large row: scale well above the floor
    return w.to(DEVICE, dtype)


def expected(w):
    q, scale = reference.int6_quantize(w)
    return reference.int6_dequantize(q, scale, dtype=w.dtype), q, scale


def test_outputs_are_poisoned_in_tests():
    assert _launch.POISON


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_with_reference(shape, dtype):
    w = make_weight(shape, dtype, seed=sum(shape))
    deq_ref, q_ref, scale_ref = expected(w)
    deq = fakequant.int6_fakequant(w)
    q, scale = fakequant.int6_quantize(w)
    assert deq.dtype == dtype and q.dtype == torch.int8 and scale.dtype == torch.float16
    assert deq.shape == w.shape and q.shape == w.shape and scale.shape == w.shape[:-1]
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(deq, deq_ref)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 33), (130, 96), (3, 2100)], ids=str)
def test_fp32_weight_straight_to_compute_dtype(shape, out_dtype):
    # The model's path: fp32 master weights, bf16 compute: one pass, the bits of dequantise-then-cast.
    w = make_weight(shape, torch.float32, seed=sum(shape)).requires_grad_()
    out = fakequant.int6_fakequant(w, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, reference.int6_dequantize(*reference.int6_quantize(w), dtype=out_dtype))
    grad = torch.randn(shape, device=DEVICE).to(out_dtype)
    out.backward(grad)
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, grad.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_round_half_to_even(dtype):
    # absmax = 31 * 2**-4, so scale = 2**-4 exactly (fp16 too) and w / scale = k + 0.5 exactly.
    step = 2.0**-4
    halves = torch.arange(-31, 31) + 0.5  # -30.5 ... 30.5, both parities of the lower neighbour
    w = torch.cat([torch.tensor([31.0]), halves]) * step
    w = torch.stack([w, -w]).to(DEVICE, dtype)  # [2, 63]
    q, scale = fakequant.int6_quantize(w)
    assert torch.all(scale.float() == step)
    assert torch.equal(q[0, 1:].long().cpu(), torch.round(halves).clamp(-32, 31).long())  # half-to-even
    assert torch.equal(q, reference.int6_quantize(w)[0])
    assert torch.equal(fakequant.int6_fakequant(w), expected(w)[0])


def test_two_pass_path_with_many_ragged_chunks(monkeypatch):
    monkeypatch.setattr(fakequant, "MAX_BLOCK_N", 32)
    w = make_weight((9, 101), torch.float32, seed=5)  # 4 chunks of 32, the last one 5 wide
    assert fakequant._blocks(9, 101)[2] is False, "this test must exercise the looped path"
    deq_ref, q_ref, scale_ref = expected(w)
    q, scale = fakequant.int6_quantize(w)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(fakequant.int6_fakequant(w), deq_ref)


# --------------------------------------------------------------------------- the GPU's block sizes
# On a GPU the row count per program is cut until the grid fills two waves of the H100's SMs
# (MIN_PROGRAMS); the interpreter keeps whole 4096-element tiles. No tl.dot and no pipelined loads:
# what a config must keep is shapes tl.arange takes and a tile within TILE_ELEMENTS (registers).
MODEL_WEIGHT_SHAPES = [(512, 512), (256, 512), (1536, 512), (512, 1536), (512, 128), (256, 128)]  # SPEC.md's linears


def test_gpu_block_sizes_keep_the_kernels_rules(monkeypatch):
    monkeypatch.setattr(fakequant, "MIN_PROGRAMS", 2 * _launch.H100_SMS)
    for rows, n in MODEL_WEIGHT_SHAPES + [(3, 2100), (150, 96), (1, 1)]:
        block_rows, block_n, one_tile, num_warps = fakequant._blocks(rows, n)
        what = f"[{rows}, {n}] -> {block_rows} x {block_n}"
        assert is_power_of_two(block_rows) and is_power_of_two(block_n), what
        assert block_n <= fakequant.MAX_BLOCK_N and block_rows * block_n <= max(fakequant.TILE_ELEMENTS, block_n), what
        assert one_tile == (n <= block_n) and 2 <= num_warps <= 8, what


@pytest.mark.parametrize("shape", [(150, 96), (3, 2100)], ids=str)
def test_gpu_block_sizes_in_interpreter(monkeypatch, shape):
    # 150 rows: one row per program as on a GPU (150 < 264 programs); 2100 wide: the two-pass loop
    monkeypatch.setattr(fakequant, "MIN_PROGRAMS", 2 * _launch.H100_SMS)
    assert fakequant._blocks(*shape)[0] == 1
    w = make_weight(shape, torch.float32, seed=12)
    deq_ref, q_ref, scale_ref = expected(w)
    q, scale = fakequant.int6_quantize(w)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(fakequant.int6_fakequant(w), deq_ref)


def test_non_contiguous_weight():
    w = make_weight((40, 24), torch.float32, seed=9).T  # [24, 40], strides (1, 24)
    assert not w.is_contiguous()
    assert torch.equal(fakequant.int6_fakequant(w), expected(w)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_passes_straight_through(dtype):
    w = make_weight((7, 33), dtype, seed=1).requires_grad_()
    grad = torch.randn(7, 33, device=DEVICE).to(dtype)
    fakequant.int6_fakequant(w).backward(grad)
    assert torch.equal(w.grad, grad)
    w.grad = None
    fakequant.int6_fakequant(w).sum().backward()  # expanded stride-0 gradient
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="non-empty last dim"):
        fakequant.int6_fakequant(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="non-empty last dim"):
        fakequant.int6_quantize(torch.zeros(3, 0, device=DEVICE))
    with pytest.raises(TypeError, match="pass float32, bfloat16 or float16"):
        fakequant.int6_fakequant(torch.zeros(3, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="out_dtype torch.int8 is not supported"):
        fakequant.int6_fakequant(torch.zeros(3, 4, device=DEVICE), torch.int8)


def test_zero_rows_give_empty_outputs():
    w = torch.zeros(0, 16, device=DEVICE)
    q, scale = fakequant.int6_quantize(w)
    assert fakequant.int6_fakequant(w).shape == (0, 16) and q.shape == (0, 16) and scale.shape == (0,)


def test_opcheck():
    w = make_weight((5, 33), torch.float32, seed=2)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.golf.int6_fakequant, (w.clone().requires_grad_(),), test_utils=checks)
    to_bf16 = (w.clone().requires_grad_(), torch.bfloat16)
    torch.library.opcheck(torch.ops.golf.int6_fakequant, to_bf16, test_utils=checks)
    torch.library.opcheck(torch.ops.golf.int6_quantize, (w,), test_utils=checks)


def test_public_api_routes_to_triton():
    w = make_weight((7, 33), torch.float32, seed=4)
    with kernels.use_backend("triton"):
        assert kernels._impl("int6_fakequant") is fakequant.int6_fakequant
        assert kernels._impl("int6_quantize") is fakequant.int6_quantize
        assert torch.equal(kernels.int6_fakequant(w), expected(w)[0])


def _compile_check(backend):
    """Forward + backward through torch.compile(fullgraph=True); a second same-shape input must not recompile."""

    def loss_fn(w, x):
        # the public API, and the one-pass fp32 -> bf16 form the model can use
        both = kernels.int6_fakequant(w) + fakequant.int6_fakequant(w, torch.bfloat16).float()
        return (x @ both.T).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    with kernels.use_backend("triton"):
        for seed in (0, 1):
            w = make_weight((24, 40), torch.float32, seed=seed).requires_grad_()
            x = torch.randn(3, 40, device=DEVICE)
            w_ref = w.detach().clone().requires_grad_()
            with torch.compiler.set_stance("fail_on_recompile" if seed else "default"):
                loss = compiled(w, x)
            loss.backward()
            both_ref = reference.int6_fakequant(w_ref) + reference.int6_fakequant(w_ref).bfloat16().float()
            loss_ref = (x @ both_ref.T).square().sum()
            loss_ref.backward()
            torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_eager_backend_no_recompile():
    torch._dynamo.reset()
    _compile_check("eager")


@pytest.mark.gpu
def test_compile_inductor():
    torch._dynamo.reset()
    _compile_check("inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_shapes_bit_exact_on_gpu(dtype):
    # The model's linear weights, at the scale training leaves them, compiled (not interpreted) kernels.
    shapes = [(512, 512), (256, 512), (1536, 512), (512, 1536), (512, 128), (256, 128), (3, 4097)]
    for seed, (rows, n) in enumerate(shapes):
        w = make_weight((rows, n), dtype, seed=seed)
        deq_ref, q_ref, scale_ref = expected(w)
        q, scale = fakequant.int6_quantize(w)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        assert torch.equal(fakequant.int6_fakequant(w), deq_ref)
