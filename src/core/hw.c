/* CPU identification from CPUID (see include/dpoc/hw.h).
 *
 * A feature counts only when the OS also saves its registers (XCR0 via XGETBV):
 * a hypervisor may report AVX-512 in CPUID yet not enable its state, and then
 * AVX-512 code faults. The FMA table says how many fp32 FMA pipes a core has;
 * CPUID does not tell, so it comes from the vendors' optimization manuals by
 * family/model, and the source string says which row applied. */
#define _GNU_SOURCE
#include "dpoc/hw.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define DPOC_X86 1
#endif

/* XCR0 state components (Intel SDM vol. 1, 13.1). */
#define XCR0_SSE_AVX 0x6ull        /* XMM + YMM */
#define XCR0_AVX512 0xe0ull        /* opmask + ZMM_Hi256 + Hi16_ZMM */
#define XCR0_AMX 0x60000ull        /* XTILECFG + XTILEDATA */
#define KHZ_PER_GHZ 1e6
#define MHZ_PER_GHZ 1e3

static const char *const feature_names[DPOC_CPU_FEATURE_COUNT] = {
    "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"};

#ifdef DPOC_X86
static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static void detect_x86(dpoc_cpu *c) {
    unsigned a, b, cx, d;
    if (!__get_cpuid(0, &a, &b, &cx, &d)) return;
    const unsigned max_leaf = a;
    memcpy(c->vendor_id, &b, 4);
    memcpy(c->vendor_id + 4, &d, 4);
    memcpy(c->vendor_id + 8, &cx, 4);
    c->vendor_id[12] = 0;
    c->vendor = !strcmp(c->vendor_id, "GenuineIntel") ? DPOC_VENDOR_INTEL
                : !strcmp(c->vendor_id, "AuthenticAMD") ? DPOC_VENDOR_AMD
                                                         : DPOC_VENDOR_OTHER;
    __get_cpuid(1, &a, &b, &cx, &d);
    unsigned family = (a >> 8) & 0xf, model = (a >> 4) & 0xf;
    if (family == 0xf) family += (a >> 20) & 0xff;
    if (family == 0x6 || family >= 0xf) model += ((a >> 16) & 0xf) << 4;
    c->family = family;
    c->model = model;
    c->stepping = a & 0xf;
    const int osxsave = (cx >> 27) & 1;
    const unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
    const int ymm = (xcr0 & XCR0_SSE_AVX) == XCR0_SSE_AVX;
    const int zmm = ymm && (xcr0 & XCR0_AVX512) == XCR0_AVX512;
    const int tmm = (xcr0 & XCR0_AMX) == XCR0_AMX;
    unsigned f = 0;
    if (ymm && ((cx >> 28) & 1)) f |= DPOC_CPU_AVX;
    if (ymm && ((cx >> 12) & 1)) f |= DPOC_CPU_FMA;
    if (max_leaf >= 7) {
        __get_cpuid_count(7, 0, &a, &b, &cx, &d);
        const unsigned max_sub = a;
        if (ymm && ((b >> 5) & 1)) f |= DPOC_CPU_AVX2;
        if (zmm) {
            if ((b >> 16) & 1) f |= DPOC_CPU_AVX512F;
            if ((b >> 17) & 1) f |= DPOC_CPU_AVX512DQ;
            if ((b >> 28) & 1) f |= DPOC_CPU_AVX512CD;
            if ((b >> 30) & 1) f |= DPOC_CPU_AVX512BW;
            if ((b >> 31) & 1) f |= DPOC_CPU_AVX512VL;
            if ((d >> 23) & 1) f |= DPOC_CPU_AVX512_FP16;
        }
        if (tmm && ((d >> 24) & 1)) f |= DPOC_CPU_AMX_TILE;
        if (tmm && ((d >> 22) & 1)) f |= DPOC_CPU_AMX_BF16;
        if (zmm && max_sub >= 1) {
            __get_cpuid_count(7, 1, &a, &b, &cx, &d);
            if ((a >> 5) & 1) f |= DPOC_CPU_AVX512_BF16;
        }
    }
    c->features = f;
    unsigned ext_max = __get_cpuid_max(0x80000000u, NULL);
    if (ext_max >= 0x80000004u) {
        unsigned r[12];
        for (unsigned i = 0; i < 3; i++) __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
        char brand[49];
        memcpy(brand, r, 48);
        brand[48] = 0;
        const char *s = brand;
        while (*s == ' ') s++;
        snprintf(c->model_name, sizeof c->model_name, "%s", s);
        for (size_t n = strlen(c->model_name); n > 0 && c->model_name[n - 1] == ' '; n--) c->model_name[n - 1] = 0;
    }
}
#endif

/* The fp32 FMA pipes of a core, by vendor and family/model (Intel's and AMD's
 * optimization reference manuals). */
