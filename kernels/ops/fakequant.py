"""int6 fake-quant STE: per-row absmax, fp16 scale, round, clamp, dequantise, in one pass per row block.

Bit-exact with kernels.reference.int6_quantize / int6_dequantize (the exporter's own numbers), so
the weights the model trains against under late QAT are exactly the weights it is scored with.
What exactness takes, operation by operation (the reference computes in fp32 from w.float()):
- scale = max(absmax / 31, 1/31) in fp32, then rounded to fp16 (RNE) and widened back; the
  division must be IEEE round-to-nearest (tl.math.div_rn), never a multiply by 1/31 or an
  approximate divide, or a row lands one fp16 ulp off.
- q = round(w / scale) with torch.round's half-to-even (w / scale again by div_rn), clamped to
  [-32, 31]; the rounding is written out with floor (portable: compiled and interpreted alike).
- dequantised = q * scale in fp32, one multiply (nothing to contract into an FMA), then cast to
  w's dtype with RNE, as torch's .to() does.

Layout: w is viewed as [rows, n] (leading dims flattened); one program owns BLOCK_ROWS whole rows.
A row of up to MAX_BLOCK_N elements stays in registers between the absmax and the quantise step
(one read of w); wider rows are streamed twice (absmax pass, then quantise pass).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._launch import H100_SMS, INTERPRET, new_output, register_cpu_and_fake, wrap_triton
from kernels._numerics import _fp32_to_bf16_rne, _round_half_even

# The export's int6 range, as fp32 constants for the kernel (it computes in fp32).
INT6_MIN = tl.constexpr(float(reference.INT6_MIN))
INT6_MAX = tl.constexpr(float(reference.INT6_MAX))
MAX_BLOCK_N = 2048  # widest row kept whole in registers (the model's widest row is 1536)
TILE_ELEMENTS = 4096  # elements per program before the row count is cut to fill the GPU
# About two waves on an H100, so small weights still spread over every SM. The interpreter
# has no SMs to fill and pays per program: there, whole tiles of rows (ragged row masks tested).
MIN_PROGRAMS = 1 if INTERPRET else 2 * H100_SMS
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_scale(absmax):
    """[R] fp32 absmax -> [R] fp32 value of the fp16 scale max(absmax / 31, 1/31)."""
    scale = tl.maximum(tl.math.div_rn(absmax, INT6_MAX), 1.0 / INT6_MAX)
    return scale.to(tl.float16).to(tl.float32)


@triton.jit
def _quantize_tile(
    w, scale, offsets, mask, deq_ptr, q_ptr,
    WRITE_DEQUANT: tl.constexpr, WRITE_QUANT: tl.constexpr, OUT_BF16: tl.constexpr,
):
    """w [R, C] fp32, scale [R] fp32: store q (int8) and/or q * scale (in deq_ptr's dtype)."""
    scaled = tl.math.div_rn(w, scale[:, None])
    q = tl.minimum(tl.maximum(_round_half_even(scaled), INT6_MIN), INT6_MAX)
    if WRITE_QUANT:
        tl.store(q_ptr + offsets, q.to(tl.int8), mask=mask)
    if WRITE_DEQUANT:
        dequantised = q * scale[:, None]
        if OUT_BF16:
            tl.store(deq_ptr + offsets, _fp32_to_bf16_rne(dequantised), mask=mask)
        else:
            tl.store(deq_ptr + offsets, dequantised.to(deq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int6_rows_kernel(
    w_ptr,  # [rows, n], any float dtype
    deq_ptr,  # [rows, n] in the output dtype, or None
    q_ptr,  # [rows, n] int8, or None
    scale_ptr,  # [rows] fp16, or None
    rows,
    n,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_IN_ONE_TILE: tl.constexpr,
    WRITE_DEQUANT: tl.constexpr,
    WRITE_QUANT: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
    row_ok = row < rows
    row_start = row.to(tl.int64)[:, None] * n  # [R, 1]; int64: rows * n may pass 2**31
    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, C]
    if ROW_IN_ONE_TILE:
        mask = row_ok[:, None] & (cols < n)
        w = tl.load(w_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(w), axis=1))
        _quantize_tile(w, scale, row_start + cols, mask, deq_ptr, q_ptr, WRITE_DEQUANT, WRITE_QUANT, OUT_BF16)
    else:
        absmax = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < n)
            w = tl.load(w_ptr + row_start + start + cols, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(w), axis=1))
        scale = _row_scale(absmax)
        for start in range(0, n, BLOCK_N):
            mask = row_ok[:, None] & (start + cols < n)
            w = tl.load(w_ptr + row_start + start + cols, mask=mask, other=0.0).to(tl.float32)
            offsets = row_start + start + cols
            _quantize_tile(w, scale, offsets, mask, deq_ptr, q_ptr, WRITE_DEQUANT, WRITE_QUANT, OUT_BF16)
    if WRITE_QUANT:
        tl.store(scale_ptr + row, scale.to(tl.float16), mask=row_ok)


