"""Config resolution: defaults = SPEC, presets, env names as the challenge spells them, CLI
overrides, and one clear line for bad input."""
import dataclasses

import pytest

from model.config import Config, load_config


def test_defaults_are_spec():
    cfg, flags = load_config([], environ={})
    assert flags == []
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (11, 512, 8, 4, 64)
    assert (cfg.mlp_hidden, cfg.rope_dims, cfg.xsa_last_n, cfg.ve_layer_indices) == (1536, 16, 4, (9, 10))
    assert (cfg.bigram_vocab_size, cfg.bigram_dim, cfg.train_batch_tokens, cfg.train_seq_len) == (2048, 128, 786_432, 2048)
    assert (cfg.matrix_lr, cfg.tied_embed_lr, cfg.scalar_lr, cfg.muon_wd, cfg.grad_clip_norm) == (0.025, 0.035, 0.025, 0.04, 0.3)
    assert (cfg.warmdown_iters, cfg.swa_every, cfg.late_qat_threshold, cfg.eval_stride) == (3000, 50, 0.1, 64)
    assert (cfg.ttt_lr, cfg.ttt_momentum, cfg.ttt_epochs, cfg.ttt_chunk_tokens) == (0.002, 0.9, 3, 32_768)
    assert cfg.grad_accum_steps(8) == 1 and cfg.grad_accum_steps(1) == 8


def test_priority_preset_then_env_then_cli():
    cfg, _ = load_config(["--preset", "smoke"], environ={})
    assert cfg.num_layers == 4
    cfg, _ = load_config(["--preset", "smoke"], environ={"NUM_LAYERS": "6"})
    assert cfg.num_layers == 6
    cfg, flags = load_config(["--preset=smoke", "--num-layers", "5", "--dry-run", "--ttt_enabled=0"], environ={"NUM_LAYERS": "6"})
    assert (cfg.num_layers, cfg.ttt_enabled, flags) == (5, False, ["--dry-run"])


def test_every_field_has_an_env_name():
    defaults = Config()
    environ = {}
    for f in dataclasses.fields(Config):
        value = getattr(defaults, f.name)
        environ[f.name.upper()] = str(int(value) if isinstance(value, bool) else value)
    cfg, _ = load_config([], environ=environ)
    assert cfg == defaults


@pytest.mark.parametrize("argv, environ, message", [
    (["--num_layer", "3"], {}, "unknown setting --num_layer"),
    (["--num_layers"], {}, "needs a value"),
    (["--preset", "huge"], {}, "unknown preset 'huge'"),
    ([], {"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven'"),
    ([], {"TTT_ENABLED": "maybe"}, "not a boolean"),
    ([], {"NUM_KV_HEADS": "3"}, "not a multiple of NUM_KV_HEADS=3"),
    ([], {"VE_LAYERS": "9,11"}, "outside [0, 11)"),
    ([], {"XSA_LAST_N": "12"}, "XSA_LAST_N=12"),
    ([], {"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS=1000"),
])
def test_bad_settings_get_one_line(argv, environ, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(argv, environ=environ)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_world_size_must_divide_accumulation():
    with pytest.raises(ValueError, match="WORLD_SIZE=3 does not divide"):
        Config().grad_accum_steps(3)
