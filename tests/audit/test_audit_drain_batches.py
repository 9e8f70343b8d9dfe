"""The drain delivers whole batches: host and CUDA-ring records that interleave in numbering, and records held
behind an open reservation, reach the store and the file complete, in record-number order, each with its
own fields; a ring that hands a record on twice fails the pipeline; a published run is copied out once."""

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit import RECORD_DTYPE, KVAuditLog, Op, verify_log
from pqc_kv_cache.audit.alloc import RecordAllocator
from pqc_kv_cache.errors import AuditError
from support.audit_fakes import HostTensorRing, attach


def _write(view, op, layer, row0, tenant, session):
    """What a kernel does: the records of a reservation written into its slots (numbers set by the drain)."""
    recs = np.zeros(view.shape[0], dtype=RECORD_DTYPE)
    recs["op"] = int(op)
    recs["layer"] = layer
    recs["row"] = np.arange(row0, row0 + view.shape[0])
    recs["tenant_idx"] = tenant
    recs["session_idx"] = session
    view.numpy()[:] = recs.view(np.uint8).reshape(-1, 64)


def test_interleaved_records_held_behind_an_open_reservation_arrive_complete_in_order_and_attributed(tmp_path):
    steps = 60
    with KVAuditLog(path=tmp_path / "a.log", fsync=False, ring_records=4096) as log:
        ring = attach(log, capacity=2048)
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        held, held_first = ring.reserve(4, op=Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=999)
        expect = {held_first + i: (int(Op.ENCRYPT), 999, i) for i in range(4)}
        for step in range(steps):           # a decode loop: 16 device records and 1 host record per layer step
            view, first = ring.reserve(16, op=Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=step)
            _write(view, Op.ENCRYPT, step, 0, t, s)
            ring.commit(16, first)
            expect.update({first + i: (int(Op.ENCRYPT), step, i) for i in range(16)})
            no = log.emit(Op.READ, tenant_idx=t, session_idx=s, layer=step, row=100 + step)
            expect[no] = (int(Op.READ), step, 100 + step)
            if step % 7 == 0:
                ring.complete()             # some passes take device records, some only host records
        ring.complete()
        assert log.flush(timeout=0.2) is False              # every record waits behind the open reservation
        assert log.stats()["reorder_pending"] == 17 * steps
        _write(held, Op.ENCRYPT, 999, 0, t, s)
        ring.commit(4, held_first)
        ring.complete()
        assert log.flush(timeout=10) is True
        st = log.stats()
        assert st["reorder_pending"] == 0 and st["drained"] == st["emitted"] == 4 + 17 * steps
        entries = list(reversed(log.entries(limit=None)))
    assert [e.record_number for e in entries] == list(range(4 + 17 * steps))
    for e in entries:
        op, layer, row = expect[e.record_number]
        assert (e.operation, e.layer_idx, e.row) == ({int(Op.ENCRYPT): "encrypt", int(Op.READ): "read"}[op],
                                                     layer, row), e.record_number
        assert e.tenant_id == "alice" and e.session_id == "s"
    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok
    recs = rep.all_records()
    assert recs["record_no"].tolist() == list(range(4 + 17 * steps))
    assert [(int(r["op"]), int(r["layer"]), int(r["row"])) for r in recs] == [expect[i] for i in range(len(recs))]


class _TwiceRing:
    """A broken ring: hands the same records on twice (or, with ``shift``, with numbers already delivered)."""

    def __init__(self, log, shift=0):
        self.alloc = log.allocator
        self.ready = []
        self.shift = shift

    def emit(self, n):
        with self.alloc.lock:
            first = self.alloc.take(n)
        recs = np.zeros(n, dtype=RECORD_DTYPE)
        recs["record_no"] = np.arange(first, first + n) - self.shift
        recs["op"] = int(Op.ENCRYPT)
        with self.alloc.lock:
            self.ready += [(first, recs), (first, recs.copy())] if not self.shift else [(first, recs)]
            self.alloc.committed(n)

    def collect(self):
        with self.alloc.lock:
            out, self.ready = self.ready, []
        return out, False


@pytest.mark.parametrize("shift", [0, 3], ids=["twice", "misnumbered"])
def test_a_ring_that_hands_on_records_twice_or_misnumbered_fails_the_pipeline(shift):
    log = KVAuditLog()
    try:
        log.emit(Op.DECRYPT, tenant_idx=0, session_idx=0, pos_start=np.arange(5, dtype=np.uint32), pos_count=1)
        log.flush()
        ring = log.attach_ring("broken", _TwiceRing(log, shift))
        ring.emit(8)
        with pytest.raises(AuditError, match="twice|misnumbered"):
            log.flush(timeout=10)
        with pytest.raises(AuditError):
            log.emit(Op.DECRYPT, tenant_idx=0, session_idx=0)
    finally:
        with pytest.raises(AuditError):
            log.close(timeout=5)


class _CountingRing(HostTensorRing):
    queries = 0

    def _copy_done(self, c):
        self.queries += 1
        return super()._copy_done(c)


def test_collect_runs_copies_a_published_run_once_and_numbers_each_reservation():
    alloc = RecordAllocator()
    ring = _CountingRing(alloc, torch.device("cpu"), 64)     # no drain: publish and collect by hand
    firsts = []
    for layer in range(5):
        view, first = ring.reserve(3, op=Op.ENCRYPT, layer=layer)
        _write(view, Op.ENCRYPT, layer, 0, 1, 2)
        ring.commit(3, first)
        firsts.append(first)
        with alloc.lock:
            alloc.take(2)                   # numbers a host ring takes between the device reservations
    ring.complete()
    assert [(c.slot, c.n) for c in ring.copies] == [(0, 15)]
    arrays, waiting = ring.collect_runs()
    assert not waiting and len(arrays) == 1 and ring.queries == 1     # one completion query per published run
    recs = arrays[0]
    assert recs["record_no"].tolist() == [f + i for f in firsts for i in range(3)]
    assert firsts == [0, 5, 10, 15, 20]
    assert recs["layer"].tolist() == [layer for layer in range(5) for _ in range(3)]
    assert recs["row"].tolist() == [0, 1, 2] * 5
    assert len(set(recs["host_ts_ns"].tolist())) == 1 and recs["host_ts_ns"][0] > 0
    # the slots are free again: a reservation as large as the ring fits
    view, first = ring.reserve(64, op=Op.ENCRYPT)
    assert first == 25
