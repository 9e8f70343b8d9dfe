"""CPU the audit drain thread spends per record of a decode loop, beside what emitting the records costs.

The records a CUDA-backend decode loop writes per layer step: one CUDA-ring reservation of 16 records
(``records_at``, the records copied into the slots as a kernel would) and one host record
(``emit_records``), through a ``TwinLog`` (tests/support/twin.py: a real KVAuditLog whose CUDA ring
lives in host memory). Each round emits ``--steps`` layer steps while the drain sleeps (a long
``drain_interval``, rings too large for a wake-up), then ``flush()`` has the drain take them all; the
drain thread's CPU time over the flush (its thread CPU clock), per record, is set beside the emitting
thread's CPU time per record in the same round (the baseline: what the decode thread itself pays).
Two logs: in memory only, and with a signed file (fsync off: the CPU, not the disk). Prints a table,
median [min, max] over ``--rounds``, and writes JSON (``--out``).

    python benchmarks/audit_drain.py [--steps 1000] [--rounds 7] [--smoke] [--out bench-results/audit_drain.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.cache_report import cpu_model  # noqa: E402
from pqc_kv_cache.audit import RECORD_DTYPE, Op  # noqa: E402
from support.twin import TwinLog  # noqa: E402

DEVICE_RECORDS = 16     # per layer step: one reservation (the rows' ENCRYPT and READ records of a step)


def _drain_clock() -> int:
    """The CPU clock id of the (one) live audit drain thread."""
    threads = [t for t in threading.enumerate() if t.name == "pqc-kv-audit-drain"]
    if len(threads) != 1:
        raise SystemExit(f"audit_drain: expected one audit drain thread, found {len(threads)}")
    return time.pthread_getcpuclockid(threads[0].ident)


def measure(steps: int, rounds: int, path: str | None) -> list[dict]:
    log = TwinLog(path=path, fsync=False, drain_interval=3600.0, ring_records=4 * steps + 64,
                  ring_capacity=4 * DEVICE_RECORDS * steps + 64) if path else \
        TwinLog(drain_interval=3600.0, ring_records=4 * steps + 64, ring_capacity=4 * DEVICE_RECORDS * steps + 64)
    try:
        ring = log.cuda_ring("cpu")
        t = log.tenant_index("tenant")
        s = log.session_index("session", "tenant")
        dev = np.zeros(DEVICE_RECORDS, dtype=RECORD_DTYPE)
        dev["op"], dev["tenant_idx"], dev["session_idx"] = int(Op.ENCRYPT), t, s
        dev["row"], dev["nbytes"] = np.arange(DEVICE_RECORDS), 4096
        host = np.zeros(1, dtype=RECORD_DTYPE)
        host["op"], host["tenant_idx"], host["session_idx"] = int(Op.READ), t, s
        log.flush()
        clock = _drain_clock()
        out = []
        for _ in range(rounds):
            n0 = log.allocator.next_no
            e0 = time.thread_time_ns()
            for i in range(steps):
                with ring.records_at(DEVICE_RECORDS, op=int(Op.ENCRYPT), tenant_idx=t, session_idx=s,
                                     layer=i % 32) as (address, _):
                    ctypes.memmove(address, dev.ctypes.data, dev.nbytes)
                host["layer"] = i % 32
                log.emit_records(host)
            emit_ns = time.thread_time_ns() - e0
            n = log.allocator.next_no - n0
            d0 = time.clock_gettime_ns(clock)
            log.flush()
            drain_ns = time.clock_gettime_ns(clock) - d0
            out.append({"records": n, "drain_ns_per_record": drain_ns / n, "emit_ns_per_record": emit_ns / n})
        return out
    finally:
        log.close()


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="layer steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="a few steps: checks the script in seconds")
    ap.add_argument("--out", default=os.path.join("bench-results", "audit_drain.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 20, 2
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    res = {"script": "benchmarks/audit_drain.py",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu": cpu_model(), "steps": args.steps, "rounds": args.rounds, "smoke": args.smoke,
           "records_per_step": DEVICE_RECORDS + 1, "logs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("memory", None), ("file", os.path.join(tmp, "audit.kvlog"))):
            rows = measure(args.steps, args.rounds, path)
            res["logs"][name] = {key: spread([r[key] for r in rows]) for key in ("drain_ns_per_record",
                                                                                "emit_ns_per_record")}
            res["logs"][name]["drain_to_emit"] = spread([r["drain_ns_per_record"] / r["emit_ns_per_record"]
                                                         for r in rows])
    print(f"Audit drain CPU per record: {DEVICE_RECORDS} CUDA-ring + 1 host record per layer step, "
          f"{args.steps} steps per round, {args.rounds} rounds; {res['cpu']}" + (" · smoke run" if args.smoke else ""))
    print("\n| log | drain ns per record | emitter ns per record | drain / emitter |\n|---|---|---|---|")
    for name, r in res["logs"].items():
        d, e, q = r["drain_ns_per_record"], r["emit_ns_per_record"], r["drain_to_emit"]
        print(f"| {name} | {d['median']:.0f} [{d['min']:.0f}, {d['max']:.0f}] | {e['median']:.0f} "
              f"[{e['min']:.0f}, {e['max']:.0f}] | {q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}] |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
