"""A layer's byte arena: one growing uint8 tensor holding ciphertext chunks (numpy and torch only).

Chunks are appended at the end; a chunk that is replaced (merged, cropped,
re-sealed) or dropped stays behind as dead bytes until a compaction copies the
live chunks into a fresh, right-sized arena. The arena knows chunks only as
(offset, size) pairs handed in by its owner: ``offsets`` is an int64 array of
any shape whose first axis matches ``sizes`` (one size per segment; every entry
of a segment's row of offsets is a chunk of that size, and several entries of
one segment may share one chunk; different segments never share one).

The policy keeps the arena within a constant factor of its live chunks:

- an allocation that does not fit compacts into an arena of ``GROWTH`` × (live + new) bytes;
- after its owner dropped or replaced chunks (``reclaim``), the arena compacts into ``GROWTH`` × live
  bytes once dead bytes pass ``DEAD_FRACTION`` × live, or its capacity ``MAX_CAPACITY`` × live.

So after every operation ``used`` ≤ (1 + DEAD_FRACTION) × live and ``capacity`` ≤ MAX_CAPACITY × live
(appends only add live bytes). An allocation that fits only moves ``used``: the live bytes are counted
only when the arena is full or chunks were dropped. Each compaction copies every live byte (into a new
buffer: see ``compact``); merges, which replace about three times the live bytes per doubling of the
positions, make a compaction every ~DEAD_FRACTION × live of re-sealed bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .clearing import zero

__all__ = ["DEAD_FRACTION", "GROWTH", "MAX_CAPACITY", "ArenaStats", "ByteArena"]

#: Capacity a compaction gives, as a multiple of the bytes it must hold (< 2: the arena never doubles).
GROWTH = 1.5
#: Dead bytes tolerated, as a fraction of live ones, before ``reclaim`` compacts.
DEAD_FRACTION = 0.25
#: Capacity tolerated, as a multiple of live bytes, after chunks were dropped (a crop, a row selection).
MAX_CAPACITY = 1.8


@dataclass(frozen=True)
class ArenaStats:
    """A layer's arena in bytes: ``used`` (written so far, live and dead), ``capacity`` (allocated) and
    ``live`` (the distinct chunks its table names: ciphertext and tags)."""

    used: int
    capacity: int
    live: int

    @property
    def dead(self) -> int:
        """Bytes of replaced or dropped chunks not yet reclaimed."""
        return self.used - self.live


def _unique_chunks(offsets: np.ndarray, sizes: np.ndarray):
    """(distinct offsets, their sizes, index of each entry of ``offsets.reshape(-1)`` in the distinct ones)."""
    flat = offsets.reshape(-1)
    every = np.broadcast_to(sizes.reshape(-1, *([1] * (offsets.ndim - 1))), offsets.shape).reshape(-1)
    uniq, first, inv = np.unique(flat, return_index=True, return_inverse=True)
    return uniq, every[first], inv


def _sized(nbytes: int) -> int:
    """The capacity of an arena that must hold ``nbytes``."""
    return int(nbytes * GROWTH) + 1


class ByteArena:
    """``buffer[:used]`` holds the chunks written so far, live and dead."""

    __slots__ = ("buffer", "used")

    def __init__(self, device: torch.device | str = "cpu"):
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self.used = 0

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def capacity(self) -> int:
        return self.buffer.numel()

    def view(self) -> torch.Tensor:
        """The bytes written so far (live and not yet reclaimed), as a uint8 view."""
        return self.buffer[: self.used]

    @staticmethod
    def live_bytes(offsets: np.ndarray, sizes: np.ndarray) -> int:
        """Bytes of the distinct chunks ``offsets`` / ``sizes`` name."""
        if offsets.size == 0:
            return 0
        per_segment = offsets.reshape(offsets.shape[0], -1)
        if per_segment.shape[1] == 1:
            return int(sizes.sum())
        # rows share a chunk only within a segment (after a beam reorder): count distinct offsets per segment
        ordered = np.sort(per_segment, axis=1)
        changes = (ordered[:, 1:] != ordered[:, :-1]).sum(1)
        return int(sizes @ changes) + int(sizes.sum())

    def stats(self, offsets: np.ndarray, sizes: np.ndarray) -> ArenaStats:
        """Used, capacity and live bytes, the live chunks being ``offsets`` / ``sizes``."""
        return ArenaStats(self.used, self.capacity, self.live_bytes(offsets, sizes))

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit after the bytes written so far without moving anything."""
        return self.used + nbytes <= self.buffer.numel()

    def take(self, nbytes: int) -> int:
        """The offset of ``nbytes`` appended after the bytes written so far (they must fit)."""
        off = self.used
        self.used = off + nbytes
        return off

    def alloc(self, nbytes: int, offsets: np.ndarray, sizes: np.ndarray) -> tuple[int, np.ndarray]:
        """Room for ``nbytes`` after the live chunks ``offsets`` / ``sizes``; when they do not fit, the live
        chunks first move into an arena of ``GROWTH`` × (live + ``nbytes``) bytes (dead bytes are dropped on
        the way). Returns (offset of the room, the live chunks' offsets, moved if it compacted)."""
        if not self.fits(nbytes):
            offsets = self.compact(offsets, sizes, _sized(self.live_bytes(offsets, sizes) + nbytes))
        return self.take(nbytes), offsets

    def reclaim(self, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
        """After the owner dropped or replaced chunks (the live ones are now ``offsets`` / ``sizes``): once
        dead bytes pass ``DEAD_FRACTION`` × live or capacity ``MAX_CAPACITY`` × live, compact into an arena
        of ``GROWTH`` × live bytes.
        Returns the live chunks' new offsets, or None when nothing moved."""
        live = self.live_bytes(offsets, sizes)
        if self.used - live <= DEAD_FRACTION * live and self.buffer.numel() <= MAX_CAPACITY * live:
            return None
        return self.compact(offsets, sizes, _sized(live))

    def compact(self, offsets: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray:
        """Copy the live chunks (ciphertext as is: moving a chunk changes nothing it is bound to) into a new
        buffer of ``capacity`` bytes, in offset order. Returns their new offsets (same shape as ``offsets``).

        A new buffer, never the old one rewritten: a snapshot (``state``) keeps the old one as it was."""
        # the live chunks are packed from offset 0 and the rest is zeroed below: fresh memory may hold bytes
        # this process freed earlier (plaintext included); zeroing only the tail spares a pass over the head
        new = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        used = 0
        new_offsets = offsets
        if offsets.size:
            uniq, usz, inv = _unique_chunks(offsets, sizes)
            dest = np.cumsum(usz) - usz
            used = int(dest[-1] + usz[-1])
            if used > capacity:
                raise ValueError(f"{used} live bytes do not fit a {capacity}-byte arena")
            # one copy per run of chunks adjacent in the old buffer (a segment's rows were sealed side by
            # side), and one per distinct chunk (rows that share a chunk after a beam reorder share its copy)
            breaks = np.flatnonzero(uniq[1:] != uniq[:-1] + usz[:-1]) + 1
            starts = np.concatenate([[0], breaks])
            ends = np.concatenate([breaks, [uniq.size]])
            for src, dst, n in zip(uniq[starts].tolist(), dest[starts].tolist(),
                                   (dest[ends - 1] + usz[ends - 1] - dest[starts]).tolist()):
                new[dst:dst + n].copy_(self.buffer[src:src + n])
            new_offsets = dest[inv].reshape(offsets.shape).astype(np.int64)
        if capacity > used:
            zero(new[used:])
        self.buffer = new
        self.used = used
        return new_offsets

    def shred(self, offsets: np.ndarray, sizes: np.ndarray) -> None:
        """Zero the chunks ``offsets`` / ``sizes`` (row i of ``offsets``: chunks of size ``sizes[i]``)."""
        for i in range(offsets.shape[0]):
            n = int(sizes[i])
            for o in np.unique(offsets[i]).tolist():
                self.buffer[o:o + n].zero_()

    def zero(self) -> None:
        self.buffer.zero_()

    @classmethod
    def holding(cls, data: torch.Tensor, device: torch.device | str) -> "ByteArena":
        """An arena whose chunks are the bytes ``data`` (uint8, 1-D), taken as they are on ``device``
        (no copy when they are already there)."""
        new = cls.__new__(cls)
        new.buffer = data.to(device=device, dtype=torch.uint8).reshape(-1)
        new.used = new.buffer.numel()
        return new

    def state(self) -> tuple[torch.Tensor, int]:
        """What an operation may change, kept by reference: bytes below ``used`` are never rewritten in
        place, and compaction builds a new buffer."""
        return self.buffer, self.used

    def restore(self, state: tuple[torch.Tensor, int]) -> None:
        self.buffer, self.used = state

    def clone(self) -> "ByteArena":
        """An arena of its own holding the same bytes."""
        new = ByteArena.__new__(ByteArena)
        new.buffer, new.used = self.buffer.clone(), self.used
        return new

    def to(self, device: torch.device | str) -> None:
        """Move the bytes to ``device`` (non-blocking where the copy allows; into pinned host memory when
        leaving a GPU, so the copy back is asynchronous too)."""
        device = torch.device(device)
        if self.buffer.device == device:
            return
        if device.type == "cpu" and self.buffer.device.type == "cuda":
            host = torch.empty(self.buffer.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(self.buffer, non_blocking=True)
            self.buffer = host
        else:
            self.buffer = self.buffer.to(device, non_blocking=True)
