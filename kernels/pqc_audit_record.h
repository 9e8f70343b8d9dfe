// pqc_kv_cache audit record: one fixed-size packed struct, written by the CUDA
// kernels and by the host emitters, mirrored by the numpy dtype
// pqc_kv_cache.audit.records.RECORD_DTYPE (a test compiles this header on the
// host and compares the size and every field offset).
//
// All fields little-endian (native on x86-64 and on NVIDIA GPUs).
#ifndef PQC_AUDIT_RECORD_H
#define PQC_AUDIT_RECORD_H

#include "pqc_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// operation codes
#define PQC_OP_ENCRYPT 1
#define PQC_OP_DECRYPT 2
#define PQC_OP_ROTATE 3
#define PQC_OP_ISOLATION_VIOLATION 4
#define PQC_OP_CROP 5
#define PQC_OP_REORDER 6
#define PQC_OP_CLOSE 7
#define PQC_OP_RESEAL 8   // positions already written, re-sealed under a fresh counter (segment merge)
#define PQC_OP_READ 9     // working-set read: plaintext held on the device handed to attention, no decryption
#define PQC_OP_RELEASE 10 // working-set plaintext zeroed and dropped; only ciphertext remains
#define PQC_OP_SAVE 11    // a row's chunks written to a save file (ciphertext only)
#define PQC_OP_LOAD 12    // a row's chunks read back from a save file, every tag verified
#define PQC_OP_DELETE 13  // stored ciphertext deleted by a clean-up (the vLLM connector's store)

// status codes
#define PQC_STATUS_OK 0
#define PQC_STATUS_AUTH_FAILED 1   // tag did not verify
#define PQC_STATUS_REFUSED 2       // refused access (isolation, closed or expired session)
#define PQC_STATUS_ERROR 3         // any other failure

// "no layer" / "no row" for records that are not about one layer or row
#define PQC_NONE16 0xFFFFu

#pragma pack(push, 1)
typedef struct pqc_audit_record {
    uint64_t record_no;       //  0  global, dense, assigned by the host in bulk
    uint64_t host_ts_ns;      //  8  CLOCK_REALTIME ns at emission (host) or at drain (device)
    uint64_t device_ts_ns;    // 16  %globaltimer ns written by the kernel; 0 where none
    uint64_t nonce_counter;   // 24  first nonce counter of the chunk(s) described
    uint32_t pos_start;       // 32  first position
    uint32_t pos_count;       // 36  number of positions (0 for non-positional records)
    uint32_t tenant_idx;      // 40  index into the log's tenant table
    uint32_t session_idx;     // 44  index into the log's session table
    uint32_t epoch;           // 48  key epoch
    uint32_t nbytes;          // 52  plaintext bytes covered
    uint16_t layer;           // 56  layer index or PQC_NONE16
    uint16_t row;             // 58  batch row or PQC_NONE16
    uint8_t op;               // 60  PQC_OP_*
    uint8_t status;           // 61  PQC_STATUS_*
    uint16_t flags;           // 62  reserved, 0
} pqc_audit_record;
#pragma pack(pop)

// Sizes and offsets the kernels and the host shim use directly (checked against the struct below).
#define PQC_RECORD_SIZE 64
#define PQC_RECORD_STATUS_OFFSET 61

#ifdef __cplusplus
}  // extern "C"
#define PQC_RECORD_STATIC_ASSERT static_assert
#else
#define PQC_RECORD_STATIC_ASSERT _Static_assert
#endif
PQC_RECORD_STATIC_ASSERT(sizeof(pqc_audit_record) == PQC_RECORD_SIZE, "pqc_audit_record must be 64 bytes");
#if !defined(__CUDACC_RTC__)   // NVRTC has no offsetof; g++ (the shim), gcc and nvcc check it
PQC_RECORD_STATIC_ASSERT(__builtin_offsetof(pqc_audit_record, status) == PQC_RECORD_STATUS_OFFSET,
                         "PQC_RECORD_STATUS_OFFSET must be the offset of pqc_audit_record.status");
#endif
#undef PQC_RECORD_STATIC_ASSERT

#endif  // PQC_AUDIT_RECORD_H
