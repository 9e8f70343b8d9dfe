"""Clearing plaintext memory: one helper for every buffer the cache zeroes (scratch, working set)."""

from __future__ import annotations

import torch

__all__ = ["zero"]

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero(t: torch.Tensor) -> None:
    """Zero ``t`` (any strides). In host memory the bytes are cleared through numpy, on the calling thread:
    for the few MiB a layer holds, waking torch's intra-op threads costs more than the memset (on a CPU
    shared with other work, far more). Elsewhere (a GPU), ``zero_`` on the tensor's stream."""
    if t.device.type == "cpu" and t.element_size() in _SAME_SIZE_INT:
        t.view(_SAME_SIZE_INT[t.element_size()]).numpy()[...] = 0
    else:
        t.zero_()
