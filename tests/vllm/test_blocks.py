"""The connector's worker side without vLLM: vLLM's block tensors sealed and opened through the backend
contract on every backend here — host, native, and the CPU twin of the CUDA backend (CudaBackend's own host
code, records through the log's CUDA ring, deferred statuses) — in each of vLLM's block layouts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from support.devices import has_cuda
from support.twin import CpuTwinBackend, TwinLog

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends import kernel_shim
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.envelope import build_aad, make_nonce
from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import KeyClient, KeyService
from pqc_kv_cache.vllm.blocks import KVBlockStore, LoadRequest, SavePart, kv_block_views
from pqc_kv_cache.vllm.storefiles import block_file, bound_session_tag, chain_hashes, read_block
from pqc_kv_cache.vllm.tenancy import ServerSecret

BS, HEADS, HD, NB = 4, 2, 16, 12
LAYERS = (0, 1)
SECRET = ServerSecret(bytes(range(32)))
CH = chain_hashes(list(range(8 * BS)), BS)        # block i of the prompt range(k * BS) has chain hash CH[i]


def _paths(tmp_path, session_id, indices, tenant="tenant-a"):
    """The files of blocks ``indices`` of the prompt range(8 * BS)."""
    return [block_file(str(tmp_path / "store"), SECRET, tenant, session_id, CH[i]) for i in indices]


def _part(req_id, tmp_path, sa, block_ids, indices, tenant="tenant-a", session_id=None):
    session_id = session_id or sa.session_id
    return SavePart(req_id, tenant, session_id, list(block_ids), list(indices), [CH[i] for i in indices],
                    _paths(tmp_path, session_id, indices, tenant))


def _load(req_id, tmp_path, sa, block_ids, indices, chains=None):
    return LoadRequest(req_id, "tenant-a", sa.session_id, list(block_ids), list(indices),
                       [CH[i] for i in indices] if chains is None else chains, _paths(tmp_path, sa.session_id, indices))


def _chunk_len(dtype=torch.float32):
    return BS * 2 * HEADS * HD * torch.empty((), dtype=dtype).element_size() + 16


@pytest.fixture(params=["host", "native", "twin"])
def backend(request):
    if request.param == "host":
        return HostBackend(threads=1)
    if request.param == "native":
        from pqc_kv_cache.backends.native import NativeBackend
        from pqc_kv_cache.errors import BackendUnavailableError
        try:
            return NativeBackend.instance()
        except BackendUnavailableError as e:
            pytest.skip(f"native host backend unavailable: {e}")
    if not kernel_shim.available():
        pytest.skip("no C++ compiler for the host shim")
    return CpuTwinBackend()


@pytest.fixture()
def keys(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    with KeyService(manager, str(tmp_path / "keys")) as service:
        yield manager, sa, KeyClient(service.path)


def _log(backend, path):
    # the twin's records go through the log's CUDA ring (a HostRing); the host backends emit directly
    return TwinLog(str(path)) if isinstance(backend, CpuTwinBackend) else KVAuditLog(str(path))


def _cache(layout: str, dtype=torch.float32, nb: int = NB, seed: int = 0) -> torch.Tensor:
    """A random layer block tensor in ``layout``; kv_last is allocated position-major ([nb, bs, heads, 2d],
    then permuted), as a FlashAttention NHD cache is, so its views are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "cpu":
        return torch.randn(nb, HEADS, BS, 2 * HD, generator=g).to(dtype)
    if layout == "kv_last":
        return torch.randn(nb, BS, HEADS, 2 * HD, generator=g).to(dtype).permute(0, 2, 1, 3)
    return torch.randn(2, nb, BS, HEADS, HD, generator=g).to(dtype)


def _store(backend, log, client, layout):
    return KVBlockStore(backend, log, client, BS, layout)


