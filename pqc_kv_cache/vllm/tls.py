"""Mutual TLS for the key service on TCP: one set of files, a server context and a client context.

Both sides pin one certificate authority (``ca``: only certificates it issued are accepted; the system's trust
store is never loaded), show their own certificate (``cert``) and hold its private key (``key``), and speak
TLS 1.3 only. The server requires a client certificate, so a peer without one, with one of another CA,
self-signed or expired, fails the handshake before the service reads a byte of its request; the client
checks that the server's certificate names the host it dialled.

The private key file follows the rules of ``pqc_kv_cache.secretfiles``: a regular file, not a link, that
neither group nor others may access (``TLSConfigError`` otherwise). The certificates are public.

Which key exchange TLS 1.3 negotiates is OpenSSL's default: OpenSSL 3.5 and later offer the hybrid
X25519MLKEM768 first; earlier releases only classical groups.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import KVCacheError
from ..secretfiles import read_secret_file

__all__ = ["MutualTLS", "TLSConfigError"]

_MAX_KEY_FILE = 64 * 1024


class TLSConfigError(KVCacheError):
    """A TLS file of the key service is missing, unreadable, loose (the private key) or not what it should be."""


@dataclass(frozen=True)
class MutualTLS:
    """The files of one side of a mutual-TLS connection (PEM): the pinned CA certificate, this side's
    certificate (chain) and its private key."""
    ca: str
    cert: str
    key: str

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"MutualTLS.{name} must be a non-empty path")

    @classmethod
    def from_config(cls, get: Callable[[str, Any], Any], prefix: str = "key_service_tls_") -> "MutualTLS | None":
        """The files named by ``<prefix>ca``, ``<prefix>cert`` and ``<prefix>key`` of a configuration read with
        ``get(name, default)`` (vLLM's ``get_from_extra_config``); None when none is set, ValueError when only
        some are."""
        values = {name: get(prefix + name, None) for name in ("ca", "cert", "key")}
        given = [n for n, v in values.items() if v]
        if not given:
            return None
        if len(given) != 3:
            missing = ", ".join(prefix + n for n in ("ca", "cert", "key") if n not in given)
            raise ValueError(f"mutual TLS needs a CA certificate, a certificate and its key: {missing} missing")
        return cls(**values)

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.3 server context that requires a client certificate issued by the pinned CA."""
        ctx = self._context(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A TLS 1.3 client context that accepts only a server certificate of the pinned CA naming the host."""
        return self._context(ssl.PROTOCOL_TLS_CLIENT)     # verifies the server and its host name by default

    def _context(self, protocol: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.options |= ssl.OP_NO_TICKET                   # no resumption tickets: every connection shows its cert
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"CA certificate {self.ca!r}: {_reason(e)}") from None
        # the key file is checked under the secret-file rules first; OpenSSL then loads it (a file swapped in
        # between must still match the certificate, which load_cert_chain checks)
        data = read_secret_file(self.key, _MAX_KEY_FILE, "TLS private key", TLSConfigError)
        data[:] = bytes(len(data))
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TLSConfigError(f"certificate {self.cert!r} with key {self.key!r}: {_reason(e)}") from None
        return ctx


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return type(e).__name__
