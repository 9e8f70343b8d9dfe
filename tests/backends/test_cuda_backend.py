"""CUDA backend.

The scenario tests run twice: on a GPU (``cuda``, marked ``gpu``, skipped without a CUDA
device and CuPy; written to run unchanged on a GPU host) and on the CPU twin (``twin``):
CudaBackend's own host-side code — checks, chunk tables, key schedules, record indices,
launch splitting, the failure queue and check() — with each kernel launch carried out by
its host-shim counterpart (the same primitives and indexing, compiled by g++). The other
tests check the NVRTC translation unit and the errors on a machine without CUDA."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from support.audit_fakes import FakeLog
from support.devices import has_cuda
from support.twin import CpuTwinBackend, fake_device

from pqc_kv_cache.backends import kernel_shim as kh
from pqc_kv_cache.backends import select_backend
from pqc_kv_cache.backends.base import AuditContext, ChunkLayout, ChunkTable, KeySlot
from pqc_kv_cache.backends.cuda import CudaBackend, kernel_source
from pqc_kv_cache.envelope import build_aad, make_nonce, session_tag, tenant_tag
from pqc_kv_cache.errors import BackendUnavailableError, DecryptionError


# every GPU test carries the ``gpu`` marker (selected by ``pytest -m gpu``) and this skip condition
needs_gpu = pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and CuPy")

# ------------------------------------------------------------------ any machine


def test_kernel_source_is_one_translation_unit():
    src = kernel_source()
    assert '#include "' not in src
    for name in ("pqc_prepare_keys", "pqc_encrypt_chunks", "pqc_decrypt_row_records", "pqc_decrypt_chunks"):
        assert f" {name}(" in src
    assert src.count("#define PQC_GCM_CUH") == 1 and src.count("#define PQC_AUDIT_RECORD_H") == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_assembled_translation_unit_compiles_with_nvcc(tmp_path):
    cu = tmp_path / "tu.cu"
    cu.write_text(kernel_source())
    proc = subprocess.run(["nvcc", "-std=c++17", "-Werror", "all-warnings", "-arch=sm_90", "-ptx",
                           "-o", str(tmp_path / "tu.ptx"), str(cu)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def _find_nvrtc():
    cands = []
    if os.environ.get("PQC_NVRTC_LIB"):
        cands.append(os.environ["PQC_NVRTC_LIB"])
    for base in sys.path + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
        cands += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")))
        cands += sorted(glob.glob(os.path.join(base, "libnvrtc.so*")))
    for c in cands:
        if "builtins" in c or "alt" in os.path.basename(c):
            continue
        d = os.path.dirname(c)
        try:
            for b in sorted(glob.glob(os.path.join(d, "libnvrtc-builtins.so*"))):
                if "alt" not in os.path.basename(b):
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def test_assembled_translation_unit_compiles_with_nvrtc():
    """What CuPy's RawModule does on a GPU host, done here through libnvrtc (no GPU needed).
    Point PQC_NVRTC_LIB at a libnvrtc.so (e.g. from the nvidia-cuda-nvrtc wheel) to run it."""
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source().encode(), b"pqc_kernels.cu", 0, None, None) == 0
    for arch in (b"sm_90", b"sm_80"):
        opts = [b"-std=c++17", b"--gpu-architecture=" + arch]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode(errors="replace")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda_raises_backend_unavailable():
    with pytest.raises(BackendUnavailableError):
        select_backend("cuda")
    with pytest.raises(BackendUnavailableError):
        CudaBackend.for_device("cuda:0")


def test_cpu_device_is_refused_by_the_cuda_backend():
    with pytest.raises(BackendUnavailableError):
        CudaBackend.for_device("cpu")


def test_launch_groups_respect_the_record_limit():
    counts = np.array([1, 3, 2, 5, 1, 1], dtype=np.int64)
    groups = CudaBackend._groups(counts, 4)
    assert groups == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert CudaBackend._groups(counts, 100) == [(0, 6)]
    assert CudaBackend._groups(np.zeros(0, np.int64), 4) == []
    covered = [i for a, b in groups for i in range(a, b)]
    assert covered == list(range(6))


# ------------------------------------------------------------------ backends under test

LAYOUT = ChunkLayout(layer_idx=3, num_heads=8, head_dim=128, dtype=torch.bfloat16)


def _cuda_device():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu]), "twin"])
def env(request):
    """(backend, device) of the backend under test."""
    if request.param == "cuda":
        dev = _cuda_device()
        return CudaBackend.for_device(dev), dev
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    return CpuTwinBackend(), torch.device("cpu")


def _slots():
    g = np.random.default_rng(7)
    return [KeySlot(key=g.bytes(32), tenant_tag=tenant_tag(f"tenant-{i}"), session_tag=session_tag(f"s-{i}"),
                    epoch=2 + i) for i in range(2)]


ENTRIES = [  # slot, row, pos_start, pos_count, io_start, counter
    (0, 0, 0, 64, 0, 1), (0, 0, 64, 1, 64, 65), (1, 1, 10, 64, 0, 1 << 33), (1, 2, 0, 1, 7, 3),
    (0, 3, 5, 17, 20, 99),
]


def _table():
    cols = list(zip(*ENTRIES))
    pc = np.array(cols[3], dtype=np.int64)
    size = pc * LAYOUT.bytes_per_position + 16
    off = np.zeros(len(ENTRIES), dtype=np.int64)
    off[1:] = np.cumsum(size)[:-1]
    return ChunkTable(*(np.array(c, dtype=np.int64) for c in cols), off), int(size.sum())


def _kv(device, seq=80, batch=4):
    g = torch.Generator(device="cpu").manual_seed(3)
    k = torch.randn(batch, 8, seq, 128, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, 8, seq, 128, generator=g).to(torch.bfloat16)
    return k.to(device), v.to(device)


def _aad(keys, slot, ps, pc):
    nb = pc * LAYOUT.bytes_per_position
    return build_aad(tenant_id=f"tenant-{slot}", session_id=f"s-{slot}", epoch=keys[slot].epoch,
                     layer_idx=LAYOUT.layer_idx, position=ps, position_count=pc, key_len=nb // 2,
                     dtype="bfloat16", num_heads=8, head_dim=128)


def _plain(k, v, row, io, n):
    kk = k[row, :, io:io + n].contiguous().cpu().view(torch.uint8).numpy().tobytes()
    vv = v[row, :, io:io + n].contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return kk + vv


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------ scenarios (GPU and CPU twin)

@pytest.mark.parametrize("ring_capacity", [1 << 14, 64])
def test_sealed_chunks_open_with_plain_aesgcm_and_records_are_written(env, ring_capacity):
    be, dev = env
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)
    log = FakeLog(dev, ring_capacity)
    ctx = AuditContext(log, np.array([4, 5], np.uint32), np.array([6, 7], np.uint32))
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
    _sync(dev)
    host_arena = arena.cpu()
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        off = int(chunks.offset[i])
        ct = host_arena[off:off + pc * LAYOUT.bytes_per_position + 16].numpy().tobytes()
        assert AESGCM(keys[slot].key).decrypt(make_nonce(keys[slot].epoch, ctr), ct, _aad(keys, slot, ps, pc)) \
            == _plain(k, v, row, io, pc)
    if dev.type == "cuda" and kh.available():   # the same bytes as the kernels' math compiled for the host
        ref = torch.zeros(size, dtype=torch.uint8)
        kh.encrypt_chunks(keys, LAYOUT, chunks, k.cpu(), v.cpu(), ref)
        assert torch.equal(ref, host_arena)
    r = log.ring.records()
    total = sum(e[3] for e in ENTRIES)
    assert len(r) == total
    assert r["record_no"].tolist() == list(range(500, 500 + total))
    assert (r["op"] == 1).all() and not r["status"].any()
    if dev.type == "cuda":
        assert (r["device_ts_ns"] > 0).all()
    assert r["pos_start"].tolist() == [ps + p for (_, _, ps, pc, _, _) in ENTRIES for p in range(pc)]
    assert r["tenant_idx"].tolist() == [4 + s for (s, _, _, pc, _, _) in ENTRIES for _ in range(pc)]
    assert r["nonce_counter"].tolist() == [c for (_, _, _, pc, _, c) in ENTRIES for _ in range(pc)]
    # each launch's records committed in order; a small ring splits the call
    assert sum(n for _, n in log.ring.committed) == total
    firsts = [f for f, _ in log.ring.committed]
    assert firsts == sorted(firsts) and firsts[0] == 500
    if ring_capacity == 64:
        assert len(log.ring.committed) > 1


@pytest.mark.parametrize("ring_capacity", [1 << 14, 4])
def test_host_sealed_chunks_open_into_a_position_major_scratch(env, ring_capacity):
    be, dev = env
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena_h = bytearray(size)
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        ct = AESGCM(keys[slot].key).encrypt(make_nonce(keys[slot].epoch, ctr), _plain(k, v, row, io, pc),
                                            _aad(keys, slot, ps, pc))
        arena_h[int(chunks.offset[i]):int(chunks.offset[i]) + len(ct)] = ct
    arena = torch.frombuffer(arena_h, dtype=torch.uint8).to(dev)
    # a position-major scratch seen as [batch, heads, seq, dim] (non-contiguous views)
    scratch = torch.full((4, 80, 2, 8, 128), 9.0, dtype=torch.bfloat16, device=dev)
    k_out, v_out = scratch[:, :, 0].permute(0, 2, 1, 3), scratch[:, :, 1].permute(0, 2, 1, 3)
    log = FakeLog(dev, ring_capacity)
    ctx = AuditContext(log, np.array([0, 1], np.uint32), np.array([0, 1], np.uint32))
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, ctx).device
    assert isinstance(status, torch.Tensor) and status.device == dev and status.shape == (len(ENTRIES),)
    be.check()
    assert not status.cpu().any()
    for (slot, row, ps, pc, io, ctr) in ENTRIES:
        assert torch.equal(k_out[row, :, io:io + pc], k[row, :, io:io + pc])
        assert torch.equal(v_out[row, :, io:io + pc], v[row, :, io:io + pc])
    r = log.ring.records()
    assert r["row"].tolist() == [0, 1, 2, 3] and (r["op"] == 2).all() and not r["status"].any()
    assert r["pos_start"].tolist() == [0, 10, 0, 5] and r["pos_count"].tolist() == [65, 64, 1, 17]
    assert r["record_no"].tolist() == [500, 501, 502, 503]
    assert r["nbytes"].tolist() == [65 * 4096, 64 * 4096, 4096, 17 * 4096]
    if ring_capacity == 4:   # one row per launch
        assert len(log.ring.committed) == 4


def test_tampered_chunk_is_zeroed_failed_and_raised_at_check(env):
    be, dev = env
    be.pending_failures()   # start from an empty queue
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    arena[int(chunks.offset[2]) + 1000] ^= 1       # chunk 2: row 1, positions 10..73
    k_out = torch.full_like(k, 5.0)
    v_out = torch.full_like(v, 5.0)
    log = FakeLog(dev)
    ctx = AuditContext(log, np.array([0, 1], np.uint32), np.array([0, 1], np.uint32))
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, ctx).device
    with pytest.raises(DecryptionError) as ei:
        be.check()
    assert ei.value.layer_idx == 3 and ei.value.positions == range(10, 74) and ei.value.tenant_id == "tenant-1"
    assert status.cpu().tolist() == [0, 0, 1, 0, 0]
    assert not k_out[1, :, 0:64].any() and not v_out[1, :, 0:64].any()
    assert torch.equal(k_out[0, :, 0:65], k[0, :, 0:65])
    r = log.ring.records()
    assert r["status"].tolist() == [0, 1, 0, 0]
    assert len(log.emitted) == 1
    op, f = log.emitted[0]
    assert op == 2 and f["status"] == 1 and (f["pos_start"], f["pos_count"], f["row"]) == (10, 64, 1)
    assert f["nonce_counter"] == 1 << 33 and f["layer"] == 3 and f["tenant_idx"] == 1
    be.check()   # the queue was emptied


def test_failure_without_audit_is_still_raised(env):
    be, dev = env
    be.pending_failures()
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)      # nothing sealed: every tag fails
    k_out, v_out = torch.ones_like(k), torch.ones_like(v)
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out).device
    fails = be.pending_failures()
    assert len(fails) == len(ENTRIES) and status.cpu().all()
    assert sorted((f["row"], f["positions"].start, f["positions"].stop) for f in fails) == sorted(
        (row, ps, ps + pc) for (_, row, ps, pc, _, _) in ENTRIES)
    for (_, row, ps, pc, io, _) in ENTRIES:
        assert not k_out[row, :, io:io + pc].any() and not v_out[row, :, io:io + pc].any()
    assert k_out[1, :, 64:].eq(1).all()        # outside every chunk: untouched
    be.check()


def test_key_schedules_are_prepared_once_per_key_set(env):
    be, dev = env
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)
    be.forget_keys()
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    first = be._schedules(keys)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    assert be._schedules(keys) is first
    if isinstance(be, CpuTwinBackend):
        assert [x[0] for x in be.launches].count("pqc_prepare_keys") == 1


def test_bad_inputs_raise_clear_errors(env):
    be, dev = env
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    other = torch.device("cpu") if dev.type == "cuda" else torch.device("meta")
    with pytest.raises(ValueError):
        be.encrypt_chunks(keys, LAYOUT, chunks, k.to(other), v.to(other), torch.zeros(size, dtype=torch.uint8,
                                                                                        device=dev))
    with pytest.raises(ValueError):
        be.encrypt_chunks(keys, LAYOUT, chunks, k, v, torch.zeros(size - 1, dtype=torch.uint8, device=dev))
    with pytest.raises(TypeError):
        be.encrypt_chunks(keys, LAYOUT, chunks, k, v, torch.zeros(size, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError):
        be.encrypt_chunks(keys[:1], LAYOUT, chunks, k, v, torch.zeros(size, dtype=torch.uint8, device=dev))
    with pytest.raises(ValueError):
        be.encrypt_chunks(keys, LAYOUT, chunks, k.float(), v.float(), torch.zeros(size, dtype=torch.uint8,
                                                                                    device=dev))
    bad_layout = ChunkLayout(layer_idx=3, num_heads=8, head_dim=4, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        be.encrypt_chunks(keys, bad_layout, chunks, k[..., :4], v[..., :4],
                          torch.zeros(size, dtype=torch.uint8, device=dev))


# ------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@needs_gpu
def test_hot_path_makes_no_host_synchronisation():
    dev = _cuda_device()
    be = CudaBackend.for_device(dev)
    keys = _slots()
    k, v = _kv(dev)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8, device=dev)
    log = FakeLog(dev)
    ctx = AuditContext(log, np.array([0, 1], np.uint32), np.array([0, 1], np.uint32))
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)   # warm-up: module and key schedules
    torch.cuda.synchronize()
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
            be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    be.check()


@pytest.mark.gpu
@needs_gpu
def test_encrypted_cache_on_cuda_selects_this_backend():
    assert isinstance(select_backend(_cuda_device()), CudaBackend)


# ------------------------------------------------------------------ the cache over this backend (CPU twin)

@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_encrypted_cache_over_the_cuda_backend_logic_matches_dynamic_cache(mode):
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    from support.cache_models import generate, prompts, sessions, tiny_model

    from pqc_kv_cache.cache import EncryptedCache

    model = tiny_model("llama")
    ids = prompts(2, 12)
    kw = dict(max_new_tokens=6, do_sample=False)
    if mode == "beams":
        kw.update(num_beams=3, num_return_sequences=2)
    ref = generate(model, ids, **kw)
    be = CpuTwinBackend()
    cache = EncryptedCache(model.config, sessions=sessions("alice", "bob"), backend=be,
                           rows_per_session=3 if mode == "beams" else None)
    with torch.no_grad():   # past_key_values=: the keyword every transformers 5.x generate() accepts
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kw)
    cache.check()
    assert torch.equal(ref, out)
    kinds = {name for name, _, _ in be.launches}
    assert {"pqc_prepare_keys", "pqc_encrypt_chunks", "pqc_decrypt_chunks"} <= kinds


@pytest.mark.gpu
@needs_gpu
def test_prefill_and_decode_on_cuda_make_no_host_sync_and_audit_gets_device_timestamps():
    from support.cache_models import prompts, sessions, tiny_model

    from pqc_kv_cache.audit import KVAuditLog
    from pqc_kv_cache.cache import EncryptedCache

    dev = _cuda_device()
    model = tiny_model("llama").to(dev)
    ids = prompts(2, 12).to(dev)
    who = sessions("alice", "bob")
    with torch.no_grad():   # warm-up on another cache: kernels compiled, key schedules prepared
        warm = EncryptedCache(model.config, sessions=who, audit=KVAuditLog())
        model(input_ids=ids, past_key_values=warm, use_cache=True)
        warm.check()
    torch.cuda.synchronize()
    log = KVAuditLog()
    cache = EncryptedCache(model.config, sessions=who, audit=log)
    assert isinstance(select_backend(dev), CudaBackend)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cache.check()
    assert log.flush(timeout=60)
    layers = model.config.num_hidden_layers
    enc = log.entries(limit=None, operation="encrypt")
    dec = log.entries(limit=None, operation="decrypt")
    assert len(enc) == layers * 2 * (12 + 3)            # one per (layer, row, position)
    assert all(e.success and e.device_timestamp_ns > 0 for e in enc + dec)
    assert len(dec) >= layers * 2 * 4                   # at least one per (layer, row, step)


@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
def test_a_failed_launch_commits_its_reserved_records_as_errors(direction):
    """A launch that raises after its audit slots were reserved must not leave the log waiting forever."""
    class Failing(CpuTwinBackend):
        def _launch(self, kernel, grid, block, args):
            if kernel in ("pqc_encrypt_chunks", "pqc_decrypt_chunks"):
                raise RuntimeError("launch failed")
            super()._launch(kernel, grid, block, args)

    be, good = Failing(), CpuTwinBackend()
    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    log = FakeLog(torch.device("cpu"))
    ctx = AuditContext(log, np.array([4, 5], np.uint32), np.array([6, 7], np.uint32))
    with pytest.raises(RuntimeError):
        if direction == "encrypt":
            be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
        else:
            good.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
            be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), ctx)
    reserved = sum(view.shape[0] for view in log.ring.views)
    assert reserved and sum(n for _, n in log.ring.committed) == reserved
    r = log.ring.records()
    assert r["record_no"].tolist() == list(range(500, 500 + reserved))
    assert (r["status"] == 3).all() and (r["op"] == (1 if direction == "encrypt" else 2)).all()


# ------------------------------------------------------------------ work split and launch geometry (CPU twin)

@pytest.mark.parametrize("ctas_per_sm", [4, 3])
def test_a_4k_batch_8_layer_is_launched_as_at_least_one_item_per_resident_cta(ctas_per_sm):
    """Fake H100 / H200 (132 SMs): a prefill sealing one 4096-position chunk per row at batch 8
    (8 KV heads x 128, bf16) is cut into at least SMs x resident CTAs work items, encrypt and decrypt."""
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend(fake_device(132, ctas_per_sm), execute=False)
    slots = 132 * ctas_per_sm
    batch, seq = 8, 4096
    k = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16).expand(batch, 8, seq, 128)   # no 128 MiB of data
    bpp = LAYOUT.bytes_per_position
    chunks = ChunkTable(np.zeros(batch, np.int64), np.arange(batch), np.zeros(batch, np.int64),
                        np.full(batch, seq), np.zeros(batch, np.int64), np.arange(batch) + 1,
                        np.arange(batch) * (seq * bpp + 16))
    arena = torch.empty(batch * (seq * bpp + 16), dtype=torch.uint8)
    keys = _slots()[:1]
    be.encrypt_chunks(keys, LAYOUT, chunks, k, k, arena)
    be.decrypt_chunks(keys, LAYOUT, chunks, arena, k, k)
    launched = {name: (grid, a) for (name, grid, _), (_, a) in zip(be.launches, be.launch_args)}
    for name in ("pqc_encrypt_chunks", "pqc_decrypt_chunks"):
        grid, a = launched[name]
        n_items = a["n_items"]
        assert a["items"] != 0 and n_items >= slots, (name, n_items, slots)      # an item table, >= one item per slot
        assert grid == slots


def test_small_chunks_take_one_item_each_and_no_item_table():
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend(fake_device(132, 4), execute=False)
    n = 64
    chunks = ChunkTable(np.zeros(n, np.int64), np.arange(n) % 4, np.arange(n) // 4, np.ones(n, np.int64),
                        np.arange(n) // 4, np.arange(n) + 1, np.arange(n) * (LAYOUT.bytes_per_position + 16))
    k, v = _kv(torch.device("cpu"))
    arena = torch.empty(n * (LAYOUT.bytes_per_position + 16), dtype=torch.uint8)
    be.encrypt_chunks(_slots()[:1], LAYOUT, chunks, k, v, arena)
    name, a = be.launch_args[-1]
    assert name == "pqc_encrypt_chunks" and a["items"] == 0 and a["n_items"] == n      # item i = chunk i
    assert be.launches[-1][1] == n


@pytest.mark.parametrize("order", [1, 2])
def test_split_chunks_through_the_backend_in_any_item_order(order):
    """The scenario of the tamper test with the items run backwards / interleaved: the last item done
    completes each chunk, whichever it is."""
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend(order=order)
    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    assert any(a["items"] != 0 for name, a in be.launch_args if name == "pqc_encrypt_chunks")   # chunks were cut
    for i, (slot, row, ps, pc, io, ctr) in enumerate(ENTRIES):
        off = int(chunks.offset[i])
        ct = arena[off:off + pc * LAYOUT.bytes_per_position + 16].numpy().tobytes()
        assert AESGCM(keys[slot].key).decrypt(make_nonce(keys[slot].epoch, ctr), ct, _aad(keys, slot, ps, pc)) \
            == _plain(k, v, row, io, pc)
    arena[int(chunks.offset[2]) + 64 * 4096 + 3] ^= 1      # chunk 2 (row 1), in its tag
    k_out, v_out = torch.full_like(k, 5.0), torch.full_like(v, 5.0)
    log = FakeLog(torch.device("cpu"))
    ctx = AuditContext(log, np.array([0, 1], np.uint32), np.array([0, 1], np.uint32))
    status = be.decrypt_chunks(keys, LAYOUT, chunks, arena, k_out, v_out, ctx).device
    with pytest.raises(DecryptionError) as ei:
        be.check()
    assert ei.value.positions == range(10, 74) and status.tolist() == [0, 0, 1, 0, 0]
    assert not k_out[1, :, 0:64].any() and torch.equal(k_out[0, :, 0:65], k[0, :, 0:65])
    assert log.ring.records()["status"].tolist() == [0, 1, 0, 0]


def test_a_chunk_with_more_positions_than_the_ring_holds_is_sealed_and_fully_recorded():
    """Formerly refused ("more than the audit ring holds"): a chunk's ENCRYPT records now spread over
    several launches, each within a quarter of the ring, numbered densely."""
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend()
    keys = _slots()[:1]
    k, v = _kv(torch.device("cpu"), seq=100, batch=1)
    pc = 100
    chunks = ChunkTable(*(np.array([x], dtype=np.int64) for x in (0, 0, 3, pc, 0, 77, 0)))
    arena = torch.zeros(pc * LAYOUT.bytes_per_position + 16, dtype=torch.uint8)
    log = FakeLog(torch.device("cpu"), capacity=64)
    ctx = AuditContext(log, np.array([4], np.uint32), np.array([6], np.uint32))
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
    ct = arena.numpy().tobytes()
    assert AESGCM(keys[0].key).decrypt(make_nonce(keys[0].epoch, 77), ct, _aad(keys, 0, 3, pc)) == _plain(k, v, 0, 0, pc)
    r = log.ring.records()
    assert r["record_no"].tolist() == list(range(500, 500 + pc))
    assert r["pos_start"].tolist() == list(range(3, 3 + pc)) and (r["nonce_counter"] == 77).all()
    assert len(log.ring.committed) >= 7 and all(n <= 16 for _, n in log.ring.committed)
    assert sum(n for _, n in log.ring.committed) == pc


# ------------------------------------------------------------------ reservations, failure ownership, key erasure (CPU twin)

needs_shim = pytest.mark.skipif(not kh.available(), reason="no C++ compiler for the host shim")


@needs_shim
@pytest.mark.parametrize("direction", ["encrypt", "decrypt"])
@pytest.mark.parametrize("fail_in", ["_launch", "_upload"])
def test_an_exception_inside_a_reservation_leaves_error_records_and_flush_returns(direction, fail_in):
    """Through the real audit ring: whatever raises between the reservation and the launch (the launch, an
    upload that runs out of memory), the reserved records become ERROR records and the log drains."""
    from support.twin import TwinLog

    class Failing(CpuTwinBackend):
        armed = False

        def _launch(self, kernel, grid, block, args):
            if self.armed and fail_in == "_launch" and kernel in ("pqc_encrypt_chunks", "pqc_decrypt_chunks"):
                raise RuntimeError("launch failed")
            super()._launch(kernel, grid, block, args)

        def _upload_region(self, packed):
            if self.armed and fail_in == "_upload":
                raise torch.cuda.OutOfMemoryError("out of memory uploading the kernel parameters")
            return super()._upload_region(packed)

    be = Failing()
    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    log = TwinLog(ring_capacity=64)
    try:
        ctx = AuditContext(log, np.array([log.tenant_index("tenant-0"), log.tenant_index("tenant-1")], np.uint32),
                           np.array([log.session_index("s-0", "tenant-0"), log.session_index("s-1", "tenant-1")],
                                    np.uint32))
        if direction == "decrypt":
            be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
        be.armed = True
        with pytest.raises((RuntimeError, torch.cuda.OutOfMemoryError)):
            if direction == "encrypt":
                be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
            else:
                be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), ctx)
        assert log.flush(timeout=10)
        recs = log.entries(limit=None)
        assert recs and all(not e.success and e.status == 3 and e.operation == direction for e in recs)
    finally:
        log.close(timeout=10)


class _Owner:
    pass


@needs_shim
@pytest.mark.parametrize("first_tag", [1, (1 << 16) - 1])
def test_failures_belong_to_the_owner_of_the_call_that_found_them(first_tag):
    """Two callers on one device backend: B's tampered chunk is raised by B's check only, also when
    their call tags are 65,536 apart (a 16-bit tag would make them collide)."""
    import itertools

    be = CpuTwinBackend()
    be._failures.tags = itertools.count(first_tag)
    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    bad = arena.clone()
    bad[int(chunks.offset[2]) + 1000] ^= 1
    a, b = _Owner(), _Owner()
    be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), owner=a)
    if first_tag != 1:
        for _ in range(3):   # other callers in between
            be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), owner=_Owner())
    be.decrypt_chunks(keys, LAYOUT, chunks, bad, torch.empty_like(k), torch.empty_like(v), owner=b)
    be.check(a)                                   # A's calls found nothing
    with pytest.raises(DecryptionError) as ei:
        be.check(b)
    assert ei.value.positions == range(10, 74)
    be.check(b)                                   # reported once
    be.check()                                    # and to no one else


@needs_shim
def test_two_caches_on_one_device_backend_each_check_only_their_own_failures():
    from support.cache_models import sessions, tiny_model

    from pqc_kv_cache.cache import EncryptedCache

    be = CpuTwinBackend()
    cfg = tiny_model("llama").config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    caches = [EncryptedCache(cfg, sessions=sessions(name), backend=be) for name in ("alice", "bob")]
    g = torch.Generator().manual_seed(0)
    for c in caches:
        for layer in range(cfg.num_hidden_layers):
            c.update(torch.randn(1, heads, 4, dim, generator=g), torch.randn(1, heads, 4, dim, generator=g), layer)
    caches[1].layers[0].ciphertext[5] ^= 1             # bob's ciphertext, layer 0
    for c in caches:
        c.update(torch.randn(1, heads, 1, dim, generator=g), torch.randn(1, heads, 1, dim, generator=g), 0)
    caches[0].check()                               # alice's reads were fine
    with pytest.raises(DecryptionError):
        caches[1].check()


@needs_shim
def test_device_key_material_is_zeroed_on_eviction_and_forget_keys(monkeypatch):
    """Crypto-shredding on the device: key schedules (evicted or forgotten), the uploaded raw keys and
    their pinned staging are zeroed, not just freed."""
    import pqc_kv_cache.backends.cuda_keys as keys_mod

    monkeypatch.setattr(keys_mod, "KEY_CACHE_ENTRIES", 1)
    be = CpuTwinBackend()
    keys = _slots()

    def holds_a_key(t):
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        return any(ks.key in data for ks in keys)

    first = be._schedules(keys)
    assert first.any()
    buffers = be.twin_device.allocations
    assert not any(holds_a_key(t) for t in buffers)      # staging and device copy of the raw keys: zeroed
    second = be._schedules(keys[:1])                     # another key set: evicts the first (cache of 1)
    assert not first.any()                               # evicted schedules are zeroed
    be.forget_keys()
    assert not second.any()
    assert not any(holds_a_key(t) for t in be.twin_device.allocations)


@needs_shim
def test_raw_keys_leave_the_pinned_staging_as_soon_as_the_schedules_are_built():
    """The pinned staging of raw keys is zero when the preparation returns, not at the next key-set miss,
    and the keys reached the schedules (they open what AESGCM sealed)."""
    be = CpuTwinBackend()
    keys = _slots()
    staged = []

    class Watch(type(be.twin_device)):
        def upload_keys(self, dst, src):
            staged.append(bytes(src.numpy()))            # what the copy reads: the raw keys
            super().upload_keys(dst, src)

    be.twin_device.__class__ = Watch
    be._schedules(keys)
    assert staged and staged[0] == b"".join(ks.key for ks in keys)
    stage = be._keys.staging_bytes()
    assert stage is not None and not stage.any()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    off, pc = int(chunks.offset[0]), ENTRIES[0][3]
    ct = arena[off:off + pc * LAYOUT.bytes_per_position + 16].numpy().tobytes()
    assert AESGCM(keys[0].key).decrypt(make_nonce(keys[0].epoch, ENTRIES[0][5]), ct, _aad(keys, 0, 0, pc)) \
        == _plain(k, v, 0, 0, pc)


@needs_shim
def test_each_key_preparation_has_a_device_key_buffer_of_its_own():
    """Two key-set preparations never share the device raw-key buffer: preparations on different streams
    are not ordered by the host lock, so a shared buffer could take one set's keys while the other's
    preparation kernel reads it (a schedule built from another tenant's key or from zeros)."""
    be = CpuTwinBackend()
    targets = []

    class Watch(type(be.twin_device)):
        def upload_keys(self, dst, src):
            targets.append(dst)                          # kept alive: a buffer still in use elsewhere
            super().upload_keys(dst, src)

    be.twin_device.__class__ = Watch
    first = _slots()
    second = [KeySlot(key=bytes([i + 1]) * 32, tenant_tag=tenant_tag("other"), session_tag=session_tag("o"),
                      epoch=1) for i in range(3)]
    be._schedules(first)
    be._schedules(second)
    assert len(targets) == 2
    assert targets[0].untyped_storage().data_ptr() != targets[1].untyped_storage().data_ptr()
    assert not targets[0].any() and not targets[1].any()   # each zeroed after its preparation


@needs_shim
def test_a_failure_counted_while_the_queue_is_read_is_not_erased():
    """A decrypt on another thread that finds a failure while check() empties the failure queue (between the
    read and the reset of its counter) keeps its failure: the next check of its owner raises it."""
    import threading

    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    bad = torch.zeros(size, dtype=torch.uint8)           # nothing sealed: every tag fails
    other = _Owner()
    done = threading.Event()

    class Racing(CpuTwinBackend):
        armed = False

        def _reset_failures(self):
            if self.armed:
                self.armed = False
                t = threading.Thread(target=lambda: (self.decrypt_chunks(keys, LAYOUT, chunks, bad, torch.empty_like(k),
                                                                         torch.empty_like(v), owner=other),
                                                     done.set()))
                t.start()
                t.join(timeout=1.0)      # it runs to the end unless the queue's reader holds it back
            super()._reset_failures()

    be = Racing()
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena)
    me = _Owner()
    be.decrypt_chunks(keys, LAYOUT, chunks, bad, torch.empty_like(k), torch.empty_like(v), owner=me)
    be.armed = True
    with pytest.raises(DecryptionError):
        be.check(me)
    assert done.wait(10)
    with pytest.raises(DecryptionError) as ei:
        be.check(other)
    assert ei.value.layer_idx == 3


