/* dpoc_gemm (src/model/gemm.c).
 *
 * - The bfloat16 rounding's scalar twin on hand-picked values (ties to even,
 *   near bf16 max, zeros, subnormals, Inf, NaN), against the definition (the
 *   nearest bf16, ties to the even one) on random bit patterns, and the
 *   widening on every bf16 value; then the AVX512_BF16 conversion against the
 *   twin on 1e5 random floats and the special values, at every tail length.
 * - FP32: bit for bit cblas_sgemm.
 * - BF16, on oneDNN and on both fallbacks: against a double-precision
 *   reference on operands rounded by the twin, within the fp32 error bound
 *   derived at TOL_*; exact cases (operand rounding, C kept in fp32, beta 0 not
 *   reading C, alpha 0 and K 0); several OpenBLAS thread counts; concurrent
 *   calls from two threads; the scratch reservation; without a usable oneDNN
 *   kernel, the fallback with one warning (in a child process).
 * Each GEMM case runs every transpose pair, beta 0 and 1, alpha 1 and 0.125,
 * odd sizes and leading dimensions wider than the rows.
 *
 * DPOC_GEMM_REPORT=1 prints the largest error seen per case, as a fraction of
 * the bound. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "core/rng.h"
#include "testutil.h"

#include "dpoc/gemm.h"

/* Tolerance of the BF16 path. The operands are rounded to bf16 by the twin
 * (the conversion itself is tested bit for bit), so the reference uses the same
 * rounded values a~, b~ and what remains is fp32 arithmetic. Let u = 2^-24 (the
 * unit roundoff of fp32, round to nearest).
 *  - Each product a~ b~ is exact in fp32: two 8-bit significands give at most
 *    16 bits (our values stay far from underflow).
 *  - Their sum s over K terms in fp32, in whatever order or blocking the
 *    implementation uses, takes K-1 additions, each rounding with a relative
 *    error <= u of a partial sum whose magnitude is <= S = sum_k |a~ b~|:
 *    |s - sum| <= (K-1) u S (to first order).
 *  - alpha s rounds once (exact for alpha a power of 2): <= u |alpha| S.
 *  - beta c is exact for beta 0 and 1; adding it rounds once: <= u (|alpha| S
 *    + |beta c|).
 * So |C - Cref| <= (K+1) u |alpha| S + u |beta c| to first order. TOL_TERMS =
 * K + 2 covers the second-order terms, the double reference's own rounding
 * (K 2^-53 S) and an implementation that folds alpha into its partial sums
 * (one rounding fewer or moved); ATOL_GEMM keeps the bound from being 0 where
 * every product is 0. */
#define TOL_U 0x1p-24
#define TOL_EXTRA_TERMS 2 /* K + 2 */
#define ATOL_GEMM 1e-30

static int report;

static float from_bits(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static uint32_t to_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static int bf16_is_nan(dpoc_bf16 h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x007fu) != 0; }

/* ---------------------------------------------------------------------- */
/* rounding */

typedef struct {
    uint32_t in;
    dpoc_bf16 out;
    const char *what;
} round_case;

