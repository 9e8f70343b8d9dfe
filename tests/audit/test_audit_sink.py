"""Persisted audit log: hash chain, signed checkpoints, seal, verify, re-open, and the CLI."""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit import KVAuditLog, Op, verify_log
from pqc_kv_cache.audit import cli
from pqc_kv_cache.audit.fileformat import FRAME_HEAD, HEADER, RECS_HEAD, record_locators
from pqc_kv_cache.audit.sink import AuditSink
from pqc_kv_cache.errors import AuditError, AuditIntegrityError

N = 100
T0 = 1_767_225_600_000_000_000
KEY = mldsa.MLDSA65PrivateKey.generate()


class Clock:
    def __init__(self):
        self.t = T0

    def __call__(self):
        self.t += 1_000_000
        return self.t


def write_log(path, n=N, key=KEY, close=True):
    lg = KVAuditLog(path=path, signing_key=key, clock=Clock(), frame_records=10, checkpoint_records=25,
                    fsync=False)
    t = lg.tenant_index("alice")
    s = lg.session_index("s1", "alice")
    lg.log_isolation_violation("mallory", "m", "probe", layer_idx=1, position=2)
    lg.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=np.arange(n - 1, dtype=np.uint16) % 32,
            pos_start=np.arange(n - 1, dtype=np.uint32), pos_count=1)
    if close:
        lg.close()
    else:
        lg.flush()
    return lg


def frames(path):
    data = open(path, "rb").read()
    off = HEADER.size
    out = []
    while off < len(data):
        ftype, ln = FRAME_HEAD.unpack_from(data, off)
        out.append((off, ftype, ln))
        off += FRAME_HEAD.size + ln + 32
    return out


def record_frame(path, k):
    """(frame offset, first record, count) of the frame holding record k."""
    data = open(path, "rb").read()
    for off, ftype, ln in frames(path):
        if ftype == b"RECS":
            first, count, _ = RECS_HEAD.unpack_from(data, off + FRAME_HEAD.size)
            if first <= k < first + count:
                return off, first, count
    raise AssertionError(k)


def record_offset(path, k):
    """Byte offset of record k in the file."""
    off, first, _ = record_frame(path, k)
    return off + FRAME_HEAD.size + RECS_HEAD.size + (k - first) * 64


def run_cli(*argv, capsys=None):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", *argv])
    rc = args.func(args)
    out = capsys.readouterr() if capsys else None
    return rc, out


def patch(path, off, new: bytes):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(new)


def cut(path, off, length):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:off] + data[off + length:])


@pytest.fixture
def logfile(tmp_path):
    p = tmp_path / "audit.log"
    write_log(p)
    return str(p)


def test_intact_log_verifies_and_prints_count_and_time_range(logfile, capsys):
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 0, out.out
    assert f"{N} records" in out.out
    assert "2026-01-01T00:00:00" in out.out and "closed and signed, sealed" in out.out
    rep = verify_log(logfile)
    assert rep.ok and rep.closed and rep.sealed and rep.signed_records == N
    assert os.path.exists(logfile + ".pub")


def test_changed_byte_in_a_record_names_that_record(logfile, capsys):
    off = record_offset(logfile, 37)
    patch(logfile, off + 40, b"\x09")             # tenant_idx of record 37
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1
    assert "record 37 changed" in out.out and "first bad record: 37" in out.out
    assert verify_log(logfile).bad_record == 37


def test_changed_record_with_forged_locator_breaks_the_chain_at_its_frame(logfile):
    off = record_offset(logfile, 42)
    data = bytearray(open(logfile, "rb").read())
    data[off + 56] ^= 1                             # layer of record 42
    rec = np.frombuffer(bytes(data[off:off + 64]), dtype=np.uint8).view(
        __import__("pqc_kv_cache.audit", fromlist=["RECORD_DTYPE"]).RECORD_DTYPE)
    foff, first, count = record_frame(logfile, 42)
    loc_off = foff + FRAME_HEAD.size + RECS_HEAD.size + count * 64 + (42 - first) * 8
    data[loc_off:loc_off + 8] = record_locators(rec).tobytes()
    open(logfile, "wb").write(bytes(data))
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == first and "hash chain broken" in rep.error


