/* Private parts of the tokenizer (src/text/tokenizer*.c): the data structures,
 * the small hash tables, the pipeline stages and the in-memory JSON loader used by
 * the fuzz target. Semantics follow Hugging Face `tokenizers` 0.23.3 (the Rust
 * crate): each stage names the Rust code it mirrors. */
#ifndef DPOC_TOKENIZER_INTERNAL_H
#define DPOC_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include "dpoc/tokenizer.h"

/* ---- growable buffers ---- */

typedef struct {
    char *p;
    size_t n, cap;
} tok_buf;

int tok_buf_reserve(tok_buf *b, size_t extra, dpoc_err *err);
int tok_buf_append(tok_buf *b, const void *s, size_t n, dpoc_err *err);
void tok_buf_free(tok_buf *b);

/* A substring of a buffer, by offset (buffers move when they grow). */
typedef struct {
    size_t off, len;
} tok_span;

typedef struct {
    tok_span *v;
    size_t n, cap;
} tok_spans;

int tok_spans_push(tok_spans *s, size_t off, size_t len, dpoc_err *err);
void tok_spans_free(tok_spans *s);

/* ---- string -> int32 map (open addressing, linear probing; keys copied into an arena) ---- */

typedef struct {
    uint32_t *slots;     /* entry index + 1; 0 = empty */
    size_t cap;          /* power of two */
    size_t n;            /* entries */
    size_t ecap;
    size_t *koff;        /* key offset in keys */
    uint32_t *klen, *hash;
    int32_t *val;
    tok_buf keys;
} tok_strmap;

uint32_t tok_hash_bytes(const void *s, size_t n);
int tok_strmap_init(tok_strmap *m, size_t expected, dpoc_err *err);
/* Inserts or overwrites (the last value wins, as serde's map into a HashMap). */
int tok_strmap_put(tok_strmap *m, const char *k, size_t len, int32_t v, dpoc_err *err);
/* Value, or -1 when absent. */
int32_t tok_strmap_get(const tok_strmap *m, const char *k, size_t len);
/* Entry index of the key, or -1; its key bytes are m->keys.p + m->koff[i]. */
long tok_strmap_find(const tok_strmap *m, const char *k, size_t len);
void tok_strmap_free(tok_strmap *m);

/* ---- (id, id) -> (rank, new id) map for BPE merges ---- */

typedef struct {
    uint64_t key; /* (a << 32 | b) + 1; 0 = empty */
    uint32_t rank;
    int32_t new_id;
} tok_pair_entry; /* one cache line holds four: a lookup touches one line */

typedef struct {
    tok_pair_entry *e;
    size_t cap, n;
} tok_pairmap;

int tok_pairmap_init(tok_pairmap *m, size_t expected, dpoc_err *err);
int tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id, dpoc_err *err);
/* 1 and fills rank/new_id when present. */
int tok_pairmap_get(const tok_pairmap *m, int32_t a, int32_t b, uint32_t *rank, int32_t *new_id);
void tok_pairmap_free(tok_pairmap *m);

/* ---- the BPE model (tokenizers/src/models/bpe) ---- */

typedef struct {
    tok_strmap vocab;      /* token -> id */
    char **id_str;         /* id -> token (NUL-terminated, points into vocab.keys); NULL for holes */
    uint32_t *id_len;
    size_t n_ids;          /* max id + 1 */
    tok_pairmap merges;
    char *unk_token;       /* NULL: unknown characters are dropped, as in tokenizers */
    char *prefix, *suffix; /* continuing_subword_prefix / end_of_word_suffix; NULL or "" = none */
    size_t prefix_len, suffix_len;
    int fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_fallback_ids[256]; /* "<0xNN>" ids, -1 when absent */
    int32_t *char_id;               /* code point < 0x800 -> id of that one-character token, or -1:
                                     * byte-level text only has such characters */
} tok_bpe;

