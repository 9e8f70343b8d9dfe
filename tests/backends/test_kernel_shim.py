"""The CUDA kernels' arithmetic, compiled for the CPU (kernels/host_shim.cpp), against
`cryptography`, the NIST CAVP AES-GCM-256 vectors and the envelope v1 layout."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pqc_kv_cache.audit.records import RECORD_DTYPE
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag
from pqc_kv_cache.errors import DecryptionError

from pqc_kv_cache.backends import kernel_abi as abi  # noqa: E402

kh = pytest.importorskip("pqc_kv_cache.backends.kernel_shim")
if not kh.available():  # pragma: no cover - machines without a C++ compiler
    pytest.skip("no C++ compiler for the kernel host shim", allow_module_level=True)

RNG = random.Random(0x5EED)


def rbytes(n: int) -> bytes:
    return RNG.randbytes(n)


# ------------------------------------------------------------------ primitives

def test_sbox_matches_fips197_anchor_values():
    # FIPS-197 figure 7: S(0x00)=0x63, S(0x01)=0x7c, S(0x53)=0xed, S(0xff)=0x16
    assert [kh.sbox(x) for x in (0x00, 0x01, 0x53, 0xFF)] == [0x63, 0x7C, 0xED, 0x16]
    assert sorted(kh.sbox(x) for x in range(256)) == list(range(256))


def test_aes256_block_matches_cryptography_ecb():
    for _ in range(200):
        key, block = rbytes(32), rbytes(16)
        ref = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)
        assert kh.aes256_encrypt_block(key, block) == ref


def _gf_mul_ref(a: bytes, b: bytes) -> bytes:
    """SP 800-38D algorithm 1, on Python ints (independent of the C code)."""
    x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z.to_bytes(16, "big")


@pytest.mark.parametrize("method", ["bitwise", "table", "shoup"])
def test_gf_mul_methods_match_reference(method):
    one = bytes([0x80]) + bytes(15)
    for _ in range(100):
        a, b = rbytes(16), rbytes(16)
        assert kh.gf_mul(a, b, method=method) == _gf_mul_ref(a, b)
    # the low bits, where the reduction happens
    low = bytes(15) + bytes([0x0F])
    assert kh.gf_mul(low, low, method=method) == _gf_mul_ref(low, low)
    a = rbytes(16)
    assert kh.gf_mul(a, one, method=method) == a
    with pytest.raises(ValueError):
        kh.gf_mul(a, one, method="karatsuba")


def test_ct_equal_rejects_every_single_bit_flip_of_a_tag():
    tag = rbytes(16)
    assert kh.ct_equal(tag, tag)
    for bit in range(128):
        flipped = bytearray(tag)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not kh.ct_equal(tag, bytes(flipped)), bit


def test_gcm_decrypt_rejects_every_single_bit_flip_of_the_tag():
    key, nonce, aad, pt = rbytes(32), rbytes(12), rbytes(80), rbytes(100)
    sealed = kh.gcm_encrypt(key, nonce, aad, pt)
    assert kh.gcm_decrypt(key, nonce, aad, sealed) == pt
    n = len(sealed) - 16
    variants = []
    for bit in range(128):
        b = bytearray(sealed)
        b[n + bit // 8] ^= 1 << (bit % 8)
        variants.append(bytes(b))
    pts, status = kh.gcm_open_many([key] * 128, [nonce] * 128, [aad] * 128, variants)
    assert status.tolist() == [1] * 128
    assert all(p == bytes(n) for p in pts)  # failed plaintext is zeroed
    with pytest.raises(DecryptionError):
        kh.gcm_decrypt(key, nonce, aad, variants[77])


def test_aad_v1_bytes_match_envelope():
    for _ in range(50):
        tid, sid = f"tenant-{RNG.randrange(1000)}", f"sess-{RNG.randrange(1000)}"
        f = dict(epoch=RNG.randrange(2**32), layer=RNG.randrange(2**32), pos_start=RNG.randrange(2**64),
                 pos_count=RNG.randrange(1, 2**32), key_len=RNG.randrange(2**32),
                 num_heads=RNG.randrange(2**32), head_dim=RNG.randrange(2**32))
        dtype = RNG.choice(["", "bfloat16", "float16", "float32"])
        ref = build_aad(tenant_id=tid, session_id=sid, epoch=f["epoch"], layer_idx=f["layer"],
                        position=f["pos_start"], position_count=f["pos_count"], key_len=f["key_len"],
                        dtype=dtype, num_heads=f["num_heads"], head_dim=f["head_dim"])
        got = kh.build_aad_v1(tenant_tag=tenant_tag(tid), session_tag=session_tag(sid), dtype=dtype, **f)
        assert got == ref


# ------------------------------------------------------------------ GCM against cryptography

def _v1_aad() -> bytes:
    return build_aad(tenant_id="t", session_id="s", epoch=RNG.randrange(2**32), layer_idx=RNG.randrange(80),
                     position=RNG.randrange(2**40), position_count=RNG.randrange(1, 64),
                     key_len=RNG.randrange(2**20), dtype="bfloat16", num_heads=8, head_dim=128)


def test_every_length_0_to_4096_matches_aesgcm_with_aad_v1():
    n = 4097
    keys = [rbytes(32) for _ in range(n)]
    nonces = [rbytes(12) for _ in range(n)]
    aads = [_v1_aad() for _ in range(n)]
    pts = [rbytes(i) for i in range(n)]
    sealed = kh.gcm_seal_many(keys, nonces, aads, pts)
    for i in range(n):
        assert sealed[i] == AESGCM(keys[i]).encrypt(nonces[i], pts[i], aads[i]), i
    opened, status = kh.gcm_open_many(keys, nonces, aads, sealed)
    assert not status.any()
    assert opened == pts


@pytest.mark.parametrize("lanes", [1, 2, 7, 33, 255])
def test_lane_counts_give_the_same_ghash(lanes):
    lens = [0, 1, 15, 16, 17, 80, 96, 255, 1000, 4096, 4111]
    keys = [rbytes(32) for _ in lens]
    nonces = [rbytes(12) for _ in lens]
    aads = [rbytes(RNG.choice([0, 1, 13, 16, 80, 200])) for _ in lens]
    pts = [rbytes(n) for n in lens]
    sealed = kh.gcm_seal_many(keys, nonces, aads, pts, lanes=lanes)
    for k, nc, a, p, s in zip(keys, nonces, aads, pts, sealed):
        assert s == AESGCM(k).encrypt(nc, p, a)
    opened, status = kh.gcm_open_many(keys, nonces, aads, sealed, lanes=lanes)
    assert not status.any() and opened == pts


# ------------------------------------------------------------------ NIST CAVP

def _cavp_dir() -> Path:
    try:
        import cryptography_vectors
    except ImportError:
        pytest.skip("cryptography-vectors not installed")
    return Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "GCM"


def _parse_rsp(path: Path):
    """Vectors of a CAVP .rsp file as dicts with the section's IVlen / Taglen."""
    section: dict = {}
    cur: dict | None = None
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and "=" in line:
            k, v = line[1:-1].split("=")
            section[k.strip()] = int(v)
            continue
        if line.startswith("Count"):
            cur = dict(section)
            out.append(cur)
            continue
        if cur is None:
            continue
        if line == "FAIL":
            cur["FAIL"] = True
        elif "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            cur[k] = bytes.fromhex(v)
    return out