static const round_case ROUND_CASES[] = {
    {0x3f800000u, 0x3f80u, "1.0 (exact)"},
    {0x3f807fffu, 0x3f80u, "just below the halfway point rounds down"},
    {0x3f808000u, 0x3f80u, "halfway, even below: down to even"},
    {0x3f808001u, 0x3f81u, "just above the halfway point rounds up"},
    {0x3f818000u, 0x3f82u, "halfway, odd below: up to even"},
    {0xbf808000u, 0xbf80u, "negative halfway, even below"},
    {0xbf818000u, 0xbf82u, "negative halfway, odd below"},
    {0x3fffffffu, 0x4000u, "carry into the exponent"},
    {0x7f7f0000u, 0x7f7fu, "bf16 max (exact)"},
    {0x7f7f7fffu, 0x7f7fu, "just below bf16 max + half an ulp"},
    {0x7f7f8000u, 0x7f80u, "bf16 max + half an ulp: tie, odd below, to Inf"},
    {0x7f7fffffu, 0x7f80u, "FLT_MAX to +Inf"},
    {0xff7fffffu, 0xff80u, "-FLT_MAX to -Inf"},
    {0xff7f7fffu, 0xff7fu, "just above -bf16 max - half an ulp"},
    {0x00000000u, 0x0000u, "+0"},
    {0x80000000u, 0x8000u, "-0 keeps its sign"},
    {0x00000001u, 0x0000u, "smallest subnormal to +0"},
    {0x80000001u, 0x8000u, "smallest negative subnormal to -0"},
    {0x00008000u, 0x0000u, "subnormal tie, even below: to 0"},
    {0x00018000u, 0x0002u, "subnormal tie, odd below: up to even"},
    {0x00400000u, 0x0040u, "subnormal (exact)"},
    {0x00412345u, 0x0041u, "subnormal rounds down"},
    {0x007fffffu, 0x0080u, "largest subnormal up to the smallest normal"},
    {0x807fffffu, 0x8080u, "largest negative subnormal to -smallest normal"},
    {0x7f800000u, 0x7f80u, "+Inf"},
    {0xff800000u, 0xff80u, "-Inf"},
    {0x7fc00000u, 0x7fc0u, "quiet NaN"},
    {0xffc00001u, 0xffc0u, "negative quiet NaN, low payload"},
    {0x7f800001u, 0x7fc0u, "signalling NaN, payload only in the low half: stays NaN"},
    {0x7fbfffffu, 0x7fffu, "NaN that would carry into Inf if rounded"},
    {0xffffffffu, 0xffffu, "all ones"},
};
#define N_ROUND_CASES (sizeof ROUND_CASES / sizeof ROUND_CASES[0])

static void test_round_hand_picked(void **state) {
    (void)state;
    for (size_t i = 0; i < N_ROUND_CASES; i++) {
        const dpoc_bf16 got = dpoc_bf16_round(from_bits(ROUND_CASES[i].in));
        if (got != ROUND_CASES[i].out)
            fail_msg("bf16 of 0x%08x (%s): got 0x%04x, want 0x%04x", ROUND_CASES[i].in, ROUND_CASES[i].what, got,
                     ROUND_CASES[i].out);
    }
}

/* The definition, independently of the twin's bit trick: r is a bf16 value
 * nearest to x (in double, exactly), a tie goes to the even significand, and
 * beyond bf16 max the result is Inf exactly when |x| >= max + half an ulp. */
static void check_nearest(float x) {
    const dpoc_bf16 h = dpoc_bf16_round(x);
    if (isnan(x)) {
        if (!bf16_is_nan(h) || (h >> 15) != (to_bits(x) >> 31)) fail_msg("NaN 0x%08x became 0x%04x", to_bits(x), h);
        return;
    }
    const double xd = x, r = dpoc_bf16_to_float(h);
    const double max = (double)dpoc_bf16_to_float(0x7f7fu), half_ulp_max = ldexp(1.0, 127 - 8);
    if (fabs(xd) >= max + half_ulp_max) {
        if (!isinf(r) || signbit(r) != signbit(xd)) fail_msg("%a should round to Inf, got %a", xd, r);
        return;
    }
    if (isinf(r)) fail_msg("%a rounded to Inf", xd);
    if (signbit(r) != signbit(xd)) fail_msg("%a rounded to %a: sign changed", xd, r);
    /* the neighbours of h in magnitude (same sign) */
    const dpoc_bf16 mag = h & 0x7fffu, sign = h & 0x8000u;
    const double d = fabs(xd - r);
    if (mag < 0x7f7fu) {
        const double up = dpoc_bf16_to_float((dpoc_bf16)(sign | (mag + 1)));
        if (fabs(xd - up) < d) fail_msg("%a rounded to %a but %a is nearer", xd, r, up);
        if (fabs(xd - up) == d && (mag & 1)) fail_msg("%a: tie rounded to odd %a instead of %a", xd, r, up);
    }
    if (mag > 0) {
        const double down = dpoc_bf16_to_float((dpoc_bf16)(sign | (mag - 1)));
        if (fabs(xd - down) < d) fail_msg("%a rounded to %a but %a is nearer", xd, r, down);
        if (fabs(xd - down) == d && (mag & 1)) fail_msg("%a: tie rounded to odd %a instead of %a", xd, r, down);
    }
}

#define N_RANDOM_FLOATS 100000

