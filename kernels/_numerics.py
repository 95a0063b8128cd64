"""Triton device helpers that several kernel families share: exact rounding and a tl.dot that also
hold in Triton's interpreter, so CPU tests can demand the same numbers as torch; the dot precision
every family picks from its operand dtype; constants the kernels' exp2/log2 forms need."""
import math

import torch
import triton
import triton.language as tl

from kernels._launch import INTERPRET

# Softmax in base 2 (exp2 and log2 are the GPU's native forms): exp(x) = exp2(x * LOG2E), log(x) = log2(x) * LN2.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of dtype: fp32 gets true fp32 products ("ieee"; the GPU
    default, tf32, would miss the fp32 tolerance); bf16/fp16 run on the tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"

# Triton's interpreter (3.6 to 3.9) returns garbage from tl.dot on bf16 operands (fp16 and fp32 are
# right). bf16 values and their products are exact in fp32, so there the operands are widened
# first: the sums the GPU's bf16 MMA gives with fp32 accumulation. False on the GPU, where the
# branch compiles away.
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation, right in the interpreter too (_WIDEN_BF16_DOT)."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _round_half_even(x):
    """torch.round on fp32: round to nearest, ties to even (x - floor(x) is exact in fp32)."""
    down = tl.floor(x)
    frac = x - down
    down_is_odd = (down - 2.0 * tl.floor(down * 0.5)) != 0.0
    round_up = (frac > 0.5) | ((frac == 0.5) & down_is_odd)
    return tl.where(round_up, down + 1.0, down)


@triton.jit
def _fp32_to_bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even, in integer ops: the bits torch's .to(bfloat16) gives.

    The GPU's own cast is RNE too, but Triton's interpreter truncates, so the explicit form keeps
    the CPU tests bit-exact and costs a few integer ops in a memory-bound kernel."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN (no carry into the sign)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
