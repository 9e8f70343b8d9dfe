"""A working-set update writes its READ records with its seal's ENCRYPT records (one reservation and copy on
a device backend), after checking what could refuse the read, and writes its plaintext before it seals.

The records must be those every backend gives (the CUDA backend's twin against the native / host backend,
record for record); a refused update must leave no record of a read and none of its plaintext behind."""

from __future__ import annotations

import pytest
import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.errors import SessionExpiredError
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
from support.cache_models import tiny_model

H, D = 2, 16
_FIELDS = ("operation", "tenant_id", "layer_idx", "position", "position_count", "row", "sequence_number",
           "epoch", "nbytes", "status")


def kv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def _entries(log):
    assert log.flush(timeout=10)
    return [tuple(e.to_dict()[f] for f in _FIELDS) for e in reversed(log.entries(limit=None))]


def _run(backend, log, clock=None):
    who = [establish_tenant_session(TenantIdentity(t), ttl_seconds=3600) for t in ("alice", "bob")]
    cache = EncryptedCache(tiny_model("llama").config, sessions=who, backend=backend, audit=log,
                           mode="working_set", merge_segments=False)
    for step, n in enumerate([5, 1, 1, 1]):
        for layer in range(2):
            cache.update(*kv(2, n, seed=10 * step + layer), layer)
    cache.check()
    return cache


@pytest.mark.skipif(not kernel_shim.available(), reason="no C++ compiler for the host shim")
def test_the_device_path_writes_the_records_the_host_path_writes():
    from support.twin import CpuTwinBackend, TwinLog
    got = {}
    for name, backend, log in (("host", HostBackend(threads=1), KVAuditLog()),
                               ("twin", CpuTwinBackend(), TwinLog())):
        try:
            cache = _run(backend, log)
            got[name] = _entries(log)
            cache.close()
        finally:
            log.close()
    ops = [r[0] for r in got["twin"]]
    assert ops.count("read") == 2 * 4 * 2 and ops.count("encrypt") == 2 * (5 + 3) * 2
    # the same records; on each step a layer's ENCRYPT records come before its READ records
    assert sorted(got["twin"]) == sorted(got["host"])
    per_layer_step = [r[0] for r in got["twin"] if r[2] == 1]
    assert per_layer_step[-4:] == ["encrypt", "encrypt", "read", "read"]


def test_a_refused_update_leaves_no_read_record_and_no_plaintext(clock):
    alice = establish_tenant_session(TenantIdentity("alice"), ttl_seconds=3600, clock=clock)
    bob = establish_tenant_session(TenantIdentity("bob"), ttl_seconds=10, clock=clock)
    log = KVAuditLog()
    try:
        cache = EncryptedCache(tiny_model("llama").config, sessions=[alice, bob], backend=HostBackend(threads=1),
                               audit=log, mode="working_set", merge_segments=False)
        cache.update(*kv(2, 4), 0)
        layer = cache.layers[0]
        end = layer.cumulative_length
        before = len(_entries(log))
        clock.advance(11)                       # bob expires: the next update is refused
        k, v = kv(2, 1, seed=5)
        with pytest.raises(SessionExpiredError):
            cache.update(k + 100, v + 100, 0)   # no zeros among the values written
        assert layer.cumulative_length == end
        new = _entries(log)[before:]
        assert [r[0] for r in new] == ["encrypt"] and new[0][-1] != 0     # the refusal, nothing read
        store_k, store_v = layer._ws.k, layer._ws.v
        at = end - layer._ws.base
        assert not store_k[:, :, at].any() and not store_v[:, :, at].any()
    finally:
        log.close()


@pytest.mark.parametrize("backend", ["host", "twin"])
@pytest.mark.parametrize("mode", ["working_set", "sealed"])
def test_no_prepared_seal_or_read_keeps_an_erased_key_or_a_replaced_arena(mode, backend):
    """The prepared seals (and, sealed, reads) a cache keeps between updates hold key slots (raw keys) and
    arenas: a closed session's and a retired epoch's keys must not outlive their erasure, nor a
    compacted-away arena its use."""
    import gc
    import weakref

    from pqc_kv_cache.backends.base import KeySlot
    alice, bob = (establish_tenant_session(TenantIdentity(t), ttl_seconds=3600) for t in ("alice", "bob"))
    from support.twin import CpuTwinBackend
    be = HostBackend(threads=1) if backend == "host" else CpuTwinBackend()
    cache = EncryptedCache(tiny_model("llama").config, sessions=[alice, bob], backend=be, mode=mode,
                           merge_segments=False)
    for step, n in enumerate([4, 1, 1]):
        for layer in range(2):
            cache.update(*kv(2, n, seed=step), layer)

    def held(key: bytes) -> bool:
        gc.collect()
        return any(isinstance(o, KeySlot) and o.key == key for o in gc.get_objects())

    old = weakref.ref(cache.layers[0].arena.buffer)
    cache.layers[0].compact()
    gc.collect()
    assert old() is None
    bob_key, alice_first = bob.symmetric_key, alice.key_for_epoch(alice.epoch)
    assert held(bob_key) and held(alice_first)
    bob.close()
    assert not held(bob_key)
    alice.rotate_key()
    alice.retire_epoch(0)
    assert not held(alice_first)
    cache.close()
