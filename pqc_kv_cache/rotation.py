"""Key rotation: when a session opens a new epoch, and why.

Age is counted from the last rotation (``session.epoch_started_at``), not from
session creation, so the time trigger fires once per period, not forever after
the first one. Rotation keeps earlier epochs readable until
``session.retire_epoch(e)``; the hard per-epoch cap on encryptions is enforced
by the session itself (KeyRotationRequiredError), whatever the policy.
"""

from __future__ import annotations

import enum
from typing import Callable

from ._checks import check_int, check_seconds
from .session import DEFAULT_MAX_ENTRIES_PER_EPOCH, MAX_COUNTER, TenantSession

__all__ = ["RotationTrigger", "KeyRotationPolicy"]


class RotationTrigger(str, enum.Enum):
    """Why a key was rotated. The values are the strings written to audit records (``trigger=<value>``)."""

    ENTRY_COUNT = "entry-count"
    TIME_ELAPSED = "time-elapsed"
    MANUAL = "manual"

    @classmethod
    def _missing_(cls, value):
        # "entry_count" / "time_elapsed" (underscore spellings) name the same triggers
        if isinstance(value, str):
            for member in cls:
                if member.value == value.replace("_", "-"):
                    return member
        return None


def _check_session(session: object) -> None:
    if not isinstance(session, TenantSession):
        raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")


class KeyRotationPolicy:
    """Rotate after ``max_entries`` encryptions or ``max_age_seconds`` in one epoch.

    ``max_age_seconds`` is a positive number of seconds (``inf``: never by age;
    NaN is refused); the counts are integers (numpy integers accepted, bool refused).

    ``hard_max_entries`` is applied to sessions passed to :meth:`apply` as their
    per-epoch cap (KeyRotationRequiredError beyond it).
    """

    def __init__(self, max_entries: int = 100_000, max_age_seconds: float = 300.0,
                 clock: Callable[[], float] | None = None,
                 hard_max_entries: int = DEFAULT_MAX_ENTRIES_PER_EPOCH):
        max_entries = check_int("max_entries", max_entries, 1, MAX_COUNTER)
        self.max_age_seconds = check_seconds("max_age_seconds", max_age_seconds, allow_inf=True)
        hard_max_entries = check_int("hard_max_entries", hard_max_entries, 1, MAX_COUNTER)
        if hard_max_entries < max_entries:
            raise ValueError(f"hard_max_entries ({hard_max_entries}) must be >= max_entries ({max_entries})")
        self.max_entries = max_entries
        self.hard_max_entries = hard_max_entries
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.clock = clock

    def apply(self, session: TenantSession) -> None:
        """Set the session's hard per-epoch cap."""
        _check_session(session)
        session.max_entries_per_epoch = self.hard_max_entries

    def _now(self, session: TenantSession) -> float:
        return (self.clock or session.clock)()

    def should_rotate(self, session: TenantSession) -> tuple[bool, RotationTrigger | None]:
        """``(True, ENTRY_COUNT)`` once the current epoch sealed ``max_entries`` entries,
        ``(True, TIME_ELAPSED)`` once its key is ``max_age_seconds`` old, else ``(False, None)``."""
        _check_session(session)
        if session.entries_encrypted >= self.max_entries:
            return True, RotationTrigger.ENTRY_COUNT
        if self._now(session) - session.epoch_started_at >= self.max_age_seconds:
            return True, RotationTrigger.TIME_ELAPSED
        return False, None

    def rotate(self, session: TenantSession) -> bytes:
        """Open a new epoch on the session (its counters restart); returns the new 32-byte key.

        The caller that wants the epoch number reads ``session.epoch`` or calls
        ``session.rotate_key()`` directly.
        """
        _check_session(session)
        return session.key_for_epoch(session.rotate_key())

    def __repr__(self) -> str:
        return f"KeyRotationPolicy(max_entries={self.max_entries}, max_age_seconds={self.max_age_seconds:g})"
