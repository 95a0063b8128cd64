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

    post(flags_now) first waits for the agreement started at the step before: on a GPU that means
    until the device has finished the step queued before the one just queued (an event follows
    each step's agreement, on one GPU too), so the host runs at most one step ahead; on the CPU a
    step is done when it returns. It then calls flags_now() — a clock read there reads the end of
    that earlier step, and `lag` says how many queued steps are still running: 1 on a GPU, 0 on
    the CPU — starts agreeing on its flags (an asynchronous all-reduce MAX; on a GPU through pinned
    memory) and returns the earlier agreement (None when there is none). Flags posted at one step
    are thus acted on at the next: whoever posts them says what they will mean by then (train.py
    looks one step ahead).

    now(flags_now, flags_next) is for a pause (the device idle): the pending agreement is dropped,
    flags_now() (to act on at once) and flags_next() (what the next post will return) are agreed
    on in one all-reduce, and flags_now()'s agreement returned."""

    def __init__(self, device: torch.device | str):
        self.device, self.pending = torch.device(device), None
        self.lag = 1 if self.device.type == "cuda" else 0

    def post(self, flags_now) -> tuple[bool, ...] | None:
        earlier = self._read(self.pending)
        self.pending = self._start(flags_now())
        return earlier

    def now(self, flags_now, flags_next) -> tuple[bool, ...]:
        self._read(self.pending)  # its collective is paired on every rank: finish it
        here, after = tuple(flags_now()), tuple(flags_next())
        agreed = any_rank(*here, *after, device=self.device)
        self.pending = torch.tensor(agreed[len(here):], dtype=torch.int32), None  # agreed already
        return agreed[:len(here)]

    def _start(self, flags):
        host = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        cuda = self.device.type == "cuda"
        if not is_distributed():
            return host, self._event() if cuda else None
        if not cuda:
            return host, dist.all_reduce(host, op=dist.ReduceOp.MAX, async_op=True).wait  # gloo: CPU tensors
        agreed = host.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, async_op=True).wait()  # the stream waits, not the host
        back = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        back.copy_(agreed, non_blocking=True)
        return back, self._event()

    @staticmethod
    def _event():
        """The wait for the device to reach this point of its queue."""
        arrived = torch.cuda.Event()
        arrived.record()
        return arrived.synchronize

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
