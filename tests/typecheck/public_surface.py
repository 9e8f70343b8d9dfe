"""Checked by mypy (``make typecheck``), never run: the public API as its users write it.

Each ``# type: ignore[...]`` line is a misuse that must stay a type error; with
``warn_unused_ignores`` an ignore that is no longer needed (a parameter that lost
its annotation and became ``Any``) fails the check.
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import mldsa
from transformers import LlamaConfig

import pqc_kv_cache
from pqc_kv_cache import (
    CacheDecryptor,
    CacheEncryptor,
    EncryptedCache,
    EncryptedEntry,
    EntryMetadata,
    KVAuditEntry,
    KVAuditLog,
    KVCacheEntry,
    TenantIdentity,
    TenantIsolationManager,
    TenantSession,
    establish_tenant_session,
)
from pqc_kv_cache.audit import Op, VerifyReport, verify_log
from pqc_kv_cache.audit.keys import default_key_path, generate_signing_key_file, load_signing_key_file
from pqc_kv_cache.backends import select_backend
from pqc_kv_cache.backends.base import AuditContext, ChunkTable, CryptoBackend, DecryptStatus


def sessions_and_entries() -> bytes:
    session: TenantSession = establish_tenant_session(TenantIdentity("alice"))
    meta = EntryMetadata("alice", session.session_id, layer_idx=0, position=1)
    sealed: EncryptedEntry = CacheEncryptor(session).encrypt(KVCacheEntry(meta, b"k", b"v"))
    opened: KVCacheEntry = CacheDecryptor(session).decrypt(sealed)
    return opened.key_tensor_bytes


def audit_log() -> list[KVAuditEntry]:
    key: mldsa.MLDSA65PrivateKey = generate_signing_key_file("~/.config/pqc_kv_cache/keys/a.key")
    with KVAuditLog(path="a.kvlog", signing_key=load_signing_key_file(default_key_path("a.kvlog"))) as log:
        log.emit(Op.ENCRYPT, tenant_idx=log.tenant_index("alice"), session_idx=0, layer=1,
                 row=np.arange(4, dtype=np.uint16), pos_start=0, pos_count=1)
        KVAuditLog(path="b.kvlog", signing_key=key)
        KVAuditLog(path="c.kvlog", signing_key="~/keys/c.key")
        KVAuditLog(path="d.kvlog", signing_key=bytes(32))
        KVAuditLog(path="e.kvlog", signing_key=1234)  # type: ignore[arg-type]
        report: VerifyReport = verify_log("a.kvlog")
        assert report.ok
        return log.entries(limit=10, tenant_id="alice")


def cache_with_audit(log: KVAuditLog) -> EncryptedCache:
    mgr = TenantIsolationManager(audit=log)
    TenantIsolationManager(audit="a log")  # type: ignore[arg-type]
    alice = mgr.create_session(TenantIdentity("alice"))
    cache = EncryptedCache(LlamaConfig(), sessions=[alice], audit=mgr.audit)
    EncryptedCache(LlamaConfig(), sessions=[alice], audit=object())  # type: ignore[arg-type]
    return cache


def backend_contract(log: KVAuditLog) -> int:
    ctx = AuditContext(log, np.zeros(1, np.uint32), np.zeros(1, np.uint32))
    first: int = ctx.log.emit(Op.DECRYPT, tenant_idx=0, session_idx=0)
    AuditContext("not a log", np.zeros(1, np.uint32), np.zeros(1, np.uint32))  # type: ignore[arg-type]
    table = ChunkTable(*(np.zeros(1, np.int64) for _ in ChunkTable.fields()))
    status = DecryptStatus(host=np.zeros(len(table), np.uint8))
    backend: CryptoBackend = select_backend(torch.device("cpu"))
    backend.check(owner=status)
    backend.forget_keys()
    return first + len(table) + len(status)


VERSION: str = pqc_kv_cache.__version__
