/* Config parsing: TRL/HF key names, defaults as TRL's DPOConfig, and errors that
 * name the key with status 2. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/config.h"
#include "dpoc/model.h"
#include "dpoc/model_load.h"
#include "testutil.h"

static void expect_error(const char *json, const char *needle) {
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    dpoc_err_clear(&err);
    int rc = dpoc_config_apply_json(&c, json, "cfg.json", &err);
    if (!rc) {
        strcpy(c.model_name_or_path, "m");
        strcpy(c.train_file, "t");
        rc = dpoc_config_finalize(&c, &err);
    }
    assert_int_equal(rc, DPOC_EINPUT);
    if (!strstr(err.msg, needle)) fail_msg("message '%s' does not mention '%s'", err.msg, needle);
}

static void test_defaults_match_trl(void **state) {
    (void)state;
    /* TRL 1.16 DPOConfig / transformers 5.23 TrainingArguments defaults */
    dpoc_config c;
    dpoc_config_defaults(&c);
    assert_true(c.loss.beta == 0.1);
    assert_true(c.learning_rate == 1e-6);
    assert_true(c.max_length == 1024);
    assert_true(c.logging_steps == 10);
    assert_true(c.adam_beta1 == 0.9 && c.adam_beta2 == 0.999 && c.adam_epsilon == 1e-8);
    assert_true(c.max_grad_norm == 1.0);
    assert_true(c.lr_scheduler_type == DPOC_SCHED_LINEAR);
    assert_true(c.per_device_train_batch_size == 8);
    assert_true(c.num_train_epochs == 3.0);
    assert_true(c.loss.n_types == 1 && c.loss.types[0] == DPOC_LOSS_SIGMOID);
    assert_true(c.loss.discopop_tau == 0.05 && c.loss.f_alpha_divergence_coef == 0.5);
    assert_int_equal(c.seed, 42);
}

static void test_parse_and_set(void **state) {
    (void)state;
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    const char *json = "{\"model_name_or_path\": \"m\", \"train_file\": \"d.jsonl\", \"beta\": 0.5,"
                       " \"loss_type\": [\"sigmoid\", \"bco_pair\", \"sft\"], \"loss_weights\": [0.8, 0.2, 1.0],"
                       " \"max_length\": null, \"lr_scheduler_type\": \"cosine_with_min_lr\","
                       " \"lr_scheduler_kwargs\": {\"min_lr_rate\": 0.1}, \"ld_alpha\": 0.3}";
    assert_int_equal(dpoc_config_apply_json(&c, json, "x", &err), 0);
    assert_int_equal(dpoc_config_set(&c, "learning_rate=5e-7", &err), 0);
    assert_int_equal(dpoc_config_set(&c, "output_dir=runs/a", &err), 0);
    assert_int_equal(dpoc_config_set(&c, "truncation_mode=keep_end", &err), 0);
    assert_true(c.grad_allreduce == DPOC_ALLREDUCE_AUTO);
    assert_int_equal(dpoc_config_set(&c, "grad_allreduce=mpi", &err), 0);
    assert_int_equal(c.bf16, DPOC_BF16_FALSE); /* fp32 unless asked */
    assert_int_equal(dpoc_config_set(&c, "bf16=true", &err), 0);
    assert_int_equal(c.bf16, DPOC_BF16_TRUE);
    assert_int_equal(dpoc_config_set(&c, "bf16=auto", &err), 0);
    assert_int_equal(c.bf16, DPOC_BF16_AUTO);
    assert_int_equal(dpoc_config_finalize(&c, &err), 0);
    assert_true(c.loss.beta == 0.5);
    assert_int_equal(c.loss.n_types, 3);
    assert_true(c.loss.types[2] == DPOC_LOSS_SFT);
    assert_true(c.loss.weights[0] == 0.8 && c.loss.weights[1] == 0.2 && c.loss.weights[2] == 1.0);
    assert_true(c.max_length <= 0);
    assert_true(c.learning_rate == 5e-7);
    assert_string_equal(c.output_dir, "runs/a");
    assert_true(c.truncation_keep_end);
    assert_true(c.loss.has_ld_alpha && c.loss.ld_alpha == 0.3);
    assert_true(c.min_lr_rate == 0.1);
    /* the dump parses back to the same values */
    char *dump = dpoc_config_to_json(&c);
    dpoc_config d;
    dpoc_config_defaults(&d);
    assert_int_equal(dpoc_config_apply_json(&d, dump, "dump", &err), 0);
    assert_int_equal(dpoc_config_finalize(&d, &err), 0);
    assert_true(d.loss.beta == 0.5 && d.loss.n_types == 3 && d.loss.weights[1] == 0.2);
    assert_true(d.grad_allreduce == DPOC_ALLREDUCE_MPI);
    assert_int_equal(d.bf16, DPOC_BF16_AUTO);
    free(dump);
}

