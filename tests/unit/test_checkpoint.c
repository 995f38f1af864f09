/* Checkpoints and resume through the CLI, as a batch job meets them:
 * - bit-exact resume: 3 steps, a signal, resume, 3 steps == 6 steps (weights,
 *   optimizer state, metrics), at 1 and at 2 ranks, and with bf16 products;
 * - resume at another world size with the same global batch continues the data order;
 * - with ZeRO (zero_stage 1, 2) the same: bit-exact at the same layout, and a
 *   sharded run's checkpoint resumes unsharded and the other way round;
 * - an incompatible config or another model is refused, saying what differs;
 * - kill -9 in the middle of a checkpoint write, truncated and corrupted files,
 *   and a write that fails for lack of space never lose the previous checkpoint;
 * - h5py reads checkpoints and metrics.h5 (the documented schema). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dpoc/checkpoint.h"
#include "dpoc/safetensors.h"
#include "testutil.h"

#define EXIT_CHECKPOINTED 85
#define TOL_WEIGHTS_REL 1e-5

static int setup(void **state) {
    (void)state;
    set_mpi_test_env();
    return 0;
}

/* `[mpirun -np N] dpoc train --config configs/tiny-qwen2.json --set output_dir=OUT --set max_steps=6 EXTRA` */
static int run(int np, const char *out, const char *extra, const char *env, const char *log) {
    char cmd[4096];
    if (snprintf(cmd, sizeof cmd,
                 "cd '%s' && %s %s %s '%s' train --config configs/tiny-qwen2.json --set output_dir=%s "
                 "--set max_steps=6 --set logging_steps=1 %s >> '%s' 2>&1",
                 DPOC_SOURCE_DIR, env ? env : "", np > 1 ? "timeout 120 mpirun --oversubscribe -np" : "",
                 np > 1 ? (np == 2 ? "2" : "4") : "", DPOC_BIN, out, extra, log) >= (int)sizeof cmd)
        fail_msg("command too long");
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}



/* dir/name in a fresh heap string, kept until the group's teardown frees them all */
#define MAX_PATHS 1024
static char *g_paths[MAX_PATHS];
static size_t g_n_paths;

static char *path_in(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    if (g_n_paths == MAX_PATHS) fail_msg("too many paths");
    char *b = malloc(n);
    snprintf(b, n, "%s/%s", dir, name);
    return g_paths[g_n_paths++] = b;
}

static int teardown(void **state) {
    (void)state;
    for (size_t i = 0; i < g_n_paths; i++) free(g_paths[i]);
    g_n_paths = 0;
    return 0;
}

static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    char *x = read_text_file(a, &na), *y = read_text_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return eq;
}

/* metrics.jsonl lines without the wall-clock keys must be identical */
static void metrics_equal(const char *a_dir, const char *b_dir) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "python3 -c \"import json,sys\n"
             "def load(p):\n"
             "    out=[]\n"
             "    for l in open(p):\n"
             "        d=json.loads(l)\n"
             "        for k in ('tokens_per_second','step_time_s','compute_time_s','comm_time_s'): d.pop(k)\n"
             "        out.append(d)\n"
             "    return out\n"
             "sys.exit(0 if load('%s/metrics.jsonl')==load('%s/metrics.jsonl') else 1)\"",
             a_dir, b_dir);
    if (system(cmd) != 0) fail_msg("metrics of %s and %s differ", a_dir, b_dir);
}

static unsigned long long content_hash_of(const char *path) {
    char cmd[1024], out[64] = "";
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 -c \"import h5py; print(int(h5py.File('%s','r').attrs['content_hash']))\"",
             path);
    FILE *p = popen(cmd, "r");
    if (!p || !fgets(out, sizeof out, p)) fail_msg("h5py could not read %s", path);
    pclose(p);
    return strtoull(out, NULL, 10);
}

#define LORA_ARGS                                                                                         \
    "--set ref_model_name_or_path= --set use_peft=true --set lora_r=4 --set lora_alpha=8 "               \
    "--set lora_target_modules=all-linear --set init_lora_weights=false"

