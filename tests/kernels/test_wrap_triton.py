"""Every Triton launch goes through wrap_triton, checked on the CPU.

Inside a `torch.library.triton_op`, Inductor can only trace a launch written as
`wrap_triton(kernel)[grid](...)`; a bare `kernel[grid](...)` runs fine eagerly and in the
interpreter (where kernels._launch.wrap_triton hands the kernel back unchanged), so without this
test only a GPU Inductor run would find one. Here every family module's `wrap_triton` is replaced
by a recorder whose launches mark themselves, and the kernels' own launch (`JITFunction.run`, or
`InterpretedFunction.run` in the interpreter, which autotuned kernels also end in) fails the test
when no such mark is active. Every op runs once, forward and backward, and every `*_kernel` of
kernels/ops must be launched, so a new kernel or launch site cannot go unchecked.
"""
import importlib
import os

import pytest
import torch
import triton

import kernels
from kernels import _launch, reference
from kernels.ops import bigram, fakequant, relu2_mlp, softcap_ce
from kernels.ops import newton_schulz as ns
from kernels.ops import xsa_attention as xa
from tests.conftest import DEVICE

OPS_DIR = os.path.join(os.path.dirname(kernels.__file__), "ops")
FAMILIES = [
    importlib.import_module(f"kernels.ops.{file[:-3]}")
    for file in sorted(os.listdir(OPS_DIR))
    if file.endswith(".py") and file != "__init__.py"
]


def _jit(kernel):
    """The JIT (or interpreted) function under any autotuner."""
    while isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return kernel


