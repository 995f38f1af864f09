/* tokenizer.json / tokenizer_config.json -> dpoc_tokenizer, following the
 * deserializers of tokenizers 0.23.3 (tokenizer/serialization.rs,
 * models/bpe/serialization.rs, ...). A component dpoc does not implement is an
 * error naming its JSON path and type, never silently skipped: a different
 * pipeline would give different ids. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer_internal.h"

#define TOK_JSON_MAX_DEPTH 32 /* nested Sequence components */

static char *jdup(const char *s, dpoc_err *err) {
    size_t n = strlen(s);
    char *p = dpoc_malloc(n + 1, "tokenizer string", err);
    if (p) memcpy(p, s, n + 1);
    return p;
}

static const char *type_of(const cJSON *o) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

/* bool field: absent or null -> def (or an error when required) */
static int get_bool(const cJSON *o, const char *key, int def, int required, int *out, const char *path,
                    dpoc_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) return dpoc_errf(err, DPOC_EINPUT, "%s.%s is missing", path, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) return dpoc_errf(err, DPOC_EINPUT, "%s.%s must be true or false", path, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* optional string field: absent or null -> NULL */
static int get_str(const cJSON *o, const char *key, const char **out, const char *path, dpoc_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    *out = NULL;
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v)) return dpoc_errf(err, DPOC_EINPUT, "%s.%s must be a string", path, key);
    *out = v->valuestring;
    return 0;
}

static int get_id(const cJSON *v, int32_t *out, const char *what, dpoc_err *err) {
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > (double)INT32_MAX ||
        v->valuedouble != floor(v->valuedouble))
        return dpoc_errf(err, DPOC_EINPUT, "%s must be an id (an integer from 0 to %d)", what, INT32_MAX);
    *out = (int32_t)v->valuedouble;
    return 0;
}

/* ---- model ---- */

