"""train.py end to end on the CPU: the smoke pipeline, dry run, checkpoint + resume, and one clear
line for each kind of bad input. Each run is a subprocess in its own folder, as a user runs it,
with the GPU hidden (CUDA_VISIBLE_DEVICES="") on machines that have one."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import kernels

from model.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
# A smaller smoke model, so the suite stays quick; the preset itself is exercised by the README's command.
TINY = ["--preset", "smoke", "--model_dim", "64", "--num_heads", "4", "--num_kv_heads", "2", "--rope_dims", "8",
        "--max_val_tokens", "2048", "--val_batch_size", "2048", "--ttt_chunk_tokens", "1024"]


def cpu_environ(**extra) -> dict:
    """The environment of a train.py subprocess: no torchrun variables, the reference kernels, and no
    GPU (these tests are of the CPU pipeline; on a GPU machine train.py would take the GPU)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update({"KERNELS": "reference", "CUDA_VISIBLE_DEVICES": "", **extra})
    return environ


def train(folder, *args, env=None, check=True):
    environ = cpu_environ(**(env or {}))
    result = subprocess.run([sys.executable, TRAIN, *args], cwd=folder, env=environ, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def finals(run_folder):
    with open(os.path.join(run_folder, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["kind"] == "final"][-1]


@pytest.mark.parametrize("data", ["sample", "generated"])
def test_smoke_pipeline_end_to_end(tmp_path, data, request):
    extra = []
    if data == "sample":
        request.getfixturevalue("shared_data")  # skips with a reason when ../shared/data is absent
    else:
        extra = ["--data_path", "", "--vocab_size", "512"]  # the trainer builds its own corpus and tokenizer
    result = train(tmp_path, *TINY, *extra, "--iterations", "12", "--warmdown_iters", "6", "--swa_every", "2",
                   "--val_loss_every", "5", "--run_id", "smoke")
    run = tmp_path / "runs" / "smoke"
    log = (run / "train.log").read_text()
    for line in ("warmup:", "late QAT on", "swa: averaged", "artifact_bytes:", "final_roundtrip val_loss:",
                 "final_sliding val_loss:", "final_ttt val_loss:", "record:",
                 "step:5 val_loss:", "step:10 val_loss:", "step:12 val_loss:"):  # every 5 steps, and at the end
        assert line in log, f"{line!r} missing from the smoke log:\n{log}"
    final = finals(run)
    for key in ("val_bpb", "sliding_val_bpb", "ttt_val_bpb"):
        assert 0.5 < final[key] < 10, (key, final[key])
    assert final["artifact_bytes"] == os.path.getsize(run / "final_model.int6.ptz")
    assert final["total_bytes"] == final["artifact_bytes"] + final["code_bytes"]
    config = json.loads((run / "config.json").read_text())
    assert config["iterations"] == 12 and config["model_dim"] == 64
    submission = json.loads((run / "record" / "submission.json").read_text())
    assert submission["val_bpb"] == final["ttt_val_bpb"] and submission["bytes_total"] == final["total_bytes"]
    train_losses = [m["train_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]
    assert train_losses[-1] < train_losses[0] - 0.5, f"the smoke model did not learn: {train_losses}"
    assert result.stderr.count("\n") < 50  # no tracebacks
    # The final training state is saved before export, so a run killed there is not lost ...
    assert _state(run)["step"] == 12
    # ... and an artifact scores again on its own, to the same numbers, with a new record.
    data_args = [] if data == "sample" else ["--data_path", str(run / "data"), "--tokenizer_path", str(run / "data" / "tokenizer.model")]
    train(tmp_path, *TINY, *extra, *data_args, "--eval-only", str(run / "final_model.int6.ptz"), "--ttt_enabled", "0")
    again = finals(run)
    assert (again["val_bpb"], again["sliding_val_bpb"], again["steps"]) == (final["val_bpb"], final["sliding_val_bpb"], 12)
    assert json.loads((run / "record" / "submission.json").read_text())["val_bpb"] == again["sliding_val_bpb"]
    assert "eval-only: scoring" in (run / "train.log").read_text()


def test_dry_run_prints_config_and_param_count(tmp_path):
    result = train(tmp_path, "--dry-run")
    assert "model_params:26993756" in result.stdout
    assert '"num_layers": 11' in result.stdout
    assert not os.path.exists(tmp_path / "runs")  # touched no data, wrote nothing


def _state(run_folder):
    state = load_checkpoint(os.path.join(run_folder, "checkpoint.pt"))
    return state


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    args = [*TINY, "--iterations", "14", "--warmdown_iters", "8", "--swa_every", "2", "--val_loss_every", "0",
            "--ttt_enabled", "0", "--train_log_every", "1"]
    straight = tmp_path / "straight"
    straight.mkdir()
    train(straight, *args, "--checkpoint_every", "14", "--run_id", "a")

    # The same run, interrupted by SIGTERM after step 5 and resumed from its checkpoint.
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, TRAIN, *args, "--checkpoint_every", "14", "--run_id", "b"], cwd=killed,
                            env=cpu_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step:5/"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "continue with RESUME=" in err
    interrupted_at = _state(killed / "runs" / "b")["step"]
    assert 5 <= interrupted_at < 14
    train(killed, *args, "--checkpoint_every", "14", "--resume", str(killed / "runs" / "b" / "checkpoint.pt"))

    a, b = _state(straight / "runs" / "a"), _state(killed / "runs" / "b")
    assert a["step"] == b["step"] == 14
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name, value in a["swa"]["sums"].items():
        assert torch.equal(value, b["swa"]["sums"][name]), name
    assert a["swa"]["count"] == b["swa"]["count"] and a["qat"] == b["qat"] and a["loader"] == b["loader"]
    assert finals(straight / "runs" / "a")["val_bpb"] == finals(killed / "runs" / "b")["val_bpb"]

    # Resuming the final state (as after a kill during export) trains nothing more, exports and scores again.
    log_lines = len((killed / "runs" / "b" / "train.log").read_text().splitlines())
    train(killed, *args, "--checkpoint_every", "14", "--resume", str(killed / "runs" / "b" / "checkpoint.pt"))
    new_lines = (killed / "runs" / "b" / "train.log").read_text().splitlines()[log_lines:]
    assert not [line for line in new_lines if line.startswith("step:")], new_lines
    assert finals(killed / "runs" / "b")["val_bpb"] == finals(straight / "runs" / "a")["val_bpb"]
    assert finals(killed / "runs" / "b")["steps"] == 14


def test_rng_states_restore_from_a_checkpoint_loaded_onto_the_device(tmp_path, device):
    # train.py loads checkpoints with map_location=<its device>; on a GPU that carries the saved
    # RNG states there too, and torch's setters take only CPU byte tensors.
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"rng": rng_states()}, path)
    expected = torch.rand(5), (torch.rand(5, device=device) if device == "cuda" else None)
    restore_rng_states(load_checkpoint(path, map_location=device)["rng"])
    again = torch.rand(5), (torch.rand(5, device=device) if device == "cuda" else None)
    assert torch.equal(again[0], expected[0])
    assert device != "cuda" or torch.equal(again[1], expected[1])


def test_torn_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 3, "w": torch.arange(1000.0)}, path)
    assert load_checkpoint(path)["step"] == 3
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(ValueError, match="torn or corrupt"):
        load_checkpoint(path)
    open(path, "wb").write(b"not a checkpoint at all, just text")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp files left behind


