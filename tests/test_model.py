"""The GPT of SPEC.md "Model": each feature against a direct computation on a tiny config.

Every test runs on the reference kernel backend (the kernels have their own tests); the tiny
model is "randomised" (every parameter, zero-initialised ones included, set to random values)
wherever a zero init would hide the feature under test.
"""
import collections
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference
from kernels._launch import INTERPRET
from model import export
from model.config import PRESETS, Config
from model.gpt import GPT, CastedLinear, apply_partial_rope, rope_cos_sin
from tests.fakes import randomise
from tests.tolerances import assert_close

# 5 layers: encoder 0-1, decoder 2-4 (block 4 gets no skip); head dim 8, RoPE on 4 of them;
# VE on one encoder and one decoder block; sizes chosen not to be powers of two.
TINY = Config(
    vocab_size=96, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, rope_train_len=8,
    xsa_last_n=2, bigram_vocab_size=37, bigram_dim=12, ve_dim=12, ve_layers="1,4",
)
RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default (model/layers.py), also for bf16 inputs


@pytest.fixture(autouse=True)
def reference_backend():
    with kernels.use_backend("reference"):
        yield


def build(cfg: Config = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def batch(cfg: Config = TINY, B: int = 2, T: int = 11, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    return ids, targets


def direct_rms_norm(x):
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + RMS_EPS)


def direct_hash(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    out = torch.empty_like(ids)
    for b in range(ids.shape[0]):
        out[b, 0] = buckets - 1
        for t in range(1, ids.shape[1]):
            out[b, t] = ((36313 * int(ids[b, t])) ^ (27191 * int(ids[b, t - 1]))) % (buckets - 1)
    return out


def direct_rope(x: torch.Tensor, rope_dims: int, base: float) -> torch.Tensor:
    """x [B, T, H, D]: dim p pairs with dim p + rope_dims/2 and turns by angle t * base^(-2p/rope_dims)."""
    out = x.clone().double()
    half = rope_dims // 2
    for t in range(x.shape[1]):
        for p in range(half):
            angle = t * base ** (-2 * p / rope_dims)
            a, b = x[:, t, :, p].double(), x[:, t, :, p + half].double()
            out[:, t, :, p] = a * math.cos(angle) - b * math.sin(angle)
            out[:, t, :, p + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


class Recorder:
    """Forward hooks that keep each module's inputs and output, and a wrapped xsa_attention."""

    def __init__(self, monkeypatch=None):
        self.calls, self.handles, self.attention = {}, [], []
        if monkeypatch is not None:
            original = kernels.xsa_attention

            def recording_attention(q, k, v, xsa=False):
                self.attention.append(dict(q=q, k=k, v=v, xsa=xsa))
                return original(q, k, v, xsa)

            monkeypatch.setattr(kernels, "xsa_attention", recording_attention)

    def watch(self, name: str, module: torch.nn.Module):
        def hook(_module, args, output):
            self.calls[name] = dict(args=args, out=output)

        self.handles.append(module.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- size, names, groups


@pytest.fixture(scope="module")
def default_model():
    torch.manual_seed(0)
    return GPT(Config())


def test_default_config_has_exactly_the_spec_parameter_count(default_model):
    assert sum(p.numel() for p in default_model.parameters()) == 26_993_756


def test_state_dict_names_shapes_and_dtypes(default_model):
    cfg, params = Config(), dict(default_model.named_parameters())
    expected = {
        "tok_emb.weight": ((1024, 512), torch.bfloat16),
        "bigram.table": ((2048, 128), torch.bfloat16),
        "bigram.proj.weight": ((512, 128), torch.float32),
        "bigram.scale": ((), torch.float32),
        "smear.gate": ((512,), torch.float32),
        "ve.table": ((1024, 128), torch.bfloat16),
        "ve.proj.weight": ((256, 128), torch.float32),
        "ve.scale": ((), torch.float32),
        "ve.layer_scales": ((2,), torch.float32),
        "skip_weights": ((5, 512), torch.float32),
    }
    for i in range(cfg.num_layers):
        expected.update({
            f"blocks.{i}.attn.c_q.weight": ((512, 512), torch.float32),
            f"blocks.{i}.attn.c_k.weight": ((256, 512), torch.float32),
            f"blocks.{i}.attn.c_v.weight": ((256, 512), torch.float32),
            f"blocks.{i}.attn.proj.weight": ((512, 512), torch.float32),
            f"blocks.{i}.attn.q_gain": ((8,), torch.float32),
            f"blocks.{i}.mlp.fc.weight": ((1536, 512), torch.float32),
            f"blocks.{i}.mlp.proj.weight": ((512, 1536), torch.float32),
            f"blocks.{i}.attn_scale": ((512,), torch.float32),
            f"blocks.{i}.mlp_scale": ((512,), torch.float32),
            f"blocks.{i}.resid_mix": ((2, 512), torch.float32),
        })
    assert {n: (tuple(p.shape), p.dtype) for n, p in params.items()} == expected
    assert list(default_model.state_dict()) == list(params)  # no buffers travel with the weights


def test_no_ve_parameters_without_ve_layers():
    model = build(dataclasses.replace(TINY, ve_enabled=False))
    assert not any(n.startswith("ve.") for n, _ in model.named_parameters())
    ids, targets = batch()
    assert torch.isfinite(model(ids, targets))


def test_param_groups_cover_every_parameter_exactly_once(default_model):
    groups = default_model.param_groups()
    assert set(groups) == {"matrix", "embed", "scalar"}
    names = {id(p): n for n, p in default_model.named_parameters()}
    grouped = [names[id(p)] for g in groups.values() for p in g]
    assert sorted(grouped) == sorted(names.values())  # every parameter, none twice
    matrix = {names[id(p)] for p in groups["matrix"]}
    expected_matrix = {
        n for n, p in default_model.named_parameters()
        if p.dim() == 2 and n.startswith("blocks.") and not n.endswith("resid_mix")
    } | {"bigram.proj.weight", "ve.proj.weight"}
    assert matrix == expected_matrix
    assert {names[id(p)] for p in groups["embed"]} == {"tok_emb.weight", "bigram.table", "ve.table"}
    assert all(p.dim() <= 1 or names[id(p)].endswith(("resid_mix", "skip_weights")) for p in groups["scalar"])


# --------------------------------------------------------------------------- declarations for the exporter

# The exporter's classes before the model declared its tensors: a guess from name parts, written
# out here so that the declarations are shown to keep every class of the seed's tensors.
OLD_INT6_NAME_PARTS = (".attn.", ".mlp.")
OLD_CONTROL_NAME_PARTS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "smear", ".scale", "layer_scales")


def old_name_rule_class(name: str, t: torch.Tensor) -> str:
    if not t.is_floating_point():
        return "raw"
    if t.numel() > 65_536:
        return "int6" if any(part in name for part in OLD_INT6_NAME_PARTS) else "int8"
    if t.dim() <= 1 or any(part in name for part in OLD_CONTROL_NAME_PARTS):
        return "fp32"
    return "fp16"


def declared_classes(model: GPT) -> dict[str, str]:
    fp32, int6 = model.control_tensor_names(), model.int6_matrix_names()
    return {n: export.tensor_class(n, t, fp32_names=fp32, int6_names=int6) for n, t in model.state_dict().items()}


@pytest.mark.parametrize("which", ["default", "smoke", "tiny"])
def test_declared_export_classes_equal_the_old_name_rule(default_model, which):
    model = {"default": default_model, "smoke": build(Config(**PRESETS["smoke"]())), "tiny": build()}[which]
    classes = declared_classes(model)
    assert classes == {n: old_name_rule_class(n, t) for n, t in model.state_dict().items()}
    if which == "default":
        assert collections.Counter(classes.values()) == {"int6": 66, "int8": 3, "fp16": 2, "fp32": 49}


def test_declarations_are_the_scalar_group_and_the_block_matrices(default_model):
    names = {id(p): n for n, p in default_model.named_parameters()}
    scalar = {names[id(p)] for p in default_model.param_groups()["scalar"]}
    assert default_model.control_tensor_names() == scalar  # a new control tensor must be declared too
    matrices = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    assert default_model.int6_matrix_names() == {f"blocks.{i}.{m}.weight" for i in range(11) for m in matrices}
    without_ve = build(dataclasses.replace(TINY, ve_enabled=False))  # no module, no declaration
    assert without_ve.control_tensor_names() <= set(without_ve.state_dict())
    assert not any(n.startswith("ve.") for n in without_ve.control_tensor_names())


class GatedSkipsGPT(GPT):
    """A frontier control tensor that the old name rule stored in fp16: skip gates [skips, dim]."""

    control_tensors = GPT.control_tensors + ("skip_gates",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.skip_gates = nn.Parameter(torch.zeros_like(self.skip_weights))


def test_a_declared_skip_gate_is_exported_in_fp32():
    model = randomise(GatedSkipsGPT(TINY))
    sd = model.state_dict()
    assert old_name_rule_class("skip_gates", sd["skip_gates"]) == "fp16"  # the rule missed it
    assert declared_classes(model)["skip_gates"] == "fp32"
    blob, _ = export.artifact_to_bytes(
        sd, fp32_names=model.control_tensor_names(), int6_names=model.int6_matrix_names(), level=3
    )
    assert torch.equal(export.artifact_from_bytes(blob)["skip_gates"], sd["skip_gates"])


# --------------------------------------------------------------------------- init


def test_init_rules(default_model):
    m, cfg = default_model, Config()

    def orthonormal(w, scale=1.0):  # rows orthonormal when wide/square, columns when tall
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, scale**2 * torch.eye(gram.shape[0]), atol=1e-4, rtol=0)

    for block in (m.blocks[0], m.blocks[-1]):  # one loop inits them all; two suffice to check it
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            orthonormal(lin.weight)
    for block in m.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        assert torch.equal(block.attn.q_gain, torch.full((8,), 1.5))
        assert torch.equal(block.resid_mix, torch.stack((torch.ones(512), torch.zeros(512))))
        assert torch.equal(block.attn_scale, torch.ones(512)) and torch.equal(block.mlp_scale, torch.ones(512))
    orthonormal(m.bigram.proj.weight, 1 / math.sqrt(2 * cfg.num_layers))
    orthonormal(m.ve.proj.weight, 1 / math.sqrt(2 * cfg.num_layers))
    assert not m.bigram.table.any() and m.bigram.scale.item() == pytest.approx(0.05)
    assert m.ve.scale.item() == pytest.approx(0.1) and torch.equal(m.ve.layer_scales, torch.ones(2))
    assert m.tok_emb.weight.float().std().item() == pytest.approx(0.005, rel=0.02)
    assert m.ve.table.float().std().item() == pytest.approx(0.01, rel=0.03)
    assert not m.smear.gate.any() and torch.equal(m.skip_weights, torch.ones(5, 512))


def test_loss_at_init_is_close_to_ln_vocab(default_model):
    ids, targets = batch(Config(), B=2, T=16)
    with torch.no_grad():
        loss = default_model(ids, targets)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(1024)) < 0.05


# --------------------------------------------------------------------------- embeddings in


def test_bigram_hash_embedding_against_direct_formula():
    model = randomise(build())
    ids, _ = batch(B=3, T=9)
    buckets = direct_hash(ids, TINY.bigram_vocab_size)
    assert (buckets[:, 0] == TINY.bigram_vocab_size - 1).all()
    expected = model.bigram.scale.double() * (model.bigram.table.double()[buckets] @ model.bigram.proj.weight.double().T)
    with torch.no_grad():
        got = model.bigram(ids, torch.float32)
    assert_close(got, expected.float())


def test_smear_gate_against_direct_loop():
    model = randomise(build())
    x = torch.randn(3, 7, TINY.model_dim)
    with torch.no_grad():
        got = model.smear(x)
        g = torch.sigmoid(model.smear.gate)
    for b in range(3):
        for t in range(7):
            previous = x[b, t - 1] if t > 0 else torch.zeros(TINY.model_dim)  # x_{-1} = 0
            assert_close(got[b, t], (1 - g) * x[b, t] + g * previous)
    # sequences are independent: the last token of one row never reaches the next row
    changed = x.clone()
    changed[0] = torch.randn(7, TINY.model_dim)
    with torch.no_grad():
        assert torch.equal(model.smear(changed)[1:], got[1:])
        assert_close(model.smear(x[:, :1]), (1 - g) * x[:, :1])  # T = 1


def test_embedding_stream_is_smeared_normed_sum():
    """x0 (the second input of every block) = SmearGate(RMSNorm(tok_emb + BigramHash))."""
    model = randomise(build())
    rec = Recorder()
    rec.watch("block0", model.blocks[0])
    ids, targets = batch()
    with torch.no_grad():
        model(ids, targets)
        summed = model.tok_emb.weight.double()[ids] + model.bigram(ids, torch.float32).double()
        expected = model.smear(direct_rms_norm(summed).float())
    rec.close()
    assert_close(rec.calls["block0"]["args"][1], expected)


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("ln_scale", [True, False])
def test_block_wiring_resid_mix_and_ln_scale(ln_scale):
    model = randomise(build(dataclasses.replace(TINY, ln_scale=ln_scale)))
    rec = Recorder()
    for i, block in enumerate(model.blocks):
        rec.watch(f"block{i}", block)
        rec.watch(f"attn{i}", block.attn)
        rec.watch(f"mlp{i}", block.mlp)
    ids, targets = batch()
    with torch.no_grad():
        model(ids, targets)
    rec.close()
    for i, block in enumerate(model.blocks):
        s = 1 / math.sqrt(i + 1) if ln_scale else 1.0
        x, x0 = rec.calls[f"block{i}"]["args"][:2]
        mix = block.resid_mix.detach()
        x_in = mix[0] * x + mix[1] * x0
        assert_close(rec.calls[f"attn{i}"]["args"][0], (direct_rms_norm(x_in) * s).float())
        x_mid = x_in + block.attn_scale.detach() * rec.calls[f"attn{i}"]["out"]
        assert_close(rec.calls[f"mlp{i}"]["args"][0], (direct_rms_norm(x_mid) * s).float())
        assert_close(rec.calls[f"block{i}"]["out"], x_mid + block.mlp_scale.detach() * rec.calls[f"mlp{i}"]["out"])


def test_mlp_is_relu_squared():
    model = randomise(build())
    mlp, x = model.blocks[0].mlp, torch.randn(2, 5, TINY.model_dim)
    with torch.no_grad():
        expected = (torch.relu(x.double() @ mlp.fc.weight.double().T) ** 2) @ mlp.proj.weight.double().T
        assert_close(mlp(x), expected.float())


@pytest.mark.parametrize("num_layers", [5, 11])
def test_unet_skip_pairing(num_layers):
    """Decoder block j adds skip_weights[j] * (output of encoder block E-1-j) while any remain."""
    cfg = dataclasses.replace(TINY, num_layers=num_layers, ve_layers=f"{num_layers - 2}", xsa_last_n=1)
    model = randomise(build(cfg))
    rec = Recorder()
    for i, block in enumerate(model.blocks):
        rec.watch(f"block{i}", block)
    ids, targets = batch(T=5)
    with torch.no_grad():
        model(ids, targets)
    rec.close()
    E = num_layers // 2
    assert model.skip_weights.shape[0] == E
    block_in = [rec.calls[f"block{i}"]["args"][0] for i in range(num_layers)]
    block_out = [rec.calls[f"block{i}"]["out"] for i in range(num_layers)]
    assert_close(block_in[0], rec.calls["block0"]["args"][1])  # the trunk starts at x0
    for i in range(1, num_layers):
        j = i - E
        expected = block_out[i - 1]
        if 0 <= j < E:
            expected = expected + model.skip_weights[j].detach() * block_out[E - 1 - j]
        assert_close(block_in[i], expected)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("T", [6, 11])  # 11 > rope_train_len = 8: the NTK-rescaled base
def test_attention_inputs_against_direct_computation(monkeypatch, T):
    """q, k, v handed to xsa_attention: per-head RMSNorm, partial RoPE, q gain, VE on its layers."""
    model = randomise(build())
    rec = Recorder(monkeypatch)
    for i, block in enumerate(model.blocks):
        rec.watch(f"attn{i}", block.attn)
    ids, targets = batch(T=T)
    with torch.no_grad():
        model(ids, targets)
    rec.close()
    cfg, B, D = TINY, ids.shape[0], TINY.head_dim
    base = cfg.rope_base * (T / cfg.rope_train_len) ** (cfg.rope_dims / (cfg.rope_dims - 2)) if T > 8 else cfg.rope_base
    ve = model.ve.scale.double() * (model.ve.table.double()[ids] @ model.ve.proj.weight.double().T)
    for i, block in enumerate(model.blocks):
        a, h = block.attn, rec.calls[f"attn{i}"]["args"][0].double()
        q = direct_rms_norm((h @ a.c_q.weight.double().T).view(B, T, cfg.num_heads, D))
        q = direct_rope(q, cfg.rope_dims, base) * a.q_gain.double()[None, None, :, None]
        k = direct_rope(direct_rms_norm((h @ a.c_k.weight.double().T).view(B, T, cfg.num_kv_heads, D)), cfg.rope_dims, base)
        v = h @ a.c_v.weight.double().T
        if i in cfg.ve_layer_indices:
            v = v + model.ve.layer_scales[cfg.ve_layer_indices.index(i)].double() * ve
        got = rec.attention[i]
        assert_close(got["q"], q.float())
        assert_close(got["k"], k.float())
        assert_close(got["v"], v.view(B, T, cfg.num_kv_heads, D).float())


def test_value_embedding_reaches_only_its_layers(monkeypatch):
    model = randomise(build())
    with torch.no_grad():
        model.ve.layer_scales.copy_(torch.tensor([0.7, -1.3]))
    rec = Recorder(monkeypatch)
    for i, block in enumerate(model.blocks):
        rec.watch(f"c_v{i}", block.attn.c_v)
    ids, targets = batch()
    with torch.no_grad():
        model(ids, targets)
        ve = model.ve(ids, torch.float32)
    rec.close()
    for i in range(TINY.num_layers):
        added = rec.attention[i]["v"].flatten(2) - rec.calls[f"c_v{i}"]["out"]
        if i in TINY.ve_layer_indices:
            assert_close(added, model.ve.layer_scales[TINY.ve_layer_indices.index(i)].detach() * ve)
            assert added.abs().max() > 1e-2
        else:
            assert torch.equal(added, torch.zeros_like(added))


@pytest.mark.parametrize("xsa_last_n", [0, 2, 5])
def test_xsa_only_on_the_last_blocks(monkeypatch, xsa_last_n):
    model = build(dataclasses.replace(TINY, xsa_last_n=xsa_last_n))
    rec = Recorder(monkeypatch)
    ids, targets = batch(T=3)
    with torch.no_grad():
        model(ids, targets)
    assert [c["xsa"] for c in rec.attention] == [i >= 5 - xsa_last_n for i in range(5)]


def test_partial_rope_rotates_only_its_dims():
    torch.manual_seed(3)
    x = torch.randn(2, 13, 3, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(13, 6, 10000.0, 1024, "cpu")
    got = apply_partial_rope(x, cos.double(), sin.double())
    assert torch.equal(got[..., 6:], x[..., 6:])  # untouched dims
    assert torch.equal(got[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(got, direct_rope(x, 6, 10000.0), atol=1e-6, rtol=1e-6)
    # a rotation: each (p, p + 3) pair keeps its length
    pairs = lambda y: y[..., :3] ** 2 + y[..., 3:6] ** 2  # noqa: E731
    torch.testing.assert_close(pairs(got), pairs(x))
    # rope_dims = 0: identity
    cos0, sin0 = rope_cos_sin(13, 0, 10000.0, 1024, "cpu")
    assert torch.equal(apply_partial_rope(x, cos0.double(), sin0.double()), x)


def test_rope_base_rescaled_only_beyond_train_len():
    d, base, train_len = 16, 10000.0, 1024
    inv_freq = lambda b: 1.0 / b ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # noqa: E731
    for T in (1, 1000, 1024):
        cos, _ = rope_cos_sin(T, d, base, train_len, "cpu")
        assert_close(cos[-1], torch.cos((T - 1) * inv_freq(base)).float())
    T = 2048
    cos, sin = rope_cos_sin(T, d, base, train_len, "cpu")
    scaled = base * 2.0 ** (16 / 14)
    assert_close(cos[-1], torch.cos((T - 1) * inv_freq(scaled)).float(), atol=1e-4)
    assert_close(sin[-1], torch.sin((T - 1) * inv_freq(scaled)).float(), atol=1e-4)
    assert not torch.allclose(cos[-1].double(), torch.cos((T - 1) * inv_freq(base)), atol=1e-2)


# --------------------------------------------------------------------------- head and API


def test_softcap_bounds_logits_and_matches_token_losses():
    model = randomise(build())
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)  # raw logits far beyond the cap
    ids, targets = batch()
    with torch.no_grad():
        logits = model.logits(ids)
        losses = model.token_losses(ids, targets)
    assert logits.shape == (2, 11, TINY.vocab_size) and logits.dtype == torch.float32
    cap = TINY.logit_softcap
    assert logits.abs().max() <= cap and logits.abs().max() > 0.9 * cap  # the cap is active
    expected_losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 11)
    assert_close(losses, expected_losses)


def test_logits_are_softcap_tanh_of_raw_tied_logits(monkeypatch):
    model = randomise(build())
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)
    captured = {}
    original = kernels.softcap_cross_entropy

    def capture(x, weight, targets, softcap):
        captured["x"] = x
        return original(x, weight, targets, softcap)

    monkeypatch.setattr(kernels, "softcap_cross_entropy", capture)
    ids, targets = batch()
    with torch.no_grad():
        logits = model.logits(ids)
        model.token_losses(ids, targets)  # the head input: the final normed hidden states
    raw = captured["x"].double() @ model.tok_emb.weight.double().T
    cap = TINY.logit_softcap
    assert_close(logits.flatten(0, 1), (cap * torch.tanh(raw / cap)).float())


def test_token_losses_mean_is_forward_loss_and_shapes():
    model = randomise(build())
    ids, targets = batch(B=3, T=7)
    losses = model.token_losses(ids, targets)
    assert losses.shape == (3, 7) and losses.dtype == torch.float32
    assert_close(model(ids, targets), losses.mean())
    one = model.token_losses(ids[:, :1], targets[:, :1])  # T = 1
    assert one.shape == (3, 1) and torch.isfinite(one).all()


def test_causality_future_tokens_do_not_change_earlier_losses():
    model = randomise(build())
    ids, targets = batch(T=11)
    t0 = 6
    changed = ids.clone()
    changed[:, t0:] = (ids[:, t0:] + 1 + torch.arange(11 - t0)) % TINY.vocab_size
    with torch.no_grad():
        before, after = model.token_losses(ids, targets), model.token_losses(changed, targets)
    assert_close(after[:, :t0], before[:, :t0])
    assert (after[:, t0:] - before[:, t0:]).abs().max() > 1e-3  # the change is visible where it may be


def test_every_parameter_gets_a_gradient():
    model = randomise(build())
    ids, targets = batch()
    model(ids, targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_set_qat_uses_int6_dequantised_weights_with_straight_through_grads():
    model = randomise(build())
    quantised = copy.deepcopy(model)
    with torch.no_grad():
        for m in quantised.modules():
            if isinstance(m, CastedLinear):
                m.weight.copy_(reference.int6_dequantize(*reference.int6_quantize(m.weight)))
    ids, targets = batch()
    plain = model(ids, targets).detach()
    model.set_qat(True)
    assert all(m.qat for m in model.modules() if isinstance(m, CastedLinear))
    loss, expected = model(ids, targets), quantised(ids, targets)
    assert_close(loss, expected)
    assert abs(loss.item() - plain.item()) > 1e-4  # quantisation changes the forward
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), quantised.parameters()):
        assert_close(p.grad, q.grad, msg=name)  # straight through: d/dw = d/d(dequantised w)
    model.set_qat(False)
    assert torch.equal(model(ids, targets).detach(), plain)


def test_bad_inputs_raise_one_clear_error():
    model = build()
    ids, targets = batch()
    with pytest.raises(ValueError, match="ids must be an int32/int64 tensor of shape"):
        model(ids.float(), targets)
    with pytest.raises(ValueError, match="ids must be an int32/int64 tensor of shape"):
        model(ids[0], targets[0])
    with pytest.raises(ValueError, match="targets shape .* differs from ids shape"):
        model(ids, targets[:, :-1])


def test_cpu_autocast_runs_the_stream_in_bf16():
    model = randomise(build())
    rec = Recorder()
    rec.watch("block0", model.blocks[0])
    ids, targets = batch()
    with torch.no_grad():
        exact = model(ids, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, targets)
    rec.close()
    assert rec.calls["block0"]["args"][0].dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact.item()) < 0.05 * exact.item()  # bf16 stream, same model


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    # 3 blocks keep tracing short and still hold every feature: a skip-fed decoder block and a
    # skip-less one, VE, XSA, RoPE beyond rope_train_len (T = 11)
    torch._dynamo.reset()
    model = randomise(build(dataclasses.replace(TINY, num_layers=3, ve_layers="0,2", xsa_last_n=1)))
    model.set_qat(backend == "eager")  # cover the QAT path once without doubling compile time
    ids, targets = batch()
    expected = model(ids, targets)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(ids, targets)
    loss.backward()
    assert_close(loss, expected)
    for name, p in model.named_parameters():
        assert_close(p.grad, expected_grads[name], msg=name)


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels reach CPU tensors only through TRITON_INTERPRET=1")
def test_triton_backend_matches_reference_backend_in_the_interpreter():
    """The whole model on every Triton kernel it uses (head dim 16: the attention kernel's smallest),
    QAT on so that the fake-quant kernel runs too: loss and every gradient as on the references."""
    model = randomise(build(dataclasses.replace(TINY, num_heads=2, num_kv_heads=1)))
    model.set_qat(True)
    ids, targets = batch(T=11)
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            loss = model(ids, targets)
            loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (ref_loss, ref_grads), (loss, got_grads) = grads["reference"], grads["triton"]
    assert_close(loss, ref_loss)
    for name, p in model.named_parameters():  # bf16 tables: their gradients are bf16 too
        assert_close(got_grads[name], ref_grads[name], dtype=p.dtype, msg=name)


@pytest.mark.gpu
def test_cuda_autocast_compiled_triton_model_close_to_fp32_reference():
    cfg = dataclasses.replace(TINY, model_dim=128, num_heads=2, num_kv_heads=1, rope_dims=16, ve_dim=64)
    model = randomise(build(cfg)).cuda()
    ids, targets = (t.cuda() for t in batch(cfg, B=4, T=200))
    with kernels.use_backend("reference"), torch.no_grad():
        exact = model(ids, targets)
    with kernels.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, targets)
        loss.backward()
    assert loss.dtype == torch.float32
    assert_close(loss.detach(), exact, dtype=torch.bfloat16)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
