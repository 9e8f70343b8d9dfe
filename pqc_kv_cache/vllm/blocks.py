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

Files, names, the prefix chain hash bound into each chunk's AAD, and the checks on hostile files:
``pqc_kv_cache.vllm.storefiles``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from ..audit import KVAuditLog
from ..backends import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot
from ..envelope import tenant_tag
from ..errors import DecryptionError, KVCacheError
from .storefiles import (MalformedStoreError, bound_session_tag, encode_layer, layer_file, make_private_dirs,
                         read_stored_layer, write_atomic, write_index)

__all__ = ["LAYOUTS", "kv_block_views", "SavePart", "LoadRequest", "KVBlockStore"]

TAG = 16
WINDOW = 1 << 15          # blocks per call window: an audit record's row is 16 bits (0xFFFF = none)

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
    chains: list[bytes]                               # the chain hash of each block (storefiles.chain_hashes)
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
    chains: list[bytes]                               # the chain hash of each block (storefiles.chain_hashes)
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
        self._step_need: dict[tuple[str, str], int] = {}
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
        idx: dict[tuple[str, str], tuple[int, int]] = {}
        for t, s in slots:        # a slot per block: look each (tenant, session) up once
            if (t, s) not in idx:
                idx[(t, s)] = (self.log.tenant_index(t), self.log.session_index(s, t))
        both = np.array([idx[ts] for ts in slots], np.uint32).reshape(-1, 2)
        return AuditContext(self.log, np.ascontiguousarray(both[:, 0]), np.ascontiguousarray(both[:, 1]))

    def begin_step(self, parts: Sequence[SavePart], num_layers: int) -> None:
        """Forget every key and nonce reservation of earlier steps, so that a session closed, expired or
        rotated since is refused or sealed under its new epoch from this step on; the counters this step's
        ``parts`` need in ``num_layers`` layers are then reserved with one request per session."""
        self._reservations.clear()
        self._open_keys.clear()
        self._step_need = {}
        for p in parts:
            key = (p.tenant_id, p.session_id)
            self._step_need[key] = self._step_need.get(key, 0) + len(p.block_ids) * max(num_layers, 1)

    def _nonces(self, tenant: str, session: str, n: int) -> tuple[int, int, bytes]:
        """(epoch, first counter, key) for ``n`` chunks, from the step's reservation or a new one."""
        r = self._reservations.get((tenant, session))
        if r is None or r[2] - r[1] < n:
            res = self.keys.reserve(tenant, session, max(n, self._step_need.pop((tenant, session), n)))
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
        keys: list[KeySlot] = []
        who: list[tuple[str, str]] = []
        cols: dict[str, list[np.ndarray]] = {f: [] for f in ChunkTable.fields()}
        placed: list[tuple[SavePart, int, int, int]] = []
        offset = 0
        for p in parts:
            if p.req_id in self._failed_saves or not p.block_ids:
                continue
            n = len(p.block_ids)
            if len(p.chains) != n:
                raise ValueError(f"part of {p.req_id}: {len(p.chains)} chain hashes for {n} blocks")
            try:
                epoch, first, key = self._nonces(p.tenant_id, p.session_id, n)
            except KVCacheError as e:
                # no key (closed or expired session, no key service): this prefix is not stored, and vLLM
                # goes on computing; the refusal is on record
                self._failed_saves.add(p.req_id)
                self.log.log_encrypt(p.tenant_id, p.session_id, layer, p.first_block * bs,
                                     position_count=n * bs, success=False, details=f"save refused (request {p.req_id}): {e}")
                continue
            # one key slot per block: its AAD's session tag binds the session and the block's token prefix
            cols["slot"].append(np.arange(len(keys), len(keys) + n, dtype=np.int64))
            tt = tenant_tag(p.tenant_id)
            for chain in p.chains:
                keys.append(KeySlot(key, tt, bound_session_tag(p.session_id, chain), epoch))
                who.append((p.tenant_id, p.session_id))
            j = np.arange(n, dtype=np.int64)
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
                try:
                    if p.req_id not in self._failed_saves:
                        store, tenant_dir = os.path.split(os.path.dirname(p.directory))
                        make_private_dirs(store, tenant_dir, os.path.basename(p.directory))
                        write_atomic(layer_file(p.directory, s.layer, p.first_block * bs), encode_layer(
                            epoch=epoch, layer=s.layer, block_size=bs, num_heads=s.layout.num_heads,
                            head_dim=s.layout.head_dim, dtype=str(s.layout.dtype).removeprefix("torch."),
                            first=p.first_block, counters=range(first, first + n),
                            body=body[off:off + n * chunk_len].tobytes()))
                        self._saved.setdefault(p.req_id, set()).add((s.layer, p.first_block))
                except (OSError, KVCacheError) as e:
                    # a full disk or a planted link: this prefix is not stored, vLLM goes on; on record once
                    self._failed_saves.add(p.req_id)
                    self.log.log_encrypt(p.tenant_id, p.session_id, s.layer, p.first_block * bs,
                                         position_count=n * bs, success=False, details=f"save failed (request {p.req_id}): {e}")
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
            try:
                write_index(p.directory, p.num_tokens, bs, want, p.parts)
            except OSError as e:
                self.log.log_encrypt(p.tenant_id, p.session_id, want[0], 0, position_count=p.num_tokens,
                                     success=False, details=f"save failed (request {p.req_id}): index: {e}")
                continue
            written.append(p.directory)
            # the request's own record: its ENCRYPT records are the ones of its tenant, session and positions
            self.log.log_event("save", p.tenant_id, p.session_id, position=0, position_count=p.num_tokens,
                               details=f"request {p.req_id}: a prefix of {p.num_tokens} tokens stored in "
                                       f"{len(want)} layer(s)")
        return written

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop what the store keeps of finished requests (parts saved without their prefix completing)."""
        for r in req_ids:
            self._saved.pop(r, None)
            self._failed_saves.discard(r)

    # ------------------------------------------------------------------ load
    def _read(self, req: LoadRequest, layer: int, layout: ChunkLayout, chunk_len: int) -> list[tuple[int, int, int, bytes, int]]:
        """(block id, epoch, counter, ciphertext with tag, pos_start) of each of ``req``'s blocks in ``layer``,
        read from its files and checked against the request (MalformedStoreError if not)."""
        bs = self.block_size
        chunks: dict[int, tuple[int, int, bytes]] = {}
        dtype = str(layout.dtype).removeprefix("torch.")
        for first, count in req.parts:
            if first + count <= req.first_block:
                continue                              # a part vLLM already holds (prefix-cache hit)
            path = layer_file(req.directory, layer, first * bs)
            h, body = read_stored_layer(path, chunk_len, count)
            if (h["layer"], h["block_size"], h["first"], len(h["counters"])) != (layer, bs, first, count) or \
                    (h["num_heads"], h["head_dim"], h["dtype"]) != (layout.num_heads, layout.head_dim, dtype):
                raise MalformedStoreError(f"{path}: not {count} blocks of {bs} from block {first} of layer {layer} "
                                          f"in {dtype} [{layout.num_heads} x {layout.head_dim}]")
            for j, counter in enumerate(h["counters"]):
                chunks[first + j] = (h["epoch"], counter, body[j * chunk_len:(j + 1) * chunk_len])
        out = []
        for i, block_id in enumerate(req.block_ids):
            got = chunks.get(req.first_block + i)
            pos = (req.first_block + i) * bs
            if got is None:
                raise MalformedStoreError(f"{req.directory}: layer {layer} has no chunk for positions "
                                          f"{pos}..{pos + bs - 1}")
            epoch, counter, ct = got
            out.append((int(block_id), epoch, counter, ct, pos))
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
            lay = self._chunk_layout(layer, k)
            views[layer] = (k, v, lay, bs * lay.bytes_per_position + TAG)
        read: dict[int, list[tuple[LoadRequest, list]]] = {layer: [] for layer, _ in layers}
        refused: list[LoadRequest] = []
        for req in loads:
            per_layer, why = {}, None
            for layer, _ in layers:
                try:
                    if len(req.chains) != len(req.block_ids):
                        raise MalformedStoreError(f"{len(req.chains)} chain hashes for {len(req.block_ids)} blocks")
                    per_layer[layer] = self._read(req, layer, views[layer][2], views[layer][3])
                    for epoch in {x[1] for x in per_layer[layer]}:
                        self._key(req.tenant_id, req.session_id, epoch)
                except KVCacheError as e:        # a bad or missing file, a refused key: this request only
                    why = why or f"load refused: {e}"
                    self.log.log_decrypt(req.tenant_id, req.session_id, layer, req.first_block * bs,
                                         position_count=len(req.block_ids) * bs, success=False,
                                         details=f"load refused (request {req.req_id}): {e}")
            if why is not None:
                refused.append(req)
            else:
                for layer in per_layer:
                    read[layer].append((req, per_layer[layer]))
        for layer, _ in layers:
            k, v, _, _ = views[layer]
            for req in refused:        # nothing of a refused request is opened; its blocks hold no stale bytes
                for b in req.block_ids:
                    k[b].zero_()
                    v[b].zero_()
            if read[layer]:
                self._open_layer(layer, k, v, read[layer])
        for req in refused:
            self._load_errors.update(int(b) for b in req.block_ids)
        for req in loads:
            if req not in refused:   # the request's own record; its DECRYPT records say which tags held
                self.log.log_event("load", req.tenant_id, req.session_id, position=req.first_block * bs,
                                   position_count=len(req.block_ids) * bs,
                                   details=f"request {req.req_id}: {len(req.block_ids)} block(s) opened in "
                                           f"{len(layers)} layer(s)")

    def _open_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, reqs) -> None:
        layout = self._chunk_layout(layer, k)
        keys: list[KeySlot] = []
        who: list[tuple[str, str]] = []
        rows, slot, pos, ctr, offs, parts = [], [], [], [], [], []
        off = 0
        for req, chunks in reqs:
            tt = tenant_tag(req.tenant_id)
            for (block_id, epoch, counter, ct, ps), chain in zip(chunks, req.chains):
                # the AAD is rebuilt from the request being served: its tenant, session and token prefix
                slot.append(len(keys))
                keys.append(KeySlot(self._key(req.tenant_id, req.session_id, epoch), tt,
                                    bound_session_tag(req.session_id, chain), epoch))
                who.append((req.tenant_id, req.session_id))
                rows.append(block_id)
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
        self._step_need.clear()
        self.backend.forget_keys()
