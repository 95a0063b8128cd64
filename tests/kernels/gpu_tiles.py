"""What a GPU tile configuration must satisfy before a GPU ever sees it, for the tests that run each
family's GPU configs through Triton's interpreter.

Shared memory is estimated from the blocks, stages and operand bytes the way Triton's software
pipeline lays it out on sm_90: every tile a loop loads is buffered `stages` times, a tile loaded
once before the loop (a loop-invariant MMA operand) once. The estimate leaves out the few KiB of
reduction and layout-conversion scratch the compiler may add; bench/sm90_compile.py measures the
compiled figure, this catches a config that cannot fit before anything is compiled.
"""
import torch

from tests.conftest import HAS_GPU

SM90_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may opt into on an H100 (sm_90)
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The dtype a test running one GPU config takes: fp32 in the interpreter (compared with the fp64
# reference at the fp32 tolerance); bf16 natively on a GPU (under the fair bound), because a
# config of a 16-bit autotune list need not fit in shared memory with fp32 operands (128 x 256 x 64
# MLP tiles in 4 stages take 320 KiB, by bench/sm90_compile.py), and each family's fp32 config is
# what its fp32 GPU tests already run.
CONFIG_TEST_DTYPE = torch.bfloat16 if HAS_GPU else torch.float32


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pipelined_bytes(stages: int, loop_tiles: list[int], once_tiles: list[int], element_bytes: int) -> int:
    """Shared memory of a pipelined loop: `stages` buffers of each tile the loop loads (elements per
    tile in loop_tiles) plus one of each tile loaded before the loop (once_tiles)."""
    return element_bytes * (stages * sum(loop_tiles) + sum(once_tiles))


def assert_fits_sm90(shared_bytes: int, what: str) -> None:
    assert shared_bytes <= SM90_SHARED_BYTES, (
        f"{what}: about {shared_bytes / 1024:.0f} KiB of shared memory > the H100's {SM90_SHARED_BYTES // 1024} KiB; "
        f"the autotuner would drop this config (a launch left without one fails): use fewer stages or smaller tiles"
    )
