/* Building a model from what io/ reads: the model config from a Hugging Face
 * config.json or from GGUF metadata, llama.cpp's names and layouts of the HF
 * parameters, and the ONE function that fills a model from a tensor source
 * (dpoc/tensor_source.h) whatever file it came from. dpoc/source.h goes from a
 * path to a model through these. */
#ifndef DPOC_MODEL_LOAD_H
#define DPOC_MODEL_LOAD_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/gguf.h"
#include "dpoc/model.h"
#include "dpoc/tensor_source.h"

/* ---- config ---- */

/* Reads a Hugging Face config.json (transformers 4 and 5 spellings: rope_theta or
 * rope_parameters.rope_theta). Unsupported fields in use (rope_scaling, a sliding
 * window actually in use, an unknown architecture or activation) are errors naming
 * the field: a wrong RoPE or window would train a different model. */
int dpoc_hf_config_read(dpoc_model_config *cfg, const char *config_json_path, dpoc_err *err);

/* A Hugging Face config.json for cfg (LlamaForCausalLM or Qwen2ForCausalLM),
 * "_name_or_path" = name_or_path (may be NULL), dtype float32. *out is malloc'ed. */
int dpoc_model_config_json(const dpoc_model_config *cfg, const char *name_or_path, char **out, size_t *len,
                           dpoc_err *err);

/* general.architecture llama or qwen2 -> config: block_count, embedding_length,
 * feed_forward_length, attention.head_count(_kv), attention.layer_norm_rms_epsilon,
 * rope.freq_base, context_length; vocab from tokenizer.ggml.tokens (or the
 * token_embd.weight dims); tied when output.weight is absent; Qwen2 has q/k/v
 * biases. RoPE scaling in use (rope.scaling.*, rope_freqs.weight) is refused by name. */
int dpoc_gguf_model_config(const dpoc_gguf *g, dpoc_model_config *cfg, dpoc_err *err);

/* ---- llama.cpp's layout (convert_hf_to_gguf.py) ---- */

/* The GGUF name of an HF parameter name ("model.layers.3.self_attn.q_proj.weight"
 * -> "blk.3.attn_q.weight") into out (n bytes); 0 when it has none. */
int dpoc_gguf_tensor_name(const char *hf_name, char *out, size_t n);

/* Undoes convert_hf_to_gguf.py's permute() on rows x cols (row-major): within each
 * of n_head heads of hd = rows / n_head rows, GGUF row 2j+s holds HF row s*hd/2+j.
 * tmp holds rows*cols floats. (llama's q/k only: ggml's RoPE rotates adjacent
 * pairs, dpoc's and HF's the two halves of a head.) */
void dpoc_gguf_unpermute_rows(float *w, float *tmp, size_t rows, size_t cols, size_t n_head);

/* ---- the builder ---- */

/* How the builder stores the weights it reads. Today every parameter is
 * converted to fp32 into the model's flat block. The LoRA work adds a mode that
 * keeps each frozen projection in the source's storage type (Q4_K, BF16, ...,
 * read through its dpoc_linear view) instead of converting it: it is added here,
 * and dpoc_model_from_source is where it is honoured. */
typedef enum {
    DPOC_WEIGHTS_FP32 = 0, /* convert every tensor to fp32 (dpoc_ts_to_f32) */
    /* keep every 2-D tensor stored other than F32 (a GGUF block type, F16, BF16)
     * as the source holds it, frozen, dequantized as products read it (llama's
     * permuted q/k rows are copied back in order); the source must outlive the
     * model (dpoc_model_own) */
    DPOC_WEIGHTS_KEEP = 1,
} dpoc_weight_storage;

/* Initialises m for cfg (dpoc_model_init) and fills every parameter from src,
 * stored as `storage` says. The source's naming follows its format: a GGUF has
 * llama.cpp's names and llama's q/k rows permuted (undone here), the others Hugging
 * Face's. Checks, each an error naming the source and the tensor: every parameter
 * present with the model's shape and a convertible type; no tensor the model would
 * not use (a GGUF: none at all; Hugging Face: rotary_emb.inv_freq buffers, and
 * lm_head.weight of a tied model, are ignored). On error m is freed. */
int dpoc_model_from_source(dpoc_model *m, const dpoc_model_config *cfg, const dpoc_tensor_source *src,
                           dpoc_weight_storage storage, dpoc_err *err);

#endif
