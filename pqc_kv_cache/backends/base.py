"""The crypto backend contract: encrypt and decrypt batches of KV chunks, emit their audit records.

The cache decides *what* is stored where (which chunk holds which row and
positions, where its ciphertext lives in the layer's byte arena); a backend
decides *how* the bytes are sealed and opened. One contract, one
implementation per device (``host``: cryptography / OpenSSL; ``cuda``: the
kernels in ``kernels/``), chosen by the tensors' device — the cache never
branches on CUDA vs CPU.

Chunk plaintext (format v1): the K bytes then the V bytes of all KV heads of
one batch row for ``pos_count`` consecutive positions, each in the layout
``[heads, pos_count, head_dim]`` of the tensors' dtype (what
``k[row, :, s:s + n, :]`` holds). ``key_len`` = half the plaintext. The
ciphertext of chunk ``i`` is stored at ``arena[offset[i] : offset[i] + nbytes]``
followed by its 16-byte tag, where ``nbytes = 2 * pos_count * heads * head_dim
* itemsize``.

AAD of chunk ``i`` (see ``pqc_kv_cache.envelope``): kv_role "both",
``layout.dtype``, tenant and session tags and epoch of ``keys[slot[i]]``,
``layout.layer_idx``, ``pos_start[i]``, ``pos_count[i]``, key_len,
``layout.num_heads``, ``layout.head_dim``, token id -1.

Audit (when ``audit`` is given): ``encrypt_chunks`` emits one ENCRYPT record
per (row, position) written, with the chunk's nonce counter and epoch;
``decrypt_chunks`` emits one DECRYPT record per row read, covering the
positions read, status OK or AUTH_FAILED, and one AUTH_FAILED record per
failing chunk with its exact positions.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:   # annotations only: a backend writes records, it does not import the log
    from ..audit.log import KVAuditLog

#: One column of a ChunkTable: int64 values, numpy on the host, a tensor on a device.
IndexArray = Union[np.ndarray, torch.Tensor]

__all__ = ["KeySlot", "ChunkLayout", "ChunkTable", "AuditContext", "CryptoBackend", "select_backend"]


@dataclass(frozen=True)
class KeySlot:
    """One AES-256 key of a (session, epoch), and the AAD tags that go with it (its repr omits the key)."""

    key: bytes = field(repr=False)   # 32 bytes
    tenant_tag: bytes     # 16 bytes, envelope.tenant_tag(tenant_id)
    session_tag: bytes    # 16 bytes, envelope.session_tag(session_id)
    epoch: int


@dataclass(frozen=True)
class ChunkLayout:
    """What every chunk of one call shares: the layer and the tensors' shape and dtype."""

    layer_idx: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_position(self) -> int:
        """Plaintext bytes of one position of one row: K and V of all heads."""
        return 2 * self.num_heads * self.head_dim * self.itemsize


@dataclass
class ChunkTable:
    """N chunks as parallel int64 arrays (numpy for the host backend; int64 tensors on the device for cuda).

    slot       index into the call's ``keys``
    row        batch row in the source (encrypt) or destination (decrypt) tensors
    pos_start  first absolute position, bound into the AAD
    pos_count  number of positions
    io_start   index along the sequence dimension of the source / destination tensors
    counter    nonce counter (the nonce is keys[slot].epoch ‖ counter)
    offset     byte offset of the ciphertext in the arena (the tag follows it)
    """

    slot: IndexArray
    row: IndexArray
    pos_start: IndexArray
    pos_count: IndexArray
    io_start: IndexArray
    counter: IndexArray
    offset: IndexArray

    def __len__(self) -> int:
        return int(self.slot.shape[0])

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("slot", "row", "pos_start", "pos_count", "io_start", "counter", "offset")

    def to(self, device: torch.device) -> "ChunkTable":
        """The same table as int64 tensors on ``device`` (non-blocking from pinned memory where possible)."""
        def conv(a):
            if isinstance(a, torch.Tensor):
                return a.to(device=device, dtype=torch.int64, non_blocking=True)
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)
        return ChunkTable(*(conv(getattr(self, f)) for f in self.fields()))


@dataclass(frozen=True)
class AuditContext:
    """Where a backend writes the audit records of a call: the log and the log's
    tenant / session indices of each key slot (numpy uint32 arrays, one per slot)."""

    log: KVAuditLog
    tenant_idx: np.ndarray
    session_idx: np.ndarray


class CryptoBackend(abc.ABC):
    """Seal and open batches of chunks; the same contract on every device."""

    name: str = "abstract"

    @abc.abstractmethod
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        """Encrypt chunk i from ``k_src[row, :, io_start:io_start+pos_count, :]`` and the same of
        ``v_src`` ([batch, heads, seq, dim]) into ``arena`` (uint8, 1-D) at ``offset[i]``, tag after."""

    @abc.abstractmethod
    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None) -> Any:
        """Verify and decrypt chunk i into ``k_out[row, :, io_start:io_start+pos_count, :]`` and the
        same of ``v_out``. A chunk whose tag fails has its destination zeroed, never left readable.

        Returns the per-chunk status (uint8, 0 = OK, 1 = AUTH_FAILED): a numpy array on the host
        backend, a device tensor on cuda (read it only at a synchronisation point the caller owns).
        """


def select_backend(device: torch.device | str) -> CryptoBackend:
    """The backend for tensors on ``device``: cuda tensors get the CUDA backend, all else the native host
    backend when it is available, else the host backend (``PQC_KV_CACHE_BACKEND=host|native`` forces one)."""
    device = torch.device(device)
    if device.type == "cuda":
        from .cuda import CudaBackend
        return CudaBackend.for_device(device)
    from .native import select_host_backend
    return select_host_backend()
