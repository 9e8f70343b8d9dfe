"""Clearing plaintext memory: one helper for every buffer the cache zeroes (scratch, working set)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["zero", "zero_at_collection"]

try:   # torch's own way to set aside the active dispatch modes (a fake-tensor mode while compiling)
    from torch.utils._python_dispatch import _disable_current_modes as _outside_modes
except ImportError:    # pragma: no cover - a torch without it has no such modes to set aside
    _outside_modes = contextlib.nullcontext

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero(t: torch.Tensor) -> None:
    """Zero ``t`` (any strides). In host memory the bytes are cleared through numpy, on the calling thread:
    for the few MiB a layer holds, waking torch's intra-op threads costs more than the memset (on a CPU
    shared with other work, far more). Elsewhere (a GPU), ``zero_`` on the tensor's stream."""
    if t.device.type == "cpu" and t.element_size() in _SAME_SIZE_INT:
        t.view(_SAME_SIZE_INT[t.element_size()]).numpy()[...] = 0
    else:
        t.zero_()


def zero_at_collection(tensors) -> None:
    """Zero ``tensors`` from a garbage-collection finalizer. A collection can run in the middle of a
    ``torch.compile`` trace, whose fake-tensor mode would intercept these real tensors and refuse them (the
    plaintext would stay): the active dispatch modes are set aside for the zeroing."""
    with _outside_modes():
        for t in tensors:
            zero(t)
