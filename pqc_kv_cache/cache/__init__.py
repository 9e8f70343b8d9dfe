"""The encrypted KV cache: ``EncryptedCache`` (cache.py) over ``EncryptedLayer`` (layer.py, full attention)
and ``SlidingEncryptedLayer`` (sliding.py), each layer a chunk table (segments.py) over a byte arena
(arena.py), using its cache only through a ``LayerContext`` (context.py); the cache's own audit records
go through one helper (audit.py).

The names are imported on first use, so the numpy/torch-only units (segments, arena) import without
transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import LAYER_TYPE_CLASSES, EncryptedCache
    from .layer import EncryptedLayer
    from .sliding import SlidingEncryptedLayer

_LAZY = {
    "EncryptedCache": ".cache",
    "LAYER_TYPE_CLASSES": ".cache",
    "EncryptedLayer": ".layer",
    "SlidingEncryptedLayer": ".sliding",
}

__all__ = ["EncryptedCache", "EncryptedLayer", "SlidingEncryptedLayer", "LAYER_TYPE_CLASSES"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pqc_kv_cache.cache' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
