/* A measured fp32 FMA rate of one core: independent FMA chains in the widest
 * vector width the CPU runs, long enough (PROBE_SECONDS) for the clock to
 * settle. It tells the clock the vector units actually run at, which neither
 * a virtual machine's /proc/cpuinfo nor a base clock in the model name says
 * (turbo, or the lower AVX-512 licence clocks). The scalar loop is the twin
 * for CPUs without AVX2/AVX-512. */
#include <stddef.h>

#include "dpoc/hw.h"
#include "dpoc/prof.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* Enough independent accumulators to cover FMA latency (4 cycles) x 2 pipes. */
#define PROBE_CHAINS 12
#define PROBE_INNER 4096
#define PROBE_SECONDS 0.05

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static float probe_avx512(size_t iters) {
    __m512 acc[PROBE_CHAINS];
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    __m512 s = acc[0];
    for (int i = 1; i < PROBE_CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) static float probe_avx2(size_t iters) {
    __m256 acc[PROBE_CHAINS];
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    __m256 s = acc[0];
    for (int i = 1; i < PROBE_CHAINS; i++) s = _mm256_add_ps(s, acc[i]);
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}
#endif

static float probe_scalar(size_t iters) {
    float acc[PROBE_CHAINS];
    for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = (float)i;
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < PROBE_CHAINS; i++) acc[i] = acc[i] * 0.999999f + 1e-7f;
    float s = 0;
    for (int i = 0; i < PROBE_CHAINS; i++) s += acc[i];
    return s;
}

double dpoc_cpu_measure_fma_gflops(const dpoc_cpu *c, unsigned *lanes_out) {
    const dpoc_isa_level isa = dpoc_cpu_isa_level(c->features);
    unsigned lanes = 1;
    float (*probe)(size_t) = probe_scalar;
#if defined(__x86_64__)
    if (isa >= DPOC_ISA_AVX512) probe = probe_avx512, lanes = 16;
    else if (isa >= DPOC_ISA_AVX2) probe = probe_avx2, lanes = 8;
#else
    (void)isa;
#endif
    if (lanes_out) *lanes_out = lanes;
    volatile float sink = probe(PROBE_INNER); /* warm up: wake the vector units */
    double best = 0.0, elapsed = 0.0;
    while (elapsed < PROBE_SECONDS) {
        const double t0 = dpoc_prof_clock();
        sink += probe(PROBE_INNER);
        const double dt = dpoc_prof_clock() - t0;
        elapsed += dt;
        const double g = (double)PROBE_INNER * PROBE_CHAINS * lanes * 2.0 / dt * 1e-9;
        if (g > best) best = g;
    }
    (void)sink;
    return best;
}