/* Bounded cache of word -> ids (tokenizers keeps 10,000 words of < 256 bytes). */
typedef struct {
    uint32_t *slots;  /* entry + 1 */
    size_t cap;
    size_t n, max_entries;
    size_t *key_off;
    uint32_t *key_len, *key_hash;
    size_t *ids_off;
    uint32_t *ids_len;
    tok_buf keys;
    int32_t *ids;
    size_t ids_n, ids_cap;
} tok_cache;

/* ---- pre-tokenizers (tokenizers/src/pre_tokenizers) ---- */

enum tok_behavior { TOK_REMOVED, TOK_ISOLATED, TOK_MERGED_PREV, TOK_MERGED_NEXT, TOK_CONTIGUOUS };
enum tok_pt_kind { TOK_PT_BYTELEVEL, TOK_PT_SPLIT, TOK_PT_DIGITS };

typedef struct {
    int kind;
    int add_prefix_space, use_regex; /* ByteLevel */
    pcre2_code *re;                  /* Split (owned) */
    int jit;                         /* re was JIT-compiled */
    int behavior, invert;            /* Split */
    int individual_digits;           /* Digits */
} tok_pretok;

/* A match or a gap between matches, as tokenizers' Pattern::find_matches returns. */
typedef struct {
    size_t start, end;
    int is_match;
} tok_piece;

typedef struct {
    tok_piece *v;
    size_t n, cap;
} tok_pieces;

/* ---- added tokens (tokenizers/src/tokenizer/added_vocabulary.rs) ---- */

typedef struct {
    char *content;
    size_t len;
    char *pattern; /* what is matched: content, or its normalized form for normalized tokens */
    size_t pattern_len;
    int32_t id;
    int special, lstrip, rstrip, single_word, normalized;
} tok_added;

/* Leftmost-longest matcher over a set of added tokens: candidates grouped by first byte, longest first. */
typedef struct {
    size_t *idx;        /* indices into tok->added */
    size_t first[257];  /* idx[first[c] .. first[c+1]) start with byte c */
    size_t n;
} tok_matcher;

/* ---- post-processor and decoder ---- */

typedef struct {
    int is_seq;       /* $A piece */
    int32_t *ids;     /* special-token piece */
    size_t n_ids;
} tok_tpl_piece;

typedef struct {
    tok_tpl_piece *pieces; /* TemplateProcessing `single`; NULL for ByteLevel (ids unchanged) */
    size_t n;
} tok_post;

enum tok_dec_kind { TOK_DEC_BYTELEVEL };

struct dpoc_tokenizer {
    tok_bpe bpe;
    int nfc;            /* normalizer: NFC (alone or in a Sequence), else none */
    tok_pretok *pre;    /* flattened pre-tokenizer sequence */
    size_t n_pre;
    tok_post *post;     /* flattened post-processor sequence */
    size_t n_post;
    int has_decoder;    /* 0: tokens joined with " ", as tokenizers does without a decoder */
    size_t n_dec;       /* ByteLevel decoders in sequence */

    tok_added *added;   /* by id order of insertion; one per id */
    size_t n_added;
    int32_t *added_sorted_ids; /* ids of added, ascending, for id -> added token */
    size_t *added_sorted_idx;
    tok_strmap added_map;   /* content -> id */
    tok_strmap special_set; /* contents of special tokens */
    tok_matcher match_raw, match_norm;

    pcre2_code *gpt2_re; /* ByteLevel's own regex, when a ByteLevel uses it */
    int gpt2_jit;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit_stack;

    char *eos, *bos, *pad, *chat_template;
    int32_t eos_id, bos_id, pad_id;

    tok_cache cache;
    /* scratch reused by encode */
    tok_buf work, norm;
    tok_spans spans, spans2;
    tok_pieces pieces, pieces2, pieces3;
    void *sym_buf; /* BPE symbols */
    size_t sym_cap;
    tok_buf tmp;   /* BPE: a character with the subword prefix / suffix */
    void *heap_buf;
    size_t heap_cap;
    dpoc_ids seq;
};

