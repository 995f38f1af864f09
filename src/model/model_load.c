/* The one builder: a model from a tensor source (dpoc/model_load.h), whether the
 * source is a GGUF file, a Hugging Face directory or a caller's memory. The
 * source's format decides the naming: a GGUF's tensors carry llama.cpp's names
 * (dpoc_gguf_tensor_name) with llama's q/k rows permuted, every other source's
 * the Hugging Face parameter names. Messages keep each format's vocabulary (a
 * GGUF's shapes are printed as ggml's ne, innermost first). */
#include "dpoc/model_load.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Room for a parameter's name in the source's naming (llama.cpp's are shorter). */
#define SOURCE_NAME_MAX (DPOC_PARAM_NAME_MAX + 32)
/* Room for a printed shape of up to DPOC_TS_MAX_DIMS dimensions. */
#define SHAPE_TEXT_MAX 256

typedef struct {
    const dpoc_tensor_source *src;
    const char *where;
    const dpoc_model_config *cfg;
    int gguf;            /* llama.cpp's names and layout */
    unsigned char *used; /* per source tensor: a parameter was read from it */
    float *tmp;          /* un-permutation scratch */
    size_t tmp_n;
} fill_ctx;

/* "[a, b, c]" of dims in order, or reversed (a GGUF's ne from a PyTorch shape). */
static const char *fmt_dims(char *buf, size_t n, const size_t *dims, size_t nd, int reversed) {
    size_t pos = 0;
    int w = snprintf(buf, n, "[");
    pos = w > 0 ? (size_t)w : 0;
    for (size_t i = 0; i < nd && pos < n; i++) {
        w = snprintf(buf + pos, n - pos, "%s%zu", i ? ", " : "", dims[reversed ? nd - 1 - i : i]);
        if (w < 0) break;
        pos += (size_t)w;
    }
    if (pos < n) snprintf(buf + pos, n - pos, "]");
    return buf;
}

/* p's tensor in the source; its name in the source's naming goes to name. */
static int find_param(fill_ctx *c, const dpoc_param_info *p, const dpoc_ts_tensor **out, char *name, size_t n,
                      dpoc_err *err) {
    if (c->gguf) {
        if (!dpoc_gguf_tensor_name(p->name, name, n))
            return dpoc_errf(err, DPOC_EINTERNAL, "no GGUF name for parameter '%s'", p->name);
    } else {
        snprintf(name, n, "%s", p->name);
    }
    *out = dpoc_ts_find(c->src, name);
    if (*out) return 0;
    if (c->gguf) return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' (%s) is missing", c->where, name, p->name);
    return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is missing%s", c->where, p->name,
                     dpoc_ts_format_of(c->src) == DPOC_TS_SAFETENSORS ? " from the safetensors files" : "");
}

static int check_shape(const fill_ctx *c, const dpoc_param_info *p, const dpoc_ts_tensor *t, const char *name,
                       dpoc_err *err) {
    int same = t->ndim == p->ndim;
    for (size_t d = 0; same && d < p->ndim; d++) same = t->shape[d] == p->shape[d];
    if (same) return 0;
    char got[SHAPE_TEXT_MAX], want[SHAPE_TEXT_MAX];
    if (c->gguf)
        return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has ne %s, expected %s", c->where, name,
                         fmt_dims(got, sizeof got, t->shape, t->ndim, 1),
                         fmt_dims(want, sizeof want, p->shape, p->ndim, 1));
    return dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has shape %s, expected %s", c->where, name,
                     fmt_dims(got, sizeof got, t->shape, t->ndim, 0),
                     fmt_dims(want, sizeof want, p->shape, p->ndim, 0));
}

/* convert_hf_to_gguf.py permutes llama's q/k rows for ggml's adjacent-pair RoPE;
 * dpoc's RoPE is HF's half-split one, so undo it (Q with n_head, K with n_head_kv). */
static int undo_permutation(fill_ctx *c, const dpoc_param_info *p, const char *name, float *dst, dpoc_err *err) {
    if (!c->gguf || c->cfg->arch != DPOC_ARCH_LLAMA) return 0;
    size_t nh = 0;
    if (strstr(name, ".attn_q.")) nh = c->cfg->n_heads;
    else if (strstr(name, ".attn_k.")) nh = c->cfg->n_kv_heads;
    if (!nh) return 0;
    if (p->numel > c->tmp_n) {
        free(c->tmp);
        c->tmp = dpoc_malloc(p->numel * sizeof *c->tmp, "permutation scratch", err);
        c->tmp_n = c->tmp ? p->numel : 0;
        if (!c->tmp) return DPOC_ENOMEM;
    }
    dpoc_gguf_unpermute_rows(dst, c->tmp, p->shape[0], p->ndim == 2 ? p->shape[1] : 1, nh);
    return 0;
}

/* A tensor the model would not use means a model dpoc does not understand. */
static int check_unused(const fill_ctx *c, dpoc_err *err) {
    const int llama = c->cfg->arch == DPOC_ARCH_LLAMA;
    for (size_t i = 0; i < dpoc_ts_count(c->src); i++) {
        if (c->used[i]) continue;
        const char *name = dpoc_ts_at(c->src, i)->name;
        if (c->gguf)
            return dpoc_errf(err, DPOC_EINPUT, "%s: unexpected tensor '%s' for architecture %s", c->where, name,
                             llama ? "llama" : "qwen2");
        if (strstr(name, "rotary_emb.inv_freq")) continue; /* old checkpoints store the RoPE buffer */
        /* a tied model's file may still carry lm_head.weight: ignored (the embedding is the head) */
        if (c->cfg->tie_word_embeddings && strcmp(name, "lm_head.weight") == 0) continue;
        return dpoc_errf(err, DPOC_EINPUT, "%s: unexpected tensor '%s' for %s", c->where, name,
                         llama ? "LlamaForCausalLM" : "Qwen2ForCausalLM");
    }
    return 0;
}

static int fill_fp32(dpoc_model *m, fill_ctx *c, dpoc_err *err) {
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        char name[SOURCE_NAME_MAX];
        const dpoc_ts_tensor *t;
        DPOC_TRY(find_param(c, p, &t, name, sizeof name, err));
        c->used[dpoc_ts_index(c->src, t)] = 1;
        DPOC_TRY(check_shape(c, p, t, name, err));
        float *dst = m->params + p->offset;
        DPOC_TRY(dpoc_ts_to_f32(c->src, t, dst, p->numel, err));
        DPOC_TRY(undo_permutation(c, p, name, dst, err));
    }
    return check_unused(c, err);
}

int dpoc_model_from_source(dpoc_model *m, const dpoc_model_config *cfg, const dpoc_tensor_source *src,
                           dpoc_weight_storage storage, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    if (storage != DPOC_WEIGHTS_FP32)
        return dpoc_errf(err, DPOC_EINTERNAL, "weight storage mode %d is not implemented", (int)storage);
    DPOC_TRY(dpoc_model_init(m, cfg, err));
    fill_ctx c = {.src = src, .where = dpoc_ts_where(src), .cfg = cfg, .gguf = dpoc_ts_format_of(src) == DPOC_TS_GGUF};
    const size_t n = dpoc_ts_count(src);
    c.used = dpoc_calloc(n ? n : 1, 1, "source tensor flags", err);
    int rc = c.used ? fill_fp32(m, &c, err) : DPOC_ENOMEM;
    free(c.tmp);
    free(c.used);
    if (rc) dpoc_model_free(m);
    return rc;
}
