"""Fused XSA attention, v2: causal GQA flash attention (forward + backward) with document isolation,
the XSA projection y = u - (u . v_hat) v_hat and the sparse output gate y <- sigmoid(g) y, both
applied in the forward's epilogue and differentiated in the backward.

Layout: q [B, T, H, D], k/v [B, T, Hkv, D] (any strides with a unit last stride), query head h
reads KV head h // (H // Hkv) without copying K/V. gate [B, T, H] pre-sigmoid (any float dtype,
sigmoid in fp32). cu_seqlens: int32 offsets into the B*T tokens taken row by row (0 first, B*T
last, possibly repeated B*T at the end); a query sees the keys at or before it in its own
segment. Scale 1/sqrt(D), fp32 accumulation, output in q's dtype. Exactly the semantics of
kernels.reference.xsa_attention.

Segments: the op turns cu_seqlens into each token's row-local segment start and end (int32
[B*T], torch.searchsorted; segments are cut at row starts whatever the offsets say). A query tile
starts its key loop at the key tile holding its first row's segment start, and a key tile's
backward stops at the end of its last key's segment: tiles wholly outside the segments are
skipped, not masked; the tiles a boundary crosses compare key index with each query's start.

Forward (one program per query tile of BLOCK_M positions and per batch and HEADS query heads
of one KV head, stacked into one tile so that each K/V tile loaded serves them all; HEADS, 1 or 2,
is an autotune option): online softmax over the key tiles from the segment's first to the
diagonal, then the epilogue: XSA, gate. It saves lse [B, H, T] (natural
log) and c = u . v_hat [B, H, T] (fp32, before the gate; zeros without XSA).

Backward, from the stored (gated) y, c, lse and dy, with s = sigmoid(g) (1 without a gate),
v_hat = v/||v|| at the row's own position of the KV head serving the query head; never y / s:
    delta   = dy . y                                  (= du . u, the flash backward's row term)
    d gate  = (1 - s) delta
    du      = s (dy - (dy . v_hat) v_hat)             (s dy without XSA)
    d v_hat = -[s c dy + (dy . v_hat)(y + s c v_hat)]
    dv_self = (d v_hat - (d v_hat . v_hat) v_hat) / ||v||      summed over the query heads of a KV head
then the flash backward with du as the output gradient, dv_self added to dV at the same position.
Kernels: a row-wise preprocess (du, delta, d gate, dv_self; one program per KV head's query
heads, so dv_self needs no atomics), then
- default, one pass: one program per (key tile, batch*KV head) loops over the KV head's query
  heads and their query tiles, accumulating dK, dV in registers and adding each tile's dQ into
  an fp32 buffer with atomics (converted to q's dtype after): the 5 tile matmuls of
  FlashAttention-2 (QK^T, dU V^T, P^T dU, dS^T Q, dS K). The atomics' order varies on a GPU, so
  dQ's last bits may vary run to run.
- deterministic=True: the same dK/dV kernel without dQ, then a dQ kernel (one program per
  query tile and head) that recomputes QK^T and dU V^T: 7 tile matmuls, no atomics, the same
  bits every run.
Nothing T x T is ever stored. The one-pass backward's programs already serve all query heads of a
KV head. Folding dv_self into the dK/dV epilogue would trade its fp32 write and read for reading
dy and y of the KV head's query heads again: the same bytes at 2 query heads per KV head, so the
preprocess keeps it. du is stored in q's dtype; dv_self stays fp32, because rounding it to bf16
before dV's own bf16 rounding could double dV's error where the two terms are of one size.

Hopper: Triton 3.9's warp specialisation (tl.range(..., warp_specialize=True)) left this forward's
sm_90a code unchanged at 8 warps and failed inside the compiler at 4 (WSDataPartition), so it is
not an autotune option; TMA tensor descriptors are not used (device-side descriptors need a
Triton allocator set per process, which torch.library.wrap_triton does not arrange).

FLOPs (causal, in-segment): with W = the sum of L(L+1)/2 over every segment of every row (a row
without cu_seqlens is one segment), the visible (query, key) pairs of one head, the forward does
4*H*W*D (QK^T and PV), the one-pass backward 10*H*W*D, the deterministic one 14*H*W*D; the
row-wise epilogue and preprocess are O(B*T*H*D).
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import reference
from kernels._launch import INTERPRET, AutotunePair, autotune_pair, new_output, register_cpu_and_fake, wrap_triton
from kernels._numerics import LN2, LOG2E, _dot, dot_precision  # _dot: also right on bf16 in the interpreter

NORM_EPS = tl.constexpr(reference.XSA_NORM_EPS)  # the kernels' copy of the reference's floor on ||v||
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)

# --------------------------------------------------------------------------- tile configurations
# On a GPU a short autotune list per kernel (Hopper-minded: 128-row tiles, 4-8 warps, 3-4 stages);
# in the interpreter one small config, because every program runs as numpy on the CPU: the
# smallest tiles tl.dot takes that nest, so the T = 17, 64, 130 tests cross several tiles and the
# diagonal stage takes two steps.


def _configs(gpu_configs, interpreter_config, outer: str, inner: str) -> list:
    """triton.Configs from (BLOCK_M, BLOCK_N, warps, stages[, HEADS]), pruned to those whose `outer`
    block is a multiple of their `inner` block: the kernel's diagonal stage starts on an outer-tile
    boundary and steps by inner, so a config that breaks the rule would leave keys unvisited or
    unmasked. HEADS (the forward's): query heads of one KV head stacked in one program.
    The rule depends on the config alone, so it is applied here, once, and not through
    triton.autotune(prune_configs_by=...): torch.library.wrap_triton (torch 2.13) rebuilds an
    autotuner that has an early_config_prune into a new one at every eager launch, which would
    benchmark the configs again on every call."""
    def config(m, n, warps, stages, *heads):
        blocks = {"BLOCK_M": m, "BLOCK_N": n, **({"HEADS": heads[0]} if heads else {})}
        return triton.Config(blocks, num_warps=warps, num_stages=stages)

    if INTERPRET:
        configs = [config(*interpreter_config[:2], 4, 1, *interpreter_config[2:])]
    else:
        configs = [config(*tile) for tile in gpu_configs]
    kept = [c for c in configs if c.kwargs[outer] % c.kwargs[inner] == 0]
    if not kept:
        raise ValueError(f"xsa_attention: no tile config has {outer} a multiple of {inner}; fix the config list")
    return kept


# The GPU lists, (BLOCK_M, BLOCK_N, warps, stages), are module constants so that tests can run each
# of them through the interpreter and check its tile rule and shared memory. The forward's has a
# fifth entry, HEADS: with 2, a program stacks two query heads of one KV head (2 x BLOCK_M rows per
# K/V tile); the autotuner weighs that against one head's taller position tiles.
FWD_GPU_TILES = [
    (128, 64, 4, 3, 1), (128, 64, 8, 3, 1), (128, 128, 8, 3, 1), (64, 64, 4, 3, 2), (64, 64, 8, 3, 2),
    (128, 64, 8, 3, 2), (128, 32, 4, 4, 1), (64, 32, 4, 4, 1),
]
# Interpreter: 16 positions x 2 heads (32 rows), so the GQA tests take the stacked path.
_FWD_CONFIGS = _configs(FWD_GPU_TILES, interpreter_config=(16, 16, 2), outer="BLOCK_M", inner="BLOCK_N")
# dK/dV holds two [BLOCK_N, D] fp32 accumulators: with 4 warps ptxas spills (bench/sm90_compile.py
# showed 8-368 bytes per thread in bf16), with 8 warps none of these do. 64 query rows per step
# spilled too (8-136 B) once the one-pass backward's [BLOCK_M, D] dQ tile joined them.
# BLOCK_M: query rows per step, BLOCK_N: key rows owned by the program.
DKDV_GPU_TILES = [(32, 128, 8, 3), (32, 128, 8, 4), (16, 128, 8, 4), (32, 64, 8, 4)]
_DKDV_CONFIGS = _configs(DKDV_GPU_TILES, interpreter_config=(16, 32), outer="BLOCK_N", inner="BLOCK_M")
DQ_GPU_TILES = [(128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]
_DQ_CONFIGS = _configs(DQ_GPU_TILES, interpreter_config=(32, 16), outer="BLOCK_M", inner="BLOCK_N")
# Rows per program of the row-wise preprocess: [64, D] fp32 tiles (v_hat, dv_hat, u, dy) fit 4 warps'
# registers up to D = 128; 16 in the interpreter, so the T = 17 and 33 tests cross tiles.
PREPROCESS_GPU_BLOCK_T = 64
_PREPROCESS_BLOCK_T = 16 if INTERPRET else PREPROCESS_GPU_BLOCK_T
_TUNE_KEY = ["T", "HEAD_DIM", "GROUP", "XSA", "SEGMENTS"]
TUNE_MIN_T = 512  # sequences from which 16-bit inputs autotune (kernels._launch.AutotunePair)

# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, T, DIAGONAL: tl.constexpr):
    """K and V rows offs_n of one KV head; only the diagonal tile can run past T, so only it is masked."""
    if DIAGONAL:
        col_ok = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :])
    return k, v


@triton.jit
def _visible(m, n, seg_lo, T, DIAGONAL: tl.constexpr, SEGMENTS: tl.constexpr):
    """Mask of the keys n each query m may see (m, n and seg_lo broadcast against each other): at
    or before it and inside the sequence (diagonal tiles), not before its segment's first key
    seg_lo (with segments). Called only where one of the two applies."""
    if DIAGONAL:
        ok = (n <= m) & (n < T)
        if SEGMENTS:
            ok = ok & (n >= seg_lo)
    else:
        ok = n >= seg_lo
    return ok


@triton.jit
def _first_key_tile(SEG_START, row_base, start_m, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr):
    """First key tile a query tile needs: the one holding its first row's segment start (the
    earliest of its rows'), or 0; the tiles before it are skipped, not masked."""
    if SEGMENTS:
        return (tl.load(SEG_START + row_base + start_m) // BLOCK_N) * BLOCK_N
    else:
        return 0


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T, qk_scale,
    DIAGONAL: tl.constexpr, SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of the online softmax; diagonal tiles and segment edges are masked."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, T, DIAGONAL)  # [BLOCK_N, D] each
    s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
    if DIAGONAL or SEGMENTS:
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seg_lo[:, None], T, DIAGONAL, SEGMENTS), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SEGMENTS:
        # A row whose segment starts after this tile has seen no key yet: m stays -inf, and the
        # exponents use 0 instead so that they give 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, None, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _xsa_fwd_kernel(
    Q, K, V, GATE, SEG_START, Y, C, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_yb, stride_yt, stride_yh,
    T, H,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, XSA: tl.constexpr,
    GATED: tl.constexpr, SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
):
    # One program: BLOCK_M positions of PACKED query heads that share one KV head, stacked into one
    # [PACKED * BLOCK_M, D] tile (row r: head r // BLOCK_M, position r % BLOCK_M), so each K/V tile
    # loaded serves all of them. HEADS (the config's) is used where it divides GROUP, else 1.
    PACKED: tl.constexpr = HEADS if GROUP % HEADS == 0 else 1
    ROWS: tl.constexpr = PACKED * BLOCK_M
    # The last query tiles see the most keys: launch them first so the causal tail is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)  # batch * (H // PACKED)
    b = (pid_bh // (H // PACKED)).to(tl.int64)  # batch offsets (b * stride_b) can pass 2**31 elements
    rows = tl.arange(0, ROWS)
    h = (pid_bh % (H // PACKED)) * PACKED + rows // BLOCK_M  # [ROWS] query head of each row
    kv_head = ((pid_bh % (H // PACKED)) * PACKED) // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + rows % BLOCK_M  # [ROWS] position of each row
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    row_base = b * T  # index of this row's token 0 in the [B * T] segment bounds

    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [ROWS, D]
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    qk_scale = SM_SCALE * LOG2E  # softmax in base 2
    if SEGMENTS:
        seg_lo = tl.load(SEG_START + row_base + offs_m, mask=row_ok, other=0)  # [ROWS] first key of each row
    else:
        seg_lo = offs_m  # unused

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([ROWS], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

    # Stage 1: key tiles wholly left of the diagonal (no causal or bounds mask: n < start_m <= T),
    # from the first one this tile's segments reach. Only the tiles before the last row's segment
    # start can hold keys some row must not see: they take the segment mask, the rest none.
    unmasked_from = 0
    if SEGMENTS:
        last_lo = tl.load(SEG_START + row_base + tl.minimum(start_m + BLOCK_M, T) - 1)
        unmasked_from = tl.minimum(tl.cdiv(last_lo, BLOCK_N) * BLOCK_N, start_m)
        for start_n in range(_first_key_tile(SEG_START, row_base, start_m, BLOCK_N, SEGMENTS), unmasked_from, BLOCK_N):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T, qk_scale,
                DIAGONAL=False, SEGMENTS=True, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
            )
    for start_n in range(unmasked_from, start_m, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T, qk_scale,
            DIAGONAL=False, SEGMENTS=False, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )
    # Stage 2: the diagonal tiles: causal mask and the ragged end of the sequence. Every row sees
    # at least its own key, so no row ends all -inf.
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T, qk_scale,
            DIAGONAL=True, SEGMENTS=SEGMENTS, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )

    u = acc / l_i[:, None]  # pre-projection output [ROWS, D]
    row_stat = (b * H + h) * T + offs_m  # index into the [B, H, T] statistics
    if XSA:
        v_own = tl.load(v_base + offs_m[:, None] * stride_vt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        v_own = v_own.to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(v_own * v_own, 1)), NORM_EPS)
        v_hat = v_own / norm[:, None]
        c = tl.sum(u * v_hat, 1)
        y = u - c[:, None] * v_hat
    else:
        c = tl.zeros([ROWS], dtype=tl.float32)
        y = u
    if GATED:
        g = tl.load(GATE + b * stride_gb + h * stride_gh + offs_m * stride_gt, mask=row_ok, other=0.0)
        y = y * tl.sigmoid(g.to(tl.float32))[:, None]
    y_ptrs = Y + b * stride_yb + h[:, None] * stride_yh + offs_m[:, None] * stride_yt + offs_d[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None])
    tl.store(C + row_stat, c, mask=row_ok)
    tl.store(LSE + row_stat, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _xsa_bwd_preprocess_kernel(
    DY, Y, V, C, GATE, DU, DELTA, DGATE, DV_SELF,
    stride_dyb, stride_dyt, stride_dyh,
    stride_yb, stride_yt, stride_yh,
    stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_gh,
    stride_dub, stride_dut, stride_duh,
    stride_sb, stride_st, stride_sh,
    T, H, HKV,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, XSA: tl.constexpr, GATED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # One program per (row tile, batch * KV head): it visits the GROUP query heads of its KV head,
    # so their contributions to dv_self are summed here, without atomics. With s = sigmoid(gate)
    # (1 without a gate) and y the stored (gated) output, everything follows from y, never from
    # y / s: delta = dy . y, d gate = (1 - s) delta, du = s (dy - (dy . v_hat) v_hat).
    pid_t = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // HKV).to(tl.int64)  # batch offsets can pass 2**31 elements
    kv_head = pid_bkv % HKV
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_t < T
    if XSA:
        v_own = tl.load(
            V + b * stride_vb + kv_head * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        ).to(tl.float32)
        true_norm = tl.sqrt(tl.sum(v_own * v_own, 1))
        norm = tl.maximum(true_norm, NORM_EPS)
        v_hat = v_own / norm[:, None]
        dv_hat = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = kv_head * GROUP + g
        dy = tl.load(
            DY + b * stride_dyb + h * stride_dyh + offs_t[:, None] * stride_dyt + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        ).to(tl.float32)
        y = tl.load(
            Y + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt + offs_d[None, :],
            mask=row_ok[:, None], other=0.0,
        ).to(tl.float32)
        row_stat = (b * H + h) * T + offs_t
        delta = tl.sum(dy * y, 1)  # = du . u, the pre-gate, pre-projection output's delta
        tl.store(DELTA + row_stat, delta, mask=row_ok)
        if GATED:
            gate = tl.load(GATE + b * stride_gb + h * stride_gh + offs_t * stride_gt, mask=row_ok, other=0.0)
            s = tl.sigmoid(gate.to(tl.float32))
            tl.store(DGATE + (b * T + offs_t) * H + h, ((1.0 - s) * delta).to(DGATE.dtype.element_ty), mask=row_ok)
        else:
            s = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
        du_ptrs = DU + b * stride_dub + h * stride_duh + offs_t[:, None] * stride_dut + offs_d[None, :]
        if XSA:
            c = tl.load(C + row_stat, mask=row_ok, other=0.0)  # u . v_hat before the gate
            dy_dot_vhat = tl.sum(dy * v_hat, 1)
            tl.store(du_ptrs, (s[:, None] * (dy - dy_dot_vhat[:, None] * v_hat)).to(DU.dtype.element_ty),
                     mask=row_ok[:, None])
            # -[(u . v_hat) s dy + (s dy . v_hat) u] with s u = y + s c v_hat
            sc = s * c
            dv_hat += -(sc[:, None] * dy + dy_dot_vhat[:, None] * (y + sc[:, None] * v_hat))
        elif GATED:
            tl.store(du_ptrs, (s[:, None] * dy).to(DU.dtype.element_ty), mask=row_ok[:, None])
    if XSA:
        # d(v / max(||v||, eps)): the tangent projection over ||v|| above the floor, 1/eps below it.
        radial = tl.sum(dv_hat * v_hat, 1)
        dv_self = tl.where(
            (true_norm > NORM_EPS)[:, None], (dv_hat - radial[:, None] * v_hat) / norm[:, None], dv_hat / NORM_EPS
        )
        tl.store(
            DV_SELF + b * stride_sb + kv_head * stride_sh + offs_t[:, None] * stride_st + offs_d[None, :],
            dv_self, mask=row_ok[:, None],
        )


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, du_base, dq_base, lse_base, delta_base, seg_base, stride_qt, stride_dut, stride_dqt,
    start_m, offs_n, offs_d, T, qk_scale, sm_scale,
    DIAGONAL: tl.constexpr, SEGMENTS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One query tile's contribution to a key tile's dK (unscaled) and dV, in transposed form, and
    with ATOMIC_DQ its dQ rows, added to the fp32 dQ accumulator."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T  # the last query tile may be ragged in either stage
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    du = tl.load(du_base + offs_m[:, None] * stride_dut + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    # Padded rows get lse = +inf, so their probabilities are exactly 0.
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    s_t = _dot(k, tl.trans(q), None, DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.exp2(s_t - lse2[None, :])
    if DIAGONAL or SEGMENTS:
        if SEGMENTS:
            seg_lo = tl.load(seg_base + offs_m, mask=row_ok, other=0)
        else:
            seg_lo = offs_m  # unused
        p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], seg_lo[None, :], T, DIAGONAL, SEGMENTS), p_t, 0.0)
    dv += _dot(p_t.to(du.dtype), du, None, DOT_PRECISION)
    dp_t = _dot(v, tl.trans(du), None, DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, None, DOT_PRECISION)
    if ATOMIC_DQ:
        dq = _dot(tl.trans(ds_t.to(k.dtype)), k, None, DOT_PRECISION) * sm_scale  # [BLOCK_M, D]
        # relaxed: nothing reads the accumulator until the kernel has finished
        tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _xsa_bwd_dkdv_kernel(
    Q, K, V, DU, LSE, DELTA, DV_SELF, SEG_START, SEG_END, DK, DV, DQ_ACC,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dub, stride_dut, stride_duh,
    stride_sb, stride_st, stride_sh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqb, stride_dqt, stride_dqh,
    T, H, HKV,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, XSA: tl.constexpr,
    SEGMENTS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key tile, batch * KV head); it loops over the KV head's GROUP query heads,
    # so K and V are loaded once for all of them and dK/dV need no atomics.
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // HKV).to(tl.int64)  # batch offsets (b * stride_b) can pass 2**31 elements
    kv_head = pid_bkv % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    row_base = b * T
    k = tl.load(
        K + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=col_ok[:, None], other=0.0,
    )  # [BLOCK_N, D]
    v = tl.load(
        V + b * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=col_ok[:, None], other=0.0,
    )
    # Queries that can see this tile: from its first key to the end of its last key's segment;
    # the query tiles after that are skipped, not masked.
    if SEGMENTS:
        q_end = tl.load(SEG_END + row_base + tl.minimum(start_n + BLOCK_N, T) - 1)
    else:
        q_end = T
    qk_scale = SM_SCALE * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = kv_head * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        du_base = DU + b * stride_dub + h * stride_duh
        dq_base = DQ_ACC + b * stride_dqb + h * stride_dqh
        stat_base = (b * H + h) * T
        # Query tiles overlapping this key tile need the causal mask; rows at or past
        # start_n + BLOCK_N see every key of the tile (but for segment starts).
        for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, q_end), BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, du_base, dq_base, LSE + stat_base, DELTA + stat_base, SEG_START + row_base,
                stride_qt, stride_dut, stride_dqt, start_m, offs_n, offs_d, T, qk_scale, SM_SCALE,
                DIAGONAL=True, SEGMENTS=SEGMENTS, ATOMIC_DQ=ATOMIC_DQ, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
            )
        # One loop, segment mask on every tile: split into unmasked and masked query tiles as the
        # forward's key tiles are, it made ptxas spill 8-32 B in three 4-stage configs.
        for start_m in range(start_n + BLOCK_N, q_end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, du_base, dq_base, LSE + stat_base, DELTA + stat_base, SEG_START + row_base,
                stride_qt, stride_dut, stride_dqt, start_m, offs_n, offs_d, T, qk_scale, SM_SCALE,
                DIAGONAL=False, SEGMENTS=SEGMENTS, ATOMIC_DQ=ATOMIC_DQ, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
            )
    dk *= SM_SCALE
    if XSA:
        dv += tl.load(
            DV_SELF + b * stride_sb + kv_head * stride_sh + offs_n[:, None] * stride_st + offs_d[None, :],
            mask=col_ok[:, None], other=0.0,
        )
    tl.store(
        DK + b * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=col_ok[:, None],
    )
    tl.store(
        DV + b * stride_dvb + kv_head * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=col_ok[:, None],
    )


@triton.jit
def _dq_step(
    dq, q, du, lse2, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T, qk_scale,
    DIAGONAL: tl.constexpr, SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile's contribution to a query tile's dQ (unscaled)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv_tile(k_base, v_base, stride_kt, stride_vt, offs_n, offs_d, T, DIAGONAL)  # [BLOCK_N, D] each
    p = tl.exp2(_dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale - lse2[:, None])
    if DIAGONAL or SEGMENTS:
        p = tl.where(_visible(offs_m[:, None], offs_n[None, :], seg_lo[:, None], T, DIAGONAL, SEGMENTS), p, 0.0)
    dp = _dot(du, tl.trans(v), None, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, None, DOT_PRECISION)
    return dq


@triton.jit
def _xsa_bwd_dq_kernel(
    Q, K, V, DU, LSE, DELTA, SEG_START, DQ,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dub, stride_dut, stride_duh,
    stride_dqb, stride_dqt, stride_dqh,
    T, H,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, XSA: tl.constexpr,
    SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The deterministic mode's dQ: one program per (query tile, query head), no atomics.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query tiles first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # batch offsets (b * stride_b) can pass 2**31 elements
    h = pid_bh % H
    kv_head = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    row_base = b * T
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    du = tl.load(
        DU + b * stride_dub + h * stride_duh + offs_m[:, None] * stride_dut + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )
    stat = pid_bh * T + offs_m
    lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
    if SEGMENTS:
        seg_lo = tl.load(SEG_START + row_base + offs_m, mask=row_ok, other=0)
    else:
        seg_lo = offs_m  # unused
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    qk_scale = SM_SCALE * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Stage 1: key tiles left of the diagonal from the first the segments reach; stage 2: the diagonal tiles.
    for start_n in range(_first_key_tile(SEG_START, row_base, start_m, BLOCK_N, SEGMENTS), start_m, BLOCK_N):
        dq = _dq_step(
            dq, q, du, lse2, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T,
            qk_scale, DIAGONAL=False, SEGMENTS=SEGMENTS, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_step(
            dq, q, du, lse2, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, seg_lo, T,
            qk_scale, DIAGONAL=True, SEGMENTS=SEGMENTS, DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
        )
    dq *= SM_SCALE
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=row_ok[:, None],
    )


_FWD = autotune_pair(_xsa_fwd_kernel, _FWD_CONFIGS, _TUNE_KEY)
# The one-pass backward adds into DQ_ACC: each config the autotuner times starts it from zeros again.
_DKDV = AutotunePair(
    triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ_ACC"])(_xsa_bwd_dkdv_kernel),
    triton.autotune(configs=_DKDV_CONFIGS[-1:], key=_TUNE_KEY + ["ATOMIC_DQ"])(_xsa_bwd_dkdv_kernel),
)
_DQ = autotune_pair(_xsa_bwd_dq_kernel, _DQ_CONFIGS, _TUNE_KEY)

# --------------------------------------------------------------------------- launch wrappers


def _check_inputs(q, k, v, cu_seqlens=None, gate=None) -> None:
    where = "xsa_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{where}: q, k, v must be 4-D [B, T, H, D] / [B, T, Hkv, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}; reshape them to that layout"
        )
    B, T, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"{where}: k and v must both be [B, T, Hkv, D] = [{B}, {T}, Hkv, {D}] to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}; pass matching tensors"
        )
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{where}: {H} query heads are not a multiple of {Hkv} KV heads; use H divisible by Hkv")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{where}: head dim {D} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if T == 0 or B == 0:
        raise ValueError(f"{where}: got an empty batch or sequence {tuple(q.shape)}; pass at least one token")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where}: q, k, v must share one dtype among fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}; cast them"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v live on {q.device}, {k.device}, {v.device}; move them to one device")
    if gate is not None:
        if tuple(gate.shape) != (B, T, H) or not gate.dtype.is_floating_point:
            raise ValueError(
                f"{where}: gate must be a float tensor [B, T, H] = [{B}, {T}, {H}], got {gate.dtype} "
                f"{tuple(gate.shape)}; pass one pre-sigmoid value per token and query head"
            )
        if gate.device != q.device:
            raise ValueError(f"{where}: gate lives on {gate.device}, q on {q.device}; move it to q's device")
    if cu_seqlens is not None:
        reference.check_cu_seqlens(cu_seqlens, B, T, where)
        if cu_seqlens.device != q.device:
            raise ValueError(f"{where}: cu_seqlens lives on {cu_seqlens.device}, q on {q.device}; move it to q's device")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernel can index it by strides (unit last stride, no broadcast dims),
    else a contiguous copy; gradients arrive expanded with zero strides."""
    broadcast = any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape))
    return x.contiguous() if broadcast or x.stride(-1) != 1 else x


def _bth_strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _meta(q: torch.Tensor, k: torch.Tensor, xsa: bool, cu_seqlens, gate) -> dict:
    D = q.shape[3]
    return dict(
        GROUP=q.shape[2] // k.shape[2],
        HEAD_DIM=D,
        SM_SCALE=float(D) ** -0.5,
        XSA=bool(xsa),
        SEGMENTS=cu_seqlens is not None,
        DOT_PRECISION=dot_precision(q.dtype),
    )


def segment_bounds(cu_seqlens: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end): int32 [B * T], the row-local first token of each token's segment and one past
    its last; segments are cut at row starts whether or not cu_seqlens lists them. Clamped so that
    every token lies in its own range even for offsets the cheap check lets through on a GPU."""
    tokens = torch.arange(B * T, device=cu_seqlens.device, dtype=torch.int32)
    row_start = tokens - tokens % T
    after = torch.searchsorted(cu_seqlens, tokens, right=True)  # offsets <= token; [B * T] int64
    last = cu_seqlens.numel() - 1
    start = torch.maximum(cu_seqlens[(after - 1).clamp(0, last)], row_start).minimum(tokens)
    end = torch.minimum(cu_seqlens[after.clamp(max=last)], row_start + T).maximum(tokens + 1)
    end = torch.where(after > last, row_start + T, end)  # past the last offset: to the row's end
    return (start - row_start).to(torch.int32), (end - row_start).to(torch.int32)


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("golf::xsa_attention_fwd", mutates_args=())
def xsa_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    xsa: bool,
    cu_seqlens: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y [B, T, H, D] (q's dtype, gated), c = u . v_hat [B, H, T] fp32 (before the gate; zeros
    without XSA), lse [B, H, T] fp32. `deterministic` is the backward's; the forward has no atomics."""
    _check_inputs(q, k, v, cu_seqlens, gate)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, T, H, D = q.shape
    y = new_output((B, T, H, D), q.dtype, q.device)
    c = new_output((B, H, T), torch.float32, q.device)
    lse = new_output((B, H, T), torch.float32, q.device)
    seg_start = segment_bounds(cu_seqlens, B, T)[0] if cu_seqlens is not None else q
    gated = gate if gate is not None else q

    group = H // k.shape[2]

    def grid(meta):
        heads = meta["HEADS"] if group % meta["HEADS"] == 0 else 1  # the kernel's PACKED
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H // heads)

    wrap_triton(_FWD.pick(q.dtype, T, TUNE_MIN_T))[grid](
        q, k, v, gated, seg_start, y, c, lse,
        *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *(_bth_strides(gate) if gate is not None else (0, 0, 0)),
        *_bth_strides(y),
        T, H, GATED=gate is not None, **_meta(q, k, xsa, cu_seqlens, gate),
    )
    return y, c, lse


