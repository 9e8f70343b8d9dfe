"""Compiled StaticEncryptedCache against compiled StaticCache, measured in the same run: decode tokens/s.

Both caches run under the same ``torch.compile(model.forward, fullgraph=True)`` (one compiled forward per
model; each cache class gets its graphs on a warm-up run that is not timed), through ``model.generate``,
greedy, fp32, CPU. Decode tokens/s = batch × (new tokens − 1) / (time of the whole generate − time of a
1-token generate), i.e. prefill excluded; the encrypted variant's time includes its ``check()`` after each
generate (draining the audit records into the log, refilling the nonce ranges), with audit on.

Shapes (``--shapes``):
  readme  the cache report's config: random-weight Llama, 4 layers, hidden 256, 8 query heads, 4 KV heads
          (head dim 32), batch 4, 512-token prompt, 128 new tokens
  qwen05  a 0.5B-class GQA shape: 24 layers, hidden 896, 14 query heads, 2 KV heads × 64, intermediate
          4864, vocab 151936 (tied), random weights, batch 1, 512-token prompt, 64 new tokens

Every ratio is computed per repeat from runs made side by side (the variants' order alternates from
repeat to repeat) and reported as min / median / max over ``--repeats``; fewer than 3 repeats, or a
spread above ``--max-spread``, is reported as not conclusive. The thread count is pinned (``--threads``,
default 1). Memory: the plaintext K/V (the same in both), and what the encrypted cache adds (ciphertext
arena with tags, slot table, record buffer). Prints markdown, writes JSON (``--out``).

``--method steps`` instead prefills both caches once and alternates their decode steps one by one, each
timed alone, with ratios per block of steps (see ``measure_steps``): other work on a shared machine then
lands on both variants about equally.

    python benchmarks/static_report.py [--shapes readme,qwen05] [--repeats 5] [--threads 1] [--quick]
                                       [--method generate|steps]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache  # noqa: E402

from benchmarks.cache_report import cpu_model, progress, spread  # noqa: E402
from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.cache import StaticEncryptedCache  # noqa: E402
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session  # noqa: E402

SHAPES = {
    "readme": dict(kind="llama", layers=4, hidden=256, heads=8, kv_heads=4, intermediate=512, vocab=1024,
                   batch=4, prompt=512, new=128),
    "qwen05": dict(kind="qwen2", layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                   batch=1, prompt=512, new=64),
    "tiny": dict(kind="llama", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256,
                 batch=2, prompt=16, new=6),
}


_METHODS = {"steps": "decode steps alternating one by one, ratios per block of steps",
            "generate": "whole generates, ratios per repeat"}


def build_model(shape: dict):
    torch.manual_seed(0)
    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                  num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096)
    if shape["kind"] == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


class Variant:
    """One cache kind: makes a fresh cache per generate, and runs what the host does after it."""

    def __init__(self, name: str, model, shape: dict, max_len: int):
        self.name, self.model, self.shape, self.max_len = name, model, shape, max_len
        self.log = KVAuditLog(max_entries=10_000_000) if name == "static_encrypted" else None
        self.sessions = [establish_tenant_session(TenantIdentity(f"tenant{i}"), ttl_seconds=86400)
                         for i in range(shape["batch"])]
        self.cache = None

    def make(self):
        cfg = self.model.config
        if self.name == "static":
            return StaticCache(cfg, max_cache_len=self.max_len)
        cache = StaticEncryptedCache(cfg, sessions=self.sessions, max_cache_len=self.max_len, audit=self.log)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cache.early_initialization(self.shape["batch"], cfg.num_key_value_heads, head_dim, torch.float32,
                                   torch.device("cpu"))
        return cache

    def run(self, ids, new_tokens: int) -> float:
        cache = self.make()
        t = time.perf_counter()
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if isinstance(cache, StaticEncryptedCache):
            cache.check()
        elapsed = time.perf_counter() - t
        self.cache = cache
        return elapsed

    def close(self):
        if self.log is not None:
            self.log.close()


def memory(cache) -> dict:
    plain = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    out = {"plaintext_bytes": plain}
    if isinstance(cache, StaticEncryptedCache):
        out["arena_bytes"] = sum(layer.arena.nbytes for layer in cache.layers)
        out["slot_table_bytes"] = sum(layer.meta.nbytes for layer in cache.layers)
        out["record_buffer_bytes"] = cache._ctx.records.records.nbytes
        out["added_over_plaintext"] = (out["arena_bytes"] + out["slot_table_bytes"]) / plain
    return out


def measure_steps(name: str, shape: dict, repeats: int, max_spread: float) -> dict:
    """``--method steps``: both caches prefilled once, then their decode steps alternate one by one (the
    order swapping every step), each step timed alone: other work on a shared machine lands on both about
    equally. The steps are cut into ``repeats`` blocks; each block gives a ratio (StaticCache's time over the
    encrypted cache's, i.e. tokens/s encrypted over StaticCache). The encrypted cache's ``check()`` after its
    last step is timed and spread over its steps."""
    model = build_model(shape)
    model.forward = torch.compile(model.forward, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, shape["vocab"], (shape["batch"], shape["prompt"]), generator=g)
    prompt, new = shape["prompt"], shape["new"]
    variants = {v: Variant(v, model, shape, prompt + 2 * new) for v in ("static", "static_encrypted")}

    def run(timed: bool) -> dict[str, list[float]]:
        caches = {k: v.make() for k, v in variants.items()}
        nxt, times, same = {}, {k: [] for k in caches}, True
        with torch.no_grad():
            for k, c in caches.items():
                out = model(input_ids=ids, past_key_values=c, cache_position=torch.arange(prompt), use_cache=True)
                nxt[k] = out.logits[:, -1:].argmax(-1)
            for step in range(new if timed else 3):
                pos = torch.tensor([prompt + step])
                for k in (list(caches) if step % 2 == 0 else list(caches)[::-1]):
                    t = time.perf_counter()
                    out = model(input_ids=nxt[k], past_key_values=caches[k], cache_position=pos, use_cache=True)
                    nxt[k] = out.logits[:, -1:].argmax(-1)
                    times[k].append(time.perf_counter() - t)
                same = same and torch.equal(nxt["static"], nxt["static_encrypted"])
        t = time.perf_counter()
        caches["static_encrypted"].check()
        drain = time.perf_counter() - t
        times["static_encrypted"] = [x + drain / len(times["static_encrypted"]) for x in times["static_encrypted"]]
        for k, c in caches.items():
            variants[k].cache = c
        if not same:
            raise SystemExit(f"{name}: the encrypted cache decoded other tokens than StaticCache")
        return times

    t = time.perf_counter()
    run(False)                          # compile both caches' graphs (prefill and decode) untimed
    progress(f"{name}: compiled and warmed up in {time.perf_counter() - t:.1f} s")
    times = run(True)
    progress(f"{name}: {new} interleaved decode steps timed")
    per = max(1, new // repeats)
    blocks = [slice(i * per, (i + 1) * per) for i in range(min(repeats, new))]
    tps = {k: [shape["batch"] * len(v[b]) / sum(v[b]) for b in blocks] for k, v in times.items()}
    ratio = [sum(times["static"][b]) / sum(times["static_encrypted"][b]) for b in blocks]
    result = {"shape": shape, "method": "steps",
              "decode_tokens_per_s": {k: spread(v, max_spread) for k, v in tps.items()},
              "ratio_encrypted_to_static": spread(ratio, max_spread),
              "step_ms_median": {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()},
              "memory": {k: memory(v.cache) for k, v in variants.items()}}
    for v in variants.values():
        v.close()
    return result


def measure(name: str, shape: dict, repeats: int, max_spread: float) -> dict:
    model = build_model(shape)
    model.forward = torch.compile(model.forward, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, shape["vocab"], (shape["batch"], shape["prompt"]), generator=g)
    max_len = shape["prompt"] + shape["new"]
    variants = {v: Variant(v, model, shape, max_len) for v in ("static", "static_encrypted")}
    for v in variants.values():        # compile both caches' graphs (prefill and decode) untimed
        t = v.run(ids, 3)
        progress(f"{name}: {v.name} compiled and warmed up in {t:.1f} s")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for k in order:
            full = variants[k].run(ids, shape["new"])
            one = variants[k].run(ids, 1)
            times[k].append(max(full - one, 1e-9))
            progress(f"{name}: repeat {r + 1}/{repeats}: {k} decoded in {times[k][-1]:.2f} s")
    tokens = shape["batch"] * (shape["new"] - 1)
    tps = {k: [tokens / t for t in v] for k, v in times.items()}
    ratio = [e / s for e, s in zip(tps["static_encrypted"], tps["static"])]
    result = {"shape": shape, "decode_tokens_per_s": {k: spread(v, max_spread) for k, v in tps.items()},
              "ratio_encrypted_to_static": spread(ratio, max_spread),
              "memory": {k: memory(v.cache) for k, v in variants.items()}}
    for v in variants.values():
        v.close()
    return result


def report(results: dict, meta: dict) -> str:
    lines = [f"# Compiled StaticEncryptedCache vs compiled StaticCache ({meta['date']})", "",
             f"CPU: {meta['cpu']}; torch {meta['torch']}, {meta['threads']} thread(s); "
             f"torch.compile(model.forward, fullgraph=True); audit on", "",
             f"method: {meta['method']} ({_METHODS[meta['method']]})", "",
             "| shape | StaticCache tok/s (median) | encrypted tok/s (median) | ratio min / median / max | verdict |",
             "|---|---:|---:|---|---|"]
    for name, r in results.items():
        d, q = r["decode_tokens_per_s"], r["ratio_encrypted_to_static"]
        lines.append(f"| {name} | {d['static']['median']:.1f} | {d['static_encrypted']['median']:.1f} | "
                     f"{q['min']:.3f} / {q['median']:.3f} / {q['max']:.3f} | {q['verdict']} |")
    lines += ["", "| shape | plaintext K/V MiB | + arena MiB | + slot table MiB | record buffer MiB | added / plaintext |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        m = r["memory"]["static_encrypted"]
        lines.append(f"| {name} | {m['plaintext_bytes'] / 2**20:.2f} | {m['arena_bytes'] / 2**20:.2f} | "
                     f"{m['slot_table_bytes'] / 2**20:.2f} | {m['record_buffer_bytes'] / 2**20:.2f} | "
                     f"{m['added_over_plaintext']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="readme,qwen05")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-spread", type=float, default=0.10)
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 1 repeat (a smoke run)")
    ap.add_argument("--method", choices=("generate", "steps"), default="generate",
                    help="generate: whole generates per repeat; steps: decode steps of both caches alternating "
                         "one by one, ratios per block of steps (steadier on a shared machine)")
    ap.add_argument("--out", default="bench-results/static_report.json")
    args = ap.parse_args(argv)
    shapes = ["tiny"] if args.quick else [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": repeats, "method": args.method}
    fn = measure_steps if args.method == "steps" else measure
    results = {s: fn(s, SHAPES[s], repeats, args.max_spread) for s in shapes}
    print(report(results, meta))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
