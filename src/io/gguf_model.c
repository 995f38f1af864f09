/* GGUF -> dpoc model config, parameters (Hugging Face names and layouts) and
 * tokenizer spec. Key and tensor names follow llama.cpp's gguf-py constants and
 * convert_hf_to_gguf.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gguf.h"

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
    if (v == 0 || v > ((uint64_t)1 << 40))
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

static int token_id(const dpoc_gguf *g, const char *key, int32_t *out, dpoc_err *err) {
    *out = -1;
    if (!dpoc_gguf_has_key(g, key)) return 0;
    uint32_t v;
    DPOC_TRY(dpoc_gguf_get_u32(g, key, &v, err));
    if (v > INT32_MAX) return dpoc_errf(err, DPOC_EINPUT, "%s: key '%s' is out of range", dpoc_gguf_path(g), key);
    *out = (int32_t)v;
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
    cfg->max_position_embeddings = 2048;
    DPOC_TRY(get_size_key(g, arch, "context_length", &cfg->max_position_embeddings, 0, err));
    cfg->rms_norm_eps = 1e-6f;
    DPOC_TRY(get_pos_float(g, arch, "attention.layer_norm_rms_epsilon", &cfg->rms_norm_eps, err));
    cfg->rope_theta = 10000.0f;
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
    DPOC_TRY(token_id(g, "tokenizer.ggml.bos_token_id", &id, err));
    cfg->bos_token_id = id;
    DPOC_TRY(token_id(g, "tokenizer.ggml.eos_token_id", &id, err));
    cfg->eos_token_id = id;
    DPOC_TRY(token_id(g, "tokenizer.ggml.padding_token_id", &id, err));
    cfg->pad_token_id = id;
    return 0;
}

void dpoc_gguf_unpermute_rows(float *w, float *tmp, size_t rows, size_t cols, size_t n_head) {
    const size_t hd = rows / n_head, half = hd / 2;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t s = 0; s < 2; s++)
                memcpy(tmp + (h * hd + s * half + j) * cols, w + (h * hd + 2 * j + s) * cols, cols * sizeof *w);
    memcpy(w, tmp, rows * cols * sizeof *w);
}

/* The GGUF name of an HF parameter name; 0 when it has none. */
static int gguf_name(const char *hf, char *out, size_t n) {
    static const struct {
        const char *hf, *gguf;
    } layer_map[] = {
        {"input_layernorm.weight", "attn_norm.weight"},
        {"self_attn.q_proj.weight", "attn_q.weight"},
        {"self_attn.q_proj.bias", "attn_q.bias"},
        {"self_attn.k_proj.weight", "attn_k.weight"},
        {"self_attn.k_proj.bias", "attn_k.bias"},
        {"self_attn.v_proj.weight", "attn_v.weight"},
        {"self_attn.v_proj.bias", "attn_v.bias"},
        {"self_attn.o_proj.weight", "attn_output.weight"},
        {"post_attention_layernorm.weight", "ffn_norm.weight"},
        {"mlp.gate_proj.weight", "ffn_gate.weight"},
        {"mlp.up_proj.weight", "ffn_up.weight"},
        {"mlp.down_proj.weight", "ffn_down.weight"},
    };
    if (!strcmp(hf, "model.embed_tokens.weight")) return snprintf(out, n, "token_embd.weight") > 0;
    if (!strcmp(hf, "model.norm.weight")) return snprintf(out, n, "output_norm.weight") > 0;
    if (!strcmp(hf, "lm_head.weight")) return snprintf(out, n, "output.weight") > 0;
    size_t layer;
    int used = 0;
    if (sscanf(hf, "model.layers.%zu.%n", &layer, &used) == 1 && used > 0) {
        for (size_t i = 0; i < sizeof layer_map / sizeof layer_map[0]; i++)
            if (!strcmp(hf + used, layer_map[i].hf))
                return snprintf(out, n, "blk.%zu.%s", layer, layer_map[i].gguf) > 0;
    }
    return 0;
}