def forge_record(path, k, byte=56):
    """Change one byte of record k, then recompute its locator and every chain hash after the header, as a
    forger without the key would; the signatures stay as they were."""
    from pqc_kv_cache.audit import RECORD_DTYPE
    data = bytearray(open(path, "rb").read())
    data[record_offset(path, k) + byte] ^= 1
    h = hashlib.sha256(bytes(data[:HEADER.size])).digest()
    for foff, ftype, ln in frames(path):
        payload = bytes(data[foff + 8: foff + 8 + ln])
        if ftype == b"RECS":
            first, count, _ = RECS_HEAD.unpack_from(payload, 0)
            recs = np.frombuffer(payload, dtype=RECORD_DTYPE, count=count, offset=RECS_HEAD.size)
            start = foff + 8 + RECS_HEAD.size + count * 64
            data[start:start + 8 * count] = record_locators(recs).tobytes()
            payload = bytes(data[foff + 8: foff + 8 + ln])
        h = hashlib.sha256(h + bytes(data[foff:foff + 8]) + payload).digest()
        data[foff + 8 + ln: foff + 8 + ln + 32] = h
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("k", [3, 5, 42, N - 1])
def test_forged_chain_recomputed_to_the_end_names_the_changed_record(logfile, capsys, k):
    forge_record(logfile, k)
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == k and "changed after it was signed" in rep.error
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1 and f"first bad record: {k}" in out.out


def test_swapped_record_frames_are_reported_as_reordered_not_deleted(logfile):
    (o1, f1, _), (o2, _, _) = record_frame(logfile, 30), record_frame(logfile, 40)
    data = open(logfile, "rb").read()
    a = data[o1:o1 + FRAME_HEAD.size + FRAME_HEAD.unpack_from(data, o1)[1] + 32]
    b = data[o2:o2 + FRAME_HEAD.size + FRAME_HEAD.unpack_from(data, o2)[1] + 32]
    assert o1 + len(a) == o2
    open(logfile, "wb").write(data[:o1] + b + a + data[o2 + len(b):])
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == f1 and "swapped or reordered" in rep.error


def test_a_version_1_log_still_verifies_and_is_continued_in_version_1(tmp_path, monkeypatch, capsys):
    import pqc_kv_cache.audit.sink as sink
    p = str(tmp_path / "v1.log")
    with monkeypatch.context() as m:
        m.setattr(sink, "VERSION", 1)                    # a log written before checkpoints signed locators
        write_log(p)
    assert verify_log(p).version == 1
    with KVAuditLog(path=p, signing_key=KEY, clock=Clock(), fsync=False) as lg:
        lg.log_encrypt("bob", "b1", 0, 0)
    rep = verify_log(p)
    assert rep.ok and rep.sealed and rep.version == 1 and rep.records == N + 1
    forge_record(p, 5)
    rep = verify_log(p)
    assert not rep.ok and rep.bad_record == 0        # version 1 signs the chain head only


def test_changed_byte_in_tenant_table_is_detected(logfile):
    for off, ftype, ln in frames(logfile):
        if ftype == b"TABL":
            patch(logfile, off + FRAME_HEAD.size + 11 + 1, b"X")   # a letter of a tenant id
            break
    rep = verify_log(logfile)
    assert not rep.ok and "TABL" in rep.error and rep.bad_record == 0


def test_deleted_record_is_named(logfile, capsys):
    cut(logfile, record_offset(logfile, 55), 64)
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1 and "first bad record: 55" in out.out


def test_deleted_frame_of_records_is_named(logfile):
    off, ftype, ln = next(f for f in frames(logfile) if f[1] == b"RECS" and f[0] > record_offset(logfile, 60) - 100)
    cut(logfile, off, FRAME_HEAD.size + ln + 32)
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == 60 and "missing" in rep.error


