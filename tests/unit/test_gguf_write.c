/* GGUF writer (src/io/gguf_write.c) and llama.cpp LoRA adapter export
 * (src/model/lora_gguf.c).
 *
 * References, independent of the code under test:
 * - the GGUF v3 layout checked byte by byte in the file (magic "GGUF", version
 *   3, the u64 counts, the first kv entry, the data section's alignment and
 *   the zero padding after each tensor: gguf-py's GGUFWriter), and everything
 *   read back through dpoc's own reader (src/io/gguf.c);
 * - convert_hf_to_gguf.py's permute written here as the script writes it, a
 *   reshape (n_head, 2, hd/2, cols) and a swap of axes 1 and 2, in flat
 *   multi-indices; dpoc_gguf_unpermute_rows (the loader's) must undo it;
 * - the LoRA files against the peft fixtures (tests/fixtures/lora/<case>/
 *   adapter-init, loaded by dpoc_lora_load_peft): the keys llama.cpp's
 *   llama_adapter_lora_init_impl requires, alpha' = alpha (rsLoRA:
 *   alpha sqrt(r)) so that llama.cpp's alpha / r is the adapter's scale, every
 *   expected tensor with llama-adapter.cpp's shapes (lora_a ne [in, r], lora_b
 *   ne [r, out]) and no other, and the values bit for bit: lora_a = A, lora_b =
 *   B, for llama's q/k after undoing the permutation. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dpoc/dtype.h"
#include "dpoc/gguf.h"
#include "dpoc/gguf_write.h"
#include "dpoc/lora.h"
#include "dpoc/lora_gguf.h"
#include "dpoc/model.h"
#include "dpoc/source.h"
#include "testutil.h"

#define ALIGN_DEFAULT 32
#define ALIGN_CUSTOM 64
#define Q8_0_BLOCK 32
#define Q8_0_BLOCK_BYTES 34
/* bytes before the first kv entry: magic, version, tensor count, kv count */
#define HEADER_BYTES 24
#define SCALE_RTOL 1e-6
#define PATH_MAX_ 4096

static void expect_msg(int rc, const dpoc_err *err, int code, const char *needle) {
    if (rc != code) fail_msg("status %d (expected %d), message '%s'", rc, code, err->msg);
    if (!strstr(err->msg, needle)) fail_msg("message '%s' does not mention '%s'", err->msg, needle);
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static size_t padded(size_t n, size_t a) { return (n + a - 1) / a * a; }

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

static dpoc_gguf_writer *new_writer(void) {
    dpoc_gguf_writer *w;
    dpoc_err err;
    if (dpoc_gguf_writer_new(&w, &err)) fail_msg("%s", err.msg);
    return w;
}

/* ---- convert_hf_to_gguf.py's permute ---- */

/* permute(w, n_head) as the script writes it: w viewed as (n_head, 2, hd/2, cols),
 * axes 1 and 2 swapped, so element (h, j, s, c) of the (n_head, hd/2, 2, cols)
 * result is element (h, s, j, c) of the input. */
static void script_permute(float *dst, const float *src, size_t rows, size_t cols, size_t n_head) {
    const size_t half = rows / n_head / 2;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t s = 0; s < 2; s++)
                for (size_t c = 0; c < cols; c++)
                    dst[((h * half + j) * 2 + s) * cols + c] = src[((h * 2 + s) * half + j) * cols + c];
}

