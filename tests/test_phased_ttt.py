"""The phased LoRA TTT (model/phased_ttt.py, FRONTIER.md section 5): the plan (documents, chunks
and their windows, batches, order, phase boundaries and sets), the legality of the loop (every
target scored exactly once, bytes, no update before a score, no earlier score moved by a later
token), B = 0 being the base model, and 1 rank against 2 gloo ranks.

The model is a tiny frontier-like stand-in with the hook interface the phased TTT needs:
`hidden(ids, cu_seqlens=None, lora=None)` handing application n `lora.at(n)` (Q, K, V before the
q/k norm, O from u, the MLP from its normed input), a looped `plan()` (blocks 0,1,2,1,2: five
applications over three blocks), `tok_emb` tied head, `forward(ids, targets, cu_seqlens)`.
"""
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from model.bpb import SidecarBytes, target_bytes
from model.config import Config
from model.lora import BatchedLora, add_delta
from model.phased_ttt import (
    BOS_ID,
    EvalClock,
    PhasedResult,
    chunk_window,
    evaluate_phased_ttt,
    global_steps,
    lane_work,
    length_sorted_batches,
    lora_token_losses,
    lora_work,
    make_plan,
    num_chunks,
    phase_boundaries,
    phased_ttt_evaluation,
    processing_order,
    project_eval_seconds,
    split_documents,
)
from tests.multiprocess import run_ranks

VOCAB = 48


@pytest.fixture(autouse=True)
def reference_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with kernels.use_backend("reference"):
        yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> Config:
    values = dict(vocab_size=VOCAB, model_dim=16, num_heads=2, num_kv_heads=1, num_layers=3, seed=7,
                  ttt_lora_rank=4, ttt_lora_alpha=8.0, ttt_chunk_size=4, ttt_eval_seq_len=12, ttt_batch_size=3,
                  ttt_lora_lr=0.05, ttt_weight_decay=0.5, phased_ttt_prefix_docs=6, phased_ttt_num_phases=2,
                  global_ttt_chunk_tokens=24, global_ttt_lr=0.05, global_ttt_batch_seqs=2)
    values.update(overrides)
    return Config(**values)


def rms_norm(x):
    return F.rms_norm(x, (x.shape[-1],))


class TinyBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, kv = cfg.model_dim, cfg.kv_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.c_q, self.c_k, self.c_v, self.proj = (nn.Linear(d, n, bias=False) for n in (d, kv, kv, d))
        self.fc, self.down = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x, cu_seqlens=None, lora=None):
        B, T, _ = x.shape
        u = rms_norm(x)
        q = add_delta(self.c_q(u), lora and lora.q(u)).view(B, T, self.heads, self.head_dim)
        k = add_delta(self.c_k(u), lora and lora.k(u)).view(B, T, self.kv_heads, self.head_dim)
        v = add_delta(self.c_v(u), lora and lora.v(u)).view(B, T, self.kv_heads, self.head_dim)
        extras = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        y = kernels.xsa_attention(rms_norm(q), rms_norm(k), v, xsa=True, **extras).reshape(B, T, -1)
        x = x + add_delta(self.proj(y), lora and lora.o(u))
        m = rms_norm(x)
        return x + add_delta(self.down(F.leaky_relu(self.fc(m), 0.5).square()), lora and lora.mlp(m))


class TinyLoopedLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.blocks = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.num_layers))
        self.looping = True

    def plan(self):
        return [0, 1, 2, 1, 2] if self.looping else [0, 1, 2]

    def hidden(self, ids, cu_seqlens=None, lora=None):
        x = self.tok_emb(ids)
        for n, block in enumerate(self.plan()):
            x = self.blocks[block](x, cu_seqlens, lora.at(n) if lora is not None else None)
        return rms_norm(x)

    def token_losses(self, ids, targets, cu_seqlens=None):
        h = self.hidden(ids, cu_seqlens)
        nll = kernels.softcap_cross_entropy(h.flatten(0, 1), self.tok_emb.weight, targets.reshape(-1),
                                            self.cfg.logit_softcap)
        return nll.view(ids.shape)

    def forward(self, ids, targets, cu_seqlens=None):
        return self.token_losses(ids, targets, cu_seqlens).mean()


