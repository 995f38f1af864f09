/* Transformer layer kernels, each a forward/backward pair on ONE sequence of
 * T tokens (no batch dimension, no padding: every sequence at its own length).
 * Shapes in comments are row-major. Every backward ACCUMULATES (+=) into its
 * gradient outputs, which the caller zeroes; a NULL gradient pointer means
 * "not needed" (frozen weight or an input that needs no gradient).
 * The large products go through OpenBLAS cblas_sgemm; RMSNorm, RoPE, SwiGLU and
 * attention have AVX2 and AVX-512 versions chosen at run time (see the end). */
#ifndef DPOC_LAYERS_H
#define DPOC_LAYERS_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/dtype.h"
#include "dpoc/err.h"

/* out is (T,C), wte is (V,C), tokens is (T) */
void embedding_forward(float *out, const int32_t *tokens, const float *wte, size_t T, size_t C);
/* dwte is (V,C) */
void embedding_backward(float *dwte, const float *dout, const int32_t *tokens, size_t T, size_t C);

/* Llama RMSNorm as Hugging Face computes it in fp32:
 * out = weight * (x * rsqrt(mean(x^2) + eps)); rstd (T) is saved for backward. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, size_t T, size_t C,
                     float eps);
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                      const float *weight, const float *rstd, size_t T, size_t C);

/* An offset into a parameter block that is not there (no bias, no such tensor). */
#define DPOC_NO_PARAM ((size_t)-1)

/* A parameter as a layer reads it: its values, and where its gradient goes in
 * the gradient block (the flat block of the trainable parameters' gradients),
 * or DPOC_NO_PARAM when it is frozen. */
typedef struct {
    const float *v;
    size_t g;
} dpoc_param_ref;

/* Where r's gradient is in the gradient block G, or NULL (frozen, or no G). */
static inline float *dpoc_param_grad(const dpoc_param_ref *r, float *G) {
    return G && r->g != DPOC_NO_PARAM ? G + r->g : NULL;
}

/* One linear layer (nn.Linear) as the model holds it: y (T,out) = x (T,in) W^T + b,
 * W (out,in) row-major. Every projection of the decoder, in training and in
 * generation, goes through linear_forward / linear_backward: a weight's storage
 * type (fp32 today; a frozen bf16 or GGUF block type next) and an adapter
 * change these two functions, not the call sites. */
/* A LoRA adapter on a linear layer (peft's LoraLayer): the layer computes
 * W x + b + scale * B (A x). A (r, in) and B (out, r) are trainable, in the
 * parameter block; r = 0: no adapter. on = 0 computes the base layer alone
 * (peft's disable_adapter(): the reference model). */
typedef struct {
    size_t r;
    float scale; /* alpha / r, or alpha / sqrt(r) (rsLoRA) */
    const float *A, *B;
    size_t gA, gB; /* their gradients in the gradient block */
    int on;
} dpoc_adapter;

typedef struct {
    size_t in, out;
    dpoc_dtype wtype;  /* W's storage: DPOC_DT_F32 is the only one computed with so far */
    const void *w;     /* W, out rows of in values stored as wtype */
    const float *bias; /* (out) or NULL */
    size_t gw, gb;     /* W's and the bias's gradients in the gradient block; DPOC_NO_PARAM: frozen or absent */
    dpoc_adapter lora;
    /* W stored other than fp32 (a kept GGUF block type, F16, BF16): it is dequantized
     * in chunks of whole rows into deq (deq_n floats, at least one row) for each product */
    float *deq;
    size_t deq_n;
    struct dpoc_pool *pool; /* threads that share the dequantizing (core/pool.h), or NULL */
} dpoc_linear;

/* Floats of workspace linear_forward / linear_backward need for T rows: 2 T r
 * with an adapter that is on, else 0 (ws may then be NULL). */
size_t linear_workspace(const dpoc_linear *L, size_t T);
/* out (T, L->out) = inp (T, L->in) @ W^T + b (+ the adapter). Overwrites out. */
void linear_forward(const dpoc_linear *L, float *out, const float *inp, size_t T, float *ws);
/* dinp (T, in) += dout (T, out) @ W (+ through the adapter), unless dinp is NULL;
 * with a gradient block G (not NULL), dW += dout^T @ inp, db += column sums of
 * dout, dA and dB += theirs, for those not frozen. */
void linear_backward(const dpoc_linear *L, float *G, float *dinp, const float *dout, const float *inp, size_t T,
                     float *ws);

/* out (T,OC) = inp (T,C) @ weight(OC,C)^T + bias(OC); bias may be NULL. Overwrites out. */
void matmul_forward(float *out, const float *inp, const float *weight, const float *bias, size_t T,
                    size_t C, size_t OC);
/* dinp (T,C) += dout @ weight; dweight (OC,C) += dout^T @ inp; dbias (OC) += colsum(dout). */
void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, size_t T, size_t C, size_t OC);

/* Rotary embedding tables in Hugging Face's layout: inv_freq[i] = 1/theta^(2i/hd) (fp32),
 * angle = pos * inv_freq[i] (fp32 product), cos/sin (T, hd/2) for positions 0..T-1. */
void rope_tables(float *cos_t, float *sin_t, size_t T, size_t hd, float theta);
/* In place on x (T, nh, hd), half-split layout ("rotate_half"): for i < hd/2,
 * x1 = x[i], x2 = x[i+hd/2]: x[i] = x1*cos - x2*sin, x[i+hd/2] = x2*cos + x1*sin. */
void rope_forward(float *x, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd);
/* In place on dx (T, nh, hd): the transpose rotation. */
void rope_backward(float *dx, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd);

