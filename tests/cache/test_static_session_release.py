"""StaticEncryptedCache.release(session): one session's rows released, the other session's left as they are.

Only that session's plaintext is zeroed (in place), RELEASE is recorded for its rows only, and the next update
(eager or inside a compiled step) or ``restore()`` opens only the released rows: DECRYPT records for them, none
for the rows still held, whose plaintext is neither re-opened nor touched. Generation then continues as
transformers' StaticCache does. Run on the native backend (the host open) and on the CPU twin of the CUDA
backend (the device open), whose records must be the same."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from transformers import StaticCache

from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.audit.records import Status
from pqc_kv_cache.backends import kernel_shim, native
from pqc_kv_cache.errors import SealFailedError, TenantIsolationError
from tests.cache.test_static_twin_cache import RecordingTwin, _entries as _newest_first
from tests.support.cache_models import generate, prompts, sessions, tiny_model

pytestmark = [pytest.mark.skipif(not native.available(), reason="the native backend does not build here"),
              pytest.mark.skipif(not kernel_shim.available(), reason="the kernel host shim does not build here")]

LAYERS = 2
BACKENDS = {"native": native.NativeBackend, "twin": RecordingTwin}


def _entries(log: KVAuditLog) -> list:
    """The log's records as tuples (operation, layer, row, position, count, counter, epoch, nbytes, status),
    oldest first."""
    return _newest_first(log)[::-1]


def _plain(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _by_op(entries, op: str):
    return [e for e in entries if e[0] == op]


def _release_one_and_continue(cache, model, ids, log):
    """Generate 5 tokens, release alice's rows (row 0) only, check what that did, generate 5 more (the first
    update opens alice's rows); returns the tokens and the records written from the release on."""
    alice, bob = cache.sessions
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.check()
    held = _plain(cache)
    ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    before = len(_entries(log))
    cache.release(alice)
    assert cache.released
    for layer, (k, v), ptr in zip(cache.layers, held, ptrs):
        assert (layer.keys.data_ptr(), layer.values.data_ptr()) == ptr        # zeroed in place
        assert not layer.keys[0].any() and not layer.values[0].any()
        assert torch.equal(layer.keys[1], k[1]) and torch.equal(layer.values[1], v[1])   # bob's untouched
        assert layer.released_rows().tolist() == [0]
    released = _entries(log)[before:]
    held_n = [min(11, layer.max_cache_len) for layer in cache.layers]      # a sliding layer: its window
    assert [(e[0], e[1], e[2], e[3], e[4]) for e in released] == \
        [("release", i, 0, 11 - held_n[i], held_n[i]) for i in range(LAYERS)]
    cache.release(alice)                      # released already: nothing more released or recorded
    assert len(_entries(log)) == before + LAYERS
    got = generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    cache.check()
    assert not cache.released
    return got, _entries(log)[before:]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_one_session_s_release_opens_only_its_rows_and_generation_continues_as_static_cache(kind, backend):
    model, ids = tiny_model(kind), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    runs = {}
    for name in (backend, "native"):
        log = KVAuditLog()
        impl = BACKENDS[name]()
        cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                     backend=impl)
        got, after = _release_one_and_continue(cache, model, ids, log)
        assert torch.equal(got, want)
        dec = _by_op(after, "decrypt")
        # one DECRYPT per layer, alice's row only, every position it held (a sliding layer: its window of 8)
        held = [min(11, cache.layers[i].max_cache_len) for i in range(LAYERS)]
        assert [(e[1], e[2], e[3], e[4], e[-1]) for e in dec] == \
            [(i, 0, 11 - held[i], held[i], Status.OK) for i in range(LAYERS)]
        if name == "twin":
            assert impl.count("pqc_decrypt_chunks") == LAYERS
        runs[name] = after
        cache.close()
        log.close()
    assert runs[backend] == runs["native"]          # the device open records what the host open records
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_restore_opens_only_the_released_session_and_a_full_release_after_records_only_the_rest(backend):
    model, ids = tiny_model("llama"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=BACKENDS[backend]())
    alice, bob = cache.sessions
    generate(model, ids, cache, max_new_tokens=4, do_sample=False)
    cache.check()
    held = _plain(cache)
    n = len(_entries(log))
    cache.release(bob)
    cache.restore()
    for layer, (k, v) in zip(cache.layers, held):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    after = _entries(log)[n:]
    assert [(e[0], e[1], e[2]) for e in after] == [("release", i, 1) for i in range(LAYERS)] + \
        [("decrypt", i, 1) for i in range(LAYERS)]
    # alice's rows, then every row: RELEASE only for the rows not released already; restore opens both
    n = len(_entries(log))
    cache.release(alice)
    cache.release()
    assert cache.released and not any(layer.keys.any() for layer in cache.layers)
    cache.restore()
    after = _entries(log)[n:]
    assert [(e[0], e[1], e[2]) for e in after] == [("release", i, 0) for i in range(LAYERS)] + \
        [("release", i, 1) for i in range(LAYERS)] + [("decrypt", i, r) for i in range(LAYERS) for r in (0, 1)]
    for layer, (k, v) in zip(cache.layers, held):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    cache.close()
    log.close()


