"""The static storage form of the cache's layers: transformers' static layers, every written position sealed.

``StaticEncryptedLayer`` and ``StaticSlidingEncryptedLayer`` are transformers' ``StaticLayer`` and
``StaticSlidingWindowLayer`` (the same preallocated plaintext K/V on the compute device, written in place,
the same shapes and masks, so attention sees exactly what it sees with ``StaticCache``) with one hook
after each write: the positions just written are sealed by the ``pqc_kv_cache::seal_positions`` operator
into the layer's ciphertext arena, one chunk per (row, position) in a fixed slot. Every buffer is
allocated once and marked as a static address; nothing in ``update`` reads a tensor on the host or
changes a shape, so the layers compile (``is_compileable``).

Slots: a full-attention layer has one per position (``max_cache_len``); a sliding layer one per position
of its window, used as a ring (position ``p`` in slot ``p % window``), as its plaintext keeps the last
``window`` positions. A position written again (after a crop) is sealed again under a fresh nonce.

``release_rows`` zeroes the plaintext of some rows (or all) in place and marks them in the layer's released-row
mask (int64 [batch], on the device, at a fixed address); the next update (or ``open_released``) opens every
held position of the marked rows, and only of those, from the arena with ``pqc_kv_cache::open_positions``,
every tag verified, then clears the mask.

On a device (CUDA), the operators run on it through the backend and read nothing back; the row and position
operations below (crop, beam reorder, re-seal, save, load, export) read lengths, slot tables or chunks back
to the host, which waits for the device: they run between steps, never in a captured region.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..audit.records import Op
from ..envelope import TAG_SIZE, EncryptedEntry, EntryMetadata, make_nonce
from ..ops import kv_seal  # noqa: F401  (registers the operators)
from ..errors import SaveFileError
from .clearing import zero, zero_at_collection
from .savefile import CHUNK_FIELDS as _CHUNK_FIELDS
from .static_context import StaticContext

__all__ = ["StaticSealing", "StaticEncryptedLayer", "StaticSlidingEncryptedLayer"]


def _zero_all(tensors: tuple) -> None:
    zero_at_collection(tensors)


class StaticSealing:
    """The sealing hooks over a transformers static layer (mixed in before it)."""

    is_compileable = True
    residency = "static"
    _ring = False

    def __init__(self, ctx: StaticContext, layer_idx: int, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self._ctx = ctx
        self.layer_idx = layer_idx
        self.arena: torch.Tensor | None = None     # uint8 [batch, slots, chunk bytes + tag]
        self.meta: torch.Tensor | None = None      # int64 [batch, slots, (counter, epoch, position + 1)]
        self.released_mask: torch.Tensor | None = None   # int64 [batch]: 1 for a row whose plaintext is released
        self._released = False       # whether any row is released (the host's; the mask is the device's)
        self._released_rows = np.zeros(0, dtype=bool)    # the host's copy of the mask, valid while _released

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != value_states.shape[-1] or key_states.dtype != value_states.dtype:
            raise ValueError("a static encrypted layer needs keys and values of the same head dim and dtype, got "
                             f"{list(key_states.shape)} {key_states.dtype} and {list(value_states.shape)} "
                             f"{value_states.dtype}")
        self._ctx.start(int(key_states.shape[0]), key_states.device)
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        chunk = 2 * heads * dim * key_states.element_size() + TAG_SIZE
        self.arena = torch.zeros((batch, self.max_cache_len, chunk), dtype=torch.uint8, device=self.device)
        self.meta = torch.zeros((batch, self.max_cache_len, 3), dtype=torch.int64, device=self.device)
        self.released_mask = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._released_rows = np.zeros(batch, dtype=bool)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.arena)
            torch._dynamo.mark_static_address(self.meta)
            torch._dynamo.mark_static_address(self.released_mask)
        # a layer dropped without reset() or close() leaves no plaintext behind in freed memory
        weakref.finalize(self, _zero_all, (self.keys, self.values))

    # ---- the operators --------------------------------------------------------------------------------------
    def _seal(self, io_index: torch.Tensor, positions: torch.Tensor) -> None:
        ctx = self._ctx
        torch.ops.pqc_kv_cache.seal_positions(ctx.handle, self.layer_idx, self.keys, self.values, io_index,
                                              positions, self.arena, self.meta, *ctx.seal_state(), self._ring)

    def _end(self) -> torch.Tensor:
        """One past the last position written (int64 scalar tensor)."""
        return self.cumulative_length

    def _open(self) -> None:
        ctx = self._ctx
        torch.ops.pqc_kv_cache.open_positions(ctx.handle, self.layer_idx, self.keys, self.values, self._end(),
                                              self.arena, self.meta, self.released_mask, *ctx.open_state(),
                                              self._ring)
        self.released_mask.zero_()
        self._released = False

    # ---- release and restore (outside any compiled region, except the open an update does) ---------------
    @property
    def released(self) -> bool:
        """Whether some row's plaintext is released."""
        return self._released

    def released_rows(self) -> np.ndarray:
        """The rows whose plaintext is released, ascending."""
        return np.flatnonzero(self._released_rows) if self._released else np.zeros(0, dtype=np.int64)

    def release(self) -> None:
        """Zero the plaintext of every row in place (its addresses stay); only ciphertext remains until it is
        opened."""
        if self.is_initialized:
            self.release_rows(np.arange(self._released_rows.size))

    def release_rows(self, rows: np.ndarray) -> np.ndarray:
        """Zero the plaintext of ``rows`` in place (the buffers keep their addresses) and mark them released;
        returns those of them that were not released already (ascending), the rows this call released."""
        if not self.is_initialized:
            return np.zeros(0, dtype=np.int64)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        marked = self._released_rows if self._released else np.zeros(self._released_rows.size, dtype=bool)
        new = rows[~marked[rows]]
        if new.size == 0:
            return new
        if new.size == marked.size:
            zero(self.keys)
            zero(self.values)
        else:
            for r in new.tolist():
                zero(self.keys[r])
                zero(self.values[r])
        marked = marked.copy()
        marked[new] = True
        self.released_mask.copy_(torch.from_numpy(marked.astype(np.int64)))
        self._released_rows = marked
        self._released = True
        return new

    def open_released(self) -> None:
        if self.is_initialized and self._released:
            self._open()

    def shred_rows(self, rows: np.ndarray) -> None:
        """Zero the plaintext and the ciphertext of ``rows`` (their session closed)."""
        if not self.is_initialized or rows.size == 0:
            return
        t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        for buf in (self.keys, self.values, self.arena, self.meta):
            buf.index_fill_(0, t, 0)

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            zero(self.arena)
            zero(self.meta)
            self.released_mask.zero_()
        self._released = False

    # ---- row and position operations (outside any compiled region) ------------------------------------------
    def held_range(self) -> tuple[int, int]:
        """(first, end): the positions the layer holds (a ring holds the last ``window`` of them)."""
        end = int(self.get_seq_length()) if self.is_initialized else 0
        return (max(0, end - self.max_cache_len) if self._ring else 0), end

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reorder, in place (the buffers keep their addresses): row r takes old row ``beam_idx[r]``'s
        plaintext, chunks and slot table, without re-encryption (a chunk's AAD binds layer and position, not
        its row). TenantIsolationError (and an ISOLATION_VIOLATION record), before anything moves, if a row
        would take a row of another session; one REORDER record per row that moved."""
        if not self.is_initialized:
            return
        self._ctx.drain()      # the operators' records first: the log keeps the order things happened in
        idx = self._ctx.beam_rows(beam_idx, self.layer_idx)
        moved = np.flatnonzero(idx != np.arange(idx.size))
        if moved.size == 0:
            return
        t = torch.from_numpy(idx).to(self.device)
        for buf in (self.keys, self.values, self.arena, self.meta, self.released_mask):
            taken = buf.index_select(0, t)
            buf.copy_(taken)
            zero(taken)
        self._released_rows = self._released_rows[idx]
        first, end = self.held_range()
        self._ctx.auditor.rows(Op.REORDER, self.layer_idx, self._ctx.row_slots[moved], moved, now=True,
                               pos_start=first, pos_count=end - first, nonce_counter=idx[moved].astype(np.uint64))

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' static crop (a negative count: positions from the end), and the cut positions' slots
        and plaintext zeroed (a position written again is sealed again, under a fresh counter). One CROP
        record per row."""
        if not isinstance(tokens_to_remove, int) or isinstance(tokens_to_remove, bool) or tokens_to_remove > 0:
            raise ValueError(f"a static layer is cropped by a negative count of positions to remove from the end, "
                             f"got {tokens_to_remove!r}")
        first, end = self.held_range()
        if not self.is_initialized or tokens_to_remove == 0:
            return
        if self._ring and end > self.max_cache_len:
            raise ValueError(f"layer {self.layer_idx}'s sliding window has moved on (position {end} of a window "
                             f"of {self.max_cache_len}): the positions before it are gone, it cannot be cropped")
        self._ctx.drain()
        super().crop(-min(-tokens_to_remove, end))      # never below position 0
        new_end = int(self.get_seq_length())
        cut = slice(new_end, end)        # slot = position (a full layer, or a ring that never wrapped)
        for buf in (self.keys, self.values):
            zero(buf[:, :, cut])
        zero(self.arena[:, cut])
        zero(self.meta[:, cut])
        rows = np.arange(self._ctx.row_slots.size)
        self._ctx.auditor.rows(Op.CROP, self.layer_idx, self._ctx.row_slots, rows, now=True, pos_start=new_end,
                               pos_count=end - new_end)

    def reseal_rows(self, rows: np.ndarray) -> np.ndarray:
        """Seal again every chunk ``rows`` hold, from the plaintext (not released), under fresh counters of the
        rows' nonce ranges (a key rotation); returns each row's first new counter."""
        first, end = self.held_range()
        if not self.is_initialized or rows.size == 0 or end <= first:
            return np.zeros(rows.size, dtype=np.int64)
        positions = np.arange(first, end, dtype=np.int64)
        ctx = self._ctx
        next_, stop, epoch = ctx.nonces.tensors()
        return ctx.sealer.reseal(self.layer_idx, self.keys, self.values, np.sort(rows), positions,
                                 positions - first, self.arena, self.meta, next_, stop, epoch, ctx.failures.tensor)

    def offload(self) -> None:
        """Release this layer's plaintext (zeroed in place; its ciphertext is on the host already), one
        RELEASE record per row not released before; ``prefetch`` opens it again (DECRYPT records, failures
        raised at check())."""
        if self.is_initialized:
            self._ctx.drain()
            rows = self.release_rows(np.arange(self._ctx.row_slots.size))
            if rows.size:
                first, end = self.held_range()
                self._ctx.auditor.rows(Op.RELEASE, self.layer_idx, self._ctx.row_slots[rows], rows, now=True,
                                       pos_start=first, pos_count=end - first)

    def prefetch(self) -> None:
        self.open_released()

    # ---- save files ----------------------------------------------------------------------------------------
    def saved(self) -> tuple[dict, np.ndarray]:
        """This layer's description for a save file and its chunk bytes: every held position of every row
        must have its chunk (SaveFileError naming the first that has none: a seal failed); a chunk that rows
        share after a beam reorder is listed once, ``refs`` (per row and held position) pointing to it."""
        kind = "sliding" if self._ring else "full"
        if not self.is_initialized:
            return {"initialized": False, "kind": kind, "chunks": {f: [] for f in _CHUNK_FIELDS}}, \
                np.zeros(0, dtype=np.uint8)
        first, end = self.held_range()
        pos = np.arange(first, end, dtype=np.int64)
        slot_of = pos % self.max_cache_len
        meta = self.meta.cpu().numpy()[:, slot_of]           # [batch, held, 3] (a device's: read back)
        rows = self._ctx.row_slots
        missing = np.argwhere(meta[:, :, 2] != pos + 1)
        if missing.size:
            r, j = (int(x) for x in missing[0])
            raise SaveFileError(f"layer {self.layer_idx}, row {r} holds no sealed chunk of position {int(pos[j])} "
                                "(a seal failed): nothing saved")
        batch, held = meta.shape[:2]
        ident = np.stack([np.repeat(rows, held), meta[:, :, 1].reshape(-1), meta[:, :, 0].reshape(-1)], axis=1)
        _, first_at, inverse = np.unique(ident, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first_at, kind="stable")          # chunks in the order rows first hold them
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        src = first_at[order]
        at = (torch.from_numpy(src // max(held, 1)).to(self.device),
              torch.from_numpy(slot_of[src % max(held, 1)]).to(self.device))
        data = self.arena[at].cpu().numpy()
        desc = {"initialized": True, "kind": kind, "dtype": str(self.keys.dtype).removeprefix("torch."),
                "heads": int(self.keys.shape[1]), "head_dim": int(self.keys.shape[3]), "batch": int(batch),
                "slots": int(self.max_cache_len), "start": first, "end": end,
                "length_tensor": int(self.cumulative_length), "row_slots": rows.tolist(),
                "refs": rank[inverse.reshape(-1)].tolist(),
                "chunks": {"counter": ident[src, 2].tolist(), "epoch": ident[src, 1].tolist(),
                           "slot": ident[src, 0].tolist(), "nbytes": [int(data.shape[1])] * int(src.size)}}
        return desc, data.reshape(-1)

    def load_saved(self, desc: dict, data: np.ndarray, slot_map: np.ndarray, rows: np.ndarray) -> None:
        """Fill this (new) layer from a verified save file's description and chunk bytes, released: the
        caller opens it. ``slot_map``: the file's session slot -> the cache's; ``rows``: each row's session
        slot in the cache. SaveFileError for a description this layer cannot hold or that does not add up;
        ValueError when it describes another kind of layer."""
        kind = "sliding" if self._ring else "full"
        if not isinstance(desc, dict):
            raise SaveFileError(f"save file: layer {self.layer_idx}'s description is malformed")
        if desc.get("kind") != kind:
            raise ValueError(f"layer {self.layer_idx}: the save file holds a {desc.get('kind')!r} layer, this "
                             f"config a {kind!r} one")
        if not desc.get("initialized"):
            return
        bad = SaveFileError(f"save file: layer {self.layer_idx}'s description is malformed")
        try:
            heads, dim, batch, slots, start, end, length = (
                desc[k] for k in ("heads", "head_dim", "batch", "slots", "start", "end", "length_tensor"))
            dtype = getattr(torch, desc["dtype"]) if isinstance(desc["dtype"], str) else None
            refs = np.array(desc["refs"], dtype=np.int64)
            chunks = desc["chunks"]
            c_slot = slot_map[np.array(chunks["slot"], dtype=np.int64)]
            c_counter, c_epoch = (np.array(chunks[k], dtype=np.int64) for k in ("counter", "epoch"))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError):
            raise bad from None
        ints = (heads, dim, batch, slots, start, end, length)
        if (not all(type(x) is int for x in ints) or not isinstance(dtype, torch.dtype)
                or not dtype.is_floating_point or min(heads, dim, batch) < 1 or batch != rows.size):
            raise bad
        if slots != self.max_cache_len:
            raise ValueError(f"layer {self.layer_idx}: the save file's layer holds {slots} positions, this "
                             f"cache's {self.max_cache_len}")
        want_start = max(0, end - slots) if self._ring else 0
        held = end - start
        stride = 2 * heads * dim * dtype.itemsize + TAG_SIZE
        if (start != want_start or end < 0 or (not self._ring and end > slots) or refs.shape != (batch * held,)
                or (refs.size and (refs.min() < 0 or refs.max() >= c_slot.size))
                or data.size != c_slot.size * stride or length < 0 or (not self._ring and length != end)):
            raise bad
        row_of = np.repeat(np.arange(batch), held)
        if refs.size and not np.array_equal(c_slot[refs], rows[row_of]):
            raise SaveFileError(f"save file: layer {self.layer_idx} gives a row a chunk of another session")
        dev = self._ctx.device
        self.lazy_initialization(torch.zeros((batch, heads, 0, dim), dtype=dtype, device=dev),
                                 torch.zeros((batch, heads, 0, dim), dtype=dtype, device=dev))
        pos = np.tile(np.arange(start, end, dtype=np.int64), batch)
        at = (torch.from_numpy(row_of).to(dev), torch.from_numpy(pos % slots).to(dev))
        self.arena[at] = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, stride)[refs])).to(dev)
        self.meta[at] = torch.from_numpy(np.stack([c_counter[refs], c_epoch[refs], pos + 1], axis=1)).to(dev)
        self.cumulative_length.fill_(length)
        if self._ring:
            self.cumulative_length_int = end
        self.released_mask.fill_(1)
        self._released_rows = np.ones(batch, dtype=bool)
        self._released = True

    def copy_from(self, other: "StaticSealing") -> None:
        """Take ``other``'s state (a deepcopy): the same plaintext, chunks, slot table and length, in this
        layer's own buffers (allocated here); no re-encryption."""
        if not other.is_initialized:
            return
        empty = other.keys[:, :, :0]
        self.lazy_initialization(empty, other.values[:, :, :0])
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values), (self.arena, other.arena),
                             (self.meta, other.meta), (self.released_mask, other.released_mask)):
            mine.copy_(theirs)
        self._released_rows = np.zeros(self._released_rows.size, dtype=bool)
        self._released_rows[other.released_rows()] = True
        self.cumulative_length.copy_(other.cumulative_length)
        if hasattr(other, "cumulative_length_int"):
            self.cumulative_length_int = other.cumulative_length_int
        self._released = other.released

    # ---- inspection -------------------------------------------------------------------------------------
    def sealed_positions(self, row: int) -> np.ndarray:
        """The positions whose chunks row ``row``'s slots hold, ascending."""
        if not self.is_initialized:
            return np.zeros(0, dtype=np.int64)
        held = self.meta[row, :, 2].cpu().numpy()
        return np.sort(held[held > 0] - 1)

    def export_entries(self, row: int, session) -> list[EncryptedEntry]:
        """The chunks row ``row``'s slots hold as EncryptedEntry objects (envelope v1), in position order;
        ``session`` is the row's session (it names tenant and session)."""
        out = []
        if not self.is_initialized:
            return out
        meta = self.meta[row].cpu().numpy()
        arena = self.arena[row].cpu().numpy()
        nb = arena.shape[1] - TAG_SIZE
        heads, dim = int(self.keys.shape[1]), int(self.keys.shape[3])
        for slot in np.argsort(np.where(meta[:, 2] > 0, meta[:, 2], np.iinfo(np.int64).max), kind="stable"):
            counter, epoch, pos1 = (int(x) for x in meta[slot])
            if pos1 == 0:
                break
            md = EntryMetadata(session.tenant_id, session.session_id, self.layer_idx, pos1 - 1, position_count=1)
            out.append(EncryptedEntry(md, make_nonce(epoch, counter), arena[slot].tobytes(), nb // 2, counter,
                                      epoch, str(self.keys.dtype).removeprefix("torch."), heads, dim))
        return out


