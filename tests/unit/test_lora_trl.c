/* LoRA against TRL 1.16 + peft 0.21.2 (tests/fixtures/lora/, written by
 * tools/make_lora_fixtures.py; tests/fixtures/README.md describes every field).
 *
 * Per case (tiny Llama / Qwen2; all-linear and q/v; rsLoRA once; B = 0 once):
 * the base fixture model with the case's initial adapter (adapter-init/, peft's
 * own files, loaded by dpoc_lora_load_peft) must give
 * - every completion token's log-prob of batch.json's 8 sequences with the
 *   adapter on (TRL's policy) and off (TRL's reference: disable_adapter());
 * - d loss / d every adapter tensor (grads-step1.safetensors, peft's keys) when
 *   the per-token loss gradients TRL recorded are run backward, the base frozen;
 * - the policy's log-probs from the merged model (W + scale B A);
 * and the adapter written back by dpoc_lora_save_peft reads back the same. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "testutil.h"

#include "dpoc/gguf.h"
#include "dpoc/lora.h"
#include "dpoc/checkpoint.h"
#include "dpoc/metrics.h"
#include "dpoc/trainer.h"
#include "dpoc/model.h"
#include "dpoc/safetensors.h"
#include "dpoc/source.h"

#define LOGP_RTOL 1e-5 /* per-token log-prob, relative, as the full-model fixtures */
#define LOGP_ATOL 1e-6
#define GRAD_RTOL 1e-4 /* adapter gradients at step 1, relative max-abs */
#define REL_FLOOR 1e-8
#define WEIGHT_RTOL 1e-5 /* adapter weights after 3 steps, relative max-abs */
/* A tensor that starts at zero (B with init_lora_weights true) is, after the
 * steps, nothing but AdamW updates m/(sqrt(v)+eps), each ~lr whatever the size of
 * its gradient: its relative error is the per-element relative error of its
 * gradients, which for the small components of a tensor is ~max|g|/|g| times the
 * fp32 summation-order noise (measured: 0.7-2.2e-5 on qwen2-qv-default-init,
 * where every A tensor, starting nonzero, agrees to 3e-7). A tensor that starts
 * nonzero keeps WEIGHT_RTOL. */
#define ZERO_START_WEIGHT_RTOL 1e-4
#define METRIC_RTOL 1e-4 /* every logged metric */
#define METRIC_ATOL 1e-6

static const char *const CASES[] = {"llama-all", "llama-qv-rslora", "qwen2-all", "qwen2-qv-default-init"};
#define N_CASES (sizeof CASES / sizeof CASES[0])

typedef struct {
    cJSON *batch;
    dpoc_model m;
    dpoc_lora_cfg cfg;
} lcase;

static void open_case(lcase *c, const char *name) {
    char rel[256];
    snprintf(rel, sizeof rel, "lora/%s/batch.json", name);
    c->batch = load_json_fixture(rel);
    const cJSON *lora = cJSON_GetObjectItem(c->batch, "lora");
    const char *model = cJSON_GetObjectItem(lora, "model")->valuestring; /* "tiny-llama/" */
    dpoc_err err;
    if (dpoc_source_load_model(&c->m, fixture_path(model), &err)) fail_msg("%s: %s", model, err.msg);
    snprintf(rel, sizeof rel, "lora/%s/adapter-init", name);
    if (dpoc_lora_load_peft(&c->m, fixture_path(rel), &c->cfg, &err)) fail_msg("%s: %s", rel, err.msg);
    /* the scale peft computed */
    const double scaling = cJSON_GetObjectItem(lora, "scaling")->valuedouble;
    assert_close(c->cfg.use_rslora ? c->cfg.alpha / sqrt((double)c->cfg.r) : c->cfg.alpha / (double)c->cfg.r, scaling,
                 1e-12, 0, "%s scaling", name);
    assert_int_equal(c->m.numel, (size_t)cJSON_GetObjectItem(lora, "trainable_parameters")->valuedouble);
}

static void close_case(lcase *c) {
    cJSON_Delete(c->batch);
    dpoc_model_free(&c->m);
}

/* Row s of batch.json: its tokens, length (attention mask) and completion span
 * [c0, c0 + nc): the scored rows are c0 - 1 .. c0 + nc - 2. */
typedef struct {
    int32_t tok[64];
    size_t T, c0, nc;
} seq;

