/* The DPO training loop (see trainer.h). The numbers follow TRL 1.16's
 * DPOTrainer on top of transformers 5's Trainer:
 * - each micro-batch loss is divided by the number of micro-batches in its
 *   optimizer step (the epoch's last step may have fewer) before backward;
 * - the logged `loss` is the sum of those scaled losses over the logging window
 *   divided by the optimizer steps in the window;
 * - `grad_norm` is the norm before clipping; `learning_rate` the rate used by
 *   the step (read before the scheduler advances);
 * - TRL's metrics are per micro-batch values averaged over the window, except
 *   num_tokens, a running total;
 * - `epoch` = epoch index + (micro-batches done in the epoch) / micro-batches per epoch.
 *
 * With W MPI ranks every optimizer step consumes batch x accumulation x W pairs:
 * micro-step m of rank r takes the pairs at positions ((m W + r) b ... + b) of the
 * epoch's order, as accelerate shards a DataLoader (rank r gets every W-th batch).
 * Gradients are summed across ranks and divided by W (DDP's mean); the logged
 * loss is the mean over ranks; TRL's metrics are computed from sums over all ranks.
 * Epoch tail: one process takes a smaller last micro-batch (HF, drop_last false);
 * several ranks fill the last micro-batches from the start of the epoch's order,
 * as accelerate's even_batches does, so every rank always has a full batch.
 *
 * A micro-batch is a forward-and-loss part (policy and reference forwards, the
 * loss, dLoss/dlogp and the metric sums; an evaluation pass runs only this)
 * and a backward part that turns the saved dLoss/dlogp into gradients. Every
 * buffer the two parts and the step use is made at init: a step allocates
 * nothing (tests/unit/test_trainer_alloc.c counts). */
#include "dpoc/gemm.h"
#include "dpoc/precision.h"
#include "dpoc/runtime.h"
#include "dpoc/trainer.h"

#include <math.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>


#include "core/fileutil.h"
#include "core/rng.h"
#include "dpoc/balance.h"
#include "dpoc/chat.h"
#include "dpoc/finite.h"
#include "dpoc/flops.h"
#include "dpoc/loss.h"
#include "dpoc/lora.h"
#include "dpoc/source.h"

enum { W_REW_C, W_REW_R, W_REW_ACC, W_REW_MARGIN, W_LOGP_C, W_LOGP_R, W_LOGIT_C, W_LOGIT_R, W_ENTROPY, W_TOK_ACC };
/* PyTorch DDP's default bucket_cap_mb is in MiB */
#define BYTES_PER_MB (1024.0 * 1024.0)
static const char *const WINDOW_NAMES[DPOC_N_WINDOW_METRICS] = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
};


double dpoc_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int world_of(const dpoc_trainer *t) { return t->dist ? t->dist->world : 1; }
static int rank_of(const dpoc_trainer *t) { return t->dist ? t->dist->rank : 0; }

/* ---- loading ---- */

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
        size_t k = 0; /* the trainable tensors only (with LoRA: the adapters) */
        for (size_t i = 0; i < n; i++) {
            if (!t->policy.info[i].trainable) continue;
            off[k] = t->policy.info[i].offset;
            cnt[k] = t->policy.info[i].numel;
            decay[k] = gets_weight_decay(t->policy.info[i].name);
            k++;
        }
        const size_t lo = t->zero_stage ? t->shard.me_lo : 0, hi = t->zero_stage ? t->shard.me_hi : t->policy.numel;
        rc = dpoc_adamw_init_range(&t->opt, t->policy.numel, lo, hi, &t->cfg, k, off, cnt, decay, err);
    }
    free(off);
    free(cnt);
    free(decay);
    return rc;
}

/* Every rank maps the files itself, or (model_loading "broadcast") rank 0 reads
 * them and the others receive the weights. The outcome on rank 0 is shared first,
 * so a bad file ends every rank with rank 0's message instead of a hang. */
static int load_model(dpoc_trainer *t, dpoc_model *m, const char *dir, dpoc_err *err) {
    dpoc_dist *d = t->dist;
    /* a kept base stays mapped from the file: every rank maps it (nothing to broadcast) */
    if (t->cfg.lora.keep_base && m == &t->policy) return dpoc_source_load_model_stored(m, dir, DPOC_WEIGHTS_KEEP, err);
    if (!d || d->world == 1 || !t->cfg.model_loading_broadcast) return dpoc_source_load_model(m, dir, err);
    double status = 0;
    int rc = 0;
    if (d->rank == 0) {
        rc = dpoc_source_load_model(m, dir, err);
        status = rc;
    }
    DPOC_TRY(dpoc_dist_sum_doubles(d, &status, 1, err));
    if (status != 0) {
        if (d->rank != 0) rc = dpoc_errf(err, (int)status, "rank 0 could not load %s", dir);
        return rc;
    }
    if (d->rank != 0) {
        dpoc_model_config mc;
        DPOC_TRY(dpoc_source_model_config(dir, &mc, err));
        DPOC_TRY(dpoc_model_init(m, &mc, err));
    }
    return dpoc_dist_bcast_floats(d, m->params, m->numel, 0, err);
}

static int copy_model(dpoc_model *dst, const dpoc_model *src, dpoc_err *err) {
    DPOC_TRY(dpoc_model_init(dst, &src->cfg, err));
    memcpy(dst->params, src->params, src->numel * sizeof(float));
    return 0;
}

static int same_architecture(const dpoc_model_config *a, const dpoc_model_config *b) {
    return a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size && a->n_layers == b->n_layers;
}

/* DPOC_TEST_INJECT="KIND:RANK:STEP:NAME[:VALUE]" (see trainer.h); anything else: no injection. */
static void read_inject_hook(dpoc_test_hooks *h) {
    const char *s = getenv("DPOC_TEST_INJECT");
    char kind[16], value[16] = "nan";
    int n = s ? sscanf(s, "%15[a-z]:%d:%ld:%95[^:]:%15s", kind, &h->inject_rank, &h->inject_step, h->inject_name,
                       value)
              : 0;
    if (n < 4) return;
    h->inject_kind = strcmp(kind, "weight") == 0 ? DPOC_INJECT_WEIGHT
                     : strcmp(kind, "grad") == 0 ? DPOC_INJECT_GRAD
                     : strcmp(kind, "act") == 0  ? DPOC_INJECT_ACT
                                                 : DPOC_INJECT_NONE;
    h->inject_value = strcmp(value, "inf") == 0 ? INFINITY : strcmp(value, "-inf") == 0 ? -INFINITY : NAN;
}

/* The test hook's value into element 0 of tensor name of block (laid out as m's
 * table, from parameter lo on: a whole block, or a ZeRO slice [lo, hi)). */
static void inject_into(const dpoc_model *m, float *block, size_t lo, size_t hi, float *frozen, const char *name,
                        float value) {
    const size_t i = dpoc_model_find(m, name);
    if (i == DPOC_NO_PARAM || m->info[i].data) return;
    const dpoc_param_info *p = &m->info[i];
    if (!p->trainable) {
        if (frozen) frozen[p->offset] = value;
        return;
    }
    if (p->offset >= lo && p->offset < hi) block[p->offset - lo] = value;
}

/* Whether the hook injects kind at step on this rank. A weight at load (step 0)
 * is in every rank's copy, as a file's would be; a gradient before ZeRO stage 2
 * in every rank's averaged gradient, as the average would carry one rank's. */
static int inject_now(const dpoc_trainer *t, dpoc_inject_kind kind, long step) {
    const dpoc_test_hooks *h = &t->hooks;
    const int every_rank = (kind == DPOC_INJECT_WEIGHT && step == 0) || (kind == DPOC_INJECT_GRAD && t->zero_stage < 2);
    return h->inject_kind == kind && h->inject_step == step &&
           (every_rank || h->inject_rank == (t->dist ? t->dist->rank : 0));
}

static void read_test_hooks(dpoc_test_hooks *h) {
    memset(h, 0, sizeof *h);
    read_inject_hook(h);
    h->fail_rank = h->perturb_rank = h->hang_rank = -1;
    const char *hang = getenv("DPOC_TEST_HANG_AT");
    if (hang && sscanf(hang, "%d:%ld", &h->hang_rank, &h->hang_step) != 2) h->hang_rank = -1;
    const char *f = getenv("DPOC_TEST_FAIL_AT");
    if (f && sscanf(f, "%d:%ld", &h->fail_rank, &h->fail_step) != 2) h->fail_rank = -1;
    const char *p = getenv("DPOC_TEST_PERTURB");
    if (p && sscanf(p, "%d:%95s", &h->perturb_rank, h->perturb_tensor) != 2) h->perturb_rank = -1;
}

/* The tokenizer of tokenizer_name_or_path (default: the model), a GGUF's or a
 * directory's tokenizer.json; text data sets need it, pre-tokenized ones do not. */
