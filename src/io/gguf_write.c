/* GGUF writer (dpoc/gguf_write.h): version 3 as llama.cpp's gguf-py writes it.
 *
 * Facts from llama.cpp, and where they come from:
 * - the header, kv and tensor-info layout, ne written as the shape reversed,
 *   each tensor's offset = the sum of the padded sizes before it, the padding
 *   of the infos and of every tensor (the last one too) to the alignment:
 *   gguf-py/gguf/gguf_writer.py, GGUFWriter.write_header_to_file,
 *   write_kv_data_to_file, write_ti_data_to_file, write_tensors_to_file;
 * - general.alignment is written only when it is not the default, as a u32:
 *   GGUFWriter.add_custom_alignment;
 * - a reader refuses a tensor whose offset is not that padded sum ("tensor '%s'
 *   has offset ..., expected ..."), duplicate keys and tensor names, names of
 *   GGML_MAX_NAME bytes or more, more than GGML_MAX_DIMS dims, and an ne[0]
 *   that is not a multiple of the type's block: ggml/src/gguf.cpp,
 *   gguf_init_from_file_impl.
 *
 * The kv entries are serialised as they are added (the file's kv section is
 * that buffer); the header and the tensor infos are built at write time, when
 * the offsets are known. */
#include "dpoc/gguf_write.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "dpoc/dtype.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF writer writes tensor bytes as they are in memory: a little-endian host is required"
#endif

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
/* u32 magic, u32 version, u64 tensor count, u64 kv count */
#define GGUF_HEADER_BYTES 24
/* Zeros written for padding, a block at a time (any alignment is a multiple or a divisor). */
#define ZERO_BLOCK 256

/* A growable byte buffer. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} gbuf;

typedef struct {
    char *name;
    uint32_t type;
    size_t n_dims;
    size_t ne[DPOC_GGUF_MAX_DIMS]; /* ne[0] fastest */
    size_t nbytes;
    const void *data;
} wtensor;

struct dpoc_gguf_writer {
    gbuf kv; /* the serialised kv entries, in order */
    char **keys;
    size_t n_kv, cap_kv;
    wtensor *t;
    size_t n_t, cap_t;
    size_t alignment;
};

/* ---- byte buffer: little-endian puts; -1 on allocation failure or overflow ---- */

static int gbuf_put(gbuf *b, const void *data, size_t n) {
    if (n > SIZE_MAX - b->len) return -1;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) {
            if (cap > SIZE_MAX / 2) {
                cap = b->len + n;
                break;
            }
            cap *= 2;
        }
        uint8_t *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static int put_u32(gbuf *b, uint32_t v) {
    uint8_t x[4];
    for (size_t i = 0; i < sizeof x; i++) x[i] = (uint8_t)(v >> (8 * i));
    return gbuf_put(b, x, sizeof x);
}

static int put_u64(gbuf *b, uint64_t v) {
    uint8_t x[8];
    for (size_t i = 0; i < sizeof x; i++) x[i] = (uint8_t)(v >> (8 * i));
    return gbuf_put(b, x, sizeof x);
}

/* A GGUF string: u64 byte length, the bytes, no NUL. */
static int put_str(gbuf *b, const char *s, size_t n) {
    if (put_u64(b, (uint64_t)n)) return -1;
    return gbuf_put(b, s, n);
}

/* The bytes of one numeric element of type t (little-endian), from host memory. */
static size_t vtype_size(dpoc_gguf_vtype t) {
    switch (t) {
    case DPOC_GGUF_UINT8:
    case DPOC_GGUF_INT8:
    case DPOC_GGUF_BOOL: return 1;
    case DPOC_GGUF_UINT16:
    case DPOC_GGUF_INT16: return 2;
    case DPOC_GGUF_UINT32:
    case DPOC_GGUF_INT32:
    case DPOC_GGUF_FLOAT32: return 4;
    case DPOC_GGUF_UINT64:
    case DPOC_GGUF_INT64:
    case DPOC_GGUF_FLOAT64: return 8;
    default: return 0; /* STRING, ARRAY, unknown */
    }
}

static int put_num(gbuf *b, const void *v, size_t size) {
    uint64_t x = 0;
    memcpy(&x, v, size); /* little-endian host: the low bytes hold the value */
    if (size == sizeof(uint64_t)) return put_u64(b, x);
    uint8_t bytes[sizeof(uint64_t)];
    for (size_t i = 0; i < size; i++) bytes[i] = (uint8_t)(x >> (8 * i));
    return gbuf_put(b, bytes, size);
}

/* ---- writer ---- */

