/* HDF5 checkpoints (see checkpoint.h). */
#include "dpoc/checkpoint.h"
#include "dpoc/finite.h"
#include "dpoc/runtime.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hdf5.h>

#include "core/fileutil.h"
#include "dpoc/lora.h"
#include "dpoc/shard.h"

#ifndef DPOC_GIT_REVISION
#define DPOC_GIT_REVISION "unknown"
#endif

/* Elements per HDF5 chunk of a tensor: Fletcher32 checks each chunk on read. */
#define CKPT_CHUNK_ELEMS ((size_t)1 << 18)
#define CKPT_PREFIX "checkpoint-"
#define CKPT_SUFFIX ".h5"

/* ---- small HDF5 helpers; each returns < 0 on failure ---- */

static int attr_write(hid_t obj, const char *name, hid_t type, const void *v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t r = a >= 0 ? H5Awrite(a, type, v) : -1;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return r < 0 ? -1 : 0;
}
static int attr_i64(hid_t o, const char *n, long long v) { return attr_write(o, n, H5T_NATIVE_LLONG, &v); }
static int attr_u64(hid_t o, const char *n, uint64_t v) { return attr_write(o, n, H5T_NATIVE_UINT64, &v); }
static int attr_f64(hid_t o, const char *n, double v) { return attr_write(o, n, H5T_NATIVE_DOUBLE, &v); }
static int attr_str(hid_t o, const char *n, const char *v) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    int r = attr_write(o, n, t, &v);
    H5Tclose(t);
    return r;
}

static int attr_read(hid_t obj, const char *name, hid_t type, void *v) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    herr_t r = H5Aread(a, type, v);
    H5Aclose(a);
    return r < 0 ? -1 : 0;
}
/* variable-length string attribute into buf */
static int attr_read_str(hid_t obj, const char *name, char *buf, size_t n) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8); /* HDF5 does not convert between ASCII and UTF-8 strings */
    char *s = NULL;
    int r = attr_read(obj, name, t, &s);
    if (r == 0 && s) {
        snprintf(buf, n, "%s", s);
        H5free_memory(s);
    }
    H5Tclose(t);
    return r;
}

/* The dataset of one tensor, chunked in whole rows with Fletcher32; < 0 on failure. */
static hid_t create_tensor(hid_t g, const dpoc_param_info *p) {
    hsize_t dims[2] = {p->shape[0], p->shape[1]}, chunk[2] = {p->shape[0], p->shape[1]};
    const int rank = (int)p->ndim;
    size_t row = rank == 2 ? p->shape[1] : 1;
    size_t rows_per_chunk = CKPT_CHUNK_ELEMS / (row ? row : 1);
    if (rows_per_chunk == 0) rows_per_chunk = 1;
    if (chunk[0] > rows_per_chunk) chunk[0] = rows_per_chunk;
    if (chunk[0] == 0) chunk[0] = 1;
    hid_t sp = H5Screate_simple(rank, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, rank, chunk);
    H5Pset_fletcher32(dcpl);
    hid_t d = H5Dcreate2(g, p->name, H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(sp);
    return d;
}

static int write_tensor(hid_t g, const dpoc_param_info *p, const float *data) {
    hid_t d = create_tensor(g, p);
    herr_t r = d >= 0 ? H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) : -1;
    if (d >= 0) H5Dclose(d);
    return r < 0 ? -1 : 0;
}

/* Rows [r0, r0 + nr) of tensor p's dataset d from or to buf (rank-1 tensors: elements). */
static int tensor_rows_io(hid_t d, const dpoc_param_info *p, size_t r0, size_t nr, float *buf, int write) {
    hsize_t start[2] = {r0, 0}, count[2] = {nr, p->ndim == 2 ? p->shape[1] : 1};
    hid_t fs = H5Dget_space(d);
    hid_t ms = H5Screate_simple((int)p->ndim, count, NULL);
    herr_t r = fs >= 0 && ms >= 0 ? H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) : -1;
    if (r >= 0)
        r = write ? H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, buf)
                  : H5Dread(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, buf);
    if (ms >= 0) H5Sclose(ms);
    if (fs >= 0) H5Sclose(fs);
    return r < 0 ? -1 : 0;
}

/* Rows per piece of a sharded stream: whole rows of at most DPOC_SHARD_PIECE floats. */
static size_t piece_rows(const dpoc_param_info *p) {
    const size_t row = p->ndim == 2 ? p->shape[1] : 1;
    const size_t r = DPOC_SHARD_PIECE / (row ? row : 1);
    return r ? r : 1;
}

/* 1 when a dataset is stored as dpoc writes it: IEEE float32 LE, chunked with whole rows
 * no larger than the extent, Fletcher32 as the only filter, every element stored.
 * Checked before H5Dread: HDF5 1.10 reads past its buffers (or dereferences NULL)
 * when these fields of the metadata are corrupted. */
