// pqc_kv_cache host shim: the primitives of the kernel headers compiled for the CPU
// (g++ -O2 -shared -fPIC), loaded by pqc_kv_cache.backends.kernel_shim with
// ctypes. The chunk entry points take the kernels' own parameters and walk
// work items, chunks and lanes exactly as the CUDA kernels do (pqc_item_get,
// pqc_chunk_setup, pqc_gcm_lane over `lanes` lanes for the item's rounds, the
// item multiplier, the partials and per-chunk counters of split chunks with the
// last item done completing the chunk, the same record encoders), so the
// kernels' indexing and combine are what the CPU tests check. The items run one
// after the other, in the order `order` names (0 ascending, 1 descending, 2
// interleaved by residue mod 3), standing in for the GPU's arbitrary order.
//
// Every entry point returns 0 on success or a negative PQC_HOST_E* code on
// malformed arguments; the Python side turns those into ValueError.
#include <stdint.h>
#include <string.h>

#include "pqc_chunk.cuh"

#define PQC_HOST_ABI 5
#define PQC_HOST_EARG (-1)

namespace {

struct TeTable {
    uint32_t t[256];
    TeTable() {
        for (uint32_t x = 0; x < 256; ++x) t[x] = pqc_te_entry(x);
    }
};

const pqc_te_flat& te() {
    static const TeTable table;
    static const pqc_te_flat acc = {table.t};
    return acc;
}

// The kernels' lane-replicated TE table (copy l of entry x at word 32x + l) and lane t's view
// of it (lane t mod 32 of its warp), so the lane walks below use the kernels' table addressing.
struct TeLanes {
    uint32_t t[256 * PQC_TE_COPIES];
    TeLanes() {
        for (uint32_t x = 0; x < 256; ++x)
            for (uint32_t l = 0; l < PQC_TE_COPIES; ++l) t[(x << 5) | l] = pqc_te_entry(x);
    }
};

pqc_te_lanes te_lane(uint32_t t) {
    static const TeLanes table;
    const pqc_te_lanes acc = {table.t, (t & (PQC_TE_COPIES - 1u)) << 2};
    return acc;
}

void build_gtab(const pqc_key_sched* ks, uint64_t* gtab) {
    for (int i = 0; i < PQC_GHASH_TAB_ENTRIES; ++i) pqc_ghash_tab_set(gtab, i, pqc_ghash_tab_entry(ks->vtab, i));
}

// Runs every lane of one message and returns the combined GHASH.
template <class IO>
pqc_u128 run_lanes(const pqc_key_sched* ks, const uint64_t* gtab, const pqc_gcm_msg& msg, const IO& io,
                   bool encrypt, uint32_t lanes) {
    const uint64_t rounds = pqc_msg_rounds(msg.aad_len, msg.nbytes, lanes);
    pqc_u128 g = {0ull, 0ull};
    for (uint32_t t = 0; t < lanes; ++t)
        g = pqc_u128_xor(g, pqc_gcm_lane(te_lane(t), ks->rk, ks->lane_tab, gtab, msg, io, encrypt, t, lanes, 0ull, rounds));
    return g;
}

bool lanes_ok(uint32_t lanes) { return lanes >= 1 && lanes <= PQC_MAX_LANES; }

// Position q of the item processing order -> item index.
int64_t item_at(int64_t q, int64_t n, uint32_t order) {
    if (order == 1) return n - 1 - q;
    if (order == 2) {   // residue r holds items r, r + 3, ...: (n - r + 2) / 3 of them
        int64_t r = 0;
        while (r < 2 && q >= (n - r + 2) / 3) {
            q -= (n - r + 2) / 3;
            ++r;
        }
        return r + 3 * q;
    }
    return q;
}

// What pqc_item_combine does on the GPU, for one item whose lanes gave g (already XORed).
// Returns true if this item completes its chunk; *ghash is then the chunk's GHASH value.
bool combine_item(pqc_u128 g, const pqc_item& it, uint64_t rounds, const pqc_key_sched* ks, pqc_u128* partials,
                  uint32_t* counters, pqc_u128* ghash) {
    if (it.count == 1) {
        *ghash = g;
        return true;
    }
    const uint32_t e = (uint32_t)(rounds - it.r1);
    if (e != 0u) g = pqc_gf_mul(g, pqc_item_multiplier(ks, e));
    partials[it.first + it.j] = g;
    const uint32_t done = counters[it.chunk]++;
    if (done != (uint32_t)(it.count - 1)) return false;
    pqc_u128 x = {0ull, 0ull};
    for (int64_t q = 0; q < it.count; ++q) x = pqc_u128_xor(x, partials[it.first + q]);
    *ghash = x;
    return true;
}

// Arguments every item table must satisfy before an item is read (the GPU trusts the host's table).
bool items_ok(const int64_t* items, int64_t n_items, int64_t n, const pqc_u128* partials, const uint32_t* counters) {
    if (items == nullptr) return n_items == n;
    for (int64_t i = 0; i < n_items; ++i) {
        pqc_item it;
        pqc_item_get(items, n_items, i, &it);
        if (it.chunk < 0 || it.chunk >= n || it.count < 1 || it.j < 0 || it.j >= it.count || it.r0 > it.r1 ||
            it.p0 < 0 || it.p0 > it.p1)
            return false;
        if (it.count > 1 && (partials == nullptr || counters == nullptr)) return false;
    }
    return true;
}

void write_record(uint8_t* dst, const uint32_t w[16]) {
    for (int i = 0; i < 16; ++i) pqc_store_le32(dst + 4 * i, w[i]);
}

}  // namespace

