/* Text preference data sets against TRL: for TRL's four formats (standard and
 * conversational, explicit and implicit prompt) the prompt/chosen/rejected ids,
 * the rows dropped at max_length and the collated, truncated sequences with their
 * completion masks equal what TRL 1.16's DPOTrainer produces with the SmolLM2
 * tokenizer (tests/fixtures/datasets, tools/make_dataset_fixtures.py). Bad
 * records stop with file:line or are skipped and counted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "dpoc/chat.h"
#include "dpoc/dataset.h"
#include "dpoc/model.h"
#include "dpoc/model_load.h"
#include "dpoc/tokenizer.h"
#include "testutil.h"

static dpoc_tokenizer *g_tok; /* loaded once for the group */
static int g_kind;

static int setup(void **state) {
    (void)state;
    dpoc_err err;
    if (dpoc_tokenizer_load(&g_tok, fixture_path("tokenizer/smollm2"), &err)) {
        fprintf(stderr, "cannot load the SmolLM2 tokenizer: %s\n", err.msg);
        return -1;
    }
    dpoc_chat_kind k;
    if (dpoc_chat_detect(dpoc_tokenizer_chat_template(g_tok), &k, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    g_kind = (int)k;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    dpoc_tokenizer_free(g_tok);
    return 0;
}

static void load(dpoc_dataset *d, const char *file, long max_length, int keep_end) {
    dpoc_prefs_ctx ctx = {g_tok, g_kind, dpoc_tokenizer_vocab_size(g_tok)};
    dpoc_dataset_opts o = {max_length, keep_end, 0};
    dpoc_err err;
    if (dpoc_dataset_load(d, fixture_path(file), &ctx, &o, &err)) fail_msg("%s", err.msg);
}

static void same_ids(const int32_t *got, size_t n, const cJSON *want, const char *what) {
    size_t m = (size_t)cJSON_GetArraySize(want);
    if (m != n) fail_msg("%s: %zu ids, TRL has %zu", what, n, m);
    for (size_t i = 0; i < n; i++)
        if (got[i] != (int32_t)cJSON_GetArrayItem(want, (int)i)->valuedouble)
            fail_msg("%s: id %zu is %d, TRL has %d", what, i, got[i], (int)cJSON_GetArrayItem(want, (int)i)->valuedouble);
}

static void check_collated(const dpoc_dataset *d, size_t pair, int rejected, long max_length, int keep_end,
                           const cJSON *want, const char *what) {
    int32_t buf[4096];
    dpoc_seq seq;
    dpoc_dataset_collate(d, pair, rejected, max_length, keep_end, buf, &seq);
    same_ids(buf, seq.T, cJSON_GetObjectItem(want, "input_ids"), what);
    const cJSON *mask = cJSON_GetObjectItem(want, "completion_mask");
    for (size_t i = 0; i < seq.T; i++) {
        int m = (int)cJSON_GetArrayItem(mask, (int)i)->valuedouble;
        if (m != (i >= seq.comp_start)) fail_msg("%s: completion mask differs at %zu", what, i);
    }
}

static void check_dataset(const char *name) {
    char rel[256], what[256];
    snprintf(rel, sizeof rel, "datasets/%s.expected.json", name);
    cJSON *exp = load_json_fixture(rel);
    const long max_length = (long)cJSON_GetObjectItem(exp, "max_length")->valuedouble;
    snprintf(rel, sizeof rel, "datasets/%s.jsonl", name);
    dpoc_dataset d;
    load(&d, rel, 0, 0);
    const cJSON *rows = cJSON_GetObjectItem(exp, "rows");
    assert_int_equal(d.n_pairs, (size_t)cJSON_GetArraySize(rows));
    const char *keys[3] = {"prompt_ids", "chosen_ids", "rejected_ids"};
    for (size_t i = 0; i < d.n_pairs; i++) {
        const dpoc_pair *p = &d.pairs[i];
        const size_t offs[3] = {p->prompt_off, p->chosen_off, p->rejected_off};
        const size_t lens[3] = {p->prompt_len, p->chosen_len, p->rejected_len};
        for (int k = 0; k < 3; k++) {
            snprintf(what, sizeof what, "%s row %zu %s", name, i, keys[k]);
            same_ids(d.tokens + offs[k], lens[k], cJSON_GetObjectItem(cJSON_GetArrayItem(rows, (int)i), keys[k]), what);
        }
    }
    /* keep_end collation of every row */
    const cJSON *ce = cJSON_GetObjectItem(exp, "collated_keep_end");
    for (size_t i = 0; i < d.n_pairs; i++)
        for (int r = 0; r < 2; r++) {
            snprintf(what, sizeof what, "%s row %zu %s keep_end", name, i, r ? "rejected" : "chosen");
            check_collated(&d, i, r, max_length, 1,
                           cJSON_GetArrayItem(cJSON_GetObjectItem(ce, r ? "rejected" : "chosen"), (int)i), what);
        }
    dpoc_dataset_free(&d);
    /* the max_length filter (keep_start) and keep_start collation of the kept rows */
    load(&d, rel, max_length, 0);
    const cJSON *kept = cJSON_GetObjectItem(exp, "kept_at_max_length");
    assert_int_equal(d.n_pairs, (size_t)cJSON_GetArraySize(kept));
    assert_int_equal(d.n_dropped_prompt_too_long, (size_t)(cJSON_GetArraySize(rows) - cJSON_GetArraySize(kept)));
    const cJSON *cs = cJSON_GetObjectItem(exp, "collated_keep_start");
    for (size_t i = 0; i < d.n_pairs; i++) {
        /* source rows are 1-based lines in the JSONL */
        assert_int_equal(d.pairs[i].line - 1, (size_t)cJSON_GetArrayItem(kept, (int)i)->valuedouble);
        for (int r = 0; r < 2; r++) {
            snprintf(what, sizeof what, "%s kept row %zu %s keep_start", name, i, r ? "rejected" : "chosen");
            check_collated(&d, i, r, max_length, 0,
                           cJSON_GetArrayItem(cJSON_GetObjectItem(cs, r ? "rejected" : "chosen"), (int)i), what);
        }
    }
    dpoc_dataset_free(&d);
    cJSON_Delete(exp);
}

static void test_standard_explicit(void **state) { (void)state; check_dataset("standard_explicit"); }
static void test_standard_implicit(void **state) { (void)state; check_dataset("standard_implicit"); }
static void test_conversational_explicit(void **state) { (void)state; check_dataset("conversational_explicit"); }
static void test_conversational_implicit(void **state) { (void)state; check_dataset("conversational_implicit"); }

/* A JSON array file holds the same rows as the JSONL */
static void test_json_array(void **state) {
    (void)state;
    dpoc_dataset a, b;
    load(&a, "datasets/standard_explicit.jsonl", 0, 0);
    load(&b, "datasets/standard_explicit_array.json", 0, 0);
    assert_int_equal(a.n_pairs, b.n_pairs);
    assert_int_equal(a.n_tokens, b.n_tokens);
    assert_memory_equal(a.tokens, b.tokens, a.n_tokens * sizeof(int32_t));
    dpoc_dataset_free(&a);
    dpoc_dataset_free(&b);
}

static const char *write_temp(const char *name, const char *text) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", make_temp_dir(), name);
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
    return path;
}

/* each bad record stops the load naming file:line and the reason */
static void test_bad_records(void **state) {
    (void)state;
    const char *ok = "{\"prompt\": \"Hi\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n";
    struct {
        const char *line, *reason;
    } cases[] = {
        {"{\"prompt\": \"Hi\", \"chosen\": \" yes\"\n", "malformed JSON"},
        {"{\"prompt\": \"Hi\", \"chosen\": \" yes\"}\n", "missing key 'rejected'"},
        {"{\"prompt\": \"Hi\", \"chosen\": 3, \"rejected\": \" no\"}\n", "'chosen' must be a string"},
        {"{\"prompt\": \"Hi\", \"chosen\": \"\", \"rejected\": \" no\"}\n", "'chosen' is empty"},
        {"{\"prompt\": \"Hi\", \"chosen\": \" same\", \"rejected\": \" same\"}\n", "identical"},
        {"{\"prompt\": \"Hi\", \"chosen\": \" \xff\xfe\", \"rejected\": \" no\"}\n", "UTF-8"},
        {"{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"chosen\": [{\"role\": \"bot\", \"content\": \"y\"}], "
         "\"rejected\": [{\"role\": \"assistant\", \"content\": \"z\"}]}\n",
         "unknown role 'bot'"},
        {"{\"chosen\": [{\"role\": \"user\", \"content\": \"a\"}], \"rejected\": [{\"role\": \"user\", \"content\": \"b\"}]}\n",
         "empty"},
    };
    dpoc_prefs_ctx ctx = {g_tok, g_kind, dpoc_tokenizer_vocab_size(g_tok)};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char text[1024];
        snprintf(text, sizeof text, "%s%s%s", ok, cases[i].line, ok);
        const char *path = write_temp("bad.jsonl", text);
        dpoc_dataset d;
        dpoc_err err;
        dpoc_dataset_opts o = {0, 0, 0};
        int rc = dpoc_dataset_load(&d, path, &ctx, &o, &err);
        if (rc != DPOC_EINPUT) fail_msg("case %zu (%s): status %d", i, cases[i].reason, rc);
        char where[600];
        snprintf(where, sizeof where, "%s:2", path);
        if (!strstr(err.msg, where) || !strstr(err.msg, cases[i].reason))
            fail_msg("case %zu: message '%s' lacks '%s' or '%s'", i, err.msg, where, cases[i].reason);
        /* skipped and counted instead, the two good rows kept */
        o.skip_bad_records = 1;
        if (dpoc_dataset_load(&d, path, &ctx, &o, &err)) fail_msg("case %zu with skip: %s", i, err.msg);
        assert_int_equal(d.n_pairs, 2);
        assert_int_equal(d.n_skipped_bad, 1);
        dpoc_dataset_free(&d);
    }
}

