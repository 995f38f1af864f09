/* safetensors reader/writer: round trip, fp16/bf16 conversion against bit patterns
 * derived from the IEEE-754 / bfloat16 definitions, files written by the reference
 * `safetensors` library (tests/fixtures/safetensors, made by
 * tools/make_safetensors_fixtures.py, expected values from numpy), and every
 * malformed-input case returning status 2 with a message naming file and tensor. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dpoc/safetensors.h"
#include "testutil.h"

/* ---- helpers ---- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void expect_msg(int rc, const dpoc_err *err, int code, const char *needle) {
    if (rc != code) fail_msg("status %d (expected %d), message '%s'", rc, code, err->msg);
    if (!strstr(err->msg, needle)) fail_msg("message '%s' does not mention '%s'", err->msg, needle);
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot create %s", path);
    if (n && fwrite(p, 1, n, f) != n) fail_msg("cannot write %s", path);
    if (fclose(f) != 0) fail_msg("cannot close %s", path);
}

/* A file: 8-byte length (hdr_len_field), the JSON text, then data_len bytes (0..255 pattern). */
static void write_raw(const char *path, uint64_t hdr_len_field, const char *json, size_t data_len) {
    size_t jl = strlen(json);
    size_t n = 8 + jl + data_len;
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(hdr_len_field >> (8 * i));
    memcpy(buf + 8, json, jl);
    for (size_t i = 0; i < data_len; i++) buf[8 + jl + i] = (uint8_t)i;
    write_bytes(path, buf, n);
    free(buf);
}

static void write_st(const char *path, const char *json, size_t data_len) {
    write_raw(path, strlen(json), json, data_len);
}

static char *join(char *buf, size_t n, const char *dir, const char *name) {
    snprintf(buf, n, "%s/%s", dir, name);
    return buf;
}

/* Parses json against a zeroed data section of data_len bytes; expects status 2 and needle. */
static void expect_header_error(const char *json, size_t data_len, const char *needle) {
    uint8_t *data = calloc(data_len ? data_len : 1, 1);
    assert_non_null(data);
    st_tensor *ts = NULL;
    size_t n = 0;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = st_parse_header(json, strlen(json), data, data_len, 0, "model.safetensors", &ts, &n, &err);
    expect_msg(rc, &err, DPOC_EINPUT, needle);
    if (!strstr(err.msg, "model.safetensors")) fail_msg("message '%s' does not name the file", err.msg);
    assert_int_equal(n, 0);
    free(ts);
    free(data);
}

static size_t header_ok(const char *json, size_t data_len) {
    uint8_t *data = calloc(data_len ? data_len : 1, 1);
    st_tensor *ts = NULL;
    size_t n = 0;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = st_parse_header(json, strlen(json), data, data_len, 0, "x.safetensors", &ts, &n, &err);
    if (rc) fail_msg("unexpected error: %s", err.msg);
    for (size_t i = 0; i < n; i++) free(ts[i].name);
    free(ts);
    free(data);
    return n;
}

/* ---- conversions ---- */

/* IEEE-754 binary16 value from its definition: (-1)^s x 2^(e-15) x 1.m, or 2^-14 x 0.m. */
static double half_by_definition(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0) v = ldexp((double)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp((double)(1024 + m), e - 25);
    return s ? -v : v;
}

/* bfloat16: 8-bit exponent (bias 127), 7-bit mantissa. */
static double bf16_by_definition(uint16_t b) {
    int s = b >> 15, e = (b >> 7) & 255, m = b & 127;
    double v;
    if (e == 0) v = ldexp((double)m, -133);
    else if (e == 255) v = m ? NAN : INFINITY;
    else v = ldexp((double)(128 + m), e - 134);
    return s ? -v : v;
}

