"""EncryptedCache against DynamicCache, measured in the same run: decode tokens/s, audit on vs off, host backend bytes/s.

Config: random-weight Llama, 4 layers, hidden 256, 4 KV heads (8 query heads, head dim 32), batch 4,
512-token prompt, 128 new tokens, greedy, fp32, CPU. Decode tokens/s = batch × new tokens / (time
of the whole generate − time of a 1-token generate), i.e. prefill excluded.

Every ratio is computed per repeat from runs made side by side (the variants of one repeat run one
after the other, in an order that rotates from repeat to repeat, so no variant always runs first),
and reported as min / median / max over ``--repeats``. When (max − min) / median exceeds
``--max-spread``, or there are fewer than 3 repeats, the report says the ratio is not conclusive:
on a shared machine the spread, not the median, is the news. torch's thread count is pinned for
the whole run (``--threads``, default: what torch chose at start) and printed; progress goes to
stderr.

Both residency modes are measured (``--modes``). Prints a markdown table and writes JSON (``--json`` / ``--out``, default bench-results/cache_report.json).

Memory: one more, untimed, run of every EncryptedCache variant at the headline prompt length reads every
layer's arena after every generate step (``layer.arena_stats()``) and reports the largest ``used / live``
(bytes written, live and dead, over the live chunks) and ``capacity / DynamicCache K/V`` (the arena's
allocation over batch × KV heads × positions × head dim × itemsize × 2, what DynamicCache holds).

``--contexts 128,512,1024,2048`` measures every variant at each prompt length (interleaved repeats per
length) and adds a per-context table (decode tokens/s, median with min and max, and the per-repeat
ratio to DynamicCache) to the output and the JSON; the headline tables stay those of the 512-token
prompt when it is among them (else of the first length given). ``--plot PATH.png`` draws decode tokens/s
against context length, one line per variant with min-max error bars; it needs matplotlib
(``pip install 'pqc-kv-cache-encryption[bench]'``), imported only then.

    python benchmarks/cache_report.py [--repeats 5] [--new-tokens 128] [--threads N] [--quick] [--out PATH]
                                      [--contexts 128,512,1024,2048] [--plot decode_vs_context.png]
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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList  # noqa: E402

from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.backends.host import HostBackend  # noqa: E402
from pqc_kv_cache.cache import EncryptedCache  # noqa: E402
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session  # noqa: E402

BATCH, PROMPT, LAYERS, HIDDEN, KV_HEADS = 4, 512, 4, 256, 4


def build_model(max_positions: int = 2048):
    # max_position_embeddings only sizes the rotary table's nominal range; the weights do not depend on it
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=max(2048, max_positions))
    return LlamaForCausalLM(cfg).eval()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_contexts(text: str) -> list[int]:
    """'128,512' -> [128, 512]; ValueError naming what is wrong otherwise."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("--contexts needs at least one prompt length")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise ValueError(f"--contexts takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"--contexts: every prompt length must be >= 1, got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"--contexts: a prompt length is listed twice in {text!r}")
    return values


