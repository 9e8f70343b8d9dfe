"""The drain thread of a KVAuditLog: rings -> record-number order -> in-memory store and signed file.

One ``Drain`` per log.  Each pass takes what the host ring holds and what
the CUDA rings have copied back, delivers it in record-number order (records
that arrive ahead of their turn wait, sorted, until the gap before them
fills) as one batch per pass, writes new table entries, details and records
to the sink, and reports failures and isolation
violations to Python ``logging``.  Flush and queries wait on ``done`` for
``persisted`` / ``delivered`` to pass their target.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np

from ..errors import AuditError, KVCacheError
from .records import NONE16, OP_NAMES, RECORD_DTYPE, Op, Status

__all__ = ["Drain"]

# failures and violations itemised in the log per delivered batch; device tag failures kept for flush()
_ITEMISE = 1000
# the codes the delivery checks compare with, as plain ints (an enum member's lookup costs more than the test)
_VIOLATION = int(Op.ISOLATION_VIOLATION)
_DECRYPT = int(Op.DECRYPT)
_AUTH_FAILED = int(Status.AUTH_FAILED)
_SLOT = np.dtype((np.void, RECORD_DTYPE.itemsize))


def _drain_main(ref) -> None:
    drain = None
    try:
        while True:
            drain = ref()
            if drain is None or not drain.run_once():
                return
            drain = None
    except BaseException as e:   # a bug outside run_once's guarded part: fail the log, never hang it
        drain = ref()
        if drain is not None:
            drain.died(e)
    finally:
        drain = ref()
        if drain is not None:
            drain.wake_all()
        drain = None


class Drain:
    """Moves records from the rings of one log into its store and sink, on a thread of its own.

    ``alloc``: the log's RecordAllocator; ``ring``: its HostRing; ``space``:
    the condition its host emitters wait on; ``store`` and ``store_lock``: the
    columnar store and the lock queries read it under; ``names`` and
    ``details``: the NameTable and DetailTexts; ``sink``: the AuditSink or None.
    """

    def __init__(self, alloc, ring, space, store, store_lock, names, details, sink, logger, *,
                 interval: float, wake_at: int, first_no: int = 0):
        self.alloc = alloc
        self.ring = ring
        self.space = space
        self.done = threading.Condition(alloc.lock)   # flush and queries wait here
        self.store = store
        self.store_lock = store_lock
        self.names = names
        self.details = details
        self.sink = sink
        self.logger = logger
        self.interval = interval
        self.wake_at = wake_at
        self.delivered = first_no     # every record below this number is in the store (and sink)
        self.persisted = first_no     # ... and flushed to disk
        self.flush_target = first_no
        self.pending: list = []       # arrays of records that arrived ahead of their turn (copies)
        self.cuda_waiting = False
        self.stopping = False
        self.abandon = False
        self.idle = False
        self.busy_ns = 0
        self.drained = 0
        self.failures = 0             # drained records with status != OK
        self.violations = 0           # drained isolation-violation records
        # device-written DECRYPT records that failed authentication and that no flush() has raised yet:
        # on a GPU the hot path cannot raise, so flush() is one of the sync points that does
        self.device_auth_failures: list[np.void] = []
        self.device_fail_lock = threading.Lock()
        self.thread = threading.Thread(target=_drain_main, args=(weakref.ref(self),),
                                       name="pqc-kv-audit-drain", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    # -- the thread -------------------------------------------------------------------
    def run_once(self) -> bool:
        """One pass; False when the log is closed and empty."""
        alloc = self.alloc
        ring = self.ring
        with alloc.lock:
            pending = ring.written - ring.read
            urgent = (pending >= self.wake_at or self.stopping
                      or (self.flush_target > self.persisted
                          and (pending > 0 or self.delivered >= self.flush_target)))
            if not urgent:
                self.idle = True
                alloc.work.wait(0.0005 if self.cuda_waiting else self.interval)
                self.idle = False
            segs, upto = ring.take()
            tables = self.names.take_pending()
            details = self.details.take_pending()
            flush_target = self.flush_target
            stopping = self.stopping
            cuda_rings = alloc.rings()
        sink = self.sink
        t0 = time.perf_counter_ns()
        waiting = False
        flushed = None
        try:
            if sink is not None:
                self._sink_ok(sink.write_tables, tables)
                self._sink_ok(sink.write_details, details)
            borrowed = self._segment_views(segs)
            owned = []
            for cr in cuda_rings:
                runs = getattr(cr, "collect_runs", None)
                if runs is not None:
                    arrays, still = runs()
                else:                   # a ring with only collect(): its (first_no, records) chunks
                    chunks, still = cr.collect()
                    arrays = [recs for _, recs in chunks]
                waiting |= still
                owned.extend(arrays)
            self._arrive(borrowed, owned)
            if self.delivered >= flush_target and sink is not None and self._sink_ok(sink.flush):
                flushed = self.delivered
        except BaseException as e:   # a bug or a failing CUDA runtime: report it, never hang emitters
            with alloc.lock:
                alloc.fail(e)
            self.logger.error("audit drain failed: %r", e)
        self.busy_ns += time.perf_counter_ns() - t0
        with alloc.lock:
            ring.release(upto)
            self.cuda_waiting = waiting
            if sink is None:
                self.persisted = self.delivered
            elif flushed is not None:
                self.persisted = max(self.persisted, flushed)
            self.details.forget_before(self.store.first_kept)
            self.space.notify_all()
            self.done.notify_all()
            if stopping and (alloc.error is not None or self.abandon
                             or (ring.written == ring.read and self.delivered >= alloc.next_no)):
                return False
        return True

    def died(self, e: BaseException) -> None:
        """The thread raised outside its guarded part: keep the cause for emitters and flush."""
        err = AuditError(f"the audit drain thread died: {e!r}")
        err.__cause__ = e
        with self.alloc.lock:
            self.alloc.fail(err)
        try:
            self.logger.error("audit drain thread died: %r", e)
        except Exception:
            pass

    def wake_all(self) -> None:
        """Wake every thread waiting on the drain (emitters, flush, queries, CUDA rings)."""
        self.alloc.wake_all()
        with self.alloc.lock:
            self.done.notify_all()

    def _sink_ok(self, call, *args) -> bool:
        """Call the sink unless the pipeline failed; on failure keep the error (emitters and flush raise it)."""
        if self.alloc.error is not None:
            return False
        try:
            call(*args)
            return True
        except Exception as e:
            with self.alloc.lock:
                self.alloc.fail(e if isinstance(e, KVCacheError) else AuditError(f"audit sink: {e!r}"))
            self.logger.error("audit log file failed: %s", e)
            return False

    def _segment_views(self, segs) -> list:
        """The host ring's segments (slot order) as views of its buffer, one per run of consecutive slots
        (the records carry their numbers; the order of delivery is sorted out by ``_arrive``)."""
        buf = self.ring.buf
        views = []
        i = 0
        while i < len(segs):
            s, _, k = segs[i]
            while i + 1 < len(segs) and segs[i + 1][0] == s + k:
                k += segs[i + 1][2]
                i += 1
            views.append(buf[s:s + k])
            i += 1
        return views

    def _arrive(self, borrowed: list, owned: list) -> None:
        """Deliver what one pass took, in record-number order, with the records that wait for their turn.

        ``borrowed``: views of the host ring (its slots are freed after the pass: what waits is copied);
        ``owned``: arrays of the CUDA rings. Whole batches, no Python work per record: when some record
        continues ``delivered``, everything taken and waiting is put in one array, sorted by record number,
        and its dense run from ``delivered`` on goes to the store and sink at once; the rest waits in
        ``pending`` (sorted). When none does, the arrivals join ``pending`` as they are. A record numbered
        below ``delivered`` or twice is a broken ring: an AuditError (the pipeline fails), never a wait.
        """
        arrivals = [a for a in borrowed + owned if len(a)]
        if not arrivals:
            return
        delivered = self.delivered
        if len(arrivals) == 1 and not self.pending:     # one run (a host ring on its own): in order already?
            numbers = arrivals[0]["record_no"]
            if numbers[0] == delivered and np.array_equal(
                    numbers, np.arange(delivered, delivered + len(numbers), dtype=np.uint64)):
                self._deliver(arrivals[0])
                return
        lo = min(int(a["record_no"].min()) for a in arrivals)
        if lo < delivered:
            raise AuditError(f"internal: audit record {lo} arrived after records up to {delivered - 1} "
                             "were delivered (a ring handed it on twice or misnumbered it)")
        if lo > delivered:          # nothing can go before the record numbered ``delivered`` arrives
            self.pending = self.pending + [a.copy() for a in borrowed if len(a)] + [a for a in owned if len(a)]
            return
        parts = self.pending + arrivals
        if len(parts) == 1:
            whole = parts[0].view(_SLOT)
        else:   # whole records as opaque 64-byte items: a structured concatenation promotes field by field
            whole = np.concatenate([p.view(_SLOT) for p in parts])
        numbers = whole.view(RECORD_DTYPE)["record_no"]
        due = np.arange(delivered, delivered + len(numbers), dtype=np.uint64)
        if np.array_equal(numbers, due):    # in order and dense already: delivered as it is
            self.pending = []
            self._deliver(whole.view(RECORD_DTYPE))
            return
        order = np.argsort(numbers, kind="stable")
        got = numbers[order]
        off = np.flatnonzero(got != due)
        m = int(off[0]) if len(off) else len(got)
        if m < len(got) and got[m] == got[m - 1]:
            raise AuditError(f"internal: audit record {int(got[m])} arrived twice")
        self.pending = [whole[order[m:]].view(RECORD_DTYPE)] if m < len(got) else []
        self._deliver(whole[order[:m]].view(RECORD_DTYPE))

    def _deliver(self, recs: np.ndarray) -> None:
        with self.store_lock:
            self.store.append(recs)
        self.delivered += len(recs)
        self.drained += len(recs)
        if self.sink is not None:
            self._sink_ok(self.sink.write_records, recs)
        failed = recs["status"] != 0
        violation = recs["op"] == _VIOLATION
        bad = np.flatnonzero(failed | violation)
        if not len(bad):
            return
        self.failures += int(np.count_nonzero(failed))
        self.violations += int(np.count_nonzero(violation))
        dev = np.flatnonzero(failed & (recs["device_ts_ns"] != 0) & (recs["op"] == _DECRYPT)
                             & (recs["status"] == _AUTH_FAILED))
        if len(dev):
            with self.device_fail_lock:
                if len(self.device_auth_failures) < _ITEMISE:
                    self.device_auth_failures.extend(recs[dev[:_ITEMISE]].copy())
        for i in bad[:_ITEMISE]:
            self._warn(recs[int(i)])
        if len(bad) > _ITEMISE:
            self.logger.warning("audit: %d more failures or violations in records %d..%d not itemised",
                                len(bad) - _ITEMISE, int(recs["record_no"][0]), int(recs["record_no"][-1]))

    def _warn(self, r) -> None:
        op = OP_NAMES.get(int(r["op"]), str(int(r["op"])))
        layer = int(r["layer"])
        ps, pc = int(r["pos_start"]), int(r["pos_count"])
        try:
            status = Status(int(r["status"])).name
        except ValueError:
            status = str(int(r["status"]))
        self.logger.warning(
            "audit %s %s: tenant=%r session=%r layer=%s positions=%s row=%s record=%d details=%s",
            op, status, self.names.tenant_label(int(r["tenant_idx"])),
            self.names.session_label(int(r["session_idx"])), "-" if layer == NONE16 else layer,
            f"{ps}..{ps + pc - 1}" if pc else "-", "-" if int(r["row"]) == NONE16 else int(r["row"]),
            int(r["record_no"]), self.details.get(int(r["record_no"])))

    # -- callers' side ------------------------------------------------------------------
    def take_device_failures(self) -> list:
        with self.device_fail_lock:
            failures, self.device_auth_failures = self.device_auth_failures, []
        return failures

    def wait_persisted(self, timeout: float | None) -> bool:
        """Wait until every record numbered so far is queryable and persisted (AuditError if the pipeline
        failed); False on timeout."""
        alloc = self.alloc
        with alloc.lock:
            target = alloc.next_no
            if target > self.flush_target:
                self.flush_target = target
            alloc.work.notify()
            ok = self.done.wait_for(lambda: self.persisted >= target or alloc.error is not None
                                    or not self.thread.is_alive(), timeout)
            if alloc.error is not None:
                raise AuditError(f"the audit pipeline failed: {alloc.error}") from alloc.error
            if ok and self.persisted < target:
                raise AuditError("the audit drain thread stopped before the flush completed")
            return bool(ok)

    def wait_delivered(self) -> None:
        """Wait until every record numbered so far is in the in-memory store (not necessarily on disk)."""
        alloc = self.alloc
        with alloc.lock:
            target = alloc.next_no
            if self.delivered >= target:
                return
            alloc.work.notify()
            self.done.wait_for(lambda: self.delivered >= target or alloc.error is not None
                               or not self.thread.is_alive())
            if self.delivered < target:
                raise AuditError(f"the audit pipeline failed: {alloc.error}") from alloc.error

    def stop(self, abandon: bool) -> None:
        """Make the thread finish (after draining everything, unless ``abandon``) and wait for it."""
        with self.alloc.lock:
            self.alloc.closed = True
            self.stopping = True
            self.abandon = abandon
            self.alloc.work.notify()
        self.thread.join()

    def reorder_pending(self) -> int:
        return sum(len(a) for a in self.pending)
