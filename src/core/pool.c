/* Worker threads for short parallel pieces (core/pool.h). */
#include "core/pool.h"

#include <string.h>

static void *worker_main(void *arg) {
    const dpoc_pool_worker *w = arg;
    dpoc_pool *p = w->pool;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->start, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        const dpoc_pool_fn fn = p->fn;
        void *ctx = p->ctx;
        pthread_mutex_unlock(&p->mu);
        fn(ctx, w->part, p->n_threads);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int dpoc_pool_init(dpoc_pool *p, size_t n_threads, dpoc_err *err) {
    memset(p, 0, sizeof *p);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > DPOC_POOL_MAX_THREADS) n_threads = DPOC_POOL_MAX_THREADS;
    p->n_threads = 1;
    if (pthread_mutex_init(&p->mu, NULL) || pthread_cond_init(&p->start, NULL) || pthread_cond_init(&p->done, NULL))
        return dpoc_errf(err, DPOC_ENOMEM, "cannot create the worker pool's locks");
    for (size_t i = 1; i < n_threads; i++) {
        p->workers[i] = (dpoc_pool_worker){p, i};
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->workers[i]) != 0) break;
        p->n_started++;
    }
    /* fewer threads than asked for still work: the parts follow the threads there are */
    p->n_threads = p->n_started + 1;
    return 0;
}

void dpoc_pool_run(dpoc_pool *p, dpoc_pool_fn fn, void *ctx) {
    if (p->n_threads <= 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->pending = p->n_started;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n_threads);
    pthread_mutex_lock(&p->mu);
    while (p->pending) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void dpoc_pool_free(dpoc_pool *p) {
    if (!p->n_threads) return; /* never initialised */
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (size_t i = 1; i <= p->n_started; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    memset(p, 0, sizeof *p);
}
