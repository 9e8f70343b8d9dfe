"""The CUDA ring's host-side bookkeeping and its torch record layout, run on host tensors.

``HostTensorRing`` (tests/support/audit_fakes.py) keeps every method of CudaAuditRing except the three
device calls (allocation, the event-ordered copy, the completion query),
which it replaces with host tensors and copies the test completes.  The real
device path is tested by tests/audit/test_audit_cuda.py on a GPU host.
"""

import contextlib
import threading

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit import NONE16, KVAuditLog, Op, verify_log
from support.audit_fakes import HostTensorRing, attach


@contextlib.contextmanager
def bounded_log(**kw):
    """A log whose close gives up after 5 s: a reservation left open fails the test instead of hanging it."""
    log = KVAuditLog(**kw)
    try:
        yield log
    finally:
        log.close(timeout=5)


def test_emit_torch_writes_every_field_at_the_offsets_of_the_record_layout():
    with KVAuditLog() as log:
        ring = attach(log, immediate=True)
        t = log.tenant_index("alice")
        ring.emit_torch(Op.ROTATE, tenant_idx=0xFFFFFFF0, session_idx=2, layer=NONE16, row=0xFFFE,
                        pos_start=0x80000001, pos_count=5, nonce_counter=(1 << 63) + 5, epoch=9, nbytes=77,
                        status=3, device_ts_ns=123)
        ring.emit_torch(Op.DECRYPT, tenant_idx=torch.tensor([t, t]), session_idx=0,
                        layer=torch.tensor([3, 4], dtype=torch.int16), row=torch.tensor([0, 1]),
                        pos_start=torch.tensor([10, 20]), pos_count=torch.tensor([2, 3], dtype=torch.int32),
                        nonce_counter=torch.tensor([100, 200]), nbytes=torch.tensor([64, 96]))
        log.flush()
        b = log._store.blocks[0]
        rec = {k: [int(x) for x in v[:3]] for k, v in b.cols.items()}
    assert rec["record_no"] == [0, 1, 2]
    assert rec["op"] == [Op.ROTATE, Op.DECRYPT, Op.DECRYPT]
    assert rec["tenant_idx"] == [0xFFFFFFF0, t, t] and rec["session_idx"] == [2, 0, 0]
    assert rec["layer"] == [0xFFFF, 3, 4] and rec["row"] == [0xFFFE, 0, 1]
    assert rec["pos_start"] == [0x80000001, 10, 20] and rec["pos_count"] == [5, 2, 3]
    assert rec["nonce_counter"] == [(1 << 63) + 5, 100, 200] and rec["epoch"] == [9, 0, 0]
    assert rec["nbytes"] == [77, 64, 96] and rec["status"] == [3, 0, 0]
    assert rec["device_ts_ns"] == [123, 0, 0]
    assert all(ts > 0 for ts in rec["host_ts_ns"])        # filled by the drain


def test_device_records_completing_late_are_delivered_before_later_host_records(tmp_path):
    with KVAuditLog(path=tmp_path / "a.log", fsync=False) as log:
        ring = attach(log)
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        view, first = ring.reserve(8)
        host_first = log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, pos_start=np.arange(4, dtype=np.uint32),
                              pos_count=1)
        assert (first, host_first) == (0, 8)
        view[:, 60] = int(Op.ENCRYPT)
        view[:, 56:60] = 0xFF
        ring.commit(8)
        assert log.flush(timeout=0.05) is False           # the copy has not completed
        ring.complete()
        assert log.flush() is True
        ops = [e.operation for e in reversed(log.entries(limit=None))]
    assert ops == ["encrypt"] * 8 + ["decrypt"] * 4
    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok and list(rep.all_records()["record_no"]) == list(range(12))


