"""Newton-Schulz / Muon benchmark: `python -m bench.newton_schulz [--smoke]`.

1. The full Muon step for the 11-layer model's matrix set (SPEC.md), four ways: eager per-matrix
   reference, torch.compile'd per-matrix reference, Muon batched by shape on the reference backend
   (eager bmm), Muon batched by shape on the Triton kernels. Goal: Triton >= 2x the compiled
   per-matrix step.
2. Each kernel alone against torch (bmm / baddbmm) at the same shapes, in TFLOP/s.

FLOPs are dense-equivalent: a product [m, k] x [k, n] counts 2 m k n, also for the symmetric
kernels that compute only half of it, so the figures compare with torch's dense products. For one
matrix in the wide orientation (m <= n), one step of the iteration is
    A = X X^T: 2 m^2 n,   B = b A + c A A: 2 m^3,   X = a X + B X: 2 m^2 n,
i.e. 4 m^2 n + 2 m^3 per step.
"""
import math

import torch

import kernels
from bench import common
from kernels import reference
from kernels.ops import newton_schulz as ns

STEPS = 5
COMPUTE_DTYPE = torch.bfloat16
LR, MOMENTUM, WEIGHT_DECAY = 0.025, 0.99, 0.04


# --smoke: one layer of small matrices, square and not
SMOKE_MODEL = dict(num_layers=1, dim=48, kv_dim=24, hidden=80, small=16)


def model_matrix_shapes(num_layers: int = 11, dim: int = 512, kv_dim: int = 256, hidden: int = 1536, small: int = 128):
    """Shapes [rows, cols] (nn.Linear weight: [out, in]) of every Muon matrix, in model order."""
    block = [(dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim), (hidden, dim), (dim, hidden)]  # q k v out fc proj
    return block * num_layers + [(dim, small), (kv_dim, small)]  # bigram proj 128->512, VE proj 128->256


def shape_counts(shapes) -> dict:
    """{(rows, cols): number of matrices}, in first-seen order."""
    counts = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    return counts


def ns_step_flops(rows: int, cols: int) -> dict:
    """Dense-equivalent FLOPs of one iteration step on one matrix, per kernel."""
    m, n = min(rows, cols), max(rows, cols)
    return {"gram": 2 * m * m * n, "gram_poly": 2 * m**3, "update": 2 * m * m * n}


def muon_flops(shapes, steps: int = STEPS) -> int:
    return steps * sum(sum(ns_step_flops(r, c).values()) for r, c in shapes)


# ----------------------------------------------------------------------------- the Muon step


def per_matrix_step(newton_schulz):
    """A Muon step that orthogonalises one matrix at a time (the usual implementation), same math as model.muon."""

    def step(params, grads, buffers):
        for p, g, b in zip(params, grads, buffers):
            b.mul_(MOMENTUM).add_(g)
            update = newton_schulz(g.add(b, alpha=MOMENTUM))
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            p.mul_(1 - LR * WEIGHT_DECAY).add_(update.to(p.dtype), alpha=-LR * scale)

    return step


def reference_ns(g):
    return reference.newton_schulz(g, STEPS, reference.QUINTIC_COEFFS, COMPUTE_DTYPE)


def bench_muon_step(bench: common.Bench, shapes) -> list[dict]:
    from model.muon import Muon

    def fresh():
        params = [torch.randn(s, device=bench.device) * 0.02 for s in shapes]
        grads = [torch.randn(s, device=bench.device) for s in shapes]
        return params, grads, [torch.zeros_like(p) for p in params]

    rows = []
    params, grads, buffers = fresh()
    eager = per_matrix_step(reference_ns)
    rows.append(("eager per-matrix reference", lambda: eager(params, grads, buffers)))
    compiled = per_matrix_step(bench.compiled(reference_ns))
    rows.append(("torch.compile per-matrix reference", lambda: compiled(params, grads, buffers)))
    for backend in ("reference", "triton"):
        muon_params = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(muon_params, grads):
            p.grad = g
        opt = Muon(muon_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, compute_dtype=COMPUTE_DTYPE)

        def run(opt=opt, backend=backend):
            with kernels.use_backend(backend):
                opt.step()

        label = "Muon batched, eager bmm (reference backend)" if backend == "reference" else "Muon batched, Triton kernels"
        rows.append((label, run))

    flops = muon_flops(shapes)
    for _, fn in rows:
        fn()  # compile and autotune outside the timings
    timed = [(label, bench.ms(fn), bench.graph_ms(fn)) for label, fn in rows]
    base_ms, base_graph_ms = next((ms, g) for label, ms, g in timed if label == "torch.compile per-matrix reference")
    return [
        {"matrices": len(shapes), "variant": label, "ms": ms, "TFLOP/s": flops / ms / 1e9, "speed-up vs compiled": base_ms / ms,
         "CUDA-graph ms": graph_ms, "graph speed-up vs compiled": base_graph_ms / graph_ms}
        for label, ms, graph_ms in timed
    ]


# ----------------------------------------------------------------------------- kernels alone


def bench_kernels(bench: common.Bench, shapes) -> list[dict]:
    a, b, c = reference.QUINTIC_COEFFS
    rows = []
    for (r, cdim), count in shape_counts(shapes).items():
        m, n = min(r, cdim), max(r, cdim)
        X = torch.randn(count, m, n, device=bench.device, dtype=COMPUTE_DTYPE) / math.sqrt(m * n)
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        flops = {k: count * v for k, v in ns_step_flops(m, n).items()}
        cases = {
            "gram": (lambda: ns.gram(X), lambda: torch.bmm(X, X.mT)),
            "gram_poly": (lambda: ns.gram_poly(A, b, c), lambda: torch.baddbmm(A, A, A, beta=b, alpha=c)),
            "update": (lambda: ns.ns_update(B, X, a), lambda: torch.baddbmm(X, B, X, beta=a)),
        }
        for kernel, (triton_fn, torch_fn) in cases.items():
            t_ms, ref_ms = bench.ms(triton_fn), bench.ms(torch_fn)
            rows.append({
                "matrices": f"{count} x {r}x{cdim}", "kernel": kernel,
                "triton ms": t_ms, "torch ms": ref_ms,
                "triton TFLOP/s": flops[kernel] / t_ms / 1e9, "torch TFLOP/s": flops[kernel] / ref_ms / 1e9,
                "speed-up": ref_ms / t_ms,
            })
    return rows


def main(argv=None) -> None:
    bench = common.Bench("bench.newton_schulz", argv)
    shapes = model_matrix_shapes(**bench.shapes({}, SMOKE_MODEL))
    print(bench.header("Newton-Schulz / Muon step"))
    print(f"{len(shapes)} matrices, {STEPS} quintic steps in {COMPUTE_DTYPE}; dense-equivalent FLOPs per step "
          f"and matrix (wide m <= n): 4 m^2 n + 2 m^3; {muon_flops(shapes) / 1e9:.1f} GFLOP per Muon step\n")
    print("ms: eager steps as the trainer runs them, host launch time included; "
          "CUDA-graph ms: the same step replayed as one CUDA graph, the GPU's own time\n")
    print(common.table(bench_muon_step(bench, shapes)))
    print("\nKernels alone vs torch (bmm / baddbmm); FLOPs: gram 2 m^2 n, gram_poly 2 m^3, update 2 m^2 n per matrix\n")
    print(common.table(bench_kernels(bench, shapes)))


if __name__ == "__main__":
    main()
