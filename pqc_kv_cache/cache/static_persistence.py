"""Save files for the static cache: ``save`` and ``load`` of ``StaticEncryptedCache`` (a mixin of it).

The file is the cache save file of ``savefile.py`` (same header, manifest tags, per-session counter
high-water marks and branch points, chunk list), with ``mode`` "static": every chunk is a one-position
envelope v1 chunk exactly as a layer's slot holds it, and each layer's description lists, per row and
held position, which chunk it holds (rows share a chunk after a beam reorder). A load makes the sessions
take what the file says of them (``TenantSession.adopt``) before any nonce range is reserved, so a
session that could collide with what the file's session sealed seals next under a branch epoch of its
own: no (key, nonce) pair is sealed twice (docs/cache.md, "No nonce is used twice").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .._checks import check_int
from ..audit.records import Op, Status
from ..errors import KVCacheError, SaveFileError
from ..session import TenantSession
from .audit import refuse_load
from .savefile import read_savefile, write_savefile

if TYPE_CHECKING:   # annotations only: the cache writes records, it does not import the log
    from ..audit.log import KVAuditLog

__all__ = ["StaticSaveFiles", "STATIC_MODE"]

#: The ``mode`` a static cache's save file names.
STATIC_MODE = "static"


class StaticSaveFiles:
    """``save`` / ``load`` of ``StaticEncryptedCache`` (uses its layers, sessions and context)."""

    def save(self, path) -> bytes:
        """Write this cache's chunks and metadata to ``path`` (whole or not at all); returns the file's random
        id. One SAVE record per layer and row. The file holds no plaintext and no key: each held position's
        chunk as its slot holds it, the slot tables, layouts and lengths, and each session's epoch, counter
        high-water mark (covering the counters the cache reserved ahead) and branch points, under manifest
        tags of every session (see ``savefile.py``). ``StaticEncryptedCache.load`` opens it.

        First it drains the records and raises a pending failure, as ``check()`` does; a closed or expired
        session is refused (SAVE REFUSED records, SessionExpiredError / SessionClosedError); a held position
        without its chunk (a seal failed) is refused (SaveFileError). Nothing is written then. Every refusal,
        and a write that fails, leaves SAVE records with status REFUSED: one per layer and row, or
        one per session when no layer holds positions yet. A cache on a GPU is read back to the host here (it
        waits for the device): call it between steps, not inside a captured or compiled region."""
        if self._ctx.closed:
            raise ValueError("this StaticEncryptedCache is closed")
        dead = [slot for slot, s in enumerate(self._sessions) if not s.is_valid()]
        if dead:
            for slot in dead:
                self._ctx.auditor.session(Op.SAVE, slot, status=Status.REFUSED, now=True)
            self._sessions[dead[0]].check_valid()
        try:
            self.check()
            parts = [layer.saved() for layer in self.layers]
            manifest = {"mode": STATIC_MODE, "max_cache_len": self.max_cache_len,
                        "layers": [desc for desc, _ in parts]}
            file_id = write_savefile(path, self._sessions, manifest, [data for _, data in parts])
        except BaseException:
            self._refuse_save()
            raise
        self._record_file(Op.SAVE, Status.OK)
        return file_id

    def _refuse_save(self) -> None:
        """SAVE REFUSED records: one per layer and row, or one per session when no layer holds positions."""
        if any(layer.is_initialized for layer in self.layers):
            self._record_file(Op.SAVE, Status.REFUSED)
        else:
            for slot in range(len(self._sessions)):
                self._ctx.auditor.session(Op.SAVE, slot, status=Status.REFUSED, now=True)

    def _record_file(self, op: Op, status: Status) -> None:
        """One ``op`` record per layer and row (positions held, chunk bytes per row)."""
        for layer in self.layers:
            if layer.is_initialized:
                first, end = layer.held_range()
                rows = self._ctx.row_slots
                self._ctx.auditor.rows(op, layer.layer_idx, rows, np.arange(rows.size), status=status, now=True,
                                       pos_start=first, pos_count=end - first,
                                       nbytes=(end - first) * int(layer.arena.shape[2]))

    @classmethod
    def load(cls, path, config, sessions: TenantSession | Sequence[TenantSession],
             audit: KVAuditLog | None = None, device: torch.device | str = "cpu", **kwargs):
        """Open a file written by ``StaticEncryptedCache.save`` as a new static cache (``max_cache_len`` and
        the rows' sessions as saved; ``device``: where its tensors are made, as the first update would make
        them; ``kwargs``: the constructor's ``backend``, ``audit_records``, ``nonce_reserve``). One LOAD record
        per layer and row.

        What opening needs is what ``EncryptedCache.load`` needs: for every session of the file, a session
        with the same tenant id, session id and key material (the live one, one rebuilt from the tenant's key
        material, or one imported), still holding the keys of the file's epochs not later than its own. The
        manifest tags are checked first, then the chunk list, then every chunk is opened into the plaintext
        buffers, every tag verified (DECRYPT records). Only then do the sessions keep what the file says of
        them and the cache reserve its nonce ranges.

        SaveFileError, with nothing returned and the sessions left as they were, for a truncated or changed
        file, another tenant's or session's file, another branch's, a file that is not a static cache's, an
        edited chunk list or a chunk whose tag fails (LOAD REFUSED or AUTH_FAILED records); ValueError when
        ``config`` does not describe the saved layers."""
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            raise TypeError(f"device must be a torch.device or a device name, got {device!r}") from None
        if isinstance(sessions, TenantSession):
            sessions = [sessions]
        if not isinstance(sessions, (list, tuple)) or not all(isinstance(s, TenantSession) for s in sessions):
            raise TypeError("sessions must be a TenantSession or a list of them")
        adopted: list = []
        try:
            contents = read_savefile(path, sessions)
            manifest = contents.manifest
            if manifest.get("mode") != STATIC_MODE:
                raise SaveFileError(f"this save file holds an EncryptedCache (mode {manifest.get('mode')!r}), not "
                                    "a StaticEncryptedCache: open it with EncryptedCache.load")
            try:
                max_cache_len = check_int("max_cache_len", manifest.get("max_cache_len"), 1)
            except (TypeError, ValueError):
                raise SaveFileError("save file manifest: max_cache_len is malformed") from None
            try:
                for s, lineage, epochs in zip(contents.sessions, contents.lineages, contents.epochs):
                    adopted.append(s.adopt(lineage, epochs))
            except KVCacheError as exc:     # closed or expired since, or a chunk epoch's key is retired
                raise SaveFileError(f"the save file's sessions cannot open it: {exc}") from exc
        except SaveFileError:
            for _, undo in reversed(adopted):
                undo()
            refuse_load(audit, sessions)
            raise
        opening = False     # once every chunk is opened, its tag check writes the LOAD records
        try:
            cache = cls(config, contents.sessions, max_cache_len, audit=audit, **kwargs)
            try:
                held = cache._fill_saved(manifest["layers"], contents.layer_data, device)
                opening = True
                if held:
                    cache._record_opened()
            except BaseException:
                cache.close()
                raise
        except BaseException:
            for _, undo in reversed(adopted):
                undo()
            if not opening:     # the file verified, yet this config or its layer descriptions refuse it
                refuse_load(audit, sessions)
            raise
        for commit, _ in adopted:
            commit()
        cache.refill_nonces()       # only now: under the epochs the sessions stand at after the load
        return cache

    def _fill_saved(self, descs: list, data: list, device: torch.device) -> bool:
        """Fill the layers from a verified save file and open every chunk they took (the tags are checked by
        ``_record_opened``); whether any layer holds positions."""
        if len(descs) != len(self.layers):
            raise ValueError(f"the save file holds {len(descs)} layers, this config {len(self.layers)}")
        first = next((d for d in descs if isinstance(d, dict) and d.get("initialized")), None)
        slot_map = self._ctx.prompt_slots          # the file's session slot -> this cache's
        rows = None
        if first is not None:
            try:
                rows = np.array(first["row_slots"], dtype=np.int64)
                if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= slot_map.size:
                    raise ValueError
            except (KeyError, TypeError, ValueError, OverflowError):
                raise SaveFileError("save file: malformed row slots") from None
            rows = slot_map[rows]
            self._ctx.start(int(rows.size), device, rows=rows, reserve=False)
        for layer, desc, chunk_bytes in zip(self.layers, descs, data):
            if isinstance(desc, dict) and desc.get("initialized") and desc.get("row_slots") != first["row_slots"]:
                raise SaveFileError(f"save file: layer {layer.layer_idx} maps its rows to other sessions")
            layer.load_saved(desc, chunk_bytes, slot_map, rows)
        if rows is None:
            return False
        for layer in self.layers:
            layer.open_released()
        self._ctx.drain()
        return True

    def _record_opened(self) -> None:
        """Check every opened chunk's tag and record the load (OK, or AUTH_FAILED and SaveFileError)."""
        try:
            self._ctx.failures.check(self._sessions)
        except KVCacheError as exc:     # a tag that failed, or a chunk whose key or session is gone
            self._record_file(Op.LOAD, Status.AUTH_FAILED)
            raise SaveFileError(f"a save file chunk could not be opened ({exc}); nothing is loaded") from exc
        self._record_file(Op.LOAD, Status.OK)