def test_reordered_records_are_named(logfile):
    a, b = record_offset(logfile, 21), record_offset(logfile, 22)
    data = bytearray(open(logfile, "rb").read())
    data[a:a + 64], data[b:b + 64] = data[b:b + 64], data[a:a + 64]
    open(logfile, "wb").write(bytes(data))
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == 21 and "out of order" in rep.error


def test_inserted_record_is_named(logfile):
    off = record_offset(logfile, 70)
    data = open(logfile, "rb").read()
    open(logfile, "wb").write(data[:off + 64] + data[off:off + 64] + data[off + 64:])   # record 70 twice
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == 71


def test_wrong_public_key_fails(logfile, tmp_path, capsys):
    other = tmp_path / "other.log"
    write_log(other, n=3, key=mldsa.MLDSA65PrivateKey.generate())
    rc, out = run_cli("verify", logfile, "--public-key", str(other) + ".pub", capsys=capsys)
    assert rc == 1 and "wrong key" in out.out and "first bad record: 0" in out.out


def test_truncation_after_a_clean_close_is_detected(logfile, capsys):
    off, ftype, ln = frames(logfile)[-1]
    assert ftype == b"CLOS"
    with open(logfile, "r+b") as f:
        f.truncate(off)                             # drop the CLOS frame: looks like a crash without the seal
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1 and "truncated after a clean close" in out.out


def test_truncation_of_records_after_a_clean_close_names_the_first_missing_record(logfile):
    torn_first = record_frame(logfile, 80)[1]
    with open(logfile, "r+b") as f:
        f.truncate(record_offset(logfile, 80) + 10)
    rep = verify_log(logfile)
    assert not rep.ok and "truncated after a clean close" in rep.error
    assert rep.bad_record == torn_first             # the torn frame's records are gone


def test_unclosed_log_is_reported_as_a_crash(tmp_path, capsys):
    p = tmp_path / "crash.log"
    sink = AuditSink(p, KEY, checkpoint_records=50, frame_records=10, fsync=False)
    sink.write_tables([(1, 0, 0, "alice"), (2, 0, 0, "s")])
    recs = np.zeros(70, dtype=__import__("pqc_kv_cache.audit", fromlist=["x"]).RECORD_DTYPE)
    recs["record_no"] = np.arange(70)
    recs["host_ts_ns"] = T0
    sink.write_records(recs)                        # a checkpoint after 50, 20 unsigned after it
    sink.f.flush()
    sink.abandon()                                  # the process died: no CLOS, no seal
    rc, out = run_cli("verify", str(p), capsys=capsys)
    assert rc == 3
    assert "not closed (crash)" in out.out and "50 records are covered" in out.out and "20 after" in out.out


def test_torn_final_frame_is_reported_as_a_crash(tmp_path):
    p = tmp_path / "torn.log"
    write_log(p, close=False)._sink.f.flush()
    size = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(FRAME_HEAD.pack(b"RECS", 1000) + b"\0" * 100)   # the writer died mid-frame
    rep = verify_log(p)
    assert rep.ok and rep.crash_tail and rep.torn_bytes == os.path.getsize(p) - size


def test_reopen_verifies_and_continues_chain_and_numbering(tmp_path, capsys):
    p = tmp_path / "a.log"
    write_log(p)
    with KVAuditLog(path=p, signing_key=KEY, clock=Clock(), fsync=False) as lg:
        assert lg.tenant_index("alice") == 0         # tables are restored: alice 0, mallory 1
        first = lg.log_encrypt("bob", "b1", 0, 0)
        assert first == N
        assert lg.entries()[0].record_number == N
    rep = verify_log(p, collect=True)
    assert rep.ok and rep.closed and rep.records == N + 1 and rep.tenants[2] == "bob"
    rc, out = run_cli("show", str(p), "--tenant", "bob", "--json", capsys=capsys)
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 0 and [r["record_number"] for r in rows] == [N]


