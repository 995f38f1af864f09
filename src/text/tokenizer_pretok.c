/* Text before the model: added-token extraction (added_vocabulary.rs), NFC
 * (utf8proc), and the pre-tokenizers ByteLevel, Split and Digits
 * (tokenizers/src/pre_tokenizers, tokenizer/normalizer.rs split behaviours,
 * tokenizer/pattern.rs and onig's find_iter for matching). Regexes run on
 * PCRE2 with Unicode properties. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "text/tokenizer_internal.h"

/* tokenizers' pre_tokenizers/byte_level.rs RE (SysRegex = Oniguruma) */
static const char gpt2_regex[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* Oniguruma's \s is Unicode White_Space, [\t-\r\x85\p{Z}]; PCRE2's (UCP) also takes U+180E
 * (through \h), so \s and \S are spelled out before compiling. Inside a class \S is kept
 * (no pattern we know uses it); the difference would only be U+180E. */
static int translate_regex(const char *p, size_t n, tok_buf *out, dpoc_err *err) {
    static const char ws_in_class[] = "\\x{09}-\\x{0d}\\x{85}\\p{Z}";
    int in_class = 0;
    out->n = 0;
    for (size_t i = 0; i < n;) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char d = p[i + 1];
            if (d == 's') {
                if (!in_class) DPOC_TRY(tok_buf_append(out, "[", 1, err));
                DPOC_TRY(tok_buf_append(out, ws_in_class, sizeof ws_in_class - 1, err));
                if (!in_class) DPOC_TRY(tok_buf_append(out, "]", 1, err));
            } else if (d == 'S' && !in_class) {
                DPOC_TRY(tok_buf_append(out, "[^", 2, err));
                DPOC_TRY(tok_buf_append(out, ws_in_class, sizeof ws_in_class - 1, err));
                DPOC_TRY(tok_buf_append(out, "]", 1, err));
            } else {
                DPOC_TRY(tok_buf_append(out, p + i, 2, err));
            }
            i += 2;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = 1;
            DPOC_TRY(tok_buf_append(out, "[", 1, err));
            i++;
            if (i < n && p[i] == '^') {
                DPOC_TRY(tok_buf_append(out, "^", 1, err));
                i++;
            }
            if (i < n && p[i] == ']') { /* a leading ] is a literal */
                DPOC_TRY(tok_buf_append(out, "]", 1, err));
                i++;
            }
            continue;
        }
        if (c == ']' && in_class) in_class = 0;
        DPOC_TRY(tok_buf_append(out, &c, 1, err));
        i++;
    }
    return 0;
}

int tok_regex_compile(const char *pattern, size_t len, int literal, pcre2_code **re, int *jit, const char *what,
                      dpoc_err *err) {
    tok_buf tr = {0};
    const char *src = pattern;
    size_t src_len = len;
    uint32_t opts = PCRE2_UTF;
    if (literal) {
        opts |= PCRE2_LITERAL;
    } else {
        opts |= PCRE2_UCP;
        int rc = translate_regex(pattern, len, &tr, err);
        if (rc) {
            tok_buf_free(&tr);
            return rc;
        }
        src = tr.p ? tr.p : "";
        src_len = tr.n;
    }
    int ecode;
    PCRE2_SIZE eoff;
    *re = pcre2_compile((PCRE2_SPTR)src, src_len, opts, &ecode, &eoff, NULL);
    tok_buf_free(&tr);
    if (!*re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ecode, msg, sizeof msg);
        return dpoc_errf(err, DPOC_EINPUT, "%s: cannot compile regex '%.*s': %s (at offset %zu)", what,
                         (int)(len > 300 ? 300 : len), pattern, (const char *)msg, (size_t)eoff);
    }
    /* JIT is much faster; without it (platform or memory) the interpreter gives the same matches */
    *jit = pcre2_jit_compile(*re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

int tok_regex_setup(dpoc_tokenizer *tok, dpoc_err *err) {
    int need_gpt2 = 0;
    for (size_t i = 0; i < tok->n_pre; i++)
        if (tok->pre[i].kind == TOK_PT_BYTELEVEL && tok->pre[i].use_regex) need_gpt2 = 1;
    if (need_gpt2 && !tok->gpt2_re)
        DPOC_TRY(tok_regex_compile(gpt2_regex, strlen(gpt2_regex), 0, &tok->gpt2_re, &tok->gpt2_jit,
                                   "ByteLevel pre-tokenizer", err));
    tok->md = pcre2_match_data_create(1, NULL);
    tok->mctx = pcre2_match_context_create(NULL);
    /* a large JIT stack: long runs of spaces or letters backtrack deeply in \s+(?!\S) */
    tok->jit_stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, NULL);
    if (!tok->md || !tok->mctx || !tok->jit_stack)
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory creating regex match data");
    pcre2_jit_stack_assign(tok->mctx, NULL, tok->jit_stack);
    /* bounds the interpreter on pathological patterns (fuzzing); real patterns stay far below */
    pcre2_set_match_limit(tok->mctx, 50u * 1000u * 1000u);
    return 0;
}

