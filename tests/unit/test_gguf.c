/* GGUF reader: dequantization of every supported type against blocks whose values
 * are derived by hand from ggml's block definitions (ggml-common.h /
 * dequantize_row_* in ggml-quants.c), round trips through small GGUF files
 * written here (gguf_image.h's tiny writer), malformed files (status 2 with a message, never
 * a crash), the model mapping with llama's Q/K permutation undone, and (when
 * tools/fetch-model has run) the real SmolLM2-135M-Instruct Q4_1 GGUF. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dpoc/gguf.h"
#include "dpoc/model.h"
#include "dpoc/model_load.h"
#include "dpoc/source.h"
#include "dpoc/tensor_source.h"
#include "dpoc/tokenizer.h"
#include "dpoc/tokenizer_source.h"
#include "gguf_image.h"
#include "testutil.h"

static void expect_msg(int rc, const dpoc_err *err, int code, const char *needle) {
    if (rc != code) fail_msg("status %d (expected %d), message '%s'", rc, code, err->msg);
    if (!strstr(err->msg, needle)) fail_msg("message '%s' does not mention '%s'", err->msg, needle);
}

static void expect_floats(const float *got, const float *want, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (!(got[i] == want[i]))
            fail_msg("%s: element %zu is %.9g, expected %.9g", what, i, (double)got[i], (double)want[i]);
}

/* ---- dequantization, one block per type ---- */

static void deq(uint32_t type, const uint8_t *blk, size_t nbytes, float *out, size_t n) {
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_gguf_dequantize_raw(type, blk, nbytes, out, n, &err);
    if (rc) fail_msg("dequantize %s: %s", dpoc_ggml_type_name(type), err.msg);
}

static void test_deq_plain(void **state) {
    (void)state;
    /* F32 1.0 = 0x3F800000, -2.5 = 0xC0200000 (little-endian bytes) */
    const uint8_t f32[8] = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x20, 0xC0};
    /* F16: 0x3C00 = 1.0, 0xC000 = -2.0, 0x3800 = 0.5, 0x7BFF = 65504 (max half) */
    const uint8_t f16[8] = {0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0xFF, 0x7B};
    /* BF16 = top half of the f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x4049 = 3.140625 */
    const uint8_t bf16[6] = {0x80, 0x3F, 0x40, 0xC0, 0x49, 0x40};
    float out[4];
    deq(DPOC_GGML_F32, f32, 8, out, 2);
    expect_floats(out, (const float[]){1.0f, -2.5f}, 2, "F32");
    deq(DPOC_GGML_F16, f16, 8, out, 4);
    expect_floats(out, (const float[]){1.0f, -2.0f, 0.5f, 65504.0f}, 4, "F16");
    deq(DPOC_GGML_BF16, bf16, 6, out, 3);
    expect_floats(out, (const float[]){1.0f, -3.0f, 3.140625f}, 3, "BF16");
}

static void test_deq_q8_0(void **state) {
    (void)state;
    /* {half d = 0x3800 = 0.5; int8 qs[32] = j - 16}: y[j] = (j - 16) * 0.5 */
    uint8_t b[34] = {0x00, 0x38};
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(j - 16);
    float out[32], want[32];
    for (int j = 0; j < 32; j++) want[j] = (float)(j - 16) * 0.5f;
    deq(DPOC_GGML_Q8_0, b, 34, out, 32);
    expect_floats(out, want, 32, "Q8_0");
    assert_true(out[0] == -8.0f && out[31] == 7.5f);
}

static void test_deq_q4(void **state) {
    (void)state;
    float out[32], want[32];
    /* Q4_0 {half d = 0x4000 = 2.0; u8 qs[16]}, qs[j] = j | (15 - j) << 4:
     * y[j] = (j - 8) * 2 (low nibbles), y[j + 16] = ((15 - j) - 8) * 2 (high nibbles) */
    uint8_t b0[18] = {0x00, 0x40};
    for (int j = 0; j < 16; j++) b0[2 + j] = (uint8_t)(j | (15 - j) << 4);
    for (int j = 0; j < 16; j++) want[j] = (float)(j - 8) * 2.0f, want[j + 16] = (float)(7 - j) * 2.0f;
    deq(DPOC_GGML_Q4_0, b0, 18, out, 32);
    expect_floats(out, want, 32, "Q4_0");
    assert_true(out[0] == -16.0f && out[15] == 14.0f && out[16] == 14.0f && out[31] == -16.0f);

    /* Q4_1 {half d = 0x3800 = 0.5; half m = 0xBC00 = -1.0; u8 qs[16]}, same qs:
     * y[j] = j * 0.5 - 1, y[j + 16] = (15 - j) * 0.5 - 1 */
    uint8_t b1[20] = {0x00, 0x38, 0x00, 0xBC};
    for (int j = 0; j < 16; j++) b1[4 + j] = (uint8_t)(j | (15 - j) << 4);
    for (int j = 0; j < 16; j++) want[j] = (float)j * 0.5f - 1.0f, want[j + 16] = (float)(15 - j) * 0.5f - 1.0f;
    deq(DPOC_GGML_Q4_1, b1, 20, out, 32);
    expect_floats(out, want, 32, "Q4_1");
    assert_true(out[0] == -1.0f && out[15] == 6.5f);
}

static void test_deq_q5(void **state) {
    (void)state;
    float out[32], want[32];
    /* Q5_0 {half d = 0x3C00 = 1.0; u8 qh[4]; u8 qs[16]}: qh bytes 55 55 AA AA = u32
     * 0xAAAA5555, so the 5th bit of element j < 16 (bit j) is set for even j and the
     * 5th bit of element j + 16 (bit j + 16) for odd j. qs[j] = j | (15 - j) << 4.
     * y = (q - 16) * d. */
    uint8_t b0[22] = {0x00, 0x3C, 0x55, 0x55, 0xAA, 0xAA};
    for (int j = 0; j < 16; j++) b0[6 + j] = (uint8_t)(j | (15 - j) << 4);
    for (int j = 0; j < 16; j++) {
        want[j] = (float)(j + (j % 2 == 0 ? 16 : 0) - 16);
        want[j + 16] = (float)((15 - j) + (j % 2 == 1 ? 16 : 0) - 16);
    }
    deq(DPOC_GGML_Q5_0, b0, 22, out, 32);
    expect_floats(out, want, 32, "Q5_0");
    /* by hand: y[0] = (0 | 16) - 16 = 0; y[1] = 1 - 16 = -15; y[16] = 15 - 16 = -1; y[17] = (14 | 16) - 16 = 14 */
    assert_true(out[0] == 0.0f && out[1] == -15.0f && out[16] == -1.0f && out[17] == 14.0f);

    /* Q5_1 {half d = 0.5; half m = 0x4000 = 2.0; qh; qs} same bits: y = q * 0.5 + 2 */
    uint8_t b1[24] = {0x00, 0x38, 0x00, 0x40, 0x55, 0x55, 0xAA, 0xAA};
    for (int j = 0; j < 16; j++) b1[8 + j] = (uint8_t)(j | (15 - j) << 4);
    for (int j = 0; j < 16; j++) {
        want[j] = (float)(j + (j % 2 == 0 ? 16 : 0)) * 0.5f + 2.0f;
        want[j + 16] = (float)((15 - j) + (j % 2 == 1 ? 16 : 0)) * 0.5f + 2.0f;
    }
    deq(DPOC_GGML_Q5_1, b1, 24, out, 32);
    expect_floats(out, want, 32, "Q5_1");
    assert_true(out[0] == 10.0f && out[17] == 17.0f); /* 16*0.5+2, (14+16)*0.5+2 */
}

