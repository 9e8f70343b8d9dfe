"""The prepared row seal (``CryptoBackend.rows_seal`` / ``seal_rows``): what a cache's every update calls.

On the CPU twin of the CUDA backend (its own host code, launches run by the host shim) the prepared path
(``backends/cuda_rows.py``) must give the bytes and records ``encrypt_chunks`` gives for the same table,
refuse what it refuses, follow the key store when schedules are zeroed, and make one upload and one launch
per call. The base class's seal (every other backend) is ``encrypt_chunks`` over the same table."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from support.devices import has_cuda
from support.twin import CpuTwinBackend, TwinLog

from pqc_kv_cache.audit import KVAuditLog

from pqc_kv_cache.audit.fields import build_records
from pqc_kv_cache.audit.records import Op, Status
from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, CryptoBackend, KeySlot, RowRecords, RowsSeal
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag

pytestmark = pytest.mark.skipif(not kernel_shim.available(), reason="no C++ compiler for the host shim")

LAYOUT = ChunkLayout(layer_idx=5, num_heads=2, head_dim=64, dtype=torch.bfloat16)
BATCH = 3
SIZE = LAYOUT.bytes_per_position + 16          # one position per chunk


def _keys():
    g = np.random.default_rng(11)
    return [KeySlot(key=g.bytes(32), tenant_tag=tenant_tag(f"t{i}"), session_tag=session_tag(f"s{i}"), epoch=1 + i)
            for i in range(2)]


def _kv(seed, n=1, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, n, 64, generator=g).to(torch.bfloat16),
            torch.randn(batch, 2, n, 64, generator=g).to(torch.bfloat16))


def _ctx(log):
    return AuditContext(log, np.array([log.tenant_index("t0"), log.tenant_index("t1")], np.uint32),
                        np.array([log.session_index("s0", "t0"), log.session_index("s1", "t1")], np.uint32))


KEY_IDX = np.array([0, 1, 1], dtype=np.int64)
ROWS = np.arange(BATCH, dtype=np.int64)


def _steps(n=1):
    """(pos_start, counters, offset, k, v) of four calls: new tensors, counters and places each time."""
    return [(40 + 7 * i, np.array([10 + i, 20 + i, 30 + i], dtype=np.int64), 3 * SIZE * i + 16 * i,
             *_kv(i, n)) for i in range(4)]


class _Audited:
    """A twin backend's prepared seal over a fresh arena, audited into a TwinLog (the ``audited`` fixture)."""

    def __init__(self):
        self.be = CpuTwinBackend()
        self.log = TwinLog()
        self.ctx = _ctx(self.log)
        self.arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
        self.seal = self.be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, self.arena, self.ctx)

    def prepare(self):
        """Seal the first of ``_steps()`` (the call that prepares); the other steps."""
        steps = _steps()
        self.seal(steps[0][0], 1, steps[0][1], steps[0][2], SIZE, *steps[0][3:])
        return steps[1:]


@pytest.fixture
def audited():
    a = _Audited()
    try:
        yield a
    finally:
        a.log.close()


_FIELDS = ("operation", "tenant_id", "session_id", "layer_idx", "position", "position_count", "row",
           "sequence_number", "epoch", "nbytes", "status")


def _records(log):
    """The log's records, oldest first, without their numbers and time stamps."""
    assert log.flush(timeout=10)
    return [tuple(e.to_dict()[f] for f in _FIELDS) for e in reversed(log.entries(limit=None))]


def test_the_prepared_seal_gives_the_bytes_and_records_of_encrypt_chunks():
    keys = _keys()
    out = {}
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        log = TwinLog()
        try:
            arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
            seal = be.rows_seal(keys, LAYOUT, KEY_IDX, ROWS, arena, _ctx(log))
            for pos, ctr, off, k, v in _steps():
                if path == "prepared":
                    seal(pos, 1, ctr, off, SIZE, k, v)
                else:
                    CryptoBackend.seal_rows(be, seal, pos, 1, ctr, off, SIZE, k, v)
            out[path] = (arena.clone(), _records(log))
        finally:
            log.close()
    assert torch.equal(out["prepared"][0], out["general"][0])
    a, b = out["prepared"][1], out["general"][1]
    assert a == b and len(a) == 4 * BATCH
    assert {r[0] for r in a} == {"encrypt"} and {r[-1] for r in a} == {int(Status.OK)}
    assert [r[4] for r in a] == [pos for pos, *_ in _steps() for _ in range(BATCH)]
    assert [r[7] for r in a] == [int(c) for _, ctr, *_ in _steps() for c in ctr]
    # and the bytes open with plain AES-GCM under the nonce and AAD the call named
    arena = out["prepared"][0].numpy()
    for pos, ctr, off, k, v in _steps():
        for i in range(BATCH):
            key = keys[KEY_IDX[i]]
            ct = arena[off + i * SIZE: off + (i + 1) * SIZE].tobytes()
            aad = build_aad(tenant_id=f"t{KEY_IDX[i]}", session_id=f"s{KEY_IDX[i]}", epoch=key.epoch, layer_idx=5,
                            position=pos, position_count=1, key_len=LAYOUT.bytes_per_position // 2,
                            dtype="bfloat16", num_heads=2, head_dim=64)
            plain = (k[i].contiguous().view(torch.uint8).numpy().tobytes()
                     + v[i].contiguous().view(torch.uint8).numpy().tobytes())
            assert AESGCM(key.key).decrypt(make_nonce(key.epoch, int(ctr[i])), ct, aad) == plain


