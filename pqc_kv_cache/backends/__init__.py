"""Crypto backends: one contract (``base``), one implementation per device, chosen here by the tensors' device."""

from __future__ import annotations

import torch

from .base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot

__all__ = ["AuditContext", "ChunkLayout", "ChunkTable", "CryptoBackend", "DecryptStatus", "KeySlot",
           "select_backend"]


def select_backend(device: torch.device | str) -> CryptoBackend:
    """The backend for tensors on ``device``: cuda tensors get the CUDA backend, all else the native host
    backend when it is available, else the host backend (``PQC_KV_CACHE_BACKEND=host|native`` forces one)."""
    device = torch.device(device)
    if device.type == "cuda":
        from .cuda import CudaBackend
        return CudaBackend.for_device(device)
    from .native import select_host_backend
    return select_host_backend()
