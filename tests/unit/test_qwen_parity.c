/* Parity of dpoc with Hugging Face on the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF
 * (tools/fetch-model --model qwen2.5-coder-0.5b: qwen2, 24 layers, hidden 896, 14 query / 2 KV
 * heads, vocabulary 151,936, untied Q8_0 output; Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors).
 * tools/make_gguf_fixtures.py --model qwen2.5-coder-0.5b loaded the same file with transformers
 * 5.23 (every weight dequantized to fp32 by the gguf package, and checked equal to
 * gguf.quants.dequantize of its tensor) and tokenizers 0.23.3 and recorded:
 *
 *   gguf/qwen2.5-coder-0.5b_parity.json     3 chat prompts (apply_chat_template with the default
 *       system prompt): per position the log-sum-exp, top-16 logits and the logits of 64 fixed ids;
 *       generate(do_sample=False, max_new_tokens=32); the tokenizer transformers built from the
 *       GGUF metadata (pre-tokenizer, merges, added tokens) and 6 conversations rendered by
 *       apply_chat_template with their ids
 *   gguf/qwen2.5-coder-0.5b_tokenizer.jsonl the ids of every string of tokenizer/corpus.jsonl (the
 *       shared multilingual corpus) and of 12 Qwen-specific strings
 *
 * Checked here, with dpoc_source_load_model / dpoc_source_load_tokenizer on the GGUF:
 *   - tokenizer facts: tokenizer.ggml.pre "qwen2", 151,387 merges (in the file and in the loaded
 *     BPE), the split + byte-level pre-tokenizer transformers built, every added token's id, eos/pad;
 *   - the corpus: ids (with and without special tokens) and decoding equal to tokenizers'. Where
 *     transformers' GGUF conversion (no normalizer, as llama.cpp) and Qwen2's own pipeline (NFC, as
 *     Qwen's tokenizer.json and transformers' Qwen2Tokenizer) give different ids the fixture holds
 *     both ("ids", "ids_nfc"); dpoc normalizes qwen2 GGUF text to NFC (src/text/tokenizer.c), so
 *     there it is held to "ids_nfc", and the test says on how many strings that departs from
 *     transformers' GGUF tokenizer;
 *   - the chat template: recognised as qwen2.5 from the GGUF's tokenizer.chat_template, each
 *     conversation rendered byte for byte as apply_chat_template (default system prompt "You are
 *     Qwen, created by Alibaba Cloud. You are a helpful assistant."), its ids and the prompts' ids;
 *   - logits (forward + LM head) within 1e-3, top-1 equal at every position; dpoc_generate at
 *     temperature 0 gives exactly transformers' ids at max_batch 3 and 1.
 * Skipped, with a message, when the GGUF is absent ($DPOC_QWEN_GGUF, else
 * $DPOC_CACHE/models/..., else ~/.cache/dpoc/models/...). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dpoc/chat.h"
#include "dpoc/generate.h"
#include "dpoc/gguf.h"
#include "dpoc/layers.h"
#include "dpoc/model.h"
#include "dpoc/source.h"
#include "dpoc/tokenizer.h"
#include "testutil.h"
#include "text/tokenizer_internal.h"

#define GGUF_NAME "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
#define FIXTURE "gguf/qwen2.5-coder-0.5b_parity.json"
#define LOGIT_ATOL 1e-3
#define LSE_ATOL 1e-3
#define QWEN_MERGES 151387 /* issue 14: the number of merges in the file */
#define QWEN_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

static char g_path[4096];
static int g_loaded;
static dpoc_model g_model;
static dpoc_tokenizer *g_tok;
static cJSON *g_fx;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *gguf_path(void) {
    const char *env = getenv("DPOC_QWEN_GGUF");
    if (env && *env) snprintf(g_path, sizeof g_path, "%s", env);
    else {
        const char *cache = getenv("DPOC_CACHE");
        const char *home = getenv("HOME");
        if (cache && *cache) snprintf(g_path, sizeof g_path, "%s/models/" GGUF_NAME, cache);
        else snprintf(g_path, sizeof g_path, "%s/.cache/dpoc/models/" GGUF_NAME, home ? home : ".");
    }
    return g_path;
}

static void skip_if_absent(const char *test) {
    const char *path = gguf_path();
    if (access(path, R_OK) != 0) {
        print_message("SKIPPED %s: %s is absent (run tools/fetch-model --model qwen2.5-coder-0.5b or set "
                      "DPOC_QWEN_GGUF)\n",
                      test, path);
        skip();
    }
}

static const cJSON *fx(void) {
    if (!g_fx) g_fx = load_json_fixture(FIXTURE);
    return g_fx;
}

