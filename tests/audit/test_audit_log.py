"""KVAuditLog: the earlier API, queries, eviction, logging, stats and input checks."""

import datetime as dt
import json
import logging
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit import NONE16, KVAuditEntry, KVAuditLog, Op, Status
from pqc_kv_cache.errors import AuditError

T0 = 1_767_225_600_000_000_000   # 2026-01-01T00:00:00Z


class Clock:
    def __init__(self, start=T0, step=1_000_000_000):
        self.t = start - step
        self.step = step
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.t += self.step
            return self.t


@pytest.fixture
def log():
    with KVAuditLog(clock=Clock()) as lg:
        yield lg


def test_earlier_api_entries_have_earlier_fields_and_iso_timestamps(log):
    log.log_encrypt("alice", "s1", 3, 7, 41)
    log.log_decrypt("alice", "s1", 3, 7, 41, success=False, details="tag mismatch")
    log.log_rotate("alice", "s1", "entry-count", epoch=2)
    log.log_isolation_violation("mallory", "alice", "read alice", session_id="s9")
    es = log.entries()
    assert [e.operation for e in es] == ["isolation-violation", "rotate", "decrypt", "encrypt"]
    enc = es[-1]
    assert isinstance(enc, KVAuditEntry)
    assert (enc.tenant_id, enc.session_id, enc.layer_idx, enc.position, enc.sequence_number, enc.success) == \
        ("alice", "s1", 3, 7, 41, True)
    assert enc.timestamp == "2026-01-01T00:00:00+00:00"
    assert dt.datetime.fromisoformat(es[0].timestamp) == dt.datetime(2026, 1, 1, 0, 0, 3, tzinfo=dt.timezone.utc)
    assert es[2].success is False and es[2].details == "tag mismatch" and es[2].status == Status.AUTH_FAILED
    assert es[1].epoch == 2 and es[1].layer_idx == -1 and es[1].position == -1
    assert es[1].details == "trigger=entry-count"
    assert es[0].success is False and es[0].details == "target=alice; read alice" and es[0].status == Status.REFUSED
    assert (es[0].tenant_id, es[0].session_id) == ("mallory", "s9")
    assert [e.record_number for e in es] == [3, 2, 1, 0]
    assert len(log) == 4


def test_entries_filter_by_tenant_operation_layer_and_success(log):
    for layer in range(4):
        log.log_encrypt("a", "s", layer, 0)
        log.log_decrypt("b", "s", layer, 0, success=layer != 2)
    assert len(log.entries(tenant_id="a")) == 4
    assert len(log.entries(tenant_id="nobody")) == 0
    assert {e.operation for e in log.entries(operation="decrypt")} == {"decrypt"}
    assert [e.layer_idx for e in log.entries(layer_idx=2)] == [2, 2]
    fail = log.entries(success=False)
    assert len(fail) == 1 and fail[0].tenant_id == "b" and fail[0].layer_idx == 2
    assert len(log.entries(success=True)) == 7
    assert len(log.entries(limit=3)) == 3
    assert len(log.entries(tenant_id="b", operation="decrypt", layer_idx=1)) == 1
    assert log.entries(operation="isolation_violation") == []


def test_position_matches_records_whose_range_contains_it(log):
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=1, pos_start=10, pos_count=5)
    log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=1, pos_start=14, pos_count=1)
    log.log_rotate("a", "s")     # no positions: never matches a position query
    assert [e.operation for e in log.entries(position=14)] == ["encrypt", "decrypt"]
    assert [e.position for e in log.entries(position=10)] == [10]
    assert log.entries(position=15) == []
    assert log.entries(position=9) == []
    assert log.entries(position=0) == []
    assert len(log.entries(tenant_id="a", layer_idx=1, position=12)) == 1


def test_since_accepts_datetime_iso_string_and_nanoseconds(log):
    for i in range(5):
        log.log_encrypt("a", "s", 0, i)
    cut = dt.datetime(2026, 1, 1, 0, 0, 3, tzinfo=dt.timezone.utc)
    assert [e.position for e in log.entries(since=cut)] == [4, 3]
    assert [e.position for e in log.entries(since=cut.isoformat())] == [4, 3]
    assert [e.position for e in log.entries(since=T0 + 4_000_000_000)] == [4]
    with pytest.raises(ValueError):
        log.entries(since="yesterday")


