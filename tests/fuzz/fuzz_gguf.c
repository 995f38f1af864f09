/* libFuzzer target for the GGUF reader: the input is a whole .gguf file image,
 * opened from memory (no temp file, so runs are fast and independent). Every
 * tensor that validates is dequantized (when its type converts), the metadata
 * getters run on every key, and the model config / tokenizer spec mapping runs
 * too; then the same image as a tensor source (its table must match the reader's)
 * and, when the config is small, the model builder on it (names, shapes, the
 * llama q/k un-permutation). Build: cmake -DCMAKE_C_COMPILER=clang -DDPOC_FUZZ=ON
 * -DDPOC_TESTS=OFF, target fuzz_gguf; seeds in tests/fuzz/corpus/gguf/. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gguf.h"
#include "dpoc/model_load.h"
#include "dpoc/tensor_source.h"
#include "dpoc/tokenizer_source.h"

/* Tensors larger than this are not converted (the input bounds only non-empty types). */
#define FUZZ_MAX_ELEMS ((size_t)1 << 20)
/* A config whose parameter block would exceed this many floats, or with more
 * layers than this (each adds 12 entries to the parameter table), is not built. */
#define FUZZ_MAX_PARAMS 4e6
#define FUZZ_MAX_LAYERS 64

/* About dpoc_model_init's parameter count, in doubles (no overflow). */
static double param_count(const dpoc_model_config *c) {
    const double C = (double)c->hidden_size, V = (double)c->vocab_size, F = (double)c->intermediate_size;
    const double QD = (double)c->n_heads * (double)c->head_dim, KD = (double)c->n_kv_heads * (double)c->head_dim;
    const double layer = 2 * C + 2 * QD * C + 2 * KD * C + 3 * F * C + QD + 2 * KD;
    return V * C * 2 + C + (double)c->n_layers * layer;
}

/* The tensor source over the same image lists exactly the reader's tensors. */
static void check_source(const dpoc_gguf *g, const dpoc_tensor_source *src) {
    if (dpoc_ts_count(src) != dpoc_gguf_n_tensors(g) || dpoc_ts_format_of(src) != DPOC_TS_GGUF) abort();
    for (size_t i = 0; i < dpoc_ts_count(src); i++) {
        const dpoc_ts_tensor *t = dpoc_ts_at(src, i);
        const dpoc_gguf_tensor *gt = dpoc_gguf_tensor_at(g, i);
        if (strcmp(t->name, gt->name) || t->dtype != gt->type || t->ndim != gt->n_dims || t->numel != gt->nelements ||
            t->nbytes != gt->nbytes || dpoc_ts_find(src, t->name) != t)
            abort();
        for (size_t d = 0; d < t->ndim; d++)
            if (t->shape[d] != gt->ne[t->ndim - 1 - d]) abort();
    }
}

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
        if (t->nelements > FUZZ_MAX_ELEMS) continue; /* bounded by the input only for non-empty types */
        float *dst = malloc((t->nelements ? t->nelements : 1) * sizeof *dst);
        if (!dst) continue;
        (void)dpoc_gguf_dequantize(t, dst, t->nelements, &err);
        free(dst);
    }
    dpoc_model_config cfg;
    const int have_cfg = dpoc_gguf_model_config(g, &cfg, &err) == 0;
    dpoc_tokenizer_spec spec;
    (void)dpoc_gguf_tokenizer_spec(g, &spec, &err);

    dpoc_tensor_source *src = NULL;
    if (dpoc_ts_open_gguf_memory(&src, copy, size, "fuzz", &err)) abort(); /* the reader took it above */
    check_source(g, src);
    for (size_t i = 0; i < dpoc_ts_count(src); i++) {
        const dpoc_ts_tensor *t = dpoc_ts_at(src, i);
        if (t->numel > FUZZ_MAX_ELEMS) continue;
        float *dst = malloc((t->numel ? t->numel : 1) * sizeof *dst);
        if (!dst) continue;
        /* converts exactly when the reader's dequantizer does */
        if ((dpoc_ts_to_f32(src, t, dst, t->numel, &err) == 0) != (dpoc_gguf_can_dequantize(t->dtype) != 0)) abort();
        free(dst);
    }
    if (have_cfg && cfg.n_layers <= FUZZ_MAX_LAYERS && param_count(&cfg) <= FUZZ_MAX_PARAMS) {
        dpoc_model m;
        if (dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err) == 0) dpoc_model_free(&m);
        else if (m.params || err.msg[0] == '\0') abort(); /* an error frees the model and says why */
    }
    dpoc_ts_close(src);
    dpoc_gguf_close(g);
    free(copy);
    return 0;
}
