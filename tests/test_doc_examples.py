"""Every python example in README.md and docs/*.md runs, as written, twice in a row in the same folder.

A second run re-opens the audit log the first one wrote, which needs the signing
key it was written with: the examples keep it in a key file, and this checks
that they do.  A block preceded by ``<!-- fragment: why -->`` is a piece of a
larger program (or needs a GPU); it is only compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqc_kv_cache.audit import verify_log

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:^<!-- fragment: (?P<why>[^\n]*?) -->\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)
# a short list on purpose: a fragment is an example nobody can run as written
MAX_FRAGMENTS = 2


def _blocks():
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            out.append((f"{doc.relative_to(ROOT)}:{line}", m.group("code"), m.group("why")))
    return out


BLOCKS = _blocks()
RUNNABLE = [(name, code) for name, code, why in BLOCKS if why is None]


def test_the_documents_have_examples_and_few_fragments():
    assert len(RUNNABLE) >= 4
    fragments = [name for name, _, why in BLOCKS if why is not None]
    assert len(fragments) <= MAX_FRAGMENTS, fragments


@pytest.mark.parametrize("name,code,why", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_every_example_is_valid_python(name, code, why):
    compile(code, name, "exec")


@pytest.mark.slow
@pytest.mark.parametrize("name,code", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_example_runs_twice_in_the_same_folder(name, code, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(ROOT))
    for var in ("XDG_CONFIG_HOME", "PQC_KV_CACHE_KEY_DIR"):
        env.pop(var, None)
    for run in (1, 2):
        proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{name}, run {run}:\n{proc.stderr[-3000:]}"
    # whatever log the example wrote is intact after both runs, and no private key lies beside it
    for log in (p for p in work.rglob("*") if _head(p).startswith(b"PQCAUDIT")):
        rep = verify_log(log)
        assert rep.ok and rep.closed and rep.reopens == 1, (log.name, rep.error)
    assert not [p for p in work.rglob("*") if p.suffix == ".key" or b"PRIVATE KEY" in _head(p)]


def _head(p: Path) -> bytes:
    if not p.is_file():
        return b""
    with open(p, "rb") as f:
        return f.read(64)