static int sh(const char *cmd) {
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* `dpoc tokenize --messages` prints the rendered chat and the ids TRL's prompt has */
static void check_cli_messages(const char *tokenizer) {
    const char *dir = make_temp_dir();
    char cmd[2048], path[512];
    snprintf(path, sizeof path, "%s/m.json", dir);
    FILE *f = fopen(path, "w");
    fputs("[{\"role\": \"user\", \"content\": \"What color is the sky?\"}]", f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "'%s' tokenize --tokenizer '%s' --messages '%s' --add-generation-prompt | tail -n 1 > '%s/ids'",
             DPOC_BIN, tokenizer, path, dir);
    assert_int_equal(sh(cmd), 0);
    snprintf(path, sizeof path, "%s/ids", dir);
    char *text = read_text_file(path, NULL);
    cJSON *exp = load_json_fixture("datasets/conversational_explicit.expected.json");
    const cJSON *want = cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(exp, "rows"), 0), "prompt_ids");
    int32_t got[256];
    size_t n = 0;
    for (char *p = text, *end; n < 256; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p) break;
        got[n++] = (int32_t)v;
    }
    same_ids(got, n, want, "tokenize --messages");
    free(text);
    cJSON_Delete(exp);
}

static void test_cli_messages(void **state) {
    (void)state;
    char tok[1024];
    snprintf(tok, sizeof tok, "%s", fixture_path("tokenizer/smollm2"));
    check_cli_messages(tok);
}

