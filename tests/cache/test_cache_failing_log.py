"""A failing audit file (disk full) never interrupts clean-up.

``release()`` / ``generating()`` zero the plaintext of every layer, a session's close shreds its rows in
every cache, and ``TenantIsolationManager.close()`` erases every session's keys, whatever the log raises;
the log's failure is raised once, after everything is erased.
"""

from __future__ import annotations

import pytest
import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import AuditError, SessionClosedError
from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantIdentity
from support.audit_fakes import fill_disk
from support.cache_models import sessions, tiny_model

H, D = 2, 16
LAYERS = 3


def kv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


@pytest.fixture
def disk_log(tmp_path):
    log = KVAuditLog(path=tmp_path / "audit.log", fsync=False)
    yield log
    with pytest.raises(AuditError):       # the file failed: closing says so too
        log.close()


def _filled(two, log, mode="working_set"):
    cache = EncryptedCache(tiny_model("llama", layers=LAYERS).config, sessions=two, audit=log, mode=mode)
    for step, n in enumerate([5, 1, 1]):
        k, v = kv(len(two), n, seed=step)
        for layer in range(LAYERS):
            cache.update(k, v, layer)
    return cache


def _held(cache):
    """Every layer's plaintext K and V views (they share the working set's buffers)."""
    views = [(layer.keys, layer.values) for layer in cache.layers]
    assert all(k is not None and k.abs().sum() > 0 for k, _ in views)
    return views


def _all_zero(views) -> bool:
    return all(not k.any() and not v.any() for k, v in views)


def test_release_zeroes_every_layer_when_the_audit_file_fails(disk_log):
    cache = _filled(sessions("alice", "bob"), disk_log)
    views = _held(cache)
    fill_disk(disk_log)
    with pytest.raises(AuditError):
        cache.release()
    assert _all_zero(views)
    assert all(layer.released and layer.keys is None for layer in cache.layers)


def test_releasing_one_tenant_zeroes_its_rows_in_every_layer_when_the_audit_file_fails(disk_log):
    alice, bob = sessions("alice", "bob")
    cache = _filled([alice, bob], disk_log)
    views = _held(cache)
    fill_disk(disk_log)
    with pytest.raises(AuditError):
        cache.release(alice)
    assert all(not k[0].any() and not v[0].any() and k[1].any() for k, v in views)
    assert all(layer.released for layer in cache.layers)


def test_generating_releases_every_layer_when_the_audit_file_fails(disk_log):
    cache = _filled(sessions("alice", "bob"), disk_log)
    views = _held(cache)
    with pytest.raises(AuditError):
        with cache.generating():
            fill_disk(disk_log)
    assert _all_zero(views)


def _shredded(cache) -> bool:
    """Every stored chunk of every row is zero, and the cache holds no key of its sessions."""
    for layer_idx, layer in enumerate(cache.layers):
        for row in range(layer.row_session_slots.size):
            for entry in cache.export_entries(layer_idx, row):
                raw = entry.ciphertext      # bytes, or their hex where entries keep the earlier library's form
                if any(raw if isinstance(raw, bytes) else bytes.fromhex(raw)):
                    return False
    return not cache._ctx.key_slots


@pytest.mark.parametrize("mode", ["sealed", "working_set"])
def test_manager_close_erases_every_session_and_cache_when_the_audit_file_fails(disk_log, mode):
    mgr = TenantIsolationManager(audit=disk_log)
    alice, bob, carol = (mgr.create_session(TenantIdentity(t)) for t in ("alice", "bob", "carol"))
    first = _filled([alice, bob], disk_log, mode)
    second = _filled([alice], disk_log, mode)      # a second cache told of alice's close by the same hook list
    third = _filled([carol], disk_log, mode)
    fill_disk(disk_log)
    with pytest.raises(AuditError):
        mgr.close()
    assert not mgr.sessions
    for s in (alice, bob, carol):
        assert s.closed and s.live_epochs == []
        with pytest.raises(SessionClosedError):
            s.key_for_epoch(0)
    for cache in (first, second, third):
        assert _shredded(cache)
        assert cache._scratch is None or not cache._scratch.any()
        assert all(layer.keys is None for layer in cache.layers)


def test_a_session_close_shreds_every_cache_when_the_audit_file_fails(disk_log):
    alice, = sessions("alice")
    caches = [_filled([alice], disk_log) for _ in range(3)]
    fill_disk(disk_log)
    with pytest.raises(AuditError):
        alice.close()
    assert all(_shredded(c) for c in caches)
