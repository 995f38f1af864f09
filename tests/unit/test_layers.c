/* Unit tests of the transformer layer kernels (src/model/layers.c).
 *
 * Every backward is checked against central finite differences of a scalar
 * objective L = sum(out * Rw) for a fixed random Rw, where the FD uses a
 * double-precision twin of the forward written here (naive formulas), so the
 * reference gradient is accurate to ~1e-9 and the fp32 analytic gradient must
 * match it to GRAD_RTOL (relative max-abs error). Forwards are compared with
 * the same naive double formulas; plus causality, GQA mapping, RoPE tables,
 * LM-head chunking / metrics / ties, NULL gradients and accumulation.
 * The whole suite runs once per SIMD level this CPU supports (scalar, AVX2,
 * AVX-512; see dpoc_kernels_force), and says which levels it skipped. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#include "dpoc/layers.h"

/* Internal entry points of layers.c with an explicit vocabulary chunk width
 * (lmhead_forward/backward call them with LMHEAD_CHUNK). */
void lmhead_forward_chunked(lmhead_out *o, const float *h, const float *w, const int32_t *labels, size_t R,
                            size_t C, size_t V, float *scratch, size_t chunk);
void lmhead_backward_chunked(float *dh, float *dw, const float *dlogp, const float *h, const float *w,
                             const int32_t *labels, const float *lse, size_t R, size_t C, size_t V,
                             float *scratch, size_t chunk);

/* Small odd shapes. */
enum {
    T_ = 5,    /* tokens */
    C_ = 12,   /* channels */
    OC_ = 7,   /* linear output channels */
    NH_ = 4,   /* query heads */
    NKV_ = 2,  /* kv heads */
    HD_ = 6,   /* head dim */
    V_ = 37,   /* vocabulary */
    R_ = 6,    /* lm-head rows */
    SMALL_CHUNK = 8,
};

#define GRAD_RTOL 1e-3     /* analytic fp32 vs FD of the double twin, relative max-abs */
#define GRAD_FLOOR 1e-6    /* denominator floor of the relative error */
#define FD_STEP 1e-6       /* central-difference step in double */
#define FWD_RTOL 1e-5      /* fp32 forward vs the double formula, relative max-abs */
#define ACCUM_RTOL 1e-6    /* two backward calls vs twice one call */
#define RMS_EPS 1e-5f
#define ROPE_THETA 10000.0f
#define ROPE_THETA_QWEN 1000000.0f

/* ---------------------------------------------------------------------- */
/* helpers */

static float *frand(rng_t *r, size_t n, float lo, float hi) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++) a[i] = rng_uniform(r, lo, hi);
    return a;
}

static float *fzeros(size_t n) {
    float *a = calloc(n ? n : 1, sizeof *a);
    assert_non_null(a);
    return a;
}

static float *fcopy(const float *src, size_t n) {
    float *a = fzeros(n);
    memcpy(a, src, n * sizeof *a);
    return a;
}

static double *to_double(const float *a, size_t n) {
    double *d = calloc(n ? n : 1, sizeof *d);
    assert_non_null(d);
    for (size_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}

static float *to_float(const double *a, size_t n) {
    float *f = fzeros(n);
    for (size_t i = 0; i < n; i++) f[i] = (float)a[i];
    return f;
}

typedef double (*objective_fn)(void *ctx);

/* grad[i] = (f(x + h e_i) - f(x - h e_i)) / 2h, x being an array inside ctx. */
static void fd_gradient(objective_fn f, void *ctx, double *x, size_t n, double *grad) {
    for (size_t i = 0; i < n; i++) {
        const double save = x[i];
        x[i] = save + FD_STEP;
        const double lp = f(ctx);
        x[i] = save - FD_STEP;
        const double lm = f(ctx);
        x[i] = save;
        grad[i] = (lp - lm) / (2.0 * FD_STEP);
    }
}

static void check_rel(const float *got, const double *want, size_t n, double tol, const char *what) {
    float *w = to_float(want, n);
    const double err = rel_maxabs_err(got, w, n, GRAD_FLOOR);
    free(w);
    if (!(err <= tol)) fail_msg("%s: relative max-abs error %.3g > %.1g", what, err, tol);
}

static void check_grad(const float *analytic, const double *fd, size_t n, const char *what) {
    check_rel(analytic, fd, n, GRAD_RTOL, what);
}

/* acc (the result of two backward calls) must be 2 * once. */
static void check_doubled(const float *acc, const float *once, size_t n, const char *what) {
    double *twice = calloc(n, sizeof *twice);
    assert_non_null(twice);
    for (size_t i = 0; i < n; i++) twice[i] = 2.0 * once[i];
    check_rel(acc, twice, n, ACCUM_RTOL, what);
    free(twice);
}

static void check_equal(const float *a, const float *b, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) fail_msg("%s: element %zu differs: %.9g vs %.9g", what, i, a[i], b[i]);
}

/* ---------------------------------------------------------------------- */
/* embedding */

typedef struct {
    size_t T, C;
    const int32_t *tokens;
    double *wte, *Rw;
} emb_ctx;

static double emb_obj(void *p) {
    const emb_ctx *c = p;
    double L = 0;
    for (size_t t = 0; t < c->T; t++)
        for (size_t i = 0; i < c->C; i++) L += c->wte[(size_t)c->tokens[t] * c->C + i] * c->Rw[t * c->C + i];
    return L;
}

static void test_embedding_forward(void **state) {
    (void)state;
    rng_t rng = {1};
    const int32_t tokens[T_] = {3, 0, 36, 3, 17};
    float *wte = frand(&rng, V_ * C_, -1, 1), *out = fzeros(T_ * C_);
    embedding_forward(out, tokens, wte, T_, C_);
    for (size_t t = 0; t < T_; t++) check_equal(out + t * C_, wte + (size_t)tokens[t] * C_, C_, "embedding row");
    free(wte);
    free(out);
}

static void test_embedding_backward(void **state) {
    (void)state;
    rng_t rng = {2};
    const int32_t tokens[T_] = {3, 0, 36, 3, 17}; /* token 3 repeats: its rows add up */
    float *wte = frand(&rng, V_ * C_, -1, 1), *Rw = frand(&rng, T_ * C_, -1, 1);
    float *dwte = fzeros(V_ * C_);
    embedding_backward(dwte, Rw, tokens, T_, C_);

    emb_ctx ctx = {T_, C_, tokens, to_double(wte, V_ * C_), to_double(Rw, T_ * C_)};
    double *fd = calloc(V_ * C_, sizeof *fd);
    fd_gradient(emb_obj, &ctx, ctx.wte, V_ * C_, fd);
    check_grad(dwte, fd, V_ * C_, "embedding dwte");

    float *once = fcopy(dwte, V_ * C_);
    embedding_backward(dwte, Rw, tokens, T_, C_);
    check_doubled(dwte, once, V_ * C_, "embedding dwte accumulation");
    embedding_backward(NULL, Rw, tokens, T_, C_); /* no gradient wanted: a no-op */

    free(wte), free(Rw), free(dwte), free(once), free(fd), free(ctx.wte), free(ctx.Rw);
}