static int stored_as_written(hid_t d) {
    hid_t ty = H5Dget_type(d);
    int ok = ty >= 0 && H5Tequal(ty, H5T_IEEE_F32LE) > 0;
    if (ty >= 0) H5Tclose(ty);
    hid_t dcpl = ok ? H5Dget_create_plist(d) : -1;
    if (dcpl < 0) return 0;
    unsigned flags = 0, cd[4];
    size_t ncd = 4;
    char fname[32];
    ok = H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_nfilters(dcpl) == 1 &&
         H5Pget_filter2(dcpl, 0, &flags, &ncd, cd, sizeof fname, fname, NULL) == H5Z_FILTER_FLETCHER32;
    /* chunks as written: rank of the dataspace, whole rows, at most the extent */
    hsize_t cdims[2] = {0, 0}, dims[2] = {0, 0};
    hid_t sp = ok ? H5Dget_space(d) : -1;
    int rank = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    ok = ok && rank >= 1 && rank <= 2 && H5Sget_simple_extent_dims(sp, dims, NULL) == rank &&
         H5Pget_chunk(dcpl, 2, cdims) == rank && cdims[0] >= 1 && cdims[0] <= dims[0] &&
         (rank == 1 || cdims[1] == dims[1]);
    /* every element stored (no chunk left to the fill value): bounds the read by the file */
    ok = ok && H5Dget_storage_size(d) >= (hsize_t)dims[0] * (rank == 2 ? dims[1] : 1) * sizeof(float);
    if (sp >= 0) H5Sclose(sp);
    H5Pclose(dcpl);
    return ok;
}

/* Opens tensor p's dataset in g after checking it exists, has the model's shape
 * and is stored as dpoc writes it; *d < 0 on error. */
static int open_tensor(hid_t g, const dpoc_param_info *p, const char *path, const char *group, hid_t *d,
                       dpoc_err *err) {
    *d = -1;
    if (H5Lexists(g, p->name, H5P_DEFAULT) <= 0)
        return dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint has no tensor %s/%s (another model?)", path, group, p->name);
    hid_t ds = H5Dopen2(g, p->name, H5P_DEFAULT);
    if (ds < 0) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open %s/%s", path, group, p->name);
    hid_t sp = H5Dget_space(ds);
    hsize_t dims[2] = {0, 0};
    int rank = H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    int rc = 0;
    if (rank != (int)p->ndim || dims[0] != p->shape[0] || (rank == 2 && dims[1] != p->shape[1]))
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: %s/%s has another shape than the model's (another model?)", path, group,
                       p->name);
    else if (!stored_as_written(ds))
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: %s/%s is not stored as dpoc writes it (corrupted metadata)", path, group, p->name);
    if (rc) H5Dclose(ds);
    else *d = ds;
    return rc;
}

/* Reads a tensor, checking its shape; Fletcher32 fails the read on corruption. */
static int read_tensor(hid_t g, const dpoc_param_info *p, float *out, const char *path, const char *group,
                       dpoc_err *err) {
    hid_t d;
    DPOC_TRY(open_tensor(g, p, path, group, &d, err));
    int rc = 0;
    if (H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: %s/%s cannot be read (checksum mismatch: the file is corrupted)", path,
                       group, p->name);
    H5Dclose(d);
    return rc;
}

/* ---- durability ---- */

static int write_latest(const char *dir, const char *name, dpoc_err *err) {
    char line[300];
    int n = snprintf(line, sizeof line, "%s\n", name);
    DPOC_TRY(dpoc_write_file_atomic(dir, "latest", line, (size_t)n, err));
    return dpoc_fsync_path(dir, 1, err);
}

/* ---- listing ---- */

typedef struct {
    long step;
    char name[256];
} ckpt_entry;

static int cmp_desc(const void *a, const void *b) {
    long x = ((const ckpt_entry *)a)->step, y = ((const ckpt_entry *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* checkpoint-STEP.h5 files in dir, newest first. *out malloc'ed. */
static int list_ckpts(const char *dir, ckpt_entry **out, size_t *n, dpoc_err *err) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    size_t cap = 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        long step;
        char tail[8];
        if (sscanf(e->d_name, CKPT_PREFIX "%ld%7s", &step, tail) != 2 || strcmp(tail, CKPT_SUFFIX) != 0) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            ckpt_entry *p = realloc(*out, cap * sizeof *p);
            if (!p) {
                rc = dpoc_errf(err, DPOC_ENOMEM, "out of memory listing checkpoints");
                break;
            }
            *out = p;
        }
        (*out)[*n].step = step;
        snprintf((*out)[*n].name, sizeof(*out)[*n].name, "%s", e->d_name);
        (*n)++;
    }
    closedir(d);
    if (*n) qsort(*out, *n, sizeof **out, cmp_desc);
    return rc;
}

/* ---- content hash ---- */

/* The tensors a checkpoint holds of m: its trainable ones. */
static size_t trainable_tensors(const dpoc_model *m) {
    size_t n = 0;
    for (size_t i = 0; i < m->n_tensors; i++) n += m->info[i].trainable != 0;
    return n;
}


/* FNV-1a 64 over every tensor of model, exp_avg and exp_avg_sq, each group in
 * name order (the order HDF5's name index iterates, so verification needs no
 * model), then the two step counters. */
typedef struct {
    const char *name;
    size_t index;
} named_index;
static int cmp_names(const void *a, const void *b) {
    return strcmp(((const named_index *)a)->name, ((const named_index *)b)->name);
}

/* m's trainable tensors in name order; *out malloc'ed. */
static int sorted_trainable(const dpoc_model *m, named_index **out, size_t *n_out, dpoc_err *err) {
    named_index *idx = dpoc_malloc((m->n_tensors ? m->n_tensors : 1) * sizeof *idx, "tensor order", err);
    if (!idx) return DPOC_ENOMEM;
    size_t n = 0;
    for (size_t i = 0; i < m->n_tensors; i++)
        if (m->info[i].trainable) idx[n++] = (named_index){m->info[i].name, i};
    qsort(idx, n, sizeof *idx, cmp_names);
    *out = idx;
    *n_out = n;
    return 0;
}