def test_export_json_is_oldest_first_with_earlier_field_names(log):
    log.log_encrypt("a", "s", 0, 1)
    log.log_decrypt("a", "s", 0, 1)
    data = json.loads(log.export_json())
    assert [d["operation"] for d in data] == ["encrypt", "decrypt"]
    for key in ("timestamp", "operation", "tenant_id", "session_id", "layer_idx", "position", "sequence_number",
                "success", "details"):
        assert key in data[0]


def test_oldest_records_leave_memory_beyond_max_entries_but_stay_in_the_file(tmp_path):
    from pqc_kv_cache.audit import verify_log

    with KVAuditLog(path=tmp_path / "a.log", max_entries=100, clock=Clock(), fsync=False) as lg:
        t = lg.tenant_index("a")
        s = lg.session_index("s", "a")
        lg.log_encrypt("a", "s", 0, 0, details="first")
        for _ in range(3):
            lg.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, pos_start=np.arange(83, dtype=np.uint32),
                    pos_count=1)
        assert len(lg) == 100
        st_ = lg.stats()
        assert st_["evicted"] == 150 and st_["in_memory"] == 100 and st_["dropped"] == 0
        es = lg.entries(limit=None)
        assert es[-1].record_number == 150 and es[0].record_number == 249
        assert 0 not in lg._details       # details of evicted records leave memory too
    rep = verify_log(tmp_path / "a.log", collect=True)
    assert rep.ok and rep.records == 250 and rep.details == {0: "first"}


def test_failures_and_violations_go_to_logging_at_warning_with_tenant_layer_positions(caplog):
    with KVAuditLog(clock=Clock(), logger="test.audit") as lg:
        with caplog.at_level(logging.WARNING, logger="test.audit"):
            t = lg.tenant_index("carol")
            s = lg.session_index("s", "carol")
            lg.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=7, pos_start=np.array([0, 40], np.uint32),
                    pos_count=np.array([40, 8], np.uint32), status=np.array([0, 1], np.uint8))
            lg.log_isolation_violation("mallory", "x", layer_idx=2, position=5)
            lg.log_encrypt("carol", "s", 1, 1)
            lg.flush()
    assert lg.stats()["failures"] == 2 and lg.stats()["violations"] == 1   # the violation is REFUSED
    msgs = [r.getMessage() for r in caplog.records if r.name == "test.audit"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "test.audit")
    assert len(msgs) == 2
    assert "'carol'" in msgs[0] and "layer=7" in msgs[0] and "positions=40..47" in msgs[0]
    assert "AUTH_FAILED" in msgs[0]
    assert "isolation-violation" in msgs[1] and "'mallory'" in msgs[1] and "layer=2" in msgs[1]
    assert "positions=5..5" in msgs[1]


def test_stats_count_emitted_drained_and_bytes_persisted(tmp_path):
    with KVAuditLog(path=tmp_path / "a.log", clock=Clock(), fsync=False) as lg:
        t = lg.tenant_index("a")
        s = lg.session_index("s", "a")
        lg.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, row=np.arange(16, dtype=np.uint16))
        lg.flush()
        st_ = lg.stats()
        assert st_["emitted"] == st_["drained"] == 16
        assert st_["dropped"] == 0
        assert st_["bytes_persisted"] >= 16 * 64
    assert (tmp_path / "a.log").stat().st_size == lg.stats()["bytes_persisted"]


def test_emit_broadcasts_scalars_and_returns_dense_first_record_numbers(log):
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    assert log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s) == 0
    assert log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=np.arange(32, dtype=np.uint16),
                    row=5, nonce_counter=np.arange(100, 132, dtype=np.uint64)) == 1
    assert log.emit(Op.CROP, tenant_idx=t, session_idx=s) == 33
    es = list(reversed(log.entries(limit=None)))
    assert [e.layer_idx for e in es[1:33]] == list(range(32))
    assert [e.sequence_number for e in es[1:33]] == list(range(100, 132))
    assert all(e.row == 5 for e in es[1:33])
    assert es[0].layer_idx == -1 and es[0].row is None and es[33].operation == "crop"


