"""The working-set storage variant of the cache's layers.

A working-set layer stores what a sealed layer stores (every position sealed as
it is written, the ciphertext copy always complete) and, while its sequence is
being generated, the plaintext K/V of its rows on the compute device, as
transformers' ``DynamicLayer`` would hold them. Reads hand that plaintext to
attention without decrypting (a READ record per layer × row, one emit per
layer per step). ``release_rows`` zeroes and drops the plaintext of rows; the
next update (or ``open_released``) opens their ciphertext once, every tag
verified before any of it is kept.

The variant differs from the sealed layer only through the layer's storage
hooks (``_open_released``, ``_kept`` / ``_stored``, ``_visible``, ``_truncated``,
``_rows_taken`` and the snapshot pair), in the way transformers' quantized
layers differ from ``DynamicLayer`` through ``_quantize`` / ``_dequantize``.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..audit.records import Op
from ..backends.base import PlaintextCopy, RowRecords
from ..errors import SessionExpiredError
from .clearing import zero, zero_at_collection
from .layer import EncryptedLayer
from .sliding import SlidingEncryptedLayer

__all__ = ["PlaintextStore", "WorkingSetLayer", "SlidingWorkingSetLayer"]

#: Fewest positions a plaintext buffer holds.
MIN_POSITIONS = 16


def _zero_box(box: list) -> None:
    """Zero every tensor of a store's box (its live buffers and the replaced ones not yet zeroed)."""
    zero_at_collection(box[0] + box[1])
    box[0], box[1] = [], []


