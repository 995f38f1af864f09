/* dpoc against TRL: log-probs, every loss type and its gradient, metrics, the
 * full parameter gradient and three optimizer steps, for a tiny Llama (tied
 * head) and a tiny Qwen2 (q/k/v biases, untied head, sharded, BF16 reference).
 * Every expected value comes from tools/make_fixtures.py (TRL + transformers). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "dpoc/config.h"
#include "dpoc/loss.h"
#include "dpoc/metrics.h"
#include "dpoc/safetensors.h"
#include "dpoc/trainer.h"
#include "testutil.h"

/* Tolerances of the core issue: log-probs and losses 1e-5 relative, gradients
 * 1e-4 (max abs diff / max abs value), weights after 3 steps 1e-5, metrics 1e-4. */
#define TOL_LOGP 1e-5
#define TOL_LOSS 1e-5
#define TOL_GRAD 1e-4
#define TOL_WEIGHTS 1e-5
#define TOL_METRIC 1e-4
/* absolute floor for values that are ~0 (e.g. a margin at step 1) */
#define ATOL_TINY 1e-6

static const char *const MODELS[] = {"tiny-llama", "tiny-qwen2"};
#define N_MODELS 2
#define BATCH 4

static void base_config(dpoc_config *c, const char *model) {
    dpoc_config_defaults(c);
    snprintf(c->model_name_or_path, sizeof c->model_name_or_path, "%s", fixture_path(model));
    char ref[256];
    snprintf(ref, sizeof ref, "%s-ref", model);
    snprintf(c->ref_model_name_or_path, sizeof c->ref_model_name_or_path, "%s", fixture_path(ref));
    snprintf(c->train_file, sizeof c->train_file, "%s", fixture_path("pairs.jsonl"));
    c->max_length = 0;
    c->per_device_train_batch_size = BATCH;
    c->shuffle = 0;
    c->max_steps = 1;
    dpoc_err err;
    if (dpoc_config_finalize(c, &err)) fail_msg("%s", err.msg);
}

static cJSON *batch_json(const char *model) {
    char rel[256];
    snprintf(rel, sizeof rel, "%s/expected/batch.json", model);
    return load_json_fixture(rel);
}

/* The loss configuration of one fixture case, through the same parser users use. */
static void case_config(dpoc_config *c, const cJSON *cfg_json) {
    dpoc_err err;
    char *text = cJSON_PrintUnformatted(cfg_json);
    if (dpoc_config_apply_json(c, text, "case config", &err)) fail_msg("%s", err.msg);
    free(text);
    if (dpoc_config_finalize(c, &err)) fail_msg("%s", err.msg);
}

static void check_token_array(const float *got, const cJSON *want, size_t n, double tol, const char *what) {
    double *w;
    size_t m = json_doubles(want, &w);
    if (m != n) fail_msg("%s: %zu tokens, fixture has %zu", what, n, m);
    float *wf = malloc((n ? n : 1) * sizeof *wf);
    for (size_t i = 0; i < n; i++) wf[i] = (float)w[i];
    double e = rel_maxabs_err(got, wf, n, ATOL_TINY);
    if (e > tol) fail_msg("%s: relative max-abs error %.3g > %.1g", what, e, tol);
    free(w);
    free(wf);
}

