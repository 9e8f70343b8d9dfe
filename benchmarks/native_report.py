"""The native host backend's layer open against one bulk AES-GCM call and against the host backend.

For each workload, every repeat times, interleaved and in rotating order:

- ``native``: NativeBackend.decrypt_chunks of the layer (ipsec-mb, one C call) split over a pool of
  ``--pool-threads`` threads (default: the CPUs this process may use, at most 4),
- ``native1``: the same call with ``threads=1`` (every chunk on the calling thread),
- ``host``: HostBackend.decrypt_chunks of the same layer (`cryptography`, the fallback path),
- ``bulk``: one ``AESGCM.decrypt_into`` of as many bytes as one message (80-byte AAD) -- the
  speed of the same library call with no chunking, no strides and no Python per chunk;

and reports GB/s (plaintext bytes opened per second) as the median with min / max over the
repeats, and the ratios native / bulk, native1 / bulk and native / host computed per repeat
(median, min, max). A call below the pool's threshold (256 KiB, e.g. the 64 KiB message) runs on
the calling thread either way.

Workloads: the README's cache configuration (batch 4, 4 KV heads x head dim 32, fp32) with
layers of 639, 1151 and 2047 positions per row, each row in 8 chunks as the cache keeps it
(a long first chunk, then 64, 32, ..., 1), opened into the head-major scratch
``[batch, heads, seq, dim]``; and single 64 KiB messages (one chunk per call).

    python benchmarks/native_report.py [--repeats 15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pqc_kv_cache.backends import native  # noqa: E402
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot  # noqa: E402
from pqc_kv_cache.backends.host import HostBackend  # noqa: E402
from pqc_kv_cache.envelope import session_tag, tenant_tag  # noqa: E402

BATCH, HEADS, DIM = 4, 4, 32


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": list(os.getloadavg())}


def layer_workload(positions: int, key: KeySlot):
    """A sealed layer as the cache lays it out: each row a long first chunk, then 64, 32, ..., 1."""
    layout = ChunkLayout(0, HEADS, DIM, torch.float32)
    tail = [64, 32, 16, 8, 4, 2, 1]
    sizes = [positions - sum(tail)] + tail
    rows, starts, counts = [], [], []
    for r in range(BATCH):
        s = 0
        for c in sizes:
            rows.append(r)
            starts.append(s)
            counts.append(c)
            s += c
    return _sealed(layout, key, positions, np.array(rows), np.array(starts), np.array(counts), BATCH)


def message_workload(key: KeySlot):
    """One 64 KiB chunk (64 positions of 4 heads x 32 fp32 for K and V)."""
    layout = ChunkLayout(0, HEADS, DIM, torch.float32)
    return _sealed(layout, key, 64, np.array([0]), np.array([0]), np.array([64]), 1)


def _sealed(layout, key, seq, rows, starts, counts, batch):
    bpp = layout.bytes_per_position
    sizes = counts * bpp + 16
    offs = np.cumsum(sizes) - sizes
    t = ChunkTable(np.zeros(rows.size, np.int64), rows.astype(np.int64), starts.astype(np.int64),
                   counts.astype(np.int64), starts.astype(np.int64), np.arange(1, rows.size + 1, dtype=np.int64),
                   offs.astype(np.int64))
    k, v = torch.randn(batch, HEADS, seq, DIM), torch.randn(batch, HEADS, seq, DIM)
    arena = torch.zeros(int(sizes.sum()), dtype=torch.uint8)
    HostBackend(threads=1).encrypt_chunks([key], layout, t, k, v, arena)
    return layout, t, arena, k, v, int((counts * bpp).sum())


def bench(workload, key: KeySlot, repeats: int, min_seconds: float, pool: int) -> dict:
    layout, t, arena, k, v, nbytes = workload
    nat, nat1, host = native.NativeBackend(threads=pool), native.NativeBackend(threads=1), HostBackend(threads=1)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    aes = AESGCM(key.key)
    nonce, aad = b"\0" * 12, b"\1" * 80
    plain = bytearray(nbytes)
    sealed_bulk = aes.encrypt(nonce, bytes(plain), aad)
    out = bytearray(nbytes)

    def run_native():
        if nat.decrypt_chunks([key], layout, t, arena, k_out, v_out).host.any():
            raise AssertionError("native open failed")

    def run_native1():
        if nat1.decrypt_chunks([key], layout, t, arena, k_out, v_out).host.any():
            raise AssertionError("native open (1 thread) failed")

    def run_host():
        if host.decrypt_chunks([key], layout, t, arena, k_out, v_out).host.any():
            raise AssertionError("host open failed")

    def run_bulk():
        aes.decrypt_into(nonce, sealed_bulk, aad, out)

    fns = {"native": run_native, "native1": run_native1, "host": run_host, "bulk": run_bulk}
    for fn in fns.values():        # warm up (and the native build)
        fn()
    for fn in (run_native, run_native1):
        k_out.zero_()
        v_out.zero_()
        fn()
        if not (torch.equal(k_out, k) and torch.equal(v_out, v)):
            raise AssertionError("native open gave other bytes")
    # iterations per timing so that one timing lasts about min_seconds for the slowest path
    t0 = time.perf_counter()
    run_host()
    inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    gbps: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            dt = time.perf_counter() - t0
            gbps[name].append(nbytes * inner / dt / 1e9)
    res: dict = {"bytes": nbytes, "chunks": len(t), "inner": inner, "threads": nat.threads}
    for name, xs in gbps.items():
        res[name] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    for a, b in (("native", "bulk"), ("native1", "bulk"), ("native", "host")):
        r = [x / y for x, y in zip(gbps[a], gbps[b])]
        res[f"{a}/{b}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    nat.close()
    nat1.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-seconds", type=float, default=0.02, help="length of one timing of the host path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the backends use one either way)")
    ap.add_argument("--pool-threads", type=int, default=None,
                    help="threads of the 'native' column (default: the CPUs this process may use, at most 4)")
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.pool_threads is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.pool_threads = max(1, min(cpus, 4))
    if not 1 <= args.pool_threads <= 64:
        ap.error("--pool-threads must be in [1, 64]")
    torch.set_num_threads(args.threads)
    try:
        lib = native.library_info()
    except Exception as exc:   # report and stop: there is nothing native to measure here
        print(f"native backend unavailable: {exc}")
        return 1
    key = KeySlot(AESGCM.generate_key(256), tenant_tag("bench"), session_tag("bench"), 0)
    results = {"machine": machine(), "ipsec_mb": lib, "workloads": {}}
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, load "
          f"{' '.join(f'{x:.2f}' for x in results['machine']['loadavg_1_5_15'])}; ipsec-mb {lib['ipsec_mb_version']} "
          f"({lib['arch']}); {args.repeats} repeats, interleaved; native: a pool of {args.pool_threads} "
          f"threads, native1: 1 thread (the default: {lib['threads']}, from {lib['threads_from']})")
    work = {f"layer {p} positions": layer_workload(p, key) for p in (639, 1151, 2047)}
    work["64 KiB message"] = message_workload(key)
    print(f"{'workload':<22}{'MiB':>7}{'chunks':>7}  {'native GB/s':>20}  {'native1 GB/s':>20}  {'host GB/s':>20}"
          f"  {'bulk GB/s':>20}  {'native/bulk':>18}  {'native1/bulk':>18}  {'native/host':>18}")
    for name, w in work.items():
        r = bench(w, key, args.repeats, args.min_seconds, args.pool_threads)
        results["workloads"][name] = r

        def f(d):
            return f"{d['median']:6.2f} [{d['min']:5.2f}-{d['max']:5.2f}]"
        print(f"{name:<22}{r['bytes'] / 2**20:7.2f}{r['chunks']:7d}  {f(r['native']):>20}  {f(r['native1']):>20}  "
              f"{f(r['host']):>20}  {f(r['bulk']):>20}  {f(r['native/bulk']):>18}  {f(r['native1/bulk']):>18}  "
              f"{f(r['native/host']):>18}")
    results["machine"]["loadavg_after"] = list(os.getloadavg())
    print(f"load after: {' '.join(f'{x:.2f}' for x in results['machine']['loadavg_after'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
