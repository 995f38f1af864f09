/* The shared-prompt forward/backward of a preference pair
 * (dpoc_model_forward_shared / dpoc_model_backward_shared) against the plain
 * per-sequence path: two dpoc_model_forward + dpoc_model_backward calls on
 * prompt+chosen and prompt+rejected (row0 = Tp - 1, R = the completion's
 * length), their gradients accumulated into one block.
 *
 * Models: a small random Llama (GQA, tied head) and a small random Qwen2 (q/k/v
 * biases, untied head). Pairs: 1-token completions, Ta != Tb, a 1-token
 * prompt, prompts and completions longer than one attention tile (64).
 *
 * Criterion (TOL = 1e-5): for every compared array x -- each head output over
 * the Ta + Tb rows (logp, lse, entropy, mean_logit, log_sum_sq_probs) and each
 * parameter tensor's gradient -- max_i |x_i - ref_i| <= TOL * max_i |ref_i|.
 * Both paths compute the same sums in another order (products over Tp+Ta+Tb-2
 * rows instead of two sequences, other attention tiles), so they differ by
 * fp32 rounding, which scales with the magnitude of the terms summed, not with
 * a result that cancels to near 0: a weight gradient's element, or a mean logit
 * close to 0, can carry a large relative error that is still only rounding.
 * The array's largest magnitude is the scale of those terms; per tensor, so a
 * small tensor (a norm weight's gradient) is not judged against a large one.
 * One exception: a tensor whose reference gradient is at most ZERO_REL times
 * the block's largest |gradient| everywhere is 0 in exact arithmetic (with one
 * row in all, attention sees one key and depends on neither q nor k), both
 * values being rounding noise; then the shared one must be as small. Every
 * other tensor here is above 1e-2 of the block's largest, and the exception is
 * only allowed for that one-row pair. is_top1 must be equal.
 *
 * The backward hook's calls must match the plain path's (the final norm, then
 * each layer's first offset, then 0) and every call's promise must hold:
 * grads[ready_from, numel) at the call equals the final block bit for bit.
 * Gradient checkpointing (DPOC_ACTS_RECOMPUTE) must give both paths' gradients
 * bit for bit. Several pairs packed into one layout (dpoc_model_forward_pairs)
 * must equal the pairs one at a time, within TOL. Everything runs at each SIMD level this CPU supports. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "testutil.h"

#include "dpoc/layers.h"
#include "dpoc/model.h"

#define TOL 1e-5
#define ZERO_REL 1e-6 /* below this fraction of the block's largest gradient: an analytic zero */
/* Two backward calls vs the first one's increment twice: the second adds the
 * same terms onto nonzero values (a bias sums ~T row terms one by one), so they
 * differ by rounding as much as the two paths do; "=" instead of "+=" would be 0.5. */
#define ACCUM_RTOL TOL

/* ---------------------------------------------------------------------- */
/* helpers */

static float *fzeros(size_t n) {
    float *a = calloc(n ? n : 1, sizeof *a);
    assert_non_null(a);
    return a;
}

/* max |got - want| / max |want| (0 when both are all zero) */
static double rel_err(const float *got, const float *want, size_t n) {
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)got[i] - (double)want[i]);
        if (e > d || isnan(e)) d = isnan(e) ? INFINITY : e;
        if (fabs((double)want[i]) > m) m = fabs((double)want[i]);
    }
    return d == 0 ? 0 : d / m;
}

static double worst_seen; /* largest error against the plain path, printed at the end */

static void check_close(const float *got, const float *want, size_t n, double tol, const char *what) {
    const double e = rel_err(got, want, n);
    if (!(e <= tol)) {
        double mg = 0, mw = 0;
        for (size_t i = 0; i < n; i++) {
            if (fabs((double)got[i]) > mg) mg = fabs((double)got[i]);
            if (fabs((double)want[i]) > mw) mw = fabs((double)want[i]);
        }
        fail_msg("%s: relative max-abs error %.3g > %.1g (n = %zu, max |got| %.3g, max |want| %.3g)", what, e, tol, n,
                 mg, mw);
    }
}

/* shared vs plain path */
static void check_vs_plain(const float *got, const float *want, size_t n, const char *what) {
    check_close(got, want, n, TOL, what);
    const double e = rel_err(got, want, n);
    if (e > worst_seen) worst_seen = e;
}

/* A model with random parameters of the scale a trained one has: norm weights
 * near 1, projections ~ U(+-1/sqrt(fan_in)) (unit-variance activations),
 * embeddings ~ U(+-1), so the logits and the attention scores are O(1). */
