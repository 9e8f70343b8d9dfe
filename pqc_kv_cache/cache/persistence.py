"""Save files for the cache: ``save`` and ``load``, as a part of ``EncryptedCache`` (a mixin of it).

The file format and its verification are in ``savefile.py``; this module moves a cache's layers to and
from it, records SAVE and LOAD, and makes the sessions that load a file take what it says of them
(``TenantSession.adopt``): a session that loads a file in which another session sealed under its current
epoch (a newer file, or one saved before a crop dropped chunks whose counters were used) seals next under
a branch epoch of its own, so no (key, nonce) pair sealed before is ever used again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..audit.records import Op, Status
from ..errors import DecryptionError, KVCacheError, SaveFileError
from ..session import TenantSession
from .audit import refuse_load
from .savefile import read_savefile, write_savefile

if TYPE_CHECKING:   # for annotations only: the cache does not import the audit pipeline's log
    from ..audit.log import KVAuditLog

__all__ = ["SaveFiles"]


class SaveFiles:
    """``save`` / ``load`` of ``EncryptedCache`` (uses its layers, sessions and layer context)."""

    def save(self, path) -> bytes:
        """Write this cache's ciphertext and metadata to ``path`` (the file appears whole or not at all);
        returns the file's random id. One SAVE record per layer and row.

        The file holds every layer's live chunks exactly as stored (AES-256-GCM, envelope v1: no plaintext
        K/V, no keys), their chunk table, layout, dtype, layer kinds, positions and the residency mode, each
        session's epoch, nonce counter high-water mark and branch points, and a manifest listing all of it,
        tagged under a per-file key derived from each session's current epoch key (see ``savefile.py``).
        ``EncryptedCache.load`` opens it with the same sessions. A closed or expired session is refused
        (SessionExpiredError, with SAVE REFUSED records for its rows)."""
        if self._ctx.closed:
            raise ValueError("this EncryptedCache is closed")
        self._refuse_dead(Op.SAVE)
        parts = [layer.saved() for layer in self.layers]
        manifest = {"mode": self.mode, "layers": [desc for desc, _ in parts]}
        try:
            file_id = write_savefile(path, self._sessions, manifest, [data for _, data in parts])
        except (KVCacheError, OSError):
            self._record_file(Op.SAVE, Status.REFUSED)      # nothing was written: the refusal is on record
            raise
        self._record_file(Op.SAVE, Status.OK)
        return file_id

    def _refuse_dead(self, op: Op) -> None:
        """If a session is closed or expired: ``op`` REFUSED records for its rows (for the session itself
        when no layer holds rows yet), then its SessionExpiredError."""
        dead = [slot for slot, s in enumerate(self._sessions) if not s.is_valid()]
        if not dead:
            return
        initialized = [layer for layer in self.layers if layer.is_initialized]
        for layer in initialized:
            for slot in dead:
                self._ctx.refuse(layer.layer_idx, layer.row_session_slots, op, layer.first_position,
                                 layer.cumulative_length - layer.first_position, only=slot)
        if not initialized:
            for slot in dead:
                self._ctx.auditor.session(op, slot, status=Status.REFUSED, now=True)
        self._sessions[dead[0]].check_valid()

    def _record_file(self, op: Op, status: Status) -> None:
        """One ``op`` record per layer and row (positions kept, bytes stored per row)."""
        auditor = self._ctx.auditor
        for layer in self.layers:
            if layer.is_initialized:
                slots = layer.row_session_slots
                auditor.rows(op, layer.layer_idx, slots, np.arange(slots.size), status=status, now=True,
                             pos_start=layer.first_position,
                             pos_count=layer.cumulative_length - layer.first_position,
                             nbytes=int(layer.chunk_sizes().sum()))

    @classmethod
    def load(cls, path, config, sessions: TenantSession | Sequence[TenantSession], audit: KVAuditLog | None = None,
             *, device: "torch.device | str" = "cpu", mode: str | None = None, **kwargs):
        """Open a file written by ``save`` as a new cache on ``device``, in the saved mode (or ``mode``);
        ``kwargs`` are the constructor's (policy, backend, merge settings). One LOAD record per layer and row.

        What opening needs: for every session of the file, a session in ``sessions`` with the same tenant id
        and session id and the same key material: the live session that saved it, one rebuilt from the
        tenant's key material (``resumption.resume_session``, or ``TenantSession`` over the same shared
        secret), or one imported from a sealed export (``resumption.import_session``); it must still hold
        the keys of the file's epochs that are not later than its own. The manifest tags are checked first,
        then every chunk's tag (DECRYPT records); in the working-set mode the opened K/V become the working
        set, in the sealed mode they are wiped.

        Each session then holds the keys of the file's epochs and stands at least at the file's epoch. A
        session that could collide with what the file's session sealed (the file stands at a later epoch,
        or at the same epoch with a higher counter high-water mark, or the session was rebuilt or imported)
        seals next under a branch epoch of its own (``TenantSession.adopt``).

        SaveFileError, with nothing returned and the sessions left as they were, for a truncated or changed
        file, another tenant's or session's file, a file of another branch of the session, an edited chunk
        list (a chunk dropped, reordered, replaced, duplicated or taken from another file) or a chunk whose
        tag fails (LOAD REFUSED or AUTH_FAILED records); ValueError when ``config`` does not describe the
        saved layers."""
        if isinstance(sessions, TenantSession):
            sessions = [sessions]
        if not isinstance(sessions, (list, tuple)) or not all(isinstance(s, TenantSession) for s in sessions):
            raise TypeError("sessions must be a TenantSession or a list of them")
        adopted: list = []
        try:
            contents = read_savefile(path, sessions)
            if contents.manifest.get("mode") == "static":
                raise SaveFileError("this save file holds a StaticEncryptedCache: open it with "
                                    "StaticEncryptedCache.load")
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
        manifest = contents.manifest
        try:
            try:
                cache = cls(config, contents.sessions, audit=audit,
                            mode=manifest.get("mode") if mode is None else mode, **kwargs)
            except ValueError:              # a config or mode the file's layers cannot be opened with
                refuse_load(audit, sessions)
                raise
            try:
                descs = manifest["layers"]
                try:
                    if len(descs) != len(cache.layers):
                        raise ValueError(f"the save file holds {len(descs)} layers, this config "
                                         f"{len(cache.layers)}")
                    cache._fill_saved(descs, contents.layer_data, torch.device(device))
                except (SaveFileError, ValueError):     # refused before any chunk was opened
                    refuse_load(audit, sessions)
                    raise
                cache._open_saved()                     # AUTH_FAILED or OK records
            except BaseException:
                cache.close()
                raise
        except BaseException:
            for _, undo in reversed(adopted):
                undo()
            raise
        for commit, _ in adopted:
            commit()
        return cache

    def _fill_saved(self, descs: list, data: list, device: torch.device) -> None:
        """Fill the layers from a verified save file (SaveFileError or ValueError for one that does not fit)."""
        slot_map = self._ctx.prompt_slots        # the file's session slot -> this cache's
        first = next((d for d in descs if d.get("initialized")), None)
        if first is not None:
            try:
                rows = np.array(first["row_slots"], dtype=np.int64)
                if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= slot_map.size:
                    raise ValueError
            except (KeyError, TypeError, ValueError, OverflowError):
                raise SaveFileError("save file: malformed row slots") from None
            self._ctx.row_slots = slot_map[rows]
        for layer, desc, chunk_bytes in zip(self.layers, descs, data):
            layer.load_saved(desc, chunk_bytes, slot_map, device)
            if layer.is_initialized and not np.array_equal(layer.row_session_slots, self._ctx.row_slots):
                raise SaveFileError(f"save file: layer {layer.layer_idx} maps its rows to other sessions")

    def _open_saved(self) -> None:
        """Open every chunk of the filled layers, every tag verified; one LOAD record per layer and row (status
        AUTH_FAILED and SaveFileError when a tag fails)."""
        try:
            try:
                for layer in self.layers:
                    layer.verify_chunks()
                self._ctx.check_backend()
            finally:
                self.wipe_scratch()     # the sealed mode opened each layer into the scratch
        except DecryptionError as exc:
            self._record_file(Op.LOAD, Status.AUTH_FAILED)
            raise SaveFileError(f"save file chunk failed authentication ({exc}); nothing is loaded") from exc
        self._record_file(Op.LOAD, Status.OK)
