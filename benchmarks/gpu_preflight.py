"""GPU preflight: can this host compile and run a CUDA kernel through CuPy? About ten seconds.

Prints the versions (Python, torch and its CUDA, CuPy, transformers, numpy),
``nvidia-smi``'s device and driver and ``cupy.show_config()``, then compiles
and runs a trivial ``RawKernel`` (NVRTC, the way the CUDA backend builds its
kernels) and checks its result.

The probe runs in a child process, because CuPy reads ``CUDA_PATH`` when it
first compiles. If it fails with the environment as given — typically
"Failed to auto-detect CUDA root directory" on a host whose CUDA comes only
from pip wheels — it is retried with ``CUDA_PATH`` set to each CUDA root found
among the pip-installed ``nvidia/`` packages (a directory with ``include/`` and
a ``lib/libnvrtc.so*``; ``/usr/local/cuda*`` last), that root's ``lib`` first on
``LD_LIBRARY_PATH``. The first root that works is written as shell
``export`` lines to ``--env-file`` for the caller to source; if none works,
the preflight exits 1 with every attempt's error::

    python benchmarks/gpu_preflight.py --env-file out/preflight.env && . out/preflight.env
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

TRIVIAL_KERNEL = r"""
extern "C" __global__ void pqc_preflight_add(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + 1.0f;
}
"""


class PreflightError(RuntimeError):
    """No environment tried could compile and run the trivial kernel; ``attempts`` holds each try."""

    def __init__(self, message: str, attempts: "list[Attempt]"):
        super().__init__(message)
        self.attempts = attempts


@dataclass
class Attempt:
    label: str                  # "as given" or the CUDA root tried
    env: dict[str, str]         # the variables set on top of the inherited environment
    ok: bool = False
    output: str = ""


@dataclass
class Result:
    env: dict[str, str]          # what the caller must export (empty: nothing to change)
    attempts: list[Attempt] = field(default_factory=list)


# ------------------------------------------------------------------ finding CUDA roots

def _lib_dir(root: str) -> str | None:
    for sub in ("lib", "lib64"):
        if glob.glob(os.path.join(root, sub, "libnvrtc.so*")):
            return os.path.join(root, sub)
    return None


def is_cuda_root(root: str) -> bool:
    """A directory CuPy can use as CUDA_PATH: CUDA headers in include/ and libnvrtc in lib/ or lib64/."""
    inc = os.path.join(root, "include")
    has_headers = os.path.isfile(os.path.join(inc, "cuda_runtime.h")) or os.path.isfile(os.path.join(inc, "cuda.h"))
    return has_headers and _lib_dir(root) is not None


def site_dirs() -> list[str]:
    """Where pip puts packages for this interpreter: site-packages and sys.path entries, in order, no repeats."""
    dirs: list[str] = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:      # a virtualenv's old site module
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs += [p for p in sys.path if p]
    seen, out = set(), []
    for d in dirs:
        d = os.path.abspath(d)
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def candidate_roots(search_dirs: Iterable[str], system_roots: Sequence[str] = ()) -> list[str]:
    """CUDA roots to try, best first: each search dir's ``nvidia/cu<N>`` (newest N first; the layout of
    the CUDA 13 wheels), then its other ``nvidia/<pkg>`` directories that are roots on their own, then
    ``system_roots`` (e.g. /usr/local/cuda). Only directories that pass ``is_cuda_root``."""
    found: list[str] = []

    def add(p: str) -> None:
        p = os.path.abspath(p)
        if p not in found and is_cuda_root(p):
            found.append(p)

    for d in search_dirs:
        nv = os.path.join(d, "nvidia")
        if not os.path.isdir(nv):
            continue
        versioned = [p for p in glob.glob(os.path.join(nv, "cu[0-9]*")) if os.path.basename(p)[2:].isdigit()]
        for p in sorted(versioned, key=lambda p: int(os.path.basename(p)[2:]), reverse=True):
            add(p)
        for p in sorted(glob.glob(os.path.join(nv, "*"))):
            add(p)
    for p in system_roots:
        add(p)
    return found


def env_for_root(root: str, inherited: dict[str, str]) -> dict[str, str]:
    """The variables to set so that CuPy uses ``root``: CUDA_PATH, and its lib directory first on
    LD_LIBRARY_PATH (the inherited value kept after it)."""
    lib = _lib_dir(root) or os.path.join(root, "lib")
    old = inherited.get("LD_LIBRARY_PATH", "")
    return {"CUDA_PATH": root, "LD_LIBRARY_PATH": lib + (os.pathsep + old if old else "")}


# ------------------------------------------------------------------ the decision

Probe = Callable[[dict[str, str]], "tuple[bool, str]"]


def find_working_env(probe: Probe, roots: Sequence[str], inherited: dict[str, str]) -> Result:
    """Try the environment as given, then each root in order; return the first that works.

    ``probe(extra_env) -> (ok, output)`` runs the trivial kernel with ``extra_env`` set on top of the
    inherited environment. Raises PreflightError naming every attempt when none works."""
    attempts = [Attempt("as given", {})]
    attempts += [Attempt(f"CUDA_PATH={r}", env_for_root(r, inherited)) for r in roots]
    done: list[Attempt] = []
    for a in attempts:
        a.ok, a.output = probe(a.env)
        done.append(a)
        if a.ok:
            return Result(a.env, done)
    lines = [f"no environment could compile and run a trivial CUDA kernel with CuPy ({len(done)} tried):"]
    for a in done:
        tail = a.output.strip().splitlines()[-1:] or ["(no output)"]
        lines.append(f"  - {a.label}: {tail[0]}")
    if not roots:
        lines.append("  no CUDA root (include/ + lib/libnvrtc.so*) was found under site-packages/nvidia/ or "
                     "/usr/local/cuda*; install the CUDA wheels (e.g. nvidia-cuda-nvrtc) or set CUDA_PATH")
    raise PreflightError("\n".join(lines), done)


def shell_exports(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))


# ------------------------------------------------------------------ the probe (child process)

def _probe_main() -> int:
    """Child: print versions and CuPy's configuration, compile and run the trivial kernel; exit 0 if right."""
    import numpy as np
    import torch

    print(f"python {sys.version.split()[0]}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
          f"numpy {np.__version__}", flush=True)
    try:
        import transformers
        print(f"transformers {transformers.__version__}", flush=True)
    except ImportError as e:
        print(f"transformers: not importable ({e})", flush=True)
    if not torch.cuda.is_available():
        print("torch sees no CUDA device", flush=True)
        return 1
    print(f"torch device 0: {torch.cuda.get_device_name(0)}", flush=True)
    import cupy

    print(f"cupy {cupy.__version__}; CUDA_PATH={os.environ.get('CUDA_PATH', '(unset)')}", flush=True)
    try:
        cupy.show_config()
    except Exception as e:       # show_config probes optional libraries; its failure is not the verdict
        print(f"cupy.show_config() failed: {type(e).__name__}: {e}", flush=True)
    sys.stdout.flush()
    n = 1000
    kern = cupy.RawKernel(TRIVIAL_KERNEL, "pqc_preflight_add")
    x = cupy.arange(n, dtype=cupy.float32)
    y = cupy.zeros(n, dtype=cupy.float32)
    kern(((n + 255) // 256,), (256,), (x, y, np.int32(n)))
    cupy.cuda.Device().synchronize()
    if not bool((y == x + 1).all()):
        print("the trivial kernel ran but computed a wrong result", flush=True)
        return 1
    print("trivial RawKernel compiled (NVRTC) and ran: ok", flush=True)
    return 0


def subprocess_probe(timeout: float, deadline: float | None = None) -> Probe:
    """Each probe runs for at most ``timeout`` seconds and never past ``deadline`` (time.monotonic()): the
    preflight's overall limit bounds its attempts, whatever their number."""
    def probe(extra: dict[str, str]) -> tuple[bool, str]:
        env = dict(os.environ)
        env.update(extra)
        limit = timeout
        if deadline is not None:
            limit = min(timeout, deadline - time.monotonic())
            if limit <= 1:
                return False, "not tried: the preflight's overall time limit is spent"
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe"], env=env,
                               capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return False, out + f"\nprobe timed out after {limit:.0f} s"
        out = p.stdout + p.stderr
        return p.returncode == 0, out + ("" if p.returncode == 0 else f"\nprobe exit status {p.returncode}")
    return probe


def nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi: not found"
    try:
        p = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return "nvidia-smi: " + (p.stdout.strip() or p.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: failed ({e})"


def _print_attempts(attempts: Sequence[Attempt]) -> None:
    for a in attempts:
        print(f"--- attempt: {a.label} -> {'ok' if a.ok else 'failed'}\n{a.output.rstrip()}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--env-file", help="write the export lines of the environment that worked here")
    ap.add_argument("--probe-timeout", type=float, default=60.0, help="seconds per attempt (default 60)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole preflight: no attempt runs past it (default: no limit)")
    args = ap.parse_args(argv)
    deadline = None if args.budget is None else time.monotonic() + args.budget
    if args.probe:
        return _probe_main()
    print(nvidia_smi(), flush=True)
    roots = candidate_roots(site_dirs(), sorted(glob.glob("/usr/local/cuda*")))
    try:
        res = find_working_env(subprocess_probe(args.probe_timeout, deadline), roots, dict(os.environ))
    except PreflightError as e:
        _print_attempts(e.attempts)
        print(f"preflight FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    _print_attempts(res.attempts)
    if args.env_file:
        with open(args.env_file, "w") as f:
            f.write(shell_exports(res.env))
    print("preflight ok" + (f" with {res.attempts[-1].label}" if res.env else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
