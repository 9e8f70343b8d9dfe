"""Native code built on first use: one shared library per content, kept in the user's cache folder.

Used by the native host backend and by the kernels' host shim; the library's name carries a digest of its
sources and compiler command, so a changed source or flag builds anew and an unchanged one loads at once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from ..errors import BackendUnavailableError

__all__ = ["cache_dir", "compile_cached"]


def cache_dir() -> Path:
    """``$PQC_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqc_kv_cache``, else ``~/.cache/pqc_kv_cache``."""
    base = os.environ.get("PQC_KV_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pqc_kv_cache"


def compile_cached(stem: str, sources: bytes, command: Callable[[str], Sequence[str]], what: str,
                   hint: Callable[[str], str] = lambda stderr: "") -> Path:
    """The library ``<stem>-<digest>.so`` built by ``command(out_path)``; ``sources`` and the command
    itself make the digest. A failed build raises BackendUnavailableError naming ``what``, the exit code,
    ``hint(stderr)`` and the end of the compiler's output; a half-written library is never left behind."""
    probe = " ".join(command("OUT"))
    digest = hashlib.sha256(sources + b"\0" + probe.encode()).hexdigest()[:20]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{stem}-{digest}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(list(command(tmp)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendUnavailableError(f"building {what} failed (exit {proc.returncode}){hint(proc.stderr)}\n"
                                          f"{proc.stderr[-3000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib
