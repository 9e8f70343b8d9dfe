"""transformers paths that would silently bypass an EncryptedCache, refused where the call names one.

Continuous batching (``model.generate_batch`` and ``generate(..., cache_implementation="paged")``)
keeps every request's K/V in transformers' own paged cache and ignores a ``past_key_values`` /
``cache`` argument: the caller's EncryptedCache would stay empty, no record would be written, and
all K/V would be plaintext. transformers offers no hook there, so the one entry point is wrapped
once: a call that passes an EncryptedCache is refused before any request is scheduled; every other
call runs as before. Servers that batch continuously use the vLLM connector (docs/vllm.md).
"""

from __future__ import annotations

import functools

CACHE_KEYWORDS = ("past_key_values", "cache")
_MARK = "_pqc_kv_cache_guarded"


class ContinuousBatchingRefused(ValueError):
    """An EncryptedCache was handed to transformers' continuous batching, which would bypass it."""


def _refuse_encrypted_cache(kwargs: dict, cache_type: type) -> None:
    for name in CACHE_KEYWORDS:
        if isinstance(kwargs.get(name), cache_type):
            raise ContinuousBatchingRefused(
                f"transformers' continuous batching (generate_batch, or generate with "
                f"cache_implementation='paged') keeps K/V in its own plaintext paged cache and ignores "
                f"{name}=: the EncryptedCache would stay empty and nothing would be encrypted or audited. "
                f"Use model.generate(..., {name}=cache) without cache_implementation='paged' (batch the "
                f"requests' rows, one session per row), or serve with vLLM through "
                f"pqc_kv_cache.vllm (docs/vllm.md)")


def guard_continuous_batching(cache_type: type) -> bool:
    """Wrap transformers' ``generate_batch`` so that it refuses a ``cache_type`` argument.

    Idempotent; returns False where this transformers has no continuous batching to guard.
    """
    try:
        from transformers.generation.continuous_batching import ContinuousMixin
    except ImportError:   # a transformers without continuous batching: nothing can bypass the cache
        return False
    original = ContinuousMixin.__dict__.get("generate_batch")
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def generate_batch(self, *args, **kwargs):
        _refuse_encrypted_cache(kwargs, cache_type)
        return original(self, *args, **kwargs)

    setattr(generate_batch, _MARK, True)
    ContinuousMixin.generate_batch = generate_batch
    return True
