"""The GPT of SPEC.md "Model" (the default preset) and FRONTIER.md section 2 (`--preset frontier`).

| part          | SPEC.md (the default)                          | FRONTIER.md (`--preset frontier`)                     |
|---------------|------------------------------------------------|-------------------------------------------------------|
| embeddings in | x0 = SmearGate(RMSNorm(tok_emb + BigramHash))  | x0 = RMSNorm(BosSmearGate(tok_emb, ids))              |
| trunk         | blocks 0-10; encoder 0-4 push U-Net skips,     | the same until `model.looping`, then                  |
|               | decoder 5-10 pop them                          | 0,1,2,[3,4,5]x3,6..10: encoder the first 8 of the 17  |
| skip          | x + w_j skip (5 slots)                         | lerp(w_j skip, x, sigmoid(g_j)) (8 slots)             |
| block         | Block: x_in = resid_mix(x, x0); pre-norm       | Block; TwoLaneBlock for blocks 8-10 (lanes L0, L1)    |
|               | attention, then MLP; norms scaled 1/sqrt(i+1)  |                                                       |
| attention     | GQA, q/k RMSNorm, partial RoPE (NTK beyond the | q gain 5.0, RoPE turned the other way and never       |
|               | train length), q gain 1.5, VE on 9-10, XSA on  | rescaled, XSA on all 11, the sparse output gate,      |
|               | the last 4                                     | documents isolated (cu_seqlens)                       |
| MLP           | relu^2, 3x                                     | leaky_relu(0.5)^2, 4x                                 |
| head          | final RMSNorm, tied embedding, soft cap 30,    | the same, of the lanes' mean                          |
|               | fp32 cross-entropy                             |                                                       |
| init          | SPEC.md "init" (INIT_SCHEME=spec)              | FRONTIER.md "Init": its RNG order, bf16-rounded       |

Every part is built from the config: a feature only one preset uses exists only when its setting
is on, so the other preset's state dict, parameter count and numbers do not change. The wiring is
data: model/trunk.py turns the config (and `looping`, a plain attribute that torch.compile guards
on: one graph per value) into the list of block applications that `hidden()` walks.
Every kernel goes through the public `kernels` API, so KERNELS=triton|reference applies.

Precision: linear weights fp32 (cast to the input dtype in the forward), embedding tables bf16,
scalar/control tensors fp32. The residual stream runs in the autocast dtype when autocast is on
(bf16 on the GPU) and in fp32 otherwise; embedding outputs and control tensors are cast to it so
that one dtype flows through the trunk. RMSNorm (model/layers.py): no weight, PyTorch's default
eps (the fp32 machine epsilon, also for bf16 inputs), as in both records.

Export: each module lists its control tensors (`control_tensors`: gains, mixes, scales, kept fp32
in the artifact), the matrices the artifact stores in int6 (`int6_matrices`) and the small ones
stored in int8 per row (`int8_row_matrices`: the sparse gate); the model collects them by
state-dict name (`control_tensor_names`, `int6_matrix_names`, `int8_row_matrix_names`) for
model/export.py, which does not guess from names. A module built only for one preset brings its
declarations with it.
"""
import math

import torch
from torch import nn

import kernels
from model.blocks import MLP, Attention, Block, GatedAttention, TwoLaneBlock  # noqa: F401 (re-exported)
from model.config import Config
from model.embeddings import BigramHash, BosSmearGate, SmearGate, ValueEmbedding  # noqa: F401
from model.layers import CastedLinear, apply_partial_rope, rms_norm, rope_cos_sin, stream_dtype  # noqa: F401
from model.trunk import build_plan, num_skip_slots

PARALLEL_RESID_INIT = 1.1  # FRONTIER.md: r starts at 1.1 (1.1015625 once bf16-rounded)


