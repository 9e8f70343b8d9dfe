"""CUDA audit ring: device slots, event-ordered async copy, no host synchronisation on the hot path.

Marked ``gpu``; skipped where CUDA is absent.  A GPU host runs them unchanged.
"""

import threading

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit import NONE16, RECORD_DTYPE, KVAuditLog, Op, verify_log
from pqc_kv_cache.errors import BackendUnavailableError

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_ring_without_cuda_raises_backend_unavailable():
    with KVAuditLog() as log:
        with pytest.raises(BackendUnavailableError):
            log.cuda_ring(torch.device("cuda:0"))


@gpu
@needs_cuda
def test_emit_torch_records_arrive_with_their_fields():
    dev = torch.device("cuda", torch.cuda.current_device())
    with KVAuditLog() as log:
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        ring = log.cuda_ring(dev)
        first = ring.emit_torch(Op.ENCRYPT, tenant_idx=t, session_idx=s,
                                layer=torch.arange(32, device=dev, dtype=torch.int32),
                                row=7, pos_start=torch.full((32,), 812, device=dev, dtype=torch.int64),
                                pos_count=1, nonce_counter=torch.arange(1000, 1032, device=dev),
                                epoch=3, nbytes=4096)
        assert first == 0
        assert log.flush(timeout=60)
        es = list(reversed(log.entries(limit=None)))
    assert [e.record_number for e in es] == list(range(32))
    assert [e.layer_idx for e in es] == list(range(32))
    assert {(e.tenant_id, e.row, e.position, e.position_count, e.epoch, e.nbytes, e.operation) for e in es} == \
        {("alice", 7, 812, 1, 3, 4096, "encrypt")}
    assert [e.sequence_number for e in es] == list(range(1000, 1032))
    assert all(int(e.timestamp[:4]) >= 2024 for e in es)          # host timestamp filled by the drain


@gpu
@needs_cuda
def test_hot_path_emission_performs_no_host_synchronisation():
    dev = torch.device("cuda", torch.cuda.current_device())
    with KVAuditLog(ring_records=4096) as log:
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        ring = log.cuda_ring(dev)
        layers = torch.arange(32, device=dev, dtype=torch.int32)
        rows = torch.arange(16, device=dev, dtype=torch.int32)
        step_layers, step_rows = layers.repeat_interleave(16), rows.repeat(32)   # 32 layers x 16 rows
        ring.emit_torch(Op.ENCRYPT, tenant_idx=t, session_idx=s)   # first use outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(50):
                ring.emit_torch(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=step_layers,
                                row=step_rows, pos_start=0, pos_count=step + 1)
                view, first = ring.reserve(16)
                view[:, 60].fill_(int(Op.ENCRYPT))
                view[:, 56:58].fill_(0)
                ring.commit(16)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert log.flush(timeout=60)
        st = log.stats()
    assert st["emitted"] == st["drained"] == 1 + 50 * (512 + 16) and st["dropped"] == 0


@gpu
@needs_cuda
def test_cuda_and_host_records_are_delivered_in_record_number_order(tmp_path):
    dev = torch.device("cuda", torch.cuda.current_device())
    with KVAuditLog(path=tmp_path / "a.log", ring_records=256) as log:
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        ring = log.cuda_ring(dev)
        view, first = ring.reserve(8)              # numbered before the host records below
        host_first = log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, pos_start=np.arange(4, dtype=np.uint32),
                              pos_count=1)
        assert (first, host_first) == (0, 8)
        torch.cuda._sleep(50_000_000)              # the kernel that writes the records is slow
        view.zero_()
        view[:, 60].fill_(int(Op.ENCRYPT))
        view[:, 56:60].fill_(0xFF)
        ring.commit(8)
        assert log.flush(timeout=60)
        es = list(reversed(log.entries(limit=None)))
    assert [e.record_number for e in es] == list(range(12))
    assert [e.operation for e in es] == ["encrypt"] * 8 + ["decrypt"] * 4
    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok and list(rep.all_records()["record_no"]) == list(range(12))


@gpu
@needs_cuda
def test_full_cuda_ring_applies_back_pressure_without_loss():
    dev = torch.device("cuda", torch.cuda.current_device())
    with KVAuditLog() as log:
        t = log.tenant_index("alice")
        s = log.session_index("s", "alice")
        ring = log.cuda_ring(dev, capacity=64)

        def worker():
            for i in range(200):
                ring.emit_torch(Op.ENCRYPT, tenant_idx=t, session_idx=s,
                                pos_start=torch.arange(48, device=dev), pos_count=1, nonce_counter=i)

        ts = [threading.Thread(target=worker) for _ in range(3)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        assert log.flush(timeout=60)
        st = log.stats()
        recs = log._query(limit=None, newest_first=False)
    assert st["emitted"] == st["drained"] == 3 * 200 * 48 >= 100 * 64
    assert st["stalls"] > 0 and st["dropped"] == 0
    assert [e.record_number for e in recs] == list(range(3 * 200 * 48))


@gpu
@needs_cuda
def test_device_record_layout_matches_numpy_dtype():
    dev = torch.device("cuda", torch.cuda.current_device())
    with KVAuditLog() as log:
        ring = log.cuda_ring(dev)
        ring.emit_torch(Op.ROTATE, tenant_idx=0xFFFFFFF0, session_idx=2, layer=NONE16, row=0xFFFE,
                        pos_start=0x80000001, pos_count=5, nonce_counter=(1 << 63) + 5, epoch=9, nbytes=77,
                        status=3, device_ts_ns=123)
        assert log.flush(timeout=60)
        b = log._store.blocks[0]
        rec = {k: int(v[0]) for k, v in b.cols.items()}
    assert rec["tenant_idx"] == 0xFFFFFFF0 and rec["session_idx"] == 2 and rec["layer"] == 0xFFFF
    assert rec["row"] == 0xFFFE and rec["pos_start"] == 0x80000001 and rec["pos_count"] == 5
    assert rec["nonce_counter"] == (1 << 63) + 5 and rec["epoch"] == 9 and rec["nbytes"] == 77
    assert rec["status"] == 3 and rec["device_ts_ns"] == 123 and rec["op"] == Op.ROTATE
    assert RECORD_DTYPE.itemsize == 64
