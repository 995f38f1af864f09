/* The portable scalar twins of the dispatched kernels (see kernels.h): plain
 * loops that define what every SIMD level computes. They are the reference of
 * tests/unit/test_kernels.c and the level used off x86-64 (or with
 * DPOC_SIMD=scalar), so they favour clarity over speed; the semantics follow
 * Hugging Face transformers' modeling_llama.py in fp32.
 *
 * Conventions as in layers.c: row-major shapes in a comment above each
 * function, backward ACCUMULATES (+=) into its gradients, a NULL gradient
 * means "not needed", long reductions accumulate in double and round once. */
#include <assert.h>
#include <math.h>
#include <string.h>

#include "model/kernels.h"

/* ------------------------------------------------------------------------ */
/* RMSNorm (LlamaRMSNorm / Qwen2RMSNorm) */

/* out (T,C), rstd (T), inp (T,C), weight (C).
 * var = mean(x^2) (double accumulation, rounded to fp32 like the fp32 tensor),
 * rstd = 1/sqrt(var + eps) in fp32, out = weight * (x * rstd) in that order. */
static void rmsnorm_forward_scalar(float *restrict out, float *restrict rstd, const float *restrict inp,
                                   const float *restrict weight, size_t T, size_t C, float eps) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        double ss = 0.0;
        for (size_t i = 0; i < C; i++) ss += (double)x[i] * (double)x[i];
        const float var = (float)(ss / (double)C);
        const float r = 1.0f / sqrtf(var + eps);
        float *restrict o = out + t * C;
        for (size_t i = 0; i < C; i++) o[i] = weight[i] * (x[i] * r);
        rstd[t] = r;
    }
}

/* dinp (T,C) += ..., dweight (C) += ..., given dout (T,C), inp (T,C), weight (C), rstd (T).
 * With n = x * rstd and g = dout * weight:
 *   dx = rstd * (g - n * mean(g * n)),   dweight += dout * n. */
