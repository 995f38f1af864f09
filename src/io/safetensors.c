/* safetensors reader and F32 writer.
 *
 * Everything read from a file is validated before use: the 8-byte header length
 * against the file size and ST_MAX_HEADER_BYTES, the JSON text (an object of tensor
 * entries and an optional "__metadata__" object of strings), every shape and offset
 * (exact non-negative integers <= 2^53, sizes computed with overflow checks), offsets
 * inside the data section, byte size == numel x dtype size, no two tensors overlapping,
 * no duplicate names. Tensors point into a read-only private mapping of the file;
 * the data section may be unaligned, so conversions go through memcpy / byte loads.
 *
 * After st_open_file / st_open_dir, m->tensors is sorted by name (st_find bsearches). */
#include "dpoc/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"

/* 2^53: larger JSON numbers are not exact doubles, so neither reader nor writer takes them. */
#define ST_MAX_JSON_INT 9007199254740992.0
#define ST_MAX_JSON_UINT ((uint64_t)1 << 53)
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

/* ---- dtypes ---- */

typedef struct {
    const char *name;
    st_dtype dtype;
    unsigned bits; /* element size in bits (F4 and F6 are packed) */
} st_dtype_info;

/* The dtypes of the reference implementation (safetensors 0.8). */
static const st_dtype_info st_dtypes[] = {
    {"F32", ST_F32, 32},         {"F16", ST_F16, 16},         {"BF16", ST_BF16, 16},
    {"BOOL", ST_OTHER, 8},       {"U8", ST_OTHER, 8},         {"I8", ST_OTHER, 8},
    {"F8_E5M2", ST_OTHER, 8},    {"F8_E4M3", ST_OTHER, 8},    {"F8_E8M0", ST_OTHER, 8},
    {"F8_E4M3FNUZ", ST_OTHER, 8}, {"F8_E5M2FNUZ", ST_OTHER, 8}, {"I16", ST_OTHER, 16},
    {"U16", ST_OTHER, 16},       {"I32", ST_OTHER, 32},       {"U32", ST_OTHER, 32},
    {"F64", ST_OTHER, 64},       {"I64", ST_OTHER, 64},       {"U64", ST_OTHER, 64},
    {"C64", ST_OTHER, 64},       {"F4", ST_OTHER, 4},         {"F6_E2M3", ST_OTHER, 6},
    {"F6_E3M2", ST_OTHER, 6},
};

static const st_dtype_info *dtype_lookup(const char *s) {
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(st_dtypes[i].name, s) == 0) return &st_dtypes[i];
    return NULL;
}

/* ---- small helpers ---- */

/* "[4, 8]" into buf (truncated with "..." if it does not fit). */
static const char *fmt_shape(char *buf, size_t n, const size_t *shape, size_t ndim) {
    size_t pos = 0;
    int w = snprintf(buf, n, "[");
    pos = w > 0 ? (size_t)w : 0;
    for (size_t i = 0; i < ndim && pos < n; i++) {
        w = snprintf(buf + pos, n - pos, "%s%zu", i ? ", " : "", shape[i]);
        if (w < 0) break;
        pos += (size_t)w;
    }
    if (pos < n) snprintf(buf + pos, n - pos, "]");
    return buf;
}

/* An exact non-negative integer <= 2^53 (JSON numbers are doubles in cJSON). */
static bool json_to_size(const cJSON *item, size_t *out) {
    if (!cJSON_IsNumber(item)) return false;
    double d = item->valuedouble;
    if (!(d >= 0.0) || d > ST_MAX_JSON_INT || d != (double)(uint64_t)d) return false;
    uint64_t u = (uint64_t)d;
    if (u > SIZE_MAX) return false;
    *out = (size_t)u;
    return true;
}

/* Describes a JSON value for a message ("-3", "2.5", "a string", ...). */
static const char *json_desc(const cJSON *item, char *buf, size_t n) {
    if (!item) snprintf(buf, n, "missing");
    else if (cJSON_IsNumber(item)) {
        snprintf(buf, n, "%.15g", item->valuedouble); /* shortest that reads back */
        if (strtod(buf, NULL) != item->valuedouble) snprintf(buf, n, "%.17g", item->valuedouble);
    }
    else if (cJSON_IsString(item)) snprintf(buf, n, "a string");
    else if (cJSON_IsArray(item)) snprintf(buf, n, "an array");
    else if (cJSON_IsObject(item)) snprintf(buf, n, "an object");
    else if (cJSON_IsBool(item)) snprintf(buf, n, "a boolean");
    else if (cJSON_IsNull(item)) snprintf(buf, n, "null");
    else snprintf(buf, n, "invalid");
    return buf;
}

