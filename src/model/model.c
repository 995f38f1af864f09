/* Llama / Qwen2 decoder: parameter table and views, forward and backward of one
 * sequence, or of preference pairs packed one after another, each prompt
 * computed once for both its completions. Each sequence runs at its own length
 * (no padding); only the rows whose next token is a label go through the LM
 * head. Activations are kept per layer, or only each layer's input with the
 * layer recomputed in backward (gradient checkpointing). Building a model from
 * a file is model_load.c's. */
#include "dpoc/model.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "core/pool.h"
#include "dpoc/runtime.h"
#include "dpoc/finite.h"
#include "dpoc/gguf.h"
#include "model/decoder.h"

/* ---- parameter table ---- */

/* The table while it is built: which tensors are kept outside the block. */
typedef struct {
    dpoc_model *m;
    dpoc_keep_fn keep;
    void *ctx;
} table_builder;

/* Adds a row; returns its index. A kept 2-D tensor gets no room in the block. */
static size_t add_param(table_builder *tb, const char *name, size_t d0, size_t d1) {
    dpoc_model *m = tb->m;
    dpoc_param_info *p = &m->info[m->n_tensors];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->numel = d1 ? d0 * d1 : d0;
    p->dtype = DPOC_DT_F32;
    uint32_t dtype = DPOC_DT_F32;
    const void *data = NULL;
    if (d1 && tb->keep && tb->keep(tb->ctx, name, d0, d1, &dtype, &data) && data) {
        p->dtype = (dpoc_dtype)dtype;
        p->data = data;
        p->offset = DPOC_NO_PARAM;
        p->trainable = 0;
    } else {
        p->offset = m->numel;
        p->trainable = 1;
        m->numel += p->numel;
    }
    return m->n_tensors++;
}

/* A view of row r, bound by bind_views once the block exists (g holds r until then). */
static dpoc_param_ref ref_to(size_t r) { return (dpoc_param_ref){NULL, r}; }

/* A projection (out, in) named "model.layers.<l>.<module>.weight", with its bias when has_bias. */
static dpoc_linear add_linear(table_builder *tb, size_t l, const char *module, size_t out, size_t in, int has_bias) {
    char name[DPOC_PARAM_NAME_MAX];
    dpoc_linear L = {.in = in, .out = out, .wtype = DPOC_DT_F32, .gb = DPOC_NO_PARAM};
    snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, module);
    L.gw = add_param(tb, name, out, in);
    if (has_bias) {
        snprintf(name, sizeof name, "model.layers.%zu.%s.bias", l, module);
        L.gb = add_param(tb, name, out, 0);
    }
    return L;
}

/* An RMSNorm weight (C) named "model.layers.<l>.<module>.weight". */
static dpoc_param_ref add_norm(table_builder *tb, size_t l, const char *module, size_t C) {
    char name[DPOC_PARAM_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, module);
    return ref_to(add_param(tb, name, C, 0));
}

/* 1-D tensors are never kept: their values sit in the block at their offset. */
static void bind_ref(const dpoc_model *m, dpoc_param_ref *r) {
    const dpoc_param_info *p = &m->info[r->g];
    r->v = m->params + p->offset;
    r->g = p->offset;
}

static void bind_linear(const dpoc_model *m, dpoc_linear *L) {
    const dpoc_param_info *w = &m->info[L->gw];
    if (w->data) { /* kept: frozen, read through the dequantization scratch */
        L->w = w->data;
        L->wtype = w->dtype;
        L->gw = DPOC_NO_PARAM;
        L->deq = m->deq;
        L->deq_n = m->deq_n;
        L->pool = m->pool;
    } else {
        L->w = m->params + w->offset;
        L->gw = w->offset;
    }
    if (L->gb != DPOC_NO_PARAM) {
        L->bias = m->params + m->info[L->gb].offset;
        L->gb = m->info[L->gb].offset;
    }
}

/* Points every view at its values, in the parameter block (at its gradient's
 * offset: every parameter there is trainable and fp32) or kept outside it. */
static void bind_views(dpoc_model *m) {
    const dpoc_param_info *e = &m->info[m->wte.g];
    if (e->data) {
        m->wte_type = e->dtype;
        m->wte_data = e->data;
        m->wte = (dpoc_param_ref){NULL, DPOC_NO_PARAM};
    } else {
        bind_ref(m, &m->wte);
    }
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        dpoc_layer *L = &m->layers[l];
        bind_ref(m, &L->attn_norm);
        bind_ref(m, &L->mlp_norm);
        dpoc_linear *lin[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++) bind_linear(m, lin[i]);
    }
    bind_ref(m, &m->final_norm);
    bind_linear(m, &m->lm_head);
}

/* Tensors per layer: 2 norms, 7 projections, 3 optional q/k/v biases. */
#define TENSORS_PER_LAYER 12
/* The embedding, the final norm and an untied LM head. */
#define TENSORS_OUTSIDE_LAYERS 3
/* The dequantization scratch of a model with kept tensors: at most this many
 * floats (whole rows of the largest kept matrix), and at least the LM head's
 * vocabulary chunk (the head reads LMHEAD_CHUNK rows at a time). */
#define DEQUANT_SCRATCH_FLOATS ((size_t)1 << 24)

