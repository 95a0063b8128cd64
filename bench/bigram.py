"""BigramHash embedding at the model's shape: Triton (atomic / deterministic backward) vs eager vs compiled.

    python -m bench.bigram [--smoke]

ids [48, 2048] (one micro-batch per GPU), table 2048 x 128 bf16. Token ids are drawn from a
Zipf-like law over the 1024-token vocab (p ~ 1/rank), so buckets are as unevenly filled as in real
text: the deterministic backward's per-bucket loops see their long tail.
Variants: forward alone; forward + backward (the table gradient, via torch.autograd.grad, from a
fixed bf16 upstream gradient). Eager = kernels.reference (F.embedding of the reference hash),
compiled = torch.compile of it.
Bytes (the minimum traffic, the same numerator for every variant): forward reads the int64 ids and
one table row per position and writes the output; the backward reads the upstream gradient and
the ids and writes the table gradient once.
"""
import torch

from bench.common import Bench, table

SHAPE = dict(B=48, T=2048, BUCKETS=2048, D=128, VOCAB=1024)
SMOKE_SHAPE = dict(B=2, T=37, BUCKETS=64, D=24, VOCAB=50)  # --smoke: odd T, D not a power of two


def forward_bytes(b: int, t: int, d: int, elem: int = 2) -> int:
    return b * t * 8 + 2 * b * t * d * elem


def backward_bytes(b: int, t: int, d: int, buckets: int, elem: int = 2) -> int:
    return b * t * 8 + b * t * d * elem + buckets * d * elem


def zipf_ids(b: int, t: int, vocab: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    p = 1.0 / torch.arange(1, vocab + 1, device=device, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), b * t, replacement=True, generator=gen).reshape(b, t)


def main(argv=None) -> None:
    bench = Bench("bench.bigram", argv)
    B, T, BUCKETS, D, VOCAB = bench.shapes(SHAPE, SMOKE_SHAPE).values()
    from kernels import reference
    from kernels.ops import bigram

    ids = zipf_ids(B, T, VOCAB, bench.device)
    table_w = (torch.randn(BUCKETS, D, device=bench.device) * 0.02).bfloat16().requires_grad_()
    grad = torch.randn(B, T, D, device=bench.device).bfloat16()

    forward = {
        "triton": lambda i, w: bigram.bigram_embed(i, w),
        "triton deterministic": lambda i, w: bigram.bigram_embed(i, w, True),
        "eager": reference.bigram_embed,
        "compiled": bench.compiled(reference.bigram_embed),
    }
    ref_out = reference.bigram_embed(ids, table_w)
    ref_grad = torch.autograd.grad(reference.bigram_embed(ids, table_w.float()), table_w, grad.float())[0]
    for name, fn in forward.items():
        assert torch.equal(fn(ids, table_w), ref_out), f"{name}: forward disagrees with the reference"
        got = torch.autograd.grad(fn(ids, table_w), table_w, grad)[0].float()
        torch.testing.assert_close(got, ref_grad.float(), atol=2e-2, rtol=2e-2)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(ids, table_w)
        return run

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(ids, table_w), table_w, grad)

    rows = []
    for what, make, nbytes in (
        ("forward", fwd, forward_bytes(B, T, D)),
        ("forward + backward", fwd_bwd, forward_bytes(B, T, D) + backward_bytes(B, T, D, BUCKETS)),
    ):
        times = {name: bench.ms(make(fn)) for name, fn in forward.items()}
        for name, ms in times.items():
            rows.append({
                "pass": what, "variant": name, "ms": ms, "GB/s": nbytes / ms / 1e6,
                "speed-up vs eager": times["eager"] / ms, "speed-up vs compiled": times["compiled"] / ms,
            })  # fmt: skip

    print(bench.header(f"BigramHash embedding, ids [{B}, {T}] (Zipf over {VOCAB}), table {BUCKETS} x {D} bf16"))
    print(table(rows))


if __name__ == "__main__":
    main()