/* Policy and reference per-token log-probs of the first batch. */
static void run_logps(const char *model) {
    dpoc_config c;
    base_config(&c, model);
    dpoc_err err;
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    cJSON *j = batch_json(model);
    const char *sides[2] = {"chosen", "rejected"};
    for (int side = 0; side < 2; side++) {
        for (size_t i = 0; i < BATCH; i++) {
            dpoc_seq seq;
            int32_t *ids = t.seq_buf;
            dpoc_dataset_collate(&t.data, i, side, c.max_length, 0, ids, &seq);
            const dpoc_model *models[2] = {&t.policy, &t.ref};
            const char *keys[2] = {"policy_token_logps", "ref_token_logps"};
            const char *seqkeys[2][2] = {{"policy_chosen_logps", "policy_rejected_logps"},
                                          {"ref_chosen_logps", "ref_rejected_logps"}};
            for (int mi = 0; mi < 2; mi++) {
                dpoc_model_forward(models[mi], &t.acts[0], ids, seq.T, seq.row0, seq.R);
                char what[128];
                snprintf(what, sizeof what, "%s %s %s pair %zu", model, keys[mi], sides[side], i);
                const cJSON *arr =
                    cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(j, keys[mi]), sides[side]), (int)i);
                check_token_array(t.acts[0].logp, arr, seq.R, TOL_LOGP, what);
                double sum = 0;
                for (size_t r = 0; r < seq.R; r++) sum += t.acts[0].logp[r];
                double want = cJSON_GetArrayItem(cJSON_GetObjectItem(j, seqkeys[mi][side]), (int)i)->valuedouble;
                assert_close(sum, want, TOL_LOGP, ATOL_TINY, "%s sequence log-prob", what);
            }
        }
    }
    cJSON_Delete(j);
    dpoc_trainer_free(&t);
}

/* The loss module alone, on TRL's own per-token log-probs: loss and dLoss/dtoken. */
static void run_loss_cases(const char *model) {
    cJSON *j = batch_json(model);
    const cJSON *pol = cJSON_GetObjectItem(j, "policy_token_logps");
    const cJSON *ref = cJSON_GetObjectItem(j, "ref_token_logps");
    const cJSON *cs;
    size_t n_cases = 0;
    cJSON_ArrayForEach(cs, cJSON_GetObjectItem(j, "cases")) {
        const char *name = cJSON_GetObjectItem(cs, "name")->valuestring;
        dpoc_config c;
        base_config(&c, model);
        case_config(&c, cJSON_GetObjectItem(cs, "config"));
        dpoc_loss_seq seqs[2 * BATCH];
        float *tok[2 * BATCH], *lss[2 * BATCH], *grad[2 * BATCH];
        for (size_t s = 0; s < 2 * BATCH; s++) {
            const char *side = s < BATCH ? "chosen" : "rejected";
            double *v;
            size_t n = json_doubles(cJSON_GetArrayItem(cJSON_GetObjectItem(pol, side), (int)(s % BATCH)), &v);
            tok[s] = malloc((n + 1) * sizeof(float));
            lss[s] = calloc(n + 1, sizeof(float)); /* WPO cases are checked end to end below */
            grad[s] = calloc(n + 1, sizeof(float));
            for (size_t i = 0; i < n; i++) tok[s][i] = (float)v[i];
            free(v);
            seqs[s].n_tok = n;
            seqs[s].n_completion = n; /* every completion token is a label here (no truncation) */
            seqs[s].policy_tok_logp = tok[s];
            seqs[s].log_sum_sq_probs = lss[s];
        }
        for (size_t s = 0; s < 2 * BATCH; s++) {
            size_t partner = s < BATCH ? s + BATCH : s - BATCH;
            size_t shared = seqs[s].n_tok < seqs[partner].n_tok ? seqs[s].n_tok : seqs[partner].n_tok;
            double *v;
            const char *side = s < BATCH ? "chosen" : "rejected";
            size_t n = json_doubles(cJSON_GetArrayItem(cJSON_GetObjectItem(ref, side), (int)(s % BATCH)), &v);
            float *vf = malloc((n + 1) * sizeof(float));
            for (size_t i = 0; i < n; i++) vf[i] = (float)v[i];
            seqs[s].ref_logp = dpoc_ld_logp(vf, n, shared, &c.loss);
            free(v);
            free(vf);
        }
        if (c.loss.use_weighting) { /* needs log_sum_sq_probs from the model: end-to-end test covers it */
            for (size_t s = 0; s < 2 * BATCH; s++) free(tok[s]), free(lss[s]), free(grad[s]);
            continue;
        }
        double lc[BATCH], lr[BATCH];
        dpoc_loss_out out = {0, lc, lr};
        dpoc_err err;
        if (dpoc_loss_compute(&c.loss, BATCH, seqs, seqs + BATCH, 1.0, grad, grad + BATCH, &out, &err))
            fail_msg("%s: %s", name, err.msg);
        assert_close(out.loss, cJSON_GetObjectItem(cs, "loss")->valuedouble, TOL_LOSS, ATOL_TINY, "%s %s loss",
                     model, name);
        const cJSON *dl = cJSON_GetObjectItem(cs, "dloss_dtoken_logps");
        for (size_t s = 0; s < 2 * BATCH; s++) {
            char what[128];
            snprintf(what, sizeof what, "%s %s dloss/dtoken %s %zu", model, name, s < BATCH ? "chosen" : "rejected",
                     s % BATCH);
            check_token_array(grad[s],
                              cJSON_GetArrayItem(cJSON_GetObjectItem(dl, s < BATCH ? "chosen" : "rejected"),
                                                 (int)(s % BATCH)),
                              seqs[s].n_tok, TOL_GRAD, what);
            free(tok[s]), free(lss[s]), free(grad[s]);
        }
        n_cases++;
    }
    assert_true(n_cases >= 20);
    cJSON_Delete(j);
}

