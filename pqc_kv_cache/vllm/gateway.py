"""The gateway in front of vLLM's OpenAI-compatible server: the piece that knows who a request is from.

An ASGI app (Starlette, on the server stack vLLM already depends on; ``httpx`` forwards) that

* authenticates each request by its API key (``Authorization: Bearer KEY``) and maps it to a tenant; the keys
  are kept as SHA-256 hashes in a file (:class:`APIKeys`), so the file does not give them away;
* holds the :class:`~pqc_kv_cache.isolation.TenantIsolationManager` (a session per tenant, opened on the
  tenant's first request and again after it closes or expires, under an ML-KEM key pair the gateway makes
  for the tenant; pass ``session_for`` to open sessions with the tenants' own public keys) and, when started with :func:`main`, the
  :class:`~pqc_kv_cache.vllm.KeyService` the workers fetch keys from;
* removes whatever the client put in ``cache_salt``, ``kv_transfer_params`` and
  ``vllm_xargs["kv_transfer_params"]``, and sets the server's: the tenant's salt (a MAC under the server
  secret) and its tenant and live session ids;
* marks the tenant's session active (an :class:`~pqc_kv_cache.vllm.keyservice.ActiveSessions`) while its
  request is in flight, so that the key service serves that session's keys only then;
* with a session vault (``--session-dir`` and ``--session-kek``: a
  :class:`~pqc_kv_cache.vllm.sessionvault.SessionVault`), keeps every tenant's session sealed on disk and
  resumes them when it starts again, so blocks stored before a restart still load after it;
* forwards ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming or not) to vLLM, which must
  listen on loopback or a Unix socket only (anything else is refused at construction), or, on another host,
  serve HTTPS that requires the gateway's client certificate (``upstream_tls``: the gateway's
  :class:`~pqc_kv_cache.vllm.tls.MutualTLS` files for that link).

Every other path answers 404. Run::

    python -m pqc_kv_cache.vllm.gateway --api-keys keys.json --server-secret server.key \\
        --engine-token engine.token --key-service-dir /run/pqc-kv --upstream http://127.0.0.1:8001 --port 8000

and, for workers on other hosts, add ``--key-service-tcp 0.0.0.0:7443 --tls-ca ca.pem --tls-cert server.pem
--tls-key server.key`` (``python -m pqc_kv_cache.vllm.certs`` makes them) and ``--session-dir``,
``--session-kek`` (created if missing) so that sessions survive a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import secrets
import stat
import threading
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import KVCacheError
from ..isolation import TenantIsolationManager
from ..session import TenantKeyPair, TenantSession
from .keyservice import ActiveSessions
from .sessionvault import SessionVault
from .tls import MutualTLS
from .tenancy import ServerSecret, request_fields

__all__ = ["APIKeys", "GatewayError", "build_app", "add_api_key", "FORWARDED_PATHS", "main"]

FORWARDED_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 16 << 20
_KEYS_FORMAT = "pqc_kv_cache/gateway-keys-1"


class GatewayError(KVCacheError):
    """The gateway's configuration is unusable (API key file, upstream address)."""


def _key_hash(api_key: str) -> str:
    return hashlib.sha256(b"pqc_kv_cache/gateway-key\x00" + api_key.encode("utf-8")).hexdigest()


class APIKeys:
    """API key -> tenant, from a file of key hashes: ``{"format": "pqc_kv_cache/gateway-keys-1", "keys":
    [{"tenant": T, "sha256": H}, ...]}``. The file must be a regular file that group and others cannot write
    (whoever can write it can add a key for any tenant)."""

    def __init__(self, by_hash: dict[str, str]):
        self._by_hash = dict(by_hash)

    @classmethod
    def load(cls, path: str) -> "APIKeys":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise GatewayError(f"API key file {path!r}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise GatewayError(f"API key file {path!r} must be a regular file that group and others cannot "
                                   f"write (mode {stat.S_IMODE(st.st_mode):o})")
            data = f.read(MAX_BODY + 1)
        try:
            doc = json.loads(data)
            if doc.get("format") != _KEYS_FORMAT or not isinstance(doc.get("keys"), list):
                raise ValueError("not a gateway key file")
            by_hash = {}
            for e in doc["keys"]:
                t, h = e["tenant"], e["sha256"]
                if not isinstance(t, str) or not t or not isinstance(h, str) or len(bytes.fromhex(h)) != 32:
                    raise ValueError("each key needs a tenant and a SHA-256 hex digest")
                by_hash[h] = t
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise GatewayError(f"API key file {path!r}: {e}") from None
        return cls(by_hash)

    def tenant(self, api_key: str) -> str | None:
        """The tenant of ``api_key``, or None."""
        return self._by_hash.get(_key_hash(api_key))


