/* TensorBoard event files: CRC-32C against published vectors, TFRecord framing
 * against bytes TensorBoard's own masked_crc32c gives, HF's tag rewriting, the
 * writer's file read back record by record, the resume cut, and damaged input
 * (no crash, a damaged tail dropped). tests/scripts/test_tensorboard.sh reads real
 * runs with TensorBoard's reader. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dpoc/tensorboard.h"
#include "tb_event.pb-c.h"
#include "testutil.h"

/* bitwise CRC-32C (reflected 0x82F63B78), the definition, for the long-buffer check */
static uint32_t crc32c_ref(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

static void test_crc32c_vectors(void **state) {
    (void)state;
    /* the check value of the CRC catalogue, and RFC 3720 (iSCSI) B.4 */
    assert_int_equal(dpoc_tb_crc32c("123456789", 9), 0xE3069283u);
    assert_int_equal(dpoc_tb_crc32c("", 0), 0u);
    uint8_t b[32];
    memset(b, 0, sizeof b);
    assert_int_equal(dpoc_tb_crc32c(b, 32), 0x8A9136AAu);
    memset(b, 0xFF, sizeof b);
    assert_int_equal(dpoc_tb_crc32c(b, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++) b[i] = (uint8_t)i;
    assert_int_equal(dpoc_tb_crc32c(b, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++) b[i] = (uint8_t)(31 - i);
    assert_int_equal(dpoc_tb_crc32c(b, 32), 0x113FDB5Cu);
    /* masked as TFRecord masks it (values from tensorboard's masked_crc32c) */
    assert_int_equal(dpoc_tb_masked_crc(dpoc_tb_crc32c("123456789", 9)), 0xC78AB0E5u);
    assert_int_equal(dpoc_tb_masked_crc(0), 0xA282EAD8u);
    /* every length and alignment up to 300, and a long buffer, against the definition */
    rng_t r = {7};
    const size_t big = 1 << 20;
    uint8_t *buf = malloc(big + 8);
    assert_non_null(buf);
    for (size_t i = 0; i < big + 8; i++) buf[i] = (uint8_t)rng_next(&r);
    for (size_t off = 0; off < 8; off++)
        for (size_t n = 0; n <= 300; n++) assert_int_equal(dpoc_tb_crc32c(buf + off, n), crc32c_ref(buf + off, n));
    assert_int_equal(dpoc_tb_crc32c(buf, big), crc32c_ref(buf, big));
    free(buf);
}

static void test_record_framing(void **state) {
    (void)state;
    uint8_t h[DPOC_TB_RECORD_HEADER], f[DPOC_TB_RECORD_FOOTER];
    dpoc_tb_record_frame("hello", 5, h, f);
    /* struct.pack("<Q", 5) + masked_crc32c of it, and masked_crc32c(b"hello") */
    const uint8_t want_h[12] = {0x05, 0, 0, 0, 0, 0, 0, 0, 0xea, 0xb2, 0x04, 0x3e};
    const uint8_t want_f[4] = {0xbb, 0x1f, 0x1c, 0x19};
    assert_memory_equal(h, want_h, 12);
    assert_memory_equal(f, want_f, 4);

    uint8_t rec[12 + 5 + 4];
    memcpy(rec, h, 12);
    memcpy(rec + 12, "hello", 5);
    memcpy(rec + 17, f, 4);
    const uint8_t *data;
    size_t n, used;
    dpoc_err err;
    assert_int_equal(dpoc_tb_record_read(rec, sizeof rec, &data, &n, &used, &err), 0);
    assert_int_equal(n, 5);
    assert_int_equal(used, sizeof rec);
    assert_memory_equal(data, "hello", 5);
    /* every shorter prefix is "cut short", never a read past the end */
    for (size_t len = 0; len < sizeof rec; len++) {
        assert_int_equal(dpoc_tb_record_read(rec, len, &data, &n, &used, &err), DPOC_EINPUT);
        assert_non_null(strstr(err.msg, "cut short"));
    }
    /* a flipped bit anywhere is caught by one of the two CRCs */
    for (size_t i = 0; i < sizeof rec; i++) {
        rec[i] ^= 0x10;
        assert_int_equal(dpoc_tb_record_read(rec, sizeof rec, &data, &n, &used, &err), DPOC_EINPUT);
        rec[i] ^= 0x10;
    }
    rec[14] ^= 1;
    dpoc_tb_record_read(rec, sizeof rec, &data, &n, &used, &err);
    assert_non_null(strstr(err.msg, "data fails its CRC"));
    /* a length field announcing more than 2^63 bytes: refused, no overflow */
    uint8_t huge[32] = {0};
    memset(huge, 0xFF, 8);
    uint32_t mc = dpoc_tb_masked_crc(dpoc_tb_crc32c(huge, 8));
    for (int i = 0; i < 4; i++) huge[8 + i] = (uint8_t)(mc >> (8 * i));
    assert_int_equal(dpoc_tb_record_read(huge, sizeof huge, &data, &n, &used, &err), DPOC_EINPUT);
}

static void test_tags_as_hf_rewrite_logs(void **state) {
    (void)state;
    char t[64];
    const char *cases[][2] = {{"loss", "train/loss"},
                              {"rewards/margins", "train/rewards/margins"},
                              {"learning_rate", "train/learning_rate"},
                              {"eval_loss", "eval/loss"},
                              {"eval_rewards/chosen", "eval/rewards/chosen"},
                              {"test_accuracy", "test/accuracy"},
                              {"evaluation", "train/evaluation"},
                              {"train_runtime", "train/train_runtime"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dpoc_tb_tag(cases[i][0], t, sizeof t);
        assert_string_equal(t, cases[i][1]);
    }
    dpoc_tb_tag("a_very_long_metric_name", t, 8); /* truncated, terminated */
    assert_string_equal(t, "train/a");
}

/* ---- reading files back ---- */

typedef struct {
    size_t n;
    Tensorboard__Event *ev[64];
    size_t damaged; /* bytes after the last readable record */
} events;

static void read_events(const char *path, events *out) {
    memset(out, 0, sizeof *out);
    size_t len = 0;
    char *text = read_text_file(path, &len);
    assert_non_null(text);
    size_t off = 0;
    while (off < len && out->n < 64) {
        const uint8_t *data;
        size_t n, used;
        dpoc_err err;
        if (dpoc_tb_record_read((const uint8_t *)text + off, len - off, &data, &n, &used, &err)) break;
        Tensorboard__Event *e = tensorboard__event__unpack(NULL, n, data);
        if (!e) break;
        out->ev[out->n++] = e;
        off += used;
    }
    out->damaged = len - off;
    free(text);
}

static void free_events(events *e) {
    for (size_t i = 0; i < e->n; i++) tensorboard__event__free_unpacked(e->ev[i], NULL);
    e->n = 0;
}

/* the event files of dir, sorted (TensorBoard's order) */
static size_t list_events(const char *dir, char names[][512], size_t max) {
    size_t n = 0;
    DIR *d = opendir(dir);
    assert_non_null(d);
    const struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, "tfevents") && n < max) snprintf(names[n++], 512, "%s/%s", dir, e->d_name);
    closedir(d);
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char tmp[512];
            strcpy(tmp, names[j]);
            strcpy(names[j], names[j - 1]);
            strcpy(names[j - 1], tmp);
        }
    return n;
}

static void log_row(dpoc_tb_writer *w, double step, double loss) {
    dpoc_log_record r = {0};
    r.names[r.n] = "step";
    r.values[r.n++] = step;
    r.names[r.n] = "loss";
    r.values[r.n++] = loss;
    r.names[r.n] = "eval_loss";
    r.values[r.n++] = loss / 2;
    r.names[r.n] = "grad_norm";
    r.values[r.n++] = 0.0; /* a zero scalar must still be a scalar (oneof) */
    dpoc_err err;
    assert_int_equal(dpoc_tb_write_log(w, &r, &err), 0);
}

static const Tensorboard__Summary__Value *find_tag(const Tensorboard__Event *e, const char *tag) {
    if (e->what_case != TENSORBOARD__EVENT__WHAT_SUMMARY) return NULL;
    for (size_t i = 0; i < e->summary->n_value; i++)
        if (!strcmp(e->summary->value[i]->tag, tag)) return e->summary->value[i];
    return NULL;
}

static void test_writer_file(void **state) {
    (void)state;
    const char *tmp = make_temp_dir();
    char dir[600];
    snprintf(dir, sizeof dir, "%s/runs/x", tmp);
    dpoc_tb_writer w;
    dpoc_err err;
    assert_int_equal(dpoc_tb_open(&w, dir, -1, "{\"beta\": 0.1}", NULL, &err), 0);
    log_row(&w, 1, 0.5);
    log_row(&w, 2, 0.25);
    dpoc_tb_close(&w);

    /* events.out.tfevents.<10 digits>.<host>.<pid>.0 */
    char host[256];
    gethostname(host, sizeof host);
    host[255] = '\0';
    char names[8][512];
    assert_int_equal(list_events(dir, names, 8), 1);
    const char *base = strrchr(names[0], '/') + 1;
    assert_int_equal(strncmp(base, "events.out.tfevents.", 20), 0);
    for (int i = 0; i < 10; i++) assert_true(base[20 + i] >= '0' && base[20 + i] <= '9');
    char tail[400];
    snprintf(tail, sizeof tail, ".%s.%ld.0", host, (long)getpid());
    assert_string_equal(base + 30, tail);

    events ev;
    read_events(names[0], &ev);
    assert_int_equal(ev.damaged, 0);
    assert_int_equal(ev.n, 5);
    assert_int_equal(ev.ev[0]->what_case, TENSORBOARD__EVENT__WHAT_FILE_VERSION);
    assert_string_equal(ev.ev[0]->file_version, "brain.Event:2");
    assert_true(ev.ev[0]->wall_time > 1.5e9);
    assert_int_equal(ev.ev[1]->what_case, TENSORBOARD__EVENT__WHAT_SESSION_LOG);
    assert_int_equal(ev.ev[1]->session_log->status, TENSORBOARD__SESSION_LOG__SESSION_STATUS__START);
    assert_int_equal(ev.ev[1]->step, 0);
    const Tensorboard__Summary__Value *t = find_tag(ev.ev[2], "args/text_summary");
    assert_non_null(t);
    assert_int_equal(t->value_case, TENSORBOARD__SUMMARY__VALUE__VALUE_TENSOR);
    assert_string_equal(t->metadata->plugin_data->plugin_name, "text");
    assert_int_equal(t->tensor->dtype, TENSORBOARD__DATA_TYPE__DT_STRING);
    assert_int_equal(t->tensor->n_string_val, 1);
    assert_int_equal(t->tensor->string_val[0].len, strlen("{\"beta\": 0.1}"));
    assert_memory_equal(t->tensor->string_val[0].data, "{\"beta\": 0.1}", t->tensor->string_val[0].len);
    assert_int_equal(t->tensor->tensor_shape->n_dim, 1);
    assert_int_equal(t->tensor->tensor_shape->dim[0]->size, 1);
    for (int s = 1; s <= 2; s++) {
        const Tensorboard__Event *e = ev.ev[2 + s];
        assert_int_equal(e->step, s);
        assert_int_equal(e->summary->n_value, 3); /* "step" is the event's step, not a tag */
        const Tensorboard__Summary__Value *loss = find_tag(e, "train/loss"), *eval = find_tag(e, "eval/loss"),
                                          *gn = find_tag(e, "train/grad_norm");
        assert_non_null(loss);
        assert_non_null(eval);
        assert_non_null(gn);
        assert_int_equal(gn->value_case, TENSORBOARD__SUMMARY__VALUE__VALUE_SIMPLE_VALUE);
        assert_true(loss->simple_value == (float)(s == 1 ? 0.5 : 0.25));
        assert_true(eval->simple_value == loss->simple_value / 2);
        assert_true(gn->simple_value == 0.0f);
        assert_null(find_tag(e, "train/step"));
    }
    free_events(&ev);
}

static void test_resume_cut(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    dpoc_tb_writer w;
    dpoc_err err;
    assert_int_equal(dpoc_tb_open(&w, dir, -1, "{}", NULL, &err), 0);
    for (int s = 1; s <= 6; s++) log_row(&w, s, s);
    dpoc_tb_close(&w);

    /* resume from step 3: steps 4..6 leave the old file; the new one sorts after it */
    assert_int_equal(dpoc_tb_open(&w, dir, 3, "{}", NULL, &err), 0);
    for (int s = 4; s <= 5; s++) log_row(&w, s, 10 * s);
    dpoc_tb_close(&w);
    char names[8][512];
    assert_int_equal(list_events(dir, names, 8), 2);
    events a, b;
    read_events(names[0], &a);
    read_events(names[1], &b);
    assert_int_equal(a.n, 3 + 3); /* version, START, args, steps 1..3 */
    assert_int_equal(a.ev[5]->step, 3);
    assert_int_equal(b.ev[1]->what_case, TENSORBOARD__EVENT__WHAT_SESSION_LOG);
    assert_int_equal(b.ev[1]->step, 4); /* START at the first step the resumed run logs */
    assert_non_null(find_tag(b.ev[2], "args/text_summary"));
    assert_int_equal(b.ev[2]->step, 3);
    assert_int_equal(b.n, 3 + 2);
    assert_true(find_tag(b.ev[3], "train/loss")->simple_value == 40.0f);
    free_events(&a);
    free_events(&b);

    /* a second resume from step 3: the first resume's file had nothing but its args
     * text at step 3 and steps past 3, so it goes; the original file is untouched */
    struct stat st0;
    assert_int_equal(stat(names[0], &st0), 0);
    assert_int_equal(dpoc_tb_open(&w, dir, 3, "{}", NULL, &err), 0);
    dpoc_tb_close(&w);
    char names2[8][512];
    assert_int_equal(list_events(dir, names2, 8), 2);
    assert_string_equal(names2[0], names[0]);
    assert_true(strcmp(names2[1], names[1]) > 0);
    struct stat st1;
    assert_int_equal(stat(names[0], &st1), 0);
    assert_int_equal(st1.st_size, st0.st_size);

    /* a fresh run into the same directory clears the earlier ones */
    assert_int_equal(dpoc_tb_open(&w, dir, -1, NULL, NULL, &err), 0);
    dpoc_tb_close(&w);
    assert_int_equal(list_events(dir, names, 8), 1);
    /* no temporary left behind */
    char tmpf[700];
    snprintf(tmpf, sizeof tmpf, "%s/.dpoc-tb-cut.tmp", dir);
    assert_int_not_equal(access(tmpf, F_OK), 0);
}

static void write_bytes(const char *path, const void *p, size_t n, const char *mode) {
    FILE *f = fopen(path, mode);
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    fclose(f);
}

static void test_damaged_files(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    dpoc_tb_writer w;
    dpoc_err err;
    assert_int_equal(dpoc_tb_open(&w, dir, -1, "{}", NULL, &err), 0);
    for (int s = 1; s <= 4; s++) log_row(&w, s, s);
    char path[4200];
    strcpy(path, w.path);
    dpoc_tb_close(&w);
    size_t len = 0;
    char *whole = read_text_file(path, &len);
    assert_non_null(whole);

    /* a killed writer: the file cut in the middle of its last record */
    write_bytes(path, whole, len - 7, "wb");
    char tmp[4300];
    snprintf(tmp, sizeof tmp, "%s/cut.tmp", dir);
    dpoc_tb_cut_stats st;
    assert_int_equal(dpoc_tb_cut_file(path, tmp, 100, &st, &err), 0);
    assert_true(st.rewritten && !st.removed);
    assert_int_equal(st.dropped, 0);
    assert_true(st.damaged_bytes > 0);
    events ev;
    read_events(path, &ev);
    assert_int_equal(ev.damaged, 0);
    assert_int_equal(ev.ev[ev.n - 1]->step, 3); /* step 4's record was the cut one */
    free_events(&ev);

    /* every truncation and random corruption: no crash, the readable prefix kept */
    rng_t r = {11};
    for (size_t cut = 0; cut <= len; cut += 3) {
        write_bytes(path, whole, cut, "wb");
        if (dpoc_tb_cut_file(path, tmp, 2, &st, &err) == 0 && !st.removed) {
            read_events(path, &ev);
            assert_int_equal(ev.damaged, 0);
            for (size_t i = 0; i < ev.n; i++) assert_true(ev.ev[i]->step <= 2);
            free_events(&ev);
        }
    }
    char *bad = malloc(len);
    assert_non_null(bad);
    for (int round = 0; round < 200; round++) {
        memcpy(bad, whole, len);
        for (int k = 0; k < 1 + round % 4; k++) bad[rng_next(&r) % len] ^= (char)(1 + rng_next(&r) % 255);
        write_bytes(path, bad, len, "wb");
        dpoc_tb_cut_file(path, tmp, (long)(rng_next(&r) % 6) - 1, &st, &err);
        /* random bytes as records and as Event payloads */
        for (size_t i = 0; i < len; i++) bad[i] = (char)rng_next(&r);
        const uint8_t *data;
        size_t n, used;
        dpoc_tb_record_read((const uint8_t *)bad, len, &data, &n, &used, &err);
        Tensorboard__Event *e = tensorboard__event__unpack(NULL, len, (const uint8_t *)bad);
        if (e) tensorboard__event__free_unpacked(e, NULL);
    }
    free(bad);

    /* a file of garbage, and an empty one: removed (nothing readable), the run goes on */
    write_bytes(path, "not an event file at all", 24, "wb");
    assert_int_equal(dpoc_tb_cut_file(path, tmp, 3, &st, &err), 0);
    assert_true(st.removed);
    write_bytes(path, "", 0, "wb");
    assert_int_equal(dpoc_tb_open(&w, dir, 3, "{}", NULL, &err), 0);
    dpoc_tb_close(&w);
    char names[8][512];
    assert_int_equal(list_events(dir, names, 8), 1);
    free(whole);
}

static void test_logdir(void **state) {
    (void)state;
    char out[4096];
    dpoc_err err;
    unsetenv("TENSORBOARD_LOGGING_DIR");
    assert_int_equal(dpoc_tb_logdir("my/logs", "out", 0, out, sizeof out, &err), 0);
    assert_string_equal(out, "my/logs");
    /* transformers' default: output_dir/runs/<Mon><DD>_<HH>-<MM>-<SS>_<host> */
    const char *tmp = make_temp_dir();
    assert_int_equal(dpoc_tb_logdir("", tmp, 0, out, sizeof out, &err), 0);
    char host[256];
    gethostname(host, sizeof host);
    host[255] = '\0';
    const size_t tl = strlen(tmp);
    assert_int_equal(strncmp(out, tmp, tl), 0);
    assert_int_equal(strncmp(out + tl, "/runs/", 6), 0);
    const char *stamp = out + tl + 6; /* e.g. Jan05_13-04-59 */
    assert_true(strlen(stamp) == 15 + strlen(host));
    assert_true(stamp[5] == '_' && stamp[8] == '-' && stamp[11] == '-' && stamp[14] == '_');
    assert_string_equal(stamp + 15, host);
    /* resuming continues the run directory holding the newest event file */
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/runs/Jan01_00-00-00_h", tmp);
    snprintf(b, sizeof b, "%s/runs/Dec31_00-00-00_h", tmp);
    dpoc_tb_writer w;
    assert_int_equal(dpoc_tb_open(&w, a, -1, NULL, NULL, &err), 0);
    dpoc_tb_close(&w);
    char older[4300];
    snprintf(older, sizeof older, "%s/events.out.tfevents.0000000001.h.1.0", a); /* a's file: from 1970 */
    assert_int_equal(rename(w.path, older), 0);
    assert_int_equal(dpoc_tb_open(&w, b, -1, NULL, NULL, &err), 0);
    dpoc_tb_close(&w);
    assert_int_equal(dpoc_tb_logdir("", tmp, 1, out, sizeof out, &err), 0);
    assert_string_equal(out, b);
    /* transformers 5's TENSORBOARD_LOGGING_DIR, ~ expanded; logging_dir wins over it */
    setenv("TENSORBOARD_LOGGING_DIR", "~/tb", 1);
    char want[4200];
    snprintf(want, sizeof want, "%s/tb", getenv("HOME"));
    assert_int_equal(dpoc_tb_logdir("", tmp, 1, out, sizeof out, &err), 0);
    assert_string_equal(out, want);
    assert_int_equal(dpoc_tb_logdir("x", tmp, 1, out, sizeof out, &err), 0);
    assert_string_equal(out, "x");
    unsetenv("TENSORBOARD_LOGGING_DIR");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c_vectors),    cmocka_unit_test(test_record_framing),
        cmocka_unit_test(test_tags_as_hf_rewrite_logs), cmocka_unit_test(test_writer_file),
        cmocka_unit_test(test_resume_cut),        cmocka_unit_test(test_damaged_files),
        cmocka_unit_test(test_logdir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
