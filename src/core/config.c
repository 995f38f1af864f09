/* Config keys, table-driven: one row per key with its type, range and help, so
 * parsing, validation, --help and the JSON dump cannot drift apart. */
#include "dpoc/config.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/chat.h"

typedef enum { K_PATH, K_DOUBLE, K_SIZE, K_LONG, K_BOOL, K_CUSTOM } key_kind;

typedef struct key_def key_def;
typedef int (*custom_set)(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err);
typedef cJSON *(*custom_get)(const dpoc_config *c);

struct key_def {
    const char *name;
    key_kind kind;
    size_t offset;
    double lo, hi; /* inclusive range for numbers */
    custom_set set;
    custom_get get;
    const char *help;
};

#define OFF(f) offsetof(dpoc_config, f)
#define BIG 1e300

static int bad_type(const key_def *k, const char *where, const char *want, dpoc_err *err) {
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s' must be %s", where, k->name, want);
}

static int is_integer(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) < 9e15;
}

/* ---- custom keys ---- */

static int set_loss_type(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    dpoc_loss_cfg *L = &c->loss;
    if (cJSON_IsString(v)) {
        int kind = dpoc_loss_kind_from_name(v->valuestring);
        if (kind < 0) goto unknown;
        L->n_types = 1;
        L->types[0] = (dpoc_loss_kind)kind;
        return 0;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0 || cJSON_GetArraySize(v) > DPOC_MAX_LOSS_TYPES)
        return bad_type(k, where, "a loss name or a non-empty list of loss names", err);
    L->n_types = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        if (!cJSON_IsString(it)) return bad_type(k, where, "a list of strings", err);
        int kind = dpoc_loss_kind_from_name(it->valuestring);
        if (kind < 0) { v = it; goto unknown; }
        L->types[L->n_types++] = (dpoc_loss_kind)kind;
    }
    return 0;
unknown:
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: config key '%s': unknown loss type '%s' (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, "
                     "bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm)",
                     where, k->name, v->valuestring);
}
static cJSON *get_loss_type(const dpoc_config *c) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < c->loss.n_types; i++)
        cJSON_AddItemToArray(a, cJSON_CreateString(dpoc_loss_kind_name(c->loss.types[i])));
    return a;
}

/* loss_weights: checked against loss_type in finalize, since loss_type may come later. */
static int set_loss_weights(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    c->loss_weights_given = -1;
    if (cJSON_IsNull(v)) return 0;
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > DPOC_MAX_LOSS_TYPES)
        return bad_type(k, where, "null or a list of at most 16 numbers", err);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble)) return bad_type(k, where, "a list of numbers", err);
        c->loss.weights[i++] = it->valuedouble;
    }
    c->loss_weights_given = (long)i;
    return 0;
}
static cJSON *get_loss_weights(const dpoc_config *c) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < c->loss.n_types; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(c->loss.weights[i]));
    return a;
}

static int set_enum(const key_def *k, const cJSON *v, const char *where, const char *const *names, size_t n,
                    int *out, dpoc_err *err) {
    if (!cJSON_IsString(v)) return bad_type(k, where, "a string", err);
    for (size_t i = 0; i < n; i++)
        if (strcmp(v->valuestring, names[i]) == 0) {
            *out = (int)i;
            return 0;
        }
    char list[512] = "";
    for (size_t i = 0; i < n; i++) {
        strncat(list, names[i], sizeof list - strlen(list) - 1);
        if (i + 1 < n) strncat(list, ", ", sizeof list - strlen(list) - 1);
    }
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s': '%s' is not one of: %s", where, k->name,
                     v->valuestring, list);
}

static const char *const SCHED_NAMES[] = {"constant", "constant_with_warmup", "linear", "cosine",
                                          "cosine_with_min_lr"};
static int set_sched(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    int x = 0;
    DPOC_TRY(set_enum(k, v, where, SCHED_NAMES, 5, &x, err));
    c->lr_scheduler_type = (dpoc_sched_kind)x;
    return 0;
}
static cJSON *get_sched(const dpoc_config *c) { return cJSON_CreateString(SCHED_NAMES[c->lr_scheduler_type]); }

static const char *const FDIV[] = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"};
static int set_fdiv(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    int x = 0;
    DPOC_TRY(set_enum(k, v, where, FDIV, 4, &x, err));
    c->loss.f_divergence_type = (dpoc_fdiv)x;
    return 0;
}
static cJSON *get_fdiv(const dpoc_config *c) { return cJSON_CreateString(FDIV[c->loss.f_divergence_type]); }

static const char *const TRUNC[] = {"keep_start", "keep_end"};
static int set_trunc(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    return set_enum(k, v, where, TRUNC, 2, &c->truncation_keep_end, err);
}
static cJSON *get_trunc(const dpoc_config *c) { return cJSON_CreateString(TRUNC[c->truncation_keep_end]); }

static const char *const SAMPLING[] = {"sequential", "random"};
static int set_sampling(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    return set_enum(k, v, where, SAMPLING, 2, &c->shuffle, err);
}
static cJSON *get_sampling(const dpoc_config *c) { return cJSON_CreateString(SAMPLING[c->shuffle]); }

