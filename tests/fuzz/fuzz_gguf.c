/* libFuzzer target for the GGUF reader: the input is a whole .gguf file image,
 * opened from memory (no temp file, so runs are fast and independent). Every
 * tensor that validates is dequantized (when its type converts), the metadata
 * getters run on every key, and the model config / tokenizer spec mapping runs
 * too. Build: cmake -DCMAKE_C_COMPILER=clang -DDPOC_FUZZ=ON -DDPOC_TESTS=OFF,
 * target fuzz_gguf; seeds in tests/fuzz/corpus/gguf/. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t size) {
    /* an exact-size copy, so ASan catches any read past the end */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    if (size) memcpy(copy, buf, size);
    dpoc_gguf *g = NULL;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_gguf_open_memory(&g, copy, size, "fuzz", &err);
    if (rc) {
        /* an error leaves nothing open and always says why */
        if (g || err.code != rc || err.msg[0] == '\0') abort();
        free(copy);
        return 0;
    }
    for (size_t i = 0; i < dpoc_gguf_n_kv(g); i++) {
        const char *key = dpoc_gguf_kv_key(g, i);
        uint64_t u;
        double d;
        const char *s;
        dpoc_gguf_vtype et;
        const void *data;
        const char *const *strs;
        const size_t *lens;
        size_t n;
        int b;
        (void)dpoc_gguf_get_u64(g, key, &u, &err);
        (void)dpoc_gguf_get_f64(g, key, &d, &err);
        (void)dpoc_gguf_get_bool(g, key, &b, &err);
        if (dpoc_gguf_get_str(g, key, &s, &err) == 0) (void)strlen(s);
        if (dpoc_gguf_get_array(g, key, &et, &data, &n, &err) == 0 && n) (void)((const volatile uint8_t *)data)[0];
        if (dpoc_gguf_get_str_array(g, key, &strs, &lens, &n, &err) == 0)
            for (size_t k = 0; k < n; k++)
                if (strlen(strs[k]) > lens[k]) abort();
    }
    for (size_t i = 0; i < dpoc_gguf_n_tensors(g); i++) {
        const dpoc_gguf_tensor *t = dpoc_gguf_tensor_at(g, i);
        /* the reader guarantees the bytes are inside the input */
        if (t->nbytes && (t->data < copy || (size_t)(t->data - copy) > size || t->nbytes > size - (size_t)(t->data - copy)))
            abort();
        if (t->nelements > (1u << 20)) continue; /* bounded by the input only for non-empty types */
        float *dst = malloc((t->nelements ? t->nelements : 1) * sizeof *dst);
        if (!dst) continue;
        (void)dpoc_gguf_dequantize(t, dst, t->nelements, &err);
        free(dst);
    }
    dpoc_model_config cfg;
    (void)dpoc_gguf_model_config(g, &cfg, &err);
    dpoc_tokenizer_spec spec;
    (void)dpoc_gguf_tokenizer_spec(g, &spec, &err);
    dpoc_gguf_close(g);
    free(copy);
    return 0;
}
