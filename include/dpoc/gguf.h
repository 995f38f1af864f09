/* GGUF reader (llama.cpp / ggml model files), versions 2 and 3.
 *
 * Layout (little-endian): u32 magic "GGUF", u32 version, u64 tensor_count,
 * u64 kv_count, kv_count metadata entries {string key, u32 value type, value},
 * tensor_count infos {string name, u32 n_dims, u64 ne[n_dims], u32 ggml type,
 * u64 offset}, zero padding to general.alignment (default 32), data section.
 * A string is a u64 length and that many bytes.
 *
 * The file is mmap'ed read-only. Every length, count and offset is checked
 * against the file size before it is used; a malformed file is DPOC_EINPUT with
 * a message naming the file and the key or tensor at fault. Metadata strings and
 * arrays are copied out (NUL-terminated, aligned) so pointers returned by the
 * getters stay valid until dpoc_gguf_close. Tensor data points into the mapping.
 *
 * Only the file format lives here (io/): what a GGUF means as a model (config,
 * llama.cpp's tensor names and layouts) is model/'s (dpoc/model_load.h), as a
 * tokenizer text/'s (dpoc/tokenizer_source.h).
 *
 * Assumes a little-endian host (as ggml does). */
#ifndef DPOC_GGUF_H
#define DPOC_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"

#define DPOC_GGUF_MAX_DIMS 4
#define DPOC_GGUF_DEFAULT_ALIGNMENT 32

/* Metadata value types (gguf_type). */
typedef enum {
    DPOC_GGUF_UINT8 = 0,
    DPOC_GGUF_INT8 = 1,
    DPOC_GGUF_UINT16 = 2,
    DPOC_GGUF_INT16 = 3,
    DPOC_GGUF_UINT32 = 4,
    DPOC_GGUF_INT32 = 5,
    DPOC_GGUF_FLOAT32 = 6,
    DPOC_GGUF_BOOL = 7,
    DPOC_GGUF_STRING = 8,
    DPOC_GGUF_ARRAY = 9,
    DPOC_GGUF_UINT64 = 10,
    DPOC_GGUF_INT64 = 11,
    DPOC_GGUF_FLOAT64 = 12,
} dpoc_gguf_vtype;

/* ggml tensor types (ggml_type ids) that dpoc knows the block layout of. */
typedef enum {
    DPOC_GGML_F32 = 0,
    DPOC_GGML_F16 = 1,
    DPOC_GGML_Q4_0 = 2,
    DPOC_GGML_Q4_1 = 3,
    DPOC_GGML_Q5_0 = 6,
    DPOC_GGML_Q5_1 = 7,
    DPOC_GGML_Q8_0 = 8,
    DPOC_GGML_Q8_1 = 9,
    DPOC_GGML_Q2_K = 10,
    DPOC_GGML_Q3_K = 11,
    DPOC_GGML_Q4_K = 12,
    DPOC_GGML_Q5_K = 13,
    DPOC_GGML_Q6_K = 14,
    DPOC_GGML_Q8_K = 15,
    DPOC_GGML_I8 = 24,
    DPOC_GGML_I16 = 25,
    DPOC_GGML_I32 = 26,
    DPOC_GGML_I64 = 27,
    DPOC_GGML_F64 = 28,
    DPOC_GGML_BF16 = 30,
} dpoc_ggml_type;

typedef struct {
    char *name;                       /* owned, NUL-terminated */
    uint32_t type;                    /* dpoc_ggml_type */
    size_t n_dims;                    /* 1..4 */
    size_t ne[DPOC_GGUF_MAX_DIMS];    /* ne[0] varies fastest (reverse of PyTorch order); unused dims are 1 */
    size_t nelements;
    size_t offset;                    /* relative to the data section */
    const uint8_t *data;              /* into the mapping */
    size_t nbytes;
} dpoc_gguf_tensor;

typedef struct dpoc_gguf dpoc_gguf;

/* Opens and validates path. On error *g is NULL. */
int dpoc_gguf_open(dpoc_gguf **g, const char *path, dpoc_err *err);
/* The same on a caller-owned buffer (kept alive and unchanged until close); name
 * is used in messages. For tests and fuzzing. */
int dpoc_gguf_open_memory(dpoc_gguf **g, const void *data, size_t size, const char *name, dpoc_err *err);
void dpoc_gguf_close(dpoc_gguf *g);

