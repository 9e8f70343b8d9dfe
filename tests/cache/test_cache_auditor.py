"""CacheAuditor: the records it writes for the cache, kept batches included."""

from __future__ import annotations

import numpy as np
import pytest

from pqc_kv_cache.audit import KVAuditLog, Op, Status
from pqc_kv_cache.cache.audit import CacheAuditor
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session


@pytest.fixture
def sessions():
    return [establish_tenant_session(TenantIdentity(f"tenant-{i}"), ttl_seconds=600) for i in range(3)]


@pytest.fixture
def log():
    with KVAuditLog() as lg:
        yield lg


def _entries(log):
    log.flush()
    return list(reversed(log.entries(limit=None)))


def test_rows_names_each_rows_tenant_and_session(log, sessions):
    a = CacheAuditor(log, sessions)
    a.rows(Op.READ, 2, np.array([2, 0, 1]), np.arange(3), pos_start=4, pos_count=9, nbytes=90)
    es = _entries(log)
    assert [e.tenant_id for e in es] == ["tenant-2", "tenant-0", "tenant-1"]
    assert [e.session_id for e in es] == [sessions[i].session_id for i in (2, 0, 1)]
    assert [e.row for e in es] == [0, 1, 2]
    assert {(e.operation, e.layer_idx, e.position, e.position_count, e.success) for e in es} == {
        ("read", 2, 4, 9, True)}


def test_a_kept_batch_carries_nothing_over_from_one_call_to_the_next(log, sessions):
    """The same rows of the same layer reuse one prepared batch: every call's own values, never an earlier
    call's (a field given once and not the next time is not left behind)."""
    a = CacheAuditor(log, sessions)
    slots, rows = np.array([0, 1]), np.arange(2)
    a.rows(Op.RESEAL, 1, slots, rows, pos_start=0, pos_count=8, nonce_counter=np.array([7, 9], dtype=np.uint64))
    a.rows(Op.RESEAL, 1, slots, rows, pos_start=8, pos_count=1)
    a.rows(Op.RESEAL, 1, slots, rows, pos_start=9, pos_count=2, nonce_counter=np.array([3, 4], dtype=np.uint64))
    a.rows(Op.RESEAL, 1, slots, rows, status=Status.REFUSED, pos_start=11, pos_count=1)
    es = _entries(log)
    assert [(e.position, e.position_count, e.sequence_number, e.success) for e in es] == [
        (0, 8, 7, True), (0, 8, 9, True), (8, 1, 0, True), (8, 1, 0, True), (9, 2, 3, True), (9, 2, 4, True),
        (11, 1, 0, False), (11, 1, 0, False)]


def test_held_records_keep_the_values_of_their_call(log, sessions):
    a = CacheAuditor(log, sessions)
    slots, rows = np.array([0]), np.arange(1)
    a.begin()
    for p in range(3):
        a.rows(Op.CROP, 0, slots, rows, pos_start=p, pos_count=1)
    assert _entries(log) == []
    a.commit()
    assert [e.position for e in _entries(log)] == [0, 1, 2]


def test_a_value_a_record_cannot_hold_is_refused_not_truncated(log, sessions):
    a = CacheAuditor(log, sessions)
    with pytest.raises(ValueError, match="pos_start"):
        a.rows(Op.READ, 0, np.array([0]), np.arange(1), pos_start=1 << 32, pos_count=1)
    with pytest.raises(ValueError, match="row"):
        a.rows(Op.READ, 0, np.array([0]), np.array([1 << 16]), pos_start=0, pos_count=1)
    assert _entries(log) == []
