/* dpoc_tokenizer: the public API. Encoding runs tokenizers' pipeline
 * (tokenizer/mod.rs encode_single_sequence + post_process): added tokens are cut
 * out of the raw text first, each remaining piece is normalized, added tokens
 * with normalized=true are cut out of the normalized text, the pre-tokenizers
 * split what is left and the BPE model encodes each pre-token; the
 * post-processor then adds template tokens when add_special_tokens is set. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/fileutil.h"
#include "text/tokenizer_internal.h"

/* tokenizer.ggml.token_type values (llama.cpp's llama_token_type) */
#define GGUF_TOKEN_CONTROL 3
#define GGUF_TOKEN_USER_DEFINED 4

/* Words kept in the cache (tokenizers keeps 10,000 and then stops adding; dpoc keeps more and
 * starts over when full, a few MB at most). */
#define TOK_CACHE_WORDS 65536

/* ---- ids ---- */

int dpoc_ids_push(dpoc_ids *v, int32_t id, dpoc_err *err) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = realloc(v->ids, cap * sizeof *p);
        if (!p) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for %zu token ids", cap);
        v->ids = p;
        v->cap = cap;
    }
    v->ids[v->n++] = id;
    return 0;
}

void dpoc_ids_free(dpoc_ids *v) {
    if (!v) return;
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

/* ---- construction ---- */

dpoc_tokenizer *tok_new(dpoc_err *err) {
    dpoc_tokenizer *tok = dpoc_calloc(1, sizeof *tok, "tokenizer", err);
    if (!tok) return NULL;
    tok->eos_id = tok->bos_id = tok->pad_id = -1;
    if (tok_strmap_init(&tok->added_map, 64, err) || tok_strmap_init(&tok->special_set, 64, err)) {
        dpoc_tokenizer_free(tok);
        return NULL;
    }
    return tok;
}

void dpoc_tokenizer_free(dpoc_tokenizer *tok) {
    if (!tok) return;
    tok_strmap_free(&tok->bpe.vocab);
    tok_pairmap_free(&tok->bpe.merges);
    free(tok->bpe.id_str);
    free(tok->bpe.id_len);
    free(tok->bpe.char_id);
    free(tok->bpe.unk_token);
    free(tok->bpe.prefix);
    free(tok->bpe.suffix);
    for (size_t i = 0; i < tok->n_pre; i++) pcre2_code_free(tok->pre[i].re);
    free(tok->pre);
    for (size_t i = 0; i < tok->n_post; i++) {
        for (size_t k = 0; k < tok->post[i].n; k++) free(tok->post[i].pieces[k].ids);
        free(tok->post[i].pieces);
    }
    free(tok->post);
    for (size_t i = 0; i < tok->n_added; i++) {
        if (tok->added[i].pattern != tok->added[i].content) free(tok->added[i].pattern);
        free(tok->added[i].content);
    }
    free(tok->added);
    free(tok->added_sorted_ids);
    free(tok->added_sorted_idx);
    tok_strmap_free(&tok->added_map);
    tok_strmap_free(&tok->special_set);
    free(tok->match_raw.idx);
    free(tok->match_norm.idx);
    pcre2_code_free(tok->gpt2_re);
    pcre2_match_data_free(tok->md);
    pcre2_match_context_free(tok->mctx);
    pcre2_jit_stack_free(tok->jit_stack);
    free(tok->eos);
    free(tok->bos);
    free(tok->pad);
    free(tok->chat_template);
    tok_cache_free(&tok->cache);
    tok_buf_free(&tok->work);
    tok_buf_free(&tok->norm);
    tok_buf_free(&tok->tmp);
    tok_spans_free(&tok->spans);
    tok_spans_free(&tok->spans2);
    free(tok->pieces.v);
    free(tok->pieces2.v);
    free(tok->pieces3.v);
    free(tok->sym_buf);
    free(tok->heap_buf);
    dpoc_ids_free(&tok->seq);
    free(tok);
}

static char *dup_n(const char *s, size_t n, dpoc_err *err) {
    char *p = dpoc_malloc(n + 1, "tokenizer string", err);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static tok_added *added_by_id(const dpoc_tokenizer *tok, int32_t id) {
    /* before tok_finish (while loading) the sorted index does not exist yet */
    if (!tok->added_sorted_ids) {
        for (size_t i = 0; i < tok->n_added; i++)
            if (tok->added[i].id == id) return &tok->added[i];
        return NULL;
    }
    size_t lo = 0, hi = tok->n_added;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (tok->added_sorted_ids[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    if (lo < tok->n_added && tok->added_sorted_ids[lo] == id) return &tok->added[tok->added_sorted_idx[lo]];
    return NULL;
}

int tok_add_token(dpoc_tokenizer *tok, const char *content, size_t len, int special, int lstrip, int rstrip,
                  int single_word, int normalized, int32_t *next_id, dpoc_err *err) {
    if (len == 0) return 0; /* tokenizers ignores empty added tokens */
    int32_t existing = tok_strmap_get(&tok->added_map, content, len);
    if (existing >= 0) {
        tok_added *a = added_by_id(tok, existing);
        if (a && a->len == len && !memcmp(a->content, content, len) && a->special == special &&
            a->lstrip == lstrip && a->rstrip == rstrip && a->single_word == single_word && a->normalized == normalized)
            return 0;
    }
    int32_t id = existing >= 0 ? existing : tok_strmap_get(&tok->bpe.vocab, content, len);
    if (id < 0) {
        if (*next_id == INT32_MAX) return dpoc_errf(err, DPOC_EINPUT, "too many added tokens");
        id = (*next_id)++;
    }
    char *c = dup_n(content, len, err);
    if (!c) return DPOC_ENOMEM;
    char *pattern = c;
    size_t pattern_len = len;
    if (normalized && tok->nfc) {
        /* normalized tokens are matched in the normalized text, by their normalized form */
        int rc = tok_nfc(content, len, &tok->norm, err);
        if (!rc && (tok->norm.n != len || memcmp(tok->norm.p, content, len))) {
            pattern = dup_n(tok->norm.p, tok->norm.n, err);
            pattern_len = tok->norm.n;
            if (!pattern) rc = DPOC_ENOMEM;
        }
        if (rc) {
            free(c);
            return rc;
        }
    }
    int rc = tok_strmap_put(&tok->added_map, content, len, id, err);
    if (!rc && special) rc = tok_strmap_put(&tok->special_set, content, len, 1, err);
    tok_added *slot = rc ? NULL : added_by_id(tok, id);
    if (!rc && !slot) {
        tok_added *v = realloc(tok->added, (tok->n_added + 1) * sizeof *v);
        if (!v) rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory for added tokens");
        else {
            tok->added = v;
            slot = &v[tok->n_added++];
            memset(slot, 0, sizeof *slot);
        }
    } else if (!rc) {
        if (slot->pattern != slot->content) free(slot->pattern);
        free(slot->content);
    }
    if (rc) {
        if (pattern != c) free(pattern);
        free(c);
        return rc;
    }
    slot->content = c;
    slot->len = len;
    slot->pattern = pattern;
    slot->pattern_len = pattern_len;
    slot->id = id;
    slot->special = special;
    slot->lstrip = lstrip;
    slot->rstrip = rstrip;
    slot->single_word = single_word;
    slot->normalized = normalized;
    return 0;
}

static int32_t token_id(const dpoc_tokenizer *tok, const char *s) {
    if (!s) return -1;
    size_t n = strlen(s);
    int32_t id = tok_strmap_get(&tok->added_map, s, n);
    return id >= 0 ? id : tok_strmap_get(&tok->bpe.vocab, s, n);
}

int tok_finish(dpoc_tokenizer *tok, dpoc_err *err) {
    if (!tok->bpe.id_str) DPOC_TRY(tok_bpe_index_ids(&tok->bpe, err));
    free(tok->added_sorted_ids);
    free(tok->added_sorted_idx);
    tok->added_sorted_ids = dpoc_malloc((tok->n_added + 1) * sizeof(int32_t), "added tokens", err);
    tok->added_sorted_idx = dpoc_malloc((tok->n_added + 1) * sizeof(size_t), "added tokens", err);
    if (!tok->added_sorted_ids || !tok->added_sorted_idx) return DPOC_ENOMEM;
    for (size_t i = 0; i < tok->n_added; i++) { /* insertion sort: ids mostly arrive in order */
        size_t j = i;
        while (j > 0 && tok->added_sorted_ids[j - 1] > tok->added[i].id) {
            tok->added_sorted_ids[j] = tok->added_sorted_ids[j - 1];
            tok->added_sorted_idx[j] = tok->added_sorted_idx[j - 1];
            j--;
        }
        tok->added_sorted_ids[j] = tok->added[i].id;
        tok->added_sorted_idx[j] = i;
    }
    DPOC_TRY(tok_matcher_build(tok, err));
    DPOC_TRY(tok_regex_setup(tok, err));
    DPOC_TRY(tok_cache_init(&tok->cache, TOK_CACHE_WORDS, err));
    tok->eos_id = token_id(tok, tok->eos);
    tok->bos_id = token_id(tok, tok->bos);
    tok->pad_id = token_id(tok, tok->pad);
    return 0;
}

/* ---- loading from a path ---- */

int dpoc_tokenizer_load(dpoc_tokenizer **tok, const char *path, dpoc_err *err) {
    *tok = NULL;
    struct stat st;
    if (stat(path, &st) != 0) return dpoc_errf(err, DPOC_EINPUT, "%s: no such tokenizer file or directory", path);
    char json_path[4096], dir[4096], cfg_path[4096];
    if (S_ISDIR(st.st_mode)) {
        DPOC_TRY(dpoc_path_join(json_path, sizeof json_path, path, "tokenizer.json", err));
        if (strlen(path) >= sizeof dir) return dpoc_errf(err, DPOC_EINPUT, "path too long: %s", path);
        strcpy(dir, path);
    } else {
        if (strlen(path) >= sizeof json_path) return dpoc_errf(err, DPOC_EINPUT, "path too long: %s", path);
        strcpy(json_path, path);
        strcpy(dir, path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        else strcpy(dir, ".");
    }
    char *json = NULL, *cfg = NULL, *tpl = NULL;
    size_t json_len = 0, cfg_len = 0, tpl_len = 0;
    int rc = dpoc_read_file(json_path, &json, &json_len, err);
    if (rc) return rc;
    DPOC_TRY(dpoc_path_join(cfg_path, sizeof cfg_path, dir, "tokenizer_config.json", err));
    if (stat(cfg_path, &st) == 0) rc = dpoc_read_file(cfg_path, &cfg, &cfg_len, err);
    if (!rc) rc = dpoc_tokenizer_load_json_text(tok, json, json_len, cfg, cfg_len, json_path, err);
    if (!rc && !(*tok)->chat_template) {
        /* transformers 5 saves the template beside the config */
        char tpl_path[4096];
        rc = dpoc_path_join(tpl_path, sizeof tpl_path, dir, "chat_template.jinja", err);
        if (!rc && stat(tpl_path, &st) == 0 && !(rc = dpoc_read_file(tpl_path, &tpl, &tpl_len, err))) {
            (*tok)->chat_template = tpl;
            tpl = NULL;
        }
    }
    free(json);
    free(cfg);
    free(tpl);
    if (rc) {
        dpoc_tokenizer_free(*tok);
        *tok = NULL;
    }
    return rc;
}

/* ---- from GGUF metadata ---- */

static const char qwen2_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+";
static const char llama3_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* llama.cpp (src/llama-vocab.cpp) picks the pre-tokenizer regexes from tokenizer.ggml.pre; these
 * are the same splits written as the tokenizer.json pipelines those models ship with. */
static int spec_pretokenizer(dpoc_tokenizer *tok, const char *pre, dpoc_err *err) {
    tok_pretok p[2];
    size_t n = 0;
    memset(p, 0, sizeof p);
    const char *regex = NULL;
    if (!strcmp(pre, "gpt2") || !strcmp(pre, "gpt-2")) {
        p[n++] = (tok_pretok){.kind = TOK_PT_BYTELEVEL, .use_regex = 1};
    } else if (!strcmp(pre, "smollm")) {
        /* llama.cpp: "\p{N}" then GPT-2's regex; tokenizer.json: Digits(individual) + ByteLevel */
        p[n++] = (tok_pretok){.kind = TOK_PT_DIGITS, .individual_digits = 1};
        p[n++] = (tok_pretok){.kind = TOK_PT_BYTELEVEL, .use_regex = 1};
    } else if (!strcmp(pre, "qwen2") || !strcmp(pre, "deepseek-r1-qwen")) {
        regex = qwen2_regex;
        tok->nfc = 1; /* Qwen2's tokenizer.json normalizes to NFC; llama.cpp does not */
    } else if (!strcmp(pre, "llama-bpe") || !strcmp(pre, "llama3") || !strcmp(pre, "llama-v3")) {
        regex = llama3_regex;
        tok->bpe.ignore_merges = 1;
    } else {
        return dpoc_errf(err, DPOC_EINPUT,
                         "tokenizer.ggml.pre '%s' is not supported (supported: gpt2, smollm, qwen2, llama-bpe)", pre);
    }
    if (regex) {
        p[n] = (tok_pretok){.kind = TOK_PT_SPLIT, .behavior = TOK_ISOLATED};
        DPOC_TRY(tok_regex_compile(regex, strlen(regex), 0, &p[n].re, &p[n].jit, "tokenizer.ggml.pre", err));
        n++;
        p[n++] = (tok_pretok){.kind = TOK_PT_BYTELEVEL, .use_regex = 0};
    }
    tok->pre = dpoc_malloc(n * sizeof *tok->pre, "pre-tokenizers", err);
    if (!tok->pre) {
        for (size_t i = 0; i < n; i++) pcre2_code_free(p[i].re);
        return DPOC_ENOMEM;
    }
    memcpy(tok->pre, p, n * sizeof *p);
    tok->n_pre = n;
    return 0;
}

static int spec_fill(dpoc_tokenizer *tok, const dpoc_tokenizer_spec *spec, dpoc_err *err) {
    if (!spec->model || strcmp(spec->model, "gpt2"))
        return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.model '%s' is not supported (only gpt2, byte-level BPE)",
                         spec->model ? spec->model : "(missing)");
    if (!spec->tokens || !spec->n_tokens) return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.tokens is empty");
    if (spec->n_tokens > INT32_MAX) return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.tokens: too many tokens");
    DPOC_TRY(spec_pretokenizer(tok, spec->pre ? spec->pre : "(missing)", err));
    DPOC_TRY(tok_strmap_init(&tok->bpe.vocab, spec->n_tokens, err));
    for (size_t i = 0; i < spec->n_tokens; i++) {
        const char *t = spec->tokens[i];
        if (!t) return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.tokens[%zu] is missing", i);
        size_t n = strlen(t);
        if (!tok_utf8_valid(t, n)) return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.tokens[%zu] is not valid UTF-8", i);
        DPOC_TRY(tok_strmap_put(&tok->bpe.vocab, t, n, (int32_t)i, err));
    }
    DPOC_TRY(tok_pairmap_init(&tok->bpe.merges, spec->n_merges, err));
    for (size_t i = 0; i < spec->n_merges; i++) {
        const char *m = spec->merges[i];
        /* llama.cpp splits at the first space after the first byte */
        const char *sp = m && m[0] ? strchr(m + 1, ' ') : NULL;
        if (!sp) return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.merges[%zu] '%s' is not 'a b'", i, m ? m : "");
        int rc = tok_bpe_add_merge(&tok->bpe, m, (size_t)(sp - m), sp + 1, strlen(sp + 1), (uint32_t)i, err);
        if (rc) {
            dpoc_err_prefix(err, "tokenizer.ggml.merges");
            return rc;
        }
    }
    DPOC_TRY(tok_bpe_index_ids(&tok->bpe, err));
    int32_t next_id = (int32_t)tok->bpe.vocab.n;
    if (spec->token_type)
        for (size_t i = 0; i < spec->n_tokens; i++)
            /* control tokens are special; user-defined ones (e.g. Qwen2.5's <tool_call>) are
             * added tokens matched whole but not special: decode(skip_special_tokens)
             * keeps them, as the tokenizer transformers builds from the GGUF does */
            if (spec->token_type[i] == GGUF_TOKEN_CONTROL || spec->token_type[i] == GGUF_TOKEN_USER_DEFINED)
                DPOC_TRY(tok_add_token(tok, spec->tokens[i], strlen(spec->tokens[i]),
                                       spec->token_type[i] == GGUF_TOKEN_CONTROL, 0, 0, 0, 0, &next_id, err));
    tok->has_decoder = 1;
    tok->n_dec = 1;
    if (spec->add_bos) {
        if (spec->bos_id < 0 || (size_t)spec->bos_id >= spec->n_tokens)
            return dpoc_errf(err, DPOC_EINPUT, "tokenizer.ggml.add_bos_token is set but bos_token_id is missing");
        tok->post = dpoc_calloc(1, sizeof *tok->post, "post-processor", err);
        if (!tok->post) return DPOC_ENOMEM;
        tok->n_post = 1;
        tok->post[0].pieces = dpoc_calloc(2, sizeof *tok->post[0].pieces, "post-processor", err);
        if (!tok->post[0].pieces) return DPOC_ENOMEM;
        tok->post[0].n = 2;
        tok->post[0].pieces[0].ids = dpoc_malloc(sizeof(int32_t), "post-processor", err);
        if (!tok->post[0].pieces[0].ids) return DPOC_ENOMEM;
        tok->post[0].pieces[0].ids[0] = spec->bos_id;
        tok->post[0].pieces[0].n_ids = 1;
        tok->post[0].pieces[1].is_seq = 1;
    }
    const int32_t ids[3] = {spec->eos_id, spec->bos_id, spec->pad_id};
    char **names[3] = {&tok->eos, &tok->bos, &tok->pad};
    for (int k = 0; k < 3; k++)
        if (ids[k] >= 0 && (size_t)ids[k] < spec->n_tokens) {
            *names[k] = dup_n(spec->tokens[ids[k]], strlen(spec->tokens[ids[k]]), err);
            if (!*names[k]) return DPOC_ENOMEM;
        }
    if (spec->chat_template && !(tok->chat_template = dup_n(spec->chat_template, strlen(spec->chat_template), err)))
        return DPOC_ENOMEM;
    return tok_finish(tok, err);
}

int dpoc_tokenizer_from_spec(dpoc_tokenizer **out, const dpoc_tokenizer_spec *spec, dpoc_err *err) {
    *out = NULL;
    dpoc_tokenizer *tok = tok_new(err);
    if (!tok) return err ? err->code : DPOC_ENOMEM;
    int rc = spec_fill(tok, spec, err);
    if (rc) {
        dpoc_tokenizer_free(tok);
        return rc;
    }
    *out = tok;
    return 0;
}

/* ---- encode ---- */

static int encode_piece(dpoc_tokenizer *tok, const char *s, size_t n, dpoc_ids *seq, dpoc_err *err) {
    const char *t = s;
    size_t tn = n;
    if (tok->nfc) {
        DPOC_TRY(tok_nfc(s, n, &tok->norm, err));
        t = tok->norm.p;
        tn = tok->norm.n;
    }
    DPOC_TRY(tok_added_find(tok, &tok->match_norm, t, tn, &tok->pieces3, err));
    for (size_t i = 0; i < tok->pieces3.n; i++) {
        tok_piece p = tok->pieces3.v[i];
        if (p.is_match) {
            DPOC_TRY(dpoc_ids_push(seq, tok->added[p.is_match - 1].id, err));
            continue;
        }
        if (p.end <= p.start) continue;
        /* t may point into tok->norm, which the pre-tokenizers leave alone (they copy into work) */
        DPOC_TRY(tok_pretokenize(tok, t + p.start, p.end - p.start, err));
        for (size_t k = 0; k < tok->spans.n; k++)
            DPOC_TRY(tok_bpe_word(tok, tok->work.p + tok->spans.v[k].off, tok->spans.v[k].len, seq, err));
    }
    return 0;
}

int dpoc_tokenizer_encode(dpoc_tokenizer *tok, const char *text, size_t len, int add_special_tokens, dpoc_ids *out,
                          dpoc_err *err) {
    if (!text && len) return dpoc_errf(err, DPOC_EINPUT, "tokenizer: NULL text");
    size_t bad = tok_utf8_check(text, len);
    if (bad != len) return dpoc_errf(err, DPOC_EINPUT, "text is not valid UTF-8 (at byte %zu of %zu)", bad, len);
    dpoc_ids *seq = &tok->seq;
    seq->n = 0;
    DPOC_TRY(tok_added_find(tok, &tok->match_raw, text, len, &tok->pieces2, err));
    for (size_t i = 0; i < tok->pieces2.n; i++) {
        tok_piece p = tok->pieces2.v[i];
        if (p.is_match) DPOC_TRY(dpoc_ids_push(seq, tok->added[p.is_match - 1].id, err));
        else if (p.end > p.start) DPOC_TRY(encode_piece(tok, text + p.start, p.end - p.start, seq, err));
    }
    /* post-processors in order; only templates change ids (apply_template keeps the $A pieces
     * when add_special_tokens is false) */
    dpoc_ids cur = {0}, next = {0};
    int rc = 0;
    for (size_t k = 0; k < seq->n && !rc; k++) rc = dpoc_ids_push(&cur, seq->ids[k], err);
    for (size_t s = 0; s < tok->n_post && !rc; s++) {
        const tok_post *pp = &tok->post[s];
        if (!pp->pieces) continue;
        next.n = 0;
        for (size_t k = 0; k < pp->n && !rc; k++) {
            const tok_tpl_piece *pc = &pp->pieces[k];
            if (pc->is_seq)
                for (size_t q = 0; q < cur.n && !rc; q++) rc = dpoc_ids_push(&next, cur.ids[q], err);
            else if (add_special_tokens)
                for (size_t q = 0; q < pc->n_ids && !rc; q++) rc = dpoc_ids_push(&next, pc->ids[q], err);
        }
        dpoc_ids t = cur;
        cur = next;
        next = t;
    }
    for (size_t k = 0; k < cur.n && !rc; k++) rc = dpoc_ids_push(out, cur.ids[k], err);
    dpoc_ids_free(&cur);
    dpoc_ids_free(&next);
    return rc;
}

/* ---- decode ---- */

static void char_bytes(int16_t inv[0x144]) {
    int n = 0;
    for (int i = 0; i < 0x144; i++) inv[i] = -1;
    for (int b = 0; b < 256; b++) {
        int cp;
        if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) cp = b;
        else cp = 256 + n++;
        inv[cp] = (int16_t)b;
    }
}

/* ByteLevel::decode_chain on one token: its characters back to bytes, or the token's own bytes
 * when a character is not one of the 256. */
static int bytelevel_token(const int16_t *inv, const char *t, size_t n, tok_buf *out, dpoc_err *err) {
    DPOC_TRY(tok_buf_reserve(out, n + 1, err));
    size_t start = out->n;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        size_t l = tok_utf8_next(t + i, n - i, &cp);
        if (cp >= 0x144 || inv[cp] < 0) {
            out->n = start;
            return tok_buf_append(out, t, n, err);
        }
        out->p[out->n++] = (char)inv[cp];
        i += l;
    }
    out->p[out->n] = '\0';
    return 0;
}

int dpoc_tokenizer_decode(const dpoc_tokenizer *tok, const int32_t *ids, size_t n, int skip_special_tokens,
                          char **out, size_t *len, dpoc_err *err) {
    *out = NULL;
    if (len) *len = 0;
    tok_buf text = {0}, bytes = {0};
    int16_t inv[0x144];
    char_bytes(inv);
    int rc = tok_buf_append(&text, "", 0, err);
    size_t n_tokens = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const char *t = NULL;
        size_t tl = 0;
        const tok_added *a = added_by_id(tok, ids[i]);
        if (a) {
            t = a->normalized ? a->pattern : a->content;
            tl = a->normalized ? a->pattern_len : a->len;
        } else if (ids[i] >= 0 && (size_t)ids[i] < tok->bpe.n_ids && tok->bpe.id_str[ids[i]]) {
            t = tok->bpe.id_str[ids[i]];
            tl = tok->bpe.id_len[ids[i]];
        }
        if (!t) continue; /* unknown ids are skipped, as tokenizers does */
        if (skip_special_tokens && tok_strmap_get(&tok->special_set, t, tl) >= 0) continue;
        if (!tok->has_decoder || !tok->n_dec) {
            /* no decoder: tokens joined with " "; a decoder that does nothing: joined with "" */
            if (n_tokens++ && !tok->has_decoder) rc = tok_buf_append(&text, " ", 1, err);
            if (!rc) rc = tok_buf_append(&text, t, tl, err);
        } else {
            rc = bytelevel_token(inv, t, tl, &bytes, err);
        }
    }
    if (!rc && tok->has_decoder && tok->n_dec) {
        rc = tok_utf8_lossy(&text, bytes.p ? bytes.p : "", bytes.n, err);
        /* a Sequence of several ByteLevel decoders runs each on the previous one's string */
        for (size_t d = 1; d < tok->n_dec && !rc; d++) {
            bytes.n = 0;
            rc = bytelevel_token(inv, text.p, text.n, &bytes, err);
            text.n = 0;
            if (!rc) rc = tok_utf8_lossy(&text, bytes.p ? bytes.p : "", bytes.n, err);
        }
    }
    tok_buf_free(&bytes);
    if (rc) {
        tok_buf_free(&text);
        return rc;
    }
    *out = text.p;
    if (len) *len = text.n;
    return 0;
}

/* ---- queries ---- */

size_t dpoc_tokenizer_vocab_size(const dpoc_tokenizer *tok) {
    /* tokenizers' get_vocab_size(with_added_tokens=True): distinct token strings */
    size_t n = tok->bpe.vocab.n;
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok_strmap_find(&tok->bpe.vocab, tok->added[i].content, tok->added[i].len) < 0) n++;
    return n;
}