static void test_f16_bit_patterns(void **state) {
    (void)state;
    static const struct {
        uint16_t h;
        uint32_t f;
    } cases[] = {
        {0x3C00, 0x3F800000}, /* 1.0 */
        {0xC000, 0xC0000000}, /* -2.0 */
        {0x3800, 0x3F000000}, /* 0.5 */
        {0x7BFF, 0x477FE000}, /* 65504, the largest half */
        {0x0001, 0x33800000}, /* 2^-24, smallest subnormal */
        {0x8001, 0xB3800000}, /* -2^-24 */
        {0x03FF, 0x387FC000}, /* 1023 x 2^-24, largest subnormal */
        {0x0400, 0x38800000}, /* 2^-14, smallest normal */
        {0x3555, 0x3EAAA000}, /* 0.333251953125 */
        {0x7C00, 0x7F800000}, /* +inf */
        {0xFC00, 0xFF800000}, /* -inf */
        {0x0000, 0x00000000}, /* +0 */
        {0x8000, 0x80000000}, /* -0 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint32_t got = f32_bits(st_f16_to_f32(cases[i].h));
        if (got != cases[i].f) fail_msg("f16 0x%04X -> 0x%08X, expected 0x%08X", cases[i].h, got, cases[i].f);
    }
    assert_true(isnan(st_f16_to_f32(0x7E00)));
    assert_true(isnan(st_f16_to_f32(0x7C01)));
    assert_true(isnan(st_f16_to_f32(0xFE00)));
    /* every one of the 65536 patterns against the definition */
    for (uint32_t h = 0; h < 65536; h++) {
        double want = half_by_definition((uint16_t)h);
        float got = st_f16_to_f32((uint16_t)h);
        if (isnan(want)) {
            if (!isnan(got)) fail_msg("f16 0x%04X: expected NaN, got %g", h, (double)got);
        } else if ((double)got != want || !signbit(got) != !signbit(want)) {
            fail_msg("f16 0x%04X: got %.10g, expected %.10g", h, (double)got, want);
        }
    }
}

static void test_bf16_bit_patterns(void **state) {
    (void)state;
    assert_true(st_bf16_to_f32(0x3F80) == 1.0f);
    assert_true(st_bf16_to_f32(0xC000) == -2.0f);
    /* -pi is 0xC0490FDB in binary32; its upper half 0xC049 is -3.140625 */
    assert_int_equal(f32_bits(st_bf16_to_f32(0xC049)), 0xC0490000u);
    assert_true(st_bf16_to_f32(0xC049) == -3.140625f);
    assert_true(st_bf16_to_f32(0x4049) == 3.140625f);
    assert_int_equal(f32_bits(st_bf16_to_f32(0x7F80)), 0x7F800000u);
    assert_int_equal(f32_bits(st_bf16_to_f32(0xFF80)), 0xFF800000u);
    assert_true(isnan(st_bf16_to_f32(0x7FC0)));
    assert_int_equal(f32_bits(st_bf16_to_f32(0x8000)), 0x80000000u);
    assert_true((double)st_bf16_to_f32(0x0001) == ldexp(1.0, -133)); /* smallest subnormal */
    assert_true((double)st_bf16_to_f32(0x7F7F) == ldexp(255.0, 120)); /* largest finite */
    for (uint32_t b = 0; b < 65536; b++) {
        double want = bf16_by_definition((uint16_t)b);
        float got = st_bf16_to_f32((uint16_t)b);
        if (isnan(want)) {
            if (!isnan(got)) fail_msg("bf16 0x%04X: expected NaN", b);
        } else if ((double)got != want || !signbit(got) != !signbit(want)) {
            fail_msg("bf16 0x%04X: got %.10g, expected %.10g", b, (double)got, want);
        }
    }
}

/* ---- round trip ---- */

static void test_round_trip(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[512];
    join(path, sizeof path, dir, "model.safetensors");

    float a[6] = {1.0f, -2.5f, 3.14159265f, 1e-30f, -0.0f, 65504.0f};
    float b[1] = {42.0f};
    float c[7];
    for (int i = 0; i < 7; i++) c[i] = (float)i * 0.1f - 0.3f;
    c[3] = INFINITY;
    const char *names[] = {"model.layers.0.mlp.up_proj.weight", "scalar", "empty", "odd \"quoted\" name"};
    const float *data[] = {a, b, NULL, c};
    size_t ndims[] = {2, 0, 2, 1};
    size_t shapes[][ST_MAX_DIMS] = {{2, 3}, {0}, {0, 5}, {7}};
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = st_write_f32(path, 4, names, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, &err);
    if (rc) fail_msg("write: %s", err.msg);

    /* the header is padded with spaces to a multiple of 8, as the reference writer does */
    size_t len = 0;
    char *raw = read_text_file(path, &len);
    assert_non_null(raw);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | (uint8_t)raw[i];
    assert_int_equal(hl % 8, 0);
    assert_int_equal(len, 8 + hl + (6 + 1 + 0 + 7) * 4);
    assert_true(raw[8] == '{');
    free(raw);

    for (int pass = 0; pass < 2; pass++) {
        st_model m;
        rc = pass == 0 ? st_open_file(&m, path, &err) : st_open_dir(&m, dir, &err);
        if (rc) fail_msg("open: %s", err.msg);
        assert_int_equal(m.n_tensors, 4);
        assert_int_equal(m.n_files, 1);
        for (int k = 0; k < 4; k++) {
            const st_tensor *t = st_find(&m, names[k]);
            assert_non_null(t);
            assert_int_equal(t->dtype, ST_F32);
            assert_string_equal(t->dtype_str, "F32");
            assert_int_equal(t->ndim, ndims[k]);
            size_t numel = 1;
            for (size_t d = 0; d < ndims[k]; d++) {
                assert_int_equal(t->shape[d], shapes[k][d]);
                numel *= shapes[k][d];
            }
            assert_int_equal(t->numel, numel);
            float out[8];
            rc = st_read_f32(t, out, ndims[k], shapes[k], &err);
            if (rc) fail_msg("read %s: %s", names[k], err.msg);
            for (size_t i = 0; i < numel; i++) assert_int_equal(f32_bits(out[i]), f32_bits(data[k][i]));
        }
        assert_null(st_find(&m, "absent"));
        st_close(&m);
        assert_null(m.tensors);
        st_close(&m); /* twice is harmless */
    }
    unlink(path);
    rmdir(dir);
}

static void test_write_errors(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[512];
    join(path, sizeof path, dir, "w.safetensors");
    float a[2] = {1, 2};
    const float *data[] = {a, a};
    size_t ndims[] = {1, 1};
    size_t shapes[][ST_MAX_DIMS] = {{2}, {2}};
    dpoc_err err;

    const char *dup[] = {"x", "x"};
    int rc = st_write_f32(path, 2, dup, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, &err);
    expect_msg(rc, &err, DPOC_EINPUT, "duplicate tensor name 'x'");
    assert_int_not_equal(access(path, F_OK), 0);

    const char *names[] = {"x", "y"};
    char bad[600];
    join(bad, sizeof bad, dir, "no/such/dir/w.safetensors");
    rc = st_write_f32(bad, 2, names, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, &err);
    expect_msg(rc, &err, DPOC_EIO, bad);

    /* a write that fails midway (file size limit) leaves no partial file */
    static float big[1 << 16];
    const float *bdata[] = {big};
    size_t bndims[] = {1};
    size_t bshapes[][ST_MAX_DIMS] = {{1 << 16}};
    const char *bnames[] = {"big"};
    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = 4096;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    rc = st_write_f32(path, 1, bnames, bdata, bndims, (const size_t(*)[ST_MAX_DIMS])bshapes, &err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, old_handler);
    expect_msg(rc, &err, DPOC_EIO, path);
    assert_int_not_equal(access(path, F_OK), 0);
    rmdir(dir);
}

/* ---- files written by the reference implementation ---- */

static void check_fixture_values(const st_model *m, const cJSON *tensors, const char *what) {
    assert_int_equal(m->n_tensors, (size_t)cJSON_GetArraySize(tensors));
    const cJSON *e;
    cJSON_ArrayForEach(e, tensors) {
        const st_tensor *t = st_find(m, e->string);
        if (!t) fail_msg("%s: tensor '%s' not found", what, e->string);
        assert_string_equal(t->dtype_str, cJSON_GetObjectItem(e, "dtype")->valuestring);
        const cJSON *shape = cJSON_GetObjectItem(e, "shape");
        size_t ndim = (size_t)cJSON_GetArraySize(shape), sh[ST_MAX_DIMS];
        assert_int_equal(t->ndim, ndim);
        for (size_t d = 0; d < ndim; d++) sh[d] = (size_t)cJSON_GetArrayItem(shape, (int)d)->valuedouble;
        const cJSON *bits = cJSON_GetObjectItem(e, "f32_bits");
        size_t n = (size_t)cJSON_GetArraySize(bits);
        assert_int_equal(t->numel, n);
        float *out = calloc(n ? n : 1, sizeof *out);
        dpoc_err err;
        int rc = st_read_f32(t, out, ndim, sh, &err);
        if (rc) fail_msg("%s: %s", what, err.msg);
        for (size_t i = 0; i < n; i++) {
            uint32_t want = (uint32_t)cJSON_GetArrayItem(bits, (int)i)->valuedouble;
            float wf;
            memcpy(&wf, &want, sizeof wf);
            if (isnan(wf) ? !isnan(out[i]) : f32_bits(out[i]) != want)
                fail_msg("%s: %s[%zu] = 0x%08X, expected 0x%08X", what, e->string, i, f32_bits(out[i]), want);
        }
        free(out);
    }
}

static void test_reference_fixtures(void **state) {
    (void)state;
    cJSON *expected = load_json_fixture("safetensors/expected.json");
    static const char *files[] = {"f32.safetensors", "f16.safetensors", "bf16.safetensors"};
    dpoc_err err;
    for (size_t i = 0; i < 3; i++) {
        char rel[128];
        snprintf(rel, sizeof rel, "safetensors/%s", files[i]);
        st_model m;
        int rc = st_open_file(&m, fixture_path(rel), &err);
        if (rc) fail_msg("%s: %s", rel, err.msg);
        check_fixture_values(&m, cJSON_GetObjectItem(expected, files[i]), files[i]);
        st_close(&m);
    }
    st_model m;
    int rc = st_open_dir(&m, fixture_path("safetensors/sharded"), &err);
    if (rc) fail_msg("sharded: %s", err.msg);
    assert_int_equal(m.n_files, 2);
    check_fixture_values(&m, cJSON_GetObjectItem(expected, "sharded"), "sharded");
    const st_tensor *t = st_find(&m, "lm_head.weight");
    assert_non_null(t);
    assert_non_null(strstr(m.files[t->file_index].path, "model-00002-of-00002.safetensors"));
    st_close(&m);
    cJSON_Delete(expected);
}

/* F32 data at an odd offset in the mapping: read through memcpy, no unaligned loads. */
static void test_unaligned_data(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[512];
    join(path, sizeof path, dir, "u.safetensors");
    const char *json = "{\"a\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                       "\"h\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[1,3]},"
                       "\"f\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[3,15]}}";
    size_t jl = strlen(json);
    uint8_t buf[512];
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)jl >> (8 * i));
    memcpy(buf + 8, json, jl);
    uint8_t *d = buf + 8 + jl;
    d[0] = 7;
    d[1] = 0x00, d[2] = 0x3C; /* f16 1.0 */
    float f[3] = {1.5f, -2.0f, 1e-20f};
    memcpy(d + 3, f, sizeof f);
    write_bytes(path, buf, 8 + jl + 15);

    st_model m;
    dpoc_err err;
    int rc = st_open_file(&m, path, &err);
    if (rc) fail_msg("%s", err.msg);
    float out[3];
    size_t s3[] = {3}, s1[] = {1};
    assert_int_equal(st_read_f32(st_find(&m, "f"), out, 1, s3, &err), 0);
    for (int i = 0; i < 3; i++) assert_true(out[i] == f[i]);
    assert_int_equal(st_read_f32(st_find(&m, "h"), out, 1, s1, &err), 0);
    assert_true(out[0] == 1.0f);
    /* a dtype the format knows but dpoc does not convert */
    const st_tensor *a = st_find(&m, "a");
    assert_int_equal(a->dtype, ST_OTHER);
    rc = st_read_f32(a, out, 1, s1, &err);
    expect_msg(rc, &err, DPOC_EINPUT, "dtype I8");
    expect_msg(rc, &err, DPOC_EINPUT, "'a'");
    st_close(&m);
    unlink(path);
    rmdir(dir);
}

