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
    (["--eval-only", "a.ptz", "--resume", "c.pt"], {}, "are both set"),
    ([], {"RUN_ID": ".."}, "must be a plain folder name"),
    ([], {"RUN_ID": "a/b"}, "must be a plain folder name"),
    ([], {"RUN_ID": "/"}, "must be a plain folder name"),
    ([], {"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE=1 is out of range; it must lie in [2, inf)"),
    ([], {"PERGROUP_CODER": "xz"}, "PERGROUP_CODER='xz' is not one of brotli, zstd, lrzip"),
])
def test_bad_settings_get_one_line(argv, environ, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(argv, environ=environ)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_world_size_must_divide_accumulation():
    with pytest.raises(ValueError, match="WORLD_SIZE=3 does not divide"):
        Config().grad_accum_steps(3)


def test_help_lists_every_setting_with_its_env_name_default_and_meaning():
    from model.config import help_text

    text = " ".join(help_text().split())  # argparse wraps lines
    for f in dataclasses.fields(Config):
        assert f"--{f.name} " in text and f"[env {f.name.upper()}; default {f.default!r}" in text, f.name
        assert "".join(f.metadata["help"].split()) in "".join(text.split()), f.name  # argparse wraps, even at hyphens


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_a_flag_not_a_setting(flag):
    cfg, flags = load_config([flag], environ={})
    assert flags == ["--help"] and cfg == Config()
    assert load_config([flag], environ={"ITERATIONS": "0"})[1] == ["--help"]  # help even beside a bad setting


@pytest.mark.parametrize("name, value, valid", [
    ("ITERATIONS", "0", "[1, inf)"), ("ITERATIONS", "-3", "[1, inf)"), ("GRAD_ACCUM_TOTAL", "0", "[1, inf)"),
    ("TRAIN_SEQ_LEN", "0", "[1, inf)"), ("SWA_EVERY", "0", "[1, inf)"), ("ZSTD_LEVEL", "0", "[1, 22]"),
    ("ZSTD_LEVEL", "23", "[1, 22]"), ("EVAL_BATCH_SEQS", "0", "[1, inf)"), ("MATRIX_LR", "nan", "[0, inf)"),
    ("TIED_EMBED_LR", "inf", "[0, inf)"), ("SCALAR_LR", "-0.1", "[0, inf)"), ("MUON_MOMENTUM", "1.0", "[0, 1)"),
    ("ADAM_EPS", "0", "(0, inf)"), ("VOCAB_SIZE", "70000", "[2, 65536]"), ("TTT_FREEZE_BLOCKS", "12", "[0, NUM_LAYERS=11]"),
    ("EVAL_STRIDE", "0", "[1, inf)"), ("LOGIT_SOFTCAP", "0", "(0, inf)"),
])
def test_every_range_is_checked_up_front_naming_the_variable_and_its_range(name, value, valid):
    with pytest.raises(ValueError) as err:
        load_config([], environ={name: value})
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}=") and valid in message, message


def test_several_bad_settings_get_one_line_each_and_no_division_by_zero():
    with pytest.raises(ValueError) as err:
        load_config([], environ={"GRAD_ACCUM_TOTAL": "0", "TRAIN_SEQ_LEN": "0", "ITERATIONS": "0"})
    lines = str(err.value).splitlines()
    assert sorted(line.split("=")[0] for line in lines) == ["GRAD_ACCUM_TOTAL", "ITERATIONS", "TRAIN_SEQ_LEN"]


def test_a_misspelt_setting_in_the_environment_gets_a_warning_with_the_closest_name():
    from model.config import setting_warnings

    warnings = setting_warnings({"ITERATONS": "5", "WORLD_SIZE": "2", "PATH": "/bin", "HOME": "/root", "KERNELS": "triton"})
    assert warnings == ["environment variable ITERATONS is not a setting (ignored); did you mean ITERATIONS?"]


def test_an_unknown_option_suggests_the_closest_setting():
    with pytest.raises(ValueError, match=r"unknown setting --iteratons; did you mean --iterations\?"):
        load_config(["--iteratons", "5"], environ={})


def test_dashed_names_and_the_equals_form_name_the_same_fields():
    cfg, _ = load_config(["--eval-only", "a.ptz", "--run-id=x-y", "--max-val-tokens", "64"], environ={})
    assert (cfg.eval_only, cfg.run_id, cfg.max_val_tokens) == ("a.ptz", "x-y", 64)


def test_the_function_defining_fields_are_marked_on_the_config():
    from model.config import model_fields

    # The hand list these marks replace missed ln_scale, rope_base, rope_train_len and logit_softcap.
    assert {"ln_scale", "rope_base", "rope_train_len", "logit_softcap", "num_layers", "vocab_size", "ve_layers"} <= set(model_fields())
    assert not {"seed", "matrix_lr", "iterations", "qk_gain_init", "ttt_lr"} & set(model_fields())
    saved = dataclasses.asdict(Config())
    assert Config().model_differences(saved) == []
    assert Config(logit_softcap=20.0).model_differences(saved) == ["LOGIT_SOFTCAP=30.0 vs 20.0"]
