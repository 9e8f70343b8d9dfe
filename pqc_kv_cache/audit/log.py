"""KVAuditLog: batched audit records, an asynchronous drain, a queryable columnar log.

Emitters (the hot path, any thread) write batches of packed records into the
host ring (or, on a GPU, into a CUDA ring); record numbers are global and
dense, handed out per batch under one lock.  A background drain thread moves
the records, in record-number order, into the in-memory columnar store and to
the persistent sink, and reports failures and isolation violations to Python
``logging``.  Query methods build ``KVAuditEntry`` objects only for what they
return.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as _dt
import heapq
import json
import logging
import numbers
import threading
import time
import weakref

import numpy as np

from ..errors import AuditError, DecryptionError, KVCacheError
from .records import NONE16, OP_NAMES, RECORD_DTYPE, Op, Status, op_from_name
from .keys import SigningKey
from .ring import FIELD_LIMITS, VALUE_FIELDS, HostRing, field_int
from .sink import AuditSink
from .store import ColumnarStore

__all__ = ["KVAuditLog", "KVAuditEntry"]

_LIMITS = tuple(FIELD_LIMITS[name] for name in VALUE_FIELDS)
_ITEMSIZE = tuple(RECORD_DTYPE[name].itemsize for name in VALUE_FIELDS)
_I_POS_START = VALUE_FIELDS.index("pos_start")
_I_POS_COUNT = VALUE_FIELDS.index("pos_count")
_I_NBYTES = VALUE_FIELDS.index("nbytes")
_I_STATUS = VALUE_FIELDS.index("status")
# emit_per_position expands up to this many records at once; more are expanded piece by piece
_EXPAND_AT_ONCE = 1 << 20
_VALID_OPS = frozenset(int(o) for o in Op)
# (array dtype, field index) -> whether its values need a range check (signed, or wider than the field)
_RANGE_CHECK: dict = {}


_OPEN_LOGS: "weakref.WeakSet[KVAuditLog]" = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    """A normal interpreter exit closes (drains, signs, seals) every log still open."""
    for log in list(_OPEN_LOGS):
        try:
            log.close(timeout=10.0)
        except Exception:   # exit must go on; verify will report the log as unclosed
            pass


def _drain_main(ref) -> None:
    log = None
    try:
        while True:
            log = ref()
            if log is None or not log._drain_once():
                return
            log = None
    except BaseException as e:   # a bug outside _drain_once's guarded part: fail the log, never hang it
        log = ref()
        if log is not None:
            log._drain_died(e)
    finally:
        log = ref()
        if log is not None:
            log._wake_all()
        log = None


def _iso(ns: int) -> str:
    """ISO-8601 UTC, as the earlier library wrote it (datetime.isoformat with +00:00)."""
    return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat()


@dataclasses.dataclass
class KVAuditEntry:
    """One audit record as the query API returns it.

    The first nine fields, their order and defaults are those of the pure-Python
    "PQC KV Cache Encryption" 0.1.0 of the same package name; ``timestamp`` is
    ISO-8601 UTC. The rest are this log's extensions.
    """

    timestamp: str
    operation: str
    tenant_id: str
    session_id: str
    layer_idx: int = -1
    position: int = -1
    sequence_number: int = -1
    success: bool = True
    details: str = ""
    record_number: int = -1
    position_count: int = 0
    row: int | None = None
    epoch: int = 0
    nbytes: int = 0
    status: int = 0
    device_timestamp_ns: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _one_seq(seq, sequence_number) -> int:
    """The sequence number given as ``seq`` (positional or keyword) or as ``sequence_number=``."""
    if sequence_number is None:
        return seq
    if seq != 0:
        raise TypeError("give the sequence number once: seq or sequence_number, not both")
    return sequence_number


# What the file format can hold: ids have a u16 length, details a u32 one (bounded far lower here).
_ID_MAX_BYTES = 0xFFFF
_DETAILS_MAX_BYTES = 1 << 20


def _check_text(name: str, text, max_bytes: int) -> None:
    """Refuse, at the call, a string the persisted log could not hold (it would fail the log for everyone)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if len(text) > max_bytes:
        raise ValueError(f"{name} is {len(text)} characters long; at most {max_bytes} UTF-8 bytes are allowed")
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text ({e.reason} at index {e.start})") from None
    if n > max_bytes:
        raise ValueError(f"{name} is {n} UTF-8 bytes long; at most {max_bytes} are allowed")


def _since_ns(since) -> int:
    if isinstance(since, bool):
        raise TypeError("since must be a datetime, an ISO-8601 string or nanoseconds since the epoch")
    if isinstance(since, int):
        return since
    if isinstance(since, float):
        if since != since:
            raise ValueError("since=nan is not a time")
        if since in (float("inf"), float("-inf")):
            return 0 if since < 0 else 1 << 64      # before / after every record
        return int(since * 1e9)
    if isinstance(since, str):
        try:
            since = _dt.datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(f"since={since!r} is not an ISO-8601 timestamp") from None
    if isinstance(since, _dt.datetime):
        if since.tzinfo is None:
            since = since.replace(tzinfo=_dt.timezone.utc)
        return int(since.timestamp() * 1e9)
    raise TypeError("since must be a datetime, an ISO-8601 string or nanoseconds since the epoch")


