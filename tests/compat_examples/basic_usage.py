"""Basic usage: one tenant, three KV entries sealed, opened and audited."""

from pqc_kv_cache import (
    CacheDecryptor,
    CacheEncryptor,
    EntryMetadata,
    KVAuditLog,
    KVCacheEntry,
    TenantIdentity,
    establish_tenant_session,
)

tenant = TenantIdentity("tenant-acme", display_name="Acme Corp")
session = establish_tenant_session(tenant)
print(f"Session: {session.session_id}")
print(f"Algorithm: {session.algorithm}")
print(f"Expires: {session.expires_at}")

encryptor = CacheEncryptor(session)
decryptor = CacheDecryptor(session)
audit = KVAuditLog()

originals = []
encrypted = []
for position in range(3):
    meta = EntryMetadata(
        tenant_id=tenant.tenant_id,
        session_id=session.session_id,
        layer_idx=0,
        position=position,
        token_id=100 + position,
    )
    entry = KVCacheEntry(
        metadata=meta,
        key_tensor_bytes=bytes([position]) * 128,
        value_tensor_bytes=bytes([position + 10]) * 128,
    )
    enc = encryptor.encrypt_entry(entry)
    audit.log_encrypt(tenant.tenant_id, session.session_id, 0, position, enc.sequence_number)
    originals.append(entry)
    encrypted.append(enc)

for original, enc in zip(originals, encrypted):
    dec = decryptor.decrypt_entry(enc)
    assert dec.key_tensor_bytes == original.key_tensor_bytes
    assert dec.value_tensor_bytes == original.value_tensor_bytes
    audit.log_decrypt(tenant.tenant_id, session.session_id, 0, original.metadata.position,
                      enc.sequence_number, success=True)

print(f"Encrypted and decrypted {len(encrypted)} entries")
for e in audit.entries(limit=10):
    print(f"  {e.timestamp} {e.operation} seq={e.sequence_number}")
