"""The byte arena alone (numpy and torch only): allocation, compaction, reclaiming, live bytes, shredding."""

import numpy as np
import torch

from pqc_kv_cache.cache.arena import DEAD_FRACTION, GROWTH, MAX_CAPACITY, ArenaStats, ByteArena


def filled(sizes, rows_per_chunk=1):
    """An arena holding one chunk per size, each filled with its own byte value (1, 2, ...)."""
    a = ByteArena()
    offsets = np.zeros((0, rows_per_chunk), dtype=np.int64)
    for i, n in enumerate(sizes):
        off, offsets = a.alloc(n, offsets, np.array(sizes[:i], dtype=np.int64))
        a.buffer[off:off + n] = i + 1
        offsets = np.concatenate([offsets, np.full((1, rows_per_chunk), off, dtype=np.int64)])
    return a, offsets, np.array(sizes, dtype=np.int64)


def test_allocations_that_fit_follow_each_other_and_the_first_one_sizes_the_arena():
    a, offsets, _ = filled([10, 20, 30])
    assert offsets[:, 0].tolist() == [0, 10, 30] and a.used == 60
    assert a.view().shape == (60,)
    assert a.capacity < 2 * 60, "grown by less than twice what it holds"


def test_live_bytes_count_chunks_shared_by_rows_once():
    offsets = np.array([[0, 0, 40], [100, 140, 140]])
    assert ByteArena.live_bytes(offsets, np.array([40, 40])) == 4 * 40
    assert ByteArena.live_bytes(np.zeros((0, 2), dtype=np.int64), np.zeros(0)) == 0


def test_compaction_keeps_live_chunks_byte_for_byte_and_drops_dead_ones():
    a, offsets, sizes = filled([10, 20, 30])
    keep = np.array([0, 2])                      # the 20-byte chunk is dead
    old = [a.buffer[o:o + n].clone() for o, n in zip(offsets[keep, 0].tolist(), sizes[keep].tolist())]
    new_offsets = a.compact(offsets[keep], sizes[keep], 64)
    assert a.capacity == 64 and a.used == 40
    assert new_offsets[:, 0].tolist() == [0, 10]
    for o, n, was in zip(new_offsets[:, 0].tolist(), sizes[keep].tolist(), old):
        assert torch.equal(a.buffer[o:o + n], was)
    assert not a.buffer[40:].any(), "the rest of a new arena is zeroed, not left as it was"


def test_compaction_copies_a_chunk_shared_by_several_rows_once_and_they_keep_sharing_it():
    a, offsets, sizes = filled([8, 8], rows_per_chunk=2)
    shared = np.array([[8, 8]])                  # both rows hold the second chunk (a beam reorder)
    new = a.compact(shared, sizes[1:], 16)
    assert new.tolist() == [[0, 0]] and a.used == 8 and (a.buffer[:8] == 2).all()


def test_live_bytes_count_every_row_of_an_unshared_segment():
    offsets = np.array([[0, 40, 80], [120, 220, 320]])
    assert ByteArena.live_bytes(offsets, np.array([40, 100])) == 3 * 40 + 3 * 100


def test_compaction_copies_adjacent_chunks_and_shared_ones_exactly():
    a, offsets, sizes = filled([5, 6, 7, 8, 9])
    # chunks 0 and 1 adjacent, 2 dead, 3 and 4 adjacent; the second row shares chunk 4 with the first
    live = np.array([[0, 0], [5, 5], [18, 18], [26, 26]])
    new = a.compact(live, sizes[[0, 1, 3, 4]], 64)
    assert new[:, 0].tolist() == [0, 5, 11, 19] and a.used == 28
    assert a.buffer[:28].tolist() == [1] * 5 + [2] * 6 + [4] * 8 + [5] * 9


def test_an_allocation_that_does_not_fit_moves_the_live_chunks_into_a_right_sized_arena():
    a, offsets, sizes = filled([1000, 500, 300])
    a.compact(offsets, sizes, 1800)               # full: the next allocation cannot fit
    live = np.array([[1500]])                      # only the last chunk is live
    off, moved = a.alloc(200, live, sizes[2:])
    assert a.capacity == int(GROWTH * (300 + 200)) + 1, "sized to what it holds, dead bytes dropped"
    assert moved.tolist() == [[0]] and off == 300 and a.used == 500
    assert (a.buffer[:300] == 3).all()


def test_an_allocation_that_fits_moves_nothing_even_with_dead_bytes():
    a, offsets, sizes = filled([100, 100])
    cap, buf = a.capacity, a.buffer
    off, moved = a.alloc(10, offsets[1:], sizes[1:])
    assert a.buffer is buf and a.capacity == cap and off == 200 and np.array_equal(moved, offsets[1:])


def test_reclaim_waits_for_dead_bytes_to_pass_their_fraction_of_live_ones():
    a, offsets, sizes = filled([400, 100, 60])
    # chunk 1 dropped: 100 dead bytes against 460 live, within the bound
    assert 100 <= DEAD_FRACTION * 460
    buf = a.buffer
    assert a.reclaim(offsets[[0, 2]], sizes[[0, 2]]) is None and a.buffer is buf
    # chunk 0 dropped too: 500 dead against 60 live
    moved = a.reclaim(offsets[[2]], sizes[[2]])
    assert moved.tolist() == [[0]] and a.used == 60 and a.capacity == int(GROWTH * 60) + 1
    assert (a.buffer[:60] == 3).all()


def test_reclaim_shrinks_an_arena_whose_live_bytes_fell_far_below_its_capacity():
    a, offsets, sizes = filled([100] * 5)
    a.compact(offsets, sizes, 800)
    # one chunk of five dropped: 100 dead bytes against 400 live is within DEAD_FRACTION, 800 > 1.8 x 400 is not
    assert 100 <= DEAD_FRACTION * 400 and 800 > MAX_CAPACITY * 400
    moved = a.reclaim(offsets[:4], sizes[:4])
    assert moved[:, 0].tolist() == [0, 100, 200, 300] and a.capacity == int(GROWTH * 400) + 1


def test_stats_report_used_capacity_and_live_bytes():
    a, offsets, sizes = filled([10, 20, 30])
    s = a.stats(offsets[[0, 2]], sizes[[0, 2]])
    assert s == ArenaStats(used=60, capacity=a.capacity, live=40) and s.dead == 20


def test_shred_zeroes_exactly_the_named_chunks():
    a, offsets, sizes = filled([10, 20, 30])
    a.shred(offsets[[1]], sizes[[1]])
    assert not a.buffer[10:30].any() and (a.buffer[:10] == 1).all() and (a.buffer[30:60] == 3).all()


def test_state_and_restore_undo_an_allocation_and_a_compaction():
    a, offsets, sizes = filled([10, 20])
    state, cap = a.state(), a.capacity
    a.compact(offsets, sizes, 128)
    a.alloc(5, offsets, sizes)
    a.restore(state)
    assert a.used == 30 and a.capacity == cap and (a.buffer[10:30] == 2).all()


def test_a_clone_holds_its_own_bytes():
    a, _, _ = filled([10])
    b = a.clone()
    a.zero()
    assert b.used == 10 and (b.buffer[:10] == 1).all() and not a.buffer.any()
