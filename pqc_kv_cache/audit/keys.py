"""The signing key of a persisted audit log: create it, keep it in a file, load it again.

A log is signed with an ML-DSA-65 private key, and re-opening the log to
continue it needs the same key.  A key file holds that key as unencrypted
PKCS#8 PEM, is created with owner-only permissions (0600) and is never
overwritten; loading refuses a file that group or others may read, as ssh
does for its keys.

Keep the key away from the log: whoever can write the log's folder and read
the key can rewrite the log and sign it again.  ``default_key_path`` names a
file in a per-user directory, outside the log's folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from ..errors import AuditError, PQCUnavailableError
from ..secretfiles import create_secret_file, read_secret_file

__all__ = ["SigningKey", "KEY_DIR_ENV", "generate_signing_key_file", "load_signing_key_file",
           "resolve_signing_key", "default_key_dir", "default_key_path", "public_key_fingerprint_hex"]

#: What ``KVAuditLog(signing_key=...)`` accepts: a key, its 32-byte seed, or a key file.
SigningKey = Union[mldsa.MLDSA65PrivateKey, bytes, bytearray, memoryview, str, "os.PathLike[str]"]

#: Directory of ``default_key_path`` (default: ``$XDG_CONFIG_HOME/pqc_kv_cache/keys``).
KEY_DIR_ENV = "PQC_KV_CACHE_KEY_DIR"

#: Most bytes a signing key file is read for (a PEM ML-DSA-65 private key is a few KB).
MAX_SIGNING_KEY_FILE = 64 * 1024


def _expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def generate_signing_key_file(path: str | os.PathLike[str]) -> mldsa.MLDSA65PrivateKey:
    """Create a new ML-DSA-65 key and write it to ``path`` (PKCS#8 PEM, mode 0600).

    Missing parent directories are created (mode 0700).  An existing file is
    never overwritten (``AuditError``): losing a key makes its logs impossible
    to continue.  ``~`` is expanded.
    """
    try:
        key = mldsa.MLDSA65PrivateKey.generate()
    except Exception as e:  # UnsupportedAlgorithm from a backend without ML-DSA
        raise PQCUnavailableError(f"ML-DSA-65 is not available: {e}") from None
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    create_secret_file(path, pem, "signing key file", AuditError)
    return key


def load_signing_key_file(path: str | os.PathLike[str]) -> mldsa.MLDSA65PrivateKey:
    """The ML-DSA-65 key of a key file written by ``generate_signing_key_file`` (or any PKCS#8 PEM).

    Refuses (``AuditError``) a file that does not exist, that group or others
    may access (on POSIX systems), or that holds anything but an ML-DSA-65
    private key.
    """
    p = _expand(path)
    # bounded: a device or a huge file is refused (a PEM key is a few kB)
    data = read_secret_file(p, MAX_SIGNING_KEY_FILE, "signing key file", AuditError)
    try:
        key = serialization.load_pem_private_key(bytes(data), password=None)
    except Exception:
        raise AuditError(f"signing key file {os.fspath(p)!r} does not hold an unencrypted "
                         "PKCS#8 PEM private key") from None
    finally:
        data[:] = bytes(len(data))   # the PEM copy this library read; the key object keeps its own
    if not isinstance(key, mldsa.MLDSA65PrivateKey):
        raise AuditError(f"signing key file {os.fspath(p)!r} holds a {type(key).__name__}, not ML-DSA-65")
    return key


def resolve_signing_key(source: SigningKey | None, *, create: bool = False) -> mldsa.MLDSA65PrivateKey:
    """An ML-DSA-65 private key from what ``KVAuditLog(signing_key=...)`` was given.

    ``None``: a new key that is not kept anywhere.  A key object: itself.
    ``bytes``: its 32-byte seed.  A ``str`` or path: a key file, created first
    (``generate_signing_key_file``) when it does not exist and ``create`` is
    true, i.e. when the log is new.
    """
    try:
        if source is None:
            return mldsa.MLDSA65PrivateKey.generate()
        if isinstance(source, mldsa.MLDSA65PrivateKey):
            return source
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) != 32:
                raise ValueError(f"an ML-DSA-65 seed is 32 bytes, got {len(source)}")
            return mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes(source))
    except ValueError:
        raise
    except Exception as e:  # UnsupportedAlgorithm and friends from the backend
        raise PQCUnavailableError(f"ML-DSA-65 is not available: {e}") from None
    if isinstance(source, (str, os.PathLike)):
        if not _expand(source).exists():
            if create:
                return generate_signing_key_file(source)
            raise AuditError(f"signing key file {os.fspath(_expand(source))!r} does not exist, and the log "
                             "exists: continuing it needs the key it was written with")
        return load_signing_key_file(source)
    raise TypeError("signing_key must be an MLDSA65PrivateKey, a 32-byte seed or the path of a key file, "
                    f"got {type(source).__name__}")


def default_key_dir() -> Path:
    """``$PQC_KV_CACHE_KEY_DIR``, else ``$XDG_CONFIG_HOME/pqc_kv_cache/keys`` (``~/.config/...``)."""
    env = os.environ.get(KEY_DIR_ENV)
    if env:
        return _expand(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "pqc_kv_cache" / "keys"


def default_key_path(log_path: str | os.PathLike[str]) -> Path:
    """A key file for the log at ``log_path`` in ``default_key_dir()``, outside the log's folder.

    Named after the log's file name and a hash of its absolute path, so two
    logs of the same name in different folders get different keys.
    """
    absolute = os.path.abspath(os.path.expanduser(os.fspath(log_path)))
    tag = hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return default_key_dir() / f"{os.path.basename(absolute)}-{tag}.key"


def public_key_fingerprint_hex(key: mldsa.MLDSA65PrivateKey | mldsa.MLDSA65PublicKey) -> str:
    """SHA-256 of the raw public key, hex: the fingerprint the log's header holds."""
    pub = key.public_key() if isinstance(key, mldsa.MLDSA65PrivateKey) else key
    return hashlib.sha256(pub.public_bytes_raw()).hexdigest()