static seq get_seq(const cJSON *batch, size_t s) {
    seq q;
    memset(&q, 0, sizeof q);
    const cJSON *ids = cJSON_GetArrayItem(cJSON_GetObjectItem(batch, "input_ids"), (int)s);
    const cJSON *am = cJSON_GetArrayItem(cJSON_GetObjectItem(batch, "attention_mask"), (int)s);
    const cJSON *cm = cJSON_GetArrayItem(cJSON_GetObjectItem(batch, "completion_mask"), (int)s);
    const size_t n = (size_t)cJSON_GetArraySize(ids);
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++) {
        if (cJSON_GetArrayItem(am, (int)i)->valueint) q.tok[q.T++] = cJSON_GetArrayItem(ids, (int)i)->valueint;
        if (cJSON_GetArrayItem(cm, (int)i)->valueint) {
            if (!q.nc) q.c0 = i;
            q.nc++;
        }
    }
    assert_true(q.c0 >= 1 && q.c0 + q.nc <= q.T);
    return q;
}

/* want: batch[field][chosen|rejected][i] for sequence s (0..3 chosen, 4..7 rejected). */
static const cJSON *per_token(const cJSON *batch, const char *field, size_t s) {
    const cJSON *f = cJSON_GetObjectItem(batch, field);
    return cJSON_GetArrayItem(cJSON_GetObjectItem(f, s < 4 ? "chosen" : "rejected"), (int)(s % 4));
}

static void check_logps(const lcase *c, dpoc_acts *a, const char *field, const char *name) {
    for (size_t s = 0; s < 8; s++) {
        seq q = get_seq(c->batch, s);
        dpoc_model_forward(&c->m, a, q.tok, q.T, q.c0 - 1, q.nc);
        const cJSON *want = per_token(c->batch, field, s);
        assert_int_equal((size_t)cJSON_GetArraySize(want), q.nc);
        for (size_t r = 0; r < q.nc; r++)
            assert_close(a->logp[r], cJSON_GetArrayItem(want, (int)r)->valuedouble, LOGP_RTOL, LOGP_ATOL,
                         "%s %s seq %zu token %zu", name, field, s, r);
    }
}

static void test_logps(void **state) {
    (void)state;
    for (size_t k = 0; k < N_CASES; k++) {
        lcase c;
        open_case(&c, CASES[k]);
        dpoc_acts a;
        dpoc_err err;
        if (dpoc_acts_alloc(&a, &c.m.cfg, 64, &err)) fail_msg("%s", err.msg);
        check_logps(&c, &a, "policy_token_logps", CASES[k]);
        dpoc_lora_enable(&c.m, 0);
        check_logps(&c, &a, "ref_token_logps", CASES[k]);
        dpoc_acts_free(&a);
        close_case(&c);
    }
}

/* 1 when the tensor key of the peft adapter file rel is all zeros. */
static int starts_at_zero(const char *rel, const char *key) {
    st_model st;
    dpoc_err err;
    if (st_open_file(&st, fixture_path(rel), &err)) fail_msg("%s", err.msg);
    const st_tensor *t = st_find(&st, key);
    if (!t) fail_msg("%s: no '%s'", rel, key);
    float *v = malloc(t->numel * sizeof *v);
    if (st_read_f32(t, v, t->ndim, t->shape, &err)) fail_msg("%s", err.msg);
    int zero = 1;
    for (size_t i = 0; i < t->numel; i++) zero &= v[i] == 0.0f;
    free(v);
    st_close(&st);
    return zero;
}

/* The trainable tensors of block (m's layout: its adapters, or their gradients)
 * against every tensor of the peft-keyed file rel, relative max-abs within tol;
 * init_rel (may be NULL): the adapter the values started from, whose all-zero
 * tensors are held to ZERO_START_WEIGHT_RTOL instead. */
static void compare_trainable(const dpoc_model *m, const float *block, const char *rel, const char *init_rel,
                              double tol, const char *what) {
    st_model st;
    dpoc_err err;
    if (st_open_file(&st, fixture_path(rel), &err)) fail_msg("%s", err.msg);
    size_t compared = 0;
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        if (!p->trainable) continue;
        char key[256];
        snprintf(key, sizeof key, "%s%s", DPOC_PEFT_KEY_PREFIX, p->name);
        const st_tensor *t = st_find(&st, key);
        if (!t) fail_msg("%s: no '%s'", rel, key);
        float *want = malloc(p->numel * sizeof *want);
        if (st_read_f32(t, want, p->ndim, p->shape, &err)) fail_msg("%s", err.msg);
        const double e = rel_maxabs_err(block + p->offset, want, p->numel, REL_FLOOR);
        const double limit = init_rel && starts_at_zero(init_rel, key) ? ZERO_START_WEIGHT_RTOL : tol;
        if (e > limit) fail_msg("%s: %s relative error %.3g (limit %.0e)", what, key, e, limit);
        free(want);
        compared++;
    }
    assert_int_equal(compared, st.n_tensors);
    st_close(&st);
}

