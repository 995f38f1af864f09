/* bf16: true against references from tools/make_bf16_fixtures.py, on the tiny
 * Llama and Qwen2: the step-1 log-probs (policy and reference, every pair), the
 * sigmoid loss and its metrics, the full step-1 gradient and the weights and
 * logged loss / grad_norm after three optimizer steps.
 *
 * The references: `emulated` is TRL's DPOTrainer with exactly dpoc's bf16
 * semantics (every linear product, LM head included, forward and both backward
 * products, with bf16-rounded operands and fp32 accumulation); `trl-bf16` is
 * TRL's own bf16=True (autocast: it also rounds the products' outputs,
 * the SwiGLU and attention to bf16); `fp32` is tests/fixtures/<model>/expected.
 *
 * The tolerance, derived: a second exact implementation of the same bf16
 * semantics differs from `emulated` only in the fp32 summation order, and
 * that flips individual bf16 roundings of activations whose fp32 values sit
 * next to a rounding boundary (here: one pair's log-prob moves by 7e-3 where the
 * others agree to 1e-6). summary.json measures that noise with a
 * float64-accumulation twin of the emulation: 0.08-0.2 of the bf16 effect
 * itself, E = |emulated - fp32|, in the three primary families — the sequence
 * log-probs (policy and reference, max over pairs), the step-1 gradient
 * (relative L2) and the weights after 3 steps (relative to their update). So
 * there dpoc must be within E/2 of `emulated` (>= 2.5x the measured noise); an
 * implementation that does not round the operands (distance E) or rounds them
 * wrongly fails. Quantities computed from those get the bound propagated:
 * the sigmoid loss and rewards/margins move by at most 4 beta tol_logp (each
 * pair's term has four log-probs with |d/d logp| <= beta / B), logps/chosen and
 * /rejected (means of log-probs) by tol_logp, grad_norm by tol_grad x its value.
 * The weights after 3 steps are the exception: there dpoc's three GEMM
 * implementations (oneDNN, the sgemm and the scalar fallback) all land 0.35-0.42
 * E from `emulated`, the same distance each time, so it is not summation order:
 * dpoc's element-wise work (RMSNorm sums in double, its own softmax) differs
 * from torch's by ulps before the operands are rounded, which flips other
 * roundings, and AdamW's first steps (close to lr x sign(g)) turn each flipped
 * sign of a near-zero gradient into a full step. For them the test asks the
 * question itself: dpoc's weights must be nearer the bf16 emulation than the
 * fp32 reference (TRL: within |trl-bf16 - emulated| + E).
 * To TRL's own bf16=True, by the triangle inequality, dpoc may be at most
 * |trl-bf16 - emulated| + the same tolerance away. E and |trl-bf16 - emulated| are computed
 * here from the fixture files; nothing is taken from dpoc. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/config.h"
#include "dpoc/metrics.h"
#include "dpoc/runtime.h"
#include "dpoc/safetensors.h"
#include "dpoc/trainer.h"
#include "testutil.h"

static const char *const MODELS[] = {"tiny-llama", "tiny-qwen2"};
#define N_MODELS 2
#define BATCH 4
/* dpoc's distance to `emulated` may be at most this fraction of the bf16 effect */
#define FRACTION_OF_BF16_EFFECT 0.5

/* ---- fixture access ---- */

static cJSON *bf16_json(const char *model, const char *variant, const char *file) {
    char rel[256];
    snprintf(rel, sizeof rel, "bf16/%s/%s/%s", model, variant, file);
    return load_json_fixture(rel);
}

/* A safetensors file as one block in m's parameter layout (malloc'ed). */
static float *load_block(const dpoc_model *m, const char *rel) {
    st_model st = {0};
    dpoc_err err;
    if (st_open_file(&st, fixture_path(rel), &err)) fail_msg("%s", err.msg);
    float *block = malloc(m->numel * sizeof(float));
    assert_non_null(block);
    for (size_t i = 0; i < m->n_tensors; i++) {
        const dpoc_param_info *p = &m->info[i];
        const st_tensor *t = st_find(&st, p->name);
        if (!t) fail_msg("%s lacks %s", rel, p->name);
        if (st_read_f32(t, block + p->offset, p->ndim, p->shape, &err)) fail_msg("%s", err.msg);
    }
    st_close(&st);
    return block;
}

