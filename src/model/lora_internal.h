/* What lora.c shares with lora_peft.c (internal to model/). */
#ifndef DPOC_MODEL_LORA_INTERNAL_H
#define DPOC_MODEL_LORA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/lora.h"

/* The projections of a layer, in table order. */
#define LORA_PROJECTIONS 7
/* Room for a module name, leaving room in a table name for ".lora_A.weight". */
#define LORA_MODULE_NAME_MAX (DPOC_PARAM_NAME_MAX - 16)

/* "model.layers.<l>.self_attn.q_proj", ... for projection p (0..6) of layer l. */
void lora_module_name(char *out, size_t n, size_t l, size_t p);
/* Attaches adapters of cfg's rank and scale where flags[l * LORA_PROJECTIONS + p]
 * is set, initialised as cfg->init says. m is unchanged on error. */
int lora_attach_where(dpoc_model *m, const dpoc_lora_cfg *cfg, const unsigned char *flags, uint64_t seed,
                      dpoc_err *err);

#endif