static const char *const METRIC_NAMES[] = {
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
};

static double mb_metric(const dpoc_mb_metrics *m, size_t i) {
    const double v[] = {m->rewards_chosen, m->rewards_rejected, m->rewards_accuracies, m->rewards_margins,
                        m->logps_chosen, m->logps_rejected, m->logits_chosen, m->logits_rejected,
                        m->entropy, m->mean_token_accuracy};
    return v[i];
}

/* End to end through the trainer's micro-batch: loss and metrics of every case. */
static void run_case_metrics_with(const char *model, int shared) {
    cJSON *j = batch_json(model);
    const cJSON *cs;
    cJSON_ArrayForEach(cs, cJSON_GetObjectItem(j, "cases")) {
        const char *name = cJSON_GetObjectItem(cs, "name")->valuestring;
        dpoc_config c;
        base_config(&c, model);
        case_config(&c, cJSON_GetObjectItem(cs, "config"));
        c.shared_prefix = shared;
        dpoc_err err;
        dpoc_trainer t;
        if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
        assert_int_equal(t.shared, shared); /* every fixture pair keeps its whole prompt */
        size_t pairs[BATCH] = {0, 1, 2, 3};
        dpoc_mb_metrics mb;
        double sums[DPOC_MB_N];
        if (dpoc_trainer_micro_batch(&t, pairs, BATCH, 1.0, sums, 0, &err)) fail_msg("%s: %s", name, err.msg);
        dpoc_mb_metrics_from_sums(sums, &mb);
        assert_close(mb.loss, cJSON_GetObjectItem(cs, "loss")->valuedouble, TOL_LOSS, ATOL_TINY, "%s %s loss", model,
                     name);
        const cJSON *mj = cJSON_GetObjectItem(cs, "metrics");
        for (size_t i = 0; i < sizeof METRIC_NAMES / sizeof *METRIC_NAMES; i++) {
            const cJSON *w = cJSON_GetObjectItem(mj, METRIC_NAMES[i]);
            if (!w) fail_msg("fixture case %s lacks metric %s", name, METRIC_NAMES[i]);
            assert_close(mb_metric(&mb, i), w->valuedouble, TOL_METRIC, ATOL_TINY, "%s %s %s", model, name,
                         METRIC_NAMES[i]);
        }
        assert_close((double)mb.num_tokens, cJSON_GetObjectItem(mj, "num_tokens")->valuedouble, 0, 0,
                     "%s %s num_tokens", model, name);
        dpoc_trainer_free(&t);
    }
    cJSON_Delete(j);
}

