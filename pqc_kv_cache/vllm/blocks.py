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
the step's work is done) waits for those copies and writes one file per block holding its chunk of every
layer, through a temporary file renamed over the block's name (so a block is on disk whole or not at all,
and engines saving it at once each leave a whole file), then a SAVE record per request.

**Load.** ``load`` reads and checks the files of every request first (host only); a request with a
missing, malformed or foreign file, or a key the key service refuses, is not opened at all: its blocks
are zeroed in every layer and reported, and a malformed file is removed (unless another engine has renamed
a new one over it since), so that the block's next save stores it afresh rather than every later request
failing on it. A loaded block's file gets its access time set (its last use, for clean-up). The others are
opened straight into vLLM's blocks, one ``decrypt_chunks`` per layer. A chunk whose tag fails has its block
zeroed by the backend (on CUDA on the stream, before the forward reads it) and is reported by
``load_errors`` (which removes its file as above). Decrypting in place is right here: the destination blocks
were allocated to the request for exactly these positions (blocks vLLM already had are counted as computed
and not loaded), a block another request of the same step shares through vLLM's prefix cache is recomputed
for every request that uses it once it is reported, and zeros are not unverified bytes; a scratch would
cost a second plaintext copy and a device buffer per layer.

**Failures on CUDA** are deferred (``DecryptStatus.device``): ``load_errors`` reads them through the
backend's ``pending_failures(owner)`` (which waits for the device and writes each failing chunk's
AUTH_FAILED record into the log) and the status tensors. vLLM calls it after the forward, when it reads
the step's output anyway; ``wait_for_layer_load`` runs inside the forward, where a wait would stall it.

Files, names, the prefix chain hash bound into each chunk's AAD, and the checks on hostile files:
``pqc_kv_cache.vllm.storefiles``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from ..audit import KVAuditLog
from ..backends import AuditContext, ChunkLayout, ChunkTable, CryptoBackend, KeySlot
from ..envelope import tenant_tag
from ..errors import DecryptionError, KVCacheError
from .storefiles import (MalformedStoreError, bound_session_tag, encode_block, make_session_dir, read_block,
                         remove_if_same, write_atomic)

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
    """Blocks of one request to seal in this step: ``block_ids[i]`` holds the prompt's block ``indices[i]``
    (positions ``[indices[i] * block_size, ...)``), whose chain hash is ``chains[i]`` and whose file is
    ``paths[i]`` (``storefiles.block_file``)."""

    req_id: str
    tenant_id: str
    session_id: str
    block_ids: list[int]
    indices: list[int]
    chains: list[bytes]                               # the chain hash of each block (storefiles.chain_hashes)
    paths: list[str]


@dataclass
class LoadRequest:
    """Blocks of one request to fill from the store: ``block_ids[i]`` gets the prompt's block ``indices[i]``
    from the file ``paths[i]``, whose chunks must authenticate for chain hash ``chains[i]``."""

    req_id: str
    tenant_id: str
    session_id: str
    block_ids: list[int]
    indices: list[int]
    chains: list[bytes]
    paths: list[str]


def _spans(indices: Sequence[int]) -> str:
    """``0-3,7`` for blocks 0, 1, 2, 3 and 7."""
    out, run = [], None
    for i in sorted(indices):
        if run is not None and i == run[1] + 1:
            run[1] = i
            continue
        if run is not None:
            out.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
        run = [i, i]
    if run is not None:
        out.append(f"{run[0]}-{run[1]}" if run[1] > run[0] else str(run[0]))
    return ",".join(out)


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


_U32 = (1 << 32) - 1            # a record's byte count; a larger file's size is in its details


@dataclass
class _Opened:
    """One layer's open of a step, until its status is read."""

    layer: int
    status: Any                                      # DecryptStatus
    block_ids: np.ndarray                            # block id of each chunk
    files: list[tuple[str, Any, str, str]]           # (path, status when read, tenant, session) per chunk
    arena: torch.Tensor                              # kept alive until the device has read it