/* Every adapter gradient against grads-step1.safetensors. */
static void compare_grads(const lcase *c, const float *G, const char *name) {
    char rel[256];
    snprintf(rel, sizeof rel, "lora/%s/grads-step1.safetensors", name);
    compare_trainable(&c->m, G, rel, NULL, GRAD_RTOL, name);
}

static void test_grads(void **state) {
    (void)state;
    for (size_t k = 0; k < N_CASES; k++) {
        lcase c;
        open_case(&c, CASES[k]);
        dpoc_acts a;
        dpoc_grad_scratch sc;
        dpoc_err err;
        if (dpoc_acts_alloc(&a, &c.m.cfg, 64, &err) || dpoc_grad_scratch_alloc(&sc, &c.m.cfg, 64, &err))
            fail_msg("%s", err.msg);
        float *G = calloc(c.m.numel, sizeof *G);
        for (size_t s = 0; s < 8; s++) {
            seq q = get_seq(c.batch, s);
            const cJSON *dl = per_token(c.batch, "dloss_dtoken_logps", s);
            float dlogp[64];
            for (size_t r = 0; r < q.nc; r++) dlogp[r] = (float)cJSON_GetArrayItem(dl, (int)r)->valuedouble;
            dpoc_model_forward(&c.m, &a, q.tok, q.T, q.c0 - 1, q.nc);
            dpoc_model_backward(&c.m, G, &a, &sc, q.tok, dlogp, NULL);
        }
        compare_grads(&c, G, CASES[k]);
        free(G);
        dpoc_grad_scratch_free(&sc);
        dpoc_acts_free(&a);
        close_case(&c);
    }
}

/* The merged model (peft's merge_and_unload) gives the policy's log-probs. */
static void test_merge(void **state) {
    (void)state;
    for (size_t k = 0; k < N_CASES; k++) {
        lcase c;
        open_case(&c, CASES[k]);
        lcase merged = c;
        dpoc_err err;
        if (dpoc_lora_merge(&c.m, &merged.m, &err)) fail_msg("%s", err.msg);
        assert_false(dpoc_lora_attached(&merged.m));
        assert_int_equal(merged.m.numel, c.m.frozen_numel);
        dpoc_acts a;
        if (dpoc_acts_alloc(&a, &merged.m.cfg, 64, &err)) fail_msg("%s", err.msg);
        check_logps(&merged, &a, "policy_token_logps", CASES[k]);
        dpoc_acts_free(&a);
        dpoc_model_free(&merged.m);
        close_case(&c);
    }
}