static void random_model(dpoc_model *m, const dpoc_model_config *cfg, uint64_t seed) {
    dpoc_err err;
    if (dpoc_model_init(m, cfg, &err)) fail_msg("%s", err.msg);
    rng_t rng = {seed};
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        float *w = m->params + p->offset;
        float lo, hi;
        if (strstr(p->name, "norm")) lo = 0.7f, hi = 1.3f;
        else if (strstr(p->name, "embed_tokens") || strstr(p->name, "lm_head")) lo = -1.0f, hi = 1.0f;
        else if (p->ndim == 1) lo = -0.2f, hi = 0.2f; /* q/k/v biases */
        else {
            const float a = (float)(1.0 / sqrt((double)p->shape[1]));
            lo = -a, hi = a;
        }
        for (size_t j = 0; j < p->numel; j++) w[j] = rng_uniform(&rng, lo, hi);
    }
}

static dpoc_model_config llama_cfg(void) {
    return (dpoc_model_config){
        .arch = DPOC_ARCH_LLAMA, .vocab_size = 61, .hidden_size = 32, .intermediate_size = 56, .n_layers = 3,
        .n_heads = 4, .n_kv_heads = 2, .head_dim = 8, .max_position_embeddings = 1024, .rms_norm_eps = 1e-5f,
        .rope_theta = 10000.0f, .tie_word_embeddings = 1, .qkv_bias = 0, .bos_token_id = 1, .eos_token_id = 2,
        .pad_token_id = -1,
    };
}

static dpoc_model_config qwen2_cfg(void) {
    return (dpoc_model_config){
        .arch = DPOC_ARCH_QWEN2, .vocab_size = 53, .hidden_size = 36, .intermediate_size = 40, .n_layers = 2,
        .n_heads = 6, .n_kv_heads = 2, .head_dim = 6, .max_position_embeddings = 1024, .rms_norm_eps = 1e-6f,
        .rope_theta = 1000000.0f, .tie_word_embeddings = 0, .qkv_bias = 1, .bos_token_id = -1, .eos_token_id = 2,
        .pad_token_id = -1,
    };
}

/* ---------------------------------------------------------------------- */
/* the backward hook */

#define MAX_HOOK_CALLS 64

typedef struct {
    const float *grads; /* the block being accumulated */
    size_t numel;
    size_t n;
    size_t from[MAX_HOOK_CALLS];
    float *tail[MAX_HOOK_CALLS]; /* grads[from, numel) at the call */
} hook_log;

static void hook_record(void *ctx, size_t ready_from) {
    hook_log *h = ctx;
    if (h->n == MAX_HOOK_CALLS) fail_msg("more than %d hook calls", MAX_HOOK_CALLS);
    assert_true(ready_from <= h->numel);
    h->from[h->n] = ready_from;
    h->tail[h->n] = fzeros(h->numel - ready_from);
    memcpy(h->tail[h->n], h->grads + ready_from, (h->numel - ready_from) * sizeof(float));
    h->n++;
}

static void hook_free(hook_log *h) {
    for (size_t i = 0; i < h->n; i++) free(h->tail[i]);
    h->n = 0;
}

/* ---------------------------------------------------------------------- */
/* one pair */

typedef struct {
    size_t Tp, Ta, Tb;
} pair_shape;

/* Head outputs of R rows, copied out of a dpoc_acts. */
typedef struct {
    float *v[5]; /* logp, lse, entropy, mean_logit, log_sum_sq_probs */
    uint8_t *top1;
} head_rows;

static const char *const head_names[5] = {"logp", "lse", "entropy", "mean_logit", "log_sum_sq_probs"};

static void head_copy(head_rows *h, size_t at, const dpoc_acts *a, size_t R) {
    const float *src[5] = {a->logp, a->lse, a->entropy, a->mean_logit, a->log_sum_sq_probs};
    for (int i = 0; i < 5; i++) memcpy(h->v[i] + at, src[i], R * sizeof(float));
    memcpy(h->top1 + at, a->is_top1, R);
}

static void head_alloc(head_rows *h, size_t R) {
    for (int i = 0; i < 5; i++) h->v[i] = fzeros(R);
    h->top1 = calloc(R, 1);
    assert_non_null(h->top1);
}

static void head_free(head_rows *h) {
    for (int i = 0; i < 5; i++) free(h->v[i]);
    free(h->top1);
}

