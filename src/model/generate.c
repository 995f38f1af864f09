/* Batched generation with a per-sequence KV cache (see dpoc/generate.h).
 *
 * A step runs N rows through the decoder: row r belongs to sequence seq[r] at
 * position pos[r]. Keys and values of every row are written into that
 * sequence's cache before attention runs, so a row at position p attends to
 * cache positions 0..p of its own sequence only: the causal mask of a prefill
 * and the cache of a decode step are the same code. */
#include "dpoc/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/fileutil.h"
#include "core/rng.h"
#include "dpoc/layers.h"
#include "model/decoder.h"

void dpoc_gen_opts_default(dpoc_gen_opts *o) {
    memset(o, 0, sizeof *o);
    o->max_new_tokens = 256;
    o->temperature = 0.0f;
    o->top_p = 1.0f;
    o->seed = 42;
    o->max_batch = DPOC_GEN_DEFAULT_BATCH;
}

typedef struct {
    const dpoc_model *m;
    size_t C, F, V, nh, nkv, hd, QD, KD, L;
    size_t cap;       /* positions per sequence cache */
    size_t n_seq;     /* sequences in the batch */
    size_t max_rows;  /* rows a step may take */
    float *kcache, *vcache; /* (n_seq, L, cap, KD) each */
    float *cos_t, *sin_t;   /* (cap, hd/2) */
    /* step buffers, (max_rows, ...) */
    float *x, *ln, *rstd, *q, *k, *v, *atty, *lse, *tmp, *gate, *up, *act;
    float *logits; /* (n_seq, V) */
    float *lora_ws; /* (max_rows, 2 lora_r_max): the adapters' workspace, or NULL */
} gen_state;

static void gen_free(gen_state *s) {
    free(s->kcache);
    free(s->vcache);
    free(s->cos_t);
    free(s->sin_t);
    free(s->x);
    free(s->ln);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->atty);
    free(s->tmp);
    free(s->gate);
    free(s->up);
    free(s->act);
    free(s->rstd);
    free(s->lse);
    free(s->logits);
    free(s->lora_ws);
    memset(s, 0, sizeof *s);
}

static int gen_alloc(gen_state *s, const dpoc_model *m, size_t n_seq, size_t cap, size_t max_rows, dpoc_err *err) {
    memset(s, 0, sizeof *s);
    const dpoc_model_config *c = &m->cfg;
    s->m = m;
    s->C = c->hidden_size, s->F = c->intermediate_size, s->V = c->vocab_size;
    s->nh = c->n_heads, s->nkv = c->n_kv_heads, s->hd = c->head_dim, s->L = c->n_layers;
    s->QD = s->nh * s->hd, s->KD = s->nkv * s->hd;
    s->cap = cap, s->n_seq = n_seq, s->max_rows = max_rows;
    const size_t cache = n_seq * s->L * cap * s->KD;
    s->kcache = dpoc_malloc(cache * sizeof(float), "KV cache", err);
    s->vcache = dpoc_malloc(cache * sizeof(float), "KV cache", err);
    s->cos_t = dpoc_malloc(cap * s->hd / 2 * sizeof(float), "RoPE table", err);
    s->sin_t = dpoc_malloc(cap * s->hd / 2 * sizeof(float), "RoPE table", err);
    s->x = dpoc_malloc(max_rows * s->C * sizeof(float), "generation buffers", err);
    s->ln = dpoc_malloc(max_rows * s->C * sizeof(float), "generation buffers", err);
    s->q = dpoc_malloc(max_rows * s->QD * sizeof(float), "generation buffers", err);
    s->k = dpoc_malloc(max_rows * s->KD * sizeof(float), "generation buffers", err);
    s->v = dpoc_malloc(max_rows * s->KD * sizeof(float), "generation buffers", err);
    s->atty = dpoc_malloc(max_rows * s->QD * sizeof(float), "generation buffers", err);
    s->tmp = dpoc_malloc(max_rows * (s->C > s->QD ? s->C : s->QD) * sizeof(float), "generation buffers", err);
    s->gate = dpoc_malloc(max_rows * s->F * sizeof(float), "generation buffers", err);
    s->up = dpoc_malloc(max_rows * s->F * sizeof(float), "generation buffers", err);
    s->act = dpoc_malloc(max_rows * s->F * sizeof(float), "generation buffers", err);
    s->rstd = dpoc_malloc(max_rows * sizeof(float), "generation buffers", err);
    s->lse = dpoc_malloc(max_rows * s->nh * sizeof(float), "generation buffers", err); /* attention statistics */
    s->logits = dpoc_malloc(n_seq * s->V * sizeof(float), "generation buffers", err);
    const size_t ws = 2 * max_rows * c->lora_r_max;
    if (ws && !(s->lora_ws = dpoc_malloc(ws * sizeof(float), "adapter workspace", err))) {
        gen_free(s);
        return DPOC_ENOMEM;
    }
    if (!s->kcache || !s->vcache || !s->cos_t || !s->sin_t || !s->x || !s->ln || !s->q || !s->k || !s->v ||
        !s->atty || !s->tmp || !s->gate || !s->up || !s->act || !s->rstd || !s->lse || !s->logits) {
        gen_free(s);
        return DPOC_ENOMEM;
    }
    rope_tables(s->cos_t, s->sin_t, cap, s->hd, c->rope_theta);
    return 0;
}

