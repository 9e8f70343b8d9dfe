"""StaticEncryptedCache: StaticCache's plaintext and shapes, every written position sealed by the operators.

The eager tests drive the cache directly or through generate; the compiled ones (marked slow: compiling a
model takes most of a minute on a small CPU) check that torch.compile(fullgraph=True) traces the operators
and generates what StaticCache generates under the same compile.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from transformers import StaticCache

from pqc_kv_cache import EncryptedCache, KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.envelope import split_nonce
from pqc_kv_cache.errors import AuditError, DecryptionError, SealFailedError
from tests.support.cache_models import generate, prompts, sessions, tiny_model

HEADS, DIM = 2, 16       # the tiny models' KV heads and head dim


def _ops(log: KVAuditLog) -> collections.Counter:
    log.flush()
    return collections.Counter(e.operation for e in log.entries(limit=None))


def _records(log: KVAuditLog, op: str):
    log.flush()
    return [e for e in log.entries(limit=None) if e.operation == op]


def _kv(batch: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HEADS, n, DIM, generator=g), torch.randn(batch, HEADS, n, DIM, generator=g))


def _nonces(cache: StaticEncryptedCache) -> list[tuple[str, int, int]]:
    """(session, epoch, counter) of every chunk the cache's slots hold."""
    out = []
    for layer in cache.layers:
        for row in range(cache.row_session_slots.size):
            s = cache.sessions[int(cache.row_session_slots[row])]
            out += [(s.session_id, *split_nonce(e.nonce_bytes)) for e in layer.export_entries(row, s)]
    return out


# ---- generation, eager -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mistral", "hybrid"])
def test_sliding_and_hybrid_models_get_static_cache_s_layer_kinds_and_its_tokens(kind):
    """A model whose layers mix full attention and a sliding window (per-layer ``layer_types``) gets the
    encrypted counterpart of each of StaticCache's layers, and the same tokens past the window."""
    model, ids = tiny_model(kind), prompts(2, 7)
    plain = StaticCache(model.config, max_cache_len=32)
    want = generate(model, ids, plain, max_new_tokens=12, do_sample=False)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log)
    assert [layer.is_sliding for layer in cache.layers] == [layer.is_sliding for layer in plain.layers]
    assert any(layer.is_sliding for layer in cache.layers)
    got = generate(model, ids, cache, max_new_tokens=12, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    assert _ops(log)["encrypt"] == 2 * 2 * 18          # every written position sealed, in every layer and row
    log.close()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generates_what_static_cache_generates_with_the_records_of_the_working_set_mode(kind):
    model, ids = tiny_model(kind), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=12, do_sample=False)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log)
    got = generate(model, ids, cache, max_new_tokens=12, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    eager_log = KVAuditLog()
    eager = EncryptedCache(model.config, sessions=sessions("alice", "bob"), audit=eager_log, mode="working_set",
                           merge_segments=False)
    generate(model, ids, eager, max_new_tokens=12, do_sample=False)
    # one ENCRYPT per layer, row and position written; one READ per layer, row and step
    assert _ops(log) == _ops(eager_log) == {"encrypt": 2 * 2 * 18, "read": 2 * 2 * 12}
    by_row = collections.Counter((e.tenant_id, e.row) for e in _records(log, "encrypt"))
    assert by_row == {("alice", 0): 36, ("bob", 1): 36}
    log.close()
    eager_log.close()


def test_a_sealed_slot_opens_with_plain_aesgcm_and_its_aad_binds_layer_and_position():
    model, ids = tiny_model("llama"), prompts(2, 7)
    alice, bob = sessions("alice", "bob")
    cache = StaticEncryptedCache(model.config, sessions=[alice, bob], max_cache_len=16)
    generate(model, ids, cache, max_new_tokens=3, do_sample=False)
    entries = cache.export_entries(1, 1)
    assert [e.metadata.position for e in entries] == list(range(9))
    e = entries[4]
    plain = AESGCM(bob.key_for_epoch(e.epoch)).decrypt(e.nonce_bytes, e.ciphertext_bytes, e.aad())
    layer = cache.layers[1]
    want = torch.cat([layer.keys[1, :, 4], layer.values[1, :, 4]]).numpy().tobytes()
    assert plain == want
    moved = copy.deepcopy(e)
    moved.metadata = type(e.metadata)(e.metadata.tenant_id, e.metadata.session_id, 1, 5)
    with pytest.raises(Exception):
        AESGCM(bob.key_for_epoch(e.epoch)).decrypt(e.nonce_bytes, e.ciphertext_bytes, moved.aad())
    with pytest.raises(Exception):      # alice's key does not open bob's row
        AESGCM(alice.key_for_epoch(e.epoch)).decrypt(e.nonce_bytes, e.ciphertext_bytes, e.aad())


def test_positions_written_again_after_a_crop_are_sealed_under_fresh_nonces():
    from transformers.cache_utils import StaticLayer
    cfg = tiny_model("llama").config
    if not hasattr(StaticLayer, "crop"):
        cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=12)
        with pytest.raises(ValueError, match="cannot be cropped"):
            cache.crop(-3)
        return
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=12, audit=log)
    for layer in range(2):
        cache.update(*_kv(2, 6, 0), layer)
    before = set(_nonces(cache))
    cache.crop(-3)                 # StaticLayer's crop: positions 3..5 are written again
    for layer in range(2):
        cache.update(*_kv(2, 4, 1), layer)
    cache.check()
    after = _nonces(cache)
    assert len(after) == len(set(after)) == 2 * 2 * 7
    encrypts = _records(log, "encrypt")
    used = [(e.session_id, e.epoch, e.sequence_number) for e in encrypts]
    assert len(used) == 2 * 2 * (6 + 4) and len(set(used)) == len(used)   # no (key, nonce) twice in the run
    assert set(after) - before and set(after) <= set(used)
    log.close()


