"""Soft-capped cross-entropy over the tied head, without the [N, V] fp32 logits.

    logits = softcap * tanh((x @ weight^T) / softcap)      x [N, d], weight [V, d]
    loss   = logsumexp(logits) - logits[target]              [N] fp32

Forward (`golf::softcap_ce_fwd`, softcap_ce_fwd_op): one Triton kernel, grid over row blocks of N; each program
loops over V in tiles, computes the tile's logits with tl.dot (fp32 accumulation over d), caps
them, and keeps an online logsumexp and the target's capped logit. It writes loss [N] and the
logsumexp lse [N] (fp32, saved for the backward). Memory: 8 bytes per token.

Backward: the gradient of the raw logits is
    d_raw = (softmax * (g_loss + g_lse) - onehot(target) * g_loss) * (1 - tanh^2)
and only needs the saved lse, so `golf::softcap_ce_dlogits` (softcap_ce_dlogits_op) recomputes the capped logits of a
[chunk, V] block (grid over row blocks x V tiles, every tile independent) and writes d_raw in
x's dtype. Then cuBLAS does the two products per chunk:
    grad_x[chunk] = d_raw @ weight           grad_weight += d_raw^T @ x[chunk]  (fp32 sum)
The only [*, V] buffer is one chunk of d_raw, at most BACKWARD_CHUNK_BYTES (32 MiB: 16,384
rows at V = 1024 in bf16), instead of the eager reference's several [N, V] fp32 tensors.
FLOPs: forward 2NVd; backward 2NVd (recompute) + 4NVd (the two products).

Targets: like F.cross_entropy, a target of -100 (ignore_index) gives loss 0 and no gradient.
Any other target outside [0, V) is the caller's responsibility: checking it would need a
device sync, so on CUDA the kernel instead writes NaN for that token's loss (and NaN into its
gradient) so the mistake cannot pass silently; on CPU tensors the public function raises.
"""
import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._launch import INTERPRET, new_output, register_cpu_and_fake, wrap_triton
from kernels._numerics import LOG2E, _dot, dot_precision  # _dot: also right on bf16 in the interpreter

IGNORE_INDEX = tl.constexpr(reference.IGNORE_INDEX)  # the kernels' copy: a target with loss 0 and no gradient

