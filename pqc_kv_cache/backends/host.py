"""Host crypto backend: the backend contract on CPU tensors, through `cryptography` (OpenSSL, AES-NI).

Batched: one Python call per call of the contract, the per-chunk nonce and AAD
bytes built with numpy for the whole batch, and ciphertext written and read in
place with ``AESGCM.encrypt_into`` / ``decrypt_into`` (no hex, no JSON, no
intermediate ``bytes`` per chunk).

Decryption writes a chunk straight into its destination when the destination
is one contiguous run of memory: a one-position chunk into ``k_out`` / ``v_out``
views of a position-major buffer ``[batch, seq, 2, heads, dim]``. Any other
chunk (all of them for ``EncryptedCache``'s head-major scratch, where a chunk's
heads land in separate runs) is opened into a per-thread staging buffer and
copied in numpy; the staging buffer is zeroed before the call returns. A chunk whose tag fails has its destination zeroed (OpenSSL
leaves the unauthenticated plaintext in the buffer, so this is not optional).

``HostBackend(threads=n)`` splits large calls by bytes over a small thread pool
(OpenSSL releases the GIL); the default is one thread, which measured faster on
a shared 2-core machine.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..audit.records import Status
from ..envelope import AAD_MAGIC, AAD_SIZE, AAD_V1_DTYPE, FORMAT_VERSION, KV_ROLES, NONCE_SIZE, TAG_SIZE, dtype_code
from .base import (AuditContext, ChunkLayout, ChunkTable, CryptoBackend, DecryptStatus, KeySlot, check_cpu_kv,
                   emit_decrypt_records, emit_encrypt_records)

__all__ = ["HostBackend", "chunk_aads", "chunk_nonces"]

_NONCE_DTYPE = np.dtype([("epoch", ">u4"), ("counter", ">u8")])
assert _NONCE_DTYPE.itemsize == NONCE_SIZE

# Below this many ciphertext bytes a call runs on the calling thread only.
_PARALLEL_MIN_BYTES = 256 * 1024


def _as_i64(name: str, a, n: int | None = None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise TypeError(f"chunk field {name} must be a 1-D integer array, got {a.ndim}-D {a.dtype}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"chunk field {name} has {a.shape[0]} entries, slot has {n}")
    return a.astype(np.int64, copy=False)


def _table(chunks: ChunkTable) -> dict[str, np.ndarray]:
    if not isinstance(chunks, ChunkTable):
        raise TypeError(f"chunks must be a ChunkTable, got {type(chunks).__name__}")
    fields = ChunkTable.fields()
    cols = [_as_i64(f, getattr(chunks, f)) for f in fields]
    n = cols[0].shape[0]
    if any(c.shape[0] != n for c in cols):
        raise ValueError(f"chunk fields differ in length: {[c.shape[0] for c in cols]}")
    out = dict(zip(fields, cols))
    if n:
        lows = np.stack(cols).min(axis=1)
        lows[fields.index("pos_count")] -= 1
        if int(lows.min()) < 0:
            bad = fields[int(np.argmin(lows))]
            raise ValueError(f"chunk field {bad} must be >= {1 if bad == 'pos_count' else 0}")
    return out


def _check_keys(keys: Sequence[KeySlot], slot: np.ndarray) -> None:
    for k in keys:
        if not isinstance(k, KeySlot):
            raise TypeError(f"keys must be KeySlot objects, got {type(k).__name__}")
        if len(k.key) != 32:
            raise ValueError("a KeySlot key must be 32 bytes (AES-256)")
        if not 0 <= k.epoch <= 0xFFFFFFFF or len(k.tenant_tag) != 16 or len(k.session_tag) != 16:
            raise ValueError("a KeySlot needs a 32-bit epoch and 16-byte tenant and session tags")
    if slot.size and int(slot.max()) >= len(keys):
        raise ValueError(f"chunk slot {int(slot.max())} has no key (only {len(keys)} given)")


def chunk_aads(keys: Sequence[KeySlot], layout: ChunkLayout, slot, pos_start, pos_count,
               bytes_per_position: int | None = None) -> np.ndarray:
    """The AAD v1 of every chunk, as an ``(n, 80)`` uint8 array (vectorised ``envelope.build_aad``)."""
    slot = np.asarray(slot, dtype=np.int64)
    bpp = layout.bytes_per_position if bytes_per_position is None else bytes_per_position
    tmpl = np.zeros(len(keys), dtype=AAD_V1_DTYPE)      # per key slot; position fields filled per chunk
    tmpl["magic"] = AAD_MAGIC
    tmpl["version"] = FORMAT_VERSION
    tmpl["role"] = KV_ROLES["both"]
    tmpl["dtype"] = dtype_code(layout.dtype)
    if len(keys):
        tmpl["tenant_tag"] = np.frombuffer(b"".join(bytes(k.tenant_tag) for k in keys), dtype="V16")
        tmpl["session_tag"] = np.frombuffer(b"".join(bytes(k.session_tag) for k in keys), dtype="V16")
        tmpl["epoch"] = [k.epoch for k in keys]
    tmpl["layer"] = layout.layer_idx
    tmpl["num_heads"] = layout.num_heads
    tmpl["head_dim"] = layout.head_dim
    tmpl["token_id"] = -1
    rec = tmpl[slot]
    pc = np.asarray(pos_count, dtype=np.int64)
    if pc.size and int(pc.max()) * (bpp // 2) > 0xFFFFFFFF:
        raise ValueError("a chunk's K length does not fit the 32-bit AAD field: use smaller chunks")
    rec["pos_start"] = np.asarray(pos_start, dtype=np.int64)
    rec["pos_count"] = pc
    rec["key_len"] = pc * (bpp // 2)
    return rec.view(np.uint8).reshape(-1, AAD_SIZE)


def chunk_nonces(keys: Sequence[KeySlot], slot, counter) -> np.ndarray:
    """The nonce (epoch ‖ counter, big-endian) of every chunk, as an ``(n, 12)`` uint8 array."""
    slot = np.asarray(slot, dtype=np.int64)
    epochs = np.array([k.epoch for k in keys], dtype=np.int64)
    rec = np.empty(slot.shape[0], dtype=_NONCE_DTYPE)
    rec["epoch"] = epochs[slot] if slot.size else 0
    rec["counter"] = np.asarray(counter, dtype=np.int64)
    return rec.view(np.uint8).reshape(-1, NONCE_SIZE)


_RAW = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32),
        8: (torch.int64, np.int64)}


def _raw_numpy(t: torch.Tensor) -> np.ndarray:
    """A writable numpy view (any strides) of a CPU tensor's elements as same-size integers.

    Copies between such views run in numpy on the calling thread: no intra-op thread pool, whose
    barriers stall for milliseconds when the other cores are busy (bf16 has no numpy dtype either)."""
    return t.view(_RAW[t.element_size()][0]).numpy()


class HostBackend(CryptoBackend):
    """The backend contract for CPU tensors, on `cryptography`'s AES-256-GCM."""

    _instance: "HostBackend | None" = None
    _instance_lock = threading.Lock()

    def __init__(self, threads: int | None = None):
        if threads is None:
            threads = 1
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.threads = threads
        self.parallel_min_bytes = _PARALLEL_MIN_BYTES
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pqc-kv-host") if threads > 1 else None
        self._local = threading.local()

    def _staging(self, nbytes: int, dtype) -> np.ndarray:
        """This thread's reusable staging buffer (zeroed by the caller before the call returns)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = np.zeros(max(nbytes, 1 << 16), dtype=np.uint8)
        return buf[:nbytes].view(dtype)

    @classmethod
    def instance(cls) -> "HostBackend":
        """The process-wide host backend."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    # ---- checks at the door --------------------------------------------------------
    @staticmethod
    def _check_layout(layout: ChunkLayout) -> None:
        if not isinstance(layout, ChunkLayout):
            raise TypeError(f"layout must be a ChunkLayout, got {type(layout).__name__}")
        if layout.num_heads < 1 or layout.head_dim < 1 or layout.layer_idx < 0:
            raise ValueError(f"bad chunk layout {layout}")

    @staticmethod
    def _check_arena(arena: torch.Tensor) -> None:
        if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
            raise TypeError("arena must be a 1-D uint8 tensor")
        if arena.device.type != "cpu" or not arena.is_contiguous():
            raise ValueError("the host backend needs a contiguous CPU arena")

    @staticmethod
    def _check_kv(name: str, k: torch.Tensor, v: torch.Tensor, layout: ChunkLayout) -> None:
        check_cpu_kv(name, k, v, layout, "host")

    @staticmethod
    def _check_ranges(t: dict, batch: int, seq: int, arena_len: int, chunk_bytes: np.ndarray) -> None:
        if not t["row"].size:
            return
        if int(t["row"].max()) >= batch:
            raise ValueError(f"chunk row {int(t['row'].max())} outside the batch of {batch}")
        # the columns are >= 0 and < 2^63 (``_table``), so their sums in uint64 cannot wrap, as int64 ones can
        if int((t["io_start"].view(np.uint64) + t["pos_count"].view(np.uint64)).max()) > seq:
            raise ValueError(f"a chunk reaches past the {seq} positions of the tensors")
        # pos_count <= seq now, so chunk_bytes (pos_count * bytes per position) did not wrap either
        if int((t["offset"].view(np.uint64) + chunk_bytes.view(np.uint64)).max()) + TAG_SIZE > arena_len:
            raise ValueError("a chunk reaches past the end of the arena")

    def _checked_call(self, keys, layout, chunks, arena, name: str, k: torch.Tensor, v: torch.Tensor):
        """Every check at the door of encrypt_chunks / decrypt_chunks: the chunk table as int64 columns, the
        plaintext bytes of each chunk, and the bytes per position."""
        self._check_layout(layout)
        self._check_arena(arena)
        self._check_kv(name, k, v, layout)
        t = _table(chunks)
        _check_keys(keys, t["slot"])
        bpp = 2 * layout.num_heads * layout.head_dim * k.element_size()
        nbytes = t["pos_count"] * bpp
        self._check_ranges(t, k.shape[0], k.shape[2], arena.numel(), nbytes)
        return t, nbytes, bpp

    def _run(self, fn, nbytes: np.ndarray) -> None:
        """Run ``fn(lo, hi)`` over all chunks, split by bytes over the pool when the call is large."""
        n = int(nbytes.shape[0])
        total = int(nbytes.sum())
        if self._pool is None or n < 2 or total < self.parallel_min_bytes:
            fn(0, n)
            return
        parts = min(self.threads, n)
        cum = np.cumsum(nbytes)
        cuts = np.searchsorted(cum, total * np.arange(1, parts) / parts, side="left") + 1
        bounds = [0] + np.clip(cuts, 1, n - 1).tolist() + [n]
        bounds = sorted(set(bounds))
        parts = len(bounds) - 1
        futs = [self._pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        err = None
        try:
            fn(bounds[0], bounds[1])
        except BaseException as exc:  # wait for the others before raising
            err = exc
        for f in futs:
            try:
                f.result()
            except BaseException as exc:
                err = err or exc
        if err is not None:
            raise err

    # ---- encrypt ---------------------------------------------------------------------
    def encrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       k_src: torch.Tensor, v_src: torch.Tensor, arena: torch.Tensor,
                       audit: AuditContext | None = None) -> None:
        t, nbytes, bpp = self._checked_call(keys, layout, chunks, arena, "src", k_src, v_src)
        n = t["slot"].shape[0]
        itemsize = k_src.element_size()
        if n == 0:
            return
        aads = chunk_aads(keys, layout, t["slot"], t["pos_start"], t["pos_count"], bpp).tobytes()
        nonces = chunk_nonces(keys, t["slot"], t["counter"]).tobytes()
        ciphers = [AESGCM(k.key) for k in keys]
        arena_np = arena.numpy()
        seq = k_src.shape[2]
        rows = t["row"]
        whole_rows = bool((t["io_start"] == 0).all() and (t["pos_count"] == seq).all())
        plain = None
        try:
            # Each chunk's plaintext ([2, heads, count, dim]) is packed into one staging run, copied in
            # numpy on this thread; the staging buffer is zeroed before it is released.
            raw_dt = _RAW[itemsize][1]
            k_np, v_np = _raw_numpy(k_src), _raw_numpy(v_src)
            total = int(nbytes.sum())
            plain = self._staging(total, raw_dt)
            plain_u8 = plain.view(np.uint8)
            src_off = (np.cumsum(nbytes) - nbytes).tolist()
            slot_l, off_l, nb_l = t["slot"].tolist(), t["offset"].tolist(), nbytes.tolist()
            row_l, io_l, cnt_l = rows.tolist(), t["io_start"].tolist(), t["pos_count"].tolist()
            H, D = layout.num_heads, layout.head_dim
            if whole_rows:
                packed = plain.reshape(n, 2, H, seq, D)
                for i, r in enumerate(row_l):
                    packed[i, 0] = k_np[r]
                    packed[i, 1] = v_np[r]
            else:
                for i in range(n):
                    r, s0, c = row_l[i], io_l[i], cnt_l[i]
                    e0 = src_off[i] // itemsize
                    kv = plain[e0:e0 + 2 * H * c * D].reshape(2, H, c, D)
                    kv[0] = k_np[r, :, s0:s0 + c, :]
                    kv[1] = v_np[r, :, s0:s0 + c, :]

            def work(lo: int, hi: int) -> None:
                for i in range(lo, hi):
                    nb, off, so = nb_l[i], off_l[i], src_off[i]
                    ciphers[slot_l[i]].encrypt_into(nonces[12 * i:12 * i + 12], plain_u8[so:so + nb],
                                                    aads[80 * i:80 * i + 80], arena_np[off:off + nb + TAG_SIZE])

            self._run(work, nbytes)
        finally:
            if plain is not None:
                plain.fill(0)
        if audit is not None:
            emit_encrypt_records(audit, keys, layout, rows, t["pos_start"], t["pos_count"], t["counter"], t["slot"],
                                 nbytes)

    # ---- decrypt ---------------------------------------------------------------------
    @staticmethod
    def _direct_target(k_out: torch.Tensor, v_out: torch.Tensor, layout: ChunkLayout):
        """(uint8 view of the storage, element offset of k_out, row stride, position stride) when a
        one-position chunk's K‖V is one contiguous run of the output, else None."""
        H, D = layout.num_heads, layout.head_dim
        ks, vs = k_out.stride(), v_out.stride()
        if ks != vs or ks[3] != 1 or (H > 1 and ks[1] != D):
            return None
        if k_out.untyped_storage().data_ptr() != v_out.untyped_storage().data_ptr():
            return None
        if v_out.storage_offset() - k_out.storage_offset() != H * D:
            return None
        storage = torch.empty(0, dtype=torch.uint8).set_(k_out.untyped_storage())
        return storage.numpy(), k_out.storage_offset(), ks[0], ks[2]

    def decrypt_chunks(self, keys: Sequence[KeySlot], layout: ChunkLayout, chunks: ChunkTable,
                       arena: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
                       audit: AuditContext | None = None, *, owner: object = None) -> DecryptStatus:
        """See :meth:`CryptoBackend.decrypt_chunks`; the status is on the host (failures known at return)."""
        t, nbytes, bpp = self._checked_call(keys, layout, chunks, arena, "out", k_out, v_out)
        n = t["slot"].shape[0]
        itemsize = k_out.element_size()
        status = np.zeros(n, dtype=np.uint8)
        if n == 0:
            return DecryptStatus(host=status)
        aads = chunk_aads(keys, layout, t["slot"], t["pos_start"], t["pos_count"], bpp).tobytes()
        nonces = chunk_nonces(keys, t["slot"], t["counter"]).tobytes()
        ciphers = [AESGCM(k.key) for k in keys]
        arena_np = arena.numpy()
        H, D = layout.num_heads, layout.head_dim
        direct = self._direct_target(k_out, v_out, layout)
        slot_l, off_l, nb_l = t["slot"].tolist(), t["offset"].tolist(), nbytes.tolist()
        row_l, io_l, cnt_l = t["row"].tolist(), t["io_start"].tolist(), t["pos_count"].tolist()
        if direct is not None:
            out_np, base, s_row, s_pos = direct
            dst_l = ((base + t["row"] * s_row + t["io_start"] * s_pos) * itemsize).tolist()
        max_staged = int(nbytes.max())
        raw_dt = _RAW[itemsize][1]
        k_np, v_np = _raw_numpy(k_out), _raw_numpy(v_out)

        def work(lo: int, hi: int) -> None:
            staging = None
            try:
                for i in range(lo, hi):
                    nb, off, c = nb_l[i], off_l[i], cnt_l[i]
                    ct = arena_np[off:off + nb + TAG_SIZE]
                    nonce, aad = nonces[12 * i:12 * i + 12], aads[80 * i:80 * i + 80]
                    if direct is not None and c == 1:
                        dst = out_np[dst_l[i]:dst_l[i] + nb]
                        try:
                            ciphers[slot_l[i]].decrypt_into(nonce, ct, aad, dst)
                        except InvalidTag:
                            dst.fill(0)
                            status[i] = Status.AUTH_FAILED
                        continue
                    if staging is None:
                        staging = self._staging(max_staged, raw_dt)
                    buf = staging[:nb // itemsize]
                    r, s = row_l[i], io_l[i]
                    try:
                        ciphers[slot_l[i]].decrypt_into(nonce, ct, aad, buf.view(np.uint8))
                    except InvalidTag:
                        k_np[r, :, s:s + c, :] = 0
                        v_np[r, :, s:s + c, :] = 0
                        status[i] = Status.AUTH_FAILED
                        continue
                    kv = buf.reshape(2, H, c, D)
                    k_np[r, :, s:s + c, :] = kv[0]
                    v_np[r, :, s:s + c, :] = kv[1]
            finally:
                if staging is not None:
                    staging.fill(0)

        self._run(work, nbytes)
        if audit is not None:
            emit_decrypt_records(audit, keys, layout, t["row"], t["pos_start"], t["pos_count"], t["counter"],
                                 t["slot"], nbytes, status)
        return DecryptStatus(host=status)
