"""The CUDA backend's device calls, in one place: launches, pinned and device buffers, copies, events.

Everything the CUDA backend asks of the device goes through a ``CudaDevice``, so its host logic
(``cuda.py``, ``cuda_staging.py``, ``cuda_keys.py``) runs unchanged over another implementation: the
CPU twin of the tests (``tests/support/twin.py``) subclasses it with host tensors and runs each launch
through the host shim.

No method here waits for the device: every copy and launch is enqueued on torch's current stream
(``upload_keys`` has the device itself zero the raw keys' pinned staging right after copying it);
``synchronize`` is called only at a synchronisation point the caller owns (reading the failure queue).
"""

from __future__ import annotations

import torch

__all__ = ["CudaDevice", "DeviceProps", "stream_capturing"]


class DeviceProps:
    """What launch geometry needs of a device: its SM count and, per kernel, how many CTAs of a
    given size fit on one SM (the driver's occupancy calculator)."""

    def __init__(self, multi_processor_count: int, max_active_blocks):
        self.multi_processor_count = int(multi_processor_count)
        self._max_active_blocks = max_active_blocks

    def max_active_blocks(self, kernel: str, block: int, dynamic_smem: int) -> int:
        return int(self._max_active_blocks(kernel, block, dynamic_smem))


_TORCH_CAPTURING = torch.cuda.is_current_stream_capturing
_CUDA_BUILD = torch.backends.cuda.is_built()


def stream_capturing() -> bool:
    """Whether torch's current CUDA stream is being captured into a CUDA graph. A torch built without
    CUDA cannot capture (its function would raise): asked only where it can, or where the function was
    replaced."""
    fn = torch.cuda.is_current_stream_capturing
    if fn is _TORCH_CAPTURING and not _CUDA_BUILD:
        return False
    return bool(fn())


class _StreamHandle:
    """A raw CUDA stream handle for a CuPy launch (``kernel(..., stream=...)`` reads ``.ptr``): torch's
    stream, used without wrapping it in a CuPy stream object (``ExternalStream`` is deprecated in
    CuPy 14, and a wrapper must never own, hence destroy, torch's stream)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


class CudaDevice:
    """The device calls of the CUDA backend on one CUDA device (``kernels``: name -> CuPy function)."""

    def __init__(self, device: torch.device, kernels=None, cupy=None):
        self.device = device
        self._kernels = kernels
        self._cupy = cupy
        self._key_zeros: torch.Tensor | None = None   # the device zeros that wipe the raw-key staging

    def launch(self, kernel: str, grid: int, block: int, args: tuple) -> None:
        """Launch one kernel on torch's current stream (asynchronous)."""
        stream = _StreamHandle(torch.cuda.current_stream(self.device).cuda_stream)
        with self._cupy.cuda.Device(self.device.index):
            self._kernels[kernel]((int(grid),), (int(block),), args, stream=stream)

    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked host buffer (uint8) the device copies from without staging."""
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        """A device buffer (uint8), stream-ordered by torch's caching allocator."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy a pinned host buffer into a device buffer, on the current stream, without waiting."""
        dst.copy_(src, non_blocking=True)

    def upload_raw(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        """Copy ``nbytes`` from pinned host memory at ``src_ptr`` to device memory at ``dst_ptr``, on the current
        stream, without waiting (the staging ring's per-call copy: no tensor views to make)."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with self._cupy.cuda.Device(self.device.index):     # the stream's device current, as for a launch
            self._cupy.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, 1, stream)   # 1: host to device

    def record(self):
        """An event recorded on the current stream after the work enqueued so far."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    @staticmethod
    def done(event) -> bool:
        """Non-blocking: has the work before ``event`` completed?"""
        return event.query()

    def upload_keys(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy raw keys from a pinned staging buffer into ``dst`` on the current stream, then have the device
        overwrite the staging with zeros (a stream-ordered copy from a zeroed device buffer), so the staging
        is wiped as soon as the copy has read it and the host waits for nothing. The caller must not touch
        ``src`` afterwards: torch's pinned allocator hands its block out again only once both copies are
        done."""
        n = src.numel()
        if self._key_zeros is None or self._key_zeros.numel() < n:
            self._key_zeros = torch.zeros(max(n, 256), dtype=torch.uint8, device=self.device)
        dst.copy_(src, non_blocking=True)
        src.copy_(self._key_zeros[:n], non_blocking=True)

    def synchronize(self) -> None:
        """Wait for every stream of the device (a synchronisation point the caller owns)."""
        torch.cuda.synchronize(self.device)
