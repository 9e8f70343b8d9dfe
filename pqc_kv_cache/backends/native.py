"""Native host backend: the backend contract on CPU tensors in one C call per contract call.

``pqc_kv_cache/native/pqc_native.c`` seals or opens a whole layer's chunks per
call with Intel's ipsec-mb AES-256-GCM (its run-time dispatch picks SSE, AVX2,
AVX-512 or VAES code for the CPU). The C side checks every chunk (fields, key
slots, rows, positions, arena and tensor-storage bounds, strides) before any
byte moves, builds each chunk's nonce and AAD v1 from a per-slot template, and
streams every (K/V, head) run straight between the strided tensors and the
arena (no staging copy); a chunk whose tag fails (constant-time compare) has
its destination zeroed. The ciphertext is byte for byte what the host backend
(`cryptography`) writes, so either opens the other's chunks.

Build: on first use, with the system C compiler (``$CC``, else ``cc`` / ``gcc``),
linked with ``-lIPSec_MB``, into the per-user cache directory
(``$PQC_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqc_kv_cache``, else
``~/.cache/pqc_kv_cache``) under a name hashed from the source and flags. No
compiler, no ipsec-mb (Debian/Ubuntu: ``apt-get install libipsec-mb-dev``), or a
failed build: :class:`BackendUnavailableError`, and CPU tensors get the host
backend instead.

Selection for CPU tensors (:func:`select_host_backend`): native when it builds
and loads, else host. ``PQC_KV_CACHE_BACKEND=host`` or ``=native`` forces one
(``native`` raises when it is unavailable rather than falling back).

Threads: a call with at least :attr:`NativeBackend.parallel_min_bytes` of plaintext
(256 KiB) in two chunks or more is split by bytes over a pool of C worker threads
(pthreads, made on first need and kept; a forked child makes its own), the calling
thread working as one of them and returning when all are done; every check still
runs first, on the calling thread, and a call whose chunks could write the same
bytes stays on one thread. ``NativeBackend(threads=n)`` sets the number of threads
(the caller's included); the default is 1 (every call on the calling thread), or
``PQC_KV_CACHE_NATIVE_THREADS`` (an integer in [1, 64], read when the library loads;
any other value is refused with a ValueError). One is the default: on the only machine
measured (2 vCPUs) two threads gained only while the other vCPU was idle.

Key schedules are kept per key (looked up by a salted digest, never by the key
bytes) in memory the C side owns, and erased with ``explicit_bzero`` by
:meth:`NativeBackend.forget_keys`, :meth:`NativeBackend.close` and when the
backend is garbage-collected.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shutil
import struct
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .._checks import check_int
from ..envelope import AAD_MAGIC, FORMAT_VERSION, KV_ROLES, dtype_code
from ..errors import BackendUnavailableError
from ..audit.records import RECORD_DTYPE
from ._build import compile_cached
from .base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot, check_cpu_kv

__all__ = ["NativeBackend", "BACKEND_ENV", "THREADS_ENV", "load", "available", "library_info", "select_host_backend",
           "host_backend_choice"]

BACKEND_ENV = "PQC_KV_CACHE_BACKEND"
THREADS_ENV = "PQC_KV_CACHE_NATIVE_THREADS"
_MAX_THREADS = 64          # pqc_native.c's MAX_THREADS
# One thread unless asked for more: on the only machine measured so far (a 2-vCPU AMD EPYC VM) a layer
# split over 2 threads opened 1.2-1.35x faster while the other vCPU was idle but 5-10 % slower while it
# was busy, and the cache's decode showed no conclusive gain.
# Hosts with independent cores may gain; set PQC_KV_CACHE_NATIVE_THREADS (or threads=) there and measure.
_DEFAULT_THREADS = 1
_PARALLEL_MIN_BYTES = 256 << 10   # below it a split costs more than it saves (benchmarks/native_report.py)
_SOURCE = Path(__file__).resolve().parents[1] / "native" / "pqc_native.c"
_RECORDS_SOURCE = _SOURCE.with_name("pqc_records.c")     # the audit records of a call, written in C
_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11", "-Wall")
_LIBS = ("-lIPSec_MB",)
_ABI = 4
_RING_SLOTS = 256          # key schedules kept at once; a full ring is wiped and refilled
_FIELDS = ChunkTable.fields()
_SLOT_IN = struct.Struct("<16s16sqq")   # tenant tag, session tag, epoch, schedule index (pqc_native.c)
_TENS_COLS = 10
_RSLOT = struct.Struct("<IIq")     # per key slot for the record writer: tenant index, session index, epoch
_R_ARG, _R_CAP, _R_RANGE = -1, -2, -3   # pqc_records.c
_RECORD_FIELDS = ("layer", "row", "position", "position count", "epoch", "key slot", "nonce counter", "byte count")

# error codes of pqc_native.c
_E_INIT, _E_LAYOUT, _E_TENSOR, _E_EPOCH, _E_SCHED, _E_FIELD, _E_NOKEY, _E_ROW, _E_SEQ, _E_KEYLEN, \
    _E_ARENA, _E_STORAGE, _E_ARG, _E_NOMEM = range(-1, -15, -1)

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
    for src in (_SOURCE, _RECORDS_SOURCE):
        if not src.is_file():
            raise BackendUnavailableError(f"native backend source not found: {src}")
    cc = _compiler()
    if not cc:
        raise BackendUnavailableError("no C compiler ($CC, cc or gcc) to build the native backend")
    return compile_cached(
        "pqc_native", _SOURCE.read_bytes() + b"\0" + _RECORDS_SOURCE.read_bytes(),
        lambda out: [cc, *_FLAGS, str(_SOURCE), str(_RECORDS_SOURCE), "-o", out, *_LIBS],
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


def select_host_backend() -> CryptoBackend:
    """The process-wide backend for CPU tensors: native when available (or forced), else host."""
    name, _ = host_backend_choice()
    if name == "native":
        return NativeBackend.instance()
    from .host import HostBackend
    return HostBackend.instance()


def _tensor_desc(t: torch.Tensor) -> list[int]:
    """data pointer, bytes from it to the end of the storage, sizes, strides (pqc_native.c's layout)."""
    ptr = t.data_ptr()
    extent = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size() if ptr else 0
    return [ptr, extent, *t.shape, *t.stride()]


class _Scratch:
    """One thread's call buffers and their addresses (taken once: numpy's .ctypes costs ~1 us a call).
    The chunk table of a call of n chunks is ``table[:7 * n]``, its columns one after the other."""

    def __init__(self, cap: int, rcap: int):
        self.cap, self.rcap = cap, rcap
        self.table = np.zeros(len(_FIELDS) * cap, dtype=np.int64)
        self.table_ptr = self.table.ctypes.data
        self.status = np.zeros(cap, dtype=np.uint8)
        self.status_ptr = self.status.ctypes.data
        self.err = np.zeros(2, dtype=np.int64)
        self.err_ptr = self.err.ctypes.data
        self.work = np.zeros(rcap * 6, dtype=np.int64)        # the record writer's per-row scratch
        self.work_ptr = self.work.ctypes.data
        self.records = np.zeros(0, dtype=RECORD_DTYPE)          # grown by records()
        self.records_ptr = 0

    def record_room(self, n: int) -> None:
        if self.records.shape[0] < n:
            self.records = np.zeros(max(n, 2 * self.records.shape[0], 256), dtype=RECORD_DTYPE)
            self.records_ptr = self.records.ctypes.data


class _RingGuard:
    """The C key-schedule ring: freed (wiped first) by close() or when the backend is collected."""

    def __init__(self, lib: ctypes.CDLL, cap: int):
        self.lib = lib
        self.ptr = lib.pqc_native_ring_new(cap)
        if not self.ptr:
            raise BackendUnavailableError("the native backend could not allocate its key schedules")
        self._fin = weakref.finalize(self, lib.pqc_native_ring_free, self.ptr)

    def free(self) -> None:
        self._fin()


class NativeBackend(CryptoBackend):
    """The backend contract for CPU tensors, one ipsec-mb call per contract call."""

    name = "native"
    _instance: "NativeBackend | None" = None
    _instance_lock = threading.Lock()

    def __init__(self, ring_slots: int = _RING_SLOTS, threads: int | None = None):
        self._lib = load()
        if not isinstance(ring_slots, int) or not 1 <= ring_slots <= 1 << 16:
            raise ValueError(f"ring_slots must be an int in [1, 65536], got {ring_slots!r}")
        self._threads, self._min_bytes = 1, _PARALLEL_MIN_BYTES
        self.threads = default_threads() if threads is None else threads
        self._ring = _RingGuard(self._lib, ring_slots)
        self._cap = ring_slots
        self._salt = secrets.token_bytes(32)
        self._index: dict[bytes, int] = {}      # salted key digest -> schedule index
        # id(KeySlot) -> (weakref to it, ids of its key and tags, its epoch, its packed slot record): a key
        # seen before costs no digest. Holds no key bytes; cleared with the schedules.
        self._known: dict[int, tuple] = {}
        self._geom: dict[ChunkLayout, tuple[bytes, bytes]] = {}   # layout -> (geometry, first 8 AAD bytes)
        self._cond = threading.Condition(threading.Lock())
        self._calls = 0                         # calls in flight (they read schedules)
        self._wiping = False                    # a wipe waits for the calls in flight
        self._closed = False
        self._local = threading.local()

    @property
    def threads(self) -> int:
        """Threads of a large call, the caller's included (1: every call on the calling thread)."""
        return self._threads

    @threads.setter
    def threads(self, n: int) -> None:
        if type(n) is not int or not 1 <= n <= _MAX_THREADS:
            raise ValueError(f"threads must be an int in [1, {_MAX_THREADS}], got {n!r}")
        self._threads = n
        self._par = struct.pack("<2q", n, self._min_bytes)

    @property
    def parallel_min_bytes(self) -> int:
        """The fewest plaintext bytes a call needs to be split over the threads."""
        return self._min_bytes

    @parallel_min_bytes.setter
    def parallel_min_bytes(self, n: int) -> None:
        if type(n) is not int or not 0 <= n < 1 << 62:
            raise ValueError(f"parallel_min_bytes must be an int in [0, 2**62), got {n!r}")
        self._min_bytes = n
        self._par = struct.pack("<2q", self._threads, n)

    @classmethod
    def instance(cls) -> "NativeBackend":
        """The process-wide native backend (raises BackendUnavailableError when it cannot run here)."""
        with cls._instance_lock:
            if cls._instance is None or cls._instance._closed:
                cls._instance = cls()
            return cls._instance

    # ---- key schedules -----------------------------------------------------------------
    def _wipe_locked(self) -> None:
        """Erase every schedule; the caller holds the condition and no call is in flight."""
        self._lib.pqc_native_ring_wipe(self._ring.ptr, -1)
        self._index.clear()
        self._known.clear()

    def _wait_idle_locked(self) -> None:
        self._wiping = True
        try:
            self._cond.wait_for(lambda: self._calls == 0)
        finally:
            self._wiping = False
            self._cond.notify_all()

    def _enter(self, keys: Sequence[KeySlot]) -> bytes:
        """Make sure every key has a schedule, count the call in, and return the packed slot array."""
        known = self._known
        with self._cond:
            while self._wiping:
                self._cond.wait()
            if not self._closed:
                recs = []
                for k in keys:
                    e = known.get(id(k))
                    # the same KeySlot object, still holding the same (immutable) key, tags and epoch
                    if (e is None or e[0]() is not k or e[1] != id(k.key) or e[2] != id(k.tenant_tag)
                            or e[3] != id(k.session_tag) or e[4] is not k.epoch):
                        break
                    recs.append(e[5])
                else:
                    self._calls += 1
                    return recs[0] if len(recs) == 1 else b"".join(recs)
        return self._enter_slow(keys)

    def _enter_slow(self, keys: Sequence[KeySlot]) -> bytes:
        """_enter for keys not all known: check them, expand the missing schedules, remember the keys."""
        for k in keys:
            if not isinstance(k, KeySlot):
                raise TypeError(f"keys must be KeySlot objects, got {type(k).__name__}")
            if not isinstance(k.key, (bytes, bytearray)) or len(k.key) != 32:
                raise ValueError("a KeySlot key must be 32 bytes (AES-256)")
            if len(k.tenant_tag) != 16 or len(k.session_tag) != 16 or not isinstance(k.epoch, int):
                raise ValueError("a KeySlot needs a 32-bit epoch and 16-byte tenant and session tags")
        digests = [hashlib.blake2b(bytes(k.key), key=self._salt, digest_size=16).digest() for k in keys]
        with self._cond:
            if self._closed:
                raise BackendUnavailableError("this native backend was closed")
            while self._wiping:
                self._cond.wait()
            missing = [d for d in dict.fromkeys(digests) if d not in self._index]
            if len(self._index) + len(missing) > self._cap:
                if len(missing) > self._cap:
                    raise ValueError(f"a call may use at most {self._cap} distinct keys, got {len(missing)}")
                self._wait_idle_locked()
                self._wipe_locked()
                missing = list(dict.fromkeys(digests))
            for d in missing:
                idx = len(self._index)
                key = bytes(keys[digests.index(d)].key)
                if self._lib.pqc_native_ring_set(self._ring.ptr, idx, key) != 0:
                    raise BackendUnavailableError("the native backend could not expand a key")
                self._index[d] = idx
            recs = [_SLOT_IN.pack(k.tenant_tag, k.session_tag, max(-1, min(k.epoch, 1 << 62)), self._index[d])
                    for k, d in zip(keys, digests)]
            if len(self._known) > 4 * self._cap:    # stale entries (their KeySlots gone) dropped now and then
                self._known.clear()
            for k, rec in zip(keys, recs):
                # only immutable fields: a bytearray key could change under a remembered schedule
                if (type(k.key) is bytes and type(k.tenant_tag) is bytes and type(k.session_tag) is bytes
                        and type(k.epoch) is int):
                    try:
                        ref = weakref.ref(k)
                    except TypeError:
                        continue
                    self._known[id(k)] = (ref, id(k.key), id(k.tenant_tag), id(k.session_tag), k.epoch, rec)
            self._calls += 1
        return b"".join(recs)

    def _leave(self) -> None:
        with self._cond:
            self._calls -= 1
            if self._wiping and self._calls == 0:
                self._cond.notify_all()

    def forget_keys(self) -> None:
        """Erase every key schedule this backend keeps (waits for calls in flight to finish)."""
        with self._cond:
            if self._closed:
                return
            self._wait_idle_locked()
            self._wipe_locked()

    def close(self) -> None:
        """Erase the key schedules and free them; the backend cannot be used afterwards."""
        with self._cond:
            if self._closed:
                return
            self._wait_idle_locked()
            self._index.clear()
            self._known.clear()
            self._ring.free()
            self._closed = True

    def schedule_bytes_left(self) -> int:
        """Non-zero bytes left in the key-schedule memory (0 after forget_keys); for tests."""
        with self._cond:
            if self._closed:
                return 0
            return int(self._lib.pqc_native_ring_nonzero(self._ring.ptr))

    # ---- checks at the door (types here; every range in C) -----------------------------
    @staticmethod
    def _check_types(layout: ChunkLayout, arena: torch.Tensor, name: str, k: torch.Tensor, v: torch.Tensor,
                     chunks: ChunkTable) -> None:
        if not isinstance(layout, ChunkLayout):
            raise TypeError(f"layout must be a ChunkLayout, got {type(layout).__name__}")
        if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
            raise TypeError("arena must be a 1-D uint8 tensor")
        if not arena.is_cpu or not arena.is_contiguous():
            raise ValueError("the native backend needs a contiguous CPU arena")
        check_cpu_kv(name, k, v, layout, "native")
        if not isinstance(chunks, ChunkTable):
            raise TypeError(f"chunks must be a ChunkTable, got {type(chunks).__name__}")

    @staticmethod
    def _raise(rc: int, err: np.ndarray, keys, layout: ChunkLayout, name: str, k: torch.Tensor) -> None:
        i, x = int(err[0]), int(err[1])
        if rc == _E_LAYOUT:
            raise ValueError(f"bad chunk layout {layout}")
        if rc == _E_TENSOR:
            raise ValueError(f"{'kv'[i] if i in (0, 1) else 'k'}_{name} has sizes or strides the native "
                             "backend cannot use")
        if rc == _E_EPOCH:
            raise ValueError("a KeySlot needs a 32-bit epoch and 16-byte tenant and session tags")
        if rc == _E_FIELD:
            f = ChunkTable.fields()[x]
            raise ValueError(f"chunk field {f} must be >= {1 if f == 'pos_count' else 0}")
        if rc == _E_NOKEY:
            raise ValueError(f"chunk slot {x} has no key (only {len(keys)} given)")
        if rc == _E_ROW:
            raise ValueError(f"chunk row {x} outside the batch of {k.shape[0]}")
        if rc == _E_SEQ:
            raise ValueError(f"a chunk reaches past the {k.shape[2]} positions of the tensors")
        if rc == _E_KEYLEN:
            raise ValueError("a chunk's K length does not fit the 32-bit AAD field: use smaller chunks")
        if rc == _E_ARENA:
            raise ValueError("a chunk reaches past the end of the arena")
        if rc == _E_STORAGE:
            raise ValueError(f"chunk {i} reaches outside the storage of {'kv'[x]}_{name}")
        if rc == _E_NOMEM:
            raise MemoryError("the native backend could not allocate a call's AAD templates")
        raise BackendUnavailableError(f"the native backend refused a call (code {rc})")

    def _scratch(self, n: int, rows: int) -> "_Scratch":
        """This thread's reusable call buffers (table, status, error, record-writer scratch), grown on demand."""
        sc = getattr(self._local, "scratch", None)
        if sc is None or sc.cap < n or sc.rcap < rows:
            sc = self._local.scratch = _Scratch(max(n, 2 * sc.cap if sc else 64), max(rows, sc.rcap if sc else 8))
        return sc

    def _load_table(self, chunks: ChunkTable, batch: int) -> tuple[int, "_Scratch"]:
        """Copy the chunk table's columns into this thread's int64 scratch (any integer dtype; a value
        that does not fit int64 turns negative, which the C side refuses)."""
        cols = [chunks.slot, chunks.row, chunks.pos_start, chunks.pos_count, chunks.io_start, chunks.counter,
                chunks.offset]
        a = cols[0]
        n = a.shape[0] if type(a) is np.ndarray else -1
        for a in cols:   # the usual table: numpy integer columns of one length, copied in one go
            if type(a) is not np.ndarray or a.ndim != 1 or a.shape[0] != n or a.dtype.kind not in "iu":
                return self._load_table_checked(cols, batch)
        sc = self._scratch(n, batch)
        np.concatenate(cols, out=sc.table[:len(_FIELDS) * n], casting="unsafe")
        return n, sc

    def _load_table_checked(self, cols: list, batch: int) -> tuple[int, "_Scratch"]:
        """_load_table for columns of any kind: each converted and checked, with the error naming it."""
        arrays: list[np.ndarray] = []
        for f, a in zip(_FIELDS, cols):
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu().numpy()
            elif type(a) is not np.ndarray:
                a = np.asarray(a)
            if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
                raise TypeError(f"chunk field {f} must be a 1-D integer array, got {a.ndim}-D {a.dtype}")
            if arrays and a.shape[0] != arrays[0].shape[0]:
                raise ValueError(f"chunk fields differ in length: {f} has {a.shape[0]}, slot has "
                                 f"{arrays[0].shape[0]}")
            arrays.append(a)
        n = arrays[0].shape[0]
        sc = self._scratch(n, batch)
        for i, a in enumerate(arrays):
            sc.table[i * n:(i + 1) * n] = a
        return n, sc

    def _geometry(self, layout: ChunkLayout, itemsize: int) -> tuple[bytes, bytes]:
        """(layer, heads, head_dim, itemsize as int64[4], the first 8 AAD bytes) of a layout, kept per layout."""
        if type(layout.layer_idx) is int and type(layout.num_heads) is int and type(layout.head_dim) is int:
            got = self._geom.get(layout)
            if got is not None:
                return got
            cache = True
        else:   # numpy or torch integers: checked each time (a bool is refused), not kept
            cache = False
        try:
            ints = [check_int(f"layout.{f}", getattr(layout, f)) for f in ("layer_idx", "num_heads", "head_dim")]
        except TypeError:
            raise ValueError(f"bad chunk layout {layout}") from None
        geom = struct.pack("<4q", *(max(-1, min(x, 1 << 62)) for x in ints), itemsize)
        prefix = AAD_MAGIC + bytes((FORMAT_VERSION, KV_ROLES["both"], dtype_code(layout.dtype), 0))
        if cache:
            if len(self._geom) >= 1024:
                self._geom.clear()
            self._geom[layout] = (geom, prefix)
        return geom, prefix

    def _call(self, seal: bool, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
              arena: torch.Tensor, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[int, np.ndarray | None]:
        """One C call; returns the number of chunks (their table stays in this thread's scratch for
        ``_emit_records``) and, when opening, the status of each chunk."""
        self._check_types(layout, arena, name, k, v, chunks)
        batch = k.shape[0]
        n, sc = self._load_table(chunks, batch)
        geom, prefix = self._geometry(layout, k.element_size())
        tens = struct.pack(f"<{2 * _TENS_COLS}q", *_tensor_desc(k), *_tensor_desc(v))
        packed = self._enter(keys)
        try:
            common = (self._ring.ptr, prefix, packed, len(keys), geom, tens, arena.data_ptr() or None,
                      arena.numel(), self._par, n, sc.table_ptr)
            if seal:
                rc = self._lib.pqc_native_seal(*common, sc.err_ptr)
            else:
                rc = self._lib.pqc_native_open(*common, sc.status_ptr, sc.err_ptr)
        finally:
            self._leave()
        if rc != 0:
            self._raise(rc, sc.err, keys, layout, name, k)
        return n, (None if seal else sc.status[:n].copy())

    # ---- the contract ------------------------------------------------------------------
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        n, _ = self._call(True, keys, layout, chunks, arena, "src", k_src, v_src)
        if audit is not None:
            self._emit_records(True, keys, layout, audit, n, k_src.shape[0])

    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None, *, owner: object = None) -> DecryptStatus:
        """See :meth:`CryptoBackend.decrypt_chunks`; the status is on the host (failures known at return)."""
        n, status = self._call(False, keys, layout, chunks, arena, "out", k_out, v_out)
        if audit is not None and n:
            self._emit_records(False, keys, layout, audit, n, k_out.shape[0])
        return DecryptStatus(host=status)

    def _emit_records(self, seal: bool, keys: Sequence[KeySlot], layout: ChunkLayout, audit: AuditContext,
                      m: int, batch: int) -> None:
        """The ENCRYPT (``seal``) or DECRYPT records of the call just made on this thread, written by C from
        the call's table (``m`` chunks) and statuses still in this thread's scratch, emitted in one piece."""
        sc: _Scratch = self._local.scratch
        n = len(keys)
        if audit.tenant_idx.shape[0] < n or audit.session_idx.shape[0] < n:
            raise ValueError(f"the audit context names {audit.tenant_idx.shape[0]} key slots; the call has {n}")
        epochs = tuple(k.epoch for k in keys)
        slots = audit.templates.get(("native slots", epochs), lambda: b"".join(
            _RSLOT.pack(int(t), int(s), max(-1, min(e, 1 << 62)))
            for t, s, e in zip(audit.tenant_idx[:n].tolist(), audit.session_idx[:n].tolist(), epochs)))
        cols = [sc.table_ptr + 8 * i * m for i in range(len(_FIELDS))]     # table[:7 * m], column after column
        while True:
            w = self._lib.pqc_native_records(int(seal), slots, n, layout.layer_idx, layout.bytes_per_position,
                                            batch, m, cols[0], cols[1], cols[2], cols[3], cols[5],
                                            None if seal else sc.status_ptr, sc.records_ptr or None,
                                            sc.records.shape[0], sc.work_ptr, sc.err_ptr)
            if w != _R_CAP:
                break
            sc.record_room(int(sc.err[0]))
        if w < 0:
            i, f = int(sc.err[0]), int(sc.err[1])
            if w == _R_RANGE:
                raise ValueError(f"chunk {i}'s {_RECORD_FIELDS[f]} does not fit its audit record field")
            raise BackendUnavailableError(f"the native backend could not write the audit records (code {w})")
        audit.log.emit_records(sc.records[:w])
