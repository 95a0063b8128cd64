"""The kernel interface: backend choice, and the references against direct computations from SPEC.md."""
import math

import pytest
import torch

import kernels
from kernels import reference
from kernels.ops import bigram, fakequant, newton_schulz, relu2_mlp, softcap_ce, xsa_attention


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="not a backend; use one of triton, reference"):
        kernels.set_backend("cuda")


def test_use_backend_restores_previous():
    before = kernels.backend()
    with kernels.use_backend("reference"):
        assert kernels.backend() == "reference"
    assert kernels.backend() == before


def test_bigram_hash_matches_spec_formula():
    ids = torch.tensor([[5, 1000, 3, 3], [1, 0, 1023, 7]])
    got = reference.bigram_hash(ids, 2048)
    for b in range(2):
        assert got[b, 0] == 2047
        for t in range(1, 4):
            assert got[b, t] == ((36313 * int(ids[b, t])) ^ (27191 * int(ids[b, t - 1]))) % 2047


def test_int6_quantize_scale_floor_and_clamp():
    w = torch.tensor([[0.01, -0.02, 0.0], [3.1, -3.2, 1.0]])
    q, scale = reference.int6_quantize(w)
    assert scale.dtype == torch.float16 and q.dtype == torch.int8
    assert scale[0].item() == pytest.approx(1 / 31, rel=1e-3)  # floor 1/31 for small rows
    assert scale[1].item() == pytest.approx(3.2 / 31, rel=1e-3)
    assert q[1].tolist() == [round(3.1 / scale[1].item()), -31, round(1.0 / scale[1].item())]
    assert q.min() >= -32 and q.max() <= 31


def test_int6_fakequant_is_dequantised_export_with_straight_through_grad():
    w = torch.randn(7, 33, requires_grad=True)
    out = reference.int6_fakequant(w)
    torch.testing.assert_close(out, reference.int6_dequantize(*reference.int6_quantize(w)), rtol=0, atol=0)
    g = torch.randn_like(w)
    out.backward(g)
    torch.testing.assert_close(w.grad, g, rtol=0, atol=0)


def test_xsa_attention_reference_against_loops():
    torch.manual_seed(0)
    B, T, H, Hkv, D = 1, 5, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (H, Hkv, Hkv))
    got = reference.xsa_attention(q, k, v, xsa=True)
    for h in range(H):
        kv = h // (H // Hkv)
        for t in range(T):
            s = torch.stack([q[0, t, h] @ k[0, j, kv] / math.sqrt(D) for j in range(t + 1)])
            y = (torch.softmax(s, 0)[:, None] * v[0, : t + 1, kv]).sum(0)
            vhat = v[0, t, kv] / v[0, t, kv].norm()
            y = y - (y @ vhat) * vhat
            torch.testing.assert_close(got[0, t, h], y)
    # the XSA output is orthogonal to its own value vector
    vh = v.repeat_interleave(H // Hkv, dim=2)
    assert (got * vh).sum(-1).abs().max() < 1e-12


def test_sdpa_baseline_matches_explicit_reference():
    torch.manual_seed(1)
    q = torch.randn(2, 9, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 9, 1, 16, dtype=torch.float64), torch.randn(2, 9, 1, 16, dtype=torch.float64)
    for xsa in (False, True):
        torch.testing.assert_close(reference.xsa_attention_sdpa(q, k, v, xsa), reference.xsa_attention(q, k, v, xsa))


def test_newton_schulz_coeff_forms_and_orientation():
    torch.manual_seed(2)
    G = torch.randn(3, 24, 16, dtype=torch.float64)
    one = reference.newton_schulz(G, 5, (3.4445, -4.7750, 2.0315), torch.float64)
    listed = reference.newton_schulz(G, 5, [(3.4445, -4.7750, 2.0315)] * 5, torch.float64)
    torch.testing.assert_close(one, listed, rtol=0, atol=0)
    assert one.shape == G.shape
    s = torch.linalg.svdvals(one)
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic's known band around 1
    with pytest.raises(ValueError, match="one \\(a, b, c\\) triple or 5"):
        reference.newton_schulz(G, 5, [(1.0, 2.0, 3.0)] * 4)


def test_softcap_cross_entropy_reference():
    torch.manual_seed(3)
    x, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64) * 10
    t = torch.randint(0, 10, (6,))
    logits = 30 * torch.tanh((x @ w.T) / 30)
    expected = torch.logsumexp(logits, -1) - logits[torch.arange(6), t]
    torch.testing.assert_close(reference.softcap_cross_entropy(x, w, t), expected)


# Every public function, its Triton implementation and its argument count (kernels/__init__.py).
PUBLIC = {
    "xsa_attention": (xsa_attention.xsa_attention, 7),
    "int6_fakequant": (fakequant.int6_fakequant, 2),
    "int6_quantize": (fakequant.int6_quantize, 1),
    "bigram_hash": (bigram.bigram_hash, 2),
    "bigram_embed": (bigram.bigram_embed, 3),
    "newton_schulz": (newton_schulz.newton_schulz, 4),
    "softcap_cross_entropy": (softcap_ce.softcap_cross_entropy, 4),
    "softcap_cross_entropy_lora": (softcap_ce.softcap_cross_entropy_lora, 7),
    "relu2_mlp": (relu2_mlp.relu2_mlp, 4),
}


def test_every_public_function_has_a_triton_implementation():
    assert sorted(vars(kernels._TRITON)) == sorted(PUBLIC)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_function_runs_its_backends_implementation(monkeypatch, name, backend):
    """Which implementation ran, by identity: both are replaced by recorders, and the public function
    must call exactly the selected backend's, once, with its arguments passed through unchanged."""
    triton_impl, arity = PUBLIC[name]
    with kernels.use_backend(backend):
        assert kernels._impl(name) is (triton_impl if backend == "triton" else getattr(reference, name))
    calls = []

    def recorder(which):
        def implementation(*args):
            calls.append((which, args))
            return which

        return implementation

    monkeypatch.setattr(kernels._TRITON, name, recorder("triton"))
    monkeypatch.setattr(reference, name, recorder("reference"))
    args = tuple(object() for _ in range(arity))
    with kernels.use_backend(backend):
        assert getattr(kernels, name)(*args) == backend
    assert len(calls) == 1 and calls[0][0] == backend
    assert len(calls[0][1]) == arity and all(got is sent for got, sent in zip(calls[0][1], args))


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_int6_fakequant_out_dtype_is_one_rounding_of_the_fp32_result(backend):
    w = torch.randn(7, 45, requires_grad=True)
    with kernels.use_backend(backend):
        out = kernels.int6_fakequant(w, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.int6_dequantize(*reference.int6_quantize(w.detach())).to(torch.bfloat16))
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, torch.ones_like(w))


def test_launch_directly_turns_wrap_triton_tracing_off():
    # The kernels-alone helpers (newton_schulz.gram, ...) rely on torch's private switch; a torch
    # without it would silently fall back to the slow tracing path.
    from torch._library.triton import is_wrap_triton_enabled

    from kernels._launch import launch_directly

    assert is_wrap_triton_enabled()
    with launch_directly():
        assert not is_wrap_triton_enabled()
    assert is_wrap_triton_enabled()