/* file: what the run leaves as its result (model.safetensors, or a LoRA run's adapter) */
static void check_bit_exact_file(int np, const char *extra, const char *file) {
    const char *base = make_temp_dir();
    char *straight = path_in(base, "straight"), *split = path_in(base, "split"), *log = path_in(base, "log");
    expect_exit(run(np, straight, extra, NULL, log), 0, "uninterrupted run", log);
    expect_exit(run(np, split, extra, "DPOC_TEST_SIGNAL_AT_STEP=3", log), EXIT_CHECKPOINTED, "signalled run", log);
    expect_log_has(log, "exit 85: checkpointed, not finished");
    char args[512];
    snprintf(args, sizeof args, "%s --resume auto", extra);
    expect_exit(run(np, split, args, NULL, log), 0, "resumed run", log);
    expect_log_has(log, "resumed from");
    if (!files_equal(path_in(straight, file), path_in(split, file)))
        fail_msg("%d rank(s): %s after 3 + resume + 3 steps differs from 6 steps", np, file);
    if (content_hash_of(path_in(straight, "checkpoint-6.h5")) != content_hash_of(path_in(split, "checkpoint-6.h5")))
        fail_msg("%d rank(s): optimizer state after resume differs", np);
    metrics_equal(straight, split);
}

static void check_bit_exact(int np, const char *extra) { check_bit_exact_file(np, extra, "model.safetensors"); }

/* LoRA: the checkpoint holds the adapters and their AdamW state; the base is
 * checked by its fingerprint */
static void test_resume_bit_exact_lora(void **state) {
    (void)state;
    check_bit_exact_file(1, LORA_ARGS, "adapter_model.safetensors");
    check_bit_exact_file(2, LORA_ARGS " --set per_device_train_batch_size=1", "adapter_model.safetensors");
}

/* A LoRA checkpoint is not resumed by a full fine-tune, another rank, or on another base. */
static void test_lora_incompatible_refused(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, out, LORA_ARGS, "DPOC_TEST_SIGNAL_AT_STEP=2", log), EXIT_CHECKPOINTED, "signalled LoRA run", log);
    char args[1024];
    snprintf(args, sizeof args, "--set ref_model_name_or_path= --resume %s/checkpoint-2.h5", out);
    expect_exit(run(1, out, args, NULL, log), 2, "full fine-tune from a LoRA checkpoint", log);
    expect_log_has(log, "use_peft differs");
    snprintf(args, sizeof args, "%s --set lora_r=8 --resume %s/checkpoint-2.h5", LORA_ARGS, out);
    expect_exit(run(1, out, args, NULL, log), 2, "other lora_r", log);
    expect_log_has(log, "lora_r is 8");
    snprintf(args, sizeof args, "%s --set lora_target_modules=[\\\"q_proj\\\"] --resume %s/checkpoint-2.h5", LORA_ARGS, out);
    expect_exit(run(1, out, args, NULL, log), 2, "other targets", log);
    expect_log_has(log, "this run trains");
    snprintf(args, sizeof args, "%s --set model_name_or_path=tests/fixtures/tiny-qwen2-ref --resume %s/checkpoint-2.h5",
             LORA_ARGS, out);
    expect_exit(run(1, out, args, NULL, log), 2, "other base", log);
    expect_log_has(log, "checkpoint of another starting model");
}

static void test_resume_bit_exact_1_rank(void **state) {
    (void)state;
    check_bit_exact(1, "");
}

static void test_resume_bit_exact_2_ranks(void **state) {
    (void)state;
    check_bit_exact(2, "--set per_device_train_batch_size=1");
}

/* bf16 products: the checkpoint holds the fp32 master weights, so the same holds */
static void test_resume_bit_exact_bf16(void **state) {
    (void)state;
    check_bit_exact(1, "--set bf16=true");
}

static void compare_weights(const char *a_dir, const char *b_dir, double tol) {
    st_model a = {0}, b = {0};
    dpoc_err err;
    if (st_open_file(&a, path_in(a_dir, "model.safetensors"), &err) ||
        st_open_file(&b, path_in(b_dir, "model.safetensors"), &err))
        fail_msg("%s", err.msg);
    for (size_t i = 0; i < a.n_tensors; i++) {
        const st_tensor *ta = &a.tensors[i], *tb = st_find(&b, ta->name);
        float *va = malloc(ta->numel * sizeof(float)), *vb = malloc(ta->numel * sizeof(float));
        if (!tb || st_read_f32(ta, va, ta->ndim, ta->shape, &err) || st_read_f32(tb, vb, ta->ndim, ta->shape, &err))
            fail_msg("cannot compare %s", ta->name);
        double e = rel_maxabs_err(va, vb, ta->numel, 1e-12);
        if (e > tol) fail_msg("%s differs by %.3g", ta->name, e);
        free(va);
        free(vb);
    }
    st_close(&a);
    st_close(&b);
}

