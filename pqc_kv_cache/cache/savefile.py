"""The cache save file: ciphertext chunks and an authenticated manifest (numpy, hashlib and cryptography only).

This module knows chunks only as byte strings listed in a manifest; it knows
nothing of transformers or of how a cache lays out its layers. ``write_savefile``
writes a manifest and the chunk bytes of each layer; ``read_savefile`` reads a
file back and returns it only after it has verified the file's structure and
the manifest tag of every session. The chunks themselves stay AES-256-GCM
envelope v1 chunks: whoever uses them opens each one under the (epoch,
counter) nonce the verified manifest gives it, which authenticates its bytes.

File layout (little-endian)::

    offset      size  field
    0           4     magic b"PKVF"
    4           2     format version (1)
    6           2     session count n
    8           8     manifest length m
    16          16    file id (random per save)
    32          m     manifest: UTF-8 JSON (sorted keys, no spaces)
    32+m        32·n  manifest tags: HMAC-SHA-256, one per session slot
    32+m+32·n   d     chunk bytes, every layer's chunks in manifest order (d = manifest "data_bytes")

The manifest holds ``mode``, ``sessions`` (per slot: ``tenant_id``, ``session_id``,
the ``epoch`` whose key tags the manifest, ``next_sequence``: the session's
nonce counter high-water mark in that epoch when it saved, and ``branches``: its
branch points as ``[epoch, 32 hex digits]`` pairs), ``data_bytes`` and ``layers``:
one dict per layer whose ``chunks`` entry lists, per distinct chunk in file
order, its ``counter``, ``epoch``, session ``slot`` and stored ``nbytes``
(ciphertext and tag); the rest of a layer's dict is the cache's own description.

Slot s's tag is HMAC-SHA-256 under ``HKDF-SHA-256(key of session s at its epoch,
salt=file id, info=b"pqc_kv_cache/v1/savefile" + tenant tag + session tag)``
over ``b"pqc_kv_cache/savefile/v1\\x00"``, the slot (u16), the tenant and
session tags, the epoch (u32), the layer count (u32) and SHA-256 of the first
32 bytes and the manifest. The key is derived per file, so a manifest of one
file never verifies in another, and no AES-GCM nonce is spent on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..envelope import TAG_SIZE, session_tag, tenant_tag
from ..errors import KVCacheError, SaveFileError
from ..keyschedule import BRANCH_ID_SIZE, Lineage
from ..session import TenantSession

__all__ = ["MAGIC", "VERSION", "SaveFileContents", "write_savefile", "read_savefile", "manifest_tag"]

MAGIC = b"PKVF"
VERSION = 1
_PREFIX = struct.Struct("<4sHHQ16s")
PREFIX_SIZE = _PREFIX.size
assert PREFIX_SIZE == 32
MAC_SIZE = 32
_HKDF_INFO = b"pqc_kv_cache/v1/savefile"
_MAC_LABEL = b"pqc_kv_cache/savefile/v1\x00"
#: Largest manifest a reader accepts (a bound on what a changed length field can make it allocate).
MAX_MANIFEST = 1 << 30
CHUNK_FIELDS = ("counter", "epoch", "slot", "nbytes")


def manifest_tag(session: TenantSession, slot: int, epoch: int, file_id: bytes, n_layers: int,
                 digest: bytes) -> bytes:
    """The manifest tag of session slot ``slot`` (see the module docstring), under the session's own key of
    ``epoch``."""
    return _tag(session.key_for_epoch(epoch), session.tenant_id, session.session_id, slot, epoch, file_id,
                n_layers, digest)


def _tag(epoch_key: bytes, tenant_id: str, session_id: str, slot: int, epoch: int, file_id: bytes,
         n_layers: int, digest: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    t, s = tenant_tag(tenant_id), session_tag(session_id)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=_HKDF_INFO + t + s).derive(epoch_key)
    msg = _MAC_LABEL + struct.pack("<H", slot) + t + s + struct.pack("<II", epoch, n_layers) + digest
    return hmac.new(key, msg, hashlib.sha256).digest()


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _session_entry(session: TenantSession, lineage: Lineage) -> dict:
    return {"tenant_id": session.tenant_id, "session_id": session.session_id, "epoch": lineage.epoch,
            "next_sequence": lineage.next_sequence,
            "branches": [[e, b.hex()] for e, b in sorted(lineage.branches.items())]}


def _lineage_of(entry: dict) -> Lineage:
    """The Lineage a manifest's session entry records, or SaveFileError."""
    bad = SaveFileError("save file manifest: a session entry's epoch, counter or branch points are malformed")
    branches = entry.get("branches")
    if (type(entry.get("epoch")) is not int or type(entry.get("next_sequence")) is not int
            or not isinstance(branches, list)):
        raise bad
    points: dict[int, bytes] = {}
    for point in branches:
        if (not isinstance(point, list) or len(point) != 2 or type(point[0]) is not int
                or not isinstance(point[1], str) or len(point[1]) != 2 * BRANCH_ID_SIZE or point[0] in points):
            raise bad
        try:
            points[point[0]] = bytes.fromhex(point[1])
        except ValueError:
            raise bad from None
    try:
        return Lineage(entry["epoch"], entry["next_sequence"], points)
    except (TypeError, ValueError):
        raise bad from None


