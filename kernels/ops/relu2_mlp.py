"""The squared-activation MLP with the activation fused into the GEMMs: a = phi(h) is never stored.

    h = x @ w_up^T          a = phi(h) = leaky_relu(h, slope)^2          y = a @ w_down^T
    x [N, d], w_up [F, d], w_down [d, F]; every tensor in x's dtype (fp32, bf16 or fp16)
    phi(h) = h^2 for h > 0, (slope h)^2 otherwise;   phi'(h) = 2h for h > 0, 2 slope^2 h otherwise

One family for every negative slope: 0.0 is SPEC's relu^2 (the default, bit for bit what it was
before the slope existed), 0.5 FRONTIER.md's LeakyReLU(0.5)^2 (0.25 h^2 and phi' = 0.5 h for
h <= 0). The slope is a Python float fixed when the model is built; the kernels take it as a
constexpr (NEGATIVE_SLOPE), so each slope compiles its own variant and slope 0 the seed's code.

Rounding is the eager reference's (kernels.reference.relu2_mlp), FRONTIER.md's chain: h, then
l = leaky(h), then a = l^2, each rounded to x's dtype, every step computed in fp32 as torch's
low-precision pointwise ops do. The backward follows autograd of that chain step by step (see
the epilogue). What a torch.compile'd reference spends beyond the GEMMs is the [N, F] pointwise
traffic (302 MB per tensor at N = 98,304, F = 1536 in bf16; 403 MB at FRONTIER.md's F = 2048):
phi in the forward, and in the backward da written and read back, dh = phi'(h) da, and a
recomputed for dW_down. Here all of it rides inside the GEMMs.

One Triton GEMM, C[M, N] = pro(A)[M, K] @ B[K, N], with any strides (so transposed views
are free), fp32 accumulation, grouped tile order for L2 reuse, and two switches:
    RELU2_A             prologue: the A tile becomes phi(t) = round(round(leaky(t))^2) before tl.dot
                        (the inner rounding left out where it cannot change a bit of phi: slope 0
                        or a power of two such as 0.5; _leaky_rounding_matters says why)
    EPILOGUE_DRELU2     epilogue: da = round(acc); C = phi'(E) da, rounded as autograd rounds it:
                        round(da * 2 relu(E)), 0 where E <= 0, at slope 0; else
                        g = round(da * round(2 round(leaky(E)))) and C = g, or round(g * slope) where E <= 0
and split-K (program_id 2 takes one contiguous K range and writes its own fp32 partial [M, N];
a torch sum adds them: deterministic, no atomics).

Forward (`golf::relu2_mlp_fwd`, relu2_mlp_fwd_op): h = x @ w_up^T by cuBLAS (torch op in the body), then
y = phi(h) @ w_down^T with the prologue on A. Saved: x, h, w_up, w_down (not a); the slope on ctx.
Backward (`golf::relu2_mlp_bwd`, relu2_mlp_bwd_op), given dy [N, d]:
    dh         = phi'(h) (dy @ w_down)     GEMM with the epilogue (h read in the epilogue)
    dW_down^T  = phi(h)^T @ dy             GEMM with the prologue on A = h^T, split-K over the tokens
    dx = dh @ w_up,  dW_up = dh^T @ x      cuBLAS
dW_down's output is only [d, F] (48 tiles of 128 x 128 at the model shape, fewer than the
H100's 132 SMs) while its K = N is long, hence split-K there. It is computed transposed, with
phi on the A operand, because compiled for sm_90a that form keeps the activated tile in
registers as wgmma's A operand and spills in no config (at slopes 0 and 0.5), where dy^T @ phi(h)
(prologue on B, which wgmma must read from shared memory) spilled at 128 x 256.
FLOPs: forward 4NdF (2 GEMMs), backward 8NdF (4 GEMMs), nothing recomputed beyond a.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._launch import INTERPRET, autotune_pair, new_output, num_sms, register_cpu_and_fake, wrap_triton
from kernels._numerics import _dot, dot_precision  # _dot: also right on bf16 in the interpreter
from kernels.reference import leaky_relu2

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Split-K of the dW_down GEMM: None picks it from the shape (_split_k); tests set an int to force it.
SPLIT_K_OVERRIDE = None
MAX_SPLIT_K = 16  # bounds the fp32 partials ([split, F, d]) and their sum; the model's shape picks 11
MIN_K_PER_SPLIT = 16 if INTERPRET else 2048  # rows of K a split must have to pay for its own tile write

# --------------------------------------------------------------------------- tile configurations
# On a GPU a short Hopper-minded autotune list (checked for shared memory, registers and wgmma
# with bench.sm90_compile's helpers); in the interpreter one small config, so the small test
# shapes are ragged in M, N and K and cross several tile groups. fp32 operands and small
# products take one fixed config (kernels._launch.AutotunePair).


def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m), num_warps=warps, num_stages=stages)


# bf16 on sm_90a, all three launches (y, dh, dW_down^T): wgmma, 0 spills, <= 192 KiB shared.
# 256 x 128 tiles were left out: the forward's A-in-registers prologue spills there (48 B).
GPU_GEMM_CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
    _config(128, 256, 64, 8, 3),
    _config(128, 256, 64, 8, 4),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 8, 5),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
]
# Also spill-free for fp32 operands (IEEE products on the FMA units), which bigger tiles are not.
GPU_FIXED_CONFIG = _config(64, 64, 32, 4, 3)
if INTERPRET:
    _GEMM_CONFIGS = [_config(32, 16, 16, 4, 1, group_m=2)]
    _FIXED_CONFIG = _GEMM_CONFIGS[0]
else:
    _GEMM_CONFIGS, _FIXED_CONFIG = GPU_GEMM_CONFIGS, GPU_FIXED_CONFIG
_TUNE_KEY = ["M", "N", "K", "SPLIT_K", "RELU2_A", "EPILOGUE_DRELU2", "NEGATIVE_SLOPE"]
TUNE_MIN_MNK = 2**30  # M * N * K from which a 16-bit GEMM is autotuned (the model's are ~2^36)

# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _leaky(t32, NEGATIVE_SLOPE: tl.constexpr):
    """leaky_relu of an fp32 tensor as torch computes it: t if t > 0 else t * slope, and at slope 0
    torch.relu (`t < 0`, not `t > 0`, keeps a NaN a NaN and -inf gives 0, as torch.relu does)."""
    if NEGATIVE_SLOPE == 0.0:
        return tl.where(t32 < 0.0, 0.0, t32)
    else:
        return tl.where(t32 > 0.0, t32, t32 * NEGATIVE_SLOPE)


@triton.jit
def _relu2(t, NEGATIVE_SLOPE: tl.constexpr, ROUND_LEAKY: tl.constexpr):
    """round(round(leaky(t))^2) in t's dtype, each step in fp32 and rounded like torch's
    low-precision pointwise ops (kernels.reference.leaky_relu2). The inner rounding only where it
    can change the square (ROUND_LEAKY, _leaky_rounding_matters): not at slope 0 (the seed's
    instructions) nor at 0.5, whose A-in-registers prologue spilled with it (bench.sm90_compile)."""
    act = _leaky(t.to(tl.float32), NEGATIVE_SLOPE)
    if ROUND_LEAKY:
        act = act.to(t.dtype).to(tl.float32)
    return (act * act).to(t.dtype)


@triton.jit
def _relu2_gemm_kernel(
    A, B, C, E,
    M, N, K, SPLIT_K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cs, stride_cm, stride_cn,
    stride_em, stride_en,
    RELU2_A: tl.constexpr, EPILOGUE_DRELU2: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ROUND_LEAKY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # C[split, M, N] = pro(A)[M, K-range of split] @ B[K-range, N], epilogue optional.
    # Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), 1, SPLIT_K). E [M, N] is read only by the epilogue.
    pid = tl.program_id(0)
    split = tl.program_id(2)
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so the B panel they share
    # (and, along a group, the A panels) stays in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m

    # This split's K range: whole BLOCK_K steps, the last split ragged (or empty: it writes zeros).
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)

    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = row0 + rm < M
    n_ok = col0 + rn < N
    # int64 base offsets (N * F passes 2^31 at a few million tokens); in-tile offsets stay int32.
    a_ptrs = A + row0.to(tl.int64) * stride_am + k_start.to(tl.int64) * stride_ak
    a_ptrs = a_ptrs + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + k_start.to(tl.int64) * stride_bk + col0.to(tl.int64) * stride_bn
    b_ptrs = b_ptrs + rk[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = k + rk < k_end
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # phi(0) = 0: padding stays 0
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if RELU2_A:
            a = _relu2(a, NEGATIVE_SLOPE, ROUND_LEAKY)
        acc = _dot(a, b, acc, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE_DRELU2:
        # Eager autograd of leaky_relu2(h) in x's dtype: da = round(dy @ w_down); square's
        # backward g = round(da * round(2 l)) with l = round(leaky(h)) (2 l is exact unless it
        # overflows, so it is rounded too); then the activation's backward: relu's zeroes where
        # h <= 0, leaky_relu's is g if h > 0 else round(g * slope). So phi'(h) = 2h or 2 slope^2 h,
        # rounded step by step as torch does. At slope 0.5 the products by 0.5 and 2 are exact except
        # in the subnormals, where leaving a rounding out would change bits, so every slope keeps them.
        e_ptrs = E + row0.to(tl.int64) * stride_em + col0.to(tl.int64) * stride_en
        h = tl.load(e_ptrs + rm[:, None] * stride_em + rn[None, :] * stride_en, mask=mask, other=0.0)
        h32 = h.to(tl.float32)
        da = acc.to(C.dtype.element_ty).to(tl.float32)
        if NEGATIVE_SLOPE == 0.0:
            two_r = (2.0 * _leaky(h32, NEGATIVE_SLOPE)).to(h.dtype).to(tl.float32)
            acc = tl.where(h32 <= 0.0, 0.0, da * two_r)
        else:
            two_l = (2.0 * _leaky(h32, NEGATIVE_SLOPE).to(h.dtype).to(tl.float32)).to(h.dtype).to(tl.float32)
            g = (da * two_l).to(h.dtype).to(tl.float32)
            acc = tl.where(h32 > 0.0, g, g * NEGATIVE_SLOPE)
    c_ptrs = C + split.to(tl.int64) * stride_cs + row0.to(tl.int64) * stride_cm + col0.to(tl.int64) * stride_cn
    tl.store(c_ptrs + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


_GEMM = autotune_pair(_relu2_gemm_kernel, _GEMM_CONFIGS, _TUNE_KEY, fixed=_FIXED_CONFIG)

# --------------------------------------------------------------------------- launch wrappers


def _split_k(M: int, N: int, K: int, device) -> int:
    """How many K ranges the dW_down GEMM splits into. With at least a wave of output tiles,
    none; else the count (at most MAX_SPLIT_K, each range >= MIN_K_PER_SPLIT rows) that leaves
    the least of the last wave idle, counted in 128 x 128 tiles: for [512, 1536] (48 tiles) on
    132 SMs that is 11, exactly 4 waves (2 with 128 x 256 tiles)."""
    if SPLIT_K_OVERRIDE is not None:
        return int(SPLIT_K_OVERRIDE)
    sms = num_sms(device)
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    if tiles >= sms:
        return 1
    best, best_use = 1, 0.0
    for split in range(1, MAX_SPLIT_K + 1):
        if split > 1 and K < split * MIN_K_PER_SPLIT:
            break
        programs = tiles * split
        use = programs / (triton.cdiv(programs, sms) * sms)  # busy fraction of the SM-waves it takes
        if use > best_use + 1e-9:
            best, best_use = split, use
    return best


def _leaky_rounding_matters(negative_slope: float) -> bool:
    """Whether rounding l = leaky(t) to t's dtype before squaring can change round(l^2). Not for
    slope 0 (relu is exact), nor for a power of two: t * 2^k is exact in fp32 and stays so in t's
    dtype unless it falls below the dtype's smallest normal, where l^2 (< 2^-28 in fp16, < 2^-252
    in bf16) rounds to 0 either way; or it overflows, and then l^2 overflows either way."""
    return negative_slope != 0.0 and math.frexp(abs(negative_slope))[0] != 0.5


def _gemm(a, b, out, *, relu2_a=False, epilogue_h=None, negative_slope=0.0, split_k=1) -> None:
    """out = pro(a) @ b for a [M, K], b [K, N] (any strides); out [M, N], or fp32 [split_k, M, N]
    partials when split_k > 1; epilogue_h [M, N] switches the phi' epilogue on; negative_slope is
    the activation's (a compile-time constant: one kernel per slope)."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    e = epilogue_h if epilogue_h is not None else out3[0]  # never read without the epilogue

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1, split_k)

    wrap_triton(_GEMM.pick(a.dtype, M * N * K, TUNE_MIN_MNK))[grid](
        a, b, out3, e,
        M, N, K, split_k,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        out3.stride(0), out3.stride(1), out3.stride(2),
        e.stride(0), e.stride(1),
        RELU2_A=relu2_a, EPILOGUE_DRELU2=epilogue_h is not None,
        NEGATIVE_SLOPE=negative_slope, ROUND_LEAKY=_leaky_rounding_matters(negative_slope),
        DOT_PRECISION=dot_precision(a.dtype),
    )


