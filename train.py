"""Train SPEC.md's system, export the int6+zstd artifact, and score the round-tripped model.

    torchrun --standalone --nproc_per_node=8 train.py      # the real run (SPEC defaults)
    python train.py --preset smoke                          # the whole pipeline on a CPU, minutes
    python train.py --dry-run                               # resolved config + model_params, no data
    python train.py --eval-only runs/<id>/final_model.int6.ptz   # score an artifact, write the record
    python train.py --help                                  # every setting, its env var and default

Settings: every field of model/config.py, by environment variable (NUM_LAYERS=11) or
`--num_layers 11`. Kernels: KERNELS=triton|reference.
"""
import contextlib
import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import sys
import time

import torch

import kernels
from kernels.ops.xsa_attention import SUPPORTED_HEAD_DIMS
from model import code_package, compressors, evaluate, export, submission
from model.atomic import atomic_write
from model.bpb import build_byte_luts, describe_byte_source, load_tokenizer, validation_byte_source
from model.checkpoint import TRAINING_STATE_KEYS, load_checkpoint, save_checkpoint
from model.config import Config, help_text, load_config, setting_warnings
from model.data import (DistributedTokenLoader, check_tokenizer_matches, check_train_shards, load_validation_tokens,
                        shard_paths)
from model.calibration import calibrate, rehearse, with_measured_reserve
from model.distributed import (AgreedLater, Dist, barrier, from_rank_zero, leave_process_group, mean_over_ranks,
                               setup_distributed, world_size_from_environment)
from model.document_loader import DocumentLoader
from model.gpt import GPT
from model.phased_ttt import EvalClock, phased_ttt_evaluation
from model.precision import autocast
from model.prefetch import PrefetchLoader
from model.runlog import RunLog
from model.schedule import looping_on, lr_scale, muon_momentum, time_is_up, training_fraction
from model.training import ResumeRefused, TrainingState, build_training_state, training_step, warm_up

REPO = os.path.dirname(os.path.abspath(__file__))  # run from the packed train_gpt.py: code_package.ORIGIN, no folder
ARTIFACT = "final_model.int6.ptz"


class TrainingError(RuntimeError):
    """A run that cannot go on; its message is the one line the user sees."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; what was saved and how to continue is in the message."""


def source_files() -> list[str]:
    """Every source file a run needs: what the artifact's code bytes count. Run from the packed
    train_gpt.py, the names of the files it holds (for the record's list; none exists on disk)."""
    package = code_package.running_package()
    if package is not None:
        return [os.path.join(REPO, name) for name in code_package.packed_names(package)]
    files = [os.path.join(REPO, "train.py")]
    for package in ("kernels", "model"):
        files += sorted(glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True))
    return files


def run_folder(cfg: Config) -> str:
    """runs/<RUN_ID>; a resumed run (or a scored artifact) continues in its own folder's name unless RUN_ID says otherwise."""
    inside = cfg.resume or cfg.eval_only
    run_id = cfg.run_id or (os.path.basename(os.path.dirname(os.path.abspath(inside))) if inside
                            else from_rank_zero(time.strftime("%Y%m%d-%H%M%S")))  # ranks straddling a second agree
    return os.path.join("runs", run_id)


def claim_run_folder(cfg: Config, folder: str, ctx: Dist) -> None:
    """Refuse to write over another run's folder unless this run resumes (or scores) into it or
    OVERWRITE=1 says so; every rank looks before rank 0 creates or clears it."""
    continuing = any(path and os.path.abspath(os.path.dirname(os.path.abspath(path))) == os.path.abspath(folder)
                     for path in (cfg.resume, cfg.eval_only))
    taken = os.path.isdir(folder) and bool(os.listdir(folder)) and not continuing
    barrier()
    if taken and not cfg.overwrite:
        checkpoint = os.path.join(folder, "checkpoint.pt")
        resume = f"resume it with RESUME={checkpoint}, " if os.path.isfile(checkpoint) else ""
        raise TrainingError(f"{folder} holds an earlier run; choose another RUN_ID, {resume}or set OVERWRITE=1 to replace it")
    if taken and ctx.is_main:
        shutil.rmtree(folder)
    barrier()


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
    barrier()
    return dataclasses.replace(cfg, data_path=folder, tokenizer_path=os.path.join(folder, "tokenizer.model"))


