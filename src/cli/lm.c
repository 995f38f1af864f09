/* Model, tokenizer and prompts for the model-using commands (see lm.h). */
#include "lm.h"
#include "backend.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/fileutil.h"
#include "dpoc/chat.h"
#include "dpoc/checkpoint.h"
#include "dpoc/config.h"
#include "dpoc/export.h"
#include "dpoc/lora.h"
#include "dpoc/source.h"
#include "dpoc/tokenizer_source.h"

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* A checkpoint: verified, then its weights over the model its run started from. */
static int open_checkpoint(cli_lm *lm, const char *ckpt, char *tok_src, size_t tok_n, dpoc_err *err) {
    char src[DPOC_PATH_MAX];
    DPOC_TRY(dpoc_ckpt_verify(ckpt, err));
    DPOC_TRY(dpoc_ckpt_run_source(ckpt, src, sizeof src, tok_src, tok_n, err));
    dpoc_model_config cfg;
    int rc = dpoc_source_model_config(src, &cfg, err);
    if (rc) {
        dpoc_err_prefix(err, "%s: the model its run started from", ckpt);
        return rc;
    }
    /* the base's weights first: a LoRA checkpoint holds only its adapters */
    rc = dpoc_source_load_model(&lm->model, src, err);
    if (rc) {
        dpoc_err_prefix(err, "%s: the model its run started from", ckpt);
        return rc;
    }
    return dpoc_ckpt_read_weights(ckpt, &lm->model, err);
}

int cli_lm_open(cli_lm *lm, const char *model_path, const char *tok_path, const char *chat_template, dpoc_err *err) {
    return cli_lm_open_adapter(lm, model_path, NULL, tok_path, chat_template, err);
}

int cli_lm_open_adapter(cli_lm *lm, const char *model_path, const char *adapter, const char *tok_path,
                        const char *chat_template, dpoc_err *err) {
    memset(lm, 0, sizeof *lm);
    lm->chat_kind = -1;
    DPOC_TRY(cli_backend_check(err));
    char tok_src[DPOC_PATH_MAX];
    snprintf(tok_src, sizeof tok_src, "%s", model_path);
    int rc = ends_with(model_path, ".h5") ? open_checkpoint(lm, model_path, tok_src, sizeof tok_src, err)
                                          : dpoc_source_load_model(&lm->model, model_path, err);
    if (!rc && adapter) {
        if (dpoc_lora_attached(&lm->model))
            rc = dpoc_errf(err, DPOC_EINPUT, "--adapter: %s already carries adapters (a LoRA checkpoint)", model_path);
        else rc = dpoc_lora_load_peft(&lm->model, adapter, NULL, err);
    }
    if (!rc) rc = dpoc_source_load_tokenizer(&lm->tok, tok_path ? tok_path : tok_src, err);
    if (!rc && !lm->tok)
        rc = dpoc_errf(err, DPOC_EINPUT, "%s: no tokenizer found (name one with --tokenizer)",
                       tok_path ? tok_path : tok_src);
    if (!rc && chat_template && strcmp(chat_template, "auto") != 0) {
        lm->chat_kind = dpoc_chat_kind_from_name(chat_template);
        if (lm->chat_kind < 0)
            rc = dpoc_errf(err, DPOC_EINPUT, "--chat-template '%s': expected chatml, qwen2.5, smollm2 or llama3",
                           chat_template);
    } else if (!rc) {
        const char *jinja = dpoc_tokenizer_chat_template(lm->tok);
        dpoc_chat_kind k;
        if (!jinja) rc = dpoc_errf(err, DPOC_EINPUT, "the tokenizer has no chat template (choose one with --chat-template)");
        else if (!(rc = dpoc_chat_detect(jinja, &k, err))) lm->chat_kind = (int)k;
    }
    if (rc) cli_lm_close(lm);
    return rc;
}

void cli_lm_close(cli_lm *lm) {
    if (lm->model.params || lm->model.info) dpoc_model_free(&lm->model);
    dpoc_tokenizer_free(lm->tok);
    memset(lm, 0, sizeof *lm);
}

int cli_lm_prompt(cli_lm *lm, const char *system, const char *user, dpoc_ids *out, dpoc_err *err) {
    dpoc_chat_msg msgs[2];
    size_t n = 0;
    if (system) msgs[n++] = (dpoc_chat_msg){"system", system};
    msgs[n++] = (dpoc_chat_msg){"user", user};
    char *text = NULL;
    size_t len = 0;
    DPOC_TRY(dpoc_chat_render((dpoc_chat_kind)lm->chat_kind, msgs, n, 1, dpoc_tokenizer_bos_token(lm->tok), &text,
                              &len, err));
    /* the template writes every special token itself, as TRL and apply_chat_template tokenize it */
    int rc = dpoc_tokenizer_encode(lm->tok, text, len, 0, out, err);
    free(text);
    return rc;
}

void cli_lm_stop_ids(const cli_lm *lm, dpoc_gen_opts *o) {
    static const char *const END_OF_TURN[] = {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"};
    o->n_stop = 0;
    int32_t eos = dpoc_tokenizer_eos_id(lm->tok);
    if (eos >= 0) o->stop_ids[o->n_stop++] = eos;
    for (size_t i = 0; i < sizeof END_OF_TURN / sizeof END_OF_TURN[0] && o->n_stop < DPOC_GEN_MAX_STOP; i++) {
        int32_t id = dpoc_tokenizer_token_to_id(lm->tok, END_OF_TURN[i]);
        if (id >= 0 && id != eos) o->stop_ids[o->n_stop++] = id;
    }
}

int cli_lm_decode(cli_lm *lm, const dpoc_ids *ids, char **text, dpoc_err *err) {
    size_t len = 0;
    return dpoc_tokenizer_decode(lm->tok, ids->ids, ids->n, 1, text, &len, err);
}

/* ---- option values ---- */

int cli_parse_size(const char *opt, const char *s, size_t *out, dpoc_err *err) {
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (!s[0] || *end || errno || s[0] == '-') return dpoc_errf(err, DPOC_EINPUT, "%s '%s': expected a count", opt, s);
    *out = (size_t)v;
    return 0;
}

int cli_parse_u64(const char *opt, const char *s, uint64_t *out, dpoc_err *err) {
    size_t v = 0;
    DPOC_TRY(cli_parse_size(opt, s, &v, err));
    *out = (uint64_t)v;
    return 0;
}

int cli_parse_float(const char *opt, const char *s, float *out, dpoc_err *err) {
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (!s[0] || *end || errno || !isfinite(v)) return dpoc_errf(err, DPOC_EINPUT, "%s '%s': expected a number", opt, s);
    *out = (float)v;
    return 0;
}