def test_reopen_after_a_crash_records_the_recovery(tmp_path, capsys):
    p = tmp_path / "a.log"
    lg = write_log(p, close=False)
    lg._sink.f.flush()
    lg._sink.abandon()                              # the process dies: its file and write lock go
    with open(p, "ab") as f:
        f.write(b"RECS\x05")                        # torn header of a frame
    with KVAuditLog(path=p, signing_key=KEY, clock=Clock(), fsync=False) as lg2:
        lg2.log_encrypt("alice", "s1", 0, 0)
    rep = verify_log(p)
    assert rep.ok and rep.closed and rep.recovered_crashes == 1 and rep.records == N + 1
    rc, out = run_cli("verify", str(p), capsys=capsys)
    assert rc == 0 and "1 earlier crash(es) recovered" in out.out


def test_reopen_of_a_tampered_log_refuses_to_continue(logfile):
    patch(logfile, record_offset(logfile, 5) + 40, b"\x07")
    with pytest.raises(AuditIntegrityError) as ei:
        KVAuditLog(path=logfile, signing_key=KEY)
    assert ei.value.record_number == 5


def test_reopen_needs_the_signing_key(logfile):
    with pytest.raises(AuditError, match="signing key"):
        KVAuditLog(path=logfile)
    with pytest.raises(AuditIntegrityError, match="wrong key"):
        KVAuditLog(path=logfile, signing_key=mldsa.MLDSA65PrivateKey.generate())


def test_show_filters_by_tenant_layer_position_operation(logfile, capsys):
    rc, out = run_cli("show", logfile, "--tenant", "alice", "--layer", "5", "--json", capsys=capsys)
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 0 and rows and all(r["tenant_id"] == "alice" and r["layer_idx"] == 5 for r in rows)
    rc, out = run_cli("show", logfile, "--position", "2", "--operation", "isolation-violation", capsys=capsys)
    lines = out.out.splitlines()   # two legend lines, the header, the rule, then the one record and its details
    assert rc == 0 and len(lines) == 6 and "mallory" in lines[4] and "probe" in lines[5]
    rc, out = run_cli("show", logfile, "--operation", "shred", capsys=capsys)
    assert rc == 2


def test_verify_of_a_missing_file_exits_2(tmp_path, capsys):
    rc, out = run_cli("verify", str(tmp_path / "none.log"), capsys=capsys)
    assert rc == 2


