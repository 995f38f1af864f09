/* dpoc bench-comm: an MPI_Allreduce microbenchmark (MPI_FLOAT, MPI_SUM, in place,
 * the operation gradient averaging uses) over message sizes, and a fit of the
 * alpha-beta model of a ring allreduce,
 *     t(n) = 2(p-1) alpha + 2(p-1)/p * n * beta      (p ranks, n bytes),
 * whose alpha and beta tools/scaling uses to predict scaling to more nodes.
 * --shared times the trainer's shared-memory averaging (dpoc_grad_sync_finish,
 * grad_allreduce shared) on the same sizes instead, for comparison. */
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "dpoc/dist.h"
#include "dpoc/err.h"

#define KIB ((size_t)1024)
#define GIB (KIB * KIB * KIB)
#define TARGET_BATCH_S 0.2 /* adaptive repetitions: about this long per size */
#define MIN_ITERS 3
#define MAX_ITERS 1000000
#define MAX_SIZES 64
#define MPI_CHUNK ((size_t)1 << 30) /* MPI counts are int: larger messages go in pieces */

typedef struct {
    size_t min_bytes, max_bytes;
    size_t factor;
    long iters; /* 0: adaptive */
    int json;
    int shared; /* time grad_allreduce shared instead of MPI_Allreduce */
} bench_opts;

static void bench_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc bench-comm [options]      (run it under mpirun -np P)\n\n"
            "Times MPI_Allreduce (MPI_FLOAT, MPI_SUM, in place) over message sizes and fits the\n"
            "alpha-beta model of a ring allreduce: t(n) = 2(p-1) alpha + 2(p-1)/p * n * beta\n"
            "(p ranks, n bytes). Reported time: the slowest rank's mean time per call.\n\n"
            "options:\n"
            "  --min-bytes N   smallest message (default 1K; suffixes K, M, G = 2^10, 2^20, 2^30)\n"
            "  --max-bytes N   largest message (default 1G); every rank allocates it once\n"
            "  --factor F      size step: sizes are min, min*F, min*F^2, ... and max (default 2)\n"
            "  --iters N       timed calls per size (default: adaptive, about %.1f s per size,\n"
            "                  at least %d; an untimed warm-up call and calibration come first)\n"
            "  --json          print one JSON object instead of the table: world_size, nodes, method,\n"
            "                  sizes [{bytes, time_s, iters, algbw_GBps, busbw_GBps}], alpha_s,\n"
            "                  beta_s_per_byte, bandwidth_GBps, r2\n"
            "  --shared        time dpoc's shared-memory gradient averaging (grad_allreduce shared:\n"
            "                  a window per size; sync, sum a slice per rank, copy the other slices,\n"
            "                  sync) instead of MPI_Allreduce; needs the same number (> 1) of ranks\n"
            "                  on every node. The fit then gives the ring-equivalent alpha and beta.\n"
            "  --help          this text\n\n"
            "algbw = bytes / time; busbw = algbw * 2(p-1)/p (the per-link rate of a ring).\n"
            "Fit (alpha, beta >= 0): alpha from the least-squares fit of relative error (the\n"
            "small messages decide it), then beta from the plain least-squares fit of the\n"
            "times with that alpha (the large messages decide it); r2 on the times.\n",
            TARGET_BATCH_S, MIN_ITERS);
}

/* "4096", "64K", "1M", "1G" (binary units); 0 on a bad value */
static size_t parse_bytes(const char *s) {
    if (!s || !isdigit((unsigned char)*s)) return 0;
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return 0;
    unsigned shift = 0;
    if (*end) {
        switch (toupper((unsigned char)*end)) {
        case 'K': shift = 10; break;
        case 'M': shift = 20; break;
        case 'G': shift = 30; break;
        default: return 0;
        }
        end++;
        if (*end == 'i' || *end == 'I') end++;
        if (*end == 'B' || *end == 'b') end++;
        if (*end) return 0;
    }
    if (v > (SIZE_MAX >> shift)) return 0;
    return (size_t)(v << shift);
}

static long parse_long(const char *s) {
    if (!s || !isdigit((unsigned char)*s)) return -1;
    errno = 0;
    char *end = NULL;
    long v = strtol(s, &end, 10);
    return errno || *end ? -1 : v;
}

/* Under mpirun every rank parses the options: only the first one talks before
 * MPI is up (Open MPI, MPICH/Hydra and Slurm's PMI set one of these). */
