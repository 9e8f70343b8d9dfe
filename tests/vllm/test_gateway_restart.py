"""The gateway process (``python -m pqc_kv_cache.vllm.gateway``) with its key service on TCP + mutual TLS and
a session vault, in front of a fake vLLM that fetches keys over TLS while it handles a request, as a worker
on another host does: a block sealed before the gateway is killed opens after it starts again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the gateway runs on vLLM's server stack (starlette, httpx, uvicorn)")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from support.ports import free_port, wait_port  # noqa: E402

from pqc_kv_cache.envelope import make_nonce  # noqa: E402
from pqc_kv_cache.vllm import KeyClient, generate_engine_token_file, generate_server_secret_file  # noqa: E402
from pqc_kv_cache.vllm.certs import make_certificates  # noqa: E402
from pqc_kv_cache.vllm.gateway import add_api_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class FakeWorker:
    """A fake vLLM whose request handler acts as the connector's worker: it reserves nonces over mutual TLS
    and seals a block (the first request), or fetches the sealed block's epoch key and opens it."""

    def __init__(self, keys: KeyClient):
        self.keys, self.sealed, self.seen = keys, None, []

    def app(self) -> Starlette:
        async def handle(request):
            body = json.loads(await request.body())
            p = body["kv_transfer_params"]["pqc_kv_cache"]
            self.seen.append(p)
            t, s = p["tenant_id"], p["session_id"]
            out = {}
            if self.sealed is not None:
                epoch, counter, ct = self.sealed
                key = await asyncio.to_thread(self.keys.key, t, s, epoch)
                out["opened"] = AESGCM(key).decrypt(make_nonce(epoch, counter), ct, s.encode()).decode()
            r = await asyncio.to_thread(self.keys.reserve, t, s, 1)
            out["epoch"] = r.epoch
            if self.sealed is None:
                ct = AESGCM(r.key).encrypt(make_nonce(r.epoch, r.first), b"block", s.encode())
                self.sealed = (r.epoch, r.first, ct)
            return JSONResponse(out)
        return Starlette(routes=[Route("/v1/completions", handle, methods=["POST"])])


def test_a_block_sealed_before_the_gateway_is_killed_opens_after_it_restarts(tmp_path):
    import uvicorn
    server, clients = make_certificates(tmp_path / "pki", ["127.0.0.1"], ["worker"])
    generate_server_secret_file(tmp_path / "secrets" / "server.key")
    api_key = add_api_key(str(tmp_path / "keys.json"), "tenant-a")
    key_port, gw_port, up_port = free_port(), free_port(), free_port()
    token = generate_engine_token_file(str(tmp_path / "secrets" / "engine.token"))
    worker = FakeWorker(KeyClient(f"tls://127.0.0.1:{key_port}", tls=clients["worker"], token=token))
    up = uvicorn.Server(uvicorn.Config(worker.app(), host="127.0.0.1", port=up_port, log_level="warning"))
    threading.Thread(target=up.run, daemon=True).start()
    args = [sys.executable, "-m", "pqc_kv_cache.vllm.gateway", "--api-keys", str(tmp_path / "keys.json"),
            "--server-secret", str(tmp_path / "secrets" / "server.key"),
            "--engine-token", str(tmp_path / "secrets" / "engine.token"),
            "--key-service-dir", str(tmp_path / "run"), "--upstream", f"http://127.0.0.1:{up_port}",
            "--port", str(gw_port), "--key-service-tcp", f"127.0.0.1:{key_port}",
            "--tls-ca", server.ca, "--tls-cert", server.cert, "--tls-key", server.key,
            "--session-dir", str(tmp_path / "sessions"), "--session-kek", str(tmp_path / "secrets" / "sessions.kek")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    answers = []
    try:
        for _ in range(2):
            proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_port(gw_port, proc)
                wait_port(key_port, proc)
                r = httpx.post(f"http://127.0.0.1:{gw_port}/v1/completions", json={"prompt": "p"},
                               headers={"authorization": f"Bearer {api_key}"}, timeout=60)
                assert r.status_code == 200, r.text
                answers.append(r.json())
            finally:
                proc.send_signal(signal.SIGKILL)               # no clean shutdown
                proc.wait(timeout=30)
    finally:
        up.should_exit = True
    assert worker.seen[0] == worker.seen[1]                    # the same tenant session after the restart
    assert answers[1]["opened"] == "block"                     # the block sealed before the restart opens
    assert answers[1]["epoch"] != answers[0]["epoch"]          # and new seals use the restart's own epoch
