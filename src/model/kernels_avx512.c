/* AVX-512 (F, BW, DQ, VL) versions of the dispatched kernels (see kernels.h);
 * kernels_scalar.c defines what they compute. Every function carries its
 * target attribute instead of a global -m flag, so the library still runs on
 * any x86-64 and this code only runs when the dispatcher has seen the CPU
 * support it. Tails (sizes not a multiple of 16) use masked loads and stores,
 * which never touch the masked-out memory.
 *
 * Where the scalar twin accumulates in double (the RMSNorm sums, the LM head's
 * softmax statistics) so do these;
 * elsewhere they differ from it only by rounding: fused multiply-adds, another
 * summation order, and exp from exp16 below instead of libm's expf. */
#include "model/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

/* The lanes of a 16-wide step with `left` elements to go: all of them, or the tail. */
AVX512 static inline __mmask16 lanes16(size_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* exp(x) per lane, Cephes' expf: n = round(x / ln2), r = x - n ln2 (ln2 in two
 * parts, exact for |n| < 2^15), exp(r) by a degree-7 polynomial on
 * |r| <= ln2/2, then scalef multiplies by 2^n with correct overflow to inf and
 * underflow to denormals and 0. Within 1 ulp of the correctly rounded value
 * (measured on a fine grid of [-87.3, 88.7], as libm's expf). Inputs are clamped first so that +-inf give inf and 0; the operand
 * order of min/max lets a NaN through (they return the second operand on NaN). */
AVX512 static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* sum of a*b over 16 lanes, the float halves widened to double (their product is
 * exact in double, so only the additions round, as in the scalar twin). */
AVX512 static inline void fma_pd16(__m512 a, __m512 b, __m512d *acc0, __m512d *acc1) {
    const __m512d alo = _mm512_cvtps_pd(_mm512_castps512_ps256(a)), ahi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1));
    const __m512d blo = _mm512_cvtps_pd(_mm512_castps512_ps256(b)), bhi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(b, 1));
    *acc0 = _mm512_fmadd_pd(alo, blo, *acc0);
    *acc1 = _mm512_fmadd_pd(ahi, bhi, *acc1);
}

/* ---- RMSNorm ---- */

AVX512 static void rmsnorm_forward_avx512(float *restrict out, float *restrict rstd, const float *restrict inp,
                                          const float *restrict weight, size_t T, size_t C, float eps) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        for (size_t i = 0; i < C; i += 16) {
            const __m512 xv = _mm512_maskz_loadu_ps(lanes16(C - i), x + i);
            fma_pd16(xv, xv, &a0, &a1);
        }
        const double ss = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
        const float var = (float)(ss / (double)C);
        const float r = 1.0f / sqrtf(var + eps);
        const __m512 rv = _mm512_set1_ps(r);
        float *restrict o = out + t * C;
        for (size_t i = 0; i < C; i += 16) {
            const __mmask16 mk = lanes16(C - i);
            const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), rv);
            _mm512_mask_storeu_ps(o + i, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, weight + i), n));
        }
        rstd[t] = r;
    }
}

AVX512 static void rmsnorm_backward_avx512(float *restrict dinp, float *restrict dweight, const float *restrict dout,
                                           const float *restrict inp, const float *restrict weight,
                                           const float *restrict rstd, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        const float *restrict d = dout + t * C;
        const __m512 rv = _mm512_set1_ps(rstd[t]);
        /* one pass: dweight += d * n and the double sum of g * n */
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        for (size_t i = 0; i < C; i += 16) {
            const __mmask16 mk = lanes16(C - i);
            const __m512 dv = _mm512_maskz_loadu_ps(mk, d + i);
            const __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), rv);
            if (dweight)
                _mm512_mask_storeu_ps(dweight + i, mk, _mm512_fmadd_ps(dv, nv, _mm512_maskz_loadu_ps(mk, dweight + i)));
            if (dinp) fma_pd16(_mm512_mul_ps(dv, _mm512_maskz_loadu_ps(mk, weight + i)), nv, &a0, &a1);
        }
        if (!dinp) continue;
        const __m512 mean = _mm512_set1_ps((float)(_mm512_reduce_add_pd(_mm512_add_pd(a0, a1)) / (double)C));
        float *restrict dx = dinp + t * C;
        for (size_t i = 0; i < C; i += 16) {
            const __mmask16 mk = lanes16(C - i);
            const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, d + i), _mm512_maskz_loadu_ps(mk, weight + i));
            const __m512 nv = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), rv);
            const __m512 u = _mm512_fnmadd_ps(nv, mean, g); /* g - n * mean */
            _mm512_mask_storeu_ps(dx + i, mk, _mm512_fmadd_ps(rv, u, _mm512_maskz_loadu_ps(mk, dx + i)));
        }
    }
}