static void test_errors_name_the_key(void **state) {
    (void)state;
    expect_error("{\"betta\": 0.1}", "'betta'");
    expect_error("{\"beta\": \"high\"}", "'beta'");
    expect_error("{\"beta\": -1}", "'beta'");
    expect_error("{\"per_device_train_batch_size\": 0}", "'per_device_train_batch_size'");
    expect_error("{\"per_device_train_batch_size\": 2.5}", "'per_device_train_batch_size'");
    expect_error("{\"loss_type\": \"dpo\"}", "unknown loss type 'dpo'");
    expect_error("{\"loss_type\": [\"sigmoid\", \"ipo\"], \"loss_weights\": [1.0]}", "'loss_weights'");
    expect_error("{\"lr_scheduler_type\": \"poly\"}", "'lr_scheduler_type'");
    expect_error("{\"loss_type\": \"exo_pair\"}", "'label_smoothing'");
    expect_error("{\"loss_type\": \"bco_pair\", \"f_divergence_type\": \"js_divergence\"}", "'f_divergence_type'");
    expect_error("{\"bf16\": \"maybe\"}", "'bf16'");
    expect_error("{\"bf16\": 1}", "'bf16'");
    expect_error("{\"fp16\": true}", "'fp16'");
    expect_error("{\"ld_alpha\": 2}", "'ld_alpha'");
    expect_error("{\"grad_allreduce\": \"nccl\"}", "'grad_allreduce'");
    expect_error("{\"grad_allreduce\": 1}", "'grad_allreduce'");
    expect_error("{\"lr_scheduler_type\": \"cosine_with_min_lr\"}", "'lr_scheduler_kwargs'");
    expect_error("[1, 2]", "JSON object");
    expect_error("{\"beta\": 0.1,\n \"seed\": }", "cfg.json:2");
}

/* report_to with transformers' semantics; integrations dpoc lacks are errors naming the key */
static void test_report_to(void **state) {
    (void)state;
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    assert_int_equal(c.report_tensorboard, 0); /* transformers 5's default "none" */
    assert_string_equal(c.logging_dir, "");
    const char *on[] = {"report_to=tensorboard", "report_to=all", "report_to=[\"all\"]",
                        "report_to=[\"tensorboard\", \"tensorboard\"]"};
    const char *off[] = {"report_to=none", "report_to=[\"none\"]", "report_to=[]", "report_to=null"};
    for (size_t i = 0; i < 4; i++) {
        assert_int_equal(dpoc_config_set(&c, on[i], &err), 0);
        assert_int_equal(c.report_tensorboard, 1);
        assert_int_equal(dpoc_config_set(&c, off[i], &err), 0);
        assert_int_equal(c.report_tensorboard, 0);
    }
    assert_int_equal(dpoc_config_set(&c, "logging_dir=tb/logs", &err), 0);
    assert_string_equal(c.logging_dir, "tb/logs");
    /* the dump is the list transformers' __post_init__ leaves, and it reads back */
    assert_int_equal(dpoc_config_set(&c, "report_to=all", &err), 0);
    char *json = dpoc_config_to_json(&c);
    cJSON *o = cJSON_Parse(json);
    char *rt = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(o, "report_to"));
    assert_string_equal(rt, "[\"tensorboard\"]");
    dpoc_config d;
    dpoc_config_defaults(&d);
    assert_int_equal(dpoc_config_apply_json(&d, json, "dump", &err), 0);
    assert_int_equal(d.report_tensorboard, 1);
    assert_string_equal(d.logging_dir, "tb/logs");
    free(rt);
    cJSON_Delete(o);
    free(json);
    expect_error("{\"report_to\": \"wandb\"}", "config key 'report_to': 'wandb' is a Hugging Face integration");
    expect_error("{\"report_to\": [\"tensorboard\", \"mlflow\"]}", "'report_to': 'mlflow'");
    expect_error("{\"report_to\": [\"all\", \"tensorboard\"]}", "'report_to': unknown integration 'all'");
    expect_error("{\"report_to\": \"tensorbored\"}", "'report_to': unknown integration 'tensorbored'");
    expect_error("{\"report_to\": 1}", "'report_to'");
    expect_error("{\"report_to\": [1]}", "'report_to'");
    expect_error("{\"logging_dir\": 1}", "'logging_dir'");
}