# Upper bound on the bytes of one [chunk, V] block of d_raw in the backward; tests lower it to
# exercise several (ragged) chunks.
BACKWARD_CHUNK_BYTES = 32 * 1024 * 1024

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _capped_logits_tile(
    x_ptr, w_ptr, rows, cols, N, V, D, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Capped logits [BLOCK_N, BLOCK_V] (fp32) of rows x cols and 1 - tanh^2 of the same tile."""
    row_mask = rows < N
    col_mask = cols < V
    raw = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_D)):
        dk = k * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = dk < D
        x_tile = tl.load(x_ptr + rows[:, None] * D + dk[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptr + cols[:, None] * D + dk[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        # The weight is cast to x's dtype for the product, as the reference does.
        raw = _dot(x_tile, tl.trans(w_tile.to(x_tile.dtype)), raw, INPUT_PRECISION)
    # tanh from one exp of a non-positive argument (no overflow): e = exp(-2|z|) in (0, 1],
    # |tanh z| = (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2, the latter without the
    # cancellation of 1 - t*t when the cap saturates.
    z = raw / softcap
    e = tl.exp2(tl.abs(z) * (-2.0 * LOG2E))  # exp(-2|z|); the interpreter needs the tensor first
    tanh_abs = (1.0 - e) / (1.0 + e)
    capped = softcap * tl.where(z < 0, -tanh_abs, tanh_abs)
    one_plus_e = 1.0 + e
    sech2 = 4.0 * e / (one_plus_e * one_plus_e)
    return capped, sech2


@triton.jit
def _softcap_ce_fwd_kernel(
    x_ptr,  # [N, D] x dtype
    w_ptr,  # [V, D] weight dtype
    targets_ptr,  # [N] int
    loss_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    N, V, D, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    cap = tl.cast(softcap, tl.float32)  # a Python float may arrive as fp64 under Inductor

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v in range(0, tl.cdiv(V, BLOCK_V)):
        cols = v * BLOCK_V + tl.arange(0, BLOCK_V)
        capped, _ = _capped_logits_tile(
            x_ptr, w_ptr, rows, cols, N, V, D, cap, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION
        )
        capped = tl.where((cols < V)[None, :], capped, float("-inf"))
        # Every tile holds at least one column < V, so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(capped, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(capped - new_max[:, None]), axis=1)
        running_max = new_max
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, capped, 0.0), axis=1)

    lse = running_max + tl.log(running_sum)
    valid = (targets >= 0) & (targets < V)
    ignored = targets == IGNORE_INDEX
    loss = tl.where(valid, lse - target_logit, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _softcap_ce_dlogits_kernel(
    x_ptr,  # [N, D] x dtype
    w_ptr,  # [V, D] weight dtype
    targets_ptr,  # [N] int
    lse_ptr,  # [N] fp32
    grad_loss_ptr,  # [N] fp32
    grad_lse_ptr,  # [N] fp32
    draw_ptr,  # [N, V] x dtype out: gradient of the raw (uncapped) logits
    N, V, D, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    cap = tl.cast(softcap, tl.float32)

    capped, sech2 = _capped_logits_tile(
        x_ptr, w_ptr, rows, cols, N, V, D, cap, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION
    )
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_loss = tl.load(grad_loss_ptr + rows, mask=row_mask, other=0.0)
    grad_lse = tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0)
    # Same target rules as the forward: ignored rows have a constant loss, invalid ones NaN.
    valid = (targets >= 0) & (targets < V)
    grad_loss = tl.where(valid, grad_loss, float("nan"))
    grad_loss = tl.where(targets == IGNORE_INDEX, 0.0, grad_loss)

    softmax = tl.exp(capped - lse[:, None])
    is_target = cols[None, :] == targets[:, None]
    d_capped = softmax * (grad_loss + grad_lse)[:, None] - tl.where(is_target, grad_loss[:, None], 0.0)
    d_raw = d_capped * sech2
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(draw_ptr + rows[:, None] * V + cols[None, :], d_raw.to(draw_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch wrappers


# The GPU's tiles by x's element size: 3 stages of 128 x BLOCK_D tiles of x and weight, 96 KiB of
# shared memory in either dtype.
GPU_CONFIGS = {
    2: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    4: dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
}


def _config(x: torch.Tensor) -> dict:
    """Block sizes and dot precision. Small blocks in the interpreter, so that the small test
    shapes are ragged in N, V and d at once; H100-sized tiles otherwise."""
    precision = dot_precision(x.dtype)
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, INPUT_PRECISION=precision)
    return dict(GPU_CONFIGS[x.element_size()], INPUT_PRECISION=precision)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, where: str) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{where}: x must be [N, d] and weight [V, d] with the same d, got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}; flatten the batch and time dims of x first."
        )
    if targets.shape != (x.shape[0],):
        raise ValueError(
            f"{where}: targets must be an integer tensor of shape [N] = ({x.shape[0]},), got "
            f"{targets.dtype} {tuple(targets.shape)}; pass token ids flattened like x."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(
            f"{where}: targets must be an integer tensor of shape [N] = ({x.shape[0]},), got "
            f"{targets.dtype} {tuple(targets.shape)}; pass token ids flattened like x."
        )
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{where}: x and weight must be fp32, bf16 or fp16, got {x.dtype} and {weight.dtype}; "
            f"use kernels.reference.softcap_cross_entropy for other dtypes."
        )


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("golf::softcap_ce_fwd", mutates_args=())
def softcap_ce_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d], weight [V, d], targets [N] -> (loss [N] fp32, lse [N] fp32)."""
    _check_inputs(x, weight, targets, "golf::softcap_ce_fwd")
    x, weight, targets = x.contiguous(), weight.contiguous(), targets.contiguous()
    N, D = x.shape
    V = weight.shape[0]
    loss = new_output((N,), torch.float32, x.device)
    lse = new_output((N,), torch.float32, x.device)
    if N == 0:
        return loss, lse
    config = _config(x)
    grid = (triton.cdiv(N, config["BLOCK_N"]),)
    wrap_triton(_softcap_ce_fwd_kernel)[grid](
        x, weight, targets, loss, lse, N, V, D, softcap, **config
    )
    return loss, lse


@torch.library.triton_op("golf::softcap_ce_dlogits", mutates_args=())
def softcap_ce_dlogits_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor,
    softcap: float,
) -> torch.Tensor:
    """Gradient [N, V] (x's dtype) of the raw logits x @ weight^T, given lse and the incoming
    gradients of loss and lse (all [N] fp32). Called on one chunk of rows at a time."""
    _check_inputs(x, weight, targets, "golf::softcap_ce_dlogits")
    x, weight, targets = x.contiguous(), weight.contiguous(), targets.contiguous()
    lse, grad_loss, grad_lse = lse.contiguous(), grad_loss.contiguous(), grad_lse.contiguous()
    N, D = x.shape
    V = weight.shape[0]
    d_raw = new_output((N, V), x.dtype, x.device)
    if N == 0:
        return d_raw
    config = _config(x)
    grid = (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(V, config["BLOCK_V"]))
    wrap_triton(_softcap_ce_dlogits_kernel)[grid](
        x, weight, targets, lse, grad_loss, grad_lse, d_raw, N, V, D, softcap, **config
    )
    return d_raw