/* the same from the SmolLM2 GGUF's own metadata (tokenizer and chat template), when fetched */
static void test_cli_messages_gguf(void **state) {
    (void)state;
    char path[1024];
    const char *env = getenv("DPOC_MODEL_GGUF"), *home = getenv("HOME");
    if (env) snprintf(path, sizeof path, "%s", env);
    else snprintf(path, sizeof path, "%s/.cache/dpoc/models/SmolLM2-135M-Instruct.Q4_1.gguf", home ? home : "");
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("SKIPPED test_cli_messages_gguf: %s absent (tools/fetch-model)\n", path);
        skip();
    }
    fclose(f);
    check_cli_messages(path);
}

static void make_bpe_model(const char *dir, size_t vocab);

/* data-check reports what TRL keeps: rows read, kept, dropped at max_length */
static void test_data_check(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char model[512], cmd[4096], out[600];
    snprintf(model, sizeof model, "%s/model", dir);
    mkdir(model, 0777);
    make_bpe_model(model, 49152);
    /* the SmolLM2 tokenizer, as in the fixture */
    snprintf(cmd, sizeof cmd, "cp '%s/tokenizer.json' '%s/tokenizer_config.json' '%s/'", fixture_path("tokenizer/smollm2"),
             fixture_path("tokenizer/smollm2"), model);
    assert_int_equal(sh(cmd), 0);
    cJSON *exp = load_json_fixture("datasets/standard_explicit.expected.json");
    const int rows = cJSON_GetArraySize(cJSON_GetObjectItem(exp, "rows"));
    const int kept = cJSON_GetArraySize(cJSON_GetObjectItem(exp, "kept_at_max_length"));
    const int max_length = (int)cJSON_GetObjectItem(exp, "max_length")->valuedouble;
    cJSON_Delete(exp);
    char train[600];
    snprintf(train, sizeof train, "%s", fixture_path("datasets/standard_explicit.jsonl"));
    snprintf(out, sizeof out, "%s/report.txt", dir);
    snprintf(cmd, sizeof cmd,
             "cd '%s' && '%s' data-check --config configs/tiny-llama.json --set model_name_or_path=%s "
             "--set train_file=%s --set max_length=%d > '%s' 2>&1",
             DPOC_SOURCE_DIR, DPOC_BIN, model, train, max_length, out);
    assert_int_equal(sh(cmd), 0);
    char *text = read_text_file(out, NULL), want[256];
    snprintf(want, sizeof want, "%d rows read, %d pairs kept", rows, kept);
    if (!strstr(text, want)) fail_msg("report lacks '%s':\n%s", want, text);
    snprintf(want, sizeof want, "dropped (prompt >= max_length %d): %d", max_length, rows - kept);
    if (!strstr(text, want)) fail_msg("report lacks '%s':\n%s", want, text);
    if (!strstr(text, "p50")) fail_msg("report lacks percentiles:\n%s", text);
    free(text);
}

