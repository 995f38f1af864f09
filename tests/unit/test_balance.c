/* dpoc_balance_ranks: the split of a global batch over ranks by cost.
 * Checked: every rank gets exactly per_rank items, every item one rank; the
 * split is a pure function of the costs (same on every call, as every rank
 * computes it on its own); it is optimal on cases small enough to solve by
 * hand; and on random batches (lengths as preference data has them, many in
 * sorted runs, the contiguous split's worst case) it never has a larger
 * makespan than the best of the greedy bound total/ranks + max cost, and on
 * average a smaller one than the contiguous split. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "testutil.h"

#include "dpoc/balance.h"

#define MAX_N 256

static void check_counts(const size_t *rank_of, size_t n, size_t n_ranks, size_t per_rank) {
    size_t count[64] = {0};
    for (size_t i = 0; i < n; i++) {
        if (rank_of[i] >= n_ranks) fail_msg("item %zu on rank %zu of %zu", i, rank_of[i], n_ranks);
        count[rank_of[i]]++;
    }
    for (size_t r = 0; r < n_ranks; r++)
        if (count[r] != per_rank) fail_msg("rank %zu has %zu items, not %zu", r, count[r], per_rank);
}

static void test_small_cases(void **state) {
    (void)state;
    size_t rank_of[8], order[8];
    /* contiguous: {10,10} | {1,1} -> 20; balanced: 11 */
    const double c1[4] = {10, 10, 1, 1};
    dpoc_balance_ranks(c1, 4, 2, 2, rank_of, order);
    check_counts(rank_of, 4, 2, 2);
    assert_true(dpoc_balance_makespan(c1, 4, 2, rank_of) == 11.0);
    assert_int_equal(rank_of[0], 0); /* the largest first, to rank 0 (ties to the lowest rank) */
    /* equal costs: ties by index give the contiguous-like alternation, still balanced */
    const double c2[6] = {3, 3, 3, 3, 3, 3};
    dpoc_balance_ranks(c2, 6, 3, 2, rank_of, order);
    check_counts(rank_of, 6, 3, 2);
    assert_true(dpoc_balance_makespan(c2, 6, 3, rank_of) == 6.0);
    /* one rank: everything on it */
    const double c3[3] = {5, 1, 2};
    dpoc_balance_ranks(c3, 3, 1, 3, rank_of, order);
    for (size_t i = 0; i < 3; i++) assert_int_equal(rank_of[i], 0);
    /* the cardinality limit binds: 8 items, 4 ranks x 2 -> {8,1},{7,2},{6,3},{5,4} = 9 is optimal */
    const double c4[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    dpoc_balance_ranks(c4, 8, 4, 2, rank_of, order);
    check_counts(rank_of, 8, 4, 2);
    assert_true(dpoc_balance_makespan(c4, 8, 4, rank_of) == 9.0);
}

static void test_random_batches(void **state) {
    (void)state;
    uint64_t seed = 12345;
    double cost[MAX_N];
    size_t rank_of[MAX_N], again[MAX_N], order[MAX_N], contiguous[MAX_N];
    double sum_bal = 0, sum_cont = 0;
    for (int trial = 0; trial < 2000; trial++) {
        const size_t n_ranks = 2 + dpoc_splitmix64(&seed) % 7, per_rank = 1 + dpoc_splitmix64(&seed) % 8;
        const size_t n = n_ranks * per_rank;
        for (size_t i = 0; i < n; i++) cost[i] = (double)(20 + dpoc_splitmix64(&seed) % 500);
        if (trial % 3 == 0) /* a sorted run: the contiguous split's worst case */
            for (size_t i = 1; i < n; i++)
                for (size_t j = i; j > 0 && cost[j - 1] < cost[j]; j--) {
                    const double x = cost[j];
                    cost[j] = cost[j - 1], cost[j - 1] = x;
                }
        dpoc_balance_ranks(cost, n, n_ranks, per_rank, rank_of, order);
        check_counts(rank_of, n, n_ranks, per_rank);
        dpoc_balance_ranks(cost, n, n_ranks, per_rank, again, order);
        assert_memory_equal(rank_of, again, n * sizeof *again);
        double total = 0, mx = 0;
        for (size_t i = 0; i < n; i++) total += cost[i], mx = fmax(mx, cost[i]);
        const double got = dpoc_balance_makespan(cost, n, n_ranks, rank_of);
        /* no split beats total / ranks; greedy lands within one item of it */
        if (got > total / (double)n_ranks + mx + 1e-9)
            fail_msg("trial %d: makespan %.0f above total/ranks %.1f + max %.0f", trial, got, total / n_ranks, mx);
        for (size_t i = 0; i < n; i++) contiguous[i] = i / per_rank;
        sum_bal += got;
        sum_cont += dpoc_balance_makespan(cost, n, n_ranks, contiguous);
    }
    if (!(sum_bal < 0.95 * sum_cont))
        fail_msg("balanced mean makespan %.1f is not clearly below the contiguous split's %.1f", sum_bal / 2000,
                 sum_cont / 2000);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_small_cases),
        cmocka_unit_test(test_random_batches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