static uint64_t hash_block(uint64_t h, const dpoc_model *m, const named_index *idx, size_t n, const float *block) {
    for (size_t k = 0; k < n; k++) {
        const dpoc_param_info *p = &m->info[idx[k].index];
        h = dpoc_fnv1a(h, block + p->offset, p->numel * sizeof(float));
    }
    return h;
}

static uint64_t hash_steps(uint64_t h, long long step, long long opt_step) {
    h = dpoc_fnv1a(h, &step, sizeof step);
    return dpoc_fnv1a(h, &opt_step, sizeof opt_step);
}

static int content_hash(const dpoc_model *m, const float *exp_avg, const float *exp_avg_sq, long long step,
                        long long opt_step, uint64_t *out, dpoc_err *err) {
    named_index *idx;
    size_t n;
    DPOC_TRY(sorted_trainable(m, &idx, &n, err));
    uint64_t h = hash_block(DPOC_FNV_OFFSET, m, idx, n, m->params);
    h = hash_block(h, m, idx, n, exp_avg);
    h = hash_block(h, m, idx, n, exp_avg_sq);
    *out = hash_steps(h, step, opt_step);
    free(idx);
    return 0;
}

/* ---- AdamW moments sharded over the ranks (ZeRO, dpoc/shard.h) ----
 *
 * The file is the same as without sharding: rank 0 writes every tensor whole.
 * Each tensor's moments travel to rank 0 in pieces of whole rows, in the order
 * the content hash reads them (name order), so rank 0 never holds more than a
 * piece of the moments it does not own. Every rank runs the same schedule of
 * gathers whatever happens to rank 0's file: an HDF5 failure there is reported
 * after the last gather, not as a hang. */

static int moments_sharded(const dpoc_trainer *t) { return t->zero_stage && t->dist && t->dist->world > 1; }

/* Staging floats for one piece of any trainable tensor. */
static size_t piece_capacity(const dpoc_model *m) {
    size_t cap = DPOC_SHARD_PIECE;
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        const size_t row = p->ndim == 2 ? p->shape[1] : 1;
        if (p->trainable && row > cap) cap = row;
    }
    return cap;
}

/* Collective. f: rank 0's file (ignored elsewhere); mine: this rank's slice of
 * the moments; h: the running content hash (rank 0). */
static int write_sharded_group(hid_t f, const char *name, const dpoc_trainer *t, const float *mine,
                               const named_index *idx, size_t n_idx, float *buf, uint64_t *h, int *bad,
                               dpoc_err *err) {
    const dpoc_model *m = &t->policy;
    const int root = dpoc_dist_is_root(t->dist);
    hid_t g = -1;
    if (root && !*bad) {
        hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
        H5Pset_create_intermediate_group(lcpl, 1);
        g = H5Gcreate2(f, name, lcpl, H5P_DEFAULT, H5P_DEFAULT);
        H5Pclose(lcpl);
        if (g < 0) *bad = 1;
    }
    dpoc_shard *sh = (dpoc_shard *)&t->shard;
    int rc = 0;
    for (size_t k = 0; k < n_idx && !rc; k++) {
        const dpoc_param_info *p = &m->info[idx[k].index];
        const size_t row = p->ndim == 2 ? p->shape[1] : 1, per = piece_rows(p);
        hid_t d = g >= 0 && !*bad ? create_tensor(g, p) : -1;
        if (g >= 0 && d < 0) *bad = 1;
        for (size_t r0 = 0; r0 < p->shape[0] && !rc; r0 += per) {
            const size_t nr = p->shape[0] - r0 < per ? p->shape[0] - r0 : per;
            rc = dpoc_shard_gather_to_root(sh, mine, p->offset + r0 * row, nr * row, root ? buf : NULL, err);
            if (rc || !root) continue;
            *h = dpoc_fnv1a(*h, buf, nr * row * sizeof(float));
            if (d >= 0 && tensor_rows_io(d, p, r0, nr, buf, 1) < 0) *bad = 1;
        }
        if (d >= 0) H5Dclose(d);
    }
    if (g >= 0) H5Gclose(g);
    return rc;
}

/* Every rank reads every piece of the group (so each checks the whole content
 * hash), keeping its own slice of it in mine. */
static int read_sharded_group(hid_t grp, const dpoc_trainer *t, float *mine, const named_index *idx, size_t n_idx,
                              float *buf, uint64_t *h, const char *path, const char *group, dpoc_err *err) {
    const dpoc_model *m = &t->policy;
    const size_t lo = t->opt.lo, hi = t->opt.hi;
    for (size_t k = 0; k < n_idx; k++) {
        const dpoc_param_info *p = &m->info[idx[k].index];
        hid_t d;
        DPOC_TRY(open_tensor(grp, p, path, group, &d, err));
        int rc = 0;
        const size_t row = p->ndim == 2 ? p->shape[1] : 1, per = piece_rows(p);
        for (size_t r0 = 0; r0 < p->shape[0] && !rc; r0 += per) {
            const size_t nr = p->shape[0] - r0 < per ? p->shape[0] - r0 : per;
            if (tensor_rows_io(d, p, r0, nr, buf, 0) < 0) {
                rc = dpoc_errf(err, DPOC_EINPUT, "%s: %s/%s cannot be read (checksum mismatch: the file is corrupted)",
                               path, group, p->name);
                break;
            }
            *h = dpoc_fnv1a(*h, buf, nr * row * sizeof(float));
            const size_t a = p->offset + r0 * row, b = a + nr * row;
            const size_t x = a > lo ? a : lo, y = b < hi ? b : hi;
            if (y > x) memcpy(mine + (x - lo), buf + (x - a), (y - x) * sizeof(float));
        }
        H5Dclose(d);
        if (rc) return rc;
    }
    return 0;
}