def _ok_vector(v) -> bool:
    return v["Keylen"] == 256 and v["IVlen"] == 96 and 32 <= v["Taglen"] <= 128


def test_cavp_gcm_encrypt_256_96bit_iv():
    vecs = [v for v in _parse_rsp(_cavp_dir() / "gcmEncryptExtIV256.rsp") if _ok_vector(v)]
    assert len(vecs) > 1000
    sealed = kh.gcm_seal_many([v["Key"] for v in vecs], [v["IV"] for v in vecs], [v["AAD"] for v in vecs],
                              [v["PT"] for v in vecs])
    for v, s in zip(vecs, sealed):
        tl = v["Taglen"] // 8
        assert s[:-16] == v["CT"]
        assert s[-16:][:tl] == v["Tag"]


def test_cavp_gcm_decrypt_256_96bit_iv_including_fail_cases():
    vecs = [v for v in _parse_rsp(_cavp_dir() / "gcmDecrypt256.rsp") if _ok_vector(v)]
    fails = sum(1 for v in vecs if v.get("FAIL"))
    assert len(vecs) > 1000 and fails > 100
    for tl in sorted({v["Taglen"] for v in vecs}):
        group = [v for v in vecs if v["Taglen"] == tl]
        pts, status = kh.gcm_open_many([v["Key"] for v in group], [v["IV"] for v in group],
                                       [v["AAD"] for v in group], [v["CT"] + v["Tag"] for v in group],
                                       tag_len=tl // 8)
        for v, p, stat in zip(group, pts, status):
            if v.get("FAIL"):
                assert stat == 1 and p == bytes(len(v["CT"]))
            else:
                assert stat == 0 and p == v["PT"]


# ------------------------------------------------------------------ batched chunk entry points

def _slots(n=2):
    out = []
    for i in range(n):
        out.append(KeySlot(key=rbytes(32), tenant_tag=tenant_tag(f"tenant-{i}"),
                           session_tag=session_tag(f"session-{i}"), epoch=3 + i))
    return out


def _table(entries, bpp):
    """entries: (slot, row, pos_start, pos_count, io_start, counter); offsets packed with tags."""
    cols = list(zip(*entries))
    pc = np.array(cols[3], dtype=np.int64)
    size = pc * bpp + 16
    offset = np.zeros(len(entries), dtype=np.int64)
    offset[1:] = np.cumsum(size)[:-1]
    t = ChunkTable(*(np.array(c, dtype=np.int64) for c in cols), offset)
    return t, int(size.sum())


def _chunk_plain(k, v, row, io, n):
    kk = k[row, :, io:io + n, :].contiguous().view(torch.uint8).numpy().tobytes()
    vv = v[row, :, io:io + n, :].contiguous().view(torch.uint8).numpy().tobytes()
    return kk + vv


LAYOUT = ChunkLayout(layer_idx=5, num_heads=2, head_dim=8, dtype=torch.bfloat16)
ENTRIES = [  # slot, row, pos_start, pos_count, io_start, counter
    (0, 0, 100, 1, 0, 7), (0, 0, 101, 3, 1, 8), (1, 1, 40, 4, 0, 1 << 40),
    (1, 2, 0, 1, 9, 2), (0, 0, 104, 6, 4, 9),
]


def _kv(seq=10, batch=3):
    g = torch.Generator().manual_seed(1)
    # a non-contiguous source: [batch, seq, heads, dim] storage seen as [batch, heads, seq, dim]
    k = torch.randn(batch, seq, 2, 8, generator=g).to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(batch, 2, seq, 8, generator=g).to(torch.bfloat16)
    return k, v


def _open_with_aesgcm(keys, chunks, arena, i):
    ks = keys[int(chunks.slot[i])]
    nb = int(chunks.pos_count[i]) * LAYOUT.bytes_per_position
    off = int(chunks.offset[i])
    aad = build_aad(tenant_id=f"tenant-{int(chunks.slot[i])}", session_id=f"session-{int(chunks.slot[i])}",
                    epoch=ks.epoch, layer_idx=LAYOUT.layer_idx, position=int(chunks.pos_start[i]),
                    position_count=int(chunks.pos_count[i]), key_len=nb // 2, dtype="bfloat16",
                    num_heads=LAYOUT.num_heads, head_dim=LAYOUT.head_dim)
    nonce = make_nonce(ks.epoch, int(chunks.counter[i]))
    return AESGCM(ks.key).decrypt(nonce, arena[off:off + nb + 16].numpy().tobytes(), aad)


def test_shim_sealed_chunks_open_with_plain_aesgcm_and_records_are_right():
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    arena = torch.zeros(size, dtype=torch.uint8)
    recs = kh.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, tenant_idx=[10, 11], session_idx=[20, 21],
                             record_first_no=1000)
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        assert _open_with_aesgcm(keys, chunks, arena, i) == _chunk_plain(k, v, row, io, pc)
    r = recs.view(RECORD_DTYPE).reshape(-1)
    assert len(r) == sum(e[3] for e in ENTRIES)
    assert r["record_no"].tolist() == list(range(1000, 1000 + len(r)))
    exp = [(slot, row, ps + p, ctr) for (slot, row, ps, pc, io, ctr) in ENTRIES for p in range(pc)]
    assert r["op"].tolist() == [1] * len(r) and not r["status"].any()
    assert r["pos_start"].tolist() == [e[2] for e in exp]
    assert r["pos_count"].tolist() == [1] * len(r)
    assert r["row"].tolist() == [e[1] for e in exp]
    assert r["nonce_counter"].tolist() == [e[3] for e in exp]
    assert r["tenant_idx"].tolist() == [10 + e[0] for e in exp]
    assert r["session_idx"].tolist() == [20 + e[0] for e in exp]
    assert r["epoch"].tolist() == [3 + e[0] for e in exp]
    assert r["layer"].tolist() == [5] * len(r)
    assert r["nbytes"].tolist() == [LAYOUT.bytes_per_position] * len(r)
    assert not r["host_ts_ns"].any() and not r["flags"].any()