def test_a_session_that_is_not_the_cache_s_is_refused_and_nothing_is_released():
    model, ids = tiny_model("llama"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log)
    with pytest.raises(TenantIsolationError, match="'mallory' has no session in this cache"):
        cache.release(sessions("mallory")[0])      # before the first update too
    generate(model, ids, cache, max_new_tokens=3, do_sample=False)
    cache.check()
    held = _plain(cache)
    n = len(_entries(log))
    with pytest.raises(TenantIsolationError, match="'mallory' has no session in this cache"):
        cache.release(sessions("mallory")[0])
    with pytest.raises(TenantIsolationError, match="'alice' has no session in this cache"):
        cache.release(sessions("alice")[0])        # the same tenant, another session: not this cache's
    with pytest.raises(TypeError, match="TenantSession"):
        cache.release("alice")
    with pytest.raises(TenantIsolationError):
        with cache.generating(sessions("eve")[0]):
            pass
    assert not cache.released and len(_entries(log)) == n
    for layer, (k, v) in zip(cache.layers, held):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    cache.close()
    log.close()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_released_session_expired_before_its_open_is_refused_and_recorded_the_other_untouched(backend):
    model, ids = tiny_model("llama"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=BACKENDS[backend]())
    alice, bob = cache.sessions
    generate(model, ids, cache, max_new_tokens=3, do_sample=False)
    cache.check()
    held = _plain(cache)
    cache.release(bob)
    bob.expires_at = datetime.now(timezone.utc) - timedelta(seconds=5)
    n = len(_entries(log))
    with pytest.raises(SealFailedError, match="tenant 'bob'.*closed or expired"):
        cache.restore()
    dec = _by_op(_entries(log)[n:], "decrypt")
    # per layer: bob's row read (failed), then each of its 9 positions refused; nothing of alice's
    assert [(e[1], e[2]) for e in dec] == [(i, 1) for i in range(LAYERS) for _ in range(10)]
    assert [e[-1] for e in dec] == ([Status.AUTH_FAILED] + [Status.REFUSED] * 9) * LAYERS
    for layer, (k, v) in zip(cache.layers, held):
        assert torch.equal(layer.keys[0], k[0]) and torch.equal(layer.values[0], v[0])
        assert not layer.keys[1].any() and not layer.values[1].any()
    cache.close()
    log.close()


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_beam_reorder_and_a_deepcopy_keep_the_released_rows(with_mask):
    model, ids = tiny_model("llama"), prompts(4, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 rows_per_session=2)
    alice, bob = cache.sessions
    generate(model, ids, cache, max_new_tokens=3, do_sample=False)
    cache.check()
    held = _plain(cache)
    if with_mask:
        cache.release(alice)
    cache.reorder_cache(torch.tensor([1, 0, 2, 3]))          # alice's two rows swap
    twin = copy.deepcopy(cache)
    for c in (cache, twin):
        assert [layer.released_rows().tolist() for layer in c.layers] == [[0, 1] if with_mask else []] * LAYERS
        c.restore()
        for layer, (k, v) in zip(c.layers, held):
            assert torch.equal(layer.keys[[1, 0, 2, 3]], k) and torch.equal(layer.values[[1, 0, 2, 3]], v)
    for c in (twin, cache):
        c.close()
    log.close()


# ---- compiled ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_compiled_fullgraph_opens_only_the_released_session_in_the_step(backend, fresh_dynamo):
    """torch.compile(fullgraph=True): alice's rows released between steps are opened by the compiled step's
    update (the open operator with the released-row mask traced without a graph break), bob's are not; the
    tokens are compiled StaticCache's."""
    model = copy.deepcopy(tiny_model("llama"))
    model.forward = torch.compile(model.forward, fullgraph=True)
    ids = prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log = KVAuditLog()
    impl = BACKENDS[backend]()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=impl)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))
    got, after = _release_one_and_continue(cache, model, ids, log)
    assert torch.equal(got, want)
    dec = _by_op(after, "decrypt")
    assert [(e[1], e[2], e[3], e[4], e[-1]) for e in dec] == [(i, 0, 0, 11, Status.OK) for i in range(LAYERS)]
    if backend == "twin":
        assert impl.count("pqc_decrypt_chunks") == LAYERS
    used = [(e[2], e[5], e[6]) for e in _by_op(_entries(log), "encrypt")]     # row: one session each
    assert len(used) == len(set(used)) == LAYERS * 2 * (7 + 9)
    cache.close()
    log.close()


def test_the_released_rows_are_a_device_mask_the_open_operator_takes():
    """The mask has a fixed address (a compiled or captured step reads it there) and is cleared by the open."""
    cfg = tiny_model("llama").config
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8)
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        cache.update(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g), layer)
    masks = [layer.released_mask for layer in cache.layers]
    ptrs = [m.data_ptr() for m in masks]
    cache.release(cache.sessions[1])
    assert [m.tolist() for m in masks] == [[0, 1]] * LAYERS
    cache.restore()
    assert [m.tolist() for m in masks] == [[0, 0]] * LAYERS
    assert [layer.released_mask.data_ptr() for layer in cache.layers] == ptrs
    assert np.array_equal(cache.layers[0].released_rows(), np.zeros(0, dtype=np.int64))
    cache.close()


def test_one_session_s_release_zeroes_its_rows_in_every_layer_when_the_audit_file_fails(tmp_path):
    from pqc_kv_cache.errors import AuditError
    from tests.support.audit_fakes import fill_disk

    cfg = tiny_model("llama").config
    log = KVAuditLog(path=tmp_path / "audit.log", fsync=False)
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8, audit=log)
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        cache.update(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g), layer)
    cache.check()
    held = _plain(cache)
    fill_disk(log)
    with pytest.raises(AuditError):
        cache.release(cache.sessions[0])
    for layer, (k, v) in zip(cache.layers, held):
        assert not layer.keys[0].any() and not layer.values[0].any()
        assert torch.equal(layer.keys[1], k[1]) and torch.equal(layer.values[1], v[1])
        assert layer.released_rows().tolist() == [0]
    with pytest.raises(AuditError):       # the file failed: closing says so too
        log.close()