/* Q4_K / Q5_K scale bytes for 6-bit sub-block scales sc[8] = {1,2,3,4,5,6,17,40} and
 * mins m[8] = {0,1,2,3,4,5,33,63}, packed as ggml's get_scale_min_k4 reads them:
 * bytes 0..3: sc[j] | (sc[j+4] >> 4) << 6; bytes 4..7: m[j] | (m[j+4] >> 4) << 6;
 * bytes 8..11: (sc[j+4] & 15) | (m[j+4] & 15) << 4. */
static const uint8_t k_scales[12] = {0x01, 0x02, 0x43, 0x84, 0x00, 0x01, 0x82, 0xC3, 0x45, 0x56, 0x11, 0xF8};
static const int k_sc[8] = {1, 2, 3, 4, 5, 6, 17, 40};
static const int k_m[8] = {0, 1, 2, 3, 4, 5, 33, 63};

static void test_deq_q4_k(void **state) {
    (void)state;
    /* {half d = 1.0; half dmin = 0.5; scales[12]; qs[128]}. Element e: group g = e / 64,
     * within it the first 32 take the low nibbles of qs[32g + l] with sub-block 2g, the
     * next 32 the high nibbles with sub-block 2g + 1; y = d*sc*q - dmin*m. */
    uint8_t b[144] = {0x00, 0x3C, 0x00, 0x38};
    memcpy(b + 4, k_scales, 12);
    for (int i = 0; i < 128; i++) b[16 + i] = (uint8_t)(i * 11 + 1);
    float out[256], want[256];
    for (int e = 0; e < 256; e++) {
        int g = e / 64, hi = (e % 64) / 32, l = e % 32, sb = 2 * g + hi;
        int byte = (uint8_t)((32 * g + l) * 11 + 1);
        int q = hi ? byte >> 4 : byte & 15;
        want[e] = 1.0f * (float)k_sc[sb] * (float)q - 0.5f * (float)k_m[sb];
    }
    deq(DPOC_GGML_Q4_K, b, 144, out, 256);
    expect_floats(out, want, 256, "Q4_K");
    /* by hand: e=0: qs[0]=1, low 1 -> 1*1 - 0 = 1; e=32: high nibble 0 -> 0 - 0.5*1 = -0.5;
     * e=200: qs[104]=121=0x79, low 9, sub-block 6 -> 17*9 - 0.5*33 = 136.5;
     * e=255: qs[127]=118=0x76, high 7, sub-block 7 -> 40*7 - 0.5*63 = 248.5 */
    assert_true(out[0] == 1.0f && out[32] == -0.5f && out[200] == 136.5f && out[255] == 248.5f);
}

static void test_deq_q5_k(void **state) {
    (void)state;
    /* {half d = 1.0; half dmin = 0.5; scales[12]; qh[32]; qs[128]}: as Q4_K plus a 5th
     * bit: element 64g + l takes bit 2g of qh[l], element 64g + 32 + l bit 2g + 1. */
    uint8_t b[176] = {0x00, 0x3C, 0x00, 0x38};
    memcpy(b + 4, k_scales, 12);
    for (int i = 0; i < 32; i++) b[16 + i] = (uint8_t)(i * 37);
    for (int i = 0; i < 128; i++) b[48 + i] = (uint8_t)(i * 11 + 1);
    float out[256], want[256];
    for (int e = 0; e < 256; e++) {
        int g = e / 64, hi = (e % 64) / 32, l = e % 32, sb = 2 * g + hi;
        int byte = (uint8_t)((32 * g + l) * 11 + 1), h = (uint8_t)(l * 37);
        int q = (hi ? byte >> 4 : byte & 15) + 16 * ((h >> sb) & 1);
        want[e] = (float)k_sc[sb] * (float)q - 0.5f * (float)k_m[sb];
    }
    deq(DPOC_GGML_Q5_K, b, 176, out, 256);
    expect_floats(out, want, 256, "Q5_K");
    /* by hand: e=33: qs[1]=12, high 0, qh[1]=37=0b100101 bit 1 = 0 -> 2*0 - 0.5*1 = -0.5;
     * e=65: qs[33]=108=0x6C, low 12, qh[1] bit 2 = 1 -> q=28, 3*28 - 0.5*2 = 83 */
    assert_true(out[33] == -0.5f && out[65] == 83.0f);
}

static void test_deq_q6_k(void **state) {
    (void)state;
    /* {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d = 0x3400 = 0.25}. Element e: half
     * n = e / 128, quarter k = (e % 128) / 32, l = e % 32: low 4 bits from ql[64n + l]
     * (k = 0: low nibble, k = 2: high) or ql[64n + 32 + l] (k = 1 low, k = 3 high), high 2
     * bits = (qh[32n + l] >> 2k) & 3, scale sc[8n + l/16 + 2k]; y = d * sc * (q - 32). */
    uint8_t b[210];
    static const int8_t sc[16] = {1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16};
    for (int i = 0; i < 128; i++) b[i] = (uint8_t)(i * 7 + 3);
    for (int i = 0; i < 64; i++) b[128 + i] = (uint8_t)(i * 13 + 5);
    memcpy(b + 192, sc, 16);
    b[208] = 0x00, b[209] = 0x34;
    float out[256], want[256];
    for (int e = 0; e < 256; e++) {
        int n = e / 128, k = (e % 128) / 32, l = e % 32;
        int lo_byte = (uint8_t)((64 * n + (k & 1) * 32 + l) * 7 + 3);
        int lo = k >= 2 ? lo_byte >> 4 : lo_byte & 15;
        int hb = ((uint8_t)((32 * n + l) * 13 + 5) >> (2 * k)) & 3;
        want[e] = 0.25f * (float)sc[8 * n + l / 16 + 2 * k] * (float)((lo | hb << 4) - 32);
    }
    deq(DPOC_GGML_Q6_K, b, 210, out, 256);
    expect_floats(out, want, 256, "Q6_K");
    /* by hand: e=0: ql[0]=3, qh[0]=5 -> bits 0-1 = 1, q = 19, 0.25*1*(19-32) = -3.25;
     * e=255: ql[127]=124=0x7C high 7, qh[63]=56 bits 6-7 = 0, q = 7, sc[15] = -16 ->
     * 0.25*-16*(7-32) = 100 */
    assert_true(out[0] == -3.25f && out[255] == 100.0f);
}

