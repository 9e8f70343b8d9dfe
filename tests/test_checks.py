"""The package's one integer rule at each argument that follows it: integer scalars (numpy, torch) are taken
as plain ints, bools are refused with TypeError, out-of-range values are ValueError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqc_kv_cache._checks import check_int
from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.audit.fields import check_int as audit_check_int
from pqc_kv_cache.backends import kernel_abi as abi
from pqc_kv_cache.backends.base import KeySlot
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.cache import cache as cache_module
from pqc_kv_cache.cache.sliding import SlidingEncryptedLayer
from support.cache_models import sessions, tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 16


def _filled(audit=None) -> EncryptedCache:
    cache = EncryptedCache(tiny_model("llama").config, sessions=sessions("alice", "bob"), audit=audit)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, H, 3, D, generator=g), torch.randn(2, H, 3, D, generator=g)
    for layer in range(2):
        cache.update(k, v, layer)
    return cache


def test_shared_rule():
    assert check_int("n", np.int64(3), 0, 5) == 3 and type(check_int("n", torch.tensor(3))) is int
    for bad in (True, np.bool_(True), torch.tensor(True), np.array(False)):
        with pytest.raises(TypeError, match="n must be an integer, got a bool"):
            check_int("n", bad)
    with pytest.raises(ValueError, match=r"n must be in \[0, 5\], got 6"):
        check_int("n", 6, 0, 5)


def test_audit_check_int_takes_what_the_shared_rule_takes():
    assert audit_check_int("n", torch.tensor(5)) == 5          # a 0-d integer tensor has __index__
    with pytest.raises(TypeError, match="n must be an int"):
        audit_check_int("n", torch.tensor(True))


def test_audit_query_limit_takes_a_numpy_integer():
    audit = KVAuditLog()
    _filled(audit)
    assert len(audit.entries(limit=np.int64(1))) == 1
    with pytest.raises(TypeError, match="limit"):
        audit.entries(limit=True)


@pytest.mark.parametrize("name, good", [("max_merged_positions", np.int64(64)), ("merge_min_segments", np.int32(4)),
                                        ("rows_per_session", np.int64(1))])
def test_cache_arguments_take_integer_scalars_and_refuse_bools_and_strings(name, good):
    cache = EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"), **{name: good})
    assert cache is not None
    for bad in (True, "4"):
        with pytest.raises(TypeError, match=name):
            EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"), **{name: bad})
    with pytest.raises(ValueError, match=name):
        EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"), **{name: 0})


def test_a_numpy_sliding_window_in_the_config_is_taken_as_an_int(monkeypatch):
    monkeypatch.setattr(cache_module, "get_layer_types_and_kwargs",
                        lambda cfg: (["full_attention", "sliding_attention"], [{}, {"sliding_window": np.int64(4)}]))
    cache = EncryptedCache(tiny_model("llama").config, sessions=sessions("alice"))
    assert cache.layers[1].sliding_window == 4 and type(cache.layers[1].sliding_window) is int


def test_a_sliding_layer_refuses_a_bool_window_as_a_type_error():
    with pytest.raises(TypeError, match="sliding_window"):
        SlidingEncryptedLayer(None, 0, True)      # checked before the context is touched


def test_export_entries_refuses_a_bool_layer_or_row_and_takes_numpy_integers():
    cache = _filled()
    assert [e.ciphertext for e in cache.export_entries(np.int64(1), np.int64(1))] == \
        [e.ciphertext for e in cache.export_entries(1, 1)]
    with pytest.raises(TypeError, match="layer_idx"):
        cache.export_entries(True, 0)             # was taken as layer 1
    with pytest.raises(TypeError, match="row"):
        cache.export_entries(0, True)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.export_entries(2, 0)


def test_an_entry_field_set_to_a_numpy_integer_validates_as_an_int():
    entry = _filled().export_entries(0, 0)[0]
    entry.epoch = np.uint32(entry.epoch)
    assert entry.validate().epoch == 0 and type(entry.epoch) is int


def test_kernel_abi_key_slot_epoch_and_rounds_per_item():
    slot = KeySlot(bytes(32), bytes(16), bytes(16), np.uint32(7))
    meta = abi.slot_meta_array([slot]).view(abi.SLOT_META_DTYPE).reshape(-1)
    assert int(meta["epoch"][0]) == 7
    with pytest.raises(TypeError, match="epoch"):
        abi.slot_meta_array([KeySlot(bytes(32), bytes(16), bytes(16), True)])
    rounds, pcount = np.array([8], dtype=np.int64), np.array([4], dtype=np.int64)
    assert np.array_equal(abi.work_items(rounds, pcount, rounds_per_item=np.int64(2)),
                          abi.work_items(rounds, pcount, rounds_per_item=2))
    with pytest.raises(TypeError, match="rounds_per_item"):
        abi.work_items(rounds, pcount, rounds_per_item=True)


def test_kernel_shim_integer_arguments():
    kh = pytest.importorskip("pqc_kv_cache.backends.kernel_shim")
    if not kh.available():  # pragma: no cover - machines without a C++ compiler
        pytest.skip("no C++ compiler for the kernel host shim")
    key, nonce = bytes(range(32)), bytes(12)
    sealed = kh.gcm_encrypt(key, nonce, b"a", b"text", lanes=8)
    assert kh.gcm_encrypt(key, nonce, b"a", b"text", lanes=np.int64(8)) == sealed
    assert kh.gcm_decrypt(key, nonce, b"a", sealed, tag_len=np.int64(16), lanes=np.int32(8)) == b"text"
    with pytest.raises(TypeError, match="lanes"):
        kh.gcm_encrypt(key, nonce, b"a", b"text", lanes=True)
    with pytest.raises(TypeError, match="tag_len"):
        kh.gcm_decrypt(key, nonce, b"a", sealed, tag_len=True)
    f = dict(epoch=3, layer=1, pos_start=5, pos_count=2, key_len=64, num_heads=2, head_dim=16)
    ref = kh.build_aad_v1(tenant_tag=bytes(16), session_tag=bytes(16), **f)
    assert kh.build_aad_v1(tenant_tag=bytes(16), session_tag=bytes(16),
                           **{k: np.uint32(v) for k, v in f.items()}) == ref
    with pytest.raises(TypeError, match="epoch"):
        kh.build_aad_v1(tenant_tag=bytes(16), session_tag=bytes(16), **{**f, "epoch": True})
    assert kh.item_multiplier(key, np.uint32(3), lanes=8) == kh.item_multiplier(key, 3, lanes=8)
    with pytest.raises(TypeError, match="e must be"):
        kh.item_multiplier(key, True, lanes=8)