static int load_data(dpoc_trainer *t, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const char *tdir = cfg->tokenizer_name_or_path[0] ? cfg->tokenizer_name_or_path : cfg->model_name_or_path;
    DPOC_TRY(dpoc_source_load_tokenizer(&t->tok, tdir, err));
    if (!t->tok && cfg->tokenizer_name_or_path[0])
        return dpoc_errf(err, DPOC_EINPUT, "tokenizer_name_or_path '%s' has no tokenizer.json", tdir);
    int chat_kind = -1;
    if (strcmp(cfg->chat_template, "auto") != 0) {
        chat_kind = dpoc_chat_kind_from_name(cfg->chat_template);
    } else if (t->tok && dpoc_tokenizer_chat_template(t->tok)) {
        dpoc_chat_kind k;
        dpoc_err ignored; /* an unrecognised template matters only if a conversational row comes */
        if (dpoc_chat_detect(dpoc_tokenizer_chat_template(t->tok), &k, &ignored) == 0) chat_kind = (int)k;
    }
    const dpoc_prefs_ctx ctx = {t->tok, chat_kind, t->policy.cfg.vocab_size};
    const dpoc_dataset_opts o = {cfg->max_length, cfg->truncation_keep_end, cfg->skip_bad_records};
    DPOC_TRY(dpoc_dataset_load(&t->data, cfg->train_file, &ctx, &o, err));
    if (!cfg->eval_file[0]) return 0;
    DPOC_TRY(dpoc_dataset_load(&t->eval, cfg->eval_file, &ctx, &o, err));
    t->has_eval = 1;
    if (t->eval.n_pairs == 0) return dpoc_errf(err, DPOC_EINPUT, "%s: no pairs to evaluate", cfg->eval_file);
    return 0;
}

/* A pair can run with its prompt shared when both sequences keep the whole prompt
 * (identical ids) and score every completion token they keep: always, unless
 * keep_end truncation cut into a prompt or a completion was cut away entirely. */
static int pair_shares_prompt(const dpoc_seq *c, const dpoc_seq *r, const int32_t *ids_c, const int32_t *ids_r) {
    const size_t Tp = c->comp_start;
    return Tp >= 1 && r->comp_start == Tp && c->row0 == Tp - 1 && r->row0 == Tp - 1 && c->R >= 1 && r->R >= 1 &&
           c->R == c->T - Tp && r->R == r->T - Tp && memcmp(ids_c, ids_r, Tp * sizeof(int32_t)) == 0;
}

/* Uses seq_buf (2 sequences of max_T) as scratch; *pair_T = the longest prompt + both completions. */
static int all_pairs_share_prompt(dpoc_trainer *t, const dpoc_dataset *d, size_t *pair_T) {
    const dpoc_config *cfg = &t->cfg;
    int32_t *ids[2] = {t->seq_buf, t->seq_buf + t->max_T};
    dpoc_seq seq[2];
    for (size_t i = 0; i < d->n_pairs; i++) {
        for (int r = 0; r < 2; r++)
            dpoc_dataset_collate(d, i, r, cfg->max_length, cfg->truncation_keep_end, ids[r], &seq[r]);
        if (!pair_shares_prompt(&seq[0], &seq[1], ids[0], ids[1])) return 0;
        const size_t T = seq[0].comp_start + seq[0].R + seq[1].R;
        if (T > *pair_T) *pair_T = T;
    }
    return 1;
}

/* FLOPs of one forward of a pair with its prompt shared (rows as dpoc_model_forward_shared runs them). */
static dpoc_fwd_flops shared_forward_parts(const dpoc_model *m, size_t Tp, size_t Ta, size_t Tb) {
    const size_t rows = Tp + (Ta - 1) + (Tb - 1);
    const size_t pairs = dpoc_flops_causal_pairs(Tp) + (Ta - 1) * Tp + dpoc_flops_causal_pairs(Ta - 1) +
                         (Tb - 1) * Tp + dpoc_flops_causal_pairs(Tb - 1);
    return dpoc_flops_forward_parts(m, rows, pairs, Ta + Tb);
}

static double shared_forward_flops(const dpoc_model *m, size_t Tp, size_t Ta, size_t Tb) {
    return shared_forward_parts(m, Tp, Ta, Tb).total;
}

/* Losses that look across the micro-batch (aot sorts it, sft averages over all
 * of its chosen tokens, WPO weights are normalised over it) depend on which
 * pairs share a rank's micro-batch: those keep TRL's contiguous split. */
static int loss_is_per_pair(const dpoc_loss_cfg *l) {
    if (l->use_weighting) return 0;
    for (size_t i = 0; i < l->n_types; i++)
        if (l->types[i] == DPOC_LOSS_AOT || l->types[i] == DPOC_LOSS_AOT_UNPAIRED || l->types[i] == DPOC_LOSS_SFT)
            return 0;
    return 1;
}

/* The forward FLOPs of a pair as the trainer runs it (dpoc/balance.h's cost);
 * buf holds 2 * max_T ids. */
static double pair_cost(const dpoc_trainer *t, size_t pair, int32_t *buf) {
    const dpoc_config *cfg = &t->cfg;
    dpoc_seq s[2];
    for (int k = 0; k < 2; k++)
        dpoc_dataset_collate(&t->data, pair, k, cfg->max_length, cfg->truncation_keep_end, buf + k * t->max_T, &s[k]);
    if (t->shared) return shared_forward_flops(&t->policy, s[0].comp_start, s[0].R, s[1].R);
    double f = 0.0;
    for (int k = 0; k < 2; k++) f += dpoc_flops_forward(&t->policy.cfg, s[k].T, dpoc_flops_causal_pairs(s[k].T), s[k].R);
    return f;
}

/* Rows of the micro-batch-sized products that bf16 auto times (a few pairs of a few hundred tokens). */
#define PRECISION_TIMING_ROWS 512

/* The `bf16` setting; auto times both precisions on the policy's MLP shape over
 * the rows of a micro-batch's pairs, summed over the ranks so all decide alike. */
static int choose_precision(dpoc_trainer *t, dpoc_err *err) {
    if (t->cfg.bf16 != DPOC_BF16_AUTO) {
        dpoc_precision_apply(t->cfg.bf16, NULL);
        return 0;
    }
    const size_t rows = PRECISION_TIMING_ROWS;
    dpoc_precision_timing tm;
    DPOC_TRY(dpoc_precision_time(rows, t->policy.cfg.hidden_size, t->policy.cfg.intermediate_size, &tm, err));
    if (t->dist && t->dist->world > 1) {
        double v[2] = {tm.fp32_s, tm.bf16_s};
        DPOC_TRY(dpoc_dist_sum_doubles(t->dist, v, 2, err));
        tm.fp32_s = v[0], tm.bf16_s = v[1];
    }
    dpoc_precision_apply(DPOC_BF16_AUTO, &tm);
    return 0;
}

static void micro_batch_free(dpoc_micro_batch *mb) {
    free(mb->seq);
    free(mb->actp);
    free(mb->offp);
    free(mb->ptok);
    free(mb->ls);
    free(mb->dtok);
    free(mb->logps);
    free(mb->ref_pair);
    free(mb->fwd_flops);
    memset(mb, 0, sizeof *mb);
}

/* The views of a micro-batch of up to bs pairs (2 bs sequences, at most one forward each). */
static int micro_batch_alloc(dpoc_micro_batch *mb, size_t bs, dpoc_err *err) {
    const size_t n_seq = 2 * bs;
    memset(mb, 0, sizeof *mb);
    mb->seq = dpoc_malloc(n_seq * sizeof *mb->seq, "sequences", err);
    mb->actp = dpoc_malloc(n_seq * sizeof *mb->actp, "sequence views", err);
    mb->offp = dpoc_malloc(n_seq * sizeof *mb->offp, "sequence views", err);
    mb->ptok = dpoc_malloc(bs * sizeof *mb->ptok, "pair views", err);
    mb->ls = dpoc_malloc(n_seq * sizeof *mb->ls, "loss inputs", err);
    mb->dtok = dpoc_malloc(n_seq * sizeof *mb->dtok, "loss gradients", err);
    mb->logps = dpoc_malloc(n_seq * sizeof *mb->logps, "log-probs", err);
    mb->ref_pair = dpoc_malloc(n_seq * sizeof *mb->ref_pair, "log-probs", err);
    mb->fwd_flops = dpoc_malloc(n_seq * sizeof *mb->fwd_flops, "FLOP counts", err);
    if (!mb->seq || !mb->actp || !mb->offp || !mb->ptok || !mb->ls || !mb->dtok || !mb->logps || !mb->ref_pair ||
        !mb->fwd_flops) {
        micro_batch_free(mb);
        return DPOC_ENOMEM;
    }
    return 0;
}

/* use_peft: adapters on the loaded policy, from adapter_name_or_path (its config
 * then describes them) or new ones as the lora_* keys say, the same on every rank
 * (the same seed). */