/* Copies a's R head rows into got (head_free it) and checks them against the
 * plain path's: each statistic within TOL, is_top1 equal. */
static void check_head_vs_plain(head_rows *got, const dpoc_acts *a, const head_rows *ref, size_t R,
                                const char *label) {
    char what[256];
    head_alloc(got, R);
    head_copy(got, 0, a, R);
    for (int i = 0; i < 5; i++) {
        snprintf(what, sizeof what, "%s %s", head_names[i], label);
        check_vs_plain(got->v[i], ref->v[i], R, what);
    }
    for (size_t r = 0; r < R; r++)
        if (got->top1[r] != ref->top1[r])
            fail_msg("is_top1 row %zu %s: %d, plain path %d", r, label, got->top1[r], ref->top1[r]);
}

static void check_pair(const dpoc_model *m, pair_shape ps, uint64_t seed) {
    const size_t Tp = ps.Tp, Ta = ps.Ta, Tb = ps.Tb, R = Ta + Tb, V = m->cfg.vocab_size, N = m->numel;
    char what[256], label[64];
    snprintf(label, sizeof label, "%s Tp=%zu Ta=%zu Tb=%zu",
             m->cfg.arch == DPOC_ARCH_QWEN2 ? "qwen2" : "llama", Tp, Ta, Tb);
    rng_t rng = {seed};
    /* seq_c = prompt + chosen, seq_r = prompt + rejected */
    int32_t *seq_c = malloc((Tp + Ta) * sizeof *seq_c), *seq_r = malloc((Tp + Tb) * sizeof *seq_r);
    assert_true(seq_c && seq_r);
    for (size_t t = 0; t < Tp; t++) seq_c[t] = seq_r[t] = (int32_t)(rng_next(&rng) % V);
    for (size_t t = 0; t < Ta; t++) seq_c[Tp + t] = (int32_t)(rng_next(&rng) % V);
    for (size_t t = 0; t < Tb; t++) seq_r[Tp + t] = (int32_t)(rng_next(&rng) % V);
    float *dlogp = fzeros(R); /* as DPO's: one sign per completion, varying per row */
    for (size_t r = 0; r < R; r++) dlogp[r] = (r < Ta ? -1.0f : 1.0f) * rng_uniform(&rng, 0.2f, 1.0f);
    dpoc_err err;

    /* the plain path */
    dpoc_acts a1;
    dpoc_grad_scratch s1;
    const size_t T1 = Tp + (Ta > Tb ? Ta : Tb);
    if (dpoc_acts_alloc(&a1, &m->cfg, T1, &err) || dpoc_grad_scratch_alloc(&s1, &m->cfg, T1, &err))
        fail_msg("%s", err.msg);
    float *g_ref = fzeros(N);
    head_rows ref;
    head_alloc(&ref, R);
    hook_log hl_ref = {.grads = g_ref, .numel = N};
    const dpoc_backward_hook hook_ref = {hook_record, &hl_ref};
    dpoc_model_forward(m, &a1, seq_c, Tp + Ta, Tp - 1, Ta);
    head_copy(&ref, 0, &a1, Ta);
    dpoc_model_backward(m, g_ref, &a1, &s1, seq_c, dlogp, &hook_ref);
    const size_t n_hook_plain = hl_ref.n;
    dpoc_model_forward(m, &a1, seq_r, Tp + Tb, Tp - 1, Tb);
    head_copy(&ref, Ta, &a1, Tb);
    dpoc_model_backward(m, g_ref, &a1, &s1, seq_r, dlogp + Ta, NULL);

    /* the shared path, in buffers sized as documented (max_T = Tp + Ta + Tb) */
    dpoc_acts a2;
    dpoc_grad_scratch s2;
    if (dpoc_acts_alloc(&a2, &m->cfg, Tp + Ta + Tb, &err) || dpoc_grad_scratch_alloc(&s2, &m->cfg, Tp + Ta + Tb, &err))
        fail_msg("%s", err.msg);
    float *g = fzeros(N);
    hook_log hl = {.grads = g, .numel = N};
    const dpoc_backward_hook hook = {hook_record, &hl};
    dpoc_model_forward_shared(m, &a2, seq_c, Tp, seq_c + Tp, Ta, seq_r + Tp, Tb);
    assert_int_equal(a2.R, R);
    assert_int_equal(a2.T, Tp + Ta + Tb - 2);
    head_rows got;
    check_head_vs_plain(&got, &a2, &ref, R, label);
    dpoc_model_backward_shared(m, g, &a2, &s2, dlogp, &hook);

    /* every parameter tensor's gradient */
    double B = 0; /* the block's largest reference |gradient| */
    for (size_t j = 0; j < N; j++) B = fmax(B, fabs((double)g_ref[j]));
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        snprintf(what, sizeof what, "d %s %s", p->name, label);
        double ref_max = 0, got_max = 0;
        for (size_t j = 0; j < p->numel; j++) {
            ref_max = fmax(ref_max, fabs((double)g_ref[p->offset + j]));
            got_max = fmax(got_max, fabs((double)g[p->offset + j]));
        }
        if (ref_max > ZERO_REL * B) {
            check_vs_plain(g + p->offset, g_ref + p->offset, p->numel, what);
            continue;
        }
        if (a2.T != 1)
            fail_msg("%s: the reference gradient is at most %.3g, below %.0e of the block's %.3g", what, ref_max,
                     ZERO_REL, B);
        if (!(got_max <= ZERO_REL * B))
            fail_msg("%s: an analytic zero (reference at most %.3g), but the shared path gives %.3g > %.0e of %.3g",
                     what, ref_max, got_max, ZERO_REL, B);
    }

    /* the hook: the plain path's sequence of calls, each one's tail final */
    assert_int_equal(hl.n, n_hook_plain);
    assert_int_equal(hl.n, m->cfg.n_layers + 2);
    for (size_t c = 0; c < hl.n; c++) {
        assert_int_equal(hl.from[c], hl_ref.from[c]);
        if (c > 0 && hl.from[c] > hl.from[c - 1])
            fail_msg("hook call %zu goes back: %zu after %zu", c, hl.from[c], hl.from[c - 1]);
        if (memcmp(hl.tail[c], g + hl.from[c], (N - hl.from[c]) * sizeof(float)) != 0)
            fail_msg("%s: grads[%zu, %zu) changed after hook call %zu said they were final", label, hl.from[c], N, c);
    }
    assert_int_equal(hl.from[hl.n - 1], 0);

    /* backward accumulates: a second call adds the same increment again */
    float *g2 = fzeros(N), *twice = fzeros(N);
    memcpy(g2, g, N * sizeof *g2);
    dpoc_model_backward_shared(m, g2, &a2, &s2, dlogp, NULL);
    for (size_t j = 0; j < N; j++) twice[j] = 2.0f * g[j];
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        snprintf(what, sizeof what, "accumulated d %s %s", p->name, label);
        check_close(g2 + p->offset, twice + p->offset, p->numel, ACCUM_RTOL, what);
    }

    /* the same acts serve a plain forward afterwards (the layout resets) */
    dpoc_model_forward(m, &a2, seq_r, Tp + Tb, Tp - 1, Tb);
    assert_int_equal(a2.n_pairs, 0);
    snprintf(what, sizeof what, "plain logp after a shared forward %s", label);
    check_close(a2.logp, ref.v[0] + Ta, Tb, 0.0, what);

    /* gradient checkpointing: with DPOC_ACTS_RECOMPUTE each layer's forward runs
     * again in backward from its kept input, through the same kernels on the
     * same inputs, so both paths must give the KEEP gradients bit for bit */
    for (int shared = 0; shared < 2; shared++) {
        dpoc_acts ar;
        const size_t Tr = shared ? Tp + Ta + Tb : T1;
        if (dpoc_acts_alloc_mode(&ar, &m->cfg, Tr, DPOC_ACTS_RECOMPUTE, &err)) fail_msg("%s", err.msg);
        dpoc_grad_scratch *sr = shared ? &s2 : &s1;
        float *gr = fzeros(N);
        if (shared) {
            dpoc_model_forward_shared(m, &ar, seq_c, Tp, seq_c + Tp, Ta, seq_r + Tp, Tb);
            if (memcmp(ar.logp, got.v[0], R * sizeof(float)) != 0) fail_msg("recompute: shared logp differ %s", label);
            dpoc_model_backward_shared(m, gr, &ar, sr, dlogp, NULL);
        } else {
            dpoc_model_forward(m, &ar, seq_c, Tp + Ta, Tp - 1, Ta);
            if (memcmp(ar.logp, ref.v[0], Ta * sizeof(float)) != 0) fail_msg("recompute: plain logp differ %s", label);
            dpoc_model_backward(m, gr, &ar, sr, seq_c, dlogp, NULL);
            dpoc_model_forward(m, &ar, seq_r, Tp + Tb, Tp - 1, Tb);
            dpoc_model_backward(m, gr, &ar, sr, seq_r, dlogp + Ta, NULL);
        }
        const float *want = shared ? g : g_ref;
        for (size_t j = 0; j < N; j++)
            if (memcmp(&gr[j], &want[j], sizeof(float)) != 0)
                fail_msg("recompute (%s path) %s: gradient [%zu] = %.9g, keeping activations gives %.9g",
                         shared ? "shared" : "plain", label, j, (double)gr[j], (double)want[j]);
        free(gr);
        dpoc_acts_free(&ar);
    }

    hook_free(&hl), hook_free(&hl_ref);
    head_free(&ref), head_free(&got);
    free(g), free(g2), free(twice), free(g_ref), free(dlogp), free(seq_c), free(seq_r);
    dpoc_acts_free(&a1), dpoc_acts_free(&a2);
    dpoc_grad_scratch_free(&s1), dpoc_grad_scratch_free(&s2);
}