/* The model, loaded once; skips the calling test when the file is absent. */
static const dpoc_model *model_or_skip(const char *test) {
    skip_if_absent(test);
    if (!g_loaded) {
        dpoc_err err;
        dpoc_err_clear(&err);
        const double t0 = now();
        if (dpoc_source_load_model(&g_model, g_path, &err)) fail_msg("load %s: %s", g_path, err.msg);
        g_loaded = 1;
        print_message("loaded %s in %.1f s (dequantized to fp32)\n", g_path, now() - t0);
    }
    return &g_model;
}

static dpoc_tokenizer *tokenizer_or_skip(const char *test) {
    skip_if_absent(test);
    if (!g_tok) {
        dpoc_err err;
        dpoc_err_clear(&err);
        const double t0 = now();
        if (dpoc_source_load_tokenizer(&g_tok, g_path, &err)) fail_msg("tokenizer of %s: %s", g_path, err.msg);
        if (!g_tok) fail_msg("%s: no tokenizer", g_path);
        print_message("tokenizer of %s loaded in %.2f s\n", g_path, now() - t0);
    }
    return g_tok;
}

static int teardown_group(void **state) {
    (void)state;
    if (g_loaded) dpoc_model_free(&g_model);
    g_loaded = 0;
    dpoc_tokenizer_free(g_tok);
    g_tok = NULL;
    cJSON_Delete(g_fx);
    g_fx = NULL;
    return 0;
}

/* ---- fixture access ---- */

static const cJSON *item(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) fail_msg("fixture: key '%s' missing", key);
    return v;
}

static const char *str_item(const cJSON *obj, const char *key) {
    const cJSON *v = item(obj, key);
    if (!cJSON_IsString(v)) fail_msg("fixture: '%s' is not a string", key);
    return v->valuestring;
}

/* A JSON array of integers into ids (cleared first). */
static void json_ids(const cJSON *arr, dpoc_ids *ids) {
    dpoc_err err;
    dpoc_err_clear(&err);
    ids->n = 0;
    const cJSON *it;
    if (!cJSON_IsArray(arr)) fail_msg("fixture: expected an array of ids");
    cJSON_ArrayForEach(it, arr) {
        if (!cJSON_IsNumber(it)) fail_msg("fixture: non-numeric id");
        if (dpoc_ids_push(ids, (int32_t)it->valueint, &err)) fail_msg("%s", err.msg);
    }
}

/* Row t of a 2-D array of numbers; fails unless it has n entries. */
static const cJSON *row(const cJSON *arr2d, size_t t, size_t n, const char *what) {
    const cJSON *r = cJSON_GetArrayItem(arr2d, (int)t);
    if (!r || (size_t)cJSON_GetArraySize(r) != n) fail_msg("fixture: %s[%zu] is not %zu long", what, t, n);
    return r;
}

static int ids_equal(const dpoc_ids *a, const dpoc_ids *b) {
    return a->n == b->n && (a->n == 0 || !memcmp(a->ids, b->ids, a->n * sizeof *a->ids));
}

static void print_ids(const char *what, const int32_t *ids, size_t n) {
    char buf[1024];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 16 < sizeof buf; i++) o += (size_t)snprintf(buf + o, sizeof buf - o, " %d", ids[i]);
    buf[o] = '\0';
    print_message("  %s (%zu):%s\n", what, n, buf);
}

/* ---- JSON lines (the corpus holds U+0000, which cJSON's strings cannot) ---- */

typedef struct {
    char *s;
    size_t n;
} str;

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The JSON string value of "key" in a one-line object written by Python's json.dumps (compact
 * separators); 0 when the key is absent. */
static int json_str_field(const char *line, const char *key, str *out) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *p = strstr(line, pat);
    if (!p) return 0;
    p += strlen(pat);
    char *o = malloc(strlen(p) + 1);
    assert_non_null(o);
    size_t n = 0;
    while (*p && *p != '"') {
        if (*p != '\\') {
            o[n++] = *p++;
            continue;
        }
        p++;
        char c = *p++;
        switch (c) {
        case 'n': o[n++] = '\n'; break;
        case 't': o[n++] = '\t'; break;
        case 'r': o[n++] = '\r'; break;
        case 'b': o[n++] = '\b'; break;
        case 'f': o[n++] = '\f'; break;
        case 'u': {
            unsigned cp = (unsigned)strtoul((char[]){p[0], p[1], p[2], p[3], 0}, NULL, 16);
            p += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && p[0] == '\\' && p[1] == 'u') {
                unsigned lo = (unsigned)strtoul((char[]){p[2], p[3], p[4], p[5], 0}, NULL, 16);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            n += put_utf8(o + n, cp);
            break;
        }
        default: o[n++] = c; break;
        }
    }
    o[n] = '\0';
    out->s = o;
    out->n = n;
    return 1;
}

