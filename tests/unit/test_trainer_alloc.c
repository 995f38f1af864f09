/* An optimizer step allocates nothing: every buffer a step needs is made by
 * dpoc_trainer_init (issue 13). The test executable interposes malloc and its
 * relatives (forwarding to glibc's __libc_* entry points) and counts the calls
 * made while a flag is set, so an allocation anywhere under dpoc_trainer_step,
 * dpoc's or a library's, fails the test with its call stack. Also: the
 * micro-batch's two halves (forward-and-loss without gradient work, backward)
 * against the composed micro-batch, bit for bit; a data set that does not fit
 * the buffers refused; the loss of a large micro-batch of the sorting losses.
 *
 * fp32 products (the default): bf16 runs through oneDNN, whose
 * dnnl_primitive_execute allocates on every call.
 *
 * AddressSanitizer brings its own malloc, which an executable must not replace:
 * under ASan everything runs (for ASan's checks) but nothing is counted, with
 * a message. */
#include <errno.h>
#include <execinfo.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cblas.h>

#include "dpoc/config.h"
#include "dpoc/dataset.h"
#include "dpoc/loss.h"
#include "dpoc/trainer.h"
#include "testutil.h"

#if defined(__SANITIZE_ADDRESS__)
#define ALLOC_HOOKS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ALLOC_HOOKS 0
#endif
#endif
#ifndef ALLOC_HOOKS
#define ALLOC_HOOKS 1
#endif

/* Steps before counting: the first ones may set up state lazily (bf16 weight
 * copies, per-thread GEMM state, BLAS buffers); the counted ones must then
 * allocate nothing. */
#define WARMUP_STEPS 2
#define COUNTED_STEPS 3
/* Allocations whose call stacks are kept for the failure message. */
#define MAX_TRACES 8
#define TRACE_DEPTH 24

/* ---- the counting hooks (test-only global state) ---- */

static atomic_int counting;
static atomic_size_t n_allocs;
static void *traces[MAX_TRACES][TRACE_DEPTH];
static int trace_len[MAX_TRACES];

#if ALLOC_HOOKS
static _Thread_local int in_hook; /* backtrace() must not count (or record) itself */
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t align, size_t n);
extern void __libc_free(void *p);

static void note_alloc(void) {
    if (!atomic_load(&counting) || in_hook) return;
    const size_t k = atomic_fetch_add(&n_allocs, 1);
    if (k < MAX_TRACES) {
        in_hook = 1;
        trace_len[k] = backtrace(traces[k], TRACE_DEPTH);
        in_hook = 0;
    }
}

