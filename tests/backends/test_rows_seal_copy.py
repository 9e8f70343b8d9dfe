"""The plaintext copy of a prepared row seal (``copy_to``, :class:`PlaintextCopy`): a working-set update's
store written by the call that seals the new positions (on a device, by the same launch).

On the CPU twin of the CUDA backend (launches run by the host shim) the prepared path must write what
``narrow(2, at, n).copy_`` writes, with the same ciphertext as a call without the copy and still one upload
and one launch; a copy it cannot take goes the general way (same outcome); a copy no backend can take is
refused before anything is sealed. A working-set cache over the twin then returns DynamicCache's K / V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.cache_models import tiny_model
from support.devices import has_cuda
from support.twin import CpuTwinBackend

from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.base import ChunkLayout, CryptoBackend, KeySlot, PlaintextCopy
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.envelope import session_tag, tenant_tag
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session

pytestmark = pytest.mark.skipif(not kernel_shim.available(), reason="no C++ compiler for the host shim")

LAYOUT = ChunkLayout(layer_idx=3, num_heads=2, head_dim=64, dtype=torch.bfloat16)
BATCH = 3
SIZE = LAYOUT.bytes_per_position + 16
KEY_IDX = np.array([0, 1, 1], dtype=np.int64)
ROWS = np.arange(BATCH, dtype=np.int64)


def _keys():
    g = np.random.default_rng(5)
    return [KeySlot(key=g.bytes(32), tenant_tag=tenant_tag(f"t{i}"), session_tag=session_tag(f"s{i}"), epoch=1 + i)
            for i in range(2)]


def _kv(seed, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, 1, 64, generator=g).to(torch.bfloat16),
            torch.randn(batch, 2, 1, 64, generator=g).to(torch.bfloat16))


def _store(positions=8):
    """K / V buffers as a working-set store holds them (a wider buffer, positions on axis 2)."""
    return (torch.full((BATCH, 2, positions, 64), 7.0, dtype=torch.bfloat16),
            torch.full((BATCH, 2, positions, 64), 9.0, dtype=torch.bfloat16))


def _calls():
    return [(10 + i, np.array([3 * i, 3 * i + 1, 3 * i + 2], dtype=np.int64), 3 * SIZE * i, *_kv(i))
            for i in range(4)]


def _first(seal, calls):
    pos, ctr, off, k, v = calls[0]
    seal(pos, 1, ctr, off, SIZE, k, v)


def _seal(backend):
    arena = torch.zeros(4 * 3 * SIZE, dtype=torch.uint8)
    return arena, backend.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)


def test_the_prepared_seal_writes_the_copy_with_the_bytes_of_a_seal_without_it():
    be = CpuTwinBackend()
    arena, seal = _seal(be)
    plain_arena, plain = _seal(CpuTwinBackend())
    k_buf, v_buf = _store()
    for i, (pos, ctr, off, k, v) in enumerate(_calls()):
        uploads, launches = be.twin_device.uploads, len(be.launches)
        seal(pos, 1, ctr, off, SIZE, k, v, copy_to=PlaintextCopy(k_buf, v_buf, 2 + i))
        plain(pos, 1, ctr, off, SIZE, k, v)
        if i:       # prepared: one upload and one launch, no copy of its own
            assert be.twin_device.uploads - uploads == 1
            assert [name for name, _, _ in be.launches[launches:]] == ["pqc_encrypt_chunks"]
        assert torch.equal(k_buf[:, :, 2 + i:3 + i], k) and torch.equal(v_buf[:, :, 2 + i:3 + i], v)
    assert torch.equal(arena, plain_arena)
    # nothing outside the positions copied to
    assert (k_buf[:, :, :2] == 7).all() and (k_buf[:, :, 6:] == 7).all() and (v_buf[:, :, 6:] == 9).all()


@pytest.mark.parametrize("backend", ["twin", "host"])
def test_every_backend_s_copy_is_what_narrow_copy_writes(backend):
    """The twin's prepared call against the base class's seal (torch copies) and the host backend's."""
    outs = []
    for path in ("prepared", "general"):
        be = CpuTwinBackend() if backend == "twin" else HostBackend(threads=1)
        arena, seal = _seal(be)
        k_buf, v_buf = _store()
        for i, (pos, ctr, off, k, v) in enumerate(_calls()):
            to = PlaintextCopy(k_buf, v_buf, 3 + i)
            if path == "prepared":
                seal(pos, 1, ctr, off, SIZE, k, v, copy_to=to)
            else:
                CryptoBackend.seal_rows(be, seal, pos, 1, ctr, off, SIZE, k, v, None, None, to)
        outs.append((arena, k_buf, v_buf))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def _bad(case, k, v):
    k_buf, v_buf = _store()
    return {"past the end": PlaintextCopy(k_buf, v_buf, 8),
            "negative position": PlaintextCopy(k_buf, v_buf, -1),
            "wrong heads": PlaintextCopy(torch.zeros(BATCH, 3, 8, 64, dtype=torch.bfloat16), v_buf, 0),
            "wrong dtype": PlaintextCopy(k_buf.float(), v_buf, 0),
            "not a tensor": PlaintextCopy(k_buf, "v", 0),
            "not a PlaintextCopy": (k_buf, v_buf, 0)}[case]


