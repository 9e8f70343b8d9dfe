// pqc_kv_cache: AES-256-GCM primitives shared by the CUDA kernels
// (kernels/pqc_kernels.cu) and the host shim (kernels/host_shim.cpp).
//
// Everything here is __host__ __device__ __forceinline__ and free of CUDA
// runtime calls, so the same arithmetic compiles with g++ and is tested on the
// CPU against `cryptography` and the NIST CAVP vectors before a GPU runs it.
//
// Conventions
//   * An AES state / data block is four big-endian 32-bit words (w[0] holds
//     bytes 0..3 of the block, byte 0 in the top 8 bits).
//   * A GF(2^128) element (GHASH) is a pqc_u128 {hi, lo}: the 16 block bytes
//     read as one big-endian 128-bit integer. Bit 0 of the GCM bit order (the
//     coefficient of x^0) is the top bit of hi.
//   * AES uses one 256-entry table TE (TE[x] = 2S(x) | S(x) | S(x) | 3S(x),
//     bytes from the top); the other three round tables are byte rotations of
//     it, and the S-box is byte 2 of it. How TE is stored (a flat array on the
//     host, 32 lane-private copies in shared memory on the device) is the
//     caller's choice, given as a table accessor object with
//     `uint32_t operator()(uint32_t x) const`.
//   * Parallel GHASH: a chunk's GHASH input blocks X_1..X_m (AAD, ciphertext,
//     length block) are front-padded with zero blocks to m' = R*L blocks for L
//     lanes. Lane t (0-based) takes blocks t+1, t+1+L, ... and runs Horner with
//     H^L; its accumulator is finally multiplied by H^(L-t) and the lanes'
//     results are XORed. This equals sum X_i H^(m-i+1), the GHASH value.
//   * Work items: the R = m'/L rounds of a chunk may be split into ranges
//     [r0, r1) processed independently (by different CTAs on the GPU). Each
//     range's lanes give a partial P (lane t: the sum over its rounds r of
//     X_(t+rL) H^(L(r1-1-r)), times H^(L-t)); multiplied by (H^L)^(R - r1) it is
//     that range's share of the GHASH value, and the shares XOR to the GHASH value. (H^L)^e comes from the key
//     schedule's window table ipow (8 windows of 4 bits of e).
#ifndef PQC_GCM_CUH
#define PQC_GCM_CUH

#if defined(__CUDACC_RTC__)
// NVRTC has no libc headers; the three fixed-width types this header needs.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <stdint.h>
#include <string.h>
#endif

#if defined(__CUDACC__)
#define PQC_HD __host__ __device__ __forceinline__
#else
#define PQC_HD inline __attribute__((always_inline))
#endif

#define PQC_AES256_ROUND_KEYS 60
#define PQC_MAX_LANES 256
#define PQC_AAD_V1_SIZE 80
#define PQC_TAG_SIZE 16
#define PQC_GHASH_TAB_ENTRIES 512  // 32 nibble positions x 16 values
#define PQC_IPOW_WINDOWS 8          // (H^lanes)^e for e < 2^32: 8 windows of 4 bits
// A GCM message with a 96-bit nonce has at most 2^32 - 2 blocks of data
// (counter blocks 2 .. 2^32 - 1; SP 800-38D section 5.2.1.1).
#define PQC_GCM_MAX_BLOCKS 4294967294ull

struct pqc_u128 {
    uint64_t hi;
    uint64_t lo;
};

// Per-key material, prepared once per (key, lanes): AES round keys, the powers
// H^1..H^256 of the hash key, H^lanes * x^k for k = 0..127 (from which the
// 4-bit table of the Horner step is built), for each lane t the 16-entry
// (Shoup) table of H^(lanes - t), its final multiplier, and the window table
// of the work-item multiplier (H^lanes)^e.
struct pqc_key_sched {
    uint32_t rk[PQC_AES256_ROUND_KEYS];
    uint32_t lanes;
    uint32_t pad_[3];
    pqc_u128 hpow[PQC_MAX_LANES];            // hpow[e-1] = H^e
    pqc_u128 vtab[128];                      // H^lanes * x^k
    pqc_u128 lane_tab[PQC_MAX_LANES * 16];   // [t * 16 + n]: H^(lanes - t) * nibble n
    pqc_u128 ipow[PQC_IPOW_WINDOWS * 16];    // [w * 16 + d]: (H^lanes)^(d * 16^w)
};

// Per-key-slot AAD and audit metadata.
struct pqc_slot_meta {
    uint8_t tenant_tag[16];
    uint8_t session_tag[16];
    uint32_t epoch;
    uint32_t tenant_idx;
    uint32_t session_idx;
    uint32_t pad_;
};

// ---------------------------------------------------------------- bit helpers

