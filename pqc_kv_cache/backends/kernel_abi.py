"""The chunk kernels' interface, in numpy: what the host builds for a launch and how it is laid out.

One Python definition of each thing the kernels read (``kernels/pqc_chunk_abi.h``),
tested against the header by compiling it (tests/backends/test_kernel_abi.py):

- the chunk table (int64 ``[TABLE_COLS, n]``, columns ``COL_*``), the work-item
  table (``[ITEM_COLS, n_items]``) and the DECRYPT row descriptors
  (``[ROWDESC_COLS, rows]``), with their builders ``chunk_table_array``,
  ``work_items`` and ``row_descriptors``;
- ``SLOT_META_DTYPE`` (``pqc_slot_meta``) and ``CHUNK_PARAMS_DTYPE``
  (``pqc_chunk_params``, the parameters of the encrypt and decrypt kernels);
- the sizes of the device buffers (``SCHED_SIZE``, ``PARTIAL_SIZE``) and
  ``check_bounds``, which refuses a table the kernels would index out of range;
- ``kernel_sources_dir`` and ``kernel_source``: the kernel sources and the one
  self-contained translation unit NVRTC compiles.

Used by the CUDA backend (production) and by the host shim (``kernel_shim``,
tests and references); it imports neither.
"""

from __future__ import annotations

import importlib.resources
import re
import struct
from pathlib import Path

import numpy as np

from .._checks import check_int
from ..audit.records import RECORD_DTYPE
from ..envelope import AAD_SIZE, TAG_SIZE
from ..errors import BackendUnavailableError
from .base import decrypt_row_summary

__all__ = [
    "LANES", "RECORD_SIZE", "SLOT_META_SIZE", "SCHED_SIZE", "TABLE_COLS", "ROWDESC_COLS", "ITEM_COLS",
    "PARTIAL_SIZE", "MIN_ITEM_ROUNDS", "GCM_MAX_BLOCKS", "AAD_BLOCKS", "COLS", "ITEM_FIELDS", "ROWDESC_FIELDS",
    "SLOT_META_DTYPE", "CHUNK_PARAMS_DTYPE", "kernel_sources_dir", "kernel_source", "slot_meta_array",
    "chunk_table_array", "encrypt_record_index", "chunk_rounds", "work_items", "cut_items", "row_descriptors",
    "check_bounds", "check_gcm_length", "chunk_params", "ParamsTemplate", "plan_efficiency",
]

LANES = 256            # threads per CTA of the chunk kernels = GHASH lanes (PQC_LANES)
RECORD_SIZE = RECORD_DTYPE.itemsize
SCHED_SIZE = 73984     # sizeof(pqc_key_sched): round keys, 256 H powers, 128 H^L x^k, 256 lane tables,
                       # 8 x 16 item-multiplier windows (a static_assert in pqc_key_sched.cuh holds it)
PARTIAL_SIZE = 16      # one GF(2^128) partial hash per work item of a split chunk
MIN_ITEM_ROUNDS = 4    # no work item is cut shorter than this many rounds (16 KiB at 256 lanes)
GCM_MAX_BLOCKS = 2**32 - 2   # data blocks of one GCM message with a 96-bit nonce (SP 800-38D 5.2.1.1)
AAD_BLOCKS = (AAD_SIZE + 15) // 16

#: chunk table columns, in order (PQC_COL_*): the ChunkTable's fields, then aux (encrypt: first record
#: index of the chunk; decrypt: index of its row's DECRYPT record, -1: none)
COLS = ("slot", "row", "pos_start", "pos_count", "io_start", "counter", "offset", "aux")
TABLE_COLS = len(COLS)
#: work item columns (PQC_ITEM_*)
ITEM_FIELDS = ("chunk", "r0", "r1", "p0", "p1", "first", "j", "count")
ITEM_COLS = len(ITEM_FIELDS)
#: DECRYPT row descriptor columns (PQC_RD_*)
ROWDESC_FIELDS = ("row", "pos_start", "pos_count", "counter", "slot", "nbytes")
ROWDESC_COLS = len(ROWDESC_FIELDS)

#: struct pqc_slot_meta (little-endian, as on x86-64 and the GPU)
SLOT_META_DTYPE = np.dtype([("tenant_tag", "V16"), ("session_tag", "V16"), ("epoch", "<u4"),
                            ("tenant_idx", "<u4"), ("session_idx", "<u4"), ("pad_", "<u4")])
