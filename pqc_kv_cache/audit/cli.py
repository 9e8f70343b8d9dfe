"""``audit verify``, ``audit show`` and ``audit keygen``: the command line of the persisted audit log.

``register(subparsers)`` adds the ``audit`` command to an argparse
subparsers object; each leaf sets ``func(args) -> int`` (the exit code).

Exit codes of ``verify``: 0 intact and cleanly closed; 1 integrity failure
(the first bad record is named; this includes anything appended after a
clean close without the writer's signed REOP frame); 2 the log or key cannot be read;
3 intact so far but not closed (the writer crashed: unclosed tail), or ending with a signed close that
no seal records as the end (the seal was deleted, or the writer died before writing it).
``show`` exits 0, or 1 when the log fails verification (after printing the
records read before the failure, with the error on stderr), or 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import textwrap

import numpy as np
from cryptography.hazmat.primitives import serialization

from ..errors import KVCacheError
from .fileformat import MAGIC, pub_path
from .keys import generate_signing_key_file, public_key_fingerprint_hex
from .records import NONE16, OP_NAMES, Status, op_from_name
from .verify import verify_log

__all__ = ["register", "EXIT_OK", "EXIT_INTEGRITY", "EXIT_UNREADABLE", "EXIT_UNCLOSED"]

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_UNREADABLE = 2
EXIT_UNCLOSED = 3

_OP_NAME: dict[int, str] = {int(op): name for op, name in OP_NAMES.items()}


def _iso(ns) -> str:
    return _dt.datetime.fromtimestamp(int(ns) / 1e9, tz=_dt.timezone.utc).isoformat()


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def _layer(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -1 <= n < NONE16:
        raise argparse.ArgumentTypeError(f"a layer is 0..{NONE16 - 1}, or -1 for records without one; got {n}")
    return n


def _position(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= n <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"a position is 0..{0xFFFF_FFFF}, got {n}")
    return n


_PUBLIC_KEY_HELP = ("the log's ML-DSA-65 public key, PEM or 1952 raw bytes (default: PATH.pub); pass a key "
                    "obtained independently to detect a log rewritten and signed again with another key")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``audit {verify,show,keygen}`` to ``subparsers``; returns the ``audit`` parser."""
    audit = subparsers.add_parser("audit", help="verify or show a persisted audit log, or create a signing key",
                                  description="The persisted, signed audit log.")
    sub = audit.add_subparsers(dest="audit_command", metavar="{verify,show,keygen}")
    sub.required = True

    v = sub.add_parser("verify", help="check the hash chain, signatures and seal of an audit log",
                       description="Check the hash chain, signatures and seal of an audit log. Exit 0: intact, "
                                   "closed and signed; 1: integrity failure (the first bad record is named); "
                                   "2: the log or key cannot be read; 3: not closed (the writer crashed).")
    v.add_argument("path", help="the audit log file")
    v.add_argument("--public-key", metavar="FILE", help=_PUBLIC_KEY_HELP)
    v.set_defaults(func=_verify)

    s = sub.add_parser("show", help="print records of an audit log",
                       description="Verify an audit log and print its matching records, oldest first.")
    s.add_argument("path", help="the audit log file")
    s.add_argument("--public-key", metavar="FILE", help=_PUBLIC_KEY_HELP)
    s.add_argument("--tenant", metavar="T", help="only records of this tenant id")
    s.add_argument("--layer", metavar="L", type=_layer, help="only records of this layer (-1: records without one)")
    s.add_argument("--position", metavar="P", type=_position,
                   help="only records whose position range contains P")
    s.add_argument("--operation", metavar="OP", help="only this operation: one of " + ", ".join(OP_NAMES.values()))
    s.add_argument("--limit", metavar="N", type=_positive_int, default=None,
                   help="print at most N records (the newest)")
    s.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    s.set_defaults(func=_show)

    k = sub.add_parser("keygen", help="create a signing key file for audit logs",
                       description="Create a new ML-DSA-65 signing key in FILE (PKCS#8 PEM, mode 0600; an "
                                   "existing file is never overwritten), for KVAuditLog(path, signing_key=FILE). "
                                   "Keep it outside the folder of the logs it signs.")
    k.add_argument("file", help="where to write the private key (~ is expanded)")
    k.add_argument("--public-key", metavar="FILE",
                   help="also write the public key (PEM) here, to verify logs with independently of PATH.pub")
    k.set_defaults(func=_keygen)
    return audit


