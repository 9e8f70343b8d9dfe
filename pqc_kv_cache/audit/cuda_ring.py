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
3. ``commit(n)`` hands the slots to a batch of written reservations (and
   notes the current stream); nothing is enqueued yet.  The batch is
   published — one event on each stream its commits came from, a side stream
   waiting for them, one device-to-pinned copy per contiguous run of slots,
   one completion event — by the drain thread at its next pass, or by the
   commit that brings the batch to ``publish_at`` records, or before an
   emitter waits for room.  So one event and one copy serve the records of
   many launches (a decode step's layers), and the compute thread usually
   makes no CUDA call for the audit at all.

The drain thread (never the compute thread) polls the completion events,
reads finished records from the staging memory, sets their record number
(host-assigned) and host timestamp, hands them to the log's reorder buffer and
then frees the slots.  Slots are freed in reservation order; a reservation
that wraps past the end of the buffer starts at slot 0 and the skipped tail is
freed with it.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import numpy as np

from ..errors import BackendUnavailableError
from .fields import check_int, field_int
from .records import NONE16, RECORD_DTYPE, RECORD_SIZE, Status
from .torch_records import fill_records, torch_fields

__all__ = ["CudaAuditRing"]

_FAILED = object()    # the event of an abandoned reservation: nothing to wait for


class _Reservation:
    __slots__ = ("first_no", "n", "slot", "span", "thread", "event", "taken", "template", "failed", "stream")

    def __init__(self, first_no, n, slot, span, thread, template=None):
        self.stream = None        # the stream whose work wrote the records (set by commit)
        self.first_no = first_no
        self.n = n
        self.slot = slot
        self.span = span          # slots this reservation frees: n plus any skipped tail
        self.thread = thread
        self.event = None         # completion event of the staging copy, set by commit
        self.taken = False        # the drain thread has handed its records on
        self.template = template  # the ERROR record written in its place if it is abandoned
        self.failed = False       # abandoned: the drain writes ERROR records from the template


class _Oversize:
    """A reservation of more records than the ring holds: a scratch buffer, copied in by commit in pieces."""
    __slots__ = ("first_no", "n", "buf", "thread", "template", "claimed")

    def __init__(self, first_no, n, buf, thread, template):
        self.first_no, self.n, self.buf, self.thread, self.template = first_no, n, buf, thread, template
        self.claimed = False


def _template(op, tenant_idx, session_idx, layer) -> np.ndarray:
    """One record with the fields of an ERROR record standing in for records that were never written."""
    t = np.zeros(1, dtype=RECORD_DTYPE)
    t["op"] = op
    t["status"] = int(Status.ERROR)
    t["tenant_idx"] = tenant_idx
    t["session_idx"] = session_idx
    t["layer"] = layer
    t["row"] = NONE16
    return t


class CudaAuditRing:
    """Device ring of one CUDA device, fed into a KVAuditLog (``log.cuda_ring(device)``).

    ``allocator``: the log's RecordAllocator (``log.allocator``): record
    numbers, the log's lock, its failure state and the drain's wake-ups.
    """

    def __init__(self, allocator, device, capacity: int):
        import torch

        self._torch = torch
        self.capacity = capacity = check_int("ring capacity", capacity, 1)
        self.device = torch.device(device)
        self._alloc = allocator
        self._space = allocator.space_condition()
        self._allocate()
        self._staging_np = self.staging.numpy().view(RECORD_DTYPE).reshape(capacity)
        self._head = 0            # slot counter reserved so far (incl. skipped tails); only grows
        self._tail = 0            # slot counter freed so far
        self._res: collections.deque[_Reservation] = collections.deque()
        self._oversize: list[_Oversize] = []
        self._stand_ins: list[tuple[int, np.ndarray]] = []   # ERROR records of abandoned oversize reservations
        self._batch: list[_Reservation] = []   # committed, copy not yet enqueued (published)
        self._batch_records = 0
        self.publish_at = max(1, capacity // 4)   # a commit bringing the batch to this many publishes it
        self._templates: dict[tuple, np.ndarray] = {}   # ERROR-record templates of ``records_at`` (read-only)

    # -- device work: the only CUDA calls of the ring --------------------------------------
    def _allocate(self) -> None:
        """Device buffer, pinned staging of the same size, and the side stream of the copies."""
        torch = self._torch
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(f"a CUDA audit ring needs a CUDA device, got {self.device}")
        self.buf = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8, device=self.device)
        self.staging = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8, pin_memory=True)
        self._side = torch.cuda.Stream(device=self.device)

    def _current_stream(self):
        """The stream whose work writes the records being committed (None where there is no CUDA stream)."""
        if self.device.type != "cuda":
            return None
        return self._torch.cuda.current_stream(self.device)

    def _enqueue_copy(self, slot: int, n: int, after=None):
        """Order the copy of slots ``slot .. slot+n`` after the work enqueued so far on the streams ``after``
        (default: the current stream); its completion event."""
        torch = self._torch
        for stream in after or (torch.cuda.current_stream(self.device),):
            written = torch.cuda.Event()
            written.record(stream)
            self._side.wait_event(written)
        with torch.cuda.stream(self._side):
            self.staging[slot:slot + n].copy_(self.buf[slot:slot + n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._side)
        return copied

    def _scratch(self, n: int):
        """A [n, 64] buffer on the ring's device for a reservation larger than the ring (stream-ordered)."""
        return self._torch.empty((n, RECORD_SIZE), dtype=self._torch.uint8, device=self.buf.device)

    def _copy_in(self, slot: int, src) -> None:
        """Copy records written into a scratch buffer into ring slots, on the current stream."""
        self.buf[slot:slot + src.shape[0]].copy_(src, non_blocking=True)

    @staticmethod
    def _copy_done(event) -> bool:
        """Non-blocking: has the copy behind ``event`` completed?"""
        return event.query()

    # -- compute side (host work only, no device synchronisation) -----------------------
    def _take_slots(self, n: int, first_no: int | None, template) -> _Reservation:
        """Wait for ``n`` contiguous slots (the drain frees them) and take them; the caller holds the lock.

        New record numbers are allocated unless ``first_no`` is given (a piece of an oversize reservation).
        """
        alloc = self._alloc
        stalled = False
        while True:
            alloc.check_open()
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
                alloc.stalls += 1
                stalled = True
            alloc.work.notify()
            self._space.wait(0.1)     # re-checks closed / failed while waiting for the drain
        slot = (self._head + skip) % self.capacity
        self._head += skip + n
        if first_no is None:
            first_no = alloc.take(n)
        res = _Reservation(first_no, n, slot, skip + n, threading.get_ident(), template)
        self._res.append(res)
        return res

    def reserve(self, n: int, *, op: int = 0, tenant_idx: int = 0, session_idx: int = 0, layer: int = NONE16):
        """``n`` slots as a [n, 64] uint8 device view, and the record number of its first slot.

        ``op``, ``tenant_idx``, ``session_idx`` and ``layer`` describe the ERROR records that stand in
        for the reservation if it is abandoned (see ``abandon``).  More records than the ring holds are
        reserved in a scratch buffer of their own; ``commit`` copies them through the ring in pieces,
        waiting for the drain between pieces (back-pressure, never a refusal for size).
        """
        try:
            n = check_int("reserve: the number of records", n, 1)
        except TypeError as e:   # a count that is no int is a bad value here, as it always was
            raise ValueError(str(e)) from None
        template = _template(int(op), field_int("tenant_idx", tenant_idx), field_int("session_idx", session_idx),
                             field_int("layer", layer))
        alloc = self._alloc
        if n <= self.capacity:
            with alloc.lock:
                res = self._take_slots(n, None, template)
            return self.buf[res.slot:res.slot + n], res.first_no
        buf = self._scratch(n)
        with alloc.lock:
            alloc.check_open()
            first = alloc.take(n)
            self._oversize.append(_Oversize(first, n, buf, threading.get_ident(), template))
        return buf, first

    def _claim(self, n: int, first_no: int | None, what: str):
        """The caller's reservation (by first record number, or the thread's oldest open one), claimed."""
        me = threading.get_ident()
        for r in self._res:
            if r.event is None and not r.failed and (r.first_no == first_no if first_no is not None
                                                     else r.thread == me):
                break
        else:
            for r in self._oversize:
                if not r.claimed and (r.first_no == first_no if first_no is not None else r.thread == me):
                    break
            else:
                raise ValueError(f"{what} without a matching reservation"
                                 + ("" if first_no is None else f" starting at record {first_no}"))
        if r.n != n:
            raise ValueError(f"{what} of {n} records, but the reservation holds {r.n}")
        if isinstance(r, _Oversize):
            r.claimed = True
        else:
            r.event = False       # claimed: a concurrent commit cannot take it
        return r

    def commit(self, n: int, first_no: int | None = None) -> None:
        """Hand ``n`` written records to the drain: event on the current stream, async copy on the side stream.

        Without ``first_no`` the calling thread's oldest uncommitted
        reservation is committed; its size must be ``n``.  If the copy
        cannot be enqueued, the records are abandoned (ERROR records stand
        in for them) and the error is raised: the log never waits on them.
        """
        alloc = self._alloc
        with alloc.lock:
            res = self._claim(n, first_no, "commit")
        if isinstance(res, _Oversize):
            self._commit_oversize(res)
            return
        self._commit_claimed(res)

    def _commit_claimed(self, res: _Reservation) -> None:
        """Hand a claimed reservation's records to the batch the drain publishes."""
        alloc = self._alloc
        try:
            stream = self._current_stream()
        except BaseException:
            self._fail(res)
            raise
        with alloc.lock:
            res.stream = stream
            self._batch.append(res)
            self._batch_records += res.n
            alloc.emitted += res.n      # handed to the drain, which publishes the batch at its next pass
            full = self._batch_records >= self.publish_at
        if full:
            self.publish()

    def publish(self) -> None:
        """Enqueue the copies of the committed batch: one event per stream its commits came from, one copy
        per contiguous run of slots, one completion event. If that raises, the batch's records are
        abandoned (ERROR records stand in for them) and the error is raised."""
        alloc = self._alloc
        with alloc.lock:
            batch, self._batch, self._batch_records = self._batch, [], 0
        if not batch:
            return
        streams = list({id(r.stream): r.stream for r in batch if r.stream is not None}.values())
        runs: list[list] = []                   # [slot, n, reservations] of contiguous slots
        for r in sorted(batch, key=lambda r: r.slot):
            if runs and runs[-1][0] + runs[-1][1] == r.slot:
                runs[-1][1] += r.n
                runs[-1][2].append(r)
            else:
                runs.append([r.slot, r.n, [r]])
        done: list[tuple[object, list]] = []
        try:
            for slot, n, members in runs:
                done.append((self._enqueue_copy(slot, n, streams), members))
        except BaseException:
            with alloc.lock:
                for r in batch:
                    r.failed = True
                    r.event = _FAILED
                alloc.work.notify()
            raise
        with alloc.lock:
            for copied, members in done:
                for r in members:
                    r.event = copied
            alloc.work.notify()

    def _commit_oversize(self, big: _Oversize) -> None:
        """Copy an oversize reservation through the ring in pieces; what cannot be copied is abandoned."""
        alloc = self._alloc
        done = 0
        try:
            while done < big.n:
                k = min(self.capacity, big.n - done)
                with alloc.lock:
                    res = self._take_slots(k, big.first_no + done, big.template)
                    res.event = False
                try:
                    self._copy_in(res.slot, big.buf[done:done + k])
                    copied = self._enqueue_copy(res.slot, k)
                except BaseException:
                    self._fail(res)
                    raise
                with alloc.lock:
                    res.event = copied
                    alloc.committed(k)
                done += k
        except BaseException:
            self._fail_range(big, done)
            raise
        finally:
            with alloc.lock:
                self._oversize.remove(big)
                alloc.work.notify()

    def abandon(self, n: int, first_no: int | None = None) -> None:
        """Give up a reservation whose records will not be written (the launch that was to write them raised).

        Host work only, no device call (it must work after a CUDA error):
        the drain hands on ERROR records, with the fields given to
        ``reserve``, for its record numbers, so the log stays dense and
        nothing waits for them.
        """
        alloc = self._alloc
        with alloc.lock:
            res = self._claim(n, first_no, "abandon")
        if isinstance(res, _Oversize):
            self._fail_range(res, 0)
            with alloc.lock:
                self._oversize.remove(res)
        else:
            self._fail(res)

    def _fail(self, res: _Reservation) -> None:
        with self._alloc.lock:
            res.failed = True
            res.event = _FAILED
            self._alloc.committed(res.n)

    def _fail_range(self, big: _Oversize, done: int) -> None:
        """ERROR records for records ``done ..`` of an oversize reservation, handed to the drain directly."""
        if done >= big.n:
            return
        recs = np.repeat(big.template, big.n - done)
        recs["record_no"] = np.arange(big.first_no + done, big.first_no + big.n, dtype=np.uint64)
        with self._alloc.lock:
            self._stand_ins.append((big.first_no + done, recs))
            self._alloc.committed(big.n - done)

    @contextlib.contextmanager
    def reservation(self, n: int, *, op: int = 0, tenant_idx: int = 0, session_idx: int = 0,
                    layer: int = NONE16):
        """``with ring.reservation(n, op=...) as (view, first_no):`` launch the kernel that writes the records.

        Commits on leaving the block; if anything in it raises, the
        reservation is abandoned (ERROR records with these fields) and the
        exception goes on.  The one safe way to span reserve -> commit.
        """
        view, first = self.reserve(n, op=op, tenant_idx=tenant_idx, session_idx=session_idx, layer=layer)
        try:
            yield view, first
        except BaseException:
            self.abandon(n, first)
            raise
        self.commit(n, first)

    def records_at(self, n: int, *, op: int, tenant_idx: int, session_idx: int, layer: int,
                   tail=None, head=None) -> "_RecordsAt":
        """``with ring.records_at(n, op=...) as (address, first_no):`` what ``reservation`` does, for at most
        ``capacity`` records, yielding the device address of the reserved slots instead of a view, and
        committing (or abandoning) the reservation it took without looking it up: a launch's path that runs
        for every layer of every decode step. ``tail``: the last ``len(tail)`` slots are for these records
        (a RECORD_DTYPE array the caller copies in, or a callable returning the records the launch writes
        there, called only if the block raises); if the block raises, their ERROR stand-ins keep their
        fields (operation, tenant, row, positions) instead of the launch's. ``head``: the stand-ins of the
        first slots (the launch's own records: a RECORD_DTYPE array naming each one's tenant, session and
        row, or a callable returning one, called only if the block raises); the others take the template."""
        if type(n) is not int or not 1 <= n <= self.capacity:
            raise ValueError(f"records_at takes 1 .. {self.capacity} records, got {n!r}")
        key = (op, tenant_idx, session_idx, layer)
        template = self._templates.get(key)
        if template is None:
            template = _template(int(op), field_int("tenant_idx", tenant_idx), field_int("session_idx", session_idx),
                                 field_int("layer", layer))
            template.flags.writeable = False
            if len(self._templates) >= 1024:
                self._templates.clear()
            self._templates[key] = template
        return _RecordsAt(self, n, template, tail, head)

    def _take_for(self, n: int, template: np.ndarray) -> _Reservation:
        with self._alloc.lock:
            res = self._take_slots(n, None, template)
            res.event = False     # claimed by its block: neither commit() nor abandon() of another takes it
        return res

    def _slot_address(self, slot: int) -> int:
        return self.buf.data_ptr() + slot * RECORD_SIZE

    def emit_torch(self, op, *, tenant_idx, session_idx, layer=NONE16, row=NONE16, pos_start=0, pos_count=0,
                   nonce_counter=0, epoch=0, nbytes=0, status=0, device_ts_ns=0) -> int:
        """Build records with torch ops on the device (fields: ints or 1-D device tensors) and commit them.

        One record per element; returns the first record number.  Tensors
        must be integer tensors on this ring's device; their values are
        written with the bits of the field's width (no range check: that
        would need a device read-back).  Scalars are range-checked, and
        everything is checked before a slot is reserved; if writing the
        records raises, the reservation is abandoned (ERROR records).
        """
        op, n, fields = torch_fields(op, self.device, dict(
            tenant_idx=tenant_idx, session_idx=session_idx, layer=layer, row=row, pos_start=pos_start,
            pos_count=pos_count, nonce_counter=nonce_counter, epoch=epoch, nbytes=nbytes, status=status,
            device_ts_ns=device_ts_ns))
        if n == 0:
            with self._alloc.lock:
                return self._alloc.next_no
        scalar = {k: (v if isinstance(v, int) else 0) for k, v in fields.items()}
        with self.reservation(n, op=op, tenant_idx=scalar["tenant_idx"], session_idx=scalar["session_idx"],
                              layer=scalar["layer"] if isinstance(fields["layer"], int) else NONE16) as (view, first):
            fill_records(view, first, n, op, fields)
        return first

    # -- drain side ---------------------------------------------------------------
    def collect(self):
        """Records whose copy has completed, as (first_no, records) in commit order; frees their slots.

        Returns (chunks, still_waiting) where still_waiting says that some
        committed copy has not completed yet.  Called by the drain thread only.
        """
        runs, waiting = self._collect(True)
        out = []
        for spans, recs in runs:
            off = 0
            for first, n in spans:
                out.append((first, recs[off:off + n]))
                off += n
        return out, waiting

    def collect_runs(self):
        """What ``collect`` takes, as few arrays as there are runs of consecutive slots (and stand-ins),
        each record numbered in its ``record_no``: (arrays, still_waiting). What the drain calls."""
        runs, waiting = self._collect(False)
        return [recs for _, recs in runs], waiting

    def _collect(self, spans: bool):
        """(spans or None, records) per run of completed reservations in consecutive slots (one copy out of
        the staging memory serves a run) and per abandoned reservation; frees their slots."""
        alloc = self._alloc
        try:
            self.publish()
        except Exception:       # noqa: BLE001 - its records are ERROR records now; the drain goes on
            pass
        with alloc.lock:
            ready = [r for r in self._res if r.event is not None and r.event is not False and not r.taken]
            stand_ins, self._stand_ins = self._stand_ins, []
        out = []
        waiting = False
        ts = alloc.clock() if ready or stand_ins else 0     # one pick-up time for the pass
        run: list[_Reservation] = []
        event, copied = None, False     # the reservations of a published run share one completion event
        for r in ready:
            if not r.failed:
                if r.event is not event:
                    event, copied = r.event, self._copy_done(r.event)
                if not copied:
                    waiting = True
                    continue
            if run and (r.failed or r.slot != run[-1].slot + run[-1].n):
                out.append(self._take_run(run, ts, spans))
                run = []
            if r.failed:
                recs = r.template.copy() if r.template.shape[0] == r.n else np.repeat(r.template, r.n)
                recs["record_no"] = np.arange(r.first_no, r.first_no + r.n, dtype=np.uint64)
                recs["host_ts_ns"] = ts
                out.append(([(r.first_no, r.n)], recs))
                r.taken = True
            else:
                run.append(r)
        if run:
            out.append(self._take_run(run, ts, spans))
        for first, recs in stand_ins:
            recs["host_ts_ns"] = ts
            out.append(([(first, len(recs))], recs))
        with alloc.lock:
            freed = False
            while self._res and self._res[0].taken:
                self._tail += self._res.popleft().span
                freed = True
            if freed:
                self._space.notify_all()
        return out, waiting

    def _take_run(self, run: list, ts: int, spans: bool):
        """Copy the staged records of reservations in consecutive slots out at once and number them (each
        reservation its own range, set in one vectorised step): (spans or None, records)."""
        first = run[0]
        total = run[-1].slot + run[-1].n - first.slot
        recs = self._staging_np[first.slot:first.slot + total].copy()
        if len(run) == 1:
            recs["record_no"] = np.arange(first.first_no, first.first_no + total, dtype=np.uint64)
        else:
            counts = np.fromiter((r.n for r in run), dtype=np.int64, count=len(run))
            starts = np.fromiter((r.first_no for r in run), dtype=np.int64, count=len(run))
            # record i of the run, in reservation j, is starts[j] + (i - offset of j)
            recs["record_no"] = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total)
        recs["host_ts_ns"] = ts
        for r in run:
            r.taken = True
        return ([(r.first_no, r.n) for r in run] if spans else None), recs


