/* Storage types of tensors: how a weight's numbers are held in memory or in a
 * file. The ids are ggml's (ggml.h enum ggml_type), so a GGUF tensor's type id
 * is its dpoc_dtype; safetensors' F32 / F16 / BF16 map onto the same ids.
 * A block type stores `block` consecutive elements of a row in `block_bytes`
 * bytes (ggml-common.h's structs); plain types have block 1. */
#ifndef DPOC_DTYPE_H
#define DPOC_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    DPOC_DT_F32 = 0,
    DPOC_DT_F16 = 1,
    DPOC_DT_Q4_0 = 2,
    DPOC_DT_Q4_1 = 3,
    DPOC_DT_Q5_0 = 6,
    DPOC_DT_Q5_1 = 7,
    DPOC_DT_Q8_0 = 8,
    DPOC_DT_Q8_1 = 9,
    DPOC_DT_Q2_K = 10,
    DPOC_DT_Q3_K = 11,
    DPOC_DT_Q4_K = 12,
    DPOC_DT_Q5_K = 13,
    DPOC_DT_Q6_K = 14,
    DPOC_DT_Q8_K = 15,
    DPOC_DT_I8 = 24,
    DPOC_DT_I16 = 25,
    DPOC_DT_I32 = 26,
    DPOC_DT_I64 = 27,
    DPOC_DT_F64 = 28,
    DPOC_DT_BF16 = 30,
} dpoc_dtype;

/* "F32", "Q4_K", ... or NULL for an id dpoc does not know. */
const char *dpoc_dtype_name(uint32_t type);
/* Elements per block and bytes per block; 0 for an unknown id. */
size_t dpoc_dtype_block(uint32_t type);
size_t dpoc_dtype_block_bytes(uint32_t type);
/* Bytes of a row of n elements (n a multiple of the block); 0 for an unknown id. */
size_t dpoc_dtype_row_bytes(uint32_t type, size_t n);

#endif