static int attach_adapters(dpoc_trainer *t, dpoc_err *err) {
    dpoc_lora_cfg *L = &t->cfg.lora;
    if (!L->adapter_name_or_path[0]) return dpoc_lora_attach(&t->policy, L, t->cfg.seed, err);
    dpoc_lora_cfg got;
    DPOC_TRY(dpoc_lora_load_peft(&t->policy, L->adapter_name_or_path, &got, err));
    /* the adapter's own r, alpha, rsLoRA and targets are what trains (and what is saved) */
    L->r = got.r;
    L->alpha = got.alpha;
    L->use_rslora = got.use_rslora;
    L->targets_kind = got.targets_kind;
    L->n_targets = got.n_targets;
    memcpy(L->targets, got.targets, sizeof L->targets);
    return 0;
}

int dpoc_trainer_init(dpoc_trainer *t, const dpoc_config *cfg, dpoc_dist *dist, dpoc_err *err) {
    memset(t, 0, sizeof *t);
    t->cfg = *cfg;
    t->dist = dist;
    t->order_epoch = -1;
    read_test_hooks(&t->hooks);
    int rc = load_model(t, &t->policy, cfg->model_name_or_path, err);
    if (rc) goto fail;
    /* the base's fingerprint, before adapters: a LoRA run resumes only on the same base */
    t->fp_policy = dpoc_model_fingerprint(&t->policy);
    if (cfg->lora.use_peft && (rc = attach_adapters(t, err))) goto fail;
    t->ref_is_base = cfg->lora.use_peft && !cfg->ref_model_name_or_path[0];
    if (cfg->ref_model_name_or_path[0]) {
        if ((rc = load_model(t, &t->ref, cfg->ref_model_name_or_path, err))) goto fail;
        if (!same_architecture(&t->policy.cfg, &t->ref.cfg)) {
            rc = dpoc_errf(err, DPOC_EINPUT, "ref_model_name_or_path '%s' has a different vocabulary or shape than '%s'",
                           cfg->ref_model_name_or_path, cfg->model_name_or_path);
            goto fail;
        }
    } else if (!cfg->precompute_ref_log_probs && !t->ref_is_base && (rc = copy_model(&t->ref, &t->policy, err))) {
        /* precomputing with the starting policy as reference needs no copy: the pass
         * runs before the first update (and before a resumed checkpoint is restored) */
        goto fail;
    }
    if (t->hooks.perturb_rank == rank_of(t)) {
        size_t i = dpoc_model_find(&t->policy, t->hooks.perturb_tensor);
        if (i != DPOC_NO_PARAM && t->policy.info[i].trainable) t->policy.params[t->policy.info[i].offset] += 1e-3f;
    }
    if (inject_now(t, DPOC_INJECT_WEIGHT, 0))
        inject_into(&t->policy, t->policy.params, 0, t->policy.numel, t->policy.frozen, t->hooks.inject_name,
                    t->hooks.inject_value);
    if ((rc = load_data(t, err))) goto fail;
    if ((rc = choose_precision(t, err))) goto fail;
    const size_t bs = cfg->per_device_train_batch_size, ga = cfg->gradient_accumulation_steps;
    /* an evaluation batch may hold more pairs than a training one: the forward
     * buffers take the larger, the backward ones stay at the training batch */
    const size_t ebs = cfg->per_device_eval_batch_size;
    t->max_B = t->has_eval && ebs > bs ? ebs : bs;
    const size_t n_seq = 2 * t->max_B;
    t->max_T = dpoc_dataset_max_seq_len(&t->data, cfg->max_length);
    if (t->has_eval) {
        const size_t eT = dpoc_dataset_max_seq_len(&t->eval, cfg->max_length);
        if (eT > t->max_T) t->max_T = eT;
    }
    if (t->max_T > t->policy.cfg.max_position_embeddings) {
        rc = dpoc_errf(err, DPOC_EINPUT,
                       "%s: a sequence has %zu tokens, more than the model's max_position_embeddings (%zu); set "
                       "max_length",
                       cfg->train_file, t->max_T, t->policy.cfg.max_position_embeddings);
        goto fail;
    }
    t->seq_buf = dpoc_malloc(n_seq * t->max_T * sizeof(int32_t), "token buffers", err);
    if (t->seq_buf) {
        size_t pair_T = 0;
        t->shared = cfg->shared_prefix && all_pairs_share_prompt(t, &t->data, &pair_T) &&
                    (!t->has_eval || all_pairs_share_prompt(t, &t->eval, &pair_T));
        /* shared: one activation set holds the whole micro-batch's pairs (GEMMs over all their rows) */
        t->act_T = t->shared ? t->max_B * pair_T : t->max_T;
        t->n_acts = t->shared ? 1 : n_seq;
    }
    t->acts = dpoc_calloc(n_seq, sizeof *t->acts, "activation sets", err);
    t->tok_buf = dpoc_malloc(n_seq * t->max_T * sizeof(float), "token buffers", err);
    t->order = dpoc_malloc(t->data.n_pairs * sizeof(size_t), "data order", err);
    t->mb_pairs = dpoc_malloc(t->max_B * sizeof(size_t), "micro-batch", err);
    t->step_sums = dpoc_calloc(ga * DPOC_MB_N, sizeof(double), "metric sums", err);
    t->balance = cfg->balance_batches && world_of(t) > 1 && loss_is_per_pair(&cfg->loss);
    if (t->balance) {
        const size_t gb = bs * (size_t)world_of(t);
        t->bal_cost = dpoc_malloc(gb * sizeof *t->bal_cost, "batch balancing", err);
        t->bal_pairs = dpoc_malloc(gb * sizeof *t->bal_pairs, "batch balancing", err);
        t->bal_rank = dpoc_malloc(gb * sizeof *t->bal_rank, "batch balancing", err);
        t->bal_order = dpoc_malloc(gb * sizeof *t->bal_order, "batch balancing", err);
        t->bal_load = dpoc_malloc((size_t)world_of(t) * sizeof *t->bal_load, "batch balancing", err);
        t->bal_count = dpoc_malloc((size_t)world_of(t) * sizeof *t->bal_count, "batch balancing", err);
        if (!t->bal_cost || !t->bal_pairs || !t->bal_rank || !t->bal_order || !t->bal_load || !t->bal_count) {
            rc = DPOC_ENOMEM;
            goto fail;
        }
    }
    if (world_of(t) > 1)
        t->replica_sums = dpoc_malloc(2 * t->policy.n_tensors * sizeof *t->replica_sums, "checksums", err);
    if (!t->acts || !t->seq_buf || !t->tok_buf || !t->order || !t->mb_pairs || !t->step_sums ||
        (world_of(t) > 1 && !t->replica_sums)) {
        rc = DPOC_ENOMEM;
        goto fail;
    }
    if ((rc = micro_batch_alloc(&t->mb, t->max_B, err)) || (rc = dpoc_loss_work_init(&t->loss_work, t->max_B, err)))
        goto fail;
    for (size_t s = 0; s < t->n_acts; s++) {
        /* sequences past a training batch's only ever run forward (evaluation): lean */
        const int lean = cfg->gradient_checkpointing || s >= 2 * bs;
        if ((rc = dpoc_acts_alloc_mode(&t->acts[s], &t->policy.cfg, t->act_T,
                                       lean ? DPOC_ACTS_RECOMPUTE : DPOC_ACTS_KEEP, err)))
            goto fail;
    }
    /* the reference only runs forward: its layers need not keep anything */
    if ((rc = dpoc_acts_alloc_mode(&t->ref_acts, &t->policy.cfg, t->act_T, DPOC_ACTS_RECOMPUTE, err))) goto fail;
    if ((rc = dpoc_grad_scratch_alloc(&t->scratch, &t->policy.cfg, t->act_T, err))) goto fail;
    if (!t->shared) {
        const size_t ns = 2 * bs, C = t->policy.cfg.hidden_size;
        t->seq_dx_block = dpoc_malloc(ns * t->act_T * C * sizeof(float), "backward residual gradients", err);
        t->seq_dx = dpoc_malloc(ns * sizeof *t->seq_dx, "backward residual gradients", err);
        t->seq_acts = dpoc_malloc(ns * sizeof *t->seq_acts, "backward sequences", err);
        t->seq_tokens = dpoc_malloc(ns * sizeof *t->seq_tokens, "backward sequences", err);
        if (!t->seq_dx_block || !t->seq_dx || !t->seq_acts || !t->seq_tokens) {
            rc = DPOC_ENOMEM;
            goto fail;
        }
        for (size_t s = 0; s < ns; s++) {
            t->seq_dx[s] = t->seq_dx_block + s * t->act_T * C;
            t->seq_acts[s] = &t->acts[s];
            t->seq_tokens[s] = t->seq_buf + s * t->max_T;
        }
    }
    /* collective: ZeRO's slices first (the optimizer covers this rank's) */
    t->zero_stage = (int)cfg->zero_stage;
    if (t->zero_stage && (rc = dpoc_shard_init(&t->shard, dist, t->zero_stage, t->policy.numel, err))) goto fail;
    if ((rc = init_optimizer(t, err))) goto fail;
    if (t->zero_stage >= 2) {
        t->grads = t->shard.local; /* reduce-scattered layer by layer: no averaging of whole blocks */
    } else {
        /* collective: the sync object owns the gradient block (a shared-memory
         * window segment with grad_allreduce shared) */
        if ((rc = dpoc_grad_sync_init(&t->sync, dist, t->policy.numel, (size_t)(cfg->bucket_size_mb * BYTES_PER_MB),
                                      cfg->grad_allreduce, err)))
            goto fail;
        t->grads = t->sync.grads;
    }

    /* schedule as transformers computes it (drop_last false) */
    const size_t global_mb = bs * (size_t)world_of(t);
    t->steps_in_epoch = (t->data.n_pairs + global_mb - 1) / global_mb;
    t->updates_per_epoch = t->steps_in_epoch / ga + (t->steps_in_epoch % ga > 0);
    if (t->updates_per_epoch < 1) t->updates_per_epoch = 1;
    t->total_steps = cfg->max_steps > 0 ? cfg->max_steps
                                        : (long)ceil(cfg->num_train_epochs * (double)t->updates_per_epoch);
    t->warmup_steps = dpoc_warmup_steps(cfg, t->total_steps);
    t->fp_ref = t->ref.params ? dpoc_fnv1a(DPOC_FNV_OFFSET, t->ref.params, t->ref.numel * sizeof(float)) : t->fp_policy;
    t->fp_data = dpoc_fnv1a(DPOC_FNV_OFFSET, t->data.tokens, t->data.n_tokens * sizeof(int32_t));
    t->fp_data = dpoc_fnv1a(t->fp_data, t->data.pairs, t->data.n_pairs * sizeof(dpoc_pair));
    if (t->has_eval) {
        const size_t G = cfg->per_device_eval_batch_size * (size_t)world_of(t);
        t->eval_batches = (t->eval.n_pairs + G - 1) / G;
        t->eval_sums = dpoc_malloc((t->eval_batches * DPOC_MB_N + 1) * sizeof(double), "evaluation sums", err);
        if (!t->eval_sums) {
            rc = DPOC_ENOMEM;
            goto fail;
        }
    }
    if ((rc = dpoc_trainer_check_replicas(t, err))) goto fail;
    return 0;
fail:
    dpoc_trainer_free(t);
    return rc;
}

