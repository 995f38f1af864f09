/* libFuzzer target: arbitrary bytes as a config file, then as a --set assignment. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    dpoc_config c;
    dpoc_err err;
    dpoc_config_defaults(&c);
    if (dpoc_config_apply_json(&c, text, "fuzz", &err) == 0) {
        dpoc_config_finalize(&c, &err);
        char *dump = dpoc_config_to_json(&c);
        free(dump);
    }
    dpoc_config_defaults(&c);
    dpoc_config_set(&c, text, &err);
    free(text);
    return 0;
}
