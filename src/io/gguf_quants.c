/* Tensor data to fp32, scalar: F32, F16, BF16 and ggml's block types, following
 * ggml's dequantize_row_* (ggml/src/ggml-quants.c) and the block structs of
 * ggml-common.h. The one converter of every tensor source (tensor_source.c:
 * GGUF, safetensors and memory alike). Blocks are read byte by byte (no struct
 * casts) because tensor data in a GGUF need only be aligned to
 * general.alignment, which may be 1 (and a safetensors data section not at all). */
#include <stdint.h>
#include <string.h>

#include "dpoc/gguf.h"
#include "dpoc/safetensors.h"

static float half(const uint8_t *p) { return st_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* Q4_0: {half d; u8 qs[16]}: y[j] = (lo(qs[j]) - 8) d, y[j+16] = (hi(qs[j]) - 8) d. */
static void deq_q4_0(const uint8_t *b, float *y) {
    const float d = half(b);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((b[2 + j] & 0x0F) - 8) * d;
        y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
    }
}

/* Q4_1: {half d; half m; u8 qs[16]}: y = q d + m. */
static void deq_q4_1(const uint8_t *b, float *y) {
    const float d = half(b), m = half(b + 2);
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(b[4 + j] & 0x0F) * d + m;
        y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
    }
}

/* Q5_0: {half d; u8 qh[4]; u8 qs[16]}: fifth bit of element j is bit j of qh
 * (u32 little-endian), of element j+16 bit j+16; y = (q - 16) d. */
static void deq_q5_0(const uint8_t *b, float *y) {
    const float d = half(b);
    const uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = (float)(((qs[j] & 0x0F) | h0) - 16) * d;
        y[j + 16] = (float)(((qs[j] >> 4) | h1) - 16) * d;
    }
}

/* Q5_1: {half d; half m; u8 qh[4]; u8 qs[16]}: y = q d + m. */
static void deq_q5_1(const uint8_t *b, float *y) {
    const float d = half(b), m = half(b + 2);
    const uint32_t qh = (uint32_t)b[4] | (uint32_t)b[5] << 8 | (uint32_t)b[6] << 16 | (uint32_t)b[7] << 24;
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        const int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = (float)((qs[j] & 0x0F) | h0) * d + m;
        y[j + 16] = (float)((qs[j] >> 4) | h1) * d + m;
    }
}

/* Q8_0: {half d; i8 qs[32]}: y = qs d. */
static void deq_q8_0(const uint8_t *b, float *y) {
    const float d = half(b);
    for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
}

/* The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of Q4_K/Q5_K
 * (ggml's get_scale_min_k4). */
static void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* Q4_K: {half d; half dmin; u8 scales[12]; u8 qs[128]}: per 64 values, 32 low
 * nibbles with sub-block 2i's scale/min, then 32 high nibbles with 2i+1's. */
static void deq_q4_k(const uint8_t *b, float *y) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t *sc = b + 4, *q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
        uint8_t s, m;
        scale_min_k4(is, sc, &s, &m);
        const float d1 = d * s, m1 = dmin * m;
        scale_min_k4(is + 1, sc, &s, &m);
        const float d2 = d * s, m2 = dmin * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
    }
}

/* Q5_K: {half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}: as Q4_K with a
 * fifth bit from qh (bit 2i for the low nibbles of group i, 2i+1 for the high). */
static void deq_q5_k(const uint8_t *b, float *y) {
    const float d = half(b), dmin = half(b + 2);
    const uint8_t *sc = b + 4, *qh = b + 16, *ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
        uint8_t s, m;
        scale_min_k4(is, sc, &s, &m);
        const float d1 = d * s, m1 = dmin * m;
        scale_min_k4(is + 1, sc, &s, &m);
        const float d2 = d * s, m2 = dmin * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
}

/* Q6_K: {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d}: per 128 values, 4 quarters
 * of 32 built from ql nibbles and 2-bit fields of qh; y = d scale (q - 32). */
static void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = half(b + 208);
    for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * (float)q1;
            y[l + 32] = d * sc[is + 2] * (float)q2;
            y[l + 64] = d * sc[is + 4] * (float)q3;
            y[l + 96] = d * sc[is + 6] * (float)q4;
        }
    }
}

/* The block converter of a quantized type; NULL for the plain types and for the
 * types dpoc does not convert. */
typedef void (*block_fn)(const uint8_t *, float *);
static block_fn block_converter(uint32_t type) {
    switch (type) {
    case DPOC_GGML_Q4_0: return deq_q4_0;
    case DPOC_GGML_Q4_1: return deq_q4_1;
    case DPOC_GGML_Q5_0: return deq_q5_0;
    case DPOC_GGML_Q5_1: return deq_q5_1;
    case DPOC_GGML_Q8_0: return deq_q8_0;
    case DPOC_GGML_Q4_K: return deq_q4_k;
    case DPOC_GGML_Q5_K: return deq_q5_k;
    case DPOC_GGML_Q6_K: return deq_q6_k;
    default: return NULL;
    }
}

int dpoc_gguf_can_dequantize(uint32_t type) {
    return type == DPOC_GGML_F32 || type == DPOC_GGML_F16 || type == DPOC_GGML_BF16 || block_converter(type) != NULL;
}

int dpoc_gguf_dequantize_raw(uint32_t type, const void *src, size_t nbytes, float *dst, size_t n, dpoc_err *err) {
    const char *name = dpoc_ggml_type_name(type);
    const size_t blck = dpoc_ggml_block_size(type), bsize = dpoc_ggml_type_size(type);
    if (!name) return dpoc_errf(err, DPOC_EINPUT, "unknown ggml type %u", type);
    if (n % blck != 0 || n / blck > SIZE_MAX / bsize || (n / blck) * bsize != nbytes)
        return dpoc_errf(err, DPOC_EINPUT, "%s data of %zu bytes does not hold %zu elements", name, nbytes, n);
    const uint8_t *p = src;
    const size_t nb = n / blck;
    switch (type) {
    case DPOC_GGML_F32: if (n) memcpy(dst, p, n * 4); return 0;
    case DPOC_GGML_F16:
        for (size_t i = 0; i < n; i++) dst[i] = half(p + 2 * i);
        return 0;
    case DPOC_GGML_BF16:
        for (size_t i = 0; i < n; i++) dst[i] = st_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return 0;
    default: break;
    }
    const block_fn fn = block_converter(type);
    if (!fn) return dpoc_errf(err, DPOC_EINPUT, "ggml type %s cannot be converted to fp32 by dpoc", name);
    for (size_t i = 0; i < nb; i++) fn(p + i * bsize, dst + i * blck);
    return 0;
}

int dpoc_gguf_dequantize(const dpoc_gguf_tensor *t, float *dst, size_t n, dpoc_err *err) {
    if (n != t->nelements)
        return dpoc_errf(err, DPOC_EINPUT, "tensor '%s': has %zu elements, the destination %zu", t->name,
                         t->nelements, n);
    int rc = dpoc_gguf_dequantize_raw(t->type, t->data, t->nbytes, dst, n, err);
    if (rc) dpoc_err_prefix(err, "tensor '%s'", t->name);
    return rc;
}
