/* Causal GQA attention in tiles (FlashAttention-2 style), the attention of the
 * SIMD levels; the row-at-a-time scalar twin in kernels_scalar.c defines the
 * semantics.
 *
 * Per query head h (kv head h / (nh/nkv)) the T query rows go in blocks of
 * ATT_BQ and the keys of each block in tiles of ATT_BK. A tile's scores
 * S = scale * Q K^T, and the products with V, dO, K and Q, are cblas_sgemm
 * calls made straight on the (T, heads, hd) arrays through their leading
 * dimension (no packing); the row work on a tile (max, exp, sums, the softmax
 * backward) is the level's SIMD row operations (dpoc_attn_rowops).
 *
 * Forward: online softmax over the key tiles, with running max m and sum l per
 * row; the output rows accumulate in place in out and are rescaled when m
 * grows, and only lse = m + log(l) (nh, T) is kept.
 * Backward: P = exp(S - lse) recomputed per tile, D = rowsum(dO * O), and
 *   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),
 *   dQ += scale dS K,  dK += scale dS^T Q.
 * The tiles live on the stack (2 * ATT_BQ * ATT_BK floats at most), so memory
 * does not grow with T and a void kernel needs no allocation. */
#include <assert.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include <cblas.h>

#include "model/kernels.h"

/* 64 x 64 tiles: each sgemm is 64*64*hd multiply-adds (enough for OpenBLAS's
 * kernels to run at speed, still under its threshold for splitting a product
 * across threads), and a tile of scores (16 KB) stays in L1 while the row
 * operations pass over it. */
#define ATT_BQ 64
#define ATT_BK 64

static int blas_dim(size_t n) {
    assert(n <= (size_t)INT_MAX);
    return (int)n;
}

static float attention_scale(size_t hd) { return (float)(1.0 / sqrt((double)hd)); }

/* Keys [k0, k0 + bk) that query row t may see: a prefix of the tile. */
static size_t visible_keys(size_t t, size_t k0, size_t bk) {
    if (t < k0) return 0;
    return t - k0 + 1 < bk ? t - k0 + 1 : bk;
}

/* out (T, nh, hd), lse (nh, T); q (T, nh, hd), k and v (T, nkv, hd). */
void attention_forward_blocked(const dpoc_attn_rowops *ops, float *out, float *lse, const float *q, const float *k,
                               const float *v, size_t T, size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    const size_t group = nh / nkv;
    const size_t q_stride = nh * hd, kv_stride = nkv * hd;
    const float scale = attention_scale(hd);
    float S[ATT_BQ * ATT_BK];
    float m[ATT_BQ], l[ATT_BQ];
    /* consecutive heads share a kv head, so its K and V stay in cache */
    for (size_t h = 0; h < nh; h++) {
        const size_t kvh = h / group;
        for (size_t q0 = 0; q0 < T; q0 += ATT_BQ) {
            const size_t bq = T - q0 < ATT_BQ ? T - q0 : ATT_BQ;
            const float *Q = q + q0 * q_stride + h * hd;
            float *O = out + q0 * q_stride + h * hd;
            for (size_t r = 0; r < bq; r++) {
                m[r] = -INFINITY;
                l[r] = 0.0f;
                memset(O + r * q_stride, 0, hd * sizeof *O);
            }
            const size_t kend = q0 + bq; /* causal: keys up to the block's last row */
            for (size_t k0 = 0; k0 < kend; k0 += ATT_BK) {
                const size_t bk = kend - k0 < ATT_BK ? kend - k0 : ATT_BK;
                const float *K = k + k0 * kv_stride + kvh * hd;
                const float *V = v + k0 * kv_stride + kvh * hd;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), blas_dim(hd), scale,
                            Q, blas_dim(q_stride), K, blas_dim(kv_stride), 0.0f, S, ATT_BK);
                for (size_t r = 0; r < bq; r++) {
                    float *row = S + r * ATT_BK;
                    const size_t n = visible_keys(q0 + r, k0, bk);
                    if (n == 0) {
                        memset(row, 0, bk * sizeof *row);
                        continue;
                    }
                    const float cmax = ops->max(row, n);
                    const float mnew = cmax > m[r] ? cmax : m[r];
                    const float alpha = expf(m[r] - mnew); /* 0 on the first tile (m = -inf) */
                    const float sum = ops->exp_sum(row, n, bk, mnew);
                    /* the output so far was summed against the old max */
                    if (l[r] > 0.0f && alpha != 1.0f) ops->scale(O + r * q_stride, hd, alpha);
                    l[r] = l[r] * alpha + sum;
                    m[r] = mnew;
                }
                /* O (bq, hd) += P (bq, bk) @ V (bk, hd) */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_dim(bq), blas_dim(hd), blas_dim(bk), 1.0f,
                            S, ATT_BK, V, blas_dim(kv_stride), 1.0f, O, blas_dim(q_stride));
            }
            for (size_t r = 0; r < bq; r++) {
                ops->scale(O + r * q_stride, hd, 1.0f / l[r]);
                lse[h * T + q0 + r] = (float)((double)m[r] + log((double)l[r]));
            }
        }
    }
}

