"""The texts records refer to by number: tenant and session names, per-record details.

Records carry a tenant index and a session index; ``NameTable`` maps them to
and from their ids (registered on first use, dense, never reused) and keeps
the entries a persisted log has not written yet.  ``DetailTexts`` holds the
free text of the records that have some.  Both take the lock their owner
registers under; neither starts a thread or touches a file.
"""

from __future__ import annotations

from .fields import DETAILS_MAX_BYTES, ID_MAX_BYTES, check_text

__all__ = ["NameTable", "DetailTexts", "TENANT", "SESSION"]

# kinds of table entries, as the file's TABL frame writes them
TENANT, SESSION = 1, 2


class NameTable:
    """Tenant ids and (tenant, session id) pairs by index.

    ``persist``: keep each new entry as ``(kind, index, tenant_index, text)``
    until ``take_pending`` hands it to the file.
    """

    def __init__(self, lock, persist: bool = False):
        self._lock = lock
        self._persist = persist
        self._tenants: list[str] = []
        self._tenant_idx: dict[str, int] = {}
        self._sessions: list[tuple[int, str]] = []
        self._session_idx: dict[tuple[int, str], int] = {}
        self._pending: list[tuple[int, int, int, str]] = []

    def load(self, tenants: dict, sessions: dict) -> bool:
        """Start from the tables of a log being continued ({index: tenant}, {index: (tenant index, session)});
        False if the indices are not dense."""
        for idx in sorted(tenants):
            self._tenant_idx[tenants[idx]] = idx
            self._tenants.append(tenants[idx])
        for idx in sorted(sessions):
            self._session_idx[sessions[idx]] = idx
            self._sessions.append(sessions[idx])
        return (self._tenants == [tenants.get(i) for i in range(len(self._tenants))]
                and len(self._sessions) == len(sessions))

    def tenant_index(self, tenant_id: str) -> int:
        """Index of ``tenant_id`` (registered on first use)."""
        i = self._tenant_idx.get(tenant_id)
        if i is not None:
            return i
        check_text("tenant_id", tenant_id, ID_MAX_BYTES)
        with self._lock:
            i = self._tenant_idx.get(tenant_id)
            if i is None:
                i = len(self._tenants)
                self._tenants.append(tenant_id)
                self._tenant_idx[tenant_id] = i
                if self._persist:
                    self._pending.append((TENANT, i, 0, tenant_id))
            return i

    def session_index(self, session_id: str, tenant_id: str) -> int:
        """Index of (tenant, session) (both registered on first use; both ids checked before either is)."""
        if not (isinstance(session_id, str) and len(session_id) < 64 and session_id.isascii()):
            check_text("session_id", session_id, ID_MAX_BYTES)    # before the tenant is registered
        t = self.tenant_index(tenant_id)
        key = (t, session_id)
        i = self._session_idx.get(key)
        if i is not None:
            return i
        check_text("session_id", session_id, ID_MAX_BYTES)
        with self._lock:
            i = self._session_idx.get(key)
            if i is None:
                i = len(self._sessions)
                self._sessions.append(key)
                self._session_idx[key] = i
                if self._persist:
                    self._pending.append((SESSION, i, t, session_id))
            return i

    def find_tenant(self, tenant_id) -> int | None:
        """Index of a registered tenant id, None if it never was (registers nothing)."""
        return self._tenant_idx.get(tenant_id)

    def tenant_id(self, idx: int) -> str | None:
        """The tenant id of index ``idx``; None if no tenant has it."""
        return self._tenants[idx] if 0 <= idx < len(self._tenants) else None

    def tenant_label(self, idx: int) -> str:
        """The tenant id of ``idx``, or ``#idx`` where none is registered (a record written by hand)."""
        return self._tenants[idx] if 0 <= idx < len(self._tenants) else f"#{idx}"

    def session_label(self, idx: int) -> str:
        """The session id of ``idx``, or ``#idx`` where none is registered."""
        return self._sessions[idx][1] if 0 <= idx < len(self._sessions) else f"#{idx}"

    def take_pending(self) -> list[tuple[int, int, int, str]]:
        """Entries registered since the last call, in registration order (the caller holds the lock)."""
        pending, self._pending = self._pending, []
        return pending


class DetailTexts:
    """Free text of records, by record number; ``persist``: also kept until ``take_pending``."""

    def __init__(self, persist: bool = False):
        self._persist = persist
        self._texts: dict[int, str] = {}
        self._pending: dict[int, str] = {}

    @staticmethod
    def check(text) -> None:
        """Refuse details the file could not hold (before any number or table entry is taken)."""
        check_text("details", text, DETAILS_MAX_BYTES)

    def add(self, record_no: int, text: str) -> None:
        """Attach ``text`` to ``record_no`` (the caller holds the lock that numbers records, so texts are
        added in record-number order)."""
        self._texts[record_no] = text
        if self._persist:
            self._pending[record_no] = text

    def get(self, record_no: int, default=None):
        return self._texts.get(record_no, default)

    def __contains__(self, record_no) -> bool:
        return record_no in self._texts

    def take_pending(self) -> list[tuple[int, str]]:
        """(record number, text) added since the last call, by record number (the caller holds the lock)."""
        pending, self._pending = self._pending, {}
        return sorted(pending.items())

    def forget_before(self, record_no: int) -> None:
        """Drop the texts of records before ``record_no`` (evicted from memory)."""
        texts = self._texts
        if texts and next(iter(texts)) < record_no:
            for no in [k for k in texts if k < record_no]:
                del texts[no]
