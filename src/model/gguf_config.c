/* GGUF metadata -> dpoc model config (dpoc/model_load.h). Key names follow
 * llama.cpp's gguf-py constants; what the model code does not implement (RoPE
 * scaling, partial rotary, other architectures) is refused by name. */
#include "dpoc/model_load.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What an absent key means: the defaults hf_config.c assumes for config.json too. */
#define GGUF_DEFAULT_CONTEXT 2048
#define GGUF_DEFAULT_RMS_EPS 1e-6f
#define GGUF_DEFAULT_ROPE_BASE 10000.0f
/* A size key beyond this is not a model dpoc could hold (nor a sane file). */
#define GGUF_MAX_SIZE_KEY ((uint64_t)1 << 40)

static int get_size_key(const dpoc_gguf *g, const char *arch, const char *suffix, size_t *out, int required,
                        dpoc_err *err) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (!dpoc_gguf_has_key(g, key)) {
        if (required) return dpoc_errf(err, DPOC_EINPUT, "%s: missing key '%s'", dpoc_gguf_path(g), key);
        return 0;
    }
    uint64_t v;
    /* per-layer arrays (e.g. OpenELM's head counts) are not a dpoc model */
    DPOC_TRY(dpoc_gguf_get_u64(g, key, &v, err));
    if (v == 0 || v > GGUF_MAX_SIZE_KEY)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is %llu; expected a positive size", dpoc_gguf_path(g), key,
                         (unsigned long long)v);
    *out = (size_t)v;
    return 0;
}

static int get_pos_float(const dpoc_gguf *g, const char *arch, const char *suffix, float *out, dpoc_err *err) {
    char key[160];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (!dpoc_gguf_has_key(g, key)) return 0;
    float v;
    DPOC_TRY(dpoc_gguf_get_f32(g, key, &v, err));
    if (!(v > 0) || !isfinite(v))
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' must be a positive number", dpoc_gguf_path(g), key);
    *out = v;
    return 0;
}

/* RoPE scaling changes the model; only "none" (or a factor of 1) is the plain RoPE
 * dpoc implements. Every other rope.scaling.* key is refused by name. */
static int check_rope_scaling(const dpoc_gguf *g, const char *arch, dpoc_err *err) {
    char prefix[160];
    int pl = snprintf(prefix, sizeof prefix, "%s.rope.scaling.", arch);
    for (size_t i = 0; i < dpoc_gguf_n_kv(g); i++) {
        const char *key = dpoc_gguf_kv_key(g, i);
        if (strncmp(key, prefix, (size_t)pl) != 0) continue;
        const char *rest = key + pl;
        if (!strcmp(rest, "type")) {
            const char *t;
            DPOC_TRY(dpoc_gguf_get_str(g, key, &t, err));
            if (!strcmp(t, "none")) continue;
            return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is '%s'; RoPE scaling is not supported",
                             dpoc_gguf_path(g), key, t);
        }
        if (!strcmp(rest, "factor")) {
            float f;
            DPOC_TRY(dpoc_gguf_get_f32(g, key, &f, err));
            if (f == 0.0f || f == 1.0f) continue;
            return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is %g; RoPE scaling is not supported",
                             dpoc_gguf_path(g), key, (double)f);
        }
        if (!strcmp(rest, "finetuned")) continue; /* a flag with no effect on the math */
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is set; RoPE scaling is not supported", dpoc_gguf_path(g),
                         key);
    }
    if (dpoc_gguf_find_tensor(g, "rope_freqs.weight"))
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: tensor 'rope_freqs.weight' is present (Llama 3 RoPE scaling); not supported",
                         dpoc_gguf_path(g));
    return 0;
}