def _save(store, caches, tmp_path, sa, steps, req_id="r1"):
    """Save ``steps`` (a list of steps, each a list of (block indices, block ids)); the paths written."""
    written = []
    for step in steps:
        sp = [_part(req_id, tmp_path, sa, ids, indices) for indices, ids in step]
        for layer in LAYERS:
            store.save_layer(layer, caches[layer], sp)
        written += store.finish_saves(sp, LAYERS)
    return written


LAYOUT_IDS = ["cpu", "kv_last", "kv_first"]


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_blocks_saved_then_loaded_into_other_blocks_give_the_same_kv(backend, keys, tmp_path, layout):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, layout)
        src = {layer: _cache(layout, seed=layer) for layer in LAYERS}
        written = _save(store, src, tmp_path, sa, [[([0, 1, 2], [7, 2, 9])]])
        assert written == _paths(tmp_path, sa.session_id, [0, 1, 2])
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [1, 5, 11], [0, 1, 2])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        for layer in LAYERS:
            ks, vs = kv_block_views(src[layer], layout)
            kd, vd = kv_block_views(dst[layer], layout)
            for a, b in ((7, 1), (2, 5), (9, 11)):
                assert torch.equal(kd[b], ks[a]) and torch.equal(vd[b], vs[a])
            others = [b for b in range(NB) if b not in (1, 5, 11)]
            assert not kd[others].any() and not vd[others].any()
        assert log.flush(timeout=10)
        recs = list(log.entries(limit=None))
        enc = [r for r in recs if r.operation == "encrypt"]
        dec = [r for r in recs if r.operation == "decrypt"]
        # ENCRYPT: one per layer and position; DECRYPT: one per layer and block (the row is the block id)
        assert len(enc) == len(LAYERS) * 3 * BS and all(r.success and r.position_count == 1 for r in enc)
        assert sorted((r.layer_idx, r.row, r.position, r.position_count) for r in dec) == \
            sorted((layer, b, i * BS, BS) for layer in LAYERS for i, b in enumerate((1, 5, 11)))
        assert all(r.success and r.tenant_id == "tenant-a" and r.session_id == sa.session_id for r in dec)
        # each request's save and load has a record of its own naming vLLM's request id
        [save] = [r for r in recs if r.operation == "save"]
        [load] = [r for r in recs if r.operation == "load"]
        assert "request r1" in save.details and "blocks 0-2" in save.details
        assert (save.position, save.position_count) == (0, 3 * BS)
        assert "request r2" in load.details and (load.position, load.position_count) == (0, 3 * BS)
        assert save.session_id == load.session_id == sa.session_id
    finally:
        log.close(timeout=10)


def test_stored_chunks_open_with_plain_aesgcm_and_hold_no_plaintext(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "kv_last")
        src = {layer: _cache("kv_last", torch.bfloat16, seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0, 1], [3, 4])]])
        cl = _chunk_len(torch.bfloat16)
        for i, (path, b) in enumerate(zip(_paths(tmp_path, sa.session_id, [0, 1]), (3, 4))):
            header, body, _ = read_block(path, cl)
            assert header["dtype"] == "bfloat16" and header["index"] == i
            assert [e["layer"] for e in header["layers"]] == list(LAYERS)
            assert oct(os.stat(path).st_mode & 0o777) == "0o600"
            for j, e in enumerate(header["layers"]):
                layer = e["layer"]
                k, v = kv_block_views(src[layer], "kv_last")
                k_len = HEADS * BS * HD * 2
                aad = build_aad(tenant_id="tenant-a", session_id=sa.session_id, epoch=e["epoch"],
                                layer_idx=layer, position=i * BS, position_count=BS, key_len=k_len,
                                dtype="bfloat16", num_heads=HEADS, head_dim=HD)
                # the session tag field holds the session tag bound to the block's token prefix
                aad = aad[:24] + bound_session_tag(sa.session_id, CH[i]) + aad[40:]
                plain = AESGCM(sa.key_for_epoch(e["epoch"])).decrypt(
                    make_nonce(e["epoch"], e["counter"]), body[j * cl:(j + 1) * cl], aad)
                want = b"".join(t[b].contiguous().view(torch.uint8).numpy().tobytes() for t in (k, v))
                assert plain == want
                assert want[:64] not in body
    finally:
        log.close(timeout=10)