typedef struct {
    char **lines;
    size_t n;
    char *buf;
} lines_t;

static void read_lines(const char *path, lines_t *l) {
    size_t len;
    l->buf = read_text_file(path, &len);
    if (!l->buf) fail_msg("cannot read %s", path);
    l->n = 0;
    for (size_t i = 0; i < len; i++) l->n += l->buf[i] == '\n';
    l->lines = calloc(l->n + 1, sizeof *l->lines);
    assert_non_null(l->lines);
    size_t k = 0;
    char *s = l->buf;
    for (size_t i = 0; i < len; i++)
        if (l->buf[i] == '\n') {
            l->buf[i] = '\0';
            l->lines[k++] = s;
            s = l->buf + i + 1;
        }
}

static void free_lines(lines_t *l) {
    free(l->lines);
    free(l->buf);
}

/* ---- tokenizer: the facts ---- */

static void test_tokenizer_facts(void **state) {
    (void)state;
    dpoc_tokenizer *tok = tokenizer_or_skip("test_tokenizer_facts");
    const cJSON *t = item(fx(), "tokenizer");
    const size_t n_merges = (size_t)item(t, "n_merges")->valueint;
    assert_int_equal(n_merges, QWEN_MERGES);

    /* the file's metadata as dpoc reads it */
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_gguf *g = NULL;
    if (dpoc_gguf_open(&g, g_path, &err)) fail_msg("%s", err.msg);
    dpoc_tokenizer_spec spec;
    if (dpoc_gguf_tokenizer_spec(g, &spec, &err)) fail_msg("%s", err.msg);
    assert_string_equal(spec.model, "gpt2");
    assert_string_equal(spec.pre, str_item(t, "pre"));
    assert_string_equal(spec.pre, "qwen2");
    assert_int_equal(spec.n_merges, n_merges);
    assert_int_equal(spec.n_tokens, (size_t)item(t, "gguf_tokens")->valueint);
    assert_int_equal(spec.add_bos, cJSON_IsTrue(item(t, "add_bos_token")));
    assert_non_null(spec.chat_template);
    assert_non_null(strstr(spec.chat_template, QWEN_SYSTEM));
    char pre_name[64];
    snprintf(pre_name, sizeof pre_name, "%s", spec.pre);
    dpoc_gguf_close(g); /* spec points into g */

    /* the loaded tokenizer: every merge in its BPE, the vocabulary, the special tokens */
    assert_int_equal(tok->bpe.merges.n, n_merges);
    assert_int_equal(dpoc_tokenizer_vocab_size(tok), (size_t)item(t, "vocab_size")->valueint);
    assert_string_equal(dpoc_tokenizer_eos_token(tok), str_item(t, "eos_token"));
    assert_int_equal(dpoc_tokenizer_eos_id(tok), item(t, "eos_token_id")->valueint);
    assert_string_equal(dpoc_tokenizer_pad_token(tok), str_item(t, "pad_token"));
    assert_int_equal(dpoc_tokenizer_pad_id(tok), item(t, "pad_token_id")->valueint);
    size_t n_added = 0;
    const cJSON *a;
    cJSON_ArrayForEach(a, item(t, "added_tokens")) {
        const char *content = str_item(a, "content");
        const int id = item(a, "id")->valueint;
        if (dpoc_tokenizer_token_to_id(tok, content) != id)
            fail_msg("added token %s: dpoc id %d, transformers %d", content, dpoc_tokenizer_token_to_id(tok, content),
                     id);
        assert_string_equal(dpoc_tokenizer_id_to_token(tok, id), content);
        n_added++;
    }
    assert_int_equal(n_added, 22);

    /* the pre-tokenizer transformers built for tokenizer.ggml.pre = qwen2: Split(Qwen2's regex,
     * Isolated) then ByteLevel without its own regex and without a prefix space */
    const cJSON *pre = item(t, "pre_tokenizer");
    assert_string_equal(str_item(pre, "type"), "Sequence");
    const cJSON *seq = item(pre, "pretokenizers");
    assert_int_equal(cJSON_GetArraySize(seq), 2);
    const cJSON *split = cJSON_GetArrayItem(seq, 0), *bl = cJSON_GetArrayItem(seq, 1);
    assert_string_equal(str_item(split, "type"), "Split");
    assert_string_equal(str_item(split, "behavior"), "Isolated");
    assert_false(cJSON_IsTrue(item(split, "invert")));
    assert_string_equal(str_item(bl, "type"), "ByteLevel");
    assert_int_equal(tok->n_pre, 2);
    assert_int_equal(tok->pre[0].kind, TOK_PT_SPLIT);
    assert_int_equal(tok->pre[0].behavior, TOK_ISOLATED);
    assert_int_equal(tok->pre[0].invert, 0);
    assert_int_equal(tok->pre[1].kind, TOK_PT_BYTELEVEL);
    assert_int_equal(tok->pre[1].use_regex, cJSON_IsTrue(item(bl, "use_regex")));
    assert_int_equal(tok->pre[1].add_prefix_space, cJSON_IsTrue(item(bl, "add_prefix_space")));
    /* the normalizer: transformers' GGUF conversion builds none; dpoc applies Qwen2's NFC */
    const int hf_nfc = !cJSON_IsNull(item(t, "normalizer"));
    print_message("tokenizer.ggml.pre %s, %zu merges, %zu tokens, %zu added; normalizer: transformers' GGUF "
                  "tokenizer %s, dpoc %s\n",
                  pre_name, n_merges, dpoc_tokenizer_vocab_size(tok), n_added, hf_nfc ? "NFC" : "none",
                  tok->nfc ? "NFC (as Qwen2's tokenizer.json)" : "none");
}