static void test_permute_inverse(void **state) {
    (void)state;
    static const struct {
        size_t rows, cols, n_head;
    } cases[] = {{12, 5, 3}, {16, 1, 4}, {8, 3, 1}, {64, 8, 4}, {32, 8, 2}};
    rng_t r = {42};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const size_t rows = cases[k].rows, cols = cases[k].cols, nh = cases[k].n_head, n = rows * cols;
        float *x = malloc(n * sizeof *x), *want = malloc(n * sizeof *x), *got = malloc(n * sizeof *x),
              *tmp = malloc(n * sizeof *x);
        assert_true(x && want && got && tmp);
        for (size_t i = 0; i < n; i++) x[i] = rng_uniform(&r, -1, 1);
        script_permute(want, x, rows, cols, nh);
        dpoc_gguf_permute_rows(got, x, rows, cols, nh);
        assert_memory_equal(got, want, n * sizeof *x);
        /* the loader's unpermute undoes it ... */
        dpoc_gguf_unpermute_rows(got, tmp, rows, cols, nh);
        assert_memory_equal(got, x, n * sizeof *x);
        /* ... and the other way round */
        memcpy(tmp, x, n * sizeof *x);
        dpoc_gguf_unpermute_rows(tmp, want, rows, cols, nh);
        dpoc_gguf_permute_rows(got, tmp, rows, cols, nh);
        assert_memory_equal(got, x, n * sizeof *x);
        if (nh * 2 < rows) assert_memory_not_equal(want, x, n * sizeof *x); /* not the identity */
        free(x), free(want), free(got), free(tmp);
    }
}

/* ---- the writer ---- */

typedef struct {
    const char *name;
    uint32_t type;
    size_t n_dims;
    size_t shape[DPOC_GGUF_MAX_DIMS];
    size_t nbytes;
    unsigned char *data;
} tspec;

static void check_tensor(const dpoc_gguf *g, const tspec *s) {
    const dpoc_gguf_tensor *t = dpoc_gguf_find_tensor(g, s->name);
    if (!t) fail_msg("tensor '%s' is missing", s->name);
    assert_string_equal(t->name, s->name);
    assert_int_equal(t->type, s->type);
    assert_int_equal(t->n_dims, s->n_dims);
    for (size_t d = 0; d < DPOC_GGUF_MAX_DIMS; d++)
        assert_int_equal(t->ne[d], d < s->n_dims ? s->shape[s->n_dims - 1 - d] : 1);
    assert_int_equal(t->nbytes, s->nbytes);
    assert_memory_equal(t->data, s->data, s->nbytes);
    assert_int_equal(t->offset % dpoc_gguf_alignment(g), 0);
}

