"""The CUDA kernels' arithmetic on the CPU: kernels/host_shim.cpp built with g++, loaded with ctypes.

The shim compiles the same ``__host__ __device__`` primitives as the CUDA
kernels (``kernels/pqc_gcm.cuh``) and walks chunks and GHASH lanes with the
kernels' own indexing, so this module is how the kernel math is tested on a
machine without a GPU. It is not the host backend (that one uses OpenSSL
through ``cryptography``); it is a test and reference path.

Build: ``g++ -O2 -shared -fPIC`` (``$CXX`` if set) into a per-user cache
directory (``$PQC_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqc_kv_cache``, else
``~/.cache/pqc_kv_cache``), named by a hash of the sources and flags, so a
changed source is rebuilt and a stale library is never loaded. No compiler, or
a failed build, raises :class:`BackendUnavailableError`.

Public API (bytes in, bytes out; a bad tag raises :class:`DecryptionError`):

- ``gcm_encrypt(key, nonce, aad, plaintext, *, lanes=256) -> ciphertext || tag``
- ``gcm_decrypt(key, nonce, aad, ciphertext_with_tag, *, tag_len=16, lanes=256) -> plaintext``
- ``gcm_seal_many(keys, nonces, aads, plaintexts, *, lanes=256) -> list[bytes]``
- ``gcm_open_many(keys, nonces, aads, ciphertexts, *, tag_len=16, lanes=256) -> (list[bytes], status)``
  (status: uint8 array, 0 OK, 1 AUTH_FAILED; failed plaintexts are zeroed)
- ``aes256_encrypt_block(key, block)``, ``gf_mul(a, b, *, method="bitwise")``, ``ct_equal(a, b)``,
  ``sbox(x)``, ``build_aad_v1(...)``: the single primitives
- ``prepare_keys(keys, *, lanes=256)``: the per-key schedules the chunk entry points take
- ``encrypt_chunks(...)`` / ``decrypt_chunks(...)``: the kernels' batched chunk work (see
  their docstrings); ``chunk_table_array``, ``encrypt_record_index``, ``row_descriptors``,
  ``slot_meta_array``, ``chunk_rounds``, ``work_items``: the device-table builders the CUDA
  backend shares (``work_items`` is the one place chunks are cut into work items).
- ``kernel_sources_dir()``: where the kernel sources are (the installed package data
  ``pqc_kv_cache.kernels``, else the repository's ``kernels/``).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..envelope import AAD_SIZE, NONCE_SIZE, TAG_SIZE, dtype_code
from ..errors import BackendUnavailableError, DecryptionError

__all__ = [
    "LANES", "RECORD_SIZE", "kernel_sources_dir", "load", "available",
    "gcm_encrypt", "gcm_decrypt", "gcm_seal_many", "gcm_open_many",
    "aes256_encrypt_block", "gf_mul", "ct_equal", "sbox", "build_aad_v1",
    "prepare_keys", "slot_meta_array", "chunk_table_array", "encrypt_record_index",
    "row_descriptors", "chunk_rounds", "work_items", "check_gcm_length", "item_multiplier",
    "kv_block_offset", "encrypt_chunks", "decrypt_chunks",
]

LANES = 256            # threads per CTA of the chunk kernels = GHASH lanes
RECORD_SIZE = 64
SLOT_META_SIZE = 48
SCHED_SIZE = 73984     # sizeof(pqc_key_sched): round keys, 256 H powers, 128 H^L x^k, 256 lane tables,
                       # 8 x 16 item-multiplier windows
TABLE_COLS = 8         # slot,row,pos_start,pos_count,io_start,counter,offset,aux
ROWDESC_COLS = 6       # row,pos_start,pos_count,counter,slot,nbytes
ITEM_COLS = 8          # chunk,r0,r1,p0,p1,first,j,count (PQC_ITEM_* in pqc_gcm.cuh)
PARTIAL_SIZE = 16      # one GF(2^128) partial hash per work item of a split chunk
MIN_ITEM_ROUNDS = 4    # no work item is cut shorter than this many rounds (16 KiB at 256 lanes)
GCM_MAX_BLOCKS = 2**32 - 2   # data blocks of one GCM message with a 96-bit nonce (SP 800-38D 5.2.1.1)
AAD_BLOCKS = (AAD_SIZE + 15) // 16
_SOURCES = ("host_shim.cpp", "pqc_gcm.cuh", "pqc_audit_record.h")
_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17")
_ABI = 2

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def kernel_sources_dir() -> Path:
    """Directory holding pqc_gcm.cuh, pqc_kernels.cu, host_shim.cpp and pqc_audit_record.h."""
    try:
        # a namespace package (kernels/ has no __init__.py): files() may be a MultiplexedPath,
        # whose joined file entries are plain paths
        header = importlib.resources.files("pqc_kv_cache.kernels").joinpath("pqc_gcm.cuh")
        if isinstance(header, Path) and header.is_file():
            return header.parent
    except (ModuleNotFoundError, TypeError):
        pass
    cand = Path(__file__).resolve().parents[2] / "kernels"
    if (cand / "pqc_gcm.cuh").is_file():
        return cand
    raise BackendUnavailableError("kernel sources not found (neither package data pqc_kv_cache.kernels "
                                  f"nor {cand})")


def _cache_dir() -> Path:
    base = os.environ.get("PQC_KV_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pqc_kv_cache"


def _build() -> Path:
    src = kernel_sources_dir()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        raise BackendUnavailableError("no C++ compiler (g++ / $CXX) to build the kernel host shim")
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    h.update(" ".join((cxx,) + _FLAGS).encode())
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"pqc_host_shim-{h.hexdigest()[:20]}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *_FLAGS, f"-I{src}", str(src / "host_shim.cpp"), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendUnavailableError(f"building the kernel host shim failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64
_INT = ctypes.c_int


def _declare(lib: ctypes.CDLL) -> None:
    sig = {
        "pqc_host_abi_version": ([], _INT),
        "pqc_host_sched_size": ([], _I64),
        "pqc_host_slot_meta_size": ([], _I64),
        "pqc_host_record_size": ([], _I64),
        "pqc_host_sbox": ([_U32], _INT),
        "pqc_host_aes256_encrypt_block": ([_P, _P, _P], _INT),
        "pqc_host_gf_mul": ([_P, _P, _P, _INT], _INT),
        "pqc_host_ct_equal": ([_P, _P, _INT], _INT),
        "pqc_host_build_aad_v1": ([_P, _P, _P, _U32, _U32, _U64, _U32, _U32, _U32, _U32, _U32], _INT),
        "pqc_host_prepare_keys": ([_P, _I64, _U32, _P], _INT),
        "pqc_host_gcm_seal_many": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _U32], _INT),
        "pqc_host_gcm_open_many": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT, _P, _U32], _INT),
        # the kernels' parameters (kernels/pqc_kernels.cu), then the item order
        "pqc_host_encrypt_chunks": ([_P, _P, _P, _I64, _P, _I64, _U32, _U32, _U32, _U32, _U32,
                                     _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _U64, _I64,
                                     _P, _P, _U32], _INT),
        "pqc_host_decrypt_row_records": ([_P, _P, _I64, _U32, _U32, _U32, _U32, _U32, _P, _U64], _INT),
        "pqc_host_decrypt_chunks": ([_P, _P, _P, _I64, _P, _I64, _U32, _U32, _U32, _U32, _U32, _P,
                                     _P, _I64, _I64, _I64, _P, _I64, _I64, _I64,
                                     _P, _P, _P, _P, _U32, _U32, _P, _P, _U32], _INT),
        "pqc_host_item_multiplier": ([_P, _U32, _U32, _P], _INT),
        "pqc_host_kv_block_offset": ([_U32, _U64, _U32, _I64, _I64, _I64, _I64, _I64, _U64,
                                      ctypes.POINTER(_INT)], _I64),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


def load() -> ctypes.CDLL:
    """The shim library (built on first use)."""
    global _lib
    with _lock:
        if _lib is None:
            path = _build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise BackendUnavailableError(f"cannot load the kernel host shim {path}: {exc}") from None
            _declare(lib)
            if lib.pqc_host_abi_version() != _ABI or lib.pqc_host_record_size() != RECORD_SIZE \
                    or lib.pqc_host_slot_meta_size() != SLOT_META_SIZE or lib.pqc_host_sched_size() != SCHED_SIZE:
                raise BackendUnavailableError("kernel host shim ABI mismatch")
            _lib = lib
        return _lib


def available() -> bool:
    """True if the shim builds and loads here."""
    try:
        load()
        return True
    except BackendUnavailableError:
        return False


# ---------------------------------------------------------------- helpers

def _bytes(name: str, value, size: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if size is not None and len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _check_rc(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"{what}: invalid arguments (shim returned {rc})")


def _lanes(lanes: int) -> int:
    if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= LANES:
        raise ValueError(f"lanes must be an int in [1, {LANES}], got {lanes!r}")
    return lanes


def _concat(name: str, items: Sequence, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(items) != n:
        raise ValueError(f"{name}: expected {n} items, got {len(items)}")
    bs = [_bytes(f"{name}[{i}]", b) for i, b in enumerate(items)]
    lens = np.fromiter((len(b) for b in bs), dtype=np.int64, count=n)
    offs = np.zeros(n, dtype=np.int64)
    if n:
        offs[1:] = np.cumsum(lens)[:-1]
    buf = np.frombuffer(b"".join(bs) + b"\0", dtype=np.uint8).copy()
    return buf, offs, lens


# ---------------------------------------------------------------- single primitives

def aes256_encrypt_block(key: bytes, block: bytes) -> bytes:
    """AES-256 of one 16-byte block (the kernels' T-table code path)."""
    key, block = _bytes("key", key, 32), _bytes("block", block, 16)
    out = ctypes.create_string_buffer(16)
    _check_rc(load().pqc_host_aes256_encrypt_block(key, block, out), "aes256_encrypt_block")
    return out.raw


def sbox(x: int) -> int:
    """The AES S-box value of byte x, as the kernels compute it."""
    if not isinstance(x, int) or not 0 <= x <= 255:
        raise ValueError(f"x must be a byte, got {x!r}")
    return load().pqc_host_sbox(x)


_GF_METHODS = {"bitwise": 0, "table": 1, "shoup": 2}


def gf_mul(a: bytes, b: bytes, *, method: str = "bitwise") -> bytes:
    """a * b in GF(2^128) (GCM bit order). ``method``: "bitwise" (reference), "table" (the
    512-entry 4-bit table of b: the Horner step), "shoup" (the 16-entry table of b: a lane's
    final multiply)."""
    a, b = _bytes("a", a, 16), _bytes("b", b, 16)
    if method not in _GF_METHODS:
        raise ValueError(f"method must be one of {sorted(_GF_METHODS)}, got {method!r}")
    out = ctypes.create_string_buffer(16)
    _check_rc(load().pqc_host_gf_mul(a, b, out, _GF_METHODS[method]), "gf_mul")
    return out.raw


def ct_equal(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two byte strings of the same length."""
    a, b = _bytes("a", a), _bytes("b", b)
    if len(a) != len(b):
        raise ValueError("ct_equal needs equal lengths")
    return load().pqc_host_ct_equal(a, b, len(a)) == 1


def build_aad_v1(*, tenant_tag: bytes, session_tag: bytes, epoch: int, layer: int, pos_start: int,
                 pos_count: int, key_len: int, dtype: str | torch.dtype = "", num_heads: int = 0,
                 head_dim: int = 0) -> bytes:
    """The AAD v1 bytes as the kernels build them (kv_role "both", token id -1)."""
    tt, st = _bytes("tenant_tag", tenant_tag, 16), _bytes("session_tag", session_tag, 16)
    for name, v, hi in (("epoch", epoch, 2**32 - 1), ("layer", layer, 2**32 - 1), ("pos_start", pos_start, 2**64 - 1),
                        ("pos_count", pos_count, 2**32 - 1), ("key_len", key_len, 2**32 - 1),
                        ("num_heads", num_heads, 2**32 - 1), ("head_dim", head_dim, 2**32 - 1)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
            raise ValueError(f"{name} out of range: {v!r}")
    out = ctypes.create_string_buffer(AAD_SIZE)
    _check_rc(load().pqc_host_build_aad_v1(out, tt, st, epoch, layer, pos_start, pos_count, key_len,
                                           dtype_code(dtype), num_heads, head_dim), "build_aad_v1")
    return out.raw


# ---------------------------------------------------------------- one-shot and batched GCM

def _keys_and_nonces(keys: Sequence[bytes], nonces: Sequence[bytes], n: int, what: str) -> tuple[bytes, bytes]:
    """The n keys (32 bytes each) and nonces (12 bytes each) of a batched call, concatenated and checked."""
    kb = b"".join(_bytes(f"keys[{i}]", k, 32) for i, k in enumerate(keys))
    nb = b"".join(_bytes(f"nonces[{i}]", x, NONCE_SIZE) for i, x in enumerate(nonces))
    if len(kb) != 32 * n or len(nb) != NONCE_SIZE * n:
        raise ValueError(f"keys, nonces and {what} must have the same length")
    return kb, nb


def check_gcm_length(nbytes: int) -> None:
    """Refuse a GCM message (96-bit nonce) longer than its counter space: 2^32 - 2 blocks of 16 bytes."""
    if nbytes > 16 * GCM_MAX_BLOCKS:
        raise ValueError(f"a GCM message holds at most {16 * GCM_MAX_BLOCKS} bytes (2^32 - 2 blocks), "
                         f"got {nbytes}")


def gcm_seal_many(keys: Sequence[bytes], nonces: Sequence[bytes], aads: Sequence[bytes],
                  plaintexts: Sequence[bytes], *, lanes: int = LANES) -> list[bytes]:
    """Seal message i under keys[i], nonces[i] (12 bytes), aads[i]; returns ciphertext || tag each."""
    n = len(plaintexts)
    lanes = _lanes(lanes)
    kb, nb = _keys_and_nonces(keys, nonces, n, "plaintexts")
    abuf, aoff, alen = _concat("aads", aads, n)
    pbuf, poff, plen = _concat("plaintexts", plaintexts, n)
    if n:
        check_gcm_length(int(plen.max()))
    olen = plen + TAG_SIZE
    ooff = np.zeros(n, dtype=np.int64)
    if n:
        ooff[1:] = np.cumsum(olen)[:-1]
    out = np.zeros(int(olen.sum()) + 1, dtype=np.uint8)
    rc = load().pqc_host_gcm_seal_many(n, kb, nb, _ptr(abuf), _ptr(aoff), _ptr(alen), _ptr(pbuf), _ptr(poff),
                                       _ptr(plen), _ptr(out), _ptr(ooff), lanes)
    _check_rc(rc, "gcm_seal_many")
    raw = out.tobytes()
    return [raw[o:o + ln] for o, ln in zip(ooff.tolist(), olen.tolist())]


def gcm_open_many(keys: Sequence[bytes], nonces: Sequence[bytes], aads: Sequence[bytes],
                  ciphertexts: Sequence[bytes], *, tag_len: int = TAG_SIZE,
                  lanes: int = LANES) -> tuple[list[bytes], np.ndarray]:
    """Open message i; returns (plaintexts, status) with status[i] 0 OK / 1 AUTH_FAILED
    (a failed message's plaintext is all zeros). Raises nothing for a bad tag."""
    n = len(ciphertexts)
    lanes = _lanes(lanes)
    if isinstance(tag_len, bool) or not isinstance(tag_len, int) or not 4 <= tag_len <= 16:
        raise ValueError(f"tag_len must be in [4, 16], got {tag_len!r}")
    kb, nb = _keys_and_nonces(keys, nonces, n, "ciphertexts")
    abuf, aoff, alen = _concat("aads", aads, n)
    cbuf, coff, clen = _concat("ciphertexts", ciphertexts, n)
    if n and int(clen.min()) < tag_len:
        raise DecryptionError(f"ciphertext shorter than the {tag_len}-byte tag")
    olen = clen - tag_len
    ooff = np.zeros(n, dtype=np.int64)
    if n:
        ooff[1:] = np.cumsum(olen)[:-1]
    out = np.zeros(int(olen.sum()) + 1, dtype=np.uint8)
    status = np.zeros(n, dtype=np.uint8)
    rc = load().pqc_host_gcm_open_many(n, kb, nb, _ptr(abuf), _ptr(aoff), _ptr(alen), _ptr(cbuf), _ptr(coff),
                                       _ptr(clen), _ptr(out), _ptr(ooff), tag_len, _ptr(status), lanes)
    _check_rc(rc, "gcm_open_many")
    raw = out.tobytes()
    return [raw[o:o + ln] for o, ln in zip(ooff.tolist(), olen.tolist())], status


def gcm_encrypt(key: bytes, nonce: bytes, aad: bytes, plaintext: bytes, *, lanes: int = LANES) -> bytes:
    """AES-256-GCM seal with a 96-bit nonce: ciphertext || 16-byte tag."""
    return gcm_seal_many([key], [nonce], [aad], [plaintext], lanes=lanes)[0]


def gcm_decrypt(key: bytes, nonce: bytes, aad: bytes, ciphertext_with_tag: bytes, *,
                tag_len: int = TAG_SIZE, lanes: int = LANES) -> bytes:
    """AES-256-GCM open; DecryptionError if the tag does not verify."""
    pts, status = gcm_open_many([key], [nonce], [aad], [ciphertext_with_tag], tag_len=tag_len, lanes=lanes)
    if status[0] != 0:
        raise DecryptionError("authentication tag does not verify")
    return pts[0]


# ---------------------------------------------------------------- chunk tables

def prepare_keys(keys: Sequence[bytes], *, lanes: int = LANES) -> np.ndarray:
    """Key schedules (uint8 [n, sched_size]) for the chunk entry points."""
    lanes = _lanes(lanes)
    lib = load()
    kb = b"".join(_bytes(f"keys[{i}]", k, 32) for i, k in enumerate(keys))
    n = len(kb) // 32
    out = np.zeros((n, lib.pqc_host_sched_size()), dtype=np.uint8)
    _check_rc(lib.pqc_host_prepare_keys(kb, n, lanes, _ptr(out)), "prepare_keys")
    return out


def slot_meta_array(keys: Sequence, tenant_idx=None, session_idx=None) -> np.ndarray:
    """pqc_slot_meta rows (uint8 [n, 48]) of KeySlots: tags, epoch, audit indices (0 when not given)."""
    n = len(keys)
    meta = np.zeros((n, SLOT_META_SIZE), dtype=np.uint8)
    ti = np.zeros(n, np.uint32) if tenant_idx is None else np.asarray(tenant_idx, dtype=np.uint32)
    si = np.zeros(n, np.uint32) if session_idx is None else np.asarray(session_idx, dtype=np.uint32)
    if ti.shape != (n,) or si.shape != (n,):
        raise ValueError(f"tenant_idx and session_idx must have one entry per key slot ({n})")
    for i, ks in enumerate(keys):
        meta[i, 0:16] = np.frombuffer(_bytes("tenant_tag", ks.tenant_tag, 16), np.uint8)
        meta[i, 16:32] = np.frombuffer(_bytes("session_tag", ks.session_tag, 16), np.uint8)
        if isinstance(ks.epoch, bool) or not isinstance(ks.epoch, int) or not 0 <= ks.epoch < 2**32:
            raise ValueError(f"key slot {i}: epoch out of range: {ks.epoch!r}")
    words = meta[:, 32:48].view(np.uint32)  # little-endian (x86-64 / GPU native)
    words[:, 0] = np.fromiter((ks.epoch for ks in keys), dtype=np.uint32, count=n)
    words[:, 1] = ti
    words[:, 2] = si
    return meta


def _col(chunks, name: str) -> np.ndarray:
    a = getattr(chunks, name)
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"chunk table column {name} must be on the host here")
        a = a.numpy()
    return np.asarray(a, dtype=np.int64).reshape(-1)


def chunk_table_array(chunks, aux: np.ndarray | None = None) -> np.ndarray:
    """The kernels' chunk table: int64 [8, n] of the ChunkTable's columns plus ``aux``."""
    cols = [_col(chunks, f) for f in ("slot", "row", "pos_start", "pos_count", "io_start", "counter", "offset")]
    n = cols[0].shape[0]
    if any(c.shape[0] != n for c in cols):
        raise ValueError("chunk table columns must all have the same length")
    table = np.empty((TABLE_COLS, n), dtype=np.int64)
    for i, c in enumerate(cols):
        table[i] = c
    table[7] = -1 if aux is None else np.asarray(aux, dtype=np.int64)
    return table


def encrypt_record_index(pos_count: np.ndarray) -> tuple[np.ndarray, int]:
    """(first ENCRYPT record index of each chunk, total records): one record per position."""
    pc = np.asarray(pos_count, dtype=np.int64)
    first = np.zeros(pc.shape[0], dtype=np.int64)
    if pc.shape[0]:
        first[1:] = np.cumsum(pc)[:-1]
    return first, int(pc.sum())


def chunk_rounds(nbytes: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """Rounds of each chunk's lane walk: its GHASH blocks (AAD, data, length) over ``lanes``, rounded up."""
    nb = np.asarray(nbytes, dtype=np.int64)
    return (AAD_BLOCKS + (nb + 15) // 16 + 1 + lanes - 1) // lanes


def work_items(rounds: np.ndarray, pos_count: np.ndarray, *, slots: int | None = None,
               rounds_per_item: int | None = None, record_limit: int | None = None,
               min_rounds: int = MIN_ITEM_ROUNDS) -> np.ndarray:
    """Cut chunks into work items (int64 [ITEM_COLS, n_items]; see PQC_ITEM_* in pqc_gcm.cuh).

    Items hold at most B rounds each, B = ``rounds_per_item`` if given, else
    max(``min_rounds``, total rounds // ``slots``) (no cut without ``slots``), so a
    launch of items fills ``slots`` resident CTAs: with B <= total / slots there are
    at least ``slots`` items. A chunk of at most B rounds is one item. A chunk is
    cut into k = ceil(R / B) items of near-equal round counts (item j: rounds
    [j R // k, (j + 1) R // k)), and into at least ceil(P / ``record_limit``) items so
    that no item writes more ENCRYPT records than one launch may hold; its records
    are shared out the same way (positions [j P // k, (j + 1) P // k)).
    """
    r = np.asarray(rounds, dtype=np.int64).reshape(-1)
    p = np.asarray(pos_count, dtype=np.int64).reshape(-1)
    n = r.shape[0]
    if p.shape[0] != n:
        raise ValueError("rounds and pos_count must have one entry per chunk")
    if rounds_per_item is not None:
        if isinstance(rounds_per_item, bool) or not isinstance(rounds_per_item, int) or rounds_per_item < 1:
            raise ValueError(f"rounds_per_item must be a positive int, got {rounds_per_item!r}")
        b = rounds_per_item
    elif slots is not None and n:
        b = max(int(min_rounds), int(r.sum()) // max(1, int(slots)))
    else:
        b = max(1, int(r.max())) if n else 1
    k = np.maximum(1, -(-r // b))
    if record_limit is not None:
        k = np.maximum(k, -(-p // max(1, int(record_limit))))
    total = int(k.sum())
    first = np.zeros(n, dtype=np.int64)
    if n:
        first[1:] = np.cumsum(k)[:-1]
    chunk = np.repeat(np.arange(n, dtype=np.int64), k)
    j = np.arange(total, dtype=np.int64) - first[chunk]
    kk, rr, pp = k[chunk], r[chunk], p[chunk]
    items = np.empty((ITEM_COLS, total), dtype=np.int64)
    items[0] = chunk
    items[1] = j * rr // kk
    items[2] = (j + 1) * rr // kk
    items[3] = j * pp // kk
    items[4] = (j + 1) * pp // kk
    items[5] = first[chunk]
    items[6] = j
    items[7] = kk
    return items


def row_descriptors(table: np.ndarray, bytes_per_position: int) -> tuple[np.ndarray, np.ndarray]:
    """(rowdesc int64 [6, R], row record index of each chunk) for the DECRYPT row records.

    One descriptor per batch row read, in ascending row order: positions from the
    row's lowest pos_start to its highest end, the lowest nonce counter of its
    chunks, the key slot of its first chunk, and the plaintext bytes read.
    """
    rows = table[1]
    n = rows.shape[0]
    uniq, inv = np.unique(rows, return_inverse=True)
    r = uniq.shape[0]
    desc = np.zeros((ROWDESC_COLS, r), dtype=np.int64)
    desc[0] = uniq
    if n:
        start = np.full(r, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(start, inv, table[2])
        end = np.zeros(r, dtype=np.int64)
        np.maximum.at(end, inv, table[2] + table[3])
        ctr = np.full(r, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(ctr, inv, table[5])
        first_chunk = np.full(r, n, dtype=np.int64)
        np.minimum.at(first_chunk, inv, np.arange(n, dtype=np.int64))
        nbytes = np.zeros(r, dtype=np.int64)
        np.add.at(nbytes, inv, table[3] * bytes_per_position)
        desc[1] = start
        desc[2] = end - start
        desc[3] = ctr
        desc[4] = table[0][first_chunk]
        desc[5] = nbytes
    return desc, inv.astype(np.int64).reshape(-1)


def _kv_args(name: str, t: torch.Tensor, layout) -> tuple[int, int, int, int]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[1] != layout.num_heads or t.shape[3] != layout.head_dim:
        raise ValueError(f"{name} must be [batch, {layout.num_heads}, seq, {layout.head_dim}], got {tuple(t.shape)}")
    if t.dtype != layout.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, layout says {layout.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the host shim, got {t.device}")
    if t.stride(3) != 1:
        raise ValueError(f"{name}: the head_dim axis must be contiguous")
    it = t.element_size()
    return t.data_ptr(), t.stride(0) * it, t.stride(1) * it, t.stride(2) * it


def check_bounds(table: np.ndarray, layout, k: torch.Tensor, v: torch.Tensor, arena: torch.Tensor,
                 nkeys: int) -> None:
    """Refuse a chunk table the kernels would index out of range (shared by the shim and the CUDA backend)."""
    slot, row, pos_start, pos_count, io_start, counter, offset = table[:7]
    if table.shape[1] == 0:
        return
    if (layout.head_dim * layout.itemsize) % 16:
        raise ValueError("head_dim * itemsize must be a multiple of 16 bytes for the chunk kernels")
    if slot.min() < 0 or slot.max() >= nkeys:
        raise ValueError("chunk slot out of range of keys")
    if pos_count.min() < 1 or pos_start.min() < 0 or counter.min() < 0 or offset.min() < 0 or io_start.min() < 0:
        raise ValueError("chunk table has negative or empty entries")
    for name, t in (("k", k), ("v", v)):
        if row.min() < 0 or row.max() >= t.shape[0]:
            raise ValueError(f"chunk row out of range of {name} (batch {t.shape[0]})")
        if (io_start + pos_count).max() > t.shape[2]:
            raise ValueError(f"chunk positions out of range of {name} (seq {t.shape[2]})")
    # envelope v1 stores the K length of a chunk in a 32-bit AAD field; GCM allows 2^32 - 2 blocks
    half = pos_count.max() * (layout.bytes_per_position // 2)
    if half > 0xFFFFFFFF:
        raise ValueError(f"a chunk of {int(pos_count.max())} positions has {int(half)} bytes of K, more than the "
                         "32-bit key_len field of the envelope AAD holds: use smaller chunks")
    nbytes = pos_count * layout.bytes_per_position
    check_gcm_length(int(nbytes.max()))
    if (offset + nbytes + TAG_SIZE).max() > arena.numel():
        raise ValueError("chunk ciphertext out of range of the arena")


def _check_arena(arena: torch.Tensor) -> None:
    if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
        raise TypeError("arena must be a 1-D torch.uint8 tensor")
    if not arena.is_contiguous() or arena.device.type != "cpu":
        raise ValueError("arena must be a contiguous CPU tensor")


def _items_for(table: np.ndarray, layout, lanes: int, rounds_per_item: int | None):
    """(items or None, partials, counters) of a shim call: None (item i = chunk i) unless a cut is asked for."""
    if rounds_per_item is None:
        return None, None, None
    rounds = chunk_rounds(table[3] * layout.bytes_per_position, lanes)
    items = work_items(rounds, table[3], rounds_per_item=rounds_per_item)
    partials = np.zeros((items.shape[1], PARTIAL_SIZE), dtype=np.uint8)
    counters = np.zeros(table.shape[1], dtype=np.uint32)
    return items, partials, counters


def _order(order: int) -> int:
    if order not in (0, 1, 2):
        raise ValueError(f"order must be 0 (ascending), 1 (descending) or 2 (interleaved), got {order!r}")
    return order


def encrypt_chunks(keys: Sequence, layout, chunks, k_src: torch.Tensor, v_src: torch.Tensor,
                   arena: torch.Tensor, *, tenant_idx=None, session_idx=None,
                   record_first_no: int = 0, lanes: int = LANES, rounds_per_item: int | None = None,
                   order: int = 0) -> np.ndarray:
    """The encrypt kernel's work on CPU tensors: seals chunk i of ``chunks`` (a ChunkTable)
    into ``arena`` and returns its ENCRYPT records (uint8 [sum(pos_count), 64]).

    ``rounds_per_item``: cut chunks into work items of at most that many rounds (``work_items``)
    as the CUDA backend does to fill the GPU; ``order``: the order the items run in (0
    ascending, 1 descending, 2 interleaved), standing in for the GPU's arbitrary order.
    """
    lib = load()
    _check_arena(arena)
    order = _order(order)
    sched = prepare_keys([ks.key for ks in keys], lanes=lanes)
    meta = slot_meta_array(keys, tenant_idx, session_idx)
    first = encrypt_record_index(_col(chunks, "pos_count"))
    table = chunk_table_array(chunks, first[0])
    check_bounds(table, layout, k_src, v_src, arena, len(keys))
    kp = _kv_args("k_src", k_src, layout)
    vp = _kv_args("v_src", v_src, layout)
    items, partials, counters = _items_for(table, layout, lanes, rounds_per_item)
    n_items = table.shape[1] if items is None else items.shape[1]
    records = np.zeros((first[1], RECORD_SIZE), dtype=np.uint8)
    rc = lib.pqc_host_encrypt_chunks(_ptr(sched), _ptr(meta), _ptr(table), table.shape[1],
                                     None if items is None else _ptr(items), n_items, layout.layer_idx,
                                     layout.num_heads, layout.head_dim, layout.itemsize, dtype_code(layout.dtype),
                                     *kp, *vp, arena.data_ptr(), _ptr(records) if first[1] else None,
                                     record_first_no, 0, None if partials is None else _ptr(partials),
                                     None if counters is None else _ptr(counters), order)
    _check_rc(rc, "encrypt_chunks")
    return records


def decrypt_chunks(keys: Sequence, layout, chunks, arena: torch.Tensor, k_out: torch.Tensor,
                   v_out: torch.Tensor, *, tenant_idx=None, session_idx=None, record_first_no: int = 0,
                   failure_capacity: int = 1024, call_tag: int = 0, lanes: int = LANES,
                   rounds_per_item: int | None = None,
                   order: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The decrypt kernels' work on CPU tensors (row records, then the chunks; ``rounds_per_item``
    and ``order`` as for :func:`encrypt_chunks`).

    Returns (status uint8 [n], row DECRYPT records [R, 64], failure records [min(f, cap), 64],
    f = number of failing chunks).
    """
    lib = load()
    _check_arena(arena)
    order = _order(order)
    sched = prepare_keys([ks.key for ks in keys], lanes=lanes)
    meta = slot_meta_array(keys, tenant_idx, session_idx)
    table = chunk_table_array(chunks)
    desc, row_idx = row_descriptors(table, layout.bytes_per_position)
    table[7] = row_idx
    check_bounds(table, layout, k_out, v_out, arena, len(keys))
    kp = _kv_args("k_out", k_out, layout)
    vp = _kv_args("v_out", v_out, layout)
    items, partials, counters = _items_for(table, layout, lanes, rounds_per_item)
    n = table.shape[1]
    n_items = n if items is None else items.shape[1]
    status = np.zeros(n, dtype=np.uint8)
    records = np.zeros((desc.shape[1], RECORD_SIZE), dtype=np.uint8)
    fq = np.zeros((max(failure_capacity, 0), RECORD_SIZE), dtype=np.uint8)
    count = np.zeros(1, dtype=np.uint32)
    common = (layout.layer_idx, layout.num_heads, layout.head_dim, layout.itemsize, dtype_code(layout.dtype))
    if desc.shape[1]:
        _check_rc(lib.pqc_host_decrypt_row_records(_ptr(meta), _ptr(desc), desc.shape[1], *common, _ptr(records),
                                                   record_first_no), "decrypt_chunks (row records)")
    rc = lib.pqc_host_decrypt_chunks(_ptr(sched), _ptr(meta), _ptr(table), n,
                                     None if items is None else _ptr(items), n_items, *common, arena.data_ptr(),
                                     *kp, *vp, _ptr(status), _ptr(records) if desc.shape[1] else None,
                                     _ptr(fq) if failure_capacity > 0 else None, _ptr(count),
                                     max(failure_capacity, 0), call_tag,
                                     None if partials is None else _ptr(partials),
                                     None if counters is None else _ptr(counters), order)
    _check_rc(rc, "decrypt_chunks")
    f = int(count[0])
    return status, records, fq[:min(f, failure_capacity)].copy(), f


def item_multiplier(key: bytes, e: int, *, lanes: int = LANES) -> bytes:
    """(H^lanes)^e for the hash key H of ``key``, as a split chunk's work item multiplies its partial
    GHASH (the key schedule's window table, multiplied in the kernels' tree order)."""
    key = _bytes("key", key, 32)
    lanes = _lanes(lanes)
    if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < 2**32:
        raise ValueError(f"e must be an int in [0, 2^32), got {e!r}")
    out = ctypes.create_string_buffer(16)
    _check_rc(load().pqc_host_item_multiplier(key, lanes, e, out), "item_multiplier")
    return out.raw


def kv_block_offset(*, row_bytes: int, pos_count: int, num_heads: int, strides: tuple[int, int, int], row: int,
                    io_start: int, block: int) -> tuple[int, bool]:
    """(byte offset from the K or V base, is V) of 16-byte block ``block`` of a chunk, by the
    kernels' own (64-bit) address computation; strides are the batch, head, seq byte strides."""
    is_v = ctypes.c_int(0)
    off = load().pqc_host_kv_block_offset(row_bytes, pos_count, num_heads, *strides, row, io_start, block,
                                          ctypes.byref(is_v))
    return int(off), bool(is_v.value)
