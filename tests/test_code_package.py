"""The counted code (model/code_package.py): one self-extracting file, its size the counted bytes,
and that file, run in a fresh process, loads a saved artifact and scores it exactly as the
trainer's process does, from its own packaged modules."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import kernels
from data.synthetic import make_smoke_dataset
from model import code_package, export, gptq
from model.config import PRESETS, Config
from model.gpt import GPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=300, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=16,
            xsa_last_n=1, bigram_enabled=False, ve_enabled=False, train_seq_len=64)
FRONTIER_SMOKE = dict(vocab_size=1100, num_layers=11, model_dim=64, mlp_mult=17, num_heads=4, num_kv_heads=2, train_seq_len=64,
                      compile=False)  # the frontier's topology (loop 3-5, lanes from 8); tok_emb and the MLP over 65,536: GPTQ
FRONTIER_LANDED = hasattr(GPT, "int8_row_matrix_names")  # the frontier model declares its int8 gate
SCORE = """
import json, runpy, sys
runpy.run_path(sys.argv[1])  # installs the package's import hook; train.py does not run under this name
import torch
from model import code_package, export, config, gpt
modules = [m for name, m in sys.modules.items() if name.split(".")[0] in ("model", "kernels", "train")]
assert modules and all(m.__file__.startswith("{origin}") for m in modules), [m.__file__ for m in modules]
losses = []
for case in json.loads(sys.argv[2]):
    cfg = config.Config(**case["config"])
    model = gpt.GPT(cfg)
    model.load_state_dict(export.read_artifact(case["artifact"]))
    model.looping = bool(cfg.num_loops)
    tokens = torch.load(case["tokens"])
    with torch.no_grad():
        losses.append(model.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item())
with open(sys.argv[1], "rb") as f:
    own = code_package.running_package() == f.read()  # the hook holds the file it was launched from
