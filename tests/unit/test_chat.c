/* Chat templates: every case of tests/fixtures/chat/cases.json (rendered by
 * transformers' apply_chat_template from the real Jinja sources, made by
 * tools/make_chat_fixtures.py) is detected from its .jinja file and rendered by
 * dpoc byte for byte; every other template TRL ships is refused unless it renders
 * exactly like the kind it is taken for; detection errors, name mapping, unknown
 * roles and bad arguments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/chat.h"
#include "testutil.h"

static const char CHOICES[] = "chatml, qwen2.5, smollm2, llama3";

/* ---- helpers ---- */

static char *read_fixture(const char *rel) {
    const char *path = fixture_path(rel);
    char *text = read_text_file(path, NULL);
    if (!text) fail_msg("cannot read fixture %s", path);
    return text;
}

/* Printable excerpt of p[0..n) with C escapes, for failure messages. */
static void escape(const char *p, size_t n, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\n') o += (size_t)snprintf(out + o, cap - o, "\\n");
        else if (c == '\\') o += (size_t)snprintf(out + o, cap - o, "\\\\");
        else if (c < 0x20 || c == 0x7f) o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
        else out[o++] = (char)c;
    }
    out[o] = '\0';
}

static void expect_bytes(const char *got, size_t got_len, const char *want, size_t want_len, const char *what) {
    if (got_len == want_len && memcmp(got, want, want_len) == 0) return;
    size_t i = 0;
    while (i < got_len && i < want_len && got[i] == want[i]) i++;
    size_t from = i > 40 ? i - 40 : 0;
    char g[512], w[512];
    escape(got + from, (got_len - from) < 100 ? got_len - from : 100, g, sizeof g);
    escape(want + from, (want_len - from) < 100 ? want_len - from : 100, w, sizeof w);
    fail_msg("%s: rendering differs at byte %zu (got %zu bytes, expected %zu)\n  got:      ...%s\n  expected: ...%s",
             what, i, got_len, want_len, g, w);
}

static void expect_unrecognised(const char *jinja, const char *what) {
    dpoc_chat_kind kind = DPOC_CHAT_CHATML;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_chat_detect(jinja, &kind, &err);
    if (rc != DPOC_EINPUT)
        fail_msg("%s: detect returned %d (kind %s), expected an error", what, rc, dpoc_chat_kind_name(kind));
    if (!strstr(err.msg, "unrecognised chat_template") || !strstr(err.msg, "config key chat_template") ||
        !strstr(err.msg, CHOICES))
        fail_msg("%s: message '%s' does not say how to choose a template", what, err.msg);
}

static void expect_kind(const char *jinja, dpoc_chat_kind want, const char *what) {
    dpoc_chat_kind kind;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_chat_detect(jinja, &kind, &err);
    if (rc) fail_msg("%s: detect failed (%d): %s", what, rc, err.msg);
    if (kind != want) fail_msg("%s: detected %s, expected %s", what, dpoc_chat_kind_name(kind), dpoc_chat_kind_name(want));
}

/* s with every occurrence of from replaced by to; caller frees. */
static char *replace_all(const char *s, const char *from, const char *to) {
    size_t fl = strlen(from), tl = strlen(to), count = 0;
    for (const char *p = s; (p = strstr(p, from)) != NULL; p += fl) count++;
    if (count == 0) fail_msg("replace_all: '%s' not found", from);
    char *out = malloc(strlen(s) + count * tl + 1);
    assert_non_null(out);
    char *o = out;
    const char *p = s, *q;
    while ((q = strstr(p, from)) != NULL) {
        memcpy(o, p, (size_t)(q - p));
        o += q - p;
        memcpy(o, to, tl);
        o += tl;
        p = q + fl;
    }
    strcpy(o, p);
    return out;
}

static char *concat(const char *a, const char *b) {
    char *out = malloc(strlen(a) + strlen(b) + 1);
    assert_non_null(out);
    strcpy(out, a);
    strcat(out, b);
    return out;
}

/* ---- the transformers references ---- */

