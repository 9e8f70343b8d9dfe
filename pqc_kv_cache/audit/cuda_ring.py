"""CUDA audit ring: a device buffer of packed records, drained through pinned host staging.

Stores ``capacity`` 64-byte records (kernels/pqc_audit_record.h) in a
``torch.uint8`` device tensor of shape [capacity, 64] and the same amount of
pinned host memory.  The compute side works in three host-only steps, none of
which synchronises with the device:

1. ``reserve(n)`` takes ``n`` contiguous slots and ``n`` global record
   numbers (the same numbering as the host ring) and returns the slots as a
   [n, 64] view.  When the ring is full it waits on a ``threading.Condition``
   for the drain thread to free slots (a stall), never on CUDA.
2. A kernel or torch ops on ``torch.cuda.current_stream()`` write the records.
3. ``commit(n)`` records an event on the current stream, makes a side stream
   wait for it, enqueues the device-to-pinned copy of those slots on the side
   stream and records a completion event there.

The drain thread (never the compute thread) polls the completion events,
reads finished records from the staging memory, sets their record number
(host-assigned) and host timestamp, hands them to the log's reorder buffer and
then frees the slots.  Slots are freed in reservation order; a reservation
that wraps past the end of the buffer starts at slot 0 and the skipped tail is
freed with it.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from ..errors import AuditError, BackendUnavailableError
from .records import NONE16, RECORD_DTYPE, RECORD_SIZE, Op

__all__ = ["CudaAuditRing"]

_VALID_OPS = frozenset(int(o) for o in Op)


class _Reservation:
    __slots__ = ("first_no", "n", "slot", "span", "thread", "event", "taken")

    def __init__(self, first_no, n, slot, span, thread):
        self.first_no = first_no
        self.n = n
        self.slot = slot
        self.span = span          # slots this reservation frees: n plus any skipped tail
        self.thread = thread
        self.event = None         # completion event of the staging copy, set by commit
        self.taken = False        # the drain thread has handed its records on


def _as_i32(v: int) -> int:
    """A u32 field value as the int32 with the same bits (torch has no uint32 arithmetic)."""
    return v - (1 << 32) if v >= (1 << 31) else v


def _as_i16(v: int) -> int:
    return v - (1 << 16) if v >= (1 << 15) else v


def _as_i64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


class CudaAuditRing:
    """Device ring of one CUDA device, owned by a KVAuditLog (``log.cuda_ring(device)``)."""

    def __init__(self, log, device, capacity: int):
        import torch

        self._torch = torch
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ring capacity must be a positive int, got {capacity!r}")
        self.device = torch.device(device)
        self.capacity = capacity
        self._log = log
        self._space = threading.Condition(log._lock)
        self._allocate()
        self._staging_np = self.staging.numpy().view(RECORD_DTYPE).reshape(capacity)
        self._head = 0            # slot counter reserved so far (incl. skipped tails); only grows
        self._tail = 0            # slot counter freed so far
        self._res: collections.deque[_Reservation] = collections.deque()

    # -- device work: the only CUDA calls of the ring --------------------------------------
    def _allocate(self) -> None:
        """Device buffer, pinned staging of the same size, and the side stream of the copies."""
        torch = self._torch
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(f"a CUDA audit ring needs a CUDA device, got {self.device}")
        self.buf = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8, device=self.device)
        self.staging = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8, pin_memory=True)
        self._side = torch.cuda.Stream(device=self.device)

    def _enqueue_copy(self, slot: int, n: int):
        """Order the copy of slots ``slot .. slot+n`` after the current stream's work; its completion event."""
        torch = self._torch
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(self.device))
        self._side.wait_event(written)
        with torch.cuda.stream(self._side):
            self.staging[slot:slot + n].copy_(self.buf[slot:slot + n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._side)
        return copied

    @staticmethod
    def _copy_done(event) -> bool:
        """Non-blocking: has the copy behind ``event`` completed?"""
        return event.query()

    # -- compute side (host work only, no device synchronisation) -----------------------
    def reserve(self, n: int):
        """``n`` slots as a [n, 64] uint8 device view, and the record number of its first slot."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.capacity:
            raise ValueError(f"reserve needs 1..{self.capacity} records, got {n!r}")
        log = self._log
        with log._lock:
            stalled = False
            while True:
                if log._closed:
                    raise AuditError("the audit log is closed")
                if log._error is not None:
                    raise AuditError(f"the audit pipeline failed: {log._error}") from log._error
                s = self._head % self.capacity
                skip = self.capacity - s if s + n > self.capacity else 0
                if skip and self._head == self._tail:
                    # empty ring: restart at slot 0 instead of counting the unused tail as taken (else a
                    # request larger than the space before the end could never fit, even in an empty ring)
                    self._head += skip
                    self._tail += skip
                    skip = 0
                if self._head + skip + n - self._tail <= self.capacity:
                    break
                if not stalled:
                    log._stalls += 1
                    stalled = True
                log._work.notify()
                self._space.wait(0.1)     # re-checks closed / failed while waiting for the drain
            slot = (self._head + skip) % self.capacity
            self._head += skip + n
            first = log._next_no
            log._next_no += n
            self._res.append(_Reservation(first, n, slot, skip + n, threading.get_ident()))
        return self.buf[slot:slot + n], first

    def commit(self, n: int, first_no: int | None = None) -> None:
        """Hand ``n`` written records to the drain: event on the current stream, async copy on the side stream.

        Without ``first_no`` the calling thread's oldest uncommitted
        reservation is committed; its size must be ``n``.
        """
        log = self._log
        me = threading.get_ident()
        with log._lock:
            res = None
            for r in self._res:
                if r.event is None and (r.first_no == first_no if first_no is not None else r.thread == me):
                    res = r
                    break
            if res is None:
                raise ValueError("commit without a matching reservation"
                                 + ("" if first_no is None else f" starting at record {first_no}"))
            if res.n != n:
                raise ValueError(f"commit of {n} records, but the reservation holds {res.n}")
            res.event = False     # claimed: a concurrent commit cannot take it
        copied = self._enqueue_copy(res.slot, n)
        with log._lock:
            res.event = copied
            log._emitted += n
            log._work.notify()

    def emit_torch(self, op, *, tenant_idx, session_idx, layer=NONE16, row=NONE16, pos_start=0, pos_count=0,
                   nonce_counter=0, epoch=0, nbytes=0, status=0, device_ts_ns=0) -> int:
        """Build records with torch ops on the device (fields: ints or 1-D device tensors) and commit them.

        One record per element; returns the first record number.  Tensors
        must be integer tensors on this ring's device; their values are
        written with the bits of the field's width (no range check: that
        would need a device read-back).
        """
        torch = self._torch
        op = int(op)
        if op not in _VALID_OPS:
            raise ValueError(f"unknown audit operation code {op}")
        fields = dict(tenant_idx=tenant_idx, session_idx=session_idx, layer=layer, row=row, pos_start=pos_start,
                      pos_count=pos_count, nonce_counter=nonce_counter, epoch=epoch, nbytes=nbytes, status=status,
                      device_ts_ns=device_ts_ns)
        n = None
        for name, v in fields.items():
            if isinstance(v, torch.Tensor):
                if v.dim() != 1 or v.device != self.device or v.dtype.is_floating_point or v.dtype == torch.bool:
                    raise TypeError(f"{name} must be a 1-D integer tensor on {self.device}, "
                                    f"got {v.dim()}-D {v.dtype} on {v.device}")
                if n is None:
                    n = v.shape[0]
                elif v.shape[0] != n:
                    raise ValueError(f"{name} has {v.shape[0]} elements, other fields {n}")
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                fields[name] = int(v)
            else:
                raise TypeError(f"{name} must be an int or a 1-D integer tensor, got {type(v).__name__}")
        n = 1 if n is None else n
        if n == 0:
            return self._log._next_no
        view, first = self.reserve(n)
        w64 = view.view(torch.int64)    # [n, 8]
        w32 = view.view(torch.int32)    # [n, 16]
        w16 = view.view(torch.int16)    # [n, 32]

        def put(col, v, conv):
            if isinstance(v, int):
                col.fill_(conv(v))
            else:
                col.copy_(v)

        w64[:, 0] = torch.arange(first, first + n, dtype=torch.int64, device=self.device)
        w64[:, 1].fill_(0)
        put(w64[:, 2], fields["device_ts_ns"], _as_i64)
        put(w64[:, 3], fields["nonce_counter"], _as_i64)
        put(w32[:, 8], fields["pos_start"], _as_i32)
        put(w32[:, 9], fields["pos_count"], _as_i32)
        put(w32[:, 10], fields["tenant_idx"], _as_i32)
        put(w32[:, 11], fields["session_idx"], _as_i32)
        put(w32[:, 12], fields["epoch"], _as_i32)
        put(w32[:, 13], fields["nbytes"], _as_i32)
        put(w16[:, 28], fields["layer"], _as_i16)
        put(w16[:, 29], fields["row"], _as_i16)
        w16[:, 31].fill_(0)
        view[:, 60].fill_(op)
        put(view[:, 61], fields["status"], int)
        self.commit(n, first)
        return first

    # -- drain side ---------------------------------------------------------------
    def collect(self):
        """Records whose copy has completed, as (first_no, records) in commit order; frees their slots.

        Returns (chunks, still_waiting) where still_waiting says that some
        committed copy has not completed yet.  Called by the drain thread only.
        """
        log = self._log
        with log._lock:
            ready = [r for r in self._res if r.event is not None and r.event is not False and not r.taken]
        out = []
        waiting = False
        for r in ready:
            if not self._copy_done(r.event):
                waiting = True
                continue
            recs = self._staging_np[r.slot:r.slot + r.n].copy()
            recs["record_no"] = np.arange(r.first_no, r.first_no + r.n, dtype=np.uint64)
            recs["host_ts_ns"] = log._clock()
            out.append((r.first_no, recs))
            r.taken = True
        with log._lock:
            freed = False
            while self._res and self._res[0].taken:
                self._tail += self._res.popleft().span
                freed = True
            if freed:
                self._space.notify_all()
        return out, waiting
