"""bench/common.py's arithmetic (the timings themselves need a GPU and are never asserted)."""
import pytest

from bench.common import table, variant_rows


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
    (row, _) = variant_rows("forward+backward", timed, flops=10**9, flops_column="useful TFLOP/s")
    assert row["useful TFLOP/s"] == pytest.approx(1.0) and "TFLOP/s" not in row  # 1e9 FLOP in 1 ms


def test_table_is_markdown_with_three_significant_digits():
    assert table([{"a": 1.23456, "b": "x"}]).splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x |"]
