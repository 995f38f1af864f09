/* AVX2 + FMA versions of the dispatched kernels (see kernels.h);
 * kernels_scalar.c defines what they compute. Every function carries its
 * target attribute instead of a global -m flag, so the library still runs on
 * any x86-64 and this code only runs when the dispatcher has seen the CPU
 * support it. Full 8-lane steps use plain loads and stores; only the tail
 * (sizes not a multiple of 8) uses vmaskmov, which never touches the
 * masked-out memory but is slow as a store on AMD cores.
 *
 * Where the scalar twin accumulates in double (the RMSNorm sums, the LM head's
 * softmax statistics) so do these;
 * elsewhere they differ from it only by rounding: fused multiply-adds, another
 * summation order, and exp from exp8 below instead of libm's expf. */
#include "model/kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* lane_table + 8 - k: k lanes of -1 (selected), then 0 */
static const int32_t lane_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

/* The lanes of an 8-wide step with `left` (< 8) elements to go. */
AVX2 static inline __m256i tail8(size_t left) { return _mm256_loadu_si256((const __m256i *)(lane_table + 8 - left)); }

/* Load / store of the step at p with `left` elements to go: whole, or the tail
 * with the other lanes read as 0 and not written. */
AVX2 static inline __m256 ld8(const float *p, size_t left) {
    return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail8(left));
}
AVX2 static inline void st8(float *p, size_t left, __m256 v) {
    if (left >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, tail8(left), v);
}

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline double hsum4d(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}

/* exp(x) per lane, Cephes' expf as in kernels_avx512.c's exp16, without
 * scalef: 2^n is applied as 2^(n/2) * 2^(n - n/2), two factors that stay
 * normal for every n of the clamped range, so overflow to inf and underflow to
 * denormals and 0 come out of the multiplications as IEEE rounds them. The
 * clamp maps +-inf to inf and 0 and lets a NaN through (min/max return their
 * second operand on NaN). */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* acc += a * b over 8 lanes in double (float products are exact in double, so
 * only the additions round, as in the scalar twin). */
AVX2 static inline void fma_pd8(__m256 a, __m256 b, __m256d *acc0, __m256d *acc1) {
    const __m256d alo = _mm256_cvtps_pd(_mm256_castps256_ps128(a)), ahi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
    const __m256d blo = _mm256_cvtps_pd(_mm256_castps256_ps128(b)), bhi = _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1));
    *acc0 = _mm256_fmadd_pd(alo, blo, *acc0);
    *acc1 = _mm256_fmadd_pd(ahi, bhi, *acc1);
}

/* ---- RMSNorm ---- */

AVX2 static void rmsnorm_forward_avx2(float *restrict out, float *restrict rstd, const float *restrict inp,
                                      const float *restrict weight, size_t T, size_t C, float eps) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        for (size_t i = 0; i < C; i += 8) {
            const __m256 xv = ld8(x + i, C - i);
            fma_pd8(xv, xv, &a0, &a1);
        }
        const double ss = hsum4d(_mm256_add_pd(a0, a1));
        const float var = (float)(ss / (double)C);
        const float r = 1.0f / sqrtf(var + eps);
        const __m256 rv = _mm256_set1_ps(r);
        float *restrict o = out + t * C;
        for (size_t i = 0; i < C; i += 8)
            st8(o + i, C - i, _mm256_mul_ps(ld8(weight + i, C - i), _mm256_mul_ps(ld8(x + i, C - i), rv)));
        rstd[t] = r;
    }
}

AVX2 static void rmsnorm_backward_avx2(float *restrict dinp, float *restrict dweight, const float *restrict dout,
                                       const float *restrict inp, const float *restrict weight,
                                       const float *restrict rstd, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        const float *restrict d = dout + t * C;
        const __m256 rv = _mm256_set1_ps(rstd[t]);
        /* one pass: dweight += d * n and the double sum of g * n */
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
        for (size_t i = 0; i < C; i += 8) {
            const size_t left = C - i;
            const __m256 dv = ld8(d + i, left);
            const __m256 nv = _mm256_mul_ps(ld8(x + i, left), rv);
            if (dweight) st8(dweight + i, left, _mm256_fmadd_ps(dv, nv, ld8(dweight + i, left)));
            if (dinp) fma_pd8(_mm256_mul_ps(dv, ld8(weight + i, left)), nv, &a0, &a1);
        }
        if (!dinp) continue;
        const __m256 mean = _mm256_set1_ps((float)(hsum4d(_mm256_add_pd(a0, a1)) / (double)C));
        float *restrict dx = dinp + t * C;
        for (size_t i = 0; i < C; i += 8) {
            const size_t left = C - i;
            const __m256 g = _mm256_mul_ps(ld8(d + i, left), ld8(weight + i, left));
            const __m256 nv = _mm256_mul_ps(ld8(x + i, left), rv);
            const __m256 u = _mm256_fnmadd_ps(nv, mean, g); /* g - n * mean */
            st8(dx + i, left, _mm256_fmadd_ps(rv, u, ld8(dx + i, left)));
        }
    }
}

