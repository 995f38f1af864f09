/* Decoder-only Llama-family model (LlamaForCausalLM, Qwen2ForCausalLM) in fp32.
 *
 * All parameters live in ONE flat float block described by a size table
 * (name, shape, offset), in the order of dpoc_model_param_names; gradients use a
 * second block of the same layout, so one buffer is allreduced and one is
 * checkpointed. The layers read their parameters through views made at init
 * (dpoc/layers.h: dpoc_param_ref, and dpoc_linear for each projection, computed by
 * linear_forward / linear_backward whatever its storage), each with its values
 * and the offset of its gradient in the gradient block. */
#ifndef DPOC_MODEL_H
#define DPOC_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/dtype.h"
#include "dpoc/err.h"
#include "dpoc/layers.h"
#include "dpoc/prof.h"

typedef enum { DPOC_ARCH_LLAMA, DPOC_ARCH_QWEN2 } dpoc_arch;

typedef struct {
    dpoc_arch arch;
    size_t vocab_size;
    size_t hidden_size;        /* C */
    size_t intermediate_size;  /* F */
    size_t n_layers;
    size_t n_heads;
    size_t n_kv_heads;
    size_t head_dim;
    size_t max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    int tie_word_embeddings;
    int qkv_bias;     /* Qwen2: bias on q/k/v projections */
    int bos_token_id; /* -1 when absent */
    int eos_token_id;
    int pad_token_id;
    /* Not the architecture: the largest LoRA rank attached (dpoc_lora_attach; 0:
     * none), so activations reserve the adapters' workspace. */
    size_t lora_r_max;
} dpoc_model_config;

#define DPOC_PARAM_NAME_MAX 96

/* One row of the size table. Every tensor the model has is listed, with how it
 * is stored; the trainable ones (today: all, fp32) sit in the flat block at
 * offset, one after another in this order. */
typedef struct {
    char name[DPOC_PARAM_NAME_MAX]; /* Hugging Face tensor name */
    size_t ndim;
    size_t shape[2];
    size_t offset; /* in floats, into the flat block */
    size_t numel;
    dpoc_dtype dtype; /* storage type: DPOC_DT_F32 in a block, or what a kept tensor is stored as */
    int trainable;    /* 1: in the flat block, with a gradient and optimizer state */
    /* A frozen tensor kept in its source's storage (dpoc_model_init_kept): its bytes,
     * offset DPOC_NO_PARAM; NULL for a tensor in a block. */
    const void *data;
} dpoc_param_info;

/* One decoder layer: its two RMSNorm weights and its seven projections, as views
 * into the model's blocks. grad_from: where the layer's gradients start in the
 * gradient block (its trainable tensors lie together, in table order). */
typedef struct {
    dpoc_param_ref attn_norm, mlp_norm;
    dpoc_linear q, k, v, o, gate, up, down;
    size_t grad_from;
} dpoc_layer;

typedef struct {
    dpoc_model_config cfg;
    size_t n_tensors;
    dpoc_param_info *info;
    size_t numel;   /* trainable parameters */
    float *params;  /* the flat block of the trainable parameters */
    /* With LoRA (dpoc_lora_attach) the base's fp32 parameters: frozen, the table's
     * rows with trainable 0 at their offsets here; NULL when every parameter trains. */
    float *frozen;
    size_t frozen_numel;
    dpoc_param_ref wte, final_norm;
    /* The LM head (V,C): the embedding's values when tied. Training computes it in
     * vocabulary chunks (lmhead_forward), generation through linear_forward. */
    dpoc_linear lm_head;
    size_t tail_grad_from; /* where the final norm's and the head's gradients start */
    dpoc_layer *layers;
    /* A kept embedding (wte.v NULL): its storage type and bytes, rows dequantized as read. */
    dpoc_dtype wte_type;
    const void *wte_data;
    /* Kept tensors: what they point into or were copied to, released with the model
     * (release[i](owned[i])), and one scratch every kept product dequantizes into
     * (deq_n floats; so model code is not re-entrant while such a model runs). */
    void **owned;
    void (**release)(void *);
    size_t n_owned;
    float *deq;
    size_t deq_n;
    struct dpoc_pool *pool; /* the threads dequantizing shares (the BLAS's count), with kept tensors */
} dpoc_model;

