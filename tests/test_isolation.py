import threading

import pytest

from pqc_kv_cache import (
    DecryptionError,
    EntryMetadata,
    KeyRotationPolicy,
    KVAuditLog,
    KVCacheEntry,
    NonceReplayError,
    SessionClosedError,
    SessionExpiredError,
    TenantIdentity,
    TenantIsolationError,
    TenantIsolationManager,
    UnknownTenantError,
)


@pytest.fixture
def audit():
    log = KVAuditLog()
    yield log
    log.close()


@pytest.fixture
def mgr(audit, clock):
    m = TenantIsolationManager(audit=audit, clock=clock)
    m.create_session(TenantIdentity("alice"))
    m.create_session(TenantIdentity("bob"))
    return m


def entry(mgr, tenant, layer=0, position=0):
    s = mgr.get_session(tenant)
    return KVCacheEntry(EntryMetadata(tenant, s.session_id, layer, position), b"k" * 8, b"v" * 8)


def test_create_session_returns_the_live_session(mgr):
    s = mgr.get_session("alice")
    assert mgr.create_session(TenantIdentity("alice")) is s
    assert mgr.list_active_tenants() == ["alice", "bob"]


def test_unknown_tenant(mgr):
    with pytest.raises(UnknownTenantError):
        mgr.get_session("carol")
    mgr.close_session("carol")      # nothing to close: no error
    assert mgr.list_active_tenants() == ["alice", "bob"]


def test_expired_session_is_never_returned_silently(mgr, clock):
    old = mgr.get_session("alice")
    clock.advance(901)
    with pytest.raises(SessionExpiredError):
        mgr.get_session("alice")
    assert mgr.list_active_tenants() == []
    fresh = mgr.create_session(TenantIdentity("alice"))
    assert fresh is not old and fresh.is_valid() and old.closed


def test_encrypt_decrypt_are_audited(mgr, audit):
    e = mgr.encrypt("alice", entry(mgr, "alice", 2, 7))
    mgr.decrypt("alice", e)
    audit.flush()
    enc = audit.entries(operation="encrypt")
    dec = audit.entries(operation="decrypt")
    assert len(enc) == 1 and len(dec) == 1
    assert (enc[0].tenant_id, enc[0].layer_idx, enc[0].position, enc[0].sequence_number) == ("alice", 2, 7, 1)
    assert dec[0].success


def test_cross_tenant_decrypt_is_refused_and_recorded_by_the_manager(mgr, audit):
    e = mgr.encrypt("alice", entry(mgr, "alice", 1, 4))
    with pytest.raises(TenantIsolationError):
        mgr.decrypt("bob", e)
    audit.flush()
    v = audit.entries(operation="isolation-violation")
    assert len(v) == 1
    assert v[0].tenant_id == "bob" and v[0].layer_idx == 1 and v[0].position == 4 and not v[0].success
    assert v[0].session_id == mgr.get_session("bob").session_id
    assert v[0].details == "target=alice; decrypt of an entry of tenant 'alice'"
    # the entry is still fine for its owner
    mgr.decrypt("alice", e)


def test_encrypting_under_another_tenants_label_is_refused_and_recorded(mgr, audit):
    with pytest.raises(TenantIsolationError):
        mgr.encrypt("bob", entry(mgr, "alice"))
    audit.flush()
    assert len(audit.entries(operation="isolation-violation", tenant_id="bob")) == 1


def test_failed_decrypt_is_recorded_as_failure(mgr, audit):
    e = mgr.encrypt("alice", entry(mgr, "alice", 0, 3))
    e.ciphertext = bytes([e.ciphertext_bytes[0] ^ 1]) + e.ciphertext_bytes[1:]
    with pytest.raises(DecryptionError):
        mgr.decrypt("alice", e)
    audit.flush()
    fails = audit.entries(operation="decrypt", success=False)
    assert len(fails) == 1 and fails[0].position == 3


def test_replay_is_refused_and_recorded(mgr, audit):
    e = mgr.encrypt("alice", entry(mgr, "alice"))
    mgr.decrypt("alice", e)
    with pytest.raises(NonceReplayError):
        mgr.decrypt("alice", e)
    audit.flush()
    assert len(audit.entries(operation="decrypt", success=False)) == 1


