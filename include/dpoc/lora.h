/* LoRA adapters on a model's projections, with peft's semantics (peft 0.x
 * LoraConfig / LoraLayer, TRL's ModelConfig key names):
 *   y = W x + b + scale * B (A x),  scale = alpha / r (rsLoRA: alpha / sqrt(r)),
 * A (r, in), B (out, r); the base W, b, the norms, the embedding and the head
 * are frozen. Attaching moves the base's parameters out of the trainable block
 * (into m->frozen) and makes the trainable block hold only the adapters, A
 * then B of each adapted projection, layer after layer in the projection order
 * q, k, v, o, gate, up, down: the gradients of the last layer are still final
 * first. Table names are peft's state-dict keys without the PeftModel prefix
 * "base_model.model." (model.layers.N.self_attn.q_proj.lora_A.weight). */
#ifndef DPOC_LORA_H
#define DPOC_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/config.h"
#include "dpoc/err.h"
#include "dpoc/model.h"

/* peft's prefix of every key in adapter_model.safetensors. */
#define DPOC_PEFT_KEY_PREFIX "base_model.model."

/* 1 when the projection named module (e.g. "model.layers.3.self_attn.q_proj")
 * is a target of cfg, as peft decides: all-linear, a name in the list equal to
 * module or ending it after a ".", or the expression matching all of module.
 * regex: the compiled expression for DPOC_LORA_TARGETS_REGEX (internal). */
int dpoc_lora_is_target(const dpoc_lora_cfg *cfg, const char *module, const void *regex);

/* Attaches an adapter of rank cfg->r to every projection cfg targets, initialised
 * as cfg->init says (random draws from seed). Errors (DPOC_EINPUT, naming
 * lora_target_modules): an expression that does not compile, a listed name that
 * matches no projection, no projection matched at all. m is unchanged on error. */
int dpoc_lora_attach(dpoc_model *m, const dpoc_lora_cfg *cfg, uint64_t seed, dpoc_err *err);

/* Attaches adapters of cfg's rank and scale (zero-initialised: the caller fills
 * them) to exactly the projections whose A tensor exists by has(ctx, name), name
 * being the table name "model.layers.N.<module>.lora_A.weight". For stored
 * adapters (a PEFT directory, a checkpoint): the tensors say where they are.
 * DPOC_EINPUT when there is none. */
int dpoc_lora_attach_named(dpoc_model *m, const dpoc_lora_cfg *cfg, int (*has)(void *ctx, const char *name),
                           void *ctx, dpoc_err *err);

/* 1 when m carries adapters. */
int dpoc_lora_attached(const dpoc_model *m);
/* Switches every adapter on (1) or off (0: the base model, peft's disable_adapter()). */
void dpoc_lora_enable(dpoc_model *m, int on);

/* *out = a plain model (every parameter trainable, no adapters) whose weights
 * are m's base with each adapter merged in: W + scale * B A, as peft's
 * merge_and_unload (computed in double, rounded once). m must carry adapters. */
int dpoc_lora_merge(const dpoc_model *m, dpoc_model *out, dpoc_err *err);

/* ---- PEFT adapter directories (adapter_config.json + adapter_model.safetensors) ---- */

/* Reads dir/adapter_config.json into *cfg (the LoRA keys; init is left as it is:
 * the tensors give the values). Refused, naming the file and the key: a
 * peft_type other than LORA, DoRA, fan_in_fan_out, bias other than "none",
 * per-module rank or alpha patterns, layers_to_transform, modules_to_save. */
int dpoc_lora_read_peft_config(dpoc_lora_cfg *cfg, const char *dir, dpoc_err *err);
/* Attaches the adapter stored in dir to m (its config, then every tensor of
 * adapter_model.safetensors, peft's key names, shapes checked; a missing or an
 * unexpected tensor is an error naming it). On error m is as it was, or, after
 * attaching, carries zero-initialised adapters (the caller frees it). cfg_out
 * (may be NULL) receives the adapter's config. */
int dpoc_lora_load_peft(dpoc_model *m, const char *dir, dpoc_lora_cfg *cfg_out, dpoc_err *err);
/* Writes m's adapters as a PEFT directory dir that PeftModel.from_pretrained
 * loads: adapter_model.safetensors (F32, peft's keys) and adapter_config.json
 * (cfg's r, alpha, targets, rsLoRA; base_model_name_or_path = base). Each file is
 * written under a temporary name and renamed into place. */
int dpoc_lora_save_peft(const dpoc_model *m, const dpoc_lora_cfg *cfg, const char *base, const char *dir,
                        dpoc_err *err);

#endif
