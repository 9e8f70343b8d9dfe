"""One packed upload per call: a persistent pinned staging ring and its device mirror.

A backend call packs everything its launches read from the host (the parameter records, the chunk
table, work items, row descriptors) into one region of a page-locked host buffer, moves the region
with one asynchronous copy to the same offsets of a device buffer, and launches. An event recorded
after the call's launches marks the region free again: the region is handed out again only once that
event has completed (the copy has read the host bytes and every kernel has read the device bytes), so
a later call never overwrites what an earlier one still uses, on any stream. When the ring has no free
room the backend does not wait: it moves to buffers twice the size (the old ones are kept until their
last region completes). No call here waits for the device.
"""

from __future__ import annotations

import collections
import threading

import numpy as np

__all__ = ["StagingRing", "Packed", "ALIGN"]

ALIGN = 256               # every part of a region starts at a multiple of this (the kernels read int64 / uint4)
INITIAL_BYTES = 1 << 16
_ZERO = object()


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Packed:
    """The parts of one call's upload, laid out back to back: ``add(arr)`` returns the part's offset;
    once the region is taken, ``device_ptr(offset)`` is where the part lands on the device."""

    __slots__ = ("parts", "size", "base", "host", "buffers", "start")

    def __init__(self):
        self.parts: list[tuple[int, object, int]] = []
        self.size = 0
        self.base = 0          # device address of the region (set by StagingRing.region)
        self.host = None       # numpy uint8 view of the region's host bytes
        self.buffers = None    # the ring's buffers the region lies in, and its offset there
        self.start = 0

    def add(self, arr) -> int:
        """Room for ``arr``, a numpy array copied in when the region is taken; its offset in the region."""
        return self._room(arr.nbytes, arr)

    def reserve(self, nbytes: int, zero: bool = False) -> int:
        """Room for ``nbytes`` written later through ``host`` (``zero``: zeroed when the region is taken,
        so the upload carries the zeros, e.g. counters the kernels start from)."""
        return self._room(nbytes, _ZERO if zero else None)

    def _room(self, nbytes: int, content) -> int:
        off = self.size
        if content is not None:
            self.parts.append((off, content, nbytes))
        self.size = off + _round(max(1, nbytes))
        return off

    def device_ptr(self, offset: int) -> int:
        return self.base + offset


class _Buffers:
    __slots__ = ("host", "host_np", "host_ptr", "dev", "dev_ptr", "size", "regions")

    def __init__(self, device, size: int):
        self.host = device.pinned(size)
        self.host_np = self.host.numpy()
        self.host_ptr = self.host.data_ptr()
        self.dev = device.empty(size)
        self.dev_ptr = self.dev.data_ptr()
        self.size = size
        self.regions: collections.deque = collections.deque()   # [start, end, event] in hand-out order


