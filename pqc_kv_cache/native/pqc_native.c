/*
 * The native host path of pqc_kv_cache: seal and open one layer's chunks per call with
 * AES-256-GCM from Intel's ipsec-mb library (run-time dispatch, SSE up to VAES/AVX-512).
 *
 * One call of pqc_native_seal / pqc_native_open does a whole call of the backend contract
 * (pqc_kv_cache/backends/base.py): it checks every chunk first (fields, key slots, rows,
 * positions, arena bounds, tensor strides and storage bounds) and moves no byte unless all
 * pass, then, per chunk, builds the 12-byte nonce (epoch || counter, big-endian) and the
 * 80-byte AAD v1 (pqc_kv_cache/envelope.py) from a per-slot template, and streams every
 * (K/V, head) run of the chunk straight between the strided tensor and the arena through
 * one GCM init / update per run / finalize. Opening compares tags in constant time and
 * zeroes the destination of a chunk whose tag fails.
 *
 * Key schedules live in a ring the caller owns (pqc_native_ring_*), erased with
 * explicit_bzero when a slot is dropped, the ring is wiped, or freed.
 *
 * A large call (at least min_bytes of plaintext, two chunks or more) is split by bytes over a
 * small pool of worker threads (pthreads, created on first need, kept, recreated in a forked
 * child) when its chunks' destinations provably do not overlap; the calling thread runs the
 * checks first, works as one of the threads, and returns only once every worker has left the
 * call. ipsec-mb's manager is only read there for its direct-API function pointers (each thread
 * passes its own gcm_context_data; the key schedule is read-only), which several threads may
 * call at once.
 *
 * Built by pqc_kv_cache/backends/native.py with the system C compiler, linked -lIPSec_MB.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <intel-ipsec-mb.h>

#define PQC_NATIVE_ABI 4
#define AAD_LEN 80
#define NONCE_LEN 12
#define TAG_LEN 16
#define SLOT_IN_SIZE 48   /* tenant tag 16, session tag 16, int64 epoch, int64 schedule index */
#define TENS_COLS 10      /* data pointer, bytes from data to the end of storage, sizes[4], strides[4] */
#define MAX_THREADS 64    /* threads of one call, the caller's included */
#define UNITS_PER_THREAD 4   /* a split call's byte-balanced pieces per thread, taken in turn */

/* error codes (negative); the Python side turns each into the host backend's exception */
enum {
    PQC_OK = 0,
    PQC_E_INIT = -1,       /* no ipsec-mb manager */
    PQC_E_LAYOUT = -2,     /* heads / dim / itemsize / layer out of range; err[1] = which */
    PQC_E_TENSOR = -3,     /* a tensor's sizes or strides are inconsistent; err[0] = 0 k, 1 v */
    PQC_E_EPOCH = -4,      /* slot err[0] has an epoch outside uint32 */
    PQC_E_SCHED = -5,      /* slot err[0] names no schedule of the ring */
    PQC_E_FIELD = -6,      /* chunk err[0]: field err[1] (ChunkTable order) below its minimum */
    PQC_E_NOKEY = -7,      /* chunk err[0] names slot err[1] >= nslots */
    PQC_E_ROW = -8,        /* chunk err[0]: row err[1] >= batch */
    PQC_E_SEQ = -9,        /* chunk err[0]: io_start + pos_count > seq */
    PQC_E_KEYLEN = -10,    /* chunk err[0]: K length does not fit the 32-bit AAD field */
    PQC_E_ARENA = -11,     /* chunk err[0] reaches past the end of the arena */
    PQC_E_STORAGE = -12,   /* chunk err[0] reaches outside tensor err[1]'s storage */
    PQC_E_ARG = -13,       /* a NULL pointer or negative count */
    PQC_E_NOMEM = -14,     /* no memory for the call's AAD templates */
};

static IMB_MGR *g_mgr;
static IMB_ARCH g_arch;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init_mgr(void) {
    IMB_MGR *m = alloc_mb_mgr(0);
    if (!m)
        return;
    init_mb_mgr_auto(m, &g_arch);
    if (imb_get_errno(m) != 0 || !m->gcm256_pre || !m->gcm256_init_var_iv) {
        free_mb_mgr(m);
        return;
    }
    g_mgr = m;
}

static IMB_MGR *mgr(void) {
    pthread_once(&g_once, init_mgr);
    return g_mgr;
}

