"""The CUDA backend's prepared row seal: a decode step's encrypt with only what changes done per call.

A cache seals every row of a layer at each update, with the same keys, rows, arena and tensor strides
step after step; only the positions, the nonce counters, where the chunks go and the K / V tensors
(new ones each step, same shape) change. ``RowsSealMixin.seal_rows`` checks once per (seal, position
count, stride, tensor shape) what ``encrypt_chunks`` checks on every call (key set, layout, arena, rows
and positions against the tensors, the GCM length), plans the launch and builds its parameter record
and chunk table; a call then checks only what it changes (the tensors' shape, strides, dtype and device
against the prepared ones, the positions, the counters, the arena range), patches the table's
position, counter and offset columns and the record's pointers, and makes one packed upload and one
launch, with the ring reservation of its ENCRYPT records when audited.

What is not prepared this way goes through ``encrypt_chunks`` unchanged (the same bytes, checks and
records): a call whose values fail a per-call check (so that it raises the same error), a launch that
would be split into work items or into several launches (a prefill's long chunks), a call while the
current stream is being captured (refused before anything is prepared, uploaded or launched). A prepared
record reads the key set's schedules and slot metadata by address: each call asks the key store whether
that schedule is still the one it keeps (``KeyStore.touch``, which also marks it recently used) and
prepares again when it is not (evicted or forgotten, hence zeroed).
"""

from __future__ import annotations

import contextlib
import functools
import struct

import numpy as np
import torch

from ..audit.records import RECORD_SIZE as _RECORD, Op, Status, check_records
from ..audit.torch_records import stand_ins
from . import kernel_abi as _abi
from ..envelope import TAG_SIZE
from .base import PlaintextCopy, RowRecords, RowsSeal
from .cuda_staging import ALIGN as _ALIGN

__all__ = ["RowsSealMixin"]

_COL_POS, _COL_COUNTER, _COL_OFFSET = 2, 5, 6
_ENCRYPT = "pqc_encrypt_chunks"
_MOD64 = 1 << 64
_POS_LIMIT = 1 << 62      # a position past it takes the general path (which refuses what overflows)
_UNAUDITED = (0, 0)       # no record address, no first record number


class _Prepared:
    """What a prepared seal keeps for one (position count, stride, K/V shape and strides)."""

    __slots__ = ("pos_count", "stride", "k_shape", "v_shape", "tpl", "n", "sig", "rel", "values",
                 "pos", "counter", "offset", "fields", "struct", "t_bytes", "size", "records", "ring", "res", "grid",
                 "span", "arena_bytes", "keep", "meta", "limit", "head", "row_fields", "copy_fields", "itemsize",
                 "src_spans", "copy_memo")

    def __init__(self, pos_count: int, stride: int, k_src: torch.Tensor, v_src: torch.Tensor):
        self.pos_count, self.stride = pos_count, stride
        self.k_shape, self.v_shape = k_src.shape, v_src.shape
        self.tpl = None         # None: this shape takes the general path (a split launch)


def _row_fields(spec, records, prep) -> list | None:
    """The row record fields of the parameter record (row_op, row_pos_start, row_pos_count, row_nbytes,
    row_rec0) a prepared call writes for ``spec``; None when the general path must take it (no audit, the
    caller's records too, a value a record cannot hold, more records than one launch's reservation)."""
    if prep is None or prep.tpl is None or prep.ring is None or records is not None or not isinstance(spec, RowRecords):
        return None
    got = spec.fields()
    if got is None or prep.records + prep.n > prep.limit:
        return None
    return [*got, prep.records]


