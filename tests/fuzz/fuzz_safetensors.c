/* libFuzzer target for the safetensors header parser and the fp16/bf16/f32 readers.
 * The input is a whole .safetensors file image: u64 little-endian header length N,
 * N bytes of JSON, then the data section. Every tensor that parses is read back with
 * its own shape. Build: cmake -DCMAKE_C_COMPILER=clang -DDPOC_FUZZ=ON -DDPOC_TESTS=OFF,
 * target fuzz_safetensors; seeds in tests/fuzz/corpus/safetensors/. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *buf, size_t size) {
    if (size < 8) return 0;
    uint64_t hdr_len = 0;
    for (int i = 7; i >= 0; i--) hdr_len = (hdr_len << 8) | buf[i];
    /* the same checks st_open_file makes on a mapped file */
    if (hdr_len > ST_MAX_HEADER_BYTES || hdr_len > size - 8) return 0;
    size_t h = (size_t)hdr_len;
    const uint8_t *data = buf + 8 + h;
    size_t data_len = size - 8 - h;

    st_tensor *ts = NULL;
    size_t n = 0;
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = st_parse_header((const char *)buf + 8, h, data_len ? data : NULL, data_len, 0, "fuzz", &ts,
                             &n, &err);
    if (rc == 0) {
        for (size_t i = 0; i < n; i++) {
            const st_tensor *t = &ts[i];
            /* the parser guarantees the bytes are in the input */
            if (t->nbytes && (t->data < data || (size_t)(t->data - data) > data_len ||
                              t->nbytes > data_len - (size_t)(t->data - data)))
                abort();
            if (t->numel > (1u << 20)) continue; /* nbytes == numel x size, so this is in the input */
            float *dst = malloc((t->numel ? t->numel : 1) * sizeof *dst);
            if (!dst) continue;
            rc = st_read_f32(t, dst, t->ndim, t->shape, &err);
            /* only a dtype dpoc does not convert may fail */
            if (rc && t->dtype != ST_OTHER) abort();
            free(dst);
        }
    } else if (n != 0 || err.code != rc || err.msg[0] == '\0') {
        abort(); /* an error leaves nothing appended and always has a message */
    }
    for (size_t i = 0; i < n; i++) free(ts[i].name);
    free(ts);
    return 0;
}
