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
from pqc_kv_cache.vllm.storefiles import (INDEX, bound_session_tag, chain_hashes, layer_file, prefix_dir, read_index,
                                          read_stored_layer)
from pqc_kv_cache.vllm.tenancy import ServerSecret

BS, HEADS, HD, NB = 4, 2, 16, 12
LAYERS = (0, 1)
SECRET = ServerSecret(bytes(range(32)))
CH = chain_hashes(list(range(8 * BS)), BS)        # block i of the prompt range(k * BS) has chain hash CH[i]


def _pdir(tmp_path, session_id, nblocks, tenant="tenant-a"):
    """The directory of the stored prefix range(nblocks * BS)."""
    return prefix_dir(str(tmp_path / "store"), SECRET, tenant, session_id, CH[nblocks - 1])


def _load(req_id, sa, directory, block_ids, first, ntok, parts, chains=None):
    return LoadRequest(req_id, "tenant-a", sa.session_id, directory, list(block_ids),
                       CH[first:first + len(block_ids)] if chains is None else chains, first, ntok, list(parts))


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


def _save(store, caches, directory, sa, parts):
    """Save ``parts`` (list of steps, each a list of (first block, block ids)) of a prefix; the last part
    of the last step carries the part list."""
    allparts = [(first, len(ids)) for step in parts for first, ids in step]
    ntok = sum(n for _, n in allparts) * BS
    written = []
    for si, step in enumerate(parts):
        sp = [SavePart("r1", "tenant-a", sa.session_id, directory, list(ids), CH[first:first + len(ids)], first,
                       ntok, allparts if si == len(parts) - 1 and j == len(step) - 1 else None)
              for j, (first, ids) in enumerate(step)]
        for layer in LAYERS:
            store.save_layer(layer, caches[layer], sp)
        written += store.finish_saves(sp, LAYERS)
    return written, allparts, ntok


LAYOUT_IDS = ["cpu", "kv_last", "kv_first"]


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_blocks_saved_then_loaded_into_other_blocks_give_the_same_kv(backend, keys, tmp_path, layout):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, layout)
        src = {layer: _cache(layout, seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, sa.session_id, 3)
        written, parts, ntok = _save(store, src, directory, sa, [[(0, [7, 2, 9])]])
        assert written == [directory] and read_index(directory)["parts"] == [(0, 3)]
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", sa, directory, [1, 5, 11], 0, ntok, parts)],
                   [(layer, dst[layer]) for layer in LAYERS])
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
        assert "request r1" in save.details and (save.position, save.position_count) == (0, ntok)
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
        directory = _pdir(tmp_path, sa.session_id, 2)
        _save(store, src, directory, sa, [[(0, [3, 4])]])
        for layer in LAYERS:
            cl = _chunk_len(torch.bfloat16)
            header, body = read_stored_layer(layer_file(directory, layer, 0), cl, 2)
            assert header["dtype"] == "bfloat16" and len(header["counters"]) == 2
            k, v = kv_block_views(src[layer], "kv_last")
            for i, (counter, b) in enumerate(zip(header["counters"], (3, 4))):
                k_len = HEADS * BS * HD * 2
                aad = build_aad(tenant_id="tenant-a", session_id=sa.session_id, epoch=header["epoch"],
                                layer_idx=layer, position=i * BS, position_count=BS, key_len=k_len,
                                dtype="bfloat16", num_heads=HEADS, head_dim=HD)
                # the session tag field holds the session tag bound to the block's token prefix
                aad = aad[:24] + bound_session_tag(sa.session_id, CH[i]) + aad[40:]
                plain = AESGCM(sa.key_for_epoch(header["epoch"])).decrypt(
                    make_nonce(header["epoch"], counter), body[i * cl:(i + 1) * cl], aad)
                want = b"".join(t[b].contiguous().view(torch.uint8).numpy().tobytes() for t in (k, v))
                assert plain == want
                assert want[:64] not in body
    finally:
        log.close(timeout=10)


