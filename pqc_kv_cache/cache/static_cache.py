"""StaticEncryptedCache: transformers' ``StaticCache`` with every written position sealed as it is written.

The static form of the working-set mode, for ``torch.compile``: the plaintext K/V live in preallocated
buffers on the compute device (exactly as ``StaticCache`` holds them), and every position written is
sealed at once, by a ``torch.library`` operator, into a preallocated ciphertext arena where each (row,
position) has a fixed slot. Nonce counters and audit record numbers are taken by the operator from
tensors (ranges the host reserved from each session ahead of time; a record buffer with its own head), so
a decode step has no host bookkeeping and ``torch.compile(model.forward, fullgraph=True)`` traces it
without a graph break.

Between steps, outside any compiled region, the host refills the nonce ranges, drains the record buffer
into the ``KVAuditLog`` and raises what failed: all three are ``check()``. A seal with no counter left,
for a closed or expired session, or with no room for its records fails closed (the slot holds zeros,
nothing is sealed twice) and is raised at ``check()``.

The cache builds one layer per cached layer of the config through a layer-type table
(``STATIC_LAYER_TYPE_CLASSES``) and loops over its layers; the layers use the cache only through a
``StaticContext``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Sequence

import numpy as np
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from .._checks import check_int
from .._cleanup import Cleanup
from ..audit.records import Op
from ..envelope import EncryptedEntry
from ..errors import DecryptionError
from ..session import TenantSession
from .context import check_backend_argument, session_slots, slots_of_session, watch_sessions
from .guards import guard_continuous_batching, refuse_unsupported
from .static_context import StaticContext
from .static_layer import StaticEncryptedLayer, StaticSealing, StaticSlidingEncryptedLayer
from .static_persistence import StaticSaveFiles
from .static_rows import StaticRowOps

if TYPE_CHECKING:   # annotations only
    from ..audit.log import KVAuditLog
    from ..backends.base import CryptoBackend

__all__ = ["StaticEncryptedCache", "STATIC_LAYER_TYPE_CLASSES"]

#: A config's layer type -> the static layer class that caches it (the sliding one takes the layer's window).
STATIC_LAYER_TYPE_CLASSES: dict[str, type[StaticSealing]] = {
    "full_attention": StaticEncryptedLayer,
    "sliding_attention": StaticSlidingEncryptedLayer,
    "chunked_attention": StaticSlidingEncryptedLayer,
}


def _static_plan(config, max_cache_len: int) -> list[tuple[type[StaticSealing], dict]]:
    """The class and init arguments of each cached layer; any other layer type is refused before any exists."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    layer_types = list(layer_types)
    if isinstance(layer_kwargs, dict):
        layer_kwargs = [layer_kwargs] * len(layer_types)
    if not layer_types or len(layer_kwargs) != len(layer_types):
        raise ValueError("this config does not describe one set of arguments per cached layer; "
                         "StaticEncryptedCache cannot lay out its layers")
    plan = []
    for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
        cls = STATIC_LAYER_TYPE_CLASSES.get(kind)
        if cls is None:
            raise ValueError(f"layer {i} is {kind!r}: StaticEncryptedCache supports full, sliding-window and "
                             "chunked attention layers only")
        args = {"max_cache_len": max_cache_len}
        if cls.is_sliding:
            w = kw.get("sliding_window")
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise ValueError(f"layer {i} is {kind!r} with sliding window {w!r}; a positive int is needed")
            args["sliding_window"] = w
        plan.append((cls, args))
    return plan