# ---- fail closed ---------------------------------------------------------------------------------------
def test_a_seal_past_the_reserved_range_writes_zeros_is_recorded_and_raised_at_check():
    cfg = tiny_model("llama").config
    log = KVAuditLog()
    alice, bob = sessions("alice", "bob")
    cache = StaticEncryptedCache(cfg, sessions=[alice, bob], max_cache_len=16, audit=log, nonce_reserve=5)
    for layer in range(2):
        cache.update(*_kv(2, 4, 2), layer)       # 8 positions per row: 5 sealed, 3 refused
    assert len(cache.export_entries(0, 0)) == 4 and len(cache.export_entries(1, 0)) == 1
    assert not cache.layers[1].arena[0, 1:4].any()
    with pytest.raises(SealFailedError, match="reserved nonce range was used up.*6 positions failed"):
        cache.check()
    refused = [e for e in _records(log, "encrypt") if not e.success]
    assert len(refused) == 6 and {e.tenant_id for e in refused} == {"alice", "bob"}
    # check() refilled the ranges from the sessions: later seals take counters never handed out before
    cache.update(*_kv(2, 1, 3), 0)
    cache.check()
    used = [(e.session_id, e.sequence_number) for e in _records(log, "encrypt") if e.success]
    assert len(used) == len(set(used)) == 12
    log.close()


def test_a_full_record_buffer_seals_nothing_unrecorded():
    cfg = tiny_model("llama").config
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice"), max_cache_len=16, audit=log, audit_records=10)
    cache.update(*_kv(1, 4, 0), 0)       # 4 ENCRYPT + 1 READ
    cache.update(*_kv(1, 5, 0), 1)       # 5 + 1 more would pass 10: refused, nothing sealed
    assert len(cache.export_entries(1, 0)) == 0 and not cache.layers[1].arena.any()
    with pytest.raises(SealFailedError, match="audit record buffer was full"):
        cache.check()
    assert _ops(log) == {"encrypt": 4, "read": 1}
    log.close()


