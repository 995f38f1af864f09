/* dpoc data-check --config FILE [--set k=v ...]: tokenizes the training set as
 * `dpoc train` would and reports what it would train on. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "core/fileutil.h"
#include "dpoc/chat.h"
#include "dpoc/config.h"
#include "dpoc/dataset.h"
#include "dpoc/model.h"
#include "dpoc/source.h"
#include "dpoc/tokenizer_source.h"
#include "dpoc/tokenizer.h"

static int cmp_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of a sorted array */
static size_t percentile(const size_t *v, size_t n, double p) {
    if (n == 0) return 0;
    size_t k = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[k < n ? k : n - 1];
}

static void report_lengths(const char *what, size_t *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_size);
    printf("  %-22s p0 %zu  p50 %zu  p90 %zu  p99 %zu  p100 %zu\n", what, percentile(v, n, 0), percentile(v, n, 50),
           percentile(v, n, 90), percentile(v, n, 99), percentile(v, n, 100));
}

int dpoc_cli_data_check(int argc, char **argv) {
    dpoc_config cfg;
    dpoc_config_defaults(&cfg);
    dpoc_err err;
    const char *config_path = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: dpoc data-check --config FILE.json [--set key=value ...]\n\n"
                   "Tokenizes train_file as `dpoc train` would (tokenizer, chat template, max_length,\n"
                   "truncation_mode, skip_bad_records) and reports rows, dropped, truncated and skipped\n"
                   "records, token totals and length percentiles.\n");
            return 0;
        }
        if (!strcmp(argv[i], "--config") && i + 1 < argc) config_path = argv[++i];
        else if (!strcmp(argv[i], "--set") && i + 1 < argc) i++;
        else {
            fprintf(stderr, "dpoc data-check: unexpected argument '%s'\n", argv[i]);
            return DPOC_EINPUT;
        }
    }
    if (!config_path) {
        fprintf(stderr, "dpoc data-check: --config FILE is required\n");
        return DPOC_EINPUT;
    }
    int rc = dpoc_config_load_file(&cfg, config_path, &err);
    for (int i = 0; !rc && i < argc; i++)
        if (!strcmp(argv[i], "--set")) rc = dpoc_config_set(&cfg, argv[++i], &err);
        else if (!strcmp(argv[i], "--config")) i++;
    if (!rc) rc = dpoc_config_finalize(&cfg, &err);
    dpoc_model_config mc;
    /* the model's config and tokenizer as training reads them: a GGUF file or an HF directory */
    if (!rc) rc = dpoc_source_model_config(cfg.model_name_or_path, &mc, &err);
    dpoc_tokenizer *tok = NULL;
    const char *tdir = cfg.tokenizer_name_or_path[0] ? cfg.tokenizer_name_or_path : cfg.model_name_or_path;
    int chat_kind = -1;
    if (!rc) rc = dpoc_source_load_tokenizer(&tok, tdir, &err);
    if (!rc && strcmp(cfg.chat_template, "auto") != 0) {
        chat_kind = dpoc_chat_kind_from_name(cfg.chat_template);
    } else if (!rc && tok && dpoc_tokenizer_chat_template(tok)) {
        dpoc_chat_kind k;
        dpoc_err ignored;
        if (dpoc_chat_detect(dpoc_tokenizer_chat_template(tok), &k, &ignored) == 0) chat_kind = (int)k;
    }
    dpoc_dataset d;
    memset(&d, 0, sizeof d);
    if (!rc) {
        dpoc_prefs_ctx ctx = {tok, chat_kind, mc.vocab_size};
        dpoc_dataset_opts o = {cfg.max_length, cfg.truncation_keep_end, cfg.skip_bad_records};
        rc = dpoc_dataset_load(&d, cfg.train_file, &ctx, &o, &err);
    }
    if (!rc) {
        size_t n = d.n_pairs, truncated = 0, tokens = 0, comp_tokens = 0;
        size_t *pl = malloc((n ? n : 1) * sizeof *pl), *cl = malloc((2 * n + 1) * sizeof *cl),
               *sl = malloc((2 * n + 1) * sizeof *sl);
        if (!pl || !cl || !sl) rc = dpoc_errf(&err, DPOC_ENOMEM, "out of memory");
        for (size_t i = 0; !rc && i < n; i++) {
            const dpoc_pair *p = &d.pairs[i];
            pl[i] = p->prompt_len;
            cl[2 * i] = p->chosen_len;
            cl[2 * i + 1] = p->rejected_len;
            const size_t full[2] = {p->prompt_len + p->chosen_len, p->prompt_len + p->rejected_len};
            int cut = 0;
            for (int k = 0; k < 2; k++) {
                size_t T = cfg.max_length > 0 && full[k] > (size_t)cfg.max_length ? (size_t)cfg.max_length : full[k];
                cut |= T < full[k];
                sl[2 * i + k] = T;
                tokens += T;
                comp_tokens += T > p->prompt_len ? T - p->prompt_len : 0;
            }
            truncated += cut;
        }
        if (!rc) {
            printf("%s: %zu rows read, %zu pairs kept\n", cfg.train_file, d.n_rows, n);
            printf("  dropped (prompt >= max_length %ld): %zu\n", cfg.max_length, d.n_dropped_prompt_too_long);
            printf("  truncated to max_length (%s): %zu pairs\n", cfg.truncation_keep_end ? "keep_end" : "keep_start",
                   truncated);
            printf("  skipped bad records: %zu\n", d.n_skipped_bad);
            printf("  tokens per epoch (prompt+completion, both sequences): %zu, of which completion %zu\n", tokens,
                   comp_tokens);
            printf("  tokenizer: %s; chat template: %s\n", tok ? tdir : "(none: pre-tokenized data)",
                   chat_kind >= 0 ? dpoc_chat_kind_name((dpoc_chat_kind)chat_kind) : "(none)");
            report_lengths("prompt length", pl, n);
            report_lengths("completion length", cl, 2 * n);
            report_lengths("sequence length", sl, 2 * n);
        }
        free(pl);
        free(cl);
        free(sl);
    }
    dpoc_dataset_free(&d);
    dpoc_tokenizer_free(tok);
    if (rc) fprintf(stderr, "dpoc data-check: error: %s\n", err.msg);
    return rc;
}
