/* Data parallelism through mpirun, as users launch it:
 * - the invariant: the same global batch of 4 as (1 rank, batch 4), (1 rank,
 *   batch 1 x accumulation 4), (2 ranks, batch 2) and (4 ranks, batch 1,
 *   oversubscribed) gives the same losses, grad norms and final weights, with
 *   gradients averaged through the shared-memory window (grad_allreduce shared,
 *   also as 2 "nodes" of 2 ranks) and through bucketed MPI (grad_allreduce mpi);
 *   at 2 ranks the two give the same result; and with ZeRO sharding of the
 *   AdamW moments (zero_stage 1) and of the gradients too (zero_stage 2, also
 *   with accumulation, and at 4 ranks);
 * - grad_allreduce shared is refused, naming the key, when nodes differ in size;
 * - a rank whose weights differ is found, naming the tensor;
 * - one failing rank ends the whole job quickly, and so does a hung one.
 * As root, mpirun needs the two OMPI_ALLOW_RUN_AS_ROOT* variables: set here. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "dpoc/model.h"
#include "dpoc/safetensors.h"
#include "testutil.h"

#define STEPS 6
#define TOL_LOSS_ABS 1e-5
#define TOL_GRAD_NORM_REL 1e-4
#define TOL_WEIGHTS_REL 1e-5
/* shared vs mpi at 2 ranks: both add the two ranks' gradients once (bit-identical in practice) */
#define TOL_MODES 1e-6
#define FAIL_FAST_LIMIT_S 30.0

static const char *const MODELS[] = {"tiny-llama", "tiny-qwen2"};

static int setup(void **state) {
    (void)state;
    set_mpi_test_env();
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Runs `mpirun -np N dpoc train ...` from the repository root; returns the exit code. */
static int run_mpi(int np, const char *model, const char *out, const char *extra, const char *log) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "cd '%s' && timeout 120 mpirun -np %d --oversubscribe '%s' train --config configs/%s.json "
             "--set output_dir=%s --set max_steps=%d --set train_sampling_strategy=random %s > '%s' 2>&1",
             DPOC_SOURCE_DIR, np, DPOC_BIN, model, out, STEPS, extra, log);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void fail_with_log(const char *what, int rc, const char *log) {
    static char shown[8192];
    char *text = read_text_file(log, NULL);
    snprintf(shown, sizeof shown, "%s", text ? text : "(no log)");
    free(text); /* fail_msg does not return */
    fail_msg("%s exited %d:\n%s", what, rc, shown);
}

typedef struct {
    double loss[STEPS], grad_norm[STEPS];
} run_log;

static void read_metrics(const char *out, run_log *r) {
    char path[512];
    if (snprintf(path, sizeof path, "%s/metrics.jsonl", out) >= (int)sizeof path) fail_msg("path too long");
    char *text = read_text_file(path, NULL);
    if (!text) fail_msg("no %s", path);
    size_t i = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && i < STEPS; line = strtok_r(NULL, "\n", &save), i++) {
        cJSON *o = cJSON_Parse(line);
        r->loss[i] = cJSON_GetObjectItem(o, "loss")->valuedouble;
        r->grad_norm[i] = cJSON_GetObjectItem(o, "grad_norm")->valuedouble;
        cJSON_Delete(o);
    }
    assert_int_equal(i, STEPS);
    free(text);
}

/* file: model.safetensors, or adapter_model.safetensors of a LoRA run */
static void compare_weights_in(const char *a_dir, const char *b_dir, const char *file, double tol, const char *what) {
    st_model a = {0}, b = {0};
    dpoc_err err;
    char pa[512], pb[512];
    if (snprintf(pa, sizeof pa, "%s/%s", a_dir, file) >= (int)sizeof pa ||
        snprintf(pb, sizeof pb, "%s/%s", b_dir, file) >= (int)sizeof pb)
        fail_msg("path too long");
    if (st_open_file(&a, pa, &err) || st_open_file(&b, pb, &err)) fail_msg("%s", err.msg);
    assert_int_equal(a.n_tensors, b.n_tensors);
    for (size_t i = 0; i < a.n_tensors; i++) {
        const st_tensor *ta = &a.tensors[i], *tb = st_find(&b, ta->name);
        assert_non_null(tb);
        float *va = malloc(ta->numel * sizeof(float)), *vb = malloc(ta->numel * sizeof(float));
        if (st_read_f32(ta, va, ta->ndim, ta->shape, &err) || st_read_f32(tb, vb, ta->ndim, ta->shape, &err))
            fail_msg("%s", err.msg);
        double e = rel_maxabs_err(va, vb, ta->numel, 1e-12);
        if (e > tol) fail_msg("%s: %s differs by %.3g (relative max-abs)", what, ta->name, e);
        free(va);
        free(vb);
    }
    st_close(&a);
    st_close(&b);
}

