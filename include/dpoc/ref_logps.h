/* output_dir/ref_logps.h5: reference log-probs computed once (precompute_ref_log_probs).
 *
 * /ref_logps  float64 (n_pairs, 2): chosen, rejected log-prob of each pair under
 *             the reference model, as the loss takes them
 * attributes  format_version (1), fingerprint (u64: reference weights, tokenized
 *             data and the settings that change the values; see
 *             dpoc_trainer_ref_logps_key)
 * A file whose fingerprint or size does not match is not used (and is replaced);
 * it is written to a temporary name, fsync'ed and renamed, so a reader never sees
 * half a file. */
#ifndef DPOC_REF_LOGPS_H
#define DPOC_REF_LOGPS_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"

#define DPOC_REF_LOGPS_FILE "ref_logps.h5"
/* The evaluation set's (eval_file), in the same format under its own key. */
#define DPOC_EVAL_REF_LOGPS_FILE "ref_logps_eval.h5"

/* *found = 1 and out (n_pairs * 2) filled when path exists and matches
 * (fingerprint, n_pairs); *found = 0 when it is absent or does not match (why:
 * a short reason, may be NULL). A file that cannot be read as ours is "does not
 * match", never an error: the values are recomputed. */
int dpoc_ref_logps_read(const char *path, uint64_t fingerprint, size_t n_pairs, double *out, int *found,
                        char *why, size_t why_n, dpoc_err *err);
int dpoc_ref_logps_write(const char *path, uint64_t fingerprint, size_t n_pairs, const double *values,
                         dpoc_err *err);

#endif
