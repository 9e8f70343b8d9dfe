"""GPU suite: proves the CUDA path correct and measures what sealing the KV cache costs, in one run.

Sections, each run under its own time budget; the JSON and the markdown table are
rewritten after every section, and a section that raises records its traceback
and the run goes on:

1. environment — device, driver, versions, date (the head of the table);
2. correctness — chunks of 1, 64 and 4096 positions sealed by the device
   backend open with plain ``AESGCM`` and with the host backend (and are the
   host's bytes), and chunks sealed by the host open on the device;
3. kernels — ``encrypt_chunks`` and ``decrypt_chunks`` (decrypt + verify)
   throughput, GB/s of plaintext, audit off, 8 KV heads x 128 bf16, 128 MiB
   of K+V per call, chunks of 1, 64 and 4096 positions; CUDA events around
   back-to-back calls, median of the repeats;
4. decode — a Llama-8B-shaped random model (hidden 4096, 32 query heads,
   8 KV heads x 128, bf16, ``--layers`` layers), batch 8, 1K and 4K context.
   Per context, every cache variant (``VARIANTS``: DynamicCache, the sealed
   EncryptedCache with audit off and on) first runs a checking pass — greedy
   tokens compared with DynamicCache's, host synchronisations counted per
   phase (prefill, decode) with ``torch.cuda.set_sync_debug_mode("warn")``,
   and, where the count is 0, the same phases again under ``"error"`` — then
   timed runs interleaved across variants; medians with min / max over the
   repeats, ratios to DynamicCache, and the lower bound
   ``1 + KV bytes / (decrypt rate x plain step time)`` beside the sealed ratio.
   Each step's host time (from the call until the host has enqueued its work)
   is measured beside its GPU time; a figure whose host time is at least
   ``HOST_BOUND_SHARE`` of its step time is labelled host-bound in the table
   (the GPU waited for the host, so the ratio measures host work, not crypto);
5. audit — records drained per second of drain busy time, ring stalls,
   drops, over the audit-on runs of section 4; flush and close under a timeout;
6. decode_32_layers — section 4 at 4K context only, on the same model shape
   with ``--long-layers`` (32) layers, the depth of the real model: the host
   cost of an update is paid per layer, so a few layers understate it.

::

    python benchmarks/gpu_suite.py --out results.json      # also writes results.md

``--smoke`` runs every section with tiny shapes; on a CPU the device backend is
the CPU twin of the CUDA backend (its host code, each kernel launch carried out
by the g++-compiled host shim) and the host backend is the reference.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pqc_kv_cache import TenantIdentity, TenantIsolationManager  # noqa: E402
from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot  # noqa: E402
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag  # noqa: E402

SECTIONS = ("environment", "correctness", "kernels", "decode", "audit", "decode_32_layers")
AUDIT_TIMEOUT_S = 60.0
HOST_BOUND_SHARE = 0.9   # host time / step time at or above which a step figure is labelled host-bound


class SuiteError(RuntimeError):
    """A check of the suite did not hold."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Elapsed milliseconds of a region (``ms``: CUDA events on a GPU, perf_counter on a CPU) and the host's
    part of it (``host_ms``: perf_counter from entry until the region's work is enqueued, before the wait)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.t = time.perf_counter()
        if self.device.type == "cuda":
            self.a = torch.cuda.Event(enable_timing=True)
            self.b = torch.cuda.Event(enable_timing=True)
            self.a.record()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.b.record()
            self.host_ms = (time.perf_counter() - self.t) * 1e3
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = self.host_ms = (time.perf_counter() - self.t) * 1e3


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------------------- backends

def device_backend(device):
    """The backend under test: CudaBackend on a GPU; on a CPU its twin (the CUDA backend's host code with
    each launch run by the host shim), the one the tests use (tests/support/twin.py)."""
    if device.type == "cuda":
        from pqc_kv_cache.backends.cuda import CudaBackend
        return CudaBackend.for_device(device)
    from pqc_kv_cache.backends import kernel_shim

    if not kernel_shim.available():
        raise SuiteError("no C++ compiler for the host shim: the CPU twin of the CUDA backend cannot be built")
    sys.path.insert(0, str(ROOT / "tests"))
    from support.twin import CpuTwinBackend
    return CpuTwinBackend()


def host_backend():
    from pqc_kv_cache.backends.host import HostBackend
    return HostBackend.instance()


@dataclass
class Shapes:
    """Every size the suite uses; ``full`` for a GPU host, ``smoke`` to check the script in seconds."""

    heads: int
    head_dim: int
    dtype: torch.dtype
    correctness_positions: tuple
    kernel_positions: tuple
    kernel_batch: int
    kernel_seq: int
    contexts: tuple
    batch: int
    steps: int
    check_steps: int
    repeats: int
    layers: int = 2            # decoder layers of the decode section's model
    long_layers: int = 3       # ... of the decode_32_layers section's (0: section not run)
    long_contexts: tuple = (16,)

    @classmethod
    def full(cls, args) -> "Shapes":
        return cls(8, 128, torch.bfloat16, (1, 64, 4096), (1, 64, 4096), 8, 4096, (1024, 4096), 8,
                   args.steps, 4, args.repeats, args.layers, args.long_layers, (4096,))

    @classmethod
    def smoke(cls, args) -> "Shapes":
        return cls(2, 64, torch.bfloat16, (1, 64, 4096), (1, 16, 64), 2, 64, (8, 16), 2, 2, 2, 2)


# ---------------------------------------------------------------------------- 1. environment

def _run_quiet(cmd) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return "not installed"


def environment(device, state) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": _version("transformers"), "numpy": np.__version__,
           "cryptography": _version("cryptography"), "cupy": None, "commit": _run_quiet(["git", "rev-parse",
                                                                                       "--short", "HEAD"])}
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env["host_cpu"] = cpu or "unknown"
    if device.type == "cuda":
        import cupy
        env["cupy"] = cupy.__version__
        env["device"] = torch.cuda.get_device_name(device)
        env["sms"] = torch.cuda.get_device_properties(device).multi_processor_count
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                          f"--id={device.index}"])
        env["driver"] = smi or f"CUDA driver API {cupy.cuda.runtime.driverGetVersion()}"
    else:
        env["device"] = f"cpu ({env['host_cpu']})"
        env["driver"] = "n/a"
    env["backend_under_test"] = type(state["device_backend"]).__name__
    return env


