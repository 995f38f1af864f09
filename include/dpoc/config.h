/* Training configuration: TRL DPOConfig / HF TrainingArguments key names, read
 * from a JSON file and `--set key=value` overrides. Unknown keys, wrong types and
 * out-of-range values are errors naming the key (exit code 2). */
#ifndef DPOC_CONFIG_H
#define DPOC_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "dpoc/err.h"
#include "dpoc/loss.h"

#define DPOC_PATH_MAX 4096

typedef enum { DPOC_SCHED_CONSTANT, DPOC_SCHED_CONSTANT_WARMUP, DPOC_SCHED_LINEAR, DPOC_SCHED_COSINE,
               DPOC_SCHED_COSINE_MIN_LR } dpoc_sched_kind;

/* eval_strategy (HF IntervalStrategy). */
enum { DPOC_EVAL_NO, DPOC_EVAL_STEPS, DPOC_EVAL_EPOCH };

/* grad_allreduce: how ranks average gradients (see dpoc/dist.h). */
typedef enum { DPOC_ALLREDUCE_AUTO, DPOC_ALLREDUCE_SHARED, DPOC_ALLREDUCE_MPI } dpoc_allreduce_kind;

/* LoRA (peft's LoraConfig, TRL's ModelConfig key names; see dpoc/lora.h). */
#define DPOC_LORA_MAX_TARGETS 16
#define DPOC_LORA_TARGET_MAX 128
/* lora_target_modules: a list of module names (peft: a module whose name equals
 * one or ends with "." + one), "all-linear" (every projection but the LM head) or
 * any other string: a regular expression the whole module name must match. */
typedef enum { DPOC_LORA_TARGETS_LIST, DPOC_LORA_TARGETS_ALL_LINEAR, DPOC_LORA_TARGETS_REGEX } dpoc_lora_targets_kind;
/* init_lora_weights: true (A kaiming-uniform a=sqrt(5), B zeros), "gaussian"
 * (A normal with std 1/r, B zeros), false (both as nn.Linear initialises them). */
typedef enum { DPOC_LORA_INIT_DEFAULT, DPOC_LORA_INIT_GAUSSIAN, DPOC_LORA_INIT_RANDOM } dpoc_lora_init;
typedef struct {
    int use_peft;
    size_t r;
    double alpha;
    double dropout; /* accepted; has no effect while dropout is disabled (disable_dropout) */
    int use_rslora; /* scale alpha / sqrt(r) instead of alpha / r */
    dpoc_lora_init init;
    dpoc_lora_targets_kind targets_kind;
    size_t n_targets;
    char targets[DPOC_LORA_MAX_TARGETS][DPOC_LORA_TARGET_MAX]; /* the list, or targets[0] = the expression */
    char adapter_name_or_path[DPOC_PATH_MAX]; /* a PEFT adapter directory to start from (its config wins) */
    int keep_base; /* base_weights_dtype "keep": the frozen base stays as the file stores it (QLoRA on GGUF) */
} dpoc_lora_cfg;

