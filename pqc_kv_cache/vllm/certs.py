"""Certificates for the key service's mutual TLS: a private CA, a server certificate for the key service's
hosts and a client certificate per worker host, made with ``cryptography`` (ECDSA P-256, SHA-256).

For operators without a PKI of their own, and for tests. Every file is created new and never overwritten;
private keys are written under the rules of ``pqc_kv_cache.secretfiles`` (mode 0600, parents 0700). Keep
``ca.key`` offline once the certificates are made: whoever holds it can issue a client certificate the key
service accepts. Run::

    python -m pqc_kv_cache.vllm.certs DIR --hosts keys.example.internal 10.0.0.5 --clients worker-1 worker-2

which writes ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` and ``<client>.pem``, ``<client>.key``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..secretfiles import create_secret_file, expand
from .tls import MutualTLS, TLSConfigError

__all__ = ["new_ca", "issue", "write_pair", "make_certificates", "main"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _builder(subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey,
             not_before: datetime.datetime, days: float) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_before + datetime.timedelta(days=days)))


def new_ca(common_name: str = "pqc_kv_cache key service CA", *, days: float = 3650) -> Pair:
    """A new self-signed CA certificate (may sign end certificates only) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, None, key, _now() - datetime.timedelta(minutes=5), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: Pair, name: str, *, hosts: tuple[str, ...] = (), client: bool = False, days: float = 825,
          not_before: datetime.datetime | None = None) -> Pair:
    """An end certificate signed by ``ca``: a server certificate naming ``hosts`` (DNS names or IP
    addresses), or with ``client`` a client certificate of common name ``name``."""
    if client == bool(hosts):
        raise ValueError("a server certificate names its hosts; a client certificate names none")
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    b = (_builder(name, ca_cert.subject, key, start, days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if hosts:
        b = b.add_extension(x509.SubjectAlternativeName([_host(h) for h in hosts]), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _host(h: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(h))
    except ValueError:
        if not h or not re.fullmatch(r"[A-Za-z0-9.-]+", h):
            raise ValueError(f"{h!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(h)


def write_pair(directory: str | os.PathLike[str], stem: str, pair: Pair) -> tuple[str, str]:
    """Write ``<stem>.pem`` (the certificate) and ``<stem>.key`` (its unencrypted private key, mode 0600) into
    ``directory``; neither may exist (TLSConfigError). Returns their paths."""
    if not _NAME.fullmatch(stem):
        raise ValueError(f"{stem!r} is not a usable file name (letters, digits, '.', '_', '-')")
    cert, key = pair
    d = expand(directory)
    cert_path, key_path = str(d / f"{stem}.pem"), str(d / f"{stem}.key")
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    create_secret_file(key_path, pem_key, "TLS private key", TLSConfigError)
    try:
        fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        os.unlink(key_path)          # a key without its certificate would be refused next time as existing
        raise TLSConfigError(f"certificate {cert_path!r}: {e.strerror}; it is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_certificates(directory: str | os.PathLike[str], hosts: list[str] | tuple[str, ...],
                      clients: list[str] | tuple[str, ...] = ("worker",), *, days: float = 825
                      ) -> tuple[MutualTLS, dict[str, MutualTLS]]:
    """A new CA in ``directory``, a server certificate for ``hosts`` and one client certificate per name in
    ``clients``. Returns the key service's files and each client's."""
    if not hosts:
        raise ValueError("name at least one host the key service is reached at")
    if len(set(clients)) != len(clients) or {"ca", "server"} & set(clients):
        raise ValueError("client names must be distinct and not 'ca' or 'server'")
    for h in hosts:
        _host(h)
    for c in clients:                    # checked before anything is written, so a bad name leaves no files
        if not _NAME.fullmatch(c):
            raise ValueError(f"{c!r} is not a usable client name (letters, digits, '.', '_', '-')")
    ca = new_ca()
    ca_pem, _ = write_pair(directory, "ca", ca)
    server = MutualTLS(ca_pem, *write_pair(directory, "server", issue(ca, hosts[0], hosts=tuple(hosts), days=days)))
    out = {c: MutualTLS(ca_pem, *write_pair(directory, c, issue(ca, c, client=True, days=days))) for c in clients}
    return server, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pqc_kv_cache.vllm.certs", description=__doc__.split("\n")[0])
    ap.add_argument("directory", help="where the files are written (created with mode 0700; none may exist)")
    ap.add_argument("--hosts", nargs="+", required=True, help="DNS names and IP addresses of the key service")
    ap.add_argument("--clients", nargs="+", default=["worker"], help="one client certificate per name")
    ap.add_argument("--days", type=float, default=825, help="validity of the server and client certificates")
    args = ap.parse_args(argv)
    try:
        server, clients = make_certificates(args.directory, args.hosts, args.clients, days=args.days)
    except (ValueError, TLSConfigError) as e:
        ap.exit(2, f"{ap.prog}: {e}\n")
    print(f"key service: --tls-ca {server.ca} --tls-cert {server.cert} --tls-key {server.key}")
    for name, c in clients.items():
        print(f"{name}: key_service_tls_ca={c.ca} key_service_tls_cert={c.cert} key_service_tls_key={c.key}")


if __name__ == "__main__":
    main()
