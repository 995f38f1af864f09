/* Storage type table (dpoc/dtype.h). */
#include "dpoc/dtype.h"

typedef struct {
    uint32_t id;
    const char *name;
    size_t block, bytes;
} dtype_info;

/* Block sizes and bytes per block as ggml-common.h defines the structs. */
static const dtype_info k_types[] = {
    {DPOC_DT_F32, "F32", 1, 4},         {DPOC_DT_F16, "F16", 1, 2},
    {DPOC_DT_Q4_0, "Q4_0", 32, 18},     {DPOC_DT_Q4_1, "Q4_1", 32, 20},
    {DPOC_DT_Q5_0, "Q5_0", 32, 22},     {DPOC_DT_Q5_1, "Q5_1", 32, 24},
    {DPOC_DT_Q8_0, "Q8_0", 32, 34},     {DPOC_DT_Q8_1, "Q8_1", 32, 36},
    {DPOC_DT_Q2_K, "Q2_K", 256, 84},    {DPOC_DT_Q3_K, "Q3_K", 256, 110},
    {DPOC_DT_Q4_K, "Q4_K", 256, 144},   {DPOC_DT_Q5_K, "Q5_K", 256, 176},
    {DPOC_DT_Q6_K, "Q6_K", 256, 210},   {DPOC_DT_Q8_K, "Q8_K", 256, 292},
    {DPOC_DT_I8, "I8", 1, 1},           {DPOC_DT_I16, "I16", 1, 2},
    {DPOC_DT_I32, "I32", 1, 4},         {DPOC_DT_I64, "I64", 1, 8},
    {DPOC_DT_F64, "F64", 1, 8},         {DPOC_DT_BF16, "BF16", 1, 2},
};

static const dtype_info *info(uint32_t type) {
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++)
        if (k_types[i].id == type) return &k_types[i];
    return NULL;
}

const char *dpoc_dtype_name(uint32_t type) {
    const dtype_info *t = info(type);
    return t ? t->name : NULL;
}

size_t dpoc_dtype_block(uint32_t type) {
    const dtype_info *t = info(type);
    return t ? t->block : 0;
}

size_t dpoc_dtype_block_bytes(uint32_t type) {
    const dtype_info *t = info(type);
    return t ? t->bytes : 0;
}

size_t dpoc_dtype_row_bytes(uint32_t type, size_t n) {
    const dtype_info *t = info(type);
    return t ? n / t->block * t->bytes : 0;
}
