/* TensorBoard event files (see tensorboard.h). The Event protos are protobuf-c's
 * code generated from tb_event.proto at build time; CRC-32C is ISA-L's. */
#include "dpoc/tensorboard.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <isa-l/crc.h>

#include "core/fileutil.h"
#include "tb_event.pb-c.h"

#define EVENTS_PREFIX "events.out.tfevents."
/* TensorBoard reads every file whose name contains this (io_wrapper.IsSummaryEventsFile) */
#define EVENTS_MARK "tfevents"
/* the cut copy's temporary name: without EVENTS_MARK, so no reader takes it for events */
#define CUT_TMP ".dpoc-tb-cut.tmp"

/* ---- CRC-32C and framing ---- */

uint32_t dpoc_tb_crc32c(const void *data, size_t n) {
    /* crc32_iscsi takes an int length and leaves the initial and final inversion
     * to the caller (so it chains): standard CRC-32C = ~crc32_iscsi(.., ~0) */
    const unsigned char *p = data;
    unsigned int crc = 0xFFFFFFFFu;
    while (n > 0) {
        const size_t chunk = n > (size_t)(INT_MAX / 2) ? (size_t)(INT_MAX / 2) : n;
        crc = crc32_iscsi((unsigned char *)p, (int)chunk, crc); /* reads only */
        p += chunk;
        n -= chunk;
    }
    return crc ^ 0xFFFFFFFFu;
}