/* ---- save ---- */

static int write_group(hid_t f, const char *name, const dpoc_model *m, const float *block) {
    hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
    H5Pset_create_intermediate_group(lcpl, 1);
    hid_t g = H5Gcreate2(f, name, lcpl, H5P_DEFAULT, H5P_DEFAULT);
    H5Pclose(lcpl);
    if (g < 0) return -1;
    int r = 0;
    /* the trainable tensors: with LoRA the adapters (the frozen base is named by its fingerprint) */
    for (size_t i = 0; i < m->n_tensors && !r; i++)
        if (m->info[i].trainable) r = write_tensor(g, &m->info[i], block + m->info[i].offset);
    H5Gclose(g);
    return r;
}

static size_t global_batch(const dpoc_trainer *t) {
    return t->cfg.per_device_train_batch_size * t->cfg.gradient_accumulation_steps *
           (size_t)(t->dist ? t->dist->world : 1);
}

/* The moments' part of a sharded save on a rank other than 0: the same gathers. */
static int serve_sharded_save(const dpoc_trainer *t, dpoc_err *err) {
    named_index *idx;
    size_t n;
    DPOC_TRY(sorted_trainable(&t->policy, &idx, &n, err));
    uint64_t h = 0;
    int bad = 0;
    int rc = write_sharded_group(-1, "optimizer/exp_avg", t, t->opt.m, idx, n, NULL, &h, &bad, err);
    if (!rc) rc = write_sharded_group(-1, "optimizer/exp_avg_sq", t, t->opt.v, idx, n, NULL, &h, &bad, err);
    free(idx);
    return rc;
}

/* The weights and this rank's optimizer moments hold no NaN or Inf (a bad step
 * stops the job before its update; this makes sure none is ever saved). Sharded:
 * collective, every rank learns whether any rank's slice is bad. */
static int state_finite(const dpoc_trainer *t, int sharded, const char *name, dpoc_err *err) {
    const dpoc_model *m = &t->policy;
    const size_t lo = t->opt.lo, hi = t->opt.hi;
    int rc = dpoc_model_check_finite(m, m->params, 0, m->numel, "the weight", err);
    if (!rc) rc = dpoc_model_check_finite(m, t->opt.m, lo, hi, "the optimizer's exp_avg of", err);
    if (!rc) rc = dpoc_model_check_finite(m, t->opt.v, lo, hi, "the optimizer's exp_avg_sq of", err);
    if (sharded) {
        double any = rc != 0;
        DPOC_TRY(dpoc_dist_sum_doubles(t->dist, &any, 1, err));
        if (any > 0 && !rc) rc = dpoc_errf(err, DPOC_EINPUT, "another rank's optimizer state is not finite");
    }
    if (rc) dpoc_err_prefix(err, "%s/%s not written", t->cfg.output_dir, name);
    return rc;
}

