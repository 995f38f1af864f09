/* Exporting a checkpoint's policy as a Hugging Face model directory.
 *
 * out_dir/model.safetensors   the checkpoint's /model tensors, F32 (bit for bit) or
 *                             BF16 (round to nearest even, as torch's .to(torch.bfloat16))
 * out_dir/config.json         the source model's, with "torch_dtype" / "dtype" set to
 *                             the exported dtype ("float32" or "bfloat16")
 * out_dir/<tokenizer files>   copied as they are when the source has them:
 *                             tokenizer.json, tokenizer_config.json, special_tokens_map.json,
 *                             vocab.json, merges.txt, tokenizer.model, added_tokens.json,
 *                             chat_template.jinja (from the tokenizer directory) and
 *                             generation_config.json (from the model directory)
 *
 * The source is the directory the run started from: model_name_or_path in the
 * checkpoint's config attribute (tokenizer files from tokenizer_name_or_path when
 * the config names one). A relative path is taken relative to the current
 * directory, as training took it. Every file is written to a temporary name in
 * out_dir, fsync'ed and renamed into place. */
#ifndef DPOC_EXPORT_H
#define DPOC_EXPORT_H

#include <stddef.h>

#include "dpoc/err.h"

typedef struct {
    long step;        /* the checkpoint's global_step */
    size_t n_tensors; /* tensors written */
    size_t n_params;  /* parameters written */
    size_t n_copied;  /* files copied from the source directory */
    char model_dir[4096]; /* the source directory used */
    int lora;             /* 1: a LoRA run's checkpoint */
} dpoc_export_info;

/* Verifies ckpt (format version, content hash), then writes out_dir as above:
 * bf16 = 0 for F32, 1 for BF16. Bad input (a missing or corrupted checkpoint, a
 * source directory that is gone or holds another model) returns DPOC_EINPUT with
 * a message naming the file. */
int dpoc_export_checkpoint(const char *ckpt, const char *out_dir, int bf16, dpoc_err *err);

/* The same, with config.json and every copied file taken from model_dir when it is
 * not NULL (a source directory moved since training, or a relative path run from
 * elsewhere); info (may be NULL) receives what was written. */
int dpoc_export_checkpoint_ex(const char *ckpt, const char *model_dir, const char *out_dir, int bf16,
                              dpoc_export_info *info, dpoc_err *err);

/* What dpoc_export_checkpoint_opts writes. A LoRA run's checkpoint (use_peft)
 * gives, by default, its adapter as a PEFT directory (out_dir/adapter_config.json
 * + adapter_model.safetensors, which PeftModel.from_pretrained loads on the base);
 * merge: the merged model (W + scale B A) as the Hugging Face directory above;
 * gguf_lora (a file path, not NULL): llama.cpp's LoRA adapter GGUF instead. A
 * full fine-tune's checkpoint gives the directory above; merge and gguf_lora are
 * then errors. */
typedef struct {
    const char *model_dir; /* as in dpoc_export_checkpoint_ex; may be NULL */
    int bf16;
    int merge;
    const char *gguf_lora;
} dpoc_export_opts;

int dpoc_export_checkpoint_opts(const char *ckpt, const char *out_dir, const dpoc_export_opts *o,
                                dpoc_export_info *info, dpoc_err *err);

/* The model (and tokenizer) the checkpoint's run started from: model_name_or_path
 * and tokenizer_name_or_path (defaulting to the model) of its config attribute. */
int dpoc_ckpt_run_source(const char *ckpt, char *model, size_t model_n, char *tok, size_t tok_n, dpoc_err *err);

#endif
