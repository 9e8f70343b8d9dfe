"""The connector's stored files: names, prefix chain hashes, the two file formats, and reading and writing
them safely (no vLLM, no keys beyond the server secret's MACs).

Layout: ``<storage>/<tenant name>/<prefix name>/L<layer>-p<pos>.pkvb``, one file per layer and saved part
(``pos`` = the part's first position), and ``index.json``, written last. The names are MACs under the server
secret (``ServerSecret.tenant_name`` / ``prefix_name``); the prefix name covers tenant, session and the chain
hash of the prefix's last block, so each session of a tenant stores its prompts afresh.

**Chain hashes.** ``chain_hashes(tokens, block_size, lora)``: ``c_0 = SHA-256(label ‖ block size ‖ LoRA
adapter name and path)``, ``c_{i+1} = SHA-256(c_i ‖ token ids of block i as int64 little-endian)``; block ``i``'s hash
``c_{i+1}`` covers every token id up to and including the block. It is bound into each chunk's AAD through
the session tag field: ``bound_session_tag(session_id, c) = SHA-256(label ‖ session_tag(session_id) ‖
c)[:16]``, so a chunk authenticates only for the token prefix it was sealed for.

**Formats.** ``index.json`` (``pqc_kv_cache/vllm-prefix-3``): ``num_tokens``, ``block_size``, ``layers``,
``parts`` (``[first block, block count]`` in order, covering the prefix). A layer file: a 4-byte big-endian
header length, a JSON header (``pqc_kv_cache/vllm-layer-2``: epoch, layer, block size, heads, head size,
dtype, ``first`` block, ``counters``: one nonce counter per chunk), then the chunks (ciphertext and tag,
``chunk_len`` bytes each) back to back. A file of another format is no hit (index) or refused (layer).

**Hostile files.** Files are opened without following links, only when regular, and read up to a bound
(``MalformedStoreError`` otherwise); every header field is type- and range-checked, JSON constants
(``Infinity``, ``NaN``), floats and over-long integers are refused, nesting too deep is refused.
Writes go to a fresh temporary file in the target directory (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600),
then renamed; directories are created with mode 0700, and an existing one that is a link or not the
server's is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
from typing import Any, Sequence

import numpy as np

from ..envelope import session_tag
from ..errors import KVCacheError
from .tenancy import ServerSecret

__all__ = ["INDEX", "LAYER_FORMAT", "PREFIX_FORMAT", "MalformedStoreError", "chain_hashes", "bound_session_tag",
           "prefix_dir", "layer_file", "read_stored_layer", "encode_layer", "read_index", "write_index",
           "make_private_dirs", "write_atomic", "MAX_HEADER"]

INDEX = "index.json"
LAYER_FORMAT = "pqc_kv_cache/vllm-layer-2"
PREFIX_FORMAT = "pqc_kv_cache/vllm-prefix-3"
MAX_HEADER = 1 << 20          # a layer file's JSON header
MAX_INDEX = 1 << 20
_HDR = struct.Struct(">I")
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "float8_e4m3fn", "float8_e5m2")


class MalformedStoreError(KVCacheError):
    """A stored KV file is missing, not a regular file, too large, truncated, of another format version or
    not the connector's."""


# ---------------------------------------------------------------------------------------------- names, hashes
def chain_hashes(token_ids: Sequence[int], block_size: int, lora: tuple[str, str] | None = None) -> list[bytes]:
    """The chain hash of each whole block of ``token_ids`` (see the module docstring); ``lora``: the
    adapter's (name, path), as vLLM's prefix cache keys on both."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("block_size must be a positive int")
    ids = np.asarray(token_ids, dtype="<i8")
    seed = struct.pack(">QB", block_size, lora is not None)
    for part in lora or ():
        b = str(part).encode("utf-8")
        seed += struct.pack(">I", len(b)) + b
    h = hashlib.sha256(b"pqc_kv_cache/vllm-chain\x00" + seed).digest()
    out = []
    for i in range(ids.shape[0] // block_size):
        h = hashlib.sha256(h + ids[i * block_size:(i + 1) * block_size].tobytes()).digest()
        out.append(h)
    return out


def bound_session_tag(session_id: str, chain: bytes) -> bytes:
    """The AAD's session tag field of a chunk of ``session_id`` whose block has chain hash ``chain``."""
    return hashlib.sha256(b"pqc_kv_cache/vllm-bound\x00" + session_tag(session_id) + bytes(chain)).digest()[:16]


def prefix_dir(storage: str, secret: ServerSecret, tenant_id: str, session_id: str, chain: bytes) -> str:
    """The directory of a stored prefix whose last block has chain hash ``chain``."""
    return os.path.join(storage, secret.tenant_name(tenant_id), secret.prefix_name(tenant_id, session_id, chain))


def layer_file(directory: str, layer: int, pos_start: int) -> str:
    return os.path.join(directory, f"L{layer}-p{pos_start}.pkvb")


