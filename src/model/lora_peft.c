/* PEFT adapter directories: reading and writing peft's adapter_config.json and
 * adapter_model.safetensors (dpoc/lora.h). Key names: "base_model.model." + the
 * table name (model.layers.N.self_attn.q_proj.lora_A.weight), no adapter name,
 * A as (r, in), B as (out, r) - peft's save_and_load. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/lora.h"
#include "dpoc/safetensors.h"
#include "model/lora_internal.h"

#define ADAPTER_CONFIG "adapter_config.json"
#define ADAPTER_WEIGHTS "adapter_model.safetensors"
/* A peft key: the prefix and a table name. */
#define PEFT_KEY_MAX (DPOC_PARAM_NAME_MAX + 32)

static const cJSON *item(const cJSON *o, const char *k) { return cJSON_GetObjectItemCaseSensitive(o, k); }

/* A key that must be absent, null, false, empty ({} / [] / "") to mean "not used". */
static int unused(const cJSON *v) {
    return !v || cJSON_IsNull(v) || cJSON_IsFalse(v) || ((cJSON_IsObject(v) || cJSON_IsArray(v)) && !v->child) ||
           (cJSON_IsString(v) && !v->valuestring[0]);
}

static int parse_peft_config(dpoc_lora_cfg *cfg, const cJSON *root, const char *path, dpoc_err *err) {
    if (!cJSON_IsObject(root)) return dpoc_errf(err, DPOC_EINPUT, "%s: not a JSON object", path);
    const cJSON *v = item(root, "peft_type");
    if (!cJSON_IsString(v) || strcmp(v->valuestring, "LORA") != 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'peft_type' must be \"LORA\"", path);
    v = item(root, "r");
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble != floor(v->valuedouble) || v->valuedouble > 4096)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'r' must be an integer in [1, 4096]", path);
    cfg->r = (size_t)v->valuedouble;
    v = item(root, "lora_alpha");
    if (!cJSON_IsNumber(v) || !(v->valuedouble > 0) || !isfinite(v->valuedouble))
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'lora_alpha' must be a positive number", path);
    cfg->alpha = v->valuedouble;
    v = item(root, "use_rslora");
    if (v && !cJSON_IsBool(v)) return dpoc_errf(err, DPOC_EINPUT, "%s: key 'use_rslora' must be true or false", path);
    cfg->use_rslora = cJSON_IsTrue(v);
    v = item(root, "lora_dropout");
    cfg->dropout = cJSON_IsNumber(v) ? v->valuedouble : 0.0;
    v = item(root, "bias");
    if (v && !(cJSON_IsString(v) && strcmp(v->valuestring, "none") == 0))
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'bias' must be \"none\" (trained biases are not supported)", path);
    static const char *const NOT_SUPPORTED[] = {"use_dora",      "fan_in_fan_out",  "rank_pattern",     "alpha_pattern",
                                                "modules_to_save", "layers_to_transform", "layer_replication",
                                                "trainable_token_indices", "target_parameters", "lora_bias"};
    for (size_t i = 0; i < sizeof NOT_SUPPORTED / sizeof NOT_SUPPORTED[0]; i++)
        if (!unused(item(root, NOT_SUPPORTED[i])))
            return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is set; dpoc does not support it", path, NOT_SUPPORTED[i]);
    v = item(root, "target_modules");
    if (cJSON_IsString(v)) {
        if (strlen(v->valuestring) >= DPOC_LORA_TARGET_MAX)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'target_modules' is too long", path);
        const int all = strcmp(v->valuestring, "all-linear") == 0;
        cfg->targets_kind = all ? DPOC_LORA_TARGETS_ALL_LINEAR : DPOC_LORA_TARGETS_REGEX;
        cfg->n_targets = all ? 0 : 1;
        strcpy(cfg->targets[0], v->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(v) || !v->child)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'target_modules' must be a string or a list of names", path);
    /* peft writes every adapted module's full name: a long list is kept only in
     * the tensors (loading takes the adapters from them) */
    cfg->targets_kind = DPOC_LORA_TARGETS_LIST;
    cfg->n_targets = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, v) {
        if (!cJSON_IsString(it) || !it->valuestring[0])
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'target_modules' must list module names", path);
        if (cfg->n_targets < DPOC_LORA_MAX_TARGETS && strlen(it->valuestring) < DPOC_LORA_TARGET_MAX)
            strcpy(cfg->targets[cfg->n_targets++], it->valuestring);
    }
    return 0;
}