class KVAuditLog:
    """Audit log of KV-cache accesses: host ring -> drain thread -> columnar store (+ signed file).

    ``path``: persist every record to this file (format in docs/audit.md); an
    existing file is verified and continued, which needs its ``signing_key``.
    ``max_entries``: records kept in memory (older ones stay in the file); an int
    given as the only positional argument is taken as ``max_entries``.
    ``ring_records``: host ring capacity; a full ring makes emitters wait.
    ``signing_key``: ML-DSA-65 private key, its 32-byte seed, or the path of a
    key file (created, mode 0600, when the log is new and the file missing;
    see ``pqc_kv_cache.audit.keys``); when None a key is generated and not kept,
    so the log cannot be continued later.
    Keyword-only extras: ``clock`` (ns since the epoch, injectable for tests),
    ``checkpoint_records`` and ``frame_records`` (file layout),
    ``fsync`` (fsync at flush/close), ``drain_interval`` (seconds the idle drain
    thread waits before picking up a partly filled ring).
    """

    def __init__(self, path=None, max_entries: int = 1_000_000, ring_records: int = 65536,
                 signing_key: SigningKey | None = None, logger="pqc_kv_cache.audit", *, clock=time.time_ns,
                 checkpoint_records: int = 65536, frame_records: int = 16384, fsync: bool = True,
                 drain_interval: float = 0.05):
        if isinstance(path, numbers.Integral) and not isinstance(path, (bool, np.bool_)):
            if max_entries != 1_000_000:
                raise TypeError(f"path must be a file path, got the int {path!r}")
            path, max_entries = None, path     # KVAuditLog(1000): max_entries as the first positional
        for name, v in (("max_entries", max_entries), ("ring_records", ring_records),
                        ("checkpoint_records", checkpoint_records), ("frame_records", frame_records)):
            if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a positive int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be a positive int, got {v}")
        if not isinstance(drain_interval, numbers.Real) or isinstance(drain_interval, (bool, np.bool_)):
            raise TypeError(f"drain_interval must be a positive number of seconds, "
                            f"got {type(drain_interval).__name__}")
        if not 0 < drain_interval < float("inf"):
            raise ValueError(f"drain_interval must be a positive number of seconds, got {drain_interval!r}")
        drain_interval = float(drain_interval)
        max_entries, ring_records = int(max_entries), int(ring_records)
        checkpoint_records, frame_records = int(checkpoint_records), int(frame_records)
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)   # emitters wait here for ring room
        self._work = threading.Condition(self._lock)    # the drain thread waits here for work
        self._done = threading.Condition(self._lock)    # flush waits here for the drain
        self._store_lock = threading.Lock()              # queries vs. the drain's appends
        self._ring = HostRing(ring_records)
        self._store = ColumnarStore(max_entries)
        self._clock = clock
        self._logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
        self._drain_interval = drain_interval
        self._wake_at = max(1, ring_records // 4)

        self._tenant_ids: list[str] = []
        self._tenant_idx: dict[str, int] = {}
        self._sessions: list[tuple[int, str]] = []
        self._session_idx: dict[tuple[int, str], int] = {}
        self._tables_pending: list[tuple[int, int, int, str]] = []
        self._details: dict[int, str] = {}
        self._details_pending: dict[int, str] = {}

        self._next_no = 0
        self._emitted = 0
        self._stalls = 0
        self._delivered = 0          # every record below this number is in the store (and sink)
        self._persisted = 0          # ... and flushed to disk
        self._flush_target = 0
        self._reorder: list = []     # heap of (first_no, records) that arrived ahead of their turn
        self._cuda_rings: dict = {}
        self._cuda_waiting = False
        self._error: BaseException | None = None
        self._closed = False
        self._stopping = False
        self._abandon = False
        self._want_delivered = 0     # a query waits until the store holds everything before this
        self._drain_idle = False
        self._drain_busy_ns = 0
        self._drained = 0
        self._failures = 0           # drained records with status != OK
        # device-written DECRYPT records that failed authentication and that no flush() has raised yet:
        # on a GPU the hot path cannot raise, so flush() is one of the sync points that does (DESIGN §3)
        self._device_auth_failures: list[np.void] = []
        self._device_fail_lock = threading.Lock()
        self._violations = 0         # drained isolation-violation records

        self._sink = None
        if path is not None:
            self._sink = AuditSink(path, signing_key, checkpoint_records=checkpoint_records,
                                   frame_records=frame_records, fsync=fsync, clock=clock)
            for idx in sorted(self._sink.tenants):
                self._tenant_idx[self._sink.tenants[idx]] = idx
                self._tenant_ids.append(self._sink.tenants[idx])
            for idx in sorted(self._sink.sessions):
                tidx, sid = self._sink.sessions[idx]
                self._session_idx[(tidx, sid)] = idx
                self._sessions.append((tidx, sid))
            if self._tenant_ids != [self._sink.tenants[i] for i in range(len(self._tenant_ids))] or \
                    len(self._sessions) != len(self._sink.sessions):
                raise AuditError(f"{path}: tenant/session tables of the log are not dense")
            self._next_no = self._delivered = self._persisted = self._flush_target = self._sink.next_no
            self._store.reset_base(self._sink.next_no)
        elif signing_key is not None:
            raise ValueError("signing_key without path: only a persisted log is signed")

        # The thread holds the log weakly: a log dropped without close() stops its thread.
        self._thread = threading.Thread(target=_drain_main, args=(weakref.ref(self),),
                                        name="pqc-kv-audit-drain", daemon=True)
        self._thread.start()
        _OPEN_LOGS.add(self)

    # -- tables -------------------------------------------------------------------
    def tenant_index(self, tenant_id: str) -> int:
        """Index of ``tenant_id`` in the tenant table (registered on first use)."""
        i = self._tenant_idx.get(tenant_id)
        if i is not None:
            return i
        _check_text("tenant_id", tenant_id, _ID_MAX_BYTES)
        with self._lock:
            i = self._tenant_idx.get(tenant_id)
            if i is None:
                i = len(self._tenant_ids)
                self._tenant_ids.append(tenant_id)
                self._tenant_idx[tenant_id] = i
                if self._sink is not None:
                    self._tables_pending.append((1, i, 0, tenant_id))
            return i

    def session_index(self, session_id: str, tenant_id: str) -> int:
        """Index of (tenant, session) in the session table (registered on first use)."""
        if not (isinstance(session_id, str) and len(session_id) < 64 and session_id.isascii()):
            _check_text("session_id", session_id, _ID_MAX_BYTES)    # before the tenant is registered
        t = self.tenant_index(tenant_id)
        key = (t, session_id)
        i = self._session_idx.get(key)
        if i is not None:
            return i
        _check_text("session_id", session_id, _ID_MAX_BYTES)
        with self._lock:
            i = self._session_idx.get(key)
            if i is None:
                i = len(self._sessions)
                self._sessions.append(key)
                self._session_idx[key] = i
                if self._sink is not None:
                    self._tables_pending.append((2, i, t, session_id))
            return i

    # -- hot path -----------------------------------------------------------------
    def _prepare(self, values: tuple) -> tuple[int, list, list]:
        """Check every field value (scalar or 1-D integer array).

        Returns the batch length, the scalar values (VALUE_FIELDS order, 0
        where a field is an array) and the (field index, array) pairs.
        """
        n = None
        ints = [0] * len(values)
        arrays = []
        for k, v in enumerate(values):
            if type(v) is int:
                if v < 0 or v > _LIMITS[k]:
                    raise ValueError(f"{VALUE_FIELDS[k]}={v} is out of range 0..{_LIMITS[k]}")
                ints[k] = v
                continue
            if type(v) is not np.ndarray:
                if isinstance(v, (int, np.integer, bool)):
                    ints[k] = field_int(VALUE_FIELDS[k], v)
                    continue
                try:
                    v = np.asarray(v)
                except Exception:
                    raise TypeError(f"{VALUE_FIELDS[k]} must be an int or a 1-D integer array") from None
                if v.ndim == 0 and v.dtype.kind in "iu":
                    ints[k] = int(v)
                    if not 0 <= ints[k] <= _LIMITS[k]:
                        raise ValueError(f"{VALUE_FIELDS[k]}={ints[k]} is out of range 0..{_LIMITS[k]}")
                    continue
            check = _RANGE_CHECK.get((v.dtype, k))
            if check is None or v.ndim != 1:
                if v.ndim != 1 or v.dtype.kind not in "iu":
                    raise TypeError(f"{VALUE_FIELDS[k]} must be an int or a 1-D integer array, "
                                    f"got {v.ndim}-D {v.dtype}")
                check = _RANGE_CHECK[(v.dtype, k)] = v.dtype.kind == "i" or v.dtype.itemsize > _ITEMSIZE[k]
            ln = len(v)
            if n is None:
                n = ln
            elif ln != n:
                raise ValueError(f"{VALUE_FIELDS[k]} has {ln} elements, other fields {n}")
            if check and ln:
                lo, hi = int(v.min()), int(v.max())
                if lo < 0 or hi > _LIMITS[k]:
                    raise ValueError(f"{VALUE_FIELDS[k]} holds {lo if lo < 0 else hi}, "
                                     f"out of range 0..{_LIMITS[k]}")
            arrays.append((k, v))
        return (1 if n is None else n), ints, arrays

    def _write(self, op: int, n: int, ints, arrays, details: str | None = None, make=None) -> int:
        """Number ``n`` records and write them into the host ring, waiting for room if full.

        With ``make``, the per-record arrays of records ``done .. done+k`` are ``make(done, k)``, built
        piece by piece as the ring has room (memory bounded by the ring, whatever ``n`` is).
        """
        ring = self._ring
        if details is not None:
            _check_text("details", details, _DETAILS_MAX_BYTES)
        pack_args = ring.pack_args(op, ints, self._clock())
        with self._lock:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._error is not None:
                raise AuditError(f"the audit pipeline failed: {self._error}") from self._error
            first = self._next_no
            self._next_no += n
            if details is not None:
                self._details[first] = details
                if self._sink is not None:
                    self._details_pending[first] = details
            done = 0
            while done < n:
                room = ring.contiguous_room()
                if room == 0:
                    self._stalls += 1
                    self._work.notify()
                    while ring.contiguous_room() == 0:
                        if self._error is not None:
                            raise AuditError(f"the audit pipeline failed: {self._error}") from self._error
                        if not self._thread.is_alive():
                            raise AuditError("the audit drain thread is not running; the ring is full")
                        # the drain notifies; the timeout only re-checks a thread that died silently
                        self._space.wait(0.5)
                    continue
                k = room if room < n - done else n - done
                ring.write(first, done, k, pack_args, arrays if make is None else make(done, k))
                done += k
                if self._drain_idle and ring.written - ring.read >= self._wake_at:
                    self._work.notify()
            self._emitted += n
        return first

    def emit(self, op, *, tenant_idx, session_idx, layer=NONE16, row=NONE16, pos_start=0, pos_count=0,
             nonce_counter=0, epoch=0, nbytes=0, status=0, device_ts_ns=0) -> int:
        """Emit one record per element (scalars broadcast); returns the first record number.

        Arrays pass without a copy when their dtype is unsigned and no wider
        than the field; signed or wider arrays are range-checked first.
        """
        op = int(op)
        if op not in _VALID_OPS:
            raise ValueError(f"unknown audit operation code {op}")
        n, ints, arrays = self._prepare((tenant_idx, session_idx, layer, row, pos_start, pos_count,
                                         nonce_counter, epoch, nbytes, status, device_ts_ns))
        return self._write(op, n, ints, arrays)

    def emit_per_position(self, op, *, tenant_idx, session_idx, layer=NONE16, row=NONE16, pos_start=0,
                          pos_count=0, nonce_counter=0, epoch=0, nbytes=0, status=0, device_ts_ns=0) -> int:
        """Expand each descriptor (pos_start, pos_count) into pos_count one-position records.

        Each record keeps its descriptor's nonce counter and epoch; the
        descriptor's nbytes is split evenly (the first ``nbytes % pos_count``
        records get one byte more).  Vectorised; returns the first record
        number (the next number, with no record written, when every count is 0).
        """
        op = int(op)
        if op not in _VALID_OPS:
            raise ValueError(f"unknown audit operation code {op}")
        d, ints, arrays = self._prepare((tenant_idx, session_idx, layer, row, pos_start, pos_count,
                                         nonce_counter, epoch, nbytes, status, device_ts_ns))
        values = list(ints)
        for k, v in arrays:
            values[k] = v
        pc = values[_I_POS_COUNT]
        if (pc == 1) if type(pc) is int else (d and bool((pc == 1).all())):
            # every descriptor covers one position (a decode step): nothing to expand, and
            # pos_start + 1 cannot leave the 32-bit range
            return self._write(op, d, ints, arrays)
        counts = np.broadcast_to(np.asarray(values[_I_POS_COUNT], dtype=np.int64), (d,))
        starts = np.broadcast_to(np.asarray(values[_I_POS_START], dtype=np.int64), (d,))
        if d and int((starts + counts).max()) > 0x1_0000_0000:
            raise ValueError("pos_start + pos_count exceeds the 32-bit position range")
        total = int(counts.sum())
        if total == 0:
            with self._lock:
                return self._next_no
        if total > _EXPAND_AT_ONCE:
            return self._write(op, total, *self._expansion(d, values, ints, starts, counts))
        if d == 1:
            # one descriptor (a whole prefill of one row): positions are a range, the rest stays scalar
            out_ints = list(values)
            for k, v in arrays:
                out_ints[k] = int(v[0])
            out_arrays = [(_I_POS_START, np.arange(int(starts[0]), int(starts[0]) + total, dtype=np.uint32))]
            out_ints[_I_POS_START] = 0
            out_ints[_I_POS_COUNT] = 1
            base, extra = divmod(out_ints[_I_NBYTES], total)
            out_ints[_I_NBYTES] = base
            if extra:
                out_ints[_I_NBYTES] = 0
                out_arrays.append((_I_NBYTES, (np.arange(total) < extra).astype(np.uint32) + np.uint32(base)))
            return self._write(op, total, out_ints, out_arrays)
        offsets = np.cumsum(counts) - counts
        rank = np.arange(total, dtype=np.int64) - np.repeat(offsets, counts)
        out_ints = list(ints)
        out_arrays = []
        for k, v in enumerate(values):
            if k == _I_POS_START:
                out_arrays.append((k, (np.repeat(starts, counts) + rank).astype(np.uint32)))
            elif k == _I_POS_COUNT:
                out_ints[k] = 1
            elif k == _I_NBYTES:
                nb = np.broadcast_to(np.asarray(v, dtype=np.int64), (d,))
                safe = np.maximum(counts, 1)
                out_arrays.append((k, (np.repeat(nb // safe, counts) + (rank < np.repeat(nb % safe, counts)))
                                   .astype(np.uint32)))
                out_ints[k] = 0
            elif type(v) is np.ndarray:
                out_arrays.append((k, np.repeat(v, counts)))
        return self._write(op, total, out_ints, out_arrays)

    @staticmethod
    def _expansion(d: int, values: list, ints: list, starts, counts) -> tuple:
        """(ints, arrays, details, make) expanding ``d`` descriptors piece by piece: no array of the total."""
        ends = np.cumsum(counts)
        out_ints = list(ints)
        out_ints[_I_POS_START] = out_ints[_I_NBYTES] = 0
        out_ints[_I_POS_COUNT] = 1
        nb = np.broadcast_to(np.asarray(values[_I_NBYTES], dtype=np.int64), (d,))
        per = [(k, v) for k, v in enumerate(values) if type(v) is np.ndarray
               and k not in (_I_POS_START, _I_POS_COUNT, _I_NBYTES)]

        def make(done: int, k: int) -> list:
            idx = np.arange(done, done + k, dtype=np.int64)
            di = np.searchsorted(ends, idx, side="right")
            c = counts[di]
            rank = idx - (ends[di] - c)
            out = [(_I_POS_START, (starts[di] + rank).astype(np.uint32)),
                   (_I_NBYTES, (nb[di] // c + (rank < nb[di] % c)).astype(np.uint32))]
            out.extend((f, v[di]) for f, v in per)
            return out

        return out_ints, [], None, make

    def cuda_ring(self, device, capacity: int | None = None):
        """The CUDA ring of ``device`` (created on first use); see cuda_ring.CudaAuditRing."""
        from .cuda_ring import CudaAuditRing
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else dev
        with self._lock:
            ring = self._cuda_rings.get(dev)
        if ring is None:
            ring = CudaAuditRing(self, dev, capacity or self._ring.capacity)
            with self._lock:
                ring = self._cuda_rings.setdefault(dev, ring)
        return ring

    # -- earlier-library API ------------------------------------------------------------
    def _emit_one(self, op: Op, tenant_id, session_id, layer_idx, position, position_count, row,
                  sequence_number, epoch, nbytes, status: int, details) -> int:
        if details is not None and not isinstance(details, str):
            details = str(details)
        if details is not None:
            _check_text("details", details, _DETAILS_MAX_BYTES)      # before any table entry is made
        if layer_idx is None or layer_idx == -1:
            layer_idx = NONE16
        if row is None or row == -1:
            row = NONE16
        if position is None or position == -1:
            position, position_count = 0, 0
        elif position_count == 0:
            position_count = 1
        s = self.session_index(session_id, tenant_id)     # checks both ids before registering either
        t = self.tenant_index(tenant_id)
        _, ints, arrays = self._prepare((t, s, layer_idx, row, position, position_count, sequence_number,
                                         epoch, nbytes, status, 0))
        return self._write(int(op), 1, ints, arrays, details)

    def log(self, entry: KVAuditEntry) -> int:
        """Append a KVAuditEntry; returns its record number.

        The record is stamped with the log's clock (records of a log are in time
        order); ``timestamp`` and ``record_number`` of ``entry`` are not used.
        A failed operation is recorded as refused (isolation-violation), failed
        authentication (decrypt) or error (any other).
        """
        if not isinstance(entry, KVAuditEntry):
            raise TypeError(f"entry must be a KVAuditEntry, got {type(entry).__name__}")
        op = op_from_name(entry.operation)
        if entry.success:
            status = Status.OK
        else:
            status = {Op.ISOLATION_VIOLATION: Status.REFUSED, Op.DECRYPT: Status.AUTH_FAILED}.get(op, Status.ERROR)
        seq = entry.sequence_number
        return self._emit_one(op, entry.tenant_id, entry.session_id, entry.layer_idx, entry.position,
                              entry.position_count, entry.row, 0 if seq == -1 else seq, entry.epoch, entry.nbytes,
                              status, entry.details or None)

    def log_encrypt(self, tenant_id, session_id, layer_idx=-1, position=-1, seq=0, success=True,
                    details=None, *, sequence_number=None, position_count=1, row=None, epoch=0, nbytes=0) -> int:
        """Record an encryption; ``seq`` (or ``sequence_number=``) is stored as the sequence number."""
        seq = _one_seq(seq, sequence_number)
        return self._emit_one(Op.ENCRYPT, tenant_id, session_id, layer_idx, position, position_count, row,
                              seq, epoch, nbytes, Status.OK if success else Status.ERROR, details or None)

    def log_decrypt(self, tenant_id, session_id, layer_idx=-1, position=-1, seq=0, success=True,
                    details=None, *, sequence_number=None, position_count=1, row=None, epoch=0, nbytes=0) -> int:
        """Record a decryption; a failure is recorded as failed authentication."""
        seq = _one_seq(seq, sequence_number)
        return self._emit_one(Op.DECRYPT, tenant_id, session_id, layer_idx, position, position_count, row,
                              seq, epoch, nbytes, Status.OK if success else Status.AUTH_FAILED, details or None)

    def log_rotate(self, tenant_id, session_id, trigger="manual", details=None, *, epoch=0) -> int:
        """Record a key rotation; details read ``trigger=<trigger>`` (then ``; <details>`` if given).

        ``trigger`` is a string or an enum member (its ``value`` is written).
        """
        trigger = getattr(trigger, "value", trigger)
        note = f"trigger={trigger}" if details is None else f"trigger={trigger}; {details}"
        return self._emit_one(Op.ROTATE, tenant_id, session_id, -1, -1, 0, None, 0, epoch, 0, Status.OK, note)

    def log_isolation_violation(self, attacker_tenant, target_tenant, details="", *, session_id="", layer_idx=-1,
                                position=-1, position_count=0) -> int:
        """Record a refused cross-tenant access by ``attacker_tenant`` on ``target_tenant``.

        The record's tenant is the attacker, its session ``session_id`` (the
        attacker's, where known), success False; details read
        ``target=<target_tenant>; <details>``.
        """
        if not isinstance(target_tenant, str):
            raise TypeError(f"target_tenant must be a str, got {type(target_tenant).__name__}")
        note = f"target={target_tenant}; {'' if details is None else details}"
        return self._emit_one(Op.ISOLATION_VIOLATION, attacker_tenant, session_id, layer_idx, position,
                              position_count, None, 0, 0, 0, Status.REFUSED, note)

    def log_event(self, op, tenant_id, session_id, *, layer_idx=-1, position=-1, position_count=0, row=None,
                  sequence_number=0, epoch=0, nbytes=0, success=True, details=None) -> int:
        op = op_from_name(op) if isinstance(op, str) else Op(int(op))
        status = Status.OK if success else (Status.REFUSED if op == Op.ISOLATION_VIOLATION else Status.ERROR)
        return self._emit_one(op, tenant_id, session_id, layer_idx, position, position_count, row,
                              sequence_number, epoch, nbytes, status, details)

    # -- drain ----------------------------------------------------------------------
    def _drain_once(self) -> bool:
        """One pass of the drain thread; False when the log is closed and empty."""
        ring = self._ring
        with self._lock:
            pending = ring.written - ring.read
            urgent = (pending >= self._wake_at or self._stopping
                      or (self._flush_target > self._persisted
                          and (pending > 0 or self._delivered >= self._flush_target)))
            if not urgent:
                self._drain_idle = True
                self._work.wait(0.0005 if self._cuda_waiting else self._drain_interval)
                self._drain_idle = False
            segs, upto = ring.take()
            tables = self._tables_pending
            self._tables_pending = []
            details = self._details_pending
            self._details_pending = {}
            flush_target = self._flush_target
            stopping = self._stopping
            cuda_rings = list(self._cuda_rings.values())
        t0 = time.perf_counter_ns()
        waiting = False
        flushed = None
        try:
            self._sink_call("write_tables", tables)
            self._sink_call("write_details", sorted(details.items()))
            self._take_segments(segs)
            for cr in cuda_rings:
                chunks, still = cr.collect()
                waiting |= still
                for first, recs in chunks:
                    self._arrive(first, recs, owned=True)
            if self._delivered >= flush_target:
                if self._sink_call("flush"):
                    flushed = self._delivered
        except BaseException as e:   # a bug or a failing CUDA runtime: report it, never hang emitters
            with self._lock:
                if self._error is None:
                    self._error = e
            self._logger.error("audit drain failed: %r", e)
        self._drain_busy_ns += time.perf_counter_ns() - t0
        with self._lock:
            ring.release(upto)
            self._cuda_waiting = waiting
            if self._sink is None:
                self._persisted = self._delivered
            elif flushed is not None:
                self._persisted = max(self._persisted, flushed)
            first_kept = self._store.first_kept
            if self._details and next(iter(self._details)) < first_kept:
                for no in [k for k in self._details if k < first_kept]:
                    del self._details[no]
            self._space.notify_all()
            self._done.notify_all()
            if stopping and (self._error is not None or self._abandon
                             or (ring.written == ring.read and self._delivered >= self._next_no)):
                return False
        return True

    def _drain_died(self, e: BaseException) -> None:
        """The drain thread raised outside its guarded part: keep the cause for emitters and flush."""
        err = AuditError(f"the audit drain thread died: {e!r}")
        err.__cause__ = e
        with self._lock:
            if self._error is None:
                self._error = err
        try:
            self._logger.error("audit drain thread died: %r", e)
        except Exception:
            pass

    def _wake_all(self) -> None:
        """Wake every thread waiting on the drain (emitters, flush, queries, CUDA rings)."""
        with self._lock:
            self._space.notify_all()
            self._done.notify_all()
            self._work.notify_all()
            for cr in self._cuda_rings.values():
                space = getattr(cr, "_space", None)
                if space is not None:
                    space.notify_all()

    def _sink_call(self, method: str, *args) -> bool:
        """Call the sink; on failure remember the error (emitters and flush raise it) and go on."""
        if self._sink is None or self._error is not None:
            return False
        try:
            getattr(self._sink, method)(*args)
            return True
        except Exception as e:
            with self._lock:
                if self._error is None:
                    self._error = e if isinstance(e, KVCacheError) else AuditError(f"audit sink: {e!r}")
            self._logger.error("audit log file failed: %s", e)
            return False

    def _take_segments(self, segs) -> None:
        """Deliver ring segments (slot order) in record-number order; park those that are early."""
        buf = self._ring.buf
        i = 0
        while i < len(segs):
            s, first, k = segs[i]
            # merge following segments that continue both the slots and the numbering
            while i + 1 < len(segs) and segs[i + 1][0] == s + k and segs[i + 1][1] == first + k:
                k += segs[i + 1][2]
                i += 1
            self._arrive(first, buf[s:s + k], owned=False)
            i += 1

    def _arrive(self, first: int, recs: np.ndarray, owned: bool) -> None:
        if first != self._delivered:
            heapq.heappush(self._reorder, (first, id(recs), recs if owned else recs.copy()))
            return
        self._deliver(recs)
        while self._reorder and self._reorder[0][0] == self._delivered:
            self._deliver(heapq.heappop(self._reorder)[2])

    def _deliver(self, recs: np.ndarray) -> None:
        with self._store_lock:
            self._store.append(recs)
        self._delivered += len(recs)
        self._drained += len(recs)
        self._sink_call("write_records", recs)
        failed = recs["status"] != 0
        violation = recs["op"] == Op.ISOLATION_VIOLATION
        bad = np.flatnonzero(failed | violation)
        if len(bad):
            self._failures += int(np.count_nonzero(failed))
            self._violations += int(np.count_nonzero(violation))
        if len(bad):
            dev = np.flatnonzero(failed & (recs["device_ts_ns"] != 0) & (recs["op"] == Op.DECRYPT)
                                 & (recs["status"] == Status.AUTH_FAILED))
            if len(dev):
                with self._device_fail_lock:
                    if len(self._device_auth_failures) < 1000:
                        self._device_auth_failures.extend(recs[dev[:1000]].copy())
        for i in bad[:1000]:
            self._warn(recs[int(i)])
        if len(bad) > 1000:
            self._logger.warning("audit: %d more failures or violations in records %d..%d not itemised",
                                 len(bad) - 1000, int(recs["record_no"][0]), int(recs["record_no"][-1]))

    def _warn(self, r) -> None:
        op = OP_NAMES.get(int(r["op"]), str(int(r["op"])))
        t = int(r["tenant_idx"])
        tenant = self._tenant_ids[t] if t < len(self._tenant_ids) else f"#{t}"
        s = int(r["session_idx"])
        session = self._sessions[s][1] if s < len(self._sessions) else f"#{s}"
        layer = int(r["layer"])
        ps, pc = int(r["pos_start"]), int(r["pos_count"])
        try:
            status = Status(int(r["status"])).name
        except ValueError:
            status = str(int(r["status"]))
        self._logger.warning(
            "audit %s %s: tenant=%r session=%r layer=%s positions=%s row=%s record=%d details=%s",
            op, status, tenant, session, "-" if layer == NONE16 else layer,
            f"{ps}..{ps + pc - 1}" if pc else "-", "-" if int(r["row"]) == NONE16 else int(r["row"]),
            int(r["record_no"]), self._details.get(int(r["record_no"])))

    # -- control ------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record emitted before the call is queryable and persisted.

        Returns False if ``timeout`` (seconds) passed first.  Records reserved
        on a CUDA ring are waited for until committed and copied.  Raises
        AuditError if the pipeline failed, and DecryptionError (after the flush
        completed) if DECRYPT records written by a device since the last flush
        report a failed tag: on a GPU the decode loop cannot raise without a host
        sync, so flush() is one of the synchronisation points where such a
        failure surfaces (the records themselves are in the log either way).
        """
        ok = self._wait_persisted(timeout)
        with self._device_fail_lock:
            failures, self._device_auth_failures = self._device_auth_failures, []
        if failures:
            self._raise_device_failures(failures)
        return ok

    def _wait_persisted(self, timeout: float | None) -> bool:
        """Wait until every record emitted before the call is queryable and persisted (AuditError if the
        pipeline failed); False on timeout."""
        with self._lock:
            target = self._next_no
            if target > self._flush_target:
                self._flush_target = target
            self._work.notify()
            ok = self._done.wait_for(lambda: self._persisted >= target or self._error is not None
                                     or not self._thread.is_alive(), timeout)
            if self._error is not None:
                raise AuditError(f"the audit pipeline failed: {self._error}") from self._error
            if ok and self._persisted < target:
                raise AuditError("the audit drain thread stopped before the flush completed")
            return bool(ok)

    def _raise_device_failures(self, failures) -> None:
        """DecryptionError naming the first device-reported tag failure (all are in the log already)."""
        r = failures[0]
        t, layer = int(r["tenant_idx"]), int(r["layer"])
        tenant = self._tenant_ids[t] if t < len(self._tenant_ids) else f"#{t}"
        ps, pc = int(r["pos_start"]), int(r["pos_count"])
        raise DecryptionError(
            f"{len(failures)} device decrypt record(s) failed authentication since the last flush; first: "
            f"tenant {tenant!r}, layer {'-' if layer == NONE16 else layer}, positions {ps}..{ps + pc - 1} "
            f"(record {int(r['record_no'])})",
            tenant_id=tenant, layer_idx=None if layer == NONE16 else layer, positions=range(ps, ps + pc))

    def _sync_queryable(self) -> None:
        """Wait until every record emitted so far is in the in-memory store (not necessarily on disk)."""
        with self._lock:
            target = self._next_no
            if self._delivered >= target:
                return
            if target > self._want_delivered:
                self._want_delivered = target
            self._work.notify()
            self._done.wait_for(lambda: self._delivered >= target or self._error is not None
                                or not self._thread.is_alive())
            if self._delivered < target:
                raise AuditError(f"the audit pipeline failed: {self._error}") from self._error

    def close(self, timeout: float | None = None) -> None:
        """Drain everything, sign the file's final checkpoint and seal it; emitting afterwards fails.

        With ``timeout`` (seconds), a drain that cannot finish in time (records
        reserved on a CUDA ring and never committed) is abandoned: the file is
        left without its closing checkpoint (verify reports an unclosed log)
        and AuditError is raised.
        """
        with self._lock:
            if self._closed:
                return
        err = None
        try:
            if not self._wait_persisted(timeout):
                err = AuditError(f"close: the audit drain did not finish within {timeout} s "
                                 "(records reserved on a CUDA ring were not committed); the log is left unclosed")
        except AuditError as e:
            err = e
        with self._lock:
            self._closed = True
            self._stopping = True
            self._abandon = err is not None
            self._work.notify()
        self._thread.join()
        _OPEN_LOGS.discard(self)
        if self._sink is not None:
            if err is None and self._error is None:
                self._sink.close()
            else:
                self._sink.abandon()
        if err is not None:
            raise err

    def __enter__(self) -> "KVAuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def public_key(self):
        """The ML-DSA-65 public key of the persisted log (None without a path)."""
        return None if self._sink is None else self._sink.pub

    def stats(self) -> dict:
        with self._lock:
            return {
                "emitted": self._emitted,
                "drained": self._drained,
                "stalls": self._stalls,
                "dropped": 0,
                "evicted": self._store.evicted,
                "bytes_persisted": 0 if self._sink is None else self._sink.bytes_written,
                "in_memory": len(self._store),
                "failures": self._failures,
                "violations": self._violations,
                "reorder_pending": sum(len(r[2]) for r in self._reorder),
                "drain_busy_s": self._drain_busy_ns / 1e9,
            }

    # -- queries --------------------------------------------------------------------
    def __len__(self) -> int:
        """Records in memory (at most max_entries), after draining everything emitted so far."""
        self._sync_queryable()
        return len(self._store)

    def _entry(self, rec: dict) -> KVAuditEntry:
        t, s = rec["tenant_idx"], rec["session_idx"]
        layer, row, pc = rec["layer"], rec["row"], rec["pos_count"]
        no = rec["record_no"]
        return KVAuditEntry(
            timestamp=_iso(rec["host_ts_ns"]),
            operation=OP_NAMES.get(rec["op"], str(rec["op"])),
            tenant_id=self._tenant_ids[t] if t < len(self._tenant_ids) else f"#{t}",
            session_id=self._sessions[s][1] if s < len(self._sessions) else f"#{s}",
            layer_idx=-1 if layer == NONE16 else layer,
            position=rec["pos_start"] if pc else -1,
            sequence_number=rec["nonce_counter"],
            success=rec["status"] == Status.OK,
            details=self._details.get(no, ""),
            record_number=no, position_count=pc, row=None if row == NONE16 else row,
            epoch=rec["epoch"], nbytes=rec["nbytes"], status=rec["status"],
            device_timestamp_ns=rec["device_ts_ns"])

    def entries(self, limit: int | None = 100, tenant_id=None, operation=None, layer_idx=None, position=None,
                success=None, since=None) -> list[KVAuditEntry]:
        """Matching records, newest first.  ``position`` matches records whose range contains it."""
        self._sync_queryable()
        return self._query(limit=limit, newest_first=True, tenant_id=tenant_id, operation=operation,
                           layer_idx=layer_idx, position=position, success=success, since=since)

    def _query(self, *, limit, newest_first, tenant_id=None, operation=None, layer_idx=None, position=None,
               success=None, since=None) -> list[KVAuditEntry]:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
        t = None
        if tenant_id is not None:
            t = self._tenant_idx.get(tenant_id)
            if t is None:
                return []
        op = None if operation is None else int(op_from_name(operation))
        if success is not None and not isinstance(success, (bool, np.bool_)):
            raise TypeError(f"success must be True, False or None, got {type(success).__name__}")
        layer = None
        if layer_idx is not None:
            if not isinstance(layer_idx, numbers.Integral) or isinstance(layer_idx, (bool, np.bool_)):
                raise TypeError(f"layer_idx must be an int or None, got {type(layer_idx).__name__}")
            layer = NONE16 if layer_idx == -1 else int(layer_idx)
            if not 0 <= layer <= NONE16:
                return []
        if position is not None:
            if not isinstance(position, numbers.Integral) or isinstance(position, (bool, np.bool_)):
                raise TypeError(f"position must be an int or None, got {type(position).__name__}")
            position = int(position)
            if not 0 <= position <= 0xFFFF_FFFF:
                return []
        since_ns = None if since is None else _since_ns(since)
        with self._store_lock:
            hits = self._store.select(limit=limit, newest_first=newest_first, tenant_idx=t, op=op, layer=layer,
                                      position=position, success=success, since_ns=since_ns)
            recs = [self._store.record(b, i) for b, i in hits]
        return [self._entry(r) for r in recs]

    def export_json(self) -> str:
        """Every record in memory as a JSON list of entry dicts, oldest first."""
        self._sync_queryable()
        return json.dumps([e.to_dict() for e in self._query(limit=None, newest_first=False)], indent=2)
