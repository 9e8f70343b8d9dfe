"""Entry classes under the module path ``pqc_kv_cache.entry``.

The classes live in :mod:`pqc_kv_cache.envelope` (with the nonce and AAD
layout they are sealed under); this module offers the same objects.
"""

from __future__ import annotations

from .envelope import EncryptedEntry, EntryMetadata, KVCacheEntry

__all__ = ["EntryMetadata", "KVCacheEntry", "EncryptedEntry"]
