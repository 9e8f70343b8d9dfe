"""Host ring and drain: no loss, no overwrite, back-pressure, record-number order."""

import threading

import numpy as np
import pytest

from pqc_kv_cache.audit import RECORD_DTYPE, KVAuditLog, Op, verify_log


class Clock:
    """Injected clock: every call advances 1 µs."""

    def __init__(self, start=1_700_000_000_000_000_000):
        self.t = start
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.t += 1000
            return self.t


def test_several_threads_push_100x_ring_capacity_every_record_once_in_order(tmp_path):
    cap = 256
    threads, rounds = 4, 100
    sizes = [1, 7, 33, 300, 64]      # 300 > capacity: one batch must wait for the drain mid-write
    log = KVAuditLog(path=tmp_path / "a.log", ring_records=cap, max_entries=10_000_000, clock=Clock(),
                     frame_records=1000, checkpoint_records=20_000, fsync=False)
    tenants = [log.tenant_index(f"t{i}") for i in range(threads)]
    sessions = [log.session_index("s", f"t{i}") for i in range(threads)]
    barrier = threading.Barrier(threads)
    firsts = [[] for _ in range(threads)]

    def worker(i):
        barrier.wait()
        seq = 0
        for r in range(rounds):
            n = sizes[r % len(sizes)]
            first = log.emit(Op.ENCRYPT, tenant_idx=tenants[i], session_idx=sessions[i], layer=i,
                             nonce_counter=np.arange(seq, seq + n, dtype=np.uint64), pos_start=r, pos_count=1)
            firsts[i].append((first, n))
            seq += n

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log.close()
    total = threads * rounds * sum(sizes) // len(sizes)
    assert total >= 100 * cap
    st = log.stats()
    assert st["emitted"] == st["drained"] == total
    assert st["dropped"] == 0
    assert st["stalls"] > 0

    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok and rep.closed, rep.error
    recs = rep.all_records()
    assert len(recs) == total
    assert np.array_equal(recs["record_no"], np.arange(total, dtype=np.uint64))
    for i in range(threads):
        mine = recs[recs["tenant_idx"] == tenants[i]]
        # every record of the thread exactly once, in the order it emitted them
        assert np.array_equal(mine["nonce_counter"], np.arange(len(mine), dtype=np.uint64))
        for first, n in firsts[i]:
            got = recs[first:first + n]
            assert np.all(got["tenant_idx"] == tenants[i])
    # the in-memory log holds the same records
    assert len(log._store) == total


def test_full_ring_makes_emitter_wait_and_counts_a_stall_never_drops():
    log = KVAuditLog(ring_records=8, clock=Clock())
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    first = log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, pos_start=np.arange(100, dtype=np.uint32),
                     pos_count=1)
    assert first == 0
    log.flush()
    st = log.stats()
    assert st["stalls"] >= 1
    assert st["dropped"] == 0
    assert st["emitted"] == st["drained"] == 100
    got = [e.position for e in reversed(log.entries(limit=None))]
    assert got == list(range(100))
    log.close()


class DeferredRing:
    """Stands in for a device ring: numbers are reserved now, records complete later."""

    def __init__(self, log):
        self.alloc = log.allocator
        self.ready = []

    def reserve(self, n):
        with self.alloc.lock:
            return self.alloc.take(n)

    def complete(self, first, n, tenant_idx):
        recs = np.zeros(n, dtype=RECORD_DTYPE)
        recs["record_no"] = np.arange(first, first + n)
        recs["op"] = Op.ENCRYPT
        recs["tenant_idx"] = tenant_idx
        recs["pos_start"] = np.arange(n)
        recs["pos_count"] = 1
        with self.alloc.lock:
            self.ready.append((first, recs))
            self.alloc.committed(n)

    def collect(self):
        with self.alloc.lock:
            out, self.ready = self.ready, []
        return out, False


def test_records_reserved_early_and_completed_late_are_delivered_in_record_number_order(tmp_path):
    log = KVAuditLog(path=tmp_path / "a.log", clock=Clock(), fsync=False)
    dev = DeferredRing(log)
    log.attach_ring("deferred", dev)
    a = log.tenant_index("a")
    b = log.tenant_index("b")
    s = log.session_index("s", "b")
    reserved = dev.reserve(5)
    after = log.emit(Op.DECRYPT, tenant_idx=b, session_idx=s, pos_start=np.arange(3, dtype=np.uint32),
                     pos_count=1)
    assert (reserved, after) == (0, 5)
    assert log.flush(timeout=0.05) is False      # records 5..7 wait behind the reserved 0..4
    assert log.stats()["reorder_pending"] == 3
    dev.complete(reserved, 5, a)
    assert log.flush() is True
    assert [e.record_number for e in reversed(log.entries(limit=None))] == list(range(8))
    assert [e.tenant_id for e in reversed(log.entries(limit=None))] == ["a"] * 5 + ["b"] * 3
    log.close()
    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok
    assert list(rep.all_records()["record_no"]) == list(range(8))


def test_ring_capacity_must_be_positive():
    with pytest.raises(ValueError):
        KVAuditLog(ring_records=0)


def test_close_with_a_never_committed_reservation_times_out_and_leaves_the_log_unclosed(tmp_path):
    from pqc_kv_cache.errors import AuditError

    log = KVAuditLog(path=tmp_path / "a.log", clock=Clock(), fsync=False)
    dev = DeferredRing(log)
    log.attach_ring("deferred", dev)
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s)
    dev.reserve(4)                                   # never completed
    log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s)
    with pytest.raises(AuditError, match="not committed"):
        log.close(timeout=0.05)
    rep = verify_log(tmp_path / "a.log")
    assert rep.ok and rep.crash_tail and rep.records == 1
