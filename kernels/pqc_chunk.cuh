// pqc_kv_cache kernels: one chunk of the chunk table as a GCM message (its AAD,
// nonce and tensor view), work items, and the audit records a chunk writes:
// what the encrypt / decrypt kernels and the host shim's entry points share.
#ifndef PQC_CHUNK_CUH
#define PQC_CHUNK_CUH

#include "pqc_chunk_abi.h"
#include "pqc_key_sched.cuh"
#include "pqc_gcm.cuh"
#include "pqc_io.cuh"
#include "pqc_aad.cuh"
#include "pqc_record.cuh"

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

// Points view kv (its chunk geometry set) at tensors k and v.
PQC_HD void pqc_kv_view_tensors(pqc_kv_view* kv, const pqc_kv_tensor& k, const pqc_kv_tensor& v) {
    kv->k = k.base;
    kv->v = v.base;
    kv->k_sb = k.sb; kv->k_sh = k.sh; kv->k_ss = k.ss;
    kv->v_sb = v.sb; kv->v_sh = v.sh; kv->v_ss = v.ss;
    kv->aligned = (((uint64_t)reinterpret_cast<unsigned long long>(k.base) |
                    (uint64_t)reinterpret_cast<unsigned long long>(v.base) |
                    (uint64_t)k.sb | (uint64_t)k.sh | (uint64_t)k.ss | (uint64_t)v.sb |
                    (uint64_t)v.sh | (uint64_t)v.ss) & 15ull) == 0ull;
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
    c->kv.row_bytes = row_bytes;
    c->kv.pos_count = (uint64_t)c->pos_count;
    c->kv.half = half;
    c->kv.row = c->row;
    c->kv.io_start = c->io_start;
    pqc_kv_view_tensors(&c->kv, k, v);
}

// The plaintext copy of an encrypt (pqc_chunk_params.copy_k): `to` takes chunk c's view with the
// copy tensors in place of the sources; block j (0 .. nbytes / 16) then moves by pqc_copy_block.
PQC_HD void pqc_copy_view(const pqc_chunk& c, const pqc_kv_tensor& k, const pqc_kv_tensor& v, pqc_kv_view* to) {
    *to = c.kv;
    pqc_kv_view_tensors(to, k, v);
}

PQC_HD void pqc_copy_block(const pqc_kv_view& from, const pqc_kv_view& to, uint64_t j) {
    uint32_t w[4];
    pqc_load16(from.addr(j), from.aligned, w);
    pqc_store16(to.addr(j), to.aligned, w);
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

// The record of operation `op` about chunk c's row (pqc_chunk_params.row_op): the row's tenant and
// session (its key slot's), the layer, positions [pos_start, pos_start + pos_count), nbytes; no
// nonce or epoch (what the host writes for a working-set READ), status OK.
PQC_HD void pqc_chunk_row_record(const pqc_chunk& c, const pqc_slot_meta* meta, const pqc_layout_args& L,
                                 uint32_t op, uint32_t pos_start, uint32_t pos_count, uint32_t nbytes,
                                 uint64_t record_no, uint64_t ts, uint32_t w[16]) {
    const pqc_slot_meta& sm = meta[c.slot];
    pqc_record_fields f;
    f.record_no = record_no;
    f.device_ts_ns = ts;
    f.nonce_counter = 0ull;
    f.pos_start = pos_start;
    f.pos_count = pos_count;
    f.tenant_idx = sm.tenant_idx;
    f.session_idx = sm.session_idx;
    f.epoch = 0u;
    f.nbytes = nbytes;
    f.layer = L.layer;
    f.row = (uint32_t)c.row;
    f.op = op;
    f.status = 0u;
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

// Failure record of a chunk whose tag did not verify: exact positions. Its record_no
// carries the 64-bit tag of the decrypt call (the host emits the record into the log
// of that call, which numbers it then).
PQC_HD void pqc_failure_record(const pqc_chunk& c, const pqc_slot_meta* meta, const pqc_layout_args& L,
                               uint64_t ts, uint64_t call_tag, uint32_t w[16]) {
    const pqc_slot_meta& sm = meta[c.slot];
    pqc_record_fields f;
    f.record_no = call_tag;
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
    f.flags = 0u;
    pqc_encode_record(f, w);
}


#endif  // PQC_CHUNK_CUH