def test_policy_rotation_is_recorded_and_old_entries_open(audit, clock):
    mgr = TenantIsolationManager(audit=audit, policy=KeyRotationPolicy(max_entries=2), clock=clock)
    mgr.create_session(TenantIdentity("alice"))
    sealed = [mgr.encrypt("alice", entry(mgr, "alice", 0, i)) for i in range(5)]
    assert [e.epoch for e in sealed] == [0, 0, 1, 1, 2]
    for e in sealed:
        mgr.decrypt("alice", e)
    audit.flush()
    rot = audit.entries(operation="rotate")
    assert len(rot) == 2 and all(r.tenant_id == "alice" for r in rot)


def test_time_rotation_through_the_manager(audit, clock):
    mgr = TenantIsolationManager(audit=audit, policy=KeyRotationPolicy(max_age_seconds=60), clock=clock)
    mgr.create_session(TenantIdentity("alice"))
    assert mgr.encrypt("alice", entry(mgr, "alice")).epoch == 0
    clock.advance(61)
    assert mgr.encrypt("alice", entry(mgr, "alice")).epoch == 1
    assert mgr.encrypt("alice", entry(mgr, "alice")).epoch == 1


def test_close_session_erases_keys_and_is_recorded(mgr, audit):
    s = mgr.get_session("alice")
    e = mgr.encrypt("alice", entry(mgr, "alice"))
    mgr.close_session("alice")
    assert s.closed and mgr.list_active_tenants() == ["bob"]
    with pytest.raises(UnknownTenantError):
        mgr.decrypt("alice", e)
    with pytest.raises(SessionClosedError):
        s.key_for_epoch(0)
    audit.flush()
    assert [r.tenant_id for r in audit.entries(operation="close")] == ["alice"]


def test_manager_is_thread_safe(mgr, audit):
    errors = []

    def work(tenant):
        try:
            for i in range(300):
                mgr.decrypt(tenant, mgr.encrypt(tenant, entry(mgr, tenant, 0, i)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in ("alice", "bob") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    audit.flush()
    assert len(audit.entries(limit=10**6, operation="encrypt")) == 1800


def test_no_audit_is_allowed():
    m = TenantIsolationManager()
    m.create_session(TenantIdentity("alice"))
    e = m.encrypt("alice", entry(m, "alice"))
    assert m.decrypt("alice", e).key_tensor_bytes == b"k" * 8


def test_type_errors(mgr):
    with pytest.raises(TypeError):
        mgr.create_session("alice")
    with pytest.raises(TypeError):
        mgr.encrypt("alice", b"x")
    with pytest.raises(TypeError):
        mgr.decrypt("alice", b"x")


def test_close_session_takes_a_tenant_id_a_session_id_or_the_session():
    from pqc_kv_cache.audit import KVAuditLog
    log = KVAuditLog()
    mgr = TenantIsolationManager(audit=log)
    a = mgr.create_session(TenantIdentity("alice"))
    b = mgr.create_session(TenantIdentity("bob"))
    c = mgr.create_session(TenantIdentity("carol"))
    mgr.close_session(a)                       # the session itself
    mgr.close_session(b.session_id)            # its session id
    mgr.close_session("carol")                 # the tenant id, as in 0.1.0
    assert a.closed and b.closed and c.closed
    assert dict(mgr.sessions) == {}
    mgr.close_session("nobody")                # an unknown tenant stays no error
    mgr.close_session("urn:pqc-kv-sess:" + "0" * 32)
    log.flush()
    assert len(log.entries(operation="close", limit=10)) == 3
    with pytest.raises(TypeError, match="tenant id, a session id or a TenantSession"):
        mgr.close_session(42)


def test_close_session_of_a_replaced_session_closes_that_one_only():
    mgr = TenantIsolationManager()
    old = mgr.create_session(TenantIdentity("alice"))
    old.expires_at = "2000-01-01T00:00:00+00:00"
    new = mgr.create_session(TenantIdentity("alice"))
    assert new is not old
    mgr.close_session(old)
    assert old.closed and not new.closed and mgr.sessions["alice"] is new
