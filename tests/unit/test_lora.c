/* Unit tests of LoRA adapters (src/model/lora.c, linear_forward/backward with an
 * adapter in src/model/layers.c).
 *
 * References written here, independent of dpoc's code path:
 * - the adapted layer equals a plain layer whose weight is merged in double,
 *   W + scale * B A (peft's merge), and its gradients are the closed forms
 *   dB = scale g^T (x A^T), dA = scale (g B)^T x, dx = g (W + scale B A),
 *   evaluated in double;
 * - target selection as peft's check_target_module_exists defines it (a list
 *   entry equal to the module name or ending it after "."; a string a full
 *   regex match; "all-linear" every linear layer but the output layer);
 * - attaching to the tiny fixture models: B = 0 at init leaves every log-prob
 *   bit for bit as the base model's (the adapter adds exactly 0), adapters off
 *   give the base model, the trainable block has sum r (in + out) values.
 * The whole TRL + peft comparison (losses, gradients, training) is in
 * test_lora_trl.c against tools/make_lora_fixtures.py's fixtures. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#include "dpoc/flops.h"
#include "dpoc/layers.h"
#include "dpoc/lora.h"
#include "dpoc/model.h"
#include "dpoc/source.h"

enum { T_ = 5, IN_ = 12, OUT_ = 7, R_ = 3 };
#define SCALE 2.5f
#define FWD_RTOL 1e-5  /* fp32 vs the double formula, relative max-abs */
#define GRAD_RTOL 1e-5 /* fp32 GEMMs vs the double closed forms, relative max-abs */
#define REL_FLOOR 1e-6

static float *frand(rng_t *r, size_t n, float lo, float hi) {
    float *a = malloc((n ? n : 1) * sizeof *a);
    assert_non_null(a);
    for (size_t i = 0; i < n; i++) a[i] = rng_uniform(r, lo, hi);
    return a;
}

/* merged (out,in) = W + scale * B A, in double */
static double *merged(const float *W, const float *A, const float *B, double scale) {
    double *M = malloc(OUT_ * IN_ * sizeof *M);
    assert_non_null(M);
    for (size_t o = 0; o < OUT_; o++)
        for (size_t i = 0; i < IN_; i++) {
            double s = 0;
            for (size_t k = 0; k < R_; k++) s += (double)B[o * R_ + k] * A[k * IN_ + i];
            M[o * IN_ + i] = W[o * IN_ + i] + scale * s;
        }
    return M;
}

static double rel_err_d(const float *a, const double *b, size_t n) {
    double md = 0, mb = REL_FLOOR;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - b[i]));
        mb = fmax(mb, fabs(b[i]));
    }
    return md / mb;
}

/* A parameter block [W | bias | A | B] and a linear view over it with an adapter. */
typedef struct {
    float *P;
    dpoc_linear L;
    size_t oW, ob, oA, oB, n;
} adapted;

static adapted make_adapted(rng_t *r, int with_bias) {
    adapted a;
    a.oW = 0, a.ob = OUT_ * IN_, a.oA = a.ob + OUT_, a.oB = a.oA + R_ * IN_, a.n = a.oB + OUT_ * R_;
    a.P = frand(r, a.n, -0.5f, 0.5f);
    a.L = (dpoc_linear){.in = IN_, .out = OUT_, .wtype = DPOC_DT_F32, .w = a.P + a.oW,
                        .bias = with_bias ? a.P + a.ob : NULL, .gw = a.oW, .gb = with_bias ? a.ob : DPOC_NO_PARAM};
    a.L.lora = (dpoc_adapter){R_, SCALE, a.P + a.oA, a.P + a.oB, a.oA, a.oB, 1};
    return a;
}

