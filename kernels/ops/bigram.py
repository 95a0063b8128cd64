"""BigramHash embedding: hash + row gather in one forward kernel; scatter-add of the gradient into the table.

Hash (SPEC.md, kernels.reference.bigram_hash): every row of ids is its own sequence; position 0
takes bucket buckets-1; position t > 0 takes (36313*id[t] XOR 27191*id[t-1]) mod (buckets-1), in
int32 arithmetic (products wrap), with torch's floor-modulo sign (a negative XOR, only possible
for ids beyond 59,000 or negative ids, still lands in [0, buckets-1)).

Backward, grad_table [buckets, D] = sum over positions p of grad_out[p] into row bucket(p):
- fast mode: every position block atomically adds its fp32 gradient rows into an fp32
  accumulator, cast to the table's dtype at the end; the summation order, hence the last bits,
  depend on scheduling.
- deterministic mode: positions are stably sorted by bucket (torch.sort, a preparatory op), the
  bucket boundaries found by torch.searchsorted, and one program per bucket sums its rows in
  sorted order (fixed-size chunks, fp32): the same bits every run.
"""
import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._launch import new_output, register_cpu_and_fake, wrap_triton
from kernels._numerics import _fp32_to_bf16_rne  # RNE bf16 cast the interpreter also gets right

MUL_CUR, MUL_PREV = reference.BIGRAM_MUL_CUR, reference.BIGRAM_MUL_PREV
MAX_BLOCK_D = 256  # columns per program; wider tables take more programs along D
TILE_ELEMENTS = 4096  # gathered elements per program (positions x columns)
SORTED_CHUNK = 32  # gradient rows summed per step of the deterministic loop
HASH_BLOCK = 1024  # positions per program of the hash alone: 8 per thread at 4 warps, a plain streaming pass
TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _bucket_of(ids_ptr, pos, pos_ok, T, buckets, MUL_CUR: tl.constexpr, MUL_PREV: tl.constexpr):
    """[P] flat positions into ids [n_pos] (rows of length T) -> [P] int32 buckets."""
    t = pos % T
    cur = tl.load(ids_ptr + pos, mask=pos_ok, other=0).to(tl.int32)
    prev = tl.load(ids_ptr + pos - 1, mask=pos_ok & (t > 0), other=0).to(tl.int32)
    mixed = (cur * MUL_CUR) ^ (prev * MUL_PREV)  # int32, wraps like the reference
    modulus = buckets - 1
    bucket = mixed % modulus  # Triton's remainder has the dividend's sign; torch's has the divisor's
    bucket = tl.where(bucket < 0, bucket + modulus, bucket)
    return tl.where(t == 0, modulus, bucket)


@triton.jit
def _bigram_hash_kernel(
    ids_ptr,  # [n_pos] integer
    out_ptr,  # [n_pos] int64 or int32
    n_pos,
    T,
    buckets,
    BLOCK_P: tl.constexpr,
    MUL_CUR: tl.constexpr,
    MUL_PREV: tl.constexpr,
):
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_ok = pos < n_pos
    bucket = _bucket_of(ids_ptr, pos, pos_ok, T, buckets, MUL_CUR, MUL_PREV)
    tl.store(out_ptr + pos, bucket.to(out_ptr.dtype.element_ty), mask=pos_ok)


@triton.jit
def _bigram_embed_kernel(
    ids_ptr,  # [n_pos] integer
    table_ptr,  # [buckets, D]
    out_ptr,  # [n_pos, D] in table's dtype
    n_pos,
    T,
    buckets,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MUL_CUR: tl.constexpr,
    MUL_PREV: tl.constexpr,
):
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # [P]
    pos_ok = pos < n_pos
    bucket = _bucket_of(ids_ptr, pos, pos_ok, T, buckets, MUL_CUR, MUL_PREV)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [C]
    mask = pos_ok[:, None] & (cols[None, :] < D)
    rows = tl.load(table_ptr + bucket.to(tl.int64)[:, None] * D + cols[None, :], mask=mask)
    tl.store(out_ptr + pos.to(tl.int64)[:, None] * D + cols[None, :], rows, mask=mask)


