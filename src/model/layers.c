/* Transformer layer kernels (Llama / Qwen2, fp32), one forward/backward pair per
 * layer in the style of karpathy/llm.c. The semantics follow Hugging Face
 * transformers' modeling_llama.py in fp32 (RMSNorm, rotate_half RoPE, eager
 * causal GQA attention, SwiGLU MLP); see include/dpoc/layers.h for the API.
 *
 * Conventions:
 *  - shapes are row-major and given in a comment above each function;
 *  - every backward ACCUMULATES (+=) into its gradient outputs; a NULL gradient
 *    pointer means "not needed";
 *  - outputs never alias inputs (the pointers are restrict-qualified), except
 *    the in-place RoPE;
 *  - the linear layers' and the LM head's products go through dpoc_gemm in the
 *    process's precision (dpoc/runtime.h: fp32 = cblas_sgemm bit for bit, or
 *    bf16 operands with fp32 accumulation, the `bf16` config key); long reductions
 *    (RMS mean, softmax and logsumexp sums) accumulate in double and round once;
 *  - RMSNorm, RoPE, attention, SwiGLU and the LM head's per-chunk pointwise
 *    work are dispatched to a scalar, AVX2 or AVX-512 implementation chosen at
 *    run time (src/model/kernels*.c); this file keeps the embedding, the linear
 *    layers, the RoPE tables and the LM head's chunking, sgemms and merging.
 * Callers guarantee the shape invariants (hd even, nh a multiple of nkv, token
 * ids and labels in [0, V)); they are checked with assert() in debug builds. */
#include "dpoc/layers.h"

#include <assert.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "core/pool.h"
#include "dpoc/gemm.h"
#include "dpoc/gguf.h"
#include "dpoc/runtime.h"
#include "model/kernels.h"

/* Rows of the LM head processed together in the forward: the online-logsumexp
 * state of a block lives on the stack (no allocation in a void kernel), and each
 * block streams the whole head weight once, so larger blocks mean fewer passes
 * over w. */
#define LMHEAD_ROW_BLOCK 256

/* The LM head with an explicit vocabulary chunk width. lmhead_forward/backward
 * call these with LMHEAD_CHUNK; the unit tests call them with small chunks to
 * exercise the cross-chunk logic. scratch: at least R * min(V, chunk) floats. */
void lmhead_forward_chunked(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R,
                            size_t C, size_t V, float *scratch, size_t chunk);
void lmhead_backward_chunked(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                             const int32_t *labels, const float *lse, size_t R, size_t C, size_t V,
                             float *scratch, size_t chunk);

