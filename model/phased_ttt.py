"""The frontier's evaluation: phased LoRA test-time training (FRONTIER.md section 5), legal by
construction and deterministic.

Documents: doc i = tokens[BOS_i .. BOS_(i+1)] inclusive (the last ends at the stream's end), so
each predicts its following BOS and every target of the stream is scored exactly once.

Batches: the documents sorted by length (ties by index) and cut into TTT_BATCH_SIZE; the last
batch holds the longest (and may be short). They run longest first.

A batch: each document has its own LoRA adapters (model/lora.py). A document with P predictions
has ceil(P / TTT_CHUNK_SIZE) chunks; chunk c covers predictions [48c, e_c), e_c = min(48(c+1), P),
from the window [max(0, e_c - TTT_EVAL_SEQ_LEN), e_c), right-padded. The batch's documents run
chunk c together (those with fewer chunks drop out): one forward gives every row's NLL; chunk c's
NLL and bytes are added to the sums (SCORE); then, for the documents where c is not the last
chunk, loss = sum over documents of the mean NLL of chunk c, one AdamW step on the adapters
(TRAIN). So every target is scored before any update it takes part in.
Adapters: B = 0 at each batch (a fresh adapter changes nothing), Adam's state new, A carried over
from the lane's previous batch (TTT_WARM_START_A); a fresh seeded A after each global phase and
whenever the batch size changes (the short batch).

Global phases: boundaries floor(PHASED_TTT_PREFIX_DOCS k / PHASED_TTT_NUM_PHASES), k = 1..; phase
k runs after the first batch (in processing order) at which the documents of all batches so far
reach boundary k; its documents are those, sorted by (batch index in the length-sorted list,
position in the batch), the first boundary-k kept (cumulative: phase 2 retrains on phase 1's
documents). Their tokens (each with its trailing BOS) are concatenated and every model parameter
trains on them: chunks of GLOBAL_TTT_CHUNK_TOKENS (the last skipped), each chunk's
floor(len / TTT_EVAL_SEQ_LEN) sequences split over the ranks (document-isolated attention), the
mean CE over all of them, the gradient clipped to GLOBAL_TTT_GRAD_CLIP, SGD with momentum
GLOBAL_TTT_MOMENTUM at lr_c = GLOBAL_TTT_LR (1 + cos(pi c / (K - 1))) / 2, K chunks.

Where ours differs from the record (FRONTIER.md section 7, "not deterministic"), deliberately:
- The phase sets are fixed by the order of the batches, not by which batches happen to be in
  flight when a shared counter passes a boundary, so 1, 2 and 8 ranks train on the same sets.
- The record carries A per rank, from whichever batch that rank claimed last. Here A is carried
  along LORA_LANES = 8 fixed lanes (the record's 8 ranks): within a segment between phases the
  j-th batch runs on lane j mod 8, after the lane's previous batch; rank r runs the lanes
  l = r mod world_size. Every batch therefore starts from the same A on 1, 2 or 8 ranks.
- Every fresh A is drawn from a generator seeded by (SEED, the batch's position in the order).
"""
import math
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

import kernels
from model.bpb import bits_per_byte, byte_source_to, check_byte_source, scored_bytes
from model.distributed import barrier, sum_over_ranks, synchronize
from model.document_loader import document_cu_seqlens
from model.evaluate import all_reduce_gradients
from model.lora import AdapterView, BatchedLora
from model.precision import autocast

BOS_ID = 1  # FRONTIER.md section 1: every document starts with it
LORA_LANES = 8  # the record's 8 ranks: adapters' A is carried along this many lanes, whatever the world size
ADAM_EPS = 1e-10  # FRONTIER.md: the LoRA AdamW's eps
EVAL_LIMIT_S = 600.0  # the challenge's evaluation limit
MIN_WIDTH = 2  # windows are right-padded to at least this (dynamo specialises sizes 0 and 1)