def test_a_decode_step_is_one_upload_and_one_launch():
    be = CpuTwinBackend()
    arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
    seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)
    steps = _steps()
    seal(steps[0][0], 1, steps[0][1], steps[0][2], SIZE, *steps[0][3:])
    uploads, launches = be.twin_device.uploads, len(be.launches)
    for pos, ctr, off, k, v in steps[1:]:
        seal(pos, 1, ctr, off, SIZE, k, v)
    assert be.twin_device.uploads - uploads == 3
    assert [kname for kname, _, _ in be.launches[launches:]] == ["pqc_encrypt_chunks"] * 3


@pytest.mark.parametrize("bad, message", [
    (dict(counter=np.array([1, -1, 2], dtype=np.int64)), "negative"),
    (dict(offset=4 * 3 * SIZE), "out of range of the arena"),
    (dict(pos=-1), "negative"),
    (dict(k=_kv(9)[0].float()), "dtype"),
    (dict(k=_kv(9, batch=2)[0]), "out of range of k"),
    (dict(k=_kv(9)[0].transpose(2, 3)), "shape|contiguous|must be"),
])
def test_a_prepared_seal_refuses_what_encrypt_chunks_refuses(bad, message):
    be = CpuTwinBackend()
    arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
    seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)
    pos, ctr, off, k, v = _steps()[0]
    seal(pos, 1, ctr, off, SIZE, k, v)          # prepared
    before = arena.clone()
    launches = len(be.launches)
    args = dict(pos=pos, counter=ctr, offset=off, k=k, v=v)
    args.update(bad)
    if "k" in bad and bad["k"].shape != k.shape:
        args["v"] = bad["k"].clone()
    with pytest.raises(ValueError, match=message):
        seal(args["pos"], 1, args["counter"], args["offset"], SIZE, args["k"], args["v"])
    assert len(be.launches) == launches and torch.equal(arena, before)
    seal(pos, 1, ctr, off, SIZE, k, v)          # and the seal still works afterwards
    assert torch.equal(arena, before)


def test_a_prepared_seal_follows_key_schedules_the_store_has_zeroed():
    """forget_keys() zeroes the device schedules a prepared record points at: the next call must prepare
    again (with a record naming the schedules made anew), or it would seal under zeroed round keys."""
    keys = _keys()
    be = CpuTwinBackend()
    arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
    seal = be.rows_seal(keys, LAYOUT, KEY_IDX, ROWS, arena)
    steps = _steps()
    seal(steps[0][0], 1, steps[0][1], steps[0][2], SIZE, *steps[0][3:])
    be.forget_keys()
    pos, ctr, off, k, v = steps[1]
    seal(pos, 1, ctr, off, SIZE, k, v)
    ref = torch.zeros_like(arena)
    CryptoBackend.seal_rows(CpuTwinBackend(), RowsSeal(None, keys, LAYOUT, KEY_IDX, ROWS, ref, None),
                            pos, 1, ctr, off, SIZE, k, v)
    assert torch.equal(arena[off:off + 3 * SIZE], ref[off:off + 3 * SIZE])


def test_a_prefill_sized_seal_takes_the_general_path_with_the_same_bytes():
    """Chunks long enough to be cut into work items are not prepared: the general path seals them."""
    keys = _keys()
    n = 600
    size = n * LAYOUT.bytes_per_position + 16
    arenas = []
    for path in ("seal", "general"):
        be = CpuTwinBackend()
        arena = torch.zeros(3 * size, dtype=torch.uint8)
        seal = be.rows_seal(keys, LAYOUT, KEY_IDX, ROWS, arena)
        k, v = _kv(3, n)
        ctr = np.array([1, 2, 3], dtype=np.int64)
        if path == "seal":
            seal(0, n, ctr, 0, size, k, v)
            assert seal.state is not None and seal.state.tpl is None      # not prepared: split launch
        else:
            CryptoBackend.seal_rows(be, seal, 0, n, ctr, 0, size, k, v)
        arenas.append(arena)
    assert torch.equal(*arenas)


