"""Muon: momentum, then Newton-Schulz orthogonalisation of each matrix's update (SPEC.md, training recipe).

Per parameter p [rows, cols] with gradient g, each step:

    b  <- momentum * b + g                    (momentum buffer, starts at zero)
    g' <- g + momentum * b  (Nesterov)  or  b
    g' <- g' / max(||row||_2, 1e-7) per row   (only with row_normalize: FRONTIER.md section 3)
    U  <- newton_schulz(g')                   (kernels.newton_schulz: the backend switch applies)
    p  <- p * (1 - lr * weight_decay)         (decoupled weight decay)
    p  <- p - lr * sqrt(max(1, rows / cols)) * U

Newton-Schulz itself divides by the Frobenius norm first (X = g' / (||g'||_F + 1e-7), in the
kernel and its reference): that is the one place for it. Its coefficients are one (a, b, c) triple
for every step (SPEC's quintic) or one triple per step (FRONTIER.md's Polar-Express schedule,
kernels.reference.POLAR_EXPRESS_COEFFS).

Matrices of the same shape are stacked and orthogonalised by one batched call. With
torch.distributed initialised and more than one rank, each shape group's stack is split into
contiguous slices, one per rank; each rank orthogonalises its slice and an asynchronous all-gather
shares the results, so the communication of one group overlaps the computation of the next.
Gradients are expected to be averaged across ranks already (DDP does it), so every rank holds the
same g', and every rank applies the same gathered update: the weights stay identical.
"""
import math

import torch
import torch.distributed as dist

import kernels
from kernels.reference import QUINTIC_COEFFS, per_step_coeffs
from model.distributed import rank_and_world

# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one)
_all_gather_flat = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

ROW_NORM_EPS = 1e-7  # FRONTIER.md section 3: each row divided by max(||row||_2, 1e-7)


def normalize_rows(u: torch.Tensor) -> torch.Tensor:
    """Each row of u [..., rows, cols] divided by max(||row||_2, 1e-7), as the record does it: the
    norm in fp32, rounded to u's dtype, then the division in u's dtype."""
    norms = u.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS).to(u.dtype)
    return u / norms


class _ShapeGroup:
    """One stack of same-shape updates: its orthogonalised result (maybe still arriving), then the apply."""

    def __init__(self, params, orthogonal, handle, lr, weight_decay):
        self.params, self.orthogonal, self.handle = params, orthogonal, handle
        self.lr, self.weight_decay = lr, weight_decay

    def apply(self) -> None:
        if self.handle is not None:
            self.handle.wait()
        rows, cols = self.params[0].shape
        scale = math.sqrt(max(1.0, rows / cols))
        updates = self.orthogonal[: len(self.params)].to(self.params[0].dtype).unbind(0)
        if self.weight_decay:
            torch._foreach_mul_(self.params, 1.0 - self.lr * self.weight_decay)
        torch._foreach_add_(self.params, updates, alpha=-self.lr * scale)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights; `lr` and `momentum` live in each param group, so the trainer can set them every step.

    compute_dtype is the Newton-Schulz precision (bf16 in training; fp32 in CPU tests). coeffs is
    one (a, b, c) triple or backend_steps of them; row_normalize divides each row of the update by
    its norm before Newton-Schulz (FRONTIER.md; off in SPEC's recipe).
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        nesterov: bool = True,
        backend_steps: int = 5,
        coeffs=QUINTIC_COEFFS,
        weight_decay: float = 0.0,
        compute_dtype: torch.dtype = torch.bfloat16,
        row_normalize: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        per_step_coeffs(backend_steps, coeffs)  # a malformed schedule fails here, not at the first step
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, backend_steps=backend_steps, coeffs=coeffs,
            weight_decay=weight_decay, compute_dtype=compute_dtype, row_normalize=row_normalize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon: got a parameter of shape {tuple(p.shape)}; Muon takes only 2-D weight matrices, give the others to AdamW"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = rank_and_world()
        # Launch every shape group first (each rank computes its share, the gather runs async),
        # then apply them in order: group i's gather overlaps group i+1's Newton-Schulz.
        launched = []
        for group in self.param_groups:
            for params, updates in self._momentum_updates_by_shape(group):
                orthogonal, handle = self._orthogonalise(group, updates, rank, world)
                launched.append(_ShapeGroup(params, orthogonal, handle, group["lr"], group["weight_decay"]))
        for shape_group in launched:
            shape_group.apply()
        return loss

    def _momentum_updates_by_shape(self, group):
        """Momentum (and Nesterov) for every parameter with a gradient; yields (params, updates) per (shape, dtype)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        grads = [p.grad for p in params]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers

        by_shape = {}
        for p, u in zip(params, updates):
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), ([], []))
            by_shape[(tuple(p.shape), p.dtype, p.device)][0].append(p)
            by_shape[(tuple(p.shape), p.dtype, p.device)][1].append(u)
        return list(by_shape.values())

    @staticmethod
    def _orthogonalise(group, updates, rank: int, world: int):
        """Newton-Schulz of a same-shape stack; returns ([>= k, rows, cols] result, pending gather or None)."""

        def newton_schulz(stack):
            if group["row_normalize"]:
                stack = normalize_rows(stack)
            return kernels.newton_schulz(stack, group["backend_steps"], group["coeffs"], group["compute_dtype"])

        if world == 1:
            return newton_schulz(torch.stack(updates)), None
        count = len(updates)
        per_rank = math.ceil(count / world)
        lo, hi = min(rank * per_rank, count), min((rank + 1) * per_rank, count)
        rows, cols = updates[0].shape
        if hi - lo == per_rank:
            local = newton_schulz(torch.stack(updates[lo:hi]))
        else:
            # the last ranks may own fewer (or no) matrices: pad their slice so every rank sends the same size
            local = torch.zeros((per_rank, rows, cols), dtype=group["compute_dtype"], device=updates[0].device)
            if hi > lo:
                local[: hi - lo] = newton_schulz(torch.stack(updates[lo:hi]))
        gathered = torch.empty((world * per_rank, rows, cols), dtype=local.dtype, device=local.device)
        handle = _all_gather_flat(gathered, local.contiguous(), async_op=True)
        return gathered, handle
