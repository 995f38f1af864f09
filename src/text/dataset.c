/* Pre-tokenized preference pairs and their collation. */
#include "dpoc/dataset.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static int reserve(void **p, size_t *cap, size_t need, size_t elem, dpoc_err *err) {
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q) return dpoc_errf(err, DPOC_ENOMEM, "out of memory reading the dataset");
    *p = q;
    *cap = n;
    return 0;
}

static const char *const KEY_NAMES[3][2] = {
    {"prompt_input_ids", "prompt_ids"},
    {"chosen_input_ids", "chosen_ids"},
    {"rejected_input_ids", "rejected_ids"},
};

int dpoc_dataset_parse_line(dpoc_dataset *d, const char *line, size_t len, size_t lineno, const char *where,
                            size_t vocab_size, dpoc_err *err) {
    cJSON *root = cJSON_ParseWithLength(line, len);
    if (!root) return dpoc_errf(err, DPOC_EINPUT, "%s:%zu: malformed JSON", where, lineno);
    int rc = 0;
    if (!cJSON_IsObject(root)) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: expected a JSON object", where, lineno);
        goto out;
    }
    size_t offs[3], lens[3];
    for (int f = 0; f < 3; f++) {
        const char *used = KEY_NAMES[f][0];
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(root, used);
        if (!arr) arr = cJSON_GetObjectItemCaseSensitive(root, used = KEY_NAMES[f][1]);
        if (!arr) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: missing key '%s'", where, lineno, KEY_NAMES[f][0]);
            goto out;
        }
        if (!cJSON_IsArray(arr)) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: key '%s' must be a list of token ids", where, lineno, used);
            goto out;
        }
        size_t n = (size_t)cJSON_GetArraySize(arr);
        if (n == 0 && f > 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: key '%s' is empty (a completion needs at least one token)",
                           where, lineno, used);
            goto out;
        }
        if ((rc = reserve((void **)&d->tokens, &d->cap_tokens, d->n_tokens + n, sizeof(int32_t), err))) goto out;
        offs[f] = d->n_tokens;
        lens[f] = n;
        const cJSON *it;
        size_t i = 0;
        cJSON_ArrayForEach(it, arr) {
            double v = cJSON_IsNumber(it) ? it->valuedouble : -1.0;
            if (!cJSON_IsNumber(it) || v != floor(v) || v < 0 || v >= (double)vocab_size) {
                rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: key '%s' item %zu is not a token id in [0, %zu)", where,
                               lineno, used, i, vocab_size);
                goto out;
            }
            d->tokens[d->n_tokens + i] = (int32_t)v;
            i++;
        }
        d->n_tokens += n;
    }
    if (lens[1] == lens[2] && memcmp(d->tokens + offs[1], d->tokens + offs[2], lens[1] * sizeof(int32_t)) == 0) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: chosen and rejected are identical", where, lineno);
        goto out;
    }
    if ((rc = reserve((void **)&d->pairs, &d->cap_pairs, d->n_pairs + 1, sizeof(dpoc_pair), err))) goto out;
    d->pairs[d->n_pairs++] = (dpoc_pair){offs[0], lens[0], offs[1], lens[1], offs[2], lens[2], lineno};
out:
    cJSON_Delete(root);
    return rc;
}

int dpoc_dataset_load_pretokenized(dpoc_dataset *d, const char *path, size_t vocab_size, long max_length,
                                   int keep_end, dpoc_err *err) {
    memset(d, 0, sizeof *d);
    FILE *f = fopen(path, "rb");
    if (!f) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, lineno = 0;
    ssize_t n;
    int rc = 0;
    while ((n = getline(&line, &cap, f)) >= 0) {
        lineno++;
        size_t len = (size_t)n;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
        if (len == 0) continue; /* blank lines are allowed in JSONL */
        if (memchr(line, '\0', len)) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: NUL byte in line", path, lineno);
            break;
        }
        if ((rc = dpoc_dataset_parse_line(d, line, len, lineno, path, vocab_size, err))) break;
        dpoc_pair *p = &d->pairs[d->n_pairs - 1];
        if (max_length > 0 && !keep_end && p->prompt_len >= (size_t)max_length) {
            d->n_pairs--; /* TRL drops rows whose prompt alone fills max_length */
            d->n_dropped_prompt_too_long++;
        }
    }
    if (!rc && ferror(f)) rc = dpoc_errf(err, DPOC_EIO, "%s: read error", path);
    free(line);
    fclose(f);
    if (!rc && d->n_pairs == 0) rc = dpoc_errf(err, DPOC_EINPUT, "%s: no usable pairs", path);
    if (rc) dpoc_dataset_free(d);
    return rc;
}

void dpoc_dataset_free(dpoc_dataset *d) {
    free(d->tokens);
    free(d->pairs);
    memset(d, 0, sizeof *d);
}

void dpoc_dataset_collate(const dpoc_dataset *d, size_t pair, int rejected, long max_length, int keep_end,
                          int32_t *buf, dpoc_seq *seq) {
    const dpoc_pair *p = &d->pairs[pair];
    size_t plen = p->prompt_len;
    size_t clen = rejected ? p->rejected_len : p->chosen_len;
    const int32_t *prompt = d->tokens + p->prompt_off;
    const int32_t *comp = d->tokens + (rejected ? p->rejected_off : p->chosen_off);
    size_t full = plen + clen, start = 0, T = full;
    if (max_length > 0 && full > (size_t)max_length) {
        T = (size_t)max_length;
        start = keep_end ? full - T : 0;
    }
    for (size_t i = 0; i < T; i++) {
        size_t j = start + i;
        buf[i] = j < plen ? prompt[j] : comp[j - plen];
    }
    seq->prompt = prompt;
    seq->completion = comp;
    seq->T = T;
    seq->comp_start = plen > start ? plen - start : 0;
    if (seq->comp_start > T) seq->comp_start = T;
    /* the completion mask shifted by one: position t is scored when token t+1 is a completion token */
    seq->row0 = seq->comp_start > 0 ? seq->comp_start - 1 : 0;
    seq->R = T > 0 && T - 1 > seq->row0 ? T - 1 - seq->row0 : 0;
    if (seq->comp_start >= T) seq->R = 0;
}

size_t dpoc_dataset_max_seq_len(const dpoc_dataset *d, long max_length) {
    size_t m = 0;
    for (size_t i = 0; i < d->n_pairs; i++) {
        const dpoc_pair *p = &d->pairs[i];
        size_t a = p->prompt_len + (p->chosen_len > p->rejected_len ? p->chosen_len : p->rejected_len);
        if (max_length > 0 && a > (size_t)max_length) a = (size_t)max_length;
        if (a > m) m = a;
    }
    return m;
}
