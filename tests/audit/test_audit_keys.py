"""A log's signing key can be kept in a file and used again to continue the log."""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pqc_kv_cache.audit import KVAuditLog, verify_log
from pqc_kv_cache.audit.keys import (
    KEY_DIR_ENV,
    default_key_path,
    generate_signing_key_file,
    load_signing_key_file,
)
from pqc_kv_cache.errors import AuditError, AuditIntegrityError


def _write(log_path, key, n=1):
    with KVAuditLog(path=log_path, signing_key=key, fsync=False) as log:
        for i in range(n):
            log.log_encrypt("alice", "s1", layer_idx=0, position=i)


def test_a_new_log_creates_its_missing_key_file_owner_only_and_a_second_run_continues_the_log(tmp_path):
    log_path, key = tmp_path / "logs" / "a.kvlog", tmp_path / "keys" / "a.key"
    log_path.parent.mkdir()
    _write(log_path, key, 2)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    first = key.read_bytes()
    _write(log_path, key, 3)
    assert key.read_bytes() == first
    rep = verify_log(log_path)
    assert rep.ok and rep.closed and rep.records == 5 and rep.reopens == 1


def test_the_key_file_holds_the_key_that_signed_the_log(tmp_path):
    log_path, key = tmp_path / "a.kvlog", tmp_path / "k" / "a.key"
    _write(log_path, key)
    pub = load_signing_key_file(key).public_key()
    assert verify_log(log_path, pub).ok


def test_an_existing_log_whose_key_file_is_missing_is_refused_and_no_key_is_made(tmp_path):
    log_path = tmp_path / "a.kvlog"
    _write(log_path, tmp_path / "k" / "a.key")
    size = log_path.stat().st_size
    other = tmp_path / "k" / "lost.key"
    with pytest.raises(AuditError, match="does not exist.*needs the key it was written with"):
        KVAuditLog(path=log_path, signing_key=other)
    assert not other.exists() and log_path.stat().st_size == size


def test_a_key_file_of_another_log_is_refused_as_the_wrong_key(tmp_path):
    _write(tmp_path / "a.kvlog", tmp_path / "a.key")
    _write(tmp_path / "b.kvlog", tmp_path / "b.key")
    with pytest.raises(AuditIntegrityError, match="wrong key"):
        KVAuditLog(path=tmp_path / "a.kvlog", signing_key=tmp_path / "b.key")


def test_reopening_without_a_key_says_how_to_keep_one(tmp_path):
    _write(tmp_path / "a.kvlog", None)
    with pytest.raises(AuditError, match="signing_key='<key file>'"):
        KVAuditLog(path=tmp_path / "a.kvlog")


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path, mode):
    key = tmp_path / "a.key"
    generate_signing_key_file(key)
    os.chmod(key, mode)
    with pytest.raises(AuditError, match="chmod 600"):
        load_signing_key_file(key)
    with pytest.raises(AuditError, match="chmod 600"):
        KVAuditLog(path=tmp_path / "a.kvlog", signing_key=key)
    assert not (tmp_path / "a.kvlog").exists()


def test_a_key_file_is_never_overwritten(tmp_path):
    key = tmp_path / "a.key"
    generate_signing_key_file(key)
    before = key.read_bytes()
    with pytest.raises(AuditError, match="never overwritten"):
        generate_signing_key_file(key)
    assert key.read_bytes() == before


def test_a_key_file_with_another_kind_of_key_or_garbage_is_refused(tmp_path):
    other = tmp_path / "ed.key"
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(AuditError, match="not ML-DSA-65"):
        load_signing_key_file(other)
    junk = tmp_path / "junk.key"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(AuditError, match="PKCS#8 PEM"):
        load_signing_key_file(junk)


def test_a_key_file_path_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _write(tmp_path / "a.kvlog", "~/keys/a.key")
    assert (tmp_path / "home" / "keys" / "a.key").is_file()


def test_a_key_file_without_a_log_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="signing_key without path"):
        KVAuditLog(signing_key=tmp_path / "a.key")
    assert not (tmp_path / "a.key").exists()


def test_signing_key_of_a_wrong_type_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match="path of a key file"):
        KVAuditLog(path=tmp_path / "a.kvlog", signing_key=12345)


def test_default_key_path_lies_outside_the_logs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "keydir"))
    a, b = default_key_path(tmp_path / "x" / "audit.kvlog"), default_key_path(tmp_path / "y" / "audit.kvlog")
    assert a.parent == b.parent == tmp_path / "keydir"
    assert a != b and a.name.startswith("audit.kvlog-")
    monkeypatch.delenv(KEY_DIR_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_key_path("audit.kvlog").parent == tmp_path / "cfg" / "pqc_kv_cache" / "keys"


def test_the_test_suite_keeps_keys_out_of_the_users_home():
    # tests/conftest.py points HOME and the XDG folders at a temporary folder for the whole run
    import pwd

    from pqc_kv_cache.audit.keys import default_key_dir
    real_home = pwd.getpwuid(os.getuid()).pw_dir
    assert not str(default_key_dir()).startswith(real_home + os.sep)