def _kernels_of(module) -> dict:
    """name -> JIT function of every launchable kernel (`*_kernel`, autotuned or not) the module defines."""
    return {name: _jit(obj) for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")}


class LaunchAudit:
    """Records which kernels went through wrap_triton and which were launched outside it."""

    def __init__(self):
        self.wrapped, self.launched, self.unwrapped = set(), set(), []
        self._inside_wrapped_launch = 0

    def recording_wrap_triton(self, original):
        audit = self

        def wrap_triton(kernel):
            audit.wrapped.add(_jit(kernel).fn.__name__)
            wrapped = original(kernel)  # the real one: the launch itself is unchanged

            class Launcher:
                def __getitem__(self, grid):
                    launch = wrapped[grid]

                    def run(*args, **kwargs):
                        audit._inside_wrapped_launch += 1
                        try:
                            return launch(*args, **kwargs)
                        finally:
                            audit._inside_wrapped_launch -= 1

                    return run

            return Launcher()

        return wrap_triton

    def checking_run(self, original_run):
        audit = self

        def run(jit_fn, *args, **kwargs):
            name = jit_fn.fn.__name__
            audit.launched.add(name)
            if not audit._inside_wrapped_launch:
                audit.unwrapped.append(name)
            return original_run(jit_fn, *args, **kwargs)

        return run


@pytest.fixture
def audit(monkeypatch):
    audit = LaunchAudit()
    for module in FAMILIES:
        if hasattr(module, "wrap_triton"):
            monkeypatch.setattr(module, "wrap_triton", audit.recording_wrap_triton(module.wrap_triton))
    # a module reaching for the helper or torch's own by attribute is recorded too
    monkeypatch.setattr(_launch, "wrap_triton", audit.recording_wrap_triton(_launch.wrap_triton))
    monkeypatch.setattr(torch.library, "wrap_triton", audit.recording_wrap_triton(torch.library.wrap_triton))
    leaf_classes = {type(jit) for module in FAMILIES for jit in _kernels_of(module).values()}
    for cls in leaf_classes:
        monkeypatch.setattr(cls, "run", audit.checking_run(cls.run))
    return audit


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def run_every_op():
    """Each op of each family once, forward and backward, through the paths that launch kernels."""
    # int6 fake-quant: both ops (the straight-through backward launches nothing)
    w = _randn(7, 33).requires_grad_()
    fakequant.int6_fakequant(w, torch.bfloat16).float().sum().backward()
    fakequant.int6_quantize(w)
    # BigramHash: the hash, the gather, both backward modes
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bigram.bigram_hash(ids, 37)
    for deterministic in (False, True):
        table = _randn(37, 12, seed=2).requires_grad_()
        bigram.bigram_embed(ids, table, deterministic).sum().backward()
    # XSA attention: forward and every backward kernel (the one-pass and the deterministic mode), with and
    # without the projection, segments and gate
    for use_xsa in (False, True):
        q, k, v = (_randn(1, 17, h, 16, seed=3 + h).requires_grad_() for h in (4, 2, 2))
        cu_seqlens = torch.tensor([0, 5, 17], dtype=torch.int32, device=DEVICE) if use_xsa else None
        gate = _randn(1, 17, 4, seed=9).requires_grad_() if use_xsa else None
        xa.xsa_attention(q, k, v, use_xsa, cu_seqlens, gate, deterministic=use_xsa).sum().backward()
    # Newton-Schulz: the op (normalise, gram, update; tall input; zero steps) and the kernels-alone helpers
    G = _randn(2, 24, 16, seed=6)
    ns.newton_schulz(G, 1, compute_dtype=torch.float32)
    ns.newton_schulz(G, 0, compute_dtype=torch.float32)
    X = _randn(1, 16, 20, seed=7)
    ns.ns_update(ns.gram_poly(ns.gram(X), -4.775, 2.0315), X, 3.4445)
    # soft-capped CE: forward, then the backward's dlogits
    x, weight = _randn(9, 16, seed=8).requires_grad_(), _randn(20, 16, seed=9).requires_grad_()
    softcap_ce.softcap_cross_entropy(x, weight, torch.arange(9, device=DEVICE)).sum().backward()
    # ... and with a per-document LoRA head: 3 documents of 3 rows, rank 4
    lora_a, lora_b = _randn(3, 4, 16, seed=13).requires_grad_(), _randn(3, 20, 4, seed=14).requires_grad_()
    targets = torch.arange(9, device=DEVICE).view(3, 3)
    softcap_ce.softcap_cross_entropy_lora(x.view(3, 3, 16), weight, targets, lora_a, lora_b, 2.0).sum().backward()
    # relu^2 MLP: the forward GEMM, then dh and split-K dW_down
    x, w_up, w_down = _randn(17, 24, seed=10), _randn(40, 24, seed=11), _randn(24, 40, seed=12)
    for t in (x, w_up, w_down):
        t.requires_grad_()
    relu2_mlp.relu2_mlp(x, w_up, w_down).sum().backward()


def test_every_launch_goes_through_wrap_triton(audit):
    run_every_op()
    assert not audit.unwrapped, (
        f"kernels launched without wrap_triton: {sorted(set(audit.unwrapped))}; inside a triton_op Inductor cannot "
        f"trace them (the GPU compile tests would fail): write the launch as wrap_triton(kernel)[grid](...)"
    )
    every_kernel = {name for module in FAMILIES for name in _kernels_of(module)}
    never = sorted(every_kernel - audit.launched)
    assert audit.launched == every_kernel, f"kernels this test never launched (add them to run_every_op): {never}"
    assert audit.wrapped == every_kernel


def test_the_audit_catches_a_bare_launch(audit):
    # The check itself: the same kernel launched once through wrap_triton and once bare.
    out = torch.empty(3, dtype=torch.int64, device=DEVICE)
    ids = torch.tensor([[5, 7, 9]], device=DEVICE)
    args = (ids, out, 3, 3, 37)
    meta = dict(BLOCK_P=16, MUL_CUR=reference.BIGRAM_MUL_CUR, MUL_PREV=reference.BIGRAM_MUL_PREV)
    bigram.wrap_triton(bigram._bigram_hash_kernel)[(1,)](*args, **meta)
    assert audit.unwrapped == []
    bigram._bigram_hash_kernel[(1,)](*args, **meta)
    assert audit.unwrapped == ["_bigram_hash_kernel"]
    assert torch.equal(out, reference.bigram_hash(ids, 37).reshape(-1))
