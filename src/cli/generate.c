/* `dpoc generate`, `dpoc build-pairs` and `dpoc perplexity`: the commands that
 * run a trained or untrained model on chat prompts. */
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "commands.h"
#include "core/fileutil.h"
#include "dpoc/config.h"
#include "dpoc/generate.h"
#include "dpoc/prompts.h"
#include "lm.h"

/* Options the three commands share. */
typedef struct {
    const char *model, *adapter, *tokenizer, *chat_template, *system, *prompt, *prompts, *out, *data;
    const char *replace;
    size_t samples;
    int jsonl;
    dpoc_gen_opts gen;
} gen_args;

/* Parses argv into a; returns 0, or 1 for --help, or an error status. */
static int parse_args(int argc, char **argv, gen_args *a, const char *cmd, dpoc_err *err) {
    for (int i = 0; i < argc; i++) {
        const char *k = argv[i];
        if (!strcmp(k, "--help") || !strcmp(k, "-h")) return 1;
        if (!strcmp(k, "--jsonl")) {
            a->jsonl = 1;
            continue;
        }
        if (i + 1 >= argc) return dpoc_errf(err, DPOC_EINPUT, "unexpected argument '%s' (see dpoc %s --help)", k, cmd);
        const char *v = argv[++i];
        if (!strcmp(k, "--model")) a->model = v;
        else if (!strcmp(k, "--adapter")) a->adapter = v;
        else if (!strcmp(k, "--tokenizer")) a->tokenizer = v;
        else if (!strcmp(k, "--chat-template")) a->chat_template = v;
        else if (!strcmp(k, "--system")) a->system = v;
        else if (!strcmp(k, "--prompt")) a->prompt = v;
        else if (!strcmp(k, "--prompts")) a->prompts = v;
        else if (!strcmp(k, "--out")) a->out = v;
        else if (!strcmp(k, "--data")) a->data = v;
        else if (!strcmp(k, "--replace")) a->replace = v;
        else if (!strcmp(k, "--samples")) DPOC_TRY(cli_parse_size(k, v, &a->samples, err));
        else if (!strcmp(k, "--max-new-tokens")) DPOC_TRY(cli_parse_size(k, v, &a->gen.max_new_tokens, err));
        else if (!strcmp(k, "--batch-size")) DPOC_TRY(cli_parse_size(k, v, &a->gen.max_batch, err));
        else if (!strcmp(k, "--temperature")) DPOC_TRY(cli_parse_float(k, v, &a->gen.temperature, err));
        else if (!strcmp(k, "--top-p")) DPOC_TRY(cli_parse_float(k, v, &a->gen.top_p, err));
        else if (!strcmp(k, "--seed")) DPOC_TRY(cli_parse_u64(k, v, &a->gen.seed, err));
        else return dpoc_errf(err, DPOC_EINPUT, "unknown option '%s' (see dpoc %s --help)", k, cmd);
    }
    if (!a->model) return dpoc_errf(err, DPOC_EINPUT, "--model PATH is required (see dpoc %s --help)", cmd);
    if (a->gen.temperature < 0) return dpoc_errf(err, DPOC_EINPUT, "--temperature must be >= 0");
    if (!(a->gen.top_p > 0 && a->gen.top_p <= 1)) return dpoc_errf(err, DPOC_EINPUT, "--top-p must be in (0, 1]");
    if (!a->gen.max_batch) return dpoc_errf(err, DPOC_EINPUT, "--batch-size must be at least 1");
    return 0;
}

static const char *MODEL_HELP =
    "  --model PATH             a GGUF file, a Hugging Face model directory (dpoc train's output_dir\n"
    "                           or an exported one) or a checkpoint .h5\n"
    "  --adapter DIR            a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors,\n"
    "                           as dpoc train with use_peft or peft's save_pretrained writes it) on the model\n"
    "  --tokenizer PATH         tokenizer (GGUF or directory with tokenizer.json; default: the model's)\n"
    "  --chat-template NAME     chatml, qwen2.5, smollm2 or llama3 (default: the tokenizer's)\n"
    "  --system TEXT            a system message (default: the template's own default, if any)\n";

static const char *SAMPLING_HELP =
    "  --max-new-tokens N       per answer (default 256)\n"
    "  --temperature T          0 = greedy (default 0)\n"
    "  --top-p P                nucleus sampling (default 1)\n"
    "  --seed S                 random seed (default 42); each prompt has its own stream\n"
    "  --batch-size B           prompts decoded together (default 128)\n";