int dpoc_gguf_writer_new(dpoc_gguf_writer **w, dpoc_err *err) {
    *w = dpoc_calloc(1, sizeof **w, "GGUF writer", err);
    if (!*w) return DPOC_ENOMEM;
    (*w)->alignment = DPOC_GGUF_DEFAULT_ALIGNMENT;
    return 0;
}

void dpoc_gguf_writer_free(dpoc_gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) free(w->keys[i]);
    for (size_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->keys);
    free(w->t);
    free(w->kv.p);
    free(w);
}

size_t dpoc_gguf_writer_n_kv(const dpoc_gguf_writer *w) { return w->n_kv; }
size_t dpoc_gguf_writer_n_tensors(const dpoc_gguf_writer *w) { return w->n_t; }

/* Grows an array of elem-sized items to hold one more; -1 on failure. */
static int grow(void **arr, size_t *cap, size_t n, size_t elem) {
    if (n < *cap) return 0;
    size_t c = *cap ? *cap * 2 : 16;
    if (c > SIZE_MAX / elem) return -1;
    void *p = realloc(*arr, c * elem);
    if (!p) return -1;
    *arr = p;
    *cap = c;
    return 0;
}

/* Starts a kv entry: checks the key, serialises the key and the value type.
 * *len0 is where the entry starts, to roll back to if the value fails. */
static int kv_begin(dpoc_gguf_writer *w, const char *key, dpoc_gguf_vtype type, size_t *len0, dpoc_err *err) {
    if (!key || !key[0]) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: empty metadata key");
    for (size_t i = 0; i < w->n_kv; i++)
        if (!strcmp(w->keys[i], key))
            return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s' is already set", key);
    *len0 = w->kv.len;
    if (grow((void **)&w->keys, &w->cap_kv, w->n_kv, sizeof *w->keys) || put_str(&w->kv, key, strlen(key)) ||
        put_u32(&w->kv, (uint32_t)type)) {
        w->kv.len = *len0;
        return dpoc_errf(err, DPOC_ENOMEM, "GGUF writer: out of memory adding key '%s'", key);
    }
    return 0;
}

/* Ends a kv entry: rc != 0 (a failed value) rolls the buffer back. */
static int kv_end(dpoc_gguf_writer *w, const char *key, size_t len0, int rc, dpoc_err *err) {
    char *k = rc ? NULL : strdup(key);
    if (!k) {
        w->kv.len = len0;
        return dpoc_errf(err, DPOC_ENOMEM, "GGUF writer: out of memory adding key '%s'", key);
    }
    w->keys[w->n_kv++] = k;
    return 0;
}

static int add_scalar(dpoc_gguf_writer *w, const char *key, dpoc_gguf_vtype type, const void *v, dpoc_err *err) {
    size_t len0;
    DPOC_TRY(kv_begin(w, key, type, &len0, err));
    return kv_end(w, key, len0, put_num(&w->kv, v, vtype_size(type)), err);
}

int dpoc_gguf_writer_add_str(dpoc_gguf_writer *w, const char *key, const char *value, dpoc_err *err) {
    if (!value) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s' has no string value", key ? key : "");
    size_t len0;
    DPOC_TRY(kv_begin(w, key, DPOC_GGUF_STRING, &len0, err));
    return kv_end(w, key, len0, put_str(&w->kv, value, strlen(value)), err);
}

int dpoc_gguf_writer_add_u32(dpoc_gguf_writer *w, const char *key, uint32_t value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_UINT32, &value, err);
}

int dpoc_gguf_writer_add_i32(dpoc_gguf_writer *w, const char *key, int32_t value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_INT32, &value, err);
}

int dpoc_gguf_writer_add_u64(dpoc_gguf_writer *w, const char *key, uint64_t value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_UINT64, &value, err);
}

int dpoc_gguf_writer_add_i64(dpoc_gguf_writer *w, const char *key, int64_t value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_INT64, &value, err);
}

int dpoc_gguf_writer_add_f32(dpoc_gguf_writer *w, const char *key, float value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_FLOAT32, &value, err);
}

int dpoc_gguf_writer_add_f64(dpoc_gguf_writer *w, const char *key, double value, dpoc_err *err) {
    return add_scalar(w, key, DPOC_GGUF_FLOAT64, &value, err);
}

int dpoc_gguf_writer_add_bool(dpoc_gguf_writer *w, const char *key, int value, dpoc_err *err) {
    /* one byte, 0 or 1 (gguf-py packs "?") */
    const uint8_t b = value != 0;
    return add_scalar(w, key, DPOC_GGUF_BOOL, &b, err);
}

