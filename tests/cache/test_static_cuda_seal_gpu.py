"""The CUDA backend's static seal and open on a GPU: the native seal's bytes and the host open's, and a seal
step and an open captured in a CUDA graph.

Unverified: written on a machine without a GPU, where it is skipped (the same scenarios pass on the CPU twin,
``test_static_cuda_seal_twin.py``). On a GPU it checks what the twin cannot: the torch operations and the
kernel launch on a real stream give the native seal's arena, slot table, counters, records and failures,
and a seal step captured in a CUDA graph and replayed takes fresh counters and writes its own records each
replay, with no host synchronisation while replaying."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit.records import RECORD_DTYPE
from pqc_kv_cache.backends import native
from tests.cache.test_static_native_seal import ROWS, SEQ, SLOTS, Twin
from tests.support.cache_models import sessions as make_sessions
from tests.support.devices import has_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy"),
              pytest.mark.skipif(not native.available(), reason="the native backend does not build here")]

_STATE = ("arena", "meta", "next", "end", "epoch", "records", "head", "failures")


class GpuTwin(Twin):
    """Twin's state on the GPU, sealed by the CUDA backend through the sealer (epochs from a host copy)."""

    def __init__(self, sess, **kwargs):
        from pqc_kv_cache.backends.cuda import CudaBackend
        from pqc_kv_cache.cache.static_sealer import StaticSealer

        super().__init__(sess, native.NativeBackend(), **kwargs)
        for name in ("k", "v", "released", *_STATE):
            setattr(self, name, getattr(self, name).cuda())
        self.epoch_host = np.zeros(len(sess), dtype=np.int64)
        idx = np.arange(len(sess), dtype=np.int64)
        audit = self.records.shape[0] > 0
        self.sealer = StaticSealer(sess, ROWS, CudaBackend.for_device("cuda"), idx + 7 if audit else None,
                                   idx + 11 if audit else None, host_epochs=lambda: self.epoch_host)

    def seal(self, positions, io=None, ring=False, layer=1):
        pos = torch.tensor(positions, dtype=torch.int64, device="cuda")
        io = pos.clone() if io is None else torch.tensor(io, dtype=torch.int64, device="cuda")
        self.sealer.seal(layer, self.k, self.v, io, pos, self.arena, self.meta, self.next, self.end, self.epoch,
                         self.records, self.head, self.failures, ring)


def _pair(capacity=256):
    sess = make_sessions("alice", "bob")
    want, got = Twin(sess, native.NativeBackend(), capacity=capacity), GpuTwin(sess, capacity=capacity)
    for t in (want, got):
        t.end[:] = 100
    return want, got


def _same(want, got):
    torch.cuda.synchronize()
    for name in _STATE:
        assert torch.equal(getattr(want, name), getattr(got, name).cpu()), name


def test_the_gpu_seal_writes_the_native_bytes_in_every_case():
    want, got = _pair()
    for t in (want, got):
        t.seal([0, 1, 2, 3, 4])
        for p in range(5, 9):
            t.seal([p])
        t.seal([SLOTS, -1, 9], io=[3, 3, 3])
        t.seal(list(range(SEQ)), ring=True, layer=2)
        t.end[:] = t.next + torch.tensor([1, 2], device=t.end.device)
        t.seal([9, 9])
    _same(want, got)
    want, got = _pair(capacity=12)
    for t in (want, got):
        t.seal([0])
        t.seal([1])
        t.seal([2])
    _same(want, got)


def test_a_captured_seal_step_takes_fresh_counters_each_replay_without_host_syncs():
    replays = 20
    want, got = _pair(capacity=2048)
    for t in (want, got):
        t.seal([0, 1, 2])
        t.seal([3])                                   # the warm-up a capture needs
    pos = torch.tensor([4], dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got.sealer.seal(1, got.k, got.v, pos, pos, got.arena, got.meta, got.next, got.end, got.epoch, got.records,
                        got.head, got.failures, False)
    torch.cuda.synchronize()
    # the capture itself ran nothing: the state is that of the warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(replays):
            graph.replay()
            pos.add_(1)
            pos.remainder_(SLOTS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i in range(replays):
        want.seal([(4 + i) % SLOTS])
    _same(want, got)
    r = got.records[:int(got.head[0])].cpu().numpy().copy().view(RECORD_DTYPE).reshape(-1)
    assert np.array_equal(r["record_no"], np.arange(r.size))
    enc = r[r["op"] == 1]
    for slot in (7, 8):
        c = enc["nonce_counter"][enc["tenant_idx"] == slot]
        assert len(set(c.tolist())) == c.size


def _open(t, end, ring=False, layer=1):
    end = torch.tensor(end, dtype=torch.int64, device=t.arena.device)
    t.sealer.open(layer, t.k, t.v, end, t.arena, t.meta, t.released, t.records, t.head, t.failures, ring)


def _same_plain(want, got):
    _same(want, got)
    assert torch.equal(want.k, got.k.cpu()) and torch.equal(want.v, got.v.cpu()), "the plaintext differs"


def test_the_gpu_open_gives_the_host_open_bytes_in_every_case():
    want, got = _pair()
    for t in (want, got):
        t.seal(list(range(6)))
        t.seal(list(range(SEQ + 3)), io=[p % SEQ for p in range(SEQ + 3)], ring=True, layer=2)
        t.k.zero_()
        t.v.zero_()
        t.arena[1, 3, 5] ^= 1             # a tampered chunk
        t.meta[2, 4] = 0                  # a slot that holds nothing
        _open(t, 6)
        _open(t, SEQ + 3, ring=True, layer=2)
    _same_plain(want, got)
    assert int(got.failures[0]) > 0


def test_a_captured_open_replays_without_host_syncs():
    replays = 5
    want, got = _pair(capacity=2048)
    for t in (want, got):
        t.seal(list(range(6)))
        _open(t, 6)                                   # the warm-up a capture needs
    end = torch.tensor(6, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got.sealer.open(1, got.k, got.v, end, got.arena, got.meta, got.released, got.records, got.head,
                        got.failures, False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(replays):
            got.k.zero_()
            got.v.zero_()
            graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(replays):
        want.k.zero_()
        want.v.zero_()
        _open(want, 6)
    _same_plain(want, got)
