"""Triton device helpers that several kernel families share: exact rounding that also holds in
Triton's interpreter, so CPU tests can demand the same bits as torch."""
import triton
import triton.language as tl


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
