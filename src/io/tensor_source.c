/* Tensor sources over the GGUF and safetensors readers, or built in memory
 * (dpoc/tensor_source.h). A source keeps its format's reader open and lists the
 * reader's tensors in one table of dpoc_ts_tensor; names and data point into the
 * reader (into the mapping for data), so opening copies no weights. */
#include "dpoc/tensor_source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dpoc/safetensors.h"

_Static_assert(ST_MAX_DIMS <= DPOC_TS_MAX_DIMS, "a safetensors shape must fit a dpoc_ts_tensor");
_Static_assert(DPOC_GGUF_MAX_DIMS <= DPOC_TS_MAX_DIMS, "a GGUF shape must fit a dpoc_ts_tensor");

#define GGUF_MAGIC_BYTES "GGUF"
#define GGUF_MAGIC_LEN 4
/* First capacity of a memory source's table (doubled as it fills). */
#define TS_FIRST_CAP 16

struct dpoc_tensor_source {
    dpoc_ts_format format;
    char *where;
    dpoc_ts_tensor *tensors;
    size_t n, cap;
    dpoc_gguf *gguf; /* DPOC_TS_GGUF */
    st_model st;     /* DPOC_TS_SAFETENSORS */
};

int dpoc_source_is_gguf(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char magic[GGUF_MAGIC_LEN] = {0};
    size_t n = fread(magic, 1, sizeof magic, f);
    fclose(f);
    return n == sizeof magic && memcmp(magic, GGUF_MAGIC_BYTES, sizeof magic) == 0;
}

static int source_alloc(dpoc_tensor_source **out, dpoc_ts_format format, const char *where, size_t n,
                        dpoc_err *err) {
    *out = NULL;
    dpoc_tensor_source *s = dpoc_calloc(1, sizeof *s, "tensor source", err);
    if (!s) return DPOC_ENOMEM;
    s->format = format;
    s->where = strdup(where ? where : "(memory)");
    s->tensors = n ? dpoc_calloc(n, sizeof *s->tensors, "tensor table", err) : NULL;
    s->cap = n;
    if (!s->where || (n && !s->tensors)) {
        dpoc_ts_close(s);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory for the tensor table of %s", where ? where : "(memory)");
    }
    *out = s;
    return 0;
}

void dpoc_ts_close(dpoc_tensor_source *src) {
    if (!src) return;
    if (src->format == DPOC_TS_MEMORY)
        for (size_t i = 0; i < src->n; i++) free((char *)src->tensors[i].name);
    free(src->tensors);
    dpoc_gguf_close(src->gguf);
    st_close(&src->st);
    free(src->where);
    free(src);
}

/* ---- GGUF ---- */

/* Lists an open GGUF; takes g (closed on error). */
static int from_gguf(dpoc_tensor_source **out, dpoc_gguf *g, dpoc_err *err) {
    const size_t n = dpoc_gguf_n_tensors(g);
    dpoc_tensor_source *s;
    int rc = source_alloc(&s, DPOC_TS_GGUF, dpoc_gguf_path(g), n, err);
    if (rc) {
        dpoc_gguf_close(g);
        return rc;
    }
    s->gguf = g;
    for (size_t i = 0; i < n; i++) {
        const dpoc_gguf_tensor *gt = dpoc_gguf_tensor_at(g, i);
        dpoc_ts_tensor *t = &s->tensors[i];
        t->name = gt->name;
        t->dtype = gt->type; /* the ids are ggml's */
        t->dtype_name = dpoc_dtype_name(gt->type);
        t->ndim = gt->n_dims;
        /* ne[0] varies fastest: PyTorch's shape is ne reversed */
        for (size_t d = 0; d < gt->n_dims; d++) t->shape[d] = gt->ne[gt->n_dims - 1 - d];
        t->numel = gt->nelements;
        t->data = gt->data;
        t->nbytes = gt->nbytes;
    }
    s->n = n;
    *out = s;
    return 0;
}