/* ---- stages ---- */

/* 1 if s[0..n) is valid UTF-8 (no surrogates, no overlongs, <= U+10FFFF). */
int tok_utf8_valid(const char *s, size_t n);
/* Offset of the first invalid sequence, or n. */
size_t tok_utf8_check(const char *s, size_t n);
/* Appends String::from_utf8_lossy(s) to out. */
int tok_utf8_lossy(tok_buf *out, const char *s, size_t n, dpoc_err *err);
/* Decodes one code point of valid UTF-8 at s (n bytes left); returns its length. */
size_t tok_utf8_next(const char *s, size_t n, int32_t *cp);

/* Compiles a tokenizers (Oniguruma) regex with PCRE2; literal: a Split String pattern. */
int tok_regex_compile(const char *pattern, size_t len, int literal, pcre2_code **re, int *jit, const char *what,
                      dpoc_err *err);
int tok_regex_setup(dpoc_tokenizer *tok, dpoc_err *err);

/* NFC of s into out (replacing its content). */
int tok_nfc(const char *s, size_t n, tok_buf *out, dpoc_err *err);

/* Runs the pre-tokenizers on text (n bytes); fills tok->spans with spans of tok->work. */
int tok_pretokenize(dpoc_tokenizer *tok, const char *text, size_t n, dpoc_err *err);

/* BPE of one pre-token, ids appended to out (through the cache). */
int tok_bpe_word(dpoc_tokenizer *tok, const char *w, size_t n, dpoc_ids *out, dpoc_err *err);

int tok_cache_init(tok_cache *c, size_t max_entries, dpoc_err *err);
void tok_cache_free(tok_cache *c);
/* Entry index of word w (hash h) or -1. */
long tok_cache_lookup(const tok_cache *c, const char *w, size_t n, uint32_t h, size_t *slot);
/* Remembers w -> ids; words of 256 bytes and more are not kept; a full cache starts over. */
int tok_cache_insert(tok_cache *c, const char *w, size_t n, uint32_t h, const int32_t *ids, size_t n_ids,
                     dpoc_err *err);

/* Added-token matching (find_matches): pieces with is_match = index into tok->added + 1. */
int tok_added_find(const dpoc_tokenizer *tok, const tok_matcher *m, const char *s, size_t n, tok_pieces *out,
                   dpoc_err *err);
int tok_matcher_build(dpoc_tokenizer *tok, dpoc_err *err);
int tok_pieces_push(tok_pieces *p, size_t start, size_t end, int is_match, dpoc_err *err);

/* An empty tokenizer ready to be filled (all ids -1). */
dpoc_tokenizer *tok_new(dpoc_err *err);
/* After vocab, merges, added tokens and pipeline are set: caches, matchers, regexes. */
int tok_finish(dpoc_tokenizer *tok, dpoc_err *err);
/* tokenizers' AddedVocabulary::add_tokens for one token (ids assigned as the Rust code does). */
int tok_add_token(dpoc_tokenizer *tok, const char *content, size_t len, int special, int lstrip, int rstrip,
                  int single_word, int normalized, int32_t *next_id, dpoc_err *err);
/* The BPE merges: a and b must be in the vocab and so must a + b (less the subword prefix). */
int tok_bpe_add_merge(tok_bpe *bpe, const char *a, size_t alen, const char *b, size_t blen, uint32_t rank,
                      dpoc_err *err);
int tok_bpe_index_ids(tok_bpe *bpe, dpoc_err *err);

/* Loads tokenizer.json text (len bytes) and, when config_text is not NULL, tokenizer_config.json.
 * `where` names the source in error messages. Used by dpoc_tokenizer_load and the fuzz target. */
int dpoc_tokenizer_load_json_text(dpoc_tokenizer **tok, const char *json, size_t len, const char *config_text,
                                  size_t config_len, const char *where, dpoc_err *err);

#endif
