"""The chunk table alone (numpy only): appends, keeps, merges, coverage gaps, row moves, copies."""

import numpy as np
import pytest

from pqc_kv_cache.cache.segments import COLUMNS, SealedChunks, SegmentTable


def sealed(rows: int, base: int) -> SealedChunks:
    r = np.arange(rows, dtype=np.int64)
    return SealedChunks(base + r, np.full(rows, 7), r % 2, 1000 * base + 10 * r)


def table(counts, rows=3) -> SegmentTable:
    t = SegmentTable(rows)
    pos = 0
    for i, n in enumerate(counts):
        t.append(pos, n, sealed(rows, i))
        pos += n
    return t


def test_a_new_table_is_empty_with_one_column_per_field_of_the_rows():
    t = SegmentTable(4)
    assert t.num_segments == 0 and set(t.columns) == set(COLUMNS)
    assert all(a.shape == (0, 4) and a.dtype == np.int64 for a in t.columns.values())


def test_append_adds_a_segment_with_one_chunk_per_row():
    t = table([5, 1, 2])
    assert t.start.tolist() == [0, 5, 6] and t.count.tolist() == [5, 1, 2] and t.ends().tolist() == [5, 6, 8]
    assert t.counter[:, 2].tolist() == [2, 3, 4] and t.offset[1].tolist() == [1000, 1010, 1020]
    assert (t.epoch == 7).all() and t.session_slot[0].tolist() == [0, 1, 0]


def test_chunk_sizes_count_every_position_plus_the_tag():
    assert table([5, 1]).chunk_sizes(bytes_per_position=64, tag_size=16).tolist() == [336, 80]


def test_first_reaching_finds_the_segment_holding_a_position():
    t = table([5, 1, 2])
    assert [t.first_reaching(p) for p in (0, 4, 5, 6, 7, 8)] == [0, 0, 1, 2, 2, 3]


def test_gap_is_none_when_segments_cover_the_range_in_order():
    assert table([5, 1, 2]).gap(0, 0, 8) is None
    assert table([5, 1, 2]).gap(1, 5, 8) is None


@pytest.mark.parametrize("drop, view_start, end, want", [
    ([0, 2], 0, 8, (5, 6)),      # a hole between segments
    ([1, 2], 0, 8, (0, 5)),      # the first segment starts after the view
    ([0, 1], 0, 8, (6, 8)),      # the end is past the last segment
    ([], 3, 8, (3, 8)),          # no segment at all
])
def test_gap_names_the_first_uncovered_range(drop, view_start, end, want):
    t = table([5, 1, 2])
    t.keep(np.array(drop, dtype=np.int64))
    assert t.gap(0, view_start, end) == want


def test_gap_of_an_empty_view_of_an_empty_table_is_none():
    assert SegmentTable(2).gap(0, 4, 4) is None


def test_keep_takes_a_mask_or_indices_and_keeps_the_columns_aligned():
    t = table([5, 1, 2])
    t.keep(t.ends() > 5)
    assert t.start.tolist() == [5, 6] and t.counter[:, 0].tolist() == [1, 2]
    t.keep(np.array([1]))
    assert t.start.tolist() == [6] and t.offset.tolist() == [[2000, 2010, 2020]]


def test_select_slices_whole_runs_and_gathers_otherwise():
    t = table([5, 1, 2])
    run = t.select(np.array([1, 2]), np.arange(3))
    assert run["counter"].tolist() == [1, 2, 3, 2, 3, 4]
    some = t.select(np.array([0, 2]), np.array([2]))
    assert some["offset"].tolist() == [20, 2020] and some["session_slot"].tolist() == [0, 0]


