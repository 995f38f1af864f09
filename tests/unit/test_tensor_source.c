/* Tensor sources (dpoc/tensor_source.h). Expected values never come from dpoc:
 * the safetensors fixtures against tests/fixtures/safetensors/expected.json
 * (written by tools/make_safetensors_fixtures.py with the reference
 * implementation and torch's conversions) and the fixture README's model shapes;
 * GGUF images written here byte by byte (gguf_image.h) with values derived by
 * hand from ggml's block layouts and the IEEE half / bfloat16 encodings; byte
 * sizes from the formats' specs (safetensors: numel x element size; GGUF:
 * ggml-common.h's block structs). Errors must name the source and the tensor. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dpoc/tensor_source.h"
#include "gguf_image.h"
#include "testutil.h"

static void expect_msg(int rc, const dpoc_err *err, int code, const char *needle) {
    if (rc != code) fail_msg("status %d (expected %d), message '%s'", rc, code, err->msg);
    if (!strstr(err->msg, needle)) fail_msg("message '%s' does not mention '%s'", err->msg, needle);
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void expect_floats(const float *got, const float *want, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (f32_bits(got[i]) != f32_bits(want[i]))
            fail_msg("%s: element %zu is %.9g (0x%08X), expected %.9g (0x%08X)", what, i, (double)got[i],
                     f32_bits(got[i]), (double)want[i], f32_bits(want[i]));
}

/* A fresh directory holding fixture rel as model.safetensors. */
static const char *dir_with_model_file(const char *rel) {
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", make_temp_dir());
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "cp '%s' '%s/model.safetensors'", fixture_path(rel), dir);
    if (system(cmd) != 0) fail_msg("%s failed", cmd);
    return dir;
}

/* Bytes per element of the safetensors dtypes in these fixtures (the format's spec). */
static size_t st_element_bytes(const char *dtype) {
    if (!strcmp(dtype, "F32")) return 4;
    if (!strcmp(dtype, "F16") || !strcmp(dtype, "BF16")) return 2;
    fail_msg("no element size for %s", dtype);
    return 0;
}

static uint32_t st_dtype_id(const char *dtype) {
    if (!strcmp(dtype, "F32")) return DPOC_DT_F32;
    if (!strcmp(dtype, "F16")) return DPOC_DT_F16;
    if (!strcmp(dtype, "BF16")) return DPOC_DT_BF16;
    fail_msg("no id for %s", dtype);
    return 0;
}

/* Every tensor of src against its entry of expected.json: dtype, shape, bytes, fp32 bits. */
static void check_against_manifest(const dpoc_tensor_source *src, const cJSON *tensors, const char *what) {
    assert_int_equal(dpoc_ts_count(src), (size_t)cJSON_GetArraySize(tensors));
    const cJSON *e;
    cJSON_ArrayForEach(e, tensors) {
        const dpoc_ts_tensor *t = dpoc_ts_find(src, e->string);
        if (!t) fail_msg("%s: tensor '%s' not found", what, e->string);
        assert_string_equal(t->name, e->string);
        const char *dtype = cJSON_GetObjectItem(e, "dtype")->valuestring;
        assert_string_equal(t->dtype_name, dtype);
        assert_int_equal(t->dtype, st_dtype_id(dtype));
        const cJSON *shape = cJSON_GetObjectItem(e, "shape");
        assert_int_equal(t->ndim, (size_t)cJSON_GetArraySize(shape));
        size_t numel = 1;
        for (size_t d = 0; d < t->ndim; d++) {
            const size_t want = (size_t)cJSON_GetArrayItem(shape, (int)d)->valuedouble;
            if (t->shape[d] != want) fail_msg("%s: %s shape[%zu] = %zu, expected %zu", what, t->name, d, t->shape[d], want);
            numel *= want;
        }
        assert_int_equal(t->numel, numel);
        assert_int_equal(t->nbytes, numel * st_element_bytes(dtype));
        const cJSON *bits = cJSON_GetObjectItem(e, "f32_bits");
        assert_int_equal((size_t)cJSON_GetArraySize(bits), numel);
        float *out = calloc(numel ? numel : 1, sizeof *out);
        assert_non_null(out);
        dpoc_err err;
        if (dpoc_ts_to_f32(src, t, out, numel, &err)) fail_msg("%s: %s", what, err.msg);
        for (size_t i = 0; i < numel; i++) {
            const uint32_t want = (uint32_t)cJSON_GetArrayItem(bits, (int)i)->valuedouble;
            float wf;
            memcpy(&wf, &want, sizeof wf);
            if (isnan(wf) ? !isnan(out[i]) : f32_bits(out[i]) != want)
                fail_msg("%s: %s[%zu] = 0x%08X, expected 0x%08X", what, t->name, i, f32_bits(out[i]), want);
        }
        free(out);
    }
}

