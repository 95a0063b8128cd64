"""Validation: loss (nats per token) and bits per byte, three ways (SPEC.md "Evaluation").

- evaluate_contiguous: non-overlapping sequences; cheap, used during training.
- evaluate_documents: the frontier's diagnostic: non-overlapping rows, attention isolated per document.
- evaluate_sliding: overlapping windows so (almost) every target sees window - stride tokens of
  context; the reported score.
- evaluate_ttt: legal score-first test-time training: each chunk of the validation stream is
  scored (sliding windows, no gradients) before the model adapts on it; the last chunk is
  never trained on.

Terms: `tokens` is the 1-D validation stream; target j is tokens[j + 1], predicted from
tokens[..j]. The model has `token_losses(ids [B, T], targets [B, T]) -> [B, T]` NLL (nats) and
`forward(ids, targets) -> mean loss`. Every function returns (val_loss, val_bpb); the sums
behind them are float64 and, with world_size > 1, all-reduced over the ranks of the default
process group (call it on every rank).

`luts` is the byte source (model.bpb.ByteSource): the tokenizer's byte tables, or SidecarBytes
when the validation shards have byte sidecars (the CaseOps data); model.bpb.validation_byte_source
picks it for a data folder and describe_byte_source names it for the log.

Scoring runs under torch.no_grad(), not inference_mode: TTT trains the model after scoring it,
and tensors made under inference_mode cannot take part in autograd (no module may keep one).
"""
import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch

from model.bpb import bits_per_byte, byte_source_to, check_byte_source, scored_bytes
from model.distributed import sum_over_ranks
from model.precision import autocast


class ScoreSums(NamedTuple):
    """Float64 sums over scored targets: NLL in nats, target count, UTF-8 bytes."""

    nll_sum: float
    tokens: float
    bytes: float


class Windows(NamedTuple):
    """A scoring plan, one entry per window (int64 numpy arrays [num_windows]).

    Window i reads inputs tokens[start : start + length] (targets start .. start + length - 1)
    and scores its targets from start + score_from to the window's end.
    """

    start: np.ndarray
    length: np.ndarray
    score_from: np.ndarray


# ----------------------------------------------------------------------------- plans
def sliding_windows(num_targets: int, window: int, stride: int, boundaries=()) -> Windows:
    """Windows that score every target exactly once with as much context as `window` allows.

    Targets are scored in consecutive groups, each by a window that ends at the group's end:
    the first group is the first `window` targets; then a group every `stride` targets; the
    tail (fewer than `stride` targets) by a window ending at the last target. Extra
    `boundaries` (target indices) split groups, so no window reads past a boundary it scores
    up to (TTT chunks). A window is `window` long unless it would start before token 0.
    """
    if window <= 0 or not 0 < stride <= window:
        raise ValueError(f"sliding windows need window > 0 and 0 < stride <= window; got window={window}, stride={stride}")
    if num_targets <= 0:
        raise ValueError(f"nothing to score: {num_targets} targets; pass at least 2 tokens")
    ends = np.concatenate([
        [min(window, num_targets), num_targets],
        np.arange(window + stride, num_targets, stride),
        np.asarray(boundaries, dtype=np.int64),
    ]).astype(np.int64)
    ends = np.unique(ends[(ends > 0) & (ends <= num_targets)])  # sorted
    group_starts = np.concatenate([[0], ends[:-1]])
    starts = np.maximum(0, ends - window)
    return Windows(start=starts, length=ends - starts, score_from=group_starts - starts)


