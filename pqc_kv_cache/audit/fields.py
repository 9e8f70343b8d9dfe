"""Checking audit field values at the door, and expanding position ranges into one record per position.

Pure functions over ints and numpy arrays: no lock, no thread, no file.  The
emitters of ``KVAuditLog`` call ``prepare`` on every batch; what it returns
is what ``HostRing.write`` takes.
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from .records import RECORD_DTYPE

__all__ = ["FIELD_LIMITS", "VALUE_FIELDS", "ID_MAX_BYTES", "DETAILS_MAX_BYTES", "check_int", "field_int",
           "check_text", "prepare", "expand_per_position", "build_records", "RecordTemplates", "set_field"]

# Upper bound (inclusive) of each writable field, for input checks at the door.
FIELD_LIMITS = {
    "tenant_idx": 0xFFFF_FFFF,
    "session_idx": 0xFFFF_FFFF,
    "layer": 0xFFFF,
    "row": 0xFFFF,
    "pos_start": 0xFFFF_FFFF,
    "pos_count": 0xFFFF_FFFF,
    "nonce_counter": 0xFFFF_FFFF_FFFF_FFFF,
    "epoch": 0xFFFF_FFFF,
    "nbytes": 0xFFFF_FFFF,
    "status": 0xFF,
    "device_ts_ns": 0xFFFF_FFFF_FFFF_FFFF,
}

# Order of the value tuple the emitters pass to ``prepare`` and ``HostRing.write``.
VALUE_FIELDS = ("tenant_idx", "session_idx", "layer", "row", "pos_start", "pos_count",
                "nonce_counter", "epoch", "nbytes", "status", "device_ts_ns")

# What the file format can hold: ids have a u16 length, details a u32 one (bounded far lower here).
ID_MAX_BYTES = 0xFFFF
DETAILS_MAX_BYTES = 1 << 20

# emit_per_position expands up to this many records at once; more are expanded piece by piece
EXPAND_AT_ONCE = 1 << 20

_LIMITS = tuple(FIELD_LIMITS[name] for name in VALUE_FIELDS)
_ITEMSIZE = tuple(RECORD_DTYPE[name].itemsize for name in VALUE_FIELDS)
I_POS_START = VALUE_FIELDS.index("pos_start")
I_POS_COUNT = VALUE_FIELDS.index("pos_count")
I_NBYTES = VALUE_FIELDS.index("nbytes")
# (array dtype, field index) -> whether its values need a range check (signed, or wider than the field)
_RANGE_CHECK: dict = {}


def check_int(name: str, v, lo: int | None = 0, hi: int | None = None) -> int:
    """``v`` as a Python int within ``lo .. hi`` (None: unbounded), by the package's one integer rule.

    What is accepted is ``pqc_kv_cache._checks.check_int``'s rule (ints and integer scalars with
    ``__index__``, never a bool); only the wording is the audit package's.  TypeError for anything
    else, ValueError out of range.
    """
    try:
        n = _checks.check_int(name, v)
    except TypeError:
        raise TypeError(f"{name} must be {'a positive' if lo == 1 and hi is None else 'an'} int, "
                        f"got {type(v).__name__}") from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        if lo == 1 and hi is None:
            raise ValueError(f"{name} must be a positive int, got {n}")
        raise ValueError(f"{name}={n} is out of range {lo}..{'' if hi is None else hi}")
    return n


def field_int(name: str, v) -> int:
    """A scalar audit field as a Python int within its range (``FIELD_LIMITS``)."""
    return check_int(name, v, 0, FIELD_LIMITS[name])


def check_text(name: str, text, max_bytes: int) -> None:
    """Refuse, at the call, a string the persisted log could not hold (it would fail the log for everyone)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if len(text) > max_bytes:
        raise ValueError(f"{name} is {len(text)} characters long; at most {max_bytes} UTF-8 bytes are allowed")
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text ({e.reason} at index {e.start})") from None
    if n > max_bytes:
        raise ValueError(f"{name} is {n} UTF-8 bytes long; at most {max_bytes} are allowed")


