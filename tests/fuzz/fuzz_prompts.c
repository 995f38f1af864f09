/* libFuzzer target: arbitrary bytes as a prompt list (generate / build-pairs --prompts). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/prompts.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char **p = NULL;
    size_t n = 0;
    dpoc_err err;
    if (dpoc_prompts_parse((const char *)data, size, "fuzz", &p, &n, &err) == 0) {
        for (size_t i = 0; i < n; i++)
            if (!p[i][0]) abort(); /* never an empty prompt */
        dpoc_prompts_free(p, n);
    }
    return 0;
}
