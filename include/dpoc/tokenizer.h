/* Byte-level BPE tokenizer with Hugging Face `tokenizers` semantics, loaded from
 * tokenizer.json (+ tokenizer_config.json) or filled from GGUF metadata.
 * Pre-tokenizer regexes run on PCRE2 (UTF, Unicode properties); normalization
 * on utf8proc. The encoder keeps a cache of pre-token -> ids, so a tokenizer is
 * used by one thread at a time. */
#ifndef DPOC_TOKENIZER_H
#define DPOC_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"

typedef struct dpoc_tokenizer dpoc_tokenizer;

/* A growable list of token ids. */
typedef struct {
    int32_t *ids;
    size_t n, cap;
} dpoc_ids;

int dpoc_ids_push(dpoc_ids *v, int32_t id, dpoc_err *err);
void dpoc_ids_free(dpoc_ids *v);

/* path: a directory holding tokenizer.json (and optionally tokenizer_config.json),
 * or a tokenizer.json file. Unsupported components (a WordPiece model, an unknown
 * pre-tokenizer) are errors naming the JSON path of the component. */
int dpoc_tokenizer_load(dpoc_tokenizer **tok, const char *path, dpoc_err *err);

/* What GGUF metadata provides (tokenizer.ggml.*), for the GGUF reader. */
typedef struct {
    const char *model;             /* tokenizer.ggml.model, must be "gpt2" */
    const char *pre;               /* tokenizer.ggml.pre: smollm, qwen2, llama-bpe, gpt2, ... */
    const char *const *tokens;     /* tokenizer.ggml.tokens */
    size_t n_tokens;
    const int32_t *token_type;     /* tokenizer.ggml.token_type (1 normal, 3 control, 4 user-defined, ...) or NULL */
    const char *const *merges;     /* tokenizer.ggml.merges, "a b" */
    size_t n_merges;
    int32_t bos_id, eos_id, pad_id; /* -1 when absent */
    int add_bos;                   /* tokenizer.ggml.add_bos_token */
    const char *chat_template;     /* tokenizer.chat_template or NULL */
} dpoc_tokenizer_spec;

int dpoc_tokenizer_from_spec(dpoc_tokenizer **tok, const dpoc_tokenizer_spec *spec, dpoc_err *err);
void dpoc_tokenizer_free(dpoc_tokenizer *tok);

/* Encodes len bytes of UTF-8 text, appending ids to out. add_special_tokens
 * applies the post-processor (e.g. a BOS) as tokenizers' encode(add_special_tokens)
 * does. Invalid UTF-8 is an error (the Python library cannot take it either). */
int dpoc_tokenizer_encode(dpoc_tokenizer *tok, const char *text, size_t len, int add_special_tokens, dpoc_ids *out,
                          dpoc_err *err);

/* Decodes ids to UTF-8 (*out malloc'ed, NUL-terminated, length in *len), as
 * tokenizers' decode(skip_special_tokens) does. */
int dpoc_tokenizer_decode(const dpoc_tokenizer *tok, const int32_t *ids, size_t n, int skip_special_tokens,
                          char **out, size_t *len, dpoc_err *err);

size_t dpoc_tokenizer_vocab_size(const dpoc_tokenizer *tok); /* including added tokens */
int32_t dpoc_tokenizer_token_to_id(const dpoc_tokenizer *tok, const char *token); /* -1 if absent */
const char *dpoc_tokenizer_id_to_token(const dpoc_tokenizer *tok, int32_t id);   /* NULL if out of range */

/* Special tokens as tokenizer_config.json (or GGUF) names them; NULL / -1 when absent. */
const char *dpoc_tokenizer_eos_token(const dpoc_tokenizer *tok);
int32_t dpoc_tokenizer_eos_id(const dpoc_tokenizer *tok);
const char *dpoc_tokenizer_bos_token(const dpoc_tokenizer *tok);
int32_t dpoc_tokenizer_bos_id(const dpoc_tokenizer *tok);
const char *dpoc_tokenizer_pad_token(const dpoc_tokenizer *tok);
int32_t dpoc_tokenizer_pad_id(const dpoc_tokenizer *tok);
/* The chat_template string of tokenizer_config.json / GGUF, or NULL. */
const char *dpoc_tokenizer_chat_template(const dpoc_tokenizer *tok);

#endif