/* ---------------------------------------------------------------- info */

int pqc_native_abi(void) { return PQC_NATIVE_ABI; }
int pqc_native_ready(void) { return mgr() != NULL; }
const char *pqc_native_lib_version(void) { return imb_get_version_str(); }
const char *pqc_native_header_version(void) { return IMB_VERSION_STR; }
uint64_t pqc_native_features(void) { IMB_MGR *m = mgr(); return m ? m->features : 0; }
int pqc_native_arch(void) { return mgr() ? (int)g_arch : -1; }
int64_t pqc_native_sched_size(void) { return (int64_t)sizeof(struct gcm_key_data); }

/* the file the dynamic linker loaded ipsec-mb from */
const char *pqc_native_lib_path(void) {
    Dl_info info;
    if (dladdr((void *)imb_get_version_str, &info) && info.dli_fname)
        return info.dli_fname;
    return "";
}

/* ---------------------------------------------------------------- key schedule ring */

typedef struct {
    int64_t cap;
    struct gcm_key_data *sched;   /* cap schedules, 64-byte aligned */
} pqc_ring;

pqc_ring *pqc_native_ring_new(int64_t cap) {
    if (cap < 1 || cap > (1 << 16) || !mgr())
        return NULL;
    pqc_ring *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    size_t bytes = (size_t)cap * sizeof(struct gcm_key_data);
    bytes = (bytes + 63) & ~(size_t)63;
    r->sched = aligned_alloc(64, bytes);
    if (!r->sched) {
        free(r);
        return NULL;
    }
    memset(r->sched, 0, bytes);
    r->cap = cap;
    return r;
}

/* expand a 32-byte key into schedule idx */
int pqc_native_ring_set(pqc_ring *r, int64_t idx, const uint8_t *key) {
    IMB_MGR *m = mgr();
    if (!m)
        return PQC_E_INIT;
    if (!r || !key || idx < 0 || idx >= r->cap)
        return PQC_E_ARG;
    IMB_AES256_GCM_PRE(m, key, &r->sched[idx]);
    return PQC_OK;
}

/* erase schedule idx, or every schedule when idx < 0 */
void pqc_native_ring_wipe(pqc_ring *r, int64_t idx) {
    if (!r)
        return;
    if (idx < 0)
        explicit_bzero(r->sched, (size_t)r->cap * sizeof(struct gcm_key_data));
    else if (idx < r->cap)
        explicit_bzero(&r->sched[idx], sizeof(struct gcm_key_data));
}

/* number of non-zero bytes left in the ring's schedules (tests check erasure with it) */
int64_t pqc_native_ring_nonzero(const pqc_ring *r) {
    if (!r)
        return -1;
    const volatile uint8_t *p = (const volatile uint8_t *)r->sched;
    size_t n = (size_t)r->cap * sizeof(struct gcm_key_data);
    int64_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += p[i] != 0;
    return c;
}

void pqc_native_ring_free(pqc_ring *r) {
    if (!r)
        return;
    pqc_native_ring_wipe(r, -1);
    free(r->sched);
    free(r);
}

/* ---------------------------------------------------------------- checks */

typedef struct {
    uint8_t *data;
    int64_t extent;       /* bytes from data to the end of the storage */
    int64_t size[4];
    int64_t stride[4];    /* in elements */
} tens;

typedef struct {
    const int64_t *slot, *row, *pos_start, *pos_count, *io_start, *counter, *offset;
} table;

typedef struct {
    int64_t layer, heads, dim, itemsize;
    int64_t bpp;          /* plaintext bytes per position: 2 * heads * dim * itemsize */
} geometry;

static int mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }
static int add_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_add_overflow(a, b, out); }

static int load_geometry(const int64_t *g, geometry *geo, int64_t *err) {
    geo->layer = g[0]; geo->heads = g[1]; geo->dim = g[2]; geo->itemsize = g[3];
    err[1] = -1;
    if (geo->layer < 0 || geo->layer > 0xFFFFFFFFLL) err[1] = 0;
    else if (geo->heads < 1 || geo->heads > 0xFFFFFFFFLL) err[1] = 1;
    else if (geo->dim < 1 || geo->dim > 0xFFFFFFFFLL) err[1] = 2;
    else if (geo->itemsize != 1 && geo->itemsize != 2 && geo->itemsize != 4 && geo->itemsize != 8) err[1] = 3;
    int64_t hd;
    if (err[1] < 0 && !(mul_ok(geo->heads, geo->dim, &hd) && mul_ok(hd, 2 * geo->itemsize, &geo->bpp)))
        err[1] = 1;
    return err[1] < 0 ? PQC_OK : PQC_E_LAYOUT;
}

