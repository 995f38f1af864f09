/* dpoc export: a checkpoint as a Hugging Face model directory.
 * For the tiny Qwen2 (untied, q/k/v biases) and Llama (tied embeddings) models,
 * trained 3 steps through the CLI:
 * - F32 export: every tensor equals the checkpoint's /model/<name> bit for bit, and
 *   the run's own model.safetensors;
 * - BF16 export: every value is the fp32 one rounded to nearest even, computed here
 *   from the IEEE definition (the nearer of the two neighbouring bfloat16 values,
 *   the even one on a tie); dpoc loads it back;
 * - config.json is the source's with only dtype changed; generation_config.json is copied;
 * - transformers (when a venv has it) loads the F32 export and gives the same
 *   log-probs as dpoc's forward on a fixed sequence, within 1e-4;
 * - the library call writes what the CLI writes; --model-dir, a source without a
 *   dtype key and its tokenizer files; bad input exits 2 naming the file. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <hdf5.h>

#include "dpoc/export.h"
#include "dpoc/model.h"
#include "dpoc/safetensors.h"
#include "dpoc/source.h"
#include "testutil.h"

#define TOL_LOGP_ABS 1e-4

static int setup(void **state) {
    (void)state;
    set_mpi_test_env();
    /* relative model paths in the configs are taken from the source tree, as the CLI runs are */
    if (chdir(DPOC_SOURCE_DIR) != 0) return -1;
    return 0;
}

/* dir/name in a heap string owned by a pool that each test's teardown empties */
#define MAX_PATHS 256
static struct {
    char *p[MAX_PATHS];
    size_t n;
} paths;

static char *path_in(const char *dir, const char *name) {
    if (paths.n == MAX_PATHS) fail_msg("too many paths in one test");
    size_t n = strlen(dir) + strlen(name) + 2;
    char *b = malloc(n);
    if (!b) fail_msg("out of memory");
    snprintf(b, n, "%s/%s", dir, name);
    return paths.p[paths.n++] = b;
}

static int free_paths(void **state) {
    (void)state;
    for (size_t i = 0; i < paths.n; i++) free(paths.p[i]);
    paths.n = 0;
    return 0;
}

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int sh(const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof cmd) fail_msg("command too long");
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}



static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    char *x = read_text_file(a, &na), *y = read_text_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return eq;
}

/* `dpoc export ARGS` from the source tree (or from `cwd`), output appended to log */
static int run_export(const char *cwd, const char *args, const char *log) {
    return sh("cd '%s' && '%s' export %s >> '%s' 2>&1", cwd ? cwd : DPOC_SOURCE_DIR, DPOC_BIN, args, log);
}

/* 3 steps of configs/<model>.json into out; the run's final checkpoint is out/checkpoint-3.h5 */
static void train3(const char *model, const char *out, const char *log) {
    int rc = sh("cd '%s' && '%s' train --config configs/%s.json --set output_dir=%s --set max_steps=3 >> '%s' 2>&1",
                DPOC_SOURCE_DIR, DPOC_BIN, model, out, log);
    expect_exit(rc, 0, "training", log);
}

/* ---- the checkpoint, read with the HDF5 C API ---- */

#define MAX_TENSORS 64
typedef struct {
    size_t n;
    char *names[MAX_TENSORS];
    float *data[MAX_TENSORS];
    size_t numel[MAX_TENSORS], ndim[MAX_TENSORS];
    size_t shape[MAX_TENSORS][2];
} ckpt_tensors;

static herr_t collect(hid_t g, const char *name, const H5L_info_t *info, void *op) {
    (void)info;
    ckpt_tensors *c = op;
    if (c->n == MAX_TENSORS) return -1;
    size_t i = c->n++;
    hid_t d = H5Dopen2(g, name, H5P_DEFAULT);
    hid_t sp = H5Dget_space(d);
    hsize_t dims[2] = {0, 0};
    int rank = H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    if (rank < 1 || rank > 2) return H5Dclose(d), -1;
    c->names[i] = strdup(name);
    c->ndim[i] = (size_t)rank;
    c->shape[i][0] = (size_t)dims[0];
    c->shape[i][1] = rank == 2 ? (size_t)dims[1] : 0;
    c->numel[i] = (size_t)dims[0] * (rank == 2 ? (size_t)dims[1] : 1);
    c->data[i] = malloc(c->numel[i] * sizeof(float));
    if (!c->names[i] || !c->data[i]) return H5Dclose(d), -1;
    herr_t r = H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, c->data[i]);
    H5Dclose(d);
    return r < 0 ? -1 : 0;
}