def _missing_log(command: str, path: str, public_key: str | None = None) -> bool:
    """Say what is wrong with ``path`` itself (missing, a folder, not a log), rather than let the
    first file looked at (the public key beside it) name itself as missing."""
    if not os.path.exists(path):
        problem = "no audit log at " + path
    elif os.path.isdir(path):
        logs = sorted(n for n in os.listdir(path) if n.endswith((".kvlog", ".log")))[:3]
        hint = f" (it holds {', '.join(logs)})" if logs else ""
        problem = f"{path} is a directory; give the audit log file itself{hint}"
    elif not os.path.isfile(path):
        problem = f"{path} is not a regular file"
    elif public_key is None and not os.path.exists(pub_path(path)) and not _starts_like_a_log(path):
        problem = (f"{path} is not a pqc_kv_cache audit log (it does not start with the "
                   f"{MAGIC.decode()} header)")
    else:
        return False
    print(f"audit {command}: {problem}", file=sys.stderr)
    return True


def _starts_like_a_log(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return True   # unreadable: verify says why


def _keygen(args) -> int:
    pub_file = os.path.expanduser(args.public_key) if args.public_key else None
    if pub_file is not None and os.path.exists(pub_file):
        print(f"audit keygen: {pub_file} exists already; it is never overwritten", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        key = generate_signing_key_file(args.file)
    except KVCacheError as e:
        print(f"audit keygen: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if pub_file is not None:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            with open(pub_file, "xb") as f:
                f.write(pem)
        except OSError as e:
            os.unlink(os.path.expanduser(args.file))   # all or nothing: no key without its requested public file
            print(f"audit keygen: cannot write public key {pub_file}: {e.strerror}; no key was kept",
                  file=sys.stderr)
            return EXIT_UNREADABLE
    print(f"signing key written to {os.path.expanduser(args.file)} (mode 0600); "
          f"public key fingerprint (SHA-256) {public_key_fingerprint_hex(key)}")
    return EXIT_OK


def _verify(args) -> int:
    if _missing_log("verify", args.path, args.public_key):
        return EXIT_UNREADABLE
    try:
        rep = verify_log(args.path, args.public_key)
    except KVCacheError as e:
        print(f"audit verify: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if not rep.ok:
        print(f"FAILED {args.path}: {rep.error}")
        print(f"first bad record: {rep.bad_record}")
        return EXIT_INTEGRITY
    span = ("no records" if rep.first_ts_ns is None
            else f"from {_iso(rep.first_ts_ns)} to {_iso(rep.last_ts_ns)}")
    if rep.unsealed_close:
        print(f"UNCLOSED {args.path}: {rep.records} records {span}; the log ends with a signed close, but no "
              f"seal says it ended there ({'the seal is one of an earlier re-open' if rep.reopen_sealed else 'no seal'}"
              f"): records written after this close may have been cut off (or the writer crashed before "
              f"sealing)")
        return EXIT_UNCLOSED
    if rep.crash_tail:
        torn = f", and a torn final frame of {rep.torn_bytes} bytes" if rep.torn_bytes else ""
        print(f"UNCLOSED {args.path}: {rep.records} records {span}; the log was not closed (crash): "
              f"{rep.signed_records} records are covered by a signed checkpoint, "
              f"{rep.records - rep.signed_records} after it are only hash-chained "
              f"({rep.unsigned_frames} unsigned frame(s)){torn}")
        return EXIT_UNCLOSED
    recovered = f"; {rep.recovered_crashes} earlier crash(es) recovered" if rep.recovered_crashes else ""
    if rep.reopens:
        recovered += f"; re-opened after a clean close {rep.reopens} time(s) (signed REOP)"
    print(f"OK {args.path}: {rep.records} records {span}; closed and signed"
          f"{', sealed' if rep.sealed else ''}{recovered}")
    return EXIT_OK


def _show(args) -> int:
    try:
        op = None if args.operation is None else int(op_from_name(args.operation))
    except ValueError as e:
        print(f"audit show: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if _missing_log("show", args.path, args.public_key):
        return EXIT_UNREADABLE

    def select(recs, rep):
        """Filter each frame's records as they are verified, so only matches are kept in memory."""
        mask = np.ones(len(recs), dtype=bool)
        if args.tenant is not None:
            # the frame's own indices looked up by name (not the whole table scanned per frame: quadratic)
            col = recs["tenant_idx"]
            idx = [i for i in np.unique(col).tolist() if rep.tenants.get(i) == args.tenant]
            mask &= np.isin(col, np.array(idx, dtype=np.uint32))
        if args.layer is not None:
            mask &= recs["layer"] == (NONE16 if args.layer == -1 else args.layer)
        if args.position is not None:
            p = np.uint32(args.position)
            mask &= (recs["pos_start"] <= p) & ((p - recs["pos_start"]) < recs["pos_count"])
        if op is not None:
            mask &= recs["op"] == op
        return mask

    try:
        rep = verify_log(args.path, args.public_key, collect=select)
    except KVCacheError as e:
        print(f"audit show: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    sel = rep.all_records()
    if args.limit is not None:
        sel = sel[max(0, len(sel) - args.limit):]
    out = sys.stdout
    if len(sel) == 0:
        print("audit show: no matching records", file=sys.stderr)
    rows = [_row(r, rep) for r in sel]
    if args.json:
        for d in rows:
            out.write(json.dumps(d) + "\n")
    elif rows:
        out.write("\n".join(format_table(rows)) + "\n")
    if not rep.ok:
        print(f"audit show: log FAILED verification: {rep.error}", file=sys.stderr)
        return EXIT_INTEGRITY
    if rep.unsealed_close:
        print("audit show: the log is not sealed at its end; records after its last close may have been cut off",
              file=sys.stderr)
    elif rep.crash_tail:
        print(f"audit show: the log was not closed (crash); records after the last checkpoint "
              f"({rep.unsigned_frames} unsigned frame(s)) are unsigned", file=sys.stderr)
    return EXIT_OK


TABLE_WIDTH = 120
# the only operation name longer than the column; --operation still takes the full name
_SHORT_OPS = {"isolation-violation": "violation"}


def _fit(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` cut to ``width`` with an ellipsis (at the start where the end tells entries apart)."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[:width - 1] + "…"


def format_table(rows: list[dict]) -> list[str]:
    """Records as a table of at most TABLE_WIDTH columns, with a legend line (``--json`` has every field)."""
    days = {d["timestamp"][:10] for d in rows}
    one_day = len(days) == 1
    tw = 8 if one_day else 14
    head = (f"{'record':>7} {'time':<{tw}} {'operation':<12} {'status':<11} {'tenant':<10} {'session':<10} "
            f"{'layer':>5} {'row':>4} {'positions':>11} {'nonce':>10} {'bytes':>8} ")
    lines = [f"times UTC{' on ' + days.pop() if one_day else ''}; session: the end of its id (…); "
             f"long details on lines of their own; --json: every field whole",
             "nonce: epoch:counter of the record's first nonce (the 12-byte AES-GCM nonce is epoch u32 ‖ "
             "counter u64; - for none)",
             head + "details", "-" * TABLE_WIDTH]
    room = TABLE_WIDTH - len(head)
    for d in rows:
        ts = d["timestamp"]
        when = ts[11:19] if one_day else ts[5:10] + " " + ts[11:19]
        pos = "-" if d["position_count"] == 0 else f"{d['position']}..{d['position'] + d['position_count'] - 1}"
        row = "-" if d["row"] is None else str(d["row"])
        op = _SHORT_OPS.get(d["operation"], d["operation"])
        details = d["details"] or ""
        nonce = f"{d['epoch']}:{d['sequence_number']}" if d["sequence_number"] > 0 else "-"   # counters start at 1
        lines.append(f"{d['record_number']:>7} {when:<{tw}} {_fit(op, 12):<12} {d['status']:<11} "
                     f"{_fit(d['tenant_id'], 10):<10} {_fit(d['session_id'], 10, True):<10} "
                     f"{str(d['layer_idx']):>5} {row:>4} {_fit(pos, 11, True):>11} {_fit(nonce, 10, True):>10} "
                     f"{d['nbytes']:>8} {details if len(details) <= room else ''}".rstrip())
        if len(details) > room:   # on lines of their own, under the table's columns
            lines.extend(textwrap.wrap(details, TABLE_WIDTH, initial_indent=" " * 8 + "details: ",
                                       subsequent_indent=" " * 17))
    return lines


def _row(r, rep) -> dict:
    t, s = int(r["tenant_idx"]), int(r["session_idx"])
    no = int(r["record_no"])
    layer, row, pc = int(r["layer"]), int(r["row"]), int(r["pos_count"])
    try:
        status = Status(int(r["status"])).name
    except ValueError:
        status = str(int(r["status"]))
    return {
        "record_number": no,
        "timestamp": _iso(r["host_ts_ns"]),
        "operation": _OP_NAME.get(int(r["op"]), str(int(r["op"]))),
        "status": status,
        "tenant_id": rep.tenants.get(t, f"#{t}"),
        "session_id": rep.sessions.get(s, (0, f"#{s}"))[1],
        "layer_idx": -1 if layer == NONE16 else layer,
        "row": None if row == NONE16 else row,
        "position": int(r["pos_start"]) if pc else -1,
        "position_count": pc,
        "sequence_number": int(r["nonce_counter"]),
        "epoch": int(r["epoch"]),
        "nbytes": int(r["nbytes"]),
        "device_timestamp_ns": int(r["device_ts_ns"]),
        "details": rep.details.get(no),
    }
