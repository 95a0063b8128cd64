"""Soft-capped cross-entropy kernel (kernels/ops/softcap_ce.py) against kernels.reference.

On the CPU the Triton kernels run in the interpreter with fp32 operands and 32-wide blocks, so
N in {37, 130}, V = 100 and d = 48 are ragged in every dimension; fp16 and bf16 inputs run there
too (test_16bit_inputs); the model-size bf16 case and Inductor need a GPU.
"""
import pytest
import torch

import kernels
from kernels import _launch, reference
from kernels.ops import softcap_ce
from kernels._numerics import dot_precision
from tests.conftest import DEVICE, HAS_GPU
from tests.kernels.gpu_tiles import BYTES, CONFIG_TEST_DTYPE, assert_fits_sm90, is_power_of_two, pipelined_bytes
from tests.tolerances import assert_close, assert_within_pytorch_error


def make_inputs(N, V, d, x_scale=1.0, dtype=torch.float32, weight_dtype=None, seed=0):
    """x [N, d], weight [V, d], targets [N] and a random per-token upstream gradient [N]."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=gen) * x_scale / d**0.5).to(DEVICE, dtype)
    weight = torch.randn(V, d, generator=gen).to(DEVICE, weight_dtype or dtype)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    grad_loss = torch.randn(N, generator=gen).to(DEVICE)
    return x, weight, targets, grad_loss


def loss_and_grads(fn, x, weight, targets, grad_loss, softcap, cast=None):
    """fn's loss [N] and the gradients of sum(loss * grad_loss) for x and weight."""
    x = (x.to(cast) if cast else x).detach().requires_grad_()
    weight = (weight.to(cast) if cast else weight).detach().requires_grad_()
    loss = fn(x, weight, targets, softcap)
    loss.backward(grad_loss.to(loss.dtype))
    return loss.detach(), x.grad, weight.grad


def check_against_fp64_reference(x, weight, targets, grad_loss, softcap):
    loss, grad_x, grad_weight = loss_and_grads(softcap_ce.softcap_cross_entropy, x, weight, targets, grad_loss, softcap)
    ref_loss, ref_grad_x, ref_grad_weight = loss_and_grads(
        reference.softcap_cross_entropy, x, weight, targets, grad_loss, softcap, cast=torch.float64
    )
    assert loss.dtype == torch.float32 and grad_x.dtype == x.dtype and grad_weight.dtype == weight.dtype
    assert_close(loss, ref_loss.float(), torch.float32)
    assert_close(grad_x, ref_grad_x.to(x.dtype), x.dtype)
    assert_close(grad_weight, ref_grad_weight.to(weight.dtype), weight.dtype)


def test_outputs_are_poisoned_in_tests():
    # Every comparison below would catch an element the kernels forget to write.
    assert _launch.POISON


@pytest.mark.parametrize("d", [32, 48])
@pytest.mark.parametrize("V", [64, 100])
@pytest.mark.parametrize("N", [1, 37, 130])
def test_loss_and_grads_match_reference(N, V, d):
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=4.0, seed=N * V + d)
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)


# 16-bit x and weight take the GPU's 16-bit path (16-bit MMA operands, 16-bit gradients), held to
# the fair bound as on the GPU. The interpreter rounds fp16 as torch does; for bf16 it widens the
# MMA operands (kernels/_numerics.py) and truncates casts, which the bound still absorbs here.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_inputs(dtype):
    x, weight, targets, grad_loss = make_inputs(130, 100, 48, x_scale=8.0, dtype=dtype, seed=15)
    got = loss_and_grads(softcap_ce.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    exact = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0, cast=torch.float64)
    same_dtype = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for g, e, t in zip(got, exact, same_dtype):
        assert_within_pytorch_error(g, e, t)


