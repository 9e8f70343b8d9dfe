"""A layer's arena stays within a constant factor of what it holds, after every step of every operation.

Bounds, per full-attention layer, checked after every update, crop, reorder and row selection:

- ``used`` (bytes written, live and dead) ≤ 1.5 × ``live`` (the distinct chunks the table names);
- ``capacity`` ≤ 2 × the K/V a DynamicCache holds for the same positions, i.e.
  batch × KV heads × positions × head dim × itemsize × 2 (keys and values).

``live`` is that K/V plus one 16-byte tag per chunk, less what rows share after a beam reorder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.cache.arena import ArenaStats
from pqc_kv_cache.envelope import TAG_SIZE
from support.cache_models import generate, prompts, sessions, tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 64 / 4

USED_PER_LIVE = 1.5
CAPACITY_PER_DYNAMIC = 2.0


@pytest.fixture(scope="module")
def alice_bob():
    return sessions("alice", "bob")


def kv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def dynamic_kv_bytes(layer) -> int:
    """What DynamicCache holds for the layer's positions: K and V, [batch, heads, seq, dim] each."""
    batch = len(layer.row_session_slots)
    return 2 * batch * layer.num_heads * layer.get_seq_length() * layer.head_dim * layer.dtype.itemsize


class Bounds:
    """Checks every layer of ``cache`` against the bounds and keeps the largest ratios seen."""

    def __init__(self, cache):
        self.cache = cache
        self.used_per_live = 0.0
        self.capacity_per_dynamic = 0.0
        self.checks = 0

    def check(self, when: str) -> None:
        for i, layer in enumerate(self.cache.layers):
            if not layer.is_initialized or layer.get_seq_length() == 0:
                continue
            s = layer.arena_stats()
            dyn = dynamic_kv_bytes(layer)
            assert s.used <= USED_PER_LIVE * s.live, f"{when}, layer {i}: {s}"
            assert s.capacity <= CAPACITY_PER_DYNAMIC * dyn, f"{when}, layer {i}: {s}, DynamicCache K/V {dyn}"
            self.used_per_live = max(self.used_per_live, s.used / s.live)
            self.capacity_per_dynamic = max(self.capacity_per_dynamic, s.capacity / dyn)
        self.checks += 1

    def watch(self) -> None:
        """Check after every update of the last layer (a whole decode step) and every reorder, selection
        and crop that ``generate`` makes (wrapped on this cache object only)."""
        cache, last = self.cache, len(self.cache.layers) - 1

        def wrapped(name, after_layer=None):
            inner = getattr(cache, name)

            def call(*args, **kwargs):
                out = inner(*args, **kwargs)
                if after_layer is None or args[2] == after_layer:
                    self.check(name)
                return out
            setattr(cache, name, call)
        wrapped("update", last)
        for name in ("reorder_cache", "batch_select_indices", "crop"):
            wrapped(name)


def test_arena_stats_are_zero_before_the_first_update(alice_bob):
    cache = EncryptedCache(tiny_model("llama").config, sessions=alice_bob)
    assert cache.layers[0].arena_stats() == ArenaStats(0, 0, 0)


def test_live_bytes_are_the_dynamic_cache_bytes_plus_one_tag_per_chunk(alice_bob, mode):
    cache = EncryptedCache(tiny_model("llama").config, sessions=alice_bob, mode=mode)
    for step, n in enumerate([5, 1, 1, 3]):
        cache.update(*kv(2, n, seed=step), 0)
    layer = cache.layers[0]
    assert layer.arena_stats().live == dynamic_kv_bytes(layer) + TAG_SIZE * 2 * layer.num_segments


@pytest.mark.parametrize("prompt_len", [3, 40])
def test_greedy_decode_with_merges_stays_within_the_bounds_after_every_step(alice_bob, mode, prompt_len):
    model = tiny_model("llama")
    cache = EncryptedCache(model.config, sessions=alice_bob, mode=mode)
    bounds = Bounds(cache)
    bounds.watch()
    # 90 new tokens: merges run up to segments larger than the short prompt, which then joins one
    generate(model, prompts(2, prompt_len, seed=3), cache, max_new_tokens=90, do_sample=False)
    assert bounds.checks >= 90
    assert cache.layers[0].num_segments < 20, "merges ran"


def test_beam_search_stays_within_the_bounds_after_every_reorder_and_step(alice_bob, mode):
    model = tiny_model("llama")
    cache = EncryptedCache(model.config, sessions=alice_bob, mode=mode, rows_per_session=3)
    bounds = Bounds(cache)
    bounds.watch()
    generate(model, prompts(2, 12, seed=4), cache, max_new_tokens=40, num_beams=3, num_return_sequences=2,
             do_sample=False)
    assert bounds.checks >= 40


def test_prompt_lookup_decoding_stays_within_the_bounds_across_its_crops(alice_bob, mode):
    model = tiny_model("llama")
    cache = EncryptedCache(model.config, sessions=alice_bob[:1], mode=mode)
    bounds = Bounds(cache)
    bounds.watch()
    ids = torch.tensor([[5, 6, 7, 8, 9] * 6])
    generate(model, ids, cache, max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=4)
    assert bounds.checks >= 10


def test_crops_reorders_and_row_selections_stay_within_the_bounds(alice_bob, mode):
    cache = EncryptedCache(tiny_model("llama").config, sessions=alice_bob, mode=mode, rows_per_session=2)
    bounds = Bounds(cache)
    rng = np.random.default_rng(0)
    batch = 4
    cache.update(*kv(batch, 24, seed=0), 0)
    for step in range(1, 120):
        what = rng.choice(["decode"] * 6 + ["crop", "reorder", "big_crop"])
        seq = cache.layers[0].get_seq_length()
        if what == "crop" and seq > 4:
            cache.crop(-int(rng.integers(1, 4)))
        elif what == "big_crop" and seq > 8:
            cache.crop(-(seq // 2))            # half the positions leave at once: the arena shrinks with them
        elif what == "reorder":
            # rows stay within their session (0, 1: alice; 2, 3: bob); some take another row's chunks
            cache.reorder_cache(torch.tensor([int(rng.integers(0, 2)), int(rng.integers(0, 2)),
                                              2 + int(rng.integers(0, 2)), 2 + int(rng.integers(0, 2))]))
        else:
            cache.update(*kv(batch, int(rng.integers(1, 3)), seed=step), 0)
        bounds.check(f"step {step} ({what})")
    cache.batch_select_indices(torch.tensor([0, 3]))   # half the rows leave
    bounds.check("batch_select_indices")
    cache.update(*kv(2, 1, seed=999), 0)
    bounds.check("update after batch_select_indices")
