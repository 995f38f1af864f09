/* The tokenizer of a model path (dpoc/tokenizer_source.h): a GGUF's metadata or a
 * Hugging Face directory's tokenizer.json. */
#include "dpoc/tokenizer_source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/config.h"
#include "dpoc/tensor_source.h"

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