static void test_round_is_nearest_even(void **state) {
    (void)state;
    rng_t rng = {0x6265f16u};
    for (size_t i = 0; i < N_RANDOM_FLOATS; i++) check_nearest(from_bits((uint32_t)rng_next(&rng)));
    /* halfway points and their neighbours in every binade, both signs */
    for (uint32_t e = 0; e < 255; e++)
        for (uint32_t top = 0; top < 4; top++)
            for (int delta = -1; delta <= 1; delta++) {
                const uint32_t u = (e << 23) | (top << 16) | (uint32_t)(0x8000 + delta);
                check_nearest(from_bits(u));
                check_nearest(from_bits(u | 0x80000000u));
            }
    for (size_t i = 0; i < N_ROUND_CASES; i++) check_nearest(from_bits(ROUND_CASES[i].in));
}

/* Every bf16 value widens exactly and rounds back to itself (NaNs: to a NaN). */
static void test_widen_roundtrip(void **state) {
    (void)state;
    for (uint32_t h = 0; h <= 0xffffu; h++) {
        const float x = dpoc_bf16_to_float((dpoc_bf16)h);
        if (to_bits(x) != h << 16) fail_msg("widening 0x%04x gave 0x%08x", h, to_bits(x));
        const dpoc_bf16 back = dpoc_bf16_round(x);
        if (bf16_is_nan((dpoc_bf16)h) ? !bf16_is_nan(back) : back != h)
            fail_msg("0x%04x widened and rounded back to 0x%04x", h, back);
    }
}

static void check_simd_equals_scalar(const float *x, size_t n, const char *what) {
    dpoc_bf16 *want = malloc((n + 1) * sizeof *want), *got = malloc((n + 1) * sizeof *got);
    assert_non_null(want);
    assert_non_null(got);
    dpoc_bf16_round_n_scalar(want, x, n);
    const dpoc_bf16 guard = 0xa5a5u;
    got[n] = guard;
    assert_int_equal(dpoc_bf16_round_n_avx512(got, x, n), 0);
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i])
            fail_msg("%s: element %zu of %zu (0x%08x): AVX512_BF16 gave 0x%04x, the twin 0x%04x", what, i, n,
                     to_bits(x[i]), got[i], want[i]);
    if (got[n] != guard) fail_msg("%s: wrote past the end (n = %zu)", what, n);
    free(want);
    free(got);
}

static void test_round_simd(void **state) {
    (void)state;
    dpoc_bf16 probe;
    const float one = 1.0f;
    if (dpoc_bf16_round_n_avx512(&probe, &one, 1) != 0) {
        print_message("[  SKIPPED ] this CPU (or a non-x86-64 build) lacks AVX512_BF16\n");
        skip();
    }
    rng_t rng = {0x51dbu};
    float *x = malloc(N_RANDOM_FLOATS * sizeof *x);
    assert_non_null(x);
    /* random bit patterns (every class: NaN, Inf, subnormal, normal) ... */
    for (size_t i = 0; i < N_RANDOM_FLOATS; i++) x[i] = from_bits((uint32_t)rng_next(&rng));
    check_simd_equals_scalar(x, N_RANDOM_FLOATS, "random bit patterns");
    /* ... random values of training data's magnitude ... */
    for (size_t i = 0; i < N_RANDOM_FLOATS; i++) x[i] = rng_uniform(&rng, -4.0f, 4.0f);
    check_simd_equals_scalar(x, N_RANDOM_FLOATS, "uniform in [-4, 4]");
    /* ... subnormals mixed with normals in one vector ... */
    for (size_t i = 0; i < N_RANDOM_FLOATS; i++)
        x[i] = from_bits((uint32_t)rng_next(&rng) & ((i % 3) ? 0x807fffffu : 0xffffffffu));
    check_simd_equals_scalar(x, N_RANDOM_FLOATS, "subnormals among normals");
    /* ... the special values, at every tail length and unaligned starts */
    for (size_t i = 0; i < 96; i++) x[i] = from_bits(ROUND_CASES[i % N_ROUND_CASES].in);
    for (size_t n = 0; n <= 70; n++)
        for (size_t off = 0; off < 3; off++) check_simd_equals_scalar(x + off, n, "special values");
    free(x);
}

/* ---------------------------------------------------------------------- */
/* GEMM cases */

typedef struct {
    size_t M, N, K;
} shape;

static const shape SHAPES[] = {{1, 1, 1}, {7, 13, 5}, {37, 29, 53}, {130, 67, 200}, {257, 96, 520}};
static const float ALPHAS[] = {1.0f, 0.125f};
static const float BETAS[] = {0.0f, 1.0f};
/* extra columns of every leading dimension (a strided view into wider rows) */
#define LD_PAD 3

