"""EncryptedCache fails closed: tampering, moved chunks, cross-tenant reorders, closed sessions; no plaintext at rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.base import DecryptStatus
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.encryptor import CacheDecryptor
from pqc_kv_cache.errors import DecryptionError, KVCacheError, SessionClosedError, TenantIsolationError
from support.cache_models import sessions, tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 64 / 4


@pytest.fixture
def two():
    return sessions("alice", "bob")


def kv(batch, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g).to(dtype), torch.randn(batch, H, n, D, generator=g).to(dtype)


def filled(two, audit=None, prefill=6, steps=3, kind="llama", merge=False, mode="sealed"):
    """A cache with a prefill and ``steps`` one-position updates in both layers; returns (cache, all K, all V).

    Without merging, segment i >= 1 is position prefill + i - 1 (the layout the tamper tests rely on)."""
    cache = EncryptedCache(tiny_model(kind).config, sessions=two, audit=audit, merge_segments=merge, mode=mode)
    ks, vs = [], []
    for i, n in enumerate([prefill] + [1] * steps):
        k, v = kv(2, n, seed=i)
        for layer in range(2):
            cache.update(k, v, layer)
        ks.append(k)
        vs.append(v)
    return cache, torch.cat(ks, 2), torch.cat(vs, 2)


def read(cache, layer=0):
    k, v = kv(2, 1, seed=99)
    return cache.update(k, v, layer)


def test_update_returns_the_written_states(two):
    cache, k, v = filled(two)
    k_out, v_out = cache.layers[1].update(*kv(2, 1, seed=50))
    k50, v50 = kv(2, 1, seed=50)
    assert torch.equal(k_out, torch.cat([k, k50], 2)) and torch.equal(v_out, torch.cat([v, v50], 2))


def test_flipped_ciphertext_byte_raises_and_records_failure(two):
    audit = KVAuditLog()
    cache, _, _ = filled(two, audit)
    layer = cache.layers[1]
    off = int(layer.table.offset[2, 1])          # bob's chunk at position 7
    layer.ciphertext[off + 3] ^= 0x40
    with pytest.raises(DecryptionError) as exc:
        read(cache, 1)
    err = exc.value
    assert err.tenant_id == "bob" and err.layer_idx == 1 and err.positions == range(7, 8)
    assert "bob" in str(err) and "layer 1" in str(err)
    assert not cache._scratch.any(), "no plaintext may be left in the scratch after a failed read"
    failed = audit.entries(limit=None, operation="decrypt", success=False)
    assert {e.tenant_id for e in failed} == {"bob"}
    assert any(e.layer_idx == 1 and e.position == 7 and e.position_count == 1 for e in failed)
    audit.close()


def _swap(arena_a, off_a, arena_b, off_b, n):
    tmp = arena_a[off_a:off_a + n].clone()
    arena_a[off_a:off_a + n] = arena_b[off_b:off_b + n]
    arena_b[off_b:off_b + n] = tmp


@pytest.mark.parametrize("what", ["positions", "layers", "tenants"])
def test_swapped_chunks_fail_authentication(two, what):
    audit = KVAuditLog()
    cache, _, _ = filled(two, audit)
    l0, l1 = cache.layers
    size = 2 * H * D * 4 + 16          # one-position chunk
    off = l0.table.offset
    if what == "positions":            # alice's positions 6 and 7 of layer 0
        _swap(l0.ciphertext, int(off[1, 0]), l0.ciphertext, int(off[2, 0]), size)
    elif what == "layers":             # alice's position 6: layer 0 <-> layer 1
        _swap(l0.ciphertext, int(off[1, 0]), l1.ciphertext, int(l1.table.offset[1, 0]), size)
    else:                              # position 6: alice's row <-> bob's row
        _swap(l0.ciphertext, int(off[1, 0]), l0.ciphertext, int(off[1, 1]), size)
    with pytest.raises(DecryptionError):
        read(cache, 0)
    assert audit.entries(limit=None, operation="decrypt", success=False)
    audit.close()


def test_metadata_pointing_at_another_tenants_chunk_fails(two):
    cache, _, _ = filled(two)
    layer = cache.layers[0]
    layer.table.offset[1, 1] = layer.table.offset[1, 0]   # bob's row reads alice's chunk
    with pytest.raises(DecryptionError) as exc:
        read(cache, 0)
    assert exc.value.tenant_id == "bob"


def test_no_plaintext_in_any_layer_attribute_after_update(two):
    cache, k, v = filled(two)
    needles = [k[r, h, p].numpy().tobytes() for r in range(2) for h in range(H) for p in (0, 5, 8)]
    needles += [v[r, h, p].numpy().tobytes() for r in range(2) for h in range(H) for p in (0, 5, 8)]

    def blobs(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            yield obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        elif isinstance(obj, np.ndarray):
            yield obj.tobytes()
        elif isinstance(obj, (bytes, bytearray)):
            yield bytes(obj)
        elif isinstance(obj, dict) and depth < 3:
            for x in obj.values():
                yield from blobs(x, depth + 1)
        elif isinstance(obj, (list, tuple)) and depth < 3:
            for x in obj:
                yield from blobs(x, depth + 1)

    for layer in cache.layers:
        assert layer.keys is None and layer.values is None
        for name, value in vars(layer).items():
            for blob in blobs(value):
                assert not any(n in blob for n in needles), f"plaintext found in layer attribute {name}"


def test_reorder_across_tenants_is_refused_and_recorded(two):
    audit = KVAuditLog()
    cache, _, _ = filled(two, audit)
    before = {f: a.copy() for f, a in cache.layers[0].table.columns.items()}
    with pytest.raises(TenantIsolationError):
        cache.reorder_cache(torch.tensor([1, 1]))
    assert all(np.array_equal(before[f], cache.layers[0].table.columns[f]) for f in before)
    viol = audit.entries(limit=None, operation="isolation-violation")
    assert viol and not viol[0].success
    audit.close()


def test_reorder_within_a_session_needs_no_reencryption():
    (s,) = sessions("solo")
    cache, k, v = filled([s])
    counters = cache.layers[0].table.counter.copy()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert np.array_equal(cache.layers[0].table.counter, counters[:, [1, 1]])
    k_out, _ = read(cache, 0)
    assert torch.equal(k_out[0, :, :9], k[1]) and torch.equal(k_out[1, :, :9], k[1])


def test_export_entries_open_with_the_right_session_only(two):
    alice, bob = two
    cache, k, v = filled(two)
    entries = cache.export_entries(1, 0)
    assert [e.metadata.position for e in entries] == [0, 6, 7, 8]
    dec = CacheDecryptor(alice)
    first = dec.decrypt(entries[0])
    assert first.key_tensor_bytes == k[0, :, :6].contiguous().numpy().tobytes()
    assert first.value_tensor_bytes == v[0, :, :6].contiguous().numpy().tobytes()
    with pytest.raises(TenantIsolationError):
        CacheDecryptor(bob).decrypt(entries[1])
    for e in entries:
        plain = AESGCM(alice.key_for_epoch(e.epoch)).decrypt(e.nonce_bytes, e.ciphertext_bytes, e.aad())
        assert len(plain) == e.plaintext_size
    assert cache.export_entries(1, 1)[0].metadata.tenant_id == "bob"
    with pytest.raises(ValueError):
        cache.export_entries(1, 2)


@pytest.mark.parametrize("call", [
    lambda c: c.export_entries(0, 2), lambda c: c.export_entries(0, -1), lambda c: c.export_entries(9, 0),
    lambda c: c.export_entries(-1, 0), lambda c: c.reorder_cache(torch.tensor([0, 7])),
    lambda c: c.reorder_cache(torch.tensor([0, -5])), lambda c: c.batch_select_indices(torch.tensor([3])),
], ids=["row-high", "row-negative", "layer-high", "layer-negative", "reorder-high", "reorder-negative", "select-high"])
def test_out_of_range_rows_and_layers_are_value_errors(two, call):
    cache, _, _ = filled(two, None)
    with pytest.raises(ValueError, match="range|must be in"):
        call(cache)


def test_closing_a_session_shreds_its_rows_and_is_recorded(two, mode):
    alice, bob = two
    audit = KVAuditLog()
    cache, k, _ = filled(two, audit, mode=mode)
    bob_offsets = cache.layers[0].table.offset[:, 1]
    bob.close()
    layer = cache.layers[0]
    assert not any(layer.ciphertext[int(o):int(o) + 16].any() for o in bob_offsets)
    if mode == "working_set":      # bob's plaintext is zeroed; alice's stays
        for lay in cache.layers:
            assert lay.released and not lay._ws.k[1].any() and torch.equal(lay._ws.k[0, :, :9], k[0])
    with pytest.raises(SessionClosedError):
        read(cache, 0)
    closes = audit.entries(limit=None, operation="close", tenant_id="bob")
    assert {e.layer_idx for e in closes} == {0, 1}
    # the closed row can be dropped; the other tenant carries on
    cache.batch_select_indices(torch.tensor([0]))
    k_out, _ = cache.update(*kv(1, 1, seed=7), 0)
    assert k_out.shape == (1, H, 10, D)      # the refused update above added nothing
    audit.close()


def test_rows_and_sessions_must_agree():
    model = tiny_model("llama")
    cache = EncryptedCache(model.config, sessions=sessions("a", "b", "c"))
    with pytest.raises(ValueError, match="3 sessions"):
        cache.update(*kv(2, 3), 0)


def test_bad_constructor_arguments_raise_clear_errors(two):
    from transformers import LlamaConfig, T5Config
    with pytest.raises(TypeError):
        EncryptedCache(tiny_model("llama").config, sessions=["alice"])
    with pytest.raises(TypeError):
        EncryptedCache(tiny_model("llama").config, sessions=[])
    with pytest.raises(TypeError):
        EncryptedCache({"layers": 2}, sessions=two)
    with pytest.raises(ValueError, match="encoder-decoder"):
        EncryptedCache(T5Config(num_layers=1, d_model=16, d_kv=4, num_heads=2, d_ff=32), sessions=two)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match="linear_attention"):
        EncryptedCache(cfg, sessions=two)


def test_bad_update_inputs_raise_clear_errors(two):
    cache, _, _ = filled(two)
    k, v = kv(2, 1)
    with pytest.raises(ValueError):
        cache.update(k, v[:, :, :, :8], 0)
    with pytest.raises(ValueError):
        cache.update(k[:1], v[:1], 0)
    with pytest.raises(ValueError):
        cache.update(k.double(), v.double(), 0)
    with pytest.raises(TypeError):
        cache.layers[0].crop(1.5)
    with pytest.raises(ValueError):
        cache.crop(2)
    with pytest.raises(ValueError):
        cache.reorder_cache(torch.tensor([0]))


def test_expired_session_is_refused(clock):
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    s = establish_tenant_session(TenantIdentity("late"), ttl_seconds=10, clock=clock)
    cache = EncryptedCache(tiny_model("llama").config, sessions=s)
    cache.update(*kv(1, 2), 0)
    clock.advance(11)
    with pytest.raises(KVCacheError):
        cache.update(*kv(1, 1), 0)


OPS = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 4)),
    st.tuples(st.just("crop"), st.integers(1, 3)),
    st.tuples(st.just("rotate"), st.sampled_from(["alice", "bob"])),
    st.tuples(st.just("reorder"), st.integers(0, 1)),
), min_size=3, max_size=10)

OPS_WITH_RELEASE = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 4)),
    st.tuples(st.just("crop"), st.integers(1, 3)),
    st.tuples(st.just("rotate"), st.sampled_from(["alice", "bob"])),
    st.tuples(st.just("reorder"), st.integers(0, 1)),
    st.tuples(st.just("release"), st.sampled_from(["all", "alice", "bob"])),
    st.tuples(st.just("restore"), st.just(0)),
), min_size=3, max_size=10)


@pytest.mark.parametrize("mode", ["sealed", "working_set"])
@settings(max_examples=25, deadline=None)
@given(ops=OPS_WITH_RELEASE)
def test_key_nonce_pair_never_reused_across_crop_rewrite_and_rotation(mode, ops):
    two = sessions("alice", "bob")
    model_cfg = tiny_model("llama").config
    from pqc_kv_cache.backends.host import HostBackend

    host = HostBackend(threads=1)
    sealed: set[tuple] = set()

    class Recording(HostBackend):
        """Every (key, nonce) the cache actually seals with, including re-seals later replaced."""

        def encrypt_chunks(self, keys, layout, chunks, *args, **kwargs):
            for slot, counter in zip(np.asarray(chunks.slot).tolist(), np.asarray(chunks.counter).tolist()):
                pair = (keys[slot].key, keys[slot].epoch, counter)
                assert pair not in sealed, f"(key, nonce) reused: epoch {pair[1]}, counter {counter}"
                sealed.add(pair)
            return host.encrypt_chunks(keys, layout, chunks, *args, **kwargs)

    cache = EncryptedCache(model_cfg, sessions=[two[0], two[0], two[1], two[1]],    # rows 0,1 alice; 2,3 bob
                           merge_min_segments=2, backend=Recording(threads=1), mode=mode)
    seen: dict[tuple, tuple] = {}
    step = 0

    def record():
        for li in range(2):
            for row in range(4):
                for e in cache.export_entries(li, row):
                    key = (e.metadata.session_id, e.epoch, e.sequence_number)
                    val = (e.aad(), e.ciphertext)
                    assert seen.setdefault(key, val) == val, f"(key, nonce) reused: {key}"

    cache.update(*kv(4, 5), 0)
    cache.update(*kv(4, 5), 1)
    record()
    for op, arg in ops:
        step += 1
        if op == "update":
            k, v = kv(4, arg, seed=step)
            cache.update(k, v, 0)
            cache.update(k, v, 1)
        elif op == "crop":
            cache.crop(-arg)
        elif op == "rotate":
            cache.rotate(arg)
        elif op == "release":
            cache.release(None if arg == "all" else two[arg == "bob"])
        elif op == "restore":
            cache.restore()
        else:
            cache.reorder_cache(torch.tensor([arg, arg, 2 + arg, 2 + arg]))
        record()
    assert len(sealed) >= 8


def _apply(cache, op, arg, step, batch):
    if op == "update":
        k, v = kv(batch, arg, seed=step)
        return [cache.update(k, v, i) for i in range(2)]
    if op == "crop":
        cache.crop(-arg)
    elif op == "crop0":
        cache.crop(0)
    elif op == "reorder":
        cache.reorder_cache(torch.tensor(arg))
    elif op == "release" and isinstance(cache, EncryptedCache):
        cache.release()
    return None


LAYER_OPS = st.lists(st.one_of(
    st.tuples(st.just("update"), st.integers(1, 5)),
    st.tuples(st.just("crop"), st.integers(1, 4)),
    st.tuples(st.just("crop0"), st.just(0)),
    st.tuples(st.just("reorder"), st.lists(st.integers(0, 2), min_size=3, max_size=3)),
    st.tuples(st.just("release"), st.just(0)),
), min_size=2, max_size=12)


@pytest.mark.parametrize("mode", ["sealed", "working_set"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
@settings(max_examples=30, deadline=None)
@given(ops=LAYER_OPS, record_past=st.booleans())
def test_layer_states_match_dynamic_cache_under_any_op_sequence(kind, mode, ops, record_past):
    from transformers import DynamicCache
    (s,) = sessions("solo")
    cfg = tiny_model(kind).config
    ref, enc = DynamicCache(config=cfg), EncryptedCache(cfg, sessions=s, merge_min_segments=2, mode=mode)
    if record_past:
        ref.activate_past_recording()
        enc.activate_past_recording()
    for step, (op, arg) in enumerate([("update", 6)] + ops):
        if op.startswith("crop") and kind == "mistral" and ref.layers[0].is_initialized:
            layer = ref.layers[0]
            if layer.cumulative_length < 8 and layer.keys.shape[-2] != layer.cumulative_length:
                # DynamicSlidingWindowLayer then resets cumulative_length to the stored count, losing the
                # absolute position; EncryptedLayer keeps absolute positions (they are bound into the AAD)
                break
        try:
            want = _apply(ref, op, arg, step, 3)
        except (RuntimeError, ValueError):
            with pytest.raises(ValueError):
                _apply(enc, op, arg, step, 3)
            continue
        got = _apply(enc, op, arg, step, 3)
        if want is not None:
            for (wk, wv), (gk, gv) in zip(want, got):
                assert torch.equal(wk, gk) and torch.equal(wv, gv)
        for i in range(2):
            assert ref.get_seq_length(i) == enc.get_seq_length(i)
            assert ref.get_mask_sizes(3, i) == enc.get_mask_sizes(3, i)


def test_sliding_crop_past_window_without_recording_is_refused(two):
    cache = EncryptedCache(tiny_model("mistral").config, sessions=two)
    cache.update(*kv(2, 10), 0)
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.layers[0].crop(-1)


def test_batch_repeat_interleave_and_select_follow_dynamic_cache(two, mode):
    from transformers import DynamicCache
    cfg = tiny_model("llama").config
    ref, enc = DynamicCache(config=cfg), EncryptedCache(cfg, sessions=two, mode=mode)
    for c in (ref, enc):
        c.update(*kv(2, 4), 0)
        c.batch_repeat_interleave(2)
    assert [s.tenant_id for s in enc.layers[0].row_sessions] == ["alice", "alice", "bob", "bob"]
    for c in (ref, enc):
        c.batch_select_indices(torch.tensor([0, 3]))
    want = ref.update(*kv(2, 1, seed=3), 0)
    got = enc.update(*kv(2, 1, seed=3), 0)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert [s.tenant_id for s in enc.layers[0].row_sessions] == ["alice", "bob"]


def test_reset_forgets_everything_and_starts_again(two):
    cache, _, _ = filled(two)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized
    k, v = kv(2, 3, seed=5)
    k_out, v_out = cache.update(k, v, 0)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


def test_offload_and_prefetch_keep_the_layer_readable(two, mode):
    cache, k, _ = filled(two, mode=mode)
    layer = cache.layers[0]
    layer.offload()
    layer.prefetch()
    k_out, _ = read(cache, 0)
    assert torch.equal(k_out[:, :, :9], k)


def test_arena_reclaims_dead_bytes(two):
    cache = EncryptedCache(tiny_model("llama").config, sessions=two)
    layer = cache.layers[0]
    for i in range(60):
        cache.update(*kv(2, 4, seed=i), 0)
        cache.layers[0].crop(-4)
    # every update is cropped away again: the arena must not grow with the number of updates
    assert layer.arena.capacity <= 1 << 16
    assert layer.get_seq_length() == 0


@pytest.mark.parametrize("batch", [2, 8])
def test_merging_keeps_chunks_logarithmic_and_states_exact(two, batch):
    audit = KVAuditLog()
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, audit=audit, merge_min_segments=batch)
    ks, vs = [], []
    for i in range(40):
        k, v = kv(2, 5 if i == 0 else 1, seed=i)
        k_out, v_out = cache.update(k, v, 0)
        ks.append(k)
        vs.append(v)
        assert torch.equal(k_out, torch.cat(ks, 2)) and torch.equal(v_out, torch.cat(vs, 2))
    layer = cache.layers[0]
    assert layer.num_segments <= 1 + 6 + cache.merge_min_segments   # prefill, O(log2 39) runs, one batch
    assert list(layer.table.start[1:]) == sorted(layer.table.start[1:])
    # merges re-seal already written positions: recorded as RESEAL, never as ENCRYPT
    assert len(audit.entries(limit=None, operation="encrypt")) == 2 * 44
    assert not audit.entries(limit=None, operation="reorder")
    merges = audit.entries(limit=None, operation="reseal")
    assert merges and all(e.position_count >= 2 and e.nbytes > 0 for e in merges)
    cache.check()                                 # host backend: failures were raised at once, nothing pending
    audit.close()


def test_sliding_layer_merges_stay_within_a_quarter_window(two):
    cache = EncryptedCache(tiny_model("mistral").config, sessions=two)
    ks = []
    for i in range(20):
        k, v = kv(2, 1, seed=i)
        k_out, _ = cache.update(k, v, 0)
        ks.append(k)
        assert torch.equal(k_out, torch.cat(ks, 2)[:, :, -8:])
    assert int(cache.layers[0].table.count.max()) <= 2


class _DeferringBackend:
    """A stand-in device backend: statuses stay 'on the device' (not numpy) until check()."""

    def __init__(self, inner):
        self.inner = inner
        self.failed = []

    def encrypt_chunks(self, *args):
        return self.inner.encrypt_chunks(*args)

    def decrypt_chunks(self, *args, owner=None):
        status = self.inner.decrypt_chunks(*args).host
        self.failed.extend(np.flatnonzero(status).tolist())
        return DecryptStatus(device=torch.from_numpy(status))

    def forget_keys(self):
        pass

    def check(self, owner=None):
        if self.failed:
            self.failed.clear()
            raise DecryptionError("deferred failure", tenant_id="bob", layer_idx=0, positions=range(0, 1))


def test_deferred_backend_failures_surface_at_check_and_wipe_the_scratch(two):
    from pqc_kv_cache.backends.base import CryptoBackend
    from pqc_kv_cache.backends.host import HostBackend
    backend = _DeferringBackend(HostBackend(threads=1))
    CryptoBackend.register(_DeferringBackend)
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, backend=backend, merge_segments=False)
    cache.update(*kv(2, 4), 0)
    cache.check()
    layer = cache.layers[0]
    layer.ciphertext[int(layer.table.offset[0, 1]) + 2] ^= 1
    k_out, _ = read(cache, 0)                 # no host-side status: the step returns (zeroed row)
    assert not k_out[1, :, :4].any()
    with pytest.raises(DecryptionError):
        cache.check()
    assert not cache._scratch.any()
    cache.check()                             # reported once


def test_rotation_and_close_make_a_caching_backend_forget_keys(two):
    from pqc_kv_cache.backends.base import CryptoBackend
    from pqc_kv_cache.backends.host import HostBackend

    class Caching(_DeferringBackend):
        cleared = 0

        def forget_keys(self):
            Caching.cleared += 1

    CryptoBackend.register(Caching)
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, backend=Caching(HostBackend(threads=1)))
    cache.update(*kv(2, 3), 0)
    cache.rotate("alice")
    after_rotate = Caching.cleared
    assert after_rotate >= 1
    two[1].close()
    assert Caching.cleared > after_rotate


def test_closing_a_session_wipes_the_scratch_holding_its_rows(two):
    cache, k, v = filled(two)
    ko, vo = cache.update(*kv(2, 1, seed=99), 1)
    assert ko[0].abs().sum() > 0
    two[0].close()
    assert cache._scratch is not None and not cache._scratch.any()
    assert not ko.any() and not vo.any()          # views already handed out read zeros


def test_retired_epoch_stops_opening_in_the_cache(two):
    cache, _, _ = filled(two)
    two[0].rotate_key()
    two[0].retire_epoch(0)                        # erased by the session: the cache's copy goes too
    with pytest.raises(DecryptionError):
        cache.update(*kv(2, 1, seed=7), 0)


def test_bad_repeats_leave_the_cache_unchanged(two):
    cache, _, _ = filled(two)
    before = cache.row_session_slots
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="repeats"):
            cache.batch_repeat_interleave(bad)
    assert np.array_equal(cache.row_session_slots, before)
    cache.update(*kv(2, 1, seed=5), 0)


def test_a_merge_that_cannot_seal_is_skipped_and_the_update_stands():
    (s,) = sessions("solo")
    cache = EncryptedCache(tiny_model("llama").config, sessions=[s], merge_segments=True, merge_min_segments=2)
    cache.update(*kv(2, 4, seed=0), 0)            # 2 chunks sealed
    s.max_entries_per_epoch = s.epoch_entries + 2  # room for the next write (2 rows), none for a merge
    k, v = kv(2, 1, seed=1)
    k_out, _ = cache.update(k, v, 0)
    assert torch.equal(k_out[:, :, -1:], k)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 5 and layer.num_segments == 2   # the merge did not happen


# ------------------------------------------------------------------ expired and closed rows are refused, and recorded

def _tenants_with_clock(clock, bob_ttl=10):
    from pqc_kv_cache.session import TenantIdentity, establish_tenant_session
    return [establish_tenant_session(TenantIdentity("alice"), ttl_seconds=3600, clock=clock),
            establish_tenant_session(TenantIdentity("bob"), ttl_seconds=bob_ttl, clock=clock)]


def test_an_expired_sessions_rows_are_not_decrypted_from_cached_keys(clock):
    from pqc_kv_cache.errors import SessionExpiredError
    cache = EncryptedCache(tiny_model("llama").config, sessions=_tenants_with_clock(clock))
    cache.update(*kv(2, 4), 0)
    cache.update(*kv(2, 0), 0)                 # the key slots are cached now
    clock.advance(11)
    with pytest.raises(SessionExpiredError, match="bob"):
        cache.update(*kv(2, 0), 0)             # no new positions: only the read could leak
    assert not cache._scratch[:2 * 2 * H * 4 * D * 4].view(torch.float32).view(2, 2, H, 4, D)[1].any()


def _refused(audit, op, tenant="bob"):
    from pqc_kv_cache.audit import Status
    audit.flush()
    return [e for e in audit.entries(limit=None, operation=op, tenant_id=tenant) if e.status == Status.REFUSED]


@pytest.mark.parametrize("how", ["expired", "closed"])
def test_refused_reads_and_writes_of_a_dead_session_are_recorded(clock, how):
    from pqc_kv_cache.errors import SessionExpiredError
    alice, bob = _tenants_with_clock(clock)
    audit = KVAuditLog()
    cache = EncryptedCache(tiny_model("llama").config, sessions=[alice, bob], audit=audit, merge_segments=False)
    cache.update(*kv(2, 4), 0)
    cache.update(*kv(2, 2), 0)
    if how == "expired":
        clock.advance(11)
    else:
        bob.close()
    with pytest.raises(SessionExpiredError):
        cache.update(*kv(2, 0), 0)             # read refused
    with pytest.raises(SessionExpiredError):
        cache.update(*kv(2, 1), 0)             # write refused
    with pytest.raises(SessionExpiredError):
        cache.crop(-1)                         # cutting 4..5 needs bob's key
    reads, writes, crops = (_refused(audit, op) for op in ("decrypt", "encrypt", "crop"))
    assert [(e.layer_idx, e.row, e.position, e.position_count) for e in reads] == [(0, 1, 0, 6)]
    assert [(e.layer_idx, e.row, e.position, e.position_count) for e in writes] == [(0, 1, 6, 1)]
    assert [(e.layer_idx, e.row, e.position, e.position_count) for e in crops] == [(0, 1, 5, 1)]
    assert all(not e.success for e in reads + writes + crops)
    assert not _refused(audit, "decrypt", "alice") and not _refused(audit, "encrypt", "alice")
    audit.close()


def test_a_refused_rotation_is_recorded(clock):
    from pqc_kv_cache.errors import SessionExpiredError
    alice, bob = _tenants_with_clock(clock)
    audit = KVAuditLog()
    cache = EncryptedCache(tiny_model("llama").config, sessions=[alice, bob], audit=audit)
    cache.update(*kv(2, 3), 0)
    clock.advance(11)
    with pytest.raises(SessionExpiredError):
        cache.rotate("bob")
    assert [(e.layer_idx, e.row, e.position, e.position_count) for e in _refused(audit, "rotate")] == [(0, 1, 0, 3)]
    audit.close()


def test_rotation_decrypt_records_name_the_batch_row(two):
    audit = KVAuditLog()
    cache = EncryptedCache(tiny_model("llama").config, sessions=[two[0], two[1], two[1]], audit=audit)
    cache.update(*kv(3, 4), 0)
    audit.flush()
    seen = len(audit.entries(limit=None, operation="decrypt"))
    cache.rotate("bob")
    audit.flush()
    rotation_reads = audit.entries(limit=None, operation="decrypt")[:-seen or None]
    assert rotation_reads and {e.tenant_id for e in rotation_reads} == {"bob"}
    assert sorted(e.row for e in rotation_reads) == [1, 2]
    audit.close()


# ------------------------------------------------------------------ no plaintext left behind in freed memory

def test_a_dropped_cache_zeroes_its_scratch_without_waiting_for_a_collection(two):
    import weakref
    cache, _, _ = filled(two)
    scratch = cache._scratch
    assert scratch.any()
    gone = weakref.ref(cache)
    del cache
    assert gone() is None, "a reference cycle keeps the cache (and its plaintext) alive"
    assert not scratch.any()


def test_closing_a_cache_zeroes_its_plaintext_and_ciphertext(two):
    cache, _, _ = filled(two)
    scratch, arenas = cache._scratch, [layer.arena.buffer for layer in cache.layers]
    cache.close()
    assert not scratch.any() and not any(a.any() for a in arenas)
    cache.close()                              # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        cache.update(*kv(2, 1), 0)


# ------------------------------------------------------------------ rows -> sessions are never guessed

def test_fewer_sessions_than_rows_are_refused_instead_of_guessed(two):
    cache = EncryptedCache(tiny_model("llama").config, sessions=two)
    with pytest.raises(ValueError, match="rows_per_session"):
        cache.update(*kv(4, 3), 0)             # four prompts, two sessions: whose rows are 1 and 2?
    assert not cache.layers[0].is_initialized


def test_rows_per_session_maps_expanded_rows_explicitly(two):
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, rows_per_session=3)
    cache.update(*kv(6, 3), 0)
    assert [s.tenant_id for s in cache.layers[0].row_sessions] == ["alice"] * 3 + ["bob"] * 3
    wrong = EncryptedCache(tiny_model("llama").config, sessions=two, rows_per_session=3)
    with pytest.raises(ValueError, match="rows_per_session"):
        wrong.update(*kv(4, 3), 0)
    for bad in (0, -1, True, 2.0):
        with pytest.raises((TypeError, ValueError)):
            EncryptedCache(tiny_model("llama").config, sessions=two, rows_per_session=bad)


def test_one_session_covers_any_batch():
    cache = EncryptedCache(tiny_model("llama").config, sessions=sessions("solo"))
    cache.update(*kv(5, 2), 0)
    assert {s.tenant_id for s in cache.layers[0].row_sessions} == {"solo"}