static void test_adapted_forward(void **state) {
    (void)state;
    rng_t r = {11};
    adapted a = make_adapted(&r, 1);
    float *x = frand(&r, T_ * IN_, -1, 1), *y = malloc(T_ * OUT_ * sizeof *y);
    float *ws = malloc(linear_workspace(&a.L, T_) * sizeof *ws);
    assert_int_equal(linear_workspace(&a.L, T_), 2 * T_ * R_);
    linear_forward(&a.L, y, x, T_, ws);
    double *M = merged(a.P + a.oW, a.P + a.oA, a.P + a.oB, SCALE), ref[T_ * OUT_];
    for (size_t t = 0; t < T_; t++)
        for (size_t o = 0; o < OUT_; o++) {
            double s = a.P[a.ob + o];
            for (size_t i = 0; i < IN_; i++) s += M[o * IN_ + i] * x[t * IN_ + i];
            ref[t * OUT_ + o] = s;
        }
    assert_true(rel_err_d(y, ref, T_ * OUT_) < FWD_RTOL);
    /* off: the base layer alone, bit for bit what the plain product gives */
    float *y0 = malloc(T_ * OUT_ * sizeof *y0), *yb = malloc(T_ * OUT_ * sizeof *yb);
    a.L.lora.on = 0;
    assert_int_equal(linear_workspace(&a.L, T_), 0);
    linear_forward(&a.L, y0, x, T_, NULL);
    matmul_forward(yb, x, a.P + a.oW, a.P + a.ob, T_, IN_, OUT_);
    assert_memory_equal(y0, yb, T_ * OUT_ * sizeof *y0);
    free(M), free(x), free(y), free(ws), free(y0), free(yb), free(a.P);
}

/* Gradients of the adapted layer against the closed forms in double, with the
 * base frozen (as LoRA trains it) and then trainable too. */
static void check_backward(int base_trainable) {
    rng_t r = {23};
    adapted a = make_adapted(&r, 1);
    if (!base_trainable) a.L.gw = a.L.gb = DPOC_NO_PARAM;
    float *x = frand(&r, T_ * IN_, -1, 1), *g = frand(&r, T_ * OUT_, -1, 1);
    float *G = calloc(a.n, sizeof *G), *dx = calloc(T_ * IN_, sizeof *dx);
    float *ws = malloc(linear_workspace(&a.L, T_) * sizeof *ws);
    linear_backward(&a.L, G, dx, g, x, T_, ws);
    const float *W = a.P + a.oW, *A = a.P + a.oA, *B = a.P + a.oB;
    double dA[R_ * IN_] = {0}, dB[OUT_ * R_] = {0}, dX[T_ * IN_] = {0}, dW[OUT_ * IN_] = {0}, db[OUT_] = {0};
    double *M = merged(W, A, B, SCALE);
    for (size_t t = 0; t < T_; t++) {
        double xa[R_] = {0}, gb[R_] = {0};
        for (size_t k = 0; k < R_; k++)
            for (size_t i = 0; i < IN_; i++) xa[k] += (double)A[k * IN_ + i] * x[t * IN_ + i];
        for (size_t k = 0; k < R_; k++)
            for (size_t o = 0; o < OUT_; o++) gb[k] += (double)g[t * OUT_ + o] * B[o * R_ + k];
        for (size_t o = 0; o < OUT_; o++)
            for (size_t k = 0; k < R_; k++) dB[o * R_ + k] += SCALE * g[t * OUT_ + o] * xa[k];
        for (size_t k = 0; k < R_; k++)
            for (size_t i = 0; i < IN_; i++) dA[k * IN_ + i] += SCALE * gb[k] * x[t * IN_ + i];
        for (size_t i = 0; i < IN_; i++)
            for (size_t o = 0; o < OUT_; o++) dX[t * IN_ + i] += (double)g[t * OUT_ + o] * M[o * IN_ + i];
        for (size_t o = 0; o < OUT_; o++) {
            db[o] += g[t * OUT_ + o];
            for (size_t i = 0; i < IN_; i++) dW[o * IN_ + i] += (double)g[t * OUT_ + o] * x[t * IN_ + i];
        }
    }
    assert_true(rel_err_d(G + a.oA, dA, R_ * IN_) < GRAD_RTOL);
    assert_true(rel_err_d(G + a.oB, dB, OUT_ * R_) < GRAD_RTOL);
    assert_true(rel_err_d(dx, dX, T_ * IN_) < GRAD_RTOL);
    if (base_trainable) {
        assert_true(rel_err_d(G + a.oW, dW, OUT_ * IN_) < GRAD_RTOL);
        assert_true(rel_err_d(G + a.ob, db, OUT_) < GRAD_RTOL);
    } else {
        for (size_t i = 0; i < a.oA; i++) assert_true(G[i] == 0.0f); /* frozen: never written */
    }
    free(M), free(x), free(g), free(G), free(dx), free(ws), free(a.P);
}

