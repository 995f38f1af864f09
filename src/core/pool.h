/* A few worker threads kept for the life of their owner, to split one short
 * piece of work (dequantizing a weight chunk between two BLAS calls) over the
 * cores without creating threads, or allocating, per call. The caller's thread
 * takes part 0, the workers the others. One run at a time. */
#ifndef DPOC_CORE_POOL_H
#define DPOC_CORE_POOL_H

#include <pthread.h>
#include <stddef.h>

#include "dpoc/err.h"

/* The most threads a pool splits work over (the caller's included). */
#define DPOC_POOL_MAX_THREADS 64

typedef void (*dpoc_pool_fn)(void *ctx, size_t part, size_t n_parts);

typedef struct dpoc_pool dpoc_pool;

typedef struct {
    dpoc_pool *pool;
    size_t part;
} dpoc_pool_worker;

struct dpoc_pool {
    size_t n_threads; /* parts of each run, the caller's thread included */
    size_t n_started; /* workers running */
    pthread_t threads[DPOC_POOL_MAX_THREADS];
    dpoc_pool_worker workers[DPOC_POOL_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    dpoc_pool_fn fn;
    void *ctx;
    unsigned long generation; /* incremented by each run */
    size_t pending;           /* workers still in this run */
    int stop;
};

/* n_threads <= 1: no workers, every run on the caller's thread alone. */
int dpoc_pool_init(dpoc_pool *p, size_t n_threads, dpoc_err *err);
/* fn(ctx, i, n) for i in 0..n-1 (n = p->n_threads) concurrently; returns when all are done. */
void dpoc_pool_run(dpoc_pool *p, dpoc_pool_fn fn, void *ctx);
void dpoc_pool_free(dpoc_pool *p);

#endif
