"""EncryptedCache is a drop-in for DynamicCache: token-identical generation in every mode, and exact audit counts."""

from __future__ import annotations

import warnings

import pytest
import torch

from transformers import DynamicCache

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import TenantIsolationError
from support.cache_models import generate, prompts, sessions, tiny_model

KINDS = ["llama", "mistral", "neox"]


@pytest.fixture(scope="module")
def alice_bob():
    return sessions("alice", "bob")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_two_tenants_matches_dynamic_cache(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 12)
    ref = generate(model, ids, max_new_tokens=12, do_sample=False)
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob)
    out = generate(model, ids, cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)
    if mode == "sealed":
        assert all(layer.keys is None and layer.values is None for layer in cache.layers)
    else:   # the working set holds what DynamicCache holds
        ref_cache = DynamicCache(config=model.config)
        generate(model, ids, ref_cache, max_new_tokens=12, do_sample=False)
        for mine, theirs in zip(cache.layers, ref_cache.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_mistral_layers_are_sliding_and_window_is_exceeded(mode, alice_bob):
    model = tiny_model("mistral")
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob)
    assert all(layer.is_sliding and layer.sliding_window == 8 for layer in cache.layers)
    generate(model, prompts(2, 12), cache, max_new_tokens=6, do_sample=False)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 17 and layer.get_max_length() == 8
    assert layer.get_mask_sizes(1) == (8, 10)
    # segments wholly outside the window were dropped
    assert int(layer.table.start[0] + layer.table.count[0]) > 17 - 8


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_with_fixed_seed_matches(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 9, seed=3)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9)
    ref = generate(model, ids, seed=123, **kw)
    out = generate(model, ids, EncryptedCache(model.config, mode=mode, sessions=alice_bob), seed=123, **kw)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_with_return_sequences_matches(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 10, seed=4)
    kw = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = generate(model, ids, **kw)
    audit = KVAuditLog()
    # generate() repeats each prompt max(num_beams, num_return_sequences) times before the first forward
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob, audit=audit, rows_per_session=3)
    out = generate(model, ids, cache, **kw)
    assert torch.equal(ref, out)
    # the expanded rows are mapped explicitly: rows 0-2 alice, 3-5 bob
    assert [s.tenant_id for s in cache.layers[0].row_sessions] == ["alice"] * 3 + ["bob"] * 3
    assert audit.entries(limit=1, operation="reorder")
    audit.close()


@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_matches(mode, kind, alice_bob):
    model, assistant = tiny_model(kind), tiny_model(kind, seed=5, layers=1)
    ids = prompts(1, 11, seed=6)
    ref = generate(model, ids, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob[:1], audit=audit)
    out = generate(model, ids, cache, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(ref, out)
    assert audit.entries(limit=1, operation="crop")
    audit.close()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_lookup_decoding_crops_and_matches(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = torch.tensor([[5, 6, 7, 8, 9] * 3])
    ref = generate(model, ids, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob[:1], audit=audit)
    out = generate(model, ids, cache, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(ref, out)
    crops = audit.entries(limit=None, operation="crop")
    assert crops and any(e.position_count > 0 for e in crops)
    audit.close()


@pytest.mark.parametrize("kind", KINDS)
def test_second_generate_reuses_the_cache(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 8, seed=7)
    from transformers import DynamicCache
    ref_cache = DynamicCache(config=model.config)
    ref1 = generate(model, ids, ref_cache, max_new_tokens=5, do_sample=False)
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob)
    out1 = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref1, out1)
    follow = torch.cat([ref1, prompts(2, 3, seed=8)], dim=1)
    ref2 = generate(model, follow, ref_cache, max_new_tokens=5, do_sample=False)
    out2 = generate(model, follow, cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref2, out2)
    assert cache.get_seq_length() == ref_cache.get_seq_length()


@pytest.mark.parametrize("kind", KINDS)
def test_deep_copied_prompt_cache_continues_like_a_deep_copied_dynamic_cache(mode, kind, alice_bob):
    """transformers' prompt-reuse recipe: fill a cache with a shared prefix, deepcopy it per request."""
    import copy
    from transformers import DynamicCache
    model = tiny_model(kind)
    prefix = prompts(2, 11, seed=14)
    ref_cache = DynamicCache(config=model.config)
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        model(input_ids=prefix, past_key_values=ref_cache, use_cache=True)
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
    copies = [(copy.deepcopy(ref_cache), copy.deepcopy(cache)) for _ in range(2)] + [(ref_cache, cache)]
    for n, (ref_c, enc_c) in enumerate(copies):
        follow = torch.cat([prefix, prompts(2, 2 + n, seed=15 + n)], dim=1)
        ref = generate(model, follow, ref_c, max_new_tokens=6, do_sample=False)
        out = generate(model, follow, enc_c, max_new_tokens=6, do_sample=False)
        assert torch.equal(ref, out)
        assert enc_c.get_seq_length() == ref_c.get_seq_length()


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_two_tenant_batch_matches(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 10, seed=9)
    mask = torch.ones_like(ids)
    ids[0, :4] = 0
    mask[0, :4] = 0
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob)
    out = generate(model, ids, cache, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_matches(mode, kind, alice_bob):
    model = tiny_model(kind)
    model_bf16 = type(model)(model.config).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16.generation_config = model.generation_config
    model_bf16 = model_bf16.to(torch.bfloat16)
    ids = prompts(2, 9, seed=10)
    ref = generate(model_bf16, ids, max_new_tokens=8, do_sample=False)
    cache = EncryptedCache(model_bf16.config, mode=mode, sessions=alice_bob)
    out = generate(model_bf16, ids, cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)
    assert cache.export_entries(0, 0)[0].dtype == "bfloat16"


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_encrypt_records_equal_layers_rows_positions_with_right_tenant(mode, kind, alice_bob):
    model = tiny_model(kind)
    ids = prompts(2, 12, seed=11)
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob, audit=audit)
    out = generate(model, ids, cache, max_new_tokens=9, do_sample=False)
    audit.flush()
    written = out.shape[1] - 1          # the last token is sampled, never written to the cache
    layers = model.config.num_hidden_layers
    enc = audit.entries(limit=None, operation="encrypt")
    assert len(enc) == layers * 2 * written
    for tenant, row in (("alice", 0), ("bob", 1)):
        mine = audit.entries(limit=None, operation="encrypt", tenant_id=tenant)
        assert len(mine) == layers * written
        assert {e.row for e in mine} == {row}
        for layer in range(layers):
            assert sorted(e.position for e in mine if e.layer_idx == layer) == list(range(written))
    # one read record per (layer, row) per forward: DECRYPT when sealed, READ (no decryption) in the working set
    dec = audit.entries(limit=None, operation="decrypt" if mode == "sealed" else "read")
    assert len(dec) == layers * 2 * (9)
    assert all(e.success for e in dec)
    if mode == "working_set":
        assert not audit.entries(limit=None, operation="decrypt")
        for tenant, row in (("alice", 0), ("bob", 1)):
            mine = [e for e in dec if e.tenant_id == tenant]
            assert {e.row for e in mine} == {row}
    audit.close()


