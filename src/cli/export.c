/* dpoc export: writes a checkpoint's policy as a Hugging Face model directory. */
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "dpoc/err.h"
#include "dpoc/export.h"

static void export_usage(FILE *f) {
    fprintf(f,
            "usage: dpoc export --checkpoint FILE.h5 --out DIR [--dtype fp32|bf16] [--model-dir DIR] [--merge]\n"
            "       dpoc export --checkpoint FILE.h5 --gguf-lora FILE.gguf [--model-dir DIR]\n\n"
            "Verifies the checkpoint (format version and content hash) and writes its policy as a\n"
            "Hugging Face model directory that transformers' from_pretrained loads:\n"
            "  DIR/model.safetensors  the checkpoint's weights, F32 (bit for bit, the default) or BF16\n"
            "                         (rounded to nearest even, as torch's .to(torch.bfloat16))\n"
            "  DIR/config.json        the source model's, with torch_dtype/dtype set to the exported dtype\n"
            "  tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt,\n"
            "  tokenizer.model, added_tokens.json, chat_template.jinja, generation_config.json\n"
            "                         copied from the source directory when it has them\n\n"
            "The source directory is the run's model_name_or_path (tokenizer files from\n"
            "tokenizer_name_or_path when the run set it), relative to the current directory as in\n"
            "training; --model-dir DIR names it instead, tokenizer files included (a model directory\n"
            "moved since training, or export run from another directory).\n"
            "A LoRA run's checkpoint (use_peft) gives its adapter as a PEFT directory instead:\n"
            "  DIR/adapter_config.json, DIR/adapter_model.safetensors  (PeftModel.from_pretrained loads it\n"
            "                         on the base model); --merge writes the merged model (W + scale*B*A) as\n"
            "                         the Hugging Face directory above; --gguf-lora FILE writes llama.cpp's\n"
            "                         LoRA adapter GGUF (llama-cli --lora FILE).\n"
            "Every file is written to a temporary name and renamed into place.\n"
            "Exit codes: 0 written, 2 bad input (missing or corrupted checkpoint, other model), 3 I/O error.\n");
}

int dpoc_cli_export(int argc, char **argv) {
    const char *ckpt = NULL, *out = NULL, *dtype = "fp32", *model_dir = NULL, *gguf_lora = NULL;
    int merge = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            export_usage(stdout);
            return 0;
        }
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--merge")) {
            merge = 1;
            continue;
        }
        const char **dst = !strcmp(a, "--gguf-lora") ? &gguf_lora
                           : !strcmp(a, "--checkpoint") ? &ckpt
                           : !strcmp(a, "--out")      ? &out
                           : !strcmp(a, "--dtype")    ? &dtype
                           : !strcmp(a, "--model-dir") ? &model_dir
                                                       : NULL;
        if (!dst) {
            fprintf(stderr, "dpoc export: unexpected argument '%s' (see dpoc export --help)\n", a);
            return DPOC_EINPUT;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "dpoc export: %s needs a value (see dpoc export --help)\n", a);
            return DPOC_EINPUT;
        }
        *dst = argv[++i];
    }
    if (!ckpt || (!out && !gguf_lora)) {
        fprintf(stderr, "dpoc export: --checkpoint FILE.h5 and --out DIR (or --gguf-lora FILE) are required (see dpoc "
                        "export --help)\n");
        return DPOC_EINPUT;
    }
    if (gguf_lora && (merge || out)) {
        fprintf(stderr, "dpoc export: --gguf-lora writes one file: no --out or --merge with it\n");
        return DPOC_EINPUT;
    }
    int bf16;
    if (!strcmp(dtype, "fp32") || !strcmp(dtype, "float32")) bf16 = 0;
    else if (!strcmp(dtype, "bf16") || !strcmp(dtype, "bfloat16")) bf16 = 1;
    else {
        fprintf(stderr, "dpoc export: --dtype '%s': expected fp32 or bf16\n", dtype);
        return DPOC_EINPUT;
    }
    dpoc_err err;
    dpoc_err_clear(&err);
    dpoc_export_info info;
    const dpoc_export_opts o = {model_dir, bf16, merge, gguf_lora};
    int rc = dpoc_export_checkpoint_opts(ckpt, gguf_lora ? "." : out, &o, &info, &err);
    if (rc) {
        fprintf(stderr, "dpoc export: error: %s\n", err.msg);
        return rc;
    }
    if (info.lora && !merge) {
        printf("dpoc export: %s (step %ld, LoRA) -> %s: %zu adapter tensors, %zu parameters (%s)\n", ckpt, info.step,
               gguf_lora ? gguf_lora : out, info.n_tensors, info.n_params,
               gguf_lora ? "llama.cpp LoRA GGUF" : "PEFT adapter_config.json + adapter_model.safetensors");
        return 0;
    }
    printf("dpoc export: %s (step %ld) -> %s: model.safetensors (%zu tensors, %zu parameters, %s), config.json, "
           "%zu file(s) copied from %s\n",
           ckpt, info.step, out, info.n_tensors, info.n_params, bf16 ? "BF16" : "F32", info.n_copied,
           info.model_dir);
    return 0;
}
