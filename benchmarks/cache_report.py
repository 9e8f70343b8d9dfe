"""EncryptedCache against DynamicCache, measured in the same run: decode tokens/s, audit on vs off, host backend bytes/s.

Config (issue 4): random-weight Llama, 4 layers, hidden 256, 4 KV heads (8 query heads, head dim 32),
batch 4, 512-token prompt, 128 new tokens, greedy, fp32, CPU. Decode tokens/s = batch × new tokens
/ (time of the whole generate − time of a 1-token generate), i.e. prefill excluded. Each figure is
the median of ``--repeats`` runs, the runs of the variants interleaved.

Prints a markdown table and writes JSON (``--json`` / ``--out``, default bench-results/cache_report.json).

    python benchmarks/cache_report.py [--repeats 3] [--new-tokens 128] [--quick] [--json PATH]
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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from pqc_kv_cache.audit import KVAuditLog  # noqa: E402
from pqc_kv_cache.backends.host import HostBackend  # noqa: E402
from pqc_kv_cache.cache import EncryptedCache  # noqa: E402
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session  # noqa: E402

BATCH, PROMPT, LAYERS, HIDDEN, KV_HEADS = 4, 512, 4, 256, 4


def build_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def generate_time(model, ids, new_tokens, make_cache) -> tuple[float, torch.Tensor]:
    cache = make_cache()
    kw = {} if cache is None else {"past_key_values": cache}
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kw)
    return time.perf_counter() - t, out


def decode_rates(model, ids, new_tokens, variants: dict, repeats: int) -> tuple[dict, dict]:
    times = {k: [] for k in variants}
    outs = {}
    for _ in range(repeats):
        for name, make in variants.items():
            t_all, out = generate_time(model, ids, new_tokens, make)
            t_one, _ = generate_time(model, ids, 1, make)
            times[name].append(max(t_all - t_one, 1e-9))
            outs[name] = out
    rates = {k: BATCH * (new_tokens - 1) / statistics.median(v) for k, v in times.items()}
    return rates, outs


def _best(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _bulk_rate(nbytes: int, repeats: int) -> float:
    aes = AESGCM(AESGCM.generate_key(256))
    nonce, aad = os.urandom(12), os.urandom(80)
    ct = aes.encrypt(nonce, os.urandom(nbytes), aad)
    out = np.empty(nbytes, np.uint8)
    return nbytes / _best(lambda: aes.decrypt_into(nonce, ct, aad, out), repeats)


def backend_throughput(sessions, repeats: int = 30) -> dict:
    """Bytes/s of HostBackend.decrypt_chunks reading one layer against one bulk AESGCM decrypt of as many bytes.

    ``cache_layout``: the chunk table EncryptedCache itself builds after the prompt and 128 decode steps
    (merged segments, decrypted into its head-major scratch). ``one_chunk_per_token``: the worst case of
    one chunk per decoded position (merging off), into the same scratch."""
    out = {}
    for name, merge in (("cache_layout", True), ("one_chunk_per_token", False)):
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

        def spy(*args):
            seen["args"] = args
            return real(*args)
        be.decrypt_chunks = spy
        try:
            layer._read_from(0)
        finally:
            del be.decrypt_chunks
        keys, layout, table, arena, k_out, v_out = seen["args"][:6]
        nbytes = int(np.asarray(table.pos_count).sum()) * layout.bytes_per_position
        t = _best(lambda: be.decrypt_chunks(keys, layout, table, arena, k_out, v_out), repeats)
        bulk = _bulk_rate(nbytes, repeats)
        out[name] = {"bytes": nbytes, "chunks": len(table), "backend_bytes_per_s": nbytes / t,
                     "bulk_aesgcm_bytes_per_s": bulk, "ratio": nbytes / t / bulk}
    out["backend_threads"] = HostBackend.instance().threads
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 32 new tokens (a smoke run, not for figures)")
    ap.add_argument("--json", "--out", dest="json",
                    default=os.path.join("bench-results", "cache_report.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.new_tokens = 1, 32
    if args.repeats < 1 or args.new_tokens < 2:
        ap.error("--repeats must be >= 1 and --new-tokens >= 2")
    if os.path.dirname(args.json):
        os.makedirs(os.path.dirname(args.json), exist_ok=True)

    model = build_model()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, PROMPT))
    sessions = [establish_tenant_session(TenantIdentity(f"tenant-{i}"), ttl_seconds=3600) for i in range(BATCH)]
    tmp = tempfile.mkdtemp(prefix="pqc-kv-bench-")
    audit = KVAuditLog(max_entries=200_000)
    variants = {
        "dynamic": lambda: None,
        "encrypted_audit_off": lambda: EncryptedCache(model.config, sessions=sessions, audit=None),
        "encrypted_audit_on": lambda: EncryptedCache(model.config, sessions=sessions, audit=audit),
    }
    rates, outs = decode_rates(model, ids, args.new_tokens, variants, args.repeats)
    audit.flush()
    identical = all(torch.equal(outs["dynamic"], o) for o in outs.values())
    thr = backend_throughput(sessions)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()},
        "config": {"layers": LAYERS, "hidden": HIDDEN, "kv_heads": KV_HEADS, "batch": BATCH, "prompt": PROMPT,
                   "new_tokens": args.new_tokens, "dtype": "float32", "repeats": args.repeats},
        "decode_tokens_per_s": rates,
        "ratio_encrypted_vs_dynamic": rates["encrypted_audit_off"] / rates["dynamic"],
        "ratio_encrypted_audit_on_vs_dynamic": rates["encrypted_audit_on"] / rates["dynamic"],
        "ratio_audit_on_vs_off": rates["encrypted_audit_on"] / rates["encrypted_audit_off"],
        "outputs_identical": identical,
        "audit_stats": audit.stats(),
        "host_backend": thr,
    }
    audit.close()
    print("| measure | value |\n|---|---|")
    for k, v in rates.items():
        print(f"| decode tokens/s, {k} | {v:.1f} |")
    print(f"| EncryptedCache / DynamicCache (audit off) | {result['ratio_encrypted_vs_dynamic']:.2f} |")
    print(f"| EncryptedCache / DynamicCache (audit on) | {result['ratio_encrypted_audit_on_vs_dynamic']:.2f} |")
    print(f"| audit on / audit off | {result['ratio_audit_on_vs_off']:.2f} |")
    for name in ("cache_layout", "one_chunk_per_token"):
        r = thr[name]
        print(f"| host backend decrypt of one layer, {name} ({r['chunks']} chunks, "
              f"{r['bytes'] / 2**20:.2f} MiB), GB/s | {r['backend_bytes_per_s'] / 1e9:.2f} |")
        print(f"| one bulk AESGCM decrypt of as many bytes, GB/s | {r['bulk_aesgcm_bytes_per_s'] / 1e9:.2f} |")
        print(f"| host backend / bulk, {name} | {r['ratio']:.2f} |")
    print(f"| outputs token-identical | {identical} |")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nJSON: {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
