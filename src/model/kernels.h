/* Internal: the SIMD levels of the element-wise and attention kernels and the
 * one dispatch table that layers.h's rmsnorm/rope/swiglu/attention functions,
 * the LM head's per-chunk pointwise loops and the AdamW step go through.
 *
 * Every kernel exists as a portable scalar twin (kernels_scalar.c: the plain
 * loops that define the semantics, the reference of the tests and the only
 * level off x86-64) and, on x86-64, as an AVX2+FMA and an AVX-512 version
 * (kernels_avx2.c, kernels_avx512.c), each compiled with a per-function target
 * attribute so the library itself still runs on any x86-64; which one runs is
 * decided once, at the first call, from the CPU (kernels_dispatch.c).
 *
 * Attention on the SIMD levels is computed in tiles (kernels_attention.c): the
 * score tiles go through cblas_sgemm and only the per-row softmax statistics
 * (the logsumexp, (nh,T)) are kept between forward and backward. Every level
 * also has the prefix form (query rows after a fully visible prefix whose K/V
 * are a separate array: a prompt shared by two completions). */
#ifndef DPOC_MODEL_KERNELS_H
#define DPOC_MODEL_KERNELS_H

#include <stddef.h>

#include "dpoc/layers.h"

/* The per-step constants of one AdamW range (see dpoc_adamw_step). */
typedef struct {
    float grad_scale;   /* the gradient clipping factor (1: none), applied as g = grads[i] * grad_scale */
    float decay;        /* 1 - lr * weight_decay, or 1 for a range without decay */
    float one_minus_b1; /* 1 - beta1 */
    float b2;           /* beta2 */
    float one_minus_b2; /* 1 - beta2 */
    float step_size;    /* lr / (1 - beta1^step) */
    float bc2_sqrt;     /* sqrt(1 - beta2^step) */
    float eps;
} dpoc_adamw_coeffs;

/* The softmax statistics of one row of LM-head logits l (n), one vocabulary
 * chunk of it (lmhead_forward in layers.c merges the chunks of a row). With
 * e = exp(l - max), all relative to the chunk's own max so that no e overflows: */
typedef struct {
    float max;         /* largest logit; -inf when no logit is larger than -inf (NaN never counts) */
    size_t argmax;     /* first index holding max (torch.argmax), 0 when max is -inf */
    double sum_logits; /* sum l */
    double sum_exp;    /* s = sum e */
    double sum_exp_d;  /* a = sum e (l - max) */
    double sum_exp_sq; /* q = sum e^2 */
} dpoc_lmhead_chunk_stats;

/* One level's kernels; the arguments are those of the same-named functions in
 * layers.h. adamw_update does, for i < n (torch.optim.AdamW, foreach=False),
 * with g = grads[i] * grad_scale (clip_grad_norm_'s in-place scaling, fused):
 *   p *= decay; m += (g - m) * (1 - b1); v = v * b2 + (1 - b2) * g * g;
 *   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps) */
typedef struct {
    dpoc_simd_level level;
    void (*rmsnorm_forward)(float *out, float *rstd, const float *inp, const float *weight, size_t T, size_t C,
                            float eps);
    void (*rmsnorm_backward)(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                             const float *rstd, size_t T, size_t C);
    void (*rope_forward)(float *x, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd);
    void (*rope_backward)(float *dx, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd);
    void (*swiglu_forward)(float *out, const float *gate, const float *up, size_t N);
    void (*swiglu_backward)(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                            size_t N);
    void (*attention_forward)(float *out, float *lse, const float *q, const float *k, const float *v, size_t T,
                              size_t nh, size_t nkv, size_t hd);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, size_t T, size_t nh, size_t nkv,
                               size_t hd);
    /* attention_forward/backward are these with Tpre = 0 */
    void (*attention_prefix_forward)(float *out, float *lse, const float *q, const float *kp, const float *vp,
                                     size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh, size_t nkv,
                                     size_t hd);
    void (*attention_prefix_backward)(float *dq, float *dkp, float *dvp, float *dk, float *dv, const float *dout,
                                      const float *q, const float *kp, const float *vp, size_t Tpre, const float *k,
                                      const float *v, const float *out, const float *lse, size_t Tq, size_t nh,
                                      size_t nkv, size_t hd);
    void (*adamw_update)(float *params, const float *grads, float *m, float *v, size_t n,
                         const dpoc_adamw_coeffs *c);
    /* The pointwise part of the LM head, one row of a vocabulary chunk l (n) at a
     * time: its statistics (above), and, in the backward, l[j] = -g exp(l[j] - lse)
     * in place (dlogits without the label's one-hot term). */
    void (*lmhead_chunk_stats)(dpoc_lmhead_chunk_stats *st, const float *l, size_t n);
    void (*lmhead_chunk_dlogits)(float *l, size_t n, float g, float lse);
    /* sum of x[i]^2 in double (the gradient norm); the twin adds in index order */
    double (*sum_squares)(const float *x, size_t n);
} dpoc_kernel_table;

extern const dpoc_kernel_table dpoc_kernels_scalar;
#if defined(__x86_64__)
extern const dpoc_kernel_table dpoc_kernels_avx2;
extern const dpoc_kernel_table dpoc_kernels_avx512;
#endif

/* The active table (chosen at the first call; see dpoc_kernels_force). */
const dpoc_kernel_table *dpoc_kernels(void);
/* The table of a level, or NULL when this build or this CPU lacks it. */
const dpoc_kernel_table *dpoc_kernels_for(dpoc_simd_level level);
/* "scalar", "avx2", "avx512" -> level; returns 0, or -1 for anything else. */
int dpoc_simd_parse(const char *name, dpoc_simd_level *level);

/* ---- the blocked attention of the SIMD levels (kernels_attention.c) ---- */

/* Row operations on a score tile row, supplied by each SIMD level. */
typedef struct {
    float (*max)(const float *x, size_t n);
    /* x[0:n) = exp(x - m) and x[n:width) = 0; returns the sum of x[0:n) */
    float (*exp_sum)(float *x, size_t n, size_t width, float m);
    void (*scale)(float *x, size_t n, float a); /* x *= a */
    float (*dot)(const float *a, const float *b, size_t n);
    /* p[0:n) = p * (dp - D): the softmax backward of one row */
    void (*dsoftmax)(float *p, const float *dp, size_t n, float D);
} dpoc_attn_rowops;

/* The attention_prefix_* of layers.h (plain causal attention with Tpre = 0, kp = vp = NULL). */
void attention_forward_blocked(const dpoc_attn_rowops *ops, float *out, float *lse, const float *q, const float *kp,
                               const float *vp, size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh,
                               size_t nkv, size_t hd);
void attention_backward_blocked(const dpoc_attn_rowops *ops, float *dq, float *dkp, float *dvp, float *dk, float *dv,
                                const float *dout, const float *q, const float *kp, const float *vp, size_t Tpre,
                                const float *k, const float *v, const float *out, const float *lse, size_t Tq,
                                size_t nh, size_t nkv, size_t hd);

#endif
