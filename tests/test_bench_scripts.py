"""Each kernel benchmark script end to end at tiny shapes (--smoke), so that a GPU visit is not spent
on a Python error. On the CPU the kernels run in Triton's interpreter and the compiled baselines
are traced by aot_eager; the figures mean nothing and are not asserted, only that every script
runs and prints its whole table. The shapes each script derives from the config and the model are
checked against SPEC's numbers written out here, and against the smoke preset with a setting."""
import importlib

import pytest
import torch

from bench import bigram, fakequant, newton_schulz, relu2_mlp, softcap_ce, xsa_attention
from bench.common import Bench, bench_config, build_model

KERNEL_BENCHES = ["fakequant", "bigram", "softcap_ce", "relu2_mlp", "xsa_attention", "newton_schulz", "export"]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row printed, header and separator lines left out."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows if not any(c.strip() in ("variant", "kernel") for c in r)]


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_smoke_run_prints_every_row(name, capsys):
    torch._dynamo.reset()
    importlib.import_module(f"bench.{name}").main(["--smoke"])
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out
    rows = table_rows(out)
    assert len(rows) >= 4, out
    for row in rows:
        assert all(cell and cell not in ("nan", "inf") for cell in row), f"{name}: empty or non-finite cell in {row}"


def test_bench_refuses_a_real_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a machine with a GPU"):
        Bench("bench.xsa_attention", [])


def test_smoke_run_without_a_gpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        Bench("bench.xsa_attention", ["--smoke"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = Bench("bench.xsa_attention", ["--smoke"])
    assert (bench.device, bench.smoke, bench.cfg.model_dim, bench.cfg.train_seq_len) == ("cpu", True, 48, 70)  # tiny


def shapes_of(argv) -> dict:
    """Every script's shapes at the config `argv` resolves to."""
    cfg, _ = bench_config("bench.test", argv)
    model = build_model(cfg)
    return {
        "xsa_attention": xsa_attention.shape(cfg),
        "softcap_ce": softcap_ce.shape(cfg),
        "relu2_mlp": relu2_mlp.shape(cfg),
        "bigram": bigram.shape(cfg, model),
        "newton_schulz": newton_schulz.shape_counts(newton_schulz.matrix_shapes(model)),
        "fakequant": sorted(fakequant.model_weights(model)),
        "softcap": cfg.logit_softcap,
        "muon": (cfg.muon_backend_steps, cfg.matrix_lr, cfg.muon_momentum, cfg.muon_wd),
    }


def test_default_shapes_are_specs(monkeypatch):
    for name in ("PRESET", "NUM_LAYERS", "MODEL_DIM", "VOCAB_SIZE", "TRAIN_BATCH_TOKENS", "GRAD_ACCUM_TOTAL"):
        monkeypatch.delenv(name, raising=False)
    got = shapes_of([])
    # SPEC: 11 layers, d = 512, 8 heads / 4 KV of 64, MLP 1536, vocab 1024, bigram 2048 x 128,
    # micro-batch 786,432 / 8 = 48 sequences of 2048.
    assert got["xsa_attention"] == dict(B=48, T=2048, H=8, Hkv=4, D=64)
    assert got["softcap_ce"] == dict(N=48 * 2048, V=1024, D=512) and got["softcap"] == 30.0
    assert got["relu2_mlp"] == dict(N=48 * 2048, D=512, HIDDEN=1536)
    assert got["bigram"] == dict(B=48, T=2048, BUCKETS=2048, D=128, VOCAB=1024)
    assert got["newton_schulz"] == {(512, 512): 22, (256, 512): 22, (1536, 512): 11, (512, 1536): 11,
                                    (512, 128): 1, (256, 128): 1}  # q + out, k + v, fc, proj; bigram and VE projections
    assert got["muon"] == (5, 0.025, 0.99, 0.04)
    assert got["fakequant"] == sorted([
        ("attn.c_q", 512, 512, 11), ("attn.c_k", 256, 512, 11), ("attn.c_v", 256, 512, 11), ("attn.proj", 512, 512, 11),
        ("mlp.fc", 1536, 512, 11), ("mlp.proj", 512, 1536, 11), ("bigram.proj", 512, 128, 1), ("ve.proj", 256, 128, 1),
    ])


def test_shapes_follow_a_preset_and_a_setting(monkeypatch):
    monkeypatch.delenv("PRESET", raising=False)
    got = shapes_of(["--preset", "smoke", "--vocab_size", "512"])
    # the smoke preset: 4 layers, d = 192, 6 heads / 3 KV of 32, micro-batch 4 x 128, bigram 257 x 32, VE 32
    assert got["xsa_attention"] == dict(B=4, T=128, H=6, Hkv=3, D=32)
    assert got["softcap_ce"] == dict(N=512, V=512, D=192)
    assert got["relu2_mlp"] == dict(N=512, D=192, HIDDEN=576)
    assert got["bigram"] == dict(B=4, T=128, BUCKETS=257, D=32, VOCAB=512)
    assert got["newton_schulz"] == {(192, 192): 8, (96, 192): 8, (576, 192): 4, (192, 576): 4, (192, 32): 1, (96, 32): 1}
    assert ("mlp.fc", 576, 192, 4) in got["fakequant"] and sum(c for *_, c in got["fakequant"]) == 26


@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_every_script_takes_a_preset_and_settings(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main = importlib.import_module(f"bench.{name}").main
    if name != "export":  # bench.export measures compressors, which run on the CPU (its smoke run is above)
        with pytest.raises(SystemExit, match="run it on a machine with a GPU"):  # parsed, then refused: no GPU here
            main(["--preset", "smoke", "--vocab_size", "512"])
    with pytest.raises(SystemExit, match="unknown preset 'nope'"):
        main(["--preset", "nope"])
    with pytest.raises(SystemExit, match="unknown setting --vocab_sise; did you mean --vocab_size"):
        main(["--vocab_sise", "512"])


def test_smoke_keeps_its_tiny_shapes_under_a_preset_and_takes_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = Bench("bench.softcap_ce", ["--smoke", "--preset", "smoke", "--vocab_size", "300"]).cfg
    assert (cfg.model_dim, cfg.train_seq_len, cfg.vocab_size) == (48, 70, 300)  # the setting given wins
    assert cfg.iterations == 150  # the preset's own value where --smoke sets nothing


def test_a_model_without_bigram_is_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_bigram(cfg):
        model = build_model(cfg)
        del model.bigram  # as a preset without BigramHash would build it
        return model

    monkeypatch.setattr("bench.common.build_model", no_bigram)
    assert bigram.main(["--smoke"]) is None  # returns: exit status 0
    said = capsys.readouterr().out.strip().splitlines()
    assert said == ["bench.bigram: this configuration's model has no BigramHash; nothing to benchmark"]
