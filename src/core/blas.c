/* BLAS identification, kernel choice and the sgemm self-check (see include/dpoc/blas.h). */
#include "dpoc/blas.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cblas.h>

#include "core/rng.h"
#include "dpoc/prof.h"

/* OpenBLAS's DYNAMIC_ARCH core names (driver/others/dynamic.c's corename[]) by
 * the vector level of their kernels. */
static const struct {
    const char *name;
    dpoc_isa_level isa;
} kernel_table[] = {
    {"Prescott", DPOC_ISA_SSE},       {"Katmai", DPOC_ISA_SSE},       {"Coppermine", DPOC_ISA_SSE},
    {"Northwood", DPOC_ISA_SSE},      {"Core2", DPOC_ISA_SSE},        {"Penryn", DPOC_ISA_SSE},
    {"Dunnington", DPOC_ISA_SSE},     {"Nehalem", DPOC_ISA_SSE},      {"Atom", DPOC_ISA_SSE},
    {"Athlon", DPOC_ISA_SSE},         {"Opteron", DPOC_ISA_SSE},      {"Opteron_SSE3", DPOC_ISA_SSE},
    {"Barcelona", DPOC_ISA_SSE},      {"Nano", DPOC_ISA_SSE},         {"Bobcat", DPOC_ISA_SSE},
    {"Unknown", DPOC_ISA_SSE},        {"Sandybridge", DPOC_ISA_AVX},  {"Bulldozer", DPOC_ISA_AVX},
    {"Piledriver", DPOC_ISA_AVX},     {"Steamroller", DPOC_ISA_AVX},  {"Excavator", DPOC_ISA_AVX2},
    {"Haswell", DPOC_ISA_AVX2},       {"Zen", DPOC_ISA_AVX2},         {"SkylakeX", DPOC_ISA_AVX512},
    {"Cooperlake", DPOC_ISA_AVX512},  {"SapphireRapids", DPOC_ISA_AVX512},
};

dpoc_isa_level dpoc_blas_kernel_isa(const char *kernel) {
    if (!kernel) return DPOC_ISA_UNKNOWN;
    for (size_t i = 0; i < sizeof kernel_table / sizeof kernel_table[0]; i++)
        if (!strcasecmp(kernel, kernel_table[i].name)) return kernel_table[i].isa;
    return DPOC_ISA_UNKNOWN;
}

/* SKYLAKEX rather than COOPERLAKE or SAPPHIRERAPIDS for every AVX-512 CPU: their
 * sgemm kernels are the same, the name exists in every OpenBLAS since 0.3.x, and
 * OpenBLAS 0.3.22+ itself maps AMD Zen 4 to these kernels. */
const char *dpoc_blas_coretype_for(dpoc_isa_level isa, dpoc_cpu_vendor vendor) {
    switch (isa) {
    case DPOC_ISA_AVX512: return "SKYLAKEX";
    case DPOC_ISA_AVX2: return vendor == DPOC_VENDOR_AMD ? "ZEN" : "HASWELL";
    case DPOC_ISA_AVX: return vendor == DPOC_VENDOR_AMD ? "BULLDOZER" : "SANDYBRIDGE";
    default: return NULL;
    }
}

