"""The host implementation of the static cache's seal and open operators, over the backend contract.

One ``StaticSealer`` per cache, registered with ``pqc_kv_cache.ops`` under a handle that its layers pass
to the operators. It reads and writes only the tensors the operators are given (arena, slot table, nonce
ranges, record buffer, failures) plus what is fixed for the cache's life: the session of each batch row
and the log's tenant / session indices of each session slot. It seals and opens through the cache's
``CryptoBackend`` (``encrypt_chunks`` / ``decrypt_chunks``, one-position chunks, format v1) and writes
the audit records itself into the record buffer (the backend is called without an audit context).

Every position is its own chunk in a fixed slot: ``arena[row, slot]`` holds its ciphertext and tag,
``meta[row, slot]`` its nonce counter, epoch and position + 1 (0: empty). A position that cannot be
sealed (no counter left in the session slot's reserved range, a closed or expired session, a retired key,
no room for its records, outside the cache) fails closed: its slot is zeroed and emptied, an ENCRYPT
record with status REFUSED is written (when there is room), and ``failures`` keeps it for ``check()``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..audit.records import RECORD_DTYPE, Op, Status
from ..backends.base import ChunkLayout, ChunkTable, CryptoBackend, KeySlot, decrypt_row_summary
from ..envelope import session_tag, tenant_tag
from ..errors import KVCacheError
from ..session import TenantSession
from .static_state import FailReason

__all__ = ["StaticSealer"]

_SEALED = 2      # meta column holding position + 1
_REFUSING = (FailReason.SESSION_INVALID, FailReason.KEY_UNAVAILABLE, FailReason.NONCES_EXHAUSTED,
             FailReason.OUT_OF_RANGE)


class StaticSealer:
    """Seals and opens one cache's positions (the ``SealHandler`` of ``pqc_kv_cache.ops``)."""

    def __init__(self, sessions: Sequence[TenantSession], row_slots: np.ndarray, backend: CryptoBackend,
                 tenant_idx: np.ndarray | None, session_idx: np.ndarray | None,
                 host_epochs: Callable[[], np.ndarray] | None = None):
        self._sessions = sessions
        self._row_slots = np.ascontiguousarray(row_slots, dtype=np.int64)
        self._backend = backend
        self._tenant_idx = tenant_idx          # the log's indices per session slot (None: no audit)
        self._session_idx = session_idx
        self._keys: dict[tuple[int, int], KeySlot] = {}
        self._layouts: dict[tuple, ChunkLayout] = {}
        # a seal's chunks are every row's: the distinct session slots of the rows, and each row's index in them
        self._row_sessions, self._row_key = np.unique(self._row_slots, return_inverse=True)
        self._row_key = self._row_key.reshape(-1).astype(np.int64)
        self._grids: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        # a backend that seals a whole step in one call (the native one) is handed the step as it is
        self._seal_static = getattr(backend, "seal_static", None)
        self._record_slots = None if tenant_idx is None else np.ascontiguousarray(
            np.stack([np.asarray(tenant_idx, dtype=np.int64), np.asarray(session_idx, dtype=np.int64)], axis=1))
        # (validity and epoch of each session of the rows, keys, each row's key index, each row's reason)
        self._rows_state: tuple | None = None
        # the host's copy of the ranges' epochs, for ranges held on a device (read there, it would wait for it)
        self._host_epochs = host_epochs
        # a backend that opens a layer on its device (the CUDA one) is handed the layer's tensors as they are
        self._open_static = getattr(backend, "open_static", None)
        # (validity and live epochs of each session of the rows, keys, their slots and epochs, each row's reason)
        self._open_state: tuple | None = None

    # ---- keys ---------------------------------------------------------------------------------------
    def _key_slot(self, slot: int, epoch: int) -> KeySlot:
        ks = self._keys.get((slot, epoch))
        if ks is None:
            s = self._sessions[slot]
            ks = KeySlot(s.key_for_epoch(epoch), tenant_tag(s.tenant_id), session_tag(s.session_id), epoch)
            self._keys[(slot, epoch)] = ks
        return ks

    def forget_keys(self, slot: int | None = None, epoch: int | None = None) -> None:
        """Drop the key copies of ``slot`` (of one ``epoch``, or all; every slot when None)."""
        self._rows_state = self._open_state = None
        for k in [k for k in self._keys if (slot is None or k[0] == slot) and (epoch is None or k[1] == epoch)]:
            del self._keys[k]
        self._backend.forget_keys()

    def _layout(self, layer_idx: int, heads: int, dim: int, dtype: torch.dtype) -> ChunkLayout:
        key = (layer_idx, heads, dim, dtype)
        lay = self._layouts.get(key)
        if lay is None:
            lay = self._layouts[key] = ChunkLayout(layer_idx, heads, dim, dtype)
        return lay

    def _seal_keys(self, nonce_epoch: np.ndarray, rows: np.ndarray, reason: np.ndarray):
        """The keys of a seal: one per session slot of the rows, under its range's epoch; the chunks of a
        session that cannot be used, or whose key is gone, get their reason set instead."""
        keys: list[KeySlot] = []
        dead = []
        where = np.zeros(self._row_sessions.size, dtype=np.int64)   # session of the rows -> index in keys
        for i, slot in enumerate(self._row_sessions.tolist()):
            if not self._sessions[slot].is_valid():
                dead.append((i, FailReason.SESSION_INVALID))
                continue
            try:
                ks = self._key_slot(slot, int(nonce_epoch[slot]))
            except KVCacheError:
                dead.append((i, FailReason.KEY_UNAVAILABLE))
                continue
            where[i] = len(keys)
            keys.append(ks)
        session = self._row_key[rows]
        for i, why in dead:
            reason[(session == i) & (reason == 0)] = why
        return keys, where[session]

    def _row_keys(self, nonce_epoch: np.ndarray) -> tuple:
        """For a one-call seal: the keys, and per row the index of its key (-1: none) and why it has none.
        Kept while every session of the rows stays as valid as it was and its range's epoch is unchanged."""
        state = tuple((self._sessions[s].is_valid(), int(nonce_epoch[s])) for s in self._row_sessions.tolist())
        got = self._rows_state
        if got is not None and got[0] == state:
            return got[1:]
        reason = np.zeros(self._row_key.size, dtype=np.int64)
        keys, key_of_row = self._seal_keys(nonce_epoch, np.arange(self._row_key.size), reason)
        row_key = np.ascontiguousarray(np.where(reason == 0, key_of_row, -1), dtype=np.int64)
        self._rows_state = (state, keys, row_key, reason)
        return keys, row_key, reason

    def _open_keys(self) -> tuple:
        """For an open on the backend's device: the keys of every live epoch of the rows' sessions, the session
        slot and epoch of each, and per row why it cannot be opened (0: it can). Kept while every session of the
        rows stays as valid as it was, with the same live epochs."""
        sessions = [self._sessions[s] for s in self._row_sessions.tolist()]
        state = tuple((s.is_valid(), tuple(s.live_epochs) if s.is_valid() else ()) for s in sessions)
        got = self._open_state
        if got is not None and got[0] == state:
            return got[1:]
        keys: list[KeySlot] = []
        key_slot, key_epoch = [], []
        reason = np.zeros(self._row_key.size, dtype=np.int64)
        for i, (slot, (valid, epochs)) in enumerate(zip(self._row_sessions.tolist(), state)):
            if not valid:
                reason[self._row_key == i] = FailReason.SESSION_INVALID
                continue
            for epoch in epochs:
                try:
                    ks = self._key_slot(slot, epoch)
                except KVCacheError:     # retired since: its chunks are refused (KEY_UNAVAILABLE)
                    continue
                keys.append(ks)
                key_slot.append(slot)
                key_epoch.append(epoch)
        self._open_state = (state, keys, np.array(key_slot, dtype=np.int64), np.array(key_epoch, dtype=np.int64),
                            reason)
        return self._open_state[1:]

    def _grid(self, batch: int, n: int) -> tuple:
        """For ``n`` positions of every row, row-major: the row of each chunk, the index of its position,
        its rank among the chunks of its session slot, and the number of chunks of each session slot of
        the rows (``_row_sessions`` order). The same every decode step: computed once per (batch, n)."""
        g = self._grids.get((batch, n))
        if g is None:
            rows = np.repeat(np.arange(batch, dtype=np.int64), n)
            key = self._row_key[rows]
            rank = np.zeros(rows.size, dtype=np.int64)
            for k in range(self._row_sessions.size):
                w = np.flatnonzero(key == k)
                rank[w] = np.arange(w.size, dtype=np.int64)
            counts = np.bincount(key, minlength=self._row_sessions.size).astype(np.int64)
            g = self._grids[(batch, n)] = (rows, np.tile(np.arange(n, dtype=np.int64), batch), rank, counts)
        return g

    def _keys_for(self, slots: np.ndarray, epochs: np.ndarray, todo: np.ndarray, reason: np.ndarray):
        """Key list and index per chunk for the chunks ``todo`` (session slot, epoch each); a chunk whose
        session cannot be used or whose key is gone gets its reason set instead."""
        keys: list[KeySlot] = []
        index = np.zeros(slots.shape[0], dtype=np.int64)
        pairs = np.unique(np.stack([slots[todo], epochs[todo]], axis=1), axis=0) if todo.size else []
        for slot, epoch in (tuple(int(x) for x in pair) for pair in pairs):
            where = todo[(slots[todo] == slot) & (epochs[todo] == epoch)]
            if not self._sessions[slot].is_valid():
                reason[where] = FailReason.SESSION_INVALID
                continue
            try:
                ks = self._key_slot(slot, epoch)
            except KVCacheError:
                reason[where] = FailReason.KEY_UNAVAILABLE
                continue
            index[where] = len(keys)
            keys.append(ks)
        return keys, index

    # ---- records and failures ---------------------------------------------------------------------------
    def _room(self, records: torch.Tensor, record_head: torch.Tensor, n: int) -> bool:
        return records.shape[0] == 0 or int(record_head[0]) + n <= records.shape[0]

    def _write_records(self, records: torch.Tensor, record_head: torch.Tensor, op: Op, slots, layer: int, rows,
                       pos_start, pos_count, counter, epoch, nbytes, status) -> None:
        """Records of ``op``, one per entry of ``rows`` (the caller checked there is room)."""
        if records.shape[0] == 0 or self._tenant_idx is None:
            return
        n = int(np.asarray(rows).shape[0])
        if n == 0:
            return
        head = record_head.numpy()
        at, number = int(head[0]), int(head[1])
        out = records.numpy().view(RECORD_DTYPE).reshape(-1)[at:at + n]
        out["record_no"] = np.arange(number, number + n, dtype=np.uint64)
        out["op"] = int(op)
        out["tenant_idx"] = self._tenant_idx[slots]
        out["session_idx"] = self._session_idx[slots]
        out["layer"] = layer
        out["row"] = rows
        out["pos_start"] = pos_start
        out["pos_count"] = pos_count
        out["nonce_counter"] = counter
        out["epoch"] = epoch
        out["nbytes"] = np.minimum(nbytes, 0xFFFFFFFF)
        out["status"] = status
        head[0] = at + n
        head[1] = number + n

    @staticmethod
    def _fail(failures: torch.Tensor, layer: int, rows, pos, reason, slots) -> None:
        bad = np.flatnonzero(reason)
        if bad.size == 0:
            return
        f = failures.cpu().numpy().copy()     # (a device's failure record is read back: a rotation's, no step's)
        if f[0] == 0:
            i = int(bad[0])
            f[1:] = (layer, int(rows[i]), int(pos[i]), int(reason[i]), int(slots[i]))
        f[0] += bad.size
        failures.copy_(torch.from_numpy(f))

    @staticmethod
    def _take_counters(slots: np.ndarray, reason: np.ndarray, nxt: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Counters for the chunks with no reason yet, slot by slot in chunk order, as far as each slot's
        range goes; the rest get NONCES_EXHAUSTED."""
        counter = np.zeros(slots.size, dtype=np.int64)
        for slot in np.unique(slots[reason == 0]).tolist():
            w = np.flatnonzero((slots == slot) & (reason == 0))
            avail = max(int(end[slot]) - int(nxt[slot]), 0)
            reason[w[avail:]] = FailReason.NONCES_EXHAUSTED
            ok = w[:avail]
            counter[ok] = int(nxt[slot]) + np.arange(ok.size, dtype=np.int64)
            nxt[slot] += ok.size      # taken before the seal: a counter is never handed out twice
        return counter

    # ---- the operators ---------------------------------------------------------------------------------
    def seal(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, io_index: torch.Tensor,
             positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor, nonce_next: torch.Tensor,
             nonce_end: torch.Tensor, nonce_epoch: torch.Tensor, records: torch.Tensor, record_head: torch.Tensor,
             failures: torch.Tensor, ring: bool) -> None:
        """Seal positions ``positions`` of every row (ENCRYPT per row and position; then one READ per row
        for the update that wrote them, covering the positions the layer holds)."""
        batch, heads, seq, dim = keys.shape
        layout = self._layout(layer_idx, heads, dim, keys.dtype)
        on_host = nonce_epoch.device.type == "cpu"
        if not on_host and (self._seal_static is None or self._host_epochs is None):
            raise ValueError(f"the seal of tensors on {nonce_epoch.device} needs a backend that seals a step on "
                             "that device (seal_static) and the host's copy of the ranges' epochs")
        if self._seal_static is not None:
            if positions.dtype != torch.int64 or not positions.is_contiguous():
                positions = positions.to(torch.int64).contiguous()
            if io_index.dtype != torch.int64 or not io_index.is_contiguous():
                io_index = io_index.to(torch.int64).contiguous()
            # the host's copy when there is one (a cache's, whatever its device: one path for CPU and GPU)
            epochs = self._host_epochs() if self._host_epochs is not None else nonce_epoch.numpy()
            key_list, row_key, row_reason = self._row_keys(epochs)
            self._seal_static(key_list, layout, keys, values, io_index, positions, arena, meta, nonce_next,
                              nonce_end, nonce_epoch, records, record_head, failures, ring, self._row_slots,
                              row_key, row_reason, self._record_slots)
            return
        n_slots, stride = int(arena.shape[1]), int(arena.shape[2])
        bpp = layout.bytes_per_position
        pos = positions.numpy().reshape(-1).astype(np.int64, copy=False)
        n = pos.size
        if n == 0:
            return
        io = io_index.numpy().reshape(-1).astype(np.int64, copy=False)
        rows, j, rank, counts = self._grid(batch, n)
        p, iox = pos[j], io[j]
        slots = self._row_slots[rows]
        reason = np.zeros(rows.size, dtype=np.int64)
        outside = (p < 0) | (p >= 0xFFFFFFFF) | (iox < 0) | (iox >= seq) | ((not ring) & (p >= n_slots))
        reason[outside] = FailReason.OUT_OF_RANGE
        room = self._room(records, record_head, rows.size + batch)
        if not room:
            reason[:] = FailReason.RECORDS_FULL
        nxt, end, ep = nonce_next.numpy(), nonce_end.numpy(), nonce_epoch.numpy()
        epoch = ep[slots]
        key_list, key_index = self._seal_keys(ep, rows, reason)
        sess = self._row_sessions
        if not reason.any() and ((end[sess] - nxt[sess]) >= counts).all():
            # every chunk gets a counter (each decode step): one vector op, no per-slot loop
            counter = nxt[slots] + rank
            nxt[sess] += counts       # taken before the seal: a counter is never handed out twice
        else:
            counter = self._take_counters(slots, reason, nxt, end)
        good = reason == 0
        # a position outside the cache has no slot, whatever else refused it
        slot_of = np.where(outside, -1, p % n_slots)
        arena_np, meta_np = arena.numpy(), meta.numpy()
        # the slots written now are emptied first: a seal that fails part-way leaves none claiming a chunk
        # (the arena bytes of the chunks sealed below are overwritten, or zeroed if the seal raises)
        written = slot_of >= 0
        meta_np[rows[written], slot_of[written]] = 0
        failed = written & ~good
        if failed.any():
            arena_np[rows[failed], slot_of[failed]] = 0
        if good.any():
            g = np.flatnonzero(good)
            table = ChunkTable(key_index[g], rows[g], p[g], np.ones(g.size, dtype=np.int64), iox[g], counter[g],
                               (rows[g] * n_slots + slot_of[g]) * stride)
            try:
                self._backend.encrypt_chunks(key_list, layout, table, keys, values, arena.view(-1), None)
            except BaseException:
                arena_np[rows[g], slot_of[g]] = 0
                raise
            meta_np[rows[g], slot_of[g]] = np.stack([counter[g], epoch[g], p[g] + 1], axis=1)
        if room:
            status = np.where(good, int(Status.OK), int(Status.REFUSED)).astype(np.uint8)
            self._write_records(records, record_head, Op.ENCRYPT, slots, layer_idx, rows, np.maximum(p, 0), 1,
                                counter, epoch, bpp, status)
            last = int(pos.max()) + 1
            first = max(0, last - n_slots) if ring else 0
            r = np.arange(batch, dtype=np.int64)
            self._write_records(records, record_head, Op.READ, self._row_slots, layer_idx, r, first,
                                last - first, 0, 0, (last - first) * bpp, int(Status.OK))
        self._fail(failures, layer_idx, rows, p, reason, slots)

    def open(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, end: torch.Tensor,
             arena: torch.Tensor, meta: torch.Tensor, released: torch.Tensor, records: torch.Tensor,
             record_head: torch.Tensor, failures: torch.Tensor, ring: bool) -> None:
        """Open every position the layer holds in the rows ``released`` marks (non-zero) into ``keys`` /
        ``values`` (DECRYPT per row read, and one record per position that failed: AUTH_FAILED, or REFUSED
        when its session or key is gone); the other rows are neither read, written nor recorded."""
        batch, heads, seq, dim = keys.shape
        n_slots, stride = int(arena.shape[1]), int(arena.shape[2])
        layout = self._layout(layer_idx, heads, dim, keys.dtype)
        if not isinstance(released, torch.Tensor) or released.dtype != torch.int64 \
                or tuple(released.shape) != (batch,) or released.device != arena.device:
            raise ValueError(f"released must be an int64 tensor of {batch} entries on {arena.device}")
        if self._open_static is not None:
            key_list, key_slot, key_epoch, row_reason = self._open_keys()
            self._open_static(key_list, layout, keys, values, end, arena, meta, released, records, record_head,
                              failures, ring, self._row_slots, row_reason, key_slot, key_epoch, self._record_slots)
            return
        if arena.device.type != "cpu":
            raise ValueError(f"the open of tensors on {arena.device} needs a backend that opens a layer on that "
                             "device (open_static)")
        last = int(end)
        first = max(0, last - n_slots) if ring else 0
        opened = np.flatnonzero(released.numpy())
        if last <= first or opened.size == 0:
            return
        pos = np.arange(first, last, dtype=np.int64)
        n = pos.size
        rows = np.repeat(opened.astype(np.int64), n)
        p, iox = np.tile(pos, opened.size), np.tile(pos - first, opened.size)
        slots = self._row_slots[rows]
        slot_of = p % n_slots
        m = meta.numpy()[rows, slot_of]
        counter, epoch = m[:, 0], m[:, 1]
        reason = np.zeros(rows.size, dtype=np.int64)
        reason[(m[:, _SEALED] != p + 1) | (iox >= seq) | ((not ring) & (p >= n_slots))] = FailReason.NOT_SEALED
        room = self._room(records, record_head, 2 * rows.size)
        if not room:
            reason[:] = FailReason.RECORDS_FULL
        key_list, key_index = self._keys_for(slots, epoch, np.flatnonzero(reason == 0), reason)
        g = np.flatnonzero(reason == 0)
        if g.size:
            table = ChunkTable(key_index[g], rows[g], p[g], np.ones(g.size, dtype=np.int64), iox[g], counter[g],
                               (rows[g] * n_slots + slot_of[g]) * stride)
            status = self._backend.decrypt_chunks(key_list, layout, table, arena.view(-1), keys, values, None,
                                                  owner=self)
            reason[g[np.asarray(status.host) != 0]] = FailReason.AUTH_FAILED
        bad = np.flatnonzero(reason)
        if bad.size:            # nothing of a position that did not open is left readable
            t = torch.from_numpy(rows[bad])
            i = torch.from_numpy(np.minimum(iox[bad], seq - 1))
            keys[t, :, i] = 0
            values[t, :, i] = 0
        if room:
            summary = decrypt_row_summary(rows, p, np.ones(rows.size, dtype=np.int64), counter,
                                          np.arange(rows.size, dtype=np.int64),
                                          np.full(rows.size, layout.bytes_per_position, dtype=np.int64))
            first_chunk = summary.slot
            row_status = np.zeros(summary.row.size, dtype=np.uint8)
            if bad.size:
                np.maximum.at(row_status, summary.row_of_chunk[bad], int(Status.AUTH_FAILED))
            self._write_records(records, record_head, Op.DECRYPT, slots[first_chunk], layer_idx, summary.row,
                                summary.pos_start, summary.pos_count, summary.nonce_counter,
                                epoch[first_chunk], summary.nbytes, row_status)
            if bad.size:
                refused = np.isin(reason[bad], [int(r) for r in _REFUSING])
                st = np.where(refused, int(Status.REFUSED), int(Status.AUTH_FAILED)).astype(np.uint8)
                self._write_records(records, record_head, Op.DECRYPT, slots[bad], layer_idx, rows[bad], p[bad], 1,
                                    counter[bad], epoch[bad], layout.bytes_per_position, st)
        self._fail(failures, layer_idx, rows, p, reason, slots)

    # ---- re-seal (key rotation, outside any compiled region; not on the step's path) -------------------------
    def reseal(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, rows: np.ndarray,
               positions: np.ndarray, io_index: np.ndarray, arena: torch.Tensor, meta: torch.Tensor,
               nonce_next: torch.Tensor, nonce_end: torch.Tensor, nonce_epoch: torch.Tensor,
               failures: torch.Tensor) -> np.ndarray:
        """Seal again, from ``keys`` / ``values`` (index ``io_index[j]`` holds position ``positions[j]``), the
        chunks that the slots of ``rows`` (ascending) hold of ``positions``, under fresh counters of each
        row's session range and that range's epoch. No records (the caller records the operation). A chunk
        that cannot be sealed fails closed as in ``seal``. Returns each row's first new counter (0: none).
        Tensors on a device are read on the host here (it waits for the device): a rotation, never a step."""
        heads, dim = int(keys.shape[1]), int(keys.shape[3])
        n_slots, stride = int(arena.shape[1]), int(arena.shape[2])
        layout = self._layout(layer_idx, heads, dim, keys.dtype)
        dev = arena.device
        r = np.repeat(rows, positions.size)
        p, iox = np.tile(positions, rows.size), np.tile(io_index, rows.size)
        # the slot table and the ranges are read on the host (a device's wait: this is no step's path), and
        # every change is written back through the tensors
        held = meta[:, :, _SEALED].cpu().numpy()[r, p % n_slots] == p + 1
        r, p, iox = r[held], p[held], iox[held]
        slot_of = p % n_slots
        slots = self._row_slots[r]
        epoch = nonce_epoch.cpu().numpy()[slots]
        reason = np.zeros(r.size, dtype=np.int64)
        key_list, key_index = self._keys_for(slots, epoch, np.arange(r.size), reason)
        nxt = nonce_next.cpu().numpy().copy()
        counter = self._take_counters(slots, reason, nxt, nonce_end.cpu().numpy())
        nonce_next.copy_(torch.from_numpy(nxt))        # taken before the seal: never handed out twice
        good = reason == 0
        rt, st = (torch.from_numpy(a).to(dev) for a in (r, slot_of))
        meta[rt, st] = 0                 # emptied first, as in seal
        bad_t = torch.from_numpy(~good).to(dev)
        arena[rt[bad_t], st[bad_t]] = 0
        if good.any():
            g = np.flatnonzero(good)
            gt = torch.from_numpy(g).to(dev)
            table = ChunkTable(key_index[g], r[g], p[g], np.ones(g.size, dtype=np.int64), iox[g], counter[g],
                               (r[g] * n_slots + slot_of[g]) * stride)
            try:
                self._backend.encrypt_chunks(key_list, layout, table, keys, values, arena.view(-1), None)
            except BaseException:
                arena[rt[gt], st[gt]] = 0
                raise
            meta[rt[gt], st[gt]] = torch.from_numpy(np.stack([counter[g], epoch[g], p[g] + 1], axis=1)).to(dev)
        self._fail(failures, layer_idx, r, p, reason, slots)
        first = np.full(rows.size, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, np.searchsorted(rows, r[good]), counter[good])
        return np.where(first == np.iinfo(np.int64).max, 0, first)