@pytest.mark.parametrize("softcap", [15.0, 30.0])
def test_saturated_soft_cap(softcap):
    # Raw logits of std ~ 3 x softcap: most sit on the flat part of tanh.
    N, V, d = 37, 100, 48
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=3 * softcap, seed=7)
    raw = x.double() @ weight.double().T
    assert (raw.abs() > 2 * softcap).float().mean() > 0.3, "the test must exercise the saturated cap"
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap)


def test_bf16_weight_with_fp32_activations():
    # The tied embedding is stored in bf16: the product runs in x's dtype, grad_weight comes back in bf16.
    x, weight, targets, grad_loss = make_inputs(37, 100, 48, x_scale=4.0, weight_dtype=torch.bfloat16, seed=3)
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)


def test_backward_in_several_ragged_chunks(monkeypatch):
    N, V, d = 37, 100, 48
    # 7 rows per chunk: 6 chunks, the last one 2 rows.
    monkeypatch.setattr(softcap_ce, "BACKWARD_CHUNK_BYTES", 7 * V * 4)
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=4.0, seed=11)
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)


def test_mean_loss_stride0_gradient_and_frozen_weight():
    # loss.mean().backward() hands the op an expanded (stride-0) gradient; weight needs no grad.
    x, weight, targets, _ = make_inputs(37, 100, 48, x_scale=4.0, seed=8)
    xk, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    softcap_ce.softcap_cross_entropy(xk, weight, targets).mean().backward()
    reference.softcap_cross_entropy(xr, weight.double(), targets).mean().backward()
    assert_close(xk.grad, xr.grad.float(), torch.float32)


def test_lse_output_and_its_gradient():
    # The forward op also returns lse; a gradient arriving through it must be honoured too.
    N, V, d, softcap = 37, 100, 48, 20.0
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=4.0, seed=5)
    grad_lse = torch.randn(N, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def run(fwd, cast=None):
        xx = (x.to(cast) if cast else x).detach().requires_grad_()
        ww = (weight.to(cast) if cast else weight).detach().requires_grad_()
        loss, lse = fwd(xx, ww)
        ((loss * grad_loss.to(loss.dtype)).sum() + (lse * grad_lse.to(lse.dtype)).sum()).backward()
        return lse.detach(), xx.grad, ww.grad

    def reference_fwd(xx, ww):
        capped = softcap * torch.tanh(xx @ ww.T / softcap)
        return reference.softcap_cross_entropy(xx, ww, targets, softcap), torch.logsumexp(capped, dim=-1)

    lse, grad_x, grad_weight = run(lambda xx, ww: softcap_ce.softcap_ce_fwd_op(xx, ww, targets, softcap))
    ref_lse, ref_grad_x, ref_grad_weight = run(reference_fwd, cast=torch.float64)
    assert_close(lse, ref_lse.float(), torch.float32)
    assert_close(grad_x, ref_grad_x.float(), torch.float32)
    assert_close(grad_weight, ref_grad_weight.float(), torch.float32)


def test_ignore_index_like_cross_entropy():
    N, V, d = 37, 100, 48
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=4.0, seed=9)
    targets[::3] = -100
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)
    loss = softcap_ce.softcap_cross_entropy(x, weight, targets)
    assert (loss[::3] == 0).all()


def test_out_of_range_target_gives_nan_in_the_op_and_an_error_in_the_function():
    N, V, d = 37, 100, 32
    x, weight, targets, _ = make_inputs(N, V, d, seed=1)
    targets[4] = V
    loss, _lse = softcap_ce.softcap_ce_fwd_op(x, weight, targets, 30.0)  # no sync: NaN marks the bad token
    assert torch.isnan(loss[4]) and not torch.isnan(loss[torch.arange(N, device=DEVICE) != 4]).any()
    if DEVICE == "cpu":  # checking costs nothing here; on CUDA it would be a sync, so NaN it is
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 100\) or be -100"):
            softcap_ce.softcap_cross_entropy(x, weight, targets)