static int load_tensors(const int64_t *t, const geometry *geo, tens *k, tens *v, int64_t *err) {
    tens *ts[2] = {k, v};
    for (int j = 0; j < 2; j++) {
        const int64_t *d = t + j * TENS_COLS;
        tens *x = ts[j];
        x->data = (uint8_t *)(uintptr_t)d[0];
        x->extent = d[1];
        for (int a = 0; a < 4; a++) {
            x->size[a] = d[2 + a];
            x->stride[a] = d[6 + a];
        }
        err[0] = j;
        if ((!x->data && x->extent != 0) || x->extent < 0 || x->size[1] != geo->heads || x->size[3] != geo->dim)
            return PQC_E_TENSOR;
        for (int a = 0; a < 4; a++)
            if (x->size[a] < 0 || x->stride[a] < 0)
                return PQC_E_TENSOR;
    }
    err[0] = 1;
    if (k->size[0] != v->size[0] || k->size[2] != v->size[2])
        return PQC_E_TENSOR;
    return PQC_OK;
}

/* the last byte + 1 a chunk touches in tensor x, relative to x->data; -1 on overflow */
static int64_t chunk_reach(const tens *x, const geometry *geo, int64_t row, int64_t io, int64_t cnt) {
    int64_t e = 0, p;
    int64_t idx[4] = {row, geo->heads - 1, io + cnt - 1, geo->dim - 1};
    for (int a = 0; a < 4; a++) {
        if (!mul_ok(idx[a], x->stride[a], &p) || !add_ok(e, p, &e))
            return -1;
    }
    if (!add_ok(e, 1, &e) || !mul_ok(e, geo->itemsize, &e))
        return -1;
    return e;
}

/* every check, over every chunk, before any byte moves */
static int check_all(const uint8_t *slots, int64_t nslots, const pqc_ring *ring, const geometry *geo,
                     const tens *k, const tens *v, int64_t arena_len, int64_t n, const table *t,
                     int64_t *err) {
    for (int64_t s = 0; s < nslots; s++) {
        int64_t epoch, sched;
        memcpy(&epoch, slots + s * SLOT_IN_SIZE + 32, 8);
        memcpy(&sched, slots + s * SLOT_IN_SIZE + 40, 8);
        err[0] = s;
        if (epoch < 0 || epoch > 0xFFFFFFFFLL)
            return PQC_E_EPOCH;
        if (sched < 0 || sched >= ring->cap)
            return PQC_E_SCHED;
    }
    const int64_t *cols[7] = {t->slot, t->row, t->pos_start, t->pos_count, t->io_start, t->counter, t->offset};
    const int64_t batch = k->size[0], seq = k->size[2];
    const int64_t half = geo->bpp / 2;
    for (int64_t i = 0; i < n; i++) {
        err[0] = i;
        for (int f = 0; f < 7; f++) {
            if (cols[f][i] < (f == 3 ? 1 : 0)) {
                err[1] = f;
                return PQC_E_FIELD;
            }
        }
        const int64_t slot = t->slot[i], row = t->row[i], cnt = t->pos_count[i], io = t->io_start[i];
        int64_t end, klen, nb, last;
        if (slot >= nslots) { err[1] = slot; return PQC_E_NOKEY; }
        if (row >= batch) { err[1] = row; return PQC_E_ROW; }
        if (!add_ok(io, cnt, &end) || end > seq) return PQC_E_SEQ;
        if (!mul_ok(cnt, half, &klen) || klen > 0xFFFFFFFFLL) return PQC_E_KEYLEN;
        nb = 2 * klen;
        if (!add_ok(t->offset[i], nb + TAG_LEN, &last) || last > arena_len) return PQC_E_ARENA;
        const tens *ts[2] = {k, v};
        for (int j = 0; j < 2; j++) {
            int64_t reach = chunk_reach(ts[j], geo, row, io, cnt);
            if (reach < 0 || reach > ts[j]->extent) { err[1] = j; return PQC_E_STORAGE; }
        }
    }
    return PQC_OK;
}

/* ---------------------------------------------------------------- nonce and AAD */

