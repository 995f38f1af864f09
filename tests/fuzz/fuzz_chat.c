/* libFuzzer target: arbitrary bytes as a chat_template source to recognise and as
 * a conversation to render with every kind. Fields are separated by NUL bytes:
 * the first is the template source, each further one a message whose first byte
 * picks the role (system, user, assistant, or the rest of the field as a role of
 * its own) and whose remaining bytes are the content. Renderings must succeed or
 * fail with an input error, be NUL-terminated at the reported length, and contain
 * every content verbatim (except Llama 3, which trims it). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/chat.h"

#define FUZZ_MAX_MSGS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *copy = malloc(size + 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    copy[size] = '\0';

    dpoc_err err;
    dpoc_chat_kind kind;
    int rc = dpoc_chat_detect(copy, &kind, &err);
    if (rc != DPOC_OK && rc != DPOC_EINPUT) abort();
    if (rc == DPOC_OK && dpoc_chat_kind_from_name(dpoc_chat_kind_name(kind)) != (int)kind) abort();

    static const char *const roles[] = {"system", "user", "assistant"};
    dpoc_chat_msg msgs[FUZZ_MAX_MSGS];
    size_t n = 0;
    char *p = copy + strlen(copy);
    while (p < copy + size && n < FUZZ_MAX_MSGS) {
        char *field = p + 1; /* skip the NUL that ended the previous field */
        size_t flen = strlen(field);
        if (flen == 0) {
            p = field;
            continue;
        }
        unsigned sel = (unsigned char)field[0] % 4;
        msgs[n].role = sel < 3 ? roles[sel] : field + 1;
        msgs[n].content = sel < 3 ? field + 1 : "";
        n++;
        p = field + flen;
    }

    for (int k = 0; k < 4; k++)
        for (int gen = 0; gen < 2; gen++) {
            char *out = NULL;
            size_t len = 0;
            rc = dpoc_chat_render((dpoc_chat_kind)k, msgs, n, gen, "<|begin_of_text|>", &out, &len, &err);
            if (rc != DPOC_OK) {
                if (rc != DPOC_EINPUT || out || len) abort();
                continue;
            }
            if (!out || strlen(out) != len) abort();
            if (k != DPOC_CHAT_LLAMA3)
                for (size_t i = 0; i < n; i++)
                    if (!strstr(out, msgs[i].content)) abort();
            free(out);
        }
    free(copy);
    return 0;
}