def test_a_closed_session_has_its_rows_shredded_and_its_later_seals_refused():
    cfg = tiny_model("llama").config
    alice, bob = sessions("alice", "bob")
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=[alice, bob], max_cache_len=8, audit=log)
    cache.update(*_kv(2, 3, 0), 0)
    alice.close()
    layer = cache.layers[0]
    for t in (layer.keys, layer.values, layer.arena, layer.meta):
        assert not t[0].any() and t[1].any()
    cache.update(*_kv(2, 1, 1), 0)
    assert cache.export_entries(0, 0) == [] and len(cache.export_entries(0, 1)) == 4
    with pytest.raises(SealFailedError, match="tenant 'alice'.*position 3"):
        cache.check()
    assert _ops(log)["close"] >= 1
    log.close()


# ---- release and restore -------------------------------------------------------------------------------
def test_release_zeroes_the_plaintext_in_place_and_restore_opens_it_verified():
    model, ids = tiny_model("mistral"), prompts(2, 7)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=24, audit=log)
    generate(model, ids, cache, max_new_tokens=6, do_sample=False)      # past the sliding window of 8
    held = [(layer.keys.clone(), layer.values.clone(), layer.keys.data_ptr()) for layer in cache.layers]
    cache.release()
    assert cache.released and all(not layer.keys.any() and not layer.values.any() for layer in cache.layers)
    cache.restore()
    assert not cache.released
    for layer, (k, v, ptr) in zip(cache.layers, held):
        assert layer.keys.data_ptr() == ptr
        n = int(layer.get_seq_length())
        end = min(n, layer.max_cache_len)
        assert torch.equal(layer.keys[:, :, :end], k[:, :, :end]) and torch.equal(layer.values[:, :, :end],
                                                                                  v[:, :, :end])
    ops = _ops(log)
    assert ops["release"] == ops["decrypt"] == 2 * 2
    log.close()


def test_a_changed_ciphertext_byte_fails_restore_and_leaves_the_plaintext_zeroed():
    cfg = tiny_model("llama").config
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8, audit=log)
    for layer in range(2):
        cache.update(*_kv(2, 4, 0), layer)
    cache.release()
    cache.layers[1].arena[1, 2, 5] ^= 1
    with pytest.raises(DecryptionError, match="tenant 'bob', layer 1, row 1, position 2"):
        cache.restore()
    assert cache.released and not any(layer.keys.any() for layer in cache.layers)
    failed = [e for e in _records(log, "decrypt") if not e.success]
    assert any(e.position == 2 and e.position_count == 1 and e.tenant_id == "bob" for e in failed)
    log.close()


def test_an_update_after_release_opens_first_and_continues_as_static_cache():
    model, ids = tiny_model("llama"), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=8, do_sample=False)
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32)
    first = generate(model, ids, cache, max_new_tokens=4, do_sample=False)
    cache.release()
    attn = torch.ones_like(first)
    got = generate(model, first, cache, attention_mask=attn, max_new_tokens=4, do_sample=False)
    cache.check()
    assert torch.equal(got, want)


# ---- construction ------------------------------------------------------------------------------------
def test_encrypted_cache_refuses_max_cache_len_and_names_the_static_form():
    with pytest.raises(TypeError, match="StaticEncryptedCache"):
        EncryptedCache(tiny_model("llama").config, sessions=sessions("alice")[0], max_cache_len=64)


def test_refusals():
    cfg = tiny_model("llama").config
    alice = sessions("alice")[0]
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticEncryptedCache(cfg, sessions=alice, max_cache_len=0)
    with pytest.raises(TypeError, match="offloading"):
        StaticEncryptedCache(cfg, sessions=alice, max_cache_len=8, offloading=True)
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8)
    with pytest.raises(ValueError, match="2 sessions were given for a batch of 3 rows"):
        cache.update(*_kv(3, 1, 0), 0)
    cache.update(*_kv(2, 1, 0), 0)
    with pytest.raises(ValueError, match="out of range for a batch of 2"):
        cache.reorder_cache(torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="fixed batch"):
        cache.batch_select_indices(torch.tensor([0]))
    cache.close()
    with pytest.raises(RuntimeError, match="no seal handler"):
        cache.update(*_kv(2, 1, 0), 0)