@pytest.mark.parametrize("args, env, message", [
    (["--data_path", "/nonexistent/shards"], {}, "fineweb_train_*.bin"),
    (["--num_layerz", "3"], {}, "unknown setting --num_layerz"),
    ([], {"WORLD_SIZE": "3"}, "WORLD_SIZE=3 does not divide"),
    (["--resume", "/nonexistent/checkpoint.pt"], {}, "does not exist"),
    (["--tied_embed_lr", "1e30", "--scalar_lr", "1e30", "--iterations", "8"], {}, "became non-finite at step"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, env, message):
    result = train(tmp_path, *TINY, "--iterations", "3", *args, env=env, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_tokenizer_vocab_mismatch(tmp_path, shared_data):
    result = train(tmp_path, *TINY, "--vocab_size", "512", check=False)
    assert result.returncode == 1 and "VOCAB_SIZE=512" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # two processes under torchrun with gloo: about 30 s on two cores
def test_two_ranks_follow_the_one_rank_run(tmp_path):
    """No DDP (GradientSync's reduce-scatter, sharded Muon) + the rank-sliced loader: 2 ranks x 2
    micro-batches see the same tokens per step as 1 rank x 4, so the losses agree up to summation
    order and bf16 communication."""
    args = [*TINY, "--iterations", "6", "--warmdown_iters", "3", "--swa_every", "2", "--val_loss_every", "0",
            "--ttt_enabled", "0", "--train_log_every", "1"]
    train(tmp_path, *args, "--run_id", "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                             *args, "--run_id", "two"], cwd=tmp_path, env=cpu_environ(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "runs" / "two" / "train.log").read_text()
    assert "world_size 2" in log and "grad_comm: reduce-scatter " in log

    def losses(run):
        lines = (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()
        return [m["train_loss"] for m in map(json.loads, lines) if m["kind"] == "train"]

    assert len(losses("one")) == len(losses("two")) == 6
    torch.testing.assert_close(losses("two"), losses("one"), rtol=1e-3, atol=0)
    assert finals(tmp_path / "runs" / "two")["val_bpb"] == pytest.approx(finals(tmp_path / "runs" / "one")["val_bpb"], rel=1e-3)


# ------------------------------------------------------------------ no run lost to a setting
def test_help_lists_every_setting_and_exits_zero(tmp_path):
    for flag in ("--help", "-h"):
        result = train(tmp_path, flag)
        assert "--num_layers" in result.stdout and "env NUM_LAYERS; default 11" in " ".join(result.stdout.split())
        assert "--eval_only" in result.stdout and not result.stderr
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("env, message", [
    ({"ITERATIONS": "0"}, "ITERATIONS=0 is out of range; it must lie in [1, inf)"),
    ({"GRAD_ACCUM_TOTAL": "0"}, "GRAD_ACCUM_TOTAL=0 is out of range"),
    ({"SWA_EVERY": "0"}, "SWA_EVERY=0 is out of range"),
    ({"ZSTD_LEVEL": "23"}, "ZSTD_LEVEL=23 is out of range; it must lie in [1, 22]"),
    ({"MATRIX_LR": "inf"}, "MATRIX_LR=inf is not a finite number"),
])
def test_dry_run_refuses_a_bad_setting_before_anything_runs(tmp_path, env, message):
    result = train(tmp_path, "--dry-run", env=env, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "runs")


def test_a_misspelt_setting_in_the_environment_is_warned_about(tmp_path):
    result = train(tmp_path, "--dry-run", env={"ITERATONS": "5"})
    assert "train.py: warning: environment variable ITERATONS is not a setting (ignored); did you mean ITERATIONS?" in result.stderr
    assert '"iterations": 20000' in result.stdout


def test_an_existing_run_folder_is_refused_and_left_untouched(tmp_path):
    folder = tmp_path / "runs" / "taken"
    folder.mkdir(parents=True)
    (folder / "train.log").write_text("the first run's log\n")
    result = train(tmp_path, *TINY, "--run_id", "taken", check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "OVERWRITE=1" in lines[0] and "Traceback" not in result.stderr
    assert os.listdir(folder) == ["train.log"] and (folder / "train.log").read_text() == "the first run's log\n"


def test_claim_run_folder_overwrites_only_when_asked_and_never_a_resumed_folder(tmp_path, monkeypatch):
    import train as train_module
    from model.config import Config
    from model.distributed import Dist

    monkeypatch.chdir(tmp_path)
    folder = os.path.join("runs", "x")
    os.makedirs(folder)
    open(os.path.join(folder, "train.log"), "w").close()
    with pytest.raises(train_module.TrainingError, match="holds an earlier run"):
        train_module.claim_run_folder(Config(run_id="x"), folder, Dist.single())
    train_module.claim_run_folder(Config(resume=os.path.join(folder, "checkpoint.pt")), folder, Dist.single())
    assert os.listdir(folder) == ["train.log"]  # resuming into it
    train_module.claim_run_folder(Config(run_id="x", overwrite=True), folder, Dist.single())
    assert not os.path.exists(folder)


def _checkpoint_with(tmp_path, **config_changes):
    import dataclasses as dc

    from model.config import Config
    from model.checkpoint import TRAINING_STATE_KEYS

    state = {key: None for key in TRAINING_STATE_KEYS}
    state["config"] = dc.asdict(dc.replace(Config(), **config_changes))
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(state, path)
    return path


def test_resume_with_another_function_defining_setting_is_refused_before_warm_up(tmp_path):
    from model.config import load_config

    cfg, _ = load_config(TINY, environ={})
    import dataclasses as dc

    path = _checkpoint_with(tmp_path, **{f.name: getattr(cfg, f.name) for f in dc.fields(cfg) if f.name != "logit_softcap"},
                            logit_softcap=20.0)
    result = train(tmp_path, *TINY, "--resume", path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "LOGIT_SOFTCAP=20.0 vs 30.0" in lines[0], result.stderr
    assert "warmup:" not in result.stdout and "Traceback" not in result.stderr


def test_a_checkpoint_without_the_training_state_is_one_line(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    result = train(tmp_path, *TINY, "--resume", path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "lacks config" in lines[0] and "Traceback" not in result.stderr


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import train as train_module
    from model.atomic import WriteFailed, describe_os_error
    from model.runlog import RunLog

    def full(self, name, text):
        raise WriteFailed(describe_os_error(self.path(name), OSError(28, "No space left on device")))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(RunLog, "write_text", full)
    assert train_module.main([*TINY, "--run_id", "full"]) == 1  # fails before any model runs
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert lines == [f"train.py: could not write {os.path.join('runs', 'full', 'config.json')}: No space left on device; "
                     f"free disk space or fix the folder's permissions, then run again"]


def test_a_missing_lrzip_is_said_before_training(tmp_path, monkeypatch, capsys):
    import train as train_module
    from model import compressors

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compressors, "lrzip_available", lambda: False)
    assert train_module.main([*TINY, "--compressor", "pergroup", "--pergroup_coder", "lrzip", "--run_id", "lz"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert lines == ["train.py: PERGROUP_CODER=lrzip: the lrzip program is not on PATH (apt-get install lrzip); "
                     "install it or use PERGROUP_CODER=brotli"]
    assert not os.path.exists(os.path.join("runs", "lz"))  # refused before the run folder exists


def test_a_signal_in_export_or_evaluation_says_how_to_finish_the_run():
    import train as train_module

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train_module.Interrupted, match="interrupted by SIGTERM; score it with --eval-only a.ptz"):
        with train_module.interrupts_explained("score it with --eval-only a.ptz"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("where, advice", [("export", "RESUME="), ("evaluation", "score it with --eval-only")])
def test_a_run_killed_in_export_or_evaluation_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys, where, advice):
    import train as train_module
    from model import evaluate, export

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as torchrun or a scheduler would, mid-way
        raise AssertionError("the signal should have interrupted the run")

    monkeypatch.setattr(export if where == "export" else evaluate, "write_artifact" if where == "export" else "evaluate_sliding", killed)
    def unprotected(signum, frame):
        raise AssertionError(f"{where} ran without train.py's signal handler")

    monkeypatch.chdir(tmp_path)
    previous = signal.signal(signal.SIGTERM, unprotected)  # so a missing handler fails here, not kills pytest
    try:
        with kernels.use_backend("reference"):  # the backend was chosen when kernels was imported; KERNELS is read then
            code = train_module.main([*TINY, "--iterations", "2", "--warmup_steps", "0", "--ttt_enabled", "0", "--run_id", "k"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert code == 130 and len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and advice in lines[0], lines
    assert _state(tmp_path / "runs" / "k")["step"] == 2  # the final training state was saved before export
    assert (where == "export") != os.path.isfile(tmp_path / "runs" / "k" / "final_model.int6.ptz")


def test_a_failed_start_leaves_no_run_folder_behind(tmp_path):
    for _ in range(2):  # the retry meets the same one line, not "holds an earlier run"
        result = train(tmp_path, *TINY, "--data_path", str(tmp_path / "missing"), "--run_id", "retry", check=False)
        lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
        assert result.returncode == 1 and len(lines) == 1 and "fineweb_train_*.bin" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "runs" / "retry")


def test_a_checkpoint_of_other_weights_is_refused_before_warm_up(tmp_path):
    import dataclasses as dc

    from model.config import load_config

    cfg, _ = load_config(TINY, environ={})
    path = _checkpoint_with(tmp_path, **{f.name: getattr(cfg, f.name) for f in dc.fields(cfg)})
    state = load_checkpoint(path)
    state.update(model={"w": torch.zeros(3)}, optimizers=[])
    save_checkpoint(state, path)
    result = train(tmp_path, *TINY, "--resume", path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "other model weights" in lines[0], result.stderr
    assert "warmup:" not in result.stdout and "Traceback" not in result.stderr


def test_a_head_dim_the_triton_kernel_cannot_take_is_refused_up_front(tmp_path):
    result = train(tmp_path, "--dry-run", "--model_dim", "96", "--num_heads", "4", "--num_kv_heads", "2", env={"KERNELS": "triton"},
                   check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 2 and len(lines) == 1 and "head dim 24" in lines[0] and "KERNELS=reference" in lines[0]


def _shards(folder, train_tokens, val_tokens):
    from model.data import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    write_shard(str(folder / "fineweb_train_000000.bin"), train_tokens)
    write_shard(str(folder / "fineweb_train_000001.bin"), train_tokens)
    write_shard(str(folder / "fineweb_val_000000.bin"), val_tokens)
    return folder


def test_a_truncated_train_shard_stops_the_run_at_start_up(tmp_path):
    data = _shards(tmp_path / "data", list(range(1000)) * 5, list(range(1000)) * 5)
    path = data / "fineweb_train_000001.bin"
    path.write_bytes(path.read_bytes()[:-10])
    result = train(tmp_path, *TINY, "--data_path", str(data), check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "fineweb_train_000001.bin" in lines[0], result.stderr
    assert "warmup:" not in result.stdout and "Traceback" not in result.stderr


def test_a_token_id_beyond_the_vocabulary_is_one_line_before_training(tmp_path, shared_data):
    tokenizer = os.path.join(shared_data, "tokenizers", "fineweb_1024_bpe.model")
    val = list(range(1000)) * 5
    val[4321] = 1500
    data = _shards(tmp_path / "data", list(range(1000)) * 5, val)
    result = train(tmp_path, *TINY, "--data_path", str(data), "--tokenizer_path", tokenizer, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "fineweb_val_000000.bin" in lines[0] and "1500 at position 4,321" in lines[0] and "VOCAB_SIZE=1024" in lines[0]
    assert "warmup:" not in result.stdout and "Traceback" not in result.stderr


def test_a_tokenizer_that_is_not_a_sentencepiece_model_is_one_line(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    data = _shards(tmp_path / "data", list(range(1000)) * 5, list(range(1000)) * 5)
    result = train(tmp_path, *TINY, "--data_path", str(data), "--tokenizer_path", str(junk), check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert result.returncode == 1 and len(lines) == 1 and "is not a SentencePiece model" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
