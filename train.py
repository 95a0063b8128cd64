"""Train SPEC.md's system, export the int6+zstd artifact, and score the round-tripped model.

    torchrun --standalone --nproc_per_node=8 train.py      # the real run (SPEC defaults)
    python train.py --preset smoke                          # the whole pipeline on a CPU, minutes
    python train.py --dry-run                               # resolved config + model_params, no data

Settings: every field of model/config.py, by environment variable (NUM_LAYERS=11) or
`--num_layers 11`. Kernels: KERNELS=triton|reference.
"""
import contextlib
import copy
import dataclasses
import glob
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import kernels
from kernels._launch import INTERPRET
from model import evaluate, export, submission
from model.bpb import build_byte_luts, load_tokenizer
from model.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from model.config import Config, load_config
from model.data import DistributedTokenLoader, load_validation_tokens, shard_paths
from model.gpt import GPT
from model.optim import build_optimizers, set_schedule
from model.runlog import RunLog
from model.schedule import lr_scale, muon_momentum, time_is_up
from model.swa import WeightAverage

REPO = os.path.dirname(os.path.abspath(__file__))


class TrainingError(RuntimeError):
    """A run that cannot go on; its message is the one line the user sees."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the current step."""

# Fields a checkpoint's model must share with the resuming run's config.
ARCHITECTURE_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
                       "xsa_last_n", "bigram_vocab_size", "bigram_dim", "ve_enabled", "ve_dim", "ve_layers")


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def leave_process_group(settle_s: float = 0.5) -> None:
    """destroy_process_group, after a pause that avoids a teardown deadlock (seen with gloo on a
    loaded machine, about one 2-rank run in two): a gloo worker thread frees a finished collective's
    tensors only once it holds the GIL, and when the group's last reference goes (DDP's reducer, as
    main() returns) the group's destructor joins that thread while holding the GIL. Sleeping hands
    the GIL over, so the workers are idle before the group can be destroyed."""
    time.sleep(settle_s)
    dist.destroy_process_group()


def source_files() -> list[str]:
    """Every source file a run needs: what the artifact's code bytes count."""
    files = [os.path.join(REPO, "train.py")]
    for package in ("kernels", "model"):
        files += sorted(glob.glob(os.path.join(REPO, package, "*.py")))
    return files


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_data(cfg: Config, log: RunLog, ctx: Dist) -> Config:
    """With no DATA_PATH (the smoke preset on a machine without the sample data), build a small
    synthetic corpus, tokenizer and shards inside the run folder."""
    if cfg.data_path:
        return cfg
    from data.synthetic import make_smoke_dataset

    folder = log.path("data")
    if ctx.is_main:
        log.log(f"data: no DATA_PATH; generating a synthetic corpus and tokenizer in {folder}")
        make_smoke_dataset(folder, vocab_size=cfg.vocab_size, seed=cfg.seed)
    if ctx.enabled:
        dist.barrier()
    return dataclasses.replace(cfg, data_path=folder, tokenizer_path=os.path.join(folder, "tokenizer.model"))


