"""The CUDA backend's static open (backends/cuda_static_open.py) on the CPU twin of the CUDA backend, against
the host open of cache/static_sealer.py over the native backend: the same plaintext, slot tables, records,
record head and failure record, in the usual case and in every fail-closed one (a tampered chunk, a slot that
does not hold its position, no room for the records, a closed session, a retired key).

The twin runs CudaBackend's own host code, the torch operations of the open on CPU tensors, and each kernel
launch through the host shim: what a GPU runs is not shown here."""

from __future__ import annotations

import pytest
import torch

from pqc_kv_cache.audit.records import Op, Status
from pqc_kv_cache.backends import kernel_shim, native
from pqc_kv_cache.cache.static_state import FailReason
from tests.cache.test_static_cuda_seal_twin import _pair
from tests.cache.test_static_native_seal import BATCH, SEQ, SLOTS, records, same

pytestmark = [pytest.mark.skipif(not native.available(), reason="the native backend does not build here"),
              pytest.mark.skipif(not kernel_shim.available(), reason="the kernel host shim does not build here")]


def _open(t, end, ring=False, layer=1):
    t.sealer.open(layer, t.k, t.v, torch.tensor(end, dtype=torch.int64), t.arena, t.meta, t.released, t.records,
                  t.head, t.failures, ring)


def _same(want, got):
    same(want, got)
    assert torch.equal(want.k, got.k) and torch.equal(want.v, got.v), "the plaintext differs"


def _sealed_then_zeroed(want, got, positions, ring=False):
    """Seal ``positions`` (one call each after the first five) in both, keep the plaintext, zero it."""
    for t in (want, got):
        t.seal(positions[:5], io=[p % SEQ for p in positions[:5]], ring=ring)
        for p in positions[5:]:
            t.seal([p], io=[p % SEQ], ring=ring)
    kept = got.k.clone(), got.v.clone()
    for t in (want, got):
        t.k.zero_()
        t.v.zero_()
    return kept


def _decrypt_launches(twin) -> int:
    return sum(1 for k, _, _ in twin.launches if k == "pqc_decrypt_chunks")


def test_an_open_matches_the_host_open_and_gives_back_the_plaintext():
    _, want, got, twin = _pair()
    k, v = _sealed_then_zeroed(want, got, list(range(8)))
    for t in (want, got):
        _open(t, 8)
    _same(want, got)
    assert torch.equal(got.k[:, :, :8], k[:, :, :8]) and torch.equal(got.v[:, :, :8], v[:, :, :8])
    assert _decrypt_launches(twin) == 1 and int(got.failures[0]) == 0
    r = records(got)
    dec = r[r["op"] == Op.DECRYPT]
    assert dec.size == BATCH and (dec["pos_count"] == 8).all() and (dec["status"] == Status.OK).all()


def test_an_open_of_fewer_positions_than_written_opens_only_those():
    _, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(8)))
    for t in (want, got):
        _open(t, 5)
        _open(t, 0)                   # nothing held: nothing opened, nothing recorded
    _same(want, got)
    assert not got.k[:, :, 5:].any()


def test_a_ring_that_wrapped_opens_its_last_slots_as_the_host_does():
    _, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(SLOTS + 4)), ring=True)
    for t in (want, got):
        _open(t, SLOTS + 4, ring=True)
    _same(want, got)
    assert int(got.failures[0]) == 0 and got.k[:, :, :SLOTS].any()


def test_a_tampered_chunk_fails_alone_zeroed_and_recorded_as_the_host_does():
    _, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        t.arena[1, 3, 5] ^= 1
        _open(t, 6)
    _same(want, got)
    f = got.failures.tolist()
    assert f[0] == 1 and f[2:5] == [1, 3, FailReason.AUTH_FAILED]
    assert not got.k[1, :, 3].any() and got.k[1, :, 2].any() and got.k[0, :, 3].any()
    r = records(got)
    dec = r[r["op"] == Op.DECRYPT]
    assert [int(x) for x in dec["status"]] == [0, Status.AUTH_FAILED, 0, Status.AUTH_FAILED]
    assert int(dec[-1]["row"]) == 1 and int(dec[-1]["pos_start"]) == 3


def test_a_slot_that_does_not_hold_its_position_is_refused_and_its_plaintext_zeroed_as_the_host_does():
    _, want, got, _ = _pair()
    k, v = _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        t.k.copy_(k)                      # plaintext still there: what is not opened must be zeroed
        t.v.copy_(v)
        t.meta[2, 4] = 0
        t.meta[0, 1, 2] = 9               # holds another position
        _open(t, 6)
    _same(want, got)
    assert int(got.failures[0]) == 2 and FailReason(int(got.failures[4])) == FailReason.NOT_SEALED
    assert not got.k[2, :, 4].any() and not got.v[0, :, 1].any() and got.k[2, :, 3].any()


def test_no_room_for_the_records_refuses_every_position_and_writes_none():
    _, want, got, _ = _pair(capacity=2 * BATCH * 6 + 2 * BATCH - 1)
    _sealed_then_zeroed(want, got, list(range(6)))     # 6 ENCRYPT + 2 READ per row written
    for t in (want, got):
        _open(t, 6)
    _same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.RECORDS_FULL and int(got.failures[0]) == BATCH * 6
    assert not got.k.any()


