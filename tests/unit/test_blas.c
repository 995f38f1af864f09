/* The BLAS backend: the kernel decision on a table of situations (CPU level,
 * vendor, the kernel OpenBLAS reports, a user's OPENBLAS_CORETYPE, dpoc's own
 * re-exec), the OpenBLAS core-name table, CPU detection against the compiler's
 * own CPUID reading, and the GEMM self-check: it passes on the real sgemm at 1
 * and 2 threads and fails, naming the problem, on sgemms that are wrong in the
 * ways a broken kernel is (one element off by a relative 1e-4, a transpose
 * ignored, bf16-rounded operands, a write past the row in C's padding). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "testutil.h"

#include "dpoc/blas.h"
#include "dpoc/hw.h"

typedef struct {
    dpoc_isa_level cpu;
    dpoc_cpu_vendor vendor;
    const char *kernel;
    int dynamic;
    const char *user;
    const char *reexec_from;
    dpoc_blas_action want;
    const char *want_coretype;
} decision_row;

static const decision_row rows[] = {
    /* the machine: Emerald Rapids, OpenBLAS 0.3.21 falls back to Prescott */
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Prescott", 1, NULL, NULL, DPOC_BLAS_REEXEC, "SKYLAKEX"},
    /* after the re-exec: the right kernel, or still the generic one (no second exec) */
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "SkylakeX", 1, NULL, "Prescott", DPOC_BLAS_KEEP, NULL},
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Prescott", 1, NULL, "Prescott", DPOC_BLAS_STILL_LOW, NULL},
    /* an AVX2 kernel on AVX-512 hardware (Zen 4 under an OpenBLAS that calls it Zen) */
    {DPOC_ISA_AVX512, DPOC_VENDOR_AMD, "Zen", 1, NULL, NULL, DPOC_BLAS_REEXEC, "SKYLAKEX"},
    {DPOC_ISA_AVX2, DPOC_VENDOR_AMD, "Prescott", 1, NULL, NULL, DPOC_BLAS_REEXEC, "ZEN"},
    {DPOC_ISA_AVX2, DPOC_VENDOR_INTEL, "Nehalem", 1, NULL, NULL, DPOC_BLAS_REEXEC, "HASWELL"},
    {DPOC_ISA_AVX, DPOC_VENDOR_INTEL, "Core2", 1, NULL, NULL, DPOC_BLAS_REEXEC, "SANDYBRIDGE"},
    /* kernels that match or exceed the CPU's level */
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Cooperlake", 1, NULL, NULL, DPOC_BLAS_KEEP, NULL},
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "sapphirerapids", 1, NULL, NULL, DPOC_BLAS_KEEP, NULL},
    {DPOC_ISA_AVX2, DPOC_VENDOR_INTEL, "Haswell", 1, NULL, NULL, DPOC_BLAS_KEEP, NULL},
    {DPOC_ISA_SSE, DPOC_VENDOR_OTHER, "Prescott", 1, NULL, NULL, DPOC_BLAS_KEEP, NULL},
    /* the user's OPENBLAS_CORETYPE is respected, even when it is slower */
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Haswell", 1, "HASWELL", NULL, DPOC_BLAS_USER, NULL},
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Prescott", 1, "", NULL, DPOC_BLAS_USER, NULL},
    /* a name dpoc does not know, and a build without DYNAMIC_ARCH */
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "FutureLake", 1, NULL, NULL, DPOC_BLAS_UNKNOWN, NULL},
    {DPOC_ISA_AVX512, DPOC_VENDOR_INTEL, "Haswell", 0, NULL, NULL, DPOC_BLAS_NOT_DYNAMIC, NULL},
};