int dpoc_gguf_fill_model(dpoc_model *m, const dpoc_gguf *g, dpoc_err *err) {
    const char *path = dpoc_gguf_path(g);
    dpoc_model_config cfg;
    DPOC_TRY(dpoc_gguf_model_config(g, &cfg, err));
    DPOC_TRY(dpoc_model_init(m, &cfg, err));
    int rc = 0;
    float *tmp = NULL;
    size_t tmp_n = 0;
    unsigned char *used = dpoc_calloc(dpoc_gguf_n_tensors(g), 1, "GGUF tensor flags", err);
    if (!used) {
        rc = DPOC_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        char name[DPOC_PARAM_NAME_MAX + 32];
        if (!gguf_name(p->name, name, sizeof name)) {
            rc = dpoc_errf(err, DPOC_EINTERNAL, "no GGUF name for parameter '%s'", p->name);
            goto out;
        }
        const dpoc_gguf_tensor *t = dpoc_gguf_find_tensor(g, name);
        if (!t) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' (%s) is missing", path, name, p->name);
            goto out;
        }
        used[t - dpoc_gguf_tensor_at(g, 0)] = 1;
        /* GGUF ne is the PyTorch shape reversed: (out, in) is stored as ne [in, out] */
        int ok = p->ndim == 2 ? (t->n_dims == 2 && t->ne[0] == p->shape[1] && t->ne[1] == p->shape[0])
                              : (t->n_dims == 1 && t->ne[0] == p->shape[0]);
        if (!ok) {
            char got[96];
            int k = snprintf(got, sizeof got, "[%zu", t->ne[0]);
            for (size_t d = 1; d < t->n_dims && k > 0 && (size_t)k < sizeof got; d++)
                k += snprintf(got + k, sizeof got - (size_t)k, ", %zu", t->ne[d]);
            if (k > 0 && (size_t)k < sizeof got) snprintf(got + k, sizeof got - (size_t)k, "]");
            rc = p->ndim == 2 ? dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has ne %s, expected [%zu, %zu]", path,
                                          name, got, p->shape[1], p->shape[0])
                              : dpoc_errf(err, DPOC_EINPUT, "%s: tensor '%s' has ne %s, expected [%zu]", path, name,
                                          got, p->shape[0]);
            goto out;
        }
        float *dst = m->params + p->offset;
        rc = dpoc_gguf_dequantize(t, dst, p->numel, err);
        if (rc) {
            dpoc_err_prefix(err, "%s", path);
            goto out;
        }
        /* convert_hf_to_gguf.py permutes llama's q/k rows for ggml's adjacent-pair RoPE;
         * dpoc's RoPE is HF's half-split one, so undo it (Q with n_head, K with n_head_kv) */
        if (cfg.arch == DPOC_ARCH_LLAMA) {
            size_t nh = 0;
            if (strstr(name, ".attn_q.")) nh = cfg.n_heads;
            else if (strstr(name, ".attn_k.")) nh = cfg.n_kv_heads;
            if (nh) {
                if (p->numel > tmp_n) {
                    free(tmp);
                    tmp = dpoc_malloc(p->numel * sizeof *tmp, "permutation scratch", err);
                    tmp_n = tmp ? p->numel : 0;
                    if (!tmp) {
                        rc = DPOC_ENOMEM;
                        goto out;
                    }
                }
                dpoc_gguf_unpermute_rows(dst, tmp, p->shape[0], p->ndim == 2 ? p->shape[1] : 1, nh);
            }
        }
    }
    /* a tensor dpoc would not use means a model it does not understand */
    for (size_t i = 0; i < dpoc_gguf_n_tensors(g); i++) {
        if (used[i]) continue;
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: unexpected tensor '%s' for architecture %s", path,
                       dpoc_gguf_tensor_at(g, i)->name, cfg.arch == DPOC_ARCH_LLAMA ? "llama" : "qwen2");
        goto out;
    }
out:
    free(tmp);
    free(used);
    if (rc) dpoc_model_free(m);
    return rc;
}

int dpoc_gguf_load_model(dpoc_model *m, const char *path, dpoc_err *err) {
    dpoc_gguf *g = NULL;
    memset(m, 0, sizeof *m);
    DPOC_TRY(dpoc_gguf_open(&g, path, err));
    int rc = dpoc_gguf_fill_model(m, g, err);
    dpoc_gguf_close(g);
    return rc;
}

int dpoc_gguf_tokenizer_spec(const dpoc_gguf *g, dpoc_tokenizer_spec *spec, dpoc_err *err) {
    memset(spec, 0, sizeof *spec);
    const char *path = dpoc_gguf_path(g);
    DPOC_TRY(dpoc_gguf_get_str(g, "tokenizer.ggml.model", &spec->model, err));
    if (dpoc_gguf_has_key(g, "tokenizer.ggml.pre")) DPOC_TRY(dpoc_gguf_get_str(g, "tokenizer.ggml.pre", &spec->pre, err));
    DPOC_TRY(dpoc_gguf_get_str_array(g, "tokenizer.ggml.tokens", &spec->tokens, NULL, &spec->n_tokens, err));
    if (dpoc_gguf_has_key(g, "tokenizer.ggml.token_type")) {
        dpoc_gguf_vtype et;
        const void *data;
        size_t n;
        DPOC_TRY(dpoc_gguf_get_array(g, "tokenizer.ggml.token_type", &et, &data, &n, err));
        if (et != DPOC_GGUF_INT32)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'tokenizer.ggml.token_type' must be an array of i32", path);
        if (n != spec->n_tokens)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'tokenizer.ggml.token_type' has %zu entries for %zu tokens",
                             path, n, spec->n_tokens);
        spec->token_type = data;
    }
    if (dpoc_gguf_has_key(g, "tokenizer.ggml.merges"))
        DPOC_TRY(dpoc_gguf_get_str_array(g, "tokenizer.ggml.merges", &spec->merges, NULL, &spec->n_merges, err));
    DPOC_TRY(token_id(g, "tokenizer.ggml.bos_token_id", &spec->bos_id, err));
    DPOC_TRY(token_id(g, "tokenizer.ggml.eos_token_id", &spec->eos_id, err));
    DPOC_TRY(token_id(g, "tokenizer.ggml.padding_token_id", &spec->pad_id, err));
    const int32_t ids[3] = {spec->bos_id, spec->eos_id, spec->pad_id};
    const char *names[3] = {"bos_token_id", "eos_token_id", "padding_token_id"};
    for (int k = 0; k < 3; k++)
        if (ids[k] >= 0 && (size_t)ids[k] >= spec->n_tokens)
            return dpoc_errf(err, DPOC_EINPUT, "%s: key 'tokenizer.ggml.%s' is %d, beyond the %zu tokens", path,
                             names[k], ids[k], spec->n_tokens);
    spec->add_bos = 0;
    if (dpoc_gguf_has_key(g, "tokenizer.ggml.add_bos_token"))
        DPOC_TRY(dpoc_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &spec->add_bos, err));
    if (dpoc_gguf_has_key(g, "tokenizer.chat_template"))
        DPOC_TRY(dpoc_gguf_get_str(g, "tokenizer.chat_template", &spec->chat_template, err));
    return 0;
}
