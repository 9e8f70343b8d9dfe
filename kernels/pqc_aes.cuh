// pqc_kv_cache kernels: AES-256 (encryption direction only, as CTR needs).
//
// An AES state / data block is four big-endian 32-bit words (w[0] holds bytes
// 0..3 of the block, byte 0 in the top 8 bits). AES uses one 256-entry table TE
// (TE[x] = 2S(x) | S(x) | S(x) | 3S(x), bytes from the top); the other three
// round tables are byte rotations of it, and the S-box is byte 2 of it. How TE
// is stored (a flat array on the host, 32 lane-private copies in shared memory
// on the device) is the caller's choice, given as a table accessor object with
// `template <int K> uint32_t byte(uint32_t s) const`: TE[byte K of s] (K = 0: the low
// byte). Taking the word and the byte position, rather than a byte index, lets the
// device accessor form the table address straight from the word (one shift and one
// mask-or, pqc_kernels.cu).
#ifndef PQC_AES_CUH
#define PQC_AES_CUH

#include "pqc_base.cuh"

#define PQC_AES256_ROUND_KEYS 60

// ------------------------------------------------------------------ the S-box
// Computed (multiplicative inverse in GF(2^8) followed by the affine map), so
// no table has to be trusted; used to fill TE and in the key expansion.

PQC_HD uint32_t pqc_gf8_mul(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int i = 0; i < 8; ++i) {
        r ^= a & (0u - (b & 1u));
        b >>= 1;
        a = ((a << 1) ^ (0x11Bu & (0u - ((a >> 7) & 1u)))) & 0xFFu;
    }
    return r;
}

PQC_HD uint32_t pqc_sbox(uint32_t x) {
    // x^254 = x^-1 in GF(2^8) (0 maps to 0)
    uint32_t x2 = pqc_gf8_mul(x, x);
    uint32_t x3 = pqc_gf8_mul(x2, x);
    uint32_t x6 = pqc_gf8_mul(x3, x3);
    uint32_t x12 = pqc_gf8_mul(x6, x6);
    uint32_t x15 = pqc_gf8_mul(x12, x3);
    uint32_t x30 = pqc_gf8_mul(x15, x15);
    uint32_t x60 = pqc_gf8_mul(x30, x30);
    uint32_t x63 = pqc_gf8_mul(x60, x3);
    uint32_t x126 = pqc_gf8_mul(x63, x63);
    uint32_t x127 = pqc_gf8_mul(x126, x);
    uint32_t inv = pqc_gf8_mul(x127, x127);
    uint32_t s = inv;
    uint32_t r = inv;
    for (int i = 0; i < 4; ++i) {
        r = ((r << 1) | (r >> 7)) & 0xFFu;
        s ^= r;
    }
    return (s ^ 0x63u) & 0xFFu;
}

// TE[x] = (2S(x), S(x), S(x), 3S(x)) from the top byte down.
PQC_HD uint32_t pqc_te_entry(uint32_t x) {
    uint32_t s = pqc_sbox(x);
    uint32_t s2 = pqc_gf8_mul(s, 2u);
    uint32_t s3 = s2 ^ s;
    return (s2 << 24) | (s << 16) | (s << 8) | s3;
}

// Accessor over a flat 256-entry TE table (host; device key preparation).
struct pqc_te_flat {
    const uint32_t* t;
    PQC_HD uint32_t operator()(uint32_t x) const { return t[x]; }
    template <int K>
    PQC_HD uint32_t byte(uint32_t s) const { return t[(s >> (8 * K)) & 0xFFu]; }
};

// Lane-private view of a 32-way replicated TE table (the kernels keep one in shared memory,
// the host shim one in memory so that this arithmetic is what its tests check): entry x of
// copy l is the word at byte 128x + 4l, so copy l lies in bank l and the 32 lanes of a warp,
// each reading its own copy, never conflict. The byte offset of byte K of a state word s is
// one shift of s (K = 3, 2, 1: right by 8K - 7; K = 0: left by 7) and one mask-or with 4 x lane
// (a single LOP3 on the GPU); the table's base is added by the load itself: two instructions
// besides the load, where the byte index, times 32, or lane, times 4, plus base took four.
#define PQC_TE_COPIES 32
struct pqc_te_lanes {
    const uint32_t* t;
    uint32_t lane4;   // 4 x lane (lane < PQC_TE_COPIES)
    template <int K>
    PQC_HD uint32_t byte(uint32_t s) const {
        const uint32_t sh = K == 0 ? (s << 7) : (s >> (8 * K - 7));
        const uint32_t off = (sh & 0x7F80u) | lane4;
        return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(t) + off);
    }
};

