"""The exceptions callers of pqc_kv_cache see.

Every failure of the library that is not API misuse (ValueError / TypeError)
is one ``KVCacheError`` subclass. Errors from dependencies (cryptography,
numpy, struct, json) are translated at the door, never leaked.
"""

from __future__ import annotations

__all__ = [
    "KVCacheError",
    "TenantIsolationError",
    "SessionExpiredError",
    "SessionClosedError",
    "SessionForkedError",
    "DecryptionError",
    "NonceReplayError",
    "KeyRotationRequiredError",
    "UnknownTenantError",
    "MalformedEntryError",
    "PQCUnavailableError",
    "AuditError",
    "AuditIntegrityError",
    "BackendUnavailableError",
    "SaveFileError",
    "SessionExportError",
    "SealFailedError",
]


class KVCacheError(Exception):
    """Base class of every error the library raises on purpose."""


class TenantIsolationError(KVCacheError):
    """A tenant tried to read or write state that belongs to another tenant."""


class SessionExpiredError(KVCacheError):
    """The session's time to live has passed; establish a new one."""


class SessionClosedError(SessionExpiredError):
    """The session was closed and its key material erased; it can never be used again."""


class SessionForkedError(KVCacheError):
    """The session was inherited through ``fork()``: the parent seals with the same keys and nonce
    counters, so this process may open entries with it but never seal or rotate; establish a new
    session here."""


class DecryptionError(KVCacheError):
    """A chunk failed authentication (wrong key, changed byte, moved or swapped chunk).

    ``tenant_id``, ``layer_idx`` and ``positions`` (a ``range``) name the chunk
    when the caller knows them.
    """

    def __init__(self, message: str, *, tenant_id: str | None = None,
                 layer_idx: int | None = None, positions: range | None = None):
        super().__init__(message)
        self.tenant_id = tenant_id
        self.layer_idx = layer_idx
        self.positions = positions


class NonceReplayError(KVCacheError):
    """An entry whose (epoch, counter) was already opened was presented again."""


class KeyRotationRequiredError(KVCacheError):
    """The current epoch reached its hard cap of encryptions; rotate before encrypting more."""


class UnknownTenantError(KVCacheError):
    """No session is registered for this tenant."""


class MalformedEntryError(KVCacheError):
    """Serialized input (bytes or dict) is not a well-formed envelope v1 entry."""


class PQCUnavailableError(KVCacheError):
    """No ML-KEM-768 / ML-DSA-65 implementation is available; the library refuses to fall back."""


class AuditError(KVCacheError):
    """The audit pipeline could not record or persist (the caller must not continue silently)."""


class AuditIntegrityError(AuditError):
    """A persisted audit log failed verification (changed, reordered, missing or forged records)."""

    def __init__(self, message: str, *, record_number: int | None = None):
        super().__init__(message)
        self.record_number = record_number


class BackendUnavailableError(KVCacheError):
    """The requested crypto backend cannot run here (no CUDA device, no CuPy, no compiler)."""


class SaveFileError(KVCacheError):
    """A cache save file was refused: truncated or changed bytes, a manifest that does not verify under the
    given sessions' keys (another tenant's or session's file), or a chunk list that was edited (a chunk
    dropped, reordered, replaced or duplicated, or taken from another file). Nothing is loaded."""


class SessionExportError(KVCacheError):
    """A sealed session export or its key-encryption key file was refused: truncated or changed bytes,
    another key, a key file that group or others may read, or a key file that exists already."""


class SealFailedError(KVCacheError):
    """A static cache could not seal a position it was given (its session's reserved nonce range ran out,
    the session was closed or expired, the audit record buffer was full, or the position lies outside the
    cache): the slot holds zeros, nothing was sealed twice, and the failure is raised at ``check()``."""

    def __init__(self, message: str, *, tenant_id: str | None = None, layer_idx: int | None = None,
                 positions: range | None = None):
        super().__init__(message)
        self.tenant_id = tenant_id
        self.layer_idx = layer_idx
        self.positions = positions
