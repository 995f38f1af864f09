/* ZeRO-style sharding (see shard.h). */
#include "dpoc/shard.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mpi.h>

#include "model/kernels.h"

static int world_of(const dpoc_shard *s) { return s->dist ? s->dist->world : 1; }

void dpoc_shard_range(size_t n, int world, int r, size_t *lo, size_t *hi) {
    const size_t w = world > 0 ? (size_t)world : 1;
    /* equal shares rounded up to whole cache lines; the last rank takes the rest */
    size_t share = (n + w - 1) / w;
    share = (share + DPOC_SHARD_ALIGN - 1) / DPOC_SHARD_ALIGN * DPOC_SHARD_ALIGN;
    const size_t a = (size_t)r * share, b = a + share;
    *lo = a < n ? a : n;
    *hi = (size_t)r + 1 == w ? n : (b < n ? b : n);
}

int dpoc_shard_init(dpoc_shard *s, dpoc_dist *d, int stage, size_t n, dpoc_err *err) {
    memset(s, 0, sizeof *s);
    s->dist = d;
    s->stage = stage;
    s->n = n;
    const int W = world_of(s), me = d ? d->rank : 0;
    s->lo = dpoc_malloc(((size_t)W + 1) * sizeof *s->lo, "shard boundaries", err);
    if (!s->lo) return DPOC_ENOMEM;
    for (int r = 0; r < W; r++) {
        size_t hi;
        dpoc_shard_range(n, W, r, &s->lo[r], &hi);
    }
    s->lo[W] = n;
    s->me_lo = s->lo[me];
    s->me_hi = s->lo[me + 1];
    s->counts = dpoc_malloc(2 * (size_t)W * sizeof *s->counts, "shard counts", err);
    if (!s->counts) {
        dpoc_shard_free(s);
        return DPOC_ENOMEM;
    }
    if (stage < 2) return 0;
    /* anonymous pages: madvise(MADV_DONTNEED) returns them and they read as zeros after */
    const size_t bytes = (n ? n : 1) * sizeof(float);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        dpoc_shard_free(s);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory: %zu bytes of gradient address space", bytes);
    }
    s->local = p;
    s->grad = dpoc_calloc(s->me_hi - s->me_lo + 1, sizeof(float), "gradient slice", err);
    s->stage_buf = dpoc_malloc(DPOC_SHARD_PIECE * sizeof(float), "reduce-scatter buffer", err);
    if (!s->grad || !s->stage_buf) {
        dpoc_shard_free(s);
        return DPOC_ENOMEM;
    }
    s->pending = n;
    return 0;
}

void dpoc_shard_free(dpoc_shard *s) {
    if (s->local) munmap(s->local, (s->n ? s->n : 1) * sizeof(float));
    free(s->lo);
    free(s->grad);
    free(s->stage_buf);
    free(s->counts);
    memset(s, 0, sizeof *s);
}

void dpoc_shard_begin_step(dpoc_shard *s) {
    if (s->stage >= 2) memset(s->grad, 0, (s->me_hi - s->me_lo) * sizeof(float));
}

void dpoc_shard_begin_micro_batch(dpoc_shard *s) { s->pending = s->n; }

/* Zeroes local[a, b) and gives back the pages wholly inside it. The partial
 * pages at its ends are zeroed in place: their other floats belong to ranges
 * that are either released already or not written yet in this micro-batch,
 * so zeros there too. */
static void release(dpoc_shard *s, size_t a, size_t b) {
    if (a >= b) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char *base = (char *)s->local;
    const size_t ba = a * sizeof(float), bb = b * sizeof(float);
    const size_t pa = (ba + page - 1) / page * page, pb = bb / page * page;
    if (pa >= pb) {
        memset(base + ba, 0, bb - ba);
        return;
    }
    memset(base + ba, 0, pa - ba);
    memset(base + pb, 0, bb - pb);
    /* cannot fail on a private anonymous mapping we own; if it did, zero by hand */
    if (madvise(base + pa, pb - pa, MADV_DONTNEED) != 0) memset(base + pa, 0, pb - pa);
}

