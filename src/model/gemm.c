/* dpoc_gemm: fp32 products on OpenBLAS, bf16 mixed-precision products on
 * oneDNN's matmul primitive (see include/dpoc/gemm.h for the semantics).
 *
 * The BF16 path, per call:
 *  1. the OpenMP thread count of the calling thread is set to OpenBLAS's
 *     (Debian's oneDNN runs on GNU OpenMP and reads omp_get_max_threads());
 *  2. a matmul primitive for the problem is taken from the thread's cache, or
 *     created: 0.3-0.7 ms for a new shape (oneDNN JIT-compiles brgemm kernels
 *     for it); oneDNN's primitive cache makes re-creating a known one cheap but
 *     not free (a few us, about what a whole 64x64x64 product takes);
 *  3. op(A) and op(B) are rounded to bfloat16 into the thread's scratch, in
 *     their stored orientation, densely (the leading dimensions stop here: the
 *     primitive sees (M,K) or (K,M) and (K,N) or (N,K) with unit-stride rows,
 *     and expresses the transposes as strides);
 *  4. the primitive runs: src bf16, weights bf16, dst f32 = C in place with row
 *     stride ldc, alpha as a (compile-time, common) output scale, beta as a sum
 *     post-op with scale beta.
 * Alpha and beta are part of the cache key: with a run-time output scale
 * (DNNL_RUNTIME_F32_VAL) oneDNN 2.6 gives up its brgemm kernels for the
 * older gemm-based ones, and the sum post-op's scale is fixed at creation;
 * dpoc uses few distinct values. The problem sizes are fixed at creation for
 * the same reason (run-time dimensions also select the gemm-based kernels).
 * A C with ldc > N (a strided view) gets the gemm-based kernel too; on this
 * CPU it runs at about the same rate. */
#include "dpoc/gemm.h"

#include <assert.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_debug.h>

#include "dpoc/prof.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* Cached primitives per thread. A transformer step has a few dozen distinct
 * shapes (each projection forward, its two backward products, the LM head's
 * chunks, attention tiles); least recently used entries are replaced. */
#define PRIM_CACHE_SLOTS 64
/* Buffers are 64-byte aligned (a cache line, one AVX-512 vector). */
#define SCRATCH_ALIGN 64
/* The oneDNN probe run at set-up: a problem every implementation takes. */
#define PROBE_DIM 64

static const size_t PEAK_SIZES[] = {1024, 2048, 3072};
#define PEAK_REPEATS 3

/* BLAS dimensions are int (blasint) in the CBLAS interface. */
static int blas_dim(size_t n) {
    assert(n <= (size_t)INT_MAX);
    return (int)n;
}

static size_t align_up(size_t n) { return (n + SCRATCH_ALIGN - 1) / SCRATCH_ALIGN * SCRATCH_ALIGN; }

/* ------------------------------------------------------------------------ */
/* bfloat16 rounding */

dpoc_bf16 dpoc_bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    /* NaN: keep the sign and the top of the payload, and set the quiet bit so
     * that a payload only in the dropped low half still reads as a NaN. */
    if ((u & 0x7fffffffu) > 0x7f800000u) return (dpoc_bf16)((u >> 16) | 0x0040u);
    /* Adding 0x7fff rounds the dropped half up when it exceeds one half, and
     * the kept lsb breaks the tie to even. A carry moves into the exponent as
     * it should (up to Inf from beyond bf16 max); this works unchanged for
     * subnormals, zeros and Inf, whose bit patterns are ordered like values. */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (dpoc_bf16)(u >> 16);
}