/* ---- malformed headers ---- */

#define T(body) "{\"model.layers.0.mlp.up_proj.weight\":" body "}"

static void test_header_errors(void **state) {
    (void)state;
    /* the message of the brief, exactly */
    {
        const char *json = T("{\"dtype\":\"F32\",\"shape\":[4,8],\"data_offsets\":[0,100]}");
        st_tensor *ts = NULL;
        size_t n = 0;
        uint8_t data[128] = {0};
        dpoc_err err;
        int rc = st_parse_header(json, strlen(json), data, sizeof data, 0, "model.safetensors", &ts, &n, &err);
        assert_int_equal(rc, DPOC_EINPUT);
        assert_string_equal(err.msg, "model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight': "
                                     "data_offsets [0, 100] do not match shape [4, 8] of F32 (128 bytes)");
        free(ts);
    }
    expect_header_error("{\"a\":", 0, "not valid JSON");
    expect_header_error("not json", 0, "not valid JSON");
    expect_header_error("", 0, "not valid JSON");
    expect_header_error("{} x", 0, "after the JSON");
    expect_header_error("[1, 2]", 0, "not a JSON object");
    expect_header_error(T("{\"shape\":[1],\"data_offsets\":[0,4]}"), 4, "'model.layers.0.mlp.up_proj.weight': missing 'dtype'");
    expect_header_error(T("{\"dtype\":3,\"shape\":[1],\"data_offsets\":[0,4]}"), 4, "'dtype' is 3, not a string");
    expect_header_error(T("{\"dtype\":\"F99\",\"shape\":[1],\"data_offsets\":[0,4]}"), 4, "unknown dtype 'F99'");
    expect_header_error(T("{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}"), 4, "unknown dtype 'f32'");
    expect_header_error(T("{\"dtype\":\"F32\",\"data_offsets\":[0,4]}"), 4, "missing 'shape'");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}"), 4, "'shape' is 4, not an array");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,4]}"), 64, "shape[1] is -3");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,10]}"), 64, "shape[0] is 2.5");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}"), 64, "shape[0] is a string");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,8]}"), 64, "shape[0] is 1e+300");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[9007199254740994],\"data_offsets\":[0,8]}"), 64,
                        "not a non-negative integer <= 2^53");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}"), 4,
                        "more than 8 dimensions");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}"),
                        4, "too large");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1]}"), 4, "missing 'data_offsets'");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}"), 4, "'data_offsets' must be");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}"), 8, "'data_offsets' must be");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}"), 8, "'data_offsets' must be");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4.5]}"), 8, "'data_offsets' must be");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}"), 8, "end before they begin");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}"), 8,
                        "data_offsets [4, 12] are beyond the data section (8 bytes)");
    expect_header_error(T("{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[18446744073709551608,18446744073709551616]}"),
                        8, "'data_offsets' must be");
    expect_header_error(T("{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,8]}"), 16, "shape [2] of I64 (16 bytes)");
    expect_header_error(T("{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,3]}"), 16, "shape [3] of F16 (6 bytes)");
    expect_header_error(T("{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}"), 16, "not a whole number of bytes");
    expect_header_error(T("\"F32\""), 16, "entry is not an object");
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                        16, "tensor 'b': data_offsets [4, 12] overlap tensor 'a' [0, 8]");
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                        "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[16,18]},"
                        "\"c\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[8,10]}}",
                        32, "overlap tensor 'a'");
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                        8, "tensor 'a': duplicate tensor name");
    expect_header_error("{\"__metadata__\":[1]}", 0, "'__metadata__' must be an object of strings");
    expect_header_error("{\"__metadata__\":{\"format\":1}}", 0, "'__metadata__' entry 'format' is not a string");
    expect_header_error("{\"__metadata__\":{},\"__metadata__\":{}}", 0, "'__metadata__' twice");
    /* a later bad entry: the good ones before it are released (LeakSanitizer) and n stays 0 */
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,9]}}",
                        16, "tensor 'b'");

    /* accepted: metadata, empty tensors sharing offsets, gaps, every known dtype */
    assert_int_equal(header_ok("{\"__metadata__\":{\"format\":\"pt\"}}", 0), 0);
    assert_int_equal(header_ok("{}", 0), 0);
    assert_int_equal(header_ok("{\"a\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                               "\"c\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[10,12]}}  \n",
                               12),
                     3);
    static const struct {
        const char *dt;
        size_t bytes;
    } known[] = {{"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2},
                 {"F16", 2}, {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"F64", 8}, {"I64", 8}, {"U64", 8}};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        char json[256];
        snprintf(json, sizeof json, "{\"t\":{\"dtype\":\"%s\",\"shape\":[3,2],\"data_offsets\":[0,%zu]}}", known[i].dt,
                 6 * known[i].bytes);
        assert_int_equal(header_ok(json, 6 * known[i].bytes), 1);
        snprintf(json, sizeof json, "{\"t\":{\"dtype\":\"%s\",\"shape\":[3,2],\"data_offsets\":[0,%zu]}}", known[i].dt,
                 6 * known[i].bytes + 1);
        expect_header_error(json, 64, "do not match shape [3, 2]");
    }
    /* appends after what is already there */
    {
        const char *j1 = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        const char *j2 = "{\"y\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
                         "\"z\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[4,6]}}";
        uint8_t data[8] = {0};
        st_tensor *ts = NULL;
        size_t n = 0;
        dpoc_err err;
        assert_int_equal(st_parse_header(j1, strlen(j1), data, 8, 0, "a", &ts, &n, &err), 0);
        assert_int_equal(st_parse_header(j2, strlen(j2), data, 8, 1, "b", &ts, &n, &err), 0);
        assert_int_equal(n, 3);
        assert_string_equal(ts[0].name, "x");
        assert_int_equal(ts[2].file_index, 1);
        assert_ptr_equal(ts[2].data, data + 4);
        assert_int_equal(ts[2].nbytes, 2);
        assert_int_equal(st_parse_header("{", 1, data, 8, 2, "c", &ts, &n, &err), DPOC_EINPUT);
        assert_int_equal(n, 3);
        for (size_t i = 0; i < n; i++) free(ts[i].name);
        free(ts);
    }
}