# ---------------------------------------------------------------------------------------------- reading
def _read_bounded(path: str, limit: int) -> bytes:
    """The bytes of a regular file (not followed through a link) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise MalformedStoreError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MalformedStoreError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise MalformedStoreError(f"{path}: {st.st_size} bytes, over the bound of {limit}")
        chunks, left = [], limit + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    except OSError as e:
        raise MalformedStoreError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise MalformedStoreError(f"{path}: grew past the bound of {limit} bytes while read")
    return data


def _no_constant(name: str):
    raise ValueError(f"JSON constant {name} is not allowed")


def _no_float(text: str):
    raise ValueError("floats are not allowed")


def _bounded_int(text: str) -> int:
    if len(text) > 21:
        raise ValueError("integer too long")
    return int(text)


def _loads(data: bytes) -> Any:
    """JSON of a stored file: no constants, no floats, no integers past 21 digits (ValueError); nesting too
    deep for the parser is a ValueError too."""
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_no_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _int(obj: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = obj.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise MalformedStoreError(f"{where}: field {key!r} must be an int in {lo}..{hi}, got {v!r:.40}")
    return v


def read_stored_layer(path: str, chunk_len: int, max_chunks: int) -> tuple[dict, bytes]:
    """(checked header, body) of a layer file whose chunks are ``chunk_len`` bytes, at most ``max_chunks`` of
    them. ``MalformedStoreError`` for anything else."""
    data = _read_bounded(path, _HDR.size + MAX_HEADER + max_chunks * chunk_len)
    if len(data) < _HDR.size:
        raise MalformedStoreError(f"{path}: truncated")
    (n,) = _HDR.unpack_from(data, 0)
    if n > MAX_HEADER or _HDR.size + n > len(data):
        raise MalformedStoreError(f"{path}: header length {n} is out of bounds")
    try:
        header = _loads(data[_HDR.size:_HDR.size + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedStoreError(f"{path}: not a stored KV layer ({e})") from None
    if not isinstance(header, dict) or header.get("format") != LAYER_FORMAT:
        raise MalformedStoreError(f"{path}: not a {LAYER_FORMAT} file")
    for key in ("epoch", "layer", "num_heads", "head_dim"):
        _int(header, key, 0, _U32, path)
    _int(header, "block_size", 1, _U32, path)
    _int(header, "first", 0, _U32, path)
    if header.get("dtype") not in _DTYPES:
        raise MalformedStoreError(f"{path}: unknown dtype")
    counters = header.get("counters")
    if not isinstance(counters, list) or not 1 <= len(counters) <= max_chunks or \
            any(type(c) is not int or not 0 <= c <= _U64 for c in counters):
        raise MalformedStoreError(f"{path}: 'counters' must be 1..{max_chunks} ints in 0..2**64-1")
    body = data[_HDR.size + n:]
    if len(body) != len(counters) * chunk_len:
        raise MalformedStoreError(f"{path}: {len(body)} bytes of chunks, expected {len(counters)} x {chunk_len}")
    return header, body


def read_index(directory: str) -> dict | None:
    """The checked index of a stored prefix, or None if there is none, or none that is well formed and of
    this format version (no hit)."""
    try:
        index = _loads(_read_bounded(os.path.join(directory, INDEX), MAX_INDEX))
    except (MalformedStoreError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(index, dict) or index.get("format") != PREFIX_FORMAT:
        return None
    try:
        bs = _int(index, "block_size", 1, _U32, directory)
        n = _int(index, "num_tokens", 1, _U64, directory)
        layers, parts = index.get("layers"), index.get("parts")
        if not isinstance(layers, list) or not layers or any(type(x) is not int or not 0 <= x <= _U32
                                                             for x in layers):
            return None
        if not isinstance(parts, list) or not parts:
            return None
        nxt = 0
        for p in parts:       # contiguous, in order, covering the prefix exactly
            if not isinstance(p, list) or len(p) != 2 or any(type(x) is not int for x in p) or p[0] != nxt \
                    or p[1] < 1:
                return None
            nxt += p[1]
        if nxt * bs != n:
            return None
    except MalformedStoreError:
        return None
    index["parts"] = [tuple(p) for p in parts]
    return index


# ---------------------------------------------------------------------------------------------- writing
def make_private_dirs(storage: str, *names: str) -> str:
    """``storage/names...``, each level created with mode 0700; an existing level that is a link, not a
    directory or not owned by this process's uid is refused (``MalformedStoreError``)."""
    try:
        os.makedirs(storage, 0o700, exist_ok=True)
    except OSError as e:
        raise MalformedStoreError(f"{storage}: cannot create ({e.strerror})") from None
    path = storage
    for part in ("",) + names:
        if part:      # the storage root may be a link an operator made; the levels below it may not
            path = os.path.join(path, part)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise MalformedStoreError(f"{path}: cannot create ({e.strerror})") from None
        st = os.lstat(path) if part else os.stat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise MalformedStoreError(f"{path}: not a directory of uid {os.getuid()} (a link, a file, or "
                                      f"another user's)")
    return path


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fresh temporary file in its directory (mode 0600, created with
    O_EXCL | O_NOFOLLOW by ``mkstemp``), renamed over ``path``; nothing is left behind on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def encode_layer(*, epoch: int, layer: int, block_size: int, num_heads: int, head_dim: int, dtype: str,
                 first: int, counters: Sequence[int], body: bytes) -> bytes:
    header = json.dumps({"format": LAYER_FORMAT, "epoch": epoch, "layer": layer, "block_size": block_size,
                         "num_heads": num_heads, "head_dim": head_dim, "dtype": dtype, "first": first,
                         "counters": [int(c) for c in counters]}).encode()
    return _HDR.pack(len(header)) + header + body


def write_index(directory: str, num_tokens: int, block_size: int, layers: Sequence[int],
                parts: Sequence[tuple[int, int]]) -> None:
    write_atomic(os.path.join(directory, INDEX), json.dumps(
        {"format": PREFIX_FORMAT, "num_tokens": num_tokens, "block_size": block_size, "layers": list(layers),
         "parts": [list(p) for p in parts]}).encode())
