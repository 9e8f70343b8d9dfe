"""kernel_abi against the kernels' headers: every struct, size, offset and table column the host hands
the kernels, compiled from kernels/pqc_chunk_abi.h with g++ and compared with the numpy mirror."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from pqc_kv_cache.backends import kernel_abi as abi
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, decrypt_row_summary

CXX = shutil.which("g++")


def _probe(tmp_path, lines: list[str]) -> dict[str, int]:
    """Compile and run a C++ program printing ``name value`` for each (name, expression) line."""
    body = "\n".join(f'    printf("%s %lld\\n", "{name}", (long long)({expr}));' for name, expr in lines)
    src = tmp_path / "probe.cpp"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "pqc_chunk.cuh"\n'
                   f"int main() {{\n{body}\n    return 0;\n}}\n")
    exe = tmp_path / "probe"
    subprocess.run([CXX, "-std=c++17", "-Wall", "-Werror", f"-I{abi.kernel_sources_dir()}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("struct, dtype", [("pqc_chunk_params", abi.CHUNK_PARAMS_DTYPE),
                                           ("pqc_slot_meta", abi.SLOT_META_DTYPE)])
def test_struct_mirrors_match_the_header_field_by_field(tmp_path, struct, dtype):
    lines = [("sizeof", f"sizeof({struct})")]
    for name in dtype.names:
        lines += [(f"off.{name}", f"offsetof({struct}, {name})"), (f"size.{name}", f"sizeof((({struct}*)0)->{name})")]
    got = _probe(tmp_path, lines)
    assert got["sizeof"] == dtype.itemsize
    for name in dtype.names:
        assert (got[f"off.{name}"], got[f"size.{name}"]) == (dtype.fields[name][1], dtype.fields[name][0].itemsize), name


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_sizes_and_table_columns_match_the_header(tmp_path):
    lines = [("sched", "sizeof(pqc_key_sched)"), ("record", "sizeof(pqc_audit_record)"),
             ("status_off", "offsetof(pqc_audit_record, status)"), ("PQC_RECORD_SIZE", "PQC_RECORD_SIZE"),
             ("PQC_TABLE_COLS", "PQC_TABLE_COLS"), ("PQC_ITEM_COLS", "PQC_ITEM_COLS"),
             ("PQC_ROWDESC_COLS", "PQC_ROWDESC_COLS"), ("PQC_AAD_V1_SIZE", "PQC_AAD_V1_SIZE"),
             ("PQC_MAX_LANES", "PQC_MAX_LANES")]
    lines += [(f"COL_{c}", f"PQC_COL_{c.upper()}") for c in abi.COLS]
    lines += [(f"ITEM_{c}", f"PQC_ITEM_{c.upper()}") for c in abi.ITEM_FIELDS]
    rd = {"row": "ROW", "pos_start": "POS_START", "pos_count": "POS_COUNT", "counter": "COUNTER", "slot": "SLOT",
          "nbytes": "NBYTES"}
    lines += [(f"RD_{c}", f"PQC_RD_{rd[c]}") for c in abi.ROWDESC_FIELDS]
    got = _probe(tmp_path, lines)
    assert got["sched"] == abi.SCHED_SIZE
    assert got["record"] == got["PQC_RECORD_SIZE"] == abi.RECORD_SIZE
    assert got["PQC_TABLE_COLS"] == abi.TABLE_COLS and got["PQC_ITEM_COLS"] == abi.ITEM_COLS
    assert got["PQC_ROWDESC_COLS"] == abi.ROWDESC_COLS and got["PQC_MAX_LANES"] == abi.LANES
    assert got["PQC_AAD_V1_SIZE"] == abi.AAD_BLOCKS * 16
    assert [got[f"COL_{c}"] for c in abi.COLS] == list(range(abi.TABLE_COLS))
    assert [got[f"ITEM_{c}"] for c in abi.ITEM_FIELDS] == list(range(abi.ITEM_COLS))
    assert [got[f"RD_{c}"] for c in abi.ROWDESC_FIELDS] == list(range(abi.ROWDESC_COLS))


def test_translation_unit_inlines_every_header_once():
    src = abi.kernel_source()
    assert '#include "' not in src
    headers = sorted(p.name for p in abi.kernel_sources_dir().iterdir() if p.suffix in (".h", ".cuh"))
    for h in headers:
        assert src.count(f"// ---- {h}\n") == 1, h
    assert src.count("typedef unsigned int uint32_t;") == 1        # the NVRTC type preamble exists once


def test_chunk_params_refuses_unknown_fields_and_zeroes_the_rest():
    p = abi.chunk_params(n=3, call_tag=(1 << 63) + 1, first_no=(1 << 64) - 1, rec_lo=-2)
    assert p["n"][0] == 3 and p["call_tag"][0] == (1 << 63) + 1 and p["first_no"][0] == (1 << 64) - 1
    assert p["rec_lo"][0] == -2 and p["items"][0] == 0 and p["fq_cap"][0] == 0
    with pytest.raises(TypeError):
        abi.chunk_params(nn=1)


def test_row_descriptors_are_the_contract_row_summary():
    """The CUDA row records and the host's emitted ones come from one definition."""
    table = abi.chunk_table_array(ChunkTable(*(np.array(c, dtype=np.int64) for c in (
        [1, 0, 1, 0], [2, 0, 2, 5], [10, 0, 3, 7], [4, 3, 7, 2], [0, 0, 0, 0], [50, 9, 40, 3], [0, 0, 0, 0]))))
    layout = ChunkLayout(layer_idx=0, num_heads=1, head_dim=8, dtype=torch.float16)
    desc, row_of_chunk = abi.row_descriptors(table, layout.bytes_per_position)
    s = decrypt_row_summary(table[1], table[2], table[3], table[5], table[0], table[3] * layout.bytes_per_position)
    assert desc[0].tolist() == [0, 2, 5] == s.row.tolist()
    assert desc[1].tolist() == [0, 3, 7] and desc[2].tolist() == [3, 11, 2]      # row 2: positions 3..13
    assert desc[3].tolist() == [9, 40, 3]                                       # the lowest counter of the row
    assert desc[4].tolist() == [0, 1, 0]                                        # slot of the row's first chunk
    assert desc[5].tolist() == [3 * 32, 11 * 32, 2 * 32]
    assert row_of_chunk.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("pos_count, slots", [
    ([4096] * 8, 528), ([4096] * 8, 396), ([64] * 512, 528), ([4096] * 8 + [1] * 24, 528),
    ([4096] * 3 + [100] * 5, 528), ([4096], 528), ([2048] * 16, 132), ([64] * 2000, 528)])