uint32_t dpoc_tb_masked_crc(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_le32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void dpoc_tb_record_frame(const void *data, size_t n, uint8_t header[DPOC_TB_RECORD_HEADER],
                          uint8_t footer[DPOC_TB_RECORD_FOOTER]) {
    put_le64(header, (uint64_t)n);
    put_le32(header + 8, dpoc_tb_masked_crc(dpoc_tb_crc32c(header, 8)));
    put_le32(footer, dpoc_tb_masked_crc(dpoc_tb_crc32c(data, n)));
}

int dpoc_tb_record_read(const uint8_t *buf, size_t len, const uint8_t **data, size_t *n, size_t *used,
                        dpoc_err *err) {
    if (len < DPOC_TB_RECORD_HEADER)
        return dpoc_errf(err, DPOC_EINPUT, "record header cut short (%zu of %d bytes)", len, DPOC_TB_RECORD_HEADER);
    if (get_le32(buf + 8) != dpoc_tb_masked_crc(dpoc_tb_crc32c(buf, 8)))
        return dpoc_errf(err, DPOC_EINPUT, "record length fails its CRC");
    const uint64_t m = get_le64(buf);
    const size_t room = len - DPOC_TB_RECORD_HEADER;
    if (room < DPOC_TB_RECORD_FOOTER || m > (uint64_t)(room - DPOC_TB_RECORD_FOOTER))
        return dpoc_errf(err, DPOC_EINPUT, "record cut short (%llu bytes announced, %zu present)",
                         (unsigned long long)m, room);
    const uint8_t *d = buf + DPOC_TB_RECORD_HEADER;
    if (get_le32(d + m) != dpoc_tb_masked_crc(dpoc_tb_crc32c(d, (size_t)m)))
        return dpoc_errf(err, DPOC_EINPUT, "record data fails its CRC");
    *data = d;
    *n = (size_t)m;
    *used = DPOC_TB_RECORD_HEADER + (size_t)m + DPOC_TB_RECORD_FOOTER;
    return 0;
}

/* ---- tags ---- */

void dpoc_tb_tag(const char *key, char *out, size_t cap) {
    if (!cap) return;
    if (!strncmp(key, "eval_", 5)) snprintf(out, cap, "eval/%s", key + 5);
    else if (!strncmp(key, "test_", 5)) snprintf(out, cap, "test/%s", key + 5);
    else snprintf(out, cap, "train/%s", key);
}

/* ---- the log directory ---- */

/* The <unix seconds> of an event file's name, or -1 when it has none. */
static long long name_seconds(const char *name) {
    const char *p = strstr(name, EVENTS_MARK ".");
    if (!p) return -1;
    p += strlen(EVENTS_MARK ".");
    if (*p < '0' || *p > '9') return -1;
    return strtoll(p, NULL, 10);
}

static int is_events_file(const char *dir, const char *name) {
    if (!strstr(name, EVENTS_MARK)) return 0;
    char path[8400];
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path) return 0;
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The newest event file of dir: its seconds (-1: none) and name (ties: the later name). */
static long long newest_in(const char *dir, char *name, size_t cap) {
    long long best = -1;
    if (cap) name[0] = '\0';
    DIR *d = opendir(dir);
    if (!d) return -1;
    const struct dirent *e;
    while ((e = readdir(d))) {
        const long long s = name_seconds(e->d_name);
        if (s < 0 || !is_events_file(dir, e->d_name)) continue;
        if (s > best || (s == best && strcmp(e->d_name, name) > 0)) {
            best = s;
            snprintf(name, cap, "%s", e->d_name);
        }
    }
    closedir(d);
    return best;
}

int dpoc_tb_logdir(const char *logging_dir, const char *output_dir, int resuming, char *out, size_t cap,
                   dpoc_err *err) {
    const char *env = getenv("TENSORBOARD_LOGGING_DIR");
    int n;
    if (logging_dir && logging_dir[0]) {
        n = snprintf(out, cap, "%s", logging_dir);
    } else if (env && env[0]) {
        const char *home = getenv("HOME");
        if ((env[0] == '~' && (env[1] == '/' || !env[1])) && home) n = snprintf(out, cap, "%s%s", home, env + 1);
        else n = snprintf(out, cap, "%s", env);
    } else {
        char runs[4200];
        if (snprintf(runs, sizeof runs, "%s/runs", output_dir) >= (int)sizeof runs)
            return dpoc_errf(err, DPOC_EINPUT, "output_dir too long: %s", output_dir);
        if (resuming) { /* continue the run being resumed: the directory of the newest event file */
            long long best = -1;
            char best_dir[512] = "", best_name[512] = "", name[512];
            DIR *d = opendir(runs);
            const struct dirent *e;
            while (d && (e = readdir(d))) {
                if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof best_dir) continue;
                char sub[4800];
                snprintf(sub, sizeof sub, "%s/%s", runs, e->d_name);
                const long long s = newest_in(sub, name, sizeof name);
                if (s < 0) continue;
                if (s > best || (s == best && strcmp(name, best_name) > 0)) {
                    best = s;
                    snprintf(best_dir, sizeof best_dir, "%s", e->d_name);
                    snprintf(best_name, sizeof best_name, "%s", name);
                }
            }
            if (d) closedir(d);
            if (best >= 0) {
                n = snprintf(out, cap, "%s/%s", runs, best_dir);
                if (n < 0 || (size_t)n >= cap) return dpoc_errf(err, DPOC_EINPUT, "logging_dir too long");
                return 0;
            }
        }
        /* transformers' default_logdir(): runs/ + datetime.now().strftime("%b%d_%H-%M-%S") + "_" + hostname */
        char host[256] = "localhost", stamp[64];
        if (gethostname(host, sizeof host) != 0) strcpy(host, "localhost");
        host[sizeof host - 1] = '\0';
        const time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        strftime(stamp, sizeof stamp, "%b%d_%H-%M-%S", &tm);
        n = snprintf(out, cap, "%s/%s_%s", runs, stamp, host);
    }
    if (n < 0 || (size_t)n >= cap) return dpoc_errf(err, DPOC_EINPUT, "logging_dir too long");
    return 0;
}

/* ---- cutting ---- */

static int is_text_summary(const Tensorboard__Summary *s) {
    for (size_t i = 0; i < s->n_value; i++) {
        const Tensorboard__SummaryMetadata *md = s->value[i]->metadata;
        if (md && md->plugin_data && md->plugin_data->plugin_name &&
            !strcmp(md->plugin_data->plugin_name, "text"))
            return 1;
    }
    return 0;
}

typedef struct {
    size_t off, len;
} span;

