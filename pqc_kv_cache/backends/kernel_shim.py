"""The CUDA kernels' arithmetic on the CPU: kernels/host_shim.cpp built with g++, loaded with ctypes.

The shim compiles the same ``__host__ __device__`` primitives as the CUDA
kernels (the headers in ``kernels/``) and walks chunks and GHASH lanes with
the kernels' own indexing and parameters (``pqc_chunk_params``, built by
``kernel_abi``), so this module is how the kernel math is tested on a machine
without a GPU. It is not the host backend (that one uses OpenSSL through
``cryptography``) and production code never imports it: it is a test and
reference path.

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
  their docstrings), over the tables ``kernel_abi`` builds for the CUDA backend too.
- ``run_chunk_kernel(kernel, params_ptr, order)``: one chunk-kernel launch carried out on the
  CPU, given a ``pqc_chunk_params`` in host memory (what the CPU twin of the CUDA backend does).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._checks import check_int
from ..envelope import AAD_SIZE, NONCE_SIZE, TAG_SIZE, dtype_code
from ._build import compile_cached
from ..errors import BackendUnavailableError, DecryptionError
from .kernel_abi import (CHUNK_PARAMS_DTYPE, LANES, PARTIAL_SIZE, RECORD_SIZE, SCHED_SIZE, SLOT_META_SIZE,
                         check_bounds, check_gcm_length, chunk_params, chunk_rounds, chunk_table_array,
                         encrypt_record_index, kernel_sources_dir, row_descriptors, slot_meta_array, work_items)

__all__ = [
    "load", "available", "gcm_encrypt", "gcm_decrypt", "gcm_seal_many", "gcm_open_many",
    "aes256_encrypt_block", "gf_mul", "ct_equal", "sbox", "build_aad_v1", "prepare_keys", "item_multiplier",
    "kv_block_offset", "encrypt_chunks", "decrypt_chunks", "run_chunk_kernel",
]

_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17")
_ABI = 5

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _build() -> Path:
    src = kernel_sources_dir()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        raise BackendUnavailableError("no C++ compiler (g++ / $CXX) to build the kernel host shim")
    names = sorted(p.name for p in src.iterdir() if p.suffix in (".h", ".cuh") or p.name == "host_shim.cpp")
    sources = b"".join(name.encode() + b"\0" + (src / name).read_bytes() + b"\0" for name in names)
    return compile_cached("pqc_host_shim", sources,
                          lambda out: [cxx, *_FLAGS, f"-I{src}", str(src / "host_shim.cpp"), "-o", out],
                          "the kernel host shim")


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
        "pqc_host_chunk_params_size": ([], _I64),
        "pqc_host_sbox": ([_U32], _INT),
        "pqc_host_aes256_encrypt_block": ([_P, _P, _P], _INT),
        "pqc_host_gf_mul": ([_P, _P, _P, _INT], _INT),
        "pqc_host_ct_equal": ([_P, _P, _INT], _INT),
        "pqc_host_build_aad_v1": ([_P, _P, _P, _U32, _U32, _U64, _U32, _U32, _U32, _U32, _U32], _INT),
        "pqc_host_prepare_keys": ([_P, _I64, _U32, _P], _INT),
        "pqc_host_gcm_seal_many": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _U32], _INT),
        "pqc_host_gcm_open_many": ([_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT, _P, _U32], _INT),
        # the kernels' parameters (a pqc_chunk_params), then the item order
        "pqc_host_encrypt_chunks": ([_P, _U32], _INT),
        "pqc_host_decrypt_row_records": ([_P, _P, _I64, _U32, _U32, _U32, _U32, _U32, _P, _U64], _INT),
        "pqc_host_decrypt_chunks": ([_P, _U32], _INT),
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
                    or lib.pqc_host_slot_meta_size() != SLOT_META_SIZE or lib.pqc_host_sched_size() != SCHED_SIZE \
                    or lib.pqc_host_chunk_params_size() != CHUNK_PARAMS_DTYPE.itemsize:
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
    return check_int("lanes", lanes, 1, LANES)


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
    epoch, layer, pos_start, pos_count, key_len, num_heads, head_dim = (check_int(name, v, 0, hi) for name, v, hi in (
        ("epoch", epoch, 2**32 - 1), ("layer", layer, 2**32 - 1), ("pos_start", pos_start, 2**64 - 1),
        ("pos_count", pos_count, 2**32 - 1), ("key_len", key_len, 2**32 - 1),
        ("num_heads", num_heads, 2**32 - 1), ("head_dim", head_dim, 2**32 - 1)))
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
    tag_len = check_int("tag_len", tag_len, 4, 16)
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


def _kernel_fields(layout, kp, vp) -> dict[str, int]:
    return {"layer": layout.layer_idx, "num_heads": layout.num_heads, "head_dim": layout.head_dim,
            "itemsize": layout.itemsize, "dtype_code": dtype_code(layout.dtype),
            "k": kp[0], "k_sb": kp[1], "k_sh": kp[2], "k_ss": kp[3],
            "v": vp[0], "v_sb": vp[1], "v_sh": vp[2], "v_ss": vp[3]}


def run_chunk_kernel(kernel: str, params_ptr: int, order: int = 0) -> None:
    """Carry out one launch of ``kernel`` ("pqc_encrypt_chunks" or "pqc_decrypt_chunks") on the CPU:
    ``params_ptr`` is the host address of a pqc_chunk_params whose pointers are host addresses."""
    lib = load()
    fn = {"pqc_encrypt_chunks": lib.pqc_host_encrypt_chunks, "pqc_decrypt_chunks": lib.pqc_host_decrypt_chunks}
    if kernel not in fn:
        raise ValueError(f"not a chunk kernel: {kernel!r}")
    _check_rc(fn[kernel](params_ptr, _order(order)), kernel)


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
    _check_arena(arena)
    order = _order(order)
    sched = prepare_keys([ks.key for ks in keys], lanes=lanes)
    meta = slot_meta_array(keys, tenant_idx, session_idx)
    table = chunk_table_array(chunks)
    first = encrypt_record_index(table[3])
    table[7] = first[0]
    check_bounds(table, layout, k_src, v_src, arena, len(keys))
    kp = _kv_args("k_src", k_src, layout)
    vp = _kv_args("v_src", v_src, layout)
    items, partials, counters = _items_for(table, layout, lanes, rounds_per_item)
    n_items = table.shape[1] if items is None else items.shape[1]
    records = np.zeros((first[1], RECORD_SIZE), dtype=np.uint8)
    params = chunk_params(sched=_ptr(sched), meta=_ptr(meta), table=_ptr(table), n=table.shape[1],
                          items=None if items is None else _ptr(items), n_items=n_items, arena=arena.data_ptr(),
                          records=_ptr(records) if first[1] else None, first_no=record_first_no, rec_lo=0,
                          partials=None if partials is None else _ptr(partials),
                          counters=None if counters is None else _ptr(counters), **_kernel_fields(layout, kp, vp))
    run_chunk_kernel("pqc_encrypt_chunks", _ptr(params), order)
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
    params = chunk_params(sched=_ptr(sched), meta=_ptr(meta), table=_ptr(table), n=n,
                          items=None if items is None else _ptr(items), n_items=n_items, arena=arena.data_ptr(),
                          status=_ptr(status), records=_ptr(records) if desc.shape[1] else None,
                          fq=_ptr(fq) if failure_capacity > 0 else None, fq_count=_ptr(count),
                          fq_cap=max(failure_capacity, 0), call_tag=call_tag,
                          partials=None if partials is None else _ptr(partials),
                          counters=None if counters is None else _ptr(counters), **_kernel_fields(layout, kp, vp))
    run_chunk_kernel("pqc_decrypt_chunks", _ptr(params), order)
    f = int(count[0])
    return status, records, fq[:min(f, failure_capacity)].copy(), f


def item_multiplier(key: bytes, e: int, *, lanes: int = LANES) -> bytes:
    """(H^lanes)^e for the hash key H of ``key``, as a split chunk's work item multiplies its partial
    GHASH (the key schedule's window table, multiplied in the kernels' tree order)."""
    key = _bytes("key", key, 32)
    lanes = _lanes(lanes)
    e = check_int("e", e, 0, 2**32 - 1)
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