/* Prompt ids of every user message. */
static int prompt_ids(cli_lm *lm, const char *system, char **users, size_t n, dpoc_ids **out, dpoc_err *err) {
    *out = calloc(n ? n : 1, sizeof **out);
    if (!*out) return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) DPOC_TRY(cli_lm_prompt(lm, system, users[i], &(*out)[i], err));
    return 0;
}

static void free_ids(dpoc_ids *v, size_t n) {
    if (!v) return;
    for (size_t i = 0; i < n; i++) dpoc_ids_free(&v[i]);
    free(v);
}

static int ended(const dpoc_gen_opts *o, const dpoc_ids *g) {
    if (!g->n) return 0;
    for (size_t i = 0; i < o->n_stop; i++)
        if (g->ids[g->n - 1] == o->stop_ids[i]) return 1;
    return 0;
}

/* The prompts of --prompt or --prompts. */
static int load_prompts(const gen_args *a, char ***users, size_t *n, const char *cmd, dpoc_err *err) {
    if (!!a->prompt == !!a->prompts) return dpoc_errf(err, DPOC_EINPUT, "give one of --prompt TEXT or --prompts FILE (see dpoc %s --help)", cmd);
    if (a->prompts) return dpoc_prompts_read(a->prompts, users, n, err);
    *users = malloc(sizeof **users);
    if (!*users || !((*users)[0] = strdup(a->prompt))) {
        free(*users);
        return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    }
    *n = 1;
    return 0;
}

/* ---- generate ---- */

static void generate_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc generate --model PATH (--prompt TEXT | --prompts FILE) [options]\n\n"
            "Answers each prompt as the user turn of a chat (the model's chat template, KV cache,\n"
            "several prompts decoded together) and prints the answers; stops at end-of-turn / EOS.\n"
            "FILE: one prompt per line, JSONL of {\"prompt\": ...}, or a JSON array of strings.\n\n%s%s"
            "  --jsonl                  print {\"prompt\", \"answer\", \"n_tokens\", \"finish_reason\"} per line\n",
            MODEL_HELP, SAMPLING_HELP);
}

static int print_answer(FILE *f, int jsonl, const char *prompt, const char *answer, size_t n_tokens, int stopped) {
    if (!jsonl) return fprintf(f, ">>> %s\n%s\n\n", prompt, answer) < 0;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "prompt", prompt);
    cJSON_AddStringToObject(o, "answer", answer);
    cJSON_AddNumberToObject(o, "n_tokens", (double)n_tokens);
    cJSON_AddStringToObject(o, "finish_reason", stopped ? "stop" : "length");
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    int bad = !s || fprintf(f, "%s\n", s) < 0;
    free(s);
    return bad;
}

int dpoc_cli_generate(int argc, char **argv) {
    dpoc_err err;
    dpoc_err_clear(&err);
    gen_args a;
    memset(&a, 0, sizeof a);
    dpoc_gen_opts_default(&a.gen);
    int rc = parse_args(argc, argv, &a, "generate", &err);
    if (rc == 1) {
        generate_usage(stdout);
        return 0;
    }
    char **users = NULL;
    size_t n = 0;
    dpoc_ids *prompts = NULL, *outs = NULL;
    cli_lm lm;
    memset(&lm, 0, sizeof lm);
    if (!rc) rc = load_prompts(&a, &users, &n, "generate", &err);
    if (!rc) rc = cli_lm_open_adapter(&lm, a.model, a.adapter, a.tokenizer, a.chat_template, &err);
    if (!rc) rc = prompt_ids(&lm, a.system, users, n, &prompts, &err);
    if (!rc && !(outs = calloc(n, sizeof *outs))) rc = dpoc_errf(&err, DPOC_ENOMEM, "out of memory");
    if (!rc) {
        cli_lm_stop_ids(&lm, &a.gen);
        rc = dpoc_generate(&lm.model, prompts, n, &a.gen, outs, &err);
    }
    for (size_t i = 0; !rc && i < n; i++) {
        char *text = NULL;
        if (!(rc = cli_lm_decode(&lm, &outs[i], &text, &err)) &&
            print_answer(stdout, a.jsonl, users[i], text, outs[i].n, ended(&a.gen, &outs[i])))
            rc = dpoc_errf(&err, DPOC_EIO, "writing to stdout failed");
        free(text);
    }
    if (!rc && fflush(stdout)) rc = dpoc_errf(&err, DPOC_EIO, "writing to stdout failed");
    free_ids(prompts, n);
    free_ids(outs, n);
    dpoc_prompts_free(users, n);
    cli_lm_close(&lm);
    if (rc) fprintf(stderr, "dpoc generate: error: %s\n", err.msg);
    return rc;
}

