/* Saving a model as a Hugging Face directory (safetensors + config.json). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "dpoc/model.h"
#include "dpoc/safetensors.h"
#include "dpoc/source.h"

int dpoc_model_write_safetensors(const dpoc_model *m, const char *path, int bf16, dpoc_err *err) {
    const char **names = dpoc_malloc(m->n_tensors * sizeof *names, "tensor names", err);
    const float **data = dpoc_malloc(m->n_tensors * sizeof *data, "tensor table", err);
    size_t *ndims = dpoc_malloc(m->n_tensors * sizeof *ndims, "tensor table", err);
    size_t(*shapes)[ST_MAX_DIMS] = dpoc_calloc(m->n_tensors, sizeof *shapes, "tensor table", err);
    int rc = DPOC_ENOMEM;
    if (names && data && ndims && shapes) {
        for (size_t i = 0; i < m->n_tensors; i++) {
            names[i] = m->info[i].name;
            data[i] = m->params + m->info[i].offset;
            ndims[i] = m->info[i].ndim;
            shapes[i][0] = m->info[i].shape[0];
            shapes[i][1] = m->info[i].shape[1];
        }
        const size_t(*cshapes)[ST_MAX_DIMS] = (const size_t(*)[ST_MAX_DIMS])shapes;
        rc = bf16 ? st_write_bf16(path, m->n_tensors, names, data, ndims, cshapes, err)
                  : st_write_f32(path, m->n_tensors, names, data, ndims, cshapes, err);
    }
    free(names);
    free(data);
    free(ndims);
    free(shapes);
    return rc;
}

int dpoc_model_save(const dpoc_model *m, const char *dir, const char *src_dir, dpoc_err *err) {
    char path[4200], tmp[4200];
    DPOC_TRY(dpoc_mkdirs(dir, err));
    if (snprintf(path, sizeof path, "%s/model.safetensors", dir) >= (int)sizeof path ||
        snprintf(tmp, sizeof tmp, "%s/.model.safetensors.tmp", dir) >= (int)sizeof tmp)
        return dpoc_errf(err, DPOC_EINPUT, "path too long: %s", dir);
    int rc = dpoc_model_write_safetensors(m, tmp, 0, err);
    if (!rc) rc = dpoc_commit_file(tmp, path, err);
    if (!rc && src_dir) {
        char *text = NULL;
        size_t len = 0;
        if (!(rc = dpoc_source_config_json(src_dir, &text, &len, err)))
            rc = dpoc_write_file_atomic(dir, "config.json", text, len, err);
        free(text);
    }
    if (!rc) rc = dpoc_fsync_path(dir, 1, err);
    return rc;
}