/* ---------------------------------------------------------------------- */
/* RMSNorm */

static void rmsnorm_twin(double *out, const double *x, const double *w, size_t T, size_t C, double eps) {
    for (size_t t = 0; t < T; t++) {
        double ss = 0;
        for (size_t i = 0; i < C; i++) ss += x[t * C + i] * x[t * C + i];
        const double r = 1.0 / sqrt(ss / (double)C + eps);
        for (size_t i = 0; i < C; i++) out[t * C + i] = w[i] * x[t * C + i] * r;
    }
}

typedef struct {
    size_t T, C;
    double eps;
    double *x, *w, *Rw, *out;
} rms_ctx;

static double rms_obj(void *p) {
    const rms_ctx *c = p;
    rmsnorm_twin(c->out, c->x, c->w, c->T, c->C, c->eps);
    double L = 0;
    for (size_t i = 0; i < c->T * c->C; i++) L += c->out[i] * c->Rw[i];
    return L;
}

static void test_rmsnorm_forward(void **state) {
    (void)state;
    rng_t rng = {3};
    float *x = frand(&rng, T_ * C_, -2, 2), *w = frand(&rng, C_, 0.5f, 1.5f);
    x[0] = 1e-3f; /* a tiny row start; the eps matters for a near-zero row */
    for (size_t i = 0; i < C_; i++) x[C_ + i] = 1e-4f * (float)(i + 1);
    float *out = fzeros(T_ * C_), *rstd = fzeros(T_);
    rmsnorm_forward(out, rstd, x, w, T_, C_, RMS_EPS);

    double *xd = to_double(x, T_ * C_), *wd = to_double(w, C_), *ref = calloc(T_ * C_, sizeof *ref);
    rmsnorm_twin(ref, xd, wd, T_, C_, (double)RMS_EPS);
    check_rel(out, ref, T_ * C_, FWD_RTOL, "rmsnorm out");
    for (size_t t = 0; t < T_; t++) {
        double ss = 0;
        for (size_t i = 0; i < C_; i++) ss += xd[t * C_ + i] * xd[t * C_ + i];
        assert_close(rstd[t], 1.0 / sqrt(ss / C_ + (double)RMS_EPS), 1e-6, 0, "rstd[%zu]", t);
    }
    free(x), free(w), free(out), free(rstd), free(xd), free(wd), free(ref);
}

static void test_rmsnorm_backward(void **state) {
    (void)state;
    rng_t rng = {4};
    const size_t n = T_ * C_;
    float *x = frand(&rng, n, -2, 2), *w = frand(&rng, C_, 0.5f, 1.5f), *Rw = frand(&rng, n, -1, 1);
    float *out = fzeros(n), *rstd = fzeros(T_), *dx = fzeros(n), *dw = fzeros(C_);
    /* a larger eps so that its term in the gradient is visible */
    const float eps = 0.05f;
    rmsnorm_forward(out, rstd, x, w, T_, C_, eps);
    rmsnorm_backward(dx, dw, Rw, x, w, rstd, T_, C_);

    rms_ctx ctx = {T_, C_, eps, to_double(x, n), to_double(w, C_), to_double(Rw, n), calloc(n, sizeof(double))};
    double *fdx = calloc(n, sizeof *fdx), *fdw = calloc(C_, sizeof *fdw);
    fd_gradient(rms_obj, &ctx, ctx.x, n, fdx);
    fd_gradient(rms_obj, &ctx, ctx.w, C_, fdw);
    check_grad(dx, fdx, n, "rmsnorm dinp");
    check_grad(dw, fdw, C_, "rmsnorm dweight");

    /* accumulation, and NULL gradients leave the others unchanged */
    float *dx1 = fcopy(dx, n), *dw1 = fcopy(dw, C_);
    rmsnorm_backward(dx, dw, Rw, x, w, rstd, T_, C_);
    check_doubled(dx, dx1, n, "rmsnorm dinp accumulation");
    check_doubled(dw, dw1, C_, "rmsnorm dweight accumulation");
    float *dx_only = fzeros(n), *dw_only = fzeros(C_);
    rmsnorm_backward(dx_only, NULL, Rw, x, w, rstd, T_, C_);
    rmsnorm_backward(NULL, dw_only, Rw, x, w, rstd, T_, C_);
    check_equal(dx_only, dx1, n, "rmsnorm dinp alone");
    check_equal(dw_only, dw1, C_, "rmsnorm dweight alone");

    free(x), free(w), free(Rw), free(out), free(rstd), free(dx), free(dw), free(dx1), free(dw1);
    free(dx_only), free(dw_only), free(fdx), free(fdw);
    free(ctx.x), free(ctx.w), free(ctx.Rw), free(ctx.out);
}

/* ---------------------------------------------------------------------- */
/* matmul */

typedef struct {
    size_t T, C, OC;
    double *x, *w, *b, *Rw;
} mm_ctx;

static double mm_obj(void *p) {
    const mm_ctx *c = p;
    double L = 0;
    for (size_t t = 0; t < c->T; t++)
        for (size_t o = 0; o < c->OC; o++) {
            double y = c->b ? c->b[o] : 0;
            for (size_t i = 0; i < c->C; i++) y += c->x[t * c->C + i] * c->w[o * c->C + i];
            L += y * c->Rw[t * c->OC + o];
        }
    return L;
}

static void test_matmul_forward(void **state) {
    (void)state;
    rng_t rng = {5};
    float *x = frand(&rng, T_ * C_, -1, 1), *w = frand(&rng, OC_ * C_, -1, 1), *b = frand(&rng, OC_, -1, 1);
    float *out = frand(&rng, T_ * OC_, 5, 6); /* garbage: matmul_forward overwrites */
    for (int with_bias = 0; with_bias <= 1; with_bias++) {
        matmul_forward(out, x, w, with_bias ? b : NULL, T_, C_, OC_);
        double ref[T_ * OC_];
        for (size_t t = 0; t < T_; t++)
            for (size_t o = 0; o < OC_; o++) {
                double y = with_bias ? b[o] : 0;
                for (size_t i = 0; i < C_; i++) y += (double)x[t * C_ + i] * w[o * C_ + i];
                ref[t * OC_ + o] = y;
            }
        check_rel(out, ref, T_ * OC_, FWD_RTOL, with_bias ? "matmul with bias" : "matmul without bias");
    }
    free(x), free(w), free(b), free(out);
}

