"""The crypto backend contract: encrypt and decrypt batches of KV chunks, emit their audit records.

The cache decides *what* is stored where (which chunk holds which row and
positions, where its ciphertext lives in the layer's byte arena); a backend
decides *how* the bytes are sealed and opened. One contract, one
implementation per device (``host``: cryptography / OpenSSL; ``cuda``: the
kernels in ``kernels/``), chosen by the tensors' device — the cache never
branches on CUDA vs CPU.

Chunk plaintext (format v1): the K bytes then the V bytes of all KV heads of
one batch row for ``pos_count`` consecutive positions, each in the layout
``[heads, pos_count, head_dim]`` of the tensors' dtype (what
``k[row, :, s:s + n, :]`` holds). ``key_len`` = half the plaintext. The
ciphertext of chunk ``i`` is stored at ``arena[offset[i] : offset[i] + nbytes]``
followed by its 16-byte tag, where ``nbytes = 2 * pos_count * heads * head_dim
* itemsize``.

AAD of chunk ``i`` (see ``pqc_kv_cache.envelope``): kv_role "both",
``layout.dtype``, tenant and session tags and epoch of ``keys[slot[i]]``,
``layout.layer_idx``, ``pos_start[i]``, ``pos_count[i]``, key_len,
``layout.num_heads``, ``layout.head_dim``, token id -1.

Audit (when ``audit`` is given): ``encrypt_chunks`` emits one ENCRYPT record
per (row, position) written, with the chunk's nonce counter and epoch;
``decrypt_chunks`` emits one DECRYPT record per row read (its fields:
:func:`decrypt_row_summary`, the one definition every backend uses), status OK
or AUTH_FAILED, and one AUTH_FAILED record per failing chunk with its exact
positions and nonce counter.

Failures: ``decrypt_chunks`` answers a :class:`DecryptStatus`. A backend that
knows the tags' outcome when it returns (host) answers it on the host; a device
backend answers a device tensor and raises the failures of an ``owner``'s calls
from ``check(owner)``, at a synchronisation point the caller owns.
"""

from __future__ import annotations

import abc
import functools
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import numpy as np
import torch

from ..audit.fields import RecordTemplates, build_records, set_field
from ..audit.records import Op, Status, check_records
from .seal_parts import PlaintextCopy, RowRecords

if TYPE_CHECKING:   # annotations only: a backend writes records, it does not import the log
    from ..audit.log import KVAuditLog

#: One column of a ChunkTable: int64 values, numpy on the host, a tensor on a device.
IndexArray = Union[np.ndarray, torch.Tensor]

__all__ = ["KeySlot", "ChunkLayout", "ChunkTable", "AuditContext", "DecryptStatus", "CryptoBackend", "RowsSeal",
           "RowsOpen", "RowRecords", "PlaintextCopy", "RowSummary", "decrypt_row_summary"]


@dataclass(frozen=True)
class KeySlot:
    """One AES-256 key of a (session, epoch), and the AAD tags that go with it (its repr omits the key)."""

    key: bytes = field(repr=False)   # 32 bytes
    tenant_tag: bytes     # 16 bytes, envelope.tenant_tag(tenant_id)
    session_tag: bytes    # 16 bytes, envelope.session_tag(session_id)
    epoch: int


_ITEMSIZES: dict[torch.dtype, int] = {}   # dtype -> bytes per element (ChunkLayout is frozen: no per-object cache)


def _itemsize(dtype: torch.dtype) -> int:
    n = _ITEMSIZES.get(dtype)
    if n is None:
        n = _ITEMSIZES[dtype] = torch.empty((), dtype=dtype).element_size()
    return n


@dataclass(frozen=True)
class ChunkLayout:
    """What every chunk of one call shares: the layer and the tensors' shape and dtype."""

    layer_idx: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def bytes_per_position(self) -> int:
        """Plaintext bytes of one position of one row: K and V of all heads."""
        return 2 * self.num_heads * self.head_dim * self.itemsize