static int launcher_rank(void) {
    const char *names[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

/* 0 ok, 1 help printed, 2 bad options (message printed) */
static int parse_opts(int argc, char **argv, bench_opts *o) {
    const int talk = launcher_rank() == 0;
    o->min_bytes = KIB;
    o->max_bytes = GIB;
    o->factor = 2;
    o->iters = 0;
    o->json = 0;
    o->shared = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (talk) bench_usage(stdout);
            return 1;
        } else if (!strcmp(a, "--json")) {
            o->json = 1;
        } else if (!strcmp(a, "--shared")) {
            o->shared = 1;
        } else if (!strcmp(a, "--min-bytes") || !strcmp(a, "--max-bytes")) {
            size_t b = parse_bytes(v);
            if (b < sizeof(float)) {
                if (talk)
                    fprintf(stderr, "dpoc bench-comm: %s needs a byte count >= 4 (e.g. 4096, 64K, 1G), got '%s'\n",
                            a, v ? v : "nothing");
                return 2;
            }
            if (!strcmp(a, "--min-bytes")) o->min_bytes = b;
            else o->max_bytes = b;
            i++;
        } else if (!strcmp(a, "--factor")) {
            long f = parse_long(v);
            if (f < 2 || f > 1024) {
                if (talk) fprintf(stderr, "dpoc bench-comm: --factor needs an integer in [2, 1024], got '%s'\n",
                                  v ? v : "nothing");
                return 2;
            }
            o->factor = (size_t)f;
            i++;
        } else if (!strcmp(a, "--iters")) {
            long n = parse_long(v);
            if (n < 1 || n > MAX_ITERS) {
                if (talk) fprintf(stderr, "dpoc bench-comm: --iters needs an integer in [1, %d], got '%s'\n",
                                  MAX_ITERS, v ? v : "nothing");
                return 2;
            }
            o->iters = n;
            i++;
        } else {
            if (talk) fprintf(stderr, "dpoc bench-comm: unknown option '%s' (see dpoc bench-comm --help)\n", a);
            return 2;
        }
    }
    if (o->min_bytes > o->max_bytes) {
        if (talk)
            fprintf(stderr, "dpoc bench-comm: --min-bytes (%zu) is larger than --max-bytes (%zu)\n", o->min_bytes,
                    o->max_bytes);
        return 2;
    }
    return 0;
}

/* MemAvailable from /proc/meminfo in bytes; 0 if unknown */
static uint64_t mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024u;
}

static int allreduce(float *buf, size_t n, MPI_Comm comm) {
    for (size_t off = 0; off < n; off += MPI_CHUNK) {
        size_t k = n - off < MPI_CHUNK ? n - off : MPI_CHUNK;
        int rc = MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)k, MPI_FLOAT, MPI_SUM, comm);
        if (rc != MPI_SUCCESS) return rc;
    }
    return MPI_SUCCESS;
}

static void check_mpi(const dpoc_dist *d, int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING + 64], es[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, es, &len);
    snprintf(msg, sizeof msg, "bench-comm: %s failed: %s", what, es);
    dpoc_dist_abort(d, DPOC_EIO, msg);
}

/* What one timed call averages: buf with MPI_Allreduce, or (sync != NULL) the
 * sync object's own block with dpoc_grad_sync_finish. */
typedef struct {
    float *buf;
    dpoc_grad_sync *sync;
} bench_target;

static void one_call(const dpoc_dist *d, const bench_target *b, size_t n) {
    if (!b->sync) {
        check_mpi(d, allreduce(b->buf, n, d->comm), "MPI_Allreduce");
        return;
    }
    dpoc_err err;
    if (dpoc_grad_sync_finish(b->sync, &err)) {
        char msg[DPOC_ERR_MSG_MAX + 32];
        snprintf(msg, sizeof msg, "bench-comm: %s", err.msg);
        dpoc_dist_abort(d, err.code, msg);
    }
}

/* one timed batch: the slowest rank's mean seconds per call (same value on every rank) */
static double timed_batch(const dpoc_dist *d, const bench_target *b, size_t n, long iters) {
    check_mpi(d, MPI_Barrier(d->comm), "MPI_Barrier");
    double t0 = MPI_Wtime();
    for (long i = 0; i < iters; i++) one_call(d, b, n);
    double t = (MPI_Wtime() - t0) / (double)iters;
    check_mpi(d, MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, d->comm), "MPI_Allreduce");
    return t;
}

/* repetitions for a batch of about TARGET_BATCH_S when one call takes est seconds */
static long iters_for(double est) {
    double want = est > 0 ? TARGET_BATCH_S / est : MAX_ITERS;
    return want < MIN_ITERS ? MIN_ITERS : want > MAX_ITERS ? MAX_ITERS : (long)want;
}

