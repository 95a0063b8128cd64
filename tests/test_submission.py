"""The record folder and the seed summary, from run folders written the way train.py writes them."""
import json
import math
import os

import pytest

from model import submission
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
