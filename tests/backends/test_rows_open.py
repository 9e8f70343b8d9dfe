"""The prepared read (``CryptoBackend.rows_open`` / ``open_rows``): what a cache's every read of a layer calls.

On the CPU twin of the CUDA backend (its own host code, launches run by the host shim) the prepared path
(``backends/cuda_open.py``) must give the plaintext, statuses and records ``decrypt_chunks`` gives for the
same table (a tampered chunk zeroed and raised by ``check``), refuse what it refuses, follow the key store
when schedules are zeroed, and make one upload per call. The base class's read (every other backend) is
``decrypt_chunks`` over the same table; a cache on the twin reads what a cache on the host backend reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.devices import has_cuda
from support.twin import CpuTwinBackend, TwinLog

from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot, RowsOpen
from pqc_kv_cache.envelope import session_tag, tenant_tag
from pqc_kv_cache.errors import DecryptionError

pytestmark = pytest.mark.skipif(not kernel_shim.available(), reason="no C++ compiler for the host shim")

LAYOUT = ChunkLayout(layer_idx=5, num_heads=2, head_dim=64, dtype=torch.bfloat16)
BPP = LAYOUT.bytes_per_position
BATCH = 3
ROWS = np.arange(BATCH, dtype=np.int64)
KEY_IDX = np.array([0, 1, 1], dtype=np.int64)
COUNTS = [300, 1, 1, 4, 1]          # a prefill long enough to be cut into work items, then decode steps

_FIELDS = ("operation", "tenant_id", "session_id", "layer_idx", "position", "position_count", "row",
           "sequence_number", "epoch", "nbytes", "status")


class Owner:
    """Whose check raises a read's failures."""


def _keys():
    g = np.random.default_rng(5)
    return [KeySlot(key=g.bytes(32), tenant_tag=tenant_tag(f"t{i}"), session_tag=session_tag(f"s{i}"), epoch=3 + i)
            for i in range(2)]


def _ctx(log):
    return AuditContext(log, np.array([log.tenant_index("t0"), log.tenant_index("t1")], np.uint32),
                        np.array([log.session_index("s0", "t0"), log.session_index("s1", "t1")], np.uint32))


def _records(log):
    assert log.flush(timeout=10)
    return [tuple(e.to_dict()[f] for f in _FIELDS) for e in reversed(log.entries(limit=None))]


