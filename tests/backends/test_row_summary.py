"""decrypt_row_summary against a per-chunk loop: the reduced grid of a layer read (the same ascending rows
in every chunk run) and the general grouping must give the same DECRYPT row fields."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.backends.base import decrypt_row_summary


def _reference(row, pos_start, pos_count, counter, slot, nbytes):
    out: dict[int, list] = {}
    for i, r in enumerate(row.tolist()):
        s, e = int(pos_start[i]), int(pos_start[i] + pos_count[i])
        if r not in out:
            out[r] = [s, e, int(counter[i]), int(slot[i]), int(nbytes[i])]
        else:
            o = out[r]
            o[0], o[1], o[2], o[4] = min(o[0], s), max(o[1], e), min(o[2], int(counter[i])), o[4] + int(nbytes[i])
    rows = sorted(out)
    return rows, [out[r] for r in rows]


def _check(row):
    rng = np.random.default_rng(len(row))
    n = row.size
    pos_start = rng.integers(0, 1000, n)
    pos_count = rng.integers(1, 50, n)
    counter = rng.integers(0, 1 << 40, n)
    slot = rng.integers(0, 4, n)
    nbytes = pos_count * 24
    s = decrypt_row_summary(row, pos_start, pos_count, counter, slot, nbytes)
    rows, ref = _reference(row, pos_start, pos_count, counter, slot, nbytes)
    assert s.row.tolist() == rows
    got = np.stack([s.pos_start, s.pos_start + s.pos_count, s.nonce_counter, s.slot, s.nbytes], 1).tolist()
    assert got == ref
    assert (s.row[s.row_of_chunk] == row).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True), st.integers(1, 6))
def test_tiled_rows_match_the_reference(rows, runs):
    _check(np.tile(np.sort(np.array(rows, dtype=np.int64)), runs))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=30))
def test_any_rows_match_the_reference(rows):
    _check(np.array(rows, dtype=np.int64))


def test_empty_call_has_no_rows():
    s = decrypt_row_summary(np.zeros(0, dtype=np.int64), [], [], [], [], [])
    assert s.row.size == 0 and s.row_of_chunk.size == 0
