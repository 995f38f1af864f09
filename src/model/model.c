/* Llama / Qwen2 decoder: parameter table, loading, forward and backward of one
 * sequence. Each sequence runs at its own length (no padding); only the rows
 * whose next token is a label go through the LM head. */
#include "dpoc/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "dpoc/safetensors.h"

/* ---- parameter table ---- */

static size_t add_param(dpoc_model *m, size_t *cap, const char *name, size_t d0, size_t d1, dpoc_err *err) {
    (void)cap;
    dpoc_param_info *p = &m->info[m->n_tensors++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = d1 ? 2 : 1;
    p->shape[0] = d0;
    p->shape[1] = d1;
    p->numel = d1 ? d0 * d1 : d0;
    p->offset = m->numel;
    m->numel += p->numel;
    (void)err;
    return p->offset;
}

int dpoc_model_init(dpoc_model *m, const dpoc_model_config *cfg, dpoc_err *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    const size_t C = cfg->hidden_size, V = cfg->vocab_size, F = cfg->intermediate_size;
    const size_t QD = cfg->n_heads * cfg->head_dim, KD = cfg->n_kv_heads * cfg->head_dim;
    const size_t per_layer = 12, max_tensors = 3 + per_layer * cfg->n_layers;
    m->info = dpoc_calloc(max_tensors, sizeof *m->info, "parameter table", err);
    m->layers = dpoc_calloc(cfg->n_layers, sizeof *m->layers, "layer table", err);
    if (!m->info || !m->layers) {
        dpoc_model_free(m);
        return DPOC_ENOMEM;
    }
    size_t cap = max_tensors;
    char name[DPOC_PARAM_NAME_MAX];
    m->off_wte = add_param(m, &cap, "model.embed_tokens.weight", V, C, err);
    for (size_t l = 0; l < cfg->n_layers; l++) {
        dpoc_layer_offsets *L = &m->layers[l];
#define P(field, suffix, d0, d1)                                              \
    snprintf(name, sizeof name, "model.layers.%zu.%s", l, suffix);           \
    L->field = add_param(m, &cap, name, d0, d1, err);
        P(attn_norm, "input_layernorm.weight", C, 0);
        P(wq, "self_attn.q_proj.weight", QD, C);
        L->bq = L->bk = L->bv = DPOC_NO_PARAM;
        if (cfg->qkv_bias) { P(bq, "self_attn.q_proj.bias", QD, 0); }
        P(wk, "self_attn.k_proj.weight", KD, C);
        if (cfg->qkv_bias) { P(bk, "self_attn.k_proj.bias", KD, 0); }
        P(wv, "self_attn.v_proj.weight", KD, C);
        if (cfg->qkv_bias) { P(bv, "self_attn.v_proj.bias", KD, 0); }
        P(wo, "self_attn.o_proj.weight", C, QD);
        P(mlp_norm, "post_attention_layernorm.weight", C, 0);
        P(wgate, "mlp.gate_proj.weight", F, C);
        P(wup, "mlp.up_proj.weight", F, C);
        P(wdown, "mlp.down_proj.weight", C, F);
#undef P
    }
    m->off_final_norm = add_param(m, &cap, "model.norm.weight", C, 0, err);
    m->off_lm_head = cfg->tie_word_embeddings ? m->off_wte : add_param(m, &cap, "lm_head.weight", V, C, err);
    m->params = dpoc_calloc(m->numel, sizeof(float), "model parameters", err);
    if (!m->params) {
        dpoc_model_free(m);
        return DPOC_ENOMEM;
    }
    return 0;
}

void dpoc_model_free(dpoc_model *m) {
    free(m->info);
    free(m->layers);
    free(m->params);
    memset(m, 0, sizeof *m);
}

size_t dpoc_model_find(const dpoc_model *m, const char *name) {
    for (size_t i = 0; i < m->n_tensors; i++)
        if (strcmp(m->info[i].name, name) == 0) return i;
    return DPOC_NO_PARAM;
}

int dpoc_model_load(dpoc_model *m, const char *dir, dpoc_err *err) {
    char path[4096];
    dpoc_model_config cfg;
    DPOC_TRY(dpoc_path_join(path, sizeof path, dir, "config.json", err));
    DPOC_TRY(dpoc_hf_config_read(&cfg, path, err));
    DPOC_TRY(dpoc_model_init(m, &cfg, err));
    st_model st;
    memset(&st, 0, sizeof st);
    int rc = st_open_dir(&st, dir, err);
    if (rc) goto fail;
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        const st_tensor *t = st_find(&st, p->name);
        if (!t) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' is missing from the safetensors files", dir, p->name);
            goto fail;
        }
        rc = st_read_f32(t, m->params + p->offset, p->ndim, p->shape, err);
        if (rc) {
            dpoc_err_prefix(err, "%s", dir);
            goto fail;
        }
    }
    /* A tensor we would not use means a model we do not understand. A tied model's
     * file may still carry lm_head.weight; it must then equal the embedding. */
    for (size_t i = 0; i < st.n_tensors; i++) {
        const char *name = st.tensors[i].name;
        if (dpoc_model_find(m, name) != DPOC_NO_PARAM) continue;
        if (strstr(name, "rotary_emb.inv_freq")) continue; /* old checkpoints store the RoPE buffer */
        if (cfg.tie_word_embeddings && strcmp(name, "lm_head.weight") == 0) continue;
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: unexpected tensor '%s' for %s", dir, name,
                       cfg.arch == DPOC_ARCH_LLAMA ? "LlamaForCausalLM" : "Qwen2ForCausalLM");
        goto fail;
    }
    st_close(&st);
    return 0;