/* The scratch kept products dequantize into, sized for the kept tensors. */
static int alloc_dequant_scratch(dpoc_model *m, dpoc_err *err) {
    size_t need = 0;
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        if (!p->data) continue;
        size_t n = p->numel < DEQUANT_SCRATCH_FLOATS ? p->numel : DEQUANT_SCRATCH_FLOATS;
        const size_t head = (p->shape[0] < LMHEAD_CHUNK ? p->shape[0] : LMHEAD_CHUNK) * p->shape[1];
        if (n < head) n = head;
        if (n < p->shape[1]) n = p->shape[1];
        if (n > need) need = n;
    }
    if (!need) return 0;
    m->deq = dpoc_malloc(need * sizeof(float), "dequantization scratch", err);
    if (!m->deq) return DPOC_ENOMEM;
    m->deq_n = need;
    /* dequantizing runs between BLAS calls: on as many threads as the BLAS uses */
    m->pool = dpoc_malloc(sizeof *m->pool, "dequantization threads", err);
    if (!m->pool) return DPOC_ENOMEM;
    const size_t threads = dpoc_rt()->blas.threads > 0 ? (size_t)dpoc_rt()->blas.threads : 1;
    const int rc = dpoc_pool_init(m->pool, threads, err);
    if (rc) {
        free(m->pool);
        m->pool = NULL;
    }
    return rc;
}

int dpoc_model_init(dpoc_model *m, const dpoc_model_config *cfg, dpoc_err *err) {
    return dpoc_model_init_kept(m, cfg, NULL, NULL, err);
}

int dpoc_model_init_kept(dpoc_model *m, const dpoc_model_config *cfg, dpoc_keep_fn keep, void *ctx, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    const size_t C = cfg->hidden_size, V = cfg->vocab_size, F = cfg->intermediate_size;
    const size_t QD = cfg->n_heads * cfg->head_dim, KD = cfg->n_kv_heads * cfg->head_dim;
    const size_t max_tensors = TENSORS_OUTSIDE_LAYERS + TENSORS_PER_LAYER * cfg->n_layers;
    m->info = dpoc_calloc(max_tensors, sizeof *m->info, "parameter table", err);
    m->layers = dpoc_calloc(cfg->n_layers, sizeof *m->layers, "layer table", err);
    if (!m->info || !m->layers) {
        dpoc_model_free(m);
        return DPOC_ENOMEM;
    }
    table_builder tb = {m, keep, ctx};
    /* the order of Hugging Face's state dict: each layer's tensors together, so
     * its gradients are final together (the gradient hook) */
    m->wte = ref_to(add_param(&tb, "model.embed_tokens.weight", V, C));
    const int bias = cfg->qkv_bias;
    for (size_t l = 0; l < cfg->n_layers; l++) {
        dpoc_layer *L = &m->layers[l];
        L->grad_from = m->numel;
        L->attn_norm = add_norm(&tb, l, "input_layernorm", C);
        L->q = add_linear(&tb, l, "self_attn.q_proj", QD, C, bias);
        L->k = add_linear(&tb, l, "self_attn.k_proj", KD, C, bias);
        L->v = add_linear(&tb, l, "self_attn.v_proj", KD, C, bias);
        L->o = add_linear(&tb, l, "self_attn.o_proj", C, QD, 0);
        L->mlp_norm = add_norm(&tb, l, "post_attention_layernorm", C);
        L->gate = add_linear(&tb, l, "mlp.gate_proj", F, C, 0);
        L->up = add_linear(&tb, l, "mlp.up_proj", F, C, 0);
        L->down = add_linear(&tb, l, "mlp.down_proj", C, F, 0);
    }
    m->tail_grad_from = m->numel;
    m->final_norm = ref_to(add_param(&tb, "model.norm.weight", C, 0));
    m->lm_head = (dpoc_linear){.in = C, .out = V, .wtype = DPOC_DT_F32, .gb = DPOC_NO_PARAM};
    m->lm_head.gw = cfg->tie_word_embeddings ? m->wte.g : add_param(&tb, "lm_head.weight", V, C);
    m->params = dpoc_calloc(m->numel ? m->numel : 1, sizeof(float), "model parameters", err);
    if (!m->params || alloc_dequant_scratch(m, err)) {
        dpoc_model_free(m);
        return DPOC_ENOMEM;
    }
    bind_views(m);
    return 0;
}

int dpoc_model_own(dpoc_model *m, void *p, void (*release)(void *), dpoc_err *err) {
    void **o = realloc(m->owned, (m->n_owned + 1) * sizeof *o);
    if (o) m->owned = o;
    void (**r)(void *) = o ? realloc(m->release, (m->n_owned + 1) * sizeof *r) : NULL;
    if (r) m->release = r;
    if (!o || !r) {
        release(p);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    }
    m->owned[m->n_owned] = p;
    m->release[m->n_owned++] = release;
    return 0;
}

int dpoc_model_has_kept(const dpoc_model *m) { return m->deq != NULL; }

uint64_t dpoc_model_fingerprint(const dpoc_model *m) {
    uint64_t h = 0xcbf29ce484222325ull;
    const unsigned char *b = (const unsigned char *)m->params;
    for (size_t i = 0; i < m->numel * sizeof(float); i++) h = (h ^ b[i]) * 0x100000001b3ull;
    if (m->frozen) {
        b = (const unsigned char *)m->frozen;
        for (size_t i = 0; i < m->frozen_numel * sizeof(float); i++) h = (h ^ b[i]) * 0x100000001b3ull;
    }
    for (size_t t = 0; t < m->n_tensors; t++) {
        const dpoc_param_info *p = &m->info[t];
        if (!p->data) continue;
        b = p->data;
        const size_t n = dpoc_dtype_row_bytes(p->dtype, p->shape[1]) * p->shape[0];
        for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    }
    return h;
}

