/* libFuzzer target: arbitrary bytes encoded with the small GPT-2-style fixture
 * tokenizers (tests/fixtures/tokenizer/). Invalid UTF-8 must be refused; valid
 * text must encode, and with small-bl (byte-level, no normalizer) decode back to
 * exactly the input. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/tokenizer.h"
#include "text/tokenizer_internal.h"

#ifndef DPOC_FIXTURES
#define DPOC_FIXTURES "tests/fixtures" /* the build defines it; this lets the target run from the repo root */
#endif

static dpoc_tokenizer *load(const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer/%s", DPOC_FIXTURES, name);
    dpoc_tokenizer *tok = NULL;
    dpoc_err err;
    if (dpoc_tokenizer_load(&tok, path, &err) != 0) {
        fprintf(stderr, "fuzz_tokenizer_encode: %s\n", err.msg);
        abort();
    }
    return tok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* loaded once: libFuzzer calls this function millions of times in one process */
    static dpoc_tokenizer *toks[3];
    if (!toks[0]) {
        toks[0] = load("small-bl");
        toks[1] = load("small-split");
        toks[2] = load("small-digits");
    }
    const char *text = (const char *)data;
    int valid = tok_utf8_valid(text, size);
    dpoc_ids ids = {0};
    dpoc_err err;
    for (int t = 0; t < 3; t++)
        for (int special = 0; special < 2; special++) {
            ids.n = 0;
            int rc = dpoc_tokenizer_encode(toks[t], text, size, special, &ids, &err);
            if ((rc == 0) != valid) abort();
            if (rc) continue;
            for (size_t i = 0; i < ids.n; i++)
                if (!dpoc_tokenizer_id_to_token(toks[t], ids.ids[i])) abort();
            char *out = NULL;
            size_t len = 0;
            if (dpoc_tokenizer_decode(toks[t], ids.ids, ids.n, 0, &out, &len, &err) != 0) abort();
            if (t == 0 && !special && (len != size || memcmp(out, text, size))) abort(); /* lossless */
            free(out);
        }
    dpoc_ids_free(&ids);
    return 0;
}