static float *cache_at(const gen_state *s, float *base, size_t seq, size_t layer, size_t pos) {
    return base + ((seq * s->L + layer) * s->cap + pos) * s->KD;
}

/* Runs N rows (tokens, their sequence and position) through the decoder and
 * writes the logits of the rows listed in out_rows (n_out of them) to
 * s->logits (n_out, V), in that order. */
static void gen_step(gen_state *s, const int32_t *tokens, const size_t *seq, const size_t *pos, size_t N,
                     const size_t *out_rows, size_t n_out) {
    const dpoc_model *m = s->m;
    const dpoc_model_config *c = &m->cfg;
    const size_t C = s->C, QD = s->QD, KD = s->KD, hd = s->hd;
    for (size_t r = 0; r < N; r++) dpoc_model_embedding_row(m, (size_t)tokens[r], s->x + r * C);
    float *rstd = s->rstd;
    for (size_t l = 0; l < s->L; l++) {
        const dpoc_layer *o = &m->layers[l];
        rmsnorm_forward(s->ln, rstd, s->x, o->attn_norm.v, N, C, c->rms_norm_eps);
        decoder_qkv_forward(o, s->q, s->k, s->v, s->ln, N, NULL, s->lora_ws, NULL, 0);
        for (size_t r = 0; r < N; r++) {
            const float *cs = s->cos_t + pos[r] * (hd / 2), *sn = s->sin_t + pos[r] * (hd / 2);
            rope_forward(s->q + r * QD, cs, sn, 1, s->nh, hd);
            rope_forward(s->k + r * KD, cs, sn, 1, s->nkv, hd);
            memcpy(cache_at(s, s->kcache, seq[r], l, pos[r]), s->k + r * KD, KD * sizeof(float));
            memcpy(cache_at(s, s->vcache, seq[r], l, pos[r]), s->v + r * KD, KD * sizeof(float));
        }
        /* consecutive rows of one sequence at consecutive positions attend together:
         * the cache before them is their prefix, their own rows follow it */
        for (size_t r0 = 0, r1; r0 < N; r0 = r1) {
            for (r1 = r0 + 1; r1 < N && seq[r1] == seq[r0] && pos[r1] == pos[r1 - 1] + 1; r1++) {
            }
            const size_t p0 = pos[r0];
            attention_prefix_forward(s->atty + r0 * QD, s->lse, s->q + r0 * QD, cache_at(s, s->kcache, seq[r0], l, 0),
                                     cache_at(s, s->vcache, seq[r0], l, 0), p0, cache_at(s, s->kcache, seq[r0], l, p0),
                                     cache_at(s, s->vcache, seq[r0], l, p0), r1 - r0, s->nh, s->nkv, hd);
        }
        linear_forward(&o->o, s->tmp, s->atty, N, s->lora_ws);
        for (size_t i = 0; i < N * C; i++) s->x[i] += s->tmp[i];
        rmsnorm_forward(s->ln, rstd, s->x, o->mlp_norm.v, N, C, c->rms_norm_eps);
        decoder_mlp_forward(o, s->tmp, s->gate, s->up, s->act, s->ln, N, NULL, s->lora_ws, NULL, 0);
        for (size_t i = 0; i < N * C; i++) s->x[i] += s->tmp[i];
    }
    for (size_t i = 0; i < n_out; i++) memcpy(s->tmp + i * C, s->x + out_rows[i] * C, C * sizeof(float));
    rmsnorm_forward(s->ln, rstd, s->tmp, m->final_norm.v, n_out, C, c->rms_norm_eps);
    linear_forward(&m->lm_head, s->logits, s->ln, n_out, NULL);
}