/* Pattern::find_matches for a regex with onig's FindMatches iteration: an empty match right
 * after the previous match is skipped by advancing one character. */
static int regex_find(dpoc_tokenizer *tok, const pcre2_code *re, int jit, const char *s, size_t n,
                      tok_pieces *out, dpoc_err *err) {
    out->n = 0;
    if (n == 0) return tok_pieces_push(out, 0, 0, 0, err);
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(tok->md);
    size_t prev = 0, last_end = 0, last_match_end = 0;
    int has_last = 0;
    while (last_end <= n) {
        int rc = jit ? pcre2_jit_match(re, (PCRE2_SPTR)s, n, last_end, 0, tok->md, tok->mctx)
                     : pcre2_match(re, (PCRE2_SPTR)s, n, last_end, PCRE2_NO_UTF_CHECK, tok->md, tok->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return dpoc_errf(err, DPOC_EINPUT, "pre-tokenizer regex failed: %s", (const char *)msg);
        }
        size_t ms = ov[0], me = ov[1];
        if (me < ms || me > n) return dpoc_errf(err, DPOC_EINPUT, "pre-tokenizer regex gave an unusable match");
        if (ms == me && has_last && last_match_end == me) {
            if (last_end < n) {
                int32_t cp;
                last_end += tok_utf8_next(s + last_end, n - last_end, &cp);
            } else {
                last_end++;
            }
            continue;
        }
        last_end = me;
        last_match_end = me;
        has_last = 1;
        if (ms < prev) continue; /* only \K-style patterns could do this; keep pieces ordered */
        if (prev != ms) DPOC_TRY(tok_pieces_push(out, prev, ms, 0, err));
        DPOC_TRY(tok_pieces_push(out, ms, me, 1, err));
        prev = me;
    }
    if (prev != n) DPOC_TRY(tok_pieces_push(out, prev, n, 0, err));
    return 0;
}

static int is_numeric(int32_t cp) {
    /* Rust's char::is_numeric: general categories Nd, Nl, No */
    utf8proc_category_t c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
}

/* Pattern::find_matches for a char predicate (Digits). */
static int digits_find(const char *s, size_t n, tok_pieces *out, dpoc_err *err) {
    out->n = 0;
    if (n == 0) return tok_pieces_push(out, 0, 0, 0, err);
    size_t last_offset = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        size_t l = tok_utf8_next(s + i, n - i, &cp);
        if (is_numeric(cp)) {
            if (last_offset < i) DPOC_TRY(tok_pieces_push(out, last_offset, i, 0, err));
            DPOC_TRY(tok_pieces_push(out, i, i + l, 1, err));
            last_offset = i + l;
        }
        i += l;
    }
    if (n > last_offset) DPOC_TRY(tok_pieces_push(out, last_offset, n, 0, err));
    return 0;
}

/* NormalizedString::split: applies the delimiter behaviour to pieces (in place) and appends the
 * kept, non-empty ones (offset base) to dst. */