def test_cli_runs_as_python_dash_m(logfile):
    r = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", "verify", logfile], capture_output=True,
                       text=True, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert r.returncode == 0, r.stderr
    assert f"{N} records" in r.stdout
    patch(logfile, record_offset(logfile, 9) + 8, b"\xff")
    r = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", "verify", logfile], capture_output=True,
                       text=True, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert r.returncode == 1 and "first bad record: 9" in r.stdout


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    p = tmp_path_factory.mktemp("pristine") / "audit.log"
    write_log(p, n=40)
    return {ext: open(str(p) + ext, "rb").read() for ext in ("", ".pub", ".seal")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_changed_byte_of_a_closed_log_fails_verification(pristine, tmp_path, data):
    log = bytearray(pristine[""])
    i = data.draw(st.integers(0, len(log) - 1), label="offset")
    x = data.draw(st.integers(1, 255), label="xor")
    log[i] ^= x
    p = tmp_path / "audit.log"
    p.write_bytes(bytes(log))
    (tmp_path / "audit.log.pub").write_bytes(pristine[".pub"])
    (tmp_path / "audit.log.seal").write_bytes(pristine[".seal"])
    rep = verify_log(p)
    assert not rep.ok, f"byte {i} changed and verify passed"
    assert rep.bad_record is not None


def test_show_of_a_tampered_log_prints_the_verified_records_and_exits_1(logfile, capsys):
    patch(logfile, record_offset(logfile, 50) + 40, b"\x05")
    rc, out = run_cli("show", logfile, "--json", capsys=capsys)
    numbers = [json.loads(line)["record_number"] for line in out.out.splitlines()]
    assert rc == 1 and "FAILED verification" in out.err and "record 50 changed" in out.err
    assert numbers == list(range(numbers[-1] + 1)) and numbers[-1] < 50


def test_show_limit_prints_the_newest_matches(logfile, capsys):
    rc, out = run_cli("show", logfile, "--tenant", "alice", "--limit", "3", "--json", capsys=capsys)
    assert rc == 0 and [json.loads(x)["record_number"] for x in out.out.splitlines()] == [N - 3, N - 2, N - 1]


# -- frames appended after a clean close (the chain is unkeyed: only a signed REOP may follow a CLOS) --

def append_forged_record(path):
    """Append one RECS frame whose record number and chain hash continue the log, as anyone could."""
    rep = verify_log(path)
    assert rep.ok
    rec = np.zeros(1, dtype=__import__("pqc_kv_cache.audit", fromlist=["x"]).RECORD_DTYPE)
    rec["record_no"] = rep.records
    rec["op"] = int(Op.ENCRYPT)
    rec["host_ts_ns"] = rep.last_ts_ns
    payload = RECS_HEAD.pack(rep.records, 1, 0) + rec.tobytes() + record_locators(rec).tobytes()
    head = FRAME_HEAD.pack(b"RECS", len(payload))
    h = hashlib.sha256(rep.head)
    h.update(head)
    h.update(payload)
    with open(path, "ab") as f:
        f.write(head + payload + h.digest())
    return rep.records


def test_record_appended_after_a_clean_close_is_named(logfile, capsys):
    forged = append_forged_record(logfile)
    assert forged == N
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == N and not rep.sealed
    assert "appended after the log was closed" in rep.error
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1 and f"first bad record: {N}" in out.out


def test_record_appended_after_a_close_fails_even_without_the_seal(logfile):
    os.remove(logfile + ".seal")
    append_forged_record(logfile)
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == N


def test_torn_bytes_after_a_sealed_close_are_tampering(logfile, capsys):
    with open(logfile, "ab") as f:
        f.write(FRAME_HEAD.pack(b"RECS", 1000) + b"\0" * 10)
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == N and "sealed end" in rep.error
    with pytest.raises(AuditIntegrityError) as ei:
        KVAuditLog(path=logfile, signing_key=KEY, fsync=False)
    assert ei.value.record_number == N


def test_reopen_refuses_to_sign_a_record_appended_after_the_close(logfile, capsys):
    before = open(logfile, "rb").read()
    append_forged_record(logfile)
    after = open(logfile, "rb").read()
    with pytest.raises(AuditIntegrityError) as ei:
        KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False)
    assert ei.value.record_number == N
    assert open(logfile, "rb").read() == after and after.startswith(before)   # nothing appended or cut
    rc, _ = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1


def test_legitimate_reopens_after_clean_closes_verify(logfile, capsys):
    for k in range(2):
        with KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False) as lg:
            assert lg.log_encrypt("bob", "b1", 0, k) == N + k
    types = [t for _, t, _ in frames(logfile)]
    assert types.count(b"REOP") == 2
    assert all(types[i + 1] == b"REOP" for i, t in enumerate(types[:-1]) if t == b"CLOS")
    rep = verify_log(logfile)
    assert rep.ok and rep.sealed and rep.closed and rep.records == N + 2 and rep.reopens == 2
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 0 and "re-opened after a clean close 2 time(s)" in out.out


def test_reopen_that_crashed_is_unclosed_under_the_old_seal_and_can_be_continued(logfile, capsys):
    lg = KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False)
    lg.log_encrypt("bob", "b1", 0, 0)
    lg.flush()
    lg._sink.abandon()                               # the process died: old seal, REOP and a checkpoint
    lg._sink = None
    lg.close()
    rep = verify_log(logfile)
    assert rep.ok and rep.crash_tail and rep.reopens == 1 and rep.records == N + 1
    rc, _ = run_cli("verify", logfile, capsys=capsys)
    assert rc == 3
    with KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False) as lg2:
        lg2.log_encrypt("bob", "b1", 0, 1)
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 0 and f"{N + 2} records" in out.out