/* ---- choosing the next token ---- */

static size_t argmax_first(const float *x, size_t n) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static double uniform01(uint64_t *state) { return (double)(dpoc_splitmix64(state) >> 11) * 0x1.0p-53; }

typedef struct {
    float p;
    int32_t id;
} prob_id;

static int by_prob_desc(const void *a, const void *b) {
    const prob_id *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);
}

#define NUCLEUS_FIRST_THRESHOLD 1e-2f
#define NUCLEUS_THRESHOLD_STEP 1e-2f
#define NUCLEUS_MIN_THRESHOLD 1e-30f

/* Temperature, then top-p over the sorted probabilities, then a draw. */
static int32_t sample(float *logits, size_t V, const dpoc_gen_opts *o, uint64_t *rng, prob_id *sorted) {
    if (o->temperature <= 0.0f) return (int32_t)argmax_first(logits, V);
    const float inv_t = 1.0f / o->temperature;
    float mx = -INFINITY;
    for (size_t i = 0; i < V; i++) {
        logits[i] *= inv_t;
        if (logits[i] > mx) mx = logits[i];
    }
    double sum = 0.0;
    for (size_t i = 0; i < V; i++) {
        sorted[i].p = expf(logits[i] - mx);
        sorted[i].id = (int32_t)i;
        sum += sorted[i].p;
    }
    size_t keep = V;
    if (o->top_p < 1.0f) {
        /* The nucleus is a prefix of the tokens sorted by probability. If the tokens
         * with p >= t already hold top_p of the mass, the nucleus lies among them, so
         * only those are sorted; t starts high and is lowered until that holds. */
        const float pmax = 1.0f; /* exp(max - max) */
        for (float t = pmax * NUCLEUS_FIRST_THRESHOLD;; t *= NUCLEUS_THRESHOLD_STEP) {
            size_t m = 0;
            double mass = 0.0;
            for (size_t i = 0; i < V; i++)
                if (t <= 0.0f || sorted[i].p >= t) mass += sorted[i].p, m++;
            if (mass / sum >= o->top_p || t <= 0.0f || m == V) {
                size_t w = 0;
                for (size_t i = 0; i < V; i++)
                    if (t <= 0.0f || sorted[i].p >= t) sorted[w++] = sorted[i];
                qsort(sorted, w, sizeof *sorted, by_prob_desc);
                keep = w;
                double cum = 0.0;
                for (size_t i = 0; i < w; i++) {
                    cum += sorted[i].p / sum;
                    if (cum >= o->top_p) {
                        keep = i + 1;
                        break;
                    }
                }
                break;
            }
            if (t < NUCLEUS_MIN_THRESHOLD) t = 0.0f;
        }
    }
    double kept = 0.0;
    for (size_t i = 0; i < keep; i++) kept += sorted[i].p;
    double u = uniform01(rng) * kept;
    for (size_t i = 0; i < keep; i++) {
        u -= sorted[i].p;
        if (u < 0.0) return sorted[i].id;
    }
    return sorted[keep - 1].id;
}

static int is_stop(const dpoc_gen_opts *o, int32_t id) {
    for (size_t i = 0; i < o->n_stop && i < DPOC_GEN_MAX_STOP; i++)
        if (o->stop_ids[i] == id) return 1;
    return 0;
}