PQC_HD uint32_t pqc_bswap32(uint32_t x) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, 0u, 0x0123u);
#else
    return __builtin_bswap32(x);
#endif
}

PQC_HD uint32_t pqc_ror32(uint32_t x, unsigned n) {
#if defined(__CUDA_ARCH__)
    return __funnelshift_r(x, x, n);
#else
    return (x >> n) | (x << ((32u - n) & 31u));
#endif
}

PQC_HD uint32_t pqc_load_be32(const uint8_t* p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

PQC_HD void pqc_store_be32(uint8_t* p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

PQC_HD void pqc_store_be64(uint8_t* p, uint64_t v) {
    pqc_store_be32(p, (uint32_t)(v >> 32));
    pqc_store_be32(p + 4, (uint32_t)v);
}

PQC_HD void pqc_store_le32(uint8_t* p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

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
        uint32_t t0 = te(s0 >> 24) ^ pqc_ror32(te((s1 >> 16) & 0xFFu), 8) ^
                      pqc_ror32(te((s2 >> 8) & 0xFFu), 16) ^ pqc_ror32(te(s3 & 0xFFu), 24) ^ k[0];
        uint32_t t1 = te(s1 >> 24) ^ pqc_ror32(te((s2 >> 16) & 0xFFu), 8) ^
                      pqc_ror32(te((s3 >> 8) & 0xFFu), 16) ^ pqc_ror32(te(s0 & 0xFFu), 24) ^ k[1];
        uint32_t t2 = te(s2 >> 24) ^ pqc_ror32(te((s3 >> 16) & 0xFFu), 8) ^
                      pqc_ror32(te((s0 >> 8) & 0xFFu), 16) ^ pqc_ror32(te(s1 & 0xFFu), 24) ^ k[2];
        uint32_t t3 = te(s3 >> 24) ^ pqc_ror32(te((s0 >> 16) & 0xFFu), 8) ^
                      pqc_ror32(te((s1 >> 8) & 0xFFu), 16) ^ pqc_ror32(te(s2 & 0xFFu), 24) ^ k[3];
        s0 = t0; s1 = t1; s2 = t2; s3 = t3;
    }
    const uint32_t* k = rk + 56;
#define PQC_SB(x) ((te(x) >> 8) & 0xFFu)
    out[0] = ((PQC_SB(s0 >> 24) << 24) | (PQC_SB((s1 >> 16) & 0xFFu) << 16) |
              (PQC_SB((s2 >> 8) & 0xFFu) << 8) | PQC_SB(s3 & 0xFFu)) ^ k[0];
    out[1] = ((PQC_SB(s1 >> 24) << 24) | (PQC_SB((s2 >> 16) & 0xFFu) << 16) |
              (PQC_SB((s3 >> 8) & 0xFFu) << 8) | PQC_SB(s0 & 0xFFu)) ^ k[1];
    out[2] = ((PQC_SB(s2 >> 24) << 24) | (PQC_SB((s3 >> 16) & 0xFFu) << 16) |
              (PQC_SB((s0 >> 8) & 0xFFu) << 8) | PQC_SB(s1 & 0xFFu)) ^ k[2];
    out[3] = ((PQC_SB(s3 >> 24) << 24) | (PQC_SB((s0 >> 16) & 0xFFu) << 16) |
              (PQC_SB((s1 >> 8) & 0xFFu) << 8) | PQC_SB(s2 & 0xFFu)) ^ k[3];
#undef PQC_SB
}

// ---------------------------------------------------------------- GF(2^128)

PQC_HD pqc_u128 pqc_u128_xor(pqc_u128 a, pqc_u128 b) {
    pqc_u128 r = {a.hi ^ b.hi, a.lo ^ b.lo};
    return r;
}

PQC_HD pqc_u128 pqc_u128_from_words(const uint32_t w[4]) {
    pqc_u128 r = {((uint64_t)w[0] << 32) | w[1], ((uint64_t)w[2] << 32) | w[3]};
    return r;
}

// Multiply by x (one step right in the GCM bit order), reducing by x^128 + x^7 + x^2 + x + 1.
PQC_HD pqc_u128 pqc_gf_mulx(pqc_u128 v) {
    uint64_t carry = 0ull - (v.lo & 1ull);
    pqc_u128 r;
    r.lo = (v.lo >> 1) | (v.hi << 63);
    r.hi = (v.hi >> 1) ^ (0xE100000000000000ull & carry);
    return r;
}

// Reference multiplication: bit by bit, no data-dependent branch or address.
PQC_HD pqc_u128 pqc_gf_mul(pqc_u128 x, pqc_u128 y) {
    pqc_u128 z = {0ull, 0ull};
    pqc_u128 v = y;
    for (int k = 0; k < 128; ++k) {
        uint64_t bit = (k < 64) ? (x.hi >> (63 - k)) & 1ull : (x.lo >> (127 - k)) & 1ull;
        uint64_t m = 0ull - bit;
        z.hi ^= v.hi & m;
        z.lo ^= v.lo & m;
        v = pqc_gf_mulx(v);
    }
    return z;
}

// Entry (i, n) of the 4-bit table of a fixed multiplier Y, from vtab[k] = Y x^k:
// Y times the element whose bits 4i..4i+3 are the nibble n (bit 4i = nibble MSB).
PQC_HD pqc_u128 pqc_ghash_tab_entry(const pqc_u128* vtab, int idx) {
    int i = idx >> 4, n = idx & 15;
    pqc_u128 r = {0ull, 0ull};
    for (int b = 0; b < 4; ++b) {
        uint64_t m = 0ull - (uint64_t)((n >> (3 - b)) & 1);
        r.hi ^= vtab[4 * i + b].hi & m;
        r.lo ^= vtab[4 * i + b].lo & m;
    }
    return r;
}

// x * Y with the 4-bit table of Y (tab[16*i + nibble_i(x)]): 32 lookups, no reduction step.
PQC_HD pqc_u128 pqc_gf_mul_tab(pqc_u128 x, const pqc_u128* tab) {
    pqc_u128 z = {0ull, 0ull};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < 16; ++i) {
        pqc_u128 a = tab[16 * i + (int)((x.hi >> (60 - 4 * i)) & 15ull)];
        pqc_u128 b = tab[16 * (i + 16) + (int)((x.lo >> (60 - 4 * i)) & 15ull)];
        z.hi ^= a.hi ^ b.hi;
        z.lo ^= a.lo ^ b.lo;
    }
    return z;
}

