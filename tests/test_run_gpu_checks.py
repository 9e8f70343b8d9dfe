"""benchmarks/run_gpu_checks.sh stops loudly, with its own exit status, where the GPU checks cannot run:
no ML-KEM / ML-DSA (exit 3), or no CUDA kernel can be compiled and run (exit 4)."""

from __future__ import annotations

import os
import re
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


def _script_text() -> str:
    return SCRIPT.read_text()


def test_the_test_step_runs_every_file_with_gpu_tests_and_only_gpu_marked_tests():
    """The test step's file list is every test file with a ``gpu``-marked test (the meta-tests of the
    PQC_REQUIRE_GPU switch aside), selected with ``-m gpu``, verbose, with a faulthandler timeout."""
    text = _script_text()
    step = text[text.index('step "tests"'):text.index('step "host"')]
    listed = set(re.findall(r"tests/[\w/]+\.py", step))
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu|marks=\[?pytest\.mark\.gpu", p.read_text())}
    assert listed == marked - {"tests/test_require_gpu.py"}
    assert re.search(r"pytest -v -m gpu .*-o faulthandler_timeout=\d+", step)
    for name in listed:   # every audit flush in them is bounded
        assert not re.search(r"\.flush\(\s*\)", (ROOT / name).read_text()), name


def test_the_results_are_at_most_eight_files_and_the_suite_fits_its_step():
    text = _script_text()
    names = set(re.findall(r'"\$out/([\w.]+)"', text))
    assert "preflight.env" not in names                    # kept in a temporary folder
    assert "gpu_suite.json" in names
    assert len(names | {"gpu_suite.md"}) <= 8, sorted(names)
    limit, budget = map(int, re.search(r"timeout (\d+) python3 benchmarks/gpu_suite.py --budget (\d+)",
                                       text).groups())
    assert budget < limit
    pre = re.search(r"timeout (\d+) python3 benchmarks/gpu_preflight.py .*--probe-timeout (\d+) --budget (\d+)",
                    text)
    step_limit, probe, pre_budget = map(int, pre.groups())
    assert probe <= pre_budget < step_limit


def test_the_commit_step_records_the_id_of_a_copied_tree_and_a_digest_of_its_sources(tmp_path):
    """A copy of the tree without .git: the commit id comes from .commit-id, and the sources' digest is the
    same as the one the same command gives here."""
    tree = tmp_path / "tree"
    for part in ("pqc_kv_cache", "kernels", "benchmarks", "tests"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / ".commit-id").write_text("0123abcd\n")
    fake = tmp_path / "fake" / "cryptography"     # stop right after the commit step (exit 3)
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '41.0.0'\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PQC_WHEELS=str(tmp_path / "no-wheels"),
               PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(tmp_path / "fake"),
               GIT_CEILING_DIRECTORIES=str(tmp_path))
    p = subprocess.run(["bash", str(tree / "benchmarks" / "run_gpu_checks.sh")], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 3, p.stdout + p.stderr
    first, digest = (tmp_path / "out" / "commit.txt").read_text().splitlines()
    assert first == "0123abcd"
    here = subprocess.run(
        "find pqc_kv_cache kernels benchmarks tests -type f \\( -name '*.py' -o -name '*.cu' -o -name '*.cuh' "
        "-o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \\) -not -path '*/__pycache__/*' | LC_ALL=C sort "
        "| xargs sha256sum | sha256sum | cut -d' ' -f1", shell=True, cwd=tree, capture_output=True, text=True)
    assert digest == f"sources sha256 {here.stdout.strip()}"