@pytest.mark.parametrize("layout", ["cpu", "kv_last"])
def test_a_flipped_byte_zeroes_its_block_reports_it_and_the_next_save_replaces_the_file(backend, keys, tmp_path,
                                                                                         layout):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, layout)
        src = {layer: _cache(layout, seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0, 1], [0, 1])]])
        victim = _paths(tmp_path, sa.session_id, [1])[0]
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 1                                      # in block 1's chunk of layer 1 (the last)
        open(victim, "wb").write(bytes(data))
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [4, 6], [0, 1])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {6}
        k1, v1 = kv_block_views(dst[1], layout)
        assert not k1[6].any() and not v1[6].any()          # zeroed, never the unverified bytes
        assert torch.equal(k1[4], kv_block_views(src[1], layout)[0][0])
        assert log.flush(timeout=10)
        failed = [r for r in log.entries(limit=None) if r.operation == "decrypt" and not r.success]
        assert failed and all(r.layer_idx == 1 and r.position == BS and r.position_count == BS for r in failed)
        deleted = [r for r in log.entries(limit=None) if r.operation == "delete"]      # the removal is on record
        assert len(deleted) == 1 and deleted[0].nbytes == len(data)
        assert (deleted[0].tenant_id, deleted[0].session_id) == (sa.tenant_id, sa.session_id)
        assert os.path.basename(victim) in deleted[0].details and "a tag failed in layer 1" in deleted[0].details
        # the tampered file is gone (not a hit that fails every later request); the next save stores it anew
        assert not os.path.exists(victim) and os.path.exists(_paths(tmp_path, sa.session_id, [0])[0])
        _save(store, src, tmp_path, sa, [[([1], [1])]], req_id="r3")
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r4", tmp_path, sa, [4, 6], [0, 1])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        assert torch.equal(kv_block_views(dst[1], layout)[1][6], kv_block_views(src[1], layout)[1][1])
    finally:
        log.close(timeout=10)


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_a_missing_or_bad_block_file_refuses_the_whole_request_and_a_bad_one_is_replaced(backend, keys, tmp_path,
                                                                                         damage):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0, 1], [0, 1])]])
        p0, p1 = _paths(tmp_path, sa.session_id, [0, 1])
        if damage == "missing":
            os.remove(p0)
        elif damage == "truncated":
            os.truncate(p0, os.path.getsize(p0) - 7)
        else:                                   # block 1's file under block 0's name
            os.replace(p1, p0)
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [4, 6], [0, 1])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {4, 6}
        for layer in LAYERS:
            k, v = kv_block_views(dst[layer], "cpu")
            assert not k[[4, 6]].any() and not v[[4, 6]].any() and (k[5] == 3).all()
        assert log.flush(timeout=10)
        recs = [r for r in log.entries(limit=None) if r.operation == "decrypt"]
        assert len(recs) == 1 and not recs[0].success and "load refused (request r2)" in recs[0].details
        assert ("removed" in recs[0].details) == (damage != "missing")
        deleted = [r for r in log.entries(limit=None) if r.operation == "delete"]
        assert [os.path.basename(p0) in r.details and "malformed" in r.details for r in deleted] == \
            ([] if damage == "missing" else [True])
        assert not os.path.exists(p0)
        _save(store, src, tmp_path, sa, [[([0, 1], [0, 1])]], req_id="r3")     # the next save stores it anew
        store.load([_load("r4", tmp_path, sa, [4, 6], [0, 1])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        assert torch.equal(kv_block_views(dst[0], "cpu")[0][4], kv_block_views(src[0], "cpu")[0][0])
    finally:
        log.close(timeout=10)


def test_blocks_saved_over_several_steps_are_each_on_disk_when_their_step_ends(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "kv_first")
        src = {layer: _cache("kv_first", seed=layer) for layer in LAYERS}
        p = _paths(tmp_path, sa.session_id, range(4))
        assert _save(store, src, tmp_path, sa, [[([0], [5])]]) == p[:1]
        assert not any(os.path.exists(x) for x in p[1:])
        assert _save(store, src, tmp_path, sa, [[([1, 2, 3], [8, 2, 10])]]) == p[1:]
        # a load of the blocks past a one-block prefix-cache hit reads only the blocks it needs
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [0, 1, 3], [1, 2, 3])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        for layer in LAYERS:
            ks, _ = kv_block_views(src[layer], "kv_first")
            kd, _ = kv_block_views(dst[layer], "kv_first")
            assert torch.equal(kd[0], ks[8]) and torch.equal(kd[1], ks[2]) and torch.equal(kd[3], ks[10])
    finally:
        log.close(timeout=10)


def test_a_block_loaded_under_another_index_or_prefix_fails_its_tags(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0], [2])]])
        other = chain_hashes(list(range(100, 100 + BS)), BS)
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [5], [0], chains=other)], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {5}
        assert not kv_block_views(dst[0], "cpu")[0][5].any()
    finally:
        log.close(timeout=10)


