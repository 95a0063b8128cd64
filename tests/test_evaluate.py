"""Evaluation: contiguous and sliding scores against a direct per-target computation, the sliding
plan's coverage and context, legal score-first TTT (order, last chunk, frozen blocks, the SGD it
runs), and a 2-process gloo run against 1 process.

The model is a tiny stand-in, not model/gpt.py: an embedding, a causal running mean (so every
loss depends on the whole prefix inside its window, which makes context bugs visible), residual
`blocks` and a linear head, in float64 so sums compare at the float64 tolerance.
"""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.bpb import SidecarBytes
from model.config import Config
from model.evaluate import (
    _finish,
    _score_windows,
    evaluate_contiguous,
    evaluate_documents,
    evaluate_sliding,
    evaluate_ttt,
    sliding_windows,
    ttt_chunk_lr,
)
from tests.multiprocess import run_ranks
from tests.tolerances import assert_close

VOCAB = 37


@pytest.fixture(autouse=True)
def one_thread():
    """The stand-in's ops are tiny: thread hand-offs cost more than they save on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCausalLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 8, num_blocks: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_blocks))
        self.head = nn.Linear(dim, vocab)
        self.double()
        self.calls = []  # (training, grad enabled) of each token_losses call
        self.scoring_weights = []  # all weights, flattened, at each eval-mode (scoring) call
        self.trained_on = []  # targets of each training (forward) call

    def token_losses(self, ids, targets):  # [B, T], [B, T] -> [B, T]
        self.calls.append((self.training, torch.is_grad_enabled()))
        if not self.training:
            self.scoring_weights.append(torch.cat([p.detach().flatten() for p in self.parameters()]))
        x = self.embed(ids)  # [B, T, D]
        positions = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype, device=x.device)
        x = x + torch.cumsum(x, dim=1) / positions[:, None]  # causal: mean of the window so far
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        logits = self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def forward(self, ids, targets):
        self.trained_on.append(targets.clone())
        return self.token_losses(ids, targets).mean()


class UniformLM(nn.Module):
    """Every target costs ln(vocab) nats: bpb is then log2(vocab) * targets / bytes."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.unused = nn.Parameter(torch.zeros(1))

    def token_losses(self, ids, targets):
        return torch.full(targets.shape, math.log(self.vocab), dtype=torch.float32)


def synthetic_luts(seed: int = 0, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    base_bytes = torch.randint(1, 5, (vocab,), generator=g).to(torch.int16)
    has_leading_space = torch.rand(vocab, generator=g) < 0.5
    is_boundary = torch.zeros(vocab, dtype=torch.bool)
    is_boundary[:2] = True  # like pad / BOS
    base_bytes[:2] = 0
    has_leading_space[:2] = False
    return base_bytes, has_leading_space, is_boundary


def synthetic_tokens(num_tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num_tokens,), generator=g)
    tokens[0] = 1  # BOS first, as in the shards
    return tokens


def direct_scores(model, tokens, context_start, luts):
    """(val_loss, val_bpb) computed target by target: target j is scored by running the model on
    tokens[context_start(j) .. j] alone and taking the last position's loss."""
    base_bytes, has_leading_space, is_boundary = luts
    nll_sum, byte_count, num_targets = 0.0, 0, tokens.numel() - 1
    with torch.no_grad():
        for j in range(num_targets):
            s = context_start(j)
            nll_sum += float(model.token_losses(tokens[s:j + 1][None], tokens[s + 1:j + 2][None])[0, -1])
            prev, target = int(tokens[j]), int(tokens[j + 1])
            byte_count += int(base_bytes[target]) + int(bool(has_leading_space[target]) and not bool(is_boundary[prev]))
    return nll_sum / num_targets, nll_sum / math.log(2) / byte_count


