/* QLoRA on llama.cpp's formats: a GGUF base kept as the file stores it
 * (base_weights_dtype keep: DPOC_WEIGHTS_KEEP) against the same file dequantized
 * to fp32 at load. Dequantization is exact either way (the same converter), so
 * only the order of the sums differs (the kept products run in row chunks):
 * log-probs, LoRA log-probs and every adapter gradient agree within 1e-5.
 *
 * On the real SmolLM2-135M-Instruct Q4_1 GGUF (llama: its q/k rows are kept
 * re-ordered; tied head kept as the embedding) and Qwen2.5-Coder-0.5B-Instruct
 * Q4_K_M (qwen2: Q4_K, Q5_0, Q6_K, Q8_0, an untied Q8_0 head); each skipped with
 * a message when absent (tools/fetch-model [--model qwen2.5-coder-0.5b]). A kept
 * product in many chunks, each dequantized on 3 threads, equals the one-chunk one. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

#include "core/pool.h"
#include "dpoc/layers.h"
#include "dpoc/lora.h"
#include "dpoc/model.h"
#include "dpoc/source.h"

#define LOGP_RTOL 1e-5
#define LOGP_ATOL 1e-5
#define GRAD_RTOL 1e-5 /* relative max-abs per adapter tensor */
#define REL_FLOOR 1e-12
enum { T_ = 24, LORA_R = 4 };

static const char *model_path(const char *env, const char *file, char *buf, size_t n) {
    const char *e = getenv(env);
    if (e && *e) snprintf(buf, n, "%s", e);
    else {
        const char *cache = getenv("DPOC_CACHE"), *home = getenv("HOME");
        if (cache && *cache) snprintf(buf, n, "%s/models/%s", cache, file);
        else snprintf(buf, n, "%s/.cache/dpoc/models/%s", home ? home : ".", file);
    }
    return buf;
}

static void logps_and_grads(const dpoc_model *m, const int32_t *tok, float *logp, float *G) {
    dpoc_acts a;
    dpoc_grad_scratch s;
    dpoc_err err;
    if (dpoc_acts_alloc(&a, &m->cfg, T_, &err) || dpoc_grad_scratch_alloc(&s, &m->cfg, T_, &err))
        fail_msg("%s", err.msg);
    dpoc_model_forward(m, &a, tok, T_, 0, T_ - 1);
    memcpy(logp, a.logp, (T_ - 1) * sizeof *logp);
    if (G) {
        float dl[T_];
        for (size_t i = 0; i < T_ - 1; i++) dl[i] = (float)(0.1 * ((int)(i % 5) - 2)); /* some loss gradient */
        dpoc_model_backward(m, G, &a, &s, tok, dl, NULL);
    }
    dpoc_grad_scratch_free(&s);
    dpoc_acts_free(&a);
}

