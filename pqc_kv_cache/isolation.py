"""TenantIsolationManager: one live session per tenant, and every cross-tenant access refused and recorded.

The manager writes its own audit records (encrypt, decrypt, rotate,
isolation-violation, close): a refused access is on record whether or not the
caller remembers to log it.

An entry may name a layer or position that the audit record cannot hold (the
AAD takes 32-bit layers and 64-bit positions; the record 16-bit layers, with
0xFFFF meaning "none", and 32-bit positions). Such a value is clamped to the
record's largest value and the record's details say so, e.g.
``clamped: layer_idx=70000 recorded as 65534``: the access is on record all the
same, and the caller gets the error the access deserves.
"""

from __future__ import annotations

import threading
import types
from typing import TYPE_CHECKING, Callable, Mapping

from ._checks import check_int
from ._cleanup import Cleanup
from .encryptor import CacheDecryptor, CacheEncryptor
from .envelope import EncryptedEntry, EntryMetadata, KVCacheEntry
from .errors import (
    DecryptionError,
    KeyRotationRequiredError,
    KVCacheError,
    MalformedEntryError,
    SessionExpiredError,
    TenantIsolationError,
    UnknownTenantError,
)
from .rotation import KeyRotationPolicy, RotationTrigger
from .session import DEFAULT_TTL_SECONDS, TenantIdentity, TenantSession, establish_tenant_session

if TYPE_CHECKING:   # annotations only
    from .audit.log import KVAuditLog

__all__ = ["TenantIsolationManager"]

# Largest value of each audit-record field the manager writes (0xFFFF is "no layer").
_RECORD_MAX = {"layer_idx": 0xFFFE, "position": 0xFFFF_FFFF, "position_count": 0xFFFF_FFFF,
               "sequence_number": 0xFFFF_FFFF_FFFF_FFFF, "epoch": 0xFFFF_FFFF, "nbytes": 0xFFFF_FFFF}


def _recordable(**fields) -> tuple[dict, str | None]:
    """Each field clamped into the audit record's range, and a note naming every value that was clamped."""
    out, notes = {}, []
    for name, value in fields.items():
        hi = _RECORD_MAX[name]
        try:
            v = check_int(name, value)
        except TypeError:
            v = None
        if v is None:
            out[name] = 0
            notes.append(f"{name}={type(value).__name__} recorded as 0")
        elif v < 0 or v > hi:
            out[name] = min(max(v, 0), hi)
            notes.append(f"{name}={v} recorded as {out[name]}")
        else:
            out[name] = v
    return out, ("clamped: " + ", ".join(notes) if notes else None)


def _with_note(details: str | None, note: str | None) -> str | None:
    if note is None:
        return details
    return note if not details else f"{details}; {note}"


