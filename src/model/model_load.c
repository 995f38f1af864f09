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
        if (p->data) continue; /* kept as the source stores it */
        float *dst = m->params + p->offset;
        DPOC_TRY(dpoc_ts_to_f32(c->src, t, dst, p->numel, err));
        DPOC_TRY(undo_permutation(c, p, name, dst, err));
    }
    return check_unused(c, err);
}

/* ---- keeping the source's storage ---- */

#define MAX_KEPT_COPIES 2 /* per layer: llama's q and k */

typedef struct {
    fill_ctx *c;
    void **copies; /* row-reordered copies of llama's q/k, handed to the model after init */
    size_t n_copies, cap;
    int failed;
} keep_ctx;

/* Rows of a GGUF llama q/k tensor back in Hugging Face's order (the inverse of
 * convert_hf_to_gguf.py's permute, on whole rows: each row is whole blocks). */
static void *unpermute_row_bytes(const void *src, size_t rows, size_t row_bytes, size_t n_head) {
    const size_t total = rows * row_bytes;
    unsigned char *dst = malloc(total ? total : 1);
    if (!dst) return NULL;
    const size_t hd = rows / n_head, half = hd / 2;
    const unsigned char *s = src;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t k = 0; k < 2; k++)
                memcpy(dst + (h * hd + k * half + j) * row_bytes, s + (h * hd + 2 * j + k) * row_bytes, row_bytes);
    return dst;
}

static int keep_tensor(void *ctx, const char *hf_name, size_t rows, size_t cols, uint32_t *dtype, const void **data) {
    keep_ctx *k = ctx;
    fill_ctx *c = k->c;
    char name[SOURCE_NAME_MAX];
    if (c->gguf) {
        if (!dpoc_gguf_tensor_name(hf_name, name, sizeof name)) return 0;
    } else {
        snprintf(name, sizeof name, "%s", hf_name);
    }
    const dpoc_ts_tensor *t = dpoc_ts_find(c->src, name);
    /* the checks and their messages are fill_fp32's: what does not fit is not kept */
    if (!t || t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols || t->dtype == DPOC_DT_F32 ||
        !dpoc_gguf_can_dequantize(t->dtype) || cols % dpoc_dtype_block(t->dtype) != 0)
        return 0;
    const void *bytes = t->data;
    size_t nh = 0;
    if (c->gguf && c->cfg->arch == DPOC_ARCH_LLAMA)
        nh = strstr(name, ".attn_q.") ? c->cfg->n_heads : strstr(name, ".attn_k.") ? c->cfg->n_kv_heads : 0;
    if (nh) {
        if (k->n_copies == k->cap) {
            const size_t cap = k->cap ? 2 * k->cap : 2 * MAX_KEPT_COPIES;
            void **p = realloc(k->copies, cap * sizeof *p);
            if (!p) return k->failed = 1, 0;
            k->copies = p;
            k->cap = cap;
        }
        void *copy = unpermute_row_bytes(t->data, rows, dpoc_dtype_row_bytes(t->dtype, cols), nh);
        if (!copy) return k->failed = 1, 0;
        k->copies[k->n_copies++] = copy;
        bytes = copy;
    }
    *dtype = t->dtype;
    *data = bytes;
    return 1;
}

int dpoc_model_from_source(dpoc_model *m, const dpoc_model_config *cfg, const dpoc_tensor_source *src,
                           dpoc_weight_storage storage, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    if (storage != DPOC_WEIGHTS_FP32 && storage != DPOC_WEIGHTS_KEEP)
        return dpoc_errf(err, DPOC_EINTERNAL, "weight storage mode %d is not implemented", (int)storage);
    fill_ctx c = {.src = src, .where = dpoc_ts_where(src), .cfg = cfg, .gguf = dpoc_ts_format_of(src) == DPOC_TS_GGUF};
    keep_ctx k = {.c = &c};
    int rc = storage == DPOC_WEIGHTS_KEEP ? dpoc_model_init_kept(m, cfg, keep_tensor, &k, err)
                                          : dpoc_model_init(m, cfg, err);
    if (!rc && k.failed) rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory keeping %s's tensors", c.where);
    /* the reordered copies belong to the model from here on */
    size_t i = 0;
    for (; !rc && i < k.n_copies; i++) rc = dpoc_model_own(m, k.copies[i], free, err); /* frees it on failure */
    for (; i < k.n_copies; i++) free(k.copies[i]);
    free(k.copies);
    if (rc) {
        if (m->info) dpoc_model_free(m);
        return rc;
    }
    const size_t n = dpoc_ts_count(src);
    c.used = dpoc_calloc(n ? n : 1, 1, "source tensor flags", err);
    rc = c.used ? fill_fp32(m, &c, err) : DPOC_ENOMEM;
    free(c.tmp);
    free(c.used);
    if (rc) dpoc_model_free(m);
    return rc;
}