float dpoc_bf16_to_float(dpoc_bf16 h) {
    const uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

void dpoc_bf16_round_n_scalar(dpoc_bf16 *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = dpoc_bf16_round(src[i]);
}

/* x rounded to bfloat16 and widened back: what the fallback paths multiply. */
static float round_bf16_f(float x) { return dpoc_bf16_to_float(dpoc_bf16_round(x)); }

#if defined(__x86_64__)
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* Lanes of x that are subnormal (zero exponent, non-zero fraction). */
AVX512BF16 static inline __mmask16 subnormal_lanes(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 zero_exp = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_test_epi32_mask(zero_exp, u, _mm512_set1_epi32(0x007fffff));
}

/* The twin's integer rounding on 16 lanes, narrowed to 16 bits. Only used on
 * subnormal lanes, so the NaN case does not arise. */
AVX512BF16 static inline __m256i round_int16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* 32 values, lo and hi 16 each. vcvtne2ps2bf16 rounds to nearest even and
 * makes NaNs quiet exactly as the twin does, but flushes subnormal inputs to
 * signed zero (its DAZ): lanes with a subnormal are redone in integer
 * arithmetic (rare, so behind a branch). */
AVX512BF16 static inline __m512i round_32(__m512 lo, __m512 hi) {
    __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* lo in the low 16 halves */
    const __mmask32 sub = (__mmask32)subnormal_lanes(lo) | ((__mmask32)subnormal_lanes(hi) << 16);
    if (sub) {
        const __m512i exact = _mm512_inserti64x4(_mm512_castsi256_si512(round_int16(lo)), round_int16(hi), 1);
        r = _mm512_mask_blend_epi16(sub, r, exact);
    }
    return r;
}

/* Whole blocks of 32 with plain loads and stores (masked ones in the main loop
 * ran at a third of memcpy's bandwidth on a Zen 5); the tail with masked ones,
 * which never touch memory past n. */
AVX512BF16 static void round_n_avx512(dpoc_bf16 *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512((void *)(dst + i), round_32(_mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16)));
    if (i < n) {
        const size_t left = n - i;
        const __mmask16 mlo = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __mmask16 mhi = left > 16 ? (__mmask16)((1u << (left - 16)) - 1u) : 0;
        const __m512i r = round_32(_mm512_maskz_loadu_ps(mlo, src + i), _mm512_maskz_loadu_ps(mhi, src + i + 16));
        _mm512_mask_storeu_epi16(dst + i, (__mmask32)mlo | ((__mmask32)mhi << 16), r);
    }
}

/* __builtin_cpu_supports also checks that the OS saves the AVX-512 state. */
static int cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}
#else
static int cpu_has_avx512bf16(void) { return 0; }
#endif

int dpoc_bf16_round_n_avx512(dpoc_bf16 *dst, const float *src, size_t n) {
#if defined(__x86_64__)
    if (cpu_has_avx512bf16()) {
        round_n_avx512(dst, src, n);
        return 0;
    }
#endif
    (void)dst, (void)src, (void)n;
    return -1;
}

/* The conversion BF16 calls use, chosen once. */
static void (*round_n)(dpoc_bf16 *, const float *, size_t) = dpoc_bf16_round_n_scalar;
static pthread_once_t round_n_once = PTHREAD_ONCE_INIT;

static void choose_round_n(void) {
#if defined(__x86_64__)
    if (cpu_has_avx512bf16()) round_n = round_n_avx512;
#endif
}

/* rows x cols of src (row stride ld) into dense dst (row stride cols). */
static void round_rows(dpoc_bf16 *dst, const float *src, size_t rows, size_t cols, size_t ld) {
    for (size_t r = 0; r < rows; r++) round_n(dst + r * cols, src + r * ld, cols);
}

/* ------------------------------------------------------------------------ */
/* bf16 shadows of weights */

/* Registered fp32 blocks (a model's parameters) and their bf16 twins. Set up
 * and refreshed between products by the thread that owns the weights; read by
 * every product (no lock: registration never overlaps a product). */
#define SHADOWS_MAX 4
static struct {
    const float *base;
    size_t n;
    dpoc_bf16 *bf16;
} shadows[SHADOWS_MAX];

int dpoc_gemm_shadow_add(const float *base, size_t n, dpoc_err *err) {
    if (!base || n == 0) return 0;
    size_t free_slot = SHADOWS_MAX;
    for (size_t i = 0; i < SHADOWS_MAX; i++) {
        if (shadows[i].base == base) {
            if (shadows[i].n != n) return dpoc_errf(err, DPOC_EINPUT, "bf16 shadow re-registered with another size");
            dpoc_gemm_shadow_refresh_range(base, 0, n);
            return 0;
        }
        if (!shadows[i].base && free_slot == SHADOWS_MAX) free_slot = i;
    }
    if (free_slot == SHADOWS_MAX)
        return dpoc_errf(err, DPOC_EINPUT, "more than %d bf16 weight shadows registered", SHADOWS_MAX);
    if (n > SIZE_MAX / sizeof(dpoc_bf16) - SCRATCH_ALIGN)
        return dpoc_errf(err, DPOC_EINPUT, "bf16 shadow of %zu weights overflows size_t", n);
    dpoc_bf16 *b = aligned_alloc(SCRATCH_ALIGN, align_up(n * sizeof(dpoc_bf16)));
    if (!b) return dpoc_errf(err, DPOC_ENOMEM, "out of memory for the bf16 copy of %zu weights", n);
    shadows[free_slot].base = base;
    shadows[free_slot].n = n;
    shadows[free_slot].bf16 = b;
    dpoc_gemm_shadow_refresh_range(base, 0, n);
    return 0;
}