@dataclass(frozen=True)
class SaveFileContents:
    """A verified save file: its id, manifest, the given session of each slot, and the chunk bytes of each
    layer (uint8 arrays, chunks in manifest order); per slot, the lineage the manifest records and the
    epochs of its chunks."""
    file_id: bytes
    manifest: dict
    sessions: list
    layer_data: list
    lineages: list
    epochs: list


def write_savefile(path: str | os.PathLike, sessions: Sequence[TenantSession], manifest: dict,
                   layer_data: Sequence[np.ndarray]) -> bytes:
    """Write ``manifest`` (its ``sessions``, ``data_bytes`` and file id are filled in here) and each layer's
    chunk bytes (``layer_data[i]``: uint8, layer i's chunks in its chunk-list order) to ``path``; the file
    appears whole or not at all (written aside, then renamed). Returns the file id."""
    sessions = list(sessions)
    if not sessions or len(sessions) > 0xFFFF:
        raise ValueError("a save file needs 1..65535 sessions")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != len(layer_data):
        raise ValueError("manifest['layers'] must list one dict per entry of layer_data")
    total = 0
    for i, (layer, data) in enumerate(zip(layers, layer_data)):
        sizes = layer["chunks"]["nbytes"]
        if int(np.sum(sizes, dtype=np.int64)) != data.size:
            raise ValueError(f"layer {i}: the chunk list sizes sum to {int(np.sum(sizes))}, the data has {data.size}")
        total += data.size
    file_id = os.urandom(16)
    m = dict(manifest)
    lineages = [s.lineage for s in sessions]     # each read under its session's lock: epoch and counter agree
    m["sessions"] = [_session_entry(s, lin) for s, lin in zip(sessions, lineages)]
    m["data_bytes"] = total
    body = _canonical(m)
    prefix = _PREFIX.pack(MAGIC, VERSION, len(sessions), len(body), file_id)
    digest = hashlib.sha256(prefix + body).digest()
    tags = b"".join(manifest_tag(s, i, lin.epoch, file_id, len(layers), digest)
                    for i, (s, lin) in enumerate(zip(sessions, lineages)))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SaveFileError(f"cannot save to {path}: the folder {folder} does not exist (create it first)")
    tmp = f"{path}.tmp-{os.getpid()}-{file_id.hex()[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            f.write(body)
            f.write(tags)
            for data in layer_data:
                f.write(memoryview(np.ascontiguousarray(data, dtype=np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):   # named after the file asked for, not the temporary one beside it
            raise SaveFileError(f"cannot save to {path}: {exc.strerror or exc}") from None
        raise
    return file_id


def _int_list(value, what: str) -> np.ndarray:
    if not isinstance(value, list) or not all(type(x) is int for x in value):
        raise SaveFileError(f"save file manifest: {what} must be a list of integers")
    if value and (min(value) < 0 or max(value) >= 1 << 63):
        raise SaveFileError(f"save file manifest: {what} holds a negative or too large value")
    return np.array(value, dtype=np.int64) if value else np.zeros(0, dtype=np.int64)


def read_savefile(path: str | os.PathLike, sessions: Sequence[TenantSession]) -> SaveFileContents:
    """Read and verify a save file. ``sessions``: the sessions to open it with; each of the file's session
    slots must have one with the same tenant and session id whose key verifies that slot's manifest tag.

    SaveFileError (nothing returned) for a truncated, extended or changed file, a manifest tag that does not
    verify (another tenant's or session's file, another key), or a chunk list that is inconsistent (a chunk
    listed twice, sizes that do not add up). The chunk bytes are not opened here."""
    try:
        with open(path, "rb") as f:
            # writable (the chunk bytes handed out are views of it) and not cleared first: the read overwrites
            # every byte kept, and clearing would touch each page once more
            buf = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
            got = f.readinto(memoryview(buf))
        blob = memoryview(buf[:got])
    except OSError as exc:
        raise SaveFileError(f"cannot read save file {os.fspath(path)!r}: {exc.strerror or exc}") from None
    if len(blob) < PREFIX_SIZE:
        raise SaveFileError(f"save file is {len(blob)} bytes: too short for its {PREFIX_SIZE}-byte header")
    magic, version, n_sessions, m_len, file_id = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise SaveFileError("not a pqc_kv_cache save file (bad magic)")
    if version != VERSION:
        raise SaveFileError(f"save file format version {version} is not supported (this library reads {VERSION})")
    if n_sessions == 0 or m_len > MAX_MANIFEST or PREFIX_SIZE + m_len + MAC_SIZE * n_sessions > len(blob):
        raise SaveFileError("save file is truncated or its header is damaged (manifest or tags cut off)")
    body = bytes(blob[PREFIX_SIZE:PREFIX_SIZE + m_len])
    tags_at = PREFIX_SIZE + m_len
    try:
        manifest = json.loads(body.decode("ascii"))
        canonical = isinstance(manifest, dict) and _canonical(manifest) == body
    except (UnicodeDecodeError, ValueError):
        raise SaveFileError("save file manifest is not valid JSON (changed or truncated)") from None
    except RecursionError:      # nesting deeper than the parser's stack: no manifest this library writes
        raise SaveFileError("save file manifest is nested too deeply (changed)") from None
    if not canonical:
        raise SaveFileError("save file manifest is not in canonical form (changed)")
    entries, layers = manifest.get("sessions"), manifest.get("layers")
    if (not isinstance(entries, list) or len(entries) != n_sessions or not isinstance(layers, list)
            or not all(isinstance(e, dict) and isinstance(e.get("tenant_id"), str)
                       and isinstance(e.get("session_id"), str) for e in entries)):
        raise SaveFileError("save file manifest does not list its sessions and layers")
    lineages = [_lineage_of(e) for e in entries]

    # the sessions first: a file of another tenant or session is refused before anything else is believed
    given = list(sessions)
    slot_sessions = []
    for e in entries:
        match = [s for s in given if s.tenant_id == e["tenant_id"] and s.session_id == e["session_id"]]
        if not match:
            raise SaveFileError(f"save file belongs to tenant {e['tenant_id']!r}, session {e['session_id']!r}: "
                                "no such session was given; refused")
        slot_sessions.append(match[0])
    digest = hashlib.sha256(bytes(blob[:PREFIX_SIZE]) + body).digest()
    for slot, (lineage, s) in enumerate(zip(lineages, slot_sessions)):
        got = bytes(blob[tags_at + MAC_SIZE * slot:tags_at + MAC_SIZE * (slot + 1)])
        try:
            key = s.keys_along(lineage, [lineage.epoch])[lineage.epoch]
        except KVCacheError as exc:   # closed or expired, that epoch's key retired, or another branch's file
            raise SaveFileError(f"session {s.session_id!r} cannot open this save file: {exc}") from exc
        want = _tag(key, s.tenant_id, s.session_id, slot, lineage.epoch, file_id, len(layers), digest)
        if not hmac.compare_digest(got, want):
            raise SaveFileError(f"save file manifest does not verify under session {s.session_id!r} of tenant "
                                f"{s.tenant_id!r} (another session's file, or a changed one); refused")

    # the verified manifest: its chunk list must be consistent with itself and with the file's length
    data_at = tags_at + MAC_SIZE * n_sessions
    data_bytes = manifest.get("data_bytes")
    if type(data_bytes) is not int or data_at + data_bytes != len(blob):
        raise SaveFileError(f"save file holds {len(blob) - data_at} chunk bytes, its manifest lists {data_bytes}: "
                            "truncated or extended")
    data = buf[data_at:len(blob)]
    out, at, seen = [], 0, set()
    epochs: list[set] = [set() for _ in entries]
    for i, layer in enumerate(layers):
        chunks = layer.get("chunks") if isinstance(layer, dict) else None
        if not isinstance(chunks, dict):
            raise SaveFileError(f"save file manifest: layer {i} has no chunk list")
        cols = {f: _int_list(chunks.get(f), f"layer {i} chunk {f}") for f in CHUNK_FIELDS}
        n = cols["counter"].size
        if any(c.size != n for c in cols.values()):
            raise SaveFileError(f"save file manifest: layer {i}'s chunk columns differ in length")
        if n and (cols["slot"].max() >= n_sessions or cols["nbytes"].min() < TAG_SIZE):
            raise SaveFileError(f"save file manifest: layer {i} names an unknown session slot or a short chunk")
        for key in zip(cols["slot"].tolist(), cols["epoch"].tolist(), cols["counter"].tolist()):
            if key in seen:
                raise SaveFileError(f"save file lists the chunk of nonce (epoch {key[1]}, counter {key[2]}) of "
                                    f"session slot {key[0]} twice; refused")
            seen.add(key)
            epochs[key[0]].add(key[1])
        size = int(cols["nbytes"].sum())
        if at + size > data.size:
            raise SaveFileError("save file manifest lists more chunk bytes than it holds")
        out.append(data[at:at + size])
        at += size
    if at != data.size:
        raise SaveFileError("save file holds chunk bytes its manifest does not list")
    return SaveFileContents(file_id, manifest, slot_sessions, out, lineages, epochs)
