"""Every refusal is on record: restore, prefetch and save refused for an expired session write REFUSED
records for its rows, and a save file whose manifest is nested too deeply is refused as a save file
(LOAD REFUSED), not by the parser's stack."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from pqc_kv_cache.audit import KVAuditLog, Op, Status
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import SaveFileError, SessionExpiredError
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
from support.cache_models import tiny_model

H, D = 2, 16


def filled(clock, mode, audit):
    two = [establish_tenant_session(TenantIdentity(t), ttl_seconds=60, clock=clock) for t in ("alice", "bob")]
    bob_lives = two[1]
    bob_lives.expires_at = "2999-01-01T00:00:00+00:00"
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, audit=audit, mode=mode)
    g = torch.Generator().manual_seed(0)
    for n in (4, 1, 1):
        k, v = torch.randn(2, H, n, D, generator=g), torch.randn(2, H, n, D, generator=g)
        for layer in range(2):
            cache.update(k, v, layer)
    return cache


def refused(audit, op):
    audit.flush()
    return {(e.tenant_id, e.layer_idx, e.row) for e in audit.entries(limit=None, operation=op)
            if e.status == Status.REFUSED}


def test_save_refused_for_expired_session_is_recorded(tmp_path, clock, mode):
    audit = KVAuditLog()
    cache = filled(clock, mode, audit)
    clock.advance(61)                                   # alice's session expires, bob's lives on
    with pytest.raises(SessionExpiredError):
        cache.save(tmp_path / "c.pkvf")
    assert not (tmp_path / "c.pkvf").exists()
    assert refused(audit, Op.SAVE) == {("alice", 0, 0), ("alice", 1, 0)}
    assert not [e for e in audit.entries(limit=None, operation=Op.SAVE) if e.status == Status.OK]


def test_save_refused_before_any_update_is_recorded_per_session(tmp_path, clock):
    audit = KVAuditLog()
    s = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=60, clock=clock)
    cache = EncryptedCache(tiny_model("llama").config, sessions=[s], audit=audit)
    clock.advance(61)
    with pytest.raises(SessionExpiredError):
        cache.save(tmp_path / "c.pkvf")
    audit.flush()
    assert [(e.tenant_id, e.status) for e in audit.entries(limit=None, operation=Op.SAVE)] == \
           [("alice", Status.REFUSED)]


def test_restore_refused_for_expired_session_is_recorded(clock):
    audit = KVAuditLog()
    cache = filled(clock, "working_set", audit)
    cache.release()
    clock.advance(61)
    with pytest.raises(SessionExpiredError):
        cache.restore()
    assert ("alice", 0, 0) in refused(audit, Op.DECRYPT)
    assert all(t == "alice" for t, _, _ in refused(audit, Op.DECRYPT))


def test_prefetch_refused_for_expired_session_is_recorded(clock):
    audit = KVAuditLog()
    cache = filled(clock, "working_set", audit)
    layer = cache.layers[1]
    layer.offload()                                     # plaintext dropped, ciphertext kept
    clock.advance(61)
    with pytest.raises(SessionExpiredError):
        layer.prefetch()
    assert refused(audit, Op.DECRYPT) == {("alice", 1, 0)}


def nested_file(path, depth):
    body = b"[" * depth + b"]" * depth
    with open(path, "wb") as f:
        f.write(struct.pack("<4sHHQ16s", b"PKVF", 1, 1, len(body), os.urandom(16)) + body + bytes(32))


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_manifest_is_a_save_file_error_on_record(tmp_path, depth):
    nested_file(tmp_path / "n.pkvf", depth)
    s = establish_tenant_session(TenantIdentity("alice"))
    audit = KVAuditLog()
    with pytest.raises(SaveFileError, match="nested too deeply"):
        EncryptedCache.load(tmp_path / "n.pkvf", tiny_model("llama").config, [s], audit=audit)
    audit.flush()
    assert [(e.tenant_id, e.status) for e in audit.entries(limit=None, operation=Op.LOAD)] == \
           [("alice", Status.REFUSED)]