static uint64_t load_u64_le(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* ---- header parsing ---- */

typedef struct {
    size_t begin, end;
    const char *name;
} st_span;

static int span_cmp_name(const void *a, const void *b) {
    return strcmp(((const st_span *)a)->name, ((const st_span *)b)->name);
}

static int span_cmp_offset(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int check_metadata(const cJSON *meta, const char *where, dpoc_err *err) {
    if (!cJSON_IsObject(meta))
        return dpoc_errf(err, DPOC_EINPUT, "%s: '__metadata__' must be an object of strings", where);
    const cJSON *it;
    cJSON_ArrayForEach(it, meta) {
        if (!cJSON_IsString(it))
            return dpoc_errf(err, DPOC_EINPUT, "%s: '__metadata__' entry '%s' is not a string", where,
                             it->string ? it->string : "");
    }
    return 0;
}

/* Validates one tensor entry into t (t->name already set). */
static int parse_entry(const cJSON *e, const uint8_t *data, size_t data_len, const char *where,
                       st_tensor *t, st_span *span, dpoc_err *err) {
    const char *name = t->name;
    char desc[64];
    if (!cJSON_IsObject(e))
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': entry is not an object", where, name);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!dt) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': missing 'dtype'", where, name);
    if (!cJSON_IsString(dt) || !dt->valuestring)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': 'dtype' is %s, not a string", where, name,
                         json_desc(dt, desc, sizeof desc));
    const st_dtype_info *info = dtype_lookup(dt->valuestring);
    if (!info)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': unknown dtype '%.64s'", where, name,
                         dt->valuestring);
    t->dtype = info->dtype;
    snprintf(t->dtype_str, sizeof t->dtype_str, "%s", info->name);

    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!sh) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': missing 'shape'", where, name);
    if (!cJSON_IsArray(sh))
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': 'shape' is %s, not an array", where, name,
                         json_desc(sh, desc, sizeof desc));
    size_t ndim = 0, numel = 1;
    const cJSON *it;
    cJSON_ArrayForEach(it, sh) {
        if (ndim >= ST_MAX_DIMS)
            return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': shape has more than %d dimensions",
                             where, name, ST_MAX_DIMS);
        size_t d;
        if (!json_to_size(it, &d))
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: tensor '%s': shape[%zu] is %s, not a non-negative integer <= 2^53",
                             where, name, ndim, json_desc(it, desc, sizeof desc));
        t->shape[ndim++] = d;
    }
    t->ndim = ndim;
    bool overflow = false;
    for (size_t i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(numel, t->shape[i], &numel)) overflow = true;
    char shp[256];
    fmt_shape(shp, sizeof shp, t->shape, ndim);
    size_t bits = 0;
    if (overflow || __builtin_mul_overflow(numel, (size_t)info->bits, &bits))
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': shape %s of %s is too large", where, name,
                         shp, info->name);
    if (bits % 8 != 0)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: tensor '%s': shape %s of %s is not a whole number of bytes", where, name,
                         shp, info->name);
    t->numel = numel;
    t->nbytes = bits / 8;

    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!off) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': missing 'data_offsets'", where, name);
    size_t begin = 0, end = 0;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
        !json_to_size(cJSON_GetArrayItem(off, 0), &begin) ||
        !json_to_size(cJSON_GetArrayItem(off, 1), &end))
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: tensor '%s': 'data_offsets' must be an array of two non-negative "
                         "integers <= 2^53",
                         where, name);
    if (begin > end)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': data_offsets [%zu, %zu] end before they begin",
                         where, name, begin, end);
    if (end - begin != t->nbytes)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: tensor '%s': data_offsets [%zu, %zu] do not match shape %s of %s (%zu bytes)",
                         where, name, begin, end, shp, info->name, t->nbytes);
    if (end > data_len)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: tensor '%s': data_offsets [%zu, %zu] are beyond the data section (%zu bytes)",
                         where, name, begin, end, data_len);
    t->data = data ? data + begin : NULL;
    span->begin = begin;
    span->end = end;
    span->name = name;
    return 0;
}

