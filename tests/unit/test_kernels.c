/* The SIMD kernels (src/model/kernels_avx2.c, kernels_avx512.c and the blocked
 * attention of kernels_attention.c) against their scalar twins
 * (kernels_scalar.c), which test_layers checks against double-precision
 * formulas and finite differences.
 *
 * Every kernel runs at each SIMD level on fixed awkward shapes (sizes 1, a
 * vector width - 1, + 1, tails of every length, T = 1, more rows than one
 * attention tile) and on random shapes, from the same inputs as the scalar
 * twin, and must agree with it within the tolerances below. The LM head's
 * per-chunk kernels are checked the same way (with ties for the argmax and
 * logits whose exp underflows), then the whole head at each level against the
 * head at the scalar level. The attention
 * after a prefix (a shared prompt) is checked the same way, and its scalar twin
 * bit for bit against the causal one on the concatenated sequence. A level this CPU
 * lacks is reported as skipped. Then: the dispatch (forcing a level, the
 * DPOC_SIMD variable in a child process, rejected levels).
 *
 * DPOC_KERNELS_REPORT=1 prints the largest error seen by every comparison. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/rng.h"
#include "testutil.h"

#include "dpoc/layers.h"
#include "model/kernels.h"

/* Tolerances of SIMD vs scalar. The levels differ from the scalar twin by
 * rounding only: fused multiply-adds, summation order, a polynomial exp
 * (within 1 ulp, like libm's expf, but not always the same value), and for
 * attention the online softmax over tiles and sgemm's summation order. So
 * element-wise results are held to a few ulp, and results with cancellation
 * (gradients, sums over rows) to a relative max-abs error (largest difference
 * / largest reference value). The worst cases seen use a quarter of these or
 * less (DPOC_KERNELS_REPORT=1). */
#define TOL_ELEM 1e-6      /* element-wise, relative: RMSNorm out, rstd, AdamW's v */
#define TOL_EXP_ELEM 1e-6  /* element-wise, relative: SwiGLU (exp and a division) */
#define TOL_MAXABS 1e-6    /* relative max-abs: RoPE, RMSNorm and SwiGLU gradients, AdamW params and m */
/* Attention, relative max-abs, per unit of the largest |score| (at least 1): a
 * score carries a rounding error of about 2^-24 |score| that depends on the
 * summation order (sgemm's or the scalar loop's), and exp turns that absolute
 * error of the exponent into a relative error of the probabilities. */
#define TOL_ATT_FWD 2e-6   /* out and logsumexp */
#define TOL_ATT_BWD 1e-5   /* dq, dk, dv */
/* Denominator floor of the attention gradients: with these inputs they are of
 * order 0.1 to 1, except where they vanish analytically (dq and dk at T = 1:
 * dS = P (dP - D) with P = 1 and dP = D), where both sides are rounding noise. */
#define ATT_GRAD_FLOOR 0.1
#define ATOL_TINY 1e-30    /* absolute floor for element-wise comparisons of ~0 */
/* LM head, the statistics of one chunk row (lmhead_chunk_stats): the max and
 * its first index are compared exactly (comparisons only, no rounding). The sum
 * of the logits is a double sum of the same terms in another order: within
 * n 2^-53 sum |l| (< 1e-12 sum |l| for the n <= 5000 here). For s = sum e,
 * a = sum e d and q = sum e^2 (e = exp(d), d = l - max bit for bit the twin's):
 * each e is within ~2 ulp of the twin's (SIMD exp vs libm's expf, both within
 * 1 ulp), e d and e e are exact in double, and the terms of a sum all have one
 * sign, so a sum's relative error is at most its terms' (~2.4e-7, ~4.8e-7 for
 * e^2). Except where e is a denormal (d below about -87): there both exps carry
 * an absolute error of up to 2^-149, which a term e d multiplies by |d| <= 104
 * (exp is 0 below that). */
#define TOL_LMHEAD_SUM_ORDER 1e-12       /* relative to sum |l|: the sum of the logits */
#define TOL_LMHEAD_EXP_SUM 1e-6          /* relative: s, a, q */
#define ATOL_LMHEAD_DENORMAL_TERM 1e-42  /* per term of a: > 104 * 2^-149 = 1.5e-43 */
/* The whole LM head at a SIMD level against the head at the scalar level. The
 * logits come from the same sgemm calls, bit for bit, so the outputs differ
 * only by the statistics above: lse, logp, entropy and log sum p^2 are logs and
 * quotients of s, a, q (an error of s by a factor 1 + x moves log s by x), the
 * mean logit a double sum; all held to 1e-6 relative max-abs with a floor of 1
 * (they are O(1) to O(log V), and an absolute 1e-6 where they are near 0).
 * top-1 exactly (the argmax is exact). dh and dw are sgemm sums of dlogits each
 * within ~2 ulp of the twin's: relative max-abs like the other gradients. The
 * worst cases seen use a tenth of these or less, and a third for dw
 * (DPOC_KERNELS_REPORT=1). */
#define TOL_LMHEAD_HEAD 1e-6
#define LMHEAD_LOG_FLOOR 1.0

static int report; /* DPOC_KERNELS_REPORT set: print the largest errors */

/* ---------------------------------------------------------------------- */
/* helpers */

static size_t rng_size(rng_t *r, size_t lo, size_t hi) { return lo + (size_t)(rng_next(r) % (hi - lo + 1)); }

static float *frand(rng_t *r, size_t n, float lo, float hi) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++) a[i] = rng_uniform(r, lo, hi);
    return a;
}

static float *fcopy(const float *src, size_t n) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    assert_non_null(a);
    if (n) memcpy(a, src, n * sizeof *a);
    return a;
}

/* |got - want| <= rtol |want| + ATOL_TINY for every element. */
static void check_elem(const float *got, const float *want, size_t n, double rtol, const char *what) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - (double)want[i]);
        const double e = d / (fabs((double)want[i]) + ATOL_TINY / rtol);
        if (!(d <= rtol * fabs((double)want[i]) + ATOL_TINY))
            fail_msg("%s: element %zu of %zu is %.9g, scalar twin %.9g (relative error %.3g > %.1g)", what, i, n,
                     got[i], want[i], e, rtol);
        if (e > worst) worst = e;
    }
    if (report) print_message("  %-44s n=%-7zu worst element-wise %.3g (tol %.1g)\n", what, n, worst, rtol);
}

/* The same values bit for bit (one kernel called two ways). */
static void check_same(const float *got, const float *want, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&got[i], &want[i], sizeof got[i]) != 0)
            fail_msg("%s: element %zu of %zu is %.9g, expected %.9g", what, i, n, got[i], want[i]);
}

/* max |got - want| / max(max |want|, floor) <= tol */
static void check_maxabs_floor(const float *got, const float *want, size_t n, double tol, double floor,
                               const char *what) {
    const double e = rel_maxabs_err(got, want, n, floor);
    if (!(e <= tol)) fail_msg("%s: relative max-abs error %.3g > %.1g (n = %zu)", what, e, tol, n);
    if (report) print_message("  %-44s n=%-7zu worst max-abs %.3g (tol %.1g)\n", what, n, e, tol);
}

