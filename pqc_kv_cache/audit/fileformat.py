"""The audit log file format (version 2, read back to version 1): constants, frame layouts, signed messages.

One definition shared by the writer (sink.py) and the reader (verify.py); the
format itself is documented in docs/audit.md and in sink.py.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from ..errors import AuditError
from .records import RECORD_SIZE

__all__ = [
    "MAGIC", "VERSION", "VERSIONS", "HASH_SHA256", "SIG_MLDSA65", "HEADER", "FRAME_HEAD", "RECS_HEAD", "CKPT_HEAD",
    "CKPT2_HEAD", "TABL_ENTRY", "DETL_ENTRY", "RCVR_BODY", "REOP_HEAD", "SEAL_MAGIC", "OPEN_SEAL_MAGIC", "SEAL_HEAD",
    "FRAME_TYPES", "LOCATOR_SIZE", "record_locators", "checkpoint_message", "checkpoint_message_v2",
    "reopen_message", "seal_message", "public_key_fingerprint", "load_public_key", "pub_path", "seal_path",
    "MAX_SEAL_SIZE", "MAX_PUBLIC_KEY_FILE", "read_bounded",
]

MAGIC = b"PQCAUDIT"
VERSION = 2           # version 1: checkpoints sign the chain head only (still read and continued)
VERSIONS = (1, 2)
HASH_SHA256 = 1
SIG_MLDSA65 = 1
# magic, version, record size, hash alg, signature alg, reserved, file id, key fingerprint
HEADER = struct.Struct("<8sHHBBH16s32s")
assert HEADER.size == 64
FRAME_HEAD = struct.Struct("<4sI")
RECS_HEAD = struct.Struct("<QII")          # first record number, count, reserved
CKPT_HEAD = struct.Struct("<QQQ32sH")      # next record number, frame index, wall ns, head, sig length
# version 2 adds: frames and records since the previous signed frame (their chain hashes and locators follow)
CKPT2_HEAD = struct.Struct("<QQQ32sHII")
TABL_ENTRY = struct.Struct("<BIIH")        # kind (1 tenant, 2 session), index, tenant index, text length
DETL_ENTRY = struct.Struct("<QI")          # record number, text length
RCVR_BODY = struct.Struct("<QQQ")          # torn bytes dropped, unsigned records kept, wall ns
REOP_HEAD = struct.Struct("<QQQQ32sH")    # closed length, next record number, frame index, wall ns, head, sig len
SEAL_MAGIC = b"PQCSEAL1"
OPEN_SEAL_MAGIC = b"PQCSEALR"    # the seal a re-open writes: the log goes on past its REOP frame
SEAL_HEAD = struct.Struct("<8s16sQQQ32sH")  # magic, file id, file length, records, frames, head, sig len
FRAME_TYPES = (b"RECS", b"TABL", b"DETL", b"CKPT", b"CLOS", b"RCVR", b"REOP")
MAX_SEAL_SIZE = SEAL_HEAD.size + 0xFFFF    # the header and the longest signature its u16 length can announce
MAX_PUBLIC_KEY_FILE = 64 * 1024            # a PEM ML-DSA-65 public key is about 2.7 KB, the raw key 1952 bytes
LOCATOR_SIZE = 8

_CKPT_DOMAIN = b"PQCAUDIT-CKPT-v1"
_CKPT2_DOMAIN = b"PQCAUDIT-CKPT-v2"
_SEAL_DOMAIN = b"PQCAUDIT-SEAL-v1"
_OPEN_SEAL_DOMAIN = b"PQCAUDIT-SEAL-REOPEN-v1"
_REOP_DOMAIN = b"PQCAUDIT-REOP-v1"
_MIX_PRIME = np.uint64(0x9E3779B97F4A7C15)
# word j of a record is weighted by the odd constant (2j+1) * 0x9E3779B97F4A7C15 mod 2^64
_LOCATOR_WEIGHTS = (np.arange(1, 16, 2, dtype=np.uint64) * _MIX_PRIME).astype(np.uint64)


def pub_path(path: str) -> str:
    return os.fspath(path) + ".pub"


def seal_path(path: str) -> str:
    return os.fspath(path) + ".seal"


def record_locators(recs: np.ndarray) -> np.ndarray:
    """One u64 per record: sum of its eight 64-bit words times odd constants (mod 2^64), then mixed.

    Vectorised (one integer matrix-vector product).  Any change confined to
    one word of a record changes its locator (the constants are odd, the final
    mix is a bijection).  Not a MAC: the frame hash chain and the signatures
    protect against a forger; the locator only names the changed record.
    """
    w = np.ascontiguousarray(recs).view(np.uint64).reshape(len(recs), RECORD_SIZE // 8)
    h = w @ _LOCATOR_WEIGHTS
    h ^= h >> np.uint64(29)
    h *= _MIX_PRIME
    h ^= h >> np.uint64(32)
    return h


def checkpoint_message(file_id: bytes, ftype: bytes, next_no: int, frame_index: int, wall_ns: int,
                       head: bytes) -> bytes:
    return _CKPT_DOMAIN + file_id + ftype + struct.pack("<QQQ", next_no, frame_index, wall_ns) + head


def checkpoint_message_v2(file_id: bytes, ftype: bytes, next_no: int, frame_index: int, wall_ns: int,
                          head: bytes, hashes: bytes, locators: bytes) -> bytes:
    """What a version-2 checkpoint signs: as version 1, plus the chain hash of every frame and the locator
    of every record since the previous signed frame, so that ``verify`` can name the record a forger
    changed even when the chain was recomputed after it."""
    body = hashlib.sha256(struct.pack("<II", len(hashes) // 32, len(locators) // LOCATOR_SIZE))
    body.update(hashes)
    body.update(locators)
    return (_CKPT2_DOMAIN + file_id + ftype + struct.pack("<QQQ", next_no, frame_index, wall_ns) + head
            + body.digest())


def reopen_message(file_id: bytes, closed_len: int, next_no: int, frame_index: int, wall_ns: int,
                   head: bytes) -> bytes:
    """What a REOP frame signs: the CLOS frame it continues (end offset, records, frames, chain head)."""
    return _REOP_DOMAIN + file_id + struct.pack("<QQQQ", closed_len, next_no, frame_index, wall_ns) + head


def seal_message(file_id: bytes, file_len: int, next_no: int, frames: int, head: bytes, *,
                 reopen: bool = False) -> bytes:
    """What a seal signs: a close seal the end of the log, a re-open seal the end of its REOP frame."""
    return (_OPEN_SEAL_DOMAIN if reopen else _SEAL_DOMAIN) + file_id + struct.pack("<QQQ", file_len, next_no, frames) + head


def public_key_fingerprint(pub: mldsa.MLDSA65PublicKey) -> bytes:
    return hashlib.sha256(pub.public_bytes_raw()).digest()


def read_bounded(path, limit: int, what: str) -> bytes:
    """The bytes of the file at ``path``; AuditError when it cannot be read or holds more than ``limit``
    bytes (only ``limit + 1`` are ever read: a device or a huge file costs no more)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise AuditError(f"cannot read {what} {os.fspath(path)!r}: {e.strerror}") from None
    if len(data) > limit:
        raise AuditError(f"{what} {os.fspath(path)!r} holds more than {limit} bytes: not a {what}")
    return data


def load_public_key(source) -> mldsa.MLDSA65PublicKey:
    """An ML-DSA-65 public key from a key object, PEM bytes, raw bytes, or a file path (at most
    ``MAX_PUBLIC_KEY_FILE`` bytes are read)."""
    if isinstance(source, mldsa.MLDSA65PublicKey):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = read_bounded(source, MAX_PUBLIC_KEY_FILE, "public key")
    if not isinstance(source, (bytes, bytearray)):
        raise TypeError(f"public key must be a key, bytes or a path, got {type(source).__name__}")
    data = bytes(source)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = mldsa.MLDSA65PublicKey.from_public_bytes(data)
    except Exception:
        raise AuditError("public key is not an ML-DSA-65 public key (PEM or 1952 raw bytes)") from None
    if not isinstance(key, mldsa.MLDSA65PublicKey):
        raise AuditError(f"public key is a {type(key).__name__}, not ML-DSA-65")
    return key
