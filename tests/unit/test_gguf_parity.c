/* Parity of dpoc's GGUF model with Hugging Face transformers on the real
 * SmolLM2-135M-Instruct Q4_1 GGUF (tools/fetch-model): tools/make_gguf_fixtures.py
 * loaded the same file with transformers 5.23 (dequantized to fp32 by the gguf
 * package) and recorded, for 3 chat prompts (transformers' ids), at every position
 * the log-sum-exp over the vocabulary, the top-16 logits and the logits of 64 fixed
 * vocabulary ids, and the greedy continuation of generate(do_sample=False,
 * max_new_tokens=32).
 *
 * Checked here: dpoc_source_load_model + dpoc_model_forward, with the logits formed
 * from a.lnf and the LM head, agree within 1e-3 (top-1 id equal at every position);
 * dpoc_generate at temperature 0 gives exactly transformers' ids, whatever the
 * batching (max_batch 3, 1 and 2). Skipped, with a message, when the GGUF is absent. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dpoc/generate.h"
#include "dpoc/gguf.h"
#include "dpoc/layers.h"
#include "dpoc/model.h"
#include "dpoc/source.h"
#include "dpoc/tokenizer.h"
#include "testutil.h"

#define FIXTURE "gguf/smollm2_parity.json"
#define LOGIT_ATOL 1e-3
#define LSE_ATOL 1e-3

static char g_path[4096];
static int g_loaded;
static dpoc_model g_model;

/* The GGUF as test_gguf.c finds it: $DPOC_MODEL_GGUF, else $DPOC_CACHE/models/..., else ~/.cache/dpoc/models/... */
static const char *gguf_path(void) {
    const char *env = getenv("DPOC_MODEL_GGUF");
    if (env && *env) snprintf(g_path, sizeof g_path, "%s", env);
    else {
        const char *cache = getenv("DPOC_CACHE");
        const char *home = getenv("HOME");
        if (cache && *cache) snprintf(g_path, sizeof g_path, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", cache);
        else
            snprintf(g_path, sizeof g_path, "%s/.cache/dpoc/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                     home ? home : ".");
    }
    return g_path;
}

/* The model, loaded once for both tests; skips the calling test when the file is absent. */
static const dpoc_model *model_or_skip(const char *test) {
    const char *path = gguf_path();
    if (access(path, R_OK) != 0) {
        print_message("SKIPPED %s: %s is absent (run tools/fetch-model or set DPOC_MODEL_GGUF)\n", test, path);
        skip();
    }
    if (!g_loaded) {
        dpoc_err err;
        dpoc_err_clear(&err);
        if (dpoc_source_load_model(&g_model, path, &err)) fail_msg("load %s: %s", path, err.msg);
        g_loaded = 1;
    }
    return &g_model;
}

static int teardown_group(void **state) {
    (void)state;
    if (g_loaded) dpoc_model_free(&g_model);
    g_loaded = 0;
    return 0;
}

/* ---- fixture access ---- */

static const cJSON *item(const cJSON *obj, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) fail_msg("fixture: key '%s' missing", key);
    return v;
}

/* A JSON array of integers into ids (cleared first). */
static void json_ids(const cJSON *arr, dpoc_ids *ids) {
    dpoc_err err;
    dpoc_err_clear(&err);
    ids->n = 0;
    const cJSON *it;
    if (!cJSON_IsArray(arr)) fail_msg("fixture: expected an array of ids");
    cJSON_ArrayForEach(it, arr) {
        if (!cJSON_IsNumber(it)) fail_msg("fixture: non-numeric id");
        if (dpoc_ids_push(ids, (int32_t)it->valueint, &err)) fail_msg("%s", err.msg);
    }
}

/* Row t of a 2-D array of numbers; fails unless it has n entries. */
static const cJSON *row(const cJSON *arr2d, size_t t, size_t n, const char *what) {
    const cJSON *r = cJSON_GetArrayItem(arr2d, (int)t);
    if (!r || (size_t)cJSON_GetArraySize(r) != n) fail_msg("fixture: %s[%zu] is not %zu long", what, t, n);
    return r;
}

/* ---- logits ---- */

static void test_logits(void **state) {
    (void)state;
    const dpoc_model *m = model_or_skip("test_logits");
    cJSON *fx = load_json_fixture(FIXTURE);
    const size_t C = m->cfg.hidden_size, V = m->cfg.vocab_size;
    assert_int_equal(V, (size_t)item(item(fx, "config"), "vocab_size")->valueint);
    assert_int_equal(C, (size_t)item(item(fx, "config"), "hidden_size")->valueint);
    const size_t K = (size_t)item(fx, "top_k")->valueint;
    const cJSON *sampled_ids = item(fx, "sampled_ids");
    const size_t S = (size_t)cJSON_GetArraySize(sampled_ids);
    assert_true(K >= 1 && S >= 1);

    double worst_logit = 0, worst_lse = 0, worst_head_lse = 0;
    size_t n_prompts = 0, n_positions = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, item(fx, "prompts")) {
        dpoc_ids ids = {0};
        json_ids(item(p, "input_ids"), &ids);
        const size_t T = ids.n;
        assert_true(T >= 2);
        const cJSON *lse_fx = item(p, "logsumexp"), *top_ids = item(p, "top_ids"), *top_logits = item(p, "top_logits"),
                    *sampled = item(p, "sampled_logits");
        assert_int_equal((size_t)cJSON_GetArraySize(lse_fx), T);

        dpoc_err err;
        dpoc_err_clear(&err);
        dpoc_acts a;
        if (dpoc_acts_alloc(&a, &m->cfg, T, &err)) fail_msg("%s", err.msg);
        dpoc_model_forward(m, &a, ids.ids, T, 0, T - 1);
        float *logits = malloc(T * V * sizeof *logits);
        assert_non_null(logits);
        matmul_forward(logits, a.lnf, (const float *)m->lm_head.w, NULL, T, C, V);

        double max_logit = 0, max_lse = 0, max_head_lse = 0;
        for (size_t t = 0; t < T; t++) {
            const float *z = logits + t * V;
            /* log-sum-exp (double) and the first maximal index, as torch.argmax */
            size_t best = 0;
            for (size_t v = 1; v < V; v++)
                if (z[v] > z[best]) best = v;
            double s = 0;
            for (size_t v = 0; v < V; v++) s += exp((double)z[v] - (double)z[best]);
            const double lse = (double)z[best] + log(s);
            const double want_lse = cJSON_GetArrayItem(lse_fx, (int)t)->valuedouble;
            if (!(fabs(lse - want_lse) <= max_lse)) max_lse = isnan(lse) ? INFINITY : fabs(lse - want_lse);
            if (!(fabs(lse - want_lse) <= LSE_ATOL))
                fail_msg("prompt %zu position %zu: logsumexp %.6f, transformers %.6f", n_prompts, t, lse, want_lse);
            /* dpoc's own head (scored rows 0..T-2) computes the same normaliser */
            if (t + 1 < T) {
                const double d = fabs((double)a.lse[t] - want_lse);
                if (!(d <= max_head_lse)) max_head_lse = isnan(d) ? INFINITY : d;
                if (!(d <= LSE_ATOL))
                    fail_msg("prompt %zu row %zu: head lse %.6f, transformers %.6f", n_prompts, t, (double)a.lse[t],
                             want_lse);
            }

            const cJSON *ti = row(top_ids, t, K, "top_ids"), *tl = row(top_logits, t, K, "top_logits");
            for (size_t k = 0; k < K; k++) {
                const int id = cJSON_GetArrayItem(ti, (int)k)->valueint;
                assert_true(id >= 0 && (size_t)id < V);
                const double want = cJSON_GetArrayItem(tl, (int)k)->valuedouble;
                const double d = fabs((double)z[id] - want);
                if (!(d <= max_logit)) max_logit = isnan(d) ? INFINITY : d;
                if (!(d <= LOGIT_ATOL))
                    fail_msg("prompt %zu position %zu: logit of id %d (top-%zu) is %.6f, transformers %.6f", n_prompts,
                             t, id, k + 1, (double)z[id], want);
            }
            const int want_top1 = cJSON_GetArrayItem(ti, 0)->valueint;
            if ((int)best != want_top1)
                fail_msg("prompt %zu position %zu: argmax %zu (logit %.6f), transformers %d (logit %.6f there)",
                         n_prompts, t, best, (double)z[best], want_top1, (double)z[want_top1]);

            const cJSON *sl = row(sampled, t, S, "sampled_logits");
            for (size_t j = 0; j < S; j++) {
                const int id = cJSON_GetArrayItem(sampled_ids, (int)j)->valueint;
                assert_true(id >= 0 && (size_t)id < V);
                const double want = cJSON_GetArrayItem(sl, (int)j)->valuedouble;
                const double d = fabs((double)z[id] - want);
                if (!(d <= max_logit)) max_logit = isnan(d) ? INFINITY : d;
                if (!(d <= LOGIT_ATOL))
                    fail_msg("prompt %zu position %zu: logit of sampled id %d is %.6f, transformers %.6f", n_prompts,
                             t, id, (double)z[id], want);
            }
        }
        print_message("prompt %zu (%zu tokens): max |logit diff| %.3g, max |logsumexp diff| %.3g (head %.3g)\n",
                      n_prompts, T, max_logit, max_lse, max_head_lse);
        if (max_logit > worst_logit) worst_logit = max_logit;
        if (max_lse > worst_lse) worst_lse = max_lse;
        if (max_head_lse > worst_head_lse) worst_head_lse = max_head_lse;
        n_positions += T;
        n_prompts++;
        free(logits);
        dpoc_acts_free(&a);
        dpoc_ids_free(&ids);
    }
    assert_int_equal(n_prompts, 3);
    print_message("SmolLM2 Q4_1 vs transformers: %zu positions x (%zu top + %zu sampled) logits, max |diff| %.3g "
                  "(tolerance %.0e); max |logsumexp diff| %.3g, head %.3g\n",
                  n_positions, K, S, worst_logit, LOGIT_ATOL, worst_lse, worst_head_lse);
    cJSON_Delete(fx);
}