static void test_matmul_backward(void **state) {
    (void)state;
    rng_t rng = {6};
    float *x = frand(&rng, T_ * C_, -1, 1), *w = frand(&rng, OC_ * C_, -1, 1), *b = frand(&rng, OC_, -1, 1);
    float *Rw = frand(&rng, T_ * OC_, -1, 1);
    float *dx = fzeros(T_ * C_), *dw = fzeros(OC_ * C_), *db = fzeros(OC_);
    matmul_backward(dx, dw, db, Rw, x, w, T_, C_, OC_);

    mm_ctx ctx = {T_, C_, OC_, to_double(x, T_ * C_), to_double(w, OC_ * C_), to_double(b, OC_),
                  to_double(Rw, T_ * OC_)};
    double *fdx = calloc(T_ * C_, sizeof *fdx), *fdw = calloc(OC_ * C_, sizeof *fdw), *fdb = calloc(OC_, sizeof *fdb);
    fd_gradient(mm_obj, &ctx, ctx.x, T_ * C_, fdx);
    fd_gradient(mm_obj, &ctx, ctx.w, OC_ * C_, fdw);
    fd_gradient(mm_obj, &ctx, ctx.b, OC_, fdb);
    check_grad(dx, fdx, T_ * C_, "matmul dinp");
    check_grad(dw, fdw, OC_ * C_, "matmul dweight");
    check_grad(db, fdb, OC_, "matmul dbias");

    float *dx1 = fcopy(dx, T_ * C_), *dw1 = fcopy(dw, OC_ * C_), *db1 = fcopy(db, OC_);
    matmul_backward(dx, dw, db, Rw, x, w, T_, C_, OC_);
    check_doubled(dx, dx1, T_ * C_, "matmul dinp accumulation");
    check_doubled(dw, dw1, OC_ * C_, "matmul dweight accumulation");
    check_doubled(db, db1, OC_, "matmul dbias accumulation");
    float *dw_only = fzeros(OC_ * C_);
    matmul_backward(NULL, dw_only, NULL, Rw, x, w, T_, C_, OC_);
    check_rel(dw_only, fdw, OC_ * C_, GRAD_RTOL, "matmul dweight alone");

    free(x), free(w), free(b), free(Rw), free(dx), free(dw), free(db), free(dx1), free(dw1), free(db1);
    free(dw_only), free(fdx), free(fdw), free(fdb), free(ctx.x), free(ctx.w), free(ctx.b), free(ctx.Rw);
}

/* ---------------------------------------------------------------------- */
/* RoPE */

static void test_rope_tables(void **state) {
    (void)state;
    enum { T = 40, HALF = HD_ / 2 };
    const float thetas[2] = {ROPE_THETA, ROPE_THETA_QWEN};
    float cos_t[T * HALF], sin_t[T * HALF];
    for (int k = 0; k < 2; k++) {
        const float theta = thetas[k];
        rope_tables(cos_t, sin_t, T, HD_, theta);
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < HALF; i++) {
                /* Hugging Face's fp32 recipe: inv_freq = 1/theta^(arange(0,hd,2).float()/hd),
                 * angle = float(pos) * inv_freq in fp32; cos/sin of that fp32 angle. */
                const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)HD_);
                const float angle = (float)t * inv_freq;
                assert_close(cos_t[t * HALF + i], cos((double)angle), 0, 1.2e-7, "cos[%zu,%zu]", t, i);
                assert_close(sin_t[t * HALF + i], sin((double)angle), 0, 1.2e-7, "sin[%zu,%zu]", t, i);
                /* and the exact formula, up to the fp32 angle rounding (angle < T) */
                const double exact = (double)t * pow((double)theta, -(double)(2 * i) / HD_);
                assert_close(cos_t[t * HALF + i], cos(exact), 0, 1e-5, "exact cos[%zu,%zu]", t, i);
                assert_close(sin_t[t * HALF + i], sin(exact), 0, 1e-5, "exact sin[%zu,%zu]", t, i);
            }
        /* frequency 0 has inv_freq exactly 1: the angle is the position */
        assert_true(cos_t[3 * HALF] == cosf(3.0f));
        assert_true(cos_t[0] == 1.0f && sin_t[HALF - 1] == 0.0f);
    }
}

