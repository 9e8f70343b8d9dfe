"""The CUDA backend's prepared read: a layer's decrypt of every row with only what changes done per call.

A cache reads every row of a layer at each update, from the same arena, rows and owner step after step;
from one step to the next the key set and audit context stay, and only the segments (one more, or trailing
ones merged into one) and the scratch views change. ``RowsOpenMixin.open_rows`` checks once per (read, key
set, audit context) what ``decrypt_chunks`` checks of the keys, layout and arena, keeps the key schedules,
slot metadata and the decrypt parameter record, and per call checks the call's values at the level of
segments (positions, counts, counters, offsets, key indices and the K/V views; every refusal of
``decrypt_chunks``), builds the chunk table and the DECRYPT row descriptors by broadcasting segment columns
over the rows (no per-chunk grouping: every segment holds one chunk per row), and makes one packed upload,
the row-record launch (audited, its records reserved with ``records_at``) and the decrypt launch.

What is not prepared this way goes through ``decrypt_chunks`` unchanged (the same bytes, checks, statuses and
records): a call whose values fail a check (so that it raises the same error), rows not strictly ascending,
more rows than one launch's record reservation holds, inputs that are not int64 numpy arrays of the
expected shapes. A prepared read holds the key set's schedules and slot metadata by address: it is
prepared again when the key store no longer holds its schedules (``KeyStore.touch``: evicted or forgotten,
so zeroed), and when the
key list, audit context or any key slot in the list is another than the one it was prepared for.
"""

from __future__ import annotations

import contextlib
import math
import operator
import weakref

import numpy as np
import torch

from ..audit.records import Op
from ..audit.torch_records import stand_ins
from ..envelope import TAG_SIZE
from . import kernel_abi as _abi
from .base import ChunkTable, DecryptStatus, RowsOpen
from .cuda_staging import ALIGN

__all__ = ["RowsOpenMixin"]

_DECRYPT = "pqc_decrypt_chunks"
_ROW_RECORDS = "pqc_decrypt_row_records"
_ROW_RECORD_THREADS = 128
_UNAUDITED = (0, 0)       # no record address, no first record number


class _Opened:
    """What a prepared read keeps for one (key set, audit context)."""

    __slots__ = ("keys", "key_slots", "audit", "keep", "meta", "tpl", "ring", "res", "owner_ref", "nkeys", "rows",
                 "rows_list", "row_hi", "row_index", "aux", "bpp", "half_bpp", "row_args", "plan", "slots")


def _room(nbytes: int) -> int:
    """The bytes a part of ``nbytes`` takes in a staging region (parts start at multiples of ALIGN)."""
    return (max(1, nbytes) + ALIGN - 1) // ALIGN * ALIGN


def _int64(a, ndim: int) -> bool:
    return type(a) is np.ndarray and a.dtype == np.int64 and a.ndim == ndim