static const pair_shape pairs[] = {
    {5, 4, 4},   /* equal lengths */
    {6, 3, 7},   /* Ta != Tb */
    {7, 1, 1},   /* 1-token completions: only the last prompt row is a head input */
    {4, 1, 5},   /* one 1-token completion */
    {9, 6, 1},
    {1, 3, 5},   /* a 1-token prompt */
    {1, 1, 1},   /* everything of length 1: the pair is one row */
    {70, 9, 3},  /* a prompt longer than one attention tile */
    {130, 66, 2}, /* several prompt tiles, a completion longer than one tile */
    {64, 65, 64}, /* tile-sized parts */
};

/* ---------------------------------------------------------------------- */
/* several pairs in one pairs layout */

/* dpoc_model_forward_pairs / backward_pairs on n pairs against one
 * forward_shared + backward_shared per pair (gradients accumulated): head
 * outputs in order, every tensor's gradient (TOL, as above: the same sums in
 * another order), the hook's calls; and RECOMPUTE vs KEEP bit for bit. */
static void check_packed(const dpoc_model *m, const pair_shape *shapes, size_t n, uint64_t seed) {
    const size_t V = m->cfg.vocab_size, N = m->numel;
    char what[256], label[64];
    snprintf(label, sizeof label, "%s, %zu pairs packed", m->cfg.arch == DPOC_ARCH_QWEN2 ? "qwen2" : "llama", n);
    rng_t rng = {seed};
    dpoc_pair_tokens *pt = calloc(n, sizeof *pt);
    int32_t **ids = calloc(n, sizeof *ids);
    assert_true(pt && ids);
    size_t rows = 0, R = 0, maxT = 0;
    for (size_t i = 0; i < n; i++) {
        const size_t Tp = shapes[i].Tp, Ta = shapes[i].Ta, Tb = shapes[i].Tb;
        ids[i] = malloc((Tp + Ta + Tb) * sizeof(int32_t));
        assert_non_null(ids[i]);
        for (size_t t = 0; t < Tp + Ta + Tb; t++) ids[i][t] = (int32_t)(rng_next(&rng) % V);
        pt[i] = (dpoc_pair_tokens){ids[i], Tp, ids[i] + Tp, Ta, ids[i] + Tp + Ta, Tb};
        rows += Tp + Ta + Tb;
        R += Ta + Tb;
        if (Tp + Ta + Tb > maxT) maxT = Tp + Ta + Tb;
    }
    float *dlogp = fzeros(R);
    for (size_t i = 0, r = 0; i < n; i++)
        for (size_t k = 0; k < shapes[i].Ta + shapes[i].Tb; k++, r++)
            dlogp[r] = (k < shapes[i].Ta ? -1.0f : 1.0f) * rng_uniform(&rng, 0.2f, 1.0f);
    dpoc_err err;
    /* one pair at a time */
    dpoc_acts a1;
    dpoc_grad_scratch s1;
    if (dpoc_acts_alloc(&a1, &m->cfg, maxT, &err) || dpoc_grad_scratch_alloc(&s1, &m->cfg, maxT, &err))
        fail_msg("%s", err.msg);
    float *g_ref = fzeros(N);
    head_rows ref;
    head_alloc(&ref, R);
    for (size_t i = 0, r = 0; i < n; i++) {
        dpoc_model_forward_pairs(m, &a1, &pt[i], 1);
        head_copy(&ref, r, &a1, a1.R);
        dpoc_model_backward_pairs(m, g_ref, &a1, &s1, dlogp + r, NULL);
        r += a1.R;
    }
    /* all at once, in both activation modes */
    float *g_keep = NULL;
    for (int mode = 0; mode < 2; mode++) {
        dpoc_acts a2;
        dpoc_grad_scratch s2;
        if (dpoc_acts_alloc_mode(&a2, &m->cfg, rows, mode ? DPOC_ACTS_RECOMPUTE : DPOC_ACTS_KEEP, &err) ||
            dpoc_grad_scratch_alloc(&s2, &m->cfg, rows, &err))
            fail_msg("%s", err.msg);
        float *g = fzeros(N);
        hook_log hl = {.grads = g, .numel = N};
        const dpoc_backward_hook hook = {hook_record, &hl};
        dpoc_model_forward_pairs(m, &a2, pt, n);
        assert_int_equal(a2.R, R);
        assert_int_equal(a2.n_pairs, n);
        head_rows got;
        check_head_vs_plain(&got, &a2, &ref, R, label);
        dpoc_model_backward_pairs(m, g, &a2, &s2, dlogp, &hook);
        for (size_t i = 0; i < m->n_tensors; i++) {
            const dpoc_param_info *p = &m->info[i];
            snprintf(what, sizeof what, "d %s %s", p->name, label);
            check_vs_plain(g + p->offset, g_ref + p->offset, p->numel, what);
        }
        assert_int_equal(hl.n, m->cfg.n_layers + 2);
        for (size_t c = 0; c < hl.n; c++)
            if (memcmp(hl.tail[c], g + hl.from[c], (N - hl.from[c]) * sizeof(float)) != 0)
                fail_msg("%s: grads[%zu, %zu) changed after hook call %zu", label, hl.from[c], N, c);
        if (mode == 0) {
            g_keep = g;
        } else {
            if (memcmp(g, g_keep, N * sizeof(float)) != 0) fail_msg("%s: RECOMPUTE gradients differ from KEEP", label);
            free(g);
        }
        hook_free(&hl);
        head_free(&got);
        dpoc_acts_free(&a2);
        dpoc_grad_scratch_free(&s2);
    }
    free(g_keep), free(g_ref), free(dlogp);
    head_free(&ref);
    dpoc_acts_free(&a1);
    dpoc_grad_scratch_free(&s1);
    for (size_t i = 0; i < n; i++) free(ids[i]);
    free(ids), free(pt);
}