def _store(keys):
    """An arena holding segments COUNTS (one chunk per row each, sealed by encrypt_chunks) and what they hold:
    (arena, start, count, counter [S, R], offset [S, R], K, V)."""
    total = sum(COUNTS)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(BATCH, 2, total, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(BATCH, 2, total, 64, generator=g).to(torch.bfloat16)
    arena = torch.zeros(BATCH * (total * BPP + 16 * len(COUNTS)) + 32, dtype=torch.uint8)
    start = np.cumsum([0] + COUNTS[:-1]).astype(np.int64)
    count = np.array(COUNTS, dtype=np.int64)
    counter = np.array([[100 + 10 * s + r for r in range(BATCH)] for s in range(len(COUNTS))], dtype=np.int64)
    offset = np.zeros_like(counter)
    at = 16
    sealer = CpuTwinBackend()
    for s, c in enumerate(COUNTS):
        size = c * BPP + 16
        offset[s] = at + size * ROWS
        at += size * BATCH
        n = np.full(BATCH, 1, dtype=np.int64)
        sealer.encrypt_chunks(keys, LAYOUT, ChunkTable(KEY_IDX, ROWS, n * start[s], n * c, n * start[s], counter[s],
                                                       offset[s]), k, v, arena)
    return arena, start, count, counter, offset, k, v


def _out(seq):
    """K / V views laid out as a cache's scratch lays them out (K and V of a row side by side)."""
    x = torch.full((BATCH, 2, 2, seq, 64), 7.0).to(torch.bfloat16)
    return x[:, 0], x[:, 1]


def _calls(start, count, counter, offset):
    """The reads of a growing layer (a decode step each), then one from the second segment on (a window)."""
    out = [(start[:i], count[:i], counter[:i], offset[:i], 0) for i in range(1, len(COUNTS) + 1)]
    out.append((start[1:], count[1:], counter[1:], offset[1:], int(start[1])))
    return out


def _key_idx(s):
    return np.broadcast_to(KEY_IDX, (s, BATCH))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("tamper", [False, True])
def test_the_prepared_read_gives_the_plaintext_status_and_records_of_decrypt_chunks(tamper, per_row):
    keys = _keys()
    arena, start, count, counter, offset, k_all, v_all = _store(keys)
    if tamper:          # segment 1 (one position), row 2
        arena[int(offset[1, 2]) + 5] ^= 1
    got = {}
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        log = TwinLog()
        owner = Owner()
        try:
            read = be.rows_open(LAYOUT, ROWS, arena, owner)
            ctx = _ctx(log)
            outs = []
            for i, (st, ct, ctr, off, base) in enumerate(_calls(start, count, counter, offset)):
                seq = int(st[-1] + ct[-1]) - base
                k_out, v_out = _out(seq)
                args = (keys, KEY_IDX if per_row else _key_idx(st.shape[0]), ctx, st, ct, ctr, off, base, k_out, v_out)
                uploads = be.twin_device.uploads
                status = read(*args) if path == "prepared" else CryptoBackend.open_rows(be, read, *args)
                if path == "prepared" and i:        # (the first call uploads the key set too)
                    assert be.twin_device.uploads - uploads == 1       # one packed upload per call
                outs.append((k_out.clone(), v_out.clone(), status.device.clone()))
            if path == "prepared":
                assert read.state is not None
            failures = None
            try:
                be.check(owner)
            except DecryptionError as e:
                failures = str(e)
            got[path] = (outs, _records(log), failures)
        finally:
            log.close()
    (a_outs, a_rec, a_fail), (b_outs, b_rec, b_fail) = got["prepared"], got["general"]
    for (ka, va, sa), (kb, vb, sb) in zip(a_outs, b_outs, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb) and torch.equal(sa, sb)
    assert a_rec == b_rec and a_fail == b_fail
    assert [r[0] for r in a_rec].count("decrypt") >= BATCH * len(a_outs)
    calls = _calls(start, count, counter, offset)
    for (k_out, v_out, status), (st, ct, ctr, off, base) in zip(a_outs, calls, strict=True):
        seq = int(st[-1] + ct[-1]) - base
        want_k, want_v = k_all[:, :, base:base + seq].clone(), v_all[:, :, base:base + seq].clone()
        want = np.zeros((st.shape[0], BATCH), dtype=np.uint8)
        if tamper and 300 in st.tolist():         # segment 1 is read: its row 2 fails and is zeroed
            want[st.tolist().index(300), 2] = 1
            want_k[2, :, 300 - base] = 0
            want_v[2, :, 300 - base] = 0
        assert status.view(-1, BATCH).numpy().tolist() == want.tolist()
        assert torch.equal(k_out, want_k) and torch.equal(v_out, want_v)
    if tamper:
        assert a_fail is not None and "positions 300..300" in a_fail
        assert any(r[0] == "decrypt" and r[-1] != 0 for r in a_rec)
    else:
        assert a_fail is None and {r[-1] for r in a_rec} == {0}


def _bad_calls(start, count, counter, offset, arena):
    s = slice(0, 3)

    def mod(col, fn):
        c = {"start": start[s].copy(), "count": count[s].copy(), "counter": counter[s].copy(),
             "offset": offset[s].copy(), "key_idx": np.array(_key_idx(3)), "base": 0, "seq": 302, "dtype": None,
             "batch": BATCH}
        fn(c)
        return c

    return {
        "negative counter": mod("counter", lambda c: c["counter"].__setitem__((1, 0), -1)),
        "offset past the arena": mod("offset", lambda c: c["offset"].__setitem__((2, 2), arena.numel() - 20)),
        "offset far past the arena": mod("offset", lambda c: c["offset"].__setitem__((0, 0), 1 << 62)),
        "negative offset": mod("offset", lambda c: c["offset"].__setitem__((1, 1), -16)),
        "key index out of range": mod("key_idx", lambda c: c["key_idx"].__setitem__((0, 1), 2)),
        "negative key index": mod("key_idx", lambda c: c["key_idx"].__setitem__((2, 0), -1)),
        "base past a segment's start": mod("base", lambda c: c.__setitem__("base", 1)),
        "output too short": mod("seq", lambda c: c.__setitem__("seq", 301)),
        "empty segment": mod("count", lambda c: c["count"].__setitem__(2, 0)),
        "negative start": mod("start", lambda c: c["start"].__setitem__(0, -1)),
        "wrong dtype": mod("dtype", lambda c: c.__setitem__("dtype", torch.float32)),
        "too few rows in the output": mod("batch", lambda c: c.__setitem__("batch", BATCH - 1)),
    }


@pytest.mark.parametrize("name", list(_bad_calls(*[np.zeros((5, 3), np.int64)] * 4, torch.zeros(1))))
def test_a_prepared_read_refuses_what_decrypt_chunks_refuses(name):
    keys = _keys()
    arena, start, count, counter, offset, _, _ = _store(keys)
    c = _bad_calls(start, count, counter, offset, arena)[name]
    errors = []
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        read = be.rows_open(LAYOUT, ROWS, arena, Owner())
        if path == "prepared":          # prepared by a good call first
            read(keys, _key_idx(3), None, start[:3], count[:3], counter[:3], offset[:3], 0, *_out(302))
            assert read.state is not None
        k_out, v_out = _out(c["seq"])
        if c["dtype"] is not None:
            k_out, v_out = k_out.to(c["dtype"]), v_out.to(c["dtype"])
        k_out, v_out = k_out[:c["batch"]], v_out[:c["batch"]]
        launches = len(be.launches)
        args = (keys, c["key_idx"], None, c["start"], c["count"], c["counter"], c["offset"], c["base"], k_out, v_out)
        with pytest.raises((ValueError, TypeError)) as e:
            read(*args) if path == "prepared" else CryptoBackend.open_rows(be, read, *args)
        assert len(be.launches) == launches
        errors.append((type(e.value), str(e.value)))
        if path == "prepared":          # and the read still works afterwards
            k_out, v_out = _out(302)
            status = read(keys, _key_idx(3), None, start[:3], count[:3], counter[:3], offset[:3], 0, k_out, v_out)
            assert not status.device.any()
    assert errors[0] == errors[1]


def test_a_prepared_read_follows_key_schedules_the_store_has_zeroed():
    """forget_keys() zeroes the device schedules a prepared record points at: the next call must prepare again,
    or it would open under zeroed round keys (every tag failing)."""
    keys = _keys()
    arena, start, count, counter, offset, k_all, _ = _store(keys)
    be = CpuTwinBackend()
    owner = Owner()
    read = be.rows_open(LAYOUT, ROWS, arena, owner)
    read(keys, _key_idx(2), None, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))
    be.forget_keys()
    k_out, v_out = _out(302)
    status = read(keys, _key_idx(3), None, start[:3], count[:3], counter[:3], offset[:3], 0, k_out, v_out)
    assert not status.device.any()
    be.check(owner)
    assert torch.equal(k_out, k_all[:, :, :302])