static void test_set_errors(void **state) {
    (void)state;
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    assert_int_equal(dpoc_config_set(&c, "nokey", &err), DPOC_EINPUT);
    assert_int_equal(dpoc_config_set(&c, "max_steps=abc", &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "'max_steps'"));
}

static void test_missing_file_names_path(void **state) {
    (void)state;
    dpoc_config c;
    dpoc_config_defaults(&c);
    dpoc_err err;
    assert_int_equal(dpoc_config_load_file(&c, "/nonexistent/x.json", &err), DPOC_EINPUT);
    assert_non_null(strstr(err.msg, "/nonexistent/x.json"));
}

/* config.json fields the model does not implement are refused by name */
static void test_hf_config_refusals(void **state) {
    (void)state;
    const char *base = "\"vocab_size\": 32, \"hidden_size\": 8, \"intermediate_size\": 16, \"num_hidden_layers\": 1, "
                       "\"num_attention_heads\": 2";
    struct {
        const char *extra, *needle;
    } cases[] = {
        {"\"architectures\": [\"MistralForCausalLM\"]", "'architectures'"},
        {"\"architectures\": [\"LlamaForCausalLM\"], \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}",
         "'rope_scaling'"},
        {"\"architectures\": [\"LlamaForCausalLM\"], \"rope_parameters\": {\"rope_type\": \"yarn\"}", "'rope_parameters'"},
        {"\"architectures\": [\"Qwen2ForCausalLM\"], \"use_sliding_window\": true, \"sliding_window\": 4, "
         "\"max_position_embeddings\": 64",
         "'use_sliding_window'"},
        {"\"architectures\": [\"LlamaForCausalLM\"], \"hidden_act\": \"gelu\"", "'hidden_act'"},
        {"\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": true", "'attention_bias'"},
    };
    const char *dir = make_temp_dir();
    char path[256], text[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(text, sizeof text, "{%s, %s}", base, cases[i].extra);
        FILE *f = fopen(path, "w");
        fputs(text, f);
        fclose(f);
        dpoc_model_config mc;
        dpoc_err err;
        assert_int_equal(dpoc_hf_config_read(&mc, path, &err), DPOC_EINPUT);
        if (!strstr(err.msg, cases[i].needle) || !strstr(err.msg, path))
            fail_msg("case %zu: '%s' does not name %s and the file", i, err.msg, cases[i].needle);
    }
    /* transformers 5 spelling: rope_parameters with the default type is accepted */
    snprintf(text, sizeof text, "{%s, \"architectures\": [\"LlamaForCausalLM\"], \"rope_parameters\": "
             "{\"rope_type\": \"default\", \"rope_theta\": 500.0}}", base);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    dpoc_model_config mc;
    dpoc_err err;
    assert_int_equal(dpoc_hf_config_read(&mc, path, &err), 0);
    assert_true(mc.rope_theta == 500.0f && mc.head_dim == 4 && mc.n_kv_heads == 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_match_trl),  cmocka_unit_test(test_parse_and_set),
        cmocka_unit_test(test_errors_name_the_key), cmocka_unit_test(test_set_errors),
        cmocka_unit_test(test_report_to),
        cmocka_unit_test(test_missing_file_names_path), cmocka_unit_test(test_hf_config_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
