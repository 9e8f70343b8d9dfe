import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pqc_kv_cache import (
    KeyRotationRequiredError,
    SessionClosedError,
    SessionExpiredError,
    TenantIdentity,
    TenantKeyPair,
    TenantSession,
    establish_tenant_session,
)
from pqc_kv_cache.errors import DecryptionError, KVCacheError
from pqc_kv_cache.session import KEM_CIPHERTEXT_SIZE


def test_tenant_derives_the_same_key_as_the_server():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity(display_name="Alice"))
    assert len(s.kem_ciphertext) == KEM_CIPHERTEXT_SIZE
    assert kp.session_key(s.kem_ciphertext, s.session_id) == s.symmetric_key
    assert len(s.symmetric_key) == 32


def test_tenant_derives_every_ratchet_epoch():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    for _ in range(3):
        s.rotate_key()
    for e in range(4):
        assert kp.session_key(s.kem_ciphertext, s.session_id, e) == s.key_for_epoch(e)
    assert len({s.key_for_epoch(e) for e in range(4)}) == 4


def test_other_tenants_keypair_derives_a_different_key():
    alice = TenantKeyPair.generate("alice")
    mallory = TenantKeyPair.generate("alice")
    s = establish_tenant_session(alice.identity())
    # ML-KEM implicit rejection: a wrong private key yields an unrelated secret, not an error
    assert mallory.session_key(s.kem_ciphertext, s.session_id) != s.symmetric_key


def test_key_binds_tenant_and_session_id():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    assert kp.session_key(s.kem_ciphertext, s.session_id, tenant_id="bob") != s.symmetric_key
    assert kp.session_key(s.kem_ciphertext, "0" * 32) != s.symmetric_key


def test_sessions_of_one_tenant_have_independent_keys():
    t = TenantIdentity("alice")
    a, b = establish_tenant_session(t), establish_tenant_session(t)
    assert a.session_id != b.session_id and a.symmetric_key != b.symmetric_key


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there", "new\nline"])
def test_tenant_id_must_be_printable_text_up_to_128(bad):
    with pytest.raises(ValueError):
        TenantIdentity(bad)


def test_tenant_id_type_checked():
    with pytest.raises(TypeError):
        TenantIdentity(123)


def test_bad_public_key_is_a_clear_value_error():
    with pytest.raises(ValueError, match="1184"):
        TenantIdentity("alice", public_key=b"\x00" * 10)


def test_bad_kem_ciphertext_is_a_value_error():
    kp = TenantKeyPair.generate("alice")
    with pytest.raises(ValueError):
        kp.session_key(b"\x00" * 5, "sid")


def test_default_ttl_is_900_seconds_and_expiry_uses_injected_clock(clock):
    s = establish_tenant_session(TenantIdentity("alice"), clock=clock)
    assert s.ttl_seconds == 900
    assert s.is_valid()
    clock.advance(899.9)
    s.check_valid()
    clock.advance(0.2)
    assert not s.is_valid()
    with pytest.raises(SessionExpiredError):
        s.check_valid()
    with pytest.raises(SessionExpiredError):
        s.consume_sequence()


def test_sequence_starts_at_one_and_counts_entries():
    s = establish_tenant_session(TenantIdentity("alice"))
    assert s.next_sequence == 1
    assert s.consume_sequence() == 1
    assert s.consume_sequence() == 2
    assert s.reserve(10) == (0, 3)
    assert s.next_sequence == 13 and s.entries_encrypted == 12


def test_counters_restart_per_epoch_and_the_nonce_holds_the_epoch():
    from pqc_kv_cache.envelope import make_nonce
    s = establish_tenant_session(TenantIdentity("alice"))
    s.reserve(5)
    s.rotate_key()
    assert (s.next_sequence, s.entries_encrypted, s.total_entries_encrypted) == (1, 0, 5)
    assert s.reserve(1) == (1, 1)
    assert make_nonce(1, 1) != make_nonce(0, 1)


def test_hard_cap_refuses_before_allocating():
    s = establish_tenant_session(TenantIdentity("alice"), max_entries_per_epoch=10)
    s.reserve(10)
    with pytest.raises(KeyRotationRequiredError):
        s.reserve(1)
    assert s.next_sequence == 11
    s.rotate_key()
    assert s.reserve(10) == (1, 1)


