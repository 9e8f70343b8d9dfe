"""Clean-up of the connector's store: the blocks of ended sessions, blocks unused for too long, and the least
recently used blocks beyond a byte quota are deleted, each deletion recorded (no vLLM, no keys).

What the store's layout (``pqc_kv_cache.vllm.storefiles``) tells without the server secret:

* **ended sessions**: a tenant has one live session at a time (the key service serves keys of no other), so
  in a tenant's directory every session directory older than the newest (by its ``.created`` marker) is of
  a closed or expired session, whose blocks no key will open again: they are deleted, directory and all
  (sessions whose markers have the same time are all kept). A session directory appears with its marker
  in it; one without (made by an earlier version, or abandoned) is skipped, and reported, until it has not
  changed for ``MARKER_GRACE`` seconds, then deleted as abandoned. A marker is removed only with its
  directory;
* **last use** of a block: its file's access time, which a load sets, or its modification time (its save)
  if later; ``max_age`` deletes blocks unused for longer (a session that expired with no successor has
  no use after its expiry, so this deletes it too), ``max_bytes`` then deletes the least recently used
  blocks until the store's block files fit the quota;
* left-over temporary files of a writer that died mid-write, and session directories it was still making
  (older than ``TMP_AGE`` seconds), are deleted.

Nothing else is touched: an entry whose name is not one the connector makes, a link, or a directory that is
not the server's is left as it is and counted as skipped. Deleting a block an engine is about to load makes
that load a recorded refusal, and vLLM computes the block again.

Each deleted block (or session directory, or temporary file) is one DELETE record in the given audit log, with the tenant
directory's and block's names (MACs; the clean-up does not know tenant ids) and the reason.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

from ..audit import KVAuditLog
from .storefiles import BLOCK_SUFFIX, CREATED

__all__ = ["GCReport", "collect_garbage", "TMP_AGE", "MARKER_GRACE"]

TMP_AGE = 3600                 # seconds after which a writer's temporary file is taken as left over
MARKER_GRACE = 3600            # seconds after which a session directory without its marker is taken as abandoned
_NAME = re.compile(r"[0-9a-f]{32}")
_BLOCK = re.compile(r"[0-9a-f]{64}" + re.escape(BLOCK_SUFFIX))
_TMP = re.compile(r"\..*\.tmp")
_U32 = (1 << 32) - 1           # a record's byte count; a larger file's size is in its details
_LEFT_OVER = "left over by a writer that stopped mid-write"


@dataclass
class _Block:
    path: str
    tenant: str
    session: str
    size: int
    used_ns: int


@dataclass
class GCReport:
    """What a clean-up found and did (sizes are of block files)."""

    blocks: int = 0
    bytes: int = 0
    deleted_blocks: int = 0
    deleted_bytes: int = 0
    deleted_sessions: int = 0
    deleted_temporaries: int = 0
    skipped: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def kept_bytes(self) -> int:
        return self.bytes - self.deleted_bytes


def _dir_ok(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _idle_since(path: str, now: int, seconds: int) -> bool:
    """Whether ``path`` (a directory) has not changed for more than ``seconds``."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return now - max(st.st_mtime_ns, st.st_ctime_ns) > seconds * 10**9


def _remove_session_dir(sdir: str, created: int | None) -> bool:
    """Remove an ended session's directory if only its marker is left in it; the marker is removed only
    together with the directory (put back, with its time, if the directory cannot go)."""
    try:
        left = os.listdir(sdir)
    except OSError:
        return False
    if any(name != CREATED for name in left):
        return False
    marker = os.path.join(sdir, CREATED)
    try:
        if left:
            os.unlink(marker)
        os.rmdir(sdir)
        return True
    except FileNotFoundError:
        return not os.path.lexists(sdir)     # another clean-up removed it first
    except OSError:
        if left and created is not None:     # a file appeared in the meantime: the directory stays marked
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                os.utime(marker, ns=(created, created), follow_symlinks=False)
            except OSError:
                pass
        return False


