"""pytest-benchmark suite of the audit pipeline, each case beside its baseline.

Baseline: the per-record log of PQC KV Cache Encryption 0.1.0 (benchmarks/audit_report.py,
SeedAuditLog): one object per record with an ISO timestamp, a list bounded by
``pop(0)`` at 100,000 entries.  Compare the groups' means:

    python -m pytest benchmarks/bench_audit.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audit_report import LAYERS, PREFILL, Emitters, SeedAuditLog, seed_decode_step, seed_full, \
    seed_prefill_positions  # noqa: E402

from pqc_kv_cache.audit import KVAuditLog, Op  # noqa: E402


@pytest.fixture(scope="module")
def seed_at_bound():
    return seed_full(100_000)


@pytest.fixture
def emitters():
    log = KVAuditLog(max_entries=2_000_000)
    yield Emitters(log)
    log.close()


@pytest.mark.benchmark(group="decode step: 512 records")
def test_decode_step_one_emit(benchmark, emitters):
    step = iter(range(10**9))
    benchmark.pedantic(lambda: emitters.decode_step(next(step)), rounds=200, iterations=1,
                       setup=lambda: None, warmup_rounds=5)
    emitters.log.flush()


@pytest.mark.benchmark(group="decode step: 512 records")
def test_decode_step_emit_per_layer(benchmark, emitters):
    step = iter(range(10**9))
    benchmark.pedantic(lambda: emitters.decode_step_per_layer(next(step)), rounds=200, iterations=1,
                       warmup_rounds=5)
    emitters.log.flush()


@pytest.mark.benchmark(group="decode step: 512 records")
def test_decode_step_baseline_at_bound(benchmark, seed_at_bound):
    step = iter(range(10**9))
    benchmark.pedantic(lambda: seed_decode_step(seed_at_bound, next(step)), rounds=20, iterations=1)


@pytest.mark.benchmark(group="decode step: 512 records")
def test_decode_step_baseline_below_bound(benchmark):
    log = SeedAuditLog()
    step = iter(range(10**9))
    benchmark.pedantic(lambda: seed_decode_step(log, next(step)), rounds=20, iterations=1)


@pytest.mark.benchmark(group="prefill one layer: 2048 records")
def test_prefill_layer_emit_per_position(benchmark, emitters):
    log = emitters.log

    def one_layer():
        log.emit_per_position(Op.ENCRYPT, tenant_idx=emitters.t, session_idx=emitters.s, layer=3, row=0,
                              pos_start=0, pos_count=PREFILL, nonce_counter=7, nbytes=PREFILL * 4096)

    benchmark.pedantic(one_layer, rounds=100, iterations=1, warmup_rounds=2)
    log.flush()


@pytest.mark.benchmark(group="prefill one layer: 2048 records")
def test_prefill_layer_baseline_at_bound(benchmark, seed_at_bound):
    benchmark.pedantic(lambda: seed_prefill_positions(seed_at_bound, 3, PREFILL), rounds=5, iterations=1)


@pytest.mark.benchmark(group="drain: 1M records into the queryable log")
def test_drain_one_million_records(benchmark):
    layer = (np.arange(65536) % LAYERS).astype(np.uint16)
    pos = np.arange(65536, dtype=np.uint32)

    def run():
        with KVAuditLog(max_entries=1 << 20) as log:
            t = log.tenant_index("a")
            s = log.session_index("s", "a")
            for _ in range(16):
                log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=layer, pos_start=pos, pos_count=1)
            log.flush()
            assert log.stats()["drained"] == 1 << 20

    benchmark.pedantic(run, rounds=3, iterations=1)


@pytest.mark.benchmark(group="query tenant+layer+position")
def test_query_two_million_records(benchmark):
    n = 1 << 21
    rng = np.random.default_rng(0)
    with KVAuditLog(max_entries=n, ring_records=1 << 18) as log:
        for i in range(64):
            log.tenant_index(f"t{i}")
        s = log.session_index("s", "t0")
        for _ in range(n >> 18):
            k = 1 << 18
            log.emit(Op.ENCRYPT, tenant_idx=rng.integers(0, 64, k).astype(np.uint32), session_idx=s,
                     layer=rng.integers(0, LAYERS, k).astype(np.uint16),
                     pos_start=rng.integers(0, 4096, k).astype(np.uint32), pos_count=1)
        log.flush()
        benchmark(lambda: log.entries(limit=100, tenant_id="t5", layer_idx=7, position=1000))
