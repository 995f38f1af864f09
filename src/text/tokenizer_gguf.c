/* GGUF metadata -> tokenizer spec (dpoc/tokenizer_source.h). Key names follow
 * llama.cpp's gguf-py constants (tokenizer.ggml.*). */
#include "dpoc/tokenizer_source.h"

#include <string.h>

/* The special ids a spec carries, for the range check against the token list. */
#define SPEC_N_SPECIAL 3

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
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.bos_token_id", &spec->bos_id, err));
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.eos_token_id", &spec->eos_id, err));
    DPOC_TRY(dpoc_gguf_get_token_id(g, "tokenizer.ggml.padding_token_id", &spec->pad_id, err));
    const int32_t ids[SPEC_N_SPECIAL] = {spec->bos_id, spec->eos_id, spec->pad_id};
    const char *names[SPEC_N_SPECIAL] = {"bos_token_id", "eos_token_id", "padding_token_id"};
    for (int k = 0; k < SPEC_N_SPECIAL; k++)
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