def test_a_backend_registered_without_deriving_seals_rows_through_encrypt_chunks():
    class Registered:
        def __init__(self):
            self.calls = []

        def encrypt_chunks(self, keys, layout, chunks, k, v, arena, audit=None):
            self.calls.append(chunks)

    CryptoBackend.register(Registered)
    be = Registered()
    arena = torch.zeros(1)
    seal = RowsSeal(be, _keys(), LAYOUT, KEY_IDX, ROWS, arena, None)
    seal(7, 1, np.array([4, 5, 6], dtype=np.int64), 100, SIZE, *_kv(1))
    (t,) = be.calls
    assert t.pos_start.tolist() == [7, 7, 7] and t.counter.tolist() == [4, 5, 6]
    assert t.offset.tolist() == [100, 100 + SIZE, 100 + 2 * SIZE] and t.slot.tolist() == [0, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")
def test_on_a_gpu_the_prepared_seal_gives_the_host_shim_s_bytes_without_a_host_sync():
    """Unverified here (no GPU on the machine it was written on): the prepared path on a real device, its
    calls after the first (which prepares) made under sync-debug 'error'."""
    from pqc_kv_cache.backends.cuda import CudaBackend
    dev = torch.device("cuda", torch.cuda.current_device())
    be = CudaBackend.for_device(dev)
    keys = _keys()
    log = KVAuditLog()
    try:
        arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8, device=dev)
        seal = be.rows_seal(keys, LAYOUT, KEY_IDX, ROWS, arena, _ctx(log))
        steps = [(pos, ctr, off, k.to(dev), v.to(dev)) for pos, ctr, off, k, v in _steps()]
        seal(steps[0][0], 1, steps[0][1], steps[0][2], SIZE, *steps[0][3:])
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i, (pos, ctr, off, k, v) in enumerate(steps[1:]):
                if i == 1:      # the launch writes each row's READ record after its ENCRYPT records
                    seal(pos, 1, ctr, off, SIZE, k, v, row_records=_reads(pos - 8))
                else:
                    seal(pos, 1, ctr, off, SIZE, k, v)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(dev)
        ref = torch.zeros(arena.shape, dtype=torch.uint8)
        for pos, ctr, off, k, v in steps:
            kernel_shim.encrypt_chunks(keys, LAYOUT, RowsSeal(None, keys, LAYOUT, KEY_IDX, ROWS, ref, None).table(
                pos, 1, ctr, off, SIZE), k.cpu(), v.cpu(), ref)
        assert torch.equal(arena.cpu(), ref)
        got = _records(log)
        assert sum(1 for r in got if r[0] == "encrypt") == 4 * BATCH
        pos = steps[2][0]
        assert [(r[1], r[2], r[3], r[4], r[5], r[6], r[9], r[10]) for r in got if r[0] == "read"] == [
            (f"t{KEY_IDX[i]}", f"s{KEY_IDX[i]}", 5, pos - 8, 9, i, 9 * LAYOUT.bytes_per_position, int(Status.OK))
            for i in range(BATCH)]
    finally:
        log.close()


def test_a_capture_is_refused_before_anything_is_prepared(monkeypatch):
    from pqc_kv_cache.errors import BackendUnavailableError
    be = CpuTwinBackend()
    arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
    seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)
    pos, ctr, off, k, v = _steps()[0]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(BackendUnavailableError, match="capture"):
        seal(pos, 1, ctr, off, SIZE, k, v)
    assert be.launches == [] and be.twin_device.uploads == 0 and seal.state is None