static void test_decision_table(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const decision_row *r = &rows[i];
        dpoc_blas_situation s = {r->cpu, r->vendor, r->kernel, r->dynamic, r->user, r->reexec_from};
        dpoc_blas_decision d;
        dpoc_blas_decide(&s, &d);
        if (d.action != r->want)
            fail_msg("row %zu (kernel %s on %s): action %d, want %d (%s)", i, r->kernel, dpoc_isa_name(r->cpu),
                     (int)d.action, (int)r->want, d.why);
        if (r->want_coretype) {
            assert_non_null(d.coretype);
            assert_string_equal(d.coretype, r->want_coretype);
        }
        assert_true(strlen(d.why) > 10); /* every decision says why, for the banner */
        /* the re-exec is decided only in the first process: with reexec_from set, never again */
        if (r->reexec_from) assert_int_not_equal(d.action, DPOC_BLAS_REEXEC);
    }
}

static void test_kernel_names(void **state) {
    (void)state;
    assert_int_equal(dpoc_blas_kernel_isa("Prescott"), DPOC_ISA_SSE);
    assert_int_equal(dpoc_blas_kernel_isa("SKYLAKEX"), DPOC_ISA_AVX512);
    assert_int_equal(dpoc_blas_kernel_isa("Zen"), DPOC_ISA_AVX2);
    assert_int_equal(dpoc_blas_kernel_isa("Sandybridge"), DPOC_ISA_AVX);
    assert_int_equal(dpoc_blas_kernel_isa("nonsense"), DPOC_ISA_UNKNOWN);
    assert_int_equal(dpoc_blas_kernel_isa(NULL), DPOC_ISA_UNKNOWN);
    /* the override dpoc sets must itself be a name OpenBLAS knows at that level */
    for (int l = DPOC_ISA_AVX; l <= DPOC_ISA_AVX512; l++)
        for (int v = DPOC_VENDOR_INTEL; v <= DPOC_VENDOR_AMD; v++)
            assert_int_equal(dpoc_blas_kernel_isa(dpoc_blas_coretype_for((dpoc_isa_level)l, (dpoc_cpu_vendor)v)), l);
}

static void test_cpu_detect(void **state) {
    (void)state;
    dpoc_cpu c;
    dpoc_cpu_detect(&c);
    assert_true(c.cores >= 1);
    assert_true(dpoc_cpu_flops_per_cycle(&c) >= 8.0);
#if defined(__x86_64__)
    /* the compiler's CPUID reading (which also checks XGETBV) agrees with ours */
    __builtin_cpu_init();
    assert_int_equal(!!(c.features & DPOC_CPU_AVX2), !!__builtin_cpu_supports("avx2"));
    assert_int_equal(!!(c.features & DPOC_CPU_FMA), !!__builtin_cpu_supports("fma"));
    assert_int_equal(!!(c.features & DPOC_CPU_AVX512F), !!__builtin_cpu_supports("avx512f"));
    assert_int_equal(!!(c.features & DPOC_CPU_AVX512BW), !!__builtin_cpu_supports("avx512bw"));
    assert_int_equal(!!(c.features & DPOC_CPU_AVX512VL), !!__builtin_cpu_supports("avx512vl"));
    assert_true(dpoc_cpu_isa_level(c.features) >= DPOC_ISA_SSE);
    assert_true(!strcmp(c.vendor_id, "GenuineIntel") || !strcmp(c.vendor_id, "AuthenticAMD") || c.vendor == DPOC_VENDOR_OTHER);
#endif
    /* levels are ordered by their features */
    assert_int_equal(dpoc_cpu_isa_level(DPOC_CPU_AVX | DPOC_CPU_AVX2 | DPOC_CPU_FMA), DPOC_ISA_AVX2);
    assert_int_equal(dpoc_cpu_isa_level(DPOC_CPU_AVX | DPOC_CPU_AVX2), DPOC_ISA_AVX); /* no FMA: not AVX2 level */
    assert_int_equal(dpoc_cpu_isa_level(DPOC_CPU_AVX | DPOC_CPU_AVX2 | DPOC_CPU_FMA | DPOC_CPU_AVX512F), DPOC_ISA_AVX2);
    assert_int_equal(dpoc_cpu_isa_level(DPOC_CPU_AVX | DPOC_CPU_AVX2 | DPOC_CPU_FMA | DPOC_CPU_AVX512_CORE),
                     DPOC_ISA_AVX512);
}