class PlaintextStore:
    """K and V of positions ``[base, end)`` of every row, ``[batch, heads, capacity, dim]`` each, written in place.

    A buffer replaced by growth or row selection is *retired*, not zeroed at once: an operation that fails
    later puts it back (the layer's snapshot holds it by reference). ``sweep`` zeroes the retired buffers
    once no snapshot can need them; ``release`` and the collection of the store zero everything."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.base = 0
        self.end = 0
        self._geo: tuple = (None, None)    # (k, v, k's strides and offset, v's): what the step's views are cut by
        self._box: list = [[], []]        # [live buffers, retired buffers]
        self._guard = weakref.finalize(self, _zero_box, self._box)

    @property
    def held(self) -> bool:
        return self.k is not None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def _install(self, k: torch.Tensor, v: torch.Tensor, base: int, end: int) -> None:
        if self.k is not None and self.k is not k:
            self._box[1] += [self.k, self.v]
        self.k, self.v, self.base, self.end = k, v, base, end
        self._box[0] = [k, v]

    @staticmethod
    def buffers(batch: int, heads: int, positions: int, dim: int, dtype, device, zero_head: bool = True,
                room: int | None = None):
        """K and V buffers for ``positions`` positions and ``room`` more to grow into (default: as many again,
        the amortised doubling of appends), zeroed. ``zero_head=False``: the caller overwrites positions
        ``0..positions`` of every row at once (or zeroes them), so only the room after them is zeroed here
        (fresh memory may hold bytes this process freed earlier); zeroing only that room also spares the
        first touch of the head's pages, which the caller's writes pay once instead of twice."""
        cap = max(positions + (positions if room is None else room), MIN_POSITIONS)
        k = torch.empty((batch, heads, cap, dim), dtype=dtype, device=device)
        v = torch.empty((batch, heads, cap, dim), dtype=dtype, device=device)
        first = 0 if zero_head else positions
        if cap > first:
            zero(k[:, :, first:])
            zero(v[:, :, first:])
        return k, v

    @staticmethod
    def restore_room(positions: int) -> int:
        """Spare positions a buffer opened from ciphertext gets: a modest margin (an eighth), not a doubling.
        Every spare position is zeroed up front, and a restored sequence may never grow; one that does grows
        into a doubled buffer at its first overflow, as appends always do."""
        return max(positions // 8, MIN_POSITIONS)

    def adopt(self, k: torch.Tensor, v: torch.Tensor, base: int, end: int) -> None:
        """Hold buffers ``k``/``v`` whose index 0 is position ``base``, positions up to ``end`` written."""
        self._install(k, v, base, end)

    def written(self, n: int) -> None:
        """Positions ``end..end+n`` of the room ``room`` gave were written."""
        self.end += n

    def room(self, k_new: torch.Tensor, keep_from) -> PlaintextCopy:
        """Room for positions ``end..end+n`` (``n``, dtype and device of ``k_new``): where they go, as a seal's
        plaintext copy takes it; ``written(n)`` once they are there. Growing moves positions ``keep_from..``
        (``keep_from`` <= end: the first position any later read may need; or a callable returning it, called
        only when the store grows) into a buffer twice their size."""
        n = k_new.shape[2]
        if self.k is None or self.end + n > self.base + self.k.shape[2]:
            if callable(keep_from):
                keep_from = keep_from()
            keep_from = min(max(keep_from, self.base if self.k is not None else keep_from), self.end)
            b, h, _, d = k_new.shape
            # positions keep_from..end are copied below (when held) and end..end+n written after: then only
            # the room is zeroed
            k, v = self.buffers(b, h, self.end + n - keep_from, d, k_new.dtype, k_new.device,
                                zero_head=self.k is None and self.end > keep_from)
            if self.k is not None and self.end > keep_from:
                k[:, :, :self.end - keep_from].copy_(self.k[:, :, keep_from - self.base:self.end - self.base])
                v[:, :, :self.end - keep_from].copy_(self.v[:, :, keep_from - self.base:self.end - self.base])
            self._install(k, v, keep_from, self.end)
        return PlaintextCopy(self.k, self.v, self.end - self.base)

    def view(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views ``[batch, heads, end - start, dim]`` of positions ``start..end``."""
        return self._cut(start - self.base, end - start)

    def _cut(self, at: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of buffer positions ``at..at+n`` (``narrow(2, at, n)`` of each, by ``as_strided`` with
        the buffers' strides, read once per buffer: every step cuts two for its read; its write goes through
        the seal's plaintext copy, ``room``)."""
        shape = self.k.shape
        if not 0 <= at <= at + n <= shape[2]:
            raise IndexError(f"positions {at}..{at + n} are outside the buffer's {shape[2]}")
        geo = self._geo
        if geo[0] is not self.k or geo[1] is not self.v:
            k, v = self.k, self.v
            geo = self._geo = (k, v, k.stride(), k.storage_offset(), v.stride(), v.storage_offset())
        _, _, ks, ko, vs, vo = geo
        size = (shape[0], shape[1], n, shape[3])      # (v has k's shape: both made or selected together)
        return self.k.as_strided(size, ks, ko + at * ks[2]), self.v.as_strided(size, vs, vo + at * vs[2])

    def truncate(self, end: int) -> None:
        """Forget positions from ``end`` on; their bytes stay in the buffer (as ``DynamicLayer.crop`` leaves
        them in its tensor's storage) until overwritten, or zeroed by ``release``."""
        if end < self.base:
            self.base = end
        self.end = min(self.end, end)

    def take_rows(self, idx: np.ndarray) -> None:
        """Row r becomes old row ``idx[r]`` (new buffers; the old ones are retired)."""
        if self.k is None:
            return
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.k.device, non_blocking=True)
        self._install(self.k.index_select(0, t), self.v.index_select(0, t), self.base, self.end)

    def copy_rows(self, rows: np.ndarray, k_src: torch.Tensor, v_src: torch.Tensor, start: int) -> None:
        """Rows ``rows`` of positions ``start..end`` take those of ``k_src``/``v_src`` (which start at ``start``)."""
        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.k.device, non_blocking=True)
        k, v = self.view(start, self.end)
        n = self.end - start
        for dst, src in ((k, k_src), (v, v_src)):
            rows_src = src[:, :, :n].index_select(0, t)
            dst.index_copy_(0, t, rows_src)
            zero(rows_src)      # a temporary of plaintext rows: not left in freed memory

    def zero_rows(self, rows: np.ndarray) -> None:
        """Zero every position of ``rows`` in the live buffers, then the retired buffers."""
        self.clear_rows(rows)
        self.sweep()

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero every position (the whole capacity) of ``rows`` in the live buffers."""
        if self.k is None or rows.size == 0:
            return
        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.k.device, non_blocking=True)
        self.k.index_fill_(0, t, 0)
        self.v.index_fill_(0, t, 0)

    def sweep(self) -> None:
        """Zero the retired buffers (those no live state refers to)."""
        live = self._box[0]
        for t in self._box[1]:
            if not any(t is x for x in live):
                zero(t)
        self._box[1] = []

    def release(self) -> None:
        """Zero and drop every buffer."""
        _zero_box(self._box)
        self.k = self.v = None
        self._geo = (None, None)
        self.base = self.end = 0

    def state(self) -> tuple:
        return self.k, self.v, self.base, self.end

    def restore(self, state: tuple) -> None:
        """Put back a state from ``state()``; live buffers made since are zeroed at once (no snapshot taken
        before them can hold them), and so are positions written since into the same buffers (an update
        writes its plaintext before it seals: a refused seal leaves none of it behind)."""
        k, v, base, end = state
        if k is not None and self.k is k and self.end > end:
            zero(k.narrow(2, end - base, self.end - end))
            zero(v.narrow(2, end - base, self.end - end))
        if self.k is not None and self.k is not k:
            zero(self.k)
            zero(self.v)
            self._box[0] = []
            self.k = self.v = None
        if k is None:
            if self.k is not None:
                self._box[1] += [self.k, self.v]
            self.k = self.v = None
            self._box[0] = []
            self.base, self.end = base, end
        else:
            self._install(k, v, base, end)

    def clone(self) -> "PlaintextStore":
        new = PlaintextStore()
        if self.k is not None:
            new.adopt(self.k.clone(), self.v.clone(), self.base, self.end)
        return new

    def __deepcopy__(self, memo: dict) -> "PlaintextStore":
        return self.clone()

    def __repr__(self) -> str:
        return f"PlaintextStore(positions={self.base}..{self.end}, held={self.held})"


class WorkingSetStorage:
    """The working-set hooks over ``EncryptedLayer``'s storage (mixed in before it)."""

    residency = "working_set"

    # which rows are released: an array replaced, never written in place, with whether any row is, kept
    # beside it (every update asks; a numpy reduction there costs more than the rest of the question)
    @property
    def _released(self) -> np.ndarray:
        return self._released_mask

    @_released.setter
    def _released(self, mask: np.ndarray) -> None:
        self._released_mask = mask
        self._some_released = bool(mask.any())

    def _clear(self) -> None:
        super()._clear()
        self._ws = PlaintextStore()
        self._released = np.zeros(0, dtype=np.bool_)

    # keys / values: views of the plaintext held (None while released), what a DynamicLayer would hold
    @property
    def keys(self) -> torch.Tensor | None:
        return self._held_view(0)

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("a working-set layer's keys are its plaintext store; they cannot be set")

    @property
    def values(self) -> torch.Tensor | None:
        return self._held_view(1)

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("a working-set layer's values are its plaintext store; they cannot be set")

    def _held_view(self, which: int):
        ws = self.__dict__.get("_ws")
        if ws is None or not ws.held or self._some_released:
            return None
        return ws.view(max(self._start, ws.base), self._end)[which]

    @property
    def released(self) -> bool:
        """Whether some row's plaintext is not held (the next update or ``open_released`` opens it)."""
        return bool(self.is_initialized and self._some_released)

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._released = np.zeros(self._batch, dtype=np.bool_)

    # ---- hooks --------------------------------------------------------------------------------------------
    def _storage_state(self):
        return self._ws.state(), self._released      # never written in place: kept without a copy

    def _storage_restore(self, state) -> None:
        ws, released = state
        self._ws.restore(ws)
        self._released = released
        # released rows come back released: what the failed operation opened or wrote into them in place
        # is zeroed (retired buffers stay as they are: an enclosing operation's snapshot may hold them)
        self._ws.clear_rows(np.flatnonzero(released))

    def _open_released(self) -> None:
        """Open the ciphertext of the released rows into the plaintext store: all tags verified (DECRYPT
        records) before the store takes any of it; a failure leaves the rows released and raises."""
        self._ws.sweep()
        if not self._some_released:
            return
        rows = np.flatnonzero(self._released)
        first = int(self.table.start[0]) if self.num_segments else self._end
        self._check_covered(0, first)
        # positions first.._end of the opened rows are written by the decrypt; the buffers are zeroed below
        # unless the store adopts them, which it does only when every row was opened
        n = self._end - first
        k, v = PlaintextStore.buffers(self._batch, self.num_heads, n, self.head_dim, self.dtype, self.device,
                                      zero_head=rows.size < self._batch, room=PlaintextStore.restore_room(n))
        try:
            self._open(np.arange(self.num_segments), rows, k, v, first)
            if not self._ws.held:
                self._ws.adopt(k, v, first, self._end)
                k = v = None
            else:
                self._ws.copy_rows(rows, k, v, first)
        finally:
            if k is not None:
                zero(k)
                zero(v)
        mask = self._released.copy()
        mask[rows] = False
        self._released = mask

    def _kept(self, key_states, value_states) -> PlaintextCopy:
        return self._ws.room(key_states, keep_from=self._first_kept)

    def _stored(self, n: int) -> None:
        self._ws.written(n)

    def _first_kept(self) -> int:
        """The first position a later read may need (asked only when the store grows). Called before the
        update's segment is appended: with no segment yet, the first the update writes."""
        return int(self.table.start[0]) if self.num_segments else self._end

    def _read_records(self, view_start: int, end: int) -> tuple[bool, RowRecords | None]:
        auditor = self._ctx.auditor
        if auditor.holding:         # an operation over several layers holds its records: _visible writes them
            return False, None
        # what _visible would refuse, refused before the seal (the new positions only extend the coverage)
        self._check_covered(self.table.first_reaching(view_start), view_start)
        if not auditor.enabled:
            return True, None
        count = end - view_start
        # one READ record per row, written by the seal (a device backend: by its launch, nothing built here)
        return True, RowRecords(int(Op.READ), view_start, count, count * self._bytes_per_position)

    def _visible(self, view_start: int, recorded: bool = False):
        i0, base = self.table.reaching(view_start, self._end)
        if not recorded:
            self._check_covered(i0, view_start)
        k, v = self._ws.view(base, self._end)
        auditor = self._ctx.auditor
        if auditor.enabled and not recorded:
            count = self._end - view_start
            auditor.rows(Op.READ, self.layer_idx, self._row_slots, self._all_rows(), pos_start=view_start,
                         pos_count=count, nbytes=count * self._bytes_per_position)
        return k, v, base, None

    def _truncated(self, new_end: int) -> None:
        self._ws.truncate(new_end)

    def _rows_taken(self, idx: np.ndarray) -> None:
        self._ws.take_rows(idx)
        self._released = self._released[idx]

    # ---- release, offload, sessions -----------------------------------------------------------------------
    def _drop_plaintext(self, rows: np.ndarray) -> None:
        """Zero and drop the plaintext of ``rows`` (all rows: the whole store); only ciphertext remains."""
        if not self.is_initialized or rows.size == 0:
            return
        mask = self._released.copy()
        mask[rows] = True
        self._released = mask
        if mask.all():
            self._ws.release()
        else:
            self._ws.zero_rows(rows)

    def open_released(self) -> None:
        if not self.is_initialized:
            return
        try:
            with self._atomic():
                self._open_released()
        except SessionExpiredError:     # restore() and prefetch() refused: on record, like a refused update
            self._ctx.refuse(self.layer_idx, self._row_slots, Op.DECRYPT, self._start, self._end - self._start)
            raise

    def offload(self) -> None:
        """Drop the device plaintext (zeroed) and move only the ciphertext to host memory."""
        if self.is_initialized:
            self.release_rows(np.arange(self._batch))
        super().offload()

    def prefetch(self) -> None:
        """Bring the ciphertext back to the compute device and open it (every tag verified)."""
        super().prefetch()
        self.open_released()

    def _after_load(self) -> None:
        """A loaded layer holds only ciphertext: every row is released until it is opened."""
        self._ws.release()
        self._released = np.ones(self._batch, dtype=np.bool_)

    def verify_chunks(self) -> None:
        """Open every row once, every tag verified, into the working set (a load in this mode)."""
        self.open_released()

    def shred_rows(self, rows: np.ndarray) -> None:
        super().shred_rows(rows)
        self._drop_plaintext(rows)

    def reset(self) -> None:
        self._ws.release()
        super().reset()


class WorkingSetLayer(WorkingSetStorage, EncryptedLayer):
    """A full-attention layer in the working-set mode."""


class SlidingWorkingSetLayer(WorkingSetStorage, SlidingEncryptedLayer):
    """A sliding-window (or chunked) attention layer in the working-set mode."""
