/*
 * The audit records of one native seal or open call, written in C as the CUDA kernels write theirs:
 * straight into an array of 64-byte records (RECORD_DTYPE of pqc_kv_cache/audit/records.py) that the
 * caller hands to KVAuditLog.emit_records in one piece.
 *
 * Seal: one ENCRYPT record per chunk and position (chunk order, positions ascending), each with its
 * chunk's nonce counter and bytes_per_position bytes: what emit_per_position makes of the chunk table.
 * Open: one DECRYPT record per row read (ascending rows; the definition of
 * backends/base.py decrypt_row_summary: lowest position, highest end minus it, lowest nonce counter,
 * tenant / session / epoch of the row's first chunk in table order, bytes saturated at 2^32 - 1,
 * AUTH_FAILED if any of its chunks failed), then one AUTH_FAILED record per failing chunk with its exact
 * positions. record_no, host_ts_ns, device_ts_ns and flags are left 0: the log sets them.
 *
 * Every value is range-checked against its field before anything is written; a value a record cannot
 * hold is refused (PQC_R_RANGE), never truncated.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pqc_record.h"

#define RSLOT_SIZE 16       /* per key slot: uint32 tenant index, uint32 session index, int64 epoch */

enum {
    PQC_R_ARG = -1,         /* a NULL pointer or a negative count */
    PQC_R_CAP = -2,         /* the output holds fewer records than the call makes; err[0] = records needed */
    PQC_R_RANGE = -3,       /* chunk err[0]: field err[1] (0 layer, 1 row, 2 position, 3 count, 4 epoch,
                               5 slot, 6 counter, 7 nbytes) does not fit its record field */
};

/* offsets of the record's fields, in RECORD_DTYPE order, for the test that compares them */
int64_t pqc_native_record_layout(int64_t *out, int64_t cap) {
    const int64_t off[] = {
        offsetof(pqc_rec, record_no), offsetof(pqc_rec, host_ts_ns), offsetof(pqc_rec, device_ts_ns),
        offsetof(pqc_rec, nonce_counter), offsetof(pqc_rec, pos_start), offsetof(pqc_rec, pos_count),
        offsetof(pqc_rec, tenant_idx), offsetof(pqc_rec, session_idx), offsetof(pqc_rec, epoch),
        offsetof(pqc_rec, nbytes), offsetof(pqc_rec, layer), offsetof(pqc_rec, row), offsetof(pqc_rec, op),
        offsetof(pqc_rec, status), offsetof(pqc_rec, flags), (int64_t)sizeof(pqc_rec)};
    const int64_t n = (int64_t)(sizeof off / sizeof off[0]);
    if (!out || cap < n)
        return -n;
    memcpy(out, off, sizeof off);
    return n;
}

typedef struct {
    uint32_t tenant, session;
    int64_t epoch;
} rslot;

static int range_err(int64_t *err, int64_t i, int64_t field) {
    err[0] = i;
    err[1] = field;
    return PQC_R_RANGE;
}

/*
 * Arguments:
 *   seal        1: ENCRYPT records, 0: DECRYPT records
 *   slots       nslots x 16 bytes: uint32 tenant index, uint32 session index, int64 epoch
 *   layer, bpp  the call's layer and plaintext bytes per position
 *   batch       rows of the call's tensors (open: rows are 0 .. batch-1)
 *   n, slot, row, pos_start, pos_count, counter   the chunk table (int64 columns)
 *   status      (open) n bytes, 0 OK / non-zero failed
 *   out, cap    the records written and how many fit
 *   work        (open) batch x 6 int64 of scratch
 *   err         int64[2]
 * Returns the number of records written, or a negative PQC_R_* code.
 */