static void rope_twin(double *x, const float *cos_t, const float *sin_t, size_t T, size_t nh, size_t hd) {
    const size_t half = hd / 2;
    for (size_t t = 0; t < T; t++)
        for (size_t h = 0; h < nh; h++) {
            double *v = x + (t * nh + h) * hd;
            for (size_t i = 0; i < half; i++) {
                const double c = cos_t[t * half + i], s = sin_t[t * half + i];
                const double a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
}

typedef struct {
    size_t T, nh, hd;
    const float *cos_t, *sin_t;
    double *x, *Rw, *tmp;
} rope_ctx;

static double rope_obj(void *p) {
    const rope_ctx *c = p;
    const size_t n = c->T * c->nh * c->hd;
    memcpy(c->tmp, c->x, n * sizeof *c->tmp);
    rope_twin(c->tmp, c->cos_t, c->sin_t, c->T, c->nh, c->hd);
    double L = 0;
    for (size_t i = 0; i < n; i++) L += c->tmp[i] * c->Rw[i];
    return L;
}

static void test_rope_forward(void **state) {
    (void)state;
    rng_t rng = {7};
    enum { HALF = HD_ / 2, N = T_ * NH_ * HD_ };
    float cos_t[T_ * HALF], sin_t[T_ * HALF];
    rope_tables(cos_t, sin_t, T_, HD_, ROPE_THETA);
    float *x = frand(&rng, N, -1, 1), *y = fcopy(x, N);
    rope_forward(y, cos_t, sin_t, T_, NH_, HD_);
    /* explicit formula with exact angles, half-split pairs (i, i + hd/2) */
    double ref[N];
    for (size_t t = 0; t < T_; t++)
        for (size_t h = 0; h < NH_; h++)
            for (size_t i = 0; i < HALF; i++) {
                const double ang = (double)t / pow(ROPE_THETA, 2.0 * (double)i / HD_);
                const size_t b = (t * NH_ + h) * HD_;
                const double x1 = x[b + i], x2 = x[b + i + HALF];
                ref[b + i] = x1 * cos(ang) - x2 * sin(ang);
                ref[b + i + HALF] = x2 * cos(ang) + x1 * sin(ang);
            }
    check_rel(y, ref, N, FWD_RTOL, "rope forward");
    check_equal(y, x, NH_ * HD_, "rope at position 0 is the identity");
    /* the rotation is orthogonal: backward (the transpose) undoes forward */
    rope_backward(y, cos_t, sin_t, T_, NH_, HD_);
    double *xd = to_double(x, N);
    check_rel(y, xd, N, FWD_RTOL, "rope backward o forward");
    free(x), free(y), free(xd);
}

static void test_rope_backward(void **state) {
    (void)state;
    rng_t rng = {8};
    enum { HALF = HD_ / 2, N = T_ * NH_ * HD_ };
    float cos_t[T_ * HALF], sin_t[T_ * HALF];
    rope_tables(cos_t, sin_t, T_, HD_, ROPE_THETA);
    float *x = frand(&rng, N, -1, 1), *Rw = frand(&rng, N, -1, 1), *dx = fcopy(Rw, N);
    rope_backward(dx, cos_t, sin_t, T_, NH_, HD_);
    rope_ctx ctx = {T_, NH_, HD_, cos_t, sin_t, to_double(x, N), to_double(Rw, N), calloc(N, sizeof(double))};
    double *fd = calloc(N, sizeof *fd);
    fd_gradient(rope_obj, &ctx, ctx.x, N, fd);
    check_grad(dx, fd, N, "rope dx");
    free(x), free(Rw), free(dx), free(fd), free(ctx.x), free(ctx.Rw), free(ctx.tmp);
}

/* ---------------------------------------------------------------------- */
/* attention */

/* Naive causal GQA attention in double; lse (nh,T), the logsumexp of each row's
 * scaled scores, optional. */
static void attention_twin(double *out, double *lse, const double *q, const double *k, const double *v, size_t T,
                           size_t nh, size_t nkv, size_t hd) {
    const double scale = 1.0 / sqrt((double)hd);
    double *sc = calloc(T, sizeof *sc);
    for (size_t h = 0; h < nh; h++) {
        const size_t g = h / (nh / nkv);
        for (size_t t = 0; t < T; t++) {
            double m = -INFINITY, sum = 0;
            for (size_t s = 0; s <= t; s++) {
                double d = 0;
                for (size_t i = 0; i < hd; i++) d += q[(t * nh + h) * hd + i] * k[(s * nkv + g) * hd + i];
                sc[s] = d * scale;
                if (sc[s] > m) m = sc[s];
            }
            for (size_t s = 0; s <= t; s++) sum += exp(sc[s] - m);
            if (lse) lse[h * T + t] = m + log(sum);
            for (size_t i = 0; i < hd; i++) out[(t * nh + h) * hd + i] = 0;
            for (size_t s = 0; s <= t; s++) {
                const double p = exp(sc[s] - m) / sum;
                for (size_t i = 0; i < hd; i++) out[(t * nh + h) * hd + i] += p * v[(s * nkv + g) * hd + i];
            }
        }
    }
    free(sc);
}

typedef struct {
    size_t T, nh, nkv, hd;
    double *q, *k, *v, *Rw, *out;
} att_ctx;

static double att_obj(void *p) {
    const att_ctx *c = p;
    attention_twin(c->out, NULL, c->q, c->k, c->v, c->T, c->nh, c->nkv, c->hd);
    double L = 0;
    for (size_t i = 0; i < c->T * c->nh * c->hd; i++) L += c->out[i] * c->Rw[i];
    return L;
}

static void check_attention_forward(size_t T, size_t nh, size_t nkv, size_t hd, uint64_t seed) {
    rng_t rng = {seed};
    const size_t nq = T * nh * hd, nk = T * nkv * hd, nl = nh * T;
    float *q = frand(&rng, nq, -2, 2), *k = frand(&rng, nk, -2, 2), *v = frand(&rng, nk, -1, 1);
    float *out = frand(&rng, nq, 3, 4), *lse = frand(&rng, nl, 3, 4); /* garbage: overwritten */
    attention_forward(out, lse, q, k, v, T, nh, nkv, hd);
    double *qd = to_double(q, nq), *kd = to_double(k, nk), *vd = to_double(v, nk);
    double *ref = calloc(nq, sizeof *ref), *ref_lse = calloc(nl, sizeof *ref_lse);
    attention_twin(ref, ref_lse, qd, kd, vd, T, nh, nkv, hd);
    check_rel(out, ref, nq, FWD_RTOL, "attention out");
    check_rel(lse, ref_lse, nl, FWD_RTOL, "attention logsumexp");
    free(q), free(k), free(v), free(out), free(lse), free(qd), free(kd), free(vd), free(ref), free(ref_lse);
}

static void test_attention_forward(void **state) {
    (void)state;
    check_attention_forward(T_, NH_, NKV_, HD_, 9); /* GQA */
    check_attention_forward(T_, NH_, NH_, HD_, 10); /* MHA */
    check_attention_forward(T_, NH_, 1, HD_, 11);   /* MQA */
    check_attention_forward(1, NH_, NKV_, HD_, 12); /* a single token */
    /* more rows and keys than one 64 x 64 tile of the blocked (SIMD) attention,
     * with a short last tile, and head sizes that are not a multiple of 8 or 16 */
    check_attention_forward(150, 3, 1, 20, 27);
    check_attention_forward(65, 2, 2, 7, 28);
}

/* Output and logsumexp at t do not depend on tokens after t. */
static void test_attention_causal(void **state) {
    (void)state;
    rng_t rng = {13};
    const size_t nq = T_ * NH_ * HD_, nk = T_ * NKV_ * HD_, nl = NH_ * T_;
    float *q = frand(&rng, nq, -2, 2), *k = frand(&rng, nk, -2, 2), *v = frand(&rng, nk, -1, 1);
    float *out = fzeros(nq), *lse = fzeros(nl), *out2 = fzeros(nq), *lse2 = fzeros(nl);
    attention_forward(out, lse, q, k, v, T_, NH_, NKV_, HD_);
    for (size_t t0 = 0; t0 + 1 < T_; t0++) {
        float *q2 = fcopy(q, nq), *k2 = fcopy(k, nk), *v2 = fcopy(v, nk);
        for (size_t i = (t0 + 1) * NH_ * HD_; i < nq; i++) q2[i] = rng_uniform(&rng, -2, 2);
        for (size_t i = (t0 + 1) * NKV_ * HD_; i < nk; i++) {
            k2[i] = rng_uniform(&rng, -2, 2);
            v2[i] = rng_uniform(&rng, -1, 1);
        }
        attention_forward(out2, lse2, q2, k2, v2, T_, NH_, NKV_, HD_);
        check_equal(out2, out, (t0 + 1) * NH_ * HD_, "attention output before the change");
        for (size_t h = 0; h < NH_; h++)
            check_equal(lse2 + h * T_, lse + h * T_, t0 + 1, "attention logsumexp before the change");
        /* and the change is visible after t0 */
        int differs = 0;
        for (size_t i = (t0 + 1) * NH_ * HD_; i < nq; i++) differs |= out2[i] != out[i];
        assert_true(differs);
        free(q2), free(k2), free(v2);
    }
    free(q), free(k), free(v), free(out), free(lse), free(out2), free(lse2);
}

/* Head h uses kv head h / (nh/nkv): with v constant per kv head, every output
 * element of head h equals that constant. */
static void test_attention_gqa_mapping(void **state) {
    (void)state;
    rng_t rng = {14};
    enum { NKV = 2, NH = 6 }; /* groups of 3: heads 0-2 -> kv 0, heads 3-5 -> kv 1 */
    const size_t nq = T_ * NH * HD_, nk = T_ * NKV * HD_;
    const float vconst[NKV] = {-3.0f, 7.0f};
    float *q = frand(&rng, nq, -2, 2), *k = frand(&rng, nk, -2, 2), *v = fzeros(nk);
    for (size_t t = 0; t < T_; t++)
        for (size_t g = 0; g < NKV; g++)
            for (size_t i = 0; i < HD_; i++) v[(t * NKV + g) * HD_ + i] = vconst[g];
    float *out = fzeros(nq), *lse = fzeros(NH * T_);
    attention_forward(out, lse, q, k, v, T_, NH, NKV, HD_);
    for (size_t t = 0; t < T_; t++)
        for (size_t h = 0; h < NH; h++)
            for (size_t i = 0; i < HD_; i++)
                assert_close(out[(t * NH + h) * HD_ + i], vconst[h / (NH / NKV)], 1e-6, 0, "out t=%zu h=%zu", t, h);
    free(q), free(k), free(v), free(out), free(lse);
}

static void check_attention_backward(size_t T, size_t nh, size_t nkv, size_t hd, uint64_t seed) {
    rng_t rng = {seed};
    const size_t nq = T * nh * hd, nk = T * nkv * hd, nl = nh * T;
    float *q = frand(&rng, nq, -2, 2), *k = frand(&rng, nk, -2, 2), *v = frand(&rng, nk, -1, 1);
    float *Rw = frand(&rng, nq, -1, 1);
    float *out = fzeros(nq), *lse = fzeros(nl);
    float *dq = fzeros(nq), *dk = fzeros(nk), *dv = fzeros(nk);
    attention_forward(out, lse, q, k, v, T, nh, nkv, hd);
    attention_backward(dq, dk, dv, Rw, q, k, v, out, lse, T, nh, nkv, hd);

    att_ctx ctx = {T, nh, nkv, hd, to_double(q, nq), to_double(k, nk), to_double(v, nk), to_double(Rw, nq),
                   calloc(nq, sizeof(double))};
    double *fdq = calloc(nq, sizeof *fdq), *fdk = calloc(nk, sizeof *fdk), *fdv = calloc(nk, sizeof *fdv);
    fd_gradient(att_obj, &ctx, ctx.q, nq, fdq);
    fd_gradient(att_obj, &ctx, ctx.k, nk, fdk);
    fd_gradient(att_obj, &ctx, ctx.v, nk, fdv);
    check_grad(dq, fdq, nq, "attention dq");
    check_grad(dk, fdk, nk, "attention dk");
    check_grad(dv, fdv, nk, "attention dv");

    float *dq1 = fcopy(dq, nq), *dk1 = fcopy(dk, nk), *dv1 = fcopy(dv, nk);
    attention_backward(dq, dk, dv, Rw, q, k, v, out, lse, T, nh, nkv, hd);
    check_doubled(dq, dq1, nq, "attention dq accumulation");
    check_doubled(dk, dk1, nk, "attention dk accumulation");
    check_doubled(dv, dv1, nk, "attention dv accumulation");
    float *dq_only = fzeros(nq), *dk_only = fzeros(nk), *dv_only = fzeros(nk);
    attention_backward(dq_only, NULL, NULL, Rw, q, k, v, out, lse, T, nh, nkv, hd);
    attention_backward(NULL, dk_only, NULL, Rw, q, k, v, out, lse, T, nh, nkv, hd);
    attention_backward(NULL, NULL, dv_only, Rw, q, k, v, out, lse, T, nh, nkv, hd);
    check_equal(dq_only, dq1, nq, "attention dq alone");
    check_equal(dk_only, dk1, nk, "attention dk alone");
    check_equal(dv_only, dv1, nk, "attention dv alone");

    free(q), free(k), free(v), free(Rw), free(out), free(lse), free(dq), free(dk), free(dv);
    free(dq1), free(dk1), free(dv1), free(dq_only), free(dk_only), free(dv_only);
    free(fdq), free(fdk), free(fdv), free(ctx.q), free(ctx.k), free(ctx.v), free(ctx.Rw), free(ctx.out);
}

static void test_attention_backward(void **state) {
    (void)state;
    check_attention_backward(T_, NH_, NKV_, HD_, 15); /* GQA */
    check_attention_backward(T_, NH_, NH_, HD_, 16);  /* MHA */
    check_attention_backward(T_, NH_, 1, HD_, 17);    /* MQA */
    /* two query blocks and two key tiles of the blocked attention, the second short */
    check_attention_backward(70, 2, 1, 3, 29);
}

/* ---------------------------------------------------------------------- */
/* SwiGLU */

static double silu_d(double g) { return g / (1.0 + exp(-g)); }

typedef struct {
    size_t N;
    double *g, *u, *Rw;
} swiglu_ctx;

static double swiglu_obj(void *p) {
    const swiglu_ctx *c = p;
    double L = 0;
    for (size_t i = 0; i < c->N; i++) L += silu_d(c->g[i]) * c->u[i] * c->Rw[i];
    return L;
}

enum { SWIGLU_N = T_ * 11 };

static void swiglu_inputs(rng_t *rng, float **g, float **u) {
    *g = frand(rng, SWIGLU_N, -6, 6);
    *u = frand(rng, SWIGLU_N, -2, 2);
    (*g)[0] = -40.0f; /* saturated sigmoid on both sides */
    (*g)[1] = 40.0f;
    (*g)[2] = 0.0f;
}

static void test_swiglu_forward(void **state) {
    (void)state;
    rng_t rng = {18};
    float *g, *u;
    swiglu_inputs(&rng, &g, &u);
    float *out = fzeros(SWIGLU_N);
    swiglu_forward(out, g, u, SWIGLU_N);
    double ref[SWIGLU_N];
    for (size_t i = 0; i < SWIGLU_N; i++) ref[i] = silu_d(g[i]) * u[i];
    check_rel(out, ref, SWIGLU_N, FWD_RTOL, "swiglu out");
    for (size_t i = 0; i < SWIGLU_N; i++) assert_close(out[i], ref[i], 1e-6, 1e-12, "swiglu out[%zu]", i);
    free(g), free(u), free(out);
}

static void test_swiglu_backward(void **state) {
    (void)state;
    rng_t rng = {19};
    float *g, *u;
    swiglu_inputs(&rng, &g, &u);
    float *Rw = frand(&rng, SWIGLU_N, -1, 1), *dg = fzeros(SWIGLU_N), *du = fzeros(SWIGLU_N);
    swiglu_backward(dg, du, Rw, g, u, SWIGLU_N);
    swiglu_ctx ctx = {SWIGLU_N, to_double(g, SWIGLU_N), to_double(u, SWIGLU_N), to_double(Rw, SWIGLU_N)};
    double *fdg = calloc(SWIGLU_N, sizeof *fdg), *fdu = calloc(SWIGLU_N, sizeof *fdu);
    fd_gradient(swiglu_obj, &ctx, ctx.g, SWIGLU_N, fdg);
    fd_gradient(swiglu_obj, &ctx, ctx.u, SWIGLU_N, fdu);
    check_grad(dg, fdg, SWIGLU_N, "swiglu dgate");
    check_grad(du, fdu, SWIGLU_N, "swiglu dup");

    float *dg1 = fcopy(dg, SWIGLU_N), *du1 = fcopy(du, SWIGLU_N);
    swiglu_backward(dg, du, Rw, g, u, SWIGLU_N);
    check_doubled(dg, dg1, SWIGLU_N, "swiglu dgate accumulation");
    check_doubled(du, du1, SWIGLU_N, "swiglu dup accumulation");
    float *dg_only = fzeros(SWIGLU_N);
    swiglu_backward(dg_only, NULL, Rw, g, u, SWIGLU_N);
    check_equal(dg_only, dg1, SWIGLU_N, "swiglu dgate alone");

    free(g), free(u), free(Rw), free(dg), free(du), free(dg1), free(du1), free(dg_only), free(fdg), free(fdu);
    free(ctx.g), free(ctx.u), free(ctx.Rw);
}

/* ---------------------------------------------------------------------- */
/* LM head */

/* Naive double log-softmax head over the whole (R,V) logits. */
typedef struct {
    double *logp, *lse, *entropy, *mean_logit, *lssp;
    uint8_t *top1;
} lmhead_ref;

static void lmhead_twin(lmhead_ref *o, const double *h, const double *w, const int32_t *labels, size_t R,
                        size_t C, size_t V) {
    double *l = calloc(V, sizeof *l);
    for (size_t r = 0; r < R; r++) {
        double m = -INFINITY, mean = 0;
        for (size_t j = 0; j < V; j++) {
            double d = 0;
            for (size_t i = 0; i < C; i++) d += h[r * C + i] * w[j * C + i];
            l[j] = d;
            if (d > m) m = d;
            mean += d;
        }
        double s = 0;
        for (size_t j = 0; j < V; j++) s += exp(l[j] - m);
        const double lse = m + log(s);
        double ent = 0, sq = 0;
        for (size_t j = 0; j < V; j++) {
            const double lp = l[j] - lse, p = exp(lp);
            ent -= p * lp;
            sq += p * p;
        }
        o->logp[r] = l[labels[r]] - lse;
        if (o->lse) o->lse[r] = lse;
        if (o->entropy) o->entropy[r] = ent;
        if (o->mean_logit) o->mean_logit[r] = mean / (double)V;
        if (o->lssp) o->lssp[r] = log(sq);
        if (o->top1) o->top1[r] = l[labels[r]] >= m;
    }
    free(l);
}

typedef struct {
    size_t R, C, V;
    const int32_t *labels;
    double *h, *w, *dlogp, *logp;
} lmh_ctx;

static double lmh_obj(void *p) {
    const lmh_ctx *c = p;
    lmhead_ref o = {.logp = c->logp};
    lmhead_twin(&o, c->h, c->w, c->labels, c->R, c->C, c->V);
    double L = 0;
    for (size_t r = 0; r < c->R; r++) L += c->logp[r] * c->dlogp[r];
    return L;
}

typedef struct {
    float logp[R_], lse[R_], entropy[R_], mean_logit[R_], lssp[R_];
    uint8_t top1[R_];
} lmhead_bufs;

static lmhead_out lmhead_out_of(lmhead_bufs *b) {
    return (lmhead_out){b->logp, b->lse, b->entropy, b->mean_logit, b->lssp, b->top1};
}

/* Runs the head with `chunk` (0 = the public lmhead_forward) and compares every
 * output with the double twin. */
static void check_lmhead_forward(const float *h, const float *w, const int32_t *labels, size_t chunk,
                                 const char *what) {
    lmhead_bufs b;
    memset(&b, 0xff, sizeof b); /* NaN garbage: all outputs must be written */
    lmhead_out o = lmhead_out_of(&b);
    float *scratch = fzeros(R_ * V_);
    if (chunk) lmhead_forward_chunked(&o, h, w, labels, R_, C_, V_, scratch, chunk);
    else lmhead_forward(&o, h, w, labels, R_, C_, V_, scratch);

    double *hd = to_double(h, R_ * C_), *wd = to_double(w, V_ * C_);
    double logp[R_], lse[R_], ent[R_], mean[R_], lssp[R_];
    uint8_t top1[R_];
    lmhead_ref ref = {logp, lse, ent, mean, lssp, top1};
    lmhead_twin(&ref, hd, wd, labels, R_, C_, V_);
    char name[128];
#define CHECK_OUT(field, reff)                                                        \
    do {                                                                              \
        snprintf(name, sizeof name, "%s (chunk %zu): " #field, what, chunk);          \
        check_rel(b.field, reff, R_, FWD_RTOL, name);                                 \
    } while (0)
    CHECK_OUT(logp, logp);
    CHECK_OUT(lse, lse);
    CHECK_OUT(entropy, ent);
    CHECK_OUT(mean_logit, mean);
    CHECK_OUT(lssp, lssp);
#undef CHECK_OUT
    for (size_t r = 0; r < R_; r++)
        if (b.top1[r] != top1[r])
            fail_msg("%s (chunk %zu): is_top1[%zu] = %d, expected %d", what, chunk, r, b.top1[r], top1[r]);
    free(scratch), free(hd), free(wd);
}

/* chunk widths: one column, several chunks with a short last one, exact and
 * larger than V, and the public LMHEAD_CHUNK path (0) */
static const size_t lmhead_chunks[] = {1, SMALL_CHUNK, V_ - 1, V_, 64, 0};

static void test_lmhead_forward(void **state) {
    (void)state;
    rng_t rng = {20};
    float *h = frand(&rng, R_ * C_, -1, 1), *w = frand(&rng, V_ * C_, -1, 1);
    int32_t labels[R_] = {0, 36, 8, 15, 16, 23};
    /* make two rows' labels their argmax so is_top1 is exercised both ways */
    double *hd = to_double(h, R_ * C_), *wd = to_double(w, V_ * C_);
    for (size_t r = 0; r < 2; r++) {
        double best = -INFINITY;
        for (size_t j = 0; j < V_; j++) {
            double d = 0;
            for (size_t i = 0; i < C_; i++) d += hd[r * C_ + i] * wd[j * C_ + i];
            if (d > best) best = d, labels[r] = (int32_t)j;
        }
    }
    for (size_t k = 0; k < sizeof lmhead_chunks / sizeof *lmhead_chunks; k++)
        check_lmhead_forward(h, w, labels, lmhead_chunks[k], "random logits");
    free(h), free(w), free(hd), free(wd);
}

/* Logits far beyond expf's range (|l| ~ 200), the max in the last chunk: the
 * online rescaling across chunks must neither overflow nor lose the sums. */
static void test_lmhead_large_logits(void **state) {
    (void)state;
    rng_t rng = {21};
    float *h = frand(&rng, R_ * C_, -1, 1), *w = frand(&rng, V_ * C_, -40, 40);
    for (size_t r = 0; r < R_; r++) /* row r's strongest column is in the last chunk */
        for (size_t i = 0; i < C_; i++) w[(V_ - 1 - r % 3) * C_ + i] = 60.0f * h[r % 3 * C_ + i];
    const int32_t labels[R_] = {36, 5, 35, 9, 34, 0};
    for (size_t k = 0; k < sizeof lmhead_chunks / sizeof *lmhead_chunks; k++)
        check_lmhead_forward(h, w, labels, lmhead_chunks[k], "large logits");
    free(h), free(w);
}

/* is_top1 is "argmax == label" with torch.argmax's first-maximal-index rule (what
 * TRL's fused head reports): integer data makes the logits exact, so ties are real
 * ties, and a label tied with an EARLIER index is not top-1. */
static void test_lmhead_top1_ties(void **state) {
    (void)state;
    rng_t rng = {22};
    float *h = fzeros(R_ * C_), *w = fzeros(V_ * C_);
    for (size_t i = 0; i < R_ * C_; i++) h[i] = (float)((int)(rng_next(&rng) % 5) - 2);
    for (size_t i = 0; i < V_ * C_; i++) w[i] = (float)((int)(rng_next(&rng) % 3) - 1);
    const size_t tie_a = 3, tie_b = 30; /* different chunks of SMALL_CHUNK */
    for (size_t r = 0; r < R_; r++) h[r * C_] = 1.0f; /* every row has h[0] = 1 */
    const size_t runner_up = 29;
    for (size_t i = 0; i < C_; i++) w[tie_a * C_ + i] = w[tie_b * C_ + i] = w[runner_up * C_ + i] = 0.0f;
    w[tie_a * C_] = w[tie_b * C_] = 1000.0f; /* logit 1000 in both columns, the max */
    w[runner_up * C_] = 999.0f;              /* the runner-up, one below */
    /* the other logits are below 30, so p(tied label) = 1 / (2 + e^-1) */
    const double tied_logp = -log(2.0 + exp(-1.0));
    const int32_t labels[R_] = {(int32_t)tie_b, (int32_t)tie_a, (int32_t)runner_up, 0, (int32_t)tie_b, 36};
    /* torch.argmax semantics: the first maximal index (tie_a < tie_b) is the top-1 */
    const uint8_t expect[R_] = {0, 1, 0, 0, 0, 0};
    for (size_t k = 0; k < sizeof lmhead_chunks / sizeof *lmhead_chunks; k++) {
        lmhead_bufs b;
        lmhead_out o = lmhead_out_of(&b);
        float *scratch = fzeros(R_ * V_);
        if (lmhead_chunks[k]) lmhead_forward_chunked(&o, h, w, labels, R_, C_, V_, scratch, lmhead_chunks[k]);
        else lmhead_forward(&o, h, w, labels, R_, C_, V_, scratch);
        for (size_t r = 0; r < R_; r++)
            if (b.top1[r] != expect[r])
                fail_msg("chunk %zu: is_top1[%zu] = %d, expected %d", lmhead_chunks[k], r, b.top1[r], expect[r]);
        assert_close(b.logp[0], tied_logp, 1e-6, 0, "logp of a tied label");
        free(scratch);
    }
    /* only NULL metrics requested */
    float logp[R_], lse[R_];
    lmhead_out o = {.logp = logp, .lse = lse};
    float *scratch = fzeros(R_ * V_);
    lmhead_forward_chunked(&o, h, w, labels, R_, C_, V_, scratch, SMALL_CHUNK);
    assert_close(logp[1], tied_logp, 1e-6, 0, "logp without metrics");
    free(scratch), free(h), free(w);
}

/* More rows than one internal row block (256) of the forward. */
static void test_lmhead_many_rows(void **state) {
    (void)state;
    enum { R = 600, C = 5, V = 11, CHUNK = 4 };
    rng_t rng = {23};
    float *h = frand(&rng, R * C, -2, 2), *w = frand(&rng, V * C, -2, 2);
    int32_t *labels = calloc(R, sizeof *labels);
    for (size_t r = 0; r < R; r++) labels[r] = (int32_t)(rng_next(&rng) % V);
    float *logp = fzeros(R), *lse = fzeros(R), *ent = fzeros(R), *scratch = fzeros(R * CHUNK);
    lmhead_out o = {.logp = logp, .lse = lse, .entropy = ent};
    lmhead_forward_chunked(&o, h, w, labels, R, C, V, scratch, CHUNK);
    double *hd = to_double(h, R * C), *wd = to_double(w, V * C);
    double *rlogp = calloc(R, sizeof(double)), *rlse = calloc(R, sizeof(double)), *rent = calloc(R, sizeof(double));
    lmhead_ref ref = {.logp = rlogp, .lse = rlse, .entropy = rent};
    lmhead_twin(&ref, hd, wd, labels, R, C, V);
    check_rel(logp, rlogp, R, FWD_RTOL, "many rows logp");
    check_rel(lse, rlse, R, FWD_RTOL, "many rows lse");
    check_rel(ent, rent, R, FWD_RTOL, "many rows entropy");

    /* backward over all rows at once (scratch R * CHUNK) */
    float *dlogp = frand(&rng, R, -1, 1), *dh = fzeros(R * C), *dw = fzeros(V * C);
    lmhead_backward_chunked(dh, dw, dlogp, h, w, labels, lse, R, C, V, scratch, CHUNK);
    lmh_ctx ctx = {R, C, V, labels, hd, wd, to_double(dlogp, R), calloc(R, sizeof(double))};
    double *fdw = calloc(V * C, sizeof *fdw);
    fd_gradient(lmh_obj, &ctx, ctx.w, V * C, fdw);
    check_grad(dw, fdw, V * C, "many rows dw");
    free(h), free(w), free(labels), free(logp), free(lse), free(ent), free(scratch), free(hd), free(wd);
    free(rlogp), free(rlse), free(rent), free(dlogp), free(dh), free(dw), free(ctx.dlogp), free(ctx.logp), free(fdw);
}

static void check_lmhead_backward(size_t chunk, uint64_t seed) {
    rng_t rng = {seed};
    float *h = frand(&rng, R_ * C_, -1, 1), *w = frand(&rng, V_ * C_, -1, 1), *dlogp = frand(&rng, R_, -1, 1);
    const int32_t labels[R_] = {0, 36, 8, 15, 16, 16};
    lmhead_bufs b;
    lmhead_out o = lmhead_out_of(&b);
    float *scratch = fzeros(R_ * V_), *dh = fzeros(R_ * C_), *dw = fzeros(V_ * C_);
    if (chunk) {
        lmhead_forward_chunked(&o, h, w, labels, R_, C_, V_, scratch, chunk);
        lmhead_backward_chunked(dh, dw, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch, chunk);
    } else {
        lmhead_forward(&o, h, w, labels, R_, C_, V_, scratch);
        lmhead_backward(dh, dw, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch);
    }
    lmh_ctx ctx = {R_, C_, V_, labels, to_double(h, R_ * C_), to_double(w, V_ * C_), to_double(dlogp, R_),
                   calloc(R_, sizeof(double))};
    double *fdh = calloc(R_ * C_, sizeof *fdh), *fdw = calloc(V_ * C_, sizeof *fdw);
    fd_gradient(lmh_obj, &ctx, ctx.h, R_ * C_, fdh);
    fd_gradient(lmh_obj, &ctx, ctx.w, V_ * C_, fdw);
    char name[96];
    snprintf(name, sizeof name, "lmhead dh (chunk %zu)", chunk);
    check_grad(dh, fdh, R_ * C_, name);
    snprintf(name, sizeof name, "lmhead dw (chunk %zu)", chunk);
    check_grad(dw, fdw, V_ * C_, name);

    float *dh1 = fcopy(dh, R_ * C_), *dw1 = fcopy(dw, V_ * C_);
    if (chunk) lmhead_backward_chunked(dh, dw, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch, chunk);
    else lmhead_backward(dh, dw, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch);
    check_doubled(dh, dh1, R_ * C_, "lmhead dh accumulation");
    check_doubled(dw, dw1, V_ * C_, "lmhead dw accumulation");
    float *dh_only = fzeros(R_ * C_), *dw_only = fzeros(V_ * C_);
    if (chunk) {
        lmhead_backward_chunked(dh_only, NULL, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch, chunk);
        lmhead_backward_chunked(NULL, dw_only, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch, chunk);
    } else {
        lmhead_backward(dh_only, NULL, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch);
        lmhead_backward(NULL, dw_only, dlogp, h, w, labels, b.lse, R_, C_, V_, scratch);
    }
    check_equal(dh_only, dh1, R_ * C_, "lmhead dh alone");
    check_equal(dw_only, dw1, V_ * C_, "lmhead dw alone");

    free(h), free(w), free(dlogp), free(scratch), free(dh), free(dw), free(dh1), free(dw1), free(dh_only);
    free(dw_only), free(fdh), free(fdw), free(ctx.h), free(ctx.w), free(ctx.dlogp), free(ctx.logp);
}

static void test_lmhead_backward(void **state) {
    (void)state;
    check_lmhead_backward(SMALL_CHUNK, 24);
    check_lmhead_backward(1, 25);
    check_lmhead_backward(0, 26); /* public, LMHEAD_CHUNK > V: one chunk */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_embedding_forward),
        cmocka_unit_test(test_embedding_backward),
        cmocka_unit_test(test_rmsnorm_forward),
        cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_matmul_forward),
        cmocka_unit_test(test_matmul_backward),
        cmocka_unit_test(test_rope_tables),
        cmocka_unit_test(test_rope_forward),
        cmocka_unit_test(test_rope_backward),
        cmocka_unit_test(test_attention_forward),
        cmocka_unit_test(test_attention_causal),
        cmocka_unit_test(test_attention_gqa_mapping),
        cmocka_unit_test(test_attention_backward),
        cmocka_unit_test(test_swiglu_forward),
        cmocka_unit_test(test_swiglu_backward),
        cmocka_unit_test(test_lmhead_forward),
        cmocka_unit_test(test_lmhead_large_logits),
        cmocka_unit_test(test_lmhead_top1_ties),
        cmocka_unit_test(test_lmhead_many_rows),
        cmocka_unit_test(test_lmhead_backward),
    };
    int failed = 0;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++) {
        const dpoc_simd_level level = (dpoc_simd_level)l;
        if (!dpoc_kernels_supported(level)) {
            printf("[  SKIPPED ] the layer tests at SIMD level %s: this CPU or build lacks it\n", dpoc_simd_name(level));
            continue;
        }
        dpoc_err err;
        if (dpoc_kernels_force(level, &err)) {
            printf("[  FAILED  ] cannot select SIMD level %s: %s\n", dpoc_simd_name(level), err.msg);
            failed++;
            continue;
        }
        char group[64];
        snprintf(group, sizeof group, "layers at SIMD level %s", dpoc_simd_name(level));
        printf("[==========] %s\n", group); /* cmocka does not print the group's name */
        failed += cmocka_run_group_tests_name(group, tests, NULL, NULL);
    }
    return failed;
}