static void check_maxabs(const float *got, const float *want, size_t n, double tol, const char *what) {
    check_maxabs_floor(got, want, n, tol, 1e-30, what);
}

static double att_score_scale; /* max(1, largest |score|) of the attention case under test */

static void check_att_grad(const float *got, const float *want, size_t n, const char *what) {
    check_maxabs_floor(got, want, n, TOL_ATT_BWD * att_score_scale, ATT_GRAD_FLOOR, what);
}

/* max(1, max |q_t . k_s| / sqrt(hd)) over heads and causal pairs */
static double max_abs_score(const float *q, const float *k, size_t T, size_t nh, size_t nkv, size_t hd) {
    double m = 1.0;
    for (size_t h = 0; h < nh; h++)
        for (size_t t = 0; t < T; t++)
            for (size_t s = 0; s <= t; s++) {
                double d = 0;
                for (size_t i = 0; i < hd; i++)
                    d += (double)q[(t * nh + h) * hd + i] * (double)k[(s * nkv + h / (nh / nkv)) * hd + i];
                d = fabs(d) / sqrt((double)hd);
                if (d > m) m = d;
            }
    return m;
}

/* the initial states of the per-level tests (cmocka passes them as void *) */
static dpoc_simd_level LEVEL_AVX2 = DPOC_SIMD_AVX2, LEVEL_AVX512 = DPOC_SIMD_AVX512;

/* The table of the level under test, or a visible skip when the CPU lacks it. */
static const dpoc_kernel_table *level_table(void **state) {
    const dpoc_simd_level level = *(const dpoc_simd_level *)*state;
    const dpoc_kernel_table *t = dpoc_kernels_for(level);
    if (!t) {
        print_message("[  SKIPPED ] this CPU (or a non-x86-64 build) lacks SIMD level %s\n", dpoc_simd_name(level));
        skip();
    }
    assert_int_equal(t->level, level);
    return t;
}

static const dpoc_kernel_table *scalar = &dpoc_kernels_scalar;

/* ---------------------------------------------------------------------- */
/* RMSNorm */

static void check_rmsnorm(const dpoc_kernel_table *kt, size_t T, size_t C, float eps, rng_t *rng) {
    char what[96];
    const size_t n = T * C;
    float *x = frand(rng, n, -3, 3), *w = frand(rng, C, 0.5f, 1.5f);
    if (T > 1) /* a row of zeros: rstd = 1/sqrt(eps) */
        for (size_t i = 0; i < C; i++) x[C + i] = 0.0f;
    float *out = frand(rng, n, 7, 8), *rstd = frand(rng, T, 7, 8); /* garbage: overwritten */
    float *out_s = fcopy(out, n), *rstd_s = fcopy(rstd, T);
    kt->rmsnorm_forward(out, rstd, x, w, T, C, eps);
    scalar->rmsnorm_forward(out_s, rstd_s, x, w, T, C, eps);
    snprintf(what, sizeof what, "rmsnorm out T=%zu C=%zu", T, C);
    check_elem(out, out_s, n, TOL_ELEM, what);
    snprintf(what, sizeof what, "rmsnorm rstd T=%zu C=%zu", T, C);
    check_elem(rstd, rstd_s, T, TOL_ELEM, what);

    /* backward accumulates into nonzero gradients; NULL ones are skipped */
    float *dout = frand(rng, n, -1, 1), *dx = frand(rng, n, -1, 1), *dw = frand(rng, C, -1, 1);
    float *dx_s = fcopy(dx, n), *dw_s = fcopy(dw, C), *dx0 = fcopy(dx, n), *dw0 = fcopy(dw, C);
    kt->rmsnorm_backward(dx, dw, dout, x, w, rstd_s, T, C);
    scalar->rmsnorm_backward(dx_s, dw_s, dout, x, w, rstd_s, T, C);
    snprintf(what, sizeof what, "rmsnorm dinp T=%zu C=%zu", T, C);
    check_maxabs(dx, dx_s, n, TOL_MAXABS, what);
    snprintf(what, sizeof what, "rmsnorm dweight T=%zu C=%zu", T, C);
    check_maxabs(dw, dw_s, C, TOL_MAXABS, what);
    float *dx1 = fcopy(dx0, n), *dw1 = fcopy(dw0, C);
    kt->rmsnorm_backward(dx1, NULL, dout, x, w, rstd_s, T, C);
    kt->rmsnorm_backward(NULL, dw1, dout, x, w, rstd_s, T, C);
    snprintf(what, sizeof what, "rmsnorm dinp alone T=%zu C=%zu", T, C);
    check_same(dx1, dx, n, what);
    snprintf(what, sizeof what, "rmsnorm dweight alone T=%zu C=%zu", T, C);
    check_same(dw1, dw, C, what);
    free(x), free(w), free(out), free(rstd), free(out_s), free(rstd_s), free(dout), free(dx), free(dw);
    free(dx_s), free(dw_s), free(dx0), free(dw0), free(dx1), free(dw1);
}

static void test_rmsnorm(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {101};
    static const size_t Cs[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 576, 577};
    for (size_t i = 0; i < sizeof Cs / sizeof *Cs; i++) {
        check_rmsnorm(kt, 1, Cs[i], 1e-5f, &rng);
        check_rmsnorm(kt, 3, Cs[i], 1e-6f, &rng);
    }
    for (int r = 0; r < 20; r++) check_rmsnorm(kt, rng_size(&rng, 1, 9), rng_size(&rng, 1, 700), 1e-5f, &rng);
}

/* ---------------------------------------------------------------------- */
/* RoPE */

static void check_rope(const dpoc_kernel_table *kt, size_t T, size_t nh, size_t hd, rng_t *rng) {
    char what[96];
    const size_t n = T * nh * hd, half = hd / 2;
    float *cos_t = malloc(T * half * sizeof *cos_t), *sin_t = malloc(T * half * sizeof *sin_t);
    assert_true(cos_t && sin_t);
    rope_tables(cos_t, sin_t, T, hd, 10000.0f);
    float *x = frand(rng, n, -2, 2), *x_s = fcopy(x, n);
    kt->rope_forward(x, cos_t, sin_t, T, nh, hd);
    scalar->rope_forward(x_s, cos_t, sin_t, T, nh, hd);
    snprintf(what, sizeof what, "rope forward T=%zu nh=%zu hd=%zu", T, nh, hd);
    check_maxabs(x, x_s, n, TOL_MAXABS, what);
    kt->rope_backward(x, cos_t, sin_t, T, nh, hd);
    scalar->rope_backward(x_s, cos_t, sin_t, T, nh, hd);
    snprintf(what, sizeof what, "rope backward T=%zu nh=%zu hd=%zu", T, nh, hd);
    check_maxabs(x, x_s, n, TOL_MAXABS, what);
    free(cos_t), free(sin_t), free(x), free(x_s);
}

static void test_rope(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {102};
    static const size_t hds[] = {2, 6, 14, 16, 18, 30, 32, 34, 64, 66, 128};
    for (size_t i = 0; i < sizeof hds / sizeof *hds; i++) {
        check_rope(kt, 1, 1, hds[i], &rng);
        check_rope(kt, 5, 3, hds[i], &rng);
    }
    for (int r = 0; r < 20; r++)
        check_rope(kt, rng_size(&rng, 1, 40), rng_size(&rng, 1, 9), 2 * rng_size(&rng, 1, 80), &rng);
}

