/* metrics.jsonl and metrics.h5 (see metrics.h). */
#include "dpoc/metrics.h"
#include "dpoc/runtime.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <hdf5.h>

#include "core/fileutil.h"

/* rows per HDF5 chunk of a metric series */
#define METRIC_CHUNK_ROWS 1024
/* metrics.h5 group of the evaluation rows */
#define METRICS_EVAL_GROUP "eval"

static int jsonl_cut(const char *path, long keep_up_to_step, dpoc_err *err) {
    char *text = NULL;
    size_t len = 0;
    FILE *probe = fopen(path, "rb");
    if (!probe) return 0; /* nothing to cut */
    fclose(probe);
    DPOC_TRY(dpoc_read_file(path, &text, &len, err));
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        free(text);
        return dpoc_errf(err, DPOC_EINPUT, "path too long: %s", path);
    }
    FILE *out = fopen(tmp, "wb");
    int rc = 0;
    if (!out) {
        free(text);
        return dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", tmp, strerror(errno));
    }
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cJSON *o = cJSON_Parse(line);
        const cJSON *st = o ? cJSON_GetObjectItemCaseSensitive(o, "step") : NULL;
        int keep = st && cJSON_IsNumber(st) && st->valuedouble <= (double)keep_up_to_step;
        cJSON_Delete(o);
        if (keep && fprintf(out, "%s\n", line) < 0) rc = dpoc_errf(err, DPOC_EIO, "%s: write failed", tmp);
    }
    if (fclose(out) != 0 && !rc) rc = dpoc_errf(err, DPOC_EIO, "%s: write failed", tmp);
    if (!rc && rename(tmp, path) != 0) rc = dpoc_errf(err, DPOC_EIO, "%s: rename failed: %s", path, strerror(errno));
    if (rc) remove(tmp);
    free(text);
    return rc;
}

static int h5_set_string_attr(hid_t f, const char *name, const char *value, dpoc_err *err) {
    if (H5Aexists(f, name) > 0) H5Adelete(f, name);
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t w = a >= 0 ? H5Awrite(a, t, &value) : -1;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
    return w < 0 ? dpoc_errf(err, DPOC_EIO, "metrics.h5: cannot write the %s attribute", name) : 0;
}

/* Rows of the "step" series that are <= keep_up_to_step (steps increase). */
static size_t h5_rows_to_keep(hid_t f, long keep_up_to_step) {
    if (H5Lexists(f, "step", H5P_DEFAULT) <= 0) return 0;
    hid_t d = H5Dopen2(f, "step", H5P_DEFAULT);
    if (d < 0) return 0;
    hid_t sp = H5Dget_space(d);
    hsize_t n = 0;
    H5Sget_simple_extent_dims(sp, &n, NULL);
    size_t keep = 0;
    double *v = n ? malloc(n * sizeof *v) : NULL;
    if (v && H5Dread(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) >= 0)
        while (keep < n && v[keep] <= (double)keep_up_to_step) keep++;
    free(v);
    H5Sclose(sp);
    H5Dclose(d);
    return keep;
}

/* Every series is cut to `keep` rows. The names are the record's: the writer
 * always logs the same fields (the first record creates them). */
static int cut_series(hid_t f, hsize_t keep) {
    hid_t d = H5Dopen2(f, "step", H5P_DEFAULT);
    if (d < 0) return 0;
    H5Dclose(d);
    /* series names are stored in the root attribute "series" (newline-separated) */
    if (H5Aexists(f, "series") <= 0) return 0;
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8); /* HDF5 does not convert between ASCII and UTF-8 strings */
    hid_t a = H5Aopen(f, "series", H5P_DEFAULT);
    char *names = NULL;
    int rc = (a >= 0 && H5Aread(a, t, &names) >= 0) ? 0 : -1;
    if (a >= 0) H5Aclose(a);
    H5Tclose(t);
    if (rc || !names) return -1;
    char *save = NULL;
    for (char *n = strtok_r(names, "\n", &save); n && !rc; n = strtok_r(NULL, "\n", &save)) {
        hid_t ds = H5Dopen2(f, n, H5P_DEFAULT);
        if (ds < 0) continue;
        if (H5Dset_extent(ds, &keep) < 0) rc = -1;
        H5Dclose(ds);
    }
    H5free_memory(names);
    return rc;
}

