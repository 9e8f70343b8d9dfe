"""Tenant sessions: ML-KEM-768 key agreement, epochs, nonce counters, expiry.

The key schedule (HKDF chain, ratchet and branch steps, epoch keys) is in
``keyschedule.py``; the tenant's side (its identity and ML-KEM-768 key pair) in
``tenant.py``; a session's export, import and resumption in another process in
``resumption.py``. The names of all three stay importable from here.

Rotation is an HKDF ratchet rather than a fresh encapsulation: the tenant,
holding only its private key and the one ``kem_ciphertext``, derives every
epoch's key without another round trip (``TenantKeyPair.session_key``), and
the server keeps only the current chain value, so once an epoch's key is
erased (``retire_epoch``) the chain cannot derive it again. Copies outside
these buffers (``bytes`` handed out, cryptography's objects, freed memory)
are not erased: no defence against reading the process's memory. A key supplied to ``rotate_key(new_key)`` is used
as is for that epoch (the tenant cannot derive it); the chain continues.

Nonces and owning an epoch: the nonce is (epoch, counter) (``envelope.make_nonce``)
and each epoch's counter starts at 1, so one session object never uses a
(key, nonce) pair twice. Two session objects with the same key material
would: a session rebuilt from the shared secret (``TenantSession(...)``
directly, ``resume_session``) or imported from an export knows nothing of
what the others sealed. So a session seals only under an epoch it *owns*:
``establish_tenant_session`` owns epoch 0 (its secret is fresh); any other
session, and a session whose loaded save file shows that another session
sealed under its current epoch (``adopt``), owns nothing, and its first seal
or rotation opens a new epoch by a *branch step* under 16 random bytes
(``keyschedule.py``). Its keys from then on are unrelated to any other
session's, whatever epoch numbers they use; epochs after it are its own.

Fork and copies: after ``os.fork()`` the child holds the same keys and counters
as the parent, so every session the child inherits is marked forked
(``os.register_at_fork``): in the child it still opens entries, but sealing
(``reserve``, ``consume_sequence``) and rotation raise SessionForkedError. The
child establishes its own session. A session cannot be copied, deep-copied or
pickled (TypeError): a copy would share keys but not the counter. Containers
that deep-copy sessions share them instead (pass the session in ``memo``).

Keys live in ``bytearray`` buffers that ``close()`` and ``retire_epoch()``
overwrite with zeros. ``bytes`` returned to callers (``symmetric_key``,
``key_for_epoch``) are copies the library cannot erase; AES-GCM contexts cached
per epoch are dropped at the same moments (OpenSSL clears their key schedules
when they are freed).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import weakref
from typing import Callable, Iterable

from ._checks import check_int, check_seconds
from ._cleanup import Cleanup
from .errors import (DecryptionError, KeyRotationRequiredError, SessionClosedError, SessionExpiredError,
                     SessionForkedError)
from .keyschedule import MAX_COUNTER as MAX_COUNTER
from .keyschedule import MAX_EPOCH as MAX_EPOCH
from .keyschedule import KeyChain, Lineage, check_branches, context, mlkem, wipe
from .sessionstate import SessionState
from .sessionstate import iso_time as _iso
from .sessionstate import printable_wall as _printable_wall
from .sessionstate import wall_of as _wall_of
from .tenant import MAX_SESSION_ID_BYTES as MAX_SESSION_ID_BYTES
from .tenant import MAX_TENANT_ID_LEN as MAX_TENANT_ID_LEN
from .tenant import (
    KEM_CIPHERTEXT_SIZE,
    KEM_PUBLIC_KEY_SIZE,
    KEMAlgorithm,
    TenantIdentity,
    TenantKeyPair,
    check_algorithm,
    check_session_id,
    check_tenant_id,
)

__all__ = ["TenantIdentity", "TenantKeyPair", "TenantSession", "KEMAlgorithm", "Lineage", "SessionState",
           "establish_tenant_session", "SESSION_TTL_SECONDS", "DEFAULT_TTL_SECONDS", "DEFAULT_MAX_ENTRIES_PER_EPOCH",
           "KEM_CIPHERTEXT_SIZE", "KEM_PUBLIC_KEY_SIZE"]

SESSION_TTL_SECONDS = 900
DEFAULT_TTL_SECONDS = float(SESSION_TTL_SECONDS)
# Longest accepted time to live (ten years): expires_at must stay a printable date.
MAX_TTL_SECONDS = 10 * 366 * 86400.0
SESSION_ID_PREFIX = "urn:pqc-kv-sess:"
# Hard cap of encryptions under one (session, epoch) key. NIST SP 800-38D bounds
# invocations of one key at 2^32; rotation policies fire far earlier.
DEFAULT_MAX_ENTRIES_PER_EPOCH = 1 << 32

Clock = Callable[[], float]


# Every live session of this process, so that a forked child can mark them all (see the module docstring).
_LIVE_SESSIONS: "weakref.WeakSet[TenantSession]" = weakref.WeakSet()


def _mark_sessions_forked() -> None:
    for session in list(_LIVE_SESSIONS):
        session._forked_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_sessions_forked)


class TenantSession:
    """One tenant's session: current and older epoch keys, per-epoch nonce counters, expiry.

    Thread-safe. ``next_sequence`` (starting at 1) is the next nonce counter of
    the current epoch and ``entries_encrypted`` the entries sealed in it; both
    restart with each epoch (``rotate_key``). The nonce is (epoch, counter), so
    a (key, nonce) pair is never used twice. ``reserve(n)`` allocates n
    counters at once for a batch; ``total_entries_encrypted`` counts every
    epoch.

    Built directly from a ``shared_secret``, a session owns no epoch (another
    session may have been built from the same secret): its first seal or
    rotation opens a branch epoch of its own (see the module docstring).
    ``fresh_secret=True`` says the secret was just encapsulated for this one
    session (``establish_tenant_session`` passes it): the session owns epoch 0.

    ``created_at`` and ``expires_at`` are ISO-8601 UTC strings; ``expires_at``
    may be assigned (an ISO-8601 string or a datetime). Expiry itself is
    checked on ``clock`` (monotonic by default), which counts seconds from
    ``created_at``: assigning ``expires_at`` moves that deadline.
    """

    algorithm = KEMAlgorithm.ML_KEM_768.value

    def __init__(self, tenant_id: str, session_id: str, shared_secret: bytes, kem_ciphertext: bytes,
                 ttl_seconds: float = DEFAULT_TTL_SECONDS, clock: Clock | None = None,
                 max_entries_per_epoch: int = DEFAULT_MAX_ENTRIES_PER_EPOCH, *,
                 tenant: TenantIdentity | None = None, fresh_secret: bool = False):
        tenant_id = check_tenant_id(tenant_id)
        if tenant is None:
            tenant = TenantIdentity(tenant_id)
        elif not isinstance(tenant, TenantIdentity) or tenant.tenant_id != tenant_id:
            raise ValueError(f"tenant must be the TenantIdentity of {tenant_id!r}, got {tenant!r}")
        check_session_id(session_id)
        ttl_seconds = check_seconds("ttl_seconds", ttl_seconds, hi=MAX_TTL_SECONDS)
        self._setup(tenant, session_id, bytes(kem_ciphertext), ttl_seconds, clock, max_entries_per_epoch,
                    KeyChain.root(shared_secret, context(tenant_id, session_id)), bool(fresh_secret))

    def _setup(self, tenant: TenantIdentity, session_id: str, kem_ciphertext: bytes, ttl_seconds: float,
               clock: Clock | None, max_entries_per_epoch: int, keychain: KeyChain, owns: bool,
               next_sequence: int = 1) -> None:
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        self.tenant_id = tenant.tenant_id
        self.tenant = tenant
        self.session_id = session_id
        self.kem_ciphertext = kem_ciphertext
        self.ttl_seconds = ttl_seconds
        self.clock: Clock = clock or time.monotonic
        self.max_entries_per_epoch = max_entries_per_epoch
        self._forked = False
        self._lock = threading.RLock()
        self._keychain = keychain
        self._owns = owns
        self._generation = 0         # moves with every change of epoch, counters or key material
        self._ciphers: dict[int, object] = {}
        self._created = self.clock()
        self.created_at_wall = time.time()
        self._deadline = self._created + self.ttl_seconds
        self.epoch_started_at = self._created
        self.next_sequence = next_sequence
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
        raise TypeError("a TenantSession cannot be pickled: its keys and nonce counters belong to this process; "
                        "see resumption.export_session for a sealed export")

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
    def epoch(self) -> int:
        """The current epoch: the one the next seal uses, unless the session must first open its own."""
        return self._keychain.epoch

    @property
    def symmetric_key(self) -> bytes:
        """The current epoch's AES-256 key (a copy)."""
        return self.key_for_epoch(self.epoch)

    def key_for_epoch(self, epoch: int) -> bytes:
        """The key of ``epoch`` (a copy); DecryptionError if that epoch was retired or never existed."""
        with self._lock:
            self.check_valid()
            key = self._keychain.key(epoch)
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
            return self._keychain.live_epochs

    @property
    def branches(self) -> dict[int, bytes]:
        """The session's branch points: epoch -> 16-byte branch id (public; ``TenantKeyPair.session_key``
        needs them for the epochs after the first)."""
        with self._lock:
            return self._keychain.branches

    @property
    def owns_epoch(self) -> bool:
        """Whether the next seal may use the current epoch (False: it first opens a branch epoch)."""
        return self._owns

    @property
    def lineage(self) -> Lineage:
        """Epoch, next counter and branch points, read together (what a save file records)."""
        with self._lock:
            return Lineage(self.epoch, self.next_sequence, self._keychain.branches)

    # ---- counters --------------------------------------------------------------
    @property
    def epoch_entries(self) -> int:
        """Entries sealed under the current epoch (the same count as ``entries_encrypted``)."""
        return self.entries_encrypted

    def reserve(self, n: int) -> tuple[int, int]:
        """Allocate ``n`` consecutive nonce counters under the current epoch: returns (epoch, first).

        Epoch and counters are taken under one lock, so a rotation in another
        thread never pairs a counter with the wrong epoch. A session that does
        not own its epoch opens a branch epoch first (n > 0). SessionForkedError
        in a child process that inherited the session through fork().
        KeyRotationRequiredError when the epoch's hard cap would be passed (nothing is allocated).
        """
        if n == 1 and type(n) is int:       # one chunk (every decode step): the checks below, in their order
            with self._lock:
                if (not self.closed and self.clock() < self._deadline and not self._forked and self._owns
                        and self.entries_encrypted < self.max_entries_per_epoch):
                    first = self.next_sequence
                    self.next_sequence = first + 1
                    self.entries_encrypted += 1
                    self.total_entries_encrypted += 1
                    self._generation += 1
                    return self._keychain.epoch, first
        n = check_int("n", n, 0, MAX_COUNTER)
        with self._lock:
            self.check_valid()
            self._check_can_seal()
            if n and not self._owns and n <= self.max_entries_per_epoch:
                self._open_epoch(branch=True)
            if self.entries_encrypted + n > self.max_entries_per_epoch:
                raise KeyRotationRequiredError(
                    f"epoch {self.epoch} of session {self.session_id} has sealed {self.entries_encrypted} "
                    f"entries; {n} more would pass the cap of {self.max_entries_per_epoch}: rotate first")
            first = self.next_sequence
            self.next_sequence += n
            self.entries_encrypted += n
            self.total_entries_encrypted += n
            self._generation += 1
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
        A session that does not own its epoch takes a branch step instead of a ratchet step.
        SessionForkedError in a process that inherited the session through fork().
        """
        if new_key is not None and (not isinstance(new_key, (bytes, bytearray)) or len(new_key) != 32):
            raise ValueError("new_key must be 32 bytes (AES-256)")
        with self._lock:
            self.check_valid()
            self._check_can_seal()
            return self._open_epoch(branch=not self._owns, key=new_key)

    def _open_epoch(self, *, branch: bool, key: bytes | None = None) -> int:
        if self.epoch >= MAX_EPOCH:
            raise KeyRotationRequiredError("epoch counter exhausted: establish a new session")
        e = self._keychain.advance(branch=branch, key=key)
        self._owns = True
        self.next_sequence = 1
        self.entries_encrypted = 0
        self.epoch_started_at = self.clock()
        self._generation += 1
        return e

    def retire_epoch(self, epoch: int) -> None:
        """Erase the key of an older epoch: its entries can no longer be opened."""
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        with self._lock:
            if epoch == self.epoch:
                raise ValueError(f"epoch {epoch} is the current epoch; rotate before retiring it")
            held = self._keychain.retire(epoch)
            self._ciphers.pop(epoch, None)
            if held:
                self._generation += 1
            hooks = list(self._retire_hooks) if held else []
        for hook in hooks:
            hook(self, epoch)

    def on_retire(self, hook: Callable[["TenantSession", int], None]) -> None:
        """Call ``hook(session, epoch)`` when an epoch's key is erased (caches drop their copies of it)."""
        with self._lock:
            self._retire_hooks.append(hook)

    # ---- another session's lineage (a save file's) -----------------------------------------------
    def keys_along(self, lineage: Lineage, epochs: Iterable[int]) -> dict[int, bytes]:
        """The keys of ``epochs`` on ``lineage`` (a save file's), changing nothing: this session's own keys up
        to its epoch, later ones derived along ``lineage``. DecryptionError when the lineage is another
        branch of this session or an epoch's key is gone (retired); SessionExpiredError when closed or expired."""
        with self._lock:
            self.check_valid()
            self._check_lineage(lineage)
            try:
                keys = self._keychain.keys_along(lineage, epochs)
            except KeyError as exc:
                raise self._missing(exc.args[0]) from None
        out = {e: bytes(k) for e, k in keys.items()}
        for k in keys.values():
            wipe(k)
        return out

    def adopt(self, lineage: Lineage, epochs: Iterable[int]) -> tuple[Callable[[], None], Callable[[], None]]:
        """Take what a verified save file says of this session: hold the keys of ``epochs`` (its chunks'
        epochs) and stand at least at ``lineage.epoch``. If the file shows that another session sealed under
        the epoch this session then stands at (its epoch is later than this session's, or its counter
        high-water mark is above this session's), this session no longer owns that epoch: its next seal
        opens a branch epoch. Returns (commit, undo): undo puts the session back as it was, unless it has
        sealed, rotated or retired since. Errors as ``keys_along``."""
        epochs = set(epochs)
        with self._lock:
            self.check_valid()
            self._check_lineage(lineage)
            old = self._keychain
            missing = [e for e in epochs if e <= old.epoch and old.key(e) is None]
            if missing:
                raise self._missing(min(missing))
            before = (old, self.next_sequence, self.entries_encrypted, self._owns, self.epoch_started_at)
            new = old.followed(lineage, epochs)
            if lineage.epoch > old.epoch:
                self._owns = False
                self.next_sequence, self.entries_encrypted = lineage.next_sequence, 0
                self.epoch_started_at = self.clock()
            elif lineage.epoch == old.epoch and lineage.next_sequence > self.next_sequence:
                self._owns = False
                self.next_sequence = lineage.next_sequence
            self._keychain = new
            self._generation += 1
            generation = self._generation

        def commit() -> None:
            with self._lock:
                old.wipe_chain()

        def undo() -> None:
            with self._lock:
                if self._generation != generation or self.closed:
                    old.wipe_chain()        # the session moved on with what it learnt: keep that
                    return
                (self._keychain, self.next_sequence, self.entries_encrypted, self._owns,
                 self.epoch_started_at) = before
                for e in set(new.live_epochs) - set(old.live_epochs):
                    self._ciphers.pop(e, None)
                new.forget_beyond(old)
                self._generation += 1

        return commit, undo

    def _check_lineage(self, lineage: Lineage) -> None:
        if not isinstance(lineage, Lineage):
            raise TypeError(f"lineage must be a Lineage, got {type(lineage).__name__}")
        why = self._keychain.conflict(lineage)
        if why is not None:
            raise DecryptionError(f"session {self.session_id} of tenant {self.tenant_id!r} cannot follow "
                                  f"this lineage: {why}", tenant_id=self.tenant_id)

    def _missing(self, epoch: int) -> DecryptionError:
        return DecryptionError(f"no key for epoch {epoch} of session {self.session_id}: retired",
                               tenant_id=self.tenant_id)

    # ---- export and import (resumption.py seals the state) ----------------------------------------
    def export_state(self) -> SessionState:
        """A copy of this session's state, key material included (wipe it after use)."""
        with self._lock:
            self.check_valid()
            return SessionState(
                self.tenant_id, self.tenant.display_name, self.tenant.public_key, self.session_id,
                self.kem_ciphertext, self.epoch, self.next_sequence, bytearray(self._keychain.chain),
                {e: bytearray(self._keychain.key(e)) for e in self._keychain.live_epochs},
                self._keychain.branches, self.created_at_wall + (self._deadline - self._created),
                self.ttl_seconds, self.max_entries_per_epoch)

    @classmethod
    def from_state(cls, state: SessionState, clock: Clock | None = None) -> "TenantSession":
        """A session rebuilt from an exported state. It owns no epoch (the exporting session, or another
        import of the same export, may go on sealing): its first seal opens a branch epoch. It expires when
        the exported session did (SessionExpiredError if that has passed). The state's buffers are copied."""
        if not isinstance(state, SessionState):
            raise TypeError(f"state must be a SessionState, got {type(state).__name__}")
        tenant = TenantIdentity(state.tenant_id, state.display_name, state.public_key)
        check_session_id(state.session_id)
        remaining = state.expires_at_wall - time.time()
        if remaining <= 0:
            raise SessionExpiredError(f"session {state.session_id} of tenant {state.tenant_id!r} expired at "
                                      f"{_iso(_printable_wall(state.expires_at_wall, 'expires_at'))}")
        keychain = KeyChain(context(state.tenant_id, state.session_id), bytearray(state.chain),
                            check_int("epoch", state.epoch, 0, MAX_EPOCH),
                            {e: bytearray(k) for e, k in state.keys.items()}, check_branches(state.branches))
        self = cls.__new__(cls)
        self._setup(tenant, state.session_id, bytes(state.kem_ciphertext),
                    check_seconds("ttl_seconds", state.ttl_seconds, hi=MAX_TTL_SECONDS), clock,
                    state.max_entries_per_epoch, keychain, False, next_sequence=state.next_sequence)
        self._deadline = self._created + min(remaining, MAX_TTL_SECONDS)
        return self

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
            self._keychain.wipe()
            self._ciphers.clear()
            self._generation += 1
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
            "branches": {str(e): b.hex() for e, b in self.branches.items()},
            "owns_epoch": self.owns_epoch,
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
    The session owns its epoch 0: its secret was encapsulated for it alone.
    """
    if not isinstance(tenant, TenantIdentity):
        raise TypeError(f"tenant must be a TenantIdentity, got {type(tenant).__name__}")
    check_algorithm(algorithm)
    kem = mlkem()
    if tenant.public_key is None:
        public = kem.MLKEM768PrivateKey.generate().public_key()
    else:
        try:
            public = kem.MLKEM768PublicKey.from_public_bytes(bytes(tenant.public_key))
        except ValueError as exc:
            raise ValueError(f"tenant {tenant.tenant_id!r} public_key is not an ML-KEM-768 public key: {exc}") from None
    shared_secret, kem_ciphertext = public.encapsulate()
    session_id = SESSION_ID_PREFIX + secrets.token_hex(16)
    return TenantSession(tenant.tenant_id, session_id, shared_secret, kem_ciphertext,
                         ttl_seconds=ttl_seconds, clock=clock, max_entries_per_epoch=max_entries_per_epoch,
                         tenant=tenant, fresh_secret=True)