static void test_deq_errors(void **state) {
    (void)state;
    dpoc_err err;
    uint8_t b[84] = {0};
    float out[256];
    expect_msg(dpoc_gguf_dequantize_raw(DPOC_GGML_Q2_K, b, 84, out, 256, &err), &err, DPOC_EINPUT, "Q2_K");
    expect_msg(dpoc_gguf_dequantize_raw(DPOC_GGML_Q8_0, b, 34, out, 31, &err), &err, DPOC_EINPUT, "Q8_0");
    expect_msg(dpoc_gguf_dequantize_raw(DPOC_GGML_Q8_0, b, 33, out, 32, &err), &err, DPOC_EINPUT, "33 bytes");
    expect_msg(dpoc_gguf_dequantize_raw(77, b, 4, out, 1, &err), &err, DPOC_EINPUT, "unknown ggml type 77");
}

/* ---- round trip ---- */

static void round_trip(uint32_t version, size_t align) {
    buf kv = {0};
    size_t n_kv = 0;
#define KV(stmt) (stmt, n_kv++)
    if (align != 32) KV(kv_u32(&kv, "general.alignment", (uint32_t)align));
    KV(kv_str(&kv, "general.architecture", "llama"));
    KV((kv_head(&kv, "t.u8", DPOC_GGUF_UINT8), put_le(&kv, 200, 1)));
    KV((kv_head(&kv, "t.i8", DPOC_GGUF_INT8), put_le(&kv, (uint8_t)-5, 1)));
    KV((kv_head(&kv, "t.u16", DPOC_GGUF_UINT16), put_le(&kv, 60000, 2)));
    KV((kv_head(&kv, "t.i16", DPOC_GGUF_INT16), put_le(&kv, (uint16_t)-300, 2)));
    KV(kv_u32(&kv, "t.u32", 4000000000u));
    KV((kv_head(&kv, "t.i32", DPOC_GGUF_INT32), put_le(&kv, (uint32_t)-70000, 4)));
    KV(kv_f32(&kv, "t.f32", 1e-5f));
    KV((kv_head(&kv, "t.bool", DPOC_GGUF_BOOL), put_le(&kv, 1, 1)));
    KV(kv_str(&kv, "t.str", "héllo"));
    KV((kv_head(&kv, "t.u64", DPOC_GGUF_UINT64), put_le(&kv, 0xFFFFFFFFFFFFull, 8)));
    KV((kv_head(&kv, "t.i64", DPOC_GGUF_INT64), put_le(&kv, (uint64_t)-5000000000ll, 8)));
    double dv = 0.125;
    uint64_t dbits;
    memcpy(&dbits, &dv, 8);
    KV((kv_head(&kv, "t.f64", DPOC_GGUF_FLOAT64), put_le(&kv, dbits, 8)));
    /* arrays: i32, f32, strings (one with an embedded NUL), empty */
    KV((kv_head(&kv, "t.arr_i32", DPOC_GGUF_ARRAY), put_le(&kv, DPOC_GGUF_INT32, 4), put_le(&kv, 3, 8),
        put_le(&kv, 1, 4), put_le(&kv, (uint32_t)-2, 4), put_le(&kv, 3, 4)));
    KV((kv_head(&kv, "t.arr_f32", DPOC_GGUF_ARRAY), put_le(&kv, DPOC_GGUF_FLOAT32, 4), put_le(&kv, 2, 8),
        put_f32(&kv, 0.5f), put_f32(&kv, -4.0f)));
    KV((kv_head(&kv, "t.arr_str", DPOC_GGUF_ARRAY), put_le(&kv, DPOC_GGUF_STRING, 4), put_le(&kv, 3, 8),
        put_str(&kv, "a b"), put_str(&kv, ""), put_le(&kv, 3, 8), put(&kv, "x\0y", 3)));
    KV((kv_head(&kv, "t.arr_empty", DPOC_GGUF_ARRAY), put_le(&kv, DPOC_GGUF_UINT8, 4), put_le(&kv, 0, 8)));
#undef KV
    const float f32[6] = {1, 2, 3, 4, 5, 6};
    const uint8_t f16[8] = {0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0x00, 0x00}; /* 1, -2, 0.5, 0 */
    uint8_t q8[68];
    for (int blk = 0; blk < 2; blk++) {
        q8[34 * blk] = 0x00, q8[34 * blk + 1] = blk ? 0x40 : 0x3C; /* d = 1, then 2 */
        for (int j = 0; j < 32; j++) q8[34 * blk + 2 + j] = (uint8_t)(int8_t)(j - 10);
    }
    const wtensor ts[3] = {
        {"w.f32", DPOC_GGML_F32, 2, {3, 2}, f32, sizeof f32},
        {"w.f16", DPOC_GGML_F16, 1, {4}, f16, sizeof f16},
        {"w.q8", DPOC_GGML_Q8_0, 2, {32, 2}, q8, sizeof q8},
    };
    buf img = gguf_image(version, &kv, n_kv, ts, 3, align);
    const char *path = write_file("rt.gguf", &img);

    dpoc_gguf *g = NULL;
    dpoc_err err;
    dpoc_err_clear(&err);
    if (dpoc_gguf_open(&g, path, &err)) fail_msg("open: %s", err.msg);
    assert_int_equal(dpoc_gguf_version(g), version);
    assert_int_equal(dpoc_gguf_alignment(g), align);
    assert_int_equal(dpoc_gguf_data_offset(g) % align, 0);
    assert_int_equal(dpoc_gguf_n_kv(g), n_kv);
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    int64_t i64;
    float f;
    double d;
    int bl;
    const char *s;
    assert_int_equal(dpoc_gguf_get_u32(g, "t.u8", &u32, &err), 0), assert_int_equal(u32, 200);
    assert_int_equal(dpoc_gguf_get_i32(g, "t.i8", &i32, &err), 0), assert_int_equal(i32, -5);
    assert_int_equal(dpoc_gguf_get_u32(g, "t.u16", &u32, &err), 0), assert_int_equal(u32, 60000);
    assert_int_equal(dpoc_gguf_get_i32(g, "t.i16", &i32, &err), 0), assert_int_equal(i32, -300);
    assert_int_equal(dpoc_gguf_get_u32(g, "t.u32", &u32, &err), 0), assert_true(u32 == 4000000000u);
    assert_int_equal(dpoc_gguf_get_i32(g, "t.i32", &i32, &err), 0), assert_int_equal(i32, -70000);
    assert_int_equal(dpoc_gguf_get_f32(g, "t.f32", &f, &err), 0), assert_true(f == 1e-5f);
    assert_int_equal(dpoc_gguf_get_bool(g, "t.bool", &bl, &err), 0), assert_int_equal(bl, 1);
    assert_int_equal(dpoc_gguf_get_str(g, "t.str", &s, &err), 0), assert_string_equal(s, "héllo");
    assert_int_equal(dpoc_gguf_get_u64(g, "t.u64", &u64, &err), 0), assert_true(u64 == 0xFFFFFFFFFFFFull);
    assert_int_equal(dpoc_gguf_get_i64(g, "t.i64", &i64, &err), 0), assert_true(i64 == -5000000000ll);
    assert_int_equal(dpoc_gguf_get_f64(g, "t.f64", &d, &err), 0), assert_true(d == 0.125);
    assert_int_equal(dpoc_gguf_key_type(g, "t.f64"), DPOC_GGUF_FLOAT64);
    assert_int_equal(dpoc_gguf_key_type(g, "nope"), -1);
    /* wrong types and ranges name the key */
    expect_msg(dpoc_gguf_get_u32(g, "t.i8", &u32, &err), &err, DPOC_EINPUT, "t.i8");
    expect_msg(dpoc_gguf_get_i32(g, "t.u32", &i32, &err), &err, DPOC_EINPUT, "out of range");
    expect_msg(dpoc_gguf_get_str(g, "t.u8", &s, &err), &err, DPOC_EINPUT, "expected a string");
    expect_msg(dpoc_gguf_get_u32(g, "t.missing", &u32, &err), &err, DPOC_EINPUT, "missing key 't.missing'");
    dpoc_gguf_vtype et;
    const void *data;
    size_t n;
    assert_int_equal(dpoc_gguf_get_array(g, "t.arr_i32", &et, &data, &n, &err), 0);
    assert_int_equal(et, DPOC_GGUF_INT32);
    assert_int_equal(n, 3);
    assert_int_equal(((const int32_t *)data)[1], -2);
    assert_int_equal(dpoc_gguf_get_array(g, "t.arr_f32", &et, &data, &n, &err), 0);
    assert_true(n == 2 && ((const float *)data)[1] == -4.0f);
    assert_int_equal(dpoc_gguf_get_array(g, "t.arr_empty", &et, &data, &n, &err), 0);
    assert_int_equal(n, 0);
    const char *const *strs;
    const size_t *lens;
    assert_int_equal(dpoc_gguf_get_str_array(g, "t.arr_str", &strs, &lens, &n, &err), 0);
    assert_int_equal(n, 3);
    assert_string_equal(strs[0], "a b");
    assert_string_equal(strs[1], "");
    assert_int_equal(lens[2], 3);
    assert_memory_equal(strs[2], "x\0y", 3);
    expect_msg(dpoc_gguf_get_str_array(g, "t.arr_i32", &strs, &lens, &n, &err), &err, DPOC_EINPUT, "t.arr_i32");

    assert_int_equal(dpoc_gguf_n_tensors(g), 3);
    const dpoc_gguf_tensor *t = dpoc_gguf_find_tensor(g, "w.f32");
    assert_non_null(t);
    assert_true(t->n_dims == 2 && t->ne[0] == 3 && t->ne[1] == 2 && t->nelements == 6 && t->nbytes == 24);
    if (align >= 4) assert_int_equal((uintptr_t)t->data % 4, 0); /* mapping is page-aligned, offsets aligned */
    float out[64];
    assert_int_equal(dpoc_gguf_dequantize(t, out, 6, &err), 0);
    expect_floats(out, f32, 6, "w.f32");
    t = dpoc_gguf_find_tensor(g, "w.f16");
    assert_int_equal(dpoc_gguf_dequantize(t, out, 4, &err), 0);
    expect_floats(out, (const float[]){1, -2, 0.5f, 0}, 4, "w.f16");
    t = dpoc_gguf_find_tensor(g, "w.q8");
    assert_true(t->type == DPOC_GGML_Q8_0 && t->nbytes == 68 && t->offset % align == 0);
    assert_int_equal(dpoc_gguf_dequantize(t, out, 64, &err), 0);
    for (int j = 0; j < 64; j++)
        if (out[j] != (float)(j % 32 - 10) * (j < 32 ? 1.0f : 2.0f)) fail_msg("w.q8[%d] = %g", j, (double)out[j]);
    expect_msg(dpoc_gguf_dequantize(t, out, 63, &err), &err, DPOC_EINPUT, "w.q8");
    assert_null(dpoc_gguf_find_tensor(g, "w.none"));
    dpoc_gguf_close(g);

    /* the same image from memory */
    assert_int_equal(dpoc_gguf_open_memory(&g, img.p, img.n, "mem", &err), 0);
    assert_int_equal(dpoc_gguf_n_tensors(g), 3);
    dpoc_gguf_close(g);
    free(img.p);
    free(kv.p);
}