/* ---- greedy generation ---- */

static void print_ids(const char *what, const int32_t *ids, size_t n) {
    char buf[1024];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 16 < sizeof buf; i++) o += (size_t)snprintf(buf + o, sizeof buf - o, " %d", ids[i]);
    buf[o] = '\0';
    print_message("  %s (%zu):%s\n", what, n, buf);
}

static void test_generate(void **state) {
    (void)state;
    const dpoc_model *m = model_or_skip("test_generate");
    cJSON *fx = load_json_fixture(FIXTURE);

    dpoc_gen_opts o;
    dpoc_gen_opts_default(&o);
    o.temperature = 0;
    o.top_p = 1;
    o.max_new_tokens = (size_t)item(fx, "max_new_tokens")->valueint;
    assert_int_equal(o.max_new_tokens, 32);
    /* generation_config.eos_token_id: an int or a list */
    const cJSON *eos = item(fx, "eos_token_id");
    o.n_stop = 0;
    if (cJSON_IsArray(eos)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, eos) {
            assert_true(o.n_stop < DPOC_GEN_MAX_STOP);
            o.stop_ids[o.n_stop++] = (int32_t)it->valueint;
        }
    } else {
        o.stop_ids[o.n_stop++] = (int32_t)eos->valueint;
    }

    enum { N = 3 };
    dpoc_ids prompts[N] = {{0}}, want[N] = {{0}};
    const cJSON *prompts_fx = item(fx, "prompts");
    assert_int_equal(cJSON_GetArraySize(prompts_fx), N);
    for (size_t i = 0; i < N; i++) {
        const cJSON *p = cJSON_GetArrayItem(prompts_fx, (int)i);
        json_ids(item(p, "input_ids"), &prompts[i]);
        json_ids(item(p, "generated_ids"), &want[i]);
    }

    const size_t batches[] = {3, 1, 2};
    for (size_t b = 0; b < sizeof batches / sizeof *batches; b++) {
        o.max_batch = batches[b];
        dpoc_ids out[N] = {{0}};
        dpoc_err err;
        dpoc_err_clear(&err);
        if (dpoc_generate(m, prompts, N, &o, out, &err))
            fail_msg("dpoc_generate (max_batch %zu): %s", o.max_batch, err.msg);
        for (size_t i = 0; i < N; i++) {
            size_t same = 0;
            while (same < out[i].n && same < want[i].n && out[i].ids[same] == want[i].ids[same]) same++;
            if (same != want[i].n || out[i].n != want[i].n) {
                print_ids("dpoc        ", out[i].ids, out[i].n);
                print_ids("transformers", want[i].ids, want[i].n);
                fail_msg("max_batch %zu, prompt %zu: dpoc's greedy ids differ from transformers' from token %zu on "
                         "(%zu vs %zu tokens)",
                         o.max_batch, i, same, out[i].n, want[i].n);
            }
        }
        print_message("greedy generation, max_batch %zu: %zu + %zu + %zu tokens identical to transformers\n",
                      o.max_batch, out[0].n, out[1].n, out[2].n);
        for (size_t i = 0; i < N; i++) dpoc_ids_free(&out[i]);
    }
    for (size_t i = 0; i < N; i++) {
        dpoc_ids_free(&prompts[i]);
        dpoc_ids_free(&want[i]);
    }
    cJSON_Delete(fx);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits),
        cmocka_unit_test(test_generate),
    };
    return cmocka_run_group_tests(tests, NULL, teardown_group);
}
