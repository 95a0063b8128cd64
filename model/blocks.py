"""The transformer block and its parts; the variants are chosen once, when the model is built.

    Attention       u -> q, k, v; per-head RMSNorm of q, k; partial RoPE; q gain; VE on its layers;
                    kernels.xsa_attention (XSA on its layers, document segments when given)
    GatedAttention  the same, plus FRONTIER.md's sparse output gate: sigmoid(scale * W_g u[:window])
                    per head, applied by the attention op after XSA
    MLP             kernels.relu2_mlp: leaky_relu(u W_up^T, slope)^2 W_down^T (slope 0: SPEC's relu^2)
    Block           sequential: x_in = m0 x + m1 x0; x_in + a Attn(norm(x_in) s) then + b MLP(norm(.) s)
    TwoLaneBlock    FRONTIER.md's parallel decoder: attention reads lane 0 (mixed with x0), the MLP
                    reads the old lane 1; both lanes take both outputs through r and P

`lora` (the phased TTT only, model/lora.py): one block application's per-document adapters; their
deltas go on q, k, v (before the q/k RMSNorm), on W_o's output (from u) and on the MLP's output
(from its normed input), before the attention and MLP scales. None leaves the forward as it was.
"""
import math

import torch
from torch import nn

import kernels
from model.config import Config
from model.layers import CastedLinear, apply_partial_rope, rms_norm
from model.lora import add_delta


class Attention(nn.Module):
    control_tensors = ("q_gain",)
    int6_matrices = ("c_q.weight", "c_k.weight", "c_v.weight", "proj.weight")

    def __init__(self, cfg: Config, xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.xsa = xsa  # XSA projection in this block (the last cfg.xsa_last_n blocks)
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))

    def output_gate(self, h: torch.Tensor) -> torch.Tensor | None:
        """Pre-sigmoid gate [B, T, H] of each head's output, or None (no gate)."""
        return None

    def forward(self, h: torch.Tensor, cos, sin, ve: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, lora=None) -> torch.Tensor:
        """lora: the phased TTT's adapters of this block application (model/lora.py), or None."""
        B, T, _ = h.shape
        q, k, v = self.c_q(h), self.c_k(h), self.c_v(h)  # [B, T, dim], [B, T, kv_dim] x 2
        if lora is not None:  # per-document deltas on the projections, before the q/k RMSNorm
            q, k, v = add_delta(q, lora.q(h)), add_delta(k, lora.k(h)), add_delta(v, lora.v(h))
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(rms_norm(q), cos, sin)
        k = apply_partial_rope(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        # the op's optional inputs only when used, so that SPEC's call stays (q, k, v, xsa)
        extras = {name: value for name, value in (("cu_seqlens", cu_seqlens), ("gate", self.output_gate(h)))
                  if value is not None}
        y = kernels.xsa_attention(q, k, v, xsa=self.xsa, **extras)  # [B, T, H, D]
        out = self.proj(y.reshape(B, T, self.num_heads * self.head_dim))
        return out if lora is None else add_delta(out, lora.o(h))  # the O adapter reads u, not y


class GatedAttention(Attention):
    """FRONTIER.md's sparse attention output gate: y_{t,h} <- sigmoid(scale * W_g[h] . u_t[:window]) y_{t,h}
    after XSA (the op applies it, in fp32); W_g `attn_gate_w` [H, window], fp32, zero init: exactly
    0.5 y at init. The exporter stores W_g in int8 per row (`int8_row_matrices`)."""

    int8_row_matrices = ("attn_gate_w",)

    def __init__(self, cfg: Config, xsa: bool):
        super().__init__(cfg, xsa)
        self.gate_scale = cfg.sparse_attn_gate_scale
        self.attn_gate_w = nn.Parameter(torch.zeros(cfg.num_heads, cfg.gate_window, dtype=torch.float32))

    def output_gate(self, h: torch.Tensor) -> torch.Tensor:
        window = self.attn_gate_w.shape[1]
        return self.gate_scale * (h[..., :window] @ self.attn_gate_w.to(h.dtype).T)  # [B, T, H]


class MLP(nn.Module):
    int6_matrices = ("fc.weight", "proj.weight")

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim)
        self.negative_slope = cfg.mlp_leaky_slope  # a float fixed at build: 0.0 SPEC, 0.5 FRONTIER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # proj(leaky_relu(fc(x))^2) as one op: the triton backend fuses the activation into the GEMMs
        return kernels.relu2_mlp(x, self.fc.operand(x.dtype), self.proj.operand(x.dtype), self.negative_slope)


class Block(nn.Module):
    """Sequential pre-norm block (SPEC.md): x -> x' on one residual stream."""

    control_tensors = ("attn_scale", "mlp_scale", "resid_mix")

    def __init__(self, cfg: Config, index: int):
        super().__init__()
        self.norm_scale = 1.0 / math.sqrt(index + 1) if cfg.ln_scale else 1.0
        xsa = index >= cfg.num_layers - cfg.xsa_last_n
        self.attn = GatedAttention(cfg, xsa) if cfg.sparse_attn_gate_enabled else Attention(cfg, xsa)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        # row 0 weighs the running stream x, row 1 the embedding stream x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))

    def attention(self, x, x0, cos, sin, ve, cu_seqlens, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_in = m0 x + m1 x0 and attn_scale * Attn(RMSNorm(x_in) s)."""
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        u = rms_norm(x_in) * self.norm_scale
        return x_in, self.attn_scale.to(x.dtype) * self.attn(u, cos, sin, ve, cu_seqlens, lora)

    def mlp_branch(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """mlp_scale * MLP(RMSNorm(x) s); the phased TTT's MLP adapter reads the same normed input."""
        u = rms_norm(x) * self.norm_scale
        out = self.mlp(u)
        return self.mlp_scale.to(x.dtype) * (out if lora is None else add_delta(out, lora.mlp(u)))

    def forward(self, x, x0, cos, sin, ve=None, cu_seqlens=None, lora=None):
        x_in, attn_out = self.attention(x, x0, cos, sin, ve, cu_seqlens, lora)
        x = x_in + attn_out
        return x + self.mlp_branch(x, lora)


class TwoLaneBlock(Block):
    """FRONTIER.md's parallel two-lane block ell, on lanes (L0, L1):

        A  = a * Attn(RMSNorm(m0 L0 + m1 x0) s)      M = b * MLP(RMSNorm(L1) s)   (the old L1, no x0)
        L0 <- r[0] L0 + P[0,0] A + P[1,0] M          L1 <- r[1] L1 + P[0,1] A + P[1,1] M

    r = parallel_resid_lambdas[ell] [2] (per lane), P = parallel_post_lambdas[ell] [2, 2] indexed
    [source (0 attention, 1 MLP), destination lane]; the model owns both and hands this block its rows.
    """

    def forward(self, lane0, lane1, x0, cos, sin, resid, post, ve=None, cu_seqlens=None, lora=None):
        _, attn_out = self.attention(lane0, x0, cos, sin, ve, cu_seqlens, lora)
        mlp_out = self.mlp_branch(lane1, lora)
        r, p = resid.to(lane0.dtype), post.to(lane0.dtype)
        return (r[0] * lane0 + p[0, 0] * attn_out + p[1, 0] * mlp_out,
                r[1] * lane1 + p[0, 1] * attn_out + p[1, 1] * mlp_out)