def test_a_refused_key_stores_nothing_and_the_refusal_is_on_record(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        sp = [_part("r1", tmp_path, sa, [0], [0], tenant="tenant-c", session_id="urn:pqc-kv-sess:none")]
        for layer in LAYERS:
            store.save_layer(layer, src[layer], sp)
        assert store.finish_saves(sp, LAYERS) == [] and not os.path.exists(tmp_path / "store")
        assert log.flush(timeout=10)
        recs = list(log.entries(limit=None))
        assert len(recs) == 1 and not recs[0].success and "UnknownTenantError" in recs[0].details
    finally:
        log.close(timeout=10)


def test_block_ids_past_the_record_row_range_are_sealed_in_windows(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        nb = (1 << 15) + 8
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", torch.float16, nb=nb, seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0, 1, 2], [3, nb - 1, 5])]])
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [nb - 2, 1, nb - 3], [0, 1, 2])],
                   [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        for layer in LAYERS:
            ks, vs = kv_block_views(src[layer], "cpu")
            kd, vd = kv_block_views(dst[layer], "cpu")
            for a, b in ((3, nb - 2), (nb - 1, 1), (5, nb - 3)):
                assert torch.equal(kd[b], ks[a]) and torch.equal(vd[b], vs[a])
        assert log.flush(timeout=10)
        rows = {r.row for r in log.entries(limit=None) if r.operation == "decrypt"}
        assert rows == {1, nb - 2 - (1 << 15), nb - 3 - (1 << 15)}      # the block id in its window
    finally:
        log.close(timeout=10)


def test_a_block_file_of_another_model_under_this_models_name_is_refused(backend, keys, tmp_path):
    """The model fingerprint in each file's header: a file another model's store wrote (copied or planted
    under this model's block name) is not loaded."""
    from pqc_kv_cache.vllm.storefiles import model_fingerprint
    _, sa, client = keys
    base = model_fingerprint("org/base", None, "float32", 2, HEADS, HD)
    tuned = model_fingerprint("org/base-tuned", None, "float32", 2, HEADS, HD)
    log = _log(backend, tmp_path / "audit.log")
    try:
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        _save(KVBlockStore(backend, log, client, BS, "cpu", tuned), src, tmp_path, sa, [[([0], [0])]])
        assert read_block(_paths(tmp_path, sa.session_id, [0])[0], _chunk_len())[0]["model"] == tuned.hex()
        store = KVBlockStore(backend, log, client, BS, "cpu", base)
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", tmp_path, sa, [4], [0])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {4}
        assert not kv_block_views(dst[0], "cpu")[0][4].any()
        assert log.flush(timeout=10)
        recs = [r for r in log.entries(limit=None) if r.operation == "decrypt" and not r.success]
        assert len(recs) == 1 and "of this model" in recs[0].details
    finally:
        log.close(timeout=10)


def test_a_file_of_another_format_version_is_refused(tmp_path):
    from pqc_kv_cache.vllm.storefiles import MalformedStoreError
    header = json.dumps({"format": "pqc_kv_cache/vllm-layer-2", "epoch": 0, "layer": 0, "counters": [0]}).encode()
    (tmp_path / "b.pkvb").write_bytes(len(header).to_bytes(4, "big") + header)      # the per-layer files before
    with pytest.raises(MalformedStoreError, match="vllm-block-2"):
        read_block(str(tmp_path / "b.pkvb"), 100)


def test_the_twin_seals_and_opens_through_the_cuda_backend_launches_with_deferred_status(keys, tmp_path):
    if not kernel_shim.available():
        pytest.skip("no C++ compiler for the host shim")
    _, sa, client = keys
    be = CpuTwinBackend()
    log = TwinLog(str(tmp_path / "audit.log"))
    try:
        store = _store(be, log, client, "kv_last")
        src = {layer: _cache("kv_last", seed=layer) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([0, 1], [2, 3])]])
        enc_launches = [x for x in be.launches if x[0] == "pqc_encrypt_chunks"]
        assert len(enc_launches) == len(LAYERS)                         # one encrypt call per layer
        store.load([_load("r2", tmp_path, sa, [0, 1], [0, 1])],
                   [(layer, torch.zeros_like(src[layer])) for layer in LAYERS])
        assert all(o.status.deferred for o in store._opened)            # read at load_errors, not before
        assert store.load_errors() == set()
        assert len([x for x in be.launches if x[0] == "pqc_decrypt_chunks"]) == len(LAYERS)
    finally:
        log.close(timeout=10)


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")
@pytest.mark.parametrize("layout", ["kv_last", "kv_first"])
def test_on_cuda_save_and_load_make_no_host_sync_and_a_flipped_byte_is_found_at_load_errors(keys, tmp_path, layout):
    from pqc_kv_cache.backends import select_backend
    from pqc_kv_cache.backends.cuda import CudaBackend

    _, sa, client = keys
    dev = torch.device("cuda", torch.cuda.current_device())
    be = select_backend(dev)
    assert isinstance(be, CudaBackend)
    log = KVAuditLog(str(tmp_path / "audit.log"))
    try:
        store = _store(be, log, client, layout)
        src = {layer: _cache(layout, torch.bfloat16, seed=layer).to(dev) for layer in LAYERS}
        _save(store, src, tmp_path, sa, [[([5], [1])]])           # kernels compiled, key schedules prepared
        sp = [_part("r1", tmp_path, sa, [7, 2], [0, 1])]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for layer in LAYERS:
                store.save_layer(layer, src[layer], sp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert store.finish_saves(sp, LAYERS) == sp[0].paths     # waits for the copies (vLLM's wait_for_save)
        victim = sp[0].paths[1]
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 1                                            # block 2's chunk in layer 1
        open(victim, "wb").write(bytes(data))
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        req = _load("r2", tmp_path, sa, [4, 6], [0, 1])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            store.load([req], [(layer, dst[layer]) for layer in LAYERS])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert store.load_errors() == {6}                         # the caller's synchronisation point
        ks, vs = kv_block_views(src[0], layout)
        kd, vd = kv_block_views(dst[0], layout)
        assert torch.equal(kd[4], ks[7]) and torch.equal(vd[6], vs[2])
        k1, v1 = kv_block_views(dst[1], layout)
        assert not k1[6].any() and not v1[6].any() and torch.equal(k1[4], kv_block_views(src[1], layout)[0][7])
        assert log.flush(timeout=10)
        failed = [r for r in log.entries(limit=None) if r.operation == "decrypt" and not r.success]
        assert failed and all(r.layer_idx == 1 and r.position == BS for r in failed)
    finally:
        log.close(timeout=10)
