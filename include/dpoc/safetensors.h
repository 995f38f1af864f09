/* safetensors reader (Hugging Face model directories).
 *
 * Format: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {...}},
 * then the data section; offsets are relative to the data section.
 * Files are mmap'ed read-only; tensors point into the mapping. */
#ifndef DPOC_SAFETENSORS_H
#define DPOC_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"

#define ST_MAX_DIMS 8
/* Header larger than this is refused (the reference implementation's limit is 100 MB). */
#define ST_MAX_HEADER_BYTES ((size_t)100 * 1024 * 1024)

typedef enum {
    ST_F32,
    ST_F16,
    ST_BF16,
    ST_OTHER, /* a dtype the format knows (I8, F64, ...) that dpoc cannot convert */
} st_dtype;

typedef struct {
    char *name;           /* owned */
    st_dtype dtype;
    char dtype_str[16];   /* as written in the header, for messages */
    size_t ndim;
    size_t shape[ST_MAX_DIMS];
    size_t numel;
    const uint8_t *data;  /* into the mapping of file_index */
    size_t nbytes;
    size_t file_index;    /* which shard */
} st_tensor;

typedef struct {
    char *path;
    void *map;
    size_t map_len;
} st_file;

typedef struct {
    st_file *files;
    size_t n_files;
    st_tensor *tensors;
    size_t n_tensors;
} st_model;

/* Parses and validates a header (the JSON text, hdr_len bytes, not NUL-terminated)
 * against a data section of data_len bytes starting at data: well-formed JSON object,
 * every entry with dtype, shape and data_offsets, end-begin == numel*dtype size,
 * offsets inside the data section, no two tensors overlapping, no duplicate names.
 * Appends the tensors to *tensors, count in *n (realloc'ed). Pure: no I/O, fuzzable.
 * `where` names the file in messages. */
int st_parse_header(const char *hdr, size_t hdr_len, const uint8_t *data, size_t data_len,
                    size_t file_index, const char *where, st_tensor **tensors, size_t *n,
                    dpoc_err *err);

/* Opens one .safetensors file. */
int st_open_file(st_model *m, const char *path, dpoc_err *err);

/* Opens a model directory: model.safetensors, or model.safetensors.index.json and
 * every shard it names (each tensor must be in the shard the index says). */
int st_open_dir(st_model *m, const char *dir, dpoc_err *err);

/* Looks a tensor up by name; NULL when absent. */
const st_tensor *st_find(const st_model *m, const char *name);

/* Converts a tensor to fp32 into dst. The caller states the shape it expects
 * (ndim, shape); a mismatch is an error naming the tensor and both shapes. */
int st_read_f32(const st_tensor *t, float *dst, size_t ndim, const size_t *shape, dpoc_err *err);

void st_close(st_model *m);

/* Writes a single-file safetensors with F32 tensors (used by tests and by export).
 * names[i], data[i] with ndims[i] dims of shapes[i]. Written to path directly. */
int st_write_f32(const char *path, size_t n, const char *const *names, const float *const *data,
                 const size_t *ndims, const size_t (*shapes)[ST_MAX_DIMS], dpoc_err *err);

/* As st_write_f32, but every tensor is stored as BF16, each float rounded to the
 * nearest bfloat16 with ties to even, as torch's Tensor.to(torch.bfloat16) does
 * (overflow rounds to infinity; NaN becomes the quiet NaN 0x7FC0). */
int st_write_bf16(const char *path, size_t n, const char *const *names, const float *const *data,
                  const size_t *ndims, const size_t (*shapes)[ST_MAX_DIMS], dpoc_err *err);

/* fp16 / bf16 to fp32 conversion (exact). */
float st_f16_to_f32(uint16_t h);
float st_bf16_to_f32(uint16_t b);

#endif