/* Writes a random Llama with the small GPT-2-style tokenizer's vocabulary, so text
 * data sets can be trained end to end (behaviour, not numbers: those are checked
 * against TRL on the fixtures above and in test_dpo). */
static void make_bpe_model(const char *dir, size_t vocab) {
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fprintf(f,
            "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"vocab_size\": %zu, "
            "\"hidden_size\": 32, \"intermediate_size\": 64, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "
            "\"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, "
            "\"max_position_embeddings\": 512, \"tie_word_embeddings\": true, \"hidden_act\": \"silu\"}\n",
            vocab);
    fclose(f);
    dpoc_model_config mc;
    dpoc_model m;
    dpoc_err err;
    if (dpoc_hf_config_read(&mc, path, &err) || dpoc_model_init(&m, &mc, &err)) fail_msg("%s", err.msg);
    uint64_t st = 12345;
    for (size_t i = 0; i < m.numel; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        m.params[i] = (float)((double)(st >> 11) / 9007199254740992.0 - 0.5) * 0.2f;
    }
    for (size_t i = 0; i < m.n_tensors; i++)
        if (strstr(m.info[i].name, "norm"))
            for (size_t k = 0; k < m.info[i].numel; k++) m.params[m.info[i].offset + k] = 1.0f;
    if (dpoc_model_save(&m, dir, NULL, &err)) fail_msg("%s", err.msg);
    dpoc_model_free(&m);
    snprintf(path, sizeof path, "cp '%s/tokenizer.json' '%s/tokenizer_config.json' '%s/'",
             fixture_path("tokenizer/small-bl"), fixture_path("tokenizer/small-bl"), dir);
    if (sh(path) != 0) fail_msg("cannot copy the tokenizer");
}

/* `dpoc train` accepts every format end to end, and the loss goes down */
static void test_train_each_format(void **state) {
    (void)state;
    const char *dir = make_temp_dir();
    char model[512];
    snprintf(model, sizeof model, "%s/model", dir);
    mkdir(model, 0777);
    dpoc_tokenizer *tok;
    dpoc_err err;
    if (dpoc_tokenizer_load(&tok, fixture_path("tokenizer/small-bl"), &err)) fail_msg("%s", err.msg);
    make_bpe_model(model, dpoc_tokenizer_vocab_size(tok));
    dpoc_tokenizer_free(tok);
    const char *files[] = {"standard_explicit.jsonl", "standard_implicit.jsonl", "conversational_explicit.jsonl",
                           "conversational_implicit.jsonl", "standard_explicit_array.json"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char cmd[4096], out[512];
        snprintf(out, sizeof out, "%s/run%zu", dir, i);
        char train[600];
        snprintf(train, sizeof train, "%s/%s", fixture_path("datasets"), files[i]);
        snprintf(cmd, sizeof cmd,
                 "cd '%s' && '%s' train --config configs/tiny-llama.json --set model_name_or_path=%s "
                 "--set ref_model_name_or_path= --set train_file=%s --set chat_template=chatml --set max_length=64 "
                 "--set output_dir=%s --set max_steps=8 --set per_device_train_batch_size=2 "
                 "--set gradient_accumulation_steps=1 --set learning_rate=0.01 --set max_grad_norm=1.0 > %s.log 2>&1",
                 DPOC_SOURCE_DIR, DPOC_BIN, model, train, out, out);
        int rc = sh(cmd);
        char logp[600];
        snprintf(logp, sizeof logp, "%s.log", out);
        if (rc != 0) {
            static char shown[8192];
            char *t = read_text_file(logp, NULL);
            snprintf(shown, sizeof shown, "%s", t ? t : "");
            free(t);
            fail_msg("%s: dpoc train exited %d:\n%s", files[i], rc, shown);
        }
        snprintf(logp, sizeof logp, "%s/metrics.jsonl", out);
        char *text = read_text_file(logp, NULL);
        double first = -1, last = -1;
        char *save = NULL;
        for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            cJSON *o = cJSON_Parse(line);
            double v = cJSON_GetObjectItem(o, "loss")->valuedouble;
            if (first < 0) first = v;
            last = v;
            cJSON_Delete(o);
        }
        free(text);
        if (!(last < first)) fail_msg("%s: the loss did not go down (%g -> %g)", files[i], first, last);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_standard_explicit),       cmocka_unit_test(test_standard_implicit),
        cmocka_unit_test(test_conversational_explicit), cmocka_unit_test(test_conversational_implicit),
        cmocka_unit_test(test_json_array),              cmocka_unit_test(test_bad_records),
        cmocka_unit_test(test_cli_messages),            cmocka_unit_test(test_train_each_format),
        cmocka_unit_test(test_data_check),              cmocka_unit_test(test_cli_messages_gguf),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
