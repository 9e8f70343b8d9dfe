"""Time per saved and per loaded prompt token: PQCKVConnector (sealed, audited) against vLLM's own
ExampleConnector (plaintext safetensors files), interleaved in one run, on vLLM's CPU backend.

    .venv-vllm/bin/python benchmarks/bench_vllm_connector.py [--rounds 7] [--tokens 480] [--shape tiny]

A save is a request whose prompt is computed and stored; a load is the same prompt again after vLLM's
prefix cache is reset, so it is filled from the connector. Times are whole requests (one output token),
divided by the stored tokens; both engines run the same prompts in alternating order. Reports medians,
min..max, and the ratio PQC/Example per round (median and spread).

A staggered batch (``--stagger K``) is K requests of one new prompt added one per engine step, as requests
of a popular prompt reach a server: the later ones find the prompt's prefix saved, or being saved. Its
time is the whole batch's; for the PQC connector the run also counts how many times each prompt's prefix
was sealed (ENCRYPT records in the audit log, per layer and stored token): once is right.

``--workload multiturn`` is a chat workload instead: ``--tenants`` tenants each hold a chat of ``--turns``
turns that starts with the same ``--system``-token system prompt; each turn's prompt is the previous turn's
prompt, a ``--answer``-token answer and a ``--user``-token message (answer and message are fixed synthetic
tokens, so all engines see the same prompts). Three engines run every request, interleaved in rotating order:
no connector, vLLM's ExampleConnector (plaintext, keyed by the whole prompt) and PQCKVConnector (sealed,
keyed block by block per tenant). vLLM's own prefix cache is reset before every request, as if the chat's
next turn reached an engine that no longer held it, so whatever is reused comes from the connector. Reports
per engine the tokens loaded per request, the hit rate (requests that loaded anything; tokens loaded of the
tokens that could be), time to first token (one output token: the request's whole time) and prompt tokens
per second, for every request and for warm turns (turn 2 on), with the ratios against the other engines
paired per request (median, min..max). ``--rounds`` repeats the whole workload with fresh prompts.

``--shape`` picks the model: ``tiny`` (2 layers, hidden 128, 4 KV heads x 32), where recomputing a prompt
costs less than reading it back, or ``0.5b``, the layer shape of a 0.5B-parameter Llama-architecture chat
model (24 layers, hidden 896, 14 query heads, 2 KV heads x 64, MLP 4864) with the small test vocabulary.
Both have random weights (fp32); the times depend on the shape, not on what the weights say.
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
# vLLM's CPU backend keeps cores back from an engine's compute threads, one more when it has a KV connector:
# on a 2-core machine the engine without a connector would compute on 1 core and the others on 2. The same
# number for every engine keeps the comparison fair.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "vllm"))

BS = 32
# model shapes: save_tiny_llama's keyword arguments
SHAPES = {
    "tiny": dict(layers=2, hidden=128, heads=4, kv_heads=4, head_dim=32, intermediate=256),
    "0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864),
}


def _describe(shape: str) -> str:
    s = SHAPES[shape]
    return (f"{shape} random-weight Llama ({s['layers']} layers, hidden {s['hidden']}, {s['kv_heads']} KV heads x "
            f"{s['head_dim']}, fp32)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=480, help="prompt length (stored: whole blocks minus one token)")
    ap.add_argument("--stagger", type=int, default=4, help="requests per staggered batch (0: none)")
    ap.add_argument("--workload", choices=("prompt", "multiturn"), default="prompt")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny", help="model shape (random weights)")
    ap.add_argument("--tenants", type=int, default=4, help="multiturn: tenants, one chat each")
    ap.add_argument("--turns", type=int, default=8, help="multiturn: turns per chat")
    ap.add_argument("--system", type=int, default=256, help="multiturn: system prompt tokens")
    ap.add_argument("--user", type=int, default=48, help="multiturn: tokens of each user message")
    ap.add_argument("--answer", type=int, default=48, help="multiturn: tokens of each answer")
    args = ap.parse_args()
    if min(args.rounds, args.tokens, args.tenants, args.turns, args.system, args.user) < 1 or args.answer < 0 \
            or args.stagger < 0:
        ap.error("sizes must be positive (--answer and --stagger may be 0)")
    if args.workload == "multiturn":
        _multiturn(args)
        return

    from tiny_model import save_tiny_llama
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantKeyPair
    from pqc_kv_cache.vllm import KeyService, generate_server_secret_file, kv_transfer_config, request_fields

    d = tempfile.mkdtemp(prefix="bench-vllm-")
    model = save_tiny_llama(os.path.join(d, "model"), **SHAPES[args.shape])
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
        print(f"vLLM {__import__('vllm').__version__} CPU backend, {_describe(args.shape)}, "
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
            per_prefix = SHAPES[args.shape]["layers"] * stored       # one record per layer and stored token
            batches = args.rounds + 1
            print(f"  pqc staggered batches of {args.stagger}: {(seals / per_prefix - batches) / batches:.2f} seals "
                  f"of the prompt's prefix per batch ({seals} ENCRYPT records)")


def _spread(v: list[float], scale: float = 1.0, fmt: str = ".1f") -> str:
    if not v:
        return "n/a"
    return f"median {statistics.median(v) * scale:{fmt}} (min {min(v) * scale:{fmt}}, max {max(v) * scale:{fmt}})"


def _multiturn(args) -> None:
    from tiny_model import save_tiny_llama
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from pqc_kv_cache.isolation import TenantIsolationManager
    from pqc_kv_cache.session import TenantKeyPair
    from pqc_kv_cache.vllm import KeyService, generate_server_secret_file, kv_transfer_config, request_fields

    longest = args.system + args.turns * (args.user + args.answer)
    max_len = (longest // BS + 2) * BS
    d = tempfile.mkdtemp(prefix="bench-vllm-chat-")
    model = save_tiny_llama(os.path.join(d, "model"), max_positions=max(512, max_len),  # a chat may pass 512
                            **SHAPES[args.shape])
    manager = TenantIsolationManager()
    secret_path = os.path.join(d, "secret", "server.key")
    secret = generate_server_secret_file(secret_path)
    tenants = [f"tenant-{t}" for t in range(args.tenants)]
    fields = {t: request_fields(secret, t, manager.create_session(TenantKeyPair.generate(t).identity()).session_id)
              for t in tenants}
    with KeyService(manager, os.path.join(d, "keys")) as service:
        common = dict(model=model, dtype="float32", enforce_eager=True, block_size=BS, max_model_len=max_len, seed=0)
        engines = {
            "none": LLM(**common),
            "example": LLM(**common, kv_transfer_config=KVTransferConfig(
                kv_connector="ExampleConnector", kv_role="kv_both",
                kv_connector_extra_config={"shared_storage_path": os.path.join(d, "example")})),
            "pqc": LLM(**common, kv_transfer_config=KVTransferConfig(**kv_transfer_config(
                os.path.join(d, "pqc"), service.path, os.path.join(d, "audit.log"), secret_path,
                audit_signing_key=os.path.join(d, "audit.key")))),
        }
        # per engine, per request (round, tenant, turn): (seconds, prompt tokens, tokens loaded, storable tokens)
        res: dict[str, dict[tuple[int, int, int], tuple[float, int, int, int]]] = {n: {} for n in engines}
        names = list(engines)
        for r in range(args.rounds + 1):                 # round 0 warms up and is dropped
            system = [5 + (r * 131 + i * 7) % 400 for i in range(args.system)]
            prompts = {t: list(system) for t in range(args.tenants)}
            for k in range(args.turns):
                for t, tenant in enumerate(tenants):
                    msg = [7 + (r * 17 + t * 101 + k * 37 + i * 13) % 400 for i in range(args.user)]
                    ids = prompts[t] + msg
                    f = fields[tenant]
                    sp = SamplingParams(max_tokens=1, temperature=0,
                                        extra_args={"kv_transfer_params": f["kv_transfer_params"]})
                    shift = (r * args.turns * args.tenants + k * args.tenants + t) % len(names)
                    for name in names[shift:] + names[:shift]:
                        llm = engines[name]
                        llm.reset_prefix_cache()
                        prompt = {"prompt_token_ids": ids, "cache_salt": f["cache_salt"]}
                        t0 = time.perf_counter()
                        out = llm.generate(prompt, sp, use_tqdm=False)[0]
                        dt = time.perf_counter() - t0
                        if r:
                            res[name][(r, t, k)] = (dt, len(ids), out.num_cached_tokens,
                                                    (len(ids) - 1) // BS * BS)
                    answer = [9 + (r * 19 + t * 59 + k * 41 + i * 3) % 400 for i in range(args.answer)]
                    prompts[t] = ids + answer
        print(f"vLLM {__import__('vllm').__version__} CPU backend, {_describe(args.shape)}; "
              f"{args.tenants} tenants x {args.turns} turns, system prompt {args.system} tokens, "
              f"{args.user}-token messages, {args.answer}-token answers; {args.rounds} round(s), "
              f"{os.cpu_count()} CPUs; vLLM's prefix cache reset before every request")
        for name in names:
            v = list(res[name].values())
            warm = [x for key, x in res[name].items() if key[2] > 0]
            hits = sum(1 for x in v if x[2] > 0)
            print(f"  {name:8s} loaded/request {_spread([x[2] for x in v], fmt='.0f')} tokens; hit rate "
                  f"{hits}/{len(v)} requests, {sum(x[2] for x in v) / max(sum(x[3] for x in v), 1):.2f} of "
                  f"storable tokens")
            print(f"  {'':8s} TTFT all {_spread([x[0] for x in v], 1e3)} ms; warm turns "
                  f"{_spread([x[0] for x in warm], 1e3)} ms")
            print(f"  {'':8s} prompt tokens/s warm turns {_spread([x[1] / x[0] for x in warm], fmt='.0f')}")
        keys = sorted(k for k in res["pqc"] if k[2] > 0)
        for other in ("example", "none"):
            ratios = [res["pqc"][k][0] / res[other][k][0] for k in keys]
            print(f"  TTFT ratio pqc/{other} (warm turns, paired per request): {_spread(ratios, fmt='.2f')}")
        ratios = [res["example"][k][0] / res["none"][k][0] for k in keys]
        print(f"  TTFT ratio example/none (warm turns, paired per request): {_spread(ratios, fmt='.2f')}")
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown(timeout=30)


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
