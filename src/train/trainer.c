/* Single-process DPO training loop (see trainer.h). The numbers follow TRL 1.16's
 * DPOTrainer on top of transformers 5's Trainer:
 * - each micro-batch loss is divided by the number of micro-batches in its
 *   optimizer step (the epoch's last step may have fewer) before backward;
 * - the logged `loss` is the sum of those scaled losses over the logging window
 *   divided by the optimizer steps in the window;
 * - `grad_norm` is the norm before clipping; `learning_rate` the rate used by
 *   the step (read before the scheduler advances);
 * - TRL's metrics are per micro-batch values averaged over the window, except
 *   num_tokens, a running total;
 * - `epoch` = epoch index + (micro-batches done in the epoch) / micro-batches per epoch. */
#include "dpoc/trainer.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "core/rng.h"
#include "dpoc/loss.h"

enum { W_REW_C, W_REW_R, W_REW_ACC, W_REW_MARGIN, W_LOGP_C, W_LOGP_R, W_LOGIT_C, W_LOGIT_R, W_ENTROPY, W_TOK_ACC };
static const char *const WINDOW_NAMES[DPOC_N_WINDOW_METRICS] = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int copy_model(dpoc_model *dst, const dpoc_model *src, dpoc_err *err) {
    DPOC_TRY(dpoc_model_init(dst, &src->cfg, err));
    memcpy(dst->params, src->params, src->numel * sizeof(float));
    return 0;
}

static int same_architecture(const dpoc_model_config *a, const dpoc_model_config *b) {
    return a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size && a->n_layers == b->n_layers;
}

/* transformers' Trainer exempts biases and normalization weights from weight decay
 * (Trainer.get_decay_parameter_names: "bias" and the *norm* modules). */
static int gets_weight_decay(const char *name) {
    return strstr(name, "bias") == NULL && strstr(name, "norm") == NULL;
}

static int init_optimizer(dpoc_trainer *t, dpoc_err *err) {
    const size_t n = t->policy.n_tensors;
    size_t *off = dpoc_malloc(n * sizeof *off, "optimizer table", err);
    size_t *cnt = dpoc_malloc(n * sizeof *cnt, "optimizer table", err);
    int *decay = dpoc_malloc(n * sizeof *decay, "optimizer table", err);
    int rc = DPOC_ENOMEM;
    if (off && cnt && decay) {
        for (size_t i = 0; i < n; i++) {
            off[i] = t->policy.info[i].offset;
            cnt[i] = t->policy.info[i].numel;
            decay[i] = gets_weight_decay(t->policy.info[i].name);
        }
        rc = dpoc_adamw_init(&t->opt, t->policy.numel, &t->cfg, n, off, cnt, decay, err);
    }
    free(off);
    free(cnt);
    free(decay);
    return rc;
}

int dpoc_trainer_init(dpoc_trainer *t, const dpoc_config *cfg, dpoc_err *err) {
    memset(t, 0, sizeof *t);
    t->cfg = *cfg;
    t->order_epoch = -1;
    int rc = dpoc_model_load(&t->policy, cfg->model_name_or_path, err);
    if (rc) goto fail;
    if (cfg->ref_model_name_or_path[0]) {
        if ((rc = dpoc_model_load(&t->ref, cfg->ref_model_name_or_path, err))) goto fail;
        if (!same_architecture(&t->policy.cfg, &t->ref.cfg)) {
            rc = dpoc_errf(err, DPOC_EINPUT, "ref_model_name_or_path '%s' has a different vocabulary or shape than '%s'",
                           cfg->ref_model_name_or_path, cfg->model_name_or_path);
            goto fail;
        }
    } else if ((rc = copy_model(&t->ref, &t->policy, err))) {
        goto fail;
    }
    rc = dpoc_dataset_load_pretokenized(&t->data, cfg->train_file, t->policy.cfg.vocab_size, cfg->max_length,
                                        cfg->truncation_keep_end, err);
    if (rc) goto fail;
    const size_t bs = cfg->per_device_train_batch_size, n_seq = 2 * bs;
    t->max_T = dpoc_dataset_max_seq_len(&t->data, cfg->max_length);
    if (t->max_T > t->policy.cfg.max_position_embeddings) {
        rc = dpoc_errf(err, DPOC_EINPUT,
                       "%s: a sequence has %zu tokens, more than the model's max_position_embeddings (%zu); set "
                       "max_length",
                       cfg->train_file, t->max_T, t->policy.cfg.max_position_embeddings);
        goto fail;
    }
    t->grads = dpoc_calloc(t->policy.numel, sizeof(float), "gradients", err);
    t->acts = dpoc_calloc(n_seq, sizeof *t->acts, "activation sets", err);
    t->seq_buf = dpoc_malloc(n_seq * t->max_T * sizeof(int32_t), "token buffers", err);
    t->tok_buf = dpoc_malloc(n_seq * t->max_T * sizeof(float), "token buffers", err);
    t->order = dpoc_malloc(t->data.n_pairs * sizeof(size_t), "data order", err);
    if (!t->grads || !t->acts || !t->seq_buf || !t->tok_buf || !t->order) {
        rc = DPOC_ENOMEM;
        goto fail;
    }
    for (size_t s = 0; s < n_seq; s++)
        if ((rc = dpoc_acts_alloc(&t->acts[s], &t->policy.cfg, t->max_T, err))) goto fail;
    if ((rc = dpoc_acts_alloc(&t->ref_acts, &t->ref.cfg, t->max_T, err))) goto fail;
    if ((rc = dpoc_grad_scratch_alloc(&t->scratch, &t->policy.cfg, t->max_T, err))) goto fail;
    if ((rc = init_optimizer(t, err))) goto fail;

    /* schedule as transformers computes it (drop_last false) */
    t->steps_in_epoch = (t->data.n_pairs + bs - 1) / bs;
    const size_t ga = cfg->gradient_accumulation_steps;
    t->updates_per_epoch = t->steps_in_epoch / ga + (t->steps_in_epoch % ga > 0);
    if (t->updates_per_epoch < 1) t->updates_per_epoch = 1;
    t->total_steps = cfg->max_steps > 0 ? cfg->max_steps
                                        : (long)ceil(cfg->num_train_epochs * (double)t->updates_per_epoch);
    t->warmup_steps = dpoc_warmup_steps(cfg, t->total_steps);
    return 0;
fail:
    dpoc_trainer_free(t);
    return rc;
}

