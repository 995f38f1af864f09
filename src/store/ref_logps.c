/* The precomputed reference log-prob file (dpoc/ref_logps.h). */
#include "dpoc/ref_logps.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <hdf5.h>

#include "core/fileutil.h"
#include "dpoc/config.h"

#define REF_LOGPS_FORMAT 1
#define REF_LOGPS_DATASET "ref_logps"

static void say(char *why, size_t n, const char *msg) {
    if (why && n) snprintf(why, n, "%s", msg);
}

static int read_attr_u64(hid_t f, const char *name, uint64_t *v) {
    if (H5Aexists(f, name) <= 0) return -1;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    if (a < 0) return -1;
    herr_t r = H5Aread(a, H5T_NATIVE_UINT64, v);
    H5Aclose(a);
    return r < 0 ? -1 : 0;
}

int dpoc_ref_logps_read(const char *path, uint64_t fingerprint, size_t n_pairs, double *out, int *found,
                        char *why, size_t why_n, dpoc_err *err) {
    (void)err;
    *found = 0;
    struct stat st;
    if (stat(path, &st) != 0) {
        say(why, why_n, "absent");
        return 0;
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        say(why, why_n, "not a readable HDF5 file");
        return 0;
    }
    uint64_t version = 0, fp = 0;
    hid_t d = -1, space = -1;
    if (read_attr_u64(f, "format_version", &version) || version != REF_LOGPS_FORMAT) {
        say(why, why_n, "another format version");
    } else if (read_attr_u64(f, "fingerprint", &fp) || fp != fingerprint) {
        say(why, why_n, "made with another reference model, data set or settings");
    } else if ((d = H5Dopen2(f, REF_LOGPS_DATASET, H5P_DEFAULT)) < 0 || (space = H5Dget_space(d)) < 0) {
        say(why, why_n, "no ref_logps dataset");
    } else {
        hsize_t dims[2] = {0, 0};
        if (H5Sget_simple_extent_ndims(space) != 2 || H5Sget_simple_extent_dims(space, dims, NULL) != 2 ||
            dims[0] != n_pairs || dims[1] != 2)
            say(why, why_n, "another number of pairs");
        else if (n_pairs && H5Dread(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
            say(why, why_n, "unreadable values");
        else
            *found = 1;
    }
    if (space >= 0) H5Sclose(space);
    if (d >= 0) H5Dclose(d);
    H5Fclose(f);
    return 0;
}

int dpoc_ref_logps_write(const char *path, uint64_t fingerprint, size_t n_pairs, const double *values,
                         dpoc_err *err) {
    char tmp[DPOC_PATH_MAX + 16];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return dpoc_errf(err, DPOC_EINPUT, "%s: path too long", path);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (f < 0) return dpoc_errf(err, DPOC_EIO, "%s: cannot create", tmp);
    int bad = 0;
    const hsize_t dims[2] = {n_pairs, 2}, one = 1;
    hid_t space = H5Screate_simple(2, dims, NULL);
    hid_t d = space >= 0 ? H5Dcreate2(f, REF_LOGPS_DATASET, H5T_IEEE_F64LE, space, H5P_DEFAULT, H5P_DEFAULT,
                                      H5P_DEFAULT)
                         : -1;
    bad |= d < 0 || (n_pairs && H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, values) < 0);
    const char *names[2] = {"format_version", "fingerprint"};
    const uint64_t vals[2] = {REF_LOGPS_FORMAT, fingerprint};
    for (int i = 0; i < 2 && !bad; i++) {
        hid_t as = H5Screate_simple(1, &one, NULL);
        hid_t a = as >= 0 ? H5Acreate2(f, names[i], H5T_STD_U64LE, as, H5P_DEFAULT, H5P_DEFAULT) : -1;
        bad |= a < 0 || H5Awrite(a, H5T_NATIVE_UINT64, &vals[i]) < 0;
        if (a >= 0) H5Aclose(a);
        if (as >= 0) H5Sclose(as);
    }
    if (d >= 0) H5Dclose(d);
    if (space >= 0) H5Sclose(space);
    bad |= H5Fclose(f) < 0;
    if (bad) {
        remove(tmp);
        return dpoc_errf(err, DPOC_EIO, "%s: writing the reference log-probs failed", tmp);
    }
    return dpoc_commit_file(tmp, path, err);
}