def _no_autocast(x: torch.Tensor):
    """The ops compute in their inputs' dtype: autocast, which would turn an fp32 product into a
    bf16 one next to the Triton kernel's fp32 operands, is off inside them (the public function
    applies autocast's cast to the inputs instead, as F.linear would)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_inputs(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, where: str) -> None:
    if x.dim() < 1 or w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError(
            f"{where}: expected x [..., d], w_up [F, d] and w_down [d, F], got x {tuple(x.shape)}, "
            f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}; pass the weights as 2-D matrices."
        )
    d, hidden = x.shape[-1], w_up.shape[0]
    if w_up.shape[1] != d or tuple(w_down.shape) != (d, hidden):
        raise ValueError(
            f"{where}: with x [..., {d}] and w_up {tuple(w_up.shape)}, w_up must be [F, {d}] and w_down "
            f"[{d}, F] = ({d}, {hidden}), got w_up {tuple(w_up.shape)} and w_down {tuple(w_down.shape)}; "
            f"check the layer's in/out features."
        )
    if x.dtype not in SUPPORTED_DTYPES or not (x.dtype == w_up.dtype == w_down.dtype):
        raise TypeError(
            f"{where}: x, w_up and w_down must share one dtype among fp32, bf16 and fp16, got {x.dtype}, "
            f"{w_up.dtype} and {w_down.dtype}; cast the weights to x's dtype first."
        )


def _check_slope(negative_slope, where: str) -> None:
    # A Python number, because it becomes a compile-time constant of the kernels (one per slope).
    # Compared, not math.isfinite: Dynamo traces a float as symbolic until the op's call fixes it.
    finite = -math.inf < negative_slope < math.inf if isinstance(negative_slope, (int, float)) else False
    if isinstance(negative_slope, bool) or not finite:
        raise ValueError(
            f"{where}: negative_slope must be a finite Python float fixed at build time (0.0 for relu^2), "
            f"got {negative_slope!r}; pass the config's number, not a tensor."
        )


# --------------------------------------------------------------------------- ops


@torch.library.triton_op("golf::relu2_mlp_fwd", mutates_args=())
def relu2_mlp_fwd_op(
    x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d], w_up [F, d], w_down [d, F] -> (y [N, d], h = x @ w_up^T [N, F], saved for the backward)."""
    _check_inputs(x, w_up, w_down, "golf::relu2_mlp_fwd")
    _check_slope(negative_slope, "golf::relu2_mlp_fwd")
    if x.dim() != 2:
        raise ValueError(f"golf::relu2_mlp_fwd: x must be [N, d], got {tuple(x.shape)}; kernels.relu2_mlp flattens it")
    N, d = x.shape
    with _no_autocast(x):
        h = F.linear(x, w_up)  # cuBLAS; [N, F] in x's dtype
    y = new_output((N, d), x.dtype, x.device)
    _gemm(h, w_down.T, y, relu2_a=True, negative_slope=negative_slope)  # y = phi(h) @ w_down^T
    return y, h


