"""CUDA crypto backend: the kernels of ``kernels/`` over torch tensors, through CuPy.

The kernel sources ship in the wheel as package data ``pqc_kv_cache.kernels``
(a source checkout falls back to the repository's ``kernels/``). They are
compiled once per process and device with CuPy's ``RawModule`` (NVRTC) as one
translation unit: ``pqc_kernels.cu`` with its local headers inlined
(``kernel_abi.kernel_source``), so NVRTC needs no libc headers. What the host
hands the kernels (tables, slot metadata, the ``pqc_chunk_params`` struct) is
built by ``kernel_abi``, the numpy mirror of ``kernels/pqc_chunk_abi.h``.

Hot path (``encrypt_chunks`` / ``decrypt_chunks``), per call only what changed:

- kernels run on torch's current stream (its handle passed to each launch), on
  the tensors' memory by pointer (``data_ptr``), never through the host;
- chunks are cut into work items (ranges of GCM counter blocks,
  ``kernel_abi.work_items``): fewer chunks than the device's resident CTAs (SM
  count times the kernel's occupancy, both queried once, in ``launch_slots``)
  share the slots in proportion to their length, and the items' partial GHASH
  values are combined on the device; a plan is remembered per chunk shape, so a
  decode step's plan is a look-up. No item is cut below 4 rounds of 256 blocks,
  so a call with less work than that per slot leaves SMs idle: the encrypt of a
  decode step (one position per row) runs one CTA per row;
- everything the launches read from the host (parameter records, chunk table,
  work items, row descriptors, zeroed counters) is packed into one region of a
  persistent pinned staging ring and moved by one asynchronous copy
  (``cuda_staging``); the parameter record's call-independent fields are set
  once per (layout, tensors) and patched (``kernel_abi.ParamsTemplate``);
- a cache's update of every row goes through prepared calls that check once what
  repeats: the row seal (``cuda_rows``) and the read of the layer's segments
  (``cuda_open``: segment-level checks, table and row descriptors, a work plan
  kept per segment's cut);
- key schedules and slot metadata stay on the device per key set
  (``cuda_keys``): a key set's raw keys are written into a pinned staging
  buffer of that preparation's own and copied to the device on the current
  stream, and the device overwrites the staging with zeros right after that
  copy (stream-ordered: when the call returns the staging may still hold the
  keys, until the stream reaches the wipe; the host never waits for it). The
  device copy of the raw keys is zeroed on the stream after
  ``pqc_prepare_keys``, and a schedule is zeroed on the stream when it is
  evicted or ``forget_keys()`` is called;
- no ``.item()``, no ``.cpu()``, no blocking copy, no wait for the compute
  stream; the per-chunk status stays on the device: ``decrypt_chunks`` returns
  it as a uint8 device tensor;
- a call made while the current stream is being captured into a CUDA graph is
  refused (``BackendUnavailableError``): a replay would reuse the staging and
  seal again under the nonces of the capture;
- a cache's update of every row goes through a prepared row seal
  (``rows_seal`` / ``seal_rows``, ``cuda_rows.py``): what ``encrypt_chunks``
  checks and plans is done once per shape, and a call packs the chunk table and
  parameter record with one ``struct`` call into a staging region, makes one
  copy (and one more for records the caller adds) and one launch, its ENCRYPT
  records reserved with ``records_at``.

Failures are read at a synchronisation point the caller owns:

- ``CudaBackend.pending_failures(owner)`` waits for the device, reads the
  failure queue (one record per failing chunk, exact positions, the 64-bit tag
  of the call that found it, written by the decrypt kernel with an atomic
  counter), emits every record as DECRYPT / AUTH_FAILED into the audit log of
  the call that found it, empties the queue, keeps each failure for the owner
  of its call and returns (and forgets) those of ``owner``;
- ``CudaBackend.check(owner)`` does the same and raises
  :class:`DecryptionError` naming the first failure (tenant, layer, positions)
  of ``owner``'s calls, if there was any. Failures of other owners' calls
  wait for their owners' checks;
- the queue is read and emptied with the device idle and under a lock every
  decrypt call holds from its call tag to its last launch, so a decrypt on
  another thread can neither add a failure between the read and the reset
  nor have one erased by it.

``EncryptedCache.check()`` calls ``check(owner=cache)``. A failing chunk's destination
is zeroed by the kernel itself, on the stream, before anything later on the
stream can read it; its row's DECRYPT record (in the audit ring, written by
the kernel) already says AUTH_FAILED without any host involvement.

Audit records: ENCRYPT records (one per row and position) and DECRYPT row
records are written by the kernels into slots reserved with
``log.cuda_ring(device).reservation(n, ...)``, which commits after the launch
and, if anything between the reservation and the launch raises (an upload, an
out-of-memory, the launch itself), abandons the slots as ERROR records, so the
log never waits on them; a call whose records exceed a quarter of the ring is
split into several launches (also inside one chunk: its work items share out
its records).
A chunk table that is already a device tensor costs one host read of
``pos_count`` (to size the reservation) when audit is on: pass numpy tables.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Sequence

import numpy as np
import torch

from ..audit.records import RECORD_DTYPE, Op
from ..envelope import dtype_code
from ..errors import BackendUnavailableError
from . import kernel_abi as _abi
from .base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot
from .cuda_device import CudaDevice, DeviceProps, stream_capturing
from .cuda_failures import FailureBook
from .cuda_keys import KeyStore
from .cuda_staging import Packed, StagingRing
from .cuda_open import RowsOpenMixin
from .cuda_rows import RowsSealMixin
from .cuda_static import StaticSealMixin
from .kernel_abi import kernel_source

__all__ = ["CudaBackend", "DeviceProps", "kernel_source"]

LANES = _abi.LANES                # threads per CTA of the chunk kernels (PQC_LANES)
DYNAMIC_SMEM = 0                  # the chunk kernels use static shared memory only
ROW_RECORD_THREADS = 128
KERNELS = ("pqc_prepare_keys", "pqc_encrypt_chunks", "pqc_decrypt_row_records", "pqc_decrypt_chunks")
FAILURE_QUEUE_CAPACITY = 4096
_MEMO_ENTRIES = 256               # plans and parameter templates remembered (then forgotten all at once)


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError("the CUDA backend needs CuPy (pip install 'pqc-kv-cache-encryption[gpu]')") from exc
    return cupy


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


class CudaBackend(RowsSealMixin, RowsOpenMixin, StaticSealMixin, CryptoBackend):
    """AES-256-GCM over KV chunks on one CUDA device (see the module docstring); ``seal_static``: a static
    cache's layer step with its state on the device (``cuda_static``)."""

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
        self.device = torch.device("cuda", index)
        try:
            with cupy.cuda.Device(index):
                module = cupy.RawModule(code=kernel_source(), options=("-std=c++17",))
                kernels = {name: module.get_function(name) for name in KERNELS}
        except BackendUnavailableError:
            raise
        except Exception as exc:  # CuPy compile / driver errors
            raise BackendUnavailableError(f"cannot build the CUDA kernels on {self.device}: {exc}") from exc
        self._module = module
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count

        def occupancy(kernel: str, block: int, dynamic_smem: int) -> int:
            with cupy.cuda.Device(index):
                return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    kernels[kernel].kernel.ptr, block, dynamic_smem)

        self._init_state(DeviceProps(sms, occupancy), CudaDevice(self.device, kernels, cupy))

    def _init_state(self, props: DeviceProps, dev: CudaDevice) -> None:
        """Per-device state: device calls and properties, failure queue and its book (call tags, failures
        per owner), key store, staging ring, remembered plans and parameter templates."""
        self._props = props
        self._dev = dev
        self._lock = threading.Lock()
        self._fq_lock = threading.Lock()    # decrypt launches (tag to last launch) vs. reading the failure queue
        self._slots: dict[str, int] = {}
        self._fq = torch.zeros((FAILURE_QUEUE_CAPACITY, _abi.RECORD_SIZE), dtype=torch.uint8, device=self.device)
        self._fq_count = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._failures = FailureBook()
        self._keys = KeyStore(dev, self._prepare_keys)
        self._staging = StagingRing(dev)
        self._plans: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._templates: dict[tuple, _abi.ParamsTemplate] = {}

    # ---------------------------------------------------------------- plumbing
    def launch_slots(self, kernel: str) -> int:
        """Resident CTAs of a chunk kernel on the whole device: SM count x CTAs per SM from the
        occupancy query (256 threads, DYNAMIC_SMEM). The one place launch geometry comes from: a
        launch has min(work items, slots) CTAs, and work items are planned for this many slots."""
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
        self._dev.launch(kernel, grid, block, args)

    def _upload_region(self, packed: Packed) -> None:
        """The one host-to-device copy of a call's (or launch group's) packed region."""
        self._staging.upload(packed)

    def _prepare_keys(self, dev_keys: torch.Tensor, n: int, sched: torch.Tensor) -> None:
        self._launch("pqc_prepare_keys", n, 256, (_u64(dev_keys.data_ptr()), np.int64(n), _u64(sched.data_ptr())))

    def _schedules(self, keys: Sequence[KeySlot]) -> torch.Tensor:
        """Device key schedules (uint8 [n, sched_size]) of the call's key slots; prepared once per key set."""
        return self._keys.schedules(keys)[0]

    def _refuse_capture(self) -> None:
        if stream_capturing():
            raise BackendUnavailableError(
                "the CUDA backend cannot be captured into a CUDA graph: a replay would reuse its staging "
                "buffers and seal again under the nonces of the capture; run the cache outside "
                "torch.cuda.graph capture (e.g. torch.compile without mode='reduce-overhead')")

    def _plan(self, kernel: str, pos_count: np.ndarray, bpp: int, limit: int | None
              ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """(work items of a launch over chunks of these position counts, first ENCRYPT record index of each
        chunk (encrypt only), ENCRYPT records of all chunks), remembered per chunk shape (read-only arrays)."""
        slots = self.launch_slots(kernel)
        key = (kernel, pos_count.tobytes(), bpp, slots, limit)
        plan = self._plans.get(key)
        if plan is None:
            items = _abi.work_items(_abi.chunk_rounds(pos_count * bpp), pos_count, slots=slots, record_limit=limit)
            first, records = (_abi.encrypt_record_index(pos_count) if kernel == "pqc_encrypt_chunks"
                              else (None, int(pos_count.sum())))
            items.setflags(write=False)
            plan = (items, first, records)
            if len(self._plans) >= _MEMO_ENTRIES:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _template(self, kernel: str, fixed: tuple) -> _abi.ParamsTemplate:
        """The parameter record of ``kernel`` with its call-independent fields (remembered per value): key
        schedules, slot metadata, arena, the K/V strides and the layout. The K/V pointers are per call (a
        decode step's new states are new tensors)."""
        key = (kernel, fixed)
        tpl = self._templates.get(key)
        if tpl is None:
            (sched, meta, arena, ks, vs, layout) = fixed
            extra = dict(fq=self._fq.data_ptr(), fq_count=self._fq_count.data_ptr(),
                         fq_cap=FAILURE_QUEUE_CAPACITY) if kernel == "pqc_decrypt_chunks" else {}
            tpl = _abi.ParamsTemplate(sched=sched, meta=meta, arena=arena, **self._kv_fields("k", (0,) + ks),
                                      **self._kv_fields("v", (0,) + vs), **self._layout_fields(layout), **extra)
            if len(self._templates) >= _MEMO_ENTRIES:
                self._templates.clear()
            self._templates[key] = tpl
        return tpl

    def _check_tensor(self, name: str, t: torch.Tensor, layout: ChunkLayout) -> tuple[int, tuple[int, int, int]]:
        """(data pointer, byte strides of the batch, head and sequence axes) of a K/V tensor of ``layout``."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, this backend runs on {self.device}")
        shape = t.shape
        if len(shape) != 4 or shape[1] != layout.num_heads or shape[3] != layout.head_dim:
            raise ValueError(f"{name} must be [batch, {layout.num_heads}, seq, {layout.head_dim}], "
                             f"got {tuple(shape)}")
        if t.dtype != layout.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, layout says {layout.dtype}")
        st = t.stride()
        if st[3] != 1:
            raise ValueError(f"{name}: the head_dim axis must be contiguous")
        it = t.element_size()
        return t.data_ptr(), (st[0] * it, st[1] * it, st[2] * it)

    def _check_common(self, keys, layout, chunks, arena):
        """The call's chunk table (int64 [TABLE_COLS, n]) and its key set's handle (the keys checked)."""
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
        seen = self._keys.entry(keys)           # checks each key when the key set is first seen
        return _abi.chunk_table_array(chunks), seen   # a device-resident table costs one host read

    def _meta(self, seen, keys, audit: AuditContext | None) -> torch.Tensor:
        if audit is None:
            return self._keys.meta(seen, keys, None, None)
        return self._keys.meta(seen, keys, audit.tenant_idx, audit.session_idx)

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

    def _reservation(self, ring, n: int, op: Op, layout: ChunkLayout, audit: AuditContext | None):
        """The ring reservation of ``n`` records spanning a launch (ERROR records with these fields stand
        in for them if anything inside raises), or ``(None, 0)`` when the call is not audited."""
        if ring is None or n == 0:
            return contextlib.nullcontext((None, 0))
        return ring.reservation(n, op=int(op), tenant_idx=int(audit.tenant_idx[0]) if len(audit.tenant_idx) else 0,
                                session_idx=int(audit.session_idx[0]) if len(audit.session_idx) else 0,
                                layer=min(int(layout.layer_idx), 0xFFFF))

    @staticmethod
    def _kv_fields(prefix: str, t) -> dict[str, int]:
        ptr, sb, sh, ss = t
        return {prefix: ptr, f"{prefix}_sb": sb, f"{prefix}_sh": sh, f"{prefix}_ss": ss}

    @staticmethod
    def _layout_fields(layout: ChunkLayout) -> dict[str, int]:
        return {"layer": layout.layer_idx, "num_heads": layout.num_heads, "head_dim": layout.head_dim,
                "itemsize": layout.itemsize, "dtype_code": dtype_code(layout.dtype)}

    def _group_region(self, single: bool, outer: Packed, parts: Packed):
        """A launch group's region: the call's own when the call is one launch, else one of its own."""
        return contextlib.nullcontext(outer) if single else self._staging.region(parts)

    # ---------------------------------------------------------------- contract
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        self._refuse_capture()
        table, seen = self._check_common(keys, layout, chunks, arena)
        kp, ks = self._check_tensor("k_src", k_src, layout)
        vp, vs = self._check_tensor("v_src", v_src, layout)
        _abi.check_bounds(table, layout, k_src, v_src, arena, len(keys))
        n = table.shape[1]
        if n == 0:
            return
        sched, seen = self._keys.schedules(keys, seen)
        meta = self._meta(seen, keys, audit)
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        limit = max(1, ring.capacity // 4) if ring is not None else None
        items, table[7], records = self._plan("pqc_encrypt_chunks", table[3], layout.bytes_per_position, limit)
        n_items = items.shape[1]
        if ring is None or records <= limit:     # one launch (every decode step)
            groups, counts = ((0, n_items),), None
        else:
            counts = items[4] - items[3]
            groups = self._groups(counts, limit)
        split = n_items != n
        single = len(groups) == 1
        tpl = self._template("pqc_encrypt_chunks", (sched.data_ptr(), meta.data_ptr(), arena.data_ptr(), ks, vs,
                                                    layout))
        slots = self.launch_slots("pqc_encrypt_chunks")
        # the call's region: table, and the split chunks' partials and (zeroed) counters; a one-launch call's
        # items and parameters too, so it makes one copy
        outer = Packed()
        t_off = outer.add(table)
        p_off = outer.reserve(n_items * _abi.PARTIAL_SIZE) if split else None
        c_off = outer.reserve(4 * n, zero=True) if split else None
        if single:
            i_off = outer.add(items) if split else None     # unsplit: item i = chunk i
            prm_off = outer.reserve(_abi.ParamsTemplate.size)
        with self._staging.region(outer) as call:
            for gi, (a, b) in enumerate(groups):
                grp = call
                if single:      # the one group starts at chunk 0's first record
                    total, rec_lo = records, 0
                else:
                    grp = Packed()
                    i_off = grp.add(np.ascontiguousarray(items[:, a:b]))
                    prm_off = grp.reserve(_abi.ParamsTemplate.size)
                    total = int(counts[a:b].sum())
                    rec_lo = int(table[7][items[0][a]] + items[3][a])
                with self._reservation(ring, total, Op.ENCRYPT, layout, audit) as (view, first_no), \
                        self._group_region(single, call, grp) as g:
                    # record index aux + p is numbered first_no + (aux + p - rec_lo), modulo 2^64 on the device
                    tpl.pack_into(g.host, prm_off, k=kp, v=vp, table=call.device_ptr(t_off), n=n,
                                  items=0 if i_off is None else g.device_ptr(i_off), n_items=b - a,
                                  records=0 if view is None else view.data_ptr(),
                                  first_no=(first_no - rec_lo) % (1 << 64), rec_lo=rec_lo,
                                  partials=0 if p_off is None else call.device_ptr(p_off),
                                  counters=0 if c_off is None else call.device_ptr(c_off))
                    if gi == 0 and not single:
                        self._upload_region(call)         # the call's shared part, with the first launch
                    self._upload_region(g)
                    self._launch("pqc_encrypt_chunks", min(b - a, slots), LANES, (_u64(g.device_ptr(prm_off)),))

    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None, *, owner: object = None) -> DecryptStatus:
        """See :meth:`CryptoBackend.decrypt_chunks`: the status stays on the device; failures are raised by
        ``check(owner)``."""
        self._refuse_capture()
        table, seen = self._check_common(keys, layout, chunks, arena)
        kp, ks = self._check_tensor("k_out", k_out, layout)
        vp, vs = self._check_tensor("v_out", v_out, layout)
        _abi.check_bounds(table, layout, k_out, v_out, arena, len(keys))
        owner_ref = None
        if owner is not None:
            try:
                owner_ref = weakref.ref(owner)
            except TypeError:
                raise TypeError(f"owner must be weak-referenceable, got {type(owner).__name__}") from None
        n = table.shape[1]
        status = torch.empty(n, dtype=torch.uint8, device=self.device)   # the kernel writes every chunk's
        if n == 0:
            return DecryptStatus(device=status)
        sched, seen = self._keys.schedules(keys, seen)
        meta = self._meta(seen, keys, audit)
        ring = audit.log.cuda_ring(self.device) if audit is not None else None
        if ring is not None:
            desc_all, row_of_chunk = _abi.row_descriptors(table, layout.bytes_per_position)
            nrows, limit = desc_all.shape[1], max(1, ring.capacity // 4)
        else:       # no row records: one launch, and no chunk names a row record (aux -1)
            desc_all, row_of_chunk, nrows, limit = None, None, 1, 1
        tpl = self._template("pqc_decrypt_chunks", (sched.data_ptr(), meta.data_ptr(), arena.data_ptr(), ks, vs,
                                                    layout))
        # one launch per group of rows small enough for the ring (rows never straddle a group)
        order = np.argsort(table[1], kind="stable") if nrows > limit else None
        with self._fq_lock:     # the failure queue is not read between this call's tag and its launches
            tag = self._call_tag(audit.log if audit is not None else None, owner, owner_ref)
            for r0 in range(0, nrows, limit):
                r1 = min(nrows, r0 + limit)
                if order is None:
                    sel, sub, desc = None, table, desc_all
                    if row_of_chunk is not None:
                        sub[7] = row_of_chunk
                else:
                    sel = order[(row_of_chunk[order] >= r0) & (row_of_chunk[order] < r1)]
                    sub = np.ascontiguousarray(table[:, sel])
                    desc = np.ascontiguousarray(desc_all[:, r0:r1])
                    sub[7] = row_of_chunk[sel] - r0
                self._decrypt_group(ring, audit, layout, tpl, meta, sub, desc, sel, status, tag, kp, vp)
        return DecryptStatus(device=status)

    def _decrypt_group(self, ring, audit, layout, tpl, meta, sub, desc, sel, status, tag, kp, vp) -> None:
        """The launches of one row group of decrypt_chunks, from one packed region: row records (when
        audited), then the work items."""
        m, nrows = sub.shape[1], 0 if desc is None else desc.shape[1]
        items = self._plan("pqc_decrypt_chunks", sub[3], layout.bytes_per_position, None)[0]
        n_items = items.shape[1]
        split = n_items != m
        pk = Packed()
        t_off = pk.add(sub)
        d_off = pk.add(desc) if ring is not None else None
        i_off = pk.add(items) if split else None            # unsplit: item i = chunk i
        p_off = pk.reserve(n_items * _abi.PARTIAL_SIZE) if split else None
        c_off = pk.reserve(4 * m, zero=True) if split else None
        s_off = pk.add(sel.astype(np.int64)) if sel is not None else None
        prm_off = pk.reserve(_abi.ParamsTemplate.size)
        with self._reservation(ring, nrows, Op.DECRYPT, layout, audit) as (view, first_no), \
                self._staging.region(pk) as g:
            sub_status = status if sel is None else torch.empty(m, dtype=torch.uint8, device=self.device)
            tpl.pack_into(g.host, prm_off, k=kp, v=vp, table=g.device_ptr(t_off), n=m,
                          items=0 if i_off is None else g.device_ptr(i_off), n_items=n_items,
                          status=sub_status.data_ptr(), records=0 if view is None else view.data_ptr(),
                          call_tag=tag, partials=0 if p_off is None else g.device_ptr(p_off),
                          counters=0 if c_off is None else g.device_ptr(c_off))
            self._upload_region(g)
            if view is not None:
                lf = self._layout_fields(layout)
                self._launch("pqc_decrypt_row_records", (nrows + ROW_RECORD_THREADS - 1) // ROW_RECORD_THREADS,
                             ROW_RECORD_THREADS, (_u64(meta.data_ptr()), _u64(g.device_ptr(d_off)), np.int64(nrows),
                                                  *(np.uint32(lf[f]) for f in ("layer", "num_heads", "head_dim",
                                                                                "itemsize", "dtype_code")),
                                                  _u64(view.data_ptr()), np.uint64(first_no)))
            self._launch("pqc_decrypt_chunks", min(n_items, self.launch_slots("pqc_decrypt_chunks")), LANES,
                         (_u64(g.device_ptr(prm_off)),))
            if sel is not None:
                idx = self._staging.device_view(g, s_off, 8 * m).view(torch.int64)
                status[idx] = sub_status

    def forget_keys(self) -> None:
        """Zero and drop the cached device key schedules (on the stream, after every launch enqueued so far
        that reads them), e.g. after retiring epochs, at close."""
        self._keys.forget()

    # ---------------------------------------------------------------- failures (sync point)
    def _call_tag(self, log, owner, owner_ref) -> int:
        return self._failures.tag(log, owner, owner_ref)

    def _read_failures(self) -> tuple[int, np.ndarray | None]:
        """(failures counted, the queue's records as RECORD_DTYPE) of the idle device."""
        count = int(self._fq_count.item())
        kept = min(count, FAILURE_QUEUE_CAPACITY)
        recs = self._fq[:kept].cpu().numpy().copy().view(RECORD_DTYPE).reshape(kept) if kept else None
        return count, recs

    def _reset_failures(self) -> None:
        """Empty the queue: the counter is zeroed, and the reset done before any later launch can count."""
        self._fq_count.zero_()
        self._dev.synchronize()

    def _drain(self) -> None:
        """Wait for the device, read and empty the failure queue: emit each failure into the log of the call
        that found it and keep it for that call's owner."""
        # no decrypt call is between its tag and its launches while the queue is read and reset (the lock),
        # and every stream is idle (a decrypt launched on another stream may still be adding failures)
        with self._fq_lock:
            self._dev.synchronize()
            count, recs = self._read_failures()
            if count:
                self._reset_failures()
            calls = self._failures.take_calls()
        self._failures.file(count, recs, calls)

    def pending_failures(self, owner: object = None) -> list[dict[str, Any]]:
        """Wait for the device, read the failure queue (emitting every failure into the audit log of its call),
        and return and forget the failures of ``owner``'s decrypt calls (None: of calls made without an
        owner), one dict per failing chunk, plus any whose call is unknown (caller-owned synchronisation point)."""
        self._drain()
        return self._failures.pop(owner)

    def check(self, owner: object = None) -> None:
        """Raise DecryptionError if any of ``owner``'s decrypt calls failed since its last check (see
        pending_failures)."""
        self._failures.raise_first(self.pending_failures(owner), self.device)