@contextlib.contextmanager
def interrupts_explained(what_next: str):
    """SIGTERM/SIGINT inside the block raise Interrupted saying `what_next`: how to finish the run."""
    def interrupt(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; {what_next}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """The loop policy of SPEC's recipe over a TrainingState: schedule, late QAT, SWA, logging,
    validation, checkpoints, signals and the wall-clock stop, agreed by every rank. validate(model,
    step, train_time_ms) scores the weights every VAL_LOSS_EVERY steps and after the last step;
    None scores nothing (tests and benchmarks that time or trace the loop alone)."""

    def __init__(self, state: TrainingState, log: RunLog, validate=None):
        self.state, self.cfg, self.log, self.validate = state, state.cfg, log, validate
        self.interrupted = False
        self.reading, self.step_ms = None, 0.0  # the clock at the last flags() and the step time it gave
        self.last_checkpoint_ms, self.saved_step = state.clock.elapsed_ms, None

    @property
    def checkpoint_path(self) -> str:
        return self.log.path("checkpoint.pt")

    def save(self) -> None:
        """Every rank builds the state (Muon gathers its sharded momentum: a collective); rank 0 writes."""
        state = self.state
        snapshot = state.state_dict()
        if state.ctx.is_main:
            t0 = time.perf_counter()
            size = save_checkpoint(snapshot, self.checkpoint_path)
            self.log.log(f"checkpoint: step {state.step} -> {self.checkpoint_path} ({size / 2**20:.1f} MiB, "
                         f"{time.perf_counter() - t0:.1f}s)")
        self.last_checkpoint_ms, self.saved_step = state.clock.elapsed_ms, state.step
        barrier()

    def checkpoint_due_by_steps(self) -> bool:
        return self.cfg.checkpoint_every > 0 and self.state.step % self.cfg.checkpoint_every == 0

    def flags(self, steps_ahead: int, running: int) -> tuple[bool, bool, bool, bool]:
        """This rank's (stop, interrupted, loop, checkpoint by minutes) for the step boundary
        `steps_ahead` steps after the last step queued, `running` of the queued steps not finished:
        the clock then reads the end of step state.step - running - 1, and the time at the boundary
        is estimated with the step time of the steps since the previous reading (the run's mean at
        first: looped steps are slower than the plain ones before them). stop: the boundary ends a
        step that reaches the budget (stop after it); loop: the step starting there runs the depth
        recurrence."""
        cfg, state = self.cfg, self.state
        now_ms, finished = state.clock.elapsed_ms, state.step - running
        if self.reading is not None and finished > self.reading[1]:
            self.step_ms = (now_ms - self.reading[0]) / (finished - self.reading[1])
        elif self.reading is None and finished > 0:
            self.step_ms = now_ms / finished
        self.reading = (now_ms, finished)
        then_ms = now_ms + (running + steps_ahead) * self.step_ms
        starting = state.step + steps_ahead  # the step that starts at the boundary
        wants_loop = looping_on(state.model.looping, training_fraction(starting, then_ms, cfg), cfg)
        return time_is_up(then_ms, cfg), self.interrupted, wants_loop, self.checkpoint_due_by_time()

    def checkpoint_due_by_time(self) -> bool:
        """By this rank's clock: the ranks agree on it before acting (saving is a collective)."""
        minutes = self.cfg.checkpoint_minutes
        return minutes > 0 and self.state.clock.elapsed_ms - self.last_checkpoint_ms >= minutes * 60_000

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True

    def run(self, resume: dict | None = None) -> GPT:
        """Warm up (compiling every graph), continue from `resume` (a checked checkpoint's state),
        train until ITERATIONS or the wall-clock cap, save the final training state, and return the
        model with the SWA average applied."""
        state, log = self.state, self.log
        seconds = warm_up(state)
        if state.cfg.warmup_steps > 0:
            log.log(f"warmup: {state.cfg.warmup_steps} steps in {seconds:.1f}s; weights, optimizer and data restored")
        if resume is not None:
            for kept in state.load_state_dict(resume, f"checkpoint {state.cfg.resume}"):
                log.log(f"resume: keeping this run's setting, {kept}")
            log.log(f"resumed from {state.cfg.resume} at step {state.step} ({state.clock.elapsed_ms / 1000:.1f}s of training done)")
            self.last_checkpoint_ms = state.clock.elapsed_ms
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        with interrupts_explained(f"training had finished; RESUME={self.checkpoint_path} continues from the last "
                                  f"checkpoint saved, if there is one"):
            if self.saved_step != self.state.step:
                self.save()  # the final training state: a run killed in export or evaluation resumes from here
            if self.state.ctx.device.type == "cuda":
                self.log.log(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated")
            if self.state.swa.apply(self.state.model):
                self.log.log(f"swa: averaged {self.state.swa.count} snapshots into the final weights")
            if self.state.ema is not None:
                self.state.ema.apply_to(self.state.model)
                self.log.log(f"ema: the weights' moving average (decay {self.cfg.ema_decay}) replaces them for export and scoring")
        self.state.model.set_qat(False)
        return self.state.model

    def loop(self) -> None:
        cfg, log, state, clock = self.cfg, self.log, self.state, self.state.clock
        if state.step >= cfg.iterations or time_is_up(clock.elapsed_ms, cfg):
            return  # a resumed run that had already finished training
        nonfinite_step = torch.full((), -1, dtype=torch.long, device=state.ctx.device)
        agreement = AgreedLater(state.ctx.device)  # the ranks agree without the host waiting on the step it queued
        loop_agreed = state.model.looping
        clock.start()
        while state.step < cfg.iterations:
            if loop_agreed and not state.model.looping:  # once, for good; its graph was compiled in the warm-up
                state.model.looping = True
                log.log(f"step:{state.step} depth recurrence on: {len(state.model.plan())} block applications "
                        f"(training fraction >= ENABLE_LOOPING_AT={cfg.enable_looping_at})")
            scale = lr_scale(state.step, clock.elapsed_ms, cfg)
            if cfg.late_qat_threshold > 0 and not state.qat and scale < cfg.late_qat_threshold:
                state.model.set_qat(True)
                log.log(f"step:{state.step} late QAT on (lr scale {scale:.3f} < {cfg.late_qat_threshold})")
            loss = training_step(state, scale, muon_momentum(state.step, cfg))
            bad = ~torch.isfinite(loss) & (nonfinite_step < 0)
            nonfinite_step = torch.where(bad, torch.full_like(nonfinite_step, state.step), nonfinite_step)
            state.step += 1
            if cfg.swa_enabled and scale < cfg.swa_threshold and state.step % cfg.swa_every == 0:
                state.swa.add(state.model)
            last = state.step == cfg.iterations
            # Whatever rests on a rank's own clock or signals (the stop, an interrupt, the loop switch, a
            # checkpoint by minutes) is agreed by every rank, on the flags of the step before while this
            # one runs, so those flags look one step ahead; a pause agrees on exact ones (flags()).
            earlier = agreement.post(lambda: self.flags(steps_ahead=1, running=agreement.lag)) or (False,) * 4
            loop_agreed = loop_agreed or earlier[2]
            logging = cfg.train_log_every > 0 and (state.step % cfg.train_log_every == 0 or state.step <= 5)
            validating = cfg.val_loss_every > 0 and state.step % cfg.val_loss_every == 0
            by_steps = self.checkpoint_due_by_steps()
            if not (logging or validating or last or by_steps or earlier[0] or earlier[1] or earlier[3]):
                continue
            clock.pause()  # logging, validation and checkpoints are not training time
            stop, interrupted, wants_loop, by_time, nonfinite = agreement.now(
                lambda: (*self.flags(steps_ahead=0, running=0), int(nonfinite_step) >= 0),
                lambda: self.flags(steps_ahead=1, running=0))
            loop_agreed = loop_agreed or wants_loop
            checkpointing = interrupted or by_steps or by_time
            if nonfinite:  # every rank stops here with its line, none waits in a collective
                seen = int(nonfinite_step)
                at = f"at step {seen + 1}" if seen >= 0 else "on another rank"
                saved = f"the last checkpoint is {self.checkpoint_path}" if os.path.exists(self.checkpoint_path) else "no checkpoint was saved"
                raise TrainingError(f"training loss became non-finite {at} ({saved}); lower the "
                                    f"learning rates (MATRIX_LR, TIED_EMBED_LR, SCALAR_LR) or check the data")
            if logging or last or stop:
                train_loss = mean_over_ranks(loss)
                log.log(f"step:{state.step}/{cfg.iterations} train_loss:{train_loss:.4f} lr_scale:{scale:.3f} "
                        f"train_time:{clock.elapsed_ms:.0f}ms step_avg:{clock.elapsed_ms / state.step:.2f}ms")
                log.metric(kind="train", step=state.step, train_loss=train_loss, lr_scale=scale, train_time_ms=clock.elapsed_ms)
            if (validating or last or stop) and self.validate is not None:  # VAL_LOSS_EVERY=0: at the end (both records)
                self.validate(state.model, state.step, clock.elapsed_ms)
            if checkpointing:
                self.save()
            if interrupted:
                raise Interrupted(f"interrupted at step {state.step}; continue with RESUME={self.checkpoint_path}")
            if stop:
                log.log(f"stopping at step {state.step}: the {cfg.max_wallclock_seconds:.0f}s wall-clock cap is reached")
                return
            clock.start()


class Scoring:
    """What the run scores with: validation tokens and byte tables, on this rank's share."""

    def __init__(self, cfg: Config, ctx: Dist):
        self.cfg, self.ctx = cfg, ctx
        check_tokenizer_matches(cfg.data_path, cfg.tokenizer_path)
        tables = build_byte_luts(load_tokenizer(cfg.tokenizer_path, cfg.vocab_size), cfg.vocab_size, ctx.device)
        # every validation token (the phased TTT scores each document whole, FRONTIER.md section 5), or whole
        # sequences for SPEC's windows
        seq_len = 1 if cfg.doc_isolated_attention else max(cfg.train_seq_len, cfg.eval_seq_len)
        self.tokens = load_validation_tokens(cfg.data_path, seq_len, cfg.max_val_tokens, vocab_size=cfg.vocab_size)
        # CaseOps shards carry the original text's bytes per token (FRONTIER.md section 1): they score when present
        self.luts = validation_byte_source(cfg.data_path, self.tokens.numel(), tables)
        self.share = dict(rank=ctx.rank, world_size=ctx.world_size)

    def contiguous(self, model: GPT) -> tuple[float, float]:
        """Non-overlapping TRAIN_SEQ_LEN windows; with document isolation, FRONTIER's diagnostic:
        rows of TRAIN_SEQ_LEN x EVAL_BATCH_SEQS tokens (65,536, whatever the number of GPUs: RoPE
        positions run along the row) whose documents attend only to themselves."""
        cfg = self.cfg
        with autocast(self.ctx.device):
            if cfg.doc_isolated_attention:
                return evaluate.evaluate_documents(model, self.tokens, cfg.train_seq_len, cfg.eval_batch_seqs, self.luts,
                                                   **self.share)
            batch_seqs = max(1, cfg.val_batch_size // cfg.train_seq_len // self.ctx.world_size)
            return evaluate.evaluate_contiguous(model, self.tokens, cfg.train_seq_len, batch_seqs, self.luts, **self.share)

    def pre_quantisation(self, log: RunLog, model: GPT) -> None:
        """FRONTIER's "pre-quant EMA" diagnostic: the weights the export will quantise, scored as
        the periodic validation scores."""
        val_loss, val_bpb = self.contiguous(model)
        model.train()
        log.log(f"final_prequant_ema val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}")
        log.metric(kind="prequant_ema", val_loss=val_loss, val_bpb=val_bpb)

    def during_training(self, log: RunLog, model: GPT, step: int, train_time_ms: float) -> None:
        val_loss, val_bpb = self.contiguous(model)
        model.train()
        log.log(f"step:{step} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{train_time_ms:.0f}ms")
        log.metric(kind="val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=train_time_ms)

    def final(self, log: RunLog, model: GPT, clock: EvalClock, reload) -> dict:
        """Every final score of the artifact loaded into `model`. The phased LoRA TTT (the frontier's
        score) comes first, on `clock`, which started before the artifact was read; it adapts the
        model, so the diagnostics then score a fresh copy from reload(). A document-isolated model
        has no sliding-window score (its attention never crosses a document; FRONTIER.md section 5)."""
        cfg, results = self.cfg, {}
        if cfg.ttt_enabled and cfg.ttt_method == "phased_lora":
            loss, bpb, times = phased_ttt_evaluation(model, self.tokens, cfg, self.luts, clock, log=log.log,
                                                     compile=None if cfg.compile else False, **self.share)
            results.update(ttt_val_loss=loss, ttt_val_bpb=bpb, eval_seconds=times["total"],
                           eval_projected_8gpu_seconds=times["projected_8gpu"])
            model = reload()
        t0 = time.perf_counter()
        results["val_loss"], results["val_bpb"] = self.contiguous(model)
        log.log(f"final_roundtrip val_loss:{results['val_loss']:.4f} val_bpb:{results['val_bpb']:.4f} "
                f"eval_time:{time.perf_counter() - t0:.1f}s")
        if cfg.doc_isolated_attention:
            return results
        with autocast(self.ctx.device):
            t0 = time.perf_counter()
            results["sliding_val_loss"], results["sliding_val_bpb"] = evaluate.evaluate_sliding(
                model, self.tokens, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, self.luts, **self.share)
            log.log(f"final_sliding val_loss:{results['sliding_val_loss']:.4f} val_bpb:{results['sliding_val_bpb']:.4f} "
                    f"(window {cfg.eval_seq_len}, stride {cfg.eval_stride}) eval_time:{time.perf_counter() - t0:.1f}s")
            if cfg.ttt_enabled and cfg.ttt_method == "sgd":
                t0 = time.perf_counter()
                results["ttt_val_loss"], results["ttt_val_bpb"] = evaluate.evaluate_ttt(model, self.tokens, cfg, self.luts, **self.share)
                log.log(f"final_ttt val_loss:{results['ttt_val_loss']:.4f} val_bpb:{results['ttt_val_bpb']:.4f} "
                        f"(legal score-first, chunks of {cfg.ttt_chunk_tokens}) eval_time:{time.perf_counter() - t0:.1f}s")
        return results


def export_artifact(state: TrainingState, log: RunLog) -> str:
    """Write the artifact (rank 0); every rank returns its path. Under QUANT=gptq rank 0 first
    calibrates on the training batches after the last step, in the time the run reserved for it."""
    ctx, path, failure = state.ctx, log.path(ARTIFACT), None
    if ctx.is_main:
        try:
            _write_artifact(state, log, path)
        except (ValueError, OSError) as e:  # over the budget, a failed write, a refused Hessian: one line
            failure = e
    # every rank learns how rank 0's export went (a barrier too), so none waits for a rank that failed
    message = from_rank_zero(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise TrainingError(f"rank 0's export failed: {message}")
    return path


def _write_artifact(state: TrainingState, log: RunLog, path: str) -> None:
    """Rank 0's export: under QUANT=gptq, calibrate on the training batches after the last step, in the
    time the run reserved for it; then quantise, compress and write the artifact."""
    model, cfg, ctx = state.model, state.cfg, state.ctx
    hessians = None
    if cfg.quant == "gptq":
        hessians, seconds = calibrate(model, state.loader, cfg, ctx.device)
        used_s = state.clock.elapsed_ms / 1000 + seconds
        cap = f" of the {cfg.max_wallclock_seconds:.0f}s cap" if cfg.max_wallclock_seconds > 0 else ""
        log.log(f"gptq: calibration on {cfg.gptq_calibration_batches} training batches took {seconds:.2f}s of the "
                f"{cfg.gptq_reserve_seconds:.2f}s reserved; training + calibration {used_s:.1f}s{cap}")
        if cfg.max_wallclock_seconds > 0 and used_s > cfg.max_wallclock_seconds:
            log.log(f"WARNING: training + calibration passed the cap by {used_s - cfg.max_wallclock_seconds:.2f}s; "
                    f"raise GPTQ_RESERVE_SECONDS (the rehearsal measured less than the calibration took)")
    t0, report = time.perf_counter(), {}
    size = export.write_model_artifact(model, path, cfg, hessians=hessians, code_bytes=counted_code_bytes(cfg),
                                       report=report)
    for line in export.format_report(report, size, compressor=cfg.compressor):
        log.log(line)
    log.log(f"export: {path} written in {time.perf_counter() - t0:.1f}s (QUANT={cfg.quant}, COMPRESSOR={cfg.compressor})")


@functools.lru_cache(maxsize=1)
def packaged_code() -> bytes:
    """The run's sources as one self-extracting file (model/code_package.py), packed once, the first
    time it is asked for (the run calls it at its start): the record holds these very bytes. Run
    from that file (python train_gpt.py ...), its own bytes: the code that runs is the code counted."""
    package = code_package.running_package()
    return package if package is not None else code_package.build(source_files(), REPO)


def counted_code_bytes(cfg: Config) -> int:
    """The code the artifact's budget counts: for the frontier (QUANT=gptq) the size of the packed
    file the record holds, so the count is a file's size; for SPEC's system its raw source files;
    run from the packed file, whatever QUANT, that file's size (no other code runs)."""
    if cfg.quant == "gptq" or code_package.running_package() is not None:
        return len(packaged_code())
    return export.code_bytes(source_files())


def load_artifact(path: str, cfg: Config, ctx: Dist, compiled: bool) -> GPT:
    """A fresh model holding the artifact's weights, looped when the config loops (every frontier
    evaluation runs looped); `compiled`: its scoring entry points compiled."""
    fresh = GPT(cfg).to(ctx.device)
    fresh.load_state_dict(export.read_artifact(path))
    fresh.looping = cfg.num_loops > 0
    if compiled and cfg.compile:  # scoring 62M tokens through 2048-token windows is worth a compiled graph
        evaluate.compile_for_eval(fresh)
    return fresh


def score_artifact(path: str, cfg: Config, ctx: Dist, log: RunLog, scoring: Scoring, **run_facts) -> None:
    """Load the artifact into a fresh model, score it every way, check the byte budget and write
    the record: every reported score comes from this round trip."""
    # rank 0's count (of the sources it packed at the start) on every rank: one budget verdict for all
    artifact_bytes, code_bytes = os.path.getsize(path), from_rank_zero(counted_code_bytes(cfg) if ctx.is_main else None)
    log.log(f"artifact_bytes:{artifact_bytes} code_bytes:{code_bytes} total_bytes:{artifact_bytes + code_bytes} "
            f"budget:{cfg.artifact_budget_bytes}")
    try:
        export.check_budget(artifact_bytes, code_bytes, cfg.artifact_budget_bytes)
    except ValueError as e:
        log.log(f"WARNING: {e} (evaluating anyway; the run will end with an error)")
    clock = EvalClock()  # the evaluation's clock starts before the artifact is read
    phased = cfg.ttt_enabled and cfg.ttt_method == "phased_lora"  # the phased TTT compiles its own forward
    fresh = load_artifact(path, cfg, ctx, compiled=not phased)
    results = scoring.final(log, fresh, clock, functools.partial(load_artifact, path, cfg, ctx, True))
    results.update(run_facts, artifact_bytes=artifact_bytes, code_bytes=code_bytes,
                   total_bytes=artifact_bytes + code_bytes, seed=cfg.seed)
    log.metric(kind="final", **results)
    export.check_budget(artifact_bytes, code_bytes, cfg.artifact_budget_bytes)
    if ctx.is_main:
        package = packaged_code() if cfg.quant == "gptq" or code_package.running_package() is not None else False
        log.log(f"record: {submission.write_record(log.folder, source_files(), package=package)}")


def trained_so_far(folder: str) -> dict:
    """Steps and training time of the run in `folder` (its last logged train step), for a scored artifact's record."""
    try:
        rows = [m for m in submission.read_metrics(folder) if m.get("kind") == "train"]
    except (FileNotFoundError, ValueError):
        rows = []
    return {"steps": rows[-1]["step"], "train_time_ms": rows[-1]["train_time_ms"]} if rows else {}


def checked_data(cfg: Config, ctx: Dist) -> tuple[int | None, Scoring]:
    """(train tokens, scoring data): every train shard's header (unless only scoring), the tokenizer
    and the validation tokens, read and checked now, not at step 15,000."""
    return (None if cfg.eval_only else check_train_shards(cfg.data_path)), Scoring(cfg, ctx)


def checked_kernel_shapes(cfg: Config) -> None:
    """The triton attention kernel's head dims (the reference takes any): one line now, not at warm-up."""
    if kernels.backend() == "triton" and cfg.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"MODEL_DIM={cfg.model_dim} / NUM_HEADS={cfg.num_heads} gives head dim {cfg.head_dim}; the triton "
                         f"attention kernel takes {', '.join(map(str, SUPPORTED_HEAD_DIMS))}: change them or set KERNELS=reference")


def checked_resume(cfg: Config, device: torch.device) -> dict | None:
    """The RESUME checkpoint, opened and checked before the warm-up spends minutes compiling."""
    if not cfg.resume:
        return None
    state = load_checkpoint(cfg.resume, map_location=device, required_keys=TRAINING_STATE_KEYS)
    if not isinstance(state["config"], dict):
        raise ResumeRefused(f"checkpoint {cfg.resume} holds no config dict; resume from a checkpoint.pt this train.py wrote")
    different = cfg.model_differences(state["config"])
    if different:
        raise ResumeRefused(f"checkpoint {cfg.resume} was made with another model ({', '.join(different)}); "
                            f"resume with the settings it was trained with")
    return state


def checked_artifact(cfg: Config) -> None:
    """--eval-only: the artifact must exist, and the config.json beside it must describe the same model."""
    if not os.path.isfile(cfg.eval_only):
        raise FileNotFoundError(f"artifact {cfg.eval_only} does not exist; pass the {ARTIFACT} of a run")
    saved = os.path.join(os.path.dirname(os.path.abspath(cfg.eval_only)), "config.json")
    if os.path.isfile(saved):
        with open(saved) as f:
            different = cfg.model_differences(json.load(f))
        if different:
            raise ResumeRefused(f"{cfg.eval_only} was made with another model ({', '.join(different)}); "
                                f"score it with the settings it was trained with (see {saved})")


def run(cfg: Config, ctx: Dist) -> None:
    folder = run_folder(cfg)
    if cfg.eval_only:
        checked_artifact(cfg)
    resume_state = checked_resume(cfg, ctx.device)
    if cfg.compressor == "pergroup" and cfg.pergroup_coder == "lrzip" and not compressors.lrzip_available():
        raise TrainingError("PERGROUP_CODER=lrzip: the lrzip program is not on PATH (apt-get install lrzip); "
                            "install it or use PERGROUP_CODER=brotli")  # said now, not after ten minutes of training
    # Data named by DATA_PATH is read and checked before the run folder is touched, so a failed start
    # leaves nothing behind; the smoke preset's generated data lives in the folder, so it comes after.
    data = checked_data(cfg, ctx) if cfg.data_path else None
    if cfg.quant == "gptq" and ctx.is_main:
        packaged_code()  # the sources as they are now, when this process imported them
    claim_run_folder(cfg, folder, ctx)
    log = RunLog(folder, ctx.is_main)
    cfg = prepare_data(cfg, log, ctx)
    train_tokens, scoring = data or checked_data(cfg, ctx)
    if not cfg.eval_only or not os.path.isfile(log.path("config.json")):
        log.write_text("config.json", cfg.to_json() + "\n")
    log.log(f"run {os.path.basename(folder)}: world_size {ctx.world_size}, device {ctx.device}, kernels {kernels.backend()}, "
            f"torch {torch.__version__}")
    log.log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    if cfg.eval_only:
        log.log(f"eval-only: scoring {cfg.eval_only}; bytes from the {describe_byte_source(scoring.luts)}")
        path = log.path(ARTIFACT)
        if ctx.is_main and os.path.abspath(cfg.eval_only) != os.path.abspath(path):
            with open(cfg.eval_only, "rb") as f:  # the record is built from the run folder
                atomic_write(path, f.read())
        barrier()
        score_artifact(path, cfg, ctx, log, scoring, **trained_so_far(os.path.dirname(os.path.abspath(cfg.eval_only))))
        return
    log.log(f"data: {len(shard_paths(cfg.data_path, 'train'))} train shards ({train_tokens:,} tokens), "
            f"{scoring.tokens.numel() - 1:,} validation targets; bytes from the {describe_byte_source(scoring.luts)}")

    # FRONTIER's document-aligned rows with their cu_seqlens, or SPEC's token stream; read one batch
    # ahead on a thread: the same batches in the same order, and exact resume (model/prefetch.py)
    kind = DocumentLoader if cfg.doc_isolated_attention else DistributedTokenLoader
    loader = PrefetchLoader(kind(cfg.data_path, ctx.rank, ctx.world_size, vocab_size=cfg.vocab_size))
    state = build_training_state(cfg, ctx, loader)
    if resume_state is not None:
        state.check_resumable(resume_state, f"checkpoint {cfg.resume}")  # its contents, before the warm-up
    log.log(f"model_params:{sum(p.numel() for p in state.model.parameters())}")
    if state.grad_sync is not None:  # no DDP: what each rank's gradient communication moves per step
        sent = state.grad_sync.bytes_per_step(state.optimizers[0].param_groups[0]["compute_dtype"])
        log.log("grad_comm: " + ", ".join(f"{kind} {size / 1e6:.1f} MB" for kind, size in sent.items())
                + f" per step per rank ({cfg.grad_comm} gradients, {len(state.grad_sync.plan.buckets)} Muon buckets)")
    if cfg.quant == "gptq" and resume_state is not None:  # the reserve the run measured, so its schedule stays put
        state.cfg = cfg = dataclasses.replace(cfg, gptq_reserve_seconds=resume_state["config"]["gptq_reserve_seconds"])
        log.log(f"gptq: keeping the checkpoint's reserve of {cfg.gptq_reserve_seconds:.2f}s for calibration")
    elif cfg.quant == "gptq":  # GPTQ reads training data: its calibration is timed now and reserved from the clock
        seconds = from_rank_zero(rehearse(state.model, loader, cfg, ctx.device) if ctx.is_main else 0.0)
        state.cfg = cfg = with_measured_reserve(cfg, seconds)
        log.log(f"gptq: a calibration rehearsal took {seconds:.2f}s; training stops {cfg.gptq_reserve_seconds:.2f}s "
                f"before the cap to leave it that time")
    Trainer(state, log, functools.partial(scoring.during_training, log)).run(resume=resume_state)  # the final weights in state.model
    with interrupts_explained(f"the final training state is {log.path('checkpoint.pt')}: RESUME={log.path('checkpoint.pt')} "
                              f"exports and scores it again"):
        if state.ema is not None:
            scoring.pre_quantisation(log, state.model)
        path = export_artifact(state, log)
        state.loader.close()  # GPTQ's calibration was its last reader: its threads and mapped shards go
    with interrupts_explained(f"the artifact is complete: score it with --eval-only {path}"):
        score_artifact(path, cfg, ctx, log, scoring, steps=state.step, train_time_ms=state.clock.elapsed_ms)


def dry_run(cfg: Config) -> None:
    print(cfg.to_json())
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        model = GPT(cfg)
    print(f"model_params:{sum(p.numel() for p in model.parameters())}")


def fail(message: str, code: int) -> int:
    for line in str(message).splitlines():
        print(f"train.py: {line}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:
        cfg, flags = load_config(sys.argv[1:] if argv is None else argv)
        if "--help" in flags:
            print(help_text())
            return 0
        cfg.grad_accum_steps(world_size_from_environment())  # before any process group can hang
        checked_kernel_shapes(cfg)
    except ValueError as e:
        return fail(str(e), 2)
    if os.environ.get("RANK", "0") == "0":
        for warning in setting_warnings():
            print(f"train.py: warning: {warning}", file=sys.stderr)
    if "--dry-run" in flags:
        dry_run(cfg)
        return 0
    ctx = setup_distributed()
    try:
        run(cfg, ctx)
        return 0
    except Interrupted as e:
        return fail(str(e), 130)
    except (TrainingError, ValueError, OSError) as e:  # OSError: WriteFailed, a missing file, a refused read
        return fail(str(e), 1)
    except torch.OutOfMemoryError:
        return fail(f"out of GPU memory; lower TRAIN_BATCH_TOKENS or raise GRAD_ACCUM_TOTAL (micro-batch "
                    f"{cfg.train_batch_tokens // cfg.grad_accum_total} tokens per rank), or EVAL_BATCH_SEQS/TTT_BATCH_SEQS "
                    f"if it happened in evaluation", 1)
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