static int load_model(dpoc_tokenizer *tok, const cJSON *m, dpoc_err *err) {
    if (!cJSON_IsObject(m)) return dpoc_errf(err, DPOC_EINPUT, "model must be an object");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(m, "type");
    if (type && (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE")))
        return dpoc_errf(err, DPOC_EINPUT, "model.type '%s' is not supported (only BPE)",
                         cJSON_IsString(type) ? type->valuestring : "?");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dropout && !cJSON_IsNull(dropout)) {
        if (!cJSON_IsNumber(dropout) || dropout->valuedouble < 0 || dropout->valuedouble > 1)
            return dpoc_errf(err, DPOC_EINPUT, "model.dropout must be null or a number in [0, 1]");
        if (dropout->valuedouble > 0)
            return dpoc_errf(err, DPOC_EINPUT, "model.dropout %g is not supported (random merges; use null)",
                             dropout->valuedouble);
    }
    tok_bpe *bpe = &tok->bpe;
    const char *s;
    DPOC_TRY(get_str(m, "unk_token", &s, "model", err));
    if (s && !(bpe->unk_token = jdup(s, err))) return DPOC_ENOMEM;
    DPOC_TRY(get_str(m, "continuing_subword_prefix", &s, "model", err));
    if (s && *s) {
        if (!(bpe->prefix = jdup(s, err))) return DPOC_ENOMEM;
        bpe->prefix_len = strlen(s);
    }
    DPOC_TRY(get_str(m, "end_of_word_suffix", &s, "model", err));
    if (s && *s) {
        if (!(bpe->suffix = jdup(s, err))) return DPOC_ENOMEM;
        bpe->suffix_len = strlen(s);
    }
    DPOC_TRY(get_bool(m, "fuse_unk", 0, 0, &bpe->fuse_unk, "model", err));
    DPOC_TRY(get_bool(m, "byte_fallback", 0, 0, &bpe->byte_fallback, "model", err));
    DPOC_TRY(get_bool(m, "ignore_merges", 0, 0, &bpe->ignore_merges, "model", err));

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsObject(vocab) || !cJSON_IsArray(merges))
        return dpoc_errf(err, DPOC_EINPUT, "model: missing vocab (an object) or merges (an array)");
    size_t nv = 0;
    for (const cJSON *e = vocab->child; e; e = e->next) nv++;
    DPOC_TRY(tok_strmap_init(&bpe->vocab, nv, err));
    for (const cJSON *e = vocab->child; e; e = e->next) {
        int32_t id = 0;
        int rc = get_id(e, &id, "the value", err);
        if (rc) {
            dpoc_err_prefix(err, "model.vocab['%.100s']", e->string);
            return rc;
        }
        DPOC_TRY(tok_strmap_put(&bpe->vocab, e->string, strlen(e->string), id, err));
    }
    size_t nm = (size_t)cJSON_GetArraySize(merges);
    DPOC_TRY(tok_pairmap_init(&bpe->merges, nm, err));
    int legacy = merges->child && cJSON_IsString(merges->child);
    uint32_t rank = 0;
    size_t i = 0;
    for (const cJSON *e = merges->child; e; e = e->next, i++) {
        int rc;
        if (legacy) {
            if (!cJSON_IsString(e))
                return dpoc_errf(err, DPOC_EINPUT, "model.merges[%zu]: mixes \"a b\" strings and pairs", i);
            const char *line = e->valuestring;
            if (!strncmp(line, "#version", 8)) continue;
            const char *sp = strchr(line, ' ');
            if (!sp || strchr(sp + 1, ' '))
                return dpoc_errf(err, DPOC_EINPUT, "model.merges[%zu] '%.200s' is not two tokens separated by a space",
                                 i, line);
            rc = tok_bpe_add_merge(bpe, line, (size_t)(sp - line), sp + 1, strlen(sp + 1), rank, err);
        } else {
            if (!cJSON_IsArray(e) || cJSON_GetArraySize(e) != 2 || !cJSON_IsString(e->child) ||
                !cJSON_IsString(e->child->next))
                return dpoc_errf(err, DPOC_EINPUT, "model.merges[%zu] must be a pair of strings", i);
            const char *a = e->child->valuestring, *b = e->child->next->valuestring;
            rc = tok_bpe_add_merge(bpe, a, strlen(a), b, strlen(b), rank, err);
        }
        if (rc) {
            dpoc_err_prefix(err, "model.merges[%zu]", i);
            return rc;
        }
        rank++;
    }
    return tok_bpe_index_ids(bpe, err);
}

/* ---- normalizer ---- */

static int load_normalizer(dpoc_tokenizer *tok, const cJSON *n, const char *path, int depth, dpoc_err *err) {
    if (!n || cJSON_IsNull(n)) return 0;
    if (depth > TOK_JSON_MAX_DEPTH) return dpoc_errf(err, DPOC_EINPUT, "%s: nested too deeply", path);
    const char *t = type_of(n);
    if (!t) return dpoc_errf(err, DPOC_EINPUT, "%s: missing \"type\"", path);
    if (!strcmp(t, "NFC")) {
        tok->nfc = 1; /* NFC is idempotent: once or twice in a Sequence is the same */
        return 0;
    }
    if (!strcmp(t, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(list)) return dpoc_errf(err, DPOC_EINPUT, "%s.normalizers must be an array", path);
        size_t i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.normalizers[%zu]", path, i);
            DPOC_TRY(load_normalizer(tok, e, sub, depth + 1, err));
        }
        return 0;
    }
    return dpoc_errf(err, DPOC_EINPUT, "%s: normalizer type '%s' is not supported (supported: NFC, Sequence)", path, t);
}

/* ---- pre-tokenizers ---- */

static int push_pretok(dpoc_tokenizer *tok, const tok_pretok *p, dpoc_err *err) {
    tok_pretok *v = realloc(tok->pre, (tok->n_pre + 1) * sizeof *v);
    if (!v) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for pre-tokenizers");
    tok->pre = v;
    v[tok->n_pre++] = *p;
    return 0;
}