/* ---- bf16 copies of the weights ---- */

/* In bf16 the products read a bf16 copy of each model's weights (dpoc/gemm.h
 * shadows) instead of rounding a weight on every product: made when the first
 * product needs them, refreshed whenever the fp32 weights change. */
static int shadows_ensure(dpoc_trainer *t, dpoc_err *err) {
    if (t->shadows || dpoc_rt()->precision != DPOC_PRECISION_BF16) return 0;
    DPOC_TRY(dpoc_gemm_shadow_add(t->policy.params, t->policy.numel, err));
    /* with LoRA the frozen base holds the large weights */
    const float *second = t->ref.params ? t->ref.params : t->policy.frozen;
    const size_t second_n = t->ref.params ? t->ref.numel : t->policy.frozen_numel;
    if (second) {
        const int rc = dpoc_gemm_shadow_add(second, second_n, err);
        if (rc) {
            dpoc_gemm_shadow_remove(t->policy.params);
            return rc;
        }
    }
    t->shadows = 1;
    return 0;
}

static void shadows_remove(dpoc_trainer *t) {
    if (!t->shadows) return;
    dpoc_gemm_shadow_remove(t->policy.params);
    if (t->ref.params) dpoc_gemm_shadow_remove(t->ref.params);
    else if (t->policy.frozen) dpoc_gemm_shadow_remove(t->policy.frozen);
    t->shadows = 0;
}

void dpoc_trainer_weights_changed(dpoc_trainer *t) {
    if (t->shadows) dpoc_gemm_shadow_refresh(t->policy.params);
}

void dpoc_trainer_free(dpoc_trainer *t) {
    shadows_remove(t);
    if (t->acts)
        for (size_t s = 0; s < t->n_acts; s++) dpoc_acts_free(&t->acts[s]);
    free(t->acts);
    dpoc_acts_free(&t->ref_acts);
    dpoc_grad_scratch_free(&t->scratch);
    dpoc_grad_sync_free(&t->sync); /* and with it t->grads (stages 0, 1) */
    dpoc_shard_free(&t->shard);    /* and with it t->grads (stage 2) */
    dpoc_adamw_free(&t->opt);
    free(t->seq_dx_block);
    free(t->seq_dx);
    free(t->seq_acts);
    free(t->seq_tokens);
    free(t->seq_buf);
    free(t->tok_buf);
    free(t->order);
    free(t->mb_pairs);
    free(t->step_sums);
    free(t->bal_cost);
    free(t->bal_pairs);
    free(t->bal_rank);
    free(t->bal_order);
    free(t->bal_load);
    free(t->bal_count);
    micro_batch_free(&t->mb);
    dpoc_loss_work_free(&t->loss_work);
    free(t->replica_sums);
    dpoc_dataset_free(&t->data);
    if (t->has_eval) dpoc_dataset_free(&t->eval);
    free(t->eval_ref_logps);
    free(t->eval_sums);
    dpoc_tokenizer_free(t->tok);
    dpoc_model_free(&t->policy);
    dpoc_model_free(&t->ref);
    free(t->ref_logps);
    memset(t, 0, sizeof *t);
}

/* ---- reference log-probs ---- */

/* The reference model for a forward: the separate one, or the policy itself -
 * with its adapters off when the reference is its base (end_reference turns
 * them back on). */
static const dpoc_model *begin_reference(dpoc_trainer *t) {
    if (t->ref.params) return &t->ref;
    if (t->ref_is_base) dpoc_lora_enable(&t->policy, 0);
    return &t->policy;
}

static void end_reference(dpoc_trainer *t) {
    if (!t->ref.params && t->ref_is_base) dpoc_lora_enable(&t->policy, 1);
}

/* The reference log-probs of n pairs as the loss takes them (LD-DPO weighting
 * included), in one forward of the pairs layout: out[2i], out[2i+1] = pair i's
 * chosen and rejected. Uses t->ref_acts. */
static void pairs_ref_logps(dpoc_trainer *t, const dpoc_model *ref, const dpoc_pair_tokens *pt, size_t n,
                            double *out) {
    dpoc_model_forward_pairs(ref, &t->ref_acts, pt, n);
    for (size_t i = 0; i < n; i++) {
        const dpoc_pair_span *p = &t->ref_acts.pairs[i];
        const size_t common = p->Ta < p->Tb ? p->Ta : p->Tb;
        out[2 * i] = dpoc_ld_logp(t->ref_acts.logp + p->head0, p->Ta, common, &t->cfg.loss);
        out[2 * i + 1] = dpoc_ld_logp(t->ref_acts.logp + p->head0 + p->Ta, p->Tb, common, &t->cfg.loss);
    }
}

/* out[0], out[1]: the chosen and rejected reference log-probs of a collated pair
 * (ids and seq of each): one prompt-shared forward, or one forward per sequence. */
static void pair_ref_logps(dpoc_trainer *t, const dpoc_model *ref, const int32_t *const ids[2], const dpoc_seq seq[2],
                           double out[2]) {
    if (t->shared) {
        const size_t Tp = seq[0].comp_start;
        const dpoc_pair_tokens pt = {ids[0], Tp, ids[0] + Tp, seq[0].R, ids[1] + Tp, seq[1].R};
        pairs_ref_logps(t, ref, &pt, 1, out);
        return;
    }
    const size_t common = seq[0].R < seq[1].R ? seq[0].R : seq[1].R;
    for (int r = 0; r < 2; r++) {
        dpoc_model_forward(ref, &t->ref_acts, ids[r], seq[r].T, seq[r].row0, seq[r].R);
        out[r] = dpoc_ld_logp(t->ref_acts.logp, seq[r].R, common, &t->cfg.loss);
    }
}

/* The reference weights, a data set's content, and what changes a sequence's reference log-prob. */
static uint64_t ref_logps_key_of(const dpoc_trainer *t, uint64_t fp_data) {
    const dpoc_config *c = &t->cfg;
    const double ld = c->loss.has_ld_alpha ? c->loss.ld_alpha : -1.0;
    const int64_t settings[2] = {c->max_length, c->truncation_keep_end};
    uint64_t h = dpoc_fnv1a(DPOC_FNV_OFFSET, &t->fp_ref, sizeof t->fp_ref);
    h = dpoc_fnv1a(h, &fp_data, sizeof fp_data);
    h = dpoc_fnv1a(h, settings, sizeof settings);
    /* bf16 products give other values; fp32 keeps the key it always had */
    if (dpoc_rt()->precision == DPOC_PRECISION_BF16) h = dpoc_fnv1a(h, "bf16", 4);
    return dpoc_fnv1a(h, &ld, sizeof ld);
}