class StaticEncryptedCache(StaticSaveFiles, StaticRowOps, Cache):
    """A transformers ``Cache`` for ``torch.compile``: ``StaticCache``'s plaintext, every position sealed.

    ``sessions``, ``rows_per_session``, ``audit`` and ``backend`` as for ``EncryptedCache``;
    ``max_cache_len`` as for ``StaticCache``. ``audit_records``: records the buffer holds between two
    drains (default: the ENCRYPT and READ records of a whole sequence of ``max_cache_len``).
    ``nonce_reserve``: nonce counters reserved per row ahead of time (default: ``max_cache_len`` per layer).

    Devices: CPU tensors with any backend; tensors on another device (CUDA) with a backend that seals and
    opens a layer there (``seal_static`` and ``open_static``: the CUDA backend; any other is refused with a
    ValueError at the first update). The path is the backend's, whatever the tensors' device (the CPU twin of
    the CUDA backend runs it on CPU tensors). On a GPU the seal and the open an update does never wait for
    the device; ``check``, ``release`` / ``restore``, ``save`` / ``load``, ``crop``, ``reorder_cache``,
    ``rotate`` and deepcopy read state back to the host and wait for it (call them between steps). The GPU
    path is unverified: it has not run on a GPU."""

    def __init__(self, config, sessions: TenantSession | Sequence[TenantSession], max_cache_len: int,
                 audit: KVAuditLog | None = None, backend: CryptoBackend | None = None,
                 rows_per_session: int | None = None, audit_records: int | None = None,
                 nonce_reserve: int | None = None, **unsupported):
        refuse_unsupported(type(self).__name__, config, unsupported)
        distinct, prompt = session_slots(sessions)
        check_backend_argument(backend)
        if audit is not None and not hasattr(audit, "emit_records"):
            raise TypeError("audit must be a KVAuditLog (or None)")
        max_cache_len = check_int("max_cache_len", max_cache_len, 1)
        if rows_per_session is not None:
            rows_per_session = check_int("rows_per_session", rows_per_session, 1)
        if audit_records is not None:
            audit_records = check_int("audit_records", audit_records, 1)
        if nonce_reserve is not None:
            nonce_reserve = check_int("nonce_reserve", nonce_reserve, 1)
        plan = _static_plan(config, max_cache_len)
        self._sessions: list[TenantSession] = distinct
        self._max_cache_len = max_cache_len
        self._plan = plan
        self._copies = weakref.WeakSet([self])     # this cache and its deepcopies (a rotation re-seals all)
        self._ctx = StaticContext(self._sessions, prompt, rows_per_session, audit,
                                  backend, len(plan), max_cache_len, audit_records, nonce_reserve)
        super().__init__(layers=[cls(self._ctx, i, **kw) for i, (cls, kw) in enumerate(plan)])
        self._watch()

    def _watch(self) -> None:
        watch_sessions(self, self._sessions)

    # ---- settings and state ---------------------------------------------------------------------------
    @property
    def max_cache_len(self) -> int:
        """Positions each row holds (transformers up to 5.18 has a read-only, deprecated property of this name
        on ``Cache``)."""
        return self._max_cache_len

    @property
    def sessions(self) -> list[TenantSession]:
        return list(self._sessions)

    @property
    def audit(self) -> KVAuditLog | None:
        return self._ctx.auditor.log

    @property
    def backend(self) -> CryptoBackend | None:
        return self._ctx.backend

    @property
    def row_session_slots(self) -> np.ndarray | None:
        rows = self._ctx.row_slots
        return None if rows is None else rows.copy()

    @property
    def nonces_remaining(self) -> np.ndarray:
        """Counters left in each session slot's reserved range (empty before the first update)."""
        return np.zeros(0, dtype=np.int64) if self._ctx.nonces is None else self._ctx.nonces.remaining()

    # ---- between steps ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Synchronisation point, outside any compiled region: drain the audit records into the log, refill
        the sessions' nonce ranges, and raise the first seal or open that failed since the last check
        (SealFailedError / DecryptionError; a failed open releases the plaintext first)."""
        try:
            self._ctx.check()
        except DecryptionError:
            self.release()
            raise

    def drain_audit(self) -> int:
        """Hand the records the operators wrote to the audit log; returns how many."""
        return self._ctx.drain()

    def refill_nonces(self) -> None:
        """Top up every live session's reserved nonce range (``check()`` does it too)."""
        self._ctx.refill()

    # ---- release and restore --------------------------------------------------------------------------
    def _rows_of_session(self, session: TenantSession | None) -> np.ndarray | None:
        """The session slots of ``session`` (None: every row's); TenantIsolationError when it has none here."""
        slots = slots_of_session(self._sessions, session)
        return None if slots is None else np.array(slots, dtype=np.int64)

    def release(self, session: TenantSession | None = None) -> None:
        """Zero the plaintext of every row (or of ``session``'s rows) of every layer in place (the buffers stay,
        at the same addresses): only ciphertext remains. One RELEASE record per layer and row released (a row
        released already is not released or recorded again). The next update or ``restore()`` opens the
        released rows, and only those. TenantIsolationError, with nothing released, for a session that is not
        one of this cache's."""
        slots = self._rows_of_session(session)
        if self._ctx.closed or not self._ctx.started:
            return
        rows = (np.arange(self._ctx.row_slots.size) if slots is None
                else np.flatnonzero(np.isin(self._ctx.row_slots, slots)))
        self._release_rows([rows] * len(self.layers))

    def _release_rows(self, per_layer: list[np.ndarray]) -> None:
        """Release ``per_layer[i]`` (row indices) of layer ``i``; RELEASE per layer and row released now. Every
        layer releases its rows whatever the log raises (the first failure is raised at the end)."""
        done = Cleanup()
        with done.step():
            self._ctx.drain()
        for layer, rows in zip(self.layers, per_layer):
            if layer.is_initialized and rows.size:
                new = layer.release_rows(rows)
                if new.size:
                    with done.step():
                        self._record_rows(Op.RELEASE, layer, self._ctx.row_slots[new], new)
        done.done()

    @property
    def released(self) -> bool:
        """Whether some row's plaintext is released (in some layer)."""
        return any(layer.released for layer in self.layers)

    def restore(self) -> None:
        """Open the released rows of every layer once, every tag verified (DECRYPT records for those rows only;
        rows still held are not opened again). A failure raises DecryptionError and leaves every layer
        released."""
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        self._ctx.drain()
        for layer in self.layers:
            layer.open_released()
        self.check()

    @contextlib.contextmanager
    def generating(self, session: TenantSession | None = None):
        """``with cache.generating(): model.generate(..., past_key_values=cache)``: the plaintext of every row
        (or of ``session``'s rows) is released when the block ends, however it ends (after a ``check()`` when
        it ends normally)."""
        self._rows_of_session(session)
        try:
            yield self
            self.check()
        finally:
            self.release(session)

    def _record_rows(self, op: Op, layer, slots: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        """One ``op`` record per row (default: all) of ``layer``, covering the positions it holds."""
        if rows is None:
            slots, rows = self._ctx.row_slots, np.arange(self._ctx.row_slots.size)
        end = int(layer.get_seq_length())
        first = max(0, end - layer.max_cache_len)
        self._ctx.auditor.rows(op, layer.layer_idx, slots, rows, now=True, pos_start=first, pos_count=end - first)

    # ---- session hooks ----------------------------------------------------------------------------------
    def _on_epoch_retired(self, session: TenantSession, epoch: int) -> None:
        for slot, s in enumerate(self._sessions):
            if s is session:
                self._ctx.forget_keys(slot, epoch)

    def _on_session_closed(self, session: TenantSession) -> None:
        """Shred the session's rows in every layer (plaintext and ciphertext zeroed), revoke its nonce range
        so that later seals of its rows fail closed, and record CLOSE per layer and row."""
        for slot, s in enumerate(self._sessions):
            if s is not session:
                continue
            self._ctx.forget_keys(slot)
            if not self._ctx.started:
                self._ctx.auditor.session(Op.CLOSE, slot, now=True)
                continue
            self._ctx.nonces.revoke(slot)
            rows = self._ctx.rows_of(slot)
            self._ctx.drain()
            for layer in self.layers:
                if layer.is_initialized:
                    layer.shred_rows(rows)
                    self._record_rows(Op.CLOSE, layer, np.full(rows.size, slot), rows)

    # ---- Cache API -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero every layer (plaintext, ciphertext, slots) for a new sequence; records drained, nonce ranges
        refilled, failures since the last check still raised by the next ``check()``."""
        self._ctx.drain()
        super().reset()
        self._ctx.refill()

    def close(self) -> None:
        """Drain the records, zero every layer, and unregister the operators: the cache cannot be used
        afterwards (a compiled step that still calls it raises)."""
        if self._ctx.closed:
            return
        self._ctx.drain()
        for layer in self.layers:
            layer.reset()
        self._ctx.stop()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("StaticEncryptedCache holds a fixed batch; pass rows_per_session= and expand the batch "
                         "before the first update")

    def batch_select_indices(self, indices) -> None:
        raise ValueError("StaticEncryptedCache holds a fixed batch and does not select rows")

    def export_entries(self, layer_idx: int, row: int) -> list[EncryptedEntry]:
        """The chunks one row of one layer holds, as EncryptedEntry objects (envelope v1), in position order."""
        layer_idx = check_int("layer_idx", layer_idx, 0, len(self.layers) - 1)
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            return []
        row = check_int("row", row, 0, self._ctx.row_slots.size - 1)
        return layer.export_entries(row, self._sessions[int(self._ctx.row_slots[row])])

    def __repr__(self) -> str:
        return f"StaticEncryptedCache(max_cache_len={self.max_cache_len}, sessions={len(self._sessions)}, " \
               f"layers={self.layers})"


guard_continuous_batching(StaticEncryptedCache)
