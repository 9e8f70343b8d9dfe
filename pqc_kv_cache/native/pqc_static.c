/*
 * One layer step of the static cache's seal in one call: the host implementation of the
 * pqc_kv_cache::seal_positions operator over the native backend (pqc_kv_cache/cache/static_sealer.py
 * describes the operator; this is the same thing without a Python loop or allocation per step).
 *
 * For positions pos[j] of every row r (chunk i = r * n + j, one position each), read from index io[j]
 * of the sequence dimension of K and V, into the fixed slot of arena[r] (slot pos % slots when ring,
 * else slot pos):
 *   - a position outside the cache is refused (OUT_OF_RANGE) and touches no slot;
 *   - with no room in the record buffer for every record of the call, every chunk is refused
 *     (RECORDS_FULL): nothing is sealed unrecorded;
 *   - a row whose session cannot be used (row_key < 0) gets its row_reason;
 *   - the rest take their nonce counter from their session slot's range (next, end), in chunk order,
 *     next advanced before anything is sealed (a counter is never handed out twice); none left:
 *     NONCES_EXHAUSTED.
 * Every slot written is emptied in the slot table first; a refused chunk's slot is zeroed; the rest
 * are sealed by pqc_native_seal (every check first). Then the slot table takes (counter, epoch,
 * position + 1) of each sealed chunk, the record buffer one ENCRYPT record per chunk (OK or REFUSED)
 * and one READ per row, numbered from record_head[1] and written at record_head[0], and the failure
 * record [count, layer, row, position, reason, session slot] counts the refused chunks (the first one
 * named when it was empty).
 *
 * A call pqc_native_seal refuses (a geometry or bound that does not hold) returns its error code with
 * the sealed slots zeroed and emptied, no record and no failure written.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int pqc_native_seal(const void *ring, const uint8_t *prefix8, const uint8_t *slots, int64_t nslots,
                    const int64_t *geom, const int64_t *tensors, uint8_t *arena, int64_t arena_len,
                    const int64_t *par, int64_t n, const int64_t *cols, int64_t *err);

#include "pqc_record.h"

/* FailReason of pqc_kv_cache/cache/static_state.py */
enum { R_NONCES = 1, R_RECORDS = 4, R_RANGE = 5 };
enum { S_ARG = -13, S_NOMEM = -14 };   /* pqc_native.c's PQC_E_ARG, PQC_E_NOMEM */

/* the int64 argument block (st) */
enum {
    A_POS, A_IO, A_N, A_BATCH, A_SEQ, A_SLOTS, A_STRIDE, A_META, A_NEXT, A_END, A_EPOCH, A_NSESS,
    A_RECORDS, A_CAP, A_HEAD, A_FAIL, A_RING, A_ROW_SESS, A_ROW_KEY, A_ROW_REASON, A_RSLOTS, A_BPP, A_LAYER,
    A_COUNT
};

int64_t pqc_native_static_args(void) { return A_COUNT; }

#define PTR(T, x) ((T *)(uintptr_t)(x))

static uint32_t u32(int64_t x) { return x < 0 ? 0 : x > 0xFFFFFFFFLL ? 0xFFFFFFFFu : (uint32_t)x; }