def _seal_with_aesgcm(keys, chunks, k, v, size):
    arena = bytearray(size)
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        ks = keys[slot]
        nb = pc * LAYOUT.bytes_per_position
        aad = build_aad(tenant_id=f"tenant-{slot}", session_id=f"session-{slot}", epoch=ks.epoch,
                        layer_idx=LAYOUT.layer_idx, position=ps, position_count=pc, key_len=nb // 2,
                        dtype="bfloat16", num_heads=2, head_dim=8)
        ct = AESGCM(ks.key).encrypt(make_nonce(ks.epoch, ctr), _chunk_plain(k, v, row, io, pc), aad)
        off = int(chunks.offset[i])
        arena[off:off + len(ct)] = ct
    return torch.frombuffer(arena, dtype=torch.uint8).clone()


def test_aesgcm_sealed_chunks_open_through_the_shim_into_bhsd_layout():
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    arena = _seal_with_aesgcm(keys, chunks, k, v, size)
    k_out = torch.full((3, 2, 10, 8), 7.0, dtype=torch.bfloat16)
    v_out = torch.full((3, 2, 10, 8), 7.0, dtype=torch.bfloat16)
    status, rows, fails, nfail = kh.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out,
                                                   tenant_idx=[1, 2], session_idx=[3, 4], record_first_no=50)
    assert not status.any() and nfail == 0 and len(fails) == 0
    for (slot, row, ps, pc, io, ctr) in ENTRIES:
        assert torch.equal(k_out[row, :, io:io + pc], k[row, :, io:io + pc])
        assert torch.equal(v_out[row, :, io:io + pc], v[row, :, io:io + pc])
    r = rows.view(RECORD_DTYPE).reshape(-1)
    assert r["row"].tolist() == [0, 1, 2]
    assert r["record_no"].tolist() == [50, 51, 52]
    assert r["pos_start"].tolist() == [100, 40, 0]
    assert r["pos_count"].tolist() == [10, 4, 1]
    assert r["nonce_counter"].tolist() == [7, 1 << 40, 2]
    assert r["tenant_idx"].tolist() == [1, 2, 2]
    assert r["nbytes"].tolist() == [10 * 64, 4 * 64, 64]
    assert r["op"].tolist() == [2, 2, 2] and not r["status"].any()