static void ckpt_load(const char *path, ckpt_tensors *c) {
    memset(c, 0, sizeof *c);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) fail_msg("cannot open %s", path);
    hid_t g = H5Gopen2(f, "model", H5P_DEFAULT);
    herr_t r = g < 0 ? -1 : H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, NULL, collect, c);
    if (g >= 0) H5Gclose(g);
    H5Fclose(f);
    if (r < 0 || c->n == 0) fail_msg("cannot read /model of %s", path);
}

static void ckpt_free(ckpt_tensors *c) {
    for (size_t i = 0; i < c->n; i++) {
        free(c->names[i]);
        free(c->data[i]);
    }
    c->n = 0;
}

static const st_tensor *find_checked(const st_model *st, const ckpt_tensors *c, size_t i, st_dtype dtype,
                                     const char *file) {
    const st_tensor *t = st_find(st, c->names[i]);
    if (!t) fail_msg("%s has no tensor %s", file, c->names[i]);
    if (t->dtype != dtype) fail_msg("%s: %s has dtype %s", file, c->names[i], t->dtype_str);
    if (t->ndim != c->ndim[i] || t->shape[0] != c->shape[i][0] || (t->ndim == 2 && t->shape[1] != c->shape[i][1]))
        fail_msg("%s: %s has another shape than in the checkpoint", file, c->names[i]);
    return t;
}

/* every tensor of file is the checkpoint's, bit for bit, and there are no others */
static void check_f32_file(const char *file, const ckpt_tensors *c) {
    st_model st;
    dpoc_err err;
    if (st_open_file(&st, file, &err)) fail_msg("%s", err.msg);
    assert_int_equal(st.n_tensors, c->n);
    for (size_t i = 0; i < c->n; i++) {
        const st_tensor *t = find_checked(&st, c, i, ST_F32, file);
        assert_int_equal(t->nbytes, c->numel[i] * sizeof(float));
        if (memcmp(t->data, c->data[i], t->nbytes) != 0) /* little-endian host, as the file */
            fail_msg("%s: %s differs from the checkpoint", file, c->names[i]);
    }
    st_close(&st);
}

/* ---- bfloat16 from the IEEE definition ---- */

/* the value of a non-negative bfloat16 bit pattern below infinity (1 sign, 8 exponent, 7 fraction bits) */
static double bf16_magnitude(unsigned h) {
    unsigned e = h >> 7, frac = h & 0x7f;
    if (e == 0) return ldexp((double)frac, -133); /* subnormal: frac/128 x 2^-126 */
    return ldexp(1.0 + (double)frac / 128.0, (int)e - 127);
}

/* round to nearest, ties to even: of the two bfloat16 values around |x| (the one
 * truncation gives and the next one up, 2^128 standing for infinity), the nearer,
 * or the one with an even last fraction bit when both are as near. torch turns
 * NaN into 0x7FC0. */
static uint16_t bf16_rne_reference(float x) {
    if (isnan(x)) return 0x7fc0;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    const unsigned sign = (u >> 16) & 0x8000u;
    const double a = fabs((double)x);
    const unsigned lo = (u & 0x7fffffffu) >> 16; /* truncation: the neighbour at or below |x| */
    if (isinf(x) || bf16_magnitude(lo) == a) return (uint16_t)(sign | lo);
    const unsigned hi = lo + 1;
    const double vlo = bf16_magnitude(lo), vhi = hi == 0x7f80 ? ldexp(1.0, 128) : bf16_magnitude(hi);
    const double dlo = a - vlo, dhi = vhi - a; /* exact: all three have <= 24 significant bits */
    const unsigned pick = dlo < dhi ? lo : dhi < dlo ? hi : (lo & 1u) ? hi : lo;
    return (uint16_t)(sign | pick);
}

