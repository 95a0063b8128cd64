"""Eager PyTorch references for every kernel: short, plain, written from SPEC.md.

They are the ground truth the tests compare the Triton kernels with, and the `reference`
backend of the model. Each computes in the dtype of its inputs (call it with fp64 inputs for
an exact answer, with bf16 inputs for "what PyTorch itself gets in bf16").
"""
import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- attention

XSA_NORM_EPS = 1e-12  # F.normalize's floor on ||v||: v_hat = v / max(||v||, eps)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, where: str = "xsa_attention") -> None:
    """cu_seqlens must be int32 offsets into the B*T tokens taken row by row: 1-D, 0 first, B*T last.

    Dtype, rank and device class are metadata and always checked. The first and last values are
    read only from a CPU tensor outside torch.compile: on a GPU reading them would be a device
    sync in the training step, and under torch.compile a graph break. (Sortedness and the row
    starts are not checked; segments are cut at row starts whether or not they are listed.)
    """
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{where}: cu_seqlens must be a 1-D int32 tensor of at least 2 offsets, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}; pass torch.tensor([0, ..., B*T], dtype=torch.int32)"
        )
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling() and not _is_fake(cu_seqlens):
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != B * T:
            raise ValueError(
                f"{where}: cu_seqlens must run from 0 to B*T = {B * T}, got {first} .. {last}; "
                f"offsets are into the {B}x{T} tokens taken row by row"
            )


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def segment_mask(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[B, T, T] bool: query t may see key s of its row when s <= t and both lie in one segment.

    Segment of flattened token i = b*T + t: the number of offsets <= i (repeated trailing B*T
    entries are empty segments and count for no token)."""
    tokens = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, tokens, right=True).view(B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
    return causal & (segment[:, :, None] == segment[:, None, :])


def xsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    xsa: bool = False,
    cu_seqlens: torch.Tensor = None,
    gate: torch.Tensor = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal GQA attention with an explicit softmax, then the optional XSA projection and output gate.

    q [B, T, H, D]; k, v [B, T, Hkv, D] with H a multiple of Hkv; scale 1/sqrt(D).
    cu_seqlens (int32 offsets into the B*T tokens, see check_cu_seqlens): a query sees only keys
    at or before it in its own segment; None: plain causal per row.
    XSA: y <- y - (y . v_hat) v_hat, v_hat = v / ||v|| of the KV head serving the query head,
    at the query's own position.
    gate [B, T, H] (pre-sigmoid, any float dtype): y[b, t, h] <- sigmoid(gate[b, t, h]) * y[b, t, h]
    after XSA, the sigmoid in at least fp32. `deterministic` is the kernels' switch; eager already is.
    Returns [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q.shape
    group = H // k.shape[2]
    qh = q.transpose(1, 2)  # [B, H, T, D]
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)  # [B, H, T, T]
    if cu_seqlens is None:
        visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        check_cu_seqlens(cu_seqlens, B, T)
        visible = segment_mask(cu_seqlens, B, T)[:, None]  # [B, 1, T, T]
    scores = scores.masked_fill(~visible, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vh  # [B, H, T, D]
    if xsa:
        y = xsa_project(y, vh)
    if gate is not None:
        y = y * output_gate(gate).transpose(1, 2).unsqueeze(-1)
    return y.transpose(1, 2).to(q.dtype)


def output_gate(gate: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate) computed in fp32 (fp64 for fp64 gates)."""
    return torch.sigmoid(gate.to(torch.promote_types(gate.dtype, torch.float32)))


def xsa_project(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Remove from y its component along v / ||v|| (last dim); v broadcast to y's shape."""
    v_hat = F.normalize(v, dim=-1, eps=XSA_NORM_EPS)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def xsa_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xsa: bool = False, gate: torch.Tensor = None
) -> torch.Tensor:
    """The practical baseline without segments: PyTorch SDPA (flash backend on a GPU) plus the
    eager XSA projection and output gate."""
    group = q.shape[2] // k.shape[2]
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=group > 1
    )  # [B, H, T, D]
    if xsa:
        vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
        y = xsa_project(y, vh)
    if gate is not None:
        y = (y * output_gate(gate).transpose(1, 2).unsqueeze(-1)).to(q.dtype)
    return y.transpose(1, 2)


# --------------------------------------------------------------------------- int6 fake-quant

INT6_MIN, INT6_MAX = -32, 31


def int6_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (over the last dim) symmetric int6, as the exporter stores it.

    scale = max(row_absmax / 31, 1/31), rounded to fp16; q = clamp(round(w / scale), -32, 31).
    Returns q as int8 with w's shape and the fp16 scales with w's shape minus the last dim.
    """
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1) / INT6_MAX).clamp_min(1.0 / INT6_MAX).to(torch.float16)
    q = torch.clamp(torch.round(w32 / scale.float().unsqueeze(-1)), INT6_MIN, INT6_MAX).to(torch.int8)
    return q, scale


def int6_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = q.float() * scale.float().unsqueeze(-1)
    # No same-dtype .to(): it returns its input, and under torch.compile torch 2.11 then gives
    # _StraightThrough (below) an all-zero gradient.
    return out if dtype == torch.float32 else out.to(dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return int6_dequantize(*int6_quantize(w), dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def int6_fakequant(w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantise-dequantise w per row exactly as the export does, in out_dtype (default w's); the
    gradient passes straight through."""
    out = _StraightThrough.apply(w)
    return out if out_dtype is None else out.to(out_dtype)


# --------------------------------------------------------------------------- BigramHash

BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191