/* zero_stage 1 and 2 on 2 ranks: signalled, resumed at the same layout, bit-exact */
static void test_resume_bit_exact_zero(void **state) {
    (void)state;
    check_bit_exact(2, "--set per_device_train_batch_size=1 --set zero_stage=1");
    check_bit_exact(2, "--set per_device_train_batch_size=1 --set zero_stage=2");
}

/* The checkpoint of a sharded run is a whole one: 2 ranks at stage 2 resumed on
 * 1 rank unsharded, and 1 rank unsharded resumed on 2 ranks at stages 2 and 1,
 * each equal to the uninterrupted 1-rank run. */
static void test_resume_across_stages(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *straight = path_in(base, "straight"), *log = path_in(base, "log");
    expect_exit(run(1, straight, "", NULL, log), 0, "uninterrupted run", log);
    char *a = path_in(base, "sharded-then-not");
    expect_exit(run(2, a, "--set per_device_train_batch_size=1 --set zero_stage=2", "DPOC_TEST_SIGNAL_AT_STEP=3", log),
                EXIT_CHECKPOINTED, "signalled run, 2 ranks, zero_stage 2", log);
    expect_exit(run(1, a, "--resume auto", NULL, log), 0, "resume on 1 rank, zero_stage 0", log);
    compare_weights(straight, a, TOL_WEIGHTS_REL);
    for (int stage = 1; stage <= 2; stage++) {
        char *b = path_in(base, stage == 1 ? "not-then-stage1" : "not-then-stage2"), args[256];
        expect_exit(run(1, b, "", "DPOC_TEST_SIGNAL_AT_STEP=3", log), EXIT_CHECKPOINTED, "signalled run, 1 rank", log);
        snprintf(args, sizeof args, "--set per_device_train_batch_size=1 --set zero_stage=%d --resume auto", stage);
        expect_exit(run(2, b, args, NULL, log), 0, "resume on 2 ranks, sharded", log);
        compare_weights(straight, b, TOL_WEIGHTS_REL);
    }
}

/* 1 rank x batch 2 x accumulation 2, resumed on 2 ranks x batch 1 x accumulation 2 */
static void test_resume_other_world_size(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *straight = path_in(base, "straight"), *split = path_in(base, "split"), *log = path_in(base, "log");
    expect_exit(run(1, straight, "", NULL, log), 0, "uninterrupted run", log);
    expect_exit(run(1, split, "", "DPOC_TEST_SIGNAL_AT_STEP=3", log), EXIT_CHECKPOINTED, "signalled run", log);
    expect_exit(run(2, split, "--set per_device_train_batch_size=1 --resume auto", NULL, log), 0, "resume on 2 ranks",
              log);
    compare_weights(straight, split, TOL_WEIGHTS_REL);
}

static void test_incompatible_refused(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, out, "", "DPOC_TEST_SIGNAL_AT_STEP=2", log), EXIT_CHECKPOINTED, "signalled run", log);
    expect_exit(run(1, out, "--set per_device_train_batch_size=1 --resume auto", NULL, log), 2, "other batch", log);
    expect_log_has(log, "global batch size 4 in the checkpoint, 2 now");
    char args[1024];
    snprintf(args, sizeof args,
             "--set model_name_or_path=tests/fixtures/tiny-qwen2-ref --set ref_model_name_or_path=tests/fixtures/"
             "tiny-qwen2-ref --resume %s/checkpoint-2.h5",
             out);
    expect_exit(run(1, out, args, NULL, log), 2, "other model", log);
    expect_log_has(log, "checkpoint of another starting model");
}

static void corrupt(const char *path, long offset_from_end, int truncate_to_half) {
    struct stat st;
    if (stat(path, &st) != 0) fail_msg("no %s", path);
    if (truncate_to_half) {
        if (truncate(path, st.st_size / 2) != 0) fail_msg("truncate failed");
        return;
    }
    FILE *f = fopen(path, "r+b");
    fseek(f, st.st_size - offset_from_end, SEEK_SET);
    int c = fgetc(f);
    fseek(f, st.st_size - offset_from_end, SEEK_SET);
    fputc(c ^ 0x5a, f);
    fclose(f);
}

