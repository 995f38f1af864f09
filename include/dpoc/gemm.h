/* One entry point for dpoc's matrix products, with two precisions:
 *
 *  - DPOC_GEMM_FP32: OpenBLAS cblas_sgemm, bit for bit (dpoc_gemm only forwards).
 *  - DPOC_GEMM_BF16: the semantics of a matmul under torch autocast(bfloat16):
 *    each element of op(A) and op(B) is rounded to bfloat16 (round to nearest,
 *    ties to even), the products and their sum are fp32, alpha and beta are
 *    applied in fp32 and C stays fp32 (it is not rounded to bfloat16). It runs on
 *    oneDNN's matmul primitive (bf16 source and weights, f32 destination) from
 *    operands this module rounds into per-thread scratch.
 *
 * Row-major, like cblas_sgemm(CblasRowMajor, ...):
 *   C (M,N) = alpha * op(A) (M,K) * op(B) (K,N) + beta * C,
 * op(A) = A stored (M,K) with row stride lda, or with trans_a A^T of A stored
 * (K,M); op(B) = B stored (K,N) with ldb, or with trans_b B^T of B stored (N,K).
 * Leading dimensions may exceed the row width (strided views). Counts are
 * size_t but must fit an int (the CBLAS interface), and callers guarantee
 * lda/ldb/ldc >= the row widths (checked with assert()). With beta == 0, C is
 * not read (NaN in C does not propagate), as in BLAS.
 *
 * BF16 path details:
 *  - Threads: oneDNN in Debian (2.6.3) uses the OpenMP runtime (GNU libgomp);
 *    each call sets the calling thread's OpenMP thread count to OpenBLAS's
 *    (openblas_get_num_threads()), so both libraries use the threads that
 *    dpoc_dist gave the rank.
 *  - Allocation: the rounded operands live in a per-thread buffer that grows
 *    only when a larger problem arrives; dpoc_gemm_reserve sizes it up front
 *    so that training steps allocate nothing for them. oneDNN's own scratchpad
 *    (tens to hundreds of KiB, depending on shape and threads) is a second
 *    per-thread buffer that grows to the largest a shape has needed: only the
 *    first calls with new shapes allocate. Primitives are cached per thread by
 *    shape (and oneDNN's primitive cache, on by default, backs that cache).
 *    oneDNN itself still makes a few small allocations per execution (7 per
 *    call measured: its argument map), which its C API gives no way to avoid.
 *  - libgomp's workers spin for a while after a call, as OpenBLAS's do after
 *    theirs: on shared cores alternating fp32 and bf16 calls slow each other
 *    for the first calls after a switch. OMP_WAIT_POLICY=PASSIVE in the
 *    environment (read when libgomp loads) removes the libgomp side.
 *  - Failure: the call returns void (like cblas). If oneDNN cannot be set up or
 *    fails on a problem, the call (and, after a oneDNN failure, every later one)
 *    computes the same semantics exactly on an fp32 path instead (operands
 *    rounded to bf16 and widened back, then cblas_sgemm; products of bf16 values
 *    are exact in fp32), with a one-time warning on stderr; if even its scratch
 *    cannot be allocated, a scalar loop that needs none. dpoc_gemm_bf16_available
 *    says which path runs.
 *  - oneDNN's AVX512_BF16 dot products treat bfloat16 subnormals (|x| < 2^-126)
 *    as zero and flush fp32 subnormal partial sums (as PyTorch's CPU bf16
 *    matmul does, on the same instructions); the fallback paths do not. */
#ifndef DPOC_GEMM_H
#define DPOC_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"

typedef enum { DPOC_GEMM_FP32 = 0, DPOC_GEMM_BF16 = 1 } dpoc_gemm_precision;

void dpoc_gemm(dpoc_gemm_precision p, int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
               const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc);

/* Grows the calling thread's operand scratch to hold max_a_elems elements of
 * op(A) and max_b_elems of op(B) (M*K and K*N of the largest problem) in
 * bfloat16. Never shrinks it. A BF16 call that needs more grows it (one
 * allocation), so reserving is an optimisation, not a requirement. Returns
 * DPOC_ENOMEM if the buffer cannot be allocated (the old one stays). */