void dpoc_blas_decide(const dpoc_blas_situation *s, dpoc_blas_decision *d) {
    memset(d, 0, sizeof *d);
    const dpoc_isa_level k = dpoc_blas_kernel_isa(s->kernel);
    const char *kernel = s->kernel ? s->kernel : "?";
    const char *cpu = dpoc_isa_name(s->cpu_isa);
    if (s->reexec_from) {
        if (k != DPOC_ISA_UNKNOWN && k < s->cpu_isa) {
            d->action = DPOC_BLAS_STILL_LOW;
            snprintf(d->why, sizeof d->why,
                     "OpenBLAS still runs %s kernels after dpoc set OPENBLAS_CORETYPE (it chose %s alone) on an %s "
                     "CPU: this OpenBLAS does not know a better core; matrix products run below the CPU's speed",
                     kernel, s->reexec_from, cpu);
        } else {
            d->action = DPOC_BLAS_KEEP;
            snprintf(d->why, sizeof d->why, "chosen by dpoc: OpenBLAS alone chose %s on this %s CPU",
                     s->reexec_from, cpu);
        }
        return;
    }
    if (s->user_coretype) {
        d->action = DPOC_BLAS_USER;
        if (k != DPOC_ISA_UNKNOWN && k < s->cpu_isa)
            snprintf(d->why, sizeof d->why,
                     "OPENBLAS_CORETYPE=%s set in the environment (respected) gives %s kernels, below this %s CPU",
                     s->user_coretype, kernel, cpu);
        else
            snprintf(d->why, sizeof d->why, "OPENBLAS_CORETYPE=%s set in the environment (respected)",
                     s->user_coretype);
        return;
    }
    if (k == DPOC_ISA_UNKNOWN) {
        d->action = DPOC_BLAS_UNKNOWN;
        snprintf(d->why, sizeof d->why, "kernel %s is not in dpoc's table of OpenBLAS cores: left as it is", kernel);
        return;
    }
    if (k >= s->cpu_isa) {
        d->action = DPOC_BLAS_KEEP;
        snprintf(d->why, sizeof d->why, "chosen by OpenBLAS, matches this %s CPU", cpu);
        return;
    }
    if (!s->dynamic_arch) {
        d->action = DPOC_BLAS_NOT_DYNAMIC;
        snprintf(d->why, sizeof d->why,
                 "this OpenBLAS is built for %s only (no DYNAMIC_ARCH), below this %s CPU: install one built with "
                 "DYNAMIC_ARCH or for this CPU",
                 kernel, cpu);
        return;
    }
    d->coretype = dpoc_blas_coretype_for(s->cpu_isa, s->vendor);
    if (!d->coretype) {
        d->action = DPOC_BLAS_KEEP;
        snprintf(d->why, sizeof d->why, "chosen by OpenBLAS");
        return;
    }
    d->action = DPOC_BLAS_REEXEC;
    snprintf(d->why, sizeof d->why, "OpenBLAS chose %s kernels on this %s CPU: dpoc sets OPENBLAS_CORETYPE=%s",
             kernel, cpu, d->coretype);
}

void dpoc_blas_query(dpoc_blas_info *b) {
    memset(b, 0, sizeof *b);
    snprintf(b->library, sizeof b->library, "OpenBLAS");
    const char *cfg = openblas_get_config();
    snprintf(b->config, sizeof b->config, "%s", cfg ? cfg : "");
    /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64" */
    const char *v = strstr(b->config, "OpenBLAS ");
    if (v) {
        v += strlen("OpenBLAS ");
        size_t n = strcspn(v, " ");
        if (n >= sizeof b->version) n = sizeof b->version - 1;
        memcpy(b->version, v, n);
        b->version[n] = 0;
    } else {
        snprintf(b->version, sizeof b->version, "unknown");
    }
    b->dynamic_arch = strstr(b->config, "DYNAMIC_ARCH") != NULL;
    const char *test_kernel = getenv(DPOC_BLAS_TEST_KERNEL_ENV);
    const char *core = test_kernel && *test_kernel ? test_kernel : openblas_get_corename();
    snprintf(b->kernel, sizeof b->kernel, "%s", core ? core : "unknown");
    b->kernel_isa = dpoc_blas_kernel_isa(b->kernel);
    b->threads = openblas_get_num_threads();
}

void dpoc_blas_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K,
                alpha, A, lda, B, ldb, beta, C, ldc);
}

/* ---- the self-check ---- */

typedef struct {
    int ta, tb, M, N, K;
    float alpha, beta;
    int pad_a, pad_b, pad_c; /* leading dimension beyond the stored width */
} check_problem;

/* The combinations dpoc's layers and attention use (layers.c, kernels_attention.c):
 * x W^T (N,T), dY W (N,N), dY^T X (T,N), the attention scale as alpha, beta 0 and
 * 1, strided views (heads inside a row), odd sizes that hit every kernel edge,
 * and products large enough that OpenBLAS splits them over its threads. */
