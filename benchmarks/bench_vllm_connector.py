"""Time per saved and per loaded prompt token: PQCKVConnector (sealed, audited) against vLLM's own
ExampleConnector (plaintext safetensors files), interleaved in one run, on vLLM's CPU backend.

    .venv-vllm/bin/python benchmarks/bench_vllm_connector.py [--rounds 7] [--tokens 480]

A save is a request whose prompt is computed and stored; a load is the same prompt again after vLLM's
prefix cache is reset, so it is filled from the connector. Times are whole requests (one output token),
divided by the stored tokens; both engines run the same prompts in alternating order. Reports medians,
min..max, and the ratio PQC/Example per round (median and spread).

A staggered batch (``--stagger K``) is K requests of one new prompt added one per engine step, as requests
of a popular prompt reach a server: the later ones find the prompt's prefix saved, or being saved. Its
time is the whole batch's; for the PQC connector the run also counts how many times each prompt's prefix
was sealed (ENCRYPT records in the audit log, per layer and stored token): once is right.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "vllm"))

BS = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=480, help="prompt length (stored: whole blocks minus one token)")
    ap.add_argument("--stagger", type=int, default=4, help="requests per staggered batch (0: none)")
    args = ap.parse_args()

    from tiny_model import save_tiny_llama
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantKeyPair
    from pqc_kv_cache.vllm import KeyService, generate_server_secret_file, kv_transfer_config, request_fields

    d = tempfile.mkdtemp(prefix="bench-vllm-")
    model = save_tiny_llama(os.path.join(d, "model"))
    manager = TenantIsolationManager()
    session = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    secret_path = os.path.join(d, "secret", "server.key")
    fields = request_fields(generate_server_secret_file(secret_path), "tenant-a", session.session_id)
    stored = (args.tokens - 1) // BS * BS
    with KeyService(manager, os.path.join(d, "keys")) as service:
        common = dict(model=model, dtype="float32", enforce_eager=True, block_size=BS, max_model_len=512, seed=0)
        engines = {
            "pqc": LLM(**common, kv_transfer_config=KVTransferConfig(**kv_transfer_config(
                os.path.join(d, "pqc"), service.path, os.path.join(d, "audit.log"), secret_path,
                audit_signing_key=os.path.join(d, "audit.key")))),
            "example": LLM(**common, kv_transfer_config=KVTransferConfig(
                kv_connector="ExampleConnector", kv_role="kv_both",
                kv_connector_extra_config={"shared_storage_path": os.path.join(d, "example")})),
        }
        sp = SamplingParams(max_tokens=1, temperature=0, extra_args={"kv_transfer_params": fields["kv_transfer_params"]})
        ops = ("save", "load") + (("stagger",) if args.stagger else ())
        times: dict[tuple[str, str], list[float]] = {(n, op): [] for n in engines for op in ops}
        for r in range(args.rounds + 1):                 # round 0 warms up and is dropped
            ids = [5 + (r * 131 + i * 7) % 400 for i in range(args.tokens)]
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                llm = engines[name]
                prompt = {"prompt_token_ids": ids, "cache_salt": fields["cache_salt"]}
                for op in ("save", "load"):
                    if op == "load":
                        llm.reset_prefix_cache()
                    t = time.perf_counter()
                    out = llm.generate(prompt, sp, use_tqdm=False)[0]
                    dt = time.perf_counter() - t
                    if op == "load" and out.num_cached_tokens < stored:
                        raise SystemExit(f"{name}: round {r} loaded {out.num_cached_tokens} of {stored} tokens")
                    if r:
                        times[(name, op)].append(dt / stored)
                if args.stagger:
                    sids = [5 + (r * 173 + i * 11) % 400 for i in range(args.tokens)]
                    dt = _staggered(llm, {"prompt_token_ids": sids, "cache_salt": fields["cache_salt"]}, sp,
                                    args.stagger, f"{name}-{r}")
                    if r:
                        times[(name, "stagger")].append(dt / stored)
        print(f"vLLM {__import__('vllm').__version__} CPU backend, tiny Llama (2 layers, 4 KV heads x 32, fp32), "
              f"{stored} stored tokens per request, {args.rounds} rounds, {os.cpu_count()} CPUs")
        for (name, op), v in times.items():
            print(f"  {name:8s} {op}: median {statistics.median(v) * 1e6:8.1f} us/token "
                  f"(min {min(v) * 1e6:.1f}, max {max(v) * 1e6:.1f})")
        for op in ops:
            ratios = [p / e for p, e in zip(times[("pqc", op)], times[("example", op)])]
            print(f"  ratio pqc/example {op}: median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown(timeout=30)
        if args.stagger:
            # prompts stored: one per round's save, one per staggered batch (all rounds, the warm-up's too)
            r = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", "show", "--json", "--operation",
                                "ENCRYPT", os.path.join(d, "audit.log")], capture_output=True, text=True)
            seals = sum(1 for line in r.stdout.splitlines() if line.strip() and json.loads(line)["status"] == "OK")
            per_prefix = 2 * stored                      # the tiny Llama's 2 layers
            batches = args.rounds + 1
            print(f"  pqc staggered batches of {args.stagger}: {(seals / per_prefix - batches) / batches:.2f} seals "
                  f"of the prompt's prefix per batch ({seals} ENCRYPT records)")


def _staggered(llm, prompt, sp, k: int, tag: str) -> float:
    """K requests of ``prompt``, one added per engine step, then stepped to the end: seconds."""
    engine = llm.llm_engine
    t = time.perf_counter()
    for i in range(k):
        engine.add_request(f"{tag}-{i}", prompt, sp)
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