class Trainer:
    """The training loop of SPEC's recipe; `run()` returns the trained (SWA-averaged) model."""

    def __init__(self, cfg: Config, ctx: Dist, log: RunLog, val_tokens, luts):
        self.cfg, self.ctx, self.log, self.val_tokens, self.luts = cfg, ctx, log, val_tokens, luts
        self.accum = cfg.grad_accum_steps(ctx.world_size)
        self.micro_tokens = cfg.train_batch_tokens // cfg.grad_accum_total  # per rank per micro-batch
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg).to(ctx.device)
        compiled = torch.compile(self.model, fullgraph=True) if cfg.compile else self.model
        self.train_model = (
            DistributedDataParallel(compiled, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
            if ctx.enabled else compiled
        )
        # Triton's interpreter gets tl.dot wrong on bf16 operands, so Newton-Schulz runs in fp32 there.
        self.optimizers = build_optimizers(self.model, cfg, torch.float32 if INTERPRET else torch.bfloat16)
        self.loader = DistributedTokenLoader(cfg.data_path, ctx.rank, ctx.world_size)
        self.swa = WeightAverage()
        self.step = 0
        self.elapsed_ms = 0.0
        self.qat = False
        self.interrupted = False
        self.last_checkpoint_ms = 0.0

    # one optimizer step over `accum` micro-batches; returns the mean loss as a device tensor
    def train_step(self, scale: float, momentum: float) -> torch.Tensor:
        cfg, ctx = self.cfg, self.ctx
        total = torch.zeros((), device=ctx.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(self.micro_tokens, cfg.train_seq_len, ctx.device)
            last = micro == self.accum - 1
            sync = self.train_model.no_sync() if ctx.enabled and not last else contextlib.nullcontext()
            with sync:
                with autocast(ctx.device):
                    loss = self.train_model(x, y)
                (loss / self.accum).backward()
            total += loss.detach()
        set_schedule(self.optimizers, scale, momentum)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total / self.accum

    def set_qat(self, enabled: bool) -> None:
        self.model.set_qat(enabled)
        self.qat = enabled

    def warm_up(self) -> None:
        """Compile and prime every graph the run will need (QAT on and off), then put weights,
        optimizer state and data back where they were so the warm-up does not count."""
        cfg = self.cfg
        if cfg.warmup_steps <= 0:
            return
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        loader_state = self.loader.state_dict()
        qat_from = cfg.warmup_steps // 2 if cfg.late_qat_threshold > 0 else cfg.warmup_steps
        t0 = time.perf_counter()
        for step in range(cfg.warmup_steps):
            self.set_qat(step >= qat_from)
            self.train_step(1.0, muon_momentum(0, cfg))
        self.sync()
        self.set_qat(False)
        self.model.load_state_dict(weights)
        for opt, state in zip(self.optimizers, optimizer_states):
            opt.load_state_dict(state)
        self.loader.load_state_dict(loader_state)
        self.log.log(f"warmup: {cfg.warmup_steps} steps in {time.perf_counter() - t0:.1f}s; weights, optimizer and data restored")

    def sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def stop_agreed(self, time_up: bool) -> tuple[bool, bool]:
        """(time is up, interrupted), agreed by every rank: all must stop at the same step."""
        if not self.ctx.enabled:
            return time_up, self.interrupted
        flags = torch.tensor([int(time_up), int(self.interrupted)], device=self.ctx.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """A rank's loss covers only its micro-batches; the step's loss is the mean over ranks."""
        if not self.ctx.enabled:
            return float(value)
        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return float(total) / self.ctx.world_size

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> str:
        return self.log.path("checkpoint.pt")

    def state_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "loader": self.loader.state_dict(),
            "swa": self.swa.state_dict(),
            "qat": self.qat,
            "step": self.step,
            "elapsed_ms": self.elapsed_ms,
            "rng": rng_states(),
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        saved = state["config"]
        different = [f"{name.upper()}={saved.get(name)!r} vs {getattr(self.cfg, name)!r}"
                     for name in ARCHITECTURE_FIELDS if saved.get(name) != getattr(self.cfg, name)]
        if different:
            raise TrainingError(f"checkpoint {source} was made with another model ({', '.join(different)}); "
                                f"resume with the settings it was trained with")
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.loader.load_state_dict(state["loader"])
        self.swa.load_state_dict(state["swa"])
        self.set_qat(state["qat"])
        self.step, self.elapsed_ms = state["step"], state["elapsed_ms"]
        self.last_checkpoint_ms = self.elapsed_ms
        restore_rng_states(state["rng"])

    def save(self) -> None:
        """Every rank holds the same state (DDP and Muon keep them identical): rank 0 writes."""
        if self.ctx.is_main:
            t0 = time.perf_counter()
            size = save_checkpoint(self.state_dict(), self.checkpoint_path)
            self.log.log(f"checkpoint: step {self.step} -> {self.checkpoint_path} ({size / 2**20:.1f} MiB, "
                         f"{time.perf_counter() - t0:.1f}s)")
        self.last_checkpoint_ms = self.elapsed_ms
        if self.ctx.enabled:
            dist.barrier()

    def checkpoint_due(self) -> bool:
        cfg = self.cfg
        by_steps = cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0
        by_time = cfg.checkpoint_minutes > 0 and self.elapsed_ms - self.last_checkpoint_ms >= cfg.checkpoint_minutes * 60_000
        return by_steps or by_time

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def validate(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        with autocast(ctx.device):
            val_loss, val_bpb = evaluate.evaluate_contiguous(
                self.model, self.val_tokens, cfg.train_seq_len, max(1, cfg.val_batch_size // cfg.train_seq_len // ctx.world_size),
                self.luts, rank=ctx.rank, world_size=ctx.world_size,
            )
        self.model.train()
        self.log.log(f"step:{self.step} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{self.elapsed_ms:.0f}ms")
        self.log.metric(kind="val", step=self.step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=self.elapsed_ms)

    def run(self) -> GPT:
        cfg, log = self.cfg, self.log
        self.warm_up()
        if cfg.resume:
            self.load_state_dict(load_checkpoint(cfg.resume, map_location=self.ctx.device), cfg.resume)
            log.log(f"resumed from {cfg.resume} at step {self.step} ({self.elapsed_ms / 1000:.1f}s of training done)")
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.train_loop()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if self.ctx.device.type == "cuda":
            log.log(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated")
        if self.swa.apply(self.model):
            log.log(f"swa: averaged {self.swa.count} snapshots into the final weights")
        self.set_qat(False)
        return self.model

    def train_loop(self) -> None:
        cfg, log = self.cfg, self.log
        nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.ctx.device)
        self.sync()
        t0 = time.perf_counter()
        while self.step < cfg.iterations:
            elapsed = self.elapsed_ms + 1000.0 * (time.perf_counter() - t0)
            scale = lr_scale(self.step, elapsed, cfg)
            if cfg.late_qat_threshold > 0 and not self.qat and scale < cfg.late_qat_threshold:
                self.set_qat(True)
                log.log(f"step:{self.step} late QAT on (lr scale {scale:.3f} < {cfg.late_qat_threshold})")
            loss = self.train_step(scale, muon_momentum(self.step, cfg))
            bad = ~torch.isfinite(loss) & (nonfinite_step < 0)
            nonfinite_step = torch.where(bad, torch.full_like(nonfinite_step, self.step), nonfinite_step)
            self.step += 1
            if cfg.swa_enabled and scale < cfg.swa_threshold and self.step % cfg.swa_every == 0:
                self.swa.add(self.model)
            last = self.step == cfg.iterations
            stop, interrupted = self.stop_agreed(time_is_up(self.elapsed_ms + 1000.0 * (time.perf_counter() - t0), cfg))
            logging = cfg.train_log_every > 0 and (self.step % cfg.train_log_every == 0 or self.step <= 5)
            validating = cfg.val_loss_every > 0 and self.step % cfg.val_loss_every == 0
            checkpointing = interrupted or self.checkpoint_due()
            if logging or validating or checkpointing or last or stop:
                self.sync()
                self.elapsed_ms += 1000.0 * (time.perf_counter() - t0)
                if int(nonfinite_step) >= 0:
                    saved = f"the last checkpoint is {self.checkpoint_path}" if os.path.exists(self.checkpoint_path) else "no checkpoint was saved"
                    raise TrainingError(
                        f"training loss became non-finite at step {int(nonfinite_step) + 1} ({saved}); lower the learning "
                        f"rates (MATRIX_LR, TIED_EMBED_LR, SCALAR_LR) or check the data"
                    )
                if logging or last or stop:
                    train_loss = self.mean_over_ranks(loss)
                    log.log(
                        f"step:{self.step}/{cfg.iterations} train_loss:{train_loss:.4f} lr_scale:{scale:.3f} "
                        f"train_time:{self.elapsed_ms:.0f}ms step_avg:{self.elapsed_ms / self.step:.2f}ms"
                    )
                    log.metric(kind="train", step=self.step, train_loss=train_loss, lr_scale=scale, train_time_ms=self.elapsed_ms)
                if validating:
                    self.validate()
                if checkpointing:
                    self.save()
                if interrupted:
                    raise Interrupted(f"interrupted at step {self.step}; continue with RESUME={self.checkpoint_path}")
                self.sync()
                t0 = time.perf_counter()  # validation and checkpoint time do not count as training time
            if stop:
                log.log(f"stopping at step {self.step}: the {cfg.max_wallclock_seconds:.0f}s wall-clock cap is reached")
                break


def export_and_reload(model: GPT, cfg: Config, ctx: Dist, log: RunLog) -> tuple[GPT, int, int]:
    """Write the artifact (rank 0) and load it into a fresh model on every rank: all reported
    scores come from this round trip. The byte budget is reported here and enforced at the end."""
    path = log.path("final_model.int6.ptz")
    if ctx.is_main:
        t0, report = time.perf_counter(), {}
        size = export.write_artifact(model.state_dict(), path, level=cfg.zstd_level, report=report)
        for line in export.format_report(report, size):
            log.log(line)
        log.log(f"export: {path} written in {time.perf_counter() - t0:.1f}s (zstd level {cfg.zstd_level})")
    if ctx.enabled:
        dist.barrier()
    artifact_bytes = os.path.getsize(path)
    code_bytes = export.code_bytes(source_files())
    log.log(f"artifact_bytes:{artifact_bytes} code_bytes:{code_bytes} total_bytes:{artifact_bytes + code_bytes} "
            f"budget:{cfg.artifact_budget_bytes}")
    try:
        export.check_budget(artifact_bytes, code_bytes, cfg.artifact_budget_bytes)
    except ValueError as e:
        log.log(f"WARNING: {e} (evaluating anyway; the run will end with an error)")
    fresh = GPT(cfg).to(ctx.device)
    fresh.load_state_dict(export.read_artifact(path))
    if cfg.compile:  # scoring 62M tokens through 2048-token windows is worth a compiled graph
        fresh.token_losses = torch.compile(fresh.token_losses, fullgraph=True, dynamic=False)
        fresh.forward = torch.compile(fresh.forward, fullgraph=True, dynamic=False)
    return fresh, artifact_bytes, code_bytes


def final_scores(model: GPT, cfg: Config, ctx: Dist, log: RunLog, val_tokens, luts) -> dict:
    args = dict(rank=ctx.rank, world_size=ctx.world_size)
    results = {}
    with autocast(ctx.device):
        t0 = time.perf_counter()
        results["val_loss"], results["val_bpb"] = evaluate.evaluate_contiguous(
            model, val_tokens, cfg.train_seq_len, max(1, cfg.val_batch_size // cfg.train_seq_len // ctx.world_size), luts, **args)
        log.log(f"final_roundtrip val_loss:{results['val_loss']:.4f} val_bpb:{results['val_bpb']:.4f} "
                f"eval_time:{time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        results["sliding_val_loss"], results["sliding_val_bpb"] = evaluate.evaluate_sliding(
            model, val_tokens, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, luts, **args)
        log.log(f"final_sliding val_loss:{results['sliding_val_loss']:.4f} val_bpb:{results['sliding_val_bpb']:.4f} "
                f"(window {cfg.eval_seq_len}, stride {cfg.eval_stride}) eval_time:{time.perf_counter() - t0:.1f}s")
        if cfg.ttt_enabled:
            t0 = time.perf_counter()
            results["ttt_val_loss"], results["ttt_val_bpb"] = evaluate.evaluate_ttt(model, val_tokens, cfg, luts, **args)
            log.log(f"final_ttt val_loss:{results['ttt_val_loss']:.4f} val_bpb:{results['ttt_val_bpb']:.4f} "
                    f"(legal score-first, chunks of {cfg.ttt_chunk_tokens}) eval_time:{time.perf_counter() - t0:.1f}s")
    return results


def dry_run(cfg: Config) -> None:
    print(cfg.to_json())
    model = GPT(cfg)
    print(f"model_params:{sum(p.numel() for p in model.parameters())}")


def main(argv=None) -> int:
    try:
        cfg, flags = load_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        dry_run(cfg)
        return 0
    try:
        cfg.grad_accum_steps(int(os.environ.get("WORLD_SIZE", 1)))  # before any process group can hang
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    ctx = setup_distributed()
    try:
        # A resumed run continues in its checkpoint's folder unless RUN_ID says otherwise.
        run_id = cfg.run_id or (os.path.basename(os.path.dirname(os.path.abspath(cfg.resume))) if cfg.resume
                                else time.strftime("%Y%m%d-%H%M%S"))
        log = RunLog(os.path.join("runs", run_id), ctx.is_main)
        cfg = prepare_data(cfg, log, ctx)
        log.write_text("config.json", cfg.to_json() + "\n")
        log.log(f"run {run_id}: world_size {ctx.world_size}, device {ctx.device}, kernels {kernels.backend()}, "
                f"torch {torch.__version__}")
        log.log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
        shard_paths(cfg.data_path, "train")  # fail now, not after compiling, when shards are missing
        sp = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
        luts = build_byte_luts(sp, cfg.vocab_size, ctx.device)
        val_tokens = load_validation_tokens(cfg.data_path, max(cfg.train_seq_len, cfg.eval_seq_len), cfg.max_val_tokens)
        log.log(f"data: {len(shard_paths(cfg.data_path, 'train'))} train shards, {val_tokens.numel() - 1:,} validation targets")

        trainer = Trainer(cfg, ctx, log, val_tokens, luts)
        log.log(f"model_params:{sum(p.numel() for p in trainer.model.parameters())}")
        model = trainer.run()
        fresh, artifact_bytes, code_bytes = export_and_reload(model, cfg, ctx, log)
        results = final_scores(fresh, cfg, ctx, log, val_tokens, luts)
        results.update(steps=trainer.step, train_time_ms=trainer.elapsed_ms, artifact_bytes=artifact_bytes,
                       code_bytes=code_bytes, total_bytes=artifact_bytes + code_bytes, seed=cfg.seed)
        log.metric(kind="final", **results)
        export.check_budget(artifact_bytes, code_bytes, cfg.artifact_budget_bytes)
        if ctx.is_main:
            log.log(f"record: {submission.write_record(log.folder, source_files())}")
        return 0
    except Interrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 130
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        print(f"train.py: out of GPU memory; lower TRAIN_BATCH_TOKENS or raise GRAD_ACCUM_TOTAL (micro-batch "
              f"{cfg.train_batch_tokens // cfg.grad_accum_total} tokens per rank), or EVAL_BATCH_SEQS/TTT_BATCH_SEQS "
              f"if it happened in evaluation", file=sys.stderr)
        return 1
    finally:
        if ctx.enabled:
            leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
