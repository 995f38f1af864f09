/* Preference rows -> ids (see prefs.h). */
#include "dpoc/prefs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const PRETOK_KEYS[3][2] = {
    {"prompt_input_ids", "prompt_ids"},
    {"chosen_input_ids", "chosen_ids"},
    {"rejected_input_ids", "rejected_ids"},
};
static const char *const TEXT_KEYS[3] = {"prompt", "chosen", "rejected"};

static const cJSON *get(const cJSON *row, const char *key) { return cJSON_GetObjectItemCaseSensitive(row, key); }

static int pretokenized(const dpoc_prefs_ctx *ctx, const cJSON *row, dpoc_ids *out[3], dpoc_err *err) {
    for (int f = 0; f < 3; f++) {
        const char *used = PRETOK_KEYS[f][0];
        const cJSON *arr = get(row, used);
        if (!arr) arr = get(row, used = PRETOK_KEYS[f][1]);
        if (!arr) return dpoc_errf(err, DPOC_EINPUT, "missing key '%s'", PRETOK_KEYS[f][0]);
        if (!cJSON_IsArray(arr)) return dpoc_errf(err, DPOC_EINPUT, "key '%s' must be a list of token ids", used);
        if (f > 0 && cJSON_GetArraySize(arr) == 0)
            return dpoc_errf(err, DPOC_EINPUT, "key '%s' is empty (a completion needs at least one token)", used);
        size_t i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, arr) {
            double v = cJSON_IsNumber(it) ? it->valuedouble : -1.0;
            if (!cJSON_IsNumber(it) || v != floor(v) || v < 0 || v >= (double)ctx->vocab_size)
                return dpoc_errf(err, DPOC_EINPUT, "key '%s' item %zu is not a token id in [0, %zu)", used, i,
                                 ctx->vocab_size);
            DPOC_TRY(dpoc_ids_push(out[f], (int32_t)v, err));
            i++;
        }
    }
    return 0;
}

/* ---- TRL's extract_prompt, in Python's semantics ---- */

/* Byte offsets of every code point of s (n_cp + 1 entries, the last = strlen). */
static int cp_offsets(const char *s, size_t **off, size_t *n_cp, dpoc_err *err) {
    size_t n = strlen(s);
    *off = dpoc_malloc((n + 1) * sizeof **off, "code points", err);
    if (!*off) return DPOC_ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) (*off)[k++] = i;
    (*off)[k] = n;
    *n_cp = k;
    return 0;
}

/* Python's s[a:] / s[:a] index for a possibly negative a over n items. */
static size_t py_index(long a, size_t n) {
    if (a < 0) a += (long)n;
    if (a < 0) a = 0;
    return (size_t)a > n ? n : (size_t)a;
}

/* The split index of extract_prompt over m = min(len) items, where differ(i)
 * says whether item i differs and is_space(i) whether chosen[i] is " ".
 * Returns 0 and the (possibly negative) index, or an error when m == 0 (TRL
 * raises there). */
typedef int (*differ_fn)(const void *ctx, size_t i);
typedef int (*space_fn)(const void *ctx, long i);
static int extract_index(size_t m, differ_fn differ, space_fn is_space, const void *ctx, long *idx_out, dpoc_err *err) {
    if (m == 0) return dpoc_errf(err, DPOC_EINPUT, "chosen or rejected is empty, so no prompt can be extracted");
    long idx = 0;
    for (size_t i = 0; i < m; i++) {
        idx = (long)i;
        if (differ(ctx, i)) {
            if (is_space(ctx, idx - 1)) idx -= 1; /* Python: chosen[-1] when idx == 0 */
            *idx_out = idx;
            return 0;
        }
    }
    *idx_out = idx; /* no difference: the loop variable keeps its last value, m - 1 */
    return 0;
}

typedef struct {
    const char *c, *r;
    const size_t *oc, *orr;
    size_t nc, nr;
} str_pair;

static int str_differ(const void *x, size_t i) {
    const str_pair *p = x;
    size_t lc = p->oc[i + 1] - p->oc[i], lr = p->orr[i + 1] - p->orr[i];
    return lc != lr || memcmp(p->c + p->oc[i], p->r + p->orr[i], lc) != 0;
}
static int str_is_space(const void *x, long i) {
    const str_pair *p = x;
    size_t k = py_index(i, p->nc);
    if (i < 0 && (size_t)(-i) > p->nc) return 0;
    return k < p->nc && p->oc[k + 1] - p->oc[k] == 1 && p->c[p->oc[k]] == ' ';
}