class RowsOpenMixin:
    """``open_rows`` of the CUDA backend (mixed into ``CudaBackend``)."""

    def open_rows(self, read: RowsOpen, keys, key_idx, audit, start, count, counter, offset, base: int,
                  k_out: torch.Tensor, v_out: torch.Tensor) -> DecryptStatus:
        self._refuse_capture()      # first, as decrypt_chunks: nothing (not even a key set) enqueued into a capture
        st = read.state
        if (st is None or st.keys is not keys or st.audit is not audit or not self._keys.touch(*st.keep)
                or len(keys) != st.nkeys or not all(map(operator.is_, keys, st.key_slots))):
            st = read.state = self._prepare_open(read, keys, audit)     # (a list changed in place: checked again)
        got = None if st is None else self._open_checks(st, read, key_idx, start, count, counter, offset, base,
                                                        k_out, v_out)
        if got is None:
            # the general path: the same bytes, statuses and records, and the error a bad value deserves
            return super().open_rows(read, keys, key_idx, audit, start, count, counter, offset, base, k_out, v_out)
        counts, lo_start, hi_end, low_counter = got
        ns, nr = len(counts), len(st.rows_list)
        n = ns * nr
        status = torch.empty(n, dtype=torch.uint8, device=self.device)   # the kernel writes every chunk's
        items = st.plan.items(counts)
        n_items = items.shape[1]
        split = n_items != n
        audited = st.ring is not None
        # the region: table, row descriptors (audited), items and partials and zeroed counters (split), then the
        # parameter record; laid out as a packed region lays them out, written in place, moved by one copy
        t_bytes = _abi.TABLE_COLS * n * 8
        d_bytes = _abi.ROWDESC_COLS * nr * 8
        at = _room(t_bytes)
        d_off = at if audited else None
        at += _room(d_bytes) if audited else 0
        i_off = at if split else None                       # unsplit: item i = chunk i
        at += _room(items.nbytes) if split else 0
        p_off = at if split else None
        at += _room(n_items * _abi.PARTIAL_SIZE) if split else 0
        c_off = at if split else None
        at += _room(4 * n) if split else 0
        prm_off = at
        it = k_out.element_size()
        ks, vs = k_out.stride(), v_out.stride()
        ring = st.ring
        with self._fq_lock:     # the failure queue is not read between this call's tag and its launches
            tag = self._call_tag(audit.log if audit is not None else None, read.owner, st.owner_ref)
            # if the block raises, the DECRYPT stand-ins name each row's tenant, session and row (built then)
            res = contextlib.nullcontext(_UNAUDITED) if ring is None else ring.records_at(
                len(st.rows_list), head=lambda: self._open_stand_ins(st, read, key_idx), **st.res)
            with res as (records_at, first_no), self._staging.staged(prm_off + _abi.ParamsTemplate.size) as g:
                host, dev = g.host, g.dev_ptr
                # the table, segment-major with rows inner (what the general path builds)
                table = host[:t_bytes].view(np.int64).reshape(_abi.TABLE_COLS, ns, nr)
                table[0] = key_idx
                table[1] = st.rows
                table[2] = start[:, None]
                table[3] = count[:, None]
                table[4] = (start - base)[:, None]
                table[5] = counter
                table[6] = offset
                table[7] = st.aux
                if audited:
                    # the DECRYPT row descriptors (``base.decrypt_row_summary`` of a table whose every segment
                    # lists the same ascending rows): the rows' span, lowest counter, first chunk's key, bytes read
                    desc = host[d_off:d_off + d_bytes].view(np.int64).reshape(_abi.ROWDESC_COLS, nr)
                    desc[0] = st.rows
                    desc[1] = lo_start
                    desc[2] = hi_end - lo_start
                    desc[3] = low_counter
                    desc[4] = key_idx if key_idx.ndim == 1 else key_idx[0]
                    desc[5] = sum(counts) * st.bpp
                if split:
                    host[i_off:i_off + items.nbytes] = items.reshape(-1).view(np.uint8)
                    host[c_off:c_off + 4 * n] = 0
                st.tpl.pack_into(host, prm_off, k=k_out.data_ptr(), k_sb=ks[0] * it, k_sh=ks[1] * it,
                                 k_ss=ks[2] * it, v=v_out.data_ptr(), v_sb=vs[0] * it, v_sh=vs[1] * it,
                                 v_ss=vs[2] * it, table=dev, n=n, items=0 if i_off is None else dev + i_off,
                                 n_items=n_items, status=status.data_ptr(), records=records_at, call_tag=tag,
                                 partials=0 if p_off is None else dev + p_off,
                                 counters=0 if c_off is None else dev + c_off)
                g.upload()
                if audited:
                    self._launch(_ROW_RECORDS, (nr + _ROW_RECORD_THREADS - 1) // _ROW_RECORD_THREADS,
                                 _ROW_RECORD_THREADS, (np.uint64(st.meta.data_ptr()), np.uint64(dev + d_off),
                                                       np.int64(nr), *st.row_args, np.uint64(records_at),
                                                       np.uint64(first_no)))
                self._launch(_DECRYPT, min(n_items, st.slots), _abi.LANES, (np.uint64(dev + prm_off),))
        return DecryptStatus(device=status)

    @staticmethod
    def _open_stand_ins(st: _Opened, read: RowsOpen, key_idx) -> np.ndarray:
        """The ERROR records standing in for a failed call's DECRYPT row records (each row's key: its first
        segment's, as the row descriptor names it)."""
        first = key_idx if key_idx.ndim == 1 else key_idx[0]
        return stand_ins(int(Op.DECRYPT), st.audit.tenant_idx[first], st.audit.session_idx[first],
                         read.layout.layer_idx, st.rows)

    def _prepare_open(self, read: RowsOpen, keys, audit) -> _Opened | None:
        """Check what every call with these keys and this audit context shares, as ``decrypt_chunks`` would
        (layout, arena, keys, owner); None when a check fails or the read is one the general path serves."""
        layout, arena, rows = read.layout, read.arena, read.rows
        nr = rows.shape[0]
        if nr == 0 or (nr > 1 and not bool((rows[1:] > rows[:-1]).all())) or int(rows[0]) < 0:
            return None
        zeros = np.zeros(nr, dtype=np.int64)
        try:
            _, seen = self._check_common(keys, layout, ChunkTable(zeros, rows, zeros, zeros + 1, zeros, zeros, zeros),
                                         arena)
            owner_ref = None if read.owner is None else weakref.ref(read.owner)
        except (TypeError, ValueError):
            return None
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        if ring is not None and nr > max(1, ring.capacity // 4):
            return None         # row groups of several launches: the general path
        sched, seen = self._keys.schedules(keys, seen)
        meta = self._meta(seen, keys, audit)
        st = _Opened()
        st.keys, st.audit, st.owner_ref = keys, audit, owner_ref
        st.key_slots = tuple(keys)
        st.keep = (seen.ident, sched)   # the parameter record reads the schedules by address: while touch() holds
        st.meta = meta                  # and the slot metadata (the row-record launch too; kept alive here)
        lf = self._layout_fields(layout)
        st.tpl = _abi.ParamsTemplate(sched=sched.data_ptr(), meta=meta.data_ptr(), arena=arena.data_ptr(),
                                     fq=self._fq.data_ptr(), fq_count=self._fq_count.data_ptr(),
                                     fq_cap=self._fq.shape[0], **lf)
        st.row_args = tuple(np.uint32(lf[f]) for f in ("layer", "num_heads", "head_dim", "itemsize", "dtype_code"))
        st.ring = ring
        st.res = None if ring is None else dict(
            op=int(Op.DECRYPT), tenant_idx=int(audit.tenant_idx[0]) if len(audit.tenant_idx) else 0,
            session_idx=int(audit.session_idx[0]) if len(audit.session_idx) else 0,
            layer=min(int(layout.layer_idx), 0xFFFF))
        st.nkeys = len(keys)
        st.rows = rows
        st.rows_list = rows.tolist()
        st.row_hi = st.rows_list[-1]
        st.row_index = np.arange(nr, dtype=np.int64)     # a chunk's row record: its row's place in ``rows``
        st.aux = st.row_index if ring is not None else -1
        st.bpp = layout.bytes_per_position
        st.half_bpp = st.bpp // 2
        st.slots = self.launch_slots(_DECRYPT)
        plans = self.__dict__.setdefault("_segment_plans", {})     # shared by the reads of every layer
        key = (st.slots, nr, st.bpp)
        st.plan = plans.get(key)
        if st.plan is None:
            if len(plans) >= 64:
                plans.clear()
            st.plan = plans[key] = SegmentPlan(st.slots, nr, st.bpp)
        return st

    def _open_checks(self, st: _Opened, read: RowsOpen, key_idx, start, count, counter, offset, base, k_out,
                     v_out):
        """(position counts, lowest start, highest end, lowest counter per row or None) of a call whose values
        pass every check ``decrypt_chunks`` makes of them (``kernel_abi.check_bounds`` and the K/V checks, at
        the level of segments); None otherwise (the general path then raises what it raises)."""
        nr = len(st.rows_list)
        if not (_int64(start, 1) and _int64(count, 1) and _int64(counter, 2) and _int64(offset, 2)
                and type(key_idx) is np.ndarray and key_idx.dtype == np.int64 and type(base) is int):
            return None
        ns = start.shape[0]
        if (ns == 0 or count.shape[0] != ns or counter.shape != (ns, nr) or offset.shape != (ns, nr)
                or key_idx.shape not in ((nr,), (ns, nr))):
            return None
        layout = read.layout
        for t in (k_out, v_out):
            if not isinstance(t, torch.Tensor) or t.device != self.device or t.dtype != layout.dtype:
                return None
            shape = t.shape
            if (len(shape) != 4 or shape[1] != layout.num_heads or shape[3] != layout.head_dim
                    or t.stride()[3] != 1 or st.row_hi >= shape[0]):
                return None
        starts, counts = start.tolist(), count.tolist()
        lo_start, lo_count, hi_count = min(starts), min(counts), max(counts)
        hi_end = max(map(int.__add__, starts, counts))
        if lo_count < 1 or lo_start < 0 or lo_start - base < 0:
            return None
        if hi_end - base > min(k_out.shape[2], v_out.shape[2]):
            return None
        if hi_count * st.half_bpp > 0xFFFFFFFF or hi_count * st.bpp > 16 * _abi.GCM_MAX_BLOCKS:
            return None
        if key_idx.ndim == 1:
            idx = key_idx.tolist()
            lo_key, hi_key = min(idx), max(idx)
        else:
            lo_key, hi_key = int(key_idx.min()), int(key_idx.max())
        if lo_key < 0 or hi_key >= st.nkeys:
            return None
        low_counter = counter.min(0) if st.ring is not None else None
        if int(counter.min() if low_counter is None else low_counter.min()) < 0:
            return None
        numel = read.arena.numel()
        lo_off, hi_off = int(offset.min()), int(offset.max())
        if lo_off < 0 or hi_off >= numel:
            return None
        if hi_off + hi_count * st.bpp + TAG_SIZE > numel:     # a bound first, exact per segment when over it
            if int((offset.max(1) + count * st.bpp).max()) + TAG_SIZE > numel:
                return None
        return counts, lo_start, hi_end, low_counter


class SegmentPlan:
    """The decrypt work items (``kernel_abi.work_items`` with ``slots``, no record limit) of tables whose every
    segment holds one chunk per row, worked out per segment: how each segment's chunks are cut is decided
    over the segments (``kernel_abi._items_per_chunk``'s rule), and the items of a segment cut a given way are
    kept (a decode step's segments come back step after step), so a call joins kept blocks and numbers their
    chunks; the last call's items are kept whole (the backend shares a plan between the reads of every layer
    of one shape, and a step's layers have the same segments). The same items as ``work_items`` gives for
    the table's ``pos_count`` column, value for value."""

    __slots__ = ("slots", "nr", "bpp", "min_rounds", "_blocks", "_rounds", "_last")

    def __init__(self, slots: int, nr: int, bpp: int, min_rounds: int = _abi.MIN_ITEM_ROUNDS):
        self.slots, self.nr, self.bpp, self.min_rounds = max(1, int(slots)), nr, bpp, min_rounds
        self._blocks: dict[tuple, tuple[np.ndarray, int]] = {}
        self._rounds: dict[int, int] = {}
        self._last: tuple = ((), None)          # the last call's counts and items (a step's other layers)

    def _cuts(self, counts: list) -> tuple[list, list]:
        """(rounds, (k_hi, q, k_lo)) per segment: rows ``< q`` cut into ``k_hi`` items, the others ``k_lo``
        (``kernel_abi._items_per_chunk`` over the chunks, segment-major, rows inner)."""
        nr, slots, mr = self.nr, self.slots, self.min_rounds
        rounds = self._rounds
        r = [rounds.get(c) or self._count_rounds(c) for c in counts]
        n = len(counts) * nr
        total = nr * sum(r)
        if n >= slots:
            b = max(int(mr), -(-total // slots))
            return r, [(k, 0, k) for k in (max(1, -(-x // b)) for x in r)]
        k = [1] * len(r)
        plus = [0] * len(r)                      # rows of each segment given one more item
        big = [i for i, x in enumerate(r) if x * slots >= total]
        if big:
            s_big = slots - nr * (len(r) - len(big))
            t_big = nr * sum(r[i] for i in big)
            for i in big:
                k[i] = max(1, math.floor(r[i] * s_big / t_big))
            left = s_big - nr * sum(k[i] for i in big)
            if left > 0:       # the longest items first (stable: segment order, then rows)
                for i in sorted(big, key=lambda i: -(r[i] / k[i])):
                    plus[i] = min(nr, left)
                    left -= plus[i]
                    if left <= 0:
                        break
        cuts = []
        mr = max(1, int(mr))
        for x, kk, q in zip(r, k, plus):
            cap = max(1, x // mr)
            lo = kk if kk < cap else cap
            cuts.append((min(kk + 1, cap), q, lo) if q else (lo, 0, lo))
        return r, cuts

    def _count_rounds(self, count: int) -> int:
        """``kernel_abi.chunk_rounds`` of a chunk of ``count`` positions (kept per count)."""
        lanes = _abi.LANES
        r = (_abi.AAD_BLOCKS + (count * self.bpp + 15) // 16 + 1 + lanes - 1) // lanes
        if len(self._rounds) >= 4096:
            self._rounds.clear()
        self._rounds[count] = r
        return r

    def _block(self, count: int, rounds: int, cut: tuple) -> tuple[np.ndarray, int]:
        """The items of one segment's chunks cut as ``cut`` says, numbered from chunk 0 and item 0 (read-only),
        and how many there are."""
        key = (count, cut)
        got = self._blocks.get(key)
        if got is None:
            k_hi, q, k_lo = cut
            k = np.array([k_hi] * q + [k_lo] * (self.nr - q), dtype=np.int64)
            total = int(k.sum())
            blk = _abi.cut_items(k, np.full(self.nr, rounds, dtype=np.int64), np.full(self.nr, count, dtype=np.int64))
            blk.setflags(write=False)
            if len(self._blocks) >= 1024:
                self._blocks.clear()
            got = self._blocks[key] = (blk, total)
        return got

    def items(self, counts: list) -> np.ndarray:
        """The work items of a call over segments of these position counts (int64 [ITEM_COLS, n_items],
        read-only)."""
        last = self._last
        if last[0] == counts:
            return last[1]
        rounds, cuts = self._cuts(counts)
        got = [self._block(c, r, cut) for c, r, cut in zip(counts, rounds, cuts)]
        if len(got) == 1:
            self._last = (list(counts), got[0][0])
            return got[0][0]
        items = np.concatenate([b for b, _ in got], axis=1)
        sizes = np.array([n for _, n in got], dtype=np.int64)
        items[0] += np.repeat(np.arange(0, len(got) * self.nr, self.nr, dtype=np.int64), sizes)
        items[5] += np.repeat(np.cumsum(sizes) - sizes, sizes)
        items.setflags(write=False)
        self._last = (list(counts), items)
        return items
