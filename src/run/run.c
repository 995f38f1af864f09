/* A training run: the trainer plus everything around it that a batch job needs
 * (metrics files, checkpoints, resume, signals, a watchdog). */
#include "dpoc/run.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/checkpoint.h"
#include "dpoc/evaluate.h"
#include "dpoc/lora.h"
#include "dpoc/metrics.h"
#include "dpoc/ref_logps.h"
#include "dpoc/runtime.h"
#include "dpoc/tensorboard.h"
#include "dpoc/trainer.h"

/* The signal handler can only talk through process-wide state: a flag and the
 * time it arrived. Nothing else is global. */
static volatile sig_atomic_t g_stop_signal;
static struct timespec g_signal_time;

static void on_stop_signal(int sig) {
    if (!g_stop_signal) clock_gettime(CLOCK_MONOTONIC, &g_signal_time); /* async-signal-safe */
    g_stop_signal = sig;
}

static void install_handlers(struct sigaction *old) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    const int sigs[3] = {SIGUSR1, SIGTERM, SIGINT};
    for (int i = 0; i < 3; i++) sigaction(sigs[i], &sa, &old[i]);
}

static void restore_handlers(const struct sigaction *old) {
    const int sigs[3] = {SIGUSR1, SIGTERM, SIGINT};
    for (int i = 0; i < 3; i++) sigaction(sigs[i], &old[i], NULL);
}

/* ---- watchdog ---- */

/* Ends the process when no step makes progress for collective_timeout_s: a rank
 * stuck in a collective whose peer died must not hang the allocation. Only the
 * main thread calls MPI (MPI_THREAD_FUNNELED); _exit makes mpirun end the job. */
typedef struct {
    dpoc_trainer *t;
    volatile int stop;
} watchdog_ctx;

static void *watchdog_main(void *arg) {
    watchdog_ctx *w = arg;
    const useconds_t poll_us = 200000;
    while (!w->stop) {
        usleep(poll_us);
        double idle = dpoc_now_s() - w->t->progress_time;
        if (w->t->progress_time > 0 && idle > w->t->cfg.collective_timeout_s) {
            fprintf(stderr, "dpoc [rank %d]: no progress for %.0f s (collective_timeout_s); ending the job\n",
                    w->t->dist ? w->t->dist->rank : 0, idle);
            fflush(stderr);
            _exit(DPOC_EIO);
        }
    }
    return NULL;
}

/* Did any rank get a stop signal? Every rank must take the same decision. */
static int agree_on_stop(dpoc_trainer *t, dpoc_err *err, int *stop) {
    double v = g_stop_signal ? 1.0 : 0.0;
    DPOC_TRY(dpoc_dist_sum_doubles(t->dist, &v, 1, err));
    *stop = v > 0;
    return 0;
}

/* One set's reference log-probs (the training set's, or the evaluation set's):
 * rank 0 looks for output_dir/<file> with the right fingerprint and shares what
 * it found; otherwise every rank computes its share and rank 0 stores the result. */
static int precompute_set(dpoc_trainer *t, int eval, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const int root = dpoc_dist_is_root(t->dist);
    const size_t n = eval ? t->eval.n_pairs : t->data.n_pairs;
    const uint64_t key = eval ? dpoc_trainer_eval_ref_logps_key(t) : dpoc_trainer_ref_logps_key(t);
    char path[DPOC_PATH_MAX + 32];
    DPOC_TRY(dpoc_path_join(path, sizeof path, cfg->output_dir, eval ? DPOC_EVAL_REF_LOGPS_FILE : DPOC_REF_LOGPS_FILE, err));
    double *v = dpoc_calloc(2 * n + 1, sizeof(double), "reference log-probs", err);
    if (!v) return DPOC_ENOMEM;
    char why[128] = "";
    int found = 0, rc = 0;
    const double t0 = dpoc_now_s();
    if (root) rc = dpoc_ref_logps_read(path, key, n, v, &found, why, sizeof why, err);
    /* one sum shares rank 0's flag and values (the others contribute zeros) */
    v[2 * n] = found;
    if (!rc && t->dist) rc = dpoc_dist_sum_doubles(t->dist, v, 2 * n + 1, err);
    found = v[2 * n] > 0.5;
    const char *what = eval ? "evaluation pairs" : "pairs";
    if (!rc && found) {
        rc = eval ? dpoc_trainer_set_eval_ref_logps(t, v, err) : dpoc_trainer_set_ref_logps(t, v, err);
        if (!rc && root) printf("dpoc: reference log-probs of %zu %s reused from %s\n", n, what, path);
    } else if (!rc) {
        rc = eval ? dpoc_trainer_compute_eval_ref_logps(t, err) : dpoc_trainer_compute_ref_logps(t, err);
        const double *got = eval ? t->eval_ref_logps : t->ref_logps;
        if (!rc && root) rc = dpoc_mkdirs(cfg->output_dir, err);
        if (!rc && root) rc = dpoc_ref_logps_write(path, key, n, got, err);
        if (!rc && root)
            printf("dpoc: reference log-probs of %zu %s computed in %.2f s (%s: %s), stored\n", n, what,
                   dpoc_now_s() - t0, path, why);
    }
    fflush(stdout);
    free(v);
    return rc;
}

