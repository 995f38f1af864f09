/* DPO losses of TRL 1.16 (trainer/dpo_trainer.py, _compute_loss).
 *
 * Each loss is written once over dual numbers: a value and its derivatives with
 * respect to the policy log-prob of ONE pair's chosen and rejected sequence.
 * Evaluating the batch loss with pair i seeded gives dLoss/dlogp for pair i; the
 * per-token gradient follows because a sequence log-prob is a (weighted) sum of
 * its token log-probs. sft is linear in the token log-probs and is handled
 * directly. All scratch lives in a dpoc_loss_work made once for the largest
 * micro-batch: computing a loss allocates nothing. */
#include "dpoc/loss.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const LOSS_NAMES[DPOC_LOSS_COUNT] = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
};
static const char *const FDIV_NAMES[] = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"};
#define N_FDIV (sizeof FDIV_NAMES / sizeof FDIV_NAMES[0])

/* TRL clamps (alpha-1)*logratio at this value before exp() in fp32. */
#define ALPHA_DIV_CLAMP_MAX 80.0
/* TRL treats |alpha - 1| below this as the reverse-KL limit. */
#define ALPHA_DIV_ONE_TOL 1e-6

int dpoc_loss_kind_from_name(const char *name) {
    for (int i = 0; i < DPOC_LOSS_COUNT; i++)
        if (strcmp(name, LOSS_NAMES[i]) == 0) return i;
    return -1;
}
const char *dpoc_loss_kind_name(dpoc_loss_kind k) { return (unsigned)k < DPOC_LOSS_COUNT ? LOSS_NAMES[k] : "?"; }
int dpoc_fdiv_from_name(const char *name) {
    for (size_t i = 0; i < N_FDIV; i++)
        if (strcmp(name, FDIV_NAMES[i]) == 0) return (int)i;
    return -1;
}
const char *dpoc_fdiv_name(dpoc_fdiv f) { return (unsigned)f < N_FDIV ? FDIV_NAMES[f] : "?"; }

int dpoc_loss_cfg_validate(const dpoc_loss_cfg *c, dpoc_err *err) {
    if (c->n_types == 0) return dpoc_errf(err, DPOC_EINPUT, "config key 'loss_type': at least one loss type is needed");
    for (size_t i = 0; i < c->n_types; i++) {
        dpoc_loss_kind k = c->types[i];
        int fdiv_ok = k == DPOC_LOSS_SIGMOID || k == DPOC_LOSS_SIGMOID_NORM || k == DPOC_LOSS_HINGE ||
                      k == DPOC_LOSS_IPO || k == DPOC_LOSS_EXO_PAIR || k == DPOC_LOSS_ROBUST ||
                      k == DPOC_LOSS_DISCOPOP || k == DPOC_LOSS_SFT;
        if (c->f_divergence_type != DPOC_FDIV_REVERSE_KL && !fdiv_ok)
            return dpoc_errf(err, DPOC_EINPUT,
                             "config key 'f_divergence_type': '%s' is only supported with loss types sigmoid, "
                             "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft (got '%s')",
                             dpoc_fdiv_name(c->f_divergence_type), dpoc_loss_kind_name(k));
        if (c->use_weighting && (k == DPOC_LOSS_AOT || k == DPOC_LOSS_AOT_UNPAIRED))
            return dpoc_errf(err, DPOC_EINPUT,
                             "config key 'use_weighting': WPO weighting is not defined for '%s' (it sorts the batch)",
                             dpoc_loss_kind_name(k));
        if (k == DPOC_LOSS_EXO_PAIR && !(c->label_smoothing > 0.0))
            return dpoc_errf(err, DPOC_EINPUT,
                             "config key 'label_smoothing': must be > 0 for loss type 'exo_pair' (the EXO paper "
                             "recommends 1e-3)");
        if (k == DPOC_LOSS_ROBUST && !(c->label_smoothing >= 0.0 && c->label_smoothing < 0.5))
            return dpoc_errf(err, DPOC_EINPUT, "config key 'label_smoothing': must lie in [0, 0.5) for loss type 'robust'");
    }
    if (!(c->beta > 0.0)) return dpoc_errf(err, DPOC_EINPUT, "config key 'beta': must be > 0");
    if (c->has_ld_alpha && !(c->ld_alpha >= 0.0 && c->ld_alpha <= 1.0))
        return dpoc_errf(err, DPOC_EINPUT, "config key 'ld_alpha': must lie in [0, 1]");
    if (!(c->label_smoothing >= 0.0 && c->label_smoothing <= 1.0))
        return dpoc_errf(err, DPOC_EINPUT, "config key 'label_smoothing': must lie in [0, 1]");
    if (!(c->discopop_tau > 0.0)) return dpoc_errf(err, DPOC_EINPUT, "config key 'discopop_tau': must be > 0");
    return 0;
}