int64_t pqc_native_records(int seal, const uint8_t *slots, int64_t nslots, int64_t layer, int64_t bpp,
                           int64_t batch, int64_t n, const int64_t *slot, const int64_t *row,
                           const int64_t *pos_start, const int64_t *pos_count, const int64_t *counter,
                           const uint8_t *status, void *out_, int64_t cap, int64_t *work, int64_t *err) {
    if (!err)
        return PQC_R_ARG;
    err[0] = err[1] = -1;
    if (n < 0 || nslots < 0 || batch < 0 || cap < 0 || bpp < 0 || (nslots && !slots) || (cap && !out_)
        || (n && (!slot || !row || !pos_start || !pos_count || !counter))
        || (!seal && n && (!status || (batch && !work))))
        return PQC_R_ARG;
    if (layer < 0 || layer > 0xFFFF)
        return range_err(err, -1, 0);
    pqc_rec *out = out_;

    /* every check first, and the number of records */
    int64_t need = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t s = slot[i], r = row[i], ps = pos_start[i], pc = pos_count[i];
        if (s < 0 || s >= nslots) return range_err(err, i, 5);
        if (r < 0 || r > 0xFFFF || (!seal && r >= batch)) return range_err(err, i, 1);
        if (pc < 1 || pc > 0xFFFFFFFFLL) return range_err(err, i, 3);
        if (ps < 0 || ps > 0xFFFFFFFFLL || pc - 1 > 0xFFFFFFFFLL - ps) return range_err(err, i, 2);  /* last position fits */
        if (counter[i] < 0) return range_err(err, i, 6);
        rslot rs;
        memcpy(&rs, slots + s * RSLOT_SIZE, sizeof rs);
        if (rs.epoch < 0 || rs.epoch > 0xFFFFFFFFLL) return range_err(err, i, 4);
        if (seal) {
            if (bpp > 0xFFFFFFFFLL) return range_err(err, i, 7);
            need += pc;
        } else if (status[i]) {
            need += 1;
        }
    }
    if (!seal) {
        for (int64_t r = 0; r < batch; r++)
            work[r * 6 + 5] = -1;           /* first chunk of row r; -1: not read */
        for (int64_t i = 0; i < n; i++)
            if (work[row[i] * 6 + 5] < 0) {
                work[row[i] * 6 + 5] = i;
                need += 1;
            }
    }
    if (need > cap) {
        err[0] = need;
        return PQC_R_CAP;
    }

    int64_t w = 0;
    if (seal) {
        for (int64_t i = 0; i < n; i++) {
            rslot rs;
            memcpy(&rs, slots + slot[i] * RSLOT_SIZE, sizeof rs);
            pqc_rec base;
            memset(&base, 0, sizeof base);
            base.nonce_counter = (uint64_t)counter[i];
            base.pos_count = 1;
            base.tenant_idx = rs.tenant;
            base.session_idx = rs.session;
            base.epoch = (uint32_t)rs.epoch;
            base.nbytes = (uint32_t)bpp;
            base.layer = (uint16_t)layer;
            base.row = (uint16_t)row[i];
            base.op = OP_ENCRYPT;
            base.status = ST_OK;
            for (int64_t p = 0; p < pos_count[i]; p++) {
                out[w] = base;
                out[w].pos_start = (uint32_t)(pos_start[i] + p);
                w++;
            }
        }
        return w;
    }

    /* open: per row lo, hi, lowest counter, bytes, failed (the first chunk is work[.. + 5]) */
    for (int64_t r = 0; r < batch; r++) {
        int64_t *rs = work + r * 6;
        rs[0] = INT64_MAX; rs[1] = 0; rs[2] = INT64_MAX; rs[3] = 0; rs[4] = 0;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t *rs = work + row[i] * 6;
        const int64_t hi = pos_start[i] + pos_count[i];
        int64_t nb;
        if (__builtin_mul_overflow(pos_count[i], bpp, &nb)) nb = INT64_MAX;
        if (pos_start[i] < rs[0]) rs[0] = pos_start[i];
        if (hi > rs[1]) rs[1] = hi;
        if (counter[i] < rs[2]) rs[2] = counter[i];
        if (__builtin_add_overflow(rs[3], nb, &rs[3])) rs[3] = INT64_MAX;
        if (status[i]) rs[4] = 1;
    }
    for (int64_t r = 0; r < batch; r++)     /* a row's span must fit the record's count too */
        if (work[r * 6 + 5] >= 0 && work[r * 6 + 1] - work[r * 6] > 0xFFFFFFFFLL)
            return range_err(err, work[r * 6 + 5], 3);
    for (int64_t r = 0; r < batch; r++) {
        const int64_t *rs = work + r * 6;
        if (rs[5] < 0)
            continue;
        rslot sl;
        memcpy(&sl, slots + slot[rs[5]] * RSLOT_SIZE, sizeof sl);
        pqc_rec *o = &out[w++];
        memset(o, 0, sizeof *o);
        o->nonce_counter = (uint64_t)rs[2];
        o->pos_start = (uint32_t)rs[0];
        o->pos_count = (uint32_t)(rs[1] - rs[0]);
        o->tenant_idx = sl.tenant;
        o->session_idx = sl.session;
        o->epoch = (uint32_t)sl.epoch;
        o->nbytes = rs[3] > 0xFFFFFFFFLL ? 0xFFFFFFFFu : (uint32_t)rs[3];
        o->layer = (uint16_t)layer;
        o->row = (uint16_t)r;
        o->op = OP_DECRYPT;
        o->status = rs[4] ? ST_AUTH_FAILED : ST_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        if (!status[i])
            continue;
        rslot sl;
        memcpy(&sl, slots + slot[i] * RSLOT_SIZE, sizeof sl);
        int64_t nb;
        if (__builtin_mul_overflow(pos_count[i], bpp, &nb)) nb = INT64_MAX;
        pqc_rec *o = &out[w++];
        memset(o, 0, sizeof *o);
        o->nonce_counter = (uint64_t)counter[i];
        o->pos_start = (uint32_t)pos_start[i];
        o->pos_count = (uint32_t)pos_count[i];
        o->tenant_idx = sl.tenant;
        o->session_idx = sl.session;
        o->epoch = (uint32_t)sl.epoch;
        o->nbytes = nb > 0xFFFFFFFFLL ? 0xFFFFFFFFu : (uint32_t)nb;
        o->layer = (uint16_t)layer;
        o->row = (uint16_t)row[i];
        o->op = OP_DECRYPT;
        o->status = ST_AUTH_FAILED;
    }
    return w;
}