typedef struct {
    int ta, tb;
    size_t M, N, K, lda, ldb, ldc;
    float alpha, beta;
    float *A, *B, *C0; /* C0: C before the call */
} gemm_case;

static void case_make(gemm_case *g, rng_t *rng, int ta, int tb, shape s, float alpha, float beta) {
    g->ta = ta, g->tb = tb, g->M = s.M, g->N = s.N, g->K = s.K, g->alpha = alpha, g->beta = beta;
    const size_t a_rows = ta ? s.K : s.M, a_cols = ta ? s.M : s.K;
    const size_t b_rows = tb ? s.N : s.K, b_cols = tb ? s.K : s.N;
    g->lda = a_cols + LD_PAD, g->ldb = b_cols + LD_PAD, g->ldc = s.N + LD_PAD;
    g->A = malloc(a_rows * g->lda * sizeof(float));
    g->B = malloc(b_rows * g->ldb * sizeof(float));
    g->C0 = malloc(s.M * g->ldc * sizeof(float));
    assert_non_null(g->A);
    assert_non_null(g->B);
    assert_non_null(g->C0);
    for (size_t i = 0; i < a_rows * g->lda; i++) g->A[i] = rng_uniform(rng, -1.0f, 1.0f);
    for (size_t i = 0; i < b_rows * g->ldb; i++) g->B[i] = rng_uniform(rng, -1.0f, 1.0f);
    for (size_t i = 0; i < s.M * g->ldc; i++) g->C0[i] = rng_uniform(rng, -1.0f, 1.0f);
}

static void case_free(gemm_case *g) {
    free(g->A);
    free(g->B);
    free(g->C0);
}

static float *case_c(const gemm_case *g) {
    float *c = malloc(g->M * g->ldc * sizeof *c);
    assert_non_null(c);
    memcpy(c, g->C0, g->M * g->ldc * sizeof *c);
    return c;
}

static double op_a(const gemm_case *g, size_t i, size_t k) { return g->ta ? g->A[k * g->lda + i] : g->A[i * g->lda + k]; }
static double op_b(const gemm_case *g, size_t k, size_t j) { return g->tb ? g->B[j * g->ldb + k] : g->B[k * g->ldb + j]; }

static double rounded(double x) { return dpoc_bf16_to_float(dpoc_bf16_round((float)x)); }

static void case_name(const gemm_case *g, char *buf, size_t n) {
    snprintf(buf, n, "%s,%s %zux%zux%zu alpha %g beta %g", g->ta ? "T" : "N", g->tb ? "T" : "N", g->M, g->N, g->K,
             (double)g->alpha, (double)g->beta);
}

/* c (after the BF16 call) against the reference within the bound; the padding
 * columns of C must be untouched. Returns the worst error / bound. */
static double check_bf16(const gemm_case *g, const float *c, const char *impl) {
    char name[128];
    case_name(g, name, sizeof name);
    /* the rounded op(A) and op(B)^T, densely, rows of K */
    double *ra = malloc((g->M * g->K + 1) * sizeof *ra), *rb = malloc((g->N * g->K + 1) * sizeof *rb);
    assert_non_null(ra);
    assert_non_null(rb);
    for (size_t k = 0; k < g->K; k++) {
        for (size_t i = 0; i < g->M; i++) ra[i * g->K + k] = rounded(op_a(g, i, k));
        for (size_t j = 0; j < g->N; j++) rb[j * g->K + k] = rounded(op_b(g, k, j));
    }
    double worst = 0.0;
    for (size_t i = 0; i < g->M; i++) {
        for (size_t j = 0; j < g->N; j++) {
            double sum = 0.0, abs_sum = 0.0;
            for (size_t k = 0; k < g->K; k++) {
                const double p = ra[i * g->K + k] * rb[j * g->K + k];
                sum += p;
                abs_sum += fabs(p);
            }
            const double c0 = g->C0[i * g->ldc + j];
            const double bc = g->beta == 0.0f ? 0.0 : (double)g->beta * c0;
            const double want = (double)g->alpha * sum + bc;
            const double bound = (double)(g->K + TOL_EXTRA_TERMS) * TOL_U * fabs((double)g->alpha) * abs_sum +
                                 TOL_U * fabs(bc) + ATOL_GEMM;
            const double got = c[i * g->ldc + j], err = fabs(got - want);
            if (!(err <= bound))
                fail_msg("%s %s: C[%zu][%zu] = %.9g, reference %.9g: error %.3g > bound %.3g", impl, name, i, j, got,
                         want, err, bound);
            if (err / bound > worst) worst = err / bound;
        }
        for (size_t j = g->N; j < g->ldc; j++)
            if (to_bits(c[i * g->ldc + j]) != to_bits(g->C0[i * g->ldc + j]))
                fail_msg("%s %s: padding C[%zu][%zu] was written", impl, name, i, j);
    }
    free(ra);
    free(rb);
    if (report) print_message("  %-8s %-36s worst error %.3f of the bound\n", impl, name, worst);
    return worst;
}