/* prompts [first, first + n) decoded together */
static int generate_batch(gen_state *s, const dpoc_ids *prompts, size_t first, size_t n, const dpoc_gen_opts *o,
                          dpoc_ids *out, prob_id *sorted, dpoc_err *err) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += prompts[first + i].n;
    int32_t *tokens = dpoc_malloc((total > n ? total : n) * sizeof(int32_t), "generation rows", err);
    size_t *seq = dpoc_malloc((total > n ? total : n) * sizeof(size_t), "generation rows", err);
    size_t *pos = dpoc_malloc((total > n ? total : n) * sizeof(size_t), "generation rows", err);
    size_t *out_rows = dpoc_malloc(n * sizeof(size_t), "generation rows", err);
    size_t *active = dpoc_malloc(n * sizeof(size_t), "generation rows", err);
    size_t *len = dpoc_malloc(n * sizeof(size_t), "generation rows", err);
    uint64_t *rng = dpoc_malloc(n * sizeof(uint64_t), "generation rows", err);
    /* per prefill chunk: the rows whose logits are needed (chunk-local) and their prompts */
    size_t *lo = dpoc_malloc(n * sizeof(size_t), "generation rows", err);
    size_t *which = dpoc_malloc(n * sizeof(size_t), "generation rows", err);
    int rc = 0;
    if (!tokens || !seq || !pos || !out_rows || !active || !len || !rng || !lo || !which) {
        rc = DPOC_ENOMEM;
        goto done;
    }
    /* prefill: every prompt's rows in one step; logits of each prompt's last row */
    size_t N = 0;
    for (size_t i = 0; i < n; i++) {
        const dpoc_ids *p = &prompts[first + i];
        for (size_t t = 0; t < p->n; t++, N++) tokens[N] = p->ids[t], seq[N] = i, pos[N] = t;
        out_rows[i] = N - 1;
        len[i] = p->n;
        uint64_t st = o->seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(first + i + 1));
        rng[i] = dpoc_splitmix64(&st);
    }
    /* large prefills go in row chunks that respect the step buffers */
    size_t done_rows = 0;
    while (done_rows < N) {
        size_t take = N - done_rows < s->max_rows ? N - done_rows : s->max_rows;
        /* logits are needed only from the chunk holding a prompt's last row; a chunk
         * boundary inside a prompt is fine: its rows are cached before the next chunk runs */
        size_t n_out = 0;
        for (size_t i = 0; i < n; i++)
            if (out_rows[i] >= done_rows && out_rows[i] < done_rows + take)
                lo[n_out] = out_rows[i] - done_rows, which[n_out++] = i;
        gen_step(s, tokens + done_rows, seq + done_rows, pos + done_rows, take, lo, n_out);
        for (size_t j = 0; j < n_out; j++) {
            const size_t i = which[j];
            int32_t id = sample(s->logits + j * s->V, s->V, o, &rng[i], sorted);
            if ((rc = dpoc_ids_push(&out[first + i], id, err))) break;
        }
        if (rc) goto done;
        done_rows += take;
    }
    /* decode: one row per sequence that has not stopped */
    for (;;) {
        size_t na = 0;
        for (size_t i = 0; i < n; i++) {
            const dpoc_ids *g = &out[first + i];
            if (g->n >= o->max_new_tokens || is_stop(o, g->ids[g->n - 1])) continue;
            active[na] = i;
            tokens[na] = g->ids[g->n - 1];
            seq[na] = i;
            pos[na] = len[i] + g->n - 1;
            out_rows[na] = na;
            na++;
        }
        if (!na) break;
        gen_step(s, tokens, seq, pos, na, out_rows, na);
        for (size_t j = 0; j < na; j++) {
            const size_t i = active[j];
            int32_t id = sample(s->logits + j * s->V, s->V, o, &rng[i], sorted);
            if ((rc = dpoc_ids_push(&out[first + i], id, err))) goto done;
        }
    }
done:
    free(tokens);
    free(seq);
    free(pos);
    free(out_rows);
    free(active);
    free(len);
    free(rng);
    free(lo);
    free(which);
    return rc;
}

/* Rows per step: enough for a batch's prefill in a few steps, bounded so the
 * (rows, intermediate) buffers stay small. */
#define GEN_MAX_ROWS 512

