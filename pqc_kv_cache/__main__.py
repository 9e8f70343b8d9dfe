"""Command line: ``python -m pqc_kv_cache {demo,audit,info,vllm-store}`` (or the ``pqc-kv-cache`` script); ``bench``
too when run from a source checkout, whose ``benchmarks/`` it runs."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import KVCacheError


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(audit_path=args.audit_path, with_cache=not args.no_cache, signing_key=args.signing_key)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    return run_bench(quick=args.quick, out=args.out)


def _info(args: argparse.Namespace) -> int:
    """Which host crypto path CPU tensors get, and why; what the native path runs on."""
    import platform

    import cryptography

    from .backends.native import host_backend_choice, library_info

    print(f"pqc_kv_cache {__version__}, Python {platform.python_version()}, {platform.machine()}")
    try:
        name, why = host_backend_choice()
    except (ValueError, KVCacheError) as exc:
        print(f"host path: none ({exc})")
        return 2
    print(f"host path: {name} ({why})")
    role = "fallback" if name == "native" else "in use"
    print(f"  host ({role}): cryptography {cryptography.__version__} AESGCM ({_openssl_version()})")
    if name == "native":
        info = library_info()
        print(f"  native: Intel ipsec-mb {info['ipsec_mb_version']} (built against {info['ipsec_mb_header_version']}), "
              f"{info['arch']} code path")
        print(f"    library: {info['ipsec_mb_library']}")
        print(f"    module:  {info['native_module']}")
        print(f"    CPU features ipsec-mb reports: {' '.join(info['cpu_features']) or 'none'}")
        src = (f"from {info['threads_from']}" if info['threads_from'] != "default"
               else "the default; PQC_KV_CACHE_NATIVE_THREADS sets it")
        print(f"    threads: {info['threads']} per large call ({src})")
    return 0


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= s < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return s


def _vllm_store_gc(args: argparse.Namespace) -> int:
    from .audit import KVAuditLog
    from .audit.keys import default_key_path
    from .vllm.storegc import collect_garbage

    if not os.path.isdir(args.store):
        print(f"vllm-store gc: no store directory at {args.store!r}", file=sys.stderr)
        return 2
    log = KVAuditLog(args.audit_log, signing_key=args.audit_signing_key or str(default_key_path(args.audit_log)))
    try:
        rep = collect_garbage(args.store, max_bytes=args.max_bytes, max_age=args.max_age, log=log,
                              progress=lambda line: print(line, flush=True))
    except ValueError as e:
        print(f"vllm-store gc: {e}", file=sys.stderr)
        return 2
    finally:
        log.close(timeout=60)
    print(f"deleted {rep.deleted_blocks} of {rep.blocks} block(s) ({rep.deleted_bytes} of {rep.bytes} bytes), "
          f"{rep.deleted_sessions} ended session directory(ies), {rep.deleted_temporaries} left-over temporary "
          f"file(s); {rep.kept_bytes} bytes kept; each deletion is a DELETE record in {args.audit_log}")
    if rep.skipped:
        print(f"left alone (not the connector's): {len(rep.skipped)} entr(ies), e.g. {rep.skipped[0]}")
    return 0


def _openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        return str(backend.openssl_version_text())
    except Exception:   # an informational line only: any cryptography layout change must not break `info`
        return "OpenSSL version unknown"


def _prog() -> str:
    """The name the user typed: ``pqc-kv-cache`` for the script, ``python -m pqc_kv_cache`` for the module."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-c") or name.startswith("python"):
        return "python -m pqc_kv_cache"
    return name


def _offers_bench() -> bool:
    from .bench import checkout_benchmarks
    return checkout_benchmarks() is not None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or _prog()
    parser = argparse.ArgumentParser(prog=prog, description="Encrypted, tenant-isolated, audited KV cache.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    commands = "{demo,audit,bench,info,vllm-store}" if _offers_bench() else "{demo,audit,info,vllm-store}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=commands)
    demo = sub.add_parser("demo", help="two tenants: sessions, entries, a refused access, rotation, the cache, "
                                       "the audit log",
                          description="The library end to end on a CPU: two tenants, sealed entries, a refused "
                                      "cross-tenant read, a rotation, an EncryptedCache generation and the "
                                      "signed audit log. With --audit-path the log is kept and can be "
                                      "continued by running the demo again.")
    demo.add_argument("--audit-path", metavar="PATH", default=None,
                      help="write the demo's audit log to PATH and keep it; running again continues it "
                           "(default: a temporary directory, removed at the end)")
    demo.add_argument("--signing-key", metavar="FILE", default=None,
                      help="the log's signing key file, created (mode 0600) if missing; only with --audit-path "
                           "(default: a per-user key file outside PATH's folder, see `audit keygen`)")
    demo.add_argument("--no-cache", action="store_true", help="skip the transformers part of the demo")
    demo.set_defaults(func=_demo)
    if _offers_bench():
        # the benchmark scripts are not in the wheel: only a source checkout's command line offers them
        bench = sub.add_parser("bench", help="measure host crypto and audit emission against their baselines",
                               description="Run the benchmark reports of a source checkout (benchmarks/); each "
                                           "measures its baseline in the same run.")
        bench.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
        bench.add_argument("--out", metavar="FILE", default=None, help="write the results as JSON to this file")
        bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="which host crypto path is active and why",
                          description="Print the crypto path CPU tensors get (native ipsec-mb or host "
                                      "cryptography), why, and what the native path runs on (versions, "
                                      "library file, CPU features, threads). PQC_KV_CACHE_BACKEND=host|native forces one.")
    info.set_defaults(func=_info)
    vstore = sub.add_parser("vllm-store", help="the vLLM connector's store: clean-up",
                            description="Maintenance of the vLLM connector's block store.")
    vsub = vstore.add_subparsers(dest="store_command", required=True, metavar="{gc}")
    gc = vsub.add_parser("gc", help="delete blocks of ended sessions, old blocks, and the least recently used "
                                    "beyond a quota",
                         description="Delete from the store every block of a tenant's ended sessions (all but "
                                     "its newest session), then with --max-age the blocks unused for longer, "
                                     "then with --max-bytes the least recently used blocks until the rest fit. "
                                     "Each deletion is a DELETE record in the audit log.")
    gc.add_argument("--store", metavar="PATH", required=True, help="the connector's storage_path")
    gc.add_argument("--max-bytes", metavar="N", type=_count, default=None,
                    help="keep at most N bytes of blocks (least recently used deleted first)")
    gc.add_argument("--max-age", metavar="S", type=_seconds, default=None,
                    help="delete blocks not loaded or saved for more than S seconds")
    gc.add_argument("--audit-log", metavar="PATH", required=True,
                    help="the signed audit log the deletions are recorded in (created or continued)")
    gc.add_argument("--audit-signing-key", metavar="FILE", default=None,
                    help="the log's signing key file (default: as for other logs, see `audit keygen`)")
    gc.set_defaults(func=_vllm_store_gc)
    from .audit.cli import register
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.signing_key is not None and args.audit_path is None:
        parser.error("--signing-key needs --audit-path (the temporary demo log is not kept)")
    try:
        return int(args.func(args) or 0)
    except KVCacheError as e:
        # a failure the library names (a missing file, a key that does not fit): one line, no traceback
        print(f"{parser.prog} {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`audit show ... | head`): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
