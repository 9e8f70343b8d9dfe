"""The certificate helper and the TLS files' rules; the key service's TCP listener in this process."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509

from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import KeyClient, KeyService, KeyServiceError, MutualTLS, TLSConfigError, kv_transfer_config
from pqc_kv_cache.vllm.certs import main, make_certificates


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_make_certificates_writes_private_keys_0600_and_never_overwrites(tmp_path):
    d = tmp_path / "pki"
    server, clients = make_certificates(d, ["127.0.0.1", "keys.example.internal"], ["w1", "w2"])
    assert _mode(d) == 0o700
    for files in (server, *clients.values()):
        assert _mode(files.key) == 0o600 and files.ca == str(d / "ca.pem")
    assert _mode(d / "ca.key") == 0o600
    cert = x509.load_pem_x509_certificate(open(server.cert, "rb").read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["keys.example.internal"]
    before = open(d / "ca.pem", "rb").read()
    with pytest.raises(TLSConfigError, match="never overwritten"):
        make_certificates(d, ["127.0.0.1"], ["w3"])
    assert open(d / "ca.pem", "rb").read() == before


def test_the_command_line_makes_the_files_and_refuses_bad_names(tmp_path, capsys):
    main([str(tmp_path / "pki"), "--hosts", "127.0.0.1", "--clients", "worker-1"])
    out = capsys.readouterr().out
    assert "--tls-ca" in out and "key_service_tls_key=" in out
    assert os.path.exists(tmp_path / "pki" / "worker-1.key")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pki2"), "--hosts", "not a host!"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pki3"), "--hosts", "127.0.0.1", "--clients", "../escape"])
    assert not os.path.exists(tmp_path / "pki3" / "ca.key")           # refused before anything is written


def test_a_private_key_group_or_others_may_read_is_refused(tmp_path):
    server, _ = make_certificates(tmp_path / "pki", ["127.0.0.1"])
    os.chmod(server.key, 0o640)
    with pytest.raises(TLSConfigError, match="group or others"):
        server.server_context()
    with pytest.raises(TLSConfigError, match="group or others"):
        KeyService(TenantIsolationManager(), str(tmp_path / "keys"), tcp=("127.0.0.1", 0), tls=server)
    os.chmod(server.key, 0o600)
    with pytest.raises(TLSConfigError, match="CA certificate"):
        MutualTLS(str(tmp_path / "missing.pem"), server.cert, server.key).server_context()


def test_tcp_only_with_tls_and_the_engine_token_still_applies_on_tcp(tmp_path):
    server, clients = make_certificates(tmp_path / "pki", ["127.0.0.1"])
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    with pytest.raises(ValueError, match="only with mutual TLS"):
        KeyService(manager, str(tmp_path / "keys"), tcp=("127.0.0.1", 0))
    token = os.urandom(32)
    with KeyService(manager, str(tmp_path / "keys"), tcp=("127.0.0.1", 0), tls=server, token=token) as service:
        assert service.address.startswith("tls://127.0.0.1:")
        with pytest.raises(KeyServiceError, match="engine token"):
            KeyClient(service.address, tls=clients["worker"]).key("tenant-a", sa.session_id, 0)
        assert KeyClient(service.address, tls=clients["worker"], token=token).key(
            "tenant-a", sa.session_id, 0) == sa.key_for_epoch(0)
        assert KeyClient(service.path, token=token).key("tenant-a", sa.session_id, 0) == sa.key_for_epoch(0)
        assert service.refused == 0


def test_kv_transfer_config_names_the_workers_tls_files(tmp_path):
    _, clients = make_certificates(tmp_path / "pki", ["127.0.0.1"])
    w = clients["worker"]
    extra = kv_transfer_config("/store", "tls://keys:7443", "/audit.log", "/server.key",
                               key_service_tls=w)["kv_connector_extra_config"]
    assert (extra["key_service_tls_ca"], extra["key_service_tls_cert"], extra["key_service_tls_key"]) == \
        (w.ca, w.cert, w.key)
    assert KeyClient.from_config(lambda k, d: extra.get(k, d)).address == "tls://keys:7443"
