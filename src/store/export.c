/* dpoc export: a checkpoint's policy as a Hugging Face model directory (see export.h). */
#include "dpoc/export.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <hdf5.h>

#include "core/fileutil.h"
#include "dpoc/lora.h"
#include "dpoc/lora_gguf.h"
#include "dpoc/checkpoint.h"
#include "dpoc/config.h"
#include "dpoc/model.h"
#include "dpoc/safetensors.h"
#include "dpoc/source.h"

/* Tokenizer files, copied from the tokenizer directory when present. */
static const char *const TOKENIZER_FILES[] = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt",     "tokenizer.model",       "added_tokens.json",       "chat_template.jinja",
};
/* Files of the model itself, copied from the model directory when present. */
static const char *const MODEL_FILES[] = {"generation_config.json"};

#define EXPORT_PATH_MAX (DPOC_PATH_MAX + 64)

/* ---- files ---- */

/* dir/.name.tmp and dir/name */
static int tmp_and_final(char *tmp, char *path, const char *dir, const char *name, dpoc_err *err) {
    DPOC_TRY(dpoc_path_join(path, EXPORT_PATH_MAX, dir, name, err));
    if (snprintf(tmp, EXPORT_PATH_MAX, "%s/.%s.tmp", dir, name) >= EXPORT_PATH_MAX)
        return dpoc_errf(err, DPOC_EINPUT, "path too long: %s/.%s.tmp", dir, name);
    return 0;
}

/* 1 when path is a regular file, 0 when it does not exist; an error otherwise */
static int regular_file(const char *path, int *exists, dpoc_err *err) {
    struct stat st;
    *exists = 0;
    if (stat(path, &st) != 0) {
        if (errno == ENOENT) return 0;
        return dpoc_errf(err, DPOC_EINPUT, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) return dpoc_errf(err, DPOC_EINPUT, "%s: not a regular file", path);
    *exists = 1;
    return 0;
}

static int copy_if_present(const char *src_dir, const char *out_dir, const char *name, size_t *copied,
                           dpoc_err *err) {
    char src[EXPORT_PATH_MAX];
    int exists;
    DPOC_TRY(dpoc_path_join(src, sizeof src, src_dir, name, err));
    DPOC_TRY(regular_file(src, &exists, err));
    if (!exists) return 0;
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_read_file(src, &text, &len, err));
    int rc = dpoc_write_file_atomic(out_dir, name, text, len, err);
    free(text);
    if (!rc) (*copied)++;
    return rc;
}

static int same_directory(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* ---- the checkpoint's config ---- */

/* The root attribute "config" (the run's effective config as JSON), parsed. */
static int read_run_config(const char *ckpt, cJSON **out, dpoc_err *err) {
    *out = NULL;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(ckpt, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return dpoc_errf(err, DPOC_EINPUT, "%s: not a readable HDF5 file (truncated or corrupted?)", ckpt);
    hid_t t = H5Tcopy(H5T_C_S1);
    hid_t a = H5Aexists(f, "config") > 0 ? H5Aopen(f, "config", H5P_DEFAULT) : -1;
    char *s = NULL;
    int rc = 0;
    if (t < 0 || H5Tset_size(t, H5T_VARIABLE) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0)
        rc = dpoc_errf(err, DPOC_EINTERNAL, "%s: HDF5 string type setup failed", ckpt);
    else if (a < 0 || H5Aread(a, t, &s) < 0 || !s)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: the checkpoint has no readable 'config' attribute", ckpt);
    else if (!(*out = cJSON_Parse(s)) || !cJSON_IsObject(*out))
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: the 'config' attribute is not a JSON object", ckpt);
    if (rc) {
        cJSON_Delete(*out);
        *out = NULL;
    }
    if (s) H5free_memory(s);
    if (a >= 0) H5Aclose(a);
    if (t >= 0) H5Tclose(t);
    H5Fclose(f);
    return rc;
}

/* A non-empty string key of the run's config, or NULL. */
static const char *config_string(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    return cJSON_IsString(v) && v->valuestring && v->valuestring[0] ? v->valuestring : NULL;
}

/* key: the config key the directory comes from, or NULL for --model-dir */
static int check_dir(const char *dir, const char *ckpt, const char *key, dpoc_err *err) {
    struct stat st;
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
    if (!key) return dpoc_errf(err, DPOC_EINPUT, "--model-dir '%s' is not a directory", dir);
    char cwd[DPOC_PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) snprintf(cwd, sizeof cwd, "?");
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: %s '%s' of the checkpoint's run is not a directory%s%s (a relative path is taken from "
                     "the current directory, as in training; name the model directory with --model-dir)",
                     ckpt, key, dir, dir[0] == '/' ? "" : " under ", dir[0] == '/' ? "" : cwd);
}

/* ---- config.json ---- */

/* The source file is rewritten textually so that everything but the dtype stays
 * byte for byte (cJSON would print 100.0 as 100 and re-indent). The text has been
 * checked to be a JSON object by cJSON, so this scanner may assume valid JSON. */

static int json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* index just past the string whose opening quote is at i */
static size_t json_string_end(const char *s, size_t n, size_t i) {
    for (i++; i < n && s[i] != '"'; i++)
        if (s[i] == '\\') i++;
    return i < n ? i + 1 : n;
}

/* index just past the value starting at i */
static size_t json_value_end(const char *s, size_t n, size_t i) {
    if (i >= n) return n;
    if (s[i] == '"') return json_string_end(s, n, i);
    if (s[i] == '{' || s[i] == '[') {
        int depth = 0;
        while (i < n) {
            if (s[i] == '"') {
                i = json_string_end(s, n, i);
                continue;
            }
            if (s[i] == '{' || s[i] == '[') depth++;
            else if ((s[i] == '}' || s[i] == ']') && --depth == 0) return i + 1;
            i++;
        }
        return n;
    }
    while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && !json_space(s[i])) i++;
    return i;
}

