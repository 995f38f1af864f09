/* `dpoc tokenize`: encode text or a JSONL file of texts with a Hugging Face
 * tokenizer (tokenizer.json), or decode ids, with the tokenizer dpoc trains
 * with. Exit codes: 0 ok, 2 bad input (message names file:line), others as
 * dpoc_status. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "dpoc/err.h"
#include "dpoc/chat.h"
#include "dpoc/gguf.h"
#include "dpoc/tokenizer.h"
#include "dpoc/tokenizer_source.h"
#include "core/fileutil.h"

static void tokenize_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc tokenize --tokenizer PATH (--text STR | --jsonl FILE | --decode \"ID ID ...\") [options]\n\n"
            "PATH is a directory with tokenizer.json (and tokenizer_config.json) or a tokenizer.json file.\n\n"
            "  --text STR                 print the ids of STR, space-separated\n"
            "  --jsonl FILE               read {\"text\": ...} per line, write {\"ids\": [...]} per line\n"
            "  --decode \"ID ID ...\"       print the text of the ids\n"
            "  --add-special-tokens       apply the post-processor (e.g. a BOS), as encode(add_special_tokens=True)\n"
            "  --skip-special-tokens      with --decode: leave special tokens out\n"
            "  --messages FILE.json       render a chat (a JSON list of {role, content}) with the chat template,\n"
            "                             print the text, then its ids\n"
            "  --add-generation-prompt    with --messages\n"
            "  --chat-template NAME       chatml, qwen2.5, smollm2 or llama3 (default: recognise the tokenizer's)\n");
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static int print_ids(FILE *out, const dpoc_ids *ids) {
    for (size_t i = 0; i < ids->n; i++)
        if (fprintf(out, i ? " %d" : "%d", ids->ids[i]) < 0) return DPOC_EIO;
    return fputc('\n', out) == EOF ? DPOC_EIO : 0;
}

/* 1 if a JSON string literal in line has an escaped U+0000, which cJSON's C strings would cut */
static int has_escaped_nul(const char *line) {
    for (const char *p = line; *p; p++)
        if (*p == '\\') {
            if (p[1] == 'u' && p[2] == '0' && p[3] == '0' && p[4] == '0' && p[5] == '0') return 1;
            if (p[1]) p++;
        }
    return 0;
}

static int run_jsonl(dpoc_tokenizer *tok, const char *path, int special, dpoc_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return dpoc_errf(err, DPOC_EINPUT, "%s: cannot open", path);
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    size_t lineno = 0;
    int rc = 0;
    dpoc_ids ids = {0};
    while (!rc && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        cJSON *o = cJSON_ParseWithLength(line, (size_t)len);
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(o, "text");
        if (!cJSON_IsObject(o)) rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: not a JSON object", path, lineno);
        else if (!cJSON_IsString(text))
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: \"text\" is missing or not a string", path, lineno);
        else if (has_escaped_nul(line))
            rc = dpoc_errf(err, DPOC_EINPUT, "%s:%zu: text contains U+0000, which is not supported", path, lineno);
        if (!rc) {
            ids.n = 0;
            rc = dpoc_tokenizer_encode(tok, text->valuestring, strlen(text->valuestring), special, &ids, err);
            if (rc) dpoc_err_prefix(err, "%s:%zu", path, lineno);
        }
        if (!rc) {
            if (fputs("{\"ids\": [", stdout) == EOF) rc = DPOC_EIO;
            for (size_t i = 0; !rc && i < ids.n; i++)
                if (printf(i ? ", %d" : "%d", ids.ids[i]) < 0) rc = DPOC_EIO;
            if (!rc && fputs("]}\n", stdout) == EOF) rc = DPOC_EIO;
            if (rc) dpoc_errf(err, rc, "writing to stdout failed");
        }
        cJSON_Delete(o);
    }
    if (!rc && ferror(f)) rc = dpoc_errf(err, DPOC_EIO, "%s: read error", path);
    free(line);
    fclose(f);
    dpoc_ids_free(&ids);
    return rc;
}

static int run_decode(dpoc_tokenizer *tok, const char *list, int skip, dpoc_err *err) {
    dpoc_ids ids = {0};
    int rc = 0;
    const char *p = list;
    while (!rc && *p) {
        if (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n' || *p == '[' || *p == ']') {
            p++;
            continue;
        }
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX)
            rc = dpoc_errf(err, DPOC_EINPUT, "--decode: '%.20s' is not a token id", p);
        else rc = dpoc_ids_push(&ids, (int32_t)v, err);
        p = end == p ? p + 1 : end;
    }
    char *text = NULL;
    size_t len = 0;
    if (!rc) rc = dpoc_tokenizer_decode(tok, ids.ids, ids.n, skip, &text, &len, err);
    if (!rc && (fwrite(text, 1, len, stdout) != len || fputc('\n', stdout) == EOF))
        rc = dpoc_errf(err, DPOC_EIO, "writing to stdout failed");
    free(text);
    dpoc_ids_free(&ids);
    return rc;
}

/* --messages: render with the chat template (named, or recognised from the
 * tokenizer's chat_template) and encode without special tokens, as
 * apply_chat_template(tokenize=True) does. */
