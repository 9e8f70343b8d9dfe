"""The session key schedule: HKDF chain, ratchet and branch steps, epoch keys, and a session's lineage.

Key schedule (documented in the README):

* ``ss`` is the 32-byte ML-KEM-768 shared secret of the session.
* ``ctx = len16(tenant_id) ‖ tenant_id ‖ len16(session_id) ‖ session_id`` (UTF-8).
* ``chain_0 = HKDF-SHA256(ikm=ss, salt="pqc_kv_cache/v1/chain", info=ctx)``.
* A ratchet step: ``chain_{e} = HKDF-SHA256(ikm=chain_{e-1}, salt="pqc_kv_cache/v1/ratchet", info=ctx ‖ be32(e))``.
* A branch step, taken by a session that does not own its current epoch (see below):
  ``chain_{e} = HKDF-SHA256(ikm=chain_{e-1}, salt="pqc_kv_cache/v1/branch", info=ctx ‖ be32(e) ‖ b)``
  with ``b`` 16 random bytes, the branch id (public: it is no secret without the chain).
* ``key_e = HKDF-SHA256(ikm=chain_e, salt="pqc_kv_cache/v1/key", info=ctx ‖ be32(e))``: the AES-256 key
  of epoch e.

A session's *lineage* is the list of its branch points (epoch, branch id): with the shared secret (or any
chain value before them) it determines every key of the session's epochs. Two sessions built from the
same secret that take a branch step derive unrelated keys from then on, whatever epoch numbers they use.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ._checks import check_int
from .errors import PQCUnavailableError

__all__ = ["Lineage", "KeyChain", "BRANCH_ID_SIZE", "MAX_EPOCH", "MAX_COUNTER"]

MAX_COUNTER = 0xFFFF_FFFF_FFFF_FFFF
MAX_EPOCH = 0xFFFF_FFFF
BRANCH_ID_SIZE = 16


def mlkem():
    """The ML-KEM module of cryptography, or PQCUnavailableError (never a silent fallback)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import mlkem
        mlkem.MLKEM768PrivateKey  # noqa: B018 - attribute probe
    except (ImportError, AttributeError) as exc:
        raise PQCUnavailableError(
            "ML-KEM-768 is not available: install cryptography>=47 built against an OpenSSL with ML-KEM"
        ) from exc
    return mlkem


def hkdf(ikm: bytes | bytearray, salt: bytes, info: bytes) -> bytearray:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return bytearray(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(bytes(ikm)))


def context(tenant_id: str, session_id: str) -> bytes:
    t = tenant_id.encode("utf-8")
    s = session_id.encode("utf-8")
    return struct.pack(">H", len(t)) + t + struct.pack(">H", len(s)) + s


def chain0(ss: bytes | bytearray, ctx: bytes) -> bytearray:
    return hkdf(ss, b"pqc_kv_cache/v1/chain", ctx)


def step(chain: bytearray, ctx: bytes, new_epoch: int, branch: bytes | None = None) -> bytearray:
    """The chain value of ``new_epoch`` from that of the epoch before: a ratchet step, or a branch step."""
    if branch is None:
        return hkdf(chain, b"pqc_kv_cache/v1/ratchet", ctx + struct.pack(">I", new_epoch))
    return hkdf(chain, b"pqc_kv_cache/v1/branch", ctx + struct.pack(">I", new_epoch) + branch)


def epoch_key(chain: bytearray, ctx: bytes, epoch: int) -> bytearray:
    return hkdf(chain, b"pqc_kv_cache/v1/key", ctx + struct.pack(">I", epoch))


def wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


def check_branches(branches: object) -> dict[int, bytes]:
    """A copy of a lineage's branch points (epoch >= 1 -> 16-byte id), or ValueError / TypeError."""
    if not isinstance(branches, Mapping):
        raise TypeError(f"branches must map epochs to {BRANCH_ID_SIZE}-byte branch ids, got {type(branches).__name__}")
    out = {}
    for e, b in branches.items():
        e = check_int("branch epoch", e, 1, MAX_EPOCH)
        if not isinstance(b, (bytes, bytearray)) or len(b) != BRANCH_ID_SIZE:
            raise ValueError(f"the branch id of epoch {e} must be {BRANCH_ID_SIZE} bytes")
        out[e] = bytes(b)
    return out


@dataclass(frozen=True)
class Lineage:
    """Where a session stands: its current ``epoch``, the next nonce counter of that epoch
    (``next_sequence``: every counter below it may have been used) and its branch points up to the epoch.
    Saved with every save file (authenticated by the manifest tag): a session that loads the file learns
    which keys the file's epochs have and how far the saving session had sealed."""

    epoch: int
    next_sequence: int
    branches: dict = field(default_factory=dict)

    def __post_init__(self):
        check_int("epoch", self.epoch, 0, MAX_EPOCH)
        check_int("next_sequence", self.next_sequence, 1, MAX_COUNTER + 1)
        branches = check_branches(self.branches)
        if any(e > self.epoch for e in branches):
            raise ValueError(f"a branch point lies past the lineage's epoch {self.epoch}")
        object.__setattr__(self, "branches", branches)