int st_parse_header(const char *hdr, size_t hdr_len, const uint8_t *data, size_t data_len,
                    size_t file_index, const char *where, st_tensor **tensors, size_t *n,
                    dpoc_err *err) {
    if (!where) where = "safetensors";
    DPOC_CHECK(tensors && n && (hdr || hdr_len == 0) && (data || data_len == 0), err);
    if (hdr_len > ST_MAX_HEADER_BYTES)
        return dpoc_errf(err, DPOC_EINPUT, "%s: header of %zu bytes is larger than the limit of %zu",
                         where, hdr_len, ST_MAX_HEADER_BYTES);

    /* A NUL-terminated copy: cJSON never reads past it, and the tail can be checked. */
    char *text = dpoc_malloc(hdr_len + 1, "safetensors header", err);
    if (!text) return DPOC_ENOMEM;
    if (hdr_len) memcpy(text, hdr, hdr_len);
    text[hdr_len] = '\0';

    int rc = 0;
    st_span *spans = NULL;
    size_t base = *n, filled = 0;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, hdr_len, &end, 0);
    if (!root) {
        size_t at = end && end >= text && end <= text + hdr_len ? (size_t)(end - text) : 0;
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: header is not valid JSON (error near byte %zu of %zu)",
                       where, at, hdr_len);
        goto out;
    }
    for (const char *p = end; p && p < text + hdr_len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: header has data after the JSON at byte %zu",
                           where, (size_t)(p - text));
            goto out;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: header is not a JSON object", where);
        goto out;
    }

    size_t count = 0;
    bool seen_meta = false;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (e->string && strcmp(e->string, "__metadata__") == 0) {
            if (seen_meta) {
                rc = dpoc_errf(err, DPOC_EINPUT, "%s: header has '__metadata__' twice", where);
                goto out;
            }
            seen_meta = true;
            if ((rc = check_metadata(e, where, err))) goto out;
        } else {
            count++;
        }
    }
    if (count == 0) goto out;

    size_t total, bytes;
    if (__builtin_add_overflow(base, count, &total) ||
        __builtin_mul_overflow(total, sizeof(st_tensor), &bytes)) {
        rc = dpoc_errf(err, DPOC_ENOMEM, "%s: too many tensors", where);
        goto out;
    }
    st_tensor *grown = realloc(*tensors, bytes);
    if (!grown) {
        rc = dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory for %zu tensors", where, total);
        goto out;
    }
    *tensors = grown;
    memset(grown + base, 0, count * sizeof(st_tensor));
    spans = dpoc_calloc(count, sizeof *spans, "safetensors spans", err);
    if (!spans) {
        rc = DPOC_ENOMEM;
        goto out;
    }

    cJSON_ArrayForEach(e, root) {
        const char *key = e->string ? e->string : "";
        if (strcmp(key, "__metadata__") == 0) continue;
        st_tensor *t = &grown[base + filled];
        t->name = strdup(key);
        if (!t->name) {
            rc = dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory for tensor names", where);
            goto out;
        }
        filled++;
        t->file_index = file_index;
        if ((rc = parse_entry(e, data, data_len, where, t, &spans[filled - 1], err))) goto out;
    }

    qsort(spans, count, sizeof *spans, span_cmp_name);
    for (size_t i = 1; i < count; i++) {
        if (strcmp(spans[i - 1].name, spans[i].name) == 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': duplicate tensor name", where,
                           spans[i].name);
            goto out;
        }
    }
    qsort(spans, count, sizeof *spans, span_cmp_offset);
    const st_span *last = NULL; /* the non-empty span reaching furthest so far */
    for (size_t i = 0; i < count; i++) {
        const st_span *s = &spans[i];
        if (s->begin == s->end) continue; /* empty tensors occupy no bytes */
        if (last && s->begin < last->end) {
            rc = dpoc_errf(err, DPOC_EINPUT,
                           "%s: tensor '%s': data_offsets [%zu, %zu] overlap tensor '%s' [%zu, %zu]",
                           where, s->name, s->begin, s->end, last->name, last->begin, last->end);
            goto out;
        }
        if (!last || s->end > last->end) last = s;
    }
    *n = total;