// 16-entry table of Y for pqc_gf_mul_shoup: m[n] = Y times the nibble n placed at
// bits 0..3 (bit 0 = the nibble's MSB).
PQC_HD void pqc_shoup_table(pqc_u128 y, pqc_u128 m[16]) {
    pqc_u128 p[4];
    p[0] = y;
    for (int b = 1; b < 4; ++b) p[b] = pqc_gf_mulx(p[b - 1]);
    for (int n = 0; n < 16; ++n) {
        pqc_u128 r = {0ull, 0ull};
        for (int b = 0; b < 4; ++b) {
            uint64_t msk = 0ull - (uint64_t)((n >> (3 - b)) & 1);
            r.hi ^= p[b].hi & msk;
            r.lo ^= p[b].lo & msk;
        }
        m[n] = r;
    }
}

// z * x^4: the four bits that leave the low end come back reduced, bit j (the
// coefficient of x^(127-j)) as (x^7 + x^2 + x + 1) x^(3-j).
PQC_HD pqc_u128 pqc_gf_mulx4(pqc_u128 z) {
    const uint64_t r = z.lo & 15ull;
    pqc_u128 o;
    o.lo = (z.lo >> 4) | (z.hi << 60);
    o.hi = z.hi >> 4;
    for (int j = 0; j < 4; ++j) o.hi ^= (0xE100000000000000ull >> (3 - j)) & (0ull - ((r >> j) & 1ull));
    return o;
}

// x * Y with the 16-entry table of Y (Horner over the 32 nibbles of x, last first).
PQC_HD pqc_u128 pqc_gf_mul_shoup(pqc_u128 x, const pqc_u128* m) {
    pqc_u128 z = {0ull, 0ull};
    for (int i = 31; i >= 0; --i) {
        const uint64_t w = i < 16 ? x.hi : x.lo;
        const int nib = (int)((w >> (60 - 4 * (i & 15))) & 15ull);
        z = pqc_u128_xor(pqc_gf_mulx4(z), m[nib]);
    }
    return z;
}

// ------------------------------------------------------- key preparation

// Round keys, H = E_K(0^128), H^1..H^lanes and vtab for H^lanes (sequential; once per key).
template <class TE>
PQC_HD void pqc_prepare_key(const TE& te, const uint8_t key[32], uint32_t lanes, pqc_key_sched* ks) {
    pqc_aes256_expand_key(key, ks->rk);
    ks->lanes = lanes;
    ks->pad_[0] = ks->pad_[1] = ks->pad_[2] = 0u;
    uint32_t zero[4] = {0u, 0u, 0u, 0u}, hw[4];
    pqc_aes256_encrypt_words(te, ks->rk, zero, hw);
    pqc_u128 h = pqc_u128_from_words(hw);
    ks->hpow[0] = h;
    for (uint32_t e = 1; e < PQC_MAX_LANES; ++e) ks->hpow[e] = pqc_gf_mul(ks->hpow[e - 1], h);
    pqc_u128 v = ks->hpow[lanes - 1];
    for (int k = 0; k < 128; ++k) {
        ks->vtab[k] = v;
        v = pqc_gf_mulx(v);
    }
    for (uint32_t t = 0; t < PQC_MAX_LANES; ++t) {
        if (t < lanes) {
            pqc_shoup_table(ks->hpow[lanes - 1 - t], ks->lane_tab + 16 * t);
        } else {
            for (int n = 0; n < 16; ++n) ks->lane_tab[16 * t + n].hi = ks->lane_tab[16 * t + n].lo = 0ull;
        }
    }
    // window table: base_w = (H^lanes)^(16^w); entry d = base_w^d (d = 0: the identity, x^0)
    pqc_u128 base = ks->hpow[lanes - 1];
    for (int w = 0; w < PQC_IPOW_WINDOWS; ++w) {
        pqc_u128 one = {0x8000000000000000ull, 0ull};
        ks->ipow[16 * w] = one;
        for (int d = 1; d < 16; ++d) ks->ipow[16 * w + d] = pqc_gf_mul(ks->ipow[16 * w + d - 1], base);
        base = pqc_gf_mul(ks->ipow[16 * w + 15], base);
    }
}

