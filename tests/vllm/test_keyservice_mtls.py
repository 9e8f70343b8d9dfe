"""The key service across machines: TCP with mutual TLS, in a process of its own on loopback, and tenants'
sessions that survive its restart (no vLLM needed)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pqc_kv_cache.envelope import build_aad, make_nonce
from pqc_kv_cache.vllm import KeyClient, KeyServiceError, MutualTLS
from pqc_kv_cache.vllm.certs import issue, new_ca, write_pair

SERVER = Path(__file__).with_name("mtls_keyserver.py")
ROOT = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The pinned CA's server and worker certificates, and the certificates a bad client might show."""
    d = tmp_path_factory.mktemp("pki")
    ca = new_ca()
    ca_pem, _ = write_pair(d, "ca", ca)
    server = MutualTLS(ca_pem, *write_pair(d, "server", issue(ca, "127.0.0.1", hosts=("127.0.0.1",))))
    worker = MutualTLS(ca_pem, *write_pair(d, "worker", issue(ca, "worker", client=True)))
    other = new_ca("another CA")
    write_pair(d, "other-ca", other)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    bad = {
        "another CA": MutualTLS(ca_pem, *write_pair(d, "other", issue(other, "worker", client=True))),
        "self-signed": MutualTLS(ca_pem, *write_pair(d, "self", new_ca("worker"))),
        "expired": MutualTLS(ca_pem, *write_pair(d, "expired", issue(ca, "worker", client=True, days=1,
                                                                       not_before=long_ago))),
        "a server certificate": server,       # issued by the pinned CA, but for serverAuth only
    }
    return server, worker, bad


