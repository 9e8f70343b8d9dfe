"""fields.py on its own: scalar and array checks, the one integer check, the per-position expansion."""

import numpy as np
import pytest

from pqc_kv_cache.audit.fields import (FIELD_LIMITS, VALUE_FIELDS, check_int, check_text, expand_per_position,
                                       field_int, prepare)


def _values(**kw):
    base = dict(tenant_idx=0, session_idx=0, layer=0, row=0, pos_start=0, pos_count=0, nonce_counter=0, epoch=0,
                nbytes=0, status=0, device_ts_ns=0)
    base.update(kw)
    return tuple(base[name] for name in VALUE_FIELDS)


def test_check_int_takes_ints_and_numpy_integers_and_refuses_bools_and_others():
    assert check_int("n", 5) == 5 and type(check_int("n", np.uint16(5))) is int
    for bad in (True, np.bool_(False), 1.0, "1", None):
        with pytest.raises(TypeError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n=11 is out of range 0..10"):
        check_int("n", 11, 0, 10)
    with pytest.raises(ValueError, match="must be a positive int, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(TypeError, match="must be a positive int, got bool"):
        check_int("n", True, 1)
    assert check_int("n", -5, None, None) == -5


def test_field_int_uses_each_fields_limit():
    for name, hi in FIELD_LIMITS.items():
        assert field_int(name, hi) == hi
        with pytest.raises(ValueError, match=f"{name}={hi + 1} is out of range"):
            field_int(name, hi + 1)
        with pytest.raises(ValueError):
            field_int(name, -1)


def test_check_text_refuses_what_the_file_cannot_hold():
    check_text("tenant_id", "é" * 10, 20)
    with pytest.raises(ValueError, match="22 UTF-8 bytes"):
        check_text("tenant_id", "é" * 11, 20)
    with pytest.raises(ValueError, match="not valid Unicode"):
        check_text("tenant_id", "a\udc80", 20)
    with pytest.raises(TypeError, match="must be a str"):
        check_text("tenant_id", b"a", 20)


def test_prepare_splits_scalars_from_arrays_and_checks_both():
    pos = np.arange(3, dtype=np.uint32)
    n, ints, arrays = prepare(_values(tenant_idx=np.uint32(4), pos_start=pos, layer=7))
    assert n == 3 and ints[VALUE_FIELDS.index("tenant_idx")] == 4 and ints[VALUE_FIELDS.index("layer")] == 7
    assert len(arrays) == 1 and arrays[0][0] == VALUE_FIELDS.index("pos_start") and arrays[0][1] is pos
    assert prepare(_values())[0] == 1
    with pytest.raises(ValueError, match="layer holds 65536"):
        prepare(_values(layer=np.array([1, 65536], dtype=np.int64)))
    with pytest.raises(ValueError, match="row holds -1"):
        prepare(_values(row=np.array([-1], dtype=np.int8)))
    with pytest.raises(ValueError, match="pos_start has 3 elements, other fields 2"):   # row comes first
        prepare(_values(pos_start=pos, row=np.zeros(2, np.uint16)))
    with pytest.raises(TypeError, match="1-D integer array"):
        prepare(_values(pos_start=np.zeros((2, 2), np.uint32)))
    with pytest.raises(TypeError, match="1-D integer array"):
        prepare(_values(pos_start=np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match="status=256 is out of range"):
        prepare(_values(status=256))
    with pytest.raises(TypeError):
        prepare(_values(status=True))


def _expanded(n, ints, arrays, make):
    """Every field of the n expanded records as arrays (pieces joined when built piece by piece)."""
    if make is not None:
        arrays = []
        parts = [make(done, min(3, n - done)) for done in range(0, n, 3)]
        for k in {k for part in parts for k, _ in part}:
            arrays.append((k, np.concatenate([v for part in parts for kk, v in part if kk == k])))
    out = {name: np.full(n, ints[k], dtype=np.int64) for k, name in enumerate(VALUE_FIELDS)}
    for k, v in arrays:
        out[VALUE_FIELDS[k]] = np.asarray(v, dtype=np.int64)
    return out


def test_expansion_of_one_descriptor_and_of_several_splits_nbytes_evenly():
    d, ints, arrays = prepare(_values(pos_start=10, pos_count=4, nbytes=10, epoch=3))
    n, ints2, arrays2, make = expand_per_position(d, ints, arrays)
    got = _expanded(n, ints2, arrays2, make)
    assert n == 4 and list(got["pos_start"]) == [10, 11, 12, 13] and list(got["nbytes"]) == [3, 3, 2, 2]
    assert set(got["pos_count"]) == {1} and set(got["epoch"]) == {3}
    d, ints, arrays = prepare(_values(pos_start=np.array([0, 100], np.uint32), pos_count=np.array([2, 3], np.uint32),
                                      nbytes=np.array([5, 3], np.uint32), row=np.array([1, 2], np.uint16)))
    n, ints2, arrays2, make = expand_per_position(d, ints, arrays)
    got = _expanded(n, ints2, arrays2, make)
    assert list(got["pos_start"]) == [0, 1, 100, 101, 102] and list(got["nbytes"]) == [3, 2, 1, 1, 1]
    assert list(got["row"]) == [1, 1, 2, 2, 2]


def test_piecewise_expansion_gives_the_same_records(monkeypatch):
    import pqc_kv_cache.audit.fields as fields

    d, ints, arrays = prepare(_values(pos_start=np.array([0, 100], np.uint32), pos_count=np.array([4, 3], np.uint32),
                                      nbytes=np.array([9, 3], np.uint32), row=np.array([1, 2], np.uint16)))
    whole = _expanded(*expand_per_position(d, ints, arrays))
    monkeypatch.setattr(fields, "EXPAND_AT_ONCE", 2)
    n, ints2, arrays2, make = expand_per_position(d, ints, arrays)
    assert make is not None and arrays2 == []
    pieces = _expanded(n, ints2, arrays2, make)
    for name in VALUE_FIELDS:
        assert list(pieces[name]) == list(whole[name]), name


def test_expansion_passes_single_positions_through_and_refuses_leaving_the_position_range():
    d, ints, arrays = prepare(_values(pos_start=np.arange(4, dtype=np.uint32), pos_count=1))
    assert expand_per_position(d, ints, arrays) == (4, ints, arrays, None)
    d, ints, arrays = prepare(_values(pos_count=0))
    assert expand_per_position(d, ints, arrays)[0] == 0
    d, ints, arrays = prepare(_values(pos_start=0xFFFF_FFFF, pos_count=2))
    with pytest.raises(ValueError, match="32-bit position range"):
        expand_per_position(d, ints, arrays)
