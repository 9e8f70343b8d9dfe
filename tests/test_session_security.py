"""Sessions, entries and the reference path under hostile or careless use.

Duplicated session state never seals twice with one (key, nonce); out-of-range
values still reach the audit log; nothing prints key material; malformed input
gets one library error; nothing allocates without bound.
"""

import copy
import math
import os
import pickle
import warnings

import numpy as np
import pytest

from pqc_kv_cache import (
    CacheDecryptor,
    CacheEncryptor,
    DecryptionError,
    EncryptedEntry,
    EntryMetadata,
    KeyRotationPolicy,
    KVAuditLog,
    KVCacheEntry,
    MalformedEntryError,
    NonceReplayError,
    TenantIdentity,
    TenantIsolationError,
    TenantIsolationManager,
    TenantKeyPair,
    establish_tenant_session,
)
from pqc_kv_cache.backends.base import KeySlot
from pqc_kv_cache.encryptor import ReplayWindow
from pqc_kv_cache.envelope import make_nonce, session_tag, tenant_tag
from pqc_kv_cache.errors import KVCacheError, SessionForkedError
from pqc_kv_cache.session import MAX_TTL_SECONDS


def _entry(session, layer=0, position=0, k=b"secret-K" * 4, v=b"secret-V" * 4):
    return KVCacheEntry(EntryMetadata(session.tenant_id, session.session_id, layer, position), k, v)


@pytest.fixture
def alice():
    s = establish_tenant_session(TenantIdentity("alice"))
    yield s
    s.close()


# ---- fork, copy, deepcopy, pickle: never two sealers of one counter ------------------------------

