"""pqc_kv_cache: an encrypted, tenant-isolated, audited KV cache for PyTorch transformer inference.

Each tenant's keys and values are kept encrypted with AES-256-GCM under a
per-session key agreed through ML-KEM-768; every cross-tenant access is refused
and recorded; every encrypt and decrypt is in a tamper-evident audit log.

Code written for the pure-Python "PQC KV Cache Encryption" 0.1.0 (the earlier
package of the same name) keeps working; its names::

    from pqc_kv_cache import (TenantIdentity, establish_tenant_session, TenantSession,
                              EntryMetadata, KVCacheEntry, EncryptedEntry,
                              CacheEncryptor, CacheDecryptor, KeyRotationPolicy, RotationTrigger,
                              TenantIsolationManager, KVAuditLog, KVAuditEntry)

``EncryptedCache`` / ``EncryptedLayer`` (transformers) and the audit classes are
imported on first use, so importing the package does not import transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .encryptor import CacheDecryptor, CacheEncryptor
from .envelope import EncryptedEntry, EntryMetadata, KVCacheEntry
from .errors import (
    AuditError,
    AuditIntegrityError,
    BackendUnavailableError,
    DecryptionError,
    KeyRotationRequiredError,
    KVCacheError,
    MalformedEntryError,
    NonceReplayError,
    PQCUnavailableError,
    SaveFileError,
    SealFailedError,
    SessionClosedError,
    SessionExpiredError,
    SessionExportError,
    SessionForkedError,
    TenantIsolationError,
    UnknownTenantError,
)
from .isolation import TenantIsolationManager
from .rotation import KeyRotationPolicy, RotationTrigger
from .session import TenantIdentity, TenantKeyPair, TenantSession, establish_tenant_session

__version__ = "0.2.0"

if TYPE_CHECKING:   # the lazily imported names, for type checkers
    from .audit import KVAuditEntry, KVAuditLog
    from .cache import EncryptedCache, EncryptedLayer, StaticEncryptedCache

_LAZY = {
    "KVAuditLog": "pqc_kv_cache.audit",
    "KVAuditEntry": "pqc_kv_cache.audit",
    "EncryptedCache": "pqc_kv_cache.cache",
    "EncryptedLayer": "pqc_kv_cache.cache",
    "StaticEncryptedCache": "pqc_kv_cache.cache",
}

__all__ = [
    "TenantIdentity", "TenantKeyPair", "TenantSession", "establish_tenant_session",
    "EntryMetadata", "KVCacheEntry", "EncryptedEntry", "CacheEncryptor", "CacheDecryptor",
    "KeyRotationPolicy", "RotationTrigger", "TenantIsolationManager",
    "KVAuditLog", "KVAuditEntry", "EncryptedCache", "EncryptedLayer", "StaticEncryptedCache",
    "KVCacheError", "TenantIsolationError", "SessionExpiredError", "SessionClosedError", "SessionForkedError",
    "DecryptionError", "NonceReplayError", "KeyRotationRequiredError", "UnknownTenantError",
    "MalformedEntryError", "PQCUnavailableError", "AuditError", "AuditIntegrityError",
    "BackendUnavailableError", "SaveFileError", "SessionExportError", "SealFailedError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pqc_kv_cache' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
