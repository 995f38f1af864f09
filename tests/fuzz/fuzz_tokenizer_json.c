/* libFuzzer target: arbitrary bytes as tokenizer.json. Whatever loads must encode
 * and decode without crashing, and every id it produces must map back to a token. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/tokenizer.h"
#include "text/tokenizer_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dpoc_tokenizer *tok = NULL;
    dpoc_err err;
    if (dpoc_tokenizer_load_json_text(&tok, (const char *)data, size, NULL, 0, "fuzz", &err) != 0) {
        if (tok) abort(); /* a failed load leaves nothing behind */
        return 0;
    }
    static const char *texts[] = {"", "Hello world", "  a\tb\n\nc  ", "123 4567", "I'M don'T",
                                  "caf\xc3\xa9 e\xcc\x81", "\xe4\xbd\xa0\xe5\xa5\xbd", "<s></s><|im_end|>"};
    dpoc_ids ids = {0};
    for (size_t t = 0; t < sizeof texts / sizeof *texts; t++)
        for (int special = 0; special < 2; special++) {
            ids.n = 0;
            if (dpoc_tokenizer_encode(tok, texts[t], strlen(texts[t]), special, &ids, &err) != 0) continue;
            char *out = NULL;
            size_t len = 0;
            if (dpoc_tokenizer_decode(tok, ids.ids, ids.n, special, &out, &len, &err) == 0) {
                if (!out || out[len] != '\0') abort();
                free(out);
            }
        }
    dpoc_ids_free(&ids);
    (void)dpoc_tokenizer_vocab_size(tok);
    dpoc_tokenizer_free(tok);
    return 0;
}
