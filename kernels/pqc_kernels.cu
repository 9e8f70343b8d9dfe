// pqc_kv_cache CUDA kernels: thin launchers over the primitives of pqc_gcm.cuh.
//
// Launch shape (computed in one place, pqc_kv_cache/backends/cuda.py):
//   * pqc_prepare_keys:      grid = number of key slots, block = 256.
//   * pqc_encrypt_chunks,
//     pqc_decrypt_chunks:    block = PQC_LANES (256) threads, grid = min(n,
//                            SMs x 4); each CTA walks chunks
//                            blockIdx.x, blockIdx.x + gridDim.x, ... so the
//                            shared tables are filled once per CTA, not per chunk.
//   * pqc_decrypt_row_records: one thread per row descriptor, 128 per block.
//
// One chunk is processed by one CTA: its 256 threads are the 256 GHASH lanes of
// pqc_gcm_lane (lane t CTR-crypts data blocks t - pad - a (mod 256) and keeps a
// Horner accumulator in H^256); the lanes' partial hashes are XOR-reduced with
// warp shuffles and one shared word per warp, and thread 0 forms the tag.
//
// AES tables: TE (1 KiB) is replicated 32 times in shared memory, interleaved so
// that copy l sits in bank l (entry x of copy l at word 32x + l); lane l of a
// warp reads only copy l, so the 16 data-dependent lookups per round never
// conflict. 32 KiB per CTA. The GHASH Horner step uses a 4-bit table of H^256
// (512 x 16 B = 8 KiB, rebuilt when the CTA's key slot changes); each lane's final
// multiply by H^(256 - t) uses its own 16-entry table from the key schedule.
//
// Tensor layout: K/V sources (encrypt) and destinations (decrypt) are
// [batch, heads, seq, dim] with any byte strides for batch, head and seq and a
// contiguous dim axis; head_dim * itemsize must be a multiple of 16 (checked on
// the host). Blocks are moved as 16-byte vectors when base pointers and strides
// are 16-byte aligned, bytewise otherwise.
//
// Audit: encrypt writes one ENCRYPT record per (row, position) into the ring
// view at index aux + p (aux = exclusive prefix sum of pos_count, computed by
// the host with the table). Decrypt first writes one DECRYPT record per row
// read (pqc_decrypt_row_records), then a failing chunk ORs AUTH_FAILED into its
// row's record and appends a record with its exact positions to the
// backend's device failure queue (atomic counter; read by the host only at a
// synchronisation point the caller owns, CudaBackend.check()). A failing
// chunk's destination is zeroed by the same CTA before the kernel ends.
#include "pqc_audit_record.h"
#include "pqc_gcm.cuh"

#define PQC_LANES 256
#define PQC_WARPS (PQC_LANES / 32)

// Lane-private view of the 32-way replicated TE table.
struct pqc_te_lanes {
    const uint32_t* t;
    uint32_t lane;
    __device__ __forceinline__ uint32_t operator()(uint32_t x) const { return t[(x << 5) | lane]; }
};

__device__ __forceinline__ uint64_t pqc_globaltimer() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void pqc_store_record(uint8_t* dst, const uint32_t w[16]) {
    uint4* d = reinterpret_cast<uint4*>(dst);  // ring slots are 64-byte aligned
    d[0] = make_uint4(w[0], w[1], w[2], w[3]);
    d[1] = make_uint4(w[4], w[5], w[6], w[7]);
    d[2] = make_uint4(w[8], w[9], w[10], w[11]);
    d[3] = make_uint4(w[12], w[13], w[14], w[15]);
}

// Fill the replicated TE table: thread x computes TE[x] and writes its 32
// copies, starting at a different copy per thread so a warp's stores spread
// over the banks.
__device__ __forceinline__ void pqc_fill_te_lanes(uint32_t* te_s) {
    const uint32_t x = threadIdx.x;
    const uint32_t v = pqc_te_entry(x);
    for (uint32_t l = 0; l < 32; ++l) te_s[(x << 5) | ((l + x) & 31u)] = v;
}

__device__ __forceinline__ pqc_u128 pqc_warp_xor(pqc_u128 v) {
    for (int off = 16; off > 0; off >>= 1) {
        v.hi ^= __shfl_xor_sync(0xFFFFFFFFu, v.hi, off);
        v.lo ^= __shfl_xor_sync(0xFFFFFFFFu, v.lo, off);
    }
    return v;
}