static void test_writer_roundtrip(void **state) {
    (void)state;
    dpoc_err err;
    rng_t r = {7};
    /* odd shapes; F16 and a block type as raw bytes */
    tspec ts[] = {
        {"t.odd", DPOC_DT_F32, 2, {3, 5}, 0, NULL},
        {"t.vec", DPOC_DT_F32, 1, {7}, 0, NULL},
        {"t.3d", DPOC_DT_F32, 3, {2, 3, 5}, 0, NULL},
        {"t.4d", DPOC_DT_F32, 4, {1, 2, 1, 3}, 0, NULL},
        {"t.f16", DPOC_DT_F16, 1, {3}, 0, NULL},
        {"t.q8_0", DPOC_DT_Q8_0, 2, {2, Q8_0_BLOCK}, 0, NULL},
    };
    const size_t NT = sizeof ts / sizeof ts[0];
    for (size_t i = 0; i < NT; i++) {
        size_t nel = 1;
        for (size_t d = 0; d < ts[i].n_dims; d++) nel *= ts[i].shape[d];
        ts[i].nbytes = ts[i].type == DPOC_DT_Q8_0 ? nel / Q8_0_BLOCK * Q8_0_BLOCK_BYTES
                                                  : nel * (ts[i].type == DPOC_DT_F16 ? 2 : 4);
        ts[i].data = malloc(ts[i].nbytes);
        assert_non_null(ts[i].data);
        for (size_t b = 0; b < ts[i].nbytes; b++) ts[i].data[b] = (unsigned char)(rng_next(&r) >> 56);
    }
    dpoc_gguf_writer *w = new_writer();
    const char *const strs[] = {"alpha", "", "\xc3\xbc" "n" "\xc3\xaf" "code"};
    const float f32s[] = {1.5f, -2.0f, 3.25f};
    const int32_t i32s[] = {-1, 0, 2147483647};
    const uint8_t bools[] = {1, 0, 1};
    const char *const keys[] = {"general.architecture", "test.empty", "test.u32", "test.i32", "test.u64",
                                "test.i64", "test.f32", "test.f64", "test.true", "test.false",
                                "test.strs", "test.f32s", "test.i32s", "test.bools"};
    const size_t NKV = sizeof keys / sizeof keys[0];
    int rc = dpoc_gguf_writer_add_str(w, keys[0], "llama", &err);
    rc = rc || dpoc_gguf_writer_add_str(w, keys[1], "", &err);
    rc = rc || dpoc_gguf_writer_add_u32(w, keys[2], 0xDEADBEEFu, &err);
    rc = rc || dpoc_gguf_writer_add_i32(w, keys[3], -7, &err);
    rc = rc || dpoc_gguf_writer_add_u64(w, keys[4], ((uint64_t)1 << 40) + 3, &err);
    rc = rc || dpoc_gguf_writer_add_i64(w, keys[5], -((int64_t)1 << 40), &err);
    rc = rc || dpoc_gguf_writer_add_f32(w, keys[6], 0.1f, &err);
    rc = rc || dpoc_gguf_writer_add_f64(w, keys[7], 3.141592653589793, &err);
    rc = rc || dpoc_gguf_writer_add_bool(w, keys[8], 1, &err);
    rc = rc || dpoc_gguf_writer_add_bool(w, keys[9], 0, &err);
    rc = rc || dpoc_gguf_writer_add_str_array(w, keys[10], strs, 3, &err);
    rc = rc || dpoc_gguf_writer_add_array(w, keys[11], DPOC_GGUF_FLOAT32, f32s, 3, &err);
    rc = rc || dpoc_gguf_writer_add_array(w, keys[12], DPOC_GGUF_INT32, i32s, 3, &err);
    rc = rc || dpoc_gguf_writer_add_array(w, keys[13], DPOC_GGUF_BOOL, bools, 3, &err);
    for (size_t i = 0; i < NT && !rc; i++)
        rc = dpoc_gguf_writer_add_tensor(w, ts[i].name, ts[i].type, ts[i].n_dims, ts[i].shape, ts[i].data, &err);
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_gguf_writer_n_kv(w), NKV);
    assert_int_equal(dpoc_gguf_writer_n_tensors(w), NT);
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/roundtrip.gguf", make_temp_dir());
    if (dpoc_gguf_writer_write(w, path, &err)) fail_msg("%s", err.msg);
    dpoc_gguf_writer_free(w);

    /* read back with dpoc's reader */
    dpoc_gguf *g;
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_gguf_version(g), 3);
    assert_int_equal(dpoc_gguf_alignment(g), ALIGN_DEFAULT);
    assert_int_equal(dpoc_gguf_n_kv(g), NKV);
    for (size_t i = 0; i < NKV; i++) assert_string_equal(dpoc_gguf_kv_key(g, i), keys[i]); /* in order */
    const char *s;
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    int64_t i64;
    float f32;
    double f64;
    int b;
    if (dpoc_gguf_get_str(g, keys[0], &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, "llama");
    if (dpoc_gguf_get_str(g, keys[1], &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, "");
    assert_int_equal(dpoc_gguf_key_type(g, keys[2]), DPOC_GGUF_UINT32);
    if (dpoc_gguf_get_u32(g, keys[2], &u32, &err)) fail_msg("%s", err.msg);
    assert_true(u32 == 0xDEADBEEFu);
    assert_int_equal(dpoc_gguf_key_type(g, keys[3]), DPOC_GGUF_INT32);
    if (dpoc_gguf_get_i32(g, keys[3], &i32, &err)) fail_msg("%s", err.msg);
    assert_int_equal(i32, -7);
    assert_int_equal(dpoc_gguf_key_type(g, keys[4]), DPOC_GGUF_UINT64);
    if (dpoc_gguf_get_u64(g, keys[4], &u64, &err)) fail_msg("%s", err.msg);
    assert_true(u64 == ((uint64_t)1 << 40) + 3);
    assert_int_equal(dpoc_gguf_key_type(g, keys[5]), DPOC_GGUF_INT64);
    if (dpoc_gguf_get_i64(g, keys[5], &i64, &err)) fail_msg("%s", err.msg);
    assert_true(i64 == -((int64_t)1 << 40));
    assert_int_equal(dpoc_gguf_key_type(g, keys[6]), DPOC_GGUF_FLOAT32);
    if (dpoc_gguf_get_f32(g, keys[6], &f32, &err)) fail_msg("%s", err.msg);
    assert_true(f32 == 0.1f);
    assert_int_equal(dpoc_gguf_key_type(g, keys[7]), DPOC_GGUF_FLOAT64);
    if (dpoc_gguf_get_f64(g, keys[7], &f64, &err)) fail_msg("%s", err.msg);
    assert_true(f64 == 3.141592653589793);
    if (dpoc_gguf_get_bool(g, keys[8], &b, &err)) fail_msg("%s", err.msg);
    assert_int_equal(b, 1);
    if (dpoc_gguf_get_bool(g, keys[9], &b, &err)) fail_msg("%s", err.msg);
    assert_int_equal(b, 0);
    const char *const *sa;
    const size_t *lens;
    size_t n;
    if (dpoc_gguf_get_str_array(g, keys[10], &sa, &lens, &n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(n, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_string_equal(sa[i], strs[i]);
        assert_int_equal(lens[i], strlen(strs[i]));
    }
    dpoc_gguf_vtype et;
    const void *arr;
    if (dpoc_gguf_get_array(g, keys[11], &et, &arr, &n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(et, DPOC_GGUF_FLOAT32);
    assert_int_equal(n, 3);
    assert_memory_equal(arr, f32s, sizeof f32s);
    if (dpoc_gguf_get_array(g, keys[12], &et, &arr, &n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(et, DPOC_GGUF_INT32);
    assert_memory_equal(arr, i32s, sizeof i32s);
    if (dpoc_gguf_get_array(g, keys[13], &et, &arr, &n, &err)) fail_msg("%s", err.msg);
    assert_int_equal(et, DPOC_GGUF_BOOL);
    assert_memory_equal(arr, bools, sizeof bools);
    assert_int_equal(dpoc_gguf_n_tensors(g), NT);
    size_t want_off = 0;
    for (size_t i = 0; i < NT; i++) {
        check_tensor(g, &ts[i]);
        /* in order, each at the padded end of the one before (what ggml's gguf.cpp requires) */
        const dpoc_gguf_tensor *t = dpoc_gguf_tensor_at(g, i);
        assert_string_equal(t->name, ts[i].name);
        assert_int_equal(t->offset, want_off);
        want_off += padded(t->nbytes, ALIGN_DEFAULT);
    }
    const size_t data_off = dpoc_gguf_data_offset(g);
    dpoc_gguf_close(g);

    /* the bytes themselves, against the GGUF spec */
    size_t len;
    unsigned char *raw = (unsigned char *)read_text_file(path, &len);
    assert_non_null(raw);
    assert_memory_equal(raw, "GGUF", 4);
    assert_int_equal(le32(raw + 4), 3);
    assert_int_equal(le64(raw + 8), NT);
    assert_int_equal(le64(raw + 16), NKV);
    /* first kv: u64 key length, key, u32 type STRING (8), u64 length, "llama" */
    const size_t klen = strlen(keys[0]);
    assert_int_equal(le64(raw + HEADER_BYTES), klen);
    assert_memory_equal(raw + HEADER_BYTES + 8, keys[0], klen);
    assert_int_equal(le32(raw + HEADER_BYTES + 8 + klen), DPOC_GGUF_STRING);
    assert_int_equal(le64(raw + HEADER_BYTES + 12 + klen), 5);
    assert_memory_equal(raw + HEADER_BYTES + 20 + klen, "llama", 5);
    assert_int_equal(data_off % ALIGN_DEFAULT, 0);
    /* every tensor padded, the last one too (gguf-py's write_padding) */
    assert_int_equal(len, data_off + want_off);
    const size_t last_end = data_off + want_off - padded(ts[NT - 1].nbytes, ALIGN_DEFAULT) + ts[NT - 1].nbytes;
    for (size_t i = last_end; i < len; i++) assert_int_equal(raw[i], 0);
    free(raw);
    for (size_t i = 0; i < NT; i++) free(ts[i].data);
}

static void test_writer_alignment(void **state) {
    (void)state;
    dpoc_err err;
    dpoc_gguf_writer *w = new_writer();
    const float a[3] = {1, 2, 3}, b[5] = {4, 5, 6, 7, 8};
    const size_t sa[1] = {3}, sb[1] = {5};
    if (dpoc_gguf_writer_add_str(w, "general.architecture", "qwen2", &err) ||
        dpoc_gguf_writer_set_alignment(w, ALIGN_CUSTOM, &err) ||
        dpoc_gguf_writer_add_tensor(w, "a", DPOC_DT_F32, 1, sa, a, &err) ||
        dpoc_gguf_writer_add_tensor(w, "b", DPOC_DT_F32, 1, sb, b, &err))
        fail_msg("%s", err.msg);
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/aligned.gguf", make_temp_dir());
    if (dpoc_gguf_writer_write(w, path, &err)) fail_msg("%s", err.msg);
    dpoc_gguf *g;
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    uint32_t al;
    assert_int_equal(dpoc_gguf_key_type(g, "general.alignment"), DPOC_GGUF_UINT32);
    if (dpoc_gguf_get_u32(g, "general.alignment", &al, &err)) fail_msg("%s", err.msg);
    assert_int_equal(al, ALIGN_CUSTOM);
    assert_int_equal(dpoc_gguf_alignment(g), ALIGN_CUSTOM);
    assert_int_equal(dpoc_gguf_data_offset(g) % ALIGN_CUSTOM, 0);
    assert_int_equal(dpoc_gguf_find_tensor(g, "a")->offset, 0);
    assert_int_equal(dpoc_gguf_find_tensor(g, "b")->offset, ALIGN_CUSTOM);
    assert_memory_equal(dpoc_gguf_find_tensor(g, "b")->data, b, sizeof b);
    dpoc_gguf_close(g);

    /* written again over the same path: replaced whole */
    if (dpoc_gguf_writer_add_u32(w, "test.second", 2, &err)) fail_msg("%s", err.msg);
    if (dpoc_gguf_writer_write(w, path, &err)) fail_msg("%s", err.msg);
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    assert_true(dpoc_gguf_has_key(g, "test.second"));
    dpoc_gguf_close(g);
    dpoc_gguf_writer_free(w);

    /* metadata only, no tensor */
    w = new_writer();
    if (dpoc_gguf_writer_add_str(w, "general.architecture", "llama", &err)) fail_msg("%s", err.msg);
    if (dpoc_gguf_writer_write(w, path, &err)) fail_msg("%s", err.msg);
    dpoc_gguf_writer_free(w);
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_gguf_n_tensors(g), 0);
    dpoc_gguf_close(g);
}

static void test_writer_errors(void **state) {
    (void)state;
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_gguf_writer *w = new_writer();
    const float x[Q8_0_BLOCK] = {0};
    const size_t s3[1] = {3};
    expect_msg(dpoc_gguf_writer_add_u32(w, "k", 1, &err), &err, 0, "");
    expect_msg(dpoc_gguf_writer_add_str(w, "k", "again", &err), &err, DPOC_EINPUT, "'k'");
    expect_msg(dpoc_gguf_writer_add_u32(w, "", 1, &err), &err, DPOC_EINPUT, "empty");
    expect_msg(dpoc_gguf_writer_set_alignment(w, 3, &err), &err, DPOC_EINPUT, "power of two");
    expect_msg(dpoc_gguf_writer_set_alignment(w, 0, &err), &err, DPOC_EINPUT, "power of two");
    expect_msg(dpoc_gguf_writer_add_array(w, "arr", DPOC_GGUF_STRING, x, 1, &err), &err, DPOC_EINPUT, "numeric");
    assert_int_equal(dpoc_gguf_writer_n_kv(w), 1);

    char name[DPOC_GGUF_MAX_NAME + 1];
    memset(name, 'n', DPOC_GGUF_MAX_NAME);
    name[DPOC_GGUF_MAX_NAME] = '\0'; /* 64 bytes: too long for ggml */
    expect_msg(dpoc_gguf_writer_add_tensor(w, name, DPOC_DT_F32, 1, s3, x, &err), &err, DPOC_EINPUT, "name");
    name[DPOC_GGUF_MAX_NAME - 1] = '\0'; /* 63: fits */
    expect_msg(dpoc_gguf_writer_add_tensor(w, name, DPOC_DT_F32, 1, s3, x, &err), &err, 0, "");
    expect_msg(dpoc_gguf_writer_add_tensor(w, name, DPOC_DT_F32, 1, s3, x, &err), &err, DPOC_EINPUT, "already");
    expect_msg(dpoc_gguf_writer_add_tensor(w, "d0", DPOC_DT_F32, 0, s3, x, &err), &err, DPOC_EINPUT, "dims");
    const size_t s5[5] = {1, 1, 1, 1, 3};
    expect_msg(dpoc_gguf_writer_add_tensor(w, "d5", DPOC_DT_F32, 5, s5, x, &err), &err, DPOC_EINPUT, "dims");
    const size_t szero[2] = {2, 0};
    expect_msg(dpoc_gguf_writer_add_tensor(w, "z", DPOC_DT_F32, 2, szero, x, &err), &err, DPOC_EINPUT, "size 0");
    const size_t s31[1] = {Q8_0_BLOCK - 1};
    expect_msg(dpoc_gguf_writer_add_tensor(w, "q", DPOC_DT_Q8_0, 1, s31, x, &err), &err, DPOC_EINPUT, "block");
    expect_msg(dpoc_gguf_writer_add_tensor(w, "u", 99, 1, s3, x, &err), &err, DPOC_EINPUT, "type");
    expect_msg(dpoc_gguf_writer_add_tensor(w, "nul", DPOC_DT_F32, 1, s3, NULL, &err), &err, DPOC_EINPUT, "data");
    assert_int_equal(dpoc_gguf_writer_n_tensors(w), 1);

    /* the failed adds left nothing behind: the file holds the good entries */
    const char *dir = make_temp_dir();
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/ok.gguf", dir);
    if (dpoc_gguf_writer_write(w, path, &err)) fail_msg("%s", err.msg);
    dpoc_gguf *g;
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_gguf_n_kv(g), 1);
    assert_int_equal(dpoc_gguf_n_tensors(g), 1);
    dpoc_gguf_close(g);

    /* an unwritable destination: an error naming the path, nothing under it */
    snprintf(path, sizeof path, "%s/missing/out.gguf", dir);
    expect_msg(dpoc_gguf_writer_write(w, path, &err), &err, DPOC_EIO, path);
    assert_false(file_exists(path));
    char file_dir[PATH_MAX_ / 2];
    snprintf(file_dir, sizeof file_dir, "%s/ok.gguf", dir); /* a regular file where the directory should be */
    snprintf(path, sizeof path, "%s/out.gguf", file_dir);
    expect_msg(dpoc_gguf_writer_write(w, path, &err), &err, DPOC_EIO, path);
    assert_false(file_exists(path));
    snprintf(path, sizeof path, "%s/", dir);
    expect_msg(dpoc_gguf_writer_write(w, path, &err), &err, DPOC_EINPUT, "not a file path");
    if (geteuid() != 0) { /* root writes anywhere: the mode test needs another user */
        char ro[PATH_MAX_ / 2];
        snprintf(ro, sizeof ro, "%s/ro", dir);
        assert_int_equal(mkdir(ro, 0500), 0);
        snprintf(path, sizeof path, "%s/out.gguf", ro);
        expect_msg(dpoc_gguf_writer_write(w, path, &err), &err, DPOC_EIO, path);
        assert_false(file_exists(path));
        chmod(ro, 0700);
    }
    /* a failed write leaves no temporary file either */
    snprintf(path, sizeof path, "%s/.ok.gguf.tmp", dir);
    assert_false(file_exists(path));
    dpoc_gguf_writer_free(w);
}

/* ---- llama.cpp LoRA adapters ---- */

static const char *const GGUF_PROJ[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                         "ffn_down"};

static const dpoc_linear *projection(const dpoc_model *m, size_t l, size_t p) {
    const dpoc_layer *L = &m->layers[l];
    const dpoc_linear *proj[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    return proj[p];
}

static void load_case(dpoc_model *m, dpoc_lora_cfg *cfg, const char *model, const char *lcase) {
    dpoc_err err;
    if (dpoc_source_load_model(m, fixture_path(model), &err)) fail_msg("%s: %s", model, err.msg);
    char rel[256];
    snprintf(rel, sizeof rel, "lora/%s/adapter-init", lcase);
    if (dpoc_lora_load_peft(m, fixture_path(rel), cfg, &err)) fail_msg("%s: %s", rel, err.msg);
}

static void check_lora_case(const char *model, const char *lcase, const char *arch, size_t want_adapters,
                            float want_alpha) {
    dpoc_model m;
    dpoc_lora_cfg cfg;
    dpoc_err err;
    load_case(&m, &cfg, model, lcase);
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/%s.gguf", make_temp_dir(), lcase);
    if (dpoc_lora_save_gguf(&m, &cfg, path, &err)) fail_msg("%s: %s", lcase, err.msg);
    dpoc_gguf *g;
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_gguf_version(g), 3);
    const char *s;
    if (dpoc_gguf_get_str(g, "general.architecture", &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, arch);
    if (dpoc_gguf_get_str(g, "general.type", &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, "adapter");
    if (dpoc_gguf_get_str(g, "adapter.type", &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, "lora");
    if (dpoc_gguf_get_str(g, "general.name", &s, &err)) fail_msg("%s", err.msg);
    assert_string_equal(s, lcase);
    /* llama.cpp reads it with gguf_get_val_f32, which insists on the type */
    assert_int_equal(dpoc_gguf_key_type(g, "adapter.lora.alpha"), DPOC_GGUF_FLOAT32);
    float alpha;
    if (dpoc_gguf_get_f32(g, "adapter.lora.alpha", &alpha, &err)) fail_msg("%s", err.msg);
    assert_true(alpha == want_alpha);
    uint32_t qv;
    if (dpoc_gguf_get_u32(g, "general.quantization_version", &qv, &err)) fail_msg("%s", err.msg);
    assert_int_equal(qv, 2);

    size_t n_adapters = 0;
    for (size_t l = 0; l < m.cfg.n_layers; l++)
        for (size_t p = 0; p < 7; p++) {
            const dpoc_linear *L = projection(&m, l, p);
            char na[96], nb[96];
            snprintf(na, sizeof na, "blk.%zu.%s.weight.lora_a", l, GGUF_PROJ[p]);
            snprintf(nb, sizeof nb, "blk.%zu.%s.weight.lora_b", l, GGUF_PROJ[p]);
            const dpoc_gguf_tensor *ta = dpoc_gguf_find_tensor(g, na), *tb = dpoc_gguf_find_tensor(g, nb);
            if (L->lora.r == 0) {
                if (ta || tb) fail_msg("%s: %s has no adapter but the file has its tensors", lcase, na);
                continue;
            }
            n_adapters++;
            if (!ta || !tb) fail_msg("%s: %s or its lora_b is missing", lcase, na);
            const size_t r = L->lora.r;
            /* llama_adapter_lora_init_impl: model ne[0] (in) == a ne[0], model ne[1] (out) == b ne[1],
             * a ne[1] == b ne[0] (r) */
            assert_int_equal(ta->type, DPOC_GGML_F32);
            assert_int_equal(tb->type, DPOC_GGML_F32);
            assert_int_equal(ta->n_dims, 2);
            assert_int_equal(tb->n_dims, 2);
            assert_int_equal(ta->ne[0], L->in);
            assert_int_equal(ta->ne[1], r);
            assert_int_equal(tb->ne[0], r);
            assert_int_equal(tb->ne[1], L->out);
            /* llama.cpp's scale, alpha / r in float, is the adapter's */
            assert_close(alpha / (float)tb->ne[0], L->lora.scale, SCALE_RTOL, 0, "%s %s scale", lcase, na);
            assert_memory_equal(ta->data, L->lora.A, r * L->in * sizeof(float));
            const size_t nh = !strcmp(arch, "llama") ? (p == 0 ? m.cfg.n_heads : p == 1 ? m.cfg.n_kv_heads : 0) : 0;
            if (!nh) {
                assert_memory_equal(tb->data, L->lora.B, L->out * r * sizeof(float));
                continue;
            }
            /* permuted as convert_hf_to_gguf permutes q/k: undone, B bit for bit */
            float *got = malloc(L->out * r * sizeof *got), *tmp = malloc(L->out * r * sizeof *tmp);
            assert_true(got && tmp);
            memcpy(got, tb->data, L->out * r * sizeof *got);
            assert_memory_not_equal(got, L->lora.B, L->out * r * sizeof *got);
            dpoc_gguf_unpermute_rows(got, tmp, L->out, r, nh);
            assert_memory_equal(got, L->lora.B, L->out * r * sizeof *got);
            free(got), free(tmp);
        }
    assert_int_equal(n_adapters, want_adapters);
    /* nothing else: llama.cpp refuses any tensor but *.lora_a, *.lora_b (and norms) */
    assert_int_equal(dpoc_gguf_n_tensors(g), 2 * n_adapters);
    dpoc_gguf_close(g);
    dpoc_model_free(&m);
}

static void test_lora_llama_all(void **state) {
    (void)state;
    /* r 8, alpha 16: every projection of both layers */
    check_lora_case("tiny-llama", "llama-all", "llama", 14, 16.0f);
}

static void test_lora_llama_qv_rslora(void **state) {
    (void)state;
    /* r 4, alpha 8, rsLoRA: scale 8 / sqrt(4) = 4 = alpha' / r with alpha' = 8 sqrt(4) = 16 */
    check_lora_case("tiny-llama", "llama-qv-rslora", "llama", 4, 16.0f);
}

static void test_lora_qwen2_all(void **state) {
    (void)state;
    /* qwen2: no q/k permutation; r 8, alpha 16, every projection of three layers */
    check_lora_case("tiny-qwen2", "qwen2-all", "qwen2", 21, 16.0f);
}

static void test_lora_errors(void **state) {
    (void)state;
    dpoc_err err;
    const char *dir = make_temp_dir();
    char path[PATH_MAX_];
    snprintf(path, sizeof path, "%s/x.gguf", dir);
    dpoc_model m;
    dpoc_lora_cfg cfg;
    /* no adapters */
    if (dpoc_source_load_model(&m, fixture_path("tiny-llama"), &err)) fail_msg("%s", err.msg);
    memset(&cfg, 0, sizeof cfg);
    cfg.r = 4;
    cfg.alpha = 8;
    expect_msg(dpoc_lora_save_gguf(&m, &cfg, path, &err), &err, DPOC_EINPUT, "no LoRA adapter");
    assert_false(file_exists(path));
    dpoc_model_free(&m);

    /* a config that is not the adapters': one alpha cannot serve them */
    load_case(&m, &cfg, "tiny-llama", "llama-qv-rslora");
    dpoc_lora_cfg bad = cfg;
    bad.r = cfg.r * 2;
    expect_msg(dpoc_lora_save_gguf(&m, &bad, path, &err), &err, DPOC_EINPUT, "rank");
    bad = cfg;
    bad.use_rslora = 0;
    expect_msg(dpoc_lora_save_gguf(&m, &bad, path, &err), &err, DPOC_EINPUT, "scale");
    assert_false(file_exists(path));
    /* unwritable */
    snprintf(path, sizeof path, "%s/missing/x.gguf", dir);
    expect_msg(dpoc_lora_save_gguf(&m, &cfg, path, &err), &err, DPOC_EIO, path);
    assert_false(file_exists(path));
    dpoc_model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_permute_inverse),      cmocka_unit_test(test_writer_roundtrip),
        cmocka_unit_test(test_writer_alignment),     cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_lora_llama_all),       cmocka_unit_test(test_lora_llama_qv_rslora),
        cmocka_unit_test(test_lora_qwen2_all),       cmocka_unit_test(test_lora_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
