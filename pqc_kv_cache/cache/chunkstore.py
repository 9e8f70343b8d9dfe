"""ChunkStore: how a layer's K/V are kept as ciphertext chunks, sealed and opened (EncryptedLayer's base).

A layer's ciphertext chunks (envelope v1) live in one growing byte arena (``arena.py``) under a chunk
table (``segments.py``): a *segment* is a position range written by one update (a prefill, one decoded
token, a block of draft tokens) or a merge of such ranges, and holds one chunk per batch row. This base
holds that storage, its atomic snapshots, the seal and open primitives over the backend, and the hooks
through which the working-set variant keeps plaintext; ``EncryptedLayer`` (layer.py) is the transformers
layer API over it. Everything it uses of its cache comes through the ``LayerContext``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..audit.records import Op, Status
from ..envelope import TAG_SIZE
from ..errors import DecryptionError
from ..session import TenantSession
from .arena import ArenaStats, ByteArena
from .context import LayerContext
from .segments import SealedChunks, SegmentTable

if TYPE_CHECKING:
    from ..backends.base import PlaintextCopy, RowRecords
    from .context import ChunkLayout

__all__ = ["ChunkStore"]


class ChunkStore:
    """A layer's ciphertext chunks: arena, chunk table, row sessions; atomic snapshots; seal and open."""

    _ctx: LayerContext
    layer_idx: int

    # ---- storage -------------------------------------------------------------------------
    def _clear(self) -> None:
        self.keys = None
        self.values = None
        self.is_initialized = False
        self._batch = 0
        self.table = SegmentTable()
        self._row_slots = np.zeros(0, dtype=np.int64)
        self.arena: ByteArena | None = None
        self._end = 0       # absolute position after the last stored one
        self._start = 0     # first visible position (0 for full attention)

    @property
    def cumulative_length(self) -> int:
        """Positions written so far (what ``DynamicSlidingWindowLayer.cumulative_length`` counts)."""
        return self._end

    @property
    def first_position(self) -> int:
        """The first position still kept (0 unless a sliding window has moved past it)."""
        return self._start

    @property
    def ciphertext(self) -> torch.Tensor:
        """The layer's stored bytes (ciphertext and tags, including not yet reclaimed ones) as a uint8 view."""
        if self.arena is None:
            return torch.zeros(0, dtype=torch.uint8)
        return self.arena.view()

    @property
    def num_segments(self) -> int:
        return self.table.num_segments

    @property
    def row_session_slots(self) -> np.ndarray:
        """The session slot of each batch row (a copy)."""
        return self._row_slots.copy()

    @property
    def row_sessions(self) -> list[TenantSession]:
        """The session of each batch row."""
        return [self._ctx.sessions[i] for i in self._row_slots.tolist()]

    def rows_of(self, slot: int) -> np.ndarray:
        """The batch rows of session slot ``slot``."""
        return np.flatnonzero(self._row_slots == slot)

    def chunk_sizes(self) -> np.ndarray:
        """Stored bytes (ciphertext and tag) of each segment's chunks."""
        return self.table.chunk_sizes(self._bytes_per_position, TAG_SIZE)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_states(key_states, value_states)
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._batch, self.num_heads, _, self.head_dim = key_states.shape
        self._layout: ChunkLayout = self._ctx.layout(self.layer_idx, self.num_heads, self.head_dim, self.dtype)
        self._bytes_per_position = self._layout.bytes_per_position
        self._row_slots = self._ctx.rows_for_batch(self._batch)
        self.table = SegmentTable(self._batch)
        self._backend = self._ctx.backend_for(self.device)
        self.arena = ByteArena(self.device)
        self.is_initialized = True

    @staticmethod
    def _check_states(k, v) -> None:
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError("key_states and value_states must be tensors")
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"EncryptedLayer needs key and value states of one shape [batch, heads, seq, dim]; "
                             f"got {list(k.shape)} and {list(v.shape)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError("key and value states must share dtype and device")

    def _check_update(self, k, v) -> None:
        ks = k.shape if type(k) is torch.Tensor and type(v) is torch.Tensor else None
        if (ks is not None and len(ks) == 4 and v.shape == ks and ks[0] == self._batch and ks[1] == self.num_heads
                and ks[3] == self.head_dim and k.dtype == self.dtype and v.dtype == self.dtype
                and k.device == self.device and v.device == self.device):
            return      # every decode step: the checks below, at once
        self._check_states(k, v)
        b, h, _, d = k.shape
        if (b, h, d) != (self._batch, self.num_heads, self.head_dim):
            raise ValueError(f"layer {self.layer_idx} holds [batch={self._batch}, heads={self.num_heads}, "
                             f"dim={self.head_dim}]; got states {list(k.shape)}")
        if k.dtype != self.dtype or k.device != self.device:
            raise ValueError(f"layer {self.layer_idx} holds {self.dtype} on {self.device}; "
                             f"got {k.dtype} on {k.device}")

    def _alloc(self, nbytes: int) -> int:
        """Room for ``nbytes`` in the arena (live chunks may move: the table follows). Returns the offset."""
        arena = self.arena
        if arena.fits(nbytes):      # every decode step: no table read
            return arena.take(nbytes)
        offsets = self.table.offset
        off, moved = arena.alloc(nbytes, offsets, self.chunk_sizes())
        if moved is not offsets:
            self.table.set_column("offset", moved)
        return off

    def _reclaim(self) -> None:
        """Chunks were just dropped or replaced: compact once their dead bytes pass the arena's bound."""
        moved = self.arena.reclaim(self.table.offset, self.chunk_sizes())
        if moved is not None:
            self.table.set_column("offset", moved)

    def compact(self, capacity: int | None = None) -> None:
        """Reclaim dead bytes now: the live chunks move into a new arena of ``capacity`` bytes (default:
        exactly their size)."""
        if not self.is_initialized:
            return
        sizes = self.chunk_sizes()
        if capacity is None:
            capacity = self.arena.live_bytes(self.table.offset, sizes)
        self.table.set_column("offset", self.arena.compact(self.table.offset, sizes, capacity))

    def arena_stats(self) -> ArenaStats:
        """The arena's used, capacity and live bytes (all zero before the first update). Reads the chunk
        table: for measuring, not for every step."""
        if not self.is_initialized:
            return ArenaStats(0, 0, 0)
        return self.arena.stats(self.table.offset, self.chunk_sizes())

    # ---- atomic operations ---------------------------------------------------------------------
    def snapshot(self) -> tuple:
        """Everything an operation may change (the table's state, kept without a copy: the table copies on
        write; the arena's bytes are kept by reference)."""
        return (self._batch, self.table.state(), self._row_slots,     # replaced, never written in place
                None if self.arena is None else self.arena.state(), self._end, self._start,
                self._storage_state())

    def restore(self, snap: tuple) -> None:
        self._batch, table, self._row_slots, arena, self._end, self._start, storage = snap
        self.table.restore(table)
        if arena is not None:
            self.arena.restore(arena)
        self._storage_restore(storage)

    def _atomic(self) -> "_Atomic":
        """The block completes, or the layer is left exactly as it was (chunk table, bytes, positions)."""
        return _Atomic(self)

    # ---- storage hooks (the working-set variant overrides them; the sealed layer holds no plaintext) ----
    def _storage_state(self):
        """What the plaintext storage may change in an operation (kept by reference)."""
        return None

    def _storage_restore(self, state) -> None:
        pass

    def _open_released(self) -> None:
        """Before an update writes: open what a release dropped."""

    def _kept(self, key_states: torch.Tensor, value_states: torch.Tensor) -> PlaintextCopy | None:
        """Before an update seals: where the seal also writes the new positions in the clear (None: sealed,
        not kept); ``_stored`` once it has."""
        return None

    def _stored(self, n: int) -> None:
        """After the seal: the ``n`` new positions are where ``_kept`` said."""

    def _read_records(self, view_start: int, end: int) -> tuple[bool, RowRecords | None]:
        """Before an update seals: (whether the read it ends with, positions ``view_start..end`` of every
        row, is checked and recorded here, the row records that record it (None without audit)): they are
        written with the seal's own, once anything that could refuse the read has been checked. (False, None)
        when the read checks and records itself (sealed: the backend records its decrypt)."""
        return False, None

    def _visible(self, view_start: int, recorded: bool = False):
        """The layer's plaintext from the first segment reaching ``view_start``: (K, V, its first position,
        per-chunk status or None). Sealed: every such chunk decrypted into the scratch. ``recorded``: the
        read was checked and its records written with the update's seal (``_read_records``)."""
        return self._read_from(view_start)

    def _truncated(self, new_end: int) -> None:
        """Positions from ``new_end`` on were cropped."""

    def _rows_taken(self, idx: np.ndarray) -> None:
        """Row r now holds old row ``idx[r]``."""

    def _drop_plaintext(self, rows: np.ndarray) -> None:
        """Zero and drop the plaintext held for ``rows`` (sealed: none; the cache wipes its scratch)."""

    def release_rows(self, rows: np.ndarray) -> None:
        """Zero and drop the plaintext of ``rows``, leaving only ciphertext; one RELEASE record per row."""
        if not self.is_initialized or rows.size == 0:
            return
        self._drop_plaintext(rows)
        self._ctx.auditor.rows(Op.RELEASE, self.layer_idx, self._row_slots[rows], rows, now=True,
                               pos_start=self._start, pos_count=self._end - self._start)

    def open_released(self) -> None:
        """Open what a release dropped (sealed: nothing; every update opens the layer)."""

    # ---- sealing and opening ---------------------------------------------------------------------
    def _seal(self, k_src, v_src, src_row, dst_row, pos_start, pos_count, io_start, audited: bool,
              failed=None) -> SealedChunks:
        """Encrypt chunks (src_row, io_start..+pos_count of k_src/v_src) for layer rows ``dst_row``
        under fresh counters.

        ``failed``: for a re-seal of plaintext from a read whose status is still on the device, that
        status per new chunk (non-zero: a source tag failed). Such a chunk is stored as zeros, which never
        authenticate, so a failed chunk is never laundered into a valid one and no host sync is needed."""
        ctx = self._ctx
        slots = self._row_slots[dst_row]
        counter, epoch = ctx.reserve(slots)
        sizes = pos_count * self._bytes_per_position + TAG_SIZE
        total = int(sizes.sum())
        base = self._alloc(total)
        offset = base + np.cumsum(sizes) - sizes
        sealed = SealedChunks(counter, epoch, slots, offset)
        if failed is None:
            ctx.encrypt(self._backend, self._layout, slots, epoch, src_row, pos_start, pos_count, io_start,
                        counter, offset, k_src, v_src, self.arena.buffer, audited)
            return sealed
        # sealed aside first: a valid tag over a failed source never reaches the arena
        arena = self.arena.buffer
        aside = torch.empty(total, dtype=torch.uint8, device=arena.device)
        try:
            ctx.encrypt(self._backend, self._layout, slots, epoch, src_row, pos_start, pos_count, io_start,
                        counter, offset - base, k_src, v_src, aside, audited)
            bad = failed.to(device=aside.device).bool()
            edges = np.concatenate([[0], np.flatnonzero(np.diff(sizes)) + 1, [sizes.size]]).tolist()
            for a, b in zip(edges[:-1], edges[1:]):       # runs of chunks of one size
                lo, size = int(offset[a] - base), int(sizes[a])
                src = aside[lo:lo + (b - a) * size].view(b - a, size)
                dst = arena[base + lo:base + lo + (b - a) * size].view(b - a, size)
                dst.copy_(torch.where(bad[a:b, None], 0, src))
        finally:
            aside.zero_()
        return sealed

    def _seal_new(self, k_src, v_src, start: int, n: int, row_records: RowRecords | None = None,
                  copy_to: PlaintextCopy | None = None) -> SealedChunks:
        """Seal positions ``start..start+n`` (index 0.. of ``k_src``/``v_src``) of every row, one chunk per row
        (audited), at consecutive places of the arena: through the layer's prepared row seal, which the
        backend keeps from step to step while its keys, arena and audit context stay the same. ``row_records``:
        the update's own row records, written with the seal's (see ``_read_records``); ``copy_to``: where the
        seal also writes the plaintext (see ``_kept``)."""
        size = n * self._bytes_per_position + TAG_SIZE
        ctx = self._ctx
        slots = self._row_slots
        counter, epoch = ctx.reserve(slots)
        base = self._alloc(size * self._batch)
        seal = ctx.rows_seal(self.layer_idx, self._backend, self._layout, slots, epoch, self._all_rows(),
                             self.arena.buffer)
        seal(start, n, counter, base, size, k_src, v_src, row_records=row_records, copy_to=copy_to)
        return SealedChunks(counter, epoch, slots, base + self._offsets(size))    # the table copies them

    def _open(self, segs: np.ndarray, rows: np.ndarray, k_out, v_out, base: int, out_rows: np.ndarray | None = None):
        """Decrypt segments ``segs`` × rows ``rows`` into k_out/v_out (positions from ``base``);
        DecryptionError (destination wiped) if any tag fails. Returns the backend's status per chunk
        (segment-major, rows inner), or None when there was nothing to open."""
        if segs.size == 0 or rows.size == 0:
            return None
        nr = rows.size
        columns = self.table.select(segs, rows)
        dst = np.tile(rows if out_rows is None else out_rows, segs.size)
        pos_start = np.repeat(self.table.start[segs], nr)
        pos_count = np.repeat(self.table.count[segs], nr)
        return self._ctx.decrypt(self._backend, self._layout, columns, dst, pos_start, pos_count,
                                 pos_start - base, self.arena.buffer, k_out, v_out)

    def _read_from(self, view_start: int):
        """Decrypt every segment that reaches past ``view_start`` into the scratch.

        Returns the scratch views from the first decrypted position (``base``), base, and the status."""
        i0, base = self.table.reaching(view_start, self._end)
        self._check_covered(i0, view_start)
        k_out, v_out = self._ctx.scratch.views(self._batch, self._end - base, self.num_heads, self.head_dim,
                                               self.dtype, self.device)
        status = self._open_all(i0, k_out, v_out, base)
        return k_out, v_out, base, status

    def _open_all(self, i0: int, k_out, v_out, base: int):
        """``_open`` of segments ``i0..`` × every row, through the layer's prepared read, which the context
        keeps from step to step while the arena stays the same (most segments are those it opened last)."""
        t = self.table
        rows = self._all_rows()
        if i0 >= t.num_segments or rows.size == 0:
            return None
        read = self._ctx.rows_open(self.layer_idx, self._backend, self._layout, rows, self.arena.buffer)
        return self._ctx.decrypt_rows(read, *t.read_columns(i0), base, k_out, v_out)

    def _check_covered(self, i0: int, view_start: int) -> None:
        """Refuse a read whose positions ``view_start``.. ``_end`` are not all covered by chunks, in order:
        the scratch there would hold whatever an earlier read left (another layer's or tenant's K/V)."""
        gap = self.table.gap(i0, view_start, self._end)
        if gap is None:
            return
        self._ctx.auditor.rows(Op.DECRYPT, self.layer_idx, self._row_slots, np.arange(self._batch),
                               status=Status.REFUSED, now=True, pos_start=gap[0], pos_count=gap[1] - gap[0])
        raise DecryptionError(f"no chunk covers positions {gap[0]}..{gap[1] - 1} of layer {self.layer_idx}; "
                              "nothing is returned", layer_idx=self.layer_idx, positions=range(*gap))

    def _per_batch(self, name: str, make) -> np.ndarray:
        """``make(batch)`` (an int64 array, kept read-only until the batch size changes): what every step asks
        for anew."""
        memo = self.__dict__.get("_batch_memo")
        if memo is None or memo[0] != self._batch:
            memo = self._batch_memo = (self._batch, {})
        got = memo[1].get(name)
        if got is None:
            got = memo[1][name] = make(self._batch)
            got.flags.writeable = False
        return got

    def _offsets(self, size: int) -> np.ndarray:
        """0, size, 2 * size, ... (one per row)."""
        return self._per_batch(("offsets", size), lambda b: np.arange(b, dtype=np.int64) * size)

    def _all_rows(self) -> np.ndarray:
        """0 .. batch-1."""
        return self._per_batch("rows", lambda b: np.arange(b, dtype=np.int64))


class _Atomic:
    """The block of ``ChunkStore._atomic`` (a class: every update runs in one): a snapshot on entry, put back
    if the block raises."""

    __slots__ = ("_store", "_snap")

    def __init__(self, store: ChunkStore):
        self._store = store

    def __enter__(self) -> None:
        self._snap = self._store.snapshot()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._store.restore(self._snap)
        return False
