"""EncryptedCache: the transformers ``Cache`` API over AES-256-GCM chunks, one session per batch row.

The cache builds one layer per cached layer of the model's config through a
layer-type → class table (``LAYER_TYPE_CLASSES``; unsupported types are refused
before any layer exists), loops over its layers for the ``Cache`` API, and
answers its sessions' hooks: a closing session has its rows shredded in every
layer, a retired epoch's key copies are dropped, and a rotation re-seals the
session's chunks under the new epoch. Every operation over several layers
(crop, rotation, reorder, row selection) completes or leaves every layer and
the row map exactly as they were; its records are written once it has
completed.

Two residency modes, one API (``mode=``):

- ``"sealed"`` (the default): the layers hold only ciphertext; every update
  decrypts the layer into the plaintext scratch (``[batch, 2, heads, seq, dim]``,
  shared by all layers), the only place plaintext lives; the K/V views an
  update returns are valid until the next layer's update. ``wipe_scratch()``
  zeroes it; closing a session wipes it; a collected cache zeroes it.
- ``"working_set"``: every position is still sealed as it is written, and the
  layers also keep their rows' plaintext K/V on the compute device while the
  sequence is generated, as ``DynamicCache`` would (no per-step decryption;
  reads are recorded as READ). ``release()`` zeroes and drops that plaintext;
  the next update or ``restore()`` opens the ciphertext once, verified.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from .._checks import check_int
from .._cleanup import Cleanup
from ..audit.records import Op
from ..envelope import EncryptedEntry
from ..errors import DecryptionError, SessionExpiredError
from ..rotation import KeyRotationPolicy
from ..session import TenantSession
from .audit import CacheAuditor
from .context import (LayerContext, MergeSettings, Scratch, check_backend_argument, session_slots, slots_of_session,
                      tenant_slots, watch_sessions)
from .guards import guard_continuous_batching, refuse_unsupported
from .layer import EncryptedLayer
from .persistence import SaveFiles
from .sliding import SlidingEncryptedLayer
from .workingset import SlidingWorkingSetLayer, WorkingSetLayer

if TYPE_CHECKING:   # for annotations only: the cache does not import the audit pipeline's log
    from ..audit.log import KVAuditLog
    from ..backends.base import CryptoBackend

__all__ = ["EncryptedCache", "LAYER_TYPE_CLASSES", "MODES"]

#: A config's layer type -> the layer class that caches it (the sliding ones take the layer's window).
LAYER_TYPE_CLASSES: dict[str, type[EncryptedLayer]] = {
    "full_attention": EncryptedLayer,
    "sliding_attention": SlidingEncryptedLayer,
    "chunked_attention": SlidingEncryptedLayer,
}

#: The same table for the working-set mode: the same layers over a plaintext store (workingset.py).
WORKING_SET_LAYER_TYPE_CLASSES: dict[str, type[EncryptedLayer]] = {
    "full_attention": WorkingSetLayer,
    "sliding_attention": SlidingWorkingSetLayer,
    "chunked_attention": SlidingWorkingSetLayer,
}

#: Residency mode -> its layer-type table.
MODES: dict[str, dict[str, type[EncryptedLayer]]] = {
    "sealed": LAYER_TYPE_CLASSES,
    "working_set": WORKING_SET_LAYER_TYPE_CLASSES,
}


def _layer_plan(config, classes: dict[str, type[EncryptedLayer]] = LAYER_TYPE_CLASSES
                ) -> list[tuple[type[EncryptedLayer], dict]]:
    """The class and init arguments of each cached layer of ``config``.

    transformers' ``get_layer_types_and_kwargs`` gives the layer types and their init kwargs: one dict
    shared by all layers up to 5.18, one dict per layer from 5.19. Any layer type not in
    ``LAYER_TYPE_CLASSES`` (linear attention, compressed, shared or dummy layers) is refused here, before
    any layer exists."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layer_types = list(layer_types)
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [layer_kwargs] * len(layer_types)
    if len(layer_kwargs) != len(layer_types) or not layer_types:
        raise ValueError(f"this config describes {len(layer_types)} cached layer(s) with {len(layer_kwargs)} "
                         "set(s) of layer arguments; EncryptedCache cannot lay out its layers")
    plan: list[tuple[type[EncryptedLayer], dict]] = []
    for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
        cls = classes.get(kind)
        if cls is None:
            raise ValueError(f"layer {i} is {kind!r}: EncryptedCache supports full, sliding-window and chunked "
                             "attention layers only")
        if cls.is_sliding:
            w = kw.get("sliding_window")
            try:
                w = check_int("sliding window", w, 1)
            except (TypeError, ValueError):     # a model config's value, not a caller's argument: ValueError
                raise ValueError(f"layer {i} is {kind!r} with sliding window {w!r}; a positive int is needed") \
                    from None
            plan.append((cls, {"sliding_window": w}))
        else:
            plan.append((cls, {}))
    return plan