/* ---- safetensors ---- */

static void test_safetensors_sharded(void **state) {
    (void)state;
    cJSON *expected = load_json_fixture("safetensors/expected.json");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", fixture_path("safetensors/sharded"));
    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_open_safetensors(&src, dir, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_ts_format_of(src), DPOC_TS_SAFETENSORS);
    assert_string_equal(dpoc_ts_where(src), dir);
    assert_null(dpoc_ts_gguf(src));
    /* F32, BF16 and F16 tensors across two shards */
    check_against_manifest(src, cJSON_GetObjectItem(expected, "sharded"), "sharded");
    /* iteration: by name, each found again at its index */
    for (size_t i = 0; i < dpoc_ts_count(src); i++) {
        const dpoc_ts_tensor *t = dpoc_ts_at(src, i);
        if (i) assert_true(strcmp(dpoc_ts_at(src, i - 1)->name, t->name) < 0);
        assert_ptr_equal(dpoc_ts_find(src, t->name), t);
        assert_int_equal(dpoc_ts_index(src, t), i);
    }
    assert_null(dpoc_ts_at(src, dpoc_ts_count(src)));
    assert_null(dpoc_ts_find(src, "absent"));
    dpoc_ts_close(src);
    cJSON_Delete(expected);
}

static void test_safetensors_half_files(void **state) {
    (void)state;
    cJSON *expected = load_json_fixture("safetensors/expected.json");
    /* F16 with inf, nan, subnormals; BF16 likewise: torch's upcasts are the reference */
    static const char *files[] = {"f32.safetensors", "f16.safetensors", "bf16.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char rel[128];
        snprintf(rel, sizeof rel, "safetensors/%s", files[i]);
        dpoc_tensor_source *src = NULL;
        dpoc_err err;
        if (dpoc_ts_open_safetensors(&src, dir_with_model_file(rel), &err)) fail_msg("%s: %s", rel, err.msg);
        check_against_manifest(src, cJSON_GetObjectItem(expected, files[i]), files[i]);
        dpoc_ts_close(src);
    }
    cJSON_Delete(expected);
}

/* The half-precision reference models: dtype and shape as the fixture README states
 * (vocab 256, hidden 64; tiny-llama-ref float16, tiny-qwen2-ref bfloat16). */
static void test_safetensors_models(void **state) {
    (void)state;
    static const struct {
        const char *dir, *dtype;
        uint32_t id;
    } cases[] = {{"tiny-llama-ref", "F16", DPOC_DT_F16}, {"tiny-qwen2-ref", "BF16", DPOC_DT_BF16}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dpoc_tensor_source *src = NULL;
        dpoc_err err;
        if (dpoc_ts_open_safetensors(&src, fixture_path(cases[i].dir), &err)) fail_msg("%s", err.msg);
        const dpoc_ts_tensor *t = dpoc_ts_find(src, "model.embed_tokens.weight");
        assert_non_null(t);
        assert_int_equal(t->dtype, cases[i].id);
        assert_string_equal(t->dtype_name, cases[i].dtype);
        assert_int_equal(t->ndim, 2);
        assert_true(t->shape[0] == 256 && t->shape[1] == 64);
        assert_int_equal(t->nbytes, 256 * 64 * 2);
        t = dpoc_ts_find(src, "model.layers.0.input_layernorm.weight");
        assert_non_null(t);
        assert_true(t->ndim == 1 && t->shape[0] == 64 && t->nbytes == 64 * 2);
        dpoc_ts_close(src);
    }
}