/* ||a - b|| / ||base|| over the whole block (base = b when NULL, or b - base0) */
static double rel_l2(const float *a, const float *b, const float *base0, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)a[i] - (double)b[i];
        const double r = base0 ? (double)b[i] - (double)base0[i] : (double)b[i];
        num += d * d;
        den += r * r;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static double item(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItem(o, key);
    if (!cJSON_IsNumber(v)) fail_msg("fixture lacks number '%s'", key);
    return v->valuedouble;
}

static double arr_item(const cJSON *o, const char *key, size_t i) {
    const cJSON *v = cJSON_GetArrayItem(cJSON_GetObjectItem(o, key), (int)i);
    if (!cJSON_IsNumber(v)) fail_msg("fixture lacks %s[%zu]", key, i);
    return v->valuedouble;
}

/* The fp32 batch fields in the bf16 fixtures' layout: tests/fixtures/<model>/expected/batch.json, case sigmoid. */
static cJSON *fp32_batch(const char *model, const cJSON **sigmoid) {
    char rel[256];
    snprintf(rel, sizeof rel, "%s/expected/batch.json", model);
    cJSON *j = load_json_fixture(rel);
    const cJSON *c;
    *sigmoid = NULL;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(j, "cases"))
        if (!strcmp(cJSON_GetObjectItem(c, "name")->valuestring, "sigmoid")) *sigmoid = c;
    if (!*sigmoid) fail_msg("%s: no sigmoid case", rel);
    return j;
}

/* One quantity's check: d_emu = |dpoc - emulated| <= tol, d_trl = |dpoc - trl| <=
 * emu_trl + tol with emu_trl = |emulated - trl| (all >= 0, for the same quantity). */
static void check(const char *what, double d_emu, double tol, double d_trl, double emu_trl) {
    print_message("[   INFO   ] %-42s |dpoc-emulated| %.3g (limit %.3g); |dpoc-trl_bf16| %.3g (limit %.3g)\n", what,
                  d_emu, tol, d_trl, emu_trl + tol);
    if (!(d_emu <= tol)) fail_msg("%s: dpoc's bf16 is %.3g from the emulation, more than %.3g", what, d_emu, tol);
    if (!(d_trl <= emu_trl + tol))
        fail_msg("%s: dpoc's bf16 is %.3g from TRL's bf16=True, more than %.3g", what, d_trl, emu_trl + tol);
}

/* A primary family: the tolerance is a fraction of the bf16 effect E = |emulated - fp32|. */
static double check_primary(const char *what, double d_emu, double effect, double d_trl, double emu_trl) {
    if (!(effect > 0)) fail_msg("%s: the fixtures show no bf16 effect: they cannot test bf16", what);
    const double tol = FRACTION_OF_BF16_EFFECT * effect;
    print_message("[   INFO   ] %-42s bf16 effect |emulated-fp32| %.3g\n", what, effect);
    check(what, d_emu, tol, d_trl, emu_trl);
    return tol;
}

static void bf16_config(dpoc_config *c, const char *model) {
    dpoc_config_defaults(c);
    snprintf(c->model_name_or_path, sizeof c->model_name_or_path, "%s", fixture_path(model));
    char ref[256];
    snprintf(ref, sizeof ref, "%s-ref", model);
    snprintf(c->ref_model_name_or_path, sizeof c->ref_model_name_or_path, "%s", fixture_path(ref));
    snprintf(c->train_file, sizeof c->train_file, "%s", fixture_path("pairs.jsonl"));
    c->max_length = 0;
    c->per_device_train_batch_size = BATCH;
    c->shuffle = 0;
    c->max_steps = 1;
    c->bf16 = DPOC_BF16_TRUE;
    dpoc_err err;
    if (dpoc_config_finalize(c, &err)) fail_msg("%s", err.msg);
}

/* ---- step 1: log-probs, loss, metrics, gradient ---- */

