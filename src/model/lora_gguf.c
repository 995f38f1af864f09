/* LoRA adapters as llama.cpp's LoRA adapter GGUF (dpoc/lora_gguf.h).
 *
 * What llama.cpp writes and needs, and where it says so:
 * - convert_lora_to_gguf.py, LoraModel.set_type: general.type = "adapter"
 *   (gguf.GGUFType.ADAPTER) and adapter.type = "lora"; set_gguf_parameters:
 *   adapter.lora.alpha as a float32, the peft config's lora_alpha as it is (the
 *   script ignores use_rslora); generate_extra_tensors: no extra tensors;
 *   modify_tensors: each module yields "<gguf name>.lora_a" = peft's lora_A
 *   (r, in) and ".lora_b" = lora_B (out, r), untransposed (only token_embd's A
 *   is transposed, and dpoc never adapts the embedding).
 * - gguf-py GGUFWriter.__init__ (add_architecture): general.architecture first;
 *   convert_hf_to_gguf.py ModelBase.prepare_metadata: general.name (the
 *   metadata's name, else a directory name) and general.quantization_version =
 *   GGML_QUANT_VERSION (2); no size_label for an adapter (its parameter count
 *   is negative, gguf_writer.get_total_parameter_count).
 * - convert_hf_to_gguf.py LlamaModel.modify_tensors: q_proj is permuted with
 *   permute(w, n_head, n_head), k_proj with permute(w, n_head, n_head_kv); on a
 *   LoRA pair (convert_lora_to_gguf.py LoraTorchTensor.reshape / permute, the
 *   last axis untouched) that permutes the rows of lora_B only: A's rows are the
 *   rank, not the output. Qwen2Model does not permute.
 * - src/llama-adapter.cpp, llama_adapter_lora_init_impl: refuses a file whose
 *   general.type is not "adapter", whose general.architecture is not the
 *   model's, whose adapter.type is not "lora"; reads adapter.lora.alpha (0 when
 *   absent); pairs "<name>.lora_a" / ".lora_b" and refuses any other tensor but
 *   "*_norm.weight"; per pair requires model ne[0] == lora_a ne[0] (in),
 *   model ne[1] == lora_b ne[1] (out) and lora_a ne[1] == lora_b ne[0] (r).
 * - src/llama-adapter.h, llama_adapter_lora_weight::get_scale: scale =
 *   user_scale * alpha / rank with rank = lora_b ne[0] (alpha 0: user_scale
 *   alone); src/llama-graph.cpp build_lora_mm: y += scale * b (a x).
 * So the file's alpha is the adapter's scale times r (rsLoRA: alpha sqrt(r)). */
#include "dpoc/lora_gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gguf_write.h"
#include "dpoc/lora.h"
#include "model/lora_internal.h"

#define PROJECTIONS LORA_PROJECTIONS
/* The GGUF base names of a layer's projections, in dpoc's projection order
 * (gguf-py tensor_mapping.py: ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, FFN_GATE,
 * FFN_UP, FFN_DOWN; the same map as src/io/gguf_model.c). */
static const char *const GGUF_PROJ[PROJECTIONS] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                   "ffn_gate", "ffn_up", "ffn_down"};
enum { PROJ_Q = 0, PROJ_K = 1 };
/* GGML_QUANT_VERSION (ggml.h; gguf-py constants.py), which the converter writes. */
#define GGML_QUANT_VERSION 2
/* dpoc's scale is alpha / r (or / sqrt(r)) rounded to float once: a relative
 * difference above a few float ulps is another scale, not rounding. */
#define SCALE_RTOL 1e-6
#define GGUF_SUFFIX ".gguf"
/* "blk.<layer>.<projection>.weight.lora_x" */
#define TENSOR_NAME_MAX DPOC_GGUF_MAX_NAME

static void layer_projections(const dpoc_layer *L, const dpoc_linear *out[PROJECTIONS]) {
    const dpoc_linear *p[PROJECTIONS] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    memcpy(out, p, sizeof p);
}

/* The heads whose rows convert_hf_to_gguf permutes for projection p, or 0. */
static size_t permute_heads(const dpoc_model *m, size_t p) {
    if (m->cfg.arch != DPOC_ARCH_LLAMA) return 0;
    return p == PROJ_Q ? m->cfg.n_heads : p == PROJ_K ? m->cfg.n_kv_heads : 0;
}

/* Checks every adapter has cfg's rank and scale; counts them and the floats of
 * the permuted copies of B. */
static int check_adapters(const dpoc_model *m, const dpoc_lora_cfg *cfg, double alpha_file, size_t *n_adapters,
                          size_t *n_permuted, dpoc_err *err) {
    const double scale = alpha_file / (double)cfg->r;
    *n_adapters = *n_permuted = 0;
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        const dpoc_linear *proj[PROJECTIONS];
        layer_projections(&m->layers[l], proj);
        for (size_t p = 0; p < PROJECTIONS; p++) {
            const dpoc_adapter *a = &proj[p]->lora;
            if (a->r == 0) continue;
            if (a->r != cfg->r || !a->A || !a->B)
                return dpoc_errf(err, DPOC_EINPUT, "blk.%zu.%s: adapter rank %zu differs from the config's lora_r %zu",
                                 l, GGUF_PROJ[p], a->r, cfg->r);
            if (fabs((double)a->scale - scale) > SCALE_RTOL * fabs(scale))
                return dpoc_errf(err, DPOC_EINPUT,
                                 "blk.%zu.%s: adapter scale %g is not the config's %g; a llama.cpp adapter has one "
                                 "alpha for every tensor",
                                 l, GGUF_PROJ[p], (double)a->scale, scale);
            const size_t nh = permute_heads(m, p);
            if (nh) {
                if (proj[p]->out % (2 * nh) != 0)
                    return dpoc_errf(err, DPOC_EINPUT,
                                     "blk.%zu.%s: %zu output rows are not %zu rotary heads of even size", l,
                                     GGUF_PROJ[p], proj[p]->out, nh);
                *n_permuted += proj[p]->out * a->r;
            }
            (*n_adapters)++;
        }
    }
    if (!*n_adapters) return dpoc_errf(err, DPOC_EINPUT, "the model carries no LoRA adapter");
    return 0;
}