# ---------------------------------------------------------------------------- 2. correctness

def _keys(n: int, epoch: int = 3):
    names = [(f"suite-tenant-{i}", f"suite-session-{i}") for i in range(n)]
    keys = [KeySlot(os.urandom(32), tenant_tag(t), session_tag(s), epoch) for t, s in names]
    return keys, names


def _one_chunk_per_row(rows: int, positions: int, bpp: int, first_counter: int, pos_start: int = 5):
    size = positions * bpp + 16
    r = np.arange(rows, dtype=np.int64)
    return ChunkTable(r.copy(), r.copy(), np.full(rows, pos_start, np.int64), np.full(rows, positions, np.int64),
                      np.zeros(rows, np.int64), first_counter + r, r * size), rows * size


def _plain(k, v, row, n) -> bytes:
    return (k[row, :, :n].contiguous().cpu().view(torch.uint8).numpy().tobytes()
            + v[row, :, :n].contiguous().cpu().view(torch.uint8).numpy().tobytes())


def correctness(device, state, shapes: Shapes) -> dict:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    dev_be, host_be = state["device_backend"], host_backend()
    layout = ChunkLayout(7, shapes.heads, shapes.head_dim, shapes.dtype)
    bpp = layout.bytes_per_position
    dname = str(shapes.dtype).removeprefix("torch.")
    rows = 2
    out, ok = {}, True
    for n in shapes.correctness_positions:
        keys, names = _keys(rows)
        g = torch.Generator(device="cpu").manual_seed(n)
        k = torch.randn(rows, shapes.heads, n, shapes.head_dim, generator=g).to(shapes.dtype).to(device)
        v = torch.randn(rows, shapes.heads, n, shapes.head_dim, generator=g).to(shapes.dtype).to(device)
        table, size = _one_chunk_per_row(rows, n, bpp, first_counter=100)
        # device seals
        arena = torch.zeros(size, dtype=torch.uint8, device=device)
        dev_be.encrypt_chunks(keys, layout, table, k, v, arena)
        dev_be.check()
        sealed = arena.cpu()
        aesgcm_ok = True
        for r in range(rows):
            off, nb = int(table.offset[r]), n * bpp + 16
            aad = build_aad(tenant_id=names[r][0], session_id=names[r][1], epoch=keys[r].epoch,
                            layer_idx=layout.layer_idx, position=int(table.pos_start[r]), position_count=n,
                            key_len=n * bpp // 2, dtype=dname, num_heads=layout.num_heads,
                            head_dim=layout.head_dim)
            got = AESGCM(keys[r].key).decrypt(make_nonce(keys[r].epoch, int(table.counter[r])),
                                              sealed[off:off + nb].numpy().tobytes(), aad)
            aesgcm_ok &= got == _plain(k, v, r, n)
        k_h, v_h = torch.empty_like(k, device="cpu"), torch.empty_like(v, device="cpu")
        st = host_be.decrypt_chunks(keys, layout, table, sealed, k_h, v_h).host
        host_opens = bool(not st.any() and torch.equal(k_h, k.cpu()) and torch.equal(v_h, v.cpu()))
        # the host seals the same table: GCM is deterministic, so the bytes must be the device's
        ref = torch.zeros(size, dtype=torch.uint8)
        host_be.encrypt_chunks(keys, layout, table, k.cpu(), v.cpu(), ref)
        same_bytes = bool(torch.equal(ref, sealed))
        # the host seals under fresh counters; the device opens
        table2, _ = _one_chunk_per_row(rows, n, bpp, first_counter=10_000)
        ref2 = torch.zeros(size, dtype=torch.uint8)
        host_be.encrypt_chunks(keys, layout, table2, k.cpu(), v.cpu(), ref2)
        k_d, v_d = torch.full_like(k, 3.0), torch.full_like(v, 3.0)
        st2 = dev_be.decrypt_chunks(keys, layout, table2, ref2.to(device), k_d, v_d).device
        dev_be.check()
        device_opens = bool(not torch.as_tensor(st2).cpu().any() and torch.equal(k_d, k) and torch.equal(v_d, v))
        row = {"positions": n, "chunk_bytes": n * bpp, "device_sealed_open_with_aesgcm": bool(aesgcm_ok),
               "device_sealed_open_with_host_backend": host_opens, "device_bytes_equal_host_bytes": same_bytes,
               "host_sealed_open_on_device": device_opens}
        row["ok"] = all(v for key, v in row.items() if key not in ("positions", "chunk_bytes"))
        ok &= row["ok"]
        out[str(n)] = row
    return {"ok": bool(ok), "chunks": out, "layout": f"{shapes.heads} heads x {shapes.head_dim} {dname}"}


