"""What every kernel family shares: output allocation, the CPU/fake side of op registration, and
the launch policy (SM count, the autotuned/fixed config pair). The family template is in
kernels/__init__.py's docstring; kernels/ops/fakequant.py is the shortest complete example:

    @torch.library.triton_op("golf::name", mutates_args=())
    def name_op(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()              # gradients arrive expanded (stride 0)
        y = new_output(x.shape, x.dtype, x.device)
        wrap_triton(_kernel)[grid](x, y, ...)   # this module's wrap_triton, below
        return y

    register_cpu_and_fake(name_op, reference=name_eager, fake=_name_fake)
    name_op.register_autograd(_name_backward, setup_context=_name_setup_context)
"""
import contextlib
import dataclasses
import os

import torch
import torch._library.triton  # noqa: F401  (launch_directly)
import triton

# Set before triton is first imported (tests/conftest.py does it on CPU-only machines).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tests set KERNELS_POISON=1: outputs start as NaN (floats) or -1 (ints) so an element the
# kernel forgets to write shows up instead of passing by luck with zeroed memory.
POISON = os.environ.get("KERNELS_POISON") == "1"

# The GPU the launch policies are tuned for; also what they assume where no GPU is asked
# (the interpreter, bench/sm90_compile.py).
H100_SMS = 132


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device, else the H100's count."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


@dataclasses.dataclass(frozen=True)
class AutotunePair:
    """One JIT kernel autotuned over a config list, and the same kernel fixed to one config.

    Autotuning pays only at training shapes with 16-bit operands. fp32 operands (the CPU tests,
    also run natively on a GPU, where fp32 products go to the FMA units and big tiles spill) and
    small problems take the fixed config, so a test run compiles one variant per shape instead
    of benchmarking the whole list."""

    tuned: triton.runtime.Autotuner
    fixed: triton.runtime.Autotuner

    def pick(self, dtype: torch.dtype, size: int, min_size: int):
        return self.tuned if dtype != torch.float32 and size >= min_size else self.fixed


def autotune_pair(kernel, configs: list, key: list, fixed=None) -> AutotunePair:
    """AutotunePair around kernel; the fixed config defaults to the list's last (its smallest)."""
    fixed = configs[-1] if fixed is None else fixed
    return AutotunePair(
        triton.autotune(configs=configs, key=key)(kernel), triton.autotune(configs=[fixed], key=key)(kernel)
    )


def wrap_triton(kernel):
    """torch.library.wrap_triton, except under TRITON_INTERPRET=1: there @triton.jit gives an
    InterpretedFunction, which torch 2.11 refuses ("wrap_triton only works on functions annotated
    with triton.jit or triton.autotune") and torch 2.13 hands back unchanged, as this does.
    torch.library.wrap_triton is looked up at each call: bench/sm90_compile.py replaces it."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def launch_directly():
    """A context for eager calls outside any triton_op (the kernels-alone helpers tests and bench/
    call): launches go straight to Triton, as in an op's own eager body. Otherwise
    torch.library.wrap_triton routes each launch through its tracing HOP, which costs host time
    (about 1 ms by torch's own note) that would swamp a microsecond kernel."""
    switch = getattr(torch._library.triton, "set_wrap_triton_enabled", None)  # private; torch 2.11-2.13 have it
    return switch(False) if switch is not None else contextlib.nullcontext()


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def register_cpu_and_fake(op, *, reference, fake) -> None:
    """CPU tensors: with TRITON_INTERPRET=1 the op's own Triton launch runs in the interpreter;
    without it there is no Triton on the CPU, so the eager reference serves.

    The interpreter would execute kernels on fake tensors during tracing, so in interpreter
    mode the op gets an explicit fake (shape arithmetic only); on a GPU, triton_op's own
    fake and Inductor's view of the kernel are left untouched.
    """
    if INTERPRET:
        op.register_fake(fake)
    else:
        op.register_kernel("cpu")(reference)