def test_a_read_with_rotated_keys_opens_each_segment_under_its_own_key():
    """Segments sealed under different key slots (a rotation in view): the key index varies by segment."""
    keys = _keys()
    arena, start, count, counter, offset, k_all, _ = _store(keys)
    be = CpuTwinBackend()
    read = be.rows_open(LAYOUT, ROWS, arena, Owner())
    key_idx = np.array(_key_idx(3))
    key_idx[1] = [1, 0, 0]          # not the keys segment 1 was sealed under: its chunks fail
    k_out, v_out = _out(302)
    status = read(keys, key_idx, None, start[:3], count[:3], counter[:3], offset[:3], 0, k_out, v_out)
    assert status.device.view(3, BATCH).tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert not k_out[:, :, 300].any() and torch.equal(k_out[:, :, :300], k_all[:, :, :300])


def test_a_backend_registered_without_deriving_reads_rows_through_decrypt_chunks():
    class Registered:
        def __init__(self):
            self.calls = []

        def decrypt_chunks(self, keys, layout, chunks, arena, k, v, audit=None, *, owner=None):
            self.calls.append((chunks, owner))

    CryptoBackend.register(Registered)
    be = Registered()
    owner = Owner()
    arena = torch.zeros(1)
    read = RowsOpen(be, LAYOUT, ROWS, arena, owner)
    counter = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    read(_keys(), _key_idx(2), None, np.array([0, 4]), np.array([4, 1]), counter, counter * 100, 0, *_out(5))
    read(_keys(), KEY_IDX, None, np.array([0, 4]), np.array([4, 1]), counter, counter * 100, 0, *_out(5))
    (t, who), (t1, _) = be.calls
    assert all(np.array_equal(getattr(t, f), getattr(t1, f)) for f in ChunkTable.fields())
    assert who is owner
    assert t.row.tolist() == [0, 1, 2] * 2 and t.slot.tolist() == [0, 1, 1] * 2
    assert t.pos_start.tolist() == [0] * 3 + [4] * 3 and t.pos_count.tolist() == [4] * 3 + [1] * 3
    assert t.io_start.tolist() == t.pos_start.tolist() and t.counter.tolist() == list(range(1, 7))
    assert t.offset.tolist() == [100 * i for i in range(1, 7)]


