"""The CPU twin of the CUDA backend, and an audit log whose CUDA ring lives in host memory.

``CpuTwinBackend`` is CudaBackend's own host-side code — checks, chunk tables, key schedules
and their erasure, record indices, launch splitting, the failure queue and check() — with
each kernel launch carried out by its host-shim counterpart (the same primitives, indexing
and parameter struct, compiled by g++), on a fake device whose launch geometry is given.

``TwinLog`` is a real KVAuditLog whose ``cuda_ring()`` is a CudaAuditRing over host tensors
(copies complete at once), so a twin's records go through the real reservation, commit,
abandon and drain code.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.audit.cuda_ring import CudaAuditRing
from pqc_kv_cache.audit.records import RECORD_SIZE
from pqc_kv_cache.backends import kernel_abi, kernel_shim
from pqc_kv_cache.backends.cuda import CudaBackend, DeviceProps
from pqc_kv_cache.backends.cuda_device import CudaDevice

__all__ = ["CpuTwinBackend", "TwinDevice", "fake_device", "TwinLog", "HostRing", "CHUNK_KERNELS"]

CHUNK_KERNELS = ("pqc_encrypt_chunks", "pqc_decrypt_chunks")


def fake_device(sms: int, ctas_per_sm: int) -> DeviceProps:
    """Device properties of a fake GPU: ``sms`` SMs, ``ctas_per_sm`` resident CTAs of a chunk kernel."""
    def occupancy(kernel, block, dynamic_smem):
        assert block == kernel_abi.LANES and dynamic_smem == 0
        return ctas_per_sm if kernel in CHUNK_KERNELS else 8
    return DeviceProps(sms, occupancy)


class _Done:
    """A completed copy event (the twin's uploads are synchronous)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class TwinDevice(CudaDevice):
    """CudaDevice over host memory: buffers are CPU tensors, copies complete when they are made, events are
    always complete, and there is nothing to wait for. ``allocations`` (when ``record``): every buffer made."""

    def __init__(self, record: bool = True):
        super().__init__(torch.device("cpu"))
        self.record_allocations = record
        self.allocations: list[torch.Tensor] = []
        self.uploads = 0

    def _keep(self, t):
        if self.record_allocations:
            self.allocations.append(t)
        return t

    def pinned(self, nbytes):
        return self._keep(torch.zeros(nbytes, dtype=torch.uint8))

    def empty(self, nbytes):
        return self._keep(torch.empty(nbytes, dtype=torch.uint8))

    def upload(self, dst, src):
        self.uploads += 1
        dst.copy_(src)

    def upload_raw(self, dst_ptr, src_ptr, nbytes):
        self.uploads += 1
        ctypes.memmove(dst_ptr, src_ptr, nbytes)

    def record(self):
        return _Done()

    @staticmethod
    def done(event) -> bool:
        return True

    def upload_keys(self, dst, src):
        dst.copy_(src)
        src.zero_()          # what the device's stream-ordered copy of zeros does, here at once

    def synchronize(self) -> None:
        pass

    def launch(self, kernel, grid, block, args):
        raise AssertionError("the twin backend runs its launches itself")


class CpuTwinBackend(CudaBackend):
    """CudaBackend with its kernel launches carried out by the host shim on CPU tensors, on a fake
    device (by default 2 SMs x 2 CTAs: 4 slots, so the scenario tests cut chunks into work items).
    ``order``: the order the shim runs a launch's work items in (the GPU's is arbitrary);
    ``execute=False`` records the launches without running them; ``record=False`` keeps no list of
    launches and buffers (what a benchmark of the host code runs: nothing grows with the calls made).

    ``launches``: (kernel, grid, block) of each launch; ``launch_args``: (kernel, args) where args is
    the pqc_chunk_params record of a chunk kernel, the list of integer arguments of the others;
    ``twin_device``: the TwinDevice (its ``allocations`` and count of ``uploads``)."""

    def __init__(self, props: DeviceProps | None = None, order: int = 0, execute: bool = True,
                 record: bool = True):
        self.device = torch.device("cpu")
        self.twin_device = TwinDevice(record)
        self._init_state(props or fake_device(2, 2), self.twin_device)
        self.order = order
        self.execute = execute
        self.record = record
        self.launches: list[tuple[str, int, int]] = []
        self.launch_args: list[tuple[str, object]] = []

    def _launch(self, kernel, grid, block, args):
        if self.record:
            self.launches.append((kernel, int(grid), int(block)))
        if kernel in CHUNK_KERNELS:
            ptr = int(args[0])
            if self.record:
                raw = ctypes.string_at(ptr, kernel_abi.CHUNK_PARAMS_DTYPE.itemsize)
                self.launch_args.append((kernel, np.frombuffer(raw, dtype=kernel_abi.CHUNK_PARAMS_DTYPE)[0].copy()))
            if self.execute:
                kernel_shim.run_chunk_kernel(kernel, ptr, self.order)
            return
        a = [int(x) for x in args]
        if self.record:
            self.launch_args.append((kernel, a))
        lib = kernel_shim.load()
        if kernel == "pqc_prepare_keys":
            rc = lib.pqc_host_prepare_keys(a[0], a[1], kernel_abi.LANES, a[2])
        elif kernel == "pqc_decrypt_row_records":
            if not self.execute:
                return
            rc = lib.pqc_host_decrypt_row_records(*a)
        else:
            raise AssertionError(kernel)
        assert rc == 0, (kernel, rc)


class HostRing(CudaAuditRing):
    """CudaAuditRing over host tensors: every staging copy completes when it is enqueued."""

    def _allocate(self) -> None:
        self.buf = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8)
        self.staging = torch.zeros((self.capacity, RECORD_SIZE), dtype=torch.uint8)

    def _enqueue_copy(self, slot: int, n: int, after=None):
        self.staging[slot:slot + n].copy_(self.buf[slot:slot + n])
        return True

    @staticmethod
    def _copy_done(event) -> bool:
        return True


class TwinLog(KVAuditLog):
    """A KVAuditLog whose CUDA ring (for any device) is a HostRing of ``ring_capacity`` records."""

    def __init__(self, *args, ring_capacity: int = 1 << 12, **kwargs):
        super().__init__(*args, **kwargs)
        self._twin_ring_capacity = ring_capacity
        self._twin_ring: HostRing | None = None
        self._twin_ring_lock = threading.Lock()

    def cuda_ring(self, device, capacity: int | None = None):
        with self._twin_ring_lock:
            if self._twin_ring is None:   # attached where the log's drain thread finds its rings
                self._twin_ring = self.attach_ring(
                    "twin", HostRing(self.allocator, torch.device("cpu"), capacity or self._twin_ring_capacity))
            return self._twin_ring
