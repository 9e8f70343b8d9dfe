"""StaticEncryptedCache beyond a plain generation: beam search, crop and assisted decoding, deepcopy, offload,
key rotation, save / load.

Generation is compared token for token with transformers' StaticCache; every seal goes through a recording
backend that fails the test the moment a (key, nonce) pair is sealed a second time, across every cache of
a test (copies and loaded caches included).
"""

from __future__ import annotations

import collections
import copy
import os

import numpy as np
import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from pqc_kv_cache import EncryptedCache, KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.errors import SaveFileError, SealFailedError, TenantIsolationError
from pqc_kv_cache.session import TenantSession
from tests.support.cache_models import generate, prompts, sessions, tiny_model

HEADS, DIM = 2, 16
CAN_CROP = hasattr(StaticLayer, "crop")      # transformers 5.25 has it, 5.16 not (StaticCache cannot crop there)


class Recording(HostBackend):
    """Seals through the host backend and keeps every (key, epoch, counter) it sealed under."""

    def __init__(self, sealed: set | None = None):
        super().__init__(threads=1)
        self.sealed = set() if sealed is None else sealed

    def encrypt_chunks(self, keys, layout, chunks, *args, **kwargs):
        for slot, counter in zip(np.asarray(chunks.slot).tolist(), np.asarray(chunks.counter).tolist()):
            pair = (bytes(keys[slot].key), keys[slot].epoch, counter)
            assert pair not in self.sealed, f"(key, nonce) reused: epoch {pair[1]}, counter {counter}"
            self.sealed.add(pair)
        return super().encrypt_chunks(keys, layout, chunks, *args, **kwargs)


def _ops(log: KVAuditLog) -> collections.Counter:
    log.flush()
    return collections.Counter(e.operation for e in log.entries(limit=None))


def _records(log: KVAuditLog, op: str):
    log.flush()
    return [e for e in log.entries(limit=None) if e.operation == op]


def _kv(batch: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HEADS, n, DIM, generator=g), torch.randn(batch, HEADS, n, DIM, generator=g))


def _static(model, two, n=32, **kw):
    return StaticEncryptedCache(model.config, sessions=two, max_cache_len=n, **kw)


def _plain(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


# ---- beam search ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_beam_search_generates_what_static_cache_generates_without_reusing_a_nonce(kind):
    model, ids = tiny_model(kind), prompts(2, 7)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), **kw)
    log, rec = KVAuditLog(), Recording()
    cache = _static(model, sessions("alice", "bob"), audit=log, backend=rec, rows_per_session=3)
    got = generate(model, ids, cache, **kw)
    cache.check()
    assert torch.equal(got, want)
    ops = _ops(log)
    assert ops["reorder"] > 0 and ops["isolation-violation"] == 0
    # every position written by every row of every layer sealed once, under its own counter
    assert ops["encrypt"] == 2 * 6 * (7 + 7) == len(rec.sealed)
    for e in _records(log, "reorder"):       # a row only ever takes a row of its own prompt (its session)
        assert e.tenant_id == ("alice" if e.row < 3 else "bob") and e.sequence_number // 3 == e.row // 3
    log.close()


def test_a_reorder_across_sessions_is_refused_recorded_and_moves_nothing():
    log = KVAuditLog()
    cache = _static(tiny_model("llama"), sessions("alice", "bob"), n=8, audit=log, rows_per_session=2)
    for layer in range(2):
        cache.update(*_kv(4, 3, layer), layer)
    before = [(p, layer.arena.clone(), layer.meta.clone()) for p, layer in zip(_plain(cache), cache.layers)]
    with pytest.raises(TenantIsolationError, match="row 2 .*'bob'.* into row 1 .*'alice'"):
        cache.reorder_cache(torch.tensor([0, 2, 2, 3]))
    for ((k, v), arena, meta), layer in zip(before, cache.layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.arena, arena) and torch.equal(layer.meta, meta)
    bad = _records(log, "isolation-violation")
    assert len(bad) == 1 and bad[0].row == 1 and not bad[0].success
    with pytest.raises(ValueError, match="one integer row index per row"):
        cache.reorder_cache(torch.tensor([0, 1]))
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))     # within each session: allowed, in place
    layer = cache.layers[0]
    assert torch.equal(layer.keys[0], before[0][0][0][1]) and torch.equal(layer.arena[3], before[0][1][2])
    assert torch.equal(cache.layers[0].meta[2], before[0][2][3])
    log.close()