SLOT_META_SIZE = SLOT_META_DTYPE.itemsize

_PTR, _I64, _U64, _U32 = "<u8", "<i8", "<u8", "<u4"
#: struct pqc_chunk_params: pointers as uint64 device (or host) addresses
CHUNK_PARAMS_DTYPE = np.dtype([
    ("sched", _PTR), ("meta", _PTR), ("table", _PTR), ("n", _I64), ("items", _PTR), ("n_items", _I64),
    ("k", _PTR), ("k_sb", _I64), ("k_sh", _I64), ("k_ss", _I64),
    ("v", _PTR), ("v_sb", _I64), ("v_sh", _I64), ("v_ss", _I64),
    ("arena", _PTR), ("records", _PTR), ("partials", _PTR), ("counters", _PTR),
    ("first_no", _U64), ("rec_lo", _I64),
    ("status", _PTR), ("fq", _PTR), ("fq_count", _PTR), ("call_tag", _U64),
    ("layer", _U32), ("num_heads", _U32), ("head_dim", _U32), ("itemsize", _U32), ("dtype_code", _U32),
    ("fq_cap", _U32),
    ("row_op", _U32), ("row_pos_start", _U32), ("row_pos_count", _U32), ("row_nbytes", _U32), ("row_rec0", _I64),
    ("copy_k", _PTR), ("copy_k_sb", _I64), ("copy_k_sh", _I64), ("copy_k_ss", _I64),
    ("copy_v", _PTR), ("copy_v_sb", _I64), ("copy_v_sh", _I64), ("copy_v_ss", _I64),
])


