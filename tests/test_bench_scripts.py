"""Each kernel benchmark script end to end at tiny shapes (--smoke), so that a GPU visit is not spent
on a Python error. On the CPU the kernels run in Triton's interpreter and the compiled baselines
are traced by aot_eager; the figures mean nothing and are not asserted, only that every script
runs and prints its whole table."""
import importlib

import pytest
import torch

from bench.common import Bench

KERNEL_BENCHES = ["fakequant", "bigram", "softcap_ce", "relu2_mlp", "xsa_attention", "newton_schulz"]


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
    assert (bench.device, bench.shapes("real", "tiny")) == ("cpu", "tiny")