static int apply_behavior(tok_pieces *p, int behavior, int invert, size_t base, tok_spans *dst, dpoc_err *err) {
    if (invert)
        for (size_t i = 0; i < p->n; i++) p->v[i].is_match = !p->v[i].is_match;
    size_t k = 0; /* pieces kept in p->v[0..k), is_match reused as "remove" */
    int previous_match = 0;
    switch (behavior) {
    case TOK_ISOLATED:
        for (size_t i = 0; i < p->n; i++) p->v[i].is_match = 0;
        k = p->n;
        break;
    case TOK_REMOVED:
        k = p->n;
        break;
    case TOK_CONTIGUOUS:
        for (size_t i = 0; i < p->n; i++) {
            tok_piece c = p->v[i];
            if (c.is_match == previous_match && k) p->v[k - 1].end = c.end;
            else p->v[k++] = (tok_piece){c.start, c.end, 0};
            previous_match = c.is_match;
        }
        break;
    case TOK_MERGED_PREV:
        for (size_t i = 0; i < p->n; i++) {
            tok_piece c = p->v[i];
            if (c.is_match && !previous_match && k) p->v[k - 1].end = c.end;
            else p->v[k++] = (tok_piece){c.start, c.end, 0};
            previous_match = c.is_match;
        }
        break;
    case TOK_MERGED_NEXT: {
        /* folded from the end, then reversed: build in place from the back */
        size_t top = p->n; /* kept pieces live in p->v[top .. n) */
        for (size_t i = p->n; i-- > 0;) {
            tok_piece c = p->v[i];
            if (c.is_match && !previous_match && top < p->n) p->v[top].start = c.start;
            else p->v[--top] = (tok_piece){c.start, c.end, 0};
            previous_match = c.is_match;
        }
        memmove(p->v, p->v + top, (p->n - top) * sizeof *p->v);
        k = p->n - top;
        break;
    }
    default:
        return dpoc_errf(err, DPOC_EINTERNAL, "unknown split behaviour %d", behavior);
    }
    for (size_t i = 0; i < k; i++)
        if (!p->v[i].is_match && p->v[i].end > p->v[i].start)
            DPOC_TRY(tok_spans_push(dst, base + p->v[i].start, p->v[i].end - p->v[i].start, err));
    return 0;
}

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.. in order. */
static void byte_chars(unsigned char utf8[256][2], unsigned char len[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int cp;
        if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) cp = b;
        else cp = 256 + n++;
        if (cp < 0x80) {
            utf8[b][0] = (unsigned char)cp;
            len[b] = 1;
        } else {
            utf8[b][0] = (unsigned char)(0xC0 | (cp >> 6));
            utf8[b][1] = (unsigned char)(0x80 | (cp & 0x3F));
            len[b] = 2;
        }
    }
}

static int step_bytelevel(dpoc_tokenizer *tok, const tok_pretok *pt, dpoc_err *err) {
    unsigned char bc[256][2], bl[256];
    byte_chars(bc, bl);
    tok_spans *src = &tok->spans, *dst = &tok->spans2;
    dst->n = 0;
    for (size_t i = 0; i < src->n; i++) {
        tok_span sp = src->v[i];
        if (pt->add_prefix_space && (sp.len == 0 || tok->work.p[sp.off] != ' ')) {
            DPOC_TRY(tok_buf_reserve(&tok->work, sp.len + 2, err));
            size_t off = tok->work.n;
            tok->work.p[off] = ' ';
            memcpy(tok->work.p + off + 1, tok->work.p + sp.off, sp.len);
            tok->work.n += sp.len + 1;
            sp.off = off;
            sp.len++;
        }
        size_t first = dst->n;
        if (pt->use_regex) {
            DPOC_TRY(regex_find(tok, tok->gpt2_re, tok->gpt2_jit, tok->work.p + sp.off, sp.len, &tok->pieces, err));
            DPOC_TRY(apply_behavior(&tok->pieces, TOK_ISOLATED, 0, sp.off, dst, err));
        } else if (sp.len) {
            DPOC_TRY(tok_spans_push(dst, sp.off, sp.len, err));
        }
        /* map every byte of the new pieces to its character */
        for (size_t j = first; j < dst->n; j++) {
            tok_span d = dst->v[j];
            DPOC_TRY(tok_buf_reserve(&tok->work, 2 * d.len + 1, err));
            size_t off = tok->work.n;
            char *o = tok->work.p + off;
            const unsigned char *in = (const unsigned char *)tok->work.p + d.off;
            for (size_t q = 0; q < d.len; q++) {
                unsigned char b = in[q];
                *o++ = (char)bc[b][0];
                if (bl[b] == 2) *o++ = (char)bc[b][1];
            }
            size_t len = (size_t)(o - (tok->work.p + off));
            tok->work.n += len;
            dst->v[j].off = off;
            dst->v[j].len = len;
        }
    }
    return 0;
}

