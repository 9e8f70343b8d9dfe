"""transformers paths an EncryptedCache does not take, refused with what to do instead.

``refuse_unsupported``: the cache's own constructor, for configs and keywords of transformers' other
cache classes (encoder-decoder models, ``offloading=``, ``max_cache_len=``, which ``StaticEncryptedCache``
takes).

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
_REFUSED: list[type] = []      # the cache classes continuous batching refuses (one wrapper for all)


class ContinuousBatchingRefused(ValueError):
    """An EncryptedCache was handed to transformers' continuous batching, which would bypass it."""


def _refuse_encrypted_cache(kwargs: dict, cache_types: tuple) -> None:
    for name in CACHE_KEYWORDS:
        if isinstance(kwargs.get(name), cache_types):
            raise ContinuousBatchingRefused(
                f"transformers' continuous batching (generate_batch, or generate with "
                f"cache_implementation='paged') keeps K/V in its own plaintext paged cache and ignores "
                f"{name}=: the EncryptedCache would stay empty and nothing would be encrypted or audited. "
                f"Use model.generate(..., {name}=cache) without cache_implementation='paged' (batch the "
                f"requests' rows, one session per row), or serve with vLLM through "
                f"pqc_kv_cache.vllm (docs/vllm.md)")


_INSTEAD = {
    "offloading": ("transformers' offloading copies plaintext K/V to the CPU. EncryptedCache moves only "
                   "ciphertext: use mode='working_set' with cache.release() between requests (the plaintext is "
                   "zeroed, the ciphertext stays), or each layer's offload() / prefetch()"),
    "max_cache_len": ("EncryptedCache grows with the sequence as DynamicCache does, and takes no max_cache_len: "
                      "drop the argument, and bound the length with generate(max_new_tokens=...); for the "
                      "preallocated, compile-able form (StaticCache's) use "
                      "StaticEncryptedCache(config, sessions, max_cache_len=...)"),
}


def refuse_unsupported(name: str, config, unsupported: dict) -> None:
    """Refuse a config or keywords the cache cannot honour, each with what to do instead."""
    if not hasattr(config, "get_text_config"):
        raise TypeError(f"config must be a transformers PretrainedConfig, got {type(config).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} supports decoder-only models; this {type(config).__name__} is encoder-decoder (transformers "
            f"keeps two caches there, in an EncoderDecoderCache). Use a decoder-only model (Llama, Mistral, Qwen2, "
            f"GPT-NeoX, ...) with {name}, or generate without it")
    for key in unsupported:
        if key in _INSTEAD:
            raise TypeError(f"{name}() does not take {key}=: {_INSTEAD[key]}")
    if unsupported:
        raise TypeError(f"{name}() got unexpected keyword argument(s) {', '.join(sorted(unsupported))}")


def guard_continuous_batching(cache_type: type) -> bool:
    """Wrap transformers' ``generate_batch`` so that it refuses a ``cache_type`` argument (and every type
    guarded before).

    Idempotent; returns False where this transformers has no continuous batching to guard.
    """
    if cache_type not in _REFUSED:
        _REFUSED.append(cache_type)
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
        _refuse_encrypted_cache(kwargs, tuple(_REFUSED))
        return original(self, *args, **kwargs)

    setattr(generate_batch, _MARK, True)
    ContinuousMixin.generate_batch = generate_batch
    return True