/* ---- tokenizer: the corpus ---- */

enum { CHECK_ENCODE, CHECK_DECODE_SKIP };

/* One pass over the corpus fixture. CHECK_ENCODE: ids with and without special tokens, and
 * decode(ids) with the special tokens kept; CHECK_DECODE_SKIP: decode(ids, skip_special_tokens). */
static void run_corpus(dpoc_tokenizer *tok, int mode) {
    const cJSON *c = item(item(fx(), "tokenizer"), "corpus");
    char rel[256];
    lines_t corpus, exp;
    read_lines(fixture_path(str_item(c, "file")), &corpus);
    snprintf(rel, sizeof rel, "gguf/%s", str_item(c, "fixture"));
    read_lines(fixture_path(rel), &exp);
    const size_t n_corpus = (size_t)item(c, "lines")->valueint, n_extra = (size_t)item(c, "extra_lines")->valueint;
    if (corpus.n != n_corpus)
        fail_msg("%s has %zu lines, the fixture was made from %zu (sha256 %s): regenerate it with "
                 "tools/make_gguf_fixtures.py --model qwen2.5-coder-0.5b",
                 str_item(c, "file"), corpus.n, n_corpus, str_item(c, "sha256"));
    assert_int_equal(exp.n, n_corpus + n_extra);

    const double t0 = now();
    size_t bad = 0, bad_ids = 0, bad_dec = 0, n_nfc = 0, nfc_vs_plain = 0, checks = 0;
    dpoc_ids got = {0}, want = {0}, plain = {0};
    for (size_t i = 0; i < exp.n; i++) {
        const char *line = exp.lines[i];
        cJSON *o = cJSON_Parse(line);
        if (!o) fail_msg("%s line %zu: not JSON", rel, i + 1);
        str text;
        if (i < n_corpus) {
            if (!json_str_field(corpus.lines[i], "text", &text)) fail_msg("corpus line %zu has no text", i + 1);
        } else if (!json_str_field(line, "text", &text)) {
            fail_msg("%s line %zu has no text", rel, i + 1);
        }
        json_ids(item(o, "ids"), &plain);
        const cJSON *nfc = cJSON_GetObjectItemCaseSensitive(o, "ids_nfc");
        json_ids(nfc ? nfc : item(o, "ids"), &want);
        int line_bad = 0;
        dpoc_err err;
        for (int special = 0; mode == CHECK_ENCODE && special <= 1; special++) {
            got.n = 0;
            dpoc_err_clear(&err);
            int rc = dpoc_tokenizer_encode(tok, text.s, text.n, special, &got, &err);
            checks++;
            if (rc || !ids_equal(&got, &want)) {
                if (!line_bad && bad < 5) {
                    print_message("line %zu (add_special_tokens %d): ids differ%s%s\n", i + 1, special,
                                  rc ? ": " : "", rc ? err.msg : "");
                    print_ids("dpoc        ", got.ids, got.n < 40 ? got.n : 40);
                    print_ids(nfc ? "tokenizers (NFC)" : "tokenizers", want.ids, want.n < 40 ? want.n : 40);
                }
                bad_ids += !line_bad;
                line_bad = 1;
            }
            if (nfc && !special) {
                n_nfc++;
                nfc_vs_plain += !rc && ids_equal(&got, &plain);
            }
        }
        /* decoding transformers' ids */
        str dec, dec_skip;
        const int has_dec = json_str_field(line, "decoded", &dec);
        if (!has_dec) dec = text;
        const int has_skip = json_str_field(line, "decoded_skip", &dec_skip);
        if (!has_skip) dec_skip = dec;
        {
            const int skip_special = mode == CHECK_DECODE_SKIP;
            const str *w = skip_special ? &dec_skip : &dec;
            char *out = NULL;
            size_t len = 0;
            dpoc_err_clear(&err);
            int rc = dpoc_tokenizer_decode(tok, plain.ids, plain.n, skip_special, &out, &len, &err);
            checks++;
            if (rc || len != w->n || memcmp(out, w->s, len)) {
                if (!line_bad && bad < 5) {
                    print_message("line %zu: decode(skip_special_tokens=%d) gives '%s', tokenizers '%s'\n", i + 1,
                                  skip_special, out ? out : err.msg, w->s);
                    print_ids("ids", plain.ids, plain.n < 40 ? plain.n : 40);
                }
                bad_dec += !line_bad;
                line_bad = 1;
            }
            free(out);
        }
        if (has_dec) free(dec.s);
        if (has_skip) free(dec_skip.s);
        free(text.s);
        bad += line_bad;
        cJSON_Delete(o);
    }
    print_message("%zu strings (%zu corpus + %zu Qwen-specific), %zu checks in %.2f s: %zu differ (%zu by ids, %zu "
                  "by decoding)\n",
                  exp.n, n_corpus, n_extra, checks, now() - t0, bad, bad_ids, bad_dec);
    if (mode == CHECK_ENCODE) {
        print_message("on %zu strings transformers' GGUF tokenizer (no normalizer, as llama.cpp) and Qwen2's own "
                      "(NFC) give different ids: dpoc gives the NFC ones (it matches the unnormalized ones on %zu)\n",
                      n_nfc, nfc_vs_plain);
        assert_int_equal(n_nfc, (size_t)item(c, "ids_nfc")->valueint);
    }
    dpoc_ids_free(&got);
    dpoc_ids_free(&want);
    dpoc_ids_free(&plain);
    free_lines(&corpus);
    free_lines(&exp);
    if (bad) fail_msg("%zu of %zu strings differ from Hugging Face tokenizers", bad, exp.n);
}