extern "C" {

int pqc_host_abi_version(void) { return PQC_HOST_ABI; }
int64_t pqc_host_sched_size(void) { return (int64_t)sizeof(pqc_key_sched); }
int64_t pqc_host_slot_meta_size(void) { return (int64_t)sizeof(pqc_slot_meta); }
int64_t pqc_host_record_size(void) { return (int64_t)sizeof(pqc_audit_record); }
int64_t pqc_host_chunk_params_size(void) { return (int64_t)sizeof(pqc_chunk_params); }

int pqc_host_sbox(uint32_t x) { return (int)pqc_sbox(x & 0xFFu); }

int pqc_host_aes256_encrypt_block(const uint8_t* key, const uint8_t* in, uint8_t* out) {
    uint32_t rk[PQC_AES256_ROUND_KEYS], w[4], o[4];
    pqc_aes256_expand_key(key, rk);
    for (int i = 0; i < 4; ++i) w[i] = pqc_load_be32(in + 4 * i);
    pqc_aes256_encrypt_words(te(), rk, w, o);
    for (int i = 0; i < 4; ++i) pqc_store_be32(out + 4 * i, o[i]);
    return 0;
}

static pqc_u128 load_u128(const uint8_t* p) {
    uint32_t w[4];
    for (int i = 0; i < 4; ++i) w[i] = pqc_load_be32(p + 4 * i);
    return pqc_u128_from_words(w);
}

static void store_u128(uint8_t* p, pqc_u128 v) {
    pqc_store_be64(p, v.hi);
    pqc_store_be64(p + 8, v.lo);
}

// out = a * b in GF(2^128), GCM bit order. method 0: bitwise; 1: the 512-entry
// 4-bit table of b (Horner step); 2: the 16-entry table of b (lane's final multiply).
int pqc_host_gf_mul(const uint8_t* a, const uint8_t* b, uint8_t* out, int method) {
    pqc_u128 x = load_u128(a), y = load_u128(b);
    if (method == 0) {
        store_u128(out, pqc_gf_mul(x, y));
        return 0;
    }
    if (method == 2) {
        pqc_u128 m[16];
        pqc_shoup_table(y, m);
        store_u128(out, pqc_gf_mul_shoup(x, m));
        return 0;
    }
    if (method != 1) return PQC_HOST_EARG;
    pqc_u128 vtab[128];
    uint64_t gtab[PQC_GHASH_TAB_WORDS];
    for (int k = 0; k < 128; ++k) {
        vtab[k] = y;
        y = pqc_gf_mulx(y);
    }
    for (int i = 0; i < PQC_GHASH_TAB_ENTRIES; ++i) pqc_ghash_tab_set(gtab, i, pqc_ghash_tab_entry(vtab, i));
    store_u128(out, pqc_gf_mul_tab(x, gtab));
    return 0;
}

int pqc_host_ct_equal(const uint8_t* a, const uint8_t* b, int n) {
    if (n < 0) return PQC_HOST_EARG;
    return pqc_ct_equal(a, b, n);
}

int pqc_host_build_aad_v1(uint8_t* out, const uint8_t* tenant_tag, const uint8_t* session_tag, uint32_t epoch,
                          uint32_t layer, uint64_t pos_start, uint32_t pos_count, uint32_t key_len,
                          uint32_t dtype_code, uint32_t num_heads, uint32_t head_dim) {
    pqc_build_aad_v1(out, tenant_tag, session_tag, epoch, layer, pos_start, pos_count, key_len, dtype_code,
                     num_heads, head_dim);
    return 0;
}

// keys: n x 32 bytes -> n pqc_key_sched (pqc_host_sched_size() bytes each).
int pqc_host_prepare_keys(const uint8_t* keys, int64_t n, uint32_t lanes, pqc_key_sched* out) {
    if (n < 0 || !lanes_ok(lanes)) return PQC_HOST_EARG;
    for (int64_t i = 0; i < n; ++i) pqc_prepare_key(te(), keys + 32 * i, lanes, out + i);
    return 0;
}

// Seal n independent messages (96-bit nonces): message i is pt[pt_off[i] .. +pt_len[i]]
// with aad[aad_off[i] .. +aad_len[i]]; ciphertext || tag goes to out[out_off[i] ..].
int pqc_host_gcm_seal_many(int64_t n, const uint8_t* keys, const uint8_t* nonces, const uint8_t* aad,
                           const int64_t* aad_off, const int64_t* aad_len, const uint8_t* pt,
                           const int64_t* pt_off, const int64_t* pt_len, uint8_t* out,
                           const int64_t* out_off, uint32_t lanes) {
    if (n < 0 || !lanes_ok(lanes)) return PQC_HOST_EARG;
    pqc_key_sched ks;
    uint64_t gtab[PQC_GHASH_TAB_WORDS];
    for (int64_t i = 0; i < n; ++i) {
        if (aad_len[i] < 0 || aad_len[i] > 0xFFFFFFFFll || pt_len[i] < 0 ||
            (uint64_t)pt_len[i] > 16ull * PQC_GCM_MAX_BLOCKS)
            return PQC_HOST_EARG;
        pqc_prepare_key(te(), keys + 32 * i, lanes, &ks);
        build_gtab(&ks, gtab);
        pqc_gcm_msg msg;
        for (int w = 0; w < 3; ++w) msg.nonce_w[w] = pqc_load_be32(nonces + 12 * i + 4 * w);
        msg.aad = aad + aad_off[i];
        msg.aad_len = (uint32_t)aad_len[i];
        msg.nbytes = (uint64_t)pt_len[i];
        pqc_io_flat io = {pt + pt_off[i], out + out_off[i], (uint64_t)pt_len[i]};
        pqc_u128 g = run_lanes(&ks, gtab, msg, io, true, lanes);
        pqc_gcm_tag(te(), ks.rk, msg.nonce_w, g, out + out_off[i] + pt_len[i]);
    }
    return 0;
}

// Open n messages: ct_with_tag at ct[ct_off[i] ..], ct_len[i] bytes including the
// tag_len-byte tag (4..16); plaintext to out[out_off[i] ..], zeroed where the tag
// fails; status[i] = 0 OK, 1 AUTH_FAILED.
int pqc_host_gcm_open_many(int64_t n, const uint8_t* keys, const uint8_t* nonces, const uint8_t* aad,
                           const int64_t* aad_off, const int64_t* aad_len, const uint8_t* ct,
                           const int64_t* ct_off, const int64_t* ct_len, uint8_t* out,
                           const int64_t* out_off, int tag_len, uint8_t* status, uint32_t lanes) {
    if (n < 0 || !lanes_ok(lanes) || tag_len < 4 || tag_len > 16) return PQC_HOST_EARG;
    pqc_key_sched ks;
    uint64_t gtab[PQC_GHASH_TAB_WORDS];
    for (int64_t i = 0; i < n; ++i) {
        if (aad_len[i] < 0 || aad_len[i] > 0xFFFFFFFFll || ct_len[i] < tag_len ||
            (uint64_t)(ct_len[i] - tag_len) > 16ull * PQC_GCM_MAX_BLOCKS)
            return PQC_HOST_EARG;
        pqc_prepare_key(te(), keys + 32 * i, lanes, &ks);
        build_gtab(&ks, gtab);
        const int64_t nb = ct_len[i] - tag_len;
        pqc_gcm_msg msg;
        for (int w = 0; w < 3; ++w) msg.nonce_w[w] = pqc_load_be32(nonces + 12 * i + 4 * w);
        msg.aad = aad + aad_off[i];
        msg.aad_len = (uint32_t)aad_len[i];
        msg.nbytes = (uint64_t)nb;
        pqc_io_flat io = {ct + ct_off[i], out + out_off[i], (uint64_t)nb};
        pqc_u128 g = run_lanes(&ks, gtab, msg, io, false, lanes);
        uint8_t tag[16];
        pqc_gcm_tag(te(), ks.rk, msg.nonce_w, g, tag);
        int ok = pqc_ct_equal(tag, ct + ct_off[i] + nb, tag_len);
        status[i] = (uint8_t)(ok ? 0 : 1);
        if (!ok) memset(out + out_off[i], 0, (size_t)nb);
    }
    return 0;
}

// The encrypt kernel's work on the CPU, with its parameters (kernels/pqc_kernels.cu,
// pqc_encrypt_chunks; pqc_chunk_params in pqc_chunk_abi.h): work item i of p->items
// (or chunk i of p->table without items) seals its rounds of its chunk from the K/V
// tensors into arena + offset; the item completing a chunk writes its tag; ENCRYPT
// records of positions [p0, p1) at records[(aux + pos - rec_lo) * 64] when records
// is set, numbered first_no + aux + pos, and with row_op set the chunk's first item
// (j == 0) its row record at records[(row_rec0 + chunk - rec_lo) * 64]; with copy_k set,
// the chunk's first item also copies its plaintext into copy_k / copy_v.
int pqc_host_encrypt_chunks(const pqc_chunk_params* p, uint32_t order) {
    if (p == nullptr || p->n < 0 || p->n_items < 0 || ((p->head_dim * p->itemsize) & 15u) != 0u || order > 2u ||
        !items_ok(p->items, p->n_items, p->n, p->partials, p->counters))
        return PQC_HOST_EARG;
    const pqc_layout_args L = {p->layer, p->num_heads, p->head_dim, p->itemsize, p->dtype_code};
    const pqc_kv_tensor kt = {p->k, p->k_sb, p->k_sh, p->k_ss}, vt = {p->v, p->v_sb, p->v_sh, p->v_ss};
    uint64_t gtab[PQC_GHASH_TAB_WORDS];
    int64_t gtab_slot = -1;
    for (int64_t q = 0; q < p->n_items; ++q) {
        pqc_item it;
        pqc_item_get(p->items, p->n_items, item_at(q, p->n_items, order), &it);
        pqc_chunk c;
        pqc_chunk_setup(p->table, p->n, it.chunk, p->meta, L, kt, vt, &c);
        const pqc_key_sched* ks = p->sched + c.slot;
        const uint64_t rounds = pqc_item_resolve(&it, c, ks->lanes);
        if (it.r1 > rounds) return PQC_HOST_EARG;
        if (c.slot != gtab_slot) {
            build_gtab(ks, gtab);
            gtab_slot = c.slot;
        }
        pqc_io_kv_to_arena io = {&c.kv, p->arena + c.offset, false};
        pqc_u128 g = {0ull, 0ull};
        for (uint32_t t = 0; t < ks->lanes; ++t)
            g = pqc_u128_xor(g, pqc_gcm_lane(te_lane(t), ks->rk, ks->lane_tab, gtab, c.msg, io, true, t, ks->lanes,
                                             it.r0, it.r1));
        pqc_u128 ghash;
        if (combine_item(g, it, rounds, ks, p->partials, p->counters, &ghash))
            pqc_gcm_tag(te_lane(0), ks->rk, c.msg.nonce_w, ghash, p->arena + c.offset + c.nbytes);
        if (p->copy_k != nullptr && it.j == 0) {  // the chunk's plaintext copy, by its first item
            const pqc_kv_tensor ck = {p->copy_k, p->copy_k_sb, p->copy_k_sh, p->copy_k_ss};
            const pqc_kv_tensor cv = {p->copy_v, p->copy_v_sb, p->copy_v_sh, p->copy_v_ss};
            pqc_kv_view to;
            pqc_copy_view(c, ck, cv, &to);
            for (uint64_t j = 0; j < (c.nbytes >> 4); ++j) pqc_copy_block(c.kv, to, j);
        }
        if (p->records) {
            for (int64_t pos = it.p0; pos < it.p1; ++pos) {
                uint32_t w[16];
                pqc_encrypt_record(c, p->meta, L, p->first_no + (uint64_t)(c.aux + pos), 0ull, (uint32_t)pos, w);
                write_record(p->records + PQC_RECORD_SIZE * (c.aux + pos - p->rec_lo), w);
            }
            if (p->row_op != 0u && it.j == 0) {  // the chunk's row record, once (the kernel's thread 0)
                uint32_t w[16];
                const int64_t at = p->row_rec0 + it.chunk;
                pqc_chunk_row_record(c, p->meta, L, p->row_op, p->row_pos_start, p->row_pos_count, p->row_nbytes,
                                     p->first_no + (uint64_t)at, 0ull, w);
                write_record(p->records + PQC_RECORD_SIZE * (at - p->rec_lo), w);
            }
        }
    }
    return 0;
}

// pqc_decrypt_row_records on the CPU (the kernel's parameters): one DECRYPT record per
// row descriptor at records[r * 64], numbered first_no + r.
int pqc_host_decrypt_row_records(const pqc_slot_meta* meta, const int64_t* rowdesc, int64_t nrows, uint32_t layer,
                                 uint32_t num_heads, uint32_t head_dim, uint32_t itemsize, uint32_t dtype_code,
                                 uint8_t* records, uint64_t first_no) {
    if (nrows < 0 || records == nullptr) return PQC_HOST_EARG;
    pqc_layout_args L = {layer, num_heads, head_dim, itemsize, dtype_code};
    for (int64_t r = 0; r < nrows; ++r) {
        uint32_t w[16];
        pqc_row_record(rowdesc, nrows, r, meta, L, first_no + (uint64_t)r, 0ull, w);
        write_record(records + PQC_RECORD_SIZE * r, w);
    }
    return 0;
}

// The decrypt kernel's work on the CPU, with its parameters (pqc_decrypt_chunks): work
// items as for pqc_host_encrypt_chunks; the item completing a chunk verifies its tag,
// zeroes the chunk's whole destination on failure, sets status[chunk], ORs AUTH_FAILED
// into the chunk's row record (records + aux * 64; aux -1: none) and appends a failure
// record to fq (capacity fq_cap; *fq_count counts all failures, also those past the
// capacity). Row records: pqc_host_decrypt_row_records.
int pqc_host_decrypt_chunks(const pqc_chunk_params* p, uint32_t order) {
    if (p == nullptr || p->n < 0 || p->n_items < 0 || ((p->head_dim * p->itemsize) & 15u) != 0u || order > 2u ||
        p->fq_count == nullptr || p->status == nullptr ||
        !items_ok(p->items, p->n_items, p->n, p->partials, p->counters))
        return PQC_HOST_EARG;
    const pqc_layout_args L = {p->layer, p->num_heads, p->head_dim, p->itemsize, p->dtype_code};
    const pqc_kv_tensor kt = {p->k, p->k_sb, p->k_sh, p->k_ss}, vt = {p->v, p->v_sb, p->v_sh, p->v_ss};
    uint64_t gtab[PQC_GHASH_TAB_WORDS];
    int64_t gtab_slot = -1;
    for (int64_t q = 0; q < p->n_items; ++q) {
        pqc_item it;
        pqc_item_get(p->items, p->n_items, item_at(q, p->n_items, order), &it);
        pqc_chunk c;
        pqc_chunk_setup(p->table, p->n, it.chunk, p->meta, L, kt, vt, &c);
        const pqc_key_sched* ks = p->sched + c.slot;
        const uint64_t rounds = pqc_item_resolve(&it, c, ks->lanes);
        if (it.r1 > rounds) return PQC_HOST_EARG;
        if (c.slot != gtab_slot) {
            build_gtab(ks, gtab);
            gtab_slot = c.slot;
        }
        pqc_io_arena_to_kv io = {&c.kv, p->arena + c.offset, false};
        pqc_u128 g = {0ull, 0ull};
        for (uint32_t t = 0; t < ks->lanes; ++t)
            g = pqc_u128_xor(g, pqc_gcm_lane(te_lane(t), ks->rk, ks->lane_tab, gtab, c.msg, io, false, t, ks->lanes,
                                             it.r0, it.r1));
        pqc_u128 ghash;
        if (!combine_item(g, it, rounds, ks, p->partials, p->counters, &ghash)) continue;
        uint8_t tag[16];
        pqc_gcm_tag(te_lane(0), ks->rk, c.msg.nonce_w, ghash, tag);
        const int ok = pqc_ct_equal(tag, p->arena + c.offset + c.nbytes, 16);
        p->status[it.chunk] = (uint8_t)(ok ? 0 : 1);
        if (!ok) {
            for (uint64_t j = 0; j < c.nbytes / 16u; ++j) io.zero(j);
            if (p->records && c.aux >= 0)
                p->records[PQC_RECORD_SIZE * c.aux + PQC_RECORD_STATUS_OFFSET] |= (uint8_t)PQC_STATUS_AUTH_FAILED;
            const uint32_t idx = (*p->fq_count)++;
            if (p->fq && idx < p->fq_cap) {
                uint32_t w[16];
                pqc_failure_record(c, p->meta, L, 0ull, p->call_tag, w);
                write_record(p->fq + (uint64_t)PQC_RECORD_SIZE * idx, w);
            }
        }
    }
    return 0;
}

// (H^lanes)^e of a key, by the kernels' window table and multiplication tree (out: 16 bytes).
int pqc_host_item_multiplier(const uint8_t* key, uint32_t lanes, uint32_t e, uint8_t* out) {
    if (!lanes_ok(lanes)) return PQC_HOST_EARG;
    pqc_key_sched ks;
    pqc_prepare_key(te(), key, lanes, &ks);
    store_u128(out, pqc_item_multiplier(&ks, e));
    return 0;
}

// A 16-byte block's byte offset from the K (or V) base in a chunk view (the kernels'
// 64-bit addressing), for tests of chunks larger than this machine can hold.
int64_t pqc_host_kv_block_offset(uint32_t row_bytes, uint64_t pos_count, uint32_t num_heads, int64_t sb, int64_t sh,
                                 int64_t ss, int64_t row, int64_t io_start, uint64_t j, int* is_v) {
    pqc_kv_view view;
    uint8_t* const base = nullptr;
    view.k = base + 0;
    view.v = base + 0;
    view.k_sb = view.v_sb = sb;
    view.k_sh = view.v_sh = sh;
    view.k_ss = view.v_ss = ss;
    view.row_bytes = row_bytes;
    view.pos_count = pos_count;
    view.half = (uint64_t)row_bytes * num_heads * pos_count;
    view.row = row;
    view.io_start = io_start;
    view.aligned = false;
    *is_v = 16ull * j >= view.half ? 1 : 0;
    return (int64_t)(view.addr(j) - base);
}

}  // extern "C"
