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

``release`` zeroes the plaintext in place; the next update (or ``open_released``) opens every held
position from the arena with ``pqc_kv_cache::open_positions``, every tag verified.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from ..envelope import TAG_SIZE, EncryptedEntry, EntryMetadata, make_nonce
from ..ops import kv_seal  # noqa: F401  (registers the operators)
from .clearing import zero, zero_at_collection
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
        self._released = False

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
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.arena)
            torch._dynamo.mark_static_address(self.meta)
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
                                              self.arena, self.meta, *ctx.open_state(), self._ring)
        self._released = False

    # ---- release and restore (outside any compiled region, except the open an update does) ---------------
    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Zero the plaintext in place (its addresses stay); only ciphertext remains until it is opened."""
        if self.is_initialized:
            zero(self.keys)
            zero(self.values)
            self._released = True

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
        self._released = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("StaticEncryptedCache does not reorder rows (beam search); use EncryptedCache, which "
                         "checks that no row moves into another tenant's")

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
        return torch.full((), self.cumulative_length_int, dtype=torch.int64)

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