/* ---- build-pairs ---- */

static void build_pairs_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc build-pairs --model PATH --prompts FILE --replace OLD=NEW --out PAIRS.jsonl [options]\n\n"
            "For each prompt, the model's own answer is the rejected response and the same answer with\n"
            "every OLD replaced by NEW the chosen one (TRL conversational format; the system message, when\n"
            "given, in the prompt of both). Answer 1 is the model's greedy answer (what it says by\n"
            "default); answers 2..K are sampled with --temperature / --top-p. The first answer that\n"
            "contains OLD makes the pair; prompts with none in K answers are skipped and counted.\n\n%s%s"
            "  --samples K              answers tried per prompt (default 4)\n"
            "  (defaults here: --temperature 0.7, --top-p 0.9, --max-new-tokens 128)\n",
            MODEL_HELP, SAMPLING_HELP);
}

/* s with every occurrence of old (left to right, not overlapping) replaced by new_ */
static char *replace_all(const char *s, const char *old, const char *new_) {
    size_t lo = strlen(old), ln = strlen(new_), count = 0;
    for (const char *p = strstr(s, old); p; p = strstr(p + lo, old)) count++;
    char *out = malloc(strlen(s) + count * ln + 1);
    if (!out) return NULL;
    char *o = out;
    const char *at = s;
    for (const char *p = strstr(s, old); p; p = strstr(p + lo, old)) {
        memcpy(o, at, (size_t)(p - at));
        o += p - at;
        memcpy(o, new_, ln);
        o += ln;
        at = p + lo;
    }
    strcpy(o, at);
    return out;
}

static cJSON *message_list(const char *system, const char *role, const char *content) {
    cJSON *arr = cJSON_CreateArray();
    if (system) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", system);
        cJSON_AddItemToArray(arr, m);
    }
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "role", role);
    cJSON_AddStringToObject(m, "content", content);
    cJSON_AddItemToArray(arr, m);
    return arr;
}

/* Appends one pair as a JSON line to *buf. */
static int append_pair(char **buf, size_t *len, size_t *cap, const char *system, const char *user, const char *chosen,
                       const char *rejected, dpoc_err *err) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "prompt", message_list(system, "user", user));
    cJSON_AddItemToObject(o, "chosen", message_list(NULL, "assistant", chosen));
    cJSON_AddItemToObject(o, "rejected", message_list(NULL, "assistant", rejected));
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s) return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
    size_t n = strlen(s);
    if (*len + n + 2 > *cap) {
        size_t c = (*cap + n + 2) * 2;
        char *nb = realloc(*buf, c);
        if (!nb) {
            free(s);
            return dpoc_errf(err, DPOC_ENOMEM, "out of memory");
        }
        *buf = nb, *cap = c;
    }
    memcpy(*buf + *len, s, n);
    *len += n;
    (*buf)[(*len)++] = '\n';
    free(s);
    return 0;
}

static int write_out(const char *path, const char *buf, size_t len, dpoc_err *err) {
    char d[DPOC_PATH_MAX], b[DPOC_PATH_MAX];
    if (snprintf(d, sizeof d, "%s", path) >= (int)sizeof d) return dpoc_errf(err, DPOC_EINPUT, "--out: path too long");
    snprintf(b, sizeof b, "%s", path);
    const char *dir = dirname(d), *base = basename(b);
    DPOC_TRY(dpoc_mkdirs(dir, err));
    return dpoc_write_file_atomic(dir, base, buf, len, err);
}

