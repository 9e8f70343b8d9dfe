"""The native one-call seal of a static layer step (native/pqc_static.c) against the Python seal over the host
backend: the same arena bytes, slot table, nonce ranges, records, record head and failure record, step by step,
in the usual case and in every fail-closed one (positions outside the cache, no room for the records, a range
used up part-way through a call, a closed session, a retired epoch's key)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqc_kv_cache.audit.records import RECORD_DTYPE, RECORD_SIZE, Op, Status
from pqc_kv_cache.backends import native
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache.static_sealer import StaticSealer
from pqc_kv_cache.cache.static_state import FailReason
from tests.support.cache_models import sessions as make_sessions

pytestmark = pytest.mark.skipif(not native.available(), reason="the native backend does not build here")

BATCH, HEADS, DIM, SEQ, SLOTS = 3, 2, 8, 12, 10
ROWS = np.array([0, 1, 1])           # row -> session slot


class Twin:
    """The state of one sealer: every tensor the operator changes."""

    def __init__(self, sess, backend, audit=True, capacity=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(BATCH, HEADS, SEQ, DIM, generator=g)
        self.v = torch.randn(BATCH, HEADS, SEQ, DIM, generator=g)
        self.arena = torch.zeros(BATCH, SLOTS, 2 * HEADS * DIM * 4 + 16, dtype=torch.uint8)
        self.meta = torch.zeros(BATCH, SLOTS, 3, dtype=torch.int64)
        n = len(sess)
        self.next = torch.zeros(n, dtype=torch.int64)
        self.end = torch.zeros(n, dtype=torch.int64)
        self.epoch = torch.zeros(n, dtype=torch.int64)
        self.records = torch.zeros(capacity if audit else 0, RECORD_SIZE, dtype=torch.uint8)
        self.head = torch.zeros(2, dtype=torch.int64)
        self.failures = torch.zeros(6, dtype=torch.int64)
        self.released = torch.ones(BATCH, dtype=torch.int64)       # the rows an open opens
        idx = np.arange(n, dtype=np.int64)
        self.sealer = StaticSealer(sess, ROWS, backend, idx + 7 if audit else None, idx + 11 if audit else None)

    def seal(self, positions, io=None, ring=False, layer=1):
        pos = torch.tensor(positions, dtype=torch.int64)
        io = pos.clone() if io is None else torch.tensor(io, dtype=torch.int64)
        self.sealer.seal(layer, self.k, self.v, io, pos, self.arena, self.meta, self.next, self.end, self.epoch,
                         self.records, self.head, self.failures, ring)

    def state(self):
        return {n: getattr(self, n).clone() for n in ("arena", "meta", "next", "end", "epoch", "records", "head",
                                                       "failures")}


@pytest.fixture
def pair():
    sess = make_sessions("alice", "bob")
    host = Twin(sess, HostBackend.instance())
    fast = Twin(sess, native.NativeBackend())
    for t in (host, fast):
        t.end[:] = torch.tensor([100, 100])
    return sess, host, fast


def same(host: Twin, fast: Twin):
    a, b = host.state(), fast.state()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between the Python and the native seal"


def records(t: Twin):
    return t.records[:int(t.head[0])].numpy().copy().view(RECORD_DTYPE).reshape(-1)


def test_the_native_seal_is_used_and_writes_what_the_python_seal_writes(pair, monkeypatch):
    _, host, fast = pair
    calls = []
    real = fast.sealer._seal_static
    monkeypatch.setattr(fast.sealer, "_seal_static", lambda *a: (calls.append(1), real(*a)))
    for t in (host, fast):
        t.seal([0, 1, 2, 3, 4])               # a prefill
        for p in range(5, 9):                 # decode steps
            t.seal([p])
    same(host, fast)
    assert len(calls) == 5
    r = records(fast)
    assert (r["op"] == Op.ENCRYPT).sum() == BATCH * 9 and (r["op"] == Op.READ).sum() == BATCH * 5
    assert (r["status"] == Status.OK).all()
    assert np.array_equal(r["record_no"], np.arange(r.size))
    # counters: consecutive per session slot, never repeated
    enc = r[r["op"] == Op.ENCRYPT]
    for slot in (0, 1):
        c = enc["nonce_counter"][enc["tenant_idx"] == 7 + slot]
        assert len(set(c.tolist())) == c.size
    assert fast.next.tolist() == [9, 18]


def test_a_ring_writes_slot_position_modulo_slots(pair):
    _, host, fast = pair
    for t in (host, fast):
        for p in range(0, 14):
            t.seal([p], io=[p % SEQ], ring=True)
    same(host, fast)
    assert sorted((fast.meta[0, :, 2] - 1).tolist()) == list(range(4, 14))


def test_positions_outside_the_cache_are_refused_and_touch_no_slot(pair):
    _, host, fast = pair
    for t in (host, fast):
        t.seal([0, 1, 2])
        t.seal([SLOTS, -1, 3], io=[3, 3, 3])     # past the slots, negative
        t.seal([4], io=[SEQ])                    # an index past the plaintext
    same(host, fast)
    assert int(fast.failures[0]) == 2 * BATCH + BATCH
    assert FailReason(int(fast.failures[4])) == FailReason.OUT_OF_RANGE
    assert (fast.meta[:, :3, 2] == torch.tensor([1, 2, 3])).all()     # earlier slots kept


def test_a_full_record_buffer_refuses_everything_and_leaves_other_slots_alone():
    sess = make_sessions("alice", "bob")
    host = Twin(sess, HostBackend.instance(), capacity=2 * (BATCH + BATCH))
    fast = Twin(sess, native.NativeBackend(), capacity=2 * (BATCH + BATCH))
    for t in (host, fast):
        t.end[:] = 100
        t.seal([0])
        t.seal([1])
        # no room now: nothing sealed, nothing recorded; the out-of-range position SLOTS (slot 0 modulo
        # the slots) must not empty slot 0, which holds position 0
        t.seal([SLOTS, 2], io=[2, 2])
    same(host, fast)
    assert int(fast.head[0]) == 12 and FailReason(int(fast.failures[4])) == FailReason.RECORDS_FULL
    assert (fast.meta[:, 0, 2] == 1).all() and (fast.meta[:, 1, 2] == 2).all()
    assert (fast.meta[:, 2] == 0).all() and (fast.arena[:, 2] == 0).all()


def test_a_range_used_up_part_way_seals_what_it_can_and_refuses_the_rest(pair):
    _, host, fast = pair
    for t in (host, fast):
        t.end[:] = torch.tensor([2, 3])      # slot 1 has two rows: 3 counters for 4 chunks of a 2-position call
        t.seal([0, 1])
        t.seal([2])                          # nothing left
    same(host, fast)
    r = records(fast)
    enc = r[r["op"] == Op.ENCRYPT]
    assert (enc["status"] == Status.REFUSED).sum() == 1 + BATCH
    assert fast.next.tolist() == [2, 3] and fast.end.tolist() == [2, 3]
    refused = enc[enc["status"] == Status.REFUSED]
    assert (refused["nonce_counter"] == 0).all()
    assert FailReason(int(fast.failures[4])) == FailReason.NONCES_EXHAUSTED


def test_a_closed_session_and_a_retired_key_refuse_their_rows_only(pair):
    sess, host, fast = pair
    for t in (host, fast):
        t.seal([0])
        t.epoch[0] = 5                       # an epoch session 0 never had: its key is unavailable
        t.seal([1])
    same(host, fast)
    assert FailReason(int(fast.failures[4])) == FailReason.KEY_UNAVAILABLE and int(fast.failures[5]) == 0
    assert (fast.meta[1:, 1, 2] == 2).all() and int(fast.meta[0, 1, 2]) == 0
    sess[1].close()
    for t in (host, fast):
        t.failures.zero_()
        t.epoch[0] = 0
        t.seal([2])
    same(host, fast)
    assert FailReason(int(fast.failures[4])) == FailReason.SESSION_INVALID and int(fast.failures[0]) == 2
    assert int(fast.meta[0, 2, 2]) == 3 and (fast.meta[1:, 2, 2] == 0).all()


def test_without_audit_nothing_is_recorded():
    sess = make_sessions("alice", "bob")
    host, fast = Twin(sess, HostBackend.instance(), audit=False), Twin(sess, native.NativeBackend(), audit=False)
    for t in (host, fast):
        t.end[:] = 50
        t.seal([0, 1])
        t.seal([2])
    same(host, fast)
    assert fast.head.tolist() == [0, 0]


def test_tensors_that_do_not_fit_are_refused_before_anything_moves(pair):
    _, _, fast = pair
    before = fast.state()
    fast.meta = fast.meta[:, :SLOTS - 1].clone()
    with pytest.raises(ValueError, match="meta"):
        fast.seal([0])
    fast.meta = before["meta"].clone()
    fast.records = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="records"):
        fast.seal([0])
    fast.records = before["records"].clone()
    fast.head[0] = 10_000                   # a head past the buffer
    with pytest.raises(ValueError, match="record head"):
        fast.seal([0])
    fast.head[0] = 0
    after = fast.state()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_a_call_the_backend_refuses_leaves_its_slots_empty_and_nothing_recorded(pair):
    from pqc_kv_cache.backends.base import ChunkLayout, KeySlot

    _, _, fast = pair
    fast.seal([0, 1])
    state = fast.state()
    # a key slot whose epoch does not fit the nonce: pqc_native_seal refuses the whole call before any byte
    # moves; the slots the call was to write are left empty and zeroed, nothing is recorded or counted failed
    bad = KeySlot(bytes(32), bytes(16), bytes(16), 1 << 40)
    rows = np.zeros(BATCH, dtype=np.int64)
    with pytest.raises(ValueError, match="epoch"):
        native.NativeBackend().seal_static(
            [bad], ChunkLayout(1, HEADS, DIM, torch.float32), fast.k, fast.v, torch.tensor([1]), torch.tensor([1]),
            fast.arena, fast.meta, fast.next, fast.end, fast.epoch, fast.records, fast.head, fast.failures, False,
            np.ascontiguousarray(ROWS, dtype=np.int64), rows, rows.copy(), None)
    assert (fast.meta[:, 1] == 0).all() and (fast.arena[:, 1] == 0).all()
    assert torch.equal(fast.head, state["head"]) and torch.equal(fast.failures, state["failures"])
    assert torch.equal(fast.meta[:, 0], state["meta"][:, 0]) and torch.equal(fast.arena[:, 0], state["arena"][:, 0])
    assert (fast.next > state["next"]).all()        # the counters taken stay taken: never handed out twice


def test_a_generate_seals_each_layer_step_with_one_native_call_and_no_chunk_calls(monkeypatch):
    from transformers import StaticCache

    from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
    from tests.support.cache_models import generate, prompts, tiny_model

    backend = native.NativeBackend()
    calls = {"seal_static": 0, "encrypt_chunks": 0}
    for name in calls:
        real = getattr(backend, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(backend, name, counted)
    model, ids = tiny_model("mistral"), prompts(2, 7)     # a sliding-window model: ring slots too
    want = generate(model, ids, StaticCache(model.config, max_cache_len=32), max_new_tokens=9, do_sample=False)
    log = KVAuditLog()
    cache = StaticEncryptedCache(model.config, sessions=make_sessions("alice", "bob"), max_cache_len=32, audit=log,
                                 backend=backend)
    got = generate(model, ids, cache, max_new_tokens=9, do_sample=False)
    cache.check()
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    assert calls == {"seal_static": layers * 9, "encrypt_chunks": 0}     # the prefill and 8 decode steps
    assert len(log.entries(limit=10_000, operation="encrypt")) == layers * 2 * (7 + 8)
    log.close()


def test_a_retired_key_is_not_used_from_the_kept_row_keys(pair):
    sess, host, fast = pair
    for t in (host, fast):
        t.seal([0])                           # the native seal now keeps the rows' keys
    sess[0].rotate_key()
    sess[0].retire_epoch(0)                   # the range still names epoch 0 (no refill yet)
    for t in (host, fast):
        t.sealer.forget_keys(0, 0)            # what the cache does when an epoch is retired
        t.seal([1])
    same(host, fast)
    assert FailReason(int(fast.failures[4])) == FailReason.KEY_UNAVAILABLE and int(fast.failures[5]) == 0
    assert int(fast.meta[0, 1, 2]) == 0 and (fast.arena[0, 1] == 0).all()


def test_an_open_of_some_rows_over_the_native_backend_matches_the_host_backend(pair):
    """The host open over the native backend's decrypt and over the host backend's: the same plaintext and
    state when only some rows are opened (the released-row mask); the other rows are left as they are."""
    _, host, fast = pair
    for t in (host, fast):
        t.seal([0, 1, 2, 3])
    kept = fast.k.clone()
    for t in (host, fast):
        t.k[:2].zero_()
        t.released.copy_(torch.tensor([1, 1, 0]))
        t.arena[2, 1, 3] ^= 1             # row 2's chunk: not opened, not read
        t.sealer.open(1, t.k, t.v, torch.tensor(4), t.arena, t.meta, t.released, t.records, t.head, t.failures,
                      False)
    same(host, fast)
    assert torch.equal(host.k, fast.k) and int(fast.failures[0]) == 0
    assert torch.equal(fast.k[:2, :, :4], kept[:2, :, :4]) and torch.equal(fast.k[2], kept[2])   # row 2 untouched
    r = records(fast)
    assert [int(x) for x in r[r["op"] == Op.DECRYPT]["row"]] == [0, 1]
