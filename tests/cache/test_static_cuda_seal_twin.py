"""The CUDA backend's static seal (backends/cuda_static.py) on the CPU twin of the CUDA backend, against the
native one-call seal: the same arena bytes, slot table, nonce ranges, records, record head and failure record,
step by step, in the usual case and in every fail-closed one; and a generate through the twin.

The twin runs CudaBackend's own host code with each kernel launch carried out by the host shim, and the
torch operations of the seal on CPU tensors: what a GPU runs is not shown here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit.records import Op, Status
from pqc_kv_cache.backends import kernel_shim, native
from pqc_kv_cache.cache.static_state import FailReason
from tests.cache.test_static_native_seal import BATCH, SEQ, SLOTS, Twin, records, same
from tests.support.cache_models import sessions as make_sessions
from tests.support.twin import CpuTwinBackend

pytestmark = [pytest.mark.skipif(not native.available(), reason="the native backend does not build here"),
              pytest.mark.skipif(not kernel_shim.available(), reason="the kernel host shim does not build here")]


def _pair(capacity=256, audit=True, end=100, order=0):
    sess = make_sessions("alice", "bob")
    want = Twin(sess, native.NativeBackend(), audit=audit, capacity=capacity)
    twin = CpuTwinBackend(order=order)
    got = Twin(sess, twin, audit=audit, capacity=capacity)
    for t in (want, got):
        t.end[:] = end
    return sess, want, got, twin


def _encrypt_launches(twin: CpuTwinBackend) -> int:
    return sum(1 for k, _, _ in twin.launches if k == "pqc_encrypt_chunks")


def test_prefill_and_decode_match_the_native_seal_with_one_launch_per_step():
    _, want, got, twin = _pair()
    for t in (want, got):
        t.seal([0, 1, 2, 3, 4])
        for p in range(5, 9):
            t.seal([p])
    same(want, got)
    assert _encrypt_launches(twin) == 5
    r = records(got)
    assert (r["op"] == Op.ENCRYPT).sum() == BATCH * 9 and (r["op"] == Op.READ).sum() == BATCH * 5
    assert (r["status"] == Status.OK).all() and np.array_equal(r["record_no"], np.arange(r.size))
    assert got.next.tolist() == [9, 18]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_a_ring_matches_including_a_call_longer_than_the_slots(order):
    """Positions of one call that share a slot: only the last is sealed into it (whatever order the device
    runs the chunks in), and every one takes its counter and records as in the native seal."""
    _, want, got, _ = _pair(order=order)
    for t in (want, got):
        t.seal(list(range(0, SEQ)), ring=True)            # more positions than slots: the last of each slot wins
        for p in range(SEQ, SEQ + 4):
            t.seal([p], io=[p % SEQ], ring=True)
    same(want, got)
    assert sorted((got.meta[0, :, 2] - 1).tolist()) == list(range(SEQ + 4 - SLOTS, SEQ + 4))


def test_positions_outside_the_cache_match():
    _, want, got, _ = _pair()
    for t in (want, got):
        t.seal([0, 1, 2])
        t.seal([SLOTS, -1, 3], io=[3, 3, 3])
        t.seal([4], io=[SEQ])
    same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.OUT_OF_RANGE and int(got.failures[0]) == 3 * BATCH


def test_a_range_used_up_part_way_matches():
    _, want, got, _ = _pair()
    for t in (want, got):
        t.end[:] = torch.tensor([2, 3])
        t.seal([0, 1])
        t.seal([2])
    same(want, got)
    enc = records(got)
    enc = enc[enc["op"] == Op.ENCRYPT]
    assert (enc["status"] == Status.REFUSED).sum() == 1 + BATCH and (enc[enc["status"] != 0]["nonce_counter"] == 0).all()
    assert FailReason(int(got.failures[4])) == FailReason.NONCES_EXHAUSTED


def test_a_full_record_buffer_matches():
    _, want, got, _ = _pair(capacity=2 * (BATCH + BATCH))
    for t in (want, got):
        t.seal([0])
        t.seal([1])
        t.seal([SLOTS, 2], io=[2, 2])
    same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.RECORDS_FULL and int(got.head[0]) == 12


def test_a_closed_session_and_a_retired_key_match():
    sess, want, got, _ = _pair()
    for t in (want, got):
        t.seal([0])
        t.epoch[0] = 5
        t.seal([1])
    same(want, got)
    sess[1].close()
    for t in (want, got):
        t.failures.zero_()
        t.epoch[0] = 0
        t.seal([2])
    same(want, got)
    assert FailReason(int(got.failures[4])) == FailReason.SESSION_INVALID


def test_without_audit_nothing_is_recorded():
    _, want, got, _ = _pair(audit=False, end=50)
    for t in (want, got):
        t.seal([0, 1])
        t.seal([2])
    same(want, got)
    assert got.head.tolist() == [0, 0]


def test_a_step_reads_no_tensor_value_on_the_host(monkeypatch):
    """After the first step (which sets up the device state), a step neither turns a tensor into a Python
    value nor copies one to the host: every per-step decision is a device operation."""
    from pqc_kv_cache.backends.base import ChunkLayout

    sess, want, got, twin = _pair()
    layout = ChunkLayout(1, got.k.shape[1], got.k.shape[3], got.k.dtype)
    keys, row_key, reason = got.sealer._row_keys(got.epoch.numpy())
    rows = np.ascontiguousarray(np.array([0, 1, 1]), dtype=np.int64)
    slots = np.ascontiguousarray(np.stack([np.arange(2) + 7, np.arange(2) + 11], axis=1), dtype=np.int64)

    def step(t, backend, p):
        pos = torch.tensor([p], dtype=torch.int64)
        backend.seal_static(keys, layout, t.k, t.v, pos.clone(), pos, t.arena, t.meta, t.next, t.end, t.epoch,
                            t.records, t.head, t.failures, False, rows, row_key, reason, slots)

    nat = native.NativeBackend()
    step(want, nat, 0)
    step(got, twin, 0)
    positions = [torch.tensor([p], dtype=torch.int64) for p in (1, 2)]
    for name in ("item", "tolist", "numpy", "cpu", "__int__", "__bool__", "__index__", "__float__"):
        def refuse(*a, _name=name, **k):
            raise AssertionError(f"Tensor.{_name} called during a step")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("as_tensor", "tensor", "from_numpy"):     # nor copies Python data to the device
        def refuse_host_data(*a, _name=name, **k):
            raise AssertionError(f"torch.{_name} called during a step")
        monkeypatch.setattr(torch, name, refuse_host_data)
    pos_clones = [p.clone() for p in positions]
    for pos, pos_clone in zip(positions, pos_clones):
        twin.seal_static(keys, layout, got.k, got.v, pos_clone, pos, got.arena, got.meta, got.next, got.end,
                         got.epoch, got.records, got.head, got.failures, False, rows, row_key, reason, slots)
    monkeypatch.undo()
    for p in (1, 2):
        step(want, nat, p)
    same(want, got)


def test_new_tensors_during_a_capture_are_refused(monkeypatch):
    from pqc_kv_cache.errors import BackendUnavailableError

    _, _, got, twin = _pair()
    got.seal([0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    got.seal([1])                             # the same tensors: nothing to set up, runs
    got.arena = got.arena.clone()             # a new arena: a new parameter record, refused while capturing
    with pytest.raises(BackendUnavailableError, match="capture"):
        got.seal([2])
    monkeypatch.undo()
    got.seal([2])
    twin.forget_keys()                        # the key schedules dropped: preparing them again is refused
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    uploads = twin.twin_device.uploads
    with pytest.raises(BackendUnavailableError, match="key set"):
        got.seal([3])
    assert twin.twin_device.uploads == uploads


def test_every_row_refused_seals_nothing_and_matches():
    sess, want, got, twin = _pair()
    for t in (want, got):
        t.seal([0])
    for s in sess:
        s.close()
    for t in (want, got):
        t.seal([1, 2])
    same(want, got)
    assert int(got.failures[0]) == 2 * BATCH and (got.meta[:, 1:3] == 0).all()


def test_a_generate_through_the_twin_matches_static_cache_and_the_native_records():
    """A sliding-window model (ring slots too) generates through the CUDA backend's static seal on the twin:
    the tokens of StaticCache, one encrypt launch per layer step, and the records of the native backend."""
    from transformers import StaticCache

    from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
    from tests.support.cache_models import generate, prompts, tiny_model

    model, ids = tiny_model("mistral"), prompts(2, 7)
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=9, do_sample=False)
    entries = []
    for backend in (native.NativeBackend(), CpuTwinBackend(record=True)):
        log = KVAuditLog()
        cache = StaticEncryptedCache(model.config, sessions=make_sessions("alice", "bob"), max_cache_len=32,
                                     audit=log, backend=backend)
        got = generate(model, ids, cache, max_new_tokens=9, do_sample=False)
        cache.check()
        assert torch.equal(got, want)
        entries.append([(e.operation, e.layer_idx, e.row, e.position, e.position_count, e.sequence_number,
                         e.record_number, e.epoch, e.nbytes, e.status) for e in log.entries(limit=10_000)])
        log.close()
    layers = model.config.num_hidden_layers
    assert _encrypt_launches(backend) == layers * 9          # the prefill and 8 decode steps
    assert sum(e[0] == "encrypt" for e in entries[1]) == layers * 2 * (7 + 8) and entries[0] == entries[1]


def test_both_operators_have_a_cuda_implementation_that_calls_the_handler():
    import pqc_kv_cache.ops  # noqa: F401  (registers the operators)
    from pqc_kv_cache.ops import kv_seal

    for op in ("seal_positions", "open_positions"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pqc_kv_cache::{op}", "CUDA"), op
    assert not hasattr(kv_seal, "_open_cuda")          # no refusing CUDA open any more

    class _Handler:
        calls = []

        def open(self, *args):
            self.calls.append(args)

    h = _Handler()
    handle = kv_seal.register_handler(h)
    try:
        kv_seal._open(torch.tensor(handle), *range(11))
    finally:
        kv_seal.unregister_handler(handle)
    assert _Handler.calls == [tuple(range(11))]


class _DeviceSeal:
    """A backend that seals on 'another device': it records the keys' epochs it is given."""

    def __init__(self):
        self.epochs = []

    def seal_static(self, keys, *args):
        self.epochs.append([k.epoch for k in keys])

    def forget_keys(self):
        pass