class TenantIsolationManager:
    """Thread-safe registry of tenant sessions that seals and opens entries on their behalf.

    ``audit`` is a KVAuditLog (or None for no audit); ``policy`` a
    KeyRotationPolicy applied before each encryption (rotations are recorded).
    ``sessions`` is a read-only view tenant_id -> session.
    """

    def __init__(self, audit: KVAuditLog | None = None, policy: KeyRotationPolicy | None = None,
                 clock: Callable[[], float] | None = None):
        if policy is not None and not isinstance(policy, KeyRotationPolicy):
            raise TypeError(f"policy must be a KeyRotationPolicy, got {type(policy).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.audit: KVAuditLog | None = audit
        self.policy = policy
        self.clock = clock
        self._lock = threading.RLock()
        self._sessions: dict[str, TenantSession] = {}
        self._encryptors: dict[str, CacheEncryptor] = {}
        self._decryptors: dict[str, CacheDecryptor] = {}

    # ---- sessions -------------------------------------------------------------
    @property
    def sessions(self) -> Mapping[str, TenantSession]:
        """Read-only live view of the registry: tenant_id -> its current session."""
        return types.MappingProxyType(self._sessions)

    def create_session(self, tenant: TenantIdentity, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> TenantSession:
        """The tenant's live session, establishing a new one (ML-KEM-768) if it has none, it expired,
        or it was inherited through fork()."""
        if not isinstance(tenant, TenantIdentity):
            raise TypeError(f"tenant must be a TenantIdentity, got {type(tenant).__name__}")
        with self._lock:
            live = self._sessions.get(tenant.tenant_id)
            if live is not None and live.is_valid() and not live.forked:
                return live
            if live is not None:
                # a session inherited through fork() opens but never seals here: replace it
                self._drop(tenant.tenant_id, live, reason="forked" if live.forked and live.is_valid() else "expired")
            session = establish_tenant_session(tenant, ttl_seconds=ttl_seconds, clock=self.clock)
            if self.policy is not None:
                self.policy.apply(session)
            self._sessions[tenant.tenant_id] = session
            self._encryptors[tenant.tenant_id] = CacheEncryptor(session)
            self._decryptors[tenant.tenant_id] = CacheDecryptor(session)
            return session

    def add_session(self, session: TenantSession) -> TenantSession:
        """Hold ``session`` (resumed or imported in this process: ``pqc_kv_cache.resumption``) as its tenant's
        live session. ValueError if the tenant has a valid session here already; SessionExpiredError for a
        closed or expired one."""
        if not isinstance(session, TenantSession):
            raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")
        with self._lock:
            session.check_valid()
            live = self._sessions.get(session.tenant_id)
            if live is session:
                return session
            if live is not None and live.is_valid() and not live.forked:
                raise ValueError(f"tenant {session.tenant_id!r} has a live session here already")
            if live is not None:
                self._drop(session.tenant_id, live, reason="forked" if live.forked and live.is_valid() else "expired")
            if self.policy is not None:
                self.policy.apply(session)
            self._sessions[session.tenant_id] = session
            self._encryptors[session.tenant_id] = CacheEncryptor(session)
            self._decryptors[session.tenant_id] = CacheDecryptor(session)
            return session

    def get_session(self, tenant_id: str) -> TenantSession:
        """The tenant's session: UnknownTenantError if none, SessionExpiredError if it expired."""
        with self._lock:
            session = self._sessions.get(tenant_id)
            if session is None:
                raise UnknownTenantError(f"no session for tenant {tenant_id!r}")
            session.check_valid()
            return session

    def list_active_tenants(self) -> list[str]:
        with self._lock:
            return sorted(t for t, s in self._sessions.items() if s.is_valid())

    def close_session(self, tenant: "str | TenantSession") -> None:
        """Erase a session's keys (its entries become unreadable) and record the close.

        ``tenant``: a tenant id (as in PQC KV Cache Encryption 0.1.0), a session
        id, or the TenantSession itself. A tenant or session id without a live
        session here is no error: there is nothing to close. A TenantSession
        this manager does not hold (replaced, or made elsewhere) is closed all
        the same.
        """
        if isinstance(tenant, TenantSession):
            with self._lock:
                held = self._sessions.get(tenant.tenant_id)
                if held is tenant:
                    self._drop(tenant.tenant_id, tenant, reason="closed")
                elif not tenant.closed:
                    tenant.close()
                    if self.audit is not None:
                        self.audit.log_event("close", tenant.tenant_id, tenant.session_id,
                                             details="closed (not the tenant's current session here)")
            return
        if not isinstance(tenant, str):
            raise TypeError(f"close_session takes a tenant id, a session id or a TenantSession, "
                            f"got {type(tenant).__name__}")
        with self._lock:
            session = self._sessions.get(tenant)
            if session is not None:
                self._drop(tenant, session, reason="closed")
                return
            for tenant_id, session in list(self._sessions.items()):
                if session.session_id == tenant:
                    self._drop(tenant_id, session, reason="closed")
                    return

    def _drop(self, tenant_id: str, session: TenantSession, reason: str) -> None:
        del self._sessions[tenant_id]
        self._encryptors.pop(tenant_id, None)
        self._decryptors.pop(tenant_id, None)
        done = Cleanup()        # the keys are erased first; the close is recorded even if a cache's hook failed
        with done.step():
            session.close()
        if self.audit is not None:
            with done.step():
                self.audit.log_event("close", tenant_id, session.session_id, details=reason)
        done.done()

    def close(self) -> None:
        """Close every session: each one's keys are erased whatever the audit log raises (a failure of the log
        is raised once, after the last session)."""
        done = Cleanup()
        with self._lock:
            for tenant_id, session in list(self._sessions.items()):
                with done.step():
                    self._drop(tenant_id, session, reason="closed")
        done.done()

    # ---- rotation ---------------------------------------------------------------
    def rotate(self, tenant_id: str, trigger: RotationTrigger = RotationTrigger.MANUAL) -> int:
        """Open a new epoch for the tenant's session; returns it. Earlier entries stay readable."""
        trigger = RotationTrigger(trigger)
        with self._lock:
            session = self.get_session(tenant_id)
            epoch = session.rotate_key()
            if self.audit is not None:
                self.audit.log_rotate(tenant_id, session.session_id, trigger.value, epoch=epoch)
            return epoch

    def _maybe_rotate(self, tenant_id: str, session: TenantSession) -> None:
        if self.policy is None:
            return
        due, trigger = self.policy.should_rotate(session)
        if due:
            self.rotate(tenant_id, trigger)

    # ---- entries ------------------------------------------------------------------
    def encrypt(self, tenant_id: str, entry: KVCacheEntry) -> EncryptedEntry:
        """Seal an entry of ``tenant_id`` under its session (rotating first if the policy says so)."""
        if not isinstance(entry, KVCacheEntry):
            raise TypeError(f"entry must be a KVCacheEntry, got {type(entry).__name__}")
        m = entry.metadata
        if not isinstance(m, EntryMetadata):
            raise MalformedEntryError(f"entry metadata must be an EntryMetadata, got {type(m).__name__}")
        with self._lock:
            session = self.get_session(tenant_id)
            if m.tenant_id != tenant_id:
                self._violation(tenant_id, session, m.tenant_id, m.layer_idx, m.position, m.position_count,
                                "encrypt of an entry labelled for another tenant")
            self._maybe_rotate(tenant_id, session)
            encryptor = self._encryptors[tenant_id]
        try:
            out = encryptor.encrypt(entry)
        except KeyRotationRequiredError:
            self._log_encrypt(session, m.layer_idx, m.position, 0, False, "rotation required",
                              m.position_count, session.epoch, entry.plaintext_size())
            raise
        except KVCacheError as exc:  # expired, closed or forked session: a failure on record too
            self._log_encrypt(session, m.layer_idx, m.position, 0, False,
                              f"{type(exc).__name__}: {exc}", m.position_count, session.epoch, entry.plaintext_size())
            raise
        self._log_encrypt(session, m.layer_idx, m.position, out.sequence_number, True, None,
                          m.position_count, out.epoch, entry.plaintext_size())
        return out

    def decrypt(self, tenant_id: str, entry: EncryptedEntry) -> KVCacheEntry:
        """Open an entry for ``tenant_id``; another tenant's entry is refused and recorded."""
        if not isinstance(entry, EncryptedEntry):
            raise TypeError(f"entry must be an EncryptedEntry, got {type(entry).__name__}")
        m = entry.metadata
        if not isinstance(m, EntryMetadata):
            raise MalformedEntryError(f"entry metadata must be an EntryMetadata, got {type(m).__name__}")
        with self._lock:
            session = self.get_session(tenant_id)
            if m.tenant_id != tenant_id or m.session_id != session.session_id:
                self._violation(tenant_id, session, m.tenant_id, m.layer_idx, m.position, m.position_count,
                                f"decrypt of an entry of tenant {m.tenant_id!r}")
            decryptor = self._decryptors[tenant_id]
        try:
            out = decryptor.decrypt(entry)
        except (DecryptionError, SessionExpiredError) as exc:
            self._log_decrypt(session, m.layer_idx, m.position, entry.sequence_number, False, str(exc),
                              m.position_count, entry.epoch, entry.plaintext_size)
            raise
        except Exception as exc:  # replay and malformed entries are failures on record too
            self._log_decrypt(session, m.layer_idx, m.position, entry.sequence_number, False,
                              f"{type(exc).__name__}: {exc}", m.position_count, entry.epoch, entry.plaintext_size)
            raise
        self._log_decrypt(session, m.layer_idx, m.position, entry.sequence_number, True, None,
                          m.position_count, entry.epoch, entry.plaintext_size)
        return out

    # ---- audit helpers ------------------------------------------------------------
    def _log_encrypt(self, session: TenantSession, layer: int, position: int, seq: int, ok: bool,
                     details: str | None, count: int, epoch: int, nbytes: int) -> None:
        if self.audit is not None:
            self._record(self.audit.log_encrypt, session, layer, position, seq, ok, details, count, epoch, nbytes)

    def _log_decrypt(self, session: TenantSession, layer: int, position: int, seq: int, ok: bool,
                     details: str | None, count: int, epoch: int, nbytes: int) -> None:
        if self.audit is not None:
            self._record(self.audit.log_decrypt, session, layer, position, seq, ok, details, count, epoch, nbytes)

    @staticmethod
    def _record(log_call, session: TenantSession, layer: int, position: int, seq: int, ok: bool,
                details: str | None, count: int, epoch: int, nbytes: int) -> None:
        """One record through ``log_call``, its fields clamped into the record's ranges (noted in details)."""
        f, note = _recordable(layer_idx=layer, position=position, sequence_number=seq, position_count=count,
                              epoch=epoch, nbytes=nbytes)
        log_call(session.tenant_id, session.session_id, f["layer_idx"], f["position"], f["sequence_number"], ok,
                 _with_note(details, note), position_count=f["position_count"], epoch=f["epoch"],
                 nbytes=f["nbytes"])

    def _violation(self, tenant_id: str, session: TenantSession, target: str, layer: int, position: int,
                   count: int, what: str):
        if self.audit is not None:
            f, note = _recordable(layer_idx=layer, position=position, position_count=count)
            self.audit.log_isolation_violation(tenant_id, target, _with_note(what, note), session_id=session.session_id,
                                               layer_idx=f["layer_idx"], position=f["position"],
                                               position_count=f["position_count"])
        raise TenantIsolationError(f"tenant {tenant_id!r} refused: {what} (layer {layer}, position {position})")

    def __enter__(self) -> "TenantIsolationManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TenantIsolationManager(tenants={self.list_active_tenants()}, audit={'on' if self.audit is not None else 'off'})"