static int load_pretok(dpoc_tokenizer *tok, const cJSON *o, const char *path, int depth, dpoc_err *err) {
    if (!o || cJSON_IsNull(o)) return 0;
    if (depth > TOK_JSON_MAX_DEPTH) return dpoc_errf(err, DPOC_EINPUT, "%s: nested too deeply", path);
    const char *t = type_of(o);
    if (!t) return dpoc_errf(err, DPOC_EINPUT, "%s: missing \"type\"", path);
    tok_pretok p;
    memset(&p, 0, sizeof p);
    if (!strcmp(t, "ByteLevel")) {
        p.kind = TOK_PT_BYTELEVEL;
        int trim = 0;
        DPOC_TRY(get_bool(o, "add_prefix_space", 1, 1, &p.add_prefix_space, path, err));
        DPOC_TRY(get_bool(o, "trim_offsets", 1, 0, &trim, path, err)); /* offsets only */
        DPOC_TRY(get_bool(o, "use_regex", 1, 0, &p.use_regex, path, err));
        return push_pretok(tok, &p, err);
    }
    if (!strcmp(t, "Digits")) {
        p.kind = TOK_PT_DIGITS;
        DPOC_TRY(get_bool(o, "individual_digits", 0, 0, &p.individual_digits, path, err));
        return push_pretok(tok, &p, err);
    }
    if (!strcmp(t, "Split")) {
        p.kind = TOK_PT_SPLIT;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(o, "pattern");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(o, "behavior");
        DPOC_TRY(get_bool(o, "invert", 0, 1, &p.invert, path, err));
        if (!cJSON_IsString(beh)) return dpoc_errf(err, DPOC_EINPUT, "%s.behavior must be a string", path);
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        static const int values[] = {TOK_REMOVED, TOK_ISOLATED, TOK_MERGED_PREV, TOK_MERGED_NEXT, TOK_CONTIGUOUS};
        int found = 0;
        for (size_t k = 0; k < sizeof names / sizeof *names; k++)
            if (!strcmp(beh->valuestring, names[k])) {
                p.behavior = values[k];
                found = 1;
            }
        if (!found) return dpoc_errf(err, DPOC_EINPUT, "%s.behavior '%s' is unknown", path, beh->valuestring);
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *src = cJSON_IsString(str) ? str : re;
        if (!cJSON_IsObject(pat) || !cJSON_IsString(src))
            return dpoc_errf(err, DPOC_EINPUT, "%s.pattern must be {\"String\": ...} or {\"Regex\": ...}", path);
        char what[300];
        snprintf(what, sizeof what, "%s.pattern", path);
        DPOC_TRY(tok_regex_compile(src->valuestring, strlen(src->valuestring), src == str, &p.re, &p.jit, what, err));
        int rc = push_pretok(tok, &p, err);
        if (rc) pcre2_code_free(p.re);
        return rc;
    }
    if (!strcmp(t, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(o, "pretokenizers");
        if (!cJSON_IsArray(list)) return dpoc_errf(err, DPOC_EINPUT, "%s.pretokenizers must be an array", path);
        size_t i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.pretokenizers[%zu]", path, i);
            DPOC_TRY(load_pretok(tok, e, sub, depth + 1, err));
        }
        return 0;
    }
    return dpoc_errf(err, DPOC_EINPUT,
                     "%s: pre-tokenizer type '%s' is not supported (supported: ByteLevel, Split, Digits, Sequence)", path,
                     t);
}

/* ---- post-processor ---- */

