"""benchmarks/static_report.py still runs against the library as it is (a smoke run; figures are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_static_report_runs(tmp_path):
    out_json = tmp_path / "static.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/static_report.py", "--quick", "--out", str(out_json)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny |" in proc.stdout and "added / plaintext" in proc.stdout
    data = json.loads(out_json.read_text())
    tiny = data["results"]["tiny"]
    assert set(tiny["decode_tokens_per_s"]) == {"static", "static_encrypted"}
    assert len(tiny["ratio_encrypted_to_static"]["values"]) == 1
    mem = tiny["memory"]["static_encrypted"]
    assert mem["arena_bytes"] > mem["plaintext_bytes"]      # ciphertext of every slot plus a tag each


@pytest.mark.slow
def test_static_report_steps_method_runs(tmp_path):
    out_json = tmp_path / "static.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/static_report.py", "--quick", "--method", "steps", "--out",
                           str(out_json)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method: steps" in proc.stdout and "| tiny |" in proc.stdout
    tiny = json.loads(out_json.read_text())["results"]["tiny"]
    assert tiny["method"] == "steps" and set(tiny["step_ms_median"]) == {"static", "static_encrypted"}
    assert len(tiny["ratio_encrypted_to_static"]["values"]) == 1
