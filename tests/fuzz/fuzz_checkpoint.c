/* libFuzzer target: opening a corrupted checkpoint (dpoc_ckpt_verify, dpoc_ckpt_step).
 *
 * Base file: a real checkpoint is over 2 MB even for tiny-qwen2, too big for a
 * corpus file, so LLVMFuzzerInitialize writes a small one (~150 KB) with dpoc's own
 * writer (dpoc_ckpt_save) from a model built in memory (dpoc_model_init: a 1-layer
 * Qwen2-shaped model, hidden size 8, vocabulary 16, weights and moments filled
 * with a fixed pattern) into a fresh /tmp directory, and keeps its bytes.
 *
 * Input: a list of patches applied to a copy of the base file, written to a temp
 * file that is then verified:
 *   byte 0           flags; bit 0: truncate the copy
 *   bytes 1..4       (bit 0 only) u32 LE truncation length, modulo the file size
 *   then 5 bytes     per patch: u32 LE position, xor byte
 * An empty input is the base file, which must verify.
 *
 * Where patches land: HDF5 1.10.8 (Debian 12) crashes inside its own code when
 * patches may land anywhere: within a minute, patching one byte of a dataset's
 * object header (file position 13789 of the base file, xor 0x35) gives a
 * heap-buffer-overflow READ in H5VM_memcpyvv under H5Dread (HDF5 copies 108576
 * bytes out of its 36-byte chunk buffer), and corrupted sizes in other metadata make
 * H5C_protect malloc ~2^56 bytes; LeakSanitizer also finds HDF5 leaking on its
 * error paths. Those are HDF5's parser bugs, not dpoc's, and would stop every run
 * at once; so by default a patch position indexes the raw data of the datasets
 * only (every chunk of every tensor, its Fletcher32 checksum included, located
 * with H5Dget_chunk_info) and the target tests dpoc's own integrity checks rather
 * than HDF5's parser: corrupted tensor data never verifies, a truncated file never
 * verifies, nothing crashes, every failure is DPOC_EINPUT with a message naming
 * the file, no HDF5 handle is left open, and the intact file verifies. DPOC_FUZZ_CKPT_WHOLE_FILE=1 lets positions index the whole file, to
 * fuzz HDF5's parsers through dpoc (then run with
 * ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 and expect HDF5's crashes).
 *
 * Build: cmake -DCMAKE_C_COMPILER=clang -DDPOC_FUZZ=ON -DDPOC_TESTS=OFF, target
 * fuzz_checkpoint; seeds in tests/fuzz/corpus/checkpoint/. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hdf5.h>

#include "dpoc/checkpoint.h"
#include "dpoc/config.h"
#include "dpoc/model.h"
#include "dpoc/trainer.h"

#define BASE_STEP 7
#define MAX_REGIONS 256

typedef struct {
    size_t begin, end; /* [begin, end) of the file */
} region;

/* libFuzzer gives no context pointer: the base file lives here for the process */
static struct {
    uint8_t *bytes;
    size_t size;
    region regions[MAX_REGIONS]; /* raw data of every chunk, in file order of discovery */
    size_t n_regions, data_bytes;
    int whole_file;
    char dir[64], path[128];
} g;

static void die(const char *what) {
    fprintf(stderr, "fuzz_checkpoint: setup failed: %s\n", what);
    abort();
}

/* the chunks of every dataset of group `name` */
static herr_t add_chunks(hid_t grp, const char *name, const H5L_info_t *info, void *op) {
    (void)info;
    (void)op;
    hid_t d = H5Dopen2(grp, name, H5P_DEFAULT);
    if (d < 0) return -1;
    hid_t sp = H5Dget_space(d); /* HDF5 1.10 takes no H5S_ALL here */
    hsize_t n = 0;
    herr_t r = sp < 0 ? -1 : H5Dget_num_chunks(d, sp, &n);
    for (hsize_t i = 0; r >= 0 && i < n; i++) {
        hsize_t coords[2];
        unsigned mask;
        haddr_t addr;
        hsize_t size;
        r = H5Dget_chunk_info(d, sp, i, coords, &mask, &addr, &size);
        if (r < 0 || g.n_regions == MAX_REGIONS || addr + size > g.size) {
            r = -1;
            break;
        }
        g.regions[g.n_regions++] = (region){(size_t)addr, (size_t)(addr + size)};
        g.data_bytes += (size_t)size;
    }
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(d);
    return r < 0 ? -1 : 0;
}

