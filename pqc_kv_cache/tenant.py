"""Who a tenant is, and the tenant's side of the key agreement (its ML-KEM-768 key pair)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from ._checks import check_int
from .keyschedule import MAX_EPOCH, chain0, check_branches, context, derive, epoch_key, mlkem, wipe

__all__ = ["TenantIdentity", "TenantKeyPair", "KEMAlgorithm", "KEM_CIPHERTEXT_SIZE", "KEM_PUBLIC_KEY_SIZE",
           "MAX_TENANT_ID_LEN", "MAX_SESSION_ID_BYTES"]

KEM_CIPHERTEXT_SIZE = 1088
KEM_PUBLIC_KEY_SIZE = 1184
MAX_TENANT_ID_LEN = 128
MAX_SESSION_ID_BYTES = 0xFFFF


class KEMAlgorithm(str, enum.Enum):
    """Key-encapsulation mechanisms a session can be established with (only ML-KEM-768)."""

    ML_KEM_768 = "ML-KEM-768"


def check_algorithm(algorithm: object) -> KEMAlgorithm:
    value = algorithm.value if isinstance(algorithm, enum.Enum) else algorithm
    if isinstance(value, str):
        try:
            return KEMAlgorithm(value)
        except ValueError:
            pass
    hint = " (the TTL is the third argument: ttl_seconds=...)" if isinstance(algorithm, (int, float)) else ""
    raise ValueError(f"algorithm must be {KEMAlgorithm.ML_KEM_768.value!r}, got {algorithm!r}{hint}")


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty str")
    try:
        n = len(session_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"session_id must be valid Unicode text (no lone surrogates), got {session_id!r}") from None
    if n > MAX_SESSION_ID_BYTES:
        raise ValueError(f"session_id must fit in {MAX_SESSION_ID_BYTES} UTF-8 bytes, got {n}")
    return session_id


def check_tenant_id(tenant_id: object) -> str:
    if not isinstance(tenant_id, str):
        raise TypeError(f"tenant_id must be a str, got {type(tenant_id).__name__}")
    if not tenant_id or len(tenant_id) > MAX_TENANT_ID_LEN or not tenant_id.isprintable():
        raise ValueError(f"tenant_id must be non-empty printable text of at most {MAX_TENANT_ID_LEN} characters, got {tenant_id!r}")
    return tenant_id


def check_kem_ciphertext(kem_ciphertext: object) -> bytes:
    if not isinstance(kem_ciphertext, (bytes, bytearray)) or len(kem_ciphertext) != KEM_CIPHERTEXT_SIZE:
        raise ValueError(f"kem_ciphertext must be {KEM_CIPHERTEXT_SIZE} bytes")
    return bytes(kem_ciphertext)


@dataclass(frozen=True)
class TenantIdentity:
    """Who a tenant is: an id (non-empty printable text, at most 128 characters), a display name,
    and optionally its ML-KEM-768 public key (1184 bytes) to which sessions are encapsulated."""

    tenant_id: str
    display_name: str = ""
    public_key: bytes | None = None

    def __post_init__(self):
        check_tenant_id(self.tenant_id)
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
        self.tenant_id = check_tenant_id(tenant_id) if tenant_id is not None else None

    def __repr__(self) -> str:
        return f"TenantKeyPair(tenant_id={self.tenant_id!r}, algorithm='ML-KEM-768', private key not shown)"

    @classmethod
    def generate(cls, tenant_id: str | None = None) -> "TenantKeyPair":
        return cls(mlkem().MLKEM768PrivateKey.generate(), tenant_id)

    @property
    def public_key_bytes(self) -> bytes:
        return self._sk.public_key().public_bytes_raw()

    def identity(self, tenant_id: str | None = None, display_name: str = "") -> TenantIdentity:
        """A TenantIdentity carrying this key pair's public key (and binding tenant_id to the pair)."""
        tenant_id = tenant_id or self.tenant_id
        if tenant_id is None:
            raise ValueError("tenant_id is required (none was bound at generate())")
        self.tenant_id = check_tenant_id(tenant_id)
        return TenantIdentity(tenant_id, display_name, self.public_key_bytes)

    def _tenant(self, tenant_id: str | None) -> str:
        tenant_id = tenant_id or self.tenant_id
        if tenant_id is None:
            raise ValueError("tenant_id is required (none was bound at generate())")
        return check_tenant_id(tenant_id)

    def shared_secret(self, kem_ciphertext: bytes) -> bytearray:
        """Decapsulate ``kem_ciphertext`` (1088 bytes): the session's 32-byte shared secret (wipe it after use)."""
        kem_ciphertext = check_kem_ciphertext(kem_ciphertext)
        try:
            return bytearray(self._sk.decapsulate(kem_ciphertext))
        except ValueError as exc:
            raise ValueError(f"kem_ciphertext is not a valid ML-KEM-768 ciphertext: {exc}") from None

    def session_key(self, kem_ciphertext: bytes, session_id: str, epoch: int = 0,
                    *, tenant_id: str | None = None, branches: Mapping[int, bytes] | None = None) -> bytes:
        """The AES-256 key of ``epoch`` that the server holds for this session. ``branches``: the session's
        branch points (``TenantSession.branches``; none for a session that never resumed)."""
        tenant_id = self._tenant(tenant_id)
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        check_session_id(session_id)
        lineage = check_branches(branches or {})
        ss = self.shared_secret(kem_ciphertext)
        ctx = context(tenant_id, session_id)
        root = chain0(ss, ctx)
        wipe(ss)
        if epoch == 0:
            key = epoch_key(root, ctx, 0)
        else:
            chain, keys = derive(root, ctx, 0, lineage, epoch, [epoch])
            wipe(chain)
            key = keys[epoch]
        wipe(root)
        out = bytes(key)
        wipe(key)
        return out