void dpoc_gemm_shadow_refresh_range(const float *base, size_t off, size_t n) {
    for (size_t i = 0; i < SHADOWS_MAX; i++)
        if (shadows[i].base && shadows[i].base == base && off <= shadows[i].n && n <= shadows[i].n - off) {
            pthread_once(&round_n_once, choose_round_n);
            round_n(shadows[i].bf16 + off, base + off, n);
        }
}

void dpoc_gemm_shadow_refresh(const float *base) {
    for (size_t i = 0; i < SHADOWS_MAX; i++)
        if (shadows[i].base && shadows[i].base == base) dpoc_gemm_shadow_refresh_range(base, 0, shadows[i].n);
}

void dpoc_gemm_shadow_remove(const float *base) {
    for (size_t i = 0; i < SHADOWS_MAX; i++)
        if (shadows[i].base && shadows[i].base == base) {
            free(shadows[i].bf16);
            memset(&shadows[i], 0, sizeof shadows[i]);
        }
}

/* The bf16 twin of the rows x cols block at p (row stride ld), or NULL when p
 * is not inside a registered block. Addresses compare as integers: p may
 * belong to no block at all. */
static const dpoc_bf16 *shadow_of(const float *p, size_t rows, size_t cols, size_t ld) {
    const uintptr_t a = (uintptr_t)p;
    const size_t span = (rows - 1) * ld + cols; /* elements from p to the block's end */
    for (size_t i = 0; i < SHADOWS_MAX; i++) {
        if (!shadows[i].base) continue;
        const uintptr_t lo = (uintptr_t)shadows[i].base;
        if (a < lo || (a - lo) % sizeof(float)) continue;
        const size_t off = (a - lo) / sizeof(float);
        if (off <= shadows[i].n && span <= shadows[i].n - off) return shadows[i].bf16 + off;
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* oneDNN context and per-thread state */

/* oneDNN's engine and stream: one static context, created once (pthread_once,
 * so concurrent first calls are safe) and kept for the process. Not per thread
 * and not per call because a CPU engine is thread-safe (primitives can be
 * created and run from any thread on it) and, in the OpenMP runtime, a CPU
 * stream executes synchronously in the calling thread and holds no state of
 * its own, so every thread can use the same one; creating them once also keeps
 * their cost, and their failure, out of the per-call path. ok: they exist and
 * the probe found a bf16 matmul implementation other than the reference one
 * (which is correct but far slower than the sgemm fallback); why: otherwise. */
static struct {
    pthread_once_t once;
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    int ok;
    char why[256];
} dnnl_ctx = {.once = PTHREAD_ONCE_INIT};

/* Set by the first oneDNN failure: from then on every call takes the fallback. */
static atomic_int dnnl_failed;
static atomic_flag warned_dnnl = ATOMIC_FLAG_INIT;
static atomic_flag warned_nomem = ATOMIC_FLAG_INIT;
static dpoc_gemm_bf16_impl forced_impl = DPOC_GEMM_BF16_AUTO;

typedef struct {
    int64_t M, N, K, ldb, ldc; /* ldb: B's row stride as the primitive reads it (a shadow's, or dense) */
    int trans_a, trans_b, threads;
    float alpha, beta;
} prim_key;

typedef struct {
    prim_key key;
    uint64_t used;        /* last use (the thread's clock); 0: empty slot */
    int use_fallback;     /* oneDNN offers only its reference kernel for this problem */
    dnnl_primitive_t prim;
    dnnl_memory_t src, wei, dst, pad; /* data handles set per call; pad NULL if none */
    size_t pad_bytes;
} prim_slot;

typedef struct {
    unsigned char *ops; /* the rounded operands: op(A) then op(B), each aligned */
    size_t ops_cap;
    unsigned char *pad; /* oneDNN's scratchpad (user mode, so oneDNN allocates none per call) */
    size_t pad_cap;
    uint64_t clock;
    prim_slot slot[PRIM_CACHE_SLOTS];
} thread_state;

static _Thread_local thread_state *tls_state;
static pthread_key_t state_key;
static int state_key_ok;
static pthread_once_t state_key_once = PTHREAD_ONCE_INIT;

static void slot_clear(prim_slot *s) {
    if (s->prim) dnnl_primitive_destroy(s->prim);
    if (s->src) dnnl_memory_destroy(s->src);
    if (s->wei) dnnl_memory_destroy(s->wei);
    if (s->dst) dnnl_memory_destroy(s->dst);
    if (s->pad) dnnl_memory_destroy(s->pad);
    memset(s, 0, sizeof *s);
}

static void state_free(void *p) {
    thread_state *ts = p;
    if (!ts) return;
    for (size_t i = 0; i < PRIM_CACHE_SLOTS; i++) slot_clear(&ts->slot[i]);
    free(ts->ops);
    free(ts->pad);
    free(ts);
}

/* The destructor frees a thread's state when it exits. */
static void make_state_key(void) { state_key_ok = pthread_key_create(&state_key, state_free) == 0; }

static thread_state *state_get(void) {
    if (tls_state) return tls_state;
    pthread_once(&state_key_once, make_state_key);
    thread_state *ts = calloc(1, sizeof *ts);
    if (!ts) return NULL;
    /* Without the key (pthread_key_create failed) the state is only freed by
     * dpoc_gemm_release: a leak per exiting thread, not an error. */
    if (state_key_ok) pthread_setspecific(state_key, ts);
    tls_state = ts;
    return ts;
}

void dpoc_gemm_release(void) {
    thread_state *ts = tls_state;
    if (!ts) return;
    tls_state = NULL;
    if (state_key_ok) pthread_setspecific(state_key, NULL);
    state_free(ts);
}

/* *buf holds at least need bytes afterwards (old contents are not kept), or
 * the call fails and leaves it as it was (need SIZE_MAX: an overflowed size). */
static int grow(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    if (need > SIZE_MAX - SCRATCH_ALIGN) return -1;
    unsigned char *p = aligned_alloc(SCRATCH_ALIGN, align_up(need));
    if (!p) return -1;
    free(*buf);
    *buf = p;
    *cap = align_up(need);
    return 0;
}

/* Bytes of the operand scratch for a and b elements of elem bytes each; SIZE_MAX on overflow. */
static size_t ops_bytes(size_t a, size_t b, size_t elem) {
    if (a > (SIZE_MAX / 2 - SCRATCH_ALIGN) / elem || b > (SIZE_MAX / 2 - SCRATCH_ALIGN) / elem) return SIZE_MAX;
    return align_up(a * elem) + align_up(b * elem);
}

int dpoc_gemm_reserve(size_t max_a_elems, size_t max_b_elems, dpoc_err *err) {
    thread_state *ts = state_get();
    if (!ts) return dpoc_errf(err, DPOC_ENOMEM, "out of memory allocating the GEMM thread state");
    const size_t need = ops_bytes(max_a_elems, max_b_elems, sizeof(dpoc_bf16));
    if (need == SIZE_MAX)
        return dpoc_errf(err, DPOC_EINPUT, "GEMM scratch for %zu + %zu elements overflows size_t", max_a_elems,
                         max_b_elems);
    if (grow(&ts->ops, &ts->ops_cap, need))
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory reserving %zu bytes of bf16 GEMM scratch", need);
    return 0;
}

/* Hands back scratch grown beyond the given capacities (dpoc_gemm_measure_peak). */
static void shrink_to(size_t ops_cap, size_t pad_cap) {
    thread_state *ts = tls_state;
    if (!ts) return;
    if (ts->ops_cap > ops_cap) {
        free(ts->ops);
        ts->ops = NULL;
        ts->ops_cap = 0;
        grow(&ts->ops, &ts->ops_cap, ops_cap); /* on failure it regrows on demand */
    }
    if (ts->pad_cap > pad_cap) {
        free(ts->pad);
        ts->pad = NULL;
        ts->pad_cap = 0;
        grow(&ts->pad, &ts->pad_cap, pad_cap);
    }
}

/* ------------------------------------------------------------------------ */
/* oneDNN set-up and primitives */

static void note_why(dnnl_status_t st, const char *what) {
    snprintf(dnnl_ctx.why, sizeof dnnl_ctx.why, "oneDNN %s failed: %s", what, dnnl_status2str(st));
}

/* The primitive descriptor of one problem; the caller destroys it. */
static dnnl_status_t make_pd(dnnl_primitive_desc_t *pd, const prim_key *k) {
    /* op(A) (M,K) stored densely as (M,K), or as (K,M) when transposed;
     * op(B) (K,N) as (K,N), or as (N,K). */
    const dnnl_dims_t a_dims = {k->M, k->K}, b_dims = {k->K, k->N}, c_dims = {k->M, k->N};
    const dnnl_dims_t a_str = {k->trans_a ? 1 : k->K, k->trans_a ? k->M : 1};
    const dnnl_dims_t b_str = {k->trans_b ? 1 : k->ldb, k->trans_b ? k->ldb : 1};
    const dnnl_dims_t c_str = {k->ldc, 1};
    dnnl_memory_desc_t a_md, b_md, c_md;
    dnnl_status_t st;
    if ((st = dnnl_memory_desc_init_by_strides(&a_md, 2, a_dims, dnnl_bf16, a_str))) return st;
    if ((st = dnnl_memory_desc_init_by_strides(&b_md, 2, b_dims, dnnl_bf16, b_str))) return st;
    if ((st = dnnl_memory_desc_init_by_strides(&c_md, 2, c_dims, dnnl_f32, c_str))) return st;
    dnnl_matmul_desc_t md;
    if ((st = dnnl_matmul_desc_init(&md, &a_md, &b_md, NULL, &c_md))) return st;
    dnnl_primitive_attr_t attr;
    if ((st = dnnl_primitive_attr_create(&attr))) return st;
    /* user scratchpad: the thread's buffer, instead of an allocation per execution */
    st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (!st && k->alpha != 1.0f) st = dnnl_primitive_attr_set_output_scales(attr, 1, 0, &k->alpha);
    if (!st && k->beta != 0.0f) {
        dnnl_post_ops_t po;
        st = dnnl_post_ops_create(&po);
        if (!st) {
            st = dnnl_post_ops_append_sum(po, k->beta); /* dst = alpha * A B + beta * dst */
            if (!st) st = dnnl_primitive_attr_set_post_ops(attr, po);
            dnnl_post_ops_destroy(po);
        }
    }
    if (!st) st = dnnl_primitive_desc_create(pd, &md, attr, dnnl_ctx.engine, NULL);
    dnnl_primitive_attr_destroy(attr);
    return st;
}

static int is_reference_impl(const_dnnl_primitive_desc_t pd) {
    const char *name = NULL;
    if (dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name) != dnnl_success || !name) return 1;
    return strncmp(name, "ref", 3) == 0;
}

static void dnnl_setup(void) {
    dnnl_status_t st = dnnl_engine_create(&dnnl_ctx.engine, dnnl_cpu, 0);
    if (st) {
        note_why(st, "engine creation");
        return;
    }
    st = dnnl_stream_create(&dnnl_ctx.stream, dnnl_ctx.engine, dnnl_stream_default_flags);
    if (st) {
        note_why(st, "stream creation");
        return;
    }
    const prim_key probe = {PROBE_DIM, PROBE_DIM, PROBE_DIM, PROBE_DIM, PROBE_DIM, 0, 1, 1, 1.0f, 0.0f};
    dnnl_primitive_desc_t pd;
    st = make_pd(&pd, &probe);
    if (st) {
        note_why(st, "bf16 matmul set-up");
        return;
    }
    const int ref = is_reference_impl(pd);
    dnnl_primitive_desc_destroy(pd);
    if (ref) {
        snprintf(dnnl_ctx.why, sizeof dnnl_ctx.why, "oneDNN has only its reference bf16 matmul on this CPU");
        return;
    }
    dnnl_ctx.ok = 1;
}

static int dnnl_ready(void) {
    pthread_once(&dnnl_ctx.once, dnnl_setup);
    return dnnl_ctx.ok && !atomic_load_explicit(&dnnl_failed, memory_order_relaxed);
}

int dpoc_gemm_bf16_available(void) { return forced_impl == DPOC_GEMM_BF16_AUTO && dnnl_ready(); }

void dpoc_gemm_bf16_force(dpoc_gemm_bf16_impl impl) { forced_impl = impl; }

static int key_eq(const prim_key *a, const prim_key *b) {
    return a->M == b->M && a->N == b->N && a->K == b->K && a->ldb == b->ldb && a->ldc == b->ldc &&
           a->trans_a == b->trans_a &&
           a->trans_b == b->trans_b && a->threads == b->threads && a->alpha == b->alpha && a->beta == b->beta;
}

/* Fills an empty slot for key k: primitive, memory objects (no data yet) and
 * the scratchpad size. On failure the slot is left empty. */
static dnnl_status_t slot_fill(prim_slot *s, const prim_key *k) {
    dnnl_primitive_desc_t pd;
    dnnl_status_t st = make_pd(&pd, k);
    if (st) return st;
    s->key = *k;
    if (is_reference_impl(pd)) {
        s->use_fallback = 1;
        dnnl_primitive_desc_destroy(pd);
        return dnnl_success;
    }
    st = dnnl_primitive_create(&s->prim, pd);
    const dnnl_memory_desc_t *pad_md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    s->pad_bytes = pad_md ? dnnl_memory_desc_get_size(pad_md) : 0;
    if (!st) st = dnnl_memory_create(&s->src, dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0),
                                     dnnl_ctx.engine, DNNL_MEMORY_NONE);
    if (!st) st = dnnl_memory_create(&s->wei, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0),
                                     dnnl_ctx.engine, DNNL_MEMORY_NONE);
    if (!st) st = dnnl_memory_create(&s->dst, dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0),
                                     dnnl_ctx.engine, DNNL_MEMORY_NONE);
    if (!st && s->pad_bytes) st = dnnl_memory_create(&s->pad, pad_md, dnnl_ctx.engine, DNNL_MEMORY_NONE);
    dnnl_primitive_desc_destroy(pd); /* the primitive keeps its own copy */
    if (st) slot_clear(s);
    return st;
}

