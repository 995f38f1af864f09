/* Tensor sources: the one way weights come in. A source is a table of tensors,
 * each {name as the file names it, storage type, shape, bytes}, opened from a
 * GGUF file, from a Hugging Face safetensors directory, or built by a caller
 * from memory (a checkpoint's tensors, a test's). Nothing here knows what a
 * model is: model/ maps names, checks shapes and decides whether to convert
 * (dpoc/model_load.h); text/ reads a GGUF's tokenizer metadata.
 *
 * Files are mmap'ed read-only by the format readers (dpoc/gguf.h,
 * dpoc/safetensors.h) and tensor data points into the mapping: opening copies
 * no weights. Every pointer a source hands out stays valid until dpoc_ts_close.
 * Errors are DPOC_EINPUT naming the file (or the caller's name for a memory
 * source) and the tensor. */
#ifndef DPOC_TENSOR_SOURCE_H
#define DPOC_TENSOR_SOURCE_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/dtype.h"
#include "dpoc/err.h"
#include "dpoc/gguf.h"

/* The most dimensions a tensor of any source has (safetensors' ST_MAX_DIMS; GGUF has 4). */
#define DPOC_TS_MAX_DIMS 8
/* dtype of a tensor whose storage type the file's format knows but dpoc has no id
 * for (safetensors U8, BOOL, F8_E4M3, ...): listed, never converted. */
#define DPOC_TS_DTYPE_OTHER UINT32_MAX

/* Where a source's tensors come from; model/ picks the naming (llama.cpp's for
 * GGUF, Hugging Face's for the others) from it. */
typedef enum {
    DPOC_TS_GGUF,        /* a GGUF file: llama.cpp names; metadata via dpoc_ts_gguf */
    DPOC_TS_SAFETENSORS, /* a Hugging Face directory (config.json sits next to the weights) */
    DPOC_TS_MEMORY,      /* built with dpoc_ts_new + dpoc_ts_add */
} dpoc_ts_format;

typedef struct {
    const char *name;       /* as the file names it */
    uint32_t dtype;         /* a dpoc_dtype id (dtype.h), or DPOC_TS_DTYPE_OTHER */
    const char *dtype_name; /* as the format spells it: "F32", "Q4_K", "F8_E4M3" (for messages) */
    size_t ndim;            /* 0 (a scalar) .. DPOC_TS_MAX_DIMS */
    size_t shape[DPOC_TS_MAX_DIMS]; /* PyTorch order, outermost first (a GGUF's ne reversed) */
    size_t numel;
    const void *data; /* nbytes of the storage type; not necessarily aligned */
    size_t nbytes;
} dpoc_ts_tensor;

typedef struct dpoc_tensor_source dpoc_tensor_source;

/* A GGUF file (dpoc_gguf_open: validated, mapped). On error *src is NULL. */
int dpoc_ts_open_gguf(dpoc_tensor_source **src, const char *path, dpoc_err *err);
/* The same on a caller-owned GGUF image (kept alive and unchanged until close);
 * name is used in messages. For tests and fuzzing. */
int dpoc_ts_open_gguf_memory(dpoc_tensor_source **src, const void *data, size_t size, const char *name,
                             dpoc_err *err);
/* A Hugging Face directory: model.safetensors, or model.safetensors.index.json and
 * every shard it names (st_open_dir's checks). */
int dpoc_ts_open_safetensors(dpoc_tensor_source **src, const char *dir, dpoc_err *err);

/* An empty memory source; `where` names it in messages (e.g. the checkpoint's path). */
int dpoc_ts_new(dpoc_tensor_source **src, const char *where, dpoc_err *err);
/* Adds a tensor to a memory source. name is copied; data is the caller's and must
 * stay valid and unchanged until close (no copy). dtype must be a dpoc_dtype id,
 * the innermost dimension a multiple of its block and nbytes exactly what the
 * shape takes; a name given twice is an error. */
int dpoc_ts_add(dpoc_tensor_source *src, const char *name, uint32_t dtype, size_t ndim, const size_t *shape,
                const void *data, size_t nbytes, dpoc_err *err);

void dpoc_ts_close(dpoc_tensor_source *src);

dpoc_ts_format dpoc_ts_format_of(const dpoc_tensor_source *src);
/* The file, directory or caller-given name: what messages start with. */
const char *dpoc_ts_where(const dpoc_tensor_source *src);
/* The open GGUF behind a DPOC_TS_GGUF source (its metadata: config, tokenizer); NULL otherwise. */
const dpoc_gguf *dpoc_ts_gguf(const dpoc_tensor_source *src);

/* Iteration in the file's order (GGUF: tensor infos; safetensors: by name; memory:
 * as added). dpoc_ts_at is NULL past the end. */
size_t dpoc_ts_count(const dpoc_tensor_source *src);
const dpoc_ts_tensor *dpoc_ts_at(const dpoc_tensor_source *src, size_t i);
/* NULL when absent. dpoc_ts_index(src, t) is t's position for dpoc_ts_at. */
const dpoc_ts_tensor *dpoc_ts_find(const dpoc_tensor_source *src, const char *name);
size_t dpoc_ts_index(const dpoc_tensor_source *src, const dpoc_ts_tensor *t);

/* Converts the whole tensor to fp32 (n must equal t->numel): F32, F16, BF16 and the
 * GGUF block types gguf_quants.c dequantizes (dpoc_gguf_can_dequantize); the
 * values are exactly those of the format's own conversion (ggml's dequantize_row_*,
 * torch's upcast). Another type is DPOC_EINPUT naming the source, the tensor and the type. */
int dpoc_ts_to_f32(const dpoc_tensor_source *src, const dpoc_ts_tensor *t, float *dst, size_t n, dpoc_err *err);

/* 1 if path is a regular file that starts with the GGUF magic. (Named for its
 * callers, which reach it through dpoc/source.h.) */
int dpoc_source_is_gguf(const char *path);

#endif
