// pqc_kv_cache kernels: the fixed-width integer types, for every header.
//
// NVRTC has no libc headers: under it the five types the kernels use are
// defined here (the one place; the NVRTC translation unit assembled by
// pqc_kv_cache/backends/kernel_abi.py inlines this header). Everywhere else
// (nvcc, g++, a C compiler) they come from <stdint.h>.
#ifndef PQC_TYPES_H
#define PQC_TYPES_H

#if defined(__CUDACC_RTC__)
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#endif  // PQC_TYPES_H
