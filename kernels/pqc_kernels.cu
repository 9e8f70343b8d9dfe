// pqc_kv_cache CUDA kernels: thin launchers over the primitives of the kernel headers
// (pqc_chunk.cuh and what it includes).
//
// Launch shape (computed in one place, CudaBackend.launch_slots in
// pqc_kv_cache/backends/cuda.py, from the device's SM count and an occupancy
// query of each kernel):
//   * pqc_prepare_keys:      grid = number of key slots, block = 256.
//   * pqc_encrypt_chunks,
//     pqc_decrypt_chunks:    block = PQC_LANES (256) threads, grid = min(work
//                            items, SMs x resident CTAs per SM); each CTA walks
//                            the items blockIdx.x, blockIdx.x + gridDim.x, ...
//                            so the shared tables are filled once per CTA.
//   * pqc_decrypt_row_records: one thread per row descriptor, 128 per block.
//
// Work items. A chunk's GHASH sequence is walked in R rounds of 256 blocks (see
// pqc_gcm.cuh). A work item is a range of rounds [r0, r1) of one chunk; the host
// (kernel_abi.work_items) cuts chunks into items planned for the device's resident
// CTAs: fewer chunks than slots share them in proportion to their rounds, no item
// below 4 rounds, so a launch with less work than that leaves SMs idle (a decode
// step's encrypt: one item per row). Without an item table (items == nullptr) item
// i is all of chunk i. The item and its chunk are set up by thread 0 in shared
// memory (pqc_item_ctx).
// Within an item the CTA's 256 threads are the 256 GHASH lanes of pqc_gcm_lane
// (lane t CTR-crypts the data blocks of its rounds and keeps a Horner
// accumulator in H^256); the lanes' partial hashes are XOR-reduced with warp
// shuffles and one shared word per warp.
//   * An item that is a whole chunk forms the tag itself (thread 0).
//   * An item that is part of a chunk multiplies its partial by (H^256)^(R - r1)
//     (warp 0: eight 4-bit window factors from the key schedule, multiplied in a
//     shuffle tree: 7 bitwise multiplies, 3 on the critical path, then thread 0's
//     one: 8 per split item, 4 on the critical path), stores it in partials[first + j], fences, and increments the
//     chunk's counter. The CTA that brings the counter to the chunk's item count
//     (the last one done) XORs the chunk's partials into the GHASH value and
//     forms the tag: encrypt writes it; decrypt compares it and, if it fails,
//     zeroes the whole chunk's destination (also the blocks other CTAs wrote)
//     before the kernel ends, so nothing later on the stream sees it.
// The counters are zeroed by the host on the stream before the launch.
//
// AES tables: TE (1 KiB) is replicated 32 times in shared memory, interleaved so
// that copy l sits in bank l (entry x of copy l at word 32x + l); lane l of a
// warp reads only copy l, so the 16 data-dependent lookups per round never
// conflict. 32 KiB per CTA. A lookup's address is formed from the state word in
// two instructions (pqc_te_lanes in pqc_aes.cuh). The GHASH Horner step uses a 4-bit table of H^256
// (512 x 16 B = 8 KiB as two 64-bit tables of high and low halves, bank-conflict free;
// rebuilt when the CTA's key slot changes); each lane's final
// multiply by H^(256 - t) uses its own 16-entry table from the key schedule.
//
// Tensor layout: K/V sources (encrypt) and destinations (decrypt) are
// [batch, heads, seq, dim] with any byte strides for batch, head and seq and a
// contiguous dim axis; head_dim * itemsize must be a multiple of 16 (checked on
// the host). Blocks are moved as 16-byte vectors when base pointers and strides
// are 16-byte aligned, bytewise otherwise. Offsets within a chunk are 64-bit.
// An encrypt with copy_k set also writes each chunk's plaintext into the copy
// tensors (same layout rules) at the index it reads it from: the first item of
// the chunk does, after its lane walk (a working-set update's plaintext store,
// written without a launch of its own).
//
// Audit: encrypt writes one ENCRYPT record per (row, position): item i writes
// those of positions [p0, p1) of its chunk, record index aux + p (aux = exclusive
// prefix sum of pos_count over the call, computed by the host), into the ring
// view at aux + p - rec_lo (the view holds this launch's records). Decrypt first
// writes one DECRYPT record per row read (pqc_decrypt_row_records), then a
// failing chunk ORs AUTH_FAILED into its row's record and appends a record with
// its exact positions to the backend's device failure queue (atomic counter;
// read by the host only at a synchronisation point the caller owns,
// CudaBackend.check()).
#include "pqc_chunk.cuh"

