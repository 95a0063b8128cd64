"""int6 fake-quant over every linear weight of the model: Triton vs eager vs torch.compile(eager).

    python -m bench.fakequant [--smoke] [--preset NAME] [--name value ...]

The weights are the built model's linear layers, the ones late QAT fake-quantises
(`model_weights`; SPEC: 6 per block x 11 + the bigram and VE projections = 68), one row per
layer kind and shape.

Each weight is fp32 (the master copy) and the result is bf16 (the compute dtype), as in the
model under late QAT. Variants:
- triton: one pass, fp32 in, bf16 out (fakequant.int6_fakequant(w, torch.bfloat16));
- triton fp32 + cast: the fp32 result then .to(bf16), what CastedLinear does with int6_fakequant(w);
- eager: kernels.reference quantise -> dequantise -> .to(bf16);
- compiled: torch.compile of that eager function.
Bytes: 4 read + 2 written per element (the minimum for fp32 -> bf16; the same numerator for
every variant, so GB/s compare). Fraction: of Bench.copy_bandwidth_gbs(), measured here.
The last row runs all the weights back to back (one QAT forward's worth), launches included.
"""
import re

import torch

from bench.common import Bench, table, variant_rows


def model_weights(model) -> list[tuple[str, int, int, int]]:
    """(name, rows = out_features, cols = in_features, how many) of every linear layer the model
    fake-quantises under QAT, grouped by name within a block ("attn.c_q") and shape, in model order."""
    from model.gpt import CastedLinear

    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            key = (re.sub(r"^blocks\.\d+\.", "", name), *module.weight.shape)
            counts[key] = counts.get(key, 0) + 1
    return [(name, rows, cols, count) for (name, rows, cols), count in counts.items()]


def weight_list(weights) -> list[tuple[str, int, int]]:
    """Every weight, one entry each."""
    return [(name, rows, n) for name, rows, n, count in weights for _ in range(count)]


def moved_bytes(rows: int, n: int) -> int:
    """fp32 read + bf16 written."""
    return rows * n * (4 + 2)


def main(argv=None) -> None:
    bench = Bench("bench.fakequant", argv)
    weight_shapes = model_weights(bench.model)
    from kernels import reference
    from kernels.ops import fakequant

    def eager(w):
        return reference.int6_dequantize(*reference.int6_quantize(w), dtype=torch.bfloat16)

    variants = {
        "triton": lambda w: fakequant.int6_fakequant(w, torch.bfloat16),
        "triton fp32 + cast": lambda w: fakequant.int6_fakequant(w).to(torch.bfloat16),
        "eager": eager,
        "compiled": bench.compiled(eager),
    }
    copy_gbs = bench.copy_bandwidth_gbs()
    gen = torch.Generator(device=bench.device).manual_seed(0)

    def row(shape_name, fn_by_variant, nbytes):
        return variant_rows({"weight": shape_name}, bench.measure(fn_by_variant), nbytes=nbytes,
                            baselines={"eager": "eager", "compiled": "compiled"}, ceiling=("copy bw", copy_gbs))

    results = []
    # The Triton variants must give the exporter's bits. Inductor's compiled reference divides with
    # the GPU's approximate division (unless TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1), so a scale
    # or a rounded value may land one step off: counted and printed, not fatal.
    differing = {v: 0 for v in variants}
    checked = 0
    for name, rows, n, count in weight_shapes:
        w = torch.randn(rows, n, device=bench.device, generator=gen) * 0.02
        for v, fn in variants.items():
            differing[v] += int((fn(w) != eager(w)).sum())
            assert v == "compiled" or not differing[v], f"{name}: {v} disagrees with the reference"
        checked += w.numel()
        fns = {v: (lambda f=f, w=w: f(w)) for v, f in variants.items()}
        results += row(f"{name} {rows}x{n} (x{count})", fns, moved_bytes(rows, n))

    weights = [torch.randn(r, n, device=bench.device, generator=gen) * 0.02 for _, r, n in weight_list(weight_shapes)]
    total = sum(moved_bytes(*w.shape) for w in weights)
    fns = {v: (lambda f=f: [f(w) for w in weights]) for v, f in variants.items()}
    results += row(f"all {len(weights)} weights", fns, total)

    print(bench.header("int6 fake-quant, fp32 weight -> bf16"))
    print(f"copy bandwidth measured: {copy_gbs:.0f} GB/s\n")
    print(table(results))
    print(f"\nElements differing from the eager reference over the {checked:,} checked: "
          + ", ".join(f"{v} {n:,}" for v, n in differing.items()))


if __name__ == "__main__":
    main()