@dataclass
class ChunkTable:
    """N chunks as parallel int64 arrays (numpy for the host backend; int64 tensors on the device for cuda).

    slot       index into the call's ``keys``
    row        batch row in the source (encrypt) or destination (decrypt) tensors
    pos_start  first absolute position, bound into the AAD
    pos_count  number of positions
    io_start   index along the sequence dimension of the source / destination tensors
    counter    nonce counter (the nonce is keys[slot].epoch ‖ counter)
    offset     byte offset of the ciphertext in the arena (the tag follows it)
    """

    slot: IndexArray
    row: IndexArray
    pos_start: IndexArray
    pos_count: IndexArray
    io_start: IndexArray
    counter: IndexArray
    offset: IndexArray

    def __len__(self) -> int:
        return int(self.slot.shape[0])

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("slot", "row", "pos_start", "pos_count", "io_start", "counter", "offset")


@dataclass(frozen=True)
class AuditContext:
    """Where a backend writes the audit records of a call: the log and the log's
    tenant / session indices of each key slot (numpy uint32 arrays, one per slot).

    ``templates``: record batches a backend may keep between calls made with this context (a caller that
    reuses one context for the same key slots step after step lets the constant fields be set once)."""

    log: KVAuditLog
    tenant_idx: np.ndarray
    session_idx: np.ndarray
    templates: RecordTemplates = field(default_factory=RecordTemplates, compare=False, repr=False)


class RowSummary(NamedTuple):
    """What the DECRYPT record of each row read says (arrays, one entry per row, ascending rows)."""

    row: np.ndarray            # batch row
    pos_start: np.ndarray      # lowest position read in the row
    pos_count: np.ndarray      # highest end minus lowest start
    nonce_counter: np.ndarray  # the lowest nonce counter of the row's chunks
    slot: np.ndarray           # key slot of the row's first chunk (in table order): tenant, session, epoch
    nbytes: np.ndarray         # plaintext bytes read (a record saturates it at 2^32 - 1)
    row_of_chunk: np.ndarray   # for each chunk, the index of its row's entry


def _tiled_rows(row: np.ndarray) -> int:
    """k when ``row`` is its first k entries, strictly ascending, repeated n/k times; else 0."""
    n = row.shape[0]
    if n == 0:
        return 0
    down = np.flatnonzero(np.diff(row) <= 0)
    k = int(down[0]) + 1 if down.size else n
    if n % k or not (row.reshape(-1, k) == row[:k]).all():
        return 0
    return k