int dpoc_ckpt_save(const dpoc_trainer *t, size_t save_total_limit, char *path_out, size_t path_n, dpoc_err *err) {
    const dpoc_config *cfg = &t->cfg;
    const int sharded = moments_sharded(t);
    {
        char name[128];
        snprintf(name, sizeof name, CKPT_PREFIX "%ld" CKPT_SUFFIX, t->global_step);
        DPOC_TRY(state_finite(t, sharded, name, err));
    }
    if (sharded && !dpoc_dist_is_root(t->dist)) return serve_sharded_save(t, err);
    char name[128], path[DPOC_PATH_MAX + 160], tmp[DPOC_PATH_MAX + 160];
    snprintf(name, sizeof name, CKPT_PREFIX "%ld" CKPT_SUFFIX, t->global_step);
    snprintf(path, sizeof path, "%s/%s", cfg->output_dir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", cfg->output_dir, name);
    /* sharded: from here on every failure is held until the other ranks are through their gathers */
    named_index *idx = NULL;
    size_t n_idx = 0;
    float *buf = NULL;
    int rc = 0;
    if (sharded) {
        rc = sorted_trainable(&t->policy, &idx, &n_idx, err);
        if (!rc) {
            buf = dpoc_malloc(piece_capacity(&t->policy) * sizeof(float), "checkpoint staging", err);
            if (!buf) rc = DPOC_ENOMEM;
        }
        if (rc) return rc; /* then the other ranks fail in their gathers too (MPI ends the job), as with any lost rank */
    }
    int rc_dir = dpoc_mkdirs(cfg->output_dir, err);
    if (rc_dir && !sharded) return rc_dir;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = rc_dir ? -1 : H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0 && !sharded) return dpoc_errf(err, DPOC_EIO, "%s: cannot create", tmp);
    int bad = f < 0;
    char *config_json = dpoc_config_to_json(cfg);
    const long long step = t->global_step, opt_step = t->opt.step;
    bad |= !config_json;
    if (f >= 0) {
        bad |= attr_i64(f, "format_version", DPOC_CKPT_FORMAT_VERSION);
        bad |= attr_str(f, "dpoc_version", DPOC_VERSION);
        bad |= attr_str(f, "git_revision", DPOC_GIT_REVISION);
        bad |= attr_str(f, "config", config_json ? config_json : "{}");
        char *machine = dpoc_runtime_json(); /* where these numbers were computed; not part of the content hash */
        bad |= !machine || attr_str(f, "machine", machine);
        free(machine);
        /* the products' precision, so that bf16 auto resumes with the same (bit-exact) */
        bad |= attr_str(f, "precision", dpoc_rt()->precision == DPOC_PRECISION_BF16 ? "bf16" : "fp32");
        bad |= attr_i64(f, "world_size", t->dist ? t->dist->world : 1);
        bad |= attr_i64(f, "zero_stage", t->zero_stage);
        bad |= attr_i64(f, "global_batch_size", (long long)global_batch(t));
        bad |= attr_i64(f, "global_step", step);
        bad |= attr_f64(f, "epoch", (double)step / (double)t->updates_per_epoch);
        bad |= attr_i64(f, "samples_seen", step * (long long)global_batch(t));
        bad |= attr_u64(f, "seed", cfg->seed);
        bad |= attr_i64(f, "optimizer_step", opt_step);
        bad |= attr_i64(f, "scheduler_total_steps", t->total_steps);
        bad |= attr_i64(f, "scheduler_warmup_steps", t->warmup_steps);
        bad |= attr_f64(f, "window_loss", t->win_loss);
        bad |= attr_i64(f, "window_micro_batches", (long long)t->win_micro_batches);
        bad |= attr_i64(f, "window_tokens", (long long)t->win_tokens);
        bad |= attr_i64(f, "total_tokens", (long long)t->total_tokens);
        bad |= attr_i64(f, "last_logged_step", t->last_logged_step);
        char key[64];
        for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++) {
            snprintf(key, sizeof key, "window_metric_%zu", i);
            bad |= attr_f64(f, key, t->win_metrics[i]);
        }
        bad |= attr_str(f, "model_name_or_path", cfg->model_name_or_path);
        bad |= attr_str(f, "ref_model_name_or_path", cfg->ref_model_name_or_path);
        bad |= attr_str(f, "train_file", cfg->train_file);
        bad |= attr_u64(f, "model_fingerprint", t->fp_policy);
        bad |= attr_u64(f, "ref_model_fingerprint", t->fp_ref);
        bad |= attr_u64(f, "data_fingerprint", t->fp_data);
        /* LoRA: /model holds the adapters; these give their rank and scale (the base is
         * model_name_or_path, checked by model_fingerprint) */
        if (dpoc_lora_attached(&t->policy)) {
            bad |= attr_i64(f, "lora_r", (long long)cfg->lora.r);
            bad |= attr_f64(f, "lora_alpha", cfg->lora.alpha);
            bad |= attr_i64(f, "lora_use_rslora", cfg->lora.use_rslora);
        }
    }
    free(config_json);
    uint64_t hash = 0;
    if (!sharded) {
        if (content_hash(&t->policy, t->opt.m, t->opt.v, step, opt_step, &hash, err)) bad = 1;
        bad |= attr_u64(f, "content_hash", hash);
    }
    if (f >= 0 && !bad) bad |= write_group(f, "model", &t->policy, t->policy.params);
    /* test-only: DPOC_TEST_PAUSE_IN_CHECKPOINT="STEP:SECONDS" pauses half-way through
     * that step's file so a test can kill the writer there */
    const char *pause_s = getenv("DPOC_TEST_PAUSE_IN_CHECKPOINT");
    long pause_step = -1;
    unsigned pause_secs = 0;
    if (f >= 0 && pause_s && sscanf(pause_s, "%ld:%u", &pause_step, &pause_secs) == 2 && pause_step == t->global_step) {
        H5Fflush(f, H5F_SCOPE_GLOBAL);
        fprintf(stderr, "dpoc: test hook: pausing inside the checkpoint write\n");
        fflush(stderr);
        sleep(pause_secs);
    }
    if (sharded) {
        uint64_t h = hash_block(DPOC_FNV_OFFSET, &t->policy, idx, n_idx, t->policy.params);
        rc = write_sharded_group(f, "optimizer/exp_avg", t, t->opt.m, idx, n_idx, buf, &h, &bad, err);
        if (!rc) rc = write_sharded_group(f, "optimizer/exp_avg_sq", t, t->opt.v, idx, n_idx, buf, &h, &bad, err);
        hash = hash_steps(h, step, opt_step);
        if (f >= 0 && !bad) bad |= attr_u64(f, "content_hash", hash);
        free(idx);
        free(buf);
    } else {
        bad |= write_group(f, "optimizer/exp_avg", &t->policy, t->opt.m);
        bad |= write_group(f, "optimizer/exp_avg_sq", &t->policy, t->opt.v);
    }
    if (f >= 0) bad |= H5Fclose(f) < 0;
    if (rc) {
        remove(tmp);
        return rc;
    }
    if (rc_dir) return rc_dir;
    if (f < 0) return dpoc_errf(err, DPOC_EIO, "%s: cannot create", tmp);
    if (bad) {
        remove(tmp);
        return dpoc_errf(err, DPOC_EIO, "%s: writing the checkpoint failed (disk full?); the previous checkpoints are "
                         "intact", path);
    }
    DPOC_TRY(dpoc_commit_file(tmp, path, err));
    DPOC_TRY(dpoc_fsync_path(cfg->output_dir, 1, err));
    DPOC_TRY(write_latest(cfg->output_dir, name, err));
    if (path_out) snprintf(path_out, path_n, "%s", path);
    /* only now that the new checkpoint is durable may old ones go */
    if (save_total_limit > 0) {
        ckpt_entry *list;
        size_t n;
        DPOC_TRY(list_ckpts(cfg->output_dir, &list, &n, err));
        for (size_t i = save_total_limit; i < n; i++) {
            if (list[i].step == t->global_step) continue;
            char old[DPOC_PATH_MAX + 300];
            snprintf(old, sizeof old, "%s/%s", cfg->output_dir, list[i].name);
            remove(old);
        }
        free(list);
    }
    return 0;
}