void dpoc_model_embedding_row(const dpoc_model *m, size_t r, float *out) {
    const size_t C = m->cfg.hidden_size;
    if (m->wte.v) {
        memcpy(out, m->wte.v + r * C, C * sizeof(float));
        return;
    }
    const size_t rb = dpoc_dtype_row_bytes(m->wte_type, C);
    dpoc_err ignored; /* the type and sizes were checked when the model was built */
    (void)dpoc_gguf_dequantize_raw(m->wte_type, (const unsigned char *)m->wte_data + r * rb, rb, out, C, &ignored);
}

void dpoc_model_free(dpoc_model *m) {
    free(m->info);
    free(m->layers);
    free(m->params);
    free(m->frozen);
    free(m->deq);
    if (m->pool) dpoc_pool_free(m->pool);
    free(m->pool);
    for (size_t i = m->n_owned; i-- > 0;) m->release[i](m->owned[i]);
    free(m->owned);
    free(m->release);
    memset(m, 0, sizeof *m);
}

size_t dpoc_model_find(const dpoc_model *m, const char *name) {
    for (size_t i = 0; i < m->n_tensors; i++)
        if (strcmp(m->info[i].name, name) == 0) return i;
    return DPOC_NO_PARAM;
}

/* ---- activations ---- */

int dpoc_acts_alloc(dpoc_acts *a, const dpoc_model_config *cfg, size_t max_T, dpoc_err *err) {
    return dpoc_acts_alloc_mode(a, cfg, max_T, DPOC_ACTS_KEEP, err);
}

int dpoc_acts_alloc_mode(dpoc_acts *a, const dpoc_model_config *cfg, size_t max_T, dpoc_acts_mode mode,
                         dpoc_err *err) {
    memset(a, 0, sizeof *a);
    const size_t T = max_T, C = cfg->hidden_size, F = cfg->intermediate_size, L = cfg->n_layers;
    const size_t QD = cfg->n_heads * cfg->head_dim, KD = cfg->n_kv_heads * cfg->head_dim;
    const size_t chunk = cfg->vocab_size < LMHEAD_CHUNK ? cfg->vocab_size : LMHEAD_CHUNK;
    /* everything a layer keeps for backward except its input x_in (T,C) */
    const size_t inner = T * C * 3 + T * 2 + T * QD * 2 + T * KD * 2 + cfg->n_heads * T + T * F * 3;
    const int recompute = mode == DPOC_ACTS_RECOMPUTE;
    /* recompute: every layer keeps only x_in; one set of inner arrays is shared by
     * all layers, plus a (T,C) sink for the recomputed layer's output */
    const size_t layers_size = recompute ? T * C * L + inner + T * C : (T * C + inner) * L;
    const size_t lora_ws = 2 * T * cfg->lora_r_max;
    const size_t tail = T * C * 3 + T + T * cfg->head_dim /* cos+sin */ + T * chunk + T * 5 + lora_ws;
    a->max_T = max_T;
    a->recompute = recompute;
    a->block = dpoc_malloc((layers_size + tail) * sizeof(float), "activations", err);
    a->layers = dpoc_calloc(L, sizeof *a->layers, "activation table", err);
    a->labels = dpoc_malloc(T * sizeof(int32_t), "labels", err);
    a->tokens = dpoc_malloc(T * sizeof(int32_t), "token ids", err);
    a->is_top1 = dpoc_malloc(T, "top-1 flags", err);
    /* a pair has at least one row, so at most max_T pairs */
    a->pairs = dpoc_malloc(T * sizeof *a->pairs, "pair table", err);
    a->head_src = dpoc_malloc(T * sizeof *a->head_src, "head rows", err);
    if (!a->block || !a->layers || !a->labels || !a->tokens || !a->is_top1 || !a->pairs || !a->head_src) {
        dpoc_acts_free(a);
        return DPOC_ENOMEM;
    }
    float *p = a->block;
#define TAKE(dst, n) (dst = p, p += (n))
    for (size_t l = 0; l < L; l++) {
        dpoc_layer_acts *la = &a->layers[l];
        TAKE(la->x_in, T * C);
        if (recompute && l > 0) continue; /* takes layer 0's inner arrays below */
        TAKE(la->ln1, T * C);
        TAKE(la->rstd1, T);
        TAKE(la->q, T * QD);
        TAKE(la->k, T * KD);
        TAKE(la->v, T * KD);
        TAKE(la->att_lse, cfg->n_heads * T); /* attention's per-row logsumexp (nh, T), not probabilities */
        TAKE(la->atty, T * QD);
        TAKE(la->x_mid, T * C);
        TAKE(la->ln2, T * C);
        TAKE(la->rstd2, T);
        TAKE(la->gate, T * F);
        TAKE(la->up, T * F);
        TAKE(la->act, T * F);
    }
    if (recompute) {
        for (size_t l = 1; l < L; l++) {
            float *x_in = a->layers[l].x_in;
            a->layers[l] = a->layers[0];
            a->layers[l].x_in = x_in;
        }
        TAKE(a->recompute_out, T * C);
    }
    TAKE(a->x_out, T * C);
    TAKE(a->lnf, T * C);
    TAKE(a->rstdf, T);
    TAKE(a->cos_t, T * cfg->head_dim / 2);
    TAKE(a->sin_t, T * cfg->head_dim / 2);
    TAKE(a->logits_scratch, T * chunk);
    TAKE(a->head_in, T * C);
    TAKE(a->logp, T);
    TAKE(a->lse, T);
    TAKE(a->entropy, T);
    TAKE(a->mean_logit, T);
    TAKE(a->log_sum_sq_probs, T);
    TAKE(a->lora_ws, lora_ws);
#undef TAKE
    assert((size_t)(p - a->block) == layers_size + tail);
    return 0;
}