typedef struct {
    char model_name_or_path[DPOC_PATH_MAX];
    char ref_model_name_or_path[DPOC_PATH_MAX]; /* empty: frozen copy of the starting policy */
    char train_file[DPOC_PATH_MAX];
    char eval_file[DPOC_PATH_MAX]; /* TRL's eval_dataset: any format train_file takes; empty: none */
    char output_dir[DPOC_PATH_MAX];
    char tokenizer_name_or_path[DPOC_PATH_MAX]; /* empty: the model directory */
    char chat_template[32];                     /* "auto" or chatml, qwen2.5, smollm2, llama3 */
    int skip_bad_records;

    dpoc_loss_cfg loss;
    long loss_weights_given; /* how many loss_weights the user gave; -1: none (all 1.0) */

    double learning_rate;
    dpoc_sched_kind lr_scheduler_type;
    double warmup_steps; /* >= 1: steps; < 1: ratio of the total (transformers 5 semantics) */
    double warmup_ratio; /* older name for a ratio; used when warmup_steps is 0 */
    double num_cycles;   /* lr_scheduler_kwargs.num_cycles (cosine) */
    double min_lr;       /* lr_scheduler_kwargs.min_lr, or < 0 */
    double min_lr_rate;  /* lr_scheduler_kwargs.min_lr_rate, or < 0 */
    double weight_decay;
    double adam_beta1, adam_beta2, adam_epsilon;
    double max_grad_norm; /* <= 0: no clipping */

    size_t per_device_train_batch_size;
    size_t gradient_accumulation_steps;
    double num_train_epochs;
    long max_steps; /* > 0 overrides num_train_epochs */
    long max_length; /* <= 0: no truncation (None) */
    int truncation_keep_end;
    size_t logging_steps;
    /* evaluation (HF Trainer): eval_strategy no | steps | epoch; eval_steps 0: logging_steps */
    int eval_strategy;
    size_t eval_steps;
    size_t per_device_eval_batch_size;
    int eval_on_start;
    int prediction_loss_only; /* accepted: DPOTrainer computes its metrics either way */
    int logging_first_step;
    unsigned long long seed;
    int shuffle; /* train_sampling_strategy: "random" (1) or "sequential" (0) */
    int balance_batches;          /* global batch split over ranks by cost (dpoc/balance.h) */
    int shared_prefix;            /* a pair's prompt computed once for both completions */
    int gradient_checkpointing;   /* per-layer recomputation in backward (dpoc_acts_mode RECOMPUTE) */
    int precompute_ref_log_probs; /* one reference pass before training, kept in output_dir/ref_logps.h5 */
    int bf16;                     /* DPOC_BF16_*: precision of the linear layers' matrix products */

    /* checkpoints */
    size_t save_steps;       /* checkpoint every N optimizer steps (0: only at the end / on a signal) */
    size_t save_total_limit; /* keep at most N checkpoints (0: all) */

    /* data parallelism (MPI) */
    size_t replica_check_steps; /* compare replica checksums every N steps (0: only at start) */
    double bucket_size_mb;      /* gradient allreduce bucket size (grad_allreduce "mpi") */
    dpoc_allreduce_kind grad_allreduce; /* auto, shared (node-local shared-memory window), mpi (buckets) */
    size_t zero_stage; /* DeepSpeed ZeRO: 0 replicas, 1 AdamW moments sharded, 2 and gradients (dpoc/shard.h) */
    double collective_timeout_s; /* watchdog: abort when a step makes no progress this long */
    size_t num_threads;         /* BLAS/kernel threads per rank (0: cores / ranks on the node) */
    int model_loading_broadcast; /* model_loading: "each_rank" (0, mmap on every rank) or "broadcast" (1) */

    dpoc_lora_cfg lora; /* use_peft, lora_* */

    /* reporting (HF TrainingArguments' report_to): the integrations dpoc has */
    int report_tensorboard;            /* event files (dpoc/tensorboard.h) */
    char logging_dir[DPOC_PATH_MAX];   /* empty: TENSORBOARD_LOGGING_DIR, else output_dir/runs/<time>_<host> */
} dpoc_config;

/* bf16: false keeps every product fp32; true gives the linear layers' products (forward
 * and backward, LM head included) bf16 operands with fp32 accumulation; auto measures
 * both on the model's shapes at start and keeps the faster. */
enum { DPOC_BF16_FALSE = 0, DPOC_BF16_TRUE = 1, DPOC_BF16_AUTO = 2 };

void dpoc_config_defaults(dpoc_config *c);
/* Applies a JSON object (keys as documented); `where` names the source in messages. */
int dpoc_config_apply_json(dpoc_config *c, const char *json_text, const char *where, dpoc_err *err);
int dpoc_config_load_file(dpoc_config *c, const char *path, dpoc_err *err);
/* "key=value"; value parsed as JSON when it is valid JSON, else as a string. */
int dpoc_config_set(dpoc_config *c, const char *assignment, dpoc_err *err);
/* Cross-key checks once everything is applied (required keys, loss config). */
int dpoc_config_finalize(dpoc_config *c, dpoc_err *err);
/* Writes the key list with types, defaults and help. */
void dpoc_config_print_help(FILE *f);
/* The effective config as a JSON object string (caller frees). */
char *dpoc_config_to_json(const dpoc_config *c);

#endif