/* precompute_ref_log_probs: the training set's and (with eval_file) the
 * evaluation set's reference log-probs, then the reference model is let go. */
static int precompute_ref(dpoc_trainer *t, dpoc_err *err) {
    DPOC_TRY(precompute_set(t, 0, err));
    if (t->has_eval) DPOC_TRY(precompute_set(t, 1, err));
    dpoc_trainer_drop_ref(t);
    return 0;
}

/* An evaluation pass and its row (every rank takes part). */
static int evaluate(dpoc_trainer *t, dpoc_err *err) {
    dpoc_eval_result r;
    DPOC_TRY(dpoc_trainer_evaluate(t, &r, err));
    return dpoc_trainer_log_eval(t, &r, err);
}

/* Rank 0's writers of a logged row: metrics.jsonl + metrics.h5, and the
 * TensorBoard event file when report_to names it. */
typedef struct {
    dpoc_metrics_writer *metrics;
    dpoc_tb_writer *tb; /* NULL: not reporting to TensorBoard */
} run_loggers;

static int log_row(void *ctx, const dpoc_log_record *rec, dpoc_err *err) {
    run_loggers *l = ctx;
    DPOC_TRY(dpoc_metrics_write(l->metrics, rec, err));
    return l->tb ? dpoc_tb_write_log(l->tb, rec, err) : 0;
}

/* Opens the event file in the run's logging_dir; a resume cuts what is there to
 * the checkpoint's step. The config is the "args" text, as HF's callback writes it. */
static int open_tensorboard(const dpoc_config *cfg, long resumed_step, const char *config_json, dpoc_tb_writer *tb,
                            dpoc_err *err) {
    char dir[DPOC_PATH_MAX + 600];
    DPOC_TRY(dpoc_tb_logdir(cfg->logging_dir, cfg->output_dir, resumed_step >= 0, dir, sizeof dir, err));
    /* indented as transformers' to_json_string (json.dumps(indent=2)); tabs here */
    cJSON *o = cJSON_Parse(config_json);
    char *pretty = o ? cJSON_Print(o) : NULL;
    cJSON_Delete(o);
    int rc = dpoc_tb_open(tb, dir, resumed_step, pretty ? pretty : config_json, stdout, err);
    free(pretty);
    if (!rc) printf("dpoc: TensorBoard events in %s (tensorboard --logdir %s/runs)\n", tb->path, cfg->output_dir);
    return rc;
}


static int checkpoint(dpoc_trainer *t, dpoc_err *err) {
    int rc = 0;
    /* with ZeRO every rank sends its slice of the moments to rank 0, which writes */
    const int sharded = t->zero_stage && t->dist && t->dist->world > 1;
    if (dpoc_dist_is_root(t->dist) || sharded) {
        char path[DPOC_PATH_MAX + 160];
        double t0 = dpoc_now_s();
        rc = dpoc_ckpt_save(t, t->cfg.save_total_limit, path, sizeof path, err);
        if (!rc && dpoc_dist_is_root(t->dist)) printf("dpoc: checkpoint %s written in %.2f s\n", path, dpoc_now_s() - t0);
        fflush(stdout);
    }
    /* the others wait, so that no rank exits before the checkpoint is durable */
    double status = rc;
    int rc2 = dpoc_dist_sum_doubles(t->dist, &status, 1, err);
    /* rank 0's status (the others' are 0 but with ZeRO, where all share the cause) gives the exit code */
    const int code = status == DPOC_EINPUT || status == DPOC_ENOMEM ? (int)status : DPOC_EIO;
    if (!rc && status != 0) {
        rc = dpoc_errf(err, code, "rank 0 could not write the checkpoint");
        dpoc_dist_mark_failed_elsewhere(t->dist); /* rank 0 says why */
    }
    return rc ? rc : rc2;
}