@pytest.mark.parametrize("case", ["past the end", "negative position", "wrong heads", "wrong dtype", "not a tensor",
                                  "not a PlaintextCopy"])
@pytest.mark.parametrize("backend", ["twin", "host"])
def test_a_copy_that_cannot_take_the_sources_is_refused_before_anything_is_sealed(case, backend):
    be = CpuTwinBackend() if backend == "twin" else HostBackend(threads=1)
    arena, seal = _seal(be)
    calls = _calls()
    _first(seal, calls)        # prepared
    before = arena.clone()
    pos, ctr, off, k, v = calls[1]
    to = _bad(case, k, v)
    with pytest.raises((TypeError, ValueError), match="copy_to|PlaintextCopy"):
        seal(pos, 1, ctr, off, SIZE, k, v, copy_to=to)
    assert torch.equal(arena, before)


@pytest.mark.parametrize("case", ["K and V in one buffer", "onto the sources", "dim not contiguous"])
def test_a_copy_the_launch_cannot_take_goes_the_general_way(case, monkeypatch):
    """Copies sharing memory (whose parallel writes would race) and strided dim axes: the general path's
    outcome, the same on both paths."""
    general = CryptoBackend.seal_rows
    taken = []

    def counted(*args):
        taken.append(args[0])
        return general(*args)
    monkeypatch.setattr(CryptoBackend, "seal_rows", counted)
    outs = {}
    for path in ("prepared", "general"):
        be = CpuTwinBackend()
        arena, seal = _seal(be)
        calls = _calls()
        _first(seal, calls)
        pos, ctr, off, k, v = calls[1]
        k, v = k.clone(), v.clone()
        k_buf, v_buf = _store()
        to = {"K and V in one buffer": PlaintextCopy(k_buf, k_buf, 1),
              "onto the sources": PlaintextCopy(k, v, 0),
              "dim not contiguous": PlaintextCopy(k_buf.transpose(0, 3).contiguous().transpose(0, 3), v_buf, 1),
              }[case]
        taken.clear()
        if path == "prepared":
            seal(pos, 1, ctr, off, SIZE, k, v, copy_to=to)
        else:
            general(be, seal, pos, 1, ctr, off, SIZE, k, v, None, None, to)
        outs[path] = (arena.clone(), to.k.clone(), to.v.clone())
        if path == "prepared":      # the prepared call handed it to the general path
            assert taken == [be]
    for a, b in zip(outs["prepared"], outs["general"]):
        assert torch.equal(a, b)


def test_a_working_set_cache_over_the_twin_returns_dynamic_cache_s_states():
    """The store is written by the seal's launch (the host shim runs it): what each update returns is what
    DynamicCache returns, prefill and decode steps, merges included."""
    from transformers import DynamicCache
    who = [establish_tenant_session(TenantIdentity(t), ttl_seconds=3600) for t in ("alice", "bob")]
    cfg = tiny_model("llama").config
    cache = EncryptedCache(cfg, sessions=who, backend=CpuTwinBackend(), mode="working_set")
    ref = DynamicCache()
    g = torch.Generator().manual_seed(3)
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for n in [5] + [1] * 12:
        for layer in range(cfg.num_hidden_layers):
            k, v = torch.randn(2, heads, n, dim, generator=g), torch.randn(2, heads, n, dim, generator=g)
            got, want = cache.update(k, v, layer), ref.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    cache.check()
    cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")
def test_on_a_gpu_the_seal_s_launch_writes_the_copy_without_a_host_sync():
    """Unverified here (no GPU on the machine it was written on): the copy written by the encrypt kernel on a
    real device, the calls after the first (which prepares) under sync-debug 'error'; the ciphertext is the
    host shim's for the same calls."""
    from pqc_kv_cache.backends.cuda import CudaBackend
    dev = torch.device("cuda", torch.cuda.current_device())
    be = CudaBackend.for_device(dev)
    arena = torch.zeros(4 * 3 * SIZE, dtype=torch.uint8, device=dev)
    seal = be.rows_seal(_keys(), LAYOUT, KEY_IDX, ROWS, arena)
    calls = [(pos, ctr, off, k.to(dev), v.to(dev)) for pos, ctr, off, k, v in _calls()]
    k_buf, v_buf = (t.to(dev) for t in _store())
    _first(seal, calls)
    torch.cuda.synchronize(dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (pos, ctr, off, k, v) in enumerate(calls[1:]):
            seal(pos, 1, ctr, off, SIZE, k, v, copy_to=PlaintextCopy(k_buf, v_buf, 2 + i))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(dev)
    for i, (_, _, _, k, v) in enumerate(calls[1:]):
        assert torch.equal(k_buf[:, :, 2 + i:3 + i], k) and torch.equal(v_buf[:, :, 2 + i:3 + i], v)
    assert (k_buf[:, :, 5:] == 7).all() and (v_buf[:, :, :2] == 9).all()
    ref_arena, ref = _seal(CpuTwinBackend())
    for pos, ctr, off, k, v in calls:
        ref(pos, 1, ctr, off, SIZE, k.cpu(), v.cpu())
    assert torch.equal(arena.cpu(), ref_arena)
