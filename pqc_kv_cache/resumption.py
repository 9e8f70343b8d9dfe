"""Sessions that outlive their process: a sealed export under a server key, and a rebuild from the tenant's key.

Two ways to have, in a new process, a session that opens the save files and
exports of one that is gone:

* ``export_session(session, kek_file)`` seals the session's whole state (ids,
  KEM ciphertext, current chain value, the keys of its live epochs, branch
  points, counter, expiry) under a *session key-encryption key* (KEK) kept in a
  file; ``import_session(blob, kek_file)`` opens it in any process that can read
  that file. Whoever holds the KEK file and an export holds that session's
  keys: keep the file like the audit signing key (``audit/keys.py``): created
  with mode 0600 and never overwritten (``generate_kek_file``), refused when
  group or others may access it, and kept away from where the exports are
  stored. An export keeps the keys live at export time: retiring an epoch
  later does not erase it from the export; delete the export for that.
* ``resume_session(keypair, tenant_id, session_id, kem_ciphertext)``: the
  tenant re-supplies its ML-KEM-768 private key (``TenantKeyPair``); the session
  is rebuilt from the shared secret it decapsulates, standing at epoch 0. It
  learns later epochs (and their branch points) from the save files it loads.
  The server keeps nothing from which the session could be rebuilt.

Neither kind of session owns an epoch: an export can be imported any number of
times, and a tenant can resume as often as it likes, while the original session
may still be sealing. Its first seal or rotation therefore opens a branch epoch
under 16 fresh random bytes (``keyschedule.py``), whose key no other session
derives, so no (key, nonce) pair sealed before is ever used again.

Export format (little-endian): magic ``b"PKVS"``, version u16 (1), reserved u16,
a 32-byte random salt, the body length u32, then the AES-256-GCM ciphertext
and tag of the body under ``HKDF-SHA-256(KEK, salt, info="pqc_kv_cache/v1/session-export")``
with a zero nonce (the key is used once) and the 44-byte header as AAD.
"""

from __future__ import annotations

import os
import struct

from .errors import SessionExportError
from .keyschedule import wipe
from .secretfiles import create_secret_file, expand, read_secret_file
from .session import DEFAULT_MAX_ENTRIES_PER_EPOCH, DEFAULT_TTL_SECONDS, SessionState, TenantSession
from .tenant import TenantKeyPair, check_tenant_id

__all__ = ["generate_kek_file", "load_kek_file", "export_session", "import_session", "resume_session",
           "KEK_FILE_SIZE", "MAX_EXPORT_SIZE"]

_KEK_MAGIC = b"PKVK\x01"
KEK_SIZE = 32
#: A key file: magic ``b"PKVK\\x01"`` and the 32 key bytes.
KEK_FILE_SIZE = len(_KEK_MAGIC) + KEK_SIZE
_MAGIC = b"PKVS"
_VERSION = 1
_HEAD = struct.Struct("<4sHH32sI")
_INFO = b"pqc_kv_cache/v1/session-export"
_TAG = 16
#: Largest export ``import_session`` reads (a bound on what a changed length field can make it allocate).
MAX_EXPORT_SIZE = 1 << 22


# ---- the key file ----------------------------------------------------------------------------------------
def generate_kek_file(path: str | os.PathLike[str]) -> None:
    """Create a new 32-byte session key-encryption key in ``path`` (mode 0600; missing parent directories
    are created with mode 0700). An existing file is never overwritten (SessionExportError): the exports
    sealed under it would be lost."""
    key = bytearray(os.urandom(KEK_SIZE))
    body = bytearray(_KEK_MAGIC) + key
    try:
        create_secret_file(path, body, "key file", SessionExportError)
    finally:
        wipe(key)
        wipe(body)


def load_kek_file(path: str | os.PathLike[str]) -> bytearray:
    """The key of a file written by ``generate_kek_file`` (wipe it after use). SessionExportError for a
    missing file, one that group or others may access (POSIX), or one that is not such a key file."""
    data = read_secret_file(path, 2 * KEK_FILE_SIZE, "key file", SessionExportError)   # longer: not one
    try:
        if len(data) != KEK_FILE_SIZE or bytes(data[:len(_KEK_MAGIC)]) != _KEK_MAGIC:
            raise SessionExportError(f"{os.fspath(expand(path))!r} is not a session key-encryption key file")
        return bytearray(data[len(_KEK_MAGIC):KEK_FILE_SIZE])
    finally:
        wipe(data)


def _blob_cipher(kek_path, salt: bytes):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    kek = load_kek_file(kek_path)
    try:
        return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(bytes(kek)))
    finally:
        wipe(kek)


# ---- the body --------------------------------------------------------------------------------------------
def _text(out: bytearray, s: str) -> None:
    b = s.encode("utf-8")
    out += struct.pack("<I", len(b)) + b


def _pack(st: SessionState) -> bytearray:
    out = bytearray()
    for s in (st.tenant_id, st.display_name, st.session_id):
        _text(out, s)
    pk = st.public_key or b""
    out += struct.pack("<I", len(pk)) + pk
    out += struct.pack("<I", len(st.kem_ciphertext)) + st.kem_ciphertext
    out += struct.pack("<IQ", st.epoch, st.next_sequence - 1) + st.chain
    out += struct.pack("<I", len(st.keys))
    for e, key in sorted(st.keys.items()):
        out += struct.pack("<I", e) + key
    out += struct.pack("<I", len(st.branches))
    for e, b in sorted(st.branches.items()):
        out += struct.pack("<I", e) + b
    out += struct.pack("<ddQ", st.expires_at_wall, st.ttl_seconds, st.max_entries_per_epoch)
    return out