static void find_data_regions(const char *path) {
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) die("cannot reopen the base checkpoint");
    const char *groups[3] = {"model", "optimizer/exp_avg", "optimizer/exp_avg_sq"};
    for (int i = 0; i < 3; i++) {
        hid_t grp = H5Gopen2(f, groups[i], H5P_DEFAULT);
        if (grp < 0 || H5Literate(grp, H5_INDEX_NAME, H5_ITER_INC, NULL, add_chunks, NULL) < 0)
            die("cannot locate the chunks");
        H5Gclose(grp);
    }
    H5Fclose(f);
    if (g.n_regions == 0 || g.data_bytes == 0) die("no chunks");
}

static void make_base(void) {
    dpoc_model_config mc = {
        .arch = DPOC_ARCH_QWEN2, .vocab_size = 16, .hidden_size = 8, .intermediate_size = 16, .n_layers = 1,
        .n_heads = 2, .n_kv_heads = 1, .head_dim = 4, .max_position_embeddings = 32, .rms_norm_eps = 1e-6f,
        .rope_theta = 10000.0f, .tie_word_embeddings = 0, .qkv_bias = 1, .bos_token_id = 1, .eos_token_id = 2,
        .pad_token_id = 0,
    };
    dpoc_err err;
    dpoc_trainer *t = calloc(1, sizeof *t);
    if (!t) die("out of memory");
    dpoc_config_defaults(&t->cfg);
    if (dpoc_model_init(&t->policy, &mc, &err)) die(err.msg);
    const size_t n = t->policy.numel;
    t->opt.n = n;
    t->opt.m = calloc(n, sizeof(float));
    t->opt.v = calloc(n, sizeof(float));
    if (!t->opt.m || !t->opt.v) die("out of memory");
    for (size_t i = 0; i < n; i++) { /* any fixed, varied values */
        t->policy.params[i] = (float)((double)((i * 2654435761u) % 2001) / 1000.0 - 1.0);
        t->opt.m[i] = t->policy.params[i] * 1e-3f;
        t->opt.v[i] = t->policy.params[i] * t->policy.params[i] * 1e-6f;
    }
    snprintf(g.dir, sizeof g.dir, "/tmp/dpoc-fuzz-ckpt-XXXXXX");
    if (!mkdtemp(g.dir)) die("mkdtemp");
    snprintf(t->cfg.output_dir, sizeof t->cfg.output_dir, "%s", g.dir);
    snprintf(t->cfg.model_name_or_path, sizeof t->cfg.model_name_or_path, "fuzz/tiny-model");
    snprintf(t->cfg.train_file, sizeof t->cfg.train_file, "fuzz/pairs.jsonl");
    t->global_step = BASE_STEP;
    t->opt.step = BASE_STEP;
    t->updates_per_epoch = 4;
    t->total_steps = 10;
    t->warmup_steps = 1;
    char path[DPOC_PATH_MAX + 64];
    if (dpoc_ckpt_save(t, 0, path, sizeof path, &err)) die(err.msg);
    if (dpoc_ckpt_verify(path, &err)) die(err.msg);
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0) die("cannot read the base checkpoint");
    long len = ftell(f);
    rewind(f);
    g.bytes = len > 0 ? malloc((size_t)len) : NULL;
    if (!g.bytes || fread(g.bytes, 1, (size_t)len, f) != (size_t)len) die("cannot read the base checkpoint");
    fclose(f);
    g.size = (size_t)len;
    find_data_regions(path);
    remove(path);
    char latest[128];
    snprintf(latest, sizeof latest, "%s/latest", g.dir);
    remove(latest);
    snprintf(g.path, sizeof g.path, "%s/in.h5", g.dir);
    free(t->opt.m);
    free(t->opt.v);
    dpoc_model_free(&t->policy);
    free(t);
}

