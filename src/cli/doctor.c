/* `dpoc doctor`: everything about this machine and build that a number dpoc
 * prints depends on, for a bug report: CPU, dpoc's SIMD level, the BLAS and
 * its kernel (and how it was chosen), the GEMM self-check, MPI, HDF5, /dev/shm. */
#include <hdf5.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <oneapi/dnnl/dnnl.h>

#include "backend.h"
#include "commands.h"
#include "dpoc/gemm.h"
#include "dpoc/layers.h"
#include "dpoc/runtime.h"

#define SHM_PATH "/dev/shm"

static void doctor_usage(FILE *f) {
    fprintf(f, "usage: dpoc doctor [--json]\n\n"
               "Prints the CPU (model, family/model, vector features, clock, fp32 FMA limit), the SIMD level of\n"
               "dpoc's kernels, the BLAS (library, version, build, the kernel it runs and how that was chosen,\n"
               "threads), the result of the GEMM self-check, the MPI library, HDF5 and the room in /dev/shm.\n"
               "Exit code 2 when the GEMM self-check fails.\n");
}

int dpoc_cli_doctor(int argc, char **argv) {
    int json = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            doctor_usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "dpoc doctor: unexpected argument '%s' (see dpoc doctor --help)\n", argv[i]);
            return 2;
        }
    }
    dpoc_err err;
    dpoc_err_clear(&err);
    (void)dpoc_kernels_level(); /* choose dpoc's SIMD level so it is reported */
    const int rc = cli_backend_check(&err);
    const dpoc_runtime *r = dpoc_rt();
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
    int mpi_len = 0;
    MPI_Get_library_version(mpi, &mpi_len); /* allowed before MPI_Init */
    char *nl = strchr(mpi, '\n');
    if (nl) *nl = 0;
    unsigned h5maj = 0, h5min = 0, h5rel = 0;
    H5get_libversion(&h5maj, &h5min, &h5rel);
    struct statvfs sv;
    const int shm_ok = statvfs(SHM_PATH, &sv) == 0;
    const double shm_free = shm_ok ? (double)sv.f_bavail * (double)sv.f_frsize : 0.0;
    const double shm_total = shm_ok ? (double)sv.f_blocks * (double)sv.f_frsize : 0.0;
    const double mem = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    const double limit = dpoc_cpu_fma_limit_gflops(&r->cpu, (double)r->cpu.cores);
    const dnnl_version_t *dv = dnnl_version();
    char dnnl[96];
    snprintf(dnnl, sizeof dnnl, "oneDNN %d.%d.%d (%s)", dv->major, dv->minor, dv->patch,
             dpoc_gemm_bf16_available() ? "bf16 matmul kernels available"
                                        : "no bf16 matmul kernel for this CPU: bf16 runs the exact sgemm fallback");
    if (json) {
        char *m = dpoc_runtime_json();
        cJSON *o = m ? cJSON_Parse(m) : NULL;
        free(m);
        if (!o) o = cJSON_CreateObject();
        char h5[32];
        snprintf(h5, sizeof h5, "%u.%u.%u", h5maj, h5min, h5rel);
        cJSON_AddStringToObject(o, "dpoc_version", DPOC_VERSION);
        cJSON_AddStringToObject(o, "git_revision", DPOC_GIT_REVISION);
        cJSON_AddNumberToObject(o, "cpu_flops_per_cycle", dpoc_cpu_flops_per_cycle(&r->cpu));
        cJSON_AddStringToObject(o, "cpu_fma_source", r->cpu.fma_source);
        cJSON_AddNumberToObject(o, "fma_limit_gflops", limit);
        cJSON_AddStringToObject(o, "mpi", mpi);
        cJSON_AddStringToObject(o, "hdf5", h5);
        cJSON_AddStringToObject(o, "bf16_gemm", dnnl);
        cJSON_AddNumberToObject(o, "memory_bytes", mem);
        cJSON_AddNumberToObject(o, "dev_shm_free_bytes", shm_free);
        cJSON_AddNumberToObject(o, "dev_shm_total_bytes", shm_total);
        if (rc) cJSON_AddStringToObject(o, "blas_self_check_error", err.msg);
        char *s = cJSON_Print(o);
        if (s) printf("%s\n", s);
        free(s);
        cJSON_Delete(o);
    } else {
        char feats[256], line[1024];
        dpoc_cpu_feature_names(r->cpu.features, feats, sizeof feats);
        dpoc_runtime_describe(line, sizeof line);
        printf("dpoc %s (%s)\n%s\n\n", DPOC_VERSION, DPOC_GIT_REVISION, line);
        printf("CPU        %s\n           %s family %u model %u stepping %u; %ld logical CPUs online\n",
               r->cpu.model_name, r->cpu.vendor_id, r->cpu.family, r->cpu.model, r->cpu.stepping, r->cpu.cores);
        printf("           features (OS-enabled): %s\n", feats[0] ? feats : "none beyond SSE2");
        printf("           clock %.2f GHz (%s)\n", r->cpu.clock_ghz, r->cpu.clock_source);
        printf("           fp32 FMA limit %.1f GFLOP/s = %ld cores x %.2f GHz x %.0f FLOP/cycle (%s)\n", limit,
               r->cpu.cores, r->cpu.clock_ghz, dpoc_cpu_flops_per_cycle(&r->cpu), r->cpu.fma_source);
        printf("SIMD       dpoc's kernels: %s%s\n", r->simd_name, getenv("DPOC_SIMD") ? " (DPOC_SIMD)" : "");
        printf("BLAS       %s %s, kernel %s (%s level), %d thread(s)\n           build: %s\n", r->blas.library,
               r->blas.version, r->blas.kernel, dpoc_isa_name(r->blas.kernel_isa), r->blas.threads, r->blas.config);
        printf("           OPENBLAS_CORETYPE=%s%s; %s\n", r->blas_coretype[0] ? r->blas_coretype : "(unset)",
               r->blas_coretype[0] ? (r->blas_chosen_alone[0] ? " (set by dpoc)" : " (set by you)") : "",
               r->blas_decision.why);
        if (rc) printf("           GEMM self-check FAILED: %s\n", err.msg);
        else if (r->blas_check_state > 0) printf("           GEMM self-check passed in %.1f ms\n", r->blas_check_s * 1e3);
        else printf("           GEMM self-check skipped (--skip-blas-check)\n");
        printf("bf16 GEMM  %s\n", dnnl);
        printf("MPI        %s\n", mpi);
        printf("HDF5       %u.%u.%u\n", h5maj, h5min, h5rel);
        printf("memory     %.1f GiB\n", mem / 1073741824.0);
        if (shm_ok) printf("/dev/shm   %.1f GiB free of %.1f GiB\n", shm_free / 1073741824.0, shm_total / 1073741824.0);
        else printf("/dev/shm   not available\n");
    }
    if (rc) fprintf(stderr, "dpoc doctor: error: %s\n", err.msg);
    return rc;
}
