/* Tokenizer building blocks: growable buffers, the two open-addressing hash
 * tables (token -> id, id pair -> merge), the bounded word cache and UTF-8
 * helpers. Nothing here knows about tokenizer.json. */
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer_internal.h"

/* ---- buffers ---- */

int tok_buf_reserve(tok_buf *b, size_t extra, dpoc_err *err) {
    if (b->cap - b->n >= extra) return 0;
    if (extra > SIZE_MAX / 2 - b->n) return dpoc_errf(err, DPOC_ENOMEM, "tokenizer: buffer size overflow");
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->n < extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return dpoc_errf(err, DPOC_ENOMEM, "out of memory growing a tokenizer buffer to %zu bytes", cap);
    b->p = p;
    b->cap = cap;
    return 0;
}

int tok_buf_append(tok_buf *b, const void *s, size_t n, dpoc_err *err) {
    DPOC_TRY(tok_buf_reserve(b, n + 1, err));
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0'; /* keeps every buffer usable as a C string; not counted in n */
    return 0;
}

void tok_buf_free(tok_buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

int tok_spans_push(tok_spans *s, size_t off, size_t len, dpoc_err *err) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        tok_span *v = realloc(s->v, cap * sizeof *v);
        if (!v) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for %zu pre-tokens", cap);
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].off = off;
    s->v[s->n].len = len;
    s->n++;
    return 0;
}

void tok_spans_free(tok_spans *s) {
    free(s->v);
    memset(s, 0, sizeof *s);
}

int tok_pieces_push(tok_pieces *p, size_t start, size_t end, int is_match, dpoc_err *err) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        tok_piece *v = realloc(p->v, cap * sizeof *v);
        if (!v) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for %zu text pieces", cap);
        p->v = v;
        p->cap = cap;
    }
    p->v[p->n].start = start;
    p->v[p->n].end = end;
    p->v[p->n].is_match = is_match;
    p->n++;
    return 0;
}

/* ---- hashing ---- */

static uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

uint32_t tok_hash_bytes(const void *s, size_t n) {
    const unsigned char *p = s;
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)n * 0xbf58476d1ce4e5b9ULL);
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, p, 8);
        h = (h ^ k) * 0x94d049bb133111ebULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t k = 0;
        memcpy(&k, p, n);
        h = (h ^ k) * 0x94d049bb133111ebULL;
    }
    return (uint32_t)mix64(h);
}

/* ---- string map ---- */

int tok_strmap_init(tok_strmap *m, size_t expected, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    size_t cap = 16;
    while (cap < expected * 2 + 2) cap *= 2;
    m->slots = dpoc_calloc(cap, sizeof *m->slots, "tokenizer hash table", err);
    if (!m->slots) return DPOC_ENOMEM;
    m->cap = cap;
    return 0;
}

void tok_strmap_free(tok_strmap *m) {
    free(m->slots);
    free(m->koff);
    free(m->klen);
    free(m->hash);
    free(m->val);
    tok_buf_free(&m->keys);
    memset(m, 0, sizeof *m);
}

static long strmap_lookup(const tok_strmap *m, const char *k, size_t len, uint32_t h, size_t *slot) {
    size_t mask = m->cap - 1, i = h & mask;
    for (;;) {
        uint32_t e = m->slots[i];
        if (!e) {
            if (slot) *slot = i;
            return -1;
        }
        e--;
        if (m->hash[e] == h && m->klen[e] == len && !memcmp(m->keys.p + m->koff[e], k, len)) {
            if (slot) *slot = i;
            return (long)e;
        }
        i = (i + 1) & mask;
    }
}

long tok_strmap_find(const tok_strmap *m, const char *k, size_t len) {
    if (!m->cap) return -1;
    return strmap_lookup(m, k, len, tok_hash_bytes(k, len), NULL);
}

int32_t tok_strmap_get(const tok_strmap *m, const char *k, size_t len) {
    long e = tok_strmap_find(m, k, len);
    return e < 0 ? -1 : m->val[e];
}

static int strmap_grow(tok_strmap *m, dpoc_err *err) {
    size_t cap = m->cap * 2;
    uint32_t *slots = dpoc_calloc(cap, sizeof *slots, "tokenizer hash table", err);
    if (!slots) return DPOC_ENOMEM;
    for (size_t e = 0; e < m->n; e++) {
        size_t i = m->hash[e] & (cap - 1);
        while (slots[i]) i = (i + 1) & (cap - 1);
        slots[i] = (uint32_t)(e + 1);
    }
    free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return 0;
}