/* The thread's slot for k, created if missing (replacing the least recently used). */
static dnnl_status_t slot_get(thread_state *ts, const prim_key *k, prim_slot **out) {
    prim_slot *victim = &ts->slot[0];
    ts->clock++;
    for (size_t i = 0; i < PRIM_CACHE_SLOTS; i++) {
        prim_slot *s = &ts->slot[i];
        if (s->used && key_eq(&s->key, k)) {
            s->used = ts->clock;
            *out = s;
            return dnnl_success;
        }
        if (s->used < victim->used) victim = s;
    }
    slot_clear(victim);
    const dnnl_status_t st = slot_fill(victim, k);
    if (st) return st;
    victim->used = ts->clock;
    *out = victim;
    return dnnl_success;
}

/* ------------------------------------------------------------------------ */
/* the BF16 implementations */

typedef struct {
    int trans_a, trans_b;
    size_t M, N, K;
    float alpha;
    const float *A;
    size_t lda;
    const float *B;
    size_t ldb;
    float beta;
    float *C;
    size_t ldc;
} gemm_args;

/* Stored shapes of A and B: rows x cols with their leading dimensions. */
static size_t a_rows(const gemm_args *g) { return g->trans_a ? g->K : g->M; }
static size_t a_cols(const gemm_args *g) { return g->trans_a ? g->M : g->K; }
static size_t b_rows(const gemm_args *g) { return g->trans_b ? g->N : g->K; }
static size_t b_cols(const gemm_args *g) { return g->trans_b ? g->K : g->N; }