def bigram_hash(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket of each position: ids [..., T] (each row its own sequence) -> int64 [..., T].

    Position 0 takes the last bucket (buckets - 1); position t > 0 takes
    (36313 * id[t] XOR 27191 * id[t-1]) mod (buckets - 1), in int32 arithmetic.
    """
    cur = ids.to(torch.int32)
    prev = torch.roll(cur, 1, dims=-1)
    mixed = torch.bitwise_xor(BIGRAM_MUL_CUR * cur, BIGRAM_MUL_PREV * prev) % (buckets - 1)
    mixed[..., 0] = buckets - 1
    return mixed.long()


def bigram_embed(ids: torch.Tensor, table: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Rows of table [buckets, D] at the BigramHash buckets of ids: [..., T] -> [..., T, D]. (Eager gather is deterministic.)"""
    return F.embedding(bigram_hash(ids, table.shape[0]), table)


# --------------------------------------------------------------------------- Newton-Schulz

QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
# FRONTIER.md section 3: Muon's five Polar-Express steps, one (a, b, c) triple per step; the scalar
# map sigma -> a sigma + b sigma^3 + c sigma^5, applied five times, sends [1e-3, 1] into [0.8589, 1.1411].
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_NORM_EPS = 1e-7  # X = G / (||G||_F + eps)


def per_step_coeffs(steps: int, coeffs) -> list[tuple[float, float, float]]:
    """One (a, b, c) triple per step from either one triple or a list of `steps` triples."""
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        return [tuple(float(c) for c in coeffs)] * steps
    triples = [tuple(float(c) for c in t) for t in coeffs]
    if len(triples) != steps or any(len(t) != 3 for t in triples):
        raise ValueError(f"newton_schulz: coeffs must be one (a, b, c) triple or {steps} of them, got {coeffs!r}")
    return triples


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coeffs=QUINTIC_COEFFS, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximate orthogonalisation of G [..., m, n] by the quintic Newton-Schulz iteration.

    X = G / ||G||_F (per matrix), on the wide orientation (m <= n, transposed back at the end);
    each step: A = X X^T, B = b A + c A A, X = a X + B X. Runs and returns in compute_dtype.
    """
    X = G.to(compute_dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_NORM_EPS)
    for a, b, c in per_step_coeffs(steps, coeffs):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# --------------------------------------------------------------------------- loss head

IGNORE_INDEX = -100  # F.cross_entropy's default: such a target has loss 0 and no gradient


def softcap_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 30.0
) -> torch.Tensor:
    """Per-token NLL (fp32) of the soft-capped tied head: x [N, d], weight [V, d], targets [N] -> [N].

    logits = softcap * tanh((x @ weight^T) / softcap), cross-entropy in fp32 (fp64 for fp64 inputs).
    """
    logits = (x @ weight.to(x.dtype).T).to(torch.promote_types(x.dtype, torch.float32))
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets.long(), reduction="none", ignore_index=IGNORE_INDEX)


def softcap_cross_entropy_lora(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    scale: float, softcap: float = 30.0,
) -> torch.Tensor:
    """Per-token NLL (fp32) of the soft-capped tied head plus a per-document LoRA on the logits
    (FRONTIER.md section 5, the phased TTT's lm_head adapter): x [B, T, d], weight [V, d],
    targets [B, T], lora_a [B, r, d], lora_b [B, V, r] -> [B, T].

    u = (x @ lora_a_b^T) * scale [B, T, r] in x's dtype; logits = softcap * tanh((x @ weight^T + u @ lora_b_b^T)
    / softcap), the products and their sum in x's dtype; cross-entropy in fp32 (fp64 for fp64 inputs).
    """
    u = (torch.bmm(x, lora_a.to(x.dtype).transpose(1, 2)) * scale).to(x.dtype)  # [B, T, r]
    raw = x @ weight.to(x.dtype).T + torch.bmm(u, lora_b.to(x.dtype).transpose(1, 2))  # [B, T, V]
    logits = raw.to(torch.promote_types(x.dtype, torch.float32))
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1).long(), reduction="none",
                           ignore_index=IGNORE_INDEX).view(targets.shape)


# --------------------------------------------------------------------------- MLP


def leaky_relu2(h: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """phi(h) = leaky_relu(h, negative_slope)^2 in h's dtype: relu(h)^2 at slope 0.0 (SPEC), h^2 for
    h > 0 and (slope * h)^2 otherwise, so phi'(h) = 2h or 2 slope^2 h (FRONTIER.md: slope 0.5).

    Rounding chain in h's dtype: l = round(leaky(h)), then round(l^2). Slope 0.0 is torch.relu
    itself, not leaky_relu with a zero slope, which differs at the edges (leaky_relu(-inf, 0.0) is
    NaN, and its backward gives -0.0 for a negative gradient where h <= 0): the seed's bits stay."""
    act = torch.relu(h) if negative_slope == 0.0 else F.leaky_relu(h, negative_slope)
    return act.square()


def relu2_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """The block's MLP: leaky_relu2(x @ w_up^T) @ w_down^T, x [..., d], w_up [F, d], w_down [d, F] -> [..., d].

    negative_slope 0.0 is SPEC's relu^2, 0.5 FRONTIER.md's LeakyReLU(0.5)^2. Every intermediate is a
    tensor of x's dtype, as in the model's eager code: h = round(x @ w_up^T), l = round(leaky(h)),
    a = round(l^2), y = round(a @ w_down^T).
    """
    return F.linear(leaky_relu2(F.linear(x, w_up), negative_slope), w_down)
