"""Multi-process tests under a deadline: a hang (a collective one rank never joins, a teardown
deadlock) fails the one test that hung, its processes killed, instead of stalling the suite."""
import time

import pytest
import torch.multiprocessing as mp

RANKS_TIMEOUT_S = 300  # a 2-rank test takes about 10-30 s on two busy cores


def run_ranks(worker, world_size: int, args: tuple, timeout_s: float = RANKS_TIMEOUT_S) -> None:
    """mp.spawn(worker, args, nprocs=world_size), failing the test if the ranks do not all finish
    within timeout_s. spawn, not fork: forked children hung (the parent's thread pools do not
    survive a fork). A rank that raises fails the test with its traceback, as mp.spawn does."""
    context = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world_size} ranks of {worker.__name__} did not finish within {timeout_s:.0f} s (a hang); killed them")