def test_bad_shapes_raise_one_clear_error():
    x, weight, targets, _ = make_inputs(5, 64, 32)
    with pytest.raises(ValueError, match="same d"):
        softcap_ce.softcap_cross_entropy(x, weight[:, :16], targets)
    with pytest.raises(ValueError, match="targets must be an integer tensor of shape"):
        softcap_ce.softcap_cross_entropy(x, weight, targets[:4])
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        softcap_ce.softcap_cross_entropy(x.double(), weight.double(), targets)


def test_empty_batch():
    x, weight, targets, _ = make_inputs(0, 64, 32)
    loss, grad_x, grad_weight = loss_and_grads(
        softcap_ce.softcap_cross_entropy, x, weight, targets, torch.zeros(0, device=DEVICE), 30.0
    )
    assert loss.shape == (0,) and grad_x.shape == (0, 32)
    assert (grad_weight == 0).all()


def test_public_api_uses_the_triton_kernel():
    x, weight, targets, _ = make_inputs(37, 100, 48, seed=2)
    assert kernels._TRITON.softcap_cross_entropy is softcap_ce.softcap_cross_entropy
    with kernels.use_backend("triton"):
        got = kernels.softcap_cross_entropy(x, weight, targets)
    assert_close(got, reference.softcap_cross_entropy(x.double(), weight.double(), targets).float(), torch.float32)


def test_opcheck():
    N, V, d = 37, 100, 48
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=4.0, seed=4)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, weight = x.requires_grad_(), weight.requires_grad_()
    torch.library.opcheck(softcap_ce.softcap_ce_fwd_op, (x, weight, targets, 30.0), test_utils=checks)
    lse = torch.logsumexp(30 * torch.tanh(x.detach() @ weight.detach().T / 30), dim=-1)
    dlogits_args = (x.detach(), weight.detach(), targets, lse, grad_loss, torch.zeros_like(grad_loss), 30.0)
    torch.library.opcheck(softcap_ce.softcap_ce_dlogits_op, dlogits_args, test_utils=checks)


def test_compiles_without_graph_break_or_recompile():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts compiled frames, runs them eagerly
    compiled = torch.compile(softcap_ce.softcap_cross_entropy, fullgraph=True, backend=counter)
    for seed in (0, 1):  # the second same-shape input must reuse the first graph
        x, weight, targets, grad_loss = make_inputs(37, 100, 48, x_scale=4.0, seed=seed)
        loss, grad_x, grad_weight = loss_and_grads(compiled, x, weight, targets, grad_loss, 30.0)
        ref = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0, cast=torch.float64)
        for got, want in zip((loss, grad_x, grad_weight), ref):
            assert_close(got, want.float(), torch.float32)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- the GPU's tile configs
# The interpreter runs 32-wide blocks; a GPU runs softcap_ce.GPU_CONFIGS, one per operand size of x.
# Each is checked against what the kernels assume and run here, loss and both gradients, through
# the interpreter (on fp32 operands: the 16-bit config's tiles with fp32 numbers).


@pytest.mark.parametrize("x_bytes", sorted(softcap_ce.GPU_CONFIGS))
def test_gpu_config_keeps_the_kernels_rules(x_bytes):
    config = softcap_ce.GPU_CONFIGS[x_bytes]
    # tl.arange takes powers of two, tl.dot operands at least 16 rows and columns
    assert all(is_power_of_two(config[b]) and config[b] >= 16 for b in ("BLOCK_N", "BLOCK_V", "BLOCK_D")), config
    # the loop over d buffers an x [BLOCK_N, BLOCK_D] and a weight [BLOCK_V, BLOCK_D] tile per stage; the
    # weight may be stored wider than x (fp32 weight, 16-bit x), so it is counted at 4 bytes
    stages, d = config["num_stages"], config["BLOCK_D"]
    x_tiles = pipelined_bytes(stages, [config["BLOCK_N"] * d], [], x_bytes)
    weight_tiles = pipelined_bytes(stages, [config["BLOCK_V"] * d], [], BYTES["fp32"])
    assert_fits_sm90(x_tiles + weight_tiles, f"softcap_ce GPU config for {x_bytes}-byte x: {config}")


