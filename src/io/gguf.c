/* GGUF reader: parsing and validation of the header, metadata and tensor infos,
 * and the metadata / tensor lookups. Dequantization is in gguf_quants.c; what a
 * GGUF means as a model is model/'s (gguf_config.c, gguf_names.c), as a tokenizer
 * text/'s (tokenizer_gguf.c).
 *
 * Every read goes through rd_need(), which checks the bytes are inside the file
 * before they are touched; counts are bounded by the bytes left (each element
 * takes at least one byte) before anything is allocated from them, so a hostile
 * count cannot ask for a huge allocation. */
#include "dpoc/gguf.h"
#include "dpoc/dtype.h"

#include "core/fileutil.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */

typedef struct {
    char *key;
    uint32_t type;
    union {
        uint64_t u;
        int64_t i;
        double f;
    } num;            /* integer, bool and float scalars */
    char *str;        /* string value (NUL-terminated copy) */
    size_t str_len;
    uint32_t arr_type; /* array element type */
    size_t arr_n;
    void *arr_data;    /* numeric arrays: aligned copy of the elements */
    char **arr_strs;   /* string arrays: pointers into arr_blob */
    size_t *arr_lens;
    char *arr_blob;
} gguf_kv;

struct dpoc_gguf {
    char *path;
    const uint8_t *base;
    size_t size;
    int mapped;        /* unmap on close */
    uint32_t version;
    size_t alignment;
    size_t data_offset;
    gguf_kv *kv;
    size_t n_kv;
    dpoc_gguf_tensor *tensors;
    size_t n_tensors;
};

/* ---- type tables (dpoc/dtype.h) ---- */

const char *dpoc_ggml_type_name(uint32_t type) { return dpoc_dtype_name(type); }
size_t dpoc_ggml_block_size(uint32_t type) { return dpoc_dtype_block(type); }
size_t dpoc_ggml_type_size(uint32_t type) { return dpoc_dtype_block_bytes(type); }