static void run(const gemm_case *g, dpoc_gemm_precision p, float *c) {
    dpoc_gemm(p, g->ta, g->tb, g->M, g->N, g->K, g->alpha, g->A, g->lda, g->B, g->ldb, g->beta, c, g->ldc);
}

/* fn(case) for every transpose pair, shape, alpha and beta */
static void for_each_case(void (*fn)(const gemm_case *, void *), void *ctx, uint64_t seed) {
    rng_t rng = {seed};
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (size_t s = 0; s < sizeof SHAPES / sizeof SHAPES[0]; s++)
                for (size_t a = 0; a < sizeof ALPHAS / sizeof ALPHAS[0]; a++)
                    for (size_t b = 0; b < sizeof BETAS / sizeof BETAS[0]; b++) {
                        gemm_case g;
                        case_make(&g, &rng, ta, tb, SHAPES[s], ALPHAS[a], BETAS[b]);
                        fn(&g, ctx);
                        case_free(&g);
                    }
}

static void fp32_case(const gemm_case *g, void *ctx) {
    (void)ctx;
    float *got = case_c(g), *want = case_c(g);
    run(g, DPOC_GEMM_FP32, got);
    cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans, g->tb ? CblasTrans : CblasNoTrans, (int)g->M,
                (int)g->N, (int)g->K, g->alpha, g->A, (int)g->lda, g->B, (int)g->ldb, g->beta, want, (int)g->ldc);
    if (memcmp(got, want, g->M * g->ldc * sizeof *got) != 0) {
        char name[128];
        case_name(g, name, sizeof name);
        fail_msg("FP32 %s differs from cblas_sgemm", name);
    }
    free(got);
    free(want);
}

static void test_fp32_is_sgemm(void **state) {
    (void)state;
    for_each_case(fp32_case, NULL, 0xf32);
}

typedef struct {
    const char *impl;
    double worst;
} bf16_ctx;

static void bf16_case(const gemm_case *g, void *p) {
    bf16_ctx *ctx = p;
    float *c = case_c(g);
    run(g, DPOC_GEMM_BF16, c);
    const double w = check_bf16(g, c, ctx->impl);
    if (w > ctx->worst) ctx->worst = w;
    free(c);
}

static void bf16_all_cases(dpoc_gemm_bf16_impl impl, const char *name) {
    dpoc_gemm_bf16_force(impl);
    bf16_ctx ctx = {name, 0.0};
    for_each_case(bf16_case, &ctx, 0xbf16);
    dpoc_gemm_bf16_force(DPOC_GEMM_BF16_AUTO);
    if (report) print_message("%s: worst error %.3f of the bound over all cases\n", name, ctx.worst);
}

static void test_bf16_onednn(void **state) {
    (void)state;
    if (!dpoc_gemm_bf16_available()) {
        print_message("[  SKIPPED ] oneDNN's bf16 matmul is not available here (the fallbacks are tested)\n");
        skip();
    }
    bf16_all_cases(DPOC_GEMM_BF16_AUTO, "oneDNN");
    assert_true(dpoc_gemm_bf16_available()); /* no failure on the way */
}

static void test_bf16_fallback_sgemm(void **state) {
    (void)state;
    bf16_all_cases(DPOC_GEMM_BF16_SGEMM, "sgemm");
}

static void test_bf16_fallback_scalar(void **state) {
    (void)state;
    bf16_all_cases(DPOC_GEMM_BF16_SCALAR, "scalar");
}

/* A registered bf16 shadow of B (dpoc_gemm_shadow_add): every case, B read from
 * the shadow (B's padded rows included), within the reference bound; with a
 * dense B the values are bit for bit those of rounding B per call (the same
 * primitive on the same bf16 operands). The shadow is what the products read
 * until refreshed (the contract), and removing it goes back to rounding. */
