/* Causal GQA attention in tiles (FlashAttention-2 style), the attention of the
 * SIMD levels; the row-at-a-time scalar twin in kernels_scalar.c defines the
 * semantics.
 *
 * The query rows may follow a prefix (attention_prefix_* in layers.h): Tq query
 * rows at positions Tpre.., which see every one of the Tpre prefix keys (kp, vp)
 * and, causally, their own keys (k, v). Plain causal attention is Tpre = 0. The
 * prefix and own keys are two pointers, so a shared prompt's K/V serve two
 * completions without being copied next to each of them.
 *
 * Per query head h (kv head h / (nh/nkv)) the Tq query rows go in blocks of
 * ATT_BQ and the keys of each block in tiles of ATT_BK: first the prefix keys
 * (every tile fully visible), then the own keys up to the block's last row (a
 * causal mask on the diagonal tiles). Tiles never straddle the prefix/own
 * boundary, so each is one strided block of one array. A tile's scores
 * S = scale * Q K^T, and the products with V, dO, K and Q, are cblas_sgemm
 * calls made straight on the (T, heads, hd) arrays through their leading
 * dimension (no packing); the row work on a tile (max, exp, sums, the softmax
 * backward) is the level's SIMD row operations (dpoc_attn_rowops).
 *
 * Forward: online softmax over the key tiles, in key-position order, with
 * running max m and sum l per row; the output rows accumulate in place in out
 * and are rescaled when m grows, and only lse = m + log(l) (nh, Tq) is kept.
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

/* Keys [k0, k0 + bk) that query row t may see: a prefix of the tile. A prefix
 * tile (causal = 0) is seen whole by every query row. */
static size_t visible_keys(int causal, size_t t, size_t k0, size_t bk) {
    if (!causal) return bk;
    if (t < k0) return 0;
    return t - k0 + 1 < bk ? t - k0 + 1 : bk;
}

/* The shapes shared by every tile of one call. */
typedef struct {
    const dpoc_attn_rowops *ops;
    size_t q_stride, kv_stride, hd;
    float scale;
} att_geom;

/* One key tile of the forward for the query block at rows q0.. (bq rows): folds
 * keys K, V (bk, hd) (row stride kv_stride) into the running m, l (bq) and the
 * unnormalised output rows O (bq, hd). k0 is the tile's first own-key index
 * (for the causal mask); S is (ATT_BQ, ATT_BK) scratch. */
static void forward_tile(const att_geom *g, float *S, float *m, float *l, float *O, const float *Q, const float *K,
                         const float *V, size_t q0, size_t bq, size_t k0, size_t bk, int causal) {
    const dpoc_attn_rowops *ops = g->ops;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), blas_dim(g->hd), g->scale, Q,
                blas_dim(g->q_stride), K, blas_dim(g->kv_stride), 0.0f, S, ATT_BK);
    for (size_t r = 0; r < bq; r++) {
        float *row = S + r * ATT_BK;
        const size_t n = visible_keys(causal, q0 + r, k0, bk);
        if (n == 0) {
            memset(row, 0, bk * sizeof *row);
            continue;
        }
        const float cmax = ops->max(row, n);
        const float mnew = cmax > m[r] ? cmax : m[r];
        const float alpha = expf(m[r] - mnew); /* 0 on the first tile (m = -inf) */
        const float sum = ops->exp_sum(row, n, bk, mnew);
        /* the output so far was summed against the old max */
        if (l[r] > 0.0f && alpha != 1.0f) ops->scale(O + r * g->q_stride, g->hd, alpha);
        l[r] = l[r] * alpha + sum;
        m[r] = mnew;
    }
    /* O (bq, hd) += P (bq, bk) @ V (bk, hd) */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_dim(bq), blas_dim(g->hd), blas_dim(bk), 1.0f, S,
                ATT_BK, V, blas_dim(g->kv_stride), 1.0f, O, blas_dim(g->q_stride));
}