def test_tampered_chunk_is_zeroed_and_reported_with_exact_positions():
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    arena = torch.zeros(size, dtype=torch.uint8)
    kh.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    arena[int(chunks.offset[1]) + 5] ^= 0x40   # chunk 1: row 0, positions 101..103
    k_out = torch.full((3, 2, 10, 8), 7.0, dtype=torch.bfloat16)
    v_out = torch.full((3, 2, 10, 8), 7.0, dtype=torch.bfloat16)
    tag = (1 << 40) + 9    # the call's 64-bit tag: beyond 16 bits, so tags never wrap
    status, rows, fails, nfail = kh.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, call_tag=tag)
    assert status.tolist() == [0, 1, 0, 0, 0]
    assert not k_out[0, :, 1:4].any() and not v_out[0, :, 1:4].any()
    assert torch.equal(k_out[0, :, 0:1], k[0, :, 0:1]) and torch.equal(k_out[0, :, 4:10], k[0, :, 4:10])
    r = rows.view(RECORD_DTYPE).reshape(-1)
    assert r["status"].tolist() == [1, 0, 0]     # row 0 failed, rows 1, 2 OK
    assert nfail == 1
    f = fails.view(RECORD_DTYPE).reshape(-1)
    assert (f["op"][0], f["status"][0], f["row"][0], f["pos_start"][0], f["pos_count"][0]) == (2, 1, 0, 101, 3)
    assert f["nonce_counter"][0] == 8 and f["record_no"][0] == tag and f["flags"][0] == 0 and f["layer"][0] == 5