// Factor w of (H^lanes)^e: the window table entry of the w-th 4-bit digit of e.
PQC_HD pqc_u128 pqc_ipow_factor(const pqc_key_sched* ks, uint32_t e, int w) {
    return ks->ipow[16 * w + (int)((e >> (4 * w)) & 15u)];
}

// (H^lanes)^e: the eight window factors multiplied pairwise, in the order of the
// kernels' warp shuffle tree ((f0 f1)(f2 f3))((f4 f5)(f6 f7)).
PQC_HD pqc_u128 pqc_item_multiplier(const pqc_key_sched* ks, uint32_t e) {
    pqc_u128 f[PQC_IPOW_WINDOWS];
    for (int w = 0; w < PQC_IPOW_WINDOWS; ++w) f[w] = pqc_ipow_factor(ks, e, w);
    for (int off = 1; off < PQC_IPOW_WINDOWS; off <<= 1)
        for (int w = 0; w < PQC_IPOW_WINDOWS; w += 2 * off) f[w] = pqc_gf_mul(f[w], f[w + off]);
    return f[0];
}

// ------------------------------------------------------------ small pieces

// Counter block of data block j (0-based) of a 96-bit-nonce GCM message: nonce || (2 + j).
PQC_HD void pqc_counter_block(const uint32_t nonce_w[3], uint64_t j, uint32_t out[4]) {
    out[0] = nonce_w[0];
    out[1] = nonce_w[1];
    out[2] = nonce_w[2];
    out[3] = (uint32_t)(2ull + j);  // inc32: wraps modulo 2^32
}

// 1 if the n bytes of a and b are equal; the time does not depend on where they differ.
PQC_HD int pqc_ct_equal(const uint8_t* a, const uint8_t* b, int n) {
    uint32_t d = 0;
    for (int i = 0; i < n; ++i) d |= (uint32_t)(a[i] ^ b[i]);
    return (int)(1u & ((d - 1u) >> 8));
}

// The 80-byte AAD v1 (pqc_kv_cache/envelope.py), kv_role 0 ("both"), token id -1.
PQC_HD void pqc_build_aad_v1(uint8_t out[PQC_AAD_V1_SIZE], const uint8_t tenant_tag[16],
                             const uint8_t session_tag[16], uint32_t epoch, uint32_t layer,
                             uint64_t pos_start, uint32_t pos_count, uint32_t key_len,
                             uint32_t dtype_code, uint32_t num_heads, uint32_t head_dim) {
    out[0] = 'P'; out[1] = 'K'; out[2] = 'V'; out[3] = 'A';
    out[4] = 1;                    // format version
    out[5] = 0;                    // kv_role: both
    out[6] = (uint8_t)dtype_code;
    out[7] = 0;
    for (int i = 0; i < 16; ++i) {
        out[8 + i] = tenant_tag[i];
        out[24 + i] = session_tag[i];
    }
    pqc_store_be32(out + 40, epoch);
    pqc_store_be32(out + 44, layer);
    pqc_store_be64(out + 48, pos_start);
    pqc_store_be32(out + 56, pos_count);
    pqc_store_be32(out + 60, key_len);
    pqc_store_be32(out + 64, num_heads);
    pqc_store_be32(out + 68, head_dim);
    pqc_store_be64(out + 72, 0xFFFFFFFFFFFFFFFFull);  // token id -1
}

// One 64-byte audit record (kernels/pqc_audit_record.h) as 16 little-endian words.
struct pqc_record_fields {
    uint64_t record_no, device_ts_ns, nonce_counter;
    uint32_t pos_start, pos_count, tenant_idx, session_idx, epoch, nbytes;
    uint32_t layer, row, op, status, flags;
};

