"""GPU suite (issue 5): CUDA kernel throughput, decode-step cost of EncryptedCache vs DynamicCache, audit cost.

Measured in one run, on one device, every figure beside its baseline:

1. kernel throughput, GB/s of plaintext: CudaBackend.encrypt_chunks and
   decrypt_chunks (decrypt + verify), audit off, 8 KV heads x 128 head dim bf16,
   128 MiB of K+V per call, chunks of 1 and of 64 positions. Timed with CUDA
   events around back-to-back calls (the host-side table building of a call
   overlaps the previous call's kernels), median of the repeats. With 1-position
   chunks a call carries 32K chunks, whose host-side table work (a few ms) can
   exceed the kernel time: that figure is then a floor set by the host, not the
   kernel's speed (the 64-position figure is the kernel's);
2. decode-step time of a Llama-shaped random model (hidden 4096, 32 query
   heads, 8 KV heads x 128, bf16, ``--layers`` layers) at batch 8 and 1K / 4K
   context: DynamicCache, EncryptedCache with audit off and with audit on,
   interleaved, median step time over ``--steps`` steps; ratios to DynamicCache
   and audit on / off;
3. audit records per second drained (KVAuditLog.stats() over the audit-on run);
4. host synchronisations counted in the EncryptedCache decode steps with
   ``torch.cuda.set_sync_debug_mode("warn")`` (and in the DynamicCache steps,
   as the model's own baseline).

Prints one markdown table and writes JSON::

    python benchmarks/gpu_suite.py --out results.json

``--smoke`` runs tiny shapes (also on a CPU, host backend, no kernel section) to check
the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pqc_kv_cache import TenantIdentity, TenantIsolationManager  # noqa: E402
from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot  # noqa: E402
from pqc_kv_cache.envelope import session_tag, tenant_tag  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed milliseconds of a region: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            self.a = torch.cuda.Event(enable_timing=True)
            self.b = torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = (time.perf_counter() - self.t) * 1e3


# ---------------------------------------------------------------------------- 1. kernels

def kernel_throughput(device, positions_per_chunk: int, total_positions: int, batch: int, repeats: int) -> dict:
    from pqc_kv_cache.backends.cuda import CudaBackend

    be = CudaBackend.for_device(device)
    heads, dim, dtype = 8, 128, torch.bfloat16
    layout = ChunkLayout(0, heads, dim, dtype)
    seq = total_positions
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, generator=g)
    per_row = seq // positions_per_chunk
    n = batch * per_row
    row = np.repeat(np.arange(batch, dtype=np.int64), per_row)
    start = np.tile(np.arange(per_row, dtype=np.int64) * positions_per_chunk, batch)
    count = np.full(n, positions_per_chunk, dtype=np.int64)
    size = positions_per_chunk * layout.bytes_per_position + 16
    offset = np.arange(n, dtype=np.int64) * size
    counter = np.arange(1, n + 1, dtype=np.int64)
    keys = [KeySlot(os.urandom(32), tenant_tag(f"t{i}"), session_tag(f"s{i}"), 0) for i in range(batch)]
    table = ChunkTable(row.copy(), row, start, count, start, counter, offset)
    arena = torch.empty(n * size, dtype=torch.uint8, device=device)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    plain = batch * seq * layout.bytes_per_position
    be.encrypt_chunks(keys, layout, table, k, v, arena)            # warm-up (module, key schedules)
    be.decrypt_chunks(keys, layout, table, arena, k_out, v_out)
    _sync(device)
    be.check()
    res = {}
    for name, fn in (("encrypt", lambda: be.encrypt_chunks(keys, layout, table, k, v, arena)),
                     ("decrypt_verify", lambda: be.decrypt_chunks(keys, layout, table, arena, k_out, v_out))):
        times = []
        for _ in range(repeats):
            with Timer(device) as t:
                for _ in range(3):
                    fn()
            times.append(t.ms / 3)
        ms = statistics.median(times)
        res[name] = {"ms": ms, "GBps": plain / (ms * 1e-3) / 1e9}
    be.check()
    ok = torch.equal(k_out, k) and torch.equal(v_out, v)
    res.update({"chunks": n, "positions_per_chunk": positions_per_chunk, "plaintext_bytes": plain,
                "roundtrip_ok": bool(ok)})
    return res


# ---------------------------------------------------------------------------- 2. decode steps

def build_model(device, layers: int, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          max_position_embeddings=8192)
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          max_position_embeddings=8192)
        dtype = torch.bfloat16
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model, cfg


class SyncCounter:
    """Counts the host synchronisations torch reports in sync debug mode "warn"."""

    def __init__(self, device):
        self.device = device
        self.count = 0

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self.count = sum(1 for w in self._log if "synchroniz" in str(w.message).lower())
        self._cm.__exit__(*exc)


def decode_steps(model, cfg, device, batch: int, context: int, steps: int, make_cache) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), generator=g).to(device)
    cache = make_cache()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        # one untimed step, then the timed ones
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times = []
        with SyncCounter(device) as sc:
            for _ in range(steps):
                with Timer(device) as t:
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                times.append(t.ms)
    chk = getattr(cache, "check", None)
    if callable(chk):
        chk()
    return {"step_ms": statistics.median(times), "syncs": sc.count, "steps": steps}


def decode_suite(device, layers: int, batch: int, contexts, steps: int, repeats: int, smoke: bool) -> dict:
    from transformers import DynamicCache

    from pqc_kv_cache.cache import EncryptedCache

    model, cfg = build_model(device, layers, smoke)
    mgr = TenantIsolationManager()
    sessions = [mgr.create_session(TenantIdentity(f"bench-tenant-{i}")) for i in range(batch)]
    log = KVAuditLog()
    variants = {
        "dynamic": lambda: DynamicCache(config=cfg),
        "encrypted_audit_off": lambda: EncryptedCache(cfg, sessions=sessions, audit=None),
        "encrypted_audit_on": lambda: EncryptedCache(cfg, sessions=sessions, audit=log),
    }
    results = {}
    t0 = time.perf_counter()
    drained0 = log.stats()["drained"]
    for ctx in contexts:
        per = {k: [] for k in variants}
        syncs = {k: 0 for k in variants}
        for _ in range(repeats):
            for name, make in variants.items():
                r = decode_steps(model, cfg, device, batch, ctx, steps, make)
                per[name].append(r["step_ms"])
                syncs[name] = max(syncs[name], r["syncs"])
        med = {k: statistics.median(v) for k, v in per.items()}
        results[ctx] = {
            "step_ms": med, "syncs": syncs,
            "encrypted_vs_dynamic": med["encrypted_audit_on"] / med["dynamic"],
            "encrypted_audit_off_vs_dynamic": med["encrypted_audit_off"] / med["dynamic"],
            "audit_on_vs_off": med["encrypted_audit_on"] / med["encrypted_audit_off"],
        }
    log.flush()
    elapsed = time.perf_counter() - t0
    st = log.stats()
    drain_s = st.get("drain_busy_s") or 0.0
    drained = st["drained"] - drained0
    audit = {"drained": drained, "emitted": st["emitted"], "dropped": st["dropped"], "stalls": st["stalls"],
             "records_per_s_wall": drained / elapsed if elapsed > 0 else None,
             "records_per_s_drain_busy": drained / drain_s if drain_s > 0 else None}
    log.close()
    return {"contexts": results, "audit": audit, "layers": cfg.num_hidden_layers, "batch": batch}


# ---------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    lines = [f"GPU suite — {res['device']} — {res['date']}", "",
             "| measurement | value | baseline | ratio |", "|---|---|---|---|"]
    for key, kr in res.get("kernels", {}).items():
        for op in ("encrypt", "decrypt_verify"):
            lines.append(f"| kernel {op}, {kr['positions_per_chunk']} pos/chunk ({kr['chunks']} chunks) "
                         f"| {kr[op]['GBps']:.1f} GB/s | — | — |")
    dec = res.get("decode", {})
    for ctx, r in dec.get("contexts", {}).items():
        m = r["step_ms"]
        lines.append(f"| decode step, ctx {ctx}, EncryptedCache audit on | {m['encrypted_audit_on']:.3f} ms "
                     f"| DynamicCache {m['dynamic']:.3f} ms | {r['encrypted_vs_dynamic']:.2f}x |")
        lines.append(f"| decode step, ctx {ctx}, EncryptedCache audit off | {m['encrypted_audit_off']:.3f} ms "
                     f"| DynamicCache {m['dynamic']:.3f} ms | {r['encrypted_audit_off_vs_dynamic']:.2f}x |")
        lines.append(f"| audit on vs off, ctx {ctx} | {m['encrypted_audit_on']:.3f} ms "
                     f"| {m['encrypted_audit_off']:.3f} ms | {r['audit_on_vs_off']:.3f}x |")
        s = r["syncs"]
        lines.append(f"| host syncs in {dec.get('steps', '?')} decode steps, ctx {ctx} (enc on / enc off) "
                     f"| {s['encrypted_audit_on']} / {s['encrypted_audit_off']} | DynamicCache {s['dynamic']} | — |")
    a = dec.get("audit")
    if a:
        rps = a["records_per_s_wall"]
        lines.append(f"| audit records drained | {a['drained']} ({rps:.0f}/s wall) | dropped {a['dropped']} "
                     f"| stalls {a['stalls']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    # transformers 5.x announces a rename of past_key_values; the suite keeps the name every 5.x accepts
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_suite.json", help="JSON output path")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random Llama (default 4)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU (no kernel section)")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_suite: no CUDA device here (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    res = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'unknown'})",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "smoke": args.smoke}
    if cuda:
        import cupy
        res["cupy"] = cupy.__version__
        batch, total = (2, 256) if args.smoke else (8, 4096)
        res["kernels"] = {}
        for ppc in (1, 64):
            res["kernels"][f"{ppc}pos"] = kernel_throughput(device, ppc, total, batch, args.repeats)
            print(f"kernels {ppc} pos/chunk: {json.dumps(res['kernels'][f'{ppc}pos'])}", flush=True)
    if not args.skip_decode:
        contexts = (64, 128) if args.smoke else (1024, 4096)
        batch = 2 if args.smoke else 8
        steps = min(args.steps, 3) if args.smoke else args.steps
        repeats = 1 if args.smoke else args.repeats
        res["decode"] = decode_suite(device, args.layers, batch, contexts, steps, repeats, args.smoke)
        res["decode"]["steps"] = steps
    table = markdown(res)
    res["markdown"] = table
    print(table)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
