#include "core/fileutil.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int dpoc_read_file(const char *path, char **out, size_t *len, dpoc_err *err) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return dpoc_errf(err, DPOC_EINPUT, "%s: not a regular file", path);
    }
    size_t n = (size_t)st.st_size;
    char *buf = dpoc_malloc(n + 1, path, err);
    if (!buf) {
        fclose(f);
        return DPOC_ENOMEM;
    }
    if (n && fread(buf, 1, n, f) != n) {
        free(buf);
        fclose(f);
        return dpoc_errf(err, DPOC_EIO, "%s: read failed", path);
    }
    fclose(f);
    buf[n] = '\0';
    *out = buf;
    if (len) *len = n;
    return 0;
}

int dpoc_path_join(char *buf, size_t n, const char *a, const char *b, dpoc_err *err) {
    int w = snprintf(buf, n, "%s/%s", a, b);
    if (w < 0 || (size_t)w >= n) return dpoc_errf(err, DPOC_EINPUT, "path too long: %s/%s", a, b);
    return 0;
}

int dpoc_mkdirs(const char *path, dpoc_err *err) {
    char tmp[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp) return dpoc_errf(err, DPOC_EINPUT, "bad directory path '%s'", path);
    memcpy(tmp, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] == '/' || tmp[i] == '\0') {
            char c = tmp[i];
            tmp[i] = '\0';
            if (mkdir(tmp, 0777) != 0 && errno != EEXIST)
                return dpoc_errf(err, DPOC_EIO, "cannot create directory '%s': %s", tmp, strerror(errno));
            tmp[i] = c;
        }
    }
    return 0;
}

int dpoc_fsync_path(const char *path, int directory, dpoc_err *err) {
    int fd = open(path, directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) return dpoc_errf(err, DPOC_EIO, "%s: cannot open for fsync: %s", path, strerror(errno));
    int r = fsync(fd);
    int e = errno;
    close(fd);
    return r ? dpoc_errf(err, DPOC_EIO, "%s: fsync failed: %s", path, strerror(e)) : 0;
}

int dpoc_commit_file(const char *tmp, const char *path, dpoc_err *err) {
    int rc = dpoc_fsync_path(tmp, 0, err);
    if (!rc && rename(tmp, path) != 0) rc = dpoc_errf(err, DPOC_EIO, "%s: rename failed: %s", path, strerror(errno));
    if (rc && remove(tmp) != 0 && errno != ENOENT) {
        /* a directory gone read-only keeps the partial file too: say where it is */
        char msg[DPOC_ERR_MSG_MAX];
        snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
        dpoc_errf(err, rc, "%s (the partial file %s could not be removed: %s)", msg, tmp, strerror(errno));
    }
    return rc;
}

int dpoc_write_file_atomic(const char *dir, const char *name, const void *data, size_t len, dpoc_err *err) {
    char tmp[4200], path[4200];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path ||
        snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name) >= (int)sizeof tmp)
        return dpoc_errf(err, DPOC_EINPUT, "path too long: %s/%s", dir, name);
    FILE *f = fopen(tmp, "wb");
    if (!f) return dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    int ok = len == 0 || fwrite(data, 1, len, f) == len;
    int e = ok ? 0 : errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (!ok) {
        remove(tmp);
        return dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", path, e ? strerror(e) : "short write");
    }
    return dpoc_commit_file(tmp, path, err);
}

int dpoc_map_file(const char *path, size_t min_size, const char *what, void **map, size_t *len, dpoc_err *err) {
    *map = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0) rc = dpoc_errf(err, DPOC_EIO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode)) rc = dpoc_errf(err, DPOC_EINPUT, "%s: not a regular file", path);
    else if ((uintmax_t)st.st_size < min_size)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: file is %lld bytes, too short for %s (at least %zu)", path,
                       (long long)st.st_size, what, min_size);
    else if ((uintmax_t)st.st_size > SIZE_MAX) rc = dpoc_errf(err, DPOC_EINPUT, "%s: file too large to map", path);
    if (rc) {
        close(fd);
        return rc;
    }
    size_t size = (size_t)st.st_size;
    void *m = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    int e = errno;
    close(fd);
    if (m == MAP_FAILED) return dpoc_errf(err, DPOC_EIO, "%s: cannot map: %s", path, strerror(e));
    *map = m;
    *len = size;
    return 0;
}