static void test_adapted_backward_frozen_base(void **state) {
    (void)state;
    check_backward(0);
}

static void test_adapted_backward_trainable_base(void **state) {
    (void)state;
    check_backward(1);
}

/* ---- target selection ---- */

static dpoc_lora_cfg lora_cfg(void) {
    dpoc_config c;
    dpoc_config_defaults(&c);
    return c.lora;
}

static void set_targets(dpoc_lora_cfg *L, const char *json) {
    dpoc_config c;
    dpoc_config_defaults(&c);
    char buf[512];
    snprintf(buf, sizeof buf, "{\"lora_target_modules\": %s}", json);
    dpoc_err err;
    if (dpoc_config_apply_json(&c, buf, "test", &err)) fail_msg("%s", err.msg);
    *L = c.lora;
}

static void test_target_names(void **state) {
    (void)state;
    dpoc_lora_cfg L = lora_cfg(); /* peft's default for llama / qwen2: q_proj, v_proj */
    assert_true(dpoc_lora_is_target(&L, "model.layers.0.self_attn.q_proj", NULL));
    assert_true(dpoc_lora_is_target(&L, "model.layers.10.self_attn.v_proj", NULL));
    assert_false(dpoc_lora_is_target(&L, "model.layers.0.self_attn.k_proj", NULL));
    set_targets(&L, "[\"self_attn.o_proj\", \"layers.1.mlp.up_proj\"]");
    assert_true(dpoc_lora_is_target(&L, "model.layers.4.self_attn.o_proj", NULL));
    assert_true(dpoc_lora_is_target(&L, "model.layers.1.mlp.up_proj", NULL));
    assert_false(dpoc_lora_is_target(&L, "model.layers.11.mlp.up_proj", NULL)); /* "layers.11" does not end in ".layers.1..." */
    set_targets(&L, "[\"proj\"]"); /* a suffix that is not after a "." matches nothing */
    assert_false(dpoc_lora_is_target(&L, "model.layers.0.self_attn.q_proj", NULL));
    set_targets(&L, "\"all-linear\"");
    assert_true(dpoc_lora_is_target(&L, "model.layers.0.mlp.down_proj", NULL));
}

/* ---- attaching to the tiny fixture models ---- */

static void load(dpoc_model *m, const char *name) {
    dpoc_err err;
    if (dpoc_source_load_model(m, fixture_path(name), &err)) fail_msg("%s: %s", name, err.msg);
}

/* Log-probs of one sequence's rows 0..T-2 under m. */
static void logps(const dpoc_model *m, const int32_t *tok, size_t T, float *out) {
    dpoc_acts a;
    dpoc_err err;
    if (dpoc_acts_alloc(&a, &m->cfg, T, &err)) fail_msg("%s", err.msg);
    dpoc_model_forward(m, &a, tok, T, 0, T - 1);
    memcpy(out, a.logp, (T - 1) * sizeof *out);
    dpoc_acts_free(&a);
}