/* ---------------------------------------------------------------------- */
/* SwiGLU */

static void check_swiglu(const dpoc_kernel_table *kt, float *g, size_t N, rng_t *rng, const char *label) {
    char what[96];
    float *u = frand(rng, N, -2, 2), *out = frand(rng, N, 7, 8), *out_s = fcopy(out, N);
    kt->swiglu_forward(out, g, u, N);
    scalar->swiglu_forward(out_s, g, u, N);
    snprintf(what, sizeof what, "swiglu out %s N=%zu", label, N);
    check_elem(out, out_s, N, TOL_EXP_ELEM, what);

    float *dout = frand(rng, N, -1, 1), *dg = frand(rng, N, -1, 1), *du = frand(rng, N, -1, 1);
    float *dg_s = fcopy(dg, N), *du_s = fcopy(du, N), *dg1 = fcopy(dg, N), *du1 = fcopy(du, N);
    kt->swiglu_backward(dg, du, dout, g, u, N);
    scalar->swiglu_backward(dg_s, du_s, dout, g, u, N);
    snprintf(what, sizeof what, "swiglu dgate %s N=%zu", label, N);
    check_maxabs(dg, dg_s, N, TOL_MAXABS, what);
    snprintf(what, sizeof what, "swiglu dup %s N=%zu", label, N);
    check_maxabs(du, du_s, N, TOL_MAXABS, what);
    kt->swiglu_backward(dg1, NULL, dout, g, u, N);
    kt->swiglu_backward(NULL, du1, dout, g, u, N);
    snprintf(what, sizeof what, "swiglu dgate alone %s N=%zu", label, N);
    check_same(dg1, dg, N, what);
    snprintf(what, sizeof what, "swiglu dup alone %s N=%zu", label, N);
    check_same(du1, du, N, what);
    free(u), free(out), free(out_s), free(dout), free(dg), free(du), free(dg_s), free(du_s), free(dg1), free(du1);
}

static void test_swiglu(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {103};
    static const size_t Ns[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1536 * 3 + 5};
    for (size_t i = 0; i < sizeof Ns / sizeof *Ns; i++) {
        float *g = frand(&rng, Ns[i], -12, 12);
        check_swiglu(kt, g, Ns[i], &rng, "random");
        free(g);
    }
    for (int r = 0; r < 20; r++) {
        const size_t N = rng_size(&rng, 1, 5000);
        float *g = frand(&rng, N, -30, 30);
        check_swiglu(kt, g, N, &rng, "random");
        free(g);
    }
    /* exp's edges: saturation, overflow of exp(-g) to inf, denormal results,
     * zero and signed zero, and the range limits of the SIMD exp */
    float edges[] = {0.0f,    -0.0f,   1e-30f,  -1e-30f, 1e-8f,    -1e-8f,  0.5f,    -0.5f,   20.0f,  -20.0f,
                     40.0f,   -40.0f,  80.0f,   -80.0f,  87.0f,    -87.0f,  87.5f,   -87.5f,  88.7f,  -88.7f,
                     88.75f,  -88.75f, 89.0f,   -89.0f,  90.0f,    -90.0f,  103.0f,  -103.0f, 104.0f, -104.0f,
                     105.0f,  -105.0f, 150.0f,  -150.0f, 1e4f,     -1e4f,   1e30f,   -1e30f,  3.0f,   -3.0f,
                     -0.125f, 0.125f,  -6.0f};
    check_swiglu(kt, edges, sizeof edges / sizeof *edges, &rng, "edges");
}

/* ---------------------------------------------------------------------- */
/* Attention */

typedef struct {
    size_t T, nh, nkv, hd;
} att_shape;

/* kscale > 1 makes the scores large (|score| up to ~ kscale * hd^0.5 * 4), and
 * grow along the keys, so a row's max changes from tile to tile. */
static void check_attention(const dpoc_kernel_table *kt, att_shape sh, float kscale, rng_t *rng) {
    char what[128], shape[64];
    const size_t T = sh.T, nh = sh.nh, nkv = sh.nkv, hd = sh.hd;
    snprintf(shape, sizeof shape, "T=%zu nh=%zu nkv=%zu hd=%zu x%g", T, nh, nkv, hd, kscale);
    const size_t nq = T * nh * hd, nk = T * nkv * hd, nl = nh * T;
    float *q = frand(rng, nq, -2, 2), *k = frand(rng, nk, -2, 2), *v = frand(rng, nk, -1, 1);
    for (size_t s = 0; s < T; s++)
        for (size_t i = 0; i < nkv * hd; i++) k[s * nkv * hd + i] *= kscale * (1.0f + (float)s / (float)T);
    att_score_scale = max_abs_score(q, k, T, nh, nkv, hd);
    float *out = frand(rng, nq, 7, 8), *lse = frand(rng, nl, 7, 8); /* garbage: overwritten */
    float *out_s = fcopy(out, nq), *lse_s = fcopy(lse, nl);
    kt->attention_forward(out, lse, q, k, v, T, nh, nkv, hd);
    scalar->attention_forward(out_s, lse_s, q, k, v, T, nh, nkv, hd);
    snprintf(what, sizeof what, "attention out %s", shape);
    check_maxabs(out, out_s, nq, TOL_ATT_FWD * att_score_scale, what);
    snprintf(what, sizeof what, "attention lse %s", shape);
    check_maxabs(lse, lse_s, nl, TOL_ATT_FWD * att_score_scale, what);

    /* backward from the scalar forward's out and lse, accumulating into nonzero gradients */
    float *dout = frand(rng, nq, -1, 1);
    float *dq = frand(rng, nq, -1, 1), *dk = frand(rng, nk, -1, 1), *dv = frand(rng, nk, -1, 1);
    float *dq0 = fcopy(dq, nq), *dk0 = fcopy(dk, nk), *dv0 = fcopy(dv, nk);
    float *dq_s = fcopy(dq, nq), *dk_s = fcopy(dk, nk), *dv_s = fcopy(dv, nk);
    kt->attention_backward(dq, dk, dv, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd);
    scalar->attention_backward(dq_s, dk_s, dv_s, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd);
    /* compare the increments, not increment + a large initial value */
    for (size_t i = 0; i < nq; i++) dq[i] -= dq0[i], dq_s[i] -= dq0[i];
    for (size_t i = 0; i < nk; i++) dk[i] -= dk0[i], dk_s[i] -= dk0[i], dv[i] -= dv0[i], dv_s[i] -= dv0[i];
    snprintf(what, sizeof what, "attention dq %s", shape);
    check_att_grad(dq, dq_s, nq, what);
    snprintf(what, sizeof what, "attention dk %s", shape);
    check_att_grad(dk, dk_s, nk, what);
    snprintf(what, sizeof what, "attention dv %s", shape);
    check_att_grad(dv, dv_s, nk, what);

    /* one gradient at a time gives the same as all three (up to the subtraction above) */
    float *g1 = calloc(nq > nk ? nq : nk, sizeof *g1);
    assert_non_null(g1);
    kt->attention_backward(g1, NULL, NULL, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd);
    snprintf(what, sizeof what, "attention dq alone %s", shape);
    check_att_grad(g1, dq, nq, what);
    memset(g1, 0, nk * sizeof *g1);
    kt->attention_backward(NULL, g1, NULL, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd);
    snprintf(what, sizeof what, "attention dk alone %s", shape);
    check_att_grad(g1, dk, nk, what);
    memset(g1, 0, nk * sizeof *g1);
    kt->attention_backward(NULL, NULL, g1, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd);
    snprintf(what, sizeof what, "attention dv alone %s", shape);
    check_att_grad(g1, dv, nk, what);
    kt->attention_backward(NULL, NULL, NULL, dout, q, k, v, out_s, lse_s, T, nh, nkv, hd); /* a no-op */

    free(q), free(k), free(v), free(out), free(lse), free(out_s), free(lse_s), free(dout), free(dq), free(dk);
    free(dv), free(dq0), free(dk0), free(dv0), free(dq_s), free(dk_s), free(dv_s), free(g1);
}

