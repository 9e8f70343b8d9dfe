"""The state a static cache's seal and open operators change, held in tensors on the cache's device.

Three rooms, each a fixed set of tensors allocated once (their addresses never change, so a compiled or
captured step writes to the same memory on every replay), and each with the host-side step that runs
outside any compiled region:

- ``NonceRanges``: per session slot, the next nonce counter, the end of the range the host reserved from
  the session, and the epoch of that range. The operator consumes counters; ``refill`` reserves more.
- ``RecordBuffer``: packed audit records (``RECORD_DTYPE``) that the operator writes at a head it
  advances itself, each numbered from a counter kept beside the head. ``drain`` hands them to the
  ``KVAuditLog`` in that order (the log gives them its own record numbers), checking that no number is
  missing.
- ``SealFailures``: the count and the first of the seals and opens that failed closed; ``check`` raises it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..audit.records import RECORD_DTYPE, RECORD_SIZE
from ..errors import AuditError, DecryptionError, SealFailedError

if TYPE_CHECKING:   # annotations only: the buffer hands records to a log, it does not import the log
    from ..audit.log import KVAuditLog
    from ..session import TenantSession

__all__ = ["FailReason", "NonceRanges", "RecordBuffer", "SealFailures"]


class FailReason(enum.IntEnum):
    """Why a position was not sealed (or not opened); the value stored in ``SealFailures``."""

    NONCES_EXHAUSTED = 1   # the session slot's reserved range is used up
    SESSION_INVALID = 2    # the session is closed or expired
    KEY_UNAVAILABLE = 3    # the key of the range's (or chunk's) epoch was retired
    RECORDS_FULL = 4       # no room in the audit record buffer: nothing sealed unrecorded
    OUT_OF_RANGE = 5       # a position outside the cache's slots
    AUTH_FAILED = 6        # open: the tag did not verify
    NOT_SEALED = 7         # open: the position's slot holds no chunk of it


_MESSAGES = {
    FailReason.NONCES_EXHAUSTED: "its session's reserved nonce range was used up (call check() between steps "
                                 "to refill it, or pass a larger nonce_reserve=)",
    FailReason.SESSION_INVALID: "its session is closed or expired",
    FailReason.KEY_UNAVAILABLE: "the key of its epoch was retired",
    FailReason.RECORDS_FULL: "the audit record buffer was full (drain it with check() or drain_audit(), or pass "
                             "a larger audit_records=)",
    FailReason.OUT_OF_RANGE: "the position lies outside the cache (max_cache_len)",
    FailReason.AUTH_FAILED: "its tag did not verify",
    FailReason.NOT_SEALED: "no sealed chunk holds it",
}


class NonceRanges:
    """Per session slot: ``next`` counter, ``end`` of the reserved range (exclusive) and its ``epoch``."""

    def __init__(self, sessions: Sequence[TenantSession], device: torch.device):
        n = len(sessions)
        self._sessions = sessions
        self.next = torch.zeros(n, dtype=torch.int64, device=device)
        self.end = torch.zeros(n, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(n, dtype=torch.int64, device=device)
        # the host's copy of ``epoch`` (only ``refill`` changes it), read by a seal on another device
        self.epoch_host = np.zeros(n, dtype=np.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.next, self.end, self.epoch

    def remaining(self) -> np.ndarray:
        return (self.end - self.next).clamp_min(0).cpu().numpy()

    def refill(self, want: np.ndarray) -> None:
        """Give every live session slot at least ``want[slot] // 2`` counters (topped up to ``want[slot]``
        from a fresh reservation), and move a slot whose session rotated to a range of the new epoch. What
        is left of a replaced range is never used (counters only go up). Outside any compiled region."""
        nxt, end, epoch = self.next.cpu().numpy(), self.end.cpu().numpy(), self.epoch.cpu().numpy()
        changed = False
        for slot, s in enumerate(self._sessions):
            if not s.is_valid() or want[slot] <= 0:
                continue
            if end[slot] - nxt[slot] >= max(int(want[slot]) // 2, 1) and s.epoch == epoch[slot]:
                continue
            e, first = s.reserve(int(want[slot]))
            nxt[slot], end[slot], epoch[slot] = first, first + int(want[slot]), e
            changed = True
        if changed:
            for t, a in ((self.next, nxt), (self.end, end), (self.epoch, epoch)):
                t.copy_(torch.from_numpy(a))
            self.epoch_host = epoch.copy()

    def revoke(self, slot: int) -> None:
        """No more counters for ``slot`` (its session closed): later seals of its rows fail closed."""
        self.end[slot] = self.next[slot]


class RecordBuffer:
    """``capacity`` packed audit records, a head ``[write index, next record number]``, drained to a log."""

    def __init__(self, capacity: int, device: torch.device):
        self.records = torch.zeros((capacity, RECORD_SIZE), dtype=torch.uint8, device=device)
        self.head = torch.zeros(2, dtype=torch.int64, device=device)
        self._drained_no = 0   # the record number the next drained record must carry

    @property
    def capacity(self) -> int:
        return int(self.records.shape[0])

    def pending(self) -> int:
        return int(self.head[0])

    def drain(self, log: KVAuditLog | None) -> int:
        """Hand the written records to ``log`` in the order they were numbered; returns how many. AuditError
        (nothing emitted) when a record number is missing or repeated."""
        n = int(self.head[0])
        if n == 0:
            return 0
        batch = self.records[:n].cpu().numpy().copy().view(RECORD_DTYPE).reshape(n)
        numbers = batch["record_no"]
        expected = np.arange(self._drained_no, self._drained_no + n, dtype=np.uint64)
        if not np.array_equal(numbers, expected):
            bad = int(np.flatnonzero(numbers != expected)[0])
            raise AuditError(f"static cache record buffer: record {bad} carries number {int(numbers[bad])}, "
                             f"expected {int(expected[bad])}; nothing was drained")
        if log is not None:
            log.emit_records(batch)
        self._drained_no += n
        self.records[:n].zero_()
        self.head[0] = 0
        return n


class SealFailures:
    """``[count, layer, row, position, reason, session slot]``: how many seals or opens failed closed since
    the last ``check``, and the first of them."""

    SIZE = 6

    def __init__(self, device: torch.device):
        self.tensor = torch.zeros(self.SIZE, dtype=torch.int64, device=device)

    def check(self, sessions: Sequence[TenantSession]) -> None:
        """Raise the first failure recorded since the last check (and clear the record): DecryptionError for
        an open, SealFailedError for a seal; nothing when none failed."""
        count, layer, row, pos, reason, slot = (int(x) for x in self.tensor.cpu().tolist())
        if count == 0:
            return
        self.tensor.zero_()
        reason = FailReason(reason)
        tenant = sessions[slot].tenant_id if 0 <= slot < len(sessions) else None
        where = f"tenant {tenant!r}, layer {layer}, row {row}, position {pos}"
        more = f" ({count} positions failed in all)" if count > 1 else ""
        if reason in (FailReason.AUTH_FAILED, FailReason.NOT_SEALED):
            raise DecryptionError(f"could not open {where}: {_MESSAGES[reason]}; the position was zeroed{more}",
                                  tenant_id=tenant, layer_idx=layer, positions=range(pos, pos + 1))
        raise SealFailedError(f"could not seal {where}: {_MESSAGES[reason]}; its slot holds zeros{more}",
                              tenant_id=tenant, layer_idx=layer, positions=range(pos, pos + 1))
