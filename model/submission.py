"""The challenge's record folder for a finished run, the loss plot, and a summary across seeds.

    python -m model.submission summarize runs/seed1337 runs/seed42 runs/seed2025
"""
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings

from model import code_package
from model.atomic import WriteFailed, atomic_open, atomic_write, describe_os_error

RECORD_FILES = ("train.log", "final_model.int6.ptz", "config.json", "metrics.jsonl")  # copied from the run folder
PACKAGE_NAME = "train_gpt.py"  # the self-extracting counted code (model/code_package.py)


def read_metrics(run_folder: str) -> list[dict]:
    """The JSON lines of run_folder/metrics.jsonl. A line a killed run left torn (RunLog writes
    whole lines, so only the one being written can be) is skipped with a warning naming the file."""
    path = os.path.join(run_folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass the folder of a run that train.py finished (runs/<RUN_ID>)")
    metrics = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path} line {number}: not a whole JSON line (a run killed while writing it); skipped", stacklevel=2)
    return metrics


def final_result(run_folder: str) -> dict:
    finals = [m for m in read_metrics(run_folder) if m.get("kind") == "final"]
    if not finals:
        raise ValueError(f"{run_folder} has no final scores in metrics.jsonl; the run did not finish")
    return finals[-1]


def headline(final: dict) -> tuple[float, float, str]:
    """The score a submission reports: legal TTT when it ran, else the sliding window."""
    for prefix, what in (("ttt_", "legal score-first TTT"), ("sliding_", "sliding window"), ("", "contiguous")):
        if f"{prefix}val_bpb" in final:
            return final[f"{prefix}val_bpb"], final[f"{prefix}val_loss"], what
    raise ValueError("the final metrics hold no val_bpb")