uint64_t dpoc_trainer_ref_logps_key(const dpoc_trainer *t) { return ref_logps_key_of(t, t->fp_data); }

uint64_t dpoc_trainer_eval_ref_logps_key(const dpoc_trainer *t) {
    uint64_t fp = dpoc_fnv1a(DPOC_FNV_OFFSET, t->eval.tokens, t->eval.n_tokens * sizeof(int32_t));
    fp = dpoc_fnv1a(fp, t->eval.pairs, t->eval.n_pairs * sizeof(dpoc_pair));
    return dpoc_fnv1a(ref_logps_key_of(t, fp), "eval", 4);
}

int dpoc_trainer_set_ref_logps(dpoc_trainer *t, const double *values, dpoc_err *err) {
    const size_t n = 2 * t->data.n_pairs;
    if (!t->ref_logps && !(t->ref_logps = dpoc_malloc((n ? n : 1) * sizeof(double), "reference log-probs", err)))
        return DPOC_ENOMEM;
    memcpy(t->ref_logps, values, n * sizeof(double));
    return 0;
}

/* The reference log-probs of every pair of d into v (2 per pair), each rank a share. */
static int compute_ref_logps_of(dpoc_trainer *t, const dpoc_dataset *d, double *v, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const size_t n = d->n_pairs, world = (size_t)world_of(t), rank = (size_t)rank_of(t);
    /* no separate reference: the starting policy, not yet updated, is it (or,
     * with LoRA, the policy's base at any step) */
    if (t->global_step != 0 && !t->ref.params && !t->ref_is_base)
        return dpoc_errf(err, DPOC_EINTERNAL, "reference log-probs requested after training started");
    DPOC_TRY(shadows_ensure(t, err));
    memset(v, 0, 2 * n * sizeof *v);
    const dpoc_model *ref = begin_reference(t);
    dpoc_seq seq[2];
    const int32_t *const ids[2] = {t->seq_buf, t->seq_buf + t->max_T};
    for (size_t i = rank; i < n; i += world) {
        for (int r = 0; r < 2; r++)
            dpoc_dataset_collate(d, i, r, cfg->max_length, cfg->truncation_keep_end, t->seq_buf + (size_t)r * t->max_T,
                                 &seq[r]);
        pair_ref_logps(t, ref, ids, seq, &v[2 * i]);
        t->progress_time = dpoc_now_s();
    }
    end_reference(t);
    /* every pair was computed by exactly one rank, the others hold 0: the sum gathers them */
    return t->dist ? dpoc_dist_sum_doubles(t->dist, v, 2 * n, err) : 0;
}

int dpoc_trainer_compute_ref_logps(dpoc_trainer *t, dpoc_err *err) {
    double *v = dpoc_calloc(2 * t->data.n_pairs + 1, sizeof(double), "reference log-probs", err);
    if (!v) return DPOC_ENOMEM;
    int rc = compute_ref_logps_of(t, &t->data, v, err);
    if (!rc) rc = dpoc_trainer_set_ref_logps(t, v, err);
    free(v);
    return rc;
}

int dpoc_trainer_set_eval_ref_logps(dpoc_trainer *t, const double *values, dpoc_err *err) {
    if (!t->has_eval) return dpoc_errf(err, DPOC_EINTERNAL, "no evaluation set");
    const size_t n = 2 * t->eval.n_pairs;
    if (!t->eval_ref_logps &&
        !(t->eval_ref_logps = dpoc_malloc((n ? n : 1) * sizeof(double), "evaluation reference log-probs", err)))
        return DPOC_ENOMEM;
    memcpy(t->eval_ref_logps, values, n * sizeof(double));
    return 0;
}

int dpoc_trainer_compute_eval_ref_logps(dpoc_trainer *t, dpoc_err *err) {
    if (!t->has_eval) return dpoc_errf(err, DPOC_EINTERNAL, "no evaluation set");
    double *v = dpoc_calloc(2 * t->eval.n_pairs + 1, sizeof(double), "evaluation reference log-probs", err);
    if (!v) return DPOC_ENOMEM;
    int rc = compute_ref_logps_of(t, &t->eval, v, err);
    if (!rc) rc = dpoc_trainer_set_eval_ref_logps(t, v, err);
    free(v);
    return rc;
}

void dpoc_trainer_drop_ref(dpoc_trainer *t) {
    dpoc_acts_free(&t->ref_acts);
    /* a shadow must not outlive its block: another allocation could take the address */
    if (t->ref.params && t->shadows) dpoc_gemm_shadow_remove(t->ref.params);
    if (t->ref.params) dpoc_model_free(&t->ref);
}

/* ---- replicas ---- */

uint64_t dpoc_fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *b = data;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/* Equal weights give equal checksums bit for bit. */
static uint64_t tensor_checksum(const float *v, size_t n) { return dpoc_fnv1a(DPOC_FNV_OFFSET, v, n * sizeof(float)); }

int dpoc_trainer_check_replicas(dpoc_trainer *t, dpoc_err *err) {
    if (world_of(t) == 1) return 0;
    const size_t n = t->policy.n_tensors;
    DPOC_CHECK(t->replica_sums, err); /* made by init for more than one rank */
    uint64_t *mn = t->replica_sums, *mx = mn + n;
    /* the trainable tensors (a frozen base is never written after loading) */
    for (size_t i = 0; i < n; i++)
        mn[i] = mx[i] = t->policy.info[i].trainable
                            ? tensor_checksum(t->policy.params + t->policy.info[i].offset, t->policy.info[i].numel)
                            : 0;
    int rc = dpoc_dist_min_max_u64(t->dist, mn, mx, n, err);
    for (size_t i = 0; !rc && i < n; i++)
        if (mn[i] != mx[i])
            rc = dpoc_errf(err, DPOC_EINTERNAL,
                           "replica mismatch at step %ld: tensor '%s' differs between ranks (first of the tensors "
                           "that differ)",
                           t->global_step, t->policy.info[i].name);
    return rc;
}

/* ---- one micro-batch: forward and loss ---- */

void dpoc_mb_metrics_from_sums(const double *s, dpoc_mb_metrics *m) {
    const double pairs = s[MB_PAIRS] > 0 ? s[MB_PAIRS] : 1.0;
    m->loss = s[MB_RANKS] > 0 ? s[MB_LOSS] / s[MB_RANKS] : 0.0;
    m->rewards_chosen = s[MB_REW_C] / pairs;
    m->rewards_rejected = s[MB_REW_R] / pairs;
    m->rewards_accuracies = s[MB_ACC] / pairs;
    m->rewards_margins = s[MB_MARGIN] / pairs;
    m->logps_chosen = s[MB_LOGP_C] / pairs;
    m->logps_rejected = s[MB_LOGP_R] / pairs;
    m->logits_chosen = s[MB_TOK_C] > 0 ? s[MB_LOGIT_C] / s[MB_TOK_C] : 0.0;
    m->logits_rejected = s[MB_TOK_R] > 0 ? s[MB_LOGIT_R] / s[MB_TOK_R] : 0.0;
    const double toks = s[MB_TOK_C] + s[MB_TOK_R];
    m->entropy = toks > 0 ? s[MB_ENT] / toks : 0.0;
    m->mean_token_accuracy = s[MB_TOK_C] > 0 ? s[MB_TOP1] / s[MB_TOK_C] : 0.0;
    m->num_tokens = (size_t)s[MB_NUM_TOKENS];
}

/* Tokens of a sequence as dpoc_dataset_collate truncates it, without collating it. */
static size_t collated_len(const dpoc_dataset *d, size_t pair, int rejected, long max_length) {
    const dpoc_pair *p = &d->pairs[pair];
    const size_t full = p->prompt_len + (rejected ? p->rejected_len : p->chosen_len);
    return max_length > 0 && full > (size_t)max_length ? (size_t)max_length : full;
}

/* Init measured the training set; another one (an evaluation pass's) must fit
 * the token and activation buffers, checked before anything is written. */
static int check_seq_fit(const dpoc_trainer *t, const dpoc_dataset *data, const size_t *pairs, size_t B,
                         dpoc_err *err) {
    if (data == &t->data) return 0;
    for (size_t b = 0; b < B; b++) {
        if (pairs[b] >= data->n_pairs)
            return dpoc_errf(err, DPOC_EINTERNAL, "pair %zu of a data set of %zu pairs", pairs[b], data->n_pairs);
        for (int r = 0; r < 2; r++) {
            const size_t T = collated_len(data, pairs[b], r, t->cfg.max_length);
            if (T > t->max_T)
                return dpoc_errf(err, DPOC_EINPUT,
                                 "pair on line %zu: its %s sequence has %zu tokens, more than the %zu the trainer "
                                 "sized its buffers for (the training set's longest)",
                                 data->pairs[pairs[b]].line, r ? "rejected" : "chosen", T, t->max_T);
        }
    }
    return 0;
}

