"""bench/common.py's arithmetic and plumbing (the timings themselves need a GPU and are never asserted)."""
import math

import pytest
import torch

from bench import common
from bench.common import Timed, table, variant_rows


def test_variant_rows_speed_ups_and_throughput():
    timed = {"triton": (2.0, 3 * 2**20), "eager reference": (8.0, 0), "compiled reference": (4.0, 2**20)}
    rows = {r["variant"]: r for r in variant_rows("forward", timed, flops=4_000_000_000_000)}
    assert rows["triton"]["TFLOP/s"] == pytest.approx(2000.0)  # 4e12 FLOP in 2 ms
    assert rows["triton"]["speed-up vs eager"] == pytest.approx(4.0)
    assert rows["triton"]["speed-up vs compiled"] == pytest.approx(2.0)
    assert rows["triton"]["peak extra MiB"] == pytest.approx(3.0)
    assert rows["eager reference"]["speed-up vs eager"] == pytest.approx(1.0)
    assert all(r["pass"] == "forward" for r in rows.values())


def test_variant_rows_names_its_flops_column():
    timed = {"eager reference": (1.0, 0), "compiled reference": (1.0, 0)}
    (row, _) = variant_rows("forward+backward", timed, flops=10**9, column="useful TFLOP/s")
    assert row["useful TFLOP/s"] == pytest.approx(1.0) and "TFLOP/s" not in row  # 1e9 FLOP in 1 ms


def test_variant_rows_in_bytes_against_a_ceiling_with_other_baselines():
    timed = {"triton": (0.5, 0), "sdpa": (1.0, 0)}
    rows = {r["variant"]: r for r in variant_rows({"weight": "w", "xsa": True}, timed, nbytes=10**9,
                                                     baselines={"sdpa": "sdpa"}, ceiling=("copy bw", 1000.0))}
    assert list(rows["triton"])[:5] == ["weight", "xsa", "variant", "median ms", "GB/s"]
    assert rows["triton"]["GB/s"] == pytest.approx(2000.0)  # 1e9 bytes in 0.5 ms
    assert rows["triton"]["of copy bw"] == pytest.approx(2.0)
    assert rows["triton"]["speed-up vs sdpa"] == pytest.approx(2.0)
    assert "speed-up vs eager" not in rows["triton"] and "TFLOP/s" not in rows["triton"]
    with pytest.raises(ValueError, match="exactly one"):
        variant_rows("forward", timed, flops=1, nbytes=1, baselines={})


def test_variant_rows_leave_out_memory_not_measured_and_add_graph_timings():
    timed = {"triton": Timed(1.0, float("nan"), 0.25), "compiled reference": Timed(3.0, float("nan"), 1.0)}
    rows = {r["variant"]: r for r in variant_rows("step", timed, flops=10**9, baselines={"compiled": "compiled reference"})}
    assert "peak extra MiB" not in rows["triton"]  # NaN (the CPU): no column of NaNs
    assert rows["triton"]["CUDA-graph ms"] == 0.25
    assert rows["triton"]["speed-up vs compiled"] == pytest.approx(3.0)
    assert rows["triton"]["graph speed-up vs compiled"] == pytest.approx(4.0)
    assert all(isinstance(v, str) or math.isfinite(v) for r in rows.values() for v in r.values())


def test_peak_memory_is_nan_on_the_cpu_and_measure_reports_every_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = common.Bench("bench.test", ["--smoke"])
    calls = []
    assert math.isnan(bench.peak_extra_bytes(lambda: calls.append(1))) and not calls  # not run for nothing
    timed = bench.measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, graph=True)
    assert list(timed) == ["a", "b"] and all(t.ms >= 0 and t.graph_ms >= 0 and math.isnan(t.peak_bytes) for t in timed.values())


def test_synchronize_is_the_models():
    from model.distributed import synchronize

    assert common.synchronize is synchronize  # bench.step imports it from bench.common
    assert common.wall_ms(lambda: None, "cpu") >= 0


def test_table_is_markdown_with_three_significant_digits():
    assert table([{"a": 1.23456, "b": "x"}]).splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |"]
