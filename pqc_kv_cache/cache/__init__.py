"""The encrypted KV cache: ``EncryptedCache`` (cache.py) over ``EncryptedLayer`` (layer.py, full attention)
and ``SlidingEncryptedLayer`` (sliding.py), each layer a chunk table (segments.py) over a byte arena
(arena.py), using its cache only through a ``LayerContext`` (context.py); the cache's own audit records
go through one helper (audit.py). ``StaticEncryptedCache`` (static_cache.py) is the preallocated,
compile-able form: transformers' static layers (static_layer.py) sealing each written position through the
``pqc_kv_cache.ops`` operators (static_sealer.py, static_context.py, static_state.py).

The names are imported on first use, so the numpy/torch-only units (segments, arena) import without
transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import LAYER_TYPE_CLASSES, EncryptedCache
    from .layer import EncryptedLayer
    from .sliding import SlidingEncryptedLayer
    from .static_cache import StaticEncryptedCache

_LAZY = {
    "EncryptedCache": ".cache",
    "LAYER_TYPE_CLASSES": ".cache",
    "EncryptedLayer": ".layer",
    "SlidingEncryptedLayer": ".sliding",
    "StaticEncryptedCache": ".static_cache",
}

__all__ = ["EncryptedCache", "EncryptedLayer", "SlidingEncryptedLayer", "LAYER_TYPE_CLASSES",
           "StaticEncryptedCache"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pqc_kv_cache.cache' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