int32_t dpoc_tokenizer_token_to_id(const dpoc_tokenizer *tok, const char *token) { return token_id(tok, token); }

const char *dpoc_tokenizer_id_to_token(const dpoc_tokenizer *tok, int32_t id) {
    const tok_added *a = added_by_id(tok, id);
    if (a) return a->normalized ? a->pattern : a->content;
    if (id >= 0 && (size_t)id < tok->bpe.n_ids) return tok->bpe.id_str[id];
    return NULL;
}

const char *dpoc_tokenizer_eos_token(const dpoc_tokenizer *tok) { return tok->eos; }
int32_t dpoc_tokenizer_eos_id(const dpoc_tokenizer *tok) { return tok->eos_id; }
const char *dpoc_tokenizer_bos_token(const dpoc_tokenizer *tok) { return tok->bos; }
int32_t dpoc_tokenizer_bos_id(const dpoc_tokenizer *tok) { return tok->bos_id; }
const char *dpoc_tokenizer_pad_token(const dpoc_tokenizer *tok) { return tok->pad; }
int32_t dpoc_tokenizer_pad_id(const dpoc_tokenizer *tok) { return tok->pad_id; }
const char *dpoc_tokenizer_chat_template(const dpoc_tokenizer *tok) { return tok->chat_template; }
