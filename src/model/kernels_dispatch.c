/* Run-time choice of the kernel level (see kernels.h and layers.h).
 *
 * The active level lives in the runtime context (dpoc/runtime.h), the
 * library's one piece of global mutable state: it is set once, by the first
 * kernel call (pthread_once, so concurrent first calls are safe), from
 * DPOC_SIMD or the CPU, and only dpoc_kernels_force (tests, benchmarks)
 * changes it later. The tables themselves are constant. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/runtime.h"
#include "model/kernels.h"

static pthread_once_t active_once = PTHREAD_ONCE_INIT;

static const char *const level_names[DPOC_SIMD_LEVELS] = {"scalar", "avx2", "avx512"};

const char *dpoc_simd_name(dpoc_simd_level level) {
    return (unsigned)level < DPOC_SIMD_LEVELS ? level_names[level] : "unknown";
}

int dpoc_simd_parse(const char *name, dpoc_simd_level *level) {
    for (int i = 0; i < DPOC_SIMD_LEVELS; i++)
        if (strcmp(name, level_names[i]) == 0) {
            *level = (dpoc_simd_level)i;
            return 0;
        }
    return -1;
}

/* __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512
 * register state (XGETBV), so a supported level is one that can run. */
int dpoc_kernels_supported(dpoc_simd_level level) {
    switch (level) {
    case DPOC_SIMD_SCALAR: return 1;
#if defined(__x86_64__)
    case DPOC_SIMD_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case DPOC_SIMD_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
    default: return 0;
    }
}

const dpoc_kernel_table *dpoc_kernels_for(dpoc_simd_level level) {
    if (!dpoc_kernels_supported(level)) return NULL;
    switch (level) {
#if defined(__x86_64__)
    case DPOC_SIMD_AVX2: return &dpoc_kernels_avx2;
    case DPOC_SIMD_AVX512: return &dpoc_kernels_avx512;
#endif
    default: return &dpoc_kernels_scalar;
    }
}

static const dpoc_kernel_table *best_table(void) {
    for (int l = DPOC_SIMD_LEVELS - 1; l > 0; l--) {
        const dpoc_kernel_table *t = dpoc_kernels_for((dpoc_simd_level)l);
        if (t) return t;
    }
    return &dpoc_kernels_scalar;
}

static void set_active(const dpoc_kernel_table *t) {
    dpoc_runtime *r = dpoc_rt();
    r->simd_level = (int)t->level;
    snprintf(r->simd_name, sizeof r->simd_name, "%s", dpoc_simd_name(t->level));
}

static void choose_active(void) {
    const dpoc_kernel_table *best = best_table();
    const char *want = getenv("DPOC_SIMD");
    set_active(best);
    if (!want || !*want) return;
    dpoc_simd_level level;
    const dpoc_kernel_table *t = NULL;
    if (dpoc_simd_parse(want, &level) == 0) t = dpoc_kernels_for(level);
    if (t) {
        set_active(t);
        return;
    }
    /* A wrong setting must not stop a run (library code does not exit), but it
     * must not pass silently either: the numbers would come from another level. */
    fprintf(stderr, "dpoc: DPOC_SIMD=%s is %s; using %s\n", want,
            dpoc_simd_parse(want, &level) ? "not one of scalar, avx2, avx512" : "not supported by this CPU",
            dpoc_simd_name(best->level));
}

const dpoc_kernel_table *dpoc_kernels(void) {
    pthread_once(&active_once, choose_active);
    switch ((dpoc_simd_level)dpoc_rt()->simd_level) {
#if defined(__x86_64__)
    case DPOC_SIMD_AVX2: return &dpoc_kernels_avx2;
    case DPOC_SIMD_AVX512: return &dpoc_kernels_avx512;
#endif
    default: return &dpoc_kernels_scalar;
    }
}

dpoc_simd_level dpoc_kernels_level(void) { return dpoc_kernels()->level; }

int dpoc_kernels_force(dpoc_simd_level level, dpoc_err *err) {
    pthread_once(&active_once, choose_active);
    const dpoc_kernel_table *t = dpoc_kernels_for(level);
    if (!t)
        return dpoc_errf(err, DPOC_EINPUT, "SIMD level %s is not supported by this CPU or build",
                         dpoc_simd_name(level));
    set_active(t);
    return 0;
}