def plot_losses(run_folder: str, out_path: str) -> str:
    """Train and validation loss against step and wall time; a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install -e .[plot])"
    metrics = read_metrics(run_folder)
    train = [m for m in metrics if m.get("kind") == "train"]
    val = [m for m in metrics if m.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "train_time_ms", "training time (s)")):
        scale = 1e-3 if key == "train_time_ms" else 1
        ax.plot([m[key] * scale for m in train], [m["train_loss"] for m in train], label="train loss")
        if val:
            ax.plot([m[key] * scale for m in val], [m["val_loss"] for m in val], "o-", label="val loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_open(out_path, "wb", fsync=False) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return f"loss plot: {out_path}"


def write_record(run_folder: str, code_files: list[str], package: bool | bytes = False) -> str:
    """runs/<id>/record/: README.md, submission.json, train.log, the artifact and the loss plot.
    Built in record.tmp/ and renamed, so a half-written record never exists: on an OSError the
    temp folder is removed and one WriteFailed line names the file.

    package: the record also holds train_gpt.py, code_files (train.py first; the others under its
    folder) packed into one self-extracting file by model.code_package, and the run's counted
    code bytes must be that file's size (ValueError otherwise: the count would not be honest).
    package may also be those bytes themselves, packed when the run started (sources edited during
    a run do not change the code it ran)."""
    final = final_result(run_folder)
    headline(final)  # no score: raise before any folder exists
    missing = [name for name in RECORD_FILES if not os.path.isfile(os.path.join(run_folder, name))]
    if missing:
        raise FileNotFoundError(f"{run_folder} lacks {', '.join(missing)}; a record needs a run that train.py finished")
    with open(os.path.join(run_folder, "config.json")) as f:
        config = json.load(f)
    out = os.path.join(run_folder, "record")
    tmp = out + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _fill_record(tmp, run_folder, final, config, code_files, package)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError as e:
        if isinstance(e, WriteFailed):
            raise
        raise WriteFailed(describe_os_error(e.filename or out, e)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed build leaves no half record
    return out


def _fill_record(tmp: str, run_folder: str, final: dict, config: dict, code_files: list[str], package: bool | bytes) -> None:
    bpb, loss, what = headline(final)
    if isinstance(package, bytes):  # the run's own packed sources, built when it started
        size = atomic_write(os.path.join(tmp, PACKAGE_NAME), package, fsync=False)
    elif package:
        size = code_package.write(os.path.join(tmp, PACKAGE_NAME), code_files, root=os.path.dirname(code_files[0]))
    if package:
        if size != final["code_bytes"]:
            raise ValueError(f"the run counted {final['code_bytes']:,} code bytes but the packaged {PACKAGE_NAME} holds "
                             f"{size:,}; count len(model.code_package.build(files, root)) for the same files")
    for name in RECORD_FILES:
        with open(os.path.join(run_folder, name), "rb") as src, atomic_open(os.path.join(tmp, name), "wb", fsync=False) as dst:
            shutil.copyfileobj(src, dst)
    plot_note = plot_losses(run_folder, os.path.join(tmp, "loss.png"))
    submission = {
        "name": "", "author": "", "github_id": "",  # for the submitter to fill in
        "date": time.strftime("%Y-%m-%d"),
        "val_bpb": bpb, "val_loss": loss, "score": what,
        "bytes_total": final["total_bytes"], "bytes_artifact": final["artifact_bytes"], "bytes_code": final["code_bytes"],
        "seeds": [final["seed"]],
    }
    atomic_write(os.path.join(tmp, "submission.json"), json.dumps(submission, indent=1), fsync=False)
    rows = [("val_bpb (" + what + ")", f"{bpb:.4f}")]
    for key, label in (("val_bpb", "round-trip contiguous val_bpb"), ("sliding_val_bpb", "sliding-window val_bpb"),
                       ("ttt_val_bpb", "legal TTT val_bpb"), ("steps", "steps"), ("train_time_ms", "training time (ms)"),
                       ("artifact_bytes", "artifact bytes"), ("code_bytes", "code bytes"), ("total_bytes", "total bytes")):
        if key in final:
            value = final[key]
            rows.append((label, f"{value:.4f}" if isinstance(value, float) and key.endswith("bpb") else f"{value:,.0f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    code_list = "\n".join(f"- `{os.path.relpath(p, os.path.dirname(code_files[0]))}`" for p in code_files)
    if package:
        code_text = (f"Code bytes are the size of `{PACKAGE_NAME}`, these files minified and packed into one self-extracting "
                     f"file (`python {PACKAGE_NAME} --help`; it runs train.py from the packed sources):\n{code_list}")
    else:
        code_text = f"Code bytes count every source file the run needs:\n{code_list}"
    features = [f"{config['num_layers']}L", f"XSA{config['xsa_last_n']}"]
    for key, default, label in (("bigram_enabled", True, "BigramHash"), ("ve_enabled", True, "VE"),
                                ("swa_enabled", True, "Tight-SWA"), ("late_qat_threshold", 0.1, "late-QAT")):
        if config.get(key, default):
            features.append(label)
    features.append(f"{config.get('quant', 'int6')}+{config.get('compressor', 'zstd')}")
    readme = f"""# Record: {' '.join(features)}, legal TTT

Trained with `train.py` of this repository (seed {final['seed']}); every score below comes from the
artifact after it was written, decompressed, dequantised and loaded into a fresh model.

| what | value |
|---|---|
{table}

{code_text}

{plot_note}. The resolved configuration is `config.json`; the full log `train.log`; one JSON line per
logged step and evaluation `metrics.jsonl`.
"""
    atomic_write(os.path.join(tmp, "README.md"), readme, fsync=False)


def summarize(run_folders: list[str]) -> dict:
    """Mean and standard deviation of the headline score across seed runs (the challenge asks for 3)."""
    finals = [final_result(folder) for folder in run_folders]
    scores = [headline(f)[0] for f in finals]
    return {
        "runs": run_folders,
        "seeds": [f["seed"] for f in finals],
        "val_bpb": scores,
        "mean": statistics.fmean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else math.nan,
        "max_total_bytes": max(f["total_bytes"] for f in finals),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "summarize":
        print("usage: python -m model.submission summarize RUN_FOLDER [RUN_FOLDER ...]", file=sys.stderr)
        return 2
    try:
        summary = summarize(argv[1:])
    except (FileNotFoundError, ValueError) as e:
        print(f"model.submission: {e}", file=sys.stderr)
        return 1
    for folder, seed, score in zip(summary["runs"], summary["seeds"], summary["val_bpb"]):
        print(f"{folder}: seed {seed} val_bpb {score:.4f}")
    print(f"mean val_bpb {summary['mean']:.4f} std {summary['std']:.4f} over {len(summary['runs'])} runs; "
          f"largest total {summary['max_total_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
