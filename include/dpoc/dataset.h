/* Preference datasets in memory: every pair's prompt, chosen and rejected token
 * ids in one flat array, and the collation TRL's DataCollatorForPreference does
 * (prompt + completion, truncation to max_length) without padding. */
#ifndef DPOC_DATASET_H
#define DPOC_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"
#include "dpoc/prefs.h"

typedef struct {
    size_t prompt_off, prompt_len;
    size_t chosen_off, chosen_len;
    size_t rejected_off, rejected_len;
    size_t line; /* 1-based line in the source file */
} dpoc_pair;

typedef struct {
    int32_t *tokens;
    size_t n_tokens, cap_tokens;
    dpoc_pair *pairs;
    size_t n_pairs, cap_pairs;
    size_t n_dropped_prompt_too_long; /* rows whose prompt alone reaches max_length (TRL drops them) */
    size_t n_skipped_bad;             /* bad records skipped (skip_bad_records) */
    size_t n_rows;                    /* rows read */
} dpoc_dataset;

typedef struct {
    long max_length;      /* <= 0: none */
    int keep_end;         /* truncation_mode keep_end */
    int skip_bad_records; /* skip (and count) bad records instead of stopping */
} dpoc_dataset_opts;

/* Reads a preference data set: JSONL (one row per line) or a JSON array of rows, in
 * any of the formats of prefs.h. A bad record stops with file:line (JSONL) or
 * file:row N (array) and the reason, or is skipped and counted with skip_bad_records;
 * the first few skipped records are reported on stderr. */
int dpoc_dataset_load(dpoc_dataset *d, const char *path, const dpoc_prefs_ctx *ctx, const dpoc_dataset_opts *o,
                      dpoc_err *err);

/* Pre-tokenized JSONL, one pair per line:
 *   {"prompt_input_ids": [...], "chosen_input_ids": [...], "rejected_input_ids": [...]}
 * (TRL's own names prompt_ids / chosen_ids / rejected_ids are accepted too).
 * Ids must lie in [0, vocab_size). Errors name file:line and the key.
 * With max_length > 0 and keep_start truncation, rows whose prompt has
 * >= max_length tokens are dropped and counted, as TRL does. */
int dpoc_dataset_load_pretokenized(dpoc_dataset *d, const char *path, size_t vocab_size, long max_length,
                                   int keep_end, dpoc_err *err);

/* Parses one line (NUL-terminated) and appends the pair. Exposed for fuzzing. */
int dpoc_dataset_parse_line(dpoc_dataset *d, const char *line, size_t len, size_t lineno, const char *where,
                            size_t vocab_size, dpoc_err *err);

void dpoc_dataset_free(dpoc_dataset *d);

/* One collated sequence: prompt + completion, truncated to max_length
 * (keep_start keeps the head, keep_end the tail). */
typedef struct {
    const int32_t *prompt, *completion;
    size_t T;          /* tokens after truncation */
    size_t comp_start; /* index of the first completion token (== T if all were cut) */
    size_t row0, R;    /* scored rows: positions row0..row0+R-1 predict completion tokens */
} dpoc_seq;

/* Writes the sequence ids into buf (at least prompt+completion tokens) and fills seq. */
void dpoc_dataset_collate(const dpoc_dataset *d, size_t pair, int rejected, long max_length, int keep_end,
                          int32_t *buf, dpoc_seq *seq);

/* Longest prompt+completion over the dataset, after truncation. */
size_t dpoc_dataset_max_seq_len(const dpoc_dataset *d, long max_length);

#endif