int dpoc_lora_read_peft_config(dpoc_lora_cfg *cfg, const char *dir, dpoc_err *err) {
    char path[DPOC_PATH_MAX + 32];
    DPOC_TRY(dpoc_path_join(path, sizeof path, dir, ADAPTER_CONFIG, err));
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_read_file(path, &text, &len, err));
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root) return dpoc_errf(err, DPOC_EINPUT, "%s: invalid JSON", path);
    int rc = parse_peft_config(cfg, root, path, err);
    cJSON_Delete(root);
    return rc;
}

static int peft_key(char *out, size_t n, const char *name, dpoc_err *err) {
    if (snprintf(out, n, "%s%s", DPOC_PEFT_KEY_PREFIX, name) >= (int)n)
        return dpoc_errf(err, DPOC_EINTERNAL, "tensor name too long: %s", name);
    return 0;
}

/* Fills m's adapter rows (trainable rows) from the open safetensors file. */
static int read_adapters(dpoc_model *m, const st_model *st, const char *path, dpoc_err *err) {
    size_t used = 0;
    char key[PEFT_KEY_MAX];
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        if (!p->trainable) continue;
        DPOC_TRY(peft_key(key, sizeof key, p->name, err));
        const st_tensor *t = st_find(st, key);
        if (!t) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is missing", path, key);
        if (st_read_f32(t, m->params + p->offset, p->ndim, p->shape, err)) {
            dpoc_err_prefix(err, "%s", path);
            return DPOC_EINPUT;
        }
        used++;
    }
    if (used == st->n_tensors) return 0;
    /* a tensor we would not use: another architecture or targets than its config says */
    for (size_t j = 0; j < st->n_tensors; j++) {
        const char *name = st->tensors[j].name;
        int known = 0;
        for (size_t i = 0; i < m->n_tensors && !known; i++)
            known = m->info[i].trainable && !strncmp(name, DPOC_PEFT_KEY_PREFIX, strlen(DPOC_PEFT_KEY_PREFIX)) &&
                    !strcmp(name + strlen(DPOC_PEFT_KEY_PREFIX), m->info[i].name);
        if (!known) return dpoc_errf(err, DPOC_EINPUT, "%s: unexpected tensor '%s'", path, name);
    }
    return 0;
}

/* Whether the file has peft's key for a table name (the adapters are where the tensors are). */
static int has_peft_tensor(void *ctx, const char *name) {
    char key[PEFT_KEY_MAX];
    if (snprintf(key, sizeof key, "%s%s", DPOC_PEFT_KEY_PREFIX, name) >= (int)sizeof key) return 0;
    return st_find((const st_model *)ctx, key) != NULL;
}

int dpoc_lora_load_peft(dpoc_model *m, const char *dir, dpoc_lora_cfg *cfg_out, dpoc_err *err) {
    dpoc_lora_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.init = DPOC_LORA_INIT_DEFAULT;
    DPOC_TRY(dpoc_lora_read_peft_config(&cfg, dir, err));
    char path[DPOC_PATH_MAX + 32];
    DPOC_TRY(dpoc_path_join(path, sizeof path, dir, ADAPTER_WEIGHTS, err));
    st_model st;
    memset(&st, 0, sizeof st);
    DPOC_TRY(st_open_file(&st, path, err));
    int rc = dpoc_lora_attach_named(m, &cfg, has_peft_tensor, &st, err);
    if (rc) dpoc_err_prefix(err, "%s", path);
    else rc = read_adapters(m, &st, path, err);
    st_close(&st);
    if (!rc && cfg_out) *cfg_out = cfg;
    return rc;
}

/* 1 when projection p of layer l carries an adapter. */
static int adapted(const dpoc_model *m, size_t l, size_t p) {
    const dpoc_layer *L = &m->layers[l];
    const dpoc_linear *proj[LORA_PROJECTIONS] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    return proj[p]->lora.r > 0;
}

