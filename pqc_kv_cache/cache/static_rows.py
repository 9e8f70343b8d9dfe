"""Beam reorder, crop, deepcopy and key rotation of ``StaticEncryptedCache`` (a mixin of it).

All of it runs between steps, outside any compiled region (transformers' ``generate`` calls
``reorder_cache`` and ``crop`` between forward passes). Each operation first drains the records the
operators wrote, so the log keeps the order in which things happened.

- **reorder_cache** (beam search): row ``r`` takes old row ``beam_idx[r]``'s plaintext, chunks and slot
  table, in place and without re-encryption; a row of another session is never taken (refused before
  anything moves, and recorded).
- **crop**: transformers' static crop, the cut positions' slots and plaintext zeroed; positions written
  again are sealed again under fresh counters (the operators take them from the nonce ranges).
- **deepcopy**: a cache that continues on its own from the same state, sharing the session objects (so
  counters are never handed out twice), the log and the backend; it reserves nonce ranges of its own.
- **rotate**: the session opens a new epoch, every chunk of its rows is sealed again under it (in every
  copy of the cache), then its older epochs are retired.
"""

from __future__ import annotations

import copy

import numpy as np
from transformers.cache_utils import Cache, StaticLayer

from ..audit.records import Op, Status
from ..errors import SessionExpiredError
from ..session import TenantSession
from .context import tenant_slots

__all__ = ["StaticRowOps"]


class StaticRowOps:
    """Row, position and key operations over the static layers (uses the cache's context and layers)."""

    # ---- beam search and crop -------------------------------------------------------------------------
    def reorder_cache(self, beam_idx) -> None:
        """Beam reorder of every layer (see ``StaticSealing.reorder_cache``); TenantIsolationError, with
        nothing moved, if a row would take a row of another session."""
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        if not self._ctx.started:
            return
        self._ctx.drain()
        self._ctx.beam_rows(beam_idx, 0)      # refused here, before any layer moves
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` positions from the end (a negative count, as transformers' static
        layers take it), one CROP record per layer and row. A sliding layer that moved past its window
        cannot be cropped (ValueError, nothing cropped)."""
        # transformers' static layers crop (a negative count) in 5.25, not in 5.16, where StaticCache cannot either
        if not hasattr(StaticLayer, "crop"):
            raise ValueError("this transformers release's static layers cannot be cropped (StaticCache cannot "
                             "either); a newer transformers adds StaticLayer.crop")
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        for layer in self.layers:
            first, end = layer.held_range()
            if layer.is_sliding and end > layer.max_cache_len and tokens_to_remove:
                raise ValueError(f"layer {layer.layer_idx}'s sliding window has moved on: it cannot be cropped")
        self._ctx.drain()
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    # ---- deepcopy --------------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict):
        """``copy.deepcopy(cache)``: a cache that continues on its own from the same state (one prompt's cache
        reused for several requests). It holds its own plaintext, ciphertext and slot tables (copied: no
        re-encryption), record buffer and nonce ranges (reserved from the sessions now, so no counter is
        handed out to both), and shares the session objects, the audit log and the backend. Closing a
        session shreds its rows in both; rotating a session re-seals its chunks in both."""
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        self._ctx.drain()
        new._sessions = self._sessions
        new._max_cache_len = self._max_cache_len
        new._plan = self._plan
        new._copies = self._copies
        new._ctx = self._ctx.fresh()
        Cache.__init__(new, layers=[c(new._ctx, i, **kw) for i, (c, kw) in enumerate(self._plan)])
        for name, value in self.__dict__.items():
            if name not in new.__dict__:
                new.__dict__[name] = copy.deepcopy(value, memo)
        if self._ctx.started:
            new._ctx.start(int(self._ctx.row_slots.size), self._ctx.device, rows=self._ctx.row_slots.copy())
            for mine, theirs in zip(new.layers, self.layers):
                mine.copy_from(theirs)
        self._copies.add(new)
        new._watch()
        return new

    # ---- key rotation ----------------------------------------------------------------------------------
    def rotate(self, tenant: "str | TenantSession") -> list[int]:
        """Rotate the session(s) of ``tenant`` (a tenant id or a session) now: the session opens a new epoch,
        every chunk of its rows, in this cache and its copies, is sealed again under it with fresh counters
        (one ROTATE record per layer and row, the first new counter in it), then its older epochs are
        retired (their keys erased). Released plaintext is opened first (verified) and released again after.
        Returns the new epoch of each rotated session; a chunk that could not be sealed again is raised as
        by ``check()``."""
        hits = tenant_slots(self._sessions, tenant)
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        return [self._rotate(slot) for slot in hits]

    def _rotate(self, slot: int) -> int:
        s = self._sessions[slot]
        caches = [c for c in list(self._copies) if not c._ctx.closed]
        released = [(c, [layer.released_rows() for layer in c.layers]) for c in caches if c.released]
        for c, _ in released:
            c.restore()         # a chunk that fails: DecryptionError here, before anything rotated
        try:
            try:
                new = s.rotate_key()
            except SessionExpiredError:
                self._ctx.auditor.session(Op.ROTATE, slot, status=Status.REFUSED, now=True)
                raise
            for c in caches:
                for other, o in enumerate(c._sessions):
                    if o is s:
                        c._reseal_session(other, new)
            self._ctx.auditor.session(Op.ROTATE, slot, epoch=new, now=True)
            for e in s.live_epochs:
                if e != new:
                    s.retire_epoch(e)     # the retire hook drops every cache's key copies
        finally:
            for c, rows in released:
                c._release_rows(rows)       # the rows released before, and only those
        for c in caches:
            c.check()
        return new

    def _reseal_session(self, slot: int, new: int) -> None:
        """Seal every chunk of session slot ``slot``'s rows again under its epoch ``new`` (ROTATE per layer and
        row); a nonce range of the new epoch, large enough for all of them, is reserved first."""
        ctx = self._ctx
        if not ctx.started:
            return
        ctx.drain()
        rows = ctx.rows_of(slot)
        held = sum(end - first for first, end in (layer.held_range() for layer in self.layers))
        want = ctx.want()
        want[slot] = max(int(want[slot]), rows.size * held)
        ctx.nonces.refill(want)          # the session's epoch moved: a fresh range of the new epoch
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            first_counter = layer.reseal_rows(rows)
            first, end = layer.held_range()
            ctx.auditor.rows(Op.ROTATE, layer.layer_idx, np.full(rows.size, slot), rows, now=True, pos_start=first,
                             pos_count=end - first, nonce_counter=first_counter.astype(np.uint64), epoch=new)
