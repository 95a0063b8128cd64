"""Newton-Schulz orthogonalisation for Muon: batched Triton kernels that exploit symmetry.

One step of the iteration on X [batch, m, n] (wide orientation, m <= n) is

    A = X X^T            (symmetric: only tiles on/above the diagonal are computed, then mirrored)
    B = b A + c A A      (A A = A A^T is symmetric too, so the same kernel computes it, fused with b A)
    X = a X + B X        (a plain matmul with the a X term fused into the epilogue)

Per matrix, one step costs m^2 n (A, about half of the 2 m^2 n a full product would) + m^3 (B, half
of 2 m^3) + 2 m^2 n (X) = 3 m^2 n + m^3 flops, against 4 m^2 n + 2 m^3 for the dense products
(the figure bench/newton_schulz.py counts). Operands are in compute_dtype (bf16 in training), accumulation in
fp32, and A, B, X are stored in compute_dtype between kernels, as the eager reference does.

Before the loop, two small kernels normalise each matrix by its Frobenius norm (deterministic
two-pass reduction, no atomics) and turn tall matrices wide; the last step writes its result
straight into the caller's orientation. There is no gradient: it is an optimiser step.

Public: `newton_schulz(G, steps, coeffs, compute_dtype)`, the same contract as
kernels.reference.newton_schulz. The three kernels are also exposed one by one (`gram`,
`gram_poly`, `ns_update`) for bench/newton_schulz.py's kernel table.
"""
import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._launch import INTERPRET, launch_directly, new_output, num_sms, register_cpu_and_fake, wrap_triton
from kernels._numerics import _dot, dot_precision  # _dot: also right on bf16 in the interpreter

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NORM_EPS = reference.NS_NORM_EPS  # X / (||X||_F + eps); a kernel argument, not a constexpr

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _sumsq_partials_kernel(
    g_ptr, partial_ptr, numel, num_chunks,
    COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
):
    # g [batch, numel] contiguous; partial [batch, num_chunks] fp32. One program per (matrix, chunk)
    # of BLOCK * CHUNK_BLOCKS elements, so a big matrix is summed by many programs and the final
    # sum (done by the scale kernel) is in a fixed order: deterministic, no atomics.
    matrix = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = g_ptr + matrix * numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(CHUNK_BLOCKS):
        offs = (chunk * CHUNK_BLOCKS + i) * BLOCK + tl.arange(0, BLOCK)
        # round to compute_dtype first: the reference takes the norm of G.to(compute_dtype)
        g = tl.load(base + offs, mask=offs < numel, other=0.0).to(COMPUTE_DTYPE).to(tl.float32)
        acc += g * g
    tl.store(partial_ptr + matrix * num_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _normalise_kernel(
    g_ptr, partial_ptr, out_ptr, rows, cols, num_chunks,
    g_stride_r, g_stride_c, out_stride_r, out_stride_c, eps,
    CHUNKS_POW2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[r, c] = g[r, c] / (||g||_F + eps) in out's dtype, for the wide view [rows, cols] of g
    # (tall inputs come in through swapped strides, so this is also where they become wide).
    matrix = tl.program_id(0).to(tl.int64)
    row_tile = tl.program_id(1)
    eps = tl.cast(eps, tl.float32)
    chunk_offs = tl.arange(0, CHUNKS_POW2)
    partials = tl.load(partial_ptr + matrix * num_chunks + chunk_offs, mask=chunk_offs < num_chunks, other=0.0)
    # the reference's norm is a compute_dtype tensor: round it the same way
    norm = tl.sqrt(tl.sum(partials, axis=0)).to(out_ptr.dtype.element_ty).to(tl.float32)
    denom = norm + eps

    g_base = g_ptr + matrix * rows * cols
    out_base = out_ptr + matrix * rows * cols
    offs_r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    for c0 in range(tl.cdiv(cols, BLOCK_C)):
        offs_c = c0 * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
        g = tl.load(g_base + offs_r[:, None] * g_stride_r + offs_c[None, :] * g_stride_c, mask=mask, other=0.0)
        g = g.to(out_ptr.dtype.element_ty).to(tl.float32)
        x = (g / denom).to(out_ptr.dtype.element_ty)
        tl.store(out_base + offs_r[:, None] * out_stride_r + offs_c[None, :] * out_stride_c, x, mask=mask)


@triton.jit
def _sym_gram_kernel(
    x_ptr, c_ptr, out_ptr, rows, inner, alpha, beta,
    HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # out = alpha * X X^T (+ beta * C), X [batch, rows, inner], C and out [batch, rows, rows], all
    # contiguous; C must be symmetric (it is A when computing B = b A + c A A, since A A = A A^T).
    # Grid (batch, T (T + 1) / 2) with T = cdiv(rows, BLOCK): one program per tile on/above the
    # diagonal; it writes its tile (i, j) and the mirror (j, i) from the same registers.
    matrix = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1)
    # pair = tj (tj + 1) / 2 + ti with ti <= tj; invert the triangular number, then fix the float
    # sqrt's possible off-by-one in either direction.
    tj = ((tl.sqrt((8 * pair + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pair, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pair, tj + 1, tj)
    ti = pair - tj * (tj + 1) // 2

    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + matrix * rows * inner
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(tl.cdiv(inner, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        k_ok = kk[None, :] < inner
        xi = tl.load(x_base + offs_i[:, None] * inner + kk[None, :], mask=(offs_i[:, None] < rows) & k_ok, other=0.0)
        xj = tl.load(x_base + offs_j[:, None] * inner + kk[None, :], mask=(offs_j[:, None] < rows) & k_ok, other=0.0)
        acc = _dot(xi, tl.trans(xj), acc, DOT_PRECISION)
    if ti == tj:
        # a diagonal tile is symmetric in exact arithmetic only; make it exactly so, so that A is
        # bitwise symmetric (its mirrored halves already are by construction)
        acc = (acc + tl.trans(acc)) * 0.5
    acc = acc * tl.cast(alpha, tl.float32)

    mask_ij = (offs_i[:, None] < rows) & (offs_j[None, :] < rows)
    out_base = out_ptr + matrix * rows * rows
    if HAS_C:
        c_base = c_ptr + matrix * rows * rows
        c = tl.load(c_base + offs_i[:, None] * rows + offs_j[None, :], mask=mask_ij, other=0.0)
        acc += tl.cast(beta, tl.float32) * c.to(tl.float32)
    tile = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_base + offs_i[:, None] * rows + offs_j[None, :], tile, mask=mask_ij)
    if ti != tj:
        mask_ji = (offs_j[:, None] < rows) & (offs_i[None, :] < rows)
        tl.store(out_base + offs_j[:, None] * rows + offs_i[None, :], tl.trans(tile), mask=mask_ji)


@triton.jit
def _ns_update_kernel(
    b_ptr, x_ptr, out_ptr, rows, cols, a, out_stride_r, out_stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # out = a X + B X; B [batch, rows, rows] and X [batch, rows, cols] contiguous; out is
    # [batch, rows, cols] through (out_stride_r, out_stride_c), so the last step can write a tall
    # caller's matrix transposed in place. Grid (batch, cdiv(rows, BLOCK_M) * cdiv(cols, BLOCK_N)).
    matrix = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    tm = tile // tiles_n
    tn = tile % tiles_n
    offs_m = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + matrix * rows * rows
    x_base = x_ptr + matrix * rows * cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(tl.cdiv(rows, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        b = tl.load(b_base + offs_m[:, None] * rows + kk[None, :], mask=(offs_m[:, None] < rows) & (kk[None, :] < rows), other=0.0)
        x = tl.load(x_base + kk[:, None] * cols + offs_n[None, :], mask=(kk[:, None] < rows) & (offs_n[None, :] < cols), other=0.0)
        acc = _dot(b, x, acc, DOT_PRECISION)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < cols)
    x_own = tl.load(x_base + offs_m[:, None] * cols + offs_n[None, :], mask=mask, other=0.0)
    acc += tl.cast(a, tl.float32) * x_own.to(tl.float32)
    out_base = out_ptr + matrix * rows * cols
    tl.store(out_base + offs_m[:, None] * out_stride_r + offs_n[None, :] * out_stride_c,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch wrappers

_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

# Block sizes. The interpreter runs small blocks (16 is tl.dot's minimum) so that the small
# ragged test shapes cross several tiles; on a GPU, 128-wide tiles unless that leaves too few
# programs to fill the machine, then 64. tests/test_convergence.py raises INTERPRET_BLOCK for speed.
INTERPRET_BLOCK = 16
# The norm's two memory-bound passes. On a GPU one partial sum covers SUMSQ_BLOCK x SUMSQ_CHUNKS =
# 8192 elements (96 partials for a 512 x 1536 matrix: one short read for the normalise kernel),
# and a normalise tile is 32 x 128 (32 elements per thread at the default 4 warps). In the
# interpreter smaller ones, so the test shapes span several chunks and tiles.
GPU_SUMSQ_BLOCKS, GPU_NORMALISE_TILE = (1024, 8), (32, 128)  # (SUMSQ_BLOCK, SUMSQ_CHUNKS), (rows, cols)
SUMSQ_BLOCK, SUMSQ_CHUNKS = (256, 4) if INTERPRET else GPU_SUMSQ_BLOCKS
NORMALISE_ROWS, NORMALISE_COLS = (16, 32) if INTERPRET else GPU_NORMALISE_TILE


def _gram_config(batch: int, rows: int, device) -> dict:
    if INTERPRET:
        return dict(BLOCK=INTERPRET_BLOCK, BLOCK_K=INTERPRET_BLOCK)
    tiles = triton.cdiv(rows, 128)
    if batch * tiles * (tiles + 1) // 2 >= num_sms(device):
        return dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=4)


def _update_config(batch: int, rows: int, cols: int, device) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK, BLOCK_K=INTERPRET_BLOCK)
    if batch * triton.cdiv(rows, 128) * triton.cdiv(cols, 128) >= num_sms(device):
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)


def _launch_gram(X: torch.Tensor, out: torch.Tensor, alpha: float, C: torch.Tensor = None, beta: float = 0.0) -> None:
    """out [batch, m, m] = alpha X X^T (+ beta C, C symmetric) for X [batch, m, k], all contiguous."""
    batch, rows, inner = X.shape
    cfg = _gram_config(batch, rows, X.device)
    tiles = triton.cdiv(rows, cfg["BLOCK"])
    grid = (batch, tiles * (tiles + 1) // 2)
    wrap_triton(_sym_gram_kernel)[grid](
        X, X if C is None else C, out, rows, inner, alpha, beta,
        HAS_C=C is not None, DOT_PRECISION=dot_precision(X.dtype), **cfg,
    )


def _launch_update(B: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float, out_strides) -> None:
    """out = a X + B X for B [batch, m, m], X [batch, m, n]; out addressed by out_strides (row, col)."""
    batch, rows, cols = X.shape
    cfg = _update_config(batch, rows, cols, X.device)
    grid = (batch, triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]))
    wrap_triton(_ns_update_kernel)[grid](
        B, X, out, rows, cols, a, out_strides[0], out_strides[1],
        DOT_PRECISION=dot_precision(X.dtype), **cfg,
    )


def _launch_normalise(G3: torch.Tensor, out: torch.Tensor, tall: bool, out_strides) -> None:
    """out (wide view [batch, m, n] through out_strides) = G3 / ||G3||_F per matrix, G3 [batch, R, C] contiguous."""
    batch, R, C = G3.shape
    numel = R * C
    num_chunks = triton.cdiv(numel, SUMSQ_BLOCK * SUMSQ_CHUNKS)
    partials = new_output((batch, num_chunks), torch.float32, G3.device)
    wrap_triton(_sumsq_partials_kernel)[(batch, num_chunks)](
        G3, partials, numel, num_chunks,
        COMPUTE_DTYPE=_TL_DTYPE[out.dtype], BLOCK=SUMSQ_BLOCK, CHUNK_BLOCKS=SUMSQ_CHUNKS,
    )
    rows, cols = (C, R) if tall else (R, C)
    g_strides = (1, C) if tall else (C, 1)  # the wide view of a tall matrix is its transpose
    wrap_triton(_normalise_kernel)[(batch, triton.cdiv(rows, NORMALISE_ROWS))](
        G3, partials, out, rows, cols, num_chunks, g_strides[0], g_strides[1], out_strides[0], out_strides[1],
        NORM_EPS, CHUNKS_POW2=triton.next_power_of_2(num_chunks), BLOCK_R=NORMALISE_ROWS, BLOCK_C=NORMALISE_COLS,
    )


# ----------------------------------------------------------------------------- ops


def _check_inputs(G: torch.Tensor, steps: int, compute_dtype: torch.dtype, where: str) -> None:
    if G.dim() < 2:
        raise ValueError(
            f"{where}: G must be a floating-point tensor [..., m, n], got shape {tuple(G.shape)}; pass a stack of matrices"
        )
    if not G.is_floating_point():
        raise TypeError(f"{where}: G must be a floating-point tensor [..., m, n], got {G.dtype}; cast it to a float dtype")
    if compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{where}: compute_dtype {compute_dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
    if steps < 0:
        raise ValueError(f"{where}: steps must be >= 0, got {steps}")


def _triples(steps: int, flat_coeffs: list[float]) -> list[tuple[float, float, float]]:
    return [tuple(flat_coeffs[3 * i: 3 * i + 3]) for i in range(steps)]


@torch.library.triton_op("golf::newton_schulz", mutates_args=())
def newton_schulz_op(G: torch.Tensor, steps: int, coeffs: list[float], compute_dtype: torch.dtype) -> torch.Tensor:
    """G [..., R, C] -> compute_dtype [..., R, C]; coeffs flattened: 3 per step (a, b, c)."""
    if len(coeffs) != 3 * steps:
        raise ValueError(f"golf::newton_schulz: expected {3 * steps} flattened coefficients for {steps} steps, got {len(coeffs)}")
    R, C = G.shape[-2], G.shape[-1]
    batch = G.numel() // (R * C) if R * C else 0
    out = new_output(G.shape, compute_dtype, G.device)
    if batch == 0:
        return out
    G3 = G.contiguous().reshape(batch, R, C)
    out3 = out.view(batch, R, C)
    tall = R > C
    m, n = (C, R) if tall else (R, C)
    # the final orientation, as strides of the wide view: a tall result is written transposed
    final_strides = (1, C) if tall else (C, 1)
    if steps == 0:
        _launch_normalise(G3, out3, tall, final_strides)
        return out

    X = new_output((batch, m, n), compute_dtype, G.device)
    X_next = new_output((batch, m, n), compute_dtype, G.device)
    A = new_output((batch, m, m), compute_dtype, G.device)
    B = new_output((batch, m, m), compute_dtype, G.device)
    _launch_normalise(G3, X, tall, (n, 1))
    for step, (a, b, c) in enumerate(_triples(steps, coeffs)):
        _launch_gram(X, A, 1.0)  # A = X X^T
        _launch_gram(A, B, c, C=A, beta=b)  # B = c A A^T + b A
        last = step == steps - 1
        _launch_update(B, X, out3 if last else X_next, a, final_strides if last else (n, 1))
        X, X_next = X_next, X
    return out


# ----------------------------------------------------------------------------- CPU fallback and fake


def newton_schulz_eager(G, steps, coeffs, compute_dtype):
    return reference.newton_schulz(G, steps, _triples(steps, coeffs), compute_dtype)


def _newton_schulz_fake(G, steps, coeffs, compute_dtype):
    return G.new_empty(G.shape, dtype=compute_dtype)


register_cpu_and_fake(newton_schulz_op, reference=newton_schulz_eager, fake=_newton_schulz_fake)

# ----------------------------------------------------------------------------- autograd


def _newton_schulz_backward(ctx, grad):
    raise RuntimeError(
        "golf::newton_schulz has no gradient (it is an optimiser step); call it under torch.no_grad() or on a detached tensor"
    )


newton_schulz_op.register_autograd(_newton_schulz_backward)  # nothing to save: no setup_context


# ----------------------------------------------------------------------------- public API


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coeffs=reference.QUINTIC_COEFFS, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation of G [..., m, n] (batched over leading dims); see the
    module docstring and kernels.reference.newton_schulz, whose contract this follows exactly."""
    _check_inputs(G, steps, compute_dtype, "newton_schulz")
    flat = [c for triple in reference.per_step_coeffs(steps, coeffs) for c in triple]
    return newton_schulz_op(G, steps, flat, compute_dtype)


# The three kernels one by one, for bench/newton_schulz.py (contiguous inputs in compute dtype).


def gram(X: torch.Tensor) -> torch.Tensor:
    """X X^T for X [batch, m, k]."""
    out = new_output((X.shape[0], X.shape[1], X.shape[1]), X.dtype, X.device)
    with launch_directly():
        _launch_gram(X, out, 1.0)
    return out


def gram_poly(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b A + c A A for symmetric A [batch, m, m]."""
    out = new_output(A.shape, A.dtype, A.device)
    with launch_directly():
        _launch_gram(A, out, c, C=A, beta=b)
    return out


def ns_update(B: torch.Tensor, X: torch.Tensor, a: float) -> torch.Tensor:
    """a X + B X for B [batch, m, m], X [batch, m, n]."""
    out = new_output(X.shape, X.dtype, X.device)
    with launch_directly():
        _launch_update(B, X, out, a, (X.shape[2], 1))
    return out


TRITON_IMPLS = {"newton_schulz": newton_schulz}
