// pqc_kv_cache kernels: multiplication in GF(2^128) in the GCM bit order:
// bitwise (reference), with a 4-bit table of a fixed factor (the Horner step of
// a GHASH lane) and with a 16-entry (Shoup) table (a lane's final multiply).
#ifndef PQC_GHASH_CUH
#define PQC_GHASH_CUH

#include "pqc_base.cuh"

#define PQC_GHASH_TAB_ENTRIES 512  // 32 nibble positions x 16 values
// The 4-bit table is stored as two tables of 64-bit words, the entries' high halves
// (words [0, 512)) and low halves (words [512, 1024)): PQC_GHASH_TAB_WORDS words, 8 KiB.
#define PQC_GHASH_TAB_WORDS (2 * PQC_GHASH_TAB_ENTRIES)

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

// 8 x the nibble of w at bits sh..sh+3 (sh a multiple of 4): one shift and one mask.
PQC_HD uint32_t pqc_nibble_x8(uint64_t w, int sh) {
    return (uint32_t)(sh >= 3 ? (w >> (sh - 3)) : (w << (3 - sh))) & 0x78u;
}

// Stores entry idx of the 4-bit table in its split form (high half, low half).
PQC_HD void pqc_ghash_tab_set(uint64_t* tab, int idx, pqc_u128 v) {
    tab[idx] = v.hi;
    tab[PQC_GHASH_TAB_ENTRIES + idx] = v.lo;
}

// x * Y with the 4-bit table of Y in split form (entry 16*i + nibble_i(x): high half at
// tab[e], low half at tab[512 + e]): 32 lookups of two 64-bit words, no reduction step.
// Why split: in shared memory the 16 entries of one nibble position i are then 128
// contiguous bytes per half, one 8-byte word in each pair of banks, so the 32 lanes of a
// warp, whatever nibbles they hold, never read two different words of one bank. As 16-byte
// entries they spanned 256 bytes, entries n and n + 8 sharing banks (a conflict whenever a
// warp's nibbles held both). Both halves use the same address register, the low half's
// table offset being an immediate.
PQC_HD pqc_u128 pqc_gf_mul_tab(pqc_u128 x, const uint64_t* tab) {
    pqc_u128 z = {0ull, 0ull};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < 16; ++i) {
        // byte offsets 8 * nibble (a shift and a mask) from row 16i (row 16(i + 16) for x.lo)
        const uint64_t* ta = tab + 16 * i;
        const uint64_t* tb = tab + 16 * (i + 16);
        const uint32_t oa = pqc_nibble_x8(x.hi, 60 - 4 * i), ob = pqc_nibble_x8(x.lo, 60 - 4 * i);
        const uint64_t* a = reinterpret_cast<const uint64_t*>(reinterpret_cast<const uint8_t*>(ta) + oa);
        const uint64_t* b = reinterpret_cast<const uint64_t*>(reinterpret_cast<const uint8_t*>(tb) + ob);
        z.hi ^= a[0] ^ b[0];
        z.lo ^= a[PQC_GHASH_TAB_ENTRIES] ^ b[PQC_GHASH_TAB_ENTRIES];
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

#endif  // PQC_GHASH_CUH
