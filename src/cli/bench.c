/* `dpoc bench`: training throughput, achieved FLOP rate against the machine's
 * measured sgemm peak, peak memory and where the step time goes. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "backend.h"
#include "commands.h"
#include "core/fileutil.h"
#include "dpoc/config.h"
#include "dpoc/dist.h"
#include "dpoc/err.h"
#include "dpoc/gemm.h"
#include "dpoc/prof.h"
#include "dpoc/runtime.h"
#include "dpoc/trainer.h"


static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc bench --config FILE.json [--set key=value ...] [--steps N] [--warmup W] [--json]\n"
            "       dpoc bench --peak [--json]\n\n"
            "Runs W warm-up steps (default 2), then N timed training steps (default 5) of the config's\n"
            "training (run it under mpirun -np P for P ranks; nothing is written to output_dir) and reports:\n"
            "  tokens_per_second  prompt + completion tokens of both sequences of each pair, all ranks\n"
            "                     (TRL's num_tokens), per second of the timed steps\n"
            "  step_time_s        mean time of a timed optimizer step\n"
            "  gflops             the FLOPs the steps needed (policy forward + backward = 3x forward; with\n"
            "                     LoRA the frozen base 2x: no weight gradient; the reference forward unless\n"
            "                     precomputed) per second, all ranks\n"
            "  peak_gflops        OpenBLAS sgemm on large square matrices (1024..3072), measured in the same\n"
            "                     run on every rank at once with the threads each rank trains with, summed\n"
            "  bf16_peak_gflops   the same for the bf16 products (oneDNN; bf16 operands, fp32 accumulation)\n"
            "  mfu                gflops / the peak of the precision the run's products used (bf16 config key)\n"
            "  fma_limit_gflops   the CPU's fp32 FMA limit: cores x clock x FLOP/cycle (derivation in --peak)\n"
            "  fma_measured_gflops  independent FMA chains timed on each core used\n"
            "  machine            CPU, dpoc's SIMD level, BLAS, its kernel and threads, self-check, precision\n"
            "  peak_rss_bytes     rank 0's peak resident set (peak_rss_bytes_max_rank: the largest rank's;\n"
            "                     peak_rss_bytes_total: summed over the ranks; pages of a shared-memory\n"
            "                     window count in every rank that touched them)\n"
            "  breakdown          seconds per timed step by operation (mean over ranks): gemm, attention,\n"
            "                     pointwise, lm_head, loss, optimizer, communication, data, other\n"
            "  loss               the training loss of the last step\n"
            "With precompute_ref_log_probs the reference pass runs (untimed) before the warm-up.\n"
            "--peak measures only the peaks and the FMA limit.\n");
}

static double peak_rss_bytes(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0.0;
    return (double)ru.ru_maxrss * 1024.0; /* Linux: kilobytes */
}

typedef struct {
    double loss;
    int seen;
} last_loss;

static int keep_loss(void *ctx, const dpoc_log_record *rec, dpoc_err *err) {
    (void)err;
    last_loss *l = ctx;
    for (size_t i = 0; i < rec->n; i++)
        if (!strcmp(rec->names[i], "loss")) l->loss = rec->values[i], l->seen = 1;
    return 0;
}