static void test_cases_match_transformers(void **state) {
    (void)state;
    cJSON *doc = load_json_fixture("chat/cases.json");
    const cJSON *bos = cJSON_GetObjectItemCaseSensitive(doc, "bos_token");
    assert_true(cJSON_IsString(bos));
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(doc, "cases");
    assert_true(cJSON_IsArray(cases));

    char *jinja = NULL, *jinja_name = NULL;
    size_t n_cases = 0, per_kind[4] = {0}, gen_true = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const char *tname = cJSON_GetObjectItemCaseSensitive(c, "template")->valuestring;
        const char *kname = cJSON_GetObjectItemCaseSensitive(c, "kind")->valuestring;
        const char *conv = cJSON_GetObjectItemCaseSensitive(c, "conversation")->valuestring;
        int gen = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt"));
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages");
        const cJSON *expected = cJSON_GetObjectItemCaseSensitive(c, "expected");
        assert_true(cJSON_IsArray(msgs) && cJSON_IsString(expected));

        char what[256];
        snprintf(what, sizeof what, "template %s, conversation %s, add_generation_prompt=%d", tname, conv, gen);

        if (!jinja_name || strcmp(jinja_name, tname) != 0) { /* cases are grouped by template */
            free(jinja);
            free(jinja_name);
            char rel[256];
            snprintf(rel, sizeof rel, "chat/%s.jinja", tname);
            jinja = read_fixture(rel);
            jinja_name = strdup(tname);
            assert_non_null(jinja_name);
        }
        int want = dpoc_chat_kind_from_name(kname);
        assert_true(want >= 0);
        expect_kind(jinja, (dpoc_chat_kind)want, what);

        size_t n = (size_t)cJSON_GetArraySize(msgs), i = 0;
        dpoc_chat_msg *m = calloc(n ? n : 1, sizeof *m);
        assert_non_null(m);
        const cJSON *it;
        cJSON_ArrayForEach(it, msgs) {
            m[i].role = cJSON_GetObjectItemCaseSensitive(it, "role")->valuestring;
            m[i].content = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
            i++;
        }
        char *out = NULL;
        size_t len = 0;
        dpoc_err err;
        dpoc_err_clear(&err);
        int rc = dpoc_chat_render((dpoc_chat_kind)want, m, n, gen, bos->valuestring, &out, &len, &err);
        if (rc) fail_msg("%s: render failed (%d): %s", what, rc, err.msg);
        assert_int_equal(strlen(out), len);
        expect_bytes(out, len, expected->valuestring, strlen(expected->valuestring), what);
        free(out);
        free(m);
        n_cases++;
        per_kind[want]++;
        gen_true += (size_t)gen;
    }
    free(jinja);
    free(jinja_name);
    cJSON_Delete(doc);
    /* The fixture must really cover every kind, both ways. */
    assert_true(n_cases >= 200);
    for (int k = 0; k < 4; k++) assert_true(per_kind[k] >= 40);
    assert_int_equal(gen_true * 2, n_cases);
}

/* Every other template TRL 1.16 ships: refused, unless it renders exactly like a
 * kind on every fixture conversation ("renders_as"), when taking it for that kind
 * is also right. */
static void test_other_templates_refused(void **state) {
    (void)state;
    cJSON *doc = load_json_fixture("chat/cases.json");
    const cJSON *reject = cJSON_GetObjectItemCaseSensitive(doc, "reject");
    assert_true(cJSON_IsObject(reject));
    size_t n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, reject) {
        char rel[512];
        snprintf(rel, sizeof rel, "chat/reject/%s", it->string);
        char *jinja = read_fixture(rel);
        const cJSON *as = cJSON_GetObjectItemCaseSensitive(it, "renders_as");
        if (cJSON_IsString(as)) {
            dpoc_chat_kind kind;
            dpoc_err err;
            if (dpoc_chat_detect(jinja, &kind, &err) == DPOC_OK)
                assert_string_equal(dpoc_chat_kind_name(kind), as->valuestring);
        } else {
            expect_unrecognised(jinja, rel);
        }
        free(jinja);
        n++;
    }
    assert_true(n >= 30);
    cJSON_Delete(doc);
}

/* Qwen3's template (thinking tags) from the shared tokenizer files, when present. */
static void test_qwen3_shared_template_refused(void **state) {
    (void)state;
    char *text = read_text_file(DPOC_SOURCE_DIR "/../shared/tokenizers/qwen3/tokenizer_config.json", NULL);
    if (!text) skip();
    cJSON *cfg = cJSON_Parse(text);
    free(text);
    assert_non_null(cfg);
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    assert_true(cJSON_IsString(tpl));
    expect_unrecognised(tpl->valuestring, "Qwen3 tokenizer_config.json");
    cJSON_Delete(cfg);
}

/* ---- detection ---- */