// ---------------------------------------------------------------- AES-256

PQC_HD uint32_t pqc_sub_word(uint32_t w) {
    return (pqc_sbox(w >> 24) << 24) | (pqc_sbox((w >> 16) & 0xFFu) << 16) |
           (pqc_sbox((w >> 8) & 0xFFu) << 8) | pqc_sbox(w & 0xFFu);
}

PQC_HD void pqc_aes256_expand_key(const uint8_t key[32], uint32_t rk[PQC_AES256_ROUND_KEYS]) {
    for (int i = 0; i < 8; ++i) rk[i] = pqc_load_be32(key + 4 * i);
    uint32_t rcon = 1u;
    for (int i = 8; i < PQC_AES256_ROUND_KEYS; ++i) {
        uint32_t t = rk[i - 1];
        if ((i & 7) == 0) {
            t = pqc_sub_word((t << 8) | (t >> 24)) ^ (rcon << 24);
            rcon = pqc_gf8_mul(rcon, 2u);
        } else if ((i & 7) == 4) {
            t = pqc_sub_word(t);
        }
        rk[i] = rk[i - 8] ^ t;
    }
}

template <class TE>
PQC_HD void pqc_aes256_encrypt_words(const TE& te, const uint32_t* rk, const uint32_t in[4], uint32_t out[4]) {
    uint32_t s0 = in[0] ^ rk[0], s1 = in[1] ^ rk[1], s2 = in[2] ^ rk[2], s3 = in[3] ^ rk[3];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int r = 1; r < 14; ++r) {
        const uint32_t* k = rk + 4 * r;
        uint32_t t0 = te.template byte<3>(s0) ^ pqc_ror32(te.template byte<2>(s1), 8) ^
                      pqc_ror32(te.template byte<1>(s2), 16) ^ pqc_ror32(te.template byte<0>(s3), 24) ^ k[0];
        uint32_t t1 = te.template byte<3>(s1) ^ pqc_ror32(te.template byte<2>(s2), 8) ^
                      pqc_ror32(te.template byte<1>(s3), 16) ^ pqc_ror32(te.template byte<0>(s0), 24) ^ k[1];
        uint32_t t2 = te.template byte<3>(s2) ^ pqc_ror32(te.template byte<2>(s3), 8) ^
                      pqc_ror32(te.template byte<1>(s0), 16) ^ pqc_ror32(te.template byte<0>(s1), 24) ^ k[2];
        uint32_t t3 = te.template byte<3>(s3) ^ pqc_ror32(te.template byte<2>(s0), 8) ^
                      pqc_ror32(te.template byte<1>(s1), 16) ^ pqc_ror32(te.template byte<0>(s2), 24) ^ k[3];
        s0 = t0; s1 = t1; s2 = t2; s3 = t3;
    }
    const uint32_t* k = rk + 56;
    // last round: S(x) is byte 2 of TE[x]
#define PQC_SB(K, x) ((te.template byte<K>(x) >> 8) & 0xFFu)
    out[0] = ((PQC_SB(3, s0) << 24) | (PQC_SB(2, s1) << 16) | (PQC_SB(1, s2) << 8) | PQC_SB(0, s3)) ^ k[0];
    out[1] = ((PQC_SB(3, s1) << 24) | (PQC_SB(2, s2) << 16) | (PQC_SB(1, s3) << 8) | PQC_SB(0, s0)) ^ k[1];
    out[2] = ((PQC_SB(3, s2) << 24) | (PQC_SB(2, s3) << 16) | (PQC_SB(1, s0) << 8) | PQC_SB(0, s1)) ^ k[2];
    out[3] = ((PQC_SB(3, s3) << 24) | (PQC_SB(2, s0) << 16) | (PQC_SB(1, s1) << 8) | PQC_SB(0, s2)) ^ k[3];
#undef PQC_SB
}

#endif  // PQC_AES_CUH
