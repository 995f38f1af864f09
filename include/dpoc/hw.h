/* The CPU dpoc runs on: vendor, family/model, the vector features that decide
 * which kernels can run (checked against what the OS saves, XGETBV), the
 * clock, and the fp32 FMA limit of a core (vector width x FMA units x 2).
 * Everything here is read from CPUID and /proc or /sys; nothing is measured. */
#ifndef DPOC_HW_H
#define DPOC_HW_H

#include <stddef.h>

/* Feature bits (dpoc_cpu.features): set only when the CPU has the feature AND
 * the OS saves its register state, so a set bit means "can run". */
enum {
    DPOC_CPU_AVX = 1u << 0,
    DPOC_CPU_AVX2 = 1u << 1,
    DPOC_CPU_FMA = 1u << 2,
    DPOC_CPU_AVX512F = 1u << 3,
    DPOC_CPU_AVX512DQ = 1u << 4,
    DPOC_CPU_AVX512CD = 1u << 5,
    DPOC_CPU_AVX512BW = 1u << 6,
    DPOC_CPU_AVX512VL = 1u << 7,
    DPOC_CPU_AVX512_BF16 = 1u << 8,
    DPOC_CPU_AVX512_FP16 = 1u << 9,
    DPOC_CPU_AMX_TILE = 1u << 10,
    DPOC_CPU_AMX_BF16 = 1u << 11,
    DPOC_CPU_FEATURE_COUNT = 12
};

/* The AVX-512 subset OpenBLAS's SkylakeX kernels and dpoc's AVX-512 kernels need. */
#define DPOC_CPU_AVX512_CORE                                                                          \
    (DPOC_CPU_AVX512F | DPOC_CPU_AVX512DQ | DPOC_CPU_AVX512CD | DPOC_CPU_AVX512BW | DPOC_CPU_AVX512VL)

typedef enum { DPOC_VENDOR_OTHER = 0, DPOC_VENDOR_INTEL, DPOC_VENDOR_AMD } dpoc_cpu_vendor;

/* Vector ISA levels, ordered: a kernel of level L runs on a CPU of level >= L. */
typedef enum {
    DPOC_ISA_UNKNOWN = 0,
    DPOC_ISA_SSE = 1,    /* SSE2/SSE3 (OpenBLAS's generic x86-64 cores: Prescott, Core2, ...) */
    DPOC_ISA_AVX = 2,    /* AVX without FMA (Sandybridge) */
    DPOC_ISA_AVX2 = 3,   /* AVX2 + FMA (Haswell, Zen) */
    DPOC_ISA_AVX512 = 4, /* AVX-512 F/DQ/CD/BW/VL (SkylakeX and later) */
} dpoc_isa_level;

typedef struct {
    dpoc_cpu_vendor vendor;
    char vendor_id[13];   /* "GenuineIntel", "AuthenticAMD" */
    char model_name[64];  /* the brand string */
    unsigned family, model, stepping; /* display family/model, as Linux prints them */
    unsigned features;    /* DPOC_CPU_* */
    long cores;           /* logical CPUs online on this machine */
    double clock_ghz;     /* 0 when unknown */
    char clock_source[96];
    unsigned fma_units;   /* fp32 FMA pipes per core at fma_bits width */
    unsigned fma_bits;    /* width of those pipes' operations: 128, 256 or 512 */
    char fma_source[128]; /* how fma_units/fma_bits were decided */
} dpoc_cpu;

/* Fills c from CPUID (x86-64; elsewhere vendor OTHER, no features), /sys and /proc. */
void dpoc_cpu_detect(dpoc_cpu *c);

/* The widest level whose features are all set. */
dpoc_isa_level dpoc_cpu_isa_level(unsigned features);
const char *dpoc_isa_name(dpoc_isa_level level);

/* Names of the set feature bits, space-separated ("avx2 fma avx512f ..."). */
void dpoc_cpu_feature_names(unsigned features, char *buf, size_t n);

/* fp32 FLOPs one core can issue per cycle: fma_units x (fma_bits / 32) x 2. */
double dpoc_cpu_flops_per_cycle(const dpoc_cpu *c);

/* The fp32 FMA limit of `cores` cores in GFLOP/s (0 when the clock is unknown). */
double dpoc_cpu_fma_limit_gflops(const dpoc_cpu *c, double cores);

/* Measured: the fp32 FMA rate of the calling thread's core in GFLOP/s (about
 * 50 ms of independent FMA chains at the widest width c runs); lanes_out (may
 * be NULL) gets the vector width used, in floats. Divided by the FLOPs per
 * cycle it gives the clock the vector units really run at. */
double dpoc_cpu_measure_fma_gflops(const dpoc_cpu *c, unsigned *lanes_out);

#endif