/* One template piece: {"SpecialToken": {"id": ...}} / {"Sequence": {"id": "A"}} or "$A" / "<s>" (Piece::try_from). */
static int parse_piece(const cJSON *e, const cJSON *specials, tok_tpl_piece *out, const char *path, dpoc_err *err) {
    const char *special = NULL, *seq = NULL;
    char buf[256];
    if (cJSON_IsString(e)) {
        snprintf(buf, sizeof buf, "%s", e->valuestring);
        char *colon = strchr(buf, ':');
        if (colon) *colon = '\0';
        if (buf[0] == '$') seq = buf + 1;
        else special = buf;
    } else if (cJSON_IsObject(e)) {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(e, "SpecialToken");
        const cJSON *sq = cJSON_GetObjectItemCaseSensitive(e, "Sequence");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(st ? st : sq, "id");
        if (!(st || sq) || !cJSON_IsString(id))
            return dpoc_errf(err, DPOC_EINPUT, "%s: a piece must be {\"SpecialToken\": {\"id\": ...}} or "
                                               "{\"Sequence\": {\"id\": ...}}", path);
        if (st) special = id->valuestring;
        else seq = id->valuestring;
    } else {
        return dpoc_errf(err, DPOC_EINPUT, "%s: a piece must be an object or a string", path);
    }
    memset(out, 0, sizeof *out);
    if (seq) {
        /* "A", "a", "" or a type id select sequence A; B would need a pair input */
        if (!strcmp(seq, "B") || !strcmp(seq, "b"))
            return dpoc_errf(err, DPOC_EINPUT, "%s: the single-sequence template uses $B", path);
        out->is_seq = 1;
        return 0;
    }
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(specials, special);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(sp, "ids");
    if (!cJSON_IsArray(ids))
        return dpoc_errf(err, DPOC_EINPUT, "%s: special token '%s' is missing from special_tokens", path, special);
    size_t n = (size_t)cJSON_GetArraySize(ids);
    out->ids = dpoc_malloc((n ? n : 1) * sizeof *out->ids, "template ids", err);
    if (!out->ids) return DPOC_ENOMEM;
    for (const cJSON *x = ids->child; x; x = x->next) {
        int rc = get_id(x, &out->ids[out->n_ids], "special_tokens ids", err);
        if (rc) {
            dpoc_err_prefix(err, "%s", path);
            return rc;
        }
        out->n_ids++;
    }
    return 0;
}