static void run_step1(const char *model) {
    dpoc_config c;
    bf16_config(&c, model);
    dpoc_err err;
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_rt()->precision, DPOC_PRECISION_BF16);
    cJSON *emu = bf16_json(model, "emulated", "batch.json"), *trl = bf16_json(model, "trl-bf16", "batch.json");
    const cJSON *f32;
    cJSON *f32_root = fp32_batch(model, &f32);

    /* sequence log-probs of the policy and the reference, every pair and side */
    static const char *const keys[4] = {"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                         "ref_rejected_logps"};
    double d_emu = 0, effect = 0, d_trl = 0, emu_trl = 0;
    for (int side = 0; side < 2; side++) {
        for (size_t i = 0; i < BATCH; i++) {
            dpoc_seq seq;
            int32_t *ids = t.seq_buf;
            dpoc_dataset_collate(&t.data, i, side, c.max_length, 0, ids, &seq);
            const dpoc_model *models[2] = {&t.policy, &t.ref};
            for (int mi = 0; mi < 2; mi++) {
                dpoc_model_forward(models[mi], &t.acts[0], ids, seq.T, seq.row0, seq.R);
                double got = 0;
                for (size_t r = 0; r < seq.R; r++) got += t.acts[0].logp[r];
                const char *key = keys[2 * mi + side];
                const double e = arr_item(emu, key, i), tr = arr_item(trl, key, i), f = arr_item(f32_root, key, i);
                d_emu = fmax(d_emu, fabs(got - e));
                effect = fmax(effect, fabs(e - f));
                d_trl = fmax(d_trl, fabs(got - tr));
                emu_trl = fmax(emu_trl, fabs(e - tr));
            }
        }
    }
    char what[96];
    snprintf(what, sizeof what, "%s sequence log-probs", model);
    const double tol_logp = check_primary(what, d_emu, effect, d_trl, emu_trl);
    const double beta = c.loss.beta;

    /* the loss and metrics of the micro-batch, and the gradient */
    size_t pairs[BATCH] = {0, 1, 2, 3};
    double sums[DPOC_MB_N];
    memset(t.grads, 0, t.policy.numel * sizeof(float));
    if (dpoc_trainer_micro_batch(&t, pairs, BATCH, 1.0, sums, 0, &err)) fail_msg("%s", err.msg);
    dpoc_mb_metrics mb;
    dpoc_mb_metrics_from_sums(sums, &mb);
    const double le = item(emu, "loss"), lt = item(trl, "loss"), lf = item(f32, "loss");
    (void)lf;
    snprintf(what, sizeof what, "%s loss", model);
    check(what, fabs(mb.loss - le), 4.0 * beta * tol_logp, fabs(mb.loss - lt), fabs(le - lt));
    /* metrics computed from the log-probs */
    const cJSON *me = cJSON_GetObjectItem(emu, "metrics"), *mt = cJSON_GetObjectItem(trl, "metrics");
    const double got_m[3] = {mb.rewards_margins, mb.logps_chosen, mb.logps_rejected};
    const double tol_m[3] = {4.0 * beta * tol_logp, tol_logp, tol_logp};
    static const char *const mnames[3] = {"rewards/margins", "logps/chosen", "logps/rejected"};
    for (int k = 0; k < 3; k++) {
        snprintf(what, sizeof what, "%s %s", model, mnames[k]);
        const double e = item(me, mnames[k]), tr = item(mt, mnames[k]);
        check(what, fabs(got_m[k] - e), tol_m[k], fabs(got_m[k] - tr), fabs(e - tr));
    }
    /* decisions and counts are exact in every variant */
    assert_close(mb.rewards_accuracies, item(me, "rewards/accuracies"), 0, 0, "%s rewards/accuracies", model);
    assert_close((double)mb.num_tokens, item(me, "num_tokens"), 0, 0, "%s num_tokens", model);

    char rel[256];
    snprintf(rel, sizeof rel, "bf16/%s/emulated/grads-sigmoid.safetensors", model);
    float *g_emu = load_block(&t.policy, rel);
    snprintf(rel, sizeof rel, "bf16/%s/trl-bf16/grads-sigmoid.safetensors", model);
    float *g_trl = load_block(&t.policy, rel);
    snprintf(rel, sizeof rel, "%s/expected/grads-sigmoid.safetensors", model);
    float *g_f32 = load_block(&t.policy, rel);
    const size_t n = t.policy.numel;
    /* relative to the reference gradient's norm: ||dpoc - ref|| / ||ref|| */
    snprintf(what, sizeof what, "%s step-1 gradient (rel. L2)", model);
    check_primary(what, rel_l2(t.grads, g_emu, NULL, n), rel_l2(g_emu, g_f32, NULL, n), rel_l2(t.grads, g_trl, NULL, n),
                  rel_l2(g_emu, g_trl, NULL, n));
    free(g_emu);
    free(g_trl);
    free(g_f32);
    cJSON_Delete(emu);
    cJSON_Delete(trl);
    cJSON_Delete(f32_root);
    dpoc_trainer_free(&t);
    dpoc_rt()->precision = DPOC_PRECISION_FP32;
}

