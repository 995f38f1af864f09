/* Data parallelism over MPI: every rank holds a model replica; gradients are
 * averaged once per optimizer step with bucketed nonblocking allreduces that
 * start while the last backward is still running.
 *
 * A dpoc_dist with world == 1 and no MPI (dist->comm == MPI_COMM_NULL is never
 * used then) makes every call here a cheap no-op, so the trainer has one path. */
#ifndef DPOC_DIST_H
#define DPOC_DIST_H

#include <stddef.h>
#include <stdint.h>

#include <mpi.h>

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
} dpoc_dist;

/* MPI_Init_thread asking for MPI_THREAD_FUNNELED (error if not provided), ranks
 * per node, cores, and the thread count: requested_threads if > 0, else
 * OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set, else cores / ranks on the node.
 * Sets OpenBLAS's thread count. Warns (rank 0) when ranks x threads exceed cores. */
int dpoc_dist_init(dpoc_dist *d, int *argc, char ***argv, int requested_threads, dpoc_err *err);
void dpoc_dist_finalize(dpoc_dist *d);
/* Prints "dpoc [rank r]: msg" to stderr and ends every rank (MPI_Abort). */
_Noreturn void dpoc_dist_abort(const dpoc_dist *d, int code, const char *msg);

int dpoc_dist_is_root(const dpoc_dist *d);

/* In-place sums across ranks (blocking; time counted in comm_time_s). */
int dpoc_dist_sum_doubles(dpoc_dist *d, double *v, size_t n, dpoc_err *err);
int dpoc_dist_min_max_u64(dpoc_dist *d, uint64_t *min, uint64_t *max, size_t n, dpoc_err *err);
int dpoc_dist_bcast_floats(dpoc_dist *d, float *v, size_t n, int root, dpoc_err *err);
int dpoc_dist_barrier(dpoc_dist *d, dpoc_err *err);

/* Gradient averaging over a flat block of n floats, in buckets of bucket_floats
 * counted from the END of the block, because backward completes the last
 * parameters (head, last layers) first. */
typedef struct {
    dpoc_dist *dist;
    float *grads;
    size_t n;
    size_t bucket_floats;
    size_t n_buckets;
    MPI_Request *reqs;
    size_t n_started; /* buckets 0..n_started-1 (from the end) are in flight or done */
} dpoc_grad_sync;

int dpoc_grad_sync_init(dpoc_grad_sync *g, dpoc_dist *d, float *grads, size_t n, size_t bucket_bytes,
                        dpoc_err *err);
void dpoc_grad_sync_free(dpoc_grad_sync *g);
/* grads[ready_from, n) are final for this step: start every bucket inside it
 * (in the same order on every rank), and let MPI progress those in flight. */
int dpoc_grad_sync_ready(dpoc_grad_sync *g, size_t ready_from, dpoc_err *err);
/* Starts what is left, waits for everything, divides by the world size. */
int dpoc_grad_sync_finish(dpoc_grad_sync *g, dpoc_err *err);

#endif