/* Bytes of one scalar of a metadata type; 0 for string/array/unknown. */
static size_t vtype_size(uint32_t t) {
    switch (t) {
    case DPOC_GGUF_UINT8: case DPOC_GGUF_INT8: case DPOC_GGUF_BOOL: return 1;
    case DPOC_GGUF_UINT16: case DPOC_GGUF_INT16: return 2;
    case DPOC_GGUF_UINT32: case DPOC_GGUF_INT32: case DPOC_GGUF_FLOAT32: return 4;
    case DPOC_GGUF_UINT64: case DPOC_GGUF_INT64: case DPOC_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

static const char *vtype_name(uint32_t t) {
    static const char *const names[] = {"u8",  "i8",     "u16",   "i16", "u32", "i32", "f32",
                                        "bool", "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

/* ---- bounded reader ---- */

typedef struct {
    const uint8_t *p;
    size_t size, pos;
    const char *path;
    char ctx[200]; /* what is being read, for messages: "key 'x'", "tensor 'y'" */
    dpoc_err *err;
} rd;

static int rd_need(rd *r, size_t n, const char *what) {
    if (n > r->size - r->pos)
        return dpoc_errf(r->err, DPOC_EINPUT,
                         "%s: %s: %s at offset %zu needs %zu bytes, beyond the end of the file (%zu bytes)", r->path,
                         r->ctx, what, r->pos, n, r->size);
    return 0;
}

static uint64_t ld_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | p[i];
    return v;
}

static int rd_u32(rd *r, uint32_t *v, const char *what) {
    DPOC_TRY(rd_need(r, 4, what));
    *v = (uint32_t)ld_le(r->p + r->pos, 4);
    r->pos += 4;
    return 0;
}

static int rd_u64(rd *r, uint64_t *v, const char *what) {
    DPOC_TRY(rd_need(r, 8, what));
    *v = ld_le(r->p + r->pos, 8);
    r->pos += 8;
    return 0;
}

/* A string: u64 length, bytes. *s points into the file. */
static int rd_str(rd *r, const uint8_t **s, size_t *len, const char *what) {
    uint64_t n;
    DPOC_TRY(rd_u64(r, &n, what));
    if (n > r->size - r->pos)
        return dpoc_errf(r->err, DPOC_EINPUT,
                         "%s: %s: %s length %llu at offset %zu is beyond the end of the file (%zu bytes)", r->path,
                         r->ctx, what, (unsigned long long)n, r->pos - 8, r->size);
    *s = r->p + r->pos;
    *len = (size_t)n;
    r->pos += (size_t)n;
    return 0;
}

static char *dup_bytes(const uint8_t *s, size_t n, dpoc_err *err) {
    if (n == SIZE_MAX) {
        dpoc_errf(err, DPOC_ENOMEM, "string too long");
        return NULL;
    }
    char *d = dpoc_malloc(n + 1, "GGUF string", err);
    if (!d) return NULL;
    if (n) memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* Array value: u32 element type, u64 count, elements. Nested arrays are refused
 * (ggml's own reader does not support them either). */
static int rd_array(rd *r, gguf_kv *kv) {
    uint32_t et;
    uint64_t cnt;
    DPOC_TRY(rd_u32(r, &et, "array element type"));
    DPOC_TRY(rd_u64(r, &cnt, "array length"));
    kv->arr_type = et;
    size_t left = r->size - r->pos;
    size_t es = vtype_size(et);
    if (es) {
        if (cnt > left / es)
            return dpoc_errf(r->err, DPOC_EINPUT,
                             "%s: %s: array of %llu %s elements does not fit in the %zu bytes left in the file",
                             r->path, r->ctx, (unsigned long long)cnt, vtype_name(et), left);
        size_t nb = (size_t)cnt * es;
        kv->arr_n = (size_t)cnt;
        /* malloc's alignment suits every element type, unlike the file offset */
        kv->arr_data = dpoc_malloc(nb, "GGUF array", r->err);
        if (!kv->arr_data) return DPOC_ENOMEM;
        if (nb) memcpy(kv->arr_data, r->p + r->pos, nb);
        r->pos += nb;
        return 0;
    }
    if (et == DPOC_GGUF_STRING) {
        if (cnt > left / 8)
            return dpoc_errf(r->err, DPOC_EINPUT,
                             "%s: %s: array of %llu strings does not fit in the %zu bytes left in the file", r->path,
                             r->ctx, (unsigned long long)cnt, left);
        /* first pass: bounds of every string and the total, so one blob holds them all */
        size_t start = r->pos, total = 0;
        for (uint64_t i = 0; i < cnt; i++) {
            const uint8_t *s;
            size_t n;
            DPOC_TRY(rd_str(r, &s, &n, "array string"));
            total += n + 1; /* cannot overflow: n <= file size, count <= file size / 8 */
        }
        kv->arr_n = (size_t)cnt;
        kv->arr_blob = dpoc_malloc(total, "GGUF string array", r->err);
        kv->arr_strs = dpoc_calloc(kv->arr_n, sizeof *kv->arr_strs, "GGUF string array", r->err);
        kv->arr_lens = dpoc_calloc(kv->arr_n, sizeof *kv->arr_lens, "GGUF string array", r->err);
        if (!kv->arr_blob || !kv->arr_strs || !kv->arr_lens) return DPOC_ENOMEM;
        r->pos = start;
        char *w = kv->arr_blob;
        for (size_t i = 0; i < kv->arr_n; i++) {
            const uint8_t *s;
            size_t n;
            DPOC_TRY(rd_str(r, &s, &n, "array string"));
            if (n) memcpy(w, s, n);
            w[n] = '\0';
            kv->arr_strs[i] = w;
            kv->arr_lens[i] = n;
            w += n + 1;
        }
        return 0;
    }
    if (et == DPOC_GGUF_ARRAY)
        return dpoc_errf(r->err, DPOC_EINPUT, "%s: %s: nested arrays are not supported", r->path, r->ctx);
    return dpoc_errf(r->err, DPOC_EINPUT, "%s: %s: unknown array element type %u", r->path, r->ctx, et);
}

static int rd_value(rd *r, gguf_kv *kv) {
    uint32_t t = kv->type;
    size_t es = vtype_size(t);
    if (es) {
        DPOC_TRY(rd_need(r, es, "value"));
        uint64_t raw = ld_le(r->p + r->pos, es);
        r->pos += es;
        switch (t) {
        case DPOC_GGUF_INT8: kv->num.i = (int8_t)raw; break;
        case DPOC_GGUF_INT16: kv->num.i = (int16_t)raw; break;
        case DPOC_GGUF_INT32: kv->num.i = (int32_t)raw; break;
        case DPOC_GGUF_INT64: kv->num.i = (int64_t)raw; break;
        case DPOC_GGUF_FLOAT32: {
            uint32_t b = (uint32_t)raw;
            float f;
            memcpy(&f, &b, 4);
            kv->num.f = f;
            break;
        }
        case DPOC_GGUF_FLOAT64: memcpy(&kv->num.f, &raw, 8); break;
        default: kv->num.u = raw; break; /* unsigned and bool */
        }
        return 0;
    }
    if (t == DPOC_GGUF_STRING) {
        const uint8_t *s;
        size_t n;
        DPOC_TRY(rd_str(r, &s, &n, "string value"));
        kv->str = dup_bytes(s, n, r->err);
        kv->str_len = n;
        return kv->str ? 0 : DPOC_ENOMEM;
    }
    if (t == DPOC_GGUF_ARRAY) return rd_array(r, kv);
    return dpoc_errf(r->err, DPOC_EINPUT, "%s: %s: unknown value type %u", r->path, r->ctx, t);
}

static void kv_free(gguf_kv *kv) {
    free(kv->key);
    free(kv->str);
    free(kv->arr_data);
    free(kv->arr_strs);
    free(kv->arr_lens);
    free(kv->arr_blob);
}

static const gguf_kv *find_kv(const dpoc_gguf *g, const char *key) {
    for (size_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

static int parse(dpoc_gguf *g, dpoc_err *err) {
    rd r = {.p = g->base, .size = g->size, .pos = 0, .path = g->path, .err = err};
    snprintf(r.ctx, sizeof r.ctx, "header");
    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    DPOC_TRY(rd_u32(&r, &magic, "magic"));
    if (magic != GGUF_MAGIC)
        return dpoc_errf(err, DPOC_EINPUT, "%s: not a GGUF file (magic 0x%08x, expected 0x%08x \"GGUF\")", g->path,
                         magic, GGUF_MAGIC);
    DPOC_TRY(rd_u32(&r, &version, "version"));
    if (version == 1)
        return dpoc_errf(err, DPOC_EINPUT, "%s: GGUF version 1 is not supported (2 and 3 are)", g->path);
    if (version != 2 && version != 3) {
        /* a byte-swapped version means a big-endian file */
        if ((version & 0xFFFF) == 0 && version)
            return dpoc_errf(err, DPOC_EINPUT, "%s: big-endian GGUF (version 0x%08x) is not supported", g->path,
                             version);
        return dpoc_errf(err, DPOC_EINPUT, "%s: GGUF version %u is not supported (2 and 3 are)", g->path, version);
    }
    g->version = version;
    DPOC_TRY(rd_u64(&r, &n_tensors, "tensor count"));
    DPOC_TRY(rd_u64(&r, &n_kv, "metadata count"));
    /* minimal sizes: a kv is key length (8) + type (4) + 1 byte; a tensor info is
     * name length (8) + n_dims (4) + ne (8) + type (4) + offset (8) */
    size_t left = r.size - r.pos;
    if (n_kv > left / 13)
        return dpoc_errf(err, DPOC_EINPUT, "%s: header: metadata count %llu is too large for a file of %zu bytes",
                         g->path, (unsigned long long)n_kv, g->size);
    if (n_tensors > left / 32)
        return dpoc_errf(err, DPOC_EINPUT, "%s: header: tensor count %llu is too large for a file of %zu bytes",
                         g->path, (unsigned long long)n_tensors, g->size);
    g->kv = dpoc_calloc((size_t)n_kv, sizeof *g->kv, "GGUF metadata", err);
    if (!g->kv) return DPOC_ENOMEM;
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g->kv[g->n_kv];
        const uint8_t *ks;
        size_t kl;
        snprintf(r.ctx, sizeof r.ctx, "metadata entry %llu", (unsigned long long)i);
        DPOC_TRY(rd_str(&r, &ks, &kl, "key"));
        kv->key = dup_bytes(ks, kl, err);
        if (!kv->key) return DPOC_ENOMEM;
        g->n_kv++; /* owned from here on: freed by close on any error */
        snprintf(r.ctx, sizeof r.ctx, "key '%.150s'", kv->key);
        if (strlen(kv->key) != kl)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: key contains a NUL byte", g->path, r.ctx);
        for (size_t j = 0; j + 1 < g->n_kv; j++)
            if (strcmp(g->kv[j].key, kv->key) == 0)
                return dpoc_errf(err, DPOC_EINPUT, "%s: %s: duplicate key", g->path, r.ctx);
        DPOC_TRY(rd_u32(&r, &kv->type, "value type"));
        DPOC_TRY(rd_value(&r, kv));
    }

    g->alignment = DPOC_GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *al = find_kv(g, "general.alignment");
    if (al) {
        if (al->type != DPOC_GGUF_UINT32)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'general.alignment' must be a u32, not %s", g->path,
                             vtype_name(al->type));
        uint64_t a = al->num.u;
        if (a == 0 || (a & (a - 1)) != 0)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'general.alignment' is %llu; it must be a power of two",
                             g->path, (unsigned long long)a);
        g->alignment = (size_t)a;
    }

    g->tensors = dpoc_calloc((size_t)n_tensors, sizeof *g->tensors, "GGUF tensor infos", err);
    if (!g->tensors) return DPOC_ENOMEM;
    for (uint64_t i = 0; i < n_tensors; i++) {
        dpoc_gguf_tensor *t = &g->tensors[g->n_tensors];
        const uint8_t *ns;
        size_t nl;
        snprintf(r.ctx, sizeof r.ctx, "tensor info %llu", (unsigned long long)i);
        DPOC_TRY(rd_str(&r, &ns, &nl, "name"));
        t->name = dup_bytes(ns, nl, err);
        if (!t->name) return DPOC_ENOMEM;
        g->n_tensors++;
        snprintf(r.ctx, sizeof r.ctx, "tensor '%.150s'", t->name);
        if (strlen(t->name) != nl)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: name contains a NUL byte", g->path, r.ctx);
        for (size_t j = 0; j + 1 < g->n_tensors; j++)
            if (strcmp(g->tensors[j].name, t->name) == 0)
                return dpoc_errf(err, DPOC_EINPUT, "%s: %s: duplicate tensor name", g->path, r.ctx);
        uint32_t nd;
        DPOC_TRY(rd_u32(&r, &nd, "n_dims"));
        if (nd < 1 || nd > DPOC_GGUF_MAX_DIMS)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: n_dims %u is not in 1..%d", g->path, r.ctx, nd,
                             DPOC_GGUF_MAX_DIMS);
        t->n_dims = nd;
        size_t nel = 1;
        for (size_t d = 0; d < DPOC_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (size_t d = 0; d < nd; d++) {
            uint64_t ne;
            DPOC_TRY(rd_u64(&r, &ne, "dimension"));
            /* ggml stores ne as int64; anything past INT64_MAX is negative there */
            if (ne > (uint64_t)INT64_MAX || ne > SIZE_MAX)
                return dpoc_errf(err, DPOC_EINPUT, "%s: %s: dimension %zu is %llu (negative or too large)", g->path,
                                 r.ctx, d, (unsigned long long)ne);
            t->ne[d] = (size_t)ne;
            if (ne && nel > SIZE_MAX / (size_t)ne)
                return dpoc_errf(err, DPOC_EINPUT, "%s: %s: element count overflows", g->path, r.ctx);
            nel *= (size_t)ne;
        }
        t->nelements = nel;
        DPOC_TRY(rd_u32(&r, &t->type, "type"));
        const char *tname = dpoc_dtype_name(t->type);
        const size_t tblock = dpoc_dtype_block(t->type), tbytes = dpoc_dtype_block_bytes(t->type);
        if (!tname)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: unknown or unsupported ggml type %u", g->path, r.ctx,
                             t->type);
        if (t->ne[0] % tblock != 0)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: row length %zu is not a multiple of the %s block size %zu",
                             g->path, r.ctx, t->ne[0], tname, tblock);
        /* nel / blck * size <= nel * 4 (size / blck <= 9.125 / 8 for the quantized types; F64/I64 are 8 per
         * element), so check the multiplication */
        size_t nblocks = nel / tblock;
        if (nblocks > SIZE_MAX / tbytes)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: byte size overflows", g->path, r.ctx);
        t->nbytes = nblocks * tbytes;
        uint64_t off;
        DPOC_TRY(rd_u64(&r, &off, "offset"));
        if (off % g->alignment != 0)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: offset %llu is not a multiple of the alignment %zu", g->path,
                             r.ctx, (unsigned long long)off, g->alignment);
        if (off > SIZE_MAX)
            return dpoc_errf(err, DPOC_EINPUT, "%s: %s: offset %llu too large", g->path, r.ctx,
                             (unsigned long long)off);
        t->offset = (size_t)off;
    }

    /* data section: the end of the infos padded to the alignment */
    size_t pad = (g->alignment - r.pos % g->alignment) % g->alignment;
    if (g->n_tensors && pad > r.size - r.pos)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: the data section (at offset %zu after padding to %zu) is beyond the end of the file "
                         "(%zu bytes)",
                         g->path, r.pos + pad, g->alignment, g->size);
    g->data_offset = pad > r.size - r.pos ? r.size : r.pos + pad;
    size_t data_len = g->size - g->data_offset;
    for (size_t i = 0; i < g->n_tensors; i++) {
        dpoc_gguf_tensor *t = &g->tensors[i];
        if (t->offset > data_len || t->nbytes > data_len - t->offset)
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: tensor '%.150s': data [%zu, +%zu bytes) is beyond the end of the data section "
                             "(%zu bytes)",
                             g->path, t->name, t->offset, t->nbytes, data_len);
        t->data = g->base + g->data_offset + t->offset;
    }
    return 0;
}