static void test_round_trip_v3(void **state) {
    (void)state;
    round_trip(3, 32);
}
static void test_round_trip_v2_align64(void **state) {
    (void)state;
    round_trip(2, 64);
}
static void test_round_trip_align1(void **state) {
    (void)state;
    round_trip(3, 1); /* tensor data unaligned: the dequantizer must not assume alignment */
}

/* ---- malformed files ---- */

static void expect_open_fails(const buf *b, const char *needle) {
    dpoc_gguf *g = (dpoc_gguf *)1;
    dpoc_err err;
    dpoc_err_clear(&err);
    const char *path = write_file("bad.gguf", b);
    int rc = dpoc_gguf_open(&g, path, &err);
    assert_null(g);
    expect_msg(rc, &err, DPOC_EINPUT, needle);
    if (!strstr(err.msg, "bad.gguf")) fail_msg("message '%s' does not name the file", err.msg);
}

static buf header(uint32_t version, uint64_t nt, uint64_t nkv) {
    buf b = {0};
    put_le(&b, 0x46554747u, 4);
    put_le(&b, version, 4);
    put_le(&b, nt, 8);
    put_le(&b, nkv, 8);
    return b;
}

static void test_malformed(void **state) {
    (void)state;
    buf b = {0};
    /* too short for a header */
    put(&b, "GGUF\3\0\0\0", 8);
    expect_open_fails(&b, "too short");
    free(b.p);
    /* bad magic */
    b = header(3, 0, 0);
    memcpy(b.p, "GGML", 4);
    expect_open_fails(&b, "not a GGUF file");
    free(b.p);
    /* versions */
    b = header(1, 0, 0);
    expect_open_fails(&b, "version 1");
    free(b.p);
    b = header(4, 0, 0);
    expect_open_fails(&b, "version 4");
    free(b.p);
    /* counts larger than the file can hold */
    b = header(3, 0, 1000);
    put_le(&b, 0, 8);
    expect_open_fails(&b, "metadata count 1000");
    free(b.p);
    b = header(3, (uint64_t)1 << 62, 0);
    expect_open_fails(&b, "tensor count");
    free(b.p);
    /* truncated metadata: a key announced but the file ends */
    b = header(3, 0, 1);
    put_le(&b, 3, 8);
    put(&b, "abc", 3);
    put_le(&b, DPOC_GGUF_UINT32, 4);
    put_le(&b, 7, 2); /* half a u32 */
    expect_open_fails(&b, "key 'abc'");
    free(b.p);
    /* string length beyond the file */
    b = header(3, 0, 1);
    kv_head(&b, "general.name", DPOC_GGUF_STRING);
    put_le(&b, 1000, 8);
    put(&b, "short", 5);
    expect_open_fails(&b, "general.name");
    free(b.p);
    b = header(3, 0, 1);
    put_le(&b, UINT64_MAX, 8); /* key length that would overflow pos + len */
    put_le(&b, 0, 8);
    expect_open_fails(&b, "beyond the end");
    free(b.p);
    /* array count beyond the file */
    b = header(3, 0, 1);
    kv_head(&b, "tokenizer.ggml.tokens", DPOC_GGUF_ARRAY);
    put_le(&b, DPOC_GGUF_STRING, 4);
    put_le(&b, (uint64_t)1 << 61, 8);
    expect_open_fails(&b, "tokenizer.ggml.tokens");
    free(b.p);
    b = header(3, 0, 1);
    kv_head(&b, "x.arr", DPOC_GGUF_ARRAY);
    put_le(&b, DPOC_GGUF_UINT64, 4);
    put_le(&b, (uint64_t)1 << 61, 8); /* count * 8 overflows 64 bits */
    put_le(&b, 0, 8);
    expect_open_fails(&b, "x.arr");
    free(b.p);
    /* unknown value type, nested array, duplicate key */
    b = header(3, 0, 1);
    kv_head(&b, "x.weird", 13);
    put_le(&b, 0, 8);
    expect_open_fails(&b, "unknown value type 13");
    free(b.p);
    b = header(3, 0, 1);
    kv_head(&b, "x.nested", DPOC_GGUF_ARRAY);
    put_le(&b, DPOC_GGUF_ARRAY, 4);
    put_le(&b, 0, 8);
    expect_open_fails(&b, "nested");
    free(b.p);
    b = header(3, 0, 2);
    kv_u32(&b, "x.a", 1);
    kv_u32(&b, "x.a", 2);
    expect_open_fails(&b, "duplicate key");
    free(b.p);
    /* bad alignment: not a power of two, zero, wrong type */
    b = header(3, 0, 1);
    kv_u32(&b, "general.alignment", 3);
    expect_open_fails(&b, "power of two");
    free(b.p);
    b = header(3, 0, 1);
    kv_u32(&b, "general.alignment", 0);
    expect_open_fails(&b, "general.alignment");
    free(b.p);
    b = header(3, 0, 1);
    kv_f32(&b, "general.alignment", 32.0f);
    expect_open_fails(&b, "must be a u32");
    free(b.p);

    /* tensor infos */
    const float zeros[64] = {0};
    wtensor t = {"blk.0.attn_q.weight", DPOC_GGML_F32, 2, {4, 2}, zeros, 32};
    /* unknown ggml type */
    t.type = 99;
    b = gguf_image(3, NULL, 0, &t, 1, 32);
    expect_open_fails(&b, "tensor 'blk.0.attn_q.weight': unknown or unsupported ggml type 99");
    free(b.p);
    t.type = DPOC_GGML_F32;
    /* too many dims */
    t.n_dims = 5;
    b = gguf_image(3, NULL, 0, &t, 1, 32);
    expect_open_fails(&b, "n_dims 5");
    free(b.p);
    t.n_dims = 2;
    /* a row length that is not a whole number of blocks */
    wtensor tq = {"blk.0.ffn_up.weight", DPOC_GGML_Q8_0, 1, {31}, zeros, 34};
    b = gguf_image(3, NULL, 0, &tq, 1, 32);
    expect_open_fails(&b, "blk.0.ffn_up.weight");
    free(b.p);
    /* dims whose product overflows */
    wtensor tbig = {"big", DPOC_GGML_F32, 4, {1u << 20, 1u << 20, 1u << 20, 1u << 20}, zeros, 0};
    b = gguf_image(3, NULL, 0, &tbig, 1, 32);
    expect_open_fails(&b, "tensor 'big'");
    free(b.p);
    /* data beyond the file: the image ends before the tensor's bytes */
    b = gguf_image(3, NULL, 0, &t, 1, 32);
    b.n -= 8;
    expect_open_fails(&b, "tensor 'blk.0.attn_q.weight': data");
    free(b.p);
    /* offset beyond the file / not aligned: patch the offset field (the last 8 bytes of the info) */
    b = gguf_image(3, NULL, 0, &t, 1, 32);
    size_t info_end = 24 + 8 + strlen(t.name) + 4 + 16 + 4 + 8;
    for (int i = 0; i < 8; i++) b.p[info_end - 8 + i] = (uint8_t)((uint64_t)1 << 40 >> (8 * i));
    expect_open_fails(&b, "beyond the end of the data section");
    for (int i = 0; i < 8; i++) b.p[info_end - 8 + i] = (uint8_t)(i == 0 ? 4 : 0);
    expect_open_fails(&b, "not a multiple of the alignment");
    free(b.p);
    /* duplicate tensor names */
    wtensor two[2] = {t, t};
    b = gguf_image(3, NULL, 0, two, 2, 32);
    expect_open_fails(&b, "duplicate tensor name");
    free(b.p);
}