def load_pyplot_figure():
    """matplotlib's Figure class, imported only for --plot; a clear error when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed: "
                           "pip install 'pqc-kv-cache-encryption[bench]' (or pip install 'matplotlib>=3.7')") from e
    return Figure


VARIANT_LABELS = {"dynamic": "DynamicCache",
                  "encrypted_audit_off": "EncryptedCache sealed, audit off",
                  "encrypted_audit_on": "EncryptedCache sealed, audit on",
                  "working_set_audit_off": "EncryptedCache working set, audit off",
                  "working_set_audit_on": "EncryptedCache working set, audit on"}


def plot_contexts(path: str, per_context: dict, title: str, subtitle: str) -> None:
    """Decode tokens/s against context length (log x), one line per variant, min-max error bars."""
    Figure = load_pyplot_figure()
    contexts = sorted(per_context, key=int)
    xs = [int(c) for c in contexts]
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    styles = {"dynamic": ("black", "-", "o"), "encrypted_audit_off": ("tab:red", "-", "s"),
              "encrypted_audit_on": ("tab:red", "--", "s"), "working_set_audit_off": ("tab:blue", "-", "^"),
              "working_set_audit_on": ("tab:blue", "--", "^")}
    for name in per_context[contexts[0]]["decode_tokens_per_s"]:
        rows = [per_context[c]["decode_tokens_per_s"][name] for c in contexts]
        med = [r["median"] for r in rows]
        err = [[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]]
        color, ls, marker = styles.get(name, (None, "-", "o"))
        ax.errorbar(xs, med, yerr=err, label=VARIANT_LABELS.get(name, name), color=color, linestyle=ls,
                    marker=marker, capsize=3, markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("decode tokens/s (median, bars: min-max)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    ax.set_title(subtitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """One line on stderr with the time since the start: the run takes minutes."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def spread(values: list[float], max_spread: float) -> dict:
    """min / median / max of per-repeat ratios, and whether they agree well enough to conclude."""
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    rel = (hi - lo) / med if med else float("inf")
    if len(values) < 3:
        verdict = f"not conclusive: {len(values)} repeat(s), at least 3 are needed to see the spread"
    elif rel > max_spread:
        verdict = (f"not conclusive: spread {rel:.0%} of the median exceeds {max_spread:.0%} "
                   "(a busy machine?); rerun with more --repeats on a quieter one")
    else:
        verdict = f"spread {rel:.0%} of the median"
    return {"min": lo, "median": med, "max": hi, "values": values, "relative_spread": rel,
            "conclusive": len(values) >= 3 and rel <= max_spread, "verdict": verdict}


def generate_time(model, ids, new_tokens, make_cache) -> tuple[float, torch.Tensor]:
    cache = make_cache()
    kw = {} if cache is None else {"past_key_values": cache}
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kw)
    return time.perf_counter() - t, out


