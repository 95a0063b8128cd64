"""The ranks of a run: set-up and teardown of the process group, and the few collectives the
trainer, Muon and the evaluator share. Every helper is a no-op (or the identity) on one rank, so
callers never branch on the world size."""
import dataclasses
import os
import time

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def single(device: torch.device | str = "cpu") -> "Dist":
        """One rank on `device` (tests, benchmarks, evaluation of an artifact)."""
        return Dist(0, 1, 0, torch.device(device))


def world_size_from_environment() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def setup_distributed() -> Dist:
    """The rank's device and, under torchrun, the process group (NCCL on GPUs, gloo on the CPU)."""
    rank, world = int(os.environ.get("RANK", 0)), world_size_from_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def leave_process_group(settle_s: float = 0.5) -> None:
    """destroy_process_group, after a pause that avoids a teardown deadlock (seen with gloo on a
    loaded machine, about one 2-rank run in two): a gloo worker thread frees a finished collective's
    tensors only once it holds the GIL, and when the group's last reference goes (as main() returns)
    the group's destructor joins that thread while holding the GIL. Sleeping hands
    the GIL over, so the workers are idle before the group can be destroyed."""
    if is_distributed():
        time.sleep(settle_s)
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def from_rank_zero(value):
    """Rank 0's value of a small picklable object, on every rank (a run id read off rank 0's clock)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In place: every rank's tensor becomes the sum over ranks (gloo has no AVG)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over ranks (a rank's loss covers only its own micro-batches)."""
    total = sum_over_ranks(value.detach().clone().float())
    return float(total) / rank_and_world()[1]


def any_rank(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag, true on every rank if it is true on any: the ranks agree to stop at the same step."""
    if not is_distributed():
        return tuple(bool(f) for f in flags)
    agreed = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return tuple(bool(f) for f in agreed.tolist())


class AgreedLater:
    """any_rank, read one step late, so the host never waits on the step it just queued.

    post(*flags) starts the agreement on this step's flags (an asynchronous all-reduce MAX; on a
    GPU the flags go up and the result comes back through pinned memory, its arrival marked by an
    event) and returns the agreement on the flags posted the step before (None at the first post):
    by then that reduce has long finished, while the GPU is busy with the step just queued. A
    decision such as the wall-clock stop therefore takes effect one step after the step that
    triggered it. now() waits for the pending agreement (the loop is paused anyway)."""

    def __init__(self, device: torch.device | str):
        self.device, self.pending = torch.device(device), None

    def post(self, *flags: bool) -> tuple[bool, ...] | None:
        previous, self.pending = self.pending, self._start(flags)
        return self._read(previous)

    def now(self) -> tuple[bool, ...] | None:
        pending, self.pending = self.pending, None
        return self._read(pending)

    def _start(self, flags):
        host = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        if not is_distributed():
            return host, None
        if self.device.type != "cuda":
            return host, dist.all_reduce(host, op=dist.ReduceOp.MAX, async_op=True).wait  # gloo: CPU tensors
        agreed = host.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, async_op=True).wait()  # the stream waits, not the host
        back = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        back.copy_(agreed, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return back, arrived.synchronize

    @staticmethod
    def _read(pending) -> tuple[bool, ...] | None:
        if pending is None:
            return None
        flags, wait = pending
        if wait is not None:
            wait()
        return tuple(bool(f) for f in flags.tolist())


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (host timers must not run ahead of the GPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
