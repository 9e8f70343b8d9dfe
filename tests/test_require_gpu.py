"""PQC_REQUIRE_GPU=1 turns a skipped ``gpu``-marked test into a failure (tests/conftest.py).

Checked by running pytest on a small test file under this project's conftest, with and without the
switch: on a GPU host whose CuPy fails to import, the GPU checks must not report success."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

SAMPLE = '''
import pytest

no_device = pytest.mark.skipif(True, reason="needs a CUDA device and CuPy")


@pytest.mark.gpu
@no_device
def test_gpu_skipped_by_skipif():
    pass


@pytest.mark.gpu
def test_gpu_skipped_inside():
    pytest.skip("cupy failed to import")


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.gpu, no_device]), "twin"])
def env(request):
    return request.param


def test_param(env):
    pass


@pytest.mark.gpu
def test_gpu_that_runs():
    pass


@pytest.mark.skipif(True, reason="this machine has CUDA")
def test_plain_skip():
    pass
'''


def _run(tmp_path: Path, require: str | None):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "PQC_REQUIRE_GPU"}
    if require is not None:
        env["PQC_REQUIRE_GPU"] = require
    xml = tmp_path / "report.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}",
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    outcomes, messages = {}, []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        messages += [f"{c.get('message', '')}\n{c.text or ''}" for c in case if c.tag in ("failure", "error")]
        # a setup error after a call result is reported twice; the worst one counts
        outcomes[case.get("name")] = ("ERROR" if "error" in kinds else "FAILED" if "failure" in kinds
                                      else "SKIPPED" if "skipped" in kinds else "PASSED")
    return p.returncode, outcomes, p.stdout + "\n".join(messages)


def test_without_the_switch_gpu_tests_skip_and_the_run_passes(tmp_path):
    rc, out, text = _run(tmp_path, None)
    assert rc == 0, text
    assert out == {"test_gpu_skipped_by_skipif": "SKIPPED", "test_gpu_skipped_inside": "SKIPPED",
                   "test_param[cuda]": "SKIPPED", "test_param[twin]": "PASSED", "test_gpu_that_runs": "PASSED",
                   "test_plain_skip": "SKIPPED"}, text


@pytest.mark.parametrize("value", ["1", "yes"])
def test_with_the_switch_a_skipped_gpu_test_fails_the_run(tmp_path, value):
    rc, out, text = _run(tmp_path, value)
    assert rc == 1, text
    assert out["test_gpu_skipped_by_skipif"] in ("FAILED", "ERROR")      # skipif skips in setup: an ERROR
    assert out["test_gpu_skipped_inside"] == "FAILED"
    assert out["test_param[cuda]"] in ("FAILED", "ERROR")
    assert out["test_param[twin]"] == "PASSED" and out["test_gpu_that_runs"] == "PASSED"
    assert out["test_plain_skip"] == "SKIPPED"                          # not a GPU test: still a skip
    assert "PQC_REQUIRE_GPU=1: GPU test skipped (needs a CUDA device and CuPy)" in text
    assert "cupy failed to import" in text


def test_the_switch_set_to_zero_is_off(tmp_path):
    rc, out, text = _run(tmp_path, "0")
    assert rc == 0 and out["test_gpu_skipped_inside"] == "SKIPPED", text