static void compare_with_safetensors(const dpoc_model *m, const float *block, const char *rel, double tol,
                                     const char *what) {
    st_model st = {0};
    dpoc_err err;
    if (st_open_file(&st, fixture_path(rel), &err)) fail_msg("%s", err.msg);
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        const st_tensor *t = st_find(&st, p->name);
        if (!t) fail_msg("%s: %s lacks %s", what, rel, p->name);
        float *want = malloc(p->numel * sizeof(float));
        if (st_read_f32(t, want, p->ndim, p->shape, &err)) fail_msg("%s", err.msg);
        double e = rel_maxabs_err(block + p->offset, want, p->numel, 1e-12);
        if (e > tol) fail_msg("%s: %s relative max-abs error %.3g > %.1g", what, p->name, e, tol);
        free(want);
    }
    st_close(&st);
}

/* The gradient of every parameter for the sigmoid loss on the first batch. */
static void run_grads_with(const char *model, int shared, int gc) {
    dpoc_config c;
    base_config(&c, model);
    c.shared_prefix = shared;
    c.gradient_checkpointing = gc;
    dpoc_err err;
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(t.shared, shared);
    size_t pairs[BATCH] = {0, 1, 2, 3};
    double sums[DPOC_MB_N];
    memset(t.grads, 0, t.policy.numel * sizeof(float));
    if (dpoc_trainer_micro_batch(&t, pairs, BATCH, 1.0, sums, 0, &err)) fail_msg("%s", err.msg);
    char rel[256], what[128];
    snprintf(rel, sizeof rel, "%s/expected/grads-sigmoid.safetensors", model);
    snprintf(what, sizeof what, "%s gradient", model);
    compare_with_safetensors(&t.policy, t.grads, rel, TOL_GRAD, what);
    dpoc_trainer_free(&t);
}

/* With the reference equal to the policy, the step-1 sigmoid loss is ln 2. */
static void run_ln2(const char *model) {
    dpoc_config c;
    base_config(&c, model);
    c.ref_model_name_or_path[0] = '\0';
    dpoc_err err;
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    size_t pairs[BATCH] = {0, 1, 2, 3};
    dpoc_mb_metrics mb;
    double sums[DPOC_MB_N];
    if (dpoc_trainer_micro_batch(&t, pairs, BATCH, 1.0, sums, 0, &err)) fail_msg("%s", err.msg);
    dpoc_mb_metrics_from_sums(sums, &mb);
    assert_close(mb.loss, log(2.0), 1e-7, 0, "%s loss with policy == reference", model);
    cJSON *j = batch_json(model);
    assert_close(cJSON_GetObjectItem(j, "policy_equals_ref_sigmoid_loss")->valuedouble, log(2.0), 1e-7, 0,
                 "fixture's own ln 2");
    cJSON_Delete(j);
    dpoc_trainer_free(&t);
}

/* Metrics logged by a run against TRL's log_history, step by step. */
static void compare_log_history(const char *model, const char *metrics_path) {
    char rel[256];
    snprintf(rel, sizeof rel, "%s/expected/train3.json", model);
    compare_log_history_with(rel, metrics_path, 3, TOL_LOSS, TOL_METRIC, ATOL_TINY, model);
}

/* Three optimizer steps (accumulation 2, warm-up, clipping, truncation) through the library. */
static void run_train3_with(const char *model, int shared, int gc) {
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, model);
    c.shared_prefix = shared;
    c.gradient_checkpointing = gc;
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(t.shared, shared);
    char buf[DPOC_PATH_MAX + 32];
    if (snprintf(buf, sizeof buf, "%s/metrics.jsonl", c.output_dir) >= (int)sizeof buf) fail_msg("path too long");
    dpoc_metrics_writer mw;
    if (dpoc_metrics_open(&mw, c.output_dir, "{}", -1, &err)) fail_msg("%s", err.msg);
    mw.print = 0;
    t.on_log = dpoc_metrics_write;
    t.on_log_ctx = &mw;
    assert_int_equal(t.total_steps, 3);
    while (t.global_step < t.total_steps)
        if (dpoc_trainer_step(&t, &err)) fail_msg("%s", err.msg);
    dpoc_metrics_close(&mw);
    char rel[256], what[128];
    snprintf(rel, sizeof rel, "%s/expected/weights-step3.safetensors", model);
    snprintf(what, sizeof what, "%s weights after 3 steps", model);
    compare_with_safetensors(&t.policy, t.policy.params, rel, TOL_WEIGHTS, what);
    compare_log_history(model, buf);
    dpoc_trainer_free(&t);
}