static const check_problem problems[] = {
    {0, 1, 37, 29, 53, 1.0f, 0.0f, 3, 5, 2},     {0, 1, 64, 96, 128, 1.0f, 1.0f, 0, 0, 0},
    {0, 1, 33, 17, 70, 0.125f, 1.0f, 4, 1, 3},   {0, 0, 45, 38, 61, 1.0f, 1.0f, 2, 3, 1},
    {1, 0, 29, 41, 47, 1.0f, 1.0f, 1, 2, 5},     {1, 0, 40, 24, 64, 0.125f, 1.0f, 24, 24, 0},
    {0, 0, 64, 32, 64, 1.0f, 0.0f, 0, 96, 0},    {0, 1, 1, 1, 1, 1.0f, 1.0f, 0, 0, 0},
    {0, 1, 1, 7, 300, 1.0f, 0.0f, 0, 0, 0},      {0, 0, 300, 1, 9, 1.0f, 1.0f, 0, 0, 0},
    {0, 1, 192, 160, 128, 1.0f, 0.0f, 0, 0, 0},  {0, 0, 160, 128, 192, 1.0f, 1.0f, 1, 0, 0},
    {1, 0, 128, 160, 192, 1.0f, 1.0f, 0, 0, 1},  {1, 0, 48, 40, 48, 1.0f, 1.0f, 0, 0, 0},
};
#define N_PROBLEMS (sizeof problems / sizeof problems[0])
#define CHECK_SEED 0x5eed5eedull
#define UNIT_ROUNDOFF 0x1p-24

/* Stored shape of an operand: op(X) is (r, c); X is stored (c, r) when transposed. */
static size_t stored_rows(int t, int r, int c) { return (size_t)(t ? c : r); }
static size_t stored_cols(int t, int r, int c) { return (size_t)(t ? r : c); }

static float uniform_pm1(uint64_t *s) { return (float)((double)(dpoc_splitmix64(s) >> 11) * 0x1p-52 - 1.0); }

static void suggest(const dpoc_blas_info *info, char *buf, size_t n) {
    const dpoc_isa_level k = info ? info->kernel_isa : DPOC_ISA_UNKNOWN;
    if (k >= DPOC_ISA_AVX512) snprintf(buf, n, "OPENBLAS_CORETYPE=HASWELL (AVX2 kernels)");
    else if (k >= DPOC_ISA_AVX2) snprintf(buf, n, "OPENBLAS_CORETYPE=SANDYBRIDGE (AVX kernels)");
    else if (k >= DPOC_ISA_AVX) snprintf(buf, n, "OPENBLAS_CORETYPE=PRESCOTT (generic SSE kernels, slow)");
    else snprintf(buf, n, "another BLAS build");
}