@pytest.mark.parametrize("x_bytes", sorted(softcap_ce.GPU_CONFIGS))
def test_loss_and_grads_with_each_gpu_config(monkeypatch, x_bytes):
    config = softcap_ce.GPU_CONFIGS[x_bytes]
    monkeypatch.setattr(softcap_ce, "_config", lambda x: dict(config, INPUT_PRECISION=dot_precision(x.dtype)))
    # N = V = 300 cross 128-wide tiles raggedly, d = 80 does not fill its last BLOCK_D step. In the
    # interpreter on fp32 operands; natively on a GPU, on operands of the size the config serves.
    dtype = torch.float32 if x_bytes == 4 or not HAS_GPU else CONFIG_TEST_DTYPE
    x, weight, targets, grad_loss = make_inputs(300, 300, 80, x_scale=4.0, dtype=dtype, seed=16)
    if dtype == torch.float32:
        check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)
        return
    got = loss_and_grads(softcap_ce.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    exact = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0, cast=torch.float64)
    same_dtype = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    for g, e, t in zip(got, exact, same_dtype):
        assert_within_pytorch_error(g, e, t)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_fp32_on_gpu_with_full_size_tiles():
    # The GPU config (128 x 128 x 32 tiles for fp32, IEEE dot) on shapes ragged for it.
    x, weight, targets, grad_loss = make_inputs(300, 1000, 200, x_scale=4.0, seed=12)
    check_against_fp64_reference(x, weight, targets, grad_loss, softcap=30.0)


@pytest.mark.gpu
def test_bf16_full_size_within_pytorch_error():
    N, V, d = 8192, 1024, 512
    x, weight, targets, grad_loss = make_inputs(N, V, d, x_scale=8.0, dtype=torch.bfloat16, seed=13)
    got = loss_and_grads(softcap_ce.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    exact = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0, cast=torch.float64)
    torch_bf16 = loss_and_grads(reference.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    for name, g, e, t in zip(("loss", "grad_x", "grad_weight"), got, exact, torch_bf16):
        assert torch.isfinite(g).all(), name
        assert_within_pytorch_error(g, e, t)


@pytest.mark.gpu
def test_inductor_compile_matches_eager():
    x, weight, targets, grad_loss = make_inputs(1000, 1024, 512, x_scale=8.0, dtype=torch.bfloat16, seed=14)
    compiled = torch.compile(softcap_ce.softcap_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, x, weight, targets, grad_loss, 30.0)
    eager = loss_and_grads(softcap_ce.softcap_cross_entropy, x, weight, targets, grad_loss, 30.0)
    for g, e in zip(got, eager):
        assert_close(g, e)


# --------------------------------------------------------------------------- with a per-document LoRA head
# softcap_cross_entropy_lora (the phased TTT's lm_head adapter): logits x W^T + scale (x A_b^T) B_b^T.
# B = 3 documents; T = 37 is ragged for 32-row blocks; r = 40 takes two ragged steps of the r loop.


def make_lora_inputs(B, T, V, d, r, dtype=torch.float32, seed=0):
    """x [B, T, d], weight [V, d], targets [B, T], A [B, r, d], B [B, V, r], upstream gradient [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, d, generator=gen) * 4.0 / d**0.5).to(DEVICE, dtype)
    weight = torch.randn(V, d, generator=gen).to(DEVICE, dtype)
    targets = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
    lora_a = (torch.rand(B, r, d, generator=gen) * 2 - 1).div(d**0.5).to(DEVICE)  # fp32 parameters
    lora_b = (torch.randn(B, V, r, generator=gen) * 2 / r**0.5).to(DEVICE)  # the delta about as large as x W^T
    return x, weight, targets, lora_a, lora_b, torch.randn(B, T, generator=gen).to(DEVICE)


def lora_loss_and_grads(fn, x, weight, targets, lora_a, lora_b, grad_loss, cast=None, scale=1.8):
    """fn's loss [B, T] and the gradients of sum(loss * grad_loss) for x, weight, A and B."""
    leaves = [(t.to(cast) if cast else t).detach().requires_grad_() for t in (x, weight, lora_a, lora_b)]
    loss = fn(leaves[0], leaves[1], targets, leaves[2], leaves[3], scale, 30.0)
    loss.backward(grad_loss.to(loss.dtype))
    return (loss.detach(), *(leaf.grad for leaf in leaves))


def check_lora_against_fp64_reference(*inputs):
    got = lora_loss_and_grads(softcap_ce.softcap_cross_entropy_lora, *inputs)
    want = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs, cast=torch.float64)
    assert got[0].dtype == torch.float32 and got[0].shape == inputs[2].shape
    for name, g, w in zip(("loss", "grad_x", "grad_weight", "grad_a", "grad_b"), got, want):
        assert g.dtype == (torch.float32 if name == "loss" else {"grad_x": inputs[0], "grad_weight": inputs[1],
                                                                   "grad_a": inputs[3], "grad_b": inputs[4]}[name].dtype)
        assert_close(g, w.to(g.dtype), g.dtype)