static void test_bf16_reference_itself(void **state) {
    (void)state;
    /* hand-checked cases: exact, below/above half, ties to even both ways, overflow */
    assert_int_equal(bf16_rne_reference(1.0f), 0x3f80);
    assert_int_equal(bf16_rne_reference(-2.0f), 0xc000);
    assert_int_equal(bf16_rne_reference(1.0f + 0x1p-8f), 0x3f80);           /* tie, 0x3f80 even */
    assert_int_equal(bf16_rne_reference(1.0f + 0x1p-7f + 0x1p-8f), 0x3f82); /* tie, 0x3f81 odd: up */
    assert_int_equal(bf16_rne_reference(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
    assert_int_equal(bf16_rne_reference(1.0f + 0x1p-9f), 0x3f80);
    assert_int_equal(bf16_rne_reference(3.4028235e38f), 0x7f80); /* FLT_MAX rounds to infinity */
    assert_int_equal(bf16_rne_reference(-INFINITY), 0xff80);
    assert_int_equal(bf16_rne_reference(0x1p-133f), 0x0001); /* smallest bfloat16 subnormal */
    assert_int_equal(bf16_rne_reference(0x1p-134f), 0x0000); /* half of it: tie to even zero */
}

static void check_bf16_file(const char *file, const ckpt_tensors *c) {
    st_model st;
    dpoc_err err;
    if (st_open_file(&st, file, &err)) fail_msg("%s", err.msg);
    assert_int_equal(st.n_tensors, c->n);
    size_t changed = 0, total = 0;
    for (size_t i = 0; i < c->n; i++) {
        const st_tensor *t = find_checked(&st, c, i, ST_BF16, file);
        assert_int_equal(t->nbytes, c->numel[i] * 2);
        for (size_t k = 0; k < c->numel[i]; k++) {
            uint16_t got = (uint16_t)(t->data[2 * k] | t->data[2 * k + 1] << 8);
            uint16_t want = bf16_rne_reference(c->data[i][k]);
            if (got != want)
                fail_msg("%s: %s[%zu] = %.9g stored as 0x%04x, round to nearest even gives 0x%04x", file,
                         c->names[i], k, (double)c->data[i][k], got, want);
            uint32_t u;
            memcpy(&u, &c->data[i][k], 4);
            changed += (u & 0xffffu) != 0;
        }
        total += c->numel[i];
    }
    /* trained weights are not bfloat16 values already: the rounding was exercised */
    if (changed < total / 2) fail_msg("%s: only %zu of %zu values needed rounding", file, changed, total);
    st_close(&st);
}

/* ---- config.json ---- */

/* out's config.json is src's with only torch_dtype / dtype set to `dtype` */
static void check_config(const char *src_dir, const char *out_dir, const char *dtype, const char *added_key) {
    char *a = read_text_file(path_in(src_dir, "config.json"), NULL), *b = read_text_file(path_in(out_dir, "config.json"), NULL);
    if (!a || !b) fail_msg("cannot read config.json of %s or %s", src_dir, out_dir);
    cJSON *src = cJSON_Parse(a), *out = cJSON_Parse(b);
    free(a);
    free(b);
    if (!src || !out) fail_msg("config.json of %s or %s is not JSON", src_dir, out_dir);
    const cJSON *arch_src = cJSON_GetArrayItem(cJSON_GetObjectItem(src, "architectures"), 0);
    const cJSON *arch_out = cJSON_GetArrayItem(cJSON_GetObjectItem(out, "architectures"), 0);
    if (!cJSON_IsString(arch_out) || strcmp(arch_out->valuestring, arch_src->valuestring) != 0)
        fail_msg("%s/config.json: architectures is not %s", out_dir, arch_src->valuestring);
    size_t n_dtype = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, out) {
        if (!strcmp(it->string, "dtype") || !strcmp(it->string, "torch_dtype")) {
            if (!cJSON_IsString(it) || strcmp(it->valuestring, dtype) != 0)
                fail_msg("%s/config.json: %s is not \"%s\"", out_dir, it->string, dtype);
            n_dtype++;
            continue;
        }
        if (!cJSON_Compare(it, cJSON_GetObjectItemCaseSensitive(src, it->string), 1))
            fail_msg("%s/config.json: key %s differs from the source's", out_dir, it->string);
    }
    cJSON_ArrayForEach(it, src) {
        if (strcmp(it->string, "dtype") && strcmp(it->string, "torch_dtype") &&
            !cJSON_GetObjectItemCaseSensitive(out, it->string))
            fail_msg("%s/config.json: key %s was dropped", out_dir, it->string);
    }
    if (n_dtype == 0) fail_msg("%s/config.json: no dtype key", out_dir);
    if (added_key && !cJSON_GetObjectItemCaseSensitive(out, added_key))
        fail_msg("%s/config.json: %s was not added", out_dir, added_key);
    cJSON_Delete(src);
    cJSON_Delete(out);
}

static void no_temp_files(const char *dir) {
    if (sh("ls -A '%s' | grep -q '\\.tmp$'", dir) == 0) fail_msg("%s: temporary files left behind", dir);
}

/* ---- transformers ---- */

/* A Python with transformers and torch: $DPOC_FIXENV's, ~/.cache/dpoc/fixenv's or /tmp/fixenv's venv. */
static const char *find_transformers_python(void) {
    static char cand[3][1024];
    const char *env = getenv("DPOC_FIXENV"), *home = getenv("HOME");
    snprintf(cand[0], sizeof cand[0], "%s/bin/python", env && env[0] ? env : "/nonexistent");
    snprintf(cand[1], sizeof cand[1], "%s/.cache/dpoc/fixenv/bin/python", home ? home : "/nonexistent");
    snprintf(cand[2], sizeof cand[2], "/tmp/fixenv/bin/python");
    for (int i = 0; i < 3; i++)
        if (access(cand[i], X_OK) == 0 && sh("'%s' -c 'import torch, transformers' > /dev/null 2>&1", cand[i]) == 0)
            return cand[i];
    return NULL;
}

static const int32_t SEQ[] = {1, 17, 42, 99, 3, 250, 7, 128, 64, 5, 200, 31, 77, 2};
#define SEQ_T (sizeof SEQ / sizeof SEQ[0])

/* log p(SEQ[t+1] | SEQ[..t]) from dpoc's forward on the exported directory */
static void dpoc_logps(const char *dir, double *out) {
    dpoc_model m;
    dpoc_acts a;
    dpoc_err err;
    if (dpoc_source_load_model(&m, dir, &err)) fail_msg("dpoc cannot load the export: %s", err.msg);
    if (dpoc_acts_alloc(&a, &m.cfg, SEQ_T, &err)) fail_msg("%s", err.msg);
    dpoc_model_forward(&m, &a, SEQ, SEQ_T, 0, SEQ_T - 1);
    for (size_t r = 0; r + 1 < SEQ_T; r++) out[r] = a.logp[r];
    dpoc_acts_free(&a);
    dpoc_model_free(&m);
}

static void compare_with_transformers(const char *dir, const char *work) {
    const char *py = find_transformers_python();
    if (!py) {
        printf("test_export: skipped: transformers not installed (no $DPOC_FIXENV/bin/python, "
               "~/.cache/dpoc/fixenv/bin/python or /tmp/fixenv/bin/python with torch and transformers)\n");
        fflush(stdout);
        return;
    }
    char ids[512] = "";
    for (size_t i = 0; i < SEQ_T; i++)
        snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%d", i ? "," : "", (int)SEQ[i]);
    char *out = path_in(work, "hf_logps.json"), *log = path_in(work, "hf.log");
    int rc = sh("'%s' -c \"\n"
                "import json, sys, torch\n"
                "from transformers import AutoModelForCausalLM\n"
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).float().eval()\n"
                "ids = torch.tensor([[%s]])\n"
                "with torch.no_grad():\n"
                "    lp = torch.log_softmax(m(ids).logits[0].float(), -1)\n"
                "print(json.dumps(lp[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()))\n"
                "\" '%s' > '%s' 2> '%s'",
                py, ids, dir, out, log);
    expect_exit(rc, 0, "transformers on the export", log);
    char *text = read_text_file(out, NULL);
    cJSON *j = text ? cJSON_Parse(text) : NULL;
    free(text);
    if (!cJSON_IsArray(j) || (size_t)cJSON_GetArraySize(j) != SEQ_T - 1) fail_msg("transformers printed no log-probs");
    double mine[SEQ_T];
    dpoc_logps(dir, mine);
    double maxdiff = 0;
    for (size_t r = 0; r + 1 < SEQ_T; r++) {
        const double want = cJSON_GetArrayItem(j, (int)r)->valuedouble;
        assert_close(mine[r], want, 0, TOL_LOGP_ABS, "%s: log p(token %zu) dpoc vs transformers", dir, r + 1);
        if (fabs(mine[r] - want) > maxdiff) maxdiff = fabs(mine[r] - want);
    }
    cJSON_Delete(j);
    printf("test_export: %s: transformers and dpoc log-probs agree, max |diff| %.2g <= %g (%zu tokens, %s)\n", dir,
           maxdiff, TOL_LOGP_ABS, SEQ_T - 1, py);
    fflush(stdout);
}