static void test_attention(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {104};
    /* the blocked attention's tiles are 64 x 64: shapes below, at and above one
     * tile, several tiles with a short last one, T = 1, MHA / GQA / MQA, head
     * sizes that are not a multiple of the vector width, SmolLM2's 9/3/64 */
    static const att_shape shapes[] = {
        {1, 1, 1, 1},  {1, 9, 3, 64},  {2, 2, 1, 3},   {5, 4, 2, 6},    {30, 9, 3, 64}, {63, 2, 1, 17},
        {64, 2, 2, 16}, {65, 3, 1, 8}, {128, 9, 3, 64}, {129, 2, 1, 64}, {200, 2, 1, 33}, {7, 6, 6, 5},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) check_attention(kt, shapes[i], 1.0f, &rng);
    check_attention(kt, (att_shape){150, 2, 1, 16}, 8.0f, &rng); /* scores of +-100 and a moving max */
    check_attention(kt, (att_shape){70, 3, 3, 9}, 4.0f, &rng);
    for (int r = 0; r < 10; r++) {
        const size_t nkv = rng_size(&rng, 1, 3);
        att_shape sh = {rng_size(&rng, 1, 300), nkv * rng_size(&rng, 1, 3), nkv, rng_size(&rng, 1, 80)};
        check_attention(kt, sh, 1.0f, &rng);
    }
}

/* ---------------------------------------------------------------------- */
/* Attention after a prefix (attention_prefix_*: the shared prompt of a pair) */

/* max(1, max |q_t . k_s| / sqrt(hd)) over heads and the keys each query row
 * sees: all Tpre prefix keys kp and own keys k 0..t. */
static double max_abs_score_prefix(const float *q, const float *kp, size_t Tpre, const float *k, size_t Tq, size_t nh,
                                   size_t nkv, size_t hd) {
    double m = 1.0;
    for (size_t h = 0; h < nh; h++)
        for (size_t t = 0; t < Tq; t++)
            for (size_t s = 0; s < Tpre + t + 1; s++) {
                const float *ks = s < Tpre ? kp + s * nkv * hd : k + (s - Tpre) * nkv * hd;
                double d = 0;
                for (size_t i = 0; i < hd; i++)
                    d += (double)q[(t * nh + h) * hd + i] * (double)ks[h / (nh / nkv) * hd + i];
                d = fabs(d) / sqrt((double)hd);
                if (d > m) m = d;
            }
    return m;
}

typedef struct {
    size_t Tpre, Tq, nh, nkv, hd;
} prefix_shape;

/* The prefix form at a SIMD level against the scalar twin's prefix form, with
 * the tolerances of the causal attention; gradients accumulate into nonzero
 * arrays and each one computed alone matches all of them together. kscale as
 * in check_attention (scores grow along the positions, prefix then own). */
static void check_attention_prefix(const dpoc_kernel_table *kt, prefix_shape sh, float kscale, rng_t *rng) {
    char what[160], shape[96];
    const size_t Tpre = sh.Tpre, Tq = sh.Tq, nh = sh.nh, nkv = sh.nkv, hd = sh.hd;
    snprintf(shape, sizeof shape, "Tpre=%zu Tq=%zu nh=%zu nkv=%zu hd=%zu x%g", Tpre, Tq, nh, nkv, hd, kscale);
    const size_t nq = Tq * nh * hd, np = Tpre * nkv * hd, nk = Tq * nkv * hd, nl = nh * Tq;
    float *q = frand(rng, nq, -2, 2), *kp = frand(rng, np, -2, 2), *vp = frand(rng, np, -1, 1);
    float *k = frand(rng, nk, -2, 2), *v = frand(rng, nk, -1, 1);
    const size_t Tall = Tpre + Tq;
    for (size_t s = 0; s < Tall; s++) {
        float *row = s < Tpre ? kp + s * nkv * hd : k + (s - Tpre) * nkv * hd;
        for (size_t i = 0; i < nkv * hd; i++) row[i] *= kscale * (1.0f + (float)s / (float)Tall);
    }
    att_score_scale = max_abs_score_prefix(q, kp, Tpre, k, Tq, nh, nkv, hd);
    float *out = frand(rng, nq, 7, 8), *lse = frand(rng, nl, 7, 8); /* garbage: overwritten */
    float *out_s = fcopy(out, nq), *lse_s = fcopy(lse, nl);
    kt->attention_prefix_forward(out, lse, q, kp, vp, Tpre, k, v, Tq, nh, nkv, hd);
    scalar->attention_prefix_forward(out_s, lse_s, q, kp, vp, Tpre, k, v, Tq, nh, nkv, hd);
    snprintf(what, sizeof what, "attention prefix out %s", shape);
    check_maxabs(out, out_s, nq, TOL_ATT_FWD * att_score_scale, what);
    snprintf(what, sizeof what, "attention prefix lse %s", shape);
    check_maxabs(lse, lse_s, nl, TOL_ATT_FWD * att_score_scale, what);

    /* backward from the scalar forward, accumulating into nonzero gradients */
    float *dout = frand(rng, nq, -1, 1);
    float *g0[5] = {frand(rng, nq, -1, 1), frand(rng, np, -1, 1), frand(rng, np, -1, 1), frand(rng, nk, -1, 1),
                    frand(rng, nk, -1, 1)};
    const size_t gn[5] = {nq, np, np, nk, nk};
    static const char *const gname[5] = {"dq", "dkp", "dvp", "dk", "dv"};
    float *g[5], *g_s[5];
    for (int i = 0; i < 5; i++) g[i] = fcopy(g0[i], gn[i]), g_s[i] = fcopy(g0[i], gn[i]);
    kt->attention_prefix_backward(g[0], g[1], g[2], g[3], g[4], dout, q, kp, vp, Tpre, k, v, out_s, lse_s, Tq, nh, nkv,
                                  hd);
    scalar->attention_prefix_backward(g_s[0], g_s[1], g_s[2], g_s[3], g_s[4], dout, q, kp, vp, Tpre, k, v, out_s,
                                      lse_s, Tq, nh, nkv, hd);
    for (int i = 0; i < 5; i++) {
        for (size_t j = 0; j < gn[i]; j++) g[i][j] -= g0[i][j], g_s[i][j] -= g0[i][j]; /* the increments */
        snprintf(what, sizeof what, "attention prefix %s %s", gname[i], shape);
        check_att_grad(g[i], g_s[i], gn[i], what);
    }
    /* one gradient at a time gives the same as all five */
    for (int i = 0; i < 5; i++) {
        float *one[5] = {NULL, NULL, NULL, NULL, NULL};
        one[i] = calloc(gn[i] ? gn[i] : 1, sizeof *one[i]);
        assert_non_null(one[i]);
        kt->attention_prefix_backward(one[0], one[1], one[2], one[3], one[4], dout, q, kp, vp, Tpre, k, v, out_s, lse_s,
                                      Tq, nh, nkv, hd);
        snprintf(what, sizeof what, "attention prefix %s alone %s", gname[i], shape);
        check_att_grad(one[i], g[i], gn[i], what);
        free(one[i]);
    }
    kt->attention_prefix_backward(NULL, NULL, NULL, NULL, NULL, dout, q, kp, vp, Tpre, k, v, out_s, lse_s, Tq, nh, nkv,
                                  hd); /* a no-op */
    free(q), free(kp), free(vp), free(k), free(v), free(out), free(lse), free(out_s), free(lse_s), free(dout);
    for (int i = 0; i < 5; i++) free(g0[i]), free(g[i]), free(g_s[i]);
}