static int open_common(dpoc_gguf **out, dpoc_gguf *g, dpoc_err *err) {
    int rc = parse(g, err);
    if (rc) {
        dpoc_gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

int dpoc_gguf_open_memory(dpoc_gguf **out, const void *data, size_t size, const char *name, dpoc_err *err) {
    *out = NULL;
    dpoc_gguf *g = dpoc_calloc(1, sizeof *g, "GGUF reader", err);
    if (!g) return DPOC_ENOMEM;
    g->path = strdup(name ? name : "(memory)");
    if (!g->path) {
        free(g);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    }
    g->base = data;
    g->size = data ? size : 0;
    return open_common(out, g, err);
}

int dpoc_gguf_open(dpoc_gguf **out, const char *path, dpoc_err *err) {
    *out = NULL;
    void *map;
    size_t size;
    DPOC_TRY(dpoc_map_file(path, 24, "a GGUF header", &map, &size, err));
    dpoc_gguf *g = dpoc_calloc(1, sizeof *g, "GGUF reader", err);
    if (!g) {
        munmap(map, size);
        return DPOC_ENOMEM;
    }
    g->base = map;
    g->size = size;
    g->mapped = 1;
    g->path = strdup(path);
    if (!g->path) {
        dpoc_gguf_close(g);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    }
    return open_common(out, g, err);
}

void dpoc_gguf_close(dpoc_gguf *g) {
    if (!g) return;
    for (size_t i = 0; i < g->n_kv; i++) kv_free(&g->kv[i]);
    free(g->kv);
    for (size_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->tensors);
    if (g->mapped) munmap((void *)g->base, g->size);
    free(g->path);
    free(g);
}

const char *dpoc_gguf_path(const dpoc_gguf *g) { return g->path; }
uint32_t dpoc_gguf_version(const dpoc_gguf *g) { return g->version; }
size_t dpoc_gguf_alignment(const dpoc_gguf *g) { return g->alignment; }
size_t dpoc_gguf_data_offset(const dpoc_gguf *g) { return g->data_offset; }
size_t dpoc_gguf_n_kv(const dpoc_gguf *g) { return g->n_kv; }
const char *dpoc_gguf_kv_key(const dpoc_gguf *g, size_t i) { return i < g->n_kv ? g->kv[i].key : NULL; }
int dpoc_gguf_has_key(const dpoc_gguf *g, const char *key) { return find_kv(g, key) != NULL; }
int dpoc_gguf_key_type(const dpoc_gguf *g, const char *key) {
    const gguf_kv *kv = find_kv(g, key);
    return kv ? (int)kv->type : -1;
}

size_t dpoc_gguf_n_tensors(const dpoc_gguf *g) { return g->n_tensors; }
const dpoc_gguf_tensor *dpoc_gguf_tensor_at(const dpoc_gguf *g, size_t i) {
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}
const dpoc_gguf_tensor *dpoc_gguf_find_tensor(const dpoc_gguf *g, const char *name) {
    for (size_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

/* ---- getters ---- */

static int get_kv(const dpoc_gguf *g, const char *key, const gguf_kv **kv, dpoc_err *err) {
    *kv = find_kv(g, key);
    if (!*kv) return dpoc_errf(err, DPOC_EINPUT, "%s: missing key '%s'", g->path, key);
    return 0;
}

static int wrong_type(const dpoc_gguf *g, const gguf_kv *kv, const char *want, dpoc_err *err) {
    return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is a%s %s, expected %s", g->path, kv->key,
                     kv->type == DPOC_GGUF_ARRAY || kv->type == DPOC_GGUF_INT8 || kv->type == DPOC_GGUF_INT16 ||
                             kv->type == DPOC_GGUF_INT32 || kv->type == DPOC_GGUF_INT64
                         ? "n"
                         : "",
                     vtype_name(kv->type), want);
}

static int is_signed(uint32_t t) {
    return t == DPOC_GGUF_INT8 || t == DPOC_GGUF_INT16 || t == DPOC_GGUF_INT32 || t == DPOC_GGUF_INT64;
}
static int is_unsigned(uint32_t t) {
    return t == DPOC_GGUF_UINT8 || t == DPOC_GGUF_UINT16 || t == DPOC_GGUF_UINT32 || t == DPOC_GGUF_UINT64;
}

/* Integer value as (negative flag, magnitude-ish): returns the value as i64 when
 * it fits, and whether it is a u64 above INT64_MAX. */
static int get_int(const dpoc_gguf *g, const char *key, int64_t lo, uint64_t hi, uint64_t *uout, int64_t *iout,
                   const char *want, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (is_unsigned(kv->type)) {
        if (kv->num.u > hi)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is %llu, out of range for %s", g->path, key,
                             (unsigned long long)kv->num.u, want);
        if (uout) *uout = kv->num.u;
        if (iout) *iout = (int64_t)kv->num.u;
        return 0;
    }
    if (is_signed(kv->type)) {
        int64_t v = kv->num.i;
        if (v < lo || (v >= 0 && (uint64_t)v > hi))
            return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is %lld, out of range for %s", g->path, key,
                             (long long)v, want);
        if (uout) *uout = (uint64_t)v;
        if (iout) *iout = v;
        return 0;
    }
    return wrong_type(g, kv, "an integer", err);
}

int dpoc_gguf_get_u32(const dpoc_gguf *g, const char *key, uint32_t *out, dpoc_err *err) {
    uint64_t u;
    DPOC_TRY(get_int(g, key, 0, UINT32_MAX, &u, NULL, "u32", err));
    *out = (uint32_t)u;
    return 0;
}
int dpoc_gguf_get_i32(const dpoc_gguf *g, const char *key, int32_t *out, dpoc_err *err) {
    int64_t i;
    DPOC_TRY(get_int(g, key, INT32_MIN, INT32_MAX, NULL, &i, "i32", err));
    *out = (int32_t)i;
    return 0;
}
int dpoc_gguf_get_u64(const dpoc_gguf *g, const char *key, uint64_t *out, dpoc_err *err) {
    return get_int(g, key, 0, UINT64_MAX, out, NULL, "u64", err);
}
int dpoc_gguf_get_i64(const dpoc_gguf *g, const char *key, int64_t *out, dpoc_err *err) {
    return get_int(g, key, INT64_MIN, INT64_MAX, NULL, out, "i64", err);
}

int dpoc_gguf_get_f64(const dpoc_gguf *g, const char *key, double *out, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (kv->type != DPOC_GGUF_FLOAT32 && kv->type != DPOC_GGUF_FLOAT64) return wrong_type(g, kv, "a float", err);
    *out = kv->num.f;
    return 0;
}
int dpoc_gguf_get_f32(const dpoc_gguf *g, const char *key, float *out, dpoc_err *err) {
    double d = 0.0;
    DPOC_TRY(dpoc_gguf_get_f64(g, key, &d, err));
    *out = (float)d;
    return 0;
}
int dpoc_gguf_get_bool(const dpoc_gguf *g, const char *key, int *out, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (kv->type != DPOC_GGUF_BOOL) return wrong_type(g, kv, "a bool", err);
    *out = kv->num.u != 0;
    return 0;
}
int dpoc_gguf_get_token_id(const dpoc_gguf *g, const char *key, int32_t *out, dpoc_err *err) {
    *out = -1;
    if (!dpoc_gguf_has_key(g, key)) return 0;
    uint32_t v;
    DPOC_TRY(dpoc_gguf_get_u32(g, key, &v, err));
    if (v > INT32_MAX) return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is out of range", g->path, key);
    *out = (int32_t)v;
    return 0;
}
int dpoc_gguf_get_str(const dpoc_gguf *g, const char *key, const char **out, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (kv->type != DPOC_GGUF_STRING) return wrong_type(g, kv, "a string", err);
    *out = kv->str;
    return 0;
}
int dpoc_gguf_get_array(const dpoc_gguf *g, const char *key, dpoc_gguf_vtype *elem_type, const void **data,
                        size_t *n, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (kv->type != DPOC_GGUF_ARRAY || !vtype_size(kv->arr_type))
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is not an array of numbers", g->path, key);
    *elem_type = (dpoc_gguf_vtype)kv->arr_type;
    *data = kv->arr_data;
    *n = kv->arr_n;
    return 0;
}
int dpoc_gguf_get_str_array(const dpoc_gguf *g, const char *key, const char *const **strs, const size_t **lens,
                            size_t *n, dpoc_err *err) {
    const gguf_kv *kv;
    DPOC_TRY(get_kv(g, key, &kv, err));
    if (kv->type != DPOC_GGUF_ARRAY || kv->arr_type != DPOC_GGUF_STRING)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is not an array of strings", g->path, key);
    *strs = (const char *const *)kv->arr_strs;
    if (lens) *lens = kv->arr_lens;
    *n = kv->arr_n;
    return 0;
}
