"""The key service: hands a tenant session's key to the vLLM worker that seals and opens its KV.

The process that owns the :class:`~pqc_kv_cache.isolation.TenantIsolationManager` (the API server) runs a
:class:`KeyService`; vLLM's worker-side connector (another process, started by vLLM, on this host or another)
asks it with a :class:`KeyClient`. Keys never pass through vLLM's configuration or request parameters: the
connector only learns the socket path or ``tls://`` address, and file paths (not secrets), from
``kv_connector_extra_config``.

Who may ask:

* the socket lives in a directory of mode 0700 owned by the server's user (created so, or refused if it is
  anything else), so no other user can even connect;
* every connection's peer is checked with ``SO_PEERCRED`` (Linux): its uid must be one of ``allowed_uids``
  (default: the server's own uid) -- a refused peer gets one error reply and the connection is closed;
* with an engine ``token`` (32 bytes, kept in a 0600 file that the connector's configuration names:
  :func:`generate_engine_token_file`), every request must carry it, so a process of an allowed uid that
  cannot read that file gets nothing;
* with ``active`` (an :class:`ActiveSessions` the gateway fills), keys are served only for a session that has
  a request in flight through the gateway, so a session's keys cannot be fetched while it is idle.

On another host, workers reach the service over TCP with mutual TLS (``tcp=(host, port)`` and ``tls``, a
:class:`~pqc_kv_cache.vllm.tls.MutualTLS`; the client's address is then ``tls://host:port``). The service
requires a client certificate of its pinned CA; a peer without one, with another CA's, a self-signed or an
expired one, or one that does not speak TLS 1.3, fails the handshake before anything it sent is read as a
request: it is counted in ``refused`` and logged at WARNING (logger ``pqc_kv_cache.vllm.keyservice``). The
engine token and the in-flight check apply on TCP as on the socket; the uid check is the socket's only.

Connections are served concurrently, each on its own thread, with a ``CONNECTION_TIMEOUT`` per read, so idle
clients do not stall the others; a malformed request gets an error reply and the service goes on. The socket
and TCP have slot pools of their own (``MAX_CONNECTIONS`` each), so peers on the network cannot take the
socket's slots; a TCP peer's TLS handshake must finish within ``HANDSHAKE_TIMEOUT`` seconds in all (not per
read), and one peer address holds at most ``MAX_CONNECTIONS_PER_PEER`` TCP connections at once. A connection
turned away for want of a slot is closed at once, counted in ``turned_away`` and logged at WARNING (at most
one line per ``TURNED_AWAY_LOG_INTERVAL`` seconds, with the count since the last line).

Protocol: one request per connection, a 4-byte big-endian length then a JSON object; the reply likewise.

* ``{"op": "reserve", "tenant": T, "session": S, "count": N, "token": hex}`` reserves N nonce counters of the session's
  current epoch (``TenantSession.reserve``, so the worker's nonces never collide with the server's) and
  answers ``{"ok": true, "epoch": E, "first": C, "key": hex}``;
* ``{"op": "key", "tenant": T, "session": S, "epoch": E, "token": hex}`` answers the key of that epoch (to open);
* a missing or wrong token, an unknown tenant, a session id that is not the tenant's live session or has no
  request in flight, an expired session or a retired epoch answer ``{"ok": false, "error": ...}``, and the
  client raises :class:`KeyServiceError`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import ssl
import stat
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import KVCacheError
from ..isolation import TenantIsolationManager
from ..session import TenantSession
from .tenancy import read_key_file, write_new_key_file
from .tls import MutualTLS

__all__ = ["ActiveSessions", "KeyService", "KeyClient", "KeyServiceError", "Reservation", "SOCKET_NAME",
           "generate_engine_token_file", "load_engine_token"]

SOCKET_NAME = "keys.sock"
_LEN = struct.Struct(">I")
_MAX_MESSAGE = 64 * 1024
_MAX_RESERVE = 1 << 20
MAX_CONNECTIONS = 64          # served at once on the socket, and as many on TCP, each on its own thread
MAX_CONNECTIONS_PER_PEER = 8  # TCP connections of one peer address served at once
CONNECTION_TIMEOUT = 5.0      # seconds a connection may wait between reads
HANDSHAKE_TIMEOUT = 5.0       # seconds a TCP peer's whole TLS handshake may take
TURNED_AWAY_LOG_INTERVAL = 10.0
TLS_SCHEME = "tls://"
_log = logging.getLogger("pqc_kv_cache.vllm.keyservice")


class KeyServiceError(KVCacheError):
    """The key service refused or could not answer (unknown tenant or session, refused peer, no service)."""


def generate_engine_token_file(path: str) -> bytes:
    """Create a new engine token (32 random bytes, 64 hex digits in a file of mode 0600, never overwritten);
    the key service and the connector (``kv_connector_extra_config['key_service_token']``) read it."""
    return write_new_key_file(path, "engine token")


def load_engine_token(path: str) -> bytes:
    """The engine token in a file written by :func:`generate_engine_token_file` (``SecretFileError`` for a
    missing, malformed or group/other-accessible file)."""
    return read_key_file(path, "engine token")


class ActiveSessions:
    """The sessions that have a request in flight through the gateway (counted: several requests of one
    session may be in flight). The gateway calls :meth:`acquire` before it forwards a request and
    :meth:`release` once its answer is sent or failed; a key service given this registry serves keys only
    for the sessions in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: Counter[tuple[str, str]] = Counter()

    def acquire(self, tenant_id: str, session_id: str) -> None:
        with self._lock:
            self._count[(tenant_id, session_id)] += 1

    def release(self, tenant_id: str, session_id: str) -> None:
        with self._lock:
            key = (tenant_id, session_id)
            if self._count[key] <= 1:
                del self._count[key]
            else:
                self._count[key] -= 1

    def is_active(self, tenant_id: str, session_id: str) -> bool:
        with self._lock:
            return self._count.get((tenant_id, session_id), 0) > 0


