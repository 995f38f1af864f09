/* The `bf16` decision (see include/dpoc/precision.h). Where a CPU has fast bf16
 * (AMD Zen 4/5's VDPBF16PS on two pipes, Intel AMX) bf16 products run up to 2x
 * the fp32 rate; on Intel AVX512_BF16 without AMX, VDPBF16PS issues on one port
 * and bf16 is slower than fp32 sgemm: auto then keeps fp32. */
#include "dpoc/precision.h"

#include <stdio.h>
#include <stdlib.h>

#include "dpoc/config.h"
#include "dpoc/gemm.h"
#include "dpoc/prof.h"
#include "dpoc/runtime.h"

#define TIMING_REPEATS 3

static double time_products(dpoc_gemm_precision p, size_t rows, size_t C, size_t OC, const float *x,
                            const float *w, const float *dy, float *y, float *dx, float *dw) {
    double best = 0.0;
    for (int r = 0; r <= TIMING_REPEATS; r++) { /* r == 0 warms up (primitives, scratch) */
        const double t0 = dpoc_prof_clock();
        dpoc_gemm(p, 0, 1, rows, OC, C, 1.0f, x, C, w, C, 0.0f, y, OC);
        dpoc_gemm(p, 0, 0, rows, C, OC, 1.0f, dy, OC, w, C, 1.0f, dx, C);
        dpoc_gemm(p, 1, 0, OC, C, rows, 1.0f, dy, OC, x, C, 1.0f, dw, C);
        const double dt = dpoc_prof_clock() - t0;
        if (r > 0 && (best == 0.0 || dt < best)) best = dt;
    }
    return best;
}

int dpoc_precision_time(size_t rows, size_t C, size_t OC, dpoc_precision_timing *t, dpoc_err *err) {
    const size_t nx = rows * C, nw = OC * C, ny = rows * OC;
    float *buf = dpoc_calloc(2 * nx + 2 * nw + 2 * ny, sizeof(float), "bf16 auto timing", err);
    if (!buf) return DPOC_ENOMEM;
    float *x = buf, *dx = x + nx, *w = dx + nx, *dw = w + nw, *y = dw + nw, *dy = y + ny;
    for (size_t i = 0; i < nx; i++) x[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < nw; i++) w[i] = (float)((i * 104729) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < ny; i++) dy[i] = (float)((i * 15485863) % 1000) * 1e-3f - 0.5f;
    t->fp32_s = time_products(DPOC_GEMM_FP32, rows, C, OC, x, w, dy, y, dx, dw);
    /* training reads the weight from its bf16 copy (dpoc_gemm_shadow_add): time it so */
    int rc = dpoc_gemm_shadow_add(w, nw, err);
    if (!rc) {
        t->bf16_s = time_products(DPOC_GEMM_BF16, rows, C, OC, x, w, dy, y, dx, dw);
        dpoc_gemm_shadow_remove(w);
    }
    free(buf);
    return rc;
}

void dpoc_precision_apply(int setting, const dpoc_precision_timing *t) {
    dpoc_runtime *r = dpoc_rt();
    const char *impl = dpoc_gemm_bf16_available() ? "oneDNN" : "the exact fp32 fallback (no fast bf16 matmul here)";
    if (setting == DPOC_BF16_TRUE) {
        r->precision = DPOC_PRECISION_BF16;
        snprintf(r->precision_why, sizeof r->precision_why, "bf16 true (bf16 products on %s)", impl);
    } else if (setting == DPOC_BF16_AUTO && t) {
        const int bf16 = t->bf16_s * (1.0 + DPOC_BF16_AUTO_MARGIN) < t->fp32_s;
        r->precision = bf16 ? DPOC_PRECISION_BF16 : DPOC_PRECISION_FP32;
        snprintf(r->precision_why, sizeof r->precision_why,
                 "bf16 auto: the model's products took %.1f ms in bf16 (%s) vs %.1f ms in fp32: %s", t->bf16_s * 1e3,
                 impl, t->fp32_s * 1e3, bf16 ? "bf16 is faster" : "fp32 kept (bf16 not faster by 5%)");
    } else {
        r->precision = DPOC_PRECISION_FP32;
        snprintf(r->precision_why, sizeof r->precision_why, "bf16 false");
    }
}