static const prefix_shape prefix_shapes[] = {
    {0, 1, 1, 1, 1},   {1, 1, 1, 1, 1},    {1, 1, 9, 3, 64},  {3, 2, 2, 1, 3},    {5, 4, 4, 2, 6},
    {35, 48, 9, 3, 64}, {63, 1, 2, 1, 17}, {64, 64, 2, 2, 16}, {65, 65, 3, 1, 8}, {128, 32, 9, 3, 64},
    {130, 3, 2, 1, 33}, {7, 70, 6, 6, 5},  {0, 70, 2, 1, 9},  {200, 129, 2, 1, 16},
};

static void test_attention_prefix(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {107};
    for (size_t i = 0; i < sizeof prefix_shapes / sizeof *prefix_shapes; i++)
        check_attention_prefix(kt, prefix_shapes[i], 1.0f, &rng);
    check_attention_prefix(kt, (prefix_shape){90, 80, 2, 1, 16}, 8.0f, &rng); /* scores of +-100, a moving max */
    for (int r = 0; r < 10; r++) {
        const size_t nkv = rng_size(&rng, 1, 3);
        prefix_shape sh = {rng_size(&rng, 0, 150), rng_size(&rng, 1, 150), nkv * rng_size(&rng, 1, 3), nkv,
                           rng_size(&rng, 1, 80)};
        check_attention_prefix(kt, sh, 1.0f, &rng);
    }
}

/* The scalar twin's prefix form is, bit for bit, the last Tq rows of its causal
 * attention on the concatenated [prefix; own] sequence: the keys go in the same
 * order through the same operations. For the backward the causal call gets
 * dout = 0 on the prefix rows (their contributions are then exact zeros), so
 * its dk, dv rows are the prefix call's dkp, dvp then dk, dv. With the SIMD
 * levels checked against this twin above, and the causal twin against double
 * formulas in test_layers, the prefix form of every level is pinned down. */
static void test_attention_prefix_is_causal_suffix(void **state) {
    (void)state;
    rng_t rng = {108};
    char what[128];
    for (size_t si = 0; si < sizeof prefix_shapes / sizeof *prefix_shapes; si++) {
        const prefix_shape sh = prefix_shapes[si];
        const size_t Tpre = sh.Tpre, Tq = sh.Tq, nh = sh.nh, nkv = sh.nkv, hd = sh.hd, T = Tpre + Tq;
        const size_t qs = nh * hd, ks = nkv * hd;
        float *q = frand(&rng, T * qs, -2, 2), *k = frand(&rng, T * ks, -2, 2), *v = frand(&rng, T * ks, -1, 1);
        float *out = frand(&rng, T * qs, 7, 8), *lse = frand(&rng, nh * T, 7, 8);
        float *out_p = frand(&rng, Tq * qs, 7, 8), *lse_p = frand(&rng, nh * Tq, 7, 8);
        scalar->attention_forward(out, lse, q, k, v, T, nh, nkv, hd);
        scalar->attention_prefix_forward(out_p, lse_p, q + Tpre * qs, k, v, Tpre, k + Tpre * ks, v + Tpre * ks, Tq, nh,
                                         nkv, hd);
        snprintf(what, sizeof what, "prefix out vs causal Tpre=%zu Tq=%zu", Tpre, Tq);
        check_same(out_p, out + Tpre * qs, Tq * qs, what);
        for (size_t h = 0; h < nh; h++) {
            snprintf(what, sizeof what, "prefix lse vs causal Tpre=%zu Tq=%zu head %zu", Tpre, Tq, h);
            check_same(lse_p + h * Tq, lse + h * T + Tpre, Tq, what);
        }
        float *dout = frand(&rng, T * qs, -1, 1);
        memset(dout, 0, Tpre * qs * sizeof *dout);
        float *dq = calloc(T * qs, sizeof *dq), *dk = calloc(T * ks, sizeof *dk), *dv = calloc(T * ks, sizeof *dv);
        float *dq_p = calloc(Tq * qs, sizeof *dq_p), *dk_p = calloc(T * ks, sizeof *dk_p),
              *dv_p = calloc(T * ks, sizeof *dv_p);
        assert_true(dq && dk && dv && dq_p && dk_p && dv_p);
        scalar->attention_backward(dq, dk, dv, dout, q, k, v, out, lse, T, nh, nkv, hd);
        /* dkp/dvp and dk/dv as the two non-overlapping parts of one array, as the model passes them */
        scalar->attention_prefix_backward(dq_p, dk_p, dv_p, dk_p + Tpre * ks, dv_p + Tpre * ks, dout + Tpre * qs,
                                          q + Tpre * qs, k, v, Tpre, k + Tpre * ks, v + Tpre * ks, out_p, lse_p, Tq,
                                          nh, nkv, hd);
        snprintf(what, sizeof what, "prefix dq vs causal Tpre=%zu Tq=%zu", Tpre, Tq);
        check_same(dq_p, dq + Tpre * qs, Tq * qs, what);
        snprintf(what, sizeof what, "prefix dk vs causal Tpre=%zu Tq=%zu", Tpre, Tq);
        check_same(dk_p, dk, T * ks, what);
        snprintf(what, sizeof what, "prefix dv vs causal Tpre=%zu Tq=%zu", Tpre, Tq);
        check_same(dv_p, dv, T * ks, what);
        free(q), free(k), free(v), free(out), free(lse), free(out_p), free(lse_p), free(dout);
        free(dq), free(dk), free(dv), free(dq_p), free(dk_p), free(dv_p);
    }
}

/* ---------------------------------------------------------------------- */
/* AdamW */

