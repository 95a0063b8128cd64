"""Fused XSA attention vs its baselines, forward and forward+backward, bf16, at the seed's and the
frontier's shapes.

    python -m bench.xsa_attention [--smoke] [--preset NAME] [--name value ...]

Shapes, from the config's training micro-batch per GPU (SPEC: 48 rows x 2048 tokens, H = 8,
Hkv = 4, D = 64; `shape`):
- seed: q [B, T, H, D], k/v [B, T, Hkv, D], plain causal rows (cu_seqlens=None);
- frontier: the same tokens as ONE packed row [1, B*T] cut into documents (FRONTIER.md section 3):
  cu_seqlens = every BOS (id 1) and a cut every train_seq_len tokens inside a document, taken from
  the first B*T + 1 tokens of the shared FineWeb sample's shard 0 from its first BOS
  (model.document_loader.document_cu_seqlens, as the frontier's loader does) when the shards are
  present, else from `synthetic_offsets` (log-normal document lengths, stated there).

Cases: seed without XSA; seed with XSA and the output gate; frontier with XSA, gate and segments.
Variants: the Triton kernel (one-pass backward, and deterministic=True for fwd+bwd);
FlexAttention (torch.compile'd, causal or document block mask) + eager XSA + eager gate: the fair
compiled baseline for segments and the frontier's speed-up denominator; SDPA (flash) + eager XSA
+ gate and its torch.compile where there are no segments (the seed's denominator);
FlashAttention-3 (`flash_attn_interface`, varlen for segments) + eager XSA + gate when importable.
Goals (issue 15): forward >= 0.9x FA3; fwd+bwd with XSA and gate >= 1.3x the FlexAttention path.
"""
import glob
import os

import torch

from bench.common import Bench, micro_batch, table, variant_rows
from kernels import reference

# flash-attention's convention: the backward costs 2.5 forwards (5 matmuls to the forward's 2).
BWD_OVER_FWD = 2.5
FLOP_FORMULA = (
    "fwd FLOPs = 4*H*D*W, W = sum over segments (rows without cu_seqlens) of L*(L+1)/2, the causal in-segment "
    f"(query, key) pairs (QK^T and PV); fwd+bwd = (1 + {BWD_OVER_FWD}) x fwd; XSA's and the gate's O(T*H*D) not counted"
)
FINEWEB_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fineweb10B_sp1024_sample")


def shape(cfg) -> dict:
    """B, T, H, Hkv, D of the attention in one training micro-batch."""
    B, T = micro_batch(cfg)
    return dict(B=B, T=T, H=cfg.num_heads, Hkv=cfg.num_kv_heads, D=cfg.head_dim)