void dpoc_acts_free(dpoc_acts *a) {
    free(a->block);
    free(a->layers);
    free(a->labels);
    free(a->tokens);
    free(a->is_top1);
    free(a->pairs);
    free(a->head_src);
    memset(a, 0, sizeof *a);
}

int dpoc_grad_scratch_alloc(dpoc_grad_scratch *s, const dpoc_model_config *cfg, size_t max_T, dpoc_err *err) {
    memset(s, 0, sizeof *s);
    const size_t T = max_T, C = cfg->hidden_size, F = cfg->intermediate_size;
    const size_t QD = cfg->n_heads * cfg->head_dim, KD = cfg->n_kv_heads * cfg->head_dim;
    s->max_T = max_T;
    s->block = dpoc_malloc((T * C * 2 + T * QD * 2 + T * KD * 2 + T * F * 3) * sizeof(float), "gradient scratch",
                           err);
    if (!s->block) return DPOC_ENOMEM;
    float *p = s->block;
    s->dx = p, p += T * C;
    s->dln = p, p += T * C;
    s->dq = p, p += T * QD;
    s->datty = p, p += T * QD;
    s->dk = p, p += T * KD;
    s->dv = p, p += T * KD;
    s->dgate = p, p += T * F;
    s->dup = p, p += T * F;
    s->dact = p, p += T * F;
    s->dh = s->dln; /* the head writes its row gradients straight into dln */
    return 0;
}

void dpoc_grad_scratch_free(dpoc_grad_scratch *s) {
    free(s->block);
    memset(s, 0, sizeof *s);
}

/* ---- helpers ---- */

