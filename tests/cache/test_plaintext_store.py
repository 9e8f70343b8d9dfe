"""PlaintextStore: the K/V views a working-set layer writes through and reads, cut by stride arithmetic,
are the views ``narrow`` would give, and nothing outside the written buffer is ever handed out."""

import gc
import weakref

import pytest
import torch

from pqc_kv_cache.cache.workingset import PlaintextStore


def _states(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 3, n, 4), generator=g), torch.randn((2, 3, n, 4), generator=g)


def _write(store, k, v, keep_from=0):
    """Append k / v as a working-set update does: room, the seal's plaintext copy, written."""
    k_at, v_at = store.room(k, keep_from).views(k, v)
    k_at.copy_(k)
    v_at.copy_(v)
    store.written(k.shape[2])


def test_views_equal_narrow_through_growth_and_row_selection():
    store = PlaintextStore()
    ks, vs = [], []
    for step in range(40):              # grows several times (the buffer doubles)
        k, v = _states(1 if step else 5, step)
        _write(store, k, v)
        ks.append(k)
        vs.append(v)
        if step == 25:
            store.take_rows(torch.tensor([1, 0]).numpy())
            ks, vs = [t[[1, 0]] for t in ks], [t[[1, 0]] for t in vs]
    want_k, want_v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    for start in (0, 3, 17, store.end - 1):
        k, v = store.view(start, store.end)
        a = start - store.base
        assert torch.equal(k, want_k[:, :, start:])
        assert torch.equal(v, want_v[:, :, start:])
        assert k.data_ptr() == store.k.narrow(2, a, store.end - start).data_ptr()
        assert k.stride() == store.k.stride() and v.stride() == store.v.stride()


def test_a_view_outside_the_buffer_is_refused():
    store = PlaintextStore()
    _write(store, *_states(4, 0))
    with pytest.raises(IndexError):
        store.view(0, store.base + store.capacity + 1)
    with pytest.raises(IndexError):
        store.view(store.base - 1, store.end)


def test_released_store_keeps_no_buffer_for_its_views():
    store = PlaintextStore()
    _write(store, *_states(4, 0))
    store.view(0, 4)
    gone = weakref.ref(store.k)
    store.release()
    gc.collect()
    assert not store.held and gone() is None    # nothing kept for cutting views holds the old buffer
