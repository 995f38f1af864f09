/* Pre-tokenized preference pairs and their collation. */
#include "dpoc/dataset.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"

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

/* Appends one tokenized row; rows whose prompt alone fills max_length are dropped
 * and counted (TRL drops them under keep_start). */
static int add_pair(dpoc_dataset *d, const dpoc_ids *p, const dpoc_ids *c, const dpoc_ids *r, size_t line,
                    const dpoc_dataset_opts *o, dpoc_err *err) {
    if (o->max_length > 0 && !o->keep_end && p->n >= (size_t)o->max_length) {
        d->n_dropped_prompt_too_long++;
        return 0;
    }
    DPOC_TRY(reserve((void **)&d->tokens, &d->cap_tokens, d->n_tokens + p->n + c->n + r->n, sizeof(int32_t), err));
    DPOC_TRY(reserve((void **)&d->pairs, &d->cap_pairs, d->n_pairs + 1, sizeof(dpoc_pair), err));
    dpoc_pair *q = &d->pairs[d->n_pairs++];
    const dpoc_ids *parts[3] = {p, c, r};
    size_t *offs[3] = {&q->prompt_off, &q->chosen_off, &q->rejected_off};
    size_t *lens[3] = {&q->prompt_len, &q->chosen_len, &q->rejected_len};
    for (int k = 0; k < 3; k++) {
        *offs[k] = d->n_tokens;
        *lens[k] = parts[k]->n;
        /* an empty part may have no buffer at all (ids NULL): memcpy must not see it */
        if (parts[k]->n) memcpy(d->tokens + d->n_tokens, parts[k]->ids, parts[k]->n * sizeof(int32_t));
        d->n_tokens += parts[k]->n;
    }
    q->line = line;
    return 0;
}

/* Skipped records are reported, but only this many of them in detail. */
#define REPORTED_BAD_RECORDS 5

typedef struct {
    dpoc_dataset *d;
    const dpoc_prefs_ctx *ctx;
    const dpoc_dataset_opts *o;
    const char *path;
    dpoc_ids ids[3];
} loader;

static int take_row(loader *L, const cJSON *row, size_t where, int is_array, dpoc_err *err) {
    L->d->n_rows++;
    int rc = row ? dpoc_prefs_tokenize_row(L->ctx, row, &L->ids[0], &L->ids[1], &L->ids[2], err)
                 : dpoc_errf(err, DPOC_EINPUT, "malformed JSON");
    if (rc == DPOC_EINPUT) {
        dpoc_err_prefix(err, "%s:%s%zu", L->path, is_array ? "row " : "", where);
        if (!L->o->skip_bad_records) return rc;
        if (L->d->n_skipped_bad++ < REPORTED_BAD_RECORDS) fprintf(stderr, "dpoc: skipping bad record: %s\n", err->msg);
        return 0;
    }
    if (rc) return rc;
    return add_pair(L->d, &L->ids[0], &L->ids[1], &L->ids[2], where, L->o, err);
}

int dpoc_dataset_parse_line(dpoc_dataset *d, const char *line, size_t len, size_t lineno, const char *where,
                            size_t vocab_size, dpoc_err *err) {
    dpoc_prefs_ctx ctx = {NULL, -1, vocab_size};
    dpoc_dataset_opts o = {0, 0, 0};
    loader L = {d, &ctx, &o, where, {{0}}};
    cJSON *row = cJSON_ParseWithLength(line, len);
    int rc = take_row(&L, row, lineno, 0, err);
    cJSON_Delete(row);
    for (int k = 0; k < 3; k++) dpoc_ids_free(&L.ids[k]);
    return rc;
}

int dpoc_dataset_load(dpoc_dataset *d, const char *path, const dpoc_prefs_ctx *ctx, const dpoc_dataset_opts *o,
                      dpoc_err *err) {
    memset(d, 0, sizeof *d);
    FILE *f = fopen(path, "rb");
    if (!f) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    loader L = {d, ctx, o, path, {{0}}};
    int rc = 0;
    /* a JSON array when the first non-blank byte is '[', else JSONL */
    int c;
    while ((c = fgetc(f)) == ' ' || c == '\n' || c == '\r' || c == '\t') {}
    if (c == '[') {
        fclose(f);
        char *text = NULL;
        size_t len = 0;
        if ((rc = dpoc_read_file(path, &text, &len, err))) return rc;
        cJSON *arr = cJSON_ParseWithLength(text, len);
        free(text);
        if (!arr || !cJSON_IsArray(arr)) {
            cJSON_Delete(arr);
            return dpoc_errf(err, DPOC_EINPUT, "%s: starts with '[' but is not a valid JSON array", path);
        }
        size_t i = 0;
        const cJSON *row;
        cJSON_ArrayForEach(row, arr) {
            if ((rc = take_row(&L, row, i++, 1, err))) break;
        }
        cJSON_Delete(arr);
    } else {
        if (c != EOF) ungetc(c, f);
        char *line = NULL;
        size_t cap = 0, lineno = 0;
        ssize_t n;
        while ((n = getline(&line, &cap, f)) >= 0) {
            lineno++;
            size_t len = (size_t)n;
            while (len && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ')) len--;
            if (len == 0) continue; /* blank lines are allowed in JSONL */
            cJSON *row = memchr(line, '\0', len) ? NULL : cJSON_ParseWithLength(line, len);
            rc = take_row(&L, row, lineno, 0, err);
            cJSON_Delete(row);
            if (rc) break;
        }
        if (!rc && ferror(f)) rc = dpoc_errf(err, DPOC_EIO, "%s: read error", path);
        free(line);
        fclose(f);
    }
    for (int k = 0; k < 3; k++) dpoc_ids_free(&L.ids[k]);
    if (!rc && d->n_skipped_bad > REPORTED_BAD_RECORDS)
        fprintf(stderr, "dpoc: ... %zu bad records skipped in all\n", d->n_skipped_bad);
    if (!rc && d->n_pairs == 0) rc = dpoc_errf(err, DPOC_EINPUT, "%s: no usable pairs", path);
    if (rc) dpoc_dataset_free(d);
    return rc;
}

int dpoc_dataset_load_pretokenized(dpoc_dataset *d, const char *path, size_t vocab_size, long max_length,
                                   int keep_end, dpoc_err *err) {
    dpoc_prefs_ctx ctx = {NULL, -1, vocab_size};
    dpoc_dataset_opts o = {max_length, keep_end, 0};
    return dpoc_dataset_load(d, path, &ctx, &o, err);
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