enum { RUN_OK = 0, RUN_NOMEM, RUN_DNNL, RUN_REFERENCE };

static void warn_once(atomic_flag *flag, const char *msg) {
    if (!atomic_flag_test_and_set(flag)) fprintf(stderr, "dpoc: warning: %s\n", msg);
}

/* oneDNN: RUN_OK, RUN_NOMEM (scratch), RUN_DNNL (oneDNN failed: *st) or
 * RUN_REFERENCE (oneDNN offers only its reference kernel for this problem). */
static int run_onednn(const gemm_args *g, dnnl_status_t *st, const char **what) {
    thread_state *ts = state_get();
    if (!ts) return RUN_NOMEM;
    /* oneDNN takes its thread count from the calling thread's OpenMP setting
     * (an ICV per thread: set it on every call, it costs a load) */
    const int threads = openblas_get_num_threads();
    if (threads > 0 && omp_get_max_threads() != threads) omp_set_num_threads(threads);
    /* B already rounded (a registered weight): read in place with its own stride */
    const dpoc_bf16 *b_shadow = shadow_of(g->B, b_rows(g), b_cols(g), g->ldb);
    const size_t ldb = b_shadow ? g->ldb : b_cols(g);
    const prim_key k = {(int64_t)g->M, (int64_t)g->N, (int64_t)g->K, (int64_t)ldb, (int64_t)g->ldc,
                        g->trans_a != 0, g->trans_b != 0, omp_get_max_threads(), g->alpha, g->beta};
    prim_slot *s;
    *what = "matmul primitive creation";
    if ((*st = slot_get(ts, &k, &s))) return RUN_DNNL;
    if (s->use_fallback) return RUN_REFERENCE;
    const size_t a_n = g->M * g->K, b_n = b_shadow ? 0 : g->K * g->N;
    if (grow(&ts->ops, &ts->ops_cap, ops_bytes(a_n, b_n, sizeof(dpoc_bf16)))) return RUN_NOMEM;
    if (grow(&ts->pad, &ts->pad_cap, s->pad_bytes)) return RUN_NOMEM;
    dpoc_bf16 *a16 = (dpoc_bf16 *)ts->ops;
    dpoc_bf16 *b16 = (dpoc_bf16 *)(ts->ops + align_up(a_n * sizeof(dpoc_bf16)));
    pthread_once(&round_n_once, choose_round_n);
    round_rows(a16, g->A, a_rows(g), a_cols(g), g->lda);
    if (b_shadow) b16 = (dpoc_bf16 *)b_shadow; /* oneDNN only reads it */
    else round_rows(b16, g->B, b_rows(g), b_cols(g), g->ldb);
    *what = "matmul execution";
    if ((*st = dnnl_memory_set_data_handle(s->src, a16))) return RUN_DNNL;
    if ((*st = dnnl_memory_set_data_handle(s->wei, b16))) return RUN_DNNL;
    if ((*st = dnnl_memory_set_data_handle(s->dst, g->C))) return RUN_DNNL;
    dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, s->src}, {DNNL_ARG_WEIGHTS, s->wei}, {DNNL_ARG_DST, s->dst}};
    int nargs = 3;
    if (s->pad) {
        if ((*st = dnnl_memory_set_data_handle(s->pad, ts->pad))) return RUN_DNNL;
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, s->pad};
    }
    if ((*st = dnnl_primitive_execute(s->prim, dnnl_ctx.stream, nargs, args))) return RUN_DNNL;
    return RUN_OK;
}

