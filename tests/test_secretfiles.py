"""The one set of rules for files that hold a secret (signing keys, key-encryption keys, server secrets)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from pqc_kv_cache.errors import KVCacheError
from pqc_kv_cache.secretfiles import create_secret_file, read_secret_file


class Refused(KVCacheError):
    pass


def test_a_created_secret_is_owner_only_in_an_owner_only_folder_and_reads_back(tmp_path):
    p = create_secret_file(tmp_path / "new" / "dir" / "s.key", b"secret", "test key", Refused)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
    assert read_secret_file(p, 64, "test key", Refused) == bytearray(b"secret")


def test_an_existing_file_or_a_planted_link_is_never_overwritten(tmp_path):
    p = create_secret_file(tmp_path / "s.key", b"one", "test key", Refused)
    with pytest.raises(Refused, match="exists already; it is never overwritten"):
        create_secret_file(p, b"two", "test key", Refused)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "link.key").symlink_to(victim)
    with pytest.raises(Refused, match="exists already"):
        create_secret_file(tmp_path / "link.key", b"two", "test key", Refused)
    assert victim.read_bytes() == b"keep me" and p.read_bytes() == b"one"


def test_reading_refuses_links_fifos_folders_shared_and_oversized_files(tmp_path):
    real = create_secret_file(tmp_path / "real.key", b"x" * 10, "test key", Refused)
    (tmp_path / "link.key").symlink_to(real)
    with pytest.raises(Refused, match="cannot read test key"):
        read_secret_file(tmp_path / "link.key", 64, "test key", Refused)
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    done = threading.Event()

    def read_fifo():
        with pytest.raises(Refused, match="not a regular file"):
            read_secret_file(tmp_path / "fifo.key", 64, "test key", Refused)
        done.set()
    t = threading.Thread(target=read_fifo, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "reading a FIFO blocked"
    with pytest.raises(Refused, match="not a regular file"):
        read_secret_file(tmp_path, 64, "test key", Refused)
    os.chmod(real, 0o640)
    with pytest.raises(Refused, match="accessible by group or others"):
        read_secret_file(real, 64, "test key", Refused)
    os.chmod(real, 0o600)
    with pytest.raises(Refused, match="larger than"):
        read_secret_file(real, 9, "test key", Refused)
    with pytest.raises(Refused, match="does not exist"):
        read_secret_file(tmp_path / "missing.key", 9, "test key", Refused)