def add_api_key(path: str, tenant_id: str) -> str:
    """Create a new API key for ``tenant_id``, add its hash to the key file at ``path`` (created with mode
    0600 if missing) and return the key, which is kept nowhere else."""
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError("tenant_id must be a non-empty str")
    key = "pqckv_" + secrets.token_urlsafe(32)
    doc: dict[str, Any] = {"format": _KEYS_FORMAT, "keys": []}
    if os.path.exists(path):
        APIKeys.load(path)                                         # refuses a bad or loose file
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    doc["keys"].append({"tenant": tenant_id, "sha256": _key_hash(key)})
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return key


def _check_upstream(url: str, uds: str | None, tls: MutualTLS | None) -> None:
    if tls is not None:
        if uds is not None or urlsplit(url).scheme != "https":
            raise GatewayError(f"upstream {url!r}: with upstream TLS, vLLM's address is an https:// URL")
        return
    if uds is not None:
        return
    host = urlsplit(url).hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise GatewayError(f"upstream {url!r} is not on loopback: vLLM must listen on 127.0.0.1, ::1 or a Unix "
                           "socket, or on HTTPS requiring the gateway's client certificate (upstream TLS), so "
                           "that no request reaches it without the gateway")


class _Relayed(StreamingResponse):
    """A streamed answer relayed from vLLM; ``done`` runs however the relay ends (sent, failed, or the
    client gone before or during it), which a background task would not."""

    def __init__(self, content: Any, done: Callable[[], Awaitable[None]], **kw: Any):
        super().__init__(content, **kw)
        self._done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._done()


def _live_session(manager: TenantIsolationManager, tenant_id: str, lock: threading.Lock) -> TenantSession:
    """The tenant's live session, a new one when it has none (never started, closed or expired)."""
    with lock:
        try:
            return manager.get_session(tenant_id)
        except KVCacheError:
            return manager.create_session(TenantKeyPair.generate(tenant_id).identity())


def build_app(manager: TenantIsolationManager, secret: ServerSecret, keys: APIKeys, upstream: str, *,
              uds: str | None = None, session_for: Callable[[str], TenantSession] | None = None,
              active: ActiveSessions | None = None, vault: SessionVault | None = None,
              upstream_tls: MutualTLS | None = None, timeout: float = 600.0) -> Starlette:
    """The gateway's ASGI app. ``upstream``: vLLM's base URL (``http://127.0.0.1:8001``; with ``uds``, the
    Unix socket it listens on, the URL's host is only the Host header); ``session_for(tenant)``: the tenant's
    live session (default: the manager's, a new one when it has none); ``active``: the registry of sessions
    with a request in flight that the key service reads (default: a registry of the app's own,
    ``app.state.active``); ``vault``: where each session the app uses is saved (``SessionVault.keep``);
    ``upstream_tls``: the gateway's certificate files for a vLLM on another host (``https://HOST:PORT``), which
    must require a client certificate of that CA (vLLM's ``--ssl-cert-reqs 2 --ssl-ca-certs``)."""
    if not isinstance(manager, TenantIsolationManager) or not isinstance(secret, ServerSecret) or \
            not isinstance(keys, APIKeys):
        raise TypeError("build_app needs a TenantIsolationManager, a ServerSecret and APIKeys")
    if upstream_tls is not None and not isinstance(upstream_tls, MutualTLS):
        raise TypeError(f"upstream_tls must be a MutualTLS, got {type(upstream_tls).__name__}")
    _check_upstream(upstream, uds, upstream_tls)
    verify = True if upstream_tls is None else upstream_tls.client_context()
    lock = threading.Lock()
    active = ActiveSessions() if active is None else active
    live = session_for or (lambda t: _live_session(manager, t, lock))
    session_of = live if vault is None else (lambda t: vault.keep(live(t)))
    base = upstream.rstrip("/")

    def new_client() -> httpx.AsyncClient:
        # one per request: a client's pool belongs to one event loop, and a loopback connect is cheap
        return httpx.AsyncClient(base_url=base, transport=httpx.AsyncHTTPTransport(uds=uds) if uds else None,
                                 verify=verify, timeout=httpx.Timeout(timeout, connect=10.0))

    async def forward(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        tenant = keys.tenant(auth[7:].strip()) if auth[:7].lower() == "bearer " else None
        if tenant is None:
            return JSONResponse({"error": {"message": "a valid API key is required", "type": "unauthorized"}},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return JSONResponse({"error": {"message": "request body too large"}}, status_code=413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "the body must be a JSON object"}}, status_code=400)
        # whatever the client says about tenancy is dropped; the server's fields replace it
        body.pop("cache_salt", None)
        body.pop("kv_transfer_params", None)
        if isinstance(body.get("vllm_xargs"), dict):
            body["vllm_xargs"].pop("kv_transfer_params", None)
        session = session_of(tenant)
        body.update(request_fields(secret, tenant, session.session_id))
        client = new_client()
        up = client.build_request("POST", request.url.path, content=json.dumps(body).encode(),
                                  headers={"content-type": "application/json"})
        # the session's keys are served while its request is in flight: from before vLLM sees it until its
        # answer is sent, failed or dropped (released once, whichever path ends it)
        active.acquire(tenant, session.session_id)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                active.release(tenant, session.session_id)

        try:
            resp = await client.send(up, stream=True)
        except BaseException as e:
            release()
            await client.aclose()
            if isinstance(e, httpx.HTTPError):
                return JSONResponse({"error": {"message": f"upstream unavailable: {type(e).__name__}"}},
                                    status_code=502)
            raise

        async def done() -> None:
            release()
            await resp.aclose()
            await client.aclose()

        keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "cache-control")}
        if body.get("stream") is True:
            return _Relayed(resp.aiter_raw(), done, status_code=resp.status_code, headers=keep)
        try:
            content = await resp.aread()
        finally:
            await done()
        return Response(content, status_code=resp.status_code, headers=keep)

    app = Starlette(routes=[Route(p, forward, methods=["POST"]) for p in FORWARDED_PATHS])
    app.state.manager = manager
    app.state.active = active
    return app


