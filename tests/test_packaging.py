"""The wheel users install holds the whole package: every module, the C sources, the CUDA sources.

`make test` runs on an editable install, which finds every file of the tree whatever the
packaging says, so only a built wheel shows what `pip install pqc-kv-cache-encryption` gets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import pqc_kv_cache

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pqc_kv_cache"


def _tree_files() -> set[str]:
    """The files of the source tree a wheel must carry, as paths inside the wheel."""
    want = {f"pqc_kv_cache/{p.relative_to(PACKAGE).as_posix()}"
            for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".py", ".c", ".h", ".typed")
            and "__pycache__" not in p.parts}
    want |= {f"pqc_kv_cache/kernels/{p.name}" for p in (ROOT / "kernels").iterdir()
             if p.suffix in (".cu", ".cuh", ".h", ".cpp")}
    return want


def test_every_package_folder_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert folders - listed == set(), "package folders missing from [tool.setuptools] packages"


def test_the_distribution_is_the_earlier_packages_name_so_an_upgrade_replaces_it():
    # two distributions owning one import package would overwrite each other's files
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "pqc-kv-cache-encryption"


def test_the_version_is_above_the_earlier_package():
    # the earlier pure-Python library was 0.1.0: an upgrade must replace it
    parts = tuple(int(x) for x in pqc_kv_cache.__version__.split(".")[:3])
    assert parts > (0, 1, 0)


@pytest.mark.slow
def test_the_built_wheel_holds_every_file_of_the_package(tmp_path):
    # built from a copy: setuptools reuses a checkout's build/ folder, whose stale files would hide a miss
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(PACKAGE, src / "pqc_kv_cache", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("pqc_kv_cache_encryption-*.whl")
    assert wheel.name.startswith(f"pqc_kv_cache_encryption-{pqc_kv_cache.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if n.startswith("pqc_kv_cache/")}
    missing = _tree_files() - names
    assert missing == set(), f"the wheel lacks {sorted(missing)}"