def in_segment_pairs(offsets: list[int]) -> int:
    """W: the causal (query, key) pairs inside the segments the offsets cut."""
    return sum((b - a) * (b - a + 1) // 2 for a, b in zip(offsets[:-1], offsets[1:]))


def attention_flops(H: int, D: int, pairs: int, mode: str) -> float:
    fwd = 4 * H * D * pairs
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return (1 + BWD_OVER_FWD) * fwd
    raise ValueError(f"attention_flops: mode {mode!r} is not 'fwd' or 'fwd+bwd'")


def synthetic_offsets(total: int, cut: int, seed: int = 0) -> list[int]:
    """cu_seqlens of one packed row of `total` tokens without the shards: document lengths log-normal
    (mu 6.1, sigma 1.2: median about 450 tokens, a long tail), each cut every `cut` tokens, padded with
    `total` to a multiple of 64 entries."""
    g = torch.Generator().manual_seed(seed)
    offsets, t = [0], 0
    while t < total:
        doc = max(1, int(torch.empty(1).log_normal_(6.1, 1.2, generator=g)))
        while doc > 0 and t < total:
            t = min(total, t + min(cut, doc))
            doc -= cut
            offsets.append(t)
    return offsets + [total] * (-len(offsets) % 64)


def frontier_offsets(total: int, cut: int) -> tuple[list[int], str]:
    """(cu_seqlens of one packed row of `total` tokens, where its documents came from)."""
    shards = sorted(glob.glob(os.path.join(FINEWEB_SAMPLE, "fineweb_train_*.bin")))
    if shards:
        from model.data import read_shard
        from model.document_loader import BOS_ID, document_cu_seqlens

        tokens = read_shard(shards[0])
        first = int((tokens == BOS_ID).argmax())
        if tokens[first] == BOS_ID and tokens.size - first > total:
            x = torch.from_numpy(tokens[first : first + total].astype("int64"))
            return document_cu_seqlens(x[None], cut).tolist(), f"{os.path.basename(shards[0])} from its first BOS"
    return synthetic_offsets(total, cut), "synthetic log-normal document lengths (no FineWeb shards found)"


def _gated(y, v, gate, xsa):
    """Eager XSA and output gate on y [B, T, H, D] (the baselines' epilogue)."""
    if xsa:
        y = reference.xsa_project(y, v.repeat_interleave(y.shape[2] // v.shape[2], dim=2))
    if gate is not None:
        y = (y * reference.output_gate(gate).unsqueeze(-1)).to(v.dtype)
    return y


def flex_with_eager_xsa(bench: Bench, offsets):
    """torch.compile'd FlexAttention with a causal (offsets None) or document block mask, plus eager XSA and gate."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = bench.compiled(flex_attention)
    masks = {}

    def block_mask(B, T, device):
        if (B, T) not in masks:
            if offsets is None:
                def visible(b, h, q_idx, kv_idx):
                    return q_idx >= kv_idx
            else:
                cu = torch.tensor(offsets, dtype=torch.int32, device=device)
                doc = torch.searchsorted(cu, torch.arange(B * T, device=device, dtype=torch.int32), right=True).view(B, T)

                def visible(b, h, q_idx, kv_idx):
                    return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])
            # compiled on a GPU: the eager path would materialise the T x T mask (9.6 GB at T = 98,304)
            masks[(B, T)] = create_block_mask(visible, B, None, T, T, device=device, _compile=bench.cuda)
        return masks[(B, T)]

    def fn(q, k, v, xsa, cu_seqlens, gate):
        B, T = q.shape[:2]
        y = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask(B, T, q.device),
                 enable_gqa=q.shape[2] != k.shape[2])
        return _gated(y.transpose(1, 2), v, gate, xsa)

    return fn


def sdpa_with_eager_xsa(q, k, v, xsa, cu_seqlens, gate):
    return reference.xsa_attention_sdpa(q, k, v, xsa, gate)


def flash3_with_eager_xsa(offsets, device):
    """FlashAttention-3 (varlen over the segments of `offsets`, else causal rows) plus eager XSA and gate,
    or None where flash_attn_interface is missing."""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    if offsets is not None:
        distinct = sorted(set(offsets))  # without the padding's empty segments
        cu = torch.tensor(distinct, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(distinct[:-1], distinct[1:]))  # the training step passes 2048

    def fn(q, k, v, xsa, cu_seqlens, gate):
        B, T, H, D = q.shape
        if offsets is None:
            y = flash_attn_func(q, k, v, causal=True)  # [B, T, H, D]; GQA native
        else:
            y = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, longest, longest,
                                       causal=True)
        y = y[0] if isinstance(y, tuple) else y  # some releases also return the LSE
        return _gated(y.view(B, T, H, D), v, gate, xsa)

    return fn


def flex_name(bench: Bench) -> str:
    """FlexAttention has no backward on the CPU: a smoke run there times the eager reference in its place."""
    return "flex + eager xsa, gate" if bench.cuda else "eager reference (flex: no CPU backward)"


def variants(bench: Bench, offsets, mode: str) -> dict:
    from kernels.ops.xsa_attention import xsa_attention

    found = {"triton": lambda q, k, v, xsa, cu, gate: xsa_attention(q, k, v, xsa, cu, gate)}
    if mode == "fwd+bwd":
        found["triton deterministic"] = lambda q, k, v, xsa, cu, gate: xsa_attention(q, k, v, xsa, cu, gate, True)
    found[flex_name(bench)] = flex_with_eager_xsa(bench, offsets) if bench.cuda else reference.xsa_attention
    if offsets is None:
        found["sdpa + eager xsa, gate"] = sdpa_with_eager_xsa
        found["compile(sdpa + eager xsa, gate)"] = bench.compiled(sdpa_with_eager_xsa)
    fa3 = flash3_with_eager_xsa(offsets, bench.device)
    if fa3 is not None:
        found["flash-attn 3 + eager xsa, gate"] = fa3
    return found


def timed_call(fn, inputs: dict, mode: str):
    q, k, v, gate = inputs["q"], inputs["k"], inputs["v"], inputs["gate"]
    call = lambda: fn(q, k, v, inputs["xsa"], inputs["cu_seqlens"], gate)  # noqa: E731
    if mode == "fwd":
        return call
    leaves = (q, k, v) if gate is None else (q, k, v, gate)
    return lambda: torch.autograd.grad(call(), leaves, inputs["dy"])


def main(argv=None):
    bench = Bench("bench.xsa_attention", argv)
    B, T, H, Hkv, D = shape(bench.cfg).values()
    offsets, source = frontier_offsets(B * T, bench.cfg.train_seq_len)
    cases = [  # name, rows, row length, xsa, gated, segment offsets
        ("seed", B, T, False, False, None),
        ("seed", B, T, True, True, None),
        ("frontier", 1, B * T, True, True, offsets),
    ]
    torch.manual_seed(0)
    rows = {"seed": [], "frontier": []}
    for name, rows_n, length, xsa, gated, case_offsets in cases:
        make = lambda *s: torch.randn(*s, device=bench.device, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
        inputs = dict(
            q=make(rows_n, length, H, D), k=make(rows_n, length, Hkv, D), v=make(rows_n, length, Hkv, D),
            gate=torch.randn(rows_n, length, H, device=bench.device, requires_grad=True) if gated else None,
            cu_seqlens=None if case_offsets is None else torch.tensor(case_offsets, dtype=torch.int32, device=bench.device),
            xsa=xsa,
        )
        inputs["dy"] = torch.randn_like(inputs["q"])
        pairs = in_segment_pairs(case_offsets if case_offsets is not None else [b * length for b in range(rows_n + 1)])
        for mode in ("fwd", "fwd+bwd"):
            found = variants(bench, case_offsets, mode)
            timed = bench.measure({variant: timed_call(fn, inputs, mode) for variant, fn in found.items()})
            labels = {"case": name, "shape B,T,H,Hkv,D": f"{rows_n},{length},{H},{Hkv},{D}",
                      "xsa, gate": f"{xsa}, {gated}", "pass": mode}
            baselines = {"flex": flex_name(bench)}
            if case_offsets is None:
                baselines["sdpa"] = "sdpa + eager xsa, gate"
            rows[name] += variant_rows(labels, timed, flops=attention_flops(H, D, pairs, mode), baselines=baselines)
    print(bench.header("xsa_attention (bf16)"))
    segments = [b - a for a, b in zip(offsets[:-1], offsets[1:]) if b > a]
    print(f"Frontier row: {len(segments)} segments of {min(segments)}-{max(segments)} tokens "
          f"(mean {sum(segments) / len(segments):.0f}) from {source}.")
    print(FLOP_FORMULA + "\n")
    for name, case_rows in rows.items():  # one table per shape: their speed-up columns differ
        print(table(case_rows) + "\n")


if __name__ == "__main__":
    main()
