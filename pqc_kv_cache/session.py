"""Tenant sessions: ML-KEM-768 key agreement, HKDF key schedule, epochs, nonce counters.

Key schedule (documented in the README):

* The server encapsulates to the tenant's ML-KEM-768 public key and keeps the
  32-byte shared secret ``ss``; the tenant decapsulates the 1088-byte
  ``kem_ciphertext`` to the same ``ss``.
* ``ctx = len16(tenant_id) ‖ tenant_id ‖ len16(session_id) ‖ session_id`` (UTF-8).
* ``chain_0 = HKDF-SHA256(ikm=ss, salt="pqc_kv_cache/v1/chain", info=ctx)``.
* ``chain_{e+1} = HKDF-SHA256(ikm=chain_e, salt="pqc_kv_cache/v1/ratchet", info=ctx ‖ be32(e+1))``.
* ``key_e = HKDF-SHA256(ikm=chain_e, salt="pqc_kv_cache/v1/key", info=ctx ‖ be32(e))`` — the AES-256 key of epoch e.

Rotation is an HKDF ratchet rather than a fresh encapsulation: the tenant,
holding only its private key and the one ``kem_ciphertext``, derives every
epoch's key without another round trip (``TenantKeyPair.session_key``), and
the server keeps only the current chain value, so erasing an epoch's key
(``retire_epoch``) and the chain values before it leaves nothing in this
process from which that key could be recomputed (forward secrecy across
epochs within the process). A key supplied to ``rotate_key(new_key)`` is used
as is for that epoch (the tenant cannot derive it); the chain continues.

Nonce counters are per epoch: each epoch's counter starts at 1, and the nonce
holds the epoch (``envelope.make_nonce``), so a (key, nonce) pair is never
used twice even when ``rotate_key`` is handed a key used before.

Fork and copies: a (key, nonce) pair must never be used twice, and a
session's counters live in this process's memory. After ``os.fork()`` the
child holds the same keys and counters as the parent, so every session the
child inherits is marked forked (``os.register_at_fork``): in the child it
still opens entries, but sealing (``reserve``, ``consume_sequence``) and
rotation raise SessionForkedError — rotation too, since the child would derive
the same next-epoch key as the parent. The child establishes its own session.
A session cannot be copied, deep-copied or pickled (TypeError): a copy would
share keys but not the counter. Containers that deep-copy sessions share them
instead (pass the session in ``memo``).

Keys live in ``bytearray`` buffers that ``close()`` and ``retire_epoch()``
overwrite with zeros. ``bytes`` returned to callers (``symmetric_key``,
``key_for_epoch``) are copies the library cannot erase; AES-GCM contexts cached
per epoch are dropped at the same moments (OpenSSL clears their key schedules
when they are freed).
"""

from __future__ import annotations

import datetime as _dt
import enum
import os
import secrets
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from ._checks import check_int, check_seconds
from ._cleanup import Cleanup
from .errors import (
    DecryptionError,
    KeyRotationRequiredError,
    PQCUnavailableError,
    SessionClosedError,
    SessionExpiredError,
    SessionForkedError,
)

__all__ = [
    "TenantIdentity",
    "TenantKeyPair",
    "TenantSession",
    "KEMAlgorithm",
    "establish_tenant_session",
    "SESSION_TTL_SECONDS",
    "DEFAULT_TTL_SECONDS",
    "DEFAULT_MAX_ENTRIES_PER_EPOCH",
    "KEM_CIPHERTEXT_SIZE",
    "KEM_PUBLIC_KEY_SIZE",
]

SESSION_TTL_SECONDS = 900
DEFAULT_TTL_SECONDS = float(SESSION_TTL_SECONDS)
# Longest accepted time to live (ten years): expires_at must stay a printable date.
MAX_TTL_SECONDS = 10 * 366 * 86400.0
SESSION_ID_PREFIX = "urn:pqc-kv-sess:"
# Hard cap of encryptions under one (session, epoch) key. NIST SP 800-38D bounds
# invocations of one key at 2^32; rotation policies fire far earlier.
DEFAULT_MAX_ENTRIES_PER_EPOCH = 1 << 32
MAX_COUNTER = 0xFFFF_FFFF_FFFF_FFFF
MAX_EPOCH = 0xFFFF_FFFF
KEM_CIPHERTEXT_SIZE = 1088
KEM_PUBLIC_KEY_SIZE = 1184
MAX_TENANT_ID_LEN = 128
MAX_SESSION_ID_BYTES = 0xFFFF