def prepare(values: tuple) -> tuple[int, list, list]:
    """Check every field value (VALUE_FIELDS order; each a scalar or a 1-D integer array).

    Returns the batch length, the scalar values (0 where a field is an array)
    and the (field index, array) pairs.  Arrays pass without a copy when their
    dtype is unsigned and no wider than the field; others are range-checked.
    """
    n = None
    ints = [0] * len(values)
    arrays = []
    for k, v in enumerate(values):
        if type(v) is int:
            if v < 0 or v > _LIMITS[k]:
                raise ValueError(f"{VALUE_FIELDS[k]}={v} is out of range 0..{_LIMITS[k]}")
            ints[k] = v
            continue
        if type(v) is not np.ndarray:
            if isinstance(v, (int, np.integer, bool)):
                ints[k] = field_int(VALUE_FIELDS[k], v)
                continue
            try:
                v = np.asarray(v)
            except Exception:
                raise TypeError(f"{VALUE_FIELDS[k]} must be an int or a 1-D integer array") from None
            if v.ndim == 0 and v.dtype.kind in "iu":
                ints[k] = int(v)
                if not 0 <= ints[k] <= _LIMITS[k]:
                    raise ValueError(f"{VALUE_FIELDS[k]}={ints[k]} is out of range 0..{_LIMITS[k]}")
                continue
        check = _RANGE_CHECK.get((v.dtype, k))
        if check is None or v.ndim != 1:
            if v.ndim != 1 or v.dtype.kind not in "iu":
                raise TypeError(f"{VALUE_FIELDS[k]} must be an int or a 1-D integer array, "
                                f"got {v.ndim}-D {v.dtype}")
            check = _RANGE_CHECK[(v.dtype, k)] = v.dtype.kind == "i" or v.dtype.itemsize > _ITEMSIZE[k]
        ln = len(v)
        if n is None:
            n = ln
        elif ln != n:
            raise ValueError(f"{VALUE_FIELDS[k]} has {ln} elements, other fields {n}")
        if check and ln:
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi > _LIMITS[k]:
                raise ValueError(f"{VALUE_FIELDS[k]} holds {lo if lo < 0 else hi}, "
                                 f"out of range 0..{_LIMITS[k]}")
        arrays.append((k, v))
    return (1 if n is None else n), ints, arrays


