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

Newton-Schulz runs on each matrix's wide orientation, so matrices are stacked by wide shape (a
tall [3d, d] matrix joins the [d, 3d] ones, transposed; its row normalisation and its update scale
stay those of its own shape) and each stack is orthogonalised by one batched call. Which rank
orthogonalises which matrix is a ShardPlan (model/shard_plan.py): without one (one process, or
`shard` never called) this rank does them all and nothing is communicated. With a plan over W
ranks (model/grad_sync.GradientSync averages the gradients and leaves each rank only its own
matrices'), each rank runs momentum and Newton-Schulz on its matrices only, and an asynchronous
all-gather per stack shares the results, so the gather of one stack overlaps the Newton-Schulz of
the next; every rank applies the same gathered updates, so the weights stay identical. Momentum
buffers then live only on the owning rank; state_dict() gathers them (a collective: every rank
calls it), so a checkpoint holds every buffer whatever the number of ranks, and load_state_dict()
keeps this rank's.
"""
import math

import torch
import torch.distributed as dist

import kernels
from kernels.reference import QUINTIC_COEFFS, per_step_coeffs
from model.shard_plan import ShardPlan

# all_gather_single is all_gather_into_tensor's new name (torch 2.13 deprecates the old one)
_all_gather_flat = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

ROW_NORM_EPS = 1e-7  # FRONTIER.md section 3: each row divided by max(||row||_2, 1e-7)


def normalize_rows(u: torch.Tensor) -> torch.Tensor:
    """Each row of u [..., rows, cols] divided by max(||row||_2, 1e-7), as the record does it: the
    norm in fp32, rounded to u's dtype, then the division in u's dtype."""
    norms = u.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS).to(u.dtype)
    return u / norms


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
        self.plan: ShardPlan | None = None  # who orthogonalises what; built on the first step when not set
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon: got a parameter of shape {tuple(p.shape)}; Muon takes only 2-D weight matrices, give the others to AdamW"
                    )

    def shard(self, plan: ShardPlan | None) -> None:
        """Orthogonalise only `plan.rank`'s matrices and gather the rest (None: every matrix here).
        Buffers of matrices another rank owns are dropped."""
        self.plan = plan
        if plan is not None:
            for p in list(self.state):
                if not plan.owns(p):
                    del self.state[p]

    def _shard_plan(self) -> ShardPlan:
        if self.plan is None:
            self.plan = ShardPlan([group["params"] for group in self.param_groups], 1, 0)
        return self.plan

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._shard_plan()
        # Launch every stack first (each rank computes its matrices, the gather runs async), then
        # apply them in order: stack i's gather overlaps stack i+1's Newton-Schulz.
        launched = [self._orthogonalise(bucket, plan) for bucket in plan.buckets]
        for bucket, indices, rows, results, handle in launched:
            if handle is not None:
                handle.wait()
            self._apply(bucket, indices, rows, results)
        return loss

    def _momentum_updates(self, group, params) -> list[torch.Tensor]:
        """Momentum (and Nesterov) for params, in their own orientation."""
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
        return torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers

    def _orthogonalise(self, bucket, plan: ShardPlan):
        """Newton-Schulz, in wide orientation, of this rank's matrices of `bucket` that have gradients.
        Returns (bucket, indices of the matrices to update, rows: results[rows[k]] is the update
        of params[indices[k]], results [., m, n], the pending all-gather or None)."""
        group = self.param_groups[bucket.group]
        mine = sorted((i for i in bucket.owned(plan.rank) if bucket.params[i].grad is not None), key=bucket.transposed)
        ortho = None
        if mine:
            updates = self._momentum_updates(group, [bucket.params[i] for i in mine])
            wide = sum(not bucket.transposed(i) for i in mine)
            stacks = [torch.stack(part) for part in (updates[:wide], updates[wide:]) if part]
            if group["row_normalize"]:  # the rows of each matrix's own orientation
                stacks = [normalize_rows(stack) for stack in stacks]
            if wide < len(mine):
                stacks[-1] = stacks[-1].mT
            stack = torch.cat(stacks) if len(stacks) > 1 else stacks[0]
            ortho = kernels.newton_schulz(stack, group["backend_steps"], group["coeffs"], group["compute_dtype"])
        if plan.world == 1:
            return bucket, mine, list(range(len(mine))), ortho, None
        rows, cols = bucket.shape
        device = bucket.params[0].device
        local = torch.zeros((bucket.slot, rows, cols), dtype=group["compute_dtype"], device=device)
        for k, i in enumerate(mine):  # a few copies (an index tensor from a list would wait on the GPU)
            local[bucket.position[i]].copy_(ortho[k])
        gathered = torch.empty((plan.world * bucket.slot, rows, cols), dtype=local.dtype, device=device)
        handle = _all_gather_flat(gathered, local, async_op=True)
        everyone = list(range(len(bucket.params)))
        return bucket, everyone, [bucket.owners[i] * bucket.slot + bucket.position[i] for i in everyone], gathered, handle

    def _apply(self, bucket, indices, rows_of, results) -> None:
        """p <- p * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * U for params[i], i in indices."""
        if not indices:
            return
        group = self.param_groups[bucket.group]
        lr, weight_decay = group["lr"], group["weight_decay"]
        results = results.to(bucket.params[0].dtype)
        for tall in (False, True):  # the update scale is that of the matrix's own shape
            chosen = [(row, i) for row, i in zip(rows_of, indices) if bucket.transposed(i) == tall]
            if not chosen:
                continue
            params = [bucket.params[i] for _, i in chosen]
            updates = [results[row].mT if tall else results[row] for row, _ in chosen]
            rows, cols = params[0].shape
            if weight_decay:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            torch._foreach_add_(params, updates, alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """torch's state_dict, holding every matrix's momentum buffer even when sharded (then a
        collective: every rank calls it)."""
        state = super().state_dict()
        plan = self.plan
        if plan is None or plan.world == 1:
            return state
        index = {id(p): n for n, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for bucket in plan.buckets:
            device = bucket.params[0].device
            local = torch.zeros((bucket.slot, bucket.numel + 1), dtype=torch.float32, device=device)  # buffer | has-one flag
            for i in bucket.owned(plan.rank):
                buffer = self.state.get(bucket.params[i], {}).get("momentum_buffer")
                if buffer is not None:
                    local[bucket.position[i], :-1] = buffer.reshape(-1).float()
                    local[bucket.position[i], -1] = 1.0
            gathered = torch.empty((plan.world * bucket.slot, bucket.numel + 1), dtype=torch.float32, device=device)
            _all_gather_flat(gathered, local)
            for i, p in enumerate(bucket.params):
                row = gathered[bucket.owners[i] * bucket.slot + bucket.position[i]]
                if row[-1] > 0:
                    entry = state["state"].setdefault(index[id(p)], {})
                    entry["momentum_buffer"] = row[:-1].view(p.shape).to(p.dtype).clone()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict; when sharded, only this rank's matrices keep their buffers."""
        super().load_state_dict(state_dict)
        self.shard(self.plan)