static void shadow_case(const gemm_case *g, void *p) {
    bf16_ctx *ctx = p;
    const size_t b_n = (g->tb ? g->N : g->K) * g->ldb;
    dpoc_err err;
    assert_int_equal(dpoc_gemm_shadow_add(g->B, b_n, &err), 0);
    float *c = case_c(g);
    run(g, DPOC_GEMM_BF16, c);
    const double w = check_bf16(g, c, ctx->impl);
    if (w > ctx->worst) ctx->worst = w;
    dpoc_gemm_shadow_remove(g->B);
    free(c);
}

static void test_bf16_shadow(void **state) {
    (void)state;
    if (!dpoc_gemm_bf16_available()) {
        print_message("[  SKIPPED ] oneDNN's bf16 matmul is not available here (shadows are only read by it)\n");
        skip();
    }
    bf16_ctx ctx = {"shadow", 0.0};
    for_each_case(shadow_case, &ctx, 0x5ad0);
    /* dense operands: bit for bit the per-call rounding */
    rng_t rng = {0x5ad1};
    const size_t M = 96, N = 200, K = 136;
    float *A = malloc(M * K * sizeof *A), *B = malloc(N * K * sizeof *B);
    float *c0 = calloc(M * N, sizeof *c0), *c1 = calloc(M * N, sizeof *c1), *c2 = calloc(M * N, sizeof *c2);
    assert_true(A && B && c0 && c1 && c2);
    for (size_t i = 0; i < M * K; i++) A[i] = rng_uniform(&rng, -1.0f, 1.0f);
    for (size_t i = 0; i < N * K; i++) B[i] = rng_uniform(&rng, -1.0f, 1.0f);
    for (int tb = 0; tb < 2; tb++) {
        const size_t ldb = tb ? K : N; /* B stored (N,K) or (K,N), densely */
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, N, K, 1.0f, A, K, B, ldb, 0.0f, c0, N);
        dpoc_err err;
        assert_int_equal(dpoc_gemm_shadow_add(B, N * K, &err), 0);
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, N, K, 1.0f, A, K, B, ldb, 0.0f, c1, N);
        assert_memory_equal(c0, c1, M * N * sizeof *c0);
        /* a view inside the block (the rows of a later output chunk) reads the shadow too */
        const size_t half = tb ? N / 2 : K / 2;
        memset(c2, 0, M * N * sizeof *c2);
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, tb ? N - half : N, tb ? K : K - half, 1.0f, tb ? A : A + half, K,
                  B + half * ldb, ldb, 0.0f, c2, N);
        /* changed weights: the stale shadow is read until refreshed */
        for (size_t i = 0; i < N * K; i++) B[i] = -B[i];
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, N, K, 1.0f, A, K, B, ldb, 0.0f, c1, N);
        assert_memory_equal(c0, c1, M * N * sizeof *c0);
        dpoc_gemm_shadow_refresh(B);
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, N, K, 1.0f, A, K, B, ldb, 0.0f, c1, N);
        for (size_t i = 0; i < M * N; i++) assert_true(c1[i] == -c0[i]);
        dpoc_gemm_shadow_remove(B);
        for (size_t i = 0; i < N * K; i++) B[i] = -B[i];
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, N, K, 1.0f, A, K, B, ldb, 0.0f, c1, N);
        assert_memory_equal(c0, c1, M * N * sizeof *c0);
        memset(c1, 0, M * N * sizeof *c1);
        dpoc_gemm(DPOC_GEMM_BF16, 0, tb, M, tb ? N - half : N, tb ? K : K - half, 1.0f, tb ? A : A + half, K,
                  B + half * ldb, ldb, 0.0f, c1, N);
        assert_memory_equal(c1, c2, M * N * sizeof *c1);
    }
    /* a block registered twice must keep its size; more than the table holds is an error */
    dpoc_err err;
    assert_int_equal(dpoc_gemm_shadow_add(B, N * K, &err), 0);
    assert_int_equal(dpoc_gemm_shadow_add(B, N * K, &err), 0);
    assert_int_not_equal(dpoc_gemm_shadow_add(B, N * K - 1, &err), 0);
    float extra[5][4] = {{0}};
    int added = 0, refused = 0;
    for (size_t i = 0; i < 5; i++) {
        if (dpoc_gemm_shadow_add(extra[i], 4, &err) == 0) added++;
        else refused++;
    }
    assert_int_equal(added, 3);
    assert_int_equal(refused, 2);
    for (size_t i = 0; i < 5; i++) dpoc_gemm_shadow_remove(extra[i]);
    dpoc_gemm_shadow_remove(B);
    free(A), free(B), free(c0), free(c1), free(c2);
    if (report) print_message("shadow: worst error %.3f of the bound over all cases\n", ctx.worst);
}

