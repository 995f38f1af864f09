/* Small file helpers shared by the parsers. */
#ifndef DPOC_FILEUTIL_H
#define DPOC_FILEUTIL_H

#include <stddef.h>

#include "dpoc/err.h"

/* Reads a whole file into a NUL-terminated buffer; errors name the path. */
int dpoc_read_file(const char *path, char **out, size_t *len, dpoc_err *err);

/* path_join(a, b) into buf (size n); error if it does not fit. */
int dpoc_path_join(char *buf, size_t n, const char *a, const char *b, dpoc_err *err);

/* mkdir -p */
int dpoc_mkdirs(const char *path, dpoc_err *err);

#endif