void dpoc_trainer_free(dpoc_trainer *t) {
    const size_t n_seq = 2 * t->cfg.per_device_train_batch_size;
    if (t->acts)
        for (size_t s = 0; s < n_seq; s++) dpoc_acts_free(&t->acts[s]);
    free(t->acts);
    dpoc_acts_free(&t->ref_acts);
    dpoc_grad_scratch_free(&t->scratch);
    dpoc_adamw_free(&t->opt);
    free(t->grads);
    free(t->seq_buf);
    free(t->tok_buf);
    free(t->order);
    dpoc_dataset_free(&t->data);
    dpoc_model_free(&t->policy);
    dpoc_model_free(&t->ref);
    if (t->metrics_file) fclose(t->metrics_file);
    memset(t, 0, sizeof *t);
}

int dpoc_trainer_micro_batch(dpoc_trainer *t, const size_t *pairs, size_t B, double grad_scale,
                             dpoc_mb_metrics *mb, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    if (B > cfg->per_device_train_batch_size) return dpoc_errf(err, DPOC_EINTERNAL, "micro-batch too large");
    dpoc_seq *seq = dpoc_malloc(2 * B * sizeof *seq, "sequences", err);
    dpoc_loss_seq *ls = dpoc_malloc(2 * B * sizeof *ls, "loss inputs", err);
    float **dtok = dpoc_malloc(2 * B * sizeof *dtok, "loss gradients", err);
    double *logps = dpoc_malloc(2 * B * sizeof *logps, "log-probs", err);
    int rc = 0;
    if (!seq || !ls || !dtok || !logps) {
        rc = DPOC_ENOMEM;
        goto out;
    }
    memset(mb, 0, sizeof *mb);
    /* sequence s: chosen of pair s for s < B, rejected of pair s-B otherwise (TRL's order) */
    for (size_t s = 0; s < 2 * B; s++) {
        int32_t *ids = t->seq_buf + s * t->max_T;
        dpoc_dataset_collate(&t->data, pairs[s % B], s >= B, cfg->max_length, cfg->truncation_keep_end, ids, &seq[s]);
        dpoc_model_forward(&t->policy, &t->acts[s], ids, seq[s].T, seq[s].row0, seq[s].R);
        mb->num_tokens += seq[s].T;
    }
    for (size_t s = 0; s < 2 * B; s++) {
        size_t partner = s < B ? s + B : s - B;
        size_t shared = seq[s].R < seq[partner].R ? seq[s].R : seq[partner].R;
        const int32_t *ids = t->seq_buf + s * t->max_T;
        dpoc_model_forward(&t->ref, &t->ref_acts, ids, seq[s].T, seq[s].row0, seq[s].R);
        ls[s].n_tok = seq[s].R;
        ls[s].n_completion = seq[s].T - seq[s].comp_start;
        ls[s].policy_tok_logp = t->acts[s].logp;
        ls[s].log_sum_sq_probs = t->acts[s].log_sum_sq_probs;
        ls[s].ref_logp = dpoc_ld_logp(t->ref_acts.logp, seq[s].R, shared, &cfg->loss);
        dtok[s] = t->tok_buf + s * t->max_T;
    }
    dpoc_loss_out lo = {0, logps, logps + B};
    if ((rc = dpoc_loss_compute(&cfg->loss, B, ls, ls + B, grad_scale, dtok, dtok + B, &lo, err))) goto out;
    for (size_t s = 0; s < 2 * B; s++)
        dpoc_model_backward(&t->policy, t->grads, &t->acts[s], &t->scratch, t->seq_buf + s * t->max_T, dtok[s]);

    /* metrics, as TRL computes them for one micro-batch */
    const double beta = cfg->loss.beta;
    mb->loss = lo.loss;
    double ent_sum = 0, logit_sum[2] = {0, 0}, top1 = 0;
    size_t ent_n = 0, logit_n[2] = {0, 0};
    for (size_t i = 0; i < B; i++) {
        double rw_c = beta * (lo.chosen_logps[i] - ls[i].ref_logp);
        double rw_r = beta * (lo.rejected_logps[i] - ls[B + i].ref_logp);
        mb->rewards_chosen += rw_c / (double)B;
        mb->rewards_rejected += rw_r / (double)B;
        mb->rewards_accuracies += (rw_c > rw_r) / (double)B;
        mb->rewards_margins += (rw_c - rw_r) / (double)B;
        mb->logps_chosen += lo.chosen_logps[i] / (double)B;
        mb->logps_rejected += lo.rejected_logps[i] / (double)B;
    }
    for (size_t s = 0; s < 2 * B; s++) {
        const dpoc_acts *a = &t->acts[s];
        const int side = s >= B;
        for (size_t r = 0; r < a->R; r++) {
            ent_sum += a->entropy[r];
            logit_sum[side] += a->mean_logit[r];
            if (!side) top1 += a->is_top1[r];
        }
        ent_n += a->R;
        logit_n[side] += a->R;
    }
    mb->entropy = ent_n ? ent_sum / (double)ent_n : 0.0;
    mb->logits_chosen = logit_n[0] ? logit_sum[0] / (double)logit_n[0] : 0.0;
    mb->logits_rejected = logit_n[1] ? logit_sum[1] / (double)logit_n[1] : 0.0;
    mb->mean_token_accuracy = logit_n[0] ? top1 / (double)logit_n[0] : 0.0;
out:
    free(seq);
    free(ls);
    free(dtok);
    free(logps);
    return rc;
}

