/* Evaluation as HF Trainer.evaluate() runs it for TRL's DPOTrainer: a
 * forward-only pass (no gradients) of the policy, and of the reference unless
 * its log-probs were precomputed, over the whole eval_file.
 *
 * Batches as accelerate shards them: global batch b is pairs [b G, (b + 1) G)
 * with G = per_device_eval_batch_size x ranks, rank r taking the r-th run of
 * per_device_eval_batch_size of it; the last batch is short and, where
 * accelerate would pad it with pairs from the start (even_batches), dpoc leaves
 * them out, as gather_for_metrics drops them from what is averaged.
 * - eval_loss: HF's mean over the evaluated pairs of the loss of each rank's
 *   batch (every pair counted once);
 * - eval_rewards/..., eval_logps/..., eval_logits/..., eval_entropy,
 *   eval_mean_token_accuracy: each global batch's value as a training
 *   micro-batch's (TRL's compute_loss gathers every rank's values), then the
 *   mean over the batches (DPOTrainer.log);
 * - eval_num_tokens: the training tokens so far (TRL logs its train counter);
 * - eval_runtime, eval_samples_per_second, eval_steps_per_second (HF's
 *   speed_metrics: steps = global batches).
 * Nothing is allocated: the trainer sized everything at init. */
#ifndef DPOC_EVALUATE_H
#define DPOC_EVALUATE_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/trainer.h"

typedef struct {
    double loss;
    dpoc_mb_metrics m; /* each metric's mean over the global batches */
    size_t samples, batches;
    double runtime_s;
} dpoc_eval_result;

/* Collective. Needs t->has_eval, and t->eval_ref_logps when the reference model is gone. */
int dpoc_trainer_evaluate(dpoc_trainer *t, dpoc_eval_result *out, dpoc_err *err);
/* The result as a logged row with TRL's names (then epoch and step), to t->on_log on rank 0. */
int dpoc_trainer_log_eval(dpoc_trainer *t, const dpoc_eval_result *r, dpoc_err *err);
/* Whether eval_strategy asks for an evaluation after the step just taken. */
int dpoc_trainer_eval_due(const dpoc_trainer *t);

#endif
