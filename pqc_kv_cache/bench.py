"""``python -m pqc_kv_cache bench``: run the benchmark reports of a source checkout.

The reports live in ``benchmarks/`` beside the package (they are not part of
the wheel, so an installed package's command line does not offer ``bench``);
each measures its baseline in the same run and prints a markdown table with
ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import KVCacheError

REPORTS = ("audit_report.py", "cache_report.py")


def checkout_benchmarks() -> Path | None:
    """The source checkout's ``benchmarks/`` folder this package runs from, or None (an installed wheel)."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return here if all((here / name).is_file() for name in REPORTS) else None


def benchmarks_dir() -> Path:
    here = checkout_benchmarks()
    if here is None:
        raise KVCacheError(f"the benchmark scripts are not installed with the package (looked in "
                           f"{Path(__file__).resolve().parent.parent / 'benchmarks'}): "
                           "run `bench` from a source checkout of pqc_kv_cache (make bench, or "
                           "python -m pqc_kv_cache bench in the checkout)")
    return here


def run_bench(quick: bool = False, out: str | None = None) -> int:
    bdir = benchmarks_dir()
    results = {}
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for script in REPORTS:
            json_path = os.path.join(tmp, script.replace(".py", ".json"))
            cmd = [sys.executable, str(bdir / script), "--out", json_path] + (["--quick"] if quick else [])
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.call(cmd)
            if rc != 0:
                print(f"{script} failed with exit code {rc}", file=sys.stderr)
                status = rc
                continue
            with open(json_path) as f:
                results[script] = json.load(f)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {out}")
    return status
