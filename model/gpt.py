"""The GPT of SPEC.md "Model", one module per row of its table.

    embeddings in   x = tok_emb(ids) + BigramHash(ids); RMSNorm; SmearGate      -> x0
    trunk           11 blocks; the first 5 (encoder) push their outputs, the last 6 (decoder)
                    pop them as U-Net skips; each block mixes x with x0 (resid_mix) first
    block           pre-norm (scaled by 1/sqrt(i+1)) attention, then pre-norm relu^2 MLP
    attention       GQA, RMSNorm on q/k per head, partial RoPE, q gain, VE on its layers,
                    XSA on the last blocks
    head            final RMSNorm, tied embedding, soft cap, fp32 cross-entropy

Every kernel goes through the public `kernels` API, so KERNELS=triton|reference applies.

Precision: linear weights fp32 (cast to the input dtype in the forward), embedding tables
bf16, scalar/control tensors fp32. The residual stream runs in the autocast dtype when autocast
is on (bf16 on the GPU) and in fp32 otherwise; embedding outputs and control tensors are cast
to it so that one dtype flows through the trunk.

Export: each module lists its control tensors (`control_tensors`: gains, mixes, scales, kept fp32
in the artifact) and the matrices the artifact stores in int6 (`int6_matrices`); the model collects
them by state-dict name (`control_tensor_names`, `int6_matrix_names`) for model/export.py, which
does not guess from names. A module built only for one preset brings its declarations with it.

RMSNorm: `F.rms_norm` without weight and with eps = 1e-6 everywhere (a fixed eps, so the norm
behaves the same in fp32 and bf16; PyTorch's default would be the dtype's machine epsilon,
0.0078 in bf16, which swamps the mean square of a 0.005-std embedding).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.config import Config

RMS_EPS = 1e-6


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, no weight; the output keeps x's dtype (autocast may not)."""
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS).to(x.dtype)


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
    """x_t <- (1 - g) x_t + g x_{t-1} per channel, g = sigmoid(gate), x_{-1} = 0 (per sequence)."""

    control_tensors = ("gate",)

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, dim]
        g = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # shift right by one position, zeros at t = 0
        return (1 - g) * x + g * previous


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


