"""``PQCKVConnector``: a vLLM v1 KV connector that stores only sealed, tenant-bound, audited KV.

Loaded by vLLM from ``kv_transfer_config`` (see docs/vllm.md)::

    {"kv_connector": "PQCKVConnector", "kv_connector_module_path": "pqc_kv_cache.vllm.connector",
     "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
     "kv_connector_extra_config": {"storage_path": DIR, "key_service": SOCKET, "audit_log": FILE,
                                   "server_secret": FILE}}

Scheduler side (no session keys, no audit): reads the tenant of each request from ``kv_transfer_params``,
checks that its ``cache_salt`` is the tenant's (a MAC under the server secret), passes requests with
multimodal inputs or prompt embeddings through unstored, and looks each of the prompt's whole blocks up under
its name (a MAC of tenant, session and the chain hash of the LoRA adapter and every token up to and including
the block): the longest run of leading blocks on disk is the hit, whichever request or engine stored them,
so a chat's next turn loads the turns before it and a system prompt is stored once per tenant session. It
decides per step which blocks are loaded and which are saved (the blocks past the hit that became whole in
the step and that no request of this engine is saving, so a prompt prefilled over several steps is saved
in parts).
Worker side: :class:`~pqc_kv_cache.vllm.blocks.KVBlockStore` over ``select_backend(device)`` of the KV
caches (the host backend on CPU, the CUDA backend on a GPU): one ``encrypt_chunks`` per layer and step for
every block saved, one ``decrypt_chunks`` per layer and step for every block loaded, the ENCRYPT / DECRYPT
records written by the backend into the worker's ``KVAuditLog`` (on CUDA into its device ring). Keys and
nonce counters come from the key service. Storage layout and file format: ``pqc_kv_cache.vllm.storefiles``.
"""

from __future__ import annotations

import atexit
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from ..audit import KVAuditLog
from ..audit.keys import default_key_path
from ..backends import select_backend
from ..errors import KVCacheError
from .blocks import KVBlockStore, LoadRequest, SavePart
from .keyservice import KeyClient
from .storefiles import block_file, chain_hashes, model_fingerprint
from .storegc import collect_garbage
from .tenancy import PARAMS_KEY, ServerSecret, load_server_secret

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["PQCKVConnector", "PQCConnectorMetadata", "ATTENTION_LAYOUTS"]

logger = logging.getLogger(__name__)

#: vLLM attention backend name -> the block layout its KV cache tensors have (pqc_kv_cache.vllm.blocks.LAYOUTS)
ATTENTION_LAYOUTS = {"CPU_ATTN": "cpu", "FLASH_ATTN": "kv_last", "TRITON_ATTN": "kv_last",
                     "FLEX_ATTENTION": "kv_last"}

# Steps for which a block handed to the worker to save counts as being saved though its file is not yet on
# disk: vLLM schedules at most one step ahead of the one running (async scheduling), so the file is written
# (or its save was refused) two steps later; the margin covers a scheduler that runs further ahead.
_HANDED_STEPS = 4


