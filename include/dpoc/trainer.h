/* The DPO training loop: micro-batches of pairs through the policy and the
 * frozen reference, TRL's loss and metrics, gradient accumulation with HF
 * Trainer's scaling, gradient averaging across MPI ranks, clipping, AdamW and
 * the LR schedule.
 *
 * Every buffer a step needs is made by dpoc_trainer_init, sized by the
 * configured maxima (per_device_train_batch_size, the longest sequence after
 * max_length): an optimizer step allocates nothing. */
#ifndef DPOC_TRAINER_H
#define DPOC_TRAINER_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dpoc/config.h"
#include "dpoc/dataset.h"
#include "dpoc/dist.h"
#include "dpoc/err.h"
#include "dpoc/flops.h"
#include "dpoc/loss.h"
#include "dpoc/model.h"
#include "dpoc/prof.h"
#include "dpoc/optim.h"
#include "dpoc/shard.h"
#include "dpoc/tokenizer.h"

/* Per-micro-batch sums from which TRL's metrics follow; summed across ranks
 * (TRL gathers every rank's values before averaging). */
enum {
    MB_REW_C, MB_REW_R, MB_ACC, MB_MARGIN, MB_LOGP_C, MB_LOGP_R, /* per-pair sums */
    MB_PAIRS,
    MB_LOGIT_C, MB_TOK_C, MB_LOGIT_R, MB_TOK_R, /* token sums and counts */
    MB_ENT, MB_TOP1,
    MB_NUM_TOKENS,
    MB_LOSS,  /* this rank's micro-batch loss (a mean over its pairs) */
    MB_RANKS, /* 1 per rank: the loss is averaged over ranks */
    DPOC_MB_N
};

/* TRL's per-micro-batch metrics (before window averaging). */
typedef struct {
    double loss;
    double rewards_chosen, rewards_rejected, rewards_accuracies, rewards_margins;
    double logps_chosen, logps_rejected, logits_chosen, logits_rejected;
    double entropy, mean_token_accuracy;
    size_t num_tokens; /* prompt+completion tokens of both sequences of every pair */
} dpoc_mb_metrics;

void dpoc_mb_metrics_from_sums(const double *sums, dpoc_mb_metrics *m);

#define DPOC_N_WINDOW_METRICS 10

/* One logged row: TRL's metric names (plus dpoc's timing ones) and values. */
#define DPOC_MAX_LOG_FIELDS 32
typedef struct {
    size_t n;
    const char *names[DPOC_MAX_LOG_FIELDS];
    double values[DPOC_MAX_LOG_FIELDS];
} dpoc_log_record;

/* Receives each logged row on rank 0 (files, progress lines); a non-zero return stops training. */
typedef int (*dpoc_log_fn)(void *ctx, const dpoc_log_record *rec, dpoc_err *err);

/* What DPOC_TEST_INJECT puts a NaN or an Inf into. */
typedef enum { DPOC_INJECT_NONE, DPOC_INJECT_WEIGHT, DPOC_INJECT_GRAD, DPOC_INJECT_ACT } dpoc_inject_kind;

/* Test-only fault injection, read from the environment at init:
 * DPOC_TEST_FAIL_AT="RANK:STEP" makes that rank fail at that optimizer step;
 * DPOC_TEST_PERTURB="RANK:TENSOR" perturbs a weight on that rank after loading;
 * DPOC_TEST_HANG_AT="RANK:STEP" makes that rank stop making progress at that step;
 * DPOC_TEST_INJECT="KIND:RANK:STEP:NAME[:VALUE]" (VALUE nan, inf or -inf; nan
 * when left out) writes VALUE on that rank into element 0 of: weight NAME after
 * step STEP's update (0: after loading); the gradient of tensor NAME before step
 * STEP's norm; the forward output NAME (dpoc_act_watch) during step STEP. */
typedef struct {
    dpoc_inject_kind inject_kind;
    int inject_rank;
    long inject_step;
    char inject_name[DPOC_PARAM_NAME_MAX];
    float inject_value;
    int fail_rank;
    long fail_step;
    int hang_rank;
    long hang_step;
    int perturb_rank;
    char perturb_tensor[DPOC_PARAM_NAME_MAX];
} dpoc_test_hooks;

/* What dpoc_trainer_forward_loss leaves for dpoc_trainer_backward: the
 * micro-batch's sequences, where each one's head outputs are, and the loss's
 * inputs and dLoss/dlogp. Arrays sized at init for per_device_train_batch_size
 * pairs; sequence s is the chosen one of pair s for s < B, the rejected one of
 * pair s - B otherwise (TRL's order). */
