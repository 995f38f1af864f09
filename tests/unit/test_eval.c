/* Evaluation during training against TRL 1.16's DPOTrainer.evaluate()
 * (tests/fixtures/eval/, tools/make_eval_fixtures.py): the 7 evaluation pairs
 * in batches of 4 (the last short), before training (eval_on_start) and after
 * 3 steps (eval_steps 3), with the reference model and with precomputed
 * reference log-probs, on 1 rank (per_device_eval_batch_size 4) and on 2 ranks
 * (2 each: the same global batches, the second rank's share of the last one
 * short) — every number TRL logged within 1e-4. Also: eval rows in
 * metrics.h5's eval group, and the config errors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "testutil.h"

#define TOL_REL 1e-4
#define TOL_ABS 1e-5

static int setup(void **state) {
    (void)state;
    set_mpi_test_env();
    return 0;
}

static const char *const MODELS[] = {"tiny-llama", "tiny-qwen2"};

static int run_train(int np, const char *model, const char *out, const char *extra, const char *log) {
    char cmd[4096];
    if (snprintf(cmd, sizeof cmd,
                 "cd '%s' && %s '%s' train --config configs/%s.json --set output_dir=%s "
                 "--set eval_file=tests/fixtures/eval/eval_pairs.jsonl --set eval_strategy=steps --set eval_steps=3 "
                 "--set eval_on_start=true %s > '%s' 2>&1",
                 DPOC_SOURCE_DIR, np > 1 ? "timeout 120 mpirun --oversubscribe -np 2" : "", DPOC_BIN, model, out,
                 extra, log) >= (int)sizeof cmd)
        fail_msg("command too long");
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The eval rows of metrics.jsonl (those with eval_loss), at most 8. */
static size_t eval_rows(const char *out, cJSON **rows) {
    char path[600];
    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    char *text = read_text_file(path, NULL);
    if (!text) fail_msg("no %s", path);
    size_t n = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cJSON *o = cJSON_Parse(line);
        if (o && cJSON_GetObjectItem(o, "eval_loss") && n < 8) rows[n++] = o;
        else cJSON_Delete(o);
    }
    free(text);
    return n;
}

static void compare_row(const cJSON *want, const cJSON *got, const char *what) {
    size_t checked = 0;
    for (const cJSON *k = want->child; k; k = k->next) {
        const cJSON *g = cJSON_GetObjectItem(got, k->string);
        if (!g) fail_msg("%s: dpoc logged no '%s'", what, k->string);
        assert_close(g->valuedouble, k->valuedouble, TOL_REL, TOL_ABS, "%s: %s", what, k->string);
        checked++;
    }
    assert_true(checked >= 14); /* eval_loss, 11 DPO metrics, epoch, step */
    for (const char *const *k = (const char *const[]){"eval_runtime", "eval_samples_per_second",
                                                       "eval_steps_per_second", NULL};
         *k; k++)
        if (!cJSON_GetObjectItem(got, *k)) fail_msg("%s: no '%s'", what, *k);
}

static void check_case(int np, const char *model, int precompute) {
    char fixture[256], what[256], extra[512];
    snprintf(fixture, sizeof fixture, "eval/%s-%s.json", model, precompute ? "precomputed" : "ref");
    cJSON *fx = load_json_fixture(fixture);
    const char *base = make_temp_dir();
    char out[512], log[512];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    snprintf(extra, sizeof extra, "--set precompute_ref_log_probs=%s %s", precompute ? "true" : "false",
             np > 1 ? "--set per_device_train_batch_size=1 --set per_device_eval_batch_size=2"
                    : "--set per_device_eval_batch_size=4");
    snprintf(what, sizeof what, "%s, %d rank(s), %s", model, np, precompute ? "precomputed reference" : "reference model");
    expect_exit(run_train(np, model, out, extra, log), 0, what, log);
    cJSON *rows[8];
    const size_t n = eval_rows(out, rows);
    if (n != 2) fail_msg("%s: %zu eval rows, expected 2 (eval_on_start, step 3)", what, n);
    char w[300];
    snprintf(w, sizeof w, "%s, before training", what);
    compare_row(cJSON_GetObjectItem(fx, "before"), rows[0], w);
    snprintf(w, sizeof w, "%s, after 3 steps", what);
    compare_row(cJSON_GetObjectItem(fx, "after3"), rows[1], w);
    for (size_t i = 0; i < n; i++) cJSON_Delete(rows[i]);
    cJSON_Delete(fx);
    if (precompute) {
        char p[600];
        snprintf(p, sizeof p, "%s/ref_logps_eval.h5", out);
        FILE *f = fopen(p, "rb");
        if (!f) fail_msg("%s: the evaluation set's reference log-probs were not stored (%s)", what, p);
        fclose(f);
    }
}

static void test_matches_trl_1_rank(void **state) {
    (void)state;
    for (size_t m = 0; m < 2; m++)
        for (int pre = 0; pre < 2; pre++) check_case(1, MODELS[m], pre);
}

static void test_matches_trl_2_ranks(void **state) {
    (void)state;
    for (size_t m = 0; m < 2; m++)
        for (int pre = 0; pre < 2; pre++) check_case(2, MODELS[m], pre);
}

/* metrics.h5 keeps eval rows apart: eval/loss, eval/step, ... (read with h5py) */
static void test_metrics_h5_eval_group(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char out[512], log[512], cmd[2048];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    expect_exit(run_train(1, "tiny-llama", out, "--set per_device_eval_batch_size=4", log), 0, "run", log);
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c \"import h5py,sys\n"
             "f=h5py.File('%s/metrics.h5','r')\n"
             "s=list(f['eval/step'][:]); l=f['eval/loss'][:]; c=f['eval/rewards/chosen'][:]\n"
             "ok=s==[0.0,3.0] and len(l)==2 and len(c)==2 and len(f['step'][:])==3\n"
             "sys.exit(0 if ok else 1)\" >> '%s' 2>&1",
             out, log);
    if (system(cmd) != 0) fail_msg("metrics.h5 has no eval group with 2 rows (log %s)", log);
}

static void test_config_errors(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char log[512], cmd[2048];
    snprintf(log, sizeof log, "%s/log", base);
    snprintf(cmd, sizeof cmd,
             "cd '%s' && '%s' train --config configs/tiny-llama.json --set output_dir=%s/o --set eval_strategy=steps "
             "> '%s' 2>&1",
             DPOC_SOURCE_DIR, DPOC_BIN, base, log);
    int st = system(cmd);
    expect_exit(WIFEXITED(st) ? WEXITSTATUS(st) : -1, 2, "eval_strategy without eval_file", log);
    expect_log_has(log, "eval_file");
    snprintf(cmd, sizeof cmd,
             "cd '%s' && '%s' train --config configs/tiny-llama.json --set output_dir=%s/o --set eval_strategy=sometimes "
             "--set eval_file=tests/fixtures/eval/eval_pairs.jsonl > '%s' 2>&1",
             DPOC_SOURCE_DIR, DPOC_BIN, base, log);
    st = system(cmd);
    expect_exit(WIFEXITED(st) ? WEXITSTATUS(st) : -1, 2, "an unknown eval_strategy", log);
    expect_log_has(log, "eval_strategy");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_trl_1_rank),
        cmocka_unit_test(test_matches_trl_2_ranks),
        cmocka_unit_test(test_metrics_h5_eval_group),
        cmocka_unit_test(test_config_errors),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