print(json.dumps({{"losses": losses, "origin": export.__file__, "own": own}}))
""".format(origin=code_package.ORIGIN)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record")
    path = folder / "train_gpt.py"
    size = code_package.write(str(path), code_package.default_sources(REPO), REPO)
    return path, size


def test_the_counted_bytes_are_the_written_file(package):
    path, size = package
    assert size == os.path.getsize(path)
    raw = sum(os.path.getsize(f) for f in code_package.default_sources(REPO))
    assert size < raw / 3  # minified and compressed
    assert path.read_bytes().startswith(b"P='") and b"sys.meta_path.insert(0,F)" in path.read_bytes()


def test_sources_minified_without_renaming():
    source = 'def f(value: int) -> int:\n    """doc"""\n    assert value\n    total = value + 1\n    return total\n'
    out = code_package.minify(source)
    assert "doc" not in out and "assert" not in out
    assert out == "def f(value:int)->int:total=value+1;return total"  # no renaming; annotations stay


def test_without_the_minifier_the_source_is_kept(monkeypatch):
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # import fails as if not installed
    assert code_package.minify("x = 1  # note\n") == "x = 1  # note\n"


def test_bad_file_lists_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        code_package.package_sources([str(tmp_path / "missing.py")], REPO)
    with pytest.raises(ValueError, match="train.py is not among the files"):
        code_package.package_sources([os.path.join(REPO, "model", "atomic.py")], REPO)
    outside = tmp_path / "x.py"
    outside.write_text("x = 1\n")
    with pytest.raises(ValueError, match="lies outside"):
        code_package.package_sources([str(outside)], REPO)


def export_and_score(settings: dict, folder, code_bytes: int) -> dict:
    """Build a GPT from settings (zero-initialised matrices filled, so every weight matters), export it
    with its config's QUANT/COMPRESSOR (GPTQ calibrated on random tokens), reload it in this process
    and score 384 tokens before and after -> the case the fresh process scores again."""
    cfg = Config(**settings)
    torch.manual_seed(0)
    model = GPT(cfg)
    for parameter in model.parameters():
        if parameter.dim() == 2 and not parameter.detach().any():
            nn.init.normal_(parameter, std=0.02)
    model.looping = bool(cfg.num_loops)
    sd = model.state_dict()
    fp32 = model.control_tensor_names()
    batches = [torch.randint(0, cfg.vocab_size, (2, 64)) for _ in range(2)]
    hessians, _ = gptq.collect_hessians(model, batches, export.gptq_names(sd, fp32_names=fp32))
    artifact = folder / "final_model.ptz"
    export.write_model_artifact(model, str(artifact), cfg, hessians=hessians, code_bytes=code_bytes, group_coder="zstd")
    tokens = torch.randint(0, cfg.vocab_size, (4, 97))  # 384 scored targets
    fresh = GPT(cfg)
    fresh.load_state_dict(export.read_artifact(str(artifact)))
    fresh.looping = model.looping
    with torch.no_grad():
        before = model.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item()
        after = fresh.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item()
    torch.save(tokens, folder / "tokens.pt")
    return dict(config=settings, artifact=str(artifact), tokens=str(folder / "tokens.pt"), before=before, after=after)


@pytest.mark.slow
def test_the_package_scores_saved_artifacts_in_a_fresh_process(package, tmp_path):
    """A tiny seed-style GPT with GPTQ + LQER + pergroup, and (once model/gpt.py builds it) a
    frontier-smoke GPT with the frontier preset's export: each artifact reloaded here scores
    within the quantisation's expected change of the exported model, and the packaged code in a
    fresh process scores it exactly as this process does."""
    cases = [dict(TINY, quant="gptq", compressor="pergroup", lqer_enabled=True, zstd_level=3)]
    if FRONTIER_LANDED:
        cases.append(dict(PRESETS["frontier"](), **FRONTIER_SMOKE, zstd_level=3))  # zstd 3: the group coder, fast
    scored = []
    with kernels.use_backend("reference"), gptq.single_threaded_on_cpu("cpu"):  # tiny ops: threads only wait
        for i, settings in enumerate(cases):
            (tmp_path / str(i)).mkdir()
            scored.append(export_and_score(settings, tmp_path / str(i), package[1]))
    for case in scored:
        assert case["before"] != case["after"] and abs(case["before"] - case["after"]) < 0.01 * case["before"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERNELS="reference", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", SCORE, str(package[0]), json.dumps(scored)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["origin"].startswith(code_package.ORIGIN) and got["own"]
    assert got["losses"] == pytest.approx([case["after"] for case in scored], abs=1e-6)


# frontier-smoke (QUANT=gptq) at a size that trains 2 steps in seconds; model_dim 160 still sends the MLP
# and embedding through GPTQ; the phased TTT is off (test_frontier_run scores it through train.py)
PACKED_RUN = ["--preset", "frontier-smoke", "--model_dim", "160", "--num_heads", "4", "--num_kv_heads", "2",
              "--rope_dims", "8", "--iterations", "2", "--val_loss_every", "0", "--ttt_enabled", "0",
              "--max_val_tokens", "2048", "--val_batch_size", "2048", "--run_id", "packed"]


@pytest.mark.slow
def test_the_package_runs_the_frontier_as_its_entry_point(package, tmp_path):
    """python train_gpt.py, as the record's README says: a tiny QUANT=gptq run trains, exports and
    scores, then --eval-only scores its artifact again, each a fresh process running the packed
    modules; both count the running file's own bytes and the record holds that file."""
    path, size = package
    data = tmp_path / "data"
    make_smoke_dataset(str(data), vocab_size=1024, num_docs=400, val_docs=40)  # frontier-smoke's vocabulary
    args = [*PACKED_RUN, "--data_path", str(data), "--tokenizer_path", str(data / "tokenizer.model")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(KERNELS="reference", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = tmp_path / "runs" / "packed"
    for extra in ([], ["--eval-only", str(run / "final_model.int6.ptz")]):
        result = subprocess.run([sys.executable, "-I", str(path), *args, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"train_gpt.py {' '.join(extra)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    log = (run / "train.log").read_text()
    assert "eval-only: scoring" in log and "export pergroup:" in log
    assert [int(n) for n in re.findall(r"code_bytes:(\d+)", log)] == [size, size]  # the run's count, then --eval-only's
    assert (run / "record" / "train_gpt.py").read_bytes() == path.read_bytes()
    finals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert [f["code_bytes"] for f in finals] == [size, size] and finals[0]["val_bpb"] == finals[1]["val_bpb"]
    readme = (run / "record" / "README.md").read_text()
    assert "- `train.py`\n- `kernels/__init__.py`" in readme and "- `model/code_package.py`" in readme  # what the file holds


def test_running_package_is_none_outside_a_package():
    assert code_package.running_package() is None  # imported from the repository: the run builds from the sources


def test_unpack_returns_the_packed_sources(tmp_path):
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.py").write_text("x = 1\n")
    package = code_package.build([str(tmp_path / "model" / "a.py"), str(tmp_path / "train.py")], str(tmp_path))
    assert code_package.unpack(package) == {"train.py": code_package.minify("print(1)\n"), "model/a.py": code_package.minify("x = 1\n")}
    assert code_package.packed_names(package) == ["train.py", "model/a.py"]  # the entry point first
    with pytest.raises(ValueError, match="not a file code_package.build wrote"):
        code_package.unpack(b"print(1)\n")


def test_build_is_deterministic_and_follows_edits(tmp_path):
    (tmp_path / "train.py").write_text("print(1)\n")
    files = [str(tmp_path / "train.py")]
    first = code_package.build(files, str(tmp_path))
    assert code_package.build(files, str(tmp_path)) == first
    os.utime(tmp_path / "train.py", ns=(1, 1))
    (tmp_path / "train.py").write_text("print(22)\n")  # a new size and mtime: built again
    assert code_package.build(files, str(tmp_path)) != first
