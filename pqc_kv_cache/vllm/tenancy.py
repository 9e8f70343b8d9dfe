"""The server secret, and what is keyed with it: the request fields a server sets (so that the encrypting
connector and vLLM's prefix cache know the tenant) and the names of the stored files.

Pure Python: importable without vLLM, so a server can build requests without importing the connector.

The server secret is 32 random bytes in a key file (64 hex digits), created with mode 0600 in a directory
of mode 0700 and never overwritten; loading refuses a file that group or others may access, as for the
audit log's signing key. The gateway and both sides of the connector read it; vLLM's configuration holds
only its path. With it:

* ``cache_salt`` of a tenant is a MAC of the tenant id, so nobody without the secret can compute another
  tenant's salt, and the connector checks a request's salt against its tenant;
* the store's directory names are MACs (of the tenant id; of the tenant, session and prompt prefix), so
  listing the store does not confirm a guessed tenant or prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from ..errors import KVCacheError
from ..secretfiles import create_secret_file, expand, read_secret_file

__all__ = ["PARAMS_KEY", "SecretFileError", "ServerSecret", "generate_server_secret_file", "load_server_secret",
           "request_fields"]

PARAMS_KEY = "pqc_kv_cache"
SECRET_BYTES = 32
_MAX_FILE = 256


class SecretFileError(KVCacheError):
    """The server secret's key file is missing, malformed, or readable by group or others."""


def _check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str")
    return value


def _field(value: str) -> bytes:
    """A length-prefixed UTF-8 field, so that concatenated fields never run into each other."""
    b = value.encode("utf-8")
    return len(b).to_bytes(4, "big") + b


class ServerSecret:
    """The server secret (32 bytes) and the MACs keyed with it. Its repr omits the key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != SECRET_BYTES:
            raise ValueError(f"the server secret is {SECRET_BYTES} bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "ServerSecret(<hidden>)"

    def _mac(self, label: bytes, *parts: bytes) -> bytes:
        return hmac.new(self._key, b"pqc_kv_cache/" + label + b"\x00" + b"".join(parts), hashlib.sha256).digest()

    def cache_salt(self, tenant_id: str) -> str:
        """The ``cache_salt`` of a tenant: vLLM hashes it into its prefix-cache block hashes, so two tenants'
        identical prompts never share vLLM's blocks; the connector refuses a request of tenant T whose salt
        is not this one."""
        return "pqckv-" + self._mac(b"vllm-salt", _field(_check_id("tenant_id", tenant_id))).hex()[:32]

    def salt_matches(self, tenant_id: str, salt: Any) -> bool:
        """Whether ``salt`` is ``cache_salt(tenant_id)`` (compared in constant time)."""
        return isinstance(salt, str) and hmac.compare_digest(salt.encode("utf-8", "replace"),
                                                             self.cache_salt(tenant_id).encode())

    def tenant_name(self, tenant_id: str) -> str:
        """The store's directory name of a tenant."""
        return self._mac(b"vllm-tenant-dir", _field(_check_id("tenant_id", tenant_id))).hex()[:32]

    def prefix_name(self, tenant_id: str, session_id: str, chain: bytes) -> str:
        """The store's name of a tenant session's block (``chain``: the block's chain hash, which covers every
        token id up to and including the block, the block size and the LoRA adapter; an empty ``chain`` names
        the session's directory, which no block shares since every chain hash is 32 bytes)."""
        return self._mac(b"vllm-prefix-dir", _field(_check_id("tenant_id", tenant_id)),
                         _field(_check_id("session_id", session_id)), bytes(chain)).hex()


def request_fields(secret: ServerSecret, tenant_id: str, session_id: str) -> dict[str, Any]:
    """``cache_salt`` and ``kv_transfer_params`` of a tenant's request (no key material: ids and the MAC).

    Offline: ``llm.generate({"prompt_token_ids": ids, "cache_salt": f["cache_salt"]},
    SamplingParams(extra_args={"kv_transfer_params": f["kv_transfer_params"]}))``; in the OpenAI server the
    same two fields of the request body, set by the gateway (``pqc_kv_cache.vllm.gateway``).
    """
    if not isinstance(secret, ServerSecret):
        raise TypeError(f"secret must be a ServerSecret, got {type(secret).__name__}")
    _check_id("session_id", session_id)
    return {"cache_salt": secret.cache_salt(tenant_id),
            "kv_transfer_params": {PARAMS_KEY: {"tenant_id": tenant_id, "session_id": session_id}}}


def write_new_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    """Create a key file of 32 new random bytes at ``path`` (64 hex digits; the rules of
    ``pqc_kv_cache.secretfiles``: mode 0600, parents 0700, never overwritten) and return the bytes;
    ``what`` names the file in messages (``SecretFileError``)."""
    key = secrets.token_bytes(SECRET_BYTES)
    create_secret_file(path, (key.hex() + "\n").encode("ascii"), f"{what} file", SecretFileError)
    return key


def read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The 32 bytes of a key file written by ``write_new_key_file``. Refuses (``SecretFileError``) a file that
    does not exist, is not a regular file, that group or others may access, or that does not hold exactly 64
    hex digits."""
    data = read_secret_file(path, _MAX_FILE, f"{what} file", SecretFileError)
    try:
        text = data.decode("ascii").strip()
        key = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        text, key = "", b""
    finally:
        data[:] = bytes(len(data))
    if len(key) != SECRET_BYTES or len(text) != 2 * SECRET_BYTES:
        raise SecretFileError(f"{what} file {os.fspath(expand(path))!r} does not hold {SECRET_BYTES} bytes as hex")
    return key


def generate_server_secret_file(path: str | os.PathLike[str]) -> ServerSecret:
    """Create a new server secret at ``path`` (64 hex digits, mode 0600; missing parents are created with
    mode 0700). An existing file is never overwritten (``SecretFileError``)."""
    return ServerSecret(write_new_key_file(path, "server secret"))


def load_server_secret(path: str | os.PathLike[str]) -> ServerSecret:
    """The secret of a key file written by ``generate_server_secret_file``. Refuses (``SecretFileError``) a
    file that does not exist, is not a regular file, that group or others may access, or that does not hold
    exactly 64 hex digits."""
    return ServerSecret(read_key_file(path, "server secret"))
