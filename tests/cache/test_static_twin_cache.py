"""StaticEncryptedCache on the CPU twin of the CUDA backend: the cache takes the device paths (the backend's
``seal_static`` and ``open_static``, rotations through its ``encrypt_chunks``) because the backend has them,
the same code a GPU runs, here on CPU tensors with each kernel launch carried out by the host shim.

Generation is compared token for token with transformers' StaticCache (greedy, a batch of two tenants), and
the records with those of the native backend running the same scenario; every launch of the encrypt kernel
is read back by a recording twin that fails the test the moment a (key, nonce) pair is sealed a second time.
What a GPU runs is not shown here (tests/cache/test_static_cuda_graph.py is the GPU check)."""

from __future__ import annotations

import collections
import copy
import ctypes

import numpy as np
import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.audit.records import Status
from pqc_kv_cache.backends import kernel_abi, kernel_shim, native
from pqc_kv_cache.errors import DecryptionError
from tests.support.cache_models import generate, prompts, sessions, tiny_model
from tests.support.twin import CpuTwinBackend

pytestmark = [pytest.mark.skipif(not native.available(), reason="the native backend does not build here"),
              pytest.mark.skipif(not kernel_shim.available(), reason="the kernel host shim does not build here")]

CAN_CROP = hasattr(StaticLayer, "crop")
LAYERS = 2


class RecordingTwin(CpuTwinBackend):
    """The twin, reading every encrypt launch's chunk table and key metadata: each (tenant, session, epoch,
    counter) it seals under, refused the second time."""

    def __init__(self, sealed: set | None = None):
        super().__init__(record=True)
        self.sealed = set() if sealed is None else sealed

    def _launch(self, kernel, grid, block, args):
        if kernel == "pqc_encrypt_chunks":
            raw = ctypes.string_at(int(args[0]), kernel_abi.CHUNK_PARAMS_DTYPE.itemsize)
            prm = np.frombuffer(raw, dtype=kernel_abi.CHUNK_PARAMS_DTYPE)[0]
            n = int(prm["n"])
            table = np.frombuffer(ctypes.string_at(int(prm["table"]), 8 * kernel_abi.TABLE_COLS * n),
                                  dtype=np.int64).reshape(kernel_abi.TABLE_COLS, n)
            slots = int(table[0].max()) + 1 if n else 0
            meta = np.frombuffer(ctypes.string_at(int(prm["meta"]), kernel_abi.SLOT_META_SIZE * slots),
                                 dtype=kernel_abi.SLOT_META_DTYPE)
            for slot, count, counter in zip(table[0].tolist(), table[3].tolist(), table[5].tolist()):
                m = meta[slot]
                pair = (bytes(m["tenant_tag"]), bytes(m["session_tag"]), int(m["epoch"]), counter)
                assert count == 1 and pair not in self.sealed, f"(key, nonce) sealed twice: {pair[2:]}"
                self.sealed.add(pair)
        super()._launch(kernel, grid, block, args)

    def count(self, kernel: str) -> int:
        return sum(1 for k, _, _ in self.launches if k == kernel)


def _entries(log: KVAuditLog) -> list:
    log.flush()
    return [(e.operation, e.layer_idx, e.row, e.position, e.position_count, e.sequence_number, e.epoch, e.nbytes,
             e.status) for e in log.entries(limit=None)]


def _ops(log: KVAuditLog) -> collections.Counter:
    return collections.Counter(e[0] for e in _entries(log))


def _plain(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _run(kind: str, backend, scenario):
    """``scenario(cache, model, ids)`` on a fresh cache of two tenants over ``backend``; its result and the
    log's records."""
    model, ids = tiny_model(kind), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=backend)
    out = scenario(cache, model, ids)
    cache.check()
    entries = _entries(log)
    cache.close()
    log.close()
    return out, entries


