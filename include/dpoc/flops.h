/* The floating-point operations a computation needs (multiply and add counted
 * as 2), for GFLOP/s and MFU in `dpoc bench`. Counted from the work itself, not
 * from how it is done: a shared prompt counts once, recomputation not at all. */
#ifndef DPOC_FLOPS_H
#define DPOC_FLOPS_H

#include <stddef.h>

#include "dpoc/model.h"

/* Forward of `rows` token rows through the decoder, `attn_pairs` (query, key)
 * pairs of causal attention summed over the sequences, and `head_rows` rows
 * through the LM head (only the scored ones). */
double dpoc_flops_forward(const dpoc_model_config *c, size_t rows, size_t attn_pairs, size_t head_rows);
/* (query, key) pairs of a causal sequence of T tokens: T(T+1)/2. */
size_t dpoc_flops_causal_pairs(size_t T);
/* Forward + backward: backward needs two products per forward product (the
 * input's gradient and the weight's), so 3x the forward. */
#define DPOC_FLOPS_TRAIN_FACTOR 3.0
/* A frozen product needs only its input's gradient: 2x its forward. */
#define DPOC_FLOPS_FROZEN_TRAIN_FACTOR 2.0

/* One forward's FLOPs by part: total = dpoc_flops_forward (the base model), attn
 * its attention share, adapter the LoRA adapters' products over the rows. */
typedef struct {
    double total, attn, adapter;
} dpoc_fwd_flops;
dpoc_fwd_flops dpoc_flops_forward_parts(const dpoc_model *m, size_t rows, size_t attn_pairs, size_t head_rows);
/* The training FLOPs of a forward: with every weight trained 3x; with a frozen
 * base (LoRA) 2x its projections and head, 3x attention and the adapters. */
double dpoc_flops_train(const dpoc_fwd_flops *f, int frozen_base);

#endif
