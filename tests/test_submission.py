"""The record folder and the seed summary, from run folders written the way train.py writes them;
the run log's whole-line appends, the reader that skips a torn line, and write failures that leave
nothing half-written and give one line naming the file."""
import errno
import json
import math
import os
import subprocess
import sys
import types

import pytest

from model import submission
from model.atomic import WriteFailed
from model.runlog import RunLog


def fake_run(folder, seed, ttt_bpb, with_ttt=True):
    log = RunLog(str(folder), is_main=True)
    log.write_text("config.json", json.dumps({"num_layers": 11, "xsa_last_n": 4, "seed": seed}))
    log.log("step:1 ...")
    (folder / "final_model.int6.ptz").write_bytes(b"x" * 1000)
    for step, loss in ((1, 6.9), (2, 5.0), (3, 4.0)):
        log.metric(kind="train", step=step, train_loss=loss, lr_scale=1.0, train_time_ms=100.0 * step)
    log.metric(kind="val", step=3, val_loss=4.1, val_bpb=2.4, train_time_ms=300.0)
    final = dict(val_loss=2.0, val_bpb=1.2, sliding_val_loss=1.95, sliding_val_bpb=1.15, steps=3, train_time_ms=300.0,
                 artifact_bytes=1000, code_bytes=200, total_bytes=1200, seed=seed)
    if with_ttt:
        final.update(ttt_val_loss=1.9, ttt_val_bpb=ttt_bpb)
    log.metric(kind="final", **final)
    return str(folder)


def test_record_folder_holds_what_the_challenge_asks(tmp_path):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    code = [os.path.abspath(submission.__file__)]
    out = submission.write_record(run, code)
    names = set(os.listdir(out))
    assert {"README.md", "submission.json", "train.log", "final_model.int6.ptz", "metrics.jsonl", "config.json"} <= names
    data = json.loads(open(os.path.join(out, "submission.json")).read())
    assert data["val_bpb"] == 1.13 and data["score"] == "legal score-first TTT"
    assert (data["bytes_total"], data["bytes_artifact"], data["bytes_code"], data["seeds"]) == (1200, 1000, 200, [1337])
    readme = open(os.path.join(out, "README.md")).read()
    assert "1.1300" in readme and "submission.py" in readme
    assert not os.path.exists(out + ".tmp")


def test_headline_falls_back_to_sliding_without_ttt(tmp_path):
    run = fake_run(tmp_path / "run", 1, 0.0, with_ttt=False)
    assert submission.headline(submission.final_result(run)) == (1.15, 1.95, "sliding window")


def test_summary_across_seeds(tmp_path, capsys):
    runs = [fake_run(tmp_path / f"s{seed}", seed, bpb) for seed, bpb in ((1337, 1.13), (42, 1.14), (2025, 1.12))]
    summary = submission.summarize(runs)
    assert summary["seeds"] == [1337, 42, 2025]
    assert summary["mean"] == pytest.approx(1.13) and summary["std"] == pytest.approx(0.01)
    assert submission.main(["summarize", *runs]) == 0
    assert "mean val_bpb 1.1300 std 0.0100 over 3 runs" in capsys.readouterr().out
    assert math.isnan(submission.summarize(runs[:1])["std"])