/* checkpoints at 2 and 4; the newest damaged -> auto falls back to the older one */
static void check_fallback(int truncate_it) {
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, out, "--set save_steps=2", "DPOC_TEST_SIGNAL_AT_STEP=4", log), EXIT_CHECKPOINTED, "first run",
              log);
    /* flip a byte inside the last tensor data (the optimizer's moments are written last) */
    corrupt(path_in(out, "checkpoint-4.h5"), 2000, truncate_it);
    dpoc_err err;
    assert_int_equal(dpoc_ckpt_verify(path_in(out, "checkpoint-4.h5"), &err), DPOC_EINPUT);
    assert_int_equal(dpoc_ckpt_verify(path_in(out, "checkpoint-2.h5"), &err), 0);
    expect_exit(run(1, out, "--resume auto", NULL, log), 0, "resume after damage", log);
    expect_log_has(log, "skipping checkpoint");
    expect_log_has(log, "resumed from");
    expect_log_has(log, "checkpoint-2.h5 at step 2");
}

static void test_truncated_checkpoint_skipped(void **state) {
    (void)state;
    check_fallback(1);
}

static void test_flipped_bytes_detected(void **state) {
    (void)state;
    check_fallback(0);
}

/* Starts `dpoc train` (save_steps 2, max_steps 6) in a child that pauses inside the
 * checkpoint write of pause_step for pause_s seconds; returns once it announced the
 * pause (*paused = 0 if it never did). */
static pid_t spawn_paused_writer(const char *out, const char *log, int pause_step, int pause_s, int *paused) {
    pid_t pid = fork();
    if (pid == 0) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd,
                 "cd '%s' && DPOC_TEST_PAUSE_IN_CHECKPOINT=%d:%d exec '%s' train --config configs/tiny-qwen2.json "
                 "--set output_dir=%s --set max_steps=6 --set save_steps=2 > '%s' 2>&1",
                 DPOC_SOURCE_DIR, pause_step, pause_s, DPOC_BIN, out, log);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    *paused = 0;
    for (int i = 0; i < 1200 && !*paused; i++) {
        usleep(50000);
        char *text = read_text_file(log, NULL);
        *paused = text && strstr(text, "pausing inside the checkpoint write");
        free(text);
    }
    return pid;
}

/* kill -9 while checkpoint-4 is half written: checkpoint-2 stays the latest and resume works */
static void test_kill_during_write(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *straight = path_in(base, "straight"), *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, straight, "", NULL, log), 0, "uninterrupted run", log);
    int paused;
    pid_t pid = spawn_paused_writer(out, log, 4, 60, &paused);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    if (!paused) fail_msg("the writer never reached the pause");
    char latest[256] = "";
    FILE *f = fopen(path_in(out, "latest"), "r");
    if (!f || !fgets(latest, sizeof latest, f)) fail_msg("no latest pointer");
    fclose(f);
    assert_string_equal(latest, "checkpoint-2.h5\n");
    struct stat st;
    assert_int_not_equal(stat(path_in(out, "checkpoint-4.h5"), &st), 0); /* never renamed into place */
    expect_exit(run(1, out, "--resume auto", NULL, log), 0, "resume after kill -9", log);
    expect_log_has(log, "checkpoint-2.h5 at step 2");
    if (!files_equal(path_in(straight, "model.safetensors"), path_in(out, "model.safetensors")))
        fail_msg("weights after kill -9 and resume differ from the uninterrupted run");
}

/* signals arriving while a checkpoint is being written only set the flag: the
 * write completes, the run stops at the boundary with 85 and a valid checkpoint */