def kernel_sources_dir() -> Path:
    """Directory holding the kernel sources (pqc_kernels.cu, the headers, host_shim.cpp)."""
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


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def kernel_source(src_dir: Path | None = None, root: str = "pqc_kernels.cu") -> str:
    """``root`` with its local includes inlined, each header once, in include order: the one
    self-contained translation unit NVRTC compiles (the fixed-width types come from pqc_types.h,
    which needs no libc header under NVRTC)."""
    src = Path(src_dir) if src_dir is not None else kernel_sources_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        path = src / name
        if not path.is_file():
            raise BackendUnavailableError(f"kernel source {name} not found in {src}")
        seen.add(name)

        def inline(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// {inc}: inlined above"
            return f"// ---- {inc}\n{expand(inc)}// ---- end of {inc}"
        return _LOCAL_INCLUDE.sub(inline, path.read_text())

    return expand(root)


def check_gcm_length(nbytes: int) -> None:
    """Refuse a GCM message (96-bit nonce) longer than its counter space: 2^32 - 2 blocks of 16 bytes."""
    if nbytes > 16 * GCM_MAX_BLOCKS:
        raise ValueError(f"a GCM message holds at most {16 * GCM_MAX_BLOCKS} bytes (2^32 - 2 blocks), "
                         f"got {nbytes}")


def slot_meta_array(keys, tenant_idx=None, session_idx=None) -> np.ndarray:
    """pqc_slot_meta rows (uint8 [n, 48]) of KeySlots: tags, epoch, audit indices (0 when not given)."""
    n = len(keys)
    ti = np.zeros(n, np.uint32) if tenant_idx is None else np.asarray(tenant_idx, dtype=np.uint32)
    si = np.zeros(n, np.uint32) if session_idx is None else np.asarray(session_idx, dtype=np.uint32)
    if ti.shape != (n,) or si.shape != (n,):
        raise ValueError(f"tenant_idx and session_idx must have one entry per key slot ({n})")
    meta = np.zeros(n, dtype=SLOT_META_DTYPE)
    for i, ks in enumerate(keys):
        for name in ("tenant_tag", "session_tag"):
            tag = getattr(ks, name)
            if not isinstance(tag, (bytes, bytearray, memoryview)) or len(tag) != 16:
                raise ValueError(f"key slot {i}: {name} must be 16 bytes")
            meta[name][i] = bytes(tag)
        meta["epoch"][i] = check_int(f"key slot {i}: epoch", ks.epoch, 0, 2**32 - 1)
    meta["tenant_idx"] = ti
    meta["session_idx"] = si
    return meta.view(np.uint8).reshape(n, SLOT_META_SIZE)


def _column(chunks, name: str) -> np.ndarray:
    a = getattr(chunks, name)
    if hasattr(a, "detach"):        # a torch tensor: one host read where it lives on a device
        a = a.detach().to("cpu").numpy()
    return np.asarray(a, dtype=np.int64).reshape(-1)


def chunk_table_array(chunks, aux: np.ndarray | None = None) -> np.ndarray:
    """The kernels' chunk table: int64 [TABLE_COLS, n] of a ChunkTable's columns plus ``aux`` (-1 if None)."""
    raw = [getattr(chunks, f) for f in COLS[:-1]]
    if all(type(c) is np.ndarray and c.ndim == 1 for c in raw):    # host columns (every cache call)
        n = raw[0].shape[0]
        if all(c.shape[0] == n for c in raw):
            table = np.empty((TABLE_COLS, n), dtype=np.int64)
            for i, c in enumerate(raw):
                table[i] = c
            table[-1] = -1 if aux is None else np.asarray(aux, dtype=np.int64)
            return table
    cols = [_column(chunks, f) for f in COLS[:-1]]
    n = cols[0].shape[0]
    if any(c.shape[0] != n for c in cols):
        raise ValueError("chunk table columns must all have the same length")
    table = np.empty((TABLE_COLS, n), dtype=np.int64)
    for i, c in enumerate(cols):
        table[i] = c
    table[COLS.index("aux")] = -1 if aux is None else np.asarray(aux, dtype=np.int64)
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


def _items_per_chunk(r: np.ndarray, slots: int, min_rounds: int) -> np.ndarray:
    """How many items each chunk is cut into so that a launch of ``slots`` resident CTAs is filled in
    one wave where it can be: fewer chunks than slots share the slots in proportion to their rounds
    (largest remainders first, so the longest item is as short as it can be), at least one item per
    chunk and none shorter than ``min_rounds``; as many chunks as slots or more are cut only where a
    chunk is longer than an even share, ceil(total / slots), of the rounds."""
    n = r.shape[0]
    total = int(r.sum())
    if n >= slots:
        b = max(int(min_rounds), -(-total // slots))
        return np.maximum(1, -(-r // b))
    k = np.ones(n, dtype=np.int64)
    big = r * slots >= total               # a chunk of at least an even share gets items in proportion
    if big.any():
        s_big = slots - int((~big).sum())
        t_big = int(r[big].sum())
        share = r[big] * s_big / t_big
        kb = np.maximum(1, np.floor(share).astype(np.int64))
        left = s_big - int(kb.sum())
        if left > 0:                       # the rest to the chunks whose items are longest
            order = np.argsort(-(r[big] / kb), kind="stable")[:left]
            kb[order] += 1
        k[big] = kb
    return np.minimum(k, np.maximum(1, r // max(1, int(min_rounds))))


def work_items(rounds: np.ndarray, pos_count: np.ndarray, *, slots: int | None = None,
               rounds_per_item: int | None = None, record_limit: int | None = None,
               min_rounds: int = MIN_ITEM_ROUNDS) -> np.ndarray:
    """Cut chunks into work items (int64 [ITEM_COLS, n_items]; see PQC_ITEM_* in pqc_chunk_abi.h).

    With ``rounds_per_item`` B, a chunk of R rounds is cut into ceil(R / B) items. With ``slots`` (the
    resident CTAs of the launch), fewer chunks than slots are cut into items in proportion to their
    rounds within the slot count (``_items_per_chunk``): one wave of items of near-equal length, every
    slot given one only where there is enough work (no item is shorter than ``min_rounds``, so a small
    launch, such as a decode step's one-position seals, leaves slots idle); more chunks than slots are cut only where longer than an even share. Without
    either, no chunk is cut. A chunk is cut into at least ceil(P / ``record_limit``) items so that no
    item writes more ENCRYPT records than one launch may hold. Chunk c's k items are near-equal (item j:
    rounds [j R // k, (j + 1) R // k)), and its records are shared out the same way (positions
    [j P // k, (j + 1) P // k)).
    """
    r = np.asarray(rounds, dtype=np.int64).reshape(-1)
    p = np.asarray(pos_count, dtype=np.int64).reshape(-1)
    n = r.shape[0]
    if p.shape[0] != n:
        raise ValueError("rounds and pos_count must have one entry per chunk")
    if rounds_per_item is not None:
        b = check_int("rounds_per_item", rounds_per_item, 1)
        k = np.maximum(1, -(-r // b))
    elif slots is not None and n:
        k = _items_per_chunk(r, max(1, int(slots)), min_rounds)
    else:
        k = np.ones(n, dtype=np.int64)
    if record_limit is not None:
        k = np.maximum(k, -(-p // max(1, int(record_limit))))
    total = int(k.sum())
    if total == n:                         # no chunk cut (every decode step): item i = chunk i
        items = np.empty((ITEM_COLS, n), dtype=np.int64)
        items[0] = np.arange(n, dtype=np.int64)
        items[1] = 0
        items[2] = r
        items[3] = 0
        items[4] = p
        items[5] = items[0]
        items[6] = 0
        items[7] = 1
        return items
    return cut_items(k, r, p)


def cut_items(k: np.ndarray, r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The work items of chunks of ``r`` rounds and ``p`` positions cut into ``k`` items each (int64 arrays,
    one entry per chunk): chunk c's item j covers rounds [j R // k, (j + 1) R // k) and positions
    [j P // k, (j + 1) P // k)."""
    n = k.shape[0]
    first = np.cumsum(k) - k
    total = int(k.sum()) if n else 0
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


def plan_efficiency(items: np.ndarray, slots: int) -> float:
    """The share of ``slots`` resident CTAs' time a launch of ``items`` keeps busy, counting a round as one
    unit of work: the launch has G = min(items, slots) CTAs, CTA c runs items c, c + G, ... (the kernels'
    grid stride), and the launch lasts as long as the busiest CTA. 1.0: every slot busy to the end."""
    sizes = (items[2] - items[1]).astype(np.int64)
    if sizes.shape[0] == 0:
        return 1.0
    g = min(sizes.shape[0], int(slots))
    pad = -sizes.shape[0] % g
    per_cta = np.concatenate([sizes, np.zeros(pad, np.int64)]).reshape(-1, g).sum(0)
    return float(sizes.sum()) / (int(slots) * int(per_cta.max()))


def row_descriptors(table: np.ndarray, bytes_per_position: int) -> tuple[np.ndarray, np.ndarray]:
    """(rowdesc int64 [ROWDESC_COLS, R], row record index of each chunk) for the DECRYPT row records:
    one descriptor per batch row read, in ascending row order, as ``base.decrypt_row_summary`` defines it."""
    s = decrypt_row_summary(table[1], table[2], table[3], table[5], table[0], table[3] * bytes_per_position)
    desc = np.empty((ROWDESC_COLS, s.row.shape[0]), dtype=np.int64)
    for i, col in enumerate((s.row, s.pos_start, s.pos_count, s.nonce_counter, s.slot, s.nbytes)):
        desc[i] = col
    return desc, s.row_of_chunk


def check_bounds(table: np.ndarray, layout, k, v, arena, nkeys: int) -> None:
    """Refuse a chunk table the kernels would index out of range (the shim and the CUDA backend)."""
    if table.shape[1] == 0:
        return
    if (layout.head_dim * layout.itemsize) % 16:
        raise ValueError("head_dim * itemsize must be a multiple of 16 bytes for the chunk kernels")
    # one reduction per direction over the columns (slot, row, pos_start, pos_count, io_start, counter, offset)
    lo = table[:7].min(axis=1).tolist()
    hi = table[:7].max(axis=1).tolist()
    if lo[0] < 0 or hi[0] >= nkeys:
        raise ValueError("chunk slot out of range of keys")
    if lo[3] < 1 or lo[2] < 0 or lo[5] < 0 or lo[6] < 0 or lo[4] < 0:
        raise ValueError("chunk table has negative or empty entries")
    bpp = layout.bytes_per_position
    # the positions and bytes a chunk reaches, bounded first by the columns' maxima in Python ints (exact
    # when every chunk has the same length, as in a decode step); a table over the bound is summed per chunk
    # in int64 only when each term is below the limit (so no sum wraps): a chunk whose io_start, pos_count
    # or offset alone reaches the limit is out of range whatever the others, and the bound stays
    io_end = hi[4] + hi[3]
    seq = min(k.shape[2], v.shape[2])
    if io_end > seq and hi[4] < seq and hi[3] <= seq:
        io_end = int((table[4] + table[3]).max())
    for name, t in (("k", k), ("v", v)):
        if lo[1] < 0 or hi[1] >= t.shape[0]:
            raise ValueError(f"chunk row out of range of {name} (batch {t.shape[0]})")
        if io_end > t.shape[2]:
            raise ValueError(f"chunk positions out of range of {name} (seq {t.shape[2]})")
    # envelope v1 stores the K length of a chunk in a 32-bit AAD field; GCM allows 2^32 - 2 blocks
    half = hi[3] * (bpp // 2)
    if half > 0xFFFFFFFF:
        raise ValueError(f"a chunk of {hi[3]} positions has {half} bytes of K, more than the "
                         "32-bit key_len field of the envelope AAD holds: use smaller chunks")
    check_gcm_length(hi[3] * bpp)
    end = hi[6] + hi[3] * bpp + TAG_SIZE
    if end > arena.numel():
        if hi[6] < arena.numel():       # pos_count * bpp is bounded by the GCM limit just checked
            end = int((table[6] + table[3] * bpp).max()) + TAG_SIZE
        if end > arena.numel():
            raise ValueError("chunk ciphertext out of range of the arena")


def chunk_params(**fields) -> np.ndarray:
    """One pqc_chunk_params (a 1-element CHUNK_PARAMS_DTYPE array); fields not given are 0 / null.
    Pointers are integers (a tensor's ``data_ptr()``, a numpy array's ``ctypes.data``)."""
    p = np.zeros(1, dtype=CHUNK_PARAMS_DTYPE)
    for name, value in fields.items():
        if name not in CHUNK_PARAMS_DTYPE.names:
            raise TypeError(f"pqc_chunk_params has no field {name!r}")
        p[name] = 0 if value is None else value
    return p


_STRUCT_CODES = {np.dtype("<u8"): "Q", np.dtype("<i8"): "q", np.dtype("<u4"): "I"}
_PARAMS_STRUCT = struct.Struct("<" + "".join(_STRUCT_CODES[CHUNK_PARAMS_DTYPE.fields[f][0]]
                                             for f in CHUNK_PARAMS_DTYPE.names))
_PARAM_INDEX = {name: i for i, name in enumerate(CHUNK_PARAMS_DTYPE.names)}


class ParamsTemplate:
    """A pqc_chunk_params whose call-independent fields (tensors, layout, key schedules) are set once;
    ``pack_into(buf, offset, **fields)`` writes the record with the per-call fields (integers) patched in,
    with one ``struct`` call (the bytes ``chunk_params`` gives for the same fields)."""

    __slots__ = ("_values",)
    size = _PARAMS_STRUCT.size

    def __init__(self, **fields):
        self._values = [0] * len(_PARAM_INDEX)
        self._set(self._values, fields)

    @staticmethod
    def _set(values: list, fields: dict) -> None:
        for name, value in fields.items():
            i = _PARAM_INDEX.get(name)
            if i is None:
                raise TypeError(f"pqc_chunk_params has no field {name!r}")
            values[i] = 0 if value is None else int(value)

    #: the record's ``struct`` format without its byte-order prefix (to pack it behind other values)
    format = _PARAMS_STRUCT.format[1:]

    @staticmethod
    def index(name: str) -> int:
        """The place of field ``name`` among the record's values (``values()``)."""
        try:
            return _PARAM_INDEX[name]
        except KeyError:
            raise TypeError(f"pqc_chunk_params has no field {name!r}") from None

    def values(self) -> list:
        """The record's values (integers) in field order (a copy)."""
        return self._values.copy()

    def with_fields(self, **fields) -> "ParamsTemplate":
        """A copy with these fields set too."""
        new = ParamsTemplate.__new__(ParamsTemplate)
        new._values = self._values.copy()
        self._set(new._values, fields)
        return new

    def pack_into(self, buf, offset: int, **fields) -> None:
        values = self._values.copy()
        index = _PARAM_INDEX
        try:
            for name, value in fields.items():
                values[index[name]] = value
        except KeyError:
            raise TypeError(f"pqc_chunk_params has no field {name!r}") from None
        try:
            _PARAMS_STRUCT.pack_into(buf, offset, *values)
        except struct.error as e:
            if not all(isinstance(v, (int, np.integer)) for v in values):
                raise TypeError(f"pqc_chunk_params fields are integers: {e}") from None
            raise OverflowError(f"a pqc_chunk_params field is out of range: {e}") from None
