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

With a per-document LoRA on the logits (the phased TTT's lm_head adapter, FRONTIER.md section 5):
    logits = softcap * tanh((x @ weight^T + u_b @ lora_b[b]^T) / softcap),  u = (x @ lora_a[b]^T) * scale
for x [B, T, d], lora_a [B, r, d], lora_b [B, V, r] (`softcap_cross_entropy_lora`). u [B, T, r] is a
torch.bmm (cheap: r = 80); `golf::softcap_ce_lora_fwd` and `golf::softcap_ce_lora_dlogits` are the
kernels above on a grid of (row blocks, documents), each tile's raw logits summing both products
in one fp32 accumulator, so the [B, T, V] logits of a batch are never stored. The backward adds
grad_u = d_raw @ lora_b[b] and grad_lora_b = d_raw^T @ u_b (per document, torch.bmm) and chunks by
whole documents. Extra FLOPs: 2NVr forward, 2NVr recompute + 4NVr products backward.

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
def _accumulate_products(
    a_ptr, b_ptr, rows, row_mask, cols, col_mask, K, acc, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc + A[rows] @ B[cols]^T over K, for row-major [*, K] operands; B is cast to A's dtype for the
    product, as the reference casts the weight to x's."""
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        dk = k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = dk < K
        a_tile = tl.load(a_ptr + rows[:, None] * K + dk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_tile = tl.load(b_ptr + cols[:, None] * K + dk[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(a_tile, tl.trans(b_tile.to(a_tile.dtype)), acc, INPUT_PRECISION)
    return acc


@triton.jit
def _capped_logits_tile(
    x_ptr, w_ptr, rows, cols, N, V, D, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Capped logits [BLOCK_N, BLOCK_V] (fp32) of rows x cols and 1 - tanh^2 of the same tile."""
    raw = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    raw = _accumulate_products(x_ptr, w_ptr, rows, rows < N, cols, cols < V, D, raw, BLOCK_D, INPUT_PRECISION)
    return _soft_cap(raw, softcap)


@triton.jit
def _lora_capped_logits_tile(
    x_ptr, w_ptr, u_ptr, lb_ptr, rows, row_mask, cols, V, D, R, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """_capped_logits_tile plus one document's LoRA: raw = x W^T + u B^T, both products in one fp32
    accumulator; u [rows, R] (x's dtype, scale included), lb_ptr at the document's B [V, R]."""
    col_mask = cols < V
    raw = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    raw = _accumulate_products(x_ptr, w_ptr, rows, row_mask, cols, col_mask, D, raw, BLOCK_D, INPUT_PRECISION)
    raw = _accumulate_products(u_ptr, lb_ptr, rows, row_mask, cols, col_mask, R, raw, BLOCK_D, INPUT_PRECISION)
    return _soft_cap(raw, softcap)


@triton.jit
def _soft_cap(raw, softcap):
    """softcap * tanh(raw / softcap) and 1 - tanh^2 of it (fp32 tiles)."""
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
        running_max, running_sum, target_logit = _online_lse_update(
            capped, cols, targets, V, running_max, running_sum, target_logit
        )

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
    d_raw = _dlogits_from_tile(capped, sech2, rows, row_mask, cols, V, targets_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr)
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(draw_ptr + rows[:, None] * V + cols[None, :], d_raw.to(draw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online_lse_update(capped, cols, targets, V, running_max, running_sum, target_logit):
    """One V tile of the forward's online logsumexp and target pick (fp32)."""
    capped = tl.where((cols < V)[None, :], capped, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(capped, axis=1))  # every tile holds a column < V: finite
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(capped - new_max[:, None]), axis=1)
    is_target = cols[None, :] == targets[:, None]
    target_logit += tl.sum(tl.where(is_target, capped, 0.0), axis=1)
    return new_max, running_sum, target_logit


@triton.jit
def _softcap_ce_lora_fwd_kernel(
    x_ptr,  # [B*T, D] x dtype
    w_ptr,  # [V, D] weight dtype
    u_ptr,  # [B*T, R] x dtype: (x A^T) scale
    lb_ptr,  # [B, V, R] LoRA B
    targets_ptr,  # [B*T] int
    loss_ptr,  # [B*T] fp32 out
    lse_ptr,  # [B*T] fp32 out
    T, V, D, R, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grid (row blocks of one document, documents): a block never mixes two documents' B
    doc = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = t < T
    rows = doc * T + t
    lb_doc = lb_ptr + doc.to(tl.int64) * V * R
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    cap = tl.cast(softcap, tl.float32)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v in range(0, tl.cdiv(V, BLOCK_V)):
        cols = v * BLOCK_V + tl.arange(0, BLOCK_V)
        capped, _ = _lora_capped_logits_tile(
            x_ptr, w_ptr, u_ptr, lb_doc, rows, row_mask, cols, V, D, R, cap, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION
        )
        running_max, running_sum, target_logit = _online_lse_update(
            capped, cols, targets, V, running_max, running_sum, target_logit
        )

    lse = running_max + tl.log(running_sum)
    valid = (targets >= 0) & (targets < V)
    loss = tl.where(valid, lse - target_logit, float("nan"))
    loss = tl.where(targets == IGNORE_INDEX, 0.0, loss)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _softcap_ce_lora_dlogits_kernel(
    x_ptr, w_ptr, u_ptr, lb_ptr, targets_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr,
    draw_ptr,  # [B*T, V] x dtype out: gradient of the raw logits x W^T + u B^T
    T, V, D, R, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    doc = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = t < T
    rows = doc * T + t
    cap = tl.cast(softcap, tl.float32)

    capped, sech2 = _lora_capped_logits_tile(
        x_ptr, w_ptr, u_ptr, lb_ptr + doc.to(tl.int64) * V * R, rows, row_mask, cols, V, D, R, cap,
        BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION,
    )
    d_raw = _dlogits_from_tile(capped, sech2, rows, row_mask, cols, V, targets_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr)
    mask = row_mask[:, None] & (cols < V)[None, :]
    tl.store(draw_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], d_raw.to(draw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dlogits_from_tile(capped, sech2, rows, row_mask, cols, V, targets_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr):
    """d_raw = (softmax (g_loss + g_lse) - onehot(target) g_loss) (1 - tanh^2) of one tile (fp32)."""
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
    return d_capped * sech2


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


def _check_lora_inputs(x, weight, u, lora_b, targets, where: str) -> None:
    _check_inputs(x, weight, targets, where)
    docs = lora_b.shape[0] if lora_b.dim() == 3 else 0
    if (lora_b.dim() != 3 or u.dim() != 2 or u.shape != (x.shape[0], lora_b.shape[2]) or lora_b.shape[1] != weight.shape[0]
            or docs == 0 or x.shape[0] % docs):
        raise ValueError(
            f"{where}: u must be [B*T, r] and lora_b [B, V, r] with V = weight's {weight.shape[0]} rows and B dividing "
            f"x's {x.shape[0]} rows (documents of equal length), got u {tuple(u.shape)} and lora_b {tuple(lora_b.shape)}."
        )
    if u.dtype != x.dtype or lora_b.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{where}: u must have x's dtype {x.dtype} and lora_b be fp32, bf16 or fp16, got {u.dtype} "
                        f"and {lora_b.dtype}.")


def _lora_launch_shape(x, lora_b):
    docs, V, R = lora_b.shape
    return docs, x.shape[0] // docs, V, x.shape[1], R


@torch.library.triton_op("golf::softcap_ce_lora_fwd", mutates_args=())
def softcap_ce_lora_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, targets: torch.Tensor, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B*T, d], weight [V, d], u [B*T, r], lora_b [B, V, r], targets [B*T] -> (loss, lse) [B*T] fp32,
    the logits of row b*T + t being x W^T + u lora_b[b]^T."""
    _check_lora_inputs(x, weight, u, lora_b, targets, "golf::softcap_ce_lora_fwd")
    x, weight, u, lora_b, targets = (t.contiguous() for t in (x, weight, u, lora_b, targets))
    docs, T, V, D, R = _lora_launch_shape(x, lora_b)
    loss = new_output((x.shape[0],), torch.float32, x.device)
    lse = new_output((x.shape[0],), torch.float32, x.device)
    if T == 0:
        return loss, lse
    config = _config(x)
    grid = (triton.cdiv(T, config["BLOCK_N"]), docs)
    wrap_triton(_softcap_ce_lora_fwd_kernel)[grid](x, weight, u, lora_b, targets, loss, lse, T, V, D, R, softcap, **config)
    return loss, lse


@torch.library.triton_op("golf::softcap_ce_lora_dlogits", mutates_args=())
def softcap_ce_lora_dlogits_op(
    x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor, targets: torch.Tensor,
    lse: torch.Tensor, grad_loss: torch.Tensor, grad_lse: torch.Tensor, softcap: float,
) -> torch.Tensor:
    """Gradient [B*T, V] (x's dtype) of the raw logits x W^T + u lora_b[b]^T; called on whole documents."""
    _check_lora_inputs(x, weight, u, lora_b, targets, "golf::softcap_ce_lora_dlogits")
    x, weight, u, lora_b, targets = (t.contiguous() for t in (x, weight, u, lora_b, targets))
    lse, grad_loss, grad_lse = lse.contiguous(), grad_loss.contiguous(), grad_lse.contiguous()
    docs, T, V, D, R = _lora_launch_shape(x, lora_b)
    d_raw = new_output((x.shape[0], V), x.dtype, x.device)
    if T == 0:
        return d_raw
    config = _config(x)
    grid = (triton.cdiv(T, config["BLOCK_N"]), triton.cdiv(V, config["BLOCK_V"]), docs)
    wrap_triton(_softcap_ce_lora_dlogits_kernel)[grid](
        x, weight, u, lora_b, targets, lse, grad_loss, grad_lse, d_raw, T, V, D, R, softcap, **config
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
    return _dlogits_eager(capped, targets, lse, grad_loss, grad_lse, softcap).to(x.dtype)


def _softcap_ce_fwd_fake(x, weight, targets, softcap):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


def _softcap_ce_dlogits_fake(x, weight, targets, lse, grad_loss, grad_lse, softcap):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _lora_capped_logits_eager(x, weight, u, lora_b, softcap):
    docs = lora_b.shape[0]
    raw = (x @ weight.to(x.dtype).T).view(docs, -1, weight.shape[0]) + torch.bmm(
        u.view(docs, -1, u.shape[1]), lora_b.to(x.dtype).transpose(1, 2))
    raw = raw.reshape(x.shape[0], -1).to(torch.promote_types(x.dtype, torch.float32))
    return softcap * torch.tanh(raw / softcap)


def softcap_ce_lora_fwd_eager(x, weight, u, lora_b, targets, softcap):
    capped = _lora_capped_logits_eager(x, weight, u, lora_b, softcap)
    loss = torch.nn.functional.cross_entropy(capped, targets.long(), reduction="none", ignore_index=reference.IGNORE_INDEX)
    return loss.float(), torch.logsumexp(capped, dim=-1).float()


def softcap_ce_lora_dlogits_eager(x, weight, u, lora_b, targets, lse, grad_loss, grad_lse, softcap):
    capped = _lora_capped_logits_eager(x, weight, u, lora_b, softcap)
    return _dlogits_eager(capped, targets, lse, grad_loss, grad_lse, softcap).to(x.dtype)


def _dlogits_eager(capped, targets, lse, grad_loss, grad_lse, softcap):
    targets = targets.long()
    ignored = targets == reference.IGNORE_INDEX
    grad_loss = grad_loss.masked_fill(ignored, 0.0)
    d_capped = torch.exp(capped - lse[:, None]) * (grad_loss + grad_lse)[:, None]
    d_capped[~ignored, targets[~ignored]] -= grad_loss[~ignored]
    return d_capped * (1 - (capped / softcap) ** 2)


def _softcap_ce_lora_fwd_fake(x, weight, u, lora_b, targets, softcap):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


def _softcap_ce_lora_dlogits_fake(x, weight, u, lora_b, targets, lse, grad_loss, grad_lse, softcap):
    return x.new_empty((x.shape[0], weight.shape[0]))


register_cpu_and_fake(softcap_ce_fwd_op, reference=softcap_ce_fwd_eager, fake=_softcap_ce_fwd_fake)
register_cpu_and_fake(softcap_ce_dlogits_op, reference=softcap_ce_dlogits_eager, fake=_softcap_ce_dlogits_fake)
register_cpu_and_fake(softcap_ce_lora_fwd_op, reference=softcap_ce_lora_fwd_eager, fake=_softcap_ce_lora_fwd_fake)
register_cpu_and_fake(softcap_ce_lora_dlogits_op, reference=softcap_ce_lora_dlogits_eager, fake=_softcap_ce_lora_dlogits_fake)


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


def _softcap_ce_lora_fwd_setup_context(ctx, inputs, output):
    x, weight, u, lora_b, targets, softcap = inputs
    _loss, lse = output
    ctx.save_for_backward(x, weight, u, lora_b, targets, lse)
    ctx.softcap = softcap


def _softcap_ce_lora_fwd_backward(ctx, grad_loss, grad_lse):
    """Per chunk of whole documents (at most BACKWARD_CHUNK_BYTES of d_raw): grad_x = d_raw W,
    grad_W += d_raw^T x, and per document grad_u = d_raw B, grad_B = d_raw^T u (fp32 sums)."""
    x, weight, u, lora_b, targets, lse = ctx.saved_tensors
    docs, T, V, D, R = _lora_launch_shape(x, lora_b)
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.float()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    weight_x, lora_b_x = weight.to(x.dtype), lora_b.to(x.dtype)
    per_chunk = max(1, BACKWARD_CHUNK_BYTES // max(1, T * V * x.element_size()))
    needs = ctx.needs_input_grad
    grad_x, grad_u, grad_b = [], [], []
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for first in range(0, docs, per_chunk):
        chunk = slice(first, min(first + per_chunk, docs))
        rows = slice(chunk.start * T, chunk.stop * T)
        d_raw = softcap_ce_lora_dlogits_op(x[rows], weight, u[rows], lora_b[chunk], targets[rows], lse[rows],
                                           grad_loss[rows], grad_lse[rows], ctx.softcap)  # [n T, V]
        d_doc = d_raw.view(-1, T, V)
        if needs[0]:
            grad_x.append(d_raw @ weight_x)
        if needs[1]:  # not in the TTT, whose model weights are frozen
            grad_weight = grad_weight + (d_raw.T @ x[rows]).float()
        if needs[2]:
            grad_u.append(torch.bmm(d_doc, lora_b_x[chunk]).reshape(-1, R))
        if needs[3]:
            grad_b.append(torch.bmm(d_doc.transpose(1, 2), u[rows].view(-1, T, R)).float())
    cat = lambda parts, like: torch.cat(parts) if parts else torch.zeros_like(like)  # noqa: E731
    return (cat(grad_x, x) if needs[0] else None, grad_weight.to(weight.dtype) if needs[1] else None,
            cat(grad_u, u) if needs[2] else None, cat(grad_b, lora_b).to(lora_b.dtype) if needs[3] else None, None, None)


softcap_ce_lora_fwd_op.register_autograd(_softcap_ce_lora_fwd_backward, setup_context=_softcap_ce_lora_fwd_setup_context)


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


def softcap_cross_entropy_lora(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, softcap: float = 30.0,
) -> torch.Tensor:
    """Per-token fp32 NLL [B, T] of the soft-capped tied head with a per-document LoRA on the logits:
    x [B, T, d], weight [V, d], targets [B, T], lora_a [B, r, d], lora_b [B, V, r]. u = (x A^T) scale
    is a batched matmul in torch (autograd reaches x and A through it); the kernel adds u B^T to
    x W^T tile by tile, so the [B, T, V] logits are never stored. Same semantics as
    kernels.reference.softcap_cross_entropy_lora."""
    if x.dim() != 3 or lora_a.dim() != 3 or lora_a.shape[0] != x.shape[0] or lora_a.shape[2] != x.shape[2]:
        raise ValueError(f"softcap_cross_entropy_lora: x must be [B, T, d] and lora_a [B, r, d], got x {tuple(x.shape)} "
                         f"and lora_a {tuple(lora_a.shape)}; one adapter per document (row of x).")
    if targets.shape != x.shape[:2]:
        raise ValueError(f"softcap_cross_entropy_lora: targets must be [B, T] = {tuple(x.shape[:2])}, "
                         f"got {tuple(targets.shape)}.")
    u = (torch.bmm(x, lora_a.to(x.dtype).transpose(1, 2)) * scale).to(x.dtype)  # [B, T, r]
    loss, _lse = softcap_ce_lora_fwd_op(x.flatten(0, 1), weight, u.flatten(0, 1), lora_b, targets.reshape(-1),
                                        float(softcap))
    return loss.view(targets.shape)


TRITON_IMPLS = {"softcap_cross_entropy": softcap_cross_entropy, "softcap_cross_entropy_lora": softcap_cross_entropy_lora}
