"""Evaluation batches (model/evaluate._score_windows): the window plan goes to the device once and is
sliced there, and a ragged batch is padded to the full batch with windows that score nothing, so a
compiled scoring graph sees one shape per window length; the scores do not change."""
import pytest
import torch
import torch.nn.functional as F

from model import evaluate
from tests.test_evaluate import TinyCausalLM, synthetic_luts, synthetic_tokens


class ShapeRecorder(TinyCausalLM):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def token_losses(self, ids, targets):
        self.shapes.append(tuple(ids.shape))
        return super().token_losses(ids, targets)


@pytest.mark.parametrize("num_tokens, window, stride, batch_seqs", [(70, 16, 4, 5), (83, 12, 5, 64), (9, 8, 4, 3)])
def test_ragged_batches_are_padded_and_the_scores_unchanged(num_tokens, window, stride, batch_seqs):
    luts, tokens = synthetic_luts(), synthetic_tokens(num_tokens)
    padded, one_by_one = ShapeRecorder(), ShapeRecorder()
    got = evaluate.evaluate_sliding(padded, tokens, window, stride, batch_seqs, luts)
    expected = evaluate.evaluate_sliding(one_by_one, tokens, window, stride, 1, luts)  # batches of one: nothing to pad
    assert got == pytest.approx(expected, rel=1e-12)
    assert {rows for rows, _ in padded.shapes} == {batch_seqs}  # every batch full, the last ones too
    lengths = [length for _, length in padded.shapes]
    assert len(set(padded.shapes)) == len(set(lengths))  # one shape per window length
    contiguous = evaluate.evaluate_contiguous(ShapeRecorder(), tokens, 7, batch_seqs, luts)
    assert contiguous == pytest.approx(evaluate.evaluate_contiguous(ShapeRecorder(), tokens, 7, 1, luts), rel=1e-12)


def test_the_plan_is_uploaded_once_not_per_batch(monkeypatch):
    calls, real = [], torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = ShapeRecorder()
    evaluate.evaluate_sliding(model, synthetic_tokens(200), 16, 4, 3, synthetic_luts())
    assert len(model.shapes) > 10 and len(calls) <= 2  # starts and score_from, once each


# ----------------------------------------------------------------------------- document rows
class SegmentMeanLM(TinyCausalLM):
    """Context: the mean of the token's own segment so far (kernels.reference.segment_mask, so padded
    empty segments count for nothing); static shapes throughout, so it compiles whole."""

    def token_losses(self, ids, targets, cu_seqlens):
        from kernels.reference import segment_mask

        B, T = ids.shape
        x = self.embed(ids)
        mask = segment_mask(cu_seqlens, B, T).to(x.dtype)  # [B, T, T]
        x = x + mask @ x / mask.sum(-1, keepdim=True)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def test_document_rows_share_one_cu_seqlens_shape_and_one_compiled_graph():
    """Rows with many documents and rows with none: every row's cu_seqlens is padded to one width, so
    token_losses compiled with static shapes (as compile_for_eval does) compiles one graph for all of
    them (before: one per width, a multiple of 64, and past the recompile limit eager), and the
    scores equal the uncompiled model's."""
    row_len = 4 * 40
    tokens = synthetic_tokens(3 * row_len + 1).clone()
    tokens[tokens == 1] = 2
    tokens[0:row_len:2] = 1  # row 0: 80 documents, so more than 64 offsets; rows 1 and 2: cuts only
    tokens[row_len + 7] = 1
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = SegmentMeanLM()
    eager = evaluate.evaluate_documents(model, tokens, 4, 40, synthetic_luts())
    model.token_losses = torch.compile(model.token_losses, fullgraph=True, dynamic=False, backend=counting)
    compiled = evaluate.evaluate_documents(model, tokens, 4, 40, synthetic_luts())
    assert len(graphs) == 1, f"{len(graphs)} graphs for 3 rows"
    assert compiled == pytest.approx(eager, rel=1e-12)
    plan = evaluate.document_rows_cu_seqlens(tokens.numpy(), 0, 3, row_len, 4)
    assert plan.shape == (3, 128) and (plan[:, -1] == row_len).all() and plan[1, :3].tolist() == [0, 4, 7]