typedef struct {
    size_t begin, end;
} json_span;

/* Spans of the values of the top-level keys "torch_dtype" and "dtype" (in text order). */
static size_t dtype_values(const char *s, size_t n, json_span *spans, size_t max) {
    size_t i = 0, found = 0;
    while (i < n && s[i] != '{') i++;
    i++;
    while (i < n) {
        while (i < n && (json_space(s[i]) || s[i] == ',')) i++;
        if (i >= n || s[i] != '"') break; /* '}' ends the object */
        size_t kb = i + 1, ke = json_string_end(s, n, i);
        i = ke;
        while (i < n && (json_space(s[i]) || s[i] == ':')) i++;
        size_t vb = i, ve = json_value_end(s, n, i);
        const size_t klen = ke - 1 - kb;
        if (((klen == 5 && !memcmp(s + kb, "dtype", 5)) || (klen == 11 && !memcmp(s + kb, "torch_dtype", 11))) &&
            found < max)
            spans[found++] = (json_span){vb, ve};
        i = ve;
    }
    return found;
}

/* The source config.json with torch_dtype / dtype set to the exported dtype: the keys
 * present are updated; with neither, the one the file's transformers version reads
 * is added ("dtype" from transformers 5, "torch_dtype" before). */
static int write_config(const char *src_dir, const char *out_dir, int bf16, dpoc_err *err) {
    char src[EXPORT_PATH_MAX];
    char *text = NULL, *outbuf = NULL;
    size_t len = 0;
    /* a GGUF source: the config.json dpoc writes for it (dtype float32, replaced below) */
    if (dpoc_source_is_gguf(src_dir)) snprintf(src, sizeof src, "%s", src_dir);
    else DPOC_TRY(dpoc_path_join(src, sizeof src, src_dir, "config.json", err));
    DPOC_TRY(dpoc_source_config_json(src_dir, &text, &len, err));
    cJSON *root = cJSON_ParseWithLength(text, len);
    int rc = 0;
    const char *value = bf16 ? "\"bfloat16\"" : "\"float32\"";
    const size_t vlen = strlen(value);
    if (!cJSON_IsObject(root)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: not a JSON object", src);
        goto out;
    }
    json_span spans[8];
    size_t n_spans = dtype_values(text, len, spans, sizeof spans / sizeof spans[0]);
    size_t n_keys = (size_t)cJSON_HasObjectItem(root, "dtype") + (size_t)cJSON_HasObjectItem(root, "torch_dtype");
    if ((n_spans == 0) != (n_keys == 0)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: cannot locate its dtype key (escaped key names?)", src);
        goto out;
    }
    /* room for the text, every replaced value and an added key with indentation */
    size_t cap = len + (n_spans + 1) * (vlen + 32) + 64;
    outbuf = dpoc_malloc(cap, "config.json", err);
    if (!outbuf) {
        rc = DPOC_ENOMEM;
        goto out;
    }
    size_t o = 0;
    if (n_spans) {
        size_t at = 0;
        for (size_t k = 0; k < n_spans; k++) {
            memcpy(outbuf + o, text + at, spans[k].begin - at);
            o += spans[k].begin - at;
            memcpy(outbuf + o, value, vlen);
            o += vlen;
            at = spans[k].end;
        }
        memcpy(outbuf + o, text + at, len - at);
        o += len - at;
    } else {
        const cJSON *tv = cJSON_GetObjectItemCaseSensitive(root, "transformers_version");
        const char *key = cJSON_IsString(tv) && tv->valuestring && atoi(tv->valuestring) >= 5 ? "dtype" : "torch_dtype";
        size_t brace = 0;
        while (text[brace] != '{') brace++;
        size_t ws = brace + 1; /* the first key's indentation, reused for the new one */
        while (ws < len && json_space(text[ws])) ws++;
        const int empty = ws < len && text[ws] == '}';
        if (ws - brace - 1 > 32) ws = brace + 1; /* unusual spacing: none */
        memcpy(outbuf, text, brace + 1);
        o = brace + 1;
        memcpy(outbuf + o, text + brace + 1, ws - brace - 1);
        o += ws - brace - 1;
        o += (size_t)snprintf(outbuf + o, cap - o, "\"%s\": %s%s", key, value, empty ? "" : ",");
        memcpy(outbuf + o, text + brace + 1, len - brace - 1);
        o += len - brace - 1;
    }
    rc = dpoc_write_file_atomic(out_dir, "config.json", outbuf, o, err);
out:
    free(outbuf);
    free(text);
    cJSON_Delete(root);
    return rc;
}