class GPT(nn.Module):
    # the GPT-level tensors each preset may build; only the ones built are declared
    control_tensors = ("skip_weights", "skip_gates", "parallel_resid_lambdas", "parallel_post_lambdas")

    def __init__(self, cfg: Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        L, d = cfg.num_layers, cfg.model_dim
        rng_before_build = torch.random.get_rng_state()  # FRONTIER's init replays its record's draws from here
        self.tok_emb = nn.Embedding(cfg.vocab_size, d, dtype=torch.bfloat16)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, d, cfg.bigram_scale_init) if cfg.bigram_enabled else None
        self.smear = BosSmearGate(cfg.gate_window) if cfg.smear_gate_enabled else SmearGate(d)
        self.ve_layers = cfg.ve_layer_indices  # block index -> position in ve.layer_scales
        if self.ve_layers:
            self.ve = ValueEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim, len(self.ve_layers), cfg.ve_scale_init)
        two_lanes = cfg.parallel_start_layer or L  # physical blocks from here on are two-lane blocks
        self.blocks = nn.ModuleList((TwoLaneBlock if i >= two_lanes else Block)(cfg, i) for i in range(L))

        # U-Net skips: decoder application j mixes in skip_weights[j] * (the skip it pops)
        slots = num_skip_slots(cfg)
        self.skip_weights = nn.Parameter(torch.ones(slots, d, dtype=torch.float32))
        self.skip_gates = nn.Parameter(torch.zeros(slots, d, dtype=torch.float32)) if cfg.skip_gates_enabled else None
        if cfg.parallel_start_layer:  # rows of the two-lane blocks are used; [layer, lane] and [layer, source, lane]
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), PARALLEL_RESID_INIT, dtype=torch.float32))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2, dtype=torch.float32))
        else:
            self.parallel_resid_lambdas = self.parallel_post_lambdas = None
        self.final_lane = cfg.parallel_final_lane

        # The trunk's two plans; `looping` picks one. A plain attribute, read in hidden(), so that
        # torch.compile guards on it and keeps one graph per value.
        self.plans = {looping: build_plan(cfg, looping) for looping in (False, True)}
        self.looping = False
        self.rope_rescale_beyond = cfg.rope_train_len if cfg.rope_yarn else None
        if cfg.init_scheme == "frontier":  # undo the draws of our modules' default inits (the record has other modules)
            torch.random.set_rng_state(rng_before_build)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC.md's or FRONTIER.md's init (INIT_SCHEME); control tensors keep their built values."""
        if self.cfg.init_scheme == "frontier":
            self._init_frontier()
        else:
            self._init_spec()

    def _init_spec(self) -> None:
        """SPEC.md "init": orthogonal (gain 1) for every linear; attention-out and MLP-down zero; the
        bigram and VE projections orthogonal scaled by 1/sqrt(2 L); token table normal(std
        tied_embed_init_std), bigram table zero, VE table normal(std ve_table_init_std).

        SPEC orthogonalises linears with both sides >= 64; the only smaller ones occur in tiny
        test configs, and we orthogonalise those too so that one rule covers every size.
        """
        cfg = self.cfg
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if self.bigram is not None:
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
        if self.bigram is not None:
            self.bigram.proj.weight.mul_(projection_scale)
        if self.ve_layers:
            self.ve.proj.weight.mul_(projection_scale)

    def _init_frontier(self) -> None:
        """FRONTIER.md "Init", in its RNG order: E ~ N(0, std^2); for each block W_q orthogonal,
        W_o = 0, W_k and W_v orthogonal; then for each block W_up orthogonal, W_down = 0; the sparse
        gate normal(SPARSE_ATTN_GATE_INIT_STD) if that is not 0 (zeros as built otherwise).

        The record casts the model to bf16 and back after building it, so every initial value is
        bf16-rounded, also where it is stored in fp32 (r starts at 1.1015625); the table is bf16.

        "RNG order, after the embedding and smear linear are built": the record's module
        constructors draw first, and only those two do (its banks are made empty): a default
        nn.Embedding's N(0, 1) table and a 12 -> 1 nn.Linear's Kaiming-uniform row. Drawing the
        same numbers here (GPT's constructor has put the generator back to where it found it) gives
        the record's initial weights bit for bit from the same seed, on the CPU where both build.
        """
        cfg = self.cfg
        nn.init.normal_(torch.empty(cfg.vocab_size, cfg.model_dim))  # nn.Embedding(vocab, dim)
        nn.init.kaiming_uniform_(torch.empty(1, cfg.gate_window), a=math.sqrt(5))  # nn.Linear(12, 1, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        for block in self.blocks:
            nn.init.orthogonal_(block.attn.c_q.weight, gain=1.0)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.orthogonal_(block.attn.c_k.weight, gain=1.0)
            nn.init.orthogonal_(block.attn.c_v.weight, gain=1.0)
        for block in self.blocks:
            nn.init.orthogonal_(block.mlp.fc.weight, gain=1.0)
            nn.init.zeros_(block.mlp.proj.weight)
        if cfg.sparse_attn_gate_init_std and cfg.sparse_attn_gate_enabled:
            for block in self.blocks:
                nn.init.normal_(block.attn.attn_gate_w, std=cfg.sparse_attn_gate_init_std)
        # SPEC's BigramHash and value embeddings, when turned on with this init, as SPEC initialises them
        projection_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.table)
            nn.init.orthogonal_(self.bigram.proj.weight, gain=projection_scale)
        if self.ve_layers:
            nn.init.normal_(self.ve.table, std=cfg.ve_table_init_std)
            nn.init.orthogonal_(self.ve.proj.weight, gain=projection_scale)
        for p in self.parameters():
            p.copy_(p.to(torch.bfloat16))

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

    def plan(self):
        """The block applications of the trunk for the current loop state (model/trunk.py)."""
        return self.plans[self.looping]

    def embeddings_in(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x0 [B, T, dim]: SPEC smears the normed sum with the bigram rows, FRONTIER norms the smeared embedding."""
        e = self.tok_emb(ids).to(dtype)
        if self.bigram is not None:
            e = e + self.bigram(ids, dtype)
        if self.smear.before_norm:
            return rms_norm(self.smear(e, ids))
        return self.smear(rms_norm(e))

    def merge_skip(self, x: torch.Tensor, skip: torch.Tensor, slot: int) -> torch.Tensor:
        """SPEC: x + w skip; with skip gates, lerp(w skip, x, sigmoid(g)) = s x + (1 - s) w skip."""
        weighted = self.skip_weights[slot].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + weighted
        return torch.lerp(weighted, x, torch.sigmoid(self.skip_gates[slot]).to(x.dtype))

    def hidden(self, ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None, lora=None) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] in the stream dtype. cu_seqlens: int32 offsets of
        the documents in the flattened B*T tokens, handed to attention (RoPE positions stay the
        index within the row). lora: the phased TTT's per-document adapters (model/lora.py, one
        document per row), application n of the plan gets lora.at(n); None everywhere else."""
        cfg = self.cfg
        dtype = stream_dtype(ids.device)
        T = ids.shape[1]
        x0 = self.embeddings_in(ids, dtype)
        cos, sin = rope_cos_sin(T, cfg.rope_dims, cfg.rope_base, self.rope_rescale_beyond, ids.device, cfg.rope_direction)
        ve_shared = self.ve(ids, dtype) if self.ve_layers else None  # [B, T, kv_dim], computed once

        skips = []  # the U-Net stack
        lanes = [x0]  # the residual stream: one lane, two (L0, L1) from the first two-lane block on
        for n, app in enumerate(self.plan()):
            block = self.blocks[app.block]
            adapters = None if lora is None else lora.at(n)
            ve = None
            if app.block in self.ve_layers:
                ve = self.ve.layer_scales[self.ve_layers.index(app.block)].to(dtype) * ve_shared
            if app.two_lanes and len(lanes) == 1:
                lanes = [lanes[0], lanes[0]]  # entering the parallel decoder: L0 = L1 = x
            if app.skip_slot is not None:
                lanes[0] = self.merge_skip(lanes[0], skips.pop(), app.skip_slot)  # lane 0 only
            if app.two_lanes:
                lanes = list(block(*lanes, x0, cos, sin, self.parallel_resid_lambdas[app.block],
                                   self.parallel_post_lambdas[app.block], ve, cu_seqlens, adapters))
            else:
                lanes = [block(lanes[0], x0, cos, sin, ve, cu_seqlens, adapters)]
            if app.push:
                skips.append(lanes[0])
        return rms_norm(self.output_lane(lanes))

    def output_lane(self, lanes: list[torch.Tensor]) -> torch.Tensor:
        """What the trunk hands the final norm: the stream, or PARALLEL_FINAL_LANE of the two lanes."""
        if len(lanes) == 1:
            return lanes[0]
        if self.final_lane == "mean":
            return 0.5 * (lanes[0] + lanes[1])
        return lanes[0] if self.final_lane == "attn" else lanes[1]

    def token_losses(self, ids: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token NLL [B, T] in fp32 (the evaluator scores with it)."""
        self._check_ids(ids, targets)
        x = self.hidden(ids, cu_seqlens)
        nll = kernels.softcap_cross_entropy(
            x.reshape(-1, x.shape[-1]), self.tok_emb.weight, targets.reshape(-1), self.cfg.logit_softcap
        )
        return nll.float().view(ids.shape)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss (fp32 scalar)."""
        return self.token_losses(ids, targets, cu_seqlens).mean()

    def logits(self, ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Soft-capped logits [B, T, V] in fp32 (for tests and debugging; training never builds them)."""
        self._check_ids(ids)
        x = self.hidden(ids, cu_seqlens)
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
        plus the bigram and VE projections where built), "embed" (AdamW: token, bigram and VE tables),
        "scalar" (AdamW: every other tensor: gains, scales, mixes, skip weights and gates, the
        lanes' r and P, the smear gate, the sparse gate). Each parameter appears exactly once."""
        matrix = [m.weight for m in self.modules() if isinstance(m, CastedLinear)]
        embed = [self.tok_emb.weight] + [m.table for m in (self.bigram, getattr(self, "ve", None)) if m is not None]
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

    def int8_row_matrix_names(self) -> set[str]:
        """State-dict names of the small matrices declared in `int8_row_matrices` (the sparse
        attention gate's W_g): FRONTIER.md's exporter stores them in int8 per row."""
        return self._declared("int8_row_matrices")

    def _declared(self, declaration: str) -> set[str]:
        """The declared names of every module that it actually holds (a tensor not built is not declared)."""
        names = set()
        for prefix, module in self.named_modules():
            for name in getattr(module, declaration, ()):
                if _holds(module, name):
                    names.add(f"{prefix}.{name}" if prefix else name)
        return names


def _holds(module: nn.Module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module is not None
