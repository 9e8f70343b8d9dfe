"""EncryptedLayer: one full-attention layer's cache as ciphertext chunks, with transformers' layer API.

What a layer stores: ciphertext chunks (envelope v1), kept, sealed and opened
by its base ``ChunkStore`` (chunkstore.py: a byte arena and a chunk table of
segments, one chunk per batch row each). This class is the layer API over it:
update, crop, reorder and row selection, save-file parts, export, copies.

What a layer never stores: plaintext. ``layer.keys`` and ``layer.values`` stay
None. ``update`` encrypts the new positions, then decrypts every live chunk of
the layer into the cache's plaintext scratch and returns views of it.
Everything else a layer uses of its cache (session slots, keys and the
backend, the scratch, the audit record sites) comes through its
``LayerContext``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

from .._checks import check_int
from ..audit.records import Op
from ..envelope import TAG_SIZE, EncryptedEntry, EntryMetadata, make_nonce
from ..errors import KVCacheError, SessionExpiredError
from .arena import ByteArena
from .chunkstore import ChunkStore
from .clearing import zero
from .context import LayerContext, deferred_status
from .segments import SegmentTable

__all__ = ["EncryptedLayer", "crop_count"]


def crop_count(tokens_to_remove) -> int:
    """``crop``'s argument as an int: an int, or a one-element integer tensor or array (assisted and
    prompt-lookup decoding pass a 0-d tensor on transformers up to 5.18)."""
    t = tokens_to_remove
    if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 0 and t.dtype not in (torch.bool, np.bool_):
        if (t.is_floating_point() or t.is_complex()) if isinstance(t, torch.Tensor) else t.dtype.kind not in "iu":
            raise TypeError(f"tokens_to_remove must be an integer, got a tensor of {t.dtype}")
        return int(t.item())
    if isinstance(t, (torch.Tensor, np.ndarray)):     # a one-element tensor of shape [1] has __index__ too
        raise TypeError(f"tokens_to_remove must be an integer, got {type(t).__name__} of shape {list(t.shape)}")
    return check_int("tokens_to_remove", t)


class EncryptedLayer(ChunkStore, CacheLayerMixin):
    """One full-attention layer's cache as ciphertext chunks; plaintext only in the cache's scratch.

    The same visible states and mask sizes as transformers' ``DynamicLayer``. ``SlidingEncryptedLayer``
    (sliding.py) overrides what differs for sliding-window attention.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    sliding_window: int | None = None

    def __init__(self, context: LayerContext, layer_idx: int):
        super().__init__()
        self._ctx = context
        self.layer_idx = layer_idx
        self.record_past = False
        self._clear()

    # ---- the Cache API -------------------------------------------------------------------------
    def _view_start(self) -> int:
        """The first position ``update`` returns."""
        return self._start

    def _after_update(self) -> None:
        """What follows a completed update (sliding layers move their window)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encrypt the new positions, decrypt the layer into the scratch, return the visible K and V views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_update(key_states, value_states)
        ctx = self._ctx
        ctx.before_update()
        n = key_states.shape[-2]
        end = self._end
        view_start = self._view_start()
        refused = (Op.ENCRYPT, end, n) if n else (Op.DECRYPT, view_start, end - view_start)
        try:
            with self._atomic():    # a failed update leaves the layer as it was
                self._open_released()
                recorded = False
                if n:
                    # the read's records go with the seal's (one reservation and copy): what could refuse the
                    # read is checked first, and the room for the plaintext is made before the seal (which
                    # writes it there), so nothing after the seal can fail and leave a record of a read that
                    # did not happen
                    recorded, reads = self._read_records(view_start, end + n)
                    copy_to = self._kept(key_states, value_states)
                    sealed = self._seal_new(key_states, value_states, end, n, reads, copy_to)
                    self._stored(n)
                    self.table.append(end, n, sealed)
                    self._end += n
                    refused = (Op.DECRYPT, view_start, self._end - view_start)
                k, v, base, status = self._visible(view_start, recorded)
                if n and ctx.merge.enabled:
                    try:
                        self._merge_tail(k, v, base, status)
                    except KVCacheError:
                        # merging is an optimisation: a merge that cannot seal (epoch cap reached, session
                        # expiring between the write and the merge) leaves the segments as they are
                        pass
        except SessionExpiredError:
            ctx.refuse(self.layer_idx, self._row_slots, *refused)
            raise
        self._after_update()
        skip = view_start - base
        if skip == 0:       # the views already start at the first visible position
            return k, v
        return k[:, :, skip:, :], v[:, :, skip:, :]

    @property
    def _merge_cap(self) -> int:
        """Largest segment a merge may build."""
        return self._ctx.merge.max_positions

    def _merge_tail(self, k_all: torch.Tensor, v_all: torch.Tensor, base: int, status=None) -> None:
        """Merge trailing segments, binary-counter style, in batches.

        Walking back from the last segment, a segment joins the run while it is no larger than the
        run's total so far (so merged runs roughly double). The run is merged only once it holds at
        least ``merge_min_segments`` segments: it becomes one segment, re-sealed as one chunk per
        row under fresh counters. Chunks per row stay O(log positions + merge_min_segments) instead of
        one per decoded token; each position is re-sealed O(log positions) times. The plaintext comes
        from the scratch just read by this update (``status``: that read's status per chunk)."""
        j = self.table.merge_start(self._merge_cap, base)
        if self.num_segments - j >= max(2, self._ctx.merge.min_segments):
            failed = deferred_status(status)
            if failed is not None:  # per row: did any merged source chunk fail? (the read's last segments)
                failed = failed.view(-1, self._batch)[-(self.num_segments - j):].amax(0)
            with self._atomic():
                self._merge_range(k_all, v_all, base, j, failed)

    def _merge_range(self, k_all, v_all, base: int, j: int, failed=None) -> None:
        """Replace segments j.. by one segment re-sealed from the scratch (which starts at ``base``)."""
        start = int(self.table.start[j])
        total = self._end - start
        rows = np.arange(self._batch, dtype=np.int64)
        sealed = self._seal(k_all, v_all, rows, rows, np.full(self._batch, start, dtype=np.int64),
                            np.full(self._batch, total, dtype=np.int64),
                            np.full(self._batch, start - base, dtype=np.int64), audited=False, failed=failed)
        self.table.keep(np.arange(j + 1))
        self.table.set_segment(j, total, sealed)
        self._reclaim()
        self._ctx.auditor.rows(Op.RESEAL, self.layer_idx, self._row_slots, rows, pos_start=start,
                               pos_count=total, nonce_counter=sealed.counter.astype(np.uint64),
                               epoch=sealed.epoch.astype(np.uint32), nbytes=total * self._bytes_per_position)

    def _set_start(self, start: int) -> None:
        """Advance the first visible position and drop segments wholly before it."""
        self._start = max(self._start, start, 0)
        before = self.num_segments
        self.table.keep(self.table.ends() > self._start)
        if self.num_segments < before:
            self._reclaim()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self._end - self._start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def activate_past_recording(self, **kwargs) -> None:
        # newer transformers pass keywords meant for recurrent layers (recurrent_states_to_keep); none apply here
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (negative counts, as DynamicLayer); a chunk cut in
        two is re-sealed under a fresh counter."""
        t = crop_count(tokens_to_remove)
        if t > 0:
            raise ValueError(f"crop with a positive value ({t}) is not supported; pass a negative number of "
                             "tokens to remove")
        if t == 0 or not self.is_initialized:
            return
        self._truncate(max(self._start, self._end + t))

    def _truncate(self, new_end: int) -> None:
        new_end = max(new_end, 0)
        removed = self._end - new_end
        if removed <= 0:
            return
        try:
            with self._atomic():    # a crop that cannot re-seal drops nothing
                self.table.keep(self.table.start < new_end)
                new_counter = np.zeros(self._batch, dtype=np.int64)
                if self.num_segments and int(self.table.ends()[-1]) > new_end:
                    new_counter = self._reseal_last(new_end - int(self.table.start[-1]))
                self._end = new_end
                self._start = min(self._start, new_end)
                self._truncated(new_end)
                self._reclaim()
                self._ctx.auditor.rows(Op.CROP, self.layer_idx, self._row_slots, np.arange(self._batch),
                                       pos_start=new_end, pos_count=removed,
                                       nonce_counter=new_counter.astype(np.uint64))
        except SessionExpiredError:
            self._ctx.refuse(self.layer_idx, self._row_slots, Op.CROP, new_end, removed)
            raise

    def _plaintext_buffer(self, rows: int, seq: int):
        """A private plaintext buffer for a re-seal (zeroed by the caller when done), with its K and V views."""
        buf = torch.empty((rows, seq, 2, self.num_heads, self.head_dim), dtype=self.dtype, device=self.device)
        return buf, buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)

    def _reseal_last(self, keep: int) -> np.ndarray:
        """Shorten the last segment to its first ``keep`` positions, re-sealed under fresh counters."""
        i = self.num_segments - 1
        start, count = int(self.table.start[i]), int(self.table.count[i])
        rows = np.arange(self._batch, dtype=np.int64)
        buf, k_tmp, v_tmp = self._plaintext_buffer(self._batch, count)
        try:
            status = self._open(np.array([i]), rows, k_tmp, v_tmp, start)
            sealed = self._seal(k_tmp, v_tmp, rows, rows, np.full(self._batch, start, dtype=np.int64),
                                np.full(self._batch, keep, dtype=np.int64),
                                np.zeros(self._batch, dtype=np.int64), audited=False,
                                failed=deferred_status(status))
        finally:
            zero(buf)
        self.table.set_segment(i, keep, sealed)
        return sealed.counter

    def reseal_rows(self, rows: np.ndarray) -> np.ndarray:
        """Re-seal every live chunk of ``rows`` under fresh counters (current epoch); first new counter per row."""
        if not self.num_segments or rows.size == 0:
            return np.zeros(rows.size, dtype=np.int64)
        t = self.table
        base = int(t.start[0])
        ns, nr = self.num_segments, rows.size
        # a buffer of the whole batch, so each row opens into its own index and its DECRYPT record names it
        buf, k_tmp, v_tmp = self._plaintext_buffer(self._batch, self._end - base)
        try:
            status = self._open(np.arange(ns), rows, k_tmp, v_tmp, base)
            pos_start = np.repeat(t.start, nr)
            sealed = self._seal(k_tmp, v_tmp, np.tile(rows, ns), np.tile(rows, ns), pos_start,
                                np.repeat(t.count, nr), pos_start - base, audited=False,
                                failed=deferred_status(status))
        finally:
            zero(buf)
        t.set_rows(rows, sealed)
        self._reclaim()
        return sealed.counter.reshape(ns, nr)[0]

    def _record_reorder(self, src: np.ndarray, moved: np.ndarray, row_slots: np.ndarray) -> None:
        """The REORDER record of rows ``moved`` (row r now holds old row ``src[r]``)."""
        self._ctx.auditor.rows(Op.REORDER, self.layer_idx, row_slots[moved], moved, pos_start=self._start,
                               pos_count=self._end - self._start, nonce_counter=src[moved].astype(np.uint64))

    def row_index(self, idx, what: str) -> np.ndarray:
        """``idx`` (integer indices, negative allowed, or a boolean mask over the batch) as row indices."""
        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()
        idx = np.asarray(idx)
        if idx.dtype == np.bool_:
            if idx.shape != (self._batch,):
                raise ValueError(f"{what}: a boolean mask must have {self._batch} entries")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"{what} must be a 1-D integer index")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -self._batch or idx.max() >= self._batch):
            raise ValueError(f"{what}: row index out of range for batch {self._batch}")
        return idx % max(self._batch, 1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reorder: row r takes the chunks of row beam_idx[r], without re-encryption.

        TenantIsolationError (and an ISOLATION_VIOLATION record) if a row would take a row of another session."""
        if not self.is_initialized:
            return
        idx = self.row_index(beam_idx, "beam_idx")
        if idx.size != self._batch:
            raise ValueError(f"beam_idx has {idx.size} entries, the batch {self._batch}")
        self._ctx.check_same_session(self.layer_idx, self._row_slots[idx], self._row_slots, idx)
        moved = np.flatnonzero(idx != np.arange(self._batch))
        if moved.size == 0:
            return
        columns = self.table.take_rows(idx)
        self._record_reorder(idx, moved, self._row_slots)
        self.table.columns = columns
        self._rows_taken(idx)
        self._reclaim()     # rows that took another row's chunks left theirs dead

    def _select_rows(self, idx: np.ndarray) -> None:
        """Row r becomes old row idx[r]: the new state is built, recorded, then put in place in one step."""
        columns = self.table.take_rows(idx)
        row_slots = self._row_slots[idx]
        self._record_reorder(idx, np.flatnonzero(idx != np.arange(idx.size)), row_slots)
        self.table.columns, self._row_slots, self._batch = columns, row_slots, int(idx.size)
        self._rows_taken(idx)
        self._reclaim()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Row i becomes rows i*repeats .. i*repeats+repeats-1, each keeping row i's session and chunks."""
        if not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if self.is_initialized:
            self._select_rows(np.repeat(np.arange(self._batch), int(repeats)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(self.row_index(indices, "indices"))

    def reset(self) -> None:
        """Forget everything (the arena is zeroed first); the layer initializes again on its next update."""
        if self.arena is not None:
            self.arena.zero()
        self._clear()

    def offload(self) -> None:
        if self.is_initialized and self.arena.device.type != "cpu":
            self.arena.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and self.arena.device != self.device:
            self.arena.to(self.device)

    # ---- save files ----------------------------------------------------------------------------
    def saved(self) -> tuple[dict, np.ndarray]:
        """This layer's part of a save file: its description (JSON-able: layout, positions, row slots, the
        segments, each (segment, row)'s index into ``chunks``, and ``chunks``: each distinct live chunk's
        counter, epoch, session slot and size) and the bytes of those chunks, in that order, in host memory.
        Only ciphertext: the plaintext a working-set layer holds is not part of it."""
        empty = {f: [] for f in ("counter", "epoch", "slot", "nbytes")}
        if not self.is_initialized:
            return {"initialized": False, "kind": self._kind(), "chunks": empty}, np.zeros(0, dtype=np.uint8)
        t = self.table
        sizes = np.repeat(self.chunk_sizes(), self._batch)
        uniq, first, refs = np.unique(t.offset.reshape(-1), return_index=True, return_inverse=True)
        nbytes = sizes[first]
        host = self.arena.view().cpu().numpy()
        data = (np.concatenate([host[o:o + n] for o, n in zip(uniq.tolist(), nbytes.tolist())]) if uniq.size
                else np.zeros(0, dtype=np.uint8))
        desc = {
            "initialized": True, "kind": self._kind(), "dtype": str(self.dtype).removeprefix("torch."),
            "heads": int(self.num_heads), "head_dim": int(self.head_dim), "batch": int(self._batch),
            "start": int(self._start), "end": int(self._end), "row_slots": self._row_slots.tolist(),
            "seg_start": t.start.tolist(), "seg_count": t.count.tolist(), "refs": refs.reshape(-1).tolist(),
            "chunks": {"counter": t.counter.reshape(-1)[first].tolist(), "epoch": t.epoch.reshape(-1)[first].tolist(),
                       "slot": t.session_slot.reshape(-1)[first].tolist(), "nbytes": nbytes.tolist()},
        }
        return desc, data

    def load_saved(self, desc: dict, data: np.ndarray, slot_map: np.ndarray, device: torch.device) -> None:
        """Take the state a save file describes (``desc`` from ``saved``, verified by its manifest tags;
        ``data``: its chunk bytes; ``slot_map``: the file's session slot -> this cache's). The chunks are
        not opened here: ``verify_chunks`` does that. ValueError when the layer does not match the file's
        (another config); SaveFileError when the description is inconsistent."""
        from ..errors import SaveFileError

        def bad(what: str):
            return SaveFileError(f"save file: layer {self.layer_idx} {what}")

        if desc.get("kind") != self._kind():
            raise ValueError(f"layer {self.layer_idx} is {self._kind()}, the save file's is {desc.get('kind')!r}: "
                             "load it with the config of the model that saved it")
        if not desc.get("initialized"):
            return
        dtype = getattr(torch, str(desc.get("dtype")), None)
        ints = [desc.get(k) for k in ("heads", "head_dim", "batch", "start", "end")]
        if not isinstance(dtype, torch.dtype) or not all(type(x) is int and x >= 0 for x in ints):
            raise bad("has an unknown dtype or a malformed shape")
        heads, head_dim, batch, start, end = ints
        try:
            row_slots = np.array(desc["row_slots"], dtype=np.int64)
            seg_start = np.array(desc["seg_start"], dtype=np.int64)
            seg_count = np.array(desc["seg_count"], dtype=np.int64)
            refs = np.array(desc["refs"], dtype=np.int64)
            chunks = {k: np.array(v, dtype=np.int64) for k, v in desc["chunks"].items()}
        except (KeyError, TypeError, ValueError, OverflowError):
            raise bad("description is malformed") from None
        ns, n_chunks = seg_start.size, chunks["counter"].size
        if (heads < 1 or head_dim < 1 or batch < 1 or not start <= end or row_slots.shape != (batch,)
                or seg_count.shape != (ns,) or refs.shape != (ns * batch,)
                or (refs.size and (refs.min() < 0 or refs.max() >= n_chunks))
                or row_slots.min() < 0 or row_slots.max() >= slot_map.size):
            raise bad("description is inconsistent (rows, segments or chunk references)")
        if ns and (seg_count.min() < 1 or seg_start.min() < 0 or (seg_start + seg_count).max() > end):
            raise bad("has a segment outside its positions")
        layout = self._ctx.layout(self.layer_idx, heads, head_dim, dtype)
        bpp = layout.bytes_per_position
        ref_grid = refs.reshape(ns, batch)
        # a row refers only to chunks of its own session, of its segment's size
        if ((chunks["slot"][ref_grid] != row_slots[None, :]).any()
                or (chunks["nbytes"][ref_grid] != (seg_count * bpp + TAG_SIZE)[:, None]).any()):
            raise bad("refers a row to a chunk of another session or of another size; refused")
        offsets = np.cumsum(chunks["nbytes"]) - chunks["nbytes"]
        table = SegmentTable.from_arrays(seg_start, seg_count, {
            "counter": chunks["counter"][ref_grid], "epoch": chunks["epoch"][ref_grid],
            "session_slot": slot_map[chunks["slot"]][ref_grid], "offset": offsets[ref_grid]})
        self._ctx.rows_for_batch(batch)     # the cache's row map (set from the file) must hold this batch
        self.device, self.dtype = torch.device(device), dtype
        self._batch, self.num_heads, self.head_dim = batch, heads, head_dim
        self._layout, self._bytes_per_position = layout, bpp
        self._row_slots = slot_map[row_slots]
        self.table = table
        self._backend = self._ctx.backend_for(self.device)
        self.arena = ByteArena.holding(torch.from_numpy(data), self.device)
        self._end, self._start = end, start
        self.is_initialized = True
        self._after_load()

    def _after_load(self) -> None:
        """A save file's state was just taken (the working-set variant marks every row released)."""

    def verify_chunks(self) -> None:
        """Open every live chunk once, every tag verified (DECRYPT records), into the cache's scratch, as an
        update would (the caller wipes the scratch; the working-set variant keeps them as its working set).
        DecryptionError if a tag fails."""
        if self.is_initialized and self.num_segments:
            self._read_from(int(self.table.start[0]))

    # ---- sessions ------------------------------------------------------------------------------
    def shred_rows(self, rows: np.ndarray) -> None:
        """Zero the ciphertext of ``rows`` (their keys are already erased)."""
        if not self.is_initialized or rows.size == 0 or not self.num_segments:
            return
        self.arena.shred(self.table.offset[:, rows], self.chunk_sizes())

    def export_entries(self, row: int) -> list[EncryptedEntry]:
        if not self.is_initialized:
            return []
        row = check_int("row", row, 0, self._batch - 1)
        session = self._ctx.sessions[int(self._row_slots[row])]
        arena = self.arena.buffer.cpu()
        t = self.table
        out = []
        for i in range(self.num_segments):
            start, count = int(t.start[i]), int(t.count[i])
            counter, epoch, off = int(t.counter[i, row]), int(t.epoch[i, row]), int(t.offset[i, row])
            nb = count * self._bytes_per_position
            meta = EntryMetadata(session.tenant_id, session.session_id, self.layer_idx, start,
                                 position_count=count)
            out.append(EncryptedEntry(meta, make_nonce(epoch, counter), arena[off:off + nb + TAG_SIZE].numpy().tobytes(),
                                      nb // 2, counter, epoch, str(self.dtype).removeprefix("torch."),
                                      self.num_heads, self.head_dim))
        return out

    def copy_for(self, context: LayerContext) -> "EncryptedLayer":
        """This layer's state as a layer of the cache whose context is ``context``: its own arena (the
        ciphertext bytes copied as they are) and chunk table; the backend and layout are shared."""
        new = type(self).__new__(type(self))
        for name, value in self.__dict__.items():
            if name == "_ctx":
                new.__dict__[name] = context
            elif name == "arena":
                new.__dict__[name] = None if value is None else value.clone()
            elif name in ("_backend", "_layout", "device", "dtype"):
                new.__dict__[name] = value
            else:
                new.__dict__[name] = copy.deepcopy(value)
        return new

    def __deepcopy__(self, memo: dict) -> "EncryptedLayer":
        raise TypeError("an EncryptedLayer is copied with its cache: copy.deepcopy(cache), not one of its layers")

    def _kind(self) -> str:
        return "full"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layer={self.layer_idx}, {self._kind()}, rows={self._batch}, "
                f"positions={self.get_seq_length()}, segments={self.num_segments})")

