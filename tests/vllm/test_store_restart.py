"""The connector's store across a restart of the gateway: the gateway process (``python -m
pqc_kv_cache.vllm.gateway``) with its key service on TCP + mutual TLS and a session vault, in front of a fake
vLLM whose request handler runs the connector's worker side (``KVBlockStore``, ``support.store_worker``) in a
process of its own, as a worker on another host does, with the tenant and session the gateway set. Blocks
stored before the gateway is killed load in a fresh process after it starts again, for their tenant only, and
the blocks stored after it are sealed under a new epoch, no (key, nonce) pair used twice."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the gateway runs on vLLM's server stack (starlette, httpx, uvicorn)")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from support.ports import free_port, wait_port  # noqa: E402

from pqc_kv_cache.vllm import ServerSecret, generate_engine_token_file, generate_server_secret_file  # noqa: E402
from pqc_kv_cache.vllm.certs import make_certificates  # noqa: E402
from pqc_kv_cache.vllm.gateway import add_api_key  # noqa: E402
from pqc_kv_cache.vllm.storefiles import block_file, chain_hashes  # noqa: E402
from pqc_kv_cache.vllm.tenancy import PARAMS_KEY, read_key_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
BS = 4
TURN_1 = list(range(100, 100 + 6 * BS))                 # a first chat turn: 6 whole blocks
TURN_2 = TURN_1 + list(range(300, 300 + 2 * BS))        # the next turn starts with it: 8 blocks


class FakeEngine:
    """A fake vLLM: each request's handler runs the connector's worker side in a process of its own, with
    the tenant and session the gateway put into ``kv_transfer_params``, and answers what it did."""

    def __init__(self, base: dict):
        self.base, self.seen = base, []

    def app(self) -> Starlette:
        async def handle(request):
            body = json.loads(await request.body())
            p = body["kv_transfer_params"][PARAMS_KEY]
            self.seen.append((p["tenant_id"], p["session_id"]))
            args = {**self.base, **body["store"], "tenant": p["tenant_id"], "session": p["session_id"]}
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS),
                                                               os.environ.get("PYTHONPATH", "")]))
            run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "support.store_worker",
                                                           json.dumps(args)],
                                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
            if run.returncode:
                return JSONResponse({"worker failed": run.stderr[-4000:]}, status_code=500)
            return JSONResponse(json.loads(run.stdout.strip().splitlines()[-1]))
        return Starlette(routes=[Route("/v1/completions", handle, methods=["POST"])])


@pytest.fixture()
def deployment(tmp_path):
    """(gateway command line, fake engine, API keys per tenant, gateway port, server secret)."""
    import uvicorn
    server, clients = make_certificates(tmp_path / "pki", ["127.0.0.1"], ["worker"])
    generate_server_secret_file(tmp_path / "secrets" / "server.key")
    secret = read_key_file(tmp_path / "secrets" / "server.key", "server secret")
    generate_engine_token_file(str(tmp_path / "secrets" / "engine.token"))
    api = {t: add_api_key(str(tmp_path / "keys.json"), t) for t in ("tenant-a", "tenant-b")}
    key_port, gw_port, up_port = free_port(), free_port(), free_port()
    w = clients["worker"]
    engine = FakeEngine({"store": str(tmp_path / "store"), "socket": f"tls://127.0.0.1:{key_port}",
                         "tls": [w.ca, w.cert, w.key], "token": str(tmp_path / "secrets" / "engine.token"),
                         "secret": secret.hex(), "block_size": BS, "seed": 7, "reps": 1})
    up = uvicorn.Server(uvicorn.Config(engine.app(), host="127.0.0.1", port=up_port, log_level="warning"))
    threading.Thread(target=up.run, daemon=True).start()
    args = [sys.executable, "-m", "pqc_kv_cache.vllm.gateway", "--api-keys", str(tmp_path / "keys.json"),
            "--server-secret", str(tmp_path / "secrets" / "server.key"),
            "--engine-token", str(tmp_path / "secrets" / "engine.token"),
            "--key-service-dir", str(tmp_path / "run"), "--upstream", f"http://127.0.0.1:{up_port}",
            "--port", str(gw_port), "--key-service-tcp", f"127.0.0.1:{key_port}",
            "--tls-ca", server.ca, "--tls-cert", server.cert, "--tls-key", server.key,
            "--session-dir", str(tmp_path / "sessions"), "--session-kek", str(tmp_path / "secrets" / "sessions.kek")]
    try:
        yield args, engine, api, (gw_port, key_port), ServerSecret(secret)
    finally:
        up.should_exit = True


class Gateway:
    """The gateway process; ``ask(tenant, store)`` sends a request whose handler runs ``store``."""

    def __init__(self, args: list[str], api: dict, ports: tuple[int, int]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.api, self.port = api, ports[0]
        try:
            for port in ports:
                wait_port(port, self.proc)
        except BaseException:
            self.kill()
            raise

    def ask(self, tenant: str, store: dict) -> dict:
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", json={"prompt": "p", "store": store},
                       headers={"authorization": f"Bearer {self.api[tenant]}"}, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)                # no clean shutdown: what a crash leaves
        self.proc.communicate(timeout=30)


def test_blocks_stored_before_the_gateway_is_killed_load_after_it_restarts_for_their_tenant_only(deployment, tmp_path):
    args, engine, api, ports, secret = deployment
    gw = Gateway(args, api, ports)
    try:
        saved = gw.ask("tenant-a", {"op": "save", "prompt": TURN_1, "first": 0})
        assert saved["written"] == 6 and len(saved["sealed"]) == 6 * 2          # 6 blocks x 2 layers
        assert gw.ask("tenant-b", {"op": "load", "prompt": TURN_1, "lookup": True})["hit"] == 0
    finally:
        gw.kill()
    (tenant_a, session_a), (tenant_b, session_b) = engine.seen

    gw = Gateway(args, api, ports)
    try:
        # a fresh worker process of the same tenant: the gateway resumed its session, so the prefix is found
        # under the same names and every block verifies and loads (under the keys of the epochs before)
        assert gw.ask("tenant-a", {"op": "load", "prompt": TURN_2, "lookup": True}) == {
            "hit": 6, "errors": [[]], "equal": True}
        # another tenant finds nothing of it, and A's files put under B's names fail B's tags: nothing loads
        assert gw.ask("tenant-b", {"op": "load", "prompt": TURN_1, "lookup": True})["hit"] == 0
        for c in chain_hashes(TURN_1, BS):
            b = block_file(str(tmp_path / "store"), secret, tenant_b, session_b, c)
            os.makedirs(os.path.dirname(b), mode=0o700, exist_ok=True)
            shutil.copyfile(block_file(str(tmp_path / "store"), secret, tenant_a, session_a, c), b)
        stolen = gw.ask("tenant-b", {"op": "load", "prompt": TURN_1, "lookup": True})
        assert stolen["hit"] == 6 and stolen["errors"] == [list(range(16 - 6, 16))] and not stolen["equal"]
        # the next turn's new blocks, sealed after the restart
        after = gw.ask("tenant-a", {"op": "save", "prompt": TURN_2, "first": 6})
        assert after["written"] == 2
        # and the whole next turn, blocks of both epochs, loads in another fresh process
        assert gw.ask("tenant-a", {"op": "load", "prompt": TURN_2, "lookup": True}) == {
            "hit": 8, "errors": [[]], "equal": True}
    finally:
        gw.kill()
    assert engine.seen[2:] == [(tenant_a, session_a), (tenant_b, session_b), (tenant_b, session_b),
                               (tenant_a, session_a), (tenant_a, session_a)]      # both sessions resumed
    before = {(e, c, k) for e, c, k in saved["sealed"]}
    since = {(e, c, k) for e, c, k in after["sealed"]}
    assert len(before) == 12 and len(since) == 4
    assert {e for e, _, _ in since}.isdisjoint({e for e, _, _ in before})          # a new epoch after the restart
    assert {k for _, _, k in since}.isdisjoint({k for _, _, k in before})          # under a key not used before
    nonces = [(k, e, c) for e, c, k in saved["sealed"] + after["sealed"]]
    assert len(set(nonces)) == len(nonces) == 16                                   # no (key, nonce) pair twice
