/*
 * The 64-byte audit record the native backend's C code writes (RECORD_DTYPE of
 * pqc_kv_cache/audit/records.py; kernels/pqc_audit_record.h is the kernels' copy of the same layout),
 * and the operation and status codes it uses. Shared by pqc_records.c and pqc_static.c.
 */
#ifndef PQC_NATIVE_RECORD_H
#define PQC_NATIVE_RECORD_H

#include <stdint.h>

typedef struct {
    uint64_t record_no, host_ts_ns, device_ts_ns, nonce_counter;
    uint32_t pos_start, pos_count, tenant_idx, session_idx, epoch, nbytes;
    uint16_t layer, row;
    uint8_t op, status;
    uint16_t flags;
} pqc_rec;

_Static_assert(sizeof(pqc_rec) == 64, "an audit record is 64 bytes");

#define OP_ENCRYPT 1
#define OP_DECRYPT 2
#define OP_READ 9
#define ST_OK 0
#define ST_AUTH_FAILED 1
#define ST_REFUSED 2

#endif
