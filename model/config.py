"""The one configuration object: defaults are SPEC.md's system.

Every field is set, in increasing priority, by its default, a preset (`--preset smoke`), the
environment variable named as the challenge names it (the field name in upper case: NUM_LAYERS,
XSA_LAST_N, TTT_LR, ...), and `--field_name value` (or `--field-name value`) on the command line.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields

SHARED_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@dataclass
class Config:
    # run
    run_id: str = ""  # run folder name under runs/; empty = a timestamp
    seed: int = 1337
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # folder with fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    compile: bool = True  # torch.compile(model, fullgraph=True)

    # model (SPEC.md "Model")
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    rope_dims: int = 16  # partial RoPE: rotate only the first rope_dims of each head
    rope_base: float = 10000.0
    rope_train_len: int = 1024  # NTK base rescale beyond this sequence length
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0
    tied_embed_init_std: float = 0.005
    ln_scale: bool = True  # scale each block's norm output by 1/sqrt(layer + 1)
    xsa_last_n: int = 4
    bigram_vocab_size: int = 2048
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05
    ve_enabled: bool = True
    ve_dim: int = 128
    ve_layers: str = "9,10"
    ve_scale_init: float = 0.1
    ve_table_init_std: float = 0.01

    # training (SPEC.md "Training recipe")
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # 0 = no cap (the warmdown then counts steps)
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_total: int = 8  # micro-batches per step summed over all ranks
    warmup_steps: int = 20  # compile/prime steps; weights and optimizer state are restored after
    warmdown_iters: int = 3000
    matrix_lr: float = 0.025
    tied_embed_lr: float = 0.035  # token, bigram and VE tables
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    swa_enabled: bool = True
    swa_every: int = 50
    swa_threshold: float = 0.2  # average while the LR scale is below this
    late_qat_threshold: float = 0.1  # int6 fake-quant once the LR scale is below this
    train_log_every: int = 200
    val_loss_every: int = 0  # periodic validation during training; 0 = only at the end
    val_batch_size: int = 524_288  # tokens per validation batch over all ranks
    checkpoint_every: int = 0  # save runs/<id>/checkpoint.pt every this many steps; 0 = off
    checkpoint_minutes: float = 0.0  # ... or every this many minutes of training; 0 = off
    resume: str = ""  # path of a checkpoint.pt to continue from

    # evaluation (SPEC.md "Evaluation")
    max_val_tokens: int = 0  # score only the first this many validation tokens; 0 = all
    eval_seq_len: int = 2048  # sliding window length
    eval_stride: int = 64
    eval_batch_seqs: int = 32
    ttt_enabled: bool = True
    ttt_lr: float = 0.002
    ttt_momentum: float = 0.9
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32_768
    ttt_grad_clip: float = 1.0
    ttt_freeze_blocks: int = 0
    ttt_batch_seqs: int = 32

    # export (SPEC.md "Export")
    artifact_budget_bytes: int = 16_000_000
    zstd_level: int = 22

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
        """One clear line for a config that cannot build or train a model."""
        problems = []
        if self.model_dim % self.num_heads:
            problems.append(f"MODEL_DIM={self.model_dim} is not a multiple of NUM_HEADS={self.num_heads}")
        elif self.num_heads % self.num_kv_heads:
            problems.append(f"NUM_HEADS={self.num_heads} is not a multiple of NUM_KV_HEADS={self.num_kv_heads}")
        elif self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim:
            problems.append(f"ROPE_DIMS={self.rope_dims} must be even and at most the head dim {self.head_dim}")
        if not 0 <= self.xsa_last_n <= self.num_layers:
            problems.append(f"XSA_LAST_N={self.xsa_last_n} must lie in [0, NUM_LAYERS={self.num_layers}]")
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
        if self.eval_stride <= 0 or self.eval_stride > self.eval_seq_len:
            problems.append(f"EVAL_STRIDE={self.eval_stride} must lie in [1, EVAL_SEQ_LEN={self.eval_seq_len}]")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


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


PRESETS = {"smoke": _smoke}


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


def load_config(argv: list[str] = (), environ=None) -> tuple[Config, list[str]]:
    """Resolve the config from preset, environment and `--name value` arguments.

    Returns the config and the arguments that are flags of train.py itself (`--dry-run`).
    Unknown `--name` arguments raise with the list of valid ones.
    """
    environ = os.environ if environ is None else environ
    names = {f.name: f for f in fields(Config)}
    values, flags, overrides, preset = {}, [], {}, environ.get("PRESET", "")
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--dry-run",):
            flags.append(arg)
            i += 1
            continue
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; settings are given as --name value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        else:
            raise ValueError(f"{arg} needs a value: {arg} <value>")
        key = key.replace("-", "_").lower()
        if key == "preset":
            preset = value
        elif key in names:
            overrides[key] = value
        else:
            raise ValueError(f"unknown setting --{key}; valid settings: preset, {', '.join(names)}")
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        values.update(PRESETS[preset]())
    defaults = Config()
    for name in names:
        if name.upper() in environ:
            values[name] = environ[name.upper()]
    values.update(overrides)
    resolved = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        try:
            resolved[name] = _parse(value, default) if isinstance(value, str) and not isinstance(default, str) else value
        except ValueError as e:
            raise ValueError(f"setting {name.upper()}={value!r}: {e}") from None
    return Config(**resolved).validate(), flags
