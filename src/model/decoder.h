/* The parts of a decoder layer that training (model.c) and generation
 * (generate.c) run alike, so both compute a projection the same way. Internal
 * to model/. prof may be NULL (not measured); ws: the adapters' workspace,
 * linear_workspace floats of the layer's largest adapter. */
#ifndef DPOC_MODEL_DECODER_H
#define DPOC_MODEL_DECODER_H

#include <stddef.h>

#include "dpoc/model.h"
#include "dpoc/prof.h"

/* The watch's view of an output x (n) of layer l's module ("mlp.up_proj"), or of
 * a model-level one (l = DECODER_NO_LAYER, module "model.norm"); w may be NULL. */
#define DECODER_NO_LAYER ((size_t)-1)
void decoder_see(dpoc_act_watch *w, size_t l, const char *module, float *x, size_t n);

/* q (T,QD), k and v (T,KD) = the layer's projections of ln (T,C), biases included.
 * w (may be NULL) sees them as layer l's. */
void decoder_qkv_forward(const dpoc_layer *L, float *q, float *k, float *v, const float *ln,
                         size_t T, dpoc_prof *prof, float *ws, dpoc_act_watch *w, size_t l);
/* out (T,C) = down(silu(gate(ln)) * up(ln)) of ln (T,C); gate, up and act (T,F)
 * keep the inner values (backward reads them). Overwrites out. */
void decoder_mlp_forward(const dpoc_layer *L, float *out, float *gate, float *up, float *act,
                         const float *ln, size_t T, dpoc_prof *prof, float *ws, dpoc_act_watch *w, size_t l);

#endif
