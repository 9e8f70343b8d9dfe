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

Build and load (on first use; without a compiler or ipsec-mb: BackendUnavailableError, and CPU tensors get
the host backend instead): :mod:`pqc_kv_cache.backends.native_lib`.

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
import secrets
import struct
import threading
import weakref
from typing import Sequence

import numpy as np
import torch

from .._checks import check_int
from ..envelope import AAD_MAGIC, FORMAT_VERSION, KV_ROLES, dtype_code
from ..errors import BackendUnavailableError
from ..audit.records import RECORD_DTYPE
from .native_lib import _MAX_THREADS, BACKEND_ENV, THREADS_ENV, available, default_threads, host_backend_choice, \
    library_info, load, threads_from_env
from .base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot, check_cpu_kv
from .native_static import STATIC_ARGS, StaticSealArgs

__all__ = ["NativeBackend", "BACKEND_ENV", "THREADS_ENV", "load", "available", "library_info", "select_host_backend",
           "threads_from_env", "default_threads",
           "host_backend_choice"]

_PARALLEL_MIN_BYTES = 256 << 10   # below it a split costs more than it saves (benchmarks/native_report.py)
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

    # ---- a static cache's seal (beyond the contract) -----------------------------------
    def seal_static(self, keys: Sequence[KeySlot], layout: ChunkLayout, k: torch.Tensor, v: torch.Tensor,
                    io_index: torch.Tensor, positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor,
                    nonce_next: torch.Tensor, nonce_end: torch.Tensor, nonce_epoch: torch.Tensor,
                    records: torch.Tensor, record_head: torch.Tensor, failures: torch.Tensor, ring: bool,
                    row_sess: np.ndarray, row_key: np.ndarray, row_reason: np.ndarray,
                    record_slots: np.ndarray | None) -> None:
        """One layer step of a static cache's seal in one C call (``native/pqc_static.c`` says what it does):
        row ``r`` is sealed under ``keys[row_key[r]]`` with counters of session slot ``row_sess[r]``, or
        refused with ``row_reason[r]`` when ``row_key[r]`` is -1; ``record_slots`` ([session slots, 2]: the
        log's tenant and session index; None: no records) names the records. Tensors that do not fit:
        ValueError / TypeError before anything moves."""
        a = getattr(self._local, "static_args", None)
        if a is None:
            if self._lib.pqc_native_static_args() != STATIC_ARGS:
                raise BackendUnavailableError("native backend: the static seal's argument block does not match")
            a = self._local.static_args = StaticSealArgs()
        block, tens = a.fill(layout, k, v, io_index, positions, arena, meta, nonce_next, nonce_end, nonce_epoch,
                             records, record_head, failures, ring, row_sess, row_key, row_reason, record_slots)
        geom, prefix = self._geometry(layout, k.element_size())
        packed = self._enter(keys)
        try:
            rc = self._lib.pqc_native_static_seal(self._ring.ptr, prefix, packed, len(keys), geom, tens,
                                                  arena.data_ptr(), self._par, block.ctypes.data, a.err_ptr)
        finally:
            self._leave()
        if rc == _E_ARG:
            raise ValueError("the native static seal refused its arguments (a row's session slot or key index "
                             "out of range, or a record head outside the record buffer)")
        if rc != 0:
            self._raise(rc, a.err, keys, layout, "src", k)

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