def test_emit_per_position_expands_descriptors_vectorised(log):
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    first = log.emit_per_position(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=3,
                                  row=np.array([0, 1, 2], np.uint16), pos_start=np.array([10, 0, 5], np.uint32),
                                  pos_count=np.array([3, 0, 2], np.uint32),
                                  nonce_counter=np.array([7, 8, 9], np.uint64), nbytes=np.array([10, 5, 4], np.uint32),
                                  epoch=1)
    assert first == 0
    es = list(reversed(log.entries(limit=None)))
    assert [(e.row, e.position, e.position_count, e.sequence_number, e.nbytes, e.epoch) for e in es] == [
        (0, 10, 1, 7, 4, 1), (0, 11, 1, 7, 3, 1), (0, 12, 1, 7, 3, 1), (2, 5, 1, 9, 2, 1), (2, 6, 1, 9, 2, 1)]
    assert log.emit_per_position(Op.ENCRYPT, tenant_idx=t, session_idx=s, pos_count=0) == 5


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 6), st.integers(0, 100)), min_size=1, max_size=8))
def test_emit_per_position_equals_a_loop_over_positions(descs):
    with KVAuditLog(clock=Clock()) as lg:
        t = lg.tenant_index("a")
        s = lg.session_index("s", "a")
        starts, counts, nbs = (np.array(c, dtype=np.uint32) for c in zip(*descs))
        lg.emit_per_position(Op.ENCRYPT, tenant_idx=t, session_idx=s, pos_start=starts, pos_count=counts,
                             nbytes=nbs, nonce_counter=np.arange(len(descs), dtype=np.uint64))
        got = [(e.position, e.sequence_number, e.nbytes) for e in reversed(lg.entries(limit=None))]
    want = []
    for d, (ps, pc, nb) in enumerate(descs):
        for j in range(pc):
            want.append((ps + j, d, nb // pc + (1 if j < nb % pc else 0)))
    assert got == want


def test_bad_input_raises_one_clear_error(log):
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    with pytest.raises(ValueError, match="layer"):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=70000)
    with pytest.raises(ValueError, match="pos_start"):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, pos_start=np.array([1, -1]))
    with pytest.raises(TypeError, match="row"):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, row=np.array([1.5]))
    with pytest.raises(TypeError, match="layer"):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="elements"):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=np.arange(3), row=np.arange(4))
    with pytest.raises(ValueError, match="operation"):
        log.emit(99, tenant_idx=t, session_idx=s)
    with pytest.raises(ValueError):
        log.log_event("shred", "a", "s")
    with pytest.raises(TypeError):
        log.tenant_index(5)
    with pytest.raises(ValueError):
        KVAuditLog(max_entries=0)
    with pytest.raises(ValueError):
        KVAuditLog(signing_key=b"\0" * 32)
    # nothing half-written: the failed calls emitted no record
    assert len(log) == 0 and log.stats()["emitted"] == 0


def test_emit_after_close_raises_audit_error():
    lg = KVAuditLog(clock=Clock())
    lg.log_encrypt("a", "s")
    lg.close()
    lg.close()       # idempotent
    with pytest.raises(AuditError):
        lg.log_encrypt("a", "s")
    assert lg.stats()["drained"] == 1


def test_log_event_records_crop_reorder_close(log):
    log.log_event("crop", "a", "s", layer_idx=0, position=100, position_count=28)
    log.log_event(Op.REORDER, "a", "s", row=3)
    log.log_event("close", "a", "s", details="ttl")
    es = list(reversed(log.entries()))
    assert [e.operation for e in es] == ["crop", "reorder", "close"]
    assert (es[0].position, es[0].position_count) == (100, 28)
    assert es[1].row == 3 and es[2].details == "ttl"
    assert len(log.entries(layer_idx=-1)) == 2 and NONE16 == 0xFFFF


def test_file_write_failure_surfaces_as_audit_error_and_records_stay_in_memory(tmp_path):
    from pqc_kv_cache.audit import verify_log

    lg = KVAuditLog(path=tmp_path / "a.log", clock=Clock(), fsync=False)
    lg.log_encrypt("a", "s", 0, 0)
    lg.flush()

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    lg._sink.f.write = disk_full
    lg.log_encrypt("a", "s", 0, 1)
    with pytest.raises(AuditError, match="No space left"):
        lg.flush()
    with pytest.raises(AuditError):
        lg.log_encrypt("a", "s", 0, 2)
    assert lg.stats()["drained"] == 2 and lg.stats()["dropped"] == 0
    assert [e.position for e in lg._query(limit=None, newest_first=False)] == [0, 1]
    with pytest.raises(AuditError):
        lg.close()
    rep = verify_log(tmp_path / "a.log")
    assert rep.ok and rep.crash_tail and rep.signed_records == 1