#define PQC_LANES 256
#define PQC_WARPS (PQC_LANES / 32)
// Register cap for the chunk kernels: at most 65536 / (256 x 4) = 64 registers, so 4 CTAs
// (41 KiB of shared memory each) fit on an SM of sm_80 / sm_90. The launch geometry itself
// comes from the occupancy query, not from this number.
#define PQC_MIN_CTAS 4


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
    for (uint32_t l = 0; l < PQC_TE_COPIES; ++l) te_s[(x << 5) | ((l + x) & 31u)] = v;
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
__device__ __forceinline__ void pqc_load_slot(const pqc_key_sched* ks, uint32_t* rk_s, uint64_t* gtab_s) {
    __syncthreads();
    for (int e = threadIdx.x; e < PQC_GHASH_TAB_ENTRIES; e += PQC_LANES)
        pqc_ghash_tab_set(gtab_s, e, pqc_ghash_tab_entry(ks->vtab, e));
    for (int e = threadIdx.x; e < PQC_AES256_ROUND_KEYS; e += PQC_LANES) rk_s[e] = ks->rk[e];
    __syncthreads();
}

// (H^256)^e in lane 0 of the calling warp (all 32 lanes call): lanes 0..7 take the
// window factors of e, multiplied pairwise in a shuffle tree (pqc_item_multiplier on the host).
__device__ __forceinline__ pqc_u128 pqc_warp_ipow(const pqc_key_sched* ks, uint32_t e) {
    const uint32_t lane = threadIdx.x & 31u;
    pqc_u128 v = {0x8000000000000000ull, 0ull};
    if (lane < PQC_IPOW_WINDOWS) v = pqc_ipow_factor(ks, e, (int)lane);
    for (uint32_t off = 1; off < PQC_IPOW_WINDOWS; off <<= 1) {
        pqc_u128 o;
        o.hi = __shfl_down_sync(0xFFFFFFFFu, v.hi, off);
        o.lo = __shfl_down_sync(0xFFFFFFFFu, v.lo, off);
        if ((lane & (2u * off - 1u)) == 0u) v = pqc_gf_mul(v, o);
    }
    return v;
}

// Combines the lanes' partial hashes of one item (all threads call with their lane's g).
// Returns true, uniformly across the CTA, if this CTA completes the chunk; thread 0's
// *ghash is then the chunk's GHASH value. See "Work items" above.
__device__ __forceinline__ bool pqc_item_combine(pqc_u128 g, const pqc_item& it, uint64_t rounds,
                                                 const pqc_key_sched* ks, pqc_u128* partials,
                                                 unsigned* counters, pqc_u128* red_s, int* last_s,
                                                 pqc_u128* ghash) {
    if (it.count == 1) {
        *ghash = pqc_cta_xor(g, red_s);
        return true;
    }
    const uint32_t e = (uint32_t)(rounds - it.r1);
    pqc_u128 mult = {0x8000000000000000ull, 0ull};
    if (threadIdx.x < 32u && e != 0u) mult = pqc_warp_ipow(ks, e);   // warp-uniform branch
    g = pqc_cta_xor(g, red_s);
    if (threadIdx.x == 0) {
        if (e != 0u) g = pqc_gf_mul(g, mult);
        partials[it.first + it.j] = g;
        __threadfence();                      // the partial (and this item's output) before the count
        const unsigned done = atomicAdd(counters + it.chunk, 1u);
        *last_s = done == (unsigned)(it.count - 1);
    }
    __syncthreads();
    if (!*last_s) return false;
    __threadfence();                          // the other items' partials and output after their count
    pqc_u128 x = {0ull, 0ull};
    for (int64_t q = threadIdx.x; q < it.count; q += PQC_LANES) {
        const unsigned long long* p = reinterpret_cast<const unsigned long long*>(partials + it.first + q);
        x.hi ^= __ldcg(p);
        x.lo ^= __ldcg(p + 1);
    }
    *ghash = pqc_cta_xor(x, red_s);
    return true;
}

// Work item i and its chunk, CTA-uniform, set up by thread 0 in shared memory: the lane walk
// reads the chunk's geometry (nonce, AAD, tensor view) from there where it needs it, instead
// of every thread holding some 40 registers of it across the walk.
struct pqc_item_ctx {
    pqc_item it;
    pqc_chunk c;
    uint64_t rounds;
    pqc_kv_view copy;     // encrypt with copy_k: where the chunk's plaintext is copied to
};