static void test_self_check_passes(void **state) {
    (void)state;
    dpoc_blas_info info;
    dpoc_err err;
    const int before = openblas_get_num_threads();
    for (int threads = 1; threads <= 2; threads++) {
        openblas_set_num_threads(threads);
        dpoc_blas_query(&info);
        double s = -1;
        dpoc_err_clear(&err);
        if (dpoc_blas_self_check(NULL, &info, &s, &err)) fail_msg("%d thread(s): %s", threads, err.msg);
        assert_true(s >= 0.0);
    }
    openblas_set_num_threads(before);
}

/* ---- wrong sgemms ---- */

static void one_element_off(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                            int ldb, float beta, float *C, int ldc) {
    dpoc_blas_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (M > 20 && N > 10) C[(size_t)(M - 1) * (size_t)ldc + (size_t)(N - 1)] *= 1.0f + 1e-4f;
}

static void transpose_ignored(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                              const float *B, int ldb, float beta, float *C, int ldc) {
    if (ta && M == K) ta = 0; /* only where the shapes let it run */
    dpoc_blas_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static float bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, sizeof u);
    return x;
}

/* what a bf16 kernel passed off as sgemm gives: operands rounded to bf16 */
static void bf16_operands(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                          int ldb, float beta, float *C, int ldc) {
    const size_t na = (size_t)(ta ? K : M) * (size_t)lda, nb = (size_t)(tb ? N : K) * (size_t)ldb;
    float *a = malloc(na * sizeof *a), *b = malloc(nb * sizeof *b);
    assert_non_null(a);
    assert_non_null(b);
    for (size_t i = 0; i < na; i++) a[i] = bf16_round(A[i]);
    for (size_t i = 0; i < nb; i++) b[i] = bf16_round(B[i]);
    dpoc_blas_sgemm(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, C, ldc);
    free(a);
    free(b);
}

static void writes_padding(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                           int ldb, float beta, float *C, int ldc) {
    dpoc_blas_sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (ldc > N) C[N] = 12345.0f; /* row 0, the first column past N */
}

static void expect_failure(dpoc_sgemm_fn fn, const char *what, const char *needle) {
    dpoc_blas_info info;
    dpoc_blas_query(&info);
    dpoc_err err;
    dpoc_err_clear(&err);
    const int rc = dpoc_blas_self_check(fn, &info, NULL, &err);
    if (rc != DPOC_EINPUT) fail_msg("%s: the self-check returned %d, not DPOC_EINPUT", what, rc);
    if (!strstr(err.msg, needle)) fail_msg("%s: message lacks '%s': %s", what, needle, err.msg);
    /* the message names the BLAS, its kernel and something to try */
    if (!strstr(err.msg, info.library) || !strstr(err.msg, info.kernel) || !strstr(err.msg, "Try"))
        fail_msg("%s: message does not name the BLAS, kernel and an override: %s", what, err.msg);
}

static void test_self_check_catches_wrong_gemms(void **state) {
    (void)state;
    expect_failure(one_element_off, "one element off by 1e-4", "GEMM self-check failed");
    expect_failure(transpose_ignored, "transpose ignored", "sgemm(Trans, NoTrans");
    expect_failure(bf16_operands, "bf16 operands", "GEMM self-check failed");
    dpoc_blas_info info;
    dpoc_blas_query(&info);
    dpoc_err err;
    dpoc_err_clear(&err);
    assert_int_equal(dpoc_blas_self_check(writes_padding, &info, NULL, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "wrote outside C"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decision_table),
        cmocka_unit_test(test_kernel_names),
        cmocka_unit_test(test_cpu_detect),
        cmocka_unit_test(test_self_check_passes),
        cmocka_unit_test(test_self_check_catches_wrong_gemms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
