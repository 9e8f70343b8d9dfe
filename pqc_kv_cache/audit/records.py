"""The audit record: one fixed-size packed struct, mirrored from kernels/pqc_audit_record.h.

Records are stored as rows of a numpy structured array of RECORD_DTYPE; no
Python object is built per record on the hot path.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

__all__ = ["RECORD_DTYPE", "RECORD_SIZE", "RECORD_STRUCT", "RECORD_WORDS", "Op", "Status", "NONE16", "OP_NAMES",
           "valid_ops", "check_records", "op_from_name"]

RECORD_DTYPE = np.dtype([
    ("record_no", "<u8"),
    ("host_ts_ns", "<u8"),
    ("device_ts_ns", "<u8"),
    ("nonce_counter", "<u8"),
    ("pos_start", "<u4"),
    ("pos_count", "<u4"),
    ("tenant_idx", "<u4"),
    ("session_idx", "<u4"),
    ("epoch", "<u4"),
    ("nbytes", "<u4"),
    ("layer", "<u2"),
    ("row", "<u2"),
    ("op", "u1"),
    ("status", "u1"),
    ("flags", "<u2"),
])
RECORD_SIZE = RECORD_DTYPE.itemsize
assert RECORD_SIZE == 64

# The same layout as a struct (fields in RECORD_DTYPE order, no padding), for packing one record in one call.
RECORD_STRUCT = struct.Struct("<" + "".join({1: "B", 2: "H", 4: "I", 8: "Q"}[RECORD_DTYPE[name].itemsize]
                                            for name in RECORD_DTYPE.names))
assert RECORD_STRUCT.size == RECORD_SIZE
# Each field as (width in bytes, index) in the record viewed as an array of words of its width: the
# layout of code that writes records through integer views (torch has no structured tensors).
RECORD_WORDS = {name: (RECORD_DTYPE[name].itemsize, RECORD_DTYPE.fields[name][1] // RECORD_DTYPE[name].itemsize)
                for name in RECORD_DTYPE.names}
assert all(RECORD_DTYPE.fields[name][1] == w * i for name, (w, i) in RECORD_WORDS.items())

NONE16 = 0xFFFF


class Op(enum.IntEnum):
    ENCRYPT = 1
    DECRYPT = 2
    ROTATE = 3
    ISOLATION_VIOLATION = 4
    CROP = 5
    REORDER = 6
    CLOSE = 7
    RESEAL = 8      # positions already written, re-sealed as one chunk under a fresh counter
    READ = 9        # working-set read: plaintext held on the device handed to attention, no decryption
    RELEASE = 10    # plaintext (working set, scratch) zeroed and dropped; only ciphertext remains
    SAVE = 11       # a row's chunks written to a save file (ciphertext only)
    LOAD = 12       # a row's chunks read back from a save file, every tag verified
    DELETE = 13     # stored ciphertext deleted by a clean-up (the vLLM connector's store)


class Status(enum.IntEnum):
    OK = 0
    AUTH_FAILED = 1
    REFUSED = 2
    ERROR = 3


# The strings of PQC KV Cache Encryption 0.1.0 ("encrypt", "decrypt", "rotate", "isolation-violation")
# and the new operations.
OP_NAMES = {
    Op.ENCRYPT: "encrypt",
    Op.DECRYPT: "decrypt",
    Op.ROTATE: "rotate",
    Op.ISOLATION_VIOLATION: "isolation-violation",
    Op.CROP: "crop",
    Op.REORDER: "reorder",
    Op.CLOSE: "close",
    Op.RESEAL: "reseal",
    Op.READ: "read",
    Op.RELEASE: "release",
    Op.SAVE: "save",
    Op.LOAD: "load",
    Op.DELETE: "delete",
}
_OPS_BY_NAME = {v: k for k, v in OP_NAMES.items()}
_OPS_BY_NAME["isolation_violation"] = Op.ISOLATION_VIOLATION


def op_from_name(name: "str | Op") -> Op:
    """Op of an operation name (the 0.1.0 strings accepted); ValueError if unknown."""
    if isinstance(name, Op):
        return name
    try:
        return _OPS_BY_NAME[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown audit operation {name!r}; known: {sorted(OP_NAMES.values())}") from None


VALID_OPS = frozenset(int(o) for o in Op)
_VALID_OP_TABLE = np.zeros(256, dtype=np.bool_)
_VALID_OP_TABLE[sorted(VALID_OPS)] = True
_VALID_OP_BYTES = bytes(sorted(VALID_OPS))


def valid_ops(ops: np.ndarray) -> bool:
    """Whether every entry of ``ops`` (the ``op`` field of a record batch, uint8) names an operation."""
    if ops.dtype == np.uint8:   # what is left once every valid byte is deleted (C speed: on every decode step)
        return not ops.tobytes().translate(None, _VALID_OP_BYTES)
    return bool(_VALID_OP_TABLE[ops].all())


def check_records(records, what: str) -> None:
    """Refuse what cannot be written as a batch of prepared records (``what``: the call, for the message):
    TypeError unless ``records`` is a 1-D numpy array of RECORD_DTYPE, ValueError naming the first operation
    code that names no operation."""
    if type(records) is not np.ndarray:
        raise TypeError(f"{what} takes a numpy array of RECORD_DTYPE, got {type(records).__name__}")
    if records.dtype != RECORD_DTYPE or records.ndim != 1:
        raise TypeError(f"{what} takes a 1-D array of RECORD_DTYPE, got a {records.ndim}-D array of {records.dtype}")
    ops = records["op"]
    if not valid_ops(ops):
        bad = next(int(o) for o in ops.tolist() if o not in VALID_OPS)
        raise ValueError(f"unknown audit operation code {bad}")
