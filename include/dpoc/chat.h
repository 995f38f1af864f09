/* Chat templates rendered in C, byte for byte as transformers'
 * apply_chat_template renders the real Jinja templates of the supported
 * model families. A template is recognised from its Jinja source (as found in
 * tokenizer_config.json or GGUF) or chosen by name. */
#ifndef DPOC_CHAT_H
#define DPOC_CHAT_H

#include <stddef.h>

#include "dpoc/err.h"

typedef enum {
    DPOC_CHAT_CHATML,  /* plain ChatML: <|im_start|>role\ncontent<|im_end|>\n, no default system */
    DPOC_CHAT_QWEN25,  /* Qwen2.5's ChatML with its default system message */
    DPOC_CHAT_SMOLLM2, /* SmolLM2-Instruct's ChatML with its default system message */
    DPOC_CHAT_LLAMA3,  /* Llama 3 header format */
} dpoc_chat_kind;

typedef struct {
    const char *role;    /* "system", "user", "assistant" */
    const char *content;
} dpoc_chat_msg;

/* "chatml", "qwen2.5", "smollm2", "llama3" -> kind; -1 if unknown. */
int dpoc_chat_kind_from_name(const char *name);
const char *dpoc_chat_kind_name(dpoc_chat_kind kind);

/* Recognises a Jinja chat_template string. An unrecognised template is an error
 * that says how to choose one with the config key chat_template. */
int dpoc_chat_detect(const char *jinja, dpoc_chat_kind *kind, dpoc_err *err);

/* Renders messages; add_generation_prompt as in transformers. bos_token is the
 * tokenizer's BOS text for templates that print it (Llama 3), else ignored.
 * *out is malloc'ed and NUL-terminated. Unknown roles are errors. */
int dpoc_chat_render(dpoc_chat_kind kind, const dpoc_chat_msg *msgs, size_t n, int add_generation_prompt,
                     const char *bos_token, char **out, size_t *len, dpoc_err *err);

#endif