@pytest.mark.parametrize("B,T,r", [(2, 1, 8)])  # (3, 37, 40) in test_lora_backward_in_chunks_of_whole_documents
def test_lora_loss_and_grads_match_reference(B, T, r):
    check_lora_against_fp64_reference(*make_lora_inputs(B, T, 100, 48, r, seed=B * T + r))


def test_lora_backward_in_chunks_of_whole_documents(monkeypatch):
    monkeypatch.setattr(softcap_ce, "BACKWARD_CHUNK_BYTES", 2 * 37 * 100 * 4)  # 2 documents a chunk: 2 + 1
    x, weight, targets, lora_a, lora_b, grad_loss = make_lora_inputs(3, 37, 100, 48, 40, seed=21)
    targets[1, ::4] = reference.IGNORE_INDEX
    check_lora_against_fp64_reference(x, weight, targets, lora_a, lora_b, grad_loss)


def test_lora_with_zero_b_is_the_plain_head():
    x, weight, targets, lora_a, lora_b, _ = make_lora_inputs(3, 37, 100, 48, 40, seed=22)
    got = softcap_ce.softcap_cross_entropy_lora(x, weight, targets, lora_a, torch.zeros_like(lora_b), 1.8)
    plain = softcap_ce.softcap_cross_entropy(x.flatten(0, 1), weight, targets.reshape(-1)).view(3, 37)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)


def test_lora_16bit_inputs_within_pytorch_error():
    inputs = make_lora_inputs(2, 37, 100, 48, 40, dtype=torch.bfloat16, seed=23)
    got = lora_loss_and_grads(softcap_ce.softcap_cross_entropy_lora, *inputs)
    exact = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs, cast=torch.float64)
    same_dtype = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs)
    for g, e, t in zip(got, exact, same_dtype):
        assert_within_pytorch_error(g, e, t)