/* ---- verify / load ---- */

typedef struct {
    hid_t f;
    long long format, step, opt_step, world, gbs;
    uint64_t hash, seed, fp_model, fp_ref, fp_data;
} ckpt_header;

static int open_header(const char *path, ckpt_header *h, dpoc_err *err) {
    memset(h, 0, sizeof *h);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    h->f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (h->f < 0) return dpoc_errf(err, DPOC_EINPUT, "%s: not a readable HDF5 file (truncated or corrupted?)", path);
    if (attr_read(h->f, "format_version", H5T_NATIVE_LLONG, &h->format) < 0 ||
        attr_read(h->f, "global_step", H5T_NATIVE_LLONG, &h->step) < 0 ||
        attr_read(h->f, "optimizer_step", H5T_NATIVE_LLONG, &h->opt_step) < 0 ||
        attr_read(h->f, "world_size", H5T_NATIVE_LLONG, &h->world) < 0 ||
        attr_read(h->f, "global_batch_size", H5T_NATIVE_LLONG, &h->gbs) < 0 ||
        attr_read(h->f, "content_hash", H5T_NATIVE_UINT64, &h->hash) < 0 ||
        attr_read(h->f, "seed", H5T_NATIVE_UINT64, &h->seed) < 0 ||
        attr_read(h->f, "model_fingerprint", H5T_NATIVE_UINT64, &h->fp_model) < 0 ||
        attr_read(h->f, "ref_model_fingerprint", H5T_NATIVE_UINT64, &h->fp_ref) < 0 ||
        attr_read(h->f, "data_fingerprint", H5T_NATIVE_UINT64, &h->fp_data) < 0) {
        H5Fclose(h->f);
        return dpoc_errf(err, DPOC_EINPUT, "%s: not a dpoc checkpoint (attributes missing)", path);
    }
    if (h->format != DPOC_CKPT_FORMAT_VERSION) {
        H5Fclose(h->f);
        return dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint format %lld, this dpoc reads format %d", path, h->format,
                         DPOC_CKPT_FORMAT_VERSION);
    }
    return 0;
}

int dpoc_ckpt_precision(const char *path, int *bf16, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    char p[16] = "fp32"; /* checkpoints from before bf16 existed: fp32 */
    if (H5Aexists(h.f, "precision") > 0 && attr_read_str(h.f, "precision", p, sizeof p) < 0) p[0] = 0;
    H5Fclose(h.f);
    if (strcmp(p, "fp32") && strcmp(p, "bf16"))
        return dpoc_errf(err, DPOC_EINPUT, "%s: attribute 'precision' is neither fp32 nor bf16", path);
    *bf16 = !strcmp(p, "bf16");
    return 0;
}

int dpoc_ckpt_step(const char *path, long *step, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    *step = (long)h.step;
    H5Fclose(h.f);
    return 0;
}

/* Hashes every dataset of a group in name order of the model's tensors, whose
 * names and shapes are read from the file itself (verification needs no model). */
typedef struct {
    uint64_t h;
    int bad;
    float *buf;
    size_t cap;
} hash_walk;

static herr_t hash_visit(hid_t g, const char *name, const H5L_info_t *info, void *op) {
    (void)info;
    hash_walk *w = op;
    hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
    if (d < 0) return w->bad = 1, -1;
    if (!stored_as_written(d)) return H5Dclose(d), w->bad = 1, -1;
    hid_t sp = H5Dget_space(d);
    hssize_t n = H5Sget_simple_extent_npoints(sp);
    H5Sclose(sp);
    if (n < 0) return H5Dclose(d), w->bad = 1, -1;
    if ((size_t)n > w->cap) {
        float *p = realloc(w->buf, (size_t)n * sizeof(float));
        if (!p) return H5Dclose(d), w->bad = 1, -1;
        w->buf = p;
        w->cap = (size_t)n;
    }
    herr_t r = H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, w->buf);
    H5Dclose(d);
    if (r < 0) return w->bad = 1, -1;
    w->h = dpoc_fnv1a(w->h, w->buf, (size_t)n * sizeof(float));
    return 0;
}

static int hash_group(hid_t f, const char *name, hash_walk *w) {
    hid_t g = H5Gopen2(f, name, H5P_DEFAULT);
    if (g < 0) return -1;
    herr_t r = H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, NULL, hash_visit, w);
    H5Gclose(g);
    return r < 0 || w->bad ? -1 : 0;
}

int dpoc_ckpt_verify(const char *path, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    hash_walk w = {DPOC_FNV_OFFSET, 0, NULL, 0};
    const char *groups[3] = {"model", "optimizer/exp_avg", "optimizer/exp_avg_sq"};
    int rc = 0;
    for (int i = 0; i < 3 && !rc; i++)
        if (hash_group(h.f, groups[i], &w) < 0)
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: group '%s' cannot be read (checksum mismatch or truncation)", path,
                           groups[i]);
    free(w.buf);
    if (!rc) {
        uint64_t x = dpoc_fnv1a(w.h, &h.step, sizeof h.step);
        x = dpoc_fnv1a(x, &h.opt_step, sizeof h.opt_step);
        if (x != h.hash) rc = dpoc_errf(err, DPOC_EINPUT, "%s: content hash mismatch (the file is corrupted)", path);
    }
    H5Fclose(h.f);
    return rc;
}