static void compare_weights(const char *a_dir, const char *b_dir, double tol, const char *what) {
    compare_weights_in(a_dir, b_dir, "model.safetensors", tol, what);
}

/* LoRA (all-linear, both adapter matrices random so they matter from step 1):
 * one rank vs two (bucketed MPI and the shared window) vs four; only the
 * adapters' gradients are averaged, the base stays as loaded on every rank. */
static void test_invariance_lora(void **state) {
    (void)state;
    const char *lora = "--set ref_model_name_or_path= --set use_peft=true --set lora_r=4 --set lora_alpha=8 "
                       "--set lora_target_modules=all-linear --set init_lora_weights=false";
    const char *layouts[][2] = {
        {"1", "--set per_device_train_batch_size=4 --set gradient_accumulation_steps=1"},
        {"2", "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set grad_allreduce=mpi --set bucket_size_mb=0.01"},
        {"2", "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set grad_allreduce=shared"},
        {"4", "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set grad_allreduce=shared"},
        {"2", "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set zero_stage=2"},
    };
    const char *base = make_temp_dir();
    char out0[512];
    run_log ref;
    for (size_t k = 0; k < sizeof layouts / sizeof *layouts; k++) {
        char out[512], log[512], what[512], extra[1024];
        snprintf(out, sizeof out, "%s/lora%zu", base, k);
        snprintf(log, sizeof log, "%s/lora%zu.log", base, k);
        snprintf(extra, sizeof extra, "%s %s", lora, layouts[k][1]);
        snprintf(what, sizeof what, "tiny-qwen2 LoRA: %s rank(s) %s", layouts[k][0], layouts[k][1]);
        int rc = run_mpi(atoi(layouts[k][0]), "tiny-qwen2", out, extra, log);
        if (rc) fail_with_log(what, rc, log);
        run_log r;
        read_metrics(out, &r);
        if (k == 0) {
            ref = r;
            snprintf(out0, sizeof out0, "%s", out);
            continue;
        }
        for (size_t s = 0; s < STEPS; s++) {
            assert_close(r.loss[s], ref.loss[s], 0, TOL_LOSS_ABS, "%s step %zu loss", what, s + 1);
            assert_close(r.grad_norm[s], ref.grad_norm[s], TOL_GRAD_NORM_REL, 0, "%s step %zu grad_norm", what, s + 1);
        }
        compare_weights_in(out, out0, "adapter_model.safetensors", TOL_WEIGHTS_REL, what);
    }
}