@pytest.mark.parametrize("layout", ["cpu", "kv_last"])
def test_a_flipped_byte_zeroes_its_block_reports_it_and_is_on_record(backend, keys, tmp_path, layout):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, layout)
        src = {layer: _cache(layout, seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, sa.session_id, 2)
        _, parts, ntok = _save(store, src, directory, sa, [[(0, [0, 1])]])
        victim = layer_file(directory, 1, 0)
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 1                                      # in the second chunk (block 1) of layer 1
        open(victim, "wb").write(bytes(data))
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", sa, directory, [4, 6], 0, ntok, parts)],
                   [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {6}
        k1, v1 = kv_block_views(dst[1], layout)
        assert not k1[6].any() and not v1[6].any()          # zeroed, never the unverified bytes
        assert torch.equal(k1[4], kv_block_views(src[1], layout)[0][0])
        assert log.flush(timeout=10)
        failed = [r for r in log.entries(limit=None) if r.operation == "decrypt" and not r.success]
        assert failed and all(r.layer_idx == 1 and r.position == BS and r.position_count == BS for r in failed)
    finally:
        log.close(timeout=10)


def test_a_missing_layer_file_refuses_the_whole_request_and_zeroes_its_blocks(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, sa.session_id, 2)
        _, parts, ntok = _save(store, src, directory, sa, [[(0, [0, 1])]])
        os.remove(layer_file(directory, 0, 0))
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        store.load([_load("r2", sa, directory, [4, 6], 0, ntok, parts)],
                   [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == {4, 6}
        for layer in LAYERS:
            k, v = kv_block_views(dst[layer], "cpu")
            assert not k[[4, 6]].any() and not v[[4, 6]].any() and (k[5] == 3).all()
        assert log.flush(timeout=10)
        recs = [r for r in log.entries(limit=None) if r.operation == "decrypt"]
        assert len(recs) == 1 and not recs[0].success and "load refused" in recs[0].details
    finally:
        log.close(timeout=10)


def test_a_prefix_saved_over_several_steps_gets_its_index_only_when_complete(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "kv_first")
        src = {layer: _cache("kv_first", seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, sa.session_id, 4)
        allparts = [(0, 1), (1, 3)]
        step1 = [SavePart("r1", "tenant-a", sa.session_id, directory, [5], CH[:1], 0, 4 * BS)]
        for layer in LAYERS:
            store.save_layer(layer, src[layer], step1)
        assert store.finish_saves(step1, LAYERS) == []
        assert not os.path.exists(os.path.join(directory, INDEX))        # a partial prefix is never a hit
        step2 = [SavePart("r1", "tenant-a", sa.session_id, directory, [8, 2, 10], CH[1:4], 1, 4 * BS, allparts)]
        for layer in LAYERS:
            store.save_layer(layer, src[layer], step2)
        assert store.finish_saves(step2, LAYERS) == [directory]
        index = read_index(directory)
        assert index["parts"] == [(0, 1), (1, 3)] and index["num_tokens"] == 4 * BS
        # a load of the blocks past a one-block prefix-cache hit reads only the parts it needs
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", sa, directory, [0, 1, 3], 1, 4 * BS,
                          index["parts"])], [(layer, dst[layer]) for layer in LAYERS])
        assert store.load_errors() == set()
        for layer in LAYERS:
            ks, _ = kv_block_views(src[layer], "kv_first")
            kd, _ = kv_block_views(dst[layer], "kv_first")
            assert torch.equal(kd[0], ks[8]) and torch.equal(kd[1], ks[2]) and torch.equal(kd[3], ks[10])
    finally:
        log.close(timeout=10)


def test_a_refused_key_stores_nothing_and_the_refusal_is_on_record(backend, keys, tmp_path):
    _, sa, client = keys
    log = _log(backend, tmp_path / "audit.log")
    try:
        store = _store(backend, log, client, "cpu")
        src = {layer: _cache("cpu", seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, "urn:pqc-kv-sess:none", 1, tenant="tenant-c")
        sp = [SavePart("r1", "tenant-c", "urn:pqc-kv-sess:none", directory, [0], CH[:1], 0, BS, [(0, 1)])]
        for layer in LAYERS:
            store.save_layer(layer, src[layer], sp)
        assert store.finish_saves(sp, LAYERS) == [] and not os.path.exists(directory)
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
        directory = _pdir(tmp_path, sa.session_id, 3)
        _, parts, ntok = _save(store, src, directory, sa, [[(0, [3, nb - 1, 5])]])
        dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
        store.load([_load("r2", sa, directory, [nb - 2, 1, nb - 3], 0, ntok, parts)],
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


def test_an_index_or_layer_file_of_another_format_version_is_refused(tmp_path):
    from pqc_kv_cache.vllm.storefiles import MalformedStoreError
    d = tmp_path / "p"
    d.mkdir()
    (d / INDEX).write_text(json.dumps({"session_id": "s", "num_tokens": 4, "layers": [0]}))   # the first layout
    assert read_index(str(d)) is None
    (d / INDEX).write_text(json.dumps({"format": "pqc_kv_cache/vllm-prefix-2", "session_id": "s", "num_tokens": 4,
                                       "block_size": 4, "layers": [0], "parts": [[0, 1]]}))   # the unbound one
    assert read_index(str(d)) is None
    header = json.dumps({"format": "pqc_kv_cache/vllm-layer-1", "chunks": []}).encode()
    (d / "L0-p0.pkvb").write_bytes(len(header).to_bytes(4, "big") + header)
    with pytest.raises(MalformedStoreError, match="vllm-layer-2"):
        read_stored_layer(str(d / "L0-p0.pkvb"), 100, 1)


def test_the_twin_seals_and_opens_through_the_cuda_backend_launches_with_deferred_status(keys, tmp_path):
    if not kernel_shim.available():
        pytest.skip("no C++ compiler for the host shim")
    _, sa, client = keys
    be = CpuTwinBackend()
    log = TwinLog(str(tmp_path / "audit.log"))
    try:
        store = _store(be, log, client, "kv_last")
        src = {layer: _cache("kv_last", seed=layer) for layer in LAYERS}
        directory = _pdir(tmp_path, sa.session_id, 2)
        _, parts, ntok = _save(store, src, directory, sa, [[(0, [2, 3])]])
        enc_launches = [x for x in be.launches if x[0] == "pqc_encrypt_chunks"]
        assert len(enc_launches) == len(LAYERS)                         # one encrypt call per layer
        store.load([_load("r2", sa, directory, [0, 1], 0, ntok, parts)],
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
        warm = _pdir(tmp_path, sa.session_id, 1)
        _save(store, src, warm, sa, [[(0, [1])]])                 # kernels compiled, key schedules prepared
        directory = _pdir(tmp_path, sa.session_id, 2)
        sp = [SavePart("r1", "tenant-a", sa.session_id, directory, [7, 2], CH[:2], 0, 2 * BS, [(0, 2)])]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for layer in LAYERS:
                store.save_layer(layer, src[layer], sp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert store.finish_saves(sp, LAYERS) == [directory]     # waits for the copies (vLLM's wait_for_save)
        victim = layer_file(directory, 1, 0)
        data = bytearray(open(victim, "rb").read())
        data[-40] ^= 1                                            # block 2's chunk in layer 1
        open(victim, "wb").write(bytes(data))
        dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
        req = _load("r2", sa, directory, [4, 6], 0, 2 * BS, [(0, 2)])
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
