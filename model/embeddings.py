"""What feeds the trunk: BigramHash, the two SmearGates and the value embedding.

Each is built only by the preset that uses it (SPEC.md: BigramHash, the per-channel SmearGate,
VE; FRONTIER.md: the token-gated SmearGate with the BOS fix), so the other preset's state dict and
parameter count do not see it.
"""
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.layers import CastedLinear

BOS_ID = 1  # every document starts with it (SPEC.md "Data")


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair -> table row -> projection to the model dim, scaled."""

    control_tensors = ("scale",)

    def __init__(self, buckets: int, dim: int, model_dim: int, scale_init: float):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(buckets, dim, dtype=torch.bfloat16))
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = kernels.bigram_embed(ids, self.table).to(dtype)  # [B, T, bigram_dim]
        return self.scale.to(dtype) * self.proj(rows)  # [B, T, model_dim]


class SmearGate(nn.Module):
    """SPEC.md: x_t <- (1 - g) x_t + g x_{t-1} per channel, g = sigmoid(gate), x_{-1} = 0 (per
    sequence). It smears the normed embedding: x0 = SmearGate(RMSNorm(e))."""

    control_tensors = ("gate",)
    before_norm = False

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, dim]
        g = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # shift right by one position, zeros at t = 0
        return (1 - g) * x + g * previous


class BosSmearGate(nn.Module):
    """FRONTIER.md: e~_t = e_t + lam * sigmoid(w . e_t[:window]) * e_{t-1} * [id_t != BOS] for t >= 1,
    e~_0 = e_0; w (the window -> 1 linear, no bias) and lam start at 0 (identity). Both sides read
    the unsmeared e (one step, no recurrence), along the whole packed row: the BOS mask keeps a
    document's last token out of the next document. It smears the raw embedding: x0 = RMSNorm(e~)."""

    control_tensors = ("gate_w", "lam")
    before_norm = True

    def __init__(self, window: int):
        super().__init__()
        self.gate_w = nn.Parameter(torch.zeros(window, dtype=torch.float32))
        self.lam = nn.Parameter(torch.zeros((), dtype=torch.float32))

    def forward(self, e: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # e [B, T, dim], ids [B, T]
        current, previous = e[:, 1:], e[:, :-1]
        gate = torch.sigmoid(current[..., : self.gate_w.shape[0]] @ self.gate_w.to(e.dtype))  # [B, T-1]
        strength = self.lam.to(e.dtype) * gate * (ids[:, 1:] != BOS_ID).to(e.dtype)
        return torch.cat((e[:, :1], current + strength[..., None] * previous), dim=1)


class ValueEmbedding(nn.Module):
    """One shared token table projected to the KV width; added to v of a few blocks, each with its own scale."""

    control_tensors = ("scale", "layer_scales")

    def __init__(self, vocab: int, dim: int, kv_dim: int, num_layers_used: int, scale_init: float):
        super().__init__()
        self.table = nn.Parameter(torch.empty(vocab, dim, dtype=torch.bfloat16))
        self.proj = CastedLinear(dim, kv_dim)
        self.scale = nn.Parameter(torch.tensor(scale_init, dtype=torch.float32))
        self.layer_scales = nn.Parameter(torch.ones(num_layers_used, dtype=torch.float32))

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = F.embedding(ids, self.table).to(dtype)  # [B, T, ve_dim]
        return self.scale.to(dtype) * self.proj(rows)  # [B, T, kv_dim], shared by the VE layers