/* Every prefix of a valid file fails cleanly (or, for the full file, opens). */
static void test_truncations(void **state) {
    (void)state;
    buf kv = {0};
    kv_str(&kv, "general.architecture", "llama");
    kv_head(&kv, "tokenizer.ggml.tokens", DPOC_GGUF_ARRAY);
    put_le(&kv, DPOC_GGUF_STRING, 4);
    put_le(&kv, 2, 8);
    put_str(&kv, "a");
    put_str(&kv, "bc");
    const float f32[4] = {1, 2, 3, 4};
    wtensor t = {"w", DPOC_GGML_F32, 1, {4}, f32, 16};
    buf img = gguf_image(3, &kv, 2, &t, 1, 32);
    for (size_t n = 0; n <= img.n; n++) {
        uint8_t *copy = malloc(n ? n : 1); /* exactly n bytes, so ASan sees any over-read */
        assert_non_null(copy);
        if (n) memcpy(copy, img.p, n);
        dpoc_gguf *g = NULL;
        dpoc_err err;
        dpoc_err_clear(&err);
        int rc = dpoc_gguf_open_memory(&g, copy, n, "trunc", &err);
        if (n == img.n) {
            if (rc) fail_msg("full file: %s", err.msg);
            dpoc_gguf_close(g);
        } else if (rc == 0) {
            /* a prefix that ends after the tensor data is still complete: only the padding is gone */
            assert_true(n >= img.n - 16);
            dpoc_gguf_close(g);
        } else {
            assert_int_equal(rc, DPOC_EINPUT);
            assert_null(g);
            assert_true(err.msg[0] != '\0');
        }
        free(copy);
    }
    free(img.p);
    free(kv.p);
}

