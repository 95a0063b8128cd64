"""The counted code (model/code_package.py): one self-extracting file, its size the counted bytes,
and that file, run in a fresh process, loads a saved artifact and scores it exactly as the
trainer's process does, from its own packaged modules."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kernels
from model import code_package, export, gptq
from model.config import Config
from model.gpt import GPT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=300, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2, rope_dims=16,
            xsa_last_n=1, bigram_enabled=False, ve_enabled=False, train_seq_len=64)
SCORE = """
import json, runpy, sys
runpy.run_path(sys.argv[1])  # installs the package's import hook; train.py does not run under this name
import torch
from model import export, config, gpt
modules = [m for name, m in sys.modules.items() if name.split(".")[0] in ("model", "kernels", "train")]
assert modules and all(m.__file__.startswith("{origin}") for m in modules), [m.__file__ for m in modules]
cfg = config.Config(**json.loads(open(sys.argv[3]).read()))
model = gpt.GPT(cfg)
model.load_state_dict(export.read_artifact(sys.argv[2]))
tokens = torch.load(sys.argv[4])
with torch.no_grad():
    loss = model.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean()
print(json.dumps({{"loss": loss.item(), "origin": export.__file__}}))
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


@pytest.mark.slow
def test_the_package_scores_a_saved_artifact_in_a_fresh_process(package, tmp_path):
    cfg = Config(**TINY)
    torch.manual_seed(0)
    with kernels.use_backend("reference"):
        model = GPT(cfg)
        for block in model.blocks:  # non-zero residual branches, so every matrix matters
            nn.init.normal_(block.attn.proj.weight, std=0.02)
            nn.init.normal_(block.mlp.proj.weight, std=0.02)
        sd = model.state_dict()
        names = export.gptq_names(sd, fp32_names=model.control_tensor_names())
        batches = [torch.randint(0, cfg.vocab_size, (2, 64)) for _ in range(2)]
        hessians, _ = gptq.collect_hessians(model, batches, names)
        artifact = tmp_path / "final_model.ptz"
        export.write_artifact(sd, str(artifact), fp32_names=model.control_tensor_names(),
                              int6_names=model.int6_matrix_names(), quant="gptq", compressor="pergroup",
                              hessians=hessians, cfg=Config(**TINY, lqer_enabled=True), code_bytes=package[1])
        tokens = torch.randint(0, cfg.vocab_size, (4, 97))  # 384 scored targets
        fresh = GPT(cfg)
        fresh.load_state_dict(export.read_artifact(str(artifact)))
        with torch.no_grad():
            before = model.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item()
            expected = fresh.eval().token_losses(tokens[:, :-1], tokens[:, 1:]).mean().item()
    assert before != expected and abs(before - expected) < 0.01 * before  # quantised: close, not equal
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERNELS="reference", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", SCORE, str(package[0]), str(artifact),
                             str(tmp_path / "config.json"), str(tmp_path / "tokens.pt")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["origin"].startswith(code_package.ORIGIN)
    assert got["loss"] == pytest.approx(expected, abs=1e-6)