# ---------------------------------------------------------------------------- 3. kernels

def kernel_throughput(device, state, shapes: Shapes, positions_per_chunk: int) -> dict:
    be = state["device_backend"]
    layout = ChunkLayout(0, shapes.heads, shapes.head_dim, shapes.dtype)
    batch, seq = shapes.kernel_batch, shapes.kernel_seq
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(batch, shapes.heads, seq, shapes.head_dim, generator=g).to(shapes.dtype).to(device)
    v = torch.randn(batch, shapes.heads, seq, shapes.head_dim, generator=g).to(shapes.dtype).to(device)
    per_row = seq // positions_per_chunk
    n = batch * per_row
    row = np.repeat(np.arange(batch, dtype=np.int64), per_row)
    start = np.tile(np.arange(per_row, dtype=np.int64) * positions_per_chunk, batch)
    size = positions_per_chunk * layout.bytes_per_position + 16
    keys = [KeySlot(os.urandom(32), tenant_tag(f"t{i}"), session_tag(f"s{i}"), 0) for i in range(batch)]
    table = ChunkTable(row.copy(), row, start, np.full(n, positions_per_chunk, np.int64), start,
                       np.arange(1, n + 1, dtype=np.int64), np.arange(n, dtype=np.int64) * size)
    arena = torch.empty(n * size, dtype=torch.uint8, device=device)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    plain = batch * seq * layout.bytes_per_position
    be.encrypt_chunks(keys, layout, table, k, v, arena)            # warm-up (module, key schedules)
    be.decrypt_chunks(keys, layout, table, arena, k_out, v_out)
    _sync(device)
    be.check()
    res = {"chunks": n, "positions_per_chunk": positions_per_chunk, "plaintext_bytes": plain}
    for name, fn in (("encrypt", lambda: be.encrypt_chunks(keys, layout, table, k, v, arena)),
                     ("decrypt_verify", lambda: be.decrypt_chunks(keys, layout, table, arena, k_out, v_out))):
        times = []
        for _ in range(shapes.repeats):
            with Timer(device) as t:
                for _ in range(3):
                    fn()
            times.append(t.ms / 3)
        s = spread(times)
        res[name] = {"ms": s, "GBps": plain / (s["median"] * 1e-3) / 1e9,
                     "GBps_min": plain / (s["max"] * 1e-3) / 1e9, "GBps_max": plain / (s["min"] * 1e-3) / 1e9}
    be.check()
    res["roundtrip_ok"] = bool(torch.equal(k_out, k) and torch.equal(v_out, v))
    return res


def kernels(device, state, shapes: Shapes) -> dict:
    out = {f"{p}pos": kernel_throughput(device, state, shapes, p) for p in shapes.kernel_positions}
    return {"ok": all(r["roundtrip_ok"] for r in out.values()), "runs": out,
            "best_decrypt_GBps": max(r["decrypt_verify"]["GBps"] for r in out.values())}


# ---------------------------------------------------------------------------- 4. decode