// XOR of every thread's v, valid in thread 0; red has PQC_WARPS entries.
__device__ __forceinline__ pqc_u128 pqc_cta_xor(pqc_u128 v, pqc_u128* red) {
    v = pqc_warp_xor(v);
    if ((threadIdx.x & 31u) == 0u) red[threadIdx.x >> 5] = v;
    __syncthreads();
    pqc_u128 s = {0ull, 0ull};
    if (threadIdx.x == 0) {
        for (int w = 0; w < PQC_WARPS; ++w) s = pqc_u128_xor(s, red[w]);
    }
    return s;
}

// Loads the per-slot round keys and the Horner table into shared memory (each lane's
// final-multiply table stays in global memory: 256 B per lane, read 32 times per chunk).
__device__ __forceinline__ void pqc_load_slot(const pqc_key_sched* ks, uint32_t* rk_s, pqc_u128* gtab_s) {
    __syncthreads();
    for (int e = threadIdx.x; e < PQC_GHASH_TAB_ENTRIES; e += PQC_LANES) gtab_s[e] = pqc_ghash_tab_entry(ks->vtab, e);
    for (int e = threadIdx.x; e < PQC_AES256_ROUND_KEYS; e += PQC_LANES) rk_s[e] = ks->rk[e];
    __syncthreads();
}

// Key schedules for n slots: keys n x 32 bytes -> sched[n] (lanes = PQC_LANES).
extern "C" __global__ void __launch_bounds__(256) pqc_prepare_keys(const uint8_t* keys, long long n,
                                                                   pqc_key_sched* sched) {
    __shared__ uint32_t te_s[256];
    te_s[threadIdx.x] = pqc_te_entry(threadIdx.x);
    __syncthreads();
    if (blockIdx.x < n && threadIdx.x == 0) {
        pqc_te_flat te = {te_s};
        pqc_prepare_key(te, keys + 32ll * blockIdx.x, PQC_LANES, sched + blockIdx.x);
    }
}

extern "C" __global__ void __launch_bounds__(PQC_LANES) pqc_encrypt_chunks(
    const pqc_key_sched* sched, const pqc_slot_meta* meta, const long long* table, long long n,
    unsigned layer, unsigned num_heads, unsigned head_dim, unsigned itemsize, unsigned dtype_code,
    uint8_t* k, long long k_sb, long long k_sh, long long k_ss,
    uint8_t* v, long long v_sb, long long v_sh, long long v_ss,
    uint8_t* arena, uint8_t* records, unsigned long long first_no) {
    __shared__ uint32_t te_s[256 * 32];
    __shared__ pqc_u128 gtab_s[PQC_GHASH_TAB_ENTRIES];
    __shared__ uint32_t rk_s[PQC_AES256_ROUND_KEYS];
    __shared__ pqc_u128 red_s[PQC_WARPS];
    pqc_fill_te_lanes(te_s);
    const pqc_layout_args L = {layer, num_heads, head_dim, itemsize, dtype_code};
    const pqc_kv_tensor kt = {k, k_sb, k_sh, k_ss}, vt = {v, v_sb, v_sh, v_ss};
    const pqc_te_lanes te = {te_s, threadIdx.x & 31u};
    const int64_t* tab = reinterpret_cast<const int64_t*>(table);
    long long cur_slot = -1;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        pqc_chunk c;
        pqc_chunk_setup(tab, n, i, meta, L, kt, vt, &c);
        if (c.slot != cur_slot) {  // uniform across the CTA
            pqc_load_slot(sched + c.slot, rk_s, gtab_s);
            cur_slot = c.slot;
        }
        uint8_t* ct = arena + c.offset;
        const bool ct_aligned = (reinterpret_cast<unsigned long long>(ct) & 15ull) == 0ull;
        pqc_io_kv_to_arena io = {c.kv, ct, ct_aligned};
        pqc_u128 g = pqc_gcm_lane(te, rk_s, sched[c.slot].lane_tab, gtab_s, c.msg, io, true, threadIdx.x, PQC_LANES);
        g = pqc_cta_xor(g, red_s);
        if (threadIdx.x == 0) pqc_gcm_tag(te, rk_s, c.msg.nonce_w, g, ct + c.nbytes);
        if (records != nullptr) {
            const uint64_t ts = pqc_globaltimer();
            for (uint32_t p = threadIdx.x; p < (uint32_t)c.pos_count; p += PQC_LANES) {
                uint32_t w[16];
                pqc_encrypt_record(c, meta, L, first_no + (uint64_t)c.aux + p, ts, p, w);
                pqc_store_record(records + 64ll * (c.aux + p), w);
            }
        }
        __syncthreads();  // red_s is reused by the next chunk
    }
}

