"""What a layer may use of its cache: session slots, key slots and the backend, the scratch, the auditor.

A layer is handed one ``LayerContext``; it holds no reference to the cache and
reads none of its members. The cache keeps the context's state (its sessions,
its row map, its key slots) and reaches its layers only through their public
methods. This module is also the one place where the cache speaks the backend
contract (``backends.base``): key slots, chunk tables, audit contexts, backend
selection, per-chunk status, ``check`` and key forgetting.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np
import torch

from ..audit.records import Op, Status
from ..backends import select_backend
from ..backends.base import (AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot, RowsOpen,
                             RowsSeal)
from ..envelope import session_tag, tenant_tag
from ..errors import DecryptionError, TenantIsolationError
from ..session import TenantSession
from .audit import CacheAuditor
from .clearing import zero, zero_at_collection

__all__ = ["LayerContext", "MergeSettings", "Scratch", "check_backend_argument", "deferred_status",
           "row_slots_for_batch"]

_MEMO_CAP = 256     # remembered slot groupings per context (cleared when full)


def check_backend_argument(backend) -> None:
    """TypeError unless ``backend`` is a CryptoBackend or None."""
    if backend is not None and not isinstance(backend, CryptoBackend):
        raise TypeError(f"backend must be a CryptoBackend, got {type(backend).__name__}")


def session_slots(sessions) -> tuple[list[TenantSession], np.ndarray]:
    """The distinct sessions of a cache's ``sessions`` argument (one session, or a non-empty list; each valid
    now), in order of first appearance, and the slot of each session as given (TypeError for anything else,
    SessionExpiredError / SessionClosedError for a session that cannot be used)."""
    if isinstance(sessions, TenantSession):
        sessions = [sessions]
    if not isinstance(sessions, (list, tuple)) or not sessions:
        raise TypeError("sessions must be a TenantSession or a non-empty list of them")
    for s in sessions:
        if not isinstance(s, TenantSession):
            raise TypeError(f"sessions must hold TenantSession objects, got {type(s).__name__}")
        s.check_valid()
    distinct: list[TenantSession] = []
    prompt = []
    for s in sessions:
        hit = next((i for i, known in enumerate(distinct) if known is s), None)
        if hit is None:
            hit = len(distinct)
            distinct.append(s)
        prompt.append(hit)
    return distinct, np.array(prompt, dtype=np.int64)


def watch_sessions(owner, sessions: Sequence[TenantSession]) -> None:
    """Have each session call ``owner._on_session_closed(session)`` when it closes and
    ``owner._on_epoch_retired(session, epoch)`` when it erases an epoch's key, holding ``owner`` weakly."""
    me = weakref.ref(owner)
    for s in sessions:
        s.on_close(lambda sess, me=me: me() is not None and me()._on_session_closed(sess))
        s.on_retire(lambda sess, e, me=me: me() is not None and me()._on_epoch_retired(sess, e))


def slots_of_session(sessions: Sequence[TenantSession], session: TenantSession | None) -> list[int] | None:
    """The slots in ``sessions`` of ``session`` (None for None: every row's); TypeError for anything but a
    TenantSession or None, TenantIsolationError when it has none here."""
    if session is None:
        return None
    if not isinstance(session, TenantSession):
        raise TypeError(f"session must be a TenantSession or None, got {type(session).__name__}")
    return tenant_slots(sessions, session)


def tenant_slots(sessions: Sequence[TenantSession], tenant: "str | TenantSession") -> list[int]:
    """The slots in ``sessions`` of ``tenant`` (a tenant id, or a session: that session only);
    TenantIsolationError when it has none, TypeError for anything else."""
    if isinstance(tenant, TenantSession):
        hits = [i for i, s in enumerate(sessions) if s is tenant]
    elif isinstance(tenant, str):
        hits = [i for i, s in enumerate(sessions) if s.tenant_id == tenant]
    else:
        raise TypeError(f"tenant must be a tenant id or a TenantSession, got {type(tenant).__name__}")
    if not hits:
        raise TenantIsolationError(f"tenant {tenant if isinstance(tenant, str) else tenant.tenant_id!r} "
                                   "has no session in this cache")
    return hits


