"""The working-set mode: plaintext held while generating, gone after release, reopened only when verified."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import DecryptionError, SessionExpiredError, TenantIsolationError
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
from support.cache_models import sessions, tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 16


def kv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def filled(two, audit=None, steps=12, kind="llama"):
    """A working-set cache after a 6-position prefill and ``steps`` decode steps in both layers (merges on)."""
    cache = EncryptedCache(tiny_model(kind).config, sessions=two, audit=audit, mode="working_set",
                           merge_min_segments=2)
    ks, vs = [], []
    for i, n in enumerate([6] + [1] * steps):
        k, v = kv(2, n, seed=i)
        for layer in range(2):
            cache.update(k, v, layer)
        ks.append(k)
        vs.append(v)
    return cache, torch.cat(ks, 2), torch.cat(vs, 2)


def _blobs(obj, seen, depth=0):
    """The bytes of every tensor and array reachable from ``obj`` (attributes, slots, containers)."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    elif isinstance(obj, np.ndarray):
        yield obj.tobytes()
    elif isinstance(obj, (bytes, bytearray)):
        yield bytes(obj)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _blobs(x, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for x in obj:
            yield from _blobs(x, seen, depth + 1)
    elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
        if type(obj).__module__.startswith(("pqc_kv_cache", "transformers")):
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    yield from _blobs(getattr(obj, name), seen, depth + 1)
            yield from _blobs(getattr(obj, "__dict__", {}), seen, depth + 1)


def _needles(k, v):
    return [t[r, h, p].numpy().tobytes() for t in (k, v) for r in range(2) for h in range(H)
            for p in range(0, t.shape[2], 3)]


def _plaintext_found(cache, needles) -> list[str]:
    hits = []
    for owner in [cache, *cache.layers]:
        for name, value in vars(owner).items():
            for blob in _blobs(value, set()):
                if any(n in blob for n in needles):
                    hits.append(f"{type(owner).__name__}.{name}")
    return hits


@pytest.fixture
def two():
    return sessions("alice", "bob")


def test_the_working_set_holds_the_plaintext_until_release_then_none_of_it_remains(two):
    cache, k, v = filled(two)
    needles = _needles(k, v)
    assert _plaintext_found(cache, needles), "the search must find the working set before release"
    buffers = [layer._ws.k for layer in cache.layers]
    cache.release()
    assert _plaintext_found(cache, needles) == []
    assert all(not b.any() for b in buffers), "the released buffers were zeroed, not only dropped"
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)
    # the ciphertext copy is complete: restore gives back every position
    cache.restore()
    assert torch.equal(cache.layers[1].keys, k) and torch.equal(cache.layers[1].values, v)


def test_a_byte_flipped_while_released_fails_the_restore_on_record_and_keeps_it_released(two):
    audit = KVAuditLog()
    cache, k, v = filled(two, audit)
    cache.release()
    layer = cache.layers[1]
    off = int(layer.table.offset[0, 1])       # bob's prefill chunk
    layer.ciphertext[off + 5] ^= 0x01
    with pytest.raises(DecryptionError) as exc:
        cache.restore()
    assert exc.value.tenant_id == "bob" and exc.value.layer_idx == 1
    assert cache.released and all(layer.keys is None for layer in cache.layers)
    assert _plaintext_found(cache, _needles(k, v)) == []
    audit.flush()
    failed = audit.entries(limit=None, operation="decrypt", success=False)
    assert failed and {e.tenant_id for e in failed} == {"bob"} and {e.layer_idx for e in failed} == {1}
    # an update opens the same ciphertext: refused the same way, nothing returned
    with pytest.raises(DecryptionError):
        cache.update(*kv(2, 1, seed=77), 1)
    assert cache.released
    audit.close()


def test_releasing_one_session_keeps_the_other_rows_and_reopens_only_its_own(two):
    alice, bob = two
    audit = KVAuditLog()
    cache, k, v = filled(two, audit)
    before = len(audit.entries(limit=None, operation="decrypt"))
    cache.release(bob)
    for layer in cache.layers:
        assert layer.released and not layer._ws.k[1].any() and torch.equal(layer._ws.view(0, 18)[0][0], k[0])
    audit.flush()
    rel = audit.entries(limit=None, operation="release")
    assert {e.tenant_id for e in rel} == {"bob"} and len(rel) == 2
    k_new, v_new = kv(2, 1, seed=40)
    k_out, v_out = cache.update(k_new, v_new, 0)
    assert torch.equal(k_out, torch.cat([k, k_new], 2)) and torch.equal(v_out, torch.cat([v, v_new], 2))
    audit.flush()
    opened = audit.entries(limit=None, operation="decrypt")[before:]
    assert {(e.tenant_id, e.row, e.layer_idx) for e in opened} == {("bob", 1, 0)}
    with pytest.raises(TenantIsolationError):
        cache.release(sessions("mallory")[0])


def test_reads_are_recorded_once_per_layer_and_row_without_decryption(two):
    audit = KVAuditLog()
    cache, _, _ = filled(two, audit, steps=4)
    audit.flush()
    reads = audit.entries(limit=None, operation="read")
    assert len(reads) == 5 * 2 * 2              # 5 updates × 2 layers × 2 rows
    assert not audit.entries(limit=None, operation="decrypt")
    last = sorted((e.position_count, e.row, e.tenant_id, e.position) for e in reads if e.layer_idx == 0)[-2:]
    assert last == [(10, 0, "alice", 0), (10, 1, "bob", 0)]
    audit.close()


