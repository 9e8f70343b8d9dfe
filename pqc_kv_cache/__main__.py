"""Command line: ``python -m pqc_kv_cache {demo,audit,bench}``."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(audit_path=args.audit_path, with_cache=not args.no_cache)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    return run_bench(quick=args.quick, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pqc_kv_cache",
                                     description="Encrypted, tenant-isolated, audited KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="two tenants: sessions, entries, a refused access, rotation, the cache, the audit log")
    demo.add_argument("--audit-path", default=None, help="where to write the demo's audit log (default: a temporary directory)")
    demo.add_argument("--no-cache", action="store_true", help="skip the transformers part of the demo")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="measure host crypto and audit emission against their baselines")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
    bench.add_argument("--out", default=None, help="write the results as JSON to this file")
    bench.set_defaults(func=_bench)
    from .audit.cli import register
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader went away (`audit show ... | head`): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