# ---- crop and assisted decoding --------------------------------------------------------------------------------
@pytest.mark.skipif(not CAN_CROP, reason="this transformers' static layers cannot crop (StaticCache cannot either)")
def test_crop_records_zeroes_the_cut_slots_and_a_rewrite_takes_fresh_nonces():
    log, rec = KVAuditLog(), Recording()
    cache = _static(tiny_model("llama"), sessions("alice", "bob"), n=12, audit=log, backend=rec)
    for layer in range(2):
        cache.update(*_kv(2, 6, 0), layer)
    cache.crop(-4)
    for layer in cache.layers:
        assert int(layer.get_seq_length()) == 2
        assert not layer.arena[:, 2:6].any() and not layer.meta[:, 2:6].any() and layer.meta[:, :2, 2].all()
        assert not layer.keys[:, :, 2:6].any()
    crops = _records(log, "crop")
    assert len(crops) == 2 * 2 and {(e.position, e.position_count) for e in crops} == {(2, 4)}
    for layer in range(2):
        cache.update(*_kv(2, 4, 1), layer)        # positions 2..5 written again
    cache.check()
    assert len(rec.sealed) == 2 * 2 * (6 + 4)     # the recording backend refused any pair sealed twice
    assert [len(cache.export_entries(i, r)) for i in range(2) for r in range(2)] == [6] * 4
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(3)
    log.close()


@pytest.mark.skipif(not CAN_CROP, reason="this transformers' static layers cannot crop (StaticCache cannot either)")
def test_assisted_decoding_generates_what_static_cache_generates_and_reuses_no_nonce():
    model, assistant, ids = tiny_model("llama"), tiny_model("llama", seed=5, layers=1), prompts(1, 7)
    kw = dict(max_new_tokens=12, do_sample=False, assistant_model=assistant)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=48), **kw)
    log, rec = KVAuditLog(), Recording()
    cache = _static(model, sessions("alice"), n=48, audit=log, backend=rec)
    got = generate(model, ids, cache, **kw)
    cache.check()
    assert torch.equal(got, want)
    crops = _records(log, "crop")
    assert crops, "the assistant's rejected candidates were never cropped: the test proves nothing"
    encrypts = _records(log, "encrypt")
    assert len(encrypts) == len(rec.sealed)
    # a position sealed more than once (written again after a crop) took a new counter every time
    per_position = collections.Counter((e.layer_idx, e.position) for e in encrypts)
    assert max(per_position.values()) > 1


# ---- deepcopy and offload ------------------------------------------------------------------------------------
def test_deepcopy_continues_on_its_own_with_nonce_ranges_of_its_own():
    model, ids = tiny_model("llama"), prompts(2, 7)
    log, rec = KVAuditLog(), Recording()
    alice, bob = sessions("alice", "bob")
    cache = _static(model, [alice, bob], audit=log, backend=rec)
    ref = StaticCache(model.config, max_cache_len=32)
    with torch.no_grad():
        model(ids, past_key_values=ref)
        model(ids, past_key_values=cache)
    cache.check()
    outs = []
    for seed, c in ((2, copy.deepcopy(cache)), (3, copy.deepcopy(cache))):
        suffix = prompts(2, 3, seed=seed)
        full = torch.cat([ids, suffix], dim=1)
        want = generate(model, full, copy.deepcopy(ref), max_new_tokens=5, do_sample=False)
        outs.append((generate(model, full, c, max_new_tokens=5, do_sample=False), want, c))
    for got, want, c in outs:
        c.check()
        assert torch.equal(got, want)
        assert c.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()
    assert int(cache.get_seq_length()) == 7          # the original was left as it was
    assert len(rec.sealed) == 2 * 2 * (7 + 2 * (3 + 4))
    alice.close()                                     # shreds alice's rows in the original and both copies
    for c in (cache, outs[0][2], outs[1][2]):
        assert not c.layers[1].arena[0].any() and not c.layers[1].keys[0].any() and c.layers[1].keys[1].any()
    log.close()


def test_offload_releases_one_layer_and_prefetch_opens_it_verified():
    log = KVAuditLog()
    cache = _static(tiny_model("mistral"), sessions("alice", "bob"), n=24, audit=log)
    for step in range(5):      # past the sliding window of 8
        for layer in range(2):
            cache.update(*_kv(2, 1 if step else 6, step), layer)
    cache.check()
    held = _plain(cache)
    cache.layers[1].offload()
    assert not cache.layers[1].keys.any() and cache.layers[0].keys.any() and cache.layers[1].released
    cache.layers[1].prefetch()
    cache.check()
    assert not cache.released
    for (k, v), layer in zip(held, cache.layers):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert _ops(log)["release"] == 2 and _ops(log)["decrypt"] == 2
    log.close()


