"""What a static cache's layers may use of their cache: the operators' handle and the shared state tensors.

A static layer is handed one ``StaticContext``; it never sees the cache. The context is started by the
first layer that learns the batch (its ``lazy_initialization``, or ``early_initialization``): then the
rows are mapped to session slots, the backend is chosen, the ``StaticSealer`` is registered with the
operators, and the nonce ranges, record buffer and failure record are allocated once, on the cache's
device, at addresses that never change. A device other than the CPU needs a backend that seals and opens a
layer there (``seal_static`` and ``open_static``). Everything that must run on the host between steps (refilling
nonce ranges, draining records, raising failures) is a method here, called by the cache outside any
compiled region.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..audit.records import Op, Status
from ..backends import select_backend
from ..backends.base import CryptoBackend
from ..errors import TenantIsolationError
from ..ops import register_handler, unregister_handler
from ..session import TenantSession
from .audit import CacheAuditor
from .context import row_slots_for_batch
from .static_sealer import StaticSealer
from .static_state import NonceRanges, RecordBuffer, SealFailures

if TYPE_CHECKING:   # annotations only: the cache writes records, it does not import the log
    from ..audit.log import KVAuditLog

__all__ = ["StaticContext"]


class StaticContext:
    """Sessions, rows, backend, audit and the operators' state of one static cache.

    ``layers`` and ``max_cache_len`` size the default nonce reservation (every position of a sequence of
    ``max_cache_len`` written once in every layer by every row of a session; a sliding layer's ring is
    written at every position too) and the default record buffer (the ENCRYPT records of such a sequence
    and one READ per layer, row and step, at most as many again)."""

    def __init__(self, sessions: Sequence[TenantSession], prompt_slots: np.ndarray, rows_per_session: int | None,
                 log: KVAuditLog | None, backend: CryptoBackend | None, layers: int, max_cache_len: int,
                 audit_records: int | None, nonce_reserve: int | None):
        self.sessions = sessions
        self.prompt_slots = prompt_slots
        self.rows_per_session = rows_per_session
        self.auditor = CacheAuditor(log, sessions)
        self.backend = backend
        self.positions = layers * max_cache_len     # positions one row writes over all layers in a sequence
        self.layers = layers
        self.audit_records = audit_records
        self.nonce_reserve = nonce_reserve
        self.row_slots: np.ndarray | None = None
        self.device: torch.device | None = None
        self.handle_no = 0                 # the operators' number of this cache's sealer
        self.handle: torch.Tensor | None = None   # the same number as the operators take it
        self.sealer: StaticSealer | None = None
        self.nonces: NonceRanges | None = None
        self.records: RecordBuffer | None = None
        self.failures: SealFailures | None = None
        self.closed = False
        self._settings = (sessions, prompt_slots, rows_per_session, log, backend, layers, max_cache_len,
                          audit_records, nonce_reserve)

    def fresh(self) -> "StaticContext":
        """A new, unstarted context with the same sessions, log, backend and settings (a deepcopy's): started,
        it reserves nonce ranges of its own from the sessions and has its own record buffer."""
        sessions, prompt, per, log, backend, layers, max_cache_len, records, reserve = self._settings
        return StaticContext(sessions, prompt, per, log, self.backend if self.backend is not None else backend,
                             layers, max_cache_len, records, reserve)

    @property
    def started(self) -> bool:
        return self.sealer is not None

    def start(self, batch: int, device: torch.device, rows: np.ndarray | None = None, reserve: bool = True) -> None:
        """Map ``batch`` rows to session slots (``rows``: given, as a save file lists them) and allocate the
        operators' state on ``device`` (once); ``reserve``: reserve the nonce ranges now (a load reserves
        them only once the sessions have taken what the file says of them)."""
        if self.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        device = torch.device(device)
        if device.index is None and device.type not in ("cpu", "meta"):
            device = torch.empty(0, device=device).device      # "cuda" -> the current "cuda:N", as tensors name it
        if self.started:
            if batch != self.row_slots.size or device != self.device:
                raise ValueError(f"this static cache holds {self.row_slots.size} rows on {self.device}; got a "
                                 f"batch of {batch} on {device}")
            return
        if torch.compiler.is_compiling():
            raise RuntimeError("a StaticEncryptedCache must be initialised before its first compiled step: call "
                               "cache.early_initialization(batch_size, num_heads, head_dim, dtype, device) (or run "
                               "one step uncompiled) before torch.compile traces the model")
        if rows is None:
            rows = row_slots_for_batch(self.prompt_slots, self.rows_per_session, batch)
        for slot in np.unique(rows).tolist():
            self.sessions[slot].check_valid()
        backend = self.backend if self.backend is not None else select_backend(device)
        if device.type != "cpu" and not (callable(getattr(backend, "seal_static", None))
                                         and callable(getattr(backend, "open_static", None))):
            raise ValueError(f"StaticEncryptedCache on {device} needs a backend that seals and opens a layer step "
                             f"on that device (seal_static and open_static); {type(backend).__name__} does not")
        tenant_idx = session_idx = None
        capacity = 0
        if self.auditor.enabled:
            tenant_idx, session_idx = self.auditor.arrays(np.arange(len(self.sessions)))
            default = 2 * batch * self.positions + 2 * batch * self.layers
            capacity = default if self.audit_records is None else self.audit_records
        self.backend = backend
        self.row_slots = rows
        self.device = device
        self.nonces = NonceRanges(self.sessions, device)
        self.records = RecordBuffer(capacity, device)
        self.failures = SealFailures(device)
        for t in (*self.nonces.tensors(), self.records.records, self.records.head, self.failures.tensor):
            torch._dynamo.mark_static_address(t)
        nonces = self.nonces
        self.sealer = StaticSealer(self.sessions, rows, backend, tenant_idx, session_idx,
                                   host_epochs=lambda: nonces.epoch_host)
        self.handle_no = register_handler(self.sealer)
        self.handle = torch.tensor(self.handle_no, dtype=torch.int64)
        torch._dynamo.mark_static_address(self.handle)
        if reserve:
            self.refill()

    # ---- between steps (never inside a compiled region) ---------------------------------------------------
    def want(self) -> np.ndarray:
        """Counters each session slot should have in reserve."""
        per_row = self.positions if self.nonce_reserve is None else self.nonce_reserve
        return np.bincount(self.row_slots, minlength=len(self.sessions)) * per_row

    def refill(self) -> None:
        if self.started and not self.closed:
            self.nonces.refill(self.want())

    def drain(self) -> int:
        return self.records.drain(self.auditor.log) if self.started else 0

    def check(self) -> None:
        """Drain the records, refill the nonce ranges, then raise the first failure since the last check."""
        if not self.started:
            return
        self.drain()
        self.refill()
        self.failures.check(self.sessions)

    def forget_keys(self, slot: int | None = None, epoch: int | None = None) -> None:
        if self.sealer is not None:
            self.sealer.forget_keys(slot, epoch)

    def beam_rows(self, beam_idx, layer_idx: int) -> np.ndarray:
        """``beam_idx`` (one row index per row) as int64 row indices; ValueError for another length or an
        index outside the batch, TenantIsolationError (and an ISOLATION_VIOLATION record per offending row)
        if a row would take a row of another session."""
        if isinstance(beam_idx, torch.Tensor):
            beam_idx = beam_idx.detach().cpu().numpy()
        idx = np.asarray(beam_idx)
        batch = self.row_slots.size
        if idx.ndim != 1 or idx.size != batch or idx.dtype.kind not in "iu":
            raise ValueError(f"beam_idx must hold one integer row index per row ({batch}), got {idx.shape} "
                             f"{idx.dtype}")
        if idx.size and (idx.min() < -batch or idx.max() >= batch):
            raise ValueError(f"beam_idx: row index out of range for a batch of {batch}")
        idx = idx.astype(np.int64) % batch
        bad = np.flatnonzero(self.row_slots[idx] != self.row_slots)
        if bad.size:
            r = int(bad[0])
            self.auditor.rows(Op.ISOLATION_VIOLATION, layer_idx, self.row_slots[bad], bad, status=Status.REFUSED,
                              now=True, nonce_counter=idx[bad].astype(np.uint64))
            raise TenantIsolationError(
                f"reorder would move row {int(idx[r])} (tenant {self.sessions[self.row_slots[idx[r]]].tenant_id!r})"
                f" into row {r} (tenant {self.sessions[self.row_slots[r]].tenant_id!r}): rows of different "
                "sessions are never mixed")
        return idx

    def rows_of(self, slot: int) -> np.ndarray:
        return np.zeros(0, dtype=np.int64) if self.row_slots is None else np.flatnonzero(self.row_slots == slot)

    def stop(self) -> None:
        """Unregister the operators' handler (the cache is closed); a compiled step calling them raises."""
        self.closed = True
        if self.handle_no:
            unregister_handler(self.handle_no)
        self.forget_keys()

    # ---- the operator arguments every layer passes ---------------------------------------------------------
    def seal_state(self) -> tuple:
        return (*self.nonces.tensors(), self.records.records, self.records.head, self.failures.tensor)

    def open_state(self) -> tuple:
        return self.records.records, self.records.head, self.failures.tensor
