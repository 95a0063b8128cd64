"""Fused XSA attention vs its baselines, forward and forward+backward, bf16, at the training shape.

    python -m bench.xsa_attention [--smoke]

Variants: the Triton kernel; kernels.reference.xsa_attention_sdpa (SDPA flash + eager XSA, the
practical baseline and the speed-up's denominator); torch.compile of that; FlashAttention-3
(`flash_attn_interface`) + eager XSA when it is importable. Goal: fwd+bwd with XSA >= 1.3x SDPA.
"""
import torch

from bench.common import Bench, table
from kernels import reference

SHAPE = dict(B=48, T=2048, H=8, Hkv=4, D=64)
SMOKE_SHAPE = dict(B=2, T=70, H=4, Hkv=2, D=16)  # --smoke: T ragged against every block
# flash-attention's convention: the backward costs 2.5 forwards (5 matmuls to the forward's 2).
BWD_OVER_FWD = 2.5
FLOP_FORMULA = (
    "fwd FLOPs = 4*B*H*T*T*D/2 (QK^T and PV, causal half); "
    f"fwd+bwd = (1 + {BWD_OVER_FWD}) x fwd (bwd = {BWD_OVER_FWD} x fwd); XSA's O(B*T*H*D) epilogue not counted"
)


def causal_attention_flops(B: int, T: int, H: int, D: int, mode: str) -> float:
    fwd = 4 * B * H * T * T * D / 2
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return (1 + BWD_OVER_FWD) * fwd
    raise ValueError(f"causal_attention_flops: mode {mode!r} is not 'fwd' or 'fwd+bwd'")


def flash3_with_eager_xsa():
    """FlashAttention-3 plus the eager XSA projection, or None where flash_attn_interface is missing."""
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:
        return None

    def fn(q, k, v, xsa=False):
        y = flash_attn_func(q, k, v, causal=True)  # [B, T, H, D]; GQA native
        y = y[0] if isinstance(y, tuple) else y  # some releases also return the LSE
        if xsa:
            vh = v.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            y = reference.xsa_project(y, vh)
        return y

    return fn


def variants(bench: Bench):
    from kernels.ops.xsa_attention import xsa_attention

    found = {
        "triton": xsa_attention,
        "sdpa + eager xsa": reference.xsa_attention_sdpa,
        "compile(sdpa + eager xsa)": bench.compiled(reference.xsa_attention_sdpa),
    }
    fa3 = flash3_with_eager_xsa()
    if fa3 is not None:
        found["flash-attn 3 + eager xsa"] = fa3
    return found


def timed_call(fn, q, k, v, dy, xsa: bool, mode: str):
    if mode == "fwd":
        return lambda: fn(q, k, v, xsa)
    return lambda: torch.autograd.grad(fn(q, k, v, xsa), (q, k, v), dy)


def main(argv=None):
    bench = Bench("bench.xsa_attention", argv)
    B, T, H, Hkv, D = bench.shapes(SHAPE, SMOKE_SHAPE).values()
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(q)
    rows = []
    for xsa in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            flops = causal_attention_flops(B, T, H, D, mode)
            timings = {}
            for name, fn in variants(bench).items():
                call = timed_call(fn, q, k, v, dy, xsa, mode)
                call()  # autotune / compile outside the timed region
                bench.synchronize()
                timings[name] = bench.ms(call)
            baseline = timings["sdpa + eager xsa"]
            for name, ms in timings.items():
                rows.append(
                    {
                        "shape B,T,H,Hkv,D": f"{B},{T},{H},{Hkv},{D}",
                        "xsa": xsa,
                        "pass": mode,
                        "variant": name,
                        "median ms": ms,
                        "TFLOP/s": flops / ms / 1e9,
                        "speed-up vs sdpa": baseline / ms,
                    }
                )
    print(bench.header("xsa_attention (bf16)"))
    print(FLOP_FORMULA + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