static int step_split(dpoc_tokenizer *tok, const tok_pretok *pt, dpoc_err *err) {
    tok_spans *src = &tok->spans, *dst = &tok->spans2;
    dst->n = 0;
    for (size_t i = 0; i < src->n; i++) {
        tok_span sp = src->v[i];
        if (pt->kind == TOK_PT_SPLIT) {
            DPOC_TRY(regex_find(tok, pt->re, pt->jit, tok->work.p + sp.off, sp.len, &tok->pieces, err));
            DPOC_TRY(apply_behavior(&tok->pieces, pt->behavior, pt->invert, sp.off, dst, err));
        } else {
            DPOC_TRY(digits_find(tok->work.p + sp.off, sp.len, &tok->pieces, err));
            DPOC_TRY(apply_behavior(&tok->pieces, pt->individual_digits ? TOK_ISOLATED : TOK_CONTIGUOUS, 0, sp.off,
                                    dst, err));
        }
    }
    return 0;
}

int tok_pretokenize(dpoc_tokenizer *tok, const char *text, size_t n, dpoc_err *err) {
    tok->work.n = 0;
    tok->spans.n = 0;
    DPOC_TRY(tok_buf_append(&tok->work, text, n, err));
    if (n) DPOC_TRY(tok_spans_push(&tok->spans, 0, n, err));
    for (size_t k = 0; k < tok->n_pre && tok->spans.n; k++) {
        const tok_pretok *pt = &tok->pre[k];
        if (pt->kind == TOK_PT_BYTELEVEL) DPOC_TRY(step_bytelevel(tok, pt, err));
        else DPOC_TRY(step_split(tok, pt, err));
        tok_spans t = tok->spans;
        tok->spans = tok->spans2;
        tok->spans2 = t;
    }
    return 0;
}

/* ---- NFC ---- */

static int nfc_region(const char *s, size_t n, tok_buf *out, dpoc_err *err) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (m < 0) {
        free(dst);
        return dpoc_errf(err, m == UTF8PROC_ERROR_NOMEM ? DPOC_ENOMEM : DPOC_EINPUT, "NFC normalization failed: %s",
                         utf8proc_errmsg(m));
    }
    int rc = tok_buf_append(out, dst, (size_t)m, err);
    free(dst);
    return rc;
}