int dpoc_cli_build_pairs(int argc, char **argv) {
    dpoc_err err;
    dpoc_err_clear(&err);
    gen_args a;
    memset(&a, 0, sizeof a);
    dpoc_gen_opts_default(&a.gen);
    a.gen.temperature = 0.7f;
    a.gen.top_p = 0.9f;
    a.gen.max_new_tokens = 128;
    a.samples = 4;
    int rc = parse_args(argc, argv, &a, "build-pairs", &err);
    if (rc == 1) {
        build_pairs_usage(stdout);
        return 0;
    }
    char old[512] = "", new_[512] = "";
    if (!rc) {
        const char *eq = a.replace ? strchr(a.replace, '=') : NULL;
        if (!eq || eq == a.replace || (size_t)(eq - a.replace) >= sizeof old || strlen(eq + 1) >= sizeof new_)
            rc = dpoc_errf(&err, DPOC_EINPUT, "--replace OLD=NEW is required (OLD non-empty)");
        else {
            memcpy(old, a.replace, (size_t)(eq - a.replace));
            snprintf(new_, sizeof new_, "%s", eq + 1);
        }
    }
    if (!rc && !a.out) rc = dpoc_errf(&err, DPOC_EINPUT, "--out PAIRS.jsonl is required");
    if (!rc && !a.samples) rc = dpoc_errf(&err, DPOC_EINPUT, "--samples must be at least 1");
    if (!rc && !a.prompts) rc = dpoc_errf(&err, DPOC_EINPUT, "--prompts FILE is required");
    char **users = NULL, **answer = NULL;
    size_t n = 0;
    dpoc_ids *prompts = NULL, *outs = NULL, *todo_ids = NULL;
    size_t *todo = NULL;
    cli_lm lm;
    memset(&lm, 0, sizeof lm);
    if (!rc) rc = load_prompts(&a, &users, &n, "build-pairs", &err);
    if (!rc) rc = cli_lm_open_adapter(&lm, a.model, a.adapter, a.tokenizer, a.chat_template, &err);
    if (!rc) rc = prompt_ids(&lm, a.system, users, n, &prompts, &err);
    if (!rc && (!(answer = calloc(n, sizeof *answer)) || !(todo = calloc(n, sizeof *todo)) ||
                !(todo_ids = calloc(n, sizeof *todo_ids)) || !(outs = calloc(n, sizeof *outs))))
        rc = dpoc_errf(&err, DPOC_ENOMEM, "out of memory");
    if (!rc) cli_lm_stop_ids(&lm, &a.gen);
    size_t truncated = 0;
    /* round k answers every prompt still without OLD, all of them batched */
    for (size_t k = 0; !rc && k < a.samples; k++) {
        size_t nt = 0;
        for (size_t i = 0; i < n; i++)
            if (!answer[i]) todo[nt] = i, todo_ids[nt++] = prompts[i];
        if (!nt) break;
        dpoc_gen_opts o = a.gen;
        if (k == 0) o.temperature = 0.0f; /* the model's default answer first */
        o.seed = a.gen.seed + k;
        for (size_t j = 0; j < nt; j++) outs[j].n = 0;
        rc = dpoc_generate(&lm.model, todo_ids, nt, &o, outs, &err);
        for (size_t j = 0; !rc && j < nt; j++) {
            char *text = NULL;
            if ((rc = cli_lm_decode(&lm, &outs[j], &text, &err))) break;
            if (strstr(text, old)) {
                answer[todo[j]] = text;
                if (!ended(&o, &outs[j])) truncated++;
            } else {
                free(text);
            }
        }
        fprintf(stderr, "build-pairs: round %zu/%zu: %zu prompts answered\n", k + 1, a.samples, nt);
    }
    char *buf = NULL;
    size_t len = 0, cap = 0, kept = 0;
    for (size_t i = 0; !rc && i < n; i++) {
        if (!answer[i]) continue;
        char *chosen = replace_all(answer[i], old, new_);
        rc = chosen ? append_pair(&buf, &len, &cap, a.system, users[i], chosen, answer[i], &err)
                    : dpoc_errf(&err, DPOC_ENOMEM, "out of memory");
        free(chosen);
        kept++;
    }
    if (!rc && !kept) rc = dpoc_errf(&err, DPOC_EINPUT, "no answer of %zu prompts contains '%s' in %zu samples", n, old, a.samples);
    if (!rc) rc = write_out(a.out, buf, len, &err);
    if (!rc)
        fprintf(stderr,
                "build-pairs: %zu prompts: kept %zu, skipped %zu (no '%s' in %zu answers); %zu kept answers hit "
                "--max-new-tokens; wrote %s\n",
                n, kept, n - kept, old, a.samples, truncated, a.out);
    free(buf);
    for (size_t i = 0; answer && i < n; i++) free(answer[i]);
    free(answer);
    free(todo);
    free(todo_ids); /* views of prompts */
    free_ids(prompts, n);
    free_ids(outs, n);
    dpoc_prompts_free(users, n);
    cli_lm_close(&lm);
    if (rc) fprintf(stderr, "dpoc build-pairs: error: %s\n", err.msg);
    return rc;
}

