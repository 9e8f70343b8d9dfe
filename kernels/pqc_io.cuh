// pqc_kv_cache kernels: where a message's 16-byte data blocks come from and go
// to: a flat buffer (the shim's one-shot GCM) or a KV chunk in [batch, heads,
// seq, dim] tensors of any byte strides (the chunk kernels).
#ifndef PQC_IO_CUH
#define PQC_IO_CUH

#include "pqc_base.cuh"


// Flat message: input and output are contiguous byte ranges (the last block may be partial).
struct pqc_io_flat {
    const uint8_t* in;
    uint8_t* out;
    uint64_t nbytes;
    PQC_HD uint32_t block_len(uint64_t j) const {
        uint64_t left = nbytes - 16ull * j;
        return left >= 16ull ? 16u : (uint32_t)left;
    }
    PQC_HD void load(uint64_t j, uint32_t w[4]) const {
        uint8_t b[16];
        uint32_t n = block_len(j);
        for (uint32_t i = 0; i < 16; ++i) b[i] = i < n ? in[16 * j + i] : (uint8_t)0;
        for (int i = 0; i < 4; ++i) w[i] = pqc_load_be32(b + 4 * i);
    }
    PQC_HD void store(uint64_t j, const uint32_t w[4]) const {
        uint8_t b[16];
        for (int i = 0; i < 4; ++i) pqc_store_be32(b + 4 * i, w[i]);
        uint32_t n = block_len(j);
        for (uint32_t i = 0; i < n; ++i) out[16 * j + i] = b[i];
    }
};

// 16 bytes at p (16-byte aligned when `aligned`), as big-endian words.
PQC_HD void pqc_load16(const uint8_t* p, bool aligned, uint32_t w[4]) {
#if defined(__CUDA_ARCH__)
    if (aligned) {
        uint4 v = *reinterpret_cast<const uint4*>(p);
        w[0] = pqc_bswap32(v.x); w[1] = pqc_bswap32(v.y); w[2] = pqc_bswap32(v.z); w[3] = pqc_bswap32(v.w);
        return;
    }
#else
    (void)aligned;
#endif
    for (int i = 0; i < 4; ++i) w[i] = pqc_load_be32(p + 4 * i);
}

PQC_HD void pqc_store16(uint8_t* p, bool aligned, const uint32_t w[4]) {
#if defined(__CUDA_ARCH__)
    if (aligned) {
        uint4 v;
        v.x = pqc_bswap32(w[0]); v.y = pqc_bswap32(w[1]); v.z = pqc_bswap32(w[2]); v.w = pqc_bswap32(w[3]);
        *reinterpret_cast<uint4*>(p) = v;
        return;
    }
#else
    (void)aligned;
#endif
    for (int i = 0; i < 4; ++i) pqc_store_be32(p + 4 * i, w[i]);
}

// A KV chunk: plaintext block j lives in the K or V tensor at
// [row, h, io_start + pos, d..] with (h, pos, byte offset in the head row)
// from j; strides in bytes; head_dim * itemsize is a multiple of 16, so a
// block never straddles a head row, the K/V boundary or the chunk end.
struct pqc_kv_view {
    uint8_t* k;
    uint8_t* v;
    int64_t k_sb, k_sh, k_ss;
    int64_t v_sb, v_sh, v_ss;
    uint32_t row_bytes;   // head_dim * itemsize
    uint64_t pos_count;
    uint64_t half;        // K bytes of the chunk (= V bytes)
    int64_t row;
    int64_t io_start;
    bool aligned;
    PQC_HD uint8_t* addr(uint64_t j) const {
        uint64_t b = 16ull * j;   // 64-bit: a chunk may hold more than 4 GiB
        const bool is_v = b >= half;
        if (is_v) b -= half;
        const uint64_t head_bytes = (uint64_t)row_bytes * pos_count;
        const uint64_t h = b / head_bytes;
        const uint64_t rem = b - h * head_bytes;
        const uint64_t pos = rem / row_bytes;
        const uint64_t off = rem - pos * row_bytes;
        if (is_v) return v + row * v_sb + (int64_t)h * v_sh + (io_start + (int64_t)pos) * v_ss + (int64_t)off;
        return k + row * k_sb + (int64_t)h * k_sh + (io_start + (int64_t)pos) * k_ss + (int64_t)off;
    }
};

// The two chunk views below refer to the chunk's pqc_kv_view rather than copying it: the
// kernels keep the view in shared memory (one copy per CTA, read where a block's address is
// formed) instead of holding its 15 fields in every thread's registers across the lane walk.

// Encrypt source: plaintext from the KV tensors, ciphertext into the arena.
struct pqc_io_kv_to_arena {
    const pqc_kv_view* kv;
    uint8_t* arena;      // chunk's ciphertext start
    bool arena_aligned;
    PQC_HD uint32_t block_len(uint64_t) const { return 16u; }
    PQC_HD void load(uint64_t j, uint32_t w[4]) const { pqc_load16(kv->addr(j), kv->aligned, w); }
    PQC_HD void store(uint64_t j, const uint32_t w[4]) const { pqc_store16(arena + 16ull * j, arena_aligned, w); }
};

// Decrypt: ciphertext from the arena, plaintext into the KV tensors.
struct pqc_io_arena_to_kv {
    const pqc_kv_view* kv;
    const uint8_t* arena;
    bool arena_aligned;
    PQC_HD uint32_t block_len(uint64_t) const { return 16u; }
    PQC_HD void load(uint64_t j, uint32_t w[4]) const { pqc_load16(arena + 16ull * j, arena_aligned, w); }
    PQC_HD void store(uint64_t j, const uint32_t w[4]) const { pqc_store16(kv->addr(j), kv->aligned, w); }
    PQC_HD void zero(uint64_t j) const {
        uint32_t z[4] = {0u, 0u, 0u, 0u};
        pqc_store16(kv->addr(j), kv->aligned, z);
    }
};

#endif  // PQC_IO_CUH