static void window_add(dpoc_trainer *t, const dpoc_mb_metrics *mb) {
    const double v[DPOC_N_WINDOW_METRICS] = {
        mb->rewards_chosen, mb->rewards_rejected, mb->rewards_accuracies, mb->rewards_margins, mb->logps_chosen,
        mb->logps_rejected, mb->logits_chosen, mb->logits_rejected, mb->entropy, mb->mean_token_accuracy,
    };
    for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++) t->win_metrics[i] += v[i];
    t->win_micro_batches++;
    t->total_tokens += mb->num_tokens;
    t->win_tokens += mb->num_tokens;
}

static int log_window(dpoc_trainer *t, double grad_norm, double lr, double epoch, dpoc_err *err) {
    const double elapsed = now_s() - t->win_start_time;
    const long steps = t->global_step - t->last_logged_step;
    cJSON *o = cJSON_CreateObject();
    if (!o) return dpoc_errf(err, DPOC_ENOMEM, "out of memory logging metrics");
    cJSON_AddNumberToObject(o, "step", (double)t->global_step);
    cJSON_AddNumberToObject(o, "loss", t->win_loss / (double)steps);
    cJSON_AddNumberToObject(o, "grad_norm", grad_norm);
    cJSON_AddNumberToObject(o, "learning_rate", lr);
    for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++)
        cJSON_AddNumberToObject(o, WINDOW_NAMES[i],
                                t->win_micro_batches ? t->win_metrics[i] / (double)t->win_micro_batches : 0.0);
    cJSON_AddNumberToObject(o, "num_tokens", (double)t->total_tokens);
    cJSON_AddNumberToObject(o, "epoch", epoch);
    cJSON_AddNumberToObject(o, "tokens_per_second", elapsed > 0 ? (double)t->win_tokens / elapsed : 0.0);
    cJSON_AddNumberToObject(o, "step_time_s", elapsed / (double)steps);
    char *line = cJSON_PrintUnformatted(o);
    int rc = 0;
    if (!line) {
        rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory logging metrics");
    } else {
        if (t->metrics_file && (fprintf(t->metrics_file, "%s\n", line) < 0 || fflush(t->metrics_file) != 0))
            rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.jsonl: write failed: %s", t->cfg.output_dir, strerror(errno));
        if (!t->quiet)
            printf("step %ld/%ld  loss %.4f  rewards/margins %.4f  rewards/accuracies %.3f  grad_norm %.4f  lr %.3g  "
                   "epoch %.2f  %.0f tok/s\n",
                   t->global_step, t->total_steps, t->win_loss / (double)steps,
                   t->win_micro_batches ? t->win_metrics[W_REW_MARGIN] / (double)t->win_micro_batches : 0.0,
                   t->win_micro_batches ? t->win_metrics[W_REW_ACC] / (double)t->win_micro_batches : 0.0, grad_norm,
                   lr, epoch, elapsed > 0 ? (double)t->win_tokens / elapsed : 0.0);
        fflush(stdout);
    }
    free(line);
    cJSON_Delete(o);
    t->win_loss = 0;
    memset(t->win_metrics, 0, sizeof t->win_metrics);
    t->win_micro_batches = 0;
    t->win_tokens = 0;
    t->win_start_time = now_s();
    t->last_logged_step = t->global_step;
    return rc;
}

