"""EncryptedLayer / EncryptedCache: the transformers ``Cache`` API over AES-256-GCM chunks.

What a layer stores: ciphertext chunks (envelope v1) in one growing uint8
arena, and per chunk its metadata. Chunks form *segments*: a segment is a
position range written by one ``update`` (a prefill, one decoded token, a
block of draft tokens) or a merge of such ranges, and holds one chunk per
batch row. All rows share the
segment boundaries, so the metadata is a few ``[segments, rows]`` int64 numpy
arrays (nonce counter, key epoch, session slot, arena offset) plus the
segments' ``(pos_start, pos_count)``.

What a layer never stores: plaintext. ``layer.keys`` and ``layer.values``
stay None. ``update`` encrypts the new positions, then decrypts every live
chunk of the layer into a plaintext *scratch* buffer owned by the cache (one
buffer shared by all layers, laid out ``[batch, 2, heads, seq, dim]``) and
returns ``[batch, heads, seq, dim]`` views of it (K = ``scratch[:, 0]``,
V = ``scratch[:, 1]``). The views are valid until the next
layer's update; the scratch is the only place plaintext lives, and it belongs to
the cache, not to a layer. ``cache.wipe_scratch()`` zeroes it.

Crop and any rewrite re-seal under fresh nonce counters (``session.reserve``);
a (key, nonce) pair is never used twice. Every operation of several steps
(update with its merge, crop, rotation, reorder, row selection) completes or
leaves the layers exactly as they were, and a read refuses positions that no
chunk covers. A re-seal from a read whose tag results are still on the device
stores a chunk built from a failed one as zeros (it never authenticates), so
tampering is never laundered into a valid chunk. Expired and closed sessions
are refused (and the refusal recorded) even where a key slot is cached. Beam reordering permutes the row
columns of the metadata without re-encryption (the AAD binds layer and
position, not the physical row) and refuses to move a row into a row of
another session. Rotation re-seals a session's live chunks under its new epoch
and retires the old keys. Closing a session (``session.close()``) shreds its
rows: the keys are gone, the live chunks' ciphertext bytes are zeroed and the
scratch is wiped (dead copies that merges, crops and rotations left in the
arena until its next compaction are ciphertext under keys that are now erased).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .audit.records import NONE16, Op, Status
from .backends import select_backend
from .backends.base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot
from .envelope import TAG_SIZE, EncryptedEntry, EntryMetadata, make_nonce, session_tag, tenant_tag
from .errors import DecryptionError, KVCacheError, SessionExpiredError, TenantIsolationError
from .rotation import KeyRotationPolicy, RotationTrigger
from .session import TenantSession

if TYPE_CHECKING:   # for annotations only: the cache does not import the audit pipeline's log
    from .audit.log import KVAuditLog

__all__ = ["EncryptedLayer", "EncryptedCache"]

_FULL = ("full_attention",)
_SLIDING = ("sliding_attention", "chunked_attention")
_META = ("counter", "epoch", "sess", "offset")


def _attention_windows(config) -> list[int | None]:
    """The sliding window of each cached layer of ``config`` (None: full attention).

    transformers' ``get_layer_types_and_kwargs`` gives the layer types and their init kwargs: one dict
    shared by all layers up to 5.18, one dict per layer from 5.19. Any layer type other than full,
    sliding-window or chunked attention (linear attention, compressed, shared or dummy layers) is refused
    here, before any layer exists."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layer_types = list(layer_types)
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [layer_kwargs] * len(layer_types)
    if len(layer_kwargs) != len(layer_types) or not layer_types:
        raise ValueError(f"this config describes {len(layer_types)} cached layer(s) with {len(layer_kwargs)} "
                         "set(s) of layer arguments; EncryptedCache cannot lay out its layers")
    windows: list[int | None] = []
    for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
        if kind in _FULL:
            windows.append(None)
        elif kind in _SLIDING:
            w = kw.get("sliding_window")
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"layer {i} is {kind!r} with sliding window {w!r}; a positive int is needed")
            windows.append(w)
        else:
            raise ValueError(f"layer {i} is {kind!r}: EncryptedCache supports full, sliding-window and chunked "
                             "attention layers only")
    return windows


@functools.cache
def _recording_returns_window() -> bool:
    """Whether this transformers' DynamicSlidingWindowLayer, while recording the past, returns only the
    states its mask sizes announce (5.18 on) or every state kept since the last crop (5.16, 5.17).
    EncryptedLayer returns what the installed release's layer returns; the answer comes from running it."""
    from transformers.cache_utils import DynamicSlidingWindowLayer
    layer = DynamicSlidingWindowLayer(sliding_window=2)
    layer.activate_past_recording()
    x = torch.zeros(1, 1, 3, 1)
    layer.update(x, x)
    k, _ = layer.update(x[:, :, :1], x[:, :, :1])
    return k.shape[-2] < 4


def _crop_count(tokens_to_remove) -> int:
    """``crop``'s argument as an int: an int, or a one-element integer tensor or array (assisted and
    prompt-lookup decoding pass a 0-d tensor on transformers up to 5.18)."""
    t = tokens_to_remove
    if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 0 and t.dtype not in (torch.bool, np.bool_):
        if (t.is_floating_point() or t.is_complex()) if isinstance(t, torch.Tensor) else t.dtype.kind not in "iu":
            raise TypeError(f"tokens_to_remove must be an integer, got a tensor of {t.dtype}")
        return int(t.item())
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"tokens_to_remove must be an int, got {type(t).__name__}"
                        + (f" of shape {list(t.shape)}" if isinstance(t, (torch.Tensor, np.ndarray)) else ""))
    return int(t)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _deferred(status):
    """The per-chunk status of a decrypt when it is still on the device (None when the host knows it:
    then every failure has already been raised)."""
    return None if status is None or not status.deferred else status.device


def _zero_scratch(box: list) -> None:
    """Zero and drop a cache's plaintext scratch (at ``close()``, and when the cache is garbage-collected)."""
    s, box[0] = box[0], None
    if s is not None:
        s.zero_()