static int h5_write_series_names(hid_t f, const dpoc_log_record *rec) {
    size_t len = 1;
    for (size_t i = 0; i < rec->n; i++) len += strlen(rec->names[i]) + 1;
    char *buf = malloc(len);
    if (!buf) return -1;
    buf[0] = '\0';
    for (size_t i = 0; i < rec->n; i++) {
        strcat(buf, rec->names[i]);
        strcat(buf, "\n");
    }
    if (H5Aexists(f, "series") > 0) H5Adelete(f, "series");
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "series", t, sp, H5P_DEFAULT, H5P_DEFAULT);
    const char *p = buf;
    int rc = (a >= 0 && H5Awrite(a, t, &p) >= 0) ? 0 : -1;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
    free(buf);
    return rc;
}

int dpoc_metrics_open(dpoc_metrics_writer *w, const char *output_dir, const char *config_json, long keep_up_to_step,
                      dpoc_err *err) {
    memset(w, 0, sizeof *w);
    w->h5 = -1;
    w->print = 1;
    snprintf(w->dir, sizeof w->dir, "%s", output_dir);
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", output_dir);
    if (keep_up_to_step >= 0) DPOC_TRY(jsonl_cut(path, keep_up_to_step, err));
    w->jsonl = fopen(path, keep_up_to_step >= 0 ? "a" : "w");
    if (!w->jsonl) return dpoc_errf(err, DPOC_EIO, "%s: cannot open: %s", path, strerror(errno));

    snprintf(path, sizeof path, "%s/metrics.h5", output_dir);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL); /* errors come back as statuses with our messages */
    hid_t f = -1;
    FILE *probe = keep_up_to_step >= 0 ? fopen(path, "rb") : NULL;
    if (probe) {
        fclose(probe);
        f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
        if (f >= 0) {
            hsize_t keep = h5_rows_to_keep(f, keep_up_to_step);
            hsize_t keep_eval = 0;
            int bad = cut_series(f, keep) < 0;
            if (!bad && H5Lexists(f, METRICS_EVAL_GROUP, H5P_DEFAULT) > 0) {
                hid_t g = H5Gopen2(f, METRICS_EVAL_GROUP, H5P_DEFAULT);
                keep_eval = g >= 0 ? h5_rows_to_keep(g, keep_up_to_step) : 0;
                bad = g < 0 || cut_series(g, keep_eval) < 0;
                if (g >= 0) H5Gclose(g);
            }
            if (bad) {
                H5Fclose(f);
                f = -1;
            } else {
                w->rows = (size_t)keep;
                w->eval_rows = (size_t)keep_eval;
            }
        }
        /* an unreadable metrics.h5 is started afresh: the JSONL keeps the history */
    }
    if (f < 0) {
        f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
        w->rows = 0;
    }
    if (f < 0) {
        dpoc_metrics_close(w);
        return dpoc_errf(err, DPOC_EIO, "%s: cannot create", path);
    }
    w->h5 = f;
    int rc = h5_set_string_attr(f, "config", config_json ? config_json : "{}", err);
    /* the machine this (re)start runs on: CPU, BLAS and kernel, threads, precision */
    char *machine = rc ? NULL : dpoc_runtime_json();
    if (!rc) rc = machine ? h5_set_string_attr(f, "machine", machine, err) : dpoc_errf(err, DPOC_ENOMEM, "metrics.h5: machine description");
    free(machine);
    if (rc) dpoc_metrics_close(w);
    return rc;
}