static int load_post(dpoc_tokenizer *tok, const cJSON *o, const char *path, int depth, dpoc_err *err) {
    if (!o || cJSON_IsNull(o)) return 0;
    if (depth > TOK_JSON_MAX_DEPTH) return dpoc_errf(err, DPOC_EINPUT, "%s: nested too deeply", path);
    const char *t = type_of(o);
    if (!t) return dpoc_errf(err, DPOC_EINPUT, "%s: missing \"type\"", path);
    if (!strcmp(t, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(o, "processors");
        if (!cJSON_IsArray(list)) return dpoc_errf(err, DPOC_EINPUT, "%s.processors must be an array", path);
        size_t i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.processors[%zu]", path, i);
            DPOC_TRY(load_post(tok, e, sub, depth + 1, err));
        }
        return 0;
    }
    if (strcmp(t, "ByteLevel") && strcmp(t, "TemplateProcessing"))
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: post-processor type '%s' is not supported (supported: TemplateProcessing, ByteLevel, "
                         "Sequence)",
                         path, t);
    tok_post *v = realloc(tok->post, (tok->n_post + 1) * sizeof *v);
    if (!v) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for post-processors");
    tok->post = v;
    tok_post *pp = &v[tok->n_post++];
    memset(pp, 0, sizeof *pp);
    if (!strcmp(t, "ByteLevel")) return 0; /* trim_offsets changes offsets only, never ids */
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(o, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(o, "special_tokens");
    cJSON *split = NULL;
    if (cJSON_IsString(single)) { /* "<s> $A" */
        split = cJSON_CreateArray();
        if (!split) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for a template");
        char *copy = jdup(single->valuestring, err);
        if (!copy) {
            cJSON_Delete(split);
            return DPOC_ENOMEM;
        }
        for (char *save = NULL, *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
            cJSON_AddItemToArray(split, cJSON_CreateString(w));
        free(copy);
        single = split;
    }
    int rc = 0;
    if (!cJSON_IsArray(single)) rc = dpoc_errf(err, DPOC_EINPUT, "%s.single must be an array", path);
    size_t n = rc ? 0 : (size_t)cJSON_GetArraySize(single);
    if (!rc) {
        pp->pieces = dpoc_calloc(n ? n : 1, sizeof *pp->pieces, "template", err);
        if (!pp->pieces) rc = DPOC_ENOMEM;
    }
    size_t i = 0;
    for (const cJSON *e = rc ? NULL : single->child; e && !rc; e = e->next, i++) {
        char sub[256];
        snprintf(sub, sizeof sub, "%s.single[%zu]", path, i);
        pp->n = i + 1; /* counted before parsing: dpoc_tokenizer_free releases a half-parsed piece */
        rc = parse_piece(e, specials, &pp->pieces[i], sub, err);
    }
    cJSON_Delete(split);
    return rc;
}

/* ---- decoder ---- */

static int load_decoder(dpoc_tokenizer *tok, const cJSON *o, const char *path, int depth, dpoc_err *err) {
    if (depth > TOK_JSON_MAX_DEPTH) return dpoc_errf(err, DPOC_EINPUT, "%s: nested too deeply", path);
    const char *t = type_of(o);
    if (!t) return dpoc_errf(err, DPOC_EINPUT, "%s: missing \"type\"", path);
    tok->has_decoder = 1;
    if (!strcmp(t, "ByteLevel")) {
        tok->n_dec++;
        return 0;
    }
    if (!strcmp(t, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(o, "decoders");
        if (!cJSON_IsArray(list)) return dpoc_errf(err, DPOC_EINPUT, "%s.decoders must be an array", path);
        size_t i = 0;
        for (const cJSON *e = list->child; e; e = e->next, i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.decoders[%zu]", path, i);
            DPOC_TRY(load_decoder(tok, e, sub, depth + 1, err));
        }
        return 0;
    }
    return dpoc_errf(err, DPOC_EINPUT, "%s: decoder type '%s' is not supported (supported: ByteLevel, Sequence)", path,
                     t);
}

/* ---- added tokens ---- */

static int load_added(dpoc_tokenizer *tok, const cJSON *list, dpoc_err *err) {
    if (!list || cJSON_IsNull(list)) return 0;
    if (!cJSON_IsArray(list)) return dpoc_errf(err, DPOC_EINPUT, "added_tokens must be an array");
    /* AddedVocabulary::add_tokens: a new token takes max(added id) + 1 or the model's vocab size;
     * the "id" written in the file is not used (tokenizers only warns when it differs) */
    int32_t next_id = (int32_t)tok->bpe.vocab.n;
    size_t i = 0;
    for (const cJSON *e = list->child; e; e = e->next, i++) {
        char path[64];
        snprintf(path, sizeof path, "added_tokens[%zu]", i);
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsString(content)) return dpoc_errf(err, DPOC_EINPUT, "%s.content must be a string", path);
        int special = 0, lstrip = 0, rstrip = 0, single_word = 0, normalized = 0;
        DPOC_TRY(get_bool(e, "special", 0, 0, &special, path, err));
        DPOC_TRY(get_bool(e, "lstrip", 0, 0, &lstrip, path, err));
        DPOC_TRY(get_bool(e, "rstrip", 0, 0, &rstrip, path, err));
        DPOC_TRY(get_bool(e, "single_word", 0, 0, &single_word, path, err));
        DPOC_TRY(get_bool(e, "normalized", !special, 0, &normalized, path, err));
        const char *c = content->valuestring;
        DPOC_TRY(tok_add_token(tok, c, strlen(c), special, lstrip, rstrip, single_word, normalized, &next_id, err));
    }
    return 0;
}

/* ---- tokenizer_config.json ---- */

static int config_token(const cJSON *cfg, const char *key, char **out, dpoc_err *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsString(v))
        return dpoc_errf(err, DPOC_EINPUT, "tokenizer_config.json: %s must be a string or {\"content\": ...}", key);
    free(*out);
    *out = jdup(v->valuestring, err);
    return *out ? 0 : DPOC_ENOMEM;
}

static int load_config(dpoc_tokenizer *tok, const char *text, size_t len, dpoc_err *err) {
    cJSON *cfg = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return dpoc_errf(err, DPOC_EINPUT, "tokenizer_config.json: not a JSON object");
    }
    int rc = config_token(cfg, "eos_token", &tok->eos, err);
    if (!rc) rc = config_token(cfg, "bos_token", &tok->bos, err);
    if (!rc) rc = config_token(cfg, "pad_token", &tok->pad, err);
    /* add_bos_token / add_eos_token are read by transformers 5.23 but do not change the
     * post-processor of a byte-level BPE tokenizer: tokenizer.json's post_processor decides */
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (!rc && cJSON_IsArray(tpl)) {
        const cJSON *found = NULL;
        for (const cJSON *e = tpl->child; e; e = e->next) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
            if (cJSON_IsString(name) && !strcmp(name->valuestring, "default"))
                found = cJSON_GetObjectItemCaseSensitive(e, "template");
        }
        tpl = found;
    }
    if (!rc && tpl && !cJSON_IsNull(tpl)) {
        if (!cJSON_IsString(tpl))
            rc = dpoc_errf(err, DPOC_EINPUT, "tokenizer_config.json: chat_template must be a string or a list of "
                                             "{\"name\", \"template\"}");
        else if (!(tok->chat_template = jdup(tpl->valuestring, err)))
            rc = DPOC_ENOMEM;
    }
    cJSON_Delete(cfg);
    return rc;
}

