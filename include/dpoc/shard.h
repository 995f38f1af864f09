/* ZeRO-style sharding of the optimizer's work over the ranks (DeepSpeed's
 * stages; config key zero_stage):
 * - stage 1: every rank still averages the whole gradient (dpoc/dist.h), but
 *   keeps the AdamW moments of its own slice of the flat parameter block only
 *   and updates only that slice; the updated slices are then broadcast by their
 *   owners, so every rank ends the step with the whole, identical block;
 * - stage 2: the gradients are reduce-scattered too. Backward runs layer by
 *   layer over the micro-batch's sequences (dpoc_model_backward_seqs), so each
 *   layer's gradient is final once, is summed into its owners' slices right
 *   then (one MPI_Reduce_scatter per range, of every micro-batch) and its pages
 *   are handed back to the kernel: a rank holds its slice's gradient plus the
 *   ranges backward is still writing, never a whole gradient block.
 *
 * Rank r owns [lo[r], lo[r + 1]) of the n floats: equal shares rounded to
 * SHARD_ALIGN floats, in rank order. The node's shared-memory window
 * (grad_allreduce shared) holds a whole block per rank, which is what stage 2
 * exists to avoid, so stage 2 reduces with MPI collectives on every path (Open
 * MPI's shared-memory transport inside a node); stage 1 averages as stage 0. */
#ifndef DPOC_SHARD_H
#define DPOC_SHARD_H

#include <stddef.h>

#include "dpoc/dist.h"
#include "dpoc/err.h"

/* Slice boundaries are multiples of this many floats (64 bytes: whole cache lines). */
#define DPOC_SHARD_ALIGN ((size_t)16)

typedef struct {
    dpoc_dist *dist;
    int stage;      /* 1 or 2 (a dpoc_shard is only made for those) */
    size_t n;       /* floats in the whole block */
    size_t *lo;     /* (world + 1) slice boundaries */
    size_t me_lo, me_hi;
    /* stage 2 */
    float *local;   /* n floats, mmap'ed: this rank's accumulation of the running micro-batch */
    float *grad;    /* (me_hi - me_lo) this rank's slice of the summed (then averaged) gradient */
    float *stage_buf; /* DPOC_SHARD_PIECE floats: one reduced piece on its way into grad */
    int *counts;    /* (2 world) counts and displacements of one collective */
    size_t pending; /* [0, pending) of local not yet reduced in this micro-batch */
    double reduce_time_s;
} dpoc_shard;

/* The largest range one collective moves (floats): bounds stage_buf and keeps
 * MPI's int counts in range. */
#define DPOC_SHARD_PIECE ((size_t)1 << 22)

/* [lo, hi) of rank r among world for n floats. */
void dpoc_shard_range(size_t n, int world, int r, size_t *lo, size_t *hi);

/* Collective. stage 1 or 2; d may be NULL or of one rank (then the only slice is everything). */
int dpoc_shard_init(dpoc_shard *s, dpoc_dist *d, int stage, size_t n, dpoc_err *err);
void dpoc_shard_free(dpoc_shard *s);

/* Stage 2: a new optimizer step starts (the slice's sum is zeroed). */
void dpoc_shard_begin_step(dpoc_shard *s);
/* Stage 2: a micro-batch's backward starts writing local. */
void dpoc_shard_begin_micro_batch(dpoc_shard *s);
/* Stage 2, the backward hook: local[ready_from, pending) is final for this
 * micro-batch: add every rank's copy of it into its owners' slices, then give
 * its pages back (they read as zeros when backward next writes them).
 * Collective: every rank calls it with the same ranges in the same order. */
int dpoc_shard_reduce(dpoc_shard *s, size_t ready_from, dpoc_err *err);
/* Stage 2, after the step's last micro-batch: grad = the sum / world. */
void dpoc_shard_average(dpoc_shard *s);

/* Collective: the squared L2 norm of the whole averaged gradient from each
 * rank's slice (stage 2), in double. */
int dpoc_shard_grad_sum_squares(dpoc_shard *s, double *out, dpoc_err *err);

/* Collective: every rank's slice of params[0, n) sent to all (after each
 * updated its own); afterwards every rank holds the same block. */
int dpoc_shard_gather(dpoc_shard *s, float *params, dpoc_err *err);

/* Collective: floats [off, off + count) (count <= DPOC_SHARD_PIECE) of a block
 * sharded like the parameters, each rank holding its slice in mine (indexed
 * from its me_lo), arrive at rank 0 in dst (NULL elsewhere). */
int dpoc_shard_gather_to_root(dpoc_shard *s, const float *mine, size_t off, size_t count, float *dst,
                              dpoc_err *err);

#endif