def test_chunk_moved_to_other_layer_fails_tag():
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    arena = torch.zeros(size, dtype=torch.uint8)
    kh.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    other = ChunkLayout(layer_idx=6, num_heads=2, head_dim=8, dtype=torch.bfloat16)
    k_out, v_out = torch.zeros(3, 2, 10, 8, dtype=torch.bfloat16), torch.zeros(3, 2, 10, 8, dtype=torch.bfloat16)
    status, _, _, nfail = kh.decrypt_chunks(keys, other, chunks, arena, k_out, v_out)
    assert status.tolist() == [1] * 5 and nfail == 5


def test_failure_queue_counts_past_its_capacity():
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    arena = torch.zeros(size, dtype=torch.uint8)  # nothing sealed: every tag fails
    k_out, v_out = torch.zeros(3, 2, 10, 8, dtype=torch.bfloat16), torch.zeros(3, 2, 10, 8, dtype=torch.bfloat16)
    status, _, fails, nfail = kh.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, failure_capacity=2)
    assert nfail == 5 and len(fails) == 2 and status.all()


# ------------------------------------------------------------------ bad input

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError):
        kh.gcm_encrypt(b"short", bytes(12), b"", b"x")
    with pytest.raises(ValueError):
        kh.gcm_encrypt(bytes(32), bytes(11), b"", b"x")
    with pytest.raises(TypeError):
        kh.gcm_encrypt(bytes(32), bytes(12), "aad", b"x")
    with pytest.raises(ValueError):
        kh.gcm_encrypt(bytes(32), bytes(12), b"", b"x", lanes=0)
    with pytest.raises(DecryptionError):
        kh.gcm_decrypt(bytes(32), bytes(12), b"", b"too short")
    keys = _slots()
    k, v = _kv()
    chunks, size = _table(ENTRIES, LAYOUT.bytes_per_position)
    with pytest.raises(ValueError):   # arena too small
        kh.encrypt_chunks(keys, LAYOUT, chunks, k, v, torch.zeros(size - 1, dtype=torch.uint8))
    with pytest.raises(ValueError):   # wrong dtype
        kh.encrypt_chunks(keys, LAYOUT, chunks, k.float(), v.float(), torch.zeros(size, dtype=torch.uint8))
    with pytest.raises(ValueError):   # slot out of range
        kh.encrypt_chunks(keys[:1], LAYOUT, chunks, k, v, torch.zeros(size, dtype=torch.uint8))
    with pytest.raises(TypeError):
        kh.encrypt_chunks(keys, LAYOUT, chunks, k, v, np.zeros(size, dtype=np.uint8))


def test_shim_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("PQC_KV_CACHE_DIR", str(tmp_path))
    first = kh._build()
    assert first.parent == tmp_path and first.is_file()
    assert kh._build() == first