static void add_inplace(float *restrict y, const float *restrict x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* out (T,C) = the embedding rows of tokens, whatever the embedding's storage. */
static void embed_tokens(const dpoc_model *m, float *out, const int32_t *tokens, size_t T) {
    const size_t C = m->cfg.hidden_size;
    if (m->wte.v) {
        embedding_forward(out, tokens, m->wte.v, T, C);
        return;
    }
    for (size_t t = 0; t < T; t++) dpoc_model_embedding_row(m, (size_t)tokens[t], out + t * C);
}

/* The LM head's gradient (the embedding's when tied), or NULL when frozen. */
static float *lmhead_grad(const dpoc_model *m, float *G) {
    return G && m->lm_head.gw != DPOC_NO_PARAM ? G + m->lm_head.gw : NULL;
}

/* ---- the row layout: one causal sequence, or preference pairs with shared prompts ----
 *
 * Only RoPE and attention care which rows are which; every other op is
 * row-wise and runs on all T rows at once. In the pairs layout (a->n_pairs > 0)
 * pair p's rows start at pairs[p].row0 and are [prompt (Tp); chosen trunk
 * (Ta-1); rejected trunk (Tb-1)]; the pairs follow one another. */

typedef struct {
    size_t row0, n; /* the branch's rows [row0, row0 + n) */
} branch_rows;

/* The two completions' rows of pair p. */
static void pair_branches(const dpoc_pair_span *p, branch_rows br[2]) {
    br[0] = (branch_rows){p->row0 + p->Tp, p->Ta - 1};
    br[1] = (branch_rows){p->row0 + p->Tp + p->Ta - 1, p->Tb - 1};
}

/* RoPE (or its transpose) on x (T, nheads, hd): a prompt's rows take positions
 * 0..Tp-1 and a completion's rows continue them, from table row Tp. */
static void rope_rows(const dpoc_acts *a, float *x, size_t nheads, size_t hd, int backward) {
    void (*rope)(float *, const float *, const float *, size_t, size_t, size_t) =
        backward ? rope_backward : rope_forward;
    if (!a->n_pairs) {
        rope(x, a->cos_t, a->sin_t, a->T, nheads, hd);
        return;
    }
    const size_t half = hd / 2, stride = nheads * hd;
    for (size_t i = 0; i < a->n_pairs; i++) {
        const dpoc_pair_span *p = &a->pairs[i];
        rope(x + p->row0 * stride, a->cos_t, a->sin_t, p->Tp, nheads, hd);
        branch_rows br[2];
        pair_branches(p, br);
        for (int c = 0; c < 2; c++)
            if (br[c].n)
                rope(x + br[c].row0 * stride, a->cos_t + p->Tp * half, a->sin_t + p->Tp * half, br[c].n, nheads, hd);
    }
}

/* out (T, nh, hd), lse (nh * T, as (nh, rows) per part); q (T, nh, hd), k and v (T, nkv, hd).
 * Pairs layout: each prompt is causal attention over its Tp rows (lse (nh, Tp)
 * at lse + nh * row0), each completion the prefix form over its prompt's K/V and
 * its own (lse (nh, n) at lse + nh * its row0: the parts tile the (nh * T) array). */
static void attention_rows_forward(const dpoc_acts *a, float *out, float *lse, const float *q, const float *k,
                                   const float *v, size_t nh, size_t nkv, size_t hd) {
    if (!a->n_pairs) {
        attention_forward(out, lse, q, k, v, a->T, nh, nkv, hd);
        return;
    }
    const size_t QD = nh * hd, KD = nkv * hd;
    for (size_t i = 0; i < a->n_pairs; i++) {
        const dpoc_pair_span *p = &a->pairs[i];
        const size_t P = p->row0;
        attention_forward(out + P * QD, lse + nh * P, q + P * QD, k + P * KD, v + P * KD, p->Tp, nh, nkv, hd);
        branch_rows br[2];
        pair_branches(p, br);
        for (int c = 0; c < 2; c++) {
            const size_t r0 = br[c].row0, n = br[c].n;
            if (n)
                attention_prefix_forward(out + r0 * QD, lse + nh * r0, q + r0 * QD, k + P * KD, v + P * KD, p->Tp,
                                         k + r0 * KD, v + r0 * KD, n, nh, nkv, hd);
        }
    }
}

/* dq (T, nh, hd), dk and dv (T, nkv, hd) += ...: a prompt's dk/dv rows
 * accumulate from its own rows and from both completions. */
static void attention_rows_backward(const dpoc_acts *a, float *dq, float *dk, float *dv, const float *dout,
                                    const float *q, const float *k, const float *v, const float *out, const float *lse,
                                    size_t nh, size_t nkv, size_t hd) {
    if (!a->n_pairs) {
        attention_backward(dq, dk, dv, dout, q, k, v, out, lse, a->T, nh, nkv, hd);
        return;
    }
    const size_t QD = nh * hd, KD = nkv * hd;
    for (size_t i = 0; i < a->n_pairs; i++) {
        const dpoc_pair_span *p = &a->pairs[i];
        const size_t P = p->row0;
        attention_backward(dq + P * QD, dk + P * KD, dv + P * KD, dout + P * QD, q + P * QD, k + P * KD, v + P * KD,
                           out + P * QD, lse + nh * P, p->Tp, nh, nkv, hd);
        branch_rows br[2];
        pair_branches(p, br);
        for (int c = 0; c < 2; c++) {
            const size_t r0 = br[c].row0, n = br[c].n;
            if (n)
                attention_prefix_backward(dq + r0 * QD, dk + P * KD, dv + P * KD, dk + r0 * KD, dv + r0 * KD,
                                          dout + r0 * QD, q + r0 * QD, k + P * KD, v + P * KD, p->Tp, k + r0 * KD,
                                          v + r0 * KD, out + r0 * QD, lse + nh * r0, n, nh, nkv, hd);
        }
    }
}

/* ---- forward / backward ---- */

/* Adds the call's time to the activations' profile (dpoc bench) when one is attached. */
#define TIMED(prof, kind, call)                          \
    do {                                                 \
        const double t0_ = dpoc_prof_start(prof);        \
        call;                                            \
        dpoc_prof_add(prof, kind, t0_);                  \
    } while (0)

void decoder_see(dpoc_act_watch *w, size_t l, const char *module, float *x, size_t n) {
    if (!w) return; /* the usual case: a forward pays one test per output */
    char name[DPOC_PARAM_NAME_MAX];
    if (l == DECODER_NO_LAYER) snprintf(name, sizeof name, "%s", module);
    else if (!module[0]) snprintf(name, sizeof name, "model.layers.%zu", l); /* the layer's output */
    else snprintf(name, sizeof name, "model.layers.%zu.%s", l, module);
    dpoc_act_watch_see(w, name, x, n);
}

void decoder_qkv_forward(const dpoc_layer *L, float *q, float *k, float *v, const float *ln,
                         size_t T, dpoc_prof *prof, float *ws, dpoc_act_watch *w, size_t l) {
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->q, q, ln, T, ws));
    decoder_see(w, l, "self_attn.q_proj", q, T * L->q.out);
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->k, k, ln, T, ws));
    decoder_see(w, l, "self_attn.k_proj", k, T * L->k.out);
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->v, v, ln, T, ws));
    decoder_see(w, l, "self_attn.v_proj", v, T * L->v.out);
}

void decoder_mlp_forward(const dpoc_layer *L, float *out, float *gate, float *up, float *act,
                         const float *ln, size_t T, dpoc_prof *prof, float *ws, dpoc_act_watch *w, size_t l) {
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->gate, gate, ln, T, ws));
    decoder_see(w, l, "mlp.gate_proj", gate, T * L->gate.out);
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->up, up, ln, T, ws));
    decoder_see(w, l, "mlp.up_proj", up, T * L->up.out);
    TIMED(prof, DPOC_PROF_POINTWISE, swiglu_forward(act, gate, up, T * L->gate.out));
    decoder_see(w, l, "mlp.act_fn", act, T * L->gate.out);
    TIMED(prof, DPOC_PROF_GEMM, linear_forward(&L->down, out, act, T, ws));
    decoder_see(w, l, "mlp.down_proj", out, T * L->down.out);
}

/* Layer l from a->layers[l].x_in to x_next (T,C), keeping what its backward
 * needs in a->layers[l] (over a's layout and rope tables). */