/* ---- RoPE ---- */

/* One (T, nh, hd) array in place; sign = +1 rotates forward, -1 applies the
 * transpose (backward): y1 = a c - sign b s, y2 = b c + sign a s. */
AVX2 static inline void rope_avx2(float *restrict x, const float *restrict cos_t, const float *restrict sin_t, size_t T,
                                  size_t nh, size_t hd, float sign) {
    const size_t half = hd / 2;
    const __m256 sg = _mm256_set1_ps(sign);
    for (size_t t = 0; t < T; t++) {
        const float *restrict c = cos_t + t * half;
        const float *restrict s = sin_t + t * half;
        for (size_t h = 0; h < nh; h++) {
            float *restrict x1 = x + (t * nh + h) * hd;
            float *restrict x2 = x1 + half;
            for (size_t i = 0; i < half; i += 8) {
                const size_t left = half - i;
                const __m256 cv = ld8(c + i, left), sv = _mm256_mul_ps(sg, ld8(s + i, left));
                const __m256 a = ld8(x1 + i, left), b = ld8(x2 + i, left);
                st8(x1 + i, left, _mm256_fmsub_ps(a, cv, _mm256_mul_ps(b, sv)));
                st8(x2 + i, left, _mm256_fmadd_ps(b, cv, _mm256_mul_ps(a, sv)));
            }
        }
    }
}

AVX2 static void rope_forward_avx2(float *x, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd) {
    rope_avx2(x, cos_t, sin_t, T, nh, hd, 1.0f);
}

AVX2 static void rope_backward_avx2(float *dx, const float *cos_t, const float *sin_t, size_t T, size_t nh,
                                    size_t hd) {
    rope_avx2(dx, cos_t, sin_t, T, nh, hd, -1.0f);
}

/* ---- SwiGLU ---- */

AVX2 static void swiglu_forward_avx2(float *restrict out, const float *restrict gate, const float *restrict up,
                                     size_t N) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < N; i += 8) {
        const size_t left = N - i;
        const __m256 g = ld8(gate + i, left);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        st8(out + i, left, _mm256_mul_ps(silu, ld8(up + i, left)));
    }
}

AVX2 static void swiglu_backward_avx2(float *restrict dgate, float *restrict dup, const float *restrict dout,
                                      const float *restrict gate, const float *restrict up, size_t N) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < N; i += 8) {
        const size_t left = N - i;
        const __m256 g = ld8(gate + i, left);
        const __m256 d = ld8(dout + i, left);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        if (dup) st8(dup + i, left, _mm256_fmadd_ps(d, _mm256_mul_ps(g, sig), ld8(dup + i, left)));
        if (dgate) {
            /* sig * (1 + g * (1 - sig)) */
            const __m256 dsilu = _mm256_mul_ps(sig, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sig), one));
            const __m256 du = _mm256_mul_ps(d, ld8(up + i, left));
            st8(dgate + i, left, _mm256_fmadd_ps(du, dsilu, ld8(dgate + i, left)));
        }
    }
}

/* ---- AdamW ---- */

/* The scalar formula op for op (AdamW is bound by memory bandwidth, 7 floats
 * moved per parameter, so there is nothing to gain from reshaping it). */
AVX2 static void adamw_update_avx2(float *restrict params, const float *restrict grads, float *restrict m,
                                   float *restrict v, size_t n, const dpoc_adamw_coeffs *c) {
    const __m256 decay = _mm256_set1_ps(c->decay), omb1 = _mm256_set1_ps(c->one_minus_b1);
    const __m256 b2 = _mm256_set1_ps(c->b2), omb2 = _mm256_set1_ps(c->one_minus_b2);
    const __m256 step = _mm256_set1_ps(c->step_size), bc2 = _mm256_set1_ps(c->bc2_sqrt), eps = _mm256_set1_ps(c->eps);
    const __m256 gs = _mm256_set1_ps(c->grad_scale);
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        const __m256 g = _mm256_mul_ps(ld8(grads + i, left), gs);
        __m256 p = _mm256_mul_ps(ld8(params + i, left), decay);
        __m256 mv = ld8(m + i, left);
        mv = _mm256_add_ps(mv, _mm256_mul_ps(_mm256_sub_ps(g, mv), omb1));
        __m256 vv = ld8(v + i, left);
        vv = _mm256_add_ps(_mm256_mul_ps(vv, b2), _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
        const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2), eps);
        p = _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(step, mv), denom));
        st8(params + i, left, p);
        st8(m + i, left, mv);
        st8(v + i, left, vv);
    }
}