def test_the_planner_keeps_the_slots_busy(pos_count, slots):
    """Modelled launch efficiency (rounds as units of work, grid-stride over min(items, slots) CTAs): the
    planner's items fill the slots, at least as well as cutting every chunk to the even share
    max(4, total // slots) did, which left a second wave of 8 items at 4K x batch 8 on 528 slots."""
    pc = np.array(pos_count, dtype=np.int64)
    r = abi.chunk_rounds(pc * 4096)        # 8 KV heads x 128 bf16: 4 KiB per position
    plan = abi.work_items(r, pc, slots=slots)
    even = abi.work_items(r, pc, rounds_per_item=max(abi.MIN_ITEM_ROUNDS, int(r.sum()) // slots))
    assert abi.plan_efficiency(plan, slots) >= 0.9
    assert abi.plan_efficiency(plan, slots) >= abi.plan_efficiency(even, slots) - 1e-9
    if len(pc) < slots:
        assert plan.shape[1] <= slots


def test_plan_efficiency_counts_the_busiest_cta():
    items = abi.work_items(np.array([8, 8, 8, 8, 8]), np.ones(5, np.int64))     # 5 items of 8 rounds
    assert abi.plan_efficiency(items, 5) == 1.0
    assert abi.plan_efficiency(items, 4) == 40 / (4 * 16)                       # CTA 0 runs two
    assert abi.plan_efficiency(items, 10) == 0.5


def test_params_template_packs_the_bytes_of_chunk_params():
    fields = dict(sched=1 << 40, meta=2, table=3, n=4, items=0, n_items=9, k=5, k_sb=-6, k_sh=7, k_ss=8, v=9,
                  arena=10, records=11, partials=12, counters=13, first_no=(1 << 64) - 1, rec_lo=-2, status=14,
                  fq=15, fq_count=16, call_tag=(1 << 63) + 1, layer=3, num_heads=8, head_dim=128, itemsize=2,
                  dtype_code=5, fq_cap=4096)
    fixed = {k: fields[k] for k in ("sched", "meta", "k", "k_sb", "layer", "num_heads")}
    tpl = abi.ParamsTemplate(**fixed)
    buf = bytearray(abi.ParamsTemplate.size + 8)
    tpl.pack_into(buf, 8, **{k: v for k, v in fields.items() if k not in fixed})
    assert bytes(buf[8:]) == abi.chunk_params(**fields).tobytes()
    tpl.pack_into(buf, 0, n=1)          # the template itself is not changed by a call's fields
    assert bytes(buf[:abi.ParamsTemplate.size]) == abi.chunk_params(n=1, **fixed).tobytes()
    with pytest.raises(TypeError):
        tpl.pack_into(buf, 0, nn=1)
    with pytest.raises(OverflowError):
        tpl.pack_into(buf, 0, n_items=1 << 63)


BIG = (1 << 63) - 1


@pytest.mark.parametrize("col, value, match", [
    (4, BIG, "positions out of range of k"),            # io_start: io_start + pos_count wraps in int64
    (4, BIG - 3, "positions out of range of k"),
    (3, BIG, "positions out of range of k"),            # pos_count
    (6, BIG - 10, "ciphertext out of range of the arena"),   # offset: offset + pos_count * bpp wraps
    (6, 4096, "ciphertext out of range of the arena"),
])
def test_check_bounds_refuses_a_column_whose_int64_sum_would_wrap(col, value, match):
    """Two chunks, so that the columns' maxima are not one chunk's and the per-chunk sum is taken: a value near
    2^63 in one column must not wrap that sum round to a small one that passes."""
    lay = ChunkLayout(layer_idx=0, num_heads=2, head_dim=8, dtype=torch.float32)
    k = torch.zeros(2, 2, 4, 8)
    arena = torch.zeros(4096, dtype=torch.uint8)
    # columns: slot, row, pos_start, pos_count, io_start, counter, offset, aux; chunk 1 is in range
    table = np.array([[0, 0], [0, 1], [0, 0], [1, 4], [0, 0], [0, 1], [0, 512], [-1, -1]], dtype=np.int64)
    abi.check_bounds(table, lay, k, k, arena, 1)
    table[col, 0] = value
    with pytest.raises(ValueError, match=match):
        abi.check_bounds(table, lay, k, k, arena, 1)


def test_check_bounds_sums_per_chunk_when_the_maxima_are_of_different_chunks():
    """The exact per-chunk bound still accepts what the columns' maxima alone would refuse."""
    lay = ChunkLayout(layer_idx=0, num_heads=2, head_dim=8, dtype=torch.float32)   # 128 B per position
    k = torch.zeros(1, 2, 4, 8)
    arena = torch.zeros(4 * 128 + 16 + 3 * (128 + 16), dtype=torch.uint8)
    offsets = [0, 4 * 128 + 16, 4 * 128 + 16 + 128 + 16, 4 * 128 + 16 + 2 * (128 + 16)]
    table = np.array([[0] * 4, [0] * 4, [0, 0, 1, 2], [4, 1, 1, 1], [0, 1, 2, 3], [0, 4, 5, 6], offsets,
                      [-1] * 4], dtype=np.int64)
    abi.check_bounds(table, lay, k, k, arena, 1)