/* ---- the end-to-end case per model ---- */

static void export_model(const char *model) {
    const char *base = make_temp_dir();
    char *run = path_in(base, "run"), *fp32 = path_in(base, "fp32"), *bf16 = path_in(base, "bf16");
    char *lib = path_in(base, "lib"), *log = path_in(base, "log");
    char *src = path_in(DPOC_SOURCE_DIR "/tests/fixtures", model);
    char *ckpt = path_in(run, "checkpoint-3.h5"), args[4096];
    train3(model, run, log);

    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s'", ckpt, fp32);
    expect_exit(run_export(NULL, args, log), 0, "export fp32", log);
    expect_log_has(log, "model.safetensors");
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s' --dtype bf16", ckpt, bf16);
    expect_exit(run_export(NULL, args, log), 0, "export bf16", log);

    ckpt_tensors c;
    ckpt_load(ckpt, &c);
    check_f32_file(path_in(fp32, "model.safetensors"), &c);
    check_f32_file(path_in(run, "model.safetensors"), &c); /* the run's own final weights */
    check_bf16_file(path_in(bf16, "model.safetensors"), &c);
    ckpt_free(&c);

    check_config(src, fp32, "float32", NULL);
    check_config(src, bf16, "bfloat16", NULL);
    for (int i = 0; i < 2; i++) {
        const char *d = i ? bf16 : fp32;
        if (!files_equal(path_in(src, "generation_config.json"), path_in(d, "generation_config.json")))
            fail_msg("%s: generation_config.json was not copied", d);
        no_temp_files(d);
    }

    /* dpoc reads its BF16 export back as the rounded weights */
    dpoc_model m32, m16;
    dpoc_err err;
    if (dpoc_source_load_model(&m32, fp32, &err) || dpoc_source_load_model(&m16, bf16, &err)) fail_msg("%s", err.msg);
    assert_int_equal(m32.numel, m16.numel);
    for (size_t i = 0; i < m32.numel; i++) {
        uint16_t h = bf16_rne_reference(m32.params[i]);
        if (m16.params[i] != st_bf16_to_f32(h)) fail_msg("%s: parameter %zu read back wrong", bf16, i);
    }
    dpoc_model_free(&m32);
    dpoc_model_free(&m16);

    /* the library call (relative model path from the current directory, the source
     * tree) writes the same files as the CLI */
    if (dpoc_export_checkpoint(ckpt, lib, 1, &err)) fail_msg("dpoc_export_checkpoint: %s", err.msg);
    const char *names[3] = {"model.safetensors", "config.json", "generation_config.json"};
    for (int i = 0; i < 3; i++)
        if (!files_equal(path_in(lib, names[i]), path_in(bf16, names[i])))
            fail_msg("library and CLI exports differ in %s", names[i]);

    compare_with_transformers(fp32, base);
}