def _rank_share(count: int, rank: int, world_size: int) -> slice:
    """Contiguous share of `count` items for `rank` (shares differ by at most one)."""
    return slice(count * rank // world_size, count * (rank + 1) // world_size)


# ----------------------------------------------------------------------------- scoring
def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def compile_for_eval(model):
    """The evaluation model's scoring and training entry points compiled (fullgraph, static
    shapes: the window batches and TTT sequences come in a few fixed shapes); returns model."""
    model.token_losses = torch.compile(model.token_losses, fullgraph=True, dynamic=False)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    return model


def _check_inputs(tokens: torch.Tensor, luts) -> None:
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ValueError(f"validation tokens must be a 1-D tensor of at least 2 tokens; got shape {tuple(tokens.shape)}")
    check_byte_source(luts, tokens.numel())


@torch.no_grad()
def _score_windows(model, tokens: torch.Tensor, plan: Windows, batch_seqs: int, luts) -> torch.Tensor:
    """float64 [3] = (nll_sum, target count, bytes) over the scored targets of every window in
    `plan`, on the model's device; windows of equal length go through the model together, always
    batch_seqs of them: a ragged batch is padded with copies of its last window that score
    nothing, so a compiled scoring graph (static shapes) sees one batch shape per window length."""
    device = _model_device(model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if batch_seqs <= 0:
        raise ValueError(f"batch_seqs={batch_seqs} must be positive (EVAL_BATCH_SEQS)")
    num = len(plan.start)
    # the plan goes to the device once; batches are slices of it (no host-to-device copy per batch)
    all_starts = torch.as_tensor(plan.start, dtype=torch.int64, device=device)
    all_score_from = torch.as_tensor(plan.score_from, dtype=torch.int64, device=device)
    # Batches never mix window lengths (only windows cut short at token 0 are shorter).
    length_changes = np.flatnonzero(np.diff(plan.length)) + 1
    batch_bounds = sorted(set(range(0, num, batch_seqs)) | set(length_changes.tolist()) | {num})
    for i, j in zip(batch_bounds[:-1], batch_bounds[1:]):
        length = int(plan.length[i])
        starts, score_from = all_starts[i:j], all_score_from[i:j]
        if j - i < batch_seqs:
            padding = batch_seqs - (j - i)
            starts = torch.cat([starts, starts[-1:].expand(padding)])
            score_from = torch.cat([score_from, score_from.new_full((padding,), length)])  # scores none of its targets
        index = starts[:, None] + torch.arange(length + 1, device=device)  # [b, length + 1]
        window_tokens = tokens[index]
        inputs, targets = window_tokens[:, :-1], window_tokens[:, 1:]
        with autocast(device):
            nll = model.token_losses(inputs, targets)  # [b, length]
        scored = torch.arange(length, device=device)[None, :] >= score_from[:, None]  # [b, length]
        # torch.where, not boolean indexing: no host sync per batch on the GPU
        sums[0] += torch.where(scored, nll.double(), 0.0).sum()
        sums[1] += scored.sum()
        sums[2] += torch.where(scored, scored_bytes(luts, inputs, targets, index[:, 1:]), 0).sum()
    return sums


def _all_reduce(sums: torch.Tensor, world_size: int) -> torch.Tensor:
    return sum_over_ranks(sums) if world_size > 1 else sums


def _finish(sums: torch.Tensor) -> tuple[float, float]:
    nll_sum, count, byte_count = (float(v) for v in sums.tolist())
    return nll_sum / count, bits_per_byte(nll_sum, byte_count)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prepare(model, tokens, luts):
    _check_inputs(tokens, luts)
    device = _model_device(model)
    return tokens.to(device), byte_source_to(luts, device)


def evaluate_contiguous(model, tokens, seq_len: int, batch_seqs: int, luts, rank: int = 0, world_size: int = 1):
    """Score non-overlapping seq_len windows (targets beyond the last whole window are left out)."""
    tokens, luts = _prepare(model, tokens, luts)
    num_seqs = (tokens.numel() - 1) // seq_len if seq_len > 0 else 0
    if num_seqs == 0:
        raise ValueError(f"evaluate_contiguous: {tokens.numel()} tokens do not fill one sequence of {seq_len}; pass more tokens")
    starts = np.arange(num_seqs, dtype=np.int64)[_rank_share(num_seqs, rank, world_size)] * seq_len
    plan = Windows(start=starts, length=np.full_like(starts, seq_len), score_from=np.zeros_like(starts))
    with _eval_mode(model):
        sums = _score_windows(model, tokens, plan, batch_seqs, luts)
    return _finish(_all_reduce(sums, world_size))


def evaluate_sliding(model, tokens, window: int, stride: int, batch_seqs: int, luts, rank: int = 0, world_size: int = 1):
    """Score every target once, by windows of `window` tokens every `stride` (see sliding_windows);
    the windows are split into contiguous shares across ranks."""
    tokens, luts = _prepare(model, tokens, luts)
    plan = sliding_windows(tokens.numel() - 1, window, stride)
    share = _rank_share(len(plan.start), rank, world_size)
    with _eval_mode(model):
        sums = _score_windows(model, tokens, Windows(*(a[share] for a in plan)), batch_seqs, luts)
    return _finish(_all_reduce(sums, world_size))


def document_rows_cu_seqlens(stream: np.ndarray, first_row: int, stop_row: int, row_len: int, seq_len: int) -> np.ndarray:
    """int32 [rows, width]: the cu_seqlens of rows first_row..stop_row - 1 of `stream` (row k is
    stream[k row_len : (k + 1) row_len]), each padded with row_len (empty segments, which the
    attention kernels and their reference skip) to one width, the longest row's rounded up to a
    multiple of CU_SEQLENS_MULTIPLE: every row then has the same shape (one compiled graph)."""
    from model.document_loader import CU_SEQLENS_MULTIPLE, document_cu_seqlens

    rows = [document_cu_seqlens(stream[k * row_len:(k + 1) * row_len], seq_len, multiple=1).numpy()
            for k in range(first_row, stop_row)]
    width = -(-max((len(r) for r in rows), default=2) // CU_SEQLENS_MULTIPLE) * CU_SEQLENS_MULTIPLE
    plan = np.full((len(rows), width), row_len, dtype=np.int32)
    for k, offsets in enumerate(rows):
        plan[k, :len(offsets)] = offsets
    return plan


def evaluate_documents(model, tokens, seq_len: int, batch_seqs: int, luts, rank: int = 0, world_size: int = 1):
    """FRONTIER.md section 5's diagnostic evaluation: non-overlapping rows of seq_len * batch_seqs
    tokens (65,536 in the record), each scored in one pass with document-isolated attention
    (cu_seqlens as in training: a query sees only its own document, cut every seq_len tokens from
    its start within the row). Targets past the last whole row are left out.

    Ranks: the whole rows are split into contiguous shares across all ranks, so 1, 2 or 8 ranks
    score the same rows (all of them). The record instead truncates each rank's own range to whole
    32-sequence batches, so which tail targets it leaves out depends on the number of GPUs.

    Every row's cu_seqlens is padded to one width and the plan goes to the device once (no host
    transfer per row), so a compiled token_losses (compile_for_eval: static shapes) serves every
    row with one graph."""
    tokens, luts = _prepare(model, tokens, luts)
    row_len = seq_len * batch_seqs
    num_rows = (tokens.numel() - 1) // row_len if row_len > 0 else 0
    if num_rows == 0:
        raise ValueError(f"evaluate_documents: {tokens.numel()} tokens do not fill one row of {seq_len} x {batch_seqs}; "
                         f"pass more tokens or lower EVAL_BATCH_SEQS")
    device = _model_device(model)
    share = range(num_rows)[_rank_share(num_rows, rank, world_size)]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if len(share) == 0:  # more ranks than rows: this rank only joins the sum
        return _finish(_all_reduce(sums, world_size))
    plan = torch.as_tensor(document_rows_cu_seqlens(tokens.cpu().numpy(), share.start, share.stop, row_len, seq_len),
                           device=device)
    with _eval_mode(model), torch.no_grad():
        for k, row in enumerate(share):
            start = row * row_len
            cu_seqlens = plan[k].clone()  # a tensor of its own: a view's offset would be one more guard
            index = torch.arange(start, start + row_len + 1, device=device)[None]  # [1, row_len + 1]
            inputs, targets = tokens[index[:, :-1]], tokens[index[:, 1:]]
            with autocast(device):
                nll = model.token_losses(inputs, targets, cu_seqlens)  # [1, row_len]
            sums[0] += nll.double().sum()
            sums[1] += nll.numel()
            sums[2] += scored_bytes(luts, inputs, targets, index[:, 1:]).sum()
    return _finish(_all_reduce(sums, world_size))


# ----------------------------------------------------------------------------- legal TTT
def ttt_chunk_lr(cfg, chunk: int, num_chunks: int) -> float:
    """Cosine decay of the TTT learning rate across chunks: ttt_lr at chunk 0, 0 at the last."""
    return cfg.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(1, num_chunks - 1)))


def _trainable_parameters(model, freeze_blocks: int) -> list[torch.nn.Parameter]:
    blocks = getattr(model, "blocks", None)
    if freeze_blocks > 0 and blocks is None:
        raise ValueError(f"TTT_FREEZE_BLOCKS={freeze_blocks} needs a model with a `blocks` ModuleList; set it to 0")
    if blocks is not None and freeze_blocks > len(blocks):
        raise ValueError(f"TTT_FREEZE_BLOCKS={freeze_blocks} exceeds the model's {len(blocks)} blocks; lower it")
    frozen = {id(p) for block in list(blocks or [])[:freeze_blocks] for p in block.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def all_reduce_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Sum every rank's (already share-weighted) gradient, through one flat buffer."""
    for p in params:
        if p.grad is None:  # a rank with no sequences in this batch still joins the reduction
            p.grad = torch.zeros_like(p)
    if world_size > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        sum_over_ranks(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _adapt_on_chunk(model, tokens, first_target: int, num_targets: int, seq_len: int, cfg,
                    params, optimizer, rank: int, world_size: int) -> None:
    """cfg.ttt_epochs epochs over the chunk's whole seq_len sequences (targets first_target ..
    first_target + num_targets - 1, in order; a ragged remainder shorter than seq_len is not
    trained on), in global batches of cfg.ttt_batch_seqs split across ranks."""
    device = _model_device(model)
    num_seqs = num_targets // seq_len
    for _ in range(cfg.ttt_epochs):
        for batch_first in range(0, num_seqs, cfg.ttt_batch_seqs):
            batch_size = min(cfg.ttt_batch_seqs, num_seqs - batch_first)
            share = _rank_share(batch_size, rank, world_size)
            local = share.stop - share.start
            optimizer.zero_grad(set_to_none=True)
            if local > 0:
                starts = first_target + (batch_first + torch.arange(share.start, share.stop, device=device)) * seq_len
                index = starts[:, None] + torch.arange(seq_len + 1, device=device)  # [local, seq_len + 1]
                seqs = tokens[index]
                with autocast(device):
                    loss = model(seqs[:, :-1], seqs[:, 1:])
                # Weight the local mean by the local share so the summed gradient is the batch mean.
                (loss * (local / batch_size)).backward()
            all_reduce_gradients(params, world_size)
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            optimizer.step()


def evaluate_ttt(model, tokens, cfg, luts, rank: int = 0, world_size: int = 1, chunk_scores: list = None):
    """Legal score-first test-time training; adapts `model` IN PLACE (pass a copy to keep it).

    The targets are split into consecutive chunks of cfg.ttt_chunk_tokens. For chunk c: score
    its targets with sliding windows of cfg.eval_seq_len every cfg.eval_stride (context may
    reach back into earlier, already scored chunks; never past the chunk's last target); then,
    unless c is the last chunk, train on it: SGD(lr=ttt_chunk_lr(cfg, c, n), momentum=
    cfg.ttt_momentum), cfg.ttt_epochs epochs over sequences of min(cfg.train_seq_len, chunk)
    tokens (the training shape, so a compiled model reuses its graph), batches of
    cfg.ttt_batch_seqs, gradient-norm clip cfg.ttt_grad_clip, the first cfg.ttt_freeze_blocks
    of model.blocks frozen. With world_size > 1, windows and sequences are split across ranks
    and gradients are averaged, so every rank keeps identical weights.

    chunk_scores, if given a list, receives one ScoreSums per chunk (all ranks' totals).
    Returns (val_loss, val_bpb) over all targets.
    """
    tokens, luts = _prepare(model, tokens, luts)
    num_targets = tokens.numel() - 1
    chunk = cfg.ttt_chunk_tokens
    if chunk <= 0:
        raise ValueError(f"TTT_CHUNK_TOKENS={chunk} must be positive")
    num_chunks = math.ceil(num_targets / chunk)
    plan = sliding_windows(num_targets, cfg.eval_seq_len, cfg.eval_stride, boundaries=np.arange(chunk, num_targets, chunk))
    # Each window scores one group, groups never straddle a chunk boundary, and windows come in
    # target order, so chunk c's windows are the run chunk_first_window[c] .. [c + 1] - 1.
    window_chunk = (plan.start + plan.score_from) // chunk
    chunk_first_window = np.searchsorted(window_chunk, np.arange(num_chunks + 1))
    seq_len = min(cfg.train_seq_len, chunk)

    params = _trainable_parameters(model, cfg.ttt_freeze_blocks)
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    device = _model_device(model)
    total = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    try:
        for c in range(num_chunks):
            chunk_windows = np.arange(chunk_first_window[c], chunk_first_window[c + 1])
            share = chunk_windows[_rank_share(len(chunk_windows), rank, world_size)]
            model.eval()
            sums = _score_windows(model, tokens, Windows(*(a[share] for a in plan)), cfg.eval_batch_seqs, luts)
            sums = _all_reduce(sums, world_size)
            total += sums
            if chunk_scores is not None:
                chunk_scores.append(ScoreSums(*(float(v) for v in sums.tolist())))
            if c == num_chunks - 1:
                break  # the last chunk is scored and never trained on
            for group in optimizer.param_groups:
                group["lr"] = ttt_chunk_lr(cfg, c, num_chunks)
            model.train()
            _adapt_on_chunk(model, tokens, c * chunk, min(chunk, num_targets - c * chunk), seq_len, cfg,
                            params, optimizer, rank, world_size)
    finally:
        model.train(was_training)
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
    return _finish(total)
