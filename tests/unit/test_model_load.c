/* The model builder (dpoc_model_from_source, dpoc/model_load.h) on every kind of
 * tensor source: memory sources with Hugging Face names, Hugging Face directories
 * written here, GGUF images written here (gguf_image.h). Each parameter gets a
 * value of its own (its position in the flat block), so a mixup shows; the
 * expected weights are those values, never dpoc's output. Errors must name the
 * source and the tensor, with each format's wording (the GGUF's in ggml's ne
 * order and llama.cpp names). The llama q/k un-permutation and the real GGUF are
 * in test_gguf.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/model_load.h"
#include "dpoc/safetensors.h"
#include "dpoc/source.h"
#include "gguf_image.h"
#include "testutil.h"

static void expect_msg(int rc, const dpoc_err *err, int code, const char *needle) {
    if (rc != code) fail_msg("status %d (expected %d), message '%s'", rc, code, err->msg);
    if (!strstr(err->msg, needle)) fail_msg("message '%s' does not mention '%s'", err->msg, needle);
}

/* V=10, C=8, F=12, 2 heads of 4, 1 KV head, 1 layer. */
static dpoc_model_config tiny_cfg(int qwen2, int tied) {
    dpoc_model_config c = {0};
    c.arch = qwen2 ? DPOC_ARCH_QWEN2 : DPOC_ARCH_LLAMA;
    c.vocab_size = 10, c.hidden_size = 8, c.intermediate_size = 12, c.n_layers = 1;
    c.n_heads = 2, c.n_kv_heads = 1, c.head_dim = 4, c.max_position_embeddings = 32;
    c.rms_norm_eps = 1e-5f, c.rope_theta = 10000.0f, c.tie_word_embeddings = tied, c.qkv_bias = qwen2;
    c.bos_token_id = c.eos_token_id = c.pad_token_id = -1;
    return c;
}

/* The expected model: parameter k of the flat block holds (k + 1) / 64 (exact in
 * fp32 and in bf16 for the first 256). */
static void reference(dpoc_model *ref, const dpoc_model_config *cfg) {
    dpoc_err err;
    if (dpoc_model_init(ref, cfg, &err)) fail_msg("%s", err.msg);
    for (size_t k = 0; k < ref->numel; k++) ref->params[k] = (float)(k + 1) / 64.0f;
}

static void expect_same_params(const dpoc_model *m, const dpoc_model *ref) {
    assert_int_equal(m->numel, ref->numel);
    for (size_t k = 0; k < ref->numel; k++)
        if (m->params[k] != ref->params[k]) fail_msg("parameter %zu is %g, expected %g", k, (double)m->params[k],
                                                     (double)ref->params[k]);
}

/* A memory source with every parameter of ref under its HF name (F32, zero copy). */
static dpoc_tensor_source *memory_source(const dpoc_model *ref, const char *skip) {
    dpoc_tensor_source *src = NULL;
    dpoc_err err;
    if (dpoc_ts_new(&src, "mem", &err)) fail_msg("%s", err.msg);
    for (size_t i = 0; i < ref->n_tensors; i++) {
        const dpoc_param_info *p = &ref->info[i];
        if (skip && !strcmp(p->name, skip)) continue;
        if (dpoc_ts_add(src, p->name, DPOC_DT_F32, p->ndim, p->shape, ref->params + p->offset,
                        p->numel * sizeof(float), &err))
            fail_msg("%s", err.msg);
    }
    return src;
}

static void test_memory_hf_names(void **state) {
    (void)state;
    for (int qwen2 = 0; qwen2 < 2; qwen2++) {
        const dpoc_model_config cfg = tiny_cfg(qwen2, !qwen2);
        dpoc_model ref, m;
        reference(&ref, &cfg);
        dpoc_tensor_source *src = memory_source(&ref, NULL);
        dpoc_err err;
        if (dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err)) fail_msg("%s", err.msg);
        expect_same_params(&m, &ref);
        assert_int_equal(m.cfg.arch, cfg.arch);
        dpoc_model_free(&m);
        dpoc_ts_close(src);
        dpoc_model_free(&ref);
    }
}