/* Appends value v at row `row` of the series `name`, creating it (and its group) when new. */
static int h5_append(hid_t f, const char *name, size_t row, double v, dpoc_err *err) {
    hid_t d;
    /* for "rewards/chosen" H5Lexists fails (< 0) until the group exists: then create both */
    if (H5Lexists(f, name, H5P_DEFAULT) > 0) {
        d = H5Dopen2(f, name, H5P_DEFAULT);
    } else {
        hsize_t dims = 0, maxdims = H5S_UNLIMITED, chunk = METRIC_CHUNK_ROWS;
        hid_t sp = H5Screate_simple(1, &dims, &maxdims);
        hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
        H5Pset_chunk(dcpl, 1, &chunk);
        hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
        H5Pset_create_intermediate_group(lcpl, 1);
        d = H5Dcreate2(f, name, H5T_IEEE_F64LE, sp, lcpl, dcpl, H5P_DEFAULT);
        H5Pclose(lcpl);
        H5Pclose(dcpl);
        H5Sclose(sp);
        /* a series that starts late (a metric added later) is padded with NaN */
        if (d >= 0 && row > 0) {
            hsize_t n = row;
            H5Dset_extent(d, &n);
            double nan = NAN;
            hid_t fs = H5Dget_space(d);
            for (hsize_t i = 0; i < n; i++) {
                hsize_t one = 1;
                H5Sselect_hyperslab(fs, H5S_SELECT_SET, &i, NULL, &one, NULL);
                hid_t ms = H5Screate_simple(1, &one, NULL);
                H5Dwrite(d, H5T_NATIVE_DOUBLE, ms, fs, H5P_DEFAULT, &nan);
                H5Sclose(ms);
            }
            H5Sclose(fs);
        }
    }
    if (d < 0) return dpoc_errf(err, DPOC_EIO, "metrics.h5: cannot open series '%s'", name);
    hsize_t n = row + 1, start = row, one = 1;
    herr_t r = H5Dset_extent(d, &n);
    hid_t fs = H5Dget_space(d);
    r = r < 0 ? r : H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &one, NULL);
    hid_t ms = H5Screate_simple(1, &one, NULL);
    r = r < 0 ? r : H5Dwrite(d, H5T_NATIVE_DOUBLE, ms, fs, H5P_DEFAULT, &v);
    H5Sclose(ms);
    H5Sclose(fs);
    H5Dclose(d);
    return r < 0 ? dpoc_errf(err, DPOC_EIO, "metrics.h5: cannot append to '%s'", name) : 0;
}

/* One JSON object per row, flushed. */
static int write_jsonl(dpoc_metrics_writer *w, const dpoc_log_record *rec, dpoc_err *err) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return dpoc_errf(err, DPOC_ENOMEM, "out of memory logging metrics");
    for (size_t i = 0; i < rec->n; i++) cJSON_AddNumberToObject(o, rec->names[i], rec->values[i]);
    char *line = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!line) return dpoc_errf(err, DPOC_ENOMEM, "out of memory logging metrics");
    int rc = 0;
    if (fprintf(w->jsonl, "%s\n", line) < 0 || fflush(w->jsonl) != 0)
        rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.jsonl: write failed: %s", w->dir, strerror(errno));
    free(line);
    return rc;
}

static int write_eval_row(dpoc_metrics_writer *w, const dpoc_log_record *rec, dpoc_err *err);

/* An evaluation row (eval_loss first): metrics.h5 keeps it in the group "eval",
 * each series named without the prefix ("eval_rewards/chosen" is eval/rewards/chosen),
 * with its own rows and its own step and epoch. */
static int is_eval_record(const dpoc_log_record *rec) { return rec->n > 0 && !strncmp(rec->names[0], "eval_", 5); }

static const char *eval_series_name(const char *name) { return strncmp(name, "eval_", 5) ? name : name + 5; }