static void layer_forward(const dpoc_model *m, dpoc_acts *a, size_t l, float *x_next) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size;
    const size_t nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    const size_t T = a->T;
    const dpoc_layer *o = &m->layers[l];
    dpoc_layer_acts *la = &a->layers[l];
    // attention block: x_mid = x_in + o_proj(attn(rope(q), rope(k), v))
    dpoc_act_watch *w = a->watch;
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_forward(la->ln1, la->rstd1, la->x_in, o->attn_norm.v, T, C, cfg->rms_norm_eps));
    decoder_see(w, l, "input_layernorm", la->ln1, T * C);
    decoder_qkv_forward(o, la->q, la->k, la->v, la->ln1, T, a->prof, a->lora_ws, w, l);
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_rows(a, la->q, nh, hd, 0));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_rows(a, la->k, nkv, hd, 0));
    TIMED(a->prof, DPOC_PROF_ATTENTION, attention_rows_forward(a, la->atty, la->att_lse, la->q, la->k, la->v, nh, nkv, hd));
    decoder_see(w, l, "self_attn", la->atty, T * nh * hd);
    TIMED(a->prof, DPOC_PROF_GEMM, linear_forward(&o->o, la->x_mid, la->atty, T, a->lora_ws));
    decoder_see(w, l, "self_attn.o_proj", la->x_mid, T * C);
    TIMED(a->prof, DPOC_PROF_POINTWISE, add_inplace(la->x_mid, la->x_in, T * C));
    // MLP block: x_next = x_mid + down(silu(gate(ln2)) * up(ln2))
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_forward(la->ln2, la->rstd2, la->x_mid, o->mlp_norm.v, T, C, cfg->rms_norm_eps));
    decoder_see(w, l, "post_attention_layernorm", la->ln2, T * C);
    decoder_mlp_forward(o, x_next, la->gate, la->up, la->act, la->ln2, T, a->prof, a->lora_ws, w, l);
    TIMED(a->prof, DPOC_PROF_POINTWISE, add_inplace(x_next, la->x_mid, T * C));
    decoder_see(w, l, "", x_next, T * C);
}

/* From the embedded rows in layers[0].x_in (T,C) to the final norm's lnf (T,C),
 * over a's layout (a->T, a->pairs.. and the rope tables set by the caller). */
static void forward_trunk(const dpoc_model *m, dpoc_acts *a) {
    const dpoc_model_config *cfg = &m->cfg;
    for (size_t l = 0; l < cfg->n_layers; l++)
        layer_forward(m, a, l, l + 1 < cfg->n_layers ? a->layers[l + 1].x_in : a->x_out);
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_forward(a->lnf, a->rstdf, a->x_out, m->final_norm.v, a->T,
                                                        cfg->hidden_size, cfg->rms_norm_eps));
    decoder_see(a->watch, DECODER_NO_LAYER, "model.norm", a->lnf, a->T * cfg->hidden_size);
}

void dpoc_model_forward(const dpoc_model *m, dpoc_acts *a, const int32_t *tokens, size_t T, size_t row0,
                        size_t R) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size;
    a->T = T;
    a->row0 = row0;
    a->R = R;
    a->n_pairs = 0;
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_tables(a->cos_t, a->sin_t, T, cfg->head_dim, cfg->rope_theta));
    TIMED(a->prof, DPOC_PROF_POINTWISE, embed_tokens(m, a->layers[0].x_in, tokens, T));
    decoder_see(a->watch, DECODER_NO_LAYER, "model.embed_tokens", a->layers[0].x_in, T * C);
    forward_trunk(m, a);
    for (size_t r = 0; r < R; r++) a->labels[r] = tokens[row0 + r + 1];
    lmhead_out out = {a->logp, a->lse, a->entropy, a->mean_logit, a->log_sum_sq_probs, a->is_top1};
    TIMED(a->prof, DPOC_PROF_LMHEAD, lmhead_forward_linear(&out, a->lnf + row0 * C, &m->lm_head, a->labels, R, a->logits_scratch));
    decoder_see(a->watch, DECODER_NO_LAYER, "lm_head", a->logp, R);
}

