/* Hugging Face config.json <-> dpoc_model_config (dpoc/model_load.h).
 * Anything the model code does not implement is refused by name rather than
 * silently ignored: a wrong RoPE or window would train a different model. */
#include "dpoc/model_load.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"

static int get_size(const cJSON *root, const char *key, size_t *out, int required, const char *path,
                    dpoc_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) {
        if (required) return dpoc_errf(err, DPOC_EINPUT, "%s: missing required field '%s'", path, key);
        return 0;
    }
    double v = it->valuedouble;
    if (!cJSON_IsNumber(it) || v < 1 || v != floor(v) || v > 1e12)
        return dpoc_errf(err, DPOC_EINPUT, "%s: field '%s' must be a positive integer", path, key);
    *out = (size_t)v;
    return 0;
}

static int get_float(const cJSON *root, const char *key, float *out, const char *path, dpoc_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsNumber(it) || !(it->valuedouble > 0))
        return dpoc_errf(err, DPOC_EINPUT, "%s: field '%s' must be a positive number", path, key);
    *out = (float)it->valuedouble;
    return 0;
}

static int get_bool(const cJSON *root, const char *key, int *out) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (it && cJSON_IsBool(it)) *out = cJSON_IsTrue(it);
    return 0;
}

/* bos/eos/pad may be an int, a list of ints (first is used) or null. */
static int get_token_id(const cJSON *root, const char *key, int *out) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (it && cJSON_IsArray(it)) it = cJSON_GetArrayItem(it, 0);
    if (it && cJSON_IsNumber(it) && it->valuedouble >= 0) *out = (int)it->valuedouble;
    return 0;
}

static int check_rope(const cJSON *root, float *theta, const char *path, dpoc_err *err) {
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    const cJSON *checks[2] = {rs, rp};
    const char *names[2] = {"rope_scaling", "rope_parameters"};
    for (int i = 0; i < 2; i++) {
        const cJSON *o = checks[i];
        if (!o || cJSON_IsNull(o)) continue;
        if (!cJSON_IsObject(o))
            return dpoc_errf(err, DPOC_EINPUT, "%s: field '%s' must be an object or null", path, names[i]);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "rope_type");
        if (!type) type = cJSON_GetObjectItemCaseSensitive(o, "type");
        if (type && (!cJSON_IsString(type) || strcmp(type->valuestring, "default") != 0))
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: field '%s' asks for rope_type '%s'; only the default RoPE is supported", path,
                             names[i], cJSON_IsString(type) ? type->valuestring : "?");
        if (!type && i == 0)
            return dpoc_errf(err, DPOC_EINPUT, "%s: field 'rope_scaling' is set; RoPE scaling is not supported",
                             path);
        DPOC_TRY(get_float(o, "rope_theta", theta, path, err));
    }
    return 0;
}

