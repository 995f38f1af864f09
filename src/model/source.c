/* A model from a path: a GGUF file or a Hugging Face directory (dpoc/source.h).
 * The config comes from the GGUF's metadata or config.json, the weights through
 * a tensor source and dpoc_model_from_source. */
#include "dpoc/source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fileutil.h"
#include "dpoc/config.h"
#include "dpoc/finite.h"

/* A model path that is neither: say what was expected. */
static int not_a_model(const char *path, dpoc_err *err) {
    struct stat st;
    if (stat(path, &st) != 0) return dpoc_errf(err, DPOC_EINPUT, "%s: no such file or directory", path);
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: not a model (expected a GGUF file or a Hugging Face directory with config.json)", path);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int hf_config(const char *dir, dpoc_model_config *cfg, dpoc_err *err) {
    char cfg_path[DPOC_PATH_MAX + 16];
    DPOC_TRY(dpoc_path_join(cfg_path, sizeof cfg_path, dir, "config.json", err));
    return dpoc_hf_config_read(cfg, cfg_path, err);
}

int dpoc_source_model_config(const char *path, dpoc_model_config *cfg, dpoc_err *err) {
    if (dpoc_source_is_gguf(path)) {
        dpoc_gguf *g = NULL;
        DPOC_TRY(dpoc_gguf_open(&g, path, err));
        int rc = dpoc_gguf_model_config(g, cfg, err);
        dpoc_gguf_close(g);
        return rc;
    }
    if (!is_dir(path)) return not_a_model(path, err);
    return hf_config(path, cfg, err);
}

static void close_source(void *src) { dpoc_ts_close(src); }

int dpoc_source_load_model_stored(dpoc_model *m, const char *path, dpoc_weight_storage storage, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    dpoc_model_config cfg;
    dpoc_tensor_source *src = NULL;
    int rc = 0;
    if (dpoc_source_is_gguf(path)) {
        DPOC_TRY(dpoc_ts_open_gguf(&src, path, err));
        rc = dpoc_gguf_model_config(dpoc_ts_gguf(src), &cfg, err);
    } else {
        if (!is_dir(path)) return not_a_model(path, err);
        DPOC_TRY(hf_config(path, &cfg, err));
        DPOC_TRY(dpoc_ts_open_safetensors(&src, path, err));
    }
    if (!rc) rc = dpoc_model_from_source(m, &cfg, src, storage, err);
    /* a NaN or an Inf in a file would reach every activation: refuse it here, named */
    if (!rc && (rc = dpoc_model_check_weights(m, path, err))) dpoc_model_free(m);
    /* kept tensors point into the mapping: the model keeps the source open */
    if (!rc && dpoc_model_has_kept(m)) {
        rc = dpoc_model_own(m, src, close_source, err);
        if (rc) dpoc_model_free(m); /* the source is closed by dpoc_model_own */
        return rc;
    }
    dpoc_ts_close(src);
    return rc;
}

int dpoc_source_load_model(dpoc_model *m, const char *path, dpoc_err *err) {
    return dpoc_source_load_model_stored(m, path, DPOC_WEIGHTS_FP32, err);
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