def _in_child(work) -> bytes:
    """Run ``work()`` in a forked child; returns what it returned (bytes) through a pipe."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # "process is multi-threaded" (torch's pool)
        pid = os.fork()
    if pid == 0:   # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            try:
                out = work()
            except BaseException as exc:
                out = f"raised {type(exc).__name__}: {exc}".encode()
            os.write(w, out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return b"".join(chunks)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
def test_forked_child_never_seals_with_the_parents_counters(alice):
    enc = CacheEncryptor(alice)
    enc.encrypt_entry(_entry(alice))                 # counter 1, sealed before the fork

    def child():
        nonces = []
        for call in (lambda: enc.encrypt_entry(_entry(alice, position=1)).nonce,
                     lambda: alice.reserve(4) and b"",
                     lambda: alice.rotate_key() and b""):
            try:
                nonces.append(b"sealed " + call().hex().encode())
            except SessionForkedError:
                nonces.append(b"refused")
        return b"|".join(nonces)

    got = _in_child(child).split(b"|")
    parent = enc.encrypt_entry(_entry(alice, position=1))   # the parent goes on with counter 2
    assert parent.sequence_number == 2
    assert got == [b"refused", b"refused", b"refused"], got
    assert not alice.forked


@needs_fork
def test_forked_child_still_opens_and_can_establish_its_own_session(alice):
    sealed = CacheEncryptor(alice).encrypt_entry(_entry(alice))

    def child():
        assert alice.forked and "forked" in repr(alice)
        opened = CacheDecryptor(alice).decrypt_entry(sealed)
        own = establish_tenant_session(TenantIdentity("alice"))
        mine = CacheEncryptor(own).encrypt_entry(_entry(own))
        ok = opened.key_tensor_bytes == b"secret-K" * 4 and mine.sequence_number == 1 and not own.forked
        return b"ok" if ok else b"wrong"

    assert _in_child(child) == b"ok"


@needs_fork
def test_forked_child_manager_replaces_inherited_sessions():
    mgr = TenantIsolationManager()
    inherited = mgr.create_session(TenantIdentity("alice"))

    def child():
        fresh = mgr.create_session(TenantIdentity("alice"))
        out = mgr.encrypt("alice", _entry(fresh))
        return b"ok" if fresh is not inherited and out.sequence_number == 1 and inherited.closed else b"wrong"

    assert _in_child(child) == b"ok"
    assert mgr.create_session(TenantIdentity("alice")) is inherited and not inherited.closed
    mgr.close()


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))],
                         ids=["copy", "deepcopy", "pickle"])
def test_a_session_cannot_be_duplicated(alice, duplicate):
    alice.reserve(3)
    with pytest.raises(TypeError, match="TenantSession cannot be"):
        duplicate(alice)


def test_containers_deep_copied_with_the_session_in_memo_share_it(alice):
    enc = CacheEncryptor(alice)
    held = {"sessions": [alice], "encryptor": enc}
    twin = copy.deepcopy(held, {id(alice): alice})
    assert twin["sessions"][0] is alice and twin["encryptor"].session is alice
    a = enc.encrypt_entry(_entry(alice))
    b = twin["encryptor"].encrypt_entry(_entry(alice))
    assert a.nonce != b.nonce           # one counter, shared


# ---- out-of-range layer and position still reach the audit log -----------------------------------

@pytest.fixture
def managed():
    log = KVAuditLog()
    mgr = TenantIsolationManager(audit=log)
    a = mgr.create_session(TenantIdentity("alice"))
    b = mgr.create_session(TenantIdentity("bob"))
    yield log, mgr, a, b
    mgr.close()
    log.close()


BIG = [(70_000, 0), (0, 2 ** 32), (2 ** 32 - 1, 2 ** 64 - 1)]


@pytest.mark.parametrize("layer,position", BIG)
def test_cross_tenant_decrypt_with_out_of_range_fields_is_refused_and_recorded(managed, layer, position):
    log, mgr, a, b = managed
    sealed = mgr.encrypt("bob", _entry(b, layer, position))
    with pytest.raises(TenantIsolationError):
        mgr.decrypt("alice", sealed)
    log.flush()
    (v,) = log.entries(operation="isolation-violation")
    assert v.tenant_id == "alice" and not v.success
    assert v.layer_idx == min(layer, 0xFFFE) and v.position == min(position, 0xFFFF_FFFF)
    assert "clamped:" in v.details
    if layer > 0xFFFE:
        assert f"layer_idx={layer} recorded as 65534" in v.details
    if position > 0xFFFF_FFFF:
        assert f"position={position} recorded as 4294967295" in v.details


@pytest.mark.parametrize("layer,position", BIG)
def test_cross_tenant_encrypt_with_out_of_range_fields_is_refused_and_recorded(managed, layer, position):
    log, mgr, a, b = managed
    with pytest.raises(TenantIsolationError):
        mgr.encrypt("alice", _entry(b, layer, position))
    log.flush()
    (v,) = log.entries(operation="isolation-violation")
    assert v.tenant_id == "alice" and "clamped:" in v.details


@pytest.mark.parametrize("layer,position", BIG)
def test_failed_decrypt_with_out_of_range_fields_is_recorded(managed, layer, position):
    log, mgr, a, b = managed
    sealed = mgr.encrypt("alice", _entry(a, layer, position))
    sealed.ciphertext = bytes([sealed.ciphertext_bytes[0] ^ 1]) + sealed.ciphertext_bytes[1:]
    with pytest.raises(DecryptionError):
        mgr.decrypt("alice", sealed)
    log.flush()
    (d,) = log.entries(operation="decrypt")
    assert not d.success and "clamped:" in d.details and "authentication failed" in d.details
    (e,) = log.entries(operation="encrypt")
    assert e.success and "clamped:" in e.details


def test_own_entry_with_out_of_range_fields_opens_and_is_recorded(managed):
    log, mgr, a, b = managed
    sealed = mgr.encrypt("alice", _entry(a, 70_000, 2 ** 40))
    assert mgr.decrypt("alice", sealed).key_tensor_bytes == b"secret-K" * 4
    log.flush()
    (d,) = log.entries(operation="decrypt")
    assert d.success and d.layer_idx == 0xFFFE and "layer_idx=70000 recorded as 65534" in d.details


# ---- nothing that holds plaintext or keys prints it -------------------------------------------------

def _secret_forms(secret: bytes) -> list[str]:
    return [repr(secret)[2:-1], secret.hex(), secret.hex().upper(), str(list(secret))[1:-1]]


def test_key_slot_repr_omits_the_key(alice):
    key = alice.symmetric_key
    slot = KeySlot(key, tenant_tag("alice"), session_tag(alice.session_id), 0)
    for text in (repr(slot), str(slot)):
        for form in _secret_forms(key):
            assert form not in text
    assert "epoch=0" in repr(slot)


def test_session_key_pair_entries_and_errors_print_no_secret():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    key = s.symmetric_key
    plain = _entry(s)
    sealed = CacheEncryptor(s).encrypt_entry(plain)
    dec = CacheDecryptor(s)
    opened = dec.decrypt_entry(sealed)
    errors = []
    for bad in (lambda: dec.decrypt_entry(sealed),                         # replay
                lambda: CacheDecryptor(s).decrypt_entry(EncryptedEntry(
                    sealed.metadata, sealed.nonce, bytes([sealed.ciphertext_bytes[0] ^ 1]) + sealed.ciphertext_bytes[1:], sealed.key_len,
                    sealed.sequence_number)),                              # tag failure
                lambda: s.rotate_key(b"short")):
        with pytest.raises((KVCacheError, ValueError)) as info:
            bad()
        errors.append(info.value)
    seed = kp._sk.private_bytes_raw() if hasattr(kp._sk, "private_bytes_raw") else None
    texts = [repr(s), str(s), repr(kp), str(kp), repr(plain), repr(opened), str(s.to_public_dict())]
    texts += [repr(e) for e in errors] + [str(e) for e in errors]
    for text in texts:
        for form in _secret_forms(key) + _secret_forms(b"secret-K") + _secret_forms(b"secret-V"):
            assert form not in text, text
        if seed is not None:
            for form in _secret_forms(seed):
                assert form not in text
    s.close()


# ---- malformed serialized entries: one library error ------------------------------------------------

@pytest.mark.parametrize("field", ["tenant_id", "session_id"])
def test_lone_surrogate_in_ids_is_a_malformed_entry(alice, field):
    d = CacheEncryptor(alice).encrypt_entry(_entry(alice)).to_dict()
    d["metadata"][field] = "al\ud800ice"
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_dict(d)
    import json
    text = json.dumps(d)            # a \ud800 escape in JSON text
    with pytest.raises(MalformedEntryError):
        EncryptedEntry.from_json(text)


def test_lone_surrogate_in_metadata_is_a_value_error():
    with pytest.raises(ValueError, match="lone surrogates"):
        EntryMetadata("al\udfffice", "sid", 0, 0)


# ---- replay windows: only for epochs whose entries authenticated, and bounded --------------------

def test_forged_epochs_create_no_replay_windows(alice):
    sealed = CacheEncryptor(alice).encrypt_entry(_entry(alice))
    dec = CacheDecryptor(alice)
    m = sealed.metadata
    for epoch in range(1, 2001):
        forged = EncryptedEntry(m, make_nonce(epoch, 1), sealed.ciphertext, sealed.key_len, 1, epoch)
        with pytest.raises(DecryptionError):
            dec.decrypt_entry(forged)
    assert dec.window_count == 0
    dec.decrypt_entry(sealed)
    assert dec.window_count == 1
    with pytest.raises(NonceReplayError):
        dec.decrypt_entry(sealed)


def test_replay_windows_are_bounded_and_dropped_epochs_stay_refused(alice):
    enc = CacheEncryptor(alice)
    per_epoch = []
    for _ in range(6):
        per_epoch.append(enc.encrypt_entry(_entry(alice)))
        alice.rotate_key()
    dec = CacheDecryptor(alice, max_epochs=3)
    for e in per_epoch:
        dec.decrypt_entry(e)
        assert dec.window_count <= 3
    for e in per_epoch:                 # every replay is refused: inside a window or below them
        with pytest.raises(NonceReplayError):
            dec.decrypt_entry(e)


def test_windows_of_retired_epochs_are_dropped_first(alice):
    enc = CacheEncryptor(alice)
    first = enc.encrypt_entry(_entry(alice))
    alice.rotate_key()
    second = enc.encrypt_entry(_entry(alice))
    alice.rotate_key()
    third = enc.encrypt_entry(_entry(alice))
    dec = CacheDecryptor(alice, max_epochs=2)
    dec.decrypt_entry(first)
    dec.decrypt_entry(second)
    alice.retire_epoch(0)
    dec.decrypt_entry(third)            # epoch 0's window goes, epoch 1's stays
    with pytest.raises(NonceReplayError):
        dec.decrypt_entry(second)


@pytest.mark.parametrize("size", [2 ** 40, 2 ** 21, 63, -1])
def test_replay_window_size_is_bounded_at_construction(alice, size):
    with pytest.raises(ValueError, match="replay_window"):
        CacheDecryptor(alice, replay_window=size)
    with pytest.raises(ValueError, match="replay window size"):
        ReplayWindow(size)


@pytest.mark.parametrize("size", [True, "4096", 4096.0])
def test_replay_window_size_must_be_an_integer(alice, size):
    with pytest.raises(TypeError):
        CacheDecryptor(alice, replay_window=size)


def test_largest_replay_window_opens_entries(alice):
    sealed = CacheEncryptor(alice).encrypt_entry(_entry(alice))
    dec = CacheDecryptor(alice, replay_window=np.int64(2 ** 20))
    dec.decrypt_entry(sealed)
    with pytest.raises(NonceReplayError):
        dec.decrypt_entry(sealed)


# ---- argument checks: ValueError / TypeError naming the argument, never a stray exception ---------

@pytest.mark.parametrize("ttl,exc", [(10 ** 400, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                                     (True, TypeError), ("60", TypeError), (-1, ValueError),
                                     (MAX_TTL_SECONDS * 2, ValueError)],
                         ids=["10**400", "inf", "nan", "True", "str", "negative", "beyond-max"])
def test_bad_ttl_is_refused(ttl, exc):
    with pytest.raises(exc, match="ttl_seconds"):
        establish_tenant_session(TenantIdentity("alice"), ttl_seconds=ttl)


@pytest.mark.parametrize("cap,exc", [(-5, ValueError), (0, ValueError), ("7", TypeError), (True, TypeError),
                                     (7.0, TypeError), (2 ** 64, ValueError)])
def test_bad_max_entries_per_epoch_is_refused(alice, cap, exc):
    with pytest.raises(exc, match="max_entries_per_epoch"):
        establish_tenant_session(TenantIdentity("alice"), max_entries_per_epoch=cap)
    with pytest.raises(exc, match="max_entries_per_epoch"):
        alice.max_entries_per_epoch = cap


def test_numpy_integers_are_accepted_as_integers(alice):
    s = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=np.float32(60),
                                 max_entries_per_epoch=np.int64(3))
    assert s.max_entries_per_epoch == 3 and type(s.max_entries_per_epoch) is int
    assert s.reserve(np.uint8(2)) == (0, 1)
    m = EntryMetadata("alice", "sid", np.int64(0), np.uint32(7), position_count=np.int16(2))
    assert (m.layer_idx, m.position, m.position_count) == (0, 7, 2) and type(m.layer_idx) is int
    assert m == EntryMetadata("alice", "sid", 0, 7, position_count=2)
    p = KeyRotationPolicy(max_entries=np.int32(5), max_age_seconds=np.float64(30))
    assert p.max_entries == 5
    s.close()


@pytest.mark.parametrize("field", ["layer_idx", "position"])
def test_bools_are_not_integers(field):
    kwargs = {"layer_idx": 0, "position": 0}
    kwargs[field] = True
    with pytest.raises(TypeError, match=field):
        EntryMetadata("alice", "sid", **kwargs)
    kwargs[field] = np.True_
    with pytest.raises(TypeError, match=field):
        EntryMetadata("alice", "sid", **kwargs)


@pytest.mark.parametrize("kwargs,exc", [
    ({"max_age_seconds": math.nan}, ValueError), ({"max_age_seconds": -1}, ValueError),
    ({"max_age_seconds": True}, TypeError), ({"max_age_seconds": "300"}, TypeError),
    ({"max_entries": True}, TypeError), ({"max_entries": 5.0}, TypeError), ({"max_entries": 0}, ValueError),
    ({"hard_max_entries": -5}, ValueError), ({"clock": 5}, TypeError),
])
def test_bad_rotation_policy_is_refused(kwargs, exc):
    with pytest.raises(exc):
        KeyRotationPolicy(**kwargs)


def test_rotation_policy_with_infinite_age_rotates_by_count_only(alice, clock):
    p = KeyRotationPolicy(max_entries=2, max_age_seconds=math.inf, clock=clock)
    clock.advance(1e12)
    assert p.should_rotate(alice) == (False, None)
    alice.reserve(2)
    assert p.should_rotate(alice)[0]


def test_expires_at_beyond_the_calendar_is_refused(alice):
    import datetime as dt
    with pytest.raises(ValueError, match="expires_at"):
        alice.expires_at = dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    assert alice.is_valid()
    alice.expires_at  # still printable


def test_session_key_arguments_are_checked():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    with pytest.raises(ValueError, match="epoch"):
        kp.session_key(s.kem_ciphertext, s.session_id, epoch=2 ** 32)
    with pytest.raises(TypeError, match="epoch"):
        kp.session_key(s.kem_ciphertext, s.session_id, epoch=True)
    with pytest.raises(ValueError, match="session_id"):
        kp.session_key(s.kem_ciphertext, "sid\ud800")
    assert kp.session_key(s.kem_ciphertext, s.session_id, epoch=np.int64(0)) == s.key_for_epoch(0)
    s.close()


def test_retire_epoch_checks_its_argument(alice):
    alice.rotate_key()
    with pytest.raises(TypeError, match="epoch"):
        alice.retire_epoch("0")
    with pytest.raises(ValueError, match="epoch"):
        alice.retire_epoch(-1)
    alice.retire_epoch(np.int64(0))
    assert alice.live_epochs == [1]


@pytest.mark.parametrize("kwargs", [{"num_heads": -1}, {"head_dim": 2 ** 32}, {"dtype": "int4"},
                                    {"num_heads": True}])
def test_refused_encrypt_arguments_take_no_counter(alice, kwargs):
    enc = CacheEncryptor(alice)
    with pytest.raises((ValueError, TypeError)):
        enc.encrypt_entry(_entry(alice), **kwargs)
    assert (alice.next_sequence, alice.entries_encrypted) == (1, 0)
    assert enc.encrypt_entry(_entry(alice), num_heads=np.int64(2)).sequence_number == 1


@pytest.mark.parametrize("make", [
    lambda: establish_tenant_session(TenantIdentity("alice"), clock=5),
    lambda: TenantIsolationManager(clock="now"),
    lambda: TenantIsolationManager(policy=300),
    lambda: KeyRotationPolicy().should_rotate("alice"),
])
def test_wrong_kinds_of_arguments_are_type_errors(make):
    with pytest.raises(TypeError):
        make()


def test_nonce_and_aad_builders_take_integers_by_one_rule():
    from pqc_kv_cache.envelope import build_aad
    assert make_nonce(np.uint32(1), np.int64(2)) == make_nonce(1, 2)
    with pytest.raises(TypeError, match="epoch"):
        make_nonce(True, 1)
    with pytest.raises(ValueError, match="counter"):
        make_nonce(0, 2 ** 64)
    fields = dict(tenant_id="alice", session_id="sid", epoch=0, layer_idx=3, position=0, position_count=1, key_len=8)
    assert build_aad(**{**fields, "layer_idx": np.int64(3)}) == build_aad(**fields)
    with pytest.raises(TypeError, match="layer_idx"):
        build_aad(**{**fields, "layer_idx": True})
    with pytest.raises(ValueError, match="lone surrogates"):
        build_aad(**{**fields, "tenant_id": "a\ud800"})
