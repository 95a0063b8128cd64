"""The small pieces every part of the model uses: RMSNorm, the stream dtype, the cast linear, RoPE."""
import torch
import torch.nn.functional as F
from torch import nn

import kernels


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no weight, PyTorch's default eps; the output keeps x's dtype.

    The default eps (None) is the fp32 machine epsilon, also for bf16 inputs: F.rms_norm takes it
    from its fp32 accumulator (checked on torch 2.13: bit-identical to eps=finfo(float32).eps for
    bf16 input), so fp32 and bf16 streams are normed alike. Both records use it. (autocast may
    hand back fp32, hence the cast.)
    """
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def stream_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the residual stream: autocast's dtype when autocast is on, else fp32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class CastedLinear(nn.Linear):
    """Linear without bias whose fp32 weight is cast to the input's dtype in the forward.

    With `qat` on, the weight is int6 fake-quantised first (per row, exactly as the exporter
    quantises the fp32 weight of an int6 matrix), with a straight-through gradient. Every linear
    gets it, the bigram and VE projections too, although the artifact does not store those in
    int6 (at the seed's sizes they are fp16).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.qat = False

    def operand(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the product sees it: in `dtype`, int6 fake-quantised when QAT is on."""
        if self.qat:  # quantise the fp32 master weight, as the exporter will, straight into dtype
            return kernels.int6_fakequant(self.weight, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.operand(x.dtype))


def rope_cos_sin(T: int, rope_dims: int, base: float, train_len: int | None, device,
                 direction: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, direction * sin [T, rope_dims // 2] (fp32) for positions 0..T-1.

    Beyond train_len the base is rescaled NTK-style: base * (T / train_len)^(d / (d - 2)); None
    never rescales (FRONTIER.md's ROPE_YARN=0). With d = 2 there is a single frequency (1, whatever
    the base), so there is nothing to rescale. direction -1 turns each pair the other way
    (FRONTIER.md's a cos + b sin, -a sin + b cos), by flipping the sign of sin here, once per forward.
    """
    if train_len is not None and T > train_len and rope_dims > 2:
        base = base * (T / train_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
    sin = angles.sin()
    return angles.cos(), sin if direction == 1 else -sin


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 2 * cos.shape[-1] dims of each head; the rest pass through.

    x [B, T, heads, D] (q with num_heads heads, k with num_kv_heads); cos, sin [T, rope_dims // 2].
    Dim i of the rotated part pairs with dim i + rope_dims // 2: (a, b) -> (a cos - b sin, b cos + a sin).
    """
    half = cos.shape[-1]
    if half == 0:
        return x
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