def expand_per_position(d: int, ints: list, arrays: list) -> tuple:
    """Expand ``d`` prepared descriptors (pos_start, pos_count) into one record per position.

    Each record keeps its descriptor's other fields; the descriptor's nbytes is
    split evenly (the first ``nbytes % pos_count`` records get one byte more).
    Returns ``(n, ints, arrays, make)`` for the write: ``n`` records (0: none),
    and either the arrays of all of them or, past ``EXPAND_AT_ONCE`` records,
    ``make(done, k)`` building the arrays of records ``done .. done+k`` piece
    by piece (memory bounded by the piece, whatever ``n`` is).
    """
    values = list(ints)
    for k, v in arrays:
        values[k] = v
    pc = values[I_POS_COUNT]
    if (pc == 1) if type(pc) is int else (d and bool((pc == 1).all())):
        # every descriptor covers one position (a decode step): nothing to expand, and
        # pos_start + 1 cannot leave the 32-bit range
        return d, ints, arrays, None
    counts = np.broadcast_to(np.asarray(values[I_POS_COUNT], dtype=np.int64), (d,))
    starts = np.broadcast_to(np.asarray(values[I_POS_START], dtype=np.int64), (d,))
    if d and int((starts + counts).max()) > 0x1_0000_0000:
        raise ValueError("pos_start + pos_count exceeds the 32-bit position range")
    total = int(counts.sum())
    if total == 0:
        return 0, ints, [], None
    if total > EXPAND_AT_ONCE:
        out_ints, make = _piecewise(d, values, ints, starts, counts)
        return total, out_ints, [], make
    if d == 1:
        # one descriptor (a whole prefill of one row): positions are a range, the rest stays scalar
        out_ints = list(values)
        for k, v in arrays:
            out_ints[k] = int(v[0])
        out_arrays = [(I_POS_START, np.arange(int(starts[0]), int(starts[0]) + total, dtype=np.uint32))]
        out_ints[I_POS_START] = 0
        out_ints[I_POS_COUNT] = 1
        base, extra = divmod(out_ints[I_NBYTES], total)
        out_ints[I_NBYTES] = base
        if extra:
            out_ints[I_NBYTES] = 0
            out_arrays.append((I_NBYTES, (np.arange(total) < extra).astype(np.uint32) + np.uint32(base)))
        return total, out_ints, out_arrays, None
    offsets = np.cumsum(counts) - counts
    rank = np.arange(total, dtype=np.int64) - np.repeat(offsets, counts)
    out_ints = list(ints)
    out_arrays = []
    for k, v in enumerate(values):
        if k == I_POS_START:
            out_arrays.append((k, (np.repeat(starts, counts) + rank).astype(np.uint32)))
        elif k == I_POS_COUNT:
            out_ints[k] = 1
        elif k == I_NBYTES:
            nb = np.broadcast_to(np.asarray(v, dtype=np.int64), (d,))
            safe = np.maximum(counts, 1)
            out_arrays.append((k, (np.repeat(nb // safe, counts) + (rank < np.repeat(nb % safe, counts)))
                               .astype(np.uint32)))
            out_ints[k] = 0
        elif type(v) is np.ndarray:
            out_arrays.append((k, np.repeat(v, counts)))
    return total, out_ints, out_arrays, None


def _piecewise(d: int, values: list, ints: list, starts, counts) -> tuple:
    """(ints, make) expanding ``d`` descriptors piece by piece: no array of the total."""
    ends = np.cumsum(counts)
    out_ints = list(ints)
    out_ints[I_POS_START] = out_ints[I_NBYTES] = 0
    out_ints[I_POS_COUNT] = 1
    nb = np.broadcast_to(np.asarray(values[I_NBYTES], dtype=np.int64), (d,))
    per = [(k, v) for k, v in enumerate(values) if type(v) is np.ndarray
           and k not in (I_POS_START, I_POS_COUNT, I_NBYTES)]

    def make(done: int, k: int) -> list:
        idx = np.arange(done, done + k, dtype=np.int64)
        di = np.searchsorted(ends, idx, side="right")
        c = counts[di]
        rank = idx - (ends[di] - c)
        out = [(I_POS_START, (starts[di] + rank).astype(np.uint32)),
               (I_NBYTES, (nb[di] // c + (rank < nb[di] % c)).astype(np.uint32))]
        out.extend((f, v[di]) for f, v in per)
        return out

    return out_ints, make


def build_records(op: int, values: tuple) -> np.ndarray:
    """Records of operation ``op`` as a ``RECORD_DTYPE`` array ready for ``KVAuditLog.emit_records``: the
    field values (VALUE_FIELDS order, scalars broadcast) checked exactly as ``prepare`` checks them;
    ``record_no``, ``host_ts_ns`` and ``flags`` left 0 (the log sets them)."""
    n, ints, arrays = prepare(values)
    out = np.zeros(n, dtype=RECORD_DTYPE)
    out["op"] = op
    for k, v in enumerate(ints):
        if v:
            out[VALUE_FIELDS[k]] = v
    for k, v in arrays:
        out[VALUE_FIELDS[k]] = v
    return out


class RecordTemplates:
    """Record batches kept between emits, keyed by what stays the same from one emit to the next.

    An emitter that writes the same kind of batch again and again (one record per row of a layer, every
    decode step) builds it once with ``build_records`` and afterwards sets only the fields that change
    (``set_field`` checks the values it is given) before ``KVAuditLog.emit_records``, which
    copies the batch. At most ``cap`` batches are kept; the oldest half is dropped when full.
    """

    __slots__ = ("_memo", "_cap")

    def __init__(self, cap: int = 64):
        self._memo: dict = {}
        self._cap = cap

    def get(self, key, build) -> np.ndarray:
        """The batch kept under ``key``; ``build()`` makes (and keeps) it when there is none."""
        batch = self._memo.get(key)
        if batch is None:
            if len(self._memo) >= self._cap:
                for old in list(self._memo)[: self._cap // 2]:
                    del self._memo[old]
            batch = self._memo[key] = build()
        return batch


def set_field(batch: np.ndarray, name: str, value) -> None:
    """Set field ``name`` of every record of ``batch`` to ``value`` (an int or an integer array of the batch's
    length), refused (ValueError) when a value does not fit the field: a record never holds a truncated value."""
    hi = FIELD_LIMITS[name]
    if type(value) is int:
        if value < 0 or value > hi:
            raise ValueError(f"{name}={value} is out of range 0..{hi}")
    else:
        value = np.asarray(value)
        if value.dtype.kind not in "iu" or value.shape != batch.shape:
            raise TypeError(f"{name} must be an int or an integer array of {batch.shape[0]} values, got "
                            f"{value.dtype} of shape {value.shape}")
        if value.size and (value.dtype.kind == "i" or value.dtype.itemsize > RECORD_DTYPE[name].itemsize):
            lo, top = int(value.min()), int(value.max())
            if lo < 0 or top > hi:
                raise ValueError(f"{name} holds {lo if lo < 0 else top}, out of range 0..{hi}")
    batch[name] = value
