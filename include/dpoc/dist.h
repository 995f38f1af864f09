/* Data parallelism over MPI: every rank holds a model replica; gradients are
 * averaged once per optimizer step, either with bucketed nonblocking allreduces
 * that start while the last backward is still running, or (ranks sharing a
 * node) through an MPI-3 shared-memory window that every rank of the node reads.
 *
 * A dpoc_dist with world == 1 and no MPI (dist->comm == MPI_COMM_NULL is never
 * used then) makes every call here a cheap no-op, so the trainer has one path. */
#ifndef DPOC_DIST_H
#define DPOC_DIST_H

#include <stddef.h>
#include <stdint.h>

#include <mpi.h>

#include "dpoc/config.h"
#include "dpoc/err.h"

typedef struct {
    int rank, world;            /* in MPI_COMM_WORLD */
    int local_rank, local_size; /* ranks on this node (MPI_COMM_TYPE_SHARED) */
    int cores;                  /* cores this process may run on (sched_getaffinity) */
    int threads;                /* BLAS / kernel threads this rank uses */
    int owns_mpi;               /* dpoc_dist_init called MPI_Init_thread */
    MPI_Comm comm;
    MPI_Comm node_comm;
    double comm_time_s;         /* time blocked in MPI since the last reset */
    int failed;                 /* dpoc_dist_mark_failed was called */
    int failed_elsewhere;       /* ... for another rank's failure, which that rank reports (dpoc_dist_abort) */
} dpoc_dist;

/* MPI_Init_thread asking for MPI_THREAD_FUNNELED (error if not provided), ranks
 * per node, cores, and the thread count: requested_threads if > 0, else
 * OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set, else cores / ranks on the node.
 * Sets OpenBLAS's thread count. Warns (rank 0) when ranks x threads exceed cores.
 * Test-only: DPOC_TEST_RANKS_PER_NODE=K makes "nodes" of K consecutive ranks. */
int dpoc_dist_init(dpoc_dist *d, int *argc, char ***argv, int requested_threads, dpoc_err *err);
void dpoc_dist_finalize(dpoc_dist *d);
/* Prints "dpoc [rank r]: msg" to stderr and ends every rank (MPI_Abort). */
_Noreturn void dpoc_dist_abort(const dpoc_dist *d, int code, const char *msg);

int dpoc_dist_is_root(const dpoc_dist *d);
/* 0 for MPI_SUCCESS, else DPOC_EIO with "<what> failed: <MPI's message>". */
int dpoc_dist_mpi_check(int rc, const char *what, dpoc_err *err);
/* After an error on this rank, other ranks may wait in a collective this rank
 * will never join: from then on frees skip collective calls (MPI_Win_free), and
 * the caller is expected to end the job with dpoc_dist_abort. NULL is allowed. */
void dpoc_dist_mark_failed(dpoc_dist *d);
/* The same when the cause is another rank's: dpoc_dist_abort then gives that rank
 * DPOC_PEER_REPORT_S to print its message and end the job before ending it itself. */
void dpoc_dist_mark_failed_elsewhere(dpoc_dist *d);

/* In-place sums across ranks (blocking; time counted in comm_time_s). */
int dpoc_dist_sum_doubles(dpoc_dist *d, double *v, size_t n, dpoc_err *err);
int dpoc_dist_min_max_u64(dpoc_dist *d, uint64_t *min, uint64_t *max, size_t n, dpoc_err *err);
int dpoc_dist_bcast_floats(dpoc_dist *d, float *v, size_t n, int root, dpoc_err *err);
int dpoc_dist_barrier(dpoc_dist *d, dpoc_err *err);

/* Gradient averaging over a flat block of n floats that the sync object owns
 * (the trainer accumulates into g->grads). Three paths:
 * - NONE: one rank, a plain allocation, nothing to average;
 * - MPI: buckets of bucket_floats counted from the END of the block, because
 *   backward completes the last parameters (head, last layers) first; each
 *   bucket's MPI_Iallreduce starts as soon as it is final;
 * - SHARED: every rank's block is its segment of an MPI-3 shared window on the
 *   node. At finish local rank i sums slice i of all the node's blocks (in local
 *   rank order) into its own block, allreduces that slice with the ranks of the
 *   same local rank on the other nodes, scales it, and then every rank copies
 *   the other slices from their owners. Nothing can start before every rank's
 *   backward is done, so ready() does nothing there. */
typedef enum { DPOC_GRAD_SYNC_NONE, DPOC_GRAD_SYNC_MPI, DPOC_GRAD_SYNC_SHARED } dpoc_grad_sync_path;

typedef struct {
    dpoc_dist *dist;
    float *grads; /* n floats, zeroed at init: calloc'd, or this rank's segment of win */
    size_t n;
    dpoc_grad_sync_path path;
    /* MPI */
    size_t bucket_floats;
    size_t n_buckets;
    MPI_Request *reqs;
    size_t n_started; /* buckets 0..n_started-1 (from the end) are in flight or done */
    /* SHARED (the handles below mean nothing on the other paths) */
    MPI_Win win;
    int win_locked;       /* the passive epoch (MPI_Win_lock_all) is open */
    float **peer;         /* local_size blocks: peer[j] is local rank j's, peer[local_rank] == grads */
    size_t slice_floats;  /* local rank i reduces [i * slice_floats, (i + 1) * slice_floats) (clipped to n) */
    MPI_Comm cross_comm;  /* the ranks with this local rank, one per node; MPI_COMM_NULL on one node */
} dpoc_grad_sync;

/* Collective over d's ranks (call it in the same order on every rank); d may be
 * NULL (one process). kind AUTO takes SHARED when every node runs the same number
 * (> 1) of ranks and has room for its window in /dev/shm, else MPI (warning on
 * rank 0 when only the room is missing); SHARED is an error naming grad_allreduce
 * when that does not hold (one rank in all is fine: nothing to average). */
int dpoc_grad_sync_init(dpoc_grad_sync *g, dpoc_dist *d, size_t n, size_t bucket_bytes, dpoc_allreduce_kind kind,
                        dpoc_err *err);
/* How this object averages, for messages ("averaged in a node shared-memory window", ...). */
const char *dpoc_grad_sync_path_name(const dpoc_grad_sync *g);
/* Frees the block (collective in SHARED mode unless dpoc_dist_mark_failed was called). */
void dpoc_grad_sync_free(dpoc_grad_sync *g);
/* grads[ready_from, n) are final for this step: MPI path: start every bucket inside
 * it (in the same order on every rank), and let MPI progress those in flight. */
int dpoc_grad_sync_ready(dpoc_grad_sync *g, size_t ready_from, dpoc_err *err);
/* Completes the averaging: afterwards every rank's grads hold the same mean,
 * bit for bit, and (SHARED) no rank reads another's block until the next finish,
 * so each may zero and refill its own. */
int dpoc_grad_sync_finish(dpoc_grad_sync *g, dpoc_err *err);

#endif
