/* FLOP counts (dpoc/flops.h). */
#include "dpoc/flops.h"

double dpoc_flops_forward(const dpoc_model_config *c, size_t rows, size_t attn_pairs, size_t head_rows) {
    const double C = (double)c->hidden_size, F = (double)c->intermediate_size, V = (double)c->vocab_size;
    const double QD = (double)(c->n_heads * c->head_dim), KD = (double)(c->n_kv_heads * c->head_dim);
    /* per row and layer: q, k, v, o projections and the three MLP products */
    const double linear = 2.0 * (C * QD + 2.0 * C * KD + QD * C + 3.0 * C * F);
    /* per (query, key) pair and layer: one score and one weighted value, every head */
    const double attn = 4.0 * (double)c->head_dim * (double)c->n_heads;
    return (double)c->n_layers * ((double)rows * linear + (double)attn_pairs * attn) + 2.0 * C * V * (double)head_rows;
}

size_t dpoc_flops_causal_pairs(size_t T) { return T * (T + 1) / 2; }

dpoc_fwd_flops dpoc_flops_forward_parts(const dpoc_model *m, size_t rows, size_t attn_pairs, size_t head_rows) {
    const dpoc_model_config *c = &m->cfg;
    dpoc_fwd_flops f;
    f.total = dpoc_flops_forward(c, rows, attn_pairs, head_rows);
    f.attn = f.total - dpoc_flops_forward(c, rows, 0, head_rows);
    f.adapter = 0.0;
    for (size_t l = 0; l < c->n_layers; l++) {
        const dpoc_layer *L = &m->layers[l];
        const dpoc_linear *p[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        /* x A^T and (x A^T) B^T */
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
            f.adapter += 2.0 * (double)rows * (double)p[i]->lora.r * (double)(p[i]->in + p[i]->out);
    }
    return f;
}

double dpoc_flops_train(const dpoc_fwd_flops *f, int frozen_base) {
    if (!frozen_base) return DPOC_FLOPS_TRAIN_FACTOR * (f->total + f->adapter);
    return DPOC_FLOPS_FROZEN_TRAIN_FACTOR * (f->total - f->attn) + DPOC_FLOPS_TRAIN_FACTOR * (f->attn + f->adapter);
}