static int set_ld_alpha(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsNull(v)) {
        c->loss.has_ld_alpha = 0;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0.0 && v->valuedouble <= 1.0))
        return bad_type(k, where, "null or a number in [0, 1]", err);
    c->loss.has_ld_alpha = 1;
    c->loss.ld_alpha = v->valuedouble;
    return 0;
}
static cJSON *get_ld_alpha(const dpoc_config *c) {
    return c->loss.has_ld_alpha ? cJSON_CreateNumber(c->loss.ld_alpha) : cJSON_CreateNull();
}

static int set_max_length(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsNull(v)) {
        c->max_length = 0;
        return 0;
    }
    if (!is_integer(v) || v->valuedouble < 1) return bad_type(k, where, "null or a positive integer", err);
    c->max_length = (long)v->valuedouble;
    return 0;
}
static cJSON *get_max_length(const dpoc_config *c) {
    return c->max_length > 0 ? cJSON_CreateNumber((double)c->max_length) : cJSON_CreateNull();
}

static int set_sched_kwargs(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsNull(v)) return 0;
    if (!cJSON_IsObject(v)) return bad_type(k, where, "an object", err);
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        double *dst = !strcmp(it->string, "min_lr") ? &c->min_lr
                      : !strcmp(it->string, "min_lr_rate") ? &c->min_lr_rate
                      : !strcmp(it->string, "num_cycles") ? &c->num_cycles : NULL;
        if (!dst)
            return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s.%s' is not supported (min_lr, min_lr_rate, num_cycles)",
                             where, k->name, it->string);
        if (!cJSON_IsNumber(it) || !(it->valuedouble >= 0))
            return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s.%s' must be a non-negative number", where, k->name,
                             it->string);
        *dst = it->valuedouble;
    }
    return 0;
}
static cJSON *get_sched_kwargs(const dpoc_config *c) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "num_cycles", c->num_cycles);
    if (c->min_lr >= 0) cJSON_AddNumberToObject(o, "min_lr", c->min_lr);
    if (c->min_lr_rate >= 0) cJSON_AddNumberToObject(o, "min_lr_rate", c->min_lr_rate);
    return o;
}

static int set_chat_template(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (!cJSON_IsString(v) || (strcmp(v->valuestring, "auto") != 0 && dpoc_chat_kind_from_name(v->valuestring) < 0))
        return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s' must be auto, chatml, qwen2.5, smollm2 or llama3", where,
                         k->name);
    snprintf(c->chat_template, sizeof c->chat_template, "%s", v->valuestring);
    return 0;
}
static cJSON *get_chat_template(const dpoc_config *c) { return cJSON_CreateString(c->chat_template); }

static const char *const LOADING[] = {"each_rank", "broadcast"};
static int set_loading(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    return set_enum(k, v, where, LOADING, 2, &c->model_loading_broadcast, err);
}
static cJSON *get_loading(const dpoc_config *c) { return cJSON_CreateString(LOADING[c->model_loading_broadcast]); }

static const char *const EVAL_STRATEGY[] = {"no", "steps", "epoch"};
static int set_eval_strategy(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    return set_enum(k, v, where, EVAL_STRATEGY, 3, &c->eval_strategy, err);
}
static cJSON *get_eval_strategy(const dpoc_config *c) { return cJSON_CreateString(EVAL_STRATEGY[c->eval_strategy]); }

static const char *const ALLREDUCE[] = {"auto", "shared", "mpi"};
static int set_allreduce(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    int x = 0;
    DPOC_TRY(set_enum(k, v, where, ALLREDUCE, 3, &x, err));
    c->grad_allreduce = (dpoc_allreduce_kind)x;
    return 0;
}
static cJSON *get_allreduce(const dpoc_config *c) { return cJSON_CreateString(ALLREDUCE[c->grad_allreduce]); }

/* report_to, with transformers' semantics: "none", "all" (every integration dpoc
 * has), one name, or a list of names (a list of one "none" / "all" counts as the
 * word). An integration dpoc does not have is an error, not a warning: a job that
 * asked for its logs somewhere should not run for hours without them. */
static const char *const HF_INTEGRATIONS[] = {"azure_ml", "comet_ml", "mlflow", "neptune", "trackio", "wandb",
                                              "codecarbon", "clearml", "dagshub", "flyte", "dvclive", "swanlab",
                                              "kubeflow"};
