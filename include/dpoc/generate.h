/* Text generation with a KV cache: several prompts decoded together.
 *
 * Each sequence keeps its own key/value cache (n_layers x max_len x kv_dim) and
 * its own position; a forward step takes any number of new rows from any of
 * the sequences (a prompt's prefill, or one token per active sequence while
 * decoding), so sequences of different lengths are batched without padding and
 * the large products see (rows x C) matrices instead of vectors.
 *
 * Decoding follows transformers' generate(): logits of the last row, divided by
 * the temperature, then top-p (the smallest set of most probable tokens whose
 * probability reaches top_p), then a draw; temperature 0 is greedy (argmax, the
 * first maximal index as torch.argmax). Each prompt has its own random stream
 * (seed, prompt index), so an answer does not depend on which other prompts
 * share its batch. */
#ifndef DPOC_GENERATE_H
#define DPOC_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "dpoc/err.h"
#include "dpoc/model.h"
#include "dpoc/tokenizer.h"

#define DPOC_GEN_MAX_STOP 8

typedef struct {
    size_t max_new_tokens; /* per prompt */
    float temperature;     /* 0 = greedy */
    float top_p;           /* 1 = no nucleus filtering */
    uint64_t seed;
    size_t max_batch;      /* prompts decoded together */
    size_t n_stop;
    int32_t stop_ids[DPOC_GEN_MAX_STOP]; /* generation of a sequence ends after it emits one of these */
} dpoc_gen_opts;

/* Prompts decoded together by default: each decode step is a GEMM of one row
 * per sequence, and 128 rows keep it compute-bound (SmolLM2-135M, 2 cores: 128
 * prompts x 48 sampled tokens in 24 s at 128, 30 s at 64; 256 is no faster). */
#define DPOC_GEN_DEFAULT_BATCH 128
void dpoc_gen_opts_default(dpoc_gen_opts *o); /* 256 tokens, greedy, top_p 1, seed 42, batch 128 */

/* Continues each of the n prompts (token ids). out[i] (caller-provided, empty)
 * receives the generated ids, including the stop token when one ends it (as
 * transformers' generate returns it). A prompt + max_new_tokens longer than the
 * model's max_position_embeddings is DPOC_EINPUT naming the prompt. */
int dpoc_generate(const dpoc_model *m, const dpoc_ids *prompts, size_t n, const dpoc_gen_opts *o, dpoc_ids *out,
                  dpoc_err *err);

/* Mean negative log-likelihood of completion given prompt under m (teacher
 * forcing), in nats per completion token; *n_tokens receives the completion's
 * length. Used to check that training left a model's general answers alone. */
int dpoc_completion_nll(const dpoc_model *m, const int32_t *prompt, size_t n_prompt, const int32_t *completion,
                        size_t n_completion, double *nll_sum, size_t *n_tokens, dpoc_err *err);

#endif
