/* Prompt lists for generate / build-pairs: a JSON array of strings, JSONL of
 * {"prompt": "..."} (or one JSON string per line), or plain text with one prompt
 * per non-empty line (surrounding blanks trimmed). An error names the file and line. */
#ifndef DPOC_PROMPTS_H
#define DPOC_PROMPTS_H

#include <stddef.h>

#include "dpoc/err.h"

/* *prompts: n malloc'ed NUL-terminated strings; free with dpoc_prompts_free. No prompts is an error. */
int dpoc_prompts_read(const char *path, char ***prompts, size_t *n, dpoc_err *err);
/* The same on text in memory; name is used in messages. */
int dpoc_prompts_parse(const char *text, size_t len, const char *name, char ***prompts, size_t *n, dpoc_err *err);
void dpoc_prompts_free(char **prompts, size_t n);

#endif