def test_a_seal_on_another_device_takes_its_epochs_from_the_host_copy_not_the_device():
    from pqc_kv_cache.cache.static_sealer import StaticSealer

    sess = make_sessions("alice", "bob")
    sess[0].rotate_key()                      # epoch 1 for slot 0
    host = np.array([1, 0], dtype=np.int64)
    backend = _DeviceSeal()
    rows = np.array([0, 1, 1])
    sealer = StaticSealer(sess, rows, backend, None, None, host_epochs=lambda: host)
    m = torch.device("meta")                  # a device the host cannot read: any read of it raises
    k = torch.empty(3, 2, 4, 8, device=m)
    pos = torch.zeros(1, dtype=torch.int64, device=m)
    state = [torch.empty(3, 4, 40, dtype=torch.uint8, device=m), torch.empty(3, 4, 3, dtype=torch.int64, device=m)]
    ranges = [torch.empty(2, dtype=torch.int64, device=m) for _ in range(3)]
    tail = [torch.empty(0, 64, dtype=torch.uint8, device=m), torch.empty(2, dtype=torch.int64, device=m),
            torch.empty(6, dtype=torch.int64, device=m)]
    sealer.seal(0, k, k, pos, pos, *state, *ranges, *tail, False)
    assert backend.epochs == [[1, 0]]
    plain = StaticSealer(sess, rows, _DeviceSeal(), None, None)      # no host copy: refused, not read
    with pytest.raises(ValueError, match="host's copy"):
        plain.seal(0, k, k, pos, pos, *state, *ranges, *tail, False)


