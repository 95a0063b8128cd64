"""Newton-Schulz / Muon benchmark: `python -m bench.newton_schulz [--smoke] [--preset NAME] [--name value ...]`.

1. The full Muon step for the model's matrix set (`matrix_shapes`: the built model's
   param_groups()["matrix"]; SPEC: 6 per block x 11 + the bigram and VE projections = 68), with
   the config's Muon settings (lr, momentum, weight decay, Newton-Schulz steps), four ways: eager
   per-matrix reference, torch.compile'd per-matrix reference, Muon batched by shape on the
   reference backend (eager bmm), Muon batched by shape on the Triton kernels. Goal: Triton >= 2x
   the compiled per-matrix step.
2. Each kernel alone against torch (bmm / baddbmm) at each shape group, in TFLOP/s.

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

COMPUTE_DTYPE = torch.bfloat16  # SPEC's Newton-Schulz precision on the GPU (model.training.muon_compute_dtype)


def matrix_shapes(model) -> list[tuple[int, int]]:
    """Shapes [rows, cols] (nn.Linear weight: [out, in]) of every Muon matrix, in model order."""
    return [tuple(p.shape) for p in model.param_groups()["matrix"]]


def shape_counts(shapes) -> dict:
    """{(rows, cols): number of matrices}, in first-seen order: Muon's stacks."""
    counts = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    return counts


def ns_step_flops(rows: int, cols: int) -> dict:
    """Dense-equivalent FLOPs of one iteration step on one matrix, per kernel."""
    m, n = min(rows, cols), max(rows, cols)
    return {"gram": 2 * m * m * n, "gram_poly": 2 * m**3, "update": 2 * m * m * n}


def muon_flops(shapes, steps: int) -> int:
    return steps * sum(sum(ns_step_flops(r, c).values()) for r, c in shapes)


# ----------------------------------------------------------------------------- the Muon step


def per_matrix_step(newton_schulz, cfg):
    """A Muon step that orthogonalises one matrix at a time (the usual implementation), same math as model.muon."""
    lr, momentum, weight_decay = cfg.matrix_lr, cfg.muon_momentum, cfg.muon_wd

    def step(params, grads, buffers):
        for p, g, b in zip(params, grads, buffers):
            b.mul_(momentum).add_(g)
            update = newton_schulz(g.add(b, alpha=momentum))
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            p.mul_(1 - lr * weight_decay).add_(update.to(p.dtype), alpha=-lr * scale)

    return step


def reference_ns(cfg):
    return lambda g: reference.newton_schulz(g, cfg.muon_backend_steps, reference.QUINTIC_COEFFS, COMPUTE_DTYPE)


def bench_muon_step(bench: common.Bench, shapes) -> list[dict]:
    from model.muon import Muon

    cfg = bench.cfg
    params = [torch.randn(s, device=bench.device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=bench.device) for s in shapes]
    buffers = [torch.zeros_like(p) for p in params]
    eager = per_matrix_step(reference_ns(cfg), cfg)
    compiled = per_matrix_step(bench.compiled(reference_ns(cfg)), cfg)
    runs = {
        "eager per-matrix reference": lambda: eager(params, grads, buffers),
        "torch.compile per-matrix reference": lambda: compiled(params, grads, buffers),
    }
    for backend in ("reference", "triton"):
        muon_params = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(muon_params, grads):
            p.grad = g
        opt = Muon(muon_params, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                   weight_decay=cfg.muon_wd, compute_dtype=COMPUTE_DTYPE)

        def run(opt=opt, backend=backend):
            with kernels.use_backend(backend):
                opt.step()

        label = "Muon batched, eager bmm (reference backend)" if backend == "reference" else "Muon batched, Triton kernels"
        runs[label] = run

    timed = bench.measure(runs, graph=True)
    return common.variant_rows({"matrices": len(shapes)}, timed, flops=muon_flops(shapes, cfg.muon_backend_steps),
                               baselines={"compiled": "torch.compile per-matrix reference"})


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
            timed = bench.measure({"triton": triton_fn, "torch": torch_fn})
            rows += common.variant_rows({"matrices": f"{count} x {r}x{cdim}", "kernel": kernel}, timed,
                                        flops=flops[kernel], baselines={"torch": "torch"})
    return rows


def main(argv=None) -> None:
    bench = common.Bench("bench.newton_schulz", argv)
    shapes, steps = matrix_shapes(bench.model), bench.cfg.muon_backend_steps
    print(bench.header("Newton-Schulz / Muon step"))
    print(f"{len(shapes)} matrices, {steps} quintic steps in {COMPUTE_DTYPE}; dense-equivalent FLOPs per step "
          f"and matrix (wide m <= n): 4 m^2 n + 2 m^3; {muon_flops(shapes, steps) / 1e9:.1f} GFLOP per Muon step\n")
    print("median ms: eager steps as the trainer runs them, host launch time included; "
          "CUDA-graph ms: the same step replayed as one CUDA graph, the GPU's own time\n")
    print(common.table(bench_muon_step(bench, shapes)))
    print("\nKernels alone vs torch (bmm / baddbmm); FLOPs: gram 2 m^2 n, gram_poly 2 m^3, update 2 m^2 n per matrix\n")
    print(common.table(bench_kernels(bench, shapes)))


if __name__ == "__main__":
    main()
