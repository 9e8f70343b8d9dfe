"""``audit verify`` and ``audit show``: the command line of the persisted audit log.

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
import sys

import numpy as np

from ..errors import KVCacheError
from .records import NONE16, OP_NAMES, Status, op_from_name
from .verify import verify_log

__all__ = ["register", "EXIT_OK", "EXIT_INTEGRITY", "EXIT_UNREADABLE", "EXIT_UNCLOSED"]

EXIT_OK = 0
EXIT_INTEGRITY = 1
EXIT_UNREADABLE = 2
EXIT_UNCLOSED = 3


def _iso(ns) -> str:
    return _dt.datetime.fromtimestamp(int(ns) / 1e9, tz=_dt.timezone.utc).isoformat()


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``audit {verify,show}`` to ``subparsers``; returns the ``audit`` parser."""
    audit = subparsers.add_parser("audit", help="verify or show a persisted audit log")
    sub = audit.add_subparsers(dest="audit_command", metavar="{verify,show}")
    sub.required = True

    v = sub.add_parser("verify", help="check the hash chain, signatures and seal of an audit log")
    v.add_argument("path")
    v.add_argument("--public-key", metavar="FILE", help="ML-DSA-65 public key (PEM or raw); default PATH.pub")
    v.set_defaults(func=_verify)

    s = sub.add_parser("show", help="print records of an audit log")
    s.add_argument("path")
    s.add_argument("--public-key", metavar="FILE", help="ML-DSA-65 public key (PEM or raw); default PATH.pub")
    s.add_argument("--tenant", metavar="T")
    s.add_argument("--layer", metavar="L", type=int)
    s.add_argument("--position", metavar="P", type=int)
    s.add_argument("--operation", metavar="OP", help="one of " + ", ".join(OP_NAMES.values()))
    s.add_argument("--limit", type=int, default=None, help="print at most this many (the newest)")
    s.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    s.set_defaults(func=_show)
    return audit


def _verify(args) -> int:
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

    def select(recs, rep):
        """Filter each frame's records as they are verified, so only matches are kept in memory."""
        mask = np.ones(len(recs), dtype=bool)
        if args.tenant is not None:
            idx = [i for i, t in rep.tenants.items() if t == args.tenant]
            mask &= np.isin(recs["tenant_idx"], np.array(idx, dtype=np.uint32))
        if args.layer is not None:
            mask &= recs["layer"] == (NONE16 if args.layer == -1 else args.layer)
        if args.position is not None:
            if not 0 <= args.position <= 0xFFFF_FFFF:
                return np.zeros(len(recs), dtype=bool)
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
    if not args.json:
        out.write(f"{'record':>10} {'time (UTC)':32} {'operation':19} {'status':11} {'tenant':16} "
                  f"{'session':12} {'layer':>5} {'row':>5} {'positions':>13} {'nonce':>10} {'epoch':>5} "
                  f"{'bytes':>8}  details\n")
    for r in sel:
        d = _row(r, rep)
        if args.json:
            out.write(json.dumps(d) + "\n")
        else:
            pos = "-" if d["position_count"] == 0 else \
                f"{d['position']}..{d['position'] + d['position_count'] - 1}"
            out.write(f"{d['record_number']:>10} {d['timestamp']:32} {d['operation']:19} {d['status']:11} "
                      f"{d['tenant_id']:16} {d['session_id']:12} {str(d['layer_idx']):>5} "
                      f"{'-' if d['row'] is None else d['row']:>5} {pos:>13} {d['sequence_number']:>10} "
                      f"{d['epoch']:>5} {d['nbytes']:>8}  {d['details'] or ''}\n")
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
        "operation": OP_NAMES.get(int(r["op"]), str(int(r["op"]))),
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
