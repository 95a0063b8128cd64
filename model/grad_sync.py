"""Gradient averaging over ranks without DDP (issue 19; FRONTIER.md section 3, "Distributed, no DDP").

Muon's matrices travel in the buckets of a ShardPlan (model/shard_plan.py): when every matrix of a
bucket has its gradient on the last micro-batch (per-parameter post-accumulate-grad hooks), the
bucket is packed and reduce-scattered (mean) asynchronously, so each rank receives the averaged
gradients of only the matrices it owns; Muon then runs momentum and Newton-Schulz on those and
all-gathers the updates (model/muon.py). Every other gradient (embeddings, scalars) goes in one
packed all-reduce (mean), in fp32: a few percent of the bytes, and AdamW sees them exactly.

Buckets are launched strictly in the plan's order (a complete bucket waits for earlier ones), so
every rank issues the same collectives in the same order whatever the autograd engine does.

What overlaps what. A bucket holds one shape group of every layer (as the record's banks do), so
it is complete only once layer 0's backward has produced its member: even in eager mode the
reduce-scatters start during the last layer's backward, and under torch.compile(fullgraph=True),
whose backward is one autograd node, they start when it ends. They then run back to back with the
small all-reduce; Muon's all-gather of one stack overlaps the Newton-Schulz of the next
(model/muon.py). Starting them earlier would need smaller buckets (layer ranges, with more padding
on 8 ranks) and a backward split into several compiled graphs, for little: on 8 ranks each
rank's padded bf16 buffer is 69 MB for SPEC's model and 78 MB for FRONTIER's (bytes_per_step()),
whose wire time at NVLink's 450 GB/s per direction (the H100 datasheet) is about 0.15 ms per
collective against a step of 60-120 ms. `bench.step --distributed` reports these bytes beside the
exposed communication time it measures, so a GPU run shows what is left to win.

comm_dtype: bf16 (the record's choice: half the bytes, gradients rounded to bf16 before
averaging) or fp32 (exact: with W ranks of one micro-batch each the average equals one rank's
accumulated gradient bit for bit, as long as W is a power of two).

With one rank nothing here is used: the trainer clips and steps the local gradients as before.
"""
import functools

import torch
import torch.distributed as dist

from model.shard_plan import ShardPlan