def test_flush_raises_for_device_reported_tag_failures_once():
    """On a GPU the decode loop cannot raise; flush() surfaces device-written failed DECRYPT records."""
    from pqc_kv_cache.errors import DecryptionError
    log = KVAuditLog()
    t, s = log.tenant_index("alice"), log.session_index("s1", "alice")
    # host-path failure (no device timestamp): already raised by the caller, flush stays quiet
    log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=1, row=0, pos_start=4, pos_count=2,
             status=Status.AUTH_FAILED)
    assert log.flush() is True
    # device-written record with a failed tag
    log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=3, row=1, pos_start=8, pos_count=4,
             status=Status.AUTH_FAILED, device_ts_ns=123)
    with pytest.raises(DecryptionError, match=r"alice.*layer 3.*8\.\.11") as info:
        log.flush()
    assert info.value.layer_idx == 3 and info.value.positions == range(8, 12)
    assert log.flush() is True                      # raised once
    assert len(log.entries(operation="decrypt", success=False)) == 2
    log.close()


def test_close_does_not_raise_device_failures_and_closes():
    log = KVAuditLog()
    t, s = log.tenant_index("alice"), log.session_index("s1", "alice")
    log.emit(Op.DECRYPT, tenant_idx=t, session_idx=s, layer=0, row=0, pos_start=0, pos_count=1,
             status=Status.AUTH_FAILED, device_ts_ns=5)
    log.close()
    with pytest.raises(AuditError):
        log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s)


# -- a drain thread that dies must fail the log, never hang its emitters ----------------------------------

