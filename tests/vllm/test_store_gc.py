"""Clean-up of the connector's store (``python -m pqc_kv_cache vllm-store gc``): blocks of ended sessions,
blocks unused for too long and the least recently used beyond a quota are deleted, each on record; nothing
that is not the connector's is touched; bad arguments are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes, make_session_dir
from pqc_kv_cache.vllm.storegc import collect_garbage
from pqc_kv_cache.vllm.tenancy import ServerSecret

SECRET = ServerSecret(bytes(range(32)))
CH = chain_hashes(list(range(40)), 4)
NOW = 2_000_000_000 * 10**9
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _block(store, tenant, session, i, size, used_s, created_s=None):
    """A block file of ``size`` bytes last used ``used_s`` seconds before NOW."""
    path = block_file(str(store), SECRET, tenant, session, CH[i])
    sdir = os.path.dirname(path)
    if not os.path.exists(sdir):
        make_session_dir(str(store), os.path.basename(os.path.dirname(sdir)), os.path.basename(sdir))
        t = NOW - (created_s if created_s is not None else 10_000) * 10**9
        os.utime(os.path.join(sdir, ".created"), ns=(t, t))
    with open(path, "wb") as f:
        f.write(b"x" * size)
    t = NOW - used_s * 10**9
    os.utime(path, ns=(t, t))
    return path


def test_blocks_of_a_tenants_older_sessions_are_deleted_and_the_newest_kept(tmp_path):
    store = tmp_path / "store"
    old = [_block(store, "tenant-a", "s-old", i, 100, used_s=5, created_s=9000) for i in range(3)]
    new = [_block(store, "tenant-a", "s-new", i, 100, used_s=5, created_s=100) for i in range(2)]
    other = _block(store, "tenant-b", "s-b", 0, 100, used_s=5, created_s=9500)    # tenant B's only session
    log = KVAuditLog(str(tmp_path / "audit.log"))
    try:
        rep = collect_garbage(str(store), log=log, now_ns=NOW)
        recs = [r for r in log.entries(limit=None) if r.operation == "delete"]
    finally:
        log.close(timeout=10)
    assert not any(os.path.exists(p) for p in old) and not os.path.exists(os.path.dirname(old[0]))
    assert all(os.path.exists(p) for p in new + [other])
    assert (rep.blocks, rep.deleted_blocks, rep.deleted_bytes, rep.deleted_sessions) == (6, 3, 300, 1)
    assert len(recs) == 4 and all("its session ended" in r.details for r in recs)
    assert sorted(r.nbytes for r in recs) == [0, 100, 100, 100]
    assert all(r.tenant_id == SECRET.tenant_name("tenant-a") for r in recs)   # the directory's name, not the id


def test_max_age_deletes_blocks_unused_for_longer_and_a_load_counts_as_use(tmp_path):
    store = tmp_path / "store"
    stale = _block(store, "tenant-a", "s", 0, 100, used_s=7200)
    fresh = _block(store, "tenant-a", "s", 1, 100, used_s=60)
    loaded = _block(store, "tenant-a", "s", 2, 100, used_s=7200)
    st = os.stat(loaded)
    os.utime(loaded, ns=(NOW - 10 * 10**9, st.st_mtime_ns))       # a load sets the access time
    rep = collect_garbage(str(store), max_age=3600, now_ns=NOW)
    assert not os.path.exists(stale) and os.path.exists(fresh) and os.path.exists(loaded)
    assert rep.deleted_blocks == 1 and rep.reasons == {"unused for more than 3600 s": 1}


def test_max_bytes_deletes_the_least_recently_used_first_until_the_rest_fit(tmp_path):
    store = tmp_path / "store"
    paths = [_block(store, "tenant-a", "s", i, 100, used_s=100 * (5 - i)) for i in range(5)]   # 0 is the oldest
    paths.append(_block(store, "tenant-b", "t", 0, 100, used_s=50))
    rep = collect_garbage(str(store), max_bytes=350, now_ns=NOW)
    assert [os.path.exists(p) for p in paths] == [False, False, False, True, True, True]
    assert rep.kept_bytes == 300 and rep.deleted_bytes == 300
    assert collect_garbage(str(store), max_bytes=0, now_ns=NOW).deleted_blocks == 3
    assert not any(os.path.exists(p) for p in paths)


def test_what_is_not_the_connectors_is_left_alone(tmp_path):
    store = tmp_path / "store"
    p = _block(store, "tenant-a", "s", 0, 100, used_s=10**6)
    sdir = os.path.dirname(p)
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    os.symlink(outside, os.path.join(sdir, "f" * 64 + ".pkvb"))          # a link under a block's name
    (store / "README").write_text("operator's note")
    (store / ("0" * 32)).mkdir()
    (store / ("0" * 32) / "notes.txt").write_text("x")
    tmp_old = os.path.join(sdir, ".abc.tmp")
    open(tmp_old, "wb").close()
    os.utime(tmp_old, ns=(NOW - 7200 * 10**9,) * 2)
    rep = collect_garbage(str(store), max_age=1, max_bytes=0, now_ns=NOW)
    assert not os.path.exists(p) and not os.path.exists(tmp_old) and rep.deleted_temporaries == 1
    assert outside.read_bytes() == b"keep" and os.path.islink(os.path.join(sdir, "f" * 64 + ".pkvb"))
    assert (store / "README").exists() and (store / ("0" * 32) / "notes.txt").exists()
    assert len(rep.skipped) == 3


@pytest.mark.parametrize("kw", [{"max_bytes": -1}, {"max_bytes": 1.5}, {"max_bytes": True}, {"max_age": -1},
                                {"max_age": float("nan")}, {"max_age": float("inf")}, {"max_age": "1"}])
def test_bad_arguments_are_refused_before_anything_is_deleted(tmp_path, kw):
    store = tmp_path / "store"
    p = _block(store, "tenant-a", "s", 0, 100, used_s=10**6)
    with pytest.raises(ValueError, match="max_"):
        collect_garbage(str(store), now_ns=NOW, **kw)
    assert os.path.exists(p)
    with pytest.raises(ValueError, match="no store"):
        collect_garbage(str(tmp_path / "none"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pqc_kv_cache", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_the_command_deletes_prints_a_summary_and_its_records_verify(tmp_path):
    store = tmp_path / "store"
    _block(store, "tenant-a", "s-old", 0, 100, used_s=5, created_s=9000)
    _block(store, "tenant-a", "s-new", 0, 100, used_s=5, created_s=10)
    for i in range(1, 4):
        _block(store, "tenant-a", "s-new", i, 100, used_s=i)
    log = str(tmp_path / "gc.log")
    key = str(tmp_path / "keys" / "gc.key")
    r = _cli("vllm-store", "gc", "--store", str(store), "--max-bytes", "250", "--audit-log", log,
             "--audit-signing-key", key)
    assert r.returncode == 0, r.stderr
    assert "quota 250 bytes: 2 least recently used block(s) deleted" in r.stdout
    assert "deleted 3 of 5 block(s) (300 of 500 bytes), 1 ended session directory(ies)" in r.stdout
    v = _cli("audit", "verify", log)
    assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout + v.stderr
    s = _cli("audit", "show", "--json", "--operation", "delete", log)
    recs = [json.loads(line) for line in s.stdout.splitlines() if line.strip()]
    assert len(recs) == 4 and sum(x["nbytes"] for x in recs) == 300


@pytest.mark.parametrize("args,message", [
    (["--max-bytes", "-5"], "must be 0 or more"),
    (["--max-bytes", "10GB"], "not a whole number of bytes"),
    (["--max-age", "nan"], "finite number of seconds"),
    (["--max-age", "-1"], "finite number of seconds"),
])
def test_the_command_refuses_bad_arguments_clearly(tmp_path, args, message):
    (tmp_path / "store").mkdir()
    r = _cli("vllm-store", "gc", "--store", str(tmp_path / "store"), "--audit-log", str(tmp_path / "a.log"), *args)
    assert r.returncode == 2 and message in r.stderr
    r = _cli("vllm-store", "gc", "--store", str(tmp_path / "none"), "--audit-log", str(tmp_path / "a.log"))
    assert r.returncode == 2 and "no store directory" in r.stderr