/* Cases with exact answers, on every implementation:
 *  - operands are rounded: 1 + 2^-9 is 1 in bf16 (ties to even), 1 + 3 2^-9 is 1 + 2^-7;
 *  - C is not rounded to bf16: 1 + 2^-20 is a sum of bf16 products;
 *  - beta 0 does not read C (NaN there), alpha 0 and K 0 give beta C. */
static void exact_cases(dpoc_gemm_bf16_impl impl) {
    dpoc_gemm_bf16_force(impl);
    const float a1[2] = {1.0f + 0x1p-9f, 1.0f + 3 * 0x1p-9f}, b1[2] = {1.0f, 1.0f};
    float c1 = NAN;
    dpoc_gemm(DPOC_GEMM_BF16, 0, 0, 1, 1, 2, 1.0f, a1, 2, b1, 1, 0.0f, &c1, 1);
    assert_true(c1 == 2.0f + 0x1p-7f);
    const float a2[2] = {1.0f, 0x1p-10f}, b2[2] = {1.0f, 0x1p-10f};
    float c2 = NAN;
    dpoc_gemm(DPOC_GEMM_BF16, 0, 1, 1, 1, 2, 1.0f, a2, 2, b2, 2, 0.0f, &c2, 1);
    assert_true(c2 == 1.0f + 0x1p-20f);
    float c3 = 3.0f; /* beta 1, in fp32: 3 + 1 + 2^-20 (not 4, as a bf16 C would be) */
    dpoc_gemm(DPOC_GEMM_BF16, 0, 1, 1, 1, 2, 1.0f, a2, 2, b2, 2, 1.0f, &c3, 1);
    assert_true(c3 == 4.0f + 0x1p-20f);
    const float b4[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    float c4[2] = {5.0f, NAN};
    dpoc_gemm(DPOC_GEMM_BF16, 0, 0, 1, 2, 2, 0.0f, a1, 2, b4, 2, 0.5f, c4, 2); /* alpha 0: beta C */
    assert_true(c4[0] == 2.5f && isnan(c4[1]));
    float c5 = 6.0f;
    dpoc_gemm(DPOC_GEMM_BF16, 0, 0, 1, 1, 0, 1.0f, a1, 1, b1, 1, 0.5f, &c5, 1); /* K 0 */
    assert_true(c5 == 3.0f);
    float c6 = NAN;
    dpoc_gemm(DPOC_GEMM_BF16, 0, 0, 1, 1, 0, 1.0f, a1, 1, b1, 1, 0.0f, &c6, 1);
    assert_true(c6 == 0.0f);
    dpoc_gemm(DPOC_GEMM_BF16, 0, 0, 0, 1, 2, 1.0f, a1, 2, b1, 1, 0.0f, NULL, 1); /* M 0: nothing touched */
    dpoc_gemm_bf16_force(DPOC_GEMM_BF16_AUTO);
}

static void test_bf16_exact(void **state) {
    (void)state;
    if (dpoc_gemm_bf16_available()) exact_cases(DPOC_GEMM_BF16_AUTO);
    exact_cases(DPOC_GEMM_BF16_SGEMM);
    exact_cases(DPOC_GEMM_BF16_SCALAR);
}

/* A larger problem under 1 and 2 OpenBLAS threads (oneDNN follows), twice each
 * (the second call from the primitive cache). */
static void test_bf16_threads(void **state) {
    (void)state;
    const int threads0 = openblas_get_num_threads();
    rng_t rng = {0x7412};
    const shape s = {300, 260, 410};
    for (int t = 1; t <= 2; t++) {
        openblas_set_num_threads(t);
        for (int tb = 0; tb < 2; tb++) {
            gemm_case g;
            case_make(&g, &rng, 0, tb, s, 0.125f, 1.0f);
            for (int rep = 0; rep < 2; rep++) {
                float *c = case_c(&g);
                run(&g, DPOC_GEMM_BF16, c);
                check_bf16(&g, c, t == 1 ? "1 thread" : "2 threads");
                free(c);
            }
            case_free(&g);
        }
    }
    openblas_set_num_threads(threads0);
}

/* Two threads at once, each with its own scratch and primitive cache. */
static void *thread_cases(void *arg) {
    bf16_ctx ctx = {(const char *)arg, 0.0};
    rng_t rng = {0x7eadu};
    for (size_t s = 1; s < sizeof SHAPES / sizeof SHAPES[0]; s++)
        for (int tb = 0; tb < 2; tb++) {
            gemm_case g;
            case_make(&g, &rng, 0, tb, SHAPES[s], 1.0f, 1.0f);
            bf16_case(&g, &ctx);
            case_free(&g);
        }
    return NULL;
}

static void test_bf16_concurrent(void **state) {
    (void)state;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, thread_cases, "thread 2"), 0);
    thread_cases("thread 1");
    assert_int_equal(pthread_join(th, NULL), 0);
}