/* rows x cols of src (stride ld) rounded to bf16 and widened, densely into dst. */
static void round_rows_f32(float *dst, const float *src, size_t rows, size_t cols, size_t ld) {
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < cols; c++) dst[r * cols + c] = round_bf16_f(src[r * ld + c]);
}

/* Fallback 1: the rounded operands in fp32, then sgemm. The products of bf16
 * values are exact in fp32 (8-bit significands), so this is the BF16
 * semantics with another fp32 summation order. RUN_NOMEM if no scratch. */
static int run_sgemm(const gemm_args *g) {
    thread_state *ts = state_get();
    if (!ts) return RUN_NOMEM;
    const size_t a_n = g->M * g->K, b_n = g->K * g->N;
    if (grow(&ts->ops, &ts->ops_cap, ops_bytes(a_n, b_n, sizeof(float)))) return RUN_NOMEM;
    float *a32 = (float *)ts->ops;
    float *b32 = (float *)(ts->ops + align_up(a_n * sizeof(float)));
    round_rows_f32(a32, g->A, a_rows(g), a_cols(g), g->lda);
    round_rows_f32(b32, g->B, b_rows(g), b_cols(g), g->ldb);
    cblas_sgemm(CblasRowMajor, g->trans_a ? CblasTrans : CblasNoTrans, g->trans_b ? CblasTrans : CblasNoTrans,
                blas_dim(g->M), blas_dim(g->N), blas_dim(g->K), g->alpha, a32, blas_dim(a_cols(g)), b32,
                blas_dim(b_cols(g)), g->beta, g->C, blas_dim(g->ldc));
    return RUN_OK;
}