void *malloc(size_t n) {
    note_alloc();
    return __libc_malloc(n);
}
void *calloc(size_t count, size_t size) {
    note_alloc();
    return __libc_calloc(count, size);
}
void *realloc(void *p, size_t n) {
    note_alloc();
    return __libc_realloc(p, n);
}
void *aligned_alloc(size_t align, size_t n) {
    note_alloc();
    return __libc_memalign(align, n);
}
int posix_memalign(void **out, size_t align, size_t n) {
    note_alloc();
    void *p = __libc_memalign(align, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
void free(void *p) { __libc_free(p); }
#endif

static void count_start(void) {
    atomic_store(&n_allocs, 0);
    atomic_store(&counting, 1);
}

/* Stops counting; fails with the kept call stacks when anything was allocated
 * (without the hooks nothing was counted: main says so once). */
static void count_expect_none(const char *what) {
    atomic_store(&counting, 0);
    const size_t n = atomic_load(&n_allocs);
    if (!ALLOC_HOOKS || n == 0) return;
    fprintf(stderr, "%s: %zu allocation(s); the first call stacks:\n", what, n);
    for (size_t k = 0; k < n && k < MAX_TRACES; k++) {
        fprintf(stderr, "-- allocation %zu\n", k + 1);
        backtrace_symbols_fd(traces[k], trace_len[k], STDERR_FILENO);
    }
    fail_msg("%s allocated %zu time(s) (stacks above)", what, n);
}

/* ---- the trainer's step ---- */

static int quiet_log(void *ctx, const dpoc_log_record *rec, dpoc_err *err) {
    (void)err;
    (void)rec;
    ++*(size_t *)ctx;
    return 0;
}

typedef struct {
    const char *name;
    const char *model;
    int shared_prefix, gradient_checkpointing, precompute_ref, shuffle;
    const char *loss; /* NULL: the config's */
    size_t zero_stage;
} step_case;

static void run_step_case(const step_case *sc) {
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, sc->model);
    c.shared_prefix = sc->shared_prefix;
    c.gradient_checkpointing = sc->gradient_checkpointing;
    c.precompute_ref_log_probs = sc->precompute_ref;
    c.shuffle = sc->shuffle;
    c.zero_stage = sc->zero_stage;
    c.max_steps = WARMUP_STEPS + COUNTED_STEPS;
    if (sc->loss) {
        char json[128];
        snprintf(json, sizeof json, "{\"loss_type\": [\"%s\"]}", sc->loss);
        if (dpoc_config_apply_json(&c, json, "test", &err)) fail_msg("%s", err.msg);
    }
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s: %s", sc->name, err.msg);
    if (sc->precompute_ref) {
        if (dpoc_trainer_compute_ref_logps(&t, &err)) fail_msg("%s: %s", sc->name, err.msg);
        dpoc_trainer_drop_ref(&t);
    }
    size_t rows = 0;
    t.on_log = quiet_log;
    t.on_log_ctx = &rows;
    for (int s = 0; s < WARMUP_STEPS; s++)
        if (dpoc_trainer_step(&t, &err)) fail_msg("%s: %s", sc->name, err.msg);
    count_start();
    for (int s = 0; s < COUNTED_STEPS; s++)
        if (dpoc_trainer_step(&t, &err)) {
            atomic_store(&counting, 0);
            fail_msg("%s: %s", sc->name, err.msg);
        }
    char what[128];
    snprintf(what, sizeof what, "%s: %d optimizer steps", sc->name, COUNTED_STEPS);
    count_expect_none(what);
    assert_int_equal(rows, WARMUP_STEPS + COUNTED_STEPS); /* logging_steps 1: the log path ran too */
    dpoc_trainer_free(&t);
}

static void test_step_allocates_nothing(void **state) {
    (void)state;
    static const step_case cases[] = {
        {"shared prompts", "tiny-llama", 1, 0, 0, 0, NULL, 0},
        {"one forward per sequence", "tiny-llama", 0, 0, 0, 0, NULL, 0},
        {"gradient checkpointing", "tiny-qwen2", 1, 1, 0, 1, NULL, 0},
        {"precomputed reference, shuffled", "tiny-qwen2", 0, 0, 1, 1, NULL, 0},
        {"aot (sorts the micro-batch)", "tiny-llama", 1, 0, 0, 1, "aot", 0},
        /* one process: the shard is the whole block, but every stage-2 path runs (reduce, release, slice update) */
        {"zero_stage 2, one forward per sequence", "tiny-llama", 0, 0, 0, 1, NULL, 2},
        {"zero_stage 1, shared prompts", "tiny-qwen2", 1, 0, 0, 0, NULL, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_step_case(&cases[i]);
    if (!ALLOC_HOOKS) {
        print_message("[  SKIPPED ] allocation count: AddressSanitizer owns malloc in this build (the steps ran)\n");
        skip();
    }
}

/* ---- the two halves of a micro-batch ---- */

static int grads_all_zero(const dpoc_trainer *t) {
    for (size_t i = 0; i < t->policy.numel; i++)
        if (t->grads[i] != 0.0f) return 0;
    return 1;
}

/* Forward-and-loss touches no gradient and, with backward, gives what the
 * composed micro-batch gives, bit for bit; an evaluation pass's data set (here
 * a copy of the training set's table) goes through the same path. */
static void run_split(int shared) {
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, "tiny-llama");
    c.shared_prefix = shared;
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(t.shared, shared);
    const dpoc_dataset eval_set = t.data; /* another table over the same pairs */
    const size_t B = c.per_device_train_batch_size, pairs[2] = {1, 2};
    assert_int_equal(B, 2);
    const size_t n = t.policy.numel;
    float *g_split = malloc(n * sizeof *g_split);
    assert_non_null(g_split);
    double s_split[DPOC_MB_N], s_whole[DPOC_MB_N];

    /* warm-up: the first products may set up BLAS and per-thread GEMM state */
    if (dpoc_trainer_micro_batch(&t, pairs, B, 1.0, s_whole, 0, &err)) fail_msg("%s", err.msg);
    memset(t.grads, 0, n * sizeof(float));

    count_start();
    int rc = dpoc_trainer_forward_loss(&t, &eval_set, t.ref_logps, pairs, B, 0.5, s_split, &err);
    count_expect_none("forward and loss");
    if (rc) fail_msg("%s", err.msg);
    assert_true(grads_all_zero(&t));
    assert_int_equal(t.mb.B, B);
    count_start();
    rc = dpoc_trainer_backward(&t, 0, &err);
    count_expect_none("backward");
    if (rc) fail_msg("%s", err.msg);
    assert_false(grads_all_zero(&t));
    memcpy(g_split, t.grads, n * sizeof(float));
    /* the saved dLoss/dlogp goes into the gradients once */
    assert_int_equal(dpoc_trainer_backward(&t, 0, &err), DPOC_EINTERNAL);

    memset(t.grads, 0, n * sizeof(float));
    if (dpoc_trainer_micro_batch(&t, pairs, B, 0.5, s_whole, 0, &err)) fail_msg("%s", err.msg);
    assert_memory_equal(s_split, s_whole, sizeof s_split);
    assert_memory_equal(g_split, t.grads, n * sizeof(float));
    free(g_split);
    dpoc_trainer_free(&t);
}

static void test_forward_backward_split(void **state) {
    (void)state;
    run_split(1);
    run_split(0);
}

/* A data set whose sequences do not fit what init sized is refused before
 * anything is written, on both paths. */
static void run_unfitting(int shared) {
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, "tiny-llama");
    c.shared_prefix = shared;
    c.max_length = 0; /* no truncation: a longer pair stays longer */
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    const size_t L = t.max_T; /* the training set's longest sequence */
    int32_t *tok = malloc(2 * L * sizeof *tok);
    assert_non_null(tok);
    for (size_t i = 0; i < 2 * L; i++) tok[i] = (int32_t)(1 + i % (t.policy.cfg.vocab_size - 1));
    double sums[DPOC_MB_N];
    const size_t two[2] = {0, 1};

    /* one sequence a token longer than the longest */
    dpoc_pair longer = {0, 2, 2, L - 1, 2, 1, 1};
    dpoc_dataset d = {.tokens = tok, .n_tokens = 2 * L, .pairs = &longer, .n_pairs = 1};
    assert_int_equal(dpoc_trainer_forward_loss(&t, &d, NULL, two, 1, 1.0, sums, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "sized its buffers"));
    assert_int_equal(t.mb.B, 0);
    assert_int_equal(dpoc_dataset_max_seq_len(&t.data, 0), L);
    const size_t beyond[1] = {1};
    assert_int_equal(dpoc_trainer_forward_loss(&t, &d, NULL, beyond, 1, 1.0, sums, &err), DPOC_EINTERNAL);

    /* shared path: pairs with one-token prompts and completions of L - 1 tokens
     * each fit max_T but need more rows together than a training micro-batch */
    if (shared && 2 * (2 * L - 1) > t.act_T) {
        dpoc_pair wide[2] = {{0, 1, 1, L - 1, 1, L - 1, 1}, {0, 1, 1, L - 1, 1, L - 1, 2}};
        dpoc_dataset w = {.tokens = tok, .n_tokens = 2 * L, .pairs = wide, .n_pairs = 2};
        assert_int_equal(dpoc_trainer_forward_loss(&t, &w, NULL, two, 2, 1.0, sums, &err), DPOC_EINPUT);
        assert_non_null(strstr(err.msg, "rows"));
    }
    free(tok);
    dpoc_trainer_free(&t);
}

static void test_unfitting_data_refused(void **state) {
    (void)state;
    run_unfitting(1);
    run_unfitting(0);
}

/* ---- the loss ---- */

/* Above 64 pairs aot once sorted through heap arrays, and glibc's qsort takes a
 * heap buffer above 1 KiB (32 items here): a large micro-batch of the sorting
 * losses allocates nothing now, and gives what the one-off entry point gives. */
static void test_loss_allocates_nothing(void **state) {
    (void)state;
    enum { B = 100, MAX_TOK = 7 };
    dpoc_loss_cfg c = {.n_types = 3,
                       .types = {DPOC_LOSS_AOT, DPOC_LOSS_AOT_UNPAIRED, DPOC_LOSS_SFT},
                       .weights = {1.0, 0.5, 0.25},
                       .beta = 0.1,
                       .label_smoothing = 0.1,
                       .discopop_tau = 0.05};
    rng_t r = {7};
    static float lp[2 * B][MAX_TOK], g1[2 * B][MAX_TOK], g2[2 * B][MAX_TOK];
    dpoc_loss_seq seq[2 * B];
    float *d1[2 * B], *d2[2 * B];
    for (size_t i = 0; i < 2 * B; i++) {
        const size_t n_tok = 1 + (size_t)(rng_next(&r) % MAX_TOK);
        /* a few equal log-ratios: ties must sort by index, as before */
        for (size_t k = 0; k < n_tok; k++) lp[i][k] = i % 5 == 0 ? -1.0f : rng_uniform(&r, -4.0f, 0.0f);
        seq[i] = (dpoc_loss_seq){n_tok, n_tok, lp[i], NULL, i % 5 == 0 ? -1.0 : rng_uniform(&r, -20.0f, 0.0f)};
        d1[i] = g1[i];
        d2[i] = g2[i];
    }
    double lc1[B], lr1[B], lc2[B], lr2[B];
    dpoc_loss_out o1 = {0, lc1, lr1}, o2 = {0, lc2, lr2};
    dpoc_err err;
    dpoc_loss_work w;
    if (dpoc_loss_work_init(&w, B, &err)) fail_msg("%s", err.msg);
    count_start();
    int rc = dpoc_loss_compute_in(&w, &c, B, seq, seq + B, 0.5, d1, d1 + B, &o1, &err);
    count_expect_none("the loss of 100 pairs");
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_loss_compute_in(&w, &c, B + 1, seq, seq + B, 0.5, d1, d1 + B, &o1, &err), DPOC_EINTERNAL);
    dpoc_loss_work_free(&w);
    if (dpoc_loss_compute(&c, B, seq, seq + B, 0.5, d2, d2 + B, &o2, &err)) fail_msg("%s", err.msg);
    assert_memory_equal(&o1.loss, &o2.loss, sizeof o1.loss);
    for (size_t i = 0; i < 2 * B; i++) assert_memory_equal(g1[i], g2[i], seq[i].n_tok * sizeof(float));
}

int main(void) {
    /* backtrace() loads its unwinder on first use: do that before anything is counted */
    void *frame[1];
    backtrace(frame, 1);
    /* OpenBLAS's threaded level-3 driver (driver/level3/level3_thread.c) mallocs
     * its job table on every call it splits over threads when built for many
     * CPUs (Debian's is): not dpoc's to remove. One BLAS thread, as ctest runs
     * every unit test, keeps the count on dpoc's own allocations. */
    openblas_set_num_threads(1);
    if (!ALLOC_HOOKS)
        print_message("[  NOTE    ] AddressSanitizer owns malloc in this build: allocations are not counted, the "
                      "rest of each test runs\n");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step_allocates_nothing),
        cmocka_unit_test(test_forward_backward_split),
        cmocka_unit_test(test_unfitting_data_refused),
        cmocka_unit_test(test_loss_allocates_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