int dpoc_tb_cut_file(const char *path, const char *tmp_path, long keep_up_to_step, dpoc_tb_cut_stats *st,
                     dpoc_err *err) {
    memset(st, 0, sizeof *st);
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_read_file(path, &text, &len, err));
    const uint8_t *buf = (const uint8_t *)text;
    span *keep = NULL;
    size_t n_keep = 0, cap_keep = 0, summaries = 0, off = 0;
    int rc = 0;
    while (off < len) {
        const uint8_t *data;
        size_t n, used;
        dpoc_err rec_err;
        if (dpoc_tb_record_read(buf + off, len - off, &data, &n, &used, &rec_err)) break;
        Tensorboard__Event *ev = tensorboard__event__unpack(NULL, n, data);
        if (!ev) break; /* a record whose payload is no Event: treated as damage */
        int k = 1;
        if (ev->what_case == TENSORBOARD__EVENT__WHAT_SUMMARY && ev->summary) {
            const long s = (long)ev->step;
            k = keep_up_to_step >= 0 &&
                (s < keep_up_to_step || (s == keep_up_to_step && !is_text_summary(ev->summary)));
        }
        const int summary = ev->what_case == TENSORBOARD__EVENT__WHAT_SUMMARY;
        tensorboard__event__free_unpacked(ev, NULL);
        if (k) {
            if (n_keep == cap_keep) {
                const size_t nc = cap_keep ? 2 * cap_keep : 64;
                span *g = realloc(keep, nc * sizeof *g);
                if (!g) {
                    rc = dpoc_errf(err, DPOC_ENOMEM, "%s: out of memory cutting the event file", path);
                    break;
                }
                keep = g;
                cap_keep = nc;
            }
            keep[n_keep++] = (span){off, used};
            summaries += summary;
            st->kept++;
        } else {
            st->dropped++;
        }
        off += used;
    }
    if (!rc) st->damaged_bytes = len - off;
    if (!rc && summaries == 0) {
        if (remove(path) != 0) rc = dpoc_errf(err, DPOC_EIO, "%s: cannot remove: %s", path, strerror(errno));
        else st->removed = 1;
    } else if (!rc && (st->dropped || st->damaged_bytes)) {
        FILE *f = fopen(tmp_path, "wb");
        if (!f) rc = dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", tmp_path, strerror(errno));
        for (size_t i = 0; f && !rc && i < n_keep; i++)
            if (fwrite(buf + keep[i].off, 1, keep[i].len, f) != keep[i].len)
                rc = dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", tmp_path, strerror(errno));
        if (f && fclose(f) != 0 && !rc) rc = dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", tmp_path, strerror(errno));
        if (f && rc) remove(tmp_path);
        if (!rc) rc = dpoc_commit_file(tmp_path, path, err); /* fsync + rename over the original */
        if (!rc) st->rewritten = 1;
    }
    free(keep);
    free(text);
    return rc;
}

/* ---- the writer ---- */

static double wall_time(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + 1e-6 * (double)tv.tv_usec;
}

/* Packs ev and appends it as one record; flushed so that a running TensorBoard
 * (and a killed run's file) has every row written so far. */