static void rmsnorm_backward_scalar(float *restrict dinp, float *restrict dweight, const float *restrict dout,
                                    const float *restrict inp, const float *restrict weight,
                                    const float *restrict rstd, size_t T, size_t C) {
    for (size_t t = 0; t < T; t++) {
        const float *restrict x = inp + t * C;
        const float *restrict d = dout + t * C;
        const float r = rstd[t];
        if (dweight) {
            for (size_t i = 0; i < C; i++) dweight[i] += d[i] * (x[i] * r);
        }
        if (dinp) {
            double dot = 0.0; /* sum_i g_i * n_i */
            for (size_t i = 0; i < C; i++) dot += (double)(d[i] * weight[i]) * (double)(x[i] * r);
            const float mean_gn = (float)(dot / (double)C);
            float *restrict dx = dinp + t * C;
            for (size_t i = 0; i < C; i++) dx[i] += r * (d[i] * weight[i] - (x[i] * r) * mean_gn);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Rotary position embedding, half-split layout (rotate_half) */

/* x (T, nh, hd) in place; cos_t, sin_t (T, hd/2). q*cos + rotate_half(q)*sin:
 *   y[i]      = x[i]*cos - x[i+hd/2]*sin
 *   y[i+hd/2] = x[i+hd/2]*cos + x[i]*sin */
static void rope_forward_scalar(float *restrict x, const float *restrict cos_t, const float *restrict sin_t,
                                size_t T, size_t nh, size_t hd) {
    assert(hd % 2 == 0);
    const size_t half = hd / 2;
    for (size_t t = 0; t < T; t++) {
        const float *restrict c = cos_t + t * half;
        const float *restrict s = sin_t + t * half;
        for (size_t h = 0; h < nh; h++) {
            float *restrict x1 = x + (t * nh + h) * hd;
            float *restrict x2 = x1 + half;
            for (size_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/* dx (T, nh, hd) in place: the transpose of the rotation,
 *   dx1 = dy1*cos + dy2*sin,  dx2 = dy2*cos - dy1*sin. */
static void rope_backward_scalar(float *restrict dx, const float *restrict cos_t, const float *restrict sin_t,
                                 size_t T, size_t nh, size_t hd) {
    assert(hd % 2 == 0);
    const size_t half = hd / 2;
    for (size_t t = 0; t < T; t++) {
        const float *restrict c = cos_t + t * half;
        const float *restrict s = sin_t + t * half;
        for (size_t h = 0; h < nh; h++) {
            float *restrict d1 = dx + (t * nh + h) * hd;
            float *restrict d2 = d1 + half;
            for (size_t i = 0; i < half; i++) {
                const float a = d1[i], b = d2[i];
                d1[i] = a * c[i] + b * s[i];
                d2[i] = b * c[i] - a * s[i];
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Causal grouped-query attention (eager_attention_forward), one row at a time */

/* The fp32 scale HF multiplies the scores by: head_dim ** -0.5 rounded to fp32. */
static float attention_scale(size_t hd) { return (float)(1.0 / sqrt((double)hd)); }

/* The scaled score (q_t . k_s) * scale, an fp32 dot product in index order. */
static float attention_score(const float *restrict qt, const float *restrict ks, size_t hd, float scale) {
    float dot = 0.0f;
    for (size_t i = 0; i < hd; i++) dot += qt[i] * ks[i];
    return dot * scale;
}

/* Row s of the keys (or values) a query row sees, in position order: the Tpre
 * prefix rows of kp (Tpre, nkv, hd), then the own rows of k (Tq, nkv, hd).
 * kv_off = kv head * hd. */
static const float *kv_row(const float *kp, const float *k, size_t Tpre, size_t s, size_t kv_stride, size_t kv_off) {
    return s < Tpre ? kp + s * kv_stride + kv_off : k + (s - Tpre) * kv_stride + kv_off;
}

static float *dkv_row(float *dkp, float *dk, size_t Tpre, size_t s, size_t kv_stride, size_t kv_off) {
    float *base = s < Tpre ? dkp : dk;
    if (!base) return NULL;
    return base + (s < Tpre ? s : s - Tpre) * kv_stride + kv_off;
}

/* out (Tq, nh, hd), lse (nh, Tq); q (Tq, nh, hd), kp and vp (Tpre, nkv, hd), k and v (Tq, nkv, hd).
 * Query row t sits at position Tpre + t of the sequence [prefix; own] and sees
 * keys s = 0 .. Tpre + t of it (Tpre = 0: plain causal attention).
 * Head h reads kv head h / (nh / nkv) (repeat_kv). Per head and query row t:
 *   score[s] = (q_t . k_s) * scale for visible s (masked ones give probability 0),
 *   P = softmax(score) in fp32 (max subtracted, double sum),
 *   out_t = (sum_s e_s v_s) / sum_s e_s  with e_s = exp(score_s - max),
 *   lse[h,t] = max + log(sum_s e_s).
 * A row would need a (T) buffer to keep its scores, and a void kernel does not
 * allocate, so the scores are computed twice: once for the max, once for the
 * exponentials (this twin is the reference, not the fast path). The keys go in
 * position order, so a prefix call gives bit for bit the rows of the causal
 * call on the concatenated sequence. */
static void attention_prefix_forward_scalar(float *restrict out, float *restrict lse, const float *restrict q,
                                            const float *kp, const float *vp, size_t Tpre, const float *k,
                                            const float *v, size_t Tq, size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0);
    assert(Tpre == 0 || (kp && vp));
    const size_t group = nh / nkv;
    const size_t q_stride = nh * hd, kv_stride = nkv * hd;
    const float scale = attention_scale(hd);
    for (size_t h = 0; h < nh; h++) {
        const size_t kv_off = (h / group) * hd;
        for (size_t t = 0; t < Tq; t++) {
            const float *restrict qt = q + t * q_stride + h * hd;
            const size_t n = Tpre + t + 1; /* visible keys */
            float maxv = -INFINITY;
            for (size_t s = 0; s < n; s++) {
                const float score = attention_score(qt, kv_row(kp, k, Tpre, s, kv_stride, kv_off), hd, scale);
                if (score > maxv) maxv = score;
            }
            float *restrict ot = out + t * q_stride + h * hd;
            for (size_t i = 0; i < hd; i++) ot[i] = 0.0f;
            double sum = 0.0;
            for (size_t s = 0; s < n; s++) {
                const float e = expf(attention_score(qt, kv_row(kp, k, Tpre, s, kv_stride, kv_off), hd, scale) - maxv);
                sum += e;
                const float *restrict vs = kv_row(vp, v, Tpre, s, kv_stride, kv_off);
                for (size_t i = 0; i < hd; i++) ot[i] += e * vs[i];
            }
            const float sumf = (float)sum;
            for (size_t i = 0; i < hd; i++) ot[i] /= sumf;
            lse[h * Tq + t] = (float)((double)maxv + log(sum));
        }
    }
}

/* out (T, nh, hd), lse (nh, T); q (T, nh, hd), k and v (T, nkv, hd). */
static void attention_forward_scalar(float *out, float *lse, const float *q, const float *k, const float *v, size_t T,
                                     size_t nh, size_t nkv, size_t hd) {
    attention_prefix_forward_scalar(out, lse, q, NULL, NULL, 0, k, v, T, nh, nkv, hd);
}

/* dq (Tq, nh, hd), dkp and dvp (Tpre, nkv, hd), dk and dv (Tq, nkv, hd) += ...,
 * given dout (Tq, nh, hd) and the forward's q, kp, vp, k, v, out, lse. Per head
 * and row t, with P_s = exp(score_s - lse) recomputed, dP_s = dout_t . v_s and
 * D = dout_t . out_t (= sum_s P_s dP_s):
 *   dv_s += P_s dout_t
 *   dS_s  = P_s (dP_s - D)                       (softmax backward)
 *   dq_t += scale sum_s dS_s k_s,  dk_s += scale dS_s q_t
 * (dk_s, dv_s being rows of dkp, dvp for the prefix keys). The kv heads
 * accumulate the gradients of all query heads in their group. */
static void attention_prefix_backward_scalar(float *restrict dq, float *dkp, float *dvp, float *dk, float *dv,
                                             const float *restrict dout, const float *restrict q, const float *kp,
                                             const float *vp, size_t Tpre, const float *k, const float *v,
                                             const float *restrict out, const float *restrict lse, size_t Tq,
                                             size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0);
    assert(Tpre == 0 || (kp && vp));
    const size_t group = nh / nkv;
    const size_t q_stride = nh * hd, kv_stride = nkv * hd;
    const float scale = attention_scale(hd);
    const int need_scores = dq != NULL || dk != NULL || (dkp != NULL && Tpre > 0);
    for (size_t h = 0; h < nh; h++) {
        const size_t kv_off = (h / group) * hd;
        for (size_t t = 0; t < Tq; t++) {
            const float *restrict dot_ = dout + t * q_stride + h * hd;
            const float *restrict qt = q + t * q_stride + h * hd;
            const float *restrict ot = out + t * q_stride + h * hd;
            const float m = lse[h * Tq + t];
            double D = 0.0;
            for (size_t i = 0; i < hd; i++) D += (double)dot_[i] * (double)ot[i];
            const float Df = (float)D;
            float *restrict dqt = dq ? dq + t * q_stride + h * hd : NULL;
            for (size_t s = 0; s < Tpre + t + 1; s++) {
                const float *ks = kv_row(kp, k, Tpre, s, kv_stride, kv_off);
                const float *vs = kv_row(vp, v, Tpre, s, kv_stride, kv_off);
                const float p = expf(attention_score(qt, ks, hd, scale) - m);
                float *dvs = dkv_row(dvp, dv, Tpre, s, kv_stride, kv_off);
                if (dvs) {
                    for (size_t i = 0; i < hd; i++) dvs[i] += p * dot_[i];
                }
                if (!need_scores) continue;
                float dp = 0.0f;
                for (size_t i = 0; i < hd; i++) dp += dot_[i] * vs[i];
                const float ds = p * (dp - Df) * scale;
                if (dqt) {
                    for (size_t i = 0; i < hd; i++) dqt[i] += ds * ks[i];
                }
                float *dks = dkv_row(dkp, dk, Tpre, s, kv_stride, kv_off);
                if (dks) {
                    for (size_t i = 0; i < hd; i++) dks[i] += ds * qt[i];
                }
            }
        }
    }
}

/* dq (T, nh, hd), dk and dv (T, nkv, hd) += ...: plain causal attention. */
static void attention_backward_scalar(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                      const float *k, const float *v, const float *out, const float *lse, size_t T,
                                      size_t nh, size_t nkv, size_t hd) {
    attention_prefix_backward_scalar(dq, NULL, NULL, dk, dv, dout, q, NULL, NULL, 0, k, v, out, lse, T, nh, nkv, hd);
}

/* ------------------------------------------------------------------------ */
/* SwiGLU (LlamaMLP: down(silu(gate(x)) * up(x))), the elementwise part */

/* out (N) = silu(gate) * up, silu(g) = g / (1 + exp(-g)) as PyTorch computes it. */
static void swiglu_forward_scalar(float *restrict out, const float *restrict gate, const float *restrict up,
                                  size_t N) {
    for (size_t i = 0; i < N; i++) {
        const float g = gate[i];
        out[i] = (g / (1.0f + expf(-g))) * up[i];
    }
}

/* dgate, dup (N) += ...: with sig = sigmoid(g),
 *   dup += dout * silu(g),  dgate += dout * up * sig * (1 + g * (1 - sig)). */
static void swiglu_backward_scalar(float *restrict dgate, float *restrict dup, const float *restrict dout,
                                   const float *restrict gate, const float *restrict up, size_t N) {
    for (size_t i = 0; i < N; i++) {
        const float g = gate[i];
        const float sig = 1.0f / (1.0f + expf(-g));
        if (dup) dup[i] += dout[i] * (g * sig);
        if (dgate) dgate[i] += dout[i] * up[i] * (sig * (1.0f + g * (1.0f - sig)));
    }
}

/* ------------------------------------------------------------------------ */
/* AdamW, the element-wise update of one decay range (see kernels.h) */

static void adamw_update_scalar(float *restrict params, const float *restrict grads, float *restrict m,
                                float *restrict v, size_t n, const dpoc_adamw_coeffs *c) {
    for (size_t i = 0; i < n; i++) {
        const float g = grads[i] * c->grad_scale;
        params[i] *= c->decay;
        m[i] += (g - m[i]) * c->one_minus_b1;
        v[i] = v[i] * c->b2 + c->one_minus_b2 * g * g;
        const float denom = sqrtf(v[i]) / c->bc2_sqrt + c->eps;
        params[i] -= c->step_size * m[i] / denom;
    }
}

/* sum of squares in double, in index order (each square is exact in double) */
static double sum_squares_scalar(const float *restrict x, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

/* ------------------------------------------------------------------------ */
/* LM head, the pointwise work on one row of a vocabulary chunk of logits */

/* st = the statistics of l (n) (see kernels.h): a pass for the max, its first
 * index and the sum, then a pass for the exponentials; e rounds to fp32, every
 * sum accumulates in double (e d and e e are exact in double). */
static void lmhead_chunk_stats_scalar(dpoc_lmhead_chunk_stats *st, const float *restrict l, size_t n) {
    float cmax = -INFINITY;
    size_t carg = 0;
    double lsum = 0.0;
    for (size_t j = 0; j < n; j++) {
        if (l[j] > cmax) cmax = l[j], carg = j; /* strict: the first maximal index wins */
        lsum += l[j];
    }
    double s = 0.0, a = 0.0, q = 0.0;
    for (size_t j = 0; j < n; j++) {
        const float d = l[j] - cmax;
        const float e = expf(d);
        s += e;
        a += (double)e * (double)d;
        q += (double)e * (double)e;
    }
    *st = (dpoc_lmhead_chunk_stats){
        .max = cmax, .argmax = carg, .sum_logits = lsum, .sum_exp = s, .sum_exp_d = a, .sum_exp_sq = q};
}

/* l (n) in place: l = -g exp(l - lse), the softmax term of dlogits = g (onehot - p). */
static void lmhead_chunk_dlogits_scalar(float *restrict l, size_t n, float g, float lse) {
    for (size_t j = 0; j < n; j++) l[j] = -g * expf(l[j] - lse);
}

const dpoc_kernel_table dpoc_kernels_scalar = {
    .level = DPOC_SIMD_SCALAR,
    .rmsnorm_forward = rmsnorm_forward_scalar,
    .rmsnorm_backward = rmsnorm_backward_scalar,
    .rope_forward = rope_forward_scalar,
    .rope_backward = rope_backward_scalar,
    .swiglu_forward = swiglu_forward_scalar,
    .swiglu_backward = swiglu_backward_scalar,
    .attention_forward = attention_forward_scalar,
    .attention_backward = attention_backward_scalar,
    .attention_prefix_forward = attention_prefix_forward_scalar,
    .attention_prefix_backward = attention_prefix_backward_scalar,
    .adamw_update = adamw_update_scalar,
    .sum_squares = sum_squares_scalar,
    .lmhead_chunk_stats = lmhead_chunk_stats_scalar,
    .lmhead_chunk_dlogits = lmhead_chunk_dlogits_scalar,
};
