"""NativeBackend (ipsec-mb, one C call per contract call) against the host backend and plain AESGCM.

The contract tests run on both host backends (the host backend is the reference: a test that
fails on it is a wrong test); the rest check what only the native path does (every range checked
in C before a byte moves, key schedules erased). Skipped, with the reason, where the native
backend cannot be built (no C compiler or no ipsec-mb: ``apt-get install libipsec-mb-dev``).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends import native, native_lib
from pqc_kv_cache.backends import select_backend
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag
from pqc_kv_cache.errors import BackendUnavailableError

H, D = 3, 8


def _why_unavailable() -> str:
    try:
        native.load()
        return ""
    except BackendUnavailableError as exc:
        return str(exc).splitlines()[0]


_UNAVAILABLE = _why_unavailable()
needs_native = pytest.mark.skipif(bool(_UNAVAILABLE), reason=f"native backend unavailable: {_UNAVAILABLE}")


def make_backend(kind: str):
    if kind == "host":
        return HostBackend(threads=1)
    if _UNAVAILABLE:
        pytest.skip(f"native backend unavailable: {_UNAVAILABLE}")
    return native.NativeBackend()


@pytest.fixture(params=["host", "native"])
def kind(request):
    return request.param


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16])
def dtype(request):
    return request.param


def keyslot(tenant="t", session="s", epoch=0, key=None):
    return KeySlot(key or AESGCM.generate_key(256), tenant_tag(tenant), session_tag(session), epoch)


def table(rows, starts, counts, io=None, counters=None, bpp=None, slots=None, gap=0):
    rows, starts, counts = (np.asarray(x, dtype=np.int64) for x in (rows, starts, counts))
    io = starts if io is None else np.asarray(io, dtype=np.int64)
    counters = np.arange(1, rows.size + 1) if counters is None else np.asarray(counters, dtype=np.int64)
    slots = np.zeros(rows.size, np.int64) if slots is None else np.asarray(slots, dtype=np.int64)
    sizes = counts * bpp + 16 + gap
    offs = np.cumsum(sizes) - sizes
    return ChunkTable(slots, rows, starts, counts, io, counters, offs), int(sizes.sum())


def split_backend(threads=3):
    """A native backend that splits every call of two chunks or more over ``threads`` threads."""
    be = make_backend("native")
    be.threads, be.parallel_min_bytes = threads, 0
    return be


def sealed(kind, dtype, batch=2, seq=7, layer=3):
    be = make_backend(kind)
    layout = ChunkLayout(layer, H, D, dtype)
    ks = [keyslot()]
    k = torch.randn(batch, H, seq, D).to(dtype)
    v = torch.randn(batch, H, seq, D).to(dtype)
    # row 0: one 4-position chunk then three 1-position chunks; row 1: one 7-position chunk
    t, nbytes = table([0, 0, 0, 0, 1], [0, 4, 5, 6, 0], [4, 1, 1, 1, 7], bpp=layout.bytes_per_position)
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    be.encrypt_chunks(ks, layout, t, k, v, arena)
    return be, layout, ks, t, k, v, arena


def audit_ctx(audit, tenant="t", session="s"):
    return AuditContext(audit, np.array([audit.tenant_index(tenant)], np.uint32),
                        np.array([audit.session_index(session, tenant)], np.uint32))


def position_major(batch, seq, dtype, fill=7.0):
    buf = torch.full((batch, seq, 2, H, D), fill, dtype=dtype)
    return buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)


# ---------------------------------------------------------------- the contract, on both backends

def test_every_chunk_opens_with_plain_aesgcm_and_build_aad(kind, dtype):
    be, layout, ks, t, k, v, arena = sealed(kind, dtype)
    for i in range(len(t)):
        r, s, c = int(t.row[i]), int(t.pos_start[i]), int(t.pos_count[i])
        nb = c * layout.bytes_per_position
        aad = build_aad(tenant_id="t", session_id="s", epoch=0, layer_idx=3, position=s, position_count=c,
                        key_len=nb // 2, dtype=str(dtype)[6:], num_heads=H, head_dim=D)
        off = int(t.offset[i])
        plain = AESGCM(ks[0].key).decrypt(make_nonce(0, int(t.counter[i])),
                                          arena[off:off + nb + 16].numpy().tobytes(), aad)
        want = torch.stack((k[r, :, s:s + c], v[r, :, s:s + c])).contiguous().view(-1).view(torch.uint8)
        assert plain == want.numpy().tobytes()


@pytest.mark.parametrize("out_kind", ["position_major", "contiguous", "dim_strided"])
def test_decrypt_round_trips_into_every_output_layout(kind, dtype, out_kind):
    be, layout, ks, t, k, v, arena = sealed(kind, dtype)
    if out_kind == "position_major":
        k_out, v_out = position_major(2, 7, dtype)
    elif out_kind == "contiguous":
        k_out, v_out = torch.full_like(k, 7.0), torch.full_like(v, 7.0)
    else:   # head_dim not the innermost stride: [batch, heads, dim, seq] storage seen as [b, h, seq, dim]
        k_out = torch.full((2, H, D, 7), 7.0, dtype=dtype).transpose(2, 3)
        v_out = torch.full((2, H, D, 7), 7.0, dtype=dtype).transpose(2, 3)
    status = be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host
    assert status.tolist() == [0] * 5
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


@pytest.mark.parametrize("victim", [0, 2])   # a multi-position chunk, a one-position chunk
def test_tampered_chunk_fails_and_its_destination_is_zeroed(kind, victim):
    be, layout, ks, t, k, v, arena = sealed(kind, torch.float32)
    arena[int(t.offset[victim]) + 1] ^= 1
    k_out, v_out = position_major(2, 7, torch.float32)
    audit = KVAuditLog()
    status = be.decrypt_chunks(ks, layout, t, arena, k_out, v_out, audit_ctx(audit)).host
    assert status.tolist() == [int(i == victim) for i in range(5)]
    s, c = int(t.pos_start[victim]), int(t.pos_count[victim])
    assert not k_out[0, :, s:s + c].any() and not v_out[0, :, s:s + c].any()
    intact = [i for i in range(4) if i != victim]
    for i in intact:
        s2, c2 = int(t.pos_start[i]), int(t.pos_count[i])
        assert torch.equal(k_out[0, :, s2:s2 + c2], k[0, :, s2:s2 + c2])
    assert torch.equal(k_out[1], k[1])
    failed = audit.entries(limit=None, operation="decrypt", success=False)
    assert {(e.row, e.position, e.position_count) for e in failed} == {(0, 0, 7), (0, s, c)}
    ok = audit.entries(limit=None, operation="decrypt", success=True)
    assert [(e.row, e.position, e.position_count) for e in ok] == [(1, 0, 7)]
    audit.close()


def test_wrong_key_epoch_or_layer_fails_every_chunk(kind):
    be, layout, ks, t, k, v, arena = sealed(kind, torch.float32)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    other_epoch = [KeySlot(ks[0].key, ks[0].tenant_tag, ks[0].session_tag, 1)]
    assert be.decrypt_chunks(other_epoch, layout, t, arena, k_out, v_out).host.all()
    other_tenant = [KeySlot(ks[0].key, tenant_tag("u"), ks[0].session_tag, 0)]
    assert be.decrypt_chunks(other_tenant, layout, t, arena, k_out, v_out).host.all()
    other_layer = ChunkLayout(4, H, D, torch.float32)
    assert be.decrypt_chunks(ks, other_layer, t, arena, k_out, v_out).host.all()
    assert be.decrypt_chunks([keyslot()], layout, t, arena, k_out, v_out).host.all()
    assert not k_out.any() and not v_out.any()


def test_encrypt_emits_one_record_per_row_and_position(kind):
    be = make_backend(kind)
    layout = ChunkLayout(1, H, D, torch.float32)
    audit = KVAuditLog()
    t, nbytes = table([0, 1], [10, 10], [3, 3], io=[0, 0], counters=[5, 6], bpp=layout.bytes_per_position)
    be.encrypt_chunks([keyslot()], layout, t, torch.randn(2, H, 3, D), torch.randn(2, H, 3, D),
                      torch.zeros(nbytes, dtype=torch.uint8), audit_ctx(audit))
    recs = audit.entries(limit=None, operation="encrypt")
    assert sorted((e.row, e.position, e.sequence_number) for e in recs) == \
        [(0, 10, 5), (0, 11, 5), (0, 12, 5), (1, 10, 6), (1, 11, 6), (1, 12, 6)]
    assert all(e.layer_idx == 1 and e.tenant_id == "t" for e in recs)
    audit.close()


def test_bad_inputs_raise_clear_errors(kind):
    be, layout, ks, t, k, v, arena = sealed(kind, torch.float32)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    with pytest.raises(TypeError):
        be.decrypt_chunks(ks, layout, t, arena.float(), k_out, v_out)
    with pytest.raises(TypeError):
        be.decrypt_chunks(ks, layout, t, arena, k_out.double(), v_out.double())
    with pytest.raises(ValueError):
        be.decrypt_chunks(ks, layout, t, arena, k_out[:, :2], v_out[:, :2])
    with pytest.raises(ValueError, match="no key"):
        be.decrypt_chunks([], layout, t, arena, k_out, v_out)
    with pytest.raises(ValueError, match="arena"):
        be.decrypt_chunks(ks, layout, t, arena[:-1], k_out, v_out)
    short = ChunkTable(t.slot, t.row, t.pos_start, t.pos_count, t.io_start + 5, t.counter, t.offset)
    with pytest.raises(ValueError, match="past"):
        be.decrypt_chunks(ks, layout, short, arena, k_out, v_out)
    with pytest.raises(ValueError, match="32 bytes"):
        be.decrypt_chunks([KeySlot(b"x" * 16, b"t" * 16, b"s" * 16, 0)], layout, t, arena, k_out, v_out)
    with pytest.raises(TypeError):
        be.encrypt_chunks(ks, layout, "chunks", k, v, arena)
    with pytest.raises(TypeError):
        be.encrypt_chunks(ks, layout, ChunkTable(*(np.zeros((1, 1)) for _ in range(7))), k, v, arena)


def test_decrypt_audit_records_equal_the_host_backends():
    if _UNAVAILABLE:
        pytest.skip(f"native backend unavailable: {_UNAVAILABLE}")
    host, layout, ks, t, k, v, arena = sealed("host", torch.float32)
    arena[int(t.offset[1]) + 3] ^= 0x40
    logs = []
    for be in (host, native.NativeBackend()):
        audit = KVAuditLog()
        # rows out of order in the table: the row records still come sorted, first chunk's key slot
        order = np.array([4, 1, 0, 3, 2])
        tt = ChunkTable(*(np.asarray(getattr(t, f))[order] for f in ChunkTable.fields()))
        be.decrypt_chunks(ks, layout, tt, arena, torch.empty_like(k), torch.empty_like(v), audit_ctx(audit))
        logs.append([(e.operation, e.row, e.position, e.position_count, e.success, e.sequence_number)
                     for e in audit.entries(limit=None, operation="decrypt")])
        audit.close()
    assert logs[0] == logs[1] and len(logs[0]) == 3   # two row records, one failing chunk


# ---------------------------------------------------------------- native only: same bytes as the reference

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8]


@st.composite
def chunk_case(draw):
    heads, dim = draw(st.integers(1, 5)), draw(st.integers(1, 17))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(_DTYPES))
    kind = draw(st.sampled_from(["contiguous", "position_major", "dim_strided", "sliced"]))
    chunks = []
    for r in range(batch):
        p = 0
        while p < seq:
            c = draw(st.integers(1, seq - p))
            if draw(st.booleans()):
                chunks.append((r, p, c))
            p += c
    if not chunks:
        chunks = [(0, 0, seq)]
    order = draw(st.permutations(range(len(chunks))))
    chunks = [chunks[i] for i in order]
    nkeys = draw(st.integers(1, 3))
    slots = [draw(st.integers(0, nkeys - 1)) for _ in chunks]
    start0 = draw(st.integers(0, 2**40))
    return heads, dim, batch, seq, dtype, kind, chunks, nkeys, slots, start0


def _tensors(kind, batch, heads, seq, dim, dtype, gen):
    def rnd(shape):
        if dtype == torch.uint8:
            return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        return torch.randn(shape, generator=gen).to(dtype)
    if kind == "contiguous":
        return rnd((batch, heads, seq, dim)), rnd((batch, heads, seq, dim))
    if kind == "position_major":
        buf = rnd((batch, seq, 2, heads, dim))
        return buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)
    if kind == "dim_strided":
        return rnd((batch, heads, dim, seq)).transpose(2, 3), rnd((batch, heads, dim, seq)).transpose(2, 3)
    # a slice of a larger buffer: every stride differs from the shape's
    return (rnd((batch + 1, heads + 2, seq + 3, dim + 1))[1:, 1:heads + 1, 2:seq + 2, :dim],
            rnd((batch + 1, heads + 2, seq + 3, dim + 1))[1:, 1:heads + 1, 2:seq + 2, :dim])


@needs_native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=chunk_case(), seed=st.integers(0, 2**31))
def test_native_bytes_equal_the_host_backend_for_any_shape_stride_and_dtype(case, seed):
    heads, dim, batch, seq, dtype, kind, chunks, nkeys, slots, start0 = case
    gen = torch.Generator().manual_seed(seed)
    k, v = _tensors(kind, batch, heads, seq, dim, dtype, gen)
    layout = ChunkLayout(seed % 40, heads, dim, dtype)
    ks = [keyslot(f"t{i}", f"s{i}", epoch=seed % 5 + i) for i in range(nkeys)]
    rows, io, counts = (np.array([c[j] for c in chunks]) for j in range(3))
    t, nbytes = table(rows, io + start0, counts, io=io, counters=np.arange(len(chunks)) * 3 + seed,
                      bpp=layout.bytes_per_position, slots=slots, gap=5)
    ref = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
    HostBackend(threads=1).encrypt_chunks(ks, layout, t, k, v, ref)
    k_out, v_out = _tensors(kind, batch, heads, seq, dim, dtype, gen)
    k_want, v_want = k_out.clone(), v_out.clone()
    for r, s, c in chunks:
        k_want[r, :, s:s + c] = k[r, :, s:s + c]
        v_want[r, :, s:s + c] = v[r, :, s:s + c]
    for be in (native.NativeBackend(threads=1), split_backend()):   # one thread, and every call split
        got = torch.full((nbytes,), 0xA5, dtype=torch.uint8)
        be.encrypt_chunks(ks, layout, t, k, v, got)
        assert torch.equal(got, ref)                       # gaps between chunks untouched too
        ko, vo = k_out.clone(), v_out.clone()
        status = be.decrypt_chunks(ks, layout, t, ref, ko, vo).host
        assert not status.any()
        assert torch.equal(ko, k_want) and torch.equal(vo, v_want)


@needs_native
def test_chunks_sealed_by_plain_aesgcm_open(dtype):
    be = native.NativeBackend()
    layout = ChunkLayout(9, H, D, dtype)
    ks = [keyslot("alice", "a1", epoch=3), keyslot("bob", "b1", epoch=0)]
    k, v = torch.randn(3, H, 6, D).to(dtype), torch.randn(3, H, 6, D).to(dtype)
    chunks = [(0, 0, 6, 0), (1, 0, 2, 1), (1, 2, 4, 1), (2, 5, 1, 0)]
    bpp = layout.bytes_per_position
    arena = bytearray()
    offs = []
    for i, (r, s, c, sl) in enumerate(chunks):
        plain = torch.stack((k[r, :, s:s + c], v[r, :, s:s + c])).contiguous().view(-1).view(torch.uint8)
        aad = build_aad(tenant_id=["alice", "bob"][sl], session_id=["a1", "b1"][sl], epoch=ks[sl].epoch,
                        layer_idx=9, position=100 + s, position_count=c, key_len=c * bpp // 2,
                        dtype=str(dtype)[6:], num_heads=H, head_dim=D)
        offs.append(len(arena))
        arena += AESGCM(ks[sl].key).encrypt(make_nonce(ks[sl].epoch, 1000 + i), plain.numpy().tobytes(), aad)
    t = ChunkTable(np.array([c[3] for c in chunks]), np.array([c[0] for c in chunks]),
                   np.array([100 + c[1] for c in chunks]), np.array([c[2] for c in chunks]),
                   np.array([c[1] for c in chunks]), 1000 + np.arange(4), np.array(offs))
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    status = be.decrypt_chunks(ks, layout, t, torch.frombuffer(arena, dtype=torch.uint8), k_out, v_out).host
    assert status.tolist() == [0, 0, 0, 0]
    for r, s, c, _ in chunks:
        assert torch.equal(k_out[r, :, s:s + c], k[r, :, s:s + c])
        assert torch.equal(v_out[r, :, s:s + c], v[r, :, s:s + c])


@needs_native
@settings(max_examples=60, deadline=None)
@given(byte=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_a_flipped_byte_anywhere_fails_only_its_chunk(byte, bit):
    be, layout, ks, t, k, v, arena = sealed("native", torch.float32)
    i = byte % arena.numel()
    arena[i] ^= 1 << bit
    offs = np.asarray(t.offset)
    victim = int(np.searchsorted(offs, i, side="right") - 1)
    k_out, v_out = torch.full_like(k, 7.0), torch.full_like(v, 7.0)
    status = be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host
    assert status.tolist() == [int(j == victim) for j in range(5)]
    for j in range(5):
        r, s, c = int(t.row[j]), int(t.pos_start[j]), int(t.pos_count[j])
        if j == victim:
            assert not k_out[r, :, s:s + c].any() and not v_out[r, :, s:s + c].any()
        else:
            assert torch.equal(k_out[r, :, s:s + c], k[r, :, s:s + c])
            assert torch.equal(v_out[r, :, s:s + c], v[r, :, s:s + c])


def _replace(t: ChunkTable, **cols) -> ChunkTable:
    return ChunkTable(*(np.asarray(cols.get(f, getattr(t, f))) for f in ChunkTable.fields()))


@needs_native
@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
def test_every_out_of_range_input_is_refused_before_a_byte_moves(op, monkeypatch):
    be, layout, ks, t, k, v, arena = sealed("native", torch.float32)
    big = np.iinfo(np.int64).max
    last = [0, 0, 0, 0, 1]
    cases = {
        "chunk field slot": _replace(t, slot=[0, 0, 0, -1, 0]),
        "chunk field row": _replace(t, row=[0, 0, 0, -1, 1]),
        "chunk field pos_start": _replace(t, pos_start=[0, 4, 5, -6, 0]),
        "chunk field pos_count": _replace(t, pos_count=[4, 1, 0, 1, 7]),
        "chunk field io_start": _replace(t, io_start=[0, 4, 5, -1, 0]),
        "chunk field counter": _replace(t, counter=[1, 2, 3, -4, 5]),
        "chunk field offset": _replace(t, offset=np.asarray(t.offset) - np.array(last) * big - 1),
        "no key": _replace(t, slot=last),
        "outside the batch": _replace(t, row=[0, 0, 0, 0, 2]),
        "past the 7 positions": _replace(t, io_start=[0, 4, 5, 6, 1]),
        "end of the arena": _replace(t, offset=np.asarray(t.offset) + np.array(last) * 17),
        "overflowing offset": _replace(t, offset=np.asarray(t.offset) + np.array(last) * (big - 10**6)),
        "overflowing io_start": _replace(t, io_start=[0, 4, 5, 6, big]),
    }
    match = {"overflowing offset": "end of the arena", "overflowing io_start": "past the",
             "chunk field offset": "chunk field offset"}
    k_io, v_io = (k.clone(), v.clone()) if op == "encrypt" else (torch.full_like(k, 7.0), torch.full_like(v, 7.0))
    before = (arena.clone(), k_io.clone(), v_io.clone())

    def call(keys, lay, tab):
        if op == "encrypt":
            be.encrypt_chunks(keys, lay, tab, k_io, v_io, arena)
        else:
            be.decrypt_chunks(keys, lay, tab, arena, k_io, v_io)

    def unchanged():
        return all(torch.equal(a, b) for a, b in zip(before, (arena, k_io, v_io)))

    for what, bad in cases.items():
        with pytest.raises(ValueError, match=match.get(what, what)):
            call(ks, layout, bad)
        assert unchanged(), what
    for bad_keys in ([KeySlot(ks[0].key, ks[0].tenant_tag, ks[0].session_tag, 2**32)],
                     [KeySlot(ks[0].key, ks[0].tenant_tag, ks[0].session_tag, -1)]):
        with pytest.raises(ValueError, match="32-bit epoch"):
            call(bad_keys, layout, t)
        assert unchanged()
    for bad_layout in (ChunkLayout(2**32, H, D, torch.float32), ChunkLayout(-1, H, D, torch.float32)):
        with pytest.raises(ValueError, match="bad chunk layout"):
            call(ks, bad_layout, t)
        assert unchanged()
    # a K length past the AAD's 32 bits: positions of stride 0 make such a chunk fit the tensors
    huge = 2**27
    wide_k, wide_v = torch.zeros(1, H, 1, D).expand(1, H, huge, D), torch.zeros(1, H, 1, D).expand(1, H, huge, D)
    t_huge, _ = table([0], [0], [huge], bpp=layout.bytes_per_position)
    with pytest.raises(ValueError, match="32-bit AAD field"):
        if op == "encrypt":
            be.encrypt_chunks(ks, layout, t_huge, wide_k, wide_v, arena)
        else:
            be.decrypt_chunks(ks, layout, t_huge, arena, wide_k, wide_v)
    assert unchanged()
    # the C side checks the tensors' storage itself: claim one byte less of it than there is
    real = native._tensor_desc
    monkeypatch.setattr(native, "_tensor_desc", lambda x: [*real(x)[:1], real(x)[1] - 1, *real(x)[2:]])
    with pytest.raises(ValueError, match="outside the storage"):
        call(ks, layout, t)
    assert unchanged()


@needs_native
def test_forget_erases_the_key_schedules_and_close_frees_them():
    be, layout, ks, t, k, v, arena = sealed("native", torch.float32)
    assert be.schedule_bytes_left() > 0
    be.forget_keys()
    assert be.schedule_bytes_left() == 0
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    assert not be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host.any()   # re-expanded on demand
    assert torch.equal(k_out, k)
    assert be.schedule_bytes_left() > 0
    be.close()
    be.close()
    with pytest.raises(BackendUnavailableError, match="closed"):
        be.decrypt_chunks(ks, layout, t, arena, k_out, v_out)


@needs_native
def test_a_known_key_slot_skips_the_digest_but_never_outlives_a_wipe_or_a_changed_key():
    be, layout, ks, t, k, v, arena = sealed("native", torch.float32)
    assert id(ks[0]) in be._known and len(be._index) == 1
    same = KeySlot(ks[0].key, ks[0].tenant_tag, ks[0].session_tag, 0)    # another object, the same key
    out = torch.empty_like(k), torch.empty_like(v)
    assert not be.decrypt_chunks([same], layout, t, arena, *out).host.any() and len(be._index) == 1
    be.forget_keys()
    assert not be._known and not be._index and be.schedule_bytes_left() == 0
    # a bytearray key is never remembered by identity: changed in place, the call uses the new key
    raw = bytearray(AESGCM.generate_key(256))
    mutable = KeySlot(raw, ks[0].tenant_tag, ks[0].session_tag, 0)
    first = torch.zeros_like(arena)
    be.encrypt_chunks([mutable], layout, t, k, v, first)
    raw[:] = ks[0].key
    again = torch.zeros_like(arena)
    be.encrypt_chunks([mutable], layout, t, k, v, again)
    assert torch.equal(again, arena) and not torch.equal(first, arena)
    assert id(mutable) not in be._known
    be.close()
    assert not be._known and not be._index


@needs_native
def test_a_full_ring_is_wiped_and_refilled():
    be = native.NativeBackend(ring_slots=2)
    layout = ChunkLayout(0, H, D, torch.float32)
    k, v = torch.randn(1, H, 2, D), torch.randn(1, H, 2, D)
    t, nbytes = table([0], [0], [2], bpp=layout.bytes_per_position)
    for i in range(5):                                 # five keys through two schedules
        ks = [keyslot(epoch=i)]
        arena = torch.zeros(nbytes, dtype=torch.uint8)
        be.encrypt_chunks(ks, layout, t, k, v, arena)
        k_out, v_out = torch.empty_like(k), torch.empty_like(v)
        assert not be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host.any()
        assert torch.equal(k_out, k)
    with pytest.raises(ValueError, match="distinct keys"):
        be.encrypt_chunks([keyslot(), keyslot(), keyslot()], layout, t, k, v, torch.zeros(nbytes, dtype=torch.uint8))
    be.close()


# ---------------------------------------------------------------- selection

@needs_native
def test_cpu_selection_prefers_native_and_the_env_var_forces_either(monkeypatch):
    monkeypatch.delenv(native.BACKEND_ENV, raising=False)
    assert isinstance(select_backend("cpu"), native.NativeBackend)
    assert select_backend("cpu") is select_backend("cpu")
    monkeypatch.setenv(native.BACKEND_ENV, "host")
    assert select_backend("cpu") is HostBackend.instance()
    monkeypatch.setenv(native.BACKEND_ENV, "native")
    assert isinstance(select_backend("cpu"), native.NativeBackend)
    monkeypatch.setenv(native.BACKEND_ENV, "openssl")
    with pytest.raises(ValueError, match="PQC_KV_CACHE_BACKEND"):
        select_backend("cpu")


def test_without_the_native_library_cpu_tensors_get_the_host_backend(monkeypatch):
    def unavailable():
        raise BackendUnavailableError("no ipsec-mb here")
    monkeypatch.setattr(native_lib, "load", unavailable)
    monkeypatch.delenv(native.BACKEND_ENV, raising=False)
    assert select_backend("cpu") is HostBackend.instance()
    assert native.host_backend_choice() == ("host", "native backend unavailable: no ipsec-mb here")
    monkeypatch.setenv(native.BACKEND_ENV, "native")
    with pytest.raises(BackendUnavailableError, match="ipsec-mb"):
        select_backend("cpu")


def test_a_missing_compiler_makes_the_native_backend_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PQC_KV_CACHE_DIR", str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="no C compiler"):
        native_lib._build()


def test_info_names_the_active_host_path(monkeypatch, capsys):
    from pqc_kv_cache.__main__ import main

    monkeypatch.setenv(native.BACKEND_ENV, "host")
    assert main(["info"]) == 0
    assert "host path: host (forced by PQC_KV_CACHE_BACKEND=host)" in capsys.readouterr().out
    monkeypatch.setenv(native.BACKEND_ENV, "nonsense")
    assert main(["info"]) == 2
    assert "must be 'host', 'native' or 'auto'" in capsys.readouterr().out
    monkeypatch.delenv(native.BACKEND_ENV)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if _UNAVAILABLE:
        assert "host path: host (native backend unavailable" in out
    else:
        assert "host path: native (native backend available)" in out
        assert "ipsec-mb" in out and "CPU features ipsec-mb reports:" in out
        assert f"threads: {native.default_threads()} per large call" in out


def test_a_remembered_build_failure_keeps_no_caller_alive(monkeypatch):
    import weakref

    def fail():
        raise BackendUnavailableError("no ipsec-mb here")
    monkeypatch.setattr(native_lib, "_build", fail)
    monkeypatch.setattr(native_lib, "_lib", None)
    monkeypatch.setattr(native_lib, "_load_error", None)

    class Holder:   # stands for a cache whose first update selects the backend
        pass

    def select(holder):
        with pytest.raises(BackendUnavailableError, match="no ipsec-mb here"):
            native.load()

    refs = []
    for _ in range(2):                 # the build attempt, then the remembered failure
        h = Holder()
        refs.append(weakref.ref(h))
        select(h)
        del h
    assert [r() for r in refs] == [None, None], "a stored exception's traceback keeps its callers alive"


# ---------------------------------------------------------------- native only: a call split over threads

def _layer(batch=4, seq=512, heads=3, dim=8, dtype=torch.float32):
    """A layer as the cache keeps it (per row a long chunk, then 64, 32, ..., 1 positions), over 256 KiB."""
    layout = ChunkLayout(5, heads, dim, dtype)
    tail = [64, 32, 16, 8, 4, 2, 1]
    rows, starts, counts = [], [], []
    for r in range(batch):
        s = 0
        for c in [seq - sum(tail)] + tail:
            rows.append(r)
            starts.append(s)
            counts.append(c)
            s += c
    t, nbytes = table(rows, starts, counts, bpp=layout.bytes_per_position)
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(batch, heads, seq, dim, generator=gen).to(dtype) for _ in range(2))
    return layout, [keyslot()], t, nbytes, k, v


def _split_calls() -> int:
    return int(native.load().pqc_native_split_calls())


def _open(be, ks, layout, t, arena, out):
    audit = KVAuditLog()
    status = be.decrypt_chunks(ks, layout, t, arena, *out, audit_ctx(audit)).host
    rows = [(e.operation, e.row, e.position, e.position_count, e.success, e.sequence_number, e.nbytes, e.status)
            for e in audit.entries(limit=None)]
    audit.close()
    return status, rows


@needs_native
@pytest.mark.parametrize("out_kind", ["head_major", "position_major"])
def test_a_layer_split_over_threads_gives_the_bytes_statuses_and_records_of_one_thread(out_kind):
    layout, ks, t, nbytes, k, v = _layer()
    one, many = native.NativeBackend(threads=1), native.NativeBackend(threads=4)
    assert nbytes > many.parallel_min_bytes        # the default threshold splits this layer
    arenas = []
    for be in (one, many):
        arenas.append(torch.zeros(nbytes, dtype=torch.uint8))
        before = _split_calls()
        be.encrypt_chunks(ks, layout, t, k, v, arenas[-1])
        assert _split_calls() - before == (be is many)
    assert torch.equal(arenas[0], arenas[1])
    arena = arenas[0]
    middle = len(t) // 2 + 1                        # a chunk of a middle row, inside one thread's share
    arena[int(t.offset[middle]) + 5] ^= 0x10

    def out():
        if out_kind == "position_major":
            return position_major(4, 512, torch.float32)
        return torch.full_like(k, 7.0), torch.full_like(v, 7.0)
    results = []
    for be in (one, many):
        o = out()
        before = _split_calls()
        status, records = _open(be, ks, layout, t, arena, o)
        assert _split_calls() - before == (be is many)
        results.append((o, status, records))
    (o1, s1, r1), (o2, s2, r2) = results
    assert s1.tolist() == s2.tolist() == [int(i == middle) for i in range(len(t))]
    assert r1 == r2 and sum(not r[4] for r in r1) == 2     # the row's DECRYPT record and the chunk's failure
    assert torch.equal(o1[0], o2[0]) and torch.equal(o1[1], o2[1])
    r, s, c = int(t.row[middle]), int(t.pos_start[middle]), int(t.pos_count[middle])
    assert not o2[0][r, :, s:s + c].any() and not o2[1][r, :, s:s + c].any()
    k_want, v_want = k.clone(), v.clone()
    k_want[r, :, s:s + c] = 0
    v_want[r, :, s:s + c] = 0
    assert torch.equal(o2[0], k_want) and torch.equal(o2[1], v_want)
    one.close()
    many.close()


@needs_native
def test_a_call_whose_chunks_could_write_the_same_bytes_stays_on_one_thread():
    layout, ks, t, nbytes, k, v = _layer(batch=2, seq=160)
    be = split_backend()
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    be.encrypt_chunks(ks, layout, t, k, v, arena)
    # every chunk opened into row 0: the rows' chunks overlap there, the last one's bytes win
    same_row = ChunkTable(*(np.zeros(len(t), np.int64) if f == "row" else np.asarray(getattr(t, f))
                            for f in ChunkTable.fields()))
    arena[int(t.offset[3]) + 1] ^= 1               # row 0's 4th chunk fails; row 1's intact one wins
    outs = []
    for b in (native.NativeBackend(threads=1), be):
        o = (torch.full_like(k, 7.0), torch.full_like(v, 7.0))
        before = _split_calls()
        status = b.decrypt_chunks(ks, layout, same_row, arena, *o).host
        assert _split_calls() == before
        outs.append((status.tolist(), o))
    assert outs[0][0] == outs[1][0] == [int(i == 3) for i in range(len(t))]
    assert torch.equal(outs[0][1][0], outs[1][1][0]) and torch.equal(outs[0][1][1], outs[1][1][1])
    assert torch.equal(outs[1][1][0][0], k[1]) and torch.equal(outs[1][1][1][0], v[1])
    # a broadcast output (one element seen at every position) and an arena ciphertext range used twice
    o = (torch.zeros(2, 3, 1, 8).expand(2, 3, 160, 8), torch.zeros(2, 3, 160, 8))
    before = _split_calls()
    be.decrypt_chunks(ks, layout, t, arena, *o)
    twice = ChunkTable(*(np.full(len(t), int(t.offset[0])) if f == "offset" else
                         np.full(len(t), int(t.pos_count[0])) if f == "pos_count" else
                         np.zeros(len(t), np.int64) if f == "io_start" else np.asarray(getattr(t, f))
                         for f in ChunkTable.fields()))
    be.encrypt_chunks(ks, layout, twice, k, v, torch.zeros(nbytes, dtype=torch.uint8))
    assert _split_calls() == before


@needs_native
def test_calls_from_several_python_threads_at_once_each_get_their_own_bytes():
    import threading

    layout, ks, t, nbytes, k, v = _layer(batch=2, seq=256)
    be = split_backend()
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    be.encrypt_chunks(ks, layout, t, k, v, arena)
    outs = [(torch.zeros_like(k), torch.zeros_like(v)) for _ in range(4)]
    bad = []

    def run(o):
        for _ in range(25):   # the pool taken by one call at a time; the others run on their own thread
            if be.decrypt_chunks(ks, layout, t, arena, *o).host.any() or not torch.equal(o[0], k):
                bad.append(1)
            o[0].zero_()
    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not bad


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs os.fork (Linux)")
def test_a_forked_child_opens_a_split_layer_with_a_pool_of_its_own():
    layout, ks, t, nbytes, k, v = _layer()
    be = native.NativeBackend(threads=2)
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    be.encrypt_chunks(ks, layout, t, k, v, arena)   # the parent's pool exists now
    assert native.load().pqc_native_pool_workers() >= 1
    # the child's buffers made here: torch's OpenMP pool does not survive a fork either
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    with warnings.catch_warnings():                 # Python 3.12+ warns about forking with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:                                    # the child: report through the exit code only
        code = 1
        try:
            signal.alarm(60)                        # a hang ends the child, and the test fails
            before = _split_calls()
            ok = not be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host.any()
            same = bytes(k_out.numpy().data) == bytes(k.numpy().data) and bytes(v_out.numpy().data) == bytes(v.numpy().data)
            split = _split_calls() == before + 1 and native.load().pqc_native_pool_workers() == 1
            code = 0 if ok and same and split else 2 + ok + 2 * same + 4 * split
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    assert not be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host.any()   # the parent's pool still works
    assert torch.equal(k_out, k)


def test_the_thread_count_comes_from_the_environment_else_one():
    env = native.THREADS_ENV
    assert native.threads_from_env({env: "3"}) == 3
    assert native.threads_from_env({env: " 1 "}) == 1
    assert native.threads_from_env({}) == 1
    for bad in ("0", "65", "-2", "two", "1.5", "4x"):
        with pytest.raises(ValueError, match=env):
            native.threads_from_env({env: bad})


@needs_native
def test_a_bad_thread_count_is_refused():
    for bad in (0, 65, 2.0, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            native.NativeBackend(threads=bad)
    be = native.NativeBackend(threads=2)
    with pytest.raises(ValueError, match="threads"):
        be.threads = 0
    with pytest.raises(ValueError, match="parallel_min_bytes"):
        be.parallel_min_bytes = -1
    assert (be.threads, be.parallel_min_bytes) == (2, 256 << 10)
    be.close()