int tok_strmap_put(tok_strmap *m, const char *k, size_t len, int32_t v, dpoc_err *err) {
    if (len > UINT32_MAX || m->n >= UINT32_MAX - 1) return dpoc_errf(err, DPOC_EINPUT, "tokenizer: token too long");
    uint32_t h = tok_hash_bytes(k, len);
    size_t slot;
    long e = strmap_lookup(m, k, len, h, &slot);
    if (e >= 0) {
        m->val[e] = v;
        return 0;
    }
    if ((m->n + 1) * 2 > m->cap) {
        DPOC_TRY(strmap_grow(m, err));
        strmap_lookup(m, k, len, h, &slot);
    }
    if (m->n == m->ecap) {
        size_t ecap = m->ecap ? m->ecap * 2 : 64;
        size_t *koff = realloc(m->koff, ecap * sizeof *koff);
        if (koff) m->koff = koff;
        uint32_t *klen = realloc(m->klen, ecap * sizeof *klen);
        if (klen) m->klen = klen;
        uint32_t *hash = realloc(m->hash, ecap * sizeof *hash);
        if (hash) m->hash = hash;
        int32_t *val = realloc(m->val, ecap * sizeof *val);
        if (val) m->val = val;
        if (!koff || !klen || !hash || !val)
            return dpoc_errf(err, DPOC_ENOMEM, "out of memory for %zu tokenizer entries", ecap);
        m->ecap = ecap;
    }
    size_t off = m->keys.n;
    /* keys are stored NUL-terminated so id -> token can hand out C strings */
    DPOC_TRY(tok_buf_append(&m->keys, k, len, err));
    m->keys.n++; /* keep the NUL */
    m->koff[m->n] = off;
    m->klen[m->n] = (uint32_t)len;
    m->hash[m->n] = h;
    m->val[m->n] = v;
    m->slots[slot] = (uint32_t)(m->n + 1);
    m->n++;
    return 0;
}

/* ---- pair map ---- */

static uint64_t pair_key(int32_t a, int32_t b) { return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1; }

int tok_pairmap_init(tok_pairmap *m, size_t expected, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    size_t cap = 16;
    while (cap < expected * 2 + 2) cap *= 2;
    m->e = dpoc_calloc(cap, sizeof *m->e, "merge table", err);
    if (!m->e) return DPOC_ENOMEM;
    m->cap = cap;
    return 0;
}

void tok_pairmap_free(tok_pairmap *m) {
    free(m->e);
    memset(m, 0, sizeof *m);
}

static size_t pair_slot(const tok_pairmap *m, uint64_t key) {
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    while (m->e[i].key && m->e[i].key != key) i = (i + 1) & mask;
    return i;
}

int tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id, dpoc_err *err) {
    if ((m->n + 1) * 2 > m->cap) {
        tok_pairmap bigger;
        DPOC_TRY(tok_pairmap_init(&bigger, m->cap, err));
        for (size_t i = 0; i < m->cap; i++)
            if (m->e[i].key) bigger.e[pair_slot(&bigger, m->e[i].key)] = m->e[i];
        bigger.n = m->n;
        tok_pairmap_free(m);
        *m = bigger;
    }
    uint64_t key = pair_key(a, b);
    size_t i = pair_slot(m, key);
    if (!m->e[i].key) m->n++;
    /* a repeated pair takes the later rank, as collecting into a HashMap does */
    m->e[i] = (tok_pair_entry){key, rank, new_id};
    return 0;
}

int tok_pairmap_get(const tok_pairmap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *new_id) {
    if (!m->cap) return 0;
    const tok_pair_entry *e = &m->e[pair_slot(m, pair_key(a, b))];
    if (!e->key) return 0;
    *rank = e->rank;
    *new_id = e->new_id;
    return 1;
}

/* ---- word cache ---- */

#define TOK_CACHE_MAX_WORD 256 /* tokenizers' utils::cache::MAX_LENGTH */

int tok_cache_init(tok_cache *c, size_t max_entries, dpoc_err *err) {
    memset(c, 0, sizeof *c);
    c->max_entries = max_entries;
    size_t cap = 16;
    while (cap < max_entries * 2) cap *= 2;
    c->cap = cap;
    c->slots = dpoc_calloc(cap, sizeof *c->slots, "tokenizer cache", err);
    c->key_off = dpoc_malloc(max_entries * sizeof *c->key_off, "tokenizer cache", err);
    c->key_len = dpoc_malloc(max_entries * sizeof *c->key_len, "tokenizer cache", err);
    c->key_hash = dpoc_malloc(max_entries * sizeof *c->key_hash, "tokenizer cache", err);
    c->ids_off = dpoc_malloc(max_entries * sizeof *c->ids_off, "tokenizer cache", err);
    c->ids_len = dpoc_malloc(max_entries * sizeof *c->ids_len, "tokenizer cache", err);
    if (!c->slots || !c->key_off || !c->key_len || !c->key_hash || !c->ids_off || !c->ids_len) {
        tok_cache_free(c);
        return DPOC_ENOMEM;
    }
    return 0;
}

