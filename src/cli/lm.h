/* What the model-using commands (generate, build-pairs, perplexity) share: a
 * model and its tokenizer from any model path, chat prompts, prompt files. */
#ifndef DPOC_CLI_LM_H
#define DPOC_CLI_LM_H

#include <stddef.h>

#include "dpoc/err.h"
#include "dpoc/generate.h"
#include "dpoc/model.h"
#include "dpoc/tokenizer.h"

typedef struct {
    dpoc_model model;
    dpoc_tokenizer *tok;
    int chat_kind; /* dpoc_chat_kind */
} cli_lm;

/* model_path: a GGUF file, a Hugging Face directory (an exported or trained one
 * included) or a dpoc checkpoint .h5 (its weights over the model its run started
 * from). tok_path (may be NULL): where the tokenizer is, default the model's.
 * chat_template: a template name or NULL/"auto" for the tokenizer's own. */
int cli_lm_open(cli_lm *lm, const char *model_path, const char *tok_path, const char *chat_template, dpoc_err *err);
/* The same with a PEFT adapter directory (adapter_config.json +
 * adapter_model.safetensors) attached to the model; adapter may be NULL. */
int cli_lm_open_adapter(cli_lm *lm, const char *model_path, const char *adapter, const char *tok_path,
                        const char *chat_template, dpoc_err *err);
void cli_lm_close(cli_lm *lm);

/* The chat-templated prompt ids for [system (may be NULL)], user, with the
 * generation prompt, as apply_chat_template(..., add_generation_prompt=True). */
int cli_lm_prompt(cli_lm *lm, const char *system, const char *user, dpoc_ids *out, dpoc_err *err);
/* Sets o's stop ids: EOS and the end-of-turn tokens the tokenizer has. */
void cli_lm_stop_ids(const cli_lm *lm, dpoc_gen_opts *o);
/* Decoded text of ids without special tokens (malloc'ed). */
int cli_lm_decode(cli_lm *lm, const dpoc_ids *ids, char **text, dpoc_err *err);

/* Parsers for option values; an error names the option. */
int cli_parse_size(const char *opt, const char *s, size_t *out, dpoc_err *err);
int cli_parse_float(const char *opt, const char *s, float *out, dpoc_err *err);
int cli_parse_u64(const char *opt, const char *s, uint64_t *out, dpoc_err *err);

#endif