/* Which tensors a model keeps in their source's storage instead of fp32: keep
 * returns 1 and sets *dtype and *data (the row-major (rows, cols) bytes) for a
 * 2-D tensor (a projection, the embedding, the head) named name. Kept tensors are
 * frozen: a model with any can train adapters only. */
typedef int (*dpoc_keep_fn)(void *ctx, const char *name, size_t rows, size_t cols, uint32_t *dtype,
                            const void **data);

/* Builds the size table and allocates a zeroed parameter block. */
int dpoc_model_init(dpoc_model *m, const dpoc_model_config *cfg, dpoc_err *err);
/* The same where keep (may be NULL) keeps some 2-D tensors as the source stores
 * them: those rows get no room in the block (trainable 0, data set). */
int dpoc_model_init_kept(dpoc_model *m, const dpoc_model_config *cfg, dpoc_keep_fn keep, void *ctx, dpoc_err *err);
/* Hands m something kept tensors point into, released by release(p) with the model;
 * on failure release(p) runs at once. */
int dpoc_model_own(dpoc_model *m, void *p, void (*release)(void *), dpoc_err *err);
/* 1 when m keeps any tensor outside its blocks. */
int dpoc_model_has_kept(const dpoc_model *m);
/* FNV-1a 64 of every parameter's values: the blocks and the kept tensors' bytes. */
uint64_t dpoc_model_fingerprint(const dpoc_model *m);
/* Row r (C values) of the embedding into out, whatever its storage. */
void dpoc_model_embedding_row(const dpoc_model *m, size_t r, float *out);
void dpoc_model_free(dpoc_model *m);
/* Writes dir/model.safetensors (F32, HF tensor names) and copies config.json from
 * src_dir, so dir loads as a Hugging Face model directory. Each file is written
 * to a temporary name and renamed into place. */
int dpoc_model_save(const dpoc_model *m, const char *dir, const char *src_dir, dpoc_err *err);
/* Writes the parameters to one safetensors file at path (F32, or BF16 rounded to nearest even). */
int dpoc_model_write_safetensors(const dpoc_model *m, const char *path, int bf16, dpoc_err *err);
/* Index of a tensor by HF name, or DPOC_NO_PARAM. */
size_t dpoc_model_find(const dpoc_model *m, const char *name);

/* Watching a forward's outputs (dpoc_acts.watch, NULL: not watched): where a
 * value first stopped being finite, when a step's loss was not, and the tests'
 * fault injection. Each output is named for the Hugging Face module computing
 * it: "model.embed_tokens", "model.layers.N.input_layernorm",
 * "model.layers.N.self_attn.{q,k,v}_proj" (before RoPE), "model.layers.N.self_attn"
 * (attention, before o_proj), "model.layers.N.self_attn.o_proj",
 * "model.layers.N.post_attention_layernorm", "model.layers.N.mlp.{gate,up}_proj",
 * "model.layers.N.mlp.act_fn" (silu(gate) * up), "model.layers.N.mlp.down_proj",
 * "model.layers.N" (the residual stream after the layer), "model.norm",
 * "lm_head" (the scored rows' log-probs). */
typedef struct {
    int check;                        /* record the first output holding a NaN or an Inf */
    char inject[DPOC_PARAM_NAME_MAX]; /* test hook: this output's element 0 := inject_value ("": none) */
    float inject_value;
    size_t injected;                  /* how many times it was */
    char first[DPOC_PARAM_NAME_MAX];  /* the first non-finite output seen ("": none) */
    size_t first_index;
    float first_value;
} dpoc_act_watch;

/* Activations of one sequence, kept per layer so backward (or a recompute) can use them.
 * Sized for up to max_T tokens and max_R scored rows. */
typedef struct {
    float *x_in, *ln1, *rstd1, *q, *k, *v, *att_lse, *atty, *x_mid, *ln2, *rstd2, *gate, *up, *act;
} dpoc_layer_acts;

/* Where one preference pair sits in a pairs layout: its rows [row0, row0 + Tp +
 * Ta + Tb - 2) and its head rows [head0, head0 + Ta + Tb), chosen first. */
typedef struct {
    size_t row0, Tp, Ta, Tb, head0;
} dpoc_pair_span;