/* out (Tq, nh, hd), lse (nh, Tq); q (Tq, nh, hd), kp and vp (Tpre, nkv, hd), k and v (Tq, nkv, hd). */
void attention_forward_blocked(const dpoc_attn_rowops *ops, float *out, float *lse, const float *q, const float *kp,
                               const float *vp, size_t Tpre, const float *k, const float *v, size_t Tq, size_t nh,
                               size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    assert(Tpre == 0 || (kp && vp));
    const size_t group = nh / nkv;
    const att_geom g = {ops, nh * hd, nkv * hd, hd, attention_scale(hd)};
    float S[ATT_BQ * ATT_BK];
    float m[ATT_BQ], l[ATT_BQ];
    /* consecutive heads share a kv head, so its K and V stay in cache */
    for (size_t h = 0; h < nh; h++) {
        const size_t kvoff = (h / group) * hd;
        for (size_t q0 = 0; q0 < Tq; q0 += ATT_BQ) {
            const size_t bq = Tq - q0 < ATT_BQ ? Tq - q0 : ATT_BQ;
            const float *Q = q + q0 * g.q_stride + h * hd;
            float *O = out + q0 * g.q_stride + h * hd;
            for (size_t r = 0; r < bq; r++) {
                m[r] = -INFINITY;
                l[r] = 0.0f;
                memset(O + r * g.q_stride, 0, hd * sizeof *O);
            }
            for (size_t k0 = 0; k0 < Tpre; k0 += ATT_BK) {
                const size_t bk = Tpre - k0 < ATT_BK ? Tpre - k0 : ATT_BK;
                const size_t koff = k0 * g.kv_stride + kvoff;
                forward_tile(&g, S, m, l, O, Q, kp + koff, vp + koff, q0, bq, k0, bk, 0);
            }
            const size_t kend = q0 + bq; /* causal: own keys up to the block's last row */
            for (size_t k0 = 0; k0 < kend; k0 += ATT_BK) {
                const size_t bk = kend - k0 < ATT_BK ? kend - k0 : ATT_BK;
                const size_t koff = k0 * g.kv_stride + kvoff;
                forward_tile(&g, S, m, l, O, Q, k + koff, v + koff, q0, bq, k0, bk, 1);
            }
            for (size_t r = 0; r < bq; r++) {
                ops->scale(O + r * g.q_stride, hd, 1.0f / l[r]);
                lse[h * Tq + q0 + r] = (float)((double)m[r] + log((double)l[r]));
            }
        }
    }
}

/* One key tile of the backward for the query block at rows q0.. (bq rows): Q,
 * dO (bq, hd), L (bq) the block's logsumexps, D (bq) its rowsum(dO * O); keys
 * K, V (bk, hd) and their gradients dK, dV (either may be NULL); dQ may be NULL.
 * P and dP are (ATT_BQ, ATT_BK) scratch. */
static void backward_tile(const att_geom *g, float *P, float *dP, const float *D, const float *L, const float *Q,
                          const float *dO, float *dQ, const float *K, const float *V, float *dK, float *dV, size_t q0,
                          size_t bq, size_t k0, size_t bk, int causal) {
    const dpoc_attn_rowops *ops = g->ops;
    const int ld_q = blas_dim(g->q_stride), ld_kv = blas_dim(g->kv_stride), hd = blas_dim(g->hd);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), hd, g->scale, Q, ld_q, K, ld_kv,
                0.0f, P, ATT_BK);
    for (size_t r = 0; r < bq; r++) {
        float *row = P + r * ATT_BK;
        const size_t n = visible_keys(causal, q0 + r, k0, bk);
        if (n == 0) memset(row, 0, bk * sizeof *row);
        else (void)ops->exp_sum(row, n, bk, L[r]);
    }
    /* dV (bk, hd) += P^T (bk, bq) @ dO (bq, hd) */
    if (dV)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, blas_dim(bk), hd, blas_dim(bq), 1.0f, P, ATT_BK, dO, ld_q,
                    1.0f, dV, ld_kv);
    if (!dQ && !dK) return;
    /* dP (bq, bk) = dO (bq, hd) @ V (bk, hd)^T, then P becomes dS in place */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_dim(bq), blas_dim(bk), hd, 1.0f, dO, ld_q, V, ld_kv, 0.0f,
                dP, ATT_BK);
    for (size_t r = 0; r < bq; r++)
        ops->dsoftmax(P + r * ATT_BK, dP + r * ATT_BK, visible_keys(causal, q0 + r, k0, bk), D[r]);
    /* dQ (bq, hd) += scale dS (bq, bk) @ K (bk, hd) */
    if (dQ)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, blas_dim(bq), hd, blas_dim(bk), g->scale, P, ATT_BK, K,
                    ld_kv, 1.0f, dQ, ld_q);
    /* dK (bk, hd) += scale dS^T (bk, bq) @ Q (bq, hd) */
    if (dK)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, blas_dim(bk), hd, blas_dim(bq), g->scale, P, ATT_BK, Q,
                    ld_q, 1.0f, dK, ld_kv);
}

