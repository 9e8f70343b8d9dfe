// pqc_kv_cache kernels: the host <-> kernel interface of the chunk kernels: the
// int64 tables the host builds (chunk table, work items, row descriptors), the
// per-slot metadata and the kernels' parameter struct. The numpy mirror is
// pqc_kv_cache/backends/kernel_abi.py.
#ifndef PQC_CHUNK_ABI_H
#define PQC_CHUNK_ABI_H

#include "pqc_base.cuh"

// Column c of the chunk table (int64, [PQC_TABLE_COLS, n] row-major).
#define PQC_COL_SLOT 0
#define PQC_COL_ROW 1
#define PQC_COL_POS_START 2
#define PQC_COL_POS_COUNT 3
#define PQC_COL_IO_START 4
#define PQC_COL_COUNTER 5
#define PQC_COL_OFFSET 6
#define PQC_COL_AUX 7     // encrypt: first record index of the chunk; decrypt: index of its row's DECRYPT record (-1: none)
#define PQC_TABLE_COLS 8

// Work item table (int64, [PQC_ITEM_COLS, n_items] row-major): item i runs rounds
// [R0, R1) of chunk CHUNK's lane walk and writes its ENCRYPT records for positions
// [P0, P1); it is item J of the COUNT items of its chunk, whose first item is FIRST
// (the index of its partial GHASH is FIRST + J). Without a table, item i is all of chunk i.
#define PQC_ITEM_CHUNK 0
#define PQC_ITEM_R0 1
#define PQC_ITEM_R1 2
#define PQC_ITEM_P0 3
#define PQC_ITEM_P1 4
#define PQC_ITEM_FIRST 5
#define PQC_ITEM_J 6
#define PQC_ITEM_COUNT 7
#define PQC_ITEM_COLS 8

// Row DECRYPT record descriptors (int64, [PQC_ROWDESC_COLS, nrows] row-major).
#define PQC_RD_ROW 0
#define PQC_RD_POS_START 1
#define PQC_RD_POS_COUNT 2
#define PQC_RD_COUNTER 3
#define PQC_RD_SLOT 4
#define PQC_RD_NBYTES 5
#define PQC_ROWDESC_COLS 6

// Per-key-slot AAD and audit metadata (kernel_abi.SLOT_META_DTYPE mirrors it).
struct pqc_slot_meta {
    uint8_t tenant_tag[16];
    uint8_t session_tag[16];
    uint32_t epoch;
    uint32_t tenant_idx;
    uint32_t session_idx;
    uint32_t pad_;
};
static_assert(sizeof(pqc_slot_meta) == 48, "pqc_slot_meta layout changed: update kernel_abi.SLOT_META_DTYPE");

struct pqc_key_sched;

// The parameters of pqc_encrypt_chunks and pqc_decrypt_chunks (and of the host
// shim's counterparts), passed as one struct in device memory. Every field is
// naturally aligned and there is no implicit padding, so the layout is the
// same for nvcc, NVRTC and g++; kernel_abi.CHUNK_PARAMS_DTYPE mirrors it (a
// test compares sizes and offsets with this header).
struct pqc_chunk_params {
    const pqc_key_sched* sched;   // one key schedule per key slot
    const pqc_slot_meta* meta;    // one per key slot
    const int64_t* table;         // chunk table, int64 [PQC_TABLE_COLS, n]
    int64_t n;
    const int64_t* items;         // work items, int64 [PQC_ITEM_COLS, n_items]; null: item i = chunk i
    int64_t n_items;
    uint8_t* k;                   // K source (encrypt) or destination (decrypt) and its byte strides
    int64_t k_sb, k_sh, k_ss;     //   of batch, head, seq (dim contiguous)
    uint8_t* v;                   // V, the same
    int64_t v_sb, v_sh, v_ss;
    uint8_t* arena;               // ciphertext arena (read only when decrypting)
    uint8_t* records;             // audit ring view (null: no records)
    pqc_u128* partials;           // per-item partial GHASH of split chunks (null: none split)
    uint32_t* counters;           // per-chunk count of finished items (zeroed before the launch)
    uint64_t first_no;            // encrypt: record index aux + p is numbered first_no + aux + p
    int64_t rec_lo;               // encrypt: record index held by records[0]
    uint8_t* status;              // decrypt: per chunk, 0 OK, 1 AUTH_FAILED
    uint8_t* fq;                  // decrypt: failure queue (fq_cap records)
    uint32_t* fq_count;           // decrypt: failures appended so far (also past fq_cap)
    uint64_t call_tag;            // decrypt: written into each failure record's record_no
    uint32_t layer, num_heads, head_dim, itemsize, dtype_code;
    uint32_t fq_cap;
    // encrypt: with records and row_op != 0, the first item of chunk i also writes a record of
    // operation row_op about the chunk's row (its key slot's tenant and session, the layer,
    // positions [row_pos_start, row_pos_start + row_pos_count), row_nbytes bytes; no nonce or
    // epoch) at record index row_rec0 + i, numbered first_no + row_rec0 + i: a working-set
    // update's READ record of each row, written by the launch that seals the row's new positions
    uint32_t row_op, row_pos_start, row_pos_count, row_nbytes;
    int64_t row_rec0;
    // encrypt: with copy_k set, the first item of each chunk also writes the chunk's plaintext into
    // copy_k / copy_v (byte strides of batch, head, seq; the same index it is read from in k / v):
    // a working-set update's plaintext store, written by the launch that seals the new positions
    uint8_t* copy_k;
    int64_t copy_k_sb, copy_k_sh, copy_k_ss;
    uint8_t* copy_v;
    int64_t copy_v_sb, copy_v_sh, copy_v_ss;
};
static_assert(sizeof(pqc_chunk_params) == 304, "pqc_chunk_params layout changed: update kernel_abi.CHUNK_PARAMS_DTYPE");

#endif  // PQC_CHUNK_ABI_H