static void test_detect_reformatted(void **state) {
    (void)state;
    /* Other whitespace, quoting, line endings or attribute syntax do not matter. */
    char *chatml = read_fixture("chat/chatml.jinja");
    char *a = replace_all(chatml, "{{'", "{{- '");
    char *b = replace_all(a, "'}}", "' -}}");
    expect_kind(b, DPOC_CHAT_CHATML, "ChatML with spaces and whitespace control");
    char *c = replace_all(chatml, "message['role']", "message.role");
    expect_kind(c, DPOC_CHAT_CHATML, "ChatML with message.role");
    free(a);
    free(b);
    free(c);

    char *qwen = read_fixture("chat/qwen2.5.jinja");
    a = replace_all(qwen, "\n", "\r\n");
    expect_kind(a, DPOC_CHAT_QWEN25, "Qwen2.5 with CRLF line endings");
    free(a);

    char *smol = read_fixture("chat/smollm2.jinja");
    a = replace_all(smol, "message['content']", "message.content");
    expect_kind(a, DPOC_CHAT_SMOLLM2, "SmolLM2 with message.content");
    free(a);

    char *llama = read_fixture("chat/llama3.jinja");
    a = replace_all(llama, "{% ", "{%- ");
    expect_kind(a, DPOC_CHAT_LLAMA3, "Llama 3 with whitespace control");
    free(a);

    /* ---- look-alikes that render differently: refused ---- */
    /* Qwen2.5 base / Qwen2-Instruct default system message. */
    a = replace_all(qwen, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                    "You are a helpful assistant.");
    expect_unrecognised(a, "Qwen2.5 base template");
    free(a);
    expect_unrecognised("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
                        "Qwen2-Instruct template");
    /* ChatML without an add_generation_prompt block (transformers docs' short form). */
    expect_unrecognised("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}",
                        "ChatML without add_generation_prompt");
    /* ChatML with BOS, trimmed content, a thinking block. */
    a = concat("{{ bos_token }}", chatml);
    expect_unrecognised(a, "ChatML with bos_token");
    free(a);
    a = replace_all(chatml, "message['content']", "message['content'] | trim");
    expect_unrecognised(a, "ChatML with trimmed content");
    free(a);
    a = concat(qwen, "{{ '<think>\n' }}");
    expect_unrecognised(a, "Qwen2.5 with a thinking block");
    free(a);
    a = concat(qwen, smol);
    expect_unrecognised(a, "both default system messages");
    free(a);
    a = concat(chatml, llama);
    expect_unrecognised(a, "ChatML and Llama 3 markers");
    free(a);
    /* Llama 3 whose assistant header does not depend on add_generation_prompt. */
    a = replace_all(llama, "{% if add_generation_prompt %}", "{% if true %}");
    expect_unrecognised(a, "Llama 3 with an unconditional assistant header");
    free(a);
    a = replace_all(llama, "| trim", "");
    expect_unrecognised(a, "Llama 3 without trim");
    free(a);
    a = concat("{%- set date_string = \"26 Jul 2024\" %}", llama);
    expect_unrecognised(a, "Llama 3.1-style dated header");
    free(a);

    expect_unrecognised(NULL, "NULL template");
    expect_unrecognised("", "empty template");
    expect_unrecognised("{% for message in messages %}{{ message['content'] }}{% endfor %}", "no markers");

    dpoc_err err;
    assert_int_equal(dpoc_chat_detect(chatml, NULL, &err), DPOC_EINTERNAL);
    /* err may be NULL */
    dpoc_chat_kind kind;
    assert_int_equal(dpoc_chat_detect("nothing", &kind, NULL), DPOC_EINPUT);
    free(chatml);
    free(qwen);
    free(smol);
    free(llama);
}

static void test_names(void **state) {
    (void)state;
    const char *names[] = {"chatml", "qwen2.5", "smollm2", "llama3"};
    const dpoc_chat_kind kinds[] = {DPOC_CHAT_CHATML, DPOC_CHAT_QWEN25, DPOC_CHAT_SMOLLM2, DPOC_CHAT_LLAMA3};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(dpoc_chat_kind_from_name(names[i]), (int)kinds[i]);
        assert_string_equal(dpoc_chat_kind_name(kinds[i]), names[i]);
    }
    const char *bad[] = {"", "ChatML", "qwen2_5", "qwen25", "llama-3", "qwen2.5 ", "smollm", "llama3.1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) assert_int_equal(dpoc_chat_kind_from_name(bad[i]), -1);
    assert_int_equal(dpoc_chat_kind_from_name(NULL), -1);
    assert_string_equal(dpoc_chat_kind_name((dpoc_chat_kind)42), "unknown");
}

/* ---- rendering errors ---- */

static void expect_render_error(dpoc_chat_kind kind, const dpoc_chat_msg *m, size_t n, const char *bos, int code,
                                const char *needle) {
    char *out = (char *)"sentinel";
    size_t len = 7;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_chat_render(kind, m, n, 1, bos, &out, &len, &err);
    if (rc != code) fail_msg("render (%s): status %d, expected %d ('%s')", dpoc_chat_kind_name(kind), rc, code, err.msg);
    if (!strstr(err.msg, needle)) fail_msg("message '%s' does not mention '%s'", err.msg, needle);
    assert_null(out);
    assert_int_equal(len, 0);
}