/* A bf16 source tensor is converted exactly (the values are bf16 numbers). */
static void test_memory_bf16(void **state) {
    (void)state;
    const dpoc_model_config cfg = tiny_cfg(0, 1);
    dpoc_model ref, m;
    reference(&ref, &cfg);
    const size_t i = dpoc_model_find(&ref, "model.norm.weight");
    const dpoc_param_info *p = &ref.info[i];
    dpoc_tensor_source *src = memory_source(&ref, p->name);
    /* 1.0 = 0x3F80, -0.5 = 0xBF00, 2^-133 = 0x0001, then 1.5 = 0x3FC0 */
    uint8_t bf[16];
    const uint16_t bits[8] = {0x3F80, 0xBF00, 0x0001, 0x3FC0, 0x3F80, 0xBF00, 0x0001, 0x3FC0};
    for (int k = 0; k < 8; k++) bf[2 * k] = (uint8_t)bits[k], bf[2 * k + 1] = (uint8_t)(bits[k] >> 8);
    const float want[8] = {1.0f, -0.5f, 0x1p-133f, 1.5f, 1.0f, -0.5f, 0x1p-133f, 1.5f};
    dpoc_err err;
    assert_int_equal(dpoc_ts_add(src, p->name, DPOC_DT_BF16, 1, p->shape, bf, sizeof bf, &err), 0);
    memcpy(ref.params + p->offset, want, sizeof want);
    if (dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err)) fail_msg("%s", err.msg);
    expect_same_params(&m, &ref);
    dpoc_model_free(&m);
    dpoc_ts_close(src);
    dpoc_model_free(&ref);
}

