/* DPO losses exactly as TRL's DPOTrainer._compute_loss defines them (TRL 1.16),
 * on one micro-batch of B pairs. Input is per completion token: the policy's
 * and the reference's log-prob of each completion token (the shifted completion
 * mask); output is the loss and dLoss/d(policy token log-prob).
 *
 * The gradient w.r.t. the per-sequence log-probs is taken by forward-mode
 * differentiation (dual numbers) of the same code that computes the loss, so
 * the formulas are written once; losses that couple pairs (aot sorts the batch)
 * are handled by seeding one pair at a time. */
#ifndef DPOC_LOSS_H
#define DPOC_LOSS_H

#include <stddef.h>

#include "dpoc/err.h"

typedef enum {
    DPOC_LOSS_SIGMOID,
    DPOC_LOSS_HINGE,
    DPOC_LOSS_IPO,
    DPOC_LOSS_EXO_PAIR,
    DPOC_LOSS_NCA_PAIR,
    DPOC_LOSS_ROBUST,
    DPOC_LOSS_BCO_PAIR,
    DPOC_LOSS_SPPO_HARD,
    DPOC_LOSS_AOT,
    DPOC_LOSS_AOT_UNPAIRED,
    DPOC_LOSS_APO_ZERO,
    DPOC_LOSS_APO_DOWN,
    DPOC_LOSS_DISCOPOP,
    DPOC_LOSS_SFT,
    DPOC_LOSS_SIGMOID_NORM,
    DPOC_LOSS_COUNT
} dpoc_loss_kind;

typedef enum { DPOC_FDIV_REVERSE_KL, DPOC_FDIV_FORWARD_KL, DPOC_FDIV_JS, DPOC_FDIV_ALPHA } dpoc_fdiv;

#define DPOC_MAX_LOSS_TYPES 16

typedef struct {
    size_t n_types;
    dpoc_loss_kind types[DPOC_MAX_LOSS_TYPES];
    double weights[DPOC_MAX_LOSS_TYPES];
    double beta;
    double label_smoothing;
    dpoc_fdiv f_divergence_type;
    double f_alpha_divergence_coef;
    int use_weighting;
    int has_ld_alpha; /* ld_alpha is None unless set */
    double ld_alpha;
    double discopop_tau;
} dpoc_loss_cfg;

/* Name <-> kind ("sigmoid", ...). Returns -1 for an unknown name. */
int dpoc_loss_kind_from_name(const char *name);
const char *dpoc_loss_kind_name(dpoc_loss_kind k);
int dpoc_fdiv_from_name(const char *name);
const char *dpoc_fdiv_name(dpoc_fdiv f);

/* Checks a loss configuration the way TRL's DPOConfig / DPOTrainer do (e.g. the
 * f-divergence only for the loss types that support it, exo_pair needs
 * label_smoothing > 0, robust needs it < 0.5). Errors name the config key. */
int dpoc_loss_cfg_validate(const dpoc_loss_cfg *c, dpoc_err *err);

/* One sequence of a micro-batch, as the loss sees it. */
typedef struct {
    size_t n_tok;                 /* completion tokens that are labels (shifted mask sum) */
    size_t n_completion;          /* completion tokens in the sequence (unshifted mask sum; ipo/sigmoid_norm) */
    const float *policy_tok_logp; /* (n_tok) */
    const float *log_sum_sq_probs;/* (n_tok), policy; only for use_weighting */
    double ref_logp;              /* reference per-sequence log-prob (already ld-weighted) */
} dpoc_loss_seq;

/* Per-sequence log-prob with TRL's LD-DPO weighting: the first `shared` tokens
 * count fully, the rest with weight ld_alpha (shared = min(chosen, rejected)). */
double dpoc_ld_logp(const float *tok_logp, size_t n_tok, size_t shared, const dpoc_loss_cfg *c);

typedef struct {
    double loss;            /* the micro-batch loss, as TRL's compute_loss returns it */
    double *chosen_logps;   /* (B) policy per-sequence log-probs, ld-weighted */
    double *rejected_logps; /* (B) */
} dpoc_loss_out;

/* The scratch of dpoc_loss_compute_in for micro-batches of up to max_B pairs,
 * made once so that a training step allocates nothing (its layout is loss.c's). */
typedef struct {
    size_t max_B;
    void *block;
} dpoc_loss_work;

int dpoc_loss_work_init(dpoc_loss_work *w, size_t max_B, dpoc_err *err);
void dpoc_loss_work_free(dpoc_loss_work *w);

/* chosen[i], rejected[i] for i < B (B <= w->max_B). dchosen[i] / drejected[i]
 * (n_tok floats each) receive dLoss/d(policy token log-prob), scaled by
 * grad_scale (e.g. 1/GA). out->chosen_logps / rejected_logps must point at B
 * doubles each. Allocates nothing. */
int dpoc_loss_compute_in(dpoc_loss_work *w, const dpoc_loss_cfg *c, size_t B, const dpoc_loss_seq *chosen,
                         const dpoc_loss_seq *rejected, double grad_scale, float *const *dchosen,
                         float *const *drejected, dpoc_loss_out *out, dpoc_err *err);

/* The same with a scratch made and freed for this call (one-off callers, tests). */
int dpoc_loss_compute(const dpoc_loss_cfg *c, size_t B, const dpoc_loss_seq *chosen,
                      const dpoc_loss_seq *rejected, double grad_scale, float *const *dchosen,
                      float *const *drejected, dpoc_loss_out *out, dpoc_err *err);

#endif
