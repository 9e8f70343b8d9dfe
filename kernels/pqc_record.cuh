// pqc_kv_cache kernels: encoding of the 64-byte audit record (pqc_audit_record.h)
// by the kernels and the host shim.
#ifndef PQC_RECORD_CUH
#define PQC_RECORD_CUH

#include "pqc_base.cuh"
#include "pqc_audit_record.h"

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

// The 32-bit word of a record that holds its status byte, and the byte's shift in it: a failing
// chunk ORs AUTH_FAILED into its row's DECRYPT record there (derived from the record header).
#define PQC_RECORD_STATUS_WORD (PQC_RECORD_STATUS_OFFSET / 4)
#define PQC_RECORD_STATUS_SHIFT (8 * (PQC_RECORD_STATUS_OFFSET % 4))
static_assert(PQC_RECORD_SIZE == 16 * 4, "pqc_encode_record writes 16 words");
static_assert(PQC_RECORD_STATUS_WORD == 15 && PQC_RECORD_STATUS_SHIFT == 8,
              "pqc_encode_record puts status in bits 8..15 of word 15");

#endif  // PQC_RECORD_CUH
