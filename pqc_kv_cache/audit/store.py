"""Columnar in-memory store of drained audit records.

Records arrive from the drain thread in record-number order, dense.  They are
kept as one numpy array per field in fixed-size blocks, so that a query is a
handful of vectorised comparisons over contiguous columns.  Beyond
``max_entries`` the oldest records leave memory (they stay in the persisted
file); whole blocks are released once every record in them is evicted.
"""

from __future__ import annotations

import numpy as np

from .records import RECORD_DTYPE

__all__ = ["ColumnarStore", "COLUMNS"]

COLUMNS = tuple(n for n in RECORD_DTYPE.names if n != "flags")


# Widest columns first, so every column of a block's single buffer is aligned.
_ORDER = sorted(COLUMNS, key=lambda name: -RECORD_DTYPE[name].itemsize)
_ROW_BYTES = sum(RECORD_DTYPE[name].itemsize for name in COLUMNS)


class _Block:
    """Columns of ``size`` records carved from one buffer (one allocation per block).

    The store keeps one evicted block to reuse, so a log at its
    ``max_entries`` bound stops allocating.
    """

    __slots__ = ("first_no", "n", "cols", "buf")

    def __init__(self, first_no: int, size: int):
        self.first_no = first_no
        self.n = 0
        self.buf = np.empty(size * _ROW_BYTES, dtype=np.uint8)
        self.cols = {}
        off = 0
        for name in _ORDER:
            dt = RECORD_DTYPE[name]
            self.cols[name] = self.buf[off:off + size * dt.itemsize].view(dt)
            off += size * dt.itemsize


class ColumnarStore:
    """Dense run of records ``first_kept .. next_no-1`` in blocks of ``block_records``."""

    def __init__(self, max_entries: int, block_records: int = 65536):
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self.block_records = max(1, min(block_records, max_entries))
        self.blocks: list[_Block] = []
        self._spare: _Block | None = None   # an evicted block, reused for the next one
        self.first_kept = 0   # record number of the oldest record in memory
        self.next_no = 0      # record number the next appended record must have
        self.evicted = 0

    def __len__(self) -> int:
        return self.next_no - self.first_kept

    def reset_base(self, first_no: int) -> None:
        """Start numbering at ``first_no`` (a re-opened log continues its numbering)."""
        if self.blocks:
            raise RuntimeError("reset_base on a non-empty store")
        self.first_kept = self.next_no = first_no

    def append(self, recs: np.ndarray) -> None:
        """Append a structured array of RECORD_DTYPE whose record numbers continue the store."""
        n = len(recs)
        done = 0
        while done < n:
            if not self.blocks or self.blocks[-1].n == self.block_records:
                b = self._spare
                if b is None:
                    b = _Block(self.next_no, self.block_records)
                else:
                    self._spare = None
                    b.first_no, b.n = self.next_no, 0
                self.blocks.append(b)
            b = self.blocks[-1]
            k = min(n - done, self.block_records - b.n)
            part = recs[done:done + k]
            for name, col in b.cols.items():
                col[b.n:b.n + k] = part[name]
            b.n += k
            done += k
            self.next_no += k
        over = len(self) - self.max_entries
        if over > 0:
            self.first_kept += over
            self.evicted += over
            while self.blocks and self.blocks[0].first_no + self.blocks[0].n <= self.first_kept:
                self._spare = self.blocks.pop(0)

    def select(self, *, limit: int | None, newest_first: bool, tenant_idx=None, session_idx=None,
               op=None, layer=None, position=None, success=None, since_ns=None) -> list[tuple[_Block, int]]:
        """(block, index) pairs of matching records, newest first or oldest first, up to ``limit``."""
        out: list[tuple[_Block, int]] = []
        if limit is not None and limit <= 0:
            return out
        blocks = list(reversed(self.blocks)) if newest_first else list(self.blocks)
        for b in blocks:
            lo = max(0, self.first_kept - b.first_no)
            hi = b.n
            if lo >= hi:
                continue
            c = b.cols
            idx = None   # candidate indices within [lo, hi), narrowed field by field

            def narrow(mask_fn):
                nonlocal idx
                if idx is None:
                    idx = np.flatnonzero(mask_fn(slice(lo, hi))) + lo
                else:
                    idx = idx[mask_fn(idx)]

            if tenant_idx is not None:
                narrow(lambda s: c["tenant_idx"][s] == tenant_idx)
            if session_idx is not None:
                narrow(lambda s: c["session_idx"][s] == session_idx)
            if layer is not None:
                narrow(lambda s: c["layer"][s] == layer)
            if op is not None:
                narrow(lambda s: c["op"][s] == op)
            if position is not None:
                p = np.uint32(position)
                narrow(lambda s: (c["pos_start"][s] <= p) & ((p - c["pos_start"][s]) < c["pos_count"][s]))
            if success is not None:
                narrow((lambda s: c["status"][s] == 0) if success else (lambda s: c["status"][s] != 0))
            if since_ns is not None:
                if since_ns > 0xFFFF_FFFF_FFFF_FFFF:
                    return []         # later than any u64 timestamp
                t = np.uint64(max(0, since_ns))
                narrow(lambda s: c["host_ts_ns"][s] >= t)
            if idx is None:
                idx = np.arange(lo, hi)
            if newest_first:
                idx = idx[::-1]
            if limit is not None:
                idx = idx[:limit - len(out)]
            out.extend((b, int(i)) for i in idx)
            if limit is not None and len(out) >= limit:
                break
        return out

    def record(self, b: _Block, i: int) -> dict:
        return {name: int(col[i]) for name, col in b.cols.items()}