def _failing_launch(be, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("launch failed")
    monkeypatch.setattr(be, "_launch", fail)


def test_a_failed_launch_leaves_error_stand_ins_that_keep_the_caller_records_fields(audited, monkeypatch):
    steps = audited.prepare()
    ctx = audited.ctx
    reads = build_records(int(Op.READ), (ctx.tenant_idx[KEY_IDX], ctx.session_idx[KEY_IDX], 5, ROWS, 0, 9, 0,
                                         0, 9 * LAYOUT.bytes_per_position, 0, 0))
    _failing_launch(audited.be, monkeypatch)
    pos, ctr, off, k, v = steps[0]
    with pytest.raises(RuntimeError, match="launch failed"):
        audited.seal(pos, 1, ctr, off, SIZE, k, v, reads)
    got = _records(audited.log)[BATCH:]
    assert [(r[0], r[-1]) for r in got] == [("encrypt", int(Status.ERROR))] * BATCH + \
        [("read", int(Status.ERROR))] * BATCH
    assert [r[1] for r in got[BATCH:]] == ["t0", "t1", "t1"] and [r[6] for r in got[BATCH:]] == [0, 1, 2]
    # the seal's own stand-ins name each row's tenant, session, layer and row (not the first key's)
    assert [(r[1], r[2], r[3], r[6]) for r in got[:BATCH]] == [("t0", "s0", 5, 0), ("t1", "s1", 5, 1),
                                                                ("t1", "s1", 5, 2)]


def test_a_seal_does_not_keep_its_arena_alive_and_refuses_once_it_is_gone():
    import gc
    import weakref
    be = CpuTwinBackend()
    arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
    seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)
    pos, ctr, off, k, v = _steps()[0]
    seal(pos, 1, ctr, off, SIZE, k, v)
    gone = weakref.ref(arena)
    del arena
    gc.collect()
    assert gone() is None
    with pytest.raises(ValueError, match="arena .* is gone"):
        seal(pos, 1, ctr, off, SIZE, k, v)


def _seal_both(call):
    """``call(seal)`` on the prepared path (a first call prepared it) and on the general path (the base class's
    seal_rows): (outcome, records after the first call, whether the arena is unchanged) of each."""
    out = {}
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        log = TwinLog()
        try:
            arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
            seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena, _ctx(log))
            pos, ctr, off, k, v = _steps()[0]
            seal(pos, 1, ctr, off, SIZE, k, v)
            before = arena.clone()
            try:
                call(seal if path == "prepared" else functools.partial(CryptoBackend.seal_rows, be, seal))
                outcome = "sealed"
            except Exception as e:      # noqa: BLE001 - compared between the paths
                outcome = type(e).__name__
            out[path] = (outcome, _records(log)[BATCH:], torch.equal(arena, before))
        finally:
            log.close()
    return out


@pytest.mark.parametrize("case", ["position past int64", "strided records", "2-D counters"])
def test_values_the_prepared_checks_do_not_take_go_the_general_way(case):
    """A position past int64 is refused before any record is reserved (it failed in the struct pack, with
    ERROR records of a call that never ran); strided caller records and [n, 1] counters are sealed as the
    general path seals them (they raised)."""
    pos, ctr, off, k, v = _steps()[1]
    reads = np.zeros(2 * BATCH, dtype=build_records(int(Op.READ), (0,) * 11).dtype)
    reads["op"] = int(Op.READ)
    reads["row"] = np.repeat(ROWS, 2)
    calls = {"position past int64": lambda seal: seal(1 << 63, 1, ctr, off, SIZE, k, v),
             "strided records": lambda seal: seal(pos, 1, ctr, off, SIZE, k, v, reads[::2]),
             "2-D counters": lambda seal: seal(pos, 1, ctr.reshape(-1, 1), off, SIZE, k, v)}
    got = _seal_both(calls[case])
    assert got["prepared"] == got["general"]
    outcome, records, unchanged = got["prepared"]
    if case == "position past int64":
        assert outcome != "sealed" and records == [] and unchanged
    else:
        assert outcome == "sealed" and not unchanged
        assert [r[0] for r in records] == ["encrypt"] * BATCH + (["read"] * BATCH if case == "strided records" else [])


@pytest.mark.parametrize("bad", ["not an array", "unknown operation"])
def test_the_base_seal_refuses_bad_records_before_it_seals(bad):
    """Every backend's seal (the base class's: encrypt_chunks, then the records): records it cannot write
    are refused before anything is sealed (the arena was written, the nonces used and ENCRYPT recorded)."""
    from pqc_kv_cache.backends.host import HostBackend
    log = KVAuditLog()
    try:
        arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
        seal = HostBackend(threads=1).rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena, _ctx(log))
        pos, ctr, off, k, v = _steps()[0]
        records = [1, 2, 3]
        if bad == "unknown operation":
            records = build_records(int(Op.READ), (0,) * 11)
            records["op"] = 250
        with pytest.raises((TypeError, ValueError)):
            seal(pos, 1, ctr, off, SIZE, k, v, records)
        assert not arena.any() and _records(log) == []
    finally:
        log.close()


