"""The kernel interface the model calls, and the choice of backend.

KERNELS=triton|reference picks the implementation. The default is triton where CUDA is available
or Triton's interpreter is on (TRITON_INTERPRET=1, which then runs the kernels on CPU tensors),
else reference. `kernels.reference.<name>` is always the eager reference. A family without a
Triton kernel falls back to its reference.

A kernel family is one module, `kernels/ops/<family>.py` (`kernels.<name>` is the public function,
`kernels.ops.<family>` the module), laid out top to bottom as:

1. The docstring: what it computes (shapes), how the kernels split the work, FLOPs or bytes.
2. Constants. Block sizes with one comment each saying why that size. A constant the reference
   also uses (a norm floor, the ignore index, the int6 range) comes from kernels.reference, as a
   `tl.constexpr` copy where a kernel reads it; never a literal inside a kernel.
3. The `@triton.jit` kernels (`_<name>_kernel`). Launch policy comes from the shared helpers:
   `_numerics.dot_precision(dtype)`, `_launch.num_sms(device)`, `_launch.autotune_pair(...)`.
4. Input checks, `_check_*(..., where)`: ValueError for a shape or value, TypeError for a dtype.
5. For each op `golf::<op>`:
   - `<op>_op`: the `torch.library.triton_op` (checks, allocation, grid, launches);
   - `<op>_eager`: its CPU fallback in torch ops (an alias of the reference where that already
     has the op's signature), and `_<op>_fake`; both registered by `_launch.register_cpu_and_fake`;
   - for a differentiable op, `_<op>_setup_context(ctx, inputs, output)`, which unpacks inputs
     and output by name (`q, k, v, xsa = inputs`), and `_<op>_backward`, registered with
     `<op>_op.register_autograd`.
6. The public function(s), which call the handles (`<op>_op(...)`, as backwards do too), and
   `TRITON_IMPLS = {public name: function}`, which this module collects.
"""
import contextlib
import os
from types import SimpleNamespace

import torch

from kernels import reference

BACKENDS = ("triton", "reference")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"KERNELS={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return name


def _default_backend() -> str:
    from kernels._launch import INTERPRET

    name = os.environ.get("KERNELS")
    if name:
        return _check(name)
    return "triton" if torch.cuda.is_available() or INTERPRET else "reference"


# Triton implementations by public name; a missing one falls back to the reference.
_TRITON = SimpleNamespace()
from kernels.ops import bigram as _bigram  # noqa: E402
from kernels.ops import fakequant as _fakequant  # noqa: E402
from kernels.ops import newton_schulz as _newton_schulz  # noqa: E402
from kernels.ops import relu2_mlp as _relu2_mlp  # noqa: E402
from kernels.ops import softcap_ce as _softcap_ce  # noqa: E402
from kernels.ops import xsa_attention as _xsa_attention  # noqa: E402

for _family in (_fakequant, _bigram, _xsa_attention, _newton_schulz, _softcap_ce, _relu2_mlp):
    vars(_TRITON).update(_family.TRITON_IMPLS)

_backend = _default_backend()


def backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _impl(name: str):
    if _backend == "triton":
        return getattr(_TRITON, name, getattr(reference, name))
    return getattr(reference, name)


def xsa_attention(q, k, v, xsa: bool = False, cu_seqlens=None, gate=None, deterministic: bool = False):
    """Causal GQA attention, q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]: the XSA projection when xsa;
    only keys of the query's own segment when cu_seqlens (int32 offsets into the B*T tokens, 0 first,
    B*T last, may end with repeated B*T entries); each head's output times sigmoid(gate [B,T,H]);
    deterministic=True gives the same gradient bits every run (no atomics)."""
    return _impl("xsa_attention")(q, k, v, xsa, cu_seqlens, gate, deterministic)


def int6_fakequant(w, out_dtype=None):
    """Per-row int6 quantise-dequantise of w [..., n] (exactly the export's), straight-through gradient;
    the result in out_dtype (default w's), so fp32 weights become bf16 operands in the same pass."""
    return _impl("int6_fakequant")(w, out_dtype)


def int6_quantize(w):
    """Per-row int6 values (int8, w's shape [..., n]) and fp16 scales ([...]), as the exporter stores them."""
    return _impl("int6_quantize")(w)


def bigram_hash(ids, buckets: int):
    """BigramHash bucket of each position: ids [..., T] -> int64 [..., T]."""
    return _impl("bigram_hash")(ids, buckets)


def bigram_embed(ids, table, deterministic: bool = False):
    """Fused hash + row gather: ids [..., T], table [buckets, D] -> [..., T, D]; deterministic=True gives the same gradient bits every run."""
    return _impl("bigram_embed")(ids, table, deterministic)


def newton_schulz(G, steps: int = 5, coeffs=reference.QUINTIC_COEFFS, compute_dtype=torch.bfloat16):
    """Quintic Newton-Schulz orthogonalisation of G [..., m, n], batched over leading dims."""
    return _impl("newton_schulz")(G, steps, coeffs, compute_dtype)


def softcap_cross_entropy(x, weight, targets, softcap: float = 30.0):
    """Per-token fp32 NLL of the soft-capped tied head: x [N,d], weight [V,d], targets [N] -> [N]."""
    return _impl("softcap_cross_entropy")(x, weight, targets, softcap)


def softcap_cross_entropy_lora(x, weight, targets, lora_a, lora_b, scale: float, softcap: float = 30.0):
    """Per-token fp32 NLL of the soft-capped tied head with a per-document LoRA on the logits (the phased
    TTT's lm_head adapter): x [B,T,d], weight [V,d], targets [B,T], lora_a [B,r,d], lora_b [B,V,r] -> [B,T];
    logits = softcap tanh((x weight^T + scale (x lora_a^T) lora_b^T) / softcap)."""
    return _impl("softcap_cross_entropy_lora")(x, weight, targets, lora_a, lora_b, scale, softcap)


def relu2_mlp(x, w_up, w_down, negative_slope: float = 0.0):
    """The block's MLP leaky_relu(x @ w_up^T, negative_slope)^2 @ w_down^T: x [..., d], w_up [F, d],
    w_down [d, F] -> [..., d]; slope 0.0 is SPEC's relu^2, 0.5 FRONTIER.md's (a float fixed at build time)."""
    return _impl("relu2_mlp")(x, w_up, w_down, negative_slope)
