"""One writer per audit log: a second KVAuditLog on the same path is refused; readers need no lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa

from pqc_kv_cache.audit import KVAuditLog, verify_log
from pqc_kv_cache.errors import AuditError

KEY = mldsa.MLDSA65PrivateKey.generate()


def test_a_second_writer_in_the_same_process_is_refused_and_the_log_stays_verifiable(tmp_path):
    p = tmp_path / "a.kvlog"
    first = KVAuditLog(path=p, signing_key=KEY, fsync=False)
    first.log_encrypt("alice", "s1", 0, 0, seq=1)
    first.flush()
    with pytest.raises(AuditError, match=r"already open for writing by another KVAuditLog of this process") as ei:
        KVAuditLog(path=p, signing_key=KEY, fsync=False)
    assert str(p) in str(ei.value)
    # a reader needs no lock, while the writer holds it
    assert verify_log(p, KEY.public_key()).records == 1
    first.log_encrypt("alice", "s1", 0, 1, seq=2)
    first.close()
    rep = verify_log(p, KEY.public_key())
    assert rep.ok and rep.closed and rep.records == 2
    # once closed, the next writer continues the log
    with KVAuditLog(path=p, signing_key=KEY, fsync=False) as again:
        again.log_encrypt("alice", "s1", 0, 2, seq=3)
    assert verify_log(p, KEY.public_key()).records == 3


def test_a_writer_in_another_process_is_refused_naming_the_holder(tmp_path):
    p = tmp_path / "a.kvlog"
    key_file = tmp_path / "keys" / "audit.key"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pqc_kv_cache.audit import KVAuditLog
        lg = KVAuditLog(path={str(p)!r}, signing_key={str(key_file)!r}, fsync=False)
        lg.log_encrypt("alice", "s1", 0, 0, seq=1)
        lg.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        lg.close()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(AuditError, match=rf"already open for writing by process {holder.pid}"):
            KVAuditLog(path=p, signing_key=key_file, fsync=False)
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    rep = verify_log(p)
    assert rep.ok and rep.closed and rep.records == 1


def test_a_refused_new_log_leaves_no_file_behind(tmp_path):
    p = tmp_path / "new.kvlog"
    with pytest.raises(ValueError, match="32 bytes"):
        KVAuditLog(path=p, signing_key=b"not a 32-byte seed")
    assert not p.exists()


@pytest.mark.parametrize("bad", [123, 1.5, b"a.kvlog", ["a.kvlog"], True])
def test_a_path_that_is_not_a_file_path_is_a_type_error(bad, tmp_path):
    with pytest.raises(TypeError, match="path must be"):
        KVAuditLog(path=bad)


def test_the_earlier_positional_max_entries_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with KVAuditLog(1000) as lg:
        assert lg.stats()["emitted"] == 0
    with pytest.raises(TypeError, match="twice"):
        KVAuditLog("a.kvlog", path="b.kvlog")
    assert os.listdir(tmp_path) == []


def test_a_directory_as_path_says_so_instead_of_blaming_the_key(tmp_path):
    with pytest.raises(AuditError, match=r"is a directory: path= names the log file itself.*audit\.kvlog"):
        KVAuditLog(path=tmp_path)
    assert os.listdir(tmp_path) == []