static int write_event(dpoc_tb_writer *w, const Tensorboard__Event *ev, dpoc_err *err) {
    const size_t n = tensorboard__event__get_packed_size(ev);
    if (n > w->buf_cap) {
        uint8_t *g = realloc(w->buf, n);
        if (!g) return dpoc_errf(err, DPOC_ENOMEM, "out of memory packing a TensorBoard event");
        w->buf = g;
        w->buf_cap = n;
    }
    const size_t packed = n ? tensorboard__event__pack(ev, w->buf) : 0;
    uint8_t header[DPOC_TB_RECORD_HEADER], footer[DPOC_TB_RECORD_FOOTER];
    dpoc_tb_record_frame(w->buf, packed, header, footer);
    if (fwrite(header, 1, sizeof header, w->f) != sizeof header || fwrite(w->buf, 1, packed, w->f) != packed ||
        fwrite(footer, 1, sizeof footer, w->f) != sizeof footer || fflush(w->f) != 0)
        return dpoc_errf(err, DPOC_EIO, "%s: write failed: %s", w->path, strerror(errno));
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Cuts every event file of dir (sorted by name, as TensorBoard reads them) and
 * returns the newest <unix seconds> left (-1: none). A file that cannot be cut is
 * reported and left: it must not stop the run. */
static long long cut_dir(const char *dir, long keep_up_to_step, FILE *log) {
    char **names = NULL;
    size_t n = 0, cap = 0;
    long long newest = -1;
    DIR *d = opendir(dir);
    const struct dirent *e;
    while (d && (e = readdir(d))) {
        if (!is_events_file(dir, e->d_name)) continue;
        if (n == cap) {
            const size_t nc = cap ? 2 * cap : 16;
            char **g = realloc(names, nc * sizeof *g);
            if (!g) break;
            names = g;
            cap = nc;
        }
        if (!(names[n] = strdup(e->d_name))) break;
        n++;
    }
    if (d) closedir(d);
    if (n) qsort(names, n, sizeof *names, cmp_names);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s/%s", dir, CUT_TMP);
    for (size_t i = 0; i < n; i++) {
        char path[8400];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        dpoc_tb_cut_stats st;
        dpoc_err e2;
        dpoc_err_clear(&e2);
        if (dpoc_tb_cut_file(path, tmp, keep_up_to_step, &st, &e2)) {
            if (log) fprintf(log, "dpoc: warning: TensorBoard: %s left as it is: %s\n", path, e2.msg);
        } else if (log && (st.dropped || st.damaged_bytes || st.removed)) {
            fprintf(log, "dpoc: TensorBoard: %s %s: %zu event(s) past step %ld dropped, %zu damaged byte(s) at its end\n",
                    path, st.removed ? "removed (no summary left)" : "cut", st.dropped, keep_up_to_step,
                    st.damaged_bytes);
        }
        const long long s = name_seconds(names[i]);
        if (s > newest) newest = s; /* a removed file's name still counts: a reader may hold it */
        free(names[i]);
    }
    free(names);
    return newest;
}

int dpoc_tb_open(dpoc_tb_writer *w, const char *logdir, long keep_up_to_step, const char *config_json, FILE *log,
                 dpoc_err *err) {
    memset(w, 0, sizeof *w);
    if (snprintf(w->dir, sizeof w->dir, "%s", logdir) >= (int)sizeof w->dir)
        return dpoc_errf(err, DPOC_EINPUT, "logging_dir too long: %s", logdir);
    DPOC_TRY(dpoc_mkdirs(logdir, err));
    const long long newest = cut_dir(logdir, keep_up_to_step, log);
    char host[256] = "localhost";
    if (gethostname(host, sizeof host) != 0) strcpy(host, "localhost");
    host[sizeof host - 1] = '\0';
    /* torch / tensorboard's EventFileWriter name: events.out.tfevents.%010d.<host>.<pid>.<uid>.
     * TensorBoard reads a run's files in name order, so the new file must sort after
     * the old ones: a start in the same second as the newest (pids are not ordered)
     * takes the next second. "x": never append to a file another writer holds. */
    long long secs = (long long)time(NULL);
    if (secs <= newest) secs = newest + 1;
    for (int attempt = 0; attempt < 100 && !w->f; attempt++, secs++) {
        if (snprintf(w->path, sizeof w->path, "%s/" EVENTS_PREFIX "%010lld.%s.%ld.0", logdir, secs, host,
                     (long)getpid()) >= (int)sizeof w->path)
            return dpoc_errf(err, DPOC_EINPUT, "logging_dir too long: %s", logdir);
        w->f = fopen(w->path, "wbx");
        if (!w->f && errno != EEXIST) return dpoc_errf(err, DPOC_EIO, "%s: cannot create: %s", w->path, strerror(errno));
    }
    if (!w->f) return dpoc_errf(err, DPOC_EIO, "%s: cannot create a new event file", logdir);

    Tensorboard__SourceMetadata src = TENSORBOARD__SOURCE_METADATA__INIT;
    src.writer = "dpoc";
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = wall_time();
    ev.what_case = TENSORBOARD__EVENT__WHAT_FILE_VERSION;
    ev.file_version = "brain.Event:2";
    ev.source_metadata = &src;
    int rc = write_event(w, &ev, err);

    Tensorboard__SessionLog sl = TENSORBOARD__SESSION_LOG__INIT;
    sl.status = TENSORBOARD__SESSION_LOG__SESSION_STATUS__START;
    Tensorboard__Event start = TENSORBOARD__EVENT__INIT;
    start.wall_time = wall_time();
    start.step = keep_up_to_step >= 0 ? keep_up_to_step + 1 : 0;
    start.what_case = TENSORBOARD__EVENT__WHAT_SESSION_LOG;
    start.session_log = &sl;
    if (!rc) rc = write_event(w, &start, err);
    if (!rc && config_json) rc = dpoc_tb_write_text(w, keep_up_to_step >= 0 ? keep_up_to_step : 0, "args", config_json, err);
    if (rc) dpoc_tb_close(w);
    return rc;
}

int dpoc_tb_write_scalars(dpoc_tb_writer *w, long step, size_t n, const char *const *tags, const double *values,
                          dpoc_err *err) {
    Tensorboard__Summary__Value *vals = n ? calloc(n, sizeof *vals) : NULL;
    Tensorboard__Summary__Value **ptrs = n ? calloc(n, sizeof *ptrs) : NULL;
    if (n && (!vals || !ptrs)) {
        free(vals);
        free(ptrs);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory writing TensorBoard scalars");
    }
    for (size_t i = 0; i < n; i++) {
        tensorboard__summary__value__init(&vals[i]);
        vals[i].tag = (char *)tags[i]; /* only read by pack */
        vals[i].value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_SIMPLE_VALUE;
        vals[i].simple_value = (float)values[i]; /* add_scalar's simple_value is a float */
        ptrs[i] = &vals[i];
    }
    Tensorboard__Summary s = TENSORBOARD__SUMMARY__INIT;
    s.n_value = n;
    s.value = ptrs;
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = wall_time();
    ev.step = step;
    ev.what_case = TENSORBOARD__EVENT__WHAT_SUMMARY;
    ev.summary = &s;
    const int rc = write_event(w, &ev, err);
    free(ptrs);
    free(vals);
    return rc;
}

int dpoc_tb_write_text(dpoc_tb_writer *w, long step, const char *tag, const char *text, dpoc_err *err) {
    /* torch / tensorboardX summary.text: a 1-element DT_STRING tensor, plugin "text"
     * (TextPluginData version 0 serializes to nothing), tag + "/text_summary" */
    char full[512];
    snprintf(full, sizeof full, "%s/text_summary", tag);
    Tensorboard__TensorShapeProto__Dim dim = TENSORBOARD__TENSOR_SHAPE_PROTO__DIM__INIT;
    dim.size = 1;
    Tensorboard__TensorShapeProto__Dim *dims[1] = {&dim};
    Tensorboard__TensorShapeProto shape = TENSORBOARD__TENSOR_SHAPE_PROTO__INIT;
    shape.n_dim = 1;
    shape.dim = dims;
    ProtobufCBinaryData str = {strlen(text), (uint8_t *)text};
    Tensorboard__TensorProto tensor = TENSORBOARD__TENSOR_PROTO__INIT;
    tensor.dtype = TENSORBOARD__DATA_TYPE__DT_STRING;
    tensor.tensor_shape = &shape;
    tensor.n_string_val = 1;
    tensor.string_val = &str;
    Tensorboard__SummaryMetadata__PluginData pd = TENSORBOARD__SUMMARY_METADATA__PLUGIN_DATA__INIT;
    pd.plugin_name = "text";
    Tensorboard__SummaryMetadata md = TENSORBOARD__SUMMARY_METADATA__INIT;
    md.plugin_data = &pd;
    Tensorboard__Summary__Value v = TENSORBOARD__SUMMARY__VALUE__INIT;
    v.tag = full;
    v.metadata = &md;
    v.value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_TENSOR;
    v.tensor = &tensor;
    Tensorboard__Summary__Value *vp[1] = {&v};
    Tensorboard__Summary s = TENSORBOARD__SUMMARY__INIT;
    s.n_value = 1;
    s.value = vp;
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = wall_time();
    ev.step = step;
    ev.what_case = TENSORBOARD__EVENT__WHAT_SUMMARY;
    ev.summary = &s;
    return write_event(w, &ev, err);
}

#define TAG_MAX 256

int dpoc_tb_write_log(void *writer, const dpoc_log_record *rec, dpoc_err *err) {
    dpoc_tb_writer *w = writer;
    static const size_t max = DPOC_MAX_LOG_FIELDS;
    char tags[DPOC_MAX_LOG_FIELDS][TAG_MAX];
    const char *tp[DPOC_MAX_LOG_FIELDS];
    double v[DPOC_MAX_LOG_FIELDS];
    long step = 0;
    size_t n = 0;
    for (size_t i = 0; i < rec->n && i < max; i++) {
        if (!strcmp(rec->names[i], "step")) { /* HF's event step (state.global_step), not a tag */
            step = (long)rec->values[i];
            continue;
        }
        dpoc_tb_tag(rec->names[i], tags[n], TAG_MAX);
        tp[n] = tags[n];
        v[n++] = rec->values[i];
    }
    return dpoc_tb_write_scalars(w, step, n, tp, v, err);
}

void dpoc_tb_close(dpoc_tb_writer *w) {
    if (w->f) fclose(w->f);
    w->f = NULL;
    free(w->buf);
    w->buf = NULL;
    w->buf_cap = 0;
}