def derive(secret_chain: bytearray, ctx: bytes, from_epoch: int, branches: Mapping[int, bytes], to_epoch: int,
           epochs: Iterable[int]) -> tuple[bytearray, dict[int, bytearray]]:
    """Walk a chain value of ``from_epoch`` forward to ``to_epoch`` along ``branches``: (the chain value of
    ``to_epoch``, the keys of those of ``epochs`` that lie after ``from_epoch``). Intermediate chain values
    are wiped; ``secret_chain`` is left as it is."""
    wanted = {e for e in epochs if from_epoch < e <= to_epoch}
    chain = bytearray(secret_chain)
    keys: dict[int, bytearray] = {}
    for e in range(from_epoch + 1, to_epoch + 1):
        nxt = step(chain, ctx, e, branches.get(e))
        wipe(chain)
        chain = nxt
        if e in wanted:
            keys[e] = epoch_key(chain, ctx, e)
    return chain, keys


class KeyChain:
    """One session's key material: the chain value of its current epoch, the keys of its live epochs and
    its branch points. Not thread-safe: the session holding it locks around every call."""

    def __init__(self, ctx: bytes, chain: bytearray, epoch: int, keys: dict[int, bytearray],
                 branches: dict[int, bytes]):
        self._ctx = ctx
        self._chain = chain
        self.epoch = epoch
        self._keys = keys
        self._branches = branches

    @classmethod
    def root(cls, secret: bytes | bytearray, ctx: bytes) -> "KeyChain":
        chain = chain0(secret, ctx)
        return cls(ctx, chain, 0, {0: epoch_key(chain, ctx, 0)}, {})

    def key(self, epoch: int) -> bytearray | None:
        return self._keys.get(epoch)

    @property
    def live_epochs(self) -> list[int]:
        return sorted(self._keys)

    @property
    def branches(self) -> dict[int, bytes]:
        return dict(self._branches)

    @property
    def chain(self) -> bytearray:
        """The chain value of the current epoch (the object itself: callers copy it)."""
        return self._chain

    def advance(self, *, branch: bool, key: bytes | bytearray | None = None) -> int:
        """Open the next epoch by a ratchet step (or a branch step under a fresh random id); its key is
        derived, or ``key`` as given. Returns the new epoch."""
        e = self.epoch + 1
        bid = os.urandom(BRANCH_ID_SIZE) if branch else None
        nxt = step(self._chain, self._ctx, e, bid)
        wipe(self._chain)
        self._chain = nxt
        self._keys[e] = bytearray(key) if key is not None else epoch_key(nxt, self._ctx, e)
        if bid is not None:
            self._branches[e] = bid
        self.epoch = e
        return e

    def retire(self, epoch: int) -> bool:
        """Erase the key of ``epoch``; True if it was held."""
        key = self._keys.pop(epoch, None)
        wipe(key)
        return key is not None

    def wipe_chain(self) -> None:
        """Wipe the chain value only (a chain replaced by the one ``followed`` made from it)."""
        wipe(self._chain)

    def wipe(self) -> None:
        for key in self._keys.values():
            wipe(key)
        self._keys.clear()
        wipe(self._chain)

    # ---- another lineage of the same session (a save file's) ----------------------------------------
    def conflict(self, other: Lineage) -> str | None:
        """Why ``other`` is not a lineage this chain can follow (None when it can): the two must have the
        same branch points up to the lower of their epochs."""
        upto = min(self.epoch, other.epoch)
        mine = {e: b for e, b in self._branches.items() if e <= upto}
        theirs = {e: b for e, b in other.branches.items() if e <= upto}
        if mine == theirs:
            return None
        first = min(e for e in set(mine) | set(theirs) if mine.get(e) != theirs.get(e))
        return (f"its epoch {first} was opened by another resumption of this session (another branch); "
                "open it with a session resumed afresh")

    def keys_along(self, other: Lineage, epochs: Iterable[int]) -> dict[int, bytearray]:
        """Copies of the keys of ``epochs`` on lineage ``other`` (which must not conflict): epochs up to
        this chain's are its live keys, later ones derived along ``other``. KeyError naming an epoch
        whose key this chain no longer holds (retired, or never derivable)."""
        epochs = set(epochs)
        out: dict[int, bytearray] = {}
        later = {e for e in epochs if e > self.epoch}
        try:
            for e in sorted(epochs - later):
                key = self._keys.get(e)
                if key is None:
                    raise KeyError(e)
                out[e] = bytearray(key)
            if later:
                chain, derived = derive(self._chain, self._ctx, self.epoch, other.branches, max(later), later)
                wipe(chain)
                out.update(derived)
        except BaseException:
            for key in out.values():
                wipe(key)
            raise
        return out

    def followed(self, other: Lineage, epochs: Iterable[int]) -> "KeyChain":
        """A new chain that holds this chain's live keys and stands at ``other``'s epoch when that is later,
        with the keys of those of ``epochs`` that lie past this chain's epoch (and of ``other``'s epoch).
        This chain is left as it is (the two share their older key buffers)."""
        if other.epoch <= self.epoch:
            return KeyChain(self._ctx, bytearray(self._chain), self.epoch, dict(self._keys), dict(self._branches))
        wanted = {e for e in epochs if e > self.epoch} | {other.epoch}
        chain, derived = derive(self._chain, self._ctx, self.epoch, other.branches, other.epoch, wanted)
        branches = dict(self._branches)
        branches.update({e: b for e, b in other.branches.items() if e > self.epoch})
        return KeyChain(self._ctx, chain, other.epoch, {**self._keys, **derived}, branches)

    def forget_beyond(self, older: "KeyChain") -> None:
        """Wipe what this chain holds that ``older`` (the chain it was followed from) does not share."""
        for e, key in self._keys.items():
            if older._keys.get(e) is not key:
                wipe(key)
        self._keys.clear()
        wipe(self._chain)