typedef struct {
    size_t B;               /* pairs of the forward waiting for its backward; 0: none */
    size_t last_B;          /* pairs of the last backward (a failing step's diagnosis runs its forward again) */
    dpoc_seq *seq;          /* (2B) */
    size_t *actp, *offp;    /* (2B) sequence s's head outputs: acts[actp[s]] rows [offp[s], offp[s] + R) */
    dpoc_pair_tokens *ptok; /* (B) the pairs layout of the shared path */
    dpoc_loss_seq *ls;      /* (2B) the loss's view of each sequence (policy and reference log-probs) */
    float **dtok;           /* (2B) dLoss/dlogp of each sequence's tokens: inside tok_buf */
    double *logps;          /* (2B) policy per-sequence log-probs (ld-weighted): chosen [0, B), rejected [B, 2B) */
    double *ref_pair;       /* (2B) reference log-probs pair by pair: chosen 2b, rejected 2b + 1 */
    dpoc_fwd_flops *fwd_flops; /* (n_fwd) FLOPs of each policy forward (a sequence, or a pair when shared) */
    size_t n_fwd;
    int ran_ref;            /* the in-memory reference ran too (its log-probs were not precomputed) */
} dpoc_micro_batch;

typedef struct {
    dpoc_config cfg;
    dpoc_dist *dist; /* NULL: one process, no MPI */
    dpoc_model policy, ref;
    /* With use_peft and no ref_model_name_or_path, the reference is the policy's
     * base: the policy with its adapters off (TRL + peft: disable_adapter()). */
    int ref_is_base;
    dpoc_tokenizer *tok; /* NULL when the model has no tokenizer.json (pre-tokenized data only) */
    dpoc_dataset data;
    /* eval_file (dpoc/evaluate.h): its pairs, their precomputed reference
     * log-probs (or NULL), and the per-batch metric sums of one pass */
    dpoc_dataset eval;
    int has_eval;
    double *eval_ref_logps;
    double *eval_sums;  /* (eval batches x DPOC_MB_N + 1) */
    size_t eval_batches;
    size_t max_B;       /* pairs a forward may hold: the larger of the training and evaluation batches */
    double epoch_f;     /* HF's state.epoch after the last step */
    float *grads;        /* the gradient block: sync.grads, or with zero_stage 2 shard.local */
    dpoc_grad_sync sync; /* stages 0 and 1 (unused at stage 2: path NONE) */
    int zero_stage;      /* cfg.zero_stage: 0, or shard is made */
    dpoc_shard shard;
    dpoc_adamw opt;      /* with ZeRO over this rank's slice [shard.me_lo, shard.me_hi) */
    size_t max_T;
    int shared;         /* pairs run with their prompt computed once (shared_prefix, every pair allows it) */
    size_t act_T;       /* rows each activation set holds: max_T, or the longest pair when shared */
    size_t n_acts;      /* activation sets: one per sequence (2 * batch size), or one per pair when shared */
    int balance;        /* split each global batch over the ranks by cost (dpoc/balance.h) */
    double *bal_cost;   /* (ranks x batch size) scratch of the split */
    size_t *bal_pairs, *bal_rank, *bal_order;
    double *bal_load;   /* (ranks) scratch of the split */
    size_t *bal_count;
    dpoc_acts *acts;
    dpoc_acts ref_acts; /* reused for every reference forward */
    dpoc_grad_scratch scratch;
    /* backward layer by layer over the micro-batch's sequences (unshared prompts) */
    float *seq_dx_block;        /* (2 * batch size, act_T, hidden) */
    float **seq_dx;             /* (2 * batch size) sequence s's dLoss/d(residual) */
    dpoc_acts **seq_acts;       /* (2 * batch size) &acts[s] */
    const int32_t **seq_tokens; /* (2 * batch size) */
    int32_t *seq_buf;   /* (2 * batch size, max_T) token ids */
    float *tok_buf;     /* dLoss/dlogp per token */
    size_t *order;      /* data order of the current epoch */
    size_t *mb_pairs;   /* pairs of the current micro-batch */
    double *step_sums;  /* (gradient_accumulation_steps, DPOC_MB_N) */
    dpoc_micro_batch mb;          /* the micro-batch between its forward and its backward */
    dpoc_loss_work loss_work;     /* the loss's scratch */
    uint64_t *replica_sums;       /* (2 x tensors) checksums of dpoc_trainer_check_replicas */
    long order_epoch;

    long total_steps, warmup_steps;
    size_t steps_in_epoch;    /* micro-batches per rank per epoch */
    size_t updates_per_epoch; /* optimizer steps per epoch */
    long global_step;
    double last_grad_norm;

    /* the logging window */
    double win_loss;
    double win_metrics[DPOC_N_WINDOW_METRICS];
    size_t win_micro_batches;
    size_t total_tokens;
    size_t win_tokens;
    double win_start_time;
    double win_comm_time;
    long last_logged_step;
    dpoc_log_fn on_log; /* NULL: nothing is logged */
    void *on_log_ctx;
    dpoc_test_hooks hooks;
    dpoc_act_watch watch; /* the forward watch a failing step's diagnosis and DPOC_TEST_INJECT use */
    /* content fingerprints (FNV-1a 64) of what the run started from, kept in checkpoints */
    uint64_t fp_policy, fp_ref, fp_data;
    dpoc_prof *prof;   /* where step time goes (dpoc bench); NULL: not measured */
    double flops;      /* floating-point operations the steps so far needed (dpoc/flops.h) */
    double *ref_logps; /* (n_pairs, 2): chosen, rejected reference log-probs when precomputed; else NULL */
    volatile double progress_time; /* last sign of life, read by the watchdog */
    int shadows;       /* bf16 copies of the weights registered for the products (dpoc/gemm.h) */
} dpoc_trainer;