PQC_HD void pqc_encode_record(const pqc_record_fields& f, uint32_t w[16]) {
    w[0] = (uint32_t)f.record_no;      w[1] = (uint32_t)(f.record_no >> 32);
    w[2] = 0u;                         w[3] = 0u;  // host_ts_ns: filled by the drain
    w[4] = (uint32_t)f.device_ts_ns;   w[5] = (uint32_t)(f.device_ts_ns >> 32);
    w[6] = (uint32_t)f.nonce_counter;  w[7] = (uint32_t)(f.nonce_counter >> 32);
    w[8] = f.pos_start;
    w[9] = f.pos_count;
    w[10] = f.tenant_idx;
    w[11] = f.session_idx;
    w[12] = f.epoch;
    w[13] = f.nbytes;
    w[14] = (f.layer & 0xFFFFu) | ((f.row & 0xFFFFu) << 16);
    w[15] = (f.op & 0xFFu) | ((f.status & 0xFFu) << 8) | ((f.flags & 0xFFFFu) << 16);
}

// Word 15 of a record holds op (bits 0..7) and status (bits 8..15): a failing
// chunk ORs this into its row's DECRYPT record.
#define PQC_RECORD_STATUS_WORD 15
#define PQC_RECORD_STATUS_SHIFT 8

// ------------------------------------------------------------ chunk IO

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

// Encrypt source: plaintext from the KV tensors, ciphertext into the arena.
struct pqc_io_kv_to_arena {
    pqc_kv_view kv;
    uint8_t* arena;      // chunk's ciphertext start
    bool arena_aligned;
    PQC_HD uint32_t block_len(uint64_t) const { return 16u; }
    PQC_HD void load(uint64_t j, uint32_t w[4]) const { pqc_load16(kv.addr(j), kv.aligned, w); }
    PQC_HD void store(uint64_t j, const uint32_t w[4]) const { pqc_store16(arena + 16ull * j, arena_aligned, w); }
};

// Decrypt: ciphertext from the arena, plaintext into the KV tensors.
struct pqc_io_arena_to_kv {
    pqc_kv_view kv;
    const uint8_t* arena;
    bool arena_aligned;
    PQC_HD uint32_t block_len(uint64_t) const { return 16u; }
    PQC_HD void load(uint64_t j, uint32_t w[4]) const { pqc_load16(arena + 16ull * j, arena_aligned, w); }
    PQC_HD void store(uint64_t j, const uint32_t w[4]) const { pqc_store16(kv.addr(j), kv.aligned, w); }
    PQC_HD void zero(uint64_t j) const {
        uint32_t z[4] = {0u, 0u, 0u, 0u};
        pqc_store16(kv.addr(j), kv.aligned, z);
    }
};

// ------------------------------------------------------------ one GCM lane

// Geometry of one message for the lane walk.
struct pqc_gcm_msg {
    uint32_t nonce_w[3];
    const uint8_t* aad;
    uint32_t aad_len;
    uint64_t nbytes;
};

// Rounds of a message's lane walk: its GHASH blocks (AAD, data, length) over `lanes`, rounded up.
PQC_HD uint64_t pqc_msg_rounds(uint32_t aad_len, uint64_t nbytes, uint32_t lanes) {
    const uint64_t m = (((uint64_t)aad_len + 15ull) >> 4) + ((nbytes + 15ull) >> 4) + 1ull;
    return (m + lanes - 1ull) / lanes;
}

