"""Muon (model/muon.py): one step by hand, shape grouping, the Triton backend, and 2 ranks vs 1;
the frontier's Polar-Express coefficients and row normalisation (FRONTIER.md section 3)."""
import math
import os

import pytest
import torch
import torch.distributed as dist

import kernels
from kernels import reference
from model.distributed import leave_process_group
from model.muon import Muon, normalize_rows
from model.shard_plan import ShardPlan
from tests.multiprocess import run_ranks
from tests.tolerances import assert_close

# several shapes: a group of 3 (not divisible by 2 ranks), a tall group of 2, a lone matrix
SHAPES = [(16, 24), (16, 24), (16, 24), (30, 12), (30, 12), (9, 20)]


def make_params(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def set_grads(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def run_steps(params, steps: int, plan: ShardPlan | None = None, **muon_kwargs) -> None:
    """`steps` Muon steps on seeded gradients; with a plan, sharded as GradientSync leaves it: a rank
    holds the (already averaged) gradients of its own matrices only."""
    opt = Muon(params, **muon_kwargs)
    opt.shard(plan)
    for step in range(steps):
        set_grads(params, seed=100 + step)
        if plan is not None:
            for p in params:
                if not plan.owns(p):
                    p.grad = None
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_two_steps_by_hand(nesterov):
    lr, wd, steps = 0.02, 0.1, 5
    momenta = [0.9, 0.95]  # the trainer rewrites group["momentum"] (and lr) every step
    params = make_params([(12, 20), (20, 8)], seed=0)
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in expected]
    opt = Muon(params, lr=lr, momentum=0.5, nesterov=nesterov, weight_decay=wd, compute_dtype=torch.float32)
    with kernels.use_backend("reference"):
        for step, momentum in enumerate(momenta):
            step_lr = lr * (1 - 0.5 * step)
            for group in opt.param_groups:
                group["lr"], group["momentum"] = step_lr, momentum
            set_grads(params, seed=10 + step)
            opt.step()
            for i, p in enumerate(params):
                g = p.grad
                buffers[i] = momentum * buffers[i] + g
                update = g + momentum * buffers[i] if nesterov else buffers[i]
                ortho = reference.newton_schulz(update, steps, reference.QUINTIC_COEFFS, torch.float32)
                rows, cols = p.shape
                expected[i] = expected[i] * (1 - step_lr * wd) - step_lr * math.sqrt(max(1, rows / cols)) * ortho
    for p, e in zip(params, expected):
        assert_close(p.detach(), e)


def test_grouped_equals_per_matrix():
    with kernels.use_backend("reference"):
        grouped = make_params(SHAPES, seed=1)
        run_steps(grouped, 2, lr=0.03, momentum=0.9, weight_decay=0.04, compute_dtype=torch.float32)
        for i in range(len(SHAPES)):
            alone = make_params(SHAPES, seed=1)
            opt = Muon([alone[i]], lr=0.03, momentum=0.9, weight_decay=0.04, compute_dtype=torch.float32)
            for step in range(2):  # the same gradients as run_steps gave the grouped run
                set_grads(alone, seed=100 + step)
                opt.step()
            assert_close(grouped[i].detach(), alone[i].detach())


def test_triton_backend_matches_reference_backend():
    shapes = [(16, 24), (16, 24), (30, 12)]
    results = {}
    for backend in ("triton", "reference"):
        params = make_params(shapes, seed=2)
        with kernels.use_backend(backend):
            run_steps(params, 1, lr=0.03, momentum=0.9, compute_dtype=torch.float32)
        results[backend] = [p.detach() for p in params]
    for t, r in zip(results["triton"], results["reference"]):
        assert_close(t, r)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="takes only 2-D weight matrices"):
        Muon([torch.zeros(5, requires_grad=True)], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be in"):
        Muon([torch.zeros(5, 5, requires_grad=True)], lr=0.1, momentum=1.0)


# ----------------------------------------------------------------------------- the frontier's Muon


def scalar_map(sigma: torch.Tensor, coeffs) -> torch.Tensor:
    """What the iteration does to each singular value: sigma <- a sigma + b sigma^3 + c sigma^5 per step."""
    for a, b, c in coeffs:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def test_polar_express_scalar_map_lands_in_the_stated_band():
    # FRONTIER.md: the 5-step map sends [1e-3, 1] into [0.8589, 1.1411] (fp64); the band is stated
    # to 4 decimals, and both ends are reached (equal ripple about 1).
    sigma = torch.cat([torch.logspace(-3, 0, 100_001, dtype=torch.float64), torch.linspace(1e-3, 1, 100_001, dtype=torch.float64)])
    image = scalar_map(sigma, reference.POLAR_EXPRESS_COEFFS)
    assert round(image.min().item(), 4) == 0.8589 and round(image.max().item(), 4) == 1.1411
    # SPEC's quintic, five times, does not: its small singular values stay far below the band
    assert scalar_map(sigma, [reference.QUINTIC_COEFFS] * 5).min() < 0.5


def test_normalize_rows_gives_unit_rows():
    u = torch.randn(3, 7, 11) * torch.logspace(-4, 3, 7)[:, None]
    u[1, 2] = 0.0  # a zero row is divided by the 1e-7 floor: it stays zero, no NaN
    rows = normalize_rows(u).norm(dim=-1)
    expected = torch.ones_like(rows)
    expected[1, 2] = 0.0
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=0)
    # bf16: the norm is taken in fp32 and rounded to bf16, so each row is 1 within bf16's rounding
    half = normalize_rows(u.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float().norm(dim=-1), expected, rtol=2e-2, atol=0)