def _span(t: torch.Tensor, itemsize: int) -> int:
    """Bytes from a tensor's first element to one past its last."""
    return itemsize * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _copy_geometry(k, v, prep) -> tuple | None:
    """What a prepared call needs of copy buffers ``k`` / ``v`` at any position: (their pointers, byte strides,
    the last position a copy can start at (negative: none), and the byte range each spans), or None when the
    launch cannot write them (not the sources' batch, heads, dim, dtype and device, a dim axis that is not
    contiguous, K and V sharing memory)."""
    shape, item, n = prep.k_shape, prep.itemsize, prep.pos_count
    out = []
    for t in (k, v):
        if (t.dim() != 4 or t.shape[:2] != shape[:2] or t.shape[3] != shape[3] or t.dtype != prep.sig[2]
                or t.device != prep.sig[4] or t.stride(3) != 1):
            return None
        sb, sh, ss, _ = t.stride()
        lo = t.data_ptr()
        out.append((lo, sb * item, sh * item, ss * item, t.shape[2] - n, lo, lo + _span(t, item)))
    (_, *_, k0, k1), (_, *_, v0, v1) = out
    return None if k0 < v1 and v0 < k1 else tuple(out)


def _copy_fields(copy_to, k_src, v_src, prep) -> list | None:
    """The copy fields of the parameter record (copy_k, its byte strides, copy_v, its byte strides) a prepared
    call writes for ``copy_to``; None when the general path must take it (see ``_copy_geometry``; a position
    the buffers cannot take; buffers sharing memory with the sources). What is derived from the buffers'
    geometry is kept from call to call while it stays the same (a store's buffers, step after step)."""
    if type(copy_to) is not PlaintextCopy:
        return None
    k, v, at = copy_to
    if type(k) is not torch.Tensor or type(v) is not torch.Tensor or type(at) is not int:
        return None
    geo = (k.data_ptr(), v.data_ptr(), k.shape, v.shape, k.stride(), v.stride(), k.dtype, v.dtype)
    memo = prep.copy_memo
    if memo is None or memo[0] != geo:
        memo = prep.copy_memo = (geo, _copy_geometry(k, v, prep))
    bufs = memo[1]
    if bufs is None:
        return None
    (kp, ksb, ksh, kss, k_last, k0, k1), (vp, vsb, vsh, vss, v_last, v0, v1) = bufs
    if not 0 <= at <= min(k_last, v_last):
        return None
    sk, sv = k_src.data_ptr(), v_src.data_ptr()
    sk1, sv1 = sk + prep.src_spans[0], sv + prep.src_spans[1]
    if (sk < k1 and k0 < sk1) or (sv < k1 and k0 < sv1) or (sk < v1 and v0 < sk1) or (sv < v1 and v0 < sv1):
        return None
    return [kp + at * kss, ksb, ksh, kss, vp + at * vss, vsb, vsh, vss]


def _extra_records(records, prep) -> int | None:
    """How many caller records a prepared call carries; None when the general path must take them (not a
    contiguous 1-D RECORD_DTYPE array with valid operations, no audit, or too many for one launch's reservation)."""
    if prep is None or prep.tpl is None or prep.ring is None:
        return None
    try:
        check_records(records, "seal_rows")     # what the general path refuses, it refuses itself
    except (TypeError, ValueError):
        return None
    if not records.flags.c_contiguous or prep.records + records.shape[0] > prep.limit:
        return None
    return records.shape[0]