/* ---- tokenizer.json ---- */

static int load_root(dpoc_tokenizer *tok, const cJSON *root, dpoc_err *err) {
    if (!cJSON_IsObject(root)) return dpoc_errf(err, DPOC_EINPUT, "not a JSON object");
    const cJSON *version = cJSON_GetObjectItemCaseSensitive(root, "version");
    if (version && (!cJSON_IsString(version) || strcmp(version->valuestring, "1.0")))
        return dpoc_errf(err, DPOC_EINPUT, "unknown tokenizer version '%s'",
                         cJSON_IsString(version) ? version->valuestring : "?");
    const cJSON *trunc = cJSON_GetObjectItemCaseSensitive(root, "truncation");
    if (trunc && !cJSON_IsNull(trunc))
        return dpoc_errf(err, DPOC_EINPUT, "truncation is set; dpoc does not truncate in the tokenizer (set it to null)");
    const cJSON *pad = cJSON_GetObjectItemCaseSensitive(root, "padding");
    if (pad && !cJSON_IsNull(pad)) {
        /* BatchLongest never pads a single sequence; a fixed length would */
        const cJSON *strategy = cJSON_GetObjectItemCaseSensitive(pad, "strategy");
        if (!cJSON_IsString(strategy) || strcmp(strategy->valuestring, "BatchLongest"))
            return dpoc_errf(err, DPOC_EINPUT, "padding to a fixed length is not supported (set padding to null)");
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!model) return dpoc_errf(err, DPOC_EINPUT, "model is missing");
    DPOC_TRY(load_model(tok, model, err));
    DPOC_TRY(load_normalizer(tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer", 0, err));
    DPOC_TRY(load_pretok(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), "pre_tokenizer", 0, err));
    DPOC_TRY(load_post(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "post_processor", 0, err));
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec)) DPOC_TRY(load_decoder(tok, dec, "decoder", 0, err));
    return load_added(tok, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), err);
}

int dpoc_tokenizer_load_json_text(dpoc_tokenizer **out, const char *json, size_t len, const char *config_text,
                                  size_t config_len, const char *where, dpoc_err *err) {
    *out = NULL;
    if (!where) where = "tokenizer.json";
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) return dpoc_errf(err, DPOC_EINPUT, "%s: invalid JSON", where);
    dpoc_tokenizer *tok = tok_new(err);
    int rc = tok ? 0 : DPOC_ENOMEM;
    if (!rc) rc = load_root(tok, root, err);
    cJSON_Delete(root);
    if (!rc && config_text) rc = load_config(tok, config_text, config_len, err);
    if (!rc) rc = tok_finish(tok, err);
    if (rc) {
        dpoc_err_prefix(err, "%s", where);
        dpoc_tokenizer_free(tok);
        return rc;
    }
    *out = tok;
    return 0;
}