static int write_eval_h5(dpoc_metrics_writer *w, const dpoc_log_record *rec, dpoc_err *err) {
    hid_t f = (hid_t)w->h5;
    hid_t g = H5Lexists(f, METRICS_EVAL_GROUP, H5P_DEFAULT) > 0 ? H5Gopen2(f, METRICS_EVAL_GROUP, H5P_DEFAULT)
                                                              : H5Gcreate2(f, METRICS_EVAL_GROUP, H5P_DEFAULT,
                                                                           H5P_DEFAULT, H5P_DEFAULT);
    if (g < 0) return dpoc_errf(err, DPOC_EIO, "%s/metrics.h5: cannot open the group '%s'", w->dir, METRICS_EVAL_GROUP);
    dpoc_log_record named = *rec;
    for (size_t i = 0; i < rec->n; i++) named.names[i] = eval_series_name(rec->names[i]);
    int rc = 0;
    if (w->eval_rows == 0 && h5_write_series_names(g, &named) < 0)
        rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.h5: cannot write the eval series list", w->dir);
    for (size_t i = 0; !rc && i < named.n; i++) rc = h5_append(g, named.names[i], w->eval_rows, named.values[i], err);
    H5Gclose(g);
    if (!rc) w->eval_rows++;
    return rc;
}

int dpoc_metrics_write(void *writer, const dpoc_log_record *rec, dpoc_err *err) {
    dpoc_metrics_writer *w = writer;
    if (is_eval_record(rec)) return write_eval_row(w, rec, err);
    int rc = write_jsonl(w, rec, err);
    if (!rc && w->rows == 0 && h5_write_series_names((hid_t)w->h5, rec) < 0)
        rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.h5: cannot write the series list", w->dir);
    for (size_t i = 0; !rc && i < rec->n; i++) rc = h5_append((hid_t)w->h5, rec->names[i], w->rows, rec->values[i], err);
    if (!rc && H5Fflush((hid_t)w->h5, H5F_SCOPE_GLOBAL) < 0)
        rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.h5: flush failed", w->dir);
    if (!rc) w->rows++;
    if (!rc && w->print) {
        double v[8] = {0};
        const char *want[8] = {"step", "loss", "rewards/margins", "rewards/accuracies", "grad_norm",
                               "learning_rate", "epoch", "tokens_per_second"};
        for (size_t k = 0; k < 8; k++)
            for (size_t i = 0; i < rec->n; i++)
                if (!strcmp(rec->names[i], want[k])) v[k] = rec->values[i];
        printf("step %.0f/%ld  loss %.4f  rewards/margins %.4f  rewards/accuracies %.3f  grad_norm %.4f  lr %.3g  "
               "epoch %.2f  %.0f tok/s\n",
               v[0], w->total_steps, v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
        fflush(stdout);
    }
    return rc;
}

static int write_eval_row(dpoc_metrics_writer *w, const dpoc_log_record *rec, dpoc_err *err) {
    int rc = write_jsonl(w, rec, err);
    if (!rc) rc = write_eval_h5(w, rec, err);
    if (!rc && H5Fflush((hid_t)w->h5, H5F_SCOPE_GLOBAL) < 0)
        rc = dpoc_errf(err, DPOC_EIO, "%s/metrics.h5: flush failed", w->dir);
    if (!rc && w->print) {
        double v[5] = {0};
        const char *want[5] = {"step", "eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_runtime"};
        for (size_t k = 0; k < 5; k++)
            for (size_t i = 0; i < rec->n; i++)
                if (!strcmp(rec->names[i], want[k])) v[k] = rec->values[i];
        printf("eval at step %.0f  eval_loss %.4f  eval_rewards/margins %.4f  eval_rewards/accuracies %.3f  (%.2f s)\n",
               v[0], v[1], v[2], v[3], v[4]);
        fflush(stdout);
    }
    return rc;
}

void dpoc_metrics_close(dpoc_metrics_writer *w) {
    if (w->jsonl) fclose(w->jsonl);
    if (w->h5 >= 0) H5Fclose((hid_t)w->h5);
    w->jsonl = NULL;
    w->h5 = -1;
}
