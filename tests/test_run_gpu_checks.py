"""benchmarks/run_gpu_checks.sh stops loudly, with its own exit status, where the GPU checks cannot run:
no ML-KEM / ML-DSA (exit 3), or no CUDA kernel can be compiled and run (exit 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu_checks.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(tmp_path, extra_pythonpath=None):
    bindir = tmp_path / "bin"          # python3 is this interpreter
    bindir.mkdir(exist_ok=True)
    (bindir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PQC_WHEELS=str(tmp_path / "no-wheels"),
               PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    if extra_pythonpath:
        env["PYTHONPATH"] = str(extra_pythonpath)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env)


def test_without_ml_kem_the_checks_stop_before_running_anything(tmp_path):
    fake = tmp_path / "fake" / "cryptography"          # a cryptography without the post-quantum primitives
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '41.0.0'\n")
    p = _run(tmp_path, tmp_path / "fake")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "FATAL: ML-KEM-768 / ML-DSA-65 are not importable" in p.stdout
    assert "no wheels in" in p.stdout
    assert "=== preflight" not in p.stdout


def test_on_a_host_where_no_kernel_runs_the_preflight_stops_the_checks(tmp_path):
    p = _run(tmp_path)
    if p.returncode == 0:
        pytest.skip("this machine runs CUDA kernels")
    assert p.returncode == 4, p.stdout + p.stderr
    assert "ML-KEM-768 and ML-DSA-65: ok" in p.stdout
    assert "FATAL: no CUDA kernel can be compiled and run here" in p.stdout
    assert "preflight FAILED" in (tmp_path / "out" / "preflight.txt").read_text()
    assert "=== tests" not in p.stdout