/* dq (T, nh, hd), dk and dv (T, nkv, hd) += ..., given dout (T, nh, hd) and the
 * forward's q, k, v, out (T, nh, hd) and lse (nh, T). NULL gradients are skipped. */
void attention_backward_blocked(const dpoc_attn_rowops *ops, float *dq, float *dk, float *dv, const float *dout,
                                const float *q, const float *k, const float *v, const float *out, const float *lse,
                                size_t T, size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    if (!dq && !dk && !dv) return;
    const size_t group = nh / nkv;
    const size_t q_stride = nh * hd, kv_stride = nkv * hd;
    const float scale = attention_scale(hd);
    const int need_scores = dq != NULL || dk != NULL;
    float P[ATT_BQ * ATT_BK], dP[ATT_BQ * ATT_BK];
    float D[ATT_BQ];
    for (size_t h = 0; h < nh; h++) {
        const size_t kvh = h / group;
        for (size_t q0 = 0; q0 < T; q0 += ATT_BQ) {
            const size_t bq = T - q0 < ATT_BQ ? T - q0 : ATT_BQ;
            const size_t qoff = q0 * q_stride + h * hd;
            const float *Q = q + qoff, *dO = dout + qoff, *O = out + qoff;
            float *dQ = dq ? dq + qoff : NULL;
            const float *L = lse + h * T + q0;
            if (need_scores)
                for (size_t r = 0; r < bq; r++) D[r] = ops->dot(dO + r * q_stride, O + r * q_stride, hd);
            const size_t kend = q0 + bq;
            for (size_t k0 = 0; k0 < kend; k0 += ATT_BK) {
                const size_t bk = kend - k0 < ATT_BK ? kend - k0 : ATT_BK;
                const size_t koff = k0 * kv_stride + kvh * hd;
                const float *K = k + koff, *V = v + koff;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), blas_dim(hd), scale,
                            Q, blas_dim(q_stride), K, blas_dim(kv_stride), 0.0f, P, ATT_BK);
                for (size_t r = 0; r < bq; r++) {
                    float *row = P + r * ATT_BK;
                    const size_t n = visible_keys(q0 + r, k0, bk);
                    if (n == 0) memset(row, 0, bk * sizeof *row);
                    else (void)ops->exp_sum(row, n, bk, L[r]);
                }
                /* dV (bk, hd) += P^T (bk, bq) @ dO (bq, hd) */
                if (dv)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, blas_dim(bk), blas_dim(hd), blas_dim(bq), 1.0f,
                                P, ATT_BK, dO, blas_dim(q_stride), 1.0f, dv + koff, blas_dim(kv_stride));
                if (!need_scores) continue;
                /* dP (bq, bk) = dO (bq, hd) @ V (bk, hd)^T, then P becomes dS in place */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), blas_dim(hd), 1.0f,
                            dO, blas_dim(q_stride), V, blas_dim(kv_stride), 0.0f, dP, ATT_BK);
                for (size_t r = 0; r < bq; r++)
                    ops->dsoftmax(P + r * ATT_BK, dP + r * ATT_BK, visible_keys(q0 + r, k0, bk), D[r]);
                /* dQ (bq, hd) += scale dS (bq, bk) @ K (bk, hd) */
                if (dQ)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_dim(bq), blas_dim(hd), blas_dim(bk),
                                scale, P, ATT_BK, K, blas_dim(kv_stride), 1.0f, dQ, blas_dim(q_stride));
                /* dK (bk, hd) += scale dS^T (bk, bq) @ Q (bq, hd) */
                if (dk)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, blas_dim(bk), blas_dim(hd), blas_dim(bq), scale,
                                P, ATT_BK, Q, blas_dim(q_stride), 1.0f, dk + koff, blas_dim(kv_stride));
            }
        }
    }
}
