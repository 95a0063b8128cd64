"""Fused XSA attention vs its baselines, forward and forward+backward, bf16, at the training shape.

    python -m bench.xsa_attention [--smoke] [--preset NAME] [--name value ...]

Shape (`shape`): q [B, T, H, D], k and v [B, T, Hkv, D] for one training micro-batch per GPU, from
the config (SPEC: B = 786,432 / 8 / 2048 = 48 sequences, T = 2048, H = 8, Hkv = 4, D = 64).

Variants: the Triton kernel; kernels.reference.xsa_attention_sdpa (SDPA flash + eager XSA, the
practical baseline and the speed-up's denominator); torch.compile of that; FlashAttention-3
(`flash_attn_interface`) + eager XSA when it is importable. Goal: fwd+bwd with XSA >= 1.3x SDPA.
"""
import torch

from bench.common import Bench, micro_batch, table, variant_rows
from kernels import reference

# flash-attention's convention: the backward costs 2.5 forwards (5 matmuls to the forward's 2).
BWD_OVER_FWD = 2.5
FLOP_FORMULA = (
    "fwd FLOPs = 4*B*H*T*T*D/2 (QK^T and PV, causal half); "
    f"fwd+bwd = (1 + {BWD_OVER_FWD}) x fwd (bwd = {BWD_OVER_FWD} x fwd); XSA's O(B*T*H*D) epilogue not counted"
)


def shape(cfg) -> dict:
    """B, T, H, Hkv, D of the attention in one training micro-batch."""
    B, T = micro_batch(cfg)
    return dict(B=B, T=T, H=cfg.num_heads, Hkv=cfg.num_kv_heads, D=cfg.head_dim)


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
    B, T, H, Hkv, D = shape(bench.cfg).values()
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=bench.device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(q)
    rows = []
    for xsa in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            timed = bench.measure({name: timed_call(fn, q, k, v, dy, xsa, mode) for name, fn in variants(bench).items()})
            labels = {"shape B,T,H,Hkv,D": f"{B},{T},{H},{Hkv},{D}", "xsa": xsa, "pass": mode}
            rows += variant_rows(labels, timed, flops=causal_attention_flops(B, T, H, D, mode),
                                 baselines={"sdpa": "sdpa + eager xsa"})
    print(bench.header("xsa_attention (bf16)"))
    print(FLOP_FORMULA + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
