// pqc_kv_cache kernels: AES-256-GCM over one message, as lanes of a parallel
// GHASH (shared by the CUDA kernels, kernels/pqc_kernels.cu, and the host shim,
// kernels/host_shim.cpp).
//
//   * Parallel GHASH: a chunk's GHASH input blocks X_1..X_m (AAD, ciphertext,
//     length block) are front-padded with zero blocks to m' = R*L blocks for L
//     lanes. Lane t (0-based) takes blocks t+1, t+1+L, ... and runs Horner with
//     H^L; its accumulator is finally multiplied by H^(L-t) and the lanes'
//     results are XORed. This equals sum X_i H^(m-i+1), the GHASH value.
//   * Work items: the R = m'/L rounds of a chunk may be split into ranges
//     [r0, r1) processed independently (by different CTAs on the GPU). Each
//     range's lanes give a partial P (lane t: the sum over its rounds r of
//     X_(t+rL) H^(L(r1-1-r)), times H^(L-t)); multiplied by (H^L)^(R - r1) it is
//     that range's share of the GHASH value, and the shares XOR to the GHASH
//     value. (H^L)^e comes from the key schedule's window table ipow (8 windows
//     of 4 bits of e; pqc_key_sched.cuh).
#ifndef PQC_GCM_CUH
#define PQC_GCM_CUH

#include "pqc_aes.cuh"
#include "pqc_ghash.cuh"

#define PQC_TAG_SIZE 16
// A GCM message with a 96-bit nonce has at most 2^32 - 2 blocks of data
// (counter blocks 2 .. 2^32 - 1; SP 800-38D section 5.2.1.1).
#define PQC_GCM_MAX_BLOCKS 4294967294ull

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
// gtab is the 4-bit table of H^lanes in split form (PQC_GHASH_TAB_WORDS words; pqc_gf_mul_tab).
template <class TE, class IO>
PQC_HD pqc_u128 pqc_gcm_lane(const TE& te, const uint32_t* rk, const pqc_u128* lane_tab, const uint64_t* gtab,
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
        // Until the lane's first block after the front padding its accumulator is zero, and
        // multiplying it would change nothing: skipped (the condition depends only on the
        // message geometry, never on data). In a one-position chunk (262 blocks over 256
        // lanes: 250 padding blocks in round 0) this leaves one multiply in the second round
        // for the 6 lanes past the padding, where every lane did one in each round.
        if (r > r0 && t + (r - 1ull) * lanes >= pad) acc = pqc_gf_mul_tab(acc, gtab);
        acc = pqc_u128_xor(acc, x);
    }
    if (r1 <= r0 || t + (r1 - 1ull) * lanes < pad) {   // only padding in [r0, r1): the partial is zero
        const pqc_u128 z = {0ull, 0ull};
        return z;
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

#endif  // PQC_GCM_CUH
