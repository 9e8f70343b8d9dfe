"""The public API of the pure-Python "PQC KV Cache Encryption" 0.1.0 (same package name), name by name.

Each test calls the names the way code written for 0.1.0 calls them (same
module paths, positional order and keywords) and checks the result 0.1.0 gave.
The three example programs of that release are in ``compat_examples/`` and run
here in a fresh interpreter, unmodified.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent / "compat_examples"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@pytest.fixture
def session():
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    return establish_tenant_session(TenantIdentity("tenant-a", "Tenant A"))


def _entry(session, position=0, layer=0, k=b"K" * 64, v=b"V" * 64):
    from pqc_kv_cache.entry import EntryMetadata, KVCacheEntry
    return KVCacheEntry(EntryMetadata(session.tenant.tenant_id, session.session_id, layer, position), k, v)


def _expire(session):
    session.expires_at = (_now() - dt.timedelta(seconds=1)).isoformat()


# ---- modules -----------------------------------------------------------------------------------------

MODULE_NAMES = {
    "pqc_kv_cache.audit": ["KVAuditLog", "KVAuditEntry"],
    "pqc_kv_cache.encryptor": ["NONCE_SIZE", "CacheEncryptor", "CacheDecryptor"],
    "pqc_kv_cache.entry": ["EntryMetadata", "KVCacheEntry", "EncryptedEntry"],
    "pqc_kv_cache.errors": ["KVCacheError", "TenantIsolationError", "SessionExpiredError", "DecryptionError",
                            "NonceReplayError", "KeyRotationRequiredError", "UnknownTenantError"],
    "pqc_kv_cache.isolation": ["TenantIsolationManager"],
    "pqc_kv_cache.rotation": ["RotationTrigger", "KeyRotationPolicy"],
    "pqc_kv_cache.session": ["SESSION_TTL_SECONDS", "TenantIdentity", "TenantSession", "establish_tenant_session",
                             "KEMAlgorithm"],
}

TOP_LEVEL = ["KVCacheEntry", "EncryptedEntry", "EntryMetadata", "TenantSession", "TenantIdentity",
             "establish_tenant_session", "CacheEncryptor", "CacheDecryptor", "KeyRotationPolicy", "RotationTrigger",
             "TenantIsolationManager", "KVAuditLog", "KVAuditEntry", "KVCacheError", "TenantIsolationError",
             "SessionExpiredError", "DecryptionError", "NonceReplayError", "KeyRotationRequiredError",
             "UnknownTenantError", "__version__"]


@pytest.mark.parametrize("module", sorted(MODULE_NAMES))
def test_every_module_of_0_1_0_imports_with_its_names(module):
    mod = importlib.import_module(module)
    missing = [n for n in MODULE_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_package_top_level_offers_every_0_1_0_name():
    import pqc_kv_cache
    missing = [n for n in TOP_LEVEL if not hasattr(pqc_kv_cache, n)]
    assert not missing
    assert isinstance(pqc_kv_cache.__version__, str)


def test_entry_module_offers_the_same_objects_as_the_package():
    import pqc_kv_cache
    from pqc_kv_cache import entry
    assert entry.EntryMetadata is pqc_kv_cache.EntryMetadata
    assert entry.KVCacheEntry is pqc_kv_cache.KVCacheEntry
    assert entry.EncryptedEntry is pqc_kv_cache.EncryptedEntry


# ---- session -----------------------------------------------------------------------------------------

def test_default_session_ttl_is_900_seconds():
    from pqc_kv_cache.session import SESSION_TTL_SECONDS, TenantIdentity, establish_tenant_session
    assert SESSION_TTL_SECONDS == 900
    s = establish_tenant_session(TenantIdentity("tenant-a"))
    expires = dt.datetime.fromisoformat(s.expires_at) - dt.datetime.fromisoformat(s.created_at)
    assert abs(expires.total_seconds() - 900) < 1e-3


def test_tenant_identity_is_frozen_and_equal_by_value():
    from pqc_kv_cache.session import TenantIdentity
    a = TenantIdentity("tenant-a", "Tenant A")
    assert a == TenantIdentity("tenant-a", display_name="Tenant A")
    assert TenantIdentity("tenant-a").display_name == ""
    assert a != TenantIdentity("tenant-b", "Tenant A")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tenant_id = "tenant-b"


def test_establish_takes_algorithm_second_and_ttl_third():
    from pqc_kv_cache.session import KEMAlgorithm, TenantIdentity, establish_tenant_session
    t = TenantIdentity("tenant-a")
    for algorithm in ("ML-KEM-768", KEMAlgorithm.ML_KEM_768):
        s = establish_tenant_session(t, algorithm, 60)
        life = dt.datetime.fromisoformat(s.expires_at) - dt.datetime.fromisoformat(s.created_at)
        assert abs(life.total_seconds() - 60) < 1e-3 and s.algorithm == "ML-KEM-768"
    s = establish_tenant_session(t, algorithm=KEMAlgorithm.ML_KEM_768, ttl_seconds=30)
    assert s.is_valid()


def test_establish_accepts_any_enum_member_whose_value_is_ml_kem_768():
    import enum

    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session

    class Theirs(enum.Enum):
        ML_KEM_768 = "ML-KEM-768"
        KYBER_512 = "Kyber512"

    assert establish_tenant_session(TenantIdentity("tenant-a"), Theirs.ML_KEM_768).algorithm == "ML-KEM-768"
    with pytest.raises(ValueError, match="ML-KEM-768"):
        establish_tenant_session(TenantIdentity("tenant-a"), Theirs.KYBER_512)


@pytest.mark.parametrize("algorithm", ["ML-KEM-512", "X25519", "", 900, None])
def test_establish_refuses_any_other_algorithm_with_a_clear_error(algorithm):
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    with pytest.raises(ValueError, match="algorithm must be 'ML-KEM-768'"):
        establish_tenant_session(TenantIdentity("tenant-a"), algorithm)


def test_session_id_is_an_urn_with_32_hex_digits(session):
    prefix = "urn:pqc-kv-sess:"
    assert isinstance(session.session_id, str) and session.session_id.startswith(prefix)
    tail = session.session_id[len(prefix):]
    assert len(tail) == 32 and int(tail, 16) >= 0


def test_session_tenant_is_the_identity_it_was_made_for():
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    t = TenantIdentity("tenant-a", "Tenant A")
    s = establish_tenant_session(t)
    assert s.tenant == t and s.tenant.display_name == "Tenant A"


def test_symmetric_key_is_32_bytes_and_algorithm_is_ml_kem_768(session):
    assert isinstance(session.symmetric_key, bytes) and len(session.symmetric_key) == 32
    assert session.algorithm == "ML-KEM-768"


def test_created_and_expires_at_are_iso_8601_utc_strings(session):
    for value in (session.created_at, session.expires_at):
        assert isinstance(value, str)
        parsed = dt.datetime.fromisoformat(value)
        assert parsed.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.fromisoformat(session.created_at) - _now()).total_seconds()) < 60


def test_expires_at_set_in_the_past_as_iso_string_invalidates_at_once(session):
    from pqc_kv_cache.errors import SessionExpiredError
    assert session.is_valid()
    past = (_now() - dt.timedelta(seconds=1)).isoformat()
    session.expires_at = past
    assert session.expires_at == past
    assert not session.is_valid()
    with pytest.raises(SessionExpiredError):
        session.check_valid()


def test_expires_at_accepts_a_datetime_and_can_move_forward_again(session):
    session.expires_at = _now() - dt.timedelta(seconds=1)
    assert not session.is_valid()
    later = _now() + dt.timedelta(hours=1)
    session.expires_at = later
    assert session.is_valid()
    assert dt.datetime.fromisoformat(session.expires_at) == later


def test_expires_at_refuses_what_is_not_a_time(session):
    with pytest.raises(ValueError):
        session.expires_at = "tomorrow"
    with pytest.raises(TypeError):
        session.expires_at = 12.5
    assert session.is_valid()


def test_counters_start_at_one_and_zero(session):
    assert session.next_sequence == 1
    assert session.entries_encrypted == 0


def test_check_valid_raises_session_expired_once_expired(session):
    from pqc_kv_cache.errors import SessionExpiredError
    assert session.is_valid() is True
    session.check_valid()
    _expire(session)
    assert session.is_valid() is False
    with pytest.raises(SessionExpiredError):
        session.check_valid()


def test_consume_sequence_returns_current_then_increments_both_counters(session):
    assert session.consume_sequence() == 1
    assert (session.next_sequence, session.entries_encrypted) == (2, 1)
    assert session.consume_sequence() == 2
    assert (session.next_sequence, session.entries_encrypted) == (3, 2)


def test_rotate_key_replaces_key_and_resets_counters(session):
    for _ in range(3):
        session.consume_sequence()
    new_key = os.urandom(32)
    session.rotate_key(new_key)
    assert session.symmetric_key == new_key
    assert session.next_sequence == 1 and session.entries_encrypted == 0


def test_public_dict_has_the_0_1_0_keys_and_never_a_key(session):
    session.rotate_key(os.urandom(32))
    d = session.to_public_dict()
    for key in ("session_id", "tenant_id", "tenant_display", "algorithm", "created_at", "expires_at",
                "entries_encrypted", "is_valid"):
        assert key in d
    assert (d["tenant_id"], d["tenant_display"], d["algorithm"]) == ("tenant-a", "Tenant A", "ML-KEM-768")
    assert d["is_valid"] is True and d["created_at"] == session.created_at and d["expires_at"] == session.expires_at
    text = json.dumps(d)
    for epoch in session.live_epochs:
        assert session.key_for_epoch(epoch).hex() not in text


# ---- entry -------------------------------------------------------------------------------------------

def test_entry_metadata_positional_order_defaults_and_frozen():
    from pqc_kv_cache.entry import EntryMetadata
    m = EntryMetadata("tenant-a", "sess-1", 3, 17)
    assert (m.tenant_id, m.session_id, m.layer_idx, m.position, m.token_id, m.kv_role) == \
        ("tenant-a", "sess-1", 3, 17, -1, "both")
    assert m == EntryMetadata("tenant-a", "sess-1", 3, 17, -1, "both")
    assert m != EntryMetadata("tenant-a", "sess-1", 3, 18)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.position = 0


def test_entry_metadata_to_dict_has_exactly_the_six_fields():
    from pqc_kv_cache.entry import EntryMetadata
    assert EntryMetadata("tenant-a", "sess-1", 3, 17, 42, "key").to_dict() == {
        "tenant_id": "tenant-a", "session_id": "sess-1", "layer_idx": 3, "position": 17,
        "token_id": 42, "kv_role": "key"}


def test_kv_cache_entry_plaintext_size_is_a_method():
    from pqc_kv_cache.entry import EntryMetadata, KVCacheEntry
    e = KVCacheEntry(EntryMetadata("tenant-a", "sess-1", 0, 0), b"k" * 10, b"v" * 7)
    assert e.plaintext_size() == 17


def test_kv_cache_entry_repr_never_shows_plaintext():
    from pqc_kv_cache.entry import EntryMetadata, KVCacheEntry
    k, v = b"SECRET-KEY-BYTES" * 4, b"\x01\x02\xfe" * 9
    text = repr(KVCacheEntry(EntryMetadata("tenant-a", "sess-1", 0, 0), k, v))
    for needle in (repr(k), repr(v), "SECRET", k.hex(), v.hex(), "\\x01\\x02"):
        assert needle not in text
    assert "KVCacheEntry" in text and "64 bytes" in text


def test_encrypted_entry_from_hex_strings_round_trips_through_dict():
    from pqc_kv_cache.entry import EncryptedEntry, EntryMetadata
    meta = EntryMetadata("tenant-a", "sess-1", 2, 5)
    e = EncryptedEntry(meta, nonce="aa" * 12, ciphertext="bb" * 64, key_len=32, sequence_number=9)
    assert e.nonce == "aa" * 12 and e.ciphertext == "bb" * 64
    back = EncryptedEntry.from_dict(e.to_dict())
    assert back == e
    assert (back.metadata, back.nonce, back.ciphertext, back.key_len, back.sequence_number) == \
        (meta, "aa" * 12, "bb" * 64, 32, 9)
    assert back.nonce_bytes == b"\xaa" * 12 and back.ciphertext_bytes == b"\xbb" * 64


def test_an_encrypted_entrys_nonce_and_ciphertext_are_hex_strings_as_earlier_users_read_them():
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.entry import EncryptedEntry, EntryMetadata, KVCacheEntry
    from pqc_kv_cache.errors import DecryptionError, MalformedEntryError
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    # 0.1.0 users do bytes.fromhex(enc.nonce) and build a tampered copy with ciphertext=flipped.hex()
    s = establish_tenant_session(TenantIdentity("alice"))
    meta = EntryMetadata("alice", s.session_id, 0, 0)
    enc = CacheEncryptor(s).encrypt_entry(KVCacheEntry(meta, b"K" * 32, b"V" * 32))
    assert isinstance(enc.nonce, str) and isinstance(enc.ciphertext, str)
    assert len(bytes.fromhex(enc.nonce)) == 12 and len(bytes.fromhex(enc.ciphertext)) == 64 + 16
    flipped = bytearray(bytes.fromhex(enc.ciphertext))
    flipped[0] ^= 1
    forged = EncryptedEntry(enc.metadata, enc.nonce, flipped.hex(), enc.key_len, enc.sequence_number)
    with pytest.raises(DecryptionError):
        CacheDecryptor(s).decrypt_entry(forged)
    # bytes given or assigned are stored as hex too
    forged.ciphertext = bytes(flipped)
    assert forged.ciphertext == flipped.hex()
    with pytest.raises(MalformedEntryError, match="not valid hex"):
        forged.nonce = "not hex"
    assert CacheDecryptor(s).decrypt_entry(enc).key_tensor_bytes == b"K" * 32


def test_encrypted_entry_accepts_bytes_and_its_dict_has_the_0_1_0_keys():
    from pqc_kv_cache.entry import EncryptedEntry, EntryMetadata
    meta = EntryMetadata("tenant-a", "sess-1", 2, 5)
    e = EncryptedEntry(meta, b"\x01" * 12, b"\x02" * 40, 8, 3)
    d = e.to_dict()
    assert d["metadata"] == meta.to_dict()
    assert (d["nonce"], d["ciphertext"], d["key_len"], d["sequence_number"]) == ("01" * 12, "02" * 40, 8, 3)
    assert EncryptedEntry.from_dict(json.loads(json.dumps(d))) == e


def test_encrypted_entry_with_bad_hex_is_a_clear_error():
    from pqc_kv_cache.entry import EncryptedEntry, EntryMetadata
    from pqc_kv_cache.errors import KVCacheError
    with pytest.raises(KVCacheError, match="nonce"):
        EncryptedEntry(EntryMetadata("tenant-a", "sess-1", 0, 0), "zz" * 12, "bb" * 64, 32, 1)


# ---- encryptor ---------------------------------------------------------------------------------------

def test_nonce_size_is_12():
    from pqc_kv_cache.encryptor import NONCE_SIZE
    assert NONCE_SIZE == 12


def test_encrypt_entry_numbers_entries_1_2_3(session):
    from pqc_kv_cache.encryptor import CacheEncryptor
    from pqc_kv_cache.entry import EncryptedEntry
    enc = CacheEncryptor(session)
    out = [enc.encrypt_entry(_entry(session, p)) for p in range(3)]
    assert all(isinstance(e, EncryptedEntry) for e in out)
    assert [e.sequence_number for e in out] == [1, 2, 3]
    assert len({e.nonce for e in out}) == 3 and all(len(bytes.fromhex(e.nonce)) == 12 for e in out)
    assert session.entries_encrypted == 3 and session.next_sequence == 4


def test_encrypt_entry_refuses_an_expired_session(session):
    from pqc_kv_cache.encryptor import CacheEncryptor
    from pqc_kv_cache.errors import SessionExpiredError
    entry = _entry(session)
    _expire(session)
    with pytest.raises(SessionExpiredError):
        CacheEncryptor(session).encrypt_entry(entry)


def test_encrypt_entry_refuses_another_tenants_entry(session):
    from pqc_kv_cache.encryptor import CacheEncryptor
    from pqc_kv_cache.entry import EntryMetadata, KVCacheEntry
    from pqc_kv_cache.errors import TenantIsolationError
    foreign = KVCacheEntry(EntryMetadata("tenant-b", session.session_id, 0, 0), b"k", b"v")
    with pytest.raises(TenantIsolationError):
        CacheEncryptor(session).encrypt_entry(foreign)
    assert session.entries_encrypted == 0


def test_decrypt_entry_gives_back_the_entry(session):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.entry import KVCacheEntry
    original = _entry(session, 4, 2, k=b"key bytes", v=b"value bytes")
    back = CacheDecryptor(session).decrypt_entry(CacheEncryptor(session).encrypt_entry(original))
    assert isinstance(back, KVCacheEntry) and back == original


def test_decrypt_entry_refuses_an_expired_session(session):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.errors import SessionExpiredError
    enc = CacheEncryptor(session).encrypt_entry(_entry(session))
    dec = CacheDecryptor(session)
    _expire(session)
    with pytest.raises(SessionExpiredError):
        dec.decrypt_entry(enc)


def test_decrypt_entry_refuses_another_tenants_entry(session):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.errors import TenantIsolationError
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    other = establish_tenant_session(TenantIdentity("tenant-b"))
    enc = CacheEncryptor(other).encrypt_entry(_entry(other))
    with pytest.raises(TenantIsolationError):
        CacheDecryptor(session).decrypt_entry(enc)


def test_decrypt_entry_twice_by_one_decryptor_is_a_replay(session):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.errors import NonceReplayError
    enc = CacheEncryptor(session).encrypt_entry(_entry(session))
    dec = CacheDecryptor(session)
    dec.decrypt_entry(enc)
    with pytest.raises(NonceReplayError):
        dec.decrypt_entry(enc)


def _flip_ciphertext(e):
    e.ciphertext = bytes([e.ciphertext_bytes[0] ^ 0x01]) + e.ciphertext_bytes[1:]


CHANGES = {
    "ciphertext byte": _flip_ciphertext,
    "tag byte": lambda e: setattr(e, "ciphertext", e.ciphertext_bytes[:-1] + bytes([e.ciphertext_bytes[-1] ^ 0x80])),
    "layer": lambda e: setattr(e, "metadata", dataclasses.replace(e.metadata, layer_idx=e.metadata.layer_idx + 1)),
    "position": lambda e: setattr(e, "metadata", dataclasses.replace(e.metadata, position=e.metadata.position + 1)),
    "token id": lambda e: setattr(e, "metadata", dataclasses.replace(e.metadata, token_id=7)),
    "kv role": lambda e: setattr(e, "metadata", dataclasses.replace(e.metadata, kv_role="key")),
    "sequence number": lambda e: setattr(e, "sequence_number", e.sequence_number + 1),
    "key_len": lambda e: setattr(e, "key_len", e.key_len - 1),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_decrypt_entry_fails_when_any_bound_field_changed(session, what):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.errors import DecryptionError
    enc = CacheEncryptor(session).encrypt_entry(_entry(session, 3, 1))
    CHANGES[what](enc)
    with pytest.raises(DecryptionError):
        CacheDecryptor(session).decrypt_entry(enc)


# ---- rotation ----------------------------------------------------------------------------------------

def test_rotation_trigger_is_a_str_enum_with_the_0_1_0_values():
    from pqc_kv_cache.rotation import RotationTrigger
    assert issubclass(RotationTrigger, str)
    assert RotationTrigger.ENTRY_COUNT.value == "entry-count"
    assert RotationTrigger.TIME_ELAPSED.value == "time-elapsed"
    assert RotationTrigger.MANUAL.value == "manual"
    assert RotationTrigger.MANUAL == "manual"


def test_rotation_policy_defaults():
    from pqc_kv_cache.rotation import KeyRotationPolicy
    p = KeyRotationPolicy()
    assert (p.max_entries, p.max_age_seconds) == (100_000, 300)
    p = KeyRotationPolicy(5, 60)
    assert (p.max_entries, p.max_age_seconds) == (5, 60)


def test_should_rotate_on_entry_count(session):
    from pqc_kv_cache.rotation import KeyRotationPolicy, RotationTrigger
    p = KeyRotationPolicy(max_entries=3, max_age_seconds=3600)
    for _ in range(2):
        session.consume_sequence()
    assert p.should_rotate(session) == (False, None)
    session.consume_sequence()
    assert p.should_rotate(session) == (True, RotationTrigger.ENTRY_COUNT)


def test_should_rotate_once_the_key_is_max_age_old(session):
    from pqc_kv_cache.rotation import KeyRotationPolicy, RotationTrigger
    p = KeyRotationPolicy(max_entries=100, max_age_seconds=0.05)
    time.sleep(0.06)            # a lower bound on the key's age, nothing is timed
    assert p.should_rotate(session) == (True, RotationTrigger.TIME_ELAPSED)
    assert KeyRotationPolicy(max_entries=100, max_age_seconds=3600).should_rotate(session) == (False, None)


def test_policy_rotate_returns_the_new_key_and_resets_counters(session):
    from pqc_kv_cache.rotation import KeyRotationPolicy
    old = session.symmetric_key
    for _ in range(5):
        session.consume_sequence()
    new_key = KeyRotationPolicy(max_entries=5).rotate(session)
    assert isinstance(new_key, bytes) and len(new_key) == 32 and new_key != old
    assert session.symmetric_key == new_key
    assert session.next_sequence == 1 and session.entries_encrypted == 0


def test_entries_sealed_across_rotation_never_share_a_nonce_and_all_open(session):
    from pqc_kv_cache.encryptor import CacheDecryptor, CacheEncryptor
    from pqc_kv_cache.rotation import KeyRotationPolicy
    p = KeyRotationPolicy(max_entries=2)
    enc, dec = CacheEncryptor(session), CacheDecryptor(session)
    sealed = []
    for pos in range(7):
        if p.should_rotate(session)[0]:
            p.rotate(session)
        sealed.append(enc.encrypt_entry(_entry(session, pos)))
    assert [e.sequence_number for e in sealed] == [1, 2, 1, 2, 1, 2, 1]
    assert len({(e.epoch, e.nonce) for e in sealed}) == len({e.nonce for e in sealed}) == 7
    for e in sealed:
        assert dec.decrypt_entry(e).metadata == e.metadata


# ---- isolation ---------------------------------------------------------------------------------------

def test_isolation_manager_needs_no_arguments():
    from pqc_kv_cache.isolation import TenantIsolationManager
    mgr = TenantIsolationManager()
    assert mgr.list_active_tenants() == []


def test_manager_sessions_maps_tenant_to_its_live_session():
    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantIdentity
    mgr = TenantIsolationManager()
    s = mgr.create_session(TenantIdentity("tenant-a"))
    assert mgr.sessions["tenant-a"] is s
    assert list(mgr.sessions) == ["tenant-a"] and len(mgr.sessions) == 1
    with pytest.raises(TypeError):
        mgr.sessions["tenant-b"] = s          # a read-only view


def test_create_session_returns_the_existing_session_while_valid_else_a_new_one():
    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantIdentity
    mgr = TenantIsolationManager()
    t = TenantIdentity("tenant-a")
    s = mgr.create_session(t)
    assert mgr.create_session(t) is s
    _expire(s)
    fresh = mgr.create_session(t)
    assert fresh is not s and fresh.is_valid() and mgr.sessions["tenant-a"] is fresh


def test_get_session_of_an_unknown_tenant_raises():
    from pqc_kv_cache.errors import UnknownTenantError
    from pqc_kv_cache.isolation import TenantIsolationManager
    with pytest.raises(UnknownTenantError):
        TenantIsolationManager().get_session("nobody")


def test_manager_encrypt_and_decrypt_refuse_across_tenants():
    from pqc_kv_cache.errors import TenantIsolationError
    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantIdentity
    mgr = TenantIsolationManager()
    a = mgr.create_session(TenantIdentity("tenant-a"))
    mgr.create_session(TenantIdentity("tenant-b"))
    enc = mgr.encrypt("tenant-a", _entry(a))
    with pytest.raises(TenantIsolationError):
        mgr.decrypt("tenant-b", enc)
    with pytest.raises(TenantIsolationError):
        mgr.encrypt("tenant-b", _entry(a))
    assert mgr.decrypt("tenant-a", enc).key_tensor_bytes == b"K" * 64


def test_close_session_of_an_unknown_tenant_is_no_error():
    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantIdentity
    mgr = TenantIsolationManager()
    mgr.close_session("nobody")
    s = mgr.create_session(TenantIdentity("tenant-a"))
    mgr.close_session("tenant-a")
    assert not s.is_valid() and mgr.list_active_tenants() == []
    mgr.close_session("tenant-a")


def test_list_active_tenants_excludes_sessions_expired_through_expires_at():
    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantIdentity
    mgr = TenantIsolationManager()
    a = mgr.create_session(TenantIdentity("tenant-a"))
    mgr.create_session(TenantIdentity("tenant-b"))
    assert sorted(mgr.list_active_tenants()) == ["tenant-a", "tenant-b"]
    _expire(a)
    assert mgr.list_active_tenants() == ["tenant-b"]


# ---- audit -------------------------------------------------------------------------------------------

@pytest.fixture
def audit():
    from pqc_kv_cache.audit import KVAuditLog
    log = KVAuditLog(max_entries=1000)
    yield log
    log.close()


def test_audit_entry_fields_defaults_and_to_dict():
    from pqc_kv_cache.audit import KVAuditEntry
    names = [f.name for f in dataclasses.fields(KVAuditEntry)][:9]
    assert names == ["timestamp", "operation", "tenant_id", "session_id", "layer_idx", "position",
                     "sequence_number", "success", "details"]
    ts = _now().isoformat()
    e = KVAuditEntry(ts, "encrypt", "tenant-a", "sess-1")
    assert (e.layer_idx, e.position, e.sequence_number, e.success, e.details) == (-1, -1, -1, True, "")
    d = e.to_dict()
    assert {k: d[k] for k in names} == {"timestamp": ts, "operation": "encrypt", "tenant_id": "tenant-a",
                                        "session_id": "sess-1", "layer_idx": -1, "position": -1,
                                        "sequence_number": -1, "success": True, "details": ""}


def test_audit_log_takes_max_entries_by_keyword_or_first_positional():
    from pqc_kv_cache.audit import KVAuditLog
    for log in (KVAuditLog(max_entries=3), KVAuditLog(3)):
        with log:
            for i in range(5):
                log.log_encrypt("tenant-a", "sess-1", 0, i, i + 1)
            assert len(log) == 3
            assert [e.position for e in log.entries()] == [4, 3, 2]


def test_log_appends_an_audit_entry(audit):
    from pqc_kv_cache.audit import KVAuditEntry
    audit.log(KVAuditEntry(_now().isoformat(), "decrypt", "tenant-a", "sess-1", 2, 9, 4, False, "bad tag"))
    audit.log(KVAuditEntry(_now().isoformat(), "rotate", "tenant-a", "sess-1"))
    assert len(audit) == 2
    rot, dec = audit.entries()
    assert (dec.operation, dec.tenant_id, dec.session_id, dec.layer_idx, dec.position, dec.sequence_number,
            dec.success, dec.details) == ("decrypt", "tenant-a", "sess-1", 2, 9, 4, False, "bad tag")
    assert (rot.operation, rot.layer_idx, rot.position, rot.success, rot.details) == ("rotate", -1, -1, True, "")
    with pytest.raises(TypeError):
        audit.log({"operation": "encrypt"})


def test_log_encrypt_stores_seq_as_sequence_number(audit):
    audit.log_encrypt("tenant-a", "sess-1", 3, 7, seq=41)
    audit.log_encrypt("tenant-a", "sess-1", 3, 8, 42)
    e2, e1 = audit.entries()
    assert (e1.operation, e1.tenant_id, e1.session_id, e1.layer_idx, e1.position, e1.sequence_number,
            e1.success) == ("encrypt", "tenant-a", "sess-1", 3, 7, 41, True)
    assert e2.sequence_number == 42


def test_log_decrypt_positional_and_keyword_forms(audit):
    audit.log_decrypt("tenant-a", "sess-1", 1, 2, 3, True)
    audit.log_decrypt("tenant-a", "sess-1", 1, 2, seq=4, success=False, details="tag mismatch")
    bad, ok = audit.entries()
    assert (ok.operation, ok.sequence_number, ok.success, ok.details) == ("decrypt", 3, True, "")
    assert (bad.sequence_number, bad.success, bad.details) == (4, False, "tag mismatch")


def test_log_rotate_writes_the_trigger_in_details(audit):
    from pqc_kv_cache.rotation import RotationTrigger
    audit.log_rotate("tenant-a", "sess-1", trigger="manual")
    audit.log_rotate("tenant-a", "sess-1", RotationTrigger.ENTRY_COUNT.value)
    audit.log_rotate("tenant-a", "sess-1", RotationTrigger.TIME_ELAPSED)
    assert [(e.operation, e.details) for e in reversed(audit.entries())] == [
        ("rotate", "trigger=manual"), ("rotate", "trigger=entry-count"), ("rotate", "trigger=time-elapsed")]


def test_log_isolation_violation_records_attacker_and_target(audit):
    audit.log_isolation_violation(attacker_tenant="tenant-b", target_tenant="tenant-a", details="cross read")
    audit.log_isolation_violation("tenant-c", "tenant-a")
    second, first = audit.entries()
    assert (first.operation, first.tenant_id, first.session_id, first.success, first.details) == \
        ("isolation-violation", "tenant-b", "", False, "target=tenant-a; cross read")
    assert (second.tenant_id, second.session_id, second.details) == ("tenant-c", "", "target=tenant-a; ")


def test_the_four_calls_record_their_0_1_0_operation_names(audit):
    audit.log_encrypt("t", "s", 0, 0, 1)
    audit.log_decrypt("t", "s", 0, 0, 1, True)
    audit.log_rotate("t", "s", "manual")
    audit.log_isolation_violation("t", "u")
    assert [e.operation for e in reversed(audit.entries())] == ["encrypt", "decrypt", "rotate", "isolation-violation"]


def test_entries_are_newest_first_with_limit_and_filters(audit):
    for i in range(5):
        audit.log_encrypt("tenant-a" if i % 2 == 0 else "tenant-b", "sess-1", 0, i, i + 1)
    audit.log_isolation_violation("tenant-b", "tenant-a")
    assert [e.position for e in audit.entries(limit=3)] == [-1, 4, 3]
    assert [e.position for e in audit.entries(tenant_id="tenant-a")] == [4, 2, 0]
    assert [e.position for e in audit.entries(100, "tenant-b", "encrypt")] == [3, 1]
    assert [e.tenant_id for e in audit.entries(operation="isolation-violation")] == ["tenant-b"]
    assert len(audit.entries()) == 6


def test_export_json_is_a_list_of_entry_dicts_oldest_first(audit):
    audit.log_encrypt("tenant-a", "sess-1", 0, 0, 1)
    audit.log_rotate("tenant-a", "sess-1", "manual")
    data = json.loads(audit.export_json())
    assert isinstance(data, list) and [d["operation"] for d in data] == ["encrypt", "rotate"]
    assert data[1]["details"] == "trigger=manual" and data[0]["sequence_number"] == 1
    dt.datetime.fromisoformat(data[0]["timestamp"])


def test_len_counts_the_records_held(audit):
    assert len(audit) == 0
    audit.log_encrypt("tenant-a", "sess-1", 0, 0, 1)
    audit.log_decrypt("tenant-a", "sess-1", 0, 0, 1, True)
    assert len(audit) == 2


# ---- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["TenantIsolationError", "SessionExpiredError", "DecryptionError",
                                  "NonceReplayError", "KeyRotationRequiredError", "UnknownTenantError"])
def test_every_error_is_a_kv_cache_error(name):
    from pqc_kv_cache import errors
    cls = getattr(errors, name)
    assert issubclass(cls, errors.KVCacheError) and issubclass(errors.KVCacheError, Exception)
    with pytest.raises(errors.KVCacheError):
        raise cls("x")


# ---- the three example programs of 0.1.0 -------------------------------------------------------------

def _run_example(name: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def test_basic_usage_example_runs(tmp_path):
    out = _run_example("basic_usage.py", tmp_path)
    assert "Session: urn:pqc-kv-sess:" in out and "Algorithm: ML-KEM-768" in out
    assert "Encrypted and decrypted 3 entries" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [(op, seq) for _, op, seq in lines] == [("decrypt", "seq=3"), ("decrypt", "seq=2"), ("decrypt", "seq=1"),
                                                   ("encrypt", "seq=3"), ("encrypt", "seq=2"), ("encrypt", "seq=1")]


def test_key_rotation_example_runs(tmp_path):
    out = _run_example("key_rotation.py", tmp_path)
    rotated = [line for line in out.splitlines() if line.startswith("Rotated key")]
    assert len(rotated) == 2
    assert all("(entry-count)" in line and "entries_encrypted=0, next_sequence=1" in line for line in rotated)
    assert "Rotations: 2" in out and out.count("rotate trigger=entry-count") == 2


def test_tenant_isolation_example_runs(tmp_path):
    out = _run_example("tenant_isolation.py", tmp_path)
    assert "Blocked:" in out and "ERROR" not in out
    assert "Each tenant opened its own entry" in out
    assert "VIOLATION tenant-bob: target=tenant-alice; attempted cross-tenant decrypt" in out