static void test_invariance(void **state) {
    (void)state;
    /* env: DPOC_TEST_RANKS_PER_NODE for the run (NULL: one real node) */
    struct {
        int np;
        const char *set;
        const char *ranks_per_node;
    } layouts[] = {
        {1, "--set per_device_train_batch_size=4 --set gradient_accumulation_steps=1", NULL},
        {1, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=4", NULL},
        {2, "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set grad_allreduce=mpi --set bucket_size_mb=0.05", NULL},
        {2, "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set grad_allreduce=shared", NULL},
        {4, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set grad_allreduce=mpi --set bucket_size_mb=0.05", NULL},
        {4, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set grad_allreduce=shared", NULL},
        {4, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set grad_allreduce=shared", "2"},
        {2, "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set zero_stage=1", NULL},
        {2, "--set per_device_train_batch_size=2 --set gradient_accumulation_steps=1 --set zero_stage=2", NULL},
        {2, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=2 --set zero_stage=2", NULL},
        {4, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set zero_stage=2", NULL},
    };
    const size_t n = sizeof layouts / sizeof *layouts;
    const size_t two_mpi = 2, two_shared = 3; /* the pair compared with TOL_MODES */
    for (size_t mi = 0; mi < 2; mi++) {
        const char *base = make_temp_dir();
        char out0[512], log[512];
        run_log ref, logs[sizeof layouts / sizeof *layouts];
        for (size_t k = 0; k < n; k++) {
            char out[512], what[256];
            snprintf(out, sizeof out, "%s/run%zu", base, k);
            snprintf(log, sizeof log, "%s/run%zu.log", base, k);
            snprintf(what, sizeof what, "%s: %d rank(s) %s%s%s", MODELS[mi], layouts[k].np, layouts[k].set,
                     layouts[k].ranks_per_node ? ", ranks per node " : "",
                     layouts[k].ranks_per_node ? layouts[k].ranks_per_node : "");
            if (layouts[k].ranks_per_node) setenv("DPOC_TEST_RANKS_PER_NODE", layouts[k].ranks_per_node, 1);
            int rc = run_mpi(layouts[k].np, MODELS[mi], out, layouts[k].set, log);
            unsetenv("DPOC_TEST_RANKS_PER_NODE");
            if (rc) fail_with_log(what, rc, log);
            run_log *r = &logs[k];
            read_metrics(out, r);
            if (k == 0) {
                ref = *r;
                snprintf(out0, sizeof out0, "%s", out);
                continue;
            }
            for (size_t s = 0; s < STEPS; s++) {
                assert_close(r->loss[s], ref.loss[s], 0, TOL_LOSS_ABS, "%s step %zu loss", what, s + 1);
                assert_close(r->grad_norm[s], ref.grad_norm[s], TOL_GRAD_NORM_REL, 0, "%s step %zu grad_norm", what,
                             s + 1);
            }
            compare_weights(out, out0, TOL_WEIGHTS_REL, what);
        }
        char out_mpi[512], out_shared[512], what[256];
        snprintf(out_mpi, sizeof out_mpi, "%s/run%zu", base, two_mpi);
        snprintf(out_shared, sizeof out_shared, "%s/run%zu", base, two_shared);
        snprintf(what, sizeof what, "%s: 2 ranks, grad_allreduce shared vs mpi", MODELS[mi]);
        for (size_t s = 0; s < STEPS; s++) {
            assert_close(logs[two_shared].loss[s], logs[two_mpi].loss[s], 0, TOL_MODES, "%s step %zu loss", what,
                         s + 1);
            assert_close(logs[two_shared].grad_norm[s], logs[two_mpi].grad_norm[s], TOL_MODES, 0,
                         "%s step %zu grad_norm", what, s + 1);
        }
        compare_weights(out_shared, out_mpi, TOL_MODES, what);
    }
}

/* Nodes of 3 and 1 ranks cannot pair their local ranks: shared is an error naming
 * the key (exit 2), auto falls back to MPI. */
static void test_shared_needs_equal_nodes(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char out[512], log[512];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    setenv("DPOC_TEST_RANKS_PER_NODE", "3", 1);
    int rc = run_mpi(4, "tiny-llama", out, "--set per_device_train_batch_size=1 --set gradient_accumulation_steps=1 --set grad_allreduce=shared", log);
    unsetenv("DPOC_TEST_RANKS_PER_NODE");
    assert_int_equal(rc, DPOC_EINPUT);
    expect_log_has(log, "'grad_allreduce'");
}

static void test_replica_mismatch(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char out[512], log[512];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    setenv("DPOC_TEST_PERTURB", "1:model.layers.1.mlp.up_proj.weight", 1);
    int rc = run_mpi(2, "tiny-llama", out, "--set per_device_train_batch_size=2", log);
    unsetenv("DPOC_TEST_PERTURB");
    assert_int_not_equal(rc, 0);
    expect_log_has(log, "replica mismatch");
    expect_log_has(log, "'model.layers.1.mlp.up_proj.weight'");
}

static void test_fail_fast(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char out[512], log[512];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    setenv("DPOC_TEST_FAIL_AT", "1:3", 1);
    double t0 = now_s();
    int rc = run_mpi(2, "tiny-llama", out, "--set per_device_train_batch_size=2", log);
    double dt = now_s() - t0;
    unsetenv("DPOC_TEST_FAIL_AT");
    assert_int_not_equal(rc, 0);
    expect_log_has(log, "rank 1 of 2");
    expect_log_has(log, "failing at step 3");
    if (dt > FAIL_FAST_LIMIT_S) fail_msg("the job took %.1f s to end after a rank failed", dt);
}

static void test_hang_watchdog(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char out[512], log[512];
    snprintf(out, sizeof out, "%s/out", base);
    snprintf(log, sizeof log, "%s/log", base);
    setenv("DPOC_TEST_HANG_AT", "0:2", 1);
    double t0 = now_s();
    int rc = run_mpi(2, "tiny-llama", out, "--set per_device_train_batch_size=2 --set collective_timeout_s=2", log);
    double dt = now_s() - t0;
    unsetenv("DPOC_TEST_HANG_AT");
    assert_int_not_equal(rc, 0);
    expect_log_has(log, "no progress for");
    if (dt > FAIL_FAST_LIMIT_S) fail_msg("the job took %.1f s to end after a rank hung", dt);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invariance),
        cmocka_unit_test(test_invariance_lora),
        cmocka_unit_test(test_shared_needs_equal_nodes),
        cmocka_unit_test(test_replica_mismatch),
        cmocka_unit_test(test_fail_fast),
        cmocka_unit_test(test_hang_watchdog),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