out:
    if (rc) {
        for (size_t i = 0; i < filled; i++) {
            free((*tensors)[base + i].name);
            (*tensors)[base + i].name = NULL;
        }
    }
    free(spans);
    cJSON_Delete(root);
    free(text);
    return rc;
}

/* ---- opening files ---- */

/* Maps path read-only and parses it as shard number m->n_files (appended). */
static int open_one(st_model *m, const char *path, dpoc_err *err) {
    st_file *files = realloc(m->files, (m->n_files + 1) * sizeof *files);
    if (!files) return dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory", path);
    m->files = files;
    size_t idx = m->n_files++;
    st_file *f = &files[idx];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) return dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory", path);

    void *map;
    size_t size;
    DPOC_TRY(dpoc_map_file(path, 8, "a safetensors file", &map, &size, err));
    f->map = map;
    f->map_len = size;

    const uint8_t *bytes = map;
    uint64_t hdr_len = load_u64_le(bytes);
    if (hdr_len > ST_MAX_HEADER_BYTES)
        return dpoc_errf(err, DPOC_EINPUT, "%s: header length %llu is larger than the limit of %zu",
                         path, (unsigned long long)hdr_len, ST_MAX_HEADER_BYTES);
    if (hdr_len > size - 8)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: header length %llu is beyond the end of the file (%zu bytes)", path,
                         (unsigned long long)hdr_len, size);
    size_t h = (size_t)hdr_len;
    return st_parse_header((const char *)bytes + 8, h, bytes + 8 + h, size - 8 - h, idx, path,
                           &m->tensors, &m->n_tensors, err);
}

static int tensor_cmp(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int tensor_key_cmp(const void *key, const void *elem) {
    return strcmp((const char *)key, ((const st_tensor *)elem)->name);
}

/* Sorts the tensors by name and refuses a name present in two files. */
static int finish(st_model *m, dpoc_err *err) {
    if (m->n_tensors > 1) qsort(m->tensors, m->n_tensors, sizeof *m->tensors, tensor_cmp);
    for (size_t i = 1; i < m->n_tensors; i++) {
        const st_tensor *a = &m->tensors[i - 1], *b = &m->tensors[i];
        if (strcmp(a->name, b->name) == 0)
            return dpoc_errf(err, DPOC_EINPUT, "tensor '%s' is in both %s and %s", b->name,
                             m->files[a->file_index].path, m->files[b->file_index].path);
    }
    return 0;
}

int st_open_file(st_model *m, const char *path, dpoc_err *err) {
    DPOC_CHECK(m && path, err);
    memset(m, 0, sizeof *m);
    int rc = open_one(m, path, err);
    if (!rc) rc = finish(m, err);
    if (rc) st_close(m);
    return rc;
}

typedef struct {
    const char *tensor; /* into the index JSON */
    size_t shard;
} st_index_entry;

static int index_entry_cmp(const void *a, const void *b) {
    return strcmp(((const st_index_entry *)a)->tensor, ((const st_index_entry *)b)->tensor);
}

static int index_key_cmp(const void *key, const void *elem) {
    return strcmp((const char *)key, ((const st_index_entry *)elem)->tensor);
}

static bool plain_file_name(const char *s) {
    return s[0] != '\0' && !strchr(s, '/') && !strstr(s, "..");
}

static int open_index(st_model *m, const char *dir, const char *index_path, dpoc_err *err) {
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_read_file(index_path, &text, &len, err));
    int rc = 0;
    st_index_entry *entries = NULL;
    const char **shards = NULL;
    size_t n_entries = 0, n_shards = 0;
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root || !cJSON_IsObject(root)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: not a JSON object", index_path);
        goto out;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: 'weight_map' %s", index_path,
                       wm ? "is not an object" : "is missing");
        goto out;
    }
    size_t count = (size_t)cJSON_GetArraySize(wm);
    if (count == 0) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: 'weight_map' is empty", index_path);
        goto out;
    }
    entries = dpoc_calloc(count, sizeof *entries, "safetensors index", err);
    shards = dpoc_calloc(count, sizeof *shards, "safetensors index", err);
    if (!entries || !shards) {
        rc = DPOC_ENOMEM;
        goto out;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, wm) {
        const char *tname = it->string ? it->string : "";
        if (!cJSON_IsString(it) || !it->valuestring) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': shard name is not a string", index_path,
                           tname);
            goto out;
        }
        const char *shard = it->valuestring;
        if (!plain_file_name(shard)) {
            rc = dpoc_errf(err, DPOC_EINPUT,
                           "%s: tensor '%s': shard '%s' is not a plain file name (no '/' or '..')",
                           index_path, tname, shard);
            goto out;
        }
        size_t s = 0;
        while (s < n_shards && strcmp(shards[s], shard) != 0) s++;
        if (s == n_shards) shards[n_shards++] = shard;
        entries[n_entries].tensor = tname;
        entries[n_entries].shard = s;
        n_entries++;
    }
    qsort(entries, n_entries, sizeof *entries, index_entry_cmp);
    for (size_t i = 1; i < n_entries; i++) {
        if (strcmp(entries[i - 1].tensor, entries[i].tensor) == 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is listed twice", index_path,
                           entries[i].tensor);
            goto out;
        }
    }

    for (size_t s = 0; s < n_shards; s++) {
        char path[4096];
        if ((rc = dpoc_path_join(path, sizeof path, dir, shards[s], err))) goto out;
        if ((rc = open_one(m, path, err))) {
            dpoc_err_prefix(err, "%s names shard '%s'", index_path, shards[s]);
            goto out;
        }
    }
    if ((rc = finish(m, err))) goto out;

    for (size_t i = 0; i < m->n_tensors; i++) {
        const st_tensor *t = &m->tensors[i];
        const char *in = m->files[t->file_index].path;
        const st_index_entry *e = bsearch(t->name, entries, n_entries, sizeof *entries, index_key_cmp);
        if (!e) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is not listed in %s", in, t->name,
                           index_path);
            goto out;
        }
        if (e->shard != t->file_index) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is in %s but the index puts it in '%s'",
                           index_path, t->name, in, shards[e->shard]);
            goto out;
        }
    }
    for (size_t i = 0; i < n_entries; i++) {
        if (!bsearch(entries[i].tensor, m->tensors, m->n_tensors, sizeof *m->tensors, tensor_key_cmp)) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is missing from its shard %s", index_path,
                           entries[i].tensor, m->files[entries[i].shard].path);
            goto out;
        }
    }

