"""What the CUDA backend knows of its decrypt calls' tag failures, on the host.

The decrypt kernel appends one record per failing chunk to a device failure queue, naming the call by a
64-bit tag. ``FailureBook`` hands out the tags (one per (log, owner) between two reads of the queue),
and, given the records read from the queue at a synchronisation point, emits each into the audit log of
the call that found it and keeps it for that call's owner until the owner asks (``pop``). Reading the
queue from the device is the backend's (``CudaBackend._drain``); this module makes no device call.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np

from ..audit.records import Op, Status
from ..errors import DecryptionError

__all__ = ["FailureBook"]


class _Call:
    """What a read of the queue needs of a decrypt call: the log to emit its failures into, and whose they
    are (a weak reference to the owner; None: the call had none)."""

    __slots__ = ("log", "owner")

    def __init__(self, log, owner):
        self.log = log
        self.owner = owner


_NO_OWNER = object()   # the pending-failure key of calls made without an owner


class FailureBook:
    """Call tags and the failures found per owner (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.tags = itertools.count(1)      # 64-bit call tags: never wrap in a process's life
        self._calls: dict[int, _Call] = {}
        self._call_keys: dict[tuple[int, int], int] = {}
        self._pending: dict[Any, tuple[Any, list[dict[str, Any]]]] = {}

    def tag(self, log, owner, owner_ref) -> int:
        """The 64-bit tag the decrypt kernel writes into the failure records of a call: one per (log, owner)
        between two reads of the failure queue, so the table of tags stays as small as the set of callers."""
        key = (id(log), id(owner))
        with self._lock:
            tag = self._call_keys.get(key)
            call = self._calls.get(tag) if tag is not None else None
            if call is None or (owner is not None and call.owner() is not owner):   # ids are reused
                tag = next(self.tags)
                self._call_keys[key] = tag
                self._calls[tag] = _Call(log, owner_ref)
            return tag

    def take_calls(self) -> dict[int, _Call]:
        """The calls tagged since the last read of the queue (the read takes them; later calls get new tags)."""
        with self._lock:
            calls, self._calls = self._calls, {}
            self._call_keys = {}
        return calls

    def file(self, count: int, recs: np.ndarray | None, calls: dict[int, _Call]) -> None:
        """Emit each failure record read from the queue (``count`` counted, ``recs`` kept) into the log of
        its call and keep it for that call's owner; a queue overflow is kept for every caller of the period."""
        kept = 0 if recs is None else recs.shape[0]
        found: list[tuple[Any, dict[str, Any]]] = []
        for r in recs if recs is not None else ():
            call = calls.get(int(r["record_no"]))
            log = call.log if call is not None else None
            if log is not None:
                log.emit(Op.DECRYPT, tenant_idx=int(r["tenant_idx"]), session_idx=int(r["session_idx"]),
                         layer=int(r["layer"]), row=int(r["row"]), pos_start=int(r["pos_start"]),
                         pos_count=int(r["pos_count"]), nonce_counter=int(r["nonce_counter"]),
                         epoch=int(r["epoch"]), nbytes=int(r["nbytes"]), status=Status.AUTH_FAILED,
                         device_ts_ns=int(r["device_ts_ns"]))
            tenant_id = log.tenant_id_of(int(r["tenant_idx"])) if log is not None else None
            found.append((call, {"tenant_idx": int(r["tenant_idx"]), "tenant_id": tenant_id,
                                 "session_idx": int(r["session_idx"]), "layer_idx": int(r["layer"]),
                                 "row": int(r["row"]),
                                 "positions": range(int(r["pos_start"]), int(r["pos_start"]) + int(r["pos_count"])),
                                 "nonce_counter": int(r["nonce_counter"]), "epoch": int(r["epoch"])}))
        if count > kept:   # whose the lost ones were is unknown: every caller of the period hears of them
            lost = {"tenant_idx": None, "tenant_id": None, "session_idx": None, "layer_idx": None, "row": None,
                    "positions": None, "nonce_counter": None, "epoch": None, "overflow": count - kept}
            found.extend((c, dict(lost)) for c in calls.values())
        with self._lock:
            for call, fail in found:
                # a failure whose call is unknown is no one's in particular: the next check raises it
                ref = call.owner if call is not None else None
                obj = ref() if ref is not None else None
                if ref is not None and obj is None:
                    continue                # its owner is gone: the record is in its log, no one to raise to
                key = None if call is None else _NO_OWNER if ref is None else id(obj)
                entry = self._pending.setdefault(key, (ref, []))
                entry[1].append(fail)
            for key in [k for k, (ref, _) in self._pending.items() if ref is not None and ref() is None]:
                del self._pending[key]      # its owner is gone

    def pop(self, owner: object = None) -> list[dict[str, Any]]:
        """Return and forget the failures of ``owner``'s calls (None: of calls made without an owner), plus
        any whose call is unknown."""
        with self._lock:
            out = []
            unknown = self._pending.pop(None, None)
            key = _NO_OWNER if owner is None else id(owner)
            entry = self._pending.get(key)
            if entry is not None and (owner is None or entry[0]() is owner):
                out.extend(self._pending.pop(key)[1])
            if unknown is not None:
                out.extend(unknown[1])
        return out

    @staticmethod
    def raise_first(fails: list[dict[str, Any]], device) -> None:
        """Raise DecryptionError naming the first failure with positions (or the overflow), if any."""
        if not fails:
            return
        f = next((x for x in fails if x["positions"] is not None), fails[0])
        if f["positions"] is None:
            raise DecryptionError(f"{f['overflow']} chunk(s) failed authentication on {device}, more than "
                                  "the failure queue holds; their plaintext was zeroed")
        who = f["tenant_id"] if f["tenant_id"] is not None else f"#{f['tenant_idx']}"
        pos = f["positions"]
        raise DecryptionError(
            f"authentication failed for tenant {who}, layer {f['layer_idx']}, positions "
            f"{pos.start}..{pos.stop - 1} ({len(fails)} chunk(s) failed on {device}); "
            "their plaintext was zeroed", tenant_id=f["tenant_id"], layer_idx=f["layer_idx"], positions=pos)
