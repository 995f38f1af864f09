/* Deterministic random numbers for data order (splitmix64). dpoc's shuffle is
 * its own: it does not reproduce torch's RandomSampler permutation. */
#ifndef DPOC_RNG_H
#define DPOC_RNG_H

#include <stddef.h>
#include <stdint.h>

uint64_t dpoc_splitmix64(uint64_t *state);
/* order[0..n) = a permutation of 0..n-1 determined by (seed, epoch) alone. */
void dpoc_shuffle_order(size_t *order, size_t n, uint64_t seed, uint64_t epoch);

#endif
