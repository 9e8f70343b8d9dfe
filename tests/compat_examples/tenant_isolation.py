"""Tenant isolation: one tenant cannot open another tenant's KV entries."""

from pqc_kv_cache import (
    EntryMetadata,
    KVAuditLog,
    KVCacheEntry,
    TenantIdentity,
    TenantIsolationError,
    TenantIsolationManager,
)

mgr = TenantIsolationManager()
audit = KVAuditLog()

alice = TenantIdentity("tenant-alice", "Alice Inc")
bob = TenantIdentity("tenant-bob", "Bob LLC")
alice_session = mgr.create_session(alice)
bob_session = mgr.create_session(bob)

alice_entry = KVCacheEntry(
    EntryMetadata(alice.tenant_id, alice_session.session_id, layer_idx=0, position=0),
    b"alice-key" * 8,
    b"alice-value" * 8,
)
bob_entry = KVCacheEntry(
    EntryMetadata(bob.tenant_id, bob_session.session_id, layer_idx=0, position=0),
    b"bob-key" * 8,
    b"bob-value" * 8,
)
alice_enc = mgr.encrypt(alice.tenant_id, alice_entry)
bob_enc = mgr.encrypt(bob.tenant_id, bob_entry)

try:
    mgr.decrypt(bob.tenant_id, alice_enc)
    print("ERROR: isolation breach")
except TenantIsolationError as exc:
    print(f"Blocked: {exc}")
    audit.log_isolation_violation(
        attacker_tenant=bob.tenant_id,
        target_tenant=alice.tenant_id,
        details="attempted cross-tenant decrypt",
    )

assert mgr.decrypt(alice.tenant_id, alice_enc).key_tensor_bytes == alice_entry.key_tensor_bytes
assert mgr.decrypt(bob.tenant_id, bob_enc).key_tensor_bytes == bob_entry.key_tensor_bytes
print("Each tenant opened its own entry")

for e in audit.entries(operation="isolation-violation"):
    print(f"  VIOLATION {e.tenant_id}: {e.details}")
