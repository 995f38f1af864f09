/* dpoc_err: error status with message. */
#include "dpoc/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dpoc_errf(dpoc_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

int dpoc_err_prefix(dpoc_err *err, const char *fmt, ...) {
    if (!err) return 0;
    char prefix[DPOC_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char old[DPOC_ERR_MSG_MAX];
    memcpy(old, err->msg, sizeof old);
    int n = snprintf(err->msg, sizeof err->msg, "%s: ", prefix);
    /* truncation of a long message is acceptable: copy what fits */
    if (n >= 0 && (size_t)n < sizeof err->msg) {
        size_t room = sizeof err->msg - (size_t)n - 1, len = strlen(old);
        if (len > room) len = room;
        memcpy(err->msg + n, old, len);
        err->msg[(size_t)n + len] = '\0';
    }
    return err->code;
}

void dpoc_err_clear(dpoc_err *err) {
    if (!err) return;
    err->code = DPOC_OK;
    err->msg[0] = '\0';
}

void *dpoc_malloc(size_t n, const char *what, dpoc_err *err) {
    void *p = malloc(n ? n : 1);
    if (!p) dpoc_errf(err, DPOC_ENOMEM, "out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *dpoc_calloc(size_t count, size_t size, const char *what, dpoc_err *err) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) dpoc_errf(err, DPOC_ENOMEM, "out of memory allocating %zu x %zu bytes for %s", count, size, what);
    return p;
}
