import dataclasses
import json
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from pqc_kv_cache import (
    CacheEncryptor,
    EncryptedEntry,
    EntryMetadata,
    KVCacheEntry,
    KVCacheError,
    MalformedEntryError,
    TenantIdentity,
    establish_tenant_session,
)
from pqc_kv_cache.envelope import AAD_SIZE, build_aad, make_nonce, session_tag, split_nonce, tenant_tag

# made at import: a TTL of a day, so a slow run of the whole suite cannot outlive it (the default is 15 minutes)
SESSION = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=24 * 3600)


def sealed(layer=3, position=7, count=2, k=b"K" * 32, v=b"V" * 32, **kw) -> EncryptedEntry:
    meta = EntryMetadata("alice", SESSION.session_id, layer, position, position_count=count)
    return CacheEncryptor(SESSION).encrypt(KVCacheEntry(meta, k, v), **kw)


def test_entry_metadata_defaults_and_is_frozen():
    m = EntryMetadata("alice", "sid", 1, 2)
    assert (m.token_id, m.kv_role, m.position_count) == (-1, "both", 1)
    with pytest.raises(AttributeError):
        m.layer_idx = 5


@pytest.mark.parametrize("kwargs", [dict(layer_idx=-1), dict(position=-3), dict(kv_role="q"),
                                    dict(position_count=0), dict(tenant_id=""), dict(layer_idx=1.5)])
def test_entry_metadata_rejects_bad_fields(kwargs):
    base = dict(tenant_id="alice", session_id="sid", layer_idx=0, position=0)
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError)):
        EntryMetadata(**base)


def test_plaintext_size_is_a_method():
    m = EntryMetadata("alice", "sid", 0, 0)
    assert KVCacheEntry(m, b"ab", b"cde").plaintext_size() == 5


def test_nonce_is_epoch_then_counter_big_endian():
    assert make_nonce(2, 5) == b"\x00\x00\x00\x02" + b"\x00" * 7 + b"\x05"
    assert split_nonce(make_nonce(7, 2**64 - 1)) == (7, 2**64 - 1)
    with pytest.raises(ValueError):
        make_nonce(2**32, 0)


def test_aad_layout_byte_by_byte():
    aad = build_aad(tenant_id="alice", session_id="sid", epoch=3, layer_idx=5, position=812,
                    position_count=4, key_len=4096, dtype="bfloat16", num_heads=8, head_dim=128, token_id=-1)
    assert len(aad) == AAD_SIZE == 80
    assert aad[0:4] == b"PKVA" and aad[4] == 1 and aad[5] == 0 and aad[6] == 3 and aad[7] == 0
    assert aad[8:24] == tenant_tag("alice") and aad[24:40] == session_tag("sid")
    assert struct.unpack(">IIQIIIIq", aad[40:80]) == (3, 5, 812, 4, 4096, 8, 128, -1)


def test_plain_aesgcm_opens_an_entry_with_its_aad():
    e = sealed()
    plain = AESGCM(SESSION.key_for_epoch(e.epoch)).decrypt(e.nonce_bytes, e.ciphertext_bytes, e.aad())
    assert plain == b"K" * 32 + b"V" * 32
    assert e.key_len == 32 and e.sequence_number == split_nonce(e.nonce_bytes)[1]


def test_bytes_and_dict_round_trip():
    e = sealed(dtype="float16", num_heads=2, head_dim=8)
    assert EncryptedEntry.from_bytes(e.to_bytes()) == e
    assert EncryptedEntry.from_dict(e.to_dict()) == e
    assert EncryptedEntry.from_json(e.to_json()) == e
    d = e.to_dict()
    assert d["nonce"] == e.nonce and d["ciphertext"] == e.ciphertext
    assert d["metadata"]["tenant_id"] == "alice"


def test_from_dict_accepts_earlier_minimal_fields():
    e = sealed()
    d = e.to_dict()
    for k in ("epoch", "dtype", "num_heads", "head_dim", "format_version"):
        d.pop(k)
    d.pop("position_count")
    for k in ("token_id", "kv_role"):
        d["metadata"].pop(k)
    # without position_count the AAD differs, so only the structure is compared
    parsed = EncryptedEntry.from_dict(d)
    assert parsed.metadata.position_count == 1 and parsed.epoch == 0


@pytest.mark.parametrize("mutate", [
    lambda b: b[:10],
    lambda b: b[:-1],
    lambda b: b + b"x",
    lambda b: b"XXXX" + b[4:],
    lambda b: b[:4] + b"\x09" + b[5:],
    lambda b: b[:6] + b"\xff" + b[7:],
    lambda b: b"",
])
def test_malformed_bytes_raise_malformed_entry(mutate):
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_bytes(mutate(sealed().to_bytes()))


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("nonce"),
    lambda d: d.update(nonce="zz"),
    lambda d: d.update(nonce="00"),
    lambda d: d.update(ciphertext=5),
    lambda d: d.update(key_len="3"),
    lambda d: d.update(key_len=10**9),
    lambda d: d.update(metadata=[]),
    lambda d: d["metadata"].update(layer_idx=-1),
    lambda d: d["metadata"].update(kv_role="nope"),
    lambda d: d.update(sequence_number=-1),
    lambda d: d.update(position_count=0),
    lambda d: d.update(format_version=2),
    lambda d: d.update(dtype="complex64"),
])
def test_malformed_dicts_raise_malformed_entry(mutate):
    d = sealed().to_dict()
    mutate(d)
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_dict(d)


def test_non_dict_and_non_json():
    for bad in (None, [], "x", 3):
        with pytest.raises(MalformedEntryError):
            EncryptedEntry.from_dict(bad)
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_json("{not json")
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_bytes("a string")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_raise_kv_cache_errors(data):
    try:
        EncryptedEntry.from_bytes(data)
    except KVCacheError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_bytes_only_raise_kv_cache_errors(data):
    raw = bytearray(sealed().to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        EncryptedEntry.from_bytes(bytes(raw[:cut]))
    except KVCacheError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_random_json_only_raises_kv_cache_errors(value):
    try:
        EncryptedEntry.from_json(json.dumps(value))
    except KVCacheError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_valid_dict_with_random_field_values_only_raises_kv_cache_errors(data):
    d = sealed().to_dict()
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_values)
    if data.draw(st.booleans()):
        md = d.get("metadata")
        mk = data.draw(st.sampled_from(sorted(md))) if isinstance(md, dict) and md else None
        if mk:
            d["metadata"][mk] = data.draw(json_values)
    try:
        EncryptedEntry.from_dict(d)
    except KVCacheError:
        pass


def test_ids_too_long_for_the_binary_form_are_malformed():
    long_id = "t" * 70000
    e = sealed()
    big = dataclasses.replace(e, metadata=dataclasses.replace(e.metadata, session_id=long_id))
    with pytest.raises(MalformedEntryError):
        big.to_bytes()