// Lane t of `lanes` (rk: round keys; lane_tab: pqc_key_sched::lane_tab), rounds [r0, r1) of the
// message's lane walk: CTR-encrypts (encrypt=true) or -decrypts its data blocks through io and
// returns its partial GHASH over those rounds, multiplied by H^(lanes-t) (the lane's 16-entry
// table). With [r0, r1) = [0, R) the lanes' results XOR to the GHASH value; for a smaller range
// that XOR still has to be multiplied by (H^lanes)^(R - r1).
// gtab is the 4-bit table of H^lanes (PQC_GHASH_TAB_ENTRIES entries).
template <class TE, class IO>
PQC_HD pqc_u128 pqc_gcm_lane(const TE& te, const uint32_t* rk, const pqc_u128* lane_tab, const pqc_u128* gtab,
                             const pqc_gcm_msg& msg, const IO& io, bool encrypt,
                             uint32_t t, uint32_t lanes, uint64_t r0, uint64_t r1) {
    const uint64_t a = ((uint64_t)msg.aad_len + 15ull) >> 4;
    const uint64_t c = (msg.nbytes + 15ull) >> 4;
    const uint64_t m = a + c + 1ull;
    const uint64_t rounds = (m + lanes - 1ull) / lanes;
    const uint64_t pad = rounds * lanes - m;
    pqc_u128 acc = {0ull, 0ull};
    for (uint64_t r = r0; r < r1; ++r) {
        const uint64_t idx = t + r * lanes;   // 0-based in the padded sequence
        pqc_u128 x = {0ull, 0ull};
        if (idx < pad) {
            // front padding: zero block
        } else if (idx < pad + a) {
            const uint64_t b = idx - pad;
            uint8_t blk[16];
            for (uint32_t i = 0; i < 16; ++i) {
                uint64_t p = 16ull * b + i;
                blk[i] = p < msg.aad_len ? msg.aad[p] : (uint8_t)0;
            }
            uint32_t w[4];
            for (int i = 0; i < 4; ++i) w[i] = pqc_load_be32(blk + 4 * i);
            x = pqc_u128_from_words(w);
        } else if (idx < pad + a + c) {
            const uint64_t j = idx - pad - a;
            uint32_t ctr[4], ks_w[4], in[4], out[4];
            pqc_counter_block(msg.nonce_w, j, ctr);
            pqc_aes256_encrypt_words(te, rk, ctr, ks_w);
            io.load(j, in);
            for (int i = 0; i < 4; ++i) out[i] = in[i] ^ ks_w[i];
            io.store(j, out);
            const uint32_t* ct = encrypt ? out : in;
            uint32_t n = io.block_len(j);
            uint32_t cw[4];
            for (int i = 0; i < 4; ++i) {
                // keep only the first n bytes of a partial final block
                int lo = 4 * i;
                uint32_t keep = n >= (uint32_t)(lo + 4) ? 0xFFFFFFFFu
                              : n <= (uint32_t)lo ? 0u
                              : 0xFFFFFFFFu << (8 * (4 - (n - lo)));
                cw[i] = ct[i] & keep;
            }
            x = pqc_u128_from_words(cw);
        } else {
            x.hi = (uint64_t)msg.aad_len * 8ull;
            x.lo = msg.nbytes * 8ull;
        }
        acc = pqc_u128_xor(pqc_gf_mul_tab(acc, gtab), x);
    }
    return pqc_gf_mul_shoup(acc, lane_tab + 16 * t);
}

// The tag: E_K(nonce || 1) XOR GHASH, as 16 bytes.
template <class TE>
PQC_HD void pqc_gcm_tag(const TE& te, const uint32_t* rk, const uint32_t nonce_w[3],
                        pqc_u128 ghash, uint8_t tag[16]) {
    uint32_t j0[4] = {nonce_w[0], nonce_w[1], nonce_w[2], 1u}, e[4];
    pqc_aes256_encrypt_words(te, rk, j0, e);
    pqc_u128 ek = pqc_u128_from_words(e);
    pqc_store_be64(tag, ek.hi ^ ghash.hi);
    pqc_store_be64(tag + 8, ek.lo ^ ghash.lo);
}

// Nonce v1: epoch (u32 BE) || counter (u64 BE), as the three big-endian words.
PQC_HD void pqc_nonce_v1(uint32_t epoch, uint64_t counter, uint32_t w[3]) {
    w[0] = epoch;
    w[1] = (uint32_t)(counter >> 32);
    w[2] = (uint32_t)counter;
}

// Column c of the chunk table (int64, [PQC_TABLE_COLS, n] row-major).
#define PQC_COL_SLOT 0
#define PQC_COL_ROW 1
#define PQC_COL_POS_START 2
#define PQC_COL_POS_COUNT 3
#define PQC_COL_IO_START 4
#define PQC_COL_COUNTER 5
#define PQC_COL_OFFSET 6
#define PQC_COL_AUX 7     // encrypt: first record index of the chunk; decrypt: index of its row's DECRYPT record (-1: none)
#define PQC_TABLE_COLS 8

// Work item table (int64, [PQC_ITEM_COLS, n_items] row-major): item i runs rounds
// [R0, R1) of chunk CHUNK's lane walk and writes its ENCRYPT records for positions
// [P0, P1); it is item J of the COUNT items of its chunk, whose first item is FIRST
// (the index of its partial GHASH is FIRST + J). Without a table, item i is all of chunk i.
#define PQC_ITEM_CHUNK 0
#define PQC_ITEM_R0 1
#define PQC_ITEM_R1 2
#define PQC_ITEM_P0 3
#define PQC_ITEM_P1 4
#define PQC_ITEM_FIRST 5
#define PQC_ITEM_J 6
#define PQC_ITEM_COUNT 7
#define PQC_ITEM_COLS 8

// Row DECRYPT record descriptors (int64, [PQC_ROWDESC_COLS, nrows] row-major).
#define PQC_RD_ROW 0
#define PQC_RD_POS_START 1
#define PQC_RD_POS_COUNT 2
#define PQC_RD_COUNTER 3
#define PQC_RD_SLOT 4
#define PQC_RD_NBYTES 5
#define PQC_ROWDESC_COLS 6


// ------------------------------------------------------------ chunk glue
// What the encrypt / decrypt kernels and the host shim's batched entry points
// share: per-chunk setup from the chunk table, records, zeroing.