void dpoc_model_forward_pairs(const dpoc_model *m, dpoc_acts *a, const dpoc_pair_tokens *pairs, size_t n) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size;
    assert(n >= 1 && n <= a->max_T);
    size_t T = 0, R = 0, max_pos = 0;
    for (size_t i = 0; i < n; i++) {
        const dpoc_pair_tokens *pt = &pairs[i];
        assert(pt->Tp >= 1 && pt->Ta >= 1 && pt->Tb >= 1);
        const size_t na = pt->Ta - 1, nb = pt->Tb - 1; /* rows of each completion (its last token is only a label) */
        assert(T + pt->Tp + na + nb <= a->max_T && R + pt->Ta + pt->Tb <= a->max_T);
        dpoc_pair_span *p = &a->pairs[i];
        *p = (dpoc_pair_span){T, pt->Tp, pt->Ta, pt->Tb, R};
        memcpy(a->tokens + T, pt->prompt, pt->Tp * sizeof *pt->prompt);
        memcpy(a->tokens + T + pt->Tp, pt->chosen, na * sizeof *pt->chosen);
        memcpy(a->tokens + T + pt->Tp + na, pt->rejected, nb * sizeof *pt->rejected);
        memcpy(a->labels + R, pt->chosen, pt->Ta * sizeof *pt->chosen);
        memcpy(a->labels + R + pt->Ta, pt->rejected, pt->Tb * sizeof *pt->rejected);
        /* head rows: a completion's first label is predicted from the last
         * prompt row, its later ones from its own rows */
        const size_t last_prompt = T + pt->Tp - 1;
        for (size_t r = 0; r < pt->Ta; r++) a->head_src[R + r] = last_prompt + r;
        a->head_src[R + pt->Ta] = last_prompt;
        for (size_t r = 1; r < pt->Tb; r++) a->head_src[R + pt->Ta + r] = last_prompt + na + r;
        const size_t pos = pt->Tp + (na > nb ? na : nb);
        if (pos > max_pos) max_pos = pos;
        T += pt->Tp + na + nb;
        R += pt->Ta + pt->Tb;
    }
    a->T = T;
    a->row0 = 0;
    a->R = R;
    a->n_pairs = n;
    /* positions 0 .. Tp + max(na, nb) - 1 of the longest pair: prompts', then completions' from Tp */
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_tables(a->cos_t, a->sin_t, max_pos, cfg->head_dim, cfg->rope_theta));
    TIMED(a->prof, DPOC_PROF_POINTWISE, embed_tokens(m, a->layers[0].x_in, a->tokens, T));
    decoder_see(a->watch, DECODER_NO_LAYER, "model.embed_tokens", a->layers[0].x_in, T * C);
    forward_trunk(m, a);
    /* every pair's completions in one head call: one pass over the (V,C) head weight */
    for (size_t r = 0; r < R; r++) memcpy(a->head_in + r * C, a->lnf + a->head_src[r] * C, C * sizeof(float));
    lmhead_out out = {a->logp, a->lse, a->entropy, a->mean_logit, a->log_sum_sq_probs, a->is_top1};
    TIMED(a->prof, DPOC_PROF_LMHEAD, lmhead_forward_linear(&out, a->head_in, &m->lm_head, a->labels, R, a->logits_scratch));
    decoder_see(a->watch, DECODER_NO_LAYER, "lm_head", a->logp, R);
}

void dpoc_model_forward_shared(const dpoc_model *m, dpoc_acts *a, const int32_t *prompt, size_t Tp,
                               const int32_t *chosen, size_t Ta, const int32_t *rejected, size_t Tb) {
    const dpoc_pair_tokens p = {prompt, Tp, chosen, Ta, rejected, Tb};
    dpoc_model_forward_pairs(m, a, &p, 1);
}

/* ---- backward, in pieces: the head, the final norm, each layer, the embedding ----
 *
 * dx (T,C) carries dLoss/d(residual stream) of one sequence from piece to
 * piece; the other scratch arrays of s are temporaries of one piece, so
 * several sequences can go through the layers together, each with its own dx
 * (dpoc_model_backward_seqs). */

/* dx = dLoss/d(last layer's output) from s->dln = dLoss/dlnf (T,C). */
static void final_norm_backward(const dpoc_model *m, float *G, dpoc_acts *a, dpoc_grad_scratch *s, float *dx) {
    const size_t T = a->T, C = m->cfg.hidden_size;
    memset(dx, 0, T * C * sizeof(float));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_backward(dx, dpoc_param_grad(&m->final_norm, G), s->dln, a->x_out, m->final_norm.v, a->rstdf, T, C));
}

/* Layer li: dx = dLoss/d(its output) in, dLoss/d(its input) out. */
static void layer_backward(const dpoc_model *m, float *G, dpoc_acts *a, dpoc_grad_scratch *s, size_t li, float *dx) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size, F = cfg->intermediate_size;
    const size_t nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    const size_t QD = nh * hd, KD = nkv * hd;
    const size_t T = a->T;
    const dpoc_layer *o = &m->layers[li];
    dpoc_layer_acts *la = &a->layers[li];
    /* gradient checkpointing: rebuild this layer's inner activations from its
     * kept input (same kernels, same inputs: the same bits as the first time) */
    if (a->recompute) layer_forward(m, a, li, a->recompute_out);
    // dx holds dLoss/d(layer output). MLP branch first; the residual passes dx through.
    memset(s->dact, 0, T * F * sizeof(float));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->down, G, s->dact, dx, la->act, T, a->lora_ws));
    memset(s->dgate, 0, T * F * sizeof(float));
    memset(s->dup, 0, T * F * sizeof(float));
    TIMED(a->prof, DPOC_PROF_POINTWISE, swiglu_backward(s->dgate, s->dup, s->dact, la->gate, la->up, T * F));
    memset(s->dln, 0, T * C * sizeof(float));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->gate, G, s->dln, s->dgate, la->ln2, T, a->lora_ws));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->up, G, s->dln, s->dup, la->ln2, T, a->lora_ws));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_backward(dx, dpoc_param_grad(&o->mlp_norm, G), s->dln, la->x_mid, o->mlp_norm.v, la->rstd2, T, C));
    // dx now holds dLoss/d(x_mid); attention branch.
    memset(s->datty, 0, T * QD * sizeof(float));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->o, G, s->datty, dx, la->atty, T, a->lora_ws));
    memset(s->dq, 0, T * QD * sizeof(float));
    memset(s->dk, 0, T * KD * sizeof(float));
    memset(s->dv, 0, T * KD * sizeof(float));
    TIMED(a->prof, DPOC_PROF_ATTENTION, attention_rows_backward(a, s->dq, s->dk, s->dv, s->datty, la->q, la->k, la->v, la->atty, la->att_lse, nh, nkv,
                            hd));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_rows(a, s->dq, nh, hd, 1));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rope_rows(a, s->dk, nkv, hd, 1));
    memset(s->dln, 0, T * C * sizeof(float));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->q, G, s->dln, s->dq, la->ln1, T, a->lora_ws));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->k, G, s->dln, s->dk, la->ln1, T, a->lora_ws));
    TIMED(a->prof, DPOC_PROF_GEMM, linear_backward(&o->v, G, s->dln, s->dv, la->ln1, T, a->lora_ws));
    TIMED(a->prof, DPOC_PROF_POINTWISE, rmsnorm_backward(dx, dpoc_param_grad(&o->attn_norm, G), s->dln, la->x_in, o->attn_norm.v, la->rstd1, T, C));
}

