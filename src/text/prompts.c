/* Prompt lists (dpoc/prompts.h). */
#include "dpoc/prompts.h"

#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"


static int push_prompt(char ***v, size_t *n, size_t *cap, const char *s, size_t len, dpoc_err *err) {
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 64;
        char **nv = realloc(*v, c * sizeof *nv);
        if (!nv) return dpoc_errf(err, DPOC_ENOMEM, "out of memory reading prompts");
        *v = nv, *cap = c;
    }
    char *d = malloc(len + 1);
    if (!d) return dpoc_errf(err, DPOC_ENOMEM, "out of memory reading prompts");
    memcpy(d, s, len);
    d[len] = 0;
    (*v)[(*n)++] = d;
    return 0;
}

static int parse_array(const char *path, const char *text, size_t len, char ***v, size_t *n, size_t *cap,
                       dpoc_err *err) {
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsArray(root)) {
        cJSON_Delete(root);
        return dpoc_errf(err, DPOC_EINPUT, "%s: not a JSON array of strings", path);
    }
    int rc = 0;
    size_t i = 0;
    for (const cJSON *it = root->child; it && !rc; it = it->next, i++) {
        if (!cJSON_IsString(it) || !it->valuestring[0])
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: element %zu is not a non-empty string", path, i);
        else
            rc = push_prompt(v, n, cap, it->valuestring, strlen(it->valuestring), err);
    }
    cJSON_Delete(root);
    return rc;
}

int dpoc_prompts_read(const char *path, char ***prompts, size_t *n, dpoc_err *err) {
    char *text = NULL;
    size_t len = 0;
    *prompts = NULL;
    *n = 0;
    DPOC_TRY(dpoc_read_file(path, &text, &len, err));
    int rc = dpoc_prompts_parse(text, len, path, prompts, n, err);
    free(text);
    return rc;
}

int dpoc_prompts_parse(const char *text, size_t len, const char *path, char ***prompts, size_t *n_out,
                       dpoc_err *err) {
    *prompts = NULL;
    *n_out = 0;
    size_t n = 0, cap = 0;
    char **v = NULL;
    size_t first = 0;
    while (first < len && (text[first] == ' ' || text[first] == '\n' || text[first] == '\t' || text[first] == '\r'))
        first++;
    int rc = 0;
    if (first < len && text[first] == '[') {
        rc = parse_array(path, text, len, &v, &n, &cap, err);
    } else {
        size_t lineno = 0;
        for (size_t at = 0; at < len && !rc;) {
            size_t end = at;
            while (end < len && text[end] != '\n') end++;
            lineno++;
            size_t e = end;
            while (e > at && (text[e - 1] == '\r' || text[e - 1] == ' ' || text[e - 1] == '\t')) e--;
            size_t b = at;
            while (b < e && (text[b] == ' ' || text[b] == '\t')) b++;
            if (b < e && (text[b] == '{' || text[b] == '"')) {
                cJSON *o = cJSON_ParseWithLength(text + b, e - b);
                const cJSON *p = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, "prompt") : o;
                if (!cJSON_IsString(p) || !p->valuestring[0])
                    rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: expected {\"prompt\": \"...\"} or a JSON string", path,
                                   lineno);
                else
                    rc = push_prompt(&v, &n, &cap, p->valuestring, strlen(p->valuestring), err);
                cJSON_Delete(o);
            } else if (b < e && memchr(text + b, '\0', e - b)) {
                rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: the line holds a NUL byte", path, lineno);
            } else if (b < e) {
                rc = push_prompt(&v, &n, &cap, text + b, e - b, err);
            }
            at = end + 1;
        }
    }
    if (!rc && !n) rc = dpoc_errf(err, DPOC_EINPUT, "%s: no prompts", path);
    if (rc) {
        dpoc_prompts_free(v, n);
        return rc;
    }
    *prompts = v;
    *n_out = n;
    return 0;
}

void dpoc_prompts_free(char **prompts, size_t n) {
    for (size_t i = 0; i < n; i++) free(prompts[i]);
    free(prompts);
}