int dpoc_cli_bench(int argc, char **argv, int *pargc, char ***pargv) {
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_config cfg;
    dpoc_config_defaults(&cfg);
    const char *config_path = NULL;
    size_t steps = 5, warmup = 2;
    int json = 0, peak_only = 0, rc = 0;
    for (int i = 0; i < argc && !rc; i++) {
        const char *k = argv[i];
        if (!strcmp(k, "--help") || !strcmp(k, "-h")) {
            bench_usage(stdout);
            return 0;
        } else if (!strcmp(k, "--json")) json = 1;
        else if (!strcmp(k, "--peak")) peak_only = 1;
        else if (i + 1 >= argc) rc = dpoc_errf(&err, DPOC_EINPUT, "unexpected argument '%s' (see dpoc bench --help)", k);
        else if (!strcmp(k, "--config")) config_path = argv[++i];
        else if (!strcmp(k, "--set")) i++;
        else if (!strcmp(k, "--steps") || !strcmp(k, "--warmup")) {
            char *end = NULL;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < (k[2] == 's' ? 1 : 0)) rc = dpoc_errf(&err, DPOC_EINPUT, "%s '%s': expected a count", k, argv[i]);
            else if (k[2] == 's') steps = (size_t)v;
            else warmup = (size_t)v;
        } else rc = dpoc_errf(&err, DPOC_EINPUT, "unknown option '%s' (see dpoc bench --help)", k);
    }
    if (!rc && !peak_only && !config_path) rc = dpoc_errf(&err, DPOC_EINPUT, "--config FILE (or --peak) is required");
    if (!rc && config_path) rc = dpoc_config_load_file(&cfg, config_path, &err);
    for (int i = 0; !rc && i < argc; i++)
        if (!strcmp(argv[i], "--set")) rc = dpoc_config_set(&cfg, argv[++i], &err);
        else if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "--steps") || !strcmp(argv[i], "--warmup")) i++;
    if (!rc && config_path) {
        cfg.max_steps = (long)(warmup + steps); /* the schedule covers exactly the measured run */
        cfg.logging_steps = 1;
        cfg.save_steps = 0;
        rc = dpoc_config_finalize(&cfg, &err);
    }
    if (rc) {
        fprintf(stderr, "dpoc bench: error: %s\n", err.msg);
        return rc;
    }
    dpoc_dist dist;
    if ((rc = dpoc_dist_init(&dist, pargc, pargv, (int)cfg.num_threads, &err))) {
        fprintf(stderr, "dpoc bench: error: %s\n", err.msg);
        return rc;
    }
    const int root = dpoc_dist_is_root(&dist);
    rc = cli_backend_check(&err);
    if (!rc && root && !json) {
        char machine[1024];
        dpoc_runtime_describe(machine, sizeof machine);
        printf("dpoc bench: %s\n", machine);
        fflush(stdout);
    }
    dpoc_trainer *t = NULL;
    dpoc_prof prof;
    memset(&prof, 0, sizeof prof);
    last_loss ll = {0, 0};
    /* per-rank values summed over the ranks */
    enum { V_FLOPS, V_TOKENS, V_RSS, V_PEAK, V_PEAK_BF16, V_FMA_LIMIT, V_FMA_MEASURED, V_PROF };
    double v[V_PROF + DPOC_PROF_N + 1];
    memset(v, 0, sizeof v);
    double rss_max = 0.0, wall = 0.0, comm0 = 0.0;
    if (!rc && !peak_only) {
        t = dpoc_malloc(sizeof *t, "trainer", &err);
        rc = t ? dpoc_trainer_init(t, &cfg, &dist, &err) : DPOC_ENOMEM;
        if (rc) {
            free(t);
            t = NULL;
        }
        if (!rc && cfg.precompute_ref_log_probs) {
            rc = dpoc_trainer_compute_ref_logps(t, &err);
            if (!rc) dpoc_trainer_drop_ref(t);
        }
        if (!rc) {
            t->on_log = root ? keep_loss : NULL;
            t->on_log_ctx = &ll;
        }
        for (size_t s = 0; !rc && s < warmup; s++) rc = dpoc_trainer_step(t, &err);
        if (!rc) rc = dpoc_dist_barrier(&dist, &err);
        if (!rc) {
            t->prof = &prof;
            t->flops = 0.0;
            comm0 = dist.comm_time_s;
            const size_t tokens0 = t->total_tokens;
            const double t0 = dpoc_prof_clock();
            for (size_t s = 0; !rc && s < steps; s++) rc = dpoc_trainer_step(t, &err);
            if (!rc) rc = dpoc_dist_barrier(&dist, &err);
            wall = dpoc_prof_clock() - t0;
            prof.s[DPOC_PROF_COMM] += dist.comm_time_s - comm0;
            v[V_FLOPS] = t->flops;
            v[V_TOKENS] = root ? (double)(t->total_tokens - tokens0) : 0.0; /* already summed over ranks */
        }
    }
    /* the peak with every rank's BLAS at work at once, as in training */
    if (!rc) rc = dpoc_dist_barrier(&dist, &err);
    if (!rc) rc = dpoc_gemm_measure_peak(DPOC_GEMM_FP32, &v[V_PEAK], &err);
    if (!rc) rc = dpoc_dist_barrier(&dist, &err);
    if (!rc) rc = dpoc_gemm_measure_peak(DPOC_GEMM_BF16, &v[V_PEAK_BF16], &err);
    /* the FMA limit of the cores this rank's threads can have, and one core measured */
    const dpoc_cpu *cpu = &dpoc_rt()->cpu;
    const long node_cores = cpu->cores / (dist.local_size > 0 ? dist.local_size : 1);
    const double my_cores = (double)(dist.threads < node_cores ? dist.threads : (node_cores > 0 ? node_cores : 1));
    v[V_FMA_LIMIT] = dpoc_cpu_fma_limit_gflops(cpu, my_cores);
    unsigned lanes = 0;
    if (!rc) rc = dpoc_dist_barrier(&dist, &err);
    if (!rc) v[V_FMA_MEASURED] = my_cores * dpoc_cpu_measure_fma_gflops(cpu, &lanes);
    v[V_RSS] = peak_rss_bytes();
    rss_max = v[V_RSS];
    /* the largest rank's peak too: with ZeRO the ranks differ (rank 0 writes, slices differ by rounding) */
    uint64_t rss_lo = (uint64_t)v[V_RSS], rss_hi = rss_lo;
    if (!rc) rc = dpoc_dist_min_max_u64(&dist, &rss_lo, &rss_hi, 1, &err);
    for (int k = 0; k < DPOC_PROF_N; k++) v[V_PROF + k] = prof.s[k];
    if (!rc) rc = dpoc_dist_sum_doubles(&dist, v, sizeof v / sizeof v[0], &err);
    if (!rc && root) {
        const double W = (double)dist.world;
        const double peak32 = v[V_PEAK], peak16 = v[V_PEAK_BF16], limit = v[V_FMA_LIMIT], fma = v[V_FMA_MEASURED];
        const int bf16_run = dpoc_rt()->precision == DPOC_PRECISION_BF16;
        const double peak = bf16_run && !peak_only ? peak16 : peak32; /* MFU's denominator */
        const double fpc = dpoc_cpu_flops_per_cycle(cpu), cores_used = limit / (cpu->clock_ghz * fpc);
        char how[512];
        snprintf(how, sizeof how,
                 "%.0f core(s) x %.2f GHz (%s) x %.0f FLOP/cycle (%u x %u-bit FMA x 2: %s)", cores_used,
                 cpu->clock_ghz, cpu->clock_source, fpc, cpu->fma_units, cpu->fma_bits, cpu->fma_source);
        char *machine = dpoc_runtime_json();
        if (peak_only && json) {
            printf("{\"peak_gflops\": %.3f, \"bf16_peak_gflops\": %.3f, \"fma_limit_gflops\": %.3f, \"fma_limit_derivation\": \"%s\", "
                   "\"fma_measured_gflops\": %.3f, \"peak_fraction_of_fma_limit\": %.4f, "
                   "\"peak_fraction_of_fma_measured\": %.4f, \"world_size\": %d, \"threads_per_rank\": %d, "
                   "\"machine\": %s}\n",
                   peak, peak16, limit, how, fma, limit > 0 ? peak / limit : 0.0, fma > 0 ? peak / fma : 0.0, dist.world,
                   dist.threads, machine ? machine : "{}");
        } else if (peak_only) {
            printf("sgemm peak: %.1f GFLOP/s (%d rank(s) x %d thread(s))\n", peak, dist.world, dist.threads);
            printf("bf16 GEMM peak: %.1f GFLOP/s (%s; bf16 operands, fp32 accumulation) = %.2fx sgemm\n", peak16,
                   dpoc_gemm_bf16_available() ? "oneDNN" : "fp32 fallback: no fast bf16 matmul", peak > 0 ? peak16 / peak : 0.0);
            printf("fp32 FMA limit: %.1f GFLOP/s = %s\n", limit, how);
            printf("  sgemm peak = %.1f%% of it%s\n", limit > 0 ? 100.0 * peak / limit : 0.0,
                   limit > 0 && fma > limit ? " (the limit is at the nominal clock; the measured FMA rate below shows "
                                              "the cores run faster)"
                                            : "");
            printf("fp32 FMA measured: %.1f GFLOP/s (independent %u-lane FMA chains on each core used: %.2f GHz "
                   "effective)\n  sgemm peak = %.1f%% of it\n",
                   fma, lanes, cores_used > 0 ? fma / (cores_used * fpc) : 0.0, fma > 0 ? 100.0 * peak / fma : 0.0);
        } else {
            const double tps = v[V_TOKENS] / wall, gflops = v[V_FLOPS] / wall * 1e-9, step = wall / (double)steps;
            double accounted = 0.0;
            for (int k = 0; k < DPOC_PROF_N; k++) accounted += v[V_PROF + k] / W;
            if (json) {
                printf("{\"tokens_per_second\": %.3f, \"step_time_s\": %.6f, \"gflops\": %.3f, \"peak_gflops\": %.3f, "
                       "\"bf16_peak_gflops\": %.3f, \"precision\": \"%s\", \"mfu\": %.6f, \"peak_rss_bytes\": %.0f, \"peak_rss_bytes_max_rank\": %.0f, \"peak_rss_bytes_total\": %.0f, \"zero_stage\": %zu, \"loss\": %.9g, "
                       "\"steps\": %zu, \"warmup_steps\": %zu, \"world_size\": %d, \"threads_per_rank\": %d, "
                       "\"precompute_ref_log_probs\": %s, \"fma_limit_gflops\": %.3f, \"fma_measured_gflops\": %.3f, "
                       "\"machine\": %s, \"breakdown\": {",
                       tps, step, gflops, peak32, peak16, bf16_run ? "bf16" : "fp32", peak > 0 ? gflops / peak : 0.0,
                       rss_max, (double)rss_hi, v[V_RSS], cfg.zero_stage, ll.loss, steps,
                       warmup, dist.world, dist.threads, cfg.precompute_ref_log_probs ? "true" : "false", limit, fma,
                       machine ? machine : "{}");
                for (int k = 0; k < DPOC_PROF_N; k++)
                    printf("\"%s\": %.6f, ", dpoc_prof_name((dpoc_prof_kind)k), v[V_PROF + k] / W / (double)steps);
                printf("\"other\": %.6f}}\n", (wall - accounted) / (double)steps);
            } else {
                printf("dpoc bench: %zu timed steps after %zu warm-up, %d rank(s) x %d thread(s)\n", steps, warmup,
                       dist.world, dist.threads);
                printf("  tokens/s        %.1f\n  step time       %.3f s\n  achieved        %.1f GFLOP/s\n"
                       "  sgemm peak      %.1f GFLOP/s (fp32 FMA limit %.1f, measured %.1f); bf16 GEMM peak %.1f\n"
                       "  MFU             %.1f%% (of the %s peak)\n  peak RSS        %.0f MiB (rank 0), %.0f MiB (largest rank), "
                       "%.0f MiB (all ranks; zero_stage %zu)\n  loss            %.6f\n  time per step by operation (mean over ranks):\n",
                       tps, step, gflops, peak32, limit, fma, peak16, peak > 0 ? 100.0 * gflops / peak : 0.0,
                       bf16_run ? "bf16 GEMM" : "sgemm", rss_max / 1048576.0, (double)rss_hi / 1048576.0,
                       v[V_RSS] / 1048576.0, cfg.zero_stage, ll.loss);
                for (int k = 0; k < DPOC_PROF_N; k++)
                    printf("    %-14s %8.3f s  %5.1f%%\n", dpoc_prof_name((dpoc_prof_kind)k), v[V_PROF + k] / W / (double)steps,
                           100.0 * v[V_PROF + k] / W / wall);
                printf("    %-14s %8.3f s  %5.1f%%\n", "other", (wall - accounted) / (double)steps,
                       100.0 * (wall - accounted) / wall);
            }
        }
        free(machine);
        fflush(stdout);
    }
    if (t) {
        if (rc) dpoc_dist_mark_failed(&dist); /* dpoc_dist_abort follows: skip collective frees */
        dpoc_trainer_free(t);
        free(t);
    }
    if (rc) {
        fprintf(stderr, "dpoc bench: error: %s\n", err.msg);
        if (dist.world > 1) dpoc_dist_abort(&dist, rc, err.msg);
    }
    dpoc_dist_finalize(&dist);
    return rc;
}