def test_refill_keeps_the_host_copy_of_the_epochs():
    from pqc_kv_cache.cache.static_state import NonceRanges

    sess = make_sessions("alice", "bob")
    ranges = NonceRanges(sess, torch.device("cpu"))
    ranges.refill(np.array([8, 8]))
    sess[1].rotate_key()
    ranges.refill(np.array([8, 8]))
    assert ranges.epoch_host.tolist() == ranges.epoch.tolist() == [0, 1]


def test_the_device_state_of_a_seal_lives_as_long_as_its_arena():
    import gc

    _, _, got, twin = _pair()
    got.seal([0])
    assert len(twin._static) == 1
    got.arena = got.arena.clone()
    got.seal([1])
    gc.collect()
    assert len(twin._static) == 1                 # the first arena's buffers went with it


def test_tensors_that_do_not_fit_are_refused_before_anything_moves():
    _, _, got, _ = _pair()
    got.seal([0])
    before = got.state()
    good_meta, good_records = got.meta, got.records
    got.meta = got.meta[:, :SLOTS - 1].clone()
    with pytest.raises(ValueError, match="meta"):
        got.seal([1])
    got.meta = good_meta
    got.records = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="records"):
        got.seal([1])
    got.records = good_records
    with pytest.raises(ValueError, match="io_index"):
        got.seal([1, 2], io=[1])
    after = got.state()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_record_head_outside_the_buffer_refuses_every_chunk_on_the_device():
    """Where the native seal raises ValueError (it reads the head on the host), the device cannot: it treats
    the head as leaving no room, refuses every chunk (RECORDS_FULL) and writes no record."""
    _, _, got, _ = _pair()
    got.seal([0])
    for bad in (-1, 10_000):
        got.head[0] = bad
        got.failures.zero_()
        got.seal([1])
        assert int(got.head[0]) == bad and FailReason(int(got.failures[4])) == FailReason.RECORDS_FULL
        assert (got.meta[:, 1] == 0).all() and (got.arena[:, 1] == 0).all()
