"""Sealing and opening vLLM's paged KV blocks through the backend contract (no vLLM import).

The worker side of ``PQCKVConnector`` without vLLM: what a save or a load does to a layer's block
tensor, the stored files, and the audit records, so it can be tested on every backend (host, native, the
CPU twin of the CUDA backend) without an engine.

**Blocks as chunks.** Every layout vLLM hands a connector gives K and V of a layer as strided
``[num_blocks, kv_heads, block_size, head_dim]`` views (:func:`kv_block_views`): the backend contract's
``[batch, heads, seq, dim]`` with ``row`` = block id, ``io_start`` = 0, ``pos_count`` = the block size and
``pos_start`` = the block's first position in the request. One chunk is one block of one layer; one
``encrypt_chunks`` / ``decrypt_chunks`` call seals or opens every block of a layer that a step saves or
loads, for all its requests together (a second call only where block ids pass 32767, as an audit record's
row is 16 bits: the call then works on a window of 32768 blocks and the record's row is the id in it).

**Save.** ``save_layer`` seals into a uint8 arena on the KV's device and, on CUDA, starts a non-blocking
copy of the arena into pinned host memory; the backend writes the ENCRYPT records (on CUDA into the log's
device ring). Nothing in it waits for the device. ``finish_saves`` (vLLM's ``wait_for_save``, a point where
the step's work is done) waits for those copies and writes the files, then the index of every prefix
whose last part is saved in every layer.

**Load.** ``load`` reads and checks the files of every request first (host only); a request with a
missing, malformed or foreign file, or a key the key service refuses, is not opened at all: its blocks
are zeroed in every layer and reported. The others are opened straight into vLLM's blocks, one
``decrypt_chunks`` per layer. A chunk whose tag fails has its block zeroed by the backend (on CUDA on the
stream, before the forward reads it) and is reported by ``load_errors``. Decrypting in place is right
here: the destination blocks were allocated to the request for exactly these positions (blocks vLLM
already had are counted as computed and not loaded), a block another request of the same step shares
through vLLM's prefix cache is recomputed for every request that uses it once it is reported, and zeros
are not unverified bytes; a scratch would cost a second plaintext copy and a device buffer per layer.

**Failures on CUDA** are deferred (``DecryptStatus.device``): ``load_errors`` reads them through the
backend's ``pending_failures(owner)`` (which waits for the device and writes each failing chunk's
AUTH_FAILED record into the log) and the status tensors. vLLM calls it after the forward, when it reads
the step's output anyway; ``wait_for_layer_load`` runs inside the forward, where a wait would stall it.

Files: ``<storage>/<tenant tag hex>/<prefix hash>/L<layer>-p<pos>.pkvb``, one per layer and saved part
(``pos`` = the part's first position); ``index.json`` (format ``pqc_kv_cache/vllm-prefix-2``) names the
parts and is written last. A ``.pkvb`` file is a 4-byte big-endian header length, a JSON header (format
``pqc_kv_cache/vllm-layer-1``: session, epoch, layer, shape, dtype, per chunk its position start and
count, nonce counter, offset and length) and the chunks' ciphertexts, each with its tag, back to back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from ..audit import KVAuditLog
from ..backends import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot
from ..envelope import session_tag, tenant_tag
from ..errors import DecryptionError, KVCacheError

__all__ = ["LAYOUTS", "kv_block_views", "prefix_dir", "read_stored_layer", "read_index", "MalformedStoreError",
           "SavePart", "LoadRequest", "KVBlockStore", "INDEX", "LAYER_FORMAT", "PREFIX_FORMAT"]

INDEX = "index.json"
LAYER_FORMAT = "pqc_kv_cache/vllm-layer-1"
PREFIX_FORMAT = "pqc_kv_cache/vllm-prefix-2"
TAG = 16
RESERVE_BATCH = 4096
WINDOW = 1 << 15          # blocks per call window: an audit record's row is 16 bits (0xFFFF = none)
_HDR = struct.Struct(">I")

#: layout name -> what it is (see kv_block_views)
LAYOUTS = {
    "cpu": "[num_blocks, kv_heads, block_size, 2*head_dim]; per block and head, block_size rows of K then "
           "block_size rows of V (vLLM's CPU attention)",
    "kv_last": "[num_blocks, kv_heads, block_size, 2*head_dim]; per position K then V in the last axis, any "
               "strides (vLLM 0.32's FlashAttention, Triton and FlexAttention backends)",
    "kv_first": "[2, num_blocks, block_size, kv_heads, head_dim]; K then V on the first axis (FlashAttention "
                "in earlier vLLM versions)",
}


def kv_block_views(cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer's block tensor as ``[num_blocks, kv_heads, block_size, head_dim]`` views (no copy)."""
    if layout == "cpu":
        if cache.dim() != 4 or cache.shape[3] % 2:
            raise ValueError(f"the cpu layout is {LAYOUTS['cpu']}, got {tuple(cache.shape)}")
        nb, h, bs, two_d = cache.shape
        kv = cache.view(nb, h, 2, bs, two_d // 2)          # refuses a tensor whose blocks are not row-major
        return kv[:, :, 0], kv[:, :, 1]
    if layout == "kv_last":
        if cache.dim() != 4 or cache.shape[3] % 2:
            raise ValueError(f"the kv_last layout is {LAYOUTS['kv_last']}, got {tuple(cache.shape)}")
        d = cache.shape[3] // 2
        return cache[..., :d], cache[..., d:]
    if layout == "kv_first":
        if cache.dim() != 5 or cache.shape[0] != 2:
            raise ValueError(f"the kv_first layout is {LAYOUTS['kv_first']}, got {tuple(cache.shape)}")
        return cache[0].transpose(1, 2), cache[1].transpose(1, 2)
    raise ValueError(f"unknown KV block layout {layout!r}; known: {sorted(LAYOUTS)}")


def prefix_dir(storage_path: str, tenant_id: str, token_ids, block_size: int) -> str:
    """The directory of a tenant's stored prefix ``token_ids`` (already block-aligned)."""
    h = hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(b"bs=%d" % block_size)
    return os.path.join(storage_path, tenant_tag(tenant_id).hex(), h.hexdigest())


class MalformedStoreError(KVCacheError):
    """A stored KV file is missing, truncated, of another format version or not the connector's."""


def layer_file(directory: str, layer: int, pos_start: int) -> str:
    return os.path.join(directory, f"L{layer}-p{pos_start}.pkvb")


def read_stored_layer(path: str) -> tuple[dict, bytes]:
    """(header, ciphertext bytes) of one stored layer file; MalformedStoreError if it is not one of this
    format version."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        (n,) = _HDR.unpack_from(data, 0)
        header = json.loads(data[_HDR.size:_HDR.size + n])
    except (OSError, struct.error, ValueError) as e:
        raise MalformedStoreError(f"{path}: not a stored KV layer ({e})") from None
    if not isinstance(header, dict) or header.get("format") != LAYER_FORMAT:
        raise MalformedStoreError(f"{path}: not a {LAYER_FORMAT} file (format "
                                  f"{header.get('format') if isinstance(header, dict) else None!r})")
    if not isinstance(header.get("chunks"), list):
        raise MalformedStoreError(f"{path}: header without chunks")
    return header, data[_HDR.size + n:]


def read_index(directory: str) -> dict | None:
    """The index of a stored prefix, or None if there is none of this format version (no hit)."""
    try:
        with open(os.path.join(directory, INDEX)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != PREFIX_FORMAT:
        return None
    return index


def _write_atomic(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class SavePart:
    """Blocks of one request to seal in this step: ``block_ids[i]`` holds positions
    ``[(first_block + i) * block_size, ...)``. ``parts`` is set on the part that completes the prefix: the
    (first block, block count) of every part of it, so the index is written once all are on disk."""

    req_id: str
    tenant_id: str
    session_id: str
    directory: str
    block_ids: list[int]
    first_block: int
    num_tokens: int                                   # the whole stored prefix (a multiple of the block size)
    parts: list[tuple[int, int]] | None = None


@dataclass
class LoadRequest:
    """Blocks of one request to fill from its stored prefix: ``block_ids[i]`` gets positions
    ``[(first_block + i) * block_size, ...)``; ``parts`` as in the prefix's index."""

    req_id: str
    tenant_id: str
    session_id: str
    directory: str
    block_ids: list[int]
    first_block: int
    num_tokens: int
    parts: list[tuple[int, int]] = field(default_factory=list)


class KeySource(Protocol):
    """What the store needs of the key service (``KeyClient``)."""

    def reserve(self, tenant_id: str, session_id: str, count: int) -> Any: ...
    def key(self, tenant_id: str, session_id: str, epoch: int) -> bytes: ...


@dataclass
class _Sealed:
    """One layer's seal of a step, until its files are written."""

    layer: int
    layout: ChunkLayout
    host: torch.Tensor                               # the arena, on the host (pinned on CUDA)
    done: Any                                        # CUDA event of the copy, or None
    parts: list[tuple[SavePart, int, int, int]]      # part, epoch, first counter, arena offset


@dataclass
class _Opened:
    """One layer's open of a step, until its status is read."""

    layer: int
    status: Any                                      # DecryptStatus
    block_ids: np.ndarray                            # block id of each chunk
    arena: torch.Tensor                              # kept alive until the device has read it


class KVBlockStore:
    """The worker side of the connector over one backend and one audit log (see the module docstring).

    ``backend``: ``select_backend(device)`` of the KV caches (or a twin in tests); ``log``: the worker's
    KVAuditLog; ``keys``: the key service's client; ``layout``: a key of LAYOUTS."""

    def __init__(self, backend: CryptoBackend, log: KVAuditLog, keys: KeySource, block_size: int, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown KV block layout {layout!r}; known: {sorted(LAYOUTS)}")
        self.backend, self.log, self.keys = backend, log, keys
        self.block_size, self.layout = block_size, layout
        self._reservations: dict[tuple[str, str], list] = {}
        self._open_keys: dict[tuple[str, str, int], bytes] = {}
        self._failed_saves: set[str] = set()
        self._saved: dict[str, set[tuple[int, int]]] = {}   # req -> (layer, part's first block) on disk
        self._sealed: list[_Sealed] = []
        self._opened: list[_Opened] = []
        self._load_errors: set[int] = set()

    # ------------------------------------------------------------------ helpers
    def _chunk_layout(self, layer: int, k: torch.Tensor) -> ChunkLayout:
        return ChunkLayout(layer_idx=layer, num_heads=k.shape[1], head_dim=k.shape[3], dtype=k.dtype)

    def _check_blocks(self, k: torch.Tensor) -> None:
        if k.shape[2] != self.block_size:
            raise ValueError(f"the KV block tensor has blocks of {k.shape[2]} positions, not {self.block_size}")

    def _audit(self, slots: list[tuple[str, str]]) -> AuditContext:
        return AuditContext(self.log, np.array([self.log.tenant_index(t) for t, _ in slots], np.uint32),
                            np.array([self.log.session_index(s, t) for t, s in slots], np.uint32))

    def _nonces(self, tenant: str, session: str, n: int) -> tuple[int, int, bytes]:
        """(epoch, first counter, key) for ``n`` chunks, from the current reservation or a new one."""
        r = self._reservations.get((tenant, session))
        if r is None or r[2] - r[1] < n:
            res = self.keys.reserve(tenant, session, max(n, RESERVE_BATCH))
            r = [res.epoch, res.first, res.first + res.count, res.key]
            self._reservations[(tenant, session)] = r
        first = r[1]
        r[1] += n
        return r[0], first, r[3]

    @staticmethod
    def _calls(table: dict[str, np.ndarray], k: torch.Tensor, v: torch.Tensor):
        """(ChunkTable, K view, V view, first block) per window of WINDOW blocks: one, unless block ids pass
        WINDOW - 1."""
        window = table["row"] // WINDOW
        ws = np.unique(window)
        for w in ws:
            sel = window == w if ws.shape[0] > 1 else slice(None)
            base = int(w) * WINDOW
            cols = {f: np.ascontiguousarray(table[f][sel]) for f in ChunkTable.fields()}
            cols["row"] = cols["row"] - base
            yield ChunkTable(**cols), k[base:base + WINDOW], v[base:base + WINDOW], base

    # ------------------------------------------------------------------ save
    def save_layer(self, layer: int, cache: torch.Tensor, parts: Sequence[SavePart]) -> None:
        """Seal ``parts``' blocks of one layer (one encrypt call) and start copying the ciphertext to the host;
        ``finish_saves`` writes the files. A part whose key the key service refuses is not stored (its
        request's prefix never gets an index) and the refusal is recorded once."""
        k, v = kv_block_views(cache, self.layout)
        self._check_blocks(k)
        layout = self._chunk_layout(layer, k)
        bs = self.block_size
        chunk_bytes = bs * layout.bytes_per_position
        slots: dict[tuple[str, str, int], int] = {}
        keys: list[KeySlot] = []
        who: list[tuple[str, str]] = []
        cols: dict[str, list[np.ndarray]] = {f: [] for f in ChunkTable.fields()}
        placed: list[tuple[SavePart, int, int, int]] = []
        offset = 0
        for p in parts:
            if p.req_id in self._failed_saves or not p.block_ids:
                continue
            n = len(p.block_ids)
            try:
                epoch, first, key = self._nonces(p.tenant_id, p.session_id, n)
            except KVCacheError as e:
                # no key (closed or expired session, no key service): this prefix is not stored, and vLLM
                # goes on computing; the refusal is on record
                self._failed_saves.add(p.req_id)
                self.log.log_encrypt(p.tenant_id, p.session_id, layer, p.first_block * bs,
                                     position_count=n * bs, success=False, details=f"save refused: {e}")
                continue
            s = slots.get((p.tenant_id, p.session_id, epoch))
            if s is None:
                s = slots[(p.tenant_id, p.session_id, epoch)] = len(keys)
                keys.append(KeySlot(key, tenant_tag(p.tenant_id), session_tag(p.session_id), epoch))
                who.append((p.tenant_id, p.session_id))
            j = np.arange(n, dtype=np.int64)
            cols["slot"].append(np.full(n, s, np.int64))
            cols["row"].append(np.asarray(p.block_ids, dtype=np.int64))
            cols["pos_start"].append((p.first_block + j) * bs)
            cols["pos_count"].append(np.full(n, bs, np.int64))
            cols["io_start"].append(np.zeros(n, np.int64))
            cols["counter"].append(first + j)
            cols["offset"].append(offset + j * (chunk_bytes + TAG))
            placed.append((p, epoch, first, offset))
            offset += n * (chunk_bytes + TAG)
        if not placed:
            return
        table = {f: np.concatenate(c) for f, c in cols.items()}
        arena = torch.empty(offset, dtype=torch.uint8, device=k.device)
        audit = self._audit(who)
        for chunks, kw, vw, _ in self._calls(table, k, v):
            self.backend.encrypt_chunks(keys, layout, chunks, kw, vw, arena, audit)
        if arena.device.type == "cuda":
            # to pinned host memory without waiting: the files are written in finish_saves
            host = torch.empty(offset, dtype=torch.uint8, pin_memory=True)
            host.copy_(arena, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(arena.device))
        else:
            host, done = arena, None
        self._sealed.append(_Sealed(layer, layout, host, done, placed))

    def finish_saves(self, parts: Sequence[SavePart], layers: Iterable[int]) -> list[str]:
        """Write the files of this step's seals, then the index of each prefix whose every part is on disk in
        every layer of ``layers``. Returns the directories whose index was written."""
        bs = self.block_size
        sealed, self._sealed = self._sealed, []
        for s in sealed:
            if s.done is not None:
                s.done.synchronize()
            body = s.host.numpy()
            chunk_len = bs * s.layout.bytes_per_position + TAG
            for p, epoch, first, off in s.parts:
                n = len(p.block_ids)
                chunks = [{"pos_start": (p.first_block + i) * bs, "pos_count": bs, "counter": first + i,
                           "offset": i * chunk_len, "length": chunk_len} for i in range(n)]
                header = json.dumps({"format": LAYER_FORMAT, "session_id": p.session_id, "epoch": epoch,
                                     "layer": s.layer, "block_size": bs, "num_heads": s.layout.num_heads,
                                     "head_dim": s.layout.head_dim,
                                     "dtype": str(s.layout.dtype).removeprefix("torch."),
                                     "chunks": chunks}).encode()
                os.makedirs(p.directory, mode=0o700, exist_ok=True)
                _write_atomic(layer_file(p.directory, s.layer, p.first_block * bs),
                              _HDR.pack(len(header)) + header + body[off:off + n * chunk_len].tobytes())
                self._saved.setdefault(p.req_id, set()).add((s.layer, p.first_block))
        want = sorted(set(layers))
        written = []
        for p in parts:
            if p.parts is None:
                continue
            done = self._saved.pop(p.req_id, set())
            failed = p.req_id in self._failed_saves
            self._failed_saves.discard(p.req_id)
            if failed:
                continue
            if not all((layer, first) in done for layer in want for first, _ in p.parts):
                continue        # some layer or part was not saved: no index, so no hit on a partial prefix
            _write_atomic(os.path.join(p.directory, INDEX), json.dumps(
                {"format": PREFIX_FORMAT, "session_id": p.session_id, "num_tokens": p.num_tokens,
                 "block_size": bs, "layers": want, "parts": [list(x) for x in p.parts]}).encode())
            written.append(p.directory)
        return written

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop what the store keeps of finished requests (parts saved without their prefix completing)."""
        for r in req_ids:
            self._saved.pop(r, None)
            self._failed_saves.discard(r)

    # ------------------------------------------------------------------ load
    def _read(self, req: LoadRequest, layer: int, chunk_len: int) -> list[tuple[int, int, int, bytes, int]]:
        """(block id, epoch, counter, ciphertext with tag, pos_start) of each of ``req``'s blocks in ``layer``,
        read from its files and checked against the request (MalformedStoreError / KVCacheError if not)."""
        bs = self.block_size
        chunks: dict[int, tuple[int, dict, bytes]] = {}
        for first, count in req.parts:
            lo, hi = first * bs, (first + count) * bs
            if hi <= req.first_block * bs:
                continue                              # a part vLLM already holds (prefix-cache hit)
            path = layer_file(req.directory, layer, lo)
            header, body = read_stored_layer(path)
            if header.get("session_id") != req.session_id:
                raise MalformedStoreError(f"{path}: stored under another session")
            if header.get("layer") != layer or header.get("block_size") != bs:
                raise MalformedStoreError(f"{path}: not layer {layer} in blocks of {bs}")
            epoch = int(header["epoch"])
            for c in header["chunks"]:
                ps = int(c["pos_start"])
                if lo <= ps < hi:
                    chunks[ps] = (epoch, c, body)
        out = []
        for i, block_id in enumerate(req.block_ids):
            pos = (req.first_block + i) * bs
            got = chunks.get(pos)
            if got is None:
                raise MalformedStoreError(f"{req.directory}: layer {layer} has no chunk for positions "
                                          f"{pos}..{pos + bs - 1}")
            epoch, c, body = got
            off, ln = int(c["offset"]), int(c["length"])
            if int(c["pos_count"]) != bs or ln != chunk_len or off < 0 or off + ln > len(body):
                raise MalformedStoreError(f"{req.directory}: layer {layer}, chunk at {pos} has the wrong size")
            out.append((int(block_id), epoch, int(c["counter"]), body[off:off + ln], pos))
        return out

    def _key(self, tenant: str, session: str, epoch: int) -> bytes:
        ck = (tenant, session, epoch)
        if ck not in self._open_keys:
            self._open_keys[ck] = self.keys.key(tenant, session, epoch)
        return self._open_keys[ck]

    def load(self, loads: Sequence[LoadRequest], layers: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Fill ``loads``' blocks in every layer of ``layers`` ((layer index, block tensor)); see the module
        docstring for what a refused or failing request gets."""
        if not loads:
            return
        bs = self.block_size
        views = {}
        for layer, cache in layers:
            k, v = kv_block_views(cache, self.layout)
            self._check_blocks(k)
            views[layer] = (k, v, bs * self._chunk_layout(layer, k).bytes_per_position + TAG)
        read: dict[int, list[tuple[LoadRequest, list]]] = {layer: [] for layer, _ in layers}
        refused: list[LoadRequest] = []
        for req in loads:
            per_layer, why = {}, None
            for layer, _ in layers:
                try:
                    per_layer[layer] = self._read(req, layer, views[layer][2])
                    for epoch in {x[1] for x in per_layer[layer]}:
                        self._key(req.tenant_id, req.session_id, epoch)
                except (KVCacheError, KeyError, TypeError, ValueError) as e:
                    why = why or f"load refused: {e}"
                    self.log.log_decrypt(req.tenant_id, req.session_id, layer, req.first_block * bs,
                                         position_count=len(req.block_ids) * bs, success=False,
                                         details=f"load refused: {e}")
            if why is not None:
                refused.append(req)
            else:
                for layer in per_layer:
                    read[layer].append((req, per_layer[layer]))
        for layer, _ in layers:
            k, v, _ = views[layer]
            for req in refused:        # nothing of a refused request is opened; its blocks hold no stale bytes
                for b in req.block_ids:
                    k[b].zero_()
                    v[b].zero_()
            if read[layer]:
                self._open_layer(layer, k, v, read[layer])
        for req in refused:
            self._load_errors.update(int(b) for b in req.block_ids)

    def _open_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, reqs) -> None:
        layout = self._chunk_layout(layer, k)
        slots: dict[tuple[str, str, int], int] = {}
        keys: list[KeySlot] = []
        who: list[tuple[str, str]] = []
        rows, slot, pos, ctr, offs, parts = [], [], [], [], [], []
        off = 0
        for req, chunks in reqs:
            for block_id, epoch, counter, ct, ps in chunks:
                s = slots.get((req.tenant_id, req.session_id, epoch))
                if s is None:
                    s = slots[(req.tenant_id, req.session_id, epoch)] = len(keys)
                    keys.append(KeySlot(self._key(req.tenant_id, req.session_id, epoch), tenant_tag(req.tenant_id),
                                        session_tag(req.session_id), epoch))
                    who.append((req.tenant_id, req.session_id))
                rows.append(block_id)
                slot.append(s)
                pos.append(ps)
                ctr.append(counter)
                offs.append(off)
                parts.append(ct)
                off += len(ct)
        n = len(rows)
        table = {"slot": np.asarray(slot, np.int64), "row": np.asarray(rows, np.int64),
                 "pos_start": np.asarray(pos, np.int64), "pos_count": np.full(n, self.block_size, np.int64),
                 "io_start": np.zeros(n, np.int64), "counter": np.asarray(ctr, np.int64),
                 "offset": np.asarray(offs, np.int64)}
        host = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
        if k.device.type == "cuda":
            arena = host.pin_memory().to(k.device, non_blocking=True)
        else:
            arena = host
        audit = self._audit(who)
        for chunks, kw, vw, base in self._calls(table, k, v):
            status = self.backend.decrypt_chunks(keys, layout, chunks, arena, kw, vw, audit, owner=self)
            self._opened.append(_Opened(layer, status, chunks.row + base, arena))

    def load_errors(self) -> set[int]:
        """Block ids of this step's loads that are not verified KV (vLLM recomputes them or fails their
        request): refused requests' blocks and every block whose tag failed. On CUDA this waits for the
        device (the caller's synchronisation point) and writes the failing chunks' records into the log."""
        errors, self._load_errors = self._load_errors, set()
        opened, self._opened = self._opened, []
        if any(o.status.deferred for o in opened):
            try:
                self.backend.check(self)      # waits for the device; the failures' records go to the log
            except DecryptionError:
                pass                          # which blocks failed: from the statuses below
        for o in opened:
            st = o.status.host if not o.status.deferred else o.status.device.cpu().numpy()
            errors.update(int(b) for b in o.block_ids[np.flatnonzero(st)])
        return errors

    def close(self) -> None:
        """Drop every key the store holds (and the backend's cached schedules)."""
        self._reservations.clear()
        self._open_keys.clear()
        self.backend.forget_keys()