@pytest.mark.parametrize("counts, cap, floor, want", [
    ([8, 4, 2, 1, 1], 100, 0, 0),      # every segment joins: each no larger than the run after it
    ([8, 4, 2, 1, 1], 10, 0, 1),       # the cap stops the run before the 8
    ([8, 4, 2, 1, 1], 100, 13, 3),     # segments starting before the floor do not join
    ([1, 4, 1], 100, 0, 2),            # a larger segment ends the run
])
def test_merge_start_walks_back_binary_counter_style(counts, cap, floor, want):
    assert table(counts).merge_start(cap, floor) == want


def test_set_segment_and_set_rows_write_new_chunks():
    t = table([5, 1, 2])
    t.set_segment(2, 1, sealed(3, 9))
    assert t.count.tolist() == [5, 1, 1] and t.counter[2].tolist() == [9, 10, 11]
    rows = np.array([0, 2])
    new = SealedChunks(*(np.arange(6, dtype=np.int64) + 100 * k for k in range(4)))
    t.set_rows(rows, new)
    assert t.counter[:, [0, 2]].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert t.counter[:, 1].tolist() == [1, 2, 10], "the other row keeps its chunks"


def test_take_rows_builds_new_columns_and_leaves_the_table_alone():
    t = table([5, 1])
    before = {f: a.copy() for f, a in t.columns.items()}
    moved = t.take_rows(np.array([2, 2, 0]))
    assert moved["counter"].tolist() == [[2, 2, 0], [3, 3, 1]]
    assert all(np.array_equal(before[f], t.columns[f]) for f in before)


def test_a_copy_is_independent_of_the_original():
    t = table([5, 1])
    c = t.copy()
    t.count[0] = 99
    t.offset[0, 0] = -1
    t.append(6, 1, sealed(3, 5))
    assert c.count.tolist() == [5, 1] and c.offset[0, 0] == 0 and c.num_segments == 2


def _dump(t: SegmentTable):
    return (t.start.tolist(), t.count.tolist(), {f: a.tolist() for f, a in t.columns.items()})


@pytest.mark.parametrize("change", ["append", "append past the room", "keep", "set_segment", "set_rows",
                                    "set_column", "columns"])
def test_restore_puts_back_the_state_whatever_changed_since(change):
    """A state is kept without a copy: appends write past it, every other change copies first."""
    t = table([5, 1, 2])
    before = _dump(t)
    state = t.state()
    if change == "append":
        t.append(8, 1, sealed(3, 4))
    elif change == "append past the room":
        for i in range(40):
            t.append(8 + i, 1, sealed(3, 4 + i))
    elif change == "keep":
        t.keep(np.array([0]))
        t.append(5, 3, sealed(3, 4))
    elif change == "set_segment":
        t.set_segment(2, 1, sealed(3, 9))
    elif change == "set_rows":
        t.set_rows(np.array([1]), SealedChunks(*(np.full(3, 77, dtype=np.int64) for _ in range(4))))
    elif change == "set_column":
        t.set_column("offset", np.full((3, 3), 5))
    else:
        t.columns = {f: np.zeros((3, 2), dtype=np.int64) for f in COLUMNS}
    assert _dump(t) != before
    t.restore(state)
    assert _dump(t) == before
    t.append(8, 1, sealed(3, 4))          # and it goes on from there
    assert t.num_segments == 4 and t.counter[3].tolist() == [4, 5, 6]


def test_nested_states_restore_in_order():
    t = table([5, 1])
    outer = t.state()
    t.append(6, 1, sealed(3, 2))
    inner = t.state()
    t.set_segment(2, 2, sealed(3, 9))
    t.restore(inner)
    assert t.count.tolist() == [5, 1, 1] and t.counter[2].tolist() == [2, 3, 4]
    t.restore(outer)
    assert t.count.tolist() == [5, 1] and t.num_segments == 2


