/* The BPE model: tokenizers/src/models/bpe/model.rs (merge_word) and word.rs
 * (merge_all). A word starts as one symbol per character; the pair with the
 * lowest merge rank (then the leftmost) is merged first, through a binary heap
 * of candidate merges, so a word of n characters costs O(n log n). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer_internal.h"

typedef struct {
    int32_t c;          /* token id */
    int32_t prev, next; /* -1 at the ends */
    uint32_t len;       /* bytes; 0 once merged into its left neighbour */
} bpe_sym;

typedef struct {
    uint32_t rank, pos;
    int32_t new_id;
} bpe_merge;

/* min-heap on (rank, pos), as word.rs orders its Merge entries */
static int merge_less(const bpe_merge *a, const bpe_merge *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(bpe_merge *h, size_t *n, bpe_merge m) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!merge_less(&m, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = m;
}

static bpe_merge heap_pop(bpe_merge *h, size_t *n) {
    bpe_merge top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const bpe_merge *best = &last;
        if (l < *n && merge_less(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < *n && merge_less(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

static int sym_add(dpoc_tokenizer *tok, size_t *nsym, int32_t id, size_t len, dpoc_err *err) {
    if (*nsym == tok->sym_cap) {
        size_t cap = tok->sym_cap ? tok->sym_cap * 2 : 256;
        bpe_sym *s = realloc(tok->sym_buf, cap * sizeof *s);
        if (!s) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for %zu BPE symbols", cap);
        tok->sym_buf = s;
        tok->sym_cap = cap;
    }
    bpe_sym *s = tok->sym_buf;
    size_t i = (*nsym)++;
    s[i].c = id;
    s[i].len = (uint32_t)len;
    s[i].prev = i ? (int32_t)(i - 1) : -1;
    s[i].next = -1;
    if (i) s[i - 1].next = (int32_t)i;
    return 0;
}

static int unk_id(const tok_bpe *bpe, int32_t *id, dpoc_err *err) {
    *id = tok_strmap_get(&bpe->vocab, bpe->unk_token, strlen(bpe->unk_token));
    if (*id < 0) return dpoc_errf(err, DPOC_EINPUT, "tokenizer: unk_token '%s' is not in the vocabulary", bpe->unk_token);
    return 0;
}

/* merge_word: characters to initial symbols (with prefix / suffix, byte fallback, unk). */
static int initial_symbols(dpoc_tokenizer *tok, const char *w, size_t n, size_t *nsym, dpoc_err *err) {
    const tok_bpe *bpe = &tok->bpe;
    int32_t unk = -1;
    size_t unk_len = 0;
    *nsym = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        size_t clen = tok_utf8_next(w + i, n - i, &cp);
        int first = i == 0, last = i + clen == n;
        const char *s = w + i;
        size_t slen = clen;
        if ((!first && bpe->prefix_len) || (last && bpe->suffix_len)) {
            tok->tmp.n = 0;
            if (!first && bpe->prefix_len) DPOC_TRY(tok_buf_append(&tok->tmp, bpe->prefix, bpe->prefix_len, err));
            DPOC_TRY(tok_buf_append(&tok->tmp, w + i, clen, err));
            if (last && bpe->suffix_len) DPOC_TRY(tok_buf_append(&tok->tmp, bpe->suffix, bpe->suffix_len, err));
            s = tok->tmp.p;
            slen = tok->tmp.n;
        }
        int32_t id = s == w + i && cp < 0x800 && bpe->char_id ? bpe->char_id[cp] : tok_strmap_get(&bpe->vocab, s, slen);
        if (id >= 0) {
            if (unk >= 0) {
                DPOC_TRY(sym_add(tok, nsym, unk, unk_len, err));
                unk = -1;
            }
            DPOC_TRY(sym_add(tok, nsym, id, clen, err));
        } else {
            int done = 0;
            if (bpe->byte_fallback) {
                size_t k = 0;
                while (k < slen && bpe->byte_fallback_ids[(unsigned char)s[k]] >= 0) k++;
                if (k == slen) {
                    for (k = 0; k < slen; k++)
                        DPOC_TRY(sym_add(tok, nsym, bpe->byte_fallback_ids[(unsigned char)s[k]], 1, err));
                    done = 1;
                }
            }
            if (!done && bpe->unk_token) {
                if (unk >= 0 && bpe->fuse_unk) {
                    unk_len += clen;
                } else {
                    if (unk >= 0) DPOC_TRY(sym_add(tok, nsym, unk, unk_len, err));
                    DPOC_TRY(unk_id(bpe, &unk, err));
                    unk_len = clen;
                }
            }
            /* no unk_token: the character is dropped, as tokenizers does */
        }
        i += clen;
    }
    if (unk >= 0) DPOC_TRY(sym_add(tok, nsym, unk, unk_len, err));
    return 0;
}

static int merge_all(dpoc_tokenizer *tok, size_t nsym, dpoc_err *err) {
    const tok_pairmap *merges = &tok->bpe.merges;
    bpe_sym *s = tok->sym_buf;
    if (nsym < 2) return 0;
    size_t need = 3 * nsym + 1; /* nsym - 1 initial candidates + at most 2 per merge */
    if (tok->heap_cap < need) {
        bpe_merge *h = realloc(tok->heap_buf, need * sizeof *h);
        if (!h) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for a BPE heap of %zu", need);
        tok->heap_buf = h;
        tok->heap_cap = need;
    }
    bpe_merge *heap = tok->heap_buf;
    size_t hn = 0;
    for (size_t i = 0; i + 1 < nsym; i++) {
        bpe_merge m;
        if (tok_pairmap_get(merges, s[i].c, s[i + 1].c, &m.rank, &m.new_id)) {
            m.pos = (uint32_t)i;
            heap_push(heap, &hn, m);
        }
    }
    while (hn) {
        bpe_merge top = heap_pop(heap, &hn);
        bpe_sym *cur = &s[top.pos];
        if (cur->len == 0 || cur->next == -1) continue;
        size_t next_pos = (size_t)cur->next;
        bpe_sym right = s[next_pos];
        uint32_t rank;
        int32_t new_id;
        /* stale entry: the pair changed since it was queued */
        if (!tok_pairmap_get(merges, cur->c, right.c, &rank, &new_id) || new_id != top.new_id) continue;
        cur->c = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        s[next_pos].len = 0;
        if (right.next > -1 && (size_t)right.next < nsym) s[right.next].prev = (int32_t)top.pos;
        bpe_merge m;
        if (cur->prev >= 0 && tok_pairmap_get(merges, s[cur->prev].c, cur->c, &m.rank, &m.new_id)) {
            m.pos = (uint32_t)cur->prev;
            heap_push(heap, &hn, m);
        }
        if (cur->next >= 0 && (size_t)cur->next < nsym &&
            tok_pairmap_get(merges, cur->c, s[cur->next].c, &m.rank, &m.new_id)) {
            m.pos = top.pos;
            heap_push(heap, &hn, m);
        }
    }
    return 0;
}

int tok_bpe_word(dpoc_tokenizer *tok, const char *w, size_t n, dpoc_ids *out, dpoc_err *err) {
    if (n == 0) return 0;
    if (tok->bpe.ignore_merges) {
        /* Llama 3 / Qwen-style: a pre-token that is itself a token is emitted whole */
        int32_t id = tok_strmap_get(&tok->bpe.vocab, w, n);
        if (id >= 0) return dpoc_ids_push(out, id, err);
    }
    uint32_t h = tok_hash_bytes(w, n);
    size_t slot;
    long e = tok_cache_lookup(&tok->cache, w, n, h, &slot);
    if (e >= 0) {
        if (tok->cache.ids_len[e] == 0) return 0; /* a cached word of no ids: the cache may hold no ids at all */
        const int32_t *ids = tok->cache.ids + tok->cache.ids_off[e];
        for (uint32_t k = 0; k < tok->cache.ids_len[e]; k++) DPOC_TRY(dpoc_ids_push(out, ids[k], err));
        return 0;
    }
    size_t nsym;
    DPOC_TRY(initial_symbols(tok, w, n, &nsym, err));
    DPOC_TRY(merge_all(tok, nsym, err));
    const bpe_sym *s = tok->sym_buf;
    size_t start = out->n;
    for (size_t i = 0; i < nsym; i++)
        if (s[i].len) DPOC_TRY(dpoc_ids_push(out, s[i].c, err));
    /* a word may give no ids (and out no buffer yet): no pointer arithmetic on NULL */
    const int32_t *word_ids = out->n > start ? out->ids + start : NULL;
    return tok_cache_insert(&tok->cache, w, n, h, word_ids, out->n - start, err);
}

int tok_bpe_add_merge(tok_bpe *bpe, const char *a, size_t alen, const char *b, size_t blen, uint32_t rank,
                      dpoc_err *err) {
    int32_t a_id = tok_strmap_get(&bpe->vocab, a, alen), b_id = tok_strmap_get(&bpe->vocab, b, blen);
    if (a_id < 0) return dpoc_errf(err, DPOC_EINPUT, "merge %u: token '%.*s' is not in the vocabulary", rank,
                                   (int)(alen > 200 ? 200 : alen), a);
    if (b_id < 0) return dpoc_errf(err, DPOC_EINPUT, "merge %u: token '%.*s' is not in the vocabulary", rank,
                                   (int)(blen > 200 ? 200 : blen), b);
    if (blen < bpe->prefix_len)
        return dpoc_errf(err, DPOC_EINPUT, "merge %u: token '%.*s' is shorter than continuing_subword_prefix", rank,
                         (int)(blen > 200 ? 200 : blen), b);
    size_t bl = blen - bpe->prefix_len, n = alen + bl;
    char small[256];
    char *buf = n <= sizeof small ? small : malloc(n);
    if (!buf) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for a merge");
    memcpy(buf, a, alen);
    memcpy(buf + alen, b + bpe->prefix_len, bl);
    int32_t new_id = tok_strmap_get(&bpe->vocab, buf, n);
    int rc = 0;
    if (new_id < 0)
        rc = dpoc_errf(err, DPOC_EINPUT, "merge %u: the merged token '%.*s' is not in the vocabulary", rank,
                       (int)(n > 200 ? 200 : n), buf);
    if (buf != small) free(buf);
    if (rc) return rc;
    return tok_pairmap_put(&bpe->merges, a_id, b_id, rank, new_id, err);
}

int tok_bpe_index_ids(tok_bpe *bpe, dpoc_err *err) {
    size_t max = 0;
    for (size_t e = 0; e < bpe->vocab.n; e++) {
        if (bpe->vocab.val[e] < 0) return dpoc_errf(err, DPOC_EINPUT, "vocabulary id %d is negative", bpe->vocab.val[e]);
        if ((size_t)bpe->vocab.val[e] + 1 > max) max = (size_t)bpe->vocab.val[e] + 1;
    }
    /* ids index an array: refuse absurdly sparse ids rather than allocate gigabytes */
    if (max > 4 * bpe->vocab.n + 1024)
        return dpoc_errf(err, DPOC_EINPUT, "vocabulary ids are too sparse (max id %zu for %zu tokens)", max - 1,
                         bpe->vocab.n);
    bpe->id_str = dpoc_calloc(max, sizeof *bpe->id_str, "id -> token table", err);
    bpe->id_len = dpoc_calloc(max, sizeof *bpe->id_len, "id -> token table", err);
    if (!bpe->id_str || !bpe->id_len) return DPOC_ENOMEM;
    bpe->n_ids = max;
    for (size_t e = 0; e < bpe->vocab.n; e++) {
        size_t id = (size_t)bpe->vocab.val[e];
        bpe->id_str[id] = bpe->vocab.keys.p + bpe->vocab.koff[e];
        bpe->id_len[id] = bpe->vocab.klen[e];
    }
    bpe->char_id = dpoc_malloc(0x800 * sizeof *bpe->char_id, "character table", err);
    if (!bpe->char_id) return DPOC_ENOMEM;
    for (int32_t cp = 0; cp < 0x800; cp++) {
        char u[2];
        size_t n = 1;
        if (cp < 0x80) u[0] = (char)cp;
        else {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            n = 2;
        }
        bpe->char_id[cp] = tok_strmap_get(&bpe->vocab, u, n);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        bpe->byte_fallback_ids[b] = tok_strmap_get(&bpe->vocab, name, strlen(name));
    }
    return 0;
}
