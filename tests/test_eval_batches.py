"""Evaluation batches (model/evaluate._score_windows): the window plan goes to the device once and is
sliced there, and a ragged batch is padded to the full batch with windows that score nothing, so a
compiled scoring graph sees one shape per window length; the scores do not change."""
import pytest
import torch

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