/* ---- malformed files ---- */

static void test_file_errors(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[512];
    join(path, sizeof path, dir, "model.safetensors");
    dpoc_err err;
    st_model m;

    write_bytes(path, "\x10\0\0\0\0", 5);
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "too short");
    expect_msg(2, &err, DPOC_EINPUT, path);
    assert_null(m.files);

    write_bytes(path, "", 0);
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "is 0 bytes");

    const char *json = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    write_raw(path, strlen(json) + 5, json, 4); /* claims one more byte than the file has */
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "beyond the end of the file");
    write_raw(path, (uint64_t)1 << 40, json, 4);
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "larger than the limit");
    write_raw(path, UINT64_MAX, json, 4);
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "larger than the limit");
    write_raw(path, strlen(json), json, 3); /* data section one byte short */
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "tensor 'a': data_offsets [0, 4] are beyond");
    expect_msg(2, &err, DPOC_EINPUT, path);
    write_st(path, "{\"a\": [", 0);
    expect_msg(st_open_file(&m, path, &err), &err, DPOC_EINPUT, "not valid JSON");

    char nope[600];
    expect_msg(st_open_file(&m, join(nope, sizeof nope, dir, "nope"), &err), &err, DPOC_EINPUT, "cannot open");
    expect_msg(st_open_file(&m, dir, &err), &err, DPOC_EINPUT, "not a regular file");

    unlink(path);
    /* neither file in the directory */
    expect_msg(st_open_dir(&m, dir, &err), &err, DPOC_EINPUT, dir);
    expect_msg(2, &err, DPOC_EINPUT, "model.safetensors.index.json");
    expect_msg(2, &err, DPOC_EINPUT, "neither model.safetensors nor");
    rmdir(dir);
}