int dpoc_generate(const dpoc_model *m, const dpoc_ids *prompts, size_t n, const dpoc_gen_opts *o, dpoc_ids *out,
                  dpoc_err *err) {
    if (!n) return 0;
    if (!o->max_new_tokens) return 0;
    const size_t maxpos = m->cfg.max_position_embeddings;
    size_t longest = 0;
    for (size_t i = 0; i < n; i++) {
        if (!prompts[i].n) return dpoc_errf(err, DPOC_EINPUT, "prompt %zu is empty", i);
        for (size_t t = 0; t < prompts[i].n; t++)
            if (prompts[i].ids[t] < 0 || (size_t)prompts[i].ids[t] >= m->cfg.vocab_size)
                return dpoc_errf(err, DPOC_EINPUT, "prompt %zu: token id %d is outside the vocabulary (%zu)", i,
                                 prompts[i].ids[t], m->cfg.vocab_size);
        if (prompts[i].n + o->max_new_tokens > maxpos)
            return dpoc_errf(err, DPOC_EINPUT,
                             "prompt %zu: %zu tokens + max_new_tokens %zu exceed the model's %zu positions", i,
                             prompts[i].n, o->max_new_tokens, maxpos);
        if (prompts[i].n > longest) longest = prompts[i].n;
    }
    if (!(o->top_p > 0.0f && o->top_p <= 1.0f))
        return dpoc_errf(err, DPOC_EINPUT, "top_p must be in (0, 1], got %g", (double)o->top_p);
    if (!(o->temperature >= 0.0f))
        return dpoc_errf(err, DPOC_EINPUT, "temperature must be >= 0, got %g", (double)o->temperature);
    const size_t B = o->max_batch ? (o->max_batch < n ? o->max_batch : n) : 1;
    gen_state s;
    DPOC_TRY(gen_alloc(&s, m, B, longest + o->max_new_tokens, GEN_MAX_ROWS > B ? GEN_MAX_ROWS : B, err));
    prob_id *sorted = dpoc_malloc(m->cfg.vocab_size * sizeof *sorted, "sampling buffer", err);
    int rc = sorted ? 0 : DPOC_ENOMEM;
    for (size_t first = 0; !rc && first < n; first += B)
        rc = generate_batch(&s, prompts, first, n - first < B ? n - first : B, o, out, sorted, err);
    free(sorted);
    gen_free(&s);
    return rc;
}

int dpoc_completion_nll(const dpoc_model *m, const int32_t *prompt, size_t n_prompt, const int32_t *completion,
                        size_t n_completion, double *nll_sum, size_t *n_tokens, dpoc_err *err) {
    *nll_sum = 0.0;
    *n_tokens = n_completion;
    if (!n_completion) return 0;
    if (!n_prompt) return dpoc_errf(err, DPOC_EINPUT, "an empty prompt cannot be scored");
    const size_t T = n_prompt + n_completion;
    if (T > m->cfg.max_position_embeddings)
        return dpoc_errf(err, DPOC_EINPUT, "%zu tokens exceed the model's %zu positions", T,
                         m->cfg.max_position_embeddings);
    int32_t *tokens = dpoc_malloc(T * sizeof(int32_t), "scoring tokens", err);
    if (!tokens) return DPOC_ENOMEM;
    memcpy(tokens, prompt, n_prompt * sizeof(int32_t));
    memcpy(tokens + n_prompt, completion, n_completion * sizeof(int32_t));
    for (size_t t = 0; t < T; t++)
        if (tokens[t] < 0 || (size_t)tokens[t] >= m->cfg.vocab_size) {
            const int32_t bad = tokens[t];
            free(tokens);
            return dpoc_errf(err, DPOC_EINPUT, "token id %d is outside the vocabulary (%zu)", bad, m->cfg.vocab_size);
        }
    dpoc_acts a;
    int rc = dpoc_acts_alloc_mode(&a, &m->cfg, T, DPOC_ACTS_RECOMPUTE, err); /* forward only */
    if (!rc) {
        dpoc_model_forward(m, &a, tokens, T, n_prompt - 1, n_completion);
        double s = 0.0;
        for (size_t r = 0; r < n_completion; r++) s -= a.logp[r];
        *nll_sum = s;
        dpoc_acts_free(&a);
    }
    free(tokens);
    return rc;
}
