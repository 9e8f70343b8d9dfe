"""``PQCKVConnector``: a vLLM v1 KV connector that stores only sealed, tenant-bound, audited KV.

Loaded by vLLM from ``kv_transfer_config`` (see docs/vllm.md)::

    {"kv_connector": "PQCKVConnector", "kv_connector_module_path": "pqc_kv_cache.vllm.connector",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"storage_path": DIR, "key_service": SOCKET, "audit_log": FILE}}

Scheduler side (no keys, no audit): reads the tenant of each request from ``kv_transfer_params``, checks
that its ``cache_salt`` is the tenant's, and answers hits only from that tenant's directory and session.
Worker side: per attention layer and block, seals K then V (AES-256-GCM, envelope v1 AAD binding tenant,
session, epoch, layer, positions, shape) with a key and nonce counters from the key service, writes
ciphertext files, and on load opens every chunk of a request (all layers) before writing any byte into
vLLM's blocks. Every seal and open (and every refusal) is a record of the ``KVAuditLog``.

Storage layout: ``<storage_path>/<tenant tag hex>/<prefix hash>/L<layer>.pkvb`` and ``index.json``
(written last, after every layer of the prefix is on disk). A ``.pkvb`` file is a 4-byte big-endian
header length, a JSON header (session, epoch, layer, shape, dtype, per chunk: position start and count,
nonce counter, byte length) and the chunks' ciphertexts (each with its 16-byte tag) back to back.
Each chunk opens with plain ``AESGCM(key).decrypt(make_nonce(epoch, counter), ct, build_aad(...))``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from ..audit import KVAuditLog
from ..envelope import build_aad, make_nonce, tenant_tag
from ..errors import KVCacheError
from .keyservice import KeyClient
from .tenancy import PARAMS_KEY, tenant_cache_salt

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["PQCKVConnector", "PQCConnectorMetadata", "read_stored_layer", "prefix_dir"]

_HDR = struct.Struct(">I")
_RESERVE_BATCH = 4096
_INDEX = "index.json"


def _aligned(num_prompt_tokens: int, block_size: int) -> int:
    """Tokens of the prompt that are stored: whole blocks, leaving at least the last token to compute."""
    return max(num_prompt_tokens - 1, 0) // block_size * block_size


def prefix_dir(storage_path: str, tenant_id: str, token_ids, block_size: int) -> str:
    """The directory of a tenant's stored prefix ``token_ids`` (already block-aligned)."""
    h = hashlib.sha256(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(b"bs=%d" % block_size)
    return os.path.join(storage_path, tenant_tag(tenant_id).hex(), h.hexdigest())


def read_stored_layer(path: str) -> tuple[dict, bytes]:
    """(header, ciphertext bytes) of one stored layer file; MalformedStoreError if it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        (n,) = _HDR.unpack_from(data, 0)
        header = json.loads(data[_HDR.size:_HDR.size + n])
    except (OSError, struct.error, ValueError) as e:
        raise MalformedStoreError(f"{path}: not a stored KV layer ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("chunks"), list):
        raise MalformedStoreError(f"{path}: header without chunks")
    return header, data[_HDR.size + n:]


class MalformedStoreError(KVCacheError):
    """A stored KV file is missing, truncated or not in the connector's format."""


@dataclass
class _Req:
    req_id: str
    tenant_id: str
    session_id: str
    directory: str
    block_ids: list[int]        # blocks holding positions [first_block*bs, num_tokens)
    first_block: int            # index (in the request) of block_ids[0]
    num_tokens: int             # stored prefix length (a multiple of the block size)


@dataclass
class _Refusal:
    req_id: str
    tenant_id: str
    session_id: str
    reason: str


@dataclass
class PQCConnectorMetadata(KVConnectorMetadata):
    loads: list[_Req] = field(default_factory=list)
    stores: list[_Req] = field(default_factory=list)
    refusals: list[_Refusal] = field(default_factory=list)


def _tenant_of(request: "Request") -> tuple[str, str] | None:
    params = request.kv_transfer_params
    if not isinstance(params, dict):
        return None
    p = params.get(PARAMS_KEY)
    if not isinstance(p, dict):
        return None
    tenant, session = p.get("tenant_id"), p.get("session_id")
    if not isinstance(tenant, str) or not tenant or not isinstance(session, str) or not session:
        return None
    return tenant, session


class PQCKVConnector(KVConnectorBase_V1):
    """Encrypting, tenant-binding, auditing KV connector (see the module docstring and docs/vllm.md).

    A request without ``kv_transfer_params[\"pqc_kv_cache\"]`` (tenant and session ids) passes through: vLLM
    computes it as usual, and the connector neither stores nor loads anything for it. A request whose
    ``cache_salt`` is not its tenant's is refused the same way, and the refusal is recorded as an
    isolation violation.
    """

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._block_size = vllm_config.cache_config.block_size
        self._storage = cfg.get_from_extra_config("storage_path", None)
        if not isinstance(self._storage, str) or not self._storage:
            raise ValueError("PQCKVConnector needs kv_connector_extra_config['storage_path']")
        # scheduler side
        self._pending_loads: dict[str, _Req] = {}
        self._pending_refusals: list[_Refusal] = []
        self._refused: set[str] = set()
        self._stored_or_loading: set[str] = set()
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._load_errors: set[int] = set()
        self._audit: KVAuditLog | None = None
        self._keys: KeyClient | None = None
        self._reservations: dict[tuple[str, str], list] = {}
        self._open_keys: dict[tuple[str, str, int], AESGCM] = {}
        self._saved_layers: dict[str, set[int]] = {}
        self._failed_saves: set[str] = set()
        if role == KVConnectorRole.WORKER:
            socket_path = cfg.get_from_extra_config("key_service", None)
            audit_path = cfg.get_from_extra_config("audit_log", None)
            if not socket_path or not audit_path:
                raise ValueError("PQCKVConnector (worker) needs kv_connector_extra_config['key_service'] and "
                                 "['audit_log']")
            self._keys = KeyClient(socket_path)
            self._audit = KVAuditLog(audit_path)

    # ------------------------------------------------------------------ scheduler side
    def _check_request(self, request: "Request") -> tuple[str, str] | None:
        """(tenant, session) of a request the connector serves; None to pass it through (refusals queued)."""
        ts = _tenant_of(request)
        if ts is None:
            return None
        if request.request_id in self._refused:
            return None
        if request.cache_salt != tenant_cache_salt(ts[0]):
            self._refused.add(request.request_id)
            self._pending_refusals.append(_Refusal(request.request_id, ts[0], ts[1],
                                                   "cache_salt is not bound to the tenant"))
            return None
        return ts

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        ts = self._check_request(request)
        if ts is None:
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        n = _aligned(len(tokens), self._block_size)
        if n == 0 or n <= num_computed_tokens:
            return 0, False
        directory = prefix_dir(self._storage, ts[0], tokens[:n], self._block_size)
        try:
            with open(os.path.join(directory, _INDEX)) as f:
                index = json.load(f)
        except (OSError, ValueError):
            return 0, False
        if index.get("session_id") != ts[1] or index.get("num_tokens") != n:
            return 0, False          # stored under another session of the tenant: its key may be gone
        return n - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        ts = _tenant_of(request)
        assert ts is not None
        tokens = list(request.prompt_token_ids or [])
        n = _aligned(len(tokens), self._block_size)
        block_ids = list(blocks.get_block_ids()[0])
        first = (n - num_external_tokens) // self._block_size
        self._pending_loads[request.request_id] = _Req(
            request.request_id, ts[0], ts[1], prefix_dir(self._storage, ts[0], tokens[:n], self._block_size),
            block_ids[first:n // self._block_size], first, n)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PQCConnectorMetadata(refusals=self._pending_refusals)
        self._pending_refusals = []
        for new_req in scheduler_output.scheduled_new_reqs:
            load = self._pending_loads.pop(new_req.req_id, None)
            if load is not None:
                meta.loads.append(load)
                continue
            if new_req.req_id in self._refused or new_req.sampling_params is None:
                continue
            params = (new_req.sampling_params.extra_args or {}).get("kv_transfer_params")
            p = params.get(PARAMS_KEY) if isinstance(params, dict) else None
            if not isinstance(p, dict):
                continue
            tokens = list(new_req.prompt_token_ids or [])
            n = _aligned(len(tokens), self._block_size)
            # store only a prompt computed whole in this step (a chunked prefill is not stored)
            if n == 0 or scheduler_output.num_scheduled_tokens.get(new_req.req_id, 0) + \
                    new_req.num_computed_tokens < len(tokens):
                continue
            directory = prefix_dir(self._storage, p["tenant_id"], tokens[:n], self._block_size)
            if os.path.exists(os.path.join(directory, _INDEX)):
                continue
            meta.stores.append(_Req(new_req.req_id, p["tenant_id"], p["session_id"], directory,
                                    list(new_req.block_ids[0][:n // self._block_size]), 0, n))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._refused.discard(request.request_id)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        for name, t in kv_caches.items():
            # vLLM's CPU attention layout; other backends (CUDA: K and V apart, other block layouts) are not
            # supported yet, and refused here at start-up rather than sealed wrongly
            if t.device.type != "cpu" or t.dim() != 4 or t.shape[2] != self._block_size or t.shape[3] % 2:
                raise ValueError(f"PQCKVConnector supports vLLM's CPU KV layout [num_blocks, kv_heads, "
                                 f"block_size, 2*head_dim] only; layer {name} has {tuple(t.shape)} on {t.device}")
        self._kv_caches = dict(kv_caches)

    def _layers(self) -> list[tuple[str, int, torch.Tensor]]:
        return sorted(((name, extract_layer_index(name), t) for name, t in self._kv_caches.items()),
                      key=lambda x: x[1])

    @staticmethod
    def _split(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one block of vLLM's CPU layout ``[kv_heads, block_size, 2*head_dim]`` (per head: the
        block's K rows then its V rows)."""
        h, bs, two_d = block.shape
        v = block.reshape(h, 2, bs, two_d // 2)
        return v[:, 0], v[:, 1]

    def _nonces(self, tenant: str, session: str, n: int) -> tuple[int, int, bytes]:
        """(epoch, first counter, key) for ``n`` chunks, from the current reservation or a new one."""
        r = self._reservations.get((tenant, session))
        if r is None or r[2] - r[1] < n:
            assert self._keys is not None
            res = self._keys.reserve(tenant, session, max(n, _RESERVE_BATCH))
            r = [res.epoch, res.first, res.first + res.count, res.key]
            self._reservations[(tenant, session)] = r
        first = r[1]
        r[1] += n
        return r[0], first, r[3]

    def _aad(self, req: _Req, epoch: int, layer: int, pos: int, count: int, key_len: int, heads: int, hd: int,
             dtype) -> bytes:
        return build_aad(tenant_id=req.tenant_id, session_id=req.session_id, epoch=epoch, layer_idx=layer,
                         position=pos, position_count=count, key_len=key_len, dtype=str(dtype),
                         num_heads=heads, head_dim=hd)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PQCConnectorMetadata)
        assert self._audit is not None
        for r in meta.refusals:
            # the salt is a hash: whose tenant (if any) it belongs to is not known here
            self._audit.log_isolation_violation(r.tenant_id, "unknown", r.reason, session_id=r.session_id)
        for req in meta.loads:
            self._load(req)

    def _load(self, req: _Req) -> None:
        """Open every chunk of every layer of ``req``; write them into vLLM's blocks only if all verified."""
        assert self._audit is not None and self._keys is not None
        bs = self._block_size
        opened: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        failed = False
        for name, layer, cache in self._layers():
            path = os.path.join(req.directory, f"L{layer}.pkvb")
            try:
                header, body = read_stored_layer(path)
                if header.get("session_id") != req.session_id:
                    raise MalformedStoreError(f"{path}: stored under another session")
                epoch = int(header["epoch"])
                ck = (req.tenant_id, req.session_id, epoch)
                if ck not in self._open_keys:
                    self._open_keys[ck] = AESGCM(self._keys.key(req.tenant_id, req.session_id, epoch))
                aes = self._open_keys[ck]
                chunks = {int(c["pos_start"]): c for c in header["chunks"]}
            except (KVCacheError, KeyError, TypeError, ValueError) as e:
                self._audit.log_decrypt(req.tenant_id, req.session_id, layer, 0, position_count=req.num_tokens,
                                        success=False, details=f"load refused: {e}")
                failed = True
                continue
            heads, hd = cache.shape[1], cache.shape[3] // 2
            k_len = heads * bs * hd * cache.element_size()
            for i, block_id in enumerate(req.block_ids):
                pos = (req.first_block + i) * bs
                c = chunks.get(pos)
                try:
                    if c is None:
                        raise MalformedStoreError(f"{path}: no chunk for positions {pos}..{pos + bs - 1}")
                    off, ln, counter = int(c["offset"]), int(c["length"]), int(c["counter"])
                    if int(c["pos_count"]) != bs or ln != 2 * k_len + 16 or off + ln > len(body):
                        raise MalformedStoreError(f"{path}: chunk at {pos} has the wrong size")
                    plain = aes.decrypt(make_nonce(epoch, counter), body[off:off + ln],
                                        self._aad(req, epoch, layer, pos, bs, k_len, heads, hd, cache.dtype))
                except (InvalidTag, KVCacheError, KeyError, TypeError, ValueError) as e:
                    why = "authentication failed" if isinstance(e, InvalidTag) else str(e)
                    self._audit.log_decrypt(req.tenant_id, req.session_id, layer, pos, position_count=bs,
                                            success=False, details=f"load refused: {why}")
                    failed = True
                    continue
                kv = torch.frombuffer(bytearray(plain), dtype=cache.dtype).reshape(2, heads, bs, hd)
                opened.append((cache, block_id, torch.cat([kv[0], kv[1]], dim=1)))
                self._audit.log_decrypt(req.tenant_id, req.session_id, layer, pos, position_count=bs,
                                        sequence_number=counter, epoch=epoch, nbytes=ln - 16)
        if failed:
            # nothing of this request is written: vLLM recomputes (or fails) these blocks per its policy
            self._load_errors.update(req.block_ids)
            return
        for cache, block_id, value in opened:
            cache[block_id].view(value.shape[0], -1, value.shape[2]).copy_(value)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PQCConnectorMetadata)
        if not meta.stores:
            return
        assert self._audit is not None
        layer = extract_layer_index(layer_name)
        bs = self._block_size
        heads, hd = kv_layer.shape[1], kv_layer.shape[3] // 2
        k_len = heads * bs * hd * kv_layer.element_size()
        for req in meta.stores:
            if req.req_id in self._failed_saves:
                continue
            try:
                epoch, first, key = self._nonces(req.tenant_id, req.session_id, len(req.block_ids))
            except KVCacheError as e:
                # no key (closed or expired session, no key service): this prefix is not stored, and vLLM
                # goes on computing; the refusal is on record
                self._failed_saves.add(req.req_id)
                self._audit.log_encrypt(req.tenant_id, req.session_id, layer, 0, position_count=req.num_tokens,
                                        success=False, details=f"save refused: {e}")
                continue
            aes = AESGCM(key)
            parts, chunks, off = [], [], 0
            for i, block_id in enumerate(req.block_ids):
                pos = i * bs
                k, v = self._split(kv_layer[block_id])
                plain = (k.contiguous().view(torch.uint8).numpy().tobytes()
                         + v.contiguous().view(torch.uint8).numpy().tobytes())
                counter = first + i
                ct = aes.encrypt(make_nonce(epoch, counter), plain,
                                 self._aad(req, epoch, layer, pos, bs, k_len, heads, hd, kv_layer.dtype))
                parts.append(ct)
                chunks.append({"pos_start": pos, "pos_count": bs, "counter": counter, "offset": off,
                               "length": len(ct)})
                off += len(ct)
                self._audit.log_encrypt(req.tenant_id, req.session_id, layer, pos, position_count=bs,
                                        sequence_number=counter, epoch=epoch, nbytes=len(plain))
            header = json.dumps({"format": "pqc_kv_cache/vllm-layer-1", "session_id": req.session_id,
                                 "epoch": epoch, "layer": layer, "block_size": bs, "num_heads": heads,
                                 "head_dim": hd, "dtype": str(kv_layer.dtype).removeprefix("torch."),
                                 "chunks": chunks}).encode()
            os.makedirs(req.directory, mode=0o700, exist_ok=True)
            tmp = os.path.join(req.directory, f".L{layer}.pkvb.tmp")
            with open(tmp, "wb") as f:
                f.write(_HDR.pack(len(header)) + header + b"".join(parts))
            os.replace(tmp, os.path.join(req.directory, f"L{layer}.pkvb"))
            self._saved_layers.setdefault(req.req_id, set()).add(layer)

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, PQCConnectorMetadata):
            return
        want = {idx for _, idx, _ in self._layers()}
        for req in meta.stores:
            done = self._saved_layers.pop(req.req_id, set())
            if req.req_id in self._failed_saves:
                self._failed_saves.discard(req.req_id)
                continue
            if done != want:
                continue        # some layer was not saved: no index, so no hit on a partial prefix
            tmp = os.path.join(req.directory, "." + _INDEX + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"session_id": req.session_id, "num_tokens": req.num_tokens,
                           "layers": sorted(want)}, f)
            os.replace(tmp, os.path.join(req.directory, _INDEX))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        self._open_keys.clear()
        self._reservations.clear()
