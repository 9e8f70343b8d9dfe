"""The key service that hands tenant session keys to vLLM's worker-side connector (no vLLM needed)."""

import os
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pqc_kv_cache.errors import KVCacheError
from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
import socket
import struct

from pqc_kv_cache.vllm import (ActiveSessions, KeyClient, KeyService, KeyServiceError, SecretFileError,
                               generate_engine_token_file, load_engine_token)


@pytest.fixture()
def served(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    with KeyService(manager, str(tmp_path / "keys")) as service:
        yield manager, sa, service


def test_reserve_answers_the_live_session_key_and_advances_its_counters(served):
    manager, sa, service = served
    client = KeyClient(service.path)
    before = sa.next_sequence
    r1 = client.reserve("tenant-a", sa.session_id, 10)
    r2 = client.reserve("tenant-a", sa.session_id, 5)
    assert r1.key == sa.symmetric_key and r1.epoch == sa.epoch
    assert r1.first == before and r2.first == before + 10       # the worker's nonces never repeat the server's
    assert sa.next_sequence == before + 15
    assert client.key("tenant-a", sa.session_id, sa.epoch) == sa.symmetric_key


def test_unknown_tenant_or_foreign_session_is_refused(served):
    manager, sa, service = served
    sb = manager.create_session(TenantKeyPair.generate("tenant-b").identity())
    client = KeyClient(service.path)
    with pytest.raises(KeyServiceError, match="UnknownTenantError"):
        client.reserve("tenant-x", sa.session_id, 1)
    with pytest.raises(KeyServiceError, match="not the live session"):
        client.key("tenant-a", sb.session_id, 0)                # B's session id under A's name
    with pytest.raises(KeyServiceError, match="no key for epoch"):
        client.key("tenant-a", sa.session_id, 7)
    with pytest.raises(KeyServiceError, match="count"):
        client.reserve("tenant-a", sa.session_id, 0)
    assert issubclass(KeyServiceError, KVCacheError)


def test_a_peer_of_another_uid_is_refused(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    # SO_PEERCRED reports this process's uid; a service that allows only another uid must refuse it
    with KeyService(manager, str(tmp_path / "keys"), allowed_uids=frozenset({os.getuid() + 1})) as service:
        with pytest.raises(KeyServiceError, match=f"peer uid {os.getuid()} is not allowed"):
            KeyClient(service.path).key("tenant-a", sa.session_id, 0)
        assert service.refused == 1


def test_socket_directory_is_private_and_an_open_one_is_refused(tmp_path):
    manager = TenantIsolationManager()
    with KeyService(manager, str(tmp_path / "keys")) as service:
        assert stat.S_IMODE(os.stat(service.directory).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(KeyServiceError, match="mode 0700"):
        KeyService(manager, str(loose))


def test_no_service_is_a_key_service_error(tmp_path):
    with pytest.raises(KeyServiceError, match="key service at"):
        KeyClient(str(tmp_path / "nothing.sock")).key("t", "s", 0)


def test_a_served_key_opens_what_the_session_sealed(served):
    manager, sa, service = served
    r = KeyClient(service.path).reserve("tenant-a", sa.session_id, 1)
    nonce = bytes(12)
    assert AESGCM(sa.symmetric_key).decrypt(nonce, AESGCM(r.key).encrypt(nonce, b"kv", b"aad"), b"aad") == b"kv"


def _raw(path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(path)
        c.sendall(struct.pack(">I", len(payload)) + payload)
        n = struct.unpack(">I", c.recv(4))[0]
        buf = b""
        while len(buf) < n:
            buf += c.recv(n - len(buf))
    import json
    return json.loads(buf)


@pytest.mark.parametrize("payload", [b"[" * 60000 + b"]" * 4000, b'{"op": "key", "epoch": ' + b"9" * 5000 + b"}",
                                     b"\xff\xfe", b"[1, 2]",
                                     b'{"op": "key", "tenant": "tenant-a", "session": "s", "epoch": 99999999999}'])
def test_a_malformed_request_gets_an_error_reply_and_the_service_lives_on(served, payload):
    manager, sa, service = served
    rep = _raw(service.path, payload)
    assert rep["ok"] is False and rep["error"]
    assert KeyClient(service.path).key("tenant-a", sa.session_id, sa.epoch) == sa.symmetric_key


def test_idle_connections_do_not_stall_the_others(served):
    manager, sa, service = served
    idle = []
    for _ in range(5):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(service.path)
        idle.append(c)
    try:
        # a client stalled behind the idle ones would time out (3 s) before their 5 s timeouts end
        assert KeyClient(service.path, timeout=3).key("tenant-a", sa.session_id, sa.epoch) == sa.symmetric_key
    finally:
        for c in idle:
            c.close()


def test_a_service_with_an_engine_token_answers_only_requests_carrying_it(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    token = generate_engine_token_file(str(tmp_path / "tok" / "engine.token"))
    assert stat.S_IMODE(os.stat(tmp_path / "tok" / "engine.token").st_mode) == 0o600
    assert load_engine_token(str(tmp_path / "tok" / "engine.token")) == token
    with KeyService(manager, str(tmp_path / "keys"), token=token) as service:
        for client in (KeyClient(service.path), KeyClient(service.path, token=bytes(32))):
            with pytest.raises(KeyServiceError, match="engine token"):
                client.reserve("tenant-a", sa.session_id, 1)
            with pytest.raises(KeyServiceError, match="engine token"):
                client.key("tenant-a", sa.session_id, sa.epoch)
        assert _raw(service.path, b'{"op": "key", "tenant": "tenant-a", "session": "s", "epoch": 0, '
                                  b'"token": 7}')["ok"] is False
        assert KeyClient(service.path, token=token).key("tenant-a", sa.session_id, sa.epoch) == sa.symmetric_key
    assert "<hidden>" in repr(KeyClient("x", token=token)) and token.hex() not in repr(KeyClient("x", token=token))


def test_a_loose_or_malformed_engine_token_file_is_refused(tmp_path):
    path = tmp_path / "engine.token"
    generate_engine_token_file(str(path))
    with pytest.raises(SecretFileError, match="exists already"):
        generate_engine_token_file(str(path))
    os.chmod(path, 0o640)
    with pytest.raises(SecretFileError, match="engine token file .* accessible by group or others"):
        load_engine_token(str(path))
    os.chmod(path, 0o600)
    path.write_text("abc\n")
    with pytest.raises(SecretFileError, match="engine token file"):
        load_engine_token(str(path))


def test_keys_are_served_only_for_sessions_with_a_request_in_flight(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    active = ActiveSessions()
    with KeyService(manager, str(tmp_path / "keys"), active=active) as service:
        client = KeyClient(service.path)
        with pytest.raises(KeyServiceError, match="no request in flight"):
            client.key("tenant-a", sa.session_id, sa.epoch)
        active.acquire("tenant-a", sa.session_id)
        active.acquire("tenant-a", sa.session_id)                # two requests of the session in flight
        assert client.reserve("tenant-a", sa.session_id, 1).key == sa.symmetric_key
        active.release("tenant-a", sa.session_id)
        assert client.key("tenant-a", sa.session_id, sa.epoch) == sa.symmetric_key
        active.release("tenant-a", sa.session_id)
        with pytest.raises(KeyServiceError, match="no request in flight"):
            client.reserve("tenant-a", sa.session_id, 1)
        active.acquire("tenant-b", sa.session_id)                # another tenant's request does not count
        with pytest.raises(KeyServiceError, match="no request in flight"):
            client.key("tenant-a", sa.session_id, sa.epoch)