fail:
    st_close(&st);
    dpoc_model_free(m);
    return rc;
}

/* ---- activations ---- */

int dpoc_acts_alloc(dpoc_acts *a, const dpoc_model_config *cfg, size_t max_T, dpoc_err *err) {
    memset(a, 0, sizeof *a);
    const size_t T = max_T, C = cfg->hidden_size, F = cfg->intermediate_size, L = cfg->n_layers;
    const size_t QD = cfg->n_heads * cfg->head_dim, KD = cfg->n_kv_heads * cfg->head_dim;
    const size_t chunk = cfg->vocab_size < LMHEAD_CHUNK ? cfg->vocab_size : LMHEAD_CHUNK;
    const size_t per_layer = T * C * 4 + T * 2 + T * QD * 2 + T * KD * 2 + cfg->n_heads * T + T * F * 3;
    const size_t tail = T * C * 2 + T + T * cfg->head_dim /* cos+sin */ + T * chunk + T * 5;
    a->max_T = max_T;
    a->block = dpoc_malloc((per_layer * L + tail) * sizeof(float), "activations", err);
    a->layers = dpoc_calloc(L, sizeof *a->layers, "activation table", err);
    a->labels = dpoc_malloc(T * sizeof(int32_t), "labels", err);
    a->is_top1 = dpoc_malloc(T, "top-1 flags", err);
    if (!a->block || !a->layers || !a->labels || !a->is_top1) {
        dpoc_acts_free(a);
        return DPOC_ENOMEM;
    }
    float *p = a->block;
#define TAKE(dst, n) (dst = p, p += (n))
    for (size_t l = 0; l < L; l++) {
        dpoc_layer_acts *la = &a->layers[l];
        TAKE(la->x_in, T * C);
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
    TAKE(a->x_out, T * C);
    TAKE(a->lnf, T * C);
    TAKE(a->rstdf, T);
    TAKE(a->cos_t, T * cfg->head_dim / 2);
    TAKE(a->sin_t, T * cfg->head_dim / 2);
    TAKE(a->logits_scratch, T * chunk);
    TAKE(a->logp, T);
    TAKE(a->lse, T);
    TAKE(a->entropy, T);
    TAKE(a->mean_logit, T);
    TAKE(a->log_sum_sq_probs, T);
#undef TAKE
    return 0;
}

void dpoc_acts_free(dpoc_acts *a) {
    free(a->block);
    free(a->layers);
    free(a->labels);
    free(a->is_top1);
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

/* ---- forward / backward ---- */

#define PTR(base, off) ((off) == DPOC_NO_PARAM ? NULL : (base) + (off))

static void add_inplace(float *restrict y, const float *restrict x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

void dpoc_model_forward(const dpoc_model *m, dpoc_acts *a, const int32_t *tokens, size_t T, size_t row0,
                        size_t R) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size, F = cfg->intermediate_size, V = cfg->vocab_size;
    const size_t nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    const size_t QD = nh * hd, KD = nkv * hd;
    const float *W = m->params;
    a->T = T;
    a->row0 = row0;
    a->R = R;
    rope_tables(a->cos_t, a->sin_t, T, hd, cfg->rope_theta);
    embedding_forward(a->layers[0].x_in, tokens, W + m->off_wte, T, C);
    for (size_t l = 0; l < cfg->n_layers; l++) {
        const dpoc_layer_offsets *o = &m->layers[l];
        dpoc_layer_acts *la = &a->layers[l];
        float *x_next = l + 1 < cfg->n_layers ? a->layers[l + 1].x_in : a->x_out;
        // attention block: x_mid = x_in + o_proj(attn(rope(q), rope(k), v))
        rmsnorm_forward(la->ln1, la->rstd1, la->x_in, W + o->attn_norm, T, C, cfg->rms_norm_eps);
        matmul_forward(la->q, la->ln1, W + o->wq, PTR(W, o->bq), T, C, QD);
        matmul_forward(la->k, la->ln1, W + o->wk, PTR(W, o->bk), T, C, KD);
        matmul_forward(la->v, la->ln1, W + o->wv, PTR(W, o->bv), T, C, KD);
        rope_forward(la->q, a->cos_t, a->sin_t, T, nh, hd);
        rope_forward(la->k, a->cos_t, a->sin_t, T, nkv, hd);
        attention_forward(la->atty, la->att_lse, la->q, la->k, la->v, T, nh, nkv, hd);
        matmul_forward(la->x_mid, la->atty, W + o->wo, NULL, T, QD, C);
        add_inplace(la->x_mid, la->x_in, T * C);
        // MLP block: x_next = x_mid + down(silu(gate(ln2)) * up(ln2))
        rmsnorm_forward(la->ln2, la->rstd2, la->x_mid, W + o->mlp_norm, T, C, cfg->rms_norm_eps);
        matmul_forward(la->gate, la->ln2, W + o->wgate, NULL, T, C, F);
        matmul_forward(la->up, la->ln2, W + o->wup, NULL, T, C, F);
        swiglu_forward(la->act, la->gate, la->up, T * F);
        matmul_forward(x_next, la->act, W + o->wdown, NULL, T, F, C);
        add_inplace(x_next, la->x_mid, T * C);
    }
    rmsnorm_forward(a->lnf, a->rstdf, a->x_out, W + m->off_final_norm, T, C, cfg->rms_norm_eps);
    for (size_t r = 0; r < R; r++) a->labels[r] = tokens[row0 + r + 1];
    lmhead_out out = {a->logp, a->lse, a->entropy, a->mean_logit, a->log_sum_sq_probs, a->is_top1};
    lmhead_forward(&out, a->lnf + row0 * C, W + m->off_lm_head, a->labels, R, C, V, a->logits_scratch);
}

void dpoc_model_backward(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                         const int32_t *tokens, const float *dlogp, const dpoc_backward_hook *hook) {
    const dpoc_model_config *cfg = &m->cfg;
    const size_t C = cfg->hidden_size, F = cfg->intermediate_size, V = cfg->vocab_size;
    const size_t nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    const size_t QD = nh * hd, KD = nkv * hd;
    const size_t T = a->T;
    const float *W = m->params;
    float *G = grads;

    memset(s->dln, 0, T * C * sizeof(float));
    lmhead_backward(s->dln + a->row0 * C, G + m->off_lm_head, dlogp, a->lnf + a->row0 * C, W + m->off_lm_head,
                    a->labels, a->lse, a->R, C, V, a->logits_scratch);
    memset(s->dx, 0, T * C * sizeof(float));
    rmsnorm_backward(s->dx, G + m->off_final_norm, s->dln, a->x_out, W + m->off_final_norm, a->rstdf, T, C);
    /* the final norm and an untied head sit at the end of the block; a tied head is the embedding */
    if (hook) hook->ready(hook->ctx, m->off_final_norm);
    for (size_t li = cfg->n_layers; li-- > 0;) {
        const dpoc_layer_offsets *o = &m->layers[li];
        dpoc_layer_acts *la = &a->layers[li];
        // dx holds dLoss/d(layer output). MLP branch first; the residual passes dx through.
        memset(s->dact, 0, T * F * sizeof(float));
        matmul_backward(s->dact, G + o->wdown, NULL, s->dx, la->act, W + o->wdown, T, F, C);
        memset(s->dgate, 0, T * F * sizeof(float));
        memset(s->dup, 0, T * F * sizeof(float));
        swiglu_backward(s->dgate, s->dup, s->dact, la->gate, la->up, T * F);
        memset(s->dln, 0, T * C * sizeof(float));
        matmul_backward(s->dln, G + o->wgate, NULL, s->dgate, la->ln2, W + o->wgate, T, C, F);
        matmul_backward(s->dln, G + o->wup, NULL, s->dup, la->ln2, W + o->wup, T, C, F);
        rmsnorm_backward(s->dx, G + o->mlp_norm, s->dln, la->x_mid, W + o->mlp_norm, la->rstd2, T, C);
        // dx now holds dLoss/d(x_mid); attention branch.
        memset(s->datty, 0, T * QD * sizeof(float));
        matmul_backward(s->datty, G + o->wo, NULL, s->dx, la->atty, W + o->wo, T, QD, C);
        memset(s->dq, 0, T * QD * sizeof(float));
        memset(s->dk, 0, T * KD * sizeof(float));
        memset(s->dv, 0, T * KD * sizeof(float));
        attention_backward(s->dq, s->dk, s->dv, s->datty, la->q, la->k, la->v, la->atty, la->att_lse, T, nh, nkv,
                           hd);
        rope_backward(s->dq, a->cos_t, a->sin_t, T, nh, hd);
        rope_backward(s->dk, a->cos_t, a->sin_t, T, nkv, hd);
        memset(s->dln, 0, T * C * sizeof(float));
        matmul_backward(s->dln, G + o->wq, PTR(G, o->bq), s->dq, la->ln1, W + o->wq, T, C, QD);
        matmul_backward(s->dln, G + o->wk, PTR(G, o->bk), s->dk, la->ln1, W + o->wk, T, C, KD);
        matmul_backward(s->dln, G + o->wv, PTR(G, o->bv), s->dv, la->ln1, W + o->wv, T, C, KD);
        rmsnorm_backward(s->dx, G + o->attn_norm, s->dln, la->x_in, W + o->attn_norm, la->rstd1, T, C);
        /* layers are laid out in order, each starting with its input norm */
        if (hook) hook->ready(hook->ctx, o->attn_norm);
    }
    embedding_backward(G + m->off_wte, s->dx, tokens, T, C);
    if (hook) hook->ready(hook->ctx, 0);
}