/* A linear-layer product, row-major (dpoc/gemm.h), in the run's precision. */
static void linear_gemm(int ta, int tb, size_t M, size_t N, size_t K, const float *A, size_t lda, const float *B,
                        size_t ldb, float beta, float *C, size_t ldc) {
    const dpoc_gemm_precision p = dpoc_rt()->precision == DPOC_PRECISION_BF16 ? DPOC_GEMM_BF16 : DPOC_GEMM_FP32;
    dpoc_gemm(p, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

/* The same with a scale on the product: C = alpha * op(A) op(B) + beta * C. */
static void linear_gemm_scaled(int ta, int tb, size_t M, size_t N, size_t K, float alpha, const float *A, size_t lda,
                               const float *B, size_t ldb, float beta, float *C, size_t ldc) {
    const dpoc_gemm_precision p = dpoc_rt()->precision == DPOC_PRECISION_BF16 ? DPOC_GEMM_BF16 : DPOC_GEMM_FP32;
    dpoc_gemm(p, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------------ */
/* Embedding */

/* out (T,C) = wte[tokens] with wte (V,C), tokens (T) */
void embedding_forward(float *restrict out, const int32_t *restrict tokens, const float *restrict wte, size_t T,
                       size_t C) {
    for (size_t t = 0; t < T; t++) {
        assert(tokens[t] >= 0);
        memcpy(out + t * C, wte + (size_t)tokens[t] * C, C * sizeof *out);
    }
}

/* dwte (V,C) += scatter of dout (T,C) at tokens (T); repeated tokens accumulate */
void embedding_backward(float *restrict dwte, const float *restrict dout, const int32_t *restrict tokens,
                        size_t T, size_t C) {
    if (!dwte) return;
    for (size_t t = 0; t < T; t++) {
        assert(tokens[t] >= 0);
        float *restrict row = dwte + (size_t)tokens[t] * C;
        const float *restrict d = dout + t * C;
        for (size_t i = 0; i < C; i++) row[i] += d[i];
    }
}

/* ------------------------------------------------------------------------ */
/* RMSNorm (LlamaRMSNorm / Qwen2RMSNorm) */

/* out (T,C), rstd (T), inp (T,C), weight (C); see layers.h and kernels_scalar.c. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, size_t T, size_t C, float eps) {
    dpoc_kernels()->rmsnorm_forward(out, rstd, inp, weight, T, C, eps);
}

/* dinp (T,C) += ..., dweight (C) += ... */
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp, const float *weight,
                      const float *rstd, size_t T, size_t C) {
    dpoc_kernels()->rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, T, C);
}

/* ------------------------------------------------------------------------ */
/* Linear layer (nn.Linear: y = x W^T + b) */

/* out (T,OC) = inp (T,C) @ weight (OC,C)^T + bias (OC); bias may be NULL.
 * As torch.addmm: out is filled with the bias, then the product is added. */
void matmul_forward(float *restrict out, const float *restrict inp, const float *restrict weight,
                    const float *restrict bias, size_t T, size_t C, size_t OC) {
    if (T == 0 || OC == 0) return;
    for (size_t t = 0; t < T; t++) {
        float *restrict o = out + t * OC;
        if (bias) memcpy(o, bias, OC * sizeof *o);
        else memset(o, 0, OC * sizeof *o);
    }
    if (C == 0) return;
    linear_gemm(0, 1, T, OC, C, inp, C, weight, C, 1.0f, out, OC);
}

static int adapter_on(const dpoc_linear *L) { return L->lora.r > 0 && L->lora.on; }

size_t linear_workspace(const dpoc_linear *L, size_t T) { return adapter_on(L) ? 2 * T * L->lora.r : 0; }

/* Rows [r0, r0 + n) of a weight stored as L->wtype, as fp32: a pointer into W
 * itself, or into L->deq after dequantizing them (n * in <= deq_n). */
typedef struct {
    const dpoc_linear *L;
    size_t r0, n;
} dequant_job;

/* Rows of the job's part (a contiguous share of its rows) into L->deq. */
static void dequant_part(void *ctx, size_t part, size_t n_parts) {
    const dequant_job *j = ctx;
    const dpoc_linear *L = j->L;
    const size_t a = j->n * part / n_parts, b = j->n * (part + 1) / n_parts;
    if (a == b) return;
    const size_t rb = dpoc_dtype_row_bytes(L->wtype, L->in);
    dpoc_err ignored; /* type and sizes were checked when the model was built */
    (void)dpoc_gguf_dequantize_raw(L->wtype, (const unsigned char *)L->w + (j->r0 + a) * rb, (b - a) * rb,
                                   L->deq + a * L->in, (b - a) * L->in, &ignored);
}

/* Rows [r0, r0 + n) of a weight stored as L->wtype, as fp32: a pointer into W
 * itself, or into L->deq after dequantizing them (n * in <= deq_n), on the
 * model's threads. */
static const float *weight_rows(const dpoc_linear *L, size_t r0, size_t n) {
    if (L->wtype == DPOC_DT_F32) return (const float *)L->w + r0 * L->in;
    assert(n * L->in <= L->deq_n);
    dequant_job j = {L, r0, n};
    if (L->pool) dpoc_pool_run(L->pool, dequant_part, &j);
    else dequant_part(&j, 0, 1);
    return L->deq;
}

/* Rows of W per dequantized chunk. */
static size_t rows_per_chunk(const dpoc_linear *L) {
    const size_t n = L->deq_n / L->in;
    return n < L->out ? n : L->out;
}

/* The base product of a kept weight, chunk by chunk of its rows: out[:, o0:o1]
 * = inp @ W[o0:o1]^T (+ b) */
static void kept_forward(const dpoc_linear *L, float *out, const float *inp, size_t T) {
    for (size_t t = 0; t < T; t++) {
        if (L->bias) memcpy(out + t * L->out, L->bias, L->out * sizeof *out);
        else memset(out + t * L->out, 0, L->out * sizeof *out);
    }
    const size_t step = rows_per_chunk(L);
    for (size_t o0 = 0; o0 < L->out; o0 += step) {
        const size_t n = min_size(step, L->out - o0);
        linear_gemm(0, 1, T, n, L->in, inp, L->in, weight_rows(L, o0, n), L->in, 1.0f, out + o0, L->out);
    }
}

/* dinp (T,in) += dout[:, o0:o1] @ W[o0:o1], chunk by chunk */
static void kept_backward_input(const dpoc_linear *L, float *dinp, const float *dout, size_t T) {
    const size_t step = rows_per_chunk(L);
    for (size_t o0 = 0; o0 < L->out; o0 += step) {
        const size_t n = min_size(step, L->out - o0);
        linear_gemm(0, 0, T, L->in, n, dout + o0, L->out, weight_rows(L, o0, n), L->in, 1.0f, dinp, L->in);
    }
}

void linear_forward(const dpoc_linear *L, float *out, const float *inp, size_t T, float *ws) {
    if (L->wtype == DPOC_DT_F32) matmul_forward(out, inp, L->w, L->bias, T, L->in, L->out);
    else if (T > 0) kept_forward(L, out, inp, T);
    if (!adapter_on(L) || T == 0) return;
    /* as peft: lora_B(lora_A(x)) * scaling, added to the base layer's output */
    const dpoc_adapter *a = &L->lora;
    float *t = ws; /* (T, r) = x A^T */
    linear_gemm_scaled(0, 1, T, a->r, L->in, 1.0f, inp, L->in, a->A, L->in, 0.0f, t, a->r);
    linear_gemm_scaled(0, 1, T, L->out, a->r, a->scale, t, a->r, a->B, a->r, 1.0f, out, L->out);
}

void linear_backward(const dpoc_linear *L, float *G, float *dinp, const float *dout, const float *inp, size_t T,
                     float *ws) {
    float *dw = G && L->gw != DPOC_NO_PARAM ? G + L->gw : NULL;
    float *db = G && L->gb != DPOC_NO_PARAM ? G + L->gb : NULL;
    if (L->wtype == DPOC_DT_F32) {
        matmul_backward(dinp, dw, db, dout, inp, L->w, T, L->in, L->out);
    } else { /* a kept weight is frozen: only dX (and the bias, never trained with LoRA) */
        assert(!dw);
        if (dinp && T > 0) kept_backward_input(L, dinp, dout, T);
        if (db) matmul_backward(NULL, NULL, db, dout, inp, NULL, T, L->in, L->out);
    }
    if (!adapter_on(L) || T == 0) return;
    const dpoc_adapter *a = &L->lora;
    const size_t r = a->r, in = L->in, out = L->out;
    float *t = ws, *u = ws + T * r;
    /* t = x A^T again (cheaper to recompute than to keep per layer); with
     * g = scale * dout, the adapter's output gradient: dB += g^T t, u = g B,
     * dA += u^T x, dx += u A */
    linear_gemm_scaled(0, 1, T, r, in, 1.0f, inp, in, a->A, in, 0.0f, t, r);
    if (G && a->gB != DPOC_NO_PARAM) linear_gemm_scaled(1, 0, out, r, T, a->scale, dout, out, t, r, 1.0f, G + a->gB, r);
    linear_gemm_scaled(0, 0, T, r, out, a->scale, dout, out, a->B, r, 0.0f, u, r);
    if (G && a->gA != DPOC_NO_PARAM) linear_gemm_scaled(1, 0, r, in, T, 1.0f, u, r, inp, in, 1.0f, G + a->gA, in);
    if (dinp) linear_gemm_scaled(0, 0, T, in, r, 1.0f, u, r, a->A, in, 1.0f, dinp, in);
}

/* dinp (T,C) += dout (T,OC) @ weight (OC,C); dweight (OC,C) += dout^T @ inp (T,C);
 * dbias (OC) += column sums of dout. */
void matmul_backward(float *restrict dinp, float *restrict dweight, float *restrict dbias,
                     const float *restrict dout, const float *restrict inp, const float *restrict weight,
                     size_t T, size_t C, size_t OC) {
    if (T == 0 || OC == 0) return;
    if (dinp && C > 0) {
        linear_gemm(0, 0, T, C, OC, dout, OC, weight, C, 1.0f, dinp, C);
    }
    if (dweight && C > 0) {
        linear_gemm(1, 0, OC, C, T, dout, OC, inp, C, 1.0f, dweight, C);
    }
    if (dbias) {
        for (size_t t = 0; t < T; t++) {
            const float *restrict d = dout + t * OC;
            for (size_t o = 0; o < OC; o++) dbias[o] += d[o];
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Rotary position embedding (LlamaRotaryEmbedding, default rope type) */

/* cos_t, sin_t (T, hd/2). As Hugging Face in fp32:
 *   inv_freq[i] = 1 / theta^(float(2i) / float(hd))   (fp32 pow and division)
 *   angle       = float(t) * inv_freq[i]              (one fp32 product)
 *   cos, sin    = cosf(angle), sinf(angle)
 * (HF's emb = cat(freqs, freqs) repeats the same half, so only hd/2 are stored.) */
void rope_tables(float *restrict cos_t, float *restrict sin_t, size_t T, size_t hd, float theta) {
    assert(hd % 2 == 0);
    const size_t half = hd / 2;
    for (size_t i = 0; i < half; i++) {
        const float exponent = (float)(2 * i) / (float)hd;
        const float inv_freq = 1.0f / powf(theta, exponent);
        for (size_t t = 0; t < T; t++) {
            const float angle = (float)t * inv_freq;
            cos_t[t * half + i] = cosf(angle);
            sin_t[t * half + i] = sinf(angle);
        }
    }
}

/* x (T, nh, hd) in place; cos_t, sin_t (T, hd/2). */
void rope_forward(float *x, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd) {
    assert(hd % 2 == 0);
    dpoc_kernels()->rope_forward(x, cos_t, sin_t, T, nh, hd);
}

/* dx (T, nh, hd) in place: the transpose of the rotation. */
void rope_backward(float *dx, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd) {
    assert(hd % 2 == 0);
    dpoc_kernels()->rope_backward(dx, cos_t, sin_t, T, nh, hd);
}

/* ------------------------------------------------------------------------ */
/* Causal grouped-query attention (eager_attention_forward) */

/* out (T, nh, hd), lse (nh, T); q (T, nh, hd), k and v (T, nkv, hd). */
void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, size_t T, size_t nh,
                       size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    dpoc_kernels()->attention_forward(out, lse, q, k, v, T, nh, nkv, hd);
}

/* dq (T, nh, hd), dk and dv (T, nkv, hd) += ..., from the forward's out and lse. */
void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                        const float *v, const float *out, const float *lse, size_t T, size_t nh, size_t nkv,
                        size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    dpoc_kernels()->attention_backward(dq, dk, dv, dout, q, k, v, out, lse, T, nh, nkv, hd);
}

/* out (Tq, nh, hd), lse (nh, Tq); q (Tq, nh, hd), kp and vp (Tpre, nkv, hd), k and v (Tq, nkv, hd). */
void attention_prefix_forward(float *out, float *lse, const float *q, const float *kp, const float *vp, size_t Tpre,
                              const float *k, const float *v, size_t Tq, size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    dpoc_kernels()->attention_prefix_forward(out, lse, q, kp, vp, Tpre, k, v, Tq, nh, nkv, hd);
}

/* dq (Tq, nh, hd), dkp and dvp (Tpre, nkv, hd), dk and dv (Tq, nkv, hd) += ... */
void attention_prefix_backward(float *dq, float *dkp, float *dvp, float *dk, float *dv, const float *dout,
                               const float *q, const float *kp, const float *vp, size_t Tpre, const float *k,
                               const float *v, const float *out, const float *lse, size_t Tq, size_t nh, size_t nkv,
                               size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    dpoc_kernels()->attention_prefix_backward(dq, dkp, dvp, dk, dv, dout, q, kp, vp, Tpre, k, v, out, lse, Tq, nh, nkv,
                                              hd);
}

/* ------------------------------------------------------------------------ */
/* SwiGLU (LlamaMLP: down(silu(gate(x)) * up(x))), the elementwise part */

/* out (N) = silu(gate) * up */
void swiglu_forward(float *out, const float *gate, const float *up, size_t N) {
    dpoc_kernels()->swiglu_forward(out, gate, up, N);
}

/* dgate, dup (N) += ... */
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, size_t N) {
    dpoc_kernels()->swiglu_backward(dgate, dup, dout, gate, up, N);
}

/* ------------------------------------------------------------------------ */
/* LM head: per-row log-probability of the label and metrics, never the whole
 * (R,V) logits matrix */

/* Online softmax statistics of one row over the chunks seen so far, relative to
 * the running max m: s = sum e, a = sum e (l - m), q = sum e^2 with e = exp(l - m).
 * Then lse = m + log s, entropy = log s - a/s, log sum p^2 = log q - 2 log s. */
typedef struct {
    float max;          /* running max logit (-inf before the first chunk) */
    float label_logit;  /* logit of the label once its chunk has been seen */
    size_t argmax;      /* first index of the running max (torch.argmax semantics) */
    double sum_exp;     /* s */
    double sum_exp_d;   /* a */
    double sum_exp_sq;  /* q */
    double sum_logits;  /* for the mean logit */
} lmhead_row_state;

/* Merges the statistics of one chunk row (relative to its own max cmax) into st. */
static void lmhead_merge(lmhead_row_state *st, float cmax, double s, double a, double q) {
    if (st->sum_exp == 0.0) { /* first chunk */
        st->max = cmax;
        st->sum_exp = s;
        st->sum_exp_d = a;
        st->sum_exp_sq = q;
        return;
    }
    const float m = st->max > cmax ? st->max : cmax;
    /* rescale both sides to the common max m: e' = e f, (l - m) = (l - m_i) + (m_i - m) */
    const double d_old = (double)st->max - (double)m, d_new = (double)cmax - (double)m;
    const double f_old = exp(d_old), f_new = exp(d_new);
    st->sum_exp_d = f_old * (st->sum_exp_d + d_old * st->sum_exp) + f_new * (a + d_new * s);
    st->sum_exp = f_old * st->sum_exp + f_new * s;
    st->sum_exp_sq = f_old * f_old * st->sum_exp_sq + f_new * f_new * q;
    st->max = m;
}

/* h (R,C), w (V,C), labels (R); outputs per row in o (see layers.h).
 * Rows go in blocks of LMHEAD_ROW_BLOCK; within a block, each vocabulary chunk of
 * at most `chunk` columns is computed by one sgemm into scratch (rows, n) and folded
 * into the per-row online statistics, so one pass over the vocabulary gives the
 * logsumexp and every metric. */
static void lmhead_fwd(lmhead_out *o, const float *h, const dpoc_linear *W, const int32_t *labels, size_t R,
                       float *scratch, size_t chunk) {
    const size_t C = W->in, V = W->out;
    assert(chunk > 0 && V > 0 && C > 0);
    const dpoc_kernel_table *kt = dpoc_kernels();
    lmhead_row_state st[LMHEAD_ROW_BLOCK];
    for (size_t r0 = 0; r0 < R; r0 += LMHEAD_ROW_BLOCK) {
        const size_t rb = min_size(LMHEAD_ROW_BLOCK, R - r0);
        for (size_t r = 0; r < rb; r++) {
            st[r] = (lmhead_row_state){.max = -INFINITY, .label_logit = NAN};
            assert(labels[r0 + r] >= 0 && (size_t)labels[r0 + r] < V);
        }
        for (size_t v0 = 0; v0 < V; v0 += chunk) {
            const size_t n = min_size(chunk, V - v0);
            /* scratch (rb, n) = h[r0:r0+rb] @ w[v0:v0+n]^T */
            linear_gemm(0, 1, rb, n, C, h + r0 * C, C, weight_rows(W, v0, n), C, 0.0f, scratch, n);
            for (size_t r = 0; r < rb; r++) {
                const float *l = scratch + r * n;
                dpoc_lmhead_chunk_stats cs;
                kt->lmhead_chunk_stats(&cs, l, n);
                lmhead_row_state *rs = &st[r];
                /* chunks come in increasing index order: a later chunk takes the argmax only if strictly larger */
                if (rs->sum_exp == 0.0 || cs.max > rs->max) rs->argmax = v0 + cs.argmax;
                rs->sum_logits += cs.sum_logits;
                lmhead_merge(rs, cs.max, cs.sum_exp, cs.sum_exp_d, cs.sum_exp_sq);
                const size_t label = (size_t)labels[r0 + r];
                if (label >= v0 && label < v0 + n) rs->label_logit = l[label - v0];
            }
        }
        for (size_t r = 0; r < rb; r++) {
            const lmhead_row_state *rs = &st[r];
            const size_t row = r0 + r;
            const double log_s = log(rs->sum_exp);
            const double lse = (double)rs->max + log_s;
            o->lse[row] = (float)lse;
            o->logp[row] = (float)((double)rs->label_logit - lse);
            if (o->entropy) o->entropy[row] = (float)(log_s - rs->sum_exp_d / rs->sum_exp);
            if (o->mean_logit) o->mean_logit[row] = (float)(rs->sum_logits / (double)V);
            if (o->log_sum_sq_probs) o->log_sum_sq_probs[row] = (float)(log(rs->sum_exp_sq) - 2.0 * log_s);
            /* top-1 as TRL computes it: argmax == label, where argmax is the first
             * maximal index (a label tied with an earlier index is not top-1) */
            if (o->is_top1) o->is_top1[row] = rs->argmax == (size_t)labels[row];
        }
    }
}

/* An fp32 (V,C) weight as a view. */
static dpoc_linear fp32_view(const float *w, size_t C, size_t V) {
    return (dpoc_linear){.in = C, .out = V, .wtype = DPOC_DT_F32, .w = w, .gw = DPOC_NO_PARAM, .gb = DPOC_NO_PARAM};
}

void lmhead_forward_chunked(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R,
                            size_t C, size_t V, float *scratch, size_t chunk) {
    const dpoc_linear W = fp32_view(w, C, V);
    lmhead_fwd(o, h, &W, labels, R, scratch, chunk);
}

void lmhead_forward(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R, size_t C,
                    size_t V, float *scratch) {
    lmhead_forward_chunked(o, h, w, labels, R, C, V, scratch, LMHEAD_CHUNK);
}

void lmhead_forward_linear(lmhead_out *o, const float *h, const dpoc_linear *head, const int32_t *labels, size_t R,
                           float *scratch) {
    lmhead_fwd(o, h, head, labels, R, scratch, LMHEAD_CHUNK);
}

/* dh (R,C) += dlogits @ w, dw (V,C) += dlogits^T @ h, chunk by chunk, with
 * dlogits (R, n) = dlogp * (onehot(label) - exp(logits - lse)) recomputed into scratch. */
static void lmhead_bwd(float *dh, float *dw, const float *dlogp, const float *h, const dpoc_linear *W,
                       const int32_t *labels, const float *lse, size_t R, float *scratch, size_t chunk) {
    const size_t C = W->in, V = W->out;
    assert(chunk > 0);
    if (R == 0 || C == 0 || (!dh && !dw)) return;
    const dpoc_kernel_table *kt = dpoc_kernels();
    for (size_t v0 = 0; v0 < V; v0 += chunk) {
        const size_t n = min_size(chunk, V - v0);
        const float *w = weight_rows(W, v0, n); /* rows v0.. of the head, (n, C) */
        linear_gemm(0, 1, R, n, C, h, C, w, C, 0.0f, scratch, n);
        for (size_t r = 0; r < R; r++) {
            float *l = scratch + r * n;
            const float g = dlogp[r], m = lse[r];
            const size_t label = (size_t)labels[r];
            const int has_label = label >= v0 && label < v0 + n;
            const float p_label = has_label ? expf(l[label - v0] - m) : 0.0f;
            kt->lmhead_chunk_dlogits(l, n, g, m);
            if (has_label) l[label - v0] = g * (1.0f - p_label);
        }
        /* dh (R,C) += dlogits (R,n) @ w_chunk (n,C) */
        if (dh) {
            linear_gemm(0, 0, R, C, n, scratch, n, w, C, 1.0f, dh, C);
        }
        /* dw_chunk (n,C) += dlogits^T (n,R) @ h (R,C) */
        if (dw) {
            linear_gemm(1, 0, n, C, R, scratch, n, h, C, 1.0f, dw + v0 * C, C);
        }
    }
}

void lmhead_backward_chunked(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                             const int32_t *labels, const float *lse, size_t R, size_t C, size_t V,
                             float *scratch, size_t chunk) {
    const dpoc_linear W = fp32_view(w, C, V);
    lmhead_bwd(dh, dw, dlogp, h, &W, labels, lse, R, scratch, chunk);
}

void lmhead_backward_linear(float *dh, float *dw, const float *dlogp, const float *h, const dpoc_linear *head,
                            const int32_t *labels, const float *lse, size_t R, float *scratch) {
    lmhead_bwd(dh, dw, dlogp, h, head, labels, lse, R, scratch, LMHEAD_CHUNK);
}

void lmhead_backward(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                     const int32_t *labels, const float *lse, size_t R, size_t C, size_t V, float *scratch) {
    lmhead_backward_chunked(dh, dw, dlogp, h, w, labels, lse, R, C, V, scratch, LMHEAD_CHUNK);
}
