"""LQER: a low-rank correction of the quantisation error (FRONTIER.md section 4).

For the GPTQ tensors with the largest error E = W - q s (Frobenius norm), the rank-r SVD of E
(torch.linalg.svd, CPU, fp32: the int2 range is asymmetric, so the singular vectors' signs matter)
gives A = U[:, :r] diag(S[:r]) [rows, r] and B = Vᵀ[:r] [r, cols], stored quantised:
- asymmetric (LQER_ASYM_ENABLED): A in int2 with one fp16 scale s_A = max|A| / 1.5,
  q_A = clamp(round(A / s_A), -2, 1); B in int4 over groups of `group` consecutive row-major
  elements, s_g = fp16(max|g| / 7.5), q_B = clamp(round(g / s_g), -8, 7);
- when B.numel() is not a multiple of the group (or asymmetric is off): both factors symmetric
  per row, `factor_bits` bits, s = fp16(max|row| / R), q = clamp(round(x / s), -R, R), R = 2^(bits-1) - 1.
At load W = q s + (q_A s_A)(q_B s_B), computed in fp32.

Stored fields (int8 codes, fp16 scales): lqer_a, lqer_a_scale, lqer_b, lqer_b_scale; the scales'
shapes say the layout: A's scale is 0-D in the asymmetric form ([G] group scales for B), [rows]
per row (and [r] for B).
"""
import torch

INT2_LOW, INT2_HIGH, INT2_SCALE_DIVISOR = -2, 1, 1.5
INT4_LOW, INT4_HIGH, INT4_SCALE_DIVISOR = -8, 7, 7.5
FIELDS = ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale")


def _codes(x: torch.Tensor, scale: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """clamp(round(x / scale), low, high) as int8, 0 where the fp16 scale is 0 (an all-zero group)."""
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, torch.clamp(torch.round(x / safe), low, high), torch.zeros_like(x)).to(torch.int8)


def _per_row(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    R = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=1) / R).to(torch.float16)  # [rows]
    return _codes(x, scale[:, None], -R, R), scale


def factorize(E: torch.Tensor, rank: int, *, asym: bool = True, group: int = 64, factor_bits: int = 4) -> dict:
    """The quantised rank-`rank` factors of E [rows, cols] -> {lqer_a, lqer_a_scale, lqer_b, lqer_b_scale}."""
    E = E.detach().to("cpu", torch.float32)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    r = min(rank, S.numel())
    A = U[:, :r] * S[:r]  # [rows, r]
    B = Vh[:r].contiguous()  # [r, cols]
    if asym and B.numel() % group == 0:
        a_scale = (A.abs().amax() / INT2_SCALE_DIVISOR).to(torch.float16)  # one scale, shape []
        groups = B.reshape(-1, group)
        b_scale = (groups.abs().amax(dim=1) / INT4_SCALE_DIVISOR).to(torch.float16)  # [G]
        return dict(lqer_a=_codes(A, a_scale, INT2_LOW, INT2_HIGH), lqer_a_scale=a_scale,
                    lqer_b=_codes(groups, b_scale[:, None], INT4_LOW, INT4_HIGH).reshape(B.shape), lqer_b_scale=b_scale)
    qa, sa = _per_row(A, factor_bits)
    qb, sb = _per_row(B, factor_bits)
    return dict(lqer_a=qa, lqer_a_scale=sa, lqer_b=qb, lqer_b_scale=sb)


def correction(entry: dict) -> torch.Tensor:
    """(q_A s_A)(q_B s_B) in fp32 [rows, cols] from an entry's stored factors."""
    qa, sa, qb, sb = (entry[f] for f in FIELDS)
    if sa.dim() == 0:  # asymmetric: one scale for A, B's scales per group of consecutive elements
        A = qa.float() * sa.float()
        B = (qb.float().reshape(sb.numel(), -1) * sb.float()[:, None]).reshape(qb.shape)
    else:  # per-row fallback
        A = qa.float() * sa.float()[:, None]
        B = qb.float() * sb.float()[:, None]
    return A @ B


def largest_errors(errors: dict[str, float], top_k: int) -> list[str]:
    """The top_k names by error, largest first (ties: the name first in `errors`)."""
    ranked = sorted(errors, key=lambda name: -errors[name])
    return ranked[:top_k]
