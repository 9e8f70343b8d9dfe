"""The CUDA backend's static open: every position a static cache's layer holds in the rows its released-row
mask marks, opened from its fixed slot into the plaintext buffers, with every per-call decision on the device.

``StaticOpenMixin.open_static`` does what the host open of ``cache/static_sealer.py`` does (the same
plaintext, slot reads, records, record head and failure record; ``tests/cache/test_static_device_open.py``
compares them), without reading a tensor on the host:

- the positions held are ``[first, end)`` with ``end`` a device scalar (a ring holds the last ``slots`` of
  them): the call covers every slot of every row (fixed shape) and masks the slots past ``end`` and those of
  the rows the mask (a device tensor) does not mark, which are neither read, written nor recorded (the room
  for the records is counted for the marked rows only);
- each chunk's slot-table entry (counter, epoch, position + 1) is gathered on the device; a slot that does
  not hold its position is refused (NOT_SEALED), every chunk when the record buffer lacks room for two
  records per chunk (RECORDS_FULL), a row whose session cannot be used (SESSION_INVALID, given per row by the
  host), a chunk whose (session slot, epoch) has no key in the call's key set (KEY_UNAVAILABLE: the host
  hands the keys of every live epoch of the rows' sessions, with their slot and epoch);
- the chunks to open are moved to the front of a device-resident chunk table (as the static seal does), their
  count written into the parameter record, and ``pqc_decrypt_chunks`` runs over them (a failing tag zeroes
  its destination and sets its status; the backend's failure queue is not used: the call's failures go to
  the cache's failure record);
- the plaintext of every refused or failed position is zeroed; DECRYPT records (one per row read, status
  AUTH_FAILED if any of its positions failed, then one per failed position: REFUSED, or AUTH_FAILED for a
  tag or a slot that does not hold it) are packed by torch operations at the record head.

The host provides, once per value, the rows' session slots and reasons and the key set's slots and epochs
(uploaded and kept with the arena), and once per set of tensors the parameter record and the table's buffer:
a call meeting new ones while the stream is captured is refused (``BackendUnavailableError``), as a seal is.

Unverified on a GPU: shown on the CPU twin of the CUDA backend only (``tests/support/twin.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import kernel_abi as _abi
from .base import ChunkLayout, KeySlot
from .cuda_device import stream_capturing
from .cuda_static_common import FAIL, RECORD, StaticDeviceState, check_host_rows, check_layer_tensors
from .cuda_static_common import check_static_tensor
from .cuda_static_common import pack_records, put_rows
from ..errors import BackendUnavailableError

__all__ = ["StaticOpenMixin"]

_OP_DECRYPT = 2
_ST_AUTH, _ST_REFUSED = 1, 2
# FailReason of cache/static_state.py
_R_NONCES, _R_INVALID, _R_KEY, _R_RECORDS, _R_RANGE, _R_AUTH, _R_NOT_SEALED = 1, 2, 3, 4, 5, 6, 7
_N_WORD = _abi.CHUNK_PARAMS_DTYPE.fields["n"][1] // 8
_NI_WORD = _abi.CHUNK_PARAMS_DTYPE.fields["n_items"][1] // 8
_BIG = torch.iinfo(torch.int64).max


class _OpenPlan:
    """What stays on the device for one set of tensors of a static open: the chunk table's buffer, the per-chunk
    status, a scratch failure counter the kernel counts into, and the parameter record (with its pinned host
    copy, kept while the upload may still read it)."""

    __slots__ = ("table", "status", "fq_count", "params", "host", "grid")

    def __init__(self, table, status, fq_count, params, host, grid):
        self.table, self.status, self.fq_count = table, status, fq_count
        self.params, self.host, self.grid = params, host, grid


class StaticOpenMixin(StaticDeviceState):
    """``open_static`` for ``CudaBackend`` (the module docstring says how)."""

    def _open_plan(self, layout, k, v, arena, sched, meta, total) -> _OpenPlan:
        kp, ks = self._check_tensor("k", k, layout)
        vp, vs = self._check_tensor("v", v, layout)
        key = ("open-plan", layout, kp, ks, vp, vs, arena.data_ptr(), sched.data_ptr(), meta.data_ptr(), total)

        def make():
            table = torch.zeros(_abi.TABLE_COLS * total, dtype=torch.int64, device=self.device)
            status = torch.zeros(total, dtype=torch.uint8, device=self.device)
            fq_count = torch.zeros(1, dtype=torch.int32, device=self.device)
            tpl = _abi.ParamsTemplate(sched=sched.data_ptr(), meta=meta.data_ptr(), arena=arena.data_ptr(),
                                      status=status.data_ptr(), fq=0, fq_count=fq_count.data_ptr(), fq_cap=0,
                                      **self._kv_fields("k", (kp,) + ks), **self._kv_fields("v", (vp,) + vs),
                                      **self._layout_fields(layout))
            host = self._dev.pinned(_abi.ParamsTemplate.size)
            tpl.pack_into(host.numpy(), 0, table=table.data_ptr(), n=0, items=0, n_items=0, records=0)
            params = self._dev.empty(_abi.ParamsTemplate.size)
            self._dev.upload(params, host)
            return _OpenPlan(table, status, fq_count, params, host,
                             min(total, self.launch_slots("pqc_decrypt_chunks")))
        return self._static_store(arena, key, make)

    def _open_grid(self, arena, batch: int, slots: int) -> tuple:
        def make():
            r = torch.arange(batch, dtype=torch.int64, device=self.device).repeat_interleave(slots)
            j = torch.arange(slots, dtype=torch.int64, device=self.device).repeat(batch)
            return r, j
        return self._static_store(arena, ("open-grid", batch, slots), make)

    def open_static(self, keys: Sequence[KeySlot], layout: ChunkLayout, k: torch.Tensor, v: torch.Tensor,
                    end: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor, released: torch.Tensor,
                    records: torch.Tensor, record_head: torch.Tensor, failures: torch.Tensor, ring: bool,
                    row_sess: np.ndarray, row_reason: np.ndarray, key_sess: np.ndarray, key_epoch: np.ndarray,
                    record_slots: np.ndarray | None) -> None:
        """Open every position a static layer holds (``end``: int64 scalar, one past the last position written;
        a ``ring`` holds the last ``slots`` of them) in the rows ``released`` marks (int64 [batch], non-zero: open
        the row; the others are neither read, written nor recorded) from ``arena`` into ``k`` / ``v`` ([batch,
        heads, slots or more, dim]), every tag verified. ``row_sess`` / ``row_reason``: each row's session slot
        and the reason it cannot be opened (0: none); ``keys[i]`` is the key of session slot ``key_sess[i]`` and
        epoch ``key_epoch[i]``; ``record_slots``: the log's tenant and session index of each session slot (None:
        no records). See the module docstring."""
        dev = self.device
        batch, seq, stride, nsl = check_layer_tensors(self._check_tensor, layout, k, v, arena, meta, dev)
        check_static_tensor("end", end, torch.int64, (), dev)
        check_static_tensor("released", released, torch.int64, (batch,), dev)
        check_static_tensor("records", records, torch.uint8, (None, RECORD), dev)
        check_static_tensor("record_head", record_head, torch.int64, (2,), dev)
        check_static_tensor("failures", failures, torch.int64, (FAIL,), dev)
        check_host_rows("row_sess", row_sess, batch)
        check_host_rows("row_reason", row_reason, batch)
        check_host_rows("key_sess", key_sess, len(keys))
        check_host_rows("key_epoch", key_epoch, len(keys))
        if record_slots is not None and (type(record_slots) is not np.ndarray or record_slots.dtype != np.int64
                                         or record_slots.ndim != 2 or record_slots.shape[1] != 2):
            raise ValueError("record_slots must be an int64 numpy array of shape [sessions, 2]")
        nsess = None if record_slots is None else record_slots.shape[0]
        if batch > 65536 or not 0 <= layout.layer_idx <= 0xFFFF or (row_sess < 0).any() \
                or (nsess is not None and (row_sess >= nsess).any()):
            raise ValueError("the CUDA static open refused its arguments (a row's session slot out of range, a "
                             "batch over 65536 rows or a layer over 65535)")
        seen = self._keys.entry(keys) if keys else None
        if seen is not None and not self._keys.prepared(seen) and stream_capturing():
            raise BackendUnavailableError(
                "the CUDA static open meets a key set without device schedules during a CUDA graph capture: "
                "they must be prepared outside the capture (run one step eagerly first)")
        sched, seen = self._keys.schedules(keys, seen) if keys else (arena, None)
        kmeta = self._keys.meta(seen, keys, None, None) if keys else arena
        arrays = (row_sess, row_reason, key_sess, key_epoch) + (() if record_slots is None else (record_slots,))
        rows = self._static_upload(arena, "open-rows", arrays)
        plan = self._open_plan(layout, k, v, arena, sched, kmeta, batch * nsl)
        self._open_step(plan, rows, layout, k, v, end, arena, meta, released, records, record_head, failures, ring)

    def _open_step(self, plan: _OpenPlan, rows: tuple, layout: ChunkLayout, k, v, end, arena, meta, released,
                   records, record_head, failures, ring: bool) -> None:
        """The device work of one open (fixed shapes, no host read)."""
        dev = self.device
        batch, nsl, stride = (int(x) for x in arena.shape)
        seq, total, cap = int(k.shape[2]), batch * nsl, int(records.shape[0])
        row_sess_d, row_reason_d, key_sess_d, key_epoch_d = rows[:4]
        r, j = self._open_grid(arena, batch, nsl)
        last = end.clamp_min(0)
        first = (last - nsl).clamp_min(0) if ring else torch.zeros_like(last)
        held = (last - first).clamp_min(0)
        p = first + j
        opened = released != 0                 # the rows to open; the others are left as they are
        valid = (p < last) & opened[r]
        flat = r * nsl + p % nsl
        m = meta.view(total, 3)[flat]
        counter, epoch = m[:, 0], m[:, 1]
        rs = row_sess_d[r]
        why = torch.where((m[:, 2] != p + 1) | (j >= seq), _R_NOT_SEALED, 0)
        room = None
        if cap:
            h0 = record_head[0]
            room = (h0 >= 0) & (h0 + 2 * opened.to(torch.int64).sum() * held <= cap)
            why = torch.where(room, why, _R_RECORDS)
        rr = row_reason_d[r]
        why = torch.where((why == 0) & (rr != 0), rr, why)
        if key_sess_d.numel():
            match = (key_sess_d[None, :] == rs[:, None]) & (key_epoch_d[None, :] == epoch[:, None])
            has, ki = match.any(1), torch.argmax(match.to(torch.int8), 1).to(torch.int64)
        else:
            has, ki = torch.zeros_like(valid), torch.zeros_like(r)
        why = torch.where((why == 0) & ~has, _R_KEY, why)
        why = torch.where(valid, why, 0)
        todo = valid & (why == 0)
        # the chunk table: the chunks to open first (column stride: their count), the rest after them
        n = todo.to(torch.int64).sum()
        gi = todo.to(torch.int64).cumsum(0) - 1
        bi = (~todo).to(torch.int64).cumsum(0) - 1
        c = torch.arange(_abi.TABLE_COLS, dtype=torch.int64, device=dev)[:, None]
        dest = torch.where(todo[None, :], c * n + gi[None, :], _abi.TABLE_COLS * n + c * (total - n) + bi[None, :])
        io = j.clamp(max=seq - 1)
        cols = torch.stack([ki, r, p, torch.ones_like(p), io, counter, flat * stride, torch.full_like(p, -1)])
        plan.table.index_copy_(0, dest.reshape(-1), cols.reshape(-1))
        words = plan.params.view(torch.int64)
        words[_N_WORD:_N_WORD + 1].copy_(n.view(1))
        words[_NI_WORD:_NI_WORD + 1].copy_(n.view(1))
        plan.status.zero_()
        self._launch("pqc_decrypt_chunks", plan.grid, _abi.LANES, (np.uint64(plan.params.data_ptr()),))
        failed = todo & (plan.status[gi.clamp_min(0)] != 0)
        why = torch.where(failed, _R_AUTH, why)
        bad = why != 0
        # nothing of a position that did not open is left readable
        zm = torch.zeros(batch * seq, dtype=torch.int64, device=dev)      # (int64: atomic max on any device)
        zm.scatter_reduce_(0, r * seq + io, bad.to(torch.int64), "amax")
        zm = zm.view(batch, 1, seq, 1).to(torch.bool)
        k.masked_fill_(zm, 0)
        v.masked_fill_(zm, 0)
        if cap and len(rows) == 5:
            self._open_records(rows[4], row_sess_d, layout, records, record_head, room, held, first, r, rs, p,
                               counter, epoch, valid, why, opened)
        self._static_failure(failures, layout.layer_idx, why, r, p, rs)

    def _open_records(self, rslots, row_sess_d, layout, records, record_head, room, held, first, r, rs, p, counter,
                      epoch, valid, why, opened) -> None:
        """DECRYPT per row read (the rows ``opened`` marks), then per failed position, at the record head, when
        there is room."""
        dev = self.device
        batch, total = int(row_sess_d.shape[0]), int(r.shape[0])
        nsl = total // batch
        bpp = layout.bytes_per_position
        rb = torch.arange(batch, dtype=torch.int64, device=dev)
        bad = why != 0
        row_counter = torch.where(valid, counter, _BIG).view(batch, nsl).amin(1)
        row_status = torch.where(bad.view(batch, nsl).any(1), _ST_AUTH, 0)
        refused = (why == _R_INVALID) | (why == _R_KEY) | (why == _R_NONCES) | (why == _R_RANGE)
        status = torch.where(refused, _ST_REFUSED, _ST_AUTH)
        rank = bad.to(torch.int64).cumsum(0) - 1
        nbad = bad.to(torch.int64).sum()
        row_rank = opened.to(torch.int64).cumsum(0) - 1
        nrows = opened.to(torch.int64).sum()
        h0, h1 = record_head[0], record_head[1]
        index = torch.cat([row_rank.clamp_min(0), nrows + rank])
        sess = torch.cat([row_sess_d, rs])
        out = pack_records(h1 + index, torch.cat([row_counter, counter]), torch.cat([first.expand(batch), p]),
                           torch.cat([held.expand(batch), torch.ones_like(p)]), rslots[sess, 0], rslots[sess, 1],
                           torch.cat([epoch.view(batch, nsl)[:, 0], epoch]),
                           torch.cat([(held * bpp).expand(batch), torch.full_like(p, bpp)]), layout.layer_idx,
                           torch.cat([rb, r]), _OP_DECRYPT, torch.cat([row_status, status]))
        write = room & (held > 0)
        put_rows(records, h0 + index, torch.cat([write & opened, bad & write]), out)
        record_head.add_(torch.where(write, nrows + nbad, 0))