static void fma_table(dpoc_cpu *c) {
    const dpoc_isa_level isa = dpoc_cpu_isa_level(c->features);
    const unsigned m = c->model;
    c->fma_units = 2;
    c->fma_bits = 256;
    const char *src = NULL;
    if (isa == DPOC_ISA_AVX512 && c->vendor == DPOC_VENDOR_INTEL && c->family == 6) {
        c->fma_bits = 512;
        if (m == 0x55) {
            const int one = strstr(c->model_name, "Silver") || strstr(c->model_name, "Bronze") ||
                            strstr(c->model_name, "Gold 5");
            c->fma_units = one ? 1 : 2;
            src = one ? "Skylake-SP/Cascade Lake Silver, Bronze, Gold 5xxx: one 512-bit FMA unit"
                      : "Skylake-SP/Cascade Lake/Cooper Lake: two 512-bit FMA units";
        } else if (m == 0x6a || m == 0x6c || m == 0x8f || m == 0xcf || m == 0xad || m == 0xae) {
            src = "Intel server core (Ice Lake-SP, Sapphire/Emerald/Granite Rapids): two 512-bit FMA units";
        } else if (m == 0x66 || m == 0x7d || m == 0x7e || m == 0x8c || m == 0x8d || m == 0xa7) {
            c->fma_units = 1;
            src = "Intel client core with AVX-512 (Ice/Tiger/Rocket Lake): one 512-bit FMA (ports 0+1)";
        } else {
            src = "Intel AVX-512 model not in dpoc's table: two 512-bit FMA units assumed";
        }
    } else if (isa == DPOC_ISA_AVX512 && c->vendor == DPOC_VENDOR_AMD) {
        if (c->family >= 0x1a) {
            c->fma_bits = 512;
            src = "AMD Zen 5: two 512-bit FMA pipes";
        } else {
            src = "AMD Zen 4: AVX-512 on two 256-bit FMA pipes";
        }
    } else if (isa == DPOC_ISA_AVX512) {
        c->fma_bits = 512;
        src = "AVX-512 CPU not in dpoc's table: two 512-bit FMA units assumed";
    } else if (isa == DPOC_ISA_AVX2) {
        if (c->vendor == DPOC_VENDOR_AMD && (c->family < 0x17 || (c->family == 0x17 && m < 0x30))) {
            c->fma_bits = 128;
            src = "AMD Bulldozer-family / Zen 1: two 128-bit FMA pipes";
        } else {
            src = "AVX2 core (Haswell and later, Zen 2/3): two 256-bit FMA units";
        }
    } else if (isa == DPOC_ISA_AVX) {
        c->fma_units = 1;
        src = "AVX without FMA: one 256-bit multiply + one add per cycle";
    } else {
        c->fma_units = 1;
        c->fma_bits = 128;
        src = "SSE: one 128-bit multiply + one add per cycle";
    }
    snprintf(c->fma_source, sizeof c->fma_source, "%s", src);
}

static int read_first_line(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    const int ok = fgets(buf, (int)n, f) != NULL;
    fclose(f);
    return ok ? 0 : -1;
}

/* The clock: cpufreq's maximum (turbo included) when the kernel exposes it,
 * else the brand string's "@ 2.30GHz" (the base clock), else /proc/cpuinfo's
 * "cpu MHz" (a virtual machine's nominal clock: turbo unknown). */
static void detect_clock(dpoc_cpu *c) {
    char line[256];
    if (!read_first_line("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", line, sizeof line)) {
        const double khz = atof(line);
        if (khz > 0) {
            c->clock_ghz = khz / KHZ_PER_GHZ;
            snprintf(c->clock_source, sizeof c->clock_source, "cpufreq cpuinfo_max_freq (turbo included)");
            return;
        }
    }
    const char *at = strstr(c->model_name, "@ ");
    if (at) {
        const double ghz = atof(at + 2);
        if (ghz > 0) {
            c->clock_ghz = ghz;
            snprintf(c->clock_source, sizeof c->clock_source, "the model name (base clock; turbo not counted)");
            return;
        }
    }
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "cpu MHz", 7)) {
            const char *colon = strchr(line, ':');
            const double mhz = colon ? atof(colon + 1) : 0.0;
            if (mhz > 0) {
                c->clock_ghz = mhz / MHZ_PER_GHZ;
                snprintf(c->clock_source, sizeof c->clock_source,
                         "/proc/cpuinfo cpu MHz (nominal; turbo not known)");
            }
            break;
        }
    }
    fclose(f);
}

void dpoc_cpu_detect(dpoc_cpu *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->vendor_id, sizeof c->vendor_id, "unknown");
    snprintf(c->model_name, sizeof c->model_name, "unknown CPU");
#ifdef DPOC_X86
    detect_x86(c);
#endif
    c->cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (c->cores < 1) c->cores = 1;
    fma_table(c);
    detect_clock(c);
}

dpoc_isa_level dpoc_cpu_isa_level(unsigned f) {
    if ((f & DPOC_CPU_AVX512_CORE) == DPOC_CPU_AVX512_CORE && (f & DPOC_CPU_AVX2) && (f & DPOC_CPU_FMA))
        return DPOC_ISA_AVX512;
    if ((f & DPOC_CPU_AVX2) && (f & DPOC_CPU_FMA)) return DPOC_ISA_AVX2;
    if (f & DPOC_CPU_AVX) return DPOC_ISA_AVX;
#ifdef DPOC_X86
    return DPOC_ISA_SSE; /* x86-64 always has SSE2 */
#else
    return DPOC_ISA_UNKNOWN;
#endif
}

const char *dpoc_isa_name(dpoc_isa_level level) {
    static const char *const names[] = {"unknown", "sse", "avx", "avx2", "avx512"};
    return (unsigned)level <= DPOC_ISA_AVX512 ? names[level] : "unknown";
}

void dpoc_cpu_feature_names(unsigned features, char *buf, size_t n) {
    size_t at = 0;
    if (n) buf[0] = 0;
    for (int i = 0; i < DPOC_CPU_FEATURE_COUNT; i++) {
        if (!(features & (1u << i))) continue;
        int w = snprintf(buf + at, at < n ? n - at : 0, "%s%s", at ? " " : "", feature_names[i]);
        if (w > 0) at += (size_t)w;
    }
}

double dpoc_cpu_flops_per_cycle(const dpoc_cpu *c) {
    return (double)c->fma_units * (double)(c->fma_bits / 32) * 2.0;
}

double dpoc_cpu_fma_limit_gflops(const dpoc_cpu *c, double cores) {
    return cores * c->clock_ghz * dpoc_cpu_flops_per_cycle(c);
}