Clock = Callable[[], float]


class KEMAlgorithm(str, enum.Enum):
    """Key-encapsulation mechanisms a session can be established with (only ML-KEM-768)."""

    ML_KEM_768 = "ML-KEM-768"


def _check_algorithm(algorithm: object) -> KEMAlgorithm:
    value = algorithm.value if isinstance(algorithm, enum.Enum) else algorithm
    if isinstance(value, str):
        try:
            return KEMAlgorithm(value)
        except ValueError:
            pass
    hint = " (the TTL is the third argument: ttl_seconds=...)" if isinstance(algorithm, (int, float)) else ""
    raise ValueError(f"algorithm must be {KEMAlgorithm.ML_KEM_768.value!r}, got {algorithm!r}{hint}")


def _iso(wall: float) -> str:
    return _dt.datetime.fromtimestamp(wall, tz=_dt.timezone.utc).isoformat()


def _printable_wall(wall: float, what: str) -> float:
    """``wall`` if it is a time ``_iso`` can print, else ValueError."""
    try:
        _iso(wall)
    except (OverflowError, ValueError, OSError):
        raise ValueError(f"{what} is out of the representable date range") from None
    return wall


def _wall_of(when: object) -> float:
    """Seconds since the epoch of an ISO-8601 string or a datetime (naive means UTC)."""
    if isinstance(when, str):
        try:
            when = _dt.datetime.fromisoformat(when)
        except ValueError:
            raise ValueError(f"{when!r} is not an ISO-8601 timestamp") from None
    if not isinstance(when, _dt.datetime):
        raise TypeError(f"expires_at must be an ISO-8601 string or a datetime, got {type(when).__name__}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


def _mlkem():
    """The ML-KEM module of cryptography, or PQCUnavailableError (never a silent fallback)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem
        mlkem.MLKEM768PrivateKey  # noqa: B018 - attribute probe
    except (ImportError, AttributeError) as exc:
        raise PQCUnavailableError(
            "ML-KEM-768 is not available: install cryptography>=47 built against an OpenSSL with ML-KEM"
        ) from exc
    return mlkem


def _hkdf(ikm: bytes | bytearray, salt: bytes, info: bytes) -> bytearray:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return bytearray(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(bytes(ikm)))


def _ctx(tenant_id: str, session_id: str) -> bytes:
    t = tenant_id.encode("utf-8")
    s = session_id.encode("utf-8")
    return struct.pack(">H", len(t)) + t + struct.pack(">H", len(s)) + s


def _chain0(ss: bytes, ctx: bytes) -> bytearray:
    return _hkdf(ss, b"pqc_kv_cache/v1/chain", ctx)


def _ratchet(chain: bytearray, ctx: bytes, new_epoch: int) -> bytearray:
    return _hkdf(chain, b"pqc_kv_cache/v1/ratchet", ctx + struct.pack(">I", new_epoch))


def _epoch_key(chain: bytearray, ctx: bytes, epoch: int) -> bytearray:
    return _hkdf(chain, b"pqc_kv_cache/v1/key", ctx + struct.pack(">I", epoch))


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        for i in range(len(buf)):
            buf[i] = 0


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty str")
    try:
        n = len(session_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"session_id must be valid Unicode text (no lone surrogates), got {session_id!r}") from None
    if n > MAX_SESSION_ID_BYTES:
        raise ValueError(f"session_id must fit in {MAX_SESSION_ID_BYTES} UTF-8 bytes, got {n}")
    return session_id


# Every live session of this process, so that a forked child can mark them all (see the module docstring).
_LIVE_SESSIONS: "weakref.WeakSet[TenantSession]" = weakref.WeakSet()


def _mark_sessions_forked() -> None:
    for session in list(_LIVE_SESSIONS):
        session._forked_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_sessions_forked)


def _check_tenant_id(tenant_id: object) -> str:
    if not isinstance(tenant_id, str):
        raise TypeError(f"tenant_id must be a str, got {type(tenant_id).__name__}")
    if not tenant_id or len(tenant_id) > MAX_TENANT_ID_LEN or not tenant_id.isprintable():
        raise ValueError(f"tenant_id must be non-empty printable text of at most {MAX_TENANT_ID_LEN} characters, got {tenant_id!r}")
    return tenant_id


@dataclass(frozen=True)
class TenantIdentity:
    """Who a tenant is: an id (non-empty printable text, at most 128 characters), a display name,
    and optionally its ML-KEM-768 public key (1184 bytes) to which sessions are encapsulated."""

    tenant_id: str
    display_name: str = ""
    public_key: bytes | None = None

    def __post_init__(self):
        _check_tenant_id(self.tenant_id)
        if not isinstance(self.display_name, str):
            raise TypeError("display_name must be a str")
        if self.public_key is not None:
            if not isinstance(self.public_key, (bytes, bytearray)):
                raise TypeError("public_key must be bytes (a raw ML-KEM-768 public key)")
            if len(self.public_key) != KEM_PUBLIC_KEY_SIZE:
                raise ValueError(f"public_key must be a raw ML-KEM-768 public key of {KEM_PUBLIC_KEY_SIZE} bytes, got {len(self.public_key)}")


class TenantKeyPair:
    """The tenant side of the key agreement: an ML-KEM-768 key pair.

    >>> kp = TenantKeyPair.generate()
    >>> tenant = kp.identity("alice")
    >>> session = establish_tenant_session(tenant)
    >>> kp.session_key(session.kem_ciphertext, session.session_id, tenant_id="alice") == session.key_for_epoch(0)
    True
    """

    def __init__(self, private_key, tenant_id: str | None = None):
        self._sk = private_key
        self.tenant_id = _check_tenant_id(tenant_id) if tenant_id is not None else None

    def __repr__(self) -> str:
        return f"TenantKeyPair(tenant_id={self.tenant_id!r}, algorithm='ML-KEM-768', private key not shown)"

    @classmethod
    def generate(cls, tenant_id: str | None = None) -> "TenantKeyPair":
        return cls(_mlkem().MLKEM768PrivateKey.generate(), tenant_id)

    @property
    def public_key_bytes(self) -> bytes:
        return self._sk.public_key().public_bytes_raw()

    def identity(self, tenant_id: str | None = None, display_name: str = "") -> TenantIdentity:
        """A TenantIdentity carrying this key pair's public key (and binding tenant_id to the pair)."""
        tenant_id = tenant_id or self.tenant_id
        if tenant_id is None:
            raise ValueError("tenant_id is required (none was bound at generate())")
        self.tenant_id = _check_tenant_id(tenant_id)
        return TenantIdentity(tenant_id, display_name, self.public_key_bytes)

    def session_key(self, kem_ciphertext: bytes, session_id: str, epoch: int = 0,
                    *, tenant_id: str | None = None) -> bytes:
        """The AES-256 key of ``epoch`` that the server holds for this session (ratchet-derived epochs)."""
        tenant_id = tenant_id or self.tenant_id
        if tenant_id is None:
            raise ValueError("tenant_id is required (none was bound at generate())")
        _check_tenant_id(tenant_id)
        if not isinstance(kem_ciphertext, (bytes, bytearray)) or len(kem_ciphertext) != KEM_CIPHERTEXT_SIZE:
            raise ValueError(f"kem_ciphertext must be {KEM_CIPHERTEXT_SIZE} bytes")
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        _check_session_id(session_id)
        try:
            ss = self._sk.decapsulate(bytes(kem_ciphertext))
        except ValueError as exc:
            raise ValueError(f"kem_ciphertext is not a valid ML-KEM-768 ciphertext: {exc}") from None
        ctx = _ctx(tenant_id, session_id)
        chain = _chain0(ss, ctx)
        for e in range(1, epoch + 1):
            nxt = _ratchet(chain, ctx, e)
            _wipe(chain)
            chain = nxt
        key = _epoch_key(chain, ctx, epoch)
        _wipe(chain)
        out = bytes(key)
        _wipe(key)
        return out


class TenantSession:
    """One tenant's session: current and older epoch keys, per-epoch nonce counters, expiry.

    Thread-safe. ``next_sequence`` (starting at 1) is the next nonce counter of
    the current epoch and ``entries_encrypted`` the entries sealed in it; both
    restart with each epoch (``rotate_key``). The nonce is (epoch, counter), so
    a (key, nonce) pair is never used twice. ``reserve(n)`` allocates n
    counters at once for a batch; ``total_entries_encrypted`` counts every
    epoch.

    ``created_at`` and ``expires_at`` are ISO-8601 UTC strings; ``expires_at``
    may be assigned (an ISO-8601 string or a datetime). Expiry itself is
    checked on ``clock`` (monotonic by default), which counts seconds from
    ``created_at``: assigning ``expires_at`` moves that deadline.
    """

    algorithm = KEMAlgorithm.ML_KEM_768.value

    def __init__(self, tenant_id: str, session_id: str, shared_secret: bytes, kem_ciphertext: bytes,
                 ttl_seconds: float = DEFAULT_TTL_SECONDS, clock: Clock | None = None,
                 max_entries_per_epoch: int = DEFAULT_MAX_ENTRIES_PER_EPOCH, *,
                 tenant: TenantIdentity | None = None):
        self.tenant_id = _check_tenant_id(tenant_id)
        if tenant is None:
            tenant = TenantIdentity(tenant_id)
        elif not isinstance(tenant, TenantIdentity) or tenant.tenant_id != tenant_id:
            raise ValueError(f"tenant must be the TenantIdentity of {tenant_id!r}, got {tenant!r}")
        _check_session_id(session_id)
        ttl_seconds = check_seconds("ttl_seconds", ttl_seconds, hi=MAX_TTL_SECONDS)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.tenant = tenant
        self.session_id = session_id
        self.kem_ciphertext = bytes(kem_ciphertext)
        self.ttl_seconds = ttl_seconds
        self.clock: Clock = clock or time.monotonic
        self.max_entries_per_epoch = max_entries_per_epoch
        self._forked = False
        self._lock = threading.RLock()
        self._ctx = _ctx(tenant_id, session_id)
        self._chain: bytearray = _chain0(shared_secret, self._ctx)
        self._keys: dict[int, bytearray] = {0: _epoch_key(self._chain, self._ctx, 0)}
        self._ciphers: dict[int, object] = {}
        self.epoch = 0
        self._created = self.clock()
        self.created_at_wall = time.time()
        self._deadline = self._created + self.ttl_seconds
        self.epoch_started_at = self._created
        self.next_sequence = 1
        self.entries_encrypted = 0
        self.total_entries_encrypted = 0
        self.closed = False
        self._close_hooks: list[Callable[["TenantSession"], None]] = []
        self._retire_hooks: list[Callable[["TenantSession", int], None]] = []
        _LIVE_SESSIONS.add(self)

    # ---- fork and copies (see the module docstring) ----------------------------------
    def _forked_in_child(self) -> None:
        # runs in the child right after fork(): no other thread exists, so a lock held by a
        # parent thread at the fork is replaced rather than waited for
        self._lock = threading.RLock()
        self._forked = True

    @property
    def forked(self) -> bool:
        """True in a process that inherited this session through fork(): it may open, never seal."""
        return self._forked

    def _check_can_seal(self) -> None:
        if self._forked:
            raise SessionForkedError(
                f"session {self.session_id} of tenant {self.tenant_id!r} was inherited through fork(); "
                f"the parent seals with the same keys and counters: establish a new session in this process")

    def __copy__(self):
        raise TypeError("a TenantSession cannot be copied: the copy would reuse its nonce counters; share the object")

    def __deepcopy__(self, memo):
        raise TypeError("a TenantSession cannot be deep-copied: the copy would reuse its nonce counters; "
                        "share the object (put it in the deepcopy memo)")

    def __reduce_ex__(self, protocol):
        raise TypeError("a TenantSession cannot be pickled: its keys and nonce counters belong to this process")

    @property
    def max_entries_per_epoch(self) -> int:
        """Hard cap of entries sealed under one epoch (KeyRotationRequiredError beyond it)."""
        return self._max_entries_per_epoch

    @max_entries_per_epoch.setter
    def max_entries_per_epoch(self, value) -> None:
        self._max_entries_per_epoch = check_int("max_entries_per_epoch", value, 1, MAX_COUNTER)

    # ---- validity ------------------------------------------------------------
    @property
    def created_at(self) -> str:
        """When the session was established (ISO-8601 UTC)."""
        return _iso(self.created_at_wall)

    @property
    def expires_at(self) -> str:
        """When the session expires (ISO-8601 UTC); assign an ISO-8601 string or a datetime to move it."""
        return _iso(self.created_at_wall + (self._deadline - self._created))

    @expires_at.setter
    def expires_at(self, when) -> None:
        wall = _printable_wall(_wall_of(when), "expires_at")
        with self._lock:
            self._deadline = self._created + (wall - self.created_at_wall)

    @property
    def expires_in_seconds(self) -> float:
        """Seconds left before expiry on the session's clock (0 once expired)."""
        return max(0.0, self._deadline - self.clock())

    def is_valid(self) -> bool:
        return not self.closed and self.clock() < self._deadline

    def check_valid(self) -> None:
        """Raise SessionClosedError / SessionExpiredError unless the session can be used."""
        if self.closed:
            raise SessionClosedError(f"session {self.session_id} of tenant {self.tenant_id!r} is closed")
        now = self.clock()
        if now >= self._deadline:
            raise SessionExpiredError(
                f"session {self.session_id} of tenant {self.tenant_id!r} expired "
                f"{now - self._deadline:.1f} s ago (at {self.expires_at})")

    @property
    def age_seconds(self) -> float:
        return self.clock() - self._created

    @property
    def epoch_age_seconds(self) -> float:
        return self.clock() - self.epoch_started_at

    # ---- keys ----------------------------------------------------------------
    @property
    def symmetric_key(self) -> bytes:
        """The current epoch's AES-256 key (a copy)."""
        return self.key_for_epoch(self.epoch)

    def key_for_epoch(self, epoch: int) -> bytes:
        """The key of ``epoch`` (a copy); DecryptionError if that epoch was retired or never existed."""
        with self._lock:
            self.check_valid()
            key = self._keys.get(epoch)
            if key is None:
                raise DecryptionError(
                    f"no key for epoch {epoch} of session {self.session_id}: "
                    + ("retired" if 0 <= epoch < self.epoch else "unknown epoch"),
                    tenant_id=self.tenant_id)
            return bytes(key)

    def cipher(self, epoch: int):
        """A cached AESGCM context for ``epoch`` (same errors as key_for_epoch)."""
        c = self._ciphers.get(epoch)
        if c is not None and self.is_valid():
            return c
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        with self._lock:
            c = AESGCM(self.key_for_epoch(epoch))
            self._ciphers[epoch] = c
            return c

    @property
    def live_epochs(self) -> list[int]:
        with self._lock:
            return sorted(self._keys)

    # ---- counters --------------------------------------------------------------
    @property
    def epoch_entries(self) -> int:
        """Entries sealed under the current epoch (the same count as ``entries_encrypted``)."""
        return self.entries_encrypted

    def reserve(self, n: int) -> tuple[int, int]:
        """Allocate ``n`` consecutive nonce counters under the current epoch: returns (epoch, first).

        Epoch and counters are taken under one lock, so a rotation in another
        thread never pairs a counter with the wrong epoch. SessionForkedError in
        a child process that inherited the session through fork().
        KeyRotationRequiredError when the epoch's hard cap would be passed (nothing is allocated).
        """
        n = check_int("n", n, 0, MAX_COUNTER)
        with self._lock:
            self.check_valid()
            self._check_can_seal()
            if self.entries_encrypted + n > self.max_entries_per_epoch:
                raise KeyRotationRequiredError(
                    f"epoch {self.epoch} of session {self.session_id} has sealed {self.entries_encrypted} "
                    f"entries; {n} more would pass the cap of {self.max_entries_per_epoch}: rotate first")
            first = self.next_sequence
            self.next_sequence += n
            self.entries_encrypted += n
            self.total_entries_encrypted += n
            return self.epoch, first

    def consume_sequence(self) -> int:
        """Allocate one nonce counter of the current epoch; returns it (then ``next_sequence`` and
        ``entries_encrypted`` are one higher)."""
        return self.reserve(1)[1]

    # ---- rotation ----------------------------------------------------------------
    def rotate_key(self, new_key: bytes | None = None) -> int:
        """Open a new epoch (HKDF ratchet, or ``new_key`` used as is); returns the new epoch.

        The counters restart (``next_sequence`` 1, ``entries_encrypted`` 0) under
        the new epoch. Keys of earlier epochs stay available until ``retire_epoch``.
        SessionForkedError in a process that inherited the session through fork().
        """
        if new_key is not None and (not isinstance(new_key, (bytes, bytearray)) or len(new_key) != 32):
            raise ValueError("new_key must be 32 bytes (AES-256)")
        with self._lock:
            self.check_valid()
            self._check_can_seal()
            e = self.epoch + 1
            if e > 0xFFFFFFFF:
                raise KeyRotationRequiredError("epoch counter exhausted: establish a new session")
            nxt = _ratchet(self._chain, self._ctx, e)
            _wipe(self._chain)
            self._chain = nxt
            self._keys[e] = bytearray(new_key) if new_key is not None else _epoch_key(self._chain, self._ctx, e)
            self.epoch = e
            self.next_sequence = 1
            self.entries_encrypted = 0
            self.epoch_started_at = self.clock()
            return e

    def retire_epoch(self, epoch: int) -> None:
        """Erase the key of an older epoch: its entries can no longer be opened."""
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        with self._lock:
            if epoch == self.epoch:
                raise ValueError(f"epoch {epoch} is the current epoch; rotate before retiring it")
            key = self._keys.pop(epoch, None)
            self._ciphers.pop(epoch, None)
            _wipe(key)
            hooks = list(self._retire_hooks) if key is not None else []
        for hook in hooks:
            hook(self, epoch)

    def on_retire(self, hook: Callable[["TenantSession", int], None]) -> None:
        """Call ``hook(session, epoch)`` when an epoch's key is erased (caches drop their copies of it)."""
        with self._lock:
            self._retire_hooks.append(hook)

    # ---- closing -------------------------------------------------------------------
    def on_close(self, hook: Callable[["TenantSession"], None]) -> None:
        """Call ``hook(session)`` when the session closes (used by caches to shred rows)."""
        with self._lock:
            self._close_hooks.append(hook)

    def close(self) -> None:
        """Overwrite all key material and make every later use raise SessionClosedError."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for key in self._keys.values():
                _wipe(key)
            self._keys.clear()
            self._ciphers.clear()
            _wipe(self._chain)
            hooks, self._close_hooks = self._close_hooks, []
            self._retire_hooks = []
        done = Cleanup()        # every cache shreds its rows, whatever one of them (or its log) raises
        for hook in hooks:
            with done.step():
                hook(self)
        done.done()

    def to_public_dict(self) -> dict:
        """Session facts safe to log or return to the tenant: never a key."""
        return {
            "session_id": self.session_id,
            "tenant_id": self.tenant_id,
            "tenant_display": self.tenant.display_name,
            "algorithm": self.algorithm,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "entries_encrypted": self.entries_encrypted,
            "is_valid": self.is_valid(),
            "epoch": self.epoch,
            "live_epochs": self.live_epochs,
            "ttl_seconds": self.ttl_seconds,
            "expires_in_seconds": self.expires_in_seconds,
            "next_sequence": self.next_sequence,
            "total_entries_encrypted": self.total_entries_encrypted,
            "kem": self.algorithm,
            "kem_ciphertext": self.kem_ciphertext.hex(),
            "forked": self.forked,
        }

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("valid" if self.is_valid() else "expired")
        if self._forked:
            state += ", forked"
        return f"TenantSession(tenant_id={self.tenant_id!r}, session_id={self.session_id!r}, epoch={self.epoch}, {state})"


def establish_tenant_session(tenant: TenantIdentity, algorithm: "KEMAlgorithm | str" = KEMAlgorithm.ML_KEM_768,
                             ttl_seconds: float = SESSION_TTL_SECONDS, clock: Clock | None = None, *,
                             max_entries_per_epoch: int = DEFAULT_MAX_ENTRIES_PER_EPOCH) -> TenantSession:
    """Server side: encapsulate to the tenant's ML-KEM-768 public key and derive the session key.

    ``algorithm`` is ``"ML-KEM-768"`` (or ``KEMAlgorithm.ML_KEM_768``); any other
    value is a ValueError. When the identity carries no public key, a fresh
    tenant key pair is generated and its private key discarded (the session
    then lives only in this process). Session ids read ``urn:pqc-kv-sess:<32 hex>``.
    """
    if not isinstance(tenant, TenantIdentity):
        raise TypeError(f"tenant must be a TenantIdentity, got {type(tenant).__name__}")
    _check_algorithm(algorithm)
    mlkem = _mlkem()
    if tenant.public_key is None:
        public = mlkem.MLKEM768PrivateKey.generate().public_key()
    else:
        try:
            public = mlkem.MLKEM768PublicKey.from_public_bytes(bytes(tenant.public_key))
        except ValueError as exc:
            raise ValueError(f"tenant {tenant.tenant_id!r} public_key is not an ML-KEM-768 public key: {exc}") from None
    shared_secret, kem_ciphertext = public.encapsulate()
    session_id = SESSION_ID_PREFIX + secrets.token_hex(16)
    return TenantSession(tenant.tenant_id, session_id, shared_secret, kem_ciphertext,
                         ttl_seconds=ttl_seconds, clock=clock, max_entries_per_epoch=max_entries_per_epoch,
                         tenant=tenant)