static void test_tokenizer_corpus(void **state) {
    (void)state;
    run_corpus(tokenizer_or_skip("test_tokenizer_corpus"), CHECK_ENCODE);
}

/* decode(skip_special_tokens=True) drops the special tokens only: <tool_call> and </tool_call>
 * are USER_DEFINED (token_type 4) in the GGUF, which transformers adds as non-special tokens
 * (special=False, as in Qwen's tokenizer.json), so tokenizers keeps them. */
static void test_tokenizer_decode_skip_special(void **state) {
    (void)state;
    dpoc_tokenizer *tok = tokenizer_or_skip("test_tokenizer_decode_skip_special");
    size_t n_nonspecial = 0;
    const cJSON *a;
    cJSON_ArrayForEach(a, item(item(fx(), "tokenizer"), "added_tokens")) {
        if (cJSON_IsTrue(item(a, "special"))) continue;
        const int32_t id = (int32_t)item(a, "id")->valueint;
        char *out = NULL;
        size_t len = 0;
        dpoc_err err;
        dpoc_err_clear(&err);
        if (dpoc_tokenizer_decode(tok, &id, 1, 1, &out, &len, &err)) fail_msg("%s", err.msg);
        if (strcmp(out, str_item(a, "content")) != 0)
            print_message("non-special added token %d %s: decode(skip_special_tokens=True) gives '%s' (tokenizers "
                          "keeps it)\n",
                          id, str_item(a, "content"), out);
        free(out);
        n_nonspecial++;
    }
    assert_int_equal(n_nonspecial, 2);
    run_corpus(tok, CHECK_DECODE_SKIP);
}

/* ---- chat template ---- */

static void expect_render(dpoc_chat_kind kind, const dpoc_chat_msg *msgs, size_t n, int agp, const char *want,
                          const char *what) {
    char *out = NULL;
    size_t len = 0;
    dpoc_err err;
    dpoc_err_clear(&err);
    if (dpoc_chat_render(kind, msgs, n, agp, NULL, &out, &len, &err)) fail_msg("%s: %s", what, err.msg);
    const size_t wn = strlen(want);
    if (len != wn || memcmp(out, want, wn)) {
        size_t i = 0;
        while (i < len && i < wn && out[i] == want[i]) i++;
        fail_msg("%s: dpoc's rendering differs from apply_chat_template at byte %zu (%zu vs %zu bytes):\n"
                 "  dpoc:         ...%.60s\n  transformers: ...%.60s",
                 what, i, len, wn, out + (i > 20 ? i - 20 : 0), want + (i > 20 ? i - 20 : 0));
    }
    free(out);
}

