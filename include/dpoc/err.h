/* dpoc error status: library code returns an int status and fills a dpoc_err
 * with a message that names the file, line, key or tensor at fault. Only the
 * CLI decides how the process ends (exit code = the status). */
#ifndef DPOC_ERR_H
#define DPOC_ERR_H

#include <stddef.h>

enum dpoc_status {
    DPOC_OK = 0,
    DPOC_EINTERNAL = 1, /* a bug or a failed system call we cannot attribute to input */
    DPOC_EINPUT = 2,    /* bad config, dataset line, model file, checkpoint: exit code 2 */
    DPOC_EIO = 3,       /* I/O failure (disk full, unreadable file after open) */
    DPOC_ENOMEM = 4,    /* allocation failure */
};

#define DPOC_ERR_MSG_MAX 1024

typedef struct {
    int code;
    char msg[DPOC_ERR_MSG_MAX];
} dpoc_err;

/* Sets err (if not NULL) and returns code. printf-style message. */
int dpoc_errf(dpoc_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes an existing message with more context ("loading tiny/: ..."). */
int dpoc_err_prefix(dpoc_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void dpoc_err_clear(dpoc_err *err);

/* Allocation helpers that report an out-of-memory error naming what was being allocated. */
void *dpoc_malloc(size_t n, const char *what, dpoc_err *err);
void *dpoc_calloc(size_t count, size_t size, const char *what, dpoc_err *err);

/* Propagate a non-zero status. */
#define DPOC_TRY(expr)              \
    do {                            \
        int dpoc_rc_ = (expr);      \
        if (dpoc_rc_) return dpoc_rc_; \
    } while (0)

/* Internal consistency check with file and line; returns DPOC_EINTERNAL. */
#define DPOC_CHECK(cond, err)                                                                   \
    do {                                                                                        \
        if (!(cond))                                                                            \
            return dpoc_errf((err), DPOC_EINTERNAL, "internal check failed at %s:%d: %s",      \
                             __FILE__, __LINE__, #cond);                                        \
    } while (0)

#endif