void tok_cache_free(tok_cache *c) {
    free(c->slots);
    free(c->key_off);
    free(c->key_len);
    free(c->key_hash);
    free(c->ids_off);
    free(c->ids_len);
    free(c->ids);
    tok_buf_free(&c->keys);
    memset(c, 0, sizeof *c);
}

/* Returns the entry or -1. */
static long cache_find(const tok_cache *c, const char *w, size_t n, uint32_t h, size_t *slot) {
    size_t mask = c->cap - 1, i = h & mask;
    for (;;) {
        uint32_t e = c->slots[i];
        if (!e) {
            *slot = i;
            return -1;
        }
        e--;
        if (c->key_hash[e] == h && c->key_len[e] == n && !memcmp(c->keys.p + c->key_off[e], w, n)) return (long)e;
        i = (i + 1) & mask;
    }
}

static int cache_put(tok_cache *c, const char *w, size_t n, uint32_t h, const int32_t *ids, size_t n_ids,
                     dpoc_err *err) {
    if (n >= TOK_CACHE_MAX_WORD || !c->cap) return 0;
    if (c->n == c->max_entries) {
        /* full: start over rather than freezing on the first words seen, memory stays bounded */
        memset(c->slots, 0, c->cap * sizeof *c->slots);
        c->n = 0;
        c->keys.n = 0;
        c->ids_n = 0;
    }
    size_t slot;
    if (cache_find(c, w, n, h, &slot) >= 0) return 0;
    if (c->ids_cap - c->ids_n < n_ids) {
        size_t cap = c->ids_cap ? c->ids_cap : 4096;
        while (cap - c->ids_n < n_ids) cap *= 2;
        int32_t *ids2 = realloc(c->ids, cap * sizeof *ids2);
        if (!ids2) return dpoc_errf(err, DPOC_ENOMEM, "out of memory growing the tokenizer cache");
        c->ids = ids2;
        c->ids_cap = cap;
    }
    size_t koff = c->keys.n;
    DPOC_TRY(tok_buf_append(&c->keys, w, n, err));
    if (n_ids) memcpy(c->ids + c->ids_n, ids, n_ids * sizeof *ids);
    c->key_off[c->n] = koff;
    c->key_len[c->n] = (uint32_t)n;
    c->key_hash[c->n] = h;
    c->ids_off[c->n] = c->ids_n;
    c->ids_len[c->n] = (uint32_t)n_ids;
    c->ids_n += n_ids;
    c->slots[slot] = (uint32_t)(c->n + 1);
    c->n++;
    return 0;
}

/* ---- UTF-8 ---- */

int tok_utf8_valid(const char *str, size_t n) { return tok_utf8_check(str, n) == n; }

size_t tok_utf8_check(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t w;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) w = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            w = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F; /* no surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            w = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else return i;
        if (n - i < w) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < w; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += w;
    }
    return n;
}

size_t tok_utf8_next(const char *str, size_t n, int32_t *cp) {
    const unsigned char *s = (const unsigned char *)str;
    if (s[0] < 0x80 || n < 2) {
        *cp = s[0];
        return 1;
    }
    if (s[0] < 0xE0) {
        *cp = ((s[0] & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (s[0] < 0xF0 || n < 4) {
        if (n < 3) {
            *cp = s[0];
            return 1;
        }
        *cp = ((s[0] & 0x0F) << 12) | ((s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return 3;
    }
    *cp = ((s[0] & 0x07) << 18) | ((s[1] & 0x3F) << 12) | ((s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    return 4;
}

int tok_utf8_lossy(tok_buf *out, const char *str, size_t n, dpoc_err *err) {
    /* Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD */
    static const char repl[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, run = 0; /* run: start of the current valid stretch */
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t w = 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) w = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            w = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            w = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        }
        size_t k = 1; /* bytes of a valid prefix */
        if (w) {
            if (i + 1 < n && s[i + 1] >= lo && s[i + 1] <= hi) {
                k = 2;
                while (k < w && i + k < n && (s[i + k] & 0xC0) == 0x80) k++;
            }
        }
        if (w && k == w) {
            i += w;
            continue;
        }
        DPOC_TRY(tok_buf_append(out, s + run, i - run, err));
        DPOC_TRY(tok_buf_append(out, repl, 3, err));
        i += k;
        run = i;
    }
    return tok_buf_append(out, s + run, n - run, err);
}

long tok_cache_lookup(const tok_cache *c, const char *w, size_t n, uint32_t h, size_t *slot) {
    if (!c->cap) return -1;
    return cache_find(c, w, n, h, slot);
}

int tok_cache_insert(tok_cache *c, const char *w, size_t n, uint32_t h, const int32_t *ids, size_t n_ids,
                     dpoc_err *err) {
    return cache_put(c, w, n, h, ids, n_ids, err);
}