typedef struct {
    const cJSON *c, *r;
} msg_pair;
static int msg_differ(const void *x, size_t i) {
    const msg_pair *p = x;
    return !cJSON_Compare(cJSON_GetArrayItem(p->c, (int)i), cJSON_GetArrayItem(p->r, (int)i), 1);
}
static int msg_is_space(const void *x, long i) { return 0; } /* a message is never the string " " */

/* ---- text rows ---- */

static int dup_range(const char *s, size_t a, size_t b, const char *append, char **out, dpoc_err *err) {
    size_t extra = append ? strlen(append) : 0;
    *out = dpoc_malloc(b - a + extra + 1, "text", err);
    if (!*out) return DPOC_ENOMEM;
    memcpy(*out, s + a, b - a);
    if (extra) memcpy(*out + (b - a), append, extra);
    (*out)[b - a + extra] = '\0';
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return m <= n && memcmp(s + n - m, suffix, m) == 0;
}

static int tokenize_text(dpoc_tokenizer *tok, const char *text, int special, dpoc_ids *out, dpoc_err *err) {
    out->n = 0;
    return dpoc_tokenizer_encode(tok, text, strlen(text), special, out, err);
}

static size_t common_prefix(const dpoc_ids *a, const dpoc_ids *b) {
    size_t n = 0;
    while (n < a->n && n < b->n && a->ids[n] == b->ids[n]) n++;
    return n;
}

/* prompt_ids, prompt+chosen, prompt+rejected -> the split TRL makes */
static int split_ids(dpoc_ids *p, dpoc_ids *pc, dpoc_ids *pr, dpoc_ids *out[3], dpoc_err *err) {
    size_t a = common_prefix(p, pc), b = common_prefix(p, pr);
    size_t plen = a < b ? a : b;
    for (size_t i = 0; i < plen; i++) DPOC_TRY(dpoc_ids_push(out[0], p->ids[i], err));
    for (size_t i = plen; i < pc->n; i++) DPOC_TRY(dpoc_ids_push(out[1], pc->ids[i], err));
    for (size_t i = plen; i < pr->n; i++) DPOC_TRY(dpoc_ids_push(out[2], pr->ids[i], err));
    return 0;
}

