"""Shared helpers of the EncryptedCache tests: tiny random-weight models built from configs, sessions.

No tests here; the cache tests (tests/cache/) and the CUDA backend tests import these helpers.
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pqc_kv_cache.session import TenantIdentity, establish_tenant_session

VOCAB = 96


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2):
    """A seeded random-weight causal LM: 2 layers, hidden 64, 4 query heads, 2 KV heads (NeoX: 4 heads)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=0, eos_token_id=None,
                  bos_token_id=1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=8, **common))
    elif kind == "hybrid":      # one full-attention layer, then sliding-window ones (per-layer layer_types)
        types = ["full_attention"] + ["sliding_attention"] * (layers - 1)
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                             max_window_layers=1, layer_types=types, **common))
    elif kind == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def sessions(*tenants: str, ttl: float = 3600.0):
    return [establish_tenant_session(TenantIdentity(t), ttl_seconds=ttl) for t in tenants]


def prompts(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def generate(model, ids, cache=None, attention_mask=None, seed: int | None = None, **kw):
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    if seed is not None:
        torch.manual_seed(seed)
    # past_key_values= is the keyword every supported transformers accepts (5.19-5.23 refuse cache=);
    # 5.24+ call it deprecated in favour of cache=, which test_cache_transformers_compat checks where it exists
    extra = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        return model.generate(ids, attention_mask=attention_mask, **extra, **kw)