static int report_one(dpoc_config *c, const key_def *k, const char *name, int alone, const char *where,
                      dpoc_err *err) {
    if (!strcmp(name, "tensorboard") || (alone && !strcmp(name, "all"))) {
        c->report_tensorboard = 1;
        return 0;
    }
    if (alone && !strcmp(name, "none")) return 0;
    for (size_t i = 0; i < sizeof HF_INTEGRATIONS / sizeof HF_INTEGRATIONS[0]; i++)
        if (!strcmp(name, HF_INTEGRATIONS[i]))
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: config key '%s': '%s' is a Hugging Face integration dpoc does not have; dpoc "
                             "reports to \"tensorboard\" (\"all\" = tensorboard, \"none\" = nothing)",
                             where, k->name, name);
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: config key '%s': unknown integration '%s' (dpoc: \"tensorboard\", \"all\" or \"none\"%s)",
                     where, k->name, name, alone ? "" : "; \"all\" and \"none\" only alone");
}
static int set_report_to(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    c->report_tensorboard = 0;
    if (cJSON_IsNull(v)) return 0;
    if (cJSON_IsString(v)) return report_one(c, k, v->valuestring, 1, where, err);
    if (!cJSON_IsArray(v)) return bad_type(k, where, "\"none\", \"all\", an integration name or a list of them", err);
    const int alone = cJSON_GetArraySize(v) == 1;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        if (!cJSON_IsString(it)) return bad_type(k, where, "a list of integration names (strings)", err);
        DPOC_TRY(report_one(c, k, it->valuestring, alone, where, err));
    }
    return 0;
}
/* as transformers leaves it after __post_init__: the list of integrations */
static cJSON *get_report_to(const dpoc_config *c) {
    cJSON *a = cJSON_CreateArray();
    if (c->report_tensorboard) cJSON_AddItemToArray(a, cJSON_CreateString("tensorboard"));
    return a;
}

/* Keys users bring from TRL configs that change nothing in dpoc's numbers. */
static int set_ignored(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c, (void)v, (void)where, (void)err, (void)k;
    return 0;
}
/* Keys whose only supported value is the one dpoc implements. */
static int set_must_be_false(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    if (cJSON_IsFalse(v) || cJSON_IsNull(v)) return 0;
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s': only false is supported (dpoc trains in fp32)", where,
                     k->name);
}
static int set_must_be_true(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    if (cJSON_IsTrue(v)) return 0;
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s': only true is supported (dropout is never applied)",
                     where, k->name);
}

static const char *const BF16_NAMES[] = {"false", "true", "auto"};
/* bf16: true / false as TRL's, or "auto" (dpoc's: measure both, keep the faster) */
static int set_bf16(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsBool(v)) {
        c->bf16 = cJSON_IsTrue(v) ? DPOC_BF16_TRUE : DPOC_BF16_FALSE;
        return 0;
    }
    if (cJSON_IsNull(v)) {
        c->bf16 = DPOC_BF16_FALSE;
        return 0;
    }
    int x = 0;
    DPOC_TRY(set_enum(k, v, where, BF16_NAMES, 3, &x, err));
    c->bf16 = x;
    return 0;
}
static cJSON *get_bf16(const dpoc_config *c) {
    return c->bf16 == DPOC_BF16_AUTO ? cJSON_CreateString("auto") : cJSON_CreateBool(c->bf16 == DPOC_BF16_TRUE);
}

/* ---- LoRA keys (peft LoraConfig / TRL ModelConfig) ---- */

static int set_lora_targets(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    dpoc_lora_cfg *L = &c->lora;
    if (cJSON_IsNull(v)) { /* peft's None: the architecture's default, q_proj and v_proj */
        L->targets_kind = DPOC_LORA_TARGETS_LIST;
        L->n_targets = 2;
        strcpy(L->targets[0], "q_proj");
        strcpy(L->targets[1], "v_proj");
        return 0;
    }
    if (cJSON_IsString(v)) {
        if (strlen(v->valuestring) >= DPOC_LORA_TARGET_MAX) return bad_type(k, where, "a shorter string", err);
        const int all = strcmp(v->valuestring, "all-linear") == 0;
        L->targets_kind = all ? DPOC_LORA_TARGETS_ALL_LINEAR : DPOC_LORA_TARGETS_REGEX;
        L->n_targets = all ? 0 : 1;
        strcpy(L->targets[0], v->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0 || cJSON_GetArraySize(v) > DPOC_LORA_MAX_TARGETS)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: config key '%s' must be \"all-linear\", a regular expression or a list of 1 to %d "
                         "module names",
                         where, k->name, DPOC_LORA_MAX_TARGETS);
    L->targets_kind = DPOC_LORA_TARGETS_LIST;
    L->n_targets = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        if (!cJSON_IsString(it) || !it->valuestring[0] || strlen(it->valuestring) >= DPOC_LORA_TARGET_MAX)
            return bad_type(k, where, "a list of module names (non-empty strings)", err);
        strcpy(L->targets[L->n_targets++], it->valuestring);
    }
    return 0;
}
static cJSON *get_lora_targets(const dpoc_config *c) {
    const dpoc_lora_cfg *L = &c->lora;
    if (L->targets_kind != DPOC_LORA_TARGETS_LIST) return cJSON_CreateString(L->targets[0]);
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < L->n_targets; i++) cJSON_AddItemToArray(a, cJSON_CreateString(L->targets[i]));
    return a;
}

static int set_lora_init(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsBool(v)) {
        c->lora.init = cJSON_IsTrue(v) ? DPOC_LORA_INIT_DEFAULT : DPOC_LORA_INIT_RANDOM;
        return 0;
    }
    if (cJSON_IsString(v) && strcmp(v->valuestring, "gaussian") == 0) {
        c->lora.init = DPOC_LORA_INIT_GAUSSIAN;
        return 0;
    }
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: config key '%s' must be true, false or \"gaussian\" (peft's other initialisations, "
                     "e.g. pissa, olora, loftq, are not supported)",
                     where, k->name);
}
static cJSON *get_lora_init(const dpoc_config *c) {
    if (c->lora.init == DPOC_LORA_INIT_GAUSSIAN) return cJSON_CreateString("gaussian");
    return cJSON_CreateBool(c->lora.init == DPOC_LORA_INIT_DEFAULT);
}