class EncryptedCache(SaveFiles, Cache):
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
    tensors' device). ``mode``: ``"sealed"`` (default: only ciphertext is
    stored, every update decrypts the layer) or ``"working_set"`` (plaintext
    kept on the device while generating, sealed as written; ``release()`` /
    ``generating()`` drop it).
    """

    def __init__(self, config, sessions: TenantSession | Sequence[TenantSession], audit: KVAuditLog | None = None,
                 policy: KeyRotationPolicy | None = None, backend: CryptoBackend | None = None,
                 merge_segments: bool = True, max_merged_positions: int = 4096, merge_min_segments: int = 8,
                 rows_per_session: int | None = None, mode: str = "sealed", **unsupported):
        refuse_unsupported(type(self).__name__, config, unsupported)
        distinct, prompt = session_slots(sessions)
        if policy is not None and not isinstance(policy, KeyRotationPolicy):
            raise TypeError(f"policy must be a KeyRotationPolicy, got {type(policy).__name__}")
        check_backend_argument(backend)
        if audit is not None and not (hasattr(audit, "emit") and hasattr(audit, "emit_per_position")):
            raise TypeError("audit must be a KVAuditLog (or None)")
        if not isinstance(merge_segments, bool):
            raise TypeError("merge_segments must be a bool")
        max_merged_positions = check_int("max_merged_positions", max_merged_positions, 1)
        merge_min_segments = check_int("merge_min_segments", merge_min_segments, 2)
        if rows_per_session is not None:
            rows_per_session = check_int("rows_per_session", rows_per_session, 1)
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        plan = _layer_plan(config, MODES[mode])
        self.mode = mode

        self._sessions: list[TenantSession] = distinct    # session slots, in order of first appearance
        self.policy = policy
        self._ctx = LayerContext(self._sessions, prompt, rows_per_session,
                                 MergeSettings(merge_segments, max_merged_positions, merge_min_segments),
                                 CacheAuditor(audit, self._sessions), Scratch(self), backend)
        super().__init__(layers=[cls(self._ctx, i, **kw) for i, (cls, kw) in enumerate(plan)])
        self._closed: set[int] = set()
        self._copies: weakref.WeakSet[EncryptedCache] = weakref.WeakSet([self])   # this cache and its deep copies
        self._watch_sessions()

    def _watch_sessions(self) -> None:
        """Have every session tell this cache when it closes or erases an epoch's key (held weakly), and
        have the layers run the rotation policy before each update."""
        watch_sessions(self, self._sessions)
        run = weakref.WeakMethod(self._run_rotation_policy)

        def rotation_policy() -> None:
            method = run()
            if method is not None:
                method()
        self._ctx.rotation_policy = rotation_policy

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
        new._sessions = list(self._sessions)
        # a scratch of its own (the original's plaintext is not copied), zeroed when the copy is dropped
        new._ctx = self._ctx.copy_for(new._sessions, Scratch(new))
        new.layers = [layer.copy_for(new._ctx) for layer in self.layers]
        memo.update({id(a): b for a, b in zip(self.layers, new.layers)})
        shared = {"policy": self.policy, "_copies": self._copies}
        for name, value in self.__dict__.items():
            if name in shared:
                new.__dict__[name] = shared[name]
            elif name not in ("layers", "_sessions", "_ctx"):
                new.__dict__[name] = copy.deepcopy(value, memo)
        self._copies.add(new)
        new._watch_sessions()
        return new

    # ---- settings and state --------------------------------------------------------------------------------
    @property
    def sessions(self) -> list[TenantSession]:
        """The distinct sessions of this cache."""
        return list(self._sessions)

    @property
    def audit(self) -> KVAuditLog | None:
        return self._ctx.auditor.log

    @property
    def merge_segments(self) -> bool:
        return self._ctx.merge.enabled

    @property
    def max_merged_positions(self) -> int:
        return self._ctx.merge.max_positions

    @property
    def merge_min_segments(self) -> int:
        return self._ctx.merge.min_segments

    @property
    def rows_per_session(self) -> int | None:
        return self._ctx.rows_per_session

    @property
    def backend(self) -> CryptoBackend | None:
        """The backend the layers use (None until the first update chooses one by device, if none was given)."""
        return self._ctx.backend

    @property
    def row_session_slots(self) -> np.ndarray | None:
        """The session slot of each batch row (an index into ``sessions``), None before the first update."""
        rows = self._ctx.row_slots
        return None if rows is None else rows.copy()

    @property
    def _scratch(self) -> torch.Tensor | None:
        return self._ctx.scratch.tensor

    # ---- session hooks --------------------------------------------------------------------------------------
    def _run_rotation_policy(self) -> None:
        """Rotate every session of this cache's rows that the policy says is due."""
        if self.policy is None:
            return
        row_slots = self._ctx.row_slots
        used = range(len(self._sessions)) if row_slots is None else np.unique(row_slots).tolist()
        for slot in used:
            s = self._sessions[slot]
            if not s.is_valid():    # nothing to rotate: the update itself is refused (and recorded)
                continue
            fire, _ = self.policy.should_rotate(s)
            if fire:
                self._rotate(slot)

    def _on_epoch_retired(self, session: TenantSession, epoch: int) -> None:
        """The session erased an epoch's key: drop this cache's copy too, so chunks of that epoch stop opening."""
        dropped = False
        for slot, s in enumerate(self._sessions):
            if s is session and self._ctx.drop_keys(slot, epoch):
                dropped = True
        if dropped:
            self._ctx.forget_backend_keys()

    def _on_session_closed(self, session: TenantSession) -> None:
        # the last layer read may be this session's rows in the clear: the scratch goes first. Everything is
        # erased before anything is recorded, whatever the log raises (its failure is raised at the end)
        self.wipe_scratch()
        auditor, done = self._ctx.auditor, Cleanup()
        slots = [slot for slot, s in enumerate(self._sessions) if s is session]
        layers = [layer for layer in self.layers if layer.is_initialized]
        for slot in slots:
            self._closed.add(slot)
            self._ctx.drop_keys(slot)
            with done.step():
                self._ctx.forget_backend_keys()
            for layer in layers:
                with done.step():
                    layer.shred_rows(layer.rows_of(slot))
        for slot, layer in ((slot, layer) for slot in slots for layer in layers):
            rows = layer.rows_of(slot)
            with done.step():
                auditor.rows(Op.CLOSE, layer.layer_idx, np.full(rows.size, slot), rows, now=True,
                             pos_start=layer.first_position, pos_count=layer.cumulative_length - layer.first_position)
        for slot in slots if not layers else ():
            with done.step():
                auditor.session(Op.CLOSE, slot, now=True)
        done.done()

    # ---- atomic operations -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _atomic(self):
        """An operation over all layers: it completes, or every layer and the row map are left exactly as
        they were. Its records are written only once it has completed; refusals and isolation violations
        are written at once, whatever follows."""
        auditor = self._ctx.auditor
        if auditor.holding:       # nested: the outermost one commits or restores
            yield
            return
        saved = [(layer, layer.snapshot()) for layer in self.layers if layer.is_initialized]
        rows = None if self._ctx.row_slots is None else self._ctx.row_slots.copy()
        auditor.begin()
        try:
            yield
            auditor.commit()
        except BaseException:
            auditor.abandon()
            for layer, snap in saved:
                layer.restore(snap)
            self._ctx.row_slots = rows
            raise

    # ---- release and restore ----------------------------------------------------------------------
    def _slots_of(self, session: TenantSession | None) -> list[int] | None:
        return slots_of_session(self._sessions, session)

    def release(self, session: TenantSession | None = None) -> None:
        """Zero and drop the plaintext of every row (or of ``session``'s rows): only ciphertext remains.
        One RELEASE record per layer and row. The working-set mode opens it again, verified, at the next
        update or ``restore()``; in the sealed mode the plaintext scratch is wiped."""
        slots = self._slots_of(session)
        if self._ctx.closed:
            return
        self.wipe_scratch()
        done = Cleanup()        # every layer drops its plaintext whatever the log raises (raised at the end)
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            rows = (np.arange(layer.row_session_slots.size) if slots is None
                    else np.flatnonzero(np.isin(layer.row_session_slots, slots)))
            with done.step():
                layer.release_rows(rows)
        done.done()

    @property
    def released(self) -> bool:
        """Whether some row's plaintext is released (working-set mode; the sealed mode holds none)."""
        return any(getattr(layer, "released", False) for layer in self.layers)

    def restore(self) -> None:
        """Open the released rows of every layer once (working-set mode): every tag is verified before
        any plaintext is kept (DECRYPT records). A failure raises DecryptionError, and every layer is left
        released; nothing is returned. A device backend's deferred failures are checked here."""
        if self._ctx.closed:
            raise ValueError("this EncryptedCache is closed")
        try:
            with self._atomic():
                for layer in self.layers:
                    layer.open_released()
            self._ctx.check_backend()
        except BaseException:
            with Cleanup().step():  # the failure raised is this one; a failing log's stays in the log
                self.release()
            raise

    @contextlib.contextmanager
    def generating(self, session: TenantSession | None = None):
        """``with cache.generating(): model.generate(..., past_key_values=cache)``: the plaintext of every
        row (or of ``session``'s rows) is released when the block ends, however it ends."""
        self._slots_of(session)
        try:
            yield self
        finally:
            self.release(session)

    # ---- scratch --------------------------------------------------------------------------------
    def wipe_scratch(self) -> None:
        """Zero the plaintext scratch (the K/V views last returned become zeros)."""
        self._ctx.scratch.wipe()

    def close(self) -> None:
        """Zero and release the plaintext scratch and every layer's ciphertext; the cache cannot be used
        afterwards (ValueError). The sessions stay open: closing them is their owner's call. A cache that is
        dropped without ``close()`` has its scratch zeroed when it is garbage-collected."""
        self._ctx.closed = True
        self._ctx.scratch.release()
        for layer in self.layers:
            layer.reset()
        self._ctx.row_slots = None
        self._ctx.forget_backend_keys()     # key schedules the backend keeps (on a GPU: device memory)

    def check(self) -> None:
        """Synchronisation point: raise a failure a device backend recorded since the last check
        (the scratch is wiped first). The host backend raises inside ``update`` already."""
        try:
            self._ctx.check_backend()
        except DecryptionError:
            with Cleanup().step():  # wipes the scratch; a working set that may hold a failed chunk is dropped
                self.release()
            raise

    # ---- rotation ---------------------------------------------------------------------------------
    def rotate(self, tenant: "str | TenantSession") -> list[int]:
        """Rotate the session(s) of ``tenant`` (a tenant id or a session) now: re-seal their chunks under the
        new epoch and retire the old keys. Returns the new epoch of each rotated session."""
        hits = tenant_slots(self._sessions, tenant)
        return [self._rotate(slot) for slot in hits]

    def _rotate(self, slot: int) -> int:
        s = self._sessions[slot]
        try:
            new = s.rotate_key()
            # all layers of every copy re-sealed, or none: until the old epochs are retired below, they
            # still open. Copies made by deepcopy share the session: their chunks move to the new epoch
            # too, before the old keys are retired, so a rotation in one copy leaves the others readable.
            caches = [self, *(c for c in list(self._copies) if c is not self)]
            with contextlib.ExitStack() as stack:
                for cache in caches:
                    stack.enter_context(cache._atomic())
                for cache in caches:
                    for other_slot, other in enumerate(cache._sessions):
                        if other is s and other_slot not in cache._closed:
                            cache._reseal_session(other_slot, new)
                self._ctx.auditor.session(Op.ROTATE, slot, epoch=new)
        except SessionExpiredError:
            for layer in self.layers:
                self._ctx.refuse(layer.layer_idx, layer.row_session_slots, Op.ROTATE, layer.first_position,
                                 layer.cumulative_length - layer.first_position, only=slot)
            raise
        for e in s.live_epochs:
            if e != new:
                s.retire_epoch(e)     # the retire hook drops this cache's key copy and the backend's schedules
        return new

    def _reseal_session(self, slot: int, new: int) -> None:
        """Re-seal every live chunk of session slot ``slot`` under its current epoch ``new`` (recorded per layer)."""
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            rows = layer.rows_of(slot)
            first = layer.reseal_rows(rows)
            self._ctx.auditor.rows(Op.ROTATE, layer.layer_idx, np.full(rows.size, slot), rows,
                                   pos_start=layer.first_position,
                                   pos_count=layer.cumulative_length - layer.first_position,
                                   nonce_counter=first.astype(np.uint64), epoch=new)

    # ---- Cache API over all layers ------------------------------------------------------------------
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # an opaque region under torch.compile: the chunk table, nonces and records are host state
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def batch_repeat_interleave(self, repeats: int) -> None:
        repeats = check_int("repeats", repeats, 1)
        with self._atomic():
            if self._ctx.row_slots is not None:
                self._ctx.row_slots = np.repeat(self._ctx.row_slots, int(repeats))
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        with self._atomic():
            for layer in self.layers:
                if layer.is_initialized:
                    idx = layer.row_index(indices, "indices")
                    if self._ctx.row_slots is not None:
                        self._ctx.row_slots = self._ctx.row_slots[idx]
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
        self._ctx.row_slots = None
        self.wipe_scratch()

    def export_entries(self, layer_idx: int, row: int) -> list[EncryptedEntry]:
        """The chunks of one row of one layer as EncryptedEntry objects (envelope v1), in position order."""
        layer_idx = check_int("layer_idx", layer_idx, 0, len(self.layers) - 1)
        return self.layers[layer_idx].export_entries(row)

    def __repr__(self) -> str:
        return f"EncryptedCache(mode={self.mode!r}, sessions={len(self._sessions)}, layers={self.layers})"


guard_continuous_batching(EncryptedCache)