def build_model(device, layers: int, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
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
    return model, cfg, dtype


class SyncCounter:
    """Counts the host synchronisations torch reports in sync debug mode "warn" (the same events that mode
    "error" raises on). On a CPU there is nothing to count: ``count`` stays None."""

    def __init__(self, device):
        self.device = device
        self.count = None

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


@dataclass
class Variant:
    """One cache measured in the decode section. Adding a cache mode is one more entry in VARIANTS."""

    name: str
    make: Callable            # (cfg, sessions, log, backend) -> cache
    audited: bool = False
    sealed: bool = False
    requires: str | None = None   # an EncryptedCache keyword the variant needs (skipped where absent)


def _encrypted(**kw):
    def make(cfg, sessions, log, backend):
        from pqc_kv_cache.cache import EncryptedCache
        return EncryptedCache(cfg, sessions=sessions, backend=backend, **kw)
    return make


def _dynamic(cfg, sessions, log, backend):
    from transformers import DynamicCache
    return DynamicCache(config=cfg)


VARIANTS = [
    Variant("DynamicCache", _dynamic),
    Variant("sealed, audit off", lambda c, s, log, b: _encrypted(audit=None)(c, s, log, b), sealed=True),
    Variant("sealed, audit on", lambda c, s, log, b: _encrypted(audit=log)(c, s, log, b), audited=True, sealed=True),
    Variant("working set, audit on", lambda c, s, log, b: _encrypted(audit=log, mode="working_set")(c, s, log, b),
            audited=True, requires="mode"),
]


def available_variants():
    from pqc_kv_cache.cache import EncryptedCache

    params = inspect.signature(EncryptedCache.__init__).parameters
    use = [v for v in VARIANTS if v.requires is None or v.requires in params]
    return use, [v.name for v in VARIANTS if v not in use]


def _step(model, ids, cache):
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _check_cache(cache):
    chk = getattr(cache, "check", None)
    if callable(chk):
        chk()


def checking_pass(model, ids, cache, steps: int, device) -> dict:
    """Prefill and ``steps`` decode steps: the greedy tokens, and the host syncs counted per phase."""
    toks = []
    with torch.no_grad():
        with SyncCounter(device) as pre:
            nxt = _step(model, ids, cache)
        toks.append(nxt)
        with SyncCounter(device) as dec:
            for _ in range(steps):
                nxt = _step(model, nxt, cache)
                toks.append(nxt)
    _check_cache(cache)
    return {"tokens": torch.cat(toks, 1).cpu(), "syncs_prefill": pre.count, "syncs_decode": dec.count}


def error_mode_pass(model, ids, cache, device) -> str:
    """Prefill and two decode steps under set_sync_debug_mode("error"): "passed" or the error raised."""
    if device.type != "cuda":
        return "n/a (no CUDA device)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            nxt = _step(model, ids, cache)
            for _ in range(2):
                nxt = _step(model, nxt, cache)
    except RuntimeError as e:
        return f"raised: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _check_cache(cache)
    return "passed"


def timed_run(model, ids, cache, steps: int, device) -> tuple[list, list, torch.Tensor]:
    """Prefill and one warm-up step untimed, then ``steps`` timed decode steps; (ms per step, host ms per step,
    tokens)."""
    toks, times, host = [], [], []
    with torch.no_grad():
        nxt = _step(model, ids, cache)
        toks.append(nxt)
        nxt = _step(model, nxt, cache)
        toks.append(nxt)
        _sync(device)
        for _ in range(steps):
            with Timer(device) as t:
                nxt = _step(model, nxt, cache)
            times.append(t.ms)
            host.append(t.host_ms)
            toks.append(nxt)
    _check_cache(cache)
    return times, host, torch.cat(toks, 1).cpu()


def host_bound(host_ms: float, step_ms: float) -> bool:
    """True where the host's time to enqueue a step is at least HOST_BOUND_SHARE of the step's time: the GPU
    finished (nearly) as soon as the host had handed it the work, so the host set the pace."""
    return step_ms > 0 and host_ms >= HOST_BOUND_SHARE * step_ms


def decode(device, state, shapes: Shapes, layers: int, smoke: bool, deadline: float, progress=None,
           contexts=None) -> dict:
    """``progress(data)``: called with what is finished after every variant's run, so a section killed by its
    time limit keeps every variant it finished. Past ``deadline`` no checking pass or timed run starts.
    ``contexts``: the context lengths (default ``shapes.contexts``). The section's audit log is left open in
    ``state["audit_log"]`` for the audit section (whoever runs last closes it)."""
    prev_log = state.get("audit_log")
    if prev_log is not None:      # an earlier decode section's log that no audit section closed
        prev_log.close(timeout=AUDIT_TIMEOUT_S)
        state["audit_log"] = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, cfg, dtype = build_model(device, layers, smoke)
    progress = progress or (lambda data: None)
    mgr = TenantIsolationManager()
    sessions = [mgr.create_session(TenantIdentity(f"bench-tenant-{i}")) for i in range(shapes.batch)]
    log = KVAuditLog()
    state["audit_log"] = log
    stats0 = log.stats()
    variants, skipped = available_variants()

    def backend_for(v):
        # on a CPU, the twin has no device audit ring: audited variants run on the host backend there
        return host_backend() if (v.audited and device.type != "cuda") else state["device_backend"]

    base = variants[0]
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    res = {"model": "tiny Llama" if smoke else "Llama-8B-shaped (hidden 4096, 32 q heads, 8 KV heads x 128)",
           "layers": cfg.num_hidden_layers, "batch": shapes.batch, "steps": shapes.steps, "dtype": str(dtype),
           "variants": [v.name for v in variants], "variants_not_available": skipped, "contexts": {}}
    ok = True
    # warm-up, untimed and uncounted: kernels compiled, key schedules of these sessions prepared
    warm_ids = torch.randint(0, cfg.vocab_size, (shapes.batch, 8), generator=torch.Generator().manual_seed(1))
    for v in variants:
        checking_pass(model, warm_ids.to(device), v.make(cfg, sessions, log, backend_for(v)), 1, device)
    _sync(device)
    for ctx in (contexts or shapes.contexts):
        g = torch.Generator(device="cpu").manual_seed(ctx)
        ids = torch.randint(0, cfg.vocab_size, (shapes.batch, ctx), generator=g).to(device)
        per = {}
        ref_tokens = None
        for v in variants:
            if ref_tokens is not None and time.monotonic() > deadline:
                per[v.name] = {"not_run": "the suite's budget was spent before its checking pass"}
                ok = False
                continue
            c = checking_pass(model, ids, v.make(cfg, sessions, log, backend_for(v)), shapes.check_steps, device)
            if ref_tokens is None:
                ref_tokens = c["tokens"]
            same = bool(torch.equal(c["tokens"], ref_tokens))
            err_mode = "not run (syncs counted)" if (c["syncs_prefill"] or c["syncs_decode"]) else \
                error_mode_pass(model, ids, v.make(cfg, sessions, log, backend_for(v)), device)
            per[v.name] = {"backend": None if v is base else type(backend_for(v)).__name__, "tokens_identical": same, "syncs_prefill": c["syncs_prefill"],
                           "syncs_decode": c["syncs_decode"], "error_mode": err_mode, "runs_ms": [],
                           "runs_host_ms": []}
            progress(dict(res, context=ctx, contexts={**res["contexts"], str(ctx): {"variants": per}}))
        checked = [v for v in variants if "not_run" not in per[v.name]]
        # timed runs, interleaved: every repeat measures every variant once
        repeats_done = 0
        for _ in range(shapes.repeats):
            if repeats_done and time.monotonic() > deadline:
                break
            for v in checked:
                times, host, toks = timed_run(model, ids, v.make(cfg, sessions, log, backend_for(v)), shapes.steps,
                                              device)
                per[v.name]["runs_ms"].append(times)
                per[v.name]["runs_host_ms"].append(host)
                n = min(toks.shape[1], ref_tokens.shape[1])
                per[v.name]["tokens_identical"] &= bool(torch.equal(toks[:, :n], ref_tokens[:, :n]))
                progress(dict(res, context=ctx, contexts={**res["contexts"], str(ctx): {"variants": per}},
                              repeats_done=repeats_done))
            repeats_done += 1
        base_runs = [statistics.median(t) for t in per[base.name]["runs_ms"]]
        plain_ms = statistics.median([x for t in per[base.name]["runs_ms"] for x in t])
        kv_bytes = cfg.num_hidden_layers * shapes.batch * (ctx + shapes.steps + 1) * 2 * kv_heads * head_dim * itemsize
        rate = state.get("best_decrypt_GBps")
        for v in checked:
            p = per[v.name]
            runs = [statistics.median(t) for t in p["runs_ms"]]
            p["step_ms"] = dict(spread([x for t in p["runs_ms"] for x in t]),
                                run_median_min=min(runs), run_median_max=max(runs))
            ratios = [a / b for a, b in zip(runs, base_runs)]
            p["vs_dynamic"] = {"ratio": p["step_ms"]["median"] / plain_ms, "min": min(ratios), "max": max(ratios)}
            if v.sealed and rate:
                p["lower_bound_vs_dynamic"] = 1 + kv_bytes / (rate * 1e9 * plain_ms * 1e-3)
            p["host_ms"] = statistics.median([x for t in p["runs_host_ms"] for x in t])
            p["host_share"] = p["host_ms"] / p["step_ms"]["median"] if p["step_ms"]["median"] > 0 else None
            p["host_bound"] = host_bound(p["host_ms"], p["step_ms"]["median"])
            del p["runs_ms"], p["runs_host_ms"]
            syncs_ok = device.type != "cuda" or (
                p["syncs_prefill"] == per[base.name]["syncs_prefill"] == 0
                and p["syncs_decode"] == per[base.name]["syncs_decode"] == 0 and p["error_mode"] == "passed")
            p["ok"] = p["tokens_identical"] and (syncs_ok or v is base)
            ok &= p["ok"]
        on = [v for v in checked if v.audited and v.sealed]
        off = [v for v in checked if v.sealed and not v.audited]
        if on and off:
            a, b = per[on[0].name]["step_ms"]["median"], per[off[0].name]["step_ms"]["median"]
            res.setdefault("audit_on_vs_off", {})[str(ctx)] = a / b
        res["contexts"][str(ctx)] = {"variants": per, "repeats": repeats_done, "kv_bytes": kv_bytes,
                                     "decrypt_rate_GBps_for_bound": rate}
    stats1 = log.stats()
    state["audit_stats_window"] = (stats0, stats1)
    res["ok"] = bool(ok)
    return res


# ---------------------------------------------------------------------------- 5. audit

def audit(device, state) -> dict:
    log = state.get("audit_log")
    if log is None:
        raise SuiteError("no audit-on decode run to measure (the decode section did not start)")
    if not log.flush(timeout=AUDIT_TIMEOUT_S):
        raise SuiteError(f"KVAuditLog.flush() did not finish within {AUDIT_TIMEOUT_S} s")
    st = log.stats()
    s0 = state["audit_stats_window"][0]
    drained = st["drained"] - s0["drained"]
    busy = st["drain_busy_s"] - s0["drain_busy_s"]
    log.close(timeout=AUDIT_TIMEOUT_S)
    state["audit_log"] = None
    res = {"emitted": st["emitted"] - s0["emitted"], "drained": drained, "drain_busy_s": busy,
           "records_per_s_of_drain_busy_time": drained / busy if busy > 0 else None,
           "ring_stalls": st["stalls"] - s0["stalls"], "dropped": st["dropped"] - s0["dropped"],
           "failures": st["failures"] - s0["failures"]}
    res["ok"] = res["dropped"] == 0 and res["failures"] == 0 and res["drained"] == res["emitted"] > 0
    return res


# ---------------------------------------------------------------------------- report

def _f(x, fmt=".2f"):
    return "—" if x is None else format(x, fmt)


def decode_table(d: dict, smoke: bool, partial: bool = False) -> list:
    """The markdown lines of one decode section (``partial``: what a running section has finished)."""
    lines = ["", f"Decode step, batch {d['batch']}, {d['layers']} layers of a {d['model']}, {d['dtype']}; "
             f"ms per step: median [min–max of the per-repeat medians]; ratio to DynamicCache: median "
             f"[min–max over the interleaved repeats]; host ms: the host's time to enqueue a step (its share "
             f"of the step)" + (" — **section unfinished: the variants done so far**" if partial else ""), "",
             "| context | cache | step ms | host ms (share) | vs DynamicCache | lower bound | tokens = DynamicCache "
             "| host syncs prefill / decode | sync mode \"error\" |", "|---|---|---|---|---|---|---|---|---|"]
    for ctx, cr in d["contexts"].items():
        for name, p in cr["variants"].items():
            if "not_run" in p:
                lines.append(f"| {ctx} | {name} | not run: {p['not_run']} | | | | | | |")
                continue
            if "step_ms" not in p:       # checked, timed runs not finished
                lines.append(f"| {ctx} | {name} | timed runs not finished | | | | "
                             f"{'yes' if p['tokens_identical'] else '**NO**'} | {_f(p['syncs_prefill'], 'd')} / "
                             f"{_f(p['syncs_decode'], 'd')} | {p['error_mode']} |")
                continue
            if p.get("backend") and smoke:
                name = f"{name} ({p['backend']})"
            s, r = p["step_ms"], p["vs_dynamic"]
            bound = " **host-bound**" if p.get("host_bound") else ""
            lines.append(f"| {ctx} | {name} | {s['median']:.3f} [{s['run_median_min']:.3f}–"
                         f"{s['run_median_max']:.3f}]{bound} | {p['host_ms']:.3f} ({_f(p.get('host_share'))}) "
                         f"| {r['ratio']:.2f}x [{r['min']:.2f}–{r['max']:.2f}]{bound} "
                         f"| {_f(p.get('lower_bound_vs_dynamic'))}{'x' if p.get('lower_bound_vs_dynamic') else ''}"
                         f" | {'yes' if p['tokens_identical'] else '**NO**'} "
                         f"| {_f(p['syncs_prefill'], 'd')} / {_f(p['syncs_decode'], 'd')} | {p['error_mode']} |")
    if d.get("audit_on_vs_off"):
        lines.append("\naudit on / off (sealed, median step): " + ", ".join(
            f"context {ctx}: {r:.3f}x" for ctx, r in d["audit_on_vs_off"].items()))
    lines += ["", f"**host-bound**: the host's time to enqueue the step is at least {HOST_BOUND_SHARE:.0%} of the "
              "step's time, so the GPU waited for the host: such a figure (and its ratio) measures host work per "
              "layer, not the crypto; compare with the host step (`benchmarks/host_overhead.py`). On a CPU every "
              "figure is host time.",
              "", "Lower bound: 1 + KV bytes / (best measured decrypt rate × DynamicCache step time). Host syncs "
              "are what torch's sync debug mode sees: synchronising torch calls on the calling thread. It does "
              "not see CuPy calls made outside torch, nor host waits on locks — e.g. an emitter stalled on a "
              "full audit ring waiting for the drain (counted below as ring stalls)."]
    if d.get("variants_not_available"):
        lines.append(f"Variants not available in this build: {', '.join(d['variants_not_available'])}.")
    return lines


def markdown(res: dict) -> str:
    env = res["sections"].get("environment", {})
    lines = [f"## GPU suite — {env.get('device', '?')} — {env.get('date', res.get('started'))}", "",
             f"driver {env.get('driver', '?')} · python {env.get('python', '?')} · torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda')}) · CuPy {env.get('cupy')} · transformers {env.get('transformers', '?')}"
             f" · numpy {env.get('numpy', '?')} · cryptography {env.get('cryptography', '?')} · host CPU "
             f"{env.get('host_cpu', '?')} · commit {env.get('commit')} · backend under test "
             f"{env.get('backend_under_test', '?')}" + (" · **smoke run (tiny shapes)**" if res["smoke"] else ""),
             "", "| section | status | seconds |", "|---|---|---|"]
    for name in SECTIONS:
        s = res["sections"].get(name)
        if s is None:
            lines.append(f"| {name} | not run | — |")
        else:
            st = s["status"] + (f": {s['error']}" if s.get("error") else "")
            lines.append(f"| {name} | {st} | {s['seconds']:.1f} |")
    c = res["sections"].get("correctness", {})
    if c.get("chunks"):
        lines += ["", f"Correctness ({c['layout']}; every row must say yes)", "",
                  "| positions / chunk | device-sealed opens with AESGCM | … with the host backend "
                  "| device bytes = host bytes | host-sealed opens on the device |", "|---|---|---|---|---|"]
        yn = {True: "yes", False: "**NO**"}
        for r in c["chunks"].values():
            lines.append(f"| {r['positions']} | {yn[r['device_sealed_open_with_aesgcm']]} "
                         f"| {yn[r['device_sealed_open_with_host_backend']]} | {yn[r['device_bytes_equal_host_bytes']]} "
                         f"| {yn[r['host_sealed_open_on_device']]} |")
    k = res["sections"].get("kernels", {})
    if k.get("runs"):
        lines += ["", "Kernel throughput (GB/s of plaintext, audit off; median [min–max] of the repeats)", "",
                  "| positions / chunk | chunks | encrypt | decrypt + verify | round trip |", "|---|---|---|---|---|"]
        for r in k["runs"].values():
            e, d = r["encrypt"], r["decrypt_verify"]
            lines.append(f"| {r['positions_per_chunk']} | {r['chunks']} | {e['GBps']:.4g} [{e['GBps_min']:.4g}–"
                         f"{e['GBps_max']:.4g}] | {d['GBps']:.4g} [{d['GBps_min']:.4g}–{d['GBps_max']:.4g}] "
                         f"| {'ok' if r['roundtrip_ok'] else '**FAILED**'} |")
    for name in ("decode", "decode_32_layers"):
        d = res["sections"].get(name) or res.get("partial", {}).get(name) or {}
        if d.get("contexts"):
            lines += decode_table(d, res["smoke"], partial=name not in res["sections"])
    a = res["sections"].get("audit", {})
    if "drained" in a:
        lines += ["", "| audit (audit-on decode runs) | value |", "|---|---|",
                  f"| records drained | {a['drained']} of {a['emitted']} emitted |",
                  f"| drain rate | {_f(a['records_per_s_of_drain_busy_time'], ',.0f')} records/s of drain busy time "
                  f"({a['drain_busy_s']:.3f} s busy) |",
                  f"| ring stalls (emitter waited for the drain) | {a['ring_stalls']} |",
                  f"| dropped / failures | {a['dropped']} / {a['failures']} |"]
    return "\n".join(lines) + "\n"


class Report:
    """The suite's result, rewritten (JSON + markdown) after every section."""

    def __init__(self, path: str, smoke: bool):
        self.path = Path(path)
        self.md_path = self.path.with_suffix(".md")
        self.res = {"smoke": smoke, "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "sections": {}}

    def run(self, name: str, fn: Callable[[], dict], budget_s: float) -> None:
        """Run one section; its error (with traceback) goes into the report instead of ending the run.
        A section still running after ``budget_s`` gets every thread's stack dumped to stderr."""
        t0 = time.perf_counter()
        faulthandler.dump_traceback_later(budget_s, exit=False)
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            data = fn()
            status = "ok" if data.pop("ok", True) else "failed"
            entry = {"status": status, **data}
        except BaseException as e:     # recorded, and the run goes on (KeyboardInterrupt too: keep what ran)
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0],
                     "traceback": traceback.format_exc()}
            print(entry["traceback"], file=sys.stderr, flush=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
        entry["seconds"] = time.perf_counter() - t0
        self.res["sections"][name] = entry
        self.res.get("partial", {}).pop(name, None)
        self.write()
        print(f"[gpu_suite] {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)

    def partial(self, name: str, data: dict) -> None:
        """What a running section has finished so far, written at once (kept if the section is killed)."""
        self.res.setdefault("partial", {})[name] = data
        self.write()

    def write(self) -> None:
        self.res["markdown"] = markdown(self.res)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.res, indent=2, default=str))
        tmp.replace(self.path)
        self.md_path.write_text(self.res["markdown"])

    @property
    def ok(self) -> bool:
        return all(self.res["sections"].get(n, {}).get("status") == "ok"
                   or (n == "decode_32_layers" and self.res["sections"].get(n, {}).get("status", "").startswith(
                       "skipped")) for n in SECTIONS)