def test_lora_bad_shapes_raise_one_clear_error():
    x, weight, targets, lora_a, lora_b, _ = make_lora_inputs(2, 5, 64, 32, 8)
    with pytest.raises(ValueError, match="one adapter per document"):
        softcap_ce.softcap_cross_entropy_lora(x, weight, targets, lora_a[:1], lora_b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b \[B, V, r\]"):
        softcap_ce.softcap_cross_entropy_lora(x, weight, targets, lora_a, lora_b[:, :10], 1.0)
    with pytest.raises(ValueError, match="targets must be"):
        softcap_ce.softcap_cross_entropy_lora(x, weight, targets[:, :4], lora_a, lora_b, 1.0)


def test_lora_public_api_and_opcheck():
    x, weight, targets, lora_a, lora_b, grad_loss = make_lora_inputs(2, 5, 40, 32, 8, seed=24)
    assert kernels._TRITON.softcap_cross_entropy_lora is softcap_ce.softcap_cross_entropy_lora
    with kernels.use_backend("triton"):
        got = kernels.softcap_cross_entropy_lora(x, weight, targets, lora_a, lora_b, 1.8)
    want = reference.softcap_cross_entropy_lora(x.double(), weight.double(), targets, lora_a.double(), lora_b.double(), 1.8)
    assert_close(got, want.float(), torch.float32)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    u = (torch.bmm(x, lora_a.transpose(1, 2)) * 1.8).flatten(0, 1)
    flat_x, flat_t = x.flatten(0, 1), targets.reshape(-1)
    args = (flat_x.requires_grad_(), weight.requires_grad_(), u.requires_grad_(), lora_b.requires_grad_(), flat_t, 30.0)
    torch.library.opcheck(softcap_ce.softcap_ce_lora_fwd_op, args, test_utils=checks)
    lse = softcap_ce.softcap_ce_lora_fwd_op(*(a.detach() if a.is_floating_point() else a for a in args[:5]), 30.0)[1]
    dlogits_args = (flat_x.detach(), weight.detach(), u.detach(), lora_b.detach(), flat_t, lse, grad_loss.reshape(-1),
                    torch.zeros_like(lse), 30.0)
    torch.library.opcheck(softcap_ce.softcap_ce_lora_dlogits_op, dlogits_args, test_utils=checks)


def test_lora_compiles_without_graph_break():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(softcap_ce.softcap_cross_entropy_lora, fullgraph=True, backend=counter)
    inputs = make_lora_inputs(2, 9, 40, 32, 8, seed=25)
    got = lora_loss_and_grads(compiled, *inputs)
    want = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs, cast=torch.float64)
    for g, w in zip(got, want):
        assert_close(g, w.float(), torch.float32)
    assert counter.frame_count == 1


@pytest.mark.parametrize("x_bytes", sorted(softcap_ce.GPU_CONFIGS))
def test_lora_with_each_gpu_config(monkeypatch, x_bytes):
    """The GPU's tiles (128 x 128 x BLOCK_D) on T = 130 rows a document, V = 140, d = 80 and the
    record's r = 80: ragged in every loop, in the interpreter on fp32 operands."""
    config = softcap_ce.GPU_CONFIGS[x_bytes]
    monkeypatch.setattr(softcap_ce, "_config", lambda x: dict(config, INPUT_PRECISION=dot_precision(x.dtype)))
    dtype = torch.float32 if x_bytes == 4 or not HAS_GPU else CONFIG_TEST_DTYPE
    inputs = make_lora_inputs(2, 130, 140, 80, 80, dtype=dtype, seed=26)
    if dtype == torch.float32:
        check_lora_against_fp64_reference(*inputs)
        return
    got = lora_loss_and_grads(softcap_ce.softcap_cross_entropy_lora, *inputs)
    exact = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs, cast=torch.float64)
    same_dtype = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs)
    for g, e, t in zip(got, exact, same_dtype):
        assert_within_pytorch_error(g, e, t)


@pytest.mark.gpu
def test_lora_bf16_record_size_within_pytorch_error():
    """The record's TTT head: 16 documents of 2048 rows, V = 8192, d = 512, r = 80, bf16."""
    inputs = make_lora_inputs(16, 2048, 8192, 512, 80, dtype=torch.bfloat16, seed=27)
    got = lora_loss_and_grads(softcap_ce.softcap_cross_entropy_lora, *inputs)
    exact = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs, cast=torch.float64)
    same_dtype = lora_loss_and_grads(reference.softcap_cross_entropy_lora, *inputs)
    for g, e, t in zip(got, exact, same_dtype):
        assert torch.isfinite(g).all()
        assert_within_pytorch_error(g, e, t)