static void test_chat_template(void **state) {
    (void)state;
    dpoc_tokenizer *tok = tokenizer_or_skip("test_chat_template");
    const char *jinja = dpoc_tokenizer_chat_template(tok);
    assert_non_null(jinja);
    dpoc_chat_kind kind;
    dpoc_err err;
    dpoc_err_clear(&err);
    if (dpoc_chat_detect(jinja, &kind, &err)) fail_msg("the GGUF's chat template: %s", err.msg);
    assert_string_equal(dpoc_chat_kind_name(kind), "qwen2.5");

    size_t n_chats = 0;
    dpoc_ids got = {0}, want = {0};
    const cJSON *ch;
    cJSON_ArrayForEach(ch, item(fx(), "chat")) {
        dpoc_chat_msg msgs[8];
        size_t n = 0;
        const cJSON *m;
        cJSON_ArrayForEach(m, item(ch, "messages")) {
            assert_true(n < 8);
            msgs[n++] = (dpoc_chat_msg){str_item(m, "role"), str_item(m, "content")};
        }
        const char *text = str_item(ch, "text");
        char what[64];
        snprintf(what, sizeof what, "conversation %zu", n_chats);
        expect_render(kind, msgs, n, cJSON_IsTrue(item(ch, "add_generation_prompt")), text, what);
        if (strcmp(msgs[0].role, "system") != 0)
            assert_true(strncmp(text, "<|im_start|>system\n" QWEN_SYSTEM "<|im_end|>\n",
                                strlen("<|im_start|>system\n" QWEN_SYSTEM "<|im_end|>\n")) == 0);
        json_ids(item(ch, "ids"), &want);
        got.n = 0;
        if (dpoc_tokenizer_encode(tok, text, strlen(text), 0, &got, &err)) fail_msg("%s", err.msg);
        if (!ids_equal(&got, &want)) {
            print_ids("dpoc        ", got.ids, got.n);
            print_ids("transformers", want.ids, want.n);
            fail_msg("%s: ids differ from apply_chat_template's", what);
        }
        n_chats++;
    }
    assert_int_equal(n_chats, 6);

    /* the parity prompts: [user text] rendered and encoded by dpoc are transformers' input_ids */
    size_t n_prompts = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, item(fx(), "prompts")) {
        const dpoc_chat_msg msg = {"user", str_item(p, "text")};
        char *out = NULL;
        size_t len = 0;
        if (dpoc_chat_render(kind, &msg, 1, 1, NULL, &out, &len, &err)) fail_msg("%s", err.msg);
        got.n = 0;
        if (dpoc_tokenizer_encode(tok, out, len, 1, &got, &err)) fail_msg("%s", err.msg);
        free(out);
        json_ids(item(p, "input_ids"), &want);
        if (!ids_equal(&got, &want)) {
            print_ids("dpoc        ", got.ids, got.n);
            print_ids("transformers", want.ids, want.n);
            fail_msg("prompt %zu: dpoc's rendered and encoded ids differ from transformers'", n_prompts);
        }
        n_prompts++;
    }
    print_message("chat template qwen2.5 (default system prompt): %zu conversations and %zu prompts rendered and "
                  "encoded as transformers does\n",
                  n_chats, n_prompts);
    dpoc_ids_free(&got);
    dpoc_ids_free(&want);
}

/* ---- logits ---- */

