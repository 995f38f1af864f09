/* Splitting a global batch over ranks by cost (see dpoc/balance.h). */
#include "dpoc/balance.h"

#include <stdlib.h>

/* insertion sort: a global batch is small (ranks x batch size), and it keeps
 * the order a pure function of the inputs without qsort's instability */
static void sort_by_cost_desc(const double *cost, size_t *order, size_t n) {
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = 1; i < n; i++) {
        const size_t x = order[i];
        size_t j = i;
        while (j > 0 && (cost[order[j - 1]] < cost[x] || (cost[order[j - 1]] == cost[x] && order[j - 1] > x))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = x;
    }
}

void dpoc_balance_ranks_with(const double *cost, size_t n, size_t n_ranks, size_t per_rank, size_t *rank_of,
                             size_t *order, double *load, size_t *count) {
    sort_by_cost_desc(cost, order, n);
    for (size_t r = 0; r < n_ranks; r++) load[r] = 0.0, count[r] = 0;
    for (size_t k = 0; k < n; k++) {
        const size_t i = order[k];
        size_t best = n_ranks;
        for (size_t r = 0; r < n_ranks; r++)
            if (count[r] < per_rank && (best == n_ranks || load[r] < load[best])) best = r;
        rank_of[i] = best;
        load[best] += cost[i];
        count[best]++;
    }
}

void dpoc_balance_ranks(const double *cost, size_t n, size_t n_ranks, size_t per_rank, size_t *rank_of,
                        size_t *order) {
    /* each rank's load and item count: on the stack for the usual rank counts */
    enum { STACK_RANKS = 64 };
    double load_s[STACK_RANKS];
    size_t count_s[STACK_RANKS];
    double *load = n_ranks <= STACK_RANKS ? load_s : calloc(n_ranks, sizeof *load);
    size_t *count = n_ranks <= STACK_RANKS ? count_s : calloc(n_ranks, sizeof *count);
    if (load && count) {
        dpoc_balance_ranks_with(cost, n, n_ranks, per_rank, rank_of, order, load, count);
    } else { /* no memory for the tables: the contiguous split */
        sort_by_cost_desc(cost, order, n);
        for (size_t i = 0; i < n; i++) rank_of[i] = i / per_rank;
    }
    if (n_ranks > STACK_RANKS) free(load), free(count);
}

double dpoc_balance_makespan(const double *cost, size_t n, size_t n_ranks, const size_t *rank_of) {
    double worst = 0.0;
    for (size_t r = 0; r < n_ranks; r++) {
        double s = 0.0;
        for (size_t i = 0; i < n; i++)
            if (rank_of[i] == r) s += cost[i];
        if (s > worst) worst = s;
    }
    return worst;
}