static void put_be32(uint8_t *p, uint64_t x) { p[0] = x >> 24; p[1] = x >> 16; p[2] = x >> 8; p[3] = x; }
static void put_be64(uint8_t *p, uint64_t x) { put_be32(p, x >> 32); put_be32(p + 4, x); }

/* the AAD of a slot with position start, count and K length still 0 */
static void aad_template(uint8_t *aad, const uint8_t *prefix8, const uint8_t *slot_in, const geometry *geo) {
    int64_t epoch;
    memcpy(&epoch, slot_in + 32, 8);
    memset(aad, 0, AAD_LEN);
    memcpy(aad, prefix8, 8);
    memcpy(aad + 8, slot_in, 32);
    put_be32(aad + 40, (uint64_t)epoch);
    put_be32(aad + 44, (uint64_t)geo->layer);
    put_be32(aad + 64, (uint64_t)geo->heads);
    put_be32(aad + 68, (uint64_t)geo->dim);
    put_be64(aad + 72, (uint64_t)(int64_t)-1);
}

static void chunk_aad_nonce(uint8_t *aad, uint8_t *nonce, const uint8_t *tmpl, const uint8_t *slot_in,
                            const geometry *geo, const table *t, int64_t i) {
    int64_t epoch;
    memcpy(&epoch, slot_in + 32, 8);
    memcpy(aad, tmpl, AAD_LEN);
    put_be64(aad + 48, (uint64_t)t->pos_start[i]);
    put_be32(aad + 56, (uint64_t)t->pos_count[i]);
    put_be32(aad + 60, (uint64_t)(t->pos_count[i] * (geo->bpp / 2)));
    put_be32(nonce, (uint64_t)epoch);
    put_be64(nonce + 4, (uint64_t)t->counter[i]);
}

/* ---------------------------------------------------------------- runs of a chunk */

/* visit every contiguous run of x[row, :, io:io+cnt, :] in plaintext order (heads, positions, dim) */
typedef void (*run_fn)(void *ctx, uint8_t *p, uint64_t len);

static void for_runs(const tens *x, const geometry *geo, int64_t row, int64_t io, int64_t cnt,
                     run_fn fn, void *ctx) {
    const int64_t is = geo->itemsize, D = geo->dim;
    const int64_t s1 = x->stride[1], s2 = x->stride[2], s3 = x->stride[3];
    const int pos_contig = (D == 1 || s3 == 1);
    const int run_contig = pos_contig && (cnt == 1 || s2 == D);
    uint8_t *base = x->data + (row * x->stride[0] + io * s2) * is;
    for (int64_t h = 0; h < geo->heads; h++) {
        uint8_t *hp = base + h * s1 * is;
        if (run_contig) {
            fn(ctx, hp, (uint64_t)(cnt * D * is));
            continue;
        }
        for (int64_t p = 0; p < cnt; p++) {
            uint8_t *pp = hp + p * s2 * is;
            if (pos_contig) {
                fn(ctx, pp, (uint64_t)(D * is));
                continue;
            }
            for (int64_t d = 0; d < D; d++)
                fn(ctx, pp + d * s3 * is, (uint64_t)is);
        }
    }
}

typedef struct {
    IMB_MGR *m;
    const struct gcm_key_data *key;
    struct gcm_context_data *gctx;
    uint8_t *arena_pos;   /* the ciphertext byte the next run reads or writes */
} stream;

static void seal_run(void *c, uint8_t *p, uint64_t len) {
    stream *s = c;
    IMB_AES256_GCM_ENC_UPDATE(s->m, s->key, s->gctx, s->arena_pos, p, len);
    s->arena_pos += len;
}

static void open_run(void *c, uint8_t *p, uint64_t len) {
    stream *s = c;
    IMB_AES256_GCM_DEC_UPDATE(s->m, s->key, s->gctx, p, s->arena_pos, len);
    s->arena_pos += len;
}

static void zero_run(void *c, uint8_t *p, uint64_t len) {
    (void)c;
    memset(p, 0, len);
}

static int tag_equal(const uint8_t *a, const uint8_t *b) {
    volatile uint8_t d = 0;
    for (int i = 0; i < TAG_LEN; i++)
        d |= a[i] ^ b[i];
    return d == 0;
}

/* ---------------------------------------------------------------- one call's chunks, on any thread */