int dpoc_hf_config_read(dpoc_model_config *cfg, const char *path, dpoc_err *err) {
    memset(cfg, 0, sizeof *cfg);
    size_t len = 0;
    char *text = NULL;
    DPOC_TRY(dpoc_read_file(path, &text, &len, err));
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return dpoc_errf(err, DPOC_EINPUT, "%s: not a JSON object", path);
    }
    int rc = 0;
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const char *arch = NULL;
    if (cJSON_IsArray(archs) && cJSON_IsString(cJSON_GetArrayItem(archs, 0)))
        arch = cJSON_GetArrayItem(archs, 0)->valuestring;
    const char *model_type = cJSON_IsString(mt) ? mt->valuestring : NULL;
    if ((arch && !strcmp(arch, "LlamaForCausalLM")) || (!arch && model_type && !strcmp(model_type, "llama"))) {
        cfg->arch = DPOC_ARCH_LLAMA;
    } else if ((arch && !strcmp(arch, "Qwen2ForCausalLM")) || (!arch && model_type && !strcmp(model_type, "qwen2"))) {
        cfg->arch = DPOC_ARCH_QWEN2;
        cfg->qkv_bias = 1;
    } else {
        rc = dpoc_errf(err, DPOC_EINPUT,
                       "%s: field 'architectures' is '%s' (model_type '%s'); supported: LlamaForCausalLM, "
                       "Qwen2ForCausalLM",
                       path, arch ? arch : "(none)", model_type ? model_type : "(none)");
        goto out;
    }
    if ((rc = get_size(root, "vocab_size", &cfg->vocab_size, 1, path, err))) goto out;
    if ((rc = get_size(root, "hidden_size", &cfg->hidden_size, 1, path, err))) goto out;
    if ((rc = get_size(root, "intermediate_size", &cfg->intermediate_size, 1, path, err))) goto out;
    if ((rc = get_size(root, "num_hidden_layers", &cfg->n_layers, 1, path, err))) goto out;
    if ((rc = get_size(root, "num_attention_heads", &cfg->n_heads, 1, path, err))) goto out;
    cfg->n_kv_heads = cfg->n_heads;
    if ((rc = get_size(root, "num_key_value_heads", &cfg->n_kv_heads, 0, path, err))) goto out;
    cfg->head_dim = cfg->hidden_size / cfg->n_heads;
    if ((rc = get_size(root, "head_dim", &cfg->head_dim, 0, path, err))) goto out;
    cfg->max_position_embeddings = 2048;
    if ((rc = get_size(root, "max_position_embeddings", &cfg->max_position_embeddings, 0, path, err))) goto out;
    cfg->rms_norm_eps = 1e-6f;
    if ((rc = get_float(root, "rms_norm_eps", &cfg->rms_norm_eps, path, err))) goto out;
    cfg->rope_theta = 10000.0f;
    if ((rc = get_float(root, "rope_theta", &cfg->rope_theta, path, err))) goto out;
    if ((rc = check_rope(root, &cfg->rope_theta, path, err))) goto out;
    get_bool(root, "tie_word_embeddings", &cfg->tie_word_embeddings);
    cfg->bos_token_id = cfg->eos_token_id = cfg->pad_token_id = -1;
    get_token_id(root, "bos_token_id", &cfg->bos_token_id);
    get_token_id(root, "eos_token_id", &cfg->eos_token_id);
    get_token_id(root, "pad_token_id", &cfg->pad_token_id);

    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: num_attention_heads (%zu) is not a multiple of num_key_value_heads (%zu)",
                       path, cfg->n_heads, cfg->n_kv_heads);
        goto out;
    }
    if (cfg->head_dim % 2 != 0) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: head_dim %zu must be even for rotary embeddings", path, cfg->head_dim);
        goto out;
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: field 'hidden_act' must be \"silu\"", path);
        goto out;
    }
    int flag = 0;
    if (cfg->arch == DPOC_ARCH_LLAMA) {
        get_bool(root, "attention_bias", &flag);
        if (flag) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: field 'attention_bias' is true; not supported for Llama", path);
            goto out;
        }
    }
    flag = 0;
    get_bool(root, "mlp_bias", &flag);
    if (flag) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: field 'mlp_bias' is true; not supported", path);
        goto out;
    }
    /* Qwen2: a sliding window only matters when use_sliding_window is true and the
     * window is shorter than the sequences we could see. */
    flag = 0;
    get_bool(root, "use_sliding_window", &flag);
    if (flag) {
        size_t window = 0;
        get_size(root, "sliding_window", &window, 0, path, err);
        if (window == 0 || window < cfg->max_position_embeddings) {
            rc = dpoc_errf(err, DPOC_EINPUT,
                           "%s: field 'use_sliding_window' is true (sliding_window %zu); sliding-window attention is "
                           "not supported",
                           path, window);
            goto out;
        }
    }
out:
    cJSON_Delete(root);
    return rc;
}

int dpoc_model_config_json(const dpoc_model_config *c, const char *name_or_path, char **out, size_t *len,
                           dpoc_err *err) {
    const int qwen = c->arch == DPOC_ARCH_QWEN2;
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    cJSON *archs = cJSON_CreateArray();
    ok = ok && archs && cJSON_AddItemToArray(archs, cJSON_CreateString(qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"));
    ok = ok && cJSON_AddItemToObject(root, "architectures", archs);
    if (!ok) cJSON_Delete(archs);
    ok = ok && cJSON_AddStringToObject(root, "model_type", qwen ? "qwen2" : "llama");
    if (name_or_path) ok = ok && cJSON_AddStringToObject(root, "_name_or_path", name_or_path);
#define NUM(key, v) ok = ok && cJSON_AddNumberToObject(root, key, (double)(v))
    NUM("vocab_size", c->vocab_size);
    NUM("hidden_size", c->hidden_size);
    NUM("intermediate_size", c->intermediate_size);
    NUM("num_hidden_layers", c->n_layers);
    NUM("num_attention_heads", c->n_heads);
    NUM("num_key_value_heads", c->n_kv_heads);
    NUM("head_dim", c->head_dim);
    NUM("max_position_embeddings", c->max_position_embeddings);
    NUM("rms_norm_eps", c->rms_norm_eps);
    NUM("rope_theta", c->rope_theta);
    if (c->bos_token_id >= 0) NUM("bos_token_id", c->bos_token_id);
    if (c->eos_token_id >= 0) NUM("eos_token_id", c->eos_token_id);
    if (c->pad_token_id >= 0) NUM("pad_token_id", c->pad_token_id);
#undef NUM
    ok = ok && cJSON_AddStringToObject(root, "hidden_act", "silu");
    ok = ok && cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tie_word_embeddings);
    if (qwen) {
        ok = ok && cJSON_AddBoolToObject(root, "use_sliding_window", 0);
    } else {
        ok = ok && cJSON_AddBoolToObject(root, "attention_bias", 0);
        ok = ok && cJSON_AddBoolToObject(root, "mlp_bias", 0);
    }
    ok = ok && cJSON_AddStringToObject(root, "torch_dtype", "float32");
    char *text = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (!text) return dpoc_errf(err, DPOC_ENOMEM, "out of memory writing config.json");
    *len = strlen(text);
    *out = text;
    return 0;
}