double dpoc_ld_logp(const float *tok_logp, size_t n_tok, size_t shared, const dpoc_loss_cfg *c) {
    double s = 0.0, tail = 0.0;
    for (size_t t = 0; t < n_tok; t++) {
        if (!c->has_ld_alpha || t < shared) s += tok_logp[t];
        else tail += tok_logp[t];
    }
    return c->has_ld_alpha ? s + c->ld_alpha * tail : s;
}

/* ---- dual numbers: value and derivatives w.r.t. (chosen_i, rejected_i) ---- */
typedef struct {
    double v, a, b;
} dual;

static dual dc(double v) { return (dual){v, 0, 0}; }
static dual dadd(dual x, dual y) { return (dual){x.v + y.v, x.a + y.a, x.b + y.b}; }
static dual dsub(dual x, dual y) { return (dual){x.v - y.v, x.a - y.a, x.b - y.b}; }
static dual dscale(dual x, double s) { return (dual){x.v * s, x.a * s, x.b * s}; }
static dual dmul(dual x, dual y) { return (dual){x.v * y.v, x.a * y.v + x.v * y.a, x.b * y.v + x.v * y.b}; }
static dual dchain(dual x, double f, double df) { return (dual){f, x.a * df, x.b * df}; }
static dual dexp(dual x) {
    double e = exp(x.v);
    return dchain(x, e, e);
}
static double sigmoid(double x) { return x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x)); }
static double logsigmoid(double x) { return x >= 0 ? -log1p(exp(-x)) : x - log1p(exp(x)); }
static dual dsigmoid(dual x) {
    double s = sigmoid(x.v);
    return dchain(x, s, s * (1 - s));
}
static dual dlogsigmoid(dual x) { return dchain(x, logsigmoid(x.v), sigmoid(-x.v)); }
static dual drelu(dual x) { return x.v > 0 ? x : dc(0.0); }
static dual dsq(dual x) { return dmul(x, x); }

/* f'(t) of the f-divergence applied to a log-ratio (TRL's "scores"). */
static dual fdiv_score(const dpoc_loss_cfg *c, dual lr) {
    switch (c->f_divergence_type) {
    case DPOC_FDIV_REVERSE_KL: return lr;
    case DPOC_FDIV_FORWARD_KL: return dsub(dc(1.0), dexp(dscale(lr, -1.0)));
    case DPOC_FDIV_JS: return dadd(dc(log(2.0)), dlogsigmoid(lr));
    case DPOC_FDIV_ALPHA: {
        double alpha = c->f_alpha_divergence_coef;
        if (fabs(alpha - 1.0) < ALPHA_DIV_ONE_TOL) return lr;
        dual t = dscale(lr, alpha - 1.0);
        if (t.v > ALPHA_DIV_CLAMP_MAX) t = dc(ALPHA_DIV_CLAMP_MAX); /* clamp: no gradient */
        return dscale(dsub(dexp(t), dc(1.0)), 1.0 / (alpha - 1.0));
    }
    }
    return lr;
}

