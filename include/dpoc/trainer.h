/* The DPO training loop of one process: micro-batches of pairs through the
 * policy and the frozen reference, TRL's loss and metrics, gradient
 * accumulation with HF Trainer's scaling, clipping, AdamW and the LR schedule. */
#ifndef DPOC_TRAINER_H
#define DPOC_TRAINER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dpoc/config.h"
#include "dpoc/dataset.h"
#include "dpoc/err.h"
#include "dpoc/model.h"
#include "dpoc/optim.h"

/* TRL's per-micro-batch metrics (before window averaging). */
typedef struct {
    double loss;
    double rewards_chosen, rewards_rejected, rewards_accuracies, rewards_margins;
    double logps_chosen, logps_rejected, logits_chosen, logits_rejected;
    double entropy, mean_token_accuracy;
    size_t num_tokens; /* prompt+completion tokens of both sequences of every pair */
} dpoc_mb_metrics;

#define DPOC_N_WINDOW_METRICS 10

typedef struct {
    dpoc_config cfg;
    dpoc_model policy, ref;
    dpoc_dataset data;
    float *grads;
    dpoc_adamw opt;
    size_t max_T;
    dpoc_acts *acts;    /* one per sequence of a micro-batch (2 * batch size) */
    dpoc_acts ref_acts; /* reused for every reference forward */
    dpoc_grad_scratch scratch;
    int32_t *seq_buf;   /* (2 * batch size, max_T) token ids */
    float *tok_buf;     /* per-token scratch: reference logps and dLoss/dlogp */
    size_t *order;      /* data order of the current epoch */
    long order_epoch;

    long total_steps, warmup_steps;
    size_t steps_in_epoch;          /* micro-batches per epoch */
    size_t updates_per_epoch;       /* optimizer steps per epoch */
    long global_step;

    /* the logging window */
    double win_loss;
    double win_metrics[DPOC_N_WINDOW_METRICS];
    size_t win_micro_batches;
    size_t total_tokens;
    size_t win_tokens;
    double win_start_time;
    long last_logged_step;
    FILE *metrics_file;
    int quiet;
} dpoc_trainer;

/* Loads models and data, sizes buffers, computes the schedule. */
int dpoc_trainer_init(dpoc_trainer *t, const dpoc_config *cfg, dpoc_err *err);
void dpoc_trainer_free(dpoc_trainer *t);

/* One micro-batch: forward policy and reference for pairs[0..B), loss, and
 * backward with dLoss scaled by grad_scale, accumulated into t->grads. */
int dpoc_trainer_micro_batch(dpoc_trainer *t, const size_t *pairs, size_t B, double grad_scale,
                             dpoc_mb_metrics *mb, dpoc_err *err);

/* One optimizer step (its micro-batches from the data order), logging as HF does. */
int dpoc_trainer_step(dpoc_trainer *t, dpoc_err *err);

/* The whole run: steps until total_steps; writes output_dir/metrics.jsonl. */
int dpoc_train(const dpoc_config *cfg, dpoc_err *err);

#endif