/* A dtype the format knows and dpoc cannot convert (U8): listed, and the conversion
 * names the directory, the tensor and the dtype. */
static void test_safetensors_other_dtype(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    const char *hdr = "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                      "\"y\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[2,10]}}";
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint8_t len[8] = {0};
    const size_t n = strlen(hdr);
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(n >> (8 * i));
    const uint8_t data[10] = {7, 9, 0, 0, 0, 0, 0, 0, 0xF0, 0x3F};
    assert_int_equal(fwrite(len, 1, 8, f), 8);
    assert_int_equal(fwrite(hdr, 1, n, f), n);
    assert_int_equal(fwrite(data, 1, sizeof data, f), sizeof data);
    assert_int_equal(fclose(f), 0);

    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_open_safetensors(&src, dir, &err)) fail_msg("%s", err.msg);
    const dpoc_ts_tensor *x = dpoc_ts_find(src, "x"), *y = dpoc_ts_find(src, "y");
    assert_true(x && x->dtype == DPOC_TS_DTYPE_OTHER && !strcmp(x->dtype_name, "U8") && x->nbytes == 2);
    assert_true(y && y->dtype == DPOC_DT_F64 && !strcmp(y->dtype_name, "F64") && y->nbytes == 8);
    assert_int_equal(((const uint8_t *)x->data)[1], 9); /* the file's bytes, not a copy of them */
    float out[2];
    expect_msg(dpoc_ts_to_f32(src, x, out, 2, &err), &err, DPOC_EINPUT, "tensor 'x' has dtype U8, which dpoc cannot");
    assert_non_null(strstr(err.msg, dir));
    expect_msg(dpoc_ts_to_f32(src, y, out, 1, &err), &err, DPOC_EINPUT, "tensor 'y' has dtype F64");
    expect_msg(dpoc_ts_to_f32(src, x, out, 1, &err), &err, DPOC_EINPUT, "tensor 'x' has 2 elements");
    dpoc_ts_close(src);

    /* a directory without weights: st_open_dir's message, naming it */
    const char *empty = make_temp_dir();
    expect_msg(dpoc_ts_open_safetensors(&src, empty, &err), &err, DPOC_EINPUT, empty);
    assert_null(src);
}

/* ---- GGUF ---- */

/* Halves: 1.0, -2.0, 0.5, 65504 (the largest half), 2^-24 (the smallest subnormal), -0. */
static const uint16_t F16_BITS[6] = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000};
/* bfloat16 = the top half of an f32: 1.0, -3.0, 3.140625, 2^-133 (f32 bits 0x00010000). */
static const uint16_t BF16_BITS[4] = {0x3F80, 0xC040, 0x4049, 0x0001};

#define Q8_0_BLOCK_BYTES 34 /* {half d; int8 qs[32]} */
#define Q4_0_BLOCK_BYTES 18 /* {half d; u8 qs[16]} */
#define Q2_K_BLOCK_BYTES 84 /* {u8 scales[16]; u8 qs[64]; half d; half dmin} */

typedef struct {
    buf img;
    uint8_t f16[12], bf16[8], q8[2 * Q8_0_BLOCK_BYTES], q4[Q4_0_BLOCK_BYTES], q2k[Q2_K_BLOCK_BYTES];
    float f32[24];
} gguf_case;

/* Six tensors: a.f16 ne [3, 2], b.bf16 [4], c.q8_0 [32, 2], d.q4_0 [32], e.q2_k
 * [256] (a type dpoc does not convert), f.f32 [2, 3, 4]; one metadata key. */