struct pqc_layout_args {
    uint32_t layer, num_heads, head_dim, itemsize, dtype_code;
};

struct pqc_kv_tensor {
    uint8_t* base;
    int64_t sb, sh, ss;   // byte strides of batch, head, seq (dim contiguous)
};

struct pqc_chunk {
    int64_t slot, row, pos_start, pos_count, io_start, counter, offset, aux;
    uint64_t nbytes;
    uint8_t aad[PQC_AAD_V1_SIZE];
    pqc_gcm_msg msg;
    pqc_kv_view kv;
};

PQC_HD int64_t pqc_table_get(const int64_t* table, int64_t n, int col, int64_t i) {
    return table[(int64_t)col * n + i];
}

// Reads chunk i of the table and builds its AAD, nonce and tensor view.
PQC_HD void pqc_chunk_setup(const int64_t* table, int64_t n, int64_t i, const pqc_slot_meta* meta,
                            const pqc_layout_args& L, const pqc_kv_tensor& k,
                            const pqc_kv_tensor& v, pqc_chunk* c) {
    c->slot = pqc_table_get(table, n, PQC_COL_SLOT, i);
    c->row = pqc_table_get(table, n, PQC_COL_ROW, i);
    c->pos_start = pqc_table_get(table, n, PQC_COL_POS_START, i);
    c->pos_count = pqc_table_get(table, n, PQC_COL_POS_COUNT, i);
    c->io_start = pqc_table_get(table, n, PQC_COL_IO_START, i);
    c->counter = pqc_table_get(table, n, PQC_COL_COUNTER, i);
    c->offset = pqc_table_get(table, n, PQC_COL_OFFSET, i);
    c->aux = pqc_table_get(table, n, PQC_COL_AUX, i);
    const uint32_t row_bytes = L.head_dim * L.itemsize;
    // the host refuses chunks whose K length or position count overflow the AAD's 32-bit fields
    const uint64_t half = (uint64_t)row_bytes * L.num_heads * (uint64_t)c->pos_count;
    c->nbytes = 2ull * half;
    const pqc_slot_meta& sm = meta[c->slot];
    pqc_build_aad_v1(c->aad, sm.tenant_tag, sm.session_tag, sm.epoch, L.layer, (uint64_t)c->pos_start,
                     (uint32_t)c->pos_count, (uint32_t)half, L.dtype_code, L.num_heads, L.head_dim);
    pqc_nonce_v1(sm.epoch, (uint64_t)c->counter, c->msg.nonce_w);
    c->msg.aad = c->aad;
    c->msg.aad_len = PQC_AAD_V1_SIZE;
    c->msg.nbytes = c->nbytes;
    c->kv.k = k.base;
    c->kv.v = v.base;
    c->kv.k_sb = k.sb; c->kv.k_sh = k.sh; c->kv.k_ss = k.ss;
    c->kv.v_sb = v.sb; c->kv.v_sh = v.sh; c->kv.v_ss = v.ss;
    c->kv.row_bytes = row_bytes;
    c->kv.pos_count = (uint64_t)c->pos_count;
    c->kv.half = half;
    c->kv.row = c->row;
    c->kv.io_start = c->io_start;
    c->kv.aligned = (((uint64_t)reinterpret_cast<unsigned long long>(k.base) |
                      (uint64_t)reinterpret_cast<unsigned long long>(v.base) |
                      (uint64_t)k.sb | (uint64_t)k.sh | (uint64_t)k.ss | (uint64_t)v.sb |
                      (uint64_t)v.sh | (uint64_t)v.ss) & 15ull) == 0ull;
}

// One work item (see PQC_ITEM_*), resolved against its chunk.
struct pqc_item {
    int64_t chunk;
    uint64_t r0, r1;      // rounds of the chunk's lane walk
    int64_t p0, p1;       // positions whose ENCRYPT records this item writes
    int64_t first, j, count;
};

// Item i of the table (items == nullptr: item i is all of chunk i).
PQC_HD void pqc_item_get(const int64_t* items, int64_t n_items, int64_t i, pqc_item* it) {
    if (items == nullptr) {
        it->chunk = i;
        it->r0 = 0ull;
        it->r1 = ~0ull;   // resolved by pqc_item_resolve
        it->p0 = 0;
        it->p1 = -1;
        it->first = i;
        it->j = 0;
        it->count = 1;
        return;
    }
    it->chunk = pqc_table_get(items, n_items, PQC_ITEM_CHUNK, i);
    it->r0 = (uint64_t)pqc_table_get(items, n_items, PQC_ITEM_R0, i);
    it->r1 = (uint64_t)pqc_table_get(items, n_items, PQC_ITEM_R1, i);
    it->p0 = pqc_table_get(items, n_items, PQC_ITEM_P0, i);
    it->p1 = pqc_table_get(items, n_items, PQC_ITEM_P1, i);
    it->first = pqc_table_get(items, n_items, PQC_ITEM_FIRST, i);
    it->j = pqc_table_get(items, n_items, PQC_ITEM_J, i);
    it->count = pqc_table_get(items, n_items, PQC_ITEM_COUNT, i);
}

