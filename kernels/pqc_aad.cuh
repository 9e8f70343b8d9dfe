// pqc_kv_cache kernels: the envelope v1 AAD and nonce of a chunk (the Python
// definition is pqc_kv_cache.envelope.AAD_V1; a test compares the two).
#ifndef PQC_AAD_CUH
#define PQC_AAD_CUH

#include "pqc_base.cuh"

#define PQC_AAD_V1_SIZE 80

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

// Nonce v1: epoch (u32 BE) || counter (u64 BE), as the three big-endian words.
PQC_HD void pqc_nonce_v1(uint32_t epoch, uint64_t counter, uint32_t w[3]) {
    w[0] = epoch;
    w[1] = (uint32_t)(counter >> 32);
    w[2] = (uint32_t)counter;
}

#endif  // PQC_AAD_CUH