def test_audit_none_disables_auditing(mode, alice_bob):
    model = tiny_model("llama")
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob, audit=None)
    generate(model, prompts(2, 5), cache, max_new_tokens=3, do_sample=False)
    assert cache.audit is None


def test_rotation_mid_generation_is_token_identical_and_retires_old_keys(mode, alice_bob):
    from pqc_kv_cache.rotation import KeyRotationPolicy
    model = tiny_model("llama")
    ids = prompts(2, 6, seed=12)
    ref = generate(model, ids, max_new_tokens=10, do_sample=False)
    a, b = sessions("alice", "bob")
    audit = KVAuditLog()
    # 2 layers x 1 chunk per update: the policy fires every few steps
    cache = EncryptedCache(model.config, mode=mode, sessions=[a, b], audit=audit, policy=KeyRotationPolicy(max_entries=5))
    out = generate(model, ids, cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(ref, out)
    assert a.epoch >= 2 and a.live_epochs == [a.epoch]
    epochs = {int(e) for layer in cache.layers for e in layer.table.epoch[:, 0]}
    assert epochs == {a.epoch}
    assert audit.entries(limit=None, operation="rotate", tenant_id="alice")
    audit.close()


def test_manual_rotate_between_generates(mode, alice_bob):
    model = tiny_model("llama")
    a, b = sessions("alice", "bob")
    ids = prompts(2, 6, seed=13)
    ref_first = generate(model, ids, max_new_tokens=4, do_sample=False)
    cache = EncryptedCache(model.config, mode=mode, sessions=[a, b])
    first = generate(model, ids, cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref_first, first)
    assert cache.rotate("bob") == [1]
    assert b.live_epochs == [1] and a.live_epochs == [0]
    follow = torch.cat([first, prompts(2, 2, seed=14)], dim=1)
    ref = generate(model, follow, max_new_tokens=4, do_sample=False)
    out = generate(model, follow, cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out)
    with pytest.raises(TenantIsolationError):
        cache.rotate("mallory")


@pytest.mark.parametrize("kind", KINDS)
def test_a_released_cache_reopens_and_continues_token_identically(mode, kind, alice_bob):
    """The request pattern: generate inside ``cache.generating()``, the plaintext is released when it ends,
    the next turn opens the ciphertext once and continues as DynamicCache does."""
    model = tiny_model(kind)
    ids = prompts(2, 8, seed=21)
    ref_cache = DynamicCache(config=model.config)
    ref1 = generate(model, ids, ref_cache, max_new_tokens=5, do_sample=False)
    audit = KVAuditLog()
    cache = EncryptedCache(model.config, mode=mode, sessions=alice_bob, audit=audit)
    with cache.generating():
        out1 = generate(model, ids, cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref1, out1)
    assert cache.released == (mode == "working_set")
    assert all(layer.keys is None for layer in cache.layers)
    audit.flush()
    assert len(audit.entries(limit=None, operation="release")) == model.config.num_hidden_layers * 2
    opened_before = len(audit.entries(limit=None, operation="decrypt"))
    follow = torch.cat([ref1, prompts(2, 3, seed=22)], dim=1)
    ref2 = generate(model, follow, ref_cache, max_new_tokens=5, do_sample=False)
    with cache.generating():
        out2 = generate(model, follow, cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(ref2, out2)
    audit.flush()
    opened = len(audit.entries(limit=None, operation="decrypt")) - opened_before
    if mode == "working_set":      # opened once per layer and row, then read from the working set
        assert opened == model.config.num_hidden_layers * 2
    else:                          # every forward opens every layer and row
        assert opened == model.config.num_hidden_layers * 2 * 5
    audit.close()