static void test_reserve(void **state) {
    (void)state;
    dpoc_err err;
    dpoc_err_clear(&err);
    assert_int_equal(dpoc_gemm_reserve(1000 * 1000, 1000 * 1000, &err), 0);
    assert_int_equal(dpoc_gemm_reserve(10, 10, &err), 0); /* never shrinks: nothing to do */
    assert_int_not_equal(dpoc_gemm_reserve(SIZE_MAX / 2, 1, &err), 0);
    assert_non_null(strstr(err.msg, "overflows"));
    /* still works after a refused reservation and after a release */
    rng_t rng = {0x5e5e};
    gemm_case g;
    case_make(&g, &rng, 1, 0, SHAPES[3], 1.0f, 0.0f);
    bf16_ctx ctx = {"reserved", 0.0};
    bf16_case(&g, &ctx);
    dpoc_gemm_release();
    dpoc_gemm_release(); /* twice is fine */
    ctx.impl = "released";
    bf16_case(&g, &ctx);
    case_free(&g);
}

/* Without a usable oneDNN kernel (oneDNN limited to AVX2, where 2.6 has no bf16
 * matmul) BF16 calls take the exact fallback, say so once on stderr, and
 * dpoc_gemm_bf16_available() is 0: checked in a child process (the set-up
 * happens once per process). The child runs every case (main, --auto-child). */
static void test_unavailable_falls_back(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char cmd[1024], errpath[256], line[64] = "";
    snprintf(errpath, sizeof errpath, "%s/stderr", dir);
    snprintf(cmd, sizeof cmd, "ONEDNN_MAX_CPU_ISA=AVX2 /proc/%ld/exe --auto-child 2>%s", (long)getpid(), errpath);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    if (!fgets(line, (int)sizeof line, f)) line[0] = '\0';
    const int rc = pclose(f);
    char *err = read_text_file(errpath, NULL);
    assert_non_null(err);
    if (rc != 0) fail_msg("child failed (status %d): %s", rc, err);
    assert_string_equal(line, "available 0\n");
    const char *w = strstr(err, "dpoc: warning: ");
    if (!w || !strstr(w, "exact fp32 fallback")) fail_msg("no fallback warning on stderr: '%s'", err);
    if (strstr(w + 1, "dpoc: warning: ")) fail_msg("the warning came more than once: '%s'", err);
    free(err);
    remove(errpath);
    rmdir(dir);
}

int main(int argc, char **argv) {
    report = getenv("DPOC_GEMM_REPORT") != NULL;
    if (argc == 2 && strcmp(argv[1], "--auto-child") == 0) {
        bf16_ctx ctx = {"auto", 0.0};
        for_each_case(bf16_case, &ctx, 0xc41d);
        printf("available %d\n", dpoc_gemm_bf16_available());
        return 0;
    }
    printf("oneDNN bf16 matmul: %s\n", dpoc_gemm_bf16_available() ? "available" : "not available (fallbacks)");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_hand_picked),   cmocka_unit_test(test_round_is_nearest_even),
        cmocka_unit_test(test_widen_roundtrip),     cmocka_unit_test(test_round_simd),
        cmocka_unit_test(test_fp32_is_sgemm),       cmocka_unit_test(test_bf16_onednn),
        cmocka_unit_test(test_bf16_fallback_sgemm), cmocka_unit_test(test_bf16_fallback_scalar),
        cmocka_unit_test(test_bf16_exact),          cmocka_unit_test(test_bf16_threads),
        cmocka_unit_test(test_bf16_concurrent),     cmocka_unit_test(test_reserve),
        cmocka_unit_test(test_unavailable_falls_back), cmocka_unit_test(test_bf16_shadow),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
