/* The BLAS dpoc computes with: which library and kernel it runs, whether that
 * kernel is below what the CPU can run, and a self-check of its sgemm.
 *
 * Why: a distribution's OpenBLAS picks its kernels from a table of CPU models
 * fixed when it was released. On a newer CPU it falls back to generic SSE
 * kernels (Debian 12's 0.3.21 runs "Prescott" on Emerald Rapids: a sixth of
 * the machine), and some builds compute wrong results on some CPUs. OpenBLAS
 * reads OPENBLAS_CORETYPE only when it loads, so the fix is decided here and
 * applied by the CLI, which re-executes the process with the variable set
 * before MPI_Init (src/cli/backend.c). */
#ifndef DPOC_BLAS_H
#define DPOC_BLAS_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/hw.h"

#define DPOC_BLAS_NAME_MAX 64

/* The environment variable OpenBLAS reads at load, and the one dpoc sets on its
 * re-exec to remember the kernel OpenBLAS had chosen alone. */
#define DPOC_OPENBLAS_CORETYPE_ENV "OPENBLAS_CORETYPE"
#define DPOC_BLAS_REEXEC_ENV "DPOC_BLAS_REEXEC_FROM"
/* Test hook: report this kernel name instead of the BLAS's own. */
#define DPOC_BLAS_TEST_KERNEL_ENV "DPOC_TEST_BLAS_KERNEL"
/* Test hook: the self-check's sgemm gives a wrong element. */
#define DPOC_BLAS_TEST_FAULT_ENV "DPOC_TEST_BLAS_FAULT"

typedef struct {
    char library[DPOC_BLAS_NAME_MAX]; /* "OpenBLAS" */
    char version[DPOC_BLAS_NAME_MAX]; /* "0.3.21" */
    char config[256];                 /* openblas_get_config() */
    char kernel[DPOC_BLAS_NAME_MAX];  /* openblas_get_corename(): "SkylakeX", "Prescott" */
    dpoc_isa_level kernel_isa;        /* the vector level of that kernel (UNKNOWN if not in the table) */
    int threads;                      /* openblas_get_num_threads() */
    int dynamic_arch;                 /* built with DYNAMIC_ARCH: the kernel is chosen at load */
} dpoc_blas_info;

/* What OpenBLAS reports now (kernel overridden by the test hook when set). */
void dpoc_blas_query(dpoc_blas_info *b);

/* The vector level of an OpenBLAS core name (case-insensitive). */
dpoc_isa_level dpoc_blas_kernel_isa(const char *kernel);

typedef enum {
    DPOC_BLAS_KEEP,         /* the kernel matches the CPU (or no better one is known) */
    DPOC_BLAS_REEXEC,       /* re-execute with OPENBLAS_CORETYPE = coretype */
    DPOC_BLAS_USER,         /* OPENBLAS_CORETYPE was set by the user: respected */
    DPOC_BLAS_STILL_LOW,    /* dpoc re-executed already, the kernel is still below the CPU */
    DPOC_BLAS_UNKNOWN,      /* a kernel name dpoc does not know: left alone */
    DPOC_BLAS_NOT_DYNAMIC,  /* an OpenBLAS built for one CPU: OPENBLAS_CORETYPE has no effect */
} dpoc_blas_action;

typedef struct {
    dpoc_isa_level cpu_isa;    /* the CPU's level (dpoc_cpu_isa_level) */
    dpoc_cpu_vendor vendor;
    const char *kernel;        /* what the BLAS runs */
    int dynamic_arch;
    const char *user_coretype; /* OPENBLAS_CORETYPE as set by the user, NULL if unset */
    const char *reexec_from;   /* non-NULL in dpoc's re-executed process: the kernel OpenBLAS chose alone */
} dpoc_blas_situation;

typedef struct {
    dpoc_blas_action action;
    const char *coretype;      /* REEXEC: the OPENBLAS_CORETYPE value to use */
    char why[256];             /* one sentence for the banner */
} dpoc_blas_decision;

/* Pure: the decision for a situation (unit-tested on a table). */
void dpoc_blas_decide(const dpoc_blas_situation *s, dpoc_blas_decision *d);

/* The best OPENBLAS_CORETYPE for a CPU level and vendor ("SKYLAKEX", "HASWELL", "ZEN", ...). */
const char *dpoc_blas_coretype_for(dpoc_isa_level isa, dpoc_cpu_vendor vendor);

/* A row-major sgemm with cblas_sgemm's arguments (transposes as 0/1). */
typedef void (*dpoc_sgemm_fn)(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                              const float *B, int ldb, float beta, float *C, int ldc);

/* cblas_sgemm through dpoc_sgemm_fn (the self-check's default). */
void dpoc_blas_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc);

/* The GEMM self-check: small sgemm problems in every transpose/stride/alpha/beta
 * combination dpoc uses, odd sizes and sizes OpenBLAS splits over its threads,
 * against a double-precision scalar reference. Element (i,j) may differ by at
 * most (K + 2) u sum_k |alpha a_ik b_kj| + 2 u |beta c_ij| + u |c_ij| (u = 2^-24),
 * the bound on any fp32 summation order (Higham, Accuracy and Stability, 3.1).
 * gemm NULL = dpoc_blas_sgemm. A failure is DPOC_EINPUT with a message naming the
 * problem, the element, the BLAS (info, may be NULL) and the override to try.
 * seconds_out (may be NULL): the time it took. */
int dpoc_blas_self_check(dpoc_sgemm_fn gemm, const dpoc_blas_info *info, double *seconds_out, dpoc_err *err);

#endif