static void check_attach(const char *model, const char *targets, size_t per_layer_expected) {
    dpoc_model m;
    load(&m, model);
    enum { T = 9 };
    const int32_t tok[T] = {1, 5, 9, 3, 17, 2, 8, 4, 6};
    float base[T - 1], with[T - 1], off[T - 1];
    logps(&m, tok, T, base);
    const size_t base_numel = m.numel, n_base_tensors = m.n_tensors;
    dpoc_lora_cfg L = lora_cfg();
    set_targets(&L, targets);
    L.r = 4;
    L.alpha = 16;
    dpoc_err err;
    if (dpoc_lora_attach(&m, &L, 42, &err)) fail_msg("%s", err.msg);
    assert_true(dpoc_lora_attached(&m));
    assert_int_equal(m.frozen_numel, base_numel);
    assert_int_equal(m.n_tensors, n_base_tensors + 2 * per_layer_expected * m.cfg.n_layers);
    size_t expect = 0;
    for (size_t i = n_base_tensors; i < m.n_tensors; i++) {
        assert_true(m.info[i].trainable);
        assert_int_equal(m.info[i].offset, expect); /* adapters back to back, in table order */
        expect += m.info[i].numel;
    }
    for (size_t i = 0; i < n_base_tensors; i++) assert_false(m.info[i].trainable);
    assert_int_equal(m.numel, expect);
    assert_true(strncmp(m.info[n_base_tensors].name, "model.layers.0.", 15) == 0);
    assert_non_null(strstr(m.info[n_base_tensors].name, ".lora_A.weight"));
    /* B = 0: the adapter adds exactly zero */
    logps(&m, tok, T, with);
    assert_memory_equal(base, with, sizeof base);
    /* a nonzero B changes the model; switched off it is the base again */
    for (size_t i = n_base_tensors; i < m.n_tensors; i++)
        if (strstr(m.info[i].name, "lora_B"))
            for (size_t j = 0; j < m.info[i].numel; j++) m.params[m.info[i].offset + j] = 0.05f;
    logps(&m, tok, T, with);
    assert_memory_not_equal(base, with, sizeof base);
    dpoc_lora_enable(&m, 0);
    logps(&m, tok, T, off);
    assert_memory_equal(base, off, sizeof base);
    dpoc_model_free(&m);
}

static void test_attach_llama_qv(void **state) {
    (void)state;
    check_attach("tiny-llama", "[\"q_proj\", \"v_proj\"]", 2);
}

static void test_attach_qwen2_all_linear(void **state) {
    (void)state;
    check_attach("tiny-qwen2", "\"all-linear\"", 7);
}

static void test_attach_regex(void **state) {
    (void)state;
    check_attach("tiny-llama", "\"model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.(gate|up)_proj\"", 2);
}

static void test_attach_errors(void **state) {
    (void)state;
    dpoc_model m;
    load(&m, "tiny-llama");
    const size_t numel = m.numel;
    dpoc_lora_cfg L = lora_cfg();
    dpoc_err err;
    set_targets(&L, "[\"q_proj\", \"qproj\"]");
    assert_int_equal(dpoc_lora_attach(&m, &L, 1, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "lora_target_modules"));
    assert_non_null(strstr(err.msg, "'qproj'"));
    set_targets(&L, "[\"lm_head\"]");
    assert_int_equal(dpoc_lora_attach(&m, &L, 1, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "LM head"));
    set_targets(&L, "\"model.(layers\"");
    assert_int_equal(dpoc_lora_attach(&m, &L, 1, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "not a regular expression"));
    set_targets(&L, "\"nothing.*here\"");
    assert_int_equal(dpoc_lora_attach(&m, &L, 1, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "no projection"));
    /* nothing changed: every parameter still trains */
    assert_false(dpoc_lora_attached(&m));
    assert_int_equal(m.numel, numel);
    dpoc_model_free(&m);
}

/* The FLOPs a LoRA step needs: the frozen projections and head forward and dX only
 * (2x), attention and the adapters 3x; written out here from the shapes. */
static void test_flops(void **state) {
    (void)state;
    dpoc_model m;
    load(&m, "tiny-qwen2");
    const dpoc_model_config *c = &m.cfg;
    const size_t rows = 10, pairs = 55, head = 9, r = 4;
    const dpoc_fwd_flops base = dpoc_flops_forward_parts(&m, rows, pairs, head);
    assert_true(base.adapter == 0.0);
    const double attn = (double)c->n_layers * (double)pairs * 4.0 * (double)(c->head_dim * c->n_heads);
    assert_close(base.attn, attn, 1e-12, 0, "attention FLOPs");
    assert_close(dpoc_flops_train(&base, 0), 3.0 * base.total, 1e-12, 0, "full fine-tune");
    dpoc_lora_cfg L = lora_cfg();
    set_targets(&L, "\"all-linear\"");
    L.r = r;
    dpoc_err err;
    if (dpoc_lora_attach(&m, &L, 1, &err)) fail_msg("%s", err.msg);
    const dpoc_fwd_flops f = dpoc_flops_forward_parts(&m, rows, pairs, head);
    const double C = (double)c->hidden_size, F = (double)c->intermediate_size;
    const double QD = (double)(c->n_heads * c->head_dim), KD = (double)(c->n_kv_heads * c->head_dim);
    /* in + out of q, k, v, o, gate, up, down */
    const double io = (C + QD) + 2 * (C + KD) + (QD + C) + 3 * (C + F);
    assert_close(f.adapter, (double)c->n_layers * 2.0 * (double)rows * (double)r * io, 1e-12, 0, "adapter FLOPs");
    assert_close(dpoc_flops_train(&f, 1), 2.0 * (f.total - f.attn) + 3.0 * (f.attn + f.adapter), 1e-12, 0, "LoRA step");
    dpoc_model_free(&m);
}