/* Causal grouped-query attention. q (T, nh, hd), k and v (T, nkv, hd); head h uses
 * kv head h / (nh/nkv). scale = 1/sqrt(hd). out (T, nh, hd). No (nh,T,T)
 * probability matrix is kept: the forward writes lse (nh, T), the logsumexp of
 * each row's scaled scores, and the backward recomputes the probabilities from
 * it (P = exp(score - lse)) with D = rowsum(dout * out): it needs the forward's
 * out and lse. */
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, size_t T,
                       size_t nh, size_t nkv, size_t hd);
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                        const float *k, const float *v, const float *out, const float *lse, size_t T,
                        size_t nh, size_t nkv, size_t hd);

/* The same attention for Tq query rows that follow a prefix of Tpre positions
 * whose keys and values are a separate array: query row t (position Tpre + t)
 * sees all prefix keys kp, vp (Tpre, nkv, hd) and its own keys k, v (Tq, nkv, hd)
 * 0..t. It equals the last Tq rows of attention_forward on the concatenation
 * [kp; k], [vp; v] (to rounding), without the concatenation: one prompt's K/V
 * serve two completions (dpoc_model_forward_shared). q, out (Tq, nh, hd), lse
 * (nh, Tq). Tpre = 0 (kp, vp may then be NULL) is attention_forward.
 * The backward accumulates into dq, dkp, dvp (Tpre, nkv, hd), dk, dv (Tq, nkv,
 * hd); any may be NULL. dkp/dvp may be parts of the same arrays as dk/dv as long
 * as the rows do not overlap. */
void attention_prefix_forward(float *out, float *lse, const float *q, const float *kp, const float *vp,
                              size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh, size_t nkv,
                              size_t hd);
void attention_prefix_backward(float *dq, float *dkp, float *dvp, float *dk, float *dv, const float *dout,
                               const float *q, const float *kp, const float *vp, size_t Tpre, const float *k,
                               const float *v, const float *out, const float *lse, size_t Tq, size_t nh,
                               size_t nkv, size_t hd);

/* SwiGLU: out (N) = silu(gate) * up, silu(x) = x * sigmoid(x). N = T * intermediate. */
void swiglu_forward(float *out, const float *gate, const float *up, size_t N);
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                     size_t N);

/* Log-prob head over R rows (only the positions whose next token is a label):
 * h (R,C) final-normed hidden states, w (V,C) the LM head, labels (R).
 * logits = h @ w^T computed in vocabulary chunks of at most LMHEAD_CHUNK columns,
 * never the whole (R,V) matrix. Per row it writes:
 *   logp[r]   = logits[label] - logsumexp(logits)
 *   lse[r]    = logsumexp(logits)                (kept for backward)
 * and, when the pointer is not NULL (metrics; no gradient flows through them):
 *   entropy[r]          = -sum p log p
 *   mean_logit[r]       = mean over V of logits
 *   log_sum_sq_probs[r] = log(sum p^2)           (WPO weighting)
 *   is_top1[r]          = 1 if argmax(logits) == label, argmax being the first
 *                         maximal index as torch.argmax returns it */
#define LMHEAD_CHUNK 4096
typedef struct {
    float *logp;
    float *lse;
    float *entropy;
    float *mean_logit;
    float *log_sum_sq_probs;
    uint8_t *is_top1;
} lmhead_out;
/* scratch: at least R * min(V, LMHEAD_CHUNK) floats. */
void lmhead_forward(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R,
                    size_t C, size_t V, float *scratch);
/* Given dlogp (R) = dLoss/dlogp: dlogits = dlogp * (onehot(label) - softmax), recomputed per chunk.
 * dh (R,C) += dlogits @ w; dw (V,C) += dlogits^T @ h. */
void lmhead_backward(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                     const int32_t *labels, const float *lse, size_t R, size_t C, size_t V,
                     float *scratch);

/* The same over a head held as a dpoc_linear view (V = head->out, C = head->in),
 * whatever its storage: a kept head is dequantized chunk by chunk. */
void lmhead_forward_linear(lmhead_out *o, const float *h, const dpoc_linear *head, const int32_t *labels, size_t R,
                           float *scratch);
void lmhead_backward_linear(float *dh, float *dw, const float *dlogp, const float *h, const dpoc_linear *head,
                            const int32_t *labels, const float *lse, size_t R, float *scratch);

/* SIMD level of rmsnorm_*, rope_*, swiglu_*, attention_*, the pointwise part of
 * lmhead_* and the AdamW step.
 * The level is chosen once, at the first kernel call: the environment variable
 * DPOC_SIMD (scalar, avx2 or avx512) when set and supported, else the best the
 * CPU has (AVX-512 F/BW/DQ/VL, else AVX2+FMA, else the portable scalar code).
 * All levels agree to within rounding (tests/unit/test_kernels.c). */
typedef enum { DPOC_SIMD_SCALAR = 0, DPOC_SIMD_AVX2 = 1, DPOC_SIMD_AVX512 = 2 } dpoc_simd_level;
#define DPOC_SIMD_LEVELS 3

dpoc_simd_level dpoc_kernels_level(void);
const char *dpoc_simd_name(dpoc_simd_level level);
/* 1 when this build and this CPU can run the level. */
int dpoc_kernels_supported(dpoc_simd_level level);
/* Switches every later kernel call to level (tests, benchmarks); DPOC_EINPUT when
 * unsupported. Not thread-safe: call it while no other thread runs kernels. */
int dpoc_kernels_force(dpoc_simd_level level, dpoc_err *err);

#endif