typedef struct {
    dual v;
    size_t idx;
} sort_item;
static int cmp_item(const void *x, const void *y) {
    double a = ((const sort_item *)x)->v.v, b = ((const sort_item *)y)->v.v;
    if (a < b) return -1;
    if (a > b) return 1;
    /* equal keys: keep the original order, as a stable sort would */
    size_t i = ((const sort_item *)x)->idx, j = ((const sort_item *)y)->idx;
    return i < j ? -1 : i > j;
}
/* Bottom-up merge sort of a[0..n) by cmp_item, aux (n items) as the other
 * buffer. Not qsort: glibc's sorts through a heap buffer above 1 KiB. cmp_item
 * is a total order (ties go by index), so any correct sort gives the same
 * permutation as qsort did. */
static void sort_items(sort_item *a, sort_item *aux, size_t n) {
    sort_item *src = a, *dst = aux;
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            const size_t mid = n - lo > width ? lo + width : n;
            const size_t hi = n - mid > width ? mid + width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) dst[k++] = cmp_item(&src[j], &src[i]) < 0 ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        sort_item *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, n * sizeof *a);
}

static void sort_duals(dual *v, size_t n, sort_item *tmp, sort_item *aux) {
    for (size_t i = 0; i < n; i++) tmp[i] = (sort_item){v[i], i};
    sort_items(tmp, aux, n);
    for (size_t i = 0; i < n; i++) v[i] = tmp[i].v;
}

/* ---- the scratch ---- */

/* Per pair: rc, rr, len_c, len_r, wpo, dA, dB, shared (doubles); batch_loss's
 * four working arrays and the two sorted ones of aot (duals); the sort's two
 * item buffers. */
enum { WORK_DOUBLES = 8, WORK_DUALS = 6, WORK_SORT_ITEMS = 2 };
#define WORK_BYTES_PER_PAIR \
    (WORK_DOUBLES * sizeof(double) + WORK_DUALS * sizeof(dual) + WORK_SORT_ITEMS * sizeof(sort_item))

/* Where each array sits in a block of max_B pairs (every element type has
 * double's alignment, which the block's start has). */
typedef struct {
    double *d;
    dual *duals;
    sort_item *items;
} work_view;

static work_view work_view_of(const dpoc_loss_work *w) {
    unsigned char *p = w->block;
    const size_t doubles_bytes = WORK_DOUBLES * w->max_B * sizeof(double);
    const size_t duals_bytes = WORK_DUALS * w->max_B * sizeof(dual);
    work_view v;
    v.d = (double *)(void *)p;
    v.duals = (dual *)(void *)(p + doubles_bytes);
    v.items = (sort_item *)(void *)(p + doubles_bytes + duals_bytes);
    return v;
}

int dpoc_loss_work_init(dpoc_loss_work *w, size_t max_B, dpoc_err *err) {
    w->max_B = 0;
    w->block = NULL;
    if (max_B == 0) return dpoc_errf(err, DPOC_EINTERNAL, "loss scratch for an empty micro-batch");
    w->block = dpoc_calloc(max_B, WORK_BYTES_PER_PAIR, "loss buffers", err);
    if (!w->block) return DPOC_ENOMEM;
    w->max_B = max_B;
    return 0;
}

void dpoc_loss_work_free(dpoc_loss_work *w) {
    free(w->block);
    w->block = NULL;
    w->max_B = 0;
}

typedef struct {
    size_t B;
    const dpoc_loss_cfg *c;
    const double *pc, *pr;     /* policy per-sequence log-probs */
    const double *rc, *rr;     /* reference */
    const double *len_c, *len_r; /* completion lengths clamped to >= 1 (ipo, sigmoid_norm) */
    const double *wpo;         /* per-pair WPO weight, or NULL */
    double sft_loss;           /* the scalar sft batch loss (value only) */
    dual *w1, *w2, *w3, *w4;   /* scratch (B each) */
    dual *sa, *sb;             /* aot's sorted log-ratios (B each) */
    sort_item *sort_tmp, *sort_aux;
} batch_ctx;

