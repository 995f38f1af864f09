/* Where a model comes from: a GGUF file (llama.cpp) or a Hugging Face model
 * directory (config.json + safetensors). Every command that takes a model path
 * goes through here, so each accepts both.
 *
 * The tokenizer comes from the same place: the GGUF's tokenizer.ggml.* metadata,
 * or the directory's tokenizer.json. A directory dpoc wrote from a GGUF run has
 * no tokenizer.json; its config.json names the GGUF in "_name_or_path" (as
 * transformers records where a model came from) and the tokenizer is read from
 * there. */
#ifndef DPOC_SOURCE_H
#define DPOC_SOURCE_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/model.h"
#include "dpoc/tokenizer.h"

/* 1 if path is a regular file that starts with the GGUF magic. */
int dpoc_source_is_gguf(const char *path);

int dpoc_source_model_config(const char *path, dpoc_model_config *cfg, dpoc_err *err);
/* Initialises m and fills its weights (a GGUF is dequantized to fp32). On error m is freed. */
int dpoc_source_load_model(dpoc_model *m, const char *path, dpoc_err *err);

/* *tok = the tokenizer of path, or NULL when path has none (a directory without
 * tokenizer.json and without a GGUF named in config.json). */
int dpoc_source_load_tokenizer(dpoc_tokenizer **tok, const char *path, dpoc_err *err);

/* A Hugging Face config.json for cfg (LlamaForCausalLM or Qwen2ForCausalLM),
 * "_name_or_path" = name_or_path (may be NULL), dtype float32. *out is malloc'ed. */
int dpoc_model_config_json(const dpoc_model_config *cfg, const char *name_or_path, char **out, size_t *len,
                           dpoc_err *err);

/* The config.json text a saved copy of the model at src should carry: src's own
 * config.json for a directory, dpoc_model_config_json (naming the GGUF by its
 * absolute path) for a GGUF. *out is malloc'ed. */
int dpoc_source_config_json(const char *src, char **out, size_t *len, dpoc_err *err);

#endif
