import dataclasses
import threading

import pytest
from hypothesis import given, settings, strategies as st

from pqc_kv_cache import (
    CacheDecryptor,
    CacheEncryptor,
    DecryptionError,
    EntryMetadata,
    KeyRotationPolicy,
    KeyRotationRequiredError,
    KVCacheEntry,
    NonceReplayError,
    SessionClosedError,
    SessionExpiredError,
    MalformedEntryError,
    TenantIdentity,
    TenantIsolationError,
    establish_tenant_session,
)
from pqc_kv_cache.encryptor import ReplayWindow


@pytest.fixture
def alice():
    return establish_tenant_session(TenantIdentity("alice"))


@pytest.fixture
def bob():
    return establish_tenant_session(TenantIdentity("bob"))


def entry(session, layer=0, position=0, k=b"k" * 16, v=b"v" * 16, count=1):
    return KVCacheEntry(EntryMetadata(session.tenant_id, session.session_id, layer, position,
                                      position_count=count), k, v)


def test_round_trip_and_sequence_numbers(alice):
    enc, dec = CacheEncryptor(alice), CacheDecryptor(alice)
    a = enc.encrypt(entry(alice, 1, 2, b"key", b"value"))
    b = enc.encrypt(entry(alice, 1, 3))
    assert (a.sequence_number, b.sequence_number) == (1, 2)
    assert alice.entries_encrypted == 2
    out = dec.decrypt(a)
    assert (out.key_tensor_bytes, out.value_tensor_bytes) == (b"key", b"value")
    assert out.metadata == a.metadata


def test_same_plaintext_encrypts_differently(alice):
    enc = CacheEncryptor(alice)
    e = entry(alice)
    assert enc.encrypt(e).ciphertext != enc.encrypt(e).ciphertext


def test_opening_twice_is_a_replay(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice))
    dec = CacheDecryptor(alice)
    dec.decrypt(e)
    with pytest.raises(NonceReplayError):
        dec.decrypt(e)


def test_failed_tag_does_not_burn_the_counter(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice))
    bad = dataclasses.replace(e, ciphertext=bytes([e.ciphertext_bytes[0] ^ 1]) + e.ciphertext_bytes[1:])
    dec = CacheDecryptor(alice)
    with pytest.raises(DecryptionError):
        dec.decrypt(bad)
    dec.decrypt(e)


@pytest.mark.parametrize("field,value", [("layer_idx", 4), ("position", 9), ("position_count", 2),
                                         ("token_id", 17), ("kv_role", "key")])
def test_chunk_moved_to_other_place_fails_tag(alice, field, value):
    e = CacheEncryptor(alice).encrypt(entry(alice, layer=3, position=8))
    moved = dataclasses.replace(e, metadata=dataclasses.replace(e.metadata, **{field: value}))
    with pytest.raises(DecryptionError) as info:
        CacheDecryptor(alice).decrypt(moved)
    assert info.value.tenant_id == "alice"


def test_changed_key_len_or_shape_fails_tag(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice), dtype="float16", num_heads=2, head_dim=4)
    for change in (dict(key_len=e.key_len - 1), dict(num_heads=4), dict(dtype="bfloat16"), dict(head_dim=2)):
        with pytest.raises(DecryptionError):
            CacheDecryptor(alice).decrypt(dataclasses.replace(e, **change))


def test_error_names_tenant_layer_and_positions(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice, layer=5, position=812, count=3))
    bad = dataclasses.replace(e, ciphertext=e.ciphertext_bytes[:-1] + bytes([e.ciphertext_bytes[-1] ^ 0x80]))
    with pytest.raises(DecryptionError, match=r"alice.*layer 5.*812\.\.814") as info:
        CacheDecryptor(alice).decrypt(bad)
    assert info.value.positions == range(812, 815) and info.value.layer_idx == 5


def test_other_tenants_entry_is_refused(alice, bob):
    e = CacheEncryptor(alice).encrypt(entry(alice))
    with pytest.raises(TenantIsolationError):
        CacheDecryptor(bob).decrypt(e)
    with pytest.raises(TenantIsolationError):
        CacheEncryptor(bob).encrypt(entry(alice))


def test_entry_relabelled_for_other_tenant_fails(alice, bob):
    """Relabelling alice's chunk as bob's passes the label check but not the key and AAD."""
    e = CacheEncryptor(alice).encrypt(entry(alice))
    forged = dataclasses.replace(e, metadata=dataclasses.replace(e.metadata, tenant_id="bob",
                                                                 session_id=bob.session_id))
    with pytest.raises(DecryptionError):
        CacheDecryptor(bob).decrypt(forged)


