"""Audit pipeline against the earlier per-record log, measured in the same run.

Baseline: the KVAuditLog of PQC KV Cache Encryption 0.1.0, written as it was — one dataclass
object per record with an ISO-8601 timestamp, appended to a list that drops
its oldest entry with ``pop(0)`` beyond 100,000 entries.

Rows:
- decode step (32 layers x 16 rows = 512 ENCRYPT records): one ``emit`` per
  step, one ``emit`` per layer (16 records per call, as a cache layer's
  update), one ``emit_per_position`` per layer with every field an array
  (the host backend's former shape), and one ``emit_records`` per layer of a
  kept batch with positions and counters set each time (as the cache and the
  native backend emit now), against 512 baseline calls (below and at its
  100,000 bound);
- prefill of 2048 positions (batch 1, 32 layers): one ``emit_per_position``
  per layer (2048 records), against baseline calls per position;
- drain throughput into the queryable log (drain-thread busy time), without
  and with the signed file;
- query latency, tenant + layer + position, over 10 million records in memory
  (and the baseline's list scan at its 100,000 bound for comparison).

Emission is timed twice: with the drain thread working concurrently on the
other core (a tight loop; the worst case for sharing the GIL) and with the
drain idle during the timed batch (the compute thread's own cost, as when the
drain runs while the model computes).  Between timed batches the log is
flushed outside the timer.  Prints a markdown table and writes JSON.

    python benchmarks/audit_report.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pqc_kv_cache.audit import KVAuditLog, Op  # noqa: E402
from pqc_kv_cache.audit.fields import build_records, set_field  # noqa: E402

LAYERS, ROWS, PREFILL = 32, 16, 2048


# -- the audit log of PQC KV Cache Encryption 0.1.0, as it was written ---------------------------------
@dataclasses.dataclass
class SeedAuditEntry:
    timestamp: str
    operation: str
    tenant_id: str
    session_id: str
    layer_idx: int
    position: int
    sequence_number: int
    success: bool
    details: str | None = None


class SeedAuditLog:
    def __init__(self, max_entries: int = 100_000):
        self._entries: list[SeedAuditEntry] = []
        self._max = max_entries

    def log_encrypt(self, tenant_id, session_id, layer_idx, position, sequence_number, success=True, details=None):
        entry = SeedAuditEntry(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               operation="encrypt", tenant_id=tenant_id, session_id=session_id,
                               layer_idx=layer_idx, position=position, sequence_number=sequence_number,
                               success=success, details=details)
        self._entries.append(entry)
        if len(self._entries) > self._max:
            self._entries.pop(0)

    def entries(self, limit=100, tenant_id=None, operation=None):
        out = [e for e in reversed(self._entries)
               if (tenant_id is None or e.tenant_id == tenant_id) and (operation is None or e.operation == operation)]
        return out[:limit]


def seed_full(n=100_000) -> SeedAuditLog:
    log = SeedAuditLog()
    for i in range(n):
        log.log_encrypt(f"t{i % 64}", "s", i % LAYERS, i, i)
    return log


# -- workloads ------------------------------------------------------------------------
def seed_decode_step(log: SeedAuditLog, step: int) -> None:
    for layer in range(LAYERS):
        for row in range(ROWS):
            log.log_encrypt("tenant-a", "session-1", layer, step, step * 512 + layer * ROWS + row)


def seed_prefill_positions(log: SeedAuditLog, layer: int, n: int) -> None:
    for p in range(n):
        log.log_encrypt("tenant-a", "session-1", layer, p, p)


class Emitters:
    def __init__(self, log: KVAuditLog):
        self.log = log
        self.t = log.tenant_index("tenant-a")
        self.s = log.session_index("session-1", "tenant-a")
        self.step_layers = np.repeat(np.arange(LAYERS, dtype=np.uint16), ROWS)
        self.step_rows = np.tile(np.arange(ROWS, dtype=np.uint16), LAYERS)
        self.rows = np.arange(ROWS, dtype=np.uint16)
        self.nonce = np.arange(512, dtype=np.uint64)
        self.row_tenants = np.full(ROWS, self.t, dtype=np.uint32)
        self.row_sessions = np.full(ROWS, self.s, dtype=np.uint32)
        self.row_pos = np.zeros(ROWS, dtype=np.uint32)
        self.row_ones = np.ones(ROWS, dtype=np.uint32)
        self.row_zeros = np.zeros(ROWS, dtype=np.uint32)
        self.row_nbytes = np.full(ROWS, 4096, dtype=np.uint32)

    def decode_step(self, step: int) -> None:
        self.log.emit(Op.ENCRYPT, tenant_idx=self.t, session_idx=self.s, layer=self.step_layers,
                      row=self.step_rows, pos_start=step, pos_count=1, nonce_counter=self.nonce, nbytes=4096)

    def decode_step_per_layer(self, step: int) -> None:
        for layer in range(LAYERS):
            self.log.emit(Op.ENCRYPT, tenant_idx=self.t, session_idx=self.s, layer=layer, row=self.rows,
                          pos_start=step, pos_count=1, nonce_counter=self.nonce[:ROWS], nbytes=4096)

    def decode_step_backend_shape(self, step: int) -> None:
        """As the host backend emits: per layer, one descriptor per row, every field an array."""
        for layer in range(LAYERS):
            self.log.emit_per_position(Op.ENCRYPT, tenant_idx=self.row_tenants, session_idx=self.row_sessions,
                                       layer=layer, row=self.rows, pos_start=self.row_pos + np.uint32(step),
                                       pos_count=self.row_ones, nonce_counter=self.nonce[:ROWS],
                                       epoch=self.row_zeros, nbytes=self.row_nbytes, status=0)

    def decode_step_prepared(self, step: int) -> None:
        """As the cache and the native backend emit: per layer, a kept RECORD_DTYPE batch of its rows with
        only positions and counters set, copied into the ring by emit_records."""
        batches = self.__dict__.get("_batches")
        if batches is None:
            batches = self._batches = [build_records(int(Op.ENCRYPT), (
                self.row_tenants, self.row_sessions, layer, self.rows, 0, 1, 0, 0, 4096, 0, 0))
                for layer in range(LAYERS)]
        for batch in batches:
            set_field(batch, "pos_start", step)
            set_field(batch, "nonce_counter", self.nonce[:ROWS])
            self.log.emit_records(batch)

    def prefill_layer(self, layer: int) -> None:
        self.log.emit_per_position(Op.ENCRYPT, tenant_idx=self.t, session_idx=self.s, layer=layer, row=0,
                                   pos_start=0, pos_count=PREFILL, nonce_counter=layer, nbytes=PREFILL * 4096)


def per_record(fn, records_per_call: int, calls: int, repeats: int, between=None) -> float:
    """Median over ``repeats`` of seconds per record for ``calls`` calls of ``fn(i)``."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        samples.append((time.perf_counter() - t0) / (calls * records_per_call))
        if between is not None:
            between()
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    ap.add_argument("--out", default=os.path.join("bench-results", "audit_report.json"),
                    help="JSON output (default bench-results/audit_report.json)")
    args = ap.parse_args(argv)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    quick = args.quick
    repeats = 5 if quick else 9
    rows = []

    # decode-shaped emission
    seed_fresh = SeedAuditLog()
    seed_at_bound = seed_full(20_000 if quick else 100_000)
    if quick:
        seed_at_bound._max = 20_000
    b_fresh = per_record(lambda i: seed_decode_step(seed_fresh, i), 512, 4, repeats,
                         between=lambda: seed_fresh._entries.clear())
    b_bound = per_record(lambda i: seed_decode_step(seed_at_bound, i), 512, 4, repeats)
    ours = {}
    # Both modes use the default ring of 65536 records, whose drain wakes every 16384 records.
    # "concurrent": timed batches of 51,200-65,536 records, so the drain works while the loop emits
    # (a tight loop with no model compute between steps: the worst case for sharing the GIL).
    # "idle": timed batches of at most 15,360 records, below the wake threshold, so the drain only
    # works in the flush between batches: the cost the compute thread itself pays, as when the
    # drain runs while the model computes.
    for mode, steps, layers in (("concurrent", 100, LAYERS), ("idle", 30, 7)):
        with KVAuditLog(max_entries=2_000_000, drain_interval=60.0) as log:
            em = Emitters(log)
            # warm-up: one pass over every ring slot, so no timed batch pays first-touch page faults
            log.emit(Op.ENCRYPT, tenant_idx=em.t, session_idx=em.s, pos_start=np.arange(65536, dtype=np.uint32))
            log.flush()
            ours[mode] = dict(
                step=per_record(em.decode_step, 512, steps, repeats, between=log.flush),
                layer=per_record(em.decode_step_per_layer, 512, steps, repeats, between=log.flush),
                backend=per_record(em.decode_step_backend_shape, 512, steps, repeats, between=log.flush),
                prepared=per_record(em.decode_step_prepared, 512, steps, repeats, between=log.flush),
                prefill=per_record(lambda i: em.prefill_layer(i % LAYERS), PREFILL, layers, repeats,
                                   between=log.flush))
    b_prefill = per_record(lambda i: seed_prefill_positions(seed_at_bound, i % LAYERS, 2048), 2048, 2, repeats)
    seed_prefill = SeedAuditLog()
    b_prefill_fresh = per_record(lambda i: seed_prefill_positions(seed_prefill, i % LAYERS, 2048), 2048, 2, repeats,
                                 between=lambda: seed_prefill._entries.clear())
    bound_note = "20,000 (quick)" if quick else "100,000"
    below, at = "earlier log below its bound", f"earlier log at its {bound_note} bound"
    for key, name, baselines in (
            ("step", "decode step, 512 records: one emit per step", ((b_fresh, below), (b_bound, at))),
            ("layer", "decode step, 512 records: one emit per layer (16 records)", ((b_fresh, below), (b_bound, at))),
            ("backend", "decode step, 512 records: one emit_per_position per layer, all fields arrays "
                        "(the host backend's shape)", ((b_fresh, below), (b_bound, at))),
            ("prepared", "decode step, 512 records: one emit_records per layer of a kept batch (16 records; "
                         "the cache's and the native backend's shape)", ((b_fresh, below), (b_bound, at))),
            ("prefill", "prefill 2048 positions x 32 layers: one emit_per_position per layer", ((b_prefill_fresh, below), (b_prefill, at)))):
        for b, label in baselines:
            rows.append(dict(name=name, ours_idle_ns=ours["idle"][key] * 1e9,
                             ours_concurrent_ns=ours["concurrent"][key] * 1e9, baseline_ns=b * 1e9, baseline=label))
    for r in rows:
        r["ratio_idle"] = r["baseline_ns"] / r["ours_idle_ns"]
        r["ratio_concurrent"] = r["baseline_ns"] / r["ours_concurrent_ns"]

    # drain throughput
    n_drain = 1_000_000 if quick else 4_000_000
    batch = 65536
    drains = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in (("memory only", None), ("memory + signed file", os.path.join(tmp, "a.log"))):
            with KVAuditLog(path=path, max_entries=n_drain, fsync=False) as log:
                t = log.tenant_index("tenant-a")
                s = log.session_index("session-1", "tenant-a")
                layer = (np.arange(batch) % LAYERS).astype(np.uint16)
                pos = np.arange(batch, dtype=np.uint32)
                busy0 = log.stats()["drain_busy_s"]
                t0 = time.perf_counter()
                for _ in range(n_drain // batch):
                    log.emit(Op.ENCRYPT, tenant_idx=t, session_idx=s, layer=layer, pos_start=pos, pos_count=1)
                log.flush()
                wall = time.perf_counter() - t0
                st = log.stats()
                n = n_drain // batch * batch
                drains[label] = dict(records=n, drain_busy_s=st["drain_busy_s"] - busy0,
                                     drain_records_per_s=n / (st["drain_busy_s"] - busy0),
                                     end_to_end_records_per_s=n / wall, stalls=st["stalls"],
                                     dropped=st["dropped"], bytes_persisted=st["bytes_persisted"])

    # query latency over 10M records
    n_query = 2_000_000 if quick else 10_000_000
    with KVAuditLog(max_entries=n_query, ring_records=1 << 18) as log:
        for i in range(64):
            log.tenant_index(f"tenant-{i}")
        s = log.session_index("s", "tenant-0")
        batch = 1 << 18
        rng = np.random.default_rng(0)
        for b in range(n_query // batch):
            log.emit(Op.ENCRYPT, tenant_idx=rng.integers(0, 64, batch).astype(np.uint32), session_idx=s,
                     layer=rng.integers(0, LAYERS, batch).astype(np.uint16),
                     pos_start=rng.integers(0, 4096, batch).astype(np.uint32), pos_count=1)
        log.flush()
        in_memory = len(log)
        lat = {}
        for label, limit in (("limit=100 (newest first)", 100), ("all matches", None)):
            samples = []
            for q in range(repeats):
                t0 = time.perf_counter()
                res = log.entries(limit=limit, tenant_id=f"tenant-{q % 64}", layer_idx=q % LAYERS, position=1000 + q)
                samples.append(time.perf_counter() - t0)
            lat[label] = dict(median_ms=statistics.median(samples) * 1e3, matches_last=len(res))
    seed_q = []
    for q in range(repeats):
        t0 = time.perf_counter()
        [e for e in seed_at_bound._entries if e.tenant_id == f"t{q}" and e.layer_idx == q and e.position == 1000 + q]
        seed_q.append(time.perf_counter() - t0)
    seed_q_ms = statistics.median(seed_q) * 1e3

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} " \
              f"{platform.python_version()}, numpy {np.__version__}"
    print(f"Audit pipeline vs the earlier per-record log ({'quick' if quick else 'full'} run; {machine})\n")
    print("| workload | ns/record, drain idle | ns/record, drain concurrent | baseline | baseline ns/record "
          "| ratio, drain idle | ratio, drain concurrent |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['ours_idle_ns']:.1f} | {r['ours_concurrent_ns']:.1f} | {r['baseline']} "
              f"| {r['baseline_ns']:.0f} | {r['ratio_idle']:.0f}x | {r['ratio_concurrent']:.0f}x |")
    print("\n| drain | records | drain thread, records/s | emit + drain end to end, records/s | stalls | dropped |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, d in drains.items():
        print(f"| {label} | {d['records']:,} | {d['drain_records_per_s'] / 1e6:.1f} M | "
              f"{d['end_to_end_records_per_s'] / 1e6:.1f} M | {d['stalls']} | {d['dropped']} |")
    print("\n| query tenant + layer + position | records in memory | median latency |")
    print("|---|---:|---:|")
    for label, q in lat.items():
        print(f"| {label} | {in_memory:,} | {q['median_ms']:.1f} ms |")
    print(f"| earlier log: list scan at its {bound_note} bound | {len(seed_at_bound._entries):,} | {seed_q_ms:.1f} ms |")
    result = dict(machine=machine, quick=quick, emission=rows, drain=drains,
                  query=dict(records=in_memory, **lat, baseline_list_scan_ms=seed_q_ms,
                             baseline_records=len(seed_at_bound._entries)))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
