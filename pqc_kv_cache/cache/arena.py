"""A layer's byte arena: one growing uint8 tensor holding ciphertext chunks (numpy and torch only).

Chunks are appended at the end; a chunk that is replaced (merged, cropped,
re-sealed) stays behind as dead bytes until the next compaction copies the
live chunks into a fresh arena. The arena knows chunks only as (offset, size)
pairs handed in by its owner: ``offsets`` is an int64 array of any shape whose
first axis matches ``sizes`` (one size per segment; every entry of a segment's
row of offsets is a chunk of that size, and several entries may share one
chunk).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ByteArena"]

#: Smallest capacity an arena grows to.
MIN_CAPACITY = 1 << 16


def _unique_chunks(offsets: np.ndarray, sizes: np.ndarray):
    """(distinct offsets, their sizes, index of each entry of ``offsets.reshape(-1)`` in the distinct ones)."""
    flat = offsets.reshape(-1)
    every = np.broadcast_to(sizes.reshape(-1, *([1] * (offsets.ndim - 1))), offsets.shape).reshape(-1)
    uniq, first, inv = np.unique(flat, return_index=True, return_inverse=True)
    return uniq, every[first], inv


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
        _, usz, _ = _unique_chunks(offsets, sizes)
        return int(usz.sum())

    def alloc(self, nbytes: int, offsets: np.ndarray, sizes: np.ndarray) -> tuple[int, np.ndarray]:
        """Room for ``nbytes`` after the live chunks ``offsets`` / ``sizes``: amortised doubling, reclaiming
        dead bytes first. Returns (offset of the room, the live chunks' offsets, moved if it compacted)."""
        cap = self.capacity
        if self.used + nbytes > cap:
            live = self.live_bytes(offsets, sizes)
            if live + nbytes <= cap // 2:
                offsets = self.compact(offsets, sizes, cap)
            else:
                offsets = self.compact(offsets, sizes, max(2 * cap, 2 * (live + nbytes), MIN_CAPACITY))
        off = self.used
        self.used += nbytes
        return off, offsets

    def compact(self, offsets: np.ndarray, sizes: np.ndarray, capacity: int) -> np.ndarray:
        """Copy the live chunks (ciphertext as is: moving a chunk changes nothing it is bound to) into a new
        buffer of ``capacity`` bytes, in offset order. Returns their new offsets (same shape as ``offsets``)."""
        # zeroed, not empty: fresh memory may hold bytes this process freed earlier (plaintext included)
        new = torch.zeros(capacity, dtype=torch.uint8, device=self.device)
        used = 0
        new_offsets = offsets
        if offsets.size:
            uniq, usz, inv = _unique_chunks(offsets, sizes)
            dest = np.cumsum(usz) - usz
            # one copy per distinct chunk (rows that share a chunk after a beam reorder share its copy)
            for o, n, d in zip(uniq.tolist(), usz.tolist(), dest.tolist()):
                new[d:d + n].copy_(self.buffer[o:o + n])
            used = int(usz.sum())
            new_offsets = dest[inv].reshape(offsets.shape).astype(np.int64)
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