/* Fit t = c0 + c1 * n over all sizes, c0, c1 >= 0, in two least-squares passes.
 * Measured times do not lie on one line: messages that fit in cache move faster
 * than large ones, and a plain fit of both coefficients lets the milliseconds of
 * the large messages swamp the microseconds of the intercept (it comes out
 * negative). So:
 *   c0: intercept of the fit minimizing relative error, sum ((t - fit) / t)^2,
 *       where every size weighs alike - the small messages decide it;
 *   c1: slope of the plain least-squares fit, sum (t - fit)^2, with c0 fixed -
 *       the large (gradient-sized) messages decide it.
 * r2 = 1 - SS_res / SS_tot on the raw times. */
static void fit_line(const double *n, const double *t, size_t k, double *c0, double *c1, double *r2) {
    double S00 = 0, S01 = 0, S11 = 0, R0 = 0, R1 = 0;
    for (size_t i = 0; i < k; i++) {
        const double w = t[i] > 0 ? 1.0 / (t[i] * t[i]) : 0.0;
        S00 += w;
        S01 += w * n[i];
        S11 += w * n[i] * n[i];
        R0 += w * t[i];
        R1 += w * n[i] * t[i];
    }
    const double det = S00 * S11 - S01 * S01;
    double a = k >= 2 && det > 0 ? (R0 * S11 - R1 * S01) / det : 0.0;
    if (a < 0) a = 0;
    double sxx = 0, sxy = 0;
    for (size_t i = 0; i < k; i++) {
        sxx += n[i] * n[i];
        sxy += n[i] * (t[i] - a);
    }
    double b = sxx > 0 ? sxy / sxx : 0.0;
    if (b < 0) b = 0;
    double mean = 0, ss_tot = 0, ss_res = 0;
    for (size_t i = 0; i < k; i++) mean += t[i] / (double)k;
    for (size_t i = 0; i < k; i++) {
        const double e = t[i] - (a + b * n[i]);
        ss_res += e * e;
        ss_tot += (t[i] - mean) * (t[i] - mean);
    }
    *c0 = a;
    *c1 = b;
    *r2 = ss_tot > 0 ? 1.0 - ss_res / ss_tot : 1.0;
}

