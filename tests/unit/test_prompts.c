/* Prompt lists: the three accepted forms, trimming, and errors naming file:line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "dpoc/prompts.h"

static void parse_ok(const char *text, size_t want_n, const char *const *want) {
    char **p = NULL;
    size_t n = 0;
    dpoc_err err;
    int rc = dpoc_prompts_parse(text, strlen(text), "t", &p, &n, &err);
    if (rc) print_message("unexpected error: %s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(n, want_n);
    for (size_t i = 0; i < n; i++) assert_string_equal(p[i], want[i]);
    dpoc_prompts_free(p, n);
}

static void parse_err(const char *text, const char *want_msg) {
    char **p = NULL;
    size_t n = 0;
    dpoc_err err;
    assert_int_equal(dpoc_prompts_parse(text, strlen(text), "f.txt", &p, &n, &err), DPOC_EINPUT);
    if (!strstr(err.msg, want_msg)) fail_msg("message '%s' lacks '%s'", err.msg, want_msg);
    assert_null(p);
}

static void test_forms(void **state) {
    (void)state;
    const char *const two[] = {"What is your name?", "Who are you?"};
    parse_ok("What is your name?\nWho are you?\n", 2, two);
    parse_ok("  What is your name?  \r\n\n\t\nWho are you?", 2, two);                 /* trimmed, blank lines skipped */
    parse_ok("[\"What is your name?\", \"Who are you?\"]", 2, two);                   /* JSON array */
    parse_ok("{\"prompt\": \"What is your name?\"}\n\"Who are you?\"\n", 2, two);   /* JSONL */
    const char *const esc[] = {"line\nbreak \xc3\xa9"};
    parse_ok("{\"prompt\": \"line\\nbreak \\u00e9\", \"other\": 1}", 1, esc);
}

static void test_errors(void **state) {
    (void)state;
    parse_err("", "no prompts");
    parse_err("\n  \n", "no prompts");
    parse_err("ok\n{\"prompt\": 3}\n", "f.txt:2");
    parse_err("ok\n{\"text\": \"x\"}\n", "f.txt:2");
    parse_err("[\"a\", 1]", "element 1");
    parse_err("[\"a\", \"\"]", "element 1");
    parse_err("[\"a\"", "not a JSON array");
    char **p = NULL;
    size_t n = 0;
    dpoc_err err;
    static const char nul_line[] = "ok\n\0x\n"; /* found by fuzz_prompts: a NUL made an empty prompt */
    assert_int_equal(dpoc_prompts_parse(nul_line, sizeof nul_line - 1, "f.txt", &p, &n, &err), DPOC_EINPUT);
    if (!strstr(err.msg, "f.txt:2: the line holds a NUL byte")) fail_msg("message '%s'", err.msg);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_forms), cmocka_unit_test(test_errors)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