# ----------------------------------------------------------------------------- the plan
class Documents(NamedTuple):
    """Document i = tokens[start[i] : start[i] + length[i]] (int64 numpy arrays [docs]); length
    counts its trailing BOS, so it makes length - 1 predictions."""

    start: np.ndarray
    length: np.ndarray


def split_documents(tokens) -> Documents:
    """The record's documents of a token stream that starts with a BOS."""
    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if tokens.ndim != 1 or tokens.size < 2 or tokens[0] != BOS_ID:
        raise ValueError(f"phased TTT needs a 1-D token stream of at least 2 tokens that starts with a BOS (id {BOS_ID}); "
                         f"got shape {tokens.shape}, first token {tokens[:1].tolist()}")
    starts = np.flatnonzero(tokens == BOS_ID).astype(np.int64)
    ends = np.append(starts[1:] + 1, tokens.size).astype(np.int64)  # inclusive of the next BOS
    keep = ends - starts >= 2  # a stream ending in a BOS leaves a last "document" with nothing to predict
    return Documents(start=starts[keep], length=(ends - starts)[keep])


class Chunk(NamedTuple):
    """Chunk c of a document: predictions [first, end) scored from the window [window_start, end)."""

    first: int
    end: int
    window_start: int


def num_chunks(predictions: int, chunk_size: int) -> int:
    return -(-predictions // chunk_size)


def chunk_window(predictions: int, c: int, chunk_size: int, window: int) -> Chunk:
    """FRONTIER.md's example: P = 3000, chunk 50 -> predictions [2400, 2448) from the window [400, 2448)."""
    end = min(chunk_size * (c + 1), predictions)
    return Chunk(first=chunk_size * c, end=end, window_start=max(0, end - window))


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Document indices of each batch: the documents sorted by (length, index), cut every batch_size."""
    order = np.lexsort((np.arange(len(lengths)), lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def processing_order(batches: list[np.ndarray], lengths: np.ndarray) -> list[int]:
    """Batch indices, longest first: descending max length, ties by descending index."""
    return sorted(range(len(batches)), key=lambda k: (int(lengths[batches[k]].max()), k), reverse=True)


def phase_boundaries(prefix_docs: int, num_phases: int) -> list[int]:
    """floor(prefix_docs k / num_phases), k = 1..num_phases (2500, 3 -> 833, 1666, 2500)."""
    return [prefix_docs * k // num_phases for k in range(1, num_phases + 1)]


class Phase(NamedTuple):
    after: int  # runs after this position of the processing order (0-based, inclusive)
    docs: np.ndarray  # document indices it trains on, in the order their tokens are concatenated


class Plan(NamedTuple):
    docs: Documents
    batches: list[np.ndarray]  # length-sorted
    order: list[int]  # processing order (batch indices)
    phases: list[Phase]


def make_plan(tokens, cfg) -> Plan:
    docs = split_documents(tokens)
    batches = length_sorted_batches(docs.length, cfg.ttt_batch_size)
    order = processing_order(batches, docs.length)
    counts = np.cumsum([len(batches[k]) for k in order])
    phases = []
    for boundary in phase_boundaries(cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases):
        if boundary <= 0 or boundary > counts[-1]:
            continue  # fewer documents than the boundary: the record's pause never comes
        after = int(np.searchsorted(counts, boundary))  # first position whose running count reaches it
        scored = sorted((k, slot) for k in order[:after + 1] for slot in range(len(batches[k])))
        phases.append(Phase(after=after, docs=np.array([batches[k][slot] for k, slot in scored[:boundary]])))
    return Plan(docs, batches, order, phases)


def segments(plan: Plan) -> list[tuple[int, int, Phase | None]]:
    """(first, stop, phase) runs of processing positions; the phase (if any) follows the run."""
    out, first = [], 0
    for phase in plan.phases:
        out.append((first, phase.after + 1, phase))
        first = phase.after + 1
    out.append((first, len(plan.order), None))
    return [(a, b, p) for a, b, p in out if b > a or p is not None]


def lane_of(position: int, segment_first: int) -> int:
    return (position - segment_first) % LORA_LANES


def lora_work(plan: Plan, positions, cfg) -> int:
    """Token-rows one forward + backward of each step processes (rows x window), summed over the
    given processing positions: what the LoRA part's time scales with."""
    work = 0
    for position in positions:
        predictions = np.sort(plan.docs.length[plan.batches[plan.order[position]]] - 1)
        for c in range(num_chunks(int(predictions[-1]), cfg.ttt_chunk_size)):
            active = predictions[predictions > cfg.ttt_chunk_size * c]
            ends = np.minimum(cfg.ttt_chunk_size * (c + 1), active)
            width = max(int((ends - np.maximum(0, ends - cfg.ttt_eval_seq_len)).max()), MIN_WIDTH)
            work += len(active) * width
    return work


def global_steps(plan: Plan, cfg) -> int:
    """SGD steps of all global phases (GLOBAL_TTT_EPOCHS x (chunks - 1) each)."""
    steps = 0
    for phase in plan.phases:
        tokens = int(plan.docs.length[phase.docs].sum())
        steps += cfg.global_ttt_epochs * max(0, num_chunks(tokens, cfg.global_ttt_chunk_tokens) - 1)
    return steps


# ----------------------------------------------------------------------------- one batch
def lora_token_losses(model, ids: torch.Tensor, targets: torch.Tensor, lora: AdapterView) -> torch.Tensor:
    """Per-token NLL [n, T] (fp32) of the running documents with their adapters (lora =
    BatchedLora.running(first)): the model's trunk with the block adapters, the head's adapter
    inside the soft-capped CE."""
    lora = lora.gathered()  # the running rows' adapters, gathered inside the (compiled) step
    h = model.hidden(ids, lora=lora)  # [n, T, d], final-normed
    head_a, head_b = lora.head
    return kernels.softcap_cross_entropy_lora(h, model.tok_emb.weight, targets, head_a, head_b, lora.scale,
                                              model.cfg.logit_softcap)


def _run_batch(model, step_fn, tokens, doc_ids, plan: Plan, lora: BatchedLora, cfg, luts, sums, trace) -> None:
    """Score-then-train every chunk of one batch's documents (doc_ids, sorted by length)."""
    device = tokens.device
    starts = plan.docs.start[doc_ids]
    predictions = plan.docs.length[doc_ids] - 1  # ascending
    chunks = -(-predictions // cfg.ttt_chunk_size)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2),
                                  eps=ADAM_EPS, weight_decay=cfg.ttt_weight_decay)
    for c in range(int(chunks[-1])):
        first = int(np.searchsorted(chunks, c, side="right"))  # documents with more than c chunks: a suffix
        ends = np.minimum(cfg.ttt_chunk_size * (c + 1), predictions[first:])
        window_starts = np.maximum(0, ends - cfg.ttt_eval_seq_len)
        widths = ends - window_starts
        width = max(int(widths.max()), MIN_WIDTH)  # padded: a compiled step never meets a 1-wide window
        column = np.arange(width)
        inside = column[None, :] < widths[:, None]  # [m, width]
        position = (starts[first:] + window_starts)[:, None] + column[None, :]  # of each input in the stream
        scored = inside & (window_starts[:, None] + column[None, :] >= cfg.ttt_chunk_size * c)
        trained = scored & (c < chunks[first:] - 1)[:, None]
        position_t = torch.as_tensor(np.where(inside, position, 0), device=device)
        inside_t, scored_t = torch.as_tensor(inside, device=device), torch.as_tensor(scored, device=device)
        ids = torch.where(inside_t, tokens[position_t], 0)  # right-padded with token 0
        targets = torch.where(inside_t, tokens[position_t + 1], 0)
        for step in range(cfg.ttt_grad_steps):
            with autocast(device):
                nll = step_fn(model, ids, targets, lora.running(first))  # [m, width]
            if step == 0:  # SCORE, before any update that chunk c takes part in
                sums[0] += torch.where(scored_t, nll.detach().double(), 0.0).sum()
                sums[1] += scored_t.sum()
                sums[2] += torch.where(scored_t, scored_bytes(luts, ids, targets, position_t + 1), 0).sum()
                if trace is not None:
                    trace("score", position[scored] + 1, nll.detach()[scored_t])
            if not trained.any():
                break
            if trace is not None:
                rows = trained.any(1)[:, None]  # inputs of the trained rows, but a document's own BOS
                used_inputs = position[rows & inside & (position > starts[first:, None])]
                trace("train", np.concatenate([position[trained] + 1, used_inputs]), None)
            weight = torch.as_tensor(trained / np.maximum(trained.sum(1, keepdims=True), 1), device=device, dtype=nll.dtype)
            optimizer.zero_grad(set_to_none=False)
            (nll * weight).sum().backward()  # sum over documents of the mean NLL of chunk c
            optimizer.step()
    for p in lora.parameters():  # a lane keeps its adapters for the next batch, not their gradients
        p.grad = None


# ----------------------------------------------------------------------------- global phases
def global_lr(cfg, c: int, chunks: int) -> float:
    return cfg.global_ttt_lr * 0.5 * (1.0 + math.cos(math.pi * c / max(1, chunks - 1)))


def _global_phase(model, tokens, plan: Plan, phase: Phase, cfg, rank: int, world_size: int, trace) -> int:
    """SGD on every model parameter over the phase's documents; returns the steps taken."""
    device = tokens.device
    pieces = [tokens[int(plan.docs.start[i]):int(plan.docs.start[i] + plan.docs.length[i])] for i in phase.docs]
    stream = torch.cat(pieces)  # each document with its trailing BOS
    if trace is not None:
        trace("global", np.concatenate([np.arange(plan.docs.start[i] + 1, plan.docs.start[i] + plan.docs.length[i])
                                        for i in phase.docs]), None)
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    seq_len, chunk_tokens = cfg.ttt_eval_seq_len, cfg.global_ttt_chunk_tokens
    chunks = num_chunks(stream.numel(), chunk_tokens)
    steps = 0
    for _ in range(cfg.global_ttt_epochs):
        for c in range(chunks - 1):  # the last chunk is skipped
            first = c * chunk_tokens
            count = min(chunk_tokens, stream.numel() - first) // seq_len
            if count == 0:
                continue
            share = range(count * rank // world_size, count * (rank + 1) // world_size)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(share.start, share.stop, cfg.global_ttt_batch_seqs):
                seqs = range(micro, min(micro + cfg.global_ttt_batch_seqs, share.stop))
                index = first + torch.arange(seqs.start, seqs.stop, device=device)[:, None] * seq_len \
                    + torch.arange(seq_len + 1, device=device)
                rows = stream[index]  # [s, seq_len + 1]
                inputs = rows[:, :-1]
                # segments at row starts and BOS only (no cut inside a row's document: the rows of other
                # ranks are not this rank's to count from)
                cu_seqlens = document_cu_seqlens(inputs, inputs.numel()).to(device)
                with autocast(device):
                    loss = model(inputs, rows[:, 1:], cu_seqlens)
                (loss * (len(seqs) / count)).backward()  # summed over ranks: the mean over all sequences
            all_reduce_gradients(params, world_size)
            if cfg.global_ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.global_ttt_grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = global_lr(cfg, c, chunks)
            optimizer.step()
            steps += 1
    for p in params:
        p.grad = None
    return steps


# ----------------------------------------------------------------------------- the evaluation
class PhasedResult(NamedTuple):
    val_loss: float
    val_bpb: float
    lora_seconds: float  # this rank's LoRA part (scoring and adapter training)
    global_seconds: float  # this rank's global phases
    lora_work: int  # token-rows this rank processed in the LoRA part (lora_work)
    global_steps: int


def _fresh_seed(cfg, position: int) -> int:
    return cfg.seed * 1_000_003 + position


def evaluate_phased_ttt(model, tokens: torch.Tensor, cfg, luts, rank: int = 0, world_size: int = 1,
                        step_fn: Callable = lora_token_losses, trace: Callable = None,
                        clock: Callable[[], float] = time.perf_counter) -> PhasedResult:
    """Phased LoRA TTT over the validation stream `tokens` (1-D, starting with a BOS); adapts
    `model` IN PLACE in the global phases (pass a copy to keep it). Pass the plain module in its
    evaluation loop state (model.looping on for the frontier); `step_fn(model, ids, targets,
    lora) -> nll` may be a compiled lora_token_losses. With world_size > 1 call it on every rank
    of the default process group: the sums are all-reduced and every rank returns the totals.

    trace(kind, positions, values), for tests: "score" with the stream positions of the targets
    just scored and their NLL; "train" with the positions an adapter update is about to use;
    "global" with the positions a global phase is about to train on.
    """
    if cfg.ttt_chunk_size > cfg.ttt_eval_seq_len:
        raise ValueError(f"TTT_CHUNK_SIZE={cfg.ttt_chunk_size} exceeds TTT_EVAL_SEQ_LEN={cfg.ttt_eval_seq_len}: a chunk's "
                         "window could not reach its first prediction; lower the chunk or lengthen the window")
    check_byte_source(luts, tokens.numel())
    device = next(model.parameters()).device
    tokens, luts = tokens.to(device), byte_source_to(luts, device)
    plan = make_plan(tokens, cfg)
    applications = len(model.plan())
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    lora_s = global_s = 0.0
    work = steps = 0
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for seg_first, seg_stop, phase in segments(plan):
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            started = clock()
            lanes: dict[int, BatchedLora] = {}  # fresh adapters at every segment (after every phase)
            mine = [j for j in range(seg_first, seg_stop) if lane_of(j, seg_first) % world_size == rank]
            for position in mine:
                doc_ids = plan.batches[plan.order[position]]
                lane = lane_of(position, seg_first)
                lora = lanes.get(lane)
                if lora is None or lora.docs != len(doc_ids) or not cfg.ttt_warm_start_a:
                    lora = lanes[lane] = BatchedLora(cfg, applications, len(doc_ids), device=device)
                    lora.reset_a(torch.Generator(device=device).manual_seed(_fresh_seed(cfg, position)))
                lora.reset_b()
                _run_batch(model, step_fn, tokens, doc_ids, plan, lora, cfg, luts, sums, trace)
            work += lora_work(plan, mine, cfg)
            lanes.clear()
            synchronize(device)  # the host clock must not run ahead of the GPU
            lora_s += clock() - started
            if phase is not None:
                # every rank's LoRA batches done before the phase's clock starts: its first gradient
                # all-reduce would otherwise wait for the slower ranks inside the timed phase
                if world_size > 1:
                    barrier()
                started = clock()
                model.train()
                for p in model.parameters():
                    p.requires_grad_(True)
                steps += _global_phase(model, tokens, plan, phase, cfg, rank, world_size, trace)
                synchronize(device)
                global_s += clock() - started
    finally:
        model.train(was_training)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
    if world_size > 1:
        sums = sum_over_ranks(sums)
    nll_sum, count, byte_count = (float(v) for v in sums.tolist())
    return PhasedResult(nll_sum / count, bits_per_byte(nll_sum, byte_count), lora_s, global_s, work, steps)


# ----------------------------------------------------------------------------- timed, end to end
class EvalClock:
    """The evaluation's wall clock: make it BEFORE the artifact is read; lap(name) adds the time
    since the previous lap (or the start) to part `name`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = self.last = clock()
        self.parts: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = self.clock()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.last
        self.last = now
        return self.parts[name]

    def total(self) -> float:
        return self.last - self.start


def compile_ttt_step(step_fn: Callable = lora_token_losses, backend="inductor") -> Callable:
    """The TTT forward compiled as the record does: dynamic shapes (rows and window widths vary), not
    fullgraph. Duck shaping off: sizes that happen to be equal when a graph is compiled (a window
    as wide as the LoRA rank) must not become guards that a later step fails. After warm_up_ttt,
    every step of the evaluation reuses its graphs (tests/test_phased_ttt.py counts them)."""
    compiled = torch.compile(step_fn, dynamic=True, backend=backend)

    def step(model, ids, targets, lora):
        with fx_config.patch(use_duck_shape=False):
            return compiled(model, ids, targets, lora)

    return step


def warm_up_ttt(model, step_fn: Callable, cfg) -> None:
    """Forward, backward and an AdamW step on random tokens through every graph the evaluation's
    steps need, on scratch adapters of TTT_BATCH_SIZE documents: windows of TTT_CHUNK_SIZE and of
    TTT_EVAL_SEQ_LEN tokens, with all rows but the first running (the general graph: any number of
    rows >= 2, any width >= 2, any batch size) and with one row (dynamo's size-1 specialisation),
    the model in its evaluation state (eval mode, frozen). The model is unchanged."""
    device = next(model.parameters()).device
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    generator = torch.Generator(device=device).manual_seed(0)
    docs = max(cfg.ttt_batch_size, 3)  # two rows or more while one has dropped out
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        lora = BatchedLora(cfg, len(model.plan()), docs, device=device)
        lora.reset_a(generator)
        optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, eps=ADAM_EPS)
        for first in (1, docs - 1):
            for width in sorted({max(cfg.ttt_chunk_size, MIN_WIDTH), max(cfg.ttt_eval_seq_len, MIN_WIDTH)}):
                # fresh contiguous tensors, as the loop's (not views: a view's base would be guarded on)
                inputs, targets = (torch.randint(2, cfg.vocab_size, (docs - first, width), generator=generator,
                                                 device=device) for _ in range(2))
                with autocast(device):
                    nll = step_fn(model, inputs, targets, lora.running(first))
                optimizer.zero_grad(set_to_none=False)
                nll.mean().backward()
                optimizer.step()
    finally:
        model.train(was_training)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def lane_work(plan: Plan, cfg) -> np.ndarray:
    """Token-rows of the LoRA part on each of the LORA_LANES lanes (one GPU each on 8 GPUs)."""
    work = np.zeros(LORA_LANES, dtype=np.int64)
    for first, stop, _ in segments(plan):
        for position in range(first, stop):
            work[lane_of(position, first)] += lora_work(plan, [position], cfg)
    return work


class Projection(NamedTuple):
    lora_s: float
    global_s: float
    total_s: float  # load + compile (as measured) + the two parts on `gpus` GPUs


def project_eval_seconds(parts: dict, result: PhasedResult, full_plan: Plan, cfg, world_size: int,
                         gpus: int = LORA_LANES) -> Projection:
    """The whole evaluation of full_plan's documents on `gpus` GPUs (one lane each), from this run's
    rates: LoRA seconds per token-row (all ranks' seconds over all ranks' work: pass the summed
    result) times the busiest lane's token-rows; a global step's seconds times world_size / gpus
    (its sequences split over the ranks), or, with no global step measured, the LoRA rate times a
    step's 3 x GLOBAL_TTT_CHUNK_TOKENS token-rows (a full model backward is about twice its
    forward: an estimate). Load and compile are taken as measured."""
    rate = result.lora_seconds / max(1, result.lora_work)
    lora_s = float(lane_work(full_plan, cfg).max()) * rate
    steps = global_steps(full_plan, cfg)
    if result.global_steps:
        step_s = result.global_seconds / result.global_steps * world_size / gpus
    else:
        step_s = rate * 3 * cfg.global_ttt_chunk_tokens / gpus
    global_s = steps * step_s
    fixed = sum(seconds for name, seconds in parts.items() if name in ("load", "compile"))
    return Projection(lora_s, global_s, fixed + lora_s + global_s)


def phased_ttt_evaluation(model, tokens: torch.Tensor, cfg, luts, clock: EvalClock, rank: int = 0,
                          world_size: int = 1, log: Callable[[str], None] = print, compile: bool = None,
                          full_tokens: torch.Tensor = None) -> tuple[float, float, dict]:
    """The frontier's scored evaluation, on the clock: call it right after the artifact is loaded
    into `model` (the dequantised GPT, model.looping set as evaluated) with the EvalClock made
    before the artifact was read. Laps: "load" (clock start to this call), "compile" (compile and
    warm-up of the TTT forward; default on CUDA only), "ttt" (the phased TTT to its last score).
    Logs each part, the total, and the projection on 8 GPUs of the "full set" (full_tokens: the
    whole validation stream when `tokens` is a MAX_VAL_TOKENS slice of it) or, without
    full_tokens, of the "scored set" (`tokens` itself, which is the full set only when nothing
    sliced it), with a WARNING line naming that set when it passes the 600 s limit. Every rank
    calls it.
    Returns (val_loss, val_bpb, times: the laps, "total", "projected_8gpu")."""
    clock.lap("load")
    device = next(model.parameters()).device
    compile = device.type == "cuda" if compile is None else compile
    step_fn = lora_token_losses
    if compile:
        step_fn = compile_ttt_step()
        warm_up_ttt(model, step_fn, cfg)
    synchronize(device)
    clock.lap("compile")
    result = evaluate_phased_ttt(model, tokens, cfg, luts, rank, world_size, step_fn=step_fn, clock=clock.clock)
    synchronize(device)
    clock.lap("ttt")
    summed = result
    if world_size > 1:  # the rates from all ranks' seconds and work
        totals = sum_over_ranks(torch.tensor([result.lora_seconds, result.lora_work], dtype=torch.float64, device=device))
        summed = result._replace(lora_seconds=float(totals[0]), lora_work=int(totals[1]))
    full_plan = make_plan(tokens if full_tokens is None else full_tokens, cfg)
    projected_set = "scored set" if full_tokens is None else "full set"
    projection = project_eval_seconds(clock.parts, summed, full_plan, cfg, world_size)
    plan_docs = len(full_plan.docs.start)
    log(f"phased_ttt val_loss:{result.val_loss:.6f} val_bpb:{result.val_bpb:.6f} "
        f"lora_token_rows:{summed.lora_work} global_steps:{result.global_steps}")
    log(f"eval_time load:{clock.parts['load']:.1f}s compile:{clock.parts['compile']:.1f}s ttt:{clock.parts['ttt']:.1f}s "
        f"(lora {result.lora_seconds:.1f}s, global phases {result.global_seconds:.1f}s) total:{clock.total():.1f}s "
        f"on {world_size} rank(s)")
    log(f"eval_time_projected {projected_set} ({plan_docs:,} documents) on {LORA_LANES} GPUs: {projection.total_s:.0f}s "
        f"(load + compile {projection.total_s - projection.lora_s - projection.global_s:.0f}s, "
        f"lora {projection.lora_s:.0f}s, global {projection.global_s:.0f}s)")
    if projection.total_s > EVAL_LIMIT_S:
        log(f"WARNING: the projected evaluation time of the {projected_set} ({plan_docs:,} documents) on {LORA_LANES} "
            f"GPUs, {projection.total_s:.0f}s, exceeds the {EVAL_LIMIT_S:.0f}s limit")
    times = dict(clock.parts, total=clock.total(), projected_8gpu=projection.total_s)
    return result.val_loss, result.val_bpb, times

