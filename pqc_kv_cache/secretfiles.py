"""Files that hold a secret (signing keys, key-encryption keys, server secrets): one set of rules.

Creating: ``~`` expanded, missing parent folders made with mode 0700, the file created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (so it is never readable by others, not even for a
moment), written and fsynced; an existing file (or a link in its place) is never replaced, and a
half-written file is removed. Reading: the file opened without following a link and without blocking
(a FIFO cannot stall the reader), refused unless it is a regular file that neither group nor others may
access (POSIX), and read within a size bound. Every failure is the caller's error class, naming the
file and what it is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["create_secret_file", "read_secret_file", "expand"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def expand(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.expanduser(os.fspath(path)))


def create_secret_file(path: str | os.PathLike[str], data: bytes | bytearray, what: str,
                       error: type[Exception]) -> Path:
    """Write ``data`` to a new file at ``path`` under the rules above; ``what`` names it in errors."""
    p = expand(path)
    try:
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, 0o600)
    except FileExistsError:
        raise error(f"{what} {os.fspath(p)!r} exists already; it is never overwritten") from None
    except OSError as e:
        raise error(f"cannot create {what} {os.fspath(p)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        p.unlink(missing_ok=True)   # a half-written file would be refused later: leave nothing
        raise error(f"cannot write {what} {os.fspath(p)!r}: {e.strerror}") from None
    return p


def read_secret_file(path: str | os.PathLike[str], max_bytes: int, what: str,
                     error: type[Exception]) -> bytearray:
    """The contents of the secret file at ``path`` (at most ``max_bytes``; wipe them after use)."""
    p = expand(path)
    try:
        fd = os.open(p, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY)
    except FileNotFoundError:
        raise error(f"{what} {os.fspath(p)!r} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {os.fspath(p)!r}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {os.fspath(p)!r} is not a regular file")
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise error(f"{what} {os.fspath(p)!r} is accessible by group or others "
                        f"(mode {stat.S_IMODE(mode):o}); restrict it with chmod 600")
        data = bytearray(max_bytes + 1)
        view, n = memoryview(data), 0
        while n < len(data):
            got = os.readv(fd, [view[n:]])
            if got == 0:
                break
            n += got
        view.release()   # the buffer is resized below
    except OSError as e:
        raise error(f"cannot read {what} {os.fspath(p)!r}: {e.strerror}") from None
    finally:
        os.close(fd)
    if n > max_bytes:
        data[:] = bytes(len(data))
        raise error(f"{what} {os.fspath(p)!r} is larger than a {what} can be ({max_bytes} bytes at most)")
    del data[n:]
    return data