typedef struct {
    size_t max_T;
    size_t T, row0, R; /* the current sequence: rows row0..row0+R-1 are scored */
    /* After dpoc_model_forward_pairs, the rows are n_pairs pairs of one prompt and
     * two completions each (see there); after dpoc_model_forward, n_pairs = 0. */
    size_t n_pairs;
    dpoc_pair_span *pairs; /* (n_pairs), room for max_T */
    size_t *head_src;      /* (R) the row of lnf each head row reads (pairs layout) */
    dpoc_prof *prof; /* where the kernels' time goes (dpoc bench); NULL: not measured */
    int recompute;   /* DPOC_ACTS_RECOMPUTE: layers share their inner arrays (see dpoc_acts_mode) */
    float *recompute_out; /* (T,C) where a recomputed layer's output goes (recompute only) */
    float *block;      /* one allocation */
    dpoc_layer_acts *layers;
    float *x_out, *lnf, *rstdf; /* (T,C), (T,C), (T) */
    float *cos_t, *sin_t;       /* rope tables (max_T, hd/2) */
    float *logits_scratch;      /* lm head chunk scratch */
    float *lora_ws;             /* (2 max_T lora_r_max) the adapters' workspace (linear_workspace) */
    float *head_in;             /* (R,C) the head's input rows gathered from lnf (shared layout only) */
    int32_t *tokens;            /* (T) the token of each row (shared layout only) */
    int32_t *labels;            /* (R) */
    dpoc_act_watch *watch;      /* NULL, or who sees each output (diagnosis, tests) */
    /* per scored row: outputs of the head */
    float *logp, *lse, *entropy, *mean_logit, *log_sum_sq_probs;
    uint8_t *is_top1;
} dpoc_acts;

/* How much of a sequence's activations forward keeps:
 * KEEP: every layer's (backward reads them; the fastest).
 * RECOMPUTE: each layer's input only, plus one set of inner arrays that every
 *   layer's forward overwrites; backward recomputes a layer's forward from its
 *   input just before its backward (TRL's gradient_checkpointing: about one
 *   more forward of the layers, ~(C + 2) floats per token per layer instead of
 *   ~(4C + 2QD + 2KD + 3F + nh + 2)). Also the layout for forward-only use. */
typedef enum { DPOC_ACTS_KEEP, DPOC_ACTS_RECOMPUTE } dpoc_acts_mode;

/* dpoc_acts_alloc_mode with DPOC_ACTS_KEEP. */
int dpoc_acts_alloc(dpoc_acts *a, const dpoc_model_config *cfg, size_t max_T, dpoc_err *err);
int dpoc_acts_alloc_mode(dpoc_acts *a, const dpoc_model_config *cfg, size_t max_T, dpoc_acts_mode mode,
                         dpoc_err *err);
void dpoc_acts_free(dpoc_acts *a);

/* Scratch for backward, sized for max_T. */
typedef struct {
    size_t max_T;
    float *block;
    float *dx, *dln, *dq, *dk, *dv, *datty, *dgate, *dup, *dact, *dh;
} dpoc_grad_scratch;

int dpoc_grad_scratch_alloc(dpoc_grad_scratch *s, const dpoc_model_config *cfg, size_t max_T, dpoc_err *err);
void dpoc_grad_scratch_free(dpoc_grad_scratch *s);

/* Forward of one sequence tokens (T). Rows t in [row0, row0+R) are scored: the
 * head gives log p(tokens[t+1] | tokens[..t]) and the metric statistics for each.
 * Requires row0 + R <= T - 1 and T <= a->max_T. */
void dpoc_model_forward(const dpoc_model *m, dpoc_acts *a, const int32_t *tokens, size_t T, size_t row0,
                        size_t R);

/* Called during backward each time a tail of the gradient block is final for
 * this sequence: grads[ready_from, numel) will not be written again (after the
 * head and final norm, after each layer, and with 0 at the end). Lets the
 * caller start communicating finished gradients while backward goes on. */
typedef struct {
    void (*ready)(void *ctx, size_t ready_from);
    void *ctx;
} dpoc_backward_hook;

/* Backward of the sequence last forwarded into a by dpoc_model_forward: dlogp (R) =
 * dLoss/dlogp of each scored row. Accumulates into grads (a block of m->numel
 * floats). hook may be NULL. */