/* ---- RoPE ---- */

/* One (T, nh, hd) array in place; sign = +1 rotates forward, -1 applies the
 * transpose (backward): y1 = a c - sign b s, y2 = b c + sign a s. */
AVX512 static inline void rope_avx512(float *restrict x, const float *restrict cos_t, const float *restrict sin_t,
                                      size_t T, size_t nh, size_t hd, float sign) {
    const size_t half = hd / 2;
    for (size_t t = 0; t < T; t++) {
        const float *restrict c = cos_t + t * half;
        const float *restrict s = sin_t + t * half;
        for (size_t h = 0; h < nh; h++) {
            float *restrict x1 = x + (t * nh + h) * hd;
            float *restrict x2 = x1 + half;
            for (size_t i = 0; i < half; i += 16) {
                const __mmask16 mk = lanes16(half - i);
                const __m512 cv = _mm512_maskz_loadu_ps(mk, c + i);
                const __m512 sv = _mm512_mul_ps(_mm512_set1_ps(sign), _mm512_maskz_loadu_ps(mk, s + i));
                const __m512 a = _mm512_maskz_loadu_ps(mk, x1 + i), b = _mm512_maskz_loadu_ps(mk, x2 + i);
                _mm512_mask_storeu_ps(x1 + i, mk, _mm512_fmsub_ps(a, cv, _mm512_mul_ps(b, sv)));
                _mm512_mask_storeu_ps(x2 + i, mk, _mm512_fmadd_ps(b, cv, _mm512_mul_ps(a, sv)));
            }
        }
    }
}

AVX512 static void rope_forward_avx512(float *x, const float *cos_t, const float *sin_t, size_t T, size_t nh,
                                       size_t hd) {
    rope_avx512(x, cos_t, sin_t, T, nh, hd, 1.0f);
}

AVX512 static void rope_backward_avx512(float *dx, const float *cos_t, const float *sin_t, size_t T, size_t nh,
                                        size_t hd) {
    rope_avx512(dx, cos_t, sin_t, T, nh, hd, -1.0f);
}

/* ---- SwiGLU ---- */

AVX512 static void swiglu_forward_avx512(float *restrict out, const float *restrict gate, const float *restrict up,
                                         size_t N) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < N; i += 16) {
        const __mmask16 mk = lanes16(N - i);
        const __m512 g = _mm512_maskz_loadu_ps(mk, gate + i);
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_mask_storeu_ps(out + i, mk, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(mk, up + i)));
    }
}

AVX512 static void swiglu_backward_avx512(float *restrict dgate, float *restrict dup, const float *restrict dout,
                                          const float *restrict gate, const float *restrict up, size_t N) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < N; i += 16) {
        const __mmask16 mk = lanes16(N - i);
        const __m512 g = _mm512_maskz_loadu_ps(mk, gate + i);
        const __m512 d = _mm512_maskz_loadu_ps(mk, dout + i);
        const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        if (dup)
            _mm512_mask_storeu_ps(dup + i, mk, _mm512_fmadd_ps(d, _mm512_mul_ps(g, sig), _mm512_maskz_loadu_ps(mk, dup + i)));
        if (dgate) {
            /* sig * (1 + g * (1 - sig)) */
            const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sig), one));
            const __m512 du = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(mk, up + i));
            _mm512_mask_storeu_ps(dgate + i, mk, _mm512_fmadd_ps(du, dsilu, _mm512_maskz_loadu_ps(mk, dgate + i)));
        }
    }
}

/* ---- AdamW ---- */

/* The scalar formula op for op (AdamW is bound by memory bandwidth, 7 floats
 * moved per parameter, so there is nothing to gain from reshaping it). */
AVX512 static void adamw_update_avx512(float *restrict params, const float *restrict grads, float *restrict m,
                                       float *restrict v, size_t n, const dpoc_adamw_coeffs *c) {
    const __m512 decay = _mm512_set1_ps(c->decay), omb1 = _mm512_set1_ps(c->one_minus_b1);
    const __m512 b2 = _mm512_set1_ps(c->b2), omb2 = _mm512_set1_ps(c->one_minus_b2);
    const __m512 step = _mm512_set1_ps(c->step_size), bc2 = _mm512_set1_ps(c->bc2_sqrt), eps = _mm512_set1_ps(c->eps);
    const __m512 gs = _mm512_set1_ps(c->grad_scale);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, grads + i), gs);
        __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, params + i), decay);
        __m512 mv = _mm512_maskz_loadu_ps(mk, m + i);
        mv = _mm512_add_ps(mv, _mm512_mul_ps(_mm512_sub_ps(g, mv), omb1));
        __m512 vv = _mm512_maskz_loadu_ps(mk, v + i);
        vv = _mm512_add_ps(_mm512_mul_ps(vv, b2), _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2), eps);
        p = _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step, mv), denom));
        _mm512_mask_storeu_ps(params + i, mk, p);
        _mm512_mask_storeu_ps(m + i, mk, mv);
        _mm512_mask_storeu_ps(v + i, mk, vv);
    }
}