def test_the_operators_fake_implementations_match_their_schemas():
    cfg = tiny_model("llama").config
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8, audit=log)
    cache.update(*_kv(2, 3, 0), 0)
    layer, state = cache.layers[0], cache._ctx
    pos = torch.tensor([3], dtype=torch.int64)
    torch.library.opcheck(torch.ops.pqc_kv_cache.seal_positions.default,
                          (state.handle, 0, layer.keys, layer.values, pos, pos, layer.arena, layer.meta,
                           *state.seal_state(), False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.pqc_kv_cache.open_positions.default,
                          (state.handle, 0, layer.keys, layer.values, layer.cumulative_length, layer.arena,
                           layer.meta, layer.released_mask, *state.open_state(), False),
                          test_utils=("test_schema", "test_faketensor"))
    cache.check()
    log.close()


# ---- compiled --------------------------------------------------------------------------------------------
def _compiled(kind: str):
    model = copy.deepcopy(tiny_model(kind))
    model.forward = torch.compile(model.forward, fullgraph=True)
    return model




@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_compiled_fullgraph_generates_what_compiled_static_cache_generates(kind, fresh_dynamo):
    model, ids = _compiled(kind), prompts(2, 7)
    runs = [dict(do_sample=False)] + ([dict(do_sample=True, seed=5, top_k=20)] if kind == "llama" else [])
    eager_counts = None
    for kw in runs:
        want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=12, **kw)
        log = KVAuditLog()
        cache = StaticEncryptedCache(model.config, sessions=sessions("alice", "bob"), max_cache_len=32, audit=log)
        cache.early_initialization(2, HEADS, DIM, torch.float32, torch.device("cpu"))
        got = generate(model, ids, cache, max_new_tokens=12, **kw)
        cache.check()
        assert torch.equal(got, want), kw
        counts = _ops(log)
        assert counts == {"encrypt": 2 * 2 * 18, "read": 2 * 2 * 12}     # as in eager mode (above)
        used = [(e.session_id, e.epoch, e.sequence_number) for e in _records(log, "encrypt")]
        assert len(used) == len(set(used))
        assert eager_counts in (None, counts)
        eager_counts = counts
        log.close()


def test_the_record_buffer_numbers_every_record_and_refuses_to_drain_a_gap():
    cfg = tiny_model("llama").config
    log = KVAuditLog()
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8, audit=log)
    for layer in range(2):
        cache.update(*_kv(2, 2, 0), layer)
    buf = cache._ctx.records
    assert buf.pending() == 2 * (2 * 2 + 2)
    numbers = buf.records[:buf.pending()].numpy().view(np.uint64)[:, 0]
    assert numbers.tolist() == list(range(12))
    buf.records[5, :8] = torch.tensor([99, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)   # record 5 says 99
    with pytest.raises(AuditError, match="record 5 carries number 99, expected 5; nothing was drained"):
        cache.check()
    assert len(log.entries(limit=None)) == 0 and buf.pending() == 12
    log.close()


@pytest.mark.skipif(not hasattr(__import__("transformers").GenerationMixin, "generate_batch"),
                    reason="this transformers has no continuous batching")
def test_continuous_batching_refuses_a_static_encrypted_cache():
    from pqc_kv_cache.cache.guards import ContinuousBatchingRefused
    model, ids = tiny_model("llama"), prompts(1, 7)
    cache = StaticEncryptedCache(model.config, sessions=sessions("alice"), max_cache_len=16)
    with pytest.raises(ContinuousBatchingRefused, match="continuous batching"):
        model.generate_batch([ids[0].tolist()], max_new_tokens=3, past_key_values=cache)
    assert not any(layer.is_initialized for layer in cache.layers)


def test_a_collected_cache_leaves_no_plaintext_behind():
    import gc
    cfg = tiny_model("llama").config
    cache = StaticEncryptedCache(cfg, sessions=sessions("alice", "bob"), max_cache_len=8)
    cache.update(*_kv(2, 3, 0), 0)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.any() and values.any()
    del cache
    gc.collect()
    assert not keys.any() and not values.any()
