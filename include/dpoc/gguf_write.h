/* GGUF writer: version 3 files as llama.cpp's gguf-py GGUFWriter writes them
 * (gguf-py/gguf/gguf_writer.py), readable by ggml's gguf.cpp and by dpoc's own
 * reader (dpoc/gguf.h).
 *
 * Layout (little-endian): u32 magic "GGUF", u32 version 3, u64 tensor count,
 * u64 kv count; the kv entries in the order they were added {string key, u32
 * value type, value}; the tensor infos in the order they were added {string
 * name, u32 n_dims, u64 ne[n_dims] (ne[0] varies fastest: the row-major shape
 * reversed), u32 ggml type, u64 offset into the data section}; zero padding to
 * the alignment; the data section, each tensor's bytes followed by zero
 * padding to the alignment (ggml's gguf.cpp requires every offset to be the
 * padded sum of the tensors before it). A string is a u64 byte length and that
 * many bytes, no NUL.
 *
 * Use: dpoc_gguf_writer_new, add kvs and tensors, dpoc_gguf_writer_write (to a
 * temporary name in the destination's directory, fsync, rename, fsync of the
 * directory: a reader never sees a partial file under the final name), then
 * dpoc_gguf_writer_free. Tensor data is borrowed: it must stay valid and
 * unchanged until the write. Every error is a dpoc_err naming the key, tensor
 * or path; the writer stays usable (the failed add left nothing behind).
 *
 * Assumes a little-endian host (as ggml and the reader do): tensor bytes are
 * written as they are in memory. */
#ifndef DPOC_GGUF_WRITE_H
#define DPOC_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"
#include "dpoc/gguf.h"

/* The version written (gguf-py constants.py GGUF_VERSION). */
#define DPOC_GGUF_WRITE_VERSION 3
/* ggml.h GGML_MAX_NAME: a tensor name takes at most this many bytes with its NUL. */
#define DPOC_GGUF_MAX_NAME 64

typedef struct dpoc_gguf_writer dpoc_gguf_writer;

/* An empty writer (no kv, no tensor, alignment DPOC_GGUF_DEFAULT_ALIGNMENT). */
int dpoc_gguf_writer_new(dpoc_gguf_writer **w, dpoc_err *err);
/* NULL is a no-op. */
void dpoc_gguf_writer_free(dpoc_gguf_writer *w);

/* Sets the data alignment (a power of two) and adds the u32 key
 * general.alignment, as gguf-py's add_custom_alignment does. Without it the
 * file uses the default of 32 and carries no alignment key. */
int dpoc_gguf_writer_set_alignment(dpoc_gguf_writer *w, size_t alignment, dpoc_err *err);

/* Metadata. A key may be added once (gguf.cpp refuses duplicate keys). */
int dpoc_gguf_writer_add_str(dpoc_gguf_writer *w, const char *key, const char *value, dpoc_err *err);
int dpoc_gguf_writer_add_u32(dpoc_gguf_writer *w, const char *key, uint32_t value, dpoc_err *err);
int dpoc_gguf_writer_add_i32(dpoc_gguf_writer *w, const char *key, int32_t value, dpoc_err *err);
int dpoc_gguf_writer_add_u64(dpoc_gguf_writer *w, const char *key, uint64_t value, dpoc_err *err);
int dpoc_gguf_writer_add_i64(dpoc_gguf_writer *w, const char *key, int64_t value, dpoc_err *err);
int dpoc_gguf_writer_add_f32(dpoc_gguf_writer *w, const char *key, float value, dpoc_err *err);
int dpoc_gguf_writer_add_f64(dpoc_gguf_writer *w, const char *key, double value, dpoc_err *err);
int dpoc_gguf_writer_add_bool(dpoc_gguf_writer *w, const char *key, int value, dpoc_err *err);
/* An array of n strings (NUL-terminated). */
int dpoc_gguf_writer_add_str_array(dpoc_gguf_writer *w, const char *key, const char *const *values, size_t n,
                                   dpoc_err *err);
/* An array of n numbers of elem_type (any dpoc_gguf_vtype but STRING and
 * ARRAY; BOOL elements are one byte each), read from data in host order. */
int dpoc_gguf_writer_add_array(dpoc_gguf_writer *w, const char *key, dpoc_gguf_vtype elem_type, const void *data,
                               size_t n, dpoc_err *err);

/* A tensor: type a storage id of dpoc/dtype.h (ggml's ids; F32, F16, BF16 or
 * any block type whose layout dpoc knows), shape its row-major (PyTorch) shape
 * of n_dims (1..DPOC_GGUF_MAX_DIMS) sizes, each at least 1, the last a
 * multiple of the type's block; the file stores ne = shape reversed. data holds
 * the tensor's bytes (rows of dpoc_dtype_row_bytes) and is borrowed until the
 * write. Names are unique and shorter than DPOC_GGUF_MAX_NAME. */
int dpoc_gguf_writer_add_tensor(dpoc_gguf_writer *w, const char *name, uint32_t type, size_t n_dims,
                                const size_t *shape, const void *data, dpoc_err *err);

size_t dpoc_gguf_writer_n_kv(const dpoc_gguf_writer *w);
size_t dpoc_gguf_writer_n_tensors(const dpoc_gguf_writer *w);

/* Writes the file at path: through path's directory/.<name>.tmp, fsync, rename
 * over path, fsync of the directory. On error nothing is left under path's
 * temporary name and an existing file at path is untouched. The writer may be
 * written again. */
int dpoc_gguf_writer_write(const dpoc_gguf_writer *w, const char *path, dpoc_err *err);

/* convert_hf_to_gguf.py's LlamaModel.permute on rows x cols (row-major), out of
 * place (dst and src must not overlap): within each of n_head heads of
 * hd = rows / n_head rows, dst row 2j+s is src row s*hd/2+j (the reshape
 * (n_head, 2, hd/2, cols), swapaxes(1, 2) of the script). The inverse of
 * dpoc_gguf_unpermute_rows (dpoc/gguf.h). rows must be a multiple of 2 n_head. */
void dpoc_gguf_permute_rows(float *dst, const float *src, size_t rows, size_t cols, size_t n_head);

#endif
