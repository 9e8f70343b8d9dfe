"""The store's trust boundary without vLLM: keyed salts and names, chunks bound to their token prefix, hostile
store files, safe writes, and a session's close or rotation taking effect at the next step."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.isolation import TenantIsolationManager
from pqc_kv_cache.session import TenantKeyPair
from pqc_kv_cache.vllm import KeyClient, KeyService
from pqc_kv_cache.vllm.blocks import KVBlockStore, LoadRequest, SavePart, kv_block_views
from pqc_kv_cache.vllm.storefiles import (CREATED, MalformedStoreError, block_file, chain_hashes, read_block,
                                          session_dir, write_atomic)
from pqc_kv_cache.vllm.tenancy import (SecretFileError, ServerSecret, generate_server_secret_file,
                                       load_server_secret, request_fields)

BS, HEADS, HD, NB = 4, 2, 8, 12
LAYERS = (0, 1)
CHUNK = BS * 2 * HEADS * HD * 4 + 16
SECRET = ServerSecret(bytes(range(32)))
PROMPT_A = list(range(100, 100 + 2 * BS))
PROMPT_B = list(range(200, 200 + 2 * BS))


# ---------------------------------------------------------------------------------------------- the secret
def test_the_secret_file_is_created_0600_never_overwritten_and_a_loose_one_is_refused(tmp_path):
    path = tmp_path / "secrets" / "server.key"
    made = generate_server_secret_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert load_server_secret(path).cache_salt("t") == made.cache_salt("t")
    with pytest.raises(SecretFileError, match="never overwritten"):
        generate_server_secret_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(SecretFileError, match="group or others"):
        load_server_secret(path)
    bad = tmp_path / "bad.key"
    bad.write_text("00" * 31)
    os.chmod(bad, 0o600)
    with pytest.raises(SecretFileError, match="32 bytes"):
        load_server_secret(bad)
    link = tmp_path / "link.key"
    os.chmod(path, 0o600)
    link.symlink_to(path)
    with pytest.raises(SecretFileError):
        load_server_secret(link)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="regular"):
        load_server_secret(fifo)                       # does not block
    with pytest.raises(SecretFileError, match="does not exist"):
        load_server_secret(tmp_path / "none")
    assert "00" not in repr(ServerSecret(bytes(32)))


def test_salts_and_names_are_macs_under_the_secret():
    other = ServerSecret(bytes(range(1, 33)))
    salt = SECRET.cache_salt("tenant-a")
    assert salt != other.cache_salt("tenant-a") and salt != SECRET.cache_salt("tenant-b")
    assert SECRET.salt_matches("tenant-a", salt) and not SECRET.salt_matches("tenant-b", salt)
    assert not SECRET.salt_matches("tenant-a", None) and not SECRET.salt_matches("tenant-a", other.cache_salt("tenant-a"))
    assert SECRET.tenant_name("tenant-a") != other.tenant_name("tenant-a")
    c = chain_hashes(PROMPT_A, BS)[-1]
    assert SECRET.prefix_name("tenant-a", "s1", c) != SECRET.prefix_name("tenant-a", "s2", c)
    store = "/store"
    assert block_file(store, SECRET, "tenant-a", "s1", c) != block_file(store, SECRET, "tenant-b", "s1", c)
    assert os.path.dirname(block_file(store, SECRET, "tenant-a", "s1", c)) == \
        session_dir(store, SECRET, "tenant-a", "s1")
    assert session_dir(store, SECRET, "tenant-a", "s1") != session_dir(store, SECRET, "tenant-a", "s2")
    assert block_file(store, SECRET, "tenant-a", "s1", c) != block_file(store, other, "tenant-a", "s1", c)
    f = request_fields(SECRET, "tenant-a", "s1")
    assert f == {"cache_salt": salt, "kv_transfer_params": {"pqc_kv_cache": {"tenant_id": "tenant-a",
                                                                                "session_id": "s1"}}}
    with pytest.raises(TypeError):
        request_fields("secret", "tenant-a", "s1")


def test_chain_hashes_cover_every_earlier_token_the_block_size_and_the_lora_adapter():
    a = chain_hashes(PROMPT_A, BS)
    changed = chain_hashes([PROMPT_A[0] + 1] + PROMPT_A[1:], BS)
    assert len(a) == 2 and a[0] != changed[0] and a[1] != changed[1]          # the first token reaches block 1
    assert chain_hashes(PROMPT_A[:BS] + PROMPT_B[BS:], BS)[0] == a[0]          # a shared first block
    assert chain_hashes(PROMPT_A, BS, ("lora-x", "/p")) != a != chain_hashes(PROMPT_A, 2)[:2]
    assert chain_hashes(PROMPT_A, BS, ("lora-x", "/p")) != chain_hashes(PROMPT_A, BS, ("lora-y", "/p"))
    assert chain_hashes(PROMPT_A, BS, ("lora-x", "/p")) != chain_hashes(PROMPT_A, BS, ("lora-x", "/q"))


# ---------------------------------------------------------------------------------------------- the store
@pytest.fixture()
def env(tmp_path):
    manager = TenantIsolationManager()
    sa = manager.create_session(TenantKeyPair.generate("tenant-a").identity())
    log = KVAuditLog(str(tmp_path / "audit.log"))
    with KeyService(manager, str(tmp_path / "keys")) as service:
        store = KVBlockStore(HostBackend(threads=1), log, KeyClient(service.path), BS, "cpu")
        yield manager, sa, store, log
    log.close(timeout=10)


def _cache(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NB, HEADS, BS, 2 * HD, generator=g)


def _paths(tmp_path, session_id, prompt, tenant="tenant-a"):
    return [block_file(str(tmp_path / "store"), SECRET, tenant, session_id, c) for c in chain_hashes(prompt, BS)]


def _save(store, session_id, prompt, blocks, caches, req="r1", tmp_path=None):
    chains = chain_hashes(prompt, BS)
    sp = [SavePart(req, "tenant-a", session_id, list(blocks), list(range(len(blocks))), chains,
                   _paths(tmp_path, session_id, prompt))]
    store.begin_step(sp, len(LAYERS))
    for layer in LAYERS:
        store.save_layer(layer, caches[layer], sp)
    return store.finish_saves(sp, LAYERS)


def _load(store, session_id, prompt, blocks, dst, req="r2", tmp_path=None, paths=None):
    lr = _request(req, session_id, prompt, blocks, tmp_path, paths)
    store.begin_step([], len(LAYERS))
    store.load([lr], [(layer, dst[layer]) for layer in LAYERS])
    return store.load_errors()


def _request(req, session_id, prompt, blocks, tmp_path, paths=None):
    return LoadRequest(req, "tenant-a", session_id, list(blocks), list(range(len(blocks))), chain_hashes(prompt, BS),
                       paths or _paths(tmp_path, session_id, prompt))


def _records(log, op):
    assert log.flush(timeout=10)
    return [r for r in log.entries(limit=None) if r.operation == op]


def test_files_of_prompt_a_put_under_prompt_b_fail_their_tags(env, tmp_path):
    _, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    pa, pb = _paths(tmp_path, sa.session_id, PROMPT_A), _paths(tmp_path, sa.session_id, PROMPT_B)
    assert _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path) == pa
    for a, b in zip(pa, pb):                             # A's block files, named as B's
        with open(a, "rb") as f:
            write_atomic(b, f.read())
    dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
    assert _load(store, sa.session_id, PROMPT_B, [5, 6], dst, tmp_path=tmp_path) == {5, 6}   # every tag fails
    for layer in LAYERS:
        k, v = kv_block_views(dst[layer], "cpu")
        assert not k[[5, 6]].any() and not v[[5, 6]].any()
    assert [r.success for r in _records(log, "decrypt")] == [False] * 8     # 2 blocks x 2 layers, twice
    assert not any(os.path.exists(b) for b in pb)       # the impostors are removed
    # A's own files under A's name still open, into the same blocks
    assert _load(store, sa.session_id, PROMPT_A, [5, 6], dst, tmp_path=tmp_path) == set()
    assert torch.equal(kv_block_views(dst[1], "cpu")[0][6], kv_block_views(src[1], "cpu")[0][2])


def test_stored_files_are_0600_in_0700_directories_and_a_planted_link_is_not_followed(env, tmp_path):
    _, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    pa = _paths(tmp_path, sa.session_id, PROMPT_A)
    sdir = os.path.dirname(pa[0])
    store_root = os.path.dirname(os.path.dirname(sdir))
    os.makedirs(sdir, mode=0o700)
    os.chmod(os.path.dirname(sdir), 0o700)
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    # links planted under the block names and the marker's name
    os.symlink(outside, os.path.join(sdir, CREATED))
    os.symlink(outside, pa[0] + ".tmp")
    os.symlink(outside, pa[1])                           # a block name that is a link is replaced, not followed
    assert _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path) == pa
    assert outside.read_bytes() == b"keep" and not os.path.islink(pa[1])
    for root, dirs, files in os.walk(store_root):
        for d in dirs:
            assert stat.S_IMODE(os.lstat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p
    # a session directory that is a link to elsewhere is refused, and nothing is written through it
    other = "urn:pqc-kv-sess:other"
    pb = _paths(tmp_path, other, PROMPT_B)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, os.path.dirname(pb[0]))
    sp = [SavePart("r3", "tenant-a", sa.session_id, [3, 4], [0, 1], chain_hashes(PROMPT_B, BS), pb)]
    store.begin_step(sp, len(LAYERS))
    for layer in LAYERS:
        store.save_layer(layer, src[layer], sp)
    assert store.finish_saves(sp, LAYERS) == []
    assert os.listdir(elsewhere) == []
    assert any("save failed" in r.details for r in _records(log, "encrypt") if not r.success)


def _layer_entry(**change):
    e = {"layer": 0, "num_heads": HEADS, "head_dim": HD, "epoch": 0, "counter": 1}
    e.update(change)
    return e


def _hostile_header(layers=None, **change):
    h = {"format": "pqc_kv_cache/vllm-block-2", "block_size": BS, "dtype": "float32", "index": 0, "model": "",
         "layers": layers if layers is not None else [_layer_entry(), _layer_entry(layer=1, counter=2)]}
    h.update(change)
    return json.dumps(h)


@pytest.mark.parametrize("name,header", [
    ("counter -1", _hostile_header([_layer_entry(counter=-1), _layer_entry(layer=1)])),
    ("counter 2**64", _hostile_header([_layer_entry(counter=2 ** 64), _layer_entry(layer=1)])),
    ("Infinity", _hostile_header().replace('"epoch": 0', '"epoch": Infinity', 1)),
    ("NaN", _hostile_header().replace('"epoch": 0', '"epoch": NaN', 1)),
    ("float", _hostile_header().replace('"epoch": 0', '"epoch": 0.5', 1)),
    ("5000 digits", _hostile_header().replace('"epoch": 0', '"epoch": ' + "9" * 5000, 1)),
    ("deep nesting", _hostile_header().replace('"epoch": 0', '"epoch": ' + "[" * 100000 + "]" * 100000, 1)),
    ("bool", _hostile_header().replace('"epoch": 0', '"epoch": true', 1)),
    ("no layers", _hostile_header(layers=[])),
    ("layers not objects", _hostile_header(layers=[1, 2])),
    ("a layer twice", _hostile_header([_layer_entry(), _layer_entry()])),
    ("a layer missing", _hostile_header([_layer_entry(), _layer_entry(layer=3)])),
    ("wrong dtype", _hostile_header(dtype="float16")),
    ("another index", _hostile_header(index=1)),
    ("other heads", _hostile_header([_layer_entry(), _layer_entry(layer=1, num_heads=1)])),
    ("another model", _hostile_header(model="ab" * 32)),
    ("a bad model field", _hostile_header(model="xyz")),
])
def test_a_hostile_block_header_is_a_load_error_of_its_request_only(env, tmp_path, name, header):
    _, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path)
    _save(store, sa.session_id, PROMPT_B, [3, 4], src, req="r1b", tmp_path=tmp_path)
    hb = header.encode()
    victim = _paths(tmp_path, sa.session_id, PROMPT_A)[0]
    with open(victim, "wb") as f:
        f.write(len(hb).to_bytes(4, "big") + hb + bytes(2 * CHUNK))
    dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
    store.begin_step([], len(LAYERS))
    store.load([_request("ra", sa.session_id, PROMPT_A, [5, 6], tmp_path),
                _request("rb", sa.session_id, PROMPT_B, [7, 8], tmp_path)], [(layer, dst[layer]) for layer in LAYERS])
    assert store.load_errors() == {5, 6}                 # request B is served in the same step
    assert torch.equal(kv_block_views(dst[0], "cpu")[0][7], kv_block_views(src[0], "cpu")[0][3])
    refused = [r for r in _records(log, "decrypt") if not r.success]
    assert len(refused) == 1 and "load refused (request ra)" in refused[0].details
    assert not os.path.exists(victim)                    # removed: the next save stores the block afresh


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge", "dir"])
def test_a_block_file_that_is_not_a_bounded_regular_file_is_refused_without_blocking(env, tmp_path, kind):
    _, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path)
    path = _paths(tmp_path, sa.session_id, PROMPT_A)[1]
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(1 << 34)                          # sparse: 16 GiB that is never read
    else:
        os.mkdir(path)
    dst = {layer: torch.full_like(src[layer], 3.0) for layer in LAYERS}
    assert _load(store, sa.session_id, PROMPT_A, [5, 6], dst, tmp_path=tmp_path) == {5, 6}
    with pytest.raises(MalformedStoreError):
        read_block(path, CHUNK)
    # only a regular file is removed (the oversized one); a FIFO, a link or a directory is left to the operator
    assert os.path.lexists(path) == (kind != "huge")


# ---------------------------------------------------------------------------------------------- sessions
def test_a_closed_session_stops_saving_and_loading_at_the_next_step(env, tmp_path):
    manager, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    pa = _paths(tmp_path, sa.session_id, PROMPT_A)
    assert _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path) == pa
    dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
    assert _load(store, sa.session_id, PROMPT_A, [5, 6], dst, tmp_path=tmp_path) == set()   # keys now held
    manager.close_session("tenant-a")
    assert _load(store, sa.session_id, PROMPT_A, [5, 6], dst, req="r3", tmp_path=tmp_path) == {5, 6}
    assert all(os.path.exists(p) for p in pa)            # a refused key is no reason to remove a file
    assert _save(store, sa.session_id, PROMPT_B, [3, 4], src, req="r4", tmp_path=tmp_path) == []
    assert not any(os.path.exists(p) for p in _paths(tmp_path, sa.session_id, PROMPT_B))
    assert any("save refused" in r.details for r in _records(log, "encrypt") if not r.success)


def test_a_rotation_seals_under_the_new_epoch_from_the_next_step(env, tmp_path):
    manager, sa, store, log = env
    src = {layer: _cache(layer) for layer in LAYERS}
    _save(store, sa.session_id, PROMPT_A, [1, 2], src, tmp_path=tmp_path)
    e0 = read_block(_paths(tmp_path, sa.session_id, PROMPT_A)[0], CHUNK)[0]["layers"][0]["epoch"]
    manager.rotate("tenant-a")
    _save(store, sa.session_id, PROMPT_B, [3, 4], src, req="r3", tmp_path=tmp_path)
    assert read_block(_paths(tmp_path, sa.session_id, PROMPT_B)[0], CHUNK)[0]["layers"][0]["epoch"] == \
        e0 + 1 == sa.epoch
    dst = {layer: torch.zeros_like(src[layer]) for layer in LAYERS}
    assert _load(store, sa.session_id, PROMPT_A, [5, 6], dst, tmp_path=tmp_path) == set()   # the old epoch opens