def test_row_normalized_update_reaches_newton_schulz(monkeypatch):
    """With row_normalize, Newton-Schulz receives unit rows of the (Nesterov) update, and the step
    is the frontier's: p <- p (1 - lr wd) - lr sqrt(max(1, rows/cols)) NS_polar(rownorm(u))."""
    lr, wd, momentum = 0.026, 0.095, 0.92
    params = make_params([(12, 20), (12, 20), (20, 8)], seed=4)
    before = [p.detach().clone() for p in params]
    seen = []
    real = kernels.newton_schulz

    def recording(G, steps, coeffs, compute_dtype):
        seen.append(G.clone())
        return real(G, steps, coeffs, compute_dtype)

    monkeypatch.setattr(kernels, "newton_schulz", recording)
    opt = Muon(params, lr=lr, momentum=momentum, weight_decay=wd, coeffs=reference.POLAR_EXPRESS_COEFFS,
               compute_dtype=torch.float32, row_normalize=True)
    set_grads(params, seed=5)
    with kernels.use_backend("reference"):
        opt.step()
    # Newton-Schulz gets wide matrices: the tall one arrives transposed, its own rows (now columns) unit
    # (stacks in backward's order: the last-registered matrix's first)
    assert [tuple(G.shape) for G in seen] == [(1, 8, 20), (2, 12, 20)]
    torch.testing.assert_close(seen[0].norm(dim=-2), torch.ones(1, 20))
    torch.testing.assert_close(seen[1].norm(dim=-1), torch.ones(2, 12))
    for p, p0 in zip(params, before):
        u = p.grad + momentum * (momentum * 0 + p.grad)  # Nesterov on a fresh buffer: g + mu g
        u = u / u.norm(dim=-1, keepdim=True)
        ortho = reference.newton_schulz(u, 5, reference.POLAR_EXPRESS_COEFFS, torch.float32)
        rows, cols = p.shape
        assert_close(p.detach(), p0 * (1 - lr * wd) - lr * math.sqrt(max(1, rows / cols)) * ortho)


def test_row_normalize_off_leaves_the_update_alone(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "newton_schulz", lambda G, *args: seen.append(G.clone()) or G.clone())
    params = make_params([(6, 9)], seed=6)
    set_grads(params, seed=7)
    Muon(params, lr=0.1, momentum=0.5, compute_dtype=torch.float32).step()
    torch.testing.assert_close(seen[0][0], params[0].grad * 1.5)  # g + mu (mu 0 + g), no row scaling


def test_polar_express_needs_five_steps():
    with pytest.raises(ValueError, match="coeffs must be one"):
        Muon([torch.zeros(4, 4, requires_grad=True)], lr=0.1, momentum=0.9, backend_steps=4,
             coeffs=reference.POLAR_EXPRESS_COEFFS)


# ----------------------------------------------------------------------------- 2 ranks (gloo)

DIST_KWARGS = dict(lr=0.03, momentum=0.9, weight_decay=0.04, compute_dtype=torch.float32)


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with kernels.use_backend("reference"):
            # the same weights everywhere; each rank orthogonalises its own matrices, all-gathers the rest
            params = make_params(SHAPES, seed=3)
            plan = ShardPlan([params], world, rank)
            assert 0 < len([p for p in params if plan.owns(p)]) < len(params)  # both ranks have work and need the other's
            run_steps(params, 3, plan=plan, **DIST_KWARGS)
        torch.save([p.detach() for p in params], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_process_group()  # train.py's teardown, pause included


@pytest.mark.slow  # two spawned processes importing torch and triton: about 10 s
def test_two_ranks_match_one_rank(tmp_path):
    run_ranks(_rank_worker, 2, (2, str(tmp_path / "init"), str(tmp_path)))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    with kernels.use_backend("reference"):
        single = make_params(SHAPES, seed=3)
        run_steps(single, 3, **DIST_KWARGS)
    for p0, p1, p in zip(rank0, rank1, single):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # every rank applies the same gathered bits
        assert_close(p0, p.detach())
    assert not torch.equal(rank0[0], make_params(SHAPES, seed=3)[0].detach())  # the steps did move the weights