/* The shared path runs every pair with its prompt computed once, in act_T rows
 * for the whole micro-batch: another data set's pairs must allow that too. */
static int check_shared_fit(const dpoc_trainer *t, const dpoc_dataset *data, const size_t *pairs, size_t B,
                            dpoc_err *err) {
    if (!t->shared || data == &t->data) return 0;
    const dpoc_seq *seq = t->mb.seq;
    size_t rows = 0;
    for (size_t b = 0; b < B; b++) {
        const int32_t *c = t->seq_buf + b * t->max_T, *r = t->seq_buf + (B + b) * t->max_T;
        if (!pair_shares_prompt(&seq[b], &seq[B + b], c, r))
            return dpoc_errf(err, DPOC_EINPUT,
                             "pair on line %zu cannot run with its prompt shared, as the training set's pairs do",
                             data->pairs[pairs[b]].line);
        rows += seq[b].comp_start + seq[b].R + seq[B + b].R;
    }
    if (rows > t->act_T)
        return dpoc_errf(err, DPOC_EINPUT, "a micro-batch of %zu rows, more than the %zu the trainer sized for", rows,
                         t->act_T);
    return 0;
}

/* Collates pairs[0..B) of data into seq_buf and t->mb.seq; counts their tokens. */
static void collate_micro_batch(dpoc_trainer *t, const dpoc_dataset *data, const size_t *pairs, size_t B,
                                double *sums) {
    const dpoc_config *cfg = &t->cfg;
    for (size_t s = 0; s < 2 * B; s++) {
        const double t0 = dpoc_prof_start(t->prof);
        dpoc_dataset_collate(data, pairs[s % B], s >= B, cfg->max_length, cfg->truncation_keep_end,
                             t->seq_buf + s * t->max_T, &t->mb.seq[s]);
        dpoc_prof_add(t->prof, DPOC_PROF_DATA, t0);
        sums[MB_NUM_TOKENS] += (double)t->mb.seq[s].T;
    }
}

/* The policy over the collated micro-batch; t->mb records where each
 * sequence's head outputs are and each forward's FLOPs. */
static void policy_forward(dpoc_trainer *t, size_t B) {
    dpoc_micro_batch *mb = &t->mb;
    const dpoc_seq *seq = mb->seq;
    mb->n_fwd = 0;
    if (t->shared) {
        /* the whole micro-batch in one pairs layout; head rows pair by pair, chosen first */
        size_t head = 0;
        for (size_t b = 0; b < B; b++) {
            const int32_t *c = t->seq_buf + b * t->max_T, *r = t->seq_buf + (B + b) * t->max_T;
            const size_t Tp = seq[b].comp_start, Ta = seq[b].R, Tb = seq[B + b].R;
            mb->fwd_flops[mb->n_fwd++] = shared_forward_parts(&t->policy, Tp, Ta, Tb);
            mb->ptok[b] = (dpoc_pair_tokens){c, Tp, c + Tp, Ta, r + Tp, Tb};
            mb->actp[b] = mb->actp[B + b] = 0;
            mb->offp[b] = head, mb->offp[B + b] = head + Ta;
            head += Ta + Tb;
        }
        dpoc_model_forward_pairs(&t->policy, &t->acts[0], mb->ptok, B);
        t->progress_time = dpoc_now_s();
        return;
    }
    for (size_t s = 0; s < 2 * B; s++) {
        mb->fwd_flops[mb->n_fwd++] =
            dpoc_flops_forward_parts(&t->policy, seq[s].T, dpoc_flops_causal_pairs(seq[s].T), seq[s].R);
        dpoc_model_forward(&t->policy, &t->acts[s], t->seq_buf + s * t->max_T, seq[s].T, seq[s].row0, seq[s].R);
        mb->actp[s] = s, mb->offp[s] = 0;
        t->progress_time = dpoc_now_s();
    }
}

/* The loss's view of each sequence: its policy log-probs (and WPO terms) in the
 * activations, where its dLoss/dlogp goes, and its reference log-prob when
 * precomputed (ref_logps: by pair of the data set). */
static void loss_inputs(dpoc_trainer *t, const double *ref_logps, const size_t *pairs, size_t B) {
    dpoc_micro_batch *mb = &t->mb;
    for (size_t s = 0; s < 2 * B; s++) {
        const dpoc_acts *a = &t->acts[mb->actp[s]];
        dpoc_loss_seq *ls = &mb->ls[s];
        ls->n_tok = mb->seq[s].R;
        ls->n_completion = mb->seq[s].T - mb->seq[s].comp_start;
        ls->policy_tok_logp = a->logp + mb->offp[s];
        ls->log_sum_sq_probs = a->log_sum_sq_probs + mb->offp[s];
        /* dLoss/dlogp in the head-row order backward_pairs takes, or per sequence */
        mb->dtok[s] = t->tok_buf + (t->shared ? mb->offp[s] : s * t->max_T);
        if (ref_logps) ls->ref_logp = ref_logps[2 * pairs[s % B] + (s >= B)];
    }
}

/* The in-memory reference over the policy's layout (the whole micro-batch in
 * one forward when shared), its log-probs into the loss inputs. */
static void reference_forward(dpoc_trainer *t, size_t B) {
    dpoc_micro_batch *mb = &t->mb;
    const dpoc_model *ref = begin_reference(t);
    if (t->shared) pairs_ref_logps(t, ref, mb->ptok, B, mb->ref_pair);
    for (size_t b = 0; !t->shared && b < B; b++) {
        const int32_t *const ids[2] = {t->seq_buf + b * t->max_T, t->seq_buf + (B + b) * t->max_T};
        const dpoc_seq pair_seq[2] = {mb->seq[b], mb->seq[B + b]};
        pair_ref_logps(t, ref, ids, pair_seq, mb->ref_pair + 2 * b);
    }
    end_reference(t);
    for (size_t b = 0; b < B; b++) {
        mb->ls[b].ref_logp = mb->ref_pair[2 * b];
        mb->ls[B + b].ref_logp = mb->ref_pair[2 * b + 1];
    }
}

/* TRL's metric sums of one micro-batch, from the loss (its per-sequence
 * log-probs in t->mb.logps) and the policy's head outputs. */
static void metric_sums(const dpoc_trainer *t, size_t B, double loss, double *sums) {
    const dpoc_micro_batch *mb = &t->mb;
    const double beta = t->cfg.loss.beta;
    const double *chosen = mb->logps, *rejected = mb->logps + B;
    sums[MB_LOSS] = loss;
    sums[MB_RANKS] = 1.0;
    sums[MB_PAIRS] = (double)B;
    for (size_t i = 0; i < B; i++) {
        double rw_c = beta * (chosen[i] - mb->ls[i].ref_logp);
        double rw_r = beta * (rejected[i] - mb->ls[B + i].ref_logp);
        sums[MB_REW_C] += rw_c;
        sums[MB_REW_R] += rw_r;
        sums[MB_ACC] += rw_c > rw_r;
        sums[MB_MARGIN] += rw_c - rw_r;
        sums[MB_LOGP_C] += chosen[i];
        sums[MB_LOGP_R] += rejected[i];
    }
    for (size_t s = 0; s < 2 * B; s++) {
        const dpoc_acts *a = &t->acts[mb->actp[s]];
        const int is_rejected = s >= B;
        for (size_t r = mb->offp[s]; r < mb->offp[s] + mb->seq[s].R; r++) {
            sums[MB_ENT] += a->entropy[r];
            sums[is_rejected ? MB_LOGIT_R : MB_LOGIT_C] += a->mean_logit[r];
            if (!is_rejected) sums[MB_TOP1] += a->is_top1[r];
        }
        sums[is_rejected ? MB_TOK_R : MB_TOK_C] += (double)mb->seq[s].R;
    }
}

/* Every policy activation watched by w (NULL: none). */
static void watch_policy(dpoc_trainer *t, dpoc_act_watch *w) {
    for (size_t i = 0; i < t->n_acts; i++) t->acts[i].watch = w;
}

/* The micro-batch's loss came out NaN or Inf: name where it began. The weights
 * first (a NaN there reaches everything), then the policy's forward run again
 * with every output checked, then the reference's log-probs. */
