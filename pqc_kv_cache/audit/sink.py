"""Persistent, tamper-evident audit log file: the writer (format in fileformat.py and docs/audit.md).

Layout::

    header (64 bytes)            magic "PQCAUDIT", version, record size, algorithms,
                                 file id, SHA-256 of the ML-DSA-65 public key
    frame*                       type (4 ASCII bytes) | payload length (u32) | payload |
                                 chain hash (32 bytes)

Every frame extends one SHA-256 chain:
``h_0 = SHA-256(header)``, ``h_i = SHA-256(h_{i-1} || type || length || payload)``,
and ``h_i`` is stored after the frame.  Frame types:

- ``RECS`` records: first record number (u64), count (u32), reserved (u32),
  ``count`` packed 64-byte records, then ``count`` u64 record locators
  (a fast non-cryptographic mix of each record's eight words, see
  ``record_locators``; they only let ``verify`` name the exact record inside
  a frame whose hash fails).
- ``TABL`` tenant / session table entries, ``DETL`` per-record details text.
- ``CKPT`` / ``CLOS`` checkpoints: the chain head before the frame, the record
  count, the frame index and the wall time, signed with ML-DSA-65; in version 2
  also the chain hash of every frame and the locator of every record since the
  previous signed frame, so that ``verify`` names a changed record even when
  the chain was recomputed after it.  ``CLOS`` is written by ``close()``.
- ``RCVR`` written when a log whose last run crashed is re-opened.
- ``REOP`` written first when a cleanly closed log is re-opened: it binds the
  closing frame it follows (its end offset, record count, frame count and
  chain head), signed.  Nothing but a ``REOP`` may follow a ``CLOS``: the
  chain alone is unkeyed, so without this anyone could append frames with a
  correct chain after a close.

At a clean close a *seal* is written beside the log (``PATH.seal``): the file
length, record count and chain head after the ``CLOS`` frame, signed.  A log
cut short after a clean close no longer reaches the sealed length, and bytes
past the sealed length are accepted only after a signed ``REOP``.  The
public key is written to ``PATH.pub`` (PEM).
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from cryptography.hazmat.primitives import serialization

from ..errors import AuditError, AuditIntegrityError
from .fileformat import (CKPT2_HEAD, CKPT_HEAD, DETL_ENTRY, FRAME_HEAD, HASH_SHA256, HEADER, LOCATOR_SIZE, MAGIC,
                         OPEN_SEAL_MAGIC, RCVR_BODY, RECS_HEAD, REOP_HEAD, SEAL_HEAD, SEAL_MAGIC, SIG_MLDSA65,
                         TABL_ENTRY, VERSION, checkpoint_message, checkpoint_message_v2, pub_path,
                         public_key_fingerprint, record_locators, reopen_message, seal_message, seal_path)
from .keys import resolve_signing_key
from .records import RECORD_SIZE
from .verify import verify_log
from .writelock import WriterLock

__all__ = ["AuditSink"]


class AuditSink:
    """Append-only writer of one audit log file (fileformat.VERSION); called from the drain thread only.

    A new file gets a header and a PEM public key beside it.  An existing file
    is verified with the signing key's public key, its torn final frame (if the
    last run crashed mid-write) is cut off and recorded in an ``RCVR`` frame
    (or, if it was closed cleanly, a signed ``REOP`` frame is written first),
    and its chain and numbering continue; ``next_no``, ``tenants`` and
    ``sessions`` tell the owner where it left off.
    """

    def __init__(self, path, signing_key=None, *, checkpoint_records: int = 65536,
                 frame_records: int = 16384, fsync: bool = True, clock=time.time_ns):
        if checkpoint_records < 1 or frame_records < 1:
            raise ValueError("checkpoint_records and frame_records must be positive")
        self.path = os.fspath(path)
        self.checkpoint_records = checkpoint_records
        self.frame_records = frame_records
        self.fsync = fsync
        self.clock = clock
        self.bytes_written = 0
        self.closed = False
        self._since_hashes: list[bytes] = []          # chain hashes of the frames since the last signed one
        self._since_locs: list[np.ndarray] = []       # locators of the records since the last signed frame
        self.tenants: dict[int, str] = {}
        self.sessions: dict[int, tuple[int, str]] = {}
        if os.path.isdir(self.path):
            raise AuditError(f"{self.path} is a directory: path= names the log file itself, for example "
                             f"{os.path.join(self.path, 'audit.kvlog')}")
        self._writer = WriterLock(self.path)   # before anything is read: one writer per log
        try:
            self._open(signing_key)
        except BaseException:
            self._writer.release(remove_if_created=True)
            raise

    def _open(self, signing_key) -> None:
        exists = os.path.getsize(self.path) > 0
        if exists and signing_key is None:
            raise AuditError(f"{self.path} exists: re-opening it needs the signing key it was written with "
                             "(keep one with signing_key='<key file>', see pqc_kv_cache.audit.keys)")
        # a key file is created only for a new log; an existing log needs the key it was written with
        self.key = resolve_signing_key(signing_key, create=not exists)
        self.pub = self.key.public_key()
        try:
            if exists:
                rep = verify_log(self.path, self.pub)
                if not rep.ok:
                    raise AuditIntegrityError(f"cannot continue {self.path}: {rep.error}",
                                              record_number=rep.bad_record)
                if rep.sealed_length is not None and rep.tail_offset > rep.sealed_length \
                        and not rep.reopened_after_seal:
                    # verify refuses this already; never sign frames appended after a sealed close
                    raise AuditIntegrityError(
                        f"cannot continue {self.path}: frames after its sealed close (byte "
                        f"{rep.sealed_length}) are not a signed continuation", record_number=rep.sealed_records)
                self.file_id = rep.file_id
                self.version = rep.version
                self._since_hashes = list(rep.unsigned_hashes)
                self._since_locs = list(rep.unsigned_locators)
                self.head = rep.head
                self.frame_index = rep.frames
                self.next_no = rep.records
                self.tenants = dict(rep.tenants)
                self.sessions = dict(rep.sessions)
                self.f = open(self.path, "r+b")
                self.f.truncate(rep.tail_offset)
                self.f.seek(rep.tail_offset)
                if rep.last_frame == b"CLOS":
                    self._reopen(rep.tail_offset)
                elif rep.crash_tail:
                    self._frame(b"RCVR", RCVR_BODY.pack(rep.torn_bytes, rep.records - rep.signed_records,
                                                        self.clock()))
            else:
                self.file_id = os.urandom(16)
                self.version = VERSION
                header = HEADER.pack(MAGIC, VERSION, RECORD_SIZE, HASH_SHA256, SIG_MLDSA65, 0,
                                     self.file_id, public_key_fingerprint(self.pub))
                self.f = open(self.path, "wb")
                self.f.write(header)
                self.bytes_written += len(header)
                self.head = hashlib.sha256(header).digest()
                self.frame_index = 0
                self.next_no = 0
                pem = self.pub.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
                _atomic_write(pub_path(self.path), pem)
        except OSError as e:
            raise AuditError(f"cannot open audit log {self.path}: {e.strerror}") from None
        self.since_checkpoint = 0
        self.dirty = exists   # a re-opened log gets a checkpoint even with no new records
        self.closed = False

    # -- frames ------------------------------------------------------------------
    def _frame(self, ftype: bytes, *parts) -> None:
        length = sum(len(p) for p in parts)
        head = FRAME_HEAD.pack(ftype, length)
        h = hashlib.sha256(self.head)
        h.update(head)
        for p in parts:
            h.update(p)
        digest = h.digest()
        try:
            self.f.write(head)
            for p in parts:
                self.f.write(p)
            self.f.write(digest)
        except OSError as e:
            raise AuditError(f"cannot write audit log {self.path}: {e.strerror}") from None
        self.head = digest
        self._since_hashes.append(digest)
        self.frame_index += 1
        self.bytes_written += FRAME_HEAD.size + length + 32
        self.dirty = True

    def write_tables(self, entries) -> None:
        """entries: (kind, index, tenant_index, text) with kind 1 = tenant, 2 = session."""
        if not entries:
            return
        parts = []
        for kind, idx, tidx, text in entries:
            b = text.encode("utf-8")
            parts.append(TABL_ENTRY.pack(kind, idx, tidx, len(b)) + b)
            if kind == 1:
                self.tenants[idx] = text
            else:
                self.sessions[idx] = (tidx, text)
        self._frame(b"TABL", b"".join(parts))

    def write_details(self, entries) -> None:
        """entries: (record_no, text)."""
        if not entries:
            return
        parts = []
        for no, text in entries:
            b = text.encode("utf-8")
            parts.append(DETL_ENTRY.pack(no, len(b)) + b)
        self._frame(b"DETL", b"".join(parts))

    def write_records(self, recs: np.ndarray) -> None:
        """Append records (RECORD_DTYPE, numbers continuing the file) in frames of frame_records."""
        n = len(recs)
        done = 0
        while done < n:
            k = min(n - done, self.frame_records, self.checkpoint_records - self.since_checkpoint)
            part = np.ascontiguousarray(recs[done:done + k])
            first = int(part["record_no"][0])
            if first != self.next_no:
                raise AuditError(f"internal: record {first} handed to the sink, expected {self.next_no}")
            locs = record_locators(part)
            self._frame(b"RECS", RECS_HEAD.pack(first, k, 0), part.data.cast("B"), locs.data.cast("B"))
            self._since_locs.append(locs)
            self.next_no += k
            self.since_checkpoint += k
            done += k
            if self.since_checkpoint >= self.checkpoint_records:
                self.checkpoint()

    def checkpoint(self, ftype: bytes = b"CKPT") -> None:
        """Sign the chain head: ``ftype`` is CKPT, or CLOS at close."""
        wall = self.clock()
        if self.version == 1:
            msg = checkpoint_message(self.file_id, ftype, self.next_no, self.frame_index, wall, self.head)
            sig = self.key.sign(msg)
            self._frame(ftype, CKPT_HEAD.pack(self.next_no, self.frame_index, wall, self.head, len(sig)), sig)
        else:
            hashes = b"".join(self._since_hashes)
            locs = np.concatenate(self._since_locs).astype("<u8").tobytes() if self._since_locs else b""
            msg = checkpoint_message_v2(self.file_id, ftype, self.next_no, self.frame_index, wall, self.head,
                                        hashes, locs)
            sig = self.key.sign(msg)
            self._frame(ftype, CKPT2_HEAD.pack(self.next_no, self.frame_index, wall, self.head, len(sig),
                                               len(self._since_hashes), len(locs) // LOCATOR_SIZE), sig, hashes, locs)
        self._since_hashes = []
        self._since_locs = []
        self.since_checkpoint = 0
        self.dirty = False

    def _reopen(self, closed_len: int) -> None:
        """First frame after a CLOS: sign the close it continues, so no one else can append there."""
        wall = self.clock()
        msg = reopen_message(self.file_id, closed_len, self.next_no, self.frame_index, wall, self.head)
        sig = self.key.sign(msg)
        self._frame(b"REOP", REOP_HEAD.pack(closed_len, self.next_no, self.frame_index, wall, self.head,
                                            len(sig)), sig)
        self._since_hashes = []
        self._since_locs = []
        # The close seal said the log ended at closed_len; replace it now, not at the next close, with a
        # seal saying it goes on past this REOP, so that a log cut back to that close no longer verifies.
        self.flush(checkpoint=False)
        self._write_seal(reopen=True)

    def flush(self, checkpoint: bool = True) -> None:
        """Sign what is new (if anything) and push it to the disk."""
        if self.closed:
            return
        if checkpoint and (self.dirty or self.since_checkpoint):
            self.checkpoint()
        try:
            self.f.flush()
            if self.fsync:
                os.fsync(self.f.fileno())
        except OSError as e:
            raise AuditError(f"cannot flush audit log {self.path}: {e.strerror}") from None

    def close(self) -> None:
        """Write the signed CLOS frame and the seal; the file is complete after this."""
        if self.closed:
            return
        self.checkpoint(b"CLOS")
        self.flush(checkpoint=False)
        try:
            self._write_seal(reopen=False)
        finally:
            self.f.close()
            self.closed = True
            self._writer.release()

    def _write_seal(self, reopen: bool) -> None:
        """Sign the current end of the file (length, records, frames, chain head) into ``PATH.seal``."""
        file_len = self.f.tell()
        body = seal_message(self.file_id, file_len, self.next_no, self.frame_index, self.head, reopen=reopen)
        sig = self.key.sign(body)
        seal = SEAL_HEAD.pack(OPEN_SEAL_MAGIC if reopen else SEAL_MAGIC, self.file_id, file_len, self.next_no,
                              self.frame_index, self.head, len(sig)) + sig
        try:
            _atomic_write(seal_path(self.path), seal)
        except OSError as e:
            raise AuditError(f"cannot write seal of {self.path}: {e.strerror}") from None

    def abandon(self) -> None:
        """Close the file without a CLOS frame (used when the owner failed; verify sees a crash)."""
        if not self.closed:
            try:
                self.f.close()
            except OSError:
                pass
            self.closed = True
            self._writer.release()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