int dpoc_gemm_reserve(size_t max_a_elems, size_t max_b_elems, dpoc_err *err);

/* Frees the calling thread's scratch and cached primitives (the next BF16 call
 * allocates again). A thread's state is also freed when the thread exits. */
void dpoc_gemm_release(void);

/* bf16 shadows: a block of fp32 weights (a model's parameters) registered
 * here gets a bf16 copy (rounded as every BF16 call rounds its operands), and a
 * BF16 call whose B operand lies inside the block reads that copy instead of
 * rounding B again: a weight is rounded once per optimizer step rather than on
 * each of the dozens of products a step makes with it (for a sequence of ~100
 * rows, rounding a weight costs about as much as the product). The values are
 * the same, so results are bit for bit those without the shadow, as long as the
 * owner calls dpoc_gemm_shadow_refresh after every change of the weights and
 * before the next product. At most 4 blocks (policy, reference, ...); add,
 * refresh and remove must not run during a product. add on a registered block
 * rounds it again; it returns DPOC_ENOMEM without memory for the copy (2
 * bytes a weight). */
int dpoc_gemm_shadow_add(const float *base, size_t n, dpoc_err *err);
void dpoc_gemm_shadow_refresh(const float *base);
/* Only elements [off, off + n) of the block at base (a no-op when base is not
 * registered): AdamW refreshes each chunk right after updating it. */
void dpoc_gemm_shadow_refresh_range(const float *base, size_t off, size_t n);
void dpoc_gemm_shadow_remove(const float *base);

/* 1 if BF16 calls run on oneDNN (engine created, a bf16 matmul implementation
 * other than oneDNN's reference one found, no oneDNN failure since, no forced
 * fallback), 0 if they run on the exact fp32 fallback. */
int dpoc_gemm_bf16_available(void);

/* Best GFLOP/s (2 M N K per call) of dpoc_gemm at precision p over square
 * problems of 1024, 2048 and 3072 (NoTrans, Trans, alpha 1, beta 0), 3 timed
 * calls each after a warm-up, with the current thread count. Allocates its
 * matrices (3 x 36 MiB) and frees them; the BF16 scratch it needs (36 MiB) is
 * given back afterwards (the thread's earlier reservation is kept). */
int dpoc_gemm_measure_peak(dpoc_gemm_precision p, double *gflops, dpoc_err *err);

/* ---- for tests and benchmarks ---- */

/* bfloat16 bits: the high half of an IEEE binary32. */
typedef uint16_t dpoc_bf16;

/* x rounded to bfloat16, to nearest with ties to even, subnormals included
 * (they round like any other value, as torch's c10::BFloat16 does); values at
 * or beyond bf16 max + half an ulp become +-Inf; a NaN stays a NaN of the same
 * sign (quiet, with the top of its payload). The reference conversion. */
dpoc_bf16 dpoc_bf16_round(float x);
/* Exact. */
float dpoc_bf16_to_float(dpoc_bf16 h);

/* dst[i] = dpoc_bf16_round(src[i]) for i < n: the scalar twin ... */
void dpoc_bf16_round_n_scalar(dpoc_bf16 *dst, const float *src, size_t n);
/* ... and the AVX512_BF16 one (vcvtne2ps2bf16, with the subnormal lanes, which
 * that instruction flushes to zero, rounded as the twin does), the same values.
 * Returns -1 and writes nothing if this CPU (or build) lacks AVX512_BF16. */
int dpoc_bf16_round_n_avx512(dpoc_bf16 *dst, const float *src, size_t n);

/* Which implementation BF16 calls use. AUTO: oneDNN where available, else the
 * fp32 fallback. SGEMM / SCALAR force the fallback paths described above (they
 * compute the same values as each other up to fp32 summation order). */
typedef enum { DPOC_GEMM_BF16_AUTO = 0, DPOC_GEMM_BF16_SGEMM = 1, DPOC_GEMM_BF16_SCALAR = 2 } dpoc_gemm_bf16_impl;
/* Process-wide; tests and benchmarks only (not synchronised with running calls). */
void dpoc_gemm_bf16_force(dpoc_gemm_bf16_impl impl);

#endif
