/* MPI start-up, collectives with timing, and gradient averaging (bucketed
 * MPI_Iallreduce, or a node-local shared-memory window). */
#define _GNU_SOURCE
#include "dpoc/dist.h"

#include <cblas.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

static double wtime(void) { return MPI_Wtime(); }

int dpoc_dist_mpi_check(int rc, const char *what, dpoc_err *err) {
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
    /* test-only: DPOC_TEST_RANKS_PER_NODE=K groups consecutive ranks into "nodes" of K
     * (the last may be smaller), so one machine runs the multi-node code paths; the
     * groups still share memory, as a node's ranks do */
    const char *per_node = getenv("DPOC_TEST_RANKS_PER_NODE");
    const int fake_k = per_node ? atoi(per_node) : 0;
    if (fake_k > 0)
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Comm_split(d->comm, d->rank / fake_k, d->rank, &d->node_comm), "MPI_Comm_split", err));
    else
        DPOC_TRY(dpoc_dist_mpi_check(
            MPI_Comm_split_type(d->comm, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &d->node_comm),
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

/* How long a rank whose error is another's waits for that rank to report the
 * cause (MPI_Abort from the first rank would kill the one that knows why). */
#define DPOC_PEER_REPORT_S 3

_Noreturn void dpoc_dist_abort(const dpoc_dist *d, int code, const char *msg) {
    fprintf(stderr, "dpoc [rank %d of %d]: %s\n", d ? d->rank : 0, d ? d->world : 1, msg);
    fflush(stderr);
    if (d && d->failed_elsewhere) sleep(DPOC_PEER_REPORT_S);
    MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    exit(code ? code : 1); /* not reached */
}

int dpoc_dist_is_root(const dpoc_dist *d) { return !d || d->rank == 0; }

void dpoc_dist_mark_failed(dpoc_dist *d) {
    if (d) d->failed = 1;
}

void dpoc_dist_mark_failed_elsewhere(dpoc_dist *d) {
    if (d) d->failed = d->failed_elsewhere = 1;
}

/* MPI counts are int: large buffers go in pieces of at most this many elements. */
#define MPI_MAX_COUNT ((size_t)1 << 30)

int dpoc_dist_sum_doubles(dpoc_dist *d, double *v, size_t n, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    for (size_t off = 0; off < n; off += MPI_MAX_COUNT) {
        size_t k = n - off < MPI_MAX_COUNT ? n - off : MPI_MAX_COUNT;
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Allreduce(MPI_IN_PLACE, v + off, (int)k, MPI_DOUBLE, MPI_SUM, d->comm), "MPI_Allreduce",
                           err));
    }
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_min_max_u64(dpoc_dist *d, uint64_t *mn, uint64_t *mx, size_t n, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Allreduce(MPI_IN_PLACE, mn, (int)n, MPI_UINT64_T, MPI_MIN, d->comm), "MPI_Allreduce", err));
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Allreduce(MPI_IN_PLACE, mx, (int)n, MPI_UINT64_T, MPI_MAX, d->comm), "MPI_Allreduce", err));
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_bcast_floats(dpoc_dist *d, float *v, size_t n, int root, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    for (size_t off = 0; off < n; off += MPI_MAX_COUNT) {
        size_t k = n - off < MPI_MAX_COUNT ? n - off : MPI_MAX_COUNT;
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Bcast(v + off, (int)k, MPI_FLOAT, root, d->comm), "MPI_Bcast", err));
    }
    d->comm_time_s += wtime() - t0;
    return 0;
}

int dpoc_dist_barrier(dpoc_dist *d, dpoc_err *err) {
    if (!d || d->world == 1) return 0;
    double t0 = wtime();
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Barrier(d->comm), "MPI_Barrier", err));
    d->comm_time_s += wtime() - t0;
    return 0;
}

/* ---- gradient averaging ---- */

/* Shared path: slices start on a 64-byte boundary (16 floats from an aligned
 * block), so no cache line is written by two ranks at once. */
#define SLICE_ALIGN_FLOATS ((size_t)16)
/* Sums go through a tile this size (4 KiB, stays in L1) holding the partial sum
 * while each node rank's block is added in turn. */
