"""Verification and reading of a persisted audit log (format v1, see fileformat.py, sink.py and docs/audit.md).

``verify_log`` walks every frame, recomputes the hash chain, checks record
numbering, record locators, checkpoint signatures and the seal, and returns a
``VerifyReport``.  It stops at the first problem and names the first bad
record.  An unclosed tail (the writer crashed) is not an integrity failure: the
report says so (``crash_tail``) and how many records after the last signed
checkpoint are only chain-protected.

The chain is unkeyed, so anyone can append frames with a correct chain.  A
``CLOS`` frame therefore may only be followed by a signed ``REOP`` frame that
binds it (written when the writer re-opens a closed log); anything else after
a close, and any bytes past the length in a valid seal that do not start with
such a ``REOP``, are an integrity failure naming the first record after the
close.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import stat
import struct

import numpy as np
from cryptography.exceptions import InvalidSignature

from ..errors import AuditError
from .records import RECORD_DTYPE, RECORD_SIZE
from .fileformat import (CKPT2_HEAD, CKPT_HEAD, DETL_ENTRY, FRAME_HEAD, FRAME_TYPES, HEADER, LOCATOR_SIZE, MAGIC,
                   MAX_SEAL_SIZE, OPEN_SEAL_MAGIC, RCVR_BODY, RECS_HEAD, REOP_HEAD, SEAL_HEAD, SEAL_MAGIC,
                   TABL_ENTRY, VERSIONS,
                   checkpoint_message, checkpoint_message_v2, load_public_key, pub_path, public_key_fingerprint,
                   record_locators, reopen_message, seal_message, seal_path)

__all__ = ["VerifyReport", "verify_log"]


@dataclasses.dataclass
class VerifyReport:
    """What ``verify_log`` found.  ``ok`` is False exactly when ``error`` is set."""

    path: str
    ok: bool = True
    error: str | None = None
    bad_record: int | None = None
    records: int = 0                 # records read in order (all, when ok)
    signed_records: int = 0          # records covered by a valid signed checkpoint
    closed: bool = False             # the last frame is a signed CLOS
    crash_tail: bool = False         # the writer did not close: unsigned records and/or a torn frame
    torn_bytes: int = 0              # bytes of an incomplete final frame
    recovered_crashes: int = 0       # RCVR frames: earlier runs that crashed and were continued
    sealed: bool = False             # a valid seal was found and matched
    sealed_length: int | None = None  # file length recorded in that seal
    sealed_records: int | None = None  # record count recorded in that seal
    reopens: int = 0                 # REOP frames: cleanly closed runs that were continued
    reopened_after_seal: bool = False  # a signed REOP starts at the sealed length
    unsealed_close: bool = False     # ends with a signed CLOS, but no seal vouches that the log ends there
    reopen_sealed: bool = False      # the seal is a re-open seal: the log was re-opened and not closed since
    unsigned_frames: int = 0         # frames after the last signed frame (CKPT, CLOS or REOP)
    version: int = 0                 # file format version of the header
    unsigned_hashes: list = dataclasses.field(default_factory=list)     # chain hashes of those frames
    unsigned_locators: list = dataclasses.field(default_factory=list)   # locator arrays of their records
    last_frame: bytes = b""          # type of the last complete frame
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    frames: int = 0
    head: bytes = b""
    file_id: bytes = b""
    tail_offset: int = 0             # end of the last complete frame
    tenants: dict = dataclasses.field(default_factory=dict)
    sessions: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)
    record_blocks: list = dataclasses.field(default_factory=list)

    def fail(self, message: str, record: int | None) -> "VerifyReport":
        self.ok = False
        self.error = message
        self.bad_record = record
        return self

    def all_records(self) -> np.ndarray:
        if not self.record_blocks:
            return np.zeros(0, dtype=RECORD_DTYPE)
        return np.concatenate(self.record_blocks)


def verify_log(path, public_key=None, *, collect=False) -> VerifyReport:
    """Verify the log at ``path`` with ``public_key`` (default: the key in ``PATH.pub``).

    Raises AuditError only when the log or the key cannot be read at all;
    every integrity problem is returned in the report.  With ``collect=True``
    the records read (in order) are kept in ``report.record_blocks``; with a
    callable ``collect(records, report) -> bool mask`` only the records it
    selects are kept (the tables read so far are in the report).
    """
    path = os.fspath(path)
    rep = VerifyReport(path=path)
    if public_key is None:
        if not os.path.exists(pub_path(path)):
            raise AuditError(f"no public key given and {pub_path(path)!r} does not exist")
        public_key = pub_path(path)
    pub = load_public_key(public_key)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise AuditError(f"cannot read audit log {path!r}: {e.strerror}") from None
    if mm is None:
        return rep.fail("not an audit log: 0 bytes, shorter than the header", 0)
    # The file is mapped, not read: memory stays small however long the log is.  Every
    # view into the mapping is gone when _walk returns, so the mapping can be closed.
    data = memoryview(mm)
    try:
        return _walk(data, rep, pub, collect)
    finally:
        try:
            data.release()
            mm.close()
        except BufferError:   # only while an exception's traceback still holds a view; GC unmaps later
            pass


def _walk(data: memoryview, rep: VerifyReport, pub, collect) -> VerifyReport:
    if len(data) < HEADER.size:
        return rep.fail(f"not an audit log: {len(data)} bytes, shorter than the header", 0)
    magic, version, rsize, halg, salg, _, file_id, fpr = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        return rep.fail("not an audit log: bad magic", 0)
    if version not in VERSIONS or rsize != RECORD_SIZE or halg != 1 or salg != 1:
        return rep.fail(f"unsupported log: version {version}, record size {rsize}, algorithms {halg}/{salg}", 0)
    rep.file_id = file_id
    rep.version = version
    if fpr != public_key_fingerprint(pub):
        return rep.fail("wrong key: the log was signed with a different ML-DSA-65 key", 0)

    h = hashlib.sha256(data[:HEADER.size]).digest()
    off = HEADER.size
    expected = 0
    frame_index = 0
    closed = False
    ts_min = ts_max = None
    ends: dict[int, tuple[bytes, int, int]] = {}   # end offset of CLOS frames -> (head, records, frames)
    reopened: set[int] = set()                     # offsets of valid REOP frames (= end of the CLOS before)
    reop_ends: dict[int, tuple[bytes, int, int]] = {}  # end offset of REOP frames -> (head, records, frames)
    signed_frames = 0                              # frames up to and including the last signed one
    tables = _Tables(rep)
    fresh: list[int] = []        # record numbers given details since the last RCVR / REOP frame
    since: list[tuple] = []      # frames since the last signed one: (chain hash, type, offset, first record,
    #                              count, locators)
    prev_type = b""
    n = len(data)
    while off < n:
        if n - off < FRAME_HEAD.size:
            rep.torn_bytes = n - off
            break
        ftype, length = FRAME_HEAD.unpack_from(data, off)
        if ftype not in FRAME_TYPES:
            return rep.fail(f"unknown frame type {ftype!r} at byte {off} (inserted or changed bytes); "
                            f"first bad record {expected}", expected)
        end = off + FRAME_HEAD.size + length + 32
        if end > n:
            rep.torn_bytes = n - off
            break
        if prev_type == b"CLOS" and ftype != b"REOP":
            return rep.fail(f"{ftype.decode()} frame at byte {off} follows the closing checkpoint without a "
                            f"signed REOP frame (appended after the log was closed); first bad record "
                            f"{expected}", expected)
        payload = data[off + FRAME_HEAD.size: end - 32]
        stored = bytes(data[end - 32: end])
        hasher = hashlib.sha256(h)
        hasher.update(data[off: off + FRAME_HEAD.size])
        hasher.update(payload)
        computed = hasher.digest()
        if ftype == b"RECS":
            if length < RECS_HEAD.size:
                return rep.fail(f"record frame at byte {off} too short; first bad record {expected}", expected)
            first, count, _ = RECS_HEAD.unpack_from(payload, 0)
            if length != RECS_HEAD.size + count * (RECORD_SIZE + LOCATOR_SIZE):
                return rep.fail(f"record frame at byte {off} has a wrong length for {count} records; "
                                f"first bad record {expected}", expected)
            if first != expected:
                later = _find_record_frame(data, end, expected) if first > expected else None
                if later is not None:
                    what = f"out of order (frames swapped or reordered: it is in the frame at byte {later})"
                else:
                    what = "missing (deleted)" if first > expected else "out of order (reordered or inserted)"
                return rep.fail(f"record {expected} {what}: frame at byte {off} starts with record {first}",
                                expected)
            body = RECS_HEAD.size + count * RECORD_SIZE
            recs = np.frombuffer(payload, dtype=RECORD_DTYPE, count=count, offset=RECS_HEAD.size)
            locs = np.frombuffer(payload, dtype="<u8", count=count, offset=body)
            nums = recs["record_no"]
            bad = np.flatnonzero(nums != np.arange(first, first + count, dtype=np.uint64))
            if len(bad):
                i = int(bad[0])
                return rep.fail(f"record {first + i} out of order: found record number {int(nums[i])} "
                                f"in its place (deleted, reordered or inserted record)", first + i)
            bad = np.flatnonzero(record_locators(recs) != locs)
            if len(bad):
                i = int(bad[0])
                return rep.fail(f"record {first + i} changed (its bytes do not match the frame)", first + i)
            if computed != stored:
                return rep.fail(f"hash chain broken in the frame of records {first}..{first + count - 1}; "
                                f"first bad record {first}", first)
            tables.note_references(recs, first)
            if count:
                ts = recs["host_ts_ns"]
                lo, hi = int(ts.min()), int(ts.max())
                ts_min = lo if ts_min is None else min(ts_min, lo)
                ts_max = hi if ts_max is None else max(ts_max, hi)
                if collect is True:
                    rep.record_blocks.append(recs.copy())
                elif collect:
                    rep.record_blocks.append(recs[collect(recs, rep)])
            expected += count
            closed = False
        else:
            if computed != stored:
                return rep.fail(f"hash chain broken at the {ftype.decode()} frame at byte {off}; "
                                f"first bad record {expected}", expected)
            if ftype == b"TABL":
                err, bad = tables.read_table(bytes(payload), rep, off)
                if err:
                    bad = expected if bad is None else bad
                    return rep.fail(f"{err} at byte {off}; first bad record {bad}", bad)
            elif ftype == b"DETL":
                err, bad = _read_details(bytes(payload), rep, expected, fresh)
                if err:
                    bad = expected if bad is None else bad
                    return rep.fail(f"{err} at byte {off}; first bad record {bad}", bad)
            elif ftype in (b"CKPT", b"CLOS") and version >= 2:
                err = _check_checkpoint_v2(payload, ftype, off, file_id, pub, rep, expected, frame_index, h, since)
                if err:
                    return rep.fail(*err)
                rep.signed_records = expected
                signed_frames = frame_index + 1
                tables.signed()
                closed = ftype == b"CLOS"
                if closed:
                    ends[end] = (computed, expected, frame_index + 1)
            elif ftype in (b"CKPT", b"CLOS"):
                if length < CKPT_HEAD.size:
                    return rep.fail(f"checkpoint at byte {off} too short", rep.signed_records)
                next_no, findex, wall, head, slen = CKPT_HEAD.unpack_from(payload, 0)
                sig = bytes(payload[CKPT_HEAD.size:])
                if len(sig) != slen or next_no != expected or findex != frame_index or head != h:
                    return rep.fail(f"checkpoint at byte {off} does not match the log before it "
                                    f"(it claims {next_no} records, the log has {expected}); "
                                    f"first bad record {rep.signed_records}", rep.signed_records)
                try:
                    pub.verify(sig, checkpoint_message(file_id, ftype, next_no, findex, wall, head))
                except InvalidSignature:
                    return rep.fail(f"signature of the checkpoint at byte {off} does not verify (wrong key "
                                    f"or forged); first bad record {rep.signed_records}", rep.signed_records)
                rep.signed_records = expected
                signed_frames = frame_index + 1
                tables.signed()
                closed = ftype == b"CLOS"
                if closed:
                    ends[end] = (computed, expected, frame_index + 1)
            elif ftype == b"REOP":
                if prev_type != b"CLOS":
                    return rep.fail(f"REOP frame at byte {off} does not follow a closing checkpoint; "
                                    f"first bad record {expected}", expected)
                if length < REOP_HEAD.size:
                    return rep.fail(f"REOP frame at byte {off} too short; first bad record {expected}", expected)
                clen, next_no, findex, wall, head, slen = REOP_HEAD.unpack_from(payload, 0)
                sig = bytes(payload[REOP_HEAD.size:])
                if len(sig) != slen or clen != off or next_no != expected or findex != frame_index or head != h:
                    return rep.fail(f"REOP frame at byte {off} does not match the close before it; "
                                    f"first bad record {expected}", expected)
                try:
                    pub.verify(sig, reopen_message(file_id, clen, next_no, findex, wall, head))
                except InvalidSignature:
                    return rep.fail(f"signature of the REOP frame at byte {off} does not verify (wrong key "
                                    f"or forged); first bad record {expected}", expected)
                reopened.add(off)
                reop_ends[end] = (computed, expected, frame_index + 1)
                rep.reopens += 1
                rep.signed_records = expected
                signed_frames = frame_index + 1
                tables.signed()
                _drop_orphan_details(rep, expected, fresh)
                closed = False
            elif ftype == b"RCVR":
                if length != RCVR_BODY.size:
                    return rep.fail(f"recovery frame at byte {off} malformed", expected)
                rep.recovered_crashes += 1
                _drop_orphan_details(rep, expected, fresh)
                closed = False
        if ftype in (b"CKPT", b"CLOS", b"REOP"):
            since = []
        elif ftype == b"RECS":
            since.append((computed, ftype, off, first, count, locs.copy()))
        else:
            since.append((computed, ftype, off, expected, 0, None))
        h = computed
        frame_index += 1
        prev_type = ftype
        off = end

    rep.unsigned_hashes = [f[0] for f in since]
    rep.unsigned_locators = [f[5] for f in since if f[5] is not None]
    rep.records = expected
    rep.frames = frame_index
    rep.head = h
    rep.tail_offset = off
    rep.last_frame = prev_type
    rep.first_ts_ns, rep.last_ts_ns = ts_min, ts_max
    rep.closed = closed and rep.torn_bytes == 0
    rep.crash_tail = not rep.closed
    rep.unsigned_frames = frame_index - signed_frames
    err = tables.unsigned_redefinitions(rep)
    if err:
        return rep.fail(*err)

    err = _check_seal(rep, pub, file_id, n, ends, reop_ends, reopened)
    if err:
        return rep.fail(*err)
    if rep.closed and not (rep.sealed and rep.sealed_length == n):
        # a signed CLOS proves what came before it, not that nothing came after: only the seal says where
        # the log ended (without this, a log cut back to an earlier close with the seal removed looks whole)
        rep.unsealed_close = True
        rep.crash_tail = True
    return rep


def _find_record_frame(data: memoryview, off: int, record: int) -> int | None:
    """Offset of a later RECS frame that starts with ``record`` (frame headers only; None if there is none)."""
    n = len(data)
    while n - off >= FRAME_HEAD.size + RECS_HEAD.size:
        ftype, length = FRAME_HEAD.unpack_from(data, off)
        if ftype not in FRAME_TYPES:
            return None
        if ftype == b"RECS" and length >= RECS_HEAD.size \
                and RECS_HEAD.unpack_from(data, off + FRAME_HEAD.size)[0] == record:
            return off
        off += FRAME_HEAD.size + length + 32
    return None


def _check_checkpoint_v2(payload, ftype: bytes, off: int, file_id: bytes, pub, rep: VerifyReport, expected: int,
                         frame_index: int, h: bytes, since: list) -> tuple[str, int] | None:
    """A version-2 checkpoint: its signature first (it stands on its own), then the log against what it signs.

    When the log differs from what was signed, the chain hashes it signs name the first frame that
    changed, and the locators it signs the first record in that frame: the right record even if the
    chain (and the locators in the file) were recomputed after the change.
    """
    signed = rep.signed_records
    what = "checkpoint" if ftype == b"CKPT" else "closing checkpoint"
    if len(payload) < CKPT2_HEAD.size:
        return f"{what} at byte {off} too short; first bad record {signed}", signed
    next_no, findex, wall, head, slen, nframes, nrecs = CKPT2_HEAD.unpack_from(payload, 0)
    o = CKPT2_HEAD.size
    if len(payload) != o + slen + 32 * nframes + LOCATOR_SIZE * nrecs:
        return f"{what} at byte {off} has a wrong length; first bad record {signed}", signed
    sig = bytes(payload[o:o + slen])
    hashes = bytes(payload[o + slen:o + slen + 32 * nframes])
    locs = bytes(payload[o + slen + 32 * nframes:])
    try:
        pub.verify(sig, checkpoint_message_v2(file_id, ftype, next_no, findex, wall, head, hashes, locs))
    except InvalidSignature:
        return (f"signature of the {what} at byte {off} does not verify (wrong key or forged); "
                f"first bad record {signed}", signed)
    if next_no == expected and findex == frame_index and head == h and nframes == len(since) \
            and nrecs == expected - signed and hashes == b"".join(f[0] for f in since):
        return None
    # the log before this checkpoint is not what was signed: find the first frame that differs
    j = 0
    while j < min(nframes, len(since)) and since[j][0] == hashes[32 * j:32 * j + 32]:
        j += 1
    if j == len(since):
        bad = expected
        where = "frames the checkpoint signs are missing before it"
    else:
        _, t, foff, first, count, flocs = since[j]
        bad = first
        if t == b"RECS":
            signed_locs = np.frombuffer(locs, dtype="<u8")[first - signed:first - signed + count] \
                if 0 <= first - signed <= nrecs else np.zeros(0, dtype="<u8")
            k = min(len(signed_locs), count)
            diff = np.flatnonzero(flocs[:k] != signed_locs[:k])
            bad = first + (int(diff[0]) if len(diff) else k if k < count else 0)
            where = f"the frame at byte {foff} differs from what was signed"
        else:
            where = f"the {t.decode()} frame at byte {foff} differs from what was signed"
    return (f"record {bad} changed after it was signed: {where} (checkpoint at byte {off}; the chain was "
            f"recomputed by someone without the key); first bad record {bad}", bad)


def _check_seal(rep: VerifyReport, pub, file_id: bytes, n: int, ends: dict, reop_ends: dict,
                reopened: set) -> tuple[str, int] | None:
    """Check ``PATH.seal`` (absent is allowed); (error, first bad record) when it contradicts the log."""
    sp = seal_path(rep.path)
    if not os.path.exists(sp):
        return None
    seal = _read_seal(sp)
    if seal is None:
        return f"seal {sp!r} is malformed (not a regular file of at most {MAX_SEAL_SIZE} bytes)", rep.records
    if len(seal) < SEAL_HEAD.size:
        return f"seal {sp!r} is malformed", rep.records
    smagic, sfid, slen_file, snext, sframes, shead, siglen = SEAL_HEAD.unpack_from(seal, 0)
    sig = seal[SEAL_HEAD.size:]
    if smagic not in (SEAL_MAGIC, OPEN_SEAL_MAGIC) or len(sig) != siglen:
        return f"seal {sp!r} is malformed", rep.records
    reopen = smagic == OPEN_SEAL_MAGIC
    try:
        pub.verify(sig, seal_message(sfid, slen_file, snext, sframes, shead, reopen=reopen))
    except InvalidSignature:
        return f"signature of the seal {sp!r} does not verify (wrong key or forged)", 0
    if sfid != file_id:
        return f"seal {sp!r} belongs to another log", 0
    if reopen:
        # written when the log was re-opened: the log goes on past that REOP frame, so it cannot end
        # at (or before) the close the REOP continued
        if reop_ends.get(slen_file) != (shead, snext, sframes):
            if rep.records < snext or n < slen_file:
                return (f"log truncated after it was re-opened: the seal records a re-open at byte {slen_file} "
                        f"with {snext} records, the file holds {rep.records} records and {n} bytes; first "
                        f"missing record {min(snext, rep.records)}", min(snext, rep.records))
            return (f"log does not match its seal (re-opened with {snext} records at byte {slen_file}); "
                    f"first bad record {min(snext, rep.records)}", min(snext, rep.records))
        rep.reopen_sealed = True
        return None
    if ends.get(slen_file) != (shead, snext, sframes):
        if rep.records < snext or n < slen_file:
            return (f"log truncated after a clean close: the seal records {snext} records and "
                    f"{slen_file} bytes, the file holds {rep.records} records and {n} bytes; "
                    f"first missing record {rep.records}", rep.records)
        return (f"log does not match its seal (closed with {snext} records at byte {slen_file}); "
                f"first bad record {min(snext, rep.records)}", min(snext, rep.records))
    rep.sealed_length, rep.sealed_records = slen_file, snext
    if n > slen_file and slen_file not in reopened:
        # e.g. a torn frame after the close: the seal says the log ended there
        return (f"{n - slen_file} bytes after the sealed end of the log (byte {slen_file}) that "
                f"are not a signed REOP continuation (appended after the log was closed); "
                f"first bad record {snext}", snext)
    rep.reopened_after_seal = slen_file in reopened
    rep.sealed = True
    return None


def _read_seal(sp: str) -> bytes | None:
    """The bytes of the seal file ``sp``; None when it is not a regular file or is longer than any seal (it
    is never read past that bound, nor waited on); AuditError when it cannot be opened."""
    try:
        fd = os.open(sp, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise AuditError(f"cannot read seal {sp!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            seal = f.read(MAX_SEAL_SIZE + 1)
        except OSError as e:
            raise AuditError(f"cannot read seal {sp!r}: {e.strerror}") from None
    return seal if len(seal) <= MAX_SEAL_SIZE else None


class _Tables:
    """Tenant / session table entries as the walk reads them, refusing any that would change what a record
    already read says.

    The writer registers an index once, before the records that use it, and never renames one.  A table
    entry that renames an index is always an integrity failure.  An entry that names an index earlier
    records used while it had no name is accepted only if a signed checkpoint follows it: an unsigned one
    would change what signed records say.
    """

    def __init__(self, rep: VerifyReport):
        self.tables = (rep.tenants, rep.sessions)
        self.top = [-1, -1]           # highest tenant / session index named so far
        self.refs = ({}, {})          # tenant / session index without a name -> first record using it
        self.pending = []             # (kind, index, first record using it, byte offset): unsigned namings

    def note_references(self, recs: np.ndarray, first: int) -> None:
        if not len(recs):
            return
        for k, name in enumerate(("tenant_idx", "session_idx")):
            col, known, refs = recs[name], self.tables[k], self.refs[k]
            if int(col.max()) < len(known) and self.top[k] + 1 == len(known):
                continue              # dense table naming every index used: one max() per frame
            # each index with the position of its first use, from one sort: linear in the frame however many
            # distinct unnamed indices it holds (a search per index would be quadratic)
            uniq, at = np.unique(col, return_index=True)
            for u, i in zip(uniq.tolist(), at.tolist()):
                if u not in known and u not in refs:
                    refs[u] = first + i

    def read_table(self, payload: bytes, rep: VerifyReport, frame_off: int) -> tuple[str | None, int | None]:
        off = 0
        try:
            while off < len(payload):
                kind, idx, tidx, ln = TABL_ENTRY.unpack_from(payload, off)
                off += TABL_ENTRY.size
                if off + ln > len(payload) or kind not in (1, 2):
                    return "malformed table frame", None
                text = payload[off:off + ln].decode("utf-8")
                off += ln
                table = rep.tenants if kind == 1 else rep.sessions
                value = text if kind == 1 else (tidx, text)
                what = "tenant" if kind == 1 else "session"
                if idx in table:
                    if table[idx] != value:
                        return (f"table frame renames {what} index {idx} from {table[idx]!r} to {value!r}", None)
                    continue
                ref = self.refs[kind - 1].pop(idx, None)
                if ref is not None:
                    self.pending.append((kind, idx, ref, frame_off))
                table[idx] = value
                self.top[kind - 1] = max(self.top[kind - 1], idx)
        except (struct.error, UnicodeDecodeError):
            return "malformed table frame", None
        return None, None

    def signed(self) -> None:
        self.pending.clear()

    def unsigned_redefinitions(self, rep: VerifyReport) -> tuple[str, int] | None:
        bad = [p for p in self.pending if p[2] < rep.signed_records]
        if not bad:
            return None
        for kind, idx, _, _ in bad:   # never show the unsigned names
            (rep.tenants if kind == 1 else rep.sessions).pop(idx, None)
        kind, idx, ref, off = min(bad, key=lambda p: p[2])
        return (f"unsigned table frame at byte {off} names {'tenant' if kind == 1 else 'session'} index {idx}, "
                f"which signed record {ref} used without a name; first bad record {ref}", ref)


def _drop_orphan_details(rep: VerifyReport, next_no: int, fresh: list[int]) -> None:
    """Details written for records a crashed run never wrote: the next run numbers its records from here.
    Only details read since the previous RCVR / REOP (``fresh``, emptied here) can be such: the others were
    for records written before it, so each detail is looked at once, however many such frames follow."""
    for no in fresh:
        if no >= next_no:
            rep.details.pop(no, None)
    fresh.clear()


def _read_details(payload: bytes, rep: VerifyReport, expected: int, fresh: list[int]
                  ) -> tuple[str | None, int | None]:
    """The writer writes a record's details once, before the record: anything else rewrites what a written
    (possibly signed) record says."""
    off = 0
    try:
        while off < len(payload):
            no, ln = DETL_ENTRY.unpack_from(payload, off)
            off += DETL_ENTRY.size
            if off + ln > len(payload):
                return "malformed details frame", None
            text = payload[off:off + ln].decode("utf-8")
            off += ln
            if no < expected:
                return f"details frame gives details to record {no}, which was written before it", no
            if no in rep.details:
                return f"details frame gives record {no} details a second time", no
            rep.details[no] = text
            fresh.append(no)
    except (struct.error, UnicodeDecodeError):
        return "malformed details frame", None
    return None, None
