/* llama.cpp's names and layouts of the Hugging Face parameters (dpoc/model_load.h),
 * as convert_hf_to_gguf.py writes them: tensor names after gguf-py's
 * MODEL_TENSOR table, llama's q/k rows permuted for ggml's RoPE. */
#include "dpoc/model_load.h"

#include <stdio.h>
#include <string.h>

void dpoc_gguf_unpermute_rows(float *w, float *tmp, size_t rows, size_t cols, size_t n_head) {
    const size_t hd = rows / n_head, half = hd / 2;
    for (size_t h = 0; h < n_head; h++)
        for (size_t j = 0; j < half; j++)
            for (size_t s = 0; s < 2; s++)
                memcpy(tmp + (h * hd + s * half + j) * cols, w + (h * hd + 2 * j + s) * cols, cols * sizeof *w);
    memcpy(w, tmp, rows * cols * sizeof *w);
}

/* snprintf into out, 1 when it fit. */
static int put_name(char *out, size_t n, int written) { return written > 0 && (size_t)written < n; }

int dpoc_gguf_tensor_name(const char *hf, char *out, size_t n) {
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
    if (!strcmp(hf, "model.embed_tokens.weight")) return put_name(out, n, snprintf(out, n, "token_embd.weight"));
    if (!strcmp(hf, "model.norm.weight")) return put_name(out, n, snprintf(out, n, "output_norm.weight"));
    if (!strcmp(hf, "lm_head.weight")) return put_name(out, n, snprintf(out, n, "output.weight"));
    size_t layer;
    int used = 0;
    if (sscanf(hf, "model.layers.%zu.%n", &layer, &used) == 1 && used > 0) {
        for (size_t i = 0; i < sizeof layer_map / sizeof layer_map[0]; i++)
            if (!strcmp(hf + used, layer_map[i].hf))
                return put_name(out, n, snprintf(out, n, "blk.%zu.%s", layer, layer_map[i].gguf));
    }
    return 0;
}
