/* Non-finite values: finding the first NaN or Inf in a model's weights, in a
 * block laid out as its trainable tensors (a gradient, an optimizer moment), or
 * in a forward's outputs, and naming the tensor it is in. A training step that
 * goes non-finite stops with that name instead of writing a checkpoint of it;
 * the tests inject such values (DPOC_TEST_INJECT) to prove it. */
#ifndef DPOC_FINITE_H
#define DPOC_FINITE_H
#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/model.h"

/* Index of the first NaN or Inf of x (n values), or n when all are finite. */
size_t dpoc_find_nonfinite(const float *x, size_t n);

/* The first non-finite value of block[lo, hi), block laid out as m's trainable
 * tensors (offsets of the size table): 1 with its table row and its element
 * within the tensor, 0 when every value is finite. */
int dpoc_model_find_nonfinite(const dpoc_model *m, const float *block, size_t lo, size_t hi, size_t *row,
                              size_t *elem);

/* DPOC_EINPUT "<what> <tensor> is not finite (nan at element i of n)" when
 * block[lo, hi) holds a NaN or an Inf; what says whose values they are ("the
 * gradient of", "the optimizer's exp_avg of"). */
int dpoc_model_check_finite(const dpoc_model *m, const float *block, size_t lo, size_t hi, const char *what,
                            dpoc_err *err);

/* Every weight m holds: the trainable block, the frozen base of a model with
 * adapters, and kept F32 / F16 / BF16 tensors (quantized ones are blocks of
 * scaled integers: a bad scale shows in the forward, see dpoc_act_watch).
 * DPOC_EINPUT naming source (a file, "the policy") and the tensor. */
int dpoc_model_check_weights(const dpoc_model *m, const char *source, dpoc_err *err);

/* A forward sees each output it computes (dpoc_acts.watch; names as in model.h). */
void dpoc_act_watch_see(dpoc_act_watch *w, const char *name, float *x, size_t n);
#endif