@needs_shim
def test_calls_inside_cuda_graph_capture_are_refused(monkeypatch):
    """A capture of the cache's calls would replay staging uploads and re-seal under the same nonces: refused
    with a clear error before anything is launched or reserved."""
    be = CpuTwinBackend()
    keys = _slots()
    k, v = _kv(torch.device("cpu"))
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    log = FakeLog(torch.device("cpu"))
    ctx = AuditContext(log, np.array([0, 1], np.uint32), np.array([0, 1], np.uint32))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(BackendUnavailableError, match="CUDA graph"):
        be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
    with pytest.raises(BackendUnavailableError, match="CUDA graph"):
        be.decrypt_chunks(keys, LAYOUT, chunks, arena, torch.empty_like(k), torch.empty_like(v), ctx)
    assert be.launches == [] and not arena.any() and not log.ring.views
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    be.encrypt_chunks(keys, LAYOUT, chunks, k, v, arena, ctx)
    assert arena.any()


def test_each_call_s_parameters_name_its_own_k_and_v_tensors():
    """The parameter record is remembered per (layout, strides): the K/V pointers are patched per call, as a
    decode step's new states are new tensors of the same shape."""
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend(fake_device(132, 4), execute=False)
    chunks, size = _table()
    arena = torch.zeros(size, dtype=torch.uint8)
    seen = []
    for _ in range(3):
        k, v = _kv(torch.device("cpu"))
        be.encrypt_chunks(_slots(), LAYOUT, chunks, k, v, arena)
        name, a = be.launch_args[-1]
        assert name == "pqc_encrypt_chunks"
        assert (int(a["k"]), int(a["v"])) == (k.data_ptr(), v.data_ptr())
        seen.append((k, v))         # kept alive: each call's tensors are distinct memory


def test_a_bad_key_is_refused_also_in_a_call_without_chunks():
    if not kh.available():
        pytest.skip("no C++ compiler for the host shim")
    be = CpuTwinBackend(fake_device(2, 2), execute=False)
    empty = ChunkTable(*(np.zeros(0, np.int64) for _ in range(7)))
    k, v = _kv(torch.device("cpu"))
    bad = KeySlot(b"\x01" * 31, b"\x00" * 16, b"\x00" * 16, 0)
    for _ in range(2):          # refused again when the same key set comes back
        with pytest.raises(ValueError, match="32-byte key"):
            be.encrypt_chunks([bad], LAYOUT, empty, k, v, torch.zeros(16, dtype=torch.uint8))