static void run_pairs(const dpoc_model_config *cfg, uint64_t seed) {
    dpoc_model m;
    random_model(&m, cfg, seed);
    for (size_t i = 0; i < sizeof pairs / sizeof *pairs; i++) check_pair(&m, pairs[i], seed * 1000 + i);
    /* packed: a few mixed shapes, 1-token parts and multi-tile pairs among them */
    check_packed(&m, pairs, 4, seed * 1000 + 100);
    check_packed(&m, pairs + 2, 5, seed * 1000 + 101);
    check_packed(&m, pairs + 7, 3, seed * 1000 + 102);
    dpoc_model_free(&m);
}

static void test_llama(void **state) {
    (void)state;
    run_pairs((const dpoc_model_config[]){llama_cfg()}, 11);
}

static void test_qwen2(void **state) {
    (void)state;
    run_pairs((const dpoc_model_config[]){qwen2_cfg()}, 12);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama),
        cmocka_unit_test(test_qwen2),
    };
    int failed = 0;
    for (int l = 0; l < DPOC_SIMD_LEVELS; l++) {
        const dpoc_simd_level level = (dpoc_simd_level)l;
        if (!dpoc_kernels_supported(level)) {
            printf("[  SKIPPED ] the shared-prefix tests at SIMD level %s: this CPU or build lacks it\n",
                   dpoc_simd_name(level));
            continue;
        }
        dpoc_err err;
        if (dpoc_kernels_force(level, &err)) {
            printf("[  FAILED  ] cannot select SIMD level %s: %s\n", dpoc_simd_name(level), err.msg);
            failed++;
            continue;
        }
        char group[64];
        snprintf(group, sizeof group, "shared prefix at SIMD level %s", dpoc_simd_name(level));
        printf("[==========] %s\n", group); /* cmocka does not print the group's name */
        worst_seen = 0;
        failed += cmocka_run_group_tests_name(group, tests, NULL, NULL);
        printf("[          ] largest relative max-abs difference from the plain path: %.3g (tolerance %.0e)\n",
               worst_seen, TOL);
    }
    return failed;
}
