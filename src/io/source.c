/* Model and tokenizer from a GGUF file or a Hugging Face directory (dpoc/source.h). */
#include "dpoc/source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/config.h"
#include "dpoc/gguf.h"

int dpoc_source_is_gguf(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    char magic[4] = {0};
    size_t n = fread(magic, 1, sizeof magic, f);
    fclose(f);
    return n == sizeof magic && memcmp(magic, "GGUF", sizeof magic) == 0;
}

/* A model path that is neither: say what was expected. */
static int not_a_model(const char *path, dpoc_err *err) {
    struct stat st;
    if (stat(path, &st) != 0) return dpoc_errf(err, DPOC_EINPUT, "%s: no such file or directory", path);
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: not a model (expected a GGUF file or a Hugging Face directory with config.json)", path);
}

int dpoc_source_model_config(const char *path, dpoc_model_config *cfg, dpoc_err *err) {
    if (dpoc_source_is_gguf(path)) {
        dpoc_gguf *g = NULL;
        DPOC_TRY(dpoc_gguf_open(&g, path, err));
        int rc = dpoc_gguf_model_config(g, cfg, err);
        dpoc_gguf_close(g);
        return rc;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) return not_a_model(path, err);
    char cfg_path[DPOC_PATH_MAX + 16];
    DPOC_TRY(dpoc_path_join(cfg_path, sizeof cfg_path, path, "config.json", err));
    return dpoc_hf_config_read(cfg, cfg_path, err);
}

int dpoc_source_load_model(dpoc_model *m, const char *path, dpoc_err *err) {
    if (dpoc_source_is_gguf(path)) return dpoc_gguf_load_model(m, path, err);
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        memset(m, 0, sizeof *m);
        return not_a_model(path, err);
    }
    return dpoc_model_load(m, path, err);
}

static int tokenizer_from_gguf(dpoc_tokenizer **tok, const char *path, dpoc_err *err) {
    dpoc_gguf *g = NULL;
    dpoc_tokenizer_spec spec;
    int rc = dpoc_gguf_open(&g, path, err);
    if (!rc) rc = dpoc_gguf_tokenizer_spec(g, &spec, err);
    if (!rc) rc = dpoc_tokenizer_from_spec(tok, &spec, err); /* copies what it keeps */
    dpoc_gguf_close(g);
    return rc;
}

/* "_name_or_path" of dir/config.json when it names a GGUF file, else "". */
static int gguf_named_in_config(const char *dir, char *out, size_t n, dpoc_err *err) {
    out[0] = 0;
    char path[DPOC_PATH_MAX + 16];
    DPOC_TRY(dpoc_path_join(path, sizeof path, dir, "config.json", err));
    char *text = NULL;
    size_t len = 0;
    dpoc_err ignored;
    if (dpoc_read_file(path, &text, &len, &ignored)) return 0;
    cJSON *root = cJSON_ParseWithLength(text, len);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "_name_or_path");
    if (cJSON_IsString(v) && v->valuestring && dpoc_source_is_gguf(v->valuestring))
        snprintf(out, n, "%s", v->valuestring);
    cJSON_Delete(root);
    free(text);
    return 0;
}

int dpoc_source_load_tokenizer(dpoc_tokenizer **tok, const char *path, dpoc_err *err) {
    *tok = NULL;
    if (dpoc_source_is_gguf(path)) return tokenizer_from_gguf(tok, path, err);
    char p[DPOC_PATH_MAX + 32];
    DPOC_TRY(dpoc_path_join(p, sizeof p, path, "tokenizer.json", err));
    struct stat st;
    if (stat(p, &st) == 0) return dpoc_tokenizer_load(tok, path, err);
    char gguf[DPOC_PATH_MAX];
    DPOC_TRY(gguf_named_in_config(path, gguf, sizeof gguf, err));
    if (gguf[0]) return tokenizer_from_gguf(tok, gguf, err);
    return 0;
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

int dpoc_source_config_json(const char *src, char **out, size_t *len, dpoc_err *err) {
    *out = NULL;
    if (dpoc_source_is_gguf(src)) {
        dpoc_model_config cfg;
        DPOC_TRY(dpoc_source_model_config(src, &cfg, err));
        char abs[DPOC_PATH_MAX];
        if (!realpath(src, abs)) snprintf(abs, sizeof abs, "%s", src);
        return dpoc_model_config_json(&cfg, abs, out, len, err);
    }
    char path[DPOC_PATH_MAX + 16];
    DPOC_TRY(dpoc_path_join(path, sizeof path, src, "config.json", err));
    return dpoc_read_file(path, out, len, err);
}