def _gc_config(value: Any) -> dict | None:
    """``kv_connector_extra_config['store_gc']``: None, or ``{"max_bytes": N, "max_age": S, "interval_s": T}``
    (each optional; ``interval_s`` default 600)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"max_bytes", "max_age", "interval_s"}:
        raise ValueError("kv_connector_extra_config['store_gc'] must be an object of max_bytes, max_age and "
                         f"interval_s, got {value!r:.200}")
    out = {"max_bytes": value.get("max_bytes"), "max_age": value.get("max_age"),
           "interval_s": value.get("interval_s", 600)}
    mb = out["max_bytes"]
    if mb is not None and (type(mb) is not int or mb < 0):
        raise ValueError(f"store_gc max_bytes must be an int >= 0, got {mb!r}")
    for k in ("max_age", "interval_s"):
        v = out[k]
        if v is not None and (type(v) not in (int, float) or not 0 <= v < float("inf")):
            raise ValueError(f"store_gc {k} must be a finite number of seconds >= 0, got {v!r}")
    if out["interval_s"] is None:
        raise ValueError("store_gc interval_s must be a number of seconds")
    return out


def model_of(vllm_config: Any) -> bytes:
    """``model_fingerprint`` of the engine's model from vLLM's configuration: the model's name or path, its
    revision, the KV cache dtype (the model's dtype when ``auto``), its layer count, KV heads and head size."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    kv_dtype = cc.cache_dtype if cc.cache_dtype != "auto" else str(mc.dtype).removeprefix("torch.")
    return model_fingerprint(str(mc.model), mc.revision, str(kv_dtype), mc.get_total_num_hidden_layers(),
                             mc.get_total_num_kv_heads(), mc.get_head_size())


def _is_file(path: str) -> bool:
    """Whether a regular file (not a link) is at ``path``."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _aligned(num_prompt_tokens: int, block_size: int) -> int:
    """Tokens of the prompt that are stored: whole blocks, leaving at least the last token to compute."""
    return max(num_prompt_tokens - 1, 0) // block_size * block_size


@dataclass
class _Refusal:
    req_id: str
    tenant_id: str
    session_id: str
    reason: str


@dataclass
class _Plan:
    """What the scheduler side decided for a request it serves: its stored prefix and where it lives."""

    tenant_id: str
    session_id: str
    num_tokens: int                                       # the prefix to store or load (whole blocks)
    chains: list[bytes]                                   # chain hash of each of its blocks
    paths: list[str]                                      # file of each of its blocks


@dataclass
class _Storing:
    """A request whose prompt prefix is being saved, on the scheduler side."""

    plan: _Plan
    block_ids: list[int]                                  # the request's blocks as vLLM last told them
    saved: int = 0                                        # blocks [0, saved) are stored or handed over


@dataclass
class PQCConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadRequest] = field(default_factory=list)
    stores: list[SavePart] = field(default_factory=list)
    refusals: list[_Refusal] = field(default_factory=list)


def _resumed(cached: Any) -> set[str]:
    """The requests of ``scheduled_cached_reqs`` resumed after preemption. vLLM 0.32 and 0.33 name them in
    ``resumed_req_ids``; 0.34 has no such field and re-sends a resumed request among the new ones, with all
    its blocks (``build_connector_meta`` handles both)."""
    return getattr(cached, "resumed_req_ids", None) or set()


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

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No (vLLM 0.33+ asks, and refuses sleep mode at start-up): the worker keeps the KV tensors vLLM
        registered, and reading them after sleep mode remapped them is untested."""
        return False

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            # every worker would write its own heads or layers under the same block names
            raise ValueError("PQCKVConnector runs with one worker per engine (tensor_parallel_size and "
                             "pipeline_parallel_size 1)")
        storage = cfg.get_from_extra_config("storage_path", None)
        secret_path = cfg.get_from_extra_config("server_secret", None)
        if not isinstance(storage, str) or not storage or not isinstance(secret_path, str) or not secret_path:
            raise ValueError("PQCKVConnector needs kv_connector_extra_config['storage_path'] and "
                             "['server_secret'] (the path of the server secret's key file)")
        self._init_scheduler_state(vllm_config.cache_config.block_size, storage, load_server_secret(secret_path),
                                   model_of(vllm_config))
        # worker side
        self._layers: list[tuple[int, torch.Tensor]] = []
        self._store: KVBlockStore | None = None
        self._audit: KVAuditLog | None = None
        self._keys: KeyClient | None = None
        if role == KVConnectorRole.WORKER:
            socket_path = cfg.get_from_extra_config("key_service", None)
            audit_path = cfg.get_from_extra_config("audit_log", None)
            if not socket_path or not audit_path:
                raise ValueError("PQCKVConnector (worker) needs kv_connector_extra_config['key_service'] and "
                                 "['audit_log']")
            # a signing key kept in a file (by default beside the user's other audit keys, outside the log's
            # folder), so that a restarted worker continues the same log rather than failing to start
            signing = cfg.get_from_extra_config("audit_signing_key", None) or str(default_key_path(audit_path))
            self._keys = KeyClient.from_config(cfg.get_from_extra_config)   # socket path or tls://HOST:PORT
            self._gc = _gc_config(cfg.get_from_extra_config("store_gc", None))
            self._gc_next = time.monotonic() + (self._gc["interval_s"] if self._gc else 0)
            self._gc_thread: threading.Thread | None = None
            self._audit = KVAuditLog(audit_path, signing_key=signing)
            atexit.register(self._close_audit)      # sealed when the worker exits without a shutdown call

    # ------------------------------------------------------------------ scheduler side
    def _init_scheduler_state(self, block_size: int, storage: str, secret: ServerSecret, model: bytes) -> None:
        """What the scheduler side keeps between steps (also how its tests build one without an engine);
        ``model``: the model's ``model_fingerprint``, in every chain hash and block file."""
        self._block_size = block_size
        self._model = model
        self._storage = storage
        self._secret = secret
        self._plans: dict[str, _Plan] = {}                     # requests the connector serves
        self._hits: dict[str, int] = {}                        # req -> leading blocks found on disk
        self._pending_loads: dict[str, LoadRequest] = {}
        self._pending_refusals: list[_Refusal] = []
        self._refused: set[str] = set()
        self._storing: dict[str, _Storing] = {}
        self._step = 0
        self._handed: dict[str, int] = {}                      # block file -> step it went to the worker
        self._started: set[str] = set()                        # requests whose storing was considered

    def _plan(self, request: "Request") -> _Plan | None:
        """The plan of a request the connector serves; None to pass it through (a refusal is queued for a
        request whose salt is not its tenant's)."""
        if request.request_id in self._plans:
            return self._plans[request.request_id]
        ts = _tenant_of(request)
        if ts is None or request.request_id in self._refused:
            return None
        if not self._secret.salt_matches(ts[0], request.cache_salt):
            self._refused.add(request.request_id)
            self._pending_refusals.append(_Refusal(request.request_id, ts[0], ts[1],
                                                   "cache_salt is not bound to the tenant"))
            return None
        # vLLM keys its own blocks on multimodal inputs and prompt embeddings too; such requests are computed
        # as usual and not stored (the LoRA adapter is keyed and bound below)
        if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
            return None
        tokens = list(request.prompt_token_ids or [])
        n = _aligned(len(tokens), self._block_size)
        if n == 0:
            return None
        lora = getattr(request, "lora_request", None)
        chains = chain_hashes(tokens[:n], self._block_size,
                              None if lora is None else (lora.lora_name, lora.lora_path), self._model)
        plan = _Plan(ts[0], ts[1], n, chains,
                     [block_file(self._storage, self._secret, ts[0], ts[1], c) for c in chains])
        self._plans[request.request_id] = plan
        return plan

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        plan = self._plan(request)
        if plan is None:
            return 0, False
        hit = 0
        for path in plan.paths:          # the longest run of leading blocks on disk
            if not _is_file(path):
                break
            hit += 1
        self._hits[request.request_id] = hit
        return max(hit * self._block_size - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        plan = self._plans[request.request_id]
        hit, bs = self._hits[request.request_id], self._block_size
        block_ids = list(blocks.get_block_ids()[0])
        first = (hit * bs - num_external_tokens) // bs
        self._pending_loads[request.request_id] = LoadRequest(
            request.request_id, plan.tenant_id, plan.session_id, block_ids[first:hit], list(range(first, hit)),
            plan.chains[first:hit], plan.paths[first:hit])

    def _start_storing(self, req_id: str, block_ids: list[int]) -> None:
        """Begin saving a new request's whole prompt blocks past those found on disk."""
        plan = self._plans.get(req_id)
        if plan is None:
            return
        start = self._hits.get(req_id, 0)
        if start * self._block_size < plan.num_tokens:
            self._storing[req_id] = _Storing(plan, list(block_ids), start)

    def _advance(self, meta: PQCConnectorMetadata, req_id: str, computed: int) -> None:
        """Hand the worker the blocks of ``req_id``'s prefix that are whole once this step has computed
        ``computed`` tokens, but for those on disk already or handed over for another request."""
        st = self._storing[req_id]
        p = st.plan
        whole = min(computed, p.num_tokens) // self._block_size
        if whole <= st.saved:
            return
        pick = [j for j in range(st.saved, whole) if p.paths[j] not in self._handed and not _is_file(p.paths[j])]
        st.saved = whole
        if whole * self._block_size == p.num_tokens:
            self._storing.pop(req_id, None)
        if not pick:
            return
        for j in pick:
            self._handed[p.paths[j]] = self._step
        meta.stores.append(SavePart(req_id, p.tenant_id, p.session_id, [st.block_ids[j] for j in pick], pick,
                                    [p.chains[j] for j in pick], [p.paths[j] for j in pick]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._step += 1
        if self._handed:
            self._handed = {d: s for d, s in self._handed.items() if self._step - s <= _HANDED_STEPS}
        # every pending load is of a request scheduled in this step (new or resumed after preemption)
        meta = PQCConnectorMetadata(loads=list(self._pending_loads.values()), refusals=self._pending_refusals)
        self._pending_loads, self._pending_refusals = {}, []
        scheduled = scheduler_output.num_scheduled_tokens
        for new_req in scheduler_output.scheduled_new_reqs:
            st = self._storing.get(new_req.req_id)
            if st is not None:
                # resumed after preemption, re-sent as new (vLLM 0.34): these are all its blocks
                st.block_ids = list(new_req.block_ids[0])
            elif new_req.req_id not in self._started:
                self._started.add(new_req.req_id)
                self._start_storing(new_req.req_id, list(new_req.block_ids[0]))
            if new_req.req_id in self._storing:
                self._advance(meta, new_req.req_id, new_req.num_computed_tokens + scheduled.get(new_req.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = _resumed(cached)
        for i, req_id in enumerate(cached.req_ids):
            st = self._storing.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                # resumed after preemption: these are all its blocks; what was saved before stays saved and is
                # not saved again, what is recomputed now is saved once whole
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._advance(meta, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # a request that ends before its prompt is whole has stored the blocks it computed: each is a hit alone
        self._refused.discard(request.request_id)
        self._plans.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._hits.pop(request.request_id, None)
        self._started.discard(request.request_id)
        self._storing.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side
    def _layout_of(self, name: str, t: torch.Tensor) -> str:
        """The block layout of layer ``name``'s tensor, from the attention backend vLLM chose for it."""
        layer = self._vllm_config.compilation_config.static_forward_context.get(name)
        backend = getattr(layer, "attn_backend", None)
        attn = backend.get_name() if backend is not None else ("CPU_ATTN" if t.device.type == "cpu" else None)
        layout = ATTENTION_LAYOUTS.get(attn)
        if layout is None:
            raise ValueError(f"PQCKVConnector supports the attention backends {sorted(ATTENTION_LAYOUTS)}; layer "
                             f"{name} uses {attn}")
        if layout == "kv_last" and t.dim() == 5:
            layout = "kv_first"
        head = self._vllm_config.model_config.get_head_size()
        ok = (t.dim() == 4 and t.shape[2] == self._block_size and t.shape[3] == 2 * head) if layout != "kv_first" \
            else (t.dim() == 5 and t.shape[0] == 2 and t.shape[2] == self._block_size and t.shape[4] == head)
        if not ok:
            raise ValueError(f"PQCKVConnector: layer {name} ({attn}) has a KV tensor {tuple(t.shape)} that is not "
                             f"the {layout} layout with blocks of {self._block_size} and head size {head}")
        return layout

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        layouts = {self._layout_of(name, t) for name, t in kv_caches.items()}
        devices = {t.device for t in kv_caches.values()}
        if len(layouts) != 1 or len(devices) != 1:
            raise ValueError(f"PQCKVConnector needs one KV layout and device for all layers, got {layouts} on "
                             f"{devices}")
        assert self._audit is not None and self._keys is not None
        self._layers = sorted(((extract_layer_index(name), t) for name, t in kv_caches.items()), key=lambda x: x[0])
        self._store = KVBlockStore(select_backend(devices.pop()), self._audit, self._keys, self._block_size,
                                   layouts.pop(), self._model)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # at the start of every step (before save_kv_layer and start_load_kv, whichever comes first): keys and
        # nonce reservations of earlier steps are dropped, so a session's close, expiry or rotation holds now
        if self._store is not None and isinstance(connector_metadata, PQCConnectorMetadata) and \
                (connector_metadata.stores or connector_metadata.loads):
            self._store.begin_step(connector_metadata.stores, len(self._layers))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PQCConnectorMetadata)
        if not meta.loads and not meta.refusals:
            return                       # nothing to load or record this step
        assert self._audit is not None and self._store is not None
        for r in meta.refusals:
            # the salt is a MAC: whose tenant (if any) it belongs to is not known here
            self._audit.log_isolation_violation(r.tenant_id, "unknown", f"{r.reason} (request {r.req_id})",
                                               session_id=r.session_id)
        # every layer's blocks of every load of the step, enqueued before the forward reads them; a failed
        # chunk's block is zeroed and reported by get_block_ids_with_load_errors
        self._store.load(meta.loads, self._layers)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # all layers were enqueued in start_load_kv, on the stream the forward runs on; waiting here (inside the
        # forward) for their tags would stall it, so failures are read in get_block_ids_with_load_errors
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PQCConnectorMetadata)
        if meta.stores:
            assert self._store is not None
            self._store.save_layer(extract_layer_index(layer_name), kv_layer, meta.stores)

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if isinstance(meta, PQCConnectorMetadata) and self._store is not None:
            self._store.finish_saves(meta.stores, [idx for idx, _ in self._layers])
        self._maybe_collect()

    def _maybe_collect(self) -> None:
        """With ``store_gc`` configured: a clean-up of the store (``vllm-store gc``) every ``interval_s``
        seconds, on a thread of its own (the step does not wait), its deletions recorded in the worker's log."""
        if not getattr(self, "_gc", None) or time.monotonic() < self._gc_next or self._audit is None or \
                (self._gc_thread is not None and self._gc_thread.is_alive()):
            return
        self._gc_next = time.monotonic() + self._gc["interval_s"]
        audit, storage = self._audit, self._storage

        def run() -> None:
            try:
                collect_garbage(storage, max_bytes=self._gc["max_bytes"], max_age=self._gc["max_age"], log=audit)
            except (OSError, ValueError, KVCacheError) as e:
                logger.warning("PQCKVConnector: store clean-up failed: %s", e)

        self._gc_thread = threading.Thread(target=run, name="pqc-kv-store-gc", daemon=True)
        self._gc_thread.start()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._store is not None:
            self._store.forget(finished_req_ids)
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._store.load_errors() if self._store is not None else set()

    def _close_audit(self) -> None:
        if self._audit is not None:
            audit, self._audit = self._audit, None
            audit.close(timeout=30)

    def shutdown(self):
        t = getattr(self, "_gc_thread", None)
        if t is not None:
            t.join(timeout=60)              # its records go to the log closed below
        if self._store is not None:
            self._store.close()
            self._store = None
        self._close_audit()
        atexit.unregister(self._close_audit)