// Fills in the whole-chunk defaults of a table-less item; returns the chunk's rounds.
PQC_HD uint64_t pqc_item_resolve(pqc_item* it, const pqc_chunk& c, uint32_t lanes) {
    const uint64_t rounds = pqc_msg_rounds(c.msg.aad_len, c.nbytes, lanes);
    if (it->r1 == ~0ull) it->r1 = rounds;
    if (it->p1 < 0) it->p1 = c.pos_count;
    return rounds;
}

// ENCRYPT record p (0-based position within the chunk) of chunk c.
PQC_HD void pqc_encrypt_record(const pqc_chunk& c, const pqc_slot_meta* meta, const pqc_layout_args& L,
                               uint64_t record_no, uint64_t ts, uint32_t p, uint32_t w[16]) {
    const pqc_slot_meta& sm = meta[c.slot];
    pqc_record_fields f;
    f.record_no = record_no;
    f.device_ts_ns = ts;
    f.nonce_counter = (uint64_t)c.counter;
    f.pos_start = (uint32_t)(c.pos_start + p);
    f.pos_count = 1u;
    f.tenant_idx = sm.tenant_idx;
    f.session_idx = sm.session_idx;
    f.epoch = sm.epoch;
    f.nbytes = (uint32_t)(c.nbytes / (uint64_t)c.pos_count);
    f.layer = L.layer;
    f.row = (uint32_t)c.row;
    f.op = 1u;      // PQC_OP_ENCRYPT
    f.status = 0u;  // PQC_STATUS_OK
    f.flags = 0u;
    pqc_encode_record(f, w);
}

// DECRYPT record of row descriptor r (status OK; failing chunks OR in AUTH_FAILED).
PQC_HD void pqc_row_record(const int64_t* rowdesc, int64_t nrows, int64_t r, const pqc_slot_meta* meta,
                           const pqc_layout_args& L, uint64_t record_no, uint64_t ts, uint32_t w[16]) {
    const pqc_slot_meta& sm = meta[pqc_table_get(rowdesc, nrows, PQC_RD_SLOT, r)];
    pqc_record_fields f;
    f.record_no = record_no;
    f.device_ts_ns = ts;
    f.nonce_counter = (uint64_t)pqc_table_get(rowdesc, nrows, PQC_RD_COUNTER, r);
    f.pos_start = (uint32_t)pqc_table_get(rowdesc, nrows, PQC_RD_POS_START, r);
    f.pos_count = (uint32_t)pqc_table_get(rowdesc, nrows, PQC_RD_POS_COUNT, r);
    f.tenant_idx = sm.tenant_idx;
    f.session_idx = sm.session_idx;
    f.epoch = sm.epoch;
    const int64_t nb = pqc_table_get(rowdesc, nrows, PQC_RD_NBYTES, r);
    f.nbytes = nb > 0xFFFFFFFFll ? 0xFFFFFFFFu : (uint32_t)nb;  // saturated (32-bit field)
    f.layer = L.layer;
    f.row = (uint32_t)pqc_table_get(rowdesc, nrows, PQC_RD_ROW, r);
    f.op = 2u;      // PQC_OP_DECRYPT
    f.status = 0u;
    f.flags = 0u;
    pqc_encode_record(f, w);
}

// Failure record of a chunk whose tag did not verify: exact positions; record_no
// is assigned when the host emits it into the log; flags carries the call tag.
PQC_HD void pqc_failure_record(const pqc_chunk& c, const pqc_slot_meta* meta, const pqc_layout_args& L,
                               uint64_t ts, uint32_t call_tag, uint32_t w[16]) {
    const pqc_slot_meta& sm = meta[c.slot];
    pqc_record_fields f;
    f.record_no = 0ull;
    f.device_ts_ns = ts;
    f.nonce_counter = (uint64_t)c.counter;
    f.pos_start = (uint32_t)c.pos_start;
    f.pos_count = (uint32_t)c.pos_count;
    f.tenant_idx = sm.tenant_idx;
    f.session_idx = sm.session_idx;
    f.epoch = sm.epoch;
    f.nbytes = c.nbytes > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)c.nbytes;  // saturated (32-bit field)
    f.layer = L.layer;
    f.row = (uint32_t)c.row;
    f.op = 2u;      // PQC_OP_DECRYPT
    f.status = 1u;  // PQC_STATUS_AUTH_FAILED
    f.flags = call_tag;
    pqc_encode_record(f, w);
}

#endif  // PQC_GCM_CUH