static void check_adamw(const dpoc_kernel_table *kt, size_t n, rng_t *rng) {
    char what[96];
    float *p = frand(rng, n, -1, 1), *m = frand(rng, n, -1e-2f, 1e-2f), *v = frand(rng, n, 0, 1e-4f);
    v[0] = 0.0f; /* a parameter never updated: sqrt(0) + eps */
    float *p_s = fcopy(p, n), *m_s = fcopy(m, n), *v_s = fcopy(v, n);
    for (long step = 1; step <= 3; step++) {
        float *g = frand(rng, n, -0.05f, 0.05f);
        if (n > 1) g[1] = 0.0f;
        const double lr = 1e-3, b1 = 0.9, b2 = 0.999;
        const dpoc_adamw_coeffs c = {
            .grad_scale = step == 3 ? 0.37f : 1.0f, /* clipping on the last step */
            .decay = step == 2 ? 1.0f : (float)(1.0 - lr * 0.01),
            .one_minus_b1 = (float)(1.0 - b1),
            .b2 = (float)b2,
            .one_minus_b2 = 1.0f - (float)b2,
            .step_size = (float)(lr / (1.0 - pow(b1, (double)step))),
            .bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)step)),
            .eps = 1e-8f,
        };
        kt->adamw_update(p, g, m, v, n, &c);
        scalar->adamw_update(p_s, g, m_s, v_s, n, &c);
        free(g);
    }
    /* p decay - update and m + (g - m)(1 - b1) can cancel: a fused multiply-add
     * moves them by an ulp of the larger term */
    snprintf(what, sizeof what, "adamw params n=%zu", n);
    check_maxabs(p, p_s, n, TOL_MAXABS, what);
    snprintf(what, sizeof what, "adamw first moments n=%zu", n);
    check_maxabs(m, m_s, n, TOL_MAXABS, what);
    snprintf(what, sizeof what, "adamw second moments n=%zu", n);
    check_elem(v, v_s, n, TOL_ELEM, what);
    free(p), free(m), free(v), free(p_s), free(m_s), free(v_s);
}

/* sum of squares in double: the squares are exact, only the order of the
 * additions differs (relative error ~ n * 2^-53 at worst; 1e-12 leaves room) */
static void test_sum_squares(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {106};
    static const size_t ns[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 1000, 4099, 100003};
    for (size_t i = 0; i < sizeof ns / sizeof *ns + 10; i++) {
        const size_t n = i < sizeof ns / sizeof *ns ? ns[i] : rng_size(&rng, 1, 20000);
        float *x = frand(&rng, n ? n : 1, -3, 3);
        if (n > 3) x[n - 1] = 1e-20f, x[n / 2] = 4e3f; /* magnitudes far apart */
        const double got = kt->sum_squares(x, n), want = scalar->sum_squares(x, n);
        if (!(fabs(got - want) <= 1e-12 * want))
            fail_msg("sum_squares n=%zu: %.17g, scalar %.17g", n, got, want);
        free(x);
    }
}

static void test_adamw(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {105};
    static const size_t ns[] = {1, 2, 7, 8, 9, 15, 16, 17, 33, 1000, 4099};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) check_adamw(kt, ns[i], &rng);
    for (int r = 0; r < 10; r++) check_adamw(kt, rng_size(&rng, 1, 10000), &rng);
}

/* ---------------------------------------------------------------------- */
/* LM head: the per-chunk pointwise kernels, then the whole head */

/* The head with an explicit vocabulary chunk width (src/model/layers.c). */
void lmhead_forward_chunked(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R,
                            size_t C, size_t V, float *scratch, size_t chunk);
void lmhead_backward_chunked(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                             const int32_t *labels, const float *lse, size_t R, size_t C, size_t V,
                             float *scratch, size_t chunk);

/* |got - want| <= tol, a NaN matching only a NaN. */
static void check_close(double got, double want, double tol, const char *what, const char *field) {
    const double d = fabs(got - want);
    if (isnan(want) ? !isnan(got) : !(d <= tol))
        fail_msg("%s: %s is %.17g, scalar twin %.17g (difference %.3g > %.3g)", what, field, got, want, d, tol);
    if (report && !isnan(want))
        print_message("  %-44s %-10s worst %.3g (tol %.3g)\n", what, field, d, tol);
}

static void check_lmhead_stats(const dpoc_kernel_table *kt, const float *l, size_t n, const char *label) {
    char what[96];
    snprintf(what, sizeof what, "lmhead stats %s n=%zu", label, n);
    dpoc_lmhead_chunk_stats got, want;
    kt->lmhead_chunk_stats(&got, l, n);
    scalar->lmhead_chunk_stats(&want, l, n);
    if (!(got.max == want.max)) fail_msg("%s: max %.9g, scalar twin %.9g", what, got.max, want.max);
    if (got.argmax != want.argmax) fail_msg("%s: argmax %zu, scalar twin %zu", what, got.argmax, want.argmax);
    double mag = 0.0;
    for (size_t j = 0; j < n; j++)
        if (!isnan(l[j])) mag += fabs((double)l[j]);
    check_close(got.sum_logits, want.sum_logits, TOL_LMHEAD_SUM_ORDER * mag, what, "sum l");
    check_close(got.sum_exp, want.sum_exp, TOL_LMHEAD_EXP_SUM * fabs(want.sum_exp), what, "s");
    check_close(got.sum_exp_d, want.sum_exp_d,
                TOL_LMHEAD_EXP_SUM * fabs(want.sum_exp_d) + (double)n * ATOL_LMHEAD_DENORMAL_TERM, what, "a");
    check_close(got.sum_exp_sq, want.sum_exp_sq, TOL_LMHEAD_EXP_SUM * fabs(want.sum_exp_sq), what, "q");
}

/* Guard floats after the row: the masked tails must not write past n. */
#define LMHEAD_GUARD 17
#define GUARD_VALUE 7.5f

static void check_lmhead_dlogits(const dpoc_kernel_table *kt, const float *l, size_t n, float g, float lse,
                                 const char *label) {
    char what[96];
    float *got = malloc((n + LMHEAD_GUARD) * sizeof *got), *want = malloc((n + LMHEAD_GUARD) * sizeof *want);
    assert_true(got && want);
    memcpy(got, l, n * sizeof *l);
    memcpy(want, l, n * sizeof *l);
    for (size_t i = n; i < n + LMHEAD_GUARD; i++) got[i] = want[i] = GUARD_VALUE;
    kt->lmhead_chunk_dlogits(got, n, g, lse);
    scalar->lmhead_chunk_dlogits(want, n, g, lse);
    snprintf(what, sizeof what, "lmhead dlogits %s n=%zu g=%.3g", label, n, g);
    check_elem(got, want, n, TOL_EXP_ELEM, what);
    snprintf(what, sizeof what, "lmhead dlogits guard %s n=%zu", label, n);
    check_same(got + n, want + n, LMHEAD_GUARD, what);
    free(got), free(want);
}

/* logsumexp in double, rounded to fp32 as lmhead_forward stores it */
static float logsumexp(const float *l, size_t n) {
    double m = -INFINITY, s = 0.0;
    for (size_t j = 0; j < n; j++)
        if (l[j] > m) m = l[j];
    for (size_t j = 0; j < n; j++) s += exp((double)l[j] - m);
    return (float)(m + log(s));
}

/* A row's two kernels: the statistics, and dlogits around its logsumexp, around
 * a value 90 above it (every exp a denormal or 0) and with g = 0. */