/* The batch loss with pair `seed` seeded (seed >= B: no seeding). The sft term
 * enters as a constant here; its gradient is added per token by the caller. */
static dual batch_loss(const batch_ctx *x, size_t seed) {
    const dpoc_loss_cfg *c = x->c;
    const size_t B = x->B;
    const double beta = c->beta, eps = c->label_smoothing;
    dual *pc = x->w1, *pr = x->w2, *cl = x->w3, *rl = x->w4;
    for (size_t j = 0; j < B; j++) {
        pc[j] = (dual){x->pc[j], j == seed, 0};
        pr[j] = (dual){x->pr[j], 0, j == seed};
        cl[j] = dsub(pc[j], dc(x->rc[j]));
        rl[j] = dsub(pr[j], dc(x->rr[j]));
    }
    dual total = dc(0.0);
    for (size_t li = 0; li < c->n_types; li++) {
        dpoc_loss_kind k = c->types[li];
        dual sum = dc(0.0);
        /* aot variants sort across the batch first */
        dual *sa = x->sa, *sb = x->sb;
        if (k == DPOC_LOSS_AOT || k == DPOC_LOSS_AOT_UNPAIRED) {
            for (size_t j = 0; j < B; j++) {
                if (k == DPOC_LOSS_AOT) {
                    sa[j] = dsub(pc[j], pr[j]);              /* policy log-ratios */
                    sb[j] = dc(x->rc[j] - x->rr[j]);          /* reference log-ratios */
                } else {
                    sa[j] = cl[j];
                    sb[j] = rl[j];
                }
            }
            sort_duals(sa, B, x->sort_tmp, x->sort_aux);
            sort_duals(sb, B, x->sort_tmp, x->sort_aux);
        }
        for (size_t j = 0; j < B; j++) {
            dual cs = fdiv_score(c, cl[j]), rs = fdiv_score(c, rl[j]);
            dual delta = dsub(cs, rs);
            dual bd = dscale(delta, beta);
            dual l;
            switch (k) {
            case DPOC_LOSS_SIGMOID: l = dscale(dlogsigmoid(bd), -1.0); break;
            case DPOC_LOSS_HINGE: l = drelu(dsub(dc(1.0), bd)); break;
            case DPOC_LOSS_IPO: {
                dual d = dsub(dscale(cs, 1.0 / x->len_c[j]), dscale(rs, 1.0 / x->len_r[j]));
                l = dsq(dsub(d, dc(1.0 / (2.0 * beta))));
                break;
            }
            case DPOC_LOSS_EXO_PAIR: {
                dual qw = dsigmoid(bd), ql = dsigmoid(dscale(bd, -1.0));
                dual log_qw = dlogsigmoid(bd), log_ql = dlogsigmoid(dscale(bd, -1.0));
                l = dadd(dmul(qw, dsub(log_qw, dc(log1p(-eps)))), dmul(ql, dsub(log_ql, dc(log(eps)))));
                break;
            }
            case DPOC_LOSS_NCA_PAIR: {
                dual cr = dscale(cl[j], beta), rr = dscale(rl[j], beta);
                l = dsub(dsub(dscale(dlogsigmoid(cr), -1.0), dscale(dlogsigmoid(dscale(cr, -1.0)), 0.5)),
                         dscale(dlogsigmoid(dscale(rr, -1.0)), 0.5));
                break;
            }
            case DPOC_LOSS_ROBUST: {
                dual clean = dscale(dlogsigmoid(bd), -(1.0 - eps));
                dual flipped = dscale(dlogsigmoid(dscale(bd, -1.0)), -eps);
                l = dscale(dsub(clean, flipped), 1.0 / (1.0 - 2.0 * eps));
                break;
            }
            case DPOC_LOSS_BCO_PAIR: {
                dual cr = dscale(cl[j], beta), rr = dscale(rl[j], beta);
                l = dsub(dscale(dlogsigmoid(cr), -1.0), dlogsigmoid(dscale(rr, -1.0)));
                break;
            }
            case DPOC_LOSS_SPPO_HARD:
                l = dadd(dsq(dsub(cl[j], dc(0.5 / beta))), dsq(dadd(rl[j], dc(0.5 / beta))));
                break;
            case DPOC_LOSS_AOT:
            case DPOC_LOSS_AOT_UNPAIRED: {
                dual d = dscale(dsub(sa[j], sb[j]), beta);
                l = dsub(dscale(dlogsigmoid(d), -(1.0 - eps)), dscale(dlogsigmoid(dscale(d, -1.0)), eps));
                break;
            }
            case DPOC_LOSS_APO_ZERO:
                l = dadd(dsub(dc(1.0), dsigmoid(dscale(cl[j], beta))), dsigmoid(dscale(rl[j], beta)));
                break;
            case DPOC_LOSS_APO_DOWN:
                l = dadd(dsigmoid(dscale(cl[j], beta)),
                         dsub(dc(1.0), dsigmoid(dscale(dsub(cl[j], rl[j]), beta))));
                break;
            case DPOC_LOSS_DISCOPOP: {
                dual m = dsigmoid(dscale(bd, 1.0 / c->discopop_tau));
                dual logistic = dscale(dlogsigmoid(bd), -1.0);
                dual expc = dexp(dscale(bd, -1.0));
                l = dadd(dmul(logistic, dsub(dc(1.0), m)), dmul(expc, m));
                break;
            }
            case DPOC_LOSS_SFT: l = dc(x->sft_loss); break;
            case DPOC_LOSS_SIGMOID_NORM: {
                dual d = dsub(dscale(cs, 1.0 / x->len_c[j]), dscale(rs, 1.0 / x->len_r[j]));
                l = dscale(dlogsigmoid(dscale(d, beta)), -1.0);
                break;
            }
            default: l = dc(NAN);
            }
            if (x->wpo) l = dscale(l, x->wpo[j]);
            sum = dadd(sum, l);
        }
        total = dadd(total, dscale(sum, c->weights[li] / (double)B));
    }
    return total;
}

