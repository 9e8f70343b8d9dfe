"""The gateway in front of vLLM's OpenAI server, against a fake vLLM listening on loopback: authentication,
the tenant fields rewritten from the API key whatever the client sent, streaming and non-streaming
completions and chat."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the gateway runs on vLLM's server stack (starlette, httpx, uvicorn)")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from pqc_kv_cache.isolation import TenantIsolationManager  # noqa: E402
from pqc_kv_cache.vllm import ActiveSessions, ServerSecret  # noqa: E402
from pqc_kv_cache.vllm.gateway import APIKeys, GatewayError, add_api_key, build_app  # noqa: E402

SECRET = ServerSecret(bytes(range(32)))


PROBE: dict = {}      # "fn": called with each body vLLM gets (and again before each streamed event)


def _fake_vllm(seen: list):
    """Records each body it gets; answers JSON, or three SSE events when ``stream`` is true."""
    async def handle(request):
        body = json.loads(await request.body())
        seen.append((request.url.path, body))
        if "fn" in PROBE:
            PROBE["fn"](body)
        if body.get("stream"):
            async def events():
                for i in range(3):
                    if "fn" in PROBE:
                        PROBE["fn"](body)
                    yield f"data: {json.dumps({'i': i})}\n\n".encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"path": request.url.path, "ok": True})
    return Starlette(routes=[Route(p, handle, methods=["POST"]) for p in ("/v1/completions", "/v1/chat/completions")])


@pytest.fixture(scope="module")
def upstream():
    import uvicorn
    seen: list = []
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(uvicorn.Config(_fake_vllm(seen), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    t.join(timeout=10)


@pytest.fixture()
def gw(tmp_path, upstream):
    url, seen = upstream
    seen.clear()
    path = str(tmp_path / "keys.json")
    ka, kb = add_api_key(path, "tenant-a"), add_api_key(path, "tenant-b")
    manager = TenantIsolationManager()
    app = build_app(manager, SECRET, APIKeys.load(path), url)
    return app, manager, seen, ka, kb, path


def _post(app, path, body, key=None):
    async def go():
        headers = {"authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.post(path, content=json.dumps(body) if not isinstance(body, bytes) else body,
                             headers=headers)
            return r.status_code, r.headers.get("content-type", ""), r.content
    return asyncio.run(go())


def test_the_key_file_holds_hashes_only_and_is_0600(gw):
    _, _, _, ka, kb, path = gw
    text = open(path).read()
    assert ka not in text and kb not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keys = APIKeys.load(path)
    assert keys.tenant(ka) == "tenant-a" and keys.tenant(kb) == "tenant-b" and keys.tenant("guess") is None
    os.chmod(path, 0o666)
    with pytest.raises(GatewayError, match="cannot"):
        APIKeys.load(path)


def test_no_or_a_wrong_key_is_refused_and_nothing_reaches_vllm(gw):
    app, _, seen, ka, _, _ = gw
    for key in (None, "pqckv_wrong", ka + "x"):
        status, _, _ = _post(app, "/v1/completions", {"prompt": "hi"}, key)
        assert status == 401
    assert seen == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_spoofed_request_is_rewritten_to_its_authenticated_tenant(gw, path):
    app, manager, seen, ka, kb, _ = gw
    b_session = _post(app, path, {"prompt": "warm"}, kb) and manager.get_session("tenant-b")
    spoof = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
             "cache_salt": SECRET.cache_salt("tenant-b"),
             "kv_transfer_params": {"pqc_kv_cache": {"tenant_id": "tenant-b", "session_id": b_session.session_id}},
             "vllm_xargs": {"kv_transfer_params": "x", "other": 1}}
    status, _, content = _post(app, path, spoof, ka)
    assert status == 200 and json.loads(content) == {"path": path, "ok": True}
    got_path, body = seen[-1]
    a_session = manager.get_session("tenant-a")
    assert got_path == path
    assert body["cache_salt"] == SECRET.cache_salt("tenant-a")
    assert body["kv_transfer_params"] == {"pqc_kv_cache": {"tenant_id": "tenant-a",
                                                            "session_id": a_session.session_id}}
    assert body["vllm_xargs"] == {"other": 1} and body["prompt"] == "hi"


def test_the_same_tenant_gets_the_same_salt_and_session_another_tenant_others(gw):
    app, manager, seen, ka, kb, _ = gw
    for key in (ka, ka, kb):
        assert _post(app, "/v1/completions", {"prompt": "p"}, key)[0] == 200
    (_, a1), (_, a2), (_, b1) = seen[-3:]
    assert a1["cache_salt"] == a2["cache_salt"] != b1["cache_salt"]
    assert a1["kv_transfer_params"] == a2["kv_transfer_params"] != b1["kv_transfer_params"]
    manager.close_session("tenant-a")                    # a closed session: the next request opens a new one
    _post(app, "/v1/completions", {"prompt": "p"}, ka)
    assert seen[-1][1]["kv_transfer_params"]["pqc_kv_cache"]["session_id"] != \
        a1["kv_transfer_params"]["pqc_kv_cache"]["session_id"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_streamed_answer_is_relayed_event_by_event(gw, path):
    app, _, seen, ka, _, _ = gw
    status, ctype, content = _post(app, path, {"prompt": "p", "stream": True}, ka)
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e for e in content.decode().split("\n\n") if e]
    assert events == [f"data: {json.dumps({'i': i})}" for i in range(3)] + ["data: [DONE]"]
    assert seen[-1][1]["cache_salt"] == SECRET.cache_salt("tenant-a")


def test_bad_bodies_and_other_paths_are_refused(gw):
    app, _, seen, ka, _, _ = gw
    assert _post(app, "/v1/completions", b"[1, 2]", ka)[0] == 400
    assert _post(app, "/v1/completions", b"{not json", ka)[0] == 400
    assert _post(app, "/v1/completions", b"[" * 100000, ka)[0] == 400
    assert _post(app, "/v1/responses", {"input": "x"}, ka)[0] == 404
    assert seen == []


def test_an_upstream_off_loopback_is_refused(tmp_path):
    path = str(tmp_path / "keys.json")
    add_api_key(path, "t")
    with pytest.raises(GatewayError, match="loopback"):
        build_app(TenantIsolationManager(), SECRET, APIKeys.load(path), "http://10.1.2.3:8000")
    with pytest.raises(GatewayError, match="loopback"):
        build_app(TenantIsolationManager(), SECRET, APIKeys.load(path), "http://example.com:8000")
    build_app(TenantIsolationManager(), SECRET, APIKeys.load(path), "http://[::1]:8000")


def test_an_unreachable_vllm_is_a_502(tmp_path):
    path = str(tmp_path / "keys.json")
    key = add_api_key(path, "t")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    app = build_app(TenantIsolationManager(), SECRET, APIKeys.load(path), f"http://127.0.0.1:{port}")
    assert _post(app, "/v1/completions", {"prompt": "p"}, key)[0] == 502


@pytest.mark.parametrize("stream", [False, True])
def test_a_session_is_active_for_the_key_service_only_while_its_request_is_in_flight(tmp_path, upstream, stream):
    url, seen = upstream
    path = str(tmp_path / "keys.json")
    ka = add_api_key(path, "tenant-a")
    manager, active = TenantIsolationManager(), ActiveSessions()
    app = build_app(manager, SECRET, APIKeys.load(path), url, active=active)
    assert app.state.active is active
    during = []

    def probe(body):
        p = body["kv_transfer_params"]["pqc_kv_cache"]
        during.append(active.is_active(p["tenant_id"], p["session_id"]))
    PROBE["fn"] = probe
    try:
        assert _post(app, "/v1/completions", {"prompt": "p", "stream": stream}, ka)[0] == 200
    finally:
        PROBE.clear()
    sid = manager.get_session("tenant-a").session_id
    assert during == [True] * (4 if stream else 1)
    assert not active.is_active("tenant-a", sid)              # released once the answer is sent


def test_a_failed_forward_releases_the_session(tmp_path):
    path = str(tmp_path / "keys.json")
    key = add_api_key(path, "t")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    manager, active = TenantIsolationManager(), ActiveSessions()
    app = build_app(manager, SECRET, APIKeys.load(path), f"http://127.0.0.1:{port}", active=active)
    assert _post(app, "/v1/completions", {"prompt": "p"}, key)[0] == 502
    assert not active.is_active("t", manager.get_session("t").session_id)


def test_a_client_gone_mid_stream_releases_the_session(tmp_path, upstream):
    url, _ = upstream
    path = str(tmp_path / "keys.json")
    ka = add_api_key(path, "tenant-a")
    manager, active = TenantIsolationManager(), ActiveSessions()
    app = build_app(manager, SECRET, APIKeys.load(path), url, active=active)
    body = json.dumps({"prompt": "p", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", f"Bearer {ka}".encode()), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("gw", 80)}
    sent = []

    async def receive(first=[True]):
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)                       # the client says nothing more

    async def send(message):
        sent.append(message["type"])
        if message["type"] == "http.response.body" and message.get("body"):
            raise OSError("client went away")          # the first event cannot be delivered

    with pytest.raises(OSError):
        asyncio.run(app(scope, receive, send))
    assert "http.response.start" in sent
    assert not active.is_active("tenant-a", manager.get_session("tenant-a").session_id)