def test_reservation_that_does_not_fit_before_the_end_starts_at_slot_zero():
    with KVAuditLog() as log:
        ring = attach(log, capacity=64, immediate=True)
        firsts = [ring.emit_torch(Op.ENCRYPT, tenant_idx=0, session_idx=0, pos_start=torch.arange(40),
                                  pos_count=1) for _ in range(5)]
        log.flush()
        got = [e.position for e in reversed(log.entries(limit=None))]
    assert firsts == [0, 40, 80, 120, 160]
    assert got == list(range(40)) * 5


def test_full_device_ring_makes_reserve_wait_and_loses_nothing():
    with KVAuditLog() as log:
        ring = attach(log, capacity=64, immediate=True)

        def worker(w):
            for i in range(100):
                ring.emit_torch(Op.ENCRYPT, tenant_idx=w, session_idx=0, pos_start=torch.arange(48),
                                pos_count=1, nonce_counter=i)

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        log.flush()
        st = log.stats()
        recs = log._query(limit=None, newest_first=False)
    assert st["emitted"] == st["drained"] == 3 * 100 * 48 >= 100 * 64
    assert st["stalls"] > 0 and st["dropped"] == 0
    assert [e.record_number for e in recs] == list(range(3 * 100 * 48))
    for w in range(3):
        mine = [e.sequence_number for e in recs if e.tenant_id == f"#{w}"]     # unregistered index w
        assert mine == sorted(mine) and len(mine) == 100 * 48


def test_commit_must_match_a_reservation():
    with KVAuditLog() as log:
        ring = attach(log)
        with pytest.raises(ValueError, match="reservation"):
            ring.commit(4)
        view, _ = ring.reserve(4)
        view[:, 60] = int(Op.CLOSE)
        with pytest.raises(ValueError, match="holds 4"):
            ring.commit(5)
        with pytest.raises(ValueError):
            ring.reserve(0)
        with pytest.raises(ValueError):
            ring.reserve(True)
        with pytest.raises(TypeError):
            ring.emit_torch(Op.ENCRYPT, tenant_idx=torch.tensor([1.5]), session_idx=0)
        ring.commit(4)
        ring.complete()
        log.flush()
        assert [e.operation for e in log.entries()] == ["close"] * 4


def test_a_request_larger_than_the_space_before_the_end_fits_an_empty_ring():
    """An empty ring restarts at slot 0: a large reservation after a small one must not wait forever."""
    with KVAuditLog() as log:
        ring = attach(log, capacity=64, immediate=True)
        for n in (10, 60, 37, 64, 3, 50):
            result = {}

            def go():
                view, first = ring.reserve(n)
                view[:, 0] = 1
                ring.commit(n, first)
                result["first"] = first

            th = threading.Thread(target=go)
            th.start()
            th.join(timeout=5)
            assert not th.is_alive(), f"reserve({n}) did not return"
            assert log.flush(timeout=5)
        assert len(log) == 10 + 60 + 37 + 64 + 3 + 50


def test_emit_torch_refuses_out_of_range_or_bool_scalars_before_reserving():
    with bounded_log() as log:
        ring = attach(log, immediate=True)
        for kw in (dict(pos_start=2 ** 32), dict(layer=-1), dict(row=True), dict(nonce_counter=2 ** 64)):
            with pytest.raises((ValueError, TypeError)):
                ring.emit_torch(Op.ENCRYPT, **dict(dict(tenant_idx=0, session_idx=0), **kw))
        assert ring._head == 0 and log.allocator.next_no == 0       # nothing reserved, no record number taken
        assert log.flush(timeout=5) is True and len(log) == 0