/* dpoc_lora_save_peft writes what dpoc_lora_load_peft reads back, bit for bit. */
static void test_save_roundtrip(void **state) {
    (void)state;
    lcase c;
    open_case(&c, "llama-qv-rslora");
    const char *dir = make_temp_dir();
    dpoc_err err;
    if (dpoc_lora_save_peft(&c.m, &c.cfg, "tests/fixtures/tiny-llama", dir, &err)) fail_msg("%s", err.msg);
    dpoc_model m2;
    if (dpoc_source_load_model(&m2, fixture_path("tiny-llama"), &err)) fail_msg("%s", err.msg);
    dpoc_lora_cfg cfg2;
    if (dpoc_lora_load_peft(&m2, dir, &cfg2, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m2.numel, c.m.numel);
    assert_memory_equal(m2.params, c.m.params, c.m.numel * sizeof(float));
    assert_int_equal(cfg2.r, c.cfg.r);
    assert_true(cfg2.alpha == c.cfg.alpha && cfg2.use_rslora == c.cfg.use_rslora);
    assert_int_equal(cfg2.n_targets, 2); /* q_proj, v_proj in every layer: the short names */
    assert_string_equal(cfg2.targets[0], "q_proj");
    dpoc_model_free(&m2);
    close_case(&c);
}

/* metrics.jsonl of the run against train3.json's log_history, every number TRL logged. */
static void compare_history(const char *name, const char *metrics_path) {
    char rel[256];
    snprintf(rel, sizeof rel, "lora/%s/train3.json", name);
    compare_log_history_with(rel, metrics_path, 3, METRIC_RTOL, METRIC_RTOL, METRIC_ATOL, name);
}

/* DPOTrainer.train() with the peft config, 3 steps (accumulation 2, warm-up,
 * clipping), from the case's initial adapter: the adapter after step 3 and every
 * logged metric. shared: prompts computed once per pair; gc: gradient checkpointing. */
static void run_train3(const char *name, int shared, int gc) {
    char rel[256];
    snprintf(rel, sizeof rel, "lora/%s/batch.json", name);
    cJSON *batch = load_json_fixture(rel);
    const char *model = cJSON_GetObjectItem(cJSON_GetObjectItem(batch, "lora"), "model")->valuestring;
    char shipped[64];
    snprintf(shipped, sizeof shipped, "%.*s", (int)strcspn(model, "/"), model); /* configs/tiny-llama.json */
    cJSON_Delete(batch);
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, shipped); /* TRL's train3 settings, as the full fine-tune's */
    c.ref_model_name_or_path[0] = 0;  /* the reference: the base, adapter off */
    c.lora.use_peft = 1;
    snprintf(rel, sizeof rel, "lora/%s/adapter-init", name);
    snprintf(c.lora.adapter_name_or_path, sizeof c.lora.adapter_name_or_path, "%s", fixture_path(rel));
    c.shared_prefix = shared;
    c.gradient_checkpointing = gc;
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_true(t.ref_is_base);
    assert_null(t.ref.params); /* no second copy of the model */
    char metrics[DPOC_PATH_MAX + 32];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", c.output_dir);
    dpoc_metrics_writer mw;
    if (dpoc_metrics_open(&mw, c.output_dir, "{}", -1, &err)) fail_msg("%s", err.msg);
    mw.print = 0;
    t.on_log = dpoc_metrics_write;
    t.on_log_ctx = &mw;
    while (t.global_step < t.total_steps)
        if (dpoc_trainer_step(&t, &err)) fail_msg("%s", err.msg);
    dpoc_metrics_close(&mw);
    char what[128], init_rel[256];
    snprintf(rel, sizeof rel, "lora/%s/adapter-step3/adapter_model.safetensors", name);
    snprintf(init_rel, sizeof init_rel, "lora/%s/adapter-init/adapter_model.safetensors", name);
    snprintf(what, sizeof what, "%s adapter after 3 steps", name);
    compare_trainable(&t.policy, t.policy.params, rel, init_rel, WEIGHT_RTOL, what);
    compare_history(name, metrics);
    dpoc_trainer_free(&t);
}

static void test_train3(void **state) {
    (void)state;
    for (size_t k = 0; k < N_CASES; k++) run_train3(CASES[k], 1, 0);
}

/* The same training with one forward per sequence and with gradient checkpointing. */
static void test_train3_paths(void **state) {
    (void)state;
    run_train3("qwen2-all", 0, 0);
    run_train3("llama-all", 1, 1);
}

