// pqc_kv_cache kernels: per-key material, prepared once per key on the device
// (pqc_prepare_keys) or the host (the shim), and the work-item multiplier.
#ifndef PQC_KEY_SCHED_CUH
#define PQC_KEY_SCHED_CUH

#include "pqc_aes.cuh"
#include "pqc_ghash.cuh"

#define PQC_MAX_LANES 256
#define PQC_IPOW_WINDOWS 8          // (H^lanes)^e for e < 2^32: 8 windows of 4 bits

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

// The Python side sizes its device buffers from this (kernel_abi.SCHED_SIZE).
static_assert(sizeof(pqc_key_sched) == 73984, "pqc_key_sched layout changed: update kernel_abi.SCHED_SIZE");

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

#endif  // PQC_KEY_SCHED_CUH
