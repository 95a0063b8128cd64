"""The one configuration object: defaults are SPEC.md's system.

Every field is set, in increasing priority, by its default, a preset (`--preset smoke`), the
environment variable named as the challenge names it (the field name in upper case: NUM_LAYERS,
XSA_LAST_N, TTT_LR, ...), and `--field_name value` (or `--field-name value`) on the command line.

Each field is declared with `setting(default, help, ...)`: the help text `train.py --help` prints,
the valid range `Config.validate` enforces, and `model=True` on the fields that define the
model's function (a checkpoint or an artifact made with other values is refused).
"""
import argparse
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields

SHARED_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def setting(default, help: str, *, low=None, high=None, above=None, below=None, model: bool = False):
    """A Config field: `low`/`high` are inclusive bounds, `above`/`below` exclusive ones; `model`
    marks a field that defines the trained function (architecture, head, positions)."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, above=above, below=below, model=model))


@dataclass
class Config:
    # run
    run_id: str = setting("", "run folder name under runs/; empty = a timestamp")
    seed: int = setting(1337, "seed of the weights' initialisation", low=0)
    data_path: str = setting("./data/datasets/fineweb10B_sp1024", "folder with fineweb_{train,val}_*.bin")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model of the shards")
    compile: bool = setting(True, "torch.compile(model, fullgraph=True)")
    overwrite: bool = setting(False, "replace an existing runs/<RUN_ID>/ (refused otherwise, unless resuming into it)")
    eval_only: str = setting("", "score this artifact (a final_model.int6.ptz) and write the record, without training")

    # model (SPEC.md "Model")
    vocab_size: int = setting(1024, "tokenizer vocabulary", low=2, high=65536, model=True)
    num_layers: int = setting(11, "transformer blocks", low=1, model=True)
    model_dim: int = setting(512, "residual stream width", low=1, model=True)
    num_heads: int = setting(8, "query heads", low=1, model=True)
    num_kv_heads: int = setting(4, "key/value heads (GQA)", low=1, model=True)
    mlp_mult: int = setting(3, "MLP hidden width = mlp_mult x model_dim", low=1, model=True)
    rope_dims: int = setting(16, "partial RoPE: rotate only the first rope_dims of each head", low=0, model=True)
    rope_base: float = setting(10000.0, "RoPE frequency base", above=0, model=True)
    rope_train_len: int = setting(1024, "NTK base rescale beyond this sequence length", low=1, model=True)
    qk_gain_init: float = setting(1.5, "initial per-head query gain")
    logit_softcap: float = setting(30.0, "tanh soft cap of the logits", above=0, model=True)
    tied_embed_init_std: float = setting(0.005, "std of the tied embedding's initialisation", low=0)
    ln_scale: bool = setting(True, "scale each block's norm output by 1/sqrt(layer + 1)", model=True)
    xsa_last_n: int = setting(4, "XSA (exclusive self-attention) on the last this many layers", low=0, model=True)
    bigram_vocab_size: int = setting(2048, "BigramHash buckets (the hash takes ids mod buckets - 1)", low=2, model=True)
    bigram_dim: int = setting(128, "BigramHash table width", low=1, model=True)
    bigram_scale_init: float = setting(0.05, "initial BigramHash output scale")
    ve_enabled: bool = setting(True, "value embeddings", model=True)
    ve_dim: int = setting(128, "value-embedding table width", low=1, model=True)
    ve_layers: str = setting("9,10", "layers that add the value embedding, comma-separated", model=True)
    ve_scale_init: float = setting(0.1, "initial value-embedding scale")
    ve_table_init_std: float = setting(0.01, "std of the value-embedding table's initialisation", low=0)
    bigram_enabled: bool = setting(True, "BigramHash added to the token embedding", model=True)

    # model, the frontier's additions (FRONTIER.md section 2); each off (or SPEC's form) by default
    mlp_leaky_slope: float = setting(0.0, "MLP activation leaky_relu(z, slope)^2; 0 = SPEC's relu^2", low=0, below=1, model=True)
    rope_yarn: bool = setting(True, "rescale the RoPE base beyond ROPE_TRAIN_LEN (SPEC's NTK rule); off = one base at every length", model=True)
    smear_gate_enabled: bool = setting(False, "the frontier's token-gated SmearGate with the BOS fix, in place of SPEC's per-channel one", model=True)
    gate_window: int = setting(12, "input dims the smear and sparse attention gates read", low=1, model=True)
    sparse_attn_gate_enabled: bool = setting(False, "per-head sigmoid gate on the attention output (after XSA)", model=True)
    sparse_attn_gate_scale: float = setting(0.5, "scale of the sparse attention gate's pre-sigmoid value", model=True)
    sparse_attn_gate_init_std: float = setting(0.0, "std of the sparse attention gate weights' initialisation (0 = zeros)", low=0)
    skip_gates_enabled: bool = setting(False, "U-Net skips mixed by a learned sigmoid gate (lerp) instead of added", model=True)
    parallel_start_layer: int = setting(0, "decoder blocks from this physical layer on run two parallel lanes; 0 = off", low=0, model=True)
    parallel_final_lane: str = setting("mean", "what the two lanes hand the final norm: mean, attn or mlp", model=True)
    num_loops: int = setting(0, "depth recurrence: extra passes over layers LOOP_START..LOOP_END; 0 = off", low=0, model=True)
    loop_start: int = setting(3, "first physical layer of the recurrent span", low=0, model=True)
    loop_end: int = setting(5, "last physical layer of the recurrent span (inclusive)", low=0, model=True)
    enable_looping_at: float = setting(0.35, "training fraction at which the recurrence turns on (once, for good)", low=0, high=1)
    doc_isolated_attention: bool = setting(False, "attention never crosses a BOS; documents cut every TRAIN_SEQ_LEN tokens (cu_seqlens)", model=True)
    rope_direction: int = setting(1, "RoPE turns each pair (a, b) to (a cos - b sin, b cos + a sin) at 1 (ours, SPEC); "
                                     "-1: (a cos + b sin, b cos - a sin), FRONTIER.md's convention", low=-1, high=1, model=True)
    init_scheme: str = setting("spec", "initialisation: spec (SPEC.md 'init') or frontier (FRONTIER.md 'Init': its RNG "
                                       "order, every initial value bf16-rounded)")

    # training (SPEC.md "Training recipe")
    iterations: int = setting(20000, "training steps at most", low=1)
    max_wallclock_seconds: float = setting(600.0, "training time cap; 0 = no cap (the warmdown then counts steps)", low=0)
    train_batch_tokens: int = setting(786_432, "tokens per step over all ranks", low=1)
    train_seq_len: int = setting(2048, "training sequence length", low=1)
    grad_accum_total: int = setting(8, "micro-batches per step summed over all ranks", low=1)
    warmup_steps: int = setting(20, "compile/prime steps; weights, optimizer state and data are restored after", low=0)
    warmdown_iters: int = setting(3000, "linear LR warmdown over the last this many steps' worth of time", low=0)
    matrix_lr: float = setting(0.025, "Muon learning rate of the matrices", low=0)
    tied_embed_lr: float = setting(0.035, "AdamW learning rate of the token, bigram and VE tables", low=0)
    scalar_lr: float = setting(0.025, "AdamW learning rate of the scalars and control tensors", low=0)
    muon_momentum: float = setting(0.99, "Muon momentum after its warm-up", low=0, below=1)
    muon_momentum_warmup_start: float = setting(0.92, "Muon momentum at step 0", low=0, below=1)
    muon_momentum_warmup_steps: int = setting(1500, "steps of the linear Muon momentum warm-up", low=0)
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations", low=1)
    muon_wd: float = setting(0.04, "Muon decoupled weight decay", low=0)
    adam_wd: float = setting(0.04, "AdamW weight decay", low=0)
    beta1: float = setting(0.9, "AdamW beta1", low=0, below=1)
    beta2: float = setting(0.95, "AdamW beta2", low=0, below=1)
    adam_eps: float = setting(1e-8, "AdamW epsilon", above=0)
    grad_clip_norm: float = setting(0.3, "gradient-norm clip; 0 = off", low=0)
    grad_comm: str = setting("bf16", "dtype of the Muon gradients' reduce-scatter across ranks: bf16 (half the bytes) "
                                     "or fp32 (exact); model/grad_sync.py")
    swa_enabled: bool = setting(True, "Tight SWA: average weight snapshots late in the warmdown")
    swa_every: int = setting(50, "steps between SWA snapshots", low=1)
    swa_threshold: float = setting(0.2, "average while the LR scale is below this", low=0)
    late_qat_threshold: float = setting(0.1, "int6 fake-quant once the LR scale is below this; 0 = off", low=0)
    ema_decay: float = setting(0.0, "EMA of every parameter after each step, evaluated and exported; 0 = off", low=0, below=1)
    warmdown_frac: float = setting(0.0, "LR warmdown over this final fraction of the wall clock; 0 = WARMDOWN_ITERS", low=0, high=1)
    min_lr: float = setting(0.0, "floor of the LR scale during the warmdown", low=0, high=1)
    muon_row_normalize: bool = setting(False, "Muon divides each row of the update by its norm before Newton-Schulz")
    muon_polar_express: bool = setting(False, "Muon's 5 Newton-Schulz steps use the Polar-Express coefficients (FRONTIER.md section 3)")
    embed_wd: float = setting(-1.0, "AdamW weight decay of the token table; negative = ADAM_WD", low=-1)
    train_log_every: int = setting(200, "log the train loss every this many steps; 0 = off", low=0)
    val_loss_every: int = setting(0, "periodic validation during training; 0 = only at the end", low=0)
    val_batch_size: int = setting(524_288, "tokens per validation batch over all ranks", low=1)
    checkpoint_every: int = setting(0, "save runs/<id>/checkpoint.pt every this many steps; 0 = off", low=0)
    checkpoint_minutes: float = setting(0.0, "... or every this many minutes of training; 0 = off", low=0)
    resume: str = setting("", "path of a checkpoint.pt to continue from")

    # evaluation (SPEC.md "Evaluation")
    max_val_tokens: int = setting(0, "score only the first this many validation tokens; 0 = all", low=0)
    eval_seq_len: int = setting(2048, "sliding window length", low=1)
    eval_stride: int = setting(64, "sliding window stride", low=1)
    eval_batch_seqs: int = setting(32, "windows per evaluation batch", low=1)
    ttt_enabled: bool = setting(True, "legal score-first test-time training")
    ttt_lr: float = setting(0.002, "TTT SGD learning rate", low=0)
    ttt_momentum: float = setting(0.9, "TTT SGD momentum", low=0, below=1)
    ttt_epochs: int = setting(3, "TTT epochs over each scored chunk", low=0)
    ttt_chunk_tokens: int = setting(32_768, "TTT chunk length in tokens", low=1)
    ttt_grad_clip: float = setting(1.0, "TTT gradient-norm clip; 0 = off", low=0)
    ttt_freeze_blocks: int = setting(0, "TTT leaves the first this many blocks frozen", low=0)
    ttt_batch_seqs: int = setting(32, "TTT sequences per batch", low=1)

    # evaluation, the frontier's phased LoRA TTT (FRONTIER.md section 5; model/phased_ttt.py)
    ttt_method: str = setting("sgd", "TTT: sgd (SPEC's chunked SGD over the stream) or phased_lora (FRONTIER.md's "
                                     "per-document LoRA with global SGD phases)")
    ttt_lora_rank: int = setting(80, "phased TTT: LoRA rank r", low=1)
    ttt_lora_alpha: float = setting(144.0, "phased TTT: LoRA alpha (the delta is scaled by alpha / r)", above=0)
    ttt_chunk_size: int = setting(48, "phased TTT: predictions per scored-then-trained chunk of a document", low=1)
    ttt_eval_seq_len: int = setting(2048, "phased TTT: a chunk's window reaches back at most this many tokens", low=1)
    ttt_batch_size: int = setting(64, "phased TTT: documents per batch (sorted by length)", low=1)
    ttt_lora_lr: float = setting(1e-4, "phased TTT: LoRA AdamW learning rate (constant)", low=0)
    ttt_beta1: float = setting(0.0, "phased TTT: LoRA AdamW beta1", low=0, below=1)
    ttt_beta2: float = setting(0.99, "phased TTT: LoRA AdamW beta2", low=0, below=1)
    ttt_weight_decay: float = setting(0.5, "phased TTT: LoRA AdamW weight decay", low=0)
    ttt_grad_steps: int = setting(1, "phased TTT: LoRA optimizer steps per trained chunk", low=1)
    ttt_warm_start_a: bool = setting(True, "phased TTT: keep the LoRA A matrices from batch to batch (B is reset)")
    ttt_k_lora: bool = setting(True, "phased TTT: LoRA on the K projection")
    ttt_o_lora: bool = setting(True, "phased TTT: LoRA on the attention output")
    ttt_mlp_lora: bool = setting(True, "phased TTT: LoRA on the MLP")
    phased_ttt_prefix_docs: int = setting(2500, "phased TTT: the last global phase trains on this many scored documents", low=0)
    phased_ttt_num_phases: int = setting(3, "phased TTT: global SGD phases, at floor(PREFIX_DOCS k / NUM_PHASES) documents", low=0)
    global_ttt_chunk_tokens: int = setting(32_768, "phased TTT: tokens per global SGD step", low=1)
    global_ttt_epochs: int = setting(1, "phased TTT: epochs of each global phase", low=1)
    global_ttt_batch_seqs: int = setting(32, "phased TTT: at most this many sequences per forward of a global SGD step (gradients accumulate)", low=1)
    global_ttt_grad_clip: float = setting(1.0, "phased TTT: global SGD gradient-norm clip; 0 = off", low=0)
    global_ttt_momentum: float = setting(0.9, "phased TTT: global SGD momentum", low=0, below=1)
    global_ttt_lr: float = setting(1e-3, "phased TTT: global SGD peak learning rate (cosine to 0 over a phase)", low=0)

    # export (SPEC.md "Export")
    artifact_budget_bytes: int = setting(16_000_000, "artifact + code bytes allowed", low=1)
    zstd_level: int = setting(22, "zstd compression level of the artifact", low=1, high=22)
    quant: str = setting("int6", "quantiser: int6 (SPEC's per-row rounding) or gptq (FRONTIER.md section 4)")
    compressor: str = setting("zstd", "artifact compressor: zstd, brotli or pergroup")
    pergroup_coder: str = setting("brotli", "COMPRESSOR=pergroup: the coder of each group, brotli, zstd or lrzip (the lrzip program, optional)")
    gptq_calibration_batches: int = setting(16, "training batches whose activations build GPTQ's Hessians", low=1)
    gptq_reserve_seconds: float = setting(0.0, "seconds of the training clock reserved for GPTQ calibration", low=0)
    mlp_clip_sigmas: float = setting(11.5, "GPTQ scale = this x row std / qmax, MLP matrices", above=0)
    attn_clip_sigmas: float = setting(13.0, "... attention matrices", above=0)
    embed_clip_sigmas: float = setting(14.0, "... the tied embedding", above=0)
    embed_bits: int = setting(7, "bits of the tied embedding under GPTQ", low=2, high=8)
    gated_attn_quant_gate: bool = setting(True, "the sparse attention gate's weights in int8 per row (else fp16)")
    lqer_enabled: bool = setting(False, "low-rank correction of the GPTQ tensors with the largest error")
    lqer_asym_enabled: bool = setting(True, "LQER factors: A int2 with one scale, B int4 in groups")
    lqer_rank: int = setting(4, "LQER rank", low=1)
    lqer_top_k: int = setting(3, "LQER corrects this many tensors", low=1)
    lqer_asym_group: int = setting(64, "LQER B's int4 group size", low=1)
    lqer_factor_bits: int = setting(4, "bits of both LQER factors in the per-row fallback", low=2, high=8)

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_mult * self.model_dim

    @property
    def ve_layer_indices(self) -> tuple[int, ...]:
        if not self.ve_enabled or not self.ve_layers.strip():
            return ()
        return tuple(int(i) for i in self.ve_layers.split(","))

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step."""
        if world_size < 1 or self.grad_accum_total % world_size:
            raise ValueError(
                f"WORLD_SIZE={world_size} does not divide GRAD_ACCUM_TOTAL={self.grad_accum_total}; "
                f"run on a number of GPUs that divides it (1, 2, 4 or 8 for the default)"
            )
        return self.grad_accum_total // world_size

    def validate(self) -> "Config":
        """Every problem of a config that cannot build, train, export or score a model, one line
        each (ValueError, lines joined by newlines): ranges first, then what depends on them."""
        problems = [problem for f in fields(self) if (problem := _range_problem(f, getattr(self, f.name)))]
        if problems:  # the relations below divide by these fields
            raise ValueError("\n".join(problems))
        if self.model_dim % self.num_heads:
            problems.append(f"MODEL_DIM={self.model_dim} is not a multiple of NUM_HEADS={self.num_heads}")
        elif self.num_heads % self.num_kv_heads:
            problems.append(f"NUM_HEADS={self.num_heads} is not a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        elif self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            problems.append(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {self.head_dim}")
        if not 0 <= self.xsa_last_n <= self.num_layers:
            problems.append(f"XSA_LAST_N={self.xsa_last_n} must lie in [0, NUM_LAYERS={self.num_layers}]")
        if self.ttt_freeze_blocks > self.num_layers:
            problems.append(f"TTT_FREEZE_BLOCKS={self.ttt_freeze_blocks} must lie in [0, NUM_LAYERS={self.num_layers}]")
        try:
            bad = [i for i in self.ve_layer_indices if not 0 <= i < self.num_layers]
            if bad:
                problems.append(f"VE_LAYERS={self.ve_layers!r} names layers {bad} outside [0, {self.num_layers})")
        except ValueError:
            problems.append(f"VE_LAYERS={self.ve_layers!r} must be comma-separated layer indices such as '9,10'")
        tokens_per_micro = self.train_batch_tokens / self.grad_accum_total
        if tokens_per_micro % self.train_seq_len:
            problems.append(
                f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} is not GRAD_ACCUM_TOTAL={self.grad_accum_total} "
                f"x a whole number of TRAIN_SEQ_LEN={self.train_seq_len} sequences"
            )
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_id):
            problems.append(f"RUN_ID={self.run_id!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
                            f"not starting with '.' or '-'): it names runs/<RUN_ID>/")
        if self.eval_only and self.resume:
            problems.append(f"EVAL_ONLY={self.eval_only!r} and RESUME={self.resume!r} are both set; score an artifact "
                            f"or continue a run, not both")
        for name, allowed in (("quant", QUANTISERS), ("compressor", COMPRESSORS), ("parallel_final_lane", FINAL_LANES),
                              ("ttt_method", TTT_METHODS), ("grad_comm", GRAD_COMMS),
                              ("pergroup_coder", PERGROUP_CODERS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name.upper()}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.init_scheme not in INIT_SCHEMES:
            problems.append(f"INIT_SCHEME={self.init_scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
        if self.rope_direction not in (1, -1):
            problems.append(f"ROPE_DIRECTION={self.rope_direction} must be 1 (SPEC's rotation) or -1 (FRONTIER.md's)")
        loops_ok = not self.num_loops or 0 <= self.loop_start <= self.loop_end < self.num_layers
        if not loops_ok:
            problems.append(f"LOOP_START={self.loop_start} and LOOP_END={self.loop_end} must satisfy "
                            f"0 <= LOOP_START <= LOOP_END < NUM_LAYERS={self.num_layers}")
        if self.parallel_start_layer >= self.num_layers:
            problems.append(f"PARALLEL_START_LAYER={self.parallel_start_layer} must be below NUM_LAYERS={self.num_layers} "
                            f"(0 turns the lanes off)")
        elif loops_ok:
            from model.trunk import plan_problems  # the trunk's plan is made from these fields

            problems.extend(plan_problems(self))
        if (self.smear_gate_enabled or self.sparse_attn_gate_enabled) and self.gate_window > self.model_dim:
            problems.append(f"GATE_WINDOW={self.gate_window} must be at most MODEL_DIM={self.model_dim}")
        if self.eval_stride > self.eval_seq_len:
            problems.append(f"EVAL_STRIDE={self.eval_stride} must lie in [1, EVAL_SEQ_LEN={self.eval_seq_len}]")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def model_differences(self, other: dict) -> list[str]:
        """`NAME=theirs vs ours` for every function-defining field where `other` (a config saved as a
        dict, by a checkpoint or beside an artifact) differs from this config."""
        return [f"{name.upper()}={other.get(name)!r} vs {getattr(self, name)!r}"
                for name in model_fields() if other.get(name) != getattr(self, name)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


QUANTISERS = ("int6", "gptq")
INIT_SCHEMES = ("spec", "frontier")
COMPRESSORS = ("zstd", "brotli", "pergroup")
PERGROUP_CODERS = ("brotli", "zstd", "lrzip")  # model.compressors.CODERS
TTT_METHODS = ("sgd", "phased_lora")
GRAD_COMMS = ("bf16", "fp32")  # model.grad_sync.COMM_DTYPES
FINAL_LANES = ("mean", "attn", "mlp")


def model_fields() -> tuple[str, ...]:
    """The fields that define the model's function (`setting(..., model=True)`)."""
    return tuple(f.name for f in fields(Config) if f.metadata["model"])


def _range_text(meta: dict) -> str:
    low = f"[{meta['low']}" if meta["low"] is not None else f"({meta['above']}" if meta["above"] is not None else "(-inf"
    high = f"{meta['high']}]" if meta["high"] is not None else f"{meta['below']})" if meta["below"] is not None else "inf)"
    return f"{low}, {high}"


def _range_problem(f: dataclasses.Field, value) -> str | None:
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return f"{f.name.upper()}={value!r} is not a finite number; it must lie in {_range_text(meta)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    inside = ((meta["low"] is None or value >= meta["low"]) and (meta["high"] is None or value <= meta["high"])
              and (meta["above"] is None or value > meta["above"]) and (meta["below"] is None or value < meta["below"]))
    return None if inside else f"{f.name.upper()}={value!r} is out of range; it must lie in {_range_text(meta)}"


def _sample_data_or_generated() -> tuple[str, str]:
    """The workspace's real sample shards and tokenizer when present, else '' (the smoke run
    then generates its own data)."""
    shards = os.path.normpath(os.path.join(SHARED_SAMPLE, "fineweb10B_sp1024_sample"))
    tokenizer = os.path.normpath(os.path.join(SHARED_SAMPLE, "tokenizers", "fineweb_1024_bpe.model"))
    if os.path.isdir(shards) and os.path.isfile(tokenizer):
        return shards, tokenizer
    return "", ""


def _smoke() -> dict:
    data_path, tokenizer_path = _sample_data_or_generated()
    return dict(
        data_path=data_path,  # '' = the trainer generates a tiny synthetic corpus
        tokenizer_path=tokenizer_path,
        compile=False,
        num_layers=4, model_dim=192, num_heads=6, num_kv_heads=3, rope_dims=16,  # the MLP is int6-exported, tok_emb int8
        xsa_last_n=2, bigram_vocab_size=257, bigram_dim=32, ve_dim=32, ve_layers="2,3",
        iterations=150, max_wallclock_seconds=0, train_batch_tokens=4 * 4 * 128, train_seq_len=128,
        grad_accum_total=4, warmup_steps=2, warmdown_iters=60, swa_every=5, swa_threshold=0.5,
        late_qat_threshold=0.25, train_log_every=25, val_loss_every=50, val_batch_size=8192,
        max_val_tokens=8192, eval_seq_len=128, eval_stride=32, eval_batch_seqs=16,
        ttt_chunk_tokens=2048, ttt_epochs=1, ttt_batch_seqs=8,
        matrix_lr=0.02, tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum_warmup_steps=30,
    )


def _frontier() -> dict:
    """FRONTIER.md: the 1.0611 record's values (its runs' command over its script's defaults)."""
    return dict(
        vocab_size=8192, mlp_mult=4, mlp_leaky_slope=0.5, xsa_last_n=11, qk_gain_init=5.0,
        bigram_enabled=False, ve_enabled=False, rope_yarn=False, rope_train_len=2048, rope_direction=-1, init_scheme="frontier",
        smear_gate_enabled=True, gate_window=12,
        sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5, sparse_attn_gate_init_std=0.0,
        skip_gates_enabled=True, parallel_start_layer=8, parallel_final_lane="mean",
        num_loops=2, loop_start=3, loop_end=5, enable_looping_at=0.35, doc_isolated_attention=True,
        matrix_lr=0.026, tied_embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
        muon_momentum_warmup_steps=1500, muon_wd=0.095, muon_row_normalize=True, muon_polar_express=True,
        beta2=0.99, adam_wd=0.02, embed_wd=0.085, grad_clip_norm=0.3,
        swa_enabled=False, late_qat_threshold=0.0, ema_decay=0.9965, warmdown_frac=0.85, min_lr=0.10,
        gptq_reserve_seconds=0.5,
        quant="gptq", compressor="pergroup", lqer_enabled=True, ttt_method="phased_lora",
    )


def _frontier_smoke() -> dict:
    """The frontier at smoke size for an end-to-end CPU run: `smoke`'s data and training/eval sizes,
    4 blocks with every frontier feature: order 0,[1,2]x3,3 looped (0-1 / 2-3 unlooped), block 3
    two-lane, 4 skip slots."""
    smoke = _smoke()
    sizes = ("data_path", "tokenizer_path", "compile", "iterations", "max_wallclock_seconds", "train_batch_tokens",
             "train_seq_len", "grad_accum_total", "warmup_steps", "warmdown_iters", "train_log_every", "val_loss_every",
             "val_batch_size", "max_val_tokens", "eval_seq_len", "eval_stride", "eval_batch_seqs", "ttt_chunk_tokens",
             "ttt_epochs", "ttt_batch_seqs", "matrix_lr", "tied_embed_lr", "scalar_lr", "muon_momentum_warmup_steps")
    return dict(
        _frontier(), **{name: smoke[name] for name in sizes},
        vocab_size=1024, num_layers=4, model_dim=192, num_heads=6, num_kv_heads=3, rope_dims=16, xsa_last_n=4,
        num_loops=2, loop_start=1, loop_end=2, parallel_start_layer=3, gptq_calibration_batches=2,
        # the phased TTT at smoke size: windows of the smoke's sequence length, small batches and
        # adapters, one global phase after two documents in chunks the sample's documents fill
        ttt_eval_seq_len=128, ttt_batch_size=4, ttt_lora_rank=8, phased_ttt_prefix_docs=2, phased_ttt_num_phases=1,
        global_ttt_chunk_tokens=512, global_ttt_batch_seqs=2,
    )


PRESETS = {"smoke": _smoke, "frontier": _frontier, "frontier-smoke": _frontier_smoke}


# Sections of `train.py --help`, by the first field of each.
SECTIONS = {"run_id": "run", "vocab_size": "model (SPEC.md \"Model\")", "iterations": "training (SPEC.md \"Training recipe\")",
            "max_val_tokens": "evaluation (SPEC.md \"Evaluation\")", "artifact_budget_bytes": "export (SPEC.md \"Export\")"}
# Environment variables that are not settings but belong to the run's world: torchrun's, the kernel
# backend's, Triton's. Only names close to a setting's are ever warned about.
WORLD_ENVIRONMENT = frozenset({"PRESET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                               "MASTER_ADDR", "MASTER_PORT", "KERNELS", "KERNELS_POISON", "TRITON_INTERPRET"})


def _parse(value: str, default):
    kind = type(default)
    if kind is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean; use 1/0 or true/false")
    return kind(value)


class _Parser(argparse.ArgumentParser):
    """argparse that raises one ValueError line instead of printing usage and exiting."""

    def error(self, message):
        missing = re.match(r"argument (--[\w-]+)\S*: expected one argument", message)
        if missing:
            raise ValueError(f"{missing.group(1)} needs a value: {missing.group(1)} <value>")
        raise ValueError(message)


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The command line, generated from Config: `--name value` (or `--name=value`) for every field,
    plus --preset, --dry-run and --help. `--name-with-dashes` is accepted too (see _underscored)."""
    parser = _Parser(prog=prog, usage="%(prog)s [--preset NAME] [--name value ...] [--dry-run] [-h]", add_help=False, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Every setting is a field of model/config.py: its default, then a preset, then its "
                                 "environment variable (the\nname in upper case), then --name value, each overriding the one before.")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the parameter count, then exit")
    parser.add_argument("--preset", default=argparse.SUPPRESS, metavar="NAME",
                        help=f"named defaults: {', '.join(PRESETS)} [env PRESET]")
    group = parser
    for f in fields(Config):
        if f.name in SECTIONS:
            group = parser.add_argument_group(SECTIONS[f.name])
        meta, kind = f.metadata, type(f.default).__name__.upper()
        bounds = "" if kind in ("STR", "BOOL") else f"; range {_range_text(meta)}"
        group.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar=kind,
                           help=f"{meta['help']} [env {f.name.upper()}; default {f.default!r}{bounds}]")
    return parser


def _underscored(arg: str) -> str:
    """`--num-layers=5` -> `--num_layers=5`: both spellings of a setting name one field."""
    if not arg.startswith("--") or arg == "--dry-run":
        return arg
    key, eq, value = arg[2:].partition("=")
    return f"--{key.replace('-', '_')}{eq}{value}"


def help_text(prog: str = "train.py") -> str:
    return build_parser(prog).format_help()


def setting_warnings(environ=None) -> list[str]:
    """A warning for each environment variable that looks like a misspelt setting (ITERATONS=5)."""
    environ = os.environ if environ is None else environ
    names = [f.name.upper() for f in fields(Config)]
    warnings = []
    for key in sorted(environ):
        if key in names or key in WORLD_ENVIRONMENT or not re.fullmatch(r"[A-Z][A-Z0-9_]{3,}", key):
            continue
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
        if close:
            warnings.append(f"environment variable {key} is not a setting (ignored); did you mean {close[0]}?")
    return warnings


def load_config(argv: list[str] = (), environ=None, prog: str = "train.py") -> tuple[Config, list[str]]:
    """Resolve the config from preset, environment and `--name value` arguments.

    Returns the config and the flags of train.py itself that were given (`--dry-run`, `--help`).
    A bad setting raises ValueError, one line per problem, naming the variable and its valid range.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser(prog)
    given, rest = parser.parse_known_args([_underscored(arg) for arg in argv])
    if rest:
        unknown = rest[0]
        if not unknown.startswith("--"):
            raise ValueError(f"unexpected argument {unknown!r}; settings are given as --name value")
        key = unknown[2:].split("=", 1)[0].replace("-", "_").lower()
        close = difflib.get_close_matches(key, [f.name for f in fields(Config)], n=1)
        hint = f"did you mean --{close[0]}? " if close else ""
        raise ValueError(f"unknown setting --{key}; {hint}`{prog} --help` lists every setting")
    given = vars(given)
    flags = [flag for flag, dest in (("--help", "help"), ("--dry-run", "dry_run")) if given.pop(dest)]
    if "--help" in flags:  # help is printed whatever else is set, even a setting that would be refused
        return Config(), flags
    preset = given.pop("preset", environ.get("PRESET", ""))
    values = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        values.update(PRESETS[preset]())
    for f in fields(Config):
        if f.name.upper() in environ:
            values[f.name] = environ[f.name.upper()]
    values.update(given)
    resolved = {}
    for f in fields(Config):
        if f.name not in values:
            continue
        value = values[f.name]
        try:
            resolved[f.name] = _parse(value, f.default) if isinstance(value, str) and not isinstance(f.default, str) else value
        except ValueError as e:
            raise ValueError(f"setting {f.name.upper()}={value!r}: {e}") from None
    return Config(**resolved).validate(), flags
