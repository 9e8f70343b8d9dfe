"""The encrypted KV cache: ``EncryptedCache`` (cache.py) over ``EncryptedLayer`` (layer.py, full attention)
and ``SlidingEncryptedLayer`` (sliding.py), each layer a chunk table (segments.py) over a byte arena
(arena.py), using its cache only through a ``LayerContext`` (context.py); the cache's own audit records
go through one helper (audit.py)."""

from .cache import LAYER_TYPE_CLASSES, EncryptedCache
from .layer import EncryptedLayer
from .sliding import SlidingEncryptedLayer

__all__ = ["EncryptedCache", "EncryptedLayer", "SlidingEncryptedLayer", "LAYER_TYPE_CLASSES"]