@dataclass(frozen=True)
class Reservation:
    """Nonce counters ``first .. first + count - 1`` of ``epoch``, and that epoch's key."""
    epoch: int
    first: int
    count: int
    key: bytes


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise KeyServiceError("key service: connection closed mid-message")
        buf += part
    return bytes(buf)


def _send(conn: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode("utf-8")
    conn.sendall(_LEN.pack(len(data)) + data)


def _recv(conn: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    if n > _MAX_MESSAGE:
        raise KeyServiceError(f"key service: message of {n} bytes is over the limit of {_MAX_MESSAGE}")
    try:
        obj = json.loads(_recv_exact(conn, n))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:     # also over-long integers, deep nesting
        raise KeyServiceError(f"key service: malformed message ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise KeyServiceError("key service: a message must be a JSON object")
    return obj


def _handshake_by(tls: ssl.SSLSocket, deadline: float) -> None:
    """``tls.do_handshake()`` that fails (``socket.timeout``) once ``deadline`` (``time.monotonic()``) has
    passed, however the peer paces its bytes."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the TLS handshake took too long")
        tls.settimeout(left)
        try:
            tls.do_handshake()
            return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            continue


def _private_dir(path: str) -> str:
    """Create ``path`` with mode 0700, or check that an existing one is ours and 0700."""
    path = os.path.abspath(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise KeyServiceError(f"{path}: not a directory")
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise KeyServiceError(f"{path}: the key service directory must be owned by uid {os.getuid()} and have "
                              f"mode 0700 (it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    return path


def _tls_address(address: str) -> tuple[str, int]:
    """(host, port) of ``tls://host:port`` (IPv6 hosts in brackets)."""
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None or parts.path not in ("", "/"):
        raise ValueError(f"{address!r} is not tls://HOST:PORT")
    return host, port


class KeyService:
    """Serves session keys of ``manager``'s tenants on ``<directory>/keys.sock`` and, with ``tcp`` and ``tls``,
    on TCP with mutual TLS (see the module docstring). ``keep(session)``, when given, runs after each
    reservation and before its reply (the gateway's :class:`~pqc_kv_cache.vllm.sessionvault.SessionVault`
    saves a session whose epoch changed, so no worker seals under an epoch a restart would not know).

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, manager: TenantIsolationManager, directory: str, *, allowed_uids: frozenset[int] | None = None,
                 token: bytes | None = None, active: ActiveSessions | None = None,
                 tcp: tuple[str, int] | None = None, tls: MutualTLS | None = None,
                 keep: Callable[[TenantSession], None] | None = None):
        if not isinstance(manager, TenantIsolationManager):
            raise TypeError(f"manager must be a TenantIsolationManager, got {type(manager).__name__}")
        if token is not None and (not isinstance(token, bytes) or len(token) != 32):
            raise ValueError("token must be 32 bytes (load_engine_token)")
        if active is not None and not isinstance(active, ActiveSessions):
            raise TypeError(f"active must be an ActiveSessions, got {type(active).__name__}")
        if (tcp is None) != (tls is None):
            raise ValueError("the key service listens on TCP only with mutual TLS: give both tcp and tls")
        if tls is not None and not isinstance(tls, MutualTLS):
            raise TypeError(f"tls must be a MutualTLS, got {type(tls).__name__}")
        if tcp is not None and not (isinstance(tcp, tuple) and len(tcp) == 2 and isinstance(tcp[0], str) and
                                    isinstance(tcp[1], int) and not isinstance(tcp[1], bool) and
                                    0 <= tcp[1] <= 0xFFFF):
            raise ValueError(f"tcp must be (host, port), got {tcp!r}")
        if keep is not None and not callable(keep):
            raise TypeError("keep must be callable")
        self._tls = None if tls is None else tls.server_context()      # TLSConfigError now, not at the first peer
        self._tcp = tcp
        self._keep = keep
        self._token = None if token is None else token.hex().encode()
        self._active = active
        self.manager = manager
        self.directory = _private_dir(directory)
        self.path = os.path.join(self.directory, SOCKET_NAME)
        self.allowed_uids = frozenset({os.getuid()}) if allowed_uids is None else frozenset(allowed_uids)
        self.refused = 0          # connections refused by the peer check or the TLS handshake
        self.messages = 0         # requests read (a refused handshake reads none)
        self.turned_away = 0      # connections closed unserved for want of a slot (pool or per-peer cap)
        self.address: str | None = None     # tls://host:port once listening on TCP
        self._count_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._tcp_sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._slots = {False: threading.BoundedSemaphore(MAX_CONNECTIONS),      # the socket's
                       True: threading.BoundedSemaphore(MAX_CONNECTIONS)}       # TCP's
        self._per_peer: Counter[str] = Counter()
        self._unlogged = 0
        self._last_log = -float("inf")

    def start(self) -> "KeyService":
        if self._sock is not None:
            raise RuntimeError("key service already started")
        if os.path.lexists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        listeners = [(sock, False)]
        if self._tcp is not None:
            try:
                tcp = socket.create_server(self._tcp, family=socket.AF_INET6 if ":" in self._tcp[0] else
                                           socket.AF_INET, backlog=16)
            except OSError as e:
                self.close()
                raise KeyServiceError(f"key service: cannot listen on {self._tcp}: {e.strerror}") from None
            tcp.settimeout(0.2)
            self._tcp_sock = tcp
            host, port = tcp.getsockname()[:2]
            self.address = f"{TLS_SCHEME}[{host}]:{port}" if ":" in host else f"{TLS_SCHEME}{host}:{port}"
            listeners.append((tcp, True))
        for s, tls in listeners:
            t = threading.Thread(target=self._serve, args=(s, tls), name="pqc-kv-key-service", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        for s in (self._sock, self._tcp_sock):
            if s is not None:
                s.close()
        self._sock = self._tcp_sock = None
        if os.path.lexists(self.path):
            os.unlink(self.path)
        # connections already accepted finish (each within its read timeout), so that the counters are final
        deadline = time.monotonic() + 2 * CONNECTION_TIMEOUT
        for slots in self._slots.values():
            held = 0
            while held < MAX_CONNECTIONS and slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                held += 1
            for _ in range(held):
                slots.release()

    def __enter__(self) -> "KeyService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self, sock: socket.socket, tls: bool) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            peer = addr[0] if tls else None
            if not self._take_slot(tls, peer):
                conn.close()        # refused at once rather than queued behind the busy ones
                continue
            try:
                threading.Thread(target=self._connection, args=(conn, tls, peer), name="pqc-kv-key-conn",
                                 daemon=True).start()
            except RuntimeError:    # no thread to be had: turned away like a full pool
                conn.close()
                self._give_slot(tls, peer)
                self._turn_away("no thread to serve it")

    def _take_slot(self, tls: bool, peer: str | None) -> bool:
        """A slot of the socket's or TCP's pool and, on TCP, one of the peer address's; False (turned away,
        counted and logged) if none is free."""
        if tls:
            with self._count_lock:
                if self._per_peer[peer] >= MAX_CONNECTIONS_PER_PEER:
                    full = True
                else:
                    full = False
                    self._per_peer[peer] += 1
            if full:
                self._turn_away(f"{peer} already has {MAX_CONNECTIONS_PER_PEER} connections")
                return False
        if self._slots[tls].acquire(blocking=False):
            return True
        if tls:
            self._give_peer(peer)
        self._turn_away(f"all {MAX_CONNECTIONS} {'TCP' if tls else 'socket'} connections are busy")
        return False

    def _give_slot(self, tls: bool, peer: str | None) -> None:
        self._slots[tls].release()
        if tls:
            self._give_peer(peer)

    def _give_peer(self, peer: str | None) -> None:
        with self._count_lock:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]

    def _turn_away(self, why: str) -> None:
        with self._count_lock:
            self.turned_away += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._last_log < TURNED_AWAY_LOG_INTERVAL:
                return
            n, self._unlogged, self._last_log = self._unlogged, 0, now
        _log.warning("key service turned away %d connection(s) since its last such line; the latest: %s", n, why)

    def _refuse(self, why: str) -> None:
        with self._count_lock:
            self.refused += 1
        _log.warning("key service refused a connection: %s", why)

    def _handshake(self, conn: socket.socket) -> ssl.SSLSocket | None:
        """The TLS handshake, before anything is read as a request; None (refused and logged) if it fails."""
        assert self._tls is not None
        try:
            peer = "%s:%s" % conn.getpeername()[:2]
        except OSError:
            peer = "unknown peer"
        try:
            tls = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as e:
            self._refuse(f"{peer}: {type(e).__name__}")
            conn.close()
            return None
        try:
            _handshake_by(tls, time.monotonic() + HANDSHAKE_TIMEOUT)
        except ssl.SSLError as e:
            self._refuse(f"TLS handshake with {peer} failed: {e.reason or e}")
            tls.close()
            return None
        except OSError as e:                 # a peer that hung up or did not finish in time
            self._refuse(f"TLS handshake with {peer} failed: {type(e).__name__}")
            tls.close()
            return None
        tls.settimeout(CONNECTION_TIMEOUT)
        return tls

    def _connection(self, conn: socket.socket, tls: bool, peer: str | None) -> None:
        """One connection, on its own thread: an idle or slow client holds only its own slot, for at most
        HANDSHAKE_TIMEOUT seconds in its handshake and CONNECTION_TIMEOUT seconds per read after it."""
        try:
            conn.settimeout(CONNECTION_TIMEOUT)
            if tls:
                wrapped = self._handshake(conn)
                if wrapped is None:
                    return
                conn = wrapped
            with conn:
                try:
                    self._handle(conn, peer_check=not tls)
                except KeyServiceError as e:
                    try:
                        _send(conn, {"ok": False, "error": str(e)})
                    except OSError:
                        pass
                except OSError:
                    pass            # a broken client gets nothing; the service keeps serving
        finally:
            self._give_slot(tls, peer)

    def _read(self, conn: socket.socket) -> dict:
        with self._count_lock:
            self.messages += 1
        return _recv(conn)

    def _handle(self, conn: socket.socket, *, peer_check: bool) -> None:
        if peer_check:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in self.allowed_uids:
                self._refuse(f"peer uid {uid} is not allowed")
                try:
                    self._read(conn)    # read first, so that a refused client reads the refusal, not a broken pipe
                except KeyServiceError:
                    pass
                _send(conn, {"ok": False, "error": f"peer uid {uid} is not allowed"})
                return
        req = self._read(conn)
        try:
            _send(conn, self._answer(req))
        except KVCacheError as e:
            _send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _answer(self, req: dict) -> dict:
        op, tenant, session_id = req.get("op"), req.get("tenant"), req.get("session")
        if self._token is not None:
            given = req.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode("utf-8", "replace"), self._token):
                raise KeyServiceError("a valid engine token is required")
        if not isinstance(tenant, str) or not isinstance(session_id, str):
            raise KeyServiceError("tenant and session must be strings")
        session = self.manager.get_session(tenant)          # UnknownTenantError / SessionExpiredError
        if session.session_id != session_id:
            raise KeyServiceError(f"session {session_id!r} is not the live session of tenant {tenant!r}")
        if self._active is not None and not self._active.is_active(tenant, session_id):
            raise KeyServiceError(f"session {session_id!r} of tenant {tenant!r} has no request in flight")
        if op == "reserve":
            count = req.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= _MAX_RESERVE:
                raise KeyServiceError(f"count must be an int in 1..{_MAX_RESERVE}")
            epoch, first = session.reserve(count)
            if self._keep is not None:
                self._keep(session)         # saved before any worker learns the epoch
            return {"ok": True, "epoch": epoch, "first": first, "key": session.key_for_epoch(epoch).hex()}
        if op == "key":
            epoch = req.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch <= 0xFFFFFFFF:
                raise KeyServiceError("epoch must be an int in 0..2**32-1")
            return {"ok": True, "epoch": epoch, "key": session.key_for_epoch(epoch).hex()}
        raise KeyServiceError(f"unknown op {op!r}")


class KeyClient:
    """Asks the key service at ``address`` for keys, with the engine ``token`` when the service has one; one
    connection per request. ``address``: the service's socket path, or ``tls://HOST:PORT`` with ``tls`` (this
    worker's :class:`~pqc_kv_cache.vllm.tls.MutualTLS` files) for a service on another host."""

    def __init__(self, address: str, timeout: float = 10.0, *, token: bytes | None = None,
                 tls: MutualTLS | None = None):
        if not isinstance(address, str) or not address:
            raise ValueError("address must be the key service's socket path or tls://HOST:PORT")
        if token is not None and (not isinstance(token, bytes) or len(token) != 32):
            raise ValueError("token must be 32 bytes (load_engine_token)")
        if tls is not None and not isinstance(tls, MutualTLS):
            raise TypeError(f"tls must be a MutualTLS, got {type(tls).__name__}")
        self._tcp: tuple[str, int] | None = None
        self._tls: ssl.SSLContext | None = None
        if address.startswith(TLS_SCHEME):
            if tls is None:
                raise ValueError(f"{address!r} is reached over mutual TLS: give tls (the worker's certificate files)")
            self._tcp = _tls_address(address)
            self._tls = tls.client_context()
        elif tls is not None:
            raise ValueError("tls is for a tls://HOST:PORT address; a socket path is reached without it")
        self.path = self.address = address
        self.timeout = timeout
        self._token = None if token is None else token.hex()

    @classmethod
    def from_config(cls, get: Callable[[str, Any], Any]) -> "KeyClient":
        """The client a connector's ``kv_connector_extra_config`` describes, read with ``get(name, default)``:
        ``key_service`` (a socket path or ``tls://HOST:PORT``), ``key_service_token`` (the engine token's
        file, optional) and, for TLS, ``key_service_tls_ca``, ``key_service_tls_cert``, ``key_service_tls_key``."""
        address = get("key_service", None)
        if not isinstance(address, str) or not address:
            raise ValueError("kv_connector_extra_config['key_service'] must be a socket path or tls://HOST:PORT")
        token_path = get("key_service_token", None)
        return cls(address, token=load_engine_token(token_path) if token_path else None,
                   tls=MutualTLS.from_config(get))

    def __repr__(self) -> str:
        return f"KeyClient({self.address!r}, token={'<hidden>' if self._token else None})"

    def _connect(self) -> socket.socket:
        if self._tcp is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(self.timeout)
                conn.connect(self.address)
            except BaseException:
                conn.close()
                raise
            return conn
        assert self._tls is not None
        raw = socket.create_connection(self._tcp, timeout=self.timeout)
        try:
            return self._tls.wrap_socket(raw, server_hostname=self._tcp[0])
        except BaseException:
            raw.close()
            raise

    def _ask(self, req: dict) -> dict:
        if self._token is not None:
            req = {**req, "token": self._token}
        try:
            with self._connect() as conn:
                _send(conn, req)
                rep = _recv(conn)
        except ssl.SSLError as e:
            raise KeyServiceError(f"key service at {self.address}: TLS: {e.reason or e}") from None
        except OSError as e:
            raise KeyServiceError(f"key service at {self.address}: {e}") from None
        if rep.get("ok") is not True:
            raise KeyServiceError(f"key service refused: {rep.get('error', 'no reason given')}")
        try:
            key = bytes.fromhex(rep["key"])
        except (KeyError, TypeError, ValueError):
            raise KeyServiceError("key service: reply without a valid key") from None
        if len(key) != 32:
            raise KeyServiceError(f"key service: key of {len(key)} bytes, expected 32")
        rep["key"] = key
        return rep

    def reserve(self, tenant_id: str, session_id: str, count: int) -> Reservation:
        rep = self._ask({"op": "reserve", "tenant": tenant_id, "session": session_id, "count": count})
        return Reservation(epoch=int(rep["epoch"]), first=int(rep["first"]), count=count, key=rep["key"])

    def key(self, tenant_id: str, session_id: str, epoch: int) -> bytes:
        return self._ask({"op": "key", "tenant": tenant_id, "session": session_id, "epoch": epoch})["key"]