def test_rotation_keeps_old_entries_readable_until_retired(alice):
    enc = CacheEncryptor(alice)
    old = enc.encrypt(entry(alice, position=0))
    KeyRotationPolicy().rotate(alice)
    new = enc.encrypt(entry(alice, position=1))
    assert (old.epoch, new.epoch) == (0, 1)
    dec = CacheDecryptor(alice)
    dec.decrypt(old)
    dec.decrypt(new)
    alice.retire_epoch(0)
    with pytest.raises(DecryptionError, match="retired"):
        CacheDecryptor(alice).decrypt(old)


def test_hard_cap_raises_instead_of_encrypting(alice):
    KeyRotationPolicy(max_entries=2, hard_max_entries=3).apply(alice)
    enc = CacheEncryptor(alice)
    for _ in range(3):
        enc.encrypt(entry(alice))
    with pytest.raises(KeyRotationRequiredError):
        enc.encrypt(entry(alice))
    alice.rotate_key()
    enc.encrypt(entry(alice))


def test_closed_session_cannot_encrypt_or_decrypt(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice))
    alice.close()
    with pytest.raises(SessionClosedError):
        CacheEncryptor(alice).encrypt(entry(alice))
    with pytest.raises(SessionClosedError):
        CacheDecryptor(alice).decrypt(e)


def test_type_errors_for_misuse(alice):
    with pytest.raises(TypeError):
        CacheEncryptor("alice")
    with pytest.raises(TypeError):
        CacheEncryptor(alice).encrypt(b"raw")
    with pytest.raises(TypeError):
        CacheDecryptor(alice).decrypt({"nonce": ""})


def test_no_key_nonce_reuse_across_100k_encryptions_with_rotation_from_8_threads():
    session = establish_tenant_session(TenantIdentity("alice"))
    policy = KeyRotationPolicy(max_entries=5000)
    enc = CacheEncryptor(session)
    seen, lock = [], threading.Lock()
    e = entry(session, k=b"", v=b"x")

    def work():
        mine = []
        for i in range(12_500):
            if i % 500 == 0:
                if policy.should_rotate(session)[0]:
                    with lock:
                        if policy.should_rotate(session)[0]:
                            policy.rotate(session)
            out = enc.encrypt(e)
            mine.append((out.epoch, out.nonce))
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 100_000
    assert len(set(n for _, n in seen)) == 100_000          # nonces unique outright
    assert session.epoch >= 10                               # rotations happened
    keys = {session.key_for_epoch(ep) for ep in session.live_epochs}
    assert len(keys) == len(session.live_epochs)             # one distinct key per epoch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=200), st.sampled_from([64, 128, 1024]))
def test_replay_window_accepts_each_counter_at_most_once(counters, size):
    w = ReplayWindow(size)
    accepted = []
    for c in counters:
        try:
            w.check(c)
        except NonceReplayError:
            continue
        w.mark(c)
        accepted.append(c)
    assert len(accepted) == len(set(accepted))
    fresh = [c for c in dict.fromkeys(counters)]
    # every counter presented in increasing order is accepted exactly once
    w2 = ReplayWindow(size)
    for c in sorted(set(fresh)):
        w2.check(c)
        w2.mark(c)


def test_replay_window_refuses_counters_older_than_window():
    w = ReplayWindow(64)
    w.mark(100)
    w.check(37)                 # inside the window, unseen
    with pytest.raises(NonceReplayError, match="older"):
        w.check(36)


def test_expired_session_cannot_open_with_a_cached_cipher(clock):
    s = establish_tenant_session(TenantIdentity("alice"), clock=clock)
    e = CacheEncryptor(s).encrypt(entry(s))
    clock.advance(901)
    with pytest.raises(SessionExpiredError):
        CacheDecryptor(s).decrypt(e)


def test_entry_with_foreign_metadata_object_is_malformed(alice):
    e = CacheEncryptor(alice).encrypt(entry(alice))
    with pytest.raises(MalformedEntryError):
        CacheDecryptor(alice).decrypt(dataclasses.replace(e, metadata={"tenant_id": "alice"}))
    with pytest.raises(MalformedEntryError):
        CacheDecryptor(alice).decrypt(dataclasses.replace(e, key_len="3"))