static void test_logits(void **state) {
    (void)state;
    const dpoc_model *m = model_or_skip("test_logits");
    const cJSON *f = fx();
    const size_t C = m->cfg.hidden_size, V = m->cfg.vocab_size;
    const cJSON *cfg = item(f, "config");
    assert_int_equal(V, (size_t)item(cfg, "vocab_size")->valueint);
    assert_int_equal(C, (size_t)item(cfg, "hidden_size")->valueint);
    assert_int_equal(m->cfg.n_layers, (size_t)item(cfg, "num_hidden_layers")->valueint);
    assert_int_equal(m->cfg.n_heads, (size_t)item(cfg, "num_attention_heads")->valueint);
    assert_int_equal(m->cfg.n_kv_heads, (size_t)item(cfg, "num_key_value_heads")->valueint);
    assert_int_equal(m->cfg.intermediate_size, (size_t)item(cfg, "intermediate_size")->valueint);
    assert_int_equal(m->cfg.tie_word_embeddings, cJSON_IsTrue(item(cfg, "tie_word_embeddings")));
    assert_int_equal(m->cfg.qkv_bias, cJSON_IsTrue(item(cfg, "attention_bias")));
    assert_true(m->cfg.arch == DPOC_ARCH_QWEN2);
    const size_t K = (size_t)item(f, "top_k")->valueint;
    const cJSON *sampled_ids = item(f, "sampled_ids");
    const size_t S = (size_t)cJSON_GetArraySize(sampled_ids);
    assert_true(K >= 1 && S >= 1);

    const double t0 = now();
    double worst_logit = 0, worst_lse = 0, worst_head_lse = 0, min_margin = INFINITY;
    size_t n_prompts = 0, n_positions = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, item(f, "prompts")) {
        dpoc_ids ids = {0};
        json_ids(item(p, "input_ids"), &ids);
        const size_t T = ids.n;
        assert_true(T >= 2);
        const cJSON *lse_fx = item(p, "logsumexp"), *top_ids = item(p, "top_ids"), *top_logits = item(p, "top_logits"),
                    *sampled = item(p, "sampled_logits"), *margins = item(p, "top2_margin");
        assert_int_equal((size_t)cJSON_GetArraySize(lse_fx), T);

        dpoc_err err;
        dpoc_err_clear(&err);
        dpoc_acts a;
        if (dpoc_acts_alloc(&a, &m->cfg, T, &err)) fail_msg("%s", err.msg);
        dpoc_model_forward(m, &a, ids.ids, T, 0, T - 1);
        float *logits = malloc(T * V * sizeof *logits);
        assert_non_null(logits);
        matmul_forward(logits, a.lnf, (const float *)m->lm_head.w, NULL, T, C, V);

        double max_logit = 0, max_lse = 0, max_head_lse = 0;
        size_t worst_t = 0;
        for (size_t t = 0; t < T; t++) {
            const float *z = logits + t * V;
            /* log-sum-exp (double) and the first maximal index, as torch.argmax */
            size_t best = 0;
            for (size_t v = 1; v < V; v++)
                if (z[v] > z[best]) best = v;
            double s = 0;
            for (size_t v = 0; v < V; v++) s += exp((double)z[v] - (double)z[best]);
            const double lse = (double)z[best] + log(s);
            const double want_lse = cJSON_GetArrayItem(lse_fx, (int)t)->valuedouble;
            if (!(fabs(lse - want_lse) <= max_lse)) max_lse = isnan(lse) ? INFINITY : fabs(lse - want_lse);
            if (!(fabs(lse - want_lse) <= LSE_ATOL))
                fail_msg("prompt %zu position %zu: logsumexp %.6f, transformers %.6f", n_prompts, t, lse, want_lse);
            /* dpoc's own head (scored rows 0..T-2) computes the same normaliser */
            if (t + 1 < T) {
                const double d = fabs((double)a.lse[t] - want_lse);
                if (!(d <= max_head_lse)) max_head_lse = isnan(d) ? INFINITY : d;
                if (!(d <= LSE_ATOL))
                    fail_msg("prompt %zu row %zu: head lse %.6f, transformers %.6f", n_prompts, t, (double)a.lse[t],
                             want_lse);
            }
            const double margin = cJSON_GetArrayItem(margins, (int)t)->valuedouble;
            if (margin < min_margin) min_margin = margin;

            const cJSON *ti = row(top_ids, t, K, "top_ids"), *tl = row(top_logits, t, K, "top_logits");
            for (size_t k = 0; k < K; k++) {
                const int id = cJSON_GetArrayItem(ti, (int)k)->valueint;
                assert_true(id >= 0 && (size_t)id < V);
                const double want = cJSON_GetArrayItem(tl, (int)k)->valuedouble;
                const double d = fabs((double)z[id] - want);
                if (!(d <= max_logit)) {
                    max_logit = isnan(d) ? INFINITY : d;
                    worst_t = t;
                }
                if (!(d <= LOGIT_ATOL))
                    fail_msg("prompt %zu position %zu: logit of id %d (top-%zu) is %.6f, transformers %.6f", n_prompts,
                             t, id, k + 1, (double)z[id], want);
            }
            const int want_top1 = cJSON_GetArrayItem(ti, 0)->valueint;
            if ((int)best != want_top1)
                fail_msg("prompt %zu position %zu: argmax %zu (logit %.6f), transformers %d (logit %.6f there)",
                         n_prompts, t, best, (double)z[best], want_top1, (double)z[want_top1]);

            const cJSON *sl = row(sampled, t, S, "sampled_logits");
            for (size_t j = 0; j < S; j++) {
                const int id = cJSON_GetArrayItem(sampled_ids, (int)j)->valueint;
                assert_true(id >= 0 && (size_t)id < V);
                const double want = cJSON_GetArrayItem(sl, (int)j)->valuedouble;
                const double d = fabs((double)z[id] - want);
                if (!(d <= max_logit)) {
                    max_logit = isnan(d) ? INFINITY : d;
                    worst_t = t;
                }
                if (!(d <= LOGIT_ATOL))
                    fail_msg("prompt %zu position %zu: logit of sampled id %d is %.6f, transformers %.6f", n_prompts,
                             t, id, (double)z[id], want);
            }
        }
        print_message("prompt %zu (%zu tokens): max |logit diff| %.3g (position %zu), max |logsumexp diff| %.3g "
                      "(head %.3g)\n",
                      n_prompts, T, max_logit, worst_t, max_lse, max_head_lse);
        if (max_logit > worst_logit) worst_logit = max_logit;
        if (max_lse > worst_lse) worst_lse = max_lse;
        if (max_head_lse > worst_head_lse) worst_head_lse = max_head_lse;
        n_positions += T;
        n_prompts++;
        free(logits);
        dpoc_acts_free(&a);
        dpoc_ids_free(&ids);
    }
    assert_int_equal(n_prompts, 3);
    print_message("Qwen2.5-Coder-0.5B Q4_K_M vs transformers: %zu positions x (%zu top + %zu sampled) logits, max "
                  "|diff| %.3g (tolerance %.0e); max |logsumexp diff| %.3g, head %.3g; top-1 equal everywhere "
                  "(smallest top1-top2 gap %.3g); %.1f s\n",
                  n_positions, K, S, worst_logit, LOGIT_ATOL, worst_lse, worst_head_lse, min_margin, now() - t0);
}

