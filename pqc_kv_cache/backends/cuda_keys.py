"""Key material of the CUDA backend: device key schedules and slot metadata per key set.

- A key set (the call's ``keys``, in order) is prepared once: its raw keys are written straight from
  each ``KeySlot.key`` into a pinned staging buffer of its own (no joined ``bytes`` copy) and copied to a
  device buffer on the current stream, and the device overwrites the staging with zeros right after that
  copy (stream-ordered: the host waits for nothing); ``pqc_prepare_keys`` builds the schedules on the
  stream and the device copy of the raw keys is zeroed on the stream right after it.
- Schedules are kept for the ``KEY_CACHE_ENTRIES`` most recently used key sets (identified by a hash of
  each key); an evicted or forgotten schedule is zeroed on the stream after every launch enqueued so far
  that reads it.
- The per-call look-up does not hash keys: a set of KeySlot objects seen before (weak references, checked
  by identity) maps to its key set and to its slot metadata (``pqc_slot_meta`` rows, uploaded once per
  key set and audit indices and kept on the device).
"""

from __future__ import annotations

import collections
import hashlib
import threading
import weakref
from typing import Sequence

import numpy as np
import torch

from . import kernel_abi as _abi
from .base import KeySlot

__all__ = ["KeyStore", "KEY_CACHE_ENTRIES", "check_keys"]

KEY_CACHE_ENTRIES = 256          # key sets whose schedules stay on the device
_SEEN_ENTRIES = 1024             # KeySlot sets remembered for the look-up without hashing
KEY_BYTES = 32


def check_keys(keys: Sequence) -> None:
    """ValueError unless every entry of ``keys`` is a KeySlot with a 32-byte key."""
    for i, k in enumerate(keys):
        if not isinstance(k, KeySlot) or len(k.key) != KEY_BYTES:
            raise ValueError(f"keys[{i}] must be a KeySlot with a {KEY_BYTES}-byte key")


class _Seen:
    """A set of KeySlot objects seen before: weak references (checked by identity), its key set's identity,
    and its slot metadata on the device per (tenant_idx, session_idx) of the audit context."""

    __slots__ = ("refs", "ident", "metas")

    def __init__(self, keys, ident):
        self.refs = tuple(weakref.ref(k) for k in keys)
        self.ident = ident
        self.metas: dict[tuple[bytes, bytes], torch.Tensor] = {}

    def matches(self, keys) -> bool:
        for r, k in zip(self.refs, keys):
            if r() is not k:
                return False
        return True