def main(argv: list[str] | None = None) -> None:
    """Start the key service and the gateway (uvicorn) in this process."""
    import uvicorn

    from ..resumption import generate_kek_file
    from .keyservice import KeyService, generate_engine_token_file, load_engine_token
    from .tenancy import load_server_secret

    ap = argparse.ArgumentParser(prog="python -m pqc_kv_cache.vllm.gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--api-keys", required=True, help="the file of API key hashes (add_api_key writes it)")
    ap.add_argument("--server-secret", required=True, help="the server secret's key file (mode 0600)")
    ap.add_argument("--key-service-dir", required=True, help="directory of the key service's socket (0700)")
    ap.add_argument("--engine-token", required=True,
                    help="the engine token's file (mode 0600; created if missing), which the connector's "
                         "kv_connector_extra_config['key_service_token'] names")
    ap.add_argument("--upstream", default="http://127.0.0.1:8001", help="vLLM's base URL, on loopback")
    ap.add_argument("--upstream-uds", default=None, help="vLLM's Unix socket, instead of a loopback port")
    ap.add_argument("--add-key", metavar="TENANT", help="add an API key for TENANT to --api-keys, print it, exit")
    ap.add_argument("--key-service-tcp", metavar="HOST:PORT", default=None,
                    help="also serve keys on TCP with mutual TLS (needs --tls-ca, --tls-cert, --tls-key)")
    ap.add_argument("--tls-ca", help="the CA certificate client certificates must be issued by (PEM)")
    ap.add_argument("--tls-cert", help="the key service's certificate (PEM)")
    ap.add_argument("--tls-key", help="its private key (PEM, mode 0600)")
    ap.add_argument("--upstream-tls", nargs=3, metavar=("CA", "CERT", "KEY"),
                    help="vLLM on another host: --upstream is https://HOST:PORT; the CA vLLM's certificate is "
                         "issued by, and the gateway's client certificate and key that vLLM requires")
    ap.add_argument("--session-dir", help="keep tenants' sessions here (0700), sealed, and resume them on start")
    ap.add_argument("--session-kek", help="the key-encryption key file of --session-dir (mode 0600; created if "
                                          "missing; keep it outside --session-dir)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    if args.add_key:
        print(add_api_key(args.api_keys, args.add_key))
        return
    tcp = tls = vault = None
    if args.key_service_tcp or args.tls_ca or args.tls_cert or args.tls_key:
        host, sep, port = (args.key_service_tcp or "").rpartition(":")
        if not sep or not host or not port.isdigit() or not (args.tls_ca and args.tls_cert and args.tls_key):
            ap.error("--key-service-tcp HOST:PORT goes with --tls-ca, --tls-cert and --tls-key")
        tcp, tls = (host.strip("[]"), int(port)), MutualTLS(args.tls_ca, args.tls_cert, args.tls_key)
    if bool(args.session_dir) != bool(args.session_kek):
        ap.error("--session-dir and --session-kek go together")
    manager = TenantIsolationManager()
    if args.session_dir:
        if not os.path.lexists(args.session_kek):
            generate_kek_file(args.session_kek)
        vault = SessionVault(args.session_dir, args.session_kek)
        vault.restore(manager)
    active = ActiveSessions()
    token = load_engine_token(args.engine_token) if os.path.lexists(args.engine_token) else \
        generate_engine_token_file(args.engine_token)
    app = build_app(manager, load_server_secret(args.server_secret), APIKeys.load(args.api_keys), args.upstream,
                    uds=args.upstream_uds, active=active, vault=vault,
                    upstream_tls=MutualTLS(*args.upstream_tls) if args.upstream_tls else None)
    with KeyService(manager, args.key_service_dir, token=token, active=active, tcp=tcp, tls=tls,
                    keep=None if vault is None else vault.keep):
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