def test_a_sealed_cache_on_the_twin_reads_what_it_reads_on_the_host_and_fails_closed():
    """The cache's read through the prepared path, merges included: the same K/V and records as the host
    backend; a tampered chunk is zeroed in the returned views and raised at check()."""
    from pqc_kv_cache.audit import KVAuditLog
    from pqc_kv_cache.backends.host import HostBackend
    from pqc_kv_cache.cache import EncryptedCache
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    from support.cache_models import tiny_model

    fields = ("operation", "tenant_id", "layer_idx", "position", "position_count", "row", "epoch", "nbytes",
              "status")

    def entries(log):
        assert log.flush(timeout=10)
        return sorted(tuple(e.to_dict()[f] for f in fields) for e in log.entries(limit=None))

    got = {}
    for name, backend, log in (("host", HostBackend(threads=1), KVAuditLog()), ("twin", CpuTwinBackend(), TwinLog())):
        who = [establish_tenant_session(TenantIdentity(t), ttl_seconds=3600) for t in ("alice", "bob")]
        try:
            cache = EncryptedCache(tiny_model("llama").config, sessions=who, backend=backend, audit=log,
                                   mode="sealed", merge_min_segments=3)
            outs = []
            g = torch.Generator().manual_seed(1)
            for n in [5] + [1] * 9:
                kv = (torch.randn(2, 2, n, 16, generator=g), torch.randn(2, 2, n, 16, generator=g))
                k, v = cache.update(*kv, 0)
                outs.append((k.clone(), v.clone()))
            cache.check()
            before = entries(log)
            layer = cache.layers[0]
            s0 = int(layer.table.start[-1])
            s1 = s0 + int(layer.table.count[-1])
            layer.ciphertext[int(layer.table.offset[-1, 1]) + 3] ^= 1      # the last segment, row 1
            kv = (torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g))
            if name == "twin":      # the device path: the step returns, the failed chunk zeroed; check() raises
                k, v = cache.update(*kv, 0)
                assert not k[1, :, s0:s1].any() and not v[1, :, s0:s1].any()
                assert torch.equal(k[0, :, :-1], outs[-1][0][0]) and torch.equal(k[1, :, :s0], outs[-1][0][1, :, :s0])
                with pytest.raises(DecryptionError):
                    cache.check()
            else:                   # the host backend raises at the update itself
                with pytest.raises(DecryptionError):
                    cache.update(*kv, 0)
            got[name] = (outs, before, entries(log))
            cache.close()
        finally:
            log.close()
    for (ka, va), (kb, vb) in zip(got["twin"][0], got["host"][0], strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert got["twin"][1] == got["host"][1]
    for name in ("twin", "host"):
        assert any(r[0] == "decrypt" and r[-1] != 0 for r in got[name][2])


@pytest.mark.parametrize("slots, nr, bpp", [(4, 3, 512), (528, 8, 4096), (100, 2, 64), (8, 1, 4096), (528, 3, 512)])
def test_the_segment_plan_gives_the_work_items_of_the_general_plan(slots, nr, bpp):
    """Decode steps, merged tails, a moving window and arbitrary tables: the items ``work_items`` gives."""
    import random

    from pqc_kv_cache.backends import kernel_abi
    from pqc_kv_cache.backends.cuda_open import SegmentPlan

    rng = random.Random(slots * 31 + nr)
    plan = SegmentPlan(slots, nr, bpp)
    counts = [rng.choice([1, 5, 300, 4096, 2000])]
    for _ in range(200):
        op = rng.random()
        if op < 0.6:
            counts.append(rng.choice([1, 1, 1, 2, 7]))
        elif op < 0.8 and len(counts) > 2:
            j = rng.randrange(1, len(counts))
            counts = counts[:j] + [sum(counts[j:])]
        elif op < 0.9 and len(counts) > 1:
            counts = counts[1:]
        else:
            counts = [rng.randrange(1, 5000) for _ in range(rng.randrange(1, 30))]
        pc = np.repeat(np.array(counts, dtype=np.int64), nr)
        want = kernel_abi.work_items(kernel_abi.chunk_rounds(pc * bpp), pc, slots=slots)
        assert np.array_equal(plan.items(counts), want), counts
        assert np.array_equal(plan.items(list(counts)), want)       # the next layer of the same step


def test_a_key_list_changed_in_place_is_checked_again():
    """The read keeps what it checked of a key list; the same list object holding another key must not open
    under the schedules of the old one (nor skip the check of a bad key)."""
    keys = _keys()
    arena, start, count, counter, offset, k_all, _ = _store(keys)
    be = CpuTwinBackend()
    owner = Owner()
    read = be.rows_open(LAYOUT, ROWS, arena, owner)
    held = list(keys)
    read(held, _key_idx(2), None, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))
    held[1] = KeySlot(key=bytes(32), tenant_tag=keys[1].tenant_tag, session_tag=keys[1].session_tag,
                      epoch=keys[1].epoch)      # not the key rows 1 and 2 were sealed under
    status = read(held, _key_idx(2), None, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))
    assert status.device.view(2, BATCH).tolist() == [[0, 1, 1], [0, 1, 1]]
    with pytest.raises(DecryptionError):
        be.check(owner)
    held[1] = KeySlot(key=b"short", tenant_tag=keys[1].tenant_tag, session_tag=keys[1].session_tag, epoch=4)
    with pytest.raises(ValueError):
        read(held, _key_idx(2), None, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))


