"""The arguments of the native static seal (``pqc_native_static_seal`` of ``native/pqc_static.c``).

``StaticSealArgs`` checks the tensors of one call of a static cache's seal operator (dtype, device,
contiguity and every shape the C side relies on: it reads and writes them through raw pointers) and fills
one thread's int64 argument block with their addresses and sizes. A tensor that does not fit is refused
with a ValueError / TypeError naming it, before anything is read or written.
"""

from __future__ import annotations

import struct
import weakref

import numpy as np
import torch

from .base import ChunkLayout, check_cpu_kv

__all__ = ["StaticSealArgs", "STATIC_ARGS"]

# the argument block's fields, in pqc_static.c's order
_FIELDS = ("pos", "io", "n", "batch", "seq", "slots", "stride", "meta", "next", "end", "epoch", "nsess",
           "records", "cap", "head", "fail", "ring", "row_sess", "row_key", "row_reason", "rslots", "bpp", "layer")
STATIC_ARGS = len(_FIELDS)
_I = {f: i for i, f in enumerate(_FIELDS)}
_TAG = 16
_TENS_COLS = 10
_RECORD = 64


def _tensor(name: str, t, dtype: torch.dtype, shape: tuple) -> int:
    """The address of ``t``, a contiguous CPU tensor of ``dtype`` and ``shape`` (None: any size there)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.dim() != len(shape) \
            or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape [{want}], got "
                         f"{t.dtype} {list(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")
    return t.data_ptr()


def _where(tensors: tuple) -> tuple:
    """What must not have changed for a checked set of tensors to be used again: addresses and shapes."""
    return tuple((t.data_ptr(), t.shape, t.stride()) for t in tensors)


def _desc(t: torch.Tensor) -> list[int]:
    """data pointer, bytes from it to the end of the storage, sizes, strides (``pqc_native.c``'s layout)."""
    ptr = t.data_ptr()
    extent = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size() if ptr else 0
    return [ptr, extent, *t.shape, *t.stride()]


def _array(name: str, a, n: int) -> int:
    if type(a) is not np.ndarray or a.dtype != np.int64 or a.shape != (n,) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous int64 numpy array of {n} entries")
    return a.ctypes.data


class StaticSealArgs:
    """One thread's argument blocks, one per set of tensors a static layer seals with (checked once, then
    recognised by identity, held weakly, and by address: a tensor collected, or whose storage moved, is
    checked again); ``fill`` puts a call's positions into the set's block and returns it."""

    _KEEP = 256          # argument blocks kept per thread; more and they are all dropped

    def __init__(self):
        self.err = np.zeros(2, dtype=np.int64)
        self.err_ptr = self.err.ctypes.data
        self._plans: dict[tuple, tuple] = {}

    def fill(self, layout: ChunkLayout, k: torch.Tensor, v: torch.Tensor, io_index: torch.Tensor,
             positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor, nonce_next: torch.Tensor,
             nonce_end: torch.Tensor, nonce_epoch: torch.Tensor, records: torch.Tensor, record_head: torch.Tensor,
             failures: torch.Tensor, ring: bool, row_sess: np.ndarray, row_key: np.ndarray, row_reason: np.ndarray,
             record_slots: np.ndarray | None) -> tuple[np.ndarray, bytes]:
        """The argument block of this call and the K / V descriptors (``pqc_native.c``'s layout), every
        tensor checked; ValueError / TypeError naming what does not fit."""
        fixed = (k, v, arena, meta, nonce_next, nonce_end, nonce_epoch, records, record_head, failures)
        arrays = (row_sess, row_key, row_reason, record_slots)
        key = (layout, bool(ring), *map(id, fixed), *map(id, arrays))
        plan = self._plans.get(key)
        if plan is not None:
            refs, where, block, tens = plan[:4]
            if all(r() is t for r, t in zip(refs, fixed)) and where == _where(fixed):
                return self._positions(block, io_index, positions), tens
        block = self._check(layout, k, v, arena, meta, nonce_next, nonce_end, nonce_epoch, records, record_head,
                            failures, ring, row_sess, row_key, row_reason, record_slots)
        if len(self._plans) >= self._KEEP:
            self._plans.clear()
        # the numpy arrays are held strongly (the block points into them); the tensors weakly
        tens = struct.pack(f"<{2 * _TENS_COLS}q", *_desc(k), *_desc(v))
        self._plans[key] = (tuple(weakref.ref(t) for t in fixed), _where(fixed), block, tens, arrays)
        return self._positions(block, io_index, positions), tens

    @staticmethod
    def _positions(block: np.ndarray, io_index: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
        block[_I["pos"]] = _tensor("positions", positions, torch.int64, (None,))
        n = positions.shape[0]
        block[_I["io"]] = _tensor("io_index", io_index, torch.int64, (n,))
        block[_I["n"]] = n
        return block

    @staticmethod
    def _check(layout, k, v, arena, meta, nonce_next, nonce_end, nonce_epoch, records, record_head, failures, ring,
               row_sess, row_key, row_reason, record_slots) -> np.ndarray:
        check_cpu_kv("src", k, v, layout, "native")
        batch, _, seq, _ = k.shape
        bpp = layout.bytes_per_position
        if not isinstance(arena, torch.Tensor) or arena.dim() != 3:
            raise ValueError(f"arena must be a [batch, slots, {bpp + _TAG}] tensor")
        slots = int(arena.shape[1])
        b = np.zeros(STATIC_ARGS, dtype=np.int64)
        b[_I["batch"]], b[_I["seq"]], b[_I["slots"]] = batch, seq, slots
        _tensor("arena", arena, torch.uint8, (batch, slots, bpp + _TAG))
        b[_I["stride"]] = bpp + _TAG
        b[_I["meta"]] = _tensor("meta", meta, torch.int64, (batch, slots, 3))
        nsess = int(nonce_next.shape[0]) if isinstance(nonce_next, torch.Tensor) and nonce_next.dim() == 1 else -1
        b[_I["next"]] = _tensor("nonce_next", nonce_next, torch.int64, (nsess,))
        b[_I["end"]] = _tensor("nonce_end", nonce_end, torch.int64, (nsess,))
        b[_I["epoch"]] = _tensor("nonce_epoch", nonce_epoch, torch.int64, (nsess,))
        b[_I["nsess"]] = nsess
        b[_I["records"]] = _tensor("records", records, torch.uint8, (None, _RECORD))
        b[_I["cap"]] = int(records.shape[0])
        b[_I["head"]] = _tensor("record_head", record_head, torch.int64, (2,))
        b[_I["fail"]] = _tensor("failures", failures, torch.int64, (6,))
        b[_I["ring"]] = int(bool(ring))
        b[_I["row_sess"]] = _array("row_sess", row_sess, batch)
        b[_I["row_key"]] = _array("row_key", row_key, batch)
        b[_I["row_reason"]] = _array("row_reason", row_reason, batch)
        if record_slots is not None:
            if type(record_slots) is not np.ndarray or record_slots.dtype != np.int64 \
                    or record_slots.shape != (nsess, 2) or not record_slots.flags.c_contiguous:
                raise ValueError(f"record_slots must be a contiguous int64 numpy array of shape [{nsess}, 2]")
            b[_I["rslots"]] = record_slots.ctypes.data
        b[_I["bpp"]] = bpp
        b[_I["layer"]] = layout.layer_idx
        return b