static void test_signals_during_write(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    int paused;
    pid_t pid = spawn_paused_writer(out, log, 2, 2, &paused);
    kill(pid, SIGUSR1);
    usleep(100000);
    kill(pid, SIGTERM);
    int st = 0;
    waitpid(pid, &st, 0);
    if (!paused) fail_msg("the writer never reached the pause");
    expect_exit(WIFEXITED(st) ? WEXITSTATUS(st) : -1, EXIT_CHECKPOINTED, "run signalled twice during a write", log);
    dpoc_err err;
    assert_int_equal(dpoc_ckpt_verify(path_in(out, "checkpoint-2.h5"), &err), 0);
    long step = 0;
    assert_int_equal(dpoc_ckpt_step(path_in(out, "checkpoint-2.h5"), &step, &err), 0);
    assert_int_equal(step, 2);
}

/* a file-size limit makes the step-4 checkpoint fail: clear error, checkpoint-2 intact */
static void test_disk_full(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, out, "--set save_steps=2", "DPOC_TEST_SIGNAL_AT_STEP=2", log), EXIT_CHECKPOINTED, "first run",
              log);
    struct stat st;
    if (stat(path_in(out, "checkpoint-2.h5"), &st) != 0) fail_msg("no checkpoint-2.h5");
    char limit_env[128];
    /* ulimit -f counts 1024-byte blocks; half a checkpoint fits, a whole one does not */
    /* PMIx's shared-memory store would need files over the limit: its hash store needs none */
    snprintf(limit_env, sizeof limit_env, "trap '' XFSZ; ulimit -f %ld; PMIX_MCA_gds=hash", (long)(st.st_size / 2048));
    int rc = run(1, out, "--set save_steps=2 --resume auto", limit_env, log);
    if (rc == 0) fail_msg("the run succeeded although no checkpoint fits");
    expect_log_has(log, "writing the checkpoint failed");
    dpoc_err err;
    assert_int_equal(dpoc_ckpt_verify(path_in(out, "checkpoint-2.h5"), &err), 0);
    FILE *f = fopen(path_in(out, "latest"), "r");
    char latest[256] = "";
    if (!f || !fgets(latest, sizeof latest, f)) fail_msg("no latest pointer");
    fclose(f);
    assert_string_equal(latest, "checkpoint-2.h5\n");
}

/* the schema documented in the README, read by h5py */
static void test_h5py_reads_files(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *out = path_in(base, "out"), *log = path_in(base, "log");
    expect_exit(run(1, out, "", NULL, log), 0, "run", log);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c \"import h5py, json, numpy as np\n"
             "m = h5py.File('%s/metrics.h5', 'r')\n"
             "assert list(m['step'][:]) == [1, 2, 3, 4, 5, 6], m['step'][:]\n"
             "for k in ['loss', 'grad_norm', 'learning_rate', 'rewards/chosen', 'rewards/margins', 'logps/rejected', "
             "'logits/chosen', 'entropy', 'mean_token_accuracy', 'num_tokens', 'epoch', 'tokens_per_second']:\n"
             "    assert m[k].shape == (6,) and m[k].maxshape == (None,), k\n"
             "assert json.loads(m.attrs['config'])['max_steps'] == 6\n"
             "c = h5py.File('%s/checkpoint-6.h5', 'r')\n"
             "assert c.attrs['global_step'] == 6 and c.attrs['format_version'] == 1\n"
             "w = c['model/model.layers.0.self_attn.q_proj.weight']\n"
             "assert w.shape == (64, 64) and w.dtype == np.float32 and w.fletcher32\n"
             "assert c['optimizer/exp_avg/model.norm.weight'].shape == (64,)\n"
             "assert json.loads(c.attrs['config'])['beta'] == 0.1\n\"",
             out, out);
    if (system(cmd) != 0) fail_msg("h5py could not read the files as documented");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_bit_exact_1_rank), cmocka_unit_test(test_resume_bit_exact_2_ranks),
        cmocka_unit_test(test_resume_bit_exact_bf16),
        cmocka_unit_test(test_resume_bit_exact_lora), cmocka_unit_test(test_lora_incompatible_refused),
        cmocka_unit_test(test_resume_other_world_size), cmocka_unit_test(test_resume_bit_exact_zero),
        cmocka_unit_test(test_resume_across_stages), cmocka_unit_test(test_incompatible_refused),
        cmocka_unit_test(test_truncated_checkpoint_skipped), cmocka_unit_test(test_flipped_bytes_detected),
        cmocka_unit_test(test_kill_during_write), cmocka_unit_test(test_signals_during_write),
        cmocka_unit_test(test_disk_full),
        cmocka_unit_test(test_h5py_reads_files),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
