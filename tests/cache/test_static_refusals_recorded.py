"""Every refusal of the static cache's save and load is on record: a save refused for a pending seal failure,
for a held position without its chunk or for a write that fails leaves SAVE REFUSED records (one per layer
and row) and no file; a load refused after the file verified (a config that does not describe the saved
layers, a layer that gives a row another session's chunk) leaves LOAD REFUSED records (one per given
session) and the sessions as they were."""

from __future__ import annotations

import pytest
import torch

from pqc_kv_cache import KVAuditLog, StaticEncryptedCache
from pqc_kv_cache.audit import Status
from pqc_kv_cache.errors import SaveFileError, SealFailedError
from tests.support.cache_models import sessions, tiny_model

HEADS, DIM = 2, 16


def _kv(batch: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, HEADS, n, DIM, generator=g), torch.randn(batch, HEADS, n, DIM, generator=g))


def _records(log: KVAuditLog, op: str):
    log.flush()
    return [(e.tenant_id, e.layer_idx, e.row, e.status) for e in log.entries(limit=None) if e.operation == op]


def _filled(two, log=None):
    cache = StaticEncryptedCache(tiny_model("llama").config, sessions=two, max_cache_len=8, audit=log)
    for layer in range(2):
        cache.update(*_kv(2, 3, layer), layer)
    return cache


def test_a_save_refused_for_a_failed_seal_is_recorded(tmp_path):
    log = KVAuditLog()
    cache = StaticEncryptedCache(tiny_model("llama").config, sessions=sessions("alice"), max_cache_len=16,
                                 nonce_reserve=3, audit=log)
    cache.update(*_kv(1, 4, 0), 0)         # 3 sealed, position 3 refused
    with pytest.raises(SealFailedError):
        cache.save(tmp_path / "c.pkvf")
    assert _records(log, "save") == [("alice", 0, 0, Status.REFUSED)]
    with pytest.raises(SaveFileError, match="holds no sealed chunk of position 3"):
        cache.save(tmp_path / "c.pkvf")
    assert _records(log, "save") == [("alice", 0, 0, Status.REFUSED)] * 2
    assert not (tmp_path / "c.pkvf").exists()
    log.close()


def test_a_save_whose_write_fails_is_recorded_and_a_later_save_succeeds(tmp_path):
    log = KVAuditLog()
    cache = _filled(sessions("alice", "bob"), log)
    with pytest.raises(SaveFileError, match="does not exist"):
        cache.save(tmp_path / "missing" / "c.pkvf")
    refused = {("alice", 0, 0, Status.REFUSED), ("alice", 1, 0, Status.REFUSED),
               ("bob", 0, 1, Status.REFUSED), ("bob", 1, 1, Status.REFUSED)}
    assert set(_records(log, "save")) == refused and len(_records(log, "save")) == 4
    cache.save(tmp_path / "c.pkvf")        # the refused save changed nothing
    assert {r[3] for r in _records(log, "save")} == {Status.REFUSED, Status.OK}
    log.close()


def test_a_load_refused_for_a_config_that_does_not_fit_is_recorded(tmp_path):
    two = sessions("alice", "bob")
    _filled(two).save(tmp_path / "c.pkvf")
    log = KVAuditLog()
    before = [s.lineage for s in two]
    with pytest.raises(ValueError, match="sliding"):
        StaticEncryptedCache.load(tmp_path / "c.pkvf", tiny_model("mistral").config, two, audit=log)
    assert sorted(_records(log, "load")) == [("alice", -1, None, Status.REFUSED), ("bob", -1, None, Status.REFUSED)]
    assert [s.lineage for s in two] == before
    loaded = StaticEncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two, audit=log)
    assert {r[3] for r in _records(log, "load")} == {Status.REFUSED, Status.OK}
    loaded.close()
    log.close()


def test_a_load_refused_for_a_chunk_of_another_session_is_recorded(tmp_path, monkeypatch):
    two = sessions("alice", "bob")
    cache = _filled(two)
    layer = cache.layers[1]
    honest = layer.saved

    def swapped():       # a file, tagged by its sessions, in which layer 1 gives each row the other's chunks
        desc, data = honest()
        desc["chunks"]["slot"] = [1 - s for s in desc["chunks"]["slot"]]
        return desc, data

    monkeypatch.setattr(layer, "saved", swapped)
    cache.save(tmp_path / "c.pkvf")
    log = KVAuditLog()
    before = [s.lineage for s in two]
    with pytest.raises(SaveFileError, match="gives a row a chunk of another session"):
        StaticEncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two, audit=log)
    assert sorted(_records(log, "load")) == [("alice", -1, None, Status.REFUSED), ("bob", -1, None, Status.REFUSED)]
    assert [s.lineage for s in two] == before
    log.close()