def _release_restore_continue(cache, model, ids):
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.check()
    held = _plain(cache)
    cache.release()
    assert cache.released and not any(layer.keys.any() for layer in cache.layers)
    cache.restore()
    for (k, v), layer in zip(held, cache.layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    cache.release()           # the next update opens it, in the step (the operator's restore path)
    return generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_release_restore_and_continue_match_static_cache_and_the_native_records(kind):
    model, ids = tiny_model(kind), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    twin = RecordingTwin()
    got, entries = _run(kind, twin, _release_restore_continue)
    ref, ref_entries = _run(kind, native.NativeBackend(), _release_restore_continue)
    assert torch.equal(got, want) and torch.equal(ref, want)
    assert entries == ref_entries
    ops = collections.Counter(e[0] for e in entries)
    # every position of every row and layer sealed once: the prompt and 9 decode steps
    assert ops["encrypt"] == len(twin.sealed) == LAYERS * 2 * (7 + 9)
    assert {e[-1] for e in entries} == {Status.OK}
    assert ops["decrypt"] == 2 * LAYERS * 2 and twin.count("pqc_decrypt_chunks") == 2 * LAYERS


def test_offload_and_prefetch_go_through_the_device_open():
    twin = RecordingTwin()
    model, ids = tiny_model("mistral"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=24, audit=log,
                                 backend=twin)
    generate(model, ids, cache, max_new_tokens=6, do_sample=False)      # past the sliding window of 8
    cache.check()
    held = _plain(cache)
    cache.layers[1].offload()
    assert not cache.layers[1].keys.any() and cache.layers[0].keys.any() and cache.layers[1].released
    cache.layers[1].prefetch()
    cache.check()
    assert not cache.released and twin.count("pqc_decrypt_chunks") == 1
    for (k, v), layer in zip(held, cache.layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert _ops(log)["release"] == 2 and _ops(log)["decrypt"] == 2
    log.close()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_save_and_load_through_the_twin_continue_as_static_cache(tmp_path, kind):
    model, ids = tiny_model(kind), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log, sealed = KVAuditLog(), set()
    two = sessions("alice", "bob")
    cache = StaticEncryptedCache(model.config, sessions=two, max_cache_len=32, audit=log,
                                 backend=RecordingTwin(sealed))
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.save(tmp_path / "c.pkvf")
    with pytest.raises(TypeError, match="device must be"):
        StaticEncryptedCache.load(tmp_path / "c.pkvf", model.config, two, device="no-such-device")
    loader = RecordingTwin(sealed)
    loaded = StaticEncryptedCache.load(tmp_path / "c.pkvf", model.config, two, audit=log, backend=loader,
                                       device="cpu")
    assert loader.count("pqc_decrypt_chunks") == LAYERS and not loaded.released
    for a, b in zip(loaded.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.meta, b.meta)
    ops = _ops(log)
    assert ops["save"] == ops["load"] == ops["decrypt"] == LAYERS * 2
    cache.close()
    got = generate(model, first, loaded, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    loaded.check()
    assert torch.equal(got, want)
    assert len(sealed) == LAYERS * 2 * (7 + 9)        # no pair the original sealed was sealed again
    log.close()


@pytest.mark.skipif(not CAN_CROP, reason="this transformers' static layers cannot crop (StaticCache cannot either)")
def test_crop_then_a_rewrite_through_the_twin_matches_static_cache_under_fresh_nonces():
    model, ids = tiny_model("llama"), prompts(2, 7)
    log, twin = KVAuditLog(), RecordingTwin()
    ref = StaticCache(model.config, max_cache_len=32)
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=twin)
    outs = []
    for c in (ref, cache):
        first = generate(model, ids, c, max_new_tokens=6, do_sample=False)
        c.crop(-3)                                     # positions 9..11 go
        kept = first[:, :-3]
        outs.append(generate(model, kept, c, attention_mask=torch.ones_like(kept), max_new_tokens=5,
                             do_sample=False))
    cache.check()
    assert torch.equal(outs[0], outs[1])
    crops = [e for e in _entries(log) if e[0] == "crop"]
    assert len(crops) == LAYERS * 2 and {(e[3], e[4]) for e in crops} == {(9, 3)}
    cache.release()
    cache.restore()                                   # every held position opens, the rewritten ones included
    assert len(twin.sealed) == _ops(log)["encrypt"]
    log.close()


def test_beam_search_through_the_twin_matches_static_cache_and_reuses_no_nonce():
    model, ids = tiny_model("llama"), prompts(2, 7)
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), **kw)
    log, twin = KVAuditLog(), RecordingTwin()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=twin, rows_per_session=2)
    got = generate(model, ids, cache, **kw)
    cache.check()
    assert torch.equal(got, want)
    ops = _ops(log)
    assert ops["reorder"] > 0 and ops["isolation-violation"] == 0
    assert ops["encrypt"] == len(twin.sealed) == LAYERS * 4 * (7 + 5)
    cache.release()
    cache.restore()                 # the moved chunks open in the rows that took them
    log.close()