def decode_times(model, ids, new_tokens, variants: dict, repeats: int, label: str = "") -> tuple[dict, dict]:
    """Decode seconds of every variant in every repeat; the variants' order rotates per repeat."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    outs = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t_all, out = generate_time(model, ids, new_tokens, variants[name])
            t_one, _ = generate_time(model, ids, 1, variants[name])
            times[name].append(max(t_all - t_one, 1e-9))
            outs[name] = out
            progress(f"{label}repeat {r + 1}/{repeats}: {name} decoded {new_tokens - 1} tokens x {BATCH} rows "
                     f"in {times[name][-1]:.2f} s")
    return times, outs


class ArenaSampler(StoppingCriteria):
    """Reads every layer's arena after each generate step (it never stops the run): the largest
    used / live bytes and capacity / DynamicCache K/V bytes seen."""

    def __init__(self, cache):
        self.cache = cache
        self.used_per_live = self.capacity_per_dynamic = 0.0
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        for layer in self.cache.layers:
            s = layer.arena_stats()
            dynamic = (2 * len(layer.row_session_slots) * layer.num_heads * layer.get_seq_length()
                       * layer.head_dim * layer.dtype.itemsize)
            if s.live and dynamic:
                self.used_per_live = max(self.used_per_live, s.used / s.live)
                self.capacity_per_dynamic = max(self.capacity_per_dynamic, s.capacity / dynamic)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def arena_memory(model, ids, new_tokens, variants: dict) -> dict:
    """Per EncryptedCache variant, one untimed generate sampled after every step (see ``ArenaSampler``)."""
    out = {}
    for name, make_cache in variants.items():
        cache = make_cache()
        if cache is None:
            continue
        sampler = ArenaSampler(cache)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                           stopping_criteria=StoppingCriteriaList([sampler]))
        out[name] = {"max_used_per_live": sampler.used_per_live,
                     "max_capacity_per_dynamic_kv": sampler.capacity_per_dynamic, "steps": sampler.steps}
        progress(f"memory: {name} max used/live {sampler.used_per_live:.3f}, "
                 f"max capacity/DynamicCache K/V {sampler.capacity_per_dynamic:.3f}")
    return out


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, called in turn (one of each per repeat) after one warm-up call each."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return ts


def _bulk_decrypt(nbytes: int):
    aes = AESGCM(AESGCM.generate_key(256))
    nonce, aad = os.urandom(12), os.urandom(80)
    ct = aes.encrypt(nonce, os.urandom(nbytes), aad)
    out = np.empty(nbytes, np.uint8)
    return lambda: aes.decrypt_into(nonce, ct, aad, out)


def backend_throughput(sessions, repeats: int, max_spread: float) -> dict:
    """Bytes/s of HostBackend.decrypt_chunks reading one layer against one bulk AESGCM decrypt of as many bytes.

    ``cache_layout``: the chunk table EncryptedCache itself builds after the prompt and 128 decode steps
    (merged segments, decrypted into its head-major scratch). ``one_chunk_per_token``: the worst case of
    one chunk per decoded position (merging off), into the same scratch. The two calls alternate; the
    ratio is taken per pair."""
    out: dict = {}
    for name, merge in (("cache_layout", True), ("one_chunk_per_token", False)):
        progress(f"host backend throughput, {name}")
        cache = EncryptedCache(LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=8,
                                           num_key_value_heads=KV_HEADS), sessions=sessions,
                               merge_segments=merge)
        g = torch.Generator().manual_seed(0)
        hd = HIDDEN // 8
        cache.update(torch.randn(BATCH, KV_HEADS, PROMPT, hd, generator=g),
                     torch.randn(BATCH, KV_HEADS, PROMPT, hd, generator=g), 0)
        for _ in range(128):
            cache.update(torch.randn(BATCH, KV_HEADS, 1, hd, generator=g),
                         torch.randn(BATCH, KV_HEADS, 1, hd, generator=g), 0)
        layer = cache.layers[0]
        be = layer._backend
        seen = {}
        real = be.decrypt_chunks

        def spy(*args, **kwargs):
            seen["args"] = args
            return real(*args, **kwargs)
        be.decrypt_chunks = spy
        try:
            layer._read_from(0)
        finally:
            del be.decrypt_chunks
        keys, layout, table, arena, k_out, v_out = seen["args"][:6]
        nbytes = int(np.asarray(table.pos_count).sum()) * layout.bytes_per_position
        ts = _interleaved({"backend": lambda: be.decrypt_chunks(keys, layout, table, arena, k_out, v_out),
                           "bulk": _bulk_decrypt(nbytes)}, repeats)
        out[name] = {"bytes": nbytes, "chunks": len(table),
                     "backend_bytes_per_s": nbytes / statistics.median(ts["backend"]),
                     "bulk_aesgcm_bytes_per_s": nbytes / statistics.median(ts["bulk"]),
                     "ratio": spread([b / a for a, b in zip(ts["backend"], ts["bulk"])], max_spread)}
    out["backend_threads"] = HostBackend.instance().threads
    return out


def _row(label: str, r: dict) -> str:
    return f"| {label} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['verdict']} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every variant (default 5)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the whole run (default: what torch chose at start)")
    ap.add_argument("--max-spread", type=float, default=0.10,
                    help="largest (max - min) / median of a ratio that still allows a conclusion (default 0.10)")
    ap.add_argument("--modes", default="sealed,working_set",
                    help="EncryptedCache residency modes to measure, comma-separated (default: both)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, 32 new tokens (a smoke run, not for figures)")
    ap.add_argument("--contexts", default=str(PROMPT),
                    help=f"prompt lengths to measure, comma-separated, e.g. 128,512,1024,2048 (default {PROMPT})")
    ap.add_argument("--plot", default=None, metavar="PATH.png",
                    help="draw decode tokens/s against context length into this PNG (needs matplotlib)")
    ap.add_argument("--json", "--out", dest="json", default=os.path.join("bench-results", "cache_report.json"),
                    help="where to write the JSON results")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 32
    if args.repeats < 1 or args.new_tokens < 2:
        ap.error("--repeats must be >= 1 and --new-tokens >= 2")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if not args.max_spread > 0:
        ap.error("--max-spread must be > 0")
    try:
        contexts = parse_contexts(args.contexts)
    except ValueError as e:
        ap.error(str(e))
    if args.plot is not None:
        try:                                  # before minutes of measuring, not after
            load_pyplot_figure()
        except RuntimeError as e:
            ap.error(str(e))
        if not args.plot.lower().endswith(".png"):
            ap.error(f"--plot writes a PNG; give a path ending in .png, not {args.plot!r}")
    # the headline tables: the README's 512-token prompt when measured, else the first length given
    headline = PROMPT if PROMPT in contexts else contexts[0]
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)       # pinned: a count that changes between variants changes the ratios
    print(f"torch threads: {threads} (pinned for the run); {os.cpu_count()} CPUs", flush=True)
    if os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)

    load_start = os.getloadavg()
    progress("building the model and sessions")
    model = build_model(max(contexts) + args.new_tokens)
    sessions = [establish_tenant_session(TenantIdentity(f"tenant-{i}"), ttl_seconds=3600) for i in range(BATCH)]
    audit = KVAuditLog(max_entries=200_000)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("sealed", "working_set") for m in modes):
        ap.error("--modes takes sealed and/or working_set")
    variants = {"dynamic": lambda: None}
    if "sealed" in modes:
        variants["encrypted_audit_off"] = lambda: EncryptedCache(model.config, sessions=sessions, audit=None)
        variants["encrypted_audit_on"] = lambda: EncryptedCache(model.config, sessions=sessions, audit=audit)
    if "working_set" in modes:
        variants["working_set_audit_off"] = lambda: EncryptedCache(model.config, sessions=sessions, audit=None,
                                                                   mode="working_set")
        variants["working_set_audit_on"] = lambda: EncryptedCache(model.config, sessions=sessions, audit=audit,
                                                                  mode="working_set")
    per_context: dict = {}
    times_at: dict = {}
    for i, ctx in enumerate(contexts):
        torch.manual_seed(1)              # the same prompt as before for the 512-token default
        ids = torch.randint(0, model.config.vocab_size, (BATCH, ctx))
        label = f"context {ctx} ({i + 1}/{len(contexts)}), " if len(contexts) > 1 else ""
        t_ctx, outs = decode_times(model, ids, args.new_tokens, variants, args.repeats, label)
        times_at[ctx] = t_ctx
        n_tok = BATCH * (args.new_tokens - 1)
        per_context[str(ctx)] = {
            "decode_tokens_per_s": {k: {"median": statistics.median(n_tok / t for t in v),
                                        "min": n_tok / max(v), "max": n_tok / min(v),
                                        "values": [n_tok / t for t in v]} for k, v in t_ctx.items()},
            "ratio_to_dynamic": {k: spread([d / n for n, d in zip(v, t_ctx["dynamic"])], args.max_spread)
                                 for k, v in t_ctx.items() if k != "dynamic"},
            "outputs_identical": all(torch.equal(outs["dynamic"], o) for o in outs.values()),
        }
    audit.flush()
    audit_stats = audit.stats()           # of the timed runs only
    torch.manual_seed(1)                  # the headline prompt again, for the untimed memory runs
    memory = arena_memory(model, torch.randint(0, model.config.vocab_size, (BATCH, headline)), args.new_tokens,
                          variants)
    times = times_at[headline]
    identical = all(r["outputs_identical"] for r in per_context.values())
    thr = backend_throughput(sessions, repeats=max(30, args.repeats), max_spread=args.max_spread)
    assert torch.get_num_threads() == threads, "the thread count changed during the run"
    tokens = BATCH * (args.new_tokens - 1)
    rates = {k: tokens / statistics.median(v) for k, v in times.items()}

    def ratio(num: str, den: str) -> dict:   # rate(num) / rate(den), per repeat
        return spread([d / n for n, d in zip(times[num], times[den])], args.max_spread)

    ratios = {}
    if "sealed" in modes:
        ratios["encrypted_vs_dynamic"] = ratio("encrypted_audit_off", "dynamic")
        ratios["encrypted_audit_on_vs_dynamic"] = ratio("encrypted_audit_on", "dynamic")
        ratios["audit_on_vs_off"] = ratio("encrypted_audit_on", "encrypted_audit_off")
    if "working_set" in modes:
        ratios["working_set_vs_dynamic"] = ratio("working_set_audit_off", "dynamic")
        ratios["working_set_audit_on_vs_dynamic"] = ratio("working_set_audit_on", "dynamic")
        ratios["working_set_audit_on_vs_off"] = ratio("working_set_audit_on", "working_set_audit_off")
    load_end = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": threads, "gpu": torch.cuda.is_available(),
                    "load_average_start": load_start, "load_average_end": load_end},
        "date": date,
        "config": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "batch": BATCH, "prompt": headline,
                   "new_tokens": args.new_tokens, "dtype": "float32", "repeats": args.repeats,
                   "max_spread": args.max_spread, "contexts": contexts},
        "decode_tokens_per_s": rates,
        "decode_tokens_per_s_per_repeat": {k: [tokens / t for t in v] for k, v in times.items()},
        "ratios": ratios,
        # medians, under the names earlier reports used
        **{f"ratio_{k}": v["median"] for k, v in ratios.items()},
        "outputs_identical": identical,
        "audit_stats": audit_stats,
        "host_backend": thr,
        # max over an untimed run at config.prompt, sampled after every step, per EncryptedCache variant
        "arena_memory": memory,
        # every prompt length measured (keys are the lengths as strings); the tables above are of config.prompt
        "contexts": per_context,
    }
    audit.close()
    print(f"\n{args.repeats} interleaved repeats, torch threads {threads}\n")
    print("| decode tokens/s | median | min | max |\n|---|---:|---:|---:|")
    for k, v in result["decode_tokens_per_s_per_repeat"].items():
        print(f"| {k} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    print("\n| ratio (per repeat) | median | min | max | |\n|---|---:|---:|---:|---|")
    labels = {"encrypted_vs_dynamic": "EncryptedCache sealed / DynamicCache (audit off)",
              "encrypted_audit_on_vs_dynamic": "EncryptedCache sealed / DynamicCache (audit on)",
              "audit_on_vs_off": "sealed: audit on / audit off",
              "working_set_vs_dynamic": "EncryptedCache working set / DynamicCache (audit off)",
              "working_set_audit_on_vs_dynamic": "EncryptedCache working set / DynamicCache (audit on)",
              "working_set_audit_on_vs_off": "working set: audit on / audit off"}
    for k, r in ratios.items():
        print(_row(labels[k], r))
    for name in ("cache_layout", "one_chunk_per_token"):
        r = thr[name]
        print(_row(f"host backend / one bulk AESGCM decrypt, {name} ({r['chunks']} chunks, "
                   f"{r['bytes'] / 2**20:.2f} MiB; {r['backend_bytes_per_s'] / 1e9:.2f} vs "
                   f"{r['bulk_aesgcm_bytes_per_s'] / 1e9:.2f} GB/s)", r["ratio"]))
    print(f"\noutputs token-identical: {identical}")
    print(f"\narena memory at a {headline}-token prompt, {args.new_tokens} new tokens: max over every layer and "
          "step of an untimed run\n")
    print("| variant | used / live | capacity / DynamicCache K/V |\n|---|---:|---:|")
    for k, m in memory.items():
        print(f"| {VARIANT_LABELS[k]} | {m['max_used_per_live']:.3f} | {m['max_capacity_per_dynamic_kv']:.3f} |")
    if len(contexts) > 1:
        names = list(variants)
        print(f"\ndecode tokens/s against context length: median [min-max] over {args.repeats} interleaved "
              "repeats; (x) the per-repeat ratio to DynamicCache, median\n")
        print("| context | " + " | ".join(VARIANT_LABELS[k] for k in names) + " |")
        print("|---:|" + "---:|" * len(names))
        for ctx in contexts:
            row = per_context[str(ctx)]
            cells = []
            for k in names:
                r = row["decode_tokens_per_s"][k]
                cell = f"{r['median']:.1f} [{r['min']:.1f}-{r['max']:.1f}]"
                if k != "dynamic":
                    cell += f" ({row['ratio_to_dynamic'][k]['median']:.2f}x)"
                cells.append(cell)
            print(f"| {ctx} | " + " | ".join(cells) + " |")
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_end)} at the end")
    if args.plot is not None:
        if os.path.dirname(args.plot):
            os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        plot_contexts(args.plot, per_context,
                      f"Decode tokens/s against context length: {result['machine']['cpu']}, "
                      f"torch threads {threads}, {date}",
                      f"random-weight Llama, {LAYERS} layers, hidden {HIDDEN}, {KV_HEADS} KV heads, batch {BATCH}, "
                      f"{args.new_tokens} new tokens, fp32; {args.repeats} interleaved repeats")
        print(f"plot: {args.plot}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nJSON: {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