def test_from_arrays_holds_copies_and_refuses_mismatched_shapes():
    start, count = np.array([0, 4]), np.array([4, 2])
    cols = {f: np.arange(6).reshape(2, 3) + k for k, f in enumerate(COLUMNS)}
    t = SegmentTable.from_arrays(start, count, cols)
    start[0] = 99
    cols["counter"][0, 0] = 99
    assert t.start.tolist() == [0, 4] and t.counter[0].tolist() == [0, 1, 2] and t.rows == 3
    t.append(6, 1, sealed(3, 1))
    assert t.num_segments == 3
    with pytest.raises(ValueError, match="count"):
        SegmentTable.from_arrays(start, np.array([1]), cols)
    with pytest.raises(ValueError, match="shape"):
        SegmentTable.from_arrays(start, count, {f: np.zeros((3, 3), dtype=np.int64) for f in COLUMNS})
    with pytest.raises(ValueError, match="exactly"):
        SegmentTable.from_arrays(start, count, {"counter": cols["counter"]})


def test_a_column_is_replaced_through_set_column_not_through_the_columns_view():
    t = table([5, 1])
    with pytest.raises(TypeError):
        t.columns["offset"] = np.zeros((2, 3), dtype=np.int64)
    t.set_column("offset", np.full((2, 3), 4))
    assert t.offset.tolist() == [[4, 4, 4], [4, 4, 4]]
    with pytest.raises(ValueError, match="must be"):
        t.set_column("offset", np.zeros((3, 3), dtype=np.int64))


def _reference_gap(t: SegmentTable, first: int, view_start: int, end: int):
    """gap() computed from the live arrays alone (what the table answered before it kept track of abutting)."""
    starts, ends = t.start[first:], t.start[first:] + t.count[first:]
    if starts.size == 0:
        return (view_start, end) if view_start < end else None
    if int(starts[0]) > view_start:
        return (view_start, int(starts[0]))
    holes = np.flatnonzero(starts[1:] != ends[:-1])
    if holes.size:
        k = int(holes[0])
        return (int(min(ends[k], starts[k + 1])), int(max(ends[k], starts[k + 1])))
    if int(ends[-1]) != end:
        return (int(min(ends[-1], end)), int(max(ends[-1], end)))
    return None


@pytest.mark.parametrize("seed", range(10))
def test_gap_and_first_reaching_agree_with_the_arrays_through_any_sequence_of_changes(seed):
    """The table remembers whether its segments abut (so a decode step's coverage check reads two ends):
    appends in and out of place, keeps, set_segment, growth past the initial room, copies and restores of
    states must never leave that stale."""
    rng = np.random.default_rng(seed)
    t, states = SegmentTable(2), []
    for step in range(120):
        op = rng.integers(0, 8)
        n = t.num_segments
        end = int(t.ends()[-1]) if n else 0
        if op <= 2 or n == 0:           # append: mostly where the last one ends, sometimes with a hole or overlap
            t.append(end + int(rng.choice([0, 0, 0, 2, -1])) if n else int(rng.integers(0, 3)),
                     int(rng.integers(1, 5)), sealed(2, step))
        elif op == 3:
            t.keep(rng.random(n) < 0.7)
        elif op in (4, 7):
            t.set_segment(int(rng.integers(0, n)), int(rng.integers(1, 5)), sealed(2, step))
        elif op == 5:
            states.append(t.state())
        elif states:
            t.restore(states.pop(int(rng.integers(0, len(states)))))
            states.clear()            # later states were taken from the one restored over
        if rng.random() < 0.1:
            t = t.copy()
            states.clear()
        m = t.num_segments
        ends = t.ends()
        last = int(ends[-1]) if m else 0
        for first in range(m + 1):
            for view_start in {0, int(t.start[first]) if first < m else last, last}:
                for e in {last, last + 1}:
                    assert t.gap(first, view_start, e) == _reference_gap(t, first, view_start, e)
        if (np.diff(ends) >= 0).all():     # segments in position order (what a layer keeps)
            for pos in {0, last - 1, last, int(t.start[0]) if m else 0}:
                assert t.first_reaching(pos) == int(np.searchsorted(ends, pos, side="right"))
