"""Clean-up of the connector's store (``python -m pqc_kv_cache vllm-store gc``): blocks of ended sessions,
blocks unused for too long and the least recently used beyond a quota are deleted, each on record; nothing
that is not the connector's is touched; bad arguments are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


# ------------------------------------------------------------------ session markers and the order of sessions
def _marked(store, tenant, session, created_s):
    sdir = make_session_dir(str(store), tenant, session)
    t = NOW - created_s * 10**9
    os.utime(os.path.join(sdir, ".created"), ns=(t, t))
    return sdir


def test_a_session_directory_appears_with_its_marker_in_it(tmp_path, monkeypatch):
    from pqc_kv_cache.vllm import storefiles
    final = os.path.join(str(tmp_path), "t" * 32, "s" * 32)
    seen = []
    real_open = storefiles.os.open

    def watch(path, *a, **kw):
        if os.path.basename(path) == ".created":
            seen.append(os.path.lexists(final))        # the session directory must not be visible yet
        return real_open(path, *a, **kw)

    monkeypatch.setattr(storefiles.os, "open", watch)
    assert make_session_dir(str(tmp_path), "t" * 32, "s" * 32) == final
    assert seen == [False, True] and os.path.exists(os.path.join(final, ".created"))
    assert os.listdir(os.path.dirname(final)) == ["s" * 32]          # no temporary directory left


def test_two_engines_making_one_session_directory_share_the_first(tmp_path, monkeypatch):
    from pqc_kv_cache.vllm import storefiles
    tdir = os.path.join(str(tmp_path), "t" * 32)
    final = os.path.join(tdir, "s" * 32)
    real_rename = storefiles.os.rename

    def other_engine_first(src, dst):                # the other engine's directory lands just before ours
        monkeypatch.setattr(storefiles.os, "rename", real_rename)
        make_session_dir(str(tmp_path), "t" * 32, "s" * 32)
        open(os.path.join(final, "1" * 64 + ".pkvb"), "wb").close()
        return real_rename(src, dst)

    monkeypatch.setattr(storefiles.os, "rename", other_engine_first)
    assert make_session_dir(str(tmp_path), "t" * 32, "s" * 32) == final
    assert sorted(os.listdir(final)) == [".created", "1" * 64 + ".pkvb"] and os.listdir(tdir) == ["s" * 32]


def test_a_live_session_being_made_during_a_clean_up_keeps_its_blocks(tmp_path, monkeypatch):
    """A session directory without its marker (as an earlier version made it, marker just after) is not
    taken for the oldest: the ended session is the one deleted, for the right reason."""
    from pqc_kv_cache.vllm import storegc
    store = tmp_path / "store"
    t, a, b = "a" * 32, "b" * 32, "c" * 32                          # tenant; a ended; b live, being made
    now = time.time_ns()                     # the clean-up sees the directory's real times here
    ended = os.path.join(make_session_dir(str(store), t, a), "1" * 64 + ".pkvb")
    os.utime(os.path.join(os.path.dirname(ended), ".created"), ns=(now - 9000 * 10**9,) * 2)
    open(ended, "wb").close()
    live_dir = os.path.join(str(store), t, b)
    os.mkdir(live_dir, 0o700)
    real_lstat = storegc.os.lstat
    live = os.path.join(live_dir, "2" * 64 + ".pkvb")

    def lstat(path, *args, **kw):
        try:
            return real_lstat(path, *args, **kw)
        finally:
            if path == os.path.join(live_dir, ".created") and not os.path.exists(live):
                make_session_dir(str(store), t, b)                  # the engine goes on while gc walks
                with open(live, "wb") as f:
                    f.write(b"live block")

    monkeypatch.setattr(storegc.os, "lstat", lstat)
    r1 = collect_garbage(str(store), now_ns=now + 10**9)
    monkeypatch.setattr(storegc.os, "lstat", real_lstat)
    assert live_dir in r1.skipped and os.path.exists(os.path.join(live_dir, ".created")) and os.path.exists(live)
    r2 = collect_garbage(str(store), now_ns=now + 2 * 10**9)
    assert os.path.exists(live) and not os.path.exists(os.path.dirname(ended))
    assert r2.reasons == {"its session ended": 2} and r2.deleted_blocks == 1


def test_sessions_with_the_same_marker_time_are_all_kept(tmp_path):
    store = tmp_path / "store"
    old = _block(store, "tenant-a", "s-old", 0, 100, used_s=5, created_s=9000)
    tied = [_block(store, "tenant-a", s, 1, 100, used_s=5, created_s=100) for s in ("s-x", "s-y", "s-z")]
    rep = collect_garbage(str(store), now_ns=NOW)
    assert not os.path.exists(old) and all(os.path.exists(p) for p in tied)
    assert (rep.deleted_blocks, rep.deleted_sessions) == (1, 1)


def test_an_unmarked_session_directory_is_skipped_until_it_is_idle_past_the_grace(tmp_path):
    from pqc_kv_cache.vllm.storegc import MARKER_GRACE
    store = tmp_path / "store"
    p = _block(store, "tenant-a", "s", 0, 100, used_s=5)
    sdir = os.path.dirname(p)
    os.unlink(os.path.join(sdir, ".created"))
    os.utime(sdir, ns=(NOW - 10 * 10**9,) * 2)
    rep = collect_garbage(str(store), now_ns=NOW)
    assert os.path.exists(p) and rep.skipped == [sdir]
    rep = collect_garbage(str(store), now_ns=NOW + MARKER_GRACE * 10**9)
    assert not os.path.exists(sdir) and rep.reasons == {"its session directory was left unmarked": 2}


def test_an_ended_session_directory_that_cannot_be_removed_keeps_its_marker(tmp_path):
    store = tmp_path / "store"
    old = _block(store, "tenant-a", "s-old", 0, 100, used_s=5, created_s=9000)
    new = _block(store, "tenant-a", "s-new", 0, 100, used_s=5, created_s=100)
    with open(os.path.join(os.path.dirname(old), "notes.txt"), "w") as f:
        f.write("an operator's")
    rep = collect_garbage(str(store), now_ns=NOW)
    assert not os.path.exists(old) and os.path.exists(os.path.join(os.path.dirname(old), ".created"))
    assert os.path.dirname(old) in rep.skipped
    rep = collect_garbage(str(store), now_ns=NOW)                    # still the older one: the newest is kept
    assert os.path.exists(new) and rep.deleted_blocks == 0


def test_left_over_temporaries_are_deleted_on_record_and_fresh_ones_kept(tmp_path):
    store = tmp_path / "store"
    p = _block(store, "tenant-a", "s", 0, 100, used_s=5)
    sdir, tdir = os.path.dirname(p), os.path.dirname(os.path.dirname(p))
    old_file, new_file = os.path.join(sdir, ".a1.tmp"), os.path.join(sdir, ".b2.tmp")
    for path, age in ((old_file, 7200), (new_file, 60)):
        with open(path, "wb") as f:
            f.write(b"y" * 30)
        os.utime(path, ns=(NOW - age * 10**9,) * 2)
    old_dir, new_dir = os.path.join(tdir, ".s1.x.tmp"), os.path.join(tdir, ".s2.y.tmp")   # session dirs being made
    for path, age in ((old_dir, 7200), (new_dir, 60)):
        os.mkdir(path, 0o700)
        open(os.path.join(path, ".created"), "wb").close()
        os.utime(path, ns=(NOW - age * 10**9,) * 2)
    log = KVAuditLog(str(tmp_path / "audit.log"))
    try:
        rep = collect_garbage(str(store), log=log, now_ns=NOW)
        recs = [r for r in log.entries(limit=None) if r.operation == "delete"]
    finally:
        log.close(timeout=10)
    assert not os.path.exists(old_file) and not os.path.exists(old_dir) and rep.deleted_temporaries == 2
    assert os.path.exists(new_file) and os.path.exists(new_dir) and os.path.exists(p) and new_dir in rep.skipped
    assert sorted((r.nbytes, "left over by a writer" in r.details) for r in recs) == [(0, True), (30, True)]
    assert any(".a1.tmp" in r.details for r in recs) and any(".s1.x.tmp" in r.details for r in recs)


def test_a_block_file_over_4_gib_is_deleted_on_record_with_its_size(tmp_path):
    store = tmp_path / "store"
    old = _block(store, "tenant-a", "s-old", 0, 10, used_s=5, created_s=9000)
    _block(store, "tenant-a", "s-new", 0, 10, used_s=5, created_s=100)
    with open(old, "r+b") as f:
        f.truncate(1 << 33)                                          # sparse
    log = KVAuditLog(str(tmp_path / "audit.log"))
    try:
        rep = collect_garbage(str(store), log=log, now_ns=NOW)
        recs = [r for r in log.entries(limit=None) if r.operation == "delete" and r.nbytes]
    finally:
        log.close(timeout=10)
    assert not os.path.exists(old) and rep.deleted_bytes == 1 << 33
    assert len(recs) == 1 and recs[0].nbytes == (1 << 32) - 1 and f"of {1 << 33} bytes" in recs[0].details