int dpoc_shard_reduce(dpoc_shard *s, size_t ready_from, dpoc_err *err) {
    if (s->stage < 2 || ready_from >= s->pending) return 0;
    const int W = world_of(s);
    const double t0 = MPI_Wtime();
    for (size_t a = ready_from; a < s->pending; a += DPOC_SHARD_PIECE) {
        const size_t b = s->pending - a > DPOC_SHARD_PIECE ? a + DPOC_SHARD_PIECE : s->pending;
        if (W > 1) {
            /* each rank's part of [a, b) is contiguous and in rank order: one reduce-scatter */
            for (int r = 0; r < W; r++) {
                const size_t x = s->lo[r] > a ? s->lo[r] : a, y = s->lo[r + 1] < b ? s->lo[r + 1] : b;
                s->counts[r] = y > x ? (int)(y - x) : 0;
            }
            DPOC_TRY(dpoc_dist_mpi_check(MPI_Reduce_scatter(s->local + a, s->stage_buf, s->counts, MPI_FLOAT, MPI_SUM,
                                                        s->dist->comm),
                                     "MPI_Reduce_scatter", err));
        }
        const size_t x = s->me_lo > a ? s->me_lo : a, y = s->me_hi < b ? s->me_hi : b;
        const float *src = W > 1 ? s->stage_buf : s->local + x;
        float *dst = s->grad + (x - s->me_lo);
        for (size_t i = 0; i + x < y; i++) dst[i] += src[i];
    }
    release(s, ready_from, s->pending);
    s->pending = ready_from;
    s->reduce_time_s += MPI_Wtime() - t0;
    if (s->dist) s->dist->comm_time_s += MPI_Wtime() - t0;
    return 0;
}

void dpoc_shard_average(dpoc_shard *s) {
    if (s->stage < 2) return;
    /* the MPI path's rounding: the sum, then one multiply */
    const float inv = 1.0f / (float)world_of(s);
    for (size_t i = 0; i < s->me_hi - s->me_lo; i++) s->grad[i] *= inv;
}

int dpoc_shard_grad_sum_squares(dpoc_shard *s, double *out, dpoc_err *err) {
    double v = dpoc_kernels()->sum_squares(s->grad, s->me_hi - s->me_lo);
    if (s->dist && s->dist->world > 1) DPOC_TRY(dpoc_dist_sum_doubles(s->dist, &v, 1, err));
    *out = v;
    return 0;
}

int dpoc_shard_gather(dpoc_shard *s, float *params, dpoc_err *err) {
    const int W = world_of(s);
    if (W == 1) return 0;
    const double t0 = MPI_Wtime();
    /* every owner broadcasts its slice in pieces MPI's int counts can hold */
    for (int r = 0; r < W; r++)
        for (size_t a = s->lo[r]; a < s->lo[r + 1]; a += DPOC_SHARD_PIECE) {
            const size_t k = s->lo[r + 1] - a > DPOC_SHARD_PIECE ? DPOC_SHARD_PIECE : s->lo[r + 1] - a;
            DPOC_TRY(dpoc_dist_mpi_check(MPI_Bcast(params + a, (int)k, MPI_FLOAT, r, s->dist->comm), "MPI_Bcast", err));
        }
    s->dist->comm_time_s += MPI_Wtime() - t0;
    return 0;
}

int dpoc_shard_gather_to_root(dpoc_shard *s, const float *mine, size_t off, size_t count, float *dst,
                              dpoc_err *err) {
    const int W = world_of(s);
    const size_t a = off, b = off + count;
    if (W == 1) {
        memcpy(dst, mine + (a - s->me_lo), count * sizeof(float));
        return 0;
    }
    int *counts = s->counts, *displs = s->counts + W;
    int pos = 0;
    for (int r = 0; r < W; r++) {
        const size_t x = s->lo[r] > a ? s->lo[r] : a, y = s->lo[r + 1] < b ? s->lo[r + 1] : b;
        counts[r] = y > x ? (int)(y - x) : 0;
        displs[r] = pos;
        pos += counts[r];
    }
    const int me = s->dist->rank;
    const size_t x = s->me_lo > a ? s->me_lo : a;
    const float *send = counts[me] ? mine + (x - s->me_lo) : mine;
    return dpoc_dist_mpi_check(MPI_Gatherv(send, counts[me], MPI_FLOAT, dst, counts, displs, MPI_FLOAT, 0, s->dist->comm),
                           "MPI_Gatherv", err);
}
