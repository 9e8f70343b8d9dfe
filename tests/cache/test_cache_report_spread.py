"""benchmarks/cache_report.py reports ratios with their spread and refuses to conclude from a wide one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("cache_report", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spread_gives_min_median_max_of_the_per_repeat_ratios(report):
    r = report.spread([0.95, 0.90, 0.93, 0.97, 0.94], max_spread=0.10)
    assert (r["min"], r["median"], r["max"]) == (0.90, 0.94, 0.97)
    assert r["conclusive"] and r["verdict"].startswith("spread 7%")


def test_a_wide_spread_is_not_conclusive(report):
    # the three audit on/off ratios once measured on a busy 2-core machine
    r = report.spread([2.73, 0.19, 0.90], max_spread=0.10)
    assert not r["conclusive"] and "not conclusive" in r["verdict"] and r["median"] == 0.90


def test_fewer_than_three_repeats_are_not_conclusive(report):
    r = report.spread([1.0, 1.0], max_spread=0.10)
    assert not r["conclusive"] and "at least 3" in r["verdict"]


def test_variants_run_in_an_order_that_rotates_between_repeats(report, monkeypatch):
    calls = []
    monkeypatch.setattr(report, "generate_time", lambda model, ids, n, make: (calls.append((make(), n)) or
                                                                             (1.0 if n > 1 else 0.5, None)))
    monkeypatch.setattr(report, "progress", lambda msg: None)
    times, _ = report.decode_times(None, None, 8, {"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, 3)
    firsts = [calls[i][0] for i in range(0, len(calls), 6)]
    assert firsts == ["a", "b", "c"]
    assert times == {k: [0.5] * 3 for k in "abc"}