def test_rotate_with_given_key_and_retire_erases_old_epoch():
    s = establish_tenant_session(TenantIdentity("alice"))
    k0 = s.symmetric_key
    assert s.rotate_key(b"\x11" * 32) == 1
    assert s.symmetric_key == b"\x11" * 32
    assert s.key_for_epoch(0) == k0
    old = s._keychain.key(0)
    s.retire_epoch(0)
    assert old == bytearray(32)  # overwritten in place
    with pytest.raises(DecryptionError, match="retired"):
        s.key_for_epoch(0)
    with pytest.raises(ValueError):
        s.retire_epoch(1)
    with pytest.raises(ValueError):
        s.rotate_key(b"short")


def test_close_overwrites_keys_and_every_later_use_raises():
    s = establish_tenant_session(TenantIdentity("alice"))
    s.rotate_key()
    buffers = [s._keychain.key(e) for e in s.live_epochs] + [s._keychain.chain]
    hooked = []
    s.on_close(hooked.append)
    s.close()
    assert all(b == bytearray(len(b)) for b in buffers)
    assert hooked == [s]
    assert not s.is_valid()
    for use in (lambda: s.symmetric_key, s.consume_sequence, s.rotate_key, s.check_valid,
                lambda: s.key_for_epoch(0), lambda: s.cipher(1)):
        with pytest.raises(SessionClosedError):
            use()
    s.close()  # idempotent


def test_public_dict_never_contains_a_key():
    s = establish_tenant_session(TenantIdentity("alice"))
    s.rotate_key()
    d = s.to_public_dict()
    text = repr(d)
    for e in s.live_epochs:
        assert s.key_for_epoch(e).hex() not in text
    assert "symmetric_key" not in d and d["tenant_id"] == "alice" and d["epoch"] == 1


def test_counters_are_unique_under_threads():
    s = establish_tenant_session(TenantIdentity("alice"))
    got = []
    lock = threading.Lock()

    def work():
        mine = [s.consume_sequence() for _ in range(2000)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 16001))


def test_session_key_opens_what_the_session_sealed():
    kp = TenantKeyPair.generate("alice")
    s = establish_tenant_session(kp.identity())
    ct = s.cipher(0).encrypt(b"\x00" * 12, b"hello", b"")
    assert AESGCM(kp.session_key(s.kem_ciphertext, s.session_id)).decrypt(b"\x00" * 12, ct, b"") == b"hello"


def test_no_mlkem_is_a_clear_error(monkeypatch):
    import pqc_kv_cache.session as session_mod
    from pqc_kv_cache.errors import PQCUnavailableError

    def missing():
        raise PQCUnavailableError("ML-KEM-768 is not available")

    monkeypatch.setattr(session_mod, "mlkem", missing)
    with pytest.raises(PQCUnavailableError):
        establish_tenant_session(TenantIdentity("alice"))
    assert issubclass(PQCUnavailableError, KVCacheError)


def test_mlkem_import_failure_maps_to_pqc_unavailable(monkeypatch):
    import builtins
    import pqc_kv_cache.keyschedule as keyschedule_mod
    from pqc_kv_cache.errors import PQCUnavailableError
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.endswith("asymmetric") and args and args[2] and "mlkem" in args[2]:
            raise ImportError("no mlkem")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(PQCUnavailableError, match="ML-KEM-768"):
        keyschedule_mod.mlkem()


def test_session_constructor_validates():
    with pytest.raises(ValueError):
        TenantSession("alice", "sid", b"\x00" * 32, b"", ttl_seconds=0)
    with pytest.raises(ValueError):
        TenantSession("alice", "", b"\x00" * 32, b"")


def test_cached_cipher_is_refused_after_expiry(clock):
    s = establish_tenant_session(TenantIdentity("alice"), clock=clock)
    s.cipher(0)
    clock.advance(901)
    with pytest.raises(SessionExpiredError):
        s.cipher(0)


@pytest.mark.parametrize("n", [1.5, 0.5, True, "2"])
def test_reserve_refuses_non_int_counts(n):
    s = establish_tenant_session(TenantIdentity("alice"))
    with pytest.raises(TypeError):
        s.reserve(n)
    assert s.next_sequence == 1