static int nonfinite_loss(dpoc_trainer *t, const dpoc_dataset *data, size_t B, double loss, dpoc_err *err) {
    const dpoc_micro_batch *mb = &t->mb;
    char when[96];
    snprintf(when, sizeof when, "%s step %ld on rank %d", data == &t->eval ? "evaluation after" : "training",
             data == &t->eval ? t->global_step : t->global_step + 1, rank_of(t));
    int rc = dpoc_model_check_weights(&t->policy, "the policy", err);
    if (rc) {
        dpoc_err_prefix(err, "%s: the loss is not finite", when);
        return rc;
    }
    dpoc_act_watch *w = &t->watch;
    w->check = 1;
    w->first[0] = '\0';
    watch_policy(t, w);
    policy_forward(t, B);
    watch_policy(t, inject_now(t, DPOC_INJECT_ACT, t->global_step + 1) ? w : NULL);
    w->check = 0;
    if (w->first[0])
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: the loss is not finite: the policy's forward output %s is (%s at element %zu), its "
                         "inputs were finite; stopping before this step's update",
                         when, w->first, isnan(w->first_value) ? "nan" : w->first_value > 0 ? "inf" : "-inf",
                         w->first_index);
    for (size_t s = 0; s < 2 * B; s++)
        if (!isfinite(mb->ls[s].ref_logp))
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: the loss is not finite: the reference log-prob of the %s answer of pair %zu of "
                             "the micro-batch is %g",
                             when, s < B ? "chosen" : "rejected", s % B, mb->ls[s].ref_logp);
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: the loss is not finite (%g) though the policy's outputs and the reference log-probs are",
                     when, loss);
}

int dpoc_trainer_forward_loss(dpoc_trainer *t, const dpoc_dataset *data, const double *ref_logps,
                              const size_t *pairs, size_t B, double grad_scale, double *sums, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    dpoc_micro_batch *mb = &t->mb;
    mb->B = 0; /* until this forward is complete, nothing waits for a backward */
    if (B == 0 || B > t->max_B) return dpoc_errf(err, DPOC_EINTERNAL, "micro-batch of %zu pairs", B);
    if (!ref_logps && !t->ref.params && !t->ref_is_base)
        return dpoc_errf(err, DPOC_EINTERNAL, "precomputed reference log-probs are missing");
    DPOC_TRY(check_seq_fit(t, data, pairs, B, err));
    memset(sums, 0, DPOC_MB_N * sizeof *sums);
    for (size_t i = 0; i < t->n_acts; i++) t->acts[i].prof = t->prof;
    t->ref_acts.prof = t->prof;
    collate_micro_batch(t, data, pairs, B, sums);
    DPOC_TRY(check_shared_fit(t, data, pairs, B, err));
    policy_forward(t, B);
    loss_inputs(t, ref_logps, pairs, B);
    mb->ran_ref = ref_logps == NULL;
    if (mb->ran_ref) reference_forward(t, B);
    t->progress_time = dpoc_now_s();
    dpoc_loss_out lo = {0, mb->logps, mb->logps + B};
    const double t_loss = dpoc_prof_start(t->prof);
    const int rc = dpoc_loss_compute_in(&t->loss_work, &cfg->loss, B, mb->ls, mb->ls + B, grad_scale, mb->dtok,
                                        mb->dtok + B, &lo, err);
    dpoc_prof_add(t->prof, DPOC_PROF_LOSS, t_loss);
    if (rc && !isfinite(lo.loss)) return nonfinite_loss(t, data, B, lo.loss, err);
    if (rc) return rc;
    metric_sums(t, B, lo.loss, sums);
    mb->B = B;
    return 0;
}

/* ---- one micro-batch: backward ---- */

typedef struct {
    dpoc_trainer *t;
    int rc;
    dpoc_err *err;
} sync_ctx;

static void on_grads_ready(void *ctx, size_t ready_from) {
    sync_ctx *c = ctx;
    if (c->rc) return;
    if (c->t->zero_stage >= 2) c->rc = dpoc_shard_reduce(&c->t->shard, ready_from, c->err);
    else c->rc = dpoc_grad_sync_ready(&c->t->sync, ready_from, c->err);
}

int dpoc_trainer_backward(dpoc_trainer *t, int sync_tail, dpoc_err *err) {
    dpoc_micro_batch *mb = &t->mb;
    const size_t B = mb->B;
    if (B == 0) return dpoc_errf(err, DPOC_EINTERNAL, "a backward without a forward to take it from");
    if (B > t->cfg.per_device_train_batch_size)
        return dpoc_errf(err, DPOC_EINTERNAL, "a backward of %zu pairs: only training batches have one", B);
    mb->B = 0; /* its dLoss/dlogp goes into the gradients once */
    mb->last_B = B;
    sync_ctx sc = {t, 0, err};
    const dpoc_backward_hook hook = {on_grads_ready, &sc};
    /* A gradient is final once the last sequence of the micro-batch has passed
     * its layer: for averaging (stages 0, 1) in the step's last micro-batch; at
     * stage 2 each micro-batch's gradients are reduced into the slices and let go. */
    const int stage2 = t->zero_stage >= 2;
    const dpoc_backward_hook *h = sync_tail || stage2 ? &hook : NULL;
    if (stage2) dpoc_shard_begin_micro_batch(&t->shard);
    if (t->shared) {
        dpoc_model_backward_pairs(&t->policy, t->grads, &t->acts[0], &t->scratch, t->tok_buf, h);
    } else {
        dpoc_model_backward_seqs(&t->policy, t->grads, t->seq_acts, t->seq_tokens, (const float *const *)mb->dtok,
                                 t->seq_dx, 2 * B, &t->scratch, h);
    }
    t->progress_time = dpoc_now_s();
    return sc.rc;
}

/* ---- one micro-batch: both ---- */

/* The training FLOPs of the last forward: the policy's forward and backward
 * (dpoc_flops_train: with LoRA no weight gradient of the frozen base), and one
 * base forward more when the reference ran. */
static void count_train_flops(dpoc_trainer *t) {
    const double ref_factor = t->mb.ran_ref ? 1.0 : 0.0;
    const int frozen = dpoc_lora_attached(&t->policy);
    for (size_t k = 0; k < t->mb.n_fwd; k++)
        t->flops += dpoc_flops_train(&t->mb.fwd_flops[k], frozen) + ref_factor * t->mb.fwd_flops[k].total;
}

int dpoc_trainer_micro_batch(dpoc_trainer *t, const size_t *pairs, size_t B, double grad_scale, double *sums,
                             int sync_tail, dpoc_err *err) {
    DPOC_TRY(dpoc_trainer_forward_loss(t, &t->data, t->ref_logps, pairs, B, grad_scale, sums, err));
    count_train_flops(t);
    return dpoc_trainer_backward(t, sync_tail, err);
}

/* ---- ZeRO ---- */

/* After each rank updated its slice: every rank gets every slice, and the bf16
 * copy of the weights follows the slices that others updated. */
static int gather_weights(dpoc_trainer *t, dpoc_err *err) {
    DPOC_TRY(dpoc_shard_gather(&t->shard, t->policy.params, err));
    if (!t->shadows) return 0;
    const int W = world_of(t), me = rank_of(t);
    for (int r = 0; r < W; r++)
        if (r != me && t->shard.lo[r + 1] > t->shard.lo[r])
            dpoc_gemm_shadow_refresh_range(t->policy.params, t->shard.lo[r], t->shard.lo[r + 1] - t->shard.lo[r]);
    return 0;
}

/* ---- logging ---- */

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

static double comm_time(const dpoc_trainer *t) { return t->dist ? t->dist->comm_time_s : 0.0; }

static void rec_add(dpoc_log_record *r, const char *name, double v) {
    if (r->n < DPOC_MAX_LOG_FIELDS) {
        r->names[r->n] = name;
        r->values[r->n++] = v;
    }
}

static int log_window(dpoc_trainer *t, double grad_norm, double lr, double epoch, dpoc_err *err) {
    const double elapsed = dpoc_now_s() - t->win_start_time;
    const double comm = comm_time(t) - t->win_comm_time;
    const long steps = t->global_step - t->last_logged_step;
    const double mb = t->win_micro_batches ? (double)t->win_micro_batches : 1.0;
    int rc = 0;
    if (dpoc_dist_is_root(t->dist) && t->on_log) {
        dpoc_log_record r = {0};
        rec_add(&r, "step", (double)t->global_step);
        rec_add(&r, "loss", t->win_loss / (double)steps);
        rec_add(&r, "grad_norm", grad_norm);
        rec_add(&r, "learning_rate", lr);
        for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++) rec_add(&r, WINDOW_NAMES[i], t->win_metrics[i] / mb);
        rec_add(&r, "num_tokens", (double)t->total_tokens);
        rec_add(&r, "epoch", epoch);
        rec_add(&r, "tokens_per_second", elapsed > 0 ? (double)t->win_tokens / elapsed : 0.0);
        rec_add(&r, "step_time_s", elapsed / (double)steps);
        rec_add(&r, "compute_time_s", (elapsed - comm) / (double)steps);
        rec_add(&r, "comm_time_s", comm / (double)steps);
        rec_add(&r, "world_size", (double)world_of(t));
        rc = t->on_log(t->on_log_ctx, &r, err);
    }
    t->win_loss = 0;
    memset(t->win_metrics, 0, sizeof t->win_metrics);
    t->win_micro_batches = 0;
    t->win_tokens = 0;
    t->win_start_time = dpoc_now_s();
    t->win_comm_time = comm_time(t);
    t->last_logged_step = t->global_step;
    return rc;
}