static void remove_base_dir(void) {
    remove(g.path);
    rmdir(g.dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *w = getenv("DPOC_FUZZ_CKPT_WHOLE_FILE");
    g.whole_file = w && w[0] == '1';
    make_base();
    atexit(remove_base_dir);
    fprintf(stderr, "fuzz_checkpoint: base checkpoint %zu bytes, %zu chunks with %zu bytes of raw data; patching %s\n",
            g.size, g.n_regions, g.data_bytes, g.whole_file ? "the whole file" : "raw data only");
    return 0;
}

/* the file position the i-th raw-data byte (modulo their count) is at */
static size_t data_position(uint32_t v) {
    size_t k = (size_t)v % g.data_bytes;
    for (size_t r = 0; r < g.n_regions; r++) {
        size_t len = g.regions[r].end - g.regions[r].begin;
        if (k < len) return g.regions[r].begin + k;
        k -= len;
    }
    abort(); /* unreachable: k < data_bytes */
}

static int in_data(size_t pos) {
    for (size_t r = 0; r < g.n_regions; r++)
        if (pos >= g.regions[r].begin && pos < g.regions[r].end) return 1;
    return 0;
}

static uint32_t load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void check_failure(int rc, const dpoc_err *err, const char *what) {
    if (rc != DPOC_EINPUT || err->code != rc || !strstr(err->msg, g.path)) {
        fprintf(stderr, "fuzz_checkpoint: %s returned %d with message '%s' (expected %d naming %s)\n", what, rc,
                err->msg, DPOC_EINPUT, g.path);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t size) {
    uint8_t *copy = malloc(g.size);
    if (!copy) return 0;
    memcpy(copy, g.bytes, g.size);
    size_t len = g.size, i = 0;
    if (size > 0) {
        const int truncate = buf[0] & 1;
        i = 1;
        if (truncate && size >= 5) {
            len = load_u32(buf + 1) % g.size;
            i = 5;
        }
    }
    for (; i + 5 <= size; i += 5) {
        uint32_t v = load_u32(buf + i);
        size_t pos = g.whole_file ? (size_t)v % g.size : data_position(v);
        copy[pos] ^= buf[i + 4];
    }
    /* what changed: only raw data bytes (then verification must fail), or metadata too */
    int changed_data = 0, changed_meta = 0;
    for (size_t k = 0; k < len; k++)
        if (copy[k] != g.bytes[k]) {
            if (in_data(k)) changed_data = 1;
            else changed_meta = 1;
        }
    FILE *f = fopen(g.path, "wb");
    if (!f) abort();
    if (len && fwrite(copy, 1, len, f) != len) abort();
    if (fclose(f) != 0) abort();
    free(copy);

    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_ckpt_verify(g.path, &err);
    if (rc) check_failure(rc, &err, "dpoc_ckpt_verify");
    if (!changed_meta && (changed_data || len < g.size) && rc == 0) {
        fprintf(stderr, "fuzz_checkpoint: a checkpoint with %s verified\n",
                len < g.size ? "truncated data" : "corrupted tensor data");
        abort();
    }
    if (!changed_meta && !changed_data && len == g.size && rc != 0) {
        fprintf(stderr, "fuzz_checkpoint: the intact checkpoint failed to verify: %s\n", err.msg);
        abort();
    }
    long step = -1;
    dpoc_err_clear(&err);
    int rs = dpoc_ckpt_step(g.path, &step, &err);
    if (rs) check_failure(rs, &err, "dpoc_ckpt_step");
    if (rc == 0 && rs != 0) {
        fprintf(stderr, "fuzz_checkpoint: verified, but dpoc_ckpt_step failed: %s\n", err.msg);
        abort();
    }
    if (rc == 0 && !changed_meta && step != BASE_STEP) abort();
    /* every path of dpoc's closes what it opened */
    ssize_t open_objects = H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL);
    if (open_objects != 0) {
        fprintf(stderr, "fuzz_checkpoint: %zd HDF5 objects left open\n", open_objects);
        abort();
    }
    H5garbage_collect(); /* HDF5's free lists would otherwise grow over millions of runs */
    return 0;
}