/* ---- model mapping ---- */

/* convert_hf_to_gguf.py's permute(w, n_head, n_head):
 *   w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
 * i.e. out[h][j][s] = in[h][s][j] with the (h, j, s) row index h*hd + 2j + s. */
static void py_permute(const float *in, float *out, size_t rows, size_t cols, size_t n_head) {
    size_t hd = rows / n_head, half = hd / 2;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t s = 0; s < 2; s++)
                for (size_t c = 0; c < cols; c++)
                    out[((h * half + j) * 2 + s) * cols + c] = in[((h * 2 + s) * half + j) * cols + c];
}

typedef struct {
    int arch_qwen2, tied;
    const char *extra_key; /* a rope scaling key to add, or NULL */
    const char *extra_tensor;
} tiny_opts;

/* A tiny llama/qwen2 GGUF: V=10, C=8, F=12, 2 heads (hd 4), 1 kv head, 2 layers. HF
 * tensors get distinct values (its index in the model's flat block + 1, scaled), so
 * any row mixup shows. Returns the path; *ref is the HF-order parameter block. */
static const char *write_tiny_model(const tiny_opts *o, dpoc_model *ref) {
    dpoc_model_config cfg = {0};
    cfg.arch = o->arch_qwen2 ? DPOC_ARCH_QWEN2 : DPOC_ARCH_LLAMA;
    cfg.vocab_size = 10, cfg.hidden_size = 8, cfg.intermediate_size = 12, cfg.n_layers = 2;
    cfg.n_heads = 2, cfg.n_kv_heads = 1, cfg.head_dim = 4, cfg.max_position_embeddings = 64;
    cfg.rms_norm_eps = 1e-5f, cfg.rope_theta = 10000.0f, cfg.tie_word_embeddings = o->tied;
    cfg.qkv_bias = o->arch_qwen2;
    dpoc_err err;
    if (dpoc_model_init(ref, &cfg, &err)) fail_msg("%s", err.msg);
    for (size_t i = 0; i < ref->numel; i++) ref->params[i] = (float)(i + 1) * 0.01f;

    const char *arch = o->arch_qwen2 ? "qwen2" : "llama";
    buf kv = {0};
    size_t n_kv = 0;
    char key[128];
#define AK(suffix) (snprintf(key, sizeof key, "%s.%s", arch, suffix), key)
    kv_str(&kv, "general.architecture", arch), n_kv++;
    kv_u32(&kv, AK("block_count"), 2), n_kv++;
    kv_u32(&kv, AK("embedding_length"), 8), n_kv++;
    kv_u32(&kv, AK("feed_forward_length"), 12), n_kv++;
    kv_u32(&kv, AK("attention.head_count"), 2), n_kv++;
    kv_u32(&kv, AK("attention.head_count_kv"), 1), n_kv++;
    kv_u32(&kv, AK("context_length"), 64), n_kv++;
    kv_u32(&kv, AK("rope.dimension_count"), 4), n_kv++;
    kv_f32(&kv, AK("attention.layer_norm_rms_epsilon"), 1e-5f), n_kv++;
    kv_f32(&kv, AK("rope.freq_base"), 10000.0f), n_kv++;
    if (o->extra_key) kv_str(&kv, o->extra_key, "linear"), n_kv++;
#undef AK
    wtensor ts[64];
    float *bufs[64];
    size_t nt = 0;
    for (size_t i = 0; i < ref->n_tensors; i++) {
        const dpoc_param_info *p = &ref->info[i];
        if (o->tied && !strcmp(p->name, "lm_head.weight")) continue;
        wtensor *t = &ts[nt];
        char *name = malloc(96);
        assert_non_null(name);
        size_t layer;
        int used = 0;
        const char *hf = p->name;
        static const char *const map[][2] = {
            {"input_layernorm.weight", "attn_norm.weight"}, {"self_attn.q_proj.weight", "attn_q.weight"},
            {"self_attn.q_proj.bias", "attn_q.bias"},       {"self_attn.k_proj.weight", "attn_k.weight"},
            {"self_attn.k_proj.bias", "attn_k.bias"},       {"self_attn.v_proj.weight", "attn_v.weight"},
            {"self_attn.v_proj.bias", "attn_v.bias"},       {"self_attn.o_proj.weight", "attn_output.weight"},
            {"post_attention_layernorm.weight", "ffn_norm.weight"}, {"mlp.gate_proj.weight", "ffn_gate.weight"},
            {"mlp.up_proj.weight", "ffn_up.weight"},        {"mlp.down_proj.weight", "ffn_down.weight"},
        };
        if (!strcmp(hf, "model.embed_tokens.weight")) snprintf(name, 96, "token_embd.weight");
        else if (!strcmp(hf, "model.norm.weight")) snprintf(name, 96, "output_norm.weight");
        else if (!strcmp(hf, "lm_head.weight")) snprintf(name, 96, "output.weight");
        else {
            assert_int_equal(sscanf(hf, "model.layers.%zu.%n", &layer, &used), 1);
            name[0] = '\0';
            for (size_t k = 0; k < sizeof map / sizeof map[0]; k++)
                if (!strcmp(hf + used, map[k][0])) snprintf(name, 96, "blk.%zu.%s", layer, map[k][1]);
            assert_true(name[0] != '\0');
        }
        const float *src = ref->params + p->offset;
        float *data = malloc(p->numel * sizeof(float));
        assert_non_null(data);
        size_t cols = p->ndim == 2 ? p->shape[1] : 1;
        int is_q = strstr(name, ".attn_q.") != NULL, is_k = strstr(name, ".attn_k.") != NULL;
        if (!o->arch_qwen2 && (is_q || is_k))
            py_permute(src, data, p->shape[0], cols, is_q ? cfg.n_heads : cfg.n_kv_heads);
        else
            memcpy(data, src, p->numel * sizeof(float));
        t->name = name;
        t->type = DPOC_GGML_F32;
        t->n_dims = p->ndim;
        /* GGUF ne is the PyTorch shape reversed */
        t->ne[0] = p->ndim == 2 ? p->shape[1] : p->shape[0];
        t->ne[1] = p->ndim == 2 ? p->shape[0] : 1;
        t->data = data;
        t->nbytes = p->numel * sizeof(float);
        bufs[nt++] = data;
    }
    float extra[8] = {0};
    if (o->extra_tensor) ts[nt++] = (wtensor){o->extra_tensor, DPOC_GGML_F32, 1, {8}, extra, 32};
    buf img = gguf_image(3, &kv, n_kv, ts, nt, 32);
    const char *path = write_file(o->arch_qwen2 ? "qwen2.gguf" : "llama.gguf", &img);
    for (size_t i = 0; i < nt; i++) {
        if (o->extra_tensor && i == nt - 1) break;
        free((char *)ts[i].name);
        free(bufs[i]);
    }
    free(img.p);
    free(kv.p);
    return path;
}