/* ---- gradient norm ---- */

/* Four double accumulators of 8 lanes (the squares are exact in double; only
 * the order of the additions differs from the twin): bound by memory, 4 bytes
 * read per element. */
AVX512 static double sum_squares_avx512(const float *restrict x, size_t n) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), a2 = _mm512_setzero_pd(), a3 = _mm512_setzero_pd();
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 u = _mm512_loadu_ps(x + i), w = _mm512_loadu_ps(x + i + 16);
        fma_pd16(u, u, &a0, &a1);
        fma_pd16(w, w, &a2, &a3);
    }
    for (; i < n; i += 16) {
        const __m512 u = _mm512_maskz_loadu_ps(lanes16(n - i), x + i);
        fma_pd16(u, u, &a0, &a1);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
}

/* ---- LM head ---- */

/* Two passes over the row, as the scalar twin: the max (NaN skipped: max_ps
 * returns its second operand, the accumulator, when the logit is NaN) and the
 * double sum of the logits, then exp16 of l - max with s, a, q summed in double
 * lanes (16 floats widened to two 8-lane halves; e d and e e are exact in
 * double, so only the additions round, and only their order differs from the
 * twin). The first maximal index is found by a third, short scan for the first
 * logit equal to the max: that is the index the twin's strict > keeps. */
/* The low and high 8 lanes of x widened to double. */
AVX512 static inline __m512d lo_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
AVX512 static inline __m512d hi_pd(__m512 x) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)); }

AVX512 static void lmhead_chunk_stats_avx512(dpoc_lmhead_chunk_stats *st, const float *restrict l, size_t n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = ninf;
    __m512d ls0 = _mm512_setzero_pd(), ls1 = _mm512_setzero_pd();
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        const __m512 x = _mm512_mask_loadu_ps(ninf, mk, l + i);
        mx = _mm512_max_ps(x, mx);
        ls0 = _mm512_mask_add_pd(ls0, (__mmask8)mk, ls0, lo_pd(x));
        ls1 = _mm512_mask_add_pd(ls1, (__mmask8)(mk >> 8), ls1, hi_pd(x));
    }
    const float cmax = _mm512_reduce_max_ps(mx);
    size_t carg = 0;
    if (cmax > -INFINITY) { /* else the twin never moves its index from 0 */
        const __m512 cm = _mm512_set1_ps(cmax);
        for (size_t i = 0; i < n; i += 16) {
            const __mmask16 mk = lanes16(n - i);
            const __mmask16 hit = _mm512_mask_cmp_ps_mask(mk, _mm512_maskz_loadu_ps(mk, l + i), cm, _CMP_EQ_OQ);
            if (hit) {
                carg = i + (size_t)__builtin_ctz(hit);
                break;
            }
        }
    }
    const __m512 cm = _mm512_set1_ps(cmax);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    __m512d q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        const __mmask8 mlo = (__mmask8)mk, mhi = (__mmask8)(mk >> 8);
        const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, l + i), cm);
        const __m512 e = exp16(d);
        const __m512d dlo = lo_pd(d), dhi = hi_pd(d), elo = lo_pd(e), ehi = hi_pd(e);
        s0 = _mm512_mask_add_pd(s0, mlo, s0, elo);
        s1 = _mm512_mask_add_pd(s1, mhi, s1, ehi);
        a0 = _mm512_mask3_fmadd_pd(elo, dlo, a0, mlo);
        a1 = _mm512_mask3_fmadd_pd(ehi, dhi, a1, mhi);
        q0 = _mm512_mask3_fmadd_pd(elo, elo, q0, mlo);
        q1 = _mm512_mask3_fmadd_pd(ehi, ehi, q1, mhi);
    }
    *st = (dpoc_lmhead_chunk_stats){.max = cmax,
                                    .argmax = carg,
                                    .sum_logits = _mm512_reduce_add_pd(_mm512_add_pd(ls0, ls1)),
                                    .sum_exp = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)),
                                    .sum_exp_d = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1)),
                                    .sum_exp_sq = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1))};
}