def test_rotation_through_the_twin_reseals_and_generation_continues_as_static_cache():
    model, ids = tiny_model("mistral"), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log, twin = KVAuditLog(), RecordingTwin()
    alice, bob = sessions("alice", "bob")
    cache = StaticEncryptedCache(model.config, sessions=[alice, bob], max_cache_len=32, audit=log, backend=twin)
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.check()
    other = copy.deepcopy(cache)
    cache.release()
    assert cache.rotate("alice") == [1] and alice.live_epochs == [1] and cache.released
    for c in (cache, other):
        c.restore()
        for i in range(LAYERS):
            assert {e.epoch for e in c.export_entries(i, 0)} == {1}
            assert {e.epoch for e in c.export_entries(i, 1)} == {0}
    got = generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    rotates = [e for e in _entries(log) if e[0] == "rotate" and e[1] >= 0]
    assert len(rotates) == LAYERS * 2            # one per layer, in each of the two caches, for alice's row
    log.close()


def test_a_tampered_arena_byte_is_found_at_check_zeroed_and_recorded():
    model, ids = tiny_model("llama"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=RecordingTwin())
    first = generate(model, ids, cache, max_new_tokens=3, do_sample=False)
    cache.check()
    cache.release()
    cache.layers[0].arena[1, 4, 7] ^= 0x20
    with pytest.raises(DecryptionError, match="'bob', layer 0, row 1, position 4: its tag did not verify"):
        cache.restore()
    assert cache.released and not any(layer.keys.any() for layer in cache.layers)
    bad = [e for e in log.entries(limit=None, operation="decrypt") if not e.success]
    assert {(e.row, e.layer_idx) for e in bad} == {(1, 0)} and any(e.position == 4 for e in bad)
    # the same tamper met by a step's open (the update opens the released cache) is raised by check()
    generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=1, do_sample=False)
    with pytest.raises(DecryptionError, match="position 4"):
        cache.check()
    log.close()


def test_a_device_without_a_device_backend_is_refused_clearly():
    cache = StaticEncryptedCache(tiny_model("llama").config, sessions=sessions("alice"), max_cache_len=8,
                                 backend=native.NativeBackend())
    with pytest.raises(ValueError, match="needs a backend that seals and opens .*NativeBackend"):
        cache.early_initialization(1, 2, 16, torch.float32, torch.device("meta"))




@pytest.mark.slow
def test_compiled_fullgraph_through_the_twin_with_an_open_in_the_step_matches_compiled_static_cache(fresh_dynamo):
    """Both operators, on the device path, traced by torch.compile(fullgraph=True): a released cache is opened
    by the compiled step's update."""
    model = copy.deepcopy(tiny_model("llama"))
    model.forward = torch.compile(model.forward, fullgraph=True)
    ids = prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log, twin = KVAuditLog(), RecordingTwin()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=twin)
    cache.early_initialization(2, 2, 16, torch.float32, torch.device("cpu"))
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.check()
    cache.release()
    got = generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    ops = _ops(log)
    assert ops["encrypt"] == len(twin.sealed) == LAYERS * 2 * (7 + 9) and ops["decrypt"] == LAYERS * 2
    assert twin.count("pqc_decrypt_chunks") == LAYERS
    log.close()
