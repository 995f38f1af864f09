/* Evaluation passes (see evaluate.h). */
#include "dpoc/evaluate.h"

#include <string.h>

int dpoc_trainer_evaluate(dpoc_trainer *t, dpoc_eval_result *out, dpoc_err *err) {
    memset(out, 0, sizeof *out);
    if (!t->has_eval) return dpoc_errf(err, DPOC_EINTERNAL, "an evaluation without eval_file");
    const int W = t->dist ? t->dist->world : 1, r = t->dist ? t->dist->rank : 0;
    const size_t ebs = t->cfg.per_device_eval_batch_size, G = ebs * (size_t)W, N = t->eval.n_pairs;
    const size_t nb = t->eval_batches;
    const double *ref = t->eval_ref_logps; /* NULL: the reference runs (policy copy, or the base without adapters) */
    const double t0 = dpoc_now_s();
    double *sums = t->eval_sums, *loss_sum = t->eval_sums + nb * DPOC_MB_N;
    memset(sums, 0, (nb * DPOC_MB_N + 1) * sizeof *sums);
    for (size_t b = 0; b < nb; b++) {
        size_t first = b * G + (size_t)r * ebs, B = 0;
        for (size_t k = 0; k < ebs && first + k < N; k++) t->mb_pairs[B++] = first + k;
        if (B == 0) continue; /* this rank's share of the last batch would only be padding */
        DPOC_TRY(dpoc_trainer_forward_loss(t, &t->eval, ref, t->mb_pairs, B, 1.0, sums + b * DPOC_MB_N, err));
        *loss_sum += sums[b * DPOC_MB_N + MB_LOSS] * (double)B;
    }
    t->mb.B = 0; /* no backward follows an evaluation forward */
    if (t->dist) DPOC_TRY(dpoc_dist_sum_doubles(t->dist, sums, nb * DPOC_MB_N + 1, err));
    double acc[DPOC_N_WINDOW_METRICS] = {0};
    for (size_t b = 0; b < nb; b++) {
        dpoc_mb_metrics m;
        dpoc_mb_metrics_from_sums(sums + b * DPOC_MB_N, &m);
        const double v[DPOC_N_WINDOW_METRICS] = {m.rewards_chosen, m.rewards_rejected, m.rewards_accuracies,
                                                 m.rewards_margins, m.logps_chosen, m.logps_rejected,
                                                 m.logits_chosen, m.logits_rejected, m.entropy,
                                                 m.mean_token_accuracy};
        for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++) acc[i] += v[i] / (double)nb;
    }
    out->m.rewards_chosen = acc[0];
    out->m.rewards_rejected = acc[1];
    out->m.rewards_accuracies = acc[2];
    out->m.rewards_margins = acc[3];
    out->m.logps_chosen = acc[4];
    out->m.logps_rejected = acc[5];
    out->m.logits_chosen = acc[6];
    out->m.logits_rejected = acc[7];
    out->m.entropy = acc[8];
    out->m.mean_token_accuracy = acc[9];
    out->m.num_tokens = t->total_tokens;
    out->loss = *loss_sum / (double)N;
    out->m.loss = out->loss;
    out->samples = N;
    out->batches = nb;
    out->runtime_s = dpoc_now_s() - t0;
    t->progress_time = dpoc_now_s();
    return 0;
}

static void add(dpoc_log_record *r, const char *name, double v) {
    if (r->n < DPOC_MAX_LOG_FIELDS) {
        r->names[r->n] = name;
        r->values[r->n++] = v;
    }
}

int dpoc_trainer_log_eval(dpoc_trainer *t, const dpoc_eval_result *e, dpoc_err *err) {
    if (!t->on_log || (t->dist && t->dist->rank != 0)) return 0;
    /* the order of HF's log_history row: evaluate()'s keys, then DPOTrainer's metrics as it stores them */
    dpoc_log_record r = {0};
    const double rt = e->runtime_s > 0 ? e->runtime_s : 1e-9;
    add(&r, "eval_loss", e->loss);
    add(&r, "eval_runtime", e->runtime_s);
    add(&r, "eval_samples_per_second", (double)e->samples / rt);
    add(&r, "eval_steps_per_second", (double)e->batches / rt);
    add(&r, "eval_entropy", e->m.entropy);
    add(&r, "eval_num_tokens", (double)e->m.num_tokens);
    add(&r, "eval_logits/chosen", e->m.logits_chosen);
    add(&r, "eval_logits/rejected", e->m.logits_rejected);
    add(&r, "eval_mean_token_accuracy", e->m.mean_token_accuracy);
    add(&r, "eval_rewards/chosen", e->m.rewards_chosen);
    add(&r, "eval_rewards/rejected", e->m.rewards_rejected);
    add(&r, "eval_rewards/accuracies", e->m.rewards_accuracies);
    add(&r, "eval_rewards/margins", e->m.rewards_margins);
    add(&r, "eval_logps/chosen", e->m.logps_chosen);
    add(&r, "eval_logps/rejected", e->m.logps_rejected);
    add(&r, "epoch", t->epoch_f);
    add(&r, "step", (double)t->global_step);
    return t->on_log(t->on_log_ctx, &r, err);
}

int dpoc_trainer_eval_due(const dpoc_trainer *t) {
    if (!t->has_eval || t->global_step == 0) return 0;
    switch (t->cfg.eval_strategy) {
    case DPOC_EVAL_STEPS: return t->global_step % (long)t->cfg.eval_steps == 0;
    /* at each epoch's end, and where max_steps ends the last one early (HF's on_epoch_end) */
    case DPOC_EVAL_EPOCH: return t->global_step % (long)t->updates_per_epoch == 0 || t->global_step == t->total_steps;
    default: return 0;
    }
}