/* adapter_config.json as peft writes it, with the keys a loader reads. */
static char *peft_config_json(const dpoc_model *m, const dpoc_lora_cfg *cfg, const char *base) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "peft_type", "LORA");
    cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
    cJSON_AddStringToObject(o, "base_model_name_or_path", base ? base : "");
    cJSON_AddNumberToObject(o, "r", (double)cfg->r);
    cJSON_AddNumberToObject(o, "lora_alpha", cfg->alpha);
    cJSON_AddNumberToObject(o, "lora_dropout", cfg->dropout);
    cJSON_AddBoolToObject(o, "use_rslora", cfg->use_rslora);
    cJSON_AddStringToObject(o, "bias", "none");
    cJSON_AddBoolToObject(o, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(o, "use_dora", 0);
    cJSON_AddBoolToObject(o, "inference_mode", 1);
    cJSON_AddNullToObject(o, "modules_to_save");
    cJSON_AddItemToObject(o, "rank_pattern", cJSON_CreateObject());
    cJSON_AddItemToObject(o, "alpha_pattern", cJSON_CreateObject());
    cJSON_AddBoolToObject(o, "init_lora_weights", cfg->init == DPOC_LORA_INIT_DEFAULT);
    /* the adapted projections: by their short names when every layer has the
     * same ones (as a user writes them), else every module's full name (as peft
     * writes them) */
    static const char *const SHORT[LORA_PROJECTIONS] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"};
    const size_t L = m->cfg.n_layers;
    int uniform = 1;
    for (size_t l = 1; l < L; l++)
        for (size_t p = 0; p < LORA_PROJECTIONS; p++) uniform &= adapted(m, l, p) == adapted(m, 0, p);
    cJSON *targets = cJSON_CreateArray();
    char module[LORA_MODULE_NAME_MAX];
    for (size_t l = 0; l < (uniform ? 1 : L); l++)
        for (size_t p = 0; p < LORA_PROJECTIONS; p++) {
            if (!adapted(m, l, p)) continue;
            lora_module_name(module, sizeof module, l, p);
            cJSON_AddItemToArray(targets, cJSON_CreateString(uniform ? SHORT[p] : module));
        }
    cJSON_AddItemToObject(o, "target_modules", targets);
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

int dpoc_lora_save_peft(const dpoc_model *m, const dpoc_lora_cfg *cfg, const char *base, const char *dir,
                        dpoc_err *err) {
    if (!m->frozen) return dpoc_errf(err, DPOC_EINTERNAL, "the model carries no adapters");
    DPOC_TRY(dpoc_mkdirs(dir, err));
    const size_t n = m->n_tensors;
    char(*keys)[PEFT_KEY_MAX] = dpoc_malloc(n * sizeof *keys, "adapter names", err);
    const char **names = dpoc_malloc(n * sizeof *names, "adapter names", err);
    const float **data = dpoc_malloc(n * sizeof *data, "adapter table", err);
    size_t *ndims = dpoc_malloc(n * sizeof *ndims, "adapter table", err);
    size_t(*shapes)[ST_MAX_DIMS] = dpoc_calloc(n, sizeof *shapes, "adapter table", err);
    char *json = NULL;
    int rc = DPOC_ENOMEM;
    if (keys && names && data && ndims && shapes) {
        size_t k = 0;
        rc = 0;
        for (size_t i = 0; i < n && !rc; i++) {
            const dpoc_param_info *p = &m->info[i];
            if (!p->trainable) continue;
            rc = peft_key(keys[k], sizeof keys[k], p->name, err);
            names[k] = keys[k];
            data[k] = m->params + p->offset;
            ndims[k] = p->ndim;
            shapes[k][0] = p->shape[0];
            shapes[k][1] = p->shape[1];
            k++;
        }
        char path[DPOC_PATH_MAX + 32], tmp[DPOC_PATH_MAX + 40];
        if (!rc && (snprintf(path, sizeof path, "%s/%s", dir, ADAPTER_WEIGHTS) >= (int)sizeof path ||
                    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, ADAPTER_WEIGHTS) >= (int)sizeof tmp))
            rc = dpoc_errf(err, DPOC_EINPUT, "path too long: %s", dir);
        if (!rc) rc = st_write_f32(tmp, k, names, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, err);
        if (!rc) rc = dpoc_commit_file(tmp, path, err);
        if (!rc && !(json = peft_config_json(m, cfg, base))) rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory");
        if (!rc) rc = dpoc_write_file_atomic(dir, ADAPTER_CONFIG, json, strlen(json), err);
        if (!rc) rc = dpoc_fsync_path(dir, 1, err);
    }
    free(json);
    free(keys);
    free(names);
    free(data);
    free(ndims);
    free(shapes);
    return rc;
}
