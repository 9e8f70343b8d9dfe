"""The GPU preflight's CUDA-root discovery and retry decision, on fake directory trees and fake probes.

The probe itself (CuPy compiling a RawKernel) needs a GPU; what a CPU can check is which roots are
found, in which order, what environment each retry sets, and that the run stops with every
attempt's error when nothing works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_preflight as pf  # noqa: E402


def _root(path: Path, *, headers=True, nvrtc=True, libdir="lib") -> Path:
    (path / "include").mkdir(parents=True, exist_ok=True)
    if headers:
        (path / "include" / "cuda_runtime.h").write_text("")
    (path / libdir).mkdir(parents=True, exist_ok=True)
    if nvrtc:
        (path / libdir / "libnvrtc.so.13").write_text("")
    return path


def test_a_root_needs_headers_and_libnvrtc(tmp_path):
    assert pf.is_cuda_root(str(_root(tmp_path / "good")))
    assert pf.is_cuda_root(str(_root(tmp_path / "lib64", libdir="lib64")))
    assert not pf.is_cuda_root(str(_root(tmp_path / "no_headers", headers=False)))
    assert not pf.is_cuda_root(str(_root(tmp_path / "no_nvrtc", nvrtc=False)))
    assert not pf.is_cuda_root(str(tmp_path / "missing"))


def test_candidates_prefer_the_newest_versioned_wheel_root_then_other_packages_then_system(tmp_path):
    sp1, sp2 = tmp_path / "sp1", tmp_path / "sp2"
    cu12 = _root(sp1 / "nvidia" / "cu12")
    cu13 = _root(sp1 / "nvidia" / "cu13")
    _root(sp1 / "nvidia" / "cublas", headers=False)                 # a library-only package: not a root
    runtime = _root(sp2 / "nvidia" / "cuda_runtime")               # the CUDA 12 split-wheel layout
    (sp2 / "nvidia" / "cuda_nvrtc" / "lib").mkdir(parents=True)
    system = _root(tmp_path / "usr_local_cuda")
    roots = pf.candidate_roots([str(sp1), str(sp2), str(tmp_path / "nothing")], [str(system), str(tmp_path / "x")])
    assert roots == [str(cu13), str(cu12), str(runtime), str(system)]


def test_candidates_are_listed_once(tmp_path):
    cu13 = _root(tmp_path / "sp" / "nvidia" / "cu13")
    roots = pf.candidate_roots([str(tmp_path / "sp"), str(tmp_path / "sp")], [str(cu13)])
    assert roots == [str(cu13)]


def test_env_for_a_root_sets_cuda_path_and_puts_its_lib_first(tmp_path):
    r = _root(tmp_path / "cu13")
    env = pf.env_for_root(str(r), {"LD_LIBRARY_PATH": "/opt/old"})
    assert env == {"CUDA_PATH": str(r), "LD_LIBRARY_PATH": f"{r / 'lib'}{os.pathsep}/opt/old"}
    assert pf.env_for_root(str(r), {})["LD_LIBRARY_PATH"] == str(r / "lib")
    r64 = _root(tmp_path / "cuda64", libdir="lib64")
    assert pf.env_for_root(str(r64), {})["LD_LIBRARY_PATH"] == str(r64 / "lib64")


class FakeProbe:
    """Succeeds only with the given CUDA_PATH (None: with the environment as given)."""

    def __init__(self, works_with):
        self.works_with = works_with
        self.calls = []

    def __call__(self, extra):
        self.calls.append(dict(extra))
        if extra.get("CUDA_PATH") == self.works_with:
            return True, "trivial RawKernel compiled (NVRTC) and ran: ok"
        return False, "RuntimeError: Failed to auto-detect CUDA root directory."


def test_the_environment_as_given_is_kept_when_it_works(tmp_path):
    probe = FakeProbe(None)
    res = pf.find_working_env(probe, [str(_root(tmp_path / "cu13"))], {})
    assert res.env == {} and probe.calls == [{}] and [a.ok for a in res.attempts] == [True]


def test_a_failed_probe_is_retried_with_each_root_until_one_works(tmp_path):
    a, b, c = (str(_root(tmp_path / n)) for n in ("a", "b", "c"))
    probe = FakeProbe(b)
    res = pf.find_working_env(probe, [a, b, c], {"LD_LIBRARY_PATH": "/x"})
    assert [call.get("CUDA_PATH") for call in probe.calls] == [None, a, b]      # c never tried
    assert res.env == {"CUDA_PATH": b, "LD_LIBRARY_PATH": f"{b}/lib{os.pathsep}/x"}
    assert [x.ok for x in res.attempts] == [False, False, True]
    assert pf.shell_exports(res.env) == f"export CUDA_PATH={b}\nexport LD_LIBRARY_PATH={b}/lib:/x\n"


def test_nothing_working_stops_with_every_attempt_named(tmp_path):
    a = str(_root(tmp_path / "a"))
    with pytest.raises(pf.PreflightError) as ei:
        pf.find_working_env(FakeProbe("elsewhere"), [a], {})
    msg = str(ei.value)
    assert "2 tried" in msg and "as given" in msg and f"CUDA_PATH={a}" in msg
    assert "Failed to auto-detect CUDA root directory" in msg
    assert [x.label for x in ei.value.attempts] == ["as given", f"CUDA_PATH={a}"]


def test_no_root_found_says_where_it_looked():
    with pytest.raises(pf.PreflightError, match="no CUDA root"):
        pf.find_working_env(FakeProbe("elsewhere"), [], {})


def test_the_script_on_a_host_without_cuda_fails_loudly_and_writes_no_env(tmp_path):
    env_file = tmp_path / "pre.env"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, pf.__file__, "--env-file", str(env_file), "--probe-timeout", "120"],
                       capture_output=True, text=True, timeout=300, env=env)
    if p.returncode == 0:
        pytest.skip("this machine can run CUDA kernels")
    assert p.returncode == 1
    assert "preflight FAILED" in p.stderr and "as given" in p.stderr
    assert "torch sees no CUDA device" in p.stdout or "cupy" in p.stdout.lower()
    assert not env_file.exists()


def test_no_probe_runs_past_the_preflights_overall_limit():
    import time

    probe = pf.subprocess_probe(25.0, deadline=time.monotonic() - 1)
    ok, out = probe({})
    assert not ok and "overall time limit" in out
