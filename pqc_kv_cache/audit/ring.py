"""Host audit ring: a fixed-capacity numpy array of packed records.

Emitters write whole batches with vectorised field assignments (no Python
object per record) into consecutive slots; the drain thread reads the written
slots and then frees them.  A full ring makes the emitter wait on a condition
variable (a *stall*); it never overwrites undrained slots and never drops.

Record numbers are not allocated here: the owner (``KVAuditLog``) hands out a
dense, global range per batch under the same lock, so the host ring and the
CUDA rings share one numbering.  Because a large batch may be written in
several pieces while other threads write theirs, the ring keeps a list of
*segments* ``(slot_index, first_record_no, count)`` in slot order; each
segment is a contiguous run of record numbers.
"""

from __future__ import annotations

import operator

import numpy as np

from .fields import VALUE_FIELDS, check_int
from .records import RECORD_DTYPE, RECORD_STRUCT

__all__ = ["HostRing"]

_PACK = RECORD_STRUCT
_SLOT = np.dtype(f"V{_PACK.size}")
# The packing order after record_no, as positions in (*scalar values in VALUE_FIELDS order, op, host_ts_ns, flags)
_EXTRA = ("op", "host_ts_ns", "flags")
_PICK = operator.itemgetter(*((VALUE_FIELDS + _EXTRA).index(name) for name in RECORD_DTYPE.names[1:]))
assert RECORD_DTYPE.names[0] == "record_no"
assert sorted(RECORD_DTYPE.names[1:]) == sorted(VALUE_FIELDS + _EXTRA)


class HostRing:
    """``capacity`` packed records in one numpy array, written and read in slot order.

    Counters ``written`` and ``read`` only grow; slot of counter ``c`` is
    ``c % capacity``.  The caller holds the owning lock around ``write`` and
    around the bookkeeping parts of the drain (``take`` / ``release``).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity = check_int("ring capacity", capacity, 1)
        self.buf = np.zeros(capacity, dtype=RECORD_DTYPE)
        # One view per field, made once: slicing a view is much cheaper than
        # indexing the structured array by name on every write.
        self._f = {name: self.buf[name] for name in RECORD_DTYPE.names}
        self._f_value = tuple(self._f[name] for name in VALUE_FIELDS)
        self._f_recno = self._f["record_no"]
        self._f_ts = self._f["host_ts_ns"]
        self._f_flags = self._f["flags"]
        self._slots = self.buf.view(_SLOT)             # whole records as opaque 64-byte items
        self._mv = memoryview(self.buf.view(np.uint8))
        self.written = 0
        self.read = 0
        self.segments: list[tuple[int, int, int]] = []

    @property
    def free(self) -> int:
        return self.capacity - (self.written - self.read)

    def pack_args(self, op: int, ints, host_ts: int) -> tuple:
        """Arguments of ``_PACK`` after record_no for a batch whose scalar fields are ``ints``
        (VALUE_FIELDS order, 0 where the field is array-valued)."""
        return _PICK((*ints, op, host_ts, 0))

    def write(self, first_no: int, done: int, k: int, pack_args: tuple, arrays: list) -> None:
        """Write records ``done .. done+k`` of a batch (``k <= contiguous_room()``) into the next slots.

        The scalar fields (``pack_args``) are packed once and copied into every
        slot in one assignment; ``arrays`` — (index into VALUE_FIELDS, array)
        pairs — then overwrite the fields that vary per record, and the
        record numbers are written last.  A single record with no arrays is
        packed straight into its slot.
        """
        s = self.written % self.capacity
        e = s + k
        if k == 1 and not arrays:
            _PACK.pack_into(self._mv, s * _PACK.size, first_no + done, *pack_args)
        else:
            self._slots[s:e] = _PACK.pack(0, *pack_args)
            f_value = self._f_value
            for i, v in arrays:
                f_value[i][s:e] = v if k == len(v) else v[done:done + k]
            self._f_recno[s:e] = np.arange(first_no + done, first_no + done + k, dtype=np.uint64)
        self.segments.append((s, first_no + done, k))
        self.written += k

    def write_records(self, first_no: int, done: int, k: int, records: np.ndarray, host_ts: int) -> None:
        """Write records ``done .. done+k`` of a prepared batch (a RECORD_DTYPE array whose fields the emitter
        set) into the next slots (``k <= contiguous_room()``): one copy of the whole records, then the fields
        only the log sets (record numbers, the host time stamp, no flags)."""
        s = self.written % self.capacity
        e = s + k
        self._slots[s:e] = records.view(_SLOT)[done:done + k]     # whole records: no per-field copy
        self._f_ts[s:e] = host_ts
        self._f_flags[s:e] = 0
        self._f_recno[s:e] = np.arange(first_no + done, first_no + done + k, dtype=np.uint64)
        self.segments.append((s, first_no + done, k))
        self.written += k

    def contiguous_room(self) -> int:
        """Free slots from the write position up to the end of the buffer."""
        s = self.written % self.capacity
        return min(self.free, self.capacity - s)

    def take(self) -> tuple[list[tuple[int, int, int]], int]:
        """Segments written since the last take and the write counter they end at."""
        segs = self.segments
        self.segments = []
        return segs, self.written

    def release(self, upto: int) -> None:
        """Free every slot before write counter ``upto`` (after the drain copied them)."""
        self.read = upto