/* A key whose only supported value is one string (case as peft writes it). */
static int require_string(const key_def *k, const cJSON *v, const char *where, const char *only, const char *why,
                          dpoc_err *err) {
    if (cJSON_IsNull(v) || (cJSON_IsString(v) && strcmp(v->valuestring, only) == 0)) return 0;
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s': only \"%s\" is supported (%s)", where, k->name, only,
                     why);
}
static int set_lora_bias(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    return require_string(k, v, where, "none", "biases stay frozen", err);
}
static int set_lora_task(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    return require_string(k, v, where, "CAUSAL_LM", "dpoc trains causal language models", err);
}
static int set_base_dtype(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    if (cJSON_IsString(v) && strcmp(v->valuestring, "keep") == 0) {
        c->lora.keep_base = 1;
        return 0;
    }
    c->lora.keep_base = 0;
    return require_string(k, v, where, "fp32", "or \"keep\"; bf16 is not built yet", err);
}
static cJSON *get_base_dtype(const dpoc_config *c) { return cJSON_CreateString(c->lora.keep_base ? "keep" : "fp32"); }
static int set_use_dora(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    if (cJSON_IsFalse(v) || cJSON_IsNull(v)) return 0;
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s': only false is supported (DoRA is not built)", where,
                     k->name);
}
/* Keys with no supported value but the empty one (null, false, [] or ""). */
static int set_must_be_empty(dpoc_config *c, const key_def *k, const cJSON *v, const char *where, dpoc_err *err) {
    (void)c;
    if (cJSON_IsNull(v) || cJSON_IsFalse(v) || (cJSON_IsArray(v) && cJSON_GetArraySize(v) == 0) ||
        (cJSON_IsString(v) && !v->valuestring[0]))
        return 0;
    return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s' is not supported yet (leave it unset)", where, k->name);
}