def _run_bounded(fn, timeout=5.0):
    """Run fn in a thread; (finished, exception) after at most ``timeout`` s, so a hang fails the test."""
    out = {}

    def body():
        try:
            fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            out["exc"] = e

    th = threading.Thread(target=body, daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive(), out.get("exc")


class _Boom(RuntimeError):
    pass


def _kill_drain(lg):
    """Make the drain's unguarded, locked part raise on its next pass."""
    def take():
        raise _Boom("ring take exploded")
    lg._ring.take = take


def test_emitters_on_a_full_ring_fail_instead_of_hanging_when_the_drain_dies():
    lg = KVAuditLog(ring_records=4, drain_interval=0.01)
    _kill_drain(lg)
    finished, exc = _run_bounded(lambda: [lg.log_encrypt("a", "s", 0, i) for i in range(10)])
    assert finished, "emitter hung after the drain thread died"
    assert isinstance(exc, AuditError) and "drain thread died" in str(exc) and "ring take exploded" in str(exc)
    assert not lg._drain.alive()
    with pytest.raises(AuditError, match="ring take exploded"):   # every later emit names the cause
        lg.log_encrypt("a", "s", 0, 0)


def test_flush_and_queries_fail_instead_of_hanging_when_the_drain_dies():
    lg = KVAuditLog(ring_records=64, drain_interval=0.01)
    lg.log_encrypt("a", "s", 0, 0)
    lg.flush()
    _kill_drain(lg)
    lg.log_encrypt("a", "s", 0, 1)
    for call in (lg.flush, lambda: len(lg), lg.entries):
        finished, exc = _run_bounded(call)
        assert finished and isinstance(exc, AuditError) and "ring take exploded" in str(exc)
    finished, exc = _run_bounded(lg.close)
    assert finished


def test_drain_death_wakes_an_emitter_already_waiting():
    lg = KVAuditLog(ring_records=4, drain_interval=0.01)
    gate = threading.Event()

    def take():
        gate.wait(5)               # hold the drain until the emitter is parked on the full ring
        raise _Boom("late failure")
    lg._ring.take = take
    out = {}

    def emit():
        try:
            for i in range(10):
                lg.log_encrypt("a", "s", 0, i)
        except AuditError as e:
            out["exc"] = e
    th = threading.Thread(target=emit, daemon=True)
    th.start()
    for _ in range(500):
        if lg.stats()["stalls"]:
            break
        gate.wait(0.01)
    assert lg.stats()["stalls"] >= 1     # the emitter waits for ring room
    gate.set()
    th.join(5)
    assert not th.is_alive(), "waiting emitter was not woken when the drain thread died"
    assert "late failure" in str(out["exc"])


@pytest.mark.parametrize("kwargs, exc", [
    (dict(drain_interval="x"), TypeError), (dict(drain_interval=0), ValueError),
    (dict(drain_interval=-1.0), ValueError), (dict(drain_interval=float("nan")), ValueError),
    (dict(drain_interval=True), TypeError),
    (dict(ring_records=0), ValueError), (dict(ring_records=2.5), TypeError), (dict(ring_records="4"), TypeError),
    (dict(max_entries=0), ValueError), (dict(max_entries=None), TypeError),
    (dict(checkpoint_records=0), ValueError), (dict(checkpoint_records=1.0), TypeError),
    (dict(frame_records=-3), ValueError), (dict(frame_records=True), TypeError),
])
def test_constructor_rejects_bad_sizes_and_intervals(kwargs, exc):
    with pytest.raises(exc):
        KVAuditLog(**kwargs)


def test_constructor_accepts_numpy_ints_and_int_interval():
    lg = KVAuditLog(ring_records=np.int64(8), max_entries=np.uint32(100), drain_interval=1)
    lg.log_encrypt("a", "s", 0, 0)
    assert len(lg) == 1
    lg.close()


def test_entries_rejects_non_integer_position_layer_and_non_bool_success(log):
    log.log_encrypt("alice", "s1", 3, 7)
    for bad in (dict(position=1.5), dict(position="7"), dict(position=True), dict(success="yes"),
                dict(success=1), dict(layer_idx=3.0)):
        with pytest.raises(TypeError):
            log.entries(**bad)
    assert len(log.entries(position=np.int64(7), success=True, layer_idx=3)) == 1
    assert log.entries(success=False) == []


@pytest.mark.parametrize("bad", [
    dict(tenant_id="al\ud800ice"), dict(tenant_id="t" * 70_000), dict(session_id="s\udfff"),
    dict(details="why\ud800"), dict(tenant_id=b"alice")])
def test_a_string_the_file_cannot_hold_is_refused_at_the_call_and_the_log_goes_on(tmp_path, bad):
    from pqc_kv_cache.audit import verify_log
    p = tmp_path / "a.log"
    lg = KVAuditLog(path=p, clock=Clock(), fsync=False)
    lg.log_encrypt("alice", "s1", 0, 0)
    kw = dict(dict(tenant_id="bob", session_id="b1", details=None), **bad)
    with pytest.raises((ValueError, TypeError)):
        lg.log_encrypt(kw["tenant_id"], kw["session_id"], 0, 1, details=kw["details"])
    lg.log_encrypt("carol", "c1", 0, 2)
    lg.flush()
    lg.close()
    rep = verify_log(p)
    assert rep.ok and rep.closed and rep.records == 2
    assert sorted(rep.tenants.values()) == ["alice", "carol"]


def test_emit_per_position_of_a_huge_range_uses_memory_bounded_by_the_ring():
    import tracemalloc
    with KVAuditLog(clock=Clock(), ring_records=1024, max_entries=1024) as lg:
        lg.emit(Op.ENCRYPT, tenant_idx=0, session_idx=0)          # warm up: ring and store blocks exist
        lg.flush()
        tracemalloc.start()
        try:
            first = lg.emit_per_position(Op.ENCRYPT, tenant_idx=0, session_idx=0, pos_start=7,
                                         pos_count=3_000_000, nbytes=3_000_001)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        lg.flush()
        es = lg.entries(limit=2)
        assert first == 1 and lg.stats()["drained"] == 3_000_001
    assert peak < 4_000_000, peak                 # expanding at once takes 4 bytes x 3 M positions, and more
    assert [(e.position, e.nbytes) for e in es] == [(3_000_006, 1), (3_000_005, 1)]


def test_since_beyond_any_timestamp_matches_nothing_and_nan_is_refused(log):
    log.log_encrypt("a", "s", 0, 0)
    for since in (float("inf"), 2 ** 70, dt.datetime.max, dt.datetime.max.replace(tzinfo=dt.timezone.utc)):
        assert log.entries(since=since) == []
    assert len(log.entries(since=float("-inf"))) == 1 and len(log.entries(since=-(2 ** 70))) == 1
    with pytest.raises(ValueError):
        log.entries(since=float("nan"))


def test_integer_fields_take_numpy_integers_and_refuse_bools(log):
    t = log.tenant_index("a")
    assert log.emit(Op.ENCRYPT, tenant_idx=np.uint32(t), session_idx=np.int64(0), layer=np.int16(3)) == 0
    assert log.log_encrypt("a", "s", layer_idx=np.int64(0), position=np.uint32(5)) == 1
    for kw in (dict(layer=True), dict(pos_start=False), dict(tenant_idx=np.bool_(True))):
        with pytest.raises(TypeError):
            log.emit(Op.ENCRYPT, **dict(dict(tenant_idx=t, session_idx=0), **kw))
    with pytest.raises(TypeError):
        log.log_encrypt("a", "s", layer_idx=True)
    assert len(log) == 2


def test_emit_records_writes_prepared_batches_with_their_own_ops_and_numbers_them(log):
    from pqc_kv_cache.audit.fields import VALUE_FIELDS, build_records
    t = log.tenant_index("a")
    s = log.session_index("s", "a")
    values = dict(zip(VALUE_FIELDS, (t, s, 3, np.arange(4), 10, 1, np.arange(50, 54), 2, 64, 0, 0)))
    batch = build_records(int(Op.ENCRYPT), tuple(values[f] for f in VALUE_FIELDS))
    batch["op"][2] = int(Op.READ)
    batch["record_no"] = 999         # ignored: the log numbers records itself
    batch["flags"] = 7                # ignored
    assert log.emit(Op.CROP, tenant_idx=t, session_idx=s) == 0
    assert log.emit_records(batch) == 1
    batch["pos_start"] = 11           # the log copied the batch: reusing it changes nothing emitted
    assert log.emit_records(batch[:0]) == 5
    assert log.emit_records(batch) == 5
    es = list(reversed(log.entries(limit=None)))
    assert [e.operation for e in es[1:5]] == ["encrypt", "encrypt", "read", "encrypt"]
    assert [e.row for e in es[1:5]] == [0, 1, 2, 3]
    assert [e.sequence_number for e in es[1:5]] == [50, 51, 52, 53]
    assert {e.position for e in es[1:5]} == {10} and {e.position for e in es[5:9]} == {11}
    assert {e.layer_idx for e in es[1:]} == {3} and {e.epoch for e in es[1:]} == {2}


def test_emit_records_refuses_other_arrays_and_unknown_ops(log):
    from pqc_kv_cache.audit.records import RECORD_DTYPE
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        log.emit_records([1, 2, 3])
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        log.emit_records(np.zeros(3, dtype=np.uint64))
    with pytest.raises(TypeError, match="1-D"):
        log.emit_records(np.zeros((2, 2), dtype=RECORD_DTYPE))
    bad = np.zeros(3, dtype=RECORD_DTYPE)
    bad["op"] = [1, 200, 2]
    with pytest.raises(ValueError, match="unknown audit operation code 200"):
        log.emit_records(bad)
    assert log.emit(Op.CROP, tenant_idx=0, session_idx=0) == 0     # nothing was numbered for the refused batches


def test_set_field_refuses_values_a_record_cannot_hold_instead_of_truncating():
    from pqc_kv_cache.audit.fields import set_field
    from pqc_kv_cache.audit.records import RECORD_DTYPE
    batch = np.zeros(2, dtype=RECORD_DTYPE)
    set_field(batch, "pos_start", np.array([5, (1 << 32) - 1], dtype=np.int64))
    with pytest.raises(ValueError, match="pos_start holds 4294967296"):
        set_field(batch, "pos_start", np.array([5, 1 << 32], dtype=np.int64))
    with pytest.raises(ValueError, match="row holds -1"):
        set_field(batch, "row", np.array([-1, 0]))
    with pytest.raises(ValueError, match="layer=65536"):
        set_field(batch, "layer", 65536)
    with pytest.raises(TypeError, match="2 values"):
        set_field(batch, "nonce_counter", np.arange(3))
    set_field(batch, "nonce_counter", np.array([1 << 63, 2], dtype=np.uint64))
    assert batch["nonce_counter"].tolist() == [1 << 63, 2]
