/* libFuzzer target: arbitrary bytes as one pre-tokenized dataset line; any pair
 * accepted must collate within bounds. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/dataset.h"

#define FUZZ_VOCAB 1000
#define FUZZ_MAX_LENGTH 16

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dpoc_dataset d;
    memset(&d, 0, sizeof d);
    dpoc_err err;
    if (dpoc_dataset_parse_line(&d, (const char *)data, size, 1, "fuzz", FUZZ_VOCAB, &err) == 0) {
        const dpoc_pair *p = &d.pairs[0];
        size_t n = p->prompt_len + (p->chosen_len > p->rejected_len ? p->chosen_len : p->rejected_len);
        int32_t *buf = malloc((n + 1) * sizeof *buf);
        for (int side = 0; side < 2; side++)
            for (int keep_end = 0; keep_end < 2; keep_end++) {
                dpoc_seq seq;
                dpoc_dataset_collate(&d, 0, side, FUZZ_MAX_LENGTH, keep_end, buf, &seq);
                if (seq.T > FUZZ_MAX_LENGTH || seq.row0 + seq.R > seq.T || seq.comp_start > seq.T) abort();
                for (size_t i = 0; i < seq.T; i++)
                    if (buf[i] < 0 || buf[i] >= FUZZ_VOCAB) abort();
            }
        free(buf);
    }
    dpoc_dataset_free(&d);
    return 0;
}
