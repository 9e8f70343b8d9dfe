"""EncryptedCache against DynamicCache, measured in the same run: decode tokens/s, audit on vs off, host backend bytes/s.

Config (issue 4): random-weight Llama, 4 layers, hidden 256, 4 KV heads (8 query heads, head dim 32),
batch 4, 512-token prompt, 128 new tokens, greedy, fp32, CPU. Decode tokens/s = batch × new tokens
/ (time of the whole generate − time of a 1-token generate), i.e. prefill excluded. Each figure is
the median of ``--repeats`` runs, the runs of the variants interleaved.

Prints a markdown table and writes JSON (``--json``, default benchmarks/cache_report.json).

    python benchmarks/cache_report.py [--repeats 3] [--new-tokens 128] [--json PATH]
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
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot  # noqa: E402
from pqc_kv_cache.backends.host import HostBackend  # noqa: E402
from pqc_kv_cache.cache import EncryptedCache  # noqa: E402
from pqc_kv_cache.envelope import session_tag, tenant_tag  # noqa: E402
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


def backend_throughput(repeats: int = 20) -> dict:
    """Bytes/s of HostBackend.decrypt_chunks over one decode step's layer (prefill chunk + 128 one-position
    chunks per row) against one bulk AESGCM decrypt of the same number of bytes."""
    be = HostBackend.instance()
    H, D, dtype = KV_HEADS, HIDDEN // 8, torch.float32
    layout = ChunkLayout(0, H, D, dtype)
    key = AESGCM.generate_key(256)
    keys = [KeySlot(key, tenant_tag("t"), session_tag("s"), 0)]
    seq = PROMPT + 128
    k = torch.randn(BATCH, H, seq, D)
    v = torch.randn(BATCH, H, seq, D)
    counts = [PROMPT] + [1] * 128
    starts = np.cumsum([0] + counts[:-1])
    rows = np.tile(np.arange(BATCH), len(counts))
    ps = np.repeat(starts, BATCH)
    pc = np.repeat(counts, BATCH)
    sizes = pc * layout.bytes_per_position + 16
    offs = np.cumsum(sizes) - sizes
    table = ChunkTable(np.zeros(rows.size, np.int64), rows, ps, pc, ps, np.arange(rows.size) + 1, offs)
    arena = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    be.encrypt_chunks(keys, layout, table, k, v, arena)
    buf = torch.empty(BATCH, seq, 2, H, D)
    k_out, v_out = buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)
    plain_bytes = int((pc * layout.bytes_per_position).sum())

    def best(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    t_backend = best(lambda: be.decrypt_chunks(keys, layout, table, arena, k_out, v_out))
    assert torch.equal(k_out, k) and torch.equal(v_out, v)
    aes = AESGCM(key)
    nonce, aad = os.urandom(12), os.urandom(80)
    bulk_ct = aes.encrypt(nonce, os.urandom(plain_bytes), aad)
    bulk_out = np.empty(plain_bytes, np.uint8)
    t_bulk = best(lambda: aes.decrypt_into(nonce, bulk_ct, aad, bulk_out))
    return {"bytes": plain_bytes, "chunks": int(rows.size), "backend_bytes_per_s": plain_bytes / t_backend,
            "bulk_aesgcm_bytes_per_s": plain_bytes / t_bulk, "ratio": t_bulk / t_backend,
            "backend_threads": be.threads}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache_report.json"))
    args = ap.parse_args(argv)

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
    thr = backend_throughput()
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
    print(f"| host backend decrypt, GB/s ({thr['chunks']} chunks, {thr['bytes'] / 2**20:.1f} MiB) | "
          f"{thr['backend_bytes_per_s'] / 1e9:.2f} |")
    print(f"| one bulk AESGCM decrypt, GB/s | {thr['bulk_aesgcm_bytes_per_s'] / 1e9:.2f} |")
    print(f"| host backend / bulk | {thr['ratio']:.2f} |")
    print(f"| outputs token-identical | {identical} |")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nJSON: {args.json}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