def rope_cos_sin(T: int, rope_dims: int, base: float, train_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dims // 2] (fp32) for positions 0..T-1.

    Beyond train_len the base is rescaled NTK-style: base * (T / train_len)^(d / (d - 2)). With
    d = 2 there is a single frequency (1, whatever the base), so there is nothing to rescale.
    """
    if T > train_len and rope_dims > 2:
        base = base * (T / train_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 2 * cos.shape[-1] dims of each head; the rest pass through.

    x [B, T, heads, D] (q with num_heads heads, k with num_kv_heads); cos, sin [T, rope_dims // 2].
    Dim i of the rotated part pairs with dim i + rope_dims // 2.
    """
    half = cos.shape[-1]
    if half == 0:
        return x
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


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

    def forward(self, h: torch.Tensor, cos, sin, ve: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = h.shape
        q = self.c_q(h).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(h).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(h)  # [B, T, kv_dim]
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(rms_norm(q), cos, sin)
        k = apply_partial_rope(rms_norm(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = kernels.xsa_attention(q, k, v, xsa=self.xsa)  # [B, T, H, D]
        return self.proj(y.reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    int6_matrices = ("fc.weight", "proj.weight")

    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # proj(relu(fc(x))^2) as one op: the triton backend fuses the activation into the GEMMs
        return kernels.relu2_mlp(x, self.fc.operand(x.dtype), self.proj.operand(x.dtype))


class Block(nn.Module):
    control_tensors = ("attn_scale", "mlp_scale", "resid_mix")

    def __init__(self, cfg: Config, index: int):
        super().__init__()
        self.norm_scale = 1.0 / math.sqrt(index + 1) if cfg.ln_scale else 1.0
        self.attn = Attention(cfg, xsa=index >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        # row 0 weighs the running stream x, row 1 the embedding stream x0
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))

    def forward(self, x, x0, cos, sin, ve=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, cos, sin, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


class GPT(nn.Module):
    control_tensors = ("skip_weights",)

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L = cfg.num_layers
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim, dtype=torch.bfloat16)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim, cfg.bigram_scale_init)
        self.smear = SmearGate(cfg.model_dim)
        self.ve_layers = cfg.ve_layer_indices  # block index -> position in ve.layer_scales
        if self.ve_layers:
            self.ve = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim, len(self.ve_layers), cfg.ve_scale_init)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.num_encoder_layers = cfg.num_encoder_layers
        # decoder block j adds skip_weights[j] * (output of encoder block E-1-j) while any remain
        num_skips = min(self.num_encoder_layers, L - self.num_encoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim, dtype=torch.float32))
        self.reset_parameters()

    # ------------------------------------------------------------------ init (SPEC.md "init")
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Orthogonal (gain 1) for every linear; attention-out and MLP-down zero; the bigram and
        VE projections orthogonal scaled by 1/sqrt(2 L); token table normal(std tied_embed_init_std),
        bigram table zero, VE table normal(std ve_table_init_std); control tensors as built.

        SPEC orthogonalises linears with both sides >= 64; the only smaller ones occur in tiny
        test configs, and we orthogonalise those too so that one rule covers every size.
        """
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        nn.init.zeros_(self.bigram.table)
        if self.ve_layers:
            nn.init.normal_(self.ve.table, std=cfg.ve_table_init_std)
        for module in self.modules():
            if isinstance(module, CastedLinear):
                nn.init.orthogonal_(module.weight, gain=1.0)
        for block in self.blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        projection_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.bigram.proj.weight.mul_(projection_scale)
        if self.ve_layers:
            self.ve.proj.weight.mul_(projection_scale)

    # ------------------------------------------------------------------ forward
    def _check_ids(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"GPT: ids must be an int32/int64 tensor of shape [batch, seq_len], got {ids.dtype} {tuple(ids.shape)}; "
                f"pass token ids as a 2-D integer tensor"
            )
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(
                f"GPT: targets shape {tuple(targets.shape)} differs from ids shape {tuple(ids.shape)}; "
                f"pass one target per input token"
            )

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] in the stream dtype."""
        cfg = self.cfg
        dtype = stream_dtype(ids.device)
        T = ids.shape[1]

        x = self.tok_emb(ids).to(dtype) + self.bigram(ids, dtype)
        x = self.smear(rms_norm(x))
        x0 = x

        cos, sin = rope_cos_sin(T, cfg.rope_dims, cfg.rope_base, cfg.rope_train_len, ids.device)
        ve_shared = self.ve(ids, dtype) if self.ve_layers else None  # [B, T, kv_dim], computed once

        skips = []
        for i, block in enumerate(self.blocks):
            ve = None
            if i in self.ve_layers:
                ve = self.ve.layer_scales[self.ve_layers.index(i)].to(dtype) * ve_shared
            if i >= self.num_encoder_layers:
                j = i - self.num_encoder_layers
                if skips:
                    x = x + self.skip_weights[j].to(dtype) * skips.pop()
            x = block(x, x0, cos, sin, ve)
            if i < self.num_encoder_layers:
                skips.append(x)
        return rms_norm(x)

    def token_losses(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token NLL [B, T] in fp32 (the evaluator scores with it)."""
        self._check_ids(ids, targets)
        x = self.hidden(ids)
        nll = kernels.softcap_cross_entropy(
            x.reshape(-1, x.shape[-1]), self.tok_emb.weight, targets.reshape(-1), self.cfg.logit_softcap
        )
        return nll.float().view(ids.shape)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss (fp32 scalar)."""
        return self.token_losses(ids, targets).mean()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits [B, T, V] in fp32 (for tests and debugging; training never builds them)."""
        self._check_ids(ids)
        x = self.hidden(ids)
        raw = (x @ self.tok_emb.weight.to(x.dtype).T).float()
        softcap = self.cfg.logit_softcap
        return softcap * torch.tanh(raw / softcap)

    # ------------------------------------------------------------------ training helpers
    def set_qat(self, enabled: bool) -> None:
        """Int6 fake-quantised weights (straight-through) in every linear layer's forward, or not."""
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat = bool(enabled)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer: "matrix" (Muon: every linear weight, i.e. the block matrices
        plus the bigram and VE projections), "embed" (AdamW: token, bigram and VE tables),
        "scalar" (AdamW: every other, control, tensor). Each parameter appears exactly once."""
        matrix = [m.weight for m in self.modules() if isinstance(m, CastedLinear)]
        embed = [self.tok_emb.weight, self.bigram.table] + ([self.ve.table] if self.ve_layers else [])
        taken = {id(p) for p in matrix + embed}
        scalar = [p for p in self.parameters() if id(p) not in taken]
        return {"matrix": matrix, "embed": embed, "scalar": scalar}

    # ------------------------------------------------------------------ declarations for the exporter
    def control_tensor_names(self) -> set[str]:
        """State-dict names of the control tensors (gains, mixes, scales, skip weights) that the
        modules declare in `control_tensors`: the exporter keeps them in fp32."""
        return self._declared("control_tensors")

    def int6_matrix_names(self) -> set[str]:
        """State-dict names of the matrices the modules declare in `int6_matrices` (attention and
        MLP): the exporter stores them in int6 when they are large, like other small tensors otherwise."""
        return self._declared("int6_matrices")

    def _declared(self, declaration: str) -> set[str]:
        names = set()
        for prefix, module in self.named_modules():
            for name in getattr(module, declaration, ()):
                names.add(f"{prefix}.{name}" if prefix else name)
        return names
