"""Restoring a saved EncryptedCache: bytes opened per second against one bulk AES-GCM call of the same bytes.

Config (the README's): 4 layers, hidden 256, 4 KV heads (head dim 32), batch 4, fp32, CPU; a 2048-token
cache (a 1920-token prefill and 128 decoded tokens, so the chunk table is the one generation builds:
merged segments, a few chunks per row). Variants, measured side by side in an order that rotates from
repeat to repeat:

- ``load_working_set``: ``EncryptedCache.load`` of the saved file in the working-set mode (read the
  file, verify the manifest tags, open every chunk into the working set);
- ``load_sealed``: the same file loaded in the sealed mode (every chunk opened and verified, then wiped);
- ``restore``: ``restore()`` of the same cache after ``release()`` (in memory, no file);
- ``bulk``: one ``AESGCM.decrypt_into`` of as many bytes (the baseline).

Bytes = the K/V plaintext bytes opened. Each ratio (variant bytes/s ÷ bulk bytes/s) is taken per repeat
and reported as min / median / max; the machine's load average is printed with it.

    python benchmarks/restore_report.py [--repeats 7] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cache_report import _bulk_decrypt, progress, spread  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from pqc_kv_cache.backends.host import HostBackend  # noqa: E402
from pqc_kv_cache.cache import EncryptedCache  # noqa: E402
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session  # noqa: E402

BATCH, LAYERS, HIDDEN, KV_HEADS, HEADS = 4, 4, 256, 4, 8
PREFILL, DECODE = 1920, 128


def build_cache(sessions):
    cfg = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=4096)
    cache = EncryptedCache(cfg, sessions=sessions, mode="working_set")
    g = torch.Generator().manual_seed(0)
    hd = HIDDEN // HEADS
    for n in [PREFILL] + [1] * DECODE:
        k = torch.randn(BATCH, KV_HEADS, n, hd, generator=g)
        v = torch.randn(BATCH, KV_HEADS, n, hd, generator=g)
        for layer in range(LAYERS):
            cache.update(k, v, layer)
    return cfg, cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of every variant (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: what torch chose)")
    ap.add_argument("--max-spread", type=float, default=0.15,
                    help="largest (max - min) / median of a ratio that still allows a conclusion (default 0.15)")
    ap.add_argument("--out", default=os.path.join("bench-results", "restore_report.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sessions = [establish_tenant_session(TenantIdentity(t)) for t in ("alice", "bob", "carol", "dave")]
    progress("building the 2048-token cache")
    cfg, cache = build_cache(sessions)
    nbytes = sum(layer.get_seq_length() * BATCH * 2 * KV_HEADS * (HIDDEN // HEADS) * 4 for layer in cache.layers)
    chunks = sum(layer.num_segments * BATCH for layer in cache.layers)
    tmp = tempfile.mkdtemp(prefix="restore-report-")
    path = os.path.join(tmp, "cache.pkvf")
    cache.save(path)
    file_bytes = os.path.getsize(path)

    def restore():
        cache.release()
        t = time.perf_counter()
        cache.restore()
        return time.perf_counter() - t

    def timed(fn):
        """Time ``fn``; a cache it returns is closed (its bytes zeroed) outside the timed part."""
        def run():
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            if isinstance(out, EncryptedCache):
                out.close()
            return dt
        return run

    bulk = _bulk_decrypt(nbytes)
    variants = {
        "load_working_set": timed(lambda: EncryptedCache.load(path, cfg, sessions, mode="working_set")),
        "load_sealed": timed(lambda: EncryptedCache.load(path, cfg, sessions, mode="sealed")),
        "restore": restore,
        "bulk": timed(bulk),
    }
    names = list(variants)
    for fn in variants.values():     # warm-up
        fn()
    ts: dict[str, list[float]] = {n: [] for n in names}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        progress(f"repeat {r + 1}/{args.repeats}")
        for n in names[r % len(names):] + names[:r % len(names)]:
            ts[n].append(variants[n]())
    load_after = os.getloadavg()
    os.remove(path)
    os.rmdir(tmp)

    results = {}
    for n in names:
        if n == "bulk":
            continue
        results[n] = {"bytes_per_s": nbytes / statistics.median(ts[n]),
                      "ratio_to_bulk": spread([b / a for a, b in zip(ts[n], ts["bulk"])], args.max_spread)}
    report = {
        "config": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "batch": BATCH, "dtype": "float32",
                   "positions": PREFILL + DECODE, "plaintext_bytes": nbytes, "chunks": chunks,
                   "file_bytes": file_bytes},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": threads, "backend_threads": HostBackend.instance().threads,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "bulk_aesgcm_bytes_per_s": nbytes / statistics.median(ts["bulk"]),
        "variants": results,
        "repeats": args.repeats,
    }
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"restore of {PREFILL + DECODE} positions × {LAYERS} layers × batch {BATCH} fp32: "
          f"{nbytes / 2**20:.1f} MiB of K/V in {chunks} chunks; file {file_bytes / 2**20:.1f} MiB")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs, "
          f"torch threads {threads}")
    print(f"bulk AES-GCM: {report['bulk_aesgcm_bytes_per_s'] / 1e9:.2f} GB/s (median)")
    print("| variant | GB/s (median) | ratio to bulk: median | min | max | verdict |")
    print("|---|---|---|---|---|---|")
    for n, r in results.items():
        q = r["ratio_to_bulk"]
        print(f"| {n} | {r['bytes_per_s'] / 1e9:.2f} | {q['median']:.2f} | {q['min']:.2f} | {q['max']:.2f} "
              f"| {q['verdict']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