/* ---- greedy generation ---- */

static void test_generate(void **state) {
    (void)state;
    const dpoc_model *m = model_or_skip("test_generate");
    const cJSON *f = fx();

    dpoc_gen_opts o;
    dpoc_gen_opts_default(&o);
    o.temperature = 0;
    o.top_p = 1;
    o.max_new_tokens = (size_t)item(f, "max_new_tokens")->valueint;
    assert_int_equal(o.max_new_tokens, 32);
    /* generation_config.eos_token_id: an int or a list */
    const cJSON *eos = item(f, "eos_token_id");
    o.n_stop = 0;
    if (cJSON_IsArray(eos)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, eos) {
            assert_true(o.n_stop < DPOC_GEN_MAX_STOP);
            o.stop_ids[o.n_stop++] = (int32_t)it->valueint;
        }
    } else {
        o.stop_ids[o.n_stop++] = (int32_t)eos->valueint;
    }

    enum { N = 3 };
    dpoc_ids prompts[N] = {{0}}, want[N] = {{0}};
    const cJSON *prompts_fx = item(f, "prompts");
    assert_int_equal(cJSON_GetArraySize(prompts_fx), N);
    for (size_t i = 0; i < N; i++) {
        const cJSON *p = cJSON_GetArrayItem(prompts_fx, (int)i);
        json_ids(item(p, "input_ids"), &prompts[i]);
        json_ids(item(p, "generated_ids"), &want[i]);
    }

    const size_t batches[] = {3, 1};
    for (size_t b = 0; b < sizeof batches / sizeof *batches; b++) {
        o.max_batch = batches[b];
        dpoc_ids out[N] = {{0}};
        dpoc_err err;
        dpoc_err_clear(&err);
        const double t0 = now();
        if (dpoc_generate(m, prompts, N, &o, out, &err))
            fail_msg("dpoc_generate (max_batch %zu): %s", o.max_batch, err.msg);
        const double dt = now() - t0;
        for (size_t i = 0; i < N; i++) {
            size_t same = 0;
            while (same < out[i].n && same < want[i].n && out[i].ids[same] == want[i].ids[same]) same++;
            if (same != want[i].n || out[i].n != want[i].n) {
                print_ids("dpoc        ", out[i].ids, out[i].n);
                print_ids("transformers", want[i].ids, want[i].n);
                fail_msg("max_batch %zu, prompt %zu: dpoc's greedy ids differ from transformers' from token %zu on "
                         "(%zu vs %zu tokens)",
                         o.max_batch, i, same, out[i].n, want[i].n);
            }
        }
        print_message("greedy generation, max_batch %zu: %zu + %zu + %zu tokens identical to transformers (%.1f s)\n",
                      o.max_batch, out[0].n, out[1].n, out[2].n, dt);
        for (size_t i = 0; i < N; i++) dpoc_ids_free(&out[i]);
    }
    for (size_t i = 0; i < N; i++) {
        dpoc_ids_free(&prompts[i]);
        dpoc_ids_free(&want[i]);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenizer_facts),
        cmocka_unit_test(test_tokenizer_corpus),
        cmocka_unit_test(test_tokenizer_decode_skip_special),
        cmocka_unit_test(test_chat_template),
        cmocka_unit_test(test_logits),
        cmocka_unit_test(test_generate),
    };
    return cmocka_run_group_tests(tests, NULL, teardown_group);
}