/* ---- model.safetensors ---- */

static int write_weights(const dpoc_model *m, const char *out_dir, int bf16, dpoc_err *err) {
    char tmp[EXPORT_PATH_MAX], path[EXPORT_PATH_MAX];
    DPOC_TRY(tmp_and_final(tmp, path, out_dir, "model.safetensors", err));
    DPOC_TRY(dpoc_model_write_safetensors(m, tmp, bf16, err));
    return dpoc_commit_file(tmp, path, err);
}

/* ---- export ---- */

int dpoc_export_checkpoint_ex(const char *ckpt, const char *model_dir, const char *out_dir, int bf16,
                              dpoc_export_info *info, dpoc_err *err) {
    const dpoc_export_opts o = {model_dir, bf16, 0, NULL};
    return dpoc_export_checkpoint_opts(ckpt, out_dir, &o, info, err);
}

/* A LoRA checkpoint's adapter as a PEFT directory or a llama.cpp adapter GGUF. */
static int write_adapter(const dpoc_model *m, const dpoc_lora_cfg *lc, const char *base, const char *out_dir,
                         const char *gguf_lora, dpoc_err *err) {
    if (gguf_lora) return dpoc_lora_save_gguf(m, lc, gguf_lora, err);
    return dpoc_lora_save_peft(m, lc, base, out_dir, err);
}