const char *dpoc_gguf_path(const dpoc_gguf *g);
uint32_t dpoc_gguf_version(const dpoc_gguf *g);
size_t dpoc_gguf_alignment(const dpoc_gguf *g);
size_t dpoc_gguf_data_offset(const dpoc_gguf *g); /* file offset of the data section */

/* ---- metadata ---- */
size_t dpoc_gguf_n_kv(const dpoc_gguf *g);
const char *dpoc_gguf_kv_key(const dpoc_gguf *g, size_t i);
int dpoc_gguf_has_key(const dpoc_gguf *g, const char *key);
/* The value type of key, or -1 when absent. */
int dpoc_gguf_key_type(const dpoc_gguf *g, const char *key);

/* Getters: an absent key or a value of the wrong type is DPOC_EINPUT naming the
 * file and the key. The integer getters accept any integer type whose value fits
 * (files in the wild write the same key with different widths); dpoc_gguf_get_f32
 * accepts f32 and f64. */
int dpoc_gguf_get_str(const dpoc_gguf *g, const char *key, const char **out, dpoc_err *err);
int dpoc_gguf_get_u32(const dpoc_gguf *g, const char *key, uint32_t *out, dpoc_err *err);
int dpoc_gguf_get_i32(const dpoc_gguf *g, const char *key, int32_t *out, dpoc_err *err);
int dpoc_gguf_get_u64(const dpoc_gguf *g, const char *key, uint64_t *out, dpoc_err *err);
int dpoc_gguf_get_i64(const dpoc_gguf *g, const char *key, int64_t *out, dpoc_err *err);
int dpoc_gguf_get_f32(const dpoc_gguf *g, const char *key, float *out, dpoc_err *err);
int dpoc_gguf_get_f64(const dpoc_gguf *g, const char *key, double *out, dpoc_err *err);
int dpoc_gguf_get_bool(const dpoc_gguf *g, const char *key, int *out, dpoc_err *err);
/* An optional token id (tokenizer.ggml.bos_token_id, ...): -1 when the key is absent;
 * a value beyond INT32_MAX is DPOC_EINPUT naming the key. Shared by the model
 * config and the tokenizer spec, which must agree on it. */
int dpoc_gguf_get_token_id(const dpoc_gguf *g, const char *key, int32_t *out, dpoc_err *err);
/* Array of numbers: *data points to n elements of *elem_type (a numeric
 * dpoc_gguf_vtype), suitably aligned for that type. */
int dpoc_gguf_get_array(const dpoc_gguf *g, const char *key, dpoc_gguf_vtype *elem_type, const void **data,
                        size_t *n, dpoc_err *err);
/* Array of strings: (*strs)[i] NUL-terminated, (*lens)[i] its byte length (a
 * string may hold a NUL byte; lens gives the whole). lens may be NULL. */
int dpoc_gguf_get_str_array(const dpoc_gguf *g, const char *key, const char *const **strs, const size_t **lens,
                            size_t *n, dpoc_err *err);

/* ---- tensors ---- */
size_t dpoc_gguf_n_tensors(const dpoc_gguf *g);
const dpoc_gguf_tensor *dpoc_gguf_tensor_at(const dpoc_gguf *g, size_t i);
/* NULL when absent. */
const dpoc_gguf_tensor *dpoc_gguf_find_tensor(const dpoc_gguf *g, const char *name);

/* "F32", "Q4_K", ... or NULL for an id dpoc does not know. */
const char *dpoc_ggml_type_name(uint32_t type);
/* Elements per block and bytes per block; 0 for an unknown type. */
size_t dpoc_ggml_block_size(uint32_t type);
size_t dpoc_ggml_type_size(uint32_t type);

/* Converts the whole tensor to fp32: n must equal t->nelements. Supported: F32,
 * F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (ggml's block layouts);
 * any other type is DPOC_EINPUT naming the tensor and the type. */
int dpoc_gguf_dequantize(const dpoc_gguf_tensor *t, float *dst, size_t n, dpoc_err *err);
/* The same on raw blocks (n elements, a multiple of the block size, nbytes of src). */
int dpoc_gguf_dequantize_raw(uint32_t type, const void *src, size_t nbytes, float *dst, size_t n, dpoc_err *err);
/* 1 when dpoc_gguf_dequantize_raw converts type (the list above), else 0. */
int dpoc_gguf_can_dequantize(uint32_t type);

#endif
