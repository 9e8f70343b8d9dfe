"""KVAuditLog: batched audit records, an asynchronous drain, a queryable columnar log.

Emitters (the hot path, any thread) write batches of packed records into the
host ring (or, on a GPU, into a CUDA ring); record numbers are global and
dense, handed out per batch by the log's ``RecordAllocator`` (alloc.py) under
one lock.  A background drain thread (drain.py) moves the records, in
record-number order, into the in-memory columnar store and to the persistent
sink.  This module is the facade: field checks live in fields.py, the name
tables in names.py, queries in query.py.
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import os
import threading
import time
import weakref

import numpy as np

from ..errors import AuditError, DecryptionError
from .alloc import RecordAllocator
from .drain import Drain
from .fields import check_int, expand_per_position, prepare
from .keys import SigningKey
from .names import DetailTexts, NameTable
from .query import KVAuditEntry, query
from .records import NONE16, VALID_OPS as _VALID_OPS, Op, Status, check_records, op_from_name
from .ring import HostRing
from .sink import AuditSink
from .store import ColumnarStore

__all__ = ["KVAuditLog", "KVAuditEntry"]


_OPEN_LOGS: "weakref.WeakSet[KVAuditLog]" = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    """A normal interpreter exit closes (drains, signs, seals) every log still open."""
    for log in list(_OPEN_LOGS):
        try:
            log.close(timeout=10.0)
        except Exception:   # exit must go on; verify will report the log as unclosed
            pass


def _one_seq(seq, sequence_number) -> int:
    """The sequence number given as ``seq`` (positional or keyword) or as ``sequence_number=``."""
    if sequence_number is None:
        return seq
    if seq != 0:
        raise TypeError("give the sequence number once: seq or sequence_number, not both")
    return sequence_number


def _path_and_max_entries(first, path, max_entries):
    """The first positional is a path, or (as in PQC KV Cache Encryption 0.1.0) ``max_entries``; ``path=`` is a path."""
    if path is not None:
        if first is not None:
            raise TypeError("KVAuditLog got its path twice: positionally and as path=")
        first = path
    elif isinstance(first, numbers.Integral) and not isinstance(first, (bool, np.bool_)):
        if max_entries != 1_000_000:
            raise TypeError(f"path must be a file path, got the int {first!r}")
        return None, first                   # KVAuditLog(1000): max_entries as the first positional
    if first is not None and not isinstance(first, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(first).__name__} {first!r:.80}")
    if first is not None and not isinstance(os.fspath(first), str):
        raise TypeError("path must be a str file path, not bytes")
    return first, max_entries


class KVAuditLog:
    """Audit log of KV-cache accesses: host ring -> drain thread -> columnar store (+ signed file).

    ``path``: persist every record to this file (format in docs/audit.md); an
    existing file is verified and continued, which needs its ``signing_key``.
    ``max_entries``: records kept in memory (older ones stay in the file); an int
    given as the only positional argument is taken as ``max_entries``. A log file
    has one writer at a time: a second KVAuditLog on the same path (in this or
    another process) is refused with AuditError until the first is closed.
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

    def __init__(self, path_or_max_entries=None, /, max_entries: int = 1_000_000, ring_records: int = 65536,
                 signing_key: SigningKey | None = None, logger="pqc_kv_cache.audit", *,
                 path: str | os.PathLike[str] | None = None, clock=time.time_ns,
                 checkpoint_records: int = 65536, frame_records: int = 16384, fsync: bool = True,
                 drain_interval: float = 0.05):
        path, max_entries = _path_and_max_entries(path_or_max_entries, path, max_entries)
        max_entries = check_int("max_entries", max_entries, 1)
        ring_records = check_int("ring_records", ring_records, 1)
        checkpoint_records = check_int("checkpoint_records", checkpoint_records, 1)
        frame_records = check_int("frame_records", frame_records, 1)
        if not isinstance(drain_interval, numbers.Real) or isinstance(drain_interval, (bool, np.bool_)):
            raise TypeError(f"drain_interval must be a positive number of seconds, "
                            f"got {type(drain_interval).__name__}")
        if not 0 < drain_interval < float("inf"):
            raise ValueError(f"drain_interval must be a positive number of seconds, got {drain_interval!r}")
        if path is None and signing_key is not None:
            raise ValueError("signing_key without path: only a persisted log is signed")
        self._alloc = alloc = RecordAllocator(clock)
        self._lock = alloc.lock
        self._space = alloc.space_condition()            # host emitters wait here for ring room
        self._store_lock = threading.Lock()              # queries vs. the drain's appends
        self._ring = HostRing(ring_records)
        self._store = ColumnarStore(max_entries)
        self._clock = clock
        self._logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)

        self._sink = None
        first_no = 0
        if path is not None:
            self._sink = AuditSink(path, signing_key, checkpoint_records=checkpoint_records,
                                   frame_records=frame_records, fsync=fsync, clock=clock)
        self._names = NameTable(self._lock, persist=self._sink is not None)
        self._details = DetailTexts(persist=self._sink is not None)
        if self._sink is not None:
            if not self._names.load(self._sink.tenants, self._sink.sessions):
                raise AuditError(f"{path}: tenant/session tables of the log are not dense")
            first_no = alloc.next_no = self._sink.next_no
            self._store.reset_base(first_no)

        # The thread holds the drain weakly: a log dropped without close() stops its thread.
        self._drain = Drain(alloc, self._ring, self._space, self._store, self._store_lock, self._names,
                            self._details, self._sink, self._logger, interval=float(drain_interval),
                            wake_at=max(1, ring_records // 4), first_no=first_no)
        self._drain.start()
        _OPEN_LOGS.add(self)

    # -- tables -------------------------------------------------------------------
    def tenant_index(self, tenant_id: str) -> int:
        """Index of ``tenant_id`` in the tenant table (registered on first use)."""
        return self._names.tenant_index(tenant_id)

    def session_index(self, session_id: str, tenant_id: str) -> int:
        """Index of (tenant, session) in the session table (registered on first use)."""
        return self._names.session_index(session_id, tenant_id)

    def tenant_id_of(self, tenant_idx: int) -> str | None:
        """The tenant id registered at index ``tenant_idx``; None if there is none."""
        return self._names.tenant_id(tenant_idx)

    # -- hot path -----------------------------------------------------------------
    def _write(self, op: int, n: int, ints, arrays, details: str | None = None, make=None,
               records: np.ndarray | None = None) -> int:
        """Number ``n`` records and write them into the host ring, waiting for room if full.

        With ``make``, the per-record arrays of records ``done .. done+k`` are ``make(done, k)``, built
        piece by piece as the ring has room (memory bounded by the ring, whatever ``n`` is). With
        ``records`` (a checked RECORD_DTYPE array of ``n`` records), those records are copied as they are
        (``op``, ``ints`` and ``arrays`` unused).
        """
        ring = self._ring
        if details is not None:
            self._details.check(details)
        if records is None:
            pack_args = ring.pack_args(op, ints, self._clock())
        else:
            host_ts = self._clock()
        alloc = self._alloc
        drain = self._drain
        with alloc.lock:
            if alloc.closed or alloc.error is not None:
                alloc.check_open()
            first = alloc.next_no             # alloc.take(n), inlined on the hot path
            alloc.next_no = first + n
            if details is not None:
                self._details.add(first, details)
            done = 0
            while done < n:
                room = ring.contiguous_room()
                if room == 0:
                    alloc.stalled()
                    while ring.contiguous_room() == 0:
                        if alloc.error is not None:
                            raise AuditError(f"the audit pipeline failed: {alloc.error}") from alloc.error
                        if not drain.alive():
                            raise AuditError("the audit drain thread is not running; the ring is full")
                        # the drain notifies; the timeout only re-checks a thread that died silently
                        self._space.wait(0.5)
                    continue
                k = room if room < n - done else n - done
                if records is None:
                    ring.write(first, done, k, pack_args, arrays if make is None else make(done, k))
                else:
                    ring.write_records(first, done, k, records, host_ts)
                done += k
                if drain.idle and ring.written - ring.read >= drain.wake_at:
                    alloc.work.notify()
            alloc.emitted += n
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
        n, ints, arrays = prepare((tenant_idx, session_idx, layer, row, pos_start, pos_count,
                                   nonce_counter, epoch, nbytes, status, device_ts_ns))
        return self._write(op, n, ints, arrays)

    def emit_records(self, records: np.ndarray) -> int:
        """Emit prepared records: a 1-D array of ``RECORD_DTYPE`` (``pqc_kv_cache.audit.records``) whose
        fields the caller set, each record with its own ``op``. The log numbers them and stamps the host
        time; ``record_no``, ``host_ts_ns`` and ``flags`` as given are ignored. Returns the first record
        number (the next number, with nothing written, for an empty array).

        For emitters that write the same kind of batch again and again (one record per row of a layer,
        every decode step): the constant fields are set once in an array kept by the caller, and only the
        fields that change are set before each call. The array is copied; the caller may reuse it at once.
        Every field already has its exact width, so only the operation codes are checked.
        """
        check_records(records, "emit_records")
        n = records.shape[0]
        if n == 0:
            with self._lock:
                return self._alloc.next_no
        return self._write(0, n, None, None, records=records)

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
        d, ints, arrays = prepare((tenant_idx, session_idx, layer, row, pos_start, pos_count,
                                   nonce_counter, epoch, nbytes, status, device_ts_ns))
        n, ints, arrays, make = expand_per_position(d, ints, arrays)
        if n == 0:
            with self._lock:
                return self._alloc.next_no
        return self._write(op, n, ints, arrays, make=make)

    @property
    def allocator(self) -> RecordAllocator:
        """The numbering, lock and wake-ups this log gives its rings (for a ring implementation)."""
        return self._alloc

    def attach_ring(self, key, ring):
        """Drain ``ring`` (built on ``self.allocator``, with ``collect()``) too; returns the ring registered
        under ``key`` (an earlier one if there is one)."""
        return self._alloc.attach(key, ring)

    def cuda_ring(self, device, capacity: int | None = None):
        """The CUDA ring of ``device`` (created on first use); see cuda_ring.CudaAuditRing."""
        from .cuda_ring import CudaAuditRing
        import torch

        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else dev
        ring = self._alloc.ring(dev)
        if ring is None:
            ring = self._alloc.attach(dev, CudaAuditRing(self._alloc, dev, capacity or self._ring.capacity))
        return ring

    # -- the API of PQC KV Cache Encryption 0.1.0 ------------------------------------------------------------
    def _emit_one(self, op: Op, tenant_id, session_id, layer_idx, position, position_count, row,
                  sequence_number, epoch, nbytes, status: int, details) -> int:
        if details is not None and not isinstance(details, str):
            details = str(details)
        if details is not None:
            self._details.check(details)      # before any table entry is made
        if layer_idx is None or layer_idx == -1:
            layer_idx = NONE16
        if row is None or row == -1:
            row = NONE16
        if position is None or position == -1:
            position, position_count = 0, 0
        elif position_count == 0:
            position_count = 1
        names = self._names
        s = names.session_index(session_id, tenant_id)     # checks both ids before registering either
        t = names.tenant_index(tenant_id)
        _, ints, arrays = prepare((t, s, layer_idx, row, position, position_count, sequence_number,
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
        ok = self._drain.wait_persisted(timeout)
        failures = self._drain.take_device_failures()
        if failures:
            self._raise_device_failures(failures)
        return ok

    def _raise_device_failures(self, failures) -> None:
        """DecryptionError naming the first device-reported tag failure (all are in the log already)."""
        r = failures[0]
        t, layer = int(r["tenant_idx"]), int(r["layer"])
        tenant = self._names.tenant_label(t)
        ps, pc = int(r["pos_start"]), int(r["pos_count"])
        raise DecryptionError(
            f"{len(failures)} device decrypt record(s) failed authentication since the last flush; first: "
            f"tenant {tenant!r}, layer {'-' if layer == NONE16 else layer}, positions {ps}..{ps + pc - 1} "
            f"(record {int(r['record_no'])})",
            tenant_id=tenant, layer_idx=None if layer == NONE16 else layer, positions=range(ps, ps + pc))

    def close(self, timeout: float | None = None) -> None:
        """Drain everything, sign the file's final checkpoint and seal it; emitting afterwards fails.

        With ``timeout`` (seconds), a drain that cannot finish in time (records
        reserved on a CUDA ring and never committed) is abandoned: the file is
        left without its closing checkpoint (verify reports an unclosed log)
        and AuditError is raised.
        """
        with self._lock:
            if self._alloc.closed:
                return
        err = None
        try:
            if not self._drain.wait_persisted(timeout):
                err = AuditError(f"close: the audit drain did not finish within {timeout} s "
                                 "(records reserved on a CUDA ring were not committed); the log is left unclosed")
        except AuditError as e:
            err = e
        self._drain.stop(abandon=err is not None)
        _OPEN_LOGS.discard(self)
        if self._sink is not None:
            if err is None and self._alloc.error is None:
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
        alloc, drain = self._alloc, self._drain
        with self._lock:
            return {
                "emitted": alloc.emitted,
                "drained": drain.drained,
                "stalls": alloc.stalls,
                "dropped": 0,
                "evicted": self._store.evicted,
                "bytes_persisted": 0 if self._sink is None else self._sink.bytes_written,
                "in_memory": len(self._store),
                "failures": drain.failures,
                "violations": drain.violations,
                "reorder_pending": drain.reorder_pending(),
                "drain_busy_s": drain.busy_ns / 1e9,
            }

    # -- queries --------------------------------------------------------------------
    def __len__(self) -> int:
        """Records in memory (at most max_entries), after draining everything emitted so far."""
        self._drain.wait_delivered()
        return len(self._store)

    def entries(self, limit: int | None = 100, tenant_id=None, operation=None, layer_idx=None, position=None,
                success=None, since=None) -> list[KVAuditEntry]:
        """Matching records, newest first.  ``position`` matches records whose range contains it."""
        self._drain.wait_delivered()
        return self._query(limit=limit, newest_first=True, tenant_id=tenant_id, operation=operation,
                           layer_idx=layer_idx, position=position, success=success, since=since)

    def _query(self, *, limit, newest_first, **filters) -> list[KVAuditEntry]:
        return query(self._store, self._store_lock, self._names, self._details, limit=limit,
                     newest_first=newest_first, **filters)

    def export_json(self) -> str:
        """Every record in memory as a JSON list of entry dicts, oldest first."""
        self._drain.wait_delivered()
        return json.dumps([e.to_dict() for e in self._query(limit=None, newest_first=False)], indent=2)
