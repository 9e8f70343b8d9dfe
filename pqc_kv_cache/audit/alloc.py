"""What a log shares with the rings that feed it: one lock, dense record numbers, the pipeline's state, wake-ups.

``KVAuditLog`` owns one ``RecordAllocator`` and hands it to each ring it
creates (its host ring's emitters use it directly).  A ring takes record
numbers with ``take``, reports committed records with ``committed``, waits
for room on a condition from ``space_condition`` (notified whenever the drain
frees slots, fails or stops) and raises the pipeline's failure through
``check_open``.  Every method marked "lock held" expects the caller to hold
``lock``.
"""

from __future__ import annotations

import threading
import time

from ..errors import AuditError

__all__ = ["RecordAllocator"]


class RecordAllocator:
    """Record numbering and pipeline state of one log, shared with its rings."""

    def __init__(self, clock=time.time_ns):
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)    # the drain thread waits here for work
        self.clock = clock                            # ns since the epoch (host timestamps)
        self.next_no = 0          # the next record number to hand out
        self.emitted = 0          # records handed to the drain (written, committed or abandoned)
        self.stalls = 0           # times an emitter waited for ring room
        self.error: BaseException | None = None      # the pipeline's first failure
        self.closed = False
        self._spaces: list[threading.Condition] = []
        self._rings: dict = {}

    # -- lock held --------------------------------------------------------------------
    def check_open(self) -> None:
        """AuditError if the log is closed or its pipeline failed (lock held)."""
        if self.closed:
            raise AuditError("the audit log is closed")
        if self.error is not None:
            raise AuditError(f"the audit pipeline failed: {self.error}") from self.error

    def take(self, n: int) -> int:
        """``n`` consecutive record numbers; the first of them (lock held)."""
        first = self.next_no
        self.next_no = first + n
        return first

    def committed(self, n: int) -> None:
        """``n`` records are ready for the drain (lock held)."""
        self.emitted += n
        self.work.notify()

    def stalled(self) -> None:
        """An emitter found its ring full: count it and wake the drain (lock held)."""
        self.stalls += 1
        self.work.notify()

    def fail(self, error: BaseException) -> bool:
        """Keep ``error`` as the pipeline's failure unless one is kept already (lock held); True if kept."""
        if self.error is None:
            self.error = error
            return True
        return False

    # -- any thread ---------------------------------------------------------------------
    def space_condition(self) -> threading.Condition:
        """A condition on ``lock`` for a ring's emitters to wait for room; ``wake_all`` notifies it."""
        cond = threading.Condition(self.lock)
        with self.lock:
            self._spaces.append(cond)
        return cond

    def wake_all(self) -> None:
        """Wake every waiting emitter and the drain (room was freed, or the pipeline failed or stopped)."""
        with self.lock:
            for cond in self._spaces:
                cond.notify_all()
            self.work.notify_all()

    def attach(self, key, ring):
        """Register ``ring`` (it has ``collect()``) under ``key`` unless one is there; the registered ring."""
        with self.lock:
            return self._rings.setdefault(key, ring)

    def ring(self, key):
        """The ring registered under ``key``, or None."""
        with self.lock:
            return self._rings.get(key)

    def rings(self) -> list:
        """The registered rings (lock held)."""
        return list(self._rings.values())