static void check_model_matches(const tiny_opts *o) {
    dpoc_model ref, m;
    const char *path = write_tiny_model(o, &ref);
    dpoc_err err;
    dpoc_err_clear(&err);
    if (dpoc_source_load_model(&m, path, &err)) fail_msg("load: %s", err.msg);
    assert_int_equal(m.cfg.arch, ref.cfg.arch);
    assert_int_equal(m.cfg.vocab_size, 10);
    assert_int_equal(m.cfg.hidden_size, 8);
    assert_int_equal(m.cfg.intermediate_size, 12);
    assert_int_equal(m.cfg.n_layers, 2);
    assert_int_equal(m.cfg.n_heads, 2);
    assert_int_equal(m.cfg.n_kv_heads, 1);
    assert_int_equal(m.cfg.head_dim, 4);
    assert_int_equal(m.cfg.max_position_embeddings, 64);
    assert_true(m.cfg.rms_norm_eps == 1e-5f && m.cfg.rope_theta == 10000.0f);
    assert_int_equal(m.cfg.tie_word_embeddings, o->tied);
    assert_int_equal(m.cfg.qkv_bias, o->arch_qwen2);
    assert_int_equal(m.numel, ref.numel);
    for (size_t i = 0; i < ref.n_tensors; i++) {
        const dpoc_param_info *p = &ref.info[i];
        for (size_t k = 0; k < p->numel; k++)
            if (m.params[p->offset + k] != ref.params[p->offset + k])
                fail_msg("%s[%zu] = %g, expected %g", p->name, k, (double)m.params[p->offset + k],
                         (double)ref.params[p->offset + k]);
    }
    dpoc_model_free(&m);
    dpoc_model_free(&ref);
}

static void test_llama_unpermute(void **state) {
    (void)state;
    /* the permutation really moves rows: the loader's answer differs from a plain copy */
    float in[8 * 2], out[8 * 2], back[8 * 2], tmp[8 * 2];
    for (int i = 0; i < 16; i++) in[i] = (float)i;
    py_permute(in, out, 8, 2, 2);
    assert_true(memcmp(in, out, sizeof in) != 0);
    /* head 0 rows (hd 4): GGUF rows 0,1,2,3 = HF rows 0,2,1,3 */
    assert_true(out[2] == in[4] && out[4] == in[2]);
    memcpy(back, out, sizeof out);
    dpoc_gguf_unpermute_rows(back, tmp, 8, 2, 2);
    expect_floats(back, in, 16, "unpermute");
    check_model_matches(&(tiny_opts){.arch_qwen2 = 0, .tied = 0});
    check_model_matches(&(tiny_opts){.arch_qwen2 = 0, .tied = 1});
}

static void test_qwen2_biases(void **state) {
    (void)state;
    check_model_matches(&(tiny_opts){.arch_qwen2 = 1, .tied = 1});
}

static void test_model_errors(void **state) {
    (void)state;
    dpoc_model ref, m;
    dpoc_err err;
    const char *path = write_tiny_model(&(tiny_opts){.extra_key = "llama.rope.scaling.type"}, &ref);
    dpoc_model_free(&ref);
    expect_msg(dpoc_source_load_model(&m, path, &err), &err, DPOC_EINPUT, "llama.rope.scaling.type");
    path = write_tiny_model(&(tiny_opts){.extra_tensor = "rope_freqs.weight"}, &ref);
    dpoc_model_free(&ref);
    expect_msg(dpoc_source_load_model(&m, path, &err), &err, DPOC_EINPUT, "rope_freqs.weight");
    path = write_tiny_model(&(tiny_opts){.extra_tensor = "blk.0.attn_q_norm.weight"}, &ref);
    dpoc_model_free(&ref);
    expect_msg(dpoc_source_load_model(&m, path, &err), &err, DPOC_EINPUT, "unexpected tensor 'blk.0.attn_q_norm.weight'");
    /* unsupported architecture */
    buf kv = {0};
    kv_str(&kv, "general.architecture", "gemma");
    buf img = gguf_image(3, &kv, 1, NULL, 0, 32);
    path = write_file("gemma.gguf", &img);
    expect_msg(dpoc_source_load_model(&m, path, &err), &err, DPOC_EINPUT, "'gemma'");
    free(img.p);
    free(kv.p);
    /* a missing required key */
    kv = (buf){0};
    kv_str(&kv, "general.architecture", "llama");
    img = gguf_image(3, &kv, 1, NULL, 0, 32);
    path = write_file("nokeys.gguf", &img);
    expect_msg(dpoc_source_load_model(&m, path, &err), &err, DPOC_EINPUT, "llama.block_count");
    free(img.p);
    free(kv.p);
}