@torch.library.triton_op("golf::relu2_mlp_bwd", mutates_args=())
def relu2_mlp_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [N, d], dw_up [F, d], dw_down [d, F]) from the output gradient dy [N, d] and the saved x, h."""
    _check_inputs(x, w_up, w_down, "golf::relu2_mlp_bwd")
    _check_slope(negative_slope, "golf::relu2_mlp_bwd")
    N, d = x.shape
    hidden = w_up.shape[0]
    dh = new_output((N, hidden), x.dtype, x.device)
    _gemm(dy, w_down, dh, epilogue_h=h, negative_slope=negative_slope)  # dh = phi'(h) * (dy @ w_down)
    # dW_down^T = phi(h)^T @ dy [F, d], split over the N tokens; the phi operand is A (see the
    # module docstring), and a fixed-order sum of the fp32 partials: deterministic.
    split_k = _split_k(hidden, d, N, x.device)
    partials = new_output((split_k, hidden, d), torch.float32, x.device)
    _gemm(h.T, dy, partials, relu2_a=True, negative_slope=negative_slope, split_k=split_k)
    dw_down = partials.sum(0).to(x.dtype).T.contiguous()
    with _no_autocast(x):
        dx = dh @ w_up  # [N, d]
        dw_up = dh.T @ x  # [F, d]
    return dx, dw_up, dw_down


# --------------------------------------------------------------------------- CPU fallbacks and fakes
# The eager twins, the CPU path without the interpreter (see kernels._launch.register_cpu_and_fake): the same
# formulas as the kernels, in torch ops and in the inputs' dtype.


def relu2_mlp_fwd_eager(x, w_up, w_down, negative_slope):
    with _no_autocast(x):
        h = F.linear(x, w_up)
        return F.linear(leaky_relu2(h, negative_slope), w_down), h


def relu2_mlp_bwd_eager(dy, x, h, w_up, w_down, negative_slope):
    with _no_autocast(x):
        da = dy @ w_down  # [N, F]
        if negative_slope == 0.0:
            dh = torch.where(h <= 0, 0.0, da * (2 * torch.relu(h)))
        else:  # the epilogue's steps: g = round(da * round(2 l)), then g or round(g * slope)
            g = da * (2 * F.leaky_relu(h, negative_slope))
            dh = torch.where(h > 0, g, g * negative_slope)
        dw_down = dy.T @ leaky_relu2(h, negative_slope)
        return dh @ w_up, dh.T @ x, dw_down


def _relu2_mlp_fwd_fake(x, w_up, w_down, negative_slope):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_up.shape[0]))


def _relu2_mlp_bwd_fake(dy, x, h, w_up, w_down, negative_slope):
    return x.new_empty(x.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)


register_cpu_and_fake(relu2_mlp_fwd_op, reference=relu2_mlp_fwd_eager, fake=_relu2_mlp_fwd_fake)
register_cpu_and_fake(relu2_mlp_bwd_op, reference=relu2_mlp_bwd_eager, fake=_relu2_mlp_bwd_fake)

# --------------------------------------------------------------------------- autograd


def _relu2_mlp_fwd_setup_context(ctx, inputs, output):
    x, w_up, w_down, negative_slope = inputs
    _y, h = output
    ctx.save_for_backward(x, h, w_up, w_down)
    ctx.negative_slope = negative_slope


def _relu2_mlp_fwd_backward(ctx, dy, _dh):
    # h is a saved activation that the public function never returns, not an output anyone differentiates.
    x, h, w_up, w_down = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dx, dw_up, dw_down = relu2_mlp_bwd_op(dy.to(x.dtype), x, h, w_up, w_down, ctx.negative_slope)
    return dx, dw_up, dw_down, None


relu2_mlp_fwd_op.register_autograd(_relu2_mlp_fwd_backward, setup_context=_relu2_mlp_fwd_setup_context)

# --------------------------------------------------------------------------- public API


def relu2_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """leaky_relu(x @ w_up^T, negative_slope)^2 @ w_down^T: x [..., d], w_up [F, d], w_down [d, F] -> [..., d],
    one dtype; slope 0.0 (relu^2, SPEC) or any other float fixed when the model is built (0.5, FRONTIER.md).

    Same semantics as kernels.reference.relu2_mlp (h, leaky(h) and a rounded to x's dtype),
    autocast included: under autocast the fp32/fp16/bf16 operands are cast to its dtype first, as
    F.linear's would be."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_up, w_down = (t.to(dtype) if t.dtype in SUPPORTED_DTYPES else t for t in (x, w_up, w_down))
    _check_inputs(x, w_up, w_down, "relu2_mlp")
    _check_slope(negative_slope, "relu2_mlp")
    y, _h = relu2_mlp_fwd_op(x.reshape(-1, x.shape[-1]), w_up, w_down, float(negative_slope))
    return y.reshape(x.shape)


TRITON_IMPLS = {"relu2_mlp": relu2_mlp}