static const key_def KEYS[] = {
    {"model_name_or_path", K_PATH, OFF(model_name_or_path), 0, 0, 0, 0, "policy model: a GGUF file or a Hugging Face model directory"},
    {"ref_model_name_or_path", K_PATH, OFF(ref_model_name_or_path), 0, 0, 0, 0,
     "reference model directory (default: a frozen copy of the starting policy)"},
    {"train_file", K_PATH, OFF(train_file), 0, 0, 0, 0,
     "training pairs: JSONL or a JSON array in a TRL preference format, or pre-tokenized"},
    {"eval_file", K_PATH, OFF(eval_file), 0, 0, 0, 0,
     "evaluation pairs (TRL's eval_dataset): any format train_file takes; evaluated per eval_strategy"},
    {"eval_strategy", K_CUSTOM, 0, 0, 0, set_eval_strategy, get_eval_strategy,
     "when to evaluate eval_file: no, steps (every eval_steps), epoch"},
    {"eval_steps", K_SIZE, OFF(eval_steps), 0, 1e15, 0, 0, "evaluate every N optimizer steps (0: logging_steps)"},
    {"per_device_eval_batch_size", K_SIZE, OFF(per_device_eval_batch_size), 1, 1e9, 0, 0,
     "eval pairs per rank per batch"},
    {"eval_on_start", K_BOOL, OFF(eval_on_start), 0, 0, 0, 0, "evaluate before the first step"},
    {"prediction_loss_only", K_BOOL, OFF(prediction_loss_only), 0, 0, 0, 0,
     "accepted (TRL's DPO metrics are computed either way)"},
    {"output_dir", K_PATH, OFF(output_dir), 0, 0, 0, 0, "where metrics.jsonl and checkpoints go"},
    {"tokenizer_name_or_path", K_PATH, OFF(tokenizer_name_or_path), 0, 0, 0, 0,
     "directory with tokenizer.json (default: the model directory; needed for text data sets)"},
    {"chat_template", K_CUSTOM, 0, 0, 0, set_chat_template, get_chat_template,
     "auto (recognise the tokenizer's template) or chatml, qwen2.5, smollm2, llama3"},
    {"skip_bad_records", K_BOOL, OFF(skip_bad_records), 0, 0, 0, 0,
     "skip and count bad data set records instead of stopping"},
    {"beta", K_DOUBLE, OFF(loss.beta), 0, BIG, 0, 0, "DPO beta (IPO: tau)"},
    {"loss_type", K_CUSTOM, 0, 0, 0, set_loss_type, get_loss_type, "loss name or list of names"},
    {"loss_weights", K_CUSTOM, 0, 0, 0, set_loss_weights, get_loss_weights, "weights of the loss types (default 1 each)"},
    {"label_smoothing", K_DOUBLE, OFF(loss.label_smoothing), 0, 1, 0, 0, "robust / exo_pair / aot label smoothing"},
    {"f_divergence_type", K_CUSTOM, 0, 0, 0, set_fdiv, get_fdiv,
     "reverse_kl, forward_kl, js_divergence or alpha_divergence"},
    {"f_alpha_divergence_coef", K_DOUBLE, OFF(loss.f_alpha_divergence_coef), -BIG, BIG, 0, 0,
     "alpha of the alpha-divergence"},
    {"use_weighting", K_BOOL, OFF(loss.use_weighting), 0, 0, 0, 0, "WPO weighting of pairs"},
    {"ld_alpha", K_CUSTOM, 0, 0, 0, set_ld_alpha, get_ld_alpha, "LD-DPO alpha (null: off)"},
    {"discopop_tau", K_DOUBLE, OFF(loss.discopop_tau), 0, BIG, 0, 0, "DiscoPOP temperature"},
    {"learning_rate", K_DOUBLE, OFF(learning_rate), 0, BIG, 0, 0, "peak learning rate"},
    {"lr_scheduler_type", K_CUSTOM, 0, 0, 0, set_sched, get_sched,
     "constant, constant_with_warmup, linear, cosine, cosine_with_min_lr"},
    {"lr_scheduler_kwargs", K_CUSTOM, 0, 0, 0, set_sched_kwargs, get_sched_kwargs,
     "{min_lr | min_lr_rate, num_cycles}"},
    {"warmup_steps", K_DOUBLE, OFF(warmup_steps), 0, BIG, 0, 0, "warm-up steps (>= 1) or ratio of all steps (< 1)"},
    {"warmup_ratio", K_DOUBLE, OFF(warmup_ratio), 0, 1, 0, 0, "warm-up as a ratio of all steps (if warmup_steps is 0)"},
    {"weight_decay", K_DOUBLE, OFF(weight_decay), 0, BIG, 0, 0, "AdamW decoupled weight decay"},
    {"adam_beta1", K_DOUBLE, OFF(adam_beta1), 0, 0.999999999, 0, 0, "AdamW beta1"},
    {"adam_beta2", K_DOUBLE, OFF(adam_beta2), 0, 0.999999999, 0, 0, "AdamW beta2"},
    {"adam_epsilon", K_DOUBLE, OFF(adam_epsilon), 0, BIG, 0, 0, "AdamW epsilon"},
    {"max_grad_norm", K_DOUBLE, OFF(max_grad_norm), 0, BIG, 0, 0, "gradient clipping norm (0: off)"},
    {"per_device_train_batch_size", K_SIZE, OFF(per_device_train_batch_size), 1, 1e9, 0, 0, "pairs per micro-batch"},
    {"gradient_accumulation_steps", K_SIZE, OFF(gradient_accumulation_steps), 1, 1e9, 0, 0,
     "micro-batches per optimizer step"},
    {"num_train_epochs", K_DOUBLE, OFF(num_train_epochs), 0, 1e9, 0, 0, "epochs (when max_steps <= 0)"},
    {"max_steps", K_LONG, OFF(max_steps), -1, 1e15, 0, 0, "optimizer steps (overrides num_train_epochs if > 0)"},
    {"max_length", K_CUSTOM, 0, 0, 0, set_max_length, get_max_length, "truncate prompt+completion to this (null: off)"},
    {"truncation_mode", K_CUSTOM, 0, 0, 0, set_trunc, get_trunc, "keep_start or keep_end"},
    {"logging_steps", K_SIZE, OFF(logging_steps), 1, 1e15, 0, 0, "log metrics every N optimizer steps"},
    {"logging_first_step", K_BOOL, OFF(logging_first_step), 0, 0, 0, 0, "also log after the first step"},
    {"seed", K_LONG, OFF(seed), 0, 9e15, 0, 0, "random seed (data order)"},
    {"train_sampling_strategy", K_CUSTOM, 0, 0, 0, set_sampling, get_sampling,
     "random (shuffled every epoch) or sequential (file order)"},
    {"balance_batches", K_BOOL, OFF(balance_batches), 0, 0, 0, 0,
     "MPI: split each global batch over the ranks by cost (same pairs per rank; not for aot, sft, WPO weighting)"},
    {"shared_prefix", K_BOOL, OFF(shared_prefix), 0, 0, 0, 0,
     "dpoc: compute each pair's prompt once, both completions attend to it (equal results within 1e-5; "
     "used when every pair keeps its whole prompt)"},
    {"precompute_ref_log_probs", K_BOOL, OFF(precompute_ref_log_probs), 0, 0, 0, 0,
     "reference log-probs computed once before training (split over ranks), cached in output_dir/ref_logps.h5; "
     "no reference model is held while training"},
    {"save_steps", K_SIZE, OFF(save_steps), 0, 1e15, 0, 0,
     "write output_dir/checkpoint-STEP.h5 every N steps (0: only at the end and on a signal)"},
    {"save_total_limit", K_SIZE, OFF(save_total_limit), 0, 1e15, 0, 0, "keep at most N checkpoints (0: all)"},
    {"replica_check_steps", K_SIZE, OFF(replica_check_steps), 0, 1e15, 0, 0,
     "MPI: check that every rank holds the same weights every N steps (0: only at start)"},
    {"bucket_size_mb", K_DOUBLE, OFF(bucket_size_mb), 0.001, 4096, 0, 0,
     "MPI: gradient allreduce bucket size (grad_allreduce mpi)"},
    {"zero_stage", K_SIZE, OFF(zero_stage), 0, 2, 0, 0,
     "DeepSpeed-style sharding over the ranks: 0 none, 1 AdamW moments, 2 moments and gradients"},
    {"grad_allreduce", K_CUSTOM, 0, 0, 0, set_allreduce, get_allreduce,
     "MPI: auto (shared when a node runs several ranks), shared (gradients in a node-local shared-memory window, "
     "reduced in place; MPI_Allreduce between nodes) or mpi (bucketed MPI_Iallreduce during backward)"},
    {"collective_timeout_s", K_DOUBLE, OFF(collective_timeout_s), 1, 1e9, 0, 0,
     "abort the job when a step makes no progress for this long"},
    {"num_threads", K_SIZE, OFF(num_threads), 0, 4096, 0, 0,
     "BLAS/kernel threads per rank (0: cores / ranks on the node; OMP_NUM_THREADS overrides 0)"},
    {"model_loading", K_CUSTOM, 0, 0, 0, set_loading, get_loading,
     "each_rank (every rank maps the files) or broadcast (rank 0 reads, MPI_Bcast)"},
    {"report_to", K_CUSTOM, 0, 0, 0, set_report_to, get_report_to,
     "where logs go besides metrics.jsonl/metrics.h5: \"none\", \"tensorboard\" (event files in logging_dir), "
     "\"all\" (= tensorboard) or a list; other Hugging Face integrations (wandb, mlflow, ...) are an error"},
    {"logging_dir", K_PATH, OFF(logging_dir), 0, 0, 0, 0,
     "TensorBoard event directory (\"\": $TENSORBOARD_LOGGING_DIR, else output_dir/runs/<%b%d_%H-%M-%S>_<host> as "
     "transformers; a resume continues the newest run directory there)"},
    /* accepted for portability of TRL configs; they do not change dpoc's numbers */
    {"run_name", K_CUSTOM, 0, 0, 0, set_ignored, 0, "accepted and ignored"},
    {"gradient_checkpointing", K_BOOL, OFF(gradient_checkpointing), 0, 0, 0, 0,
     "keep only each layer's input; recompute a layer's forward in backward (less memory, ~1/3 more compute)"},
    {"use_cpu", K_CUSTOM, 0, 0, 0, set_ignored, 0, "accepted and ignored"},
    {"bf16", K_CUSTOM, 0, 0, 0, set_bf16, get_bf16,
     "false (fp32 products), true (the linear layers' products forward and backward, LM head included, take "
     "bf16 operands and accumulate in fp32: HF autocast's matmuls; weights, gradients, AdamW, norms, attention, "
     "softmax and losses stay fp32) or auto (measure both on the model's shapes at start, keep the faster)"},
    {"fp16", K_CUSTOM, 0, 0, 0, set_must_be_false, 0, "must be false"},
    {"disable_dropout", K_CUSTOM, 0, 0, 0, set_must_be_true, 0, "must be true"},
    /* LoRA: peft's LoraConfig semantics, TRL's ModelConfig names */
    {"use_peft", K_BOOL, OFF(lora.use_peft), 0, 0, 0, 0,
     "train LoRA adapters on a frozen base instead of every weight (the reference: the base, adapters off)"},
    {"lora_r", K_SIZE, OFF(lora.r), 1, 4096, 0, 0, "LoRA rank"},
    {"lora_alpha", K_DOUBLE, OFF(lora.alpha), 1e-30, BIG, 0, 0, "LoRA alpha: the update is scaled by alpha / r"},
    {"lora_dropout", K_DOUBLE, OFF(lora.dropout), 0, 0.999999, 0, 0,
     "dropout on the adapters' input; no effect while disable_dropout is true (TRL's default), as in TRL"},
    {"lora_target_modules", K_CUSTOM, 0, 0, 0, set_lora_targets, get_lora_targets,
     "modules given adapters: a list of names (a module named so, or ending in \".\" + a name), "
     "\"all-linear\" (every projection but the LM head) or a regular expression matching whole module names"},
    {"use_rslora", K_BOOL, OFF(lora.use_rslora), 0, 0, 0, 0, "rank-stabilized LoRA: scale alpha / sqrt(r)"},
    {"init_lora_weights", K_CUSTOM, 0, 0, 0, set_lora_init, get_lora_init,
     "true (A kaiming-uniform, B zeros: the adapter starts as the identity), \"gaussian\" or false (A and B random)"},
    {"lora_bias", K_CUSTOM, 0, 0, 0, set_lora_bias, 0, "must be \"none\" (peft's bias)"},
    {"lora_task_type", K_CUSTOM, 0, 0, 0, set_lora_task, 0, "must be \"CAUSAL_LM\""},
    {"lora_modules_to_save", K_CUSTOM, 0, 0, 0, set_must_be_empty, 0, "not supported yet"},
    {"use_dora", K_CUSTOM, 0, 0, 0, set_use_dora, 0, "must be false"},
    {"adapter_name_or_path", K_PATH, OFF(lora.adapter_name_or_path), 0, 0, 0, 0,
     "a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to continue training; its "
     "r, alpha and targets are used (implies use_peft)"},
    {"base_weights_dtype", K_CUSTOM, 0, 0, 0, set_base_dtype, get_base_dtype,
     "storage of the frozen base with use_peft: fp32, or keep (a GGUF's quantized / half tensors stay mapped as "
     "the file stores them and are dequantized as each product reads them: QLoRA on llama.cpp's formats)"},
};
#define N_KEYS (sizeof KEYS / sizeof KEYS[0])

