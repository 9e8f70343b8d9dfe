"""Audit records built on a device with torch operations, and the ERROR stand-ins of a launch's records.

What ``CudaAuditRing.emit_torch`` writes into its reserved slots (``torch_fields`` checks the fields before
anything is reserved, ``fill_records`` writes them on the current stream), and ``stand_ins``: the ERROR
records a device ring writes in place of a launch's own records, one per row, when the launch's block
raises (``CudaAuditRing.records_at(..., head=)``).
"""

from __future__ import annotations

import numpy as np

from .fields import field_int
from .records import NONE16, RECORD_DTYPE, RECORD_WORDS, VALID_OPS, Status

__all__ = ["torch_fields", "fill_records", "stand_ins"]


def _signed(v: int, width: int) -> int:
    """A field value as the signed integer of ``width`` bytes with the same bits (torch has no wide unsigned
    arithmetic); single bytes are written through the uint8 view as they are."""
    if width == 1:
        return v
    bits = 8 * width
    return v - (1 << bits) if v >= (1 << (bits - 1)) else v


def torch_fields(op, device, fields: dict) -> tuple[int, int, dict]:
    """(operation code, number of records, fields) of records whose fields are ints or 1-D integer tensors on
    ``device`` (one record per element; scalars range-checked, tensors not: that would read the device).
    ValueError / TypeError for what cannot be written."""
    import torch

    if isinstance(op, (bool, np.bool_)) or not isinstance(op, (int, np.integer)) or int(op) not in VALID_OPS:
        raise ValueError(f"unknown audit operation code {op!r}")
    fields = dict(fields)
    n = None
    for name, v in fields.items():
        if isinstance(v, torch.Tensor):
            if v.dim() != 1 or v.device != device or v.dtype.is_floating_point or v.dtype.is_complex \
                    or v.dtype == torch.bool:
                raise TypeError(f"{name} must be a 1-D integer tensor on {device}, "
                                f"got {v.dim()}-D {v.dtype} on {v.device}")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise ValueError(f"{name} has {v.shape[0]} elements, other fields {n}")
        elif isinstance(v, (int, np.integer, bool, np.bool_)):
            fields[name] = field_int(name, v)
        else:
            raise TypeError(f"{name} must be an int or a 1-D integer tensor, got {type(v).__name__}")
    return int(op), 1 if n is None else n, fields


def fill_records(view, first: int, n: int, op: int, fields: dict) -> None:
    """Write ``n`` records numbered from ``first`` into ``view`` (uint8 [n, 64]) with torch operations on the
    current stream (layout: RECORD_WORDS); host time and flags 0 (the drain sets the time)."""
    import torch

    words = {8: view.view(torch.int64), 4: view.view(torch.int32), 2: view.view(torch.int16), 1: view}

    def col(name):
        width, index = RECORD_WORDS[name]
        return words[width][:, index]

    col("record_no").copy_(torch.arange(first, first + n, dtype=torch.int64, device=view.device))
    col("host_ts_ns").fill_(0)
    col("flags").fill_(0)
    col("op").fill_(op)
    for name, v in fields.items():
        if isinstance(v, int):
            col(name).fill_(_signed(v, RECORD_WORDS[name][0]))
        else:
            col(name).copy_(v)


def stand_ins(op: int, tenant_idx, session_idx, layer: int, rows) -> np.ndarray:
    """ERROR records standing in for a launch's records, one per row of ``rows`` (each row's tenant and
    session indices given, arrays or scalars), read-only: what ``records_at(..., head=)`` takes."""
    rows = np.asarray(rows, dtype=np.int64)
    t = np.zeros(rows.shape[0], dtype=RECORD_DTYPE)
    t["op"] = op
    t["status"] = int(Status.ERROR)
    t["tenant_idx"] = tenant_idx
    t["session_idx"] = session_idx
    t["layer"] = min(int(layer), NONE16)
    t["row"] = np.minimum(rows, NONE16)
    t.flags.writeable = False
    return t
