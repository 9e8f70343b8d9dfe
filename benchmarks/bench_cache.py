"""pytest-benchmark suite of the EncryptedCache hot path, each beside its baseline measured in the same run.

    pytest -q benchmarks/bench_cache.py --benchmark-only

Groups: ``decode-step`` (one decode update of one layer holding 512 + 64 positions, EncryptedCache with and
without audit against DynamicCache), ``host-decrypt`` (HostBackend.decrypt_chunks over that layer against
one bulk AESGCM decrypt of the same number of bytes). Ratios: compare the means within a group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from transformers import DynamicCache, LlamaConfig

from pqc_kv_cache.audit import KVAuditLog
from pqc_kv_cache.backends.base import ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.backends.host import HostBackend
from pqc_kv_cache.cache import EncryptedCache
from pqc_kv_cache.envelope import session_tag, tenant_tag
from pqc_kv_cache.session import TenantIdentity, establish_tenant_session

B, H, D, PROMPT, DECODED = 4, 4, 32, 512, 64


def _config():
    return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=H)


def _filled(cache):
    g = torch.Generator().manual_seed(0)
    cache.update(torch.randn(B, H, PROMPT, D, generator=g), torch.randn(B, H, PROMPT, D, generator=g), 0)
    for _ in range(DECODED):
        cache.update(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), 0)
    return cache


@pytest.fixture(scope="module")
def sessions():
    return [establish_tenant_session(TenantIdentity(f"bench-{i}"), ttl_seconds=3600) for i in range(B)]


def _step(cache):
    """One decode step of one layer: write one position, read the layer back, undo the write."""
    k, v = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)

    def run():
        cache.update(k, v, 0)
        cache.crop(-1)
    return run


@pytest.mark.benchmark(group="decode-step")
def test_decode_step_dynamic_cache(benchmark):
    benchmark(_step(_filled(DynamicCache(config=_config()))))


@pytest.mark.benchmark(group="decode-step")
def test_decode_step_encrypted_audit_off(benchmark, sessions):
    benchmark(_step(_filled(EncryptedCache(_config(), sessions=sessions))))


@pytest.mark.benchmark(group="decode-step")
def test_decode_step_encrypted_audit_on(benchmark, sessions):
    audit = KVAuditLog(max_entries=100_000)
    benchmark(_step(_filled(EncryptedCache(_config(), sessions=sessions, audit=audit))))
    audit.close()


@pytest.fixture(scope="module")
def sealed_layer():
    be = HostBackend.instance()
    layout = ChunkLayout(0, H, D, torch.float32)
    keys = [KeySlot(AESGCM.generate_key(256), tenant_tag("t"), session_tag("s"), 0)]
    seq = PROMPT + DECODED
    counts = [PROMPT] + [1] * DECODED
    starts = np.cumsum([0] + counts[:-1])
    rows = np.tile(np.arange(B), len(counts))
    ps, pc = np.repeat(starts, B), np.repeat(counts, B)
    sizes = pc * layout.bytes_per_position + 16
    offs = np.cumsum(sizes) - sizes
    table = ChunkTable(np.zeros(rows.size, np.int64), rows, ps, pc, ps, np.arange(rows.size) + 1, offs)
    arena = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    be.encrypt_chunks(keys, layout, table, torch.randn(B, H, seq, D), torch.randn(B, H, seq, D), arena)
    buf = torch.empty(B, seq, 2, H, D)
    return be, keys, layout, table, arena, buf, int((pc * layout.bytes_per_position).sum())


@pytest.mark.benchmark(group="host-decrypt")
def test_host_backend_decrypt_layer(benchmark, sealed_layer):
    be, keys, layout, table, arena, buf, nbytes = sealed_layer
    k_out, v_out = buf[:, :, 0].permute(0, 2, 1, 3), buf[:, :, 1].permute(0, 2, 1, 3)
    status = benchmark(be.decrypt_chunks, keys, layout, table, arena, k_out, v_out)
    assert not status.host.any()
    benchmark.extra_info["bytes"] = nbytes


@pytest.mark.benchmark(group="host-decrypt")
def test_bulk_aesgcm_decrypt_same_bytes(benchmark, sealed_layer):
    *_, nbytes = sealed_layer
    aes = AESGCM(AESGCM.generate_key(256))
    nonce, aad = b"\x00" * 12, b"\x01" * 80
    ct = aes.encrypt(nonce, bytes(nbytes), aad)
    out = np.empty(nbytes, np.uint8)
    benchmark(aes.decrypt_into, nonce, ct, aad, out)
    benchmark.extra_info["bytes"] = nbytes