def collect_garbage(storage: str, *, max_bytes: int | None = None, max_age: float | None = None,
                    log: KVAuditLog | None = None, now_ns: int | None = None,
                    progress: Callable[[str], None] | None = None) -> GCReport:
    """Delete from the store at ``storage`` the blocks of ended sessions, blocks unused for more than
    ``max_age`` seconds, then the least recently used blocks until at most ``max_bytes`` bytes of blocks
    remain; each deletion is a DELETE record in ``log`` (if given). ``progress`` gets a line per phase."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, (int, float)) or
                                not max_age >= 0 or max_age == float("inf")):
        raise ValueError(f"max_age must be a finite number of seconds >= 0, got {max_age!r}")
    try:
        st = os.stat(storage)                  # the root may be a link an operator made, as for the connector
    except OSError as e:
        raise ValueError(f"no store at {storage!r} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ValueError(f"{storage!r} is not a directory of uid {os.getuid()}")
    now = time.time_ns() if now_ns is None else now_ns
    say = progress or (lambda _line: None)
    rep = GCReport()

    def record(tenant: str, what: str, size: int, reason: str) -> None:
        rep.reasons[reason] = rep.reasons.get(reason, 0) + 1
        if log is not None:
            log.log_event("delete", tenant, "", position_count=0, nbytes=min(size, _U32),
                          details=f"vllm-store gc: {what} of {size} bytes deleted ({reason})")

    def unlink(path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False              # another clean-up or a load's removal got there first

    live: list[_Block] = []
    for tenant in sorted(os.listdir(storage)):
        tdir = os.path.join(storage, tenant)
        if not _NAME.fullmatch(tenant) or not _dir_ok(tdir):
            rep.skipped.append(tdir)
            continue
        sessions = []
        for session in os.listdir(tdir):
            sdir = os.path.join(tdir, session)
            if _TMP.fullmatch(session) and _dir_ok(sdir):
                # a session directory a writer was making (it holds at most the marker) when it stopped
                if _idle_since(sdir, now, TMP_AGE) and _remove_session_dir(sdir, None):
                    rep.deleted_temporaries += 1
                    record(tenant, f"temporary session directory {session}", 0, _LEFT_OVER)
                elif os.path.lexists(sdir):
                    rep.skipped.append(sdir)
                continue
            if not _NAME.fullmatch(session) or not _dir_ok(sdir):
                rep.skipped.append(sdir)
                continue
            try:
                created = os.lstat(os.path.join(sdir, CREATED)).st_mtime_ns
            except OSError:
                created = None
            if created is None:
                # no marker: a directory an earlier version was still making, or abandoned; never the oldest
                if not _idle_since(sdir, now, MARKER_GRACE):
                    rep.skipped.append(sdir)
                    continue
            sessions.append((created, session, sdir))
        marked = [c for c, _, _ in sessions if c is not None]
        newest = max(marked, default=None)
        for created, session, sdir in sorted(sessions, key=lambda e: (e[0] is not None, e[0] or 0, e[1])):
            # ended: older than the newest marked session (sessions tied with it are all kept), or without
            # a marker and untouched for longer than the grace period
            ended = created is None or created < newest
            reason = "its session ended" if created is not None else "its session directory was left unmarked"
            for name in os.listdir(sdir):
                path = os.path.join(sdir, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if name == CREATED:
                    continue
                if _TMP.fullmatch(name) and stat.S_ISREG(st.st_mode):
                    if now - st.st_mtime_ns > TMP_AGE * 10**9 and unlink(path):
                        rep.deleted_temporaries += 1
                        record(tenant, f"temporary file {session}/{name}", st.st_size, _LEFT_OVER)
                    continue
                if not _BLOCK.fullmatch(name) or not stat.S_ISREG(st.st_mode):
                    rep.skipped.append(path)
                    continue
                rep.blocks += 1
                rep.bytes += st.st_size
                b = _Block(path, tenant, session, st.st_size, max(st.st_atime_ns, st.st_mtime_ns))
                if ended:
                    if unlink(path):
                        rep.deleted_blocks += 1
                        rep.deleted_bytes += b.size
                        record(tenant, f"block {session}/{name}", b.size, reason)
                else:
                    live.append(b)
            if ended:
                if _remove_session_dir(sdir, created):
                    rep.deleted_sessions += 1
                    record(tenant, f"session directory {session}", 0, reason)
                else:
                    rep.skipped.append(sdir)           # something not the connector's is left in it
    say(f"scanned {rep.blocks} block(s), {rep.bytes} bytes; {rep.deleted_blocks} of ended sessions deleted")
    if max_age is not None:
        cutoff = now - int(max_age * 10**9)
        keep = []
        for b in live:
            if b.used_ns < cutoff:
                if unlink(b.path):
                    rep.deleted_blocks += 1
                    rep.deleted_bytes += b.size
                    record(b.tenant, f"block {b.session}/{os.path.basename(b.path)}", b.size,
                           f"unused for more than {max_age:g} s")
            else:
                keep.append(b)
        live = keep
        say(f"max age {max_age:g} s: {rep.reasons.get(f'unused for more than {max_age:g} s', 0)} block(s) deleted")
    if max_bytes is not None:
        total = sum(b.size for b in live)
        n = 0
        for b in sorted(live, key=lambda b: (b.used_ns, b.path)):      # least recently used first
            if total <= max_bytes:
                break
            if unlink(b.path):
                rep.deleted_blocks += 1
                rep.deleted_bytes += b.size
                n += 1
                record(b.tenant, f"block {b.session}/{os.path.basename(b.path)}", b.size,
                       f"least recently used beyond the quota of {max_bytes} bytes")
            total -= b.size
        say(f"quota {max_bytes} bytes: {n} least recently used block(s) deleted")
    if log is not None:
        log.flush(timeout=60)
    return rep
