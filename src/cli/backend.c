/* See backend.h. Re-executing is how OPENBLAS_CORETYPE can take effect: OpenBLAS
 * chooses its kernels in its load-time constructor, before main, and reads the
 * variable only then. exec keeps the PID, the environment (so mpirun's and
 * srun's PMIx variables) and the open descriptors; MPI_Init has not run yet, so
 * the launcher sees one process that starts a few milliseconds later. */
#include "backend.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dpoc/layers.h"
#include "dpoc/runtime.h"

int cli_launcher_rank(void) {
    static const char *const vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

void cli_backend_prepare(int *argc, char **argv) {
    int out = 1;
    for (int i = 1; i < *argc; i++) {
        if (!strcmp(argv[i], CLI_SKIP_BLAS_CHECK)) dpoc_runtime_skip_blas_check();
        else argv[out++] = argv[i];
    }
    /* keep argv NULL-terminated for exec */
    argv[out] = NULL;
    const int removed = *argc - out;
    *argc = out;
    dpoc_runtime *r = dpoc_rt(); /* reads OPENBLAS_CORETYPE and the re-exec marker */
    unsetenv(DPOC_BLAS_REEXEC_ENV);
    const int first = cli_launcher_rank() == 0;
    if (r->blas_decision.action == DPOC_BLAS_REEXEC) {
        if (removed) {
            /* the re-executed process must skip the check too: put the flag back */
            argv[out] = (char *)CLI_SKIP_BLAS_CHECK;
            argv[out + 1] = NULL;
        }
        setenv(DPOC_OPENBLAS_CORETYPE_ENV, r->blas_decision.coretype, 1);
        setenv(DPOC_BLAS_REEXEC_ENV, r->blas.kernel, 1);
        fflush(NULL);
        execv("/proc/self/exe", argv);
        const int e = errno;
        unsetenv(DPOC_OPENBLAS_CORETYPE_ENV);
        unsetenv(DPOC_BLAS_REEXEC_ENV);
        argv[out] = NULL;
        if (first)
            fprintf(stderr,
                    "dpoc: warning: OpenBLAS runs %s kernels on this %s CPU and re-executing with "
                    "OPENBLAS_CORETYPE=%s failed (%s): set OPENBLAS_CORETYPE=%s yourself\n",
                    r->blas.kernel, dpoc_isa_name(dpoc_cpu_isa_level(r->cpu.features)), r->blas_decision.coretype,
                    strerror(e), r->blas_decision.coretype);
        return;
    }
    const dpoc_blas_action a = r->blas_decision.action;
    const int low = r->blas.kernel_isa != DPOC_ISA_UNKNOWN &&
                    r->blas.kernel_isa < dpoc_cpu_isa_level(r->cpu.features);
    if (first && (a == DPOC_BLAS_STILL_LOW || a == DPOC_BLAS_NOT_DYNAMIC || (a == DPOC_BLAS_USER && low)))
        fprintf(stderr, "dpoc: warning: %s\n", r->blas_decision.why);
}

int cli_backend_check(dpoc_err *err) {
    (void)dpoc_kernels_level(); /* choose dpoc's own SIMD level now, so that banners name it */
    return dpoc_runtime_check_blas(err);
}