static void check_lmhead_row(const dpoc_kernel_table *kt, const float *l, size_t n, rng_t *rng, const char *label) {
    check_lmhead_stats(kt, l, n, label);
    const float g = rng_uniform(rng, -2, 2);
    check_lmhead_dlogits(kt, l, n, g, logsumexp(l, n), label);
    check_lmhead_dlogits(kt, l, n, g, logsumexp(l, n) + 90.0f, label);
    check_lmhead_dlogits(kt, l, n, 0.0f, logsumexp(l, n), label);
}

#define LMHEAD_TIE 25.0f /* above every random logit below */

static void test_lmhead_chunk(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {109};
    /* below, at and above the vector widths, tails of many lengths, a whole LMHEAD_CHUNK */
    static const size_t ns[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 1000, 4095, LMHEAD_CHUNK, 4097};
    for (size_t k = 0; k < sizeof ns / sizeof *ns; k++) {
        const size_t n = ns[k];
        float *l = frand(&rng, n, -20, 20), *t = fcopy(l, n);
        check_lmhead_row(kt, l, n, &rng, "random");
        /* ties: the max at 1 to 4 random positions, the first of them must win */
        for (int rep = 0; rep < 4; rep++) {
            memcpy(t, l, n * sizeof *l);
            const size_t ties = rng_size(&rng, 1, 4);
            for (size_t i = 0; i < ties; i++) t[rng_size(&rng, 0, n - 1)] = LMHEAD_TIE;
            check_lmhead_row(kt, t, n, &rng, "ties");
        }
        /* the max only in the last lanes (the tail of a SIMD step), and at
         * lanes 0 of two consecutive steps */
        memcpy(t, l, n * sizeof *l);
        t[n - 1] = LMHEAD_TIE;
        if (n > 1) t[n - 2] = LMHEAD_TIE;
        check_lmhead_row(kt, t, n, &rng, "ties at the end");
        memcpy(t, l, n * sizeof *l);
        for (size_t i = 16; i < n && i <= 32; i += 8) t[i] = LMHEAD_TIE;
        check_lmhead_row(kt, t, n, &rng, "ties across steps");
        /* every logit equal: index 0 */
        for (size_t i = 0; i < n; i++) t[i] = -3.25f;
        check_lmhead_row(kt, t, n, &rng, "all equal");
        /* signed zeros as the max: the first zero wins, whatever its sign */
        for (size_t i = 0; i < n; i++) t[i] = -fabsf(l[i]) - 1.0f;
        t[n / 2] = -0.0f;
        t[n - 1] = 0.0f;
        check_lmhead_row(kt, t, n, &rng, "signed zeros");
        /* very negative logits: exp(l - max) underflows to denormals and 0 */
        for (size_t i = 0; i < n; i++) t[i] = rng_uniform(&rng, -200, -80);
        t[rng_size(&rng, 0, n - 1)] = 0.0f;
        check_lmhead_row(kt, t, n, &rng, "very negative");
        for (size_t i = 0; i < n; i++) t[i] = rng_uniform(&rng, -1e4f, -60);
        t[n - 1] = rng_uniform(&rng, -5, 5);
        check_lmhead_row(kt, t, n, &rng, "very negative 2");
        /* a NaN logit never counts as the max (the twin's > is false); the sums are NaN */
        memcpy(t, l, n * sizeof *l);
        t[rng_size(&rng, 0, n - 1)] = NAN;
        check_lmhead_stats(kt, t, n, "a NaN");
        free(l), free(t);
    }
    for (int r = 0; r < 30; r++) {
        const size_t n = rng_size(&rng, 1, 5000);
        const float range = rng_uniform(&rng, 0.1f, 60.0f);
        float *l = frand(&rng, n, -range, range);
        check_lmhead_row(kt, l, n, &rng, "random");
        free(l);
    }
}

/* The whole head, forward and backward, at the level of kt against the scalar
 * level (lmhead_* dispatch through the active table, so each run forces its
 * level). Row 0's hidden state points along its label's weight row, so that
 * label is the top-1; `scale` grows the logits (a max that moves across chunks). */
static void check_lmhead_head(const dpoc_kernel_table *kt, size_t R, size_t C, size_t V, size_t chunk, float scale,
                              rng_t *rng) {
    char what[128], shape[64];
    snprintf(shape, sizeof shape, "R=%zu C=%zu V=%zu chunk=%zu x%g", R, C, V, chunk, scale);
    dpoc_err err;
    const dpoc_simd_level before = dpoc_kernels_level();
    float *h = frand(rng, R * C, -scale, scale), *w = frand(rng, V * C, -1, 1);
    int32_t *labels = malloc(R * sizeof *labels);
    assert_non_null(labels);
    for (size_t r = 0; r < R; r++) labels[r] = (int32_t)rng_size(rng, 0, V - 1);
    for (size_t i = 0; i < C; i++) h[i] = 4.0f * w[(size_t)labels[0] * C + i];
    float *scratch = malloc(R * (chunk < V ? chunk : V) * sizeof *scratch);
    enum { NOUT = 5 };
    float *outs[2][NOUT];
    uint8_t *top1[2];
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < NOUT; i++) outs[k][i] = frand(rng, R, 7, 8); /* garbage: overwritten */
        top1[k] = malloc(R);
        assert_non_null(top1[k]);
    }
    assert_non_null(scratch);
    static const char *const names[NOUT] = {"logp", "lse", "entropy", "mean_logit", "log_sum_sq_probs"};
    const dpoc_simd_level levels[2] = {kt->level, DPOC_SIMD_SCALAR};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(dpoc_kernels_force(levels[k], &err), 0);
        lmhead_out o = {outs[k][0], outs[k][1], outs[k][2], outs[k][3], outs[k][4], top1[k]};
        lmhead_forward_chunked(&o, h, w, labels, R, C, V, scratch, chunk);
    }
    for (int i = 0; i < NOUT; i++) {
        snprintf(what, sizeof what, "lmhead %s %s", names[i], shape);
        check_maxabs_floor(outs[0][i], outs[1][i], R, TOL_LMHEAD_HEAD, LMHEAD_LOG_FLOOR, what);
    }
    assert_memory_equal(top1[0], top1[1], R);
    assert_int_equal(top1[1][0], 1);

    /* backward from the scalar forward's lse, accumulating into nonzero gradients */
    const float *lse = outs[1][1];
    float *dlogp = frand(rng, R, -1, 1), *dh0 = frand(rng, R * C, -1, 1), *dw0 = frand(rng, V * C, -1, 1);
    float *dh[2] = {fcopy(dh0, R * C), fcopy(dh0, R * C)}, *dw[2] = {fcopy(dw0, V * C), fcopy(dw0, V * C)};
    for (int k = 0; k < 2; k++) {
        assert_int_equal(dpoc_kernels_force(levels[k], &err), 0);
        lmhead_backward_chunked(dh[k], dw[k], dlogp, h, w, labels, lse, R, C, V, scratch, chunk);
        /* compare the increments, not increment + a large initial value */
        for (size_t i = 0; i < R * C; i++) dh[k][i] -= dh0[i];
        for (size_t i = 0; i < V * C; i++) dw[k][i] -= dw0[i];
    }
    snprintf(what, sizeof what, "lmhead dh %s", shape);
    check_maxabs(dh[0], dh[1], R * C, TOL_LMHEAD_HEAD, what);
    snprintf(what, sizeof what, "lmhead dw %s", shape);
    check_maxabs(dw[0], dw[1], V * C, TOL_LMHEAD_HEAD, what);
    assert_int_equal(dpoc_kernels_force(before, &err), 0);
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < NOUT; i++) free(outs[k][i]);
        free(top1[k]), free(dh[k]), free(dw[k]);
    }
    free(h), free(w), free(labels), free(scratch), free(dlogp), free(dh0), free(dw0);
}

