"""GPTQ (model/gptq.py): the sigma-rule scale, H = I is rounding, the error it minimises, act-order,
dead columns, batching, and the calibration hooks (inputs per use, the fused MLP, the embedding)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model import gptq
from model.config import Config
from model.gpt import GPT


def random_pd(cols: int, seed: int, samples: int = 400) -> torch.Tensor:
    """XᵀX / n of correlated activations (a low-rank mix plus noise, column scales spread): like a layer's H."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols // 4, cols, generator=g)
    X = torch.randn(samples, cols // 4, generator=g) @ mix + 0.3 * torch.randn(samples, cols, generator=g)
    X = X * torch.linspace(0.2, 2.0, cols)[torch.randperm(cols, generator=g)]
    return X.T @ X / samples


def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, sigma: float, act_order: bool = True) -> torch.Tensor:
    """Column-at-a-time GPTQ in fp64, written from FRONTIER.md's steps without blocks: q int64 [rows, cols]."""
    R = 2 ** (bits - 1) - 1
    s = gptq.sigma_rule_scale(W, bits, sigma).double()[:, None]
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = torch.clamp(torch.round(W[:, j : j + 1] / s), -R, R)[:, 0]
        e = (W[:, j] - Q[:, j] * s[:, 0]) / U[j, j]
        W[:, j:] -= e[:, None] * U[j : j + 1, j:]
    out = torch.empty_like(Q)
    out[:, order] = Q
    return out.long()


def test_sigma_rule_scale():
    W = torch.randn(5, 300, dtype=torch.float64).float()
    W[3] = 0
    scale = gptq.sigma_rule_scale(W, 6, 12.5)
    expected = torch.clamp(12.5 * W.std(dim=1, unbiased=True) / 31, min=1e-10).to(torch.float16)
    assert scale.dtype == torch.float16 and torch.equal(scale, expected)
    q, _ = gptq.gptq_quantize(W, torch.eye(300), 6, 12.5)
    assert torch.equal(q[3], torch.zeros(300, dtype=torch.int8))  # an all-zero row: fp16 scale 0, codes 0


@pytest.mark.parametrize("bits,sigma", [(6, 12.85), (7, 14.0), (4, 3.0)])
def test_identity_hessian_is_round_to_nearest(bits, sigma):
    W = torch.randn(2, 24, 200) * torch.linspace(0.01, 3, 24)[None, :, None]  # 200 columns: a ragged last block
    q, scale = gptq.gptq_quantize(W, torch.eye(200).expand(2, 200, 200), bits, sigma)
    q_rtn, scale_rtn = gptq.round_to_nearest(W, bits, sigma)
    assert torch.equal(scale, scale_rtn) and torch.equal(q, q_rtn)
    R = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.abs().max()) <= R
    assert (q.abs() == R).any() == (sigma < 4)  # sigma 3 clips a normal row's tails; 12.85 and 14 do not


def test_rounding_is_half_to_even():
    w = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 40.0, -40.0, 0.49])
    q = gptq._round_column(w, torch.tensor(1.0), 31)
    assert q.tolist() == [0, 2, 2, 0, -2, 4, 31, -31, 0]


@pytest.mark.parametrize("bits", [6, 4])
def test_error_below_round_to_nearest_on_a_random_hessian(bits):
    for seed in range(3):
        H = random_pd(160, seed)
        W = torch.randn(48, 160, generator=torch.Generator().manual_seed(seed))
        q, scale = gptq.gptq_quantize(W, H, bits, 8.0, block=64)
        q_rtn, scale_rtn = gptq.round_to_nearest(W, bits, 8.0)
        assert torch.equal(scale, scale_rtn)
        assert gptq.quadratic_error(W, q, scale, H) < 0.8 * gptq.quadratic_error(W, q_rtn, scale_rtn, H)


def test_matches_the_unblocked_reference_with_act_order():
    H, W = random_pd(192, 5), torch.randn(32, 192, generator=torch.Generator().manual_seed(5))
    q, _ = gptq.gptq_quantize(W, H, 6, 10.0)  # blocks of 128: one full block and a ragged one
    ref = reference_gptq(W, H, 6, 10.0)
    mismatch = (q.long() != ref).float().mean().item()
    assert mismatch < 2e-3 and int((q.long() - ref).abs().max()) <= 1  # fp32 vs fp64 may flip a rare tie
    without_act_order = (q.long() != reference_gptq(W, H, 6, 10.0, act_order=False)).float().mean().item()
    assert without_act_order > 20 * max(mismatch, 1e-3)  # the order matters: a missing act-order would fail above


def test_act_order_makes_the_result_independent_of_column_order():
    H, W = random_pd(96, 11), torch.randn(16, 96, generator=torch.Generator().manual_seed(11))
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    q, scale = gptq.gptq_quantize(W, H, 6, 10.0, block=32)
    q_perm, scale_perm = gptq.gptq_quantize(W[:, perm], H[perm][:, perm], 6, 10.0, block=32)
    assert torch.equal(q_perm, q[:, perm]) and torch.equal(scale_perm, scale)


