/* MPI start-up, collectives with timing, and bucketed gradient averaging. */
#define _GNU_SOURCE
#include "dpoc/dist.h"

#include <cblas.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static double wtime(void) { return MPI_Wtime(); }

static int mpi_check(int rc, const char *what, dpoc_err *err) {
    if (rc == MPI_SUCCESS) return 0;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return dpoc_errf(err, DPOC_EIO, "%s failed: %s", what, msg);
}

static int env_threads(void) {
    const char *names[] = {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"};
    for (size_t i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) {
            int n = atoi(v);
            if (n > 0) return n;
        }
    }
    return 0;
}

int dpoc_dist_init(dpoc_dist *d, int *argc, char ***argv, int requested_threads, dpoc_err *err) {
    memset(d, 0, sizeof *d);
    d->comm = MPI_COMM_WORLD;
    d->node_comm = MPI_COMM_NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return dpoc_errf(err, DPOC_EIO, "MPI_Init_thread failed");
        d->owns_mpi = 1;
        if (provided < MPI_THREAD_FUNNELED) {
            MPI_Finalize();
            d->owns_mpi = 0;
            return dpoc_errf(err, DPOC_EIO, "MPI provides thread level %d, dpoc needs MPI_THREAD_FUNNELED", provided);
        }
    }
    /* errors come back as codes, so a failure is reported with its context */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(d->comm, &d->rank);
    MPI_Comm_size(d->comm, &d->world);
    DPOC_TRY(mpi_check(MPI_Comm_split_type(d->comm, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &d->node_comm),
                       "MPI_Comm_split_type", err));
    MPI_Comm_rank(d->node_comm, &d->local_rank);
    MPI_Comm_size(d->node_comm, &d->local_size);
    cpu_set_t set;
    CPU_ZERO(&set);
    d->cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    /* mpirun binds each of <= 2 ranks to one core: then cores is 1 and the
     * per-node share below is what is left of it */
    int threads = requested_threads > 0 ? requested_threads : env_threads();
    if (threads <= 0) {
        long online = sysconf(_SC_NPROCESSORS_ONLN);
        int node_cores = d->cores;
        /* when every rank may run on every core, share them among the node's ranks */
        if (online > 0 && d->cores >= online) node_cores = (int)online / (d->local_size > 0 ? d->local_size : 1);
        threads = node_cores > 0 ? node_cores : 1;
    }
    d->threads = threads;
    openblas_set_num_threads(threads);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (d->rank == 0 && online > 0 && (long)d->local_size * threads > online)
        fprintf(stderr,
                "dpoc: warning: %d ranks x %d threads on this node exceed its %ld cores (oversubscribed; "
                "expect slow steps)\n",
                d->local_size, threads, online);
    return 0;
}

void dpoc_dist_finalize(dpoc_dist *d) {
    if (d->node_comm != MPI_COMM_NULL) MPI_Comm_free(&d->node_comm);
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (d->owns_mpi && !finalized) MPI_Finalize();
    d->owns_mpi = 0;
}

_Noreturn void dpoc_dist_abort(const dpoc_dist *d, int code, const char *msg) {
    fprintf(stderr, "dpoc [rank %d of %d]: %s\n", d ? d->rank : 0, d ? d->world : 1, msg);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    exit(code ? code : 1); /* not reached */
}

int dpoc_dist_is_root(const dpoc_dist *d) { return !d || d->rank == 0; }

/* MPI counts are int: large buffers go in pieces of at most this many elements. */
#define MPI_MAX_COUNT ((size_t)1 << 30)

