/* TRL preference rows -> token ids, as TRL 1.16's DPOTrainer._prepare_dataset
 * produces them:
 * - pre-tokenized: {"prompt_input_ids" | "prompt_ids", "chosen_input_ids" | "chosen_ids", ...};
 * - standard: "prompt" (optional), "chosen", "rejected" strings; without a prompt it is
 *   extracted as TRL's extract_prompt does (longest common prefix in characters,
 *   stepping back over one space); the tokenizer's EOS text is appended to chosen
 *   and rejected when missing; prompt, prompt+chosen and prompt+rejected are
 *   tokenized with the post-processor (add_special_tokens);
 * - conversational: the same with lists of {role, content} messages (MiniMind's
 *   dpo.jsonl is the implicit-prompt form); the prompt is rendered with the chat
 *   template and the generation prompt, prompt+completion without it, both
 *   tokenized without special tokens.
 * The completion starts where the tokenized prompt and prompt+completion diverge
 * (TRL's common_prefix_length). */
#ifndef DPOC_PREFS_H
#define DPOC_PREFS_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "dpoc/chat.h"
#include "dpoc/err.h"
#include "dpoc/tokenizer.h"

typedef struct {
    dpoc_tokenizer *tok; /* NULL: only pre-tokenized rows can be read */
    int chat_kind;       /* a dpoc_chat_kind, or -1 when no template is known */
    size_t vocab_size;   /* ids of pre-tokenized rows must be below it */
} dpoc_prefs_ctx;

/* Tokenizes one row. A bad record (wrong keys or types, empty completion,
 * chosen == rejected, invalid UTF-8, an id out of range) returns DPOC_EINPUT with
 * the reason in err (no file:line: the caller adds it). */
int dpoc_prefs_tokenize_row(const dpoc_prefs_ctx *ctx, const cJSON *row, dpoc_ids *prompt, dpoc_ids *chosen,
                            dpoc_ids *rejected, dpoc_err *err);

#endif