#define SUM_TILE_FLOATS ((size_t)1024)

static int init_mpi_path(dpoc_grad_sync *g, size_t bucket_bytes, dpoc_err *err) {
    g->path = DPOC_GRAD_SYNC_MPI;
    g->bucket_floats = bucket_bytes / sizeof(float);
    if (g->bucket_floats == 0) g->bucket_floats = 1;
    if (g->bucket_floats > MPI_MAX_COUNT) g->bucket_floats = MPI_MAX_COUNT;
    g->n_buckets = (g->n + g->bucket_floats - 1) / g->bucket_floats;
    g->reqs = dpoc_malloc((g->n_buckets ? g->n_buckets : 1) * sizeof *g->reqs, "allreduce requests", err);
    if (!g->reqs) return DPOC_ENOMEM;
    for (size_t i = 0; i < g->n_buckets; i++) g->reqs[i] = MPI_REQUEST_NULL;
    g->grads = dpoc_calloc(g->n ? g->n : 1, sizeof(float), "gradients", err);
    return g->grads ? 0 : DPOC_ENOMEM;
}

/* Open MPI's osc/sm keeps shared windows in files in osc_sm_backing_directory:
 * SHM_DIR by default on Linux, or what OMPI_MCA_osc_sm_backing_directory says
 * (mpirun --mca sets it too). */
#define SHM_DIR "/dev/shm"
#define SHM_DIR_ENV "OMPI_MCA_osc_sm_backing_directory"
/* room left beyond the segments: the window's control data, a little filesystem slack */
#define SHM_SLACK_BYTES ((uint64_t)1 << 20)

/* 1 when SHM_DIR cannot hold the node's window (local_size segments of bytes). Open
 * MPI 4.1 reports a window that does not fit only on the rank that creates it,
 * while the node's other ranks wait inside MPI_Win_allocate_shared, so the
 * shortage must be known before: a container's /dev/shm is often 64 MB. */
static int shm_too_small(const dpoc_dist *d, size_t bytes, const char *dir, uint64_t *avail, uint64_t *need) {
    const long page = sysconf(_SC_PAGESIZE);
    const uint64_t pg = page > 0 ? (uint64_t)page : 1;
    *need = (uint64_t)d->local_size * ((bytes + pg - 1) / pg * pg) + SHM_SLACK_BYTES;
    struct statvfs st;
    if (statvfs(dir, &st) != 0) return 0; /* elsewhere (another directory, not Linux): just try */
    *avail = (uint64_t)st.f_bavail * st.f_frsize;
    return *avail < *need;
}

/* Collective over the node (window) and, on several nodes, the world (split). A
 * failure here is an error: the caller ends the job (see shm_too_small). */