def decrypt_row_summary(row, pos_start, pos_count, counter, slot, nbytes) -> RowSummary:
    """The fields of the DECRYPT row records of one decrypt call, from its chunks' columns: the one
    definition of that record, whichever backend writes it (host: emitted; CUDA: row descriptors
    for the row-record kernel)."""
    row = np.asarray(row, dtype=np.int64).reshape(-1)
    n = row.shape[0]
    k = _tiled_rows(row)
    if k:       # every chunk run lists the same ascending rows (a layer read): reduce its grid, no grouping
        shape = (n // k, k)
        ps = np.asarray(pos_start, dtype=np.int64).reshape(shape)
        end = (ps + np.asarray(pos_count, dtype=np.int64).reshape(shape)).max(0)
        start = ps.min(0)
        return RowSummary(row[:k].copy(), start, end - start,
                          np.asarray(counter, dtype=np.int64).reshape(shape).min(0),
                          np.asarray(slot, dtype=np.int64).reshape(-1)[:k].copy(),
                          np.asarray(nbytes, dtype=np.int64).reshape(shape).sum(0),
                          np.tile(np.arange(k, dtype=np.int64), n // k))
    uniq, inv = np.unique(row, return_inverse=True)
    inv = inv.astype(np.int64).reshape(-1)
    r = uniq.shape[0]
    start = np.full(r, np.iinfo(np.int64).max, dtype=np.int64)
    end = np.zeros(r, dtype=np.int64)
    ctr = np.full(r, np.iinfo(np.int64).max, dtype=np.int64)
    first = np.full(r, n, dtype=np.int64)
    nb = np.zeros(r, dtype=np.int64)
    if n:
        ps = np.asarray(pos_start, dtype=np.int64).reshape(-1)
        np.minimum.at(start, inv, ps)
        np.maximum.at(end, inv, ps + np.asarray(pos_count, dtype=np.int64).reshape(-1))
        np.minimum.at(ctr, inv, np.asarray(counter, dtype=np.int64).reshape(-1))
        np.minimum.at(first, inv, np.arange(n, dtype=np.int64))
        np.add.at(nb, inv, np.asarray(nbytes, dtype=np.int64).reshape(-1))
    first_slot = np.asarray(slot, dtype=np.int64).reshape(-1)[first] if n else first
    return RowSummary(uniq.astype(np.int64), start, end - start, ctr, first_slot, nb, inv)


def check_cpu_kv(name: str, k, v, layout: ChunkLayout, backend: str) -> None:
    """The K/V tensors a host backend reads or writes: CPU tensors ``[batch, heads, seq, head_dim]`` of the
    layout's dtype and the same shape (TypeError / ValueError naming the tensor otherwise)."""
    heads, dim, dtype = layout.num_heads, layout.head_dim, layout.dtype
    for t, what in ((k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}_{name} must be a tensor, got {type(t).__name__}")
        if not t.is_cpu:
            raise ValueError(f"the {backend} backend handles CPU tensors only; {what}_{name} is on {t.device}")
        shape = t.shape
        if len(shape) != 4 or shape[1] != heads or shape[3] != dim:
            raise ValueError(f"{what}_{name} must be [batch, {heads}, seq, {dim}], got {list(shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{what}_{name} has dtype {t.dtype}, the layout says {dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k_{name} {list(k.shape)} and v_{name} {list(v.shape)} differ in shape")


def emit_encrypt_records(audit: AuditContext, keys: Sequence[KeySlot], layout: ChunkLayout, row, pos_start,
                         pos_count, counter, slot, nbytes) -> None:
    """The ENCRYPT records of one encrypt call (one per row and position), whichever host backend sealed."""
    slot = np.asarray(slot, dtype=np.int64)
    pos_count = np.asarray(pos_count)
    nbytes = np.asarray(nbytes)
    if pos_count.size and bool((pos_count == 1).all()) and bool((nbytes == nbytes[0]).all()):
        # one-position chunks (every decode step) are one record each, and the same rows of the same layer
        # come back step after step: a kept batch with only positions and counters set per call
        row = np.asarray(row)
        epochs = tuple(k.epoch for k in keys)
        nb = int(nbytes[0])

        def build() -> np.ndarray:
            return build_records(int(Op.ENCRYPT), (
                audit.tenant_idx[slot], audit.session_idx[slot], layout.layer_idx, row, 0, 1, 0,
                np.array(epochs, dtype=np.int64)[slot], nb, int(Status.OK), 0))

        batch = audit.templates.get((int(Op.ENCRYPT), layout.layer_idx, slot.tobytes(), row.tobytes(), epochs, nb),
                                    build)
        set_field(batch, "pos_start", np.asarray(pos_start))
        set_field(batch, "nonce_counter", np.asarray(counter))
        audit.log.emit_records(batch)
        return
    # the fields go in as they are (integer arrays): the log range-checks them, so a value a record cannot
    # hold is refused rather than truncated into another row's or position's record
    audit.log.emit_per_position(Op.ENCRYPT, tenant_idx=audit.tenant_idx[slot], session_idx=audit.session_idx[slot],
                                layer=layout.layer_idx, row=np.asarray(row), pos_start=np.asarray(pos_start),
                                pos_count=pos_count, nonce_counter=np.asarray(counter),
                                epoch=np.array([k.epoch for k in keys], dtype=np.int64)[slot], nbytes=nbytes,
                                status=Status.OK)


def emit_decrypt_records(audit: AuditContext, keys: Sequence[KeySlot], layout: ChunkLayout, row, pos_start,
                         pos_count, counter, slot, nbytes, status) -> None:
    """The DECRYPT records of one decrypt call whose statuses are known on the host: one per row read
    (``decrypt_row_summary``, AUTH_FAILED if any of its chunks failed) and one AUTH_FAILED record per
    failing chunk with its exact positions."""
    rs = decrypt_row_summary(row, pos_start, pos_count, counter, slot, nbytes)
    status = np.asarray(status, dtype=np.uint8)
    bad = np.zeros(rs.row.shape[0], dtype=np.uint8)
    if status.any():
        np.maximum.at(bad, rs.row_of_chunk, status)
    epochs = np.array([k.epoch for k in keys], dtype=np.int64)
    # as in emit_encrypt_records, the log range-checks every field (only the byte count saturates)
    audit.log.emit(Op.DECRYPT, tenant_idx=audit.tenant_idx[rs.slot], session_idx=audit.session_idx[rs.slot],
                   layer=layout.layer_idx, row=rs.row, pos_start=rs.pos_start, pos_count=rs.pos_count,
                   nonce_counter=rs.nonce_counter, epoch=epochs[rs.slot], nbytes=np.minimum(rs.nbytes, 0xFFFFFFFF),
                   status=bad)
    failed = np.flatnonzero(status)
    if failed.size:
        fs = np.asarray(slot, dtype=np.int64)[failed]
        audit.log.emit(Op.DECRYPT, tenant_idx=audit.tenant_idx[fs], session_idx=audit.session_idx[fs],
                       layer=layout.layer_idx, row=np.asarray(row)[failed], pos_start=np.asarray(pos_start)[failed],
                       pos_count=np.asarray(pos_count)[failed], nonce_counter=np.asarray(counter)[failed],
                       epoch=epochs[fs], nbytes=np.minimum(np.asarray(nbytes)[failed], 0xFFFFFFFF),
                       status=Status.AUTH_FAILED)


@dataclass(frozen=True)
class DecryptStatus:
    """The per-chunk status of a ``decrypt_chunks`` call (uint8, 0 OK, 1 AUTH_FAILED), in one of two places:

    ``host``: a numpy array, known when the call returns (every failure can be acted on now);
    ``device``: a device tensor, still being written on the device's stream. Reading it would
    synchronise; the backend raises its failures from ``check(owner)`` instead, and a caller that
    re-seals plaintext it read uses the tensor on the device (e.g. to zero what failed).
    """

    host: np.ndarray | None = None
    device: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.device is None):
            raise ValueError("a DecryptStatus is either on the host or on the device")

    def __len__(self) -> int:
        return int((self.host if self.host is not None else self.device).shape[0])

    @property
    def deferred(self) -> bool:
        """True when the status is still on the device (failures come from the backend's ``check``)."""
        return self.device is not None


def _frozen(a) -> np.ndarray:
    """``a`` as a read-only 1-D int64 array: itself when it already is one (kept by identity), else a copy."""
    if type(a) is np.ndarray and a.dtype == np.int64 and a.ndim == 1 and not a.flags.writeable:
        return a
    a = np.array(a, dtype=np.int64).reshape(-1)
    a.flags.writeable = False
    return a


class _PreparedCall:
    """What :class:`RowsSeal` and :class:`RowsOpen` share: the backend, its implementation of the call
    (``name``: the CryptoBackend method), what the backend keeps between calls (``state``), and the arena,
    held weakly (a call kept from step to step must not keep a replaced arena allocated; once it is gone,
    the call is refused)."""

    __slots__ = ("backend", "_arena", "state", "_impl")
    _what = "call"

    def __init__(self, backend: "CryptoBackend", arena: torch.Tensor, name: str):
        self.backend = backend
        self._arena = weakref.ref(arena)
        self.state = None
        # a backend registered as a CryptoBackend without deriving from it has only the abstract methods
        impl = getattr(backend, name, None)
        self._impl = impl if impl is not None else functools.partial(getattr(CryptoBackend, name), backend)

    @property
    def arena(self) -> torch.Tensor | None:
        """The arena of this call (None once nothing else holds it: the call is then refused)."""
        return self._arena()

    def _check_arena(self) -> None:
        if self._arena() is None:
            raise ValueError(f"the arena this {self._what} was made for is gone: make a new {self._what}")

    def _run(self, *args):
        self._check_arena()
        return self._impl(self, *args)


class RowsSeal(_PreparedCall):
    """A seal prepared for repeated calls of one shape: chunk i of a call seals row ``rows[i]`` under key
    ``keys[key_idx[i]]`` into ``arena``, audited into ``audit``; per call only the positions, the nonce
    counters and where the chunks go change (what a cache's update of every row does, step after step).

    Made by :meth:`CryptoBackend.rows_seal`; a call is :meth:`CryptoBackend.seal_rows` with the same
    contract and checks as ``encrypt_chunks`` over the table it describes. ``state`` is what the backend
    keeps between calls of this seal (nothing for a host backend). A caller keeps one while ``matches``
    holds (the same key list object, arena tensor and audit context) and makes a new one otherwise."""

    __slots__ = ("keys", "layout", "key_idx", "rows", "audit", "_kept_rows")
    _what = "seal"

    def __init__(self, backend: "CryptoBackend", keys: Sequence[KeySlot], layout: ChunkLayout,
                 key_idx: np.ndarray, rows: np.ndarray, arena: torch.Tensor, audit: AuditContext | None):
        key_idx, rows = _frozen(key_idx), _frozen(rows)
        if key_idx.shape != rows.shape:
            raise ValueError(f"a rows seal needs one key index per row; got {key_idx.size} for {rows.size} rows")
        super().__init__(backend, arena, "seal_rows")
        self.keys, self.layout, self.key_idx, self.rows, self.audit = keys, layout, key_idx, rows, audit
        self._kept_rows: tuple | None = None     # (op, the row records last built with status OK)

    def matches(self, keys: Sequence[KeySlot], arena: torch.Tensor, audit: AuditContext | None) -> bool:
        return keys is self.keys and arena is self._arena() and audit is self.audit

    def __call__(self, pos_start: int, pos_count: int, counter: np.ndarray, offset: int, stride: int,
                 k_src: torch.Tensor, v_src: torch.Tensor, records: np.ndarray | None = None, *,
                 row_records: RowRecords | None = None, copy_to: PlaintextCopy | None = None) -> None:
        """Seal positions ``pos_start .. pos_start + pos_count`` (index 0.. of ``k_src``/``v_src``) of every
        row, chunk i under nonce ``counter[i]`` at ``offset + i * stride`` of the arena.

        ``records``: the caller's own audit records (a RECORD_DTYPE array whose fields it set, as for
        ``KVAuditLog.emit_records``), written into the audit context's log with the call's ENCRYPT records
        once the seal is enqueued (a device backend: in the same reservation, moved by the call's own copies);
        not written as given if the seal raises (a device backend that had reserved their record numbers
        writes them with status ERROR in their place: the log stays dense). Only with an audit context.
        ``row_records``: instead, one record per row described by a :class:`RowRecords` (which a device backend
        writes in the launch itself, with nothing built or copied per call). ``copy_to``: where the call also
        writes ``k_src`` / ``v_src`` (see :class:`PlaintextCopy`)."""
        self._check_arena()
        if row_records is None and copy_to is None:
            self._impl(self, pos_start, pos_count, counter, offset, stride, k_src, v_src, records)
        else:
            self._impl(self, pos_start, pos_count, counter, offset, stride, k_src, v_src, records, row_records,
                       copy_to)

    def row_records(self, spec: RowRecords, status: Status = Status.OK) -> np.ndarray:
        """The records ``spec`` describes for this seal's rows, built on the host (ValueError for a value a
        record cannot hold; this seal needs an audit context). With status OK the array is kept for the next
        call (read it before asking again)."""
        if self.audit is None:
            raise ValueError("row records need the seal's audit context (audit=None)")
        if not isinstance(spec, RowRecords):
            raise TypeError(f"row_records takes a RowRecords, got {type(spec).__name__}")
        got = spec.fields()
        if got is None:
            raise ValueError(f"row records {spec!r} hold a value an audit record cannot (an unknown operation, "
                             "or a position outside 0 .. 2^32 - 1)")
        op, start, count, nbytes = got
        kept = self._kept_rows
        if status == Status.OK and kept is not None and kept[0] == op:
            batch = kept[1]         # every step asks again: only the positions change
        else:
            k = self.key_idx
            batch = build_records(op, (self.audit.tenant_idx[k], self.audit.session_idx[k],
                                       min(int(self.layout.layer_idx), 0xFFFF), self.rows, 0, 0, 0, 0, 0,
                                       int(status), 0))
            if status == Status.OK:
                self._kept_rows = (op, batch)
        batch["pos_start"] = start
        batch["pos_count"] = count
        batch["nbytes"] = nbytes
        return batch

    def table(self, pos_start: int, pos_count: int, counter: np.ndarray, offset: int, stride: int) -> ChunkTable:
        """The chunk table one call describes."""
        n = self.rows.shape[0]
        return ChunkTable(self.key_idx, self.rows, np.full(n, pos_start, dtype=np.int64),
                          np.full(n, pos_count, dtype=np.int64), np.zeros(n, dtype=np.int64),
                          np.asarray(counter, dtype=np.int64).reshape(-1),
                          offset + np.arange(n, dtype=np.int64) * stride)


class RowsOpen(_PreparedCall):
    """A read prepared for repeated calls over every row of a layer: a call opens segments (position ranges
    ``start[s] .. start[s] + count[s]``, one chunk per row of ``rows`` each) into ``k_out`` / ``v_out`` from
    position ``base`` on, from ``arena``, the failures of the call owned by ``owner``. What a cache's read of
    its layer does step after step, where from one step to the next most segments stay as they were.

    Made by :meth:`CryptoBackend.rows_open`; a call is :meth:`CryptoBackend.open_rows` with the same
    contract, checks, bytes and records as ``decrypt_chunks`` over the table it describes (``table``).
    ``state`` is what the backend keeps between calls (nothing for a host backend). A caller keeps one while
    ``matches`` holds and makes a new one otherwise."""

    __slots__ = ("layout", "rows", "owner")
    _what = "read"

    def __init__(self, backend: "CryptoBackend", layout: ChunkLayout, rows: np.ndarray, arena: torch.Tensor,
                 owner: object = None):
        super().__init__(backend, arena, "open_rows")
        self.layout, self.rows, self.owner = layout, _frozen(rows), owner

    def matches(self, layout: ChunkLayout, rows: np.ndarray, arena: torch.Tensor, owner: object) -> bool:
        return layout is self.layout and rows is self.rows and arena is self._arena() and owner is self.owner

    def __call__(self, keys: Sequence[KeySlot], key_idx: np.ndarray, audit: AuditContext | None, start: np.ndarray,
                 count: np.ndarray, counter: np.ndarray, offset: np.ndarray, base: int, k_out: torch.Tensor,
                 v_out: torch.Tensor) -> DecryptStatus:
        """Open chunk (s, r): row ``rows[r]`` of positions ``start[s] ..`` under key ``keys[key_idx[s, r]]`` and
        nonce ``counter[s, r]``, its ciphertext at ``offset[s, r]`` of the arena, into index ``start[s] - base``
        .. of ``k_out`` / ``v_out``; audited into ``audit``. ``start`` / ``count``: int64 [segments];
        ``counter`` / ``offset``: int64 [segments, rows]; ``key_idx``: int64 [segments, rows], or [rows] when
        every segment uses the same key per row. Returns the status per chunk
        (segment-major, rows inner), as ``decrypt_chunks`` does."""
        return self._run(keys, key_idx, audit, start, count, counter, offset, base, k_out, v_out)

    def table(self, key_idx, start, count, counter, offset, base: int) -> ChunkTable:
        """The chunk table one call describes (segment-major, rows inner)."""
        rows = self.rows
        nr = rows.shape[0]
        start = np.asarray(start, dtype=np.int64).reshape(-1)
        count = np.asarray(count, dtype=np.int64).reshape(-1)
        pos_start = np.repeat(start, nr)
        key_idx = np.asarray(key_idx, dtype=np.int64)
        key_idx = np.tile(key_idx, start.shape[0]) if key_idx.ndim == 1 else key_idx.reshape(-1)
        return ChunkTable(key_idx, np.tile(rows, start.shape[0]), pos_start,
                          np.repeat(count, nr), pos_start - base, np.asarray(counter, dtype=np.int64).reshape(-1),
                          np.asarray(offset, dtype=np.int64).reshape(-1))


class CryptoBackend(abc.ABC):
    """Seal and open batches of chunks; the same contract on every device."""

    def rows_open(self, layout: ChunkLayout, rows: np.ndarray, arena: torch.Tensor, owner: object = None) -> RowsOpen:
        """A :class:`RowsOpen` over these rows and arena (nothing is checked or opened yet)."""
        return RowsOpen(self, layout, rows, arena, owner)

    def open_rows(self, read: RowsOpen, keys: Sequence[KeySlot], key_idx: np.ndarray, audit: AuditContext | None,
                  start: np.ndarray, count: np.ndarray, counter: np.ndarray, offset: np.ndarray, base: int,
                  k_out: torch.Tensor, v_out: torch.Tensor) -> DecryptStatus:
        """One call of ``read`` (see :class:`RowsOpen`): ``decrypt_chunks`` over the table it describes; a
        backend with per-call costs to spare overrides it."""
        return self.decrypt_chunks(keys, read.layout, read.table(key_idx, start, count, counter, offset, base),
                                   read.arena, k_out, v_out, audit, owner=read.owner)

    def rows_seal(self, keys: Sequence[KeySlot], layout: ChunkLayout, key_idx: np.ndarray, rows: np.ndarray,
                  arena: torch.Tensor, audit: AuditContext | None = None) -> RowsSeal:
        """A :class:`RowsSeal` over these keys, rows and arena (nothing is checked or sealed yet)."""
        return RowsSeal(self, keys, layout, key_idx, rows, arena, audit)

    def seal_rows(self, seal: RowsSeal, pos_start: int, pos_count: int, counter: np.ndarray, offset: int,
                  stride: int, k_src: torch.Tensor, v_src: torch.Tensor, records: np.ndarray | None = None,
                  row_records: RowRecords | None = None, copy_to: PlaintextCopy | None = None) -> None:
        """One call of ``seal`` (see :class:`RowsSeal`): the plaintext copy (``copy_to``), ``encrypt_chunks``
        over the table it describes, then the caller's ``records`` (or those ``row_records`` describes); a
        backend with per-call costs to spare overrides it."""
        if row_records is not None:
            if records is not None:
                raise TypeError("a seal writes records or row_records, not both")
            records = seal.row_records(row_records)
        if records is not None:     # refused before anything is sealed, as emit_records would refuse them
            if seal.audit is None:
                raise ValueError("records to write with a seal need the seal's audit context (audit=None)")
            check_records(records, "seal_rows")
        if copy_to is not None:
            if not isinstance(copy_to, PlaintextCopy):
                raise TypeError(f"copy_to takes a PlaintextCopy, got {type(copy_to).__name__}")
            k_to, v_to = copy_to.views(k_src, v_src)
            try:
                k_to.copy_(k_src)
                v_to.copy_(v_src)
            except RuntimeError as e:   # overlapping memory
                raise ValueError(f"copy_to cannot take the sources: {e}") from None
        self.encrypt_chunks(seal.keys, seal.layout, seal.table(pos_start, pos_count, counter, offset, stride),
                            k_src, v_src, seal.arena, seal.audit)
        if records is not None:
            seal.audit.log.emit_records(records)

    @abc.abstractmethod
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        """Encrypt chunk i from ``k_src[row, :, io_start:io_start+pos_count, :]`` and the same of
        ``v_src`` ([batch, heads, seq, dim]) into ``arena`` (uint8, 1-D) at ``offset[i]``, tag after."""

    @abc.abstractmethod
    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None, *, owner: object = None) -> DecryptStatus:
        """Verify and decrypt chunk i into ``k_out[row, :, io_start:io_start+pos_count, :]`` and the
        same of ``v_out``. A chunk whose tag fails has its destination zeroed, never left readable.

        Returns the per-chunk status (see :class:`DecryptStatus`). ``owner`` (any weak-referenceable
        object, e.g. the cache making the call) is whose ``check`` raises the call's deferred failures.
        """

    def check(self, owner: object = None) -> None:
        """Raise DecryptionError for the deferred failures of ``owner``'s decrypt calls since its last
        check (a synchronisation point). A backend that answers every status on the host has none."""

    def forget_keys(self) -> None:
        """Erase whatever key material the backend keeps between calls (e.g. device key schedules), so
        retired or closed keys do not outlive their session's erasure. Nothing to do by default."""
