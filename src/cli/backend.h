/* The compute backend at start, for the commands that compute (train, bench,
 * generate, build-pairs, perplexity, doctor): OpenBLAS's kernel made to match
 * the CPU before anything initialises, and the GEMM self-check once the thread
 * count is known. */
#ifndef DPOC_CLI_BACKEND_H
#define DPOC_CLI_BACKEND_H

#include "dpoc/err.h"

#define CLI_SKIP_BLAS_CHECK "--skip-blas-check"

/* Before MPI_Init: when OpenBLAS runs kernels below the CPU and the user did
 * not set OPENBLAS_CORETYPE, re-executes this process (same argv, same
 * environment plus OPENBLAS_CORETYPE and a marker that stops a second
 * re-exec); returns only when no re-exec happens. Removes --skip-blas-check
 * from argv (recording it) and prints, on the first rank, any warning. */
void cli_backend_prepare(int *argc, char **argv);

/* After the thread count is set: the GEMM self-check (unless skipped). */
int cli_backend_check(dpoc_err *err);

/* The launcher's rank of this process before MPI_Init (0 when not launched by one). */
int cli_launcher_rank(void);

#endif
