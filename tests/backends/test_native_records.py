"""The native backend's audit records, written in C: the record layout and the refusal of values a record
cannot hold (the records themselves are checked against the contract in test_contract.py)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.audit.records import RECORD_DTYPE
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.envelope import session_tag, tenant_tag
from pqc_kv_cache.errors import BackendUnavailableError

native = pytest.importorskip("pqc_kv_cache.backends.native")


@pytest.fixture(scope="module")
def backend():
    try:
        return native.NativeBackend.instance()
    except BackendUnavailableError as e:
        pytest.skip(f"native host backend unavailable: {e}")


def test_the_c_record_is_record_dtype_field_for_field(backend):
    out = (ctypes.c_int64 * 32)()
    n = native.load().pqc_native_record_layout(ctypes.addressof(out), 32)
    names = RECORD_DTYPE.names
    assert n == len(names) + 1
    assert list(out[:len(names)]) == [RECORD_DTYPE.fields[f][1] for f in names]
    assert out[len(names)] == RECORD_DTYPE.itemsize


LAYOUT = ChunkLayout(layer_idx=1, num_heads=1, head_dim=4, dtype=torch.float32)


def _call(backend, log, pos_start: int, audited: bool):
    key = KeySlot(bytes(range(32)), tenant_tag("t"), session_tag("s"), 0)
    chunks = ChunkTable(*(np.array([x], dtype=np.int64) for x in (0, 0, pos_start, 2, 0, 5, 0)))
    k = torch.ones(1, 1, 2, 4)
    arena = torch.zeros(2 * LAYOUT.bytes_per_position + 16, dtype=torch.uint8)
    ctx = AuditContext(log, np.array([log.tenant_index("t")], np.uint32),
                       np.array([log.session_index("s", "t")], np.uint32)) if audited else None
    backend.encrypt_chunks([key], LAYOUT, chunks, k, k.clone(), arena, ctx)
    return arena


def test_a_position_a_record_cannot_hold_is_refused_when_audited_and_sealed_when_not(backend):
    with KVAuditLog() as log:
        assert _call(backend, log, (1 << 32) - 2, True).any()      # positions up to 2^32 - 1 fit
        with pytest.raises(ValueError, match="position does not fit its audit record field"):
            _call(backend, log, (1 << 32) - 1, True)
        assert _call(backend, log, 1 << 40, False).any()            # unaudited: the envelope holds 64 bits
        log.flush()
        assert [e.position for e in reversed(log.entries(limit=None))] == [(1 << 32) - 2, (1 << 32) - 1]


@pytest.mark.parametrize("count", [1, 2])
def test_the_host_backend_refuses_a_position_a_record_cannot_hold_too(count):
    """The `cryptography` path used to cast record fields with astype, so position 2^32 + 5 was recorded as 5:
    a record of positions that were never sealed. Its records are range-checked like the native ones."""
    from pqc_kv_cache.backends.host import HostBackend
    with KVAuditLog() as log:
        key = KeySlot(bytes(range(32)), tenant_tag("t"), session_tag("s"), 0)
        chunks = ChunkTable(*(np.array([x], dtype=np.int64) for x in (0, 0, (1 << 32) + 5, count, 0, 5, 0)))
        k = torch.ones(1, 1, 2, 4)
        arena = torch.zeros(2 * LAYOUT.bytes_per_position + 16, dtype=torch.uint8)
        ctx = AuditContext(log, np.array([log.tenant_index("t")], np.uint32),
                           np.array([log.session_index("s", "t")], np.uint32))
        be = HostBackend(threads=1)
        with pytest.raises(ValueError, match="pos_start"):
            be.encrypt_chunks([key], LAYOUT, chunks, k, k.clone(), arena, ctx)
        be.encrypt_chunks([key], LAYOUT, chunks, k, k.clone(), arena)          # unaudited: sealed
        with pytest.raises(ValueError, match="pos_start"):                     # and its DECRYPT record refused
            be.decrypt_chunks([key], LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(k), ctx)
        log.flush()
        assert log.entries(limit=None) == []
