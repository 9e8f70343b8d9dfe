"""The packed audit record: the C header and its numpy mirror have the same layout."""

import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from pqc_kv_cache.audit import NONE16, RECORD_DTYPE, RECORD_SIZE, Op, Status
from pqc_kv_cache.audit.records import OP_NAMES, RECORD_STRUCT, RECORD_WORDS, op_from_name

HEADER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_header_size_and_every_offset_match_numpy_dtype(tmp_path):
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "pqc_audit_record.h"', "int main(void) {",
             '  printf("size %zu\\n", sizeof(pqc_audit_record));']
    for name in RECORD_DTYPE.names:
        lines.append(f'  printf("{name} %zu %zu\\n", offsetof(pqc_audit_record, {name}), '
                     f'sizeof(((pqc_audit_record*)0)->{name}));')
    lines += [f'  printf("const PQC_OP_{o.name} %d\\n", PQC_OP_{o.name});' for o in Op]
    lines += [f'  printf("const PQC_STATUS_{s.name} %d\\n", PQC_STATUS_{s.name});' for s in Status]
    lines += ['  printf("const PQC_NONE16 %u\\n", PQC_NONE16);', "  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-I", HEADER_DIR, str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    got = {}
    consts = {}
    for line in filter(None, out):
        parts = line.split()
        if parts[0] == "size":
            got["__size__"] = int(parts[1])
        elif parts[0] == "const":
            consts[parts[1]] = int(parts[2])
        else:
            got[parts[0]] = (int(parts[1]), int(parts[2]))
    assert got.pop("__size__") == RECORD_DTYPE.itemsize == RECORD_SIZE == 64
    for name in RECORD_DTYPE.names:
        dt, off = RECORD_DTYPE.fields[name][:2]
        assert got[name] == (off, dt.itemsize), name
    # the layouts derived from the dtype: the struct the host ring packs with, the word views the CUDA ring
    # writes through
    fmt = RECORD_STRUCT.format
    assert RECORD_STRUCT.size == 64 and len(fmt) - 1 == len(RECORD_DTYPE.names)
    for i, name in enumerate(RECORD_DTYPE.names):
        assert (struct.calcsize(fmt[:i + 1]), struct.calcsize("<" + fmt[i + 1])) == got[name], name
        width, index = RECORD_WORDS[name]
        assert (width * index, width) == got[name], name
    for o in Op:
        assert consts[f"PQC_OP_{o.name}"] == int(o)
    for s in Status:
        assert consts[f"PQC_STATUS_{s.name}"] == int(s)
    assert consts["PQC_NONE16"] == NONE16


def test_record_dtype_is_little_endian_and_packed():
    assert RECORD_DTYPE.isalignedstruct is False
    assert sum(RECORD_DTYPE[n].itemsize for n in RECORD_DTYPE.names) == 64
    for n in RECORD_DTYPE.names:
        assert RECORD_DTYPE[n].byteorder in ("<", "|", "=")
    r = np.zeros(1, RECORD_DTYPE)
    r["record_no"] = 0x0102030405060708
    assert r.tobytes()[:8] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_earlier_operation_names_are_accepted():
    for op, name in OP_NAMES.items():
        assert op_from_name(name) is op
    assert op_from_name("isolation_violation") is Op.ISOLATION_VIOLATION
    with pytest.raises(ValueError):
        op_from_name("shred")


def test_host_ring_packs_every_field_where_the_dtype_reads_it():
    from pqc_kv_cache.audit.fields import VALUE_FIELDS
    from pqc_kv_cache.audit.ring import HostRing

    ring = HostRing(4)
    values = [0x0101_0101 * (k + 1) & (0xFF if name == "status" else 0xFFFF if name in ("layer", "row")
                                         else 0xFFFF_FFFF) for k, name in enumerate(VALUE_FIELDS)]
    args = ring.pack_args(int(Op.RESEAL), values, 0x1234_5678_9ABC)
    ring.write(77, 0, 1, args, [])                 # one record: struct.pack_into straight into the slot
    ring.write(78, 0, 2, args, [])                 # a batch: the packed template copied into each slot
    for rec, no in zip(ring.buf[:3], (77, 78, 79)):
        assert int(rec["record_no"]) == no and int(rec["op"]) == Op.RESEAL and int(rec["flags"]) == 0
        assert int(rec["host_ts_ns"]) == 0x1234_5678_9ABC
        for name, v in zip(VALUE_FIELDS, values):
            assert int(rec[name]) == v, name


def test_valid_ops_names_every_operation_and_nothing_else():
    """The byte-level check (uint8, what a record batch's ``op`` field is) and the table (other dtypes) agree
    for every value, in a strided field view as in a contiguous array."""
    from pqc_kv_cache.audit.records import RECORD_DTYPE, Op, valid_ops
    known = {int(o) for o in Op}
    recs = np.zeros(4, dtype=RECORD_DTYPE)
    for value in range(256):
        recs["op"] = int(Op.READ)
        recs["op"][2] = value
        want = value in known
        assert valid_ops(recs["op"]) is want
        assert valid_ops(np.array([value], dtype=np.uint8)) is want
        assert valid_ops(np.array([int(Op.ENCRYPT), value], dtype=np.int64)) is want
    assert valid_ops(np.zeros(0, dtype=np.uint8)) is True
