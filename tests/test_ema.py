"""The EMA of the weights (model/ema.py; FRONTIER.md section 3 "EMA", summary row "EMA of constant weights")."""
import pytest
import torch

from model.ema import ExponentialMovingAverage

DECAY = 0.9965  # the record's EMA_DECAY


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Embedding(7, 3))
    net[1].to(torch.bfloat16)  # one 16-bit parameter: the EMA keeps it in fp32, applies it in bf16
    return net


def perturb(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def test_constant_weights_leave_the_ema_unchanged():
    net = tiny_model()
    ema = ExponentialMovingAverage(net, DECAY)
    start = [w.clone() for w in ema.weights]
    for _ in range(50):
        ema.update()
    for w, w0, p in zip(ema.weights, start, net.parameters()):
        assert w.dtype == torch.float32 and torch.equal(w, w0) and torch.equal(w, p.detach().float())


def test_update_is_the_formula():
    net = tiny_model()
    ema = ExponentialMovingAverage(net, DECAY)
    expected = [p.detach().double() for p in net.parameters()]
    for step in range(3):
        perturb(net, seed=step)
        ema.update()
        expected = [DECAY * e + (1 - DECAY) * p.detach().double() for e, p in zip(expected, net.parameters())]
    for w, e in zip(ema.weights, expected):
        torch.testing.assert_close(w.double(), e, rtol=1e-6, atol=1e-6)
    # and it did move toward the weights, by a small step: neither the start nor the current weights
    assert not torch.equal(ema.weights[0], net[0].weight.detach())


def test_apply_casts_to_each_parameter_dtype():
    net = tiny_model()
    ema = ExponentialMovingAverage(net, 0.5)
    perturb(net, seed=1)
    ema.update()
    target = tiny_model(seed=3)
    ema.apply_to(target)
    for (name, p), w in zip(target.named_parameters(), ema.weights):
        assert p.dtype == dict(net.named_parameters())[name].dtype
        assert torch.equal(p.detach(), w.to(p.dtype)), name


def test_state_dict_round_trip_continues_identically():
    net = tiny_model()
    ema = ExponentialMovingAverage(net, DECAY)
    perturb(net, seed=2)
    ema.update()
    restored = ExponentialMovingAverage(net, DECAY)  # starts from the current weights, not the EMA's
    assert not torch.equal(restored.weights[0], ema.weights[0])
    restored.load_state_dict(ema.state_dict())
    for a, b in zip(restored.weights, ema.weights):
        assert torch.equal(a, b)
    perturb(net, seed=3)
    ema.update()
    restored.update()
    for a, b in zip(restored.weights, ema.weights):
        assert torch.equal(a, b)


def test_bad_input_is_one_clear_line():
    net = tiny_model()
    with pytest.raises(ValueError, match=r"EMA_DECAY=1.0 must lie in \(0, 1\)"):
        ExponentialMovingAverage(net, 1.0)
    ema = ExponentialMovingAverage(net, DECAY)
    with pytest.raises(ValueError, match="other parameters than the EMA's"):
        ema.apply_to(torch.nn.Linear(2, 2))
    state = ema.state_dict()
    state["weights"] = {**state["weights"], "0.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"holds 0.weight of shape \(2, 2\)"):
        ema.load_state_dict(state)


@pytest.mark.gpu
def test_update_does_not_sync_the_host():
    net = tiny_model().cuda()
    ema = ExponentialMovingAverage(net, DECAY)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