class StaticEncryptedLayer(StaticSealing, StaticLayer):
    """A full-attention layer: ``max_cache_len`` slots, position ``p`` at index ``p`` of the plaintext."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._released:
            self._open()
        # the positions StaticLayer.update writes (it advances cumulative_length in place)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        out = super().update(key_states, value_states, *args, **kwargs)
        self._seal(positions, positions)
        return out


class StaticSlidingEncryptedLayer(StaticSealing, StaticSlidingWindowLayer):
    """A sliding-window layer: ``window`` slots used as a ring; the plaintext holds the last ``window``
    positions at indices ``0..window`` once full (transformers rolls it)."""

    _ring = True

    def _end(self) -> torch.Tensor:
        return torch.full((), self.cumulative_length_int, dtype=torch.int64, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._released:
            self._open()
        n = key_states.shape[-2]
        done, window = self.cumulative_length_int, self.max_cache_len
        if done + n <= window:
            # written in place at index = position (the branch where StaticSlidingWindowLayer uses the tensor)
            positions = torch.arange(n, device=self.device) + self.cumulative_length
            io_index = positions
        else:
            # the plaintext keeps positions kept.. at indices 0..; only the new ones among them are sealed
            kept = done + n - window
            positions = torch.arange(max(done, kept), done + n, device=self.device)
            io_index = positions - kept
        out = super().update(key_states, value_states, *args, **kwargs)
        self._seal(io_index, positions)
        return out