int dpoc_ckpt_resolve(const char *output_dir, const char *resume, char *path, size_t n, dpoc_err *err) {
    path[0] = '\0';
    if (strcmp(resume, "auto") != 0) {
        DPOC_TRY(dpoc_ckpt_verify(resume, err));
        snprintf(path, n, "%s", resume);
        return 0;
    }
    char latest[DPOC_PATH_MAX + 32], name[256] = "";
    snprintf(latest, sizeof latest, "%s/latest", output_dir);
    FILE *f = fopen(latest, "r");
    if (f) {
        if (!fgets(name, sizeof name, f)) name[0] = '\0';
        fclose(f);
        name[strcspn(name, "\n")] = '\0';
    }
    ckpt_entry *list;
    size_t count;
    DPOC_TRY(list_ckpts(output_dir, &list, &count, err));
    int rc = 0, found = 0;
    /* the one `latest` names first, then every checkpoint newest first */
    for (size_t i = 0; i <= count && !found; i++) {
        const char *cand = i == 0 ? name : list[i - 1].name;
        if (!cand[0] || (i > 0 && !strcmp(cand, name))) continue;
        char p[DPOC_PATH_MAX + 300];
        snprintf(p, sizeof p, "%s/%s", output_dir, cand);
        dpoc_err e;
        if (dpoc_ckpt_verify(p, &e) == 0) {
            snprintf(path, n, "%s", p);
            found = 1;
        } else {
            fprintf(stderr, "dpoc: warning: skipping checkpoint %s: %s\n", p, e.msg);
        }
    }
    if (!found && count > 0)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: none of the %zu checkpoints verifies; move them away to start afresh",
                       output_dir, count);
    free(list);
    return rc;
}

int dpoc_ckpt_restore(dpoc_trainer *t, const char *path, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    int rc = 0;
    const dpoc_config *cfg = &t->cfg;
    char saved[512] = "";
    if (h.fp_model != t->fp_policy) {
        attr_read_str(h.f, "model_name_or_path", saved, sizeof saved);
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint of another starting model ('%s'; this run starts from '%s')",
                       path, saved, cfg->model_name_or_path);
    } else if (h.fp_ref != t->fp_ref) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint made with another reference model", path);
    } else if (h.fp_data != t->fp_data) {
        attr_read_str(h.f, "train_file", saved, sizeof saved);
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint made on other training data ('%s', after tokenization and "
                       "max_length filtering)", path, saved);
    } else if ((size_t)h.gbs != global_batch(t)) {
        rc = dpoc_errf(err, DPOC_EINPUT,
                       "%s: global batch size %lld in the checkpoint, %zu now (per_device_train_batch_size x "
                       "gradient_accumulation_steps x ranks must stay the same to continue the data order)",
                       path, h.gbs, global_batch(t));
    } else if (h.seed != cfg->seed) {
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: seed %llu in the checkpoint, %llu now", path,
                       (unsigned long long)h.seed, cfg->seed);
    }
    const char *groups[3] = {"model", "optimizer/exp_avg", "optimizer/exp_avg_sq"};
    float *blocks[3] = {t->policy.params, t->opt.m, t->opt.v};
    const int ckpt_lora = H5Aexists(h.f, "lora_r") > 0, run_lora = dpoc_lora_attached(&t->policy);
    if (!rc && ckpt_lora != run_lora)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint of a %s run; this run %s (use_peft differs)", path,
                       ckpt_lora ? "LoRA" : "full fine-tuning", run_lora ? "trains LoRA adapters" : "trains every weight");
    long long ck_r = 0;
    if (!rc && ckpt_lora && (attr_read(h.f, "lora_r", H5T_NATIVE_LLONG, &ck_r) < 0 || (size_t)ck_r != cfg->lora.r))
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint adapters of rank %lld; this run's lora_r is %zu", path, ck_r,
                       cfg->lora.r);
    /* ZeRO: this rank's moments are a slice; every piece is still read and hashed */
    const int sliced = t->opt.lo != 0 || t->opt.hi != t->policy.numel;
    named_index *idx = NULL;
    size_t n_idx = 0;
    float *buf = NULL;
    uint64_t stream_hash = DPOC_FNV_OFFSET;
    if (!rc && sliced) {
        rc = sorted_trainable(&t->policy, &idx, &n_idx, err);
        if (!rc && !(buf = dpoc_malloc(piece_capacity(&t->policy) * sizeof(float), "checkpoint staging", err)))
            rc = DPOC_ENOMEM;
    }
    for (int g = 0; g < 3 && !rc; g++) {
        hid_t grp = H5Gopen2(h.f, groups[g], H5P_DEFAULT);
        if (grp < 0) {
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: group '%s' is missing", path, groups[g]);
            break;
        }
        H5G_info_t gi;
        if (H5Gget_info(grp, &gi) < 0 || gi.nlinks != (hsize_t)trainable_tensors(&t->policy))
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: group '%s' holds %llu tensors, this run trains %zu (other lora_* keys?)",
                           path, groups[g], (unsigned long long)gi.nlinks, trainable_tensors(&t->policy));
        if (sliced && g > 0) {
            if (!rc) rc = read_sharded_group(grp, t, blocks[g], idx, n_idx, buf, &stream_hash, path, groups[g], err);
        } else {
            for (size_t i = 0; i < t->policy.n_tensors && !rc; i++)
                if (t->policy.info[i].trainable)
                    rc = read_tensor(grp, &t->policy.info[i], blocks[g] + t->policy.info[i].offset, path, groups[g],
                                     err);
        }
        if (!rc && sliced && g == 0) stream_hash = hash_block(stream_hash, &t->policy, idx, n_idx, t->policy.params);
        H5Gclose(grp);
    }
    free(buf);
    free(idx);
    long long v = 0;
    double d = 0;
    char key[64];
    if (!rc) {
        dpoc_trainer_weights_changed(t);
        t->global_step = (long)h.step;
        t->opt.step = (long)h.opt_step;
        int bad = attr_read(h.f, "window_loss", H5T_NATIVE_DOUBLE, &t->win_loss) < 0;
        bad |= attr_read(h.f, "window_micro_batches", H5T_NATIVE_LLONG, &v) < 0;
        t->win_micro_batches = (size_t)v;
        bad |= attr_read(h.f, "window_tokens", H5T_NATIVE_LLONG, &v) < 0;
        t->win_tokens = (size_t)v;
        bad |= attr_read(h.f, "total_tokens", H5T_NATIVE_LLONG, &v) < 0;
        t->total_tokens = (size_t)v;
        bad |= attr_read(h.f, "last_logged_step", H5T_NATIVE_LLONG, &v) < 0;
        t->last_logged_step = (long)v;
        for (size_t i = 0; i < DPOC_N_WINDOW_METRICS; i++) {
            snprintf(key, sizeof key, "window_metric_%zu", i);
            bad |= attr_read(h.f, key, H5T_NATIVE_DOUBLE, &d) < 0;
            t->win_metrics[i] = d;
        }
        if (bad) rc = dpoc_errf(err, DPOC_EINPUT, "%s: training-state attributes are missing", path);
    }
    uint64_t hash = 0;
    if (!rc && sliced) hash = hash_steps(stream_hash, h.step, h.opt_step);
    else if (!rc) rc = content_hash(&t->policy, t->opt.m, t->opt.v, h.step, h.opt_step, &hash, err);
    if (!rc && hash != h.hash) rc = dpoc_errf(err, DPOC_EINPUT, "%s: content hash mismatch (the file is corrupted)", path);
    H5Fclose(h.f);
    return rc;
}