static int standard(const dpoc_prefs_ctx *ctx, const cJSON *row, dpoc_ids *out[3], dpoc_err *err) {
    const cJSON *jp = get(row, "prompt"), *jc = get(row, "chosen"), *jr = get(row, "rejected");
    for (int f = jp ? 0 : 1; f < 3; f++)
        if (!cJSON_IsString(get(row, TEXT_KEYS[f])))
            return dpoc_errf(err, DPOC_EINPUT, "key '%s' must be a string like the others", TEXT_KEYS[f]);
    const char *eos = dpoc_tokenizer_eos_token(ctx->tok);
    if (!eos) return dpoc_errf(err, DPOC_EINPUT, "the tokenizer has no eos_token, which TRL appends to completions");
    for (int f = 1; f < 3; f++)
        if (get(row, TEXT_KEYS[f])->valuestring[0] == '\0')
            return dpoc_errf(err, DPOC_EINPUT, "key '%s' is empty", TEXT_KEYS[f]);
    char *prompt = NULL, *chosen = NULL, *rejected = NULL;
    size_t *oc = NULL, *orr = NULL;
    int rc = 0;
    if (jp) {
        if ((rc = dup_range(jp->valuestring, 0, strlen(jp->valuestring), NULL, &prompt, err))) goto out;
        if ((rc = dup_range(jc->valuestring, 0, strlen(jc->valuestring), NULL, &chosen, err))) goto out;
        if ((rc = dup_range(jr->valuestring, 0, strlen(jr->valuestring), NULL, &rejected, err))) goto out;
    } else {
        const char *c = jc->valuestring, *r = jr->valuestring;
        size_t nc, nr;
        if ((rc = cp_offsets(c, &oc, &nc, err)) || (rc = cp_offsets(r, &orr, &nr, err))) goto out;
        str_pair sp = {c, r, oc, orr, nc, nr};
        long idx = 0;
        if ((rc = extract_index(nc < nr ? nc : nr, str_differ, str_is_space, &sp, &idx, err))) goto out;
        size_t kc = py_index(idx, nc), kr = py_index(idx, nr);
        if ((rc = dup_range(c, 0, oc[kc], NULL, &prompt, err))) goto out;
        if ((rc = dup_range(c, oc[kc], oc[nc], NULL, &chosen, err))) goto out;
        if ((rc = dup_range(r, orr[kr], orr[nr], NULL, &rejected, err))) goto out;
    }
    /* EOS appended when missing (TRL's add_eos), then prompt+completion as one text */
    char *texts[3] = {NULL, NULL, NULL};
    texts[0] = prompt;
    const char *comps[2] = {chosen, rejected};
    for (int k = 0; k < 2 && !rc; k++) {
        const char *tail = ends_with(comps[k], eos) ? "" : eos;
        size_t n = strlen(prompt) + strlen(comps[k]) + strlen(tail) + 1;
        texts[k + 1] = dpoc_malloc(n, "text", err);
        if (!texts[k + 1]) rc = DPOC_ENOMEM;
        else snprintf(texts[k + 1], n, "%s%s%s", prompt, comps[k], tail);
    }
    dpoc_ids ids[3] = {{0}};
    for (int k = 0; k < 3 && !rc; k++) rc = tokenize_text(ctx->tok, texts[k], 1, &ids[k], err);
    if (!rc) rc = split_ids(&ids[0], &ids[1], &ids[2], out, err);
    for (int k = 0; k < 3; k++) dpoc_ids_free(&ids[k]);
    free(texts[1]);
    free(texts[2]);
out:
    free(prompt);
    free(chosen);
    free(rejected);
    free(oc);
    free(orr);
    return rc;
}

/* messages [a, b) of a JSON list, checked, as dpoc_chat_msg */
static int collect_msgs(const cJSON *list, size_t a, size_t b, dpoc_chat_msg *dst, size_t *n, const char *key,
                        dpoc_err *err) {
    for (size_t i = a; i < b; i++) {
        const cJSON *m = cJSON_GetArrayItem(list, (int)i);
        const cJSON *role = cJSON_IsObject(m) ? get(m, "role") : NULL, *content = cJSON_IsObject(m) ? get(m, "content") : NULL;
        if (!cJSON_IsString(role) || !cJSON_IsString(content))
            return dpoc_errf(err, DPOC_EINPUT, "key '%s' message %zu needs string 'role' and 'content'", key, i);
        dst[(*n)++] = (dpoc_chat_msg){role->valuestring, content->valuestring};
    }
    return 0;
}

static int render_tokenize(const dpoc_prefs_ctx *ctx, const dpoc_chat_msg *msgs, size_t n, int gen, dpoc_ids *ids,
                           dpoc_err *err) {
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_chat_render((dpoc_chat_kind)ctx->chat_kind, msgs, n, gen, dpoc_tokenizer_bos_token(ctx->tok), &text,
                              &len, err));
    ids->n = 0;
    /* transformers' apply_chat_template(tokenize=True) adds no special tokens: the template has them */
    int rc = dpoc_tokenizer_encode(ctx->tok, text, len, 0, ids, err);
    free(text);
    return rc;
}

