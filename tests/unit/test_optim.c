/* AdamW, clipping, warm-up and LR schedules against torch / transformers
 * (tests/fixtures/optim, written by tools/make_optim_fixtures.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/config.h"
#include "dpoc/optim.h"
#include "testutil.h"

#define TOL_LR 1e-12
#define TOL_PARAM 1e-6

static void test_schedules(void **state) {
    (void)state;
    cJSON *j = load_json_fixture("optim/schedules.json");
    const cJSON *s;
    size_t n = 0;
    cJSON_ArrayForEach(s, cJSON_GetObjectItem(j, "schedules")) {
        dpoc_config c;
        dpoc_config_defaults(&c);
        cJSON *cfg = cJSON_CreateObject();
        cJSON_AddItemReferenceToObject(cfg, "lr_scheduler_type", cJSON_GetObjectItem(s, "lr_scheduler_type"));
        cJSON_AddItemReferenceToObject(cfg, "warmup_steps", cJSON_GetObjectItem(s, "warmup_steps"));
        cJSON_AddItemReferenceToObject(cfg, "lr_scheduler_kwargs", cJSON_GetObjectItem(s, "lr_scheduler_kwargs"));
        cJSON_AddItemReferenceToObject(cfg, "learning_rate", cJSON_GetObjectItem(s, "learning_rate"));
        cJSON_AddStringToObject(cfg, "model_name_or_path", "m");
        cJSON_AddStringToObject(cfg, "train_file", "t");
        char *text = cJSON_PrintUnformatted(cfg);
        dpoc_err err;
        if (dpoc_config_apply_json(&c, text, "schedule", &err) || dpoc_config_finalize(&c, &err))
            fail_msg("%s: %s", text, err.msg);
        long total = (long)cJSON_GetObjectItem(s, "total_steps")->valuedouble;
        long warm = dpoc_warmup_steps(&c, total);
        double *want;
        size_t m = json_doubles(cJSON_GetObjectItem(s, "lr"), &want);
        for (size_t k = 0; k < m; k++)
            assert_close(c.learning_rate * dpoc_lr_lambda(&c, (long)k, warm, total), want[k], TOL_LR, 1e-15,
                         "%s step %zu", text, k);
        free(want);
        free(text);
        cJSON_Delete(cfg);
        n++;
    }
    assert_int_equal(n, 8);
    cJSON_ArrayForEach(s, cJSON_GetObjectItem(j, "warmup")) {
        dpoc_config c;
        dpoc_config_defaults(&c);
        c.warmup_steps = cJSON_GetObjectItem(s, "warmup_steps")->valuedouble;
        assert_int_equal(dpoc_warmup_steps(&c, (long)cJSON_GetObjectItem(s, "total_steps")->valuedouble),
                         (long)cJSON_GetObjectItem(s, "expected")->valuedouble);
    }
    cJSON_Delete(j);
}

static float *to_floats(const cJSON *arr, size_t *n) {
    double *d;
    *n = json_doubles(arr, &d);
    float *f = malloc(*n * sizeof *f);
    for (size_t i = 0; i < *n; i++) f[i] = (float)d[i];
    free(d);
    return f;
}

static void test_adamw_matches_torch(void **state) {
    (void)state;
    cJSON *j = load_json_fixture("optim/adamw.json");
    size_t n;
    float *p = to_floats(cJSON_GetObjectItem(j, "p0"), &n);
    dpoc_config c;
    dpoc_config_defaults(&c);
    c.weight_decay = cJSON_GetObjectItem(j, "weight_decay")->valuedouble;
    c.adam_epsilon = cJSON_GetObjectItem(j, "eps")->valuedouble;
    dpoc_adamw o;
    dpoc_err err;
    const size_t off = 0;
    const int decay = 1;
    assert_int_equal(dpoc_adamw_init(&o, n, &c, 1, &off, &n, &decay, &err), 0);
    double *lrs;
    size_t steps = json_doubles(cJSON_GetObjectItem(j, "lrs"), &lrs);
    for (size_t k = 0; k < steps; k++) {
        size_t m;
        float *g = to_floats(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "grads"), (int)k), &m);
        dpoc_adamw_step(&o, p, g, 1.0f, lrs[k]);
        float *want = to_floats(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "params_after_each_step"), (int)k), &m);
        double e = rel_maxabs_err(p, want, n, 1e-12);
        if (e > TOL_PARAM) fail_msg("AdamW step %zu: relative max-abs error %.3g", k + 1, e);
        free(g);
        free(want);
    }
    const cJSON *clip = cJSON_GetObjectItem(j, "clip");
    size_t m;
    float *g = to_floats(cJSON_GetObjectItem(clip, "grad"), &m);
    float *want = to_floats(cJSON_GetObjectItem(clip, "clipped"), &m);
    double norm = dpoc_grad_norm(g, m);
    assert_close(norm, cJSON_GetObjectItem(clip, "norm")->valuedouble, 1e-6, 0, "grad norm");
    const double max_norm = cJSON_GetObjectItem(clip, "max_norm")->valuedouble;
    float *g0 = malloc(m * sizeof *g0);
    assert_non_null(g0);
    memcpy(g0, g, m * sizeof *g0);
    dpoc_clip_grads(g, m, norm, max_norm);
    assert_true(rel_maxabs_err(g, want, m, 1e-12) < 1e-6);
    /* the trainer's fused form: AdamW scaling the unclipped block by dpoc_clip_coef
     * gives the same bits as clipping in place, then a step with scale 1 */
    const float coef = dpoc_clip_coef(norm, max_norm);
    assert_true(coef < 1.0f);
    dpoc_adamw a1, a2;
    const size_t off0 = 0;
    assert_int_equal(dpoc_adamw_init(&a1, m, &c, 1, &off0, &m, &decay, &err), 0);
    assert_int_equal(dpoc_adamw_init(&a2, m, &c, 1, &off0, &m, &decay, &err), 0);
    float *p1 = calloc(m, sizeof *p1), *p2 = calloc(m, sizeof *p2);
    assert_true(p1 && p2);
    for (size_t i = 0; i < m; i++) p1[i] = p2[i] = 0.5f - 0.01f * (float)i;
    dpoc_adamw_step(&a1, p1, g, 1.0f, 1e-3);
    dpoc_adamw_step(&a2, p2, g0, coef, 1e-3);
    assert_memory_equal(p1, p2, m * sizeof *p1);
    assert_memory_equal(a1.m, a2.m, m * sizeof *p1);
    assert_memory_equal(a1.v, a2.v, m * sizeof *p1);
    assert_true(dpoc_clip_coef(norm, 0.0) == 1.0f && dpoc_clip_coef(norm, 2.0 * norm + 1.0) == 1.0f);
    dpoc_adamw_free(&a1), dpoc_adamw_free(&a2);
    free(p1), free(p2), free(g0);
    free(g);
    free(want);
    free(lrs);
    free(p);
    dpoc_adamw_free(&o);
    cJSON_Delete(j);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schedules),
        cmocka_unit_test(test_adamw_matches_torch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