static int group_has(void *ctx, const char *name) { return H5Lexists(*(hid_t *)ctx, name, H5P_DEFAULT) > 0; }

/* A LoRA checkpoint's adapters attached to m (the base), as the checkpoint's
 * attributes and tensors describe them; nothing for a full fine-tune's. */
static int attach_checkpoint_adapters(hid_t f, hid_t g, dpoc_model *m, const char *path, dpoc_err *err) {
    if (H5Aexists(f, "lora_r") <= 0 || dpoc_lora_attached(m)) return 0;
    long long r = 0, rs = 0;
    double alpha = 0;
    if (attr_read(f, "lora_r", H5T_NATIVE_LLONG, &r) < 0 || attr_read(f, "lora_alpha", H5T_NATIVE_DOUBLE, &alpha) < 0 ||
        attr_read(f, "lora_use_rslora", H5T_NATIVE_LLONG, &rs) < 0 || r < 1 || !(alpha > 0))
        return dpoc_errf(err, DPOC_EINPUT, "%s: the LoRA attributes (lora_r, lora_alpha, lora_use_rslora) are unreadable",
                         path);
    dpoc_lora_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.r = (size_t)r;
    cfg.alpha = alpha;
    cfg.use_rslora = rs != 0;
    int rc = dpoc_lora_attach_named(m, &cfg, group_has, &g, err);
    if (rc) dpoc_err_prefix(err, "%s", path);
    return rc;
}

int dpoc_ckpt_read_weights(const char *path, dpoc_model *m, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    int rc = 0;
    H5G_info_t info;
    hid_t g = H5Lexists(h.f, "model", H5P_DEFAULT) > 0 ? H5Gopen2(h.f, "model", H5P_DEFAULT) : -1;
    if (g < 0)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: group 'model' is missing", path);
    else if (H5Gget_info(g, &info) < 0)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: group 'model' cannot be read (corrupted?)", path);
    else rc = attach_checkpoint_adapters(h.f, g, m, path, err);
    if (!rc && info.nlinks != (hsize_t)trainable_tensors(m))
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: checkpoint has %llu model tensors, the model %zu (another model?)", path,
                       (unsigned long long)info.nlinks, trainable_tensors(m));
    for (size_t i = 0; i < m->n_tensors && !rc; i++)
        if (m->info[i].trainable) rc = read_tensor(g, &m->info[i], m->params + m->info[i].offset, path, "model", err);
    if (g >= 0) H5Gclose(g);
    H5Fclose(h.f);
    return rc;
}

int dpoc_ckpt_lora(const char *path, int *is_lora, dpoc_lora_cfg *cfg, dpoc_err *err) {
    ckpt_header h;
    DPOC_TRY(open_header(path, &h, err));
    *is_lora = H5Aexists(h.f, "lora_r") > 0;
    int rc = 0;
    if (*is_lora) {
        long long r = 0, rs = 0;
        double alpha = 0;
        if (attr_read(h.f, "lora_r", H5T_NATIVE_LLONG, &r) < 0 || attr_read(h.f, "lora_alpha", H5T_NATIVE_DOUBLE, &alpha) < 0 ||
            attr_read(h.f, "lora_use_rslora", H5T_NATIVE_LLONG, &rs) < 0 || r < 1 || !(alpha > 0))
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: the LoRA attributes (lora_r, lora_alpha, lora_use_rslora) are unreadable",
                           path);
        memset(cfg, 0, sizeof *cfg);
        cfg->use_peft = 1;
        cfg->r = (size_t)r;
        cfg->alpha = alpha;
        cfg->use_rslora = rs != 0;
    }
    H5Fclose(h.f);
    return rc;
}