/* The CLI from the repository root, as the README runs it. */
static int run_cli(const char *args, const char *log) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' %s > '%s' 2>&1", DPOC_SOURCE_DIR, DPOC_BIN, args, log);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void run_cli_train(const char *model) {
    const char *dir = make_temp_dir();
    char args[1024], log[512], metrics[512];
    snprintf(log, sizeof log, "%s/log.txt", dir);
    snprintf(args, sizeof args, "train --config configs/%s.json --set output_dir=%s/out", model, dir);
    int rc = run_cli(args, log);
    if (rc != 0) {
        static char shown[8192];
        char *text = read_text_file(log, NULL);
        snprintf(shown, sizeof shown, "%s", text ? text : "");
        free(text); /* fail_msg does not return */
        fail_msg("dpoc %s exited %d:\n%s", args, rc, shown);
    }
    snprintf(metrics, sizeof metrics, "%s/out/metrics.jsonl", dir);
    compare_log_history(model, metrics);
}

/* the trainer's two paths: each pair's prompt computed once (the default), and
 * not; and both with gradient checkpointing (layers recomputed in backward) */
static void run_case_metrics(const char *model) {
    run_case_metrics_with(model, 1);
    run_case_metrics_with(model, 0);
}
static void run_grads(const char *model) {
    run_grads_with(model, 1, 0);
    run_grads_with(model, 0, 0);
    run_grads_with(model, 1, 1);
    run_grads_with(model, 0, 1);
}
static void run_train3(const char *model) {
    run_train3_with(model, 1, 0);
    run_train3_with(model, 0, 0);
    run_train3_with(model, 1, 1);
}

#define PER_MODEL(fn)                                    \
    static void test_##fn(void **state) {                \
        (void)state;                                     \
        for (size_t i = 0; i < N_MODELS; i++) fn(MODELS[i]); \
    }
PER_MODEL(run_logps)
PER_MODEL(run_loss_cases)
PER_MODEL(run_case_metrics)
PER_MODEL(run_grads)
PER_MODEL(run_ln2)
PER_MODEL(run_train3)
PER_MODEL(run_cli_train)

static void test_cli_errors(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char log[512], args[1024];
    snprintf(log, sizeof log, "%s/log.txt", dir);
    assert_int_equal(run_cli("train --config configs/tiny-llama.json --set betta=0.2", log), 2);
    char *text = read_text_file(log, NULL);
    assert_non_null(strstr(text, "'betta'"));
    free(text);
    assert_int_equal(run_cli("train --config /nonexistent/cfg.json", log), 2);
    text = read_text_file(log, NULL);
    assert_non_null(strstr(text, "/nonexistent/cfg.json"));
    free(text);
    snprintf(args, sizeof args, "train --config configs/tiny-llama.json --set train_file=%s/none.jsonl", dir);
    assert_int_equal(run_cli(args, log), 2);
    text = read_text_file(log, NULL);
    assert_non_null(strstr(text, "none.jsonl"));
    free(text);
    assert_int_equal(run_cli("train --help", log), 0);
    text = read_text_file(log, NULL);
    assert_non_null(strstr(text, "per_device_train_batch_size"));
    free(text);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_run_logps),  cmocka_unit_test(test_run_loss_cases), cmocka_unit_test(test_run_case_metrics),
        cmocka_unit_test(test_run_grads),  cmocka_unit_test(test_run_ln2),        cmocka_unit_test(test_run_train3),
        cmocka_unit_test(test_run_cli_train), cmocka_unit_test(test_cli_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
