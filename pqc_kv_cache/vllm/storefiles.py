"""The connector's stored files: names, prefix chain hashes, the block file format, and reading and writing
them safely (no vLLM, no keys beyond the server secret's MACs).

Layout: ``<storage>/<tenant name>/<session name>/<block name>.pkvb``, one file per stored block holding that
block in every layer, and ``.created`` in each session directory (an empty file made with the directory; its
time orders a tenant's sessions for clean-up). The names are MACs under the server secret
(``ServerSecret.tenant_name`` and ``prefix_name``): a block's name covers its tenant, session
and the chain hash of every token up to and including the block, so a request finds each of its leading
blocks under its own name (the longest stored run of them is a hit), whichever request or engine stored
them, and nobody without the secret can tell from the names which tenant or prompt they are.

**Chain hashes.** ``chain_hashes(tokens, block_size, lora, model)``: ``c_0 = SHA-256(label ‖ block size ‖ LoRA
adapter name and path ‖ model fingerprint)``, ``c_{i+1} = SHA-256(c_i ‖ token ids of block i as int64 little-endian)``;
block ``i``'s hash ``c_{i+1}`` covers every token id up to and including the block. It is bound into each chunk's AAD through
the session tag field: ``bound_session_tag(session_id, c) = SHA-256(label ‖ session_tag(session_id) ‖
c)[:16]``, so a chunk authenticates only for the token prefix it was sealed for.

**Model.** ``model_fingerprint`` (model name or path, revision, KV dtype, layer count and head shape) is mixed
into ``c_0``, so a block of one model is stored under other names than the same prompt's block of another
(a base model and its fine-tune, or weights upgraded under a store that persists): another model's blocks
are never found, hence never loaded, and are left to the clean-up. It is also in each file's header.

**Format.** A block file: a 4-byte big-endian header length, a JSON header (``pqc_kv_cache/vllm-block-2``:
block size, dtype, the block's index in the prompt, the model fingerprint, and per stored layer its index,
heads, head size, key epoch and nonce counter), then one chunk (ciphertext and tag) per layer, in the header's order. A file of
another format is refused.

**Hostile files.** Files are opened without following links, only when regular, and read up to a bound
(``MalformedStoreError`` otherwise); every header field is type- and range-checked, JSON constants
(``Infinity``, ``NaN``), floats and over-long integers are refused, nesting too deep is refused.
Writes go to a fresh temporary file in the target directory (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600),
then renamed over the block's name, so that engines saving the same block at once each leave a whole file
and a reader sees one of them; directories are created with mode 0700, and an existing one that is a link or
not the server's is refused. A session directory is built with its marker under a temporary name and renamed
into place, so that it never exists without its marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from ..envelope import session_tag
from ..errors import KVCacheError
from .tenancy import ServerSecret

__all__ = ["BLOCK_FORMAT", "BLOCK_SUFFIX", "CREATED", "MalformedStoreError", "chain_hashes", "bound_session_tag",
           "session_dir", "block_file", "read_block", "encode_block", "make_private_dirs", "make_session_dir",
           "write_atomic", "remove_if_same", "MAX_HEADER", "model_fingerprint"]

BLOCK_FORMAT = "pqc_kv_cache/vllm-block-2"
BLOCK_SUFFIX = ".pkvb"
CREATED = ".created"          # in each session directory: made with it, never written again
MAX_HEADER = 1 << 20          # a block file's JSON header
MAX_LAYERS = 4096
_HDR = struct.Struct(">I")
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "float8_e4m3fn", "float8_e5m2")


class MalformedStoreError(KVCacheError):
    """A stored KV file is missing, not a regular file, too large, truncated, of another format version or
    not the connector's. ``path`` and ``stat``: where a block file's check failed, the file and the status
    of the regular file found there, if any."""

    path: str = ""
    stat: os.stat_result | None = None


# ---------------------------------------------------------------------------------------------- names, hashes
def model_fingerprint(model: str, revision: str | None, kv_dtype: str, num_layers: int, num_kv_heads: int,
                      head_size: int) -> bytes:
    """32 bytes naming the model whose KV is stored: its name or path, revision (None: unpinned), KV cache
    dtype, number of layers, KV heads and head size."""
    for name, value in (("model", model), ("kv_dtype", kv_dtype)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if revision is not None and not isinstance(revision, str):
        raise ValueError("revision must be a string or None")
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _U32:
            raise ValueError(f"{name} must be an int in 1..2**32-1, got {value!r}")
    text = json.dumps([model, revision, kv_dtype, num_layers, num_kv_heads, head_size])
    return hashlib.sha256(b"pqc_kv_cache/vllm-model\x00" + text.encode("utf-8")).digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, lora: tuple[str, str] | None = None,
                 model: bytes = b"") -> list[bytes]:
    """The chain hash of each whole block of ``token_ids`` (see the module docstring); ``lora``: the
    adapter's (name, path), as vLLM's prefix cache keys on both; ``model``: ``model_fingerprint`` of the
    model (the connector always gives it; empty only where no model is involved)."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("block_size must be a positive int")
    if not isinstance(model, bytes) or len(model) not in (0, 32):
        raise ValueError("model must be a 32-byte model_fingerprint (or empty)")
    ids = np.asarray(token_ids, dtype="<i8")
    seed = struct.pack(">QB", block_size, lora is not None)
    for part in lora or ():
        b = str(part).encode("utf-8")
        seed += struct.pack(">I", len(b)) + b
    seed += struct.pack(">B", len(model)) + model
    h = hashlib.sha256(b"pqc_kv_cache/vllm-chain\x00" + seed).digest()
    out = []
    for i in range(ids.shape[0] // block_size):
        h = hashlib.sha256(h + ids[i * block_size:(i + 1) * block_size].tobytes()).digest()
        out.append(h)
    return out


def bound_session_tag(session_id: str, chain: bytes) -> bytes:
    """The AAD's session tag field of a chunk of ``session_id`` whose block has chain hash ``chain``."""
    return hashlib.sha256(b"pqc_kv_cache/vllm-bound\x00" + session_tag(session_id) + bytes(chain)).digest()[:16]


def session_dir(storage: str, secret: ServerSecret, tenant_id: str, session_id: str) -> str:
    """The directory of a tenant session's stored blocks: named by the server secret's MAC of tenant, session
    and an empty chain (``prefix_name``; a block's chain hash is 32 bytes, so no block has this MAC)."""
    return os.path.join(storage, secret.tenant_name(tenant_id), secret.prefix_name(tenant_id, session_id, b"")[:32])


def block_file(storage: str, secret: ServerSecret, tenant_id: str, session_id: str, chain: bytes) -> str:
    """The file of a stored block whose chain hash is ``chain`` (``prefix_name`` of tenant, session and chain)."""
    if len(chain) != 32:
        raise ValueError("a block's chain hash is 32 bytes")
    return os.path.join(session_dir(storage, secret, tenant_id, session_id),
                        secret.prefix_name(tenant_id, session_id, chain) + BLOCK_SUFFIX)


# ---------------------------------------------------------------------------------------------- reading
def _read_bounded(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes and status of a regular file (not followed through a link) of at most ``limit`` bytes."""
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
    return data, st


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


def read_block(path: str, chunk_len: int, max_layers: int = MAX_LAYERS) -> tuple[dict, bytes, os.stat_result]:
    """(checked header, body, file status) of a block file whose chunks are ``chunk_len`` bytes each, one per
    layer (at most ``max_layers``). ``MalformedStoreError`` for anything else; its ``stat`` attribute is the
    file's status where the file could be opened (so that a caller can remove that very file)."""
    try:
        return _read_block(path, chunk_len, max_layers)
    except MalformedStoreError as e:
        if e.stat is None:
            try:
                st = os.lstat(path)
                e.stat = st if stat.S_ISREG(st.st_mode) else None
            except OSError:
                pass
        raise


def _read_block(path: str, chunk_len: int, max_layers: int) -> tuple[dict, bytes, os.stat_result]:
    data, st = _read_bounded(path, _HDR.size + MAX_HEADER + max_layers * chunk_len)
    if len(data) < _HDR.size:
        raise MalformedStoreError(f"{path}: truncated")
    (n,) = _HDR.unpack_from(data, 0)
    if n > MAX_HEADER or _HDR.size + n > len(data):
        raise MalformedStoreError(f"{path}: header length {n} is out of bounds")
    try:
        header = _loads(data[_HDR.size:_HDR.size + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedStoreError(f"{path}: not a stored KV block ({e})") from None
    if not isinstance(header, dict) or header.get("format") != BLOCK_FORMAT:
        raise MalformedStoreError(f"{path}: not a {BLOCK_FORMAT} file")
    _int(header, "block_size", 1, _U32, path)
    _int(header, "index", 0, _U32, path)
    model = header.get("model")
    if not isinstance(model, str) or len(model) not in (0, 64) or any(c not in "0123456789abcdef" for c in model):
        raise MalformedStoreError(f"{path}: 'model' must be a model fingerprint (64 hex digits) or empty")
    if header.get("dtype") not in _DTYPES:
        raise MalformedStoreError(f"{path}: unknown dtype")
    layers = header.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= max_layers:
        raise MalformedStoreError(f"{path}: 'layers' must be a list of 1..{max_layers} entries")
    for entry in layers:
        if not isinstance(entry, dict):
            raise MalformedStoreError(f"{path}: a layer entry is not an object")
        for key in ("layer", "num_heads", "head_dim", "epoch"):
            _int(entry, key, 0, _U32, path)
        _int(entry, "counter", 0, _U64, path)
    if len({e["layer"] for e in layers}) != len(layers):
        raise MalformedStoreError(f"{path}: a layer is listed twice")
    body = data[_HDR.size + n:]
    if len(body) != len(layers) * chunk_len:
        raise MalformedStoreError(f"{path}: {len(body)} bytes of chunks, expected {len(layers)} x {chunk_len}")
    return header, body, st


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


def make_session_dir(storage: str, tenant_name: str, session_name: str) -> str:
    """``storage/tenant/session``, which appears with its ``.created`` marker already in it: the directory is
    built under a temporary name in the tenant's directory and renamed into place, so that a clean-up never
    sees a session directory without its marker. If another engine renamed its own into place first, that one
    is used (and given a marker if it is an older one that lacks it)."""
    tenant_dir = make_private_dirs(storage, tenant_name)
    path = os.path.join(tenant_dir, session_name)
    if not os.path.lexists(path):
        try:
            tmp = tempfile.mkdtemp(dir=tenant_dir, prefix=f".{session_name}.", suffix=".tmp")
        except OSError as e:
            raise MalformedStoreError(f"{tenant_dir}: cannot create a session directory ({e.strerror})") from None
        try:
            _make_marker(tmp)
            os.rename(tmp, path)      # fails if another engine's (non-empty) directory is there already
        except BaseException as e:
            _remove_quietly(os.path.join(tmp, CREATED), os.unlink)
            _remove_quietly(tmp, os.rmdir)
            if not isinstance(e, OSError):
                raise
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise MalformedStoreError(f"{path}: not a directory of uid {os.getuid()} (a link, a file, another "
                                  f"user's, or it could not be created)")
    _make_marker(path)
    return path


def _remove_quietly(path: str, remove: Callable[[str], None]) -> None:
    try:
        remove(path)
    except OSError:
        pass


def _make_marker(path: str) -> None:
    try:
        os.close(os.open(os.path.join(path, CREATED), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise MalformedStoreError(f"{path}: cannot mark the session directory ({e.strerror})") from None


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


def remove_if_same(path: str, st: os.stat_result) -> bool:
    """Remove ``path`` if it is still the file ``st`` describes (not one another engine has since renamed
    over it); True if removed."""
    try:
        now = os.lstat(path)
        if (now.st_ino, now.st_dev, now.st_mtime_ns, now.st_size) != (st.st_ino, st.st_dev, st.st_mtime_ns,
                                                                        st.st_size):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


def encode_block(*, block_size: int, dtype: str, index: int, layers: Sequence[dict], body: bytes,
                 model: bytes = b"") -> bytes:
    """A block file: ``layers`` are ``{"layer", "num_heads", "head_dim", "epoch", "counter"}`` in the order of
    their chunks in ``body``."""
    fields = ("layer", "num_heads", "head_dim", "epoch", "counter")
    header = json.dumps({"format": BLOCK_FORMAT, "block_size": block_size, "dtype": dtype, "index": index,
                         "model": model.hex(), "layers": [{k: int(e[k]) for k in fields} for e in layers]}).encode()
    return _HDR.pack(len(header)) + header + body
