"""What the CUDA backend's static seal and open share: argument checks, fixed-shape scatters, the packing of
audit records by torch operations, the failure record, and the device state kept with an arena.

Everything here runs on the tensors' device, on the current stream, with shapes fixed by the arguments:
no value is read on the host (see ``cuda_static`` and ``cuda_static_open``).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..errors import BackendUnavailableError
from .cuda_device import stream_capturing

__all__ = ["RECORD", "TAG", "FAIL", "U32", "u32", "put_rows", "check_static_tensor", "check_host_rows",
           "pack_records", "StaticDeviceState"]

RECORD = 64
TAG = 16
FAIL = 6
U32 = 0xFFFFFFFF
_KEEP = 64           # device states kept per arena (sets of tensors, rows, grids); more and they are all dropped


def u32(x: torch.Tensor) -> torch.Tensor:
    """uint32 saturation of int64 values, as int32 bit patterns."""
    x = x.clamp(0, U32)
    return torch.where(x > 0x7FFFFFFF, x - (1 << 32), x).to(torch.int32)


def put_rows(flat: torch.Tensor, idx: torch.Tensor, write: torch.Tensor, values: torch.Tensor) -> None:
    """``flat[idx[i]] = values[i]`` where ``write[i]``, fixed-shape: entries that do not write are sent to the
    first writer's index with its value (or, with no writer, write back what the first index holds), so every
    index receives one value however the device orders the writes. Entries that write one index must carry
    the same value."""
    first = torch.argmax(write.to(torch.int8))
    idx = idx.clamp(0, flat.shape[0] - 1)
    at = torch.where(write, idx, idx[first])
    fill = torch.where(write[first], values[first], flat[idx[first]])
    shape = (-1,) + (1,) * (values.dim() - 1)
    flat.index_put_((at,), torch.where(write.view(shape), values, fill))


def check_static_tensor(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    """ValueError (TypeError for a non-tensor) unless ``t`` is a contiguous ``dtype`` tensor of ``shape``
    (None: any size) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.device != device or not t.is_contiguous() or t.dim() != len(shape) \
            or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape [{want}] on {device}, got "
                         f"{t.dtype} {list(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")


def check_layer_tensors(check_tensor, layout, k, v, arena, meta, device) -> tuple[int, int, int, int]:
    """What a static layer's seal and open check alike before anything is enqueued: the layout, K and V
    (``check_tensor``: the backend's check of one K/V tensor against the layout; V of K's shape), the arena
    (uint8 [batch, slots >= 1, bytes per position + tag]) and the slot table (int64 [batch, slots, 3]).
    Returns (batch, seq, arena stride, slots)."""
    from .base import ChunkLayout

    if not isinstance(layout, ChunkLayout):
        raise TypeError(f"layout must be a ChunkLayout, got {type(layout).__name__}")
    if (layout.head_dim * layout.itemsize) % 16:
        raise ValueError("head_dim * itemsize must be a multiple of 16 bytes for the CUDA kernels")
    check_tensor("k", k, layout)
    check_tensor("v", v, layout)
    batch, _, seq, _ = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    stride = layout.bytes_per_position + TAG
    if not isinstance(arena, torch.Tensor) or arena.dim() != 3:
        raise ValueError(f"arena must be a [batch, slots, {stride}] tensor")
    slots = int(arena.shape[1])
    check_static_tensor("arena", arena, torch.uint8, (batch, None, stride), device)
    if slots < 1:
        raise ValueError("arena must have at least one slot")
    check_static_tensor("meta", meta, torch.int64, (batch, slots, 3), device)
    return batch, seq, stride, slots


def check_host_rows(name: str, a, n: int) -> None:
    if type(a) is not np.ndarray or a.dtype != np.int64 or a.shape != (n,):
        raise ValueError(f"{name} must be an int64 numpy array of {n} entries")


def pack_records(record_no, nonce_counter, pos_start, pos_count, tenant_idx, session_idx, epoch, nbytes,
                 layer: int, row, op, status) -> torch.Tensor:
    """uint8 [count, 64]: audit records (``RECORD_DTYPE``; time stamps and flags 0) from int64 tensors of
    ``count`` entries each (``layer`` an int; ``op`` and ``status`` tensors or ints); 32-bit fields saturate."""
    count = int(record_no.shape[0])
    zero = torch.zeros_like(record_no)
    # an int becomes a tensor filled on the device (torch.as_tensor of a Python int would copy it from the
    # host, a stream synchronisation, and illegal inside a CUDA graph capture)
    op = torch.full_like(record_no, op) if isinstance(op, int) else op.to(torch.int64).expand(count)
    status = torch.full_like(record_no, status) if isinstance(status, int) else status.to(torch.int64).expand(count)
    # the 64-bit fields: record_no, host_ts_ns, device_ts_ns, nonce_counter
    wide = torch.stack([record_no, zero, zero, nonce_counter], dim=1)
    # the 32-bit ones: pos_start, pos_count, tenant_idx, session_idx, epoch, nbytes, layer | row << 16,
    # op | status << 8 (flags 0)
    narrow = torch.stack([u32(pos_start), u32(pos_count), u32(tenant_idx), u32(session_idx), u32(epoch),
                          u32(nbytes), u32(layer + (row << 16)), u32(op + (status << 8))], dim=1)
    return torch.cat([wide.view(torch.uint8).view(count, 32), narrow.view(torch.uint8).view(count, 32)], dim=1)


class StaticDeviceState:
    """Device state kept with an arena, and the failure record (a mixin of ``CudaBackend``, through the
    static seal and open)."""

    def _static_store(self, arena: torch.Tensor, key, make):
        """What ``make`` gives for ``key``, kept with ``arena``: dropped when the arena is collected (a graph
        captured over a seal or an open reads it by address, as it reads the arena, so it lives as long as
        the arena)."""
        memo = self.__dict__.setdefault("_static", {})
        per = memo.get(id(arena))
        if per is None or per[0]() is not arena:
            per = memo[id(arena)] = (weakref.ref(arena), {})
            weakref.finalize(arena, memo.pop, id(arena), None)
        got = per[1].get(key)
        if got is None:
            if stream_capturing():
                raise BackendUnavailableError(
                    "the CUDA static seal or open meets new tensors or rows during a CUDA graph capture: their "
                    "device state must be set up outside the capture (run one step eagerly first)")
            if len(per[1]) >= _KEEP:
                per[1].clear()
            got = per[1][key] = make()
        return got

    def _static_upload(self, arena: torch.Tensor, tag: str, arrays: tuple) -> tuple:
        """Host int64 arrays as device tensors, uploaded once per value and kept with ``arena``."""
        key = (tag,) + tuple(a.tobytes() for a in arrays) + tuple(a.shape for a in arrays)

        def make():
            return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device) for a in arrays)
        return self._static_store(arena, key, make)

    @staticmethod
    def _static_failure(failures, layer: int, why, r, p, rs) -> None:
        """Count the entries of ``why`` that are not 0 into ``failures[0]`` and, when it held none, name the first
        of them (layer, row, position, reason, session slot)."""
        bad_mask = why != 0
        bad = bad_mask.to(torch.int64).sum()
        f = torch.argmax(bad_mask.to(torch.int8))
        named = torch.stack([torch.full_like(bad, layer), r[f], p[f], why[f], rs[f]])
        fresh = (failures[0] == 0) & (bad > 0)
        failures[1:].copy_(torch.where(fresh, named, failures[1:]))
        failures[0:1].add_(bad.view(1))