def test_dead_columns_are_zero_and_the_scale_keeps_the_original_rows():
    H, W = random_pd(64, 3), torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    dead = torch.tensor([0, 17, 63])
    H[dead, :] = 0
    H[:, dead] = 0
    q, scale = gptq.gptq_quantize(W, H, 6, 10.0)
    assert torch.equal(q[:, dead], torch.zeros(8, 3, dtype=torch.int8))
    assert torch.equal(scale, gptq.sigma_rule_scale(W, 6, 10.0))  # std over every column, dead ones included
    assert (q.long() != reference_gptq(W, H, 6, 10.0)).float().mean() < 5e-3  # the rest is GPTQ as without them


def test_batched_equals_one_at_a_time():
    Ws = torch.randn(3, 20, 70)
    Hs = torch.stack([random_pd(70, s) for s in range(3)])
    q, scale = gptq.gptq_quantize(Ws, Hs, 6, 11.5)
    for i in range(3):
        qi, si = gptq.gptq_quantize(Ws[i], Hs[i], 6, 11.5)
        assert torch.equal(q[i], qi) and torch.equal(scale[i], si)


def test_shape_mismatch_is_one_line():
    with pytest.raises(ValueError, match="H must be"):
        gptq.gptq_quantize(torch.randn(4, 8), torch.eye(9), 6, 10.0)


# --------------------------------------------------------------------------- calibration