class KeyStore:
    """Key schedules and slot metadata on one device (``device``: a CudaDevice; ``prepare(dev_keys, n,
    sched)``: enqueues ``pqc_prepare_keys`` on the current stream)."""

    def __init__(self, device, prepare):
        self._device = device
        self._prepare = prepare
        self._lock = threading.Lock()
        self._scheds: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self._seen: dict[tuple[int, ...], _Seen] = {}
        self._stage = None          # the last preparation's pinned raw-key staging (zeroed by the device)

    def touch(self, ident: tuple, sched: torch.Tensor) -> bool:
        """Whether ``sched`` is still the cached schedule of key set ``ident`` (neither evicted nor forgotten,
        so not zeroed): then it is marked most recently used, as ``schedules`` would. A caller that kept a
        schedule's address may use it only while this holds."""
        with self._lock:
            if self._scheds.get(ident) is not sched:
                return False
            self._scheds.move_to_end(ident)
            return True

    # ---- look-up
    def entry(self, keys: Sequence) -> _Seen:
        """The handle of the key set ``keys`` (``schedules`` and ``meta`` take it). Each key is checked (a
        KeySlot with a 32-byte key: ValueError otherwise) when its set is first seen; a set seen before holds
        the same (frozen) KeySlot objects, checked by identity."""
        ids = tuple(map(id, keys))
        seen = self._seen.get(ids)      # a dict read is atomic; a stale hit is caught by matches()
        if seen is not None and seen.matches(keys):
            return seen
        check_keys(keys)
        # a hash of each key names the key set (the raw keys are not kept as dict keys)
        seen = _Seen(keys, tuple(hashlib.sha256(k.key).digest() for k in keys))
        with self._lock:
            if len(self._seen) >= _SEEN_ENTRIES:
                self._seen.clear()
            self._seen[ids] = seen
        return seen

    def prepared(self, seen: _Seen, tenant_idx=None, session_idx=None) -> bool:
        """Whether the key set of ``seen`` has its schedules and slot metadata (with these audit indices) on
        the device already, so that ``schedules`` and ``meta`` upload nothing."""
        with self._lock:
            if seen.ident not in self._scheds:
                return False
        return self._meta_key(tenant_idx, session_idx) in seen.metas

    @staticmethod
    def _meta_key(tenant_idx, session_idx) -> tuple[bytes, bytes]:
        ti = None if tenant_idx is None else np.asarray(tenant_idx, dtype=np.uint32)
        si = None if session_idx is None else np.asarray(session_idx, dtype=np.uint32)
        return (b"" if ti is None else ti.tobytes(), b"" if si is None else si.tobytes())

    def schedules(self, keys: Sequence, seen: _Seen | None = None) -> tuple[torch.Tensor, _Seen]:
        """Device key schedules (uint8 [n, SCHED_SIZE]) of ``keys``, prepared on first use; and the handle
        ``meta`` takes (``seen``: ``entry(keys)`` when the caller has it)."""
        if seen is None:
            seen = self.entry(keys)
        with self._lock:
            sched = self._scheds.get(seen.ident)
            if sched is not None:
                self._scheds.move_to_end(seen.ident)
                return sched, seen
        sched = self._prepare_set(keys)
        evicted = []
        with self._lock:
            other = self._scheds.get(seen.ident)
            if other is not None:       # another thread prepared the same set meanwhile: keep one
                evicted.append(sched)
                sched = other
            self._scheds[seen.ident] = sched
            while len(self._scheds) > KEY_CACHE_ENTRIES:
                evicted.append(self._scheds.popitem(last=False)[1])
        for old in evicted:
            old.zero_()           # on the stream: after every launch enqueued so far that reads it
        return sched, seen

    def meta(self, seen: _Seen, keys: Sequence, tenant_idx, session_idx) -> torch.Tensor:
        """pqc_slot_meta rows of ``keys`` on the device (uploaded once per key set and audit indices)."""
        ti = None if tenant_idx is None else np.asarray(tenant_idx, dtype=np.uint32)
        si = None if session_idx is None else np.asarray(session_idx, dtype=np.uint32)
        mkey = self._meta_key(tenant_idx, session_idx)
        dev = seen.metas.get(mkey)
        if dev is None:
            host_meta = _abi.slot_meta_array(keys, ti, si)
            host = self._device.pinned(host_meta.nbytes)
            host.numpy()[:] = host_meta.reshape(-1)
            dev = self._device.empty(host_meta.nbytes)
            self._device.upload(dev, host)
            seen.metas[mkey] = dev
        return dev

    # ---- preparation and erasure
    def _prepare_set(self, keys: Sequence) -> torch.Tensor:
        n = len(keys)
        nbytes = n * KEY_BYTES
        with self._lock:
            # a device raw-key buffer of its own per preparation, allocated on the current stream: two
            # preparations on different streams (threads) are not ordered by this lock, so a shared buffer
            # could be overwritten by one while the other's kernel reads it; torch's caching allocator hands a
            # freed block out again only on the stream it was freed on, after the zeroing below
            dev_keys = self._device.empty(nbytes)
            # a staging buffer of its own per preparation: the device wipes it after its copy, so the host
            # never writes into one a copy may still be reading
            stage = self._device.pinned(nbytes)
            view = stage.numpy()
            try:
                for i, k in enumerate(keys):
                    view[i * KEY_BYTES:(i + 1) * KEY_BYTES] = np.frombuffer(k.key, dtype=np.uint8)
            except BaseException:
                view.fill(0)          # nothing was enqueued: wipe on the host
                raise
            self._stage = stage       # only for staging_bytes(): the device zeroes it right after the copy
            self._device.upload_keys(dev_keys[:nbytes], stage)
            try:
                sched = self._device.empty(n * _abi.SCHED_SIZE).view(n, _abi.SCHED_SIZE)
                self._prepare(dev_keys, n, sched)
            finally:
                dev_keys[:nbytes].zero_()   # on the stream, after the preparation read the keys
        return sched

    def staging_bytes(self) -> np.ndarray | None:
        """The last preparation's pinned raw-key staging as it is now (zero once the device has passed its
        copy); None before the first."""
        return None if self._stage is None else self._stage.numpy()

    def forget(self) -> None:
        """Zero and drop every cached schedule (on the stream, after every launch enqueued so far that reads
        it) and the slot metadata."""
        with self._lock:
            scheds = list(self._scheds.values())
            self._scheds.clear()
            self._seen.clear()
        for sched in scheds:
            sched.zero_()