@triton.jit
def _bigram_grad_atomic_kernel(
    ids_ptr,  # [n_pos] integer
    grad_ptr,  # [n_pos, D] output gradient
    acc_ptr,  # [buckets, D] fp32, zero on entry
    n_pos,
    T,
    buckets,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MUL_CUR: tl.constexpr,
    MUL_PREV: tl.constexpr,
):
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # [P]
    pos_ok = pos < n_pos
    bucket = _bucket_of(ids_ptr, pos, pos_ok, T, buckets, MUL_CUR, MUL_PREV)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [C]
    mask = pos_ok[:, None] & (cols[None, :] < D)
    grad = tl.load(grad_ptr + pos.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    # relaxed: nothing reads the accumulator until the kernel has finished
    targets = acc_ptr + bucket.to(tl.int64)[:, None] * D + cols[None, :]
    tl.atomic_add(targets, grad.to(tl.float32), mask=mask, sem="relaxed")


@triton.jit
def _bigram_grad_sorted_kernel(
    grad_ptr,  # [n_pos, D] output gradient
    order_ptr,  # [n_pos] int64: positions sorted (stably) by bucket
    bounds_ptr,  # [buckets + 1] int64: bucket b owns order[bounds[b]:bounds[b+1]]
    out_ptr,  # [buckets, D] in table's dtype
    D,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    bucket = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [C]
    col_ok = cols < D
    start = tl.load(bounds_ptr + bucket)
    end = tl.load(bounds_ptr + bucket + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    i = start
    while i < end:  # a while, not range(start, end): Triton 3.6's interpreter rejects tensor range bounds
        idx = i + tl.arange(0, CHUNK)  # [R]
        idx_ok = idx < end
        src = tl.load(order_ptr + idx, mask=idx_ok, other=0)
        mask = idx_ok[:, None] & col_ok[None, :]
        grad = tl.load(grad_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(grad, axis=0)  # fixed tree per chunk, chunks in sorted order: same bits every run
        i += CHUNK
    if OUT_BF16:
        tl.store(out_ptr + bucket.to(tl.int64) * D + cols, _fp32_to_bf16_rne(acc), mask=col_ok)
    else:
        tl.store(out_ptr + bucket.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------- launch


def _check_ids(ids: torch.Tensor, buckets: int, where: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{where}: ids must be an integer tensor of token ids, got {ids.dtype}")
    if ids.dim() < 1:
        raise ValueError(f"{where}: ids must be [..., T] with T the sequence dim, got a 0-d tensor")
    if buckets < 2:
        raise ValueError(f"{where}: buckets must be at least 2 (the hash is taken mod buckets-1), got {buckets}")


def _check_table(ids: torch.Tensor, table: torch.Tensor, where: str) -> None:
    if table.dim() != 2:
        raise ValueError(f"{where}: table must be [buckets, D], got shape {tuple(table.shape)}")
    if table.dtype not in TABLE_DTYPES:
        raise TypeError(f"{where}: table has dtype {table.dtype}; use float32, bfloat16 or float16")
    if table.device != ids.device:
        raise ValueError(f"{where}: ids are on {ids.device} but table is on {table.device}; move both to one device")
    _check_ids(ids, table.shape[0], where)


def _position_blocks(D: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    return max(1, TILE_ELEMENTS // block_d), block_d


def _hash_into(ids: torch.Tensor, buckets: int, out: torch.Tensor) -> None:
    n_pos = ids.numel()
    if n_pos == 0:
        return
    wrap_triton(_bigram_hash_kernel)[(triton.cdiv(n_pos, HASH_BLOCK),)](
        ids, out, n_pos, ids.shape[-1], buckets, BLOCK_P=HASH_BLOCK, MUL_CUR=MUL_CUR, MUL_PREV=MUL_PREV
    )


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("golf::bigram_hash", mutates_args=())
def bigram_hash_op(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    _check_ids(ids, buckets, "bigram_hash")
    ids = ids.contiguous()
    out = new_output(ids.shape, torch.int64, ids.device)  # [..., T]
    _hash_into(ids, buckets, out)
    return out


@torch.library.triton_op("golf::bigram_embed", mutates_args=())
def bigram_embed_op(ids: torch.Tensor, table: torch.Tensor, deterministic: bool) -> torch.Tensor:
    _check_table(ids, table, "bigram_embed")
    ids, table = ids.contiguous(), table.contiguous()
    buckets, D = table.shape
    out = new_output((*ids.shape, D), table.dtype, ids.device)  # [..., T, D]
    n_pos = ids.numel()
    if n_pos and D:
        block_p, block_d = _position_blocks(D)
        wrap_triton(_bigram_embed_kernel)[(triton.cdiv(n_pos, block_p), triton.cdiv(D, block_d))](
            ids, table, out, n_pos, ids.shape[-1], buckets, D,
            BLOCK_P=block_p, BLOCK_D=block_d, MUL_CUR=MUL_CUR, MUL_PREV=MUL_PREV, num_warps=4,
        )  # fmt: skip
    return out


@torch.library.triton_op("golf::bigram_embed_backward", mutates_args=())
def bigram_embed_backward_op(
    grad: torch.Tensor, ids: torch.Tensor, buckets: int, table_dtype: torch.dtype, deterministic: bool
) -> torch.Tensor:
    """grad [..., T, D] (gradient of bigram_embed's output) -> grad_table [buckets, D] in table_dtype."""
    _check_ids(ids, buckets, "bigram_embed_backward")
    if grad.shape[:-1] != ids.shape:
        raise ValueError(
            f"bigram_embed_backward: grad {tuple(grad.shape)} does not match ids {tuple(ids.shape)} + (D,)"
        )
    ids, grad = ids.contiguous(), grad.contiguous()  # grad arrives expanded (stride 0) from .sum()
    D = grad.shape[-1]
    n_pos = ids.numel()
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    if deterministic:
        out = new_output((buckets, D), table_dtype, ids.device)  # every row written, empty buckets as 0
        bucket = new_output(ids.shape, torch.int32, ids.device)  # [..., T]
        _hash_into(ids, buckets, bucket)
        sorted_bucket, order = torch.sort(bucket.reshape(-1), stable=True)  # [n_pos] each
        edges = torch.arange(buckets + 1, dtype=torch.int32, device=ids.device)
        bounds = torch.searchsorted(sorted_bucket, edges)  # [buckets + 1] int64
        if D:
            wrap_triton(_bigram_grad_sorted_kernel)[(buckets, triton.cdiv(D, block_d))](
                grad, order, bounds, out, D,
                CHUNK=SORTED_CHUNK, BLOCK_D=block_d, OUT_BF16=table_dtype == torch.bfloat16, num_warps=4,
            )  # fmt: skip
        return out
    acc = torch.zeros((buckets, D), dtype=torch.float32, device=ids.device)  # an accumulator: must start at 0
    if n_pos and D:
        block_p, block_d = _position_blocks(D)
        wrap_triton(_bigram_grad_atomic_kernel)[(triton.cdiv(n_pos, block_p), triton.cdiv(D, block_d))](
            ids, grad, acc, n_pos, ids.shape[-1], buckets, D,
            BLOCK_P=block_p, BLOCK_D=block_d, MUL_CUR=MUL_CUR, MUL_PREV=MUL_PREV, num_warps=4,
        )  # fmt: skip
    return acc if table_dtype == torch.float32 else acc.to(table_dtype)


# --------------------------------------------------------------------------- CPU fallbacks and fakes

bigram_hash_eager = reference.bigram_hash  # already the ops' signatures
bigram_embed_eager = reference.bigram_embed


def bigram_embed_backward_eager(grad, ids, buckets, table_dtype, deterministic):
    """Eager scatter-add (index_add_ is deterministic on the CPU) with fp32 accumulation."""
    rows = grad.reshape(-1, grad.shape[-1]).float()
    acc = torch.zeros((buckets, grad.shape[-1]), dtype=torch.float32, device=grad.device)
    return acc.index_add_(0, reference.bigram_hash(ids, buckets).reshape(-1), rows).to(table_dtype)


def _bigram_hash_fake(ids, buckets):
    _check_ids(ids, buckets, "bigram_hash")
    return ids.new_empty(ids.shape, dtype=torch.int64)


def _bigram_embed_fake(ids, table, deterministic):
    _check_table(ids, table, "bigram_embed")
    return table.new_empty((*ids.shape, table.shape[1]))


def _bigram_embed_backward_fake(grad, ids, buckets, table_dtype, deterministic):
    return grad.new_empty((buckets, grad.shape[-1]), dtype=table_dtype)


register_cpu_and_fake(bigram_hash_op, reference=bigram_hash_eager, fake=_bigram_hash_fake)
register_cpu_and_fake(bigram_embed_op, reference=bigram_embed_eager, fake=_bigram_embed_fake)
register_cpu_and_fake(bigram_embed_backward_op, reference=bigram_embed_backward_eager, fake=_bigram_embed_backward_fake)

# --------------------------------------------------------------------------- autograd


def _bigram_embed_setup_context(ctx, inputs, output):
    ids, table, deterministic = inputs
    ctx.save_for_backward(ids)
    ctx.buckets, ctx.table_dtype, ctx.deterministic = table.shape[0], table.dtype, deterministic


def _bigram_embed_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    grad_table = None
    if ctx.needs_input_grad[1]:
        grad_table = bigram_embed_backward_op(grad, ids, ctx.buckets, ctx.table_dtype, ctx.deterministic)
    return None, grad_table, None


bigram_embed_op.register_autograd(_bigram_embed_backward, setup_context=_bigram_embed_setup_context)


# --------------------------------------------------------------------------- public API


def bigram_hash(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """BigramHash bucket of each position: ids [..., T] -> int64 [..., T]."""
    return bigram_hash_op(ids, buckets)


def bigram_embed(ids: torch.Tensor, table: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Rows of table [buckets, D] at the BigramHash buckets of ids [..., T] -> [..., T, D] in table's dtype."""
    return bigram_embed_op(ids, table, deterministic)


TRITON_IMPLS = {"bigram_hash": bigram_hash, "bigram_embed": bigram_embed}
