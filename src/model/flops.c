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
