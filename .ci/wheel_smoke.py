"""Checks an installed (non-editable) pqc_kv_cache as its users get it; run by .ci/wheel_check.

Run from an empty folder outside the checkout, with the checkout's path as the only argument (to compare
the wheel with the tree and to read the README's example). Prints one line per check; exits non-zero on
the first failure.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(sys.argv[1]).resolve()


def check(ok: bool, what: str, detail: str = "") -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        print(detail, flush=True)
        sys.exit(1)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)


import pqc_kv_cache  # noqa: E402

installed = Path(pqc_kv_cache.__file__).resolve().parent
check(ROOT not in installed.parents and Path.cwd() not in installed.parents,
      f"pqc_kv_cache {pqc_kv_cache.__version__} is the installed copy ({installed})")

# every module of the tree is in the wheel, and every module of the wheel imports
tree = {".".join(("pqc_kv_cache", *p.relative_to(ROOT / "pqc_kv_cache").with_suffix("").parts))
        for p in (ROOT / "pqc_kv_cache").rglob("*.py") if "__pycache__" not in p.parts}
tree = {m.removesuffix(".__init__") for m in tree}
wheel = {"pqc_kv_cache"} | {m.name for m in pkgutil.walk_packages([str(installed)], "pqc_kv_cache.")}
check(tree - wheel == set(), f"the wheel holds every module of the tree ({len(tree)}; missing: {sorted(tree - wheel)})")
for name in ("native/pqc_native.c", "native/pqc_records.c", "native/pqc_static.c", "native/pqc_record.h", "py.typed",
             "kernels/pqc_kernels.cu",
             "kernels/pqc_audit_record.h"):
    check((installed / name).is_file(), f"the wheel holds {name}")
# the vLLM modules that need the `vllm` extra's packages are left out where those are not installed
VLLM_STACK = {"vllm", "starlette", "httpx", "uvicorn", "fastapi"}
skipped = []
for name in sorted(wheel):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not (name.startswith("pqc_kv_cache.vllm.") and (e.name or "").split(".")[0] in VLLM_STACK):
            raise
        skipped.append(f"{name} (needs {e.name})")
check(True, f"every module imports ({len(wheel) - len(skipped)} of {len(wheel)}"
            f"{'; without the vllm extra: ' + ', '.join(skipped) if skipped else ''})")

from pqc_kv_cache import EncryptedCache  # noqa: E402,F401

proc = run("-m", "pqc_kv_cache", "demo")
check(proc.returncode == 0, "python -m pqc_kv_cache demo", proc.stdout[-2000:] + proc.stderr[-3000:])
proc = run("-m", "pqc_kv_cache", "--help")
check(proc.returncode == 0 and "bench" not in proc.stdout, "the installed command line does not offer bench")

readme = (ROOT / "README.md").read_text(encoding="utf-8")
section = readme[readme.index("## Use it with transformers"):]
example = re.search(r"^```python\n(.*?)^```", section, re.M | re.S).group(1)
Path("readme_example.py").write_text(example, encoding="utf-8")
for turn in (1, 2):
    proc = run("readme_example.py")
    check(proc.returncode == 0, f"the README's transformers example, run {turn}", proc.stderr[-3000:])
proc = run("-m", "pqc_kv_cache", "audit", "verify", "audit.kvlog")
check(proc.returncode == 0, "audit verify audit.kvlog", proc.stdout + proc.stderr)
print(proc.stdout.strip())
print(f"wheel check passed ({os.getcwd()})")