int dpoc_ts_open_gguf(dpoc_tensor_source **src, const char *path, dpoc_err *err) {
    *src = NULL;
    dpoc_gguf *g = NULL;
    DPOC_TRY(dpoc_gguf_open(&g, path, err));
    return from_gguf(src, g, err);
}

int dpoc_ts_open_gguf_memory(dpoc_tensor_source **src, const void *data, size_t size, const char *name,
                             dpoc_err *err) {
    *src = NULL;
    dpoc_gguf *g = NULL;
    DPOC_TRY(dpoc_gguf_open_memory(&g, data, size, name, err));
    return from_gguf(src, g, err);
}

/* ---- safetensors ---- */

/* The dpoc id of a safetensors dtype: F32 / F16 / BF16 by st's enum, the integer and
 * F64 types by name (dtype.h has them), the rest (U8, BOOL, F8_*, ...) none. */
static uint32_t st_dtype_id(const st_tensor *t) {
    static const struct {
        const char *name;
        uint32_t id;
    } by_name[] = {{"I8", DPOC_DT_I8}, {"I16", DPOC_DT_I16}, {"I32", DPOC_DT_I32},
                   {"I64", DPOC_DT_I64}, {"F64", DPOC_DT_F64}};
    switch (t->dtype) {
    case ST_F32: return DPOC_DT_F32;
    case ST_F16: return DPOC_DT_F16;
    case ST_BF16: return DPOC_DT_BF16;
    default: break;
    }
    for (size_t i = 0; i < sizeof by_name / sizeof by_name[0]; i++)
        if (!strcmp(t->dtype_str, by_name[i].name)) return by_name[i].id;
    return DPOC_TS_DTYPE_OTHER;
}

int dpoc_ts_open_safetensors(dpoc_tensor_source **src, const char *dir, dpoc_err *err) {
    *src = NULL;
    st_model st;
    DPOC_TRY(st_open_dir(&st, dir, err));
    dpoc_tensor_source *s;
    int rc = source_alloc(&s, DPOC_TS_SAFETENSORS, dir, st.n_tensors, err);
    if (rc) {
        st_close(&st);
        return rc;
    }
    s->st = st;
    for (size_t i = 0; i < st.n_tensors; i++) {
        const st_tensor *stt = &s->st.tensors[i];
        dpoc_ts_tensor *t = &s->tensors[i];
        t->name = stt->name;
        t->dtype = st_dtype_id(stt);
        t->dtype_name = stt->dtype_str;
        t->ndim = stt->ndim;
        memcpy(t->shape, stt->shape, stt->ndim * sizeof *t->shape);
        t->numel = stt->numel;
        t->data = stt->data;
        t->nbytes = stt->nbytes;
    }
    s->n = st.n_tensors;
    *src = s;
    return 0;
}

/* ---- memory ---- */

int dpoc_ts_new(dpoc_tensor_source **src, const char *where, dpoc_err *err) {
    return source_alloc(src, DPOC_TS_MEMORY, where, 0, err);
}