@torch.library.triton_op("golf::xsa_attention_bwd", mutates_args=())
def xsa_attention_bwd_op(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    c: torch.Tensor,
    lse: torch.Tensor,
    xsa: bool,
    cu_seqlens: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq, dk, dv, dgate of xsa_attention from the forward's y, c, lse and the output
    gradient dy (dgate: gate's shape and dtype; empty without a gate). deterministic: the two-kernel
    path (dK/dV, then dQ) with no atomics, else one pass adding dQ into an fp32 buffer."""
    _check_inputs(q, k, v, cu_seqlens, gate)
    dy, q, k, v, y = _rows(dy), _rows(q), _rows(k), _rows(v), _rows(y)
    c, lse = c.contiguous(), lse.contiguous()
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    meta = _meta(q, k, xsa, cu_seqlens, gate)
    gated = gate is not None
    delta = new_output((B, H, T), torch.float32, q.device)
    if xsa or gated:
        du = new_output((B, T, H, D), q.dtype, q.device)  # the output gradient seen before gate and projection
    else:
        du = dy
    dv_self = new_output((B, T, Hkv, D), torch.float32, q.device) if xsa else delta  # never read without XSA
    dgate = new_output(gate.shape, gate.dtype, q.device) if gated else new_output((0,), torch.float32, q.device)
    if cu_seqlens is not None:
        seg_start, seg_end = segment_bounds(cu_seqlens, B, T)
    else:
        seg_start = seg_end = q  # never read

    wrap_triton(_xsa_bwd_preprocess_kernel)[(triton.cdiv(T, _PREPROCESS_BLOCK_T), B * Hkv)](
        dy, y, v, c, gate if gated else q, du, delta, dgate if gated else q, dv_self,
        *_bth_strides(dy), *_bth_strides(y), *_bth_strides(v),
        *(_bth_strides(gate) if gated else (0, 0, 0)), *_bth_strides(du),
        *(_bth_strides(dv_self) if xsa else (0, 0, 0)),
        T, H, Hkv,
        GROUP=meta["GROUP"], HEAD_DIM=D, XSA=meta["XSA"], GATED=gated, BLOCK_T=_PREPROCESS_BLOCK_T,
        num_warps=4,
    )

    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if deterministic:
        dq = new_output((B, T, H, D), q.dtype, q.device)
        dq_acc = dq  # never written by the dK/dV kernel
    else:
        dq_acc = torch.zeros((B, T, H, D), dtype=torch.float32, device=q.device)

    def dkdv_grid(meta):
        return (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)

    wrap_triton(_DKDV.pick(q.dtype, T, TUNE_MIN_T))[dkdv_grid](
        q, k, v, du, lse, delta, dv_self, seg_start, seg_end, dk, dv, dq_acc,
        *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(du),
        *(_bth_strides(dv_self) if xsa else (0, 0, 0)),
        *_bth_strides(dk), *_bth_strides(dv), *_bth_strides(dq_acc),
        T, H, Hkv, ATOMIC_DQ=not deterministic, **meta,
    )
    if not deterministic:
        dq = dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)
        return dq, dk, dv, dgate

    def dq_grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    wrap_triton(_DQ.pick(q.dtype, T, TUNE_MIN_T))[dq_grid](
        q, k, v, du, lse, delta, seg_start, dq,
        *_bth_strides(q), *_bth_strides(k), *_bth_strides(v), *_bth_strides(du), *_bth_strides(dq),
        T, H, **meta,
    )
    return dq, dk, dv, dgate


# --------------------------------------------------------------------------- CPU fallbacks and fakes
# The eager twins: the CPU path without the interpreter (see kernels._launch.register_cpu_and_fake),
# and an independent statement of the same math that tests check against autograd of the reference.
# They materialise T x T: fine for a fallback, never used on a GPU.


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, T, Hkv, D] -> [B, H, T, D]


def _probs(q, k, cu_seqlens, lse=None):
    """Attention probabilities [B, H, T, T] and the natural log-sum-exp [B, H, T] (or use the given one)."""
    B, T, H, D = q.shape
    scores = (q.transpose(1, 2) @ _expand_kv(k, H // k.shape[2]).transpose(-1, -2)) * D**-0.5
    if cu_seqlens is None:
        visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        visible = reference.segment_mask(cu_seqlens, B, T)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def xsa_attention_fwd_eager(q, k, v, xsa: bool, cu_seqlens=None, gate=None, deterministic=False):
    """(y, c, lse) exactly as the forward kernel defines them, computed with torch ops."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32 = q.to(compute), k.to(compute), v.to(compute)
    group = q.shape[2] // k.shape[2]
    p, lse = _probs(q32, k32, cu_seqlens)
    u = p @ _expand_kv(v32, group)  # [B, H, T, D]
    if xsa:
        v_hat = F.normalize(_expand_kv(v32, group), dim=-1, eps=reference.XSA_NORM_EPS)
        c = (u * v_hat).sum(-1)
        y = u - c.unsqueeze(-1) * v_hat
    else:
        c = torch.zeros_like(lse)
        y = u
    if gate is not None:
        y = y * reference.output_gate(gate).to(compute).transpose(1, 2).unsqueeze(-1)
    stat_dtype = torch.float64 if compute == torch.float64 else torch.float32  # fp64 only in derivation tests
    return y.transpose(1, 2).to(q.dtype).contiguous(), c.to(stat_dtype), lse.to(stat_dtype)


def xsa_attention_bwd_eager(dy, q, k, v, y, c, lse, xsa: bool, cu_seqlens=None, gate=None, deterministic=False):
    """(dq, dk, dv, dgate) from the saved (y, c, lse), by the formulas in the module docstring."""
    compute = torch.promote_types(q.dtype, torch.float32)
    dy, q32, k32, v32, y = (t.to(compute) for t in (dy, q, k, v, y))
    c, lse = c.to(compute), lse.to(compute)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    group = H // Hkv
    vh = _expand_kv(v32, group)  # [B, H, T, D]
    dyh, yh = dy.transpose(1, 2), y.transpose(1, 2)
    s = 1.0 if gate is None else reference.output_gate(gate).to(compute).transpose(1, 2).unsqueeze(-1)
    delta = (dyh * yh).sum(-1, keepdim=True)  # [B, H, T, 1]
    if xsa:
        v_hat = F.normalize(vh, dim=-1, eps=reference.XSA_NORM_EPS)
        dy_dot_vhat = (dyh * v_hat).sum(-1, keepdim=True)
        du = s * (dyh - dy_dot_vhat * v_hat)
        sc = s * c.unsqueeze(-1)
        dv_hat = -(sc * dyh + dy_dot_vhat * (yh + sc * v_hat))
        dv_hat = dv_hat.view(B, Hkv, group, T, D).sum(2)  # [B, Hkv, T, D]
        v_kv = v32.transpose(1, 2)
        true_norm = v_kv.norm(dim=-1, keepdim=True)
        norm = true_norm.clamp_min(reference.XSA_NORM_EPS)
        vk_hat = v_kv / norm
        tangent = (dv_hat - (dv_hat * vk_hat).sum(-1, keepdim=True) * vk_hat) / norm
        dv_self = torch.where(true_norm > reference.XSA_NORM_EPS, tangent, dv_hat / reference.XSA_NORM_EPS)
    else:
        du = s * dyh
    p, _ = _probs(q32, k32, cu_seqlens, lse)
    dp = du @ vh.transpose(-1, -2)
    ds = p * (dp - delta) * D**-0.5
    dq = ds @ _expand_kv(k32, group)  # [B, H, T, D]
    dk = (ds.transpose(-1, -2) @ q32.transpose(1, 2)).view(B, Hkv, group, T, D).sum(2)
    dv = (p.transpose(-1, -2) @ du).view(B, Hkv, group, T, D).sum(2)
    if xsa:
        dv = dv + dv_self
    if gate is None:
        dgate = q.new_empty((0,), dtype=torch.float32)
    else:
        dgate = ((1 - s) * delta).squeeze(-1).transpose(1, 2).to(gate.dtype).contiguous()
    return (
        dq.transpose(1, 2).to(q.dtype).contiguous(),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
        dgate,
    )


def _xsa_attention_fwd_fake(q, k, v, xsa, cu_seqlens, gate, deterministic):
    _check_inputs(q, k, v, cu_seqlens, gate)
    B, T, H, D = q.shape
    stat = q.new_empty((B, H, T), dtype=torch.float32)
    return q.new_empty(q.shape), stat, stat.new_empty(stat.shape)


def _xsa_attention_bwd_fake(dy, q, k, v, y, c, lse, xsa, cu_seqlens, gate, deterministic):
    _check_inputs(q, k, v, cu_seqlens, gate)
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


register_cpu_and_fake(xsa_attention_fwd_op, reference=xsa_attention_fwd_eager, fake=_xsa_attention_fwd_fake)
register_cpu_and_fake(xsa_attention_bwd_op, reference=xsa_attention_bwd_eager, fake=_xsa_attention_bwd_fake)

# --------------------------------------------------------------------------- autograd


def _xsa_attention_fwd_setup_context(ctx, inputs, output):
    q, k, v, xsa, cu_seqlens, gate, deterministic = inputs
    y, c, lse = output
    ctx.save_for_backward(q, k, v, y, c, lse, cu_seqlens, gate)
    ctx.xsa, ctx.deterministic = xsa, deterministic


def _xsa_attention_fwd_backward(ctx, dy, _dc, _dlse):
    # c and lse are statistics for the backward, not outputs anyone differentiates.
    q, k, v, y, c, lse, cu_seqlens, gate = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dgate = xsa_attention_bwd_op(dy, q, k, v, y, c, lse, ctx.xsa, cu_seqlens, gate, ctx.deterministic)
    return dq, dk, dv, None, None, dgate if gate is not None else None, None


xsa_attention_fwd_op.register_autograd(_xsa_attention_fwd_backward, setup_context=_xsa_attention_fwd_setup_context)

# --------------------------------------------------------------------------- public API


def xsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    xsa: bool = False,
    cu_seqlens: torch.Tensor = None,
    gate: torch.Tensor = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal GQA attention, q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]: the XSA projection when xsa,
    document isolation by cu_seqlens, each head's output times sigmoid(gate [B,T,H]); exactly
    kernels.reference.xsa_attention. deterministic=True: the same gradient bits every run."""
    return xsa_attention_fwd_op(q, k, v, bool(xsa), cu_seqlens, gate, bool(deterministic))[0]


TRITON_IMPLS = {"xsa_attention": xsa_attention}