# --------------------------------------------------------------------------- launch


def _check_weight(w: torch.Tensor, where: str, out_dtype: Optional[torch.dtype] = None) -> None:
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(
            f"{where}: w must have a non-empty last dim (the row being quantised), got shape {tuple(w.shape)}"
        )
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: w has dtype {w.dtype}; pass float32, bfloat16 or float16 weights")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: out_dtype {out_dtype} is not supported; use float32, bfloat16 or float16")


def _blocks(rows: int, n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_ROWS, BLOCK_N, ROW_IN_ONE_TILE, num_warps) for a [rows, n] weight."""
    block_n = min(triton.next_power_of_2(n), MAX_BLOCK_N)
    block_rows = max(1, TILE_ELEMENTS // block_n)
    while block_rows > 1 and triton.cdiv(rows, block_rows) < MIN_PROGRAMS:
        block_rows //= 2
    num_warps = max(2, min(8, block_rows * block_n // 256))  # 8 elements per thread, 2 to 8 warps
    return block_rows, block_n, n <= block_n, num_warps


def _launch(w: torch.Tensor, deq, q, scale) -> None:
    n = w.shape[-1]
    rows = w.numel() // n
    if rows == 0:
        return
    block_rows, block_n, one_tile, num_warps = _blocks(rows, n)
    wrap_triton(_int6_rows_kernel)[(triton.cdiv(rows, block_rows),)](
        w, deq, q, scale, rows, n,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n, ROW_IN_ONE_TILE=one_tile,
        WRITE_DEQUANT=deq is not None, WRITE_QUANT=q is not None,
        OUT_BF16=deq is not None and deq.dtype == torch.bfloat16, num_warps=num_warps,
    )  # fmt: skip


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("golf::int6_fakequant", mutates_args=())
def int6_fakequant_op(w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    _check_weight(w, "int6_fakequant", out_dtype)
    w = w.contiguous()
    out = new_output(w.shape, out_dtype or w.dtype, w.device)  # [..., n]
    _launch(w, out, None, None)
    return out


@torch.library.triton_op("golf::int6_quantize", mutates_args=())
def int6_quantize_op(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(w, "int6_quantize")
    w = w.contiguous()
    q = new_output(w.shape, torch.int8, w.device)  # [..., n]
    scale = new_output(w.shape[:-1], torch.float16, w.device)  # [...]
    _launch(w, None, q, scale)
    return q, scale


# --------------------------------------------------------------------------- CPU fallbacks and fakes


def int6_fakequant_eager(w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return reference.int6_dequantize(*reference.int6_quantize(w), dtype=out_dtype or w.dtype)


int6_quantize_eager = reference.int6_quantize  # already the op's signature


def _int6_fakequant_fake(w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    _check_weight(w, "int6_fakequant", out_dtype)
    return w.new_empty(w.shape, dtype=out_dtype or w.dtype)


def _int6_quantize_fake(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(w, "int6_quantize")
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:-1], dtype=torch.float16)


register_cpu_and_fake(int6_fakequant_op, reference=int6_fakequant_eager, fake=_int6_fakequant_fake)
register_cpu_and_fake(int6_quantize_op, reference=int6_quantize_eager, fake=_int6_quantize_fake)

# --------------------------------------------------------------------------- autograd


def _int6_fakequant_setup_context(ctx, inputs, output):
    w, _out_dtype = inputs
    ctx.w_dtype = w.dtype


def _int6_fakequant_backward(ctx, grad: torch.Tensor):
    return grad.to(ctx.w_dtype), None  # straight through; a no-op unless out_dtype differed from w's


int6_fakequant_op.register_autograd(_int6_fakequant_backward, setup_context=_int6_fakequant_setup_context)


# --------------------------------------------------------------------------- public API


def int6_fakequant(w: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per-row int6 quantise-dequantise of w [..., n] (bits of the export), straight-through gradient.

    out_dtype (default w's) writes the result straight in the compute dtype: fp32 weights -> bf16
    in one pass, the same bits as quantise-dequantise-then-cast."""
    return int6_fakequant_op(w, out_dtype)


def int6_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int6 q (int8, w's shape) and fp16 scales (w's shape minus the last dim), as exported."""
    return int6_quantize_op(w.detach())  # integer codes: nothing to differentiate


TRITON_IMPLS = {"int6_fakequant": int6_fakequant, "int6_quantize": int6_quantize}