static void check_model(const char *env, const char *file, const char *fetch) {
    char path[4096];
    model_path(env, file, path, sizeof path);
    if (access(path, R_OK) != 0) {
        print_message("SKIPPED %s: %s is absent (tools/fetch-model%s)\n", file, path, fetch);
        skip();
    }
    dpoc_model full, kept;
    dpoc_err err;
    if (dpoc_source_load_model(&full, path, &err)) fail_msg("%s", err.msg);
    if (dpoc_source_load_model_stored(&kept, path, DPOC_WEIGHTS_KEEP, &err)) fail_msg("%s", err.msg);
    assert_true(dpoc_model_has_kept(&kept));
    /* only the 1-D tensors (norms, biases) are converted; every matrix stays in the file */
    size_t kept_rows = 0;
    for (size_t i = 0; i < kept.n_tensors; i++) {
        if (kept.info[i].ndim == 2) assert_non_null(kept.info[i].data);
        kept_rows += kept.info[i].data != NULL;
    }
    assert_true(kept_rows >= 7 * kept.cfg.n_layers);
    print_message("%s: %zu tensors kept, %zu fp32 values converted (of %zu)\n", file, kept_rows, kept.numel, full.numel);
    /* a kept product in many row chunks (a scratch of 3 rows, the last chunk partial)
     * equals the one-chunk product; forward and dX */
    {
        dpoc_linear one = kept.layers[0].gate, many = one;
        many.deq_n = 3 * many.in;
        dpoc_pool pool; /* and the rows of each chunk split over 3 threads */
        if (dpoc_pool_init(&pool, 3, &err)) fail_msg("%s", err.msg);
        assert_int_equal(pool.n_threads, 3);
        many.pool = &pool;
        one.pool = NULL;
        const size_t R = 5;
        float *x = calloc(R * one.in, sizeof *x), *y1 = calloc(R * one.out, sizeof *y1), *y2 = calloc(R * one.out, sizeof *y2);
        float *g = calloc(R * one.out, sizeof *g), *d1 = calloc(R * one.in, sizeof *d1), *d2 = calloc(R * one.in, sizeof *d2);
        for (size_t i = 0; i < R * one.in; i++) x[i] = (float)sin(0.37 * (double)i);
        for (size_t i = 0; i < R * one.out; i++) g[i] = (float)cos(0.11 * (double)i);
        linear_forward(&one, y1, x, R, NULL);
        linear_forward(&many, y2, x, R, NULL);
        linear_backward(&one, NULL, d1, g, x, R, NULL);
        linear_backward(&many, NULL, d2, g, x, R, NULL);
        assert_true(rel_maxabs_err(y2, y1, R * one.out, REL_FLOOR) < GRAD_RTOL);
        assert_true(rel_maxabs_err(d2, d1, R * one.in, REL_FLOOR) < GRAD_RTOL);
        free(x), free(y1), free(y2), free(g), free(d1), free(d2);
        dpoc_pool_free(&pool);
    }
    int32_t tok[T_];
    for (size_t i = 0; i < T_; i++) tok[i] = (int32_t)((i * 7919 + 13) % full.cfg.vocab_size);
    float a[T_ - 1], b[T_ - 1];
    logps_and_grads(&full, tok, a, NULL);
    logps_and_grads(&kept, tok, b, NULL);
    for (size_t i = 0; i < T_ - 1; i++) assert_close(b[i], a[i], LOGP_RTOL, LOGP_ATOL, "%s base logp %zu", file, i);
    /* the same adapters (both random, so they act) on both */
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_lora_cfg L = c.lora;
    L.r = LORA_R;
    L.alpha = 8;
    L.init = DPOC_LORA_INIT_RANDOM;
    L.targets_kind = DPOC_LORA_TARGETS_ALL_LINEAR;
    if (dpoc_lora_attach(&full, &L, 7, &err) || dpoc_lora_attach(&kept, &L, 7, &err)) fail_msg("%s", err.msg);
    assert_int_equal(full.numel, kept.numel);
    assert_memory_equal(full.params, kept.params, full.numel * sizeof(float));
    float *Ga = calloc(full.numel, sizeof *Ga), *Gb = calloc(kept.numel, sizeof *Gb);
    logps_and_grads(&full, tok, a, Ga);
    logps_and_grads(&kept, tok, b, Gb);
    for (size_t i = 0; i < T_ - 1; i++) assert_close(b[i], a[i], LOGP_RTOL, LOGP_ATOL, "%s LoRA logp %zu", file, i);
    double worst = 0;
    for (size_t i = 0; i < kept.n_tensors; i++) {
        const dpoc_param_info *p = &kept.info[i];
        if (!p->trainable) continue;
        const double e = rel_maxabs_err(Gb + p->offset, Ga + p->offset, p->numel, REL_FLOOR);
        if (e > GRAD_RTOL) fail_msg("%s: gradient of %s differs by %.3g", file, p->name, e);
        if (e > worst) worst = e;
    }
    print_message("%s: LoRA gradients kept vs fp32 base: worst relative max-abs %.2e\n", file, worst);
    free(Ga);
    free(Gb);
    dpoc_model_free(&full);
    dpoc_model_free(&kept);
}

static void test_smollm2_q4_1(void **state) {
    (void)state;
    check_model("DPOC_MODEL_GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf", "");
}

static void test_qwen_q4_k_m(void **state) {
    (void)state;
    check_model("DPOC_QWEN_GGUF", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", " --model qwen2.5-coder-0.5b");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smollm2_q4_1),
        cmocka_unit_test(test_qwen_q4_k_m),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