# ---- row records: one record per row described, written by the seal's own launch ------------------------
def _reads(pos, count=9):
    return RowRecords(int(Op.READ), pos, count, count * LAYOUT.bytes_per_position)


def test_row_records_are_written_by_the_launch_as_the_host_path_writes_them():
    keys = _keys()
    out = {}
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        log = TwinLog()
        try:
            arena = torch.zeros(4 * 3 * SIZE + 64, dtype=torch.uint8)
            seal = be.rows_seal(keys, LAYOUT, KEY_IDX, ROWS, arena, _ctx(log))
            for i, (pos, ctr, off, k, v) in enumerate(_steps()):
                spec = _reads(pos - 9 + 1 + i, 9 + i)
                if path == "prepared":
                    uploads = be.twin_device.uploads
                    seal(pos, 1, ctr, off, SIZE, k, v, row_records=spec)
                    if i:       # prepared: one upload (the region) and one launch; no record built or copied
                        assert be.twin_device.uploads - uploads == 1
                else:
                    CryptoBackend.seal_rows(be, seal, pos, 1, ctr, off, SIZE, k, v, None, spec)
            out[path] = (arena.clone(), _records(log))
        finally:
            log.close()
    assert torch.equal(out["prepared"][0], out["general"][0])
    a, b = out["prepared"][1], out["general"][1]
    assert a == b and len(a) == 4 * 2 * BATCH
    for i, (pos, *_) in enumerate(_steps()):
        step = a[2 * BATCH * i:2 * BATCH * (i + 1)]
        assert [r[0] for r in step] == ["encrypt"] * BATCH + ["read"] * BATCH
        reads = step[BATCH:]
        assert [(r[1], r[2], r[3], r[6]) for r in reads] == [("t0", "s0", 5, 0), ("t1", "s1", 5, 1),
                                                              ("t1", "s1", 5, 2)]
        assert {(r[4], r[5], r[7], r[8], r[9], r[10]) for r in reads} == {
            (pos - 8 + i, 9 + i, 0, 0, (9 + i) * LAYOUT.bytes_per_position, int(Status.OK))}


@pytest.mark.parametrize("spec", [RowRecords(250, 0, 1, 1), RowRecords(int(Op.READ), -1, 1, 1),
                                  RowRecords(int(Op.READ), 0, 1 << 32, 1), RowRecords(int(Op.READ), 0, 1, -1)])
def test_row_records_a_record_cannot_hold_are_refused_before_anything_is_sealed(audited, spec):
    steps = audited.prepare()
    before = audited.arena.clone()
    pos, ctr, off, k, v = steps[0]
    with pytest.raises(ValueError, match="row records"):
        audited.seal(pos, 1, ctr, off, SIZE, k, v, row_records=spec)
    assert torch.equal(audited.arena, before) and len(_records(audited.log)) == BATCH


def test_row_records_count_their_bytes_up_to_what_the_field_holds(audited):
    for pos, ctr, off, k, v in _steps()[:2]:
        audited.seal(pos, 1, ctr, off, SIZE, k, v, row_records=RowRecords(int(Op.READ), 0, 1 << 20, 1 << 40))
    reads = [r for r in _records(audited.log) if r[0] == "read"]
    assert len(reads) == 2 * BATCH and {r[9] for r in reads} == {0xFFFFFFFF}


def test_a_failed_launch_leaves_error_stand_ins_for_the_row_records(audited, monkeypatch):
    steps = audited.prepare()
    _failing_launch(audited.be, monkeypatch)
    pos, ctr, off, k, v = steps[0]
    with pytest.raises(RuntimeError, match="launch failed"):
        audited.seal(pos, 1, ctr, off, SIZE, k, v, row_records=_reads(3))
    got = _records(audited.log)[BATCH:]
    assert [(r[0], r[-1]) for r in got] == [("encrypt", int(Status.ERROR))] * BATCH + \
        [("read", int(Status.ERROR))] * BATCH
    assert [(r[1], r[2], r[3], r[4], r[5], r[6]) for r in got[BATCH:]] == [
        ("t0", "s0", 5, 3, 9, 0), ("t1", "s1", 5, 3, 9, 1), ("t1", "s1", 5, 3, 9, 2)]


def test_row_records_and_records_together_are_refused(audited):
    pos, ctr, off, k, v = _steps()[0]
    reads = audited.seal.row_records(_reads(0)).copy()
    with pytest.raises(TypeError, match="not both"):
        audited.seal(pos, 1, ctr, off, SIZE, k, v, reads, row_records=_reads(0))
