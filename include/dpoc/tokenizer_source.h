/* Tokenizers from io's sources: the tokenizer.ggml.* metadata of a GGUF, or the
 * tokenizer.json of a Hugging Face directory. The tokenizer of a model path is
 * read from the same place as its weights. */
#ifndef DPOC_TOKENIZER_SOURCE_H
#define DPOC_TOKENIZER_SOURCE_H

#include "dpoc/err.h"
#include "dpoc/gguf.h"
#include "dpoc/tokenizer.h"

/* Fills spec from tokenizer.ggml.* (and tokenizer.chat_template). Pointers are into
 * g and valid until dpoc_gguf_close. */
int dpoc_gguf_tokenizer_spec(const dpoc_gguf *g, dpoc_tokenizer_spec *spec, dpoc_err *err);

/* *tok = the tokenizer of a model path, or NULL when path has none: a GGUF's
 * metadata; a directory's tokenizer.json; for a directory dpoc wrote from a GGUF
 * run (no tokenizer.json), the GGUF its config.json names in "_name_or_path" (as
 * transformers records where a model came from). */
int dpoc_source_load_tokenizer(dpoc_tokenizer **tok, const char *path, dpoc_err *err);

#endif
