/* Saving a model as a Hugging Face directory (safetensors + config.json). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "dpoc/model.h"
#include "dpoc/safetensors.h"

static int write_file_atomic(const char *path, const char *data, size_t len, dpoc_err *err) {
    char tmp[DPOC_ERR_MSG_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return dpoc_errf(err, DPOC_EINPUT, "path too long: %s", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    int ok = fwrite(data, 1, len, f) == len;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", path, strerror(errno));
    }
    return 0;
}

int dpoc_model_save(const dpoc_model *m, const char *dir, const char *src_dir, dpoc_err *err) {
    char path[DPOC_ERR_MSG_MAX], tmp[DPOC_ERR_MSG_MAX + 8];
    DPOC_TRY(dpoc_mkdirs(dir, err));
    const char **names = dpoc_malloc(m->n_tensors * sizeof *names, "tensor names", err);
    const float **data = dpoc_malloc(m->n_tensors * sizeof *data, "tensor table", err);
    size_t *ndims = dpoc_malloc(m->n_tensors * sizeof *ndims, "tensor table", err);
    size_t(*shapes)[ST_MAX_DIMS] = dpoc_calloc(m->n_tensors, sizeof *shapes, "tensor table", err);
    int rc = DPOC_ENOMEM;
    if (!names || !data || !ndims || !shapes) goto out;
    for (size_t i = 0; i < m->n_tensors; i++) {
        names[i] = m->info[i].name;
        data[i] = m->params + m->info[i].offset;
        ndims[i] = m->info[i].ndim;
        shapes[i][0] = m->info[i].shape[0];
        shapes[i][1] = m->info[i].shape[1];
    }
    if ((rc = dpoc_path_join(path, sizeof path, dir, "model.safetensors", err))) goto out;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if ((rc = st_write_f32(tmp, m->n_tensors, names, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, err)))
        goto out;
    if (rename(tmp, path) != 0) {
        remove(tmp);
        rc = dpoc_errf(err, DPOC_EIO, "%s: rename failed: %s", path, strerror(errno));
        goto out;
    }
    if (src_dir) {
        char src[DPOC_ERR_MSG_MAX];
        char *text = NULL;
        size_t len = 0;
        if ((rc = dpoc_path_join(src, sizeof src, src_dir, "config.json", err))) goto out;
        if ((rc = dpoc_read_file(src, &text, &len, err))) goto out;
        if ((rc = dpoc_path_join(path, sizeof path, dir, "config.json", err)) == 0)
            rc = write_file_atomic(path, text, len, err);
        free(text);
    }
out:
    free(names);
    free(data);
    free(ndims);
    free(shapes);
    return rc;
}
