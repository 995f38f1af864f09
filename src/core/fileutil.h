/* Small file helpers shared by the parsers. */
#ifndef DPOC_FILEUTIL_H
#define DPOC_FILEUTIL_H

#include <stddef.h>

#include "dpoc/err.h"

/* Reads a whole file into a NUL-terminated buffer; errors name the path. */
int dpoc_read_file(const char *path, char **out, size_t *len, dpoc_err *err);

/* path_join(a, b) into buf (size n); error if it does not fit. */
int dpoc_path_join(char *buf, size_t n, const char *a, const char *b, dpoc_err *err);

/* fsync a file (directory = 0) or a directory (1); errors name the path. */
int dpoc_fsync_path(const char *path, int directory, dpoc_err *err);

/* fsyncs the finished temporary file tmp and renames it to path; removes tmp on failure. */
int dpoc_commit_file(const char *tmp, const char *path, dpoc_err *err);

/* Writes dir/name through dir/.name.tmp, fsync and rename (the caller fsyncs dir
 * once it has written everything). */
int dpoc_write_file_atomic(const char *dir, const char *name, const void *data, size_t len, dpoc_err *err);

/* Maps a regular file read-only (MAP_PRIVATE). Files shorter than min_size are
 * refused with a message saying they are too short for `what`. */
int dpoc_map_file(const char *path, size_t min_size, const char *what, void **map, size_t *len, dpoc_err *err);

/* mkdir -p */
int dpoc_mkdirs(const char *path, dpoc_err *err);

#endif
