"""The chunk table of one layer: segments × batch rows, numpy only.

A *segment* is a position range ``[start, start + count)`` that every batch row
stores as one chunk. Per (segment, row) the table keeps four int64 columns:
the chunk's nonce ``counter``, its key ``epoch``, the ``session_slot`` whose key
sealed it (an index into the cache's session list) and its byte ``offset`` in
the layer's arena. Segments are kept in position order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["COLUMNS", "SealedChunks", "SegmentTable"]

COLUMNS = ("counter", "epoch", "session_slot", "offset")


class SealedChunks(NamedTuple):
    """What sealing N chunks produced, one int64 entry per chunk (the table's columns, in order)."""

    counter: np.ndarray
    epoch: np.ndarray
    session_slot: np.ndarray
    offset: np.ndarray


class SegmentTable:
    """Segment starts and counts ``[segments]``, and the ``[segments, rows]`` chunk columns."""

    __slots__ = ("start", "count", "columns")

    def __init__(self, rows: int = 0):
        self.start = np.zeros(0, dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int64)
        self.columns = {f: np.zeros((0, rows), dtype=np.int64) for f in COLUMNS}

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return int(self.start.shape[0])

    @property
    def counter(self) -> np.ndarray:
        return self.columns["counter"]

    @property
    def epoch(self) -> np.ndarray:
        return self.columns["epoch"]

    @property
    def session_slot(self) -> np.ndarray:
        return self.columns["session_slot"]

    @property
    def offset(self) -> np.ndarray:
        return self.columns["offset"]

    def ends(self) -> np.ndarray:
        return self.start + self.count

    def chunk_sizes(self, bytes_per_position: int, tag_size: int) -> np.ndarray:
        """Stored bytes of each segment's chunks (every row's chunk of a segment has the same size)."""
        return self.count * bytes_per_position + tag_size

    def first_reaching(self, position: int) -> int:
        """Index of the first segment that ends after ``position``."""
        return int(np.searchsorted(self.ends(), position, side="right"))

    def gap(self, first: int, view_start: int, end: int) -> tuple[int, int] | None:
        """The first position range of ``view_start..end`` that segments ``first..`` leave uncovered
        (or overlap out of order), or None when they cover it exactly, in order."""
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
        nrows = self.columns["counter"].shape[1]
        if rows.size == nrows and segs[-1] - segs[0] + 1 == segs.size and (rows == np.arange(nrows)).all():
            lo, hi = int(segs[0]), int(segs[-1]) + 1
            return {f: a[lo:hi].reshape(-1) for f, a in self.columns.items()}
        ix = np.ix_(segs, rows)
        return {f: a[ix].reshape(-1) for f, a in self.columns.items()}

    def merge_start(self, cap: int, floor: int) -> int:
        """Where a binary-counter merge of the trailing segments starts.

        Walking back from the last segment, a segment joins the run while it is no larger than the run's
        total so far, the total stays within ``cap`` positions and the segment starts at or after ``floor``.
        Returns the first segment of the run (the last segment itself when nothing joins)."""
        j = self.num_segments - 1
        total = int(self.count[j])
        while j >= 1:
            prev = int(self.count[j - 1])
            if prev > total or prev + total > cap or int(self.start[j - 1]) < floor:
                break
            total += prev
            j -= 1
        return j

    # ---- changing -----------------------------------------------------------------------------------
    def append(self, start: int, count: int, sealed: SealedChunks) -> None:
        """A new last segment holding one chunk per row."""
        self.start = np.append(self.start, start)
        self.count = np.append(self.count, count)
        for f, a in zip(COLUMNS, sealed):
            self.columns[f] = np.concatenate([self.columns[f], np.asarray(a, dtype=np.int64)[None, :]])

    def keep(self, which: np.ndarray) -> None:
        """Keep the segments ``which`` selects (a boolean mask or indices, in order)."""
        self.start = self.start[which]
        self.count = self.count[which]
        for f in COLUMNS:
            self.columns[f] = self.columns[f][which]

    def set_segment(self, i: int, count: int, sealed: SealedChunks) -> None:
        """Segment ``i`` now holds ``count`` positions in the chunks ``sealed`` (one per row)."""
        self.count[i] = count
        for f, a in zip(COLUMNS, sealed):
            self.columns[f][i] = a

    def set_rows(self, rows: np.ndarray, sealed: SealedChunks) -> None:
        """Every segment's chunk of ``rows`` is now in ``sealed`` (segment-major, ``rows`` inner)."""
        for f, a in zip(COLUMNS, sealed):
            self.columns[f][:, rows] = a.reshape(self.num_segments, rows.size)

    def take_rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The columns with row r holding old row ``idx[r]`` (new arrays; the table is unchanged)."""
        return {f: a[:, idx] for f, a in self.columns.items()}

    def copy(self) -> "SegmentTable":
        new = SegmentTable.__new__(SegmentTable)
        new.start, new.count = self.start.copy(), self.count.copy()
        new.columns = {f: a.copy() for f, a in self.columns.items()}
        return new