int dpoc_ts_add(dpoc_tensor_source *src, const char *name, uint32_t dtype, size_t ndim, const size_t *shape,
                const void *data, size_t nbytes, dpoc_err *err) {
    DPOC_CHECK(src && src->format == DPOC_TS_MEMORY && name && (shape || ndim == 0), err);
    const char *where = src->where, *tname = dpoc_dtype_name(dtype);
    if (!tname) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': unknown storage type id %u", where, name, dtype);
    if (ndim > DPOC_TS_MAX_DIMS)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has %zu dimensions (at most %d)", where, name, ndim,
                         DPOC_TS_MAX_DIMS);
    size_t numel = 1;
    for (size_t d = 0; d < ndim; d++)
        if (__builtin_mul_overflow(numel, shape[d], &numel))
            return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': element count overflows", where, name);
    const size_t block = dpoc_dtype_block(dtype), row = ndim ? shape[ndim - 1] : 1;
    if (row % block != 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': row length %zu is not a multiple of the %s block size %zu",
                         where, name, row, tname, block);
    const size_t need = numel / block * dpoc_dtype_block_bytes(dtype);
    if (need / dpoc_dtype_block_bytes(dtype) != numel / block || need != nbytes)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': %zu bytes given, %zu elements of %s take %zu", where,
                         name, nbytes, numel, tname, need);
    if (nbytes && !data) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': no data", where, name);
    if (dpoc_ts_find(src, name)) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is given twice", where, name);
    if (src->n == src->cap) {
        const size_t cap = src->cap ? 2 * src->cap : TS_FIRST_CAP;
        dpoc_ts_tensor *p = realloc(src->tensors, cap * sizeof *p);
        if (!p) return dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory for the tensor table", where);
        src->tensors = p;
        src->cap = cap;
    }
    dpoc_ts_tensor *t = &src->tensors[src->n];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name) return dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory for tensor '%s'", where, name);
    t->dtype = dtype;
    t->dtype_name = tname;
    t->ndim = ndim;
    if (ndim) memcpy(t->shape, shape, ndim * sizeof *shape);
    t->numel = numel;
    t->data = data;
    t->nbytes = nbytes;
    src->n++;
    return 0;
}

/* ---- lookups ---- */

dpoc_ts_format dpoc_ts_format_of(const dpoc_tensor_source *src) { return src->format; }
const char *dpoc_ts_where(const dpoc_tensor_source *src) { return src->where; }
const dpoc_gguf *dpoc_ts_gguf(const dpoc_tensor_source *src) { return src->gguf; }
size_t dpoc_ts_count(const dpoc_tensor_source *src) { return src->n; }

const dpoc_ts_tensor *dpoc_ts_at(const dpoc_tensor_source *src, size_t i) {
    return i < src->n ? &src->tensors[i] : NULL;
}

size_t dpoc_ts_index(const dpoc_tensor_source *src, const dpoc_ts_tensor *t) { return (size_t)(t - src->tensors); }

const dpoc_ts_tensor *dpoc_ts_find(const dpoc_tensor_source *src, const char *name) {
    /* the readers' own lookups (st bsearches its sorted table); the table is in their order */
    if (src->format == DPOC_TS_GGUF) {
        const dpoc_gguf_tensor *t = dpoc_gguf_find_tensor(src->gguf, name);
        return t ? &src->tensors[t - dpoc_gguf_tensor_at(src->gguf, 0)] : NULL;
    }
    if (src->format == DPOC_TS_SAFETENSORS) {
        const st_tensor *t = st_find(&src->st, name);
        return t ? &src->tensors[t - src->st.tensors] : NULL;
    }
    for (size_t i = 0; i < src->n; i++)
        if (!strcmp(src->tensors[i].name, name)) return &src->tensors[i];
    return NULL;
}

/* ---- conversion ---- */

int dpoc_ts_to_f32(const dpoc_tensor_source *src, const dpoc_ts_tensor *t, float *dst, size_t n, dpoc_err *err) {
    DPOC_CHECK(src && t, err);
    if (n != t->numel)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has %zu elements, the destination %zu", src->where,
                         t->name, t->numel, n);
    /* a GGUF keeps ggml's wording (dequantize_raw's message); other formats say dtype */
    if (src->format != DPOC_TS_GGUF && (t->dtype == DPOC_TS_DTYPE_OTHER || !dpoc_gguf_can_dequantize(t->dtype)))
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has dtype %s, which dpoc cannot convert to F32",
                         src->where, t->name, t->dtype_name && t->dtype_name[0] ? t->dtype_name : "?");
    int rc = dpoc_gguf_dequantize_raw(t->dtype, t->data, t->nbytes, dst, n, err);
    if (rc) dpoc_err_prefix(err, "%s: tensor '%s'", src->where, t->name);
    return rc;
}
