"""The byte arena alone (numpy and torch only): allocation, compaction, live bytes, shredding."""

import numpy as np
import torch

from pqc_kv_cache.cache.arena import MIN_CAPACITY, ByteArena


def filled(sizes, rows_per_chunk=1):
    """An arena holding one chunk per size, each filled with its own byte value (1, 2, ...)."""
    a = ByteArena()
    offsets = np.zeros((0, rows_per_chunk), dtype=np.int64)
    for i, n in enumerate(sizes):
        off, offsets = a.alloc(n, offsets, np.array(sizes[:i], dtype=np.int64))
        a.buffer[off:off + n] = i + 1
        offsets = np.concatenate([offsets, np.full((1, rows_per_chunk), off, dtype=np.int64)])
    return a, offsets, np.array(sizes, dtype=np.int64)


def test_the_first_allocation_grows_to_the_minimum_capacity_and_offsets_follow_each_other():
    a, offsets, _ = filled([10, 20, 30])
    assert a.capacity == MIN_CAPACITY and a.used == 60
    assert offsets[:, 0].tolist() == [0, 10, 30]
    assert a.view().shape == (60,)


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


def test_alloc_reclaims_dead_bytes_before_growing():
    a, offsets, sizes = filled([MIN_CAPACITY // 2, MIN_CAPACITY // 4, 1024])
    live = offsets[2:]                           # only the last chunk is live
    off, moved = a.alloc(MIN_CAPACITY // 4, live, sizes[2:])
    assert a.capacity == MIN_CAPACITY, "enough dead bytes were reclaimed: no growth"
    assert moved.tolist() == [[0]] and off == 1024 and a.used == 1024 + MIN_CAPACITY // 4
    assert (a.buffer[:1024] == 3).all()


def test_alloc_doubles_when_live_bytes_need_the_room():
    a, offsets, sizes = filled([MIN_CAPACITY // 2, MIN_CAPACITY // 4])
    off, moved = a.alloc(MIN_CAPACITY // 2, offsets, sizes)
    assert a.capacity >= 2 * MIN_CAPACITY and np.array_equal(moved, offsets)
    assert off == 3 * MIN_CAPACITY // 4 and a.used == off + MIN_CAPACITY // 2


def test_shred_zeroes_exactly_the_named_chunks():
    a, offsets, sizes = filled([10, 20, 30])
    a.shred(offsets[[1]], sizes[[1]])
    assert not a.buffer[10:30].any() and (a.buffer[:10] == 1).all() and (a.buffer[30:60] == 3).all()


def test_state_and_restore_undo_an_allocation_and_a_compaction():
    a, offsets, sizes = filled([10, 20])
    state = a.state()
    a.compact(offsets, sizes, 128)
    a.alloc(5, offsets, sizes)
    a.restore(state)
    assert a.used == 30 and a.capacity == MIN_CAPACITY and (a.buffer[10:30] == 2).all()


def test_a_clone_holds_its_own_bytes():
    a, _, _ = filled([10])
    b = a.clone()
    a.zero()
    assert b.used == 10 and (b.buffer[:10] == 1).all() and not a.buffer.any()
