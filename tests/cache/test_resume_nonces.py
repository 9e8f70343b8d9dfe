"""No (key, nonce) pair is ever sealed twice across saves, crops, loads and re-established sessions.

Every seal of every cache goes through one recording backend, which fails the test the moment a pair
comes back. The two fixed scenarios are the ones a counter moved only past a file's own counters gets
wrong: a crop dropped newer chunks before the save, and an older file is loaded after a newer one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import SaveFileError
from pqc_kv_cache.resumption import export_session, generate_kek_file, import_session, resume_session
from pqc_kv_cache.session import TenantKeyPair, TenantSession, establish_tenant_session
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


# ---- any sequence -------------------------------------------------------------------------------------
OPS = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 3)),
    st.tuples(st.just("crop"), st.integers(1, 3)),
    st.tuples(st.just("save")),
    st.tuples(st.just("load"), st.integers(0, 99)),
    st.tuples(st.just("reestablish"), st.sampled_from(["secret", "export", "keypair"]), st.integers(0, 99)),
    st.tuples(st.just("switch"), st.integers(0, 99)),
    st.tuples(st.just("rotate")),
), min_size=1, max_size=16)

# why a load may be refused in such a sequence: never a reason that could hide a reuse
ALLOWED_REFUSALS = ("another branch", "retired")


class World:
    """Tenants with key pairs, the session instances built so far (each with the cache it works on), the
    files saved so far, and one record of every seal."""

    def __init__(self, tmp: Path, mode: str):
        self.tmp, self.mode, self.sealed = tmp, mode, set()
        self.pairs = [TenantKeyPair.generate(t) for t in TENANTS]
        first = [establish_tenant_session(kp.identity()) for kp in self.pairs]
        self.instances = [[first, None]]
        self.current = 0
        self.files: list[Path] = []
        self.seed = 0
        self.kek = tmp / "session.kek"
        generate_kek_file(self.kek)

    @property
    def sessions(self):
        return self.instances[self.current][0]

    @property
    def cache(self):
        return self.instances[self.current][1]

    def run(self, op) -> None:
        getattr(self, op[0])(*op[1:])

    def update(self, n: int) -> None:
        if self.cache is None:
            self.instances[self.current][1] = new_cache(self.sessions, self.sealed, self.mode)
        self.seed += 1
        step(self.cache, n, self.seed)

    def crop(self, n: int) -> None:
        if self.cache is not None and self.cache.get_seq_length() > n:
            self.cache.crop(-n)

    def save(self) -> None:
        if self.cache is not None and self.cache.get_seq_length() > 0:
            path = self.tmp / f"f{len(self.files)}.pkvf"
            self.cache.save(path)
            self.files.append(path)

    def load(self, i: int) -> None:
        if not self.files:
            return
        before = [(s.lineage, s.owns_epoch, s.live_epochs) for s in self.sessions]
        try:
            cache = load(self.files[i % len(self.files)], self.sessions, self.sealed, self.mode)
        except SaveFileError as exc:
            assert any(why in str(exc) for why in ALLOWED_REFUSALS), exc
            assert [(s.lineage, s.owns_epoch, s.live_epochs) for s in self.sessions] == before
            return
        self.instances[self.current][1] = cache

    def reestablish(self, how: str, i: int) -> None:
        old = self.sessions
        if how == "secret":
            new = []
            for kp, s in zip(self.pairs, old):
                ss = kp.shared_secret(s.kem_ciphertext)
                new.append(TenantSession(s.tenant_id, s.session_id, bytes(ss), s.kem_ciphertext))
        elif how == "keypair":
            new = [resume_session(kp, s.tenant_id, s.session_id, s.kem_ciphertext) for kp, s in zip(self.pairs, old)]
        else:
            new = [import_session(export_session(s, self.kek), self.kek) for s in old]
        self.instances.append([new, None])
        self.current = len(self.instances) - 1
        self.load(i)

    def switch(self, i: int) -> None:
        self.current = i % len(self.instances)

    def rotate(self) -> None:
        if self.cache is not None:
            self.cache.rotate("alice")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, mode=st.sampled_from(["sealed", "working_set"]))
def test_no_key_nonce_pair_is_ever_sealed_twice(tmp_path_factory, ops, mode):
    world = World(tmp_path_factory.mktemp("seq"), mode)
    for op in ops:
        world.run(op)       # the recording backend fails at the first reused (key, nonce) pair