static void test_export_qwen2(void **state) {
    (void)state;
    export_model("tiny-qwen2");
}

static void test_export_llama(void **state) {
    (void)state;
    export_model("tiny-llama");
}

/* --model-dir; a source config.json without a dtype key gets the one its transformers
 * version reads; tokenizer files are copied as they are */
static void test_model_dir_and_tokenizer_files(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *run = path_in(base, "run"), *moved = path_in(base, "moved"), *out = path_in(base, "out");
    char *log = path_in(base, "log"), *ckpt = path_in(run, "checkpoint-3.h5"), args[4096];
    train3("tiny-llama", run, log);
    /* the source model "moved": a copy whose config has no dtype, plus tokenizer files */
    if (sh("mkdir -p '%s' && grep -v '\"dtype\"' tests/fixtures/tiny-llama/config.json > '%s/config.json' && "
           "printf '{\"version\": \"1.0\", \"model\": {}}' > '%s/tokenizer.json' && "
           "printf '{{ messages }}' > '%s/chat_template.jinja' && printf 'a b\\n' > '%s/merges.txt'",
           moved, moved, moved, moved, moved) != 0)
        fail_msg("cannot prepare %s", moved);
    /* run from another directory: the relative model_name_or_path is not found, and the message says so */
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s'", ckpt, out);
    expect_exit(run_export(base, args, log), 2, "export from another directory", log);
    expect_log_has(log, "model_name_or_path 'tests/fixtures/tiny-llama'");
    expect_log_has(log, "--model-dir");
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s' --model-dir '%s'", ckpt, out, moved);
    expect_exit(run_export(base, args, log), 0, "export with --model-dir", log);
    check_config(moved, out, "float32", "dtype"); /* transformers_version 5.23.0: "dtype" */
    const char *copied[3] = {"tokenizer.json", "chat_template.jinja", "merges.txt"};
    for (int i = 0; i < 3; i++)
        if (!files_equal(path_in(moved, copied[i]), path_in(out, copied[i])))
            fail_msg("%s was not copied", copied[i]);
    struct stat st;
    assert_int_not_equal(stat(path_in(out, "generation_config.json"), &st), 0); /* the copy has none */
    no_temp_files(out);
    ckpt_tensors c;
    ckpt_load(ckpt, &c);
    check_f32_file(path_in(out, "model.safetensors"), &c);
    ckpt_free(&c);
    /* exporting into the source directory itself is refused */
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s' --model-dir '%s'", ckpt, moved, moved);
    expect_exit(run_export(NULL, args, log), 2, "export over the source", log);
    expect_log_has(log, "is the source model directory");
}