class KeyServer:
    """``mtls_keyserver.py`` in a child process."""

    def __init__(self, state: Path, tls: MutualTLS, *tenants: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(state), tls.ca, tls.cert, tls.key, *tenants],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"key server did not start: {self.proc.stderr.read()}")
        info = json.loads(line)
        self.address, self.restored, self.sessions = info["address"], info["restored"], info["sessions"]

    def stop(self) -> tuple[dict, str]:
        """Its counters and what it logged."""
        out, err = self.proc.communicate("stop\n", timeout=30)
        return json.loads(out), err

    def crash(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.crash()


@pytest.fixture()
def server(tmp_path, pki):
    s = KeyServer(tmp_path / "state", pki[0], TENANT)
    yield s
    s.close()


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    return host, int(port)


def _request(tenant: str, session_id: str) -> bytes:
    body = json.dumps({"op": "key", "tenant": tenant, "session": session_id, "epoch": 0}).encode()
    return struct.pack(">I", len(body)) + body


def _exchange(address: str, request: bytes, ctx: ssl.SSLContext | None) -> bytes:
    """What a client gets back for ``request`` (plaintext with ctx None); b"" when the peer hung up."""
    with socket.create_connection(_host_port(address), timeout=10) as raw:
        conn = raw if ctx is None else ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            conn.sendall(request)
            return conn.recv(65536)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def _seal(key: bytes, epoch: int, counter: int, session_id: str, data: bytes) -> tuple[bytes, bytes]:
    aad = build_aad(tenant_id=TENANT, session_id=session_id, epoch=epoch, layer_idx=0, position=0,
                    position_count=16, key_len=len(data) // 2)
    return aad, AESGCM(key).encrypt(make_nonce(epoch, counter), data, aad)


def test_a_worker_with_a_certificate_of_the_pinned_ca_fetches_keys(server, pki):
    client = KeyClient(server.address, tls=pki[1])
    sid = server.sessions[TENANT]
    r = client.reserve(TENANT, sid, 4)
    assert client.key(TENANT, sid, r.epoch) == r.key and len(r.key) == 32
    with pytest.raises(KeyServiceError, match="not the live session"):
        client.key(TENANT, "another-session", r.epoch)         # served over TLS, refused by the service
    counters, _ = server.stop()
    assert counters == {"refused": 0, "messages": 3}


@pytest.mark.parametrize("shown", ["another CA", "self-signed", "expired", "a server certificate"])
def test_a_worker_with_a_certificate_the_service_does_not_accept_is_refused_in_the_handshake(server, pki, shown):
    with pytest.raises(KeyServiceError, match="TLS|closed"):
        KeyClient(server.address, tls=pki[2][shown]).key(TENANT, server.sessions[TENANT], 0)
    counters, log = server.stop()
    assert counters == {"refused": 1, "messages": 0}            # nothing it sent was read
    assert "key service refused a connection: TLS handshake with 127.0.0.1" in log


def test_a_client_without_a_certificate_or_without_tls_or_on_tls_1_2_is_refused_before_any_message(server, pki):
    ca = pki[0].ca
    no_cert = ssl.create_default_context(cafile=ca)             # trusts the server, shows nothing
    old = ssl.create_default_context(cafile=ca)
    old.load_cert_chain(pki[1].cert, pki[1].key)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    req = _request(TENANT, server.sessions[TENANT])
    assert _exchange(server.address, req, no_cert) == b""
    assert _exchange(server.address, req, None) == b""           # plaintext: the key request itself
    with pytest.raises(ssl.SSLError):
        _exchange(server.address, req, old)
    counters, log = server.stop()
    assert counters == {"refused": 3, "messages": 0}
    assert log.count("key service refused a connection") == 3


def test_a_client_pinning_another_ca_does_not_trust_the_service(server, pki):
    other = pki[2]["another CA"]
    d = Path(other.cert).parent
    with pytest.raises(KeyServiceError, match="CERTIFICATE_VERIFY_FAILED"):
        KeyClient(server.address, tls=MutualTLS(str(d / "other-ca.pem"), other.cert, other.key)).key(
            TENANT, server.sessions[TENANT], 0)


def test_a_block_sealed_before_a_restart_opens_after_it_and_new_seals_use_a_new_epoch(tmp_path, pki):
    state = tmp_path / "state"
    blocks = []                               # (epoch, counter, key, aad, ciphertext) sealed by a worker
    seen, sids = set(), set()
    for restart in range(3):
        s = KeyServer(state, pki[0], TENANT)
        try:
            assert s.restored == ([TENANT] if restart else [])
            sid = s.sessions[TENANT]
            sids.add(sid)
            assert len(sids) == 1                               # the tenant's session, resumed
            client = KeyClient(s.address, tls=pki[1])
            for epoch, counter, key, aad, ct in blocks:        # every block sealed before any restart opens
                k = client.key(TENANT, sid, epoch)
                assert k == key
                assert AESGCM(k).decrypt(make_nonce(epoch, counter), ct, aad) == b"kv" * 64
            r = client.reserve(TENANT, sid, 8)
            assert (r.epoch, r.key) not in {(e, k) for e, _, k, _, _ in blocks}     # a new epoch, a new key
            for c in range(r.first, r.first + r.count):
                assert (r.key, r.epoch, c) not in seen          # no (key, nonce) pair used twice
                seen.add((r.key, r.epoch, c))
            blocks.append((r.epoch, r.first, r.key, *_seal(r.key, r.epoch, r.first, sid, b"kv" * 64)))
        finally:
            s.crash()                                          # no clean shutdown: what a crash leaves
    assert len({e for e, *_ in blocks}) == 3


def test_an_address_and_its_tls_files_must_go_together(pki, tmp_path):
    worker = pki[1]
    with pytest.raises(ValueError, match="mutual TLS"):
        KeyClient("tls://127.0.0.1:9", tls=None)
    with pytest.raises(ValueError, match="socket path"):
        KeyClient(str(tmp_path / "keys.sock"), tls=worker)
    with pytest.raises(ValueError, match="tls://HOST:PORT"):
        KeyClient("tls://127.0.0.1", tls=worker)
    cfg = {"key_service": "tls://127.0.0.1:9", "key_service_tls_ca": worker.ca, "key_service_tls_cert": worker.cert}
    with pytest.raises(ValueError, match="key_service_tls_key missing"):
        KeyClient.from_config(lambda k, d: cfg.get(k, d))
    cfg["key_service_tls_key"] = worker.key
    assert KeyClient.from_config(lambda k, d: cfg.get(k, d)).address == "tls://127.0.0.1:9"