class LoopedToy(nn.Module):
    """An embedding, one linear applied twice (a loop), and a final norm: hidden() like GPT's."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16, bias=False)

    def hidden(self, ids):
        x = self.tok_emb(ids)
        x = self.lin(x)
        x = self.lin(torch.tanh(x))
        return F.rms_norm(x, (16,))


def test_hooks_accumulate_once_per_use_and_divide_by_batches():
    torch.manual_seed(0)
    model = LoopedToy().train()
    batches = [torch.randint(0, 50, (2, 9)) for _ in range(3)]
    H, seconds = gptq.collect_hessians(model, batches, ["lin.weight", "tok_emb.weight"])
    assert model.training and seconds >= 0  # the mode is restored
    expected_lin, expected_emb = torch.zeros(16, 16), torch.zeros(16, 16)
    with torch.no_grad():
        for ids in batches:
            x1 = model.tok_emb(ids).reshape(-1, 16)
            x2 = torch.tanh(model.lin(x1))
            expected_lin += x1.T @ x1 + x2.T @ x2
            h = model.hidden(ids).reshape(-1, 16)
            expected_emb += h.T @ h
    torch.testing.assert_close(H["lin.weight"], expected_lin / 3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H["tok_emb.weight"], expected_emb / 3, rtol=1e-5, atol=1e-5)


def calibration_gpt() -> GPT:
    """A tiny GPT whose out projections are not zero (so every proj's inputs are not all zero)."""
    cfg = Config(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=8,
                 xsa_last_n=1, bigram_vocab_size=17, bigram_dim=8, ve_enabled=False, train_seq_len=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for block in model.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.05)
            nn.init.normal_(block.mlp.proj.weight, std=0.05)
    return model


def test_calibration_of_the_gpt_sees_every_matrix():
    with kernels.use_backend("reference"):
        model = calibration_gpt()
        names = [n for n in model.int6_matrix_names()] + ["tok_emb.weight"]
        batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
        H, _ = gptq.collect_hessians(model, batches, names)
        mlp_inputs = []
        handle = model.blocks[1].mlp.register_forward_pre_hook(lambda m, args: mlp_inputs.append(args[0].detach()))
        with torch.no_grad():
            hidden = [model.hidden(ids) for ids in batches]
        handle.remove()
    assert set(H) == set(names)
    for name, h in H.items():
        assert torch.isfinite(h).all() and torch.allclose(h, h.T) and h.diagonal().min() > 0, name
    assert torch.equal(H["blocks.0.attn.c_q.weight"], H["blocks.0.attn.c_k.weight"])  # c_q, c_k, c_v share u
    x = torch.cat([m.reshape(-1, 32) for m in mlp_inputs])
    z = F.relu(x @ model.blocks[1].mlp.fc.weight.T).square()  # the fused MLP's hidden activation
    torch.testing.assert_close(H["blocks.1.mlp.fc.weight"], x.T @ x / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(H["blocks.1.mlp.proj.weight"], z.T @ z / 2, rtol=1e-5, atol=1e-6)
    h = torch.cat([t.reshape(-1, 32) for t in hidden])
    torch.testing.assert_close(H["tok_emb.weight"], h.T @ h / 2, rtol=1e-5, atol=1e-6)


def test_calibration_refuses_what_it_cannot_hook():
    model = LoopedToy()
    with pytest.raises(ValueError, match="not the weight of a linear module"):
        gptq.collect_hessians(model, [torch.zeros(1, 3, dtype=torch.long)], ["tok_emb.bias"])
    with pytest.raises(ValueError, match="no calibration batches"):
        gptq.collect_hessians(model, [], ["lin.weight"])


def test_calibration_of_the_looped_frontier_model():
    """The frontier's trunk, looped: blocks 3-5 run three times per batch and their Hessians hold
    every use; the MLP's activation is the leaky square (slope 0.5); the gate is not hooked."""
    from model.config import PRESETS

    cfg = Config(**dict(PRESETS["frontier"](), vocab_size=96, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                        train_seq_len=16, compile=False))
    torch.manual_seed(0)
    with kernels.use_backend("reference"):
        model = GPT(cfg)
        for parameter in model.parameters():
            if parameter.dim() == 2 and not parameter.detach().any():
                nn.init.normal_(parameter, std=0.05)
        model.looping = True
        names = sorted(model.int6_matrix_names()) + ["tok_emb.weight"]
        batches = [torch.randint(0, 96, (2, 16)) for _ in range(2)]
        H, _ = gptq.collect_hessians(model, batches, names)
        inputs = {i: [] for i in (2, 4)}
        handles = [model.blocks[i].mlp.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0]))
                   for i in inputs]
        with torch.no_grad():
            for ids in batches:
                model.hidden(ids)
        for handle in handles:
            handle.remove()
    assert set(H) == set(names) and len(inputs[2]) == 2 and len(inputs[4]) == 6  # block 4 is looped: 3 uses a batch
    for i, captured in inputs.items():
        x = torch.cat([t.reshape(-1, 32).float() for t in captured])
        z = F.leaky_relu(x @ model.blocks[i].mlp.fc.weight.T, 0.5).square()
        torch.testing.assert_close(H[f"blocks.{i}.mlp.fc.weight"], x.T @ x / 2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(H[f"blocks.{i}.mlp.proj.weight"], z.T @ z / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_gptq_and_sort_equal_the_cpu():
    from model import pergroup

    Ws = torch.randn(3, 40, 130)
    Hs = torch.stack([random_pd(130, s) for s in range(3)])
    q_cpu, s_cpu = gptq.gptq_quantize(Ws, Hs, 6, 11.5)
    q_gpu, s_gpu = gptq.gptq_quantize(Ws.cuda(), Hs.cuda(), 6, 11.5)
    assert torch.equal(s_gpu.cpu(), s_cpu)
    assert (q_gpu.cpu() != q_cpu).float().mean() < 2e-3  # other fp32 summation orders may flip a rare tie
    rows = torch.randint(-3, 4, (2, 300, 64), dtype=torch.int8)
    assert torch.equal(pergroup.l1_chain(rows, device="cuda"), pergroup.l1_chain(rows, device="cpu"))


def test_calibration_under_bf16_autocast_keeps_the_hessians_fp32(monkeypatch):
    """The export calibrates inside the run's bf16 autocast (model/calibration.py): the forward is bf16
    there, but H = sum XᵀX, its sums and the fused MLP hook's phi(z) must stay fp32 (FRONTIER.md 4).
    CPU autocast makes matmuls bf16 like CUDA's, so a product left to it fails here."""
    with kernels.use_backend("reference"):
        model = calibration_gpt()
        cfg = model.cfg
        names = sorted(model.int6_matrix_names()) + ["tok_emb.weight"]
        modules = dict(model.named_modules())
        seen = {name: [] for name in names}  # the inputs the calibration's hooks are handed, in the same run
        for name in names[:-1]:
            path = name.rpartition(".")[0]
            hooked = path.rpartition(".")[0] if path.endswith(("mlp.fc", "mlp.proj")) else path  # the fused MLP
            modules[hooked].register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
        hidden = model.hidden

        def hidden_seen(ids):  # the head's input, which the embedding's Hessian is built from
            seen["tok_emb.weight"].append(hidden(ids))
            return seen["tok_emb.weight"][-1]
        monkeypatch.setattr(model, "hidden", hidden_seen)
        batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            H, _ = gptq.collect_hessians(model, batches, names)
    assert seen["tok_emb.weight"][0].dtype == torch.bfloat16  # the forward did run in bf16
    for name in names:
        X = [x.double().reshape(-1, x.shape[-1]) for x in seen[name]]
        if name.endswith("mlp.proj.weight"):  # phi(z) of the fused MLP, z = fc(x), from the bf16 input
            fc = modules[name.replace("proj.weight", "fc")].weight.double()
            X = [F.leaky_relu(x @ fc.T, cfg.mlp_leaky_slope).square() for x in X]
        expected = sum(x.T @ x for x in X) / len(batches)
        assert H[name].dtype == torch.float32, name
        torch.testing.assert_close(H[name].double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
