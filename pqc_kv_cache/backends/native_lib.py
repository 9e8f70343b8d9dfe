"""The native host backend's C library: built on first use, declared once to ctypes, loaded once.

Build: with the system C compiler (``$CC``, else ``cc`` / ``gcc``), linked with ``-lIPSec_MB``, into the
per-user cache directory (``$PQC_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqc_kv_cache``, else
``~/.cache/pqc_kv_cache``) under a name hashed from the source and flags. No compiler, no ipsec-mb
(Debian/Ubuntu: ``apt-get install libipsec-mb-dev``), or a failed build: BackendUnavailableError,
remembered (as text) and raised again. Also what the library runs on (``library_info``), the default
thread count (``PQC_KV_CACHE_NATIVE_THREADS``) and the choice of host path for CPU tensors
(``PQC_KV_CACHE_BACKEND``). The backend class over it is ``native.NativeBackend``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError
from ._build import compile_cached

__all__ = ["BACKEND_ENV", "THREADS_ENV", "load", "available", "library_info", "host_backend_choice",
           "threads_from_env", "default_threads"]

BACKEND_ENV = "PQC_KV_CACHE_BACKEND"
THREADS_ENV = "PQC_KV_CACHE_NATIVE_THREADS"
_MAX_THREADS = 64          # pqc_native.c's MAX_THREADS
# One thread unless asked for more: on the only machine measured so far (a 2-vCPU AMD EPYC VM) a layer
# split over 2 threads opened 1.2-1.35x faster while the other vCPU was idle but 5-10 % slower while it
# was busy, and the cache's decode showed no conclusive gain.
# Hosts with independent cores may gain; set PQC_KV_CACHE_NATIVE_THREADS (or threads=) there and measure.
_DEFAULT_THREADS = 1
_SOURCE = Path(__file__).resolve().parents[1] / "native" / "pqc_native.c"
_RECORDS_SOURCE = _SOURCE.with_name("pqc_records.c")     # the audit records of a call, written in C
_STATIC_SOURCE = _SOURCE.with_name("pqc_static.c")       # a static cache's seal of one layer step
_RECORD_HEADER = _SOURCE.with_name("pqc_record.h")       # the record layout both of those write
_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11", "-Wall")
_LIBS = ("-lIPSec_MB",)
_ABI = 4


# ipsec-mb's IMB_FEATURE_* bits (intel-ipsec-mb.h) and IMB_ARCH values, for `info`
_FEATURES = ("SHANI", "AESNI", "PCLMULQDQ", "CMOV", "SSE4_2", "AVX", "AVX2", "AVX512F", "AVX512DQ",
             "AVX512CD", "AVX512BW", "AVX512VL", "VAES", "VPCLMULQDQ", "SAFE_DATA", "SAFE_PARAM", "GFNI",
             "AVX512_IFMA", "BMI2", "AESNI_EMU", "SELF_TEST", "SELF_TEST_PASS")
_ARCHS = ("none", "no-aesni", "sse", "avx", "avx2", "avx512")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_load_error: str | None = None   # a failure, remembered as text: an exception would keep its traceback's
                                 # frames (and whatever they hold, e.g. a cache) alive
_threads: int | None = None      # the default thread count, read from the environment at load
_threads_from = ""               # where it came from: the variable's name or "default"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _build() -> Path:
    for src in (_SOURCE, _RECORDS_SOURCE, _STATIC_SOURCE, _RECORD_HEADER):
        if not src.is_file():
            raise BackendUnavailableError(f"native backend source not found: {src}")
    cc = _compiler()
    if not cc:
        raise BackendUnavailableError("no C compiler ($CC, cc or gcc) to build the native backend")
    return compile_cached(
        "pqc_native", b"\0".join(src.read_bytes()
                                  for src in (_SOURCE, _RECORDS_SOURCE, _STATIC_SOURCE, _RECORD_HEADER)),
        lambda out: [cc, *_FLAGS, str(_SOURCE), str(_RECORDS_SOURCE), str(_STATIC_SOURCE), "-o", out, *_LIBS],
        f"the native backend with {cc}",
        hint=lambda err: " (is libipsec-mb-dev installed?)" if "ipsec" in err.lower() else "")


_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    sig: dict[str, tuple[list[Any], Any]] = {
        "pqc_native_abi": ([], ctypes.c_int),
        "pqc_native_ready": ([], ctypes.c_int),
        "pqc_native_lib_version": ([], ctypes.c_char_p),
        "pqc_native_header_version": ([], ctypes.c_char_p),
        "pqc_native_lib_path": ([], ctypes.c_char_p),
        "pqc_native_features": ([], ctypes.c_uint64),
        "pqc_native_arch": ([], ctypes.c_int),
        "pqc_native_sched_size": ([], _I64),
        # (cap) -> ring
        "pqc_native_ring_new": ([_I64], _P),
        # (ring, idx, key32)
        "pqc_native_ring_set": ([_P, _I64, ctypes.c_char_p], ctypes.c_int),
        # (ring, idx or -1 for all)
        "pqc_native_ring_wipe": ([_P, _I64], None),
        "pqc_native_ring_nonzero": ([_P], _I64),
        "pqc_native_ring_free": ([_P], None),
        # (ring, prefix8, slots, nslots, geom, tensors, arena, arena_len, par, n, cols[7][n], err)
        "pqc_native_seal": ([_P, ctypes.c_char_p, ctypes.c_char_p, _I64, ctypes.c_char_p, ctypes.c_char_p,
                             _P, _I64, ctypes.c_char_p, _I64, _P, _P], ctypes.c_int),
        # (ring, prefix8, slots, nslots, geom, tensors, arena, arena_len, par, n, cols[7][n], status, err)
        "pqc_native_open": ([_P, ctypes.c_char_p, ctypes.c_char_p, _I64, ctypes.c_char_p, ctypes.c_char_p,
                             _P, _I64, ctypes.c_char_p, _I64, _P, _P, _P], ctypes.c_int),
        "pqc_native_pool_workers": ([], ctypes.c_int),
        "pqc_native_split_calls": ([], _I64),
    }
    # (seal, slots, nslots, layer, bpp, batch, n, slot, row, pos_start, pos_count, counter, status, out, cap,
    #  work, err) -> records written or a negative code
    sig["pqc_native_records"] = ([ctypes.c_int, ctypes.c_char_p, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P,
                                  _P, _P, _I64, _P, _P], _I64)
    sig["pqc_native_record_layout"] = ([_P, _I64], _I64)
    # (ring, prefix8, key slots, nkeys, geom, tensors, arena, par, int64 argument block, err): pqc_static.c
    sig["pqc_native_static_seal"] = ([_P, ctypes.c_char_p, ctypes.c_char_p, _I64, ctypes.c_char_p, ctypes.c_char_p,
                                      _P, ctypes.c_char_p, _P, _P], ctypes.c_int)
    sig["pqc_native_static_args"] = ([], _I64)
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


def threads_from_env(environ=None) -> int:
    """The default number of threads of a native call: ``PQC_KV_CACHE_NATIVE_THREADS`` when set (an
    integer in [1, 64], else ValueError), otherwise 1 (see ``_DEFAULT_THREADS``)."""
    raw = (os.environ if environ is None else environ).get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw, 10)
        except ValueError:
            n = 0
        if not 1 <= n <= _MAX_THREADS:
            raise ValueError(f"{THREADS_ENV} must be an integer in [1, {_MAX_THREADS}], got {raw!r}")
        return n
    return _DEFAULT_THREADS


def default_threads() -> int:
    """The thread count a NativeBackend gets without ``threads=`` (read from the environment at load)."""
    load()
    assert _threads is not None
    return _threads


def load() -> ctypes.CDLL:
    """The native library (built on first use); a failure is remembered and raised again. A bad
    ``PQC_KV_CACHE_NATIVE_THREADS`` raises ValueError (not remembered: the library is not loaded)."""
    global _lib, _lib_path, _load_error, _threads, _threads_from
    with _lock:
        if _lib is not None:
            return _lib
        if _load_error is not None:
            raise BackendUnavailableError(_load_error)
        threads = threads_from_env()
        source = THREADS_ENV if os.environ.get(THREADS_ENV, "").strip() else "default"
        try:
            path = _build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise BackendUnavailableError(f"cannot load the native backend {path}: {exc}") from None
            _declare(lib)
            if lib.pqc_native_abi() != _ABI:
                raise BackendUnavailableError("native backend ABI mismatch")
            if not lib.pqc_native_ready():
                raise BackendUnavailableError("ipsec-mb could not set up an AES-GCM manager on this CPU")
        except BackendUnavailableError as exc:
            _load_error = str(exc)
            raise
        _lib, _lib_path, _threads, _threads_from = lib, path, threads, source
        return lib


def available() -> bool:
    """True if the native backend builds and loads here."""
    try:
        load()
        return True
    except BackendUnavailableError:
        return False


def library_info() -> dict[str, Any]:
    """What the native path runs on: versions, library files, the CPU features ipsec-mb reports."""
    lib = load()
    feats = int(lib.pqc_native_features())
    arch = int(lib.pqc_native_arch())
    return {
        "ipsec_mb_version": lib.pqc_native_lib_version().decode(),
        "ipsec_mb_header_version": lib.pqc_native_header_version().decode(),
        "ipsec_mb_library": lib.pqc_native_lib_path().decode(),
        "native_module": str(_lib_path),
        "arch": _ARCHS[arch] if 0 <= arch < len(_ARCHS) else str(arch),
        "cpu_features": [n for i, n in enumerate(_FEATURES) if feats >> i & 1],
        "threads": default_threads(),
        "threads_from": _threads_from,
    }


def host_backend_choice() -> tuple[str, str]:
    """(backend name, why) for CPU tensors, honouring ``PQC_KV_CACHE_BACKEND``."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "auto", "host", "native"):
        raise ValueError(f"{BACKEND_ENV} must be 'host', 'native' or 'auto', got {forced!r}")
    if forced == "host":
        return "host", f"forced by {BACKEND_ENV}=host"
    try:
        load()
    except BackendUnavailableError as exc:
        if forced == "native":
            raise
        return "host", f"native backend unavailable: {str(exc).splitlines()[0]}"
    return "native", f"forced by {BACKEND_ENV}=native" if forced == "native" else "native backend available"