static void test_lmhead_head(void **state) {
    const dpoc_kernel_table *kt = level_table(state);
    rng_t rng = {110};
    check_lmhead_head(kt, 5, 33, 1000, 256, 1.0f, &rng);   /* chunks of 256, 256, 256, 232 */
    check_lmhead_head(kt, 5, 33, 1000, 256, 8.0f, &rng);   /* logits of +-50 */
    check_lmhead_head(kt, 3, 17, 1001, 1001, 1.0f, &rng);  /* one chunk, an odd width */
    check_lmhead_head(kt, 7, 64, 700, 100, 0.25f, &rng);   /* flat distributions */
}

/* ---------------------------------------------------------------------- */
/* Dispatch */

/* The public functions of layers.h run the forced level: bit for bit its table's result. */
static void test_force(void **state) {
    (void)state;
    rng_t rng = {106};
    enum { N = 37 };
    float *g = frand(&rng, N, -5, 5), *u = frand(&rng, N, -1, 1);
    float out[N], want[N];
    dpoc_err err;
    const dpoc_simd_level before = dpoc_kernels_level();
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++) {
        const dpoc_simd_level level = (dpoc_simd_level)l;
        const dpoc_kernel_table *t = dpoc_kernels_for(level);
        if (!t) {
            print_message("[  SKIPPED ] forcing SIMD level %s: this CPU lacks it\n", dpoc_simd_name(level));
            assert_int_equal(dpoc_kernels_force(level, &err), DPOC_EINPUT);
            continue;
        }
        assert_int_equal(dpoc_kernels_force(level, &err), 0);
        assert_int_equal(dpoc_kernels_level(), level);
        swiglu_forward(out, g, u, N);
        t->swiglu_forward(want, g, u, N);
        assert_memory_equal(out, want, sizeof out);
    }
    assert_true(dpoc_kernels_supported(DPOC_SIMD_SCALAR));
    assert_int_equal(dpoc_kernels_force((dpoc_simd_level)DPOC_SIMD_LEVELS, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "not supported"));
    assert_int_equal(dpoc_kernels_force(before, &err), 0);
    free(g), free(u);
}

static void test_parse(void **state) {
    (void)state;
    dpoc_simd_level level;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++) {
        assert_int_equal(dpoc_simd_parse(dpoc_simd_name((dpoc_simd_level)l), &level), 0);
        assert_int_equal(level, l);
    }
    assert_int_equal(dpoc_simd_parse("AVX2", &level), -1);
    assert_int_equal(dpoc_simd_parse("", &level), -1);
    assert_int_equal(dpoc_simd_parse("avx512f", &level), -1);
}

/* DPOC_SIMD is read once per process, so each setting runs in a child: this
 * binary with --print-level prints the level its first kernel call chose. */
static void child_level(const char *setting, char *line, size_t cap, char *errline, size_t errcap) {
    const char *dir = make_temp_dir();
    char cmd[1024], errpath[256];
    snprintf(errpath, sizeof errpath, "%s/stderr", dir);
    snprintf(cmd, sizeof cmd, "DPOC_SIMD='%s' /proc/%ld/exe --print-level 2>%s", setting, (long)getpid(), errpath);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    line[0] = '\0';
    if (!fgets(line, (int)cap, f)) line[0] = '\0';
    assert_int_equal(pclose(f), 0);
    line[strcspn(line, "\n")] = '\0';
    char *text = read_text_file(errpath, NULL);
    snprintf(errline, errcap, "%s", text ? text : "");
    free(text);
    remove(errpath);
    rmdir(dir);
}

static void test_env(void **state) {
    (void)state;
    char line[64], errline[512];
    dpoc_simd_level best = DPOC_SIMD_SCALAR;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++)
        if (dpoc_kernels_supported((dpoc_simd_level)l)) best = (dpoc_simd_level)l;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++) {
        const char *name = dpoc_simd_name((dpoc_simd_level)l);
        child_level(name, line, sizeof line, errline, sizeof errline);
        if (dpoc_kernels_supported((dpoc_simd_level)l)) {
            assert_string_equal(line, name);
            assert_string_equal(errline, "");
        } else { /* falls back to the best level, and says so */
            assert_string_equal(line, dpoc_simd_name(best));
            assert_non_null(strstr(errline, "not supported by this CPU"));
        }
    }
    child_level("", line, sizeof line, errline, sizeof errline); /* empty: the CPU's best */
    assert_string_equal(line, dpoc_simd_name(best));
    child_level("sse9", line, sizeof line, errline, sizeof errline);
    assert_string_equal(line, dpoc_simd_name(best));
    assert_non_null(strstr(errline, "DPOC_SIMD=sse9 is not one of scalar, avx2, avx512"));
}

#define PER_LEVEL(fn, lvl) {#fn " at " #lvl, fn, NULL, NULL, (void *)&LEVEL_##lvl}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--print-level") == 0) {
        printf("%s\n", dpoc_simd_name(dpoc_kernels_level()));
        return 0;
    }
    report = getenv("DPOC_KERNELS_REPORT") != NULL;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++)
        if (!dpoc_kernels_supported((dpoc_simd_level)l))
            printf("[  SKIPPED ] SIMD level %s: this CPU (or a non-x86-64 build) lacks it; its tests skip\n",
                   dpoc_simd_name((dpoc_simd_level)l));
    const struct CMUnitTest tests[] = {
        PER_LEVEL(test_rmsnorm, AVX2),   PER_LEVEL(test_rmsnorm, AVX512), PER_LEVEL(test_rope, AVX2),
        PER_LEVEL(test_rope, AVX512),    PER_LEVEL(test_swiglu, AVX2),    PER_LEVEL(test_swiglu, AVX512),
        PER_LEVEL(test_attention, AVX2), PER_LEVEL(test_attention, AVX512),
        PER_LEVEL(test_attention_prefix, AVX2), PER_LEVEL(test_attention_prefix, AVX512),
        cmocka_unit_test(test_attention_prefix_is_causal_suffix), PER_LEVEL(test_adamw, AVX2),
        PER_LEVEL(test_adamw, AVX512),   PER_LEVEL(test_sum_squares, AVX2), PER_LEVEL(test_sum_squares, AVX512),
        PER_LEVEL(test_lmhead_chunk, AVX2), PER_LEVEL(test_lmhead_chunk, AVX512),
        PER_LEVEL(test_lmhead_head, AVX2), PER_LEVEL(test_lmhead_head, AVX512),
        cmocka_unit_test(test_force),    cmocka_unit_test(test_parse),
        cmocka_unit_test(test_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
