"""The benchmark scripts still run against the library as it is (a smoke run each; figures are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_native_report_runs():
    from pqc_kv_cache.backends.native import NativeBackend
    from pqc_kv_cache.errors import BackendUnavailableError
    try:
        NativeBackend.instance()
    except BackendUnavailableError as e:
        pytest.skip(f"native host backend unavailable: {e}")
    out = _run("benchmarks/native_report.py", "--repeats", "1", "--min-seconds", "0.01")
    assert "native/bulk" in out


def test_restore_report_runs(tmp_path):
    out = _run("benchmarks/restore_report.py", "--repeats", "1", "--out", str(tmp_path / "restore.json"))
    assert "ratio to bulk" in out


def test_host_overhead_runs(tmp_path):
    from pqc_kv_cache.backends import kernel_shim
    if not kernel_shim.available():
        pytest.skip("no C++ compiler for the host shim (the CPU twin of the CUDA backend)")
    out = tmp_path / "host_overhead.json"
    text = _run("benchmarks/host_overhead.py", "--smoke", "--twin", "--layers", "2", "--out", str(out))
    assert "working set, audit on" in text and "DynamicCache" in text and "a step of 2 layers" in text
    import json
    res = json.loads(out.read_text())
    assert res["shape"]["layers"] == 2
    assert set(res["host_ms_per_layer_update"]) == {"dynamic", "sealed_audit_off", "sealed_audit_on",
                                                    "working_set_audit_off", "working_set_audit_on"}
    assert all(v["n"] == 2 and v["median"] > 0 for v in res["host_ms_per_layer_update"].values())


def test_audit_drain_runs(tmp_path):
    out = tmp_path / "audit_drain.json"
    text = _run("benchmarks/audit_drain.py", "--smoke", "--out", str(out))
    assert "drain ns per record" in text
    import json
    res = json.loads(out.read_text())
    assert set(res["logs"]) == {"memory", "file"}
    assert all(r["drain_ns_per_record"]["n"] == 2 and r["drain_ns_per_record"]["median"] > 0
               for r in res["logs"].values())
