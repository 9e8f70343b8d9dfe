"""Queries over the in-memory store of a KVAuditLog, and the entry objects they return.

``KVAuditEntry`` objects are built only for the records a query returns; the
store itself holds columns (store.py).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt

import numpy as np

from .fields import check_int
from .records import NONE16, OP_NAMES, Status, op_from_name

__all__ = ["KVAuditEntry", "query", "since_ns"]


def _iso(ns: int) -> str:
    """ISO-8601 UTC, as "PQC KV Cache Encryption" 0.1.0 wrote it (datetime.isoformat with +00:00)."""
    return _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat()


@dataclasses.dataclass
class KVAuditEntry:
    """One audit record as the query API returns it.

    The first nine fields, their order and defaults are those of the pure-Python
    "PQC KV Cache Encryption" 0.1.0 of the same package name; ``timestamp`` is
    ISO-8601 UTC. The rest are this log's extensions.
    """

    timestamp: str
    operation: str
    tenant_id: str
    session_id: str
    layer_idx: int = -1
    position: int = -1
    sequence_number: int = -1
    success: bool = True
    details: str = ""
    record_number: int = -1
    position_count: int = 0
    row: int | None = None
    epoch: int = 0
    nbytes: int = 0
    status: int = 0
    device_timestamp_ns: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def since_ns(since) -> int:
    """A ``since=`` argument (datetime, ISO-8601 string, or ns / s since the epoch) as ns since the epoch."""
    if isinstance(since, bool):
        raise TypeError("since must be a datetime, an ISO-8601 string or nanoseconds since the epoch")
    if isinstance(since, int):
        return since
    if isinstance(since, float):
        if since != since:
            raise ValueError("since=nan is not a time")
        if since in (float("inf"), float("-inf")):
            return 0 if since < 0 else 1 << 64      # before / after every record
        return int(since * 1e9)
    if isinstance(since, str):
        try:
            since = _dt.datetime.fromisoformat(since)
        except ValueError:
            raise ValueError(f"since={since!r} is not an ISO-8601 timestamp") from None
    if isinstance(since, _dt.datetime):
        if since.tzinfo is None:
            since = since.replace(tzinfo=_dt.timezone.utc)
        return int(since.timestamp() * 1e9)
    raise TypeError("since must be a datetime, an ISO-8601 string or nanoseconds since the epoch")


def _optional_int(name: str, v) -> int | None:
    if v is None:
        return None
    try:
        return check_int(name, v, None, None)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__}") from None


def entry(rec: dict, names, details) -> KVAuditEntry:
    """The KVAuditEntry of one record (a dict of its fields)."""
    layer, row, pc = rec["layer"], rec["row"], rec["pos_count"]
    no = rec["record_no"]
    return KVAuditEntry(
        timestamp=_iso(rec["host_ts_ns"]),
        operation=OP_NAMES.get(rec["op"], str(rec["op"])),
        tenant_id=names.tenant_label(rec["tenant_idx"]),
        session_id=names.session_label(rec["session_idx"]),
        layer_idx=-1 if layer == NONE16 else layer,
        position=rec["pos_start"] if pc else -1,
        sequence_number=rec["nonce_counter"],
        success=rec["status"] == Status.OK,
        details=details.get(no, ""),
        record_number=no, position_count=pc, row=None if row == NONE16 else row,
        epoch=rec["epoch"], nbytes=rec["nbytes"], status=rec["status"],
        device_timestamp_ns=rec["device_ts_ns"])


def query(store, store_lock, names, details, *, limit, newest_first, tenant_id=None, operation=None,
          layer_idx=None, position=None, success=None, since=None) -> list[KVAuditEntry]:
    """Matching records of ``store`` as entries.  ``position`` matches records whose range contains it."""
    limit = _optional_int("limit", limit)
    t = None
    if tenant_id is not None:
        t = names.find_tenant(tenant_id)
        if t is None:
            return []
    op = None if operation is None else int(op_from_name(operation))
    if success is not None and not isinstance(success, (bool, np.bool_)):
        raise TypeError(f"success must be True, False or None, got {type(success).__name__}")
    layer = _optional_int("layer_idx", layer_idx)
    if layer is not None:
        layer = NONE16 if layer == -1 else layer
        if not 0 <= layer <= NONE16:
            return []
    position = _optional_int("position", position)
    if position is not None and not 0 <= position <= 0xFFFF_FFFF:
        return []
    since = None if since is None else since_ns(since)
    with store_lock:
        hits = store.select(limit=limit, newest_first=newest_first, tenant_idx=t, op=op, layer=layer,
                            position=position, success=success, since_ns=since)
        recs = [store.record(b, i) for b, i in hits]
    return [entry(r, names, details) for r in recs]