static void test_unknown_role(void **state) {
    (void)state;
    const char *roles[] = {"tool", "developer", "User", "", "ipython"};
    for (int k = 0; k < 4; k++)
        for (size_t r = 0; r < sizeof roles / sizeof roles[0]; r++) {
            dpoc_chat_msg m[3] = {{"user", "hi"}, {"assistant", "hello"}, {roles[r], "x"}};
            char needle[64];
            snprintf(needle, sizeof needle, "unknown role '%s'", roles[r]);
            expect_render_error((dpoc_chat_kind)k, m, 3, "<s>", DPOC_EINPUT, needle);
            expect_render_error((dpoc_chat_kind)k, m, 3, "<s>", DPOC_EINPUT, "message 2");
            dpoc_chat_msg first[1] = {{roles[r], "x"}};
            expect_render_error((dpoc_chat_kind)k, first, 1, "<s>", DPOC_EINPUT, needle);
        }
}

static void test_bad_arguments(void **state) {
    (void)state;
    dpoc_chat_msg ok[1] = {{"user", "hi"}};
    for (int k = 0; k < 4; k++) {
        expect_render_error((dpoc_chat_kind)k, ok, 0, "<s>", DPOC_EINPUT, "empty conversation");
        expect_render_error((dpoc_chat_kind)k, NULL, 2, "<s>", DPOC_EINPUT, "empty conversation");
        dpoc_chat_msg no_role[2] = {{"user", "a"}, {NULL, "b"}};
        expect_render_error((dpoc_chat_kind)k, no_role, 2, "<s>", DPOC_EINPUT, "message 1 has no role");
        dpoc_chat_msg no_content[1] = {{"system", NULL}};
        expect_render_error((dpoc_chat_kind)k, no_content, 1, "<s>", DPOC_EINPUT, "has no content");
    }
    expect_render_error(DPOC_CHAT_LLAMA3, ok, 1, NULL, DPOC_EINPUT, "bos_token");
    expect_render_error((dpoc_chat_kind)7, ok, 1, "<s>", DPOC_EINTERNAL, "kind");
    dpoc_err err;
    size_t len;
    assert_int_equal(dpoc_chat_render(DPOC_CHAT_CHATML, ok, 1, 0, NULL, NULL, &len, &err), DPOC_EINTERNAL);

    /* len may be NULL; bos_token is ignored by the templates that do not print it. */
    char *out = NULL;
    assert_int_equal(dpoc_chat_render(DPOC_CHAT_CHATML, ok, 1, 0, "<s>", &out, NULL, &err), DPOC_OK);
    assert_string_equal(out, "<|im_start|>user\nhi<|im_end|>\n");
    free(out);
}

/* Llama 3's trim on bytes that are not valid UTF-8 (transformers only ever sees
 * valid text): malformed or overlong sequences are not whitespace, and nothing is
 * read out of bounds. Valid whitespace of every kind is covered by the fixtures. */
static void test_trim_malformed_utf8(void **state) {
    (void)state;
    static const struct {
        const char *content, *trimmed;
    } cases[] = {
        {"\xe2\x80", "\xe2\x80"},                       /* U+2000 cut short */
        {"\x80\x80", "\x80\x80"},                       /* lone continuation bytes */
        {"\xc2", "\xc2"},                               /* lone lead byte */
        {"\xc0\xa0x\xc0\xa0", "\xc0\xa0x\xc0\xa0"},     /* overlong U+0020 */
        {"\xe0\x80\xa0y", "\xe0\x80\xa0y"},             /* overlong U+0020, 3 bytes */
        {" \xe3\x80\x80z\xe3\x80\x80 ", "z"},           /* U+3000 around */
        {"\xe2\x80\x8bq\xe2\x80\x8b", "\xe2\x80\x8bq\xe2\x80\x8b"}, /* U+200B is not whitespace */
        {"\xf0\x9f\x99\x82 ", "\xf0\x9f\x99\x82"},      /* emoji then space */
        {" \t\n", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dpoc_chat_msg m[1] = {{"user", cases[i].content}};
        char *out = NULL;
        size_t len = 0;
        dpoc_err err;
        assert_int_equal(dpoc_chat_render(DPOC_CHAT_LLAMA3, m, 1, 0, "<B>", &out, &len, &err), DPOC_OK);
        char want[256];
        snprintf(want, sizeof want, "<B><|start_header_id|>user<|end_header_id|>\n\n%s<|eot_id|>", cases[i].trimmed);
        char what[32];
        snprintf(what, sizeof what, "trim case %zu", i);
        expect_bytes(out, len, want, strlen(want), what);
        free(out);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cases_match_transformers),
        cmocka_unit_test(test_other_templates_refused),
        cmocka_unit_test(test_qwen3_shared_template_refused),
        cmocka_unit_test(test_detect_reformatted),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_unknown_role),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_trim_malformed_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
