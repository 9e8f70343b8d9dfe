"""HostBackend: the backend contract on CPU, checked against plain `cryptography` AESGCM and envelope.build_aad."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends import select_backend
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.backends.host import HostBackend, chunk_aads, chunk_nonces
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag

H, D = 3, 8


def keyslot(tenant="t", session="s", epoch=0, key=None):
    return KeySlot(key or AESGCM.generate_key(256), tenant_tag(tenant), session_tag(session), epoch)


def table(rows, starts, counts, io=None, counters=None, bpp=None):
    rows, starts, counts = (np.asarray(x, dtype=np.int64) for x in (rows, starts, counts))
    io = starts if io is None else np.asarray(io, dtype=np.int64)
    counters = np.arange(1, rows.size + 1) if counters is None else np.asarray(counters)
    sizes = counts * bpp + 16
    offs = np.cumsum(sizes) - sizes
    return ChunkTable(np.zeros(rows.size, np.int64), rows, starts, counts, io, counters, offs), int(sizes.sum())


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16])
def dtype(request):
    return request.param


def sealed(dtype, batch=2, seq=7, layout_layer=3, threads=1):
    be = HostBackend(threads=threads)
    layout = ChunkLayout(layout_layer, H, D, dtype)
    ks = [keyslot()]
    k = torch.randn(batch, H, seq, D).to(dtype)
    v = torch.randn(batch, H, seq, D).to(dtype)
    # row 0: one 4-position chunk then three 1-position chunks; row 1: one 7-position chunk
    t, nbytes = table([0, 0, 0, 0, 1], [0, 4, 5, 6, 0], [4, 1, 1, 1, 7], bpp=layout.bytes_per_position)
    arena = torch.zeros(nbytes, dtype=torch.uint8)
    be.encrypt_chunks(ks, layout, t, k, v, arena)
    return be, layout, ks, t, k, v, arena


def test_every_chunk_opens_with_plain_aesgcm_and_build_aad(dtype):
    be, layout, ks, t, k, v, arena = sealed(dtype)
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


@pytest.mark.parametrize("layout_kind", ["position_major", "contiguous"])
def test_decrypt_round_trips_into_both_output_layouts(dtype, layout_kind):
    be, layout, ks, t, k, v, arena = sealed(dtype)
    if layout_kind == "position_major":
        buf = torch.full((2, 7, 2, H, D), 7.0, dtype=dtype)
        k_out, v_out = buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)
        assert be._direct_target(k_out, v_out, layout) is not None
    else:
        k_out, v_out = torch.full_like(k, 7.0), torch.full_like(v, 7.0)
        assert be._direct_target(k_out, v_out, layout) is None
    status = be.decrypt_chunks(ks, layout, t, arena, k_out, v_out).host
    assert status.tolist() == [0] * 5
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


@pytest.mark.parametrize("victim", [0, 2])   # a staged multi-position chunk, a direct one-position chunk
def test_tampered_chunk_fails_and_its_destination_is_zeroed(victim):
    be, layout, ks, t, k, v, arena = sealed(torch.float32)
    arena[int(t.offset[victim]) + 1] ^= 1
    buf = torch.full((2, 7, 2, H, D), 7.0)
    k_out, v_out = buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)
    audit = KVAuditLog()
    ctx = AuditContext(audit, np.array([audit.tenant_index("t")], np.uint32),
                       np.array([audit.session_index("s", "t")], np.uint32))
    status = be.decrypt_chunks(ks, layout, t, arena, k_out, v_out, ctx).host
    assert status.tolist() == [int(i == victim) for i in range(5)]
    s, c = int(t.pos_start[victim]), int(t.pos_count[victim])
    assert not k_out[0, :, s:s + c].any() and not v_out[0, :, s:s + c].any()
    assert torch.equal(k_out[1], k[1])
    failed = audit.entries(limit=None, operation="decrypt", success=False)
    # the row summary and the failing chunk's own record
    assert {(e.row, e.position, e.position_count) for e in failed} == {(0, 0, 7), (0, s, c)}
    ok = audit.entries(limit=None, operation="decrypt", success=True)
    assert [(e.row, e.position, e.position_count) for e in ok] == [(1, 0, 7)]
    audit.close()


def test_wrong_key_epoch_or_layer_fails_every_chunk():
    be, layout, ks, t, k, v, arena = sealed(torch.float32)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    other_epoch = [KeySlot(ks[0].key, ks[0].tenant_tag, ks[0].session_tag, 1)]
    assert be.decrypt_chunks(other_epoch, layout, t, arena, k_out, v_out).host.all()
    other_layer = ChunkLayout(4, H, D, torch.float32)
    assert be.decrypt_chunks(ks, other_layer, t, arena, k_out, v_out).host.all()
    assert be.decrypt_chunks([keyslot()], layout, t, arena, k_out, v_out).host.all()
    assert not k_out.any() and not v_out.any()


def test_encrypt_emits_one_record_per_row_and_position():
    be = HostBackend(threads=1)
    layout = ChunkLayout(1, H, D, torch.float32)
    audit = KVAuditLog()
    ctx = AuditContext(audit, np.array([audit.tenant_index("t")], np.uint32),
                       np.array([audit.session_index("s", "t")], np.uint32))
    t, nbytes = table([0, 1], [10, 10], [3, 3], io=[0, 0], counters=[5, 6], bpp=layout.bytes_per_position)
    be.encrypt_chunks([keyslot()], layout, t, torch.randn(2, H, 3, D), torch.randn(2, H, 3, D),
                      torch.zeros(nbytes, dtype=torch.uint8), ctx)
    recs = audit.entries(limit=None, operation="encrypt")
    assert sorted((e.row, e.position, e.sequence_number) for e in recs) == \
        [(0, 10, 5), (0, 11, 5), (0, 12, 5), (1, 10, 6), (1, 11, 6), (1, 12, 6)]
    assert all(e.layer_idx == 1 and e.tenant_id == "t" for e in recs)
    audit.close()


def test_threaded_backend_gives_the_same_result():
    be, layout, ks, t, k, v, arena = sealed(torch.float32, seq=7, threads=2)
    be.parallel_min_bytes = 0
    single = HostBackend(threads=1)
    k1, v1 = torch.empty_like(k), torch.empty_like(v)
    k2, v2 = torch.empty_like(k), torch.empty_like(v)
    single.decrypt_chunks(ks, layout, t, arena, k1, v1)
    be.decrypt_chunks(ks, layout, t, arena, k2, v2)
    assert torch.equal(k1, k) and torch.equal(k2, k) and torch.equal(v2, v)


def test_bad_inputs_raise_clear_errors():
    be, layout, ks, t, k, v, arena = sealed(torch.float32)
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


def test_select_backend_gives_the_host_backend_on_cpu(monkeypatch):
    monkeypatch.setenv("PQC_KV_CACHE_BACKEND", "host")   # else the native backend, where it builds
    assert select_backend("cpu") is HostBackend.instance()
    assert HostBackend.instance() is HostBackend.instance()


@settings(max_examples=60, deadline=None)
@given(epoch=st.integers(0, 2**32 - 1), layer=st.integers(0, 2**32 - 1), start=st.integers(0, 2**63 - 1),
       count=st.integers(1, 2**20), counter=st.integers(0, 2**63 - 1), heads=st.integers(1, 64),
       dim=st.integers(1, 256), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       tenant=st.text(min_size=1, max_size=12), session=st.text(min_size=1, max_size=12))
def test_vectorised_aad_and_nonce_equal_the_envelope(epoch, layer, start, count, counter, heads, dim, dtype,
                                                     tenant, session):
    layout = ChunkLayout(layer, heads, dim, dtype)
    ks = [keyslot(), keyslot(tenant, session, epoch)]
    key_len = count * layout.bytes_per_position // 2
    if key_len > 2**32 - 1:
        with pytest.raises(ValueError, match="32-bit"):
            chunk_aads(ks, layout, [1], [start], [count])
        return
    aads = chunk_aads(ks, layout, [1], [start], [count])
    want = build_aad(tenant_id=tenant, session_id=session, epoch=epoch, layer_idx=layer, position=start,
                     position_count=count, key_len=key_len, dtype=str(dtype)[6:], num_heads=heads, head_dim=dim)
    assert aads.tobytes() == want
    assert chunk_nonces(ks, [1], [counter]).tobytes() == make_nonce(epoch, counter)
