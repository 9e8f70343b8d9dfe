"""Seal and open a static cache's positions as ``torch.library`` custom operators.

``torch.compile(..., fullgraph=True)`` traces a model whose cache calls these
operators without a graph break: dynamo sees only their schema (which tensors
they mutate) and their fake implementation (no outputs), never the crypto.

What an operator does is decided by the object registered under its ``handle``
(an int64 scalar tensor holding the number ``register_handler`` gave: a tensor,
not an int, so that a new cache reuses the graphs compiled for an earlier one
instead of recompiling them for its number): the operator knows nothing of
sessions, keys, backends or audit logs, and the handler knows nothing of
dynamo. A handler answers ``seal(...)`` and ``open(...)`` with the arguments
of the operators below; the cache registers one handler per cache.

Every state the operators change lives in tensors passed to them (mutated in
place, declared in ``mutates_args``): the ciphertext arena and its slot table,
the nonce counters of each session slot, the audit record buffer and its head,
and the failure record. Nothing a later step needs is kept on the host, so a
step replays as it was traced.

The CPU implementation calls the handler on the host. The CUDA
implementations of both operators call the same handler, whose backend (the
CUDA one: ``seal_static`` and ``open_static``) does the work on the device, on
torch's current stream, without reading any tensor on the host (unverified on
a GPU: shown on the CPU twin of the CUDA backend only).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Protocol

import torch

__all__ = ["SealHandler", "register_handler", "unregister_handler", "seal_positions", "open_positions"]


class SealHandler(Protocol):
    """What the operators call (see ``seal_positions`` and ``open_positions`` for the arguments)."""

    def seal(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, io_index: torch.Tensor,
             positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor, nonce_next: torch.Tensor,
             nonce_end: torch.Tensor, nonce_epoch: torch.Tensor, records: torch.Tensor, record_head: torch.Tensor,
             failures: torch.Tensor, ring: bool) -> None: ...

    def open(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, end: torch.Tensor,
             arena: torch.Tensor, meta: torch.Tensor, released: torch.Tensor, records: torch.Tensor,
             record_head: torch.Tensor, failures: torch.Tensor, ring: bool) -> None: ...


_LOCK = threading.Lock()
_HANDLERS: dict[int, "weakref.ref[SealHandler]"] = {}
_NUMBERS = itertools.count(1)


def register_handler(handler: SealHandler) -> int:
    """Register ``handler`` (held weakly) and return its handle."""
    with _LOCK:
        handle = next(_NUMBERS)
        _HANDLERS[handle] = weakref.ref(handler, lambda _ref, h=handle: _HANDLERS.pop(h, None))
    return handle


def unregister_handler(handle: int) -> None:
    """Forget ``handle``; a later call of an operator with it raises."""
    with _LOCK:
        _HANDLERS.pop(handle, None)


def _handler(handle: int) -> SealHandler:
    ref = _HANDLERS.get(handle)
    handler = None if ref is None else ref()
    if handler is None:
        raise RuntimeError(f"no seal handler is registered under handle {handle} (its cache was closed or "
                           "collected)")
    return handler


# Declared with torch.library.Library rather than torch.library.custom_op: the same schema and fake
# implementations, without custom_op's per-call Python wrapper (a decode step calls these once per layer).
_LIB = torch.library.Library("pqc_kv_cache", "DEF")
_LIB.define("seal_positions(Tensor handle, int layer_idx, Tensor keys, Tensor values, Tensor io_index, "
            "Tensor positions, Tensor(a!) arena, Tensor(b!) meta, Tensor(c!) nonce_next, Tensor nonce_end, "
            "Tensor nonce_epoch, Tensor(d!) records, Tensor(e!) record_head, Tensor(f!) failures, bool ring) -> ()")
_LIB.define("open_positions(Tensor handle, int layer_idx, Tensor(a!) keys, Tensor(b!) values, Tensor end, "
            "Tensor arena, Tensor meta, Tensor released, Tensor(c!) records, Tensor(d!) record_head, "
            "Tensor(e!) failures, bool ring) -> ()")


def seal_positions(handle: torch.Tensor, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                   io_index: torch.Tensor, positions: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor,
                   nonce_next: torch.Tensor, nonce_end: torch.Tensor, nonce_epoch: torch.Tensor,
                   records: torch.Tensor, record_head: torch.Tensor, failures: torch.Tensor, ring: bool) -> None:
    """``torch.ops.pqc_kv_cache.seal_positions``: seal positions ``positions[j]`` (int64 [n]) of every row,
    read from index ``io_index[j]`` of the sequence dimension of ``keys`` / ``values`` ([batch, heads, seq,
    dim]), each as a one-position chunk into its fixed slot of ``arena`` (uint8 [batch, slots, chunk bytes
    + 16]): slot ``position % slots`` when ``ring``, else slot ``position``. ``meta`` (int64 [batch, slots,
    3]) takes each slot's nonce counter, epoch and position + 1 (0: the slot holds nothing). Counters come
    from ``nonce_next`` (int64, one per session slot), never at or past ``nonce_end``, under epoch
    ``nonce_epoch``; a chunk that gets none is not sealed (zeros written, ``failures`` updated). Audit
    records (ENCRYPT per row and position, READ per row) go to ``records`` (uint8 [capacity, 64];
    capacity 0: no audit) at ``record_head[0]``, numbered from ``record_head[1]``."""
    torch.ops.pqc_kv_cache.seal_positions(handle, layer_idx, keys, values, io_index, positions, arena, meta,
                                          nonce_next, nonce_end, nonce_epoch, records, record_head, failures, ring)


def open_positions(handle: torch.Tensor, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                   end: torch.Tensor, arena: torch.Tensor, meta: torch.Tensor, released: torch.Tensor,
                   records: torch.Tensor, record_head: torch.Tensor, failures: torch.Tensor, ring: bool) -> None:
    """``torch.ops.pqc_kv_cache.open_positions``: open every position a layer holds (``end``: int64 scalar,
    one past the last position written; a ``ring`` holds the last ``slots`` of them) in the rows ``released``
    (int64 [batch], on the tensors' device: non-zero for a row to open) from ``arena`` into ``keys`` /
    ``values``, every tag verified; a position whose tag fails, or whose slot does not hold it, is zeroed and
    recorded in ``failures``. The other rows are neither read nor written nor recorded. DECRYPT records go to
    ``records`` as for ``seal_positions``."""
    torch.ops.pqc_kv_cache.open_positions(handle, layer_idx, keys, values, end, arena, meta, released, records,
                                          record_head, failures, ring)


def _seal(handle, layer_idx, keys, values, io_index, positions, arena, meta, nonce_next, nonce_end,
          nonce_epoch, records, record_head, failures, ring):
    # ``handle`` is a host tensor (the number of a handler, never a device value): reading it waits for nothing
    _handler(int(handle)).seal(layer_idx, keys, values, io_index, positions, arena, meta, nonce_next, nonce_end,
                               nonce_epoch, records, record_head, failures, ring)


def _open(handle, layer_idx, keys, values, end, arena, meta, released, records, record_head, failures, ring):
    _handler(int(handle)).open(layer_idx, keys, values, end, arena, meta, released, records, record_head, failures,
                               ring)


def _no_outputs(*args) -> None:
    """The fake implementation of both operators: they return nothing and change no shape."""
    return None


_LIB.impl("seal_positions", _seal, "CPU")
_LIB.impl("open_positions", _open, "CPU")
_LIB.impl("seal_positions", _seal, "CUDA")
_LIB.impl("open_positions", _open, "CUDA")
torch.library.register_fake("pqc_kv_cache::seal_positions", _no_outputs, lib=_LIB)
torch.library.register_fake("pqc_kv_cache::open_positions", _no_outputs, lib=_LIB)