def test_kernel_sources_are_found_as_package_data_of_an_installed_layout(tmp_path):
    """The wheel layout (pyproject maps kernels/ to pqc_kv_cache/kernels, no __init__.py)."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    shutil.copytree(repo / "pqc_kv_cache", tmp_path / "pqc_kv_cache",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "kernels", tmp_path / "pqc_kv_cache" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from pqc_kv_cache.backends.kernel_abi import kernel_sources_dir; "
            "from pqc_kv_cache.backends.cuda import kernel_source; "
            "print(kernel_sources_dir()); kernel_source()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "pqc_kv_cache" / "kernels")


# ------------------------------------------------------------------ properties

@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), nonce=st.binary(min_size=12, max_size=12),
       aad=st.binary(max_size=300), pt=st.binary(max_size=3000), lanes=st.integers(1, 256))
def test_property_any_message_any_lane_count_matches_aesgcm(key, nonce, aad, pt, lanes):
    sealed = kh.gcm_encrypt(key, nonce, aad, pt, lanes=lanes)
    assert sealed == AESGCM(key).encrypt(nonce, pt, aad)
    assert kh.gcm_decrypt(key, nonce, aad, sealed, lanes=lanes) == pt


@settings(max_examples=100, deadline=None)
@given(tid=st.text(min_size=1, max_size=40), sid=st.text(min_size=1, max_size=40),
       epoch=st.integers(0, 2**32 - 1), layer=st.integers(0, 2**32 - 1), pos=st.integers(0, 2**64 - 1),
       count=st.integers(1, 2**32 - 1), key_len=st.integers(0, 2**32 - 1), heads=st.integers(0, 2**32 - 1),
       dim=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["", "bfloat16", "float16", "float32", "int8"]))
def test_property_kernel_aad_equals_envelope_aad(tid, sid, epoch, layer, pos, count, key_len, heads, dim, dtype):
    ref = build_aad(tenant_id=tid, session_id=sid, epoch=epoch, layer_idx=layer, position=pos,
                    position_count=count, key_len=key_len, dtype=dtype, num_heads=heads, head_dim=dim)
    got = kh.build_aad_v1(tenant_tag=tenant_tag(tid), session_tag=session_tag(sid), epoch=epoch, layer=layer,
                          pos_start=pos, pos_count=count, key_len=key_len, dtype=dtype, num_heads=heads,
                          head_dim=dim)
    assert got == ref


# ------------------------------------------------------------------ work items (chunks cut across CTAs)

BIG = ChunkLayout(layer_idx=2, num_heads=8, head_dim=128, dtype=torch.bfloat16)   # 4096 B per position


def _one_chunk(pc: int, layout=BIG, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, layout.num_heads, pc, layout.head_dim, generator=g).to(layout.dtype)
    v = torch.randn(1, layout.num_heads, pc, layout.head_dim, generator=g).to(layout.dtype)
    chunks = ChunkTable(*(np.array([x], dtype=np.int64) for x in (0, 0, 17, pc, 0, 1 << 35, 0)))
    nb = pc * layout.bytes_per_position
    aad = build_aad(tenant_id="tenant-0", session_id="session-0", epoch=3, layer_idx=layout.layer_idx,
                    position=17, position_count=pc, key_len=nb // 2, dtype=layout.dtype,
                    num_heads=layout.num_heads, head_dim=layout.head_dim)
    plain = k[0].contiguous().view(torch.uint8).numpy().tobytes() + v[0].contiguous().view(torch.uint8).numpy().tobytes()
    return k, v, chunks, nb, aad, plain


def _split_round_trip(pc: int, rounds_per_item: int, order: int, lanes: int = abi.LANES, layout=BIG):
    keys = _slots()[:1]
    k, v, chunks, nb, aad, plain = _one_chunk(pc, layout)
    ref = AESGCM(keys[0].key).encrypt(make_nonce(3, 1 << 35), plain, aad)
    arena = torch.zeros(nb + 16, dtype=torch.uint8)
    kh.encrypt_chunks(keys, layout, chunks, k, v, arena, lanes=lanes, rounds_per_item=rounds_per_item, order=order)
    assert arena.numpy().tobytes() == ref, (pc, rounds_per_item, order)
    k_out, v_out = torch.zeros_like(k), torch.zeros_like(v)
    status, _, _, nfail = kh.decrypt_chunks(keys, layout, chunks, torch.frombuffer(bytearray(ref), dtype=torch.uint8),
                                            k_out, v_out, lanes=lanes, rounds_per_item=rounds_per_item,
                                            order=order)
    assert not status.any() and nfail == 0
    assert torch.equal(k_out, k) and torch.equal(v_out, v)


@pytest.mark.parametrize("pc", [1, 2, 63, 64])
def test_split_chunks_seal_to_aesgcm_bytes_and_open_aesgcm_chunks_at_every_cut(pc):
    """Every item size from one round to the whole chunk: cuts at every round boundary."""
    rounds = int(abi.chunk_rounds(np.array([pc * BIG.bytes_per_position]))[0])
    assert rounds == pc + 1   # 4096 B per position: 256 blocks a position, plus 6 AAD/length blocks
    for b in range(1, rounds + 1):
        _split_round_trip(pc, b, order=b % 3)


@pytest.mark.parametrize("rounds_per_item", [1, 7, 64, 4097])
def test_split_4096_position_chunk_matches_aesgcm(rounds_per_item):
    _split_round_trip(4096, rounds_per_item, order=rounds_per_item % 3)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_split_boundaries_at_every_position_with_one_position_rounds(order):
    """With 4 lanes and 64-byte positions a round is one position: a cut after every position."""
    small = ChunkLayout(layer_idx=1, num_heads=1, head_dim=8, dtype=torch.float32)
    for pc in (1, 2, 5, 63, 64):
        for b in (1, 2, 3):
            _split_round_trip(pc, b, order, lanes=4, layout=small)


def test_work_items_cover_each_chunk_once_and_share_out_its_records():
    rounds = np.array([2, 4097, 65, 1, 300], dtype=np.int64)
    pos = np.array([1, 4096, 64, 1, 299], dtype=np.int64)
    for slots in (1, 4, 132 * 4, 10**6):
        for limit in (100, None):
            it = abi.work_items(rounds, pos, slots=slots, record_limit=limit)
            forced = (lambda c: -(-pos[c] // limit)) if limit else (lambda c: 1)
            for c in range(len(rounds)):
                mine = it[:, it[0] == c]
                k = mine.shape[1]
                assert (mine[7] == k).all() and mine[6].tolist() == list(range(k)) and (mine[5] == mine[5][0]).all()
                assert mine[1][0] == 0 and mine[2][-1] == rounds[c] and (mine[1][1:] == mine[2][:-1]).all()
                assert mine[3][0] == 0 and mine[4][-1] == pos[c] and (mine[3][1:] == mine[4][:-1]).all()
                if limit:
                    assert (mine[4] - mine[3]).max() <= limit
                # no item is cut shorter than MIN_ITEM_ROUNDS unless the record limit asks for the cut
                assert k == 1 or (mine[2] - mine[1]).min() >= abi.MIN_ITEM_ROUNDS or k == forced(c)
                if rounds[c] * slots < rounds.sum() and forced(c) == 1:
                    assert k == 1          # a chunk shorter than an even share stays one item
            assert it[5].tolist() == [int(np.flatnonzero(it[0] == c)[0]) for c in it[0]]
            if limit is None and len(rounds) < slots:
                assert it.shape[1] <= slots    # fewer chunks than slots: one wave
    # 8 chunks of 4097 rounds on 528 slots: exactly one item per slot (an even cut made 536: a second wave)
    it = abi.work_items(np.full(8, 4097), np.full(8, 4096), slots=528)
    assert it.shape[1] == 528


def test_tampered_byte_anywhere_in_a_split_chunk_zeroes_that_chunk_only():
    small = ChunkLayout(layer_idx=4, num_heads=2, head_dim=8, dtype=torch.bfloat16)   # 64 B per position
    keys = _slots()
    entries = [(0, 0, 0, 40, 0, 5), (1, 1, 0, 40, 0, 6), (0, 2, 0, 40, 0, 7)]
    chunks, size = _table(entries, small.bytes_per_position)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(3, 2, 40, 8, generator=g).to(torch.bfloat16)
    v = torch.randn(3, 2, 40, 8, generator=g).to(torch.bfloat16)
    sealed = torch.zeros(size, dtype=torch.uint8)
    kh.encrypt_chunks(keys, small, chunks, k, v, sealed, lanes=8, rounds_per_item=3)
    nb = 40 * small.bytes_per_position
    off = int(chunks.offset[1])
    for where in (0, 17, nb // 2, nb - 1, nb, nb + 15):       # ciphertext start, middle, end; tag
        for order in (0, 1, 2):
            arena = sealed.clone()
            arena[off + where] ^= 0x01
            k_out, v_out = torch.full_like(k, 3.0), torch.full_like(v, 3.0)
            status, rows, fails, nfail = kh.decrypt_chunks(keys, small, chunks, arena, k_out, v_out, lanes=8,
                                                           rounds_per_item=3, order=order, call_tag=4)
            assert status.tolist() == [0, 1, 0], (where, order)
            assert not k_out[1].any() and not v_out[1].any()
            for r in (0, 2):
                assert torch.equal(k_out[r], k[r]) and torch.equal(v_out[r], v[r])
            rr = rows.view(RECORD_DTYPE).reshape(-1)
            assert rr["status"].tolist() == [0, 1, 0]
            f = fails.view(RECORD_DTYPE).reshape(-1)
            assert nfail == 1 and (f["row"][0], f["pos_start"][0], f["pos_count"][0], f["status"][0]) == (1, 0, 40, 1)
            assert f["nonce_counter"][0] == 6 and f["record_no"][0] == 4 and f["flags"][0] == 0


def test_item_multiplier_is_the_power_of_h_to_the_lanes():
    """The window table's (H^L)^e equals repeated multiplication, for e across every window."""
    key = rbytes(32)
    h = kh.aes256_encrypt_block(key, bytes(16))
    hl = h
    for _ in range(3):                     # H^4 (lanes = 4)
        hl = _gf_mul_ref(hl, h)
    def power(x, e):   # square and multiply with the independent reference multiply
        r = (1 << 127).to_bytes(16, "big")
        while e:
            if e & 1:
                r = _gf_mul_ref(r, x)
            x = _gf_mul_ref(x, x)
            e >>= 1
        return r

    assert power(hl, 3) == _gf_mul_ref(_gf_mul_ref(hl, hl), hl)
    for e in (0, 1, 15, 16, 255, 4097, 0x12345678, 0xFFFFFFFF):
        assert kh.item_multiplier(key, e, lanes=4) == power(hl, e), e


