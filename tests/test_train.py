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

from model.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
# A smaller smoke model, so the suite stays quick; the preset itself is exercised by the README's command.
TINY = ["--preset", "smoke", "--model_dim", "64", "--num_heads", "4", "--num_kv_heads", "2", "--rope_dims", "8",
        "--max_val_tokens", "2048", "--val_batch_size", "2048", "--ttt_chunk_tokens", "1024"]


def cpu_environ(**extra) -> dict:
    """The environment of a train.py subprocess: no torchrun variables, the reference kernels, and no
    GPU (these tests are of the CPU pipeline; on a GPU machine train.py would take the GPU)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(KERNELS="reference", CUDA_VISIBLE_DEVICES="", **extra)
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
                   "--val_loss_every", "6", "--run_id", "smoke")
    run = tmp_path / "runs" / "smoke"
    log = (run / "train.log").read_text()
    for line in ("warmup:", "late QAT on", "swa: averaged", "artifact_bytes:", "final_roundtrip val_loss:",
                 "final_sliding val_loss:", "final_ttt val_loss:", "record:"):
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
    """DDP + distributed Muon + the rank-sliced loader: 2 ranks x 2 micro-batches see the same tokens
    per step as 1 rank x 4, so the losses agree up to summation order."""
    args = [*TINY, "--iterations", "6", "--warmdown_iters", "3", "--swa_every", "2", "--val_loss_every", "0",
            "--ttt_enabled", "0", "--train_log_every", "1"]
    train(tmp_path, *args, "--run_id", "one")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
                             *args, "--run_id", "two"], cwd=tmp_path, env=cpu_environ(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size 2" in (tmp_path / "runs" / "two" / "train.log").read_text()

    def losses(run):
        lines = (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()
        return [m["train_loss"] for m in map(json.loads, lines) if m["kind"] == "train"]

    assert len(losses("one")) == len(losses("two")) == 6
    torch.testing.assert_close(losses("two"), losses("one"), rtol=1e-3, atol=0)
    assert finals(tmp_path / "runs" / "two")["val_bpb"] == pytest.approx(finals(tmp_path / "runs" / "one")["val_bpb"], rel=1e-3)