/* Fallback 2, needing no memory: each element's dot product in fp32, in k order. */
static void run_scalar(const gemm_args *g) {
    for (size_t i = 0; i < g->M; i++)
        for (size_t j = 0; j < g->N; j++) {
            float acc = 0.0f;
            for (size_t k = 0; k < g->K; k++) {
                const float a = g->trans_a ? g->A[k * g->lda + i] : g->A[i * g->lda + k];
                const float b = g->trans_b ? g->B[j * g->ldb + k] : g->B[k * g->ldb + j];
                acc += round_bf16_f(a) * round_bf16_f(b);
            }
            float *c = &g->C[i * g->ldc + j];
            *c = g->beta == 0.0f ? g->alpha * acc : g->alpha * acc + g->beta * *c;
        }
}

static void gemm_bf16(const gemm_args *g) {
    if (g->K == 0 || g->alpha == 0.0f) { /* C = beta C, as BLAS: no product, C not read when beta is 0 */
        for (size_t i = 0; i < g->M; i++)
            for (size_t j = 0; j < g->N; j++) {
                float *c = &g->C[i * g->ldc + j];
                *c = g->beta == 0.0f ? 0.0f : g->beta * *c;
            }
        return;
    }
    const dpoc_gemm_bf16_impl impl = forced_impl;
    if (impl == DPOC_GEMM_BF16_AUTO && dnnl_ready()) {
        dnnl_status_t st = dnnl_success;
        const char *what = "";
        const int rc = run_onednn(g, &st, &what);
        if (rc == RUN_OK) return;
        if (rc == RUN_DNNL) {
            atomic_store(&dnnl_failed, 1);
            char msg[256];
            snprintf(msg, sizeof msg,
                     "oneDNN %s failed (%s, %zux%zux%zu); bf16 GEMMs use the exact fp32 fallback from now on", what,
                     dnnl_status2str(st), g->M, g->N, g->K);
            warn_once(&warned_dnnl, msg);
        }
    } else if (impl == DPOC_GEMM_BF16_AUTO) {
        char msg[320];
        snprintf(msg, sizeof msg, "%s; bf16 GEMMs use the exact fp32 fallback", dnnl_ctx.why);
        warn_once(&warned_dnnl, msg);
    }
    if (impl != DPOC_GEMM_BF16_SCALAR && run_sgemm(g) == RUN_OK) return;
    if (impl != DPOC_GEMM_BF16_SCALAR)
        warn_once(&warned_nomem, "out of memory for bf16 GEMM scratch; using a slow scalar loop for such calls");
    run_scalar(g);
}