def test_forged_or_misplaced_reopen_frame_fails(logfile, tmp_path):
    with KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False) as lg:
        lg.log_encrypt("bob", "b1", 0, 0)
    off, _, ln = next(f for f in frames(logfile) if f[1] == b"REOP")
    sig_byte = off + FRAME_HEAD.size + ln - 5
    pristine = open(logfile, "rb").read()
    patch(logfile, sig_byte, bytes([pristine[sig_byte] ^ 1]))
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == N
    # a REOP signed by the right key, copied (chain recomputed) to where no close precedes it
    reop = pristine[off: off + FRAME_HEAD.size + ln]
    other = tmp_path / "other.log"
    write_log(other, close=False)._sink.f.flush()
    h = hashlib.sha256(verify_log(other).head)
    h.update(reop)
    with open(other, "ab") as f:
        f.write(reop + h.digest())
    rep = verify_log(other)
    assert not rep.ok and "does not follow a closing checkpoint" in rep.error


def test_reopen_of_a_closed_unsealed_log_with_a_torn_tail_writes_reop(logfile, capsys):
    os.remove(logfile + ".seal")                     # closed, but the seal was lost
    with open(logfile, "ab") as f:
        f.write(b"REOP\x05")                        # a re-open died while writing its first frame
    rep = verify_log(logfile)
    assert rep.ok and rep.crash_tail and rep.torn_bytes == 5
    with KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False) as lg:
        lg.log_encrypt("bob", "b1", 0, 0)
    rep = verify_log(logfile)
    assert rep.ok and rep.sealed and rep.reopens == 1 and rep.records == N + 1


# -- unsigned frames may not change what signed records say --------------------------------------------

def append_frame(path, ftype: bytes, payload: bytes):
    """Append one frame whose chain hash continues the log, as anyone could (the chain is unkeyed)."""
    rep = verify_log(path)
    assert rep.ok, rep.error
    head = FRAME_HEAD.pack(ftype, len(payload))
    h = hashlib.sha256(rep.head)
    h.update(head)
    h.update(payload)
    with open(path, "ab") as f:
        f.write(head + payload + h.digest())


def crashed_log(path, **kw):
    """A log whose writer died after its last checkpoint (its records signed, no CLOS)."""
    lg = write_log(path, close=False, **kw)
    lg._sink.abandon()
    lg._sink = None
    lg.close()
    rep = verify_log(path)
    assert rep.ok and rep.crash_tail and rep.signed_records == N
    return rep


def test_unsigned_table_frame_renaming_a_tenant_fails_and_show_keeps_the_signed_name(tmp_path, capsys):
    from pqc_kv_cache.audit.fileformat import TABL_ENTRY
    p = str(tmp_path / "a.log")
    rep = crashed_log(p)
    mallory = next(i for i, t in rep.tenants.items() if t == "mallory")
    append_frame(p, b"TABL", TABL_ENTRY.pack(1, mallory, 0, 5) + b"alice")
    rep = verify_log(p)
    assert not rep.ok and "renames tenant index" in rep.error and rep.bad_record == N
    rc, out = run_cli("show", p, "--json", capsys=capsys)
    first = json.loads(out.out.splitlines()[0])
    assert rc == 1 and first["record_number"] == 0 and first["tenant_id"] == "mallory"
    with pytest.raises(AuditIntegrityError):
        KVAuditLog(path=p, signing_key=KEY, fsync=False)       # never adopted and signed


def test_unsigned_details_frame_rewriting_a_signed_record_fails(tmp_path, capsys):
    from pqc_kv_cache.audit.fileformat import DETL_ENTRY
    p = str(tmp_path / "a.log")
    crashed_log(p)
    append_frame(p, b"DETL", DETL_ENTRY.pack(0, 7) + b"nothing")     # record 0 was signed as "probe"
    rep = verify_log(p)
    assert not rep.ok and rep.bad_record == 0 and "record 0" in rep.error
    rc, out = run_cli("verify", p, capsys=capsys)
    assert rc == 1 and "first bad record: 0" in out.out
    with pytest.raises(AuditIntegrityError) as ei:
        KVAuditLog(path=p, signing_key=KEY, fsync=False)
    assert ei.value.record_number == 0


