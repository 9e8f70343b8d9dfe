"""The key service's connection slots under idle or slow peers: the socket and TCP have pools of their own, a
TLS handshake has one deadline, one peer address holds a bounded number of TCP connections, and every
connection turned away is counted and logged (no vLLM needed)."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import keyservice
from pqc_kv_cache.vllm.certs import make_certificates
from pqc_kv_cache.vllm.keyservice import KeyClient, KeyService, KeyServiceError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], ["w1"])


@pytest.fixture()
def service(tmp_path, pki):
    manager = TenantIsolationManager()
    session = manager.create_session(TenantKeyPair.generate("alice").identity())
    with KeyService(manager, str(tmp_path / "ks"), tcp=("127.0.0.1", 0), tls=pki[0]) as ks:
        yield ks, session.session_id


def _host_port(ks):
    host, port = ks.address[len("tls://"):].rsplit(":", 1)
    return host, int(port)


def _idle(ks, n, source="127.0.0.1"):
    """``n`` TCP connections that send nothing, each accepted by the service."""
    out = []
    for _ in range(n):
        out.append(socket.create_connection(_host_port(ks), timeout=10, source_address=(source, 0)))
    time.sleep(0.5)
    return out


def _closed_by_peer(sock, within):
    """Whether the service closed ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_idle_tcp_peers_filling_their_pool_leave_the_socket_served(service, pki, monkeypatch, caplog):
    ks, sid = service
    monkeypatch.setattr(keyservice, "MAX_CONNECTIONS_PER_PEER", 10**6, raising=False)
    monkeypatch.setattr(keyservice, "TURNED_AWAY_LOG_INTERVAL", 0.0, raising=False)
    idle = _idle(ks, keyservice.MAX_CONNECTIONS)                # no certificate, nothing sent
    try:
        with caplog.at_level(logging.WARNING, logger="pqc_kv_cache.vllm.keyservice"):
            assert KeyClient(ks.path).reserve("alice", sid, 1).count == 1     # the socket's own slots
            with pytest.raises(KeyServiceError):
                KeyClient(ks.address, tls=pki[1]["w1"]).reserve("alice", sid, 1)   # TCP's pool is full
        assert ks.turned_away == 1
        assert "turned away 1 connection(s)" in caplog.text and "TCP connections are busy" in caplog.text
    finally:
        for s in idle:
            s.close()


def test_one_peer_address_holds_a_bounded_number_of_tcp_connections(service, pki, monkeypatch, caplog):
    ks, sid = service
    monkeypatch.setattr(keyservice, "MAX_CONNECTIONS_PER_PEER", 3, raising=False)
    idle = _idle(ks, 3)
    try:
        with caplog.at_level(logging.WARNING, logger="pqc_kv_cache.vllm.keyservice"):
            extra = socket.create_connection(_host_port(ks), timeout=10)
            assert _closed_by_peer(extra, 5)                         # turned away at once
            extra.close()
        assert ks.turned_away == 1 and "127.0.0.1 already has 3 connections" in caplog.text
        try:                                                         # another address is let in meanwhile
            others = _idle(ks, 3, source="127.0.0.2")
        except OSError:
            pytest.skip("no 127.0.0.2 on this host")
        for s in others:
            s.close()
        assert ks.turned_away == 1
    finally:
        for s in idle:
            s.close()
    # the address is served again once the service has seen its idle connections close (each handler
    # notices the EOF on its own thread: a client connecting right away may still find the slots taken)
    deadline = time.monotonic() + 10
    while True:
        try:
            got = KeyClient(ks.address, tls=pki[1]["w1"]).reserve("alice", sid, 1)
            break
        except KeyServiceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert got.count == 1


def test_a_peer_trickling_its_handshake_is_cut_off_at_the_handshake_deadline(service, monkeypatch):
    """The handshake has a deadline of its own (HANDSHAKE_TIMEOUT), whatever the pace of the peer's bytes and
    whatever the per-read timeout of an authenticated connection."""
    ks, _ = service
    monkeypatch.setattr(keyservice, "HANDSHAKE_TIMEOUT", 1.0, raising=False)
    assert keyservice.CONNECTION_TIMEOUT >= 5.0
    slow = socket.create_connection(_host_port(ks), timeout=10)
    hello = bytes([22, 3, 1, 0x02, 0x00]) + bytes(512)             # a TLS record header, then its body slowly
    start = time.monotonic()
    try:
        for b in hello:                                            # a byte every 0.2 s
            slow.sendall(bytes([b]))
            if _closed_by_peer(slow, 0.2):
                break
            if time.monotonic() - start > 12:
                break
    except OSError:
        pass
    closed_after = time.monotonic() - start
    slow.close()
    # cut at the 1 s deadline (a loaded host may add a little), well before the 5 s per-read timeout
    assert closed_after < 3.5 and ks.refused == 1
