/* A tiny GGUF writer for the tests (test_gguf.c, test_tensor_source.c): file
 * images built byte by byte from the format's layout (llama.cpp's gguf.md: header,
 * metadata entries, tensor infos, padding to the alignment, data), so that what
 * dpoc reads back is checked against what was written, not against dpoc. */
#ifndef DPOC_TEST_GGUF_IMAGE_H
#define DPOC_TEST_GGUF_IMAGE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gguf.h"
#include "testutil.h"

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

static inline void put(buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
}
static inline void put_le(buf *b, uint64_t v, size_t n) {
    uint8_t t[8];
    for (size_t i = 0; i < n; i++) t[i] = (uint8_t)(v >> (8 * i));
    put(b, t, n);
}
static inline void put_str(buf *b, const char *s) {
    put_le(b, strlen(s), 8);
    put(b, s, strlen(s));
}
static inline void put_f32(buf *b, float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    put_le(b, u, 4);
}
static inline void pad_to(buf *b, size_t align) {
    while (b->n % align) put_le(b, 0, 1);
}

typedef struct {
    const char *name;
    uint32_t type;
    size_t n_dims;
    size_t ne[4];
    const void *data;
    size_t nbytes;
} wtensor;

/* Writes the header (magic, version, counts), then the caller's kv bytes (n_kv
 * entries already encoded), the tensor infos with offsets padded to align, padding
 * and the data. Returns the file image. */
static inline buf gguf_image(uint32_t version, const buf *kvs, size_t n_kv, const wtensor *ts, size_t nt,
                             size_t align) {
    buf b = {0};
    put_le(&b, 0x46554747u, 4);
    put_le(&b, version, 4);
    put_le(&b, nt, 8);
    put_le(&b, n_kv, 8);
    if (kvs) put(&b, kvs->p, kvs->n);
    size_t off = 0;
    for (size_t i = 0; i < nt; i++) {
        put_str(&b, ts[i].name);
        put_le(&b, ts[i].n_dims, 4);
        for (size_t d = 0; d < ts[i].n_dims; d++) put_le(&b, d < 4 ? ts[i].ne[d] : 1, 8); /* n_dims may be bad on purpose */
        put_le(&b, ts[i].type, 4);
        put_le(&b, off, 8);
        off += (ts[i].nbytes + align - 1) / align * align;
    }
    pad_to(&b, align);
    for (size_t i = 0; i < nt; i++) {
        put(&b, ts[i].data, ts[i].nbytes);
        pad_to(&b, align);
    }
    return b;
}

static inline void kv_head(buf *kv, const char *key, uint32_t type) {
    put_str(kv, key);
    put_le(kv, type, 4);
}
static inline void kv_u32(buf *kv, const char *key, uint32_t v) {
    kv_head(kv, key, DPOC_GGUF_UINT32), put_le(kv, v, 4);
}
static inline void kv_f32(buf *kv, const char *key, float v) {
    kv_head(kv, key, DPOC_GGUF_FLOAT32), put_f32(kv, v);
}
static inline void kv_str(buf *kv, const char *key, const char *v) {
    kv_head(kv, key, DPOC_GGUF_STRING), put_str(kv, v);
}

static inline char *write_file(const char *name, const buf *b) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", make_temp_dir(), name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (b->n) assert_int_equal(fwrite(b->p, 1, b->n, f), b->n);
    assert_int_equal(fclose(f), 0);
    return path;
}

#endif
