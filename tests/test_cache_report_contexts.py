"""benchmarks/cache_report.py measures every variant at each --contexts prompt length and draws --plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_report.py"
_VARIANTS = {"dynamic", "encrypted_audit_off", "encrypted_audit_on", "working_set_audit_off",
             "working_set_audit_on"}


def _have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("cache_report_contexts", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(report, tmp_path_factory):
    """One tiny run at two prompt lengths, with the plot when matplotlib is there."""
    out = tmp_path_factory.mktemp("contexts")
    argv = ["--repeats", "1", "--new-tokens", "4", "--threads", "1", "--contexts", "16,32",
            "--json", str(out / "r.json")]
    if _have_matplotlib():
        argv += ["--plot", str(out / "plot.png")]
    threads = torch.get_num_threads()
    try:
        rc = report.main(argv)
    finally:
        torch.set_num_threads(threads)       # the script pins torch's threads; the rest of the suite keeps its own
    return rc, json.loads((out / "r.json").read_text()), out


def test_every_context_gets_every_variant_with_median_min_max(quick_run):
    rc, result, _ = quick_run
    assert rc == 0
    assert result["config"]["contexts"] == [16, 32]
    # without 512 among them, the headline tables are of the first length given
    assert result["config"]["prompt"] == 16
    assert set(result["contexts"]) == {"16", "32"}
    for row in result["contexts"].values():
        assert set(row["decode_tokens_per_s"]) == _VARIANTS
        for r in row["decode_tokens_per_s"].values():
            assert r["min"] <= r["median"] <= r["max"] and r["min"] > 0
            assert len(r["values"]) == 1
        assert set(row["ratio_to_dynamic"]) == _VARIANTS - {"dynamic"}
        assert row["outputs_identical"] is True
    assert result["decode_tokens_per_s"]["dynamic"] == pytest.approx(
        result["contexts"]["16"]["decode_tokens_per_s"]["dynamic"]["median"])
    assert len(result["machine"]["load_average_start"]) == 3 and result["machine"]["cpu"]


def test_arena_memory_is_reported_for_every_encrypted_variant_within_its_bounds(quick_run):
    _, result, _ = quick_run
    memory = result["arena_memory"]
    assert set(memory) == _VARIANTS - {"dynamic"}
    for m in memory.values():
        assert m["steps"] == result["config"]["new_tokens"]
        assert 1.0 <= m["max_used_per_live"] <= 1.5
        assert 0.0 < m["max_capacity_per_dynamic_kv"] <= 2.0


@pytest.mark.skipif(not _have_matplotlib(), reason="matplotlib is not installed (pip install 'pqc-kv-cache-encryption[bench]')")
def test_plot_is_a_png_of_tokens_per_s_against_context(quick_run):
    _, _, out = quick_run
    data = (out / "plot.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_matplotlib_fails_up_front_with_a_clear_error(report, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    measured = []
    monkeypatch.setattr(report, "decode_times", lambda *a, **k: measured.append(a))
    with pytest.raises(SystemExit) as e:
        report.main(["--quick", "--contexts", "16", "--plot", str(tmp_path / "p.png"),
                     "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2 and not measured and not (tmp_path / "p.png").exists()
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pqc-kv-cache-encryption[bench]" in err


@pytest.mark.parametrize("text, message", [("", "at least one"), ("128,abc", "integers"),
                                           ("0,128", ">= 1"), ("128,128", "twice")])
def test_bad_contexts_are_refused_with_what_is_wrong(report, text, message):
    with pytest.raises(ValueError, match=message):
        report.parse_contexts(text)


def test_contexts_keep_their_order(report):
    assert report.parse_contexts(" 2048, 128 ,512") == [2048, 128, 512]
