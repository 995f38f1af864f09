/* Where a model comes from: a GGUF file (llama.cpp) or a Hugging Face model
 * directory (config.json + safetensors). Every command that takes a model path
 * goes through here, so each accepts both. Path in, model out: the config from
 * config.json or the GGUF's metadata, the weights through a tensor source and
 * dpoc_model_from_source (dpoc/model_load.h).
 *
 * The tokenizer of the same path is text/'s (dpoc_source_load_tokenizer in
 * dpoc/tokenizer_source.h, included here so callers of the whole source need
 * one header); dpoc_source_is_gguf is io/'s (dpoc/tensor_source.h). */
#ifndef DPOC_SOURCE_H
#define DPOC_SOURCE_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/model.h"
#include "dpoc/model_load.h"
#include "dpoc/tensor_source.h"
#include "dpoc/tokenizer_source.h"

int dpoc_source_model_config(const char *path, dpoc_model_config *cfg, dpoc_err *err);
/* Initialises m and fills its weights (converted to fp32). On error m is freed. */
int dpoc_source_load_model(dpoc_model *m, const char *path, dpoc_err *err);
/* The same with the weights stored as storage says (DPOC_WEIGHTS_KEEP: the
 * file's quantized / half tensors kept mapped, the model holding the file open). */
int dpoc_source_load_model_stored(dpoc_model *m, const char *path, dpoc_weight_storage storage, dpoc_err *err);

/* The config.json text a saved copy of the model at src should carry: src's own
 * config.json for a directory, dpoc_model_config_json (naming the GGUF by its
 * absolute path) for a GGUF. *out is malloc'ed. */
int dpoc_source_config_json(const char *src, char **out, size_t *len, dpoc_err *err);

#endif