int dpoc_run_train(const dpoc_config *cfg, dpoc_dist *dist, const char *resume, dpoc_err *err) {
    /* handlers first: a signal while loading must still end in a checkpoint-or-nothing stop */
    struct sigaction old[3];
    install_handlers(old);
    dpoc_trainer *t = dpoc_malloc(sizeof *t, "trainer", err);
    if (!t) {
        restore_handlers(old);
        return DPOC_ENOMEM;
    }
    /* every rank resolves and restores the same file (rank 0's choice is shared
     * implicitly: they all see the same output_dir) */
    char ckpt[DPOC_PATH_MAX + 300] = "";
    int rc = resume ? dpoc_ckpt_resolve(cfg->output_dir, resume, ckpt, sizeof ckpt, err) : 0;
    /* bf16 auto resumes with the precision the checkpoint was trained with: bit-exact */
    dpoc_config run_cfg = *cfg;
    int ckpt_bf16 = 0;
    if (!rc && ckpt[0] && cfg->bf16 == DPOC_BF16_AUTO && !(rc = dpoc_ckpt_precision(ckpt, &ckpt_bf16, err)))
        run_cfg.bf16 = ckpt_bf16 ? DPOC_BF16_TRUE : DPOC_BF16_FALSE;
    const double t_load = dpoc_now_s();
    if (!rc) rc = dpoc_trainer_init(t, &run_cfg, dist, err);
    const double load_s = dpoc_now_s() - t_load;
    if (!rc && run_cfg.bf16 != cfg->bf16)
        snprintf(dpoc_rt()->precision_why, sizeof dpoc_rt()->precision_why,
                 "bf16 auto: the checkpoint's %s kept, so that the resumed run is bit-exact", ckpt_bf16 ? "bf16" : "fp32");
    if (rc) {
        free(t);
        restore_handlers(old);
        return rc;
    }
    const int root = dpoc_dist_is_root(dist);
    /* before a checkpoint is restored: with no separate reference model the
     * starting policy is the reference */
    if (cfg->precompute_ref_log_probs) rc = precompute_ref(t, err);
    if (rc) {
        dpoc_dist_mark_failed(dist); /* the caller ends the job; peers may be inside a collective */
        dpoc_trainer_free(t);
        free(t);
        restore_handlers(old);
        return rc;
    }
    if (!rc && ckpt[0]) {
        rc = dpoc_ckpt_restore(t, ckpt, err);
        if (!rc && root) printf("dpoc: resumed from %s at step %ld\n", ckpt, t->global_step);
    }
    dpoc_metrics_writer mw;
    memset(&mw, 0, sizeof mw);
    mw.h5 = -1;
    dpoc_tb_writer tb;
    memset(&tb, 0, sizeof tb);
    run_loggers loggers = {&mw, NULL};
    if (!rc && root) {
        char *config_json = dpoc_config_to_json(cfg);
        const long resumed_step = ckpt[0] ? t->global_step : -1;
        rc = config_json ? dpoc_mkdirs(cfg->output_dir, err) : dpoc_errf(err, DPOC_ENOMEM, "out of memory");
        if (!rc) rc = dpoc_metrics_open(&mw, cfg->output_dir, config_json, resumed_step, err);
        if (!rc && cfg->report_tensorboard && !(rc = open_tensorboard(cfg, resumed_step, config_json, &tb, err)))
            loggers.tb = &tb;
        free(config_json);
        mw.total_steps = t->total_steps;
        t->on_log = log_row;
        t->on_log_ctx = &loggers;
    }
    if (!rc && root) {
        char machine[1024];
        dpoc_runtime_describe(machine, sizeof machine);
        printf("dpoc: %s\n", machine);
        printf("dpoc: %zu pairs (%zu dropped: prompt >= max_length), %zu parameters, %d rank(s) x %d thread(s), "
               "%ld steps (%zu per epoch), warmup %ld; models and data loaded in %.2f s (%s); gradients %s; "
               "prompts %s\n",
               t->data.n_pairs, t->data.n_dropped_prompt_too_long, t->policy.numel, dist ? dist->world : 1,
               dist ? dist->threads : 1, t->total_steps, t->updates_per_epoch, t->warmup_steps, load_s,
               cfg->model_loading_broadcast ? "rank 0 read, broadcast" : "each rank mapped the files",
               dpoc_grad_sync_path_name(&t->sync),
               t->shared ? "shared by each pair's two sequences"
                         : cfg->shared_prefix ? "not shared (a pair's sequences differ in their prompt tokens)"
                                              : "not shared (shared_prefix false)");
        fflush(stdout);
    }
    watchdog_ctx wd = {t, 0};
    pthread_t wd_thread;
    int wd_started = 0;
    t->progress_time = dpoc_now_s();
    if (!rc) wd_started = pthread_create(&wd_thread, NULL, watchdog_main, &wd) == 0;
    int stopped = 0;
    /* test-only: raise SIGUSR1 on this process after step N (DPOC_TEST_SIGNAL_AT_STEP=N) */
    const char *sig_at = getenv("DPOC_TEST_SIGNAL_AT_STEP");
    const long signal_at = sig_at ? atol(sig_at) : -1;
    t->epoch_f = (double)t->global_step / (double)t->updates_per_epoch;
    if (!rc && t->has_eval && cfg->eval_on_start) rc = evaluate(t, err);
    while (!rc && t->global_step < t->total_steps) {
        if ((rc = agree_on_stop(t, err, &stopped)) || stopped) break;
        if ((rc = dpoc_trainer_step(t, err))) break;
        /* as HF's _maybe_log_save_evaluate: the step's log row, then evaluation, then saving */
        if (dpoc_trainer_eval_due(t) && (rc = evaluate(t, err))) break;
        if (t->global_step == signal_at) raise(SIGUSR1);
        if (cfg->save_steps && t->global_step % (long)cfg->save_steps == 0 && t->global_step < t->total_steps)
            rc = checkpoint(t, err);
    }
    if (!rc && stopped) {
        rc = checkpoint(t, err);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double dt = (double)(now.tv_sec - g_signal_time.tv_sec) + 1e-9 * (double)(now.tv_nsec - g_signal_time.tv_nsec);
        if (root)
            printf("dpoc: stopped by signal %d at step %ld; checkpointed %.2f s after the signal (exit %d: "
                   "checkpointed, not finished)\n",
                   (int)g_stop_signal, t->global_step, dt, DPOC_EXIT_CHECKPOINTED);
        fflush(stdout);
        if (!rc) rc = DPOC_EXIT_CHECKPOINTED;
    } else if (!rc) {
        /* the end of training: a final checkpoint (resume --auto then finds nothing left to do) and
         * the trained policy as a Hugging Face directory, as TRL's save_model leaves it */
        rc = checkpoint(t, err);
        /* with LoRA the adapter alone as a PEFT directory (adapter_config.json +
         * adapter_model.safetensors), as TRL + peft's save_model writes it */
        if (!rc && root)
            rc = dpoc_lora_attached(&t->policy)
                     ? dpoc_lora_save_peft(&t->policy, &t->cfg.lora, cfg->model_name_or_path, cfg->output_dir, err)
                     : dpoc_model_save(&t->policy, cfg->output_dir, cfg->model_name_or_path, err);
    }
    if (wd_started) {
        wd.stop = 1;
        pthread_join(wd_thread, NULL);
    }
    restore_handlers(old);
    if (root) dpoc_metrics_close(&mw);
    if (root) dpoc_tb_close(&tb);
    /* an error here may be this rank's alone: the caller ends the job (dpoc_dist_abort) */
    if (rc && rc != DPOC_EXIT_CHECKPOINTED) dpoc_dist_mark_failed(dist);
    dpoc_trainer_free(t);
    free(t);
    return rc;
}
