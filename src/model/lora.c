/* LoRA adapters on a model's projections (dpoc/lora.h). */
#include "dpoc/lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/fileutil.h"
#include "core/rng.h"
#include "dpoc/gguf.h"
#include "model/lora_internal.h"

#define PROJECTIONS LORA_PROJECTIONS
static const char *const PROJ_NAMES[PROJECTIONS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
};

static void layer_projections(dpoc_layer *L, dpoc_linear *out[PROJECTIONS]) {
    dpoc_linear *p[PROJECTIONS] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    memcpy(out, p, sizeof p);
}

/* peft's check_target_module_exists for a list: the key equals the target or ends with "." + target. */
static int name_matches(const char *module, const char *target) {
    const size_t n = strlen(module), k = strlen(target);
    if (n == k) return strcmp(module, target) == 0;
    return n > k && module[n - k - 1] == '.' && strcmp(module + n - k, target) == 0;
}

int dpoc_lora_is_target(const dpoc_lora_cfg *cfg, const char *module, const void *regex) {
    switch (cfg->targets_kind) {
    case DPOC_LORA_TARGETS_ALL_LINEAR: return 1; /* the LM head is never offered */
    case DPOC_LORA_TARGETS_LIST:
        for (size_t i = 0; i < cfg->n_targets; i++)
            if (name_matches(module, cfg->targets[i])) return 1;
        return 0;
    case DPOC_LORA_TARGETS_REGEX: {
        pcre2_code *re = (pcre2_code *)regex;
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
        if (!md) return 0;
        /* re.fullmatch: anchored at both ends */
        int rc = pcre2_match(re, (PCRE2_SPTR)module, strlen(module), 0, PCRE2_ANCHORED | PCRE2_ENDANCHORED, md, NULL);
        pcre2_match_data_free(md);
        return rc >= 0;
    }
    }
    return 0;
}

static int compile_targets(const dpoc_lora_cfg *cfg, pcre2_code **re, dpoc_err *err) {
    *re = NULL;
    if (cfg->targets_kind != DPOC_LORA_TARGETS_REGEX) return 0;
    int ecode = 0;
    PCRE2_SIZE eoff = 0;
    *re = pcre2_compile((PCRE2_SPTR)cfg->targets[0], PCRE2_ZERO_TERMINATED, PCRE2_UTF, &ecode, &eoff, NULL);
    if (*re) return 0;
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(ecode, msg, sizeof msg);
    return dpoc_errf(err, DPOC_EINPUT, "config key 'lora_target_modules': '%s' is not a regular expression (%s at %zu)",
                     cfg->targets[0], (const char *)msg, (size_t)eoff);
}

#define MODULE_NAME_MAX LORA_MODULE_NAME_MAX
#define module_name lora_module_name

void lora_module_name(char *out, size_t n, size_t l, size_t p) {
    snprintf(out, n, "model.layers.%zu.%s", l, PROJ_NAMES[p]);
}

/* Which projections get an adapter (flags[l * PROJECTIONS + p]); checks every
 * listed name is used and something is. */
static int choose_targets(const dpoc_model *m, const dpoc_lora_cfg *cfg, unsigned char *flags, dpoc_err *err) {
    pcre2_code *re = NULL;
    DPOC_TRY(compile_targets(cfg, &re, err));
    size_t chosen = 0;
    char name[MODULE_NAME_MAX];
    for (size_t l = 0; l < m->cfg.n_layers; l++)
        for (size_t p = 0; p < PROJECTIONS; p++) {
            module_name(name, sizeof name, l, p);
            flags[l * PROJECTIONS + p] = (unsigned char)dpoc_lora_is_target(cfg, name, re);
            chosen += flags[l * PROJECTIONS + p];
        }
    pcre2_code_free(re);
    if (cfg->targets_kind == DPOC_LORA_TARGETS_LIST)
        for (size_t i = 0; i < cfg->n_targets; i++) {
            int used = 0;
            for (size_t l = 0; l < m->cfg.n_layers && !used; l++)
                for (size_t p = 0; p < PROJECTIONS && !used; p++) {
                    module_name(name, sizeof name, l, p);
                    used = name_matches(name, cfg->targets[i]);
                }
            if (!used)
                return dpoc_errf(err, DPOC_EINPUT,
                                 "config key 'lora_target_modules': '%s' names no projection of this model (its "
                                 "projections: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; the "
                                 "LM head cannot be a target)",
                                 cfg->targets[i]);
        }
    if (!chosen)
        return dpoc_errf(err, DPOC_EINPUT, "config key 'lora_target_modules': no projection of the model matches");
    return 0;
}