void dpoc_model_backward(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                         const int32_t *tokens, const float *dlogp, const dpoc_backward_hook *hook);
/* The backwards of n sequences (each forwarded into a[i] by dpoc_model_forward),
 * layer by layer: every sequence through the head, then every sequence through
 * the last layer, ..., then every embedding. dx[i] (a[i]->T, C) carries sequence
 * i's gradient between layers. Each gradient gets the same contributions in the
 * same sequence order as n calls of dpoc_model_backward (so the same bits, but
 * for a tied head, whose embedding rows now come after every head), and each
 * layer's gradients are final after one pass through it: the hook's ready()
 * calls come once per layer for all n, early enough to reduce and release a
 * layer's gradients before the next (ZeRO stage 2). */
void dpoc_model_backward_seqs(const dpoc_model *m, float *grads, dpoc_acts *const *a, const int32_t *const *tokens,
                              const float *const *dlogp, float *const *dx, size_t n, dpoc_grad_scratch *s,
                              const dpoc_backward_hook *hook);

/* One preference pair with its prompt computed once. Equivalent (to rounding) to
 * dpoc_model_forward of prompt+chosen and of prompt+rejected, each with
 * row0 = Tp - 1 and R = its completion length, but the prompt's rows go through
 * the model once and both completions attend to its keys and values.
 *
 * Rows of a: [prompt (Tp); chosen[0..Ta-2] (Ta-1); rejected[0..Tb-2] (Tb-1)],
 * T = Tp + Ta + Tb - 2. A completion's last token is never an input of a
 * scored row (it is only a label), so it has no row. Positions: the prompt
 * 0..Tp-1, each completion from Tp on. Every row-wise op runs on all T rows at
 * once; in attention, prompt rows are causal over the prompt, and a
 * completion's rows see the whole prompt and, causally, their own completion.
 *
 * Head rows: a->R = Ta + Tb, in order chosen then rejected (a->row0 = Tp - 1);
 * row r of a completion c predicts c[r] from the hidden state of [last prompt
 * row, c[0..r-1]], so a->logp, lse, entropy, mean_logit, log_sum_sq_probs and
 * is_top1 hold [0, Ta) the chosen rows and [Ta, Ta+Tb) the rejected ones, as
 * the two unshared forwards' R rows one after the other.
 *
 * Requires Tp, Ta, Tb >= 1 and Tp + Ta + Tb - 2 <= a->max_T and Ta + Tb <= a->max_T
 * (max_T >= Tp + Ta + Tb always suffices); Tp + max(Ta, Tb) - 1 <=
 * max_position_embeddings as for the unshared sequences. */
void dpoc_model_forward_shared(const dpoc_model *m, dpoc_acts *a, const int32_t *prompt, size_t Tp,
                               const int32_t *chosen, size_t Ta, const int32_t *rejected, size_t Tb);

/* The token ids of one pair for dpoc_model_forward_pairs. */
typedef struct {
    const int32_t *prompt;
    size_t Tp;
    const int32_t *chosen;
    size_t Ta;
    const int32_t *rejected;
    size_t Tb;
} dpoc_pair_tokens;

/* n pairs at once, each as dpoc_model_forward_shared lays one out, one after the
 * other (a->pairs[i]: pair i's rows and head rows): every row-wise op and GEMM
 * runs once over all pairs' rows (taller matrices, each weight read once per
 * micro-batch), attention and RoPE per pair. The head rows are pair 0's chosen,
 * pair 0's rejected, pair 1's chosen, ... Requires the rows (sum of Tp + Ta +
 * Tb - 2) and the head rows (sum of Ta + Tb) each <= a->max_T. */
void dpoc_model_forward_pairs(const dpoc_model *m, dpoc_acts *a, const dpoc_pair_tokens *pairs, size_t n);

/* Backward of the pair last forwarded into a by dpoc_model_forward_shared:
 * dlogp (Ta+Tb) = dLoss/dlogp of each head row, in a's order. Accumulates into
 * grads the sum of both unshared backwards (the prompt's rows receive the
 * gradients of both completions). s sized like a (max_T >= a->T and >= Ta + Tb).
 * The hook is called as by dpoc_model_backward; hook may be NULL. */
void dpoc_model_backward_shared(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                                const float *dlogp, const dpoc_backward_hook *hook);
/* Backward of dpoc_model_forward_pairs (or _shared): dlogp (a->R) in a's head-row order. */
void dpoc_model_backward_pairs(const dpoc_model *m, float *grads, dpoc_acts *a, dpoc_grad_scratch *s,
                               const float *dlogp, const dpoc_backward_hook *hook);

#endif