int dpoc_cli_bench_comm(int argc, char **argv, int *pargc, char ***pargv) {
    bench_opts o;
    int prc = parse_opts(argc, argv, &o);
    if (prc == 1) return 0;
    if (prc) return DPOC_EINPUT;

    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_dist d;
    if (dpoc_dist_init(&d, pargc, pargv, 1, &err)) {
        fprintf(stderr, "dpoc bench-comm: error: %s\n", err.msg);
        return err.code ? err.code : DPOC_EIO;
    }
    const int root = dpoc_dist_is_root(&d);
    const int p = d.world;

    /* message sizes (whole floats) */
    size_t sizes[MAX_SIZES], n_sizes = 0;
    for (size_t b = o.min_bytes; n_sizes < MAX_SIZES - 1; b *= o.factor) {
        size_t fl = b / sizeof(float);
        sizes[n_sizes++] = (fl ? fl : 1) * sizeof(float);
        if (b > o.max_bytes / o.factor) break;
    }
    size_t last = (o.max_bytes / sizeof(float)) * sizeof(float);
    if (sizes[n_sizes - 1] < last) sizes[n_sizes++] = last;
    const size_t max_floats = sizes[n_sizes - 1] / sizeof(float);

    /* the largest buffer, once; every rank on a node allocates it, so check the node's memory too */
    int bad = 0;
    char why[256] = "";
    uint64_t avail = mem_available();
    if (avail && (uint64_t)d.local_size * max_floats * sizeof(float) > avail - avail / 10) {
        bad = 1;
        snprintf(why, sizeof why,
                 "--max-bytes %zu needs %zu x %zu bytes on a node with %d rank(s) and %.2f GB available; "
                 "use a smaller --max-bytes",
                 sizes[n_sizes - 1], (size_t)d.local_size, sizes[n_sizes - 1], d.local_size, (double)avail / 1e9);
    }
    /* --shared: each size gets its own window (below) */
    float *buf = bad || o.shared ? NULL : malloc(max_floats * sizeof(float));
    if (!bad && !o.shared && !buf) {
        bad = 1;
        snprintf(why, sizeof why, "cannot allocate the %zu-byte buffer of --max-bytes; use a smaller --max-bytes",
                 sizes[n_sizes - 1]);
    }
    int any_bad = bad;
    check_mpi(&d, MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, d.comm), "MPI_Allreduce");
    if (any_bad) {
        if (bad) fprintf(stderr, "dpoc bench-comm [rank %d]: %s\n", d.rank, why);
        else if (root) fprintf(stderr, "dpoc bench-comm: another rank could not allocate its buffer\n");
        free(buf);
        dpoc_dist_finalize(&d);
        return DPOC_EINPUT;
    }
    if (buf) memset(buf, 0, max_floats * sizeof(float)); /* touch every page; zeros stay zeros (no overflow, no denormals) */

    /* nodes = ranks that are first on their node */
    int nodes = d.local_rank == 0;
    check_mpi(&d, MPI_Allreduce(MPI_IN_PLACE, &nodes, 1, MPI_INT, MPI_SUM, d.comm), "MPI_Allreduce");

    const double bus = p > 1 ? 2.0 * (p - 1) / p : 0.0;
    if (root && !o.json) {
        printf("dpoc bench-comm: %s, %d rank(s) on %d node(s)%s\n",
               o.shared ? "shared-memory gradient averaging (grad_allreduce shared)"
                        : "MPI_Allreduce (float, sum, in place)",
               p, nodes, p == 1 ? " - one rank: no communication happens" : "");
        printf("%14s %12s %8s %12s %12s\n", "bytes", "time_s", "iters", "algbw_GB/s", "busbw_GB/s");
        fflush(stdout);
    }
    double nb[MAX_SIZES], ts[MAX_SIZES];
    long its[MAX_SIZES];
    for (size_t s = 0; s < n_sizes; s++) {
        const size_t n = sizes[s] / sizeof(float);
        dpoc_grad_sync sync;
        bench_target tg = {buf, NULL};
        if (o.shared) {
            /* collective; the same outcome on every rank (node sizes are compared inside) */
            int rc = dpoc_grad_sync_init(&sync, &d, n, 0, DPOC_ALLREDUCE_SHARED, &err);
            if (rc) {
                if (root) fprintf(stderr, "dpoc bench-comm: --shared: %s\n", err.msg);
                dpoc_dist_finalize(&d);
                return rc;
            }
            tg.sync = &sync;
        }
        long iters = o.iters;
        double est = timed_batch(&d, &tg, n, 1); /* warm-up: untimed, but a first estimate */
        if (!iters) {
            /* calibrate: double the batch until it lasts a tenth of the target */
            for (long k = 2; est * (double)(k / 2) < TARGET_BATCH_S / 10 && k <= MAX_ITERS; k *= 2)
                est = timed_batch(&d, &tg, n, k);
            iters = iters_for(est);
        }
        nb[s] = (double)sizes[s];
        ts[s] = timed_batch(&d, &tg, n, iters);
        /* a hiccup during calibration makes the batch too short: measure again, sized from this batch */
        for (int again = 0; !o.iters && again < 2 && ts[s] * (double)iters < TARGET_BATCH_S / 2 && iters < MAX_ITERS;
             again++) {
            iters = iters_for(ts[s]);
            ts[s] = timed_batch(&d, &tg, n, iters);
        }
        its[s] = iters;
        if (o.shared) dpoc_grad_sync_free(&sync);
        if (root && !o.json) {
            const double alg = ts[s] > 0 ? nb[s] / ts[s] / 1e9 : 0.0;
            printf("%14zu %12.4e %8ld %12.3f %12.3f\n", sizes[s], ts[s], iters, alg, alg * bus);
            fflush(stdout);
        }
    }
    free(buf);

    double alpha = 0, beta = 0, r2 = 0;
    if (p > 1) {
        double c0, c1;
        fit_line(nb, ts, n_sizes, &c0, &c1, &r2);
        alpha = c0 / (2.0 * (p - 1));
        beta = c1 / bus;
    }
    const double bw = beta > 0 ? 1.0 / beta / 1e9 : 0.0;
    if (root && o.json) {
        printf("{\"world_size\": %d, \"nodes\": %d, \"method\": \"%s\", \"sizes\": [", p, nodes,
               o.shared ? "shared" : "mpi_allreduce");
        for (size_t s = 0; s < n_sizes; s++) {
            const double alg = ts[s] > 0 ? nb[s] / ts[s] / 1e9 : 0.0;
            printf("%s{\"bytes\": %zu, \"time_s\": %.6e, \"iters\": %ld, \"algbw_GBps\": %.4f, \"busbw_GBps\": %.4f}",
                   s ? ", " : "", sizes[s], ts[s], its[s], alg, alg * bus);
        }
        printf("], \"alpha_s\": %.6e, \"beta_s_per_byte\": %.6e, \"bandwidth_GBps\": %.4f, ", alpha, beta, bw);
        if (p > 1) printf("\"r2\": %.6f}\n", r2);
        else printf("\"r2\": null}\n");
    } else if (root) {
        if (p == 1)
            printf("fit: one rank - no communication happens: alpha = 0, beta = 0\n");
        else
            printf("fit t(n) = 2(p-1) alpha + 2(p-1)/p n beta:  alpha = %.3f us  beta = %.4g s/GB (%.3f GB/s)  "
                   "R^2 = %.4f\n",
                   alpha * 1e6, beta * 1e9, bw, r2);
    }
    fflush(stdout);
    dpoc_dist_finalize(&d);
    return 0;
}