int dpoc_trainer_step(dpoc_trainer *t, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const size_t bs = cfg->per_device_train_batch_size, ga = cfg->gradient_accumulation_steps;
    const long epoch = t->global_step / (long)t->updates_per_epoch;
    const size_t update = (size_t)(t->global_step % (long)t->updates_per_epoch);
    if (t->order_epoch != epoch) {
        if (cfg->shuffle) dpoc_shuffle_order(t->order, t->data.n_pairs, cfg->seed, (uint64_t)epoch);
        else
            for (size_t i = 0; i < t->data.n_pairs; i++) t->order[i] = i;
        t->order_epoch = epoch;
    }
    if (t->global_step == 0 || t->win_start_time == 0) t->win_start_time = now_s();
    const size_t mb_first = update * ga;
    size_t mb_end = mb_first + ga;
    if (mb_end > t->steps_in_epoch) mb_end = t->steps_in_epoch;
    const size_t n_mb = mb_end - mb_first;
    memset(t->grads, 0, t->policy.numel * sizeof(float));
    for (size_t m = mb_first; m < mb_end; m++) {
        size_t first = m * bs, B = bs;
        if (first + B > t->data.n_pairs) B = t->data.n_pairs - first;
        dpoc_mb_metrics mb;
        DPOC_TRY(dpoc_trainer_micro_batch(t, t->order + first, B, 1.0 / (double)n_mb, &mb, err));
        t->win_loss += mb.loss / (double)n_mb;
        window_add(t, &mb);
    }
    const double grad_norm = dpoc_grad_norm(t->grads, t->policy.numel);
    if (!isfinite(grad_norm))
        return dpoc_errf(err, DPOC_EINPUT, "step %ld: the gradient norm is not finite", t->global_step + 1);
    dpoc_clip_grads(t->grads, t->policy.numel, grad_norm, cfg->max_grad_norm);
    const double lr = cfg->learning_rate * dpoc_lr_lambda(cfg, t->global_step, t->warmup_steps, t->total_steps);
    dpoc_adamw_step(&t->opt, t->policy.params, t->grads, lr);
    t->global_step++;
    const double epoch_f = (double)epoch + (double)mb_end / (double)t->steps_in_epoch;
    if ((t->global_step % (long)cfg->logging_steps) == 0 || (t->global_step == 1 && cfg->logging_first_step))
        DPOC_TRY(log_window(t, grad_norm, lr, epoch_f, err));
    return 0;
}

int dpoc_train(const dpoc_config *cfg, dpoc_err *err) {
    dpoc_trainer t;
    DPOC_TRY(dpoc_trainer_init(&t, cfg, err));
    int rc = dpoc_mkdirs(cfg->output_dir, err);
    char path[DPOC_PATH_MAX + 32];
    if (!rc) {
        snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->output_dir);
        t.metrics_file = fopen(path, "w");
        if (!t.metrics_file) rc = dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", path, strerror(errno));
    }
    if (!rc) {
        printf("dpoc: %zu pairs (%zu dropped: prompt >= max_length), %zu parameters, %ld steps (%zu per epoch), "
               "warmup %ld\n",
               t.data.n_pairs, t.data.n_dropped_prompt_too_long, t.policy.numel, t.total_steps, t.updates_per_epoch,
               t.warmup_steps);
        fflush(stdout);
    }
    while (!rc && t.global_step < t.total_steps) rc = dpoc_trainer_step(&t, err);
    dpoc_trainer_free(&t);
    return rc;
}