out:
    free(entries);
    free(shards);
    cJSON_Delete(root);
    free(text);
    return rc;
}

int st_open_dir(st_model *m, const char *dir, dpoc_err *err) {
    DPOC_CHECK(m && dir, err);
    memset(m, 0, sizeof *m);
    char single[4096], index[4096];
    DPOC_TRY(dpoc_path_join(single, sizeof single, dir, ST_SINGLE_NAME, err));
    DPOC_TRY(dpoc_path_join(index, sizeof index, dir, ST_INDEX_NAME, err));
    struct stat st;
    int rc;
    if (stat(single, &st) == 0) {
        rc = open_one(m, single, err);
        if (!rc) rc = finish(m, err);
    } else if (stat(index, &st) == 0) {
        rc = open_index(m, dir, index, err);
    } else {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: found neither %s nor %s", dir, ST_SINGLE_NAME,
                       ST_INDEX_NAME);
    }
    if (rc) st_close(m);
    return rc;
}

const st_tensor *st_find(const st_model *m, const char *name) {
    if (!m || !name || !m->tensors || m->n_tensors == 0) return NULL;
    return bsearch(name, m->tensors, m->n_tensors, sizeof *m->tensors, tensor_key_cmp);
}

void st_close(st_model *m) {
    if (!m) return;
    if (m->tensors)
        for (size_t i = 0; i < m->n_tensors; i++) free(m->tensors[i].name);
    free(m->tensors);
    if (m->files) {
        for (size_t i = 0; i < m->n_files; i++) {
            st_file *f = &m->files[i];
            if (f->map && f->map != MAP_FAILED && f->map_len) munmap(f->map, f->map_len);
            free(f->path);
        }
    }
    free(m->files);
    memset(m, 0, sizeof *m);
}

/* ---- conversion ---- */

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign; /* +-0 */
        } else {         /* subnormal: mant x 2^-24, renormalised */
            uint32_t e = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                e--;
            }
            bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf, nan (payload kept) */
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    return f32_from_bits(bits);
}

