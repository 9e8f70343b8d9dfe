"""The chunk table of one layer: segments × batch rows, numpy only.

A *segment* is a position range ``[start, start + count)`` that every batch row
stores as one chunk. Per (segment, row) the table keeps four int64 columns:
the chunk's nonce ``counter``, its key ``epoch``, the ``session_slot`` whose key
sealed it (an index into the cache's session list) and its byte ``offset`` in
the layer's arena. Segments are kept in position order.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, NamedTuple

import numpy as np

__all__ = ["COLUMNS", "SealedChunks", "SegmentTable"]

COLUMNS = ("counter", "epoch", "session_slot", "offset")

#: Segments a new table has room for before its buffers grow (they double).
_MIN_ROOM = 16


class SealedChunks(NamedTuple):
    """What sealing N chunks produced, one int64 entry per chunk (the table's columns, in order)."""

    counter: np.ndarray
    epoch: np.ndarray
    session_slot: np.ndarray
    offset: np.ndarray


class SegmentTable:
    """Segment starts and counts ``[segments]``, and the ``[segments, rows]`` chunk columns.

    The arrays live in buffers with room to grow, so a decode step's ``append`` writes one row instead of
    building new arrays; ``start``, ``count``, ``columns`` and the named columns are views of the live
    part. ``state()`` / ``restore()`` keep and put back what an operation may change without copying: an
    append writes past the state's end, and every change of a live entry (``set_segment``, ``set_rows``,
    ``set_column``) first copies the buffers once a state has been taken (copy on write). Setting
    ``columns`` adopts new arrays (copied into buffers of their own)."""

    __slots__ = ("_n", "_start", "_count", "_cols", "_shared", "_abut")

    def __init__(self, rows: int = 0):
        self._n = 0
        self._start = np.zeros(_MIN_ROOM, dtype=np.int64)
        self._count = np.zeros(_MIN_ROOM, dtype=np.int64)
        self._cols = {f: np.zeros((_MIN_ROOM, rows), dtype=np.int64) for f in COLUMNS}
        self._shared = False      # a state() may still hold these buffers
        self._abut = True         # each segment starts where the one before ends (None: not known)

    # ---- the live part ------------------------------------------------------------------------------
    @property
    def start(self) -> np.ndarray:
        return self._start[:self._n]

    @property
    def count(self) -> np.ndarray:
        return self._count[:self._n]

    @property
    def columns(self) -> Mapping[str, np.ndarray]:
        """The live columns (views), read-only as a mapping: a column is replaced with ``set_column``, all of
        them by assigning ``columns``."""
        n = self._n
        return MappingProxyType({f: a[:n] for f, a in self._cols.items()})

    @columns.setter
    def columns(self, value: dict) -> None:
        """Every column at once (``[segments, rows]`` each; the number of rows may change)."""
        if set(value) != set(COLUMNS):
            raise ValueError(f"columns must be exactly {COLUMNS}, got {sorted(value)}")
        arrays = {f: np.asarray(value[f], dtype=np.int64) for f in COLUMNS}
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != self._n:
            raise ValueError(f"columns must share one [segments={self._n}, rows] shape, got {sorted(shapes)}")
        cap = self._start.shape[0]
        self._cols = {f: _with_room(a, cap) for f, a in arrays.items()}

    def set_column(self, name: str, value: np.ndarray) -> None:
        """Column ``name`` now holds ``value`` (``[segments, rows]``)."""
        value = np.asarray(value, dtype=np.int64)
        if value.shape != (self._n, self.rows):
            raise ValueError(f"column {name} must be [{self._n}, {self.rows}], got {list(value.shape)}")
        self._own()
        self._cols[name][:self._n] = value

    @property
    def rows(self) -> int:
        return int(self._cols["counter"].shape[1])

    @classmethod
    def from_arrays(cls, start, count, columns: dict) -> "SegmentTable":
        """A table holding ``start`` / ``count`` (``[segments]``) and ``columns`` (``[segments, rows]`` each),
        copied into buffers of its own."""
        start = np.asarray(start, dtype=np.int64).reshape(-1)
        count = np.asarray(count, dtype=np.int64).reshape(-1)
        if count.shape != start.shape:
            raise ValueError(f"start has {start.shape[0]} entries, count {count.shape[0]}")
        new = cls(0)
        new._adopt(start, count, {f: new._cols[f][:0] for f in COLUMNS})
        new.columns = columns
        return new

    def _adopt(self, start: np.ndarray, count: np.ndarray, cols: dict) -> None:
        """Hold copies of ``start``, ``count`` and ``cols`` (live entries only) in new buffers with room for
        as many again (at least ``_MIN_ROOM``)."""
        if start.shape[0] != self._n or start is not self._start:
            self._abut = None       # other segments (an append's growth keeps them, and what is known)
        cap = max(_MIN_ROOM, 2 * start.shape[0])
        self._n = int(start.shape[0])
        self._start, self._count = _with_room(start, cap), _with_room(count, cap)
        self._cols = {f: _with_room(a, cap) for f, a in cols.items()}
        self._shared = False

    def _own(self) -> None:
        """Copy the buffers if a state may still hold them (before a live entry changes)."""
        if self._shared:
            self._start, self._count = self._start.copy(), self._count.copy()
            self._cols = {f: a.copy() for f, a in self._cols.items()}
            self._shared = False

    def state(self) -> tuple:
        """What an operation may change, kept without a copy (see the class docstring)."""
        self._shared = True
        return self._n, self._start, self._count, dict(self._cols), self._abut

    def restore(self, state: tuple) -> None:
        self._n, self._start, self._count, cols, self._abut = state
        self._cols = dict(cols)
        self._shared = True

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return self._n

    @property
    def counter(self) -> np.ndarray:
        return self._cols["counter"][:self._n]

    @property
    def epoch(self) -> np.ndarray:
        return self._cols["epoch"][:self._n]

    @property
    def session_slot(self) -> np.ndarray:
        return self._cols["session_slot"][:self._n]

    @property
    def offset(self) -> np.ndarray:
        return self._cols["offset"][:self._n]

    def ends(self) -> np.ndarray:
        return self.start + self.count

    def read_columns(self, first: int) -> tuple:
        """(session_slot, epoch, start, count, counter, offset) of segments ``first``.. (views): what a read
        of them takes, in one call (every step reads them)."""
        n, c = self._n, self._cols
        return (c["session_slot"][first:n], c["epoch"][first:n], self._start[first:n], self._count[first:n],
                c["counter"][first:n], c["offset"][first:n])

    def chunk_sizes(self, bytes_per_position: int, tag_size: int) -> np.ndarray:
        """Stored bytes of each segment's chunks (every row's chunk of a segment has the same size)."""
        return self.count * bytes_per_position + tag_size

    def first_reaching(self, position: int) -> int:
        """Index of the first segment that ends after ``position``."""
        if self._n and int(self._start[0]) + int(self._count[0]) > position:    # the first one (full attention)
            return 0
        return int(np.searchsorted(self.ends(), position, side="right"))

    def reaching(self, position: int, end: int) -> tuple[int, int]:
        """(``first_reaching(position)``, that segment's start, or ``end`` when no segment reaches past
        ``position``): where a read from ``position`` begins, in one call."""
        i = self.first_reaching(position)
        return i, (int(self._start[i]) if i < self._n else end)

    def abutting(self) -> bool:
        """Whether each segment starts where the one before it ends (known from the appends that built the
        table; computed once after any other change)."""
        if self._abut is None:
            n = self._n
            self._abut = bool((self._start[1:n] == self._start[:n - 1] + self._count[:n - 1]).all())
        return self._abut

    def gap(self, first: int, view_start: int, end: int) -> tuple[int, int] | None:
        """The first position range of ``view_start..end`` that segments ``first..`` leave uncovered
        (or overlap out of order), or None when they cover it exactly, in order."""
        n = self._n
        if first < n and self.abutting():     # no hole between segments: only the two ends to check
            s0, e1 = int(self._start[first]), int(self._start[n - 1]) + int(self._count[n - 1])
            if s0 <= view_start and e1 == end:
                return None
        starts, counts = self.start[first:], self.count[first:]
        ends = starts + counts
        if starts.size == 0:
            return (view_start, end) if view_start < end else None
        if int(starts[0]) > view_start:
            return (view_start, int(starts[0]))
        holes = np.flatnonzero(starts[1:] != ends[:-1])
        if holes.size:
            k = int(holes[0])
            return (int(min(ends[k], starts[k + 1])), int(max(ends[k], starts[k + 1])))
        if int(ends[-1]) != end:
            return (int(min(ends[-1], end)), int(max(ends[-1], end)))
        return None

    def select(self, segs: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of chunks (segments ``segs`` × ``rows``, both non-empty), flattened segment-major
        (a run of consecutive segments of every row in order is sliced, not gathered)."""
        nrows = self.rows
        if rows.size == nrows and segs[-1] - segs[0] + 1 == segs.size and (rows == np.arange(nrows)).all():
            lo, hi = int(segs[0]), int(segs[-1]) + 1
            return {f: a[lo:hi].reshape(-1) for f, a in self._cols.items()}
        ix = np.ix_(segs, rows)
        return {f: a[:self._n][ix].reshape(-1) for f, a in self._cols.items()}

    def merge_start(self, cap: int, floor: int) -> int:
        """Where a binary-counter merge of the trailing segments starts.

        Walking back from the last segment, a segment joins the run while it is no larger than the run's
        total so far, the total stays within ``cap`` positions and the segment starts at or after ``floor``.
        Returns the first segment of the run (the last segment itself when nothing joins)."""
        j = self._n - 1
        count, start = self._count, self._start
        total = int(count[j])
        while j >= 1:
            prev = int(count[j - 1])
            if prev > total or prev + total > cap or int(start[j - 1]) < floor:
                break
            total += prev
            j -= 1
        return j

    # ---- changing -----------------------------------------------------------------------------------
    def append(self, start: int, count: int, sealed: SealedChunks) -> None:
        """A new last segment holding one chunk per row (written past the live part: no copy, even when a
        state is held)."""
        n = self._n
        if n == self._start.shape[0]:
            self._adopt(self._start, self._count, self._cols)     # full: twice the room
        if n and self._abut is not None:
            self._abut = self._abut and int(self._start[n - 1]) + int(self._count[n - 1]) == start
        self._start[n] = start
        self._count[n] = count
        cols = self._cols
        cols["counter"][n] = sealed.counter
        cols["epoch"][n] = sealed.epoch
        cols["session_slot"][n] = sealed.session_slot
        cols["offset"][n] = sealed.offset
        self._n = n + 1

    def keep(self, which: np.ndarray) -> None:
        """Keep the segments ``which`` selects (a boolean mask or indices, in order)."""
        n = self._n
        self._adopt(self._start[:n][which], self._count[:n][which],
                    {f: a[:n][which] for f, a in self._cols.items()})

    def set_segment(self, i: int, count: int, sealed: SealedChunks) -> None:
        """Segment ``i`` now holds ``count`` positions in the chunks ``sealed`` (one per row)."""
        self._own()
        self._count[i] = count
        self._abut = None
        for f, a in zip(COLUMNS, sealed):
            self._cols[f][i] = a

    def set_rows(self, rows: np.ndarray, sealed: SealedChunks) -> None:
        """Every segment's chunk of ``rows`` is now in ``sealed`` (segment-major, ``rows`` inner)."""
        self._own()
        n = self._n
        for f, a in zip(COLUMNS, sealed):
            self._cols[f][:n, rows] = a.reshape(n, rows.size)

    def take_rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The columns with row r holding old row ``idx[r]`` (new arrays; the table is unchanged)."""
        n = self._n
        return {f: a[:n, idx] for f, a in self._cols.items()}

    def copy(self) -> "SegmentTable":
        """A table of its own (its own buffers) with the same segments and chunks."""
        new = SegmentTable.__new__(SegmentTable)
        new._n = self._n
        new._start, new._count = self._start.copy(), self._count.copy()
        new._cols = {f: a.copy() for f, a in self._cols.items()}
        new._shared = False
        new._abut = self._abut
        return new


def _with_room(a: np.ndarray, cap: int) -> np.ndarray:
    """``a`` (int64, first axis the live entries) copied into a buffer of ``max(cap, len(a))`` entries."""
    out = np.zeros((max(cap, a.shape[0]),) + a.shape[1:], dtype=np.int64)
    out[:a.shape[0]] = a
    return out