/* Loads models and data, sizes buffers, computes the schedule. dist may be NULL. */
int dpoc_trainer_init(dpoc_trainer *t, const dpoc_config *cfg, dpoc_dist *dist, dpoc_err *err);
void dpoc_trainer_free(dpoc_trainer *t);

/* precompute_ref_log_probs: the fingerprint a stored set must carry to be reused
 * (reference weights, tokenized data, and the settings that change a sequence's
 * reference log-prob: max_length, truncation_mode, ld_alpha). */
uint64_t dpoc_trainer_ref_logps_key(const dpoc_trainer *t);
/* Computes t->ref_logps with the reference model, each rank a share of the pairs,
 * summed over the ranks. */
int dpoc_trainer_compute_ref_logps(dpoc_trainer *t, dpoc_err *err);
/* Takes values (n_pairs * 2, copied) instead of computing them. */
int dpoc_trainer_set_ref_logps(dpoc_trainer *t, const double *values, dpoc_err *err);
/* Whoever writes t->policy.params outside a step (a checkpoint restore) calls
 * this before the next step, so that bf16 products see the new weights. */
void dpoc_trainer_weights_changed(dpoc_trainer *t);
/* The same for the evaluation set: t->eval_ref_logps. */
int dpoc_trainer_compute_eval_ref_logps(dpoc_trainer *t, dpoc_err *err);
int dpoc_trainer_set_eval_ref_logps(dpoc_trainer *t, const double *values, dpoc_err *err);
/* The key of stored evaluation reference log-probs: as the training set's, with the eval set's content. */
uint64_t dpoc_trainer_eval_ref_logps_key(const dpoc_trainer *t);
/* Frees the reference model and its activations once t->ref_logps holds everything. */
void dpoc_trainer_drop_ref(dpoc_trainer *t);

/* Forward and loss of one micro-batch on this rank, no gradient work: the
 * policy (and, without precomputed reference log-probs, the in-memory
 * reference) over pairs[0..B) of data, the loss, and into sums (DPOC_MB_N)
 * this rank's metric sums. dLoss/dlogp, scaled by grad_scale, and the state the
 * backward needs stay in t->mb and t's activations until the next forward.
 *
 * ref_logps: (data's pairs, 2) precomputed reference log-probs (chosen,
 * rejected), or NULL to run t->ref. A training step passes t->data and
 * t->ref_logps; an evaluation pass (forward only, metrics out) its own data set
 * and reference log-probs, and any grad_scale (1). Another data set must fit
 * what init sized: B <= per_device_train_batch_size, sequences no longer than
 * the training set's longest, and prompts shared like the training set's when
 * t->shared; a set that does not is an error (DPOC_EINPUT), nothing is run.
 * The FLOPs of the forwards are left in t->mb, not counted in t->flops. */
int dpoc_trainer_forward_loss(dpoc_trainer *t, const dpoc_dataset *data, const double *ref_logps,
                              const size_t *pairs, size_t B, double grad_scale, double *sums, dpoc_err *err);

/* Backward of the micro-batch the last dpoc_trainer_forward_loss ran (once per
 * forward): the policy's backward with the saved dLoss/dlogp, accumulated into
 * t->grads. When sync_tail is set the finished gradient buckets start their
 * allreduce during this backward (grad_allreduce mpi; the shared path waits
 * for dpoc_grad_sync_finish). */
int dpoc_trainer_backward(dpoc_trainer *t, int sync_tail, dpoc_err *err);

/* One training micro-batch on this rank: dpoc_trainer_forward_loss over t's
 * training data, its FLOPs (forward, backward, reference) added to t->flops,
 * then dpoc_trainer_backward. */
int dpoc_trainer_micro_batch(dpoc_trainer *t, const size_t *pairs, size_t B, double grad_scale, double *sums,
                             int sync_tail, dpoc_err *err);

/* One optimizer step (its micro-batches from the data order), logging as HF does. */
int dpoc_trainer_step(dpoc_trainer *t, dpoc_err *err);

/* FNV-1a 64 over bytes, continuing from h (start with DPOC_FNV_OFFSET). */
#define DPOC_FNV_OFFSET 0xcbf29ce484222325ull
uint64_t dpoc_fnv1a(uint64_t h, const void *data, size_t n);

/* Checks that every rank holds the same weights; names the first tensor that differs. */
int dpoc_trainer_check_replicas(dpoc_trainer *t, dpoc_err *err);

/* Wall-clock seconds (monotonic), as the trainer measures its steps. */
double dpoc_now_s(void);

#endif