void dpoc_config_defaults(dpoc_config *c) {
    memset(c, 0, sizeof *c);
    strcpy(c->output_dir, "dpoc-output");
    strcpy(c->chat_template, "auto");
    c->loss.n_types = 1;
    c->loss.types[0] = DPOC_LOSS_SIGMOID;
    c->loss_weights_given = -1;
    for (size_t i = 0; i < DPOC_MAX_LOSS_TYPES; i++) c->loss.weights[i] = 1.0;
    c->loss.beta = 0.1;
    c->loss.f_divergence_type = DPOC_FDIV_REVERSE_KL;
    c->loss.f_alpha_divergence_coef = 0.5;
    c->loss.discopop_tau = 0.05;
    c->learning_rate = 1e-6;
    c->lr_scheduler_type = DPOC_SCHED_LINEAR;
    c->num_cycles = 0.5;
    c->min_lr = -1;
    c->min_lr_rate = -1;
    c->adam_beta1 = 0.9;
    c->adam_beta2 = 0.999;
    c->adam_epsilon = 1e-8;
    c->max_grad_norm = 1.0;
    c->per_device_train_batch_size = 8;
    c->gradient_accumulation_steps = 1;
    c->num_train_epochs = 3.0;
    c->max_steps = -1;
    c->max_length = 1024;
    c->logging_steps = 10;
    c->per_device_eval_batch_size = 8; /* HF's default */
    c->seed = 42;
    c->shuffle = 1;
    c->shared_prefix = 1;
    c->balance_batches = 1;
    c->replica_check_steps = 100;
    c->save_steps = 500;
    c->bucket_size_mb = 25.0;
    c->grad_allreduce = DPOC_ALLREDUCE_AUTO;
    c->collective_timeout_s = 1800.0;
    c->lora.r = 8;       /* peft's defaults */
    c->lora.alpha = 8.0;
    c->lora.targets_kind = DPOC_LORA_TARGETS_LIST;
    c->lora.n_targets = 2;
    strcpy(c->lora.targets[0], "q_proj");
    strcpy(c->lora.targets[1], "v_proj");
}

