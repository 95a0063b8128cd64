"""The kernel interface the model calls, and the choice of backend.

KERNELS=triton|reference picks the implementation (default: triton where CUDA is available,
else reference). `kernels.reference.<name>` is always the eager reference. With
KERNELS=triton and TRITON_INTERPRET=1, the Triton kernels run in Triton's interpreter on CPU
tensors. A family without a Triton kernel yet falls back to its reference.
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


def xsa_attention(q, k, v, xsa: bool = False):
    """Causal GQA attention, q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]; XSA projection when xsa."""
    return _impl("xsa_attention")(q, k, v, xsa)


def int6_fakequant(w, out_dtype=None):
    """Per-row int6 quantise-dequantise (exactly the export's), straight-through gradient; the
    result in out_dtype (default w's), so fp32 weights become bf16 operands in the same pass."""
    return _impl("int6_fakequant")(w, out_dtype)


def int6_quantize(w):
    """Per-row int6 values (int8 storage) and fp16 scales, as the exporter stores them."""
    return _impl("int6_quantize")(w)


def bigram_hash(ids, buckets: int):
    """BigramHash bucket of each position: [B,T] -> int64 [B,T]."""
    return _impl("bigram_hash")(ids, buckets)


def bigram_embed(ids, table, deterministic: bool = False):
    """Fused hash + row gather: [B,T] -> [B,T,D]; deterministic=True gives the same gradient bits every run."""
    return _impl("bigram_embed")(ids, table, deterministic)


def newton_schulz(G, steps: int = 5, coeffs=reference.QUINTIC_COEFFS, compute_dtype=torch.bfloat16):
    """Quintic Newton-Schulz orthogonalisation of G [..., m, n], batched over leading dims."""
    return _impl("newton_schulz")(G, steps, coeffs, compute_dtype)


def softcap_cross_entropy(x, weight, targets, softcap: float = 30.0):
    """Per-token fp32 NLL of the soft-capped tied head: x [N,d], weight [V,d], targets [N] -> [N]."""
    return _impl("softcap_cross_entropy")(x, weight, targets, softcap)


def relu2_mlp(x, w_up, w_down):
    """The block's MLP relu(x @ w_up^T)^2 @ w_down^T: x [..., d], w_up [F, d], w_down [d, F] -> [..., d]."""
    return _impl("relu2_mlp")(x, w_up, w_down)