def test_offload_keeps_only_ciphertext_and_prefetch_opens_it(two):
    audit = KVAuditLog()
    cache, k, v = filled(two, audit)
    layer = cache.layers[0]
    layer.offload()
    assert layer.released and layer.keys is None and not layer._ws.held
    assert layer.ciphertext.device.type == "cpu"
    assert not any(n in blob for n in _needles(k, v) for blob in _blobs(vars(layer), set()))
    layer.prefetch()
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    audit.flush()
    assert {e.layer_idx for e in audit.entries(limit=None, operation="release")} == {0}
    audit.close()


def test_a_deep_copy_holds_its_own_working_set(two):
    cache, k, v = filled(two)
    dup = copy.deepcopy(cache)
    assert dup.mode == "working_set"
    assert dup.layers[0]._ws.k.data_ptr() != cache.layers[0]._ws.k.data_ptr()
    cache.release()
    assert torch.equal(dup.layers[0].keys, k)
    k_new, v_new = kv(2, 1, seed=41)
    k_out, _ = dup.update(k_new, v_new, 0)
    assert torch.equal(k_out, torch.cat([k, k_new], 2))
    k_out, _ = cache.update(k_new, v_new, 0)
    assert torch.equal(k_out, torch.cat([k, k_new], 2))


def test_a_failed_update_leaves_the_working_set_as_it_was(two, monkeypatch):
    cache, k, v = filled(two)
    layer = cache.layers[0]

    def boom(*a, **kw):
        raise RuntimeError("injected")
    monkeypatch.setattr(layer, "_visible", boom)
    with pytest.raises(RuntimeError):
        cache.update(*kv(2, 3, seed=60), 0)
    monkeypatch.undo()
    assert layer.get_seq_length() == 18 and torch.equal(layer.keys, k)
    k_new, v_new = kv(2, 1, seed=61)
    k_out, _ = cache.update(k_new, v_new, 0)
    assert torch.equal(k_out, torch.cat([k, k_new], 2))


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        EncryptedCache(tiny_model("llama").config, sessions=sessions("a"), mode="plain")


# ---- released rows stay released; temporaries of plaintext are zeroed --------------------------------------

def _row_needles(k, v, row=0):
    """Bytes of one row's K/V vectors (every third position): the row's plaintext, to look for in memory."""
    return [t[row, h, p].numpy().tobytes() for t in (k, v) for h in range(H) for p in range(0, t.shape[2], 3)]


@pytest.mark.parametrize("failure", ["other session expired", "read fails"])
def test_a_failed_update_leaves_released_rows_released_and_zeroed(clock, monkeypatch, failure):
    alice = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=3600, clock=clock)
    bob = establish_tenant_session(TenantIdentity("bob"), ttl_seconds=10, clock=clock)
    cache, k, v = filled([alice, bob])
    cache.release(alice)
    needles = _row_needles(k, v, 0)
    assert _plaintext_found(cache, needles) == []
    if failure == "other session expired":
        clock.advance(11)
        expected = SessionExpiredError
    else:
        def boom(*a, **kw):
            raise RuntimeError("injected")
        for layer in cache.layers:
            monkeypatch.setattr(layer, "_visible", boom)
        expected = RuntimeError
    for layer_idx, layer in enumerate(cache.layers):
        with pytest.raises(expected):
            cache.update(*kv(2, 1, seed=90), layer_idx)     # opens alice's rows first, then fails
        assert layer.released and layer.get_seq_length() == 18
    assert _plaintext_found(cache, needles) == [], "a rolled-back update put alice's released plaintext back"
    assert _plaintext_found(cache, _row_needles(k, v, 1)), "bob's rows were not released"
    if failure == "read fails":
        monkeypatch.undo()
        cache.restore()         # the ciphertext is whole: alice's rows open again, verified
        assert torch.equal(cache.layers[1].keys, k) and torch.equal(cache.layers[1].values, v)


class _Outputs(TorchDispatchMode):
    """Keeps every tensor any torch operation returns while active (so none is freed before it is checked)."""

    def __init__(self):
        super().__init__()
        self.tensors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _storages_holding(tensors, needles, skip=()) -> int:
    """How many distinct storages among ``tensors`` (other than those at ``skip``) hold one of ``needles``."""
    seen, hits = set(skip), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.device.type != "cpu":
            continue
        seen.add(ptr)
        blob = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()
        hits += any(n in blob for n in needles)
    return hits


def test_a_partial_restore_zeroes_every_temporary_that_held_plaintext(two):
    alice, _ = two
    cache, k, v = filled(two)
    cache.release(alice)
    with _Outputs() as made:
        cache.restore()     # opens alice's rows only, into the buffers bob's rows live in
    live = {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}
    assert made.tensors and torch.equal(cache.layers[0].keys, k)
    assert _storages_holding(made.tensors, _row_needles(k, v, 0), skip=live) == 0


def test_a_restore_that_fails_part_way_leaves_no_plaintext_in_its_temporaries(two):
    alice, _ = two
    cache, k, v = filled(two)
    cache.release(alice)
    layer = cache.layers[1]
    layer.ciphertext[int(layer.table.offset[0, 0]) + 5] ^= 0x01     # alice's prefill chunk in the last layer
    with _Outputs() as made:
        with pytest.raises(DecryptionError):
            cache.restore()     # layer 0 opens alice's rows, layer 1 fails
    assert cache.released
    assert _storages_holding(made.tensors, _row_needles(k, v, 0)) == 0
