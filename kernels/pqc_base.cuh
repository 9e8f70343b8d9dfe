// pqc_kv_cache kernels: what every primitive header shares: the host/device
// function qualifier, the 128-bit GF element type and byte-order helpers.
//
// Everything in the kernel headers is __host__ __device__ __forceinline__ and
// free of CUDA runtime calls, so the same arithmetic compiles with g++ (the
// host shim, kernels/host_shim.cpp) and is tested on the CPU before a GPU runs it.
#ifndef PQC_BASE_CUH
#define PQC_BASE_CUH

#include "pqc_types.h"

#if defined(__CUDACC__)
#define PQC_HD __host__ __device__ __forceinline__
#else
#define PQC_HD inline __attribute__((always_inline))
#endif

// A GF(2^128) element (GHASH): the 16 block bytes read as one big-endian 128-bit
// integer {hi, lo}. Bit 0 of the GCM bit order (the coefficient of x^0) is the top bit of hi.
struct pqc_u128 {
    uint64_t hi;
    uint64_t lo;
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

#endif  // PQC_BASE_CUH