int dpoc_dist_sum_doubles(dpoc_dist *d, double *v, size_t n, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    for (size_t off = 0; off < n; off += MPI_MAX_COUNT) {
        size_t k = n - off < MPI_MAX_COUNT ? n - off : MPI_MAX_COUNT;
        DPOC_TRY(mpi_check(MPI_Allreduce(MPI_IN_PLACE, v + off, (int)k, MPI_DOUBLE, MPI_SUM, d->comm), "MPI_Allreduce",
                           err));
    }
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_min_max_u64(dpoc_dist *d, uint64_t *mn, uint64_t *mx, size_t n, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    DPOC_TRY(mpi_check(MPI_Allreduce(MPI_IN_PLACE, mn, (int)n, MPI_UINT64_T, MPI_MIN, d->comm), "MPI_Allreduce", err));
    DPOC_TRY(mpi_check(MPI_Allreduce(MPI_IN_PLACE, mx, (int)n, MPI_UINT64_T, MPI_MAX, d->comm), "MPI_Allreduce", err));
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_bcast_floats(dpoc_dist *d, float *v, size_t n, int root, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    for (size_t off = 0; off < n; off += MPI_MAX_COUNT) {
        size_t k = n - off < MPI_MAX_COUNT ? n - off : MPI_MAX_COUNT;
        DPOC_TRY(mpi_check(MPI_Bcast(v + off, (int)k, MPI_FLOAT, root, d->comm), "MPI_Bcast", err));
    }
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_barrier(dpoc_dist *d, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    DPOC_TRY(mpi_check(MPI_Barrier(d->comm), "MPI_Barrier", err));
    d->comm_time_s += wtime() - t0;
    return 0;
}

/* ---- gradient buckets ---- */

int dpoc_grad_sync_init(dpoc_grad_sync *g, dpoc_dist *d, float *grads, size_t n, size_t bucket_bytes,
                        dpoc_err *err) {
    memset(g, 0, sizeof *g);
    g->dist = d;
    g->grads = grads;
    g->n = n;
    g->bucket_floats = bucket_bytes / sizeof(float);
    if (g->bucket_floats == 0) g->bucket_floats = 1;
    if (g->bucket_floats > MPI_MAX_COUNT) g->bucket_floats = MPI_MAX_COUNT;
    g->n_buckets = (n + g->bucket_floats - 1) / g->bucket_floats;
    g->reqs = dpoc_malloc((g->n_buckets ? g->n_buckets : 1) * sizeof *g->reqs, "allreduce requests", err);
    if (!g->reqs) return DPOC_ENOMEM;
    for (size_t i = 0; i < g->n_buckets; i++) g->reqs[i] = MPI_REQUEST_NULL;
    return 0;
}

void dpoc_grad_sync_free(dpoc_grad_sync *g) {
    free(g->reqs);
    memset(g, 0, sizeof *g);
}

/* bucket b covers [start, end) counted from the end of the block */
static void bucket_range(const dpoc_grad_sync *g, size_t b, size_t *start, size_t *end) {
    *end = g->n - b * g->bucket_floats;
    *start = *end > g->bucket_floats ? *end - g->bucket_floats : 0;
}

static int start_bucket(dpoc_grad_sync *g, size_t b, dpoc_err *err) {
    size_t s, e;
    bucket_range(g, b, &s, &e);
    return mpi_check(MPI_Iallreduce(MPI_IN_PLACE, g->grads + s, (int)(e - s), MPI_FLOAT, MPI_SUM, g->dist->comm,
                                    &g->reqs[b]),
                     "MPI_Iallreduce", err);
}

int dpoc_grad_sync_ready(dpoc_grad_sync *g, size_t ready_from, dpoc_err *err) {
    if (!g->dist || g->dist->world == 1) return 0;
    double t0 = wtime();
    while (g->n_started < g->n_buckets) {
        size_t s, e;
        bucket_range(g, g->n_started, &s, &e);
        if (s < ready_from) break;
        DPOC_TRY(start_bucket(g, g->n_started, err));
        g->n_started++;
    }
    /* Open MPI has no progress thread: nonblocking collectives advance inside MPI calls */
    if (g->n_started) {
        int flag = 0;
        DPOC_TRY(mpi_check(MPI_Testall((int)g->n_started, g->reqs, &flag, MPI_STATUSES_IGNORE), "MPI_Testall", err));
    }
    g->dist->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_grad_sync_finish(dpoc_grad_sync *g, dpoc_err *err) {
    if (!g->dist || g->dist->world == 1) return 0;
    double t0 = wtime();
    while (g->n_started < g->n_buckets) {
        DPOC_TRY(start_bucket(g, g->n_started, err));
        g->n_started++;
    }
    DPOC_TRY(mpi_check(MPI_Waitall((int)g->n_buckets, g->reqs, MPI_STATUSES_IGNORE), "MPI_Waitall", err));
    g->n_started = 0;
    const float inv = 1.0f / (float)g->dist->world;
    for (size_t i = 0; i < g->n; i++) g->grads[i] *= inv;
    g->dist->comm_time_s += wtime() - t0;
    return 0;
}