static void test_bad_input(void **state) {
    (void)state;
    const char *base = make_temp_dir();
    char *run = path_in(base, "run"), *out = path_in(base, "out"), *log = path_in(base, "log");
    char *ckpt = path_in(run, "checkpoint-3.h5"), *bad = path_in(base, "bad.h5"), args[4096];
    train3("tiny-qwen2", run, log);

    snprintf(args, sizeof args, "--checkpoint '%s/none.h5' --out '%s'", base, out);
    expect_exit(run_export(NULL, args, log), 2, "missing checkpoint", log);
    expect_log_has(log, "none.h5");

    /* a byte flipped in the last tensor data (the optimizer's moments are written last) */
    if (sh("cp '%s' '%s'", ckpt, bad) != 0) fail_msg("cp failed");
    struct stat st;
    if (stat(bad, &st) != 0) fail_msg("no %s", bad);
    FILE *f = fopen(bad, "r+b");
    fseek(f, st.st_size - 2000, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, st.st_size - 2000, SEEK_SET);
    fputc(ch ^ 0x5a, f);
    fclose(f);
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s'", bad, out);
    expect_exit(run_export(NULL, args, log), 2, "corrupted checkpoint", log);
    expect_log_has(log, "bad.h5");
    expect_log_has(log, "corrupted");
    assert_int_not_equal(stat(out, &st), 0); /* nothing written */

    /* a checkpoint of another model than the directory given */
    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s' --model-dir tests/fixtures/tiny-llama", ckpt, out);
    expect_exit(run_export(NULL, args, log), 2, "other model", log);
    expect_log_has(log, "tests/fixtures/tiny-llama/config.json");
    expect_log_has(log, "another model");

    snprintf(args, sizeof args, "--checkpoint '%s' --out '%s' --dtype fp16", ckpt, out);
    expect_exit(run_export(NULL, args, log), 2, "--dtype fp16", log);
    expect_log_has(log, "--dtype 'fp16'");
    snprintf(args, sizeof args, "--checkpoint '%s'", ckpt);
    expect_exit(run_export(NULL, args, log), 2, "no --out", log);
    expect_exit(run_export(NULL, "--checkpoint", log), 2, "no value", log);
    expect_exit(run_export(NULL, "--help", log), 0, "--help", log);
    expect_log_has(log, "usage: dpoc export");

    /* the library reports the same without a CLI */
    dpoc_err err;
    assert_int_equal(dpoc_export_checkpoint(bad, out, 0, &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "bad.h5"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_reference_itself),
        cmocka_unit_test_teardown(test_export_qwen2, free_paths),
        cmocka_unit_test_teardown(test_export_llama, free_paths),
        cmocka_unit_test_teardown(test_model_dir_and_tokenizer_files, free_paths),
        cmocka_unit_test_teardown(test_bad_input, free_paths),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