int dpoc_gguf_writer_add_str_array(dpoc_gguf_writer *w, const char *key, const char *const *values, size_t n,
                                   dpoc_err *err) {
    if (n && !values) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s' has no values", key ? key : "");
    for (size_t i = 0; i < n; i++)
        if (!values[i])
            return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s': string %zu is NULL", key ? key : "", i);
    size_t len0;
    DPOC_TRY(kv_begin(w, key, DPOC_GGUF_ARRAY, &len0, err));
    int bad = put_u32(&w->kv, DPOC_GGUF_STRING) || put_u64(&w->kv, (uint64_t)n);
    for (size_t i = 0; i < n && !bad; i++) bad = put_str(&w->kv, values[i], strlen(values[i]));
    return kv_end(w, key, len0, bad, err);
}

int dpoc_gguf_writer_add_array(dpoc_gguf_writer *w, const char *key, dpoc_gguf_vtype elem_type, const void *data,
                               size_t n, dpoc_err *err) {
    const size_t size = vtype_size(elem_type);
    if (!size)
        return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s': element type %d is not a numeric type",
                         key ? key : "", (int)elem_type);
    if (n && !data) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: key '%s' has no values", key ? key : "");
    size_t len0;
    DPOC_TRY(kv_begin(w, key, DPOC_GGUF_ARRAY, &len0, err));
    int bad = put_u32(&w->kv, (uint32_t)elem_type) || put_u64(&w->kv, (uint64_t)n);
    const uint8_t *p = data;
    for (size_t i = 0; i < n && !bad; i++) {
        if (elem_type == DPOC_GGUF_BOOL) {
            const uint8_t b = p[i] != 0;
            bad = gbuf_put(&w->kv, &b, 1);
        } else {
            bad = put_num(&w->kv, p + i * size, size);
        }
    }
    return kv_end(w, key, len0, bad, err);
}

int dpoc_gguf_writer_set_alignment(dpoc_gguf_writer *w, size_t alignment, dpoc_err *err) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > UINT32_MAX)
        return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: alignment %zu is not a power of two that fits a u32",
                         alignment);
    DPOC_TRY(dpoc_gguf_writer_add_u32(w, "general.alignment", (uint32_t)alignment, err));
    w->alignment = alignment;
    return 0;
}

int dpoc_gguf_writer_add_tensor(dpoc_gguf_writer *w, const char *name, uint32_t type, size_t n_dims,
                                const size_t *shape, const void *data, dpoc_err *err) {
    const size_t len = name ? strlen(name) : 0;
    if (len == 0 || len >= DPOC_GGUF_MAX_NAME)
        return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor name '%s' must have 1 to %d bytes", name ? name : "",
                         DPOC_GGUF_MAX_NAME - 1);
    for (size_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name))
            return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' is already added", name);
    const size_t block = dpoc_dtype_block(type);
    if (!block) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' has unknown type id %u", name, type);
    if (n_dims < 1 || n_dims > DPOC_GGUF_MAX_DIMS || !shape)
        return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' has %zu dims (or no shape); 1 to %d are allowed",
                         name, n_dims, DPOC_GGUF_MAX_DIMS);
    wtensor t = {.type = type, .n_dims = n_dims, .data = data};
    size_t nel = 1;
    for (size_t d = 0; d < DPOC_GGUF_MAX_DIMS; d++) t.ne[d] = 1;
    for (size_t d = 0; d < n_dims; d++) {
        const size_t n = shape[n_dims - 1 - d];
        if (n == 0) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' has a dimension of size 0", name);
        /* ggml counts elements in int64_t */
        if (nel > (size_t)INT64_MAX / n)
            return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' has too many elements", name);
        t.ne[d] = n;
        nel *= n;
    }
    if (t.ne[0] % block != 0)
        return dpoc_errf(err, DPOC_EINPUT,
                         "GGUF writer: tensor '%s': row length %zu is not a multiple of %s's block %zu", name, t.ne[0],
                         dpoc_dtype_name(type), block);
    const size_t row = dpoc_dtype_row_bytes(type, t.ne[0]), rows = nel / t.ne[0];
    if (rows > SIZE_MAX / row) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' is too large", name);
    t.nbytes = row * rows;
    if (!data) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: tensor '%s' has no data", name);
    if (grow((void **)&w->t, &w->cap_t, w->n_t, sizeof *w->t) || !(t.name = strdup(name)))
        return dpoc_errf(err, DPOC_ENOMEM, "GGUF writer: out of memory adding tensor '%s'", name);
    w->t[w->n_t++] = t;
    return 0;
}

/* ---- writing ---- */

/* n rounded up to a multiple of a (a power of two); 0 on overflow (n > 0). */
static size_t pad_to(size_t n, size_t a) {
    if (n > SIZE_MAX - (a - 1)) return 0;
    return (n + a - 1) & ~(a - 1);
}