int dpoc_export_checkpoint_opts(const char *ckpt, const char *out_dir, const dpoc_export_opts *opts,
                                dpoc_export_info *info, dpoc_err *err) {
    const char *model_dir = opts->model_dir;
    const int bf16 = opts->bf16;
    DPOC_CHECK(ckpt && out_dir, err);
    if (!ckpt[0]) return dpoc_errf(err, DPOC_EINPUT, "no checkpoint file given");
    if (!out_dir[0]) return dpoc_errf(err, DPOC_EINPUT, "no output directory given");
    if (info) memset(info, 0, sizeof *info);
    DPOC_TRY(dpoc_ckpt_verify(ckpt, err));
    long step = 0;
    DPOC_TRY(dpoc_ckpt_step(ckpt, &step, err));

    cJSON *cfg = NULL;
    DPOC_TRY(read_run_config(ckpt, &cfg, err));
    dpoc_model m;
    memset(&m, 0, sizeof m);
    int rc = 0;
    char mdir[DPOC_PATH_MAX], tdir[DPOC_PATH_MAX], cfg_path[EXPORT_PATH_MAX];
    const char *from_cfg = config_string(cfg, "model_name_or_path");
    const char *tok = config_string(cfg, "tokenizer_name_or_path");
    if (!model_dir && !from_cfg) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: the checkpoint's config names no model_name_or_path", ckpt);
        goto out;
    }
    snprintf(mdir, sizeof mdir, "%s", model_dir ? model_dir : from_cfg);
    if (model_dir) tok = NULL; /* --model-dir names the whole source: tokenizer files too */
    snprintf(tdir, sizeof tdir, "%s", tok ? tok : mdir);
    const int gguf = dpoc_source_is_gguf(mdir);
    if (!gguf && (rc = check_dir(mdir, ckpt, model_dir ? NULL : "model_name_or_path", err))) goto out;
    if (tok && !dpoc_source_is_gguf(tdir) && (rc = check_dir(tdir, ckpt, "tokenizer_name_or_path", err))) goto out;
    if (same_directory(out_dir, mdir) || same_directory(out_dir, tdir)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: is the source model directory of %s; export to another directory",
                       out_dir, ckpt);
        goto out;
    }

    int lora = 0;
    dpoc_lora_cfg lc;
    if ((rc = dpoc_ckpt_lora(ckpt, &lora, &lc, err))) goto out;
    if (!lora && (opts->merge || opts->gguf_lora)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: not a LoRA run's checkpoint (--merge and --gguf-lora need adapters)", ckpt);
        goto out;
    }
    /* the model's table from the source config.json, the weights from the
     * checkpoint (a LoRA checkpoint's adapters over the source's own weights) */
    dpoc_model_config mc;
    if (gguf) snprintf(cfg_path, sizeof cfg_path, "%s", mdir);
    else if ((rc = dpoc_path_join(cfg_path, sizeof cfg_path, mdir, "config.json", err))) goto out;
    if ((rc = dpoc_source_model_config(mdir, &mc, err))) goto out;
    if ((rc = lora ? dpoc_source_load_model(&m, mdir, err) : dpoc_model_init(&m, &mc, err))) goto out;
    if ((rc = dpoc_ckpt_read_weights(ckpt, &m, err))) {
        dpoc_err_prefix(err, "with the model of %s", cfg_path);
        goto out;
    }
    if (info) info->lora = lora;
    if (lora && !opts->merge) {
        rc = write_adapter(&m, &lc, mdir, out_dir, opts->gguf_lora, err);
        if (!rc && info) {
            info->step = step;
            for (size_t i = 0; i < m.n_tensors; i++) info->n_tensors += m.info[i].trainable != 0;
            info->n_params = m.numel;
            snprintf(info->model_dir, sizeof info->model_dir, "%s", mdir);
        }
        goto out;
    }
    if (lora) { /* --merge: the base with the adapters merged in, as a plain model */
        dpoc_model merged;
        if ((rc = dpoc_lora_merge(&m, &merged, err))) goto out;
        dpoc_model_free(&m);
        m = merged;
    }

    if ((rc = dpoc_mkdirs(out_dir, err))) goto out;
    size_t copied = 0;
    if ((rc = write_weights(&m, out_dir, bf16, err))) goto out;
    if ((rc = write_config(mdir, out_dir, bf16, err))) goto out;
    /* a GGUF holds its tokenizer: the exported config.json names it in _name_or_path */
    for (size_t i = 0; !gguf && !rc && i < sizeof MODEL_FILES / sizeof MODEL_FILES[0]; i++)
        rc = copy_if_present(mdir, out_dir, MODEL_FILES[i], &copied, err);
    for (size_t i = 0; !dpoc_source_is_gguf(tdir) && !rc && i < sizeof TOKENIZER_FILES / sizeof TOKENIZER_FILES[0]; i++)
        rc = copy_if_present(tdir, out_dir, TOKENIZER_FILES[i], &copied, err);
    if (!rc) rc = dpoc_fsync_path(out_dir, 1, err);
    if (!rc && info) {
        info->step = step;
        info->n_tensors = m.n_tensors;
        info->n_params = m.numel;
        info->n_copied = copied;
        snprintf(info->model_dir, sizeof info->model_dir, "%s", mdir);
    }
out:
    if (m.info) dpoc_model_free(&m);
    cJSON_Delete(cfg);
    return rc;
}

int dpoc_export_checkpoint(const char *ckpt, const char *out_dir, int bf16, dpoc_err *err) {
    return dpoc_export_checkpoint_ex(ckpt, NULL, out_dir, bf16, NULL, err);
}

int dpoc_ckpt_run_source(const char *ckpt, char *model, size_t model_n, char *tok, size_t tok_n, dpoc_err *err) {
    cJSON *cfg = NULL;
    DPOC_TRY(read_run_config(ckpt, &cfg, err));
    const char *m = config_string(cfg, "model_name_or_path");
    const char *t = config_string(cfg, "tokenizer_name_or_path");
    int rc = 0;
    if (!m) rc = dpoc_errf(err, DPOC_EINPUT, "%s: the checkpoint's config names no model_name_or_path", ckpt);
    else if ((size_t)snprintf(model, model_n, "%s", m) >= model_n || (size_t)snprintf(tok, tok_n, "%s", t ? t : m) >= tok_n)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: model path too long", ckpt);
    cJSON_Delete(cfg);
    return rc;
}
