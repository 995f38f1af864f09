/* LoRA adapters as llama.cpp's LoRA adapter GGUF: the file
 * convert_lora_to_gguf.py writes for a peft adapter and llama.cpp loads with
 * llama_adapter_lora_init (llama-cli --lora FILE).
 *
 * Metadata: general.architecture ("llama" / "qwen2"), general.type "adapter",
 * adapter.type "lora", general.name, adapter.lora.alpha (f32),
 * general.quantization_version. Tensors, F32, for every adapted projection of
 * layer N: blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up,
 * ffn_down}.weight.lora_a = A (r, in), ne [in, r], and .lora_b = B (out, r),
 * ne [r, out]; for llama the rows of attn_q's and attn_k's B are permuted as
 * convert_hf_to_gguf.py permutes the q/k weights.
 *
 * llama.cpp scales an adapter by alpha / r (r = lora_b's ne[0]) and has no
 * rsLoRA key, so the file's alpha is alpha' = scale * r: the config's alpha, or
 * alpha * sqrt(r) for rsLoRA (scale alpha / sqrt(r)). */
#ifndef DPOC_LORA_GGUF_H
#define DPOC_LORA_GGUF_H

#include "dpoc/config.h"
#include "dpoc/err.h"
#include "dpoc/model.h"

/* Writes m's adapters (m must carry them; cfg is their config: r, alpha,
 * use_rslora) as a llama.cpp LoRA adapter GGUF at path, through a temporary
 * file in path's directory renamed into place. general.name is path's file
 * name without ".gguf". Errors: no adapters; an adapter whose rank or scale is
 * not cfg's (one alpha serves the whole file); q/k rows that are not a whole
 * number of rotary heads; I/O (naming path). */
int dpoc_lora_save_gguf(const dpoc_model *m, const dpoc_lora_cfg *cfg, const char *path, dpoc_err *err);

#endif
