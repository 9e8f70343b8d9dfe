"""One writer per audit log file: an exclusive, non-blocking ``flock`` on the log file itself.

Two writers appending to one log interleave frames: the chain breaks and records are lost. The lock
is taken on the log file (no extra lock file to leave behind) before anything is read or written,
and held until the writer closes or abandons it. ``flock`` locks belong to an open file
description, so two writers in one process exclude each other as two processes do. Readers
(``audit verify``, ``audit show``) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import AuditError


class WriterLock:
    """The exclusive write lock of one log file; ``release()`` (idempotent) gives it up."""

    def __init__(self, path: str):
        self.path = path
        existed = os.path.lexists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise AuditError(f"cannot open audit log {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditError(f"cannot lock audit log {path}: {e.strerror}") from None
            who = f"process {holder}" if holder is not None else "another writer"
            if holder == os.getpid():
                who = "another KVAuditLog of this process"
            raise AuditError(f"audit log {path} is already open for writing by {who}: one log has one writer "
                             f"(close that KVAuditLog first, or give this one another path; "
                             f"`audit verify` and `audit show` read it without a lock)") from None
        self._fd: int | None = fd
        self.created = not existed

    def release(self, remove_if_created: bool = False) -> None:
        """Give up the lock; ``remove_if_created``: also delete the (empty) file this lock created."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove_if_created and self.created:
            try:
                if os.fstat(fd).st_size == 0:
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks where the system has it."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None
