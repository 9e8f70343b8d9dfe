"""``python -m pqc_kv_cache demo``: the library end to end, in a minute, on a CPU."""

from __future__ import annotations

import os
import tempfile

from .encryptor import CacheDecryptor
from .envelope import EntryMetadata, KVCacheEntry
from .errors import TenantIsolationError
from .isolation import TenantIsolationManager
from .session import TenantKeyPair


def format_audit_table(entries) -> str:
    """The audit entries as a fixed-width text table (oldest first)."""
    head = f"{'#':>5}  {'operation':<19} {'tenant':<8} {'layer':>5} {'positions':>11} {'seq':>5} {'epoch':>5}  {'ok':<3} details"
    lines = [head, "-" * len(head)]
    for e in entries:
        layer = "-" if e.layer_idx < 0 else str(e.layer_idx)
        if e.position < 0:
            pos = "-"
        elif e.position_count > 1:
            pos = f"{e.position}..{e.position + e.position_count - 1}"
        else:
            pos = str(e.position)
        lines.append(f"{e.record_number:>5}  {e.operation:<19} {e.tenant_id:<8} {layer:>5} {pos:>11} "
                     f"{e.sequence_number:>5} {e.epoch:>5}  {'yes' if e.success else 'NO':<3} {e.details or ''}")
    return "\n".join(lines)


def run_demo(audit_path: str | os.PathLike[str] | None = None, with_cache: bool = True, print_fn=print,
             signing_key: str | os.PathLike[str] | None = None) -> int:
    """Run the demo; returns 0 when every check holds, 1 otherwise.

    ``audit_path``: where the audit log is written and kept; a second run
    continues it (signed REOP).  Its signing key is kept in ``signing_key`` (a
    key file, created with mode 0600 when missing), by default
    ``pqc_kv_cache.audit.keys.default_key_path(audit_path)``, outside the log's
    folder.  Without ``audit_path`` the log goes to a temporary directory,
    signed with a key that is not kept.
    """
    from .audit.keys import default_key_path

    tmp = None
    if audit_path is None:
        if signing_key is not None:
            raise ValueError("signing_key needs audit_path: the temporary demo log is not kept")
        tmp = tempfile.TemporaryDirectory(prefix="pqc_kv_cache_demo_")
        audit_path = os.path.join(tmp.name, "demo.kvlog")
    elif signing_key is None:
        signing_key = default_key_path(audit_path)
    try:
        return _run(os.fspath(audit_path), signing_key, with_cache, print_fn)
    finally:
        if tmp is not None:
            tmp.cleanup()
            print_fn(f"\nThe demo's audit log ({audit_path}) was in a temporary folder, removed now; run "
                     f"`python -m pqc_kv_cache demo --audit-path demo.kvlog` to keep it, then "
                     f"`python -m pqc_kv_cache audit verify demo.kvlog` or `audit show demo.kvlog`.")
        else:
            print_fn(f"\nThe demo's audit log is kept at {audit_path}: `python -m pqc_kv_cache audit verify "
                     f"{audit_path}` checks it, `audit show {audit_path}` lists it; running the demo again "
                     f"with the same --audit-path continues it.")


def _run(audit_path: str, signing_key, with_cache: bool, print_fn) -> int:
    from .audit import KVAuditLog
    from .cache_demo import close_and_verify

    p = print_fn
    continued = os.path.exists(audit_path) and os.path.getsize(audit_path) > 0
    audit = KVAuditLog(path=audit_path, signing_key=signing_key)
    p(f"audit log: {audit_path} ({'continued' if continued else 'new'})"
      + (f", signing key: {os.fspath(signing_key)}" if signing_key is not None else ", signing key not kept"))
    try:
        ok = _core(audit, p)
        if ok and with_cache:
            from .cache_demo import run_cache_demo
            p("")
            ok = run_cache_demo(print_fn=p, audit=audit) == 0
    except BaseException:
        audit.close()
        raise
    ok &= close_and_verify(audit, audit_path, p)
    return 0 if ok else 1


def _core(audit, print_fn) -> bool:
    p = print_fn
    p("== 1. Two tenants establish ML-KEM-768 sessions ==")
    mgr = TenantIsolationManager(audit=audit)
    tenants = {}
    for name in ("alice", "bob"):
        kp = TenantKeyPair.generate(name)
        session = mgr.create_session(kp.identity(display_name=name.title()))
        same = kp.session_key(session.kem_ciphertext, session.session_id) == session.symmetric_key
        tenants[name] = (kp, session)
        p(f"  {name}: session {session.session_id[:12]}…, KEM ciphertext {len(session.kem_ciphertext)} bytes, "
          f"tenant derives the server's key: {same}")

    p("\n== 2. Each tenant's K/V entries are sealed with AES-256-GCM ==")
    sealed = {}
    for name, (_, session) in tenants.items():
        for pos in range(3):
            meta = EntryMetadata(name, session.session_id, layer_idx=0, position=pos)
            k = f"{name}-K{pos}".encode() * 4
            v = f"{name}-V{pos}".encode() * 4
            sealed[(name, pos)] = mgr.encrypt(name, KVCacheEntry(meta, k, v))
        e = sealed[(name, 0)]
        p(f"  {name}: 3 entries, first nonce {e.nonce} (epoch ‖ counter), "
          f"{e.plaintext_size} bytes -> {len(e.ciphertext_bytes)} with tag")
    back = mgr.decrypt("alice", sealed[("alice", 1)])
    p(f"  alice opens her entry at position 1: {back.key_tensor_bytes[:8]!r}…")

    p("\n== 3. bob asks for alice's entry: refused, and on record ==")
    try:
        mgr.decrypt("bob", sealed[("alice", 2)])
    except TenantIsolationError as exc:
        p(f"  TenantIsolationError: {exc}")
    else:  # pragma: no cover - the manager refuses by construction
        p("  ERROR: the cross-tenant read was not refused")
        return False

    p("\n== 4. alice rotates her key; entries of the old epoch still open ==")
    epoch = mgr.rotate("alice")
    new = mgr.encrypt("alice", KVCacheEntry(EntryMetadata("alice", tenants["alice"][1].session_id, 0, 3),
                                             b"K3" * 8, b"V3" * 8))
    old = mgr.decrypt("alice", sealed[("alice", 0)])
    p(f"  now epoch {epoch}; new entry sealed under epoch {new.epoch}; "
      f"old entry (epoch {sealed[('alice', 0)].epoch}) opens: {old.key_tensor_bytes[:8]!r}…")
    kp, session = tenants["alice"]
    tenant_dec = CacheDecryptor(session)
    tenant_dec.decrypt(new)
    p(f"  the tenant derives epoch {epoch}'s key from its private key: "
      f"{kp.session_key(session.kem_ciphertext, session.session_id, epoch) == session.symmetric_key}")

    audit.flush()
    p("\n== 5. The audit log (oldest first) ==")
    p(format_audit_table(reversed(audit.entries(limit=50))))
    mgr.close()
    return True
