"""The constants that define the system, written out here from SPEC.md, compared with what the code uses.

The kernels take their constants from kernels.reference (kernels/__init__.py: "never a literal
inside a kernel"), and the kernel tests compare the kernels with the reference, so a wrong number
in the reference passes every one of them. Nothing here is imported from the code under test:
each value is a literal from SPEC.md (or, where SPEC leaves it to PyTorch, PyTorch's documented
default), and where a formula is involved the result is computed by hand, in plain Python, and
compared with the reference, the Triton kernel and the model's use of it.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels.ops import bigram, fakequant, softcap_ce
from kernels.ops import newton_schulz as ns
from kernels.ops import xsa_attention as xa
from model import export
from model.config import Config
from model.muon import Muon
from tests.conftest import DEVICE

# SPEC.md, model table and training recipe
BIGRAM_BUCKETS = 2048  # "table 2048 x 128"
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191  # "(36313*id[t] XOR 27191*id[t-1]) mod 2047 (int32 arithmetic)"
NS_STEPS = 5  # "5 Newton-Schulz steps with coefficients (3.4445, -4.7750, 2.0315)", the same every step
NS_COEFFS = (3.4445, -4.7750, 2.0315)
INT6_MIN, INT6_MAX = -32, 31  # "values in [-32, 31], scale = row_absmax/31 stored in fp16, floor 1/31"
INT8_MAX = 127  # int8 per row, symmetric: [-127, 127]
INT8_CLIP_PERCENTILE = 99.99984  # "clip at the 99.99984th percentile of |w|"
LOGIT_SOFTCAP = 30.0  # "soft cap 30*tanh(logits/30)"
# Where SPEC says "v/||v||" and "cross-entropy", PyTorch's own defaults fill in the edge cases:
XSA_NORM_FLOOR = 1e-12  # F.normalize's eps: v_hat = v / max(||v||, 1e-12) (0 for v = 0)
IGNORE_INDEX = -100  # F.cross_entropy's ignore_index


def _int32(v: int) -> int:
    """Python int -> the int32 it wraps to."""
    return (v + 2**31) % 2**32 - 2**31


def spec_bigram_hash(row: list[int], buckets: int = BIGRAM_BUCKETS) -> list[int]:
    """SPEC's hash of one sequence, by hand: position 0 -> buckets-1, else (36313*id[t] XOR
    27191*id[t-1]) mod (buckets-1) in int32 (products wrap; mod is floor-mod, as torch's %)."""
    out = [buckets - 1]
    for prev, cur in zip(row, row[1:]):
        mixed = _int32(_int32(BIGRAM_MUL_CUR * cur) ^ _int32(BIGRAM_MUL_PREV * prev))
        out.append(mixed % (buckets - 1))
    return out


# Token ids of the model's vocabulary (1024), the vocab edge, repeats; one row past int32 (ids > 59,138).
BIGRAM_ROWS = [[1, 0, 1023, 7, 7, 512, 1023, 2, 999], [5, 1000, 3, 3, 1, 1, 0, 0, 44]]
BIGRAM_OVERFLOW_ROW = [0, 59139, 100_000, 2**20, 2**31 - 1, 5]


def test_bigram_constants():
    assert (reference.BIGRAM_MUL_CUR, reference.BIGRAM_MUL_PREV) == (BIGRAM_MUL_CUR, BIGRAM_MUL_PREV)
    assert (bigram.MUL_CUR, bigram.MUL_PREV) == (BIGRAM_MUL_CUR, BIGRAM_MUL_PREV)
    assert Config().bigram_vocab_size == BIGRAM_BUCKETS


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_bigram_hash_is_specs_formula_by_hand(backend):
    ids = torch.tensor(BIGRAM_ROWS, device=DEVICE)
    expected = torch.tensor([spec_bigram_hash(row) for row in BIGRAM_ROWS], device=DEVICE)
    assert torch.equal(reference.bigram_hash(ids, BIGRAM_BUCKETS), expected)
    assert torch.equal(bigram.bigram_hash(ids, BIGRAM_BUCKETS), expected)  # the Triton kernel
    with kernels.use_backend(backend):
        assert torch.equal(kernels.bigram_hash(ids, BIGRAM_BUCKETS), expected)
        # the gather reads those rows: table row b holds b
        table = torch.arange(BIGRAM_BUCKETS, dtype=torch.float32, device=DEVICE)[:, None].expand(-1, 4).contiguous()
        assert torch.equal(kernels.bigram_embed(ids, table)[..., 0], expected.float())
    wrapped = torch.tensor([BIGRAM_OVERFLOW_ROW], device=DEVICE)
    expected = torch.tensor([spec_bigram_hash(BIGRAM_OVERFLOW_ROW)], device=DEVICE)
    assert torch.equal(reference.bigram_hash(wrapped, BIGRAM_BUCKETS), expected)
    assert torch.equal(bigram.bigram_hash(wrapped, BIGRAM_BUCKETS), expected)


def test_newton_schulz_coefficients_and_schedule():
    assert reference.QUINTIC_COEFFS == NS_COEFFS
    assert reference.per_step_coeffs(NS_STEPS, reference.QUINTIC_COEFFS) == [NS_COEFFS] * NS_STEPS
    for fn in (reference.newton_schulz, ns.newton_schulz, kernels.newton_schulz):
        defaults = inspect.signature(fn).parameters
        assert defaults["steps"].default == NS_STEPS and tuple(defaults["coeffs"].default) == NS_COEFFS, fn
    # what training runs: Muon's default schedule and the config's step count
    assert tuple(inspect.signature(Muon).parameters["coeffs"].default) == NS_COEFFS
    assert Config().muon_backend_steps == NS_STEPS


def test_newton_schulz_step_by_hand():
    # One step of X <- a X + (b A + c A A) X, A = X X^T, from X = G / ||G||_F, in fp64 with the literals.
    G = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = G / G.norm()
    a, b, c = NS_COEFFS
    A = X @ X.T
    expected = a * X + (b * A + c * A @ A) @ X
    got = reference.newton_schulz(G, 1, compute_dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # 1e-7 in the norm: the reference's eps
    torch.testing.assert_close(ns.newton_schulz(G.float(), 1, compute_dtype=torch.float32), expected.float())


def test_int6_range_and_scale_rule_by_hand():
    assert (reference.INT6_MIN, reference.INT6_MAX) == (INT6_MIN, INT6_MAX)
    assert (fakequant.INT6_MIN.value, fakequant.INT6_MAX.value) == (INT6_MIN, INT6_MAX)
    # rows: ordinary, one below the 1/31 floor, all zero, and one whose fp16 scale rounds below
    # absmax / 31, so that its extremes land just past +-31 and round onto the range's end
    w = torch.tensor([
        [0.5, -1.25, 0.03, 2.0],
        [0.01, -0.02, 0.0, 0.005],
        [0.0, 0.0, 0.0, 0.0],
        [3.1001, -3.1001, 1.0, -0.7],
    ])
    q_expected, scale_expected = [], []
    for row in w.tolist():
        absmax = max(abs(v) for v in row)
        scale = float(torch.tensor(max(absmax / INT6_MAX, 1 / INT6_MAX), dtype=torch.float32).half())
        scale_expected.append(scale)
        q_expected.append([min(max(round(v / scale), INT6_MIN), INT6_MAX) for v in row])  # round: half to even
    q_expected = torch.tensor(q_expected, dtype=torch.int8)
    scale_expected = torch.tensor(scale_expected, dtype=torch.float16)
    assert scale_expected[3].item() < 3.1001 / INT6_MAX and q_expected[3].max() == INT6_MAX
    for quantize in (reference.int6_quantize, fakequant.int6_quantize, export.quantize_int6):
        q, scale = quantize(w.to(DEVICE))
        assert torch.equal(q.cpu(), q_expected) and torch.equal(scale.cpu(), scale_expected), quantize
    deq = fakequant.int6_fakequant(w.to(DEVICE)).cpu()
    assert torch.equal(deq, q_expected.float() * scale_expected.float()[:, None])


def test_int8_range_and_clip_percentile():
    assert export.INT8_MAX == INT8_MAX
    assert export.INT8_CLIP_QUANTILE == pytest.approx(INT8_CLIP_PERCENTILE / 100, abs=1e-12)
    # one row with a single outlier: the clip is the linear-interpolated 99.99984th percentile of |w|
    n = 1001
    row = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    row[7] = 50.0  # the outlier
    w = row.float()[None]
    abs_sorted = sorted(abs(v) for v in w[0].tolist())
    position = INT8_CLIP_PERCENTILE / 100 * (n - 1)
    lo = math.floor(position)
    clip = abs_sorted[lo] + (abs_sorted[lo + 1] - abs_sorted[lo]) * (position - lo)
    scale = float(torch.tensor(clip / INT8_MAX, dtype=torch.float32).half())
    q, got_scale = export.quantize_int8(w)
    assert got_scale.item() == scale
    assert q.abs().max().item() == INT8_MAX and q.dtype == torch.int8
    expected = [min(max(round(max(min(v, clip), -clip) / scale), -INT8_MAX), INT8_MAX) for v in w[0].tolist()]
    assert q[0].tolist() == expected


def test_logit_softcap():
    assert Config().logit_softcap == LOGIT_SOFTCAP
    for fn in (reference.softcap_cross_entropy, softcap_ce.softcap_cross_entropy, kernels.softcap_cross_entropy):
        assert inspect.signature(fn).parameters["softcap"].default == LOGIT_SOFTCAP, fn
    # by hand: logits 30 tanh(l / 30), then the NLL of the target
    x = torch.tensor([[4.0, -2.0], [1.0, 3.0]])
    weight = torch.tensor([[20.0, 1.0], [-15.0, 5.0], [0.5, 0.5]])
    targets = [0, 1]
    expected = []
    for row, target in zip(x.tolist(), targets):
        raw = [sum(a * b for a, b in zip(row, w)) for w in weight.tolist()]
        capped = [LOGIT_SOFTCAP * math.tanh(logit / LOGIT_SOFTCAP) for logit in raw]
        expected.append(math.log(sum(math.exp(v) for v in capped)) - capped[target])
    expected = torch.tensor(expected)
    targets = torch.tensor(targets)
    torch.testing.assert_close(reference.softcap_cross_entropy(x, weight, targets), expected)
    got = softcap_ce.softcap_cross_entropy(x.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected)


def test_ignore_index():
    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX
    assert reference.IGNORE_INDEX == IGNORE_INDEX and softcap_ce.IGNORE_INDEX.value == IGNORE_INDEX
    x, weight = torch.randn(3, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE)
    targets = torch.tensor([2, IGNORE_INDEX, 4], device=DEVICE)
    for fn in (reference.softcap_cross_entropy, softcap_ce.softcap_cross_entropy):
        loss = fn(x, weight, targets)
        assert loss[1].item() == 0.0 and loss[0].item() > 0 and loss[2].item() > 0, fn


def test_xsa_norm_floor():
    assert inspect.signature(F.normalize).parameters["eps"].default == XSA_NORM_FLOOR
    assert reference.XSA_NORM_EPS == XSA_NORM_FLOOR and xa.NORM_EPS.value == XSA_NORM_FLOOR
