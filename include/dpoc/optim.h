/* AdamW as torch.optim.AdamW (decoupled weight decay, bias correction), the HF
 * learning-rate schedules and gradient-norm clipping as
 * torch.nn.utils.clip_grad_norm_, all over the flat parameter/gradient blocks. */
#ifndef DPOC_OPTIM_H
#define DPOC_OPTIM_H

#include <stddef.h>

#include "dpoc/config.h"
#include "dpoc/err.h"

/* A contiguous run of parameters that shares one weight-decay setting. */
typedef struct {
    size_t offset, count;
    int decay;
} dpoc_decay_range;

typedef struct {
    size_t n;
    size_t lo, hi; /* the slice of the parameters this optimizer updates ([0, n) but with ZeRO) */
    float *m, *v; /* first and second moments of [lo, hi): m[i] belongs to parameter lo + i */
    dpoc_decay_range *ranges; /* cover [0, n) in order */
    size_t n_ranges;
    long step;    /* optimizer steps taken */
    double beta1, beta2, eps, weight_decay;
} dpoc_adamw;

/* decay[i] says whether tensor i (offset[i], count[i], in flat order) gets weight
 * decay; transformers exempts biases and normalization weights. */
int dpoc_adamw_init(dpoc_adamw *o, size_t n, const dpoc_config *c, size_t n_tensors, const size_t *offset,
                    const size_t *count, const int *decay, dpoc_err *err);
/* The same for the slice [lo, hi) of the n parameters only (ZeRO, dpoc/shard.h):
 * moments for hi - lo floats; decay ranges still tile [0, n). */
int dpoc_adamw_init_range(dpoc_adamw *o, size_t n, size_t lo, size_t hi, const dpoc_config *c, size_t n_tensors,
                          const size_t *offset, const size_t *count, const int *decay, dpoc_err *err);
void dpoc_adamw_free(dpoc_adamw *o);
/* One step at learning rate lr on params[lo, hi) (params is the whole block;
 * grads[i] is parameter lo + i's gradient): params -= ... using grads * grad_scale (the
 * clipping factor of dpoc_clip_coef, fused: the same floats as clipping the
 * block in place first, without another pass over it). When params has a bf16
 * copy registered for the products (dpoc_gemm_shadow_add), it is kept current. */
void dpoc_adamw_step(dpoc_adamw *o, float *params, const float *grads, float grad_scale, double lr);

/* L2 norm of the whole gradient block (accumulated in double). */
double dpoc_grad_norm(const float *grads, size_t n);
/* clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)) as a float (1: no clipping). */
float dpoc_clip_coef(double norm, double max_norm);
/* clip_grad_norm_: scales grads by dpoc_clip_coef in place. */
void dpoc_clip_grads(float *grads, size_t n, double norm, double max_norm);

/* Warm-up steps as transformers computes them for num_training_steps. */
long dpoc_warmup_steps(const dpoc_config *c, long num_training_steps);
/* Learning rate multiplier (HF lr_lambda) at optimizer step `step` (0-based). */
double dpoc_lr_lambda(const dpoc_config *c, long step, long warmup, long total);

#endif