def test_more_rows_than_one_launch_records_take_the_general_path():
    """A ring whose quarter holds fewer DECRYPT row records than the read has rows: the general path (row
    groups of several launches) serves the read, with its records."""
    keys = _keys()
    arena, start, count, counter, offset, k_all, _ = _store(keys)
    got = []
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        log = TwinLog(ring_capacity=8)          # a quarter: 2 records per launch, 3 rows
        try:
            read = be.rows_open(LAYOUT, ROWS, arena, Owner())
            k_out, v_out = _out(302)
            args = (keys, KEY_IDX, _ctx(log), start[:3], count[:3], counter[:3], offset[:3], 0, k_out, v_out)
            status = read(*args) if path == "prepared" else CryptoBackend.open_rows(be, read, *args)
            assert read.state is None and not status.device.any()
            assert torch.equal(k_out, k_all[:, :, :302])
            got.append(_records(log))
        finally:
            log.close()
    assert got[0] == got[1] and len(got[0]) == BATCH


def test_a_read_under_graph_capture_is_refused_before_anything_is_enqueued(monkeypatch):
    """As decrypt_chunks: refused first, before a key set is prepared (no key upload, no launch captured)."""
    from pqc_kv_cache.errors import BackendUnavailableError

    keys = _keys()
    arena, start, count, counter, offset, _, _ = _store(keys)
    be = CpuTwinBackend()
    read = be.rows_open(LAYOUT, ROWS, arena, Owner())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    uploads, launches = be.twin_device.uploads, len(be.launches)
    with pytest.raises(BackendUnavailableError, match="graph"):
        read(keys, KEY_IDX, None, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))
    assert be.twin_device.uploads == uploads and len(be.launches) == launches
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    k_out, v_out = _out(301)
    assert not read(keys, KEY_IDX, None, start[:2], count[:2], counter[:2], offset[:2], 0, k_out, v_out).device.any()


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")
def test_on_a_gpu_the_prepared_read_gives_the_plaintext_without_a_host_sync():
    """Unverified here (no GPU on the machine it was written on): the prepared read on a real device against
    what was sealed, audited, its calls after the first (which prepares) made under sync-debug 'error'."""
    from pqc_kv_cache.audit import KVAuditLog
    from pqc_kv_cache.backends.cuda import CudaBackend
    dev = torch.device("cuda", torch.cuda.current_device())
    be = CudaBackend.for_device(dev)
    keys = _keys()
    arena, start, count, counter, offset, k_all, v_all = _store(keys)
    arena = arena.to(dev)
    owner = Owner()
    log = KVAuditLog()
    try:
        ctx = _ctx(log)
        read = be.rows_open(LAYOUT, ROWS, arena, owner)
        calls = _calls(start, count, counter, offset)
        outs = []
        for i, (st, ct, ctr, off, base) in enumerate(calls):
            k_out, v_out = (t.to(dev) for t in _out(int(st[-1] + ct[-1]) - base))
            if i == 1:
                torch.cuda.synchronize(dev)
                torch.cuda.set_sync_debug_mode("error")
            try:
                read(keys, _key_idx(len(st)), ctx, st, ct, ctr, off, base, k_out, v_out)
            finally:
                if i == len(calls) - 1:
                    torch.cuda.set_sync_debug_mode("default")
            outs.append((base, k_out, v_out))
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(dev)
        be.check(owner)
        for (st, ct, _, _, _), (base, k_out, v_out) in zip(calls, outs, strict=True):
            end = int(st[-1] + ct[-1])
            assert torch.equal(k_out.cpu(), k_all[:, :, base:end]) and torch.equal(v_out.cpu(), v_all[:, :, base:end])
        decrypts = [r for r in _records(log) if r[0] == "decrypt"]
        assert len(decrypts) == len(calls) * BATCH and all(r[-1] == 0 for r in decrypts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        log.close()


def test_a_failed_launch_leaves_stand_ins_naming_each_row_s_tenant(monkeypatch):
    """A prepared read whose launch fails leaves ERROR records in its reserved slots, each naming its row's
    tenant, session, layer and row (they named the first key's tenant and no row)."""
    keys = _keys()
    arena, start, count, counter, offset, _, _ = _store(keys)
    be = CpuTwinBackend()
    log = TwinLog()
    try:
        ctx = _ctx(log)
        read = be.rows_open(LAYOUT, ROWS, arena, Owner())
        read(keys, KEY_IDX, ctx, start[:2], count[:2], counter[:2], offset[:2], 0, *_out(301))   # prepared

        def fail(*a, **k):
            raise RuntimeError("launch failed")
        monkeypatch.setattr(be, "_launch", fail)
        with pytest.raises(RuntimeError, match="launch failed"):
            read(keys, KEY_IDX, ctx, start[:3], count[:3], counter[:3], offset[:3], 0, *_out(302))
        got = _records(log)[BATCH:]
        assert [(r[0], r[1], r[2], r[3], r[6], r[-1]) for r in got] == [
            ("decrypt", "t0", "s0", 5, 0, 3), ("decrypt", "t1", "s1", 5, 1, 3), ("decrypt", "t1", "s1", 5, 2, 3)]
    finally:
        log.close()