class EncryptedLayer(CacheLayerMixin):
    """One attention layer's cache as ciphertext chunks; plaintext only in the cache's scratch.

    Full attention (``sliding_window=None``) or sliding-window attention, with
    the same visible states and mask sizes as transformers' ``DynamicLayer`` /
    ``DynamicSlidingWindowLayer``. A sliding layer drops whole segments that
    fall out of the window; a segment straddling the window start stays until
    it is wholly outside (its early positions are decrypted into the scratch but
    not returned).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "EncryptedCache", layer_idx: int, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
        self._cache_ref = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.record_past = False
        self._clear()

    # ---- storage -------------------------------------------------------------------------
    def _clear(self) -> None:
        self.keys = None
        self.values = None
        self.is_initialized = False
        self._batch = 0
        self._seg_start = np.zeros(0, dtype=np.int64)
        self._seg_count = np.zeros(0, dtype=np.int64)
        self._meta = {f: np.zeros((0, 0), dtype=np.int64) for f in _META}
        self._row_sess = np.zeros(0, dtype=np.int64)
        self._arena: torch.Tensor | None = None
        self._used = 0
        self._end = 0       # absolute position after the last stored one
        self._start = 0     # first visible position (0 for full attention)

    @property
    def _cache(self) -> "EncryptedCache":
        c = self._cache_ref()
        if c is None:
            raise RuntimeError("the EncryptedCache of this layer no longer exists")
        return c

    @property
    def cumulative_length(self) -> int:
        """Positions written so far (what ``DynamicSlidingWindowLayer.cumulative_length`` counts)."""
        return self._end

    @property
    def ciphertext(self) -> torch.Tensor:
        """The layer's stored bytes (ciphertext and tags, including not yet reclaimed ones) as a uint8 view."""
        if self._arena is None:
            return torch.zeros(0, dtype=torch.uint8)
        return self._arena[: self._used]

    @property
    def num_segments(self) -> int:
        return int(self._seg_start.shape[0])

    @property
    def row_sessions(self) -> list[TenantSession]:
        """The session of each batch row."""
        return [self._cache._sessions[i] for i in self._row_sess.tolist()]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_states(key_states, value_states)
        cache = self._cache
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._batch, self.num_heads, _, self.head_dim = key_states.shape
        self._layout = ChunkLayout(self.layer_idx, self.num_heads, self.head_dim, self.dtype)
        self._bpp = self._layout.bytes_per_position
        self._row_sess = cache._rows_for_batch(self._batch)
        self._meta = {f: np.zeros((0, self._batch), dtype=np.int64) for f in _META}
        self._backend = cache._backend_for(self.device)
        self._arena = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._used = 0
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
        self._check_states(k, v)
        b, h, _, d = k.shape
        if (b, h, d) != (self._batch, self.num_heads, self.head_dim):
            raise ValueError(f"layer {self.layer_idx} holds [batch={self._batch}, heads={self.num_heads}, "
                             f"dim={self.head_dim}]; got states {list(k.shape)}")
        if k.dtype != self.dtype or k.device != self.device:
            raise ValueError(f"layer {self.layer_idx} holds {self.dtype} on {self.device}; "
                             f"got {k.dtype} on {k.device}")

    def _alloc(self, nbytes: int) -> int:
        """Room for ``nbytes`` in the arena: amortised doubling, reclaiming dead bytes first. Returns the offset."""
        cap = self._arena.numel()
        if self._used + nbytes > cap:
            live = self._live_bytes()
            if live + nbytes <= cap // 2:
                self._compact(cap)
            else:
                self._compact(max(2 * cap, 2 * (live + nbytes), 1 << 16))
        off = self._used
        self._used += nbytes
        return off

    def _chunk_sizes(self) -> np.ndarray:
        return self._seg_count * self._bpp + TAG_SIZE

    def _live_bytes(self) -> int:
        off = self._meta["offset"]
        if off.size == 0:
            return 0
        sizes = np.broadcast_to(self._chunk_sizes()[:, None], off.shape)
        _, first = np.unique(off, return_index=True)
        return int(sizes.reshape(-1)[first].sum())

    def _compact(self, capacity: int) -> None:
        """Copy the live chunks (ciphertext as is: moving a chunk changes nothing it is bound to) into a new arena."""
        # zeroed, not empty: fresh memory may hold bytes this process freed earlier (plaintext included)
        new = torch.zeros(capacity, dtype=torch.uint8, device=self.device)
        off = self._meta["offset"]
        used = 0
        if off.size:
            sizes = np.broadcast_to(self._chunk_sizes()[:, None], off.shape).reshape(-1)
            flat = off.reshape(-1)
            uniq, first, inv = np.unique(flat, return_index=True, return_inverse=True)
            usz = sizes[first]
            new_off = np.cumsum(usz) - usz
            # runs that are already contiguous in the old arena are copied in one go
            for o, n, d in zip(uniq.tolist(), usz.tolist(), new_off.tolist()):
                new[d:d + n].copy_(self._arena[o:o + n])
            used = int(usz.sum())
            self._meta["offset"] = new_off[inv].reshape(off.shape).astype(np.int64)
        self._arena = new
        self._used = used

    # ---- atomic operations ---------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        """Everything an operation may change (arrays copied: some are updated in place). The arena is kept
        by reference: bytes below ``_used`` are never rewritten in place, and compaction builds a new one."""
        return (self._batch, self._seg_start.copy(), self._seg_count.copy(),
                {f: a.copy() for f, a in self._meta.items()}, self._row_sess.copy(), self._arena, self._used,
                self._end, self._start)

    def _restore(self, snap: tuple) -> None:
        (self._batch, self._seg_start, self._seg_count, self._meta, self._row_sess, self._arena, self._used,
         self._end, self._start) = snap

    @contextlib.contextmanager
    def _atomic(self):
        """The block completes, or the layer is left exactly as it was (chunk table, bytes, positions)."""
        snap = self._snapshot()
        try:
            yield
        except BaseException:
            self._restore(snap)
            raise

    # ---- key slots -------------------------------------------------------------------------
    def _slots(self, sess: np.ndarray, epoch: np.ndarray, audited: bool):
        """Key slots for chunks with these (session, epoch): (keys, slot per chunk, AuditContext or None).

        Every session is checked first: a cached key slot is no licence to use an expired or closed session."""
        cache = self._cache
        comb = sess.astype(np.int64) << 32 | epoch.astype(np.int64)
        uniq, inv = np.unique(comb, return_inverse=True)
        pairs = [(int(u) >> 32, int(u) & 0xFFFFFFFF) for u in uniq.tolist()]
        for si in dict.fromkeys(si for si, _ in pairs):
            cache._sessions[si].check_valid()
        keys = [cache._keyslot(si, e) for si, e in pairs]
        ctx = None
        if audited and cache.audit is not None:
            idx = [cache._audit_idx(si) for si, _ in pairs]
            ctx = AuditContext(cache.audit, np.array([t for t, _ in idx], dtype=np.uint32),
                               np.array([s for _, s in idx], dtype=np.uint32))
        return keys, inv.reshape(-1).astype(np.int64), ctx

    def _reserve(self, sess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fresh nonce counters for chunks sealed by sessions ``sess``: (counter, epoch) per chunk."""
        cache = self._cache
        counter = np.empty(sess.shape[0], dtype=np.int64)
        epoch = np.empty(sess.shape[0], dtype=np.int64)
        if sess.size == 0:
            return counter, epoch
        order = np.argsort(sess, kind="stable")
        bounds = np.flatnonzero(np.diff(sess[order])) + 1
        for where in np.split(order, bounds):
            si = int(sess[where[0]])
            e, first = cache._sessions[si].reserve(int(where.size))
            counter[where] = first + np.arange(where.size, dtype=np.int64)
            epoch[where] = e
        return counter, epoch

    def _seal(self, k_src, v_src, src_row, dst_row, pos_start, pos_count, io_start, audited: bool, failed=None):
        """Encrypt chunks (src_row, io_start..+pos_count of k_src/v_src) for layer rows ``dst_row``
        under fresh counters; returns (counter, epoch, sess, offset) per chunk.

        ``failed``: for a re-seal of plaintext from a read whose status is still on the device, that
        status per new chunk (non-zero: a source tag failed). Such a chunk is stored as zeros, which never
        authenticate, so a failed chunk is never laundered into a valid one and no host sync is needed."""
        sess = self._row_sess[dst_row]
        counter, epoch = self._reserve(sess)
        sizes = pos_count * self._bpp + TAG_SIZE
        total = int(sizes.sum())
        base = self._alloc(total)
        offset = base + np.cumsum(sizes) - sizes
        keys, slot, ctx = self._slots(sess, epoch, audited)
        if failed is None:
            table = ChunkTable(slot, np.asarray(src_row, dtype=np.int64), pos_start, pos_count,
                               io_start, counter, offset)
            self._backend.encrypt_chunks(keys, self._layout, table, k_src, v_src, self._arena, ctx)
            return counter, epoch, sess, offset
        # sealed aside first: a valid tag over a failed source never reaches the arena
        aside = torch.empty(total, dtype=torch.uint8, device=self._arena.device)
        try:
            table = ChunkTable(slot, np.asarray(src_row, dtype=np.int64), pos_start, pos_count,
                               io_start, counter, offset - base)
            self._backend.encrypt_chunks(keys, self._layout, table, k_src, v_src, aside, ctx)
            bad = failed.to(device=aside.device).bool()
            edges = np.concatenate([[0], np.flatnonzero(np.diff(sizes)) + 1, [sizes.size]]).tolist()
            for a, b in zip(edges[:-1], edges[1:]):       # runs of chunks of one size
                lo, size = int(offset[a] - base), int(sizes[a])
                src = aside[lo:lo + (b - a) * size].view(b - a, size)
                dst = self._arena[base + lo:base + lo + (b - a) * size].view(b - a, size)
                dst.copy_(torch.where(bad[a:b, None], 0, src))
        finally:
            aside.zero_()
        return counter, epoch, sess, offset

    # ---- reading -----------------------------------------------------------------------------
    def _open(self, segs: np.ndarray, rows: np.ndarray, k_out, v_out, base: int, out_rows: np.ndarray | None = None):
        """Decrypt segments ``segs`` × rows ``rows`` into k_out/v_out (positions from ``base``);
        DecryptionError (destination wiped) if any tag fails. Returns the backend's status per chunk
        (segment-major, rows inner), or None when there was nothing to open."""
        if segs.size == 0 or rows.size == 0:
            return None
        ns, nr = segs.size, rows.size
        if rows.size == self._batch and segs[-1] - segs[0] + 1 == ns and (rows == np.arange(nr)).all():
            sub = {f: self._meta[f][int(segs[0]):int(segs[-1]) + 1].reshape(-1) for f in _META}
        else:
            sub = {f: self._meta[f][np.ix_(segs, rows)].reshape(-1) for f in _META}
        keys, slot, ctx = self._slots(sub["sess"], sub["epoch"], audited=True)
        dst = np.tile(rows if out_rows is None else out_rows, ns)
        pos_start = np.repeat(self._seg_start[segs], nr)
        pos_count = np.repeat(self._seg_count[segs], nr)
        table = ChunkTable(slot, dst, pos_start, pos_count, pos_start - base, sub["counter"], sub["offset"])
        try:
            status = self._backend.decrypt_chunks(keys, self._layout, table, self._arena, k_out, v_out, ctx,
                                                  owner=self._cache)
        except BaseException:
            k_out.zero_()       # whatever was opened before the failure is not left behind
            v_out.zero_()
            raise
        self._cache._check_status(self, status, table, sub["sess"], (k_out, v_out))
        return status

    def _read_from(self, view_start: int):
        """Decrypt every segment that reaches past ``view_start`` into the scratch.

        Returns the scratch views from the first decrypted position (``base``), base, and the status."""
        seg_end = self._seg_start + self._seg_count
        i0 = int(np.searchsorted(seg_end, view_start, side="right"))
        self._check_covered(i0, view_start)
        base = int(self._seg_start[i0]) if i0 < self.num_segments else self._end
        k_out, v_out = self._cache._scratch_views(self._batch, self._end - base, self.num_heads,
                                                  self.head_dim, self.dtype, self.device)
        status = self._open(np.arange(i0, self.num_segments), np.arange(self._batch), k_out, v_out, base)
        return k_out, v_out, base, status

    def _check_covered(self, i0: int, view_start: int) -> None:
        """Refuse a read whose positions ``view_start``.. ``_end`` are not all covered by chunks, in order:
        the scratch there would hold whatever an earlier read left (another layer's or tenant's K/V)."""
        starts, counts = self._seg_start[i0:], self._seg_count[i0:]
        ends = starts + counts
        gap = None
        if starts.size == 0:
            if view_start < self._end:
                gap = (view_start, self._end)
        elif int(starts[0]) > view_start:
            gap = (view_start, int(starts[0]))
        elif (starts[1:] != ends[:-1]).any():
            k = int(np.flatnonzero(starts[1:] != ends[:-1])[0])
            gap = (int(min(ends[k], starts[k + 1])), int(max(ends[k], starts[k + 1])))
        elif int(ends[-1]) != self._end:
            gap = (int(min(ends[-1], self._end)), int(max(ends[-1], self._end)))
        if gap is None:
            return
        cache = self._cache
        if cache.audit is not None and self._batch:
            tidx, sidx = cache._audit_arrays(self._row_sess)
            cache.audit.emit(Op.DECRYPT, tenant_idx=tidx, session_idx=sidx, layer=self.layer_idx,
                             row=np.arange(self._batch, dtype=np.uint16), pos_start=gap[0],
                             pos_count=gap[1] - gap[0], status=Status.REFUSED)
        raise DecryptionError(f"no chunk covers positions {gap[0]}..{gap[1] - 1} of layer {self.layer_idx}; "
                              "nothing is returned", layer_idx=self.layer_idx, positions=range(*gap))

    # ---- the Cache API -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encrypt the new positions, decrypt the layer into the scratch, return the visible K and V views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_update(key_states, value_states)
        cache = self._cache
        cache._before_update()
        n = key_states.shape[-2]
        end = self._end
        view_start = self._start
        if self.is_sliding and self.record_past and _recording_returns_window():
            view_start = max(self._start, end - (self.sliding_window - 1))
        refused = (Op.ENCRYPT, end, n) if n else (Op.DECRYPT, view_start, end - view_start)
        try:
            with self._atomic():    # a failed update leaves the layer as it was
                if n:
                    rows = np.arange(self._batch, dtype=np.int64)
                    c, e, s, o = self._seal(key_states, value_states, rows, rows,
                                            np.full(self._batch, end, dtype=np.int64),
                                            np.full(self._batch, n, dtype=np.int64),
                                            np.zeros(self._batch, dtype=np.int64), audited=True)
                    self._append_segment(end, n, c, e, s, o)
                    self._end += n
                    refused = (Op.DECRYPT, view_start, self._end - view_start)
                k, v, base, status = self._read_from(view_start)
                if n and cache.merge_segments:
                    try:
                        self._merge_tail(k, v, base, status)
                    except KVCacheError:
                        # merging is an optimisation: a merge that cannot seal (epoch cap reached, session
                        # expiring between the write and the merge) leaves the segments as they are
                        pass
        except SessionExpiredError:
            cache._refuse(self, *refused)
            raise
        if self.is_sliding and not self.record_past:
            self._set_start(self._end - (self.sliding_window - 1))
        skip = view_start - base
        return k[:, :, skip:, :], v[:, :, skip:, :]

    @property
    def _merge_cap(self) -> int:
        """Largest segment a merge may build (sliding layers: a quarter window, so little is read beyond it)."""
        if self.is_sliding:
            return max(1, self.sliding_window // 4)
        return self._cache.max_merged_positions

    def _merge_tail(self, k_all: torch.Tensor, v_all: torch.Tensor, base: int, status=None) -> None:
        """Merge trailing segments, binary-counter style, in batches.

        Walking back from the last segment, a segment joins the run while it is no larger than the
        run's total so far (so merged runs roughly double). The run is merged only once it holds at
        least ``cache.merge_min_segments`` segments: it becomes one segment, re-sealed as one chunk per
        row under fresh counters. Chunks per row stay O(log positions + merge_min_segments) instead of
        one per decoded token; each position is re-sealed O(log positions) times. The plaintext comes
        from the scratch just read by this update (``status``: that read's status per chunk)."""
        cap = self._merge_cap
        j = self.num_segments - 1
        total = int(self._seg_count[j])
        while j >= 1:
            prev = int(self._seg_count[j - 1])
            if prev > total or prev + total > cap or int(self._seg_start[j - 1]) < base:
                break
            total += prev
            j -= 1
        if self.num_segments - j >= max(2, self._cache.merge_min_segments):
            failed = _deferred(status)
            if failed is not None:  # per row: did any merged source chunk fail? (the read's last segments)
                failed = failed.view(-1, self._batch)[-(self.num_segments - j):].amax(0)
            with self._atomic():
                self._merge_range(k_all, v_all, base, j, failed)

    def _merge_range(self, k_all, v_all, base: int, j: int, failed=None) -> None:
        """Replace segments j.. by one segment re-sealed from the scratch (which starts at ``base``)."""
        start = int(self._seg_start[j])
        total = self._end - start
        rows = np.arange(self._batch, dtype=np.int64)
        c, e, s, o = self._seal(k_all, v_all, rows, rows, np.full(self._batch, start, dtype=np.int64),
                                np.full(self._batch, total, dtype=np.int64),
                                np.full(self._batch, start - base, dtype=np.int64), audited=False, failed=failed)
        self._keep_segments(np.arange(j + 1))
        self._seg_count[j] = total
        for f, a in zip(_META, (c, e, s, o)):
            self._meta[f][j] = a
        cache = self._cache
        if cache.audit is not None:
            tidx, sidx = cache._audit_arrays(self._row_sess)
            cache._emit(Op.RESEAL, tenant_idx=tidx, session_idx=sidx, layer=self.layer_idx,
                             row=rows.astype(np.uint16), pos_start=start, pos_count=total,
                             nonce_counter=c.astype(np.uint64), epoch=e.astype(np.uint32),
                             nbytes=total * self._bpp, status=Status.OK)

    def _append_segment(self, start, count, counter, epoch, sess, offset) -> None:
        self._seg_start = np.append(self._seg_start, start)
        self._seg_count = np.append(self._seg_count, count)
        for f, a in zip(_META, (counter, epoch, sess, offset)):
            self._meta[f] = np.concatenate([self._meta[f], np.asarray(a, dtype=np.int64)[None, :]])

    def _keep_segments(self, keep: np.ndarray) -> None:
        self._seg_start = self._seg_start[keep]
        self._seg_count = self._seg_count[keep]
        for f in _META:
            self._meta[f] = self._meta[f][keep]

    def _set_start(self, start: int) -> None:
        """Advance the first visible position and drop segments wholly before it."""
        self._start = max(self._start, start, 0)
        self._keep_segments(self._seg_start + self._seg_count > self._start)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self._end if self.is_sliding else self._end - self._start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.get_seq_length() + query_length, 0
        w, cum = self.sliding_window, self._end
        kv_offset = max(cum - w + 1, 0)
        if cum >= w:
            return w - 1 + query_length, kv_offset
        return cum + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def activate_past_recording(self, **kwargs) -> None:
        # newer transformers pass keywords meant for recurrent layers (recurrent_states_to_keep); none apply here
        if self.is_sliding:
            self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` positions (negative counts, as DynamicLayer); a chunk cut in
        two is re-sealed under a fresh counter. Sliding layers also shrink back to their window."""
        t = _crop_count(tokens_to_remove)
        if self.is_sliding and self.is_initialized and self._end >= self.sliding_window:
            if not self.record_past:
                raise ValueError("crop was called on a sliding-window layer past its window without past "
                                 "recording; call activate_past_recording() before cropping")
            if t > 0:
                raise ValueError("a sliding-window layer past its window can only be cropped by a negative count")
            if t < 0:
                self._truncate(self._end + t)
            self._set_start(self._end - (self.sliding_window - 1))
            return
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
        cache = self._cache
        try:
            with self._atomic():    # a crop that cannot re-seal drops nothing
                self._keep_segments(self._seg_start < new_end)
                new_counter = np.zeros(self._batch, dtype=np.int64)
                if self.num_segments and int(self._seg_start[-1] + self._seg_count[-1]) > new_end:
                    new_counter = self._reseal_last(new_end - int(self._seg_start[-1]))
                self._end = new_end
                self._start = min(self._start, new_end)
                if cache.audit is not None:
                    tidx, sidx = cache._audit_arrays(self._row_sess)
                    cache._emit(Op.CROP, tenant_idx=tidx, session_idx=sidx, layer=self.layer_idx,
                                row=np.arange(self._batch, dtype=np.uint16), pos_start=new_end,
                                pos_count=removed, nonce_counter=new_counter.astype(np.uint64),
                                status=Status.OK)
        except SessionExpiredError:
            cache._refuse(self, Op.CROP, new_end, removed)
            raise

    def _temp(self, rows: int, seq: int):
        buf = torch.empty((rows, seq, 2, self.num_heads, self.head_dim), dtype=self.dtype, device=self.device)
        return buf, buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)

    def _reseal_last(self, keep: int) -> np.ndarray:
        """Shorten the last segment to its first ``keep`` positions, re-sealed under fresh counters."""
        i = self.num_segments - 1
        start, count = int(self._seg_start[i]), int(self._seg_count[i])
        rows = np.arange(self._batch, dtype=np.int64)
        buf, k_tmp, v_tmp = self._temp(self._batch, count)
        try:
            status = self._open(np.array([i]), rows, k_tmp, v_tmp, start)
            c, e, s, o = self._seal(k_tmp, v_tmp, rows, rows, np.full(self._batch, start, dtype=np.int64),
                                    np.full(self._batch, keep, dtype=np.int64),
                                    np.zeros(self._batch, dtype=np.int64), audited=False,
                                    failed=_deferred(status))
        finally:
            buf.zero_()
        self._seg_count[i] = keep
        for f, a in zip(_META, (c, e, s, o)):
            self._meta[f][i] = a
        return c

    def _reseal_rows(self, rows: np.ndarray) -> np.ndarray:
        """Re-seal every live chunk of ``rows`` under fresh counters (current epoch); first new counter per row."""
        if not self.num_segments or rows.size == 0:
            return np.zeros(rows.size, dtype=np.int64)
        base = int(self._seg_start[0])
        ns, nr = self.num_segments, rows.size
        # a buffer of the whole batch, so each row opens into its own index and its DECRYPT record names it
        buf, k_tmp, v_tmp = self._temp(self._batch, self._end - base)
        try:
            status = self._open(np.arange(ns), rows, k_tmp, v_tmp, base)
            pos_start = np.repeat(self._seg_start, nr)
            c, e, s, o = self._seal(k_tmp, v_tmp, np.tile(rows, ns), np.tile(rows, ns), pos_start,
                                    np.repeat(self._seg_count, nr), pos_start - base, audited=False,
                                    failed=_deferred(status))
        finally:
            buf.zero_()
        for f, a in zip(_META, (c, e, s, o)):
            self._meta[f][:, rows] = a.reshape(ns, nr)
        return c.reshape(ns, nr)[0]

    def _moved_rows(self, src: np.ndarray, op_rows: np.ndarray, row_sess: np.ndarray) -> None:
        cache = self._cache
        if cache.audit is None or op_rows.size == 0:
            return
        tidx, sidx = cache._audit_arrays(row_sess[op_rows])
        cache._emit(Op.REORDER, tenant_idx=tidx, session_idx=sidx, layer=self.layer_idx,
                         row=op_rows.astype(np.uint16), pos_start=self._start,
                         pos_count=self._end - self._start, nonce_counter=src[op_rows].astype(np.uint64),
                         status=Status.OK)

    def _index(self, idx, what: str) -> np.ndarray:
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
            raise IndexError(f"{what}: row index out of range for batch {self._batch}")
        return idx % max(self._batch, 1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam reorder: row r takes the chunks of row beam_idx[r], without re-encryption.

        TenantIsolationError (and an ISOLATION_VIOLATION record) if a row would take a row of another session."""
        if not self.is_initialized:
            return
        idx = self._index(beam_idx, "beam_idx")
        if idx.size != self._batch:
            raise ValueError(f"beam_idx has {idx.size} entries, the batch {self._batch}")
        self._cache._check_same_session(self, self._row_sess[idx], self._row_sess, idx)
        moved = np.flatnonzero(idx != np.arange(self._batch))
        if moved.size == 0:
            return
        meta = {f: self._meta[f][:, idx] for f in _META}
        self._moved_rows(idx, moved, self._row_sess)
        self._meta = meta

    def _select_rows(self, idx: np.ndarray) -> None:
        """Row r becomes old row idx[r]: the new state is built, recorded, then put in place in one step."""
        meta = {f: self._meta[f][:, idx] for f in _META}
        row_sess = self._row_sess[idx]
        self._moved_rows(idx, np.flatnonzero(idx != np.arange(idx.size)), row_sess)
        self._meta, self._row_sess, self._batch = meta, row_sess, int(idx.size)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Row i becomes rows i*repeats .. i*repeats+repeats-1, each keeping row i's session and chunks."""
        if not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if self.is_initialized:
            self._select_rows(np.repeat(np.arange(self._batch), int(repeats)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(self._index(indices, "indices"))

    def reset(self) -> None:
        """Forget everything (the arena is zeroed first); the layer initializes again on its next update."""
        if self._arena is not None:
            self._arena.zero_()
        self._clear()

    def offload(self) -> None:
        if self.is_initialized and self._arena.device.type != "cpu":
            self._arena = self._arena.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.is_initialized and self._arena.device != self.device:
            self._arena = self._arena.to(self.device, non_blocking=True)

    # ---- sessions ------------------------------------------------------------------------------
    def _shred_rows(self, rows: np.ndarray) -> None:
        """Zero the ciphertext of ``rows`` (their keys are already erased)."""
        if not self.is_initialized or rows.size == 0 or not self.num_segments:
            return
        sizes = self._chunk_sizes()
        for i in range(self.num_segments):
            n = int(sizes[i])
            for o in np.unique(self._meta["offset"][i, rows]).tolist():
                self._arena[o:o + n].zero_()

    def export_entries(self, row: int) -> list[EncryptedEntry]:
        if not self.is_initialized:
            return []
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < self._batch:
            raise IndexError(f"row must be in [0, {self._batch}), got {row!r}")
        session = self._cache._sessions[int(self._row_sess[row])]
        arena = self._arena.cpu()
        out = []
        for i in range(self.num_segments):
            start, count = int(self._seg_start[i]), int(self._seg_count[i])
            counter, epoch, off = (int(self._meta[f][i, row]) for f in ("counter", "epoch", "offset"))
            nb = count * self._bpp
            meta = EntryMetadata(session.tenant_id, session.session_id, self.layer_idx, start,
                                 position_count=count)
            out.append(EncryptedEntry(meta, make_nonce(epoch, counter), arena[off:off + nb + TAG_SIZE].numpy().tobytes(),
                                      nb // 2, counter, epoch, _dtype_name(self.dtype), self.num_heads,
                                      self.head_dim))
        return out

    def _copy_for(self, cache: "EncryptedCache") -> "EncryptedLayer":
        """This layer's state as a layer of ``cache``: its own arena (the ciphertext bytes copied as they
        are) and metadata; the backend and layout are shared."""
        new = type(self).__new__(type(self))
        keep = {"_cache_ref": weakref.ref(cache), "_arena": None if self._arena is None else self._arena.clone()}
        for name, value in self.__dict__.items():
            if name in keep:
                new.__dict__[name] = keep[name]
            elif name in ("_backend", "_layout", "device", "dtype"):
                new.__dict__[name] = value
            else:
                new.__dict__[name] = copy.deepcopy(value)
        return new

    def __deepcopy__(self, memo: dict) -> "EncryptedLayer":
        cache = memo.get(id(self._cache))
        if cache is None:
            raise TypeError("an EncryptedLayer is copied with its cache: copy.deepcopy(cache), not one of its layers")
        return self._copy_for(cache)

    def __repr__(self) -> str:
        kind = f"sliding_window={self.sliding_window}" if self.is_sliding else "full"
        return (f"EncryptedLayer(layer={self.layer_idx}, {kind}, rows={self._batch}, "
                f"positions={self.get_seq_length()}, segments={self.num_segments})")


class EncryptedCache(Cache):
    """A transformers ``Cache`` whose layers hold only AES-256-GCM ciphertext, one session per batch row.

    ``sessions``: one TenantSession for every row, or one per batch row (row i
    belongs to ``sessions[i]``). Where generation expands each prompt into
    several consecutive rows before the first update (transformers repeats each
    prompt ``max(num_beams, num_return_sequences)`` times), ``rows_per_session``
    says how many: row i belongs to ``sessions[i // rows_per_session]``. A batch
    that matches neither is refused (ValueError); a row's tenant is never
    guessed. ``audit``: a
    KVAuditLog, or None for no audit. ``policy``: a KeyRotationPolicy checked
    before each update (a firing policy re-seals that session's chunks under
    the new epoch). ``backend``: a CryptoBackend (default: chosen by the
    tensors' device).
    """

    def __init__(self, config, sessions: TenantSession | Sequence[TenantSession], audit: KVAuditLog | None = None,
                 policy: KeyRotationPolicy | None = None, backend: CryptoBackend | None = None,
                 merge_segments: bool = True, max_merged_positions: int = 4096, merge_min_segments: int = 8,
                 rows_per_session: int | None = None):
        if not hasattr(config, "get_text_config"):
            raise TypeError(f"config must be a transformers PretrainedConfig, got {type(config).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("EncryptedCache supports decoder-only models; this config is encoder-decoder")
        if isinstance(sessions, TenantSession):
            sessions = [sessions]
        if not isinstance(sessions, (list, tuple)) or not sessions:
            raise TypeError("sessions must be a TenantSession or a non-empty list of them")
        for s in sessions:
            if not isinstance(s, TenantSession):
                raise TypeError(f"sessions must hold TenantSession objects, got {type(s).__name__}")
            s.check_valid()
        if policy is not None and not isinstance(policy, KeyRotationPolicy):
            raise TypeError(f"policy must be a KeyRotationPolicy, got {type(policy).__name__}")
        if backend is not None and not isinstance(backend, CryptoBackend):
            raise TypeError(f"backend must be a CryptoBackend, got {type(backend).__name__}")
        if audit is not None and not (hasattr(audit, "emit") and hasattr(audit, "emit_per_position")):
            raise TypeError("audit must be a KVAuditLog (or None)")
        if not isinstance(merge_segments, bool):
            raise TypeError("merge_segments must be a bool")
        if isinstance(max_merged_positions, bool) or not isinstance(max_merged_positions, int) \
                or max_merged_positions < 1:
            raise ValueError(f"max_merged_positions must be a positive int, got {max_merged_positions!r}")
        if isinstance(merge_min_segments, bool) or not isinstance(merge_min_segments, int) \
                or merge_min_segments < 2:
            raise ValueError(f"merge_min_segments must be an int >= 2, got {merge_min_segments!r}")
        if rows_per_session is not None and (isinstance(rows_per_session, bool)
                                             or not isinstance(rows_per_session, int) or rows_per_session < 1):
            raise ValueError(f"rows_per_session must be a positive int or None, got {rows_per_session!r}")
        self.merge_segments = merge_segments
        self.merge_min_segments = merge_min_segments
        self.max_merged_positions = max_merged_positions
        self.rows_per_session = rows_per_session

        layers = [EncryptedLayer(self, i, window) for i, window in enumerate(_attention_windows(config))]
        super().__init__(layers=layers)

        self._sessions: list[TenantSession] = []
        prompt = []
        for s in sessions:
            for i, known in enumerate(self._sessions):
                if known is s:
                    prompt.append(i)
                    break
            else:
                prompt.append(len(self._sessions))
                self._sessions.append(s)
        self._prompt_sess = np.array(prompt, dtype=np.int64)
        self._row_sess: np.ndarray | None = None
        self.audit: KVAuditLog | None = audit
        self.policy = policy
        self._backend = backend
        self._keyslots: dict[tuple[int, int], KeySlot] = {}
        self._audit_ids: dict[int, tuple[int, int]] = {}
        # the plaintext scratch lives in a box shared with a finalizer that zeroes it when this cache is
        # collected (the finalizer holds no reference to the cache, so it cannot keep it alive)
        self._scratch_box: list = [None]
        self._scratch_guard = weakref.finalize(self, _zero_scratch, self._scratch_box)
        self._txn: list | None = None
        self._is_closed = False
        self._closed: set[int] = set()
        self._copies: weakref.WeakSet[EncryptedCache] = weakref.WeakSet([self])   # this cache and its deep copies
        self._watch_sessions()

    def _watch_sessions(self) -> None:
        """Have every session tell this cache when it closes or erases an epoch's key (held weakly)."""
        me = weakref.ref(self)
        for s in self._sessions:
            s.on_close(lambda sess, me=me: me() is not None and me()._on_session_closed(sess))
            s.on_retire(lambda sess, e, me=me: me() is not None and me()._on_epoch_retired(sess, e))

    def __deepcopy__(self, memo: dict) -> "EncryptedCache":
        """``copy.deepcopy(cache)``: a cache that continues on its own from the same state (reusing a
        prompt's cache for several requests).

        The copy shares the session objects, so each session keeps one nonce counter for both caches
        and no (key, nonce) pair is sealed twice; it also shares the audit log, the rotation policy and
        the backend. It holds its own ciphertext (a copy of each layer's arena: no re-encryption, no
        plaintext) and its own scratch, and it is told of session closes and key retirements like the
        original (closing a session shreds its rows in both; rotating a session, here or in the
        original, re-seals its chunks in both before the old key is erased)."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        shared = {"_sessions": list(self._sessions), "audit": self.audit, "policy": self.policy,
                  "_backend": self._backend, "_keyslots": dict(self._keyslots),
                  "_audit_ids": dict(self._audit_ids), "_copies": self._copies, "_txn": None}
        for name, value in self.__dict__.items():
            if name in shared:
                new.__dict__[name] = shared[name]
            elif name not in ("layers", "_scratch_box", "_scratch_guard"):
                new.__dict__[name] = copy.deepcopy(value, memo)
        # a scratch of its own (the original's plaintext is not copied), zeroed when the copy is dropped
        new._scratch_box = [None]
        new._scratch_guard = weakref.finalize(new, _zero_scratch, new._scratch_box)
        new.layers = [layer._copy_for(new) for layer in self.layers]
        self._copies.add(new)
        new._watch_sessions()
        return new

    # ---- rows and sessions -------------------------------------------------------------------------
    @property
    def sessions(self) -> list[TenantSession]:
        """The distinct sessions of this cache."""
        return list(self._sessions)

    def _rows_for_batch(self, batch: int) -> np.ndarray:
        if self._row_sess is not None:
            if self._row_sess.size != batch:
                raise ValueError(f"layers of this cache hold {self._row_sess.size} rows; got a batch of {batch}")
            return self._row_sess.copy()
        p, per = self._prompt_sess, self.rows_per_session
        if per is not None:
            if batch != p.size * per:
                raise ValueError(f"{p.size} session(s) × rows_per_session={per} is {p.size * per} rows, "
                                 f"but the batch has {batch}")
            rows = np.repeat(p, per)
        elif p.size == 1:
            rows = np.zeros(batch, dtype=np.int64)
        elif batch == p.size:
            rows = p.copy()
        else:
            raise ValueError(f"{p.size} sessions were given for a batch of {batch} rows: pass one session per "
                             "row, or rows_per_session= when generation expands each prompt into several rows "
                             "(beam search, num_return_sequences: max(num_beams, num_return_sequences)); "
                             "a row's tenant is never guessed")
        self._row_sess = rows
        return rows.copy()

    def _backend_for(self, device: torch.device) -> CryptoBackend:
        if self._backend is None:
            self._backend = select_backend(device)
        return self._backend

    def _keyslot(self, si: int, epoch: int) -> KeySlot:
        ks = self._keyslots.get((si, epoch))
        if ks is None:
            s = self._sessions[si]
            ks = KeySlot(s.key_for_epoch(epoch), tenant_tag(s.tenant_id), session_tag(s.session_id), epoch)
            self._keyslots[(si, epoch)] = ks
        return ks

    def _audit_idx(self, si: int) -> tuple[int, int]:
        ids = self._audit_ids.get(si)
        if ids is None:
            s = self._sessions[si]
            ids = (self.audit.tenant_index(s.tenant_id), self.audit.session_index(s.session_id, s.tenant_id))
            self._audit_ids[si] = ids
        return ids

    def _audit_arrays(self, sess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([self._audit_idx(si) for si in range(len(self._sessions))], dtype=np.uint32)
        return ids[sess, 0], ids[sess, 1]

    def _check_same_session(self, layer: EncryptedLayer, src: np.ndarray, dst: np.ndarray, idx: np.ndarray) -> None:
        bad = np.flatnonzero(src != dst)
        if bad.size == 0:
            return
        r = int(bad[0])
        a, b = self._sessions[int(dst[r])], self._sessions[int(src[r])]
        if self.audit is not None:
            tidx, sidx = self._audit_arrays(dst[bad])
            self.audit.emit(Op.ISOLATION_VIOLATION, tenant_idx=tidx, session_idx=sidx, layer=layer.layer_idx,
                            row=bad.astype(np.uint16), nonce_counter=idx[bad].astype(np.uint64),
                            status=Status.REFUSED)
        raise TenantIsolationError(
            f"reorder would move row {int(idx[r])} (tenant {b.tenant_id!r}) into row {r} "
            f"(tenant {a.tenant_id!r}): rows of different sessions are never mixed")

    def _before_update(self) -> None:
        if self._is_closed:
            raise ValueError("this EncryptedCache is closed")
        if self.policy is None:
            return
        used = range(len(self._sessions)) if self._row_sess is None else np.unique(self._row_sess).tolist()
        for si in used:
            s = self._sessions[si]
            if not s.is_valid():    # nothing to rotate: the update itself is refused (and recorded)
                continue
            fire, trigger = self.policy.should_rotate(s)
            if fire:
                self._rotate(si, trigger)

    def _on_epoch_retired(self, session: TenantSession, epoch: int) -> None:
        """The session erased an epoch's key: drop this cache's copy too, so chunks of that epoch stop opening."""
        dropped = False
        for si, s in enumerate(self._sessions):
            if s is session and self._keyslots.pop((si, epoch), None) is not None:
                dropped = True
        if dropped:
            self._forget_backend_keys()

    def _on_session_closed(self, session: TenantSession) -> None:
        # the last layer read may be this session's rows in the clear: the scratch goes first
        self.wipe_scratch()
        for si, s in enumerate(self._sessions):
            if s is not session:
                continue
            self._closed.add(si)
            for key in [k for k in self._keyslots if k[0] == si]:
                del self._keyslots[key]
            self._forget_backend_keys()
            for layer in self.layers:
                if not layer.is_initialized:
                    continue
                rows = np.flatnonzero(layer._row_sess == si)
                layer._shred_rows(rows)
                if self.audit is not None and rows.size:
                    tidx, sidx = self._audit_arrays(layer._row_sess[rows])
                    self.audit.emit(Op.CLOSE, tenant_idx=tidx, session_idx=sidx, layer=layer.layer_idx,
                                    row=rows.astype(np.uint16), pos_start=layer._start,
                                    pos_count=layer._end - layer._start, status=Status.OK)
            if self.audit is not None and not any(l.is_initialized for l in self.layers):
                t, sx = self._audit_idx(si)
                self.audit.emit(Op.CLOSE, tenant_idx=t, session_idx=sx, status=Status.OK)

    # ---- atomic operations and their records ---------------------------------------------------------
    @contextlib.contextmanager
    def _atomic(self):
        """An operation over all layers: it completes, or every layer and the row map are left exactly as
        they were. Its records (``_emit``) are written only once it has completed; refusals and isolation
        violations are written at once, whatever follows."""
        if self._txn is not None:       # nested: the outermost one commits or restores
            yield
            return
        saved = [(layer, layer._snapshot()) for layer in self.layers if layer.is_initialized]
        rows = None if self._row_sess is None else self._row_sess.copy()
        self._txn = []
        try:
            yield
            records, self._txn = self._txn, None
            for op, fields in records:
                self.audit.emit(op, **fields)
        except BaseException:
            self._txn = None
            for layer, snap in saved:
                layer._restore(snap)
            self._row_sess = rows
            raise

    def _emit(self, op: Op, **fields) -> None:
        """The record of a completed step: held back while an operation over all layers is under way."""
        if self._txn is not None:
            self._txn.append((op, fields))
        else:
            self.audit.emit(op, **fields)

    def _refuse(self, layer: EncryptedLayer, op: Op, pos_start: int, pos_count: int, only: int | None = None) -> None:
        """Record the refusal of ``op`` on the rows of ``layer`` whose session is closed or expired (status
        REFUSED, one record per row), and wipe the scratch, which may hold those rows from an earlier read."""
        self.wipe_scratch()
        if self.audit is None or not layer.is_initialized or layer._row_sess.size == 0:
            return
        dead = [si for si in np.unique(layer._row_sess).tolist()
                if (only is None or si == only) and not self._sessions[si].is_valid()]
        rows = np.flatnonzero(np.isin(layer._row_sess, dead))
        if rows.size == 0:
            return
        tidx, sidx = self._audit_arrays(layer._row_sess[rows])
        self.audit.emit(op, tenant_idx=tidx, session_idx=sidx, layer=layer.layer_idx, row=rows.astype(np.uint16),
                        pos_start=max(int(pos_start), 0), pos_count=max(int(pos_count), 0), status=Status.REFUSED)

    # ---- scratch --------------------------------------------------------------------------------
    @property
    def _scratch(self) -> torch.Tensor | None:
        return self._scratch_box[0]

    def _scratch_views(self, batch, seq, heads, dim, dtype, device):
        itemsize = _itemsize(dtype)
        need = batch * seq * 2 * heads * dim * itemsize
        s = self._scratch
        if s is None or s.numel() < need or s.device != torch.device(device):
            if s is not None:
                s.zero_()
            cap = max(need, 2 * s.numel() if s is not None and s.device == torch.device(device) else 0, 1 << 16)
            s = self._scratch_box[0] = torch.empty(cap, dtype=torch.uint8, device=device)
            if not self._scratch_guard.alive:      # a copy of a cache needs a finalizer of its own
                self._scratch_guard = weakref.finalize(self, _zero_scratch, self._scratch_box)
        x = s[:need].view(dtype).view(batch, 2, heads, seq, dim)
        return x[:, 0], x[:, 1]

    def wipe_scratch(self) -> None:
        """Zero the plaintext scratch (the K/V views last returned become zeros)."""
        if self._scratch is not None:
            self._scratch.zero_()

    def close(self) -> None:
        """Zero and release the plaintext scratch and every layer's ciphertext; the cache cannot be used
        afterwards (ValueError). The sessions stay open: closing them is their owner's call. A cache that is
        dropped without ``close()`` has its scratch zeroed when it is garbage-collected."""
        self._is_closed = True
        _zero_scratch(self._scratch_box)
        for layer in self.layers:
            layer.reset()
        self._row_sess = None
        self._forget_backend_keys()     # device key schedules and key staging are erased too

    def _check_status(self, layer: EncryptedLayer, status, table: ChunkTable, sess: np.ndarray, outs) -> None:
        """Raise DecryptionError for failed chunks when the backend answered on the host.

        A device status is not read here (that would synchronise the hot path): the device backend
        keeps its failures, zeroes their destinations itself, and raises them from ``check()``."""
        if not status.deferred:
            self._raise_failed(layer, status.host, table, sess, outs)

    def _raise_failed(self, layer, status, table, sess, outs) -> None:
        bad = np.flatnonzero(np.asarray(status))
        if bad.size == 0:
            return
        for t in outs:
            t.zero_()
        self.wipe_scratch()
        i = int(bad[0])
        s = self._sessions[int(sess[i])]
        start, count = int(np.asarray(table.pos_start)[i]), int(np.asarray(table.pos_count)[i])
        positions = range(start, start + count)
        raise DecryptionError(
            f"authentication failed for tenant {s.tenant_id!r}, layer {layer.layer_idx}, positions "
            f"{start}..{start + count - 1} ({bad.size} chunk(s) failed); no plaintext returned",
            tenant_id=s.tenant_id, layer_idx=layer.layer_idx, positions=positions)

    def check(self) -> None:
        """Synchronisation point: raise a failure a device backend recorded since the last check
        (the scratch is wiped first). The host backend raises inside ``update`` already."""
        if self._backend is None:
            return
        try:
            self._backend.check(owner=self)
        except DecryptionError:
            self.wipe_scratch()
            raise

    # ---- rotation ---------------------------------------------------------------------------------
    def rotate(self, tenant: "str | TenantSession") -> list[int]:
        """Rotate the session(s) of ``tenant`` (a tenant id or a session) now: re-seal their chunks under the
        new epoch and retire the old keys. Returns the new epoch of each rotated session."""
        if isinstance(tenant, TenantSession):
            hits = [i for i, s in enumerate(self._sessions) if s is tenant]
        elif isinstance(tenant, str):
            hits = [i for i, s in enumerate(self._sessions) if s.tenant_id == tenant]
        else:
            raise TypeError(f"tenant must be a tenant id or a TenantSession, got {type(tenant).__name__}")
        if not hits:
            raise TenantIsolationError(f"tenant {tenant if isinstance(tenant, str) else tenant.tenant_id!r} "
                                       "has no session in this cache")
        return [self._rotate(si, RotationTrigger.MANUAL) for si in hits]

    def _rotate(self, si: int, trigger: RotationTrigger) -> int:
        s = self._sessions[si]
        try:
            new = s.rotate_key()
            # all layers of every copy re-sealed, or none: until the old epochs are retired below, they
            # still open. Copies made by deepcopy share the session: their chunks move to the new epoch
            # too, before the old keys are retired, so a rotation in one copy leaves the others readable.
            with contextlib.ExitStack() as stack:
                for cache in [self, *(c for c in list(self._copies) if c is not self)]:
                    stack.enter_context(cache._atomic())
                for cache in [self, *(c for c in list(self._copies) if c is not self)]:
                    for sj, other in enumerate(cache._sessions):
                        if other is s and sj not in cache._closed:
                            cache._reseal_session(sj, new)
                if self.audit is not None:
                    t, sx = self._audit_idx(si)
                    self._emit(Op.ROTATE, tenant_idx=t, session_idx=sx, epoch=new, status=Status.OK)
        except SessionExpiredError:
            for layer in self.layers:
                self._refuse(layer, Op.ROTATE, layer._start, layer._end - layer._start, only=si)
            raise
        for e in s.live_epochs:
            if e != new:
                s.retire_epoch(e)     # the retire hook drops this cache's key copy and the backend's schedules
        return new

    def _reseal_session(self, si: int, new: int) -> None:
        """Re-seal every live chunk of session slot ``si`` under its current epoch ``new`` (recorded per layer)."""
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            rows = np.flatnonzero(layer._row_sess == si)
            first = layer._reseal_rows(rows)
            if self.audit is not None and rows.size:
                tidx, sidx = self._audit_arrays(layer._row_sess[rows])
                self._emit(Op.ROTATE, tenant_idx=tidx, session_idx=sidx, layer=layer.layer_idx,
                                row=rows.astype(np.uint16), pos_start=layer._start,
                                pos_count=layer._end - layer._start, nonce_counter=first.astype(np.uint64),
                                epoch=new, status=Status.OK)

    def _forget_backend_keys(self) -> None:
        """Let a backend that caches key schedules (the CUDA backend keeps them on the device) drop them,
        so retired or closed keys do not outlive their session's erasure."""
        if self._backend is not None:
            self._backend.forget_keys()

    # ---- Cache API over all layers ------------------------------------------------------------------
    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        with self._atomic():
            if self._row_sess is not None:
                self._row_sess = np.repeat(self._row_sess, int(repeats))
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        with self._atomic():
            for layer in self.layers:
                if layer.is_initialized:
                    idx = layer._index(indices, "indices")
                    if self._row_sess is not None:
                        self._row_sess = self._row_sess[idx]
                    break
            super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        with self._atomic():
            super().reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        with self._atomic():
            super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._row_sess = None
        self.wipe_scratch()

    def export_entries(self, layer_idx: int, row: int) -> list[EncryptedEntry]:
        """The chunks of one row of one layer as EncryptedEntry objects (envelope v1), in position order."""
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx must be in [0, {len(self.layers)}), got {layer_idx!r}")
        return self.layers[layer_idx].export_entries(row)

    def nonce_counters(self) -> list[tuple[str, int, int]]:
        """(session id, epoch, counter) of every live chunk (for checking that none repeats)."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            for si, e, c in zip(layer._meta["sess"].reshape(-1).tolist(), layer._meta["epoch"].reshape(-1).tolist(),
                                layer._meta["counter"].reshape(-1).tolist()):
                out.append((self._sessions[si].session_id, e, c))
        return out

    def __repr__(self) -> str:
        return f"EncryptedCache(sessions={len(self._sessions)}, layers={self.layers})"
