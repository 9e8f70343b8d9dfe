"""The gateway in front of a vLLM on another host: HTTPS that requires the gateway's client certificate, so
that no request reaches vLLM without the gateway; a plain upstream off loopback is still refused."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the gateway runs on vLLM's server stack (starlette, httpx, uvicorn)")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.vllm import MutualTLS, ServerSecret  # noqa: E402
from pqc_kv_cache.vllm.certs import make_certificates  # noqa: E402
from pqc_kv_cache.vllm.gateway import APIKeys, GatewayError, add_api_key, build_app  # noqa: E402

SECRET = ServerSecret(bytes(range(32)))


@pytest.fixture(scope="module")
def vllm_https(tmp_path_factory):
    """A stand-in vLLM serving HTTPS on loopback that requires a client certificate of its own CA (what
    vLLM's --ssl-keyfile --ssl-certfile --ssl-ca-certs --ssl-cert-reqs 2 set up)."""
    import uvicorn
    d = tmp_path_factory.mktemp("upstream-pki")
    server, clients = make_certificates(d / "link", ["127.0.0.1"], ["gateway"])
    _, others = make_certificates(d / "other", ["127.0.0.1"], ["gateway"])
    seen: list = []

    async def handle(request):
        seen.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/completions", handle, methods=["POST"])])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       ssl_certfile=server.cert, ssl_keyfile=server.key, ssl_ca_certs=server.ca,
                                       ssl_cert_reqs=ssl.CERT_REQUIRED))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    wrong = MutualTLS(server.ca, others["gateway"].cert, others["gateway"].key)   # trusts vLLM, shows another CA's
    yield f"https://127.0.0.1:{port}", clients["gateway"], wrong, seen
    srv.should_exit = True
    t.join(timeout=10)


def _post(app, key):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.post("/v1/completions", content=json.dumps({"prompt": "p"}),
                             headers={"authorization": f"Bearer {key}"})
            return r.status_code
    return asyncio.run(go())


def test_the_gateway_reaches_vllm_over_https_with_its_client_certificate(tmp_path, vllm_https):
    url, mine, wrong, seen = vllm_https
    keys = str(tmp_path / "keys.json")
    ka = add_api_key(keys, "tenant-a")
    app = build_app(TenantIsolationManager(), SECRET, APIKeys.load(keys), url, upstream_tls=mine)
    n = len(seen)
    assert _post(app, ka) == 200
    assert len(seen) == n + 1 and seen[-1]["kv_transfer_params"]["pqc_kv_cache"]["tenant_id"] == "tenant-a"
    # a gateway (or anyone) without a certificate of vLLM's CA gets nothing through
    app2 = build_app(TenantIsolationManager(), SECRET, APIKeys.load(keys), url, upstream_tls=wrong)
    assert _post(app2, ka) == 502
    assert len(seen) == n + 1
    with pytest.raises(httpx.HTTPError):
        httpx.post(url + "/v1/completions", json={"prompt": "p"}, verify=ssl.create_default_context(cafile=mine.ca))
    assert len(seen) == n + 1


def test_an_upstream_off_loopback_needs_https_and_the_gateways_certificate(tmp_path, vllm_https):
    _, mine, _, _ = vllm_https
    keys = str(tmp_path / "keys.json")
    add_api_key(keys, "tenant-a")
    m, k = TenantIsolationManager(), APIKeys.load(keys)
    build_app(m, SECRET, k, "https://10.0.0.5:8001", upstream_tls=mine)      # another host: allowed so
    with pytest.raises(GatewayError, match="not on loopback"):
        build_app(m, SECRET, k, "https://10.0.0.5:8001")
    with pytest.raises(GatewayError, match="https://"):
        build_app(m, SECRET, k, "http://10.0.0.5:8001", upstream_tls=mine)