float st_bf16_to_f32(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

int st_read_f32(const st_tensor *t, float *dst, size_t ndim, const size_t *shape, dpoc_err *err) {
    DPOC_CHECK(t && t->name && (shape || ndim == 0), err);
    bool same = ndim == t->ndim && ndim <= ST_MAX_DIMS;
    for (size_t i = 0; same && i < ndim; i++) same = shape[i] == t->shape[i];
    if (!same) {
        char got[256], want[256];
        fmt_shape(got, sizeof got, t->shape, t->ndim <= ST_MAX_DIMS ? t->ndim : ST_MAX_DIMS);
        fmt_shape(want, sizeof want, shape, ndim);
        return dpoc_errf(err, DPOC_EINPUT, "tensor '%s' has shape %s, expected %s", t->name, got, want);
    }
    size_t esize;
    switch (t->dtype) {
    case ST_F32: esize = 4; break;
    case ST_F16:
    case ST_BF16: esize = 2; break;
    default:
        return dpoc_errf(err, DPOC_EINPUT, "tensor '%s' has dtype %s, which dpoc cannot convert to F32",
                         t->name, t->dtype_str[0] ? t->dtype_str : "?");
    }
    size_t need;
    DPOC_CHECK(!__builtin_mul_overflow(t->numel, esize, &need) && need == t->nbytes, err);
    if (t->numel == 0) return 0;
    DPOC_CHECK(dst && t->data, err);
    const uint8_t *p = t->data;
    size_t n = t->numel;
    if (t->dtype == ST_F32) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(dst, p, need);
#else
        for (size_t i = 0; i < n; i++, p += 4)
            dst[i] = f32_from_bits((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                   (uint32_t)p[3] << 24);
#endif
    } else if (t->dtype == ST_F16) {
        for (size_t i = 0; i < n; i++, p += 2) dst[i] = st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
    } else {
        for (size_t i = 0; i < n; i++, p += 2) dst[i] = st_bf16_to_f32((uint16_t)(p[0] | p[1] << 8));
    }
    return 0;
}

/* ---- writer ---- */

static int name_ptr_cmp(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Adds a JSON array of integers, written exactly as "%zu" (not through a double). */
static bool add_int_array(cJSON *obj, const char *key, const size_t *v, size_t n) {
    cJSON *arr = cJSON_CreateArray();
    if (!arr || !cJSON_AddItemToObject(obj, key, arr)) {
        cJSON_Delete(arr);
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%zu", v[i]);
        cJSON *num = cJSON_CreateRaw(buf);
        if (!num || !cJSON_AddItemToArray(arr, num)) {
            cJSON_Delete(num);
            return false;
        }
    }
    return true;
}

/* ---- writer (F32 or BF16) ---- */

/* fp32 to bfloat16, round to nearest even (torch's c10::round_to_nearest_even). */
static uint16_t f32_to_bf16_rne(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Writes fp32 tensors as F32 or (bf16) BF16, little-endian, one tensor at a time
 * converted into a buffer. Everything is validated before the file is created. */
static int st_write(const char *path, size_t n, const char *const *names, const float *const *data,
                    const size_t *ndims, const size_t (*shapes)[ST_MAX_DIMS], int bf16, dpoc_err *err) {
    const size_t elem = bf16 ? sizeof(uint16_t) : sizeof(float);
    DPOC_CHECK(path && (n == 0 || (names && data && ndims && shapes)), err);
    int rc = 0;
    cJSON *root = NULL;
    char *json = NULL;
    const char **sorted = NULL;
    size_t *nbytes = NULL;
    uint8_t *buf = NULL;
    FILE *f = NULL;
    size_t max_bytes = 0;

    nbytes = dpoc_calloc(n, sizeof *nbytes, "safetensors writer", err);
    sorted = dpoc_calloc(n, sizeof *sorted, "safetensors writer", err);
    if (!nbytes || !sorted) {
        rc = DPOC_ENOMEM;
        goto out;
    }
    /* Validate everything before the file is created. */
    size_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        const char *name = names[i];
        if (!name || strcmp(name, "__metadata__") == 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor %zu: invalid name '%s'", path, i, name ? name : "(null)");
            goto out;
        }
        if (ndims[i] > ST_MAX_DIMS) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s': %zu dimensions (at most %d)", path, name, ndims[i],
                           ST_MAX_DIMS);
            goto out;
        }
        size_t numel = 1;
        bool overflow = false;
        for (size_t d = 0; d < ndims[i]; d++) {
            if (__builtin_mul_overflow(numel, shapes[i][d], &numel)) overflow = true;
            if (shapes[i][d] > ST_MAX_JSON_UINT) overflow = true;
        }
        if (overflow || __builtin_mul_overflow(numel, elem, &nbytes[i]) ||
            __builtin_add_overflow(offset, nbytes[i], &offset) || offset > ST_MAX_JSON_UINT) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is too large", path, name);
            goto out;
        }
        if (numel && !data[i]) {
            rc = dpoc_errf(err, DPOC_EINTERNAL, "%s: tensor '%s' has no data", path, name);
            goto out;
        }
        if (nbytes[i] > max_bytes) max_bytes = nbytes[i];
        sorted[i] = name;
    }
    if (n > 1) qsort(sorted, n, sizeof *sorted, name_ptr_cmp);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: duplicate tensor name '%s'", path, sorted[i]);
            goto out;
        }
    }
    /* one tensor at a time is converted into buf */
    buf = dpoc_malloc(max_bytes ? max_bytes : 1, "safetensors conversion buffer", err);
    if (!buf) {
        rc = DPOC_ENOMEM;
        goto out;
    }

    root = cJSON_CreateObject();
    if (!root) goto nomem;
    offset = 0;
    for (size_t i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        if (!e || !cJSON_AddItemToObject(root, names[i], e)) {
            cJSON_Delete(e);
            goto nomem;
        }
        size_t off[2] = {offset, offset + nbytes[i]};
        offset += nbytes[i];
        if (!cJSON_AddStringToObject(e, "dtype", bf16 ? "BF16" : "F32") || !add_int_array(e, "shape", shapes[i], ndims[i]) ||
            !add_int_array(e, "data_offsets", off, 2))
            goto nomem;
    }
    json = cJSON_PrintUnformatted(root);
    if (!json) goto nomem;
    size_t json_len = strlen(json);
    size_t pad = (8 - json_len % 8) % 8; /* as the reference writer: spaces up to a multiple of 8 */
    uint64_t hdr_len = (uint64_t)json_len + pad;
    uint8_t len_bytes[8];
    for (int i = 0; i < 8; i++) len_bytes[i] = (uint8_t)(hdr_len >> (8 * i));

    f = fopen(path, "wb");
    if (!f) {
        rc = dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", path, strerror(errno));
        goto out;
    }
    static const char spaces[8] = "        ";
    bool ok = fwrite(len_bytes, 1, 8, f) == 8 && fwrite(json, 1, json_len, f) == json_len &&
              (pad == 0 || fwrite(spaces, 1, pad, f) == pad);
    for (size_t i = 0; ok && i < n; i++) {
        if (nbytes[i] == 0) continue;
        const size_t numel = nbytes[i] / elem;
        for (size_t k = 0; k < numel; k++) {
            uint32_t u;
            memcpy(&u, &data[i][k], sizeof u);
            if (bf16) u = f32_to_bf16_rne(data[i][k]);
            for (size_t byte = 0; byte < elem; byte++) buf[elem * k + byte] = (uint8_t)(u >> (8 * byte)); /* LE */
        }
        ok = fwrite(buf, 1, nbytes[i], f) == nbytes[i];
    }
    int e = ok ? 0 : errno;
    if (ok && fflush(f) != 0) {
        ok = false;
        e = errno;
    }
    if (fclose(f) != 0 && ok) {
        ok = false;
        e = errno;
    }
    f = NULL;
    if (!ok) {
        struct stat st; /* remove the partial file, never a device such as /dev/full */
        if (lstat(path, &st) == 0 && S_ISREG(st.st_mode)) remove(path);
        rc = dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", path, e ? strerror(e) : "short write");
    }
    goto out;

nomem:
    rc = dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory building the safetensors header", path);
out:
    free(json);
    cJSON_Delete(root);
    free(sorted);
    free(nbytes);
    free(buf);
    return rc;
}

int st_write_f32(const char *path, size_t n, const char *const *names, const float *const *data,
                 const size_t *ndims, const size_t (*shapes)[ST_MAX_DIMS], dpoc_err *err) {
    return st_write(path, n, names, data, ndims, shapes, 0, err);
}

int st_write_bf16(const char *path, size_t n, const char *const *names, const float *const *data,
                  const size_t *ndims, const size_t (*shapes)[ST_MAX_DIMS], dpoc_err *err) {
    return st_write(path, n, names, data, ndims, shapes, 1, err);
}