__device__ __forceinline__ void pqc_item_setup(const pqc_chunk_params& P, long long i, pqc_item_ctx* s) {
    if (threadIdx.x == 0) {
        const pqc_layout_args L = {P.layer, P.num_heads, P.head_dim, P.itemsize, P.dtype_code};
        const pqc_kv_tensor kt = {P.k, P.k_sb, P.k_sh, P.k_ss}, vt = {P.v, P.v_sb, P.v_sh, P.v_ss};
        pqc_item_get(P.items, P.n_items, i, &s->it);
        pqc_chunk_setup(P.table, P.n, s->it.chunk, P.meta, L, kt, vt, &s->c);
        s->rounds = pqc_item_resolve(&s->it, s->c, PQC_LANES);
        if (P.copy_k != nullptr) {
            const pqc_kv_tensor ck = {P.copy_k, P.copy_k_sb, P.copy_k_sh, P.copy_k_ss};
            const pqc_kv_tensor cv = {P.copy_v, P.copy_v_sb, P.copy_v_sh, P.copy_v_ss};
            pqc_copy_view(s->c, ck, cv, &s->copy);
        }
    }
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

// items: int64 [PQC_ITEM_COLS, n_items] or nullptr (item i = chunk i); partials / counters:
// per-call scratch (nullptr when no chunk is split); records: this launch's ring view, whose
// first slot holds record index rec_lo (nullptr: no records).
extern "C" __global__ void __launch_bounds__(PQC_LANES, PQC_MIN_CTAS) pqc_encrypt_chunks(
    const pqc_chunk_params* __restrict__ params) {
    const pqc_chunk_params& P = *params;
    __shared__ uint32_t te_s[256 * 32];
    __shared__ uint64_t gtab_s[PQC_GHASH_TAB_WORDS];
    __shared__ uint32_t rk_s[PQC_AES256_ROUND_KEYS];
    __shared__ pqc_u128 red_s[PQC_WARPS];
    __shared__ int last_s;
    __shared__ pqc_item_ctx x_s;
    pqc_fill_te_lanes(te_s);
    const pqc_te_lanes te = {te_s, (threadIdx.x & 31u) << 2};
    const pqc_item& it = x_s.it;
    const pqc_chunk& c = x_s.c;
    long long cur_slot = -1;
    for (long long i = blockIdx.x; i < P.n_items; i += gridDim.x) {
        pqc_item_setup(P, i, &x_s);
        const uint64_t rounds = x_s.rounds;
        if (c.slot != cur_slot) {  // uniform across the CTA
            pqc_load_slot(P.sched + c.slot, rk_s, gtab_s);
            cur_slot = c.slot;
        }
        uint8_t* ct = P.arena + c.offset;
        const bool ct_aligned = (reinterpret_cast<unsigned long long>(ct) & 15ull) == 0ull;
        pqc_io_kv_to_arena io = {&c.kv, ct, ct_aligned};
        const pqc_key_sched* ks = P.sched + c.slot;
        pqc_u128 g = pqc_gcm_lane(te, rk_s, ks->lane_tab, gtab_s, c.msg, io, true, threadIdx.x, PQC_LANES,
                                  it.r0, it.r1);
        pqc_u128 ghash;
        if (pqc_item_combine(g, it, rounds, ks, P.partials, P.counters, red_s, &last_s, &ghash) && threadIdx.x == 0)
            pqc_gcm_tag(te, rk_s, c.msg.nonce_w, ghash, ct + c.nbytes);
        if (P.copy_k != nullptr && it.j == 0) {     // the chunk's plaintext copy, by its first item
            for (uint64_t j = threadIdx.x; j < (c.nbytes >> 4); j += PQC_LANES) pqc_copy_block(c.kv, x_s.copy, j);
        }
        if (P.records != nullptr) {
            const uint64_t ts = pqc_globaltimer();
            const pqc_layout_args L = {P.layer, P.num_heads, P.head_dim, P.itemsize, P.dtype_code};
            for (int64_t p = it.p0 + threadIdx.x; p < it.p1; p += PQC_LANES) {
                uint32_t w[16];
                pqc_encrypt_record(c, P.meta, L, P.first_no + (uint64_t)(c.aux + p), ts, (uint32_t)p, w);
                pqc_store_record(P.records + 64ll * (c.aux + p - P.rec_lo), w);
            }
            if (P.row_op != 0u && it.j == 0 && threadIdx.x == 0) {  // the chunk's row record, once
                uint32_t w[16];
                const int64_t at = P.row_rec0 + it.chunk;
                pqc_chunk_row_record(c, P.meta, L, P.row_op, P.row_pos_start, P.row_pos_count, P.row_nbytes,
                                     P.first_no + (uint64_t)at, ts, w);
                pqc_store_record(P.records + 64ll * (at - P.rec_lo), w);
            }
        }
        __syncthreads();  // x_s, red_s and last_s are reused by the next item
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

// items / partials / counters as for pqc_encrypt_chunks; status[chunk]: 0 OK, 1 AUTH_FAILED.
extern "C" __global__ void __launch_bounds__(PQC_LANES, PQC_MIN_CTAS) pqc_decrypt_chunks(
    const pqc_chunk_params* __restrict__ params) {
    const pqc_chunk_params& P = *params;
    __shared__ uint32_t te_s[256 * 32];
    __shared__ uint64_t gtab_s[PQC_GHASH_TAB_WORDS];
    __shared__ uint32_t rk_s[PQC_AES256_ROUND_KEYS];
    __shared__ pqc_u128 red_s[PQC_WARPS];
    __shared__ int last_s;
    __shared__ int ok_s;
    __shared__ pqc_item_ctx x_s;
    pqc_fill_te_lanes(te_s);
    const pqc_te_lanes te = {te_s, (threadIdx.x & 31u) << 2};
    const pqc_item& it = x_s.it;
    const pqc_chunk& c = x_s.c;
    long long cur_slot = -1;
    for (long long i = blockIdx.x; i < P.n_items; i += gridDim.x) {
        pqc_item_setup(P, i, &x_s);
        const uint64_t rounds = x_s.rounds;
        if (c.slot != cur_slot) {  // uniform across the CTA
            pqc_load_slot(P.sched + c.slot, rk_s, gtab_s);
            cur_slot = c.slot;
        }
        const uint8_t* ct = P.arena + c.offset;
        const bool ct_aligned = (reinterpret_cast<unsigned long long>(ct) & 15ull) == 0ull;
        pqc_io_arena_to_kv io = {&c.kv, ct, ct_aligned};
        const pqc_key_sched* ks = P.sched + c.slot;
        pqc_u128 g = pqc_gcm_lane(te, rk_s, ks->lane_tab, gtab_s, c.msg, io, false, threadIdx.x, PQC_LANES,
                                  it.r0, it.r1);
        pqc_u128 ghash;
        if (pqc_item_combine(g, it, rounds, ks, P.partials, P.counters, red_s, &last_s, &ghash)) {
            if (threadIdx.x == 0) {
                uint8_t tag[16];
                pqc_gcm_tag(te, rk_s, c.msg.nonce_w, ghash, tag);
                ok_s = pqc_ct_equal(tag, ct + c.nbytes, 16);
            }
            __syncthreads();
            const int ok = ok_s;
            if (!ok) {
                const uint64_t nblocks = c.nbytes / 16u;
                for (uint64_t j = threadIdx.x; j < nblocks; j += PQC_LANES) io.zero(j);
            }
            if (threadIdx.x == 0) {
                P.status[it.chunk] = (uint8_t)(ok ? 0 : 1);
                if (!ok) {
                    if (P.records != nullptr && c.aux >= 0) {
                        unsigned* word = reinterpret_cast<unsigned*>(P.records + (int64_t)PQC_RECORD_SIZE * c.aux) + PQC_RECORD_STATUS_WORD;
                        atomicOr(word, (unsigned)PQC_STATUS_AUTH_FAILED << PQC_RECORD_STATUS_SHIFT);
                    }
                    const unsigned idx = atomicAdd(P.fq_count, 1u);
                    if (idx < P.fq_cap) {
                        uint32_t w[16];
                        const pqc_layout_args L = {P.layer, P.num_heads, P.head_dim, P.itemsize, P.dtype_code};
                        pqc_failure_record(c, P.meta, L, pqc_globaltimer(), P.call_tag, w);
                        pqc_store_record(P.fq + 64ull * idx, w);
                    }
                }
            }
        }
        __syncthreads();  // x_s, ok_s, last_s and red_s are reused by the next item
    }
}
