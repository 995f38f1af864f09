/* Where a training step's time goes, for `dpoc bench`. A dpoc_prof is owned by
 * whoever asks (the trainer holds one; activations point to it) and is NULL when
 * nobody asks: timing costs one clock read per kernel call, nothing when off. */
#ifndef DPOC_PROF_H
#define DPOC_PROF_H

#include <time.h>

typedef enum {
    DPOC_PROF_GEMM,      /* q/k/v/o and MLP products, forward and backward */
    DPOC_PROF_ATTENTION, /* causal attention, forward and backward */
    DPOC_PROF_POINTWISE, /* RMSNorm, RoPE, SwiGLU, embedding, residual adds */
    DPOC_PROF_LMHEAD,    /* LM head + log-softmax + label gather, forward and backward */
    DPOC_PROF_LOSS,      /* the DPO loss and metric sums */
    DPOC_PROF_OPTIMIZER, /* gradient norm, clipping, AdamW */
    DPOC_PROF_COMM,      /* blocked in MPI (gradient allreduce, metric sums) */
    DPOC_PROF_DATA,      /* collating token ids */
    DPOC_PROF_N
} dpoc_prof_kind;

typedef struct {
    double s[DPOC_PROF_N]; /* seconds */
} dpoc_prof;

const char *dpoc_prof_name(dpoc_prof_kind k); /* "gemm", "attention", ... */

static inline double dpoc_prof_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* t0 = dpoc_prof_start(p); ...; dpoc_prof_add(p, KIND, t0): the time between goes to
 * p->s[KIND]; both do nothing when p is NULL. */
static inline double dpoc_prof_start(const dpoc_prof *p) { return p ? dpoc_prof_clock() : 0.0; }
static inline void dpoc_prof_add(dpoc_prof *p, dpoc_prof_kind k, double t0) {
    if (p) p->s[k] += dpoc_prof_clock() - t0;
}

#endif