def test_unfinished_or_missing_runs_get_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert submission.main(["summarize", str(tmp_path / "empty")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    RunLog(str(unfinished), True).metric(kind="train", step=1, train_loss=5.0)
    with pytest.raises(ValueError, match="did not finish"):
        submission.final_result(str(unfinished))


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 20


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- metrics.jsonl: whole lines in, a torn line skipped on the way out ------------------------------


def test_each_metric_and_log_line_is_one_write(tmp_path, monkeypatch):
    log = RunLog(str(tmp_path), is_main=True)
    writes = []
    real_write = os.write

    def recording_write(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    log.metric(kind="train", step=1, train_loss=5.0, note="x" * 5000)  # longer than any buffer a torn write would split at
    log.log("step:1 train_loss:5.0")
    assert len(writes) == 2 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert json.loads(writes[0])["note"] == "x" * 5000


def test_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    path = os.path.join(run, "metrics.jsonl")
    whole = submission.read_metrics(run)
    with open(path, "a") as f:
        f.write('{"time": 1.0, "kind": "train", "st')  # killed mid-write
    with pytest.warns(UserWarning, match=rf"{path} line {len(whole) + 1}: not a whole JSON line.*skipped"):
        assert submission.read_metrics(run) == whole
    with pytest.warns(UserWarning):
        assert submission.final_result(run)["ttt_val_bpb"] == 1.13


def test_resumed_run_appends_after_a_torn_line(tmp_path):
    folder = tmp_path / "run"
    log = RunLog(str(folder), is_main=True)
    log.metric(kind="train", step=1, train_loss=5.0)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"time": 2.0, "kind": "tr')  # the run was killed here
    with open(folder / "train.log", "a") as f:
        f.write("step:2 train_lo")
    resumed = RunLog(str(folder), is_main=True)  # RESUME continues in the same folder
    resumed.metric(kind="train", step=2, train_loss=4.0)
    resumed.log("resumed")
    with pytest.warns(UserWarning, match="line 2"):
        metrics = submission.read_metrics(str(folder))
    assert [m["step"] for m in metrics] == [1, 2]  # the new line is whole, not glued to the torn one
    assert (folder / "train.log").read_text().splitlines() == ["step:2 train_lo", "resumed"]


@pytest.mark.parametrize("call", [
    lambda log: log.metric(kind="train", step=1, train_loss=5.0),
    lambda log: log.log("step:1"),
])
def test_log_write_failure_is_one_line_naming_the_file(tmp_path, monkeypatch, call):
    log = RunLog(str(tmp_path), is_main=True)
    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(WriteFailed, match=r"could not write .*(metrics\.jsonl|train\.log): No space left on device") as err:
        call(log)
    assert one_line(str(err.value))


def test_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    log = RunLog(str(tmp_path), is_main=True)
    log.write_text("config.json", '{"old": 1}')
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(WriteFailed, match=r"config\.json: No space left on device") as err:
        log.write_text("config.json", '{"new": 2}')
    assert one_line(str(err.value))
    monkeypatch.undo()
    assert (tmp_path / "config.json").read_text() == '{"old": 1}'
    assert os.listdir(tmp_path) == ["config.json"]  # no temp file left


def test_runlog_of_other_ranks_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    log = RunLog(str(folder), is_main=False)
    log.metric(kind="train", step=1)
    log.log("x")
    log.write_text("config.json", "{}")
    assert not folder.exists()


# -- the record folder: built whole or not at all ---------------------------------------------------


@pytest.fixture
def fake_matplotlib(monkeypatch):
    """Just enough of matplotlib for plot_losses (it is an optional extra); savefig writes through
    the file object it is given, as the real one does, with `fail` set to make it raise."""
    state = {"fail": False}

    class Axes:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, f, format=None, dpi=None):
            assert format == "png" and not isinstance(f, str)
            f.write(b"\x89PNG fake")
            if state["fail"]:
                disk_full()

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda *args, **kwargs: (Figure(), [Axes(), Axes()])
    pyplot.close = lambda fig: None
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.use = lambda backend: None
    matplotlib.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    return state


def test_record_with_loss_plot(tmp_path, fake_matplotlib):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    out = submission.write_record(run, [os.path.abspath(submission.__file__)])
    assert open(os.path.join(out, "loss.png"), "rb").read() == b"\x89PNG fake"
    assert "loss plot: " in open(os.path.join(out, "README.md")).read()
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files inside


def test_record_plot_failure_leaves_no_half_record(tmp_path, fake_matplotlib):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    code = [os.path.abspath(submission.__file__)]
    previous = submission.write_record(run, code)  # an earlier, complete record stays as it was
    before = {name: open(os.path.join(previous, name), "rb").read() for name in os.listdir(previous)}
    fake_matplotlib["fail"] = True
    with pytest.raises(WriteFailed, match=r"could not write .*record\.tmp/loss\.png: No space left on device") as err:
        submission.write_record(run, code)
    assert one_line(str(err.value))
    assert not os.path.exists(os.path.join(run, "record.tmp"))
    assert {name: open(os.path.join(previous, name), "rb").read() for name in os.listdir(previous)} == before


@pytest.mark.parametrize("failing", ["README.md", "submission.json", "final_model.int6.ptz"])
def test_record_write_failure_leaves_no_record_tmp(tmp_path, monkeypatch, failing):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == failing:
            disk_full()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteFailed, match=rf"could not write .*record\.tmp/{failing}: No space left on device") as err:
        submission.write_record(run, [os.path.abspath(submission.__file__)])
    assert one_line(str(err.value))
    assert sorted(os.listdir(run)) == ["config.json", "final_model.int6.ptz", "metrics.jsonl", "train.log"]


def test_record_folder_rename_failure_is_one_line(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "record":
            raise OSError(errno.EACCES, "Permission denied", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteFailed, match=r"could not write .*/record: Permission denied") as err:
        submission.write_record(run, [os.path.abspath(submission.__file__)])
    assert one_line(str(err.value))
    assert not os.path.exists(os.path.join(run, "record.tmp"))


def test_record_of_a_run_without_artifact(tmp_path):
    run = fake_run(tmp_path / "run", 1337, 1.13)
    os.remove(os.path.join(run, "final_model.int6.ptz"))
    with pytest.raises(FileNotFoundError, match="lacks final_model.int6.ptz") as err:
        submission.write_record(run, [os.path.abspath(submission.__file__)])
    assert one_line(str(err.value))
    assert not os.path.exists(os.path.join(run, "record.tmp"))


def test_packaged_record_holds_the_counted_code_file(tmp_path):
    from model import code_package

    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "train.py").write_text('"""entry"""\nfrom model import util\nprint(util.GREETING)\n')
    (src / "model" / "__init__.py").write_text("")
    (src / "model" / "util.py").write_text('GREETING = "packed hello"\n')
    files = [str(src / "train.py"), str(src / "model" / "__init__.py"), str(src / "model" / "util.py")]
    run = fake_run(tmp_path / "run", 7, 1.1)  # counted 200 code bytes: not the package's size
    with pytest.raises(ValueError, match="counted 200 code bytes but the packaged train_gpt.py holds"):
        submission.write_record(run, files, package=True)
    assert not os.path.exists(os.path.join(run, "record")) and not os.path.exists(os.path.join(run, "record.tmp"))
    size = len(code_package.build(files, str(src)))
    log = RunLog(run, is_main=True)
    log.metric(kind="final", val_loss=2.0, val_bpb=1.2, ttt_val_loss=1.9, ttt_val_bpb=1.1, artifact_bytes=1000,
               code_bytes=size, total_bytes=1000 + size, seed=7)
    out = submission.write_record(run, files, package=True)
    packed = os.path.join(out, submission.PACKAGE_NAME)
    assert os.path.getsize(packed) == size == json.load(open(os.path.join(out, "submission.json")))["bytes_code"]
    assert "Code bytes are the size of `train_gpt.py`" in open(os.path.join(out, "README.md")).read()
    result = subprocess.run([sys.executable, "-I", packed], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "packed hello\n", result.stderr