def test_a_closed_session_and_a_retired_key_are_refused_as_the_host_does():
    sess, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(4)))
    sess[0].rotate_key()
    sess[0].retire_epoch(0)
    for t in (want, got):
        t.sealer.forget_keys(0, 0)
        _open(t, 4)
    _same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.KEY_UNAVAILABLE and int(got.failures[0]) == 4
    assert not got.k[0].any() and got.k[1].any()
    sess[1].close()
    for t in (want, got):
        t.failures.zero_()
        t.k.zero_()
        t.v.zero_()
        _open(t, 4)
    _same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.KEY_UNAVAILABLE and int(got.failures[0]) == 3 * 4
    r = records(got)
    late = r[r["op"] == Op.DECRYPT][-2 * 4:]          # rows 1, 2: bob's, every position refused
    assert (late["status"] == Status.REFUSED).all()


def test_without_audit_nothing_is_recorded():
    _, want, got, _ = _pair(audit=False)
    _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        t.arena[2, 0, 0] ^= 1
        _open(t, 6)
    _same(want, got)
    assert got.head.tolist() == [0, 0] and int(got.failures[0]) == 1


def test_an_open_reads_no_tensor_value_on_the_host(monkeypatch):
    """After a first open (which sets up the device state), an open neither turns a tensor into a Python value
    nor copies one to the host: every decision is a device operation."""
    _, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        _open(t, 6)
        t.k.zero_()
        t.arena[1, 2, 0] ^= 1
    end = torch.tensor(6, dtype=torch.int64)
    for name in ("item", "tolist", "numpy", "cpu", "__int__", "__bool__", "__index__", "__float__"):
        def refuse(*a, _name=name, **k):
            raise AssertionError(f"Tensor.{_name} called during an open")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    # nor copies Python data to the device (a tensor made from host values is a copy the stream waits for)
    for name in ("as_tensor", "tensor", "from_numpy"):
        def refuse_host_data(*a, _name=name, **k):
            raise AssertionError(f"torch.{_name} called during an open")
        monkeypatch.setattr(torch, name, refuse_host_data)
    got.sealer.open(1, got.k, got.v, end, got.arena, got.meta, got.released, got.records, got.head, got.failures,
                    False)
    monkeypatch.undo()
    _open(want, 6)
    _same(want, got)


def test_new_tensors_during_a_capture_are_refused(monkeypatch):
    from pqc_kv_cache.errors import BackendUnavailableError

    _, want, got, _ = _pair()
    _sealed_then_zeroed(want, got, list(range(4)))
    _open(got, 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _open(got, 4)                              # the same tensors: nothing to set up, runs
    got.k = got.k.clone()                      # new plaintext buffers: a new parameter record, refused
    with pytest.raises(BackendUnavailableError, match="capture"):
        _open(got, 4)


def test_arguments_that_do_not_fit_are_refused_before_anything_moves():
    _, want, got, twin = _pair()
    _sealed_then_zeroed(want, got, list(range(4)))
    before = got.state()
    end = torch.tensor(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="end"):
        got.sealer.open(1, got.k, got.v, end.view(1), got.arena, got.meta, got.released, got.records, got.head,
                        got.failures, False)
    with pytest.raises(ValueError, match="meta"):
        got.sealer.open(1, got.k, got.v, end, got.arena, got.meta[:, :2].clone(), got.released, got.records,
                        got.head, got.failures, False)
    for bad in (got.released[:2].clone(), got.released.to(torch.int32), got.released.view(1, -1)):
        with pytest.raises(ValueError, match="released"):
            got.sealer.open(1, got.k, got.v, end, got.arena, got.meta, bad, got.records, got.head, got.failures,
                            False)
    after = got.state()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert _decrypt_launches(twin) == 0


def test_an_open_of_some_rows_opens_and_records_only_those_as_the_host_does():
    """The released-row mask: row 1 is not opened (its plaintext is left as it is, even over a tampered chunk),
    not recorded and not counted for the record buffer's room; rows 0 and 2 open as the host opens them."""
    _, want, got, twin = _pair()
    k, v = _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        t.k[1].copy_(k[1] + 1)            # row 1 holds plaintext the open must not touch
        t.v[1].copy_(v[1] + 1)
        t.arena[1, 2, 0] ^= 1             # and a tampered chunk the open must not read
        t.released.copy_(torch.tensor([1, 0, 1]))
        _open(t, 6)
    _same(want, got)
    assert torch.equal(got.k[1], k[1] + 1) and torch.equal(got.v[1], v[1] + 1)
    assert torch.equal(got.k[0, :, :6], k[0, :, :6]) and torch.equal(got.k[2, :, :6], k[2, :, :6])
    assert int(got.failures[0]) == 0 and _decrypt_launches(twin) == 1
    r = records(got)
    dec = r[r["op"] == Op.DECRYPT]
    assert [int(x) for x in dec["row"]] == [0, 2] and (dec["status"] == Status.OK).all()
    assert dec["record_no"].tolist() == r["record_no"][-2:].tolist() == [r.size - 2, r.size - 1]
    for t in (want, got):
        t.released.zero_()                # no row: nothing opened, nothing recorded
        t.k.zero_()
        _open(t, 6)
    _same(want, got)
    assert not got.k.any() and records(got).size == r.size


def test_the_room_for_the_records_counts_only_the_rows_opened():
    # 6 ENCRYPT + 2 READ per row written, then room for one row's open (2 records per position), not for two
    _, want, got, _ = _pair(capacity=BATCH * 6 + 2 * BATCH + 2 * 6)
    k, _ = _sealed_then_zeroed(want, got, list(range(6)))
    for t in (want, got):
        t.released.copy_(torch.tensor([0, 0, 1]))
        _open(t, 6)
    _same(want, got)
    assert int(got.failures[0]) == 0 and torch.equal(got.k[2, :, :6], k[2, :, :6]) and not got.k[:2].any()
    for t in (want, got):
        t.released.copy_(torch.tensor([1, 1, 0]))
        _open(t, 6)
    _same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.RECORDS_FULL and int(got.failures[0]) == 2 * 6