/* general.name: path's file name without ".gguf" (the converter names the file
 * from the metadata's name; here the name follows the file). */
static int add_name(dpoc_gguf_writer *w, const char *path, dpoc_err *err) {
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t n = strlen(base);
    const size_t sl = strlen(GGUF_SUFFIX);
    if (n > sl && !strcmp(base + n - sl, GGUF_SUFFIX)) n -= sl;
    char *name = dpoc_malloc(n + 1, "adapter name", err);
    if (!name) return DPOC_ENOMEM;
    memcpy(name, base, n);
    name[n] = '\0';
    int rc = n ? dpoc_gguf_writer_add_str(w, "general.name", name, err) : 0;
    free(name);
    return rc;
}

/* Adds the kv entries in the converter's order. */
static int add_metadata(dpoc_gguf_writer *w, const dpoc_model *m, double alpha_file, const char *path,
                        dpoc_err *err) {
    DPOC_TRY(dpoc_gguf_writer_add_str(w, "general.architecture", m->cfg.arch == DPOC_ARCH_LLAMA ? "llama" : "qwen2",
                                      err));
    DPOC_TRY(dpoc_gguf_writer_add_str(w, "general.type", "adapter", err));
    DPOC_TRY(dpoc_gguf_writer_add_str(w, "adapter.type", "lora", err));
    DPOC_TRY(add_name(w, path, err));
    DPOC_TRY(dpoc_gguf_writer_add_f32(w, "adapter.lora.alpha", (float)alpha_file, err));
    return dpoc_gguf_writer_add_u32(w, "general.quantization_version", GGML_QUANT_VERSION, err);
}

/* Adds every adapter's lora_a and lora_b, layer by layer in projection order,
 * each pair together (gguf-py's parameter count expects lora_b right after its
 * lora_a). perm receives the permuted copies of q/k's B. */
static int add_tensors(dpoc_gguf_writer *w, const dpoc_model *m, float *perm, dpoc_err *err) {
    char name[TENSOR_NAME_MAX];
    for (size_t l = 0; l < m->cfg.n_layers; l++) {
        const dpoc_linear *proj[PROJECTIONS];
        layer_projections(&m->layers[l], proj);
        for (size_t p = 0; p < PROJECTIONS; p++) {
            const dpoc_linear *L = proj[p];
            const dpoc_adapter *a = &L->lora;
            if (a->r == 0) continue;
            /* row-major shapes; the writer stores ne reversed: A ne [in, r], B ne [r, out] */
            const size_t shape_a[2] = {a->r, L->in}, shape_b[2] = {L->out, a->r};
            const float *b = a->B;
            const size_t nh = permute_heads(m, p);
            if (nh) {
                dpoc_gguf_permute_rows(perm, a->B, L->out, a->r, nh);
                b = perm;
                perm += L->out * a->r;
            }
            if (snprintf(name, sizeof name, "blk.%zu.%s.weight.lora_a", l, GGUF_PROJ[p]) >= (int)sizeof name)
                return dpoc_errf(err, DPOC_EINPUT, "layer %zu: the GGUF tensor name is too long", l);
            DPOC_TRY(dpoc_gguf_writer_add_tensor(w, name, DPOC_DT_F32, 2, shape_a, a->A, err));
            snprintf(name, sizeof name, "blk.%zu.%s.weight.lora_b", l, GGUF_PROJ[p]);
            DPOC_TRY(dpoc_gguf_writer_add_tensor(w, name, DPOC_DT_F32, 2, shape_b, b, err));
        }
    }
    return 0;
}

int dpoc_lora_save_gguf(const dpoc_model *m, const dpoc_lora_cfg *cfg, const char *path, dpoc_err *err) {
    if (!dpoc_lora_attached(m)) return dpoc_errf(err, DPOC_EINPUT, "%s: the model carries no LoRA adapter", path);
    if (cfg->r == 0 || !(cfg->alpha > 0) || !isfinite(cfg->alpha))
        return dpoc_errf(err, DPOC_EINPUT, "%s: the LoRA config needs lora_r >= 1 and a positive lora_alpha", path);
    /* llama.cpp's scale is alpha / r: store the alpha that gives the adapter's scale */
    const double alpha_file = cfg->use_rslora ? cfg->alpha * sqrt((double)cfg->r) : cfg->alpha;
    size_t n_adapters, n_perm;
    int rc = check_adapters(m, cfg, alpha_file, &n_adapters, &n_perm, err);
    if (rc) {
        dpoc_err_prefix(err, "%s", path);
        return rc;
    }
    float *perm = n_perm ? dpoc_malloc(n_perm * sizeof *perm, "permuted lora_b rows", err) : NULL;
    if (n_perm && !perm) return DPOC_ENOMEM;
    dpoc_gguf_writer *w = NULL;
    rc = dpoc_gguf_writer_new(&w, err);
    if (!rc) rc = add_metadata(w, m, alpha_file, path, err);
    if (!rc) rc = add_tensors(w, m, perm, err);
    if (!rc) rc = dpoc_gguf_writer_write(w, path, err);
    dpoc_gguf_writer_free(w);
    free(perm);
    return rc;
}
