#include "core/rng.h"

uint64_t dpoc_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void dpoc_shuffle_order(size_t *order, size_t n, uint64_t seed, uint64_t epoch) {
    uint64_t st = seed * 0x2545F4914F6CDD1Dull + epoch;
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = n; i > 1; i--) {
        /* unbiased bound via rejection */
        uint64_t bound = (uint64_t)i, limit = UINT64_MAX - UINT64_MAX % bound, r;
        do r = dpoc_splitmix64(&st);
        while (r >= limit);
        size_t j = (size_t)(r % bound);
        size_t tmp = order[i - 1];
        order[i - 1] = order[j];
        order[j] = tmp;
    }
}