/* dq (Tq, nh, hd), dkp and dvp (Tpre, nkv, hd), dk and dv (Tq, nkv, hd) += ...,
 * given dout (Tq, nh, hd) and the forward's q, kp, vp, k, v, out (Tq, nh, hd)
 * and lse (nh, Tq). NULL gradients are skipped. */
void attention_backward_blocked(const dpoc_attn_rowops *ops, float *dq, float *dkp, float *dvp, float *dk, float *dv,
                                const float *dout, const float *q, const float *kp, const float *vp, size_t Tpre,
                                const float *k, const float *v, const float *out, const float *lse, size_t Tq,
                                size_t nh, size_t nkv, size_t hd) {
    assert(nkv > 0 && nh % nkv == 0 && hd > 0);
    assert(Tpre == 0 || (kp && vp));
    if (Tpre == 0) dkp = dvp = NULL;
    if (!dq && !dkp && !dvp && !dk && !dv) return;
    const size_t group = nh / nkv;
    const att_geom g = {ops, nh * hd, nkv * hd, hd, attention_scale(hd)};
    const int need_scores = dq != NULL || dk != NULL || dkp != NULL;
    float P[ATT_BQ * ATT_BK], dP[ATT_BQ * ATT_BK];
    float D[ATT_BQ];
    for (size_t h = 0; h < nh; h++) {
        const size_t kvoff = (h / group) * hd;
        for (size_t q0 = 0; q0 < Tq; q0 += ATT_BQ) {
            const size_t bq = Tq - q0 < ATT_BQ ? Tq - q0 : ATT_BQ;
            const size_t qoff = q0 * g.q_stride + h * hd;
            const float *Q = q + qoff, *dO = dout + qoff, *O = out + qoff;
            float *dQ = dq ? dq + qoff : NULL;
            const float *L = lse + h * Tq + q0;
            if (need_scores)
                for (size_t r = 0; r < bq; r++) D[r] = ops->dot(dO + r * g.q_stride, O + r * g.q_stride, hd);
            /* the prefix tiles feed only dQ, dkp and dvp; the own tiles dQ, dk and dv */
            for (size_t k0 = 0; k0 < Tpre && (dQ || dkp || dvp); k0 += ATT_BK) {
                const size_t bk = Tpre - k0 < ATT_BK ? Tpre - k0 : ATT_BK;
                const size_t koff = k0 * g.kv_stride + kvoff;
                backward_tile(&g, P, dP, D, L, Q, dO, dQ, kp + koff, vp + koff, dkp ? dkp + koff : NULL,
                              dvp ? dvp + koff : NULL, q0, bq, k0, bk, 0);
            }
            const size_t kend = q0 + bq;
            for (size_t k0 = 0; k0 < kend && (dQ || dk || dv); k0 += ATT_BK) {
                const size_t bk = kend - k0 < ATT_BK ? kend - k0 : ATT_BK;
                const size_t koff = k0 * g.kv_stride + kvoff;
                backward_tile(&g, P, dP, D, L, Q, dO, dQ, k + koff, v + koff, dk ? dk + koff : NULL,
                              dv ? dv + koff : NULL, q0, bq, k0, bk, 1);
            }
        }
    }
}