/* ------------------------------------------------------------------------ */
/* entry points */

void dpoc_gemm(dpoc_gemm_precision p, int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
               const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C, size_t ldc) {
    if (M == 0 || N == 0) return;
    assert(ldc >= N && lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N));
    if (p == DPOC_GEMM_FP32) {
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    blas_dim(M), blas_dim(N), blas_dim(K), alpha, A, blas_dim(lda), B, blas_dim(ldb), beta, C,
                    blas_dim(ldc));
        return;
    }
    const gemm_args g = {trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc};
    gemm_bf16(&g);
}

int dpoc_gemm_measure_peak(dpoc_gemm_precision p, double *gflops, dpoc_err *err) {
    const size_t nmax = PEAK_SIZES[sizeof PEAK_SIZES / sizeof PEAK_SIZES[0] - 1];
    const thread_state *ts0 = tls_state;
    const size_t ops_cap0 = ts0 ? ts0->ops_cap : 0, pad_cap0 = ts0 ? ts0->pad_cap : 0;
    if (p == DPOC_GEMM_BF16) DPOC_TRY(dpoc_gemm_reserve(nmax * nmax, nmax * nmax, err));
    float *a = dpoc_malloc(nmax * nmax * sizeof(float), "GEMM peak buffers", err);
    float *b = dpoc_malloc(nmax * nmax * sizeof(float), "GEMM peak buffers", err);
    float *c = dpoc_malloc(nmax * nmax * sizeof(float), "GEMM peak buffers", err);
    if (!a || !b || !c) {
        free(a);
        free(b);
        free(c);
        shrink_to(ops_cap0, pad_cap0);
        return DPOC_ENOMEM;
    }
    for (size_t i = 0; i < nmax * nmax; i++) a[i] = b[i] = (float)((i * 7919) % 1000) * 1e-3f;
    double best = 0.0;
    for (size_t k = 0; k < sizeof PEAK_SIZES / sizeof PEAK_SIZES[0]; k++) {
        const size_t n = PEAK_SIZES[k];
        dpoc_gemm(p, 0, 1, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n); /* warm-up (and primitive creation) */
        for (int r = 0; r < PEAK_REPEATS; r++) {
            const double t0 = dpoc_prof_clock();
            dpoc_gemm(p, 0, 1, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            const double dt = dpoc_prof_clock() - t0;
            const double g = 2.0 * (double)n * (double)n * (double)n / dt * 1e-9;
            if (g > best) best = g;
        }
    }
    free(a);
    free(b);
    free(c);
    shrink_to(ops_cap0, pad_cap0);
    *gflops = best;
    return 0;
}
