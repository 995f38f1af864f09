/* Shared helpers for the CMocka tests: fixture paths, JSON and tensor
 * comparisons with explicit tolerances that print what differed. */
#ifndef DPOC_TESTUTIL_H
#define DPOC_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cjson/cJSON.h>

#include "core/rng.h"
#include "dpoc/config.h"

/* Test random numbers: core/rng's splitmix64 and a uniform float in [lo, hi). */
typedef struct {
    uint64_t s;
} rng_t;
static inline uint64_t rng_next(rng_t *r) { return dpoc_splitmix64(&r->s); }
static inline float rng_uniform(rng_t *r, float lo, float hi) {
    return (float)(lo + (hi - lo) * ((double)(rng_next(r) >> 11) / (double)(1ull << 53)));
}

/* DPOC_FIXTURES "/" rel, in a static buffer (one at a time). */
const char *fixture_path(const char *rel);

/* Reads a whole file; NULL on failure. Caller frees. */
char *read_text_file(const char *path, size_t *len);

/* Parses a JSON file; fails the test if it cannot. Caller cJSON_Delete()s. */
cJSON *load_json_fixture(const char *rel);

/* Copies a JSON array of numbers into a new double array; returns count. */
size_t json_doubles(const cJSON *arr, double **out);

/* max |a-b| / max(max |b|, floor): the relative max-abs error used by the
 * gradient comparisons (the reference is b). */
double rel_maxabs_err(const float *a, const float *b, size_t n, double floor);

/* Asserts |a-b| <= rtol*|b| + atol, printing name and values on failure. */
void assert_close(double a, double b, double rtol, double atol, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Environment for running dpoc through mpirun in tests: as root Open MPI needs
 * its two opt-in variables, containers want no ptrace single-copy, one BLAS thread. */
void set_mpi_test_env(void);

/* Fails (with the log shown) unless rc == want. */
void expect_exit(int rc, int want, const char *what, const char *log);

/* Fails (with the log shown) unless the log file contains needle. */
void expect_log_has(const char *log, const char *needle);

/* A fresh temporary directory (mkdtemp under /tmp); returns a static copy. */
const char *make_temp_dir(void);

/* A run's metrics.jsonl against the log_history of a TRL train3.json fixture (rel
 * under tests/fixtures), step by step: every number TRL logged within metric_rtol
 * (loss within loss_rtol), atol each; HF's own bookkeeping (total_flos, train_*)
 * skipped; at least 15 metrics a step and exactly `steps` steps. */
void compare_log_history_with(const char *rel, const char *metrics_path, size_t steps, double loss_rtol,
                              double metric_rtol, double atol, const char *what);

/* configs/<model>.json as shipped, its paths (relative to the repository root) made
 * absolute, output_dir a fresh temporary directory; not finalized, so that a test can
 * set more keys first. */
void load_shipped_config(dpoc_config *c, const char *model);

#endif