static void embed_backward(const dpoc_model *m, float *G, dpoc_acts *a, const int32_t *tokens, const float *dx) {
    TIMED(a->prof, DPOC_PROF_POINTWISE, embedding_backward(dpoc_param_grad(&m->wte, G), dx, tokens, a->T, m->cfg.hidden_size));
}

/* From s->dln = dLoss/dlnf (T,C) back to the embedding: the final norm, the
 * layers in reverse, and the embedding rows of tokens (T), with the hook's
 * calls. Overwrites s->dx and the other scratch arrays. */
static void backward_trunk(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                           const int32_t *tokens, const dpoc_backward_hook *hook) {
    final_norm_backward(m, grads, a, s, s->dx);
    /* the final norm and an untied head sit at the end of the block; a tied head is the embedding */
    if (hook) hook->ready(hook->ctx, m->tail_grad_from);
    for (size_t li = m->cfg.n_layers; li-- > 0;) {
        layer_backward(m, grads, a, s, li, s->dx);
        /* layers are laid out in order: this one's gradients are final, and all after it */
        if (hook) hook->ready(hook->ctx, m->layers[li].grad_from);
    }
    embed_backward(m, grads, a, tokens, s->dx);
    if (hook) hook->ready(hook->ctx, 0);
}

/* s->dln = dLoss/dlnf of the sequence in a, from its head rows' dLoss/dlogp. */
static void head_backward(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s, const float *dlogp) {
    const size_t C = m->cfg.hidden_size;
    memset(s->dln, 0, a->T * C * sizeof(float));
    TIMED(a->prof, DPOC_PROF_LMHEAD, lmhead_backward_linear(s->dln + a->row0 * C, lmhead_grad(m, grads), dlogp, a->lnf + a->row0 * C,
                    &m->lm_head, a->labels, a->lse, a->R, a->logits_scratch));
}

void dpoc_model_backward_seqs(const dpoc_model *m, float *grads, dpoc_acts *const *a, const int32_t *const *tokens,
                              const float *const *dlogp, float *const *dx, size_t n, dpoc_grad_scratch *s,
                              const dpoc_backward_hook *hook) {
    for (size_t i = 0; i < n; i++) {
        assert(a[i]->n_pairs == 0);
        head_backward(m, grads, a[i], s, dlogp[i]);
        final_norm_backward(m, grads, a[i], s, dx[i]);
    }
    if (hook) hook->ready(hook->ctx, m->tail_grad_from);
    for (size_t li = m->cfg.n_layers; li-- > 0;) {
        for (size_t i = 0; i < n; i++) layer_backward(m, grads, a[i], s, li, dx[i]);
        if (hook) hook->ready(hook->ctx, m->layers[li].grad_from);
    }
    for (size_t i = 0; i < n; i++) embed_backward(m, grads, a[i], tokens[i], dx[i]);
    if (hook) hook->ready(hook->ctx, 0);
}

void dpoc_model_backward(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                         const int32_t *tokens, const float *dlogp, const dpoc_backward_hook *hook) {
    assert(a->n_pairs == 0); /* a pairs forward needs dpoc_model_backward_pairs */
    head_backward(m, grads, a, s, dlogp);
    backward_trunk(m, grads, a, s, tokens, hook);
}

void dpoc_model_backward_pairs(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                               const float *dlogp, const dpoc_backward_hook *hook) {
    const size_t C = m->cfg.hidden_size;
    const size_t T = a->T, R = a->R;
    assert(a->n_pairs > 0 && T <= s->max_T && R <= s->max_T);
    /* dh (R,C) of the gathered head rows goes to dx, free until the final norm's
     * backward; then it is scattered onto the rows of lnf it came from, where a
     * pair's last prompt row receives the first head row of both completions */
    float *dh = s->dx;
    memset(dh, 0, R * C * sizeof(float));
    TIMED(a->prof, DPOC_PROF_LMHEAD, lmhead_backward_linear(dh, lmhead_grad(m, grads), dlogp, a->head_in, &m->lm_head, a->labels, a->lse, R,
                    a->logits_scratch));
    memset(s->dln, 0, T * C * sizeof(float));
    for (size_t r = 0; r < R; r++) add_inplace(s->dln + a->head_src[r] * C, dh + r * C, C);
    backward_trunk(m, grads, a, s, a->tokens, hook);
}

void dpoc_model_backward_shared(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                                const float *dlogp, const dpoc_backward_hook *hook) {
    dpoc_model_backward_pairs(m, grads, a, s, dlogp, hook);
}