# ---- key rotation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("released", [False, True, "bob"])
def test_rotation_reseals_the_sessions_chunks_and_generation_continues_as_static_cache(released):
    model, ids = tiny_model("mistral"), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log, rec = KVAuditLog(), Recording()
    alice, bob = sessions("alice", "bob")
    cache = _static(model, [alice, bob], audit=log, backend=rec)
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    cache.check()
    twin = copy.deepcopy(cache)
    bob_before = [cache.export_entries(i, 1) for i in range(2)]
    if released == "bob":
        cache.release(bob)            # only bob's rows: they alone are released again after the rotation
    elif released:
        cache.release()
    assert cache.rotate("alice") == [1]
    assert alice.live_epochs == [1] and cache.released == bool(released)
    want_rows = {False: [], True: [0, 1], "bob": [1]}[released]
    assert [layer.released_rows().tolist() for layer in cache.layers] == [want_rows] * 2
    for c in (cache, twin):
        c.restore()
        for i in range(2):
            entries = c.export_entries(i, 0)
            assert entries and {e.epoch for e in entries} == {1}
            assert [(e.epoch, e.nonce_bytes) for e in c.export_entries(i, 1)] == \
                [(e.epoch, e.nonce_bytes) for e in bob_before[i]]
    rotates = [e for e in _records(log, "rotate") if e.layer_idx >= 0]
    assert len(rotates) == 2 * 2 and {(e.tenant_id, e.row, e.epoch) for e in rotates} == {("alice", 0, 1)}
    got = generate(model, first, cache, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    log.close()


def test_a_copy_rotated_elsewhere_still_opens():
    cache = _static(tiny_model("llama"), sessions("alice"), n=8)
    for layer in range(2):
        cache.update(*_kv(1, 3, layer), layer)
    twin = copy.deepcopy(cache)
    twin.rotate(cache.sessions[0])
    cache.release()
    cache.restore()      # its chunks were re-sealed under the new epoch before the old key was erased
    assert {e.epoch for e in cache.export_entries(1, 0)} == {1}
    with pytest.raises(TenantIsolationError, match="'carol' has no session"):
        cache.rotate("carol")


# ---- save and load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_save_then_load_continues_as_static_cache(tmp_path, kind):
    model, ids = tiny_model(kind), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=10, do_sample=False)
    log, rec = KVAuditLog(), Recording()
    two = sessions("alice", "bob")
    cache = _static(model, two, audit=log, backend=rec)
    first = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    file_id = cache.save(tmp_path / "c.pkvf")
    assert len(file_id) == 16
    loaded = StaticEncryptedCache.load(tmp_path / "c.pkvf", model.config, two, audit=log, backend=rec)
    assert loaded.max_cache_len == 32 and not loaded.released
    for a, b in zip(loaded.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.meta, b.meta)
    ops = _ops(log)
    assert ops["save"] == ops["load"] == ops["decrypt"] == 2 * 2
    cache.close()
    got = generate(model, first, loaded, attention_mask=torch.ones_like(first), max_new_tokens=5, do_sample=False)
    loaded.check()
    assert torch.equal(got, want)
    log.close()


def test_beam_shared_chunks_are_saved_once_and_load():
    model, ids = tiny_model("llama"), prompts(2, 7)
    cache = _static(model, sessions("alice", "bob"), rows_per_session=3)
    generate(model, ids, cache, max_new_tokens=4, num_beams=3, do_sample=False)
    cache.check()
    desc, data = cache.layers[0].saved()
    assert len(desc["chunks"]["counter"]) < len(desc["refs"])       # rows share the prompt's chunks
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"beam-{os.getpid()}.pkvf")
    try:
        cache.save(path)
        loaded = StaticEncryptedCache.load(path, model.config, cache.sessions)
    finally:
        os.unlink(path)
    for a, b in zip(loaded.layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.arena, b.arena)