// One DECRYPT record per row read, status OK; failing chunks OR in AUTH_FAILED later
// on the same stream. rowdesc: int64 [PQC_ROWDESC_COLS, nrows].
extern "C" __global__ void __launch_bounds__(128) pqc_decrypt_row_records(
    const pqc_slot_meta* meta, const long long* rowdesc, long long nrows, unsigned layer,
    unsigned num_heads, unsigned head_dim, unsigned itemsize, unsigned dtype_code,
    uint8_t* records, unsigned long long first_no) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= nrows) return;
    const pqc_layout_args L = {layer, num_heads, head_dim, itemsize, dtype_code};
    uint32_t w[16];
    pqc_row_record(reinterpret_cast<const int64_t*>(rowdesc), nrows, r, meta, L, first_no + (uint64_t)r,
                   pqc_globaltimer(), w);
    pqc_store_record(records + 64ll * r, w);
}

extern "C" __global__ void __launch_bounds__(PQC_LANES) pqc_decrypt_chunks(
    const pqc_key_sched* sched, const pqc_slot_meta* meta, const long long* table, long long n,
    unsigned layer, unsigned num_heads, unsigned head_dim, unsigned itemsize, unsigned dtype_code,
    const uint8_t* arena,
    uint8_t* k, long long k_sb, long long k_sh, long long k_ss,
    uint8_t* v, long long v_sb, long long v_sh, long long v_ss,
    uint8_t* status, uint8_t* records, uint8_t* fq, unsigned* fq_count, unsigned fq_cap, unsigned call_tag) {
    __shared__ uint32_t te_s[256 * 32];
    __shared__ pqc_u128 gtab_s[PQC_GHASH_TAB_ENTRIES];
    __shared__ uint32_t rk_s[PQC_AES256_ROUND_KEYS];
    __shared__ pqc_u128 red_s[PQC_WARPS];
    __shared__ int ok_s;
    pqc_fill_te_lanes(te_s);
    const pqc_layout_args L = {layer, num_heads, head_dim, itemsize, dtype_code};
    const pqc_kv_tensor kt = {k, k_sb, k_sh, k_ss}, vt = {v, v_sb, v_sh, v_ss};
    const pqc_te_lanes te = {te_s, threadIdx.x & 31u};
    const int64_t* tab = reinterpret_cast<const int64_t*>(table);
    long long cur_slot = -1;
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        pqc_chunk c;
        pqc_chunk_setup(tab, n, i, meta, L, kt, vt, &c);
        if (c.slot != cur_slot) {
            pqc_load_slot(sched + c.slot, rk_s, gtab_s);
            cur_slot = c.slot;
        }
        const uint8_t* ct = arena + c.offset;
        const bool ct_aligned = (reinterpret_cast<unsigned long long>(ct) & 15ull) == 0ull;
        pqc_io_arena_to_kv io = {c.kv, ct, ct_aligned};
        pqc_u128 g = pqc_gcm_lane(te, rk_s, sched[c.slot].lane_tab, gtab_s, c.msg, io, false, threadIdx.x, PQC_LANES);
        g = pqc_cta_xor(g, red_s);
        if (threadIdx.x == 0) {
            uint8_t tag[16];
            pqc_gcm_tag(te, rk_s, c.msg.nonce_w, g, tag);
            ok_s = pqc_ct_equal(tag, ct + c.nbytes, 16);
        }
        __syncthreads();
        const int ok = ok_s;
        if (!ok) {
            const uint64_t nblocks = c.nbytes / 16u;
            for (uint64_t j = threadIdx.x; j < nblocks; j += PQC_LANES) io.zero(j);
        }
        if (threadIdx.x == 0) {
            status[i] = (uint8_t)(ok ? 0 : 1);
            if (!ok) {
                if (records != nullptr && c.aux >= 0) {
                    unsigned* word = reinterpret_cast<unsigned*>(records + 64ll * c.aux) + PQC_RECORD_STATUS_WORD;
                    atomicOr(word, (unsigned)PQC_STATUS_AUTH_FAILED << PQC_RECORD_STATUS_SHIFT);
                }
                const unsigned idx = atomicAdd(fq_count, 1u);
                if (idx < fq_cap) {
                    uint32_t w[16];
                    pqc_failure_record(c, meta, L, pqc_globaltimer(), call_tag, w);
                    pqc_store_record(fq + 64ull * idx, w);
                }
            }
        }
        __syncthreads();  // ok_s and red_s are reused by the next chunk
    }
}
