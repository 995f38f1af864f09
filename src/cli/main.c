/* dpoc command line. Only here is the process's end decided: library calls
 * return a status and a message; the exit code is that status (2 = bad input). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "commands.h"
#include "dpoc/config.h"
#include "dpoc/dist.h"
#include "dpoc/err.h"
#include "dpoc/run.h"

static void usage(FILE *f) {
    fprintf(f,
            "dpoc %s - Direct Preference Optimization on CPU clusters\n\n"
            "usage: dpoc <command> [options]\n\n"
            "commands:\n"
            "  train --config FILE.json [--set key=value ...]   train with DPO (see `dpoc train --help`)\n"
            "  tokenize --tokenizer PATH (--text S | --jsonl F | --decode IDS | --messages F)  tokenizer and chat\n"
            "  data-check --config FILE.json                     tokenize the training set and report on it\n"
            "  bench-comm [--max-bytes N] [--json]              time MPI_Allreduce, fit alpha-beta (see `dpoc bench-comm --help`)\n"
            "  export --checkpoint FILE.h5 --out DIR            write a checkpoint as a Hugging Face model (see `dpoc export --help`)\n"
            "  generate --model PATH (--prompt S | --prompts F)  answer chat prompts (see `dpoc generate --help`)\n"
            "  build-pairs --model PATH --prompts F --replace OLD=NEW --out F   preference pairs from the model's answers\n"
            "  perplexity --model PATH --data F.jsonl           score given answers (mean NLL, perplexity)\n"
            "  bench --config FILE.json [--steps N] [--json]    training throughput, MFU, memory, time by operation\n"
            "  doctor [--json] [--peak]                         CPU, BLAS and its kernel, GEMM self-check, MPI, HDF5,\n"
            "                                                   /dev/shm: what to paste into a bug report\n"
            "\n"
            "The commands that compute (train, bench, generate, build-pairs, perplexity, doctor) first make\n"
            "OpenBLAS use the kernels this CPU supports (re-executing with OPENBLAS_CORETYPE set, unless you\n"
            "set it) and check its sgemm against a scalar reference; a wrong result stops with exit code 2.\n"
            "--skip-blas-check skips that check (not recommended).\n\n"
            "  --help                                           this text\n"
            "  --version                                        print the version\n",
            DPOC_VERSION);
}

static void train_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc train --config FILE.json [--set key=value ...] [--resume auto|CHECKPOINT.h5]\n\n"
            "Trains the policy model with DPO on the pairs in train_file and writes\n"
            "output_dir/metrics.jsonl (one JSON object per logging step, TRL metric names).\n"
            "--set overrides a config key; the value is JSON (numbers, true, [\"a\",\"b\"]) or a bare string.\n"
            "--resume auto continues from the newest checkpoint in output_dir that verifies (none: start\n"
            "afresh); --resume FILE from that checkpoint. SIGUSR1/SIGTERM/SIGINT write a checkpoint at the\n"
            "next step boundary and exit with code 85 (checkpointed, not finished).\n"
            "Writes output_dir/metrics.jsonl, metrics.h5, checkpoint-STEP.h5 (+ latest) and, at the end,\n"
            "the trained policy as model.safetensors + config.json.\n\n"
            "train_file: JSONL (or a JSON array) of pairs in one of TRL's formats:\n"
            "  {\"prompt\": \"...\", \"chosen\": \"...\", \"rejected\": \"...\"}        standard (prompt optional)\n"
            "  {\"prompt\": [messages], \"chosen\": [messages], \"rejected\": [...]}  conversational (prompt optional)\n"
            "  {\"prompt_input_ids\": [...], \"chosen_input_ids\": [...], \"rejected_input_ids\": [...]}\n"
            "messages are {\"role\": ..., \"content\": ...}; text rows use the model's tokenizer.json.\n\n");
    dpoc_config_print_help(f);
}

static int cmd_train(int argc, char **argv, int *pargc, char ***pargv) {
    dpoc_config cfg;
    dpoc_config_defaults(&cfg);
    dpoc_err err;
    dpoc_err_clear(&err);
    const char *config_path = NULL, *resume = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            train_usage(stdout);
            return 0;
        }
    }
    /* the file first, then every --set in order */
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) config_path = argv[++i];
        else if (!strcmp(argv[i], "--resume") && i + 1 < argc) resume = argv[++i];
        else if (!strcmp(argv[i], "--set") && i + 1 < argc) i++;
        else {
            fprintf(stderr, "dpoc train: unexpected argument '%s' (see dpoc train --help)\n", argv[i]);
            return DPOC_EINPUT;
        }
    }
    if (!config_path) {
        fprintf(stderr, "dpoc train: --config FILE is required (see dpoc train --help)\n");
        return DPOC_EINPUT;
    }
    int rc = dpoc_config_load_file(&cfg, config_path, &err);
    for (int i = 0; !rc && i < argc; i++)
        if (!strcmp(argv[i], "--set")) rc = dpoc_config_set(&cfg, argv[++i], &err);
        else if (!strcmp(argv[i], "--config") || !strcmp(argv[i], "--resume")) i++;
    if (!rc) rc = dpoc_config_finalize(&cfg, &err);
    if (rc) {
        /* every rank parses the same config: each reports and exits alike, no collective needed */
        fprintf(stderr, "dpoc train: error: %s\n", err.msg);
        return rc;
    }
    dpoc_dist dist;
    rc = dpoc_dist_init(&dist, pargc, pargv, (int)cfg.num_threads, &err);
    if (rc) {
        fprintf(stderr, "dpoc train: error: %s\n", err.msg);
        return rc;
    }
    rc = cli_backend_check(&err);
    if (!rc) rc = dpoc_run_train(&cfg, &dist, resume, &err);
    if (rc && rc != DPOC_EXIT_CHECKPOINTED) {
        char msg[DPOC_ERR_MSG_MAX + 32];
        snprintf(msg, sizeof msg, "error: %s", err.msg);
        /* one rank's error ends every rank at once: the others may be waiting in a collective */
        if (dist.world > 1) dpoc_dist_abort(&dist, rc, msg);
        fprintf(stderr, "dpoc train: %s\n", msg);
    }
    dpoc_dist_finalize(&dist);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? DPOC_EINPUT : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("dpoc %s\n", DPOC_VERSION);
        return 0;
    }
    static const char *const computing[] = {"train", "bench", "generate", "build-pairs", "perplexity", "doctor"};
    for (size_t i = 0; i < sizeof computing / sizeof computing[0]; i++)
        if (!strcmp(argv[1], computing[i])) cli_backend_prepare(&argc, argv);
    if (!strcmp(argv[1], "doctor")) return dpoc_cli_doctor(argc - 2, argv + 2);
    if (!strcmp(argv[1], "train")) return cmd_train(argc - 2, argv + 2, &argc, &argv);
    if (!strcmp(argv[1], "tokenize")) return dpoc_cli_tokenize(argc - 2, argv + 2);
    if (!strcmp(argv[1], "data-check")) return dpoc_cli_data_check(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench-comm")) return dpoc_cli_bench_comm(argc - 2, argv + 2, &argc, &argv);
    if (!strcmp(argv[1], "export")) return dpoc_cli_export(argc - 2, argv + 2);
    if (!strcmp(argv[1], "generate")) return dpoc_cli_generate(argc - 2, argv + 2);
    if (!strcmp(argv[1], "build-pairs")) return dpoc_cli_build_pairs(argc - 2, argv + 2);
    if (!strcmp(argv[1], "perplexity")) return dpoc_cli_perplexity(argc - 2, argv + 2);
    if (!strcmp(argv[1], "bench")) return dpoc_cli_bench(argc - 2, argv + 2, &argc, &argv);
    fprintf(stderr, "dpoc: unknown command '%s' (see dpoc --help)\n", argv[1]);
    return DPOC_EINPUT;
}