class _RecordsAt:
    """The block of ``CudaAuditRing.records_at`` (a class: it is on every decode step's path)."""

    __slots__ = ("_ring", "_n", "_template", "_tail", "_head", "_res")

    def __init__(self, ring: CudaAuditRing, n: int, template: np.ndarray, tail: np.ndarray | None, head=None):
        self._ring, self._n, self._template, self._tail, self._head = ring, n, template, tail, head

    def __enter__(self) -> tuple[int, int]:
        res = self._res = self._ring._take_for(self._n, self._template)
        return self._ring._slot_address(res.slot), res.first_no

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            n, tail, head = self._n, self._tail, self._head
            try:
                head = head() if callable(head) else head
            except Exception:       # noqa: BLE001 - the template's stand-ins still fill every slot
                head = None
            try:
                tail = tail() if callable(tail) else tail
            except Exception:       # noqa: BLE001 - as for head
                tail = None
            if head is not None and not 0 < head.shape[0] <= n:
                head = None
            if tail is not None and not 0 < tail.shape[0] <= n:
                tail = None
            if head is not None or tail is not None:     # one stand-in per slot
                stand_ins = np.repeat(self._template, n)
                if head is not None:
                    stand_ins[:head.shape[0]] = head
                if tail is not None:
                    stand_ins[n - tail.shape[0]:] = tail
                stand_ins["status"] = int(Status.ERROR)
                self._res.template = stand_ins
            self._ring._fail(self._res)
        else:
            self._ring._commit_claimed(self._res)
        return False