class StagingRing:
    """The staging of one backend (see the module docstring); ``device``: a CudaDevice."""

    def __init__(self, device, initial: int = INITIAL_BYTES):
        self._device = device
        self._buf = _Buffers(device, _round(initial))
        self._head = 0
        self._retired: list[_Buffers] = []
        self._lock = threading.Lock()          # calls from several threads take regions of one ring

    @property
    def capacity(self) -> int:
        return self._buf.size

    def _free_completed(self, buf: _Buffers) -> None:
        regions = buf.regions
        while regions and regions[0][2] is not None and self._device.done(regions[0][2]):
            regions.popleft()

    def _fits(self, start: int, size: int) -> bool:
        """Whether [start, start + size) overlaps no region still in use."""
        end = start + size
        for r in self._buf.regions:
            if r[0] < end and start < r[1]:
                return False
        return True

    def _take(self, size: int) -> list:
        buf = self._buf
        self._free_completed(buf)
        if self._retired:
            for old in self._retired:
                self._free_completed(old)
            self._retired = [old for old in self._retired if old.regions]
        start = self._head if self._head + size <= buf.size else 0
        if size > buf.size or not self._fits(start, size):
            self._retired.append(buf)            # kept alive until its regions complete
            buf = self._buf = _Buffers(self._device, max(2 * buf.size, _round(2 * size)))
            start = 0
        region = [start, start + size, None]
        buf.regions.append(region)
        self._head = start + size
        return region

    def region(self, packed: Packed) -> "_Region":
        """Take room for ``packed``, write its parts into the host bytes and copy them to the device in one
        asynchronous copy; the block enqueues the launches that read them. On leaving the block (also by an
        exception) an event on the current stream marks the region free once the device is past it; if that
        event cannot be recorded, the buffers are never handed out again."""
        return _Region(self, packed)

    def _release(self, region: list, buf: _Buffers) -> None:
        """Mark ``region`` (of ``buf``) free once the device is past the work enqueued so far."""
        try:
            region[2] = self._device.record()
        except BaseException:
            # its region never completes: the buffers are retired for good and the next call takes new ones
            with self._lock:
                if buf is self._buf:
                    self._retired.append(buf)
                    self._buf = _Buffers(self._device, buf.size)
                    self._head = 0
            raise

    def staged(self, nbytes: int) -> "_Staged":
        """``with ring.staged(n) as st:`` a region of ``n`` bytes without parts: the caller writes
        ``st.host`` (numpy uint8), calls ``st.upload()`` (one asynchronous copy to ``st.dev_ptr``) and
        enqueues the launches that read it inside the block; released as ``region``'s are."""
        return _Staged(self, _round(max(1, nbytes)))

    @staticmethod
    def device_view(packed: Packed, offset: int, nbytes: int):
        """The device bytes of part ``offset`` of a region (valid inside its ``region`` block only)."""
        start = packed.start + offset
        return packed.buffers.dev[start:start + nbytes]

    def upload(self, packed: Packed) -> None:
        """The one copy of a region taken by ``region`` (call it inside the block, after writing any part
        that was reserved by size)."""
        buf, start = packed.buffers, packed.start
        self._device.upload_raw(buf.dev_ptr + start, buf.host_ptr + start, packed.size)


class _Region:
    """The block of ``StagingRing.region`` (a class: this is on every call's path)."""

    __slots__ = ("_ring", "_packed", "_region", "_buf")

    def __init__(self, ring: StagingRing, packed: Packed):
        self._ring, self._packed = ring, packed

    def __enter__(self) -> Packed:
        ring, packed = self._ring, self._packed
        with ring._lock:
            region = ring._take(packed.size)
            buf = ring._buf
        self._region, self._buf = region, buf
        start = region[0]
        packed.base = buf.dev_ptr + start
        packed.host = host = buf.host_np[start:region[1]]
        packed.buffers, packed.start = buf, start
        try:
            for off, arr, nbytes in packed.parts:
                if arr is _ZERO:
                    host[off:off + nbytes] = 0
                else:
                    if not arr.flags.c_contiguous:
                        arr = np.ascontiguousarray(arr)
                    host[off:off + nbytes] = arr.reshape(-1).view(np.uint8)
        except BaseException:
            ring._release(region, buf)
            raise
        return packed

    def __exit__(self, *exc) -> bool:
        self._ring._release(self._region, self._buf)
        return False


class _Staged:
    """The block of ``StagingRing.staged`` (a decode step's path: no parts to lay out)."""

    __slots__ = ("_ring", "_size", "_region", "_buf", "host", "host_ptr", "dev_ptr")

    def __init__(self, ring: StagingRing, size: int):
        self._ring, self._size = ring, size

    def __enter__(self) -> "_Staged":
        ring = self._ring
        with ring._lock:
            region = ring._take(self._size)
            buf = ring._buf
        self._region, self._buf = region, buf
        start = region[0]
        self.host = buf.host_np[start:region[1]]
        self.host_ptr = buf.host_ptr + start
        self.dev_ptr = buf.dev_ptr + start
        return self

    def upload(self) -> None:
        """The one copy of the region's bytes to the device (asynchronous, on the current stream)."""
        self._ring._device.upload_raw(self.dev_ptr, self.host_ptr, self._size)

    def __exit__(self, *exc) -> bool:
        self._ring._release(self._region, self._buf)
        return False
