#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *fixture_path(const char *rel) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", DPOC_FIXTURES, rel);
    return buf;
}

char *read_text_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    buf[n] = '\0';
    fclose(f);
    if (len) *len = (size_t)n;
    return buf;
}

cJSON *load_json_fixture(const char *rel) {
    const char *path = fixture_path(rel);
    char *text = read_text_file(path, NULL);
    if (!text) fail_msg("cannot read fixture %s", path);
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!j) fail_msg("fixture %s is not valid JSON", path);
    return j;
}

size_t json_doubles(const cJSON *arr, double **out) {
    size_t n = (size_t)cJSON_GetArraySize(arr);
    double *v = calloc(n ? n : 1, sizeof *v);
    size_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) v[i++] = it->valuedouble;
    *out = v;
    return n;
}

double rel_maxabs_err(const float *a, const float *b, size_t n, double floor) {
    double maxdiff = 0, maxref = floor;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > maxdiff || isnan(d)) maxdiff = isnan(d) ? INFINITY : d;
        if (fabs((double)b[i]) > maxref) maxref = fabs((double)b[i]);
    }
    return maxdiff / maxref;
}

void assert_close(double a, double b, double rtol, double atol, const char *fmt, ...) {
    if (fabs(a - b) <= rtol * fabs(b) + atol) return;
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fail_msg("%s: got %.9g, expected %.9g (diff %.3g, rtol %.1g, atol %.1g)", what, a, b, fabs(a - b),
             rtol, atol);
}

const char *make_temp_dir(void) {
    static char buf[64];
    strcpy(buf, "/tmp/dpoc-test-XXXXXX");
    if (!mkdtemp(buf)) fail_msg("mkdtemp failed");
    return buf;
}

void set_mpi_test_env(void) {
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
    setenv("OPENBLAS_NUM_THREADS", "1", 1);
}

/* the log's text in a static buffer, since fail_msg does not return */
static const char *shown_log(const char *log) {
    static char shown[16384];
    char *text = read_text_file(log, NULL);
    snprintf(shown, sizeof shown, "%s", text ? text : "(no log)");
    free(text);
    return shown;
}

void expect_exit(int rc, int want, const char *what, const char *log) {
    if (rc != want) fail_msg("%s exited %d (expected %d):\n%s", what, rc, want, shown_log(log));
}

void expect_log_has(const char *log, const char *needle) {
    char *text = read_text_file(log, NULL);
    int ok = text && strstr(text, needle);
    free(text);
    if (!ok) fail_msg("log does not mention '%s':\n%s", needle, shown_log(log));
}

static void root_relative(char *field) {
    char tmp[DPOC_PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s/%s", DPOC_SOURCE_DIR, field) >= (int)sizeof tmp) fail_msg("path too long");
    memcpy(field, tmp, sizeof tmp);
}

void load_shipped_config(dpoc_config *c, const char *model) {
    dpoc_config_defaults(c);
    dpoc_err err;
    char path[512];
    snprintf(path, sizeof path, "%s/configs/%s.json", DPOC_SOURCE_DIR, model);
    if (dpoc_config_load_file(c, path, &err)) fail_msg("%s", err.msg);
    root_relative(c->model_name_or_path);
    root_relative(c->ref_model_name_or_path);
    root_relative(c->train_file);
    snprintf(c->output_dir, sizeof c->output_dir, "%s", make_temp_dir());
}

void compare_log_history_with(const char *rel, const char *metrics_path, size_t steps, double loss_rtol,
                              double metric_rtol, double atol, const char *what) {
    cJSON *j = load_json_fixture(rel);
    const cJSON *hist = cJSON_GetObjectItem(j, "log_history");
    char *text = read_text_file(metrics_path, NULL);
    if (!text) fail_msg("no metrics file %s", metrics_path);
    size_t step = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save), step++) {
        cJSON *got = cJSON_Parse(line);
        if (!got) fail_msg("%s: line %zu is not JSON", metrics_path, step + 1);
        const cJSON *want = cJSON_GetArrayItem(hist, (int)step);
        if (!want) fail_msg("%s: more logged steps than TRL's", metrics_path);
        const cJSON *it;
        size_t compared = 0;
        cJSON_ArrayForEach(it, want) {
            if (!cJSON_IsNumber(it)) continue;
            const cJSON *g = cJSON_GetObjectItem(got, it->string);
            if (!g) {
                /* HF's own bookkeeping keys dpoc does not log */
                if (!strcmp(it->string, "total_flos") || !strncmp(it->string, "train_", 6)) continue;
                fail_msg("%s step %zu: metric '%s' is missing", what, step + 1, it->string);
            }
            const double tol = !strcmp(it->string, "loss") ? loss_rtol : metric_rtol;
            assert_close(g->valuedouble, it->valuedouble, tol, atol, "%s step %zu %s", what, step + 1, it->string);
            compared++;
        }
        assert_true(compared >= 15);
        cJSON_Delete(got);
    }
    assert_int_equal(step, steps);
    free(text);
    cJSON_Delete(j);
}