static int init_shared_path(dpoc_grad_sync *g, dpoc_err *err) {
    dpoc_dist *d = g->dist;
    const size_t L = (size_t)d->local_size;
    g->path = DPOC_GRAD_SYNC_SHARED;
    /* local allocations first: a failure here must not leave the other ranks inside a collective */
    g->peer = dpoc_calloc(L, sizeof *g->peer, "shared gradient blocks", err);
    if (!g->peer) return DPOC_ENOMEM;
    const size_t bytes = (g->n ? g->n : 1) * sizeof(float);
    MPI_Info info;
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Info_create(&info), "MPI_Info_create", err));
    /* each rank's segment on its own pages, which the owner touches first (zeroing
     * below): on a NUMA node its gradient memory is then local to it */
    MPI_Info_set(info, "alloc_shared_noncontig", "true");
    void *base = NULL;
    int rc = MPI_Win_allocate_shared((MPI_Aint)bytes, (int)sizeof(float), info, d->node_comm, &base, &g->win);
    MPI_Info_free(&info);
    if (rc != MPI_SUCCESS) {
        g->win = MPI_WIN_NULL;
        rc = dpoc_dist_mpi_check(rc, "MPI_Win_allocate_shared", err);
        dpoc_err_prefix(err, "grad_allreduce: a shared-memory window of %zu bytes per rank (use grad_allreduce mpi)",
                        bytes);
        return rc;
    }
    MPI_Win_set_errhandler(g->win, MPI_ERRORS_RETURN);
    g->grads = base;
    for (size_t j = 0; j < L; j++) {
        MPI_Aint size = 0;
        int disp = 0;
        void *p = NULL;
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Win_shared_query(g->win, (int)j, &size, &disp, &p), "MPI_Win_shared_query", err));
        if (!p || (size_t)size < bytes)
            return dpoc_errf(err, DPOC_EINTERNAL, "shared gradient window: local rank %zu has %zu bytes, want %zu", j,
                             (size_t)size, bytes);
        g->peer[j] = p;
    }
    const size_t per = (g->n + L - 1) / L;
    g->slice_floats = (per + SLICE_ALIGN_FLOATS - 1) / SLICE_ALIGN_FLOATS * SLICE_ALIGN_FLOATS;
    /* every node runs local_size ranks (checked by the caller), so this is "more than one node" */
    if (d->world > d->local_size)
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Comm_split(d->comm, d->local_rank, d->rank, &g->cross_comm), "MPI_Comm_split", err));
    /* one passive epoch for the window's lifetime: loads and stores are plain
     * memory accesses; MPI_Win_sync + barrier order them between ranks */
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Win_lock_all(MPI_MODE_NOCHECK, g->win), "MPI_Win_lock_all", err));
    g->win_locked = 1;
    /* MPI does not zero window memory; the trainer expects a zeroed block, as calloc gives */
    memset(g->grads, 0, bytes);
    return 0;
}

int dpoc_grad_sync_init(dpoc_grad_sync *g, dpoc_dist *d, size_t n, size_t bucket_bytes, dpoc_allreduce_kind kind,
                        dpoc_err *err) {
    memset(g, 0, sizeof *g);
    g->dist = d;
    g->n = n;
    g->win = MPI_WIN_NULL;
    g->cross_comm = MPI_COMM_NULL;
    if (!d || d->world == 1) {
        g->path = DPOC_GRAD_SYNC_NONE;
        g->grads = dpoc_calloc(n ? n : 1, sizeof(float), "gradients", err);
        return g->grads ? 0 : DPOC_ENOMEM;
    }
    int shared = 0;
    if (kind != DPOC_ALLREDUCE_MPI) {
        /* the shared path pairs local rank i of every node: all nodes need the same rank
         * count; and every node needs room for its window */
        uint64_t avail = 0, need = 0;
        const char *env_dir = getenv(SHM_DIR_ENV);
        const char *dir = env_dir && *env_dir ? env_dir : SHM_DIR;
        const int no_room = shm_too_small(d, (n ? n : 1) * sizeof(float), dir, &avail, &need);
        int v[3] = {-d->local_size, d->local_size, no_room}; /* max of -x is -min */
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Allreduce(MPI_IN_PLACE, v, 3, MPI_INT, MPI_MAX, d->comm), "MPI_Allreduce", err));
        const int lo = -v[0], hi = v[1], any_no_room = v[2];
        shared = lo == hi && lo > 1 && !any_no_room;
        if (kind == DPOC_ALLREDUCE_SHARED && !shared) {
            if (lo != hi)
                return dpoc_errf(err, DPOC_EINPUT,
                                 "config key 'grad_allreduce' is shared, but nodes run different numbers of ranks "
                                 "(%d to %d); use auto or mpi",
                                 lo, hi);
            if (lo == 1)
                return dpoc_errf(err, DPOC_EINPUT,
                                 "config key 'grad_allreduce' is shared, but every rank is alone on its node (no "
                                 "memory to share); use auto or mpi");
            if (no_room)
                return dpoc_errf(err, DPOC_EINPUT,
                                 "config key 'grad_allreduce' is shared, but %s has %.1f MB free and the node's "
                                 "window needs %.1f MB; enlarge it (docker --shm-size) or use mpi",
                                 dir, (double)avail / 1e6, (double)need / 1e6);
            return dpoc_errf(err, DPOC_EINPUT,
                             "config key 'grad_allreduce' is shared, but another node's %s is too small for its "
                             "window; use auto or mpi",
                             dir);
        }
        if (any_no_room && lo == hi && lo > 1 && d->rank == 0)
            fprintf(stderr,
                    "dpoc: warning: grad_allreduce auto: %s is too small for a shared-memory window of %d x %zu "
                    "bytes on a node; averaging gradients with MPI instead\n",
                    dir, lo, (n ? n : 1) * sizeof(float));
    }
    int rc = shared ? init_shared_path(g, err) : init_mpi_path(g, bucket_bytes, err);
    if (rc) dpoc_grad_sync_free(g);
    return rc;
}