/* The bf16 effects of the step-1 fixtures alone (no dpoc): max |emulated - fp32| over the
 * sequence log-probs, and the gradient's relative L2 |emulated - fp32| / |emulated|. */
static double logp_effect(const char *model) {
    static const char *const keys[4] = {"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                         "ref_rejected_logps"};
    cJSON *emu = bf16_json(model, "emulated", "batch.json");
    const cJSON *f32;
    cJSON *f32_root = fp32_batch(model, &f32);
    double e = 0;
    for (int k = 0; k < 4; k++)
        for (size_t i = 0; i < BATCH; i++) e = fmax(e, fabs(arr_item(emu, keys[k], i) - arr_item(f32_root, keys[k], i)));
    cJSON_Delete(emu);
    cJSON_Delete(f32_root);
    return e;
}

static double grad_effect(const dpoc_model *m, const char *model) {
    char rel[256];
    snprintf(rel, sizeof rel, "bf16/%s/emulated/grads-sigmoid.safetensors", model);
    float *g_emu = load_block(m, rel);
    snprintf(rel, sizeof rel, "%s/expected/grads-sigmoid.safetensors", model);
    float *g_f32 = load_block(m, rel);
    const double e = rel_l2(g_emu, g_f32, NULL, m->numel);
    free(g_emu);
    free(g_f32);
    return e;
}

/* ---- three optimizer steps (accumulation 2, warm-up, clipping, truncation) ---- */

static void run_train3(const char *model) {
    dpoc_config c;
    dpoc_err err;
    load_shipped_config(&c, model);
    c.bf16 = DPOC_BF16_TRUE;
    if (dpoc_config_finalize(&c, &err)) fail_msg("%s", err.msg);
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_rt()->precision, DPOC_PRECISION_BF16);
    float *w0 = malloc(t.policy.numel * sizeof(float));
    assert_non_null(w0);
    memcpy(w0, t.policy.params, t.policy.numel * sizeof(float));
    dpoc_metrics_writer mw;
    if (dpoc_metrics_open(&mw, c.output_dir, "{}", -1, &err)) fail_msg("%s", err.msg);
    mw.print = 0;
    t.on_log = dpoc_metrics_write;
    t.on_log_ctx = &mw;
    assert_int_equal(t.total_steps, 3);
    while (t.global_step < t.total_steps)
        if (dpoc_trainer_step(&t, &err)) fail_msg("%s", err.msg);
    dpoc_metrics_close(&mw);

    char rel[256], what[96];
    snprintf(rel, sizeof rel, "bf16/%s/emulated/weights-step3.safetensors", model);
    float *w_emu = load_block(&t.policy, rel);
    snprintf(rel, sizeof rel, "bf16/%s/trl-bf16/weights-step3.safetensors", model);
    float *w_trl = load_block(&t.policy, rel);
    snprintf(rel, sizeof rel, "%s/expected/weights-step3.safetensors", model);
    float *w_f32 = load_block(&t.policy, rel);
    const size_t n = t.policy.numel;
    /* relative to what the three steps changed: ||dpoc - ref|| / ||ref - w0|| */
    snprintf(what, sizeof what, "%s weights after 3 steps (rel. update)", model);
    const double d_emu_w = rel_l2(t.policy.params, w_emu, w0, n), d_f32_w = rel_l2(t.policy.params, w_f32, w0, n);
    const double effect_w = rel_l2(w_emu, w_f32, w0, n);
    print_message("[   INFO   ] %-42s |dpoc-emulated| %.3g, |dpoc-fp32| %.3g (nearer bf16: limit %.3g); bf16 effect "
                  "%.3g\n", what, d_emu_w, d_f32_w, d_f32_w, effect_w);
    if (!(d_emu_w < d_f32_w)) fail_msg("%s: dpoc's bf16 weights are nearer fp32 (%.3g) than bf16 (%.3g)", what, d_f32_w, d_emu_w);
    check(what, d_emu_w, effect_w, rel_l2(t.policy.params, w_trl, w0, n), rel_l2(w_emu, w_trl, w0, n));

    /* the logged loss and grad_norm of each step */
    cJSON *he = bf16_json(model, "emulated", "train3.json"), *ht = bf16_json(model, "trl-bf16", "train3.json");
    char frel[256];
    snprintf(frel, sizeof frel, "%s/expected/train3.json", model);
    cJSON *hf = load_json_fixture(frel);
    char mpath[DPOC_PATH_MAX + 32];
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", c.output_dir);
    char *text = read_text_file(mpath, NULL);
    assert_non_null(text);
    static const char *const keys[2] = {"loss", "grad_norm"};
    /* propagated from the primary families' tolerances (see the top of the file) */
    const double tol_logp = FRACTION_OF_BF16_EFFECT * logp_effect(model);
    const double tol_grad = FRACTION_OF_BF16_EFFECT * grad_effect(&t.policy, model);
    double d_emu[2] = {0}, tol[2] = {0}, d_trl[2] = {0}, emu_trl[2] = {0};
    size_t step = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save), step++) {
        cJSON *got = cJSON_Parse(line);
        assert_non_null(got);
        const cJSON *e = cJSON_GetArrayItem(cJSON_GetObjectItem(he, "log_history"), (int)step);
        const cJSON *tr = cJSON_GetArrayItem(cJSON_GetObjectItem(ht, "log_history"), (int)step);
        const cJSON *f = cJSON_GetArrayItem(cJSON_GetObjectItem(hf, "log_history"), (int)step);
        if (!e || !tr || !f) fail_msg("%s: more logged steps than the fixtures", mpath);
        for (int k = 0; k < 2; k++) {
            const double g = item(got, keys[k]);
            d_emu[k] = fmax(d_emu[k], fabs(g - item(e, keys[k])));
            (void)f;
            tol[k] = fmax(tol[k], k == 0 ? 4.0 * c.loss.beta * tol_logp : tol_grad * fabs(item(e, keys[k])));
            d_trl[k] = fmax(d_trl[k], fabs(g - item(tr, keys[k])));
            emu_trl[k] = fmax(emu_trl[k], fabs(item(e, keys[k]) - item(tr, keys[k])));
        }
        /* the schedule and the data are the same in every variant */
        assert_close(item(got, "learning_rate"), item(e, "learning_rate"), 1e-12, 0, "%s lr", model);
        assert_close(item(got, "num_tokens"), item(e, "num_tokens"), 0, 0, "%s num_tokens", model);
        cJSON_Delete(got);
    }
    assert_int_equal(step, 3);
    for (int k = 0; k < 2; k++) {
        snprintf(what, sizeof what, "%s logged %s, 3 steps", model, keys[k]);
        check(what, d_emu[k], tol[k], d_trl[k], emu_trl[k]);
    }
    free(text);
    cJSON_Delete(he);
    cJSON_Delete(ht);
    cJSON_Delete(hf);
    free(w0);
    free(w_emu);
    free(w_trl);
    free(w_f32);
    dpoc_trainer_free(&t);
    dpoc_rt()->precision = DPOC_PRECISION_FP32;
}

static void test_step1(void **state) {
    (void)state;
    for (int m = 0; m < N_MODELS; m++) run_step1(MODELS[m]);
}

static void test_train3(void **state) {
    (void)state;
    for (int m = 0; m < N_MODELS; m++) run_train3(MODELS[m]);
}

/* bf16 false is the fp32 path: after a bf16 run the trainer computes fp32 again (the
 * fp32 fixtures' own tests, test_dpo, check the numbers). */
static void test_false_is_fp32(void **state) {
    (void)state;
    dpoc_config c;
    bf16_config(&c, MODELS[0]);
    c.bf16 = DPOC_BF16_FALSE;
    dpoc_err err;
    dpoc_trainer t;
    if (dpoc_trainer_init(&t, &c, NULL, &err)) fail_msg("%s", err.msg);
    assert_int_equal(dpoc_rt()->precision, DPOC_PRECISION_FP32);
    dpoc_trainer_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step1),
        cmocka_unit_test(test_train3),
        cmocka_unit_test(test_false_is_fp32),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