static void make_gguf(gguf_case *c) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < 6; i++) c->f16[2 * i] = (uint8_t)F16_BITS[i], c->f16[2 * i + 1] = (uint8_t)(F16_BITS[i] >> 8);
    for (int i = 0; i < 4; i++) c->bf16[2 * i] = (uint8_t)BF16_BITS[i], c->bf16[2 * i + 1] = (uint8_t)(BF16_BITS[i] >> 8);
    /* Q8_0 block 0: d = 0x3800 = 0.5, qs[j] = j - 16; block 1: d = 0x4000 = 2.0, qs[j] = 16 - j */
    uint8_t *b = c->q8;
    b[0] = 0x00, b[1] = 0x38;
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(j - 16);
    b += Q8_0_BLOCK_BYTES;
    b[0] = 0x00, b[1] = 0x40;
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(16 - j);
    /* Q4_0: d = 2.0, qs[j] = j | (15 - j) << 4: y[j] = (j - 8) 2, y[j + 16] = (7 - j) 2 */
    c->q4[0] = 0x00, c->q4[1] = 0x40;
    for (int j = 0; j < 16; j++) c->q4[2 + j] = (uint8_t)(j | (15 - j) << 4);
    for (int i = 0; i < 24; i++) c->f32[i] = (float)i - 0.25f;
    const wtensor ts[] = {
        {"a.f16", DPOC_GGML_F16, 2, {3, 2}, c->f16, sizeof c->f16},
        {"b.bf16", DPOC_GGML_BF16, 1, {4}, c->bf16, sizeof c->bf16},
        {"c.q8_0", DPOC_GGML_Q8_0, 2, {32, 2}, c->q8, sizeof c->q8},
        {"d.q4_0", DPOC_GGML_Q4_0, 1, {32}, c->q4, sizeof c->q4},
        {"e.q2_k", DPOC_GGML_Q2_K, 1, {256}, c->q2k, sizeof c->q2k},
        {"f.f32", DPOC_GGML_F32, 3, {2, 3, 4}, c->f32, sizeof c->f32},
    };
    buf kv = {0};
    kv_str(&kv, "general.architecture", "llama");
    c->img = gguf_image(3, &kv, 1, ts, sizeof ts / sizeof ts[0], DPOC_GGUF_DEFAULT_ALIGNMENT);
    free(kv.p);
}

static void check_gguf_source(const dpoc_tensor_source *src, const gguf_case *c) {
    assert_int_equal(dpoc_ts_format_of(src), DPOC_TS_GGUF);
    assert_int_equal(dpoc_ts_count(src), 6);
    /* metadata through the source's reader */
    const char *arch;
    dpoc_err err;
    assert_non_null(dpoc_ts_gguf(src));
    assert_int_equal(dpoc_gguf_get_str(dpoc_ts_gguf(src), "general.architecture", &arch, &err), 0);
    assert_string_equal(arch, "llama");
    /* in the file's order, shapes in PyTorch order (ne reversed), sizes from the block structs */
    static const struct {
        const char *name, *dtype_name;
        uint32_t dtype;
        size_t ndim, shape[3], numel, nbytes;
    } want[] = {
        {"a.f16", "F16", DPOC_DT_F16, 2, {2, 3}, 6, 6 * 2},
        {"b.bf16", "BF16", DPOC_DT_BF16, 1, {4}, 4, 4 * 2},
        {"c.q8_0", "Q8_0", DPOC_DT_Q8_0, 2, {2, 32}, 64, 2 * Q8_0_BLOCK_BYTES},
        {"d.q4_0", "Q4_0", DPOC_DT_Q4_0, 1, {32}, 32, Q4_0_BLOCK_BYTES},
        {"e.q2_k", "Q2_K", DPOC_DT_Q2_K, 1, {256}, 256, Q2_K_BLOCK_BYTES},
        {"f.f32", "F32", DPOC_DT_F32, 3, {4, 3, 2}, 24, 24 * 4},
    };
    const void *data[] = {c->f16, c->bf16, c->q8, c->q4, c->q2k, c->f32};
    for (size_t i = 0; i < 6; i++) {
        const dpoc_ts_tensor *t = dpoc_ts_at(src, i);
        assert_string_equal(t->name, want[i].name);
        assert_string_equal(t->dtype_name, want[i].dtype_name);
        assert_int_equal(t->dtype, want[i].dtype);
        assert_int_equal(t->ndim, want[i].ndim);
        for (size_t d = 0; d < t->ndim; d++) assert_int_equal(t->shape[d], want[i].shape[d]);
        assert_int_equal(t->numel, want[i].numel);
        assert_int_equal(t->nbytes, want[i].nbytes);
        assert_memory_equal(t->data, data[i], t->nbytes);
        assert_ptr_equal(dpoc_ts_find(src, t->name), t);
        assert_int_equal(dpoc_ts_index(src, t), i);
    }

    float out[256], want_f[64];
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "a.f16"), out, 6, &err), 0);
    expect_floats(out, (const float[]){1.0f, -2.0f, 0.5f, 65504.0f, 0x1p-24f, -0.0f}, 6, "a.f16");
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "b.bf16"), out, 4, &err), 0);
    expect_floats(out, (const float[]){1.0f, -3.0f, 3.140625f, 0x1p-133f}, 4, "b.bf16");
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "c.q8_0"), out, 64, &err), 0);
    for (int j = 0; j < 32; j++) want_f[j] = (float)(j - 16) * 0.5f, want_f[32 + j] = (float)(16 - j) * 2.0f;
    expect_floats(out, want_f, 64, "c.q8_0");
    assert_true(out[0] == -8.0f && out[63] == -30.0f);
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "d.q4_0"), out, 32, &err), 0);
    for (int j = 0; j < 16; j++) want_f[j] = (float)(j - 8) * 2.0f, want_f[j + 16] = (float)(7 - j) * 2.0f;
    expect_floats(out, want_f, 32, "d.q4_0");
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "f.f32"), out, 24, &err), 0);
    expect_floats(out, c->f32, 24, "f.f32");
    /* Q2_K: listed, not converted; the message names the file, the tensor and the type */
    expect_msg(dpoc_ts_to_f32(src, dpoc_ts_find(src, "e.q2_k"), out, 256, &err), &err, DPOC_EINPUT,
               "tensor 'e.q2_k': ggml type Q2_K cannot be converted");
    assert_non_null(strstr(err.msg, dpoc_ts_where(src)));
    expect_msg(dpoc_ts_to_f32(src, dpoc_ts_find(src, "c.q8_0"), out, 63, &err), &err, DPOC_EINPUT,
               "tensor 'c.q8_0' has 64 elements");
    assert_null(dpoc_ts_find(src, "absent"));
}