/* Uniform in [-bound, bound) from the top 24 bits of a splitmix64 draw. */
static float uniform(uint64_t *state, float bound) {
    const float u = (float)(dpoc_splitmix64(state) >> 40) * (1.0f / 16777216.0f);
    return (2.0f * u - 1.0f) * bound;
}

/* Standard normal (Box-Muller on two uniforms in (0, 1]). */
static float normal(uint64_t *state) {
    const double u1 = ((double)(dpoc_splitmix64(state) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    const double u2 = (double)(dpoc_splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

/* peft's reset_lora_parameters. kaiming_uniform_(a = sqrt(5)) on a (rows, fan_in)
 * weight is U(+-1/sqrt(fan_in)), as nn.Linear's own initialisation. */
static void init_adapter(float *A, float *B, size_t r, size_t in, size_t out, dpoc_lora_init how, uint64_t *rng) {
    for (size_t i = 0; i < r * in; i++)
        A[i] = how == DPOC_LORA_INIT_GAUSSIAN ? normal(rng) / (float)r : uniform(rng, 1.0f / sqrtf((float)in));
    for (size_t i = 0; i < out * r; i++) B[i] = how == DPOC_LORA_INIT_RANDOM ? uniform(rng, 1.0f / sqrtf((float)r)) : 0.0f;
}

static void add_row(dpoc_model *m, const char *module, const char *which, size_t d0, size_t d1, size_t *numel) {
    dpoc_param_info *p = &m->info[m->n_tensors++];
    snprintf(p->name, sizeof p->name, "%s.lora_%s.weight", module, which);
    p->ndim = 2;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->numel = d0 * d1;
    p->offset = *numel;
    p->dtype = DPOC_DT_F32;
    p->trainable = 1;
    *numel += p->numel;
}

/* Every base view loses its gradient: the base is frozen. */
static void freeze_base(dpoc_model *m) {
    m->wte.g = DPOC_NO_PARAM;
    m->final_norm.g = DPOC_NO_PARAM;
    m->lm_head.gw = m->lm_head.gb = DPOC_NO_PARAM;
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        dpoc_layer *L = &m->layers[l];
        L->attn_norm.g = L->mlp_norm.g = DPOC_NO_PARAM;
        dpoc_linear *proj[PROJECTIONS];
        layer_projections(L, proj);
        for (size_t p = 0; p < PROJECTIONS; p++) proj[p]->gw = proj[p]->gb = DPOC_NO_PARAM;
    }
    for (size_t i = 0; i < m->n_tensors; i++) m->info[i].trainable = 0;
}

int dpoc_lora_attach(dpoc_model *m, const dpoc_lora_cfg *cfg, uint64_t seed, dpoc_err *err) {
    unsigned char *flags = dpoc_calloc(m->cfg.n_layers * PROJECTIONS, 1, "adapter targets", err);
    if (!flags) return DPOC_ENOMEM;
    int rc = choose_targets(m, cfg, flags, err);
    if (!rc) rc = lora_attach_where(m, cfg, flags, seed, err);
    free(flags);
    return rc;
}

int lora_attach_where(dpoc_model *m, const dpoc_lora_cfg *cfg, const unsigned char *flags, uint64_t seed,
                      dpoc_err *err) {
    if (m->frozen) return dpoc_errf(err, DPOC_EINTERNAL, "the model already carries adapters");
    if (cfg->r == 0) return dpoc_errf(err, DPOC_EINPUT, "config key 'lora_r' must be at least 1");
    const size_t L = m->cfg.n_layers, r = cfg->r;
    int rc = 0;
    size_t n_adapters = 0, numel = 0;
    for (size_t i = 0; i < L * PROJECTIONS; i++) n_adapters += flags[i];
    dpoc_param_info *info = NULL;
    float *block = NULL;
    info = realloc(m->info, (m->n_tensors + 2 * n_adapters) * sizeof *info);
    if (!info) rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory for the adapter table");
    else m->info = info;
    /* sizes first: one allocation for every adapter */
    for (size_t l = 0; !rc && l < L; l++) {
        dpoc_linear *proj[PROJECTIONS];
        layer_projections(&m->layers[l], proj);
        for (size_t p = 0; p < PROJECTIONS; p++)
            if (flags[l * PROJECTIONS + p]) numel += r * (proj[p]->in + proj[p]->out);
    }
    if (!rc && !(block = dpoc_calloc(numel, sizeof(float), "LoRA adapters", err))) rc = DPOC_ENOMEM;
    if (rc) return rc;
    /* from here on nothing fails: the base moves to the frozen side */
    freeze_base(m);
    m->frozen = m->params;
    m->frozen_numel = m->numel;
    m->params = block;
    m->numel = 0;
    const float scale = (float)(cfg->use_rslora ? cfg->alpha / sqrt((double)r) : cfg->alpha / (double)r);
    uint64_t rng = seed;
    char name[MODULE_NAME_MAX];
    for (size_t l = 0; l < L; l++) {
        dpoc_layer *lay = &m->layers[l];
        lay->grad_from = m->numel;
        dpoc_linear *proj[PROJECTIONS];
        layer_projections(lay, proj);
        for (size_t p = 0; p < PROJECTIONS; p++) {
            if (!flags[l * PROJECTIONS + p]) continue;
            dpoc_linear *lin = proj[p];
            module_name(name, sizeof name, l, p);
            const size_t offA = m->numel;
            add_row(m, name, "A", r, lin->in, &m->numel);
            const size_t offB = m->numel;
            add_row(m, name, "B", lin->out, r, &m->numel);
            init_adapter(block + offA, block + offB, r, lin->in, lin->out, cfg->init, &rng);
            lin->lora = (dpoc_adapter){r, scale, block + offA, block + offB, offA, offB, 1};
        }
    }
    m->tail_grad_from = m->numel;
    if (r > m->cfg.lora_r_max) m->cfg.lora_r_max = r;
    return 0;
}

int dpoc_lora_attach_named(dpoc_model *m, const dpoc_lora_cfg *cfg, int (*has)(void *ctx, const char *name),
                           void *ctx, dpoc_err *err) {
    unsigned char *flags = dpoc_calloc(m->cfg.n_layers * PROJECTIONS, 1, "adapter targets", err);
    if (!flags) return DPOC_ENOMEM;
    char module[MODULE_NAME_MAX], name[DPOC_PARAM_NAME_MAX];
    size_t n = 0;
    for (size_t l = 0; l < m->cfg.n_layers; l++)
        for (size_t p = 0; p < PROJECTIONS; p++) {
            module_name(module, sizeof module, l, p);
            snprintf(name, sizeof name, "%s.lora_A.weight", module);
            n += flags[l * PROJECTIONS + p] = (unsigned char)(has(ctx, name) != 0);
        }
    int rc = n ? lora_attach_where(m, cfg, flags, 0, err)
               : dpoc_errf(err, DPOC_EINPUT, "no adapter of this model's projections (no model.layers.N.*.lora_A.weight)");
    free(flags);
    return rc;
}

int dpoc_lora_attached(const dpoc_model *m) { return m->frozen != NULL; }

void dpoc_lora_enable(dpoc_model *m, int on) {
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        dpoc_linear *proj[PROJECTIONS];
        layer_projections(&m->layers[l], proj);
        for (size_t p = 0; p < PROJECTIONS; p++) proj[p]->lora.on = on;
    }
}

int dpoc_lora_merge(const dpoc_model *m, dpoc_model *out, dpoc_err *err) {
    if (!m->frozen) return dpoc_errf(err, DPOC_EINTERNAL, "the model carries no adapters");
    dpoc_model_config cfg = m->cfg;
    cfg.lora_r_max = 0;
    DPOC_TRY(dpoc_model_init(out, &cfg, err));
    /* the base's table rows come first and in the same order in both; a kept
     * tensor is dequantized (its rows already in Hugging Face's order) */
    for (size_t i = 0; i < out->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        float *dst = out->params + out->info[i].offset;
        if (!p->data) {
            memcpy(dst, m->frozen + p->offset, p->numel * sizeof(float));
            continue;
        }
        const int rc = dpoc_gguf_dequantize_raw(p->dtype, p->data, dpoc_dtype_row_bytes(p->dtype, p->shape[1]) * p->shape[0],
                                                dst, p->numel, err);
        if (rc) {
            dpoc_model_free(out);
            return rc;
        }
    }
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        dpoc_linear *src[PROJECTIONS], *dst[PROJECTIONS];
        layer_projections((dpoc_layer *)&m->layers[l], src);
        layer_projections(&out->layers[l], dst);
        for (size_t p = 0; p < PROJECTIONS; p++) {
            const dpoc_adapter *a = &src[p]->lora;
            if (!a->r) continue;
            float *W = (float *)dst[p]->w;
            const size_t in = src[p]->in, o = src[p]->out;
            for (size_t i = 0; i < o; i++)
                for (size_t j = 0; j < in; j++) {
                    double d = 0;
                    for (size_t k = 0; k < a->r; k++) d += (double)a->B[i * a->r + k] * a->A[k * in + j];
                    W[i * in + j] = (float)((double)W[i * in + j] + (double)a->scale * d);
                }
        }
    }
    return 0;
}