class RowsSealMixin:
    """``seal_rows`` of the CUDA backend (mixed into ``CudaBackend``)."""

    def seal_rows(self, seal: RowsSeal, pos_start: int, pos_count: int, counter: np.ndarray, offset: int,
                  stride: int, k_src: torch.Tensor, v_src: torch.Tensor, records: np.ndarray | None = None,
                  row_records: RowRecords | None = None, copy_to: PlaintextCopy | None = None) -> None:
        self._refuse_capture()      # before anything is prepared, uploaded or launched
        prep = seal.state
        if (prep is None or prep.pos_count != pos_count or prep.stride != stride or k_src.shape != prep.k_shape
                or v_src.shape != prep.v_shape or (prep.tpl is not None and not self._keys.touch(*prep.keep))):
            prep = seal.state = self._prepare_rows(seal, pos_count, stride, k_src, v_src)
        ints = (counter.tolist() if type(counter) is np.ndarray and counter.dtype == np.int64 and counter.ndim == 1
                else None)
        extra = 0 if records is None else _extra_records(records, prep)
        rows = None if row_records is None else _row_fields(row_records, records, prep)
        if (prep is None or prep.tpl is None or ints is None or extra is None
                or (row_records is not None and rows is None)
                or not self._rows_call_ok(prep, pos_start, ints, offset, k_src, v_src)
                or (copy_to is not None and (copy := _copy_fields(copy_to, k_src, v_src, prep)) is None)):
            # the general path: the same bytes and records, and the error a bad value deserves
            return super().seal_rows(seal, pos_start, pos_count, counter, offset, stride, k_src, v_src, records,
                                     row_records, copy_to)
        n = prep.n
        values = prep.values.copy()
        values[prep.pos] = [pos_start] * n
        values[prep.counter] = ints
        values[prep.offset] = [offset + r for r in prep.rel]
        if copy_to is not None:     # the launch copies the plaintext too (no copy of its own)
            values[prep.copy_fields] = copy
        if rows is not None:        # the launch writes each row's record after its ENCRYPT records
            values[prep.row_fields] = rows
            tail, n_tail = functools.partial(seal.row_records, row_records, Status.ERROR), n
        else:                       # the caller's records (extra of them), copied in behind the launch's own
            tail, n_tail = records, extra
        res = (contextlib.nullcontext(_UNAUDITED) if prep.ring is None
               else prep.ring.records_at(prep.records + n_tail, tail=tail, head=prep.head, **prep.res))
        with res as (records_at, first_no), self._staging.staged(prep.size + extra * _RECORD) as st:
            ik, iv, it, ir, i_first = prep.fields
            values[ik] = k_src.data_ptr()
            values[iv] = v_src.data_ptr()
            values[it] = st.dev_ptr
            values[ir] = records_at
            values[i_first] = first_no % _MOD64
            prep.struct.pack_into(st.host, 0, *values)
            if extra:       # the caller's records, behind the call's own: moved by a copy of their own
                st.host[prep.size:prep.size + extra * _RECORD] = records.view(np.uint8)
            st.upload()
            if extra:
                self._dev.upload_raw(records_at + prep.records * _RECORD, st.host_ptr + prep.size, extra * _RECORD)
            self._launch(_ENCRYPT, prep.grid, _abi.LANES, (np.uint64(st.dev_ptr + prep.t_bytes),))

    def _rows_call_ok(self, prep: _Prepared, pos_start: int, counter: list, offset: int, k_src, v_src) -> bool:
        """Whether this call's values pass every check ``encrypt_chunks`` makes of them (the rest was checked
        when ``prep`` was made)."""
        if (k_src.stride(), v_src.stride(), k_src.dtype, v_src.dtype, k_src.device, v_src.device) != prep.sig:
            return False
        if (type(pos_start) is not int or type(offset) is not int or not 0 <= pos_start < _POS_LIMIT
                or offset < 0):
            return False
        return offset + prep.span <= prep.arena_bytes and len(counter) == prep.n and min(counter) >= 0

    def _prepare_rows(self, seal: RowsSeal, pos_count: int, stride: int, k_src, v_src) -> _Prepared | None:
        """Check and plan what every call of this shape shares, as ``encrypt_chunks`` would. None when a check
        fails (the general path raises); one without a record (``tpl`` None) for a shape the general path
        serves (a launch split into work items or into several launches)."""
        keys, layout, arena, audit = seal.keys, seal.layout, seal.arena, seal.audit
        n = seal.rows.shape[0]
        if n == 0 or type(pos_count) is not int or type(stride) is not int or pos_count < 1 or stride < 0:
            return None
        try:
            table, seen = self._check_common(keys, layout, seal.table(0, pos_count, np.zeros(n, np.int64), 0,
                                                                      stride), arena)
            kp, ks = self._check_tensor("k_src", k_src, layout)
            vp, vs = self._check_tensor("v_src", v_src, layout)
            _abi.check_bounds(table, layout, k_src, v_src, arena, len(keys))
        except (TypeError, ValueError):
            return None
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        limit = max(1, ring.capacity // 4) if ring is not None else None
        items, first, records = self._plan(_ENCRYPT, table[3], layout.bytes_per_position, limit)
        prep = _Prepared(pos_count, stride, k_src, v_src)
        if items.shape[1] != n or (limit is not None and records > limit):
            return prep         # split into work items or launches: the general path
        sched, seen = self._keys.schedules(keys, seen)
        meta = self._meta(seen, keys, audit)
        prep.keep = (seen.ident, sched)     # the record reads the schedules by address: while touch() holds
        prep.meta = meta                    # and the slot metadata (kept alive here)
        prep.sig = (k_src.stride(), v_src.stride(), layout.dtype, layout.dtype, self.device, self.device)
        tpl = self._template(_ENCRYPT, (sched.data_ptr(), meta.data_ptr(), arena.data_ptr(), ks, vs, layout)
                             ).with_fields(n=n, items=0, n_items=n, rec_lo=0, partials=0, counters=0)
        prep.tpl = tpl
        # the region: the chunk table (int64 [TABLE_COLS, n], row-major) then, aligned, the parameter record;
        # packed by one struct call from a list of values where a call sets only its own
        table[7] = first
        prep.n = n
        prep.rel = table[_COL_OFFSET].tolist()
        prep.values = table.reshape(-1).tolist() + tpl.values()
        prep.pos, prep.counter, prep.offset = (slice(c * n, (c + 1) * n)
                                               for c in (_COL_POS, _COL_COUNTER, _COL_OFFSET))
        at = table.size
        prep.fields = tuple(at + _abi.ParamsTemplate.index(f) for f in ("k", "v", "table", "records", "first_no"))
        first_row = at + _abi.ParamsTemplate.index("row_op")
        prep.row_fields = slice(first_row, first_row + 5)    # row_op .. row_rec0, consecutive
        first_copy = at + _abi.ParamsTemplate.index("copy_k")
        prep.copy_fields = slice(first_copy, first_copy + 8)   # copy_k .. copy_v_ss, consecutive
        prep.itemsize = layout.itemsize
        prep.src_spans = (_span(k_src, layout.itemsize), _span(v_src, layout.itemsize))
        prep.copy_memo = None
        prep.t_bytes = _ALIGN * -(-table.nbytes // _ALIGN)
        prep.struct = struct.Struct(f"<{table.size}q{prep.t_bytes - table.nbytes}x{_abi.ParamsTemplate.format}")
        prep.size = prep.struct.size
        prep.records, prep.ring, prep.limit = records, ring, limit
        prep.res = None if ring is None else dict(
            op=int(Op.ENCRYPT), tenant_idx=int(audit.tenant_idx[0]) if len(audit.tenant_idx) else 0,
            session_idx=int(audit.session_idx[0]) if len(audit.session_idx) else 0,
            layer=min(int(layout.layer_idx), 0xFFFF))
        # if the call's block raises, its ENCRYPT stand-ins name each row's tenant, session and row
        prep.head = None if ring is None or records != n else stand_ins(
            int(Op.ENCRYPT), audit.tenant_idx[seal.key_idx], audit.session_idx[seal.key_idx], layout.layer_idx,
            seal.rows)
        prep.grid = min(n, self.launch_slots(_ENCRYPT))
        prep.span = int(table[_COL_OFFSET].max()) + pos_count * layout.bytes_per_position + TAG_SIZE
        prep.arena_bytes = arena.numel()
        return prep