/* ---- config keys ---- */

static void expect_config_error(const char *json, const char *needle) {
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    assert_int_equal(dpoc_config_apply_json(&c, json, "test.json", &err), DPOC_EINPUT);
    if (!strstr(err.msg, needle)) fail_msg("'%s': message '%s' lacks '%s'", json, err.msg, needle);
}

static void test_config_keys(void **state) {
    (void)state;
    dpoc_config c;
    dpoc_config_defaults(&c);
    assert_int_equal(c.lora.r, 8); /* peft's LoraConfig defaults */
    assert_true(c.lora.alpha == 8.0);
    assert_int_equal(c.lora.init, DPOC_LORA_INIT_DEFAULT);
    dpoc_err err;
    const char *j = "{\"use_peft\": true, \"lora_r\": 16, \"lora_alpha\": 32, \"use_rslora\": true,"
                    " \"init_lora_weights\": \"gaussian\", \"lora_target_modules\": \"all-linear\","
                    " \"lora_bias\": \"none\", \"lora_task_type\": \"CAUSAL_LM\", \"use_dora\": false}";
    if (dpoc_config_apply_json(&c, j, "test.json", &err)) fail_msg("%s", err.msg);
    assert_true(c.lora.use_peft && c.lora.use_rslora);
    assert_int_equal(c.lora.r, 16);
    assert_int_equal(c.lora.init, DPOC_LORA_INIT_GAUSSIAN);
    assert_int_equal(c.lora.targets_kind, DPOC_LORA_TARGETS_ALL_LINEAR);
    expect_config_error("{\"lora_r\": 0}", "'lora_r'");
    expect_config_error("{\"lora_alpha\": 0}", "'lora_alpha'");
    expect_config_error("{\"lora_target_modules\": []}", "'lora_target_modules'");
    expect_config_error("{\"lora_target_modules\": [1]}", "'lora_target_modules'");
    expect_config_error("{\"init_lora_weights\": \"pissa\"}", "'init_lora_weights'");
    expect_config_error("{\"lora_bias\": \"all\"}", "'lora_bias'");
    expect_config_error("{\"use_dora\": true}", "'use_dora'");
    expect_config_error("{\"lora_modules_to_save\": [\"embed_tokens\"]}", "'lora_modules_to_save'");
    expect_config_error("{\"base_weights_dtype\": \"bf16\"}", "'base_weights_dtype'");
    /* an adapter to continue implies use_peft */
    dpoc_config_defaults(&c);
    if (dpoc_config_apply_json(&c, "{\"model_name_or_path\": \"m\", \"train_file\": \"t\", \"adapter_name_or_path\": \"a\"}",
                               "test.json", &err) || dpoc_config_finalize(&c, &err))
        fail_msg("%s", err.msg);
    assert_true(c.lora.use_peft);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adapted_forward),
        cmocka_unit_test(test_adapted_backward_frozen_base),
        cmocka_unit_test(test_adapted_backward_trainable_base),
        cmocka_unit_test(test_target_names),
        cmocka_unit_test(test_attach_llama_qv),
        cmocka_unit_test(test_attach_qwen2_all_linear),
        cmocka_unit_test(test_attach_regex),
        cmocka_unit_test(test_attach_errors),
        cmocka_unit_test(test_flops),
        cmocka_unit_test(test_config_keys),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
