/* A whole training run as the CLI starts it: trainer, metrics files, checkpoints,
 * resume, signals and the watchdog. */
#ifndef DPOC_RUN_H
#define DPOC_RUN_H

#include "dpoc/config.h"
#include "dpoc/dist.h"
#include "dpoc/err.h"

/* Exit status of a run stopped by SIGUSR1/SIGTERM/SIGINT after writing a
 * checkpoint: "checkpointed, not finished" (the Slurm scripts requeue on it). */
#define DPOC_EXIT_CHECKPOINTED 85

/* resume: NULL (start afresh), "auto" or a checkpoint path. Returns 0 when
 * training finished, DPOC_EXIT_CHECKPOINTED after a signal, or an error status. */
int dpoc_run_train(const dpoc_config *cfg, dpoc_dist *dist, const char *resume, dpoc_err *err);

#endif
