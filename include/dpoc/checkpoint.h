/* HDF5 checkpoints, written by rank 0 crash-safely and verified on load.
 *
 * output_dir/checkpoint-STEP.h5:
 *   /model/<HF tensor name>              fp32, the policy's weights
 *   /optimizer/exp_avg/<name>            AdamW first moments
 *   /optimizer/exp_avg_sq/<name>         AdamW second moments
 *   root attributes: format_version, dpoc_version, git_revision, config (JSON),
 *   world_size, global_batch_size, global_step, epoch, samples_seen, seed,
 *   optimizer_step, scheduler (total_steps, warmup_steps), the logging window,
 *   model/ref/data source paths and content fingerprints, content_hash, and
 *   (not hashed) machine (JSON: CPU, BLAS, kernel, threads) and precision.
 * Every dataset carries the Fletcher32 filter; content_hash (FNV-1a 64 of all
 * tensors and the step counters) is checked on load.
 *
 * Writing: a temporary file in output_dir, closed, fsync'ed, renamed, the
 * directory fsync'ed; then output_dir/latest (the file name) the same way; only
 * then are checkpoints beyond save_total_limit removed. */
#ifndef DPOC_CHECKPOINT_H
#define DPOC_CHECKPOINT_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/trainer.h"

#define DPOC_CKPT_FORMAT_VERSION 1

/* Writes the trainer's state at its current step; save_total_limit 0 keeps all.
 * The written path goes to path_out (may be NULL). Called on rank 0 only, but
 * with zero_stage >= 1 on more than one rank on every rank (collective): the
 * others send their slices of the AdamW moments, and the file is the same as an
 * unsharded run's, so it resumes at any world size and stage. */
int dpoc_ckpt_save(const dpoc_trainer *t, size_t save_total_limit, char *path_out, size_t path_n, dpoc_err *err);

/* Opens a checkpoint and checks its format version and content hash. */
int dpoc_ckpt_verify(const char *path, dpoc_err *err);

/* Resolves --resume: "auto" takes output_dir/latest, falling back (with a warning on
 * stderr) to the newest checkpoint that verifies; no checkpoint at all leaves
 * path empty (start afresh). Any other value is a file that must verify. */
int dpoc_ckpt_resolve(const char *output_dir, const char *resume, char *path, size_t n, dpoc_err *err);

/* Restores weights, optimizer state, step and logging window into a trainer built
 * from the same config. A checkpoint of another model, data set or global batch is
 * refused with a message saying what differs. */
int dpoc_ckpt_restore(dpoc_trainer *t, const char *path, dpoc_err *err);

/* The precision of the matrix products the checkpoint's run used (attribute
 * "precision"; absent: fp32): *bf16 = 1 for bf16. */
int dpoc_ckpt_precision(const char *path, int *bf16, dpoc_err *err);

/* The step a checkpoint was taken at (read from its attributes). */
int dpoc_ckpt_step(const char *path, long *step, dpoc_err *err);

/* Reads the policy's weights (/model/<name>) into m->params; m is built with
 * dpoc_model_init from the config.json of the model the run started from. Checks
 * the format version, that /model holds exactly the model's tensors with the
 * model's shapes (an error names the tensor: another model?) and, through
 * Fletcher32, every chunk it reads. The content hash is not checked here: call
 * dpoc_ckpt_verify first. */
int dpoc_ckpt_read_weights(const char *path, dpoc_model *m, dpoc_err *err);
/* *is_lora = 1 and *cfg's r, alpha and use_rslora when path is a LoRA run's
 * checkpoint (the lora_* attributes), else *is_lora = 0. */
int dpoc_ckpt_lora(const char *path, int *is_lora, dpoc_lora_cfg *cfg, dpoc_err *err);

#endif