class KVBlockStore:
    """The worker side of the connector over one backend and one audit log (see the module docstring).

    ``backend``: ``select_backend(device)`` of the KV caches (or a twin in tests); ``log``: the worker's
    KVAuditLog; ``keys``: the key service's client; ``layout``: a key of LAYOUTS."""

    def __init__(self, backend: CryptoBackend, log: KVAuditLog, keys: KeySource, block_size: int, layout: str,
                 model: bytes = b""):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown KV block layout {layout!r}; known: {sorted(LAYOUTS)}")
        if not isinstance(model, bytes) or len(model) not in (0, 32):
            raise ValueError("model must be a 32-byte model_fingerprint (or empty)")
        self.model = model                  # written in each block file's header and checked on read
        self.backend, self.log, self.keys = backend, log, keys
        self.block_size, self.layout = block_size, layout
        self._reservations: dict[tuple[str, str], list] = {}
        self._open_keys: dict[tuple[str, str, int], bytes] = {}
        self._step_need: dict[tuple[str, str], int] = {}
        self._failed_saves: set[str] = set()
        self._read_files: dict[str, Any] = {}               # block file -> its status when this step read it
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
        ``finish_saves`` writes the files. A part whose key the key service refuses is not stored and the
        refusal is recorded once."""
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
            if not len(p.chains) == len(p.indices) == len(p.paths) == n:
                raise ValueError(f"part of {p.req_id}: {n} blocks, {len(p.indices)} indices, {len(p.chains)} chain "
                                 f"hashes and {len(p.paths)} paths")
            try:
                epoch, first, key = self._nonces(p.tenant_id, p.session_id, n)
            except KVCacheError as e:
                # no key (closed or expired session, no key service): these blocks are not stored, and vLLM
                # goes on computing; the refusal is on record
                self._failed_saves.add(p.req_id)
                self.log.log_encrypt(p.tenant_id, p.session_id, layer, p.indices[0] * bs,
                                     position_count=n * bs, success=False,
                                     details=f"save refused (request {p.req_id}): {e}")
                continue
            # one key slot per block: its AAD's session tag binds the session and the block's token prefix
            cols["slot"].append(np.arange(len(keys), len(keys) + n, dtype=np.int64))
            tt = tenant_tag(p.tenant_id)
            for chain in p.chains:
                keys.append(KeySlot(key, tt, bound_session_tag(p.session_id, chain), epoch))
                who.append((p.tenant_id, p.session_id))
            j = np.arange(n, dtype=np.int64)
            cols["row"].append(np.asarray(p.block_ids, dtype=np.int64))
            cols["pos_start"].append(np.asarray(p.indices, dtype=np.int64) * bs)
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
        """Write this step's sealed blocks: one file per block, holding its chunk of every layer of ``layers``,
        through a temporary file renamed over the block's name (another engine saving the same block at once
        leaves a whole file too). Returns the paths written."""
        bs = self.block_size
        want = sorted(set(layers))
        sealed, self._sealed = self._sealed, []
        # (request, block's position in its part) -> layer -> (header entry, chunk)
        got: dict[tuple[str, int], dict[int, tuple[dict, bytes]]] = {}
        for s in sealed:
            if s.done is not None:
                s.done.synchronize()
            body = s.host.numpy()
            chunk_len = bs * s.layout.bytes_per_position + TAG
            for p, epoch, first, off in s.parts:
                for j in range(len(p.block_ids)):
                    o = off + j * chunk_len
                    got.setdefault((p.req_id, j), {})[s.layer] = (
                        {"layer": s.layer, "num_heads": s.layout.num_heads, "head_dim": s.layout.head_dim,
                         "epoch": epoch, "counter": first + j}, body[o:o + chunk_len].tobytes())
        dtypes = {str(s.layout.dtype).removeprefix("torch.") for s in sealed}
        written: list[str] = []
        for p in parts:
            failed = p.req_id in self._failed_saves
            self._failed_saves.discard(p.req_id)
            if failed or not p.block_ids:
                continue
            mine: list[int] = []
            try:
                for j, path in enumerate(p.paths):
                    per_layer = got.get((p.req_id, j), {})
                    if any(layer not in per_layer for layer in want) or len(dtypes) != 1:
                        raise MalformedStoreError(f"block {p.indices[j]} was not sealed in every layer {want} "
                                                  f"in one dtype")
                    entries = [per_layer[layer][0] for layer in want]
                    if len({(e["num_heads"], e["head_dim"]) for e in entries}) != 1:
                        raise MalformedStoreError("layers of different head counts or sizes are not stored")
                    directory = os.path.dirname(path)
                    tenant_dir = os.path.dirname(directory)
                    make_session_dir(os.path.dirname(tenant_dir), os.path.basename(tenant_dir),
                                     os.path.basename(directory))
                    write_atomic(path, encode_block(block_size=bs, dtype=next(iter(dtypes)), index=p.indices[j],
                                                    model=self.model, layers=entries,
                                                    body=b"".join(per_layer[layer][1] for layer in want)))
                    mine.append(j)
                    written.append(path)
            except (OSError, KVCacheError) as e:
                # a full disk or a planted link: the rest of these blocks are not stored, vLLM goes on; on record
                j = len(mine)
                self.log.log_encrypt(p.tenant_id, p.session_id, want[0] if want else -1, p.indices[j] * bs,
                                     position_count=(len(p.block_ids) - j) * bs, success=False,
                                     details=f"save failed (request {p.req_id}): {e}")
            if mine:
                # the request's own record: its ENCRYPT records are the ones of its tenant, session and positions
                idx = [p.indices[j] for j in mine]
                self.log.log_event("save", p.tenant_id, p.session_id, position=idx[0] * bs,
                                   position_count=len(idx) * bs,
                                   details=f"request {p.req_id}: {len(idx)} block(s) stored (blocks {_spans(idx)}) "
                                           f"in {len(want)} layer(s)")
        return written

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop what the store keeps of finished requests."""
        for r in req_ids:
            self._failed_saves.discard(r)

    # ------------------------------------------------------------------ load
    def _read(self, req: LoadRequest, views: dict) -> dict[int, list[tuple[int, int, int, bytes, int]]]:
        """Per layer of ``views``: (block id, epoch, counter, ciphertext with tag, pos_start) of each of
        ``req``'s blocks, read from its files and checked against the request (MalformedStoreError if not)."""
        bs = self.block_size
        lays = [views[layer][2] for layer in views]
        chunk_lens = {views[layer][3] for layer in views}
        if len(chunk_lens) != 1 or len({(x.num_heads, x.head_dim, x.dtype) for x in lays}) != 1:
            raise MalformedStoreError("layers of different head counts, sizes or dtypes are not stored")
        lay, cl = lays[0], chunk_lens.pop()
        dtype = str(lay.dtype).removeprefix("torch.")
        out: dict[int, list] = {layer: [] for layer in views}
        for block_id, index, path in zip(req.block_ids, req.indices, req.paths):
            try:
                h, body, st = read_block(path, cl)
                self._read_files[path] = st
                entries = {e["layer"]: (i, e) for i, e in enumerate(h["layers"])}
                if (h["block_size"], h["index"], h["dtype"], h["model"]) != (bs, index, dtype, self.model.hex()) or any(
                        layer not in entries or (entries[layer][1]["num_heads"], entries[layer][1]["head_dim"]) !=
                        (lay.num_heads, lay.head_dim) for layer in views):
                    err = MalformedStoreError(f"{path}: not block {index} of {bs} positions in {dtype} "
                                              f"[{lay.num_heads} x {lay.head_dim}] of layers {sorted(views)} "
                                              f"of this model")
                    err.stat = st
                    raise err
            except MalformedStoreError as e:
                e.path = path
                raise
            for layer in views:
                i, e = entries[layer]
                out[layer].append((int(block_id), e["epoch"], e["counter"], body[i * cl:(i + 1) * cl], index * bs))
        return out

    def _key(self, tenant: str, session: str, epoch: int) -> bytes:
        ck = (tenant, session, epoch)
        if ck not in self._open_keys:
            self._open_keys[ck] = self.keys.key(tenant, session, epoch)
        return self._open_keys[ck]

    def _drop_file(self, path: str, st: Any, tenant_id: str, session_id: str, why: str) -> bool:
        """Remove a block file found bad (malformed, or a tag that failed), unless another engine has replaced
        it since it was read, so that the block's next save stores it afresh; each removal is a DELETE record."""
        if st is None or not remove_if_same(path, st):
            return False
        self.log.log_event("delete", tenant_id, session_id, nbytes=min(st.st_size, _U32),
                           details=f"vllm block store: block file {os.path.basename(path)} of {st.st_size} bytes "
                                   f"deleted ({why})")
        return True

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
            try:
                if not len(req.chains) == len(req.indices) == len(req.paths) == len(req.block_ids):
                    raise MalformedStoreError(f"{len(req.block_ids)} blocks, {len(req.indices)} indices, "
                                              f"{len(req.chains)} chain hashes and {len(req.paths)} paths")
                per_layer = self._read(req, views)
                for epoch in {x[1] for chunks in per_layer.values() for x in chunks}:
                    self._key(req.tenant_id, req.session_id, epoch)
            except KVCacheError as e:        # a bad or missing file, a refused key: this request only
                dropped = isinstance(e, MalformedStoreError) and self._drop_file(
                    e.path, e.stat, req.tenant_id, req.session_id, f"malformed: {e}")
                refused.append(req)
                self.log.log_decrypt(req.tenant_id, req.session_id, -1, req.indices[0] * bs if req.indices else 0,
                                     position_count=len(req.block_ids) * bs, success=False,
                                     details=f"load refused (request {req.req_id}): {e}"
                                             + (" (the bad file is removed)" if dropped else ""))
                continue
            for layer in per_layer:
                read[layer].append((req, per_layer[layer]))
            now = time.time_ns()
            for path in req.paths:      # the block's last use, for clean-up (least recently used first)
                try:
                    os.utime(path, ns=(now, self._read_files[path].st_mtime_ns), follow_symlinks=False)
                except (OSError, KeyError):
                    pass
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
                self.log.log_event("load", req.tenant_id, req.session_id, position=req.indices[0] * bs,
                                   position_count=len(req.block_ids) * bs,
                                   details=f"request {req.req_id}: {len(req.block_ids)} block(s) opened (blocks "
                                           f"{_spans(req.indices)}) in {len(layers)} layer(s)")

    def _open_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, reqs) -> None:
        layout = self._chunk_layout(layer, k)
        keys: list[KeySlot] = []
        who: list[tuple[str, str]] = []
        rows, slot, pos, ctr, offs, parts, files = [], [], [], [], [], [], []
        off = 0
        for req, chunks in reqs:
            tt = tenant_tag(req.tenant_id)
            for (block_id, epoch, counter, ct, ps), chain, path in zip(chunks, req.chains, req.paths):
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
                files.append((path, self._read_files.get(path), req.tenant_id, req.session_id))
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
        window = table["row"] // WINDOW
        for chunks, kw, vw, base in self._calls(table, k, v):
            status = self.backend.decrypt_chunks(keys, layout, chunks, arena, kw, vw, audit, owner=self)
            sel = np.flatnonzero(window == base // WINDOW)
            self._opened.append(_Opened(layer, status, chunks.row + base, [files[i] for i in sel], arena))

    def load_errors(self) -> set[int]:
        """Block ids of this step's loads that are not verified KV (vLLM recomputes them or fails their
        request): refused requests' blocks and every block whose tag failed (whose file is then removed, so
        that the block's next save stores it afresh; the failure is on record). On CUDA this waits for the
        device (the caller's synchronisation point) and writes the failing chunks' records into the log."""
        errors, self._load_errors = self._load_errors, set()
        opened, self._opened = self._opened, []
        self._read_files = {}
        if any(o.status.deferred for o in opened):
            try:
                self.backend.check(self)      # waits for the device; the failures' records go to the log
            except DecryptionError:
                pass                          # which blocks failed: from the statuses below
        for o in opened:
            st = o.status.host if not o.status.deferred else o.status.device.cpu().numpy()
            bad = np.flatnonzero(st)
            errors.update(int(b) for b in o.block_ids[bad])
            for i in bad:
                self._drop_file(*o.files[int(i)], f"a tag failed in layer {o.layer}")
        return errors

    def close(self) -> None:
        """Drop every key the store holds (and the backend's cached schedules)."""
        self._reservations.clear()
        self._open_keys.clear()
        self._step_need.clear()
        self.backend.forget_keys()
