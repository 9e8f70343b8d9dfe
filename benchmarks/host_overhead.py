"""Host work per layer update of EncryptedCache over the CUDA backend, against DynamicCache, in one run.

On a GPU the decode loop is host-bound: what a layer update costs is the time the host spends in it
(checks, tables, uploads, launches, audit commits), not the crypto, which runs asynchronously. This
script measures that time per ``cache.update(k, v, layer)`` of one decode step (one new position per
batch row) for four variants — sealed and working set, audit off and on — and DynamicCache's update.

Shape (default): a Llama-8B-shaped layer (8 KV heads x 128, bf16), batch 8 (one tenant session per
row), a context of ``--context`` positions (4096) sealed by a prefill before the timed steps.
``--layers N`` (default 1) times a decode step of N such layers, one update per layer as a model makes
them, and reports the step's time divided by N: what is prepared once per step and shared by the
layers of one shape (the sealed read's work plan) is then paid once per step, as in a model, where one
layer updated over and over pays it at every update.

- On a CPU (no CUDA device, or ``--twin``): the CUDA backend's CPU twin (``tests/support/twin.py``:
  ``CudaBackend``'s own host code) with kernel work skipped (``execute=False``), so the time is the
  backend's and the cache's host code only; the audited variants log through a real ``KVAuditLog`` whose
  CUDA ring lives in host memory (``TwinLog``, holding as many records as a GPU log's CUDA ring), so the
  CUDA-only costs of a ring commit (event record, stream wait, side-stream copy) are not in these
  figures. DynamicCache runs on CPU tensors whose layer is cropped back to one position after every
  timed update: its time is the host work of its two ``torch.cat`` calls, without the copy a GPU would
  run asynchronously.
- On a GPU: the real backend and kernels; per update the host wall time of the call and, with CUDA
  events, the GPU time of its work; DynamicCache at the full context on the device.

Each repeat runs ``--steps`` timed updates of every variant, the variants in an order that rotates from
repeat to repeat; a repeat's figure is the median over its steps; the table gives median, min and max
over ``--repeats`` and each variant's per-repeat ratio to DynamicCache, and the median over repeats of the
mean over all steps (what the steps the median passes over cost too: a merge of segments, an arena
compaction, a drain pass; on the twin the device's share of those, memory copies, runs on the host as
well, so the mean overstates a GPU's). torch runs one thread (``--threads``). Prints a markdown table
and writes JSON (``--out``).

    python benchmarks/host_overhead.py [--context 4096] [--batch 8] [--layers 1] [--steps 30]
                                       [--repeats 5] [--twin] [--smoke] [--out bench-results/host_overhead.json]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import DynamicCache, LlamaConfig  # noqa: E402

from benchmarks.cache_report import cpu_model  # noqa: E402
from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.cache import EncryptedCache  # noqa: E402
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session  # noqa: E402

DEFAULT_RING_RECORDS = inspect.signature(KVAuditLog).parameters["ring_records"].default
VARIANTS = ("dynamic", "sealed_audit_off", "sealed_audit_on", "working_set_audit_off", "working_set_audit_on")
LABELS = {"dynamic": "DynamicCache", "sealed_audit_off": "sealed, audit off", "sealed_audit_on": "sealed, audit on",
          "working_set_audit_off": "working set, audit off", "working_set_audit_on": "working set, audit on"}


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def layer_config(kv_heads: int, head_dim: int, layers: int = 1) -> LlamaConfig:
    """Llama layers of the given KV shape (the host cost is per layer; 4 query heads per KV head)."""
    return LlamaConfig(vocab_size=128, hidden_size=4 * kv_heads * head_dim, intermediate_size=256,
                       num_hidden_layers=layers, num_attention_heads=4 * kv_heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=1 << 16)


class Variant:
    """One cache under test and how to time one decode update of it."""

    def __init__(self, name, device, args, backend_factory, sessions, gpu):
        self.name = name
        self.device = device
        self.gpu = gpu
        self.log = None
        self.layers = args.layers
        shape = (args.batch, args.kv_heads, 1, args.head_dim)
        g = torch.Generator().manual_seed(1)
        self.new = [(torch.randn(shape, generator=g).to(torch.bfloat16).to(device),
                     torch.randn(shape, generator=g).to(torch.bfloat16).to(device)) for _ in range(4)]
        ctx = args.context
        if name == "dynamic":
            self.cache = DynamicCache()
            # on a CPU the layer is cropped back to one position after every update (host work only)
            self.crop = not gpu
            ctx = 1 if self.crop else ctx
            for layer in range(self.layers):
                self.cache.update(*self._prefill(args, ctx, device), layer)
            return
        self.crop = False
        mode = "sealed" if name.startswith("sealed") else "working_set"
        if name.endswith("audit_on"):
            if gpu:
                self.log = KVAuditLog()
            else:
                from support.twin import TwinLog
                # the ring a GPU's log gives its CUDA ring: as many records as the log's host ring
                # (KVAuditLog's default ring_records); a smaller one would publish (and drain) more often
                self.log = TwinLog(ring_capacity=DEFAULT_RING_RECORDS)
        self.cache = EncryptedCache(layer_config(args.kv_heads, args.head_dim, args.layers), sessions=sessions,
                                    backend=backend_factory(), audit=self.log, mode=mode)
        for layer in range(self.layers):
            self.cache.update(*self._prefill(args, ctx, device), layer)
        if gpu:
            torch.cuda.synchronize(device)

    @staticmethod
    def _prefill(args, ctx, device):
        t = torch.zeros((args.batch, args.kv_heads, ctx, args.head_dim), dtype=torch.bfloat16, device=device)
        return t, t

    def step(self, i: int) -> tuple[float, float | None]:
        """One decode step, an update per layer: (host milliseconds of the calls, GPU milliseconds of their
        work or None), each per layer update (the step's time divided by the number of layers)."""
        k, v = self.new[i % len(self.new)]
        if self.gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        update, layers = self.cache.update, self.layers
        t0 = time.perf_counter_ns()
        for layer in range(layers):
            update(k, v, layer)
        host = (time.perf_counter_ns() - t0) / 1e6 / layers
        gpu_ms = None
        if self.gpu:
            b.record()
            b.synchronize()
            gpu_ms = a.elapsed_time(b) / layers
        if self.crop:
            self.cache.crop(-1)
        return host, gpu_ms

    def close(self):
        if self.name != "dynamic":
            self.cache.check()
            self.cache.close()
        if self.log is not None:
            self.log.close()


def run(args) -> dict:
    gpu = torch.cuda.is_available() and not args.twin
    torch.set_num_threads(args.threads)
    if gpu:
        from pqc_kv_cache.backends.cuda import CudaBackend
        device = torch.device("cuda", torch.cuda.current_device())
        backend = CudaBackend.for_device(device)

        def backend_factory():
            return backend
        backend_name = "CudaBackend"
    else:
        from pqc_kv_cache.backends import kernel_shim
        if not kernel_shim.available():
            raise SystemExit("host_overhead: no C++ compiler for the host shim (the CPU twin of the CUDA backend)")
        sys.path.insert(0, str(ROOT / "tests"))
        from support.twin import CpuTwinBackend, fake_device
        device = torch.device("cpu")

        def backend_factory():   # an H100-like device: 132 SMs x 4 resident CTAs per chunk kernel
            return CpuTwinBackend(fake_device(132, 4), execute=False, record=False)
        backend_name = "CPU twin of CudaBackend, kernel work skipped"
    sessions = [establish_tenant_session(TenantIdentity(f"tenant-{i}"), ttl_seconds=3600) for i in range(args.batch)]
    print(f"host_overhead: preparing {len(VARIANTS)} variants ({args.layers} layer(s) x {args.context} positions x "
          f"batch {args.batch})",
          file=sys.stderr)
    variants = {name: Variant(name, device, args, backend_factory, sessions, gpu) for name in VARIANTS}
    host = {name: [] for name in VARIANTS}
    host_mean = {name: [] for name in VARIANTS}
    gpu_work = {name: [] for name in VARIANTS}
    try:
        for name in VARIANTS:                 # warm-up: first-call costs (key schedules, memos) untimed
            for i in range(2):
                variants[name].step(i)
        for rep in range(args.repeats):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for name in order:
                hs, gs = [], []
                for i in range(args.steps):
                    h, g = variants[name].step(i)
                    hs.append(h)
                    if g is not None:
                        gs.append(g)
                host[name].append(statistics.median(hs))
                host_mean[name].append(statistics.fmean(hs))
                if gs:
                    gpu_work[name].append(statistics.median(gs))
            print(f"host_overhead: repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    finally:
        for v in variants.values():
            v.close()
    res = {
        "script": "benchmarks/host_overhead.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "backend": backend_name, "smoke": args.smoke,
        "shape": {"kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": "bfloat16", "batch": args.batch,
                  "context": args.context, "layers": args.layers, "new_positions_per_row": 1},
        "steps": args.steps, "repeats": args.repeats,
        "host_ms_per_layer_update": {n: spread(host[n]) for n in VARIANTS},
        # the mean over every step (merges, arena compactions and drain passes included; on the twin, the
        # device's share of those, memory copies, runs on the host too)
        "host_ms_per_layer_update_mean": {n: spread(host_mean[n]) for n in VARIANTS},
        "ratio_to_dynamic": {n: spread([a / b for a, b in zip(host[n], host["dynamic"])]) for n in VARIANTS},
    }
    if gpu:
        res["gpu_ms_per_layer_update"] = {n: spread(gpu_work[n]) for n in VARIANTS if gpu_work[n]}
    return res


def markdown(res: dict) -> str:
    s = res["shape"]
    per = ("one layer updated each step" if s.get("layers", 1) == 1
           else f"a step of {s['layers']} layers, its time divided by {s['layers']}")
    lines = [f"Host work per layer update: {s['kv_heads']} KV heads x {s['head_dim']} {s['dtype']}, batch {s['batch']},"
             f" {s['context']}-position context, one new position per row, {per}; {res['backend']}; {res['cpu']}, "
             f"{res['threads']} torch thread(s); {res['repeats']} repeats x {res['steps']} steps"
             + (" · **smoke run (tiny shapes)**" if res["smoke"] else ""), "",
             "| variant | host ms per update (median [min, max] of repeats) | ratio to DynamicCache "
             "| mean of all steps |"
             + (" GPU ms |" if "gpu_ms_per_layer_update" in res else ""),
             "|---|---|---|---|" + ("---|" if "gpu_ms_per_layer_update" in res else "")]
    for n in VARIANTS:
        h = res["host_ms_per_layer_update"][n]
        r = res["ratio_to_dynamic"][n]
        line = (f"| {LABELS[n]} | {h['median']:.3f} [{h['min']:.3f}, {h['max']:.3f}] | "
                f"{r['median']:.1f}x [{r['min']:.1f}, {r['max']:.1f}] | "
                f"{res['host_ms_per_layer_update_mean'][n]['median']:.3f} |")
        if "gpu_ms_per_layer_update" in res:
            g = res["gpu_ms_per_layer_update"].get(n)
            line += f" {g['median']:.3f} |" if g else " |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096, help="positions sealed before the timed steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1, help="layers updated per decode step (times divided by it)")
    ap.add_argument("--steps", type=int, default=30, help="timed updates per variant per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--twin", action="store_true", help="the CPU twin even where a GPU is present")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script in seconds")
    ap.add_argument("--out", default=os.path.join("bench-results", "host_overhead.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.context, args.batch, args.steps, args.repeats = 16, 2, 2, 2
    for name in ("context", "batch", "kv_heads", "head_dim", "layers", "steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    res = run(args)
    table = markdown(res)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**res, "table": table}, indent=2))
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