static const key_def *find_key(const char *name) {
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(KEYS[i].name, name) == 0) return &KEYS[i];
    return NULL;
}

static int apply_one(dpoc_config *c, const char *name, const cJSON *v, const char *where, dpoc_err *err) {
    const key_def *k = find_key(name);
    if (!k) return dpoc_errf(err, DPOC_EINPUT, "%s: unknown config key '%s' (see `dpoc train --help`)", where, name);
    char *base = (char *)c;
    switch (k->kind) {
    case K_PATH:
        if (!cJSON_IsString(v)) return bad_type(k, where, "a string", err);
        if (strlen(v->valuestring) >= DPOC_PATH_MAX) return bad_type(k, where, "a shorter path", err);
        strcpy(base + k->offset, v->valuestring);
        return 0;
    case K_DOUBLE:
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) return bad_type(k, where, "a number", err);
        if (v->valuedouble < k->lo || v->valuedouble > k->hi)
            return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s' = %g is out of range [%g, %g]", where, name,
                             v->valuedouble, k->lo, k->hi);
        *(double *)(base + k->offset) = v->valuedouble;
        return 0;
    case K_SIZE:
    case K_LONG:
        if (!is_integer(v)) return bad_type(k, where, "an integer", err);
        if (v->valuedouble < k->lo || v->valuedouble > k->hi)
            return dpoc_errf(err, DPOC_EINPUT, "%s: config key '%s' = %.0f is out of range [%.0f, %.0f]", where, name,
                             v->valuedouble, k->lo, k->hi);
        if (k->kind == K_SIZE) *(size_t *)(base + k->offset) = (size_t)v->valuedouble;
        else if (k->offset == OFF(seed)) *(unsigned long long *)(base + k->offset) = (unsigned long long)v->valuedouble;
        else *(long *)(base + k->offset) = (long)v->valuedouble;
        return 0;
    case K_BOOL:
        if (!cJSON_IsBool(v)) return bad_type(k, where, "true or false", err);
        *(int *)(base + k->offset) = cJSON_IsTrue(v);
        return 0;
    case K_CUSTOM: return k->set(c, k, v, where, err);
    }
    return 0;
}

int dpoc_config_apply_json(dpoc_config *c, const char *text, const char *where, dpoc_err *err) {
    cJSON *root = cJSON_Parse(text);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t line = 1;
        for (const char *p = text; at && p < at && *p; p++) line += *p == '\n';
        return dpoc_errf(err, DPOC_EINPUT, "%s:%zu: invalid JSON", where, line);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dpoc_errf(err, DPOC_EINPUT, "%s: the config must be a JSON object", where);
    }
    int rc = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        if ((rc = apply_one(c, it->string, it, where, err))) break;
    }
    cJSON_Delete(root);
    return rc;
}