def test_chunk_addresses_are_64_bit():
    """A chunk of more than 4 GiB: the kernels' block addresses past 4 GiB are exact."""
    row_bytes, heads, pc = 256, 8, (1 << 20) + 5           # K half = 2 GiB + 10 KiB; the V half ends past 4 GiB
    half = row_bytes * heads * pc
    strides = (1 << 40, 1 << 33, 4096)                    # batch, head, seq byte strides
    for j in (0, 1, half // 16 - 1, half // 16, half // 16 + 12345, 2 * half // 16 - 1):
        b = 16 * j
        is_v = b >= half
        b -= half if is_v else 0
        h, rem = divmod(b, row_bytes * pc)
        pos, off = divmod(rem, row_bytes)
        want = 3 * strides[0] + h * strides[1] + (7 + pos) * strides[2] + off
        assert kh.kv_block_offset(row_bytes=row_bytes, pos_count=pc, num_heads=heads, strides=strides, row=3,
                                  io_start=7, block=j) == (want, is_v), j


def test_chunk_size_limits_are_the_aad_field_and_the_gcm_counter_space():
    abi.check_gcm_length(16 * (2**32 - 2))
    with pytest.raises(ValueError, match="2\\^32 - 2 blocks"):
        abi.check_gcm_length(16 * (2**32 - 2) + 1)
    # K length 2^32 - 1 bytes is the most the AAD's key_len field holds
    lay = ChunkLayout(layer_idx=0, num_heads=1, head_dim=8, dtype=torch.float32)   # 32 B of K per position
    n_ok, n_bad = (2**32 - 1) // 32, (2**32 - 1) // 32 + 1
    k = torch.zeros(1, 1, 1, 8).expand(1, 1, n_bad, 8)
    for pc, ok in ((n_ok, True), (n_bad, False)):
        table = abi.chunk_table_array(ChunkTable(*(np.array([x], dtype=np.int64) for x in (0, 0, 0, pc, 0, 0, 0))))
        arena = torch.empty(0, dtype=torch.uint8)
        with pytest.raises(ValueError, match="arena" if ok else "key_len"):
            abi.check_bounds(table, lay, k, k, arena, 1)
