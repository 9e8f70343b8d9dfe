"""Envelope format v1: entry metadata, nonce layout, AAD layout, serialization.

Everything here is pure data and byte layout; no keys, no encryption. The same
layout is built by the CUDA kernels (``kernels/pqc_gcm.cuh``) from per-chunk
metadata, and documented byte by byte in the README, so that plain
``AESGCM(key).decrypt(nonce, ciphertext, entry.aad())`` opens any chunk.

Nonce (12 bytes, big-endian)::

    0   4  epoch   (uint32)
    4   8  counter (uint64)  -- per (session, epoch), starts at 1 and only increases

AAD (80 bytes, big-endian)::

    0   4  magic "PKVA"
    4   1  format version (1)
    5   1  kv_role: 0 both (K bytes then V bytes), 1 key only, 2 value only
    6   1  dtype code (see DTYPE_CODES; 0 = unknown / raw bytes)
    7   1  reserved, 0
    8  16  tenant tag  = SHA-256(b"pqc_kv_cache/tenant\\x00"  + tenant_id UTF-8)[:16]
    24 16  session tag = SHA-256(b"pqc_kv_cache/session\\x00" + session_id UTF-8)[:16]
    40  4  key epoch (uint32)
    44  4  layer index (uint32)
    48  8  position start (uint64)
    56  4  position count (uint32)
    60  4  K length in bytes (uint32; the plaintext is K bytes then V bytes)
    64  4  number of KV heads (uint32; 0 = unknown)
    68  4  head dimension (uint32; 0 = unknown)
    72  8  token id (int64; -1 = none)
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ._checks import check_int
from .errors import MalformedEntryError

__all__ = [
    "FORMAT_VERSION",
    "AAD_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "KV_ROLES",
    "DTYPE_CODES",
    "dtype_code",
    "tenant_tag",
    "session_tag",
    "make_nonce",
    "split_nonce",
    "build_aad",
    "EntryMetadata",
    "KVCacheEntry",
    "EncryptedEntry",
]

FORMAT_VERSION = 1
AAD_MAGIC = b"PKVA"
ENTRY_MAGIC = b"PKVE"
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_EPOCH = 0xFFFFFFFF
MAX_COUNTER = 0xFFFFFFFFFFFFFFFF

# kv_role string <-> code in the AAD
KV_ROLES = {"both": 0, "key": 1, "value": 2}
_KV_ROLE_NAMES = {v: k for k, v in KV_ROLES.items()}

# dtype name <-> code in the AAD (torch names without the "torch." prefix)
DTYPE_CODES = {
    "": 0,
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float64": 4,
    "uint8": 5,
    "int8": 6,
    "float8_e4m3fn": 7,
    "float8_e5m2": 8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}

# AAD v1, the one definition: (field, struct code, numpy code), in order, big-endian. The struct packs one
# AAD (build_aad), the numpy dtype a batch (the host backend); kernels/pqc_aad.cuh builds the same bytes
# on the device (a test compares the two).
AAD_V1_FIELDS = (("magic", "4s", "S4"), ("version", "B", ">u1"), ("role", "B", ">u1"), ("dtype", "B", ">u1"),
                 ("reserved", "x", "V1"), ("tenant_tag", "16s", "V16"), ("session_tag", "16s", "V16"),
                 ("epoch", "I", ">u4"), ("layer", "I", ">u4"), ("pos_start", "Q", ">u8"), ("pos_count", "I", ">u4"),
                 ("key_len", "I", ">u4"), ("num_heads", "I", ">u4"), ("head_dim", "I", ">u4"),
                 ("token_id", "q", ">i8"))
_AAD = struct.Struct(">" + "".join(f[1] for f in AAD_V1_FIELDS))
AAD_V1_DTYPE = np.dtype([(f[0], f[2]) for f in AAD_V1_FIELDS])
AAD_SIZE = _AAD.size
assert AAD_SIZE == AAD_V1_DTYPE.itemsize == 80
_NONCE = struct.Struct(">IQ")


def dtype_code(dtype: Any) -> int:
    """AAD code of a dtype given as a torch dtype, a numpy dtype or a name ('' = unknown)."""
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    try:
        return DTYPE_CODES[name]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no envelope v1 code; known: {sorted(n for n in DTYPE_CODES if n)}") from None


@lru_cache(maxsize=4096)
def tenant_tag(tenant_id: str) -> bytes:
    """16-byte tag of a tenant id, as bound into the AAD."""
    return hashlib.sha256(b"pqc_kv_cache/tenant\x00" + tenant_id.encode("utf-8")).digest()[:16]


@lru_cache(maxsize=4096)
def session_tag(session_id: str) -> bytes:
    """16-byte tag of a session id, as bound into the AAD."""
    return hashlib.sha256(b"pqc_kv_cache/session\x00" + session_id.encode("utf-8")).digest()[:16]


def make_nonce(epoch: int, counter: int) -> bytes:
    """96-bit nonce: epoch (32 bits) then counter (64 bits), big-endian."""
    return _NONCE.pack(check_int("epoch", epoch, 0, MAX_EPOCH), check_int("counter", counter, 0, MAX_COUNTER))


def split_nonce(nonce: bytes) -> tuple[int, int]:
    """(epoch, counter) of a 12-byte nonce."""
    if len(nonce) != NONCE_SIZE:
        raise MalformedEntryError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return _NONCE.unpack(nonce)


def build_aad(*, tenant_id: str, session_id: str, epoch: int, layer_idx: int,
              position: int, position_count: int, key_len: int, kv_role: str = "both",
              dtype: str = "", num_heads: int = 0, head_dim: int = 0, token_id: int = -1) -> bytes:
    """The 80-byte AAD v1 of one chunk (see the module docstring for the layout)."""
    ints = [check_int(name, value, lo, hi) for name, value, lo, hi in (
        ("epoch", epoch, 0, MAX_EPOCH), ("layer_idx", layer_idx, 0, 0xFFFFFFFF),
        ("position", position, 0, MAX_COUNTER), ("position_count", position_count, 0, 0xFFFFFFFF),
        ("key_len", key_len, 0, 0xFFFFFFFF), ("num_heads", num_heads, 0, 0xFFFFFFFF),
        ("head_dim", head_dim, 0, 0xFFFFFFFF), ("token_id", token_id, -(1 << 63), (1 << 63) - 1))]
    epoch, layer_idx, position, position_count, key_len, num_heads, head_dim, token_id = ints
    if not isinstance(tenant_id, str) or not isinstance(session_id, str):
        raise TypeError("tenant_id and session_id must be str")
    try:
        return _AAD.pack(AAD_MAGIC, FORMAT_VERSION, KV_ROLES[kv_role], dtype_code(dtype),
                         tenant_tag(tenant_id), session_tag(session_id), epoch, layer_idx,
                         position, position_count, key_len, num_heads, head_dim, token_id)
    except UnicodeEncodeError:
        raise ValueError("tenant_id and session_id must be valid Unicode text (no lone surrogates)") from None
    except (struct.error, KeyError) as exc:
        raise ValueError(f"AAD field out of range: {exc}") from None


def _check_id(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be valid Unicode text (no lone surrogates), got {value!r}") from None


_ENTRY_INT_FIELDS = ("key_len", "sequence_number", "epoch", "num_heads", "head_dim", "format_version")


@dataclass(frozen=True, slots=True)
class EntryMetadata:
    """Where a chunk of K/V belongs: tenant, session, layer and position range.

    ``position`` is the first position, ``position_count`` how many positions the
    chunk covers. ``kv_role`` is "both" (K bytes then V bytes), "key" or "value".
    ``to_dict()`` holds the six fields before ``position_count``; an
    EncryptedEntry's dict carries ``position_count`` beside it.
    """

    tenant_id: str
    session_id: str
    layer_idx: int
    position: int
    token_id: int = -1
    kv_role: str = "both"
    position_count: int = 1

    def __post_init__(self):
        _check_id("tenant_id", self.tenant_id)
        _check_id("session_id", self.session_id)
        # integer fields are stored as plain ints (numpy and torch integer scalars are converted)
        for name, lo, hi in (("layer_idx", 0, 0xFFFFFFFF), ("position", 0, 0xFFFFFFFFFFFFFFFF),
                             ("token_id", -(1 << 63), (1 << 63) - 1), ("position_count", 1, 0xFFFFFFFF)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), lo, hi))
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {sorted(KV_ROLES)}, got {self.kv_role!r}")

    @property
    def positions(self) -> range:
        return range(self.position, self.position + self.position_count)

    def to_dict(self) -> dict:
        """``tenant_id, session_id, layer_idx, position, token_id, kv_role``."""
        return {"tenant_id": self.tenant_id, "session_id": self.session_id,
                "layer_idx": self.layer_idx, "position": self.position,
                "token_id": self.token_id, "kv_role": self.kv_role}


@dataclass(slots=True, repr=False)
class KVCacheEntry:
    """Plaintext K and V bytes of one chunk, with its metadata. Its repr shows sizes, never the bytes."""

    metadata: EntryMetadata
    key_tensor_bytes: bytes
    value_tensor_bytes: bytes

    def plaintext_size(self) -> int:
        """``len(key_tensor_bytes) + len(value_tensor_bytes)``."""
        return len(self.key_tensor_bytes) + len(self.value_tensor_bytes)

    def __repr__(self) -> str:
        return (f"KVCacheEntry(metadata={self.metadata!r}, key_tensor_bytes=<{len(self.key_tensor_bytes)} bytes>, "
                f"value_tensor_bytes=<{len(self.value_tensor_bytes)} bytes>)")


@dataclass
class EncryptedEntry:
    """One encrypted chunk in envelope v1.

    ``nonce`` and ``ciphertext`` (AES-256-GCM ciphertext followed by the
    16-byte tag) are lowercase hex strings, as PQC KV Cache Encryption 0.1.0
    kept them: given (or assigned) as bytes or hex, they are stored as hex;
    ``nonce_bytes`` / ``ciphertext_bytes`` are the raw bytes. ``key_len`` is
    the length of the K part of the plaintext. ``dtype``, ``num_heads`` and
    ``head_dim`` describe the tensors where known (bound into the AAD).
    ``sequence_number`` equals the nonce counter; an entry whose nonce is not
    (epoch, sequence_number) is well-formed but never opens (DecryptionError).
    """

    metadata: EntryMetadata
    nonce: str
    ciphertext: str
    key_len: int
    sequence_number: int
    epoch: int = 0
    dtype: str = ""
    num_heads: int = 0
    head_dim: int = 0
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self):
        for name in _ENTRY_INT_FIELDS:   # numpy / torch integer scalars become ints; anything else is left to validate()
            v = getattr(self, name)
            if type(v) is not int:
                try:
                    setattr(self, name, check_int(name, v))
                except TypeError:
                    pass

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HEX_FIELDS:   # one stored form, whatever form the caller has
            value = _as_hex(name, value)
        object.__setattr__(self, name, value)

    @property
    def nonce_bytes(self) -> bytes:
        """The 12-byte nonce (``nonce`` is its hex)."""
        return _from_hex("nonce", self.nonce)

    @property
    def ciphertext_bytes(self) -> bytes:
        """Ciphertext then the 16-byte tag (``ciphertext`` is their hex)."""
        return _from_hex("ciphertext", self.ciphertext)

    @property
    def tag(self) -> bytes:
        return self.ciphertext_bytes[-TAG_SIZE:]

    @property
    def plaintext_size(self) -> int:
        return _hex_len(self.ciphertext) - TAG_SIZE

    def aad(self) -> bytes:
        """The AAD v1 this entry was sealed with."""
        m = self.metadata
        return build_aad(tenant_id=m.tenant_id, session_id=m.session_id, epoch=self.epoch,
                         layer_idx=m.layer_idx, position=m.position,
                         position_count=m.position_count, key_len=self.key_len,
                         kv_role=m.kv_role, dtype=self.dtype, num_heads=self.num_heads,
                         head_dim=self.head_dim, token_id=m.token_id)

    def nonce_matches(self) -> bool:
        """Whether the nonce is the (epoch, sequence_number) this project seals under."""
        return self.nonce_bytes == make_nonce(self.epoch, self.sequence_number)

    def validate(self) -> "EncryptedEntry":
        """Check types, lengths and ranges; raise MalformedEntryError naming the fault.

        Whether the nonce matches (epoch, sequence_number) is left to decryption
        (``nonce_matches``): such an entry is well-formed, it just never opens.
        """
        if not isinstance(self.metadata, EntryMetadata):
            raise MalformedEntryError(f"metadata must be an EntryMetadata, got {type(self.metadata).__name__}")
        for name in _ENTRY_INT_FIELDS:
            try:
                setattr(self, name, check_int(name, getattr(self, name)))
            except TypeError as e:
                raise MalformedEntryError(str(e)) from None
        if not isinstance(self.dtype, str):
            raise MalformedEntryError("dtype must be a str")
        try:
            too_long = (len(self.metadata.tenant_id.encode("utf-8")) > 0xFFFF
                        or len(self.metadata.session_id.encode("utf-8")) > 0xFFFF)
        except UnicodeEncodeError:
            raise MalformedEntryError("tenant_id and session_id must be valid Unicode text (no lone surrogates)") from None
        if too_long:
            raise MalformedEntryError("tenant_id and session_id must each fit in 65535 UTF-8 bytes")
        if self.format_version != FORMAT_VERSION:
            raise MalformedEntryError(f"unsupported envelope version {self.format_version}")
        if not isinstance(self.nonce, str) or _hex_len(self.nonce) != NONCE_SIZE:
            raise MalformedEntryError(f"nonce must be {NONCE_SIZE} bytes")
        if not isinstance(self.ciphertext, str) or _hex_len(self.ciphertext) < TAG_SIZE:
            raise MalformedEntryError(f"ciphertext must hold at least the {TAG_SIZE}-byte tag")
        for name, hi in (("epoch", MAX_EPOCH), ("sequence_number", MAX_COUNTER)):
            v = getattr(self, name)
            if not 0 <= v <= hi:
                raise MalformedEntryError(f"{name} out of range: {v}")
        if not 0 <= self.key_len <= self.plaintext_size:
            raise MalformedEntryError(f"key_len {self.key_len} exceeds plaintext size {self.plaintext_size}")
        if self.dtype not in DTYPE_CODES:
            raise MalformedEntryError(f"unknown dtype {self.dtype!r}")
        for name in ("num_heads", "head_dim"):
            v = getattr(self, name)
            if not 0 <= v <= 0xFFFFFFFF:
                raise MalformedEntryError(f"{name} out of range: {v}")
        return self

    # ---- compact binary form -------------------------------------------------
    # magic "PKVE" | version u8 | kv_role u8 | dtype u8 | reserved u8 |
    # epoch u32 | counter u64 | layer u32 | position u64 | position_count u32 |
    # token_id i64 | key_len u32 | num_heads u32 | head_dim u32 |
    # tenant_id_len u16 | session_id_len u16 | ct_len u32 |
    # nonce 12 | tenant_id | session_id | ciphertext‖tag
    _HEAD = struct.Struct(">4sBBBxIQIQIqIIIHHI12s")

    def to_bytes(self) -> bytes:
        self.validate()
        m = self.metadata
        tid = m.tenant_id.encode("utf-8")
        sid = m.session_id.encode("utf-8")
        head = self._HEAD.pack(ENTRY_MAGIC, self.format_version, KV_ROLES[m.kv_role],
                               DTYPE_CODES[self.dtype], self.epoch, self.sequence_number,
                               m.layer_idx, m.position, m.position_count, m.token_id,
                               self.key_len, self.num_heads, self.head_dim, len(tid), len(sid),
                               _hex_len(self.ciphertext), self.nonce_bytes)
        return head + tid + sid + self.ciphertext_bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> "EncryptedEntry":
        """Parse :meth:`to_bytes` output; any malformation raises MalformedEntryError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedEntryError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        h = cls._HEAD
        if len(data) < h.size:
            raise MalformedEntryError(f"entry truncated: {len(data)} bytes, header needs {h.size}")
        (magic, version, role, dcode, epoch, counter, layer, position, count, token_id,
         key_len, num_heads, head_dim, tlen, slen, ctlen, nonce) = h.unpack_from(data)
        if magic != ENTRY_MAGIC:
            raise MalformedEntryError("not an encrypted entry (bad magic)")
        if version != FORMAT_VERSION:
            raise MalformedEntryError(f"unsupported envelope version {version}")
        if role not in _KV_ROLE_NAMES:
            raise MalformedEntryError(f"unknown kv_role code {role}")
        if dcode not in _DTYPE_NAMES:
            raise MalformedEntryError(f"unknown dtype code {dcode}")
        expected = h.size + tlen + slen + ctlen
        if len(data) != expected:
            raise MalformedEntryError(f"entry length {len(data)} does not match its header ({expected})")
        off = h.size
        try:
            tenant_id = data[off:off + tlen].decode("utf-8")
            session_id = data[off + tlen:off + tlen + slen].decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEntryError("tenant or session id is not UTF-8") from None
        ct = data[off + tlen + slen:]
        try:
            meta = EntryMetadata(tenant_id, session_id, layer, position, token_id,
                                 _KV_ROLE_NAMES[role], count)
        except (ValueError, TypeError) as exc:
            raise MalformedEntryError(f"bad metadata: {exc}") from None
        return cls(meta, nonce, ct, key_len, counter, epoch, _DTYPE_NAMES[dcode],
                   num_heads, head_dim, version).validate()

    # ---- hex JSON form (field names of PQC KV Cache Encryption 0.1.0) -------------------
    def to_dict(self) -> dict:
        self.validate()
        return {"metadata": self.metadata.to_dict(), "nonce": self.nonce,
                "ciphertext": self.ciphertext, "key_len": self.key_len,
                "sequence_number": self.sequence_number,
                "position_count": self.metadata.position_count, "epoch": self.epoch,
                "dtype": self.dtype, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "format_version": self.format_version}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "EncryptedEntry":
        """Parse :meth:`to_dict` output; any malformation raises MalformedEntryError.

        ``position_count`` is read beside ``metadata`` or inside it (both forms
        were written); absent, it is 1.
        """
        if not isinstance(d, dict):
            raise MalformedEntryError(f"expected a dict, got {type(d).__name__}")
        try:
            md = d["metadata"]
            if not isinstance(md, dict):
                raise MalformedEntryError("metadata must be a dict")
            count = _typed(md, "position_count", int, None) if "position_count" in md else \
                _typed(d, "position_count", int, 1)
            meta = EntryMetadata(
                tenant_id=_typed(md, "tenant_id", str), session_id=_typed(md, "session_id", str),
                layer_idx=_typed(md, "layer_idx", int), position=_typed(md, "position", int),
                token_id=_typed(md, "token_id", int, -1), kv_role=_typed(md, "kv_role", str, "both"),
                position_count=count)
            nonce = _unhex(d, "nonce")
            ct = _unhex(d, "ciphertext")
            entry = cls(meta, nonce, ct, _typed(d, "key_len", int),
                        _typed(d, "sequence_number", int), _typed(d, "epoch", int, 0),
                        _typed(d, "dtype", str, ""), _typed(d, "num_heads", int, 0),
                        _typed(d, "head_dim", int, 0), _typed(d, "format_version", int, FORMAT_VERSION))
        except KeyError as exc:
            raise MalformedEntryError(f"missing field {exc}") from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise MalformedEntryError(f"bad field: {exc}") from None
        return entry.validate()

    @classmethod
    def from_json(cls, text: str | bytes) -> "EncryptedEntry":
        try:
            d = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise MalformedEntryError(f"not JSON: {exc}") from None
        return cls.from_dict(d)


_HEX_FIELDS = ("nonce", "ciphertext")


def _as_hex(name: str, value: Any) -> Any:
    """Bytes or a hex str as lowercase hex; any other type is kept for validate() to refuse."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, str):
        try:
            return bytes.fromhex(value).hex()   # validated and normalised (lowercase, no spaces)
        except ValueError:
            raise MalformedEntryError(f"{name} is a str but not valid hex") from None
    return value


def _from_hex(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise MalformedEntryError(f"{name} must be bytes or a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedEntryError(f"{name} is not valid hex") from None


def _hex_len(value: str) -> int:
    return len(value) // 2


def _typed(d: dict, key: str, typ: type, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise KeyError(key)
        return default
    v = d[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise MalformedEntryError(f"{key} must be an integer")
    if typ is str and not isinstance(v, str):
        raise MalformedEntryError(f"{key} must be a string")
    return v


def _unhex(d: dict, key: str) -> bytes:
    v = d[key]
    if not isinstance(v, str):
        raise MalformedEntryError(f"{key} must be a hex string")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise MalformedEntryError(f"{key} is not valid hex") from None