static void test_memory_checks(void **state) {
    (void)state;
    const dpoc_model_config tied = tiny_cfg(0, 1), untied = tiny_cfg(1, 0);
    dpoc_model ref, m;
    dpoc_err err;
    reference(&ref, &tied);
    const float spare[96] = {0};
    /* a tied model's extra lm_head.weight and an old rotary_emb.inv_freq are ignored */
    dpoc_tensor_source *src = memory_source(&ref, NULL);
    assert_int_equal(dpoc_ts_add(src, "lm_head.weight", DPOC_DT_F32, 2, (const size_t[]){10, 8}, spare,
                                 80 * sizeof(float), &err), 0);
    assert_int_equal(dpoc_ts_add(src, "model.layers.0.self_attn.rotary_emb.inv_freq", DPOC_DT_F32, 1,
                                 (const size_t[]){2}, spare, 2 * sizeof(float), &err), 0);
    if (dpoc_model_from_source(&m, &tied, src, DPOC_WEIGHTS_FP32, &err)) fail_msg("%s", err.msg);
    expect_same_params(&m, &ref); /* the embedding, not the extra head */
    dpoc_model_free(&m);
    /* anything else is a model dpoc does not understand */
    assert_int_equal(dpoc_ts_add(src, "model.layers.0.mlp.extra", DPOC_DT_F32, 1, (const size_t[]){2}, spare,
                                 2 * sizeof(float), &err), 0);
    expect_msg(dpoc_model_from_source(&m, &tied, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
               "mem: unexpected tensor 'model.layers.0.mlp.extra' for LlamaForCausalLM");
    assert_null(m.params); /* freed on error */
    dpoc_ts_close(src);

    /* missing, wrong shape */
    src = memory_source(&ref, "model.norm.weight");
    expect_msg(dpoc_model_from_source(&m, &tied, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
               "mem: tensor 'model.norm.weight' is missing");
    assert_null(strstr(err.msg, "safetensors")); /* a memory source is no safetensors file */
    assert_int_equal(dpoc_ts_add(src, "model.norm.weight", DPOC_DT_F32, 2, (const size_t[]){2, 4}, spare,
                                 8 * sizeof(float), &err), 0);
    expect_msg(dpoc_model_from_source(&m, &tied, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
               "mem: tensor 'model.norm.weight' has shape [2, 4], expected [8]");
    dpoc_ts_close(src);
    /* a type dpoc does not convert */
    src = memory_source(&ref, "model.norm.weight");
    assert_int_equal(dpoc_ts_add(src, "model.norm.weight", DPOC_DT_I32, 1, (const size_t[]){8}, spare,
                                 8 * sizeof(int32_t), &err), 0);
    expect_msg(dpoc_model_from_source(&m, &tied, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
               "mem: tensor 'model.norm.weight' has dtype I32");
    dpoc_ts_close(src);
    dpoc_model_free(&ref);

    /* untied: lm_head.weight is a parameter like any other */
    reference(&ref, &untied);
    src = memory_source(&ref, "lm_head.weight");
    expect_msg(dpoc_model_from_source(&m, &untied, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
               "tensor 'lm_head.weight' is missing");
    dpoc_ts_close(src);
    /* a storage mode the builder does not know */
    src = memory_source(&ref, NULL);
    expect_msg(dpoc_model_from_source(&m, &untied, src, (dpoc_weight_storage)7, &err), &err, DPOC_EINTERNAL,
               "storage mode 7");
    assert_null(m.params);
    dpoc_ts_close(src);
    dpoc_model_free(&ref);
}

/* ---- Hugging Face directories, through dpoc_source_load_model ---- */

static const char *TINY_CONFIG = "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
                                 "\"vocab_size\": 10, \"hidden_size\": 8, \"intermediate_size\": 12, "
                                 "\"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, "
                                 "\"max_position_embeddings\": 32, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, "
                                 "\"tie_word_embeddings\": true, \"hidden_act\": \"silu\"}";

/* dir/config.json + dir/model.safetensors of ref's parameters, without `skip`, plus `extra` ([2] floats). */
static const char *write_hf_dir(const dpoc_model *ref, const char *skip, const char *extra) {
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s", make_temp_dir());
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(TINY_CONFIG, f);
    assert_int_equal(fclose(f), 0);
    const char *names[64];
    const float *data[64];
    size_t ndims[64], shapes[64][ST_MAX_DIMS] = {{0}}, n = 0;
    static const float two[2] = {1, 2};
    for (size_t i = 0; i < ref->n_tensors; i++) {
        const dpoc_param_info *p = &ref->info[i];
        if (skip && !strcmp(p->name, skip)) continue;
        names[n] = p->name, data[n] = ref->params + p->offset, ndims[n] = p->ndim;
        shapes[n][0] = p->shape[0], shapes[n][1] = p->shape[1];
        n++;
    }
    if (extra) names[n] = extra, data[n] = two, ndims[n] = 1, shapes[n][0] = 2, n++;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    dpoc_err err;
    if (st_write_f32(path, n, names, data, ndims, (const size_t(*)[ST_MAX_DIMS])shapes, &err)) fail_msg("%s", err.msg);
    return dir;
}

static void test_hf_directory(void **state) {
    (void)state;
    const dpoc_model_config cfg = tiny_cfg(0, 1);
    dpoc_model ref, m;
    dpoc_err err;
    reference(&ref, &cfg);
    const char *dir = write_hf_dir(&ref, NULL, NULL);
    if (dpoc_source_load_model(&m, dir, &err)) fail_msg("%s", err.msg);
    expect_same_params(&m, &ref);
    assert_int_equal(m.cfg.head_dim, 4); /* hidden / heads, config.json has no head_dim */
    dpoc_model_free(&m);
    /* the messages dpoc gave before the builder was shared */
    dir = write_hf_dir(&ref, "model.layers.0.mlp.up_proj.weight", NULL);
    expect_msg(dpoc_source_load_model(&m, dir, &err), &err, DPOC_EINPUT,
               "tensor 'model.layers.0.mlp.up_proj.weight' is missing from the safetensors files");
    assert_non_null(strstr(err.msg, dir));
    assert_null(m.params);
    dir = write_hf_dir(&ref, NULL, "model.layers.0.self_attn.q_norm.weight");
    expect_msg(dpoc_source_load_model(&m, dir, &err), &err, DPOC_EINPUT,
               "unexpected tensor 'model.layers.0.self_attn.q_norm.weight' for LlamaForCausalLM");
    dir = write_hf_dir(&ref, NULL, "model.layers.0.self_attn.rotary_emb.inv_freq");
    if (dpoc_source_load_model(&m, dir, &err)) fail_msg("%s", err.msg);
    dpoc_model_free(&m);
    dpoc_model_free(&ref);
    /* neither a GGUF nor a directory */
    expect_msg(dpoc_source_load_model(&m, fixture_path("tiny-llama/config.json"), &err), &err, DPOC_EINPUT,
               "not a model");
}

/* ---- GGUF images ---- */

/* A llama GGUF of tiny_cfg(0, 1) with F32 tensors: token_embd and output_norm from
 * ref, blk.0.attn_norm.weight of `norm_len` elements and no other layer tensor. */
static buf partial_gguf(const dpoc_model *ref, size_t norm_len) {
    buf kv = {0};
    size_t n_kv = 0;
    kv_str(&kv, "general.architecture", "llama"), n_kv++;
    kv_u32(&kv, "llama.block_count", 1), n_kv++;
    kv_u32(&kv, "llama.embedding_length", 8), n_kv++;
    kv_u32(&kv, "llama.feed_forward_length", 12), n_kv++;
    kv_u32(&kv, "llama.attention.head_count", 2), n_kv++;
    kv_u32(&kv, "llama.attention.head_count_kv", 1), n_kv++;
    static float norm[16];
    const wtensor ts[] = {
        {"token_embd.weight", DPOC_GGML_F32, 2, {8, 10}, ref->wte.v, 80 * sizeof(float)},
        {"blk.0.attn_norm.weight", DPOC_GGML_F32, 1, {norm_len}, norm, norm_len * sizeof(float)},
        {"output_norm.weight", DPOC_GGML_F32, 1, {8}, ref->final_norm.v, 8 * sizeof(float)},
    };
    buf img = gguf_image(3, &kv, n_kv, ts, sizeof ts / sizeof ts[0], DPOC_GGUF_DEFAULT_ALIGNMENT);
    free(kv.p);
    return img;
}

static void test_gguf_checks(void **state) {
    (void)state;
    const dpoc_model_config want = tiny_cfg(0, 1);
    dpoc_model ref, m;
    dpoc_err err;
    reference(&ref, &want);
    for (int wrong = 0; wrong < 2; wrong++) {
        buf img = partial_gguf(&ref, wrong ? 7 : 8);
        dpoc_tensor_source *src = NULL;
        if (dpoc_ts_open_gguf_memory(&src, img.p, img.n, "tiny.gguf", &err)) fail_msg("%s", err.msg);
        dpoc_model_config cfg;
        if (dpoc_gguf_model_config(dpoc_ts_gguf(src), &cfg, &err)) fail_msg("%s", err.msg);
        assert_true(cfg.tie_word_embeddings && cfg.vocab_size == 10 && cfg.head_dim == 4);
        if (wrong)
            expect_msg(dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
                       "tiny.gguf: tensor 'blk.0.attn_norm.weight' has ne [7], expected [8]");
        else
            expect_msg(dpoc_model_from_source(&m, &cfg, src, DPOC_WEIGHTS_FP32, &err), &err, DPOC_EINPUT,
                       "tiny.gguf: tensor 'blk.0.attn_q.weight' (model.layers.0.self_attn.q_proj.weight) is missing");
        assert_null(m.params);
        dpoc_ts_close(src);
        free(img.p);
    }
    dpoc_model_free(&ref);
    /* the name map */
    char name[128];
    assert_true(dpoc_gguf_tensor_name("model.layers.12.mlp.down_proj.weight", name, sizeof name));
    assert_string_equal(name, "blk.12.ffn_down.weight");
    assert_true(dpoc_gguf_tensor_name("lm_head.weight", name, sizeof name));
    assert_string_equal(name, "output.weight");
    assert_false(dpoc_gguf_tensor_name("model.layers.0.mlp.extra", name, sizeof name));
    assert_false(dpoc_gguf_tensor_name("model.embed_tokens.weight", name, 4)); /* does not fit */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory_hf_names), cmocka_unit_test(test_memory_bf16),
        cmocka_unit_test(test_memory_checks),   cmocka_unit_test(test_hf_directory),
        cmocka_unit_test(test_gguf_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
