"""int6 fake-quant over every linear weight of the 11-layer model: Triton vs eager vs torch.compile(eager).

    python -m bench.fakequant

Each weight is fp32 (the master copy) and the result is bf16 (the compute dtype), as in the
model under late QAT. Variants:
- triton: one pass, fp32 in, bf16 out (fakequant.int6_fakequant(w, torch.bfloat16));
- triton fp32 + cast: the fp32 result then .to(bf16), what CastedLinear does with int6_fakequant(w);
- eager: kernels.reference quantise -> dequantise -> .to(bf16);
- compiled: torch.compile of that eager function.
Bytes: 4 read + 2 written per element (the minimum for fp32 -> bf16; the same numerator for
every variant, so GB/s compare). Fraction: of bench.common.copy_bandwidth_gbs(), measured here.
The last row runs all 68 weights back to back (one QAT forward's worth), launches included.
"""
import torch

from bench.common import compiled, copy_bandwidth_gbs, header, median_ms, require_gpu, table

# (name, rows = out_features, n = in_features, how many in the model)
LAYERS = 11
MODEL_WEIGHTS = [
    ("attn q", 512, 512, LAYERS),
    ("attn k", 256, 512, LAYERS),
    ("attn v", 256, 512, LAYERS),
    ("attn out", 512, 512, LAYERS),
    ("mlp fc", 1536, 512, LAYERS),
    ("mlp proj", 512, 1536, LAYERS),
    ("bigram proj", 512, 128, 1),
    ("VE proj", 256, 128, 1),
]


def weight_list() -> list[tuple[str, int, int]]:
    """Every linear weight of the model, one entry each: 6 x 11 + 2 = 68."""
    return [(name, rows, n) for name, rows, n, count in MODEL_WEIGHTS for _ in range(count)]


def moved_bytes(rows: int, n: int) -> int:
    """fp32 read + bf16 written."""
    return rows * n * (4 + 2)


def main() -> None:
    require_gpu("bench.fakequant")
    from kernels import fakequant, reference

    def eager(w):
        return reference.int6_dequantize(*reference.int6_quantize(w), dtype=torch.bfloat16)

    variants = {
        "triton": lambda w: fakequant.int6_fakequant(w, torch.bfloat16),
        "triton fp32 + cast": lambda w: fakequant.int6_fakequant(w).to(torch.bfloat16),
        "eager": eager,
        "compiled": compiled(eager),
    }
    copy_gbs = copy_bandwidth_gbs()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def row(shape_name, fn_by_variant, nbytes):
        times = {name: median_ms(fn) for name, fn in fn_by_variant.items()}
        rows = []
        for name, ms in times.items():
            gbs = nbytes / ms / 1e6
            rows.append({
                "weight": shape_name, "variant": name, "ms": ms, "GB/s": gbs,
                "of copy bw": gbs / copy_gbs, "speed-up vs eager": times["eager"] / ms,
            })  # fmt: skip
        return rows

    results = []
    for name, rows, n, count in MODEL_WEIGHTS:
        w = torch.randn(rows, n, device="cuda", generator=gen) * 0.02
        for fn in variants.values():  # every variant must give the exporter's bits
            assert torch.equal(fn(w), eager(w)), f"{name}: variant disagrees with the reference"
        fns = {v: (lambda f=f, w=w: f(w)) for v, f in variants.items()}
        results += row(f"{name} {rows}x{n} (x{count})", fns, moved_bytes(rows, n))

    weights = [torch.randn(r, n, device="cuda", generator=gen) * 0.02 for _, r, n in weight_list()]
    total = sum(moved_bytes(*w.shape) for w in weights)
    fns = {v: (lambda f=f: [f(w) for w in weights]) for v, f in variants.items()}
    results += row(f"all {len(weights)} weights", fns, total)

    print(header("int6 fake-quant, fp32 weight -> bf16"))
    print(f"copy bandwidth measured: {copy_gbs:.0f} GB/s\n")
    print(table(results))


if __name__ == "__main__":
    main()