int dpoc_gguf_model_config(const dpoc_gguf *g, dpoc_model_config *cfg, dpoc_err *err) {
    memset(cfg, 0, sizeof *cfg);
    const char *path = dpoc_gguf_path(g);
    const char *arch;
    DPOC_TRY(dpoc_gguf_get_str(g, "general.architecture", &arch, err));
    if (!strcmp(arch, "llama")) {
        cfg->arch = DPOC_ARCH_LLAMA;
    } else if (!strcmp(arch, "qwen2")) {
        cfg->arch = DPOC_ARCH_QWEN2;
        cfg->qkv_bias = 1;
    } else {
        return dpoc_errf(err, DPOC_EINPUT, "%s: key 'general.architecture' is '%s'; supported: llama, qwen2", path,
                         arch);
    }
    DPOC_TRY(get_size_key(g, arch, "block_count", &cfg->n_layers, 1, err));
    DPOC_TRY(get_size_key(g, arch, "embedding_length", &cfg->hidden_size, 1, err));
    DPOC_TRY(get_size_key(g, arch, "feed_forward_length", &cfg->intermediate_size, 1, err));
    DPOC_TRY(get_size_key(g, arch, "attention.head_count", &cfg->n_heads, 1, err));
    cfg->n_kv_heads = cfg->n_heads;
    DPOC_TRY(get_size_key(g, arch, "attention.head_count_kv", &cfg->n_kv_heads, 0, err));
    if (cfg->hidden_size % cfg->n_heads != 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: %s.embedding_length %zu is not a multiple of the head count %zu", path,
                         arch, cfg->hidden_size, cfg->n_heads);
    cfg->head_dim = cfg->hidden_size / cfg->n_heads;
    DPOC_TRY(get_size_key(g, arch, "attention.key_length", &cfg->head_dim, 0, err));
    size_t vlen = cfg->head_dim, rope_dim = cfg->head_dim;
    DPOC_TRY(get_size_key(g, arch, "attention.value_length", &vlen, 0, err));
    DPOC_TRY(get_size_key(g, arch, "rope.dimension_count", &rope_dim, 0, err));
    if (vlen != cfg->head_dim)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s.attention.value_length' (%zu) differs from the key length %zu",
                         path, arch, vlen, cfg->head_dim);
    if (rope_dim != cfg->head_dim)
        return dpoc_errf(err, DPOC_EINPUT,
                         "%s: key '%s.rope.dimension_count' is %zu; partial rotary embeddings are not supported "
                         "(head dim %zu)",
                         path, arch, rope_dim, cfg->head_dim);
    cfg->max_position_embeddings = GGUF_DEFAULT_CONTEXT;
    DPOC_TRY(get_size_key(g, arch, "context_length", &cfg->max_position_embeddings, 0, err));
    cfg->rms_norm_eps = GGUF_DEFAULT_RMS_EPS;
    DPOC_TRY(get_pos_float(g, arch, "attention.layer_norm_rms_epsilon", &cfg->rms_norm_eps, err));
    cfg->rope_theta = GGUF_DEFAULT_ROPE_BASE;
    DPOC_TRY(get_pos_float(g, arch, "rope.freq_base", &cfg->rope_theta, err));
    DPOC_TRY(check_rope_scaling(g, arch, err));
    if (cfg->n_heads % cfg->n_kv_heads != 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: head_count (%zu) is not a multiple of head_count_kv (%zu)", path,
                         cfg->n_heads, cfg->n_kv_heads);
    if (cfg->head_dim % 2 != 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: head dim %zu must be even for rotary embeddings", path, cfg->head_dim);

    /* vocabulary: the embedding's rows are what the model uses; the token list and
     * {arch}.vocab_size must agree with them when present */
    const dpoc_gguf_tensor *emb = dpoc_gguf_find_tensor(g, "token_embd.weight");
    size_t n_tok = 0, v_key = 0;
    if (dpoc_gguf_has_key(g, "tokenizer.ggml.tokens")) {
        const char *const *toks;
        DPOC_TRY(dpoc_gguf_get_str_array(g, "tokenizer.ggml.tokens", &toks, NULL, &n_tok, err));
    }
    DPOC_TRY(get_size_key(g, arch, "vocab_size", &v_key, 0, err));
    cfg->vocab_size = n_tok ? n_tok : v_key;
    if (emb) {
        if (emb->n_dims != 2 || emb->ne[0] != cfg->hidden_size)
            return dpoc_errf(err, DPOC_EINPUT, "%s: tensor 'token_embd.weight' has ne [%zu, %zu] (%zu dims), expected "
                             "[%zu, vocab]", path, emb->ne[0], emb->ne[1], emb->n_dims, cfg->hidden_size);
        if (!cfg->vocab_size) cfg->vocab_size = emb->ne[1];
        if (emb->ne[1] != cfg->vocab_size)
            return dpoc_errf(err, DPOC_EINPUT,
                             "%s: tensor 'token_embd.weight' has %zu rows but the vocabulary has %zu tokens", path,
                             emb->ne[1], cfg->vocab_size);
    }
    if (v_key && v_key != cfg->vocab_size)
        return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s.vocab_size' is %zu but the vocabulary has %zu tokens", path,
                         arch, v_key, cfg->vocab_size);
    if (!cfg->vocab_size)
        return dpoc_errf(err, DPOC_EINPUT, "%s: no vocabulary size (no tokenizer.ggml.tokens, %s.vocab_size or "
                         "token_embd.weight)", path, arch);
    cfg->tie_word_embeddings = dpoc_gguf_find_tensor(g, "output.weight") == NULL;
    int32_t id;
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.bos_token_id", &id, err));
    cfg->bos_token_id = id;
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.eos_token_id", &id, err));
    cfg->eos_token_id = id;
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.padding_token_id", &id, err));
    cfg->pad_token_id = id;
    return 0;
}