int dpoc_config_load_file(dpoc_config *c, const char *path, dpoc_err *err) {
    char *text = NULL;
    DPOC_TRY(dpoc_read_file(path, &text, NULL, err));
    int rc = dpoc_config_apply_json(c, text, path, err);
    free(text);
    return rc;
}

int dpoc_config_set(dpoc_config *c, const char *assignment, dpoc_err *err) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return dpoc_errf(err, DPOC_EINPUT, "--set '%s': expected key=value", assignment);
    char key[128];
    size_t kl = (size_t)(eq - assignment);
    if (kl >= sizeof key) return dpoc_errf(err, DPOC_EINPUT, "--set: key too long");
    memcpy(key, assignment, kl);
    key[kl] = '\0';
    cJSON *v = cJSON_Parse(eq + 1);
    if (!v) v = cJSON_CreateString(eq + 1); /* a bare word is a string */
    if (!v) return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    int rc = apply_one(c, key, v, "--set", err);
    cJSON_Delete(v);
    return rc;
}

int dpoc_config_finalize(dpoc_config *c, dpoc_err *err) {
    if (!c->model_name_or_path[0])
        return dpoc_errf(err, DPOC_EINPUT, "config key 'model_name_or_path' is required");
    if (!c->train_file[0]) return dpoc_errf(err, DPOC_EINPUT, "config key 'train_file' is required");
    if (c->loss_weights_given >= 0 && (size_t)c->loss_weights_given != c->loss.n_types)
        return dpoc_errf(err, DPOC_EINPUT,
                         "config key 'loss_weights' has %ld weights for %zu loss types; they must match",
                         c->loss_weights_given, c->loss.n_types);
    if (c->loss_weights_given < 0)
        for (size_t i = 0; i < c->loss.n_types; i++) c->loss.weights[i] = 1.0;
    if (c->lr_scheduler_type == DPOC_SCHED_COSINE_MIN_LR) {
        if ((c->min_lr >= 0) == (c->min_lr_rate >= 0))
            return dpoc_errf(err, DPOC_EINPUT,
                             "config key 'lr_scheduler_kwargs': cosine_with_min_lr needs exactly one of min_lr, "
                             "min_lr_rate");
    }
    if (c->lora.adapter_name_or_path[0]) c->lora.use_peft = 1;
    if (c->lora.keep_base && !c->lora.use_peft)
        return dpoc_errf(err, DPOC_EINPUT,
                         "config key 'base_weights_dtype': keep needs use_peft (a kept base is frozen: only adapters train)");
    if (c->eval_steps == 0) c->eval_steps = c->logging_steps; /* HF: eval_steps defaults to logging_steps */
    if ((c->eval_strategy != DPOC_EVAL_NO || c->eval_on_start) && !c->eval_file[0])
        return dpoc_errf(err, DPOC_EINPUT, "config key 'eval_strategy'%s needs 'eval_file' (TRL: an eval_dataset)",
                         c->eval_on_start ? " / 'eval_on_start'" : "");
    if (c->max_steps <= 0 && !(c->num_train_epochs > 0))
        return dpoc_errf(err, DPOC_EINPUT, "config keys 'max_steps' / 'num_train_epochs': one must be > 0");
    return dpoc_loss_cfg_validate(&c->loss, err);
}

void dpoc_config_print_help(FILE *f) {
    dpoc_config d;
    dpoc_config_defaults(&d);
    char *json = dpoc_config_to_json(&d);
    cJSON *defs = cJSON_Parse(json);
    free(json);
    fprintf(f, "Config keys (TRL DPOConfig / HF TrainingArguments names):\n");
    for (size_t i = 0; i < N_KEYS; i++) {
        const cJSON *dv = cJSON_GetObjectItemCaseSensitive(defs, KEYS[i].name);
        char *ds = dv ? cJSON_PrintUnformatted(dv) : NULL;
        fprintf(f, "  %-30s %s%s%s%s\n", KEYS[i].name, KEYS[i].help, ds ? " [default " : "", ds ? ds : "",
                ds ? "]" : "");
        free(ds);
    }
    cJSON_Delete(defs);
}

char *dpoc_config_to_json(const dpoc_config *c) {
    cJSON *o = cJSON_CreateObject();
    const char *base = (const char *)c;
    for (size_t i = 0; i < N_KEYS; i++) {
        const key_def *k = &KEYS[i];
        switch (k->kind) {
        case K_PATH: cJSON_AddStringToObject(o, k->name, base + k->offset); break;
        case K_DOUBLE: cJSON_AddNumberToObject(o, k->name, *(const double *)(base + k->offset)); break;
        case K_SIZE: cJSON_AddNumberToObject(o, k->name, (double)*(const size_t *)(base + k->offset)); break;
        case K_LONG:
            if (k->offset == OFF(seed))
                cJSON_AddNumberToObject(o, k->name, (double)*(const unsigned long long *)(base + k->offset));
            else cJSON_AddNumberToObject(o, k->name, (double)*(const long *)(base + k->offset));
            break;
        case K_BOOL: cJSON_AddBoolToObject(o, k->name, *(const int *)(base + k->offset)); break;
        case K_CUSTOM:
            if (k->get) cJSON_AddItemToObject(o, k->name, k->get(c));
            break;
        }
    }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}
