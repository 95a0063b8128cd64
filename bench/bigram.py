"""BigramHash embedding at the model's shape: Triton (atomic / deterministic backward) vs eager vs compiled.

    python -m bench.bigram [--smoke] [--preset NAME] [--name value ...]

ids [B, T] (one micro-batch per GPU) and the model's table, buckets x dim, bf16 as the model holds
it (`shape`; SPEC: ids [48, 2048], table 2048 x 128). A model built without BigramHash is said so
in one line, and nothing runs. Token ids are drawn from a Zipf-like law over the vocab
(p ~ 1/rank), so buckets are as unevenly filled as in real text: the deterministic backward's
per-bucket loops see their long tail.
Variants: forward alone; forward + backward (the table gradient, via torch.autograd.grad, from a
fixed bf16 upstream gradient). Eager = kernels.reference (F.embedding of the reference hash),
compiled = torch.compile of it.
Bytes (the minimum traffic, the same numerator for every variant): forward reads the int64 ids and
one table row per position and writes the output; the backward reads the upstream gradient and
the ids and writes the table gradient once.
"""
import torch

from bench.common import Bench, micro_batch, table, variant_rows


def shape(cfg, model) -> dict | None:
    """B, T of one micro-batch, BUCKETS x D of the model's bigram table, VOCAB; None where the
    model has no BigramHash."""
    bigram = getattr(model, "bigram", None)
    if bigram is None:
        return None
    B, T = micro_batch(cfg)
    buckets, dim = bigram.table.shape
    return dict(B=B, T=T, BUCKETS=buckets, D=dim, VOCAB=cfg.vocab_size)


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
    found = shape(bench.cfg, bench.model)
    if found is None:
        print("bench.bigram: this configuration's model has no BigramHash; nothing to benchmark")
        return
    B, T, BUCKETS, D, VOCAB = found.values()
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
        timed = bench.time_variants(forward, make)
        rows += variant_rows(what, timed, nbytes=nbytes, baselines={"eager": "eager", "compiled": "compiled"})

    print(bench.header(f"BigramHash embedding, ids [{B}, {T}] (Zipf over {VOCAB}), table {BUCKETS} x {D} bf16"))
    print(table(rows))


if __name__ == "__main__":
    main()
