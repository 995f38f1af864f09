/* The runtime context: the process's one piece of mutable global state. It
 * holds what dpoc found out about the machine at start (CPU, BLAS, the kernel
 * choice and the GEMM self-check) and the process-wide compute settings (the
 * SIMD level of dpoc's own kernels, the precision of matrix products), so that
 * everything a number depends on can be reported with it: banners, metrics.h5,
 * checkpoints, `dpoc doctor`. Initialised on first use (thread-safe). */
#ifndef DPOC_RUNTIME_H
#define DPOC_RUNTIME_H

#include <stddef.h>

#include "dpoc/blas.h"
#include "dpoc/hw.h"

/* Precision of the matrix products (the `bf16` config key). */
typedef enum { DPOC_PRECISION_FP32 = 0, DPOC_PRECISION_BF16 = 1 } dpoc_precision;

typedef struct {
    dpoc_cpu cpu;
    dpoc_blas_info blas;           /* as at init; dpoc_runtime_refresh_blas re-reads threads */
    dpoc_blas_decision blas_decision;
    char blas_coretype[DPOC_BLAS_NAME_MAX];    /* OPENBLAS_CORETYPE in force ("" if unset) */
    char blas_chosen_alone[DPOC_BLAS_NAME_MAX]; /* set when dpoc re-executed: OpenBLAS's own choice */
    int blas_check_state;          /* 0 not run, 1 passed, -1 skipped (--skip-blas-check) */
    double blas_check_s;
    int simd_level;                /* dpoc_simd_level of dpoc's own kernels, -1 until model/kernels_dispatch.c
                                      chooses it at the first kernel call */
    char simd_name[16];            /* its name ("avx512", "avx2", "scalar") */
    dpoc_precision precision;
    char precision_why[160];       /* how `bf16` was decided (auto: the measurement) */
} dpoc_runtime;

/* The context, initialised on the first call from CPUID, OpenBLAS and the
 * environment (OPENBLAS_CORETYPE, DPOC_BLAS_REEXEC_FROM). */
dpoc_runtime *dpoc_rt(void);

/* Re-reads the BLAS thread count (after openblas_set_num_threads). */
void dpoc_runtime_refresh_blas(void);

/* Runs the GEMM self-check once with the BLAS's current threads and records it. */
int dpoc_runtime_check_blas(dpoc_err *err);
void dpoc_runtime_skip_blas_check(void);

/* One line naming the CPU, dpoc's SIMD level, the BLAS, its kernel and threads,
 * the self-check and the matrix-product precision (no trailing newline). */
void dpoc_runtime_describe(char *buf, size_t n);

/* The same facts as a JSON object (malloc'ed; NULL when out of memory). */
char *dpoc_runtime_json(void);

#endif
