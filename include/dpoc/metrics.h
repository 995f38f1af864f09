/* Metrics files written by rank 0 at every logging step:
 *   output_dir/metrics.jsonl  one JSON object per logged step;
 *   output_dir/metrics.h5     one chunked, extendible 1-D float64 dataset per metric,
 *                             named by the metric ("rewards/chosen" is the dataset
 *                             "chosen" in group "rewards"), row i = logged step i;
 *                             the run's config as the JSON string attribute "config";
 *                             evaluation rows (eval_loss, ...) in the group "eval", each
 *                             series named without "eval_" (eval/loss, eval/rewards/chosen,
 *                             eval/step, eval/epoch), with rows of their own.
 * Both are flushed at every step; on resume both are cut back to the checkpoint's
 * step so steps stay unique and increasing. */
#ifndef DPOC_METRICS_H
#define DPOC_METRICS_H

#include <stdio.h>

#include "dpoc/err.h"
#include "dpoc/trainer.h"

typedef struct {
    char dir[4096];
    FILE *jsonl;
    long long h5;      /* hid_t of metrics.h5, or -1 */
    size_t rows;       /* rows in metrics.h5 */
    size_t eval_rows;  /* rows of its group "eval" */
    int print;         /* print a progress line per row */
    long total_steps;  /* for the progress line */
} dpoc_metrics_writer;

/* Opens (creates) both files. keep_up_to_step < 0: start afresh; otherwise keep
 * the rows whose step <= keep_up_to_step and drop the rest (resume). */
int dpoc_metrics_open(dpoc_metrics_writer *w, const char *output_dir, const char *config_json, long keep_up_to_step,
                      dpoc_err *err);
/* A dpoc_log_fn: appends the record to both files (and prints a line). */
int dpoc_metrics_write(void *writer, const dpoc_log_record *rec, dpoc_err *err);
void dpoc_metrics_close(dpoc_metrics_writer *w);

#endif