def sliding_context_start(num_targets: int, window: int, stride: int):
    """SPEC's rule restated independently of sliding_windows: the first window scores its targets;
    after that a window ending every `stride` targets scores its last `stride`; the tail is
    scored by a window ending at the last target."""
    first = min(window, num_targets)

    def start(j):
        if j < first:
            return 0
        end = min(window + stride * math.ceil((j + 1 - window) / stride), num_targets)
        return end - window

    return start


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("num_targets, window, stride", [
    (1, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (37, 8, 3), (64, 16, 16), (50, 16, 1), (101, 32, 7),
])
def test_sliding_windows_score_every_target_once_with_full_context(num_targets, window, stride):
    plan = sliding_windows(num_targets, window, stride)
    times_scored = np.zeros(num_targets, dtype=int)
    context = np.zeros(num_targets, dtype=int)
    for start, length, score_from in zip(*plan):
        assert 0 <= start and start + length <= num_targets and length <= window  # never past the last target
        assert length == min(window, num_targets)
        times_scored[start + score_from:start + length] += 1
        context[start + score_from:start + length] = np.arange(start + score_from, start + length) - start + 1
    assert (times_scored == 1).all()
    targets = np.arange(num_targets)
    # tokens visible when predicting target j (itself included): all of them while j < window,
    # at least window - stride + 1 after that
    assert (context >= np.minimum(targets + 1, window - stride + 1)).all()
    assert (context[:window] == targets[:window] + 1).all()
    starts = np.array([sliding_context_start(num_targets, window, stride)(j) for j in targets])
    assert (context == targets - starts + 1).all()


def test_sliding_windows_split_at_boundaries():
    plan = sliding_windows(100, 16, 5, boundaries=[7, 30, 64])
    for start, length, score_from in zip(*plan):
        first, end = start + score_from, start + length
        for boundary in (7, 30, 64):
            assert not first < boundary < end  # no scored group straddles a boundary
    covered = np.concatenate([np.arange(s + f, s + n) for s, n, f in zip(*plan)])
    assert (np.sort(covered) == np.arange(100)).all()


def test_sliding_windows_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 8, 9)
    with pytest.raises(ValueError, match="nothing to score"):
        sliding_windows(0, 8, 4)


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("num_tokens, seq_len, batch_seqs", [(2, 1, 1), (50, 7, 3), (65, 16, 4)])
def test_contiguous_matches_direct_computation(num_tokens, seq_len, batch_seqs):
    model, luts, tokens = TinyCausalLM(), synthetic_luts(), synthetic_tokens(num_tokens)
    num_targets = (num_tokens - 1) // seq_len * seq_len  # whole sequences only
    got = evaluate_contiguous(model, tokens, seq_len, batch_seqs, luts)
    expected = direct_scores(model, tokens[:num_targets + 1], lambda j: j // seq_len * seq_len, luts)
    assert_close(torch.tensor(got), torch.tensor(expected))


@pytest.mark.parametrize("num_tokens, window, stride, batch_seqs", [
    (2, 8, 4, 2), (6, 8, 4, 2), (9, 8, 4, 3), (70, 16, 4, 5), (83, 12, 5, 64), (60, 10, 10, 1),
])
def test_sliding_matches_direct_computation(num_tokens, window, stride, batch_seqs):
    model, luts, tokens = TinyCausalLM(), synthetic_luts(), synthetic_tokens(num_tokens)
    got = evaluate_sliding(model, tokens, window, stride, batch_seqs, luts)
    expected = direct_scores(model, tokens, sliding_context_start(num_tokens - 1, window, stride), luts)
    assert_close(torch.tensor(got), torch.tensor(expected))


def test_sliding_context_matters():
    """The stand-in's losses depend on the window start, so the check above can fail."""
    model, luts, tokens = TinyCausalLM(), synthetic_luts(), synthetic_tokens(70)
    sliding = evaluate_sliding(model, tokens, 16, 4, 8, luts)
    contiguous = evaluate_contiguous(model, tokens[:65], 16, 8, luts)
    assert abs(sliding[0] - contiguous[0]) > 1e-6


def test_scoring_runs_in_eval_mode_without_grad_and_restores_mode():
    model, luts, tokens = TinyCausalLM(), synthetic_luts(), synthetic_tokens(40)
    model.train()
    evaluate_sliding(model, tokens, 8, 4, 4, luts)
    evaluate_contiguous(model, tokens, 8, 4, luts)
    assert model.calls and set(model.calls) == {(False, False)}
    assert model.training


def test_bad_tokens_raise():
    with pytest.raises(ValueError, match="1-D"):
        evaluate_sliding(TinyCausalLM(), torch.ones(2, 5, dtype=torch.long), 4, 2, 2, synthetic_luts())
    with pytest.raises(ValueError, match="do not fill"):
        evaluate_contiguous(TinyCausalLM(), synthetic_tokens(5), 8, 2, synthetic_luts())


def test_uniform_model_on_real_documents(shared_data):
    """Real tokens and byte tables: a model paying ln(1024) per target scores exactly
    log2(1024) * targets / (UTF-8 bytes of the documents' text)."""
    import json

    from model.bpb import build_byte_luts, load_tokenizer
    from model.data import read_shard

    sp = load_tokenizer(os.path.join(shared_data, "tokenizers", "fineweb_1024_bpe.model"), 1024)
    val = torch.from_numpy(read_shard(os.path.join(shared_data, "fineweb10B_sp1024_sample", "fineweb_val_000000.bin")).astype(np.int64))
    doc_starts = torch.nonzero(val == 1).flatten().tolist()
    with open(os.path.join(shared_data, "raw", "fineweb_val_sample_200docs.jsonl")) as f:
        texts = [json.loads(next(f))["text"] for _ in range(3)]
    tokens = val[:doc_starts[3]]  # documents 0-2; the first BOS is only an input
    luts = build_byte_luts(sp, 1024)
    loss, bpb = evaluate_sliding(UniformLM(1024), tokens, 256, 64, 16, luts)
    assert loss == pytest.approx(math.log(1024), rel=1e-6)
    expected_bpb = 10.0 * (tokens.numel() - 1) / sum(len(t.encode("utf-8")) for t in texts)
    assert bpb == pytest.approx(expected_bpb, rel=1e-6)


# ----------------------------------------------------------------------------- TTT
CHUNK = 48


def ttt_config(**overrides) -> Config:
    # window 16, stride 4: chunk boundaries (48, 96, ...) fall on the sliding grid (16 + 4k), so
    # TTT with lr 0 must reproduce evaluate_sliding exactly
    settings = dict(eval_seq_len=16, eval_stride=4, eval_batch_seqs=5, train_seq_len=16,
                    ttt_chunk_tokens=CHUNK, ttt_epochs=2, ttt_batch_seqs=2, ttt_lr=0.5,
                    ttt_momentum=0.9, ttt_grad_clip=1.0, ttt_freeze_blocks=0)
    settings.update(overrides)
    return Config(**settings)


def run_ttt(tokens, cfg, seed=0):
    model, scores = TinyCausalLM(seed=seed), []
    result = evaluate_ttt(model, tokens, cfg, synthetic_luts(), chunk_scores=scores)
    return model, scores, result


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


NUM_TOKENS = 4 * CHUNK + 21  # 4 full chunks + a ragged last chunk of 20 targets


def test_ttt_with_zero_lr_equals_sliding():
    tokens, cfg = synthetic_tokens(NUM_TOKENS), ttt_config(ttt_lr=0.0)
    model, scores, result = run_ttt(tokens, cfg)
    sliding = evaluate_sliding(TinyCausalLM(), tokens, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, synthetic_luts())
    assert_close(torch.tensor(result), torch.tensor(sliding))
    assert len(scores) == 5 and [s.tokens for s in scores] == [CHUNK] * 4 + [20]


def test_ttt_changes_the_score():
    tokens = synthetic_tokens(NUM_TOKENS)
    _, _, adapted = run_ttt(tokens, ttt_config())
    _, _, frozen = run_ttt(tokens, ttt_config(ttt_lr=0.0))
    assert abs(adapted[0] - frozen[0]) > 1e-4


def test_ttt_scores_each_chunk_before_training_on_it():
    """ORDER: altering the tokens of chunks after k leaves chunks 0..k's scores bit-identical;
    altering chunk 1 changes chunk 3's score, which only the weights can carry (chunk 3's
    windows read no token of chunk 1), and does not when the learning rate is 0."""
    tokens = synthetic_tokens(NUM_TOKENS)
    _, base_scores, _ = run_ttt(tokens, ttt_config())
    for k in range(4):
        altered = tokens.clone()
        altered[(k + 1) * CHUNK + 1:] = (altered[(k + 1) * CHUNK + 1:] + 5) % VOCAB  # targets of chunks > k
        _, scores, _ = run_ttt(altered, ttt_config())
        assert scores[:k + 1] == base_scores[:k + 1]
        assert scores[k + 1] != base_scores[k + 1]

    chunk1 = tokens.clone()
    chunk1[CHUNK + 1:2 * CHUNK + 1] = (chunk1[CHUNK + 1:2 * CHUNK + 1] + 5) % VOCAB
    _, scores, _ = run_ttt(chunk1, ttt_config())
    assert scores[0] == base_scores[0]
    assert abs(scores[3].nll_sum - base_scores[3].nll_sum) > 1e-6
    _, no_lr_base, _ = run_ttt(tokens, ttt_config(ttt_lr=0.0))
    _, no_lr_chunk1, _ = run_ttt(chunk1, ttt_config(ttt_lr=0.0))
    assert no_lr_chunk1[3] == no_lr_base[3]


def test_ttt_scores_each_chunk_with_weights_untouched_by_it():
    """No token influences the weights before it is scored: with one scoring call per chunk
    (eval_batch_seqs covers a chunk's windows), the weights that score chunk k are the same when
    the targets of chunks k.. are altered, and the weights that score chunk k + 1 are not."""
    cfg = ttt_config(eval_batch_seqs=64)
    tokens = synthetic_tokens(NUM_TOKENS)
    base = TinyCausalLM()
    evaluate_ttt(base, tokens, cfg, synthetic_luts())
    assert len(base.scoring_weights) == 5
    assert torch.equal(base.scoring_weights[0], torch.cat([p.flatten() for p in TinyCausalLM().parameters()]))
    for k in range(5):
        altered = tokens.clone()
        altered[k * CHUNK + 1:] = (altered[k * CHUNK + 1:] + 5) % VOCAB  # targets of chunks k, k + 1, ...
        model = TinyCausalLM()
        evaluate_ttt(model, altered, cfg, synthetic_luts())
        for c in range(k + 1):
            assert torch.equal(model.scoring_weights[c], base.scoring_weights[c])
        if k + 1 < 5:
            assert not torch.equal(model.scoring_weights[k + 1], base.scoring_weights[k + 1])


def test_ttt_never_trains_on_the_last_chunk():
    tokens = synthetic_tokens(NUM_TOKENS)
    model, _, _ = run_ttt(tokens, ttt_config())
    altered = tokens.clone()
    altered[4 * CHUNK + 1:] = (altered[4 * CHUNK + 1:] + 5) % VOCAB
    altered_model, _, _ = run_ttt(altered, ttt_config())
    trained, untouched = weights(model), weights(TinyCausalLM())
    for name, w in weights(altered_model).items():
        assert torch.equal(w, trained[name])
    assert any(not torch.equal(trained[n], untouched[n]) for n in trained)
    # Also independent of the cosine schedule (whose lr is 0 at the last chunk): the last chunk's
    # targets never reach a training forward. 4 chunks x 2 epochs x 3 sequences of 16 targets:
    assert len(model.trained_on) == len(altered_model.trained_on) == 4 * 2 * 2  # batches of 2 and 1
    assert sum(t.numel() for t in model.trained_on) == 4 * 2 * 3 * 16
    for seen, seen_altered in zip(model.trained_on, altered_model.trained_on):
        assert torch.equal(seen, seen_altered)


def test_ttt_training_is_the_specified_sgd():
    """Two chunks: TTT scores chunk 0, trains on it at the full ttt_lr (cosine at c=0), then only
    scores chunk 1. Replay that training by hand and compare the weights."""
    cfg = ttt_config(train_seq_len=20, ttt_grad_clip=0.05)  # 2 sequences of 20 per chunk; clip active
    tokens = synthetic_tokens(CHUNK + 30)
    model, _, _ = run_ttt(tokens, cfg)

    replica = TinyCausalLM()
    optimizer = torch.optim.SGD(replica.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    seq_len = 20
    sequences = torch.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(CHUNK // seq_len)])
    clipped = False
    for _ in range(cfg.ttt_epochs):
        for first in range(0, len(sequences), cfg.ttt_batch_seqs):
            batch = sequences[first:first + cfg.ttt_batch_seqs]
            optimizer.zero_grad()
            replica(batch[:, :-1], batch[:, 1:]).backward()
            clipped |= float(torch.nn.utils.clip_grad_norm_(replica.parameters(), cfg.ttt_grad_clip)) > cfg.ttt_grad_clip
            optimizer.step()
    assert clipped
    expected = weights(replica)
    for name, w in weights(model).items():
        assert_close(w, expected[name])


def test_ttt_chunk_lr_is_cosine_across_chunks():
    cfg = ttt_config(ttt_lr=0.002)
    assert ttt_chunk_lr(cfg, 0, 5) == pytest.approx(0.002)
    assert ttt_chunk_lr(cfg, 2, 5) == pytest.approx(0.001)
    assert ttt_chunk_lr(cfg, 4, 5) == pytest.approx(0.0, abs=1e-15)
    assert ttt_chunk_lr(cfg, 0, 1) == pytest.approx(0.002)


def test_ttt_frozen_blocks_stay_unchanged():
    tokens = synthetic_tokens(NUM_TOKENS)
    model, _, _ = run_ttt(tokens, ttt_config(ttt_freeze_blocks=1))
    before = weights(TinyCausalLM())
    after = weights(model)
    for name in before:
        if name.startswith("blocks.0."):
            assert torch.equal(after[name], before[name])
        else:
            assert not torch.equal(after[name], before[name])
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_ttt_freeze_more_blocks_than_exist_raises():
    with pytest.raises(ValueError, match="TTT_FREEZE_BLOCKS"):
        run_ttt(synthetic_tokens(NUM_TOKENS), ttt_config(ttt_freeze_blocks=3))


# ----------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, out_path):
    import torch.distributed as dist

    from model.distributed import leave_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        tokens, luts, cfg = synthetic_tokens(NUM_TOKENS), synthetic_luts(), ttt_config(ttt_batch_seqs=3)
        results = {
            "sliding": evaluate_sliding(TinyCausalLM(), tokens, 16, 4, 3, luts, rank, world_size),
            "contiguous": evaluate_contiguous(TinyCausalLM(), tokens, 16, 3, luts, rank, world_size),
        }
        model, scores = TinyCausalLM(), []
        results["ttt"] = evaluate_ttt(model, tokens, cfg, luts, rank, world_size, chunk_scores=scores)
        results["ttt_chunks"] = [tuple(s) for s in scores]
        results["weights"] = weights(model)
        torch.save(results, f"{out_path}.{rank}")
    finally:
        leave_process_group()  # train.py's teardown, pause included


def test_two_gloo_processes_match_one(tmp_path):
    out = str(tmp_path / "result")
    run_ranks(_distributed_worker, 2, (2, _free_port(), out))
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    tokens, luts, cfg = synthetic_tokens(NUM_TOKENS), synthetic_luts(), ttt_config(ttt_batch_seqs=3)
    model, scores = TinyCausalLM(), []
    expected = {
        "sliding": evaluate_sliding(TinyCausalLM(), tokens, 16, 4, 3, luts),
        "contiguous": evaluate_contiguous(TinyCausalLM(), tokens, 16, 3, luts),
        "ttt": evaluate_ttt(model, tokens, cfg, luts, chunk_scores=scores),
    }
    for result in ranks:
        for key in ("sliding", "contiguous", "ttt"):
            assert_close(torch.tensor(result[key]), torch.tensor(expected[key]))
        assert_close(torch.tensor(result["ttt_chunks"]), torch.tensor([tuple(s) for s in scores]))
        for name, w in weights(model).items():
            assert_close(result["weights"][name], w)
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name])  # ranks stay bit-identical


@pytest.mark.gpu
def test_cuda_scores_match_cpu():
    """On the GPU the functions run under bf16 autocast; the float64 stand-in is not autocast, so
    the device path (token and LUT transfer, reductions) must reproduce the CPU numbers."""
    tokens, luts, cfg = synthetic_tokens(NUM_TOKENS), synthetic_luts(), ttt_config()
    for run in (
        lambda m: evaluate_sliding(m, tokens, 16, 4, 5, luts),
        lambda m: evaluate_contiguous(m, tokens, 16, 5, luts),
        lambda m: evaluate_ttt(m, tokens, cfg, luts),
    ):
        expected = run(TinyCausalLM())
        got = run(TinyCausalLM().cuda())
        assert_close(torch.tensor(got), torch.tensor(expected), dtype=torch.float32)


def test_ttt_chunks_shorter_than_the_window():
    """Chunks of 6 targets with a 16-token window: the first windows end at chunk boundaries
    before token 16 and are shorter, so batches must not mix lengths. With lr 0 every target is
    scored by a window ending at the first chunk boundary or sliding-grid end at or after it."""
    tokens, luts = synthetic_tokens(45), synthetic_luts()
    cfg = ttt_config(ttt_chunk_tokens=6, ttt_lr=0.0, eval_batch_seqs=3)
    num_targets, window, stride = 44, 16, 4
    ends = sorted({window, num_targets} | set(range(window + stride, num_targets, stride)) | set(range(6, num_targets, 6)))

    def context_start(j):
        end = next(e for e in ends if e >= j + 1)
        return max(0, end - window)

    scores = []
    got = evaluate_ttt(TinyCausalLM(), tokens, cfg, luts, chunk_scores=scores)
    assert [s.tokens for s in scores] == [6] * 7 + [2]
    expected = direct_scores(TinyCausalLM(), tokens, context_start, luts)
    assert_close(torch.tensor(got), torch.tensor(expected))
    # The whole plan in one scoring pass mixes window lengths 6, 12 and 16 inside a batch of 3.
    plan = sliding_windows(num_targets, window, stride, boundaries=range(6, num_targets, 6))
    assert list(plan.length[:3]) == [6, 12, 16]
    sums = _score_windows(TinyCausalLM(), tokens, plan, 3, luts)
    assert float(sums[1]) == num_targets
    assert_close(torch.tensor(_finish(sums)), torch.tensor(expected))


# ----------------------------------------------------------------------------- byte sidecar
def synthetic_sidecar(num_tokens: int, seed: int = 2) -> SidecarBytes:
    """Bytes per token position, independent of the token ids (as in the CaseOps data, where a
    piece's bytes depend on the original text); BOS (position 0) 0."""
    g = torch.Generator().manual_seed(seed)
    token_bytes = torch.randint(0, 7, (num_tokens,), generator=g, dtype=torch.int32)
    token_bytes[0] = 0
    return SidecarBytes(token_bytes)


def direct_scores_from_sidecar(model, tokens, context_start, sidecar: SidecarBytes):
    """As direct_scores, with target j's bytes read at its position j + 1 in the sidecar."""
    nll_sum, num_targets = 0.0, tokens.numel() - 1
    with torch.no_grad():
        for j in range(num_targets):
            s = context_start(j)
            nll_sum += float(model.token_losses(tokens[s:j + 1][None], tokens[s + 1:j + 2][None])[0, -1])
    byte_count = int(sidecar.token_bytes[1:tokens.numel()].sum())
    return nll_sum / num_targets, nll_sum / math.log(2) / byte_count


@pytest.mark.parametrize("num_tokens, window, stride, batch_seqs", [(9, 8, 4, 3), (70, 16, 4, 5)])
def test_every_path_counts_bytes_from_the_sidecar(num_tokens, window, stride, batch_seqs):
    tokens, sidecar = synthetic_tokens(num_tokens), synthetic_sidecar(num_tokens)
    got = evaluate_sliding(TinyCausalLM(), tokens, window, stride, batch_seqs, sidecar)
    expected = direct_scores_from_sidecar(TinyCausalLM(), tokens, sliding_context_start(num_tokens - 1, window, stride), sidecar)
    assert_close(torch.tensor(got), torch.tensor(expected))
    seq_len = 4
    used = (num_tokens - 1) // seq_len * seq_len + 1
    got = evaluate_contiguous(TinyCausalLM(), tokens[:used], seq_len, batch_seqs, SidecarBytes(sidecar.token_bytes[:used]))
    expected = direct_scores_from_sidecar(TinyCausalLM(), tokens[:used], lambda j: j // seq_len * seq_len, sidecar)
    assert_close(torch.tensor(got), torch.tensor(expected))


def test_ttt_counts_bytes_from_the_sidecar_chunk_by_chunk():
    tokens, sidecar = synthetic_tokens(NUM_TOKENS), synthetic_sidecar(NUM_TOKENS)
    cfg, scores = ttt_config(), []
    evaluate_ttt(TinyCausalLM(), tokens, cfg, sidecar, chunk_scores=scores)
    per_chunk = [int(sidecar.token_bytes[1 + c * CHUNK:1 + (c + 1) * CHUNK].sum()) for c in range(len(scores))]
    assert [s.bytes for s in scores] == per_chunk  # each chunk's scored targets, by position
    frozen = evaluate_ttt(TinyCausalLM(), tokens, ttt_config(ttt_lr=0.0), sidecar)
    sliding = evaluate_sliding(TinyCausalLM(), tokens, cfg.eval_seq_len, cfg.eval_stride, cfg.eval_batch_seqs, sidecar)
    assert_close(torch.tensor(frozen), torch.tensor(sliding))


def test_sidecar_not_aligned_with_the_tokens_is_one_line():
    tokens = synthetic_tokens(20)
    with pytest.raises(ValueError, match=r"the byte sidecar holds \(19,\) counts for 20 validation tokens") as err:
        evaluate_sliding(TinyCausalLM(), tokens, 8, 4, 2, synthetic_sidecar(19))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="build_byte_luts or a model.bpb.SidecarBytes"):
        evaluate_contiguous(TinyCausalLM(), tokens, 4, 2, (torch.zeros(3),))


# ----------------------------------------------------------------------------- document rows (frontier)
class TinySegmentLM(TinyCausalLM):
    """TinyCausalLM whose context is the token's own segment of cu_seqlens (the running mean restarts
    at every offset): a document-isolated model without attention."""

    def token_losses(self, ids, targets, cu_seqlens=None):
        B, T = ids.shape
        x = self.embed(ids).reshape(B * T, -1)
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, B * T + 1, T)
        starts = torch.zeros(B * T, dtype=torch.long)
        starts[cu_seqlens[cu_seqlens < B * T].long()] = 1
        cum = torch.cumsum(x, 0)
        first = torch.zeros_like(starts)
        first[starts.bool()] = torch.nonzero(starts).flatten()
        first = torch.cummax(first, 0).values  # flat index of each position's segment start
        before = torch.where(first[:, None] > 0, cum[first - 1], 0.0)
        count = (torch.arange(B * T) - first + 1).to(x.dtype)
        x = (x + (cum - before) / count[:, None]).view(B, T, -1)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        logits = self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def documents_stream(num_tokens: int, seed: int = 3) -> torch.Tensor:
    """Tokens with BOS (id 1) starting documents of mixed lengths, one longer than the cut, the first
    document starting before the stream's own row boundaries line up with it."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (num_tokens,), generator=g)
    for position in (0, 5, 6, 30, 33, 70):
        tokens[position] = 1
    return tokens


@pytest.mark.parametrize("seq_len, batch_seqs", [(8, 2), (5, 3)])
def test_documents_rows_match_direct_computation(seq_len, batch_seqs):
    """Every target of every whole row scored from its own segment alone: the segment starts at the
    row start, a BOS, or a multiple of seq_len from its document's start within the row."""
    tokens, model, luts = documents_stream(90), TinySegmentLM(), synthetic_luts()
    row_len = seq_len * batch_seqs
    bos = [p for p in range(tokens.numel()) if int(tokens[p]) == 1]

    def context_start(j):  # the first input position of target j's segment
        row_start = j - j % row_len
        doc_start = max([p for p in bos if p <= j] + [row_start])  # in the row
        return doc_start + (j - doc_start) // seq_len * seq_len

    num_scored = (tokens.numel() - 1) // row_len * row_len
    want_loss, want_bpb = direct_scores(model, tokens[: num_scored + 1], context_start, luts)
    got_loss, got_bpb = evaluate_documents(model, tokens, seq_len, batch_seqs, luts)
    assert got_loss == pytest.approx(want_loss, rel=1e-12) and got_bpb == pytest.approx(want_bpb, rel=1e-12)


def test_documents_rows_need_one_whole_row():
    with pytest.raises(ValueError, match="do not fill one row"):
        evaluate_documents(TinySegmentLM(), documents_stream(80), 8, 10, synthetic_luts())
