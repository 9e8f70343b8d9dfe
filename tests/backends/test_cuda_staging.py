"""The CUDA backend's staging ring over a fake device whose events complete only when told: a region is
never handed out while the device may still read it, the ring grows instead of waiting, and a region's
parts land where the kernels are told they are."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pqc_kv_cache.backends.cuda_staging import ALIGN, Packed, StagingRing


class _Event:
    def __init__(self):
        self.complete = False


class FakeDevice:
    """Host buffers; every recorded event stays incomplete until ``finish()``; ``fail_record`` makes the
    next record raise."""

    def __init__(self):
        self.events: list[_Event] = []
        self.uploads = 0
        self.fail_record = False

    def pinned(self, nbytes):
        return torch.zeros(nbytes, dtype=torch.uint8)

    def empty(self, nbytes):
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)

    def upload(self, dst, src):
        self.uploads += 1
        dst.copy_(src)

    def upload_raw(self, dst_ptr, src_ptr, nbytes):
        self.uploads += 1
        ctypes.memmove(dst_ptr, src_ptr, nbytes)

    def record(self):
        if self.fail_record:
            self.fail_record = False
            raise RuntimeError("CUDA error: an illegal memory access")
        ev = _Event()
        self.events.append(ev)
        return ev

    @staticmethod
    def done(ev):
        return ev.complete

    def finish(self):
        for ev in self.events:
            ev.complete = True


def _take(ring, nbytes):
    """Take a region of ``nbytes`` and leave its block; its (buffers, start, end)."""
    p = Packed()
    p.reserve(nbytes)
    with ring.region(p) as g:
        ring.upload(g)
        return g.buffers, g.start, g.start + g.size


def test_a_region_still_in_use_is_never_handed_out_again():
    dev = FakeDevice()
    ring = StagingRing(dev, initial=4 * ALIGN)
    taken = [_take(ring, ALIGN) for _ in range(10)]       # nothing completes: the ring must grow
    for i, (b1, s1, e1) in enumerate(taken):
        for b2, s2, e2 in taken[i + 1:]:
            assert b1 is not b2 or e1 <= s2 or e2 <= s1, "overlapping regions in flight"
    assert ring.capacity >= 8 * ALIGN
    dev.finish()
    buf, start, _ = _take(ring, ALIGN)                    # everything complete: the current buffers are reused
    assert buf is taken[-1][0]


def test_completed_regions_are_reused_without_growing():
    dev = FakeDevice()
    ring = StagingRing(dev, initial=4 * ALIGN)
    for _ in range(50):
        _take(ring, ALIGN)
        dev.finish()
    assert ring.capacity == 4 * ALIGN


def test_parts_land_at_their_offsets_and_zeroed_parts_are_zero():
    dev = FakeDevice()
    ring = StagingRing(dev, initial=4096)
    a = np.arange(10, dtype=np.int64)
    b = np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2]      # not contiguous
    p = Packed()
    oa, oz, ob = p.add(a), p.reserve(40, zero=True), p.add(b)
    assert oa % ALIGN == oz % ALIGN == ob % ALIGN == 0
    with ring.region(p) as g:
        g.host[oz:oz + 40] = 7              # what an earlier call left there is overwritten at take time
        ring.upload(g)
        assert ring.device_view(g, oa, a.nbytes).view(torch.int64).tolist() == a.tolist()
        assert ring.device_view(g, ob, 32).view(torch.int64).tolist() == [0, 2, 3, 5]
    p2 = Packed()
    o2 = p2.reserve(40, zero=True)
    with ring.region(p2) as g2:
        ring.upload(g2)
        assert not ring.device_view(g2, o2, 40).any()


def test_an_exception_in_the_block_still_marks_the_region_and_a_failed_event_retires_the_buffers():
    dev = FakeDevice()
    ring = StagingRing(dev, initial=4 * ALIGN)
    p = Packed()
    p.reserve(ALIGN)
    with pytest.raises(ValueError):
        with ring.region(p):
            raise ValueError("launch failed")
    assert len(dev.events) == 1                            # the region waits for the device like any other
    dev.fail_record = True
    first, _, _ = _take_failing(ring)
    second, _, _ = _take(ring, ALIGN)
    assert second is not first                             # never handed out again: its users are unknown


def _take_failing(ring):
    p = Packed()
    p.reserve(ALIGN)
    with pytest.raises(RuntimeError, match="illegal"):
        with ring.region(p) as g:
            got = (g.buffers, g.start, g.start + g.size)
    return got