static int run_cmd(const char *cmd) {
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Log-probs of a fixed sequence under m, adapters as they are. */
static void seq_logps(const dpoc_model *m, float *out, size_t n_out) {
    static const int32_t tok[] = {1, 17, 42, 99, 7, 250, 3, 64, 128, 5};
    const size_t T = sizeof tok / sizeof tok[0];
    assert_true(n_out == T - 1);
    dpoc_acts a;
    dpoc_err err;
    if (dpoc_acts_alloc(&a, &m->cfg, T, &err)) fail_msg("%s", err.msg);
    dpoc_model_forward(m, &a, tok, T, 0, T - 1);
    memcpy(out, a.logp, (T - 1) * sizeof *out);
    dpoc_acts_free(&a);
}

/* dpoc train with use_peft, then dpoc export of its checkpoint three ways: the PEFT
 * directory equals the run's own, byte for byte; the checkpoint read back, the
 * PEFT directory on the base and the merged model give the same log-probs (merged:
 * within 1e-5); the llama.cpp GGUF holds every adapter with alpha. */
static void test_export_cli(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && '%s' train --config configs/tiny-llama.json --set ref_model_name_or_path= --set use_peft=true "
             "--set lora_r=4 --set lora_alpha=8 --set lora_target_modules=all-linear --set init_lora_weights=false "
             "--set use_rslora=true --set output_dir=%s/run > %s/log 2>&1 && "
             "'%s' export --checkpoint %s/run/checkpoint-3.h5 --out %s/peft >> %s/log 2>&1 && "
             "'%s' export --checkpoint %s/run/checkpoint-3.h5 --out %s/merged --merge >> %s/log 2>&1 && "
             "'%s' export --checkpoint %s/run/checkpoint-3.h5 --gguf-lora %s/adapter.gguf >> %s/log 2>&1",
             DPOC_SOURCE_DIR, DPOC_BIN, dir, dir, DPOC_BIN, dir, dir, dir, DPOC_BIN, dir, dir, dir, DPOC_BIN, dir, dir,
             dir);
    if (run_cmd(cmd) != 0) {
        char log[512];
        snprintf(log, sizeof log, "%s/log", dir);
        char *text = read_text_file(log, NULL);
        fail_msg("train/export failed:\n%s", text ? text : "(no log)");
    }
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/run/adapter_model.safetensors", dir);
    snprintf(b, sizeof b, "%s/peft/adapter_model.safetensors", dir);
    size_t na = 0, nb = 0;
    char *x = read_text_file(a, &na), *y = read_text_file(b, &nb);
    assert_true(x && y && na == nb && memcmp(x, y, na) == 0);
    free(x), free(y);
    dpoc_err err;
    dpoc_model from_ckpt, from_peft, merged;
    if (dpoc_source_load_model(&from_ckpt, fixture_path("tiny-llama"), &err)) fail_msg("%s", err.msg);
    snprintf(a, sizeof a, "%s/run/checkpoint-3.h5", dir);
    if (dpoc_ckpt_read_weights(a, &from_ckpt, &err)) fail_msg("%s", err.msg);
    assert_true(dpoc_lora_attached(&from_ckpt));
    if (dpoc_source_load_model(&from_peft, fixture_path("tiny-llama"), &err)) fail_msg("%s", err.msg);
    snprintf(a, sizeof a, "%s/peft", dir);
    if (dpoc_lora_load_peft(&from_peft, a, NULL, &err)) fail_msg("%s", err.msg);
    snprintf(a, sizeof a, "%s/merged", dir);
    if (dpoc_source_load_model(&merged, a, &err)) fail_msg("%s", err.msg);
    float l1[9], l2[9], l3[9];
    seq_logps(&from_ckpt, l1, 9);
    seq_logps(&from_peft, l2, 9);
    seq_logps(&merged, l3, 9);
    assert_memory_equal(l1, l2, sizeof l1);
    for (size_t i = 0; i < 9; i++) assert_close(l3[i], l1[i], LOGP_RTOL, LOGP_ATOL, "merged logp %zu", i);
    /* the adapter changed the model: the base gives other log-probs */
    dpoc_lora_enable(&from_ckpt, 0);
    seq_logps(&from_ckpt, l3, 9);
    assert_memory_not_equal(l1, l3, sizeof l1);
    dpoc_gguf *g = NULL;
    snprintf(a, sizeof a, "%s/adapter.gguf", dir);
    if (dpoc_gguf_open(&g, a, &err)) fail_msg("%s", err.msg);
    const char *type;
    float alpha;
    if (dpoc_gguf_get_str(g, "adapter.type", &type, &err) || dpoc_gguf_get_f32(g, "adapter.lora.alpha", &alpha, &err))
        fail_msg("%s", err.msg);
    assert_string_equal(type, "lora");
    assert_close(alpha, 8.0 * 2.0, 1e-6, 0, "alpha' = alpha sqrt(r) for rsLoRA"); /* r = 4 */
    assert_int_equal(dpoc_gguf_n_tensors(g), 2 * 7 * from_ckpt.cfg.n_layers);
    assert_non_null(dpoc_gguf_find_tensor(g, "blk.0.attn_q.weight.lora_a"));
    assert_non_null(dpoc_gguf_find_tensor(g, "blk.1.ffn_down.weight.lora_b"));
    dpoc_gguf_close(g);
    dpoc_model_free(&from_ckpt);
    dpoc_model_free(&from_peft);
    dpoc_model_free(&merged);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logps),
        cmocka_unit_test(test_grads),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_save_roundtrip),
        cmocka_unit_test(test_train3),
        cmocka_unit_test(test_train3_paths),
        cmocka_unit_test(test_export_cli),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