int dpoc_blas_self_check(dpoc_sgemm_fn gemm, const dpoc_blas_info *info, double *seconds_out, dpoc_err *err) {
    const double t0 = dpoc_prof_clock();
    if (!gemm) gemm = dpoc_blas_sgemm;
    size_t max_a = 0, max_b = 0, max_c = 0;
    for (size_t p = 0; p < N_PROBLEMS; p++) {
        const check_problem *q = &problems[p];
        const size_t a = stored_rows(q->ta, q->M, q->K) * (stored_cols(q->ta, q->M, q->K) + (size_t)q->pad_a);
        const size_t b = stored_rows(q->tb, q->K, q->N) * (stored_cols(q->tb, q->K, q->N) + (size_t)q->pad_b);
        const size_t c = (size_t)q->M * ((size_t)q->N + (size_t)q->pad_c);
        if (a > max_a) max_a = a;
        if (b > max_b) max_b = b;
        if (c > max_c) max_c = c;
    }
    float *A = dpoc_malloc(max_a * sizeof *A, "GEMM self-check", err);
    float *B = A ? dpoc_malloc(max_b * sizeof *B, "GEMM self-check", err) : NULL;
    float *C = B ? dpoc_malloc(max_c * sizeof *C, "GEMM self-check", err) : NULL;
    float *C0 = C ? dpoc_malloc(max_c * sizeof *C0, "GEMM self-check", err) : NULL;
    if (!C0) {
        free(A);
        free(B);
        free(C);
        return DPOC_ENOMEM;
    }
    const char *fault = getenv(DPOC_BLAS_TEST_FAULT_ENV);
    const int inject = fault && *fault && strcmp(fault, "0") != 0;
    uint64_t seed = CHECK_SEED;
    int rc = 0;
    for (size_t p = 0; p < N_PROBLEMS && !rc; p++) {
        const check_problem *q = &problems[p];
        const size_t lda = stored_cols(q->ta, q->M, q->K) + (size_t)q->pad_a;
        const size_t ldb = stored_cols(q->tb, q->K, q->N) + (size_t)q->pad_b;
        const size_t ldc = (size_t)q->N + (size_t)q->pad_c;
        const size_t na = stored_rows(q->ta, q->M, q->K) * lda, nb = stored_rows(q->tb, q->K, q->N) * ldb;
        const size_t nc = (size_t)q->M * ldc;
        for (size_t i = 0; i < na; i++) A[i] = uniform_pm1(&seed);
        for (size_t i = 0; i < nb; i++) B[i] = uniform_pm1(&seed);
        for (size_t i = 0; i < nc; i++) C[i] = C0[i] = uniform_pm1(&seed);
        gemm(q->ta, q->tb, q->M, q->N, q->K, q->alpha, A, (int)lda, B, (int)ldb, q->beta, C, (int)ldc);
        if (inject && p == N_PROBLEMS / 2) C[(size_t)(q->M / 2) * ldc + (size_t)(q->N / 2)] += 1e-3f;
        for (int i = 0; i < q->M && !rc; i++) {
            for (int j = 0; j < q->N; j++) {
                double ref = 0.0, mag = 0.0;
                for (int k = 0; k < q->K; k++) {
                    const double a = q->ta ? A[(size_t)k * lda + (size_t)i] : A[(size_t)i * lda + (size_t)k];
                    const double b = q->tb ? B[(size_t)j * ldb + (size_t)k] : B[(size_t)k * ldb + (size_t)j];
                    ref += a * b;
                    mag += fabs(a * b);
                }
                const double c0 = C0[(size_t)i * ldc + (size_t)j];
                ref = (double)q->alpha * ref + (double)q->beta * c0;
                const double tol = (double)(q->K + 2) * UNIT_ROUNDOFF * fabs((double)q->alpha) * mag +
                                   2.0 * UNIT_ROUNDOFF * fabs((double)q->beta * c0) + UNIT_ROUNDOFF * fabs(ref);
                const double got = C[(size_t)i * ldc + (size_t)j];
                if (!(fabs(got - ref) <= tol)) {
                    char try_[96];
                    suggest(info, try_, sizeof try_);
                    rc = dpoc_errf(err, DPOC_EINPUT,
                                   "GEMM self-check failed: %s %s with its %s kernels (%d thread(s)) computed "
                                   "C[%d][%d] = %.9g in sgemm(%s, %s, M=%d, N=%d, K=%d, alpha=%g, beta=%g) where a "
                                   "scalar reference gives %.9g (allowed error %.3g): this BLAS computes wrong "
                                   "results on this CPU. Try %s, or another BLAS; --skip-blas-check runs anyway "
                                   "(its numbers cannot be trusted)",
                                   info ? info->library : "the BLAS", info ? info->version : "",
                                   info ? info->kernel : "?", info ? info->threads : 0, i, j, got,
                                   q->ta ? "Trans" : "NoTrans", q->tb ? "Trans" : "NoTrans", q->M, q->N, q->K,
                                   (double)q->alpha, (double)q->beta, ref, tol, try_);
                    break;
                }
            }
        }
        /* the leading-dimension padding of C must be left as it was */
        for (int i = 0; i < q->M && !rc; i++)
            for (size_t j = (size_t)q->N; j < ldc; j++)
                if (C[(size_t)i * ldc + j] != C0[(size_t)i * ldc + j]) {
                    rc = dpoc_errf(err, DPOC_EINPUT,
                                   "GEMM self-check failed: %s %s (%s kernels) wrote outside C (row %d, column %zu "
                                   "of ldc %zu) in sgemm(%s, %s, M=%d, N=%d, K=%d)",
                                   info ? info->library : "the BLAS", info ? info->version : "",
                                   info ? info->kernel : "?", i, j, ldc, q->ta ? "Trans" : "NoTrans",
                                   q->tb ? "Trans" : "NoTrans", q->M, q->N, q->K);
                    break;
                }
    }
    free(A);
    free(B);
    free(C);
    free(C0);
    if (seconds_out) *seconds_out = dpoc_prof_clock() - t0;
    return rc;
}
