"""The gateway's tenant sessions kept as sealed exports, so that they outlive its process.

A :class:`SessionVault` holds one file per tenant in a private directory (mode 0700): the tenant's live
session sealed by ``pqc_kv_cache.resumption.export_session`` under a key-encryption key (KEK) file. The
gateway calls :meth:`SessionVault.keep` with a session when it opens one and the key service calls it after
each reservation, before the worker learns the epoch: a session whose epoch, branch points or live epochs
changed is written again (atomically: a new file renamed over the old), so the file always knows every
epoch a worker may have sealed under. Closing a session (``TenantIsolationManager.close_session``, expiry
replaced by a new session) deletes its file: a closed session does not come back after a restart.

On start, :meth:`SessionVault.restore` imports every tenant's file into the manager. An imported session
owns no epoch (``docs/cache.md``: the process that exported it may have sealed under its current epoch), so
restore opens a branch epoch at once (a rotation under 16 fresh random bytes) and saves that before anything
is served: blocks sealed before the restart open under the keys of the earlier epochs, which the export
holds, and every block sealed after it uses the branch epoch's key, which no earlier process derived, so no
(key, nonce) pair is used twice. An expired session's file is deleted; a file that does not open under the
KEK fails the restore (``SessionVaultError``) rather than silently dropping a tenant's session.

Keep the KEK file outside the vault's directory (refused otherwise): whoever holds both holds every
tenant's session keys.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import threading

from ..errors import KVCacheError, SessionExpiredError, SessionExportError
from ..isolation import TenantIsolationManager
from ..keyschedule import wipe
from ..resumption import MAX_EXPORT_SIZE, export_session, import_session, load_kek_file
from ..session import TenantSession

__all__ = ["SessionVault", "SessionVaultError"]

_SUFFIX = ".pkvs"


class SessionVaultError(KVCacheError):
    """The session vault's directory or KEK file is unusable, or a saved session cannot be read or written."""


def _private_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise SessionVaultError(f"session vault {path!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise SessionVaultError(f"session vault {path!r} must be a directory owned by uid {os.getuid()} with "
                                f"mode 0700 (it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    return path


class SessionVault:
    """Tenant sessions sealed under the KEK in ``kek_file``, one file per tenant in ``directory`` (see the
    module docstring). ``generate_kek_file`` (``pqc_kv_cache.resumption``) makes the KEK file."""

    def __init__(self, directory: str, kek_file: str):
        self.directory = _private_dir(directory)
        kek_path = os.path.realpath(os.path.expanduser(kek_file))
        if os.path.commonpath([kek_path, os.path.realpath(self.directory)]) == os.path.realpath(self.directory):
            raise SessionVaultError(f"the KEK file {kek_file!r} must not be kept in the session vault's directory")
        try:
            wipe(load_kek_file(kek_file))               # refused now (missing, loose, not a KEK), not at a save
        except SessionExportError as e:
            raise SessionVaultError(str(e)) from None
        self.kek_file = kek_file
        self._lock = threading.Lock()
        self._saved: dict[str, tuple] = {}               # tenant -> what its file holds (session id, lineage)

    def __repr__(self) -> str:
        return f"SessionVault({self.directory!r})"

    def path_of(self, tenant_id: str) -> str:
        """The file of a tenant's session (named by a hash of the tenant id)."""
        name = hashlib.sha256(b"pqc_kv_cache/vllm-session\x00" + tenant_id.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.directory, name + _SUFFIX)

    @staticmethod
    def _mark(session: TenantSession) -> tuple:
        return (session.session_id, session.epoch, tuple(sorted(session.branches.items())),
                tuple(session.live_epochs))

    def keep(self, session: TenantSession) -> TenantSession:
        """Save ``session`` unless its file already holds it at this epoch, branch points and live epochs;
        returns it. SessionVaultError if the file cannot be written (the caller must not serve the epoch)."""
        if not isinstance(session, TenantSession):
            raise TypeError(f"session must be a TenantSession, got {type(session).__name__}")
        with self._lock:
            mark = self._mark(session)
            if self._saved.get(session.tenant_id) == mark:
                return session
            if self._saved.get(session.tenant_id, (None,))[0] != session.session_id:
                # watched before its file exists: a close from now on deletes it (a closed session's
                # export raises instead of being written)
                session.on_close(self._forget)
            self._write(session)
            self._saved[session.tenant_id] = mark
        return session

    def _write(self, session: TenantSession) -> None:
        blob = export_session(session, self.kek_file)
        path = self.path_of(session.tenant_id)
        tmp = f"{path}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)                           # the rename itself survives a crash
            finally:
                os.close(dfd)
        except OSError as e:
            raise SessionVaultError(f"cannot save the session of tenant {session.tenant_id!r} in "
                                    f"{self.directory!r}: {e.strerror}") from None

    def _forget(self, session: TenantSession) -> None:
        """A closed session's file is deleted, unless it holds a newer session of the tenant by now."""
        with self._lock:
            if self._saved.get(session.tenant_id, (None,))[0] != session.session_id:
                return
            del self._saved[session.tenant_id]
            try:
                os.unlink(self.path_of(session.tenant_id))
            except FileNotFoundError:
                pass

    def restore(self, manager: TenantIsolationManager) -> list[TenantSession]:
        """Import every saved session into ``manager``, each moved onto a branch epoch of its own and saved
        so (see the module docstring); expired ones are deleted. Returns the sessions restored."""
        if not isinstance(manager, TenantIsolationManager):
            raise TypeError(f"manager must be a TenantIsolationManager, got {type(manager).__name__}")
        out = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if not name.endswith(_SUFFIX):
                continue
            try:
                with open(path, "rb") as f:
                    blob = f.read(MAX_EXPORT_SIZE + 1)
                session = import_session(blob, self.kek_file)
            except SessionExpiredError:
                os.unlink(path)
                continue
            except (OSError, SessionExportError) as e:
                raise SessionVaultError(f"saved session {path!r}: {e}") from None
            if path != self.path_of(session.tenant_id):
                raise SessionVaultError(f"saved session {path!r} holds tenant {session.tenant_id!r}, whose file "
                                        "it is not")
            manager.add_session(session)
            manager.rotate(session.tenant_id)           # a branch epoch: this process's own (recorded)
            out.append(self.keep(session))
        return out