/* The header, the kv entries and the tensor infos, padded to the alignment. */
static int build_head(const dpoc_gguf_writer *w, gbuf *h, dpoc_err *err) {
    int bad = put_u32(h, GGUF_MAGIC) || put_u32(h, DPOC_GGUF_WRITE_VERSION) || put_u64(h, (uint64_t)w->n_t) ||
              put_u64(h, (uint64_t)w->n_kv) || gbuf_put(h, w->kv.p, w->kv.len);
    size_t off = 0;
    for (size_t i = 0; i < w->n_t && !bad; i++) {
        const wtensor *t = &w->t[i];
        bad = put_str(h, t->name, strlen(t->name)) || put_u32(h, (uint32_t)t->n_dims);
        for (size_t d = 0; d < t->n_dims && !bad; d++) bad = put_u64(h, (uint64_t)t->ne[d]);
        bad = bad || put_u32(h, t->type) || put_u64(h, (uint64_t)off);
        const size_t padded = pad_to(t->nbytes, w->alignment);
        if (!padded || padded > SIZE_MAX - off)
            return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: the data section is too large at tensor '%s'", t->name);
        off += padded;
    }
    const size_t end = bad ? 0 : pad_to(h->len, w->alignment);
    if (bad || !end) return dpoc_errf(err, DPOC_ENOMEM, "GGUF writer: out of memory building the header");
    static const uint8_t zeros[ZERO_BLOCK];
    while (h->len < end)
        if (gbuf_put(h, zeros, end - h->len < ZERO_BLOCK ? end - h->len : ZERO_BLOCK))
            return dpoc_errf(err, DPOC_ENOMEM, "GGUF writer: out of memory building the header");
    return 0;
}

/* n zero bytes; 0 when written. */
static int write_zeros(FILE *f, size_t n) {
    static const uint8_t zeros[ZERO_BLOCK];
    while (n) {
        const size_t k = n < ZERO_BLOCK ? n : ZERO_BLOCK;
        if (fwrite(zeros, 1, k, f) != k) return -1;
        n -= k;
    }
    return 0;
}

/* Writes the whole file to tmp (already named; created here). */
static int write_tmp(const dpoc_gguf_writer *w, const gbuf *head, const char *tmp, const char *path, dpoc_err *err) {
    FILE *f = fopen(tmp, "wb");
    if (!f) return dpoc_errf(err, DPOC_EIO, "%s: cannot create the temporary file %s: %s", path, tmp, strerror(errno));
    int ok = fwrite(head->p, 1, head->len, f) == head->len;
    for (size_t i = 0; i < w->n_t && ok; i++) {
        const wtensor *t = &w->t[i];
        ok = fwrite(t->data, 1, t->nbytes, f) == t->nbytes &&
             write_zeros(f, pad_to(t->nbytes, w->alignment) - t->nbytes) == 0;
    }
    int e = ok ? 0 : errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (!ok) {
        remove(tmp);
        return dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", path, e ? strerror(e) : "short write");
    }
    return 0;
}

int dpoc_gguf_writer_write(const dpoc_gguf_writer *w, const char *path, dpoc_err *err) {
    /* the temporary file sits in path's directory, so that rename() replaces path atomically */
    const char *slash = path ? strrchr(path, '/') : NULL;
    const char *base = slash ? slash + 1 : path;
    if (!path || !base[0]) return dpoc_errf(err, DPOC_EINPUT, "GGUF writer: '%s' is not a file path", path ? path : "");
    const size_t dir_len = slash ? (slash == path ? 1 : (size_t)(slash - path)) : 1;
    char *dir = dpoc_malloc(dir_len + 1, "GGUF output directory name", err);
    char *tmp = dpoc_malloc(dir_len + strlen(base) + sizeof "/..tmp", "GGUF temporary file name", err);
    gbuf head = {0};
    int rc = dir && tmp ? 0 : DPOC_ENOMEM;
    if (!rc) {
        if (slash) memcpy(dir, path, dir_len);
        else dir[0] = '.';
        dir[dir_len] = '\0';
        sprintf(tmp, "%s/.%s.tmp", strcmp(dir, "/") ? dir : "", base);
        rc = build_head(w, &head, err);
    }
    if (!rc) rc = write_tmp(w, &head, tmp, path, err);
    if (!rc) rc = dpoc_commit_file(tmp, path, err); /* removes tmp on failure */
    if (!rc) rc = dpoc_fsync_path(dir, 1, err);
    free(head.p);
    free(dir);
    free(tmp);
    return rc;
}

void dpoc_gguf_permute_rows(float *dst, const float *src, size_t rows, size_t cols, size_t n_head) {
    const size_t hd = rows / n_head, half = hd / 2;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t s = 0; s < 2; s++)
                memcpy(dst + (h * hd + 2 * j + s) * cols, src + (h * hd + s * half + j) * cols, cols * sizeof *dst);
}
