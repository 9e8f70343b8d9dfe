"""``audit verify`` on hostile input: work linear in the log, every read of a side file bounded.

The crafted logs below are built as anyone could build them (the chain is unkeyed): a crashed writer's
log with frames appended. A quadratic walk would take minutes to hours on them, a linear one about a
second; the command runs in a child process with a generous time limit (only a quadratic walk reaches
it) and an address-space limit (an unbounded read of a device fails there, not in this process).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pqc_kv_cache.audit import KVAuditLog, verify_log
from pqc_kv_cache.audit.fileformat import (DETL_ENTRY, FRAME_HEAD, MAX_PUBLIC_KEY_FILE, MAX_SEAL_SIZE, RCVR_BODY,
                                           RECS_HEAD, TABL_ENTRY, load_public_key, pub_path, record_locators,
                                           seal_path)
from pqc_kv_cache.audit.keys import MAX_SIGNING_KEY_FILE, load_signing_key_file
from pqc_kv_cache.audit.records import RECORD_DTYPE, Op
from pqc_kv_cache.errors import AuditError

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/zero") or os.name != "posix",
                                reason="needs POSIX resource limits and /dev/zero")

#: Far above what verifying these logs takes linearly (about a second), far below what a quadratic walk takes.
GENEROUS_S = 90


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _audit_cli(command, *args):
    return subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", command, *map(str, args)],
                          capture_output=True, text=True, timeout=GENEROUS_S, preexec_fn=_limit_memory)


def _verify_cli(*args):
    return _audit_cli("verify", *args)


def _crashed_log(tmp_path):
    """A log as a writer that crashed leaves it (header, table, one record frame, no close), with its .pub."""
    src, dst = tmp_path / "writer.kvlog", tmp_path / "crafted.kvlog"
    log = KVAuditLog(path=src, fsync=False)
    log.log_encrypt("alice", "s1", layer_idx=0, position=0)
    log.flush()
    shutil.copyfile(src, dst)
    shutil.copyfile(pub_path(src), pub_path(dst))
    log.close()
    rep = verify_log(dst)
    assert rep.ok and rep.crash_tail and rep.records == 1
    return dst, rep


class _Appender:
    """Appends frames to a log, continuing its hash chain."""

    def __init__(self, path, rep):
        self.f = open(path, "ab")
        self.head = rep.head
        self.next_no = rep.records

    def frame(self, ftype: bytes, payload: bytes) -> None:
        head = FRAME_HEAD.pack(ftype, len(payload))
        h = hashlib.sha256(self.head)
        h.update(head)
        h.update(payload)
        self.head = h.digest()
        self.f.write(head + payload + self.head)

    def records(self, n: int, tenant_idx) -> None:
        recs = np.zeros(n, dtype=RECORD_DTYPE)
        recs["record_no"] = self.next_no + np.arange(n, dtype=np.uint64)
        recs["op"], recs["tenant_idx"], recs["host_ts_ns"] = int(Op.ENCRYPT), tenant_idx, 1
        self.frame(b"RECS", RECS_HEAD.pack(self.next_no, n, 0) + recs.tobytes() + record_locators(recs).tobytes())
        self.next_no += n

    def close(self) -> None:
        self.f.close()


def test_verify_is_linear_in_a_frame_naming_many_unnamed_tenant_indices(tmp_path):
    path, rep = _crashed_log(tmp_path)
    n = 300_000       # 21.6 MB; every record names its own tenant index, none of them named by a table frame
    out = _Appender(path, rep)
    out.records(n, tenant_idx=np.arange(10, 10 + n, dtype=np.uint32))
    out.close()
    run = _verify_cli(path)
    assert run.returncode == 3, run.stdout + run.stderr       # intact so far, not closed
    assert f"UNCLOSED {path}: {n + 1} records" in run.stdout


def test_verify_is_linear_in_details_followed_by_many_recovery_frames(tmp_path):
    path, rep = _crashed_log(tmp_path)
    d, r, orphans = 200_000, 50_000, 5
    out = _Appender(path, rep)
    first = out.next_no
    out.frame(b"DETL", b"".join(DETL_ENTRY.pack(first + i, 1) + b"x" for i in range(d + orphans)))
    out.records(d, tenant_idx=0)       # the last ``orphans`` details have no record: a crash came first
    for _ in range(r):
        out.frame(b"RCVR", RCVR_BODY.pack(0, 0, 0))
    out.close()
    run = _verify_cli(path)
    assert run.returncode == 3, run.stdout + run.stderr
    rep = verify_log(path)
    assert rep.ok and rep.recovered_crashes == r and rep.records == 1 + d
    assert sorted(rep.details) == list(range(first, first + d)), "the orphans' details are dropped, no others"


def test_show_of_one_tenant_is_linear_in_many_tenant_names_and_many_frames(tmp_path):
    path, rep = _crashed_log(tmp_path)
    names, frames = 500_000, 20_000
    out = _Appender(path, rep)
    first = len(rep.tenants)
    out.frame(b"TABL", b"".join(TABL_ENTRY.pack(1, first + i, 0, len(f"t{i}")) + f"t{i}".encode()
                                for i in range(names)))
    for i in range(frames):
        out.records(1, tenant_idx=first + (i % 3))     # tenants t0, t1, t2 in turn
    out.close()
    run = _audit_cli("show", path, "--tenant", "t1", "--json")
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == len(range(1, frames, 3))


@pytest.fixture
def closed_log(tmp_path):
    path = tmp_path / "closed.kvlog"
    with KVAuditLog(path=path, fsync=False) as log:
        log.log_encrypt("alice", "s1", layer_idx=0, position=0)
    assert _verify_cli(path).returncode == 0
    return path


def _no_traceback(run) -> bool:
    return "Traceback" not in run.stderr and "MemoryError" not in run.stderr


def test_a_public_key_argument_that_never_ends_is_refused_as_unreadable(closed_log):
    run = _verify_cli(closed_log, "--public-key", "/dev/zero")
    assert run.returncode == 2 and _no_traceback(run), run.stderr
    assert f"more than {MAX_PUBLIC_KEY_FILE} bytes" in run.stderr


def test_a_pub_file_that_never_ends_is_refused_as_unreadable(closed_log):
    os.unlink(pub_path(closed_log))
    os.symlink("/dev/zero", pub_path(closed_log))
    run = _verify_cli(closed_log)
    assert run.returncode == 2 and _no_traceback(run), run.stderr
    with pytest.raises(AuditError, match="public key"):
        load_public_key(pub_path(closed_log))


@pytest.mark.parametrize("seal", ["device", "huge file"])
def test_a_seal_that_is_no_seal_is_an_integrity_failure_read_within_bounds(closed_log, seal):
    sp = seal_path(closed_log)
    os.unlink(sp)
    if seal == "device":
        os.symlink("/dev/zero", sp)
    else:
        with open(sp, "wb") as f:         # sparse: 4 GiB that an unbounded read would try to hold
            f.truncate(4 << 30)
    run = _verify_cli(closed_log)
    assert run.returncode == 1 and _no_traceback(run), run.stdout + run.stderr
    assert "seal" in run.stdout and "malformed" in run.stdout
    rep = verify_log(closed_log)
    assert not rep.ok and f"at most {MAX_SEAL_SIZE} bytes" in rep.error


def test_a_signing_key_file_is_read_within_bounds(tmp_path):
    key = tmp_path / "huge.pem"
    with open(key, "wb") as f:
        f.truncate(256 << 20)             # sparse: 256 MiB of zeros
    os.chmod(key, 0o600)
    with pytest.raises(AuditError, match=rf"larger than .*\({MAX_SIGNING_KEY_FILE} bytes at most\)"):
        load_signing_key_file(key)
