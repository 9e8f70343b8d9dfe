"""HostBackend: what only the `cryptography` host path has (its threads, its vectorised AAD and nonce
builders, CPU selection). The contract tests it shares with the native backend run on both in
test_native_backend.py and test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.backends import select_backend
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot
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


def test_threaded_backend_gives_the_same_result():
    be, layout, ks, t, k, v, arena = sealed(torch.float32, seq=7, threads=2)
    be.parallel_min_bytes = 0
    single = HostBackend(threads=1)
    k1, v1 = torch.empty_like(k), torch.empty_like(v)
    k2, v2 = torch.empty_like(k), torch.empty_like(v)
    single.decrypt_chunks(ks, layout, t, arena, k1, v1)
    be.decrypt_chunks(ks, layout, t, arena, k2, v2)
    assert torch.equal(k1, k) and torch.equal(k2, k) and torch.equal(v2, v)


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


@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
@pytest.mark.parametrize("col, value, match", [
    ("io_start", (1 << 63) - 1, "past the 4 positions"),      # io_start + pos_count wraps in int64
    ("offset", (1 << 63) - 10, "past the end of the arena"),  # offset + bytes + tag wraps in int64
])
def test_a_chunk_column_near_2_to_the_63_is_refused_not_wrapped(op, col, value, match):
    """Chunk 1 is in range, so the largest per-chunk sum is small: a wrapped sum of chunk 0 must not hide."""
    lay = ChunkLayout(layer_idx=0, num_heads=2, head_dim=8, dtype=torch.float32)      # 128 B per position
    k, v = torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)
    arena = torch.zeros(4096, dtype=torch.uint8)
    cols = dict(slot=[0, 0], row=[0, 1], pos_start=[0, 0], pos_count=[1, 4], io_start=[0, 0], counter=[0, 1],
                offset=[0, 512])
    cols[col] = [value, 0]
    chunks = ChunkTable(**{f: np.array(c, dtype=np.int64) for f, c in cols.items()})
    before = arena.clone()
    backend = HostBackend(threads=1)
    with pytest.raises(ValueError, match=match):
        if op == "encrypt":
            backend.encrypt_chunks([keyslot()], lay, chunks, k, v, arena)
        else:
            backend.decrypt_chunks([keyslot()], lay, chunks, arena, k, v)
    assert torch.equal(arena, before) and not k.any() and not v.any()
