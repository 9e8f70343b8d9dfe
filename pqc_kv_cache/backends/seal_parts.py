"""What a prepared row seal's call writes besides its chunks: a record about each row it seals
(:class:`RowRecords`) and a copy of the plaintext it seals (:class:`PlaintextCopy`). Part of the backend
contract (``backends.base`` exports both)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..audit.records import VALID_OPS

__all__ = ["RowRecords", "PlaintextCopy"]

_U32_MAX = 0xFFFFFFFF


class RowRecords(NamedTuple):
    """One audit record per row of a prepared seal's call, written with the call's ENCRYPT records (a device
    backend: by the launch that seals): operation ``op`` (a working-set update's READ of each row),
    positions ``pos_start .. pos_start + pos_count``, ``nbytes`` bytes (a count past 2^32 - 1 is written as
    2^32 - 1, as a device DECRYPT record saturates it); the tenant, session and row each row's, the layer
    the seal's. Status OK; no nonce or epoch."""

    op: int
    pos_start: int
    pos_count: int
    nbytes: int

    def fields(self) -> tuple[int, int, int, int] | None:
        """(op, pos_start, pos_count, nbytes) as a record holds them (nbytes saturated), or None when a value
        cannot be held (an operation code that names none, a position outside 0 .. 2^32 - 1)."""
        op, start, count, nbytes = self
        if not all(type(x) is int for x in self) or op not in VALID_OPS:
            return None
        if not (0 <= start <= _U32_MAX and 0 <= count <= _U32_MAX and nbytes >= 0):
            return None
        return op, start, count, min(nbytes, _U32_MAX)


class PlaintextCopy(NamedTuple):
    """Where a prepared seal's call also writes the plaintext it seals: positions ``at .. at + pos_count``
    (index 2) of ``k`` / ``v`` ([batch, heads, positions, dim]: the sources' batch, heads and dim, dtype and
    device) receive ``k_src`` / ``v_src`` (a device backend: written by the launch that seals, as a
    working-set update's plaintext store is). Not overlapping the sources; after a seal that raised, those
    positions hold unspecified bytes."""

    k: torch.Tensor
    v: torch.Tensor
    at: int

    def views(self, k_src: torch.Tensor, v_src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions the sources go to (TypeError / ValueError for a copy that cannot take them)."""
        k, v, at = self
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and type(at) is int):
            raise TypeError("PlaintextCopy takes two tensors and an int position")
        for name, dst, src in (("k", k, k_src), ("v", v, v_src)):
            n = src.shape[2] if src.dim() == 4 else -1
            if (dst.dim() != 4 or n < 0 or dst.shape[:2] != src.shape[:2] or dst.shape[3] != src.shape[3]
                    or dst.dtype != src.dtype or dst.device != src.device or not 0 <= at <= dst.shape[2] - n):
                raise ValueError(f"copy_to.{name} {tuple(dst.shape)} {dst.dtype} cannot take positions {at}.."
                                 f"{at + max(n, 0)} of {tuple(src.shape)} {src.dtype} on {src.device}")
        n = k_src.shape[2]
        return k.narrow(2, at, n), v.narrow(2, at, n)