static int run_messages(dpoc_tokenizer *tok, const char *path, const char *chat_name, int gen_prompt,
                        dpoc_err *err) {
    dpoc_chat_kind kind;
    if (chat_name) {
        int k = dpoc_chat_kind_from_name(chat_name);
        if (k < 0) return dpoc_errf(err, DPOC_EINPUT, "--chat-template '%s': not one of chatml, qwen2.5, smollm2, llama3",
                                    chat_name);
        kind = (dpoc_chat_kind)k;
    } else if (!dpoc_tokenizer_chat_template(tok)) {
        return dpoc_errf(err, DPOC_EINPUT, "the tokenizer has no chat_template; pass --chat-template NAME");
    } else {
        DPOC_TRY(dpoc_chat_detect(dpoc_tokenizer_chat_template(tok), &kind, err));
    }
    char *json = NULL;
    DPOC_TRY(dpoc_read_file(path, &json, NULL, err));
    cJSON *arr = cJSON_Parse(json);
    free(json);
    if (!cJSON_IsArray(arr)) {
        cJSON_Delete(arr);
        return dpoc_errf(err, DPOC_EINPUT, "%s: expected a JSON list of {\"role\", \"content\"} messages", path);
    }
    size_t n = (size_t)cJSON_GetArraySize(arr), i = 0;
    dpoc_chat_msg *msgs = dpoc_malloc((n ? n : 1) * sizeof *msgs, "messages", err);
    int rc = msgs ? 0 : DPOC_ENOMEM;
    const cJSON *m;
    cJSON_ArrayForEach(m, arr) {
        if (rc) break;
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsString(role) || !cJSON_IsString(content))
            rc = dpoc_errf(err, DPOC_EINPUT, "%s: message %zu needs string 'role' and 'content'", path, i);
        else msgs[i++] = (dpoc_chat_msg){role->valuestring, content->valuestring};
    }
    char *text = NULL;
    size_t len = 0;
    if (!rc) rc = dpoc_chat_render(kind, msgs, n, gen_prompt, dpoc_tokenizer_bos_token(tok), &text, &len, err);
    dpoc_ids ids = {0};
    if (!rc) rc = dpoc_tokenizer_encode(tok, text, len, 0, &ids, err);
    if (!rc && (fwrite(text, 1, len, stdout) != len || fputc('\n', stdout) == EOF || print_ids(stdout, &ids)))
        rc = dpoc_errf(err, DPOC_EIO, "writing to stdout failed");
    dpoc_ids_free(&ids);
    free(text);
    free(msgs);
    cJSON_Delete(arr);
    return rc;
}

int dpoc_cli_tokenize(int argc, char **argv) {
    const char *tok_path = NULL, *text = NULL, *jsonl = NULL, *decode = NULL, *messages = NULL;
    int special = 0, skip = 0, gen_prompt = 0;
    const char *chat_name = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            tokenize_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--tokenizer") && has_value) tok_path = argv[++i];
        else if (!strcmp(a, "--text") && has_value) text = argv[++i];
        else if (!strcmp(a, "--jsonl") && has_value) jsonl = argv[++i];
        else if (!strcmp(a, "--decode") && has_value) decode = argv[++i];
        else if (!strcmp(a, "--messages") && has_value) messages = argv[++i];
        else if (!strcmp(a, "--add-special-tokens")) special = 1;
        else if (!strcmp(a, "--skip-special-tokens")) skip = 1;
        else if (!strcmp(a, "--add-generation-prompt")) gen_prompt = 1;
        else if (!strcmp(a, "--chat-template") && has_value) chat_name = argv[++i];
        else {
            fprintf(stderr, "dpoc tokenize: unexpected argument '%s' (see dpoc tokenize --help)\n", a);
            return DPOC_EINPUT;
        }
    }
    int modes = !!text + !!jsonl + !!decode + !!messages;
    if (!tok_path || modes != 1) {
        fprintf(stderr, "dpoc tokenize: --tokenizer PATH and exactly one of --text, --jsonl, --decode, --messages "
                        "are required (see dpoc tokenize --help)\n");
        return DPOC_EINPUT;
    }
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_tokenizer *tok = NULL;
    dpoc_gguf *gguf = NULL; /* kept open while the tokenizer built from its metadata is used */
    int rc;
    if (ends_with(tok_path, ".gguf")) {
        dpoc_tokenizer_spec spec;
        rc = dpoc_gguf_open(&gguf, tok_path, &err);
        if (!rc) rc = dpoc_gguf_tokenizer_spec(gguf, &spec, &err);
        if (!rc) rc = dpoc_tokenizer_from_spec(&tok, &spec, &err);
    } else {
        rc = dpoc_tokenizer_load(&tok, tok_path, &err);
    }
    if (!rc) {
        if (text) {
            dpoc_ids ids = {0};
            rc = dpoc_tokenizer_encode(tok, text, strlen(text), special, &ids, &err);
            if (!rc && print_ids(stdout, &ids)) rc = dpoc_errf(&err, DPOC_EIO, "writing to stdout failed");
            dpoc_ids_free(&ids);
        } else if (jsonl) {
            rc = run_jsonl(tok, jsonl, special, &err);
        } else if (messages) {
            rc = run_messages(tok, messages, chat_name, gen_prompt, &err);
        } else {
            rc = run_decode(tok, decode, skip, &err);
        }
    }
    dpoc_tokenizer_free(tok);
    dpoc_gguf_close(gguf);
    if (!rc && fflush(stdout) != 0) rc = dpoc_errf(&err, DPOC_EIO, "writing to stdout failed");
    if (rc) fprintf(stderr, "dpoc tokenize: error: %s\n", err.msg);
    return rc;
}