def test_loads_into_reestablished_sessions_reuse_no_nonce(tmp_path):
    """The original goes on sealing after its save; sessions rebuilt from the same key material load the
    file (and, after a crop, an older one) and seal on: never under a pair sealed before."""
    cfg, sealed = tiny_model("llama").config, set()
    secrets = [os.urandom(32), os.urandom(32)]

    def rebuilt():
        return [TenantSession(t, f"{t}-s", ss, b"") for t, ss in zip(("alice", "bob"), secrets)]

    def step(c, n, seed):
        for layer in range(2):
            c.update(*_kv(2, n, seed), layer)
        c.check()

    cache = StaticEncryptedCache(cfg, sessions=rebuilt(), max_cache_len=16, backend=Recording(sealed))
    step(cache, 4, 0)
    cache.save(tmp_path / "old.pkvf")
    step(cache, 3, 1)
    if CAN_CROP:
        cache.crop(-5)           # chunks whose counters were used are gone from the next file
    cache.save(tmp_path / "new.pkvf")
    step(cache, 2, 2)
    for name in ("new", "old", "new"):
        two = rebuilt()
        loaded = StaticEncryptedCache.load(tmp_path / f"{name}.pkvf", cfg, two, backend=Recording(sealed))
        step(loaded, 2, 3)       # the recording backend fails the test on any pair sealed before
        assert all(s.epoch >= 1 for s in two)      # a branch epoch of the rebuilt session's own


def test_a_changed_or_foreign_file_is_refused_and_the_sessions_stay_as_they_were(tmp_path):
    model = tiny_model("llama")
    log = KVAuditLog()
    two = sessions("alice", "bob")
    cache = _static(model, two, n=8)
    for layer in range(2):
        cache.update(*_kv(2, 3, layer), layer)
    path = tmp_path / "c.pkvf"
    cache.save(path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1                                      # the last chunk's tag
    bad = tmp_path / "bad.pkvf"
    bad.write_bytes(bytes(raw))
    before = [s.lineage for s in two]
    with pytest.raises(SaveFileError, match="could not be opened.*its tag did not verify"):
        StaticEncryptedCache.load(bad, model.config, two, audit=log)
    assert [s.lineage for s in two] == before
    assert {e.success for e in _records(log, "load")} == {False}
    with pytest.raises(SaveFileError, match="no such session"):
        StaticEncryptedCache.load(path, model.config, sessions("alice", "bob"))
    dynamic = EncryptedCache(model.config, sessions=two)
    dynamic.update(*_kv(2, 3, 0), 0)
    dynamic.save(tmp_path / "d.pkvf")
    with pytest.raises(SaveFileError, match="open it with EncryptedCache.load"):
        StaticEncryptedCache.load(tmp_path / "d.pkvf", model.config, two)
    with pytest.raises(ValueError, match="sliding"):
        StaticEncryptedCache.load(path, tiny_model("mistral").config, two)
    with pytest.raises(SaveFileError, match="open it with StaticEncryptedCache.load"):
        EncryptedCache.load(path, model.config, two)
    log.close()


def test_a_cache_with_a_failed_seal_is_not_saved(tmp_path):
    cache = _static(tiny_model("llama"), sessions("alice"), n=16, nonce_reserve=3)
    cache.update(*_kv(1, 4, 0), 0)         # 3 sealed, position 3 refused
    with pytest.raises(SealFailedError):
        cache.save(tmp_path / "c.pkvf")
    with pytest.raises(SaveFileError, match="layer 0, row 0 holds no sealed chunk of position 3"):
        cache.save(tmp_path / "c.pkvf")
    assert not (tmp_path / "c.pkvf").exists()


# ---- compiled -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_beam_search_and_a_copy_generate_what_compiled_static_cache_generates(fresh_dynamo):
    """The reorder and the copy keep every buffer at a static address: the compiled graphs stay valid."""
    model = copy.deepcopy(tiny_model("llama"))
    model.forward = torch.compile(model.forward, fullgraph=True)
    ids = prompts(2, 7)
    kw = dict(max_new_tokens=8, num_beams=2, do_sample=False)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), **kw)
    log, rec = KVAuditLog(), Recording()
    cache = _static(model, sessions("alice", "bob"), audit=log, backend=rec, rows_per_session=2)
    cache.early_initialization(4, HEADS, DIM, torch.float32, torch.device("cpu"))
    got = generate(model, ids, cache, **kw)
    cache.check()
    assert torch.equal(got, want)
    assert _ops(log)["reorder"] > 0 and _ops(log)["encrypt"] == len(rec.sealed) == 2 * 4 * (7 + 7)
    log.close()
