"""No (key, nonce) pair is ever sealed twice across saves, crops, loads and re-established sessions.

Every seal of every cache goes through one recording backend, which fails the test the moment a pair
comes back. The two fixed scenarios are the ones a counter moved only past a file's own counters gets
wrong: a crop dropped newer chunks before the save, and an older file is loaded after a newer one.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.session import TenantSession
from support.cache_models import tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 16
TENANTS = ("alice", "bob")


class Recording(HostBackend):
    """Seals through the host backend and keeps every (key, epoch, counter) it sealed under."""

    def __init__(self, sealed: set, **kw):
        super().__init__(threads=1, **kw)
        self.sealed = sealed

    def encrypt_chunks(self, keys, layout, chunks, *args, **kwargs):
        for slot, counter in zip(np.asarray(chunks.slot).tolist(), np.asarray(chunks.counter).tolist()):
            pair = (bytes(keys[slot].key), keys[slot].epoch, counter)
            assert pair not in self.sealed, f"(key, nonce) reused: epoch {pair[1]}, counter {counter}"
            self.sealed.add(pair)
        return super().encrypt_chunks(keys, layout, chunks, *args, **kwargs)


def kv(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def step(cache, n, seed):
    k, v = kv(2, n, seed)
    for layer in range(2):
        cache.update(k, v, layer)


def reestablished(secrets):
    """The tenants' sessions rebuilt from the same key material and session ids (a new process would)."""
    return [TenantSession(t, f"{t}-s", ss, b"") for t, ss in zip(TENANTS, secrets)]


def new_cache(two, sealed, mode="sealed", merge=True):
    return EncryptedCache(tiny_model("llama").config, sessions=two, mode=mode, merge_min_segments=2,
                          merge_segments=merge, backend=Recording(sealed))


def load(path, two, sealed, mode="sealed", merge=True):
    return EncryptedCache.load(path, tiny_model("llama").config, two, backend=Recording(sealed),
                               merge_min_segments=2, merge_segments=merge, mode=mode)


def test_crop_then_load_latest_into_reestablished_session_reuses_no_nonce(tmp_path, mode):
    secrets = [os.urandom(32), os.urandom(32)]
    sealed: set = set()
    # no merging: the crop drops whole one-token chunks and re-seals nothing, so the file's highest
    # counter is below the counters the dropped chunks used
    cache = new_cache(reestablished(secrets), sealed, mode, merge=False)
    step(cache, 6, 0)
    for i in range(6):
        step(cache, 1, 1 + i)
    cache.crop(-5)                      # the newest chunks are gone; their counters were used
    cache.save(tmp_path / "latest.pkvf")
    loaded = load(tmp_path / "latest.pkvf", reestablished(secrets), sealed, mode, merge=False)
    for i in range(8):
        step(loaded, 1, 20 + i)         # the recording backend fails on the first reused pair


def test_older_file_loaded_after_newer_reuses_no_nonce(tmp_path, mode):
    secrets = [os.urandom(32), os.urandom(32)]
    sealed: set = set()
    cache = new_cache(reestablished(secrets), sealed, mode)
    step(cache, 4, 0)
    cache.save(tmp_path / "older.pkvf")
    for i in range(6):
        step(cache, 1, 1 + i)
    cache.save(tmp_path / "newer.pkvf")
    newer = load(tmp_path / "newer.pkvf", reestablished(secrets), sealed, mode)
    for i in range(4):
        step(newer, 1, 10 + i)
    older = load(tmp_path / "older.pkvf", reestablished(secrets), sealed, mode)
    for i in range(8):
        step(older, 1, 30 + i)
