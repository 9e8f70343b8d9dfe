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


def run_demo(audit_path: str | None = None, with_cache: bool = True, print_fn=print) -> int:
    tmp = None
    if audit_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="pqc_kv_cache_demo_")
        audit_path = os.path.join(tmp.name, "demo.kvlog")
    try:
        return _run(audit_path, with_cache, print_fn)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(audit_path: str, with_cache: bool, print_fn) -> int:
    from .audit import KVAuditLog

    p = print_fn
    p("== 1. Two tenants establish ML-KEM-768 sessions ==")
    core_log = audit_path + ".core"
    with KVAuditLog(path=core_log) as audit:
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
            p(f"  {name}: 3 entries, first nonce {e.nonce.hex()} (epoch ‖ counter), "
              f"{e.plaintext_size} bytes -> {len(e.ciphertext)} with tag")
        back = mgr.decrypt("alice", sealed[("alice", 1)])
        p(f"  alice opens her entry at position 1: {back.key_tensor_bytes[:8]!r}…")

        p("\n== 3. bob asks for alice's entry: refused, and on record ==")
        try:
            mgr.decrypt("bob", sealed[("alice", 2)])
        except TenantIsolationError as exc:
            p(f"  TenantIsolationError: {exc}")
        else:  # pragma: no cover - the manager refuses by construction
            p("  ERROR: the cross-tenant read was not refused")
            return 1

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

    if with_cache:
        from .cache_demo import run_cache_demo
        p("")
        return run_cache_demo(print_fn=p, audit_path=audit_path)
    return 0