# --------------------------------------------------------------------------- CPU fallbacks and fakes
# Used for CPU tensors when Triton's interpreter is off (see _launch.register_cpu_and_fake).


def _capped_logits_eager(x, weight, softcap):
    logits = (x @ weight.to(x.dtype).T).to(torch.promote_types(x.dtype, torch.float32))
    return softcap * torch.tanh(logits / softcap)


def softcap_ce_fwd_eager(x, weight, targets, softcap):
    loss = reference.softcap_cross_entropy(x, weight, targets, softcap).float()
    lse = torch.logsumexp(_capped_logits_eager(x, weight, softcap), dim=-1).float()
    return loss, lse


def softcap_ce_dlogits_eager(x, weight, targets, lse, grad_loss, grad_lse, softcap):
    capped = _capped_logits_eager(x, weight, softcap)  # [N, V]
    targets = targets.long()
    ignored = targets == reference.IGNORE_INDEX
    grad_loss = grad_loss.masked_fill(ignored, 0.0)
    softmax = torch.exp(capped - lse[:, None])
    d_capped = softmax * (grad_loss + grad_lse)[:, None]
    d_capped[~ignored, targets[~ignored]] -= grad_loss[~ignored]
    return (d_capped * (1 - (capped / softcap) ** 2)).to(x.dtype)


def _softcap_ce_fwd_fake(x, weight, targets, softcap):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


def _softcap_ce_dlogits_fake(x, weight, targets, lse, grad_loss, grad_lse, softcap):
    return x.new_empty((x.shape[0], weight.shape[0]))


register_cpu_and_fake(softcap_ce_fwd_op, reference=softcap_ce_fwd_eager, fake=_softcap_ce_fwd_fake)
register_cpu_and_fake(softcap_ce_dlogits_op, reference=softcap_ce_dlogits_eager, fake=_softcap_ce_dlogits_fake)


# --------------------------------------------------------------------------- autograd


def _softcap_ce_fwd_setup_context(ctx, inputs, output):
    x, weight, targets, softcap = inputs
    _loss, lse = output
    ctx.save_for_backward(x, weight, targets, lse)
    ctx.softcap = softcap


def _softcap_ce_fwd_backward(ctx, grad_loss, grad_lse):
    x, weight, targets, lse = ctx.saved_tensors
    needs_grad_x, needs_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    N, V = x.shape[0], weight.shape[0]
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.float()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    weight_x = weight.to(x.dtype)  # the forward's product ran in x's dtype
    chunk = max(1, BACKWARD_CHUNK_BYTES // max(1, V * x.element_size()))

    grad_x_chunks = []
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        d_raw = softcap_ce_dlogits_op(
            x[rows], weight, targets[rows], lse[rows], grad_loss[rows], grad_lse[rows], ctx.softcap
        )  # [chunk, V]
        if needs_grad_x:
            grad_x_chunks.append(d_raw @ weight_x)  # [chunk, d]
        if needs_grad_weight:
            grad_weight = grad_weight + (d_raw.T @ x[rows]).float()  # [V, d]
    grad_x = None
    if needs_grad_x:
        if N == 0:
            grad_x = torch.zeros_like(x)
        else:
            grad_x = grad_x_chunks[0] if len(grad_x_chunks) == 1 else torch.cat(grad_x_chunks)
    return grad_x, grad_weight.to(weight.dtype) if needs_grad_weight else None, None, None


softcap_ce_fwd_op.register_autograd(_softcap_ce_fwd_backward, setup_context=_softcap_ce_fwd_setup_context)


# --------------------------------------------------------------------------- public API


def softcap_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 30.0
) -> torch.Tensor:
    """Per-token fp32 NLL of the soft-capped tied head: x [N, d], weight [V, d], targets [N] -> [N].

    Same semantics as kernels.reference.softcap_cross_entropy (target -100 is ignored).
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Free on the CPU; on CUDA it would cost a sync per step, so there the kernel writes NaN.
        V = weight.shape[0]
        bad = (targets != reference.IGNORE_INDEX) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            raise ValueError(
                f"softcap_cross_entropy: targets must lie in [0, {V}) or be {reference.IGNORE_INDEX} (ignored), "
                f"got {targets[bad][0].item()}; check the token ids against the vocabulary size."
            )
    loss, _lse = softcap_ce_fwd_op(x, weight, targets, float(softcap))
    return loss


TRITON_IMPLS = {"softcap_cross_entropy": softcap_cross_entropy}
