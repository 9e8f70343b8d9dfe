"""Cache save files: a saved cache loads in a new cache object and continues token-identically; a file that
was truncated, changed, re-ordered, spliced or belongs to another tenant or session is refused whole."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from pqc_kv_cache.audit import KVAuditLog, Op, Status
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.cache.savefile import manifest_tag, read_savefile
from pqc_kv_cache.errors import SaveFileError
from pqc_kv_cache.session import TenantSession
from support.cache_models import generate, prompts, sessions, tiny_model

H, D = 2, 16   # tiny llama: 2 KV heads, head_dim 16


def kv(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, H, n, D, generator=g), torch.randn(batch, H, n, D, generator=g)


def filled(two, mode="sealed", audit=None, steps=5, seed=0, backend=None):
    """A cache after a 6-position prefill and ``steps`` decode steps in both layers; returns it and its K/V."""
    cache = EncryptedCache(tiny_model("llama").config, sessions=two, audit=audit, mode=mode,
                           merge_min_segments=2, backend=backend)
    ks, vs = [], []
    for i, n in enumerate([6] + [1] * steps):
        k, v = kv(2, n, seed=seed * 100 + i)
        for layer in range(2):
            cache.update(k, v, layer)
        ks.append(k)
        vs.append(v)
    return cache, torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.fixture
def two():
    return sessions("alice", "bob")


@pytest.fixture
def saved(tmp_path, two):
    cache, k, v = filled(two)
    path = tmp_path / "cache.pkvf"
    cache.save(path)
    return path


# ---- the file, taken apart and put back together -------------------------------------------------------
def parse(path):
    blob = open(path, "rb").read()
    n, m = struct.unpack_from("<HQ", blob, 6)
    manifest = json.loads(blob[32:32 + m])
    tags_at = 32 + m
    return {"prefix": blob[:32], "manifest": manifest, "tags": blob[tags_at:tags_at + 32 * n],
            "data": bytearray(blob[tags_at + 32 * n:]), "n": n}


def chunk_spans(manifest):
    """(layer, index, offset in the data region, size) of every chunk, in file order."""
    out, at = [], 0
    for li, layer in enumerate(manifest["layers"]):
        for ci, size in enumerate(layer["chunks"]["nbytes"]):
            out.append((li, ci, at, size))
            at += size
    return out


def write(path, parts, manifest=None, data=None, retag_with=None):
    """Write a file from ``parts`` (changed manifest / data where given). ``retag_with``: the sessions to
    compute fresh manifest tags with, as a holder of the keys could; otherwise the old tags stay."""
    manifest = parts["manifest"] if manifest is None else manifest
    data = parts["data"] if data is None else data
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    prefix = parts["prefix"][:8] + struct.pack("<Q", len(body)) + parts["prefix"][16:]
    tags = parts["tags"]
    if retag_with is not None:
        import hashlib
        digest = hashlib.sha256(prefix + body).digest()
        tags = b"".join(manifest_tag(s, i, e["epoch"], prefix[16:32], len(manifest["layers"]), digest)
                        for i, (s, e) in enumerate(zip(retag_with, manifest["sessions"])))
    with open(path, "wb") as f:
        f.write(prefix + body + tags + bytes(data))


def refused(path, two, **kw):
    with pytest.raises(SaveFileError) as info:
        EncryptedCache.load(path, tiny_model("llama").config, two, **kw)
    return info.value


# ---- round trips -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_loaded_cache_continues_token_identically(tmp_path, mode, kind, two):
    model = tiny_model(kind)
    ids = prompts(2, 12, seed=3)
    ref_cache = DynamicCache(config=model.config)
    ref1 = generate(model, ids, ref_cache, max_new_tokens=6, do_sample=False)
    cache = EncryptedCache(model.config, sessions=two, mode=mode)
    out1 = generate(model, ids, cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref1, out1)
    cache.save(tmp_path / "c.pkvf")
    del cache
    loaded = EncryptedCache.load(tmp_path / "c.pkvf", model.config, two)
    assert loaded.mode == mode
    follow = torch.cat([ref1, prompts(2, 3, seed=4)], dim=1)
    ref2 = generate(model, follow, ref_cache, max_new_tokens=6, do_sample=False)
    out2 = generate(model, follow, loaded, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref2, out2)
    assert loaded.get_seq_length() == ref_cache.get_seq_length()


def test_a_file_loads_in_the_other_mode(tmp_path, two):
    cache, k, v = filled(two, mode="sealed")
    cache.save(tmp_path / "c.pkvf")
    loaded = EncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two, mode="working_set")
    assert loaded.mode == "working_set" and not loaded.released
    kn, vn = kv(2, 1, seed=99)
    k_out, v_out = loaded.update(kn, vn, 0)
    assert torch.equal(k_out, torch.cat([k, kn], 2)) and torch.equal(v_out, torch.cat([v, vn], 2))


def test_the_file_holds_no_plaintext(tmp_path, mode, two):
    cache, k, v = filled(two, mode=mode)
    cache.save(tmp_path / "c.pkvf")
    blob = open(tmp_path / "c.pkvf", "rb").read()
    needles = [t[r, h, p].numpy().tobytes() for t in (k, v) for r in range(2) for h in range(H)
               for p in range(t.shape[2])]
    assert not [n for n in needles if n in blob]


def test_chunks_open_with_plain_aesgcm(saved, two):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pqc_kv_cache.envelope import build_aad, make_nonce
    parts = parse(saved)
    m = parts["manifest"]
    for li, ci, at, size in chunk_spans(m):
        layer, c = m["layers"][li], m["layers"][li]["chunks"]
        seg = layer["refs"].index(ci) // layer["batch"]
        start, count = layer["seg_start"][seg], layer["seg_count"][seg]
        s = two[c["slot"][ci]]
        aad = build_aad(tenant_id=s.tenant_id, session_id=s.session_id, epoch=c["epoch"][ci], layer_idx=li,
                        position=start, position_count=count, key_len=(size - 16) // 2, dtype="float32",
                        num_heads=H, head_dim=D)
        plain = AESGCM(s.key_for_epoch(c["epoch"][ci])).decrypt(
            make_nonce(c["epoch"][ci], c["counter"][ci]), bytes(parts["data"][at:at + size]), aad)
        assert len(plain) == size - 16


def test_save_and_load_are_on_record(tmp_path, mode, two):
    audit = KVAuditLog()
    cache, _, _ = filled(two, mode=mode, audit=audit)
    cache.save(tmp_path / "c.pkvf")
    EncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two, audit=audit)
    audit.flush()
    for op in (Op.SAVE, Op.LOAD):
        recs = [e for e in audit.entries(limit=None, operation=op)]
        assert sorted((e.layer_idx, e.row) for e in recs) == [(li, r) for li in range(2) for r in range(2)]
        assert all(e.status == Status.OK and e.position_count == 11 for e in recs)
    assert {e.tenant_id for e in audit.entries(limit=None, operation=Op.LOAD)} == {"alice", "bob"}


def test_a_failed_load_is_on_record(tmp_path, two):
    audit = KVAuditLog()
    cache, _, _ = filled(two)
    cache.save(tmp_path / "c.pkvf")
    parts = parse(tmp_path / "c.pkvf")
    parts["data"][5] ^= 1
    write(tmp_path / "c.pkvf", parts)
    refused(tmp_path / "c.pkvf", two, audit=audit)
    audit.flush()
    assert [e for e in audit.entries(limit=None, operation=Op.LOAD) if e.status == Status.AUTH_FAILED]
    assert [e for e in audit.entries(limit=None, operation=Op.DECRYPT) if e.status == Status.AUTH_FAILED]


# ---- attacks, each refused whole ---------------------------------------------------------------------------
def test_dropped_chunk_is_refused(tmp_path, saved, two):
    parts = parse(saved)
    li, ci, at, size = chunk_spans(parts["manifest"])[1]
    # bytes dropped, manifest untouched
    write(tmp_path / "a", parts, data=parts["data"][:at] + parts["data"][at + size:])
    assert "truncated or extended" in str(refused(tmp_path / "a", two))
    # bytes and chunk list entry dropped: the manifest no longer verifies
    m = json.loads(json.dumps(parts["manifest"]))
    for col in m["layers"][li]["chunks"].values():
        del col[ci]
    m["data_bytes"] -= size
    write(tmp_path / "b", parts, manifest=m, data=parts["data"][:at] + parts["data"][at + size:])
    assert "does not verify" in str(refused(tmp_path / "b", two))
    # even a holder of the keys who re-tags the edited list cannot leave a position uncovered
    write(tmp_path / "c", parts, manifest=m, data=parts["data"][:at] + parts["data"][at + size:], retag_with=two)
    refused(tmp_path / "c", two)


def _same_size_pair(manifest):
    spans = chunk_spans(manifest)
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a[3] == b[3]:
                return a, b
    raise AssertionError("no two chunks of one size")


def test_reordered_chunks_are_refused(tmp_path, saved, two):
    parts = parse(saved)
    a, b = _same_size_pair(parts["manifest"])
    data = bytearray(parts["data"])
    data[a[2]:a[2] + a[3]], data[b[2]:b[2] + b[3]] = parts["data"][b[2]:b[2] + b[3]], parts["data"][a[2]:a[2] + a[3]]
    write(tmp_path / "a", parts, data=data)
    err = refused(tmp_path / "a", two)
    assert "authentication" in str(err)


def test_duplicated_chunk_is_refused(tmp_path, saved, two):
    parts = parse(saved)
    a, b = _same_size_pair(parts["manifest"])
    data = bytearray(parts["data"])
    data[b[2]:b[2] + b[3]] = parts["data"][a[2]:a[2] + a[3]]          # chunk a's bytes twice
    write(tmp_path / "a", parts, data=data)
    refused(tmp_path / "a", two)
    # a chunk listed twice, by a holder of the keys who re-tags the list
    m = json.loads(json.dumps(parts["manifest"]))
    c = m["layers"][b[0]]["chunks"]
    src = m["layers"][a[0]]["chunks"]
    for f in ("counter", "epoch", "slot"):
        c[f][b[1]] = src[f][a[1]]
    write(tmp_path / "b", parts, manifest=m, data=data, retag_with=two)
    assert "twice" in str(refused(tmp_path / "b", two))


def test_replaced_chunk_is_refused(tmp_path, saved, two):
    parts = parse(saved)
    li, ci, at, size = chunk_spans(parts["manifest"])[0]
    data = bytearray(parts["data"])
    data[at:at + size] = os.urandom(size)
    write(tmp_path / "a", parts, data=data)
    refused(tmp_path / "a", two)


def test_chunk_from_another_file_is_refused(tmp_path, two):
    # two caches of the same sessions, the same shapes and positions: only the chunks' bytes differ
    for seed, name in ((0, "one"), (1, "two")):
        filled(two, seed=seed)[0].save(tmp_path / name)
    one, other = parse(tmp_path / "one"), parse(tmp_path / "two")
    li, ci, at, size = chunk_spans(one["manifest"])[0]
    assert chunk_spans(other["manifest"])[0][3] == size
    data = bytearray(one["data"])
    data[at:at + size] = other["data"][at:at + size]
    write(tmp_path / "spliced", one, data=data)
    refused(tmp_path / "spliced", two)
    # the other file's manifest and tags over this file's chunks: the file id is another
    write(tmp_path / "swapped", {**one, "tags": other["tags"]})
    assert "does not verify" in str(refused(tmp_path / "swapped", two))


def test_file_of_another_tenant_is_refused(tmp_path, saved, two):
    carol, dave = sessions("carol", "dave")
    audit = KVAuditLog()
    err = refused(saved, [carol, dave], audit=audit)
    assert "alice" in str(err)
    audit.flush()
    assert {e.tenant_id for e in audit.entries(limit=None, operation=Op.LOAD)
            if e.status == Status.REFUSED} == {"carol", "dave"}
    # one right tenant is not enough: every session of the file is needed
    refused(saved, [two[0], carol])


def test_file_of_another_session_is_refused(tmp_path, saved, two):
    alice2 = sessions("alice")[0]
    refused(saved, [alice2, two[1]])
    # the same tenant and session ids over other key material: the manifest does not verify
    impostor = TenantSession("alice", two[0].session_id, os.urandom(32), b"")
    assert "does not verify" in str(refused(saved, [impostor, two[1]]))


def test_a_closed_session_cannot_open_its_file(saved, two):
    two[0].close()
    refused(saved, two)


def test_truncated_anywhere_is_refused(tmp_path, saved, two):
    blob = open(saved, "rb").read()
    parts = parse(saved)
    head = 32 + len(json.dumps(parts["manifest"], sort_keys=True, separators=(",", ":"))) + 32 * parts["n"]
    cuts = list(range(0, head + 1, 3)) + list(range(head, len(blob), 97)) + [len(blob) - 1]
    for cut in cuts:
        with open(tmp_path / "t", "wb") as f:
            f.write(blob[:cut])
        refused(tmp_path / "t", two)
    with open(tmp_path / "t", "wb") as f:
        f.write(blob + b"\0")
    refused(tmp_path / "t", two)


def test_a_flipped_byte_anywhere_is_refused(tmp_path, saved, two):
    blob = open(saved, "rb").read()
    parts = parse(saved)
    head = 32 + len(json.dumps(parts["manifest"], sort_keys=True, separators=(",", ":"))) + 32 * parts["n"]
    where = (list(range(0, 32)) + list(range(32, head, 5)) + list(range(head - 64, head))
             + list(range(head, len(blob), 131)) + list(range(len(blob) - 16, len(blob))))
    for i in where:
        bad = bytearray(blob)
        bad[i] ^= 0x20
        with open(tmp_path / "f", "wb") as f:
            f.write(bad)
        refused(tmp_path / "f", two)


def test_nothing_of_a_refused_load_is_kept(tmp_path, saved, two):
    parts = parse(saved)
    spans = chunk_spans(parts["manifest"])
    li, ci, at, size = spans[-1]
    parts["data"][at] ^= 1          # the last chunk: every other chunk opens before it fails
    write(tmp_path / "a", parts)
    before = [s.next_sequence for s in two]
    refused(tmp_path / "a", two)
    assert [s.next_sequence for s in two] == before
    assert read_savefile(tmp_path / "a", two).manifest["layers"][li]["chunks"]["nbytes"][ci] == size


def _ops(log, op):
    log.flush()
    return [(e.tenant_id, e.status) for e in log.entries(limit=None) if e.operation == op]


def test_wrong_config_is_api_misuse_and_the_refused_load_is_recorded(saved, two):
    log = KVAuditLog()
    before = [s.lineage for s in two]
    with pytest.raises(ValueError):
        EncryptedCache.load(saved, tiny_model("mistral").config, two, audit=log)
    with pytest.raises(ValueError, match="holds 2 layers, this config 3"):
        EncryptedCache.load(saved, tiny_model("llama", layers=3).config, two, audit=log)
    assert sorted(_ops(log, "load")) == [("alice", Status.REFUSED), ("alice", Status.REFUSED),
                                         ("bob", Status.REFUSED), ("bob", Status.REFUSED)]
    assert [s.lineage for s in two] == before
    log.close()


def test_a_load_refused_for_rows_of_another_session_is_recorded(tmp_path, two):
    cache, _, _ = filled(two)
    cache.save(tmp_path / "c.pkvf")
    parts = parse(tmp_path / "c.pkvf")
    m = json.loads(json.dumps(parts["manifest"]))
    m["layers"][1]["row_slots"] = [1, 0]            # layer 1 gives each row the other session's chunks
    write(tmp_path / "a", parts, manifest=m, retag_with=two)
    log = KVAuditLog()
    with pytest.raises(SaveFileError, match="another session"):
        EncryptedCache.load(tmp_path / "a", tiny_model("llama").config, two, audit=log)
    assert sorted(_ops(log, "load")) == [("alice", Status.REFUSED), ("bob", Status.REFUSED)]
    log.close()


def test_a_save_whose_write_fails_is_recorded_and_a_later_save_succeeds(tmp_path, two):
    log = KVAuditLog()
    cache, _, _ = filled(two, audit=log)
    with pytest.raises(SaveFileError, match="does not exist"):
        cache.save(tmp_path / "missing" / "c.pkvf")
    assert sorted(_ops(log, "save")) == [("alice", Status.REFUSED)] * 2 + [("bob", Status.REFUSED)] * 2
    cache.save(tmp_path / "c.pkvf")
    assert sorted(status for _, status in _ops(log, "save")) == [Status.OK] * 4 + [Status.REFUSED] * 4
    log.close()


# ---- nonces --------------------------------------------------------------------------------------------
class Recording(HostBackend):
    """Every (key, nonce) sealed through this backend."""

    def __init__(self, sealed: set, **kw):
        super().__init__(**kw)
        self.sealed = sealed

    def encrypt_chunks(self, keys, layout, chunks, *args, **kwargs):
        for slot, counter in zip(np.asarray(chunks.slot).tolist(), np.asarray(chunks.counter).tolist()):
            pair = (keys[slot].key, keys[slot].epoch, counter)
            assert pair not in self.sealed, f"(key, nonce) reused: epoch {pair[1]}, counter {counter}"
            self.sealed.add(pair)
        return super().encrypt_chunks(keys, layout, chunks, *args, **kwargs)


@pytest.mark.parametrize("reestablished", [False, True])
def test_no_key_nonce_pair_reused_across_save_and_load(tmp_path, mode, reestablished):
    secrets = [os.urandom(32), os.urandom(32)]
    two = [TenantSession(t, f"{t}-s", ss, b"") for t, ss in zip(("alice", "bob"), secrets)]
    sealed: set = set()
    cache, _, _ = filled(two, mode=mode, backend=Recording(sealed, threads=1), steps=6)
    cache.save(tmp_path / "c.pkvf")
    if reestablished:   # the same key material and session ids, nonce counters starting over
        two = [TenantSession(t, f"{t}-s", ss, b"") for t, ss in zip(("alice", "bob"), secrets)]
    n_saved = len(sealed)
    loaded = EncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two,
                                 backend=Recording(sealed, threads=1), merge_min_segments=2, mode=mode)
    in_file = {(s.key_for_epoch(e), e, c) for layer in parse(tmp_path / "c.pkvf")["manifest"]["layers"]
               for slot, e, c in zip(layer["chunks"]["slot"], layer["chunks"]["epoch"], layer["chunks"]["counter"])
               for s in [two[slot]]}
    assert in_file <= sealed
    n_before = len(sealed)
    assert n_before == n_saved      # the load seals nothing; the next updates (and merges) take new counters
    for i in range(6):
        k, v = kv(2, 1, seed=50 + i)
        for layer in range(2):
            loaded.update(k, v, layer)
    assert len(sealed) > n_before
    loaded.rotate("alice")
    loaded.update(*kv(2, 1, seed=70), 0)


def test_rows_sharing_chunks_round_trip(tmp_path, mode, two):
    """After a batch expansion rows share chunks; the file holds each once and the loaded rows share them too."""
    cache, k, v = filled(two, mode=mode)
    cache.batch_repeat_interleave(2)
    cache.save(tmp_path / "c.pkvf")
    m = parse(tmp_path / "c.pkvf")["manifest"]
    assert len(m["layers"][0]["refs"]) == 2 * len(set(m["layers"][0]["refs"]))
    loaded = EncryptedCache.load(tmp_path / "c.pkvf", tiny_model("llama").config, two)
    assert loaded.row_session_slots.tolist() == [0, 0, 1, 1]
    kn, vn = kv(4, 1, seed=7)
    k_out, _ = loaded.update(kn, vn, 1)
    assert torch.equal(k_out, torch.cat([k.repeat_interleave(2, 0), kn], 2))


def test_a_row_pointed_at_another_sessions_chunk_is_refused(tmp_path, saved, two):
    """Even a manifest re-tagged by a holder of both sessions' keys cannot hand bob's row alice's chunk."""
    parts = parse(saved)
    m = json.loads(json.dumps(parts["manifest"]))
    layer = m["layers"][0]
    assert layer["row_slots"] == [0, 1]
    layer["refs"][1] = layer["refs"][0]      # segment 0: row 1 (bob) takes row 0's (alice's) chunk
    write(tmp_path / "a", parts, manifest=m, retag_with=two)
    assert "another session" in str(refused(tmp_path / "a", two))


def test_saving_into_a_missing_folder_names_the_folder_not_a_temporary_file(tmp_path, two):
    cache, _, _ = filled(two)
    target = tmp_path / "no" / "such" / "cache.pkvf"
    with pytest.raises(SaveFileError, match=r"cannot save to .*cache\.pkvf: the folder .*such does not exist") as ei:
        cache.save(target)
    assert ".tmp" not in str(ei.value)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            return   # root writes anywhere: nothing more to check here
        with pytest.raises(SaveFileError, match=r"cannot save to .*ro/cache\.pkvf: Permission denied") as ei:
            cache.save(tmp_path / "ro" / "cache.pkvf")
        assert ".tmp" not in str(ei.value)
    finally:
        os.chmod(tmp_path / "ro", 0o700)
