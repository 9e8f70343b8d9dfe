"""The cache's audit record sites: one helper that names rows by their session slots.

Every record the cache writes itself (the backends write ENCRYPT and DECRYPT)
goes through ``CacheAuditor``: it turns session slots into the log's tenant and
session indices, and holds back the records of an operation over several
layers until that operation has completed (``begin`` / ``commit`` /
``abandon``). Refusals and isolation violations are written at once, whatever
follows (``now=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..audit.fields import VALUE_FIELDS, RecordTemplates, build_records, set_field
from ..audit.records import NONE16, Op, Status

if TYPE_CHECKING:   # annotations only: the cache writes records, it does not import the log
    from ..audit.log import KVAuditLog
    from ..session import TenantSession

__all__ = ["CacheAuditor", "refuse_load"]


class CacheAuditor:
    """Writes the cache's records into ``log`` (None: no audit; every call is then a no-op)."""

    __slots__ = ("log", "_sessions", "_ids", "_held", "_batches")

    def __init__(self, log: KVAuditLog | None, sessions: Sequence[TenantSession]):
        self.log = log
        self._sessions = sessions          # the cache's session slots (the list is shared, not copied)
        self._ids: dict[int, tuple[int, int]] = {}
        self._held: list | None = None
        # a layer writes the same rows' records step after step: their constant fields are set once
        self._batches = RecordTemplates()

    def copy_for(self, sessions: Sequence[TenantSession]) -> "CacheAuditor":
        """An auditor for a copy of the cache: the same log and known indices, no held records."""
        new = CacheAuditor(self.log, sessions)
        new._ids = dict(self._ids)
        return new

    @property
    def enabled(self) -> bool:
        return self.log is not None

    # ---- session slots -> the log's indices ---------------------------------------------------------
    def ids(self, slot: int) -> tuple[int, int]:
        """The log's (tenant index, session index) of session slot ``slot``."""
        ids = self._ids.get(slot)
        if ids is None:
            s = self._sessions[slot]
            ids = (self.log.tenant_index(s.tenant_id), self.log.session_index(s.session_id, s.tenant_id))
            self._ids[slot] = ids
        return ids

    def arrays(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint32 tenant and session indices of each entry of ``slots``."""
        ids = np.array([self.ids(slot) for slot in range(len(self._sessions))], dtype=np.uint32)
        return ids[slots, 0], ids[slots, 1]

    # ---- records ---------------------------------------------------------------------------------------
    def rows(self, op: Op, layer: int, slots: np.ndarray, rows: np.ndarray, *, status: Status = Status.OK,
             now: bool = False, **fields) -> None:
        """One record per batch row ``rows`` of ``layer`` (``slots``: each row's session slot)."""
        batch = self.batch(op, layer, slots, rows, status=status, **fields)
        if batch is None:
            return
        if self._held is not None and not now:
            self._held.append((None, batch.copy()))
        else:
            self.log.emit_records(batch)

    def batch(self, op: Op, layer: int, slots: np.ndarray, rows: np.ndarray, *, status: Status = Status.OK,
              **fields) -> np.ndarray | None:
        """The records ``rows`` writes, prepared and not written (None without a log or rows): for a caller
        that hands them to a backend to write with a launch's own. The array is kept for the next batch of the
        same kind (read it before asking for another)."""
        if self.log is None or rows.size == 0:
            return None
        key = (int(op), layer, int(status), slots.tobytes(), rows.tobytes(), tuple(fields))

        def build() -> np.ndarray:
            tidx, sidx = self.arrays(slots)
            values = dict(zip(VALUE_FIELDS, (tidx, sidx, NONE16, NONE16, 0, 0, 0, 0, 0, 0, 0)))
            values.update(layer=layer, row=rows, status=int(status), **fields)
            return build_records(int(op), tuple(values[f] for f in VALUE_FIELDS))

        batch = self._batches.get(key, build)
        for name, value in fields.items():
            set_field(batch, name, value)
        return batch

    def session(self, op: Op, slot: int, *, status: Status = Status.OK, now: bool = False, **fields) -> None:
        """One record of session slot ``slot`` as a whole (no layer, no row)."""
        if self.log is None:
            return
        t, s = self.ids(slot)
        self._write(now, op, tenant_idx=t, session_idx=s, status=status, **fields)

    def _write(self, now: bool, op: Op, **fields) -> None:
        if self._held is not None and not now:
            self._held.append((op, fields))
        else:
            self.log.emit(op, **fields)

    # ---- operations over several layers ----------------------------------------------------------------
    @property
    def holding(self) -> bool:
        return self._held is not None

    def begin(self) -> None:
        """Hold back the records of completed steps until ``commit`` (or drop them at ``abandon``)."""
        self._held = []

    def commit(self) -> None:
        held, self._held = self._held, None
        for op, fields in held:
            if op is None:
                self.log.emit_records(fields)      # a prepared batch (``rows``)
            else:
                self.log.emit(op, **fields)

    def abandon(self) -> None:
        self._held = None


def refuse_load(log: "KVAuditLog | None", sessions: "Sequence[TenantSession]") -> None:
    """LOAD REFUSED records, one per given session, for a save file that was not loaded (either cache form)."""
    if log is not None:
        refused = CacheAuditor(log, list(sessions))
        for slot in range(len(sessions)):
            refused.session(Op.LOAD, slot, status=Status.REFUSED, now=True)