/* ---- gradient norm ---- */

/* As sum_squares_avx512: four double accumulators, squares exact in double. */
AVX2 static double sum_squares_avx2(const float *restrict x, size_t n) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 u = _mm256_loadu_ps(x + i), w = _mm256_loadu_ps(x + i + 8);
        fma_pd8(u, u, &a0, &a1);
        fma_pd8(w, w, &a2, &a3);
    }
    for (; i < n; i += 8) {
        const __m256 u = ld8(x + i, n - i);
        fma_pd8(u, u, &a0, &a1);
    }
    return hsum4d(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
}

/* ---- LM head ---- */

/* The bit mask of the lanes of an 8-wide step with `left` elements to go. */
static inline unsigned lane_bits8(size_t left) { return left >= 8 ? 0xFFu : (1u << left) - 1u; }

/* As lmhead_chunk_stats_avx512: the max (NaN skipped: max_ps returns its second
 * operand, the accumulator, when the logit is NaN) and the double sum of the
 * logits, a short scan for the first logit equal to the max (the index the
 * twin's strict > keeps), then exp8 of l - max with s, a, q summed in double
 * lanes (e d and e e are exact in double, so only the additions round). The
 * tail's lanes read 0 and are cleared (d and e both 0) before they are summed. */
/* The low and high 4 lanes of x widened to double. */
AVX2 static inline __m256d lo_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
AVX2 static inline __m256d hi_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

AVX2 static void lmhead_chunk_stats_avx2(dpoc_lmhead_chunk_stats *st, const float *restrict l, size_t n) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    __m256d ls0 = _mm256_setzero_pd(), ls1 = _mm256_setzero_pd();
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        const __m256 x = ld8(l + i, left); /* the tail's lanes read 0: nothing added to the sum */
        ls0 = _mm256_add_pd(ls0, lo_pd(x));
        ls1 = _mm256_add_pd(ls1, hi_pd(x));
        mx = _mm256_max_ps(left < 8 ? _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(tail8(left))) : x, mx);
    }
    const float cmax = hmax8(mx);
    const __m256 cm = _mm256_set1_ps(cmax);
    size_t carg = 0;
    if (cmax > -INFINITY) { /* else the twin never moves its index from 0 */
        for (size_t i = 0; i < n; i += 8) {
            const size_t left = n - i;
            const unsigned hit =
                (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(ld8(l + i, left), cm, _CMP_EQ_OQ)) & lane_bits8(left);
            if (hit) {
                carg = i + (size_t)__builtin_ctz(hit);
                break;
            }
        }
    }
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    __m256d q0 = _mm256_setzero_pd(), q1 = _mm256_setzero_pd();
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        __m256 d = _mm256_sub_ps(ld8(l + i, left), cm);
        __m256 e = exp8(d);
        if (left < 8) {
            const __m256 keep = _mm256_castsi256_ps(tail8(left));
            d = _mm256_and_ps(d, keep), e = _mm256_and_ps(e, keep);
        }
        const __m256d dlo = lo_pd(d), dhi = hi_pd(d), elo = lo_pd(e), ehi = hi_pd(e);
        s0 = _mm256_add_pd(s0, elo), s1 = _mm256_add_pd(s1, ehi);
        a0 = _mm256_fmadd_pd(elo, dlo, a0), a1 = _mm256_fmadd_pd(ehi, dhi, a1);
        q0 = _mm256_fmadd_pd(elo, elo, q0), q1 = _mm256_fmadd_pd(ehi, ehi, q1);
    }
    *st = (dpoc_lmhead_chunk_stats){.max = cmax,
                                    .argmax = carg,
                                    .sum_logits = hsum4d(_mm256_add_pd(ls0, ls1)),
                                    .sum_exp = hsum4d(_mm256_add_pd(s0, s1)),
                                    .sum_exp_d = hsum4d(_mm256_add_pd(a0, a1)),
                                    .sum_exp_sq = hsum4d(_mm256_add_pd(q0, q1))};
}

AVX2 static void lmhead_chunk_dlogits_avx2(float *restrict l, size_t n, float g, float lse) {
    const __m256 ng = _mm256_set1_ps(-g), m = _mm256_set1_ps(lse);
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        st8(l + i, left, _mm256_mul_ps(ng, exp8(_mm256_sub_ps(ld8(l + i, left), m))));
    }
}

