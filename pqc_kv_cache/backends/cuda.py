"""CUDA crypto backend: the kernels of ``kernels/`` over torch tensors, through CuPy.

The kernel sources ship in the wheel as package data ``pqc_kv_cache.kernels``
(a source checkout falls back to the repository's ``kernels/``). They are
compiled once per process and device with CuPy's ``RawModule`` (NVRTC) as one
translation unit: a fixed-width-types preamble, ``pqc_audit_record.h``,
``pqc_gcm.cuh`` and ``pqc_kernels.cu`` inlined in that order, so NVRTC needs
no libc headers.

Hot path (``encrypt_chunks`` / ``decrypt_chunks``):

- kernels run on torch's current stream (its handle passed to each launch), on
  the tensors' memory by pointer (``data_ptr``), never through the host;
- every SM is busy whatever the chunk sizes: chunks are cut into work items
  (ranges of GCM counter blocks, ``kernel_host.work_items``) so a launch has at
  least as many items as the device holds resident CTAs (SM count times the
  kernel's occupancy, both queried from the device once, in ``launch_slots``),
  and the items' partial GHASH values are combined on the device;
- the chunk table arrives as numpy arrays (nonce counters from the host's bulk
  allocation) and goes to the device with one pinned, non-blocking copy; key
  schedules are prepared on the device once per key set and cached;
- no ``.item()``, no ``.cpu()``, no blocking copy, no event wait; the
  per-chunk status stays on the device: ``decrypt_chunks`` returns it as a
  uint8 device tensor.

Failures are read at a synchronisation point the caller owns:

- ``CudaBackend.pending_failures()`` waits for the device, reads the failure
  queue (one record per failing chunk, exact positions, written by the decrypt
  kernel with an atomic counter), emits those records as DECRYPT / AUTH_FAILED
  into the audit log of the call that found them, empties the queue and
  returns them as dicts;
- ``CudaBackend.check()`` does the same and raises :class:`DecryptionError`
  naming the first failure (tenant, layer, positions) if there was any.

``EncryptedCache.check()`` calls ``check()``. A failing chunk's destination
is zeroed by the kernel itself, on the stream, before anything later on the
stream can read it; its row's DECRYPT record (in the audit ring, written by
the kernel) already says AUTH_FAILED without any host involvement.

Audit records: ENCRYPT records (one per row and position) and DECRYPT row
records are written by the kernels into slots reserved with
``log.cuda_ring(device).reserve(n)`` and committed after the launch; a call
whose records exceed a quarter of the ring is split into several launches
(also inside one chunk: its work items share out its records).
A chunk table that is already a device tensor costs one host read of
``pos_count`` (to size the reservation) when audit is on: pass numpy tables.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..audit.records import RECORD_DTYPE, Op, Status
from ..envelope import TAG_SIZE, dtype_code
from ..errors import BackendUnavailableError, DecryptionError
from . import kernel_host as _kh
from .base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot

__all__ = ["CudaBackend", "kernel_source"]

LANES = _kh.LANES                 # threads per CTA of the chunk kernels (PQC_LANES)
DYNAMIC_SMEM = 0                  # the chunk kernels use static shared memory only
ROW_RECORD_THREADS = 128
KERNELS = ("pqc_prepare_keys", "pqc_encrypt_chunks", "pqc_decrypt_row_records", "pqc_decrypt_chunks")
FAILURE_QUEUE_CAPACITY = 4096
KEY_CACHE_ENTRIES = 256

_PREAMBLE = """// NVRTC translation unit assembled by pqc_kv_cache/backends/cuda.py
#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif
"""


def kernel_source(src_dir: Path | None = None) -> str:
    """The kernels as one self-contained translation unit (what NVRTC compiles)."""
    src = Path(src_dir) if src_dir is not None else _kh.kernel_sources_dir()
    rec = (src / "pqc_audit_record.h").read_text()
    gcm = (src / "pqc_gcm.cuh").read_text()
    ker = (src / "pqc_kernels.cu").read_text()
    rec = rec.replace("#include <stdint.h>", "// <stdint.h>: types from the preamble")
    ker = ker.replace('#include "pqc_audit_record.h"', "// pqc_audit_record.h: inlined above")
    ker = ker.replace('#include "pqc_gcm.cuh"', "// pqc_gcm.cuh: inlined above")
    if "#include" in ker:
        raise BackendUnavailableError("pqc_kernels.cu includes a header the NVRTC assembly does not inline")
    return "\n".join((_PREAMBLE, rec, gcm, ker))


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError("the CUDA backend needs CuPy (pip install 'pqc_kv_cache[gpu]')") from exc
    return cupy


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


class _StreamHandle:
    """A raw CUDA stream handle for a CuPy launch (``kernel(..., stream=...)`` reads ``.ptr``): torch's
    stream, used without wrapping it in a CuPy stream object (``ExternalStream`` is deprecated in
    CuPy 14, and a wrapper must never own, hence destroy, torch's stream)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class DeviceProps:
    """What launch geometry needs of a device: its SM count and, per kernel, how many CTAs of a
    given size fit on one SM (the driver's occupancy calculator)."""

    def __init__(self, multi_processor_count: int, max_active_blocks):
        self.multi_processor_count = int(multi_processor_count)
        self._max_active_blocks = max_active_blocks

    def max_active_blocks(self, kernel: str, block: int, dynamic_smem: int) -> int:
        return int(self._max_active_blocks(kernel, block, dynamic_smem))


class _Call:
    """What check() needs to emit a failure record found by a decrypt call."""

    __slots__ = ("log", "layer_idx")

    def __init__(self, log, layer_idx):
        self.log = log
        self.layer_idx = layer_idx


class CudaBackend(CryptoBackend):
    """AES-256-GCM over KV chunks on one CUDA device (see the module docstring)."""

    name = "cuda"
    _instances: dict[int, "CudaBackend"] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device | str) -> "CudaBackend":
        """The backend of ``device`` (one per device and process)."""
        device = torch.device(device)
        if device.type != "cuda":
            raise BackendUnavailableError(f"the CUDA backend needs a cuda device, got {device}")
        if not torch.cuda.is_available():
            raise BackendUnavailableError("torch reports no CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        with cls._instances_lock:
            inst = cls._instances.get(index)
            if inst is None:
                inst = cls._instances[index] = cls(index)
            return inst

    def __init__(self, index: int):
        cupy = _import_cupy()
        self._cupy = cupy
        self.device = torch.device("cuda", index)
        self._lock = threading.Lock()
        try:
            with cupy.cuda.Device(index):
                self._module = cupy.RawModule(code=kernel_source(), options=("-std=c++17",))
                self._kernels = {name: self._module.get_function(name) for name in KERNELS}
        except BackendUnavailableError:
            raise
        except Exception as exc:  # CuPy compile / driver errors
            raise BackendUnavailableError(f"cannot build the CUDA kernels on {self.device}: {exc}") from exc
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count

        def occupancy(kernel: str, block: int, dynamic_smem: int) -> int:
            with cupy.cuda.Device(index):
                return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    self._kernels[kernel].kernel.ptr, block, dynamic_smem)

        self._init_state(DeviceProps(sms, occupancy))

    def _init_state(self, props: DeviceProps) -> None:
        """Per-device state: device properties, failure queue, call tags, key-schedule cache."""
        self._props = props
        self._slots: dict[str, int] = {}
        self._sched_size = _kh.SCHED_SIZE
        self._fq = torch.zeros((FAILURE_QUEUE_CAPACITY, 64), dtype=torch.uint8, device=self.device)
        self._fq_count = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._calls: dict[int, _Call] = {}
        self._call_no = 0
        self._key_cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    # ---------------------------------------------------------------- plumbing
    def launch_slots(self, kernel: str) -> int:
        """Resident CTAs of a chunk kernel on the whole device: SM count x CTAs per SM from the
        occupancy query (256 threads, DYNAMIC_SMEM). The one place launch geometry comes from: a
        launch has min(work items, slots) CTAs, and work items are cut so there are at least this many."""
        slots = self._slots.get(kernel)
        if slots is None:
            per_sm = self._props.max_active_blocks(kernel, LANES, DYNAMIC_SMEM)
            if per_sm < 1:
                raise BackendUnavailableError(f"{kernel} cannot run on {self.device}: the occupancy query "
                                              f"gives {per_sm} CTAs of {LANES} threads per SM")
            slots = self._slots[kernel] = self._props.multi_processor_count * per_sm
        return slots

    def _launch(self, kernel: str, grid: int, block: int, args: tuple) -> None:
        """Launch one of KERNELS on torch's current stream (asynchronous)."""
        stream = _StreamHandle(torch.cuda.current_stream(self.device).cuda_stream)
        with self._cupy.cuda.Device(self.device.index):
            self._kernels[kernel]((int(grid),), (int(block),), args, stream=stream)

    def _scratch(self, items: np.ndarray, nchunks: int):
        """(partials, counters) device scratch of a launch whose items split chunks, else (None, None).
        The counters are zeroed on the stream (the kernels count each chunk's finished items)."""
        if not bool((items[7] > 1).any()):
            return None, None
        partials = torch.empty((items.shape[1], _kh.PARTIAL_SIZE), dtype=torch.uint8, device=self.device)
        counters = torch.zeros(nchunks, dtype=torch.int32, device=self.device)
        return partials, counters

    def _upload(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.pin_memory().to(self.device, non_blocking=True)

    def _schedules(self, keys: Sequence[KeySlot]) -> torch.Tensor:
        """Device key schedules (uint8 [n, sched_size]) of the call's key slots; prepared once per key set."""
        # cache key: a hash of each key (the raw keys are not kept as dict keys)
        ident = tuple(hashlib.sha256(bytes(k.key)).digest() for k in keys)
        with self._lock:
            hit = self._key_cache.get(ident)
            if hit is not None:
                self._key_cache.move_to_end(ident)
                return hit
        raw = np.frombuffer(b"".join(bytes(k.key) for k in keys), dtype=np.uint8).reshape(len(keys), 32).copy()
        dev_keys = self._upload(raw)
        sched = torch.empty((len(keys), self._sched_size), dtype=torch.uint8, device=self.device)
        self._launch("pqc_prepare_keys", len(keys), 256,
                     (_u64(dev_keys.data_ptr()), np.int64(len(keys)), _u64(sched.data_ptr())))
        with self._lock:
            self._key_cache[ident] = sched
            while len(self._key_cache) > KEY_CACHE_ENTRIES:
                self._key_cache.popitem(last=False)
        return sched

    def _check_tensor(self, name: str, t: torch.Tensor, layout: ChunkLayout) -> tuple[int, int, int, int]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, this backend runs on {self.device}")
        if t.dim() != 4 or t.shape[1] != layout.num_heads or t.shape[3] != layout.head_dim:
            raise ValueError(f"{name} must be [batch, {layout.num_heads}, seq, {layout.head_dim}], "
                             f"got {tuple(t.shape)}")
        if t.dtype != layout.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, layout says {layout.dtype}")
        if t.stride(3) != 1:
            raise ValueError(f"{name}: the head_dim axis must be contiguous")
        it = t.element_size()
        return t.data_ptr(), t.stride(0) * it, t.stride(1) * it, t.stride(2) * it

    def _check_common(self, keys, layout, chunks, arena) -> np.ndarray:
        if not isinstance(layout, ChunkLayout):
            raise TypeError(f"layout must be a ChunkLayout, got {type(layout).__name__}")
        if not isinstance(chunks, ChunkTable):
            raise TypeError(f"chunks must be a ChunkTable, got {type(chunks).__name__}")
        if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
            raise TypeError("arena must be a 1-D torch.uint8 tensor")
        if arena.device != self.device or not arena.is_contiguous():
            raise ValueError(f"arena must be a contiguous tensor on {self.device}")
        if (layout.head_dim * layout.itemsize) % 16:
            raise ValueError("head_dim * itemsize must be a multiple of 16 bytes for the CUDA kernels")
        for i, k in enumerate(keys):
            if not isinstance(k, KeySlot) or len(k.key) != 32:
                raise ValueError(f"keys[{i}] must be a KeySlot with a 32-byte key")
        cols = []
        for f in ChunkTable.fields():
            a = getattr(chunks, f)
            if isinstance(a, torch.Tensor):
                a = a.detach().to("cpu").numpy()   # device-resident table: one host read (see docstring)
            cols.append(np.asarray(a, dtype=np.int64).reshape(-1))
        n = cols[0].shape[0]
        if any(c.shape[0] != n for c in cols):
            raise ValueError("chunk table columns must all have the same length")
        table = np.empty((_kh.TABLE_COLS, n), dtype=np.int64)
        for i, c in enumerate(cols):
            table[i] = c
        table[7] = -1
        return table

    def _meta(self, keys, audit: AuditContext | None) -> torch.Tensor:
        if audit is None:
            meta = _kh.slot_meta_array(keys)
        else:
            meta = _kh.slot_meta_array(keys, audit.tenant_idx, audit.session_idx)
        return self._upload(meta)

    @staticmethod
    def _groups(counts: np.ndarray, limit: int) -> list[tuple[int, int]]:
        """Split chunk indices into consecutive [a, b) ranges of at most ``limit`` records each
        (a single chunk with more records than ``limit`` is a range of its own)."""
        n = counts.shape[0]
        if n == 0:
            return []
        if int(counts.sum()) <= limit:
            return [(0, n)]
        out, a, acc = [], 0, 0
        for i, c in enumerate(counts.tolist()):
            if acc and acc + c > limit:
                out.append((a, i))
                a, acc = i, 0
            acc += c
        out.append((a, n))
        return out

    # ---------------------------------------------------------------- contract
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        table = self._check_common(keys, layout, chunks, arena)
        kp = self._check_tensor("k_src", k_src, layout)
        vp = self._check_tensor("v_src", v_src, layout)
        _kh.check_bounds(table, layout, k_src, v_src, arena, len(keys))
        n = table.shape[1]
        if n == 0:
            return
        sched = self._schedules(keys)
        meta = self._meta(keys, audit)
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        limit = max(1, ring.capacity // 4) if ring is not None else None
        table[7], _ = _kh.encrypt_record_index(table[3])
        items = _kh.work_items(_kh.chunk_rounds(table[3] * layout.bytes_per_position), table[3],
                               slots=self.launch_slots("pqc_encrypt_chunks"), record_limit=limit)
        n_items = items.shape[1]
        counts = items[4] - items[3]
        groups = self._groups(counts, limit) if ring is not None else [(0, n_items)]
        partials, counters = self._scratch(items, n)
        dev_table = self._upload(table)
        fast = partials is None and len(groups) == 1     # item i = chunk i: no item table
        slots = self.launch_slots("pqc_encrypt_chunks")
        for a, b in groups:
            dev_items = None if fast else self._upload(items[:, a:b])
            total = int(counts[a:b].sum())
            rec_lo = int(table[7][items[0][a]] + items[3][a])
            view, first_no = ring.reserve(total) if ring is not None and total else (None, 0)
            args = (_u64(sched.data_ptr()), _u64(meta.data_ptr()), _u64(dev_table.data_ptr()), np.int64(n),
                    _u64(0 if dev_items is None else dev_items.data_ptr()), np.int64(b - a),
                    np.uint32(layout.layer_idx), np.uint32(layout.num_heads), np.uint32(layout.head_dim),
                    np.uint32(layout.itemsize), np.uint32(dtype_code(layout.dtype)),
                    _u64(kp[0]), np.int64(kp[1]), np.int64(kp[2]), np.int64(kp[3]),
                    _u64(vp[0]), np.int64(vp[1]), np.int64(vp[2]), np.int64(vp[3]),
                    _u64(arena.data_ptr()), _u64(view.data_ptr() if view is not None else 0),
                    # record index aux + p is numbered first_no + (aux + p - rec_lo), modulo 2^64 on the device
                    np.uint64((first_no - rec_lo) % (1 << 64)), np.int64(rec_lo),
                    _u64(0 if partials is None else partials.data_ptr()),
                    _u64(0 if counters is None else counters.data_ptr()))
            try:
                self._launch("pqc_encrypt_chunks", min(b - a, slots), LANES, args)
            except BaseException:
                if view is not None:
                    self._abandon(ring, view, first_no, total, Op.ENCRYPT, layout, audit)
                raise
            if view is not None:
                ring.commit(total, first_no)

    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None) -> torch.Tensor:
        table = self._check_common(keys, layout, chunks, arena)
        kp = self._check_tensor("k_out", k_out, layout)
        vp = self._check_tensor("v_out", v_out, layout)
        _kh.check_bounds(table, layout, k_out, v_out, arena, len(keys))
        n = table.shape[1]
        status = torch.zeros(n, dtype=torch.uint8, device=self.device)
        if n == 0:
            return status
        sched = self._schedules(keys)
        meta = self._meta(keys, audit)
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        with self._lock:
            self._call_no = (self._call_no + 1) & 0xFFFF
            tag = self._call_no
            self._calls[tag] = _Call(audit.log if audit is not None else None, layout.layer_idx)
        # one launch per group of rows small enough for the ring (rows never straddle a group)
        order = np.argsort(table[1], kind="stable")
        desc_all, row_of_chunk = _kh.row_descriptors(table, layout.bytes_per_position)
        nrows = desc_all.shape[1]
        limit = max(1, ring.capacity // 4) if ring is not None else nrows
        for r0 in range(0, nrows, limit):
            r1 = min(nrows, r0 + limit)
            sel = order[(row_of_chunk[order] >= r0) & (row_of_chunk[order] < r1)] if (r0, r1) != (0, nrows) \
                else np.arange(n)
            sub = np.ascontiguousarray(table[:, sel])
            desc = np.ascontiguousarray(desc_all[:, r0:r1])
            sub[7] = row_of_chunk[sel] - r0
            dev_table = self._upload(sub)
            items = _kh.work_items(_kh.chunk_rounds(sub[3] * layout.bytes_per_position), sub[3],
                                   slots=self.launch_slots("pqc_decrypt_chunks"))
            view, first_no = ring.reserve(r1 - r0) if ring is not None else (None, 0)
            common = (np.uint32(layout.layer_idx), np.uint32(layout.num_heads), np.uint32(layout.head_dim),
                      np.uint32(layout.itemsize), np.uint32(dtype_code(layout.dtype)))
            sub_status = status if sel.shape[0] == n else torch.zeros(sel.shape[0], dtype=torch.uint8,
                                                                      device=self.device)
            try:
                self._decrypt_group(view, first_no, desc, r1 - r0, meta, common, sched, dev_table, items, sel,
                                    arena, kp, vp, sub_status, tag)
            except BaseException:
                if ring is not None:
                    self._abandon(ring, view, first_no, r1 - r0, Op.DECRYPT, layout, audit)
                raise
            if sub_status is not status:
                status[self._upload(sel.astype(np.int64))] = sub_status
            if ring is not None:
                ring.commit(r1 - r0, first_no)
        return status

    def _decrypt_group(self, view, first_no, desc, nrows, meta, common, sched, dev_table, items, sel, arena, kp,
                       vp, sub_status, tag) -> None:
        """The launches of one row group of decrypt_chunks: row records (when audited), then the work items."""
        if view is not None:
            dev_desc = self._upload(desc)
            self._launch("pqc_decrypt_row_records", (nrows + ROW_RECORD_THREADS - 1) // ROW_RECORD_THREADS,
                         ROW_RECORD_THREADS, (_u64(meta.data_ptr()), _u64(dev_desc.data_ptr()),
                                              np.int64(nrows), *common, _u64(view.data_ptr()),
                                              np.uint64(first_no)))
        partials, counters = self._scratch(items, sel.shape[0])
        dev_items = None if partials is None else self._upload(items)   # unsplit: item i = chunk i
        n_items = items.shape[1]
        args = (_u64(sched.data_ptr()), _u64(meta.data_ptr()), _u64(dev_table.data_ptr()),
                np.int64(sel.shape[0]), _u64(0 if dev_items is None else dev_items.data_ptr()), np.int64(n_items),
                *common, _u64(arena.data_ptr()),
                _u64(kp[0]), np.int64(kp[1]), np.int64(kp[2]), np.int64(kp[3]),
                _u64(vp[0]), np.int64(vp[1]), np.int64(vp[2]), np.int64(vp[3]),
                _u64(sub_status.data_ptr()), _u64(view.data_ptr() if view is not None else 0),
                _u64(self._fq.data_ptr()), _u64(self._fq_count.data_ptr()),
                np.uint32(FAILURE_QUEUE_CAPACITY), np.uint32(tag),
                _u64(0 if partials is None else partials.data_ptr()),
                _u64(0 if counters is None else counters.data_ptr()))
        self._launch("pqc_decrypt_chunks", min(n_items, self.launch_slots("pqc_decrypt_chunks")), LANES, args)

    @staticmethod
    def _abandon(ring, view, first_no: int, n: int, op: Op, layout: ChunkLayout, audit: AuditContext) -> None:
        """A launch failed after its audit slots were reserved: fill them with ERROR records and commit, so
        the log stays dense and its drain is not left waiting on a reservation that never completes."""
        recs = np.zeros(n, dtype=RECORD_DTYPE)
        recs["record_no"] = first_no + np.arange(n, dtype=np.uint64)
        recs["op"] = int(op)
        recs["status"] = int(Status.ERROR)
        recs["layer"] = layout.layer_idx if layout.layer_idx < 0xFFFF else 0xFFFF
        recs["row"] = 0xFFFF
        recs["tenant_idx"] = int(audit.tenant_idx[0]) if len(audit.tenant_idx) else 0
        recs["session_idx"] = int(audit.session_idx[0]) if len(audit.session_idx) else 0
        view.copy_(torch.from_numpy(recs.view(np.uint8).reshape(n, RECORD_DTYPE.itemsize)))
        ring.commit(n, first_no)

    def clear_key_cache(self) -> None:
        """Drop the cached device key schedules (e.g. after retiring epochs)."""
        with self._lock:
            self._key_cache.clear()

    # ---------------------------------------------------------------- sync point
    def pending_failures(self) -> list[dict[str, Any]]:
        """Wait for the device, read the failure queue, emit its records into the audit logs,
        empty it, and return one dict per failing chunk (caller-owned synchronisation point)."""
        # every stream, not only the current one: a decrypt launched on another stream may still be adding
        # failures, and zeroing the count below would lose them
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with self._lock:
            count = int(self._fq_count.item())
            if count == 0:
                self._calls.clear()
                return []
            kept = min(count, FAILURE_QUEUE_CAPACITY)
            recs = self._fq[:kept].cpu().numpy().copy().view(RECORD_DTYPE).reshape(kept)
            self._fq_count.zero_()
            calls, self._calls = self._calls, {}
        out = []
        for r in recs:
            call = calls.get(int(r["flags"]))
            log = call.log if call is not None else None
            if log is not None:
                log.emit(Op.DECRYPT, tenant_idx=int(r["tenant_idx"]), session_idx=int(r["session_idx"]),
                         layer=int(r["layer"]), row=int(r["row"]), pos_start=int(r["pos_start"]),
                         pos_count=int(r["pos_count"]), nonce_counter=int(r["nonce_counter"]),
                         epoch=int(r["epoch"]), nbytes=int(r["nbytes"]), status=Status.AUTH_FAILED,
                         device_ts_ns=int(r["device_ts_ns"]))
            tenant_id = log.tenant_id_of(int(r["tenant_idx"])) if log is not None else None
            out.append({"tenant_idx": int(r["tenant_idx"]), "tenant_id": tenant_id,
                        "session_idx": int(r["session_idx"]), "layer_idx": int(r["layer"]),
                        "row": int(r["row"]),
                        "positions": range(int(r["pos_start"]), int(r["pos_start"]) + int(r["pos_count"])),
                        "nonce_counter": int(r["nonce_counter"]), "epoch": int(r["epoch"])})
        if count > kept:
            out.append({"tenant_idx": None, "tenant_id": None, "session_idx": None, "layer_idx": None,
                        "row": None, "positions": None, "nonce_counter": None, "epoch": None,
                        "overflow": count - kept})
        return out

    def check(self) -> None:
        """Raise DecryptionError if any chunk failed since the last check (see pending_failures)."""
        fails = self.pending_failures()
        if not fails:
            return
        f = fails[0]
        who = f["tenant_id"] if f["tenant_id"] is not None else f"#{f['tenant_idx']}"
        pos = f["positions"]
        raise DecryptionError(
            f"authentication failed for tenant {who}, layer {f['layer_idx']}, positions "
            f"{pos.start}..{pos.stop - 1} ({len(fails)} chunk(s) failed on {self.device}); "
            "their plaintext was zeroed", tenant_id=f["tenant_id"], layer_idx=f["layer_idx"], positions=pos)