def make_tokens(lengths, seed=0) -> torch.Tensor:
    """A stream of documents [BOS] + (length - 1) tokens each, ids 2.. (no BOS inside)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.tensor([BOS_ID]), torch.randint(2, VOCAB, (n - 1,), generator=g)]) for n in lengths]
    return torch.cat(docs).long()


DOC_LENGTHS = [9, 30, 5, 17, 26, 3, 14, 21, 11, 7, 2, 19]  # the last document ends at the stream's end


def fake_luts():
    g = torch.Generator().manual_seed(3)
    return (torch.randint(0, 4, (VOCAB,), generator=g).short(), torch.rand(VOCAB, generator=g) < 0.5,
            torch.arange(VOCAB) < 2)


def run(cfg=None, tokens=None, luts=None, model=None, rank=0, world_size=1):
    """evaluate_phased_ttt with a trace: returns (result, events [(kind, positions, values)])."""
    cfg = cfg or tiny_config()
    tokens = make_tokens(DOC_LENGTHS) if tokens is None else tokens
    model = model or TinyLoopedLM(cfg)
    events = []
    result = evaluate_phased_ttt(model, tokens, cfg, fake_luts() if luts is None else luts, rank, world_size,
                                 trace=lambda kind, pos, val: events.append((kind, np.asarray(pos), val)))
    return result, events


# ----------------------------------------------------------------------------- the plan
def test_chunk_windows_follow_frontiers_example():
    assert num_chunks(3000, 48) == 63
    assert chunk_window(3000, 50, 48, 2048) == (2400, 2448, 400)
    assert chunk_window(3000, 62, 48, 2048) == (2976, 3000, 952)  # the last, short chunk
    assert chunk_window(100, 0, 48, 2048) == (0, 48, 0)


def test_phase_boundaries_are_the_records():
    assert phase_boundaries(2500, 3) == [833, 1666, 2500]
    assert phase_boundaries(2000, 1) == [2000]


def test_documents_include_their_following_bos():
    tokens = torch.tensor([1, 5, 6, 1, 7, 1, 8, 9, 9])
    docs = split_documents(tokens)
    assert docs.start.tolist() == [0, 3, 5] and docs.length.tolist() == [4, 3, 4]
    assert split_documents(torch.tensor([1, 5, 1])).length.tolist() == [3]  # a final lone BOS predicts nothing
    with pytest.raises(ValueError, match="starts with a BOS"):
        split_documents(torch.tensor([5, 1, 6]))


def test_batches_sorted_by_length_longest_first_short_batch_last_in_the_list():
    lengths = np.array([5, 9, 2, 9, 7, 3, 8])
    batches = length_sorted_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[2, 5, 0], [4, 6, 1], [3]]
    assert processing_order(batches, lengths) == [2, 1, 0]


def test_phase_sets_are_fixed_by_batch_order():
    cfg = tiny_config(ttt_batch_size=3, phased_ttt_prefix_docs=7, phased_ttt_num_phases=3)  # boundaries 2, 4, 7
    plan = make_plan(make_tokens(DOC_LENGTHS), cfg)
    lengths = plan.docs.length
    # 12 documents: batches of 3 by length, longest batch first
    assert plan.order == [3, 2, 1, 0]
    assert [p.after for p in plan.phases] == [0, 1, 2]
    # phase k keeps the first boundary-k of the scored documents sorted by (batch index, position)
    assert plan.phases[0].docs.tolist() == plan.batches[3][:2].tolist()
    assert plan.phases[1].docs.tolist() == plan.batches[2].tolist() + plan.batches[3][:1].tolist()
    assert plan.phases[2].docs.tolist() == (plan.batches[1].tolist() + plan.batches[2].tolist()
                                            + plan.batches[3][:1].tolist())
    assert all(np.all(np.diff(lengths[b]) >= 0) for b in plan.batches)


def test_a_chunk_longer_than_its_window_is_refused():
    cfg = tiny_config(ttt_chunk_size=16, ttt_eval_seq_len=12)
    with pytest.raises(ValueError, match="TTT_CHUNK_SIZE=16 exceeds TTT_EVAL_SEQ_LEN=12"):
        evaluate_phased_ttt(TinyLoopedLM(cfg), make_tokens(DOC_LENGTHS), cfg, fake_luts())


# ----------------------------------------------------------------------------- legality
def _scored(events):
    return [(pos, val) for kind, pos, val in events if kind == "score"]


def test_every_target_scored_once_bytes_match_and_no_update_before_its_score():
    tokens = make_tokens(DOC_LENGTHS)
    luts = fake_luts()
    result, events = run(tokens=tokens, luts=luts)
    positions = np.concatenate([pos for pos, _ in _scored(events)])
    assert np.array_equal(np.sort(positions), np.arange(1, tokens.numel()))  # each target exactly once
    expected_bytes = int(target_bytes(tokens[:-1], tokens[1:], luts).sum())
    nll_sum = float(sum(val.double().sum() for _, val in _scored(events)))
    assert result.val_loss == pytest.approx(nll_sum / (tokens.numel() - 1), rel=1e-12)
    assert result.val_bpb == pytest.approx(nll_sum / np.log(2) / expected_bytes, rel=1e-12)
    seen = set()
    kinds = set()
    for kind, pos, _ in events:
        kinds.add(kind)
        if kind == "score":
            seen.update(pos.tolist())
        else:  # an adapter update or a global phase: every position it reads was scored before
            assert set(pos.tolist()) <= seen, f"{kind} uses unscored positions {sorted(set(pos.tolist()) - seen)[:5]}"
    assert kinds == {"score", "train", "global"}


def test_sidecar_bytes_are_summed_over_the_scored_documents():
    tokens = make_tokens(DOC_LENGTHS)
    token_bytes = torch.randint(0, 5, (tokens.numel(),), generator=torch.Generator().manual_seed(1)).int()
    token_bytes[tokens == BOS_ID] = 0
    result, events = run(tokens=tokens, luts=SidecarBytes(token_bytes))
    nll_sum = float(sum(val.double().sum() for _, val in _scored(events)))
    assert result.val_bpb == pytest.approx(nll_sum / np.log(2) / int(token_bytes.sum()), rel=1e-12)


def test_changing_a_token_moves_no_earlier_score():
    """A token changed at stream position p: every target scored in an earlier step keeps its NLL
    bit for bit, and so does every target scored in p's own step before p or in another document."""
    tokens = make_tokens(DOC_LENGTHS)
    _, events = run(tokens=tokens)
    steps = {}  # target position -> (step index, NLL)
    for step, (pos, val) in enumerate(_scored(events)):
        steps.update({int(q): (step, float(v)) for q, v in zip(pos, val)})
    docs = split_documents(tokens)
    doc_of = np.searchsorted(docs.start, np.arange(tokens.numel()), side="right") - 1
    for p in (20, 47, 80):  # inside three documents of different batches
        changed = tokens.clone()
        changed[p] = 2 + (int(tokens[p]) - 1) % (VOCAB - 2)  # another non-BOS id
        assert changed[p] != tokens[p] and changed[p] != BOS_ID
        _, events2 = run(tokens=changed)
        after = {int(q): float(v) for pos, val in _scored(events2) for q, v in zip(pos, val)}
        step_p = steps[p][0]
        earlier = [q for q, (s, _) in steps.items() if s < step_p or (s == step_p and (q < p or doc_of[q] != doc_of[p]))]
        assert len(earlier) > 10
        moved = [q for q in earlier if after[q] != steps[q][1]]
        assert not moved, f"changing token {p} moved earlier scores at {moved[:5]}"
        assert any(after[q] != v for q, (_, v) in steps.items() if q not in earlier)  # the change is visible later


