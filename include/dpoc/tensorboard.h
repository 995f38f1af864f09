/* TensorBoard event files (report_to "tensorboard"), written by rank 0 as Hugging
 * Face Trainer's TensorBoardCallback writes them through torch's SummaryWriter:
 *
 *   LOGDIR/events.out.tfevents.<unix seconds, 10 digits>.<hostname>.<pid>.0
 *
 * a sequence of TFRecords (uint64 length, uint32 masked CRC-32C of the length,
 * the data, uint32 masked CRC-32C of the data; little-endian), each a serialized
 * tensorboard.Event (src/store/tb_event.proto): first {file_version
 * "brain.Event:2"}, then a SessionLog START at the step the run starts from, the
 * run's config as the text summary "args/text_summary" (HF's add_text("args")),
 * and one event per logged row holding a scalar per metric, tagged as HF's
 * rewrite_logs tags them ("loss" -> "train/loss", "eval_loss" -> "eval/loss",
 * "test_x" -> "test/x"), event step = global step. Flushed at every row.
 *
 * Resume: TensorBoard draws a run's event files one after the other, so events a
 * killed run wrote past the checkpoint would come back as a zig-zag. Opening the
 * writer therefore cuts every event file already in LOGDIR to the steps <= the
 * checkpoint's (each file rewritten through a temporary name without "tfevents"
 * and renamed over itself, so a reader or a crash sees the old file or the new
 * one); a damaged or truncated tail (a killed writer) is dropped, and a file with
 * no summary left is removed. The SessionLog START is TensorFlow's own restart
 * marker (TensorBoard's EventAccumulator purges the steps at and past it), for
 * readers that trust it rather than the cut. */
#ifndef DPOC_TENSORBOARD_H
#define DPOC_TENSORBOARD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dpoc/err.h"
#include "dpoc/trainer.h"

/* ---- TFRecord framing ---- */

/* CRC-32C (Castagnoli, as TFRecord and iSCSI use it; ISA-L's crc32_iscsi):
 * crc32c("123456789") = 0xE3069283. */
uint32_t dpoc_tb_crc32c(const void *data, size_t n);
/* TFRecord's masked CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8. */
uint32_t dpoc_tb_masked_crc(uint32_t crc);

#define DPOC_TB_RECORD_HEADER 12 /* uint64 length + uint32 masked CRC of it */
#define DPOC_TB_RECORD_FOOTER 4  /* uint32 masked CRC of the data */

/* Writes the framing of an n-byte record: header (12 bytes) and footer (4). */
void dpoc_tb_record_frame(const void *data, size_t n, uint8_t header[DPOC_TB_RECORD_HEADER],
                          uint8_t footer[DPOC_TB_RECORD_FOOTER]);
/* Reads the record at buf[0, len): on success *data / *n are its payload (inside
 * buf) and *used the bytes it spans. A record cut short or with a wrong CRC is
 * DPOC_EINPUT with a message saying which. */
int dpoc_tb_record_read(const uint8_t *buf, size_t len, const uint8_t **data, size_t *n, size_t *used,
                        dpoc_err *err);

/* ---- tags ---- */

/* HF's rewrite_logs: "eval_X" -> "eval/X", "test_X" -> "test/X", else "train/" +
 * key. Truncated (still NUL-terminated) when it does not fit out. */
void dpoc_tb_tag(const char *key, char *out, size_t cap);

/* ---- the log directory ---- */

/* The directory a run writes its events to: logging_dir when set; else the
 * environment's TENSORBOARD_LOGGING_DIR (transformers 5's TensorBoardCallback
 * reads it; `~/` expanded); else output_dir/runs/<%b%d_%H-%M-%S>_<hostname>
 * (transformers' default_logdir(), local time). When resuming with that
 * default, the subdirectory of output_dir/runs holding the newest event file
 * (the run being continued) instead, so that the resumed steps join its lines. */
int dpoc_tb_logdir(const char *logging_dir, const char *output_dir, int resuming, char *out, size_t cap,
                   dpoc_err *err);

/* ---- cutting existing files ---- */

/* What dpoc_tb_cut_file did. */
typedef struct {
    size_t kept, dropped;  /* events */
    size_t damaged_bytes;  /* an unreadable tail (truncated or corrupt record) dropped */
    int removed;           /* the file held no summary afterwards and was removed */
    int rewritten;         /* the file was replaced by its cut copy */
} dpoc_tb_cut_stats;

/* Keeps the events of one event file whose step <= keep_up_to_step (< 0: none
 * of the summaries), except text summaries at keep_up_to_step itself (the config
 * an earlier start from that step wrote; the new start writes its own). Events
 * that carry no summary (file version, session log) are kept. The file is
 * rewritten only when something goes; tmp_path is the temporary to use. */
int dpoc_tb_cut_file(const char *path, const char *tmp_path, long keep_up_to_step, dpoc_tb_cut_stats *st,
                     dpoc_err *err);

/* ---- the writer ---- */

typedef struct {
    char dir[4096];
    char path[4200]; /* the event file being written */
    FILE *f;
    uint8_t *buf;    /* packing buffer, grown as needed */
    size_t buf_cap;
} dpoc_tb_writer;

/* Creates logdir, cuts the event files already there to keep_up_to_step (a resume
 * from a checkpoint at that step; < 0: a fresh run, which clears them, as
 * metrics.jsonl starts afresh), and starts a new file, named to sort after every
 * file there (TensorBoard reads a run's files in name order): the file version, a
 * SessionLog START at keep_up_to_step + 1 (0 for a fresh run: the first step this
 * run logs; START purges the steps at and past it, so the checkpoint's own row
 * stays), and config_json (may be NULL) as the "args" text at keep_up_to_step (0).
 * Messages about cut files go to `log` (may be NULL). */
int dpoc_tb_open(dpoc_tb_writer *w, const char *logdir, long keep_up_to_step, const char *config_json, FILE *log,
                 dpoc_err *err);
/* One event at `step` with one scalar per (tag, value). Flushed. */
int dpoc_tb_write_scalars(dpoc_tb_writer *w, long step, size_t n, const char *const *tags, const double *values,
                          dpoc_err *err);
/* A text summary tagged tag + "/text_summary", as torch's add_text. Flushed. */
int dpoc_tb_write_text(dpoc_tb_writer *w, long step, const char *tag, const char *text, dpoc_err *err);
/* A dpoc_log_fn: the row's metrics as scalars at its "step" (which is not itself a
 * tag), tagged by dpoc_tb_tag. */
int dpoc_tb_write_log(void *writer, const dpoc_log_record *rec, dpoc_err *err);
void dpoc_tb_close(dpoc_tb_writer *w);

#endif