static int conversational(const dpoc_prefs_ctx *ctx, const cJSON *row, dpoc_ids *out[3], dpoc_err *err) {
    if (ctx->chat_kind < 0)
        return dpoc_errf(err, DPOC_EINPUT,
                         "conversational rows need a chat template: the tokenizer has none dpoc recognises; set the "
                         "config key chat_template (chatml, qwen2.5, smollm2, llama3)");
    const cJSON *jp = get(row, "prompt"), *jc = get(row, "chosen"), *jr = get(row, "rejected");
    for (int f = jp ? 0 : 1; f < 3; f++)
        if (!cJSON_IsArray(get(row, TEXT_KEYS[f])))
            return dpoc_errf(err, DPOC_EINPUT, "key '%s' must be a list of messages like the others", TEXT_KEYS[f]);
    size_t np_ = jp ? (size_t)cJSON_GetArraySize(jp) : 0, nc = (size_t)cJSON_GetArraySize(jc),
           nr = (size_t)cJSON_GetArraySize(jr);
    if (nc == 0 || nr == 0) return dpoc_errf(err, DPOC_EINPUT, "key '%s' is an empty conversation", nc ? "rejected" : "chosen");
    size_t pa = 0, ca = 0, ra = 0; /* where chosen / rejected start after an extracted prompt */
    const cJSON *prompt_src = jp;
    if (!jp) {
        msg_pair mp = {jc, jr};
        long idx = 0;
        DPOC_TRY(extract_index(nc < nr ? nc : nr, msg_differ, msg_is_space, &mp, &idx, err));
        pa = py_index(idx, nc);
        ca = pa;
        ra = py_index(idx, nr);
        prompt_src = jc;
        np_ = pa;
    }
    size_t cap = np_ + (nc > nr ? nc : nr) + 1;
    dpoc_chat_msg *msgs = dpoc_malloc(cap * sizeof *msgs, "messages", err);
    if (!msgs) return DPOC_ENOMEM;
    dpoc_ids ids[3] = {{0}};
    size_t n = 0;
    int rc = collect_msgs(prompt_src, 0, np_, msgs, &n, jp ? "prompt" : "chosen", err);
    const size_t n_prompt = n;
    if (!rc) rc = render_tokenize(ctx, msgs, n_prompt, 1, &ids[0], err);
    if (!rc && !(rc = collect_msgs(jc, ca, nc, msgs, &n, "chosen", err))) rc = render_tokenize(ctx, msgs, n, 0, &ids[1], err);
    n = n_prompt;
    if (!rc && !(rc = collect_msgs(jr, ra, nr, msgs, &n, "rejected", err)))
        rc = render_tokenize(ctx, msgs, n, 0, &ids[2], err);
    if (!rc) rc = split_ids(&ids[0], &ids[1], &ids[2], out, err);
    for (int k = 0; k < 3; k++) dpoc_ids_free(&ids[k]);
    free(msgs);
    return rc;
}

int dpoc_prefs_tokenize_row(const dpoc_prefs_ctx *ctx, const cJSON *row, dpoc_ids *prompt, dpoc_ids *chosen,
                            dpoc_ids *rejected, dpoc_err *err) {
    dpoc_ids *out[3] = {prompt, chosen, rejected};
    prompt->n = chosen->n = rejected->n = 0;
    if (!cJSON_IsObject(row)) return dpoc_errf(err, DPOC_EINPUT, "expected a JSON object");
    int rc;
    if (get(row, "chosen_input_ids") || get(row, "chosen_ids")) {
        rc = pretokenized(ctx, row, out, err);
    } else {
        const cJSON *jc = get(row, "chosen"), *jr = get(row, "rejected");
        if (!jc || !jr)
            return dpoc_errf(err, DPOC_EINPUT,
                             "missing key '%s' (rows need chosen and rejected, and optionally prompt; or the "
                             "pre-tokenized *_input_ids keys)",
                             jc ? "rejected" : "chosen");
        if (!ctx->tok)
            return dpoc_errf(err, DPOC_EINPUT, "text rows need a tokenizer (tokenizer.json in the model directory)");
        for (int f = 1; f < 3; f++) {
            const cJSON *v = f == 1 ? jc : jr;
            if (!cJSON_IsString(v) && !cJSON_IsArray(v))
                return dpoc_errf(err, DPOC_EINPUT, "key '%s' must be a string or a list of messages", TEXT_KEYS[f]);
        }
        if (cJSON_Compare(jc, jr, 1)) return dpoc_errf(err, DPOC_EINPUT, "chosen and rejected are identical");
        rc = cJSON_IsString(jc) ? standard(ctx, row, out, err) : conversational(ctx, row, out, err);
    }
    if (!rc && (chosen->n == 0 || rejected->n == 0))
        rc = dpoc_errf(err, DPOC_EINPUT, "the %s completion has no tokens after tokenization", chosen->n ? "rejected" : "chosen");
    if (!rc && chosen->n == rejected->n && !memcmp(chosen->ids, rejected->ids, chosen->n * sizeof(int32_t)))
        rc = dpoc_errf(err, DPOC_EINPUT, "chosen and rejected are identical");
    return rc;
}
