"""The GPU suite's dry run (``--smoke``: every section, tiny shapes, the CUDA backend's CPU twin) and its
crash handling: a section that raises is recorded with its traceback, and the sections after it still
run and are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pqc_kv_cache.backends import kernel_shim

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.mark.skipif(not kernel_shim.available(), reason="no C++ compiler for the host shim (the CPU twin)")
def test_smoke_run_reports_every_section_ok(tmp_path):
    out = tmp_path / "r" / "suite.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {n: s["status"] for n, s in res["sections"].items()} == {n: "ok" for n in gpu_suite.SECTIONS}
    env = res["sections"]["environment"]
    assert env["backend_under_test"] == "CpuTwinBackend" and env["date"] and env["torch"]
    chunks = res["sections"]["correctness"]["chunks"]
    assert sorted(int(n) for n in chunks) == [1, 64, 4096] and all(c["ok"] for c in chunks.values())
    assert all(r["roundtrip_ok"] for r in res["sections"]["kernels"]["runs"].values())
    dec = res["sections"]["decode"]
    assert dec["variants"][:3] == ["DynamicCache", "sealed, audit off", "sealed, audit on"]
    for ctx in dec["contexts"].values():
        assert ctx["repeats"] == 2
        for name, v in ctx["variants"].items():
            assert v["tokens_identical"], name
            assert v["step_ms"]["min"] <= v["step_ms"]["median"] <= v["step_ms"]["max"]
        assert ctx["variants"]["sealed, audit off"]["backend"] == "CpuTwinBackend"
        assert ctx["variants"]["sealed, audit off"]["lower_bound_vs_dynamic"] > 1
        for v in ctx["variants"].values():       # on a CPU the host's time is the step's time
            assert v["host_ms"] == v["step_ms"]["median"] and v["host_bound"] is True
    audit = res["sections"]["audit"]
    assert audit["drained"] == audit["emitted"] > 0 and audit["records_per_s_of_drain_busy_time"] > 0
    long = res["sections"]["decode_32_layers"]       # the deep model's section (3 layers in a smoke run)
    assert long["layers"] == 3 and list(long["contexts"]) == ["16"]
    assert all(v["tokens_identical"] for v in long["contexts"]["16"]["variants"].values())
    assert "partial" not in res or not res["partial"]
    md = out.with_suffix(".md").read_text()
    assert md == res["markdown"]
    for text in ("| environment | ok", "| correctness | ok", "| kernels | ok", "| decode | ok", "| audit | ok",
                 "| decode_32_layers | ok", "3 layers of a tiny Llama", "**host-bound**", "opens with AESGCM",
                 "lower bound", "ring stalls", "sync debug mode"):
        assert text in md, text


def test_a_section_that_raises_is_recorded_and_the_next_still_runs(tmp_path):
    rep = gpu_suite.Report(str(tmp_path / "s.json"), smoke=True)
    rep.run("environment", lambda: {"device": "dev", "date": "today"}, 10)

    def boom():
        raise RuntimeError("kernel exploded\nsecond line")

    rep.run("correctness", boom, 10)
    written = json.loads((tmp_path / "s.json").read_text())         # written right after the failure
    assert written["sections"]["correctness"]["status"] == "error"
    assert written["sections"]["correctness"]["error"] == "RuntimeError: kernel exploded"
    assert "boom" in written["sections"]["correctness"]["traceback"]
    rep.run("kernels", lambda: {"ok": False, "runs": {}}, 10)
    res = json.loads((tmp_path / "s.json").read_text())
    assert [res["sections"][n]["status"] for n in ("environment", "correctness", "kernels")] == \
        ["ok", "error", "failed"]
    md = (tmp_path / "s.md").read_text()
    assert "| correctness | error: RuntimeError: kernel exploded |" in md
    assert "| decode | not run |" in md and not rep.ok


def test_the_audit_section_refuses_to_report_without_an_audited_run():
    rep_state = {}
    with pytest.raises(gpu_suite.SuiteError, match="no audit-on decode run"):
        gpu_suite.audit(None, rep_state)


def test_every_variant_is_one_line_and_a_missing_cache_keyword_only_leaves_its_variant_out():
    use, skipped = gpu_suite.available_variants()
    names = [v.name for v in gpu_suite.VARIANTS]
    assert {v.name for v in use} | set(skipped) == set(names) and not {v.name for v in use} & set(skipped)
    assert use[0].name == "DynamicCache" and {"sealed, audit off", "sealed, audit on"} <= {v.name for v in use}
    for v in gpu_suite.VARIANTS:
        assert (v.name in skipped) == (v.requires is not None and v not in use)


def test_a_running_section_keeps_what_it_finished_and_the_budget_bounds_its_checking_passes(tmp_path):
    """The decode section writes every finished variant at once (a section killed by its time limit keeps
    them), and past its deadline starts no further checking pass: those variants say why they did not
    run, and the section is not reported as passing."""
    if not kernel_shim.available():
        pytest.skip("no C++ compiler for the host shim (the CPU twin)")
    import torch

    rep = gpu_suite.Report(str(tmp_path / "s.json"), smoke=True)
    state = {"device_backend": gpu_suite.device_backend(torch.device("cpu"))}
    shapes = gpu_suite.Shapes.smoke(None)
    seen = []

    def progress(data):
        rep.partial("decode", data)
        seen.append(json.loads((tmp_path / "s.json").read_text())["partial"]["decode"])

    try:
        res = gpu_suite.decode(torch.device("cpu"), state, shapes, 2, True, deadline=0.0, progress=progress)
    finally:
        state["audit_log"].close(timeout=10)
    ctx = next(iter(res["contexts"].values()))["variants"]
    first = gpu_suite.available_variants()[0][0].name
    assert "not_run" not in ctx[first] and all("not_run" in p for n, p in ctx.items() if n != first)
    assert res["ok"] is False
    assert seen and first in seen[0]["contexts"]["8"]["variants"]   # written as soon as its pass was done
    rep.write()
    assert "section unfinished" in json.loads((tmp_path / "s.json").read_text())["markdown"]
    rep.run("decode", lambda: dict(res), 10)
    written = json.loads((tmp_path / "s.json").read_text())
    assert "decode" not in written.get("partial", {}) and "not run: the suite's budget" in written["markdown"]


def test_a_step_figure_is_labelled_host_bound_only_where_the_host_set_the_pace():
    assert gpu_suite.host_bound(9.0, 10.0) and gpu_suite.host_bound(10.0, 10.0)
    assert not gpu_suite.host_bound(8.9, 10.0) and not gpu_suite.host_bound(1.0, 10.0)
    assert not gpu_suite.host_bound(0.0, 0.0)
    row = {"backend": None, "tokens_identical": True, "syncs_prefill": 0, "syncs_decode": 0, "error_mode": "passed",
           "step_ms": {"median": 10.0, "run_median_min": 9.0, "run_median_max": 11.0},
           "vs_dynamic": {"ratio": 1.5, "min": 1.4, "max": 1.6}}
    d = {"batch": 8, "layers": 32, "model": "m", "dtype": "bf16", "contexts": {"4096": {"variants": {
        "gpu-bound": dict(row, host_ms=2.0, host_share=0.2, host_bound=False),
        "host-bound": dict(row, host_ms=9.5, host_share=0.95, host_bound=True)}}}}
    lines = gpu_suite.decode_table(d, smoke=False)
    gpu_row = next(x for x in lines if "| gpu-bound |" in x)
    host_row = next(x for x in lines if "| host-bound |" in x)
    assert "**host-bound**" not in gpu_row and host_row.count("**host-bound**") == 2
    assert "9.500 (0.95)" in host_row