/* ---- attention row operations (kernels_attention.c) ---- */

AVX2 static float row_max_avx2(const float *x, size_t n) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 acc = ninf;
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        __m256 xv = ld8(x + i, left);
        if (left < 8) xv = _mm256_blendv_ps(ninf, xv, _mm256_castsi256_ps(tail8(left)));
        acc = _mm256_max_ps(acc, xv);
    }
    return hmax8(acc);
}

AVX2 static float row_exp_sum_avx2(float *x, size_t n, size_t width, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8) {
        const size_t left = n - i;
        __m256 e = exp8(_mm256_sub_ps(ld8(x + i, left), mv));
        if (left < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail8(left))); /* the tail's lanes read 0 */
        st8(x + i, left, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (width > n) memset(x + n, 0, (width - n) * sizeof *x);
    return hsum8(acc);
}

AVX2 static void row_scale_avx2(float *x, size_t n, float a) {
    const __m256 av = _mm256_set1_ps(a);
    for (size_t i = 0; i < n; i += 8) st8(x + i, n - i, _mm256_mul_ps(ld8(x + i, n - i), av));
}

AVX2 static float row_dot_avx2(const float *a, const float *b, size_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (size_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(ld8(a + i, n - i), ld8(b + i, n - i), acc);
    return hsum8(acc);
}

AVX2 static void row_dsoftmax_avx2(float *p, const float *dp, size_t n, float D) {
    const __m256 Dv = _mm256_set1_ps(D);
    for (size_t i = 0; i < n; i += 8)
        st8(p + i, n - i, _mm256_mul_ps(ld8(p + i, n - i), _mm256_sub_ps(ld8(dp + i, n - i), Dv)));
}

static const dpoc_attn_rowops rowops_avx2 = {
    .max = row_max_avx2,
    .exp_sum = row_exp_sum_avx2,
    .scale = row_scale_avx2,
    .dot = row_dot_avx2,
    .dsoftmax = row_dsoftmax_avx2,
};

static void attention_forward_avx2(float *out, float *lse, const float *q, const float *k, const float *v, size_t T,
                                   size_t nh, size_t nkv, size_t hd) {
    attention_forward_blocked(&rowops_avx2, out, lse, q, NULL, NULL, 0, k, v, T, nh, nkv, hd);
}

static void attention_backward_avx2(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                                    const float *v, const float *out, const float *lse, size_t T, size_t nh, size_t nkv,
                                    size_t hd) {
    attention_backward_blocked(&rowops_avx2, dq, NULL, NULL, dk, dv, dout, q, NULL, NULL, 0, k, v, out, lse, T, nh,
                               nkv, hd);
}

static void attention_prefix_forward_avx2(float *out, float *lse, const float *q, const float *kp, const float *vp,
                                          size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh, size_t nkv,
                                          size_t hd) {
    attention_forward_blocked(&rowops_avx2, out, lse, q, kp, vp, Tpre, k, v, Tq, nh, nkv, hd);
}

static void attention_prefix_backward_avx2(float *dq, float *dkp, float *dvp, float *dk, float *dv, const float *dout,
                                           const float *q, const float *kp, const float *vp, size_t Tpre,
                                           const float *k, const float *v, const float *out, const float *lse,
                                           size_t Tq, size_t nh, size_t nkv, size_t hd) {
    attention_backward_blocked(&rowops_avx2, dq, dkp, dvp, dk, dv, dout, q, kp, vp, Tpre, k, v, out, lse, Tq, nh, nkv,
                               hd);
}

const dpoc_kernel_table dpoc_kernels_avx2 = {
    .level = DPOC_SIMD_AVX2,
    .rmsnorm_forward = rmsnorm_forward_avx2,
    .rmsnorm_backward = rmsnorm_backward_avx2,
    .rope_forward = rope_forward_avx2,
    .rope_backward = rope_backward_avx2,
    .swiglu_forward = swiglu_forward_avx2,
    .swiglu_backward = swiglu_backward_avx2,
    .attention_forward = attention_forward_avx2,
    .attention_backward = attention_backward_avx2,
    .attention_prefix_forward = attention_prefix_forward_avx2,
    .attention_prefix_backward = attention_prefix_backward_avx2,
    .adamw_update = adamw_update_avx2,
    .sum_squares = sum_squares_avx2,
    .lmhead_chunk_stats = lmhead_chunk_stats_avx2,
    .lmhead_chunk_dlogits = lmhead_chunk_dlogits_avx2,
};

#endif /* __x86_64__ */