def main(argv=None) -> int:
    # transformers 5.x announces a rename of past_key_values; the suite keeps the name every 5.x accepts
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_suite.json", help="JSON output path (markdown beside it, .md)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random Llama (default 4)")
    ap.add_argument("--long-layers", type=int, default=32,
                    help="decoder layers of the decode_32_layers section's model, at 4K context (default 32; "
                         "0 leaves the section out)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per run (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for the whole suite (default 240); the decode section stops adding repeats "
                         "past its share, and a section past its share gets its stacks dumped")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; on a CPU the CUDA backend's CPU twin")
    ap.add_argument("--skip-decode", action="store_true", help="leave out the decode and audit sections")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu_suite: no CUDA device here (use --smoke to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)    # tiny shapes: one thread is faster than contended ones
    shapes = Shapes.smoke(args) if args.smoke else Shapes.full(args)
    report = Report(args.out, args.smoke)
    state: dict = {}
    t_start = time.monotonic()
    share = {"environment": 0.04, "correctness": 0.08, "kernels": 0.13, "decode": 0.3, "audit": 0.05,
             "decode_32_layers": 0.4}

    def budget(name):
        return max(10.0, args.budget * share[name])

    try:
        state["device_backend"] = device_backend(device)
    except Exception as e:
        state["device_backend"] = None
        print(f"gpu_suite: no device backend: {type(e).__name__}: {e}", file=sys.stderr)

    def need_backend():
        if state["device_backend"] is None:
            raise SuiteError("the device backend could not be created (see stderr)")

    report.run("environment", lambda: environment(device, state), budget("environment"))
    for name, fn in (("correctness", lambda: correctness(device, state, shapes)),
                     ("kernels", lambda: kernels(device, state, shapes))):
        report.run(name, lambda fn=fn: (need_backend(), fn())[1], budget(name))
    k = report.res["sections"]["kernels"]
    state["best_decrypt_GBps"] = k.get("best_decrypt_GBps")
    if not args.skip_decode:
        # past its deadline a decode section starts no further checking pass or repeat
        deadline = t_start + args.budget * (1 - share["audit"] - share["decode_32_layers"])
        report.run("decode", lambda: (need_backend(), decode(device, state, shapes, shapes.layers, args.smoke,
                                                             deadline, lambda d: report.partial("decode", d)))[1],
                   budget("decode"))
        report.run("audit", lambda: audit(device, state), budget("audit"))
        if shapes.long_layers > 0:
            report.run("decode_32_layers", lambda: (need_backend(), decode(
                device, state, shapes, shapes.long_layers, args.smoke, t_start + args.budget,
                lambda d: report.partial("decode_32_layers", d), contexts=shapes.long_contexts))[1],
                budget("decode_32_layers"))
        else:
            report.res["sections"]["decode_32_layers"] = {"status": "skipped (--long-layers 0)", "seconds": 0.0}
            report.write()
        if state.get("audit_log") is not None:   # the audit section failed before closing it
            try:
                state["audit_log"].close(timeout=AUDIT_TIMEOUT_S)
            except Exception as e:
                print(f"gpu_suite: closing the audit log: {e}", file=sys.stderr)
    print(report.res["markdown"])
    print(f"results written to {report.path} and {report.md_path}")
    return 0 if report.ok or (args.skip_decode and all(
        report.res["sections"][n]["status"] == "ok" for n in ("environment", "correctness", "kernels"))) else 1


if __name__ == "__main__":
    sys.exit(main())