static void test_gguf_file(void **state) {
    (void)state;
    gguf_case c;
    make_gguf(&c);
    const char *path = write_file("t.gguf", &c.img);
    assert_true(dpoc_source_is_gguf(path));
    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_open_gguf(&src, path, &err)) fail_msg("%s", err.msg);
    assert_string_equal(dpoc_ts_where(src), path);
    check_gguf_source(src, &c);
    dpoc_ts_close(src);
    free(c.img.p);
}

static void test_gguf_memory(void **state) {
    (void)state;
    gguf_case c;
    make_gguf(&c);
    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_open_gguf_memory(&src, c.img.p, c.img.n, "mem.gguf", &err)) fail_msg("%s", err.msg);
    assert_string_equal(dpoc_ts_where(src), "mem.gguf");
    check_gguf_source(src, &c);
    dpoc_ts_close(src);
    /* a truncated image: the reader's error, naming it; nothing left open */
    expect_msg(dpoc_ts_open_gguf_memory(&src, c.img.p, c.img.n - 1, "cut.gguf", &err), &err, DPOC_EINPUT, "cut.gguf");
    assert_null(src);
    free(c.img.p);
    /* not a GGUF */
    expect_msg(dpoc_ts_open_gguf(&src, fixture_path("tiny-llama/config.json"), &err), &err, DPOC_EINPUT,
               "not a GGUF file");
    assert_false(dpoc_source_is_gguf(fixture_path("tiny-llama/config.json")));
    assert_false(dpoc_source_is_gguf(fixture_path("tiny-llama")));
}

/* ---- memory ---- */