# ----------------------------------------------------------------------------- the base model
def test_fresh_adapters_reproduce_the_base_model():
    cfg = tiny_config()
    model = TinyLoopedLM(cfg)
    tokens = make_tokens(DOC_LENGTHS)[:40].view(2, 20)
    lora = BatchedLora(cfg, len(model.plan()), 2)
    lora.reset_a(torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.token_losses(tokens[:, :-1], tokens[:, 1:])
        adapted = lora_token_losses(model, tokens[:, :-1], tokens[:, 1:], lora.running())
    torch.testing.assert_close(adapted, base, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        lora.head_b.normal_()  # a nonzero B changes the scores: the adapters are really in the path
        assert not torch.allclose(lora_token_losses(model, tokens[:, :-1], tokens[:, 1:], lora.running()), base)


def test_without_learning_the_score_is_the_base_models_per_document_score():
    """lr 0 and no phases: each target's NLL is the base model's over its whole document (every
    document fits one window), so the chunking, padding and dropping out change nothing."""
    cfg = tiny_config(ttt_lora_lr=0.0, phased_ttt_num_phases=0, ttt_eval_seq_len=64)
    tokens = make_tokens(DOC_LENGTHS)
    model = TinyLoopedLM(cfg)
    result, _ = run(cfg=cfg, tokens=tokens, model=model)
    docs = split_documents(tokens)
    with torch.no_grad():
        total = sum(model.token_losses(tokens[s:s + n - 1][None], tokens[s + 1:s + n][None]).double().sum()
                    for s, n in zip(docs.start, docs.length))
    assert result.val_loss == pytest.approx(float(total) / (tokens.numel() - 1), rel=1e-6)


def test_the_adapters_learn_within_a_document():
    """Documents that repeat a 3-token pattern: after its first chunks a document's adapters have seen
    the pattern, so the phased TTT scores far below the same model that does not learn (lr 0)."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.tensor([BOS_ID]), torch.randint(2, VOCAB, (3,), generator=g).repeat(n)[:n - 1]])
            for n in (40, 36, 44, 30, 38, 42)]
    tokens = torch.cat(docs).long()
    losses = {}
    for lr in (0.0, 0.05):
        cfg = tiny_config(ttt_lora_lr=lr, phased_ttt_num_phases=0, ttt_eval_seq_len=64, ttt_chunk_size=8)
        losses[lr] = evaluate_phased_ttt(TinyLoopedLM(cfg), tokens, cfg, fake_luts()).val_loss
    assert losses[0.05] < 0.6 * losses[0.0], losses


# ----------------------------------------------------------------------------- ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_test_config() -> Config:
    """Batches of one document, one phase after 2: the second segment's 10 batches run on 8 lanes, so
    lanes 0 and 1 carry A from one batch to the next, and the two ranks run different lanes."""
    return tiny_config(ttt_batch_size=1, phased_ttt_prefix_docs=2, phased_ttt_num_phases=1)


def _rank_worker(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        lines = []
        with kernels.use_backend("reference"):
            cfg = rank_test_config()
            val_loss, val_bpb, _ = phased_ttt_evaluation(TinyLoopedLM(cfg), make_tokens(DOC_LENGTHS), cfg, fake_luts(),
                                                         EvalClock(), rank, world_size, log=lines.append, compile=False)
        torch.save((val_loss, val_bpb, lines), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_and_two_gloo_ranks_give_the_same_totals(tmp_path):
    out = str(tmp_path / "result")
    run_ranks(_rank_worker, 2, (2, _free_port(), out))
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    single, _ = run(cfg=rank_test_config())
    for val_loss, val_bpb, lines in ranks:
        assert val_loss == pytest.approx(single.val_loss, rel=1e-6)
        assert val_bpb == pytest.approx(single.val_bpb, rel=1e-6)
        # the batches split between the ranks, their work summed for the projection's rate
        assert f"lora_token_rows:{single.lora_work} " in lines[0], lines[0]


def test_the_global_phase_clock_starts_when_every_rank_is_there(monkeypatch):
    """A rank that waits for a slower one must not count the wait as global-phase time (the
    projection scales those seconds): the ranks meet at a barrier, then the phase's clock starts.
    The order of events on rank 0 of 2, its collectives stubbed (no clock is read for a bound)."""
    import model.phased_ttt as phased_ttt

    events = []
    monkeypatch.setattr(phased_ttt, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(phased_ttt, "sum_over_ranks", lambda sums: sums)
    monkeypatch.setattr(phased_ttt, "_global_phase", lambda *args: events.append("phase") or 1)

    def clock() -> float:
        events.append("clock")
        return 0.0

    with kernels.use_backend("reference"):
        cfg = rank_test_config()
        result = evaluate_phased_ttt(TinyLoopedLM(cfg), make_tokens(DOC_LENGTHS), cfg, fake_luts(), 0, 2, clock=clock)
    phases = [i for i, event in enumerate(events) if event == "phase"]
    assert phases and result.global_steps == len(phases)
    for i in phases:  # the LoRA part's end, the barrier, then the phase between its two readings
        assert events[i - 3 : i + 2] == ["clock", "barrier", "clock", "phase", "clock"], events


# ----------------------------------------------------------------------------- the clock
def test_evaluation_on_the_clock_logs_each_part_and_warns_past_the_limit():
    """A fake clock that moves 200 s per reading: the load lap holds what came before the call, the
    parts add up to the total, and the projection (far past 600 s here) brings the WARNING line."""
    ticks = iter(range(0, 10**7, 200))
    clock = EvalClock(lambda: float(next(ticks)))
    clock.clock()  # "reading the artifact": one reading before the call
    cfg = tiny_config()
    lines = []
    val_loss, val_bpb, times = phased_ttt_evaluation(TinyLoopedLM(cfg), make_tokens(DOC_LENGTHS), cfg, fake_luts(),
                                                     clock, log=lines.append, compile=False)
    single, _ = run()
    assert (val_loss, val_bpb) == (single.val_loss, single.val_bpb)
    assert times["load"] == 400.0 and times["compile"] == 200.0
    assert times["total"] == pytest.approx(times["load"] + times["compile"] + times["ttt"])
    assert any(line.startswith("eval_time load:400.0s compile:200.0s") for line in lines), lines
    # no full_tokens: the projection is of the documents scored here, and says so
    assert any(line.startswith("eval_time_projected scored set (12 documents) on 8 GPUs") for line in lines), lines
    assert lines[-1].startswith("WARNING: the projected evaluation time of the scored set (12 documents) on 8 GPUs")
    assert times["projected_8gpu"] > 600


def test_the_projection_is_of_the_full_set_when_given_it():
    """A MAX_VAL_TOKENS slice scored, the whole stream passed as full_tokens: the line and the warning
    name the full set and its documents, and the projection grows with them."""
    cfg = tiny_config()
    tokens = make_tokens(DOC_LENGTHS)
    lines, projected = [], {}
    for name, full in (("slice", None), ("full", torch.cat([tokens, make_tokens(DOC_LENGTHS * 3, seed=1)]))):
        ticks = iter(range(0, 10**7, 200))
        _, _, times = phased_ttt_evaluation(TinyLoopedLM(cfg), tokens, cfg, fake_luts(), EvalClock(lambda: float(next(ticks))),
                                            log=lines.append, compile=False, full_tokens=full)
        projected[name] = times["projected_8gpu"]
    assert any(line.startswith("eval_time_projected full set (48 documents) on 8 GPUs") for line in lines), lines
    assert lines[-1].startswith("WARNING: the projected evaluation time of the full set (48 documents) on 8 GPUs")
    assert projected["full"] > projected["slice"]


def test_projection_scales_the_busiest_lane_and_the_global_steps():
    cfg = tiny_config(ttt_batch_size=1)  # 12 batches over 8 lanes: lanes 0-3 run two in the last segment
    plan = make_plan(make_tokens(DOC_LENGTHS), cfg)
    work = lane_work(plan, cfg)
    assert work.sum() == lora_work(plan, range(len(plan.order)), cfg)
    result = PhasedResult(0.0, 0.0, lora_seconds=float(work.sum()), global_seconds=6.0, lora_work=int(work.sum()),
                          global_steps=3)
    projection = project_eval_seconds({"load": 10.0, "compile": 20.0, "other": 99.0}, result, plan, cfg, world_size=2)
    assert projection.lora_s == work.max()  # one second per token-row on the busiest lane
    assert projection.global_s == pytest.approx(global_steps(plan, cfg) * 2.0 * 2 / 8)
    assert projection.total_s == pytest.approx(30.0 + projection.lora_s + projection.global_s)


# ----------------------------------------------------------------------------- the frontier GPT
def tiny_frontier_config(**overrides) -> Config:
    """FRONTIER.md's model at toy size: 4 blocks looped 0,[1,2]x3,3 (8 applications), block 3 two-lane."""
    from model.config import PRESETS

    values = dict(PRESETS["frontier"](), vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1,
                  rope_dims=8, xsa_last_n=4, num_loops=2, loop_start=1, loop_end=2, parallel_start_layer=3,
                  gate_window=4)
    values.update({k: v for k, v in tiny_config().__dict__.items() if k.startswith(("ttt_", "phased_", "global_"))})
    values.update(ttt_method="phased_lora", **overrides)
    return Config(**values)


def frontier_model(cfg):
    from model.gpt import GPT

    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    with torch.no_grad():  # the frontier's zero-initialised outputs would hide the adapters' path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.looping = True
    return model


def test_frontier_gpt_takes_an_adapter_per_application_and_fresh_ones_change_nothing():
    cfg = tiny_frontier_config()
    model = frontier_model(cfg)
    assert len(model.plan()) == 8
    tokens = make_tokens(DOC_LENGTHS)[:42].view(2, 21)
    lora = BatchedLora(cfg, len(model.plan()), 2)
    lora.reset_a(torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.token_losses(tokens[:, :-1], tokens[:, 1:])
        torch.testing.assert_close(lora_token_losses(model, tokens[:, :-1], tokens[:, 1:], lora.running()), base,
                                   rtol=1e-6, atol=1e-6)
    for kind in ("q", "k", "v", "o", "mlp"):  # each block adapter, on the last application only, moves the scores
        with torch.no_grad():
            lora.reset_b()
            getattr(lora, f"{kind}_b")[-1].normal_()
            moved = lora_token_losses(model, tokens[:, :-1], tokens[:, 1:], lora.running())
        assert not torch.allclose(moved, base), kind
    with pytest.raises(IndexError, match="application slots"):
        model.hidden(tokens, lora=BatchedLora(cfg, 3, 2).running().gathered())


def test_frontier_gpt_phased_ttt_is_legal():
    cfg = tiny_frontier_config()
    tokens = make_tokens(DOC_LENGTHS)
    result, events = run(cfg=cfg, tokens=tokens, model=frontier_model(cfg))
    positions = np.concatenate([pos for kind, pos, _ in events if kind == "score"])
    assert np.array_equal(np.sort(positions), np.arange(1, tokens.numel()))
    seen = set()
    for kind, pos, _ in events:
        if kind == "score":
            seen.update(pos.tolist())
        else:
            assert set(pos.tolist()) <= seen, kind
    assert {kind for kind, _, _ in events} == {"score", "train", "global"} and np.isfinite(result.val_bpb)


def test_bench_ttt_smoke_prints_the_projection(capsys, monkeypatch):
    """bench.ttt end to end at smoke size (the reference kernels: the interpreter would take minutes);
    its figures mean nothing, only that it runs and prints every row."""
    from bench import ttt

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ttt.main(["--smoke"])
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and "| total without loading |" in out
    assert out.count("| LoRA batch ") == ttt.SAMPLE_BATCHES and "| global SGD (" in out


class GraphCounter:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as traced
    (no inductor: a CPU test of which graphs get compiled, not of their code)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.slow
def test_the_warm_up_compiles_every_graph_the_evaluation_uses():
    """After warm_up_ttt no step of the evaluation compiles a graph, whatever its shape: batches of
    5 and a last batch of one document, documents dropping out down to one row, window widths from
    the first chunk to the full window, a one-prediction document (width 1, padded), the model
    trained in place by the global phases in between. Before, the warm-up's graphs did not fit the
    loop's views (strides, storage offsets, a view's base), so each new case compiled in the timed
    loop, and past dynamo's recompile limit the step ran eager. The scores equal eager's."""
    from model.phased_ttt import compile_ttt_step, warm_up_ttt

    cfg = tiny_config(ttt_batch_size=5)
    tokens = make_tokens(DOC_LENGTHS[:11])  # 11 documents: batches of 5, 5 and 1
    lone = torch.tensor([BOS_ID, int(fake_luts()[0][2:].argmax()) + 2])  # one document, one prediction (of some bytes)
    counter = GraphCounter()
    step = compile_ttt_step(backend=counter)
    model = TinyLoopedLM(cfg)
    warm_up_ttt(model, step, cfg)
    warmed = counter.graphs
    assert warmed >= 1
    compiled = [evaluate_phased_ttt(model, t, cfg, fake_luts(), step_fn=step) for t in (tokens, lone)]
    assert counter.graphs == warmed, f"{counter.graphs - warmed} graph(s) compiled after the warm-up"
    eager_model = TinyLoopedLM(cfg)  # adapted in place by the first run's phases, as `model`
    eager = [evaluate_phased_ttt(eager_model, t, cfg, fake_luts()) for t in (tokens, lone)]
    for got, expected in zip(compiled, eager):
        assert got.val_loss == pytest.approx(expected.val_loss, rel=1e-5)
        assert got.global_steps == expected.global_steps


def test_a_one_document_batch_has_two_slots_and_its_score_is_the_base_models():
    cfg = tiny_config(ttt_lora_lr=0.0, phased_ttt_num_phases=0, ttt_batch_size=1, ttt_eval_seq_len=64)
    lora = BatchedLora(cfg, 5, 1)
    assert lora.head_a.shape[0] == 2 and lora.running().rows.tolist() == [0]
    with pytest.raises(IndexError, match="running\\(1\\)"):
        lora.running(1)
    tokens = make_tokens([9, 2])  # the second document makes one prediction: a window padded to 2
    model = TinyLoopedLM(cfg)
    with torch.no_grad():
        base = sum(model.token_losses(tokens[s:s + n - 1][None], tokens[s + 1:s + n][None]).double().sum()
                   for s, n in ((0, 10), (9, 2)))
    result, _ = run(cfg=cfg, tokens=tokens, model=model)
    assert result.val_loss == pytest.approx(float(base) / (tokens.numel() - 1), rel=1e-6)


@pytest.mark.gpu
def test_compiled_ttt_forward_matches_eager_with_few_graphs():
    """compile_ttt_step (dynamic shapes, as the record, with inductor) on the toy frontier GPT: after
    warm_up_ttt, rows (down to one) and window widths vary every step, yet no graph is compiled,
    and the scores match eager. (The CPU test above counts the graphs with a tracing backend.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    from model.phased_ttt import compile_ttt_step, warm_up_ttt

    cfg = tiny_frontier_config()
    model = frontier_model(cfg).cuda()
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_ttt_step(backend=counter)
    warm_up_ttt(model, compiled, cfg)
    warmed = counter.frame_count
    assert 1 <= sum(len(g.graph.nodes) > 0 for g in counter.graphs) <= 2  # the general graph and one row's
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = make_tokens(DOC_LENGTHS).cuda()
    lora = BatchedLora(cfg, len(model.plan()), 3, device="cuda")
    lora.reset_a(torch.Generator(device="cuda").manual_seed(0))
    for first, width in ((0, 12), (1, 9), (2, 16), (0, 7), (2, 5), (1, 12)):
        ids = tokens[:(3 - first) * (width + 1)].view(3 - first, width + 1)
        inputs, targets = (t.clone(memory_format=torch.contiguous_format) for t in (ids[:, :-1], ids[:, 1:]))
        got = compiled(model, inputs, targets, lora.running(first))
        got.sum().backward()
        torch.testing.assert_close(got, lora_token_losses(model, inputs, targets, lora.running(first)),
                                   rtol=1e-4, atol=1e-4)
    assert counter.frame_count == warmed, f"{counter.frame_count - warmed} graph(s) compiled after the warm-up"