class _Reader:
    def __init__(self, buf: bytearray):
        self.buf, self.at = buf, 0

    def take(self, n: int) -> bytearray:
        if n < 0 or self.at + n > len(self.buf):
            raise SessionExportError("session export body is malformed")
        out = self.buf[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def text(self) -> str:
        try:
            return bytes(self.take(self.unpack("<I")[0])).decode("utf-8")
        except UnicodeDecodeError:
            raise SessionExportError("session export body is malformed") from None


def _unpack(body: bytearray) -> SessionState:
    r = _Reader(body)
    tenant_id, display_name, session_id = r.text(), r.text(), r.text()
    pk = bytes(r.take(r.unpack("<I")[0])) or None
    kem = bytes(r.take(r.unpack("<I")[0]))
    epoch, used = r.unpack("<IQ")
    chain = r.take(32)
    keys = {}
    for _ in range(r.unpack("<I")[0]):
        e = r.unpack("<I")[0]
        keys[e] = r.take(32)
    branches = {}
    for _ in range(r.unpack("<I")[0]):
        e = r.unpack("<I")[0]
        branches[e] = bytes(r.take(16))
    expires, ttl, cap = r.unpack("<ddQ")
    if r.at != len(body):
        raise SessionExportError("session export body is malformed")
    return SessionState(tenant_id, display_name, pk, session_id, kem, epoch, used + 1, chain, keys, branches,
                        expires, ttl, cap)


# ---- export and import ---------------------------------------------------------------------------------
def export_session(session: TenantSession, kek_file: str | os.PathLike[str]) -> bytes:
    """The session's state sealed under the key of ``kek_file`` (see the module docstring). The session is
    unchanged and goes on as before; SessionExpiredError for a closed or expired one."""
    if not isinstance(session, TenantSession):
        raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")
    salt = os.urandom(32)
    cipher = _blob_cipher(kek_file, salt)
    state = session.export_state()
    body = _pack(state)
    try:
        head = _HEAD.pack(_MAGIC, _VERSION, 0, salt, len(body))
        return head + cipher.encrypt(bytes(12), bytes(body), head)
    finally:
        state.wipe()
        wipe(body)


def import_session(blob: bytes, kek_file: str | os.PathLike[str], *, clock=None) -> TenantSession:
    """A session rebuilt from ``export_session``'s bytes, in any process that can read ``kek_file``. It owns
    no epoch (its first seal opens a branch epoch of its own) and expires when the exported session did.

    SessionExportError for bytes that are truncated, changed, of another format or sealed under another
    key; SessionExpiredError when the session has expired since."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > MAX_EXPORT_SIZE:
        raise SessionExportError(f"a session export is at most {MAX_EXPORT_SIZE} bytes, got {len(blob)}")
    if len(blob) < _HEAD.size + _TAG:
        raise SessionExportError("session export is truncated")
    magic, version, _, salt, n = _HEAD.unpack_from(blob)
    if magic != _MAGIC:
        raise SessionExportError("not a pqc_kv_cache session export (bad magic)")
    if version != _VERSION:
        raise SessionExportError(f"session export version {version} is not supported (this library reads {_VERSION})")
    if _HEAD.size + n + _TAG != len(blob):
        raise SessionExportError("session export is truncated or extended")
    from cryptography.exceptions import InvalidTag
    cipher = _blob_cipher(kek_file, salt)
    body = bytearray(n)
    try:
        try:
            cipher.decrypt_into(bytes(12), blob[_HEAD.size:], blob[:_HEAD.size], body)
        except InvalidTag:
            raise SessionExportError("session export does not verify under this key file (another key, "
                                     "or changed bytes)") from None
        state = _unpack(body)
    finally:
        wipe(body)
    try:
        check_tenant_id(state.tenant_id)
        return TenantSession.from_state(state, clock=clock)
    except (TypeError, ValueError) as exc:
        raise SessionExportError(f"session export holds an invalid session: {exc}") from None
    finally:
        state.wipe()


def resume_session(keypair: TenantKeyPair, tenant_id: str, session_id: str, kem_ciphertext: bytes, *,
                   ttl_seconds: float = DEFAULT_TTL_SECONDS, clock=None,
                   max_entries_per_epoch: int = DEFAULT_MAX_ENTRIES_PER_EPOCH) -> TenantSession:
    """The session ``session_id`` of ``tenant_id`` rebuilt from the tenant's key pair and the session's KEM
    ciphertext, standing at epoch 0 and owning no epoch (see the module docstring); a fresh time to live."""
    if not isinstance(keypair, TenantKeyPair):
        raise TypeError(f"keypair must be a TenantKeyPair, got {type(keypair).__name__}")
    tenant_id = check_tenant_id(tenant_id)
    if keypair.tenant_id is not None and keypair.tenant_id != tenant_id:
        raise ValueError(f"this key pair is tenant {keypair.tenant_id!r}'s, not {tenant_id!r}'s")
    ss = keypair.shared_secret(kem_ciphertext)
    try:
        tenant = keypair.identity(tenant_id)
        return TenantSession(tenant_id, session_id, ss, bytes(kem_ciphertext), ttl_seconds, clock,
                             max_entries_per_epoch, tenant=tenant)
    finally:
        wipe(ss)
