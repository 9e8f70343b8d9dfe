"""The CUDA backend's static seal: one layer step of a static cache with every per-step state on the device.

``StaticSealMixin.seal_static`` has the contract of ``NativeBackend.seal_static`` (``native/pqc_static.c``
says what a step does: slots, counters from the reserved ranges, ENCRYPT / READ records at the record
head, refusals and the failure record) and gives the same bytes. Nothing of a step is decided on the host:

- the refusals (outside the cache, no room for the records, a row without a usable key, no counter left),
  each chunk's counter (its rank among the eligible chunks of its session slot, from ``nonce_next``), the
  slot table, the records and the failure record are computed by torch operations on the tensors' device,
  on the current stream, with fixed shapes (writes that apply to some chunks only are routed so that no
  two entries of one index write different values);
- the chunks to seal are moved to the front of a device-resident chunk table whose column stride is their
  count (a permutation, computed on the device), and that count is written into the ``n`` and ``n_items``
  fields of a device-resident ``pqc_chunk_params``; then ``pqc_encrypt_chunks`` runs over it (one CTA per
  chunk up to the device's resident CTAs; CTAs past the count do nothing), without audit records of its own;
- what the host provides is fixed for a set of tensors (K / V, arena, key set): the parameter record and
  the table's buffer are made and uploaded once per set and kept; the rows' session slots, key indices and
  reasons are uploaded once per value, and kept with the arena (dropped when it is collected: a graph
  captured over a seal reads them by address, as it reads the arena; more than 64 of them for one arena
  drop them all). A step whose set, key set or row values are new is refused while the current stream is
  being captured (``BackendUnavailableError``): run one step eagerly before a capture.

A call is not safe against a concurrent call with the same tensors on another stream (they share the
table and parameter buffers). A record head outside the record buffer, which the native seal refuses with
a ValueError, is treated here as no room (every chunk refused with RECORDS_FULL): the device cannot raise.

Unverified on a GPU: shown on the CPU twin of the CUDA backend only (``tests/support/twin.py``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import kernel_abi as _abi
from .base import ChunkLayout, KeySlot
from .cuda_device import stream_capturing
from .cuda_static_common import FAIL as _FAIL, RECORD as _RECORD, U32 as _U32
from .cuda_static_common import check_host_rows as _host_rows, check_layer_tensors, check_static_tensor as _check
from .cuda_static_common import pack_records, put_rows as _put_rows
from .cuda_static_open import StaticOpenMixin
from ..errors import BackendUnavailableError

__all__ = ["StaticSealMixin"]

_OP_ENCRYPT, _OP_READ = 1, 9
_ST_REFUSED = 2
_R_NONCES, _R_RECORDS, _R_RANGE = 1, 4, 5       # FailReason of cache/static_state.py
_N_WORD = _abi.CHUNK_PARAMS_DTYPE.fields["n"][1] // 8
_NI_WORD = _abi.CHUNK_PARAMS_DTYPE.fields["n_items"][1] // 8


class _Plan:
    """What stays on the device for one set of tensors of a static seal: the chunk table's buffer and the
    parameter record (with its pinned host copy, kept while the upload may still read it)."""

    __slots__ = ("table", "params", "host", "grid")

    def __init__(self, table, params, host, grid):
        self.table, self.params, self.host, self.grid = table, params, host, grid


class StaticSealMixin(StaticOpenMixin):
    """``seal_static`` for ``CudaBackend`` (the module docstring says how), and ``open_static``
    (``cuda_static_open``), so that the backend has both of a static cache's device operations."""

    def _static_rows(self, arena, row_sess, row_key, row_reason, record_slots) -> tuple:
        """The rows' session slots, key indices and reasons, and the record slots, as device tensors."""
        arrays = (row_sess, row_key, row_reason) + (() if record_slots is None else (record_slots,))
        return self._static_upload(arena, "rows", arrays)

    def _static_plan(self, layout, k, v, arena, sched, meta, total) -> _Plan:
        kp, ks = self._check_tensor("k", k, layout)
        vp, vs = self._check_tensor("v", v, layout)
        key = ("plan", layout, kp, ks, vp, vs, arena.data_ptr(), sched.data_ptr(), meta.data_ptr(), total)

        def make():
            table = torch.zeros(_abi.TABLE_COLS * total, dtype=torch.int64, device=self.device)
            tpl = _abi.ParamsTemplate(sched=sched.data_ptr(), meta=meta.data_ptr(), arena=arena.data_ptr(),
                                      **self._kv_fields("k", (kp,) + ks), **self._kv_fields("v", (vp,) + vs),
                                      **self._layout_fields(layout))
            host = self._dev.pinned(_abi.ParamsTemplate.size)
            tpl.pack_into(host.numpy(), 0, table=table.data_ptr(), n=0, items=0, n_items=0, records=0)
            params = self._dev.empty(_abi.ParamsTemplate.size)
            self._dev.upload(params, host)
            return _Plan(table, params, host, min(total, self.launch_slots("pqc_encrypt_chunks")))
        return self._static_store(arena, key, make)

    def _static_grid(self, arena, batch: int, n: int) -> tuple:
        def make():
            r = torch.arange(batch, dtype=torch.int64, device=self.device).repeat_interleave(n)
            j = torch.arange(n, dtype=torch.int64, device=self.device).repeat(batch)
            return r, j, torch.arange(batch * n, dtype=torch.int64, device=self.device)
        return self._static_store(arena, ("grid", batch, n), make)

    def seal_static(self, keys: Sequence[KeySlot], layout: ChunkLayout, k: torch.Tensor, v: torch.Tensor,
                    io_index: torch.Tensor, positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor,
                    nonce_next: torch.Tensor, nonce_end: torch.Tensor, nonce_epoch: torch.Tensor,
                    records: torch.Tensor, record_head: torch.Tensor, failures: torch.Tensor, ring: bool,
                    row_sess: np.ndarray, row_key: np.ndarray, row_reason: np.ndarray,
                    record_slots: np.ndarray | None) -> None:
        """``NativeBackend.seal_static``'s contract, every step's state kept and computed on the device."""
        dev = self.device
        batch, seq, stride, nsl = check_layer_tensors(self._check_tensor, layout, k, v, arena, meta, dev)
        nsess = int(nonce_next.shape[0]) if isinstance(nonce_next, torch.Tensor) and nonce_next.dim() == 1 else -1
        for name, t in (("nonce_next", nonce_next), ("nonce_end", nonce_end), ("nonce_epoch", nonce_epoch)):
            _check(name, t, torch.int64, (nsess,), dev)
        _check("records", records, torch.uint8, (None, _RECORD), dev)
        _check("record_head", record_head, torch.int64, (2,), dev)
        _check("failures", failures, torch.int64, (_FAIL,), dev)
        _check("positions", positions, torch.int64, (None,), dev)
        n = int(positions.shape[0])
        _check("io_index", io_index, torch.int64, (n,), dev)
        for name, a in (("row_sess", row_sess), ("row_key", row_key), ("row_reason", row_reason)):
            _host_rows(name, a, batch)
        if record_slots is not None and (type(record_slots) is not np.ndarray or record_slots.dtype != np.int64
                                         or record_slots.shape != (nsess, 2)):
            raise ValueError(f"record_slots must be an int64 numpy array of shape [{nsess}, 2]")
        if batch > 65536 or not 0 <= layout.layer_idx <= 0xFFFF or ((row_sess < 0) | (row_sess >= nsess)).any() \
                or (row_key >= len(keys)).any():
            raise ValueError("the CUDA static seal refused its arguments (a row's session slot or key index out "
                             "of range, a batch over 65536 rows or a layer over 65535)")
        if n == 0:
            return
        seen = self._keys.entry(keys) if keys else None
        if seen is not None and not self._keys.prepared(seen) and stream_capturing():
            raise BackendUnavailableError(
                "the CUDA static seal meets a key set without device schedules during a CUDA graph capture: "
                "they must be prepared outside the capture (run one step eagerly first)")
        sched, seen = self._keys.schedules(keys, seen) if keys else (arena, None)
        kmeta = self._keys.meta(seen, keys, None, None) if keys else arena
        rows = self._static_rows(arena, row_sess, row_key, row_reason, record_slots)
        plan = self._static_plan(layout, k, v, arena, sched, kmeta, batch * n)
        self._static_step(plan, rows, layout, seq, nsl, stride, io_index, positions, arena, meta, nonce_next,
                          nonce_end, nonce_epoch, records, record_head, failures, ring)

    def _static_step(self, plan: _Plan, rows: tuple, layout: ChunkLayout, seq: int, nsl: int, stride: int,
                     io_index, positions, arena, meta, nonce_next, nonce_end, nonce_epoch, records, record_head,
                     failures, ring: bool) -> None:
        """The device work of one step (fixed shapes, no host read)."""
        dev = self.device
        batch, n = int(arena.shape[0]), int(positions.shape[0])
        total, nsess, cap = batch * n, int(nonce_next.shape[0]), int(records.shape[0])
        r, j, i = self._static_grid(arena, batch, n)
        row_sess_d, row_key_d, row_reason_d = rows[:3]
        p, io = positions[j], io_index[j]
        rs, rk = row_sess_d[r], row_key_d[r]
        inside = (p >= 0) & (p < _U32) & (io >= 0) & (io < seq)
        if not ring:
            inside &= p < nsl
        why = torch.where(rk < 0, row_reason_d[r], 0)
        why = torch.where(inside, why, _R_RANGE)
        room = None
        if cap:
            h0 = record_head[0]
            room = (h0 >= 0) & (h0 + (total + batch) <= cap)
            why = torch.where(room, why, _R_RECORDS)
        # counters: each eligible chunk's rank among the eligible chunks of its session slot, in chunk order
        eligible = why == 0
        mine = (rs[:, None] == torch.arange(nsess, dtype=torch.int64, device=dev)[None, :]) & eligible[:, None]
        rank = mine.to(torch.int64).cumsum(0).gather(1, rs[:, None]).squeeze(1) - 1
        cand = nonce_next[rs] + rank
        ok = eligible & (cand < nonce_end[rs])
        why = torch.where(eligible & ~ok, _R_NONCES, why)
        counter = torch.where(ok, cand, 0)
        nonce_next.add_((mine & ok[:, None]).sum(0))          # taken before anything is sealed
        epoch = nonce_epoch[rs]
        # slots: the last sealed chunk of a slot is the one sealed into it; a slot written and not sealed is empty
        flat = r * nsl + torch.where(inside, p, 0) % nsl
        last = torch.full((batch * nsl,), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, flat, torch.where(ok & inside, i, -1), "amax")
        winner = last[flat]
        sealed = ok & (winner == i)
        value = torch.stack([counter, epoch, p + 1], dim=1)
        value = torch.where((winner >= 0)[:, None], value[winner.clamp_min(0)], 0)
        _put_rows(meta.view(batch * nsl, 3), flat, inside, value)
        arena_rows = arena.view(batch * nsl, stride)
        _put_rows(arena_rows, flat, inside, torch.zeros((total, stride), dtype=torch.uint8, device=dev))
        # the chunk table: the sealed chunks first (column stride: their count), the rest after them
        m = sealed.to(torch.int64).sum()
        gi = sealed.to(torch.int64).cumsum(0) - 1
        bi = (~sealed).to(torch.int64).cumsum(0) - 1
        c = torch.arange(_abi.TABLE_COLS, dtype=torch.int64, device=dev)[:, None]
        dest = torch.where(sealed[None, :], c * m + gi[None, :], _abi.TABLE_COLS * m + c * (total - m) + bi[None, :])
        cols = torch.stack([rk, r, p, torch.ones_like(p), io, counter, flat * stride, torch.zeros_like(p)])
        plan.table.index_copy_(0, dest.reshape(-1), cols.reshape(-1))
        words = plan.params.view(torch.int64)
        words[_N_WORD:_N_WORD + 1].copy_(m.view(1))
        words[_NI_WORD:_NI_WORD + 1].copy_(m.view(1))
        self._launch("pqc_encrypt_chunks", plan.grid, _abi.LANES, (np.uint64(plan.params.data_ptr()),))
        if cap and len(rows) == 4:
            self._static_records(row_sess_d, rows[3], layout, records, record_head, room, r, rs, p, counter, epoch,
                                 why, positions, nsl, ring)
        self._static_failure(failures, layout.layer_idx, why, r, p, rs)

    def _static_records(self, row_sess_d, rslots, layout, records, record_head, room, r, rs, p, counter, epoch,
                        why, positions, nsl, ring) -> None:
        """ENCRYPT per chunk and READ per row at the record head, when there is room for all of them."""
        dev = self.device
        total, batch = int(r.shape[0]), int(row_sess_d.shape[0])
        count = total + batch
        bpp = layout.bytes_per_position
        rb = torch.arange(batch, dtype=torch.int64, device=dev)
        zb = torch.zeros_like(rb)
        last = positions.max()
        stop = torch.where(last < 0, 0, last + 1)
        first = torch.where(stop > nsl, stop - nsl, 0) if ring else torch.zeros_like(stop)
        span = (stop - first).expand(batch)
        sess = torch.cat([rs, row_sess_d])
        h0, h1 = record_head[0], record_head[1]
        status = torch.where(why != 0, _ST_REFUSED, 0)
        out = pack_records(h1 + torch.arange(count, dtype=torch.int64, device=dev), torch.cat([counter, zb]),
                           torch.cat([p, first.expand(batch)]), torch.cat([torch.ones_like(p), span]),
                           rslots[sess, 0], rslots[sess, 1], torch.cat([epoch, zb]),
                           torch.cat([torch.full_like(p, bpp), span.clamp(0, 1 << 32) * bpp]), layout.layer_idx,
                           torch.cat([r, rb]),
                           torch.cat([torch.full_like(p, _OP_ENCRYPT), torch.full_like(rb, _OP_READ)]),
                           torch.cat([status, zb]))
        at = h0 + torch.arange(count, dtype=torch.int64, device=dev)
        _put_rows(records, at, room.expand(count), out)
        record_head.add_(torch.where(room, count, 0))