int dpoc_loss_compute_in(dpoc_loss_work *w, const dpoc_loss_cfg *c, size_t B, const dpoc_loss_seq *chosen,
                         const dpoc_loss_seq *rejected, double grad_scale, float *const *dchosen,
                         float *const *drejected, dpoc_loss_out *out, dpoc_err *err) {
    if (B == 0) return dpoc_errf(err, DPOC_EINTERNAL, "loss on an empty micro-batch");
    if (B > w->max_B)
        return dpoc_errf(err, DPOC_EINTERNAL, "loss on %zu pairs, its scratch holds %zu", B, w->max_B);
    const work_view v = work_view_of(w);
    double *buf = v.d;
    dual *duals = v.duals;
    double *rc = buf, *rr = buf + B, *len_c = buf + 2 * B, *len_r = buf + 3 * B, *wpo = buf + 4 * B;
    double *dA = buf + 5 * B, *dB = buf + 6 * B, *shared = buf + 7 * B;
    /* per-sequence log-probs with LD weighting; sft over all chosen label tokens */
    double sft_sum = 0.0;
    size_t sft_n = 0;
    for (size_t i = 0; i < B; i++) {
        size_t sh = chosen[i].n_tok < rejected[i].n_tok ? chosen[i].n_tok : rejected[i].n_tok;
        shared[i] = (double)sh;
        out->chosen_logps[i] = dpoc_ld_logp(chosen[i].policy_tok_logp, chosen[i].n_tok, sh, c);
        out->rejected_logps[i] = dpoc_ld_logp(rejected[i].policy_tok_logp, rejected[i].n_tok, sh, c);
        rc[i] = chosen[i].ref_logp;
        rr[i] = rejected[i].ref_logp;
        len_c[i] = chosen[i].n_completion > 0 ? (double)chosen[i].n_completion : 1.0;
        len_r[i] = rejected[i].n_completion > 0 ? (double)rejected[i].n_completion : 1.0;
        for (size_t t = 0; t < chosen[i].n_tok; t++) sft_sum += chosen[i].policy_tok_logp[t];
        sft_n += chosen[i].n_tok;
        if (c->use_weighting) {
            /* WPO: exp(mean over tokens of (logp - log sum p^2)), detached; pair weight = chosen * rejected */
            const dpoc_loss_seq *s2[2] = {&chosen[i], &rejected[i]};
            double w = 1.0;
            for (int k = 0; k < 2; k++) {
                double a = 0.0;
                for (size_t t = 0; t < s2[k]->n_tok; t++) a += s2[k]->policy_tok_logp[t] - s2[k]->log_sum_sq_probs[t];
                w *= exp(a / (double)(s2[k]->n_tok > 0 ? s2[k]->n_tok : 1));
            }
            wpo[i] = w;
        }
    }
    batch_ctx x = {.B = B, .c = c, .pc = out->chosen_logps, .pr = out->rejected_logps, .rc = rc, .rr = rr,
                   .len_c = len_c, .len_r = len_r, .wpo = c->use_weighting ? wpo : NULL,
                   .sft_loss = sft_n ? -sft_sum / (double)sft_n : NAN,
                   .w1 = duals, .w2 = duals + B, .w3 = duals + 2 * B, .w4 = duals + 3 * B,
                   .sa = duals + 4 * B, .sb = duals + 5 * B, .sort_tmp = v.items, .sort_aux = v.items + B};
    int needs_pairs = 0;
    double sft_weight = 0.0; /* d loss / d sft_loss */
    double mean_wpo = 0.0;
    for (size_t i = 0; i < B; i++) mean_wpo += c->use_weighting ? wpo[i] / (double)B : 1.0 / (double)B;
    for (size_t li = 0; li < c->n_types; li++) {
        if (c->types[li] == DPOC_LOSS_SFT) sft_weight += c->weights[li] * mean_wpo;
        else needs_pairs = 1;
    }
    dual L = batch_loss(&x, B);
    out->loss = L.v;
    for (size_t i = 0; i < B; i++) {
        dA[i] = dB[i] = 0.0;
        if (needs_pairs) {
            dual g = batch_loss(&x, i);
            dA[i] = g.a;
            dB[i] = g.b;
        }
    }
    /* per-token gradients: d logp_seq / d token = 1 (shared part) or ld_alpha (tail) */
    for (size_t i = 0; i < B; i++) {
        const dpoc_loss_seq *s2[2] = {&chosen[i], &rejected[i]};
        float *const dst[2] = {dchosen[i], drejected[i]};
        const double dseq[2] = {dA[i], dB[i]};
        for (int k = 0; k < 2; k++) {
            for (size_t t = 0; t < s2[k]->n_tok; t++) {
                double w = (c->has_ld_alpha && (double)t >= shared[i]) ? c->ld_alpha : 1.0;
                double g = dseq[k] * w;
                if (k == 0 && sft_n) g += -sft_weight / (double)sft_n;
                dst[k][t] = (float)(g * grad_scale);
            }
        }
    }
    if (!isfinite(out->loss)) return dpoc_errf(err, DPOC_EINPUT, "the loss is not finite (%g)", out->loss);
    return 0;
}

int dpoc_loss_compute(const dpoc_loss_cfg *c, size_t B, const dpoc_loss_seq *chosen, const dpoc_loss_seq *rejected,
                      double grad_scale, float *const *dchosen, float *const *drejected, dpoc_loss_out *out,
                      dpoc_err *err) {
    if (B == 0) return dpoc_errf(err, DPOC_EINTERNAL, "loss on an empty micro-batch");
    dpoc_loss_work w;
    DPOC_TRY(dpoc_loss_work_init(&w, B, err));
    const int rc = dpoc_loss_compute_in(&w, c, B, chosen, rejected, grad_scale, dchosen, drejected, out, err);
    dpoc_loss_work_free(&w);
    return rc;
}
