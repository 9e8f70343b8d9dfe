"""The backend contract, on every backend available: the host backend (cryptography), the native host
backend (ipsec-mb, where the library is installed), the CPU twin of the CUDA backend
(its host code, each launch carried out by the host shim) and the CUDA backend on a GPU (marked ``gpu``).

Every test computes what the contract requires from the chunk table alone, so a backend that differs
from the others (e.g. in what its DECRYPT row records say) fails here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from support.devices import has_cuda
from support.twin import CpuTwinBackend, TwinLog

from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.base import (AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus,
                                        KeySlot)
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag
from pqc_kv_cache.errors import DecryptionError


@pytest.fixture(params=["host", "native", "twin", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")])])
def backend(request):
    """(backend, device) of the backend under test."""
    if request.param == "host":
        return HostBackend(threads=1), torch.device("cpu")
    if request.param == "native":
        from pqc_kv_cache.backends.native import NativeBackend
        from pqc_kv_cache.errors import BackendUnavailableError
        try:
            return NativeBackend.instance(), torch.device("cpu")
        except BackendUnavailableError as e:
            pytest.skip(f"native host backend unavailable: {e}")
    if request.param == "twin":
        if not kernel_shim.available():
            pytest.skip("no C++ compiler for the host shim")
        return CpuTwinBackend(), torch.device("cpu")
    from pqc_kv_cache.backends.cuda import CudaBackend
    dev = torch.device("cuda", torch.cuda.current_device())
    return CudaBackend.for_device(dev), dev


class Owner:
    """Whose calls a check() reports."""


LAYOUT = ChunkLayout(layer_idx=2, num_heads=2, head_dim=16, dtype=torch.float16)
TENANTS = ("alice", "bob")
ENTRIES = [  # slot, row, pos_start, pos_count, io_start, counter
    (0, 0, 0, 5, 0, 7), (0, 0, 5, 1, 5, 3), (1, 1, 0, 6, 0, 1 << 33), (0, 2, 4, 2, 0, 11), (0, 2, 6, 3, 2, 9),
]


def _keys():
    g = np.random.default_rng(5)
    return [KeySlot(g.bytes(32), tenant_tag(t), session_tag(f"s-{t}"), 3 + i) for i, t in enumerate(TENANTS)]


def _table():
    cols = [np.array(c, dtype=np.int64) for c in zip(*ENTRIES)]
    size = cols[3] * LAYOUT.bytes_per_position + 16
    off = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    return ChunkTable(*cols, off), int(size.sum())


def _kv(dev):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 8, 16, generator=g).to(torch.float16)
    v = torch.randn(3, 2, 8, 16, generator=g).to(torch.float16)
    return k.to(dev), v.to(dev)


def _plain(k, v, row, io, n):
    return b"".join(t[row, :, io:io + n].contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in (k, v))


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _sealed(be, dev, ctx=None):
    keys, (chunks, size), (k, v) = _keys(), _table(), _kv(dev)
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
    _sync(dev)
    return keys, chunks, k, v, arena


def test_every_backend_is_a_crypto_backend_with_the_whole_contract(backend):
    be, _ = backend
    assert isinstance(be, CryptoBackend)
    be.forget_keys()
    be.check(Owner())          # nothing failed: nothing raised


def test_sealed_chunks_open_with_aesgcm_and_round_trip(backend):
    be, dev = backend
    keys, chunks, k, v, arena = _sealed(be, dev)
    host_arena = arena.cpu().numpy().tobytes()
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        off, nb = int(chunks.offset[i]), pc * LAYOUT.bytes_per_position
        aad = build_aad(tenant_id=TENANTS[slot], session_id=f"s-{TENANTS[slot]}", epoch=keys[slot].epoch,
                        layer_idx=LAYOUT.layer_idx, position=ps, position_count=pc, key_len=nb // 2,
                        dtype="float16", num_heads=2, head_dim=16)
        got = AESGCM(keys[slot].key).decrypt(make_nonce(keys[slot].epoch, ctr), host_arena[off:off + nb + 16], aad)
        assert got == _plain(k, v, row, io, pc)
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    owner = Owner()
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, owner=owner)
    assert isinstance(status, DecryptStatus) and len(status) == len(ENTRIES)
    be.check(owner)
    got = status.device.cpu().numpy() if status.deferred else status.host
    assert not got.any()
    for (_, row, _, pc, io, _) in ENTRIES:
        assert torch.equal(k_out[row, :, io:io + pc], k[row, :, io:io + pc])
        assert torch.equal(v_out[row, :, io:io + pc], v[row, :, io:io + pc])


def test_a_tampered_chunk_is_zeroed_and_reported_to_its_caller(backend):
    be, dev = backend
    keys, chunks, k, v, arena = _sealed(be, dev)
    arena[int(chunks.offset[2]) + 3] ^= 1                    # chunk 2: row 1, positions 0..5
    k_out, v_out = torch.full_like(k, 2.0), torch.full_like(v, 2.0)
    owner = Owner()
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, owner=owner)
    if status.deferred:
        with pytest.raises(DecryptionError) as ei:
            be.check(owner)
        assert ei.value.positions == range(0, 6) and ei.value.layer_idx == LAYOUT.layer_idx
        got = status.device.cpu().numpy()
    else:
        be.check(owner)            # a host status: every failure is in it already
        got = status.host
    assert got.tolist() == [0, 0, 1, 0, 0]
    assert not k_out[1, :, 0:6].any() and not v_out[1, :, 0:6].any()
    assert torch.equal(k_out[0, :, 0:6], k[0, :, 0:6])


def _expected_records(keys, failed: set[int]):
    """What the log must hold after one encrypt and one decrypt of ENTRIES, from the table alone."""
    bpp = LAYOUT.bytes_per_position
    out = []
    for slot, row, ps, pc, io, ctr in ENTRIES:             # one ENCRYPT per (row, position)
        out += [("encrypt", TENANTS[slot], row, ps + p, 1, ctr, keys[slot].epoch, bpp, True) for p in range(pc)]
    for row in sorted({e[1] for e in ENTRIES}):            # one DECRYPT per row read
        mine = [i for i, e in enumerate(ENTRIES) if e[1] == row]
        lo = min(ENTRIES[i][2] for i in mine)
        hi = max(ENTRIES[i][2] + ENTRIES[i][3] for i in mine)
        slot = ENTRIES[mine[0]][0]
        out.append(("decrypt", TENANTS[slot], row, lo, hi - lo, min(ENTRIES[i][5] for i in mine), keys[slot].epoch,
                    sum(ENTRIES[i][3] for i in mine) * bpp, not failed.intersection(mine)))
    for i in sorted(failed):                               # one AUTH_FAILED per failing chunk
        slot, row, ps, pc, io, ctr = ENTRIES[i]
        out.append(("decrypt", TENANTS[slot], row, ps, pc, ctr, keys[slot].epoch, pc * bpp, False))
    return sorted(out)


@pytest.mark.parametrize("tampered", [(), (1, 3)])
def test_audit_records_are_what_the_contract_says_on_every_backend(backend, tampered):
    be, dev = backend
    log = TwinLog()
    try:
        ctx = AuditContext(log, np.array([log.tenant_index(t) for t in TENANTS], np.uint32),
                           np.array([log.session_index(f"s-{t}", t) for t in TENANTS], np.uint32))
        keys, chunks, k, v, arena = _sealed(be, dev, ctx)
        for i in tampered:
            arena[int(chunks.offset[i])] ^= 0x80
        owner = Owner()
        be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), ctx, owner=owner)
        try:
            be.check(owner)
        except DecryptionError:
            assert tampered
        assert log.flush(timeout=10)
        got = sorted((e.operation, e.tenant_id, e.row, e.position, e.position_count, e.sequence_number, e.epoch,
                      e.nbytes, e.success) for e in log.entries(limit=None)
                     if e.layer_idx == LAYOUT.layer_idx)
        assert got == _expected_records(keys, set(tampered))
    finally:
        log.close(timeout=10)