/* ---- perplexity ---- */

static void perplexity_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc perplexity --model PATH --data FILE.jsonl [options]\n\n"
            "Scores given answers under the model: FILE has one {\"prompt\": ..., \"answer\": ...} per line\n"
            "(what `dpoc generate --jsonl` prints; \"completion\" is accepted for \"answer\"). The answer's\n"
            "tokens are scored after the chat-templated prompt (teacher forcing). Prints one JSON object:\n"
            "n_records, n_tokens, mean_nll (nats per answer token) and perplexity = exp(mean_nll).\n\n%s",
            MODEL_HELP);
}

int dpoc_cli_perplexity(int argc, char **argv) {
    dpoc_err err;
    dpoc_err_clear(&err);
    gen_args a;
    memset(&a, 0, sizeof a);
    dpoc_gen_opts_default(&a.gen);
    int rc = parse_args(argc, argv, &a, "perplexity", &err);
    if (rc == 1) {
        perplexity_usage(stdout);
        return 0;
    }
    if (!rc && !a.data) rc = dpoc_errf(&err, DPOC_EINPUT, "--data FILE.jsonl is required");
    cli_lm lm;
    memset(&lm, 0, sizeof lm);
    if (!rc) rc = cli_lm_open_adapter(&lm, a.model, a.adapter, a.tokenizer, a.chat_template, &err);
    FILE *f = NULL;
    if (!rc && !(f = fopen(a.data, "rb"))) rc = dpoc_errf(&err, DPOC_EINPUT, "%s: cannot open", a.data);
    char *line = NULL;
    size_t lcap = 0, lineno = 0, n_rec = 0, n_tok = 0;
    double nll = 0.0;
    ssize_t got;
    while (!rc && (got = getline(&line, &lcap, f)) >= 0) {
        lineno++;
        size_t b = 0;
        while (b < (size_t)got && (line[b] == ' ' || line[b] == '\t' || line[b] == '\n' || line[b] == '\r')) b++;
        if (b == (size_t)got) continue;
        cJSON *o = cJSON_Parse(line);
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "prompt");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "answer");
        if (!c) c = cJSON_GetObjectItemCaseSensitive(o, "completion");
        dpoc_ids pi = {0}, ci = {0};
        if (!cJSON_IsString(p) || !cJSON_IsString(c)) {
            rc = dpoc_errf(&err, DPOC_EINPUT, "%s:%zu: expected {\"prompt\": \"...\", \"answer\": \"...\"}", a.data, lineno);
        } else if (!(rc = cli_lm_prompt(&lm, a.system, p->valuestring, &pi, &err)) &&
                   !(rc = dpoc_tokenizer_encode(lm.tok, c->valuestring, strlen(c->valuestring), 0, &ci, &err))) {
            double s = 0.0;
            size_t t = 0;
            rc = dpoc_completion_nll(&lm.model, pi.ids, pi.n, ci.ids, ci.n, &s, &t, &err);
            if (rc) dpoc_err_prefix(&err, "%s:%zu", a.data, lineno);
            nll += s;
            n_tok += t;
            n_rec++;
        }
        dpoc_ids_free(&pi);
        dpoc_ids_free(&ci);
        cJSON_Delete(o);
    }
    free(line);
    if (f) fclose(f);
    if (!rc && !n_tok) rc = dpoc_errf(&err, DPOC_EINPUT, "%s: no answer tokens to score", a.data);
    if (!rc) {
        const double mean = nll / (double)n_tok;
        printf("{\"n_records\": %zu, \"n_tokens\": %zu, \"mean_nll\": %.6f, \"perplexity\": %.6f}\n", n_rec, n_tok,
               mean, exp(mean));
        if (fflush(stdout)) rc = dpoc_errf(&err, DPOC_EIO, "writing to stdout failed");
    }
    cli_lm_close(&lm);
    if (rc) fprintf(stderr, "dpoc perplexity: error: %s\n", err.msg);
    return rc;
}