static void test_read_shape_mismatch(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char path[512];
    join(path, sizeof path, dir, "s.safetensors");
    write_st(path, "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 12);
    st_model m;
    dpoc_err err;
    assert_int_equal(st_open_file(&m, path, &err), 0);
    const st_tensor *t = st_find(&m, "w");
    float out[6];
    size_t want[] = {3, 2};
    expect_msg(st_read_f32(t, out, 2, want, &err), &err, DPOC_EINPUT, "tensor 'w' has shape [2, 3], expected [3, 2]");
    size_t want1[] = {6};
    expect_msg(st_read_f32(t, out, 1, want1, &err), &err, DPOC_EINPUT, "expected [6]");
    size_t ok[] = {2, 3};
    assert_int_equal(st_read_f32(t, out, 2, ok, &err), 0);
    st_close(&m);
    unlink(path);
    rmdir(dir);
}

/* ---- sharded directories ---- */

static const char *shard_a = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
static const char *shard_b = "{\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";

static void expect_index_error(const char *index_json, const char *a_json, const char *b_json, const char *needle) {
    const char *dir = make_temp_dir();
    char p[3][512];
    join(p[0], sizeof p[0], dir, "model.safetensors.index.json");
    join(p[1], sizeof p[1], dir, "a.safetensors");
    join(p[2], sizeof p[2], dir, "b.safetensors");
    write_bytes(p[0], index_json, strlen(index_json));
    if (a_json) write_st(p[1], a_json, 4);
    if (b_json) write_st(p[2], b_json, 4);
    st_model m;
    dpoc_err err;
    int rc = st_open_dir(&m, dir, &err);
    if (!needle) {
        if (rc) fail_msg("unexpected error: %s", err.msg);
        assert_int_equal(m.n_files, 2);
        assert_int_equal(m.n_tensors, 2);
        st_close(&m);
    } else {
        expect_msg(rc, &err, DPOC_EINPUT, needle);
        assert_null(m.files);
        assert_int_equal(m.n_tensors, 0);
    }
    for (int i = 0; i < 3; i++) unlink(p[i]);
    rmdir(dir);
}

static void test_index_errors(void **state) {
    (void)state;
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}", shard_a, shard_b, NULL);
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"c.safetensors\"}}", shard_a, shard_b,
                       "names shard 'c.safetensors'");
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"c.safetensors\"}}", shard_a, shard_b,
                       "cannot open");
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"../b.safetensors\"}}", shard_a, shard_b,
                       "tensor 'y': shard '../b.safetensors' is not a plain file name");
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"/etc/passwd\"}}", shard_a, shard_b,
                       "not a plain file name");
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"..\"}}", shard_a, shard_b,
                       "not a plain file name");
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":3}}", shard_a, shard_b, "not a string");
    expect_index_error("{\"weight_map\":[]}", shard_a, shard_b, "'weight_map' is not an object");
    expect_index_error("{\"metadata\":{}}", shard_a, shard_b, "'weight_map' is missing");
    expect_index_error("{\"weight_map\":{}}", shard_a, shard_b, "'weight_map' is empty");
    expect_index_error("{\"weight_map\":", shard_a, shard_b, "not a JSON object");
    /* in the index, not in its shard */
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"z\":\"b.safetensors\"}}",
                       shard_a, shard_b, "tensor 'z' is missing from its shard");
    /* in a shard, not in the index */
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}",
                       "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
                       shard_b, "tensor 'w' is not listed in");
    /* in the other shard than the index says */
    expect_index_error("{\"weight_map\":{\"x\":\"b.safetensors\",\"y\":\"a.safetensors\"}}", shard_a, shard_b,
                       "but the index puts it in");
    /* the same name in two shards */
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}", shard_a,
                       "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"y\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}",
                       "tensor 'x' is in both");
    /* listed twice in the index */
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"x\":\"a.safetensors\"}}",
                       shard_a, shard_b, "tensor 'x' is listed twice");
    /* a bad shard: the message names the shard file and the tensor */
    expect_index_error("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}", shard_a,
                       "{\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "b.safetensors: tensor 'y'");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_bit_patterns),  cmocka_unit_test(test_bf16_bit_patterns),
        cmocka_unit_test(test_round_trip),        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_reference_fixtures), cmocka_unit_test(test_unaligned_data),
        cmocka_unit_test(test_header_errors),     cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_read_shape_mismatch), cmocka_unit_test(test_index_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
