"""Key rotation: a policy rotates the session key every five entries."""

from pqc_kv_cache import (
    CacheEncryptor,
    EntryMetadata,
    KeyRotationPolicy,
    KVAuditLog,
    KVCacheEntry,
    TenantIdentity,
    establish_tenant_session,
)

tenant = TenantIdentity("tenant-rot")
session = establish_tenant_session(tenant)
policy = KeyRotationPolicy(max_entries=5, max_age_seconds=3600)
audit = KVAuditLog()
encryptor = CacheEncryptor(session)

rotations = 0
for position in range(12):
    should, trigger = policy.should_rotate(session)
    if should:
        new_key = policy.rotate(session)
        audit.log_rotate(tenant.tenant_id, session.session_id, trigger.value)
        rotations += 1
        print(f"Rotated key ({trigger.value}): {len(new_key)}-byte key, "
              f"entries_encrypted={session.entries_encrypted}, next_sequence={session.next_sequence}")
    meta = EntryMetadata(tenant.tenant_id, session.session_id, layer_idx=0, position=position)
    enc = encryptor.encrypt_entry(KVCacheEntry(meta, b"k" * 64, b"v" * 64))
    audit.log_encrypt(tenant.tenant_id, session.session_id, 0, position, enc.sequence_number)

print(f"Rotations: {rotations}")
for e in audit.entries(operation="rotate"):
    print(f"  {e.timestamp} {e.operation} {e.details}")