/* ---- one optimizer step ---- */

/* The step's gradient norm is NaN or Inf: name the tensor (this rank's slice
 * at ZeRO stage 2; the whole averaged gradient otherwise). Nothing is updated. */
static int nonfinite_grad(dpoc_trainer *t, dpoc_err *err) {
    const int stage2 = t->zero_stage >= 2;
    const float *g = stage2 ? t->shard.grad : t->grads;
    const size_t lo = stage2 ? t->shard.me_lo : 0, hi = stage2 ? t->shard.me_hi : t->policy.numel;
    const long step = t->global_step + 1;
    const int rc = dpoc_model_check_finite(&t->policy, g, lo, hi, "the gradient of", err);
    if (rc) {
        dpoc_err_prefix(err, "step %ld on rank %d", step, rank_of(t));
        /* a forward output that went non-finite without reaching the loss (a row no
         * label reads) still reaches the gradients: look for it in the last micro-batch */
        dpoc_act_watch *w = &t->watch;
        if (t->mb.last_B) {
            w->check = 1;
            w->first[0] = '\0';
            watch_policy(t, w);
            policy_forward(t, t->mb.last_B);
            watch_policy(t, NULL);
            w->check = 0;
        }
        if (w->first[0]) {
            char msg[DPOC_ERR_MSG_MAX];
            snprintf(msg, sizeof msg, "%s", err->msg);
            dpoc_errf(err, rc, "%s; it comes from the policy's forward output %s (%s at element %zu)", msg, w->first,
                      isnan(w->first_value) ? "nan" : w->first_value > 0 ? "inf" : "-inf", w->first_index);
        }
        return rc;
    }
    return dpoc_errf(err, DPOC_EINPUT,
                     "step %ld on rank %d: the gradient norm is not finite (in another rank's slice of the gradient)",
                     step, rank_of(t));
}

int dpoc_trainer_step(dpoc_trainer *t, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const size_t bs = cfg->per_device_train_batch_size, ga = cfg->gradient_accumulation_steps;
    const size_t W = (size_t)world_of(t), r = (size_t)rank_of(t), N = t->data.n_pairs;
    const long epoch = t->global_step / (long)t->updates_per_epoch;
    const size_t update = (size_t)(t->global_step % (long)t->updates_per_epoch);
    if (t->hooks.fail_rank == (int)r && t->hooks.fail_step == t->global_step + 1)
        return dpoc_errf(err, DPOC_EINPUT, "test hook DPOC_TEST_FAIL_AT: failing at step %ld", t->global_step + 1);
    if (t->hooks.hang_rank == (int)r && t->hooks.hang_step == t->global_step + 1)
        for (;;) pause(); /* only the watchdog ends this */
    DPOC_TRY(shadows_ensure(t, err));
    if (inject_now(t, DPOC_INJECT_ACT, t->global_step + 1)) {
        snprintf(t->watch.inject, sizeof t->watch.inject, "%s", t->hooks.inject_name);
        t->watch.inject_value = t->hooks.inject_value;
        watch_policy(t, &t->watch);
    } else {
        watch_policy(t, NULL);
    }
    if (t->order_epoch != epoch) {
        if (cfg->shuffle) dpoc_shuffle_order(t->order, N, cfg->seed, (uint64_t)epoch);
        else
            for (size_t i = 0; i < N; i++) t->order[i] = i;
        t->order_epoch = epoch;
    }
    if (t->win_start_time == 0) {
        t->win_start_time = dpoc_now_s();
        t->win_comm_time = comm_time(t);
    }
    t->progress_time = dpoc_now_s();
    const size_t mb_first = update * ga;
    size_t mb_end = mb_first + ga;
    if (mb_end > t->steps_in_epoch) mb_end = t->steps_in_epoch;
    const size_t n_mb = mb_end - mb_first;
    /* stage 2: the local block is all zeros already (released range by range) */
    if (t->zero_stage >= 2) dpoc_shard_begin_step(&t->shard);
    else memset(t->grads, 0, t->policy.numel * sizeof(float));
    for (size_t m = mb_first; m < mb_end; m++) {
        size_t B = 0;
        if (t->balance) {
            /* the global micro-batch (wrapped as accelerate's even_batches), split by cost */
            const size_t gb = W * bs;
            for (size_t k = 0; k < gb; k++) {
                t->bal_pairs[k] = t->order[(m * W * bs + k) % N];
                t->bal_cost[k] = pair_cost(t, t->bal_pairs[k], t->seq_buf);
            }
            dpoc_balance_ranks_with(t->bal_cost, gb, W, bs, t->bal_rank, t->bal_order, t->bal_load, t->bal_count);
            for (size_t k = 0; k < gb; k++)
                if (t->bal_rank[k] == r) t->mb_pairs[B++] = t->bal_pairs[k];
        } else {
            for (size_t j = 0; j < bs; j++) {
                size_t pos = (m * W + r) * bs + j;
                if (pos >= N) {
                    if (W == 1) break; /* HF: the last micro-batch is smaller */
                    pos %= N;          /* accelerate even_batches: wrap to the start */
                }
                t->mb_pairs[B++] = t->order[pos];
            }
        }
        DPOC_TRY(dpoc_trainer_micro_batch(t, t->mb_pairs, B, 1.0 / (double)n_mb,
                                          t->step_sums + (m - mb_first) * DPOC_MB_N, m + 1 == mb_end, err));
    }
    if (t->zero_stage >= 2) dpoc_shard_average(&t->shard);
    else DPOC_TRY(dpoc_grad_sync_finish(&t->sync, err));
    DPOC_TRY(dpoc_dist_sum_doubles(t->dist, t->step_sums, n_mb * DPOC_MB_N, err));
    for (size_t k = 0; k < n_mb; k++) {
        dpoc_mb_metrics mb;
        dpoc_mb_metrics_from_sums(t->step_sums + k * DPOC_MB_N, &mb);
        t->win_loss += mb.loss / (double)n_mb;
        window_add(t, &mb);
    }
    const double t_opt = dpoc_prof_start(t->prof);
    if (inject_now(t, DPOC_INJECT_GRAD, t->global_step + 1)) {
        if (t->zero_stage >= 2) inject_into(&t->policy, t->shard.grad, t->shard.me_lo, t->shard.me_hi, NULL,
                                            t->hooks.inject_name, t->hooks.inject_value);
        else inject_into(&t->policy, t->grads, 0, t->policy.numel, NULL, t->hooks.inject_name, t->hooks.inject_value);
    }
    double grad_norm;
    if (t->zero_stage >= 2) {
        double sq = 0;
        DPOC_TRY(dpoc_shard_grad_sum_squares(&t->shard, &sq, err)); /* clipping stays global */
        grad_norm = sqrt(sq);
    } else {
        grad_norm = dpoc_grad_norm(t->grads, t->policy.numel);
    }
    if (!isfinite(grad_norm)) return nonfinite_grad(t, err);
    t->last_grad_norm = grad_norm;
    const float clip = dpoc_clip_coef(grad_norm, cfg->max_grad_norm); /* applied inside the AdamW pass */
    const double lr = cfg->learning_rate * dpoc_lr_lambda(cfg, t->global_step, t->warmup_steps, t->total_steps);
    /* the gradient of this optimizer's slice: everything (stage 0), the averaged block's slice, or the shard's own */
    const float *g = t->zero_stage >= 2 ? t->shard.grad : t->grads + t->opt.lo;
    dpoc_adamw_step(&t->opt, t->policy.params, g, clip, lr); /* refreshes the bf16 copy of its slice too */
    if (t->zero_stage) DPOC_TRY(gather_weights(t, err));
    dpoc_prof_add(t->prof, DPOC_PROF_OPTIMIZER, t_opt);
    t->global_step++;
    if (inject_now(t, DPOC_INJECT_WEIGHT, t->global_step))
        inject_into(&t->policy, t->policy.params, 0, t->policy.numel, t->policy.frozen, t->hooks.inject_name,
                    t->hooks.inject_value);
    t->progress_time = dpoc_now_s();
    if (cfg->replica_check_steps && t->global_step % (long)cfg->replica_check_steps == 0)
        DPOC_TRY(dpoc_trainer_check_replicas(t, err));
    const double epoch_f = (double)epoch + (double)mb_end / (double)t->steps_in_epoch;
    t->epoch_f = epoch_f;
    if ((t->global_step % (long)cfg->logging_steps) == 0 || (t->global_step == 1 && cfg->logging_first_step))
        DPOC_TRY(log_window(t, grad_norm, lr, epoch_f, err));
    return 0;
}