def test_unsigned_table_frame_naming_an_index_signed_records_used_unnamed_fails(tmp_path):
    from pqc_kv_cache.audit.fileformat import TABL_ENTRY
    p = str(tmp_path / "a.log")
    lg = KVAuditLog(path=p, signing_key=KEY, clock=Clock(), fsync=False)
    lg.log_encrypt("alice", "s1", 0, 0)
    lg.emit(Op.DECRYPT, tenant_idx=7, session_idx=0, pos_start=np.arange(3, dtype=np.uint32), pos_count=1)
    lg.flush()
    lg._sink.abandon()
    lg._sink = None
    lg.close()
    assert verify_log(p).ok
    append_frame(p, b"TABL", TABL_ENTRY.pack(1, 7, 0, 3) + b"bob")
    rep = verify_log(p)
    assert not rep.ok and rep.bad_record == 1 and "tenant index 7" in rep.error and 7 not in rep.tenants


def test_verify_counts_the_unsigned_frames_of_a_crashed_log(tmp_path, capsys):
    p = str(tmp_path / "a.log")
    crashed_log(p)
    append_forged_record(p)
    append_forged_record(p)
    rep = verify_log(p)
    assert rep.ok and rep.crash_tail and rep.unsigned_frames == 2 and rep.signed_records == N
    rc, out = run_cli("verify", p, capsys=capsys)
    assert rc == 3 and "(2 unsigned frame(s))" in out.out


# -- a re-opened log cannot be cut back to an earlier close ---------------------------------------------

def reopened_twice_closed(logfile):
    first_close = os.path.getsize(logfile)
    lg = KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False)
    seal_during_reopen = open(logfile + ".seal", "rb").read()
    for i in range(25):
        lg.log_isolation_violation("mallory", "m", f"probe {i}")
    lg.close()
    assert verify_log(logfile).ok and verify_log(logfile).records == N + 25
    return first_close, seal_during_reopen


def test_log_cut_back_to_an_earlier_close_with_its_seal_deleted_is_not_reported_intact(logfile, capsys):
    first_close, _ = reopened_twice_closed(logfile)
    with open(logfile, "r+b") as f:
        f.truncate(first_close)
    os.remove(logfile + ".seal")
    rep = verify_log(logfile)
    assert rep.unsealed_close and rep.crash_tail
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 3 and "may have been cut off" in out.out


def test_log_cut_back_to_an_earlier_close_under_the_seal_of_the_reopen_names_the_first_cut_record(logfile, capsys):
    first_close, seal_during_reopen = reopened_twice_closed(logfile)
    with open(logfile, "r+b") as f:
        f.truncate(first_close)
    with open(logfile + ".seal", "wb") as f:
        f.write(seal_during_reopen)                       # any seal on disk after the re-open began
    rep = verify_log(logfile)
    assert not rep.ok and rep.bad_record == N and "re-open" in rep.error
    rc, out = run_cli("verify", logfile, capsys=capsys)
    assert rc == 1 and f"first bad record: {N}" in out.out


def test_reopened_log_whose_writer_died_before_its_close_is_unclosed(logfile, capsys):
    lg = KVAuditLog(path=logfile, signing_key=KEY, clock=Clock(), fsync=False)
    lg.log_encrypt("bob", "b1", 0, 0)
    lg.flush()
    lg._sink.abandon()
    lg._sink = None
    lg.close()
    rep = verify_log(logfile)
    assert rep.ok and rep.reopen_sealed and rep.crash_tail and rep.records == N + 1
    rc, _ = run_cli("verify", logfile, capsys=capsys)
    assert rc == 3
