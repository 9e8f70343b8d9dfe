"""What a session is, as data: its exportable state, and the ISO-8601 times it is dated with."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from .keyschedule import wipe

__all__ = ["SessionState", "iso_time", "printable_wall", "wall_of"]


def iso_time(wall: float) -> str:
    return _dt.datetime.fromtimestamp(wall, tz=_dt.timezone.utc).isoformat()


def printable_wall(wall: float, what: str) -> float:
    """``wall`` if it is a time ``iso_time`` can print, else ValueError."""
    try:
        iso_time(wall)
    except (OverflowError, ValueError, OSError):
        raise ValueError(f"{what} is out of the representable date range") from None
    return wall


def wall_of(when: object) -> float:
    """Seconds since the epoch of an ISO-8601 string or a datetime (naive means UTC)."""
    if isinstance(when, str):
        try:
            when = _dt.datetime.fromisoformat(when)
        except ValueError:
            raise ValueError(f"{when!r} is not an ISO-8601 timestamp") from None
    if not isinstance(when, _dt.datetime):
        raise TypeError(f"expires_at must be an ISO-8601 string or a datetime, got {type(when).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


@dataclass
class SessionState:
    """Everything a session is, key material included, for ``resumption.py`` to seal into an export:
    ids, KEM ciphertext, the chain value of ``epoch``, the keys of the live epochs, the branch points,
    the next counter, and expiry (``expires_at_wall``, seconds since the epoch) and limits. ``wipe()``
    zeroes the key material."""

    tenant_id: str
    display_name: str
    public_key: bytes | None
    session_id: str
    kem_ciphertext: bytes
    epoch: int
    next_sequence: int
    chain: bytearray
    keys: dict
    branches: dict
    expires_at_wall: float
    ttl_seconds: float
    max_entries_per_epoch: int

    def wipe(self) -> None:
        wipe(self.chain)
        for key in self.keys.values():
            wipe(key)