int pqc_native_static_seal(const void *ring, const uint8_t *prefix8, const uint8_t *keyslots, int64_t nkeys,
                           const int64_t *geom, const int64_t *tensors, uint8_t *arena, const int64_t *par,
                           const int64_t *st, int64_t *err) {
    if (!err || !st)
        return S_ARG;
    err[0] = err[1] = -1;
    const int64_t n = st[A_N], batch = st[A_BATCH], seq = st[A_SEQ], nsl = st[A_SLOTS], stride = st[A_STRIDE];
    const int64_t nsess = st[A_NSESS], cap = st[A_CAP], bpp = st[A_BPP], layer = st[A_LAYER];
    const int ring_mode = st[A_RING] != 0;
    const int64_t *pos = PTR(const int64_t, st[A_POS]), *io = PTR(const int64_t, st[A_IO]);
    const int64_t *row_sess = PTR(const int64_t, st[A_ROW_SESS]), *row_key = PTR(const int64_t, st[A_ROW_KEY]);
    const int64_t *row_reason = PTR(const int64_t, st[A_ROW_REASON]), *rslots = PTR(const int64_t, st[A_RSLOTS]);
    const int64_t *epoch = PTR(const int64_t, st[A_EPOCH]), *end = PTR(const int64_t, st[A_END]);
    int64_t *meta = PTR(int64_t, st[A_META]), *next = PTR(int64_t, st[A_NEXT]);
    int64_t *head = PTR(int64_t, st[A_HEAD]), *fail = PTR(int64_t, st[A_FAIL]);
    pqc_rec *recs = PTR(pqc_rec, st[A_RECORDS]);
    int64_t total, arena_len;
    if (n < 0 || batch < 1 || batch > 65536 || seq < 0 || nsl < 1 || stride < bpp + 16 || bpp < 1 || nsess < 1
        || cap < 0 || layer < 0 || layer > 0xFFFF || (n && (!pos || !io)) || !meta || !next || !end || !epoch
        || !head || !fail || !row_sess || !row_key || !row_reason || (cap && !recs)
        || __builtin_mul_overflow(batch, n, &total) || __builtin_mul_overflow(batch * nsl, stride, &arena_len)
        || !arena || head[0] < 0 || head[0] > cap)
        return S_ARG;
    for (int64_t r = 0; r < batch; r++)
        if (row_sess[r] < 0 || row_sess[r] >= nsess || row_key[r] >= nkeys)
            return S_ARG;
    if (n == 0)
        return 0;
    int64_t *reason = calloc((size_t)total * 3, sizeof *reason);       /* reason, counter, slot of each chunk */
    int64_t *cols = malloc((size_t)total * 7 * sizeof *cols);          /* the table of the chunks sealed */
    if (!reason || !cols) {
        free(reason);
        free(cols);
        return S_NOMEM;
    }
    int64_t *counter = reason + total, *slot_of = reason + 2 * total;
    const int room = cap == 0 || head[0] + total + batch <= cap;
    int64_t good = 0, bad = 0, last = INT64_MIN;
    for (int64_t j = 0; j < n; j++)
        if (pos[j] > last)
            last = pos[j];
    for (int64_t i = 0; i < total; i++) {
        const int64_t r = i / n, j = i % n, p = pos[j];
        const int in = p >= 0 && p < 0xFFFFFFFFLL && io[j] >= 0 && io[j] < seq && (ring_mode || p < nsl);
        slot_of[i] = in ? p % nsl : -1;
        int64_t why = !room ? R_RECORDS : !in ? R_RANGE : row_key[r] < 0 ? row_reason[r] : 0;
        if (why == 0) {
            const int64_t s = row_sess[r];
            if (next[s] < end[s])
                counter[i] = next[s]++;
            else
                why = R_NONCES;
        }
        reason[i] = why;
        if (slot_of[i] >= 0)
            memset(meta + (r * nsl + slot_of[i]) * 3, 0, 3 * sizeof *meta);
        if (why) {
            bad++;
            if (slot_of[i] >= 0)
                memset(arena + (r * nsl + slot_of[i]) * stride, 0, (size_t)stride);
            continue;
        }
        cols[good] = row_key[r];
        cols[total + good] = r;
        cols[2 * total + good] = p;
        cols[3 * total + good] = 1;
        cols[4 * total + good] = io[j];
        cols[5 * total + good] = counter[i];
        cols[6 * total + good] = (r * nsl + slot_of[i]) * stride;
        good++;
    }
    if (good) {
        /* pqc_native_seal reads the columns of an n-chunk table one after the other: close the gaps */
        for (int c = 1; c < 7; c++)
            memmove(cols + c * good, cols + c * total, (size_t)good * sizeof *cols);
        const int rc = pqc_native_seal(ring, prefix8, keyslots, nkeys, geom, tensors, arena, arena_len, par, good,
                                       cols, err);
        if (rc) {
            for (int64_t g = 0; g < good; g++)
                memset(arena + cols[6 * good + g], 0, (size_t)stride);
            free(reason);
            free(cols);
            return rc;
        }
    }
    for (int64_t i = 0; i < total; i++) {
        if (reason[i] == 0) {
            int64_t *m = meta + ((i / n) * nsl + slot_of[i]) * 3;
            m[0] = counter[i];
            m[1] = epoch[row_sess[i / n]];
            m[2] = pos[i % n] + 1;
        }
    }
    if (room && cap && rslots) {
        pqc_rec *out = recs + head[0];
        uint64_t no = (uint64_t)head[1];
        memset(out, 0, (size_t)(total + batch) * sizeof *out);
        for (int64_t i = 0; i < total; i++, out++) {
            const int64_t r = i / n, s = row_sess[r], p = pos[i % n];
            out->record_no = no++;
            out->op = OP_ENCRYPT;
            out->tenant_idx = u32(rslots[2 * s]);
            out->session_idx = u32(rslots[2 * s + 1]);
            out->layer = (uint16_t)layer;
            out->row = (uint16_t)r;
            out->pos_start = u32(p);
            out->pos_count = 1;
            out->nonce_counter = (uint64_t)counter[i];
            out->epoch = u32(epoch[s]);
            out->nbytes = u32(bpp);
            out->status = reason[i] ? ST_REFUSED : ST_OK;
        }
        const int64_t stop = last < 0 ? 0 : last + 1;
        const int64_t first = ring_mode && stop > nsl ? stop - nsl : 0;
        for (int64_t r = 0; r < batch; r++, out++) {
            const int64_t s = row_sess[r];
            out->record_no = no++;
            out->op = OP_READ;
            out->tenant_idx = u32(rslots[2 * s]);
            out->session_idx = u32(rslots[2 * s + 1]);
            out->layer = (uint16_t)layer;
            out->row = (uint16_t)r;
            out->pos_start = u32(first);
            out->pos_count = u32(stop - first);
            int64_t nb;
            out->nbytes = __builtin_mul_overflow(stop - first, bpp, &nb) ? 0xFFFFFFFFu : u32(nb);
            out->status = ST_OK;
        }
        head[0] += total + batch;
        head[1] = (int64_t)no;
    }
    if (bad) {
        if (fail[0] == 0) {
            int64_t i = 0;
            while (reason[i] == 0)
                i++;
            fail[1] = layer;
            fail[2] = i / n;
            fail[3] = pos[i % n];
            fail[4] = reason[i];
            fail[5] = row_sess[i / n];
        }
        fail[0] += bad;
    }
    free(reason);
    free(cols);
    return 0;
}