AVX512 static void lmhead_chunk_dlogits_avx512(float *restrict l, size_t n, float g, float lse) {
    const __m512 ng = _mm512_set1_ps(-g), m = _mm512_set1_ps(lse);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        _mm512_mask_storeu_ps(l + i, mk, _mm512_mul_ps(ng, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, l + i), m))));
    }
}

/* ---- attention row operations (kernels_attention.c) ---- */

AVX512 static float row_max_avx512(const float *x, size_t n) {
    __m512 acc = _mm512_set1_ps(-INFINITY);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        acc = _mm512_max_ps(acc, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mk, x + i));
    }
    return _mm512_reduce_max_ps(acc);
}

AVX512 static float row_exp_sum_avx512(float *x, size_t n, size_t width, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), mv)));
        _mm512_mask_storeu_ps(x + i, mk, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (width > n) memset(x + n, 0, (width - n) * sizeof *x);
    return _mm512_reduce_add_ps(acc);
}

AVX512 static void row_scale_avx512(float *x, size_t n, float a) {
    const __m512 av = _mm512_set1_ps(a);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        _mm512_mask_storeu_ps(x + i, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), av));
    }
}

AVX512 static float row_dot_avx512(const float *a, const float *b, size_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + i), _mm512_maskz_loadu_ps(mk, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

AVX512 static void row_dsoftmax_avx512(float *p, const float *dp, size_t n, float D) {
    const __m512 Dv = _mm512_set1_ps(D);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 mk = lanes16(n - i);
        const __m512 pv = _mm512_maskz_loadu_ps(mk, p + i);
        _mm512_mask_storeu_ps(p + i, mk, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dp + i), Dv)));
    }
}

static const dpoc_attn_rowops rowops_avx512 = {
    .max = row_max_avx512,
    .exp_sum = row_exp_sum_avx512,
    .scale = row_scale_avx512,
    .dot = row_dot_avx512,
    .dsoftmax = row_dsoftmax_avx512,
};

static void attention_forward_avx512(float *out, float *lse, const float *q, const float *k, const float *v, size_t T,
                                     size_t nh, size_t nkv, size_t hd) {
    attention_forward_blocked(&rowops_avx512, out, lse, q, NULL, NULL, 0, k, v, T, nh, nkv, hd);
}

static void attention_backward_avx512(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                      const float *k, const float *v, const float *out, const float *lse, size_t T,
                                      size_t nh, size_t nkv, size_t hd) {
    attention_backward_blocked(&rowops_avx512, dq, NULL, NULL, dk, dv, dout, q, NULL, NULL, 0, k, v, out, lse, T, nh,
                               nkv, hd);
}

static void attention_prefix_forward_avx512(float *out, float *lse, const float *q, const float *kp, const float *vp,
                                            size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh,
                                            size_t nkv, size_t hd) {
    attention_forward_blocked(&rowops_avx512, out, lse, q, kp, vp, Tpre, k, v, Tq, nh, nkv, hd);
}

static void attention_prefix_backward_avx512(float *dq, float *dkp, float *dvp, float *dk, float *dv, const float *dout,
                                             const float *q, const float *kp, const float *vp, size_t Tpre,
                                             const float *k, const float *v, const float *out, const float *lse,
                                             size_t Tq, size_t nh, size_t nkv, size_t hd) {
    attention_backward_blocked(&rowops_avx512, dq, dkp, dvp, dk, dv, dout, q, kp, vp, Tpre, k, v, out, lse, Tq, nh, nkv,
                               hd);
}

const dpoc_kernel_table dpoc_kernels_avx512 = {
    .level = DPOC_SIMD_AVX512,
    .rmsnorm_forward = rmsnorm_forward_avx512,
    .rmsnorm_backward = rmsnorm_backward_avx512,
    .rope_forward = rope_forward_avx512,
    .rope_backward = rope_backward_avx512,
    .swiglu_forward = swiglu_forward_avx512,
    .swiglu_backward = swiglu_backward_avx512,
    .attention_forward = attention_forward_avx512,
    .attention_backward = attention_backward_avx512,
    .attention_prefix_forward = attention_prefix_forward_avx512,
    .attention_prefix_backward = attention_prefix_backward_avx512,
    .adamw_update = adamw_update_avx512,
    .sum_squares = sum_squares_avx512,
    .lmhead_chunk_stats = lmhead_chunk_stats_avx512,
    .lmhead_chunk_dlogits = lmhead_chunk_dlogits_avx512,
};

#endif /* __x86_64__ */