static void test_memory_source(void **state) {
    (void)state;
    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_new(&src, "ckpt.h5", &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_ts_format_of(src), DPOC_TS_MEMORY);
    assert_string_equal(dpoc_ts_where(src), "ckpt.h5");
    const float w[6] = {1, 2, 3, 4, 5, 6};
    const uint8_t bf[8] = {0x80, 0x3F, 0x40, 0xC0, 0x49, 0x40, 0x01, 0x00}; /* BF16_BITS */
    const int8_t i8[3] = {1, -2, 3};
    char name[32];
    snprintf(name, sizeof name, "model.w");
    assert_int_equal(dpoc_ts_add(src, name, DPOC_DT_F32, 2, (const size_t[]){2, 3}, w, sizeof w, &err), 0);
    name[0] = 'X'; /* the name was copied */
    assert_int_equal(dpoc_ts_add(src, "b", DPOC_DT_BF16, 1, (const size_t[]){4}, bf, sizeof bf, &err), 0);
    assert_int_equal(dpoc_ts_add(src, "s", DPOC_DT_F32, 0, NULL, w, sizeof w[0], &err), 0);
    assert_int_equal(dpoc_ts_add(src, "i", DPOC_DT_I8, 1, (const size_t[]){3}, i8, sizeof i8, &err), 0);
    assert_int_equal(dpoc_ts_count(src), 4);
    const dpoc_ts_tensor *t = dpoc_ts_find(src, "model.w");
    assert_non_null(t);
    assert_ptr_equal(t, dpoc_ts_at(src, 0)); /* in the order added */
    assert_ptr_equal(t->data, w);             /* zero copy */
    assert_true(t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6 && t->nbytes == 24);
    assert_string_equal(t->dtype_name, "F32");
    t = dpoc_ts_find(src, "s");
    assert_true(t && t->ndim == 0 && t->numel == 1);
    float out[6];
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "b"), out, 4, &err), 0);
    expect_floats(out, (const float[]){1.0f, -3.0f, 3.140625f, 0x1p-133f}, 4, "b");
    assert_int_equal(dpoc_ts_to_f32(src, dpoc_ts_find(src, "model.w"), out, 6, &err), 0);
    expect_floats(out, w, 6, "model.w");
    /* errors name the source and the tensor */
    expect_msg(dpoc_ts_to_f32(src, dpoc_ts_find(src, "i"), out, 3, &err), &err, DPOC_EINPUT,
               "ckpt.h5: tensor 'i' has dtype I8, which dpoc cannot convert to F32");
    expect_msg(dpoc_ts_add(src, "model.w", DPOC_DT_F32, 1, (const size_t[]){6}, w, sizeof w, &err), &err, DPOC_EINPUT,
               "ckpt.h5: tensor 'model.w' is given twice");
    expect_msg(dpoc_ts_add(src, "short", DPOC_DT_F32, 1, (const size_t[]){6}, w, 20, &err), &err, DPOC_EINPUT,
               "tensor 'short': 20 bytes given");
    expect_msg(dpoc_ts_add(src, "odd", 77, 1, (const size_t[]){1}, w, 4, &err), &err, DPOC_EINPUT,
               "tensor 'odd': unknown storage type id 77");
    /* a Q8_0 row must hold whole blocks of 32 */
    expect_msg(dpoc_ts_add(src, "q", DPOC_DT_Q8_0, 2, (const size_t[]){2, 16}, w, 34, &err), &err, DPOC_EINPUT,
               "tensor 'q': row length 16 is not a multiple of the Q8_0 block size 32");
    expect_msg(dpoc_ts_add(src, "big", DPOC_DT_F32, 2, (const size_t[]){SIZE_MAX, 2}, w, 4, &err), &err, DPOC_EINPUT,
               "tensor 'big': element count overflows");
    assert_int_equal(dpoc_ts_count(src), 4); /* nothing added by a failed call */
    /* a table that grows past its first capacity */
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof name, "t%d", i);
        assert_int_equal(dpoc_ts_add(src, name, DPOC_DT_F32, 1, (const size_t[]){1}, w + (i % 6), 4, &err), 0);
    }
    assert_int_equal(dpoc_ts_count(src), 44);
    assert_ptr_equal(dpoc_ts_find(src, "t39")->data, w + 3);
    dpoc_ts_close(src);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_safetensors_sharded),   cmocka_unit_test(test_safetensors_half_files),
        cmocka_unit_test(test_safetensors_models),    cmocka_unit_test(test_safetensors_other_dtype),
        cmocka_unit_test(test_gguf_file),             cmocka_unit_test(test_gguf_memory),
        cmocka_unit_test(test_memory_source),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