def row_slots_for_batch(prompt_slots: np.ndarray, rows_per_session: int | None, batch: int) -> np.ndarray:
    """The session slot of each of ``batch`` rows, from the slots of the sessions as given and
    ``rows_per_session`` (ValueError for a batch that matches neither: a row's tenant is never guessed)."""
    p, per = prompt_slots, rows_per_session
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
    return rows


def deferred_status(status):
    """The per-chunk status of a decrypt when it is still on the device (None when the host knows it:
    then every failure has already been raised)."""
    return None if status is None or not status.deferred else status.device


def _zero_scratch(box: list) -> None:
    """Zero and drop a plaintext scratch (at ``close()``, and when its cache is garbage-collected)."""
    s, box[0] = box[0], None
    if s is not None:
        zero_at_collection([s])


class Scratch:
    """The one plaintext buffer of a cache, shared by all its layers, laid out ``[batch, 2, heads, seq, dim]``.

    The buffer lives in a box shared with a finalizer that zeroes it when the owning cache is collected
    (the finalizer holds no reference to the cache, so it cannot keep it alive)."""

    __slots__ = ("_box", "_guard", "_owner", "_typed")

    def __init__(self, owner: object):
        self._box: list = [None]
        self._typed: tuple = (None, None, None)     # (buffer, dtype, the buffer viewed as dtype): every step asks
        self._owner = weakref.ref(owner)
        self._guard = weakref.finalize(owner, _zero_scratch, self._box)

    @property
    def tensor(self) -> torch.Tensor | None:
        return self._box[0]

    def views(self, batch: int, seq: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device):
        """K and V views ``[batch, heads, seq, dim]`` of the scratch (grown, zeroing the old one, if needed)."""
        need = batch * seq * 2 * heads * dim * dtype.itemsize
        s = self._box[0]
        if type(device) is not torch.device:
            device = torch.device(device)
        if s is None or s.numel() < need or s.device != device:
            if s is not None:
                zero(s)
            cap = max(need, 2 * s.numel() if s is not None and s.device == device else 0, 1 << 16)
            s = self._box[0] = torch.empty(cap, dtype=torch.uint8, device=device)
            owner = self._owner()
            if not self._guard.alive and owner is not None:
                self._guard = weakref.finalize(owner, _zero_scratch, self._box)
        typed = self._typed
        if typed[0] is not s or typed[1] != dtype:
            size = dtype.itemsize
            typed = self._typed = (s, dtype, s[:s.numel() // size * size].view(dtype))
        t = typed[2]
        # [batch, 2, heads, seq, dim] from the buffer's start: K at index 0 of the second axis, V at index 1
        plane = heads * seq * dim
        strides = (2 * plane, seq * dim, dim, 1)
        at = t.storage_offset()
        return (t.as_strided((batch, heads, seq, dim), strides, at),
                t.as_strided((batch, heads, seq, dim), strides, at + plane))

    def wipe(self) -> None:
        """Zero the scratch (the K/V views last returned become zeros)."""
        if self._box[0] is not None:
            zero(self._box[0])

    def release(self) -> None:
        """Zero and drop the scratch."""
        self._typed = (None, None, None)
        _zero_scratch(self._box)


class MergeSettings:
    """How a cache's layers merge decoded segments (see ``EncryptedLayer``)."""

    __slots__ = ("enabled", "max_positions", "min_segments")

    def __init__(self, enabled: bool, max_positions: int, min_segments: int):
        self.enabled, self.max_positions, self.min_segments = enabled, max_positions, min_segments


class _Groups(list):
    """``LayerContext._groups``'s list, with ``order``: the slot of each chunk, in chunk order."""

    order: list


class LayerContext:
    """Everything a layer of one cache may use.

    ``sessions``: the cache's distinct sessions; a *session slot* is an index into it. ``row_slots``: the
    session slot of each batch row, fixed by the first update (None before). ``auditor``: the cache's
    record sites. ``scratch``: the plaintext scratch. ``rotation_policy``: called before each update
    (it may re-seal a session's chunks under a new epoch), set by the cache."""

    def __init__(self, sessions: Sequence[TenantSession], prompt_slots: np.ndarray, rows_per_session: int | None,
                 merge: MergeSettings, auditor: CacheAuditor, scratch: Scratch, backend: CryptoBackend | None):
        self.sessions = sessions
        self.prompt_slots = prompt_slots
        self.rows_per_session = rows_per_session
        self.row_slots: np.ndarray | None = None
        self.merge = merge
        self.auditor = auditor
        self.scratch = scratch
        self.backend = backend
        self.key_slots: dict[tuple[int, int], KeySlot] = {}
        self._group_memo: dict[bytes, list] = {}     # see _groups
        self._epochs_kept: tuple = ((), None)         # see reserve
        self._keys_memo: dict[bytes, list] = {}      # see _keys
        self._seals: dict[int, tuple] = {}           # see rows_seal
        self._opens: dict[int, RowsOpen] = {}        # see rows_open
        self.closed = False
        self.rotation_policy: Callable[[], None] = lambda: None

    # ---- rows and session slots ---------------------------------------------------------------------
    def rows_for_batch(self, batch: int) -> np.ndarray:
        """The session slot of each of ``batch`` rows (fixed by the first layer that asks)."""
        if self.row_slots is not None:
            if self.row_slots.size != batch:
                raise ValueError(f"layers of this cache hold {self.row_slots.size} rows; got a batch of {batch}")
            return self.row_slots.copy()
        rows = row_slots_for_batch(self.prompt_slots, self.rows_per_session, batch)
        self.row_slots = rows
        return rows.copy()

    def before_update(self) -> None:
        """Refuse a closed cache, then run the rotation policy."""
        if self.closed:
            raise ValueError("this EncryptedCache is closed")
        self.rotation_policy()

    def reserve(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fresh nonce counters for chunks sealed by session slots ``slots``: (counter, epoch) per chunk (the
        epoch array may be one kept from an earlier call: read-only)."""
        n_chunks = slots.shape[0]
        if n_chunks == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        sessions = self.sessions
        groups = self._groups(slots)
        if len(groups) == n_chunks:         # one chunk per session slot (a decode step, a session per row)
            pairs = [sessions[slot].reserve(1) for slot in groups.order]
            epochs, counters = zip(*pairs)
            kept = self._epochs_kept
            if kept[0] != epochs:       # the epochs stay from step to step: their array is kept (read-only)
                kept = self._epochs_kept = (epochs, np.array(epochs, dtype=np.int64))
                kept[1].flags.writeable = False
            return np.array(counters, dtype=np.int64), kept[1]
        counter = np.empty(n_chunks, dtype=np.int64)
        epoch = np.empty(n_chunks, dtype=np.int64)
        for slot, where, steps, n in groups:
            e, first = sessions[slot].reserve(n)
            if n == 1:                      # a row of its own session (every decode step): no array maths
                counter[where] = first
            else:
                counter[where] = first + steps
            epoch[where] = e
        return counter, epoch

    def _groups(self, slots: np.ndarray) -> list:
        """(session slot, positions of ``slots`` holding it (an int when one), 0..count-1, count) per distinct
        slot, ascending.
        A layer seals the same row slots step after step: the grouping is computed once per slot array."""
        key = slots.astype(np.int64, copy=False).tobytes()
        groups = self._group_memo.get(key)
        if groups is None:
            order = np.argsort(slots, kind="stable")
            bounds = np.flatnonzero(np.diff(slots[order])) + 1
            groups = _Groups((int(slots[w[0]]), int(w[0]) if w.size == 1 else w, np.arange(w.size, dtype=np.int64),
                              int(w.size)) for w in np.split(order, bounds))
            groups.order = slots.tolist()
            if len(self._group_memo) >= _MEMO_CAP:
                self._group_memo.clear()
            self._group_memo[key] = groups
        return groups

    def check_same_session(self, layer_idx: int, src: np.ndarray, dst: np.ndarray, idx: np.ndarray) -> None:
        """TenantIsolationError (and an ISOLATION_VIOLATION record) if row r (slot ``dst[r]``) would take row
        ``idx[r]`` of slot ``src[r]`` of another session."""
        bad = np.flatnonzero(src != dst)
        if bad.size == 0:
            return
        r = int(bad[0])
        a, b = self.sessions[int(dst[r])], self.sessions[int(src[r])]
        self.auditor.rows(Op.ISOLATION_VIOLATION, layer_idx, dst[bad], bad, status=Status.REFUSED, now=True,
                          nonce_counter=idx[bad].astype(np.uint64))
        raise TenantIsolationError(
            f"reorder would move row {int(idx[r])} (tenant {b.tenant_id!r}) into row {r} "
            f"(tenant {a.tenant_id!r}): rows of different sessions are never mixed")

    def refuse(self, layer_idx: int, row_slots: np.ndarray, op: Op, pos_start: int, pos_count: int,
               only: int | None = None) -> None:
        """Record the refusal of ``op`` on the rows (``row_slots``: each row's slot) whose session is closed or
        expired (status REFUSED, one record per row; ``only``: that slot's rows only), and wipe the scratch,
        which may hold those rows from an earlier read."""
        self.scratch.wipe()
        if not self.auditor.enabled or row_slots.size == 0:
            return
        dead = [slot for slot in np.unique(row_slots).tolist()
                if (only is None or slot == only) and not self.sessions[slot].is_valid()]
        rows = np.flatnonzero(np.isin(row_slots, dead))
        self.auditor.rows(op, layer_idx, row_slots[rows], rows, status=Status.REFUSED, now=True,
                          pos_start=max(int(pos_start), 0), pos_count=max(int(pos_count), 0))

    # ---- keys and the backend contract --------------------------------------------------------------------
    @staticmethod
    def layout(layer_idx: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> ChunkLayout:
        return ChunkLayout(layer_idx, num_heads, head_dim, dtype)

    def backend_for(self, device: torch.device) -> CryptoBackend:
        if self.backend is None:
            self.backend = select_backend(device)
        return self.backend

    def key_slot(self, slot: int, epoch: int) -> KeySlot:
        ks = self.key_slots.get((slot, epoch))
        if ks is None:
            s = self.sessions[slot]
            ks = KeySlot(s.key_for_epoch(epoch), tenant_tag(s.tenant_id), session_tag(s.session_id), epoch)
            self.key_slots[(slot, epoch)] = ks
        return ks

    def drop_keys(self, slot: int, epoch: int | None = None) -> bool:
        """Forget the key slots of ``slot`` (of one ``epoch``, or all); True if any was held."""
        gone = [k for k in self.key_slots if k[0] == slot and (epoch is None or k[1] == epoch)]
        for k in gone:
            del self.key_slots[k]
        if gone:
            self._keys_memo.clear()     # their key lists name forgotten key slots
            self._seals.clear()         # and so may the prepared seals
            self._opens.clear()         # and reads (which keep the key list they were last called with)
        return bool(gone)

    def forget_backend_keys(self) -> None:
        """Let a backend that caches key schedules (the CUDA backend keeps them on the device) drop them,
        so retired or closed keys do not outlive their session's erasure; the prepared seals, which hold key
        slots, go too, and the prepared reads."""
        self._seals.clear()
        self._opens.clear()
        if self.backend is not None:
            self.backend.forget_keys()

    def check_backend(self) -> None:
        """Raise a failure a device backend recorded since the last check for this cache's calls (the
        context is the owner its decrypt calls name; a deep copy has a context of its own)."""
        if self.backend is not None:
            self.backend.check(owner=self)

    def _keys(self, slots: np.ndarray, epoch: np.ndarray, audited: bool, checked: bool = False):
        """Key slots for chunks with these (session slot, epoch): (keys, key index per chunk, AuditContext or
        None). Every session is checked first (``checked``: the caller has just checked each of them, as
        ``reserve`` does): a cached key slot is no licence to use an expired or closed session."""
        if slots.dtype != np.int64:
            slots = slots.astype(np.int64)
        if epoch.dtype != np.int64:
            epoch = epoch.astype(np.int64)
        # the same (slot, epoch) columns come back step after step: their grouping and key list are
        # remembered (the grouping handed out as a copy; forgetting a key slot forgets every list), while
        # the session checks are done on every call
        memo_key = slots.tobytes() + epoch.tobytes()
        memo = self._keys_memo.get(memo_key)
        if memo is None:
            comb = slots << 32 | epoch
            uniq, inv = np.unique(comb, return_inverse=True)
            pairs = [(int(u) >> 32, int(u) & 0xFFFFFFFF) for u in uniq.tolist()]
            inv = inv.reshape(-1).astype(np.int64)
            keys = [self.key_slot(slot, e) for slot, e in pairs]
            memo = [pairs, list(dict.fromkeys(slot for slot, _ in pairs)), inv, None, keys]
            if len(self._keys_memo) >= _MEMO_CAP:
                self._keys_memo.clear()
            self._keys_memo[memo_key] = memo
        else:
            keys = memo[4]
        pairs, distinct, inv, ctx = memo[:4]
        if not checked:
            sessions = self.sessions
            for slot in distinct:
                sessions[slot].check_valid()
        if not (audited and self.auditor.enabled):
            return keys, inv.copy(), None
        if ctx is None:
            # kept with the grouping: the backend keeps its record batches for these key slots in it
            idx = [self.auditor.ids(slot) for slot, _ in pairs]
            ctx = memo[3] = AuditContext(self.auditor.log, np.array([t for t, _ in idx], dtype=np.uint32),
                                         np.array([s for _, s in idx], dtype=np.uint32))
        return keys, inv.copy(), ctx

    def encrypt(self, backend: CryptoBackend, layout: ChunkLayout, slots, epoch, src_row, pos_start, pos_count,
                io_start, counter, offset, k_src, v_src, arena: torch.Tensor, audited: bool) -> None:
        """Seal chunks (``src_row``, ``io_start``.. of ``k_src``/``v_src``) under the keys of (``slots``,
        ``epoch``) and nonce ``counter`` into ``arena`` at ``offset``. ``counter`` and ``epoch`` come from
        ``reserve(slots)``, which has just checked every one of these sessions."""
        keys, key_idx, ctx = self._keys(slots, epoch, audited, checked=True)
        table = ChunkTable(key_idx, np.asarray(src_row, dtype=np.int64), pos_start, pos_count, io_start,
                           counter, offset)
        backend.encrypt_chunks(keys, layout, table, k_src, v_src, arena, ctx)

    def rows_seal(self, layer_idx: int, backend: CryptoBackend, layout: ChunkLayout, slots: np.ndarray,
                  epoch: np.ndarray, rows: np.ndarray, arena: torch.Tensor) -> RowsSeal:
        """The backend's prepared seal of one chunk per row ``rows`` (session slots ``slots`` with the epochs
        ``reserve(slots)`` has just given, every session checked there) into ``arena``, audited: the one
        layer ``layer_idx`` used last while it applies (the same slots, epochs, arena, layout, rows and
        backend). Kept here, not by the layer, so that forgetting key slots drops every seal holding them."""
        made_for = (slots.tobytes(), epoch.tobytes())
        held = self._seals.get(layer_idx)
        if held is not None and held[1] == made_for:
            seal = held[0]
            if seal.arena is arena and seal.layout is layout and seal.rows is rows and seal.backend is backend:
                return seal
        keys, key_idx, ctx = self._keys(slots, epoch, True, checked=True)
        make = getattr(backend, "rows_seal", None)      # None: registered as a CryptoBackend, not derived
        seal = make(keys, layout, key_idx, rows, arena, ctx) if make is not None else RowsSeal(
            backend, keys, layout, key_idx, rows, arena, ctx)
        self._seals[layer_idx] = (seal, made_for)
        return seal

    def decrypt(self, backend: CryptoBackend, layout: ChunkLayout, columns: dict, dst_row, pos_start, pos_count,
                io_start, arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor) -> DecryptStatus:
        """Open chunks (``columns``: their table columns) into ``k_out``/``v_out``; audited. DecryptionError
        (destinations and scratch wiped) when the backend answers on the host that a tag failed. Returns the
        backend's per-chunk status."""
        keys, key_idx, ctx = self._keys(columns["session_slot"], columns["epoch"], audited=True)
        table = ChunkTable(key_idx, dst_row, pos_start, pos_count, io_start, columns["counter"],
                           columns["offset"])
        try:
            status = backend.decrypt_chunks(keys, layout, table, arena, k_out, v_out, ctx, owner=self)
        except BaseException:
            zero(k_out)         # whatever was opened before the failure is not left behind
            zero(v_out)
            raise
        # a device status is not read here (that would synchronise the hot path): the device backend
        # keeps its failures, zeroes their destinations itself, and raises them from ``check()``
        if not status.deferred:
            self._raise_failed(layout.layer_idx, status.host, pos_start, pos_count, columns["session_slot"],
                               (k_out, v_out))
        return status

    def rows_open(self, layer_idx: int, backend: CryptoBackend, layout: ChunkLayout, rows: np.ndarray,
                  arena: torch.Tensor) -> RowsOpen:
        """The backend's prepared read of every row ``rows`` of layer ``layer_idx`` from ``arena`` (its failures
        owned by this context): the one that layer used last while it applies. Kept here, not by the layer,
        so that forgetting key slots drops every read holding them."""
        held = self._opens.get(layer_idx)
        if held is not None and held.backend is backend and held.matches(layout, rows, arena, self):
            return held
        make = getattr(backend, "rows_open", None)      # None: registered as a CryptoBackend, not derived
        read = make(layout, rows, arena, self) if make is not None else RowsOpen(backend, layout, rows, arena, self)
        self._opens[layer_idx] = read
        return read

    def decrypt_rows(self, read: RowsOpen, slots: np.ndarray, epoch: np.ndarray, start: np.ndarray,
                     count: np.ndarray, counter: np.ndarray, offset: np.ndarray, base: int, k_out: torch.Tensor,
                     v_out: torch.Tensor) -> DecryptStatus:
        """``decrypt`` of segments × every row through the prepared ``read`` (``slots``, ``epoch``, ``counter``,
        ``offset``: the chunk table's ``[segments, rows]`` columns; ``start`` / ``count``: the segments')."""
        s0, e0 = slots[0], epoch[0]
        ns = slots.shape[0]
        # (byte comparisons of the int64 columns: a tenth of the time of element-wise ones, same answer)
        if ns == 1 or (slots.dtype == epoch.dtype == np.int64 and slots.tobytes() == s0.tobytes() * ns
                       and epoch.tobytes() == e0.tobytes() * ns):
            # every segment under the same key per row (no rotation in view): the row's key list, remembered
            keys, key_idx, ctx = self._keys(s0, e0, audited=True)
        else:
            keys, key_idx, ctx = self._keys(slots.reshape(-1), epoch.reshape(-1), audited=True)
            key_idx = key_idx.reshape(slots.shape)
        try:
            status = read(keys, key_idx, ctx, start, count, counter, offset, base, k_out, v_out)
        except BaseException:
            zero(k_out)         # whatever was opened before the failure is not left behind
            zero(v_out)
            raise
        if not status.deferred and status.host.any():
            nr = slots.shape[1]
            self._raise_failed(read.layout.layer_idx, status.host, np.repeat(start, nr), np.repeat(count, nr),
                               slots.reshape(-1), (k_out, v_out))
        return status

    def _raise_failed(self, layer_idx: int, status: np.ndarray, pos_start, pos_count, slots, outs) -> None:
        status = np.asarray(status)
        if not status.any():
            return
        bad = np.flatnonzero(status)
        for t in outs:
            zero(t)
        self.scratch.wipe()
        i = int(bad[0])
        s = self.sessions[int(slots[i])]
        start, count = int(np.asarray(pos_start)[i]), int(np.asarray(pos_count)[i])
        raise DecryptionError(
            f"authentication failed for tenant {s.tenant_id!r}, layer {layer_idx}, positions "
            f"{start}..{start + count - 1} ({bad.size} chunk(s) failed); no plaintext returned",
            tenant_id=s.tenant_id, layer_idx=layer_idx, positions=range(start, start + count))

    # ---- copies ---------------------------------------------------------------------------------------
    def copy_for(self, sessions: list[TenantSession], scratch: Scratch) -> "LayerContext":
        """The context of a deep copy of the cache: the same sessions (a new list), backend and known key
        slots; its own scratch, auditor (no held records) and row map."""
        new = LayerContext(sessions, self.prompt_slots.copy(), self.rows_per_session,
                           MergeSettings(self.merge.enabled, self.merge.max_positions, self.merge.min_segments),
                           self.auditor.copy_for(sessions), scratch, self.backend)
        new.row_slots = None if self.row_slots is None else self.row_slots.copy()
        new.key_slots = dict(self.key_slots)
        new.closed = self.closed
        return new
