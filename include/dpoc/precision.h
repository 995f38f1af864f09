/* The run's matrix-product precision (dpoc_rt()->precision) from the `bf16`
 * setting: false / true as asked, auto from a measurement of both precisions on
 * the model's own linear-layer shapes (forward and both backward products).
 * Ranks must agree: the caller sums the timings over the ranks before applying. */
#ifndef DPOC_PRECISION_H
#define DPOC_PRECISION_H

#include <stddef.h>

#include "dpoc/err.h"

/* bf16 is kept by auto only when it is faster than fp32 by more than this fraction. */
#define DPOC_BF16_AUTO_MARGIN 0.05

typedef struct {
    double fp32_s, bf16_s; /* seconds for the same products */
} dpoc_precision_timing;

/* Times y = x W^T, dx = dy W and dW = dy^T x for `rows` rows of a (C -> OC)
 * layer at both precisions (after a warm-up), with the current threads. */
int dpoc_precision_time(size_t rows, size_t C, size_t OC, dpoc_precision_timing *t, dpoc_err *err);

/* Sets the precision for setting DPOC_BF16_FALSE / TRUE / AUTO (t: the summed
 * timings, used only by AUTO) and records why in the runtime context. */
void dpoc_precision_apply(int setting, const dpoc_precision_timing *t);

#endif