void dpoc_grad_sync_free(dpoc_grad_sync *g) {
    if (g->path == DPOC_GRAD_SYNC_SHARED) {
        /* MPI_Win_free and MPI_Comm_free are collective: after a failure on this
         * rank the others may never join, so the window stays mapped until the job ends */
        const int collective = !g->dist->failed;
        if (g->win != MPI_WIN_NULL && collective) {
            if (g->win_locked) MPI_Win_unlock_all(g->win);
            MPI_Win_free(&g->win);
        }
        if (g->cross_comm != MPI_COMM_NULL && collective) MPI_Comm_free(&g->cross_comm);
    } else {
        free(g->grads); /* in SHARED mode grads is inside the window */
    }
    free(g->peer);
    free(g->reqs);
    memset(g, 0, sizeof *g); /* path NONE: freeing again is harmless */
}

const char *dpoc_grad_sync_path_name(const dpoc_grad_sync *g) {
    switch (g->path) {
    case DPOC_GRAD_SYNC_SHARED:
        return g->cross_comm == MPI_COMM_NULL ? "averaged in a shared-memory window"
                                              : "averaged in shared-memory windows, MPI_Allreduce between nodes";
    case DPOC_GRAD_SYNC_MPI: return "averaged with bucketed MPI_Iallreduce";
    case DPOC_GRAD_SYNC_NONE: break;
    }
    return "not averaged (one rank)";
}

/* ---- MPI path: buckets ---- */

/* bucket b covers [start, end) counted from the end of the block */
static void bucket_range(const dpoc_grad_sync *g, size_t b, size_t *start, size_t *end) {
    *end = g->n - b * g->bucket_floats;
    *start = *end > g->bucket_floats ? *end - g->bucket_floats : 0;
}

static int start_bucket(dpoc_grad_sync *g, size_t b, dpoc_err *err) {
    size_t s, e;
    bucket_range(g, b, &s, &e);
    return dpoc_dist_mpi_check(MPI_Iallreduce(MPI_IN_PLACE, g->grads + s, (int)(e - s), MPI_FLOAT, MPI_SUM, g->dist->comm,
                                    &g->reqs[b]),
                     "MPI_Iallreduce", err);
}

int dpoc_grad_sync_ready(dpoc_grad_sync *g, size_t ready_from, dpoc_err *err) {
    if (g->path != DPOC_GRAD_SYNC_MPI) return 0;
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
        DPOC_TRY(dpoc_dist_mpi_check(MPI_Testall((int)g->n_started, g->reqs, &flag, MPI_STATUSES_IGNORE), "MPI_Testall", err));
    }
    g->dist->comm_time_s += wtime() - t0;
    return 0;
}

static int finish_mpi(dpoc_grad_sync *g, dpoc_err *err) {
    while (g->n_started < g->n_buckets) {
        DPOC_TRY(start_bucket(g, g->n_started, err));
        g->n_started++;
    }
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Waitall((int)g->n_buckets, g->reqs, MPI_STATUSES_IGNORE), "MPI_Waitall", err));
    g->n_started = 0;
    const float inv = 1.0f / (float)g->dist->world;
    for (size_t i = 0; i < g->n; i++) g->grads[i] *= inv;
    return 0;
}

/* ---- shared path: a node-local window ---- */

/* A memory-consistency point of the node: every store a rank made to the window
 * before it is visible to every rank after it (MPI-3 separate/unified model:
 * MPI_Win_sync is the memory barrier, the barrier orders the ranks). */