typedef struct {
    int seal;
    IMB_MGR *m;                  /* read only: its direct-API function pointers */
    const pqc_ring *ring;
    const uint8_t *slots, *tmpl;
    const geometry *geo;
    const tens *k, *v;
    uint8_t *arena;
    const table *t;
    uint8_t *status;
    const int64_t *bounds;       /* unit u is chunks [bounds[u], bounds[u + 1]) */
    int64_t nunits;
    atomic_int_fast64_t next;    /* the next unit to take */
    int seats;                   /* workers that may still join: the call's threads less the caller (pool mutex) */
    int refs;                    /* pool workers inside this call (pool mutex) */
} job;

/* seal or open chunks [lo, hi): the per-chunk work, with this thread's own GCM context */
static void do_chunks(const job *j, int64_t lo, int64_t hi) {
    IMB_MGR *m = j->m;
    const table *t = j->t;
    const geometry *geo = j->geo;
    struct gcm_context_data gctx;
    uint8_t aad[AAD_LEN], nonce[NONCE_LEN], tag[TAG_LEN];
    for (int64_t i = lo; i < hi; i++) {
        const int64_t s = t->slot[i], row = t->row[i], io = t->io_start[i], cnt = t->pos_count[i];
        int64_t sched;
        memcpy(&sched, j->slots + s * SLOT_IN_SIZE + 40, 8);
        const struct gcm_key_data *key = &j->ring->sched[sched];
        chunk_aad_nonce(aad, nonce, j->tmpl + s * AAD_LEN, j->slots + s * SLOT_IN_SIZE, geo, t, i);
        const int64_t nb = cnt * geo->bpp;
        uint8_t *ct = j->arena + t->offset[i];
        IMB_AES256_GCM_INIT_VAR_IV(m, key, &gctx, nonce, NONCE_LEN, aad, AAD_LEN);
        stream st = {m, key, &gctx, ct};
        for_runs(j->k, geo, row, io, cnt, j->seal ? seal_run : open_run, &st);
        for_runs(j->v, geo, row, io, cnt, j->seal ? seal_run : open_run, &st);
        if (j->seal) {
            IMB_AES256_GCM_ENC_FINALIZE(m, key, &gctx, ct + nb, TAG_LEN);
            continue;
        }
        IMB_AES256_GCM_DEC_FINALIZE(m, key, &gctx, tag, TAG_LEN);
        const int ok = tag_equal(tag, ct + nb);
        j->status[i] = ok ? 0 : 1;
        if (!ok) {
            for_runs(j->k, geo, row, io, cnt, zero_run, NULL);
            for_runs(j->v, geo, row, io, cnt, zero_run, NULL);
        }
    }
    explicit_bzero(&gctx, sizeof gctx);
    explicit_bzero(tag, sizeof tag);
}

static void do_units(job *j) {
    for (;;) {
        const int64_t u = atomic_fetch_add(&j->next, 1);
        if (u >= j->nunits)
            return;
        do_chunks(j, j->bounds[u], j->bounds[u + 1]);
    }
}

/* ---------------------------------------------------------------- the worker pool */

/*
 * One pool per process. A call posts its job (cur, a new gen) and works on it itself; a worker that
 * wakes while the job is posted joins it (refs++) while it has seats left (its thread count less the
 * caller), takes units until none is left and leaves. The caller withdraws the job once every unit
 * is taken, then waits only for the workers inside it, so a worker that wakes late never touches a
 * finished call and a core busy elsewhere holds a call up only while its worker is inside it.
 * One call uses the pool at a time (busy); a call that finds it taken runs on its own thread.
 */
static struct {
    pthread_mutex_t busy;        /* held by the call using the pool */
    pthread_mutex_t mu;          /* guards the fields below */
    pthread_cond_t wake, left;
    job *cur;
    uint64_t gen;
    int nworkers;
} g_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
            PTHREAD_COND_INITIALIZER, NULL, 0, 0};
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static atomic_int_fast64_t g_split_calls;   /* calls split over the pool so far (tests read it) */

static void *worker_main(void *arg) {
    uint64_t seen = (uint64_t)(uintptr_t)arg;
    pthread_mutex_lock(&g_pool.mu);
    for (;;) {
        while (!g_pool.cur || g_pool.gen == seen)
            pthread_cond_wait(&g_pool.wake, &g_pool.mu);
        seen = g_pool.gen;
        job *j = g_pool.cur;
        if (j->seats == 0)           /* a pool larger than this call's thread count: sit it out */
            continue;
        j->seats--;
        j->refs++;
        pthread_mutex_unlock(&g_pool.mu);
        do_units(j);
        pthread_mutex_lock(&g_pool.mu);
        if (--j->refs == 0)
            pthread_cond_broadcast(&g_pool.left);
    }
    return NULL;
}