static void test_tokenizer_spec(void **state) {
    (void)state;
    buf kv = {0};
    size_t n_kv = 0;
    kv_str(&kv, "tokenizer.ggml.model", "gpt2"), n_kv++;
    kv_str(&kv, "tokenizer.ggml.pre", "smollm"), n_kv++;
    kv_head(&kv, "tokenizer.ggml.tokens", DPOC_GGUF_ARRAY), n_kv++;
    put_le(&kv, DPOC_GGUF_STRING, 4), put_le(&kv, 3, 8);
    put_str(&kv, "<|endoftext|>"), put_str(&kv, "a"), put_str(&kv, "b");
    kv_head(&kv, "tokenizer.ggml.token_type", DPOC_GGUF_ARRAY), n_kv++;
    put_le(&kv, DPOC_GGUF_INT32, 4), put_le(&kv, 3, 8), put_le(&kv, 3, 4), put_le(&kv, 1, 4), put_le(&kv, 1, 4);
    kv_head(&kv, "tokenizer.ggml.merges", DPOC_GGUF_ARRAY), n_kv++;
    put_le(&kv, DPOC_GGUF_STRING, 4), put_le(&kv, 1, 8), put_str(&kv, "a b");
    kv_u32(&kv, "tokenizer.ggml.eos_token_id", 0), n_kv++;
    kv_u32(&kv, "tokenizer.ggml.bos_token_id", 0), n_kv++;
    kv_head(&kv, "tokenizer.ggml.add_bos_token", DPOC_GGUF_BOOL), put_le(&kv, 0, 1), n_kv++;
    kv_str(&kv, "tokenizer.chat_template", "{{ x }}"), n_kv++;
    buf img = gguf_image(3, &kv, n_kv, NULL, 0, 32);
    dpoc_gguf *g;
    dpoc_err err;
    assert_int_equal(dpoc_gguf_open_memory(&g, img.p, img.n, "tok", &err), 0);
    dpoc_tokenizer_spec spec;
    if (dpoc_gguf_tokenizer_spec(g, &spec, &err)) fail_msg("%s", err.msg);
    assert_string_equal(spec.model, "gpt2");
    assert_string_equal(spec.pre, "smollm");
    assert_int_equal(spec.n_tokens, 3);
    assert_string_equal(spec.tokens[2], "b");
    assert_int_equal(spec.token_type[0], 3);
    assert_int_equal(spec.n_merges, 1);
    assert_string_equal(spec.merges[0], "a b");
    assert_int_equal(spec.eos_id, 0);
    assert_int_equal(spec.bos_id, 0);
    assert_int_equal(spec.pad_id, -1);
    assert_int_equal(spec.add_bos, 0);
    assert_string_equal(spec.chat_template, "{{ x }}");
    dpoc_gguf_close(g);
    free(img.p);
    /* an id beyond the token list names the key */
    kv_u32(&kv, "tokenizer.ggml.padding_token_id", 7), n_kv++;
    img = gguf_image(3, &kv, n_kv, NULL, 0, 32);
    assert_int_equal(dpoc_gguf_open_memory(&g, img.p, img.n, "tok", &err), 0);
    expect_msg(dpoc_gguf_tokenizer_spec(g, &spec, &err), &err, DPOC_EINPUT, "padding_token_id");
    dpoc_gguf_close(g);
    free(img.p);
    free(kv.p);
}

/* ---- the real SmolLM2-135M-Instruct Q4_1 (tools/fetch-model) ---- */

static void test_smollm2(void **state) {
    (void)state;
    char path[4096];
    const char *env = getenv("DPOC_MODEL_GGUF");
    if (env && *env) snprintf(path, sizeof path, "%s", env);
    else {
        const char *cache = getenv("DPOC_CACHE");
        const char *home = getenv("HOME");
        if (cache && *cache) snprintf(path, sizeof path, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", cache);
        else snprintf(path, sizeof path, "%s/.cache/dpoc/models/SmolLM2-135M-Instruct.Q4_1.gguf", home ? home : ".");
    }
    if (access(path, R_OK) != 0) {
        print_message("SKIPPED test_smollm2: %s is absent (run tools/fetch-model or set DPOC_MODEL_GGUF)\n", path);
        skip();
    }
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_tensor_source *src = NULL;
    if (dpoc_ts_open_gguf(&src, path, &err)) fail_msg("open: %s", err.msg);
    const dpoc_gguf *g = dpoc_ts_gguf(src);
    dpoc_model_config cfg;
    if (dpoc_gguf_model_config(g, &cfg, &err)) fail_msg("config: %s", err.msg);
    assert_int_equal(cfg.arch, DPOC_ARCH_LLAMA);
    assert_int_equal(cfg.n_layers, 30);
    assert_int_equal(cfg.hidden_size, 576);
    assert_int_equal(cfg.n_heads, 9);
    assert_int_equal(cfg.n_kv_heads, 3);
    assert_int_equal(cfg.head_dim, 64);
    assert_int_equal(cfg.intermediate_size, 1536);
    assert_int_equal(cfg.vocab_size, 49152);
    assert_int_equal(cfg.tie_word_embeddings, 1);

    dpoc_tokenizer_spec spec;
    if (dpoc_gguf_tokenizer_spec(g, &spec, &err)) fail_msg("tokenizer spec: %s", err.msg);
    assert_string_equal(spec.model, "gpt2");
    assert_int_equal(spec.n_tokens, 49152);
    dpoc_tokenizer *tok = NULL;
    if (dpoc_tokenizer_from_spec(&tok, &spec, &err)) fail_msg("tokenizer: %s", err.msg);
    dpoc_ids ids = {0};
    /* predictable text: with Q/K un-permuted the mean NLL is 1.6 (32 of 43 top-1 right);
     * left in GGUF order it is 3.3 (17 right), so the bound below catches a wrong permutation */
    const char *text = "The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight, "
                       "nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.";
    if (dpoc_tokenizer_encode(tok, text, strlen(text), 0, &ids, &err)) fail_msg("encode: %s", err.msg);
    assert_true(ids.n >= 40);

    dpoc_model m;
    if (dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err)) fail_msg("load: %s", err.msg);
    dpoc_acts a;
    if (dpoc_acts_alloc(&a, &m.cfg, ids.n, &err)) fail_msg("%s", err.msg);
    dpoc_model_forward(&m, &a, ids.ids, ids.n, 0, ids.n - 1);
    double sum = 0;
    for (size_t r = 0; r + 1 < ids.n; r++) {
        if (!isfinite(a.logp[r]) || a.logp[r] > 0) fail_msg("logp[%zu] = %g", r, (double)a.logp[r]);
        sum += a.logp[r];
    }
    /* uniform would be log 49152 = 10.8 per token */
    double mean_nll = -sum / (double)(ids.n - 1);
    print_message("SmolLM2 Q4_1: %zu tokens, mean NLL %.3f\n", ids.n, mean_nll);
    assert_true(mean_nll < 2.4);
    dpoc_acts_free(&a);
    dpoc_model_free(&m);
    dpoc_ids_free(&ids);
    dpoc_tokenizer_free(tok);
    dpoc_ts_close(src);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deq_plain),       cmocka_unit_test(test_deq_q8_0),
        cmocka_unit_test(test_deq_q4),          cmocka_unit_test(test_deq_q5),
        cmocka_unit_test(test_deq_q4_k),        cmocka_unit_test(test_deq_q5_k),
        cmocka_unit_test(test_deq_q6_k),        cmocka_unit_test(test_deq_errors),
        cmocka_unit_test(test_round_trip_v3),   cmocka_unit_test(test_round_trip_v2_align64),
        cmocka_unit_test(test_round_trip_align1), cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_truncations),     cmocka_unit_test(test_llama_unpermute),
        cmocka_unit_test(test_qwen2_biases),    cmocka_unit_test(test_model_errors),
        cmocka_unit_test(test_tokenizer_spec),  cmocka_unit_test(test_smollm2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