static int node_sync(dpoc_grad_sync *g, dpoc_err *err) {
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Win_sync(g->win), "MPI_Win_sync", err));
    DPOC_TRY(dpoc_dist_mpi_check(MPI_Barrier(g->dist->node_comm), "MPI_Barrier", err));
    return dpoc_dist_mpi_check(MPI_Win_sync(g->win), "MPI_Win_sync", err);
}

static void slice_range(const dpoc_grad_sync *g, size_t i, size_t *start, size_t *end) {
    const size_t s = i * g->slice_floats;
    *start = s < g->n ? s : g->n;
    *end = g->n - *start > g->slice_floats ? *start + g->slice_floats : g->n;
}

/* grads[s, e) = sum over local ranks j = 0, 1, ..., L-1 of peer[j][s, e), added
 * in that order whichever rank runs it, then times scale when scale != 0 (which
 * rounds as the MPI path's separate `*= inv` does: sum, then one multiply). Our
 * own block is one of the sources: each tile is read from every block before it
 * is written. */
static void sum_slice(dpoc_grad_sync *g, size_t s, size_t e, float scale) {
    const size_t L = (size_t)g->dist->local_size;
    float acc[SUM_TILE_FLOATS];
    for (size_t off = s; off < e; off += SUM_TILE_FLOATS) {
        const size_t k = e - off < SUM_TILE_FLOATS ? e - off : SUM_TILE_FLOATS;
        memcpy(acc, g->peer[0] + off, k * sizeof(float));
        for (size_t j = 1; j < L; j++) {
            const float *src = g->peer[j] + off;
            for (size_t i = 0; i < k; i++) acc[i] += src[i];
        }
        float *dst = g->grads + off;
        if (scale != 0.0f)
            for (size_t i = 0; i < k; i++) dst[i] = acc[i] * scale;
        else
            memcpy(dst, acc, k * sizeof(float));
    }
}

/* Equal to the MPI path's result: with 2 ranks per node and one node bit for bit
 * (a + b is commutative, then the same multiply by 1/world). With more ranks
 * both are deterministic and identical on every rank, but they may differ in the
 * last bits: here the sum is ((b0 + b1) + b2) + ..., while Open MPI's allreduce
 * picks its own association (e.g. (b0 + b1) + (b2 + b3)); across nodes each
 * node's sum is added in the allreduce's order. */
static int finish_shared(dpoc_grad_sync *g, dpoc_err *err) {
    const dpoc_dist *d = g->dist;
    const size_t L = (size_t)d->local_size, me = (size_t)d->local_rank;
    const float inv = 1.0f / (float)d->world;
    const int one_node = g->cross_comm == MPI_COMM_NULL;
    DPOC_TRY(node_sync(g, err)); /* every rank's backward has finished writing its block */
    size_t s, e;
    slice_range(g, me, &s, &e);
    sum_slice(g, s, e, one_node ? inv : 0.0f);
    if (!one_node) {
        for (size_t off = s; off < e; off += MPI_MAX_COUNT) {
            const size_t k = e - off < MPI_MAX_COUNT ? e - off : MPI_MAX_COUNT;
            DPOC_TRY(dpoc_dist_mpi_check(MPI_Allreduce(MPI_IN_PLACE, g->grads + off, (int)k, MPI_FLOAT, MPI_SUM, g->cross_comm),
                               "MPI_Allreduce", err));
        }
        for (size_t i = s; i < e; i++) g->grads[i] *= inv;
    }
    DPOC_TRY(node_sync(g, err)); /* every slice is final in its owner's block */
    for (size_t j = 0; j < L; j++) {
        if (j == me) continue;
        slice_range(g, j, &s, &e);
        memcpy(g->grads + s, g->peer[j] + s, (e - s) * sizeof(float));
    }
    /* nobody reads a peer's block after this: each rank may zero its own for the next step */
    return node_sync(g, err);
}

int dpoc_grad_sync_finish(dpoc_grad_sync *g, dpoc_err *err) {
    if (g->path == DPOC_GRAD_SYNC_NONE) return 0;
    double t0 = wtime();
    int rc = g->path == DPOC_GRAD_SYNC_SHARED ? finish_shared(g, err) : finish_mpi(g, err);
    g->dist->comm_time_s += wtime() - t0;
    return rc;
}
