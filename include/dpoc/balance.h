/* Which rank takes which pairs of a global batch.
 *
 * Every rank waits at the gradient average for the slowest one, so a global
 * batch's pairs are split over the ranks by cost (the FLOPs of each pair's
 * forward) instead of in contiguous runs. Each rank still gets the same number
 * of pairs, so a loss that is a mean over pairs (sigmoid, ipo, hinge, ...) and
 * every logged metric are the same numbers as with any other split, to float
 * rounding; losses that look across the micro-batch (aot sorts it, sft
 * averages over its chosen tokens, WPO weighting normalises over it) keep
 * TRL's contiguous split (the trainer decides, see balance_batches). */
#ifndef DPOC_BALANCE_H
#define DPOC_BALANCE_H

#include <stddef.h>

/* Assigns n = n_ranks * per_rank items with costs cost[0..n) to ranks:
 * rank_of[i] in [0, n_ranks), each rank exactly per_rank items. Greedy longest
 * first (items by cost descending, ties by index; each to the least-loaded rank
 * with room, ties to the lowest rank): a pure function of its inputs, so every
 * rank computes the same split. order is scratch of n entries. */
void dpoc_balance_ranks(const double *cost, size_t n, size_t n_ranks, size_t per_rank, size_t *rank_of,
                        size_t *order);
/* The same with the per-rank tables as scratch too (load and count, n_ranks
 * entries each), for a caller that must not allocate (the training step);
 * dpoc_balance_ranks keeps them on the stack, or on the heap for many ranks. */
void dpoc_balance_ranks_with(const double *cost, size_t n, size_t n_ranks, size_t per_rank, size_t *rank_of,
                             size_t *order, double *load, size_t *count);

/* The largest per-rank cost sum of an assignment. */
double dpoc_balance_makespan(const double *cost, size_t n, size_t n_ranks, const size_t *rank_of);

#endif