int tok_nfc(const char *s, size_t n, tok_buf *out, dpoc_err *err) {
    /* Every character below U+0300 (lead byte < 0xCC) is NFC-stable, has combining class 0 and is
     * never the second part of a composition, so the text can be cut before any of them: only the
     * stretches [base character, run of characters >= U+0300] go through utf8proc. */
    out->n = 0;
    size_t done = 0, i = 0;
    while (i < n) {
        if ((unsigned char)s[i] < 0xCC) {
            i++;
            continue;
        }
        /* region start: the character before the run (it may compose with it) */
        size_t start = i;
        if (start > done) {
            start--;
            while (start > done && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
        }
        size_t end = i;
        while (end < n && (unsigned char)s[end] >= 0x80) {
            if ((unsigned char)s[end] >= 0xC0 && (unsigned char)s[end] < 0xCC) break; /* U+0080..U+02FF */
            end++;
        }
        DPOC_TRY(tok_buf_append(out, s + done, start - done, err));
        DPOC_TRY(nfc_region(s + start, end - start, out, err));
        done = i = end;
    }
    return tok_buf_append(out, s + done, n - done, err);
}

/* ---- added tokens ---- */

static int is_ws(int32_t cp) {
    /* Rust regex \s: White_Space */
    if ((cp >= 9 && cp <= 13) || cp == 0x85) return 1;
    utf8proc_category_t c = utf8proc_category(cp);
    return c == UTF8PROC_CATEGORY_ZS || c == UTF8PROC_CATEGORY_ZL || c == UTF8PROC_CATEGORY_ZP;
}

static int is_word(int32_t cp) {
    /* Rust regex \w: Alphabetic, marks, decimal digits, connector punctuation, joiners */
    if (cp == 0x200C || cp == 0x200D) return 1;
    switch (utf8proc_category(cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return 1;
    default:
        return 0;
    }
}

/* start of the code point that ends at s + end */
static size_t prev_char(const char *s, size_t end) {
    size_t i = end - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    return i;
}

static int cmp_pattern_len(const void *a, const void *b, void *ctx) {
    const dpoc_tokenizer *tok = ctx;
    const tok_added *x = &tok->added[*(const size_t *)a], *y = &tok->added[*(const size_t *)b];
    unsigned char fx = (unsigned char)x->pattern[0], fy = (unsigned char)y->pattern[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (x->pattern_len != y->pattern_len) return x->pattern_len > y->pattern_len ? -1 : 1;
    return 0;
}

/* insertion sort with a context: few added tokens, and qsort_r is not C11 */
static void sort_idx(size_t *v, size_t n, dpoc_tokenizer *tok) {
    for (size_t i = 1; i < n; i++) {
        size_t x = v[i], j = i;
        while (j > 0 && cmp_pattern_len(&v[j - 1], &x, tok) > 0) {
            v[j] = v[j - 1];
            j--;
        }
        v[j] = x;
    }
}

static int build_one(dpoc_tokenizer *tok, tok_matcher *m, int normalized, dpoc_err *err) {
    free(m->idx);
    memset(m, 0, sizeof *m);
    size_t n = 0;
    for (size_t i = 0; i < tok->n_added; i++)
        if (!!tok->added[i].normalized == normalized && tok->added[i].pattern_len) n++;
    m->idx = dpoc_malloc((n ? n : 1) * sizeof *m->idx, "added-token matcher", err);
    if (!m->idx) return DPOC_ENOMEM;
    for (size_t i = 0; i < tok->n_added; i++)
        if (!!tok->added[i].normalized == normalized && tok->added[i].pattern_len) m->idx[m->n++] = i;
    sort_idx(m->idx, m->n, tok);
    size_t k = 0;
    for (int c = 0; c <= 256; c++) {
        while (k < m->n && (unsigned char)tok->added[m->idx[k]].pattern[0] < c) k++;
        m->first[c] = c == 256 ? m->n : k;
    }
    return 0;
}

int tok_matcher_build(dpoc_tokenizer *tok, dpoc_err *err) {
    DPOC_TRY(build_one(tok, &tok->match_raw, 0, err));
    return build_one(tok, &tok->match_norm, 1, err);
}

int tok_added_find(const dpoc_tokenizer *tok, const tok_matcher *m, const char *s, size_t n, tok_pieces *out,
                   dpoc_err *err) {
    out->n = 0;
    if (n == 0) return 0; /* an empty split is dropped anyway */
    if (m->n == 0) return tok_pieces_push(out, 0, n, 0, err);
    size_t start_offset = 0, pos = 0;
    while (pos < n) {
        /* leftmost-longest: the first position where a pattern matches, the longest one there */
        size_t at = n, best = 0;
        int found = 0;
        for (size_t i = pos; i < n && !found; i++) {
            unsigned char c = (unsigned char)s[i];
            for (size_t k = m->first[c]; k < m->first[c + 1]; k++) {
                const tok_added *a = &tok->added[m->idx[k]];
                if (a->pattern_len <= n - i && !memcmp(s + i, a->pattern, a->pattern_len)) {
                    at = i;
                    best = m->idx[k];
                    found = 1;
                    break; /* sorted longest first */
                }
            }
        }
        if (!found) break;
        const tok_added *a = &tok->added[best];
        size_t start = at, stop = at + a->pattern_len;
        pos = stop; /* the search goes on after the match, even when the match is discarded below */
        if (a->single_word) {
            int32_t cp;
            int start_space = start == 0;
            if (!start_space) {
                size_t p = prev_char(s, start);
                tok_utf8_next(s + p, start - p, &cp);
                start_space = !is_word(cp);
            }
            int stop_space = stop == n;
            if (!stop_space) {
                tok_utf8_next(s + stop, n - stop, &cp);
                stop_space = !is_word(cp);
            }
            if (!start_space || !stop_space) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t p = prev_char(s, ns);
                int32_t cp;
                tok_utf8_next(s + p, ns - p, &cp);
                if (!is_ws(cp)) break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (a->rstrip) {
            while (stop < n) {
                int32_t cp;
                size_t l = tok_utf8_next(s + stop, n - stop, &cp);
                if (!is_ws(cp)) break;
                stop += l;
            }
        }
        if (start_offset < start) DPOC_TRY(tok_pieces_push(out, start_offset, start, 0, err));
        DPOC_TRY(tok_pieces_push(out, start, stop, (int)best + 1, err));
        start_offset = stop;
    }
    if (start_offset != n) DPOC_TRY(tok_pieces_push(out, start_offset, n, 0, err));
    return 0;
}