/* fork: the parent's workers do not exist in the child. The fork waits for a call using the pool
 * to end (prepare takes both locks); the child starts with no workers and makes its own on need. */
static void atfork_prepare(void) { pthread_mutex_lock(&g_pool.busy); pthread_mutex_lock(&g_pool.mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_pool.mu); pthread_mutex_unlock(&g_pool.busy); }
static void atfork_child(void) {
    g_pool.cur = NULL;
    g_pool.nworkers = 0;
    pthread_cond_init(&g_pool.wake, NULL);
    pthread_cond_init(&g_pool.left, NULL);
    pthread_mutex_unlock(&g_pool.mu);
    pthread_mutex_unlock(&g_pool.busy);
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* make up to want workers exist (caller holds busy); returns how many there are */
static int pool_workers(int want) {
    pthread_once(&g_atfork_once, register_atfork);
    pthread_mutex_lock(&g_pool.mu);
    if (g_pool.nworkers < want) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);   /* workers inherit it: signals go to Python's threads */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 << 10);
        while (g_pool.nworkers < want) {
            pthread_t th;
            if (pthread_create(&th, &attr, worker_main, (void *)(uintptr_t)g_pool.gen) != 0)
                break;   /* fewer workers: the call still completes, on the threads there are */
            g_pool.nworkers++;
        }
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    const int n = g_pool.nworkers;
    pthread_mutex_unlock(&g_pool.mu);
    return n;
}

int64_t pqc_native_split_calls(void) { return atomic_load(&g_split_calls); }

int pqc_native_pool_workers(void) {
    pthread_mutex_lock(&g_pool.mu);
    const int n = g_pool.nworkers;
    pthread_mutex_unlock(&g_pool.mu);
    return n;
}

/* ---------------------------------------------------------------- may a call be split? */

/* true when distinct indices of x (sizes, strides; plus an optional 5th dim) name distinct elements:
 * dims of size > 1 sorted by stride, each stride beyond the span of the smaller ones */
static int injective(const int64_t *size, const int64_t *stride, int nd) {
    int64_t sz[5], st[5];
    int m = 0;
    for (int a = 0; a < nd; a++)
        if (size[a] > 1) { sz[m] = size[a]; st[m] = stride[a]; m++; }
    for (int a = 1; a < m; a++)        /* insertion sort by stride */
        for (int b = a; b > 0 && st[b] < st[b - 1]; b--) {
            int64_t x = st[b]; st[b] = st[b - 1]; st[b - 1] = x;
            x = sz[b]; sz[b] = sz[b - 1]; sz[b - 1] = x;
        }
    int64_t span = 0, p;
    for (int a = 0; a < m; a++) {
        if (st[a] <= span)
            return 0;
        if (!mul_ok(st[a], sz[a] - 1, &p) || !add_ok(span, p, &span))
            return 0;
    }
    return 1;
}

/* the destination tensors: no element of k or v reachable twice (k and v may be one tensor, or
 * k and v views of one buffer at a fixed distance, e.g. a position-major [b, s, 2, h, d]) */
static int kv_disjoint(const tens *k, const tens *v, int64_t itemsize) {
    if (!injective(k->size, k->stride, 4) || !injective(v->size, v->stride, 4))
        return 0;
    if (k->data == v->data && !memcmp(k->stride, v->stride, sizeof k->stride))
        return 1;
    const uint8_t *lo = k->data < v->data ? k->data : v->data;
    const uint8_t *hi = k->data < v->data ? v->data : k->data;
    const tens *first = k->data < v->data ? k : v;
    if (lo + first->extent <= hi)      /* the lower one's storage ends before the other begins */
        return 1;
    const int64_t delta = (int64_t)(hi - lo);
    if (memcmp(k->stride, v->stride, sizeof k->stride) || delta % itemsize)
        return 0;
    int64_t size5[5] = {k->size[0], k->size[1], k->size[2], k->size[3], 2};
    int64_t stride5[5] = {k->stride[0], k->stride[1], k->stride[2], k->stride[3], delta / itemsize};
    return injective(size5, stride5, 5);
}

