"""torch.library operators of the package: sealing and opening a static cache's positions (``kv_seal``).

Importing this package registers the operators (``torch.ops.pqc_kv_cache.seal_positions`` and
``torch.ops.pqc_kv_cache.open_positions``)."""

from __future__ import annotations

from .kv_seal import SealHandler, open_positions, register_handler, seal_positions, unregister_handler

__all__ = ["SealHandler", "open_positions", "register_handler", "seal_positions", "unregister_handler"]