def test_an_exception_between_reserve_and_commit_abandons_the_reservation_as_error_records(monkeypatch):
    with bounded_log() as log:
        ring = attach(log, immediate=True)
        t = log.tenant_index("alice")

        def oom(*a, **k):
            raise RuntimeError("CUDA out of memory")

        with monkeypatch.context() as m:
            m.setattr(torch, "arange", oom)              # raises after the slots were reserved
            with pytest.raises(RuntimeError, match="out of memory"):
                ring.emit_torch(Op.DECRYPT, tenant_idx=t, session_idx=0, layer=5)
        with pytest.raises(RuntimeError, match="launch"):
            with ring.reservation(3, op=Op.ENCRYPT, tenant_idx=t, session_idx=0, layer=2) as (view, first):
                raise RuntimeError("launch failed")
        ring.emit_torch(Op.ENCRYPT, tenant_idx=t, session_idx=0, layer=7)
        assert log.flush(timeout=5) is True
        es = list(reversed(log.entries(limit=None)))
    assert [(e.record_number, e.operation, e.success, e.layer_idx, e.tenant_id) for e in es] == [
        (0, "decrypt", False, 5, "alice")] + [(i, "encrypt", False, 2, "alice") for i in (1, 2, 3)] + [
        (4, "encrypt", True, 7, "alice")]
    assert all(e.status == 3 for e in es[:4])


def test_a_commit_whose_copy_cannot_be_enqueued_is_abandoned_and_raises():
    with bounded_log() as log:
        ring = attach(log, immediate=True)
        ring.publish_at = 4                  # this commit fills the batch: it publishes it itself
        view, first = ring.reserve(4, op=Op.ENCRYPT)
        view[:, 60] = int(Op.ENCRYPT)

        def broken(slot, n, after=None):
            raise RuntimeError("CUDA error: an illegal memory access")

        ring._enqueue_copy = broken
        with pytest.raises(RuntimeError, match="illegal"):
            ring.commit(4, first)
        assert log.flush(timeout=5) is True
        assert [e.success for e in log.entries(limit=None)] == [False] * 4


def test_a_batch_the_drain_cannot_publish_becomes_error_records_and_the_log_goes_on():
    with bounded_log() as log:
        ring = attach(log, immediate=True)
        view, first = ring.reserve(3, op=Op.ENCRYPT, layer=4)
        view[:, 60] = int(Op.ENCRYPT)
        ring.commit(3, first)                # below publish_at: published by the drain

        def broken(slot, n, after=None):
            raise RuntimeError("CUDA error: an illegal memory access")

        good = ring._enqueue_copy
        ring._enqueue_copy = broken
        assert log.flush(timeout=5) is True
        ring._enqueue_copy = good
        ring.emit_torch(Op.DECRYPT, tenant_idx=0, session_idx=0, layer=5)
        assert log.flush(timeout=5) is True
        es = list(reversed(log.entries(limit=None)))
    assert [(e.record_number, e.success, e.status, e.layer_idx) for e in es] == [
        (0, False, 3, 4), (1, False, 3, 4), (2, False, 3, 4), (3, True, 0, 5)]


def test_commits_of_adjacent_reservations_share_one_copy():
    """One event and one copy serve a batch: commits below publish_at enqueue nothing; publishing (the
    drain's pass) copies the contiguous slots of several reservations at once."""
    from pqc_kv_cache.audit.alloc import RecordAllocator

    ring = HostTensorRing(RecordAllocator(), torch.device("cpu"), 64)     # no drain: publish by hand
    for layer in range(5):
        view, first = ring.reserve(2, op=Op.ENCRYPT, layer=layer)
        view.zero_()
        view[:, 60] = int(Op.ENCRYPT)
        view[:, 56] = layer                  # the layer field (uint16 at byte 56)
        ring.commit(2, first)
    assert ring.copies == []                 # nothing enqueued by the commits
    ring.publish()
    assert [(c.slot, c.n) for c in ring.copies] == [(0, 10)]
    ring.complete()
    chunks, waiting = ring.collect()
    assert not waiting and [first for first, _ in chunks] == [0, 2, 4, 6, 8]
    recs = np.concatenate([r for _, r in chunks])
    assert recs["record_no"].tolist() == list(range(10)) and recs["layer"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