static int cmp_pair(const void *a, const void *b) {
    const int64_t *x = a, *y = b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* the n intervals [start, start + count * mult + add) overlap nowhere within equal group (group NULL: one
 * group); check_all has bounded every end. 0 also when there is no memory to sort them. */
static int intervals_disjoint(const int64_t *group, const int64_t *start, const int64_t *count, int64_t mult,
                              int64_t add, int64_t n) {
    int sorted = 1;   /* the cache's tables come in order: no sort */
    for (int64_t i = 1; i < n && sorted; i++) {
        const int64_t a = group ? group[i - 1] : 0, b = group ? group[i] : 0;
        sorted = a < b || (a == b && start[i - 1] + count[i - 1] * mult + add <= start[i]);
    }
    if (sorted)
        return 1;
    int64_t *p = malloc((size_t)n * 3 * sizeof *p);   /* group, start, end */
    if (!p)
        return 0;
    for (int64_t i = 0; i < n; i++) {
        p[3 * i] = group ? group[i] : 0;
        p[3 * i + 1] = start[i];
        p[3 * i + 2] = start[i] + count[i] * mult + add;
    }
    qsort(p, (size_t)n, 3 * sizeof *p, cmp_pair);
    int ok = 1;
    for (int64_t i = 1; i < n && ok; i++)
        ok = p[3 * i] != p[3 * (i - 1)] || p[3 * (i - 1) + 2] <= p[3 * i + 1];
    free(p);
    return ok;
}

/* a split gives the bytes one thread would: no two chunks write the same byte and nothing a chunk
 * writes is read by another (tensors and arena apart); anything else runs on one thread */
static int split_safe(int seal, const geometry *geo, const tens *k, const tens *v, const uint8_t *arena,
                      int64_t arena_len, int64_t n, const table *t) {
    const uint8_t *alo = arena, *ahi = arena + arena_len;
    const tens *ts[2] = {k, v};
    for (int a = 0; a < 2; a++)
        if (ts[a]->data < ahi && alo < ts[a]->data + ts[a]->extent)
            return 0;
    if (seal)          /* it writes each chunk's ciphertext and tag */
        return intervals_disjoint(NULL, t->offset, t->pos_count, geo->bpp, TAG_LEN, n);
    /* it writes each chunk's (row, positions) of k and v */
    return kv_disjoint(k, v, geo->itemsize) && intervals_disjoint(t->row, t->io_start, t->pos_count, 1, 0, n);
}

/* ---------------------------------------------------------------- entry points */

/*
 * Arguments of pqc_native_seal and pqc_native_open, in order:
 *   ring      key schedules; slots name them by index
 *   prefix8   the first 8 AAD bytes (magic, version, kv_role, dtype code, reserved)
 *   slots     nslots x 48 bytes: tenant tag, session tag, int64 epoch, int64 schedule index
 *   geom      int64[4]: layer, heads, head_dim, itemsize
 *   tensors   int64[2][10]: k then v, each data pointer, bytes to the end of storage, sizes, strides
 *   arena     ciphertext bytes (arena_len of them)
 *   par       int64[2]: threads (the caller's included; 1 = this thread only), the fewest plaintext
 *             bytes a call must have to be split
 *   n, cols  the chunk table: int64[7][n], the columns slot, row, pos_start, pos_count, io_start,
 *             counter, offset one after the other
 *   status    (open) n bytes: 0 OK, 1 AUTH_FAILED
 *   err       int64[2]: what failed (see the error codes)
 */
static int run_call(int seal, const pqc_ring *ring, const uint8_t *prefix8, const uint8_t *slots, int64_t nslots,
                    const int64_t *geom, const int64_t *tensors, uint8_t *arena, int64_t arena_len,
                    const int64_t *par, int64_t n, const int64_t *cols,
                    uint8_t *status, int64_t *err) {
    IMB_MGR *m = mgr();
    if (!m)
        return PQC_E_INIT;
    if (!err)
        return PQC_E_ARG;
    err[0] = err[1] = -1;
    if (!ring || !prefix8 || !geom || !tensors || !par || n < 0 || nslots < 0 || (nslots && !slots) || arena_len < 0
        || (arena_len && !arena) || (n && !cols) || (!seal && n && !status) || par[0] < 1 || par[0] > MAX_THREADS
        || par[1] < 0)
        return PQC_E_ARG;
    const int64_t *slot = cols, *row = cols + n, *pos_start = cols + 2 * n, *pos_count = cols + 3 * n,
                  *io_start = cols + 4 * n, *counter = cols + 5 * n, *offset = cols + 6 * n;
    geometry geo;
    tens k, v;
    table t = {slot, row, pos_start, pos_count, io_start, counter, offset};
    int rc = load_geometry(geom, &geo, err);
    if (rc) return rc;
    rc = load_tensors(tensors, &geo, &k, &v, err);
    if (rc) return rc;
    rc = check_all(slots, nslots, ring, &geo, &k, &v, arena_len, n, &t, err);
    if (rc) return rc;
    err[0] = err[1] = -1;

    uint8_t *tmpl = NULL;
    if (nslots) {
        tmpl = malloc((size_t)nslots * AAD_LEN);
        if (!tmpl)
            return PQC_E_NOMEM;
        for (int64_t s = 0; s < nslots; s++)
            aad_template(tmpl + s * AAD_LEN, prefix8, slots + s * SLOT_IN_SIZE, &geo);
    }
    job j = {.seal = seal, .m = m, .ring = ring, .slots = slots, .tmpl = tmpl, .geo = &geo, .k = &k, .v = &v,
             .arena = arena, .t = &t, .status = status};
    /* plaintext bytes (each chunk's fits the arena; the sum saturates) */
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++)
        if (!add_ok(total, pos_count[i] * geo.bpp, &total))
            total = INT64_MAX;
    int split = 0;
    if (par[0] > 1 && n > 1 && total >= par[1] && split_safe(seal, &geo, &k, &v, arena, arena_len, n, &t)
        && pthread_mutex_trylock(&g_pool.busy) == 0) {
        const int workers = pool_workers((int)par[0] - 1);
        if (workers > 0) {
            /* units of about equal bytes, cut at chunk boundaries, taken in turn by whoever is free */
            int64_t bounds[UNITS_PER_THREAD * MAX_THREADS + 1];
            const int64_t want = UNITS_PER_THREAD * (int64_t)(workers < par[0] - 1 ? workers + 1 : par[0]);
            int64_t nu = 0;
            unsigned __int128 acc = 0;
            bounds[0] = 0;
            for (int64_t i = 0; i < n; i++) {
                acc += (unsigned __int128)(pos_count[i] * geo.bpp);
                /* cut after chunk i once the bytes so far reach the (nu + 1)-th share */
                if (i + 1 < n && nu + 1 < want && acc * want >= (unsigned __int128)(nu + 1) * total)
                    bounds[++nu] = i + 1;
            }
            bounds[++nu] = n;
            j.bounds = bounds;
            j.nunits = nu;
            j.seats = (int)par[0] - 1;
            atomic_init(&j.next, 0);
            pthread_mutex_lock(&g_pool.mu);
            g_pool.cur = &j;
            g_pool.gen++;
            pthread_cond_broadcast(&g_pool.wake);
            pthread_mutex_unlock(&g_pool.mu);
            do_units(&j);
            pthread_mutex_lock(&g_pool.mu);
            g_pool.cur = NULL;                 /* every unit is taken: no worker joins now */
            while (j.refs > 0)
                pthread_cond_wait(&g_pool.left, &g_pool.mu);
            pthread_mutex_unlock(&g_pool.mu);
            split = 1;
            atomic_fetch_add(&g_split_calls, 1);
        }
        pthread_mutex_unlock(&g_pool.busy);
    }
    if (!split)
        do_chunks(&j, 0, n);

    free(tmpl);
    return PQC_OK;
}

int pqc_native_seal(const pqc_ring *ring, const uint8_t *prefix8, const uint8_t *slots, int64_t nslots,
                    const int64_t *geom, const int64_t *tensors, uint8_t *arena, int64_t arena_len,
                    const int64_t *par, int64_t n, const int64_t *cols, int64_t *err) {
    return run_call(1, ring, prefix8, slots, nslots, geom, tensors, arena, arena_len, par, n, cols, NULL, err);
}

int pqc_native_open(const pqc_ring *ring, const uint8_t *prefix8, const uint8_t *slots, int64_t nslots,
                    const int64_t *geom, const int64_t *tensors, uint8_t *arena, int64_t arena_len,
                    const int64_t *par, int64_t n, const int64_t *cols, uint8_t *status, int64_t *err) {
    return run_call(0, ring, prefix8, slots, nslots, geom, tensors, arena, arena_len, par, n, cols, status, err);
}