# reduce_scatter_single is reduce_scatter_tensor's new name (torch 2.13 deprecates the old one)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
COMM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient max_norm / (norm + 1e-6), at most 1


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class GradientSync:
    """Averages the gradients of one optimizer step over the ranks of the default process group.

    Per step: arm() before the last micro-batch's backward, finish() after it. After finish(), the
    matrices this rank owns hold the averaged gradient, the other matrices none, and every small
    parameter the averaged gradient.
    """

    def __init__(self, plan: ShardPlan, small_params: list[torch.Tensor], comm_dtype: torch.dtype = torch.bfloat16):
        if comm_dtype not in COMM_DTYPES.values():
            raise ValueError(f"GradientSync: comm_dtype must be torch.bfloat16 or torch.float32, got {comm_dtype}")
        self.plan, self.comm_dtype = plan, comm_dtype
        self.rank, self.world = plan.rank, plan.world
        self.small = list(small_params)
        muon = {id(p) for bucket in plan.buckets for p in bucket.params}
        if any(id(p) in muon for p in self.small):
            raise ValueError("GradientSync: a parameter is both a Muon matrix and a small parameter; each belongs to one optimizer")
        # unit u < len(buckets): Muon bucket u; unit len(buckets): the packed small gradients
        self.members = [bucket.params for bucket in plan.buckets] + [self.small]
        self.send = [None] * len(self.members)  # persistent packing buffers, made at the first step
        self.recv = [None] * len(self.plan.buckets)
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, unit))
                      for unit, params in enumerate(self.members) for p in params]
        self.device = next(p.device for params in self.members for p in params)
        self.armed = False
        self._reset()

    def _reset(self) -> None:
        self.pending = [len(params) for params in self.members]  # gradients still to arrive per unit
        self.handles = [None] * len(self.members)
        self.launched = 0  # units launched so far, in order

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    # ---------------------------------------------------------------- during backward
    def arm(self) -> None:
        """The next backward is the step's last: its finished gradients are sent as they become ready."""
        self._reset()
        self.armed = True

    def _grad_ready(self, unit: int, param: torch.Tensor) -> None:
        if not self.armed:
            return  # an earlier micro-batch: the gradient keeps accumulating locally
        self.pending[unit] -= 1
        while self.launched < len(self.members) and self.pending[self.launched] == 0:
            self._launch(self.launched)

    def _launch(self, unit: int) -> None:
        self.launched += 1
        params = self.members[unit]
        if unit == len(self.plan.buckets):
            self._launch_small(unit, params)
            return
        bucket = self.plan.buckets[unit]
        if self.send[unit] is None:
            device = params[0].device
            self.send[unit] = torch.zeros(self.world * bucket.slot * bucket.numel, dtype=self.comm_dtype, device=device)
            self.recv[unit] = torch.empty(bucket.slot * bucket.numel, dtype=self.comm_dtype, device=device)
        send = self.send[unit]
        chunks = [send[bucket.flat_offset(i):bucket.flat_offset(i) + bucket.numel] for i in range(len(params))]
        present = [i for i, p in enumerate(params) if p.grad is not None]
        if present:
            torch._foreach_copy_([chunks[i] for i in present], [params[i].grad.view(-1) for i in present])
        for i, p in enumerate(params):
            if p.grad is None:
                chunks[i].zero_()
            elif bucket.owners[i] != self.rank:
                p.grad = None  # another rank owns it: its gradient memory goes now (the copy is queued before any reuse)
        self.handles[unit] = _reduce_scatter_flat(self.recv[unit], send, op=dist.ReduceOp.AVG, async_op=True)

    def _launch_small(self, unit: int, params: list[torch.Tensor]) -> None:
        if not params:
            return
        if self.send[unit] is None:
            self.send[unit] = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        send, at = self.send[unit], 0
        for p in params:
            chunk = send[at:at + p.numel()]
            chunk.zero_() if p.grad is None else chunk.copy_(p.grad.view(-1))
            at += p.numel()
        self.handles[unit] = dist.all_reduce(send, op=dist.ReduceOp.AVG, async_op=True)

    def bytes_per_step(self, gather_dtype: torch.dtype) -> dict[str, int]:
        """Bytes each rank puts into the collectives of one step: the reduce-scatter's and the
        all-gather's whole padded buffers (gather_dtype: Muon's Newton-Schulz dtype) and the small
        all-reduce's."""
        padded = sum(self.world * bucket.slot * bucket.numel for bucket in self.plan.buckets)
        return {
            "reduce-scatter": padded * _itemsize(self.comm_dtype),
            "all-gather": padded * _itemsize(gather_dtype),
            "all-reduce": sum(p.numel() for p in self.small) * 4,
        }

    # ---------------------------------------------------------------- after backward
    def finish(self) -> None:
        """Launch what has not been launched, wait, and put the averaged gradients in place.

        A gradient that did not arrive on a rank counts as zeros there (as DDP treats unused
        parameters), and every rank takes the average for every parameter it steps: the ranks
        step identically even if a parameter's use depended on the data, with no host-side
        agreement (which would wait on the device every step). A parameter no rank used is then
        stepped with a zero gradient (its momentum and weight decay still act) where one process
        would skip it; every parameter of the models here is used in every step."""
        if not self.armed:
            raise RuntimeError("GradientSync.finish() without arm(): call arm() before the step's last backward")
        self.armed = False
        while self.launched < len(self.members):
            self._launch(self.launched)
        for unit, bucket in enumerate(self.plan.buckets):
            self.handles[unit].wait()
            recv = self.recv[unit]
            for i in bucket.owned(self.rank):
                p = bucket.params[i]
                averaged = recv[bucket.position[i] * bucket.numel:(bucket.position[i] + 1) * bucket.numel].view(p.shape)
                if p.grad is None:
                    p.grad = averaged.to(p.dtype, copy=True)  # recv is reused by the next step
                else:
                    p.grad.copy_(averaged)
        small = len(self.plan.buckets)
        if self.handles[small] is not None:
            self.handles[small].wait()
            at = 0
            for p in self.small:
                averaged = self.send[small][at:at + p.numel()].view(p.shape)
                if p.grad is None:
                    p.grad = averaged.to(p.dtype, copy=True)  # send is reused by the next step
                else:
                    p.grad.copy_(averaged)
                at += p.numel()

    def owned_grads(self) -> list[torch.Tensor]:
        """The gradients this rank holds after finish(): its matrices' and every small parameter's."""
        mine = [bucket.params[i].grad for bucket in self.plan.buckets for i in bucket.owned(self.rank)]
        return [g for g in mine + [p.grad for p in self.small] if g is not None]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ of the averaged gradient over all parameters, when each
        rank holds only its matrices' share: the squared norms of the owned matrices are summed
        over ranks (one small all-reduce), the small gradients (identical everywhere) added once.
        Returns the total norm (a device tensor)."""
        matrices = [bucket.params[i].grad for bucket in self.plan.buckets for i in bucket.owned(self.rank)]
        matrices = [g for g in matrices if g is not None]
        small = [p.grad for p in self.small if p.grad is not None]
        squares = torch.zeros(2, dtype=torch.float32, device=self.device)  # [owned matrices, small]
        if matrices:
            squares[0] = torch.stack(torch._foreach_norm(matrices)).float().square().sum()
        if small:
            squares[1] = torch.stack(torch._foreach_norm(small)).float().square().sum()
        summed = squares.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        total = (summed[0] + squares[1]).sqrt()
        coefficient = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        if matrices + small:
            torch._foreach_mul_(matrices + small, coefficient)
        return total
